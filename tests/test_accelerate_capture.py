"""accelerate() on SIREN code torch.fx cannot trace (einops, optional and keyword-only
modulation arguments, exists() helpers, loops with conditionals): captured by dynamo,
every sine fused, outputs / gradients / training unchanged, guards re-capture."""
import copy
import importlib
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange  # a test dependency: the code under test is einops code
from torch import nn

from nfd_fast.accelerate import accelerate, deaccelerate

from conftest import DEVICE, rel_err


class HotPathCounter:
    """Counts eager torch.sin / Tensor.sin / F.grid_sample calls made outside nfd_fast's
    op layer (whose reference backend computes them itself), by a profile hook: patching
    the functions would make dynamo capture again."""

    def __init__(self):
        self.counts = {"sin": 0, "grid_sample": 0}

    def __enter__(self):
        self._previous = sys.getprofile()
        sys.setprofile(self._event)
        return self

    def __exit__(self, *exc):
        sys.setprofile(self._previous)

    def _event(self, frame, event, arg):
        if event == "c_call" and getattr(arg, "__name__", None) == "sin" and (
                arg is torch.sin or isinstance(getattr(arg, "__self__", None), torch.Tensor)):
            key, caller = "sin", frame
        elif event == "call" and frame.f_code is F.grid_sample.__code__:
            key, caller = "grid_sample", frame.f_back
        else:
            return
        if not caller.f_globals.get("__name__", "").startswith("nfd_fast.ops"):
            self.counts[key] += 1


def assert_same_model(model, reference, call, inputs_needing_grad=()):
    """Outputs and gradients (parameters and the given inputs) agree; parameters and
    state_dict keys are untouched."""
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in reference.named_parameters()]
    assert list(model.state_dict()) == list(reference.state_dict())
    y, y_ref = call(model), call(reference)
    assert y.shape == y_ref.shape and rel_err(y, y_ref) < 1e-4
    grads = [t for t in inputs_needing_grad]
    g = torch.randn(y.shape, device=y.device)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    for (n, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        if q.grad is not None:
            assert p.grad is not None and rel_err(p.grad, q.grad) < 1e-4, n
    for a, b in grads:
        assert rel_err(a.grad, b.grad) < 1e-4


def assert_same_training(model, reference, loss_of, steps=3):
    """A few SGD steps from the same state give the same parameters."""
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (model, reference)]
    for _ in range(steps):
        for m, opt in zip((model, reference), opts):
            opt.zero_grad()
            loss_of(m).backward()
            opt.step()
    for (n, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        assert rel_err(p, q) < 1e-4, n


# --- siren-pytorch style: cast_tuple / exists helpers, own weights + F.linear, Sine(w0),
#     `x *= rearrange(mod, 'b d -> b () d')` behind `if exists(mod)`, einops on the input
def exists(val):
    return val is not None


def cast_tuple(val, repeat=1):
    return val if isinstance(val, tuple) else ((val,) * repeat)


class Sine(nn.Module):
    def __init__(self, w0=1.0):
        super().__init__()
        self.w0 = w0

    def forward(self, x):
        return torch.sin(self.w0 * x)


class Siren(nn.Module):
    def __init__(self, dim_in, dim_out, w0=1.0, c=6.0, is_first=False, use_bias=True, activation=None):
        super().__init__()
        self.dim_in, self.is_first = dim_in, is_first
        weight = torch.zeros(dim_out, dim_in)
        bias = torch.zeros(dim_out) if use_bias else None
        w_std = (1 / dim_in) if self.is_first else (math.sqrt(c / dim_in) / w0)
        weight.uniform_(-w_std, w_std)
        if exists(bias):
            bias.uniform_(-w_std, w_std)
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias) if use_bias else None
        self.activation = Sine(w0) if activation is None else activation

    def forward(self, x):
        out = F.linear(x, self.weight, self.bias)
        return self.activation(out)


class SirenNet(nn.Module):
    def __init__(self, dim_in, dim_hidden, dim_out, num_layers, w0=1.0, w0_initial=30.0, dropout=0.0):
        super().__init__()
        self.num_layers, self.dim_hidden = num_layers, dim_hidden
        self.layers = nn.ModuleList([])
        for ind in range(num_layers):
            is_first = ind == 0
            self.layers.append(Siren(dim_in=dim_in if is_first else dim_hidden, dim_out=dim_hidden,
                                     w0=w0_initial if is_first else w0, is_first=is_first))
        self.dropout = nn.Dropout(dropout)
        self.last_layer = Siren(dim_in=dim_hidden, dim_out=dim_out, w0=w0, activation=nn.Identity())

    def forward(self, x, mods=None):
        if x.dim() == 4:  # an image of coordinates: b h w c
            h, w = x.shape[1:3]
            x = rearrange(x, "b h w c -> b (h w) c")
        else:
            h = None
        mods = cast_tuple(mods, self.num_layers)
        for layer, mod in zip(self.layers, mods):
            x = layer(x)
            if exists(mod):
                x *= rearrange(mod, "b d -> b () d")
            x = self.dropout(x)
        out = self.last_layer(x)
        if exists(h):
            out = rearrange(out, "b (h w) c -> b c h w", h=h)
        return out


class Modulator(nn.Module):
    """siren-pytorch's modulator: the latent, concatenated to each hidden, through Linear+ReLU."""

    def __init__(self, dim_in, dim_hidden, num_layers):
        super().__init__()
        self.layers = nn.ModuleList([])
        for ind in range(num_layers):
            dim = dim_in if ind == 0 else (dim_hidden + dim_in)
            self.layers.append(nn.Sequential(nn.Linear(dim, dim_hidden), nn.ReLU()))

    def forward(self, z):
        x, hiddens = z, []
        for layer in self.layers:
            x = layer(x)
            hiddens.append(x)
            x = torch.cat((x, z), dim=-1)
        return tuple(hiddens)


class SirenWrapper(nn.Module):
    """A modulated SIREN driven by a per-sample latent, keyword-only as in siren-pytorch."""

    def __init__(self, net, latent_dim=None):
        super().__init__()
        self.net = net
        self.modulator = Modulator(latent_dim, net.dim_hidden, net.num_layers) if exists(latent_dim) else None

    def forward(self, coords, *, latent=None):
        modulate = exists(self.modulator)
        assert not (modulate ^ exists(latent)), "latent vector must be only supplied if `latent_dim` was passed in"
        mods = self.modulator(latent) if modulate else None
        return self.net(coords, mods)


class FunctaSiren(nn.Module):
    """functa-style: latent -> Linear -> per-layer shifts and scales (FiLM), keyword-only."""

    def __init__(self, dim_in=2, width=24, depth=3, dim_out=3, latent_dim=10, w0=30.0):
        super().__init__()
        self.depth, self.width, self.w0 = depth, width, w0
        self.linears = nn.ModuleList([nn.Linear(dim_in if i == 0 else width, width) for i in range(depth)])
        self.out = nn.Linear(width, dim_out)
        for i, lin in enumerate(self.linears):
            bound = 1 / dim_in if i == 0 else math.sqrt(6 / width) / w0
            nn.init.uniform_(lin.weight, -bound, bound)
        self.latent_to_modulation = nn.Linear(latent_dim, 2 * depth * width)

    def forward(self, coords, *, latent, use_scale=True):
        mods = rearrange(self.latent_to_modulation(latent), "b (t l d) -> t l b () d", t=2, l=self.depth)
        h = coords
        for i, lin in enumerate(self.linears):
            h = lin(h)
            if use_scale:
                h = h * (1.0 + mods[1, i])
            h = torch.sin(self.w0 * (h + mods[0, i]))
        return self.out(h)


def _siren_net():
    return SirenNet(dim_in=2, dim_hidden=24, dim_out=3, num_layers=3, w0=2.0)


def test_einops_siren_with_optional_modulation():
    torch.manual_seed(0)
    model = _siren_net().to(DEVICE)
    reference = copy.deepcopy(model)
    coords = torch.rand(2, 5, 7, 2, device=DEVICE) * 2 - 1
    mods = tuple(torch.rand(2, 24, device=DEVICE) + 0.5 for _ in range(3))
    accelerate(model, (coords,), backend="torch")
    report = model.acceleration_report
    assert report.mode == "dynamo" and "mods" in report.notes[0]
    (run,) = report.replaced
    assert run["layers"] == ["layers.0", "layers.1", "layers.2", "last_layer"]
    assert run["activations"] == ["sine"] * 3 and run["w0"] == [30.0, 2.0, 2.0]
    assert_same_model(model, reference, lambda m: m(coords))
    # the modulated case is another capture (dynamo guards on which arguments are None)
    assert_same_model(model, reference, lambda m: m(coords, mods))
    assert any(r["modulations"] == [["mult"]] * 3 for r in model.acceleration_report.replaced)
    with HotPathCounter() as counter:
        model(coords)
        model(coords, mods)
    assert counter.counts["sin"] == 0
    with HotPathCounter() as counter:  # the check itself sees eager sines
        reference(coords)
    assert counter.counts["sin"] == 3
    target = torch.rand(2, 3, 5, 7, device=DEVICE)
    assert_same_training(model, reference, lambda m: ((m(coords, mods) - target) ** 2).mean())


@pytest.mark.parametrize("style", ["siren_wrapper", "functa"])
def test_latent_modulated_sirens_are_fused_per_sample(style, monkeypatch):
    mlp = importlib.import_module("nfd_fast.accelerate_mlp")
    eager = []
    real = mlp._modulated_eager
    monkeypatch.setattr(mlp, "_modulated_eager", lambda *a: eager.append(1) or real(*a))
    torch.manual_seed(1)
    if style == "siren_wrapper":
        model, latent_dim, kinds = SirenWrapper(_siren_net(), latent_dim=6), 6, ["mult"]
    else:
        model, latent_dim, kinds = FunctaSiren(latent_dim=6), 6, ["scale", "shift"]
    model = model.to(DEVICE)
    reference = copy.deepcopy(model)
    coords = torch.rand(3, 11, 2, device=DEVICE) * 2 - 1
    latent = torch.randn(3, latent_dim, device=DEVICE)
    accelerate(model, (coords,), example_kwargs={"latent": latent}, backend="torch")
    report = model.acceleration_report
    runs = [r for r in report.replaced if "sine" in r["activations"]]
    assert len(runs) == 1 and all(sorted(m) == kinds for m in runs[0]["modulations"]), str(report)
    latents = [latent.clone().requires_grad_() for _ in range(2)]
    assert_same_model(model, reference, lambda m: m(coords, latent=latents[m is reference]),
                      [(latents[0], latents[1])])
    with HotPathCounter() as counter:
        model(coords, latent=latent)
    assert counter.counts["sin"] == 0 and not eager  # the kernel's [B, width] modulations
    targets = torch.rand(3, 11, 3, device=DEVICE)
    captures = model.acceleration_report.captures
    assert_same_training(model, reference, lambda m: ((m(coords, latent=latent) - targets) ** 2).mean())
    assert model.acceleration_report.captures == captures  # training reuses the capture


def test_changed_w0_and_flags_capture_again():
    """Values read while capturing are guarded: a change re-captures, never runs stale."""
    torch.manual_seed(2)
    model = FunctaSiren(latent_dim=4).to(DEVICE)
    reference = copy.deepcopy(model)
    coords = torch.rand(2, 9, 2, device=DEVICE) * 2 - 1
    latent = torch.randn(2, 4, device=DEVICE)
    accelerate(model, coords, example_kwargs={"latent": latent}, backend="torch")
    for m in (model, reference):
        m.w0 = 7.5
    assert rel_err(model(coords, latent=latent), reference(coords, latent=latent)) < 1e-5
    assert "sine(w0=7.5)" in str(model.acceleration_report)
    without = model(coords, latent=latent, use_scale=False)
    assert rel_err(without, reference(coords, latent=latent, use_scale=False)) < 1e-5
    assert model.acceleration_report.captures == 3
    assert any(r["modulations"] == [["shift"]] * 3 for r in model.acceleration_report.replaced)


def test_capture_on_first_call_and_report_says_so():
    torch.manual_seed(3)
    model = accelerate(SirenWrapper(_siren_net(), latent_dim=5), backend="torch")
    assert "captured on its first call" in str(model.acceleration_report)
    assert model.acceleration_report.replaced == []
    model(torch.rand(2, 4, 2) * 2 - 1, latent=torch.randn(2, 5))
    assert "captured on its first call" not in str(model.acceleration_report)
    assert model.acceleration_report.replaced
    deaccelerate(model)
    assert "forward" not in model.__dict__ and not hasattr(model, "acceleration_report")


def test_kernel_backend_on_the_captured_graph():
    """The same capture with the Triton kernels (interpreter on CPU)."""
    torch.manual_seed(4)
    model = SirenWrapper(SirenNet(dim_in=2, dim_hidden=16, dim_out=2, num_layers=2, w0=2.0),
                         latent_dim=3).to(DEVICE)
    reference = copy.deepcopy(model)
    coords = torch.rand(2, 6, 2, device=DEVICE) * 2 - 1
    latent = torch.randn(2, 3, device=DEVICE)
    accelerate(model, coords, example_kwargs={"latent": latent}, backend="triton")
    assert_same_model(model, reference, lambda m: m(coords, latent=latent))
    with HotPathCounter() as counter:
        model(coords, latent=latent)
    assert counter.counts["sin"] == 0
