"""fused_mlp's precision modes: the default follows torch.get_float32_matmul_precision(),
the first layer runs in float32 in every mode, and each mode's error (the reference with
its operand rounding emulated) stays within its documented bound."""
import math
import os
import subprocess
import sys

import pytest
import torch

import nfd_fast
from nfd_fast.kernels import fused_mlp as KM
from nfd_fast.ops import fused_mlp
from nfd_fast.ops.fused_mlp import default_precision

from conftest import DEVICE


@pytest.fixture
def matmul_precision():
    """Set torch's float32 matmul precision for one test, restored after."""
    before = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(before)


def _recorded_launches(monkeypatch):
    """Record the forward kernel's launch constexprs instead of running it."""
    calls = []

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                calls.append(kwargs)
            return launch

    monkeypatch.setattr(KM, "fused_mlp_fwd_kernel", Recorder())
    return calls


@pytest.mark.parametrize("mode, expected", [("highest", "tf32x3"), ("high", "tf32"),
                                            ("medium", "bf16")])
def test_default_precision_follows_torch_float32_matmul_precision(mode, expected,
                                                                 matmul_precision, monkeypatch):
    matmul_precision(mode)
    assert default_precision(torch.float32) == expected
    # half-precision parameters keep their dtype's mode whatever the switch says
    assert default_precision(torch.float16) == "fp16"
    assert default_precision(torch.bfloat16) == "bf16"
    calls = _recorded_launches(monkeypatch)
    x = torch.rand(9, 2, device=DEVICE)
    weights = [torch.randn(16, 2, device=DEVICE), torch.randn(3, 16, device=DEVICE)]
    with nfd_fast.use_backend("triton"), torch.no_grad():
        fused_mlp(x, weights)
        fused_mlp(x, weights, precision="ieee")  # an explicit precision overrides
    dot = {"tf32x3": (KM.DOT_FP32.value, "tf32x3"), "tf32": (KM.DOT_FP32.value, "tf32"),
           "bf16": (KM.DOT_BF16.value, "ieee")}[expected]
    assert (calls[0]["DOT_KIND"], calls[0]["PRECISION"]) == dot
    assert (calls[1]["DOT_KIND"], calls[1]["PRECISION"]) == (KM.DOT_FP32.value, "ieee")


def test_default_precision_compiles_fullgraph(matmul_precision):
    """Reading torch's switch in the wrapper leaves the graph whole; flipping TF32 off and
    on recompiles (dynamo's global-state guard) and the results follow the mode."""
    siren = nfd_fast.nn.Siren(2, 16, 1, 3).to(DEVICE)
    x = torch.rand(11, 2, device=DEVICE) * 2 - 1
    with nfd_fast.use_backend("triton"):
        explanation = torch._dynamo.explain(siren)(x)
        assert explanation.graph_break_count == 0
        compiled = torch.compile(siren, fullgraph=True, backend="aot_eager")
        for mode in ("highest", "high"):
            matmul_precision(mode)
            torch.testing.assert_close(compiled(x), siren(x))


def test_first_layer_runs_in_float32_in_every_mode():
    """float32 coordinates with fine detail (w0 = 200) in a 16-bit mode: rounding x or W_0
    to float16 before the first dot would move sin(w0 (W_0 x)) by ~w0 * 2^-11 ~ 0.1."""
    g = torch.Generator().manual_seed(3)
    x = torch.rand(64, 3, generator=g) * 2 - 1
    w_first = torch.rand(32, 3, generator=g) * 2 - 1
    w_out = torch.eye(32)[:5]  # exact in float16: y is h's first five units
    with nfd_fast.use_backend("triton"), torch.no_grad():
        y = fused_mlp(x.to(DEVICE), [w_first.to(DEVICE), w_out.to(DEVICE)], w0=200.0,
                      precision="fp16")
    exact = torch.sin(200.0 * (x.double() @ w_first.double().T))[:, :5]
    # only h's float16 rounding before the second dot remains: |error| <= 2^-11
    assert (y.double().cpu() - exact).abs().max().item() < 2 ** -10


# ------------------------------------------------------------------ emulated precision


def _tf32_by_hand(v: float) -> float:
    """v rounded to 11 significant bits, ties away from zero (independent of the code)."""
    if v == 0 or not math.isfinite(v):
        return v
    m, e = math.frexp(abs(v))  # |v| = m 2^e, m in [0.5, 1)
    q = math.floor(m * 2 ** 11 + 0.5) / 2 ** 11
    return math.copysign(math.ldexp(q, e), v)


def test_round_to_tf32_is_round_to_nearest_ties_away():
    from nfd_fast.ops.fused_mlp import round_to_tf32

    ulp = 2.0 ** -10
    special = torch.tensor([1 + ulp / 2, 1 + ulp / 4, 1 + 3 * ulp / 4, -(1 + ulp / 2),
                            float("inf"), -float("inf"), float("nan"), 0.0, 3.4e38])
    got = round_to_tf32(special)
    assert got[:4].tolist() == [1 + ulp, 1.0, 1 + ulp, -(1 + ulp)]
    assert got[4:6].tolist() == [float("inf"), -float("inf")] and torch.isnan(got[6])
    assert got[7] == 0 and got[8].item() == _tf32_by_hand(float(special[8]))
    values = torch.randn(2000, generator=torch.Generator().manual_seed(1)) * 100
    want = torch.tensor([_tf32_by_hand(v) for v in values.tolist()])
    assert torch.equal(round_to_tf32(values), want)


# Documented bounds (README, Precision) of each mode's relative error vs float64.
BOUNDS = {("float32", "ieee"): 1e-4, ("float32", "tf32x3"): 1e-4, ("float32", "bf16x3"): 1e-4,
          ("float32", "tf32"): 2e-3,
          ("float32", "fp16"): 2e-3, ("float32", "bf16"): 2e-2, ("float16", "fp16"): 2e-2,
          ("bfloat16", "bf16"): 8e-2}


@pytest.mark.parametrize("dtype, precision", list(BOUNDS))
def test_emulated_error_of_every_precision_within_its_bound(dtype, precision):
    """A SIREN at w0 = 30 (SIREN init): each mode's emulated error within its bound, and a
    rounding mode measurably worse than float32 (so the rounding is really applied)."""
    from nfd_fast.ops.fused_mlp import fused_mlp_emulated

    torch.manual_seed(0)
    siren = nfd_fast.nn.Siren(2, 96, 2, 3)
    x = torch.rand(300, 2) * 2 - 1
    with nfd_fast.use_backend("torch"), torch.no_grad():
        y_ref = siren.double()(x.double())
    args = siren.float().fused_mlp_arguments()
    cast = getattr(torch, dtype)
    args.update(weights=[w.detach().to(cast) for w in args["weights"]],
                biases=[b.detach().to(cast) for b in args["biases"]], precision=precision)
    y = fused_mlp_emulated(x.to(cast), **args)
    err = ((y.double() - y_ref).norm() / y_ref.norm()).item()
    assert y.dtype == cast and err < BOUNDS[(dtype, precision)]
    if precision in ("ieee", "tf32x3"):
        assert err < 1e-5
    elif precision == "bf16x3":  # 16 significant bits: between float32 and the one-pass modes
        assert 2e-6 < err < 2e-5
    else:
        assert err > 1e-5


def test_tf32x3_emulation_is_the_three_product_split():
    """tf32x3 = a_lo b_hi + a_hi b_lo + a_hi b_hi: far closer than one TF32 product, and
    not exact (the tail x tail product is dropped)."""
    from nfd_fast.ops.fused_mlp import emulated_matmul

    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(64, 96, generator=g), torch.randn(96, 40, generator=g)
    exact = a.double() @ b.double()

    def err(c):
        return ((c.double() - exact).norm() / exact.norm()).item()

    assert err(emulated_matmul(a, b, "tf32")) > 1e-4
    assert err(emulated_matmul(a, b, "tf32x3")) < 1e-6
    assert err(emulated_matmul(a, b, "bf16")) > 1e-3
    assert err(emulated_matmul(a, b, "fp16")) > 1e-4


def test_each_mode_runs_its_sine(monkeypatch):
    """fp16 / bf16 / bf16x3 run the hardware sine after the range reduction; the float32
    modes keep libdevice's sinf, or the polynomial with fast_sine=True."""
    calls = _recorded_launches(monkeypatch)
    x = torch.rand(9, 2, device=DEVICE)
    weights = [torch.randn(16, 2, device=DEVICE), torch.randn(3, 16, device=DEVICE)]
    with nfd_fast.use_backend("triton"), torch.no_grad():
        for precision in ("fp16", "bf16", "bf16x3", "ieee", "tf32x3", "tf32"):
            fused_mlp(x, weights, precision=precision)
        fused_mlp(x, weights, precision="tf32x3", fast_sine=True)
        fused_mlp(x, weights, precision="bf16", fast_sine=True)
    kinds = [c["SINE_KIND"] for c in calls]
    mufu, poly, libdevice = KM.MUFU_SINE.value, KM.POLYNOMIAL_SINE.value, KM.LIBDEVICE_SINE.value
    assert kinds == [mufu, mufu, mufu, libdevice, libdevice, libdevice, poly, mufu]
    assert calls[2]["DOT_KIND"] == KM.DOT_BF16X3.value


def test_split_bf16_pieces():
    """split_bf16: two bfloat16 pieces, to nearest (even), hi + mid within 2^-16 of t and
    far closer than hi alone; an infinite value keeps mid = 0; NaN stays NaN."""
    from nfd_fast.ops.fused_mlp import split_bf16

    t = torch.randn(4000, generator=torch.Generator().manual_seed(5)) * 1e3
    hi, mid = split_bf16(t)
    assert hi.dtype == mid.dtype == torch.bfloat16
    rest = (t.double() - hi.double() - mid.double()).abs()
    assert (rest <= 2.0 ** -16 * t.double().abs()).all()
    assert (mid.double().abs() <= 2.0 ** -8 * t.double().abs()).all()
    assert rest.max() < 2.0 ** -7 * (t.double() - hi.double()).abs().max()
    # to nearest: no other bfloat16 value is closer to t than hi
    up = torch.nextafter(hi, torch.full_like(hi, math.inf)).double()
    down = torch.nextafter(hi, torch.full_like(hi, -math.inf)).double()
    err = (t.double() - hi.double()).abs()
    assert (err <= (t.double() - up).abs()).all() and (err <= (t.double() - down).abs()).all()
    special = split_bf16(torch.tensor([math.inf, -math.inf, math.nan, 3.4e38]))
    assert special[0][:2].float().tolist() == [math.inf, -math.inf]
    assert special[1][:2].float().tolist() == [0.0, 0.0] and torch.isnan(special[0][2])


def test_bf16x3_emulation_is_the_three_product_split():
    """bf16x3 = a_mid b_hi + a_hi b_mid + a_hi b_hi of the bfloat16 pieces: about 2^-16
    relative, coarser than tf32x3 and far finer than one bfloat16 product, not exact."""
    from nfd_fast.ops.fused_mlp import emulated_matmul, split_bf16

    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(64, 96, generator=g), torch.randn(96, 40, generator=g)
    exact = a.double() @ b.double()

    def err(c):
        return ((c.double() - exact).norm() / exact.norm()).item()

    assert 1e-7 < err(emulated_matmul(a, b, "bf16x3")) < 2.0 ** -15
    assert err(emulated_matmul(a, b, "bf16")) > 100 * err(emulated_matmul(a, b, "bf16x3"))
    (a_hi, a_mid), (b_hi, b_mid) = split_bf16(a), split_bf16(b)
    pieces = a_mid.double() @ b_hi.double() + a_hi.double() @ b_mid.double() + \
        a_hi.double() @ b_hi.double()
    assert (emulated_matmul(a, b, "bf16x3").double() - pieces).abs().max() < 1e-5


def test_16_bit_modes_sine_is_nan_past_the_range_reduction():
    """The 16-bit modes' sine: NaN past |w0 u| = 4e5 (where 16-bit operands have long
    lost the phase), a close sine inside; the float32 modes keep sinf there."""
    x = torch.tensor([[0.3], [500.0]], device=DEVICE)
    eye = torch.ones(1, 1, device=DEVICE)
    with nfd_fast.use_backend("triton"), torch.no_grad():
        y = fused_mlp(x, [eye, eye], activation="sine", w0=1000.0, precision="fp16")
        # (h is rounded to float16 before the output layer: 2^-11)
        assert abs(y[0].item() - math.sin(300.0)) < 1e-3 and torch.isnan(y[1]).all()
        for precision in ("ieee", "tf32x3", "tf32"):
            y = fused_mlp(x, [eye, eye], activation="sine", w0=1000.0, precision=precision)
            assert abs(y[1].item() - math.sin(5e5)) < 1e-2


def test_mufu_sine_emulation_sits_at_its_error_bound():
    """mufu_sine: the kernels' reduction, then the sine off by MUFU_SINE_ERROR (both
    signs occur); NaN past the reduction's bound and for NaN or Inf."""
    from nfd_fast.ops.fused_mlp import MUFU_SINE_ERROR, mufu_sine

    t = torch.linspace(-1e3, 1e3, 100_003)
    err = mufu_sine(t).double() - torch.sin(t.double())
    # the reduced argument carries float32 rounding of t (|t| 2^-24) on top of the bound
    assert (err.abs() - MUFU_SINE_ERROR).abs().max().item() < 1e3 * 2**-23
    assert (err > 0).any() and (err < 0).any()
    special = mufu_sine(torch.tensor([3.9e5, 4.1e5, -1e9, math.nan, math.inf, -math.inf]))
    assert torch.isfinite(special[0]) and torch.isnan(special[1:]).all()


def test_emulated_16_bit_modes_include_the_hardware_sine_error():
    """The emulated 16-bit modes apply mufu_sine (a SIREN's output moves by about the
    sine's error, far below the operand rounding); the float32 modes keep torch.sin."""
    from nfd_fast.ops.fused_mlp import fused_mlp_emulated

    ops = sys.modules["nfd_fast.ops.fused_mlp"]  # (nfd_fast.ops.fused_mlp is the function)
    torch.manual_seed(1)
    siren = nfd_fast.nn.Siren(2, 32, 1, 1)
    x = torch.rand(50, 2) * 2 - 1
    args = siren.fused_mlp_arguments()
    exact = fused_mlp_emulated(x, **{**args, "precision": "ieee"})
    used = []
    real = ops.mufu_sine

    def spy(t):
        used.append(True)
        return real(t)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(ops, "mufu_sine", spy)
        fused_mlp_emulated(x, **{**args, "precision": "ieee"})
        assert not used
        y = fused_mlp_emulated(x, **{**args, "precision": "fp16"})
    assert used and not torch.equal(y, exact)


_MUFU_PROBE = """
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from nfd_fast.kernels.fused_mlp import _sin, MUFU_SINE, POLYNOMIAL_SINE
from nfd_fast.kernel_report.sass import disassemble

@triton.jit
def probe(x_ptr, y_ptr, KIND: tl.constexpr):
    i = tl.arange(0, 128)
    tl.store(y_ptr + i, _sin(tl.load(x_ptr + i), KIND))

for kind in (MUFU_SINE, POLYNOMIAL_SINE):
    src = triton.compiler.ASTSource(probe, {"x_ptr": "*fp32", "y_ptr": "*fp32", "KIND": "constexpr"},
                                    {"KIND": kind.value})
    sass, _ = disassemble(triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["cubin"])
    print(kind.value, sass.count("MUFU.SIN"))
"""


def test_compiled_hardware_sine_is_one_mufu_per_element(tmp_path):
    """Compiled for sm_90a (no interpreter), MUFU_SINE is sin.approx.f32: one MUFU.SIN per
    element a thread holds (128 elements over 4 warps: 1), the polynomial none; under the
    interpreter, which runs no inline assembly, the same reduction feeds libm's sine."""
    script = tmp_path / "mufu_probe.py"  # Triton reads a kernel's source from its file
    script.write_text(_MUFU_PROBE)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    counts = dict(line.split() for line in out.stdout.strip().splitlines())
    assert counts == {str(KM.MUFU_SINE.value): "1", str(KM.POLYNOMIAL_SINE.value): "0"}
