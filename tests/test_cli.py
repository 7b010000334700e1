"""The nfd-fast command line: fit an image, render its checkpoint, errors without tracebacks."""
import numpy as np
import pytest
import torch

from nfd_fast.cli import main
from nfd_fast.fields_io import load_field


def test_fit_then_render(tmp_path, capsys):
    Image = pytest.importorskip("PIL.Image")
    y, x = np.mgrid[0:24, 0:32]
    img = np.stack([x * 8, y * 10, (x + y) * 4], -1).clip(0, 255).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "img.png")
    ckpt = tmp_path / "field.pt"
    assert main(["fit", str(tmp_path / "img.png"), "--out", str(ckpt), "--hidden", "32",
                 "--layers", "1", "--steps", "150", "--lr", "1e-3", "--device", "cpu"]) == 0
    assert "PSNR" in capsys.readouterr().out
    model, meta = load_field(ckpt)
    assert meta["image_shape"] == [24, 32] and model.config["hidden_features"] == 32
    assert meta["psnr"] > 25
    out = tmp_path / "big.npy"
    assert main(["render", str(ckpt), "--shape", "48x64", "--out", str(out),
                 "--preview", str(tmp_path / "big.png")]) == 0
    arr = np.load(out)
    assert arr.shape == (48, 64, 3)
    # the 2x render's corners are the fitted image's corners (SIREN grid: endpoints included)
    corners = torch.from_numpy(arr[[0, 0, -1, -1], [0, -1, 0, -1]])
    expected = torch.from_numpy(img[[0, 0, -1, -1], [0, -1, 0, -1]].astype(np.float32) / 127.5 - 1)
    assert (corners - expected).abs().max() < 0.1
    assert (tmp_path / "big.png").exists()


def test_errors_are_reported_without_traceback(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.zeros(3))
    assert main(["render", str(tmp_path / "x.npy"), "--shape", "4x4", "--out",
                 str(tmp_path / "o.npy")]) == 2
    assert "not an nfd_fast field checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["render", "f.pt", "--shape", "4xq", "--out", "o.npy"])


def test_demo_writes_its_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "demo.png"
    assert main(["demo", "--out", str(out), "--signals", "120", "--epochs", "2"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "held-out reconstruction MSE" in capsys.readouterr().out
