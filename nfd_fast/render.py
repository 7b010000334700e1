"""Evaluate a field on huge regular grids (gigapixel images, 4-D space-time), streamed.

render(field, shape) evaluates `field` ([N, D] coordinates -> [N, C] values) on the grid
whose axis k holds linspace(lo_k, hi_k, shape[k]) (inclusive, SIREN's convention; or
cell centres with pixel_centers=True), component k of a coordinate being axis k's value
("ij"; "xy" swaps the first two components, as meshgrid(indexing="xy") would).

The grid is cut into chunks of consecutive points in C order. Each chunk's coordinates
are made on the device from its linear indices (never for the whole grid); for fused
SIREN / FusedMLP fields the kernel makes them itself, so no coordinate tensor exists.
Results go to a tensor, or to a .npy file of shape [*shape, C] written chunk by chunk with
positional writes (no memory map: written pages would stay resident and grow the
process to the image size). A region (per-axis slices of the virtual grid) renders a
crop or a strided sub-grid. Under torch.distributed (torchrun; gloo works on CPU) rank r
takes chunks r, r + W, ... and writes its disjoint parts of the same file.

A file render is resumable and never mixes two renders:
- Its identity is recorded before the .npy is created, in one progress file per rank
  next to it (`<out>.progress-<rank>.jsonl`): the grid, channels, dtype and chunk size, a
  hash of the field's parameters and buffers (modules), and the field's values at a few
  fixed probe points (any callable; catches changed attributes such as w0 or a changed
  closure). A resume whose identity differs is refused, naming what differs.
- Finished chunks are appended to the progress file (never rewritten), at most every
  SYNC_INTERVAL_S seconds and at the end, each batch after its data is fsynced: a record
  never names a chunk whose values are not on disk, and a kill loses at most that much
  work. An output with progress records is unfinished; all records are removed when the
  last chunk lands.
- An existing output without progress records is not an unfinished render: resume=True
  refuses it (it may be another array); resume=False starts over and replaces it.
- A lock file per rank (`<out>.progress-<rank>.lock`, flock) keeps two writers apart.
File names are matched literally (never as glob patterns), so `frame[1].npy` works.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import numbers
import os
import re
import time
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from .ops.fused_mlp import fused_mlp_grid_evaluator

try:  # POSIX advisory locks; elsewhere renders are not locked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

PathLike = Union[str, os.PathLike]

PROGRESS_FORMAT = "nfd_fast.render/2"
SYNC_INTERVAL_S = 1.0  # at most one fsync of data + progress per this many seconds
IN_MEMORY_FRACTION = 0.5  # an out=None result may take at most this much of the free memory
PROBE_POINTS = 16  # fixed grid points whose values identify the field in a progress record
PROBE_RTOL, PROBE_ATOL = 1e-3, 1e-4  # same field on another device / backend still matches


class OutputBusyError(OSError):
    """Another process holds the lock of the render's output."""


class GridSpec:
    """The rendered grid: per output axis, coordinate = offset + index * step."""

    def __init__(self, shape: Sequence[int], bounds=None, region=None,
                 pixel_centers: bool = False, indexing: str = "ij"):
        shape = [int(s) for s in shape]
        if not 1 <= len(shape) <= 4:
            raise ValueError(f"shape: expected 1 to 4 axes, got {len(shape)}")
        if min(shape) < 1:
            raise ValueError(f"shape: sizes must be positive, got {shape}")
        if indexing not in ("ij", "xy"):
            raise ValueError(f"indexing must be 'ij' or 'xy', got {indexing!r}")
        if indexing == "xy" and len(shape) < 2:
            raise ValueError("indexing 'xy' needs at least 2 axes")
        bounds = [(-1.0, 1.0)] * len(shape) if bounds is None else [tuple(map(float, b)) for b in bounds]
        if len(bounds) != len(shape):
            raise ValueError(f"bounds: expected {len(shape)} (lo, hi) pairs, got {len(bounds)}")
        region = [slice(None)] * len(shape) if region is None else list(region)
        if len(region) != len(shape):
            raise ValueError(f"region: expected {len(shape)} slices, got {len(region)}")
        self.virtual_shape, self.bounds, self.indexing = shape, bounds, indexing
        self.pixel_centers = pixel_centers
        self.shape, self.offset, self.step = [], [], []
        for n, (lo, hi), sl in zip(shape, bounds, region):
            if not isinstance(sl, slice):
                raise TypeError(f"region: expected slices, got {sl!r}")
            start, stop, stride = sl.indices(n)
            if stride < 1:
                raise ValueError(f"region: steps must be positive, got {sl}")
            count = len(range(start, stop, stride))
            if count < 1:
                raise ValueError(f"region: {sl} selects nothing from an axis of {n}")
            delta = (hi - lo) / n if pixel_centers else ((hi - lo) / (n - 1) if n > 1 else 0.0)
            base = lo + (0.5 * delta if pixel_centers else 0.0)
            self.shape.append(count)
            self.offset.append(base + start * delta)
            self.step.append(stride * delta)
        self.numel = math.prod(self.shape)

    @property
    def dims(self) -> int:
        return len(self.shape)

    def component_axes(self) -> list:
        """Which grid axis feeds each coordinate component."""
        axes = list(range(self.dims))
        if self.indexing == "xy":
            axes[0], axes[1] = 1, 0
        return axes

    def coordinates(self, start: int, count: int, device, dtype=torch.float32) -> torch.Tensor:
        """[count, D] coordinates of the points start .. start+count-1 (C order)."""
        lin = torch.arange(start, start + count, device=device, dtype=torch.int64)
        return self.coordinates_at(lin, dtype)

    def coordinates_at(self, lin: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        """[len(lin), D] coordinates of the points with C-order linear indices `lin` (int64)."""
        index = []
        for n in reversed(self.shape):
            index.append(lin % n)
            lin = lin // n
        index = index[::-1]
        cols = [self.offset[a] + index[a].to(torch.float64) * self.step[a] for a in self.component_axes()]
        return torch.stack(cols, dim=-1).to(dtype)

    def describe(self) -> dict:
        return {"shape": self.shape, "virtual_shape": self.virtual_shape, "bounds": self.bounds,
                "offset": self.offset, "step": self.step, "indexing": self.indexing,
                "pixel_centers": self.pixel_centers}


def _distributed() -> tuple:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


# ------------------------------------------------------------------- argument checks


def _chunk_points(chunk_size, device: torch.device) -> int:
    if chunk_size is None:
        return 2**22 if device.type == "cuda" else 2**18
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral):
        raise TypeError(f"chunk_size: expected a whole number of points, got {chunk_size!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size: must be at least 1, got {chunk_size}")
    return int(chunk_size)


def _check_writable(path: Path, name: str) -> None:
    if path.is_dir():
        raise IsADirectoryError(f"{name}: {path} is a directory; give a file path")
    if not path.parent.is_dir() or not os.access(path.parent, os.W_OK):
        raise PermissionError(f"{name}: cannot write into {path.parent}")


def _check_out(out: PathLike) -> Path:
    out = Path(out)
    if out.suffix.lower() != ".npy":
        raise ValueError(f"out: expected a .npy path for the rendered values, got {str(out)!r} "
                         "(an image of the render is preview=...)")
    _check_writable(out, "out")
    return out


def _check_preview(preview: PathLike, channels: int, size, value_range) -> None:
    """Everything that could make the preview fail, checked before the render starts."""
    from PIL import Image

    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
        raise ValueError(f"preview_size: expected a positive whole number, got {size!r}")
    lo, hi = (float(v) for v in value_range)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"preview_range: expected finite (lo, hi) with lo < hi, got {value_range!r}")
    path = Path(preview)
    _check_writable(path, "preview")
    Image.init()
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"preview: unknown image extension {path.suffix!r} in {str(path)!r}; use .png")
    if channels not in (1, 3, 4):
        raise ValueError(f"preview: needs 1, 3 or 4 channels, the field gives {channels}")
    mode = _Preview.MODES[channels]
    try:  # a 1-pixel image of the preview's mode, saved in memory, finds unsupported modes
        Image.new(mode, (1, 1)).save(io.BytesIO(), format=fmt)
    except Exception as exc:
        raise ValueError(f"preview: {fmt} cannot hold a {channels}-channel ({mode}) image "
                         f"({type(exc).__name__}: {exc}); use .png") from exc


def _output_dtype(dtype, values: torch.Tensor, to_file: bool) -> torch.dtype:
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype: expected a torch.dtype such as torch.float16, got {dtype!r}")
    if dtype is not None and values.is_floating_point() and not dtype.is_floating_point:
        raise ValueError(f"dtype: {dtype} would truncate the field's {values.dtype} values; "
                         "give a floating-point dtype")
    out_dtype = dtype or values.dtype
    if to_file and out_dtype == torch.bfloat16:
        whose = "the field returns bfloat16, and " if dtype is None else ""
        raise ValueError(f"dtype: {whose}a .npy file cannot hold bfloat16 (numpy has no such type); "
                         "pass dtype=torch.float32 (exact) or dtype=torch.float16")
    return out_dtype


def _free_memory(device: torch.device) -> Optional[int]:
    """Bytes free on `device` (None when unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _check_in_memory(grid: GridSpec, channels: int, dtype: torch.dtype, device) -> None:
    need = grid.numel * channels * torch.empty(0, dtype=dtype).element_size()
    free = _free_memory(device)
    if free is not None and need > IN_MEMORY_FRACTION * free:
        raise ValueError(f"out=None: the result {[*grid.shape, channels]} {dtype} needs "
                         f"{need / 2**30:.1f} GiB, more than {IN_MEMORY_FRACTION:.0%} of the free memory "
                         f"on {device} ({free / 2**30:.1f} GiB); give out='result.npy' to stream it to "
                         "a file, or render a region")


# ------------------------------------------------------------- the field's identity


def _probe_indices(numel: int) -> list:
    """PROBE_POINTS grid points spread over the whole grid, the first and last included."""
    if numel <= PROBE_POINTS:
        return list(range(numel))
    return sorted({round(i * (numel - 1) / (PROBE_POINTS - 1)) for i in range(PROBE_POINTS)})


def _probe(field: Callable, grid: GridSpec, device, dtype) -> torch.Tensor:
    """The field's values at the probe points: checks it runs and returns [N, C] before
    any work, and identifies it in a progress record."""
    lin = torch.tensor(_probe_indices(grid.numel), dtype=torch.int64, device=device)
    coords = grid.coordinates_at(lin, dtype)
    try:
        with torch.no_grad():
            values = field(coords)
    except Exception as exc:
        raise ValueError(f"field: failed on [{len(lin)}, {grid.dims}] coordinates "
                         f"({type(exc).__name__}: {exc})") from exc
    if not torch.is_tensor(values) or values.dim() != 2 or values.shape[0] != len(lin):
        got = list(values.shape) if torch.is_tensor(values) else type(values).__name__
        raise ValueError(f"field: expected a tensor [N, C] for [N, {grid.dims}] coordinates, got {got}")
    return values


def _state_fingerprint(field: Callable) -> Optional[str]:
    """sha256 over a module's class, parameter and buffer names, dtypes, shapes and bytes."""
    if not isinstance(field, torch.nn.Module):
        return None
    digest = hashlib.sha256(type(field).__qualname__.encode())
    for name, value in field.state_dict().items():
        if not torch.is_tensor(value):
            digest.update(f"{name}={value!r};".encode())
            continue
        value = value.detach().reshape(-1).contiguous().cpu()
        digest.update(f"{name}:{value.dtype}:{value.numel()};".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _identity(grid: GridSpec, channels: int, np_dtype, chunk: int, field: Callable,
              probe: torch.Tensor) -> dict:
    identity = {"format": PROGRESS_FORMAT, "grid": grid.describe(), "channels": channels,
                "dtype": str(np_dtype), "chunk_size": chunk, "field_state": _state_fingerprint(field),
                "field_values": probe.detach().double().cpu().reshape(-1).tolist()}
    return json.loads(json.dumps(identity))  # as a progress file gives it back


def _differences(recorded: dict, current: dict) -> list:
    """What makes two render identities differ, in words."""
    found = []
    for key in sorted(set(recorded) | set(current)):
        old, new = recorded.get(key), current.get(key)
        if key == "field_values" and isinstance(old, list) and len(old) == len(new):
            old_v, new_v = np.asarray(old, dtype=np.float64), np.asarray(new, dtype=np.float64)
            if not np.allclose(old_v, new_v, rtol=PROBE_RTOL, atol=PROBE_ATOL, equal_nan=True):
                gap = np.nanmax(np.abs(old_v - new_v)) if np.isfinite(old_v - new_v).any() else float("nan")
                found.append(f"field: its values at the probe points differ (largest difference {gap:.3g})")
        elif key == "field_state" and old != new:
            found.append("field: its parameters or buffers differ")
        elif key == "grid" and isinstance(old, dict) and isinstance(new, dict):
            found += [f"{k}: was {old.get(k)}, now {new.get(k)}" for k in sorted(set(old) | set(new))
                      if old.get(k) != new.get(k)]
        elif old != new:
            found.append(f"{key}: was {old}, now {new}")
    return found


# ------------------------------------------------------------------------ the files


class _NpyWriter:
    """Positional writes into a .npy file created with its header (sparse until written),
    addressed by flat point index: point i's C values start at data_offset + i * C * size."""

    def __init__(self, path: Path, shape, dtype: np.dtype, create: bool):
        self.path, self.shape, self.dtype = path, tuple(shape), np.dtype(dtype)
        if create:
            np.lib.format.open_memmap(path, mode="w+", dtype=self.dtype, shape=self.shape)
        try:
            with open(path, "rb") as f:
                version = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                header_shape, _, header_dtype = read_header(f)
                self.data_offset = f.tell()
        except ValueError as exc:
            raise ValueError(f"out: {path} is not a readable .npy file ({exc})") from exc
        if tuple(header_shape) != self.shape or np.dtype(header_dtype) != self.dtype:
            raise ValueError(f"{path}: holds an array of shape {list(header_shape)} {header_dtype}, "
                             f"not the render's {list(self.shape)} {self.dtype}; refusing to overwrite it")
        self.row_bytes = self.dtype.itemsize * self.shape[-1]
        self.fd = os.open(path, os.O_RDWR)
        end = self.data_offset + math.prod(self.shape) * self.dtype.itemsize
        if os.fstat(self.fd).st_size < end:
            os.close(self.fd)
            raise ValueError(f"out: {path} is shorter than its header says (truncated); "
                             "render with resume=False to start over")

    def write(self, start: int, values: np.ndarray) -> None:
        data = np.ascontiguousarray(values, dtype=self.dtype).tobytes()
        offset = self.data_offset + start * self.row_bytes
        view = memoryview(data)
        while view:
            written = os.pwrite(self.fd, view, offset)
            view, offset = view[written:], offset + written

    def read(self, start: int, count: int) -> np.ndarray:
        """Points start .. start+count-1 as [count, C] (a finished chunk, for the preview)."""
        data = os.pread(self.fd, count * self.row_bytes, self.data_offset + start * self.row_bytes)
        return np.frombuffer(data, dtype=self.dtype).reshape(count, self.shape[-1])

    def sync(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


def _sidecars(out: Path, kind: str) -> dict:
    """{rank: path} of the files `<out>.progress-<rank>.<kind>` (names matched literally)."""
    pattern = re.compile(re.escape(out.name) + r"\.progress-(\d+)\." + kind)
    found = {}
    for name in os.listdir(out.parent):
        match = pattern.fullmatch(name)
        if match:
            found[int(match.group(1))] = out.parent / name
    return found


def _start_over_hint(out: Path) -> str:
    return f"render with resume=False (CLI: --overwrite) to start over, or delete {out} and its progress files"


class _Progress:
    """One rank's progress file: a JSON line with the render's identity, then one JSON line
    per durability point listing the chunks finished since (appended, never rewritten)."""

    def __init__(self, out: Path, rank: int):
        self.out, self.path = out, out.with_name(f"{out.name}.progress-{rank}.jsonl")

    def start(self, identity: dict) -> None:
        """Write the identity line (atomically: a crash leaves no half-written header)."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w") as f:
            f.write(json.dumps(identity) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        _sync_directory(self.path.parent)

    def append(self, chunks: list) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"done": chunks}) + "\n")
            f.flush()
            os.fsync(f.fileno())

    @staticmethod
    def read(path: Path, out: Path) -> tuple:
        """(identity, finished chunks) of a progress file; a torn last line (killed while
        appending) is dropped, its chunks are simply done again."""
        def corrupt(why: str) -> ValueError:
            return ValueError(f"{path}: the render's progress record is unreadable ({why}); "
                              + _start_over_hint(out))

        lines = path.read_bytes().split(b"\n")[:-1]  # the part after the last newline is torn
        if not lines:
            raise corrupt("empty or truncated")
        try:
            identity = json.loads(lines[0])
            done = set()
            for line in lines[1:]:
                done.update(int(c) for c in json.loads(line)["done"])
        except (ValueError, TypeError, KeyError) as exc:
            raise corrupt(f"{type(exc).__name__}: {exc}") from None
        if not isinstance(identity, dict) or identity.get("format") != PROGRESS_FORMAT:
            raise corrupt(f"not a {PROGRESS_FORMAT} record")
        return identity, done


def _sync_directory(path: Path) -> None:
    """Make a rename or a new file in `path` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _Lock:
    """An exclusive flock on `<out>.progress-<rank>.lock` for the whole render."""

    def __init__(self, out: Path, rank: int):
        self.out, self.path, self.fd = out, out.with_name(f"{out.name}.progress-{rank}.lock"), None

    def __enter__(self) -> "_Lock":
        if fcntl is None:
            return self
        while self.fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise OutputBusyError(f"out: another render is writing {self.out} (it holds "
                                      f"{self.path}); wait for it to finish") from None
            try:  # the holder before us may have removed the file we opened: lock the live one
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
            else:
                os.close(fd)
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # removed while held, so no one locks a stale file
            os.close(self.fd)
            self.fd = None


def _open_output(out: Path, identity: dict, resume: bool, rank: int, world: int,
                 num_chunks: int, array_shape: list, np_dtype) -> tuple:
    """(writer, finished chunks, this rank's progress) for a new or resumed file render.
    Every rank looks before rank 0 creates anything; the identity is on disk before the .npy."""
    records = _sidecars(out, "jsonl")
    finished, resuming = set(), resume and out.exists()
    if resuming and not records:
        raise ValueError(f"out: {out} already exists and is not an unfinished render (no progress "
                         f"records next to it); {_start_over_hint(out)}")
    if resuming:
        for path in records.values():
            recorded, done = _Progress.read(path, out)
            differences = _differences(recorded, identity)
            if differences:
                raise ValueError(f"out: {out} is an unfinished render of something else: "
                                 + "; ".join(differences) + f". To continue it, render exactly as "
                                 f"before; else {_start_over_hint(out)}")
            finished |= {c for c in done if 0 <= c < num_chunks}
    _barrier(world)
    progress = _Progress(out, rank)
    if not resuming and rank == 0:
        for path in records.values():
            path.unlink(missing_ok=True)
        progress.start(identity)  # marks the output unfinished before it exists
        _NpyWriter(out, array_shape, np_dtype, create=True).close()
    _barrier(world)
    if (not resuming and rank != 0) or (resuming and rank not in records):
        progress.start(identity)
    return _NpyWriter(out, array_shape, np_dtype, create=False), finished, progress


class _FileSink:
    """Writes chunks in place and records them as finished: at most every SYNC_INTERVAL_S
    (and at the end) the data is fsynced, then the chunks are appended to the progress."""

    def __init__(self, writer: _NpyWriter, progress: _Progress):
        self.writer, self.progress = writer, progress
        self.pending, self.last_sync = [], time.monotonic()

    def put(self, chunk: int, start: int, values: torch.Tensor) -> None:
        self.writer.write(start, values.cpu().numpy())
        self.pending.append(chunk)
        if time.monotonic() - self.last_sync >= SYNC_INTERVAL_S:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.writer.sync()  # the data is on disk before the record says so
            self.progress.append(self.pending)
            self.pending = []
        self.last_sync = time.monotonic()


class _Preview:
    """A strided subsample of a 2-D render, gathered chunk by chunk (bounded memory)."""

    MODES = {1: "L", 3: "RGB", 4: "RGBA"}

    def __init__(self, grid: GridSpec, channels: int, max_size: int):
        H, W = grid.shape
        self.stride = max(1, math.ceil(max(H, W) / max_size))
        self.W = W
        self.image = np.zeros((len(range(0, H, self.stride)), len(range(0, W, self.stride)), channels),
                              dtype=np.float32)

    def add(self, start: int, values: np.ndarray) -> None:
        lin = np.arange(start, start + len(values))
        rows, cols = lin // self.W, lin % self.W
        keep = (rows % self.stride == 0) & (cols % self.stride == 0)
        self.image[rows[keep] // self.stride, cols[keep] // self.stride] = values[keep]

    def save(self, path: PathLike, value_range) -> None:
        from PIL import Image

        lo, hi = value_range
        img = np.clip((self.image - lo) / (hi - lo), 0, 1)
        img = (img * 255 + 0.5).astype(np.uint8)
        mode = self.MODES[img.shape[-1]]
        Image.fromarray(img[..., 0] if mode == "L" else img, mode=mode).save(path)


def grid_evaluator(field: Callable, grid: GridSpec, device) -> Optional[Callable]:
    """chunk (start, count) -> values, with the coordinates made inside the fused kernel,
    when `field` is a fused MLP module (it has fused_mlp_arguments()) and the Triton
    backend serves it on `device`; else None."""
    if not hasattr(field, "fused_mlp_arguments") or len(grid.shape) != field.in_features:
        return None
    axes = grid.component_axes()
    affine = [(grid.offset[a], grid.step[a]) for a in axes]
    return fused_mlp_grid_evaluator(field.fused_mlp_arguments(), grid.shape, affine, axes,
                                    device)


def _evaluator(field: Callable, grid: GridSpec, device, dtype) -> Callable:
    """chunk (start, count) -> values [count, C]: the fused in-kernel-coordinate path for
    fused MLP modules when their kernels run, else the field on generated coordinates."""
    fused = grid_evaluator(field, grid, device)
    if fused is not None:
        return fused

    def evaluate(start: int, count: int) -> torch.Tensor:
        return field(grid.coordinates(start, count, device, dtype))

    return evaluate


def _placement(field: Callable, device) -> tuple:
    """(device, coordinate dtype): the field's parameters' unless told (cpu, float32 without)."""
    params = list(field.parameters()) if isinstance(field, torch.nn.Module) else []
    if device is None:
        device = params[0].device if params else torch.device("cpu")
    dtype = params[0].dtype if params and params[0].is_floating_point() else torch.float32
    return torch.device(device), dtype


def _run_chunks(evaluate: Callable, chunks: list, chunk: int, grid: GridSpec, channels: int,
                out_dtype: torch.dtype, put: Callable, preview: Optional[_Preview], bar) -> None:
    """Evaluate each chunk, check its size, hand it to `put(chunk, start, values)`."""
    with torch.no_grad():
        for c in chunks:
            start = c * chunk
            count = min(chunk, grid.numel - start)
            values = evaluate(start, count)
            if not torch.is_tensor(values) or tuple(values.shape) != (count, channels):
                got = list(values.shape) if torch.is_tensor(values) else type(values).__name__
                raise ValueError(f"field: returned {got} for a chunk of {count} points; expected "
                                 f"[{count}, {channels}] like its first values")
            values = values.to(out_dtype)
            put(c, start, values)
            if preview is not None:
                preview.add(start, values.float().cpu().numpy())
            if bar is not None:
                bar.update(count)


def _progress_bar(show: bool, total: int, initial: int):
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="pt", unit_scale=True, desc="render")


def render(field: Callable, shape: Sequence[int], *, bounds=None, out: Optional[PathLike] = None,
           chunk_size: Optional[int] = None, dtype: Optional[torch.dtype] = None, device=None,
           progress: bool = True, resume: bool = True, region=None, pixel_centers: bool = False,
           indexing: str = "ij", preview: Optional[PathLike] = None, preview_size: int = 1024,
           preview_range=(-1.0, 1.0)):
    """Evaluate `field` on a grid of `shape`; see the module docstring.

    Args:
        field: callable or nn.Module, [N, D] -> [N, C], D = len(shape). For a
            latent-conditioned model, pass a closure with the latent fixed.
        bounds: per-axis (lo, hi); default (-1, 1) on every axis.
        out: None (return a tensor [*shape, C]; refused when it would take more than
            IN_MEMORY_FRACTION of the free memory) or a .npy path to write.
        chunk_size: points per chunk, a whole number >= 1 (default 2^22 on CUDA, 2^18 on CPU).
        dtype: floating dtype of the stored values (default: the field's output dtype), e.g.
            torch.float16 to halve a gigapixel file (.npy cannot hold bfloat16).
        device: where coordinates are made (default: the field's parameters' device);
            coordinates take the dtype of the field's parameters (float32 without any).
        resume: continue an unfinished render of the same field and parameters into `out`;
            an existing `out` that is not one is refused. False: start over, replacing `out`.
        region: per-axis slices of the virtual grid (crop / strided sub-grid).
        preview: image path (.png) for a downscaled preview of a 2-D render with 1, 3 or 4
            channels (values mapped from preview_range to 0..255, longest side <= preview_size).

    Every argument, the output and preview paths, and the field's output shape (on
    PROBE_POINTS points) are checked before the first chunk. Returns the tensor, or the
    output Path.
    """
    grid = GridSpec(shape, bounds, region, pixel_centers, indexing)
    device, coord_dtype = _placement(field, device)
    chunk = _chunk_points(chunk_size, device)
    rank, world = _distributed()
    if preview is not None and grid.dims != 2:
        raise ValueError(f"preview: needs a 2-D render, this one has {grid.dims} axes")
    if world > 1 and out is None:
        raise ValueError("out: with several ranks each renders its share of the chunks; give a "
                         ".npy path (an in-memory result would hold only this rank's share)")
    if world > 1 and preview is not None:
        raise ValueError("preview: not supported with several ranks (render, then preview the file)")
    out = None if out is None else _check_out(out)
    in_features = getattr(field, "in_features", None)
    if isinstance(in_features, int) and in_features != grid.dims:
        raise ValueError(f"field: takes {in_features}-D coordinates, the grid has {grid.dims} axes")
    probe = _probe(field, grid, device, coord_dtype)
    channels = probe.shape[1]
    out_dtype = _output_dtype(dtype, probe, to_file=out is not None)
    if preview is not None:
        _check_preview(preview, channels, preview_size, preview_range)
    if out is None:
        _check_in_memory(grid, channels, out_dtype, device)
    evaluate = _evaluator(field, grid, device, coord_dtype)
    num_chunks = math.ceil(grid.numel / chunk)
    mine = [c for c in range(num_chunks) if c % world == rank]
    pre = _Preview(grid, channels, preview_size) if preview is not None else None
    if out is None:
        result = torch.empty(grid.numel, channels, dtype=out_dtype, device=device)
        bar = _progress_bar(progress, grid.numel, 0)
        put = lambda c, start, values: result[start:start + len(values)].copy_(values)  # noqa: E731
        _run_chunks(evaluate, mine, chunk, grid, channels, out_dtype, put, pre, bar)
        _finish(bar, pre, preview, preview_range)
        return result.view(*grid.shape, channels)
    np_dtype = np.dtype(torch.empty(0, dtype=out_dtype).numpy().dtype)
    identity = _identity(grid, channels, np_dtype, chunk, field, probe)
    with _Lock(out, rank):
        writer, finished, progress_file = _open_output(out, identity, resume, rank, world, num_chunks,
                                                       [*grid.shape, channels], np_dtype)
        try:
            _render_file(writer, progress_file, finished, mine, chunk, grid, channels, out_dtype,
                         evaluate, pre, progress and rank == 0)
        finally:
            writer.close()
        _finish(None, pre, preview, preview_range)
        _barrier(world)
        if rank == 0:
            for path in _sidecars(out, "jsonl").values():
                path.unlink(missing_ok=True)
    return out


def _render_file(writer: _NpyWriter, progress_file: _Progress, finished: set, mine: list,
                 chunk: int, grid: GridSpec, channels: int, out_dtype, evaluate: Callable,
                 pre: Optional[_Preview], show_progress: bool) -> None:
    """This rank's unfinished chunks into the file; what was finished is recorded even when
    a chunk fails or the render is interrupted."""
    todo = [c for c in mine if c not in finished]
    done_before = sorted(set(mine) - set(todo))

    def points(chunks) -> int:
        return sum(min(chunk, grid.numel - c * chunk) for c in chunks)

    if pre is not None:  # chunks finished before a resume
        for c in done_before:
            start = c * chunk
            pre.add(start, writer.read(start, min(chunk, grid.numel - start)).astype(np.float32))
    bar = _progress_bar(show_progress, points(mine), points(done_before))
    sink = _FileSink(writer, progress_file)
    try:
        _run_chunks(evaluate, todo, chunk, grid, channels, out_dtype, sink.put, pre, bar)
    finally:
        sink.flush()
        if bar is not None:
            bar.close()


def _finish(bar, pre: Optional[_Preview], preview, preview_range) -> None:
    if bar is not None:
        bar.close()
    if pre is not None:
        pre.save(preview, preview_range)
