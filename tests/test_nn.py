"""Modules: SIREN-reference checkpoints load, initialisation, fused vs reference backends."""
import math

import pytest
import torch
from torch import nn

import nfd_fast
from nfd_fast.nn import FusedMLP, ModulatedSiren, Siren

from conftest import DEVICE, rel_err
from notebook_siren import NotebookSineLayer


class NotebookSiren(nn.Module):
    def __init__(self, in_f, hidden, hidden_layers, out_f, first_omega_0=30.0, hidden_omega_0=30.0):
        super().__init__()
        net = [NotebookSineLayer(in_f, hidden, True, first_omega_0)]
        net += [NotebookSineLayer(hidden, hidden, False, hidden_omega_0) for _ in range(hidden_layers)]
        net.append(nn.Linear(hidden, out_f))
        self.net = nn.Sequential(*net)

    def forward(self, coords):
        return self.net(coords), coords


def test_siren_loads_reference_notebook_state_dict_and_agrees():
    torch.manual_seed(0)
    ref = NotebookSiren(2, 48, 3, 3).to(DEVICE)
    siren = Siren(2, 48, 3, 3).to(DEVICE)
    assert list(siren.state_dict()) == list(ref.state_dict())
    siren.load_state_dict(ref.state_dict())
    x = torch.rand(333, 2, device=DEVICE) * 2 - 1
    with nfd_fast.use_backend("triton"):
        y = siren(x)
    y_ref = ref.double()(x.double())[0]
    assert rel_err(y, y_ref) < 1e-4


def test_siren_initialisation_bounds():
    torch.manual_seed(0)
    s = Siren(3, 256, 2, 1, first_omega_0=30.0, hidden_omega_0=20.0)
    lin = s.linears()
    assert lin[0].weight.abs().max() <= 1 / 3 and lin[0].weight.abs().max() > 0.3
    for l in lin[1:]:
        bound = math.sqrt(6 / 256) / 20.0
        assert l.weight.abs().max() <= bound and l.weight.abs().max() > 0.95 * bound
    # biases keep nn.Linear's default U(+-1/sqrt(in))
    assert lin[1].bias.abs().max() <= 1 / 16 and lin[1].bias.abs().max() > 0.05


@pytest.mark.parametrize("outermost_linear", [True, False])
def test_siren_backends_agree_with_gradients(outermost_linear):
    torch.manual_seed(1)
    s = Siren(2, 40, 2, 3, outermost_linear=outermost_linear, first_omega_0=10.0,
              hidden_omega_0=5.0).to(DEVICE)
    x = torch.rand(2, 57, 2, device=DEVICE) * 2 - 1
    results = {}
    for be in ("triton", "torch"):
        s.zero_grad()
        with nfd_fast.use_backend(be):
            y = s(x)
        (y * torch.linspace(-1, 1, y.numel(), device=DEVICE).view_as(y)).sum().backward()
        results[be] = (y.detach(), [p.grad.clone() for p in s.parameters()])
    assert rel_err(results["triton"][0], results["torch"][0]) < 1e-4
    for a, b in zip(results["triton"][1], results["torch"][1]):
        assert rel_err(a, b) < 1e-4


@pytest.mark.parametrize("modulate_scale", [False, True])
def test_modulated_siren_matches_explicit_film(modulate_scale):
    torch.manual_seed(2)
    m = ModulatedSiren(2, 32, 2, 3, latent_dim=8, modulate_scale=modulate_scale,
                       first_omega_0=10.0, hidden_omega_0=5.0).to(DEVICE)
    nn.init.normal_(m.modulation.bias, std=0.1)
    coords = torch.rand(3, 29, 2, device=DEVICE) * 2 - 1
    latent = torch.randn(3, 8, device=DEVICE)
    with nfd_fast.use_backend("triton"):
        y = m(coords, latent)
    # explicit functa formula: x = Linear(x); x = scale * x + shift; x = sin(w0 x)
    mods = m.modulation(latent).double().view(3, 1 + modulate_scale, 3, 32)
    h = coords.double()
    for l, lin in enumerate(m.siren.linears()[:-1]):
        z = h @ lin.weight.double().T + lin.bias.double()
        if modulate_scale:
            z = z * (1 + mods[:, 1, l, None])
        z = z + mods[:, 0, l, None]
        h = torch.sin(m.siren.net[l].omega_0 * z)
    last = m.siren.linears()[-1]
    expected = h @ last.weight.double().T + last.bias.double()
    assert rel_err(y, expected) < 1e-4
    latent.requires_grad_()
    with nfd_fast.use_backend("triton"):
        g = torch.autograd.grad(m(coords, latent).sum(), latent)[0]
    with nfd_fast.use_backend("torch"):
        g_ref = torch.autograd.grad(m(coords, latent).sum(), latent)[0]
    assert rel_err(g, g_ref) < 1e-4


def test_modulated_siren_zero_latent_is_plain_siren():
    m = ModulatedSiren(2, 32, 1, 3, latent_dim=4).to(DEVICE)
    coords = torch.rand(2, 10, 2, device=DEVICE)
    with nfd_fast.use_backend("torch"):
        torch.testing.assert_close(m(coords, torch.zeros(2, 4, device=DEVICE)), m.siren(coords))
    with pytest.raises(ValueError, match="coords: expected"):
        m(coords[0], torch.zeros(2, 4, device=DEVICE))


def test_fused_mlp_module_matches_nn_sequential():
    torch.manual_seed(3)
    f = FusedMLP(3, [32, 20], 4, activation=["leaky_relu", "gelu"], leaky_slope=0.2,
                 leaky_gain=math.sqrt(2)).to(DEVICE)
    seq = nn.Sequential(f.layers[0], nn.LeakyReLU(0.2), nn.Identity(), f.layers[1], nn.GELU(),
                        f.layers[2])
    x = torch.rand(41, 3, device=DEVICE)
    with nfd_fast.use_backend("triton"):
        y = f(x)
    h = seq[0](x)
    h = math.sqrt(2) * seq[1](h)
    expected = seq[5](seq[4](seq[3](h)))
    assert rel_err(y, expected) < 1e-5
    assert list(f.state_dict()) == ["layers.0.weight", "layers.0.bias", "layers.1.weight",
                                    "layers.1.bias", "layers.2.weight", "layers.2.bias"]


def test_fused_mlp_module_validates_config():
    with pytest.raises(ValueError, match="activation: expected 2 entries"):
        FusedMLP(2, [16, 16], 1, activation=["relu"])
    with pytest.raises(ValueError, match="activation must be one of"):
        FusedMLP(2, 16, 1, activation="tanh")


def test_siren_training_converges_and_backends_agree():
    """A short fit of a 1-D signal: the loss falls, and both backends follow one path."""
    x = torch.linspace(-1, 1, 128, device=DEVICE).unsqueeze(-1)
    target = torch.sin(6 * x) + 0.5 * torch.cos(15 * x)
    losses = {}
    for be in ("triton", "torch"):
        torch.manual_seed(4)
        s = Siren(1, 32, 1, 1, first_omega_0=10.0).to(DEVICE)
        opt = torch.optim.Adam(s.parameters(), lr=1e-3)
        curve = []
        with nfd_fast.use_backend(be):
            for _ in range(60):
                loss = ((s(x) - target) ** 2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                curve.append(loss.item())
        losses[be] = curve
    assert losses["triton"][-1] < 0.1 * losses["triton"][0]
    for a, b in zip(losses["triton"], losses["torch"]):
        assert abs(a - b) <= 1e-3 * b + 1e-6
