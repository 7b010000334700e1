"""Approach 8 (StochasticField): the Gaussian NLL falls, fused and reference backends agree,
mean / variance and reverse-diffusion draws at two resolutions, calibration bookkeeping,
bad inputs, checkpoints."""
import math

import pytest
import torch

import nfd_fast
from nfd_fast.models.stochastic_field import StochasticField, interval_coverage, make_tasks

from conftest import assert_backends_agree_on_a_step

SMALL = dict(latent_dim=8, width=16, hidden_layers=1, encoder_width=16, time_dim=8, timesteps=6)


def small_model(seed=0):
    torch.manual_seed(seed)
    return StochasticField(**SMALL)


def sines(n, points, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.linspace(-1, 1, points)
    a, f, p = torch.rand(n, 1, generator=g) + 0.5, torch.rand(n, 1, generator=g) + 0.5, 6 * torch.rand(n, 1, generator=g)
    return a * torch.sin(math.pi * f * x + p)


def tasks(n, points=21, seed=0):
    g = torch.Generator().manual_seed(seed)
    return make_tasks(sines(n, points, seed), (0.2, 0.4), 0.05, g)


def test_tasks_split_observations_from_targets():
    ctx_c, ctx_v, ctx_m, q_c, y, q_m = tasks(5)
    assert ctx_c.shape[:2] == ctx_v.shape == ctx_m.shape and ctx_c.shape[2] == 1
    assert q_c.shape == (5, 21, 1) and y.shape == q_m.shape == (5, 21)
    # each observed (coord, value) pair is a noisy signal point that is not a target
    for b in range(5):
        obs = ctx_c[b, ctx_m[b], 0]
        idx = torch.searchsorted(q_c[b, :, 0], obs)
        torch.testing.assert_close(y[b, idx], ctx_v[b, ctx_m[b]])
        assert not q_m[b, idx].any() and q_m[b].sum() + ctx_m[b].sum() == 21


def test_interval_coverage_counts_inside_targets():
    y = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    lo, hi = torch.full_like(y, 0.5), torch.full_like(y, 2.5)
    assert interval_coverage(y, lo, hi, torch.ones_like(y, dtype=torch.bool)) == 0.5
    assert interval_coverage(y, lo, hi, torch.tensor([[False, True, True, False]])) == 1.0


def test_loss_falls_in_a_short_run():
    model = small_model()
    data = tasks(48)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    losses = []
    with nfd_fast.use_backend("torch"):
        for _ in range(40):
            idx = torch.randint(0, 48, (16,), generator=g)
            loss = model.loss(tuple(x[idx] for x in data[:5]), generator=g)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.15, (losses[:10], losses[-10:])


def test_fused_and_reference_backends_agree_on_the_first_step():
    model = small_model()
    batch = tasks(2, 9, seed=1)[:5]
    assert_backends_agree_on_a_step(model, lambda m: m.loss(batch, generator=torch.Generator().manual_seed(3)))


def test_nll_is_the_gaussian_negative_log_likelihood():
    model = small_model()
    data = tasks(3, seed=2)[:5]
    z = model.encode(*data[:3])
    g = torch.Generator().manual_seed(7)
    with nfd_fast.use_backend("torch"):
        loss = model.loss(data, generator=torch.Generator().manual_seed(7))
        # the same draws by hand: t, then eps, as the loss draws them
        t = torch.randint(0, 6, (3,), generator=g)
        eps = torch.randn(data[4].shape, generator=g)
        abar = model.schedule.alphas_cumprod[t].unsqueeze(-1)
        mean, var = model(data[3], z, abar.sqrt() * data[4] + (1 - abar).sqrt() * eps, t)
    expected = -torch.distributions.Normal(mean, var.sqrt()).log_prob(data[4]).mean() - 0.5 * math.log(2 * math.pi)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)


def test_predictions_and_draws_at_two_resolutions():
    model = small_model()
    data = tasks(2, seed=3)
    with nfd_fast.use_backend("torch"):
        z = model.encode(*data[:3])
        mean, var = model.predict(z, 13, generator=torch.Generator().manual_seed(0))
        draws = model.sample(z, 25, samples=5, generator=torch.Generator().manual_seed(0))
        fine_mean, _ = model.predict(z, 25, generator=torch.Generator().manual_seed(0))
    assert mean.shape == var.shape == (2, 13) and (var > 0).all() and torch.isfinite(mean).all()
    assert draws.shape == (5, 2, 25) and torch.isfinite(draws).all()
    assert draws.std(0).mean() > 1e-3  # different draws per chain
    # 13 points are every other one of 25: the same field there
    assert fine_mean.shape == (2, 25)


def test_nan_in_gives_nan_out():
    model = small_model()
    data = tasks(2, seed=4)
    z = model.encode(*data[:3])
    y_t = torch.randn(2, 21)
    y_t[1, 5] = float("nan")
    mean, var = model(data[3], z, y_t, 2)
    assert torch.isnan(mean[1, 5]) and torch.isnan(var[1, 5])
    assert torch.isfinite(mean[0]).all()


def test_bad_inputs_raise_naming_the_argument():
    model = small_model()
    data = tasks(2)
    z = model.encode(*data[:3])
    with pytest.raises(ValueError, match="z"):
        model(data[3], z[:, 1:], data[4], 0)
    with pytest.raises(ValueError, match="y_t"):
        model(data[3], z, data[4][:, 1:], 0)
    with pytest.raises(ValueError, match="coords"):
        model(torch.zeros(2, 21, 2), z, data[4], 0)
    with pytest.raises(ValueError, match="t:"):
        model(data[3], z, data[4], torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="values"):
        model.encode(data[0], data[1][:, :, None], data[2])
    with pytest.raises(ValueError, match="samples"):
        model.sample(z, 8, samples=0)


def test_save_and_load_round_trip(tmp_path):
    model = small_model()
    path = tmp_path / "stochastic.pt"
    model.save(path)
    loaded = StochasticField.load(path)
    assert loaded.config == model.config
    data = tasks(2)
    z = model.encode(*data[:3])
    for a, b in zip(model(data[3], z, data[4], 1), loaded(data[3], loaded.encode(*data[:3]), data[4], 1)):
        torch.testing.assert_close(a, b)
