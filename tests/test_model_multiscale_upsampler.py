"""Approach 4 (MultiscaleUpsampler): training, fused vs reference backends, one low-resolution
sample rendered at two sizes, the field's base against bilinear interpolation, input checks,
checkpoints, data."""

import pytest
import torch
import torch.nn.functional as F

import nfd_fast
from nfd_fast.models.blocks import cell_centres, render_shapes, train_loop
from nfd_fast.models.multiscale_upsampler import MultiscaleUpsampler, bicubic, shape_images

from conftest import DEVICE, assert_backends_agree_on_a_step

TINY = dict(low_resolution=4, features=3, encoder_width=4, decoder_width=8, denoiser_width=4,
            denoiser_blocks=1, timesteps=10)


def batch(n, r=4, queries=37, seed=0):
    d = shape_images(n, r, queries=queries, generator=torch.Generator().manual_seed(seed))
    return d["low"], d["queries"], d["targets"]


def test_loss_falls():
    torch.manual_seed(0)
    data = batch(6)
    model = MultiscaleUpsampler(**TINY)

    def fixed_losses():
        with torch.no_grad():
            return model.losses(*data, generator=torch.Generator().manual_seed(5))

    with nfd_fast.use_backend("torch"):
        before = fixed_losses()
        train_loop(model.parameters(), lambda b: model.losses(*b), lambda s: data, 25, lr=1e-2, progress=False)
        after = fixed_losses()
    assert after["reconstruction"] < 0.7 * before["reconstruction"]
    assert after["diffusion"] < before["diffusion"]


def test_fused_and_reference_backends_agree_on_a_training_step():
    torch.manual_seed(0)
    data = [t.to(DEVICE) for t in batch(2, queries=9, seed=1)]
    model = MultiscaleUpsampler(**TINY).to(DEVICE)
    with torch.no_grad():  # a nonzero denoiser output, so its gradients are compared too
        model.denoiser.out.weight.normal_(0, 0.1)
    assert_backends_agree_on_a_step(
        model, lambda m: m.training_step(*data, generator=torch.Generator(DEVICE).manual_seed(2)), loss_tol=1e-4, grad_tol=1e-3)


def test_one_sample_at_two_sizes():
    torch.manual_seed(0)
    model = MultiscaleUpsampler(**TINY).eval()
    with nfd_fast.use_backend("torch"):
        low = model.sample_low(3, steps=4, generator=torch.Generator().manual_seed(0))
        coarse, fine = model.render(low, 3), model.render(low, 9)
        direct = model.sample(2, cell_centres((5, 5)), steps=4)
    assert low.shape == (3, 1, 4, 4) and coarse.shape == (3, 1, 3, 3) and fine.shape == (3, 1, 9, 9)
    assert torch.isfinite(fine).all() and torch.isfinite(direct).all() and direct.shape == (2, 25, 1)
    assert low.min() >= 0 and low.max() <= 1
    # the 3 x 3 pixel centres are every third of the 9 x 9 ones, starting at the second
    torch.testing.assert_close(fine[:, :, 1::3, 1::3], coarse, atol=1e-5, rtol=1e-5)


def test_base_is_bilinear_interpolation_of_the_low_resolution_image():
    torch.manual_seed(0)
    model = MultiscaleUpsampler(**{**TINY, "low_resolution": 6})
    with torch.no_grad():
        model.field.layers[-1].weight.zero_()
        model.field.layers[-1].bias.zero_()
    low = torch.rand(2, 1, 6, 6)
    with nfd_fast.use_backend("torch"), torch.no_grad():
        same, double = model.render(low, 6), model.render(low, 12)
    torch.testing.assert_close(same, low, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(double, F.interpolate(low, size=(12, 12), mode="bilinear", align_corners=False),
                               atol=1e-5, rtol=1e-5)


def test_wrong_shapes_raise_and_checkpoints_round_trip(tmp_path):
    low, q, y = batch(2)
    model = MultiscaleUpsampler(**TINY)
    with pytest.raises(ValueError, match="low"):
        model.losses(low[:, :, :3], q, y)
    with pytest.raises(ValueError, match="queries"):
        model.losses(low, q[:1], y)
    with pytest.raises(ValueError, match="targets"):
        model.losses(low, q, y[:, :5])
    with pytest.raises(ValueError, match="queries"):
        model.upsample(low, torch.rand(5, 3))
    with pytest.raises(ValueError, match="low_resolution"):
        MultiscaleUpsampler(low_resolution=5)
    model.save(tmp_path / "m.pt")
    back = MultiscaleUpsampler.load(tmp_path / "m.pt")
    with nfd_fast.use_backend("torch"), torch.no_grad():
        torch.testing.assert_close(model.render(low, 7), back.render(low, 7))
    assert back.config == model.config


def test_data_and_baseline():
    d = shape_images(2, 3, factor=2, queries=5, generator=torch.Generator().manual_seed(4))
    fine = render_shapes(d["params"], cell_centres((6, 6))).view(2, 6, 6)
    assert torch.allclose(d["low"][:, 0, 1, 2], fine[:, 2:4, 4:6].mean((1, 2)))
    torch.testing.assert_close(d["targets"], render_shapes(d["params"], d["queries"]))
    low = torch.rand(2, 1, 5, 5)
    up = bicubic(low, 10)
    assert up.shape == (2, 1, 10, 10) and up.min() >= 0 and up.max() <= 1
