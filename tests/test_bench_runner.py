"""The benchmark runner's arithmetic on known cases, and one end-to-end CPU run."""
import json

import pytest

from nfd_fast.benchmarks import runner
from nfd_fast.benchmarks.cases import mlp_flops


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
    report = runner.run(only=["siren_inference"], device="cpu", impls=["eager", "nfd_fast"],
                        command="test", progress=False)
    row = report["rows"][0]
    assert report["quick"] and set(row["impls"]) == {"eager", "nfd_fast"}
    eager, fused = row["impls"]["eager"], row["impls"]["nfd_fast"]
    assert row["speedup_vs"]["eager"] == pytest.approx(eager["median_ms"] / fused["median_ms"])
    assert fused["coords_per_s"] == pytest.approx(2**14 / (fused["median_ms"] / 1e3))
    table = runner.format_table(report)
    assert "siren_inference | nfd_fast |" in table
    runner.write_json(report, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text())["environment"]["command"] == "test"
    with pytest.raises(ValueError, match="unknown benchmark case"):
        runner.run(only=["nope"], device="cpu", progress=False)
