"""Modelled results beside measured ones: `nfd-fast kernels` JSON is never mistaken for a
GPU measurement, the README shows it labelled, and a CPU bench shows no self-speed-ups."""
import json

from nfd_fast.benchmarks import report

MODELLED = {"label": "modelled H100 (sm_90a), not measured",
            "environment": {"date": "2026-11-23T16:00:00+00:00", "target": "sm_90a",
                            "triton": "3.9.0", "sources_digest": "abc"},
            "rows": [{"case": "ddim_step", "impl": "eager", "modelled_ms": 2.0, "bound": "hbm"},
                     {"case": "ddim_step", "impl": "nfd_fast", "modelled_ms": 0.5,
                      "bound": "issue (diffusion_step_kernel)"}],
            "errors": {"x/eager": "NotImplementedError: no"}}


def test_modelled_json_is_not_a_measurement_and_is_shown_labelled(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "modelled-h100.json").write_text(json.dumps(MODELLED))
    assert report.newest_result(str(results)) is None
    assert report.newest_result(str(results), modelled=True).endswith("modelled-h100.json")
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{report.README_BEGIN}\nold\n{report.README_END}\n")
    report.update_readme(str(readme), str(results))
    text = readme.read_text()
    assert "No GPU measurements are committed yet" in text
    assert "Modelled, not measured" in text
    assert "| ddim_step | nfd_fast | 0.500 | 4.00x | issue (diffusion_step_kernel) |" in text
    assert "not modelled: NotImplementedError: no" in text


def test_cpu_table_leaves_out_speedup_columns():
    row = {"case": "c", "impls": {n: {"median_ms": ms, "q20_ms": ms, "q80_ms": ms, "coords_per_s": 1e6,
                                      "tflops": 0.0, "roofline_fraction": None, "peak_mem_mb": None}
                                  for n, ms in (("eager", 2.0), ("nfd_fast", 1.0))},
           "skipped": {"nfd_fast[bf16]": "needs a GPU"}}
    with_ratios = report.format_table({"rows": [row]})
    without = report.format_table({"rows": [row]}, speedups=False)
    assert "vs eager" in with_ratios and "2.00x" in with_ratios
    assert "vs eager" not in without and "x |" not in without
    assert all(line.count("|") == without.splitlines()[0].count("|") for line in without.splitlines())
