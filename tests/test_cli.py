"""The nfd-fast command line: fit an image, render its checkpoint, resume a fit; every user
error is one line on stderr with exit status 2, found before any work; nothing is
overwritten without --overwrite."""
import re

import numpy as np
import pytest
import torch

import nfd_fast
from nfd_fast.cli import main
from nfd_fast.fields_io import CHECKPOINT_FORMAT, load_field, load_image
from nfd_fast.nn import Siren

Image = pytest.importorskip("PIL.Image")  # installed by setup.py; absent on the offline GPU box


def gradient_image(path, h=24, w=32):
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 8, y * 10, (x + y) * 4], -1).clip(0, 255).astype(np.uint8)
    Image.fromarray(img).save(path)
    return img


def fails(capsys, argv, match: str) -> str:
    """Runs the CLI, expecting a user error: status 2 and one line naming the problem."""
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert re.search(match, err), err
    return err


def test_fit_then_render(tmp_path, capsys):
    img = gradient_image(tmp_path / "img.png")
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
    fails(capsys, ["render", tmp_path / "x.npy", "--shape", "4x4", "--out", tmp_path / "o.npy"],
          "not an nfd_fast field checkpoint")
    with pytest.raises(SystemExit):
        main(["render", "f.pt", "--shape", "4xq", "--out", "o.npy"])


def test_help_shows_defaults_and_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"nfd-fast {nfd_fast.__version__}"
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("--steps STEPS Adam steps in all (a resumed fit counts on) (default: 500)",
                  "(default: 16384)", "(default: 0.0001)", "(default: 100)"):
        assert shown in text, text


# ------------------------------------------------------------------------------ fit


def test_fit_checks_arguments_and_output_before_fitting(tmp_path, capsys, monkeypatch):
    gradient_image(tmp_path / "img.png")

    def no_fitting(*args, **kwargs):
        raise AssertionError("fitting started")

    monkeypatch.setattr(torch.optim, "Adam", no_fitting)
    (tmp_path / "dir.pt").mkdir()
    (tmp_path / "old.pt").write_bytes(b"keep me")
    (tmp_path / "notes.png").write_text("not an image")
    fit = ["fit", tmp_path / "img.png", "--out"]
    fails(capsys, fit + [tmp_path / "dir.pt"], "--out: .* is a directory")
    fails(capsys, fit + [tmp_path / "missing" / "f.pt"], "--out: the directory .* does not exist")
    fails(capsys, fit + [tmp_path / "old.pt"], "--out: .* exists; pass --overwrite")
    fails(capsys, fit + [tmp_path / "f.pt", "--steps", "0"], "steps: expected a whole number >= 1")
    fails(capsys, fit + [tmp_path / "f.pt", "--lr", "nan"], "lr: expected a positive finite")
    fails(capsys, fit + [tmp_path / "f.pt", "--batch-points", "0"], "batch_points: expected")
    fails(capsys, fit + [tmp_path / "f.pt", "--hidden", "0"], "hidden: expected")
    fails(capsys, fit + [tmp_path / "f.pt", "--resume"], "--resume: .* does not exist")
    fails(capsys, ["fit", tmp_path / "notes.png", "--out", tmp_path / "f.pt"],
          "image: .*notes.png is not an image")
    fails(capsys, ["fit", tmp_path / "nope.png", "--out", tmp_path / "f.pt"], "image: .* does not exist")
    assert (tmp_path / "old.pt").read_bytes() == b"keep me" and not (tmp_path / "f.pt").exists()


def test_images_load_at_their_real_range(tmp_path):
    rng = np.random.default_rng(0)
    grey16 = rng.integers(0, 65536, (13, 17), dtype=np.uint16)
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    got = load_image(tmp_path / "g16.png")
    assert got.shape == (13, 17, 1)
    np.testing.assert_allclose(got[..., 0].numpy(), grey16 / 65535.0 * 2 - 1, atol=1e-6)
    grey8 = rng.integers(0, 256, (13, 17), dtype=np.uint8)
    Image.fromarray(grey8).save(tmp_path / "g8.png")
    np.testing.assert_allclose(load_image(tmp_path / "g8.png")[..., 0].numpy(), grey8 / 255 * 2 - 1, atol=1e-6)
    floats = rng.random((13, 17), dtype=np.float32)
    Image.fromarray(floats, mode="F").save(tmp_path / "f.tiff")
    np.testing.assert_allclose(load_image(tmp_path / "f.tiff")[..., 0].numpy(), floats * 2 - 1, atol=1e-6)


def test_fit_resumes_exactly_from_a_periodic_checkpoint(tmp_path, capsys, monkeypatch):
    """Random-pixel batches, seeded: 6 steps straight equal 6 steps interrupted at step 5
    (the checkpoint of step 3 kept) and resumed."""
    gradient_image(tmp_path / "img.png")
    base = ["fit", tmp_path / "img.png", "--hidden", "16", "--layers", "1", "--lr", "1e-3",
            "--batch-points", "50", "--steps", "6", "--checkpoint-every", "3", "--out"]
    assert main([str(a) for a in base + [tmp_path / "straight.pt"]]) == 0
    assert main([str(a) for a in base + [tmp_path / "seed1.pt", "--seed", "1"]]) == 0
    from nfd_fast.fields_io import ImageFit

    one_step = ImageFit._one_step

    def interrupted(self):
        if self.step == 4:
            raise KeyboardInterrupt
        return one_step(self)

    monkeypatch.setattr(ImageFit, "_one_step", interrupted)
    assert main([str(a) for a in base + [tmp_path / "resumed.pt"]]) == 130
    assert "--resume" in capsys.readouterr().err
    assert torch.load(tmp_path / "resumed.pt", weights_only=True)["fit"]["step"] == 3
    monkeypatch.setattr(ImageFit, "_one_step", one_step)
    assert main([str(a) for a in base + [tmp_path / "resumed.pt", "--resume"]]) == 0
    capsys.readouterr()
    straight, _ = load_field(tmp_path / "straight.pt")
    resumed, _ = load_field(tmp_path / "resumed.pt")
    other_seed, _ = load_field(tmp_path / "seed1.pt")
    for (name, a), b, c in zip(straight.state_dict().items(), resumed.state_dict().values(),
                               other_seed.state_dict().values()):
        assert torch.equal(a, b), name
    assert not all(torch.equal(a, c) for a, c in zip(straight.state_dict().values(),
                                                     other_seed.state_dict().values()))
    fails(capsys, base + [tmp_path / "resumed.pt", "--resume", "--hidden", "32"],
          "--hidden 32: the checkpoint being resumed has 16")


# -------------------------------------------------------------------------- checkpoints


def checkpoint(path, config=None, state_dict=None, **extra):
    siren = Siren(2, 8, 1, 3)
    torch.save({"format": CHECKPOINT_FORMAT, "class": "Siren",
                "config": siren.config if config is None else config,
                "state_dict": siren.state_dict() if state_dict is None else state_dict, **extra}, path)
    return path


def test_damaged_or_hostile_checkpoints_are_one_line_errors(tmp_path, capsys):
    siren = Siren(2, 8, 1, 3)
    cases = {
        "no config": ({"format": CHECKPOINT_FORMAT, "state_dict": siren.state_dict()}, "has no config"),
        "unknown key": ({**siren.config, "colour": "red"}, r"config has keys a Siren does not take: \['colour'\]"),
        "mismatch": (dict(siren.config, hidden_features=9), r"state_dict does not match its config: .*\[9, 2\]"),
        "absurd": (dict(siren.config, hidden_features=2**20), "state_dict does not match its config"),
    }
    for name, (content, match) in cases.items():
        path = tmp_path / f"{name.replace(' ', '_')}.pt"
        if "format" in content:
            torch.save(content, path)
        else:
            checkpoint(path, config=content)
        fails(capsys, ["render", path, "--shape", "4x4", "--out", tmp_path / "o.npy"], match)
    assert not (tmp_path / "o.npy").exists()


def test_cuda_without_a_gpu_is_named_as_such(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    gradient_image(tmp_path / "img.png")
    ckpt = checkpoint(tmp_path / "f.pt", image_shape=[4, 4])
    no_gpu = "device: cuda asked for, but torch sees no CUDA GPU"
    fails(capsys, ["render", ckpt, "--out", tmp_path / "o.npy", "--device", "cuda"], no_gpu)
    fails(capsys, ["fit", tmp_path / "img.png", "--out", tmp_path / "g.pt", "--device", "cuda"], no_gpu)
    fails(capsys, ["demo", "--out", tmp_path / "d.png", "--device", "cuda"], no_gpu)
    fails(capsys, ["bench", "--quick", "--device", "cuda"], no_gpu)


# ------------------------------------------------------------------------------ render


def test_render_refuses_image_and_directory_outputs(tmp_path, capsys):
    ckpt = checkpoint(tmp_path / "f.pt", image_shape=[6, 5])
    fails(capsys, ["render", ckpt, "--out", tmp_path / "a.png"], r"--out: expected a \.npy path")
    (tmp_path / "d.npy").mkdir()
    fails(capsys, ["render", ckpt, "--out", tmp_path / "d.npy"], "--out: .* is a directory")
    fails(capsys, ["render", ckpt, "--out", tmp_path / "o.npy", "--chunk-size", "0"], "chunk_size")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.npy", "f.pt"]


def test_render_never_overwrites_without_overwrite(tmp_path, capsys):
    ckpt = checkpoint(tmp_path / "f.pt", image_shape=[6, 5])
    out, preview = tmp_path / "o.npy", tmp_path / "o.png"
    other = np.random.default_rng(0).standard_normal((6, 5, 3)).astype(np.float32)
    np.save(out, other)  # another array of exactly the render's shape and dtype
    fails(capsys, ["render", ckpt, "--out", out], "not an unfinished render.*--overwrite")
    np.testing.assert_array_equal(np.load(out), other)
    preview.write_bytes(b"an older picture")
    fails(capsys, ["render", ckpt, "--out", tmp_path / "p.npy", "--preview", preview],
          "--preview: .* exists; pass --overwrite")
    assert preview.read_bytes() == b"an older picture" and not (tmp_path / "p.npy").exists()
    assert main(["render", str(ckpt), "--out", str(out), "--preview", str(preview), "--overwrite"]) == 0
    model, _ = load_field(ckpt)
    np.testing.assert_array_equal(np.load(out), nfd_fast.render(model, (6, 5), progress=False).numpy())
    assert Image.open(preview).size == (5, 6)


# -------------------------------------------------------------------------------- demo


def test_demo_calls_the_approach_and_prints_its_line_last(tmp_path, capsys, monkeypatch):
    import nfd_fast.models as models

    calls = []

    def demo(approach, out, **kwargs):
        calls.append((approach, out, kwargs))
        Image.new("RGB", (4, 4)).save(out)
        return f"approach {approach}: a metric line"

    monkeypatch.setattr(models, "demo", demo, raising=False)
    out = tmp_path / "d.png"
    assert main(["demo", "--approach", "3", "--out", str(out), "--quick", "--seed", "5"]) == 0
    assert calls == [(3, str(out), {"quick": True, "seed": 5, "device": "cpu"})]
    assert capsys.readouterr().out.strip().splitlines()[-1] == "approach 3: a metric line"
    fails(capsys, ["demo", "--approach", "3", "--out", out], "--out: .* exists; pass --overwrite")
    fails(capsys, ["demo", "--out", tmp_path / "d.npy"], r"--out: expected a \.png path")
    with pytest.raises(SystemExit):  # the approach's own settings are not CLI options
        main(["demo", "--signals", "0"])
    assert main(["demo", "--approach", "ddmi", "--out", str(tmp_path / "ddmi.png")]) == 0
    assert calls[-1][0] == "ddmi"
    with pytest.raises(SystemExit):  # not an approach
        main(["demo", "--approach", "11", "--out", str(tmp_path / "x.png")])
    assert len(calls) == 2  # the two valid calls only


def test_demo_of_approach_one_writes_its_plot(tmp_path, capsys):
    out = tmp_path / "demo.png"
    assert main(["demo", "--approach", "1", "--quick", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("approach 1")
