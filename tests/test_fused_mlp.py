"""fused_mlp: the Triton kernels against the float64 reference, outputs and every gradient."""
import dataclasses
import functools
import math
from typing import Optional

import pytest
import torch

import nfd_fast
from nfd_fast.ops import fused_mlp
from nfd_fast.ops.fused_mlp import ACTIVATIONS

from conftest import DEVICE, KERNEL_DTYPES, ON_GPU, rel_err

# Norm-wise relative error allowed per (dtype, precision), outputs and gradients.
# float32 "ieee" is the documented default contract: within 1e-4 of float64.
TOLERANCE = {
    (torch.float32, "ieee"): 1e-4,
    (torch.float32, "tf32x3"): 1e-4,
    (torch.float32, "bf16x3"): 1e-4,
    (torch.float32, "tf32"): 1e-2 if ON_GPU else 1e-4,
    (torch.float16, None): 2e-2,
    (torch.bfloat16, None): 8e-2,
}


@dataclasses.dataclass
class Problem:
    """One random fused_mlp call: tensors and keyword options."""

    x: torch.Tensor
    weights: list
    biases: Optional[list]
    options: dict
    mods: dict

    def tensors(self) -> list:
        mods = [t for v in self.mods.values() for t in v if t is not None]
        return [self.x, *self.weights, *[b for b in self.biases or [] if b is not None], *mods]

    def call(self, cast=None):
        """fused_mlp on these inputs, optionally cast (float64 for the oracle)."""
        c = (lambda t: t) if cast is None else (lambda t: None if t is None else cast(t))
        mods = {k: [c(t) for t in v] for k, v in self.mods.items()}
        biases = None if self.biases is None else [c(b) for b in self.biases]
        return fused_mlp(c(self.x), [c(w) for w in self.weights], biases, **mods, **self.options)


def make_problem(widths, n=37, batch=None, dtype=torch.float32, per_sample_weights=False,
                 bias="shared", mods=(), per_sample_mods=True, activation="sine", w0=3.0,
                 seed=0, **options) -> Problem:
    """Random inputs (never zeros) scaled so activations are neither saturated nor tiny."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        t = (torch.rand(*shape, generator=g) * 2 - 1) * scale
        return t.to(device=DEVICE, dtype=dtype).requires_grad_()

    lead = () if batch is None else (batch,)
    wlead = lead if per_sample_weights else ()
    x = rand(*lead, n, widths[0])
    weights = [rand(*wlead, o, i, scale=math.sqrt(3.0 / i)) for i, o in zip(widths[:-1], widths[1:])]
    biases = None
    if bias != "none":
        blead = lead if bias == "per_sample" else ()
        biases = [rand(*blead, o, scale=0.5) for o in widths[1:]]
        if bias == "partial":
            biases[1] = None
    mlead = lead if per_sample_mods else ()
    mod_tensors = {}
    for kind in mods:
        base = {"scale": 1.0, "shift": 0.0, "mult": 1.0}[kind]
        entries = []
        for l, width in enumerate(widths[1:-1]):
            t = rand(*mlead, width, scale=0.5)
            t = (t.detach() + base).requires_grad_()
            entries.append(None if (l == 1 and len(widths) > 3) else t)
        mod_tensors[kind] = entries
    return Problem(x, weights, biases, dict(activation=activation, w0=w0, **options), mod_tensors)


def check_against_reference(problem: Problem, tol: float, grads: bool = True):
    """Kernel output and gradients vs the float64 reference on the same inputs."""
    with nfd_fast.use_backend("triton"):
        y = problem.call()
    with nfd_fast.use_backend("torch"):
        y_ref = problem.call(cast=lambda t: t.double())
    assert y.dtype == problem.x.dtype and y.shape == y_ref.shape
    assert torch.isfinite(y).all()
    assert rel_err(y, y_ref) < tol, f"output rel err {rel_err(y, y_ref):.2e}"
    if not grads:
        return
    grad_out = torch.rand(y.shape, generator=torch.Generator().manual_seed(7)) * 2 - 1
    inputs = problem.tensors()
    got = torch.autograd.grad(y, inputs, grad_out.to(y))
    want = torch.autograd.grad(y_ref, inputs, grad_out.to(y_ref.device, torch.float64))
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == inputs[i].dtype and a.shape == inputs[i].shape
        err = rel_err(a, b)
        assert err < tol, f"gradient of input {i} {list(inputs[i].shape)}: rel err {err:.2e}"


def tolerance(dtype, precision="ieee"):
    return TOLERANCE[(dtype, precision if dtype == torch.float32 else None)]


# ------------------------------------------------------------------------ kernel vs ref


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("final_activation", ["identity", "sine", "leaky_relu"])
def test_activations(activation, final_activation):
    p = make_problem((3, 48, 48, 5), n=37, activation=activation, final_activation=final_activation,
                     leaky_slope=0.2, leaky_gain=math.sqrt(2), w0=2.5, first_w0=7.0)
    check_against_reference(p, tolerance(torch.float32, "ieee"))


@pytest.mark.parametrize("n", [1, 37, 1000])
@pytest.mark.parametrize("widths", [(2, 48, 48, 3), (3, 100, 100, 100, 5), (1, 16, 1)])
def test_sizes_and_depths(n, widths):
    # odd and even layer counts take different paths through the kernel
    p = make_problem(widths, n=n, batch=2)
    check_against_reference(p, tolerance(torch.float32, "ieee"))


@pytest.mark.parametrize("widths", [(64, 20, 64), (2, 512, 3), (7, 40, 100, 24, 9)])
def test_width_extremes_and_unequal_hidden_widths(widths):
    p = make_problem(widths, n=19, batch=2, activation="silu")
    check_against_reference(p, tolerance(torch.float32, "ieee"))


def test_deep_network_with_mixed_activations():
    # 19 hidden layers: the per-layer activation bit-field passes 64 bits
    acts = ["sine", "relu", "gelu", "silu", "identity", "leaky_relu"] * 3 + ["sine"]
    p = make_problem((2,) + (16,) * 19 + (1,), n=21, activation=acts, w0=1.5)
    check_against_reference(p, tolerance(torch.float32, "ieee"))


def test_per_layer_activations_and_w0():
    p = make_problem((2, 32, 32, 32, 4), n=50, activation=["sine", "gelu", "sine"],
                     w0=[30.0, 1.0, 2.0])
    check_against_reference(p, tolerance(torch.float32, "ieee"))


@pytest.mark.parametrize("bias", ["none", "shared", "per_sample", "partial"])
@pytest.mark.parametrize("per_sample_weights", [False, True])
def test_weights_and_biases_layouts(bias, per_sample_weights):
    p = make_problem((2, 40, 40, 40, 3), n=33, batch=3, bias=bias,
                     per_sample_weights=per_sample_weights)
    check_against_reference(p, tolerance(torch.float32, "ieee"))


@pytest.mark.parametrize("mods", [("scale",), ("shift",), ("mult",), ("scale", "shift", "mult")])
@pytest.mark.parametrize("per_sample_mods", [True, False])
def test_modulations(mods, per_sample_mods):
    # layer 1's modulation is None: an absent entry in the middle of a list
    p = make_problem((2, 48, 48, 48, 3), n=45, batch=3, mods=mods, per_sample_mods=per_sample_mods)
    check_against_reference(p, tolerance(torch.float32, "ieee"))


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("activation", ["sine", "relu"])
def test_dtypes(dtype, activation):
    p = make_problem((2, 64, 64, 3), n=100, batch=2, dtype=dtype, activation=activation,
                     mods=("shift", "mult"))
    check_against_reference(p, tolerance(dtype))


@pytest.mark.parametrize("in_features", [1, 3, 4, 5])
def test_coordinates_first_layer_as_fmas_in_16_bit_modes(in_features):
    """in <= 4 in a 16-bit mode: the first layer runs as `in` float32 FMAs per unit (no dot
    over 16 padded columns), exact float32 as the dot: the output agrees with the fp16
    mode's emulation, and the gradients with the reference; in = 5 keeps the dot."""
    from nfd_fast.ops.fused_mlp import fused_mlp_emulated

    # (w0 = 1 past the first layer: the kernels round w0 W to float16, the emulation W)
    p = make_problem((in_features, 40, 24, 3), n=45, precision="fp16", w0=1.0,
                     first_w0=30.0, seed=in_features)
    check_against_reference(p, tolerance(torch.float16))
    with nfd_fast.use_backend("triton"), torch.no_grad():
        y = p.call()
    want = fused_mlp_emulated(p.x.detach(), [w.detach() for w in p.weights],
                              [b.detach() for b in p.biases], **p.options)
    assert rel_err(y, want.double()) < 2e-4


@pytest.mark.parametrize("precision", ["ieee", "tf32x3", "tf32", "bf16x3"])
def test_float32_precisions(precision):
    p = make_problem((2, 64, 64, 3), n=64, precision=precision)
    check_against_reference(p, tolerance(torch.float32, precision))


def _recorded_forward_launches(monkeypatch):
    """Record the forward kernel's launch keyword arguments, then launch it as usual."""
    from nfd_fast.kernels import fused_mlp as KM

    calls, real = [], KM.fused_mlp_fwd_kernel

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                calls.append(kwargs)
                return real[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(KM, "fused_mlp_fwd_kernel", Recorder())
    return calls


@pytest.mark.parametrize("widths, passes", [((2, 256, 200, 3), 2), ((3, 256, 256, 40, 5), 1),
                                            ((2, 100, 24, 3), 1)])
def test_bf16x3_against_reference_and_emulation(widths, passes, monkeypatch):
    """bf16x3: outputs, every gradient (the training forward saves z) and the Jacobian
    within its bound of float64, and the output close to the emulated split (the kernel's
    pieces are the emulation's up to float32 rounding order, which can move a piece by one
    bfloat16 unit: 2^-16 relative). 256 hidden units before a lone output layer take two
    column passes (OUT_PASSES), other shapes one; modulations, per-sample weights and an
    activated output layer go through the same split dots."""
    from nfd_fast.ops.fused_mlp import fused_mlp_emulated, fused_mlp_with_jacobian

    p = make_problem(widths, n=41, batch=2, precision="bf16x3", w0=30.0, first_w0=3.0,
                     mods=("scale", "shift"), per_sample_weights=True,
                     final_activation="sine", final_w0=2.0)
    # SIREN's init past the first layer, scaled by 1 / w0 (w0 = 30 folds into the weights)
    with torch.no_grad():
        for w in p.weights[1:]:
            w.mul_(1.0 / 30.0 * math.sqrt(2.0))
    calls = _recorded_forward_launches(monkeypatch)
    check_against_reference(p, tolerance(torch.float32, "bf16x3"))
    assert [c["OUT_PASSES"] for c in calls] == [passes]
    with nfd_fast.use_backend("triton"), torch.no_grad():
        y = p.call()
    args, mods = _arguments(p, lambda t: t.detach())
    want = fused_mlp_emulated(*args, **mods, **p.options)
    assert rel_err(y, want.double()) < 2e-5
    exact = fused_mlp_emulated(*args, **mods, **{**p.options, "precision": "ieee"})
    assert rel_err(y, exact.double()) > 1e-7  # the split's rounding is really applied
    with nfd_fast.use_backend("triton"):
        _, jac = fused_mlp_with_jacobian(*args, **mods, **p.options)
    args64, mods64 = _arguments(p, lambda t: t.detach().double())
    with nfd_fast.use_backend("torch"):
        _, jac_ref = fused_mlp_with_jacobian(*args64, **mods64, **p.options)
    assert rel_err(jac, jac_ref) < tolerance(torch.float32, "bf16x3")


def _arguments(p: Problem, cast) -> tuple:
    """((x, weights, biases), modulations) of p, each tensor cast."""
    c = lambda t: None if t is None else cast(t)  # noqa: E731
    mods = {k: [c(t) for t in v] for k, v in p.mods.items()}
    return (c(p.x), [c(w) for w in p.weights], [c(b) for b in p.biases]), mods


@pytest.mark.parametrize("final_activation", ["identity", "sine"])
def test_recompute_gives_the_same_gradients(final_activation):
    p = make_problem((2, 48, 48, 48, 3), n=37, batch=2, mods=("shift",), recompute=True,
                     final_activation=final_activation)
    check_against_reference(p, tolerance(torch.float32, "ieee"))


def test_siren_w30_float32_meets_default_contract():
    """The published SIREN setting (w0 = 30, SIREN init) at the 1e-4 contract."""
    siren = nfd_fast.nn.Siren(2, 64, 2, 3).to(DEVICE)
    x = torch.rand(300, 2, device=DEVICE) * 2 - 1
    with nfd_fast.use_backend("triton"):
        y = siren(x)
    with nfd_fast.use_backend("torch"):
        y_ref = siren.double()(x.double())
    assert rel_err(y, y_ref) < 1e-4


def test_fast_sine_error():
    """fast_sine's polynomial: documented absolute error < 4e-7 for |x| < 1e3."""
    from nfd_fast.kernels import fused_mlp as K  # noqa: F401 (kernel module must import)

    p = make_problem((2, 32, 32, 3), n=200, fast_sine=True, w0=30.0)
    check_against_reference(p, 1e-4)
    # The polynomial itself, on a one-layer identity problem: y = sin(w0 * x), w0 = 1.
    x = torch.linspace(-1000, 1000, 20011, device=DEVICE).reshape(-1, 1)
    eye = torch.ones(1, 1, device=DEVICE)
    with nfd_fast.use_backend("triton"):
        y = fused_mlp(x, [eye, eye], activation="sine", w0=1.0, fast_sine=True)
    assert (y.double() - torch.sin(x.double())).abs().max().item() < 4e-7


def test_fast_sine_is_nan_beyond_its_domain_never_wrong():
    """Past the exact range reduction (|w0 u| > 4e5) fast_sine gives NaN, not a number."""
    x = torch.tensor([[3.9e5], [-3.9e5], [4.1e5], [1e6], [-3e7], [1e10]], device=DEVICE)
    eye = torch.ones(1, 1, device=DEVICE)
    with nfd_fast.use_backend("triton"):
        y = fused_mlp(x, [eye, eye], activation="sine", w0=1.0, fast_sine=True)
    assert (y[:2].double() - torch.sin(x[:2].double())).abs().max().item() < 1e-3
    assert torch.isnan(y[2:]).all()


# --------------------------------------------------------------------- edge behaviour


@pytest.mark.skipif(not ON_GPU, reason="needs 2^23 points x 256 wide (26 GB of saved "
                    "pre-activations): a GPU-size problem, run by benchmarks/gpu_check.sh")
def test_offsets_past_2_31_on_gpu():
    """layer * M * HID_PAD passes 2^31 here (2 * 2^23 * 256 = 2^32): int64 offsets."""
    p = make_problem((2, 256, 256, 256, 1), n=2**23 + 3, w0=1.0)
    with nfd_fast.use_backend("triton"):
        y = p.call()
    with nfd_fast.use_backend("torch"):
        y_ref = p.call()
    assert rel_err(y, y_ref) < 1e-4
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, p.weights, g)
    want = torch.autograd.grad(y_ref, p.weights, g)
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-4


def test_empty_batch_returns_empty():
    p = make_problem((2, 32, 3), n=0, batch=2)
    with nfd_fast.use_backend("triton"):
        y = p.call()
    assert y.shape == (2, 0, 3)
    y.sum().backward()  # still part of the graph: parameters get (zero) gradients
    assert p.weights[0].grad is not None and not p.weights[0].grad.any()


@pytest.mark.parametrize("activation", ["sine", "relu"])
def test_nan_in_gives_nan_out(activation):
    p = make_problem((2, 32, 32, 3), n=20, activation=activation)
    x = p.x.detach().clone()
    x[5, 1] = float("nan")
    with nfd_fast.use_backend("triton"):
        y = fused_mlp(x, p.weights, p.biases, **p.options)
    assert torch.isnan(y[5]).all()
    assert torch.isfinite(torch.cat([y[:5], y[6:]])).all()


@pytest.mark.parametrize("final_activation", ["identity", "relu"])
def test_nan_weight_gives_nan_out(final_activation):
    """ReLU must not turn a NaN into 0 (tl.maximum would): a NaN weight poisons the output."""
    p = make_problem((2, 16, 3), n=9, activation="relu", final_activation=final_activation)
    weights = [w.detach().clone() for w in p.weights]
    weights[0][3, 1] = float("nan")
    with nfd_fast.use_backend("triton"):
        y = fused_mlp(p.x.detach(), weights, [b.detach() for b in p.biases], **p.options)
    assert torch.isnan(y).any()


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the interpreter's 0 * Inf
@pytest.mark.parametrize("hidden", [(5,), (16, 3)])  # padded to 16; padded after a full one
def test_inf_through_padded_hidden_units_keeps_gradient_and_jacobian_finite(hidden):
    """Padded hidden units meet an Inf coordinate as 0 * Inf = NaN: the kernels zero them
    after the activation (forward, Jacobian) and zero their dz (backward), so the linear
    map's value stays Inf and its gradient and Jacobian stay the finite W-product."""
    g = torch.Generator().manual_seed(5)
    widths = (2, *hidden, 3)
    weights = [(torch.rand(o, i, generator=g) + 0.5).to(DEVICE) for i, o in zip(widths, widths[1:])]
    x = (torch.rand(4, 2, generator=g) * 2 - 1).to(DEVICE)
    x[1, 0] = math.inf
    product = functools.reduce(torch.matmul, [w.double() for w in reversed(weights)])  # dy/dx
    with nfd_fast.use_backend("triton"):
        xg = x.clone().requires_grad_()
        y = fused_mlp(xg, weights, activation="identity")
        y.sum().backward()
        _, jac = nfd_fast.ops.fused_mlp_with_jacobian(x, weights, activation="identity")
    assert torch.isposinf(y[1]).all() and torch.isfinite(y[[0, 2, 3]]).all()
    torch.testing.assert_close(xg.grad.double(), product.sum(0).expand(4, -1), rtol=1e-5, atol=0)
    torch.testing.assert_close(jac.double(), product.expand(4, -1, -1), rtol=1e-5, atol=0)


def test_reference_gelu_limits_and_derivatives():
    """The reference's GELU: F.gelu's value and first and second derivatives at finite
    points (float64), the limits (+Inf, 0; slopes 1, 0; curvature 0) at the infinities,
    NaN for NaN, in float32 as in float64."""
    from nfd_fast.ops.fused_mlp import gelu

    finite = torch.linspace(-6, 6, 41, dtype=torch.float64, requires_grad=True)
    ours, = torch.autograd.grad(gelu(finite).sum(), finite, create_graph=True)
    theirs, = torch.autograd.grad(torch.nn.functional.gelu(finite).sum(), finite,
                                  create_graph=True)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(torch.autograd.grad(ours.sum(), finite)[0],
                               torch.autograd.grad(theirs.sum(), finite)[0])
    for dtype in (torch.float32, torch.float64):
        u = torch.tensor([math.inf, -math.inf, math.nan, 1.0], dtype=dtype, requires_grad=True)
        y = gelu(u)
        d1, = torch.autograd.grad(y.sum(), u, create_graph=True)
        d2, = torch.autograd.grad(d1.sum(), u)
        assert y[:2].tolist() == [math.inf, 0.0] and math.isnan(y[2].item())
        assert d1[:2].tolist() == [1.0, 0.0] and d2[:2].tolist() == [0.0, 0.0]


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_16_bit_weight_gradient_is_a_float32_accumulated_bmm(precision):
    """dW of the 16-bit modes: one bmm of 16-bit operands with float32 output, the call a
    GPU makes (cuBLAS, float32 accumulation); on a CPU it is the float32 sum of the exact
    16-bit products, not a 16-bit result."""
    import sys

    ops = sys.modules["nfd_fast.ops.fused_mlp"]
    g = torch.Generator().manual_seed(4)
    dz_t, h = torch.randn(2, 24, 301, generator=g), torch.randn(2, 301, 40, generator=g)
    dw = ops._weight_grad(dz_t, h, precision)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    assert dw.dtype == torch.float32
    torch.testing.assert_close(dw, dz_t.to(dtype).float() @ h.to(dtype).float(), rtol=1e-6, atol=1e-5)
    assert not torch.equal(dw, dw.to(dtype).float())  # float32, not 16-bit, precision
    with pytest.raises(RuntimeError, match="out_dtype"):
        torch.bmm(dz_t.to(dtype), h.to(dtype), out_dtype=torch.float64)


def test_unbatched_matches_batch_of_one():
    p = make_problem((3, 48, 2), n=31)
    with nfd_fast.use_backend("triton"):
        y = p.call()
        y1 = fused_mlp(p.x.unsqueeze(0), p.weights, p.biases, **p.options)
    assert y.shape == (31, 2)
    torch.testing.assert_close(y, y1[0])


def test_activation_table_is_built_once():
    """The per-layer (w0, slope, gain) table is cached: a repeated call copies nothing from
    the host (on CUDA such a copy would sync the host and break graph capture)."""
    from nfd_fast.ops._device import _constant_table

    p = make_problem((2, 32, 32, 3), n=16, w0=4.25)
    with nfd_fast.use_backend("triton"), torch.no_grad():
        p.call()
        before = _constant_table.cache_info()
        p.call()
        after = _constant_table.cache_info()
    # no table built again (the packed parameters of the first call, table included, serve)
    assert after.misses == before.misses


def test_no_grad_call_saves_nothing_and_matches():
    p = make_problem((2, 32, 32, 3), n=40)
    with nfd_fast.use_backend("triton"):
        with torch.no_grad():
            y0 = p.call()
        y1 = p.call()
    assert y0.grad_fn is None
    torch.testing.assert_close(y0, y1.detach())


# -------------------------------------------------------------------------- reference


def test_reference_gradcheck_float64():
    p = make_problem((2, 8, 8, 3), n=5, batch=2, dtype=torch.float64, mods=("scale", "shift", "mult"),
                     bias="per_sample", per_sample_weights=True, w0=2.0, final_activation="sine")
    inputs = p.tensors()

    def fn(*ts):
        # rebuild the problem from the flat tensor list gradcheck perturbs
        it = iter(ts)
        q = dataclasses.replace(p, x=next(it), weights=[next(it) for _ in p.weights],
                                biases=[next(it) for _ in p.biases])
        q.mods = {k: [None if t is None else next(it) for t in v] for k, v in p.mods.items()}
        with nfd_fast.use_backend("torch"):
            return q.call()

    assert torch.autograd.gradcheck(fn, inputs)


def test_reference_matches_plain_siren_formula():
    torch.manual_seed(0)
    x = torch.rand(10, 2, dtype=torch.float64)
    w = [torch.randn(16, 2, dtype=torch.float64), torch.randn(3, 16, dtype=torch.float64)]
    b = [torch.randn(16, dtype=torch.float64), torch.randn(3, dtype=torch.float64)]
    with nfd_fast.use_backend("torch"):
        y = fused_mlp(x, w, b, activation="sine", w0=30.0,
                      shift=[torch.full((16,), 0.25, dtype=torch.float64)])
    expected = torch.sin(30.0 * (x @ w[0].T + b[0] + 0.25)) @ w[1].T + b[1]
    torch.testing.assert_close(y, expected)


# ------------------------------------------------------------------------ bad input


def _w(*shape):
    return torch.randn(*shape, device=DEVICE)


@pytest.mark.parametrize("call, error, match", [
    (lambda: fused_mlp(_w(5), [_w(16, 5), _w(3, 16)]), ValueError, "x: expected shape"),
    (lambda: fused_mlp(_w(5, 2), [_w(16, 2)]), ValueError, "at least 2 layers"),
    (lambda: fused_mlp(_w(5, 2), [_w(16, 3), _w(3, 16)]), ValueError, r"weights\[0\]: expected shape"),
    (lambda: fused_mlp(_w(5, 2), [_w(16, 2), _w(3, 17)]), ValueError, r"weights\[1\]: expected shape"),
    (lambda: fused_mlp(_w(2, 5, 2), [_w(3, 16, 2), _w(3, 16)]), ValueError, r"weights\[0\]: expected shape \[16, 2\] or \[2, 16, 2\]"),
    (lambda: fused_mlp(_w(2, 5, 2), [_w(16, 2), _w(3, 16)], [_w(4, 16), None]), ValueError, r"biases\[0\]"),
    (lambda: fused_mlp(_w(2, 5, 2), [_w(16, 2), _w(3, 16)], [None]), ValueError, "biases: expected 2 entries"),
    (lambda: fused_mlp(_w(5, 2), [_w(16, 2), _w(3, 16).half()]), TypeError, r"weights\[1\]: dtype"),
    (lambda: fused_mlp(_w(5, 2).half(), [_w(16, 2), _w(3, 16)]), TypeError, r"weights\[0\]: dtype torch.float32 differs from x's torch.float16"),
    (lambda: fused_mlp(_w(5, 2), [_w(16, 2), _w(3, 16)], [_w(16).double(), None]), TypeError, r"biases\[0\]: dtype"),
    (lambda: fused_mlp(_w(5, 2), [_w(16, 2), _w(3, 16)], shift=_w(16)), TypeError, "shift: expected a list"),
    (lambda: fused_mlp(_w(5, 2), [_w(16, 2), _w(3, 16)], scale=[_w(17)]), ValueError, r"scale\[0\]: expected shape"),
    (lambda: fused_mlp(_w(5, 2), [_w(16, 2), _w(3, 16)], activation="tanh"), ValueError, "activation must be one of"),
    (lambda: fused_mlp(_w(5, 2), [_w(16, 2), _w(3, 16)], precision="fp8"), ValueError, "precision must be one of"),
    (lambda: fused_mlp(_w(5, 2), [_w(16, 2), _w(3, 16)], w0=[1.0, 2.0]), ValueError, "w0: expected one entry"),
    (lambda: fused_mlp(_w(5, 2).long(), [_w(16, 2), _w(3, 16)]), TypeError, "x: expected a floating-point"),
])
def test_bad_input_raises_before_launch(call, error, match):
    with nfd_fast.use_backend("triton"), pytest.raises(error, match=match):
        call()


def test_device_mismatch_raises():
    x = torch.rand(5, 2, device="meta")
    with pytest.raises(ValueError, match=r"weights\[0\]: is on cpu but x is on meta"):
        fused_mlp(x, [torch.randn(16, 2), torch.randn(3, 16)])


def test_zero_hidden_width_is_refused():
    x = torch.rand(5, 2, device=DEVICE)
    with pytest.raises(ValueError, match="hidden widths must be at least 1"):
        fused_mlp(x, [torch.rand(0, 2, device=DEVICE), torch.rand(3, 0, device=DEVICE)])
