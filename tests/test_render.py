"""render: grids equal the field on explicitly built coordinates; files are complete and
resumable; ranks split the work; the fused in-kernel-coordinate path agrees; bad input."""
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import nfd_fast
from nfd_fast.nn import FusedMLP, Siren
from nfd_fast.render import GridSpec, render

from conftest import DEVICE, rel_err

REPO = Path(__file__).resolve().parents[1]


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
        import os, signal, torch
        from nfd_fast.render import render
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
    from nfd_fast.ops.fused_mlp import grid_evaluator

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
    import importlib

    render_module = importlib.import_module("nfd_fast.render")  # the package exports a function of that name

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
    with pytest.raises(ValueError, match="field: failed on \\[1, 2\\] coordinates"):
        render(lambda c: c @ torch.ones(3, 3), (4, 4), progress=False)
    with pytest.raises(PermissionError, match="cannot write into"):
        render(poly_field, (4, 4), out=tmp_path / "missing" / "x.npy", progress=False)
    with pytest.raises(ValueError, match="region: .* selects nothing"):
        render(poly_field, (4, 4), region=[slice(5, 9), slice(None)], progress=False)


def test_resume_onto_a_file_of_another_shape_is_refused_and_harmless(tmp_path):
    out = tmp_path / "other.npy"
    np.save(out, np.arange(12, dtype=np.float32).reshape(3, 4))
    before = out.read_bytes()
    with pytest.raises(ValueError, match="refusing to overwrite it"):
        render(poly_field, (5, 5), out=out, progress=False)
    assert out.read_bytes() == before
