"""The benchmark runner's arithmetic on known cases, and one end-to-end CPU run."""
import json

import pytest
import torch

from nfd_fast.benchmarks import report, runner
from nfd_fast.benchmarks.cases import mlp_flops
from nfd_fast.models import APPROACHES, approach_module


def test_mlp_flops_of_the_siren_case():
    # 2 -> 256 x 3 hidden -> 3: 2*256 + 3*256*256 + 256*3 multiply-adds per coordinate
    assert mlp_flops((2, 256, 256, 256, 256, 3), 10) == 2 * 10 * (512 + 3 * 65536 + 768)


def test_speedups_and_roofline_fraction():
    assert runner.speedups({"eager": 10.0, "compiled": 4.0, "nfd_fast": 2.0}) == {
        "eager": 5.0, "compiled": 2.0}
    assert runner.speedups({"eager": 1.0}) == {}
    work = runner.Work(flops=2e12, bytes=1e9, coords=1)
    ceilings = {"bf16_matmul_tflops": 1000.0, "copy_gbps": 2000.0}
    # floors: 2e12 / 1e15 = 2 ms of compute, 1e9 / 2e12 = 0.5 ms of memory -> 2 ms
    assert runner.roofline_fraction(work, 4.0, ceilings) == pytest.approx(0.5)
    assert runner.roofline_fraction(work, 4.0, {}) is None


def test_cpu_run_end_to_end(tmp_path):
    rep = runner.run(only=["siren_inference"], device="cpu", impls=["eager", "nfd_fast"],
                     command="test", progress=False)
    row = rep["rows"][0]
    assert rep["quick"] and set(row["impls"]) == {"eager", "nfd_fast"}
    eager, fused = row["impls"]["eager"], row["impls"]["nfd_fast"]
    assert row["speedup_vs"]["eager"] == pytest.approx(eager["median_ms"] / fused["median_ms"])
    assert fused["coords_per_s"] == pytest.approx(2**14 / (fused["median_ms"] / 1e3))
    table = report.format_table(rep)
    assert "siren_inference | nfd_fast |" in table
    # targets are GPU targets: a CPU run records them unjudged, saying why
    assert row["targets"] and all(t["met"] is None for t in row["targets"])
    assert "not judged: judged only on a GPU" in report.format_targets(rep)
    runner.write_json(rep, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text())["environment"]["command"] == "test"
    with pytest.raises(ValueError, match="unknown benchmark case"):
        runner.run(only=["nope"], device="cpu", progress=False)


def _synthetic_report():
    """A GPU-like report with known numbers."""
    def impl(ms, roof=None):
        return {"median_ms": ms, "q20_ms": ms * 0.9, "q80_ms": ms * 1.1, "peak_mem_mb": 100.0,
                "compile_s": 1.0, "coords_per_s": 1e6 / ms, "tflops": 1.0 / ms,
                "roofline_fraction": roof}
    row = {"case": "siren_inference", "description": "", "work": {},
           "impls": {"eager": impl(20.0), "compiled": impl(8.0), "nfd_fast": impl(4.0, 0.2),
                     "nfd_fast[bf16]": impl(1.0, 0.6)}, "skipped": {}}
    return {"environment": {"device": "NVIDIA H100", "torch": "2.11", "triton": "3.6",
                            "python": "3.12", "date": "2026-11-22T00:00:00+00:00",
                            "command": "nfd-fast bench"},
            "quick": False, "ceilings": {"bf16_matmul_tflops": 700.0, "copy_gbps": 3000.0},
            "rows": [row]}


def test_targets_are_judged_on_the_fastest_variant():
    rep = _synthetic_report()
    row = rep["rows"][0]
    t = runner.Target
    verdicts = [runner.judge_target(x, row, True) for x in (
        t("nfd_fast*", "speedup", 10.0, "eager"), t("nfd_fast*", "speedup", 10.0, "compiled"),
        t("nfd_fast[bf16]", "roofline", 0.5), t("nfd_fast", "roofline", 0.5),
        t("nfd_fast", "speedup", 2.0, "absent"))]
    assert [v["met"] for v in verdicts[:4]] == [True, False, True, False]
    assert verdicts[0]["impl"] == "nfd_fast[bf16]" and verdicts[0]["value"] == pytest.approx(20.0)
    assert verdicts[1]["value"] == pytest.approx(8.0)
    assert verdicts[4]["met"] is None and verdicts[4]["why"] == "not measured in this run"
    row["targets"] = verdicts[:2]
    md = report.format_markdown(rep)
    assert "| siren_inference | nfd_fast* >= 10x eager |  | 20.00x (nfd_fast[bf16]) | met |" in md
    assert "MISSED" in md and "bf16 matmul 700 TFLOP/s" in md
    assert "| siren_inference | nfd_fast[bf16] | 1.000 | 0.900-1.100 | 1.00 |" in md


def test_png_and_readme_from_results(tmp_path):
    pytest.importorskip("matplotlib")  # the test extra installs it; the offline GPU box may not
    rep = _synthetic_report()
    report.plot_speedups(rep, tmp_path / "s.png")
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = tmp_path / "results"
    results.mkdir()
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{report.README_BEGIN}\nold\n{report.README_END}\ntail\n")
    report.update_readme(str(readme), str(results))
    assert "No GPU measurements are committed yet" in readme.read_text()
    runner.write_json(rep, results / "h100-2026-11-22.json")
    older = dict(rep, environment=dict(rep["environment"], date="2025-01-01T00:00:00+00:00",
                                       device="OLD GPU"))
    runner.write_json(older, results / "old.json")
    report.update_readme(str(readme), str(results))
    text = readme.read_text()
    assert "Measured, from `results/h100-2026-11-22.json`" in text and "OLD GPU" not in text
    assert text.endswith(f"{report.README_END}\ntail\n") and "old\n" not in text


def test_a_failing_implementation_is_recorded_not_fatal():
    def build(device, quick):
        def broken():
            raise RuntimeError("boom")

        return runner.Work(1.0, 1.0, 1), {"eager": lambda: None, "nfd_fast": broken}

    row = runner.run_case(runner.Case("t", "", build), "cpu", True, {})
    assert set(row["impls"]) == {"eager"}
    assert row["skipped"]["nfd_fast"] == "failed: RuntimeError: boom"
    assert "skipped: failed: RuntimeError: boom" in report.format_table({"rows": [row]})


MODEL_CASES = [f"{module}_{call}" for module in APPROACHES.values() for call in ("train_step", "sampling")]


def test_every_model_has_a_train_step_and_a_sampling_case():
    assert set(MODEL_CASES) <= set(runner.CASES)
    for name in MODEL_CASES:
        assert runner.CASES[name].impls == ("eager", "nfd_fast")


@pytest.mark.parametrize("approach", list(APPROACHES), ids=str)
def test_model_benchmark_calls_train_and_sample(approach):
    torch.manual_seed(1)
    calls = approach_module(approach).benchmark_calls("cpu", quick=True)
    assert set(calls) == {"train_step", "sampling", "points", "describe"} and calls["describe"]
    params = [p for group in calls["train_step"].optimizer.param_groups for p in group["params"]]
    before = [p.detach().clone() for p in params]
    assert calls["train_step"]() is None and calls["train_step"]() is None
    # two optimizer steps (zero-initialised output layers pass no gradient back on the first)
    # moved (nearly) every parameter, to finite values
    moved = [not torch.equal(b, p) for b, p in zip(before, params)]
    assert sum(moved) >= 0.9 * len(params) and all(torch.isfinite(p).all() for p in params)
    assert all(torch.isfinite(p.grad).all() for p in params if p.grad is not None)
    out = calls["sampling"]()
    points = calls["points"]["sampling"]
    assert torch.isfinite(out).all() and out.numel() % points == 0 and 1 <= out.numel() // points <= 3
    assert calls["points"]["train_step"] > 0


def test_model_cases_run_end_to_end_on_cpu():
    rep = runner.run(only=MODEL_CASES, device="cpu", command="test", progress=False)
    for row in rep["rows"]:
        assert set(row["impls"]) == {"eager", "nfd_fast"}, (row["case"], row["skipped"])
        assert "sizes known once built" not in row["description"]
        assert row["work"]["coords"] > 0
