"""The kernel report: compile-as-launched SASS counts on a small kernel checked by hand,
the JSON rows of `nfd-fast kernels`, and its caches."""
import json
import textwrap

import pytest

from nfd_fast import kernel_report
from nfd_fast.cli import main

# BLOCK = 512 elements, 4 warps: 4 contiguous floats per thread
TINY = textwrap.dedent('''
    import triton
    import triton.language as tl


    @triton.jit
    def axpb_kernel(x_ptr, y_ptr, n, a, b, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask)
        tl.store(y_ptr + offs, x * a + b, mask=mask)


    @triton.jit
    def rowsum_kernel(x_ptr, y_ptr, n, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        acc = tl.zeros((BLOCK,), tl.float32)
        for r in range(0, ROWS):
            acc += tl.load(x_ptr + r * n + offs)
        tl.store(y_ptr + offs, acc)
''')


def _launch(x_aligned: bool, n: int = 4096) -> dict:
    ptr = {"kind": "ptr", "dtype": "float32"}
    return {"module": "tiny_kernels", "kernel": "axpb_kernel",
            "args": [dict(ptr, aligned=x_aligned), dict(ptr, aligned=True), n, 2.0, 0.5],
            "kwargs": {"BLOCK": 512, "num_warps": 4}, "grid": [n // 512, 1, 1]}


def _rowsum_launch() -> dict:
    launch = _launch(True)
    launch.update(kernel="rowsum_kernel", args=launch["args"][:3],
                  kwargs={"ROWS": 1024, "BLOCK": 512, "num_warps": 4})
    return launch


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny kernels importable by the compiling process, a private cache, and the
    reports of three launches compiled in one process: (stats, reports)."""
    root = tmp_path_factory.mktemp("tiny")
    (root / "tiny_kernels.py").write_text(TINY)
    mp = pytest.MonkeyPatch()
    mp.setenv("PYTHONPATH", str(root))
    mp.setenv("NFD_FAST_CACHE", str(root / "cache"))
    mp.setenv("TRITON_INTERPRET", "1")  # as in CI: compiles go to a process without it
    stats = {}
    yield stats, kernel_report.analyse_launches([_launch(True), _launch(False), _rowsum_launch()], stats)
    mp.undo()


def test_counts_match_the_hand_read_sass(tiny):
    """The SASS of the aligned launch, read by hand (cuobjdump -sass, sm_90a), is 26
    instructions: @!P0 LDG.E.128, 4 x FFMA (x * a + b on 4 floats), STG.E.128, and no
    loop. With x one element off the 16-byte grid, as a view would be, the binder leaves
    the pointer without tt.divisibility and the load splits into 4 scalar LDG.E."""
    aligned, unaligned, _ = tiny[1]
    assert aligned["static"] == {"total": 26, "LDG.128": 1, "FFMA": 4, "STG.128": 1}
    assert unaligned["static"]["LDG.32"] == 4 and "LDG.128" not in unaligned["static"]
    assert unaligned["static"]["STG.128"] == 1  # y stays aligned
    for k in (aligned, unaligned):
        assert k["name"] == "axpb_kernel" and k["num_warps"] == 4
        assert k["stack_bytes"] == 0 and k["spill_instructions"] == 0 and k["hot_loop"] is None
        assert k["dynamic_per_warp"]["total"] == k["static"]["total"]  # straight-line code


def test_loop_trips_match_the_hand_read_sass(tiny):
    """ROWS = 1024: the TTGIR loop runs 1024 times; the PTX loop holds 1 ld.global.v4.
    ptxas peels row 0 (one LDG.E.128 before the loop) and unrolls the rest 33 times: the
    SASS loop holds 33 LDG.E.128 and counts a uniform register down from 0x3ff by 0x21,
    31 iterations. So 1 + 31 x 33 = 1024 loads per thread, as in the source."""
    k = tiny[1][2]
    assert k["hot_loop"]["trips_per_cta"] == 31
    assert k["hot_loop"]["per_iteration"]["LDG.128"] == 33
    assert k["static"]["LDG.128"] == 34 and k["static"]["STG.128"] == 1
    assert k["dynamic_per_warp"]["LDG.128"] == 1024
    assert k["trip_counts_known"]


def test_reports_are_cached_by_specialisation(tiny):
    """n = 8192 specialises as n = 4096 did (both divisible by 16): served from the cache;
    n = 4100 is a new specialisation and compiles."""
    first_stats, (aligned, _, _) = tiny
    assert first_stats == {"compiles": 3}
    stats = {}
    again = kernel_report.analyse_launches([_launch(True, n=8192), _launch(True, n=4100)], stats)
    assert stats == {"compiles": 1, "hits": 1}
    assert again[0] == aligned


def test_json_rows_of_the_cli(tmp_path, monkeypatch, capsys):
    """`nfd-fast kernels --only CASE --json PATH`: a row per implementation with case,
    impl, modelled_ms and bound; the second run is served from the caches."""
    monkeypatch.delenv("NFD_FAST_CACHE", raising=False)  # shared with test_sm90_compile
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
    if not again["stats"].get("captured"):  # (an edit of nfd_fast in between recaptures)
        done = {k: v for k, v in again["stats"].items() if v}
        assert done == {"hits": 1}  # nothing captured or compiled again
        assert [r["modelled_ms"] for r in again["rows"]] == [r["modelled_ms"] for r in rep["rows"]]


def test_unknown_case_is_refused():
    with pytest.raises(ValueError, match="cases"):
        kernel_report.report(cases=["no_such_case"])


def test_occupancy_and_launch_terms():
    """255 registers x 8 warps fill an SM's 65,536 registers: one CTA per SM; 43 registers
    round to 1,536 per warp: 10 CTAs of 4 warps. A launch's issue time is its busiest SM's
    warps times their instructions over 4 schedulers."""
    from nfd_fast.kernel_report import model

    big = {"num_warps": 8, "registers": 255, "shared_bytes": 69632}
    assert model.occupancy(big) == {"ctas_per_sm": 1, "warps_per_sm": 8, "limit": "registers"}
    small = {"num_warps": 4, "registers": 43, "shared_bytes": 0}
    assert model.occupancy(small)["ctas_per_sm"] == 10
    kernel = {"num_warps": 4, "dynamic_per_warp": {"total": 1000, "MUFU": 10,
                                                   "tensor_flops_bf16": 2.0e6}}
    terms = model.launch_terms(kernel, ctas=133, dram_bytes=3.0e9, l2_bytes=0.0)
    assert terms["issue"] == pytest.approx(2 * 4 * 1000 / (4 * model.CLOCK))  # 2 CTAs on one SM
    assert terms["mufu"] == pytest.approx(2 * 4 * 10 * 32 / (16 * model.CLOCK))
    assert terms["tensor"] == pytest.approx(2 * 4 * 2.0e6 * model.SMS / model.BF16_DENSE)
    assert terms["hbm"] == pytest.approx(1e-3) and terms["l2"] == 0.0
    assert model.fit(256, 10.0, 512, 18.0, 1024) == pytest.approx(34.0)


def test_compiled_floor_fuses_pointwise_chains():
    """a (external, 100 B) -> mul -> t -> add -> out (returned): fused, a is read once
    and out written once; t never reaches memory. A matmul reading t keeps t."""
    from nfd_fast.kernel_report import model

    def call(pointwise, inputs, outputs):
        return {"pointwise": pointwise, "inputs": inputs, "outputs": outputs}

    chain = [call(True, [(1, 100)], [(2, 100)]), call(True, [(2, 100)], [(3, 100)])]
    assert model.fused_bytes(chain) == 200
    kept = chain + [call(False, [(2, 100)], [(4, 50)])]
    assert model.fused_bytes(kept) == 300


def test_capture_records_the_copies_of_ops_that_may_alias():
    """Below autograd (inside nfd_fast's ops) the capture sees contiguous / reshape whole:
    a copy they make is glue (read + write), a view they return moves nothing."""
    import importlib

    import torch

    capture = importlib.import_module("nfd_fast.kernel_report.capture")
    rec = capture.Recorder()
    x = torch.randn(4, 6)
    with torch._C._AutoDispatchBelowAutograd(), capture.trace_mode(rec):
        x.contiguous(), x.reshape(24)  # views
        x.t().contiguous(), x.t().reshape(24)  # copies of 96 bytes
    assert [(e["op"], e["bytes"]) for e in rec.events] == [("contiguous", 192), ("reshape", 192)]


def test_a_reused_address_is_a_new_value_for_the_compiled_floor():
    """A pointwise result at an address that a matmul then overwrites (the allocator
    reusing a freed buffer): the pointwise read of the matmul's result is a read from
    outside the chains, whatever address it has. (Before: the identity was the address, so
    the compiled floor depended on where the allocator put things.)"""
    import importlib

    import torch

    capture = importlib.import_module("nfd_fast.kernel_report.capture")
    from nfd_fast.kernel_report import model

    aten = torch.ops.aten
    rec = capture.Recorder()
    x, w, buf, y = torch.randn(8), torch.randn(8, 8), torch.empty(8), torch.empty(8)
    rec.aten(aten.mul.Tensor, (x, 2.0), {}, buf)          # pointwise -> buf (never read)
    rec.aten(aten.mv.default, (w, x), {}, buf)            # matmul overwrites buf
    rec.aten(aten.add.Tensor, (buf, x), {}, y)            # pointwise reads the matmul's buf
    # read x and the matmul's buf; write mul's unused result and y: 4 x 32 bytes
    assert model.fused_bytes(rec.events) == 128
