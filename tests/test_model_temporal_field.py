"""Approach 6 (TemporalField): training, fused vs reference backends, queries at two frame
rates from one latent, the temporal baseline, K-planes in 4-D, input checks, checkpoints."""

import pytest
import torch

import nfd_fast
from nfd_fast.models.blocks import grid_coordinates, train_loop
from nfd_fast.models.temporal_field import TemporalField, interpolate_frames, moving_blobs

from conftest import DEVICE, assert_backends_agree_on_a_step

TINY = dict(latent_dim=8, cond_dim=8, plane_channels=4, space_resolution=4, time_resolution=3,
            encoder_width=16, decoder_width=16, denoiser_width=16, timesteps=10)


def clips(n, T=3, size=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = moving_blobs(n, T, size, generator=g)
    mask = torch.zeros(n, T, dtype=torch.bool)
    mask[:, ::2] = True
    return x, mask


def test_interpolate_frames_is_linear_in_time():
    x = torch.randn(2, 5, 3, 3, 1)
    mask = torch.tensor([[True, False, False, True, False], [False, True, False, False, True]])
    out = interpolate_frames(x, mask)
    torch.testing.assert_close(out[0, 1], x[0, 0] + (x[0, 3] - x[0, 0]) / 3)
    torch.testing.assert_close(out[0, 4], x[0, 3])
    torch.testing.assert_close(out[1, 0], x[1, 1])
    torch.testing.assert_close(out[1, 3], x[1, 1] + 2 * (x[1, 4] - x[1, 1]) / 3)


def test_loss_falls():
    torch.manual_seed(0)
    x, mask = clips(8)
    model = TemporalField(**TINY)

    def fixed_losses():
        with torch.no_grad():
            return model.losses(x, mask, generator=torch.Generator().manual_seed(5))

    with nfd_fast.use_backend("torch"):
        before = fixed_losses()
        train_loop(model.parameters(), lambda b: model.losses(*b), lambda s: (x, mask), 20, lr=1e-2,
                   progress=False)
        after = fixed_losses()
    assert after["reconstruction"] < 0.6 * before["reconstruction"]
    assert after["diffusion"] < before["diffusion"]


def test_fused_and_reference_backends_agree_on_a_training_step():
    torch.manual_seed(0)
    x, mask = clips(2, T=2, size=3, seed=1)
    model = TemporalField(**TINY).to(DEVICE)
    assert_backends_agree_on_a_step(
        model, lambda m: m.training_step(x.to(DEVICE), mask.to(DEVICE), generator=torch.Generator(DEVICE).manual_seed(2)), loss_tol=1e-4, grad_tol=1e-3)


def test_two_frame_rates_from_one_latent():
    torch.manual_seed(0)
    x, mask = clips(2, T=3, size=4, seed=2)
    model = TemporalField(**TINY).eval()
    with nfd_fast.use_backend("torch"):
        z, f = model.sample_latents(x, mask, steps=5, generator=torch.Generator().manual_seed(0))
        slow, fast = grid_coordinates((3, 4, 4)), grid_coordinates((5, 4, 4))
        a = model.decode(slow, z, f, model.base(x, mask, slow.expand(2, -1, -1)))
        b = model.decode(fast, z, f, model.base(x, mask, fast.expand(2, -1, -1)))
        sampled = model.sample(x, mask, slow, steps=5, guidance_scale=None)
    assert torch.isfinite(b).all() and torch.isfinite(sampled).all() and sampled.shape == (2, 48, 1)
    # frames t = -1, 0, 1 are frames 0, 2, 4 of the 5-frame query: the same field
    torch.testing.assert_close(b.view(2, 5, 16)[:, ::2], a.view(2, 3, 16), atol=1e-5, rtol=1e-5)


def test_kplanes_in_four_dimensions():
    model = TemporalField(dims=4, **TINY).eval()
    x = torch.rand(2, 3, 2, 4, 4, 1)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    with nfd_fast.use_backend("torch"):
        loss = model.training_step(x, mask)
        out = model.sample(x, mask, grid_coordinates((2, 3, 5, 5)), steps=3)
    assert len(model.lookup.planes) == 6 and torch.isfinite(loss) and out.shape == (2, 150, 1)


def test_wrong_shapes_raise_and_checkpoints_round_trip(tmp_path):
    x, mask = clips(2)
    model = TemporalField(**TINY)
    with pytest.raises(ValueError, match="clips"):
        model.losses(x[..., 0], mask)
    with pytest.raises(ValueError, match="frame_mask"):
        model.losses(x, mask[:, :2])
    with pytest.raises(TypeError, match="frame_mask"):
        model.losses(x, mask.float())
    with pytest.raises(ValueError, match="dims"):
        TemporalField(dims=2)
    model.save(tmp_path / "m.pt")
    back = TemporalField.load(tmp_path / "m.pt")
    with nfd_fast.use_backend("torch"), torch.no_grad():
        z, f = torch.randn(2, 8), torch.randn(2, 8)
        q = torch.rand(2, 7, 3) * 2 - 1
        torch.testing.assert_close(model.decode(q, z, f), back.decode(q, z, f))
