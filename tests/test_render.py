"""render: grids equal the field on explicitly built coordinates; files are complete and
resumable; ranks split the work; the fused in-kernel-coordinate path agrees; bad input;
a file render never mixes two renders (identity, lock, literal names, unfinished marks)."""
import importlib
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import nfd_fast
from nfd_fast.nn import FusedMLP, Siren
from nfd_fast.render import GridSpec, render

from conftest import DEVICE, rel_err

REPO = Path(__file__).resolve().parents[1]
render_module = importlib.import_module("nfd_fast.render")  # the package exports a function of that name


def poly_field(c: torch.Tensor) -> torch.Tensor:
    """A cheap field whose channels expose every coordinate component and their order."""
    cols = [c[:, k] * (k + 1) for k in range(c.shape[1])]
    return torch.stack(cols + [c.prod(dim=1), c.sum(dim=1) ** 2], dim=1)


def explicit_coordinates(shape, bounds=None, region=None, pixel_centers=False, indexing="ij"):
    """Coordinates of the grid built directly: linspace per axis, sliced, meshgrid 'ij'."""
    axes = []
    for k, n in enumerate(shape):
        lo, hi = bounds[k] if bounds else (-1.0, 1.0)
        if pixel_centers:
            v = lo + (torch.arange(n, dtype=torch.float64) + 0.5) * (hi - lo) / n
        else:
            v = torch.linspace(lo, hi, n, dtype=torch.float64)
        axes.append(v[region[k]] if region else v)
    mesh = torch.meshgrid(*axes, indexing="ij")
    comps = list(mesh)
    if indexing == "xy":
        comps[0], comps[1] = comps[1], comps[0]
    return torch.stack(comps, dim=-1).float()


@pytest.mark.parametrize("shape, options", [
    ((33,), {}),
    ((17, 23), {}),
    ((17, 23), {"indexing": "xy"}),
    ((17, 23), {"pixel_centers": True, "bounds": [(0.0, 1.0), (-2.0, 3.0)]}),
    ((9, 7, 5), {"region": [slice(2, 9, 3), slice(None), slice(1, 4)]}),
    ((6, 5, 4, 3), {"region": [slice(1, None), slice(None, None, 2), slice(None), slice(0, 2)],
                    "indexing": "xy"}),
])
def test_grid_equals_field_on_explicit_coordinates(shape, options):
    got = render(poly_field, shape, chunk_size=37, progress=False, device=DEVICE, **options)
    coords = explicit_coordinates(shape, **options).to(DEVICE)
    want = poly_field(coords.reshape(-1, len(shape))).reshape(*coords.shape[:-1], -1)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_output_dtype_and_float64_fields(tmp_path):
    half = render(poly_field, (5, 6), out=tmp_path / "h.npy", dtype=torch.float16, progress=False)
    assert np.load(half).dtype == np.float16
    siren = Siren(2, 16, 1, 1).double()
    with nfd_fast.use_backend("torch"):
        assert render(siren, (4, 4), progress=False).dtype == torch.float64


def test_file_output_is_complete_and_leaves_no_records(tmp_path):
    out = tmp_path / "grid.npy"
    path = render(poly_field, (31, 19, 2), out=out, chunk_size=100, progress=False)
    arr = np.load(path)
    want = render(poly_field, (31, 19, 2), chunk_size=4096, progress=False)
    assert arr.shape == (31, 19, 2, 5) and arr.dtype == np.float32
    np.testing.assert_array_equal(arr, want.numpy())
    assert not list(tmp_path.glob("*.progress-*"))


def _render_script(out: Path, kill_after: int, shape=(40, 30), chunk=97) -> str:
    return textwrap.dedent(f"""
        import importlib, os, signal, torch
        from nfd_fast.render import render
        importlib.import_module("nfd_fast.render").SYNC_INTERVAL_S = 0  # record every chunk
        calls = 0
        def field(c):
            global calls
            calls += 1
            if calls == {kill_after} + 2:  # the probe, then {kill_after} chunks, then die
                os.kill(os.getpid(), signal.SIGKILL)
            return torch.stack([c[:, 0] * 3, c[:, 1] - c[:, 0], (c ** 2).sum(1)], 1)
        render(field, {shape}, out={str(out)!r}, chunk_size={chunk}, progress=False)
    """)


def test_killed_render_resumes_to_identical_file(tmp_path):
    out = tmp_path / "killed.npy"
    res = subprocess.run([sys.executable, "-c", _render_script(out, kill_after=5)],
                         capture_output=True, text=True)
    assert res.returncode == -9, res.stderr  # really killed mid-render
    assert list(tmp_path.glob("killed.npy.progress-*"))
    evaluated = []

    def field(c):
        evaluated.append(len(c))
        return torch.stack([c[:, 0] * 3, c[:, 1] - c[:, 0], (c ** 2).sum(1)], 1)

    render(field, (40, 30), out=out, chunk_size=97, progress=False)
    total_chunks = -(-1200 // 97)
    assert len(evaluated) == 1 + total_chunks - 5  # the probe + only the unfinished chunks
    fresh = tmp_path / "fresh.npy"
    render(field, (40, 30), out=fresh, chunk_size=97, progress=False)
    assert out.read_bytes() == fresh.read_bytes()
    assert not list(tmp_path.glob("*.progress-*"))


def test_two_gloo_ranks_write_the_same_file(tmp_path):
    out = tmp_path / "ranks.npy"
    script = textwrap.dedent(f"""
        import sys, torch, torch.distributed as dist
        from nfd_fast.render import render
        rank = int(sys.argv[1])
        dist.init_process_group("gloo", init_method="file://{tmp_path}/rendezvous",
                                rank=rank, world_size=2)
        field = lambda c: torch.stack([c[:, 0] * 3, c[:, 1] - c[:, 0]], 1)
        render(field, (37, 41), out={str(out)!r}, chunk_size=50, progress=False)
        dist.destroy_process_group()
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(r)], stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    single = render(lambda c: torch.stack([c[:, 0] * 3, c[:, 1] - c[:, 0]], 1), (37, 41),
                    chunk_size=50, progress=False)
    np.testing.assert_array_equal(np.load(out), single.numpy())
    assert not list(tmp_path.glob("*.progress-*"))


@pytest.mark.parametrize("module", ["siren", "fused_mlp"])
def test_fused_in_kernel_coordinates_match(module):
    from nfd_fast.render import grid_evaluator

    torch.manual_seed(0)
    if module == "siren":
        field = Siren(3, 32, 1, 2, first_omega_0=8.0).to(DEVICE)
        shape, options = (9, 7, 5), {"region": [slice(1, 9, 2), slice(None), slice(0, 5, 2)],
                                     "indexing": "xy", "pixel_centers": True}
    else:
        field = FusedMLP(2, 48, 3, hidden_layers=2, activation="gelu").to(DEVICE)
        shape, options = (21, 13), {"bounds": [(0.0, 2.0), (-1.0, 0.5)]}
    with nfd_fast.use_backend("triton"):
        assert grid_evaluator(field, GridSpec(shape, **{k: v for k, v in options.items()}), DEVICE)
        fused = render(field, shape, chunk_size=50, progress=False, **options)
    coords = explicit_coordinates(shape, **options).to(DEVICE)
    with nfd_fast.use_backend("torch"), torch.no_grad():
        want = field(coords.reshape(-1, len(shape))).reshape(*coords.shape[:-1], -1)
    assert rel_err(fused, want) < 1e-5


def test_preview_png(tmp_path):
    Image = pytest.importorskip("PIL.Image")  # installed by setup.py; absent on the offline GPU box

    out = tmp_path / "img.npy"
    render(lambda c: torch.stack([c[:, 0], c[:, 1], c.sum(1) / 2], 1), (300, 200), out=out,
           preview=tmp_path / "img.png", preview_size=64, chunk_size=1000, progress=False)
    img = Image.open(tmp_path / "img.png")
    assert img.size == (len(range(0, 200, 5)), len(range(0, 300, 5))) and img.mode == "RGB"
    arr = np.asarray(img).astype(np.float32)
    # channel 0 is the row coordinate: dark at the top, bright at the bottom
    assert arr[0, :, 0].mean() < 5 and arr[-1, :, 0].mean() > 245


def test_peak_memory_of_a_file_render_stays_far_below_the_image(tmp_path):
    """4096 x 4096 x 3 float32 (192 MiB) to a file in 2^16-point chunks: resident memory
    grows by far less (5-10 MiB measured; the bound leaves room for allocator noise).
    (8192^2 x 3, 768 MiB: +146 MiB peak with 2^20-point chunks, see the closing note.)"""
    script = textwrap.dedent(f"""
        import resource, torch
        from nfd_fast.render import render
        field = lambda c: torch.stack([c[:, 0], c[:, 1], c[:, 0] * c[:, 1]], 1)
        render(field, (8, 8), progress=False)  # warm up allocator and imports
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        render(field, (4096, 4096), out={str(tmp_path / "big.npy")!r}, chunk_size=2**16,
               progress=False)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    growth_mib = float(res.stdout.strip().splitlines()[-1])
    assert growth_mib < 192 / 4, growth_mib
    assert (tmp_path / "big.npy").stat().st_size > 4096 * 4096 * 12


def test_resumed_render_preview_includes_the_chunks_finished_before(tmp_path):
    pytest.importorskip("PIL.Image")
    out = tmp_path / "killed.npy"
    script = _render_script(out, kill_after=5).replace(
        "progress=False)", f"progress=False, preview={str(tmp_path / 'first.png')!r})")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert res.returncode == -9, res.stderr

    def field(c):
        return torch.stack([c[:, 0] * 3, c[:, 1] - c[:, 0], (c ** 2).sum(1)], 1)

    render(field, (40, 30), out=out, chunk_size=97, progress=False, preview=tmp_path / "resumed.png")
    render(field, (40, 30), out=tmp_path / "fresh.npy", chunk_size=97, progress=False,
           preview=tmp_path / "fresh.png")
    assert (tmp_path / "resumed.png").read_bytes() == (tmp_path / "fresh.png").read_bytes()


def test_several_ranks_need_a_file_and_no_preview(tmp_path, monkeypatch):
    monkeypatch.setattr(render_module, "_distributed", lambda: (0, 2))
    calls = []

    def field(c):
        calls.append(len(c))
        return c

    with pytest.raises(ValueError, match="out: with several ranks"):
        render(field, (8, 8), progress=False)
    with pytest.raises(ValueError, match="preview: not supported with several ranks"):
        render(field, (8, 8), out=tmp_path / "x.npy", preview=tmp_path / "x.png", progress=False)
    assert calls == [] and not (tmp_path / "x.npy").exists()  # refused before any work


# ------------------------------------------------------------------------ bad input


def test_bad_input(tmp_path):
    siren = Siren(2, 16, 1, 3)
    with pytest.raises(ValueError, match="shape: sizes must be positive"):
        render(poly_field, (4, 0), progress=False)
    with pytest.raises(ValueError, match="shape: expected 1 to 4 axes"):
        render(poly_field, (2, 2, 2, 2, 2), progress=False)
    with pytest.raises(ValueError, match="field: takes 2-D coordinates, the grid has 3 axes"):
        render(siren, (4, 4, 4), progress=False)
    with pytest.raises(ValueError, match="field: failed on \\[16, 2\\] coordinates"):
        render(lambda c: c @ torch.ones(3, 3), (4, 4), progress=False)
    with pytest.raises(PermissionError, match="cannot write into"):
        render(poly_field, (4, 4), out=tmp_path / "missing" / "x.npy", progress=False)
    with pytest.raises(ValueError, match="region: .* selects nothing"):
        render(poly_field, (4, 4), region=[slice(5, 9), slice(None)], progress=False)


def test_resume_onto_a_file_of_another_shape_is_refused_and_harmless(tmp_path):
    out = tmp_path / "other.npy"
    np.save(out, np.arange(12, dtype=np.float32).reshape(3, 4))
    before = out.read_bytes()
    with pytest.raises(ValueError, match="is not an unfinished render"):
        render(poly_field, (5, 5), out=out, progress=False)
    assert out.read_bytes() == before


# ------------------------------------------- a file render never mixes two renders


def three_channels(c: torch.Tensor) -> torch.Tensor:
    """The field of the kill scripts above, as a plain function."""
    return torch.stack([c[:, 0] * 3, c[:, 1] - c[:, 0], (c ** 2).sum(1)], 1)


class Stop(Exception):
    """Stands for a render interrupted mid-way (Ctrl-C, a failing chunk)."""


def stop_after(field, chunks: int):
    """`field`, raising Stop at its call after the probe and `chunks` chunks."""
    calls = []

    def stopping(c):
        calls.append(len(c))
        if len(calls) == chunks + 2:
            raise Stop
        return field(c)

    return stopping


def counting(calls: list):
    return lambda c: (calls.append(len(c)), three_channels(c))[1]


def fresh(shape=(40, 30), field=three_channels) -> np.ndarray:
    return render(field, shape, chunk_size=4096, progress=False).numpy()


def test_render_killed_in_its_first_chunk_resumes_from_the_start(tmp_path):
    out = tmp_path / "first.npy"
    res = subprocess.run([sys.executable, "-c", _render_script(out, kill_after=0)],
                         capture_output=True, text=True)
    assert res.returncode == -9, res.stderr
    calls = []
    render(counting(calls), (40, 30), out=out, chunk_size=97, progress=False)
    assert len(calls) == 1 + 13  # the probe and every chunk: nothing was taken as finished
    np.testing.assert_array_equal(np.load(out), fresh())


def test_an_interrupted_render_keeps_its_finished_chunks(tmp_path):
    out = tmp_path / "stopped.npy"
    with pytest.raises(Stop):  # never synced on a timer: the interruption itself records them
        render(stop_after(three_channels, 4), (40, 30), out=out, chunk_size=97, progress=False)
    calls = []
    render(counting(calls), (40, 30), out=out, chunk_size=97, progress=False)
    assert len(calls) == 1 + 13 - 4
    np.testing.assert_array_equal(np.load(out), fresh())
    assert os.listdir(tmp_path) == ["stopped.npy"]  # no progress or lock file left


def test_an_existing_array_of_the_same_shape_is_refused_not_kept(tmp_path):
    out = tmp_path / "same.npy"
    old = np.random.default_rng(0).standard_normal((6, 7, 4)).astype(np.float32)
    np.save(out, old)
    with pytest.raises(ValueError, match="not an unfinished render.*resume=False"):
        render(poly_field, (6, 7), out=out, progress=False)
    np.testing.assert_array_equal(np.load(out), old)
    render(poly_field, (6, 7), out=out, progress=False, resume=False)  # explicitly: start over
    np.testing.assert_array_equal(np.load(out), render(poly_field, (6, 7), progress=False).numpy())


def test_resuming_another_render_is_refused_saying_what_differs(tmp_path):
    out = tmp_path / "mixed.npy"
    with pytest.raises(Stop):
        render(stop_after(three_channels, 3), (40, 30), out=out, chunk_size=97, progress=False)
    before = out.read_bytes()
    attempts = [
        (dict(field=lambda c: three_channels(c) * 1.5), "field: its values at the probe points differ"),
        (dict(chunk_size=100), "chunk_size: was 97, now 100"),
        (dict(bounds=[(0.0, 1.0), (-1.0, 1.0)]), r"bounds: was \[\[-1.0, 1.0\], \[-1.0, 1.0\]\], now"),
        (dict(pixel_centers=True), "pixel_centers: was False, now True"),
        (dict(dtype=torch.float16), "dtype: was float32, now float16"),
    ]
    for change, what in attempts:
        options = {"chunk_size": 97, **change}
        field = options.pop("field", three_channels)
        with pytest.raises(ValueError, match=what + ".*resume=False"):
            render(field, (40, 30), out=out, progress=False, **options)
    assert out.read_bytes() == before
    render(three_channels, (40, 30), out=out, chunk_size=97, progress=False)  # the same one resumes
    np.testing.assert_array_equal(np.load(out), fresh())


class StopAfter(torch.nn.Module):
    """A module field that raises Stop after the probe and `chunks` chunks."""

    def __init__(self, inner: torch.nn.Module, chunks: int):
        super().__init__()
        self.inner, self.left = inner, chunks + 1

    def forward(self, c):
        if self.left == 0:
            raise Stop
        self.left -= 1
        return self.inner(c)


def test_a_module_with_changed_parameters_is_refused(tmp_path):
    torch.manual_seed(0)
    siren = Siren(2, 16, 1, 3)
    out = tmp_path / "siren.npy"
    with nfd_fast.use_backend("torch"):
        with pytest.raises(Stop):
            render(StopAfter(siren, 2), (40, 30), out=out, chunk_size=97, progress=False)
        with torch.no_grad():  # too small to show at the probe points: only the state tells
            siren.net[-1].weight[0, 0] += 1e-6
        with pytest.raises(ValueError, match="field: its parameters or buffers differ"):
            render(StopAfter(siren, 99), (40, 30), out=out, chunk_size=97, progress=False)


def test_output_names_are_matched_literally_not_as_patterns(tmp_path):
    plain, pattern = tmp_path / "frame1.npy", tmp_path / "frame[1].npy"
    for out, chunks in ((plain, 4), (pattern, 2)):
        with pytest.raises(Stop):
            render(stop_after(three_channels, chunks), (40, 30), out=out, chunk_size=97, progress=False)
    for out, chunks in ((pattern, 2), (plain, 4)):  # each resumes from its own records only
        calls = []
        render(counting(calls), (40, 30), out=out, chunk_size=97, progress=False)
        assert len(calls) == 1 + 13 - chunks, out
        np.testing.assert_array_equal(np.load(out), fresh())
    assert sorted(os.listdir(tmp_path)) == ["frame1.npy", "frame[1].npy"]


def test_a_second_writer_of_the_same_file_is_refused(tmp_path):
    out = tmp_path / "busy.npy"
    calls, errors = [], []

    def field(c):
        calls.append(len(c))
        if len(calls) == 3:  # mid-render, a second render of the same file
            try:
                render(three_channels, (40, 30), out=out, chunk_size=97, progress=False)
            except OSError as exc:
                errors.append(str(exc))
        return three_channels(c)

    render(field, (40, 30), out=out, chunk_size=97, progress=False)
    assert len(errors) == 1 and "another render is writing" in errors[0], errors
    np.testing.assert_array_equal(np.load(out), fresh())
    assert os.listdir(tmp_path) == ["busy.npy"]


@pytest.mark.parametrize("to_file", [False, True])
@pytest.mark.parametrize("extra_rows", [-1, 1])
def test_chunks_with_the_wrong_row_count_are_refused(tmp_path, to_file, extra_rows):
    def field(c):
        v = three_channels(c)
        if len(c) != 97:  # the probe and the last chunk are right
            return v
        return v[:-1] if extra_rows < 0 else torch.cat([v, v[:1]])

    with pytest.raises(ValueError, match=rf"field: returned \[{97 + extra_rows}, 3\] for a chunk of 97 points"):
        render(field, (40, 30), chunk_size=97, progress=False, out=tmp_path / "rows.npy" if to_file else None)


@pytest.mark.parametrize("damage", ["empty", "garbage", "torn header", "bad chunk list"])
def test_damaged_progress_files_give_a_clear_error(tmp_path, damage):
    out = tmp_path / "damaged.npy"
    with pytest.raises(Stop):
        render(stop_after(three_channels, 3), (40, 30), out=out, chunk_size=97, progress=False)
    [record] = [p for p in tmp_path.iterdir() if ".progress-" in p.name]
    text = record.read_bytes()
    record.write_bytes({"empty": b"", "garbage": b"\x00\xffnot json\n", "torn header": text[:20],
                        "bad chunk list": text + b'{"done": "x"}\n'}[damage])
    with pytest.raises(ValueError, match=r"progress record is unreadable .*resume=False"):
        render(three_channels, (40, 30), out=out, chunk_size=97, progress=False)


def test_a_torn_last_progress_line_is_dropped_and_its_chunks_redone(tmp_path):
    out = tmp_path / "torn.npy"
    with pytest.raises(Stop):
        render(stop_after(three_channels, 3), (40, 30), out=out, chunk_size=97, progress=False)
    [record] = [p for p in tmp_path.iterdir() if ".progress-" in p.name]
    with open(record, "ab") as f:
        f.write(b'{"done": [5, 6')  # killed while appending
    render(three_channels, (40, 30), out=out, chunk_size=97, progress=False)
    np.testing.assert_array_equal(np.load(out), fresh())


@pytest.mark.parametrize("name, channels, error, match", [
    ("missing/p.png", 3, PermissionError, "preview: cannot write into"),
    ("p.xyz", 3, ValueError, "preview: unknown image extension '.xyz'"),
    ("p.jpg", 4, ValueError, "preview: JPEG cannot hold a 4-channel"),
    ("p.png", 2, ValueError, "preview: needs 1, 3 or 4 channels"),
])
def test_preview_problems_are_refused_before_any_work(tmp_path, name, channels, error, match):
    pytest.importorskip("PIL.Image")
    calls = []

    def field(c):
        calls.append(len(c))
        return torch.cat([c, c.sum(1, keepdim=True), c.prod(1, keepdim=True)], 1)[:, :channels]

    with pytest.raises(error, match=match):
        render(field, (30, 20), out=tmp_path / "v.npy", preview=tmp_path / name, chunk_size=100,
               progress=False)
    assert len(calls) <= 1 and os.listdir(tmp_path) == []  # the probe alone ran; no file made


@pytest.mark.parametrize("chunk_size, error", [(0, ValueError), (-3, ValueError), (2.7, TypeError),
                                               (True, TypeError)])
def test_chunk_size_must_be_a_positive_whole_number(chunk_size, error):
    with pytest.raises(error, match="chunk_size:"):
        render(three_channels, (5, 6), chunk_size=chunk_size, progress=False)


def test_an_in_memory_result_too_large_for_free_memory_is_refused_up_front():
    calls = []
    with pytest.raises(ValueError, match="out=None: .* free memory .* out='result.npy'"):
        render(counting(calls), (2**20, 2**20), progress=False)
    assert len(calls) <= 1


def test_output_dtypes_that_would_lose_values_are_refused(tmp_path):
    with pytest.raises(ValueError, match="dtype: a .npy file cannot hold bfloat16"):
        render(three_channels, (5, 6), out=tmp_path / "b.npy", dtype=torch.bfloat16, progress=False)
    with pytest.raises(ValueError, match="dtype: the field returns bfloat16"):
        render(lambda c: three_channels(c).bfloat16(), (5, 6), out=tmp_path / "b.npy", progress=False)
    with pytest.raises(ValueError, match="dtype: torch.int32 would truncate"):
        render(three_channels, (5, 6), dtype=torch.int32, progress=False)
    assert os.listdir(tmp_path) == []
    got = render(three_channels, (5, 6), dtype=torch.bfloat16, progress=False)  # a tensor can
    assert got.dtype == torch.bfloat16 and torch.equal(got, torch.from_numpy(fresh((5, 6))).bfloat16())


def test_out_must_name_a_npy_file(tmp_path):
    with pytest.raises(ValueError, match="out: expected a .npy path"):
        render(three_channels, (5, 6), out=tmp_path / "a.png", progress=False)
    (tmp_path / "d.npy").mkdir()
    with pytest.raises(IsADirectoryError, match="out: .* is a directory"):
        render(three_channels, (5, 6), out=tmp_path / "d.npy", progress=False)
    assert sorted(os.listdir(tmp_path)) == ["d.npy"]


def test_chunk_size_one_appends_progress_and_syncs_rarely(tmp_path, monkeypatch):
    """Per chunk: a positional write only; fsyncs (data, then the appended progress) come
    at most every SYNC_INTERVAL_S and at the end."""
    syncs, real_fsync = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (syncs.append(fd), real_fsync(fd))[1])
    start = time.perf_counter()
    render(three_channels, (50, 40), out=tmp_path / "ones.npy", chunk_size=1, progress=False)
    elapsed = time.perf_counter() - start
    intervals = math.ceil(elapsed / render_module.SYNC_INTERVAL_S)
    assert len(syncs) <= 4 + 2 * intervals, (len(syncs), elapsed)  # 2 per chunk would be 4000
    np.testing.assert_array_equal(np.load(tmp_path / "ones.npy"), fresh((50, 40)))
