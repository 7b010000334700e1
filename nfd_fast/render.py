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
process to the image size). A progress file next to the output records finished chunks
durably (data fsynced before the record), so a killed render resumes where it stopped.
A region (per-axis slices of the virtual grid) renders a crop or a strided sub-grid.
Under torch.distributed (torchrun; gloo works on CPU) rank r takes chunks r, r + W, ...
and writes its disjoint parts of the same file.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

PathLike = Union[str, os.PathLike]


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
        index = []
        for n in reversed(self.shape):
            index.append(lin % n)
            lin = lin // n
        index = index[::-1]
        cols = [self.offset[a] + index[a].to(torch.float64) * self.step[a] for a in self.component_axes()]
        return torch.stack(cols, dim=-1).to(dtype)

    def describe(self) -> dict:
        return {"shape": self.shape, "virtual_shape": self.virtual_shape, "bounds": self.bounds,
                "offset": self.offset, "step": self.step, "indexing": self.indexing}


def _distributed() -> tuple:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


class _NpyWriter:
    """Positional writes into a .npy file created with its header (sparse until written),
    addressed by flat point index: point i's C values start at data_offset + i * C * size."""

    def __init__(self, path: Path, shape, dtype: np.dtype, create: bool):
        self.path, self.shape, self.dtype = path, tuple(shape), np.dtype(dtype)
        if create:
            np.lib.format.open_memmap(path, mode="w+", dtype=self.dtype, shape=self.shape)
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            header_shape, _, header_dtype = read_header(f)
            self.data_offset = f.tell()
        if tuple(header_shape) != self.shape or np.dtype(header_dtype) != self.dtype:
            raise ValueError(f"{path}: holds an array of shape {list(header_shape)} {header_dtype}, "
                             f"not the render's {list(self.shape)} {self.dtype}; refusing to overwrite it")
        self.fd = os.open(path, os.O_RDWR)
        self.row_bytes = self.dtype.itemsize * self.shape[-1]

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


class _Progress:
    """The finished chunks of one rank, recorded durably next to the output."""

    def __init__(self, out: Path, rank: int, meta: dict):
        self.path = out.with_name(out.name + f".progress-{rank}.json")
        self.out, self.meta, self.done = out, meta, set()

    @staticmethod
    def finished_chunks(out: Path, meta: dict) -> set:
        """Chunks recorded by any rank of an earlier run of the same render."""
        done = set()
        for path in out.parent.glob(out.name + ".progress-*.json"):
            record = json.loads(path.read_text())
            if record["meta"] != meta:
                raise ValueError(f"{path}: records a different render ({record['meta']}); "
                                 "remove it or render with resume=False")
            done.update(record["done"])
        return done

    def has_records(self) -> bool:
        return any(self.out.parent.glob(self.out.name + ".progress-*.json"))

    def record(self, chunk: int) -> None:
        self.done.add(chunk)
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump({"meta": self.meta, "done": sorted(self.done)}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def clear_all(self) -> None:
        for path in self.out.parent.glob(self.out.name + ".progress-*.json"):
            path.unlink(missing_ok=True)


class _Preview:
    """A strided subsample of a 2-D render, gathered chunk by chunk (bounded memory)."""

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
        mode = {1: "L", 3: "RGB", 4: "RGBA"}[img.shape[-1]]
        Image.fromarray(img[..., 0] if mode == "L" else img, mode=mode).save(path)


def _evaluator(field: Callable, grid: GridSpec, device, dtype) -> Callable:
    """chunk (start, count) -> values [count, C]: the fused in-kernel-coordinate path for
    fused MLP modules when their kernels run, else the field on generated coordinates."""
    from .ops.fused_mlp import grid_evaluator

    fused = grid_evaluator(field, grid, device)
    if fused is not None:
        return fused

    def evaluate(start: int, count: int) -> torch.Tensor:
        return field(grid.coordinates(start, count, device, dtype))

    return evaluate


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
        out: None (return a tensor [*shape, C]) or a .npy path to write.
        chunk_size: points per chunk (default 2^22 on CUDA, 2^18 on CPU).
        dtype: dtype of the stored values (default: the field's output dtype), e.g.
            torch.float16 to halve a gigapixel file.
        device: where coordinates are made (default: the field's parameters' device);
            coordinates take the dtype of the field's parameters (float32 without any).
        resume: continue an interrupted render of the same grid into `out`.
        region: per-axis slices of the virtual grid (crop / strided sub-grid).
        preview: PNG path for a downscaled preview of a 2-D render with 1, 3 or 4 channels
            (values mapped from preview_range to 0..255, longest side <= preview_size).

    Returns: the tensor, or the output Path.
    """
    grid = GridSpec(shape, bounds, region, pixel_centers, indexing)
    params = list(field.parameters()) if isinstance(field, torch.nn.Module) else []
    if device is None:
        device = params[0].device if params else torch.device("cpu")
    device = torch.device(device)
    coord_dtype = params[0].dtype if params and params[0].is_floating_point() else torch.float32
    chunk = int(chunk_size or (2**22 if device.type == "cuda" else 2**18))
    if chunk < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if preview is not None and grid.dims != 2:
        raise ValueError(f"preview: needs a 2-D render, this one has {grid.dims} axes")
    rank, world = _distributed()
    if world > 1 and out is None:
        raise ValueError("out: with several ranks each renders its share of the chunks; give a "
                         ".npy path (an in-memory result would hold only this rank's share)")
    if world > 1 and preview is not None:
        raise ValueError("preview: not supported with several ranks (render, then preview the file)")
    in_features = getattr(field, "in_features", None)
    if isinstance(in_features, int) and in_features != grid.dims:
        raise ValueError(f"field: takes {in_features}-D coordinates, the grid has {grid.dims} axes")
    evaluate = _evaluator(field, grid, device, coord_dtype)
    try:
        with torch.no_grad():
            probe = evaluate(0, 1)
    except Exception as exc:
        raise ValueError(f"field: failed on [1, {grid.dims}] coordinates ({type(exc).__name__}: {exc})") from exc
    if probe.dim() != 2 or probe.shape[0] != 1:
        raise ValueError(f"field: expected [N, C] values for [N, {grid.dims}] coordinates, got "
                         f"{list(probe.shape)}")
    channels = probe.shape[1]
    out_dtype = dtype or probe.dtype
    if preview is not None and channels not in (1, 3, 4):
        raise ValueError(f"preview: needs 1, 3 or 4 channels, the field gives {channels}")
    num_chunks = math.ceil(grid.numel / chunk)
    mine = [c for c in range(num_chunks) if c % world == rank]

    def points(chunks) -> int:
        return sum(min(chunk, grid.numel - c * chunk) for c in chunks)

    if out is None:
        result = torch.empty(grid.numel, channels, dtype=out_dtype, device=device)
        sink = lambda start, values: result[start:start + len(values)].copy_(values)  # noqa: E731
        writer = progress_file = None
        todo = mine
    else:
        out = Path(out)
        if not out.parent.is_dir() or not os.access(out.parent, os.W_OK):
            raise PermissionError(f"out: cannot write into {out.parent}")
        np_dtype = torch.empty(0, dtype=out_dtype).numpy().dtype
        # through JSON once, so it compares equal to what a progress file holds
        meta = json.loads(json.dumps({**grid.describe(), "channels": channels,
                                      "dtype": str(np_dtype), "chunk": chunk}))
        progress_file = _Progress(out, rank, meta)
        finished = set()
        resuming = resume and out.exists()
        _barrier(world)  # every rank has looked before rank 0 creates the file
        if resuming:
            if progress_file.has_records():
                finished = _Progress.finished_chunks(out, meta)
            else:  # a finished render leaves no records: check it is this render, then done
                _NpyWriter(out, [*grid.shape, channels], np_dtype, create=False).close()
                finished = set(range(num_chunks))
        if rank == 0 and not resuming:
            progress_file.clear_all()
            _NpyWriter(out, [*grid.shape, channels], np_dtype, create=True).close()
        _barrier(world)
        writer = _NpyWriter(out, [*grid.shape, channels], np_dtype, create=False)
        progress_file.done = {c for c in finished if c % world == rank}
        todo = [c for c in mine if c not in finished]

        def sink(start, values):
            writer.write(start, values.cpu().numpy())

    pre = _Preview(grid, channels, preview_size) if preview is not None else None
    if pre is not None and writer is not None:  # chunks finished before a resume
        for c in sorted(set(mine) - set(todo)):
            start = c * chunk
            pre.add(start, writer.read(start, min(chunk, grid.numel - start)).astype(np.float32))
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        done_points = points(c for c in mine if c not in set(todo))
        bar = tqdm(total=points(mine), unit="pt", unit_scale=True, desc="render", initial=done_points)
    with torch.no_grad():
        for c in todo:
            start = c * chunk
            count = min(chunk, grid.numel - start)
            values = evaluate(start, count).to(out_dtype)
            sink(start, values)
            if pre is not None:
                pre.add(start, values.float().cpu().numpy())
            if writer is not None:
                writer.sync()  # the data is on disk before the record says so
                progress_file.record(c)
            if bar is not None:
                bar.update(count)
    if bar is not None:
        bar.close()
    if pre is not None:
        pre.save(preview, preview_range)
    if writer is None:
        return result.view(*grid.shape, channels)
    writer.close()
    _barrier(world)
    if rank == 0:
        progress_file.clear_all()
    return out
