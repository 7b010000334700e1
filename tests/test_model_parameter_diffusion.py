"""Approach 2 (ParameterDiffusion): a batch of different networks decoded in one fused call,
per-signal fitting, the weight diffusion's training and sampling, and bad inputs."""
import math

import pytest
import torch

import nfd_fast
from nfd_fast.models.parameter_diffusion import ParameterDiffusion, nearest_mse

from conftest import rel_err

SMALL = dict(hidden=8, hidden_layers=1, w0=10.0, bottleneck=16, denoiser_width=32, timesteps=20)


def small_model(seed=0, **kw):
    torch.manual_seed(seed)
    return ParameterDiffusion(**{**SMALL, **kw})


def random_thetas(model, n, seed=1):
    """n clearly different networks: the template's weights plus large random offsets."""
    g = torch.Generator().manual_seed(seed)
    return model.initial_theta() + 0.5 * torch.randn(n, model.num_params, generator=g)


def siren_by_hand(theta_row, shapes, w0, x):
    """One network evaluated with plain tensor algebra: sin(w0 (W h + b)) per hidden layer,
    a linear last layer (never calls fused_mlp)."""
    h, at = x, 0
    for l, (out, inp) in enumerate(shapes):
        W = theta_row[at:at + out * inp].view(out, inp)
        at += out * inp
        b = theta_row[at:at + out]
        at += out
        h = h @ W.T + b
        if l < len(shapes) - 1:
            h = torch.sin(w0 * h)
    return h.squeeze(-1)


def test_a_batch_of_different_networks_is_one_fused_call_equal_to_separate_evaluations():
    model = small_model()
    theta = random_thetas(model, 64)
    x = torch.rand(5, 1) * 2 - 1
    with nfd_fast.use_backend("triton"):
        fused = model.decode(theta, x)
    assert fused.shape == (64, 5)
    for b in range(64):
        expected = siren_by_hand(theta[b].double(), model.shapes, 10.0, x.double())
        assert rel_err(fused[b], expected) < 1e-4, b  # float32's documented contract
    # the networks really differ (a shared-weight bug would make the rows alike)
    assert (fused[0] - fused[1]).abs().max() > 0.1


def test_per_sample_coordinates_and_nan_stays_in_its_row():
    model = small_model()
    theta = random_thetas(model, 3)
    x = torch.rand(3, 6, 1) * 2 - 1
    y = model.decode(theta, x)
    for b in range(3):
        torch.testing.assert_close(y[b], siren_by_hand(theta[b], model.shapes, 10.0, x[b]), atol=1e-5, rtol=1e-5)
    theta[1, 0] = float("nan")
    y = model.decode(theta, x)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2]]).all()


def test_fitting_a_batch_of_networks_lowers_their_error():
    model = small_model()
    t = torch.linspace(-1, 1, 24)
    signals = torch.stack([0.8 * torch.sin(math.pi * f * t + p) for f, p in ((1.0, 0.3), (2.5, 1.0), (1.7, 2.0))])
    with nfd_fast.use_backend("torch"):
        theta, history = model.fit(signals, steps=60, lr=5e-3)
    assert theta.shape == (3, model.num_params)
    assert history[-1] < history[0] / 10, (history[0], history[-1])
    # the fitted weights decode to the signals (and the template itself is left alone)
    assert ((model.decode(theta, 24) - signals) ** 2).mean() < history[0] / 10
    torch.testing.assert_close(model.initial_theta(), small_model().initial_theta())


@pytest.fixture(scope="module")
def data():
    """40 weight vectors on a 2-D plane through the template's: structure to learn."""
    model = small_model()
    g = torch.Generator().manual_seed(3)
    basis = torch.randn(2, model.num_params, generator=g)
    return model.initial_theta() + 0.3 * torch.randn(40, 2, generator=g) @ basis


def test_diffusion_loss_falls_in_a_short_run(data):
    model = small_model()
    model.set_statistics(data)
    opt = torch.optim.Adam(model.denoiser.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    with nfd_fast.use_backend("torch"):
        for _ in range(35):
            loss = model.loss(data[torch.randint(0, 40, (16,), generator=g)], generator=g)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, (losses[:10], losses[-10:])


def _spy_on_forward_launches(monkeypatch):
    """(IN_PAD, OUT_PAD) of every fused forward launch (the kernel still runs)."""
    from nfd_fast.kernels import fused_mlp as KM

    real, widths = KM.fused_mlp_fwd_kernel, []

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                widths.append((kwargs["IN_PAD"], kwargs["OUT_PAD"]))
                return real[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(KM, "fused_mlp_fwd_kernel", Spy())
    return widths


@pytest.mark.parametrize("bottleneck, padded", [(16, 16), (96, 128)])
def test_fused_and_reference_backends_agree_on_the_first_step(data, monkeypatch, bottleneck, padded):
    """The diffusion step (q_sample, fused denoiser) and the fitting step (a batch of
    networks through fused_mlp's per-sample weights): losses and gradients. A bottleneck
    wider than 64 (96: odd for the kernel, padded to 128 inside) is within fused_mlp's own
    limits, so it runs fused, without a fallback warning."""
    import warnings

    from nfd_fast.ops.fused_mlp import MAX_IN, MAX_OUT

    assert bottleneck <= min(MAX_IN, MAX_OUT)
    model = small_model(bottleneck=bottleneck)
    model.set_statistics(data)
    assert model.denoiser.down.out_features == model.denoiser.up.in_features == bottleneck
    target = torch.randn(3, 9, generator=torch.Generator().manual_seed(2))
    launches = _spy_on_forward_launches(monkeypatch)
    results = {}
    for name in ("torch", "triton"):
        model.zero_grad()
        theta = data[:3].clone().requires_grad_(True)
        with nfd_fast.use_backend(name), warnings.catch_warnings():
            warnings.simplefilter("error")  # a fallback to the reference would warn
            loss = model.loss(data[:5], generator=torch.Generator().manual_seed(5))
            fit = ((model.decode(theta, 9) - target) ** 2).mean()
            (loss + fit).backward()
        results[name] = (loss.detach(), fit.detach(), theta.grad.clone(),
                         [p.grad.clone() for p in model.denoiser.parameters()])
    # the denoiser's MLP (bottleneck -> 32 -> 32 -> bottleneck) ran in the fused kernel
    assert (padded, padded) in launches, launches
    ref, fused = results["torch"], results["triton"]
    assert rel_err(fused[0], ref[0]) < 1e-5 and rel_err(fused[1], ref[1]) < 1e-5
    assert rel_err(fused[2], ref[2]) < 1e-4
    for a, b in zip(fused[3], ref[3]):
        assert rel_err(a, b) < 1e-4


def test_generated_networks_are_finite_and_queried_at_two_resolutions(data):
    model = small_model()
    model.set_statistics(data)
    with nfd_fast.use_backend("torch"):
        theta = model.generate(3, steps=5, generator=torch.Generator().manual_seed(0))
        coarse, fine = model.decode(theta, 9), model.decode(theta, 33)
    assert theta.shape == (3, model.num_params) and torch.isfinite(theta).all()
    assert coarse.shape == (3, 9) and fine.shape == (3, 33) and torch.isfinite(fine).all()
    # linspace(-1, 1, 9) is every 4th point of linspace(-1, 1, 33): the same network there
    torch.testing.assert_close(coarse, fine[:, ::4], atol=1e-5, rtol=1e-5)
    assert nearest_mse(fine, fine).abs().max() < 1e-10


def test_bad_inputs_raise_naming_the_argument():
    model = small_model()
    theta = random_thetas(model, 2)
    with pytest.raises(ValueError, match="theta"):
        model.decode(theta[:, 1:], 8)
    with pytest.raises(ValueError, match="coords"):
        model.decode(theta, torch.zeros(8, 2))
    with pytest.raises(ValueError, match="coords"):
        model.decode(theta, torch.zeros(3, 8, 1))
    with pytest.raises(ValueError, match="signals"):
        model.fit(torch.zeros(8), steps=1)
    with pytest.raises(ValueError, match="theta"):
        model.loss(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="bottleneck"):
        ParameterDiffusion(bottleneck=0)
    with pytest.raises(ValueError, match="denoiser_width"):
        ParameterDiffusion(denoiser_width=0)
    with pytest.raises(ValueError, match="n must be"):
        model.generate(0)


def test_save_and_load_round_trip(tmp_path, data):
    model = small_model()
    model.set_statistics(data)
    path = tmp_path / "pd.pt"
    model.save(path)
    loaded = ParameterDiffusion.load(path)
    assert loaded.config == model.config
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    with nfd_fast.use_backend("torch"):
        a = model.generate(2, steps=4, generator=torch.Generator().manual_seed(1))
        b = loaded.generate(2, steps=4, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)
