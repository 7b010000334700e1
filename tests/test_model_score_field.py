"""Approach 3 (ScoreField): denoising score matching, the score from the field, the
predictor-corrector sampler with clamped observations, any-resolution queries, bad inputs."""
import math

import pytest
import torch

import nfd_fast
from nfd_fast.models.score_field import ScoreField

from conftest import assert_backends_agree_on_a_step

SMALL = dict(grid=9, channels=8, width=16, dilations=(1, 2), timesteps=10, beta_start=0.01, beta_end=0.9)


def small_model(seed=0):
    torch.manual_seed(seed)
    return ScoreField(**SMALL)


def sines(n, points, seed=0):
    """a sin(pi f x + phase) on linspace(-1, 1, points), [n, points]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.linspace(-1, 1, points)
    a, f, p = torch.rand(n, 1, generator=g) + 0.5, torch.rand(n, 1, generator=g) + 0.5, 6 * torch.rand(n, 1, generator=g)
    return a * torch.sin(math.pi * f * x + p)


def test_loss_falls_in_a_short_run():
    model = small_model()
    data = sines(64, 17)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    losses = []
    with nfd_fast.use_backend("torch"):
        for _ in range(30):
            loss = model.loss(data[torch.randint(0, 64, (8,), generator=g)], generator=g)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, (losses[:10], losses[-10:])


def test_fused_and_reference_backends_agree_on_the_first_step():
    """grid_lookup, fused_mlp and q_sample under both backends: loss and every gradient."""
    model = small_model()
    data = sines(2, 17, seed=1)
    assert_backends_agree_on_a_step(model, lambda m: m.loss(data, generator=torch.Generator().manual_seed(3)))


def test_score_is_tweedie_of_the_field_and_matches_the_noise_it_was_trained_on():
    """s = (sqrt(abar) D - x_t) / (1 - abar); a field that returns the true x_0 gives the
    exact conditional score -eps / sqrt(1 - abar) of denoising score matching."""
    model = small_model()
    x0 = sines(3, 9, seed=2)
    eps = torch.randn(3, 9, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([0, 4, 9])
    abar = model.schedule.alphas_cumprod[t].unsqueeze(-1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    model.denoise = lambda x, tt, coords: x0  # an oracle field
    torch.testing.assert_close(model.score(x_t, t), -eps / (1 - abar).sqrt(), rtol=1e-4, atol=1e-4)


def test_samples_are_finite_at_two_resolutions_and_keep_the_observations():
    model = small_model()
    values = sines(2, 9, seed=5)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[:, [1, 4, 6]] = True
    with nfd_fast.use_backend("torch"):
        free = model.sample(2, generator=torch.Generator().manual_seed(0))
        state = model.sample(2, observations=(values, mask), generator=torch.Generator().manual_seed(0))
        coarse, fine = model.decode(state, 9), model.decode(state, 33)
    assert free.shape == state.shape == (2, 9) and torch.isfinite(free).all()
    torch.testing.assert_close(state[mask], values[mask])  # clamped exactly after the last step
    assert (state[~mask] - values[~mask]).abs().max() > 1e-3  # the rest is sampled, not copied
    assert coarse.shape == (2, 9) and fine.shape == (2, 33) and torch.isfinite(fine).all()
    # grid point k of the 9-point query is point 4k of the 33-point one: the same field
    torch.testing.assert_close(coarse, fine[:, ::4], atol=1e-5, rtol=1e-5)


def test_nan_in_gives_nan_out():
    model = small_model()
    x = sines(2, 9)
    x[1, 3] = float("nan")
    with nfd_fast.use_backend("torch"):
        y = model.denoise(x, 2, 9)
    assert torch.isnan(y[1]).any() and torch.isfinite(y[0]).all()


def test_bad_inputs_raise_naming_the_argument():
    model = small_model()
    with pytest.raises(ValueError, match="x_t"):
        model.denoise(torch.zeros(2, 8), 0, 9)
    with pytest.raises(ValueError, match="coords"):
        model.denoise(torch.zeros(2, 9), 0, torch.zeros(5, 2))
    with pytest.raises(ValueError, match="t:"):
        model.denoise(torch.zeros(2, 9), torch.zeros(3, dtype=torch.long), 9)
    with pytest.raises(ValueError, match="signals"):
        model.loss(torch.zeros(2, 18))
    with pytest.raises(ValueError, match="observations"):
        model.sample(2, observations=(torch.zeros(2, 8), torch.zeros(2, 8, dtype=torch.bool)))
    with pytest.raises(TypeError, match="observations"):
        model.sample(2, observations=(torch.zeros(2, 9), torch.zeros(2, 9)))
    with pytest.raises(ValueError, match="channels"):
        ScoreField(channels=64)


def test_save_and_load_round_trip(tmp_path):
    model = small_model()
    path = tmp_path / "score.pt"
    model.save(path)
    loaded = ScoreField.load(path)
    assert loaded.config == model.config
    x = sines(2, 9)
    with nfd_fast.use_backend("torch"):
        torch.testing.assert_close(loaded.denoise(x, 3, 21), model.denoise(x, 3, 21))
