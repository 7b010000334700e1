"""Every script in examples/ runs in its --small form and gives the result it promises."""
import re
import runpy
from pathlib import Path

import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, argv: list, capsys) -> str:
    """The script's main(argv), as `python examples/<name>.py ARGV` runs it; its stdout."""
    main = runpy.run_path(str(EXAMPLES / f"{name}.py"), run_name=f"example_{name}")["main"]
    main([str(a) for a in argv])
    return capsys.readouterr().out


def number(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    assert match, text
    return float(match.group(1))


def test_every_example_is_tested():
    tested = {"fit_and_render_gigapixel", "evaluate_huge_grid", "accelerate_existing_model",
              "approach1_latent_field", "sample_ddim", "ddmi_generate", "approach7_adaptive_sampling"}
    assert {p.stem for p in EXAMPLES.glob("*.py")} == tested


def test_fit_and_render_gigapixel(tmp_path, capsys):
    pytest.importorskip("PIL.Image")
    text = run_example("fit_and_render_gigapixel", ["--small", "--out-dir", tmp_path], capsys)
    image = np.load(tmp_path / "render_256.npy")
    assert image.shape == (256, 256, 3) and image.dtype == np.float16 and np.isfinite(image).all()
    assert (tmp_path / "render_256.png").exists()
    assert number(r"PSNR ([\d.]+) dB", text) > 12  # a 60-step fit of a 32x32 pattern: rough but real


def test_evaluate_huge_grid(tmp_path, capsys):
    text = run_example("evaluate_huge_grid", ["--small", "--out-dir", tmp_path], capsys)
    volume = np.load(tmp_path / "spacetime.npy")
    assert volume.shape == (24, 24, 24, 4, 3) and np.isfinite(volume).all() and volume.std() > 0
    assert "crop of the 10^6 x 10^6 plane: [64, 64, 1, 1, 3]" in text


def test_accelerate_existing_model(capsys):
    text = run_example("accelerate_existing_model", ["--small"], capsys)  # asserts equal numbers itself
    assert text.count("fused") >= 2
    for name in ("SIREN", "K-Planes"):
        assert number(rf"{name}: relative difference .* output ([\d.e+-]+)", text) < 1e-4


def test_approach1_latent_field(capsys):
    pytest.importorskip("nfd_fast.models.latent_field")
    text = run_example("approach1_latent_field", ["--small"], capsys)
    assert number(r"reconstruction MSE from 20% of the samples: ([\d.]+)", text) < 1.0
    assert "[3, 64]" in text and "[3, 1024]" in text
    assert number(r"end points agree to ([\d.e+-]+)", text) < 1e-5


def test_approach7_adaptive_sampling(capsys):
    text = run_example("approach7_adaptive_sampling", ["--small"], capsys)
    for name in ("adaptive", "evenly spaced", "random"):
        assert re.search(rf"{name}: field MSE by query count 3:[\d.]+ 5:", text), text
    adaptive = int(number(r"to reach MSE 0.002: adaptive (\d+) queries", text))
    evenly = re.search(r"evenly spaced (more than )?(\d+), random", text)
    assert evenly, text
    # the same error with strictly fewer queries than evenly spaced ones
    assert evenly.group(1) or adaptive < int(evenly.group(2)), text


def test_sample_ddim(capsys):
    text = run_example("sample_ddim", ["--small"], capsys)
    samples = number(r"samples lie ([\d.]+) from the rings", text)
    noise = number(r"Gaussian noise: ([\d.]+)", text)
    assert samples < 0.75 * noise, text  # brief training already pulls samples to the rings


def test_ddmi_generate(tmp_path, capsys):
    text = run_example("ddmi_generate", ["--small", "--out-dir", tmp_path], capsys)
    assert number(r"reconstruction PSNR at 16\^2: ([\d.]+) dB", text) > 5
    small, large = np.load(tmp_path / "ddmi_samples_16.npy"), np.load(tmp_path / "ddmi_samples_64.npy")
    assert small.shape == (4, 3, 16, 16) and large.shape == (4, 3, 64, 64)
    assert np.isfinite(large).all() and large.std() > 0
