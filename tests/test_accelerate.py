"""accelerate(): models written the ways SIREN / MLP code is commonly written get their
linear+activation runs fused; outputs, gradients and training agree; keys unchanged."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nfd_fast.accelerate import accelerate, deaccelerate

from conftest import DEVICE, rel_err
from notebook_siren import NotebookSineLayer as SineLayer


# --- SIREN reference notebook style: SineLayer(linear, omega_0), nn.Sequential, final Linear
class NotebookSiren(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(SineLayer(2, 48, True, 30.0), SineLayer(48, 48), SineLayer(48, 48),
                                 nn.Linear(48, 3))

    def forward(self, coords):
        return self.net(coords)


# --- siren-pytorch style: own weight/bias + F.linear, Sine(w0) module, ModuleList loop,
#     Dropout(0), last layer with an Identity activation
class Sine(nn.Module):
    def __init__(self, w0=1.0):
        super().__init__()
        self.w0 = w0

    def forward(self, x):
        return torch.sin(self.w0 * x)


class PkgSirenLayer(nn.Module):
    def __init__(self, i, o, w0=1.0, is_first=False, activation=None):
        super().__init__()
        w_std = (1 / i) if is_first else (math.sqrt(6 / i) / w0)
        self.weight = nn.Parameter(torch.empty(o, i).uniform_(-w_std, w_std))
        self.bias = nn.Parameter(torch.empty(o).uniform_(-w_std, w_std))
        self.activation = Sine(w0) if activation is None else activation

    def forward(self, x):
        return self.activation(F.linear(x, self.weight, self.bias))


class PkgSirenNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([PkgSirenLayer(3, 32, w0=30.0, is_first=True),
                                     PkgSirenLayer(32, 32, w0=2.0), PkgSirenLayer(32, 32, w0=2.0)])
        self.dropout = nn.Dropout(0.0)
        self.last_layer = PkgSirenLayer(32, 2, w0=2.0, activation=nn.Identity())

    def forward(self, x):
        for layer in self.layers:
            x = self.dropout(layer(x))
        return self.last_layer(x)


# --- inline z * w0 with the sine written as a method, in a custom container
class InlineSiren(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleDict({"a": nn.Linear(1, 40), "b": nn.Linear(40, 40), "c": nn.Linear(40, 1)})
        for lin in self.blocks.values():
            nn.init.uniform_(lin.weight, -0.2, 0.2)

    def forward(self, t):
        h = (self.blocks["a"](t) * 10.0).sin()
        h = torch.sin(self.blocks["b"](h))
        return self.blocks["c"](h)


def relu_gelu_silu_mlp():
    return nn.Sequential(nn.Linear(3, 64), nn.ReLU(), nn.Linear(64, 64), nn.GELU(), nn.Identity(),
                         nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 5))


class StyleGanMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.ModuleList([nn.Linear(8, 32), nn.Linear(32, 32), nn.Linear(32, 8)])

    def forward(self, x):
        x = F.leaky_relu(self.fc[0](x), 0.2) * math.sqrt(2)
        x = F.leaky_relu(self.fc[1](x), 0.2) * math.sqrt(2)
        return self.fc[2](x)


MODELS = {"notebook_siren": (NotebookSiren, 2, 1), "siren_pytorch": (PkgSirenNet, 3, 1),
          "inline_siren": (InlineSiren, 1, 1), "relu_gelu_silu": (relu_gelu_silu_mlp, 3, 1),
          "stylegan_leaky": (StyleGanMLP, 8, 1)}


@pytest.mark.parametrize("name", list(MODELS))
def test_forward_backward_and_keys_agree(name):
    make, dim, runs = MODELS[name]
    torch.manual_seed(0)
    model = make().to(DEVICE)
    reference = copy.deepcopy(model)
    keys = list(model.state_dict())
    accelerate(model, backend="triton")
    report = model.acceleration_report
    assert len(report.replaced) == runs, str(report)
    assert list(model.state_dict()) == keys
    x = torch.rand(3, 41, dim, device=DEVICE) * 2 - 1
    y, y_ref = model(x), reference(x)
    assert y.shape == y_ref.shape and rel_err(y, y_ref) < 1e-4
    g = torch.randn(y.shape, device=DEVICE)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    for (n, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        assert rel_err(p.grad, q.grad) < 1e-4, n


def test_report_names_the_run_and_w0s():
    model = accelerate(NotebookSiren(), backend="torch")
    text = str(model.acceleration_report)
    assert "net.0.linear -> net.1.linear -> net.2.linear -> net.3" in text
    assert "sine(w0=30)" in text and "final identity" in text


def test_training_continues_with_the_same_optimizer():
    torch.manual_seed(1)
    model = PkgSirenNet().to(DEVICE)
    twin = copy.deepcopy(model)
    opts = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in (model, twin)]
    x = torch.rand(64, 3, device=DEVICE) * 2 - 1
    target = torch.sin(3 * x[:, :2])

    def step(m, opt):
        loss = ((m(x) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    for _ in range(3):  # some steps before swapping: the optimizer has state
        step(model, opts[0]), step(twin, opts[1])
    accelerate(model, backend="triton")
    for _ in range(5):
        a, b = step(model, opts[0]), step(twin, opts[1])
        assert abs(a - b) <= 1e-4 * b + 1e-7


def test_runs_break_where_values_are_shared_and_unfusable_parts_stay():
    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(2, 16), nn.Linear(16, 16), nn.Linear(16, 16)
            self.d, self.big = nn.Linear(16, 3), nn.Linear(16, 100)

        def forward(self, x):
            h = torch.relu(self.a(x))
            h2 = torch.relu(self.b(h))
            out = self.d(torch.relu(self.c(h2)) + h2)  # h2 is used twice: a run ends there
            return out, self.big(h2)

    torch.manual_seed(2)
    model = Skip()
    reference = copy.deepcopy(model)
    accelerate(model, backend="triton")
    report = model.acceleration_report
    assert [r["layers"] for r in report.replaced] == [["a", "b"]]
    assert report.replaced[0]["final"] == "relu"
    assert any(name == "c" for name, _ in report.left_alone)
    x = torch.rand(9, 2)
    for got, want in zip(model(x), reference(x)):
        assert rel_err(got, want) < 1e-5


def test_wide_layers_are_left_alone_with_the_reason():
    model = accelerate(nn.Sequential(nn.Linear(600, 32), nn.ReLU(), nn.Linear(32, 2)), backend="torch")
    (name, why), = model.acceleration_report.left_alone
    assert "outside the kernel's range" in why and model.acceleration_report.replaced == []


def test_deaccelerate_and_copy():
    model = NotebookSiren()
    copy_ = accelerate(model, inplace=False)
    assert copy_ is not model and "forward" not in model.__dict__
    assert copy_.acceleration_report.replaced
    accelerate(model)
    assert "forward" in model.__dict__
    deaccelerate(model)
    assert "forward" not in model.__dict__ and not hasattr(model, "acceleration_report")


def test_data_dependent_branches_are_captured_piecewise():
    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(2, 8), nn.Linear(8, 1)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
                return self.b(torch.relu(self.a(x)))
            return self.b(self.a(x))

    torch.manual_seed(4)
    model = Dynamic()
    reference = copy.deepcopy(model)
    x = torch.rand(5, 2) + 0.1
    accelerate(model, x, backend="torch")
    report = model.acceleration_report
    assert report.mode == "dynamo" and "torch.fx could not trace" in report.notes[0]
    assert [r["layers"] for r in report.replaced] == [["a", "b"]], str(report)
    for inputs in (x, -x):  # the other branch is captured when first taken
        assert rel_err(model(inputs), reference(inputs)) < 1e-5


def test_fx_capture_follows_changed_attributes():
    """A w0 read while tracing is checked on every call: a new value traces again."""
    torch.manual_seed(5)
    model = NotebookSiren()
    reference = copy.deepcopy(model)
    accelerate(model, backend="torch")
    assert model.acceleration_report.mode == "fx"
    x = torch.rand(7, 2) * 2 - 1
    model(x)
    for m in (model, reference):
        m.net[1].omega_0 = 11.0
    assert rel_err(model(x), reference(x)) < 1e-5
    assert model.acceleration_report.captures == 2
    assert "sine(w0=11)" in str(model.acceleration_report)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="capture"):
        accelerate(NotebookSiren(), capture="jit")
    with pytest.raises(ValueError, match="backend"):
        accelerate(NotebookSiren(), backend="cuda")
    with pytest.raises(TypeError, match="example_inputs"):
        accelerate(NotebookSiren(), example_inputs=[1.0].__iter__())
    with pytest.raises(TypeError, match="example_kwargs"):
        accelerate(NotebookSiren(), example_kwargs=[("x", 1)])


# --- modulated SIRENs ------------------------------------------------------------------
class MultiplicativeSiren(nn.Module):
    """siren-pytorch's SirenWrapper pattern: x = layer(x); x *= mod (b () d)."""

    def __init__(self, per_point=False):
        super().__init__()
        self.layers = nn.ModuleList([PkgSirenLayer(2, 32, w0=30.0, is_first=True), PkgSirenLayer(32, 32, w0=2.0)])
        self.last = PkgSirenLayer(32, 3, w0=2.0, activation=nn.Identity())
        self.modulator = nn.Linear(8, 32)
        self.per_point = per_point

    def forward(self, coords, latent):
        x = coords
        for layer in self.layers:
            mod = torch.sigmoid(self.modulator(latent))
            mod = mod.unsqueeze(1) if not self.per_point else mod.unsqueeze(1) * coords[..., :1]
            x = layer(x)
            x = x * mod
        return self.last(x)


class FunctaSiren(nn.Module):
    """functa / COIN++: x = Linear(x); x = scale * x + shift; x = sin(w0 x); per sample."""

    def __init__(self, with_scale):
        super().__init__()
        self.lins = nn.ModuleList([nn.Linear(2, 32), nn.Linear(32, 32), nn.Linear(32, 1)])
        for lin in self.lins:
            nn.init.uniform_(lin.weight, -0.3, 0.3)
        self.to_mods = nn.Linear(16, 2 * 2 * 32)
        self.with_scale = with_scale

    def forward(self, coords, latent):
        mods = self.to_mods(latent).view(latent.shape[0], 2, 2, 1, 32)
        x = coords
        for i, lin in enumerate(self.lins[:-1]):
            x = lin(x)
            if self.with_scale:
                x = (1 + mods[:, 1, i]) * x
            x = x + mods[:, 0, i]
            x = torch.sin(3.0 * x)
        return self.lins[-1](x)


@pytest.mark.parametrize("make, latent_dim, kinds, kernel", [
    (lambda: MultiplicativeSiren(), 8, [["mult"], ["mult"]], True),
    (lambda: FunctaSiren(False), 16, [["shift"], ["shift"]], True),
    (lambda: FunctaSiren(True), 16, [["scale", "shift"], ["scale", "shift"]], True),
    # a per-point modulation has no [B, width] form: the same math runs in PyTorch
    (lambda: MultiplicativeSiren(per_point=True), 8, [["mult"], ["mult"]], False),
])
def test_modulation_patterns_are_fused(make, latent_dim, kinds, kernel, monkeypatch):
    import importlib

    acc = importlib.import_module("nfd_fast.accelerate_mlp")

    real_eager = acc._modulated_eager
    calls = []
    monkeypatch.setattr(acc, "_modulated_eager", lambda *a: calls.append(1) or real_eager(*a))
    torch.manual_seed(3)
    model = make().to(DEVICE)
    reference = copy.deepcopy(model)
    accelerate(model, backend="triton")
    (run,) = model.acceleration_report.replaced
    assert run["modulations"] == kinds, str(model.acceleration_report)
    coords = torch.rand(3, 37, 2, device=DEVICE) * 2 - 1
    latent = torch.randn(3, latent_dim, device=DEVICE)
    latent_ref = latent.clone().requires_grad_()
    latent.requires_grad_()
    y, y_ref = model(coords, latent), reference(coords, latent_ref)
    assert rel_err(y, y_ref) < 1e-4
    g = torch.randn(y.shape, device=DEVICE)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    assert rel_err(latent.grad, latent_ref.grad) < 1e-4
    for (n, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        assert rel_err(p.grad, q.grad) < 1e-4, n
    assert bool(calls) != kernel  # the kernel path, or the fallback, as expected
