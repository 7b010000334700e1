"""Approach 9 (ModulatedField): meta-learned fitting, fused vs reference backends through
the second-order inner loop, sampling at two resolutions from one code, input checks,
checkpoints."""

import pytest
import torch

import nfd_fast
from nfd_fast.models.blocks import grid_coordinates, random_blobs, render_blobs, train_loop
from nfd_fast.models.modulated_field import ModulatedField, nearest_psnr

from conftest import DEVICE, assert_backends_agree_on_a_step

TINY = dict(channels=2, latent_dim=8, width=16, hidden_layers=1, inner_steps=2, denoiser_width=8,
            timesteps=10)


def images(n, size, seed=0):
    coords = grid_coordinates((size, size))
    g = torch.Generator().manual_seed(seed)
    return coords, render_blobs(random_blobs(n, channels=2, generator=g), coords)


def test_meta_learning_lowers_the_loss_and_the_inner_loop_fits():
    torch.manual_seed(0)
    coords, x = images(6, 7)
    model = ModulatedField(**TINY)

    def fixed_losses():
        with torch.no_grad():
            return model.losses(coords, x, generator=torch.Generator().manual_seed(5))

    with nfd_fast.use_backend("torch"):
        before = fixed_losses()
        train_loop(model.parameters(), lambda b: model.losses(*b), lambda s: (coords, x), 25, lr=3e-3,
                   progress=False)
        after = fixed_losses()
        model.eval()
        err = [((model.decode(coords, model.fit(coords, x, steps)) - x) ** 2).mean() for steps in (0, 2)]
    assert after["reconstruction"] < 0.7 * before["reconstruction"]
    assert after["diffusion"] < before["diffusion"]
    assert err[1] < 0.6 * err[0]  # the inner steps fit each image's code
    assert model.inner_lr.grad is not None  # the learning rates are meta-learned


def test_fit_matches_plain_gradient_descent():
    torch.manual_seed(0)
    coords, x = images(3, 5, seed=1)
    model = ModulatedField(**TINY).eval()
    model.inner_lr.data.uniform_(0.5, 2.0)
    with nfd_fast.use_backend("torch"):
        z = model.fit(coords, x, steps=2)
        ref = torch.zeros(3, 8)
        for _ in range(2):  # each image's code by itself
            ref = ref.requires_grad_(True)
            per_image = ((model.field(coords.expand(3, -1, -1), ref) - x) ** 2).mean((1, 2))
            grads = torch.stack([torch.autograd.grad(per_image[b], ref, retain_graph=True)[0][b] for b in range(3)])
            ref = (ref - model.inner_lr * grads).detach()
    torch.testing.assert_close(z, ref, atol=1e-5, rtol=1e-4)


def test_fused_and_reference_backends_agree_on_a_training_step():
    torch.manual_seed(0)
    coords, x = images(2, 3, seed=1)
    model = ModulatedField(**{**TINY, "inner_steps": 1}).to(DEVICE)
    assert_backends_agree_on_a_step(
        model, lambda m: m.training_step(coords.to(DEVICE), x.to(DEVICE), generator=torch.Generator(DEVICE).manual_seed(2)), loss_tol=1e-4, grad_tol=1e-3)


def test_sampling_at_two_resolutions_from_one_code():
    torch.manual_seed(0)
    model = ModulatedField(**TINY).eval()
    with nfd_fast.use_backend("torch"):
        z = model.sample_codes(3, steps=4, generator=torch.Generator().manual_seed(0))
        coarse = model.decode(grid_coordinates((5, 5)), z)
        fine = model.decode(grid_coordinates((9, 9)), z)
        direct = model.sample(2, grid_coordinates((4, 4)), steps=4)
    assert coarse.shape == (3, 25, 2) and fine.shape == (3, 81, 2) and direct.shape == (2, 16, 2)
    assert torch.isfinite(fine).all() and torch.isfinite(direct).all()
    torch.testing.assert_close(fine.view(3, 9, 9, 2)[:, ::2, ::2].reshape(3, 25, 2), coarse,
                               atol=1e-5, rtol=1e-5)


def test_wrong_shapes_raise_and_checkpoints_round_trip(tmp_path):
    coords, x = images(2, 4)
    model = ModulatedField(**TINY)
    with pytest.raises(ValueError, match="values"):
        model.losses(coords, x[..., :1])
    with pytest.raises(ValueError, match="coords"):
        model.losses(coords[:5], x)
    with pytest.raises(ValueError, match="coords"):
        model.fit(torch.rand(16, 3), x)
    with pytest.raises(ValueError, match="codes"):
        model.decode(coords, torch.randn(2, 7))
    with pytest.raises(ValueError, match="queries"):
        model.decode(torch.rand(3, 7, 2), torch.randn(2, 8))
    model.save(tmp_path / "m.pt")
    back = ModulatedField.load(tmp_path / "m.pt").eval()
    model.eval()
    with nfd_fast.use_backend("torch"):
        torch.testing.assert_close(model.decode(coords, model.fit(coords, x)), back.decode(coords, back.fit(coords, x)))
    assert back.config == model.config


def test_nearest_psnr():
    refs = torch.rand(4, 6, 3)
    imgs = torch.stack([refs[2] + 0.1, refs[0] - 0.01])
    torch.testing.assert_close(torch.tensor(nearest_psnr(imgs, refs)), torch.tensor((20.0 + 40.0) / 2))


def test_renoise_is_q_sample_then_the_ddim_x0():
    torch.manual_seed(0)
    model = ModulatedField(**TINY).eval()
    model.standardiser.mean.uniform_(-1, 1)
    model.standardiser.std.uniform_(0.5, 2)
    codes = torch.randn(3, 8)
    with nfd_fast.use_backend("torch"):
        out = model.renoise(codes, 2, steps=1, generator=torch.Generator().manual_seed(1))
        noise = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
        a = model.schedule.alphas_cumprod[2]
        z = a.sqrt() * model.standardiser.standardise(codes) + (1 - a).sqrt() * noise
        eps = model.denoiser(z, torch.full((3,), 2))
        x0 = ((z - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-4, 4)  # the final step lands on x0
        torch.testing.assert_close(out, model.standardiser.unstandardise(x0), atol=1e-5, rtol=1e-5)
        assert torch.isfinite(model.renoise(codes, 9, steps=4)).all()
    with pytest.raises(ValueError, match="t_start"):
        model.renoise(codes, 10)
    with pytest.raises(ValueError, match="codes"):
        model.renoise(codes[:, :3], 2)
