"""The kernel report: compile-as-launched SASS counts on a small kernel checked by hand,
the JSON rows of `nfd-fast kernels`, and its caches."""
import json
import textwrap

import pytest

from nfd_fast import kernel_report
from nfd_fast.cli import main

# y = x * a + b over BLOCK = 512 elements, 4 warps: 4 contiguous floats per thread
TINY = textwrap.dedent('''
    import triton
    import triton.language as tl


    @triton.jit
    def axpb_kernel(x_ptr, y_ptr, n, a, b, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask)
        tl.store(y_ptr + offs, x * a + b, mask=mask)
''')


def _launch(x_aligned: bool, n: int = 4096) -> dict:
    ptr = {"kind": "ptr", "dtype": "float32"}
    return {"module": "tiny_kernels", "kernel": "axpb_kernel",
            "args": [dict(ptr, aligned=x_aligned), dict(ptr, aligned=True), n, 2.0, 0.5],
            "kwargs": {"BLOCK": 512, "num_warps": 4}, "grid": [n // 512, 1, 1]}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny kernel importable by the compiling process, and a private cache."""
    root = tmp_path_factory.mktemp("tiny")
    (root / "tiny_kernels.py").write_text(TINY)
    mp = pytest.MonkeyPatch()
    mp.setenv("PYTHONPATH", str(root))
    mp.setenv("NFD_FAST_CACHE", str(root / "cache"))
    mp.setenv("TRITON_INTERPRET", "1")  # as in CI: compiles go to a process without it
    yield root
    mp.undo()


def test_counts_match_the_hand_read_sass(tiny):
    """The SASS of the aligned launch, read by hand (cuobjdump -sass, sm_90a), is 26
    instructions: @!P0 LDG.E.128, 4 x FFMA (x * a + b on 4 floats), STG.E.128, and no
    loop. With x one element off the 16-byte grid, as a view would be, the binder leaves
    the pointer without tt.divisibility and the load splits into 4 scalar LDG.E."""
    aligned, unaligned = kernel_report.analyse_launches([_launch(True), _launch(False)])
    assert aligned["static"] == {"total": 26, "LDG.128": 1, "FFMA": 4, "STG.128": 1}
    assert unaligned["static"]["LDG.32"] == 4 and "LDG.128" not in unaligned["static"]
    assert unaligned["static"]["STG.128"] == 1  # y stays aligned
    for k in (aligned, unaligned):
        assert k["name"] == "axpb_kernel" and k["num_warps"] == 4
        assert k["stack_bytes"] == 0 and k["spill_instructions"] == 0 and k["hot_loop"] is None
        assert k["dynamic_per_warp"]["total"] == k["static"]["total"]  # straight-line code


def test_reports_are_cached_by_specialisation(tiny):
    """n = 4100 is not a multiple of 16: a new specialisation, compiled once; n = 8192
    specialises as 4096 did (divisible by 16) and is served from the cache."""
    stats = {}
    first = kernel_report.analyse_launches([_launch(True, n=4100)], stats)
    again = kernel_report.analyse_launches([_launch(True, n=4100), _launch(True, n=8192)], stats)
    assert stats == {"compiles": 1, "hits": 2}
    assert first[0] == again[0]


def test_json_rows_of_the_cli(tmp_path, monkeypatch, capsys):
    """`nfd-fast kernels --only CASE --json PATH`: a row per implementation with case,
    impl, modelled_ms and bound; the second run is served from the caches."""
    monkeypatch.setenv("NFD_FAST_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "rows.json"
    assert main(["kernels", "--only", "ddim_step_2^26", "--json", str(path)]) == 0
    rep = json.loads(path.read_text())
    rows = {r["impl"]: r for r in rep["rows"]}
    assert set(rows) == {"nfd_fast", "eager", "compiled"}
    for r in rows.values():
        assert r["case"] == "ddim_step_2^26" and r["modelled_ms"] > 0 and r["bound"]
        assert "modelled" in r["label"]
    # a 2^26-element float32 step moves at least its output: 256 MiB at 3 TB/s
    assert rows["eager"]["modelled_ms"] > 2**28 / 3.0e12 * 1e3
    launch = rows["nfd_fast"]["launches"][0]
    assert launch["kernel"] in {k["name"] for k in rep["kernels"]}
    assert launch["ctas"] >= 2**26 // 4096  # every element is covered at the canonical size
    assert "modelled" in capsys.readouterr().out
    again = kernel_report.report(cases=["ddim_step_2^26"])
    assert again["stats"].get("compiles", 0) == 0  # (a source edit in between recaptures)
    assert [r["modelled_ms"] for r in again["rows"]] == [r["modelled_ms"] for r in rep["rows"]]


def test_unknown_case_is_refused():
    with pytest.raises(ValueError, match="cases"):
        kernel_report.report(cases=["no_such_case"])
