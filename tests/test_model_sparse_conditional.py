"""Approach 5 (SparseConditionalField): training, fused vs reference backends, sampling at
two resolutions from one latent, input checks, checkpoints."""

import pytest
import torch

import nfd_fast
from nfd_fast.models.blocks import grid_coordinates, observation_mask, train_loop
from nfd_fast.models.sparse_conditional import SparseConditionalField, synthetic_images

from conftest import DEVICE, assert_backends_agree_on_a_step

TINY = dict(channels=2, latent_dim=8, cond_dim=8, encoder_width=16, decoder_width=16,
            decoder_layers=1, denoiser_width=16, timesteps=10)


def data(n, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    coords, x, _ = synthetic_images(n, size, channels=2, generator=g)
    return coords, x, observation_mask(n, size * size, (0.05, 0.5), generator=g)


def test_loss_falls():
    torch.manual_seed(0)
    coords, x, mask = data(8, 6)
    model = SparseConditionalField(**TINY)

    def fixed_losses():  # the same batch, timesteps and noise before and after training
        with torch.no_grad():
            return model.losses(coords, x, mask, generator=torch.Generator().manual_seed(5))

    with nfd_fast.use_backend("torch"):
        before = fixed_losses()
        train_loop(model.parameters(), lambda b: model.losses(*b), lambda s: (coords, x, mask), 20,
                   lr=1e-2, progress=False)
        after = fixed_losses()
    assert after["reconstruction"] < 0.6 * before["reconstruction"]
    assert after["diffusion"] < before["diffusion"]


def test_fused_and_reference_backends_agree_on_a_training_step():
    torch.manual_seed(0)
    coords, x, mask = data(2, 4, seed=1)
    model = SparseConditionalField(**TINY).to(DEVICE)
    assert_backends_agree_on_a_step(
        model, lambda m: m.training_step(coords.to(DEVICE), x.to(DEVICE), mask.to(DEVICE), generator=torch.Generator(DEVICE).manual_seed(2)), loss_tol=1e-4, grad_tol=1e-3)


def test_sampling_at_two_resolutions_from_one_latent():
    torch.manual_seed(0)
    coords, x, mask = data(3, 8, seed=2)
    model = SparseConditionalField(**TINY).eval()
    with nfd_fast.use_backend("torch"):
        obs = model.observe(coords, x, mask)
        z, f = model.sample_latents(obs, steps=5, generator=torch.Generator().manual_seed(0))
        coarse = model.decode(grid_coordinates((5, 5)), z, f, obs)
        fine = model.decode(grid_coordinates((9, 9)), z, f, obs)
        unguided = model.sample(obs, grid_coordinates((5, 5)), steps=5, guidance_scale=None)
    assert coarse.shape == (3, 25, 2) and fine.shape == (3, 81, 2) and unguided.shape == (3, 25, 2)
    assert torch.isfinite(fine).all() and torch.isfinite(unguided).all()
    # the 5 x 5 grid is every other point of the 9 x 9 one: the same field
    torch.testing.assert_close(fine.view(3, 9, 9, 2)[:, ::2, ::2].reshape(3, 25, 2), coarse,
                               atol=1e-5, rtol=1e-5)


def test_wrong_shapes_raise_and_checkpoints_round_trip(tmp_path):
    coords, x, mask = data(2, 4)
    model = SparseConditionalField(**TINY)
    with pytest.raises(ValueError, match="values"):
        model.losses(coords, x[..., :1], mask)
    with pytest.raises(ValueError, match="mask"):
        model.losses(coords, x, mask[:, :5])
    with pytest.raises(ValueError, match="coords"):
        model.losses(coords[:, :1], x, mask)
    with pytest.raises(TypeError, match="mask"):
        model.observe(coords, x, mask.float())
    model.save(tmp_path / "m.pt")
    back = SparseConditionalField.load(tmp_path / "m.pt")
    with nfd_fast.use_backend("torch"), torch.no_grad():
        a = model.reconstruct(coords, x, mask, grid_coordinates((3, 3)))
        b = back.reconstruct(coords, x, mask, grid_coordinates((3, 3)))
    torch.testing.assert_close(a, b)
    assert back.config == model.config
