"""Approach 3 (ScoreField): denoising score matching, the score from the field, the
predictor-corrector sampler conditioned on observations (read by the network, clamped in
the state, projected in the decoded field), any-resolution queries, bad inputs."""
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
    model.denoise = lambda x, tt, coords, observations=None: x0  # an oracle field
    torch.testing.assert_close(model.score(x_t, t), -eps / (1 - abar).sqrt(), rtol=1e-4, atol=1e-4)


def test_samples_are_finite_at_two_resolutions_and_keep_the_observations():
    model = small_model()
    values = sines(2, 9, seed=5)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[:, [1, 4, 6]] = True
    mask[1, 7] = True  # rows may differ
    with nfd_fast.use_backend("torch"):
        free = model.sample(2, generator=torch.Generator().manual_seed(0))
        state = model.sample(2, observations=(values, mask), generator=torch.Generator().manual_seed(0))
        coarse, fine = model.decode(state, 9, (values, mask)), model.decode(state, 33, (values, mask))
        raw = model.decode(state, 33, (values, mask), project=False)
    assert free.shape == state.shape == (2, 9) and torch.isfinite(free).all()
    torch.testing.assert_close(state[mask], values[mask])  # clamped exactly after the last step
    assert (state[~mask] - values[~mask]).abs().max() > 1e-3  # the rest is sampled, not copied
    assert coarse.shape == (2, 9) and fine.shape == (2, 33) and torch.isfinite(fine).all()
    # grid point k of the 9-point query is point 4k of the 33-point one: the same field
    torch.testing.assert_close(coarse, fine[:, ::4], atol=1e-5, rtol=1e-5)
    # the projected field goes through the state (so the observations) at every grid point,
    # whatever the (here untrained) network says; between grid points it moves by the
    # linear interpolation of the grid residual
    torch.testing.assert_close(coarse, state, atol=1e-5, rtol=1e-5)
    residual = state - raw[:, ::4]
    assert residual.abs().max() > 1e-2  # an untrained network's own field misses them
    torch.testing.assert_close(fine[:, 2::4] - raw[:, 2::4], (residual[:, 1:] + residual[:, :-1]) / 2,
                               atol=1e-5, rtol=1e-5)


def test_unobserved_values_are_never_read():
    """The network reads y * m through where(): a NaN (or anything) off the mask changes nothing."""
    model = small_model()
    x, values = sines(2, 9, seed=6), sines(2, 9, seed=7)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[:, [0, 5]] = True
    other = torch.where(mask, values, float("nan"))
    with nfd_fast.use_backend("torch"):
        a = model.denoise(x, 3, 9, (values, mask))
        b = model.denoise(x, 3, 9, (other, mask))
        c = model.denoise(x, 3, 9)
    assert torch.isfinite(b).all()
    torch.testing.assert_close(a, b)
    assert (a - c).abs().max() > 1e-4  # and the observed ones are read


def test_training_masks_span_the_fractions_up_to_max_observed():
    model = ScoreField(**{**SMALL, "grid": 33, "max_observed": 0.4})
    mask = model.observation_mask(4000, generator=torch.Generator().manual_seed(0))
    fraction = mask.float().mean(1)
    assert mask.dtype == torch.bool and mask.shape == (4000, 33)
    assert fraction.max() <= 0.7 and abs(fraction.mean().item() - 0.2) < 0.01
    assert (fraction == 0).float().mean() > 0.05  # some rows train the unconditional score


@pytest.fixture(scope="module")
def trained_on_sines():
    """A small model trained briefly on sines (grid 9, fine grid 17), and held-out sines."""
    model = ScoreField(**{**SMALL, "max_observed": 0.6})
    torch.manual_seed(0)
    data, held = sines(512, 17, seed=8), sines(48, 17, seed=9)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    with nfd_fast.use_backend("torch"):
        for _ in range(300):
            loss = model.loss(data[torch.randint(0, 512, (32,), generator=g)], generator=g)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model, held


def test_conditioned_samples_match_the_observations_and_follow_them_elsewhere(trained_on_sines):
    """Observed: the decoded field within 1e-5 of the observations (the projection), the
    network's own field within 0.2 RMSE after this short run; unobserved: conditioned
    samples far nearer the truth than the prior's. A network that ignores the observations
    (clamping alone) reaches about 0.3 and 0.6 here: it leaves spikes at the clamps."""
    model, held = trained_on_sines
    truth = held[:, ::2]
    mask = torch.zeros_like(truth, dtype=torch.bool)
    mask[:, [0, 3, 5, 8]] = True
    fine_mask = torch.zeros_like(held, dtype=torch.bool)
    fine_mask[:, ::2] = mask
    gen = torch.Generator().manual_seed(2)
    with nfd_fast.use_backend("torch"):
        state = model.sample(48, observations=(truth, mask), generator=gen)
        field = model.decode(state, 17, (truth, mask))
        raw = model.decode(state, 17, (truth, mask), project=False)
        free = model.decode(model.sample(48, generator=gen), 17)
    rmse = lambda a, b: ((a - b) ** 2).mean().sqrt().item()  # noqa: E731
    assert rmse(field[fine_mask], held[fine_mask]) < 1e-5
    assert rmse(raw[fine_mask], held[fine_mask]) < 0.2
    conditioned, prior = rmse(field[~fine_mask], held[~fine_mask]), rmse(free[~fine_mask], held[~fine_mask])
    assert conditioned < 0.5 * prior, (conditioned, prior)
    assert conditioned < 0.5, conditioned  # the sines' amplitudes are 0.5..1.5


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
    with pytest.raises(TypeError, match="observations"):
        model.sample(2, observations=torch.zeros(2, 9))
    with pytest.raises(ValueError, match="observations"):
        model.decode(torch.zeros(2, 9), 9, (torch.zeros(3, 9), torch.zeros(3, 9, dtype=torch.bool)))
    with pytest.raises(ValueError, match="state"):
        model.decode(torch.zeros(2, 8), 9)
    with pytest.raises(ValueError, match="max_observed"):
        ScoreField(max_observed=1.5)
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
