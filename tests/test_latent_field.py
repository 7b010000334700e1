"""Approach 1 (LatentField): data generators, the seed's training run, any-resolution
queries, sampling, conditioning, and fused vs reference backends."""
import copy
import time

import pytest
import torch

import nfd_fast
from nfd_fast.models import LatentField, LatentFieldConfig
from nfd_fast.models.latent_field import (evaluate, fourier_series, interpolate_observations,
                                          observation_mask, sine_waves, toy_signals, train)

from conftest import DEVICE, rel_err


def test_data_generators():
    g = torch.Generator().manual_seed(0)
    x = toy_signals(100, 256, generator=g)
    assert x.shape == (100, 256) and x.abs().max() <= 1.0 + 1e-6
    assert sine_waves(3, 64).shape == (3, 64) and fourier_series(3, 64).abs().amax(1).allclose(torch.ones(3))
    m = observation_mask(10, 256, 0.2, generator=g)
    assert (m.sum(1) == 51).all()
    with pytest.raises(ValueError, match="ratio must be in"):
        observation_mask(1, 8, 0.0)


def test_interpolation_front_end():
    values = torch.tensor([[9.0, 1.0, 9.0, 9.0, 4.0, 9.0]])
    mask = torch.tensor([[False, True, False, False, True, False]])
    torch.testing.assert_close(interpolate_observations(values, mask),
                               torch.tensor([[1.0, 1.0, 2.0, 3.0, 4.0, 4.0]]))


@pytest.fixture(scope="module")
def seed_run():
    """The seed's settings: 2000 signals, 20% observations, 20 epochs (CPU, reference)."""
    g = torch.Generator().manual_seed(0)
    x, m = toy_signals(2200, generator=g), observation_mask(2200, generator=g)
    torch.manual_seed(0)
    model = LatentField()
    start = time.perf_counter()
    with nfd_fast.use_backend("torch"):
        history = train(model, x[:2000], m[:2000], epochs=20, progress=False)
    return model, history, time.perf_counter() - start, (x[2000:], m[2000:])


def test_seed_settings_reach_the_reported_reconstruction(seed_run):
    model, history, seconds, (x, m) = seed_run
    with nfd_fast.use_backend("torch"):
        mse = evaluate(model, x, m)
    assert mse <= 0.01, mse
    assert history["reconstruction"][-1] < history["reconstruction"][0] / 10
    assert history["diffusion"][-1] < history["diffusion"][0]


def test_queries_at_any_resolution_from_one_latent(seed_run):
    model, _, _, (x, m) = seed_run
    with torch.no_grad(), nfd_fast.use_backend("torch"):
        z = model.encoder(x[:4], m[:4])
        fine, coarse = model.decode(z, 1024), model.decode(z, 64)
    assert fine.shape == (4, 1024) and coarse.shape == (4, 64)
    # the 64-point query lies on the 1024-point curve (linear interpolation of it)
    t_fine, t_coarse = torch.linspace(-1, 1, 1024), torch.linspace(-1, 1, 64)
    idx = torch.searchsorted(t_fine, t_coarse).clamp(1, 1023)
    w = (t_coarse - t_fine[idx - 1]) / (t_fine[idx] - t_fine[idx - 1])
    interp = fine[:, idx - 1] * (1 - w) + fine[:, idx] * w
    assert (interp - coarse).abs().max() < 0.02


def test_sampling_gives_signals_at_two_resolutions(seed_run):
    model, _, _, (x, _) = seed_run
    with nfd_fast.use_backend("torch"):
        s64, z = model.generate(16, 64, generator=torch.Generator().manual_seed(0), return_latents=True)
        s1024 = model.decode(z, 1024)
    assert s64.shape == (16, 64) and s1024.shape == (16, 1024)
    assert torch.isfinite(s64).all()
    # plausible: the amplitude range of the data, and not all the same signal
    assert 0.2 < s1024.abs().amax(1).median() < 1.5
    assert s64.std(0).mean() > 0.1


def test_schedule_follows_every_device_move():
    # .cuda() and .cpu() are _apply(lambda t: t.cuda()) etc.: exercise that path with "meta"
    model = LatentField(LatentFieldConfig(length=32))
    model._apply(lambda t: t.to("meta"))
    assert model.schedule.device.type == "meta" and model.latent_mean.device.type == "meta"
    assert LatentField(LatentFieldConfig(length=32)).to("meta").schedule.device.type == "meta"


def test_fused_and_reference_backends_agree_on_a_training_step():
    torch.manual_seed(0)
    cfg = LatentFieldConfig(length=64, encoder_width=64, decoder_width=32, denoiser_width=32,
                            timesteps=20, conditional=True)
    model = LatentField(cfg).to(DEVICE)
    twin = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    x, m = toy_signals(8, 64, generator=g).to(DEVICE), observation_mask(8, 64, generator=g).to(DEVICE)
    results = []
    for be, mod in (("triton", model), ("torch", twin)):
        with nfd_fast.use_backend(be):
            losses = mod.losses(x, m, generator=torch.Generator(DEVICE).manual_seed(2))
            (losses["reconstruction"] + losses["diffusion"]).backward()
        results.append((losses, [p.grad for p in mod.parameters()]))
    for k in ("reconstruction", "diffusion"):
        assert rel_err(results[0][0][k], results[1][0][k]) < 1e-4
    for a, b in zip(results[0][1], results[1][1]):
        assert rel_err(a, b) < 1e-3
    with nfd_fast.use_backend("triton"):
        cond = model.generate(2, 32, steps=5, observations=(x[:2], m[:2]), guidance_scale=2.0)
    assert cond.shape == (2, 32)
    with pytest.raises(ValueError, match="conditional=False"):
        LatentField(LatentFieldConfig(length=64)).generate(1, observations=(x[:1], m[:1]))
