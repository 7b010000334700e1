"""fused_mlp: a coordinate MLP (SIREN, modulated SIREN, ReLU/GELU/SiLU MLPs) in one kernel.

Math, for linear layers l = 0 .. L-1 (L >= 2; layers 0 .. L-2 are hidden), h_{-1} = x:

    z_l = W_l h_{l-1} + b_l
    u_l = scale_l * z_l + shift_l          FiLM modulation (functa / COIN++), per sample
    h_l = act_l(u_l) * mult_l              multiplicative modulation (siren-pytorch)
    y   = final_act(z_{L-1})

act is sin(w0 u) (SIREN's sin(w0 (W x + b))), relu, gain * leaky_relu(u, slope), gelu,
silu or identity, chosen per hidden layer, each with its own w0.

Shapes: x [N, in] or [B, N, in]; W_l [out, in] (nn.Linear layout, shared) or
[B, out, in] (per sample); b_l [out] or [B, out]; scale/shift/mult of hidden layer l
[width] or [B, width]. Widths: any >= 1. The fused kernels take in, hidden and out up to
512 (padded to powers of two inside; in up to 64 for the value-and-Jacobian kernel); wider
MLPs run the reference on every backend, the reason given once (kernel_refusal).

What is fused (backend "triton"): the forward evaluates all layers for a tile of rows
with the hidden state kept on chip (see kernels/fused_mlp.py); a hidden sine layer's w0 is
folded into its packed weights, bias and shift, so the sine reads the accumulator. For
training it saves the hidden pre-activations (w0 z_l for sine layers) in float32:
4 * (L-1) * M * HID_PAD bytes held from forward to backward (M = B*N rows, HID_PAD the
hidden width rounded up to a power of two), plus 4 * M * out when the final layer has an
activation. With recompute=True nothing but x is held between forward and backward;
backward re-runs the fused forward (one more forward's time) and then needs the same
buffers, transiently. Backward runs one kernel per layer, dh = dz @ W with the activation
derivative, the modulation gradients and the recomputation of h_{l-1} fused in its
epilogue; dW = dz^T h_{l-1} is a cuBLAS matmul with the mode's operands. Transient
backward memory: three [M, HID_PAD] buffers (dz and h in the dot dtype in 16-bit modes,
float32 otherwise; the column sums float32).

Precision: accumulation is float32 always, and the first layer (K = in) runs in float32
in every mode. ``precision`` picks the other layers' matmul operands: "ieee" (float32),
"tf32x3" (float32 accuracy, within 1e-4 relative of float64, from three TF32 tensor-core
products), "bf16x3", "tf32", "fp16", "bf16". bf16x3 splits each float32 operand into two
bfloat16 pieces, a = a_hi + a_mid (16 significant bits; the weights once per parameter
version when packed, the activations in registers before each dot), and sums the three
significant products a_hi b_hi + a_hi b_mid + a_mid b_hi on the 16-bit tensor cores
(wgmma at the bf16 rate): about 2^-16 relative per product, 16x tf32x3's, so its error
grows with depth (a SIREN 2 -> 256 x 3 -> 3: 5.6e-6; a 20-layer MLP's gradients: up to
2.8e-4) and it is not the float32 default. precision=None: half-precision parameters run
in their dtype's mode; float32 ones follow torch.get_float32_matmul_precision()
("highest" -> "tf32x3", "high" -> "tf32", "medium" -> "bf16"; see default_precision).
fused_mlp_emulated measures each mode's error on a CPU (operands rounded as the tensor
cores round them). ``fast_sine`` replaces libdevice's sinf by a range-reduced polynomial
(absolute error < 4e-7 at |x| < 1e3; NaN beyond |x| = 4e5). The fp16, bf16 and bf16x3
modes always take the same range reduction followed by the hardware sine, sin.approx.f32
(absolute error about 2^-21, below their operand rounding, 2^-16 relative in bf16x3;
emulated with its error at that bound by mufu_sine; see _sine_kind).
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import math
import warnings
import weakref
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .. import backend
from ._autograd import empty_f32, reference_vjp, regroup, zeros_where_absent
from ._device import constant_table, pad_pow2

ACTIVATIONS = ("identity", "sine", "relu", "leaky_relu", "gelu", "silu")
# The modes every kernel family takes (cfc_decode's too); fused_mlp's kernel adds bf16x3.
PRECISIONS = ("ieee", "tf32", "tf32x3", "fp16", "bf16")
MLP_PRECISIONS = PRECISIONS + ("bf16x3",)
SIXTEEN_BIT_MODES = ("fp16", "bf16")
# Float32 operands split into bfloat16 pieces whose products run on the 16-bit tensor cores.
SPLIT_MODES = ("bf16x3",)
# The fused kernels' width limits; wider layers run through the reference (which has no
# limits), with the reason given once (see kernel_refusal).
MAX_IN, MAX_HIDDEN, MAX_OUT = 512, 512, 512
# The value-and-Jacobian kernel stacks one tangent block of rows per input: in <= 64.
MAX_JACOBIAN_IN = 64

# The tensor arguments of the op, grouped, in the order the op takes them.
MLP_TENSOR_GROUPS = ("x", "weights", "biases", "scale", "shift", "mult")

TensorList = Sequence[Optional[torch.Tensor]]
PerLayer = Union[float, Sequence[float]]


@dataclasses.dataclass(frozen=True)
class LayerActivation:
    """The activation of one layer: kind, and its parameters (w0 for sine; slope and gain
    for leaky_relu; the rest take none)."""

    kind: str = "identity"
    w0: float = 30.0
    slope: float = 0.01
    gain: float = 1.0


@dataclasses.dataclass
class MLPInputs:
    """Validated arguments of one fused_mlp call, in batched form (x is [B, N, in])."""

    x: torch.Tensor
    weights: list
    biases: list
    scale: list
    shift: list
    mult: list
    acts: list  # LayerActivation per layer; the last one is the final activation
    batch: int
    squeeze_batch: bool
    precision: str
    fast_sine: bool
    recompute: bool = False

    @property
    def num_layers(self) -> int:
        return len(self.weights)

    def tensors(self) -> list:
        """Every tensor argument, absent ones skipped, in the order of MLP_TENSOR_GROUPS."""
        return [t for group in MLP_TENSOR_GROUPS for t in _as_list(getattr(self, group))
                if t is not None]

    def with_tensors(self, flat) -> "MLPInputs":
        """A copy whose tensors are `flat` (in the order of tensors()), absent ones kept absent."""
        flat, changes = iter(flat), {}
        for group in MLP_TENSOR_GROUPS:
            entries = [None if t is None else next(flat) for t in _as_list(getattr(self, group))]
            changes[group] = entries[0] if group == "x" else entries
        return dataclasses.replace(self, **changes)

    def widths(self) -> list[int]:
        """[in, hidden_0, ..., out] (worked out once: a call asks several times)."""
        widths = self.__dict__.get("_widths")
        if widths is None:
            widths = [self.weights[0].shape[-1]] + [w.shape[-2] for w in self.weights]
            self.__dict__["_widths"] = widths
        return widths


def _as_list(value) -> list:
    return [value] if isinstance(value, torch.Tensor) else list(value)


# ---------------------------------------------------------------------- spec and validation


def _per_layer(value, count: int, name: str) -> list:
    if isinstance(value, (str, int, float)) or value is None:
        return [value] * count
    value = list(value)
    if len(value) != count:
        raise ValueError(f"{name}: expected one entry per hidden layer ({count}), got {len(value)}")
    return value


def _layer_activations(activation, w0, first_w0, final_activation, final_w0,
                       leaky_slope, leaky_gain, hidden: int) -> list:
    frozen = [tuple(v) if isinstance(v, list) else v for v in (activation, w0)]
    try:  # the same options every call (a module's): built once
        return list(_cached_activations(*frozen, first_w0, final_activation, final_w0,
                                        leaky_slope, leaky_gain, hidden))
    except TypeError:  # unhashable options (tensors, generators): built here
        return _build_activations(activation, w0, first_w0, final_activation, final_w0,
                                  leaky_slope, leaky_gain, hidden)


@functools.lru_cache(maxsize=256)
def _cached_activations(*args) -> tuple:
    return tuple(_build_activations(*args))


def _build_activations(activation, w0, first_w0, final_activation, final_w0,
                       leaky_slope, leaky_gain, hidden: int) -> list:
    kinds = _per_layer(activation, hidden, "activation") + [final_activation or "identity"]
    w0s = [float(v) for v in _per_layer(w0, hidden, "w0")]
    if first_w0 is not None:
        w0s[0] = float(first_w0)
    w0s.append(float(final_w0 if final_w0 is not None else w0s[-1]))
    acts = []
    for kind, w in zip(kinds, w0s):
        if kind not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {kind!r}")
        acts.append(LayerActivation(kind, w, float(leaky_slope), float(leaky_gain)))
    return acts


def _check_tensor(t: torch.Tensor, name: str, shapes: list, x: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
    if t.shape not in shapes:  # torch.Size equals the tuple of its sizes
        want = " or ".join(str(list(s)) for s in shapes)
        raise ValueError(f"{name}: expected shape {want}, got {list(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name}: is on {t.device} but x is on {x.device}")
    if t.dtype != x.dtype:
        raise TypeError(f"{name}: dtype {t.dtype} differs from x's {x.dtype}; "
                        "cast the inputs and parameters to one dtype")


def prepare_inputs(x, weights, biases=None, *, activation="sine", w0=30.0, first_w0=None,
                   final_activation="identity", final_w0=None, leaky_slope=0.01,
                   leaky_gain=1.0, scale=None, shift=None, mult=None, precision=None,
                   fast_sine=False, recompute=False) -> MLPInputs:
    """Check every argument of fused_mlp and bring it to batched form, before any launch."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a tensor, got {type(x).__name__}")
    if x.dim() not in (2, 3):
        raise ValueError(f"x: expected shape [N, in] or [B, N, in], got {list(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x: expected a floating-point tensor, got {x.dtype}")
    weights = list(weights)
    if len(weights) < 2:
        raise ValueError(f"weights: need at least 2 layers (one hidden layer), got {len(weights)}")
    squeeze = x.dim() == 2
    xb = x.unsqueeze(0) if squeeze else x
    batch = xb.shape[0]
    in_features = xb.shape[-1]
    if in_features < 1:
        raise ValueError(f"x: in_features must be at least 1, got {in_features}")

    def per_sample_shapes(shape):
        return [shape] if squeeze else [shape, (batch, *shape)]

    widths = [in_features]
    for l, w in enumerate(weights):
        if not isinstance(w, torch.Tensor) or w.dim() not in (2, 3):
            got = list(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
            raise ValueError(f"weights[{l}]: expected [out, in] or [B, out, in], got {got}")
        out_f = w.shape[-2]
        _check_tensor(w, f"weights[{l}]", per_sample_shapes((out_f, widths[-1])), x)
        widths.append(out_f)
    hidden, out_features = widths[1:-1], widths[-1]
    if min(hidden) < 1:
        raise ValueError(f"weights: hidden widths must be at least 1, got {min(hidden)}")
    if out_features < 1:
        raise ValueError(f"weights[-1]: out_features must be at least 1, got {out_features}")

    L = len(weights)
    biases = [None] * L if biases is None else list(biases)
    if len(biases) != L:
        raise ValueError(f"biases: expected {L} entries (one per layer, None allowed), got {len(biases)}")
    for l, bias in enumerate(biases):
        if bias is not None:
            _check_tensor(bias, f"biases[{l}]", per_sample_shapes((widths[l + 1],)), x)
    mods = {}
    for name, value in (("scale", scale), ("shift", shift), ("mult", mult)):
        entries = [None] * (L - 1) if value is None else _per_layer_tensors(value, L - 1, name)
        for l, t in enumerate(entries):
            if t is not None:
                _check_tensor(t, f"{name}[{l}]", per_sample_shapes((widths[l + 1],)), x)
        mods[name] = entries
    acts = _layer_activations(activation, w0, first_w0, final_activation, final_w0,
                              leaky_slope, leaky_gain, L - 1)
    if precision is None:
        precision = default_precision(weights[0].dtype)
    if precision not in MLP_PRECISIONS:
        raise ValueError(f"precision must be one of {MLP_PRECISIONS}, got {precision!r}")
    return MLPInputs(xb, weights, biases, mods["scale"], mods["shift"], mods["mult"], acts,
                     batch, squeeze, precision, bool(fast_sine), bool(recompute))


# torch.get_float32_matmul_precision() -> the mode float32 parameters run in by default.
# "highest" keeps float32 accuracy (1e-4 of float64) with three TF32 tensor-core products,
# modelled faster on an H100 than float32 FFMA ("ieee"); see the module docstring. (bf16x3,
# modelled faster again, is not the default: its error grows with depth past the bound.)
FLOAT32_DEFAULTS = {"highest": "tf32x3", "high": "tf32", "medium": "bf16"}
HALF_DEFAULTS = {torch.float16: "fp16", torch.bfloat16: "bf16"}


def default_precision(dtype: torch.dtype) -> str:
    """precision=None: half-precision parameters keep their dtype's mode; float32 ones
    follow PyTorch's switch, torch.get_float32_matmul_precision()."""
    if dtype in HALF_DEFAULTS:
        return HALF_DEFAULTS[dtype]
    if dtype != torch.float32:  # float64 runs the reference, in float64
        return "ieee"
    return FLOAT32_DEFAULTS[_float32_matmul_precision()]


@torch._dynamo.assume_constant_result
def _float32_matmul_precision() -> str:
    """torch.get_float32_matmul_precision(), read as a constant when torch.compile traces
    (dynamo cannot put a string-valued torch call in a graph). Dynamo's global-state guard
    recompiles when TF32 is switched on or off ("highest" <-> "high" / "medium"); between
    "high" and "medium" a compiled graph keeps the mode it was traced with."""
    return torch.get_float32_matmul_precision()


def kernel_refusal(widths: Sequence[int], jacobian: bool = False) -> Optional[str]:
    """Why the fused kernels do not take an MLP of these widths ([in, hidden..., out]), in
    one line, or None when they do. Such calls run the reference instead."""
    try:
        return _cached_refusal(tuple(widths), jacobian)
    except TypeError:  # symbolic widths (a fake implementation under dynamic shapes)
        return _refusal(widths, jacobian)


def _refusal(widths: Sequence[int], jacobian: bool) -> Optional[str]:
    limits = (("in", widths[0], MAX_JACOBIAN_IN if jacobian else MAX_IN),
              ("hidden", max(widths[1:-1]), MAX_HIDDEN), ("out", widths[-1], MAX_OUT))
    over = [f"{name} width {w} > {limit}" for name, w, limit in limits if w > limit]
    if not over:
        return None
    what = "value-and-Jacobian kernel" if jacobian else "fused kernel"
    return f"fused_mlp: {', '.join(over)} is beyond the {what}; running the reference"


_cached_refusal = functools.lru_cache(maxsize=256)(_refusal)


_WARNED_REFUSALS: set = set()


def _takes_kernel(widths: Sequence[int], jacobian: bool = False) -> bool:
    """True when the kernel takes these widths; else warns (once per reason) and False."""
    reason = kernel_refusal(widths, jacobian)
    if reason is None:
        return True
    if reason not in _WARNED_REFUSALS:
        _WARNED_REFUSALS.add(reason)
        warnings.warn(reason, stacklevel=3)
    return False


def _per_layer_tensors(value, count: int, name: str) -> list:
    if isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a list with one tensor (or None) per hidden layer")
    value = list(value)
    if len(value) != count:
        raise ValueError(f"{name}: expected {count} entries (one per hidden layer), got {len(value)}")
    return value


# ------------------------------------------------------------------------------ reference


def apply_activation(u: torch.Tensor, act: LayerActivation, sine=torch.sin) -> torch.Tensor:
    """act(u) in plain PyTorch: the specification the kernels are tested against (`sine`:
    an emulation of a kernel's sine, see mufu_sine)."""
    if act.kind == "sine":
        return sine(act.w0 * u)
    if act.kind == "relu":
        return torch.relu(u)
    if act.kind == "leaky_relu":
        return act.gain * F.leaky_relu(u, act.slope)
    if act.kind == "gelu":
        return gelu(u)
    if act.kind == "silu":
        return F.silu(u)
    return u


def gelu(u: torch.Tensor) -> torch.Tensor:
    """Exact GELU with its limits at the infinities: gelu(+Inf) = +Inf, gelu(-Inf) = 0
    (F.gelu gives NaN for -Inf, and for +Inf too in float32 on a CPU). Infinities take
    relu's branch, whose value and derivatives (1 and 0) are GELU's limits there; F.gelu
    reads 0 in their place, so no NaN reaches its gradient. Differentiable to any order."""
    infinite = torch.isinf(u)
    return torch.where(infinite, torch.relu(u), F.gelu(torch.where(infinite, 0.0, u)))


def _per_sample(t: Optional[torch.Tensor], dtype) -> Optional[torch.Tensor]:
    """[width] or [B, width] -> broadcastable over the points of each sample."""
    if t is None:
        return None
    t = t.to(dtype)
    return t.unsqueeze(-2) if t.dim() == 2 else t


def reference_forward(p: MLPInputs) -> torch.Tensor:
    """The MLP layer by layer in float32 (float64 for float64 inputs)."""
    dtype = torch.float64 if p.x.dtype == torch.float64 else torch.float32
    return _forward(p, dtype, lambda l, h, wt: torch.matmul(h, wt))


def _forward(p: MLPInputs, dtype, matmul, sine=torch.sin) -> torch.Tensor:
    """The layers in `dtype`, each linear map's product by matmul(layer, h, W^T)."""
    h = p.x.to(dtype)
    for l, (w, b) in enumerate(zip(p.weights, p.biases)):
        z = matmul(l, h, w.to(dtype).transpose(-1, -2))
        if b is not None:
            z = z + _per_sample(b, dtype)
        if l == p.num_layers - 1:
            h = apply_activation(z, p.acts[l], sine)
            break
        if p.scale[l] is not None:
            z = z * _per_sample(p.scale[l], dtype)
        if p.shift[l] is not None:
            z = z + _per_sample(p.shift[l], dtype)
        h = apply_activation(z, p.acts[l], sine)
        if p.mult[l] is not None:
            h = h * _per_sample(p.mult[l], dtype)
    return h.to(p.x.dtype)


def round_to_tf32(t: torch.Tensor) -> torch.Tensor:
    """float32 -> the nearest TF32 value (10-bit mantissa, ties away from zero, as
    cvt.rna.tf32.f32): add half of the dropped 13 bits to the magnitude, then clear them.
    inf and NaN pass unchanged; a carry into the exponent rounds up a binade (or to inf)."""
    bits = t.contiguous().view(torch.int32)
    rounded = ((bits + 0x1000) & ~0x1FFF).view(torch.float32)
    return torch.where(torch.isfinite(t), rounded, t)


def round_operand(t: torch.Tensor, precision: str) -> torch.Tensor:
    """A float32 dot operand as the tensor cores of `precision` read it (in float32)."""
    if precision in ("fp16", "bf16"):
        return t.to(_PACK_DTYPE[precision]).float()
    if precision == "tf32":
        return round_to_tf32(t)
    return t


def split_bf16(t: torch.Tensor) -> tuple:
    """(hi, mid): float32 t = hi + mid + r, hi and mid bfloat16 (round to nearest even;
    |mid| <= 2^-8 |t|, |r| <= 2^-16 |t|), as the bf16x3 kernels split their operands; an
    infinite hi leaves mid = 0 (Inf - Inf would be NaN)."""
    hi = t.to(torch.bfloat16)
    rest = torch.where(torch.isinf(hi), 0.0, t - hi.float())
    return hi, rest.to(torch.bfloat16)


def emulated_matmul(a: torch.Tensor, b: torch.Tensor, precision: str) -> torch.Tensor:
    """a @ b (float32) with the operands rounded as `precision`'s tensor cores do and float32
    accumulation: every product of rounded operands is exact in float32, so a float32
    matmul of the rounded operands is the tensor-core sum up to accumulation order.
    "tf32x3" splits each operand into a TF32 head and a TF32 tail and drops tail x tail;
    "bf16x3" splits each into two bfloat16 pieces (split_bf16) and drops mid x mid."""
    if precision == "bf16x3":
        (a_hi, a_mid), (b_hi, b_mid) = [[piece.float() for piece in split_bf16(t)]
                                        for t in (a, b)]
        return torch.matmul(a_mid, b_hi) + torch.matmul(a_hi, b_mid) + torch.matmul(a_hi, b_hi)
    if precision != "tf32x3":
        return torch.matmul(round_operand(a, precision), round_operand(b, precision))
    a_hi, b_hi = round_to_tf32(a), round_to_tf32(b)
    a_lo, b_lo = round_to_tf32(a - a_hi), round_to_tf32(b - b_hi)
    return torch.matmul(a_lo, b_hi) + torch.matmul(a_hi, b_lo) + torch.matmul(a_hi, b_hi)


def emulated_reference_forward(p: MLPInputs) -> torch.Tensor:
    """The reference in float32 with p.precision's tensor-core rounding of the dot operands
    (the first layer exact in float32, as in the kernels) and, in the modes whose kernels
    take the hardware sine (MUFU_SINE_MODES), that sine's error (mufu_sine): each mode's
    error measured on a CPU, where the Triton interpreter computes every dot in float32."""
    sine = mufu_sine if p.precision in MUFU_SINE_MODES else torch.sin
    return _forward(p, torch.float32, lambda l, h, wt: torch.matmul(h, wt) if l == 0
                    else emulated_matmul(h, wt, p.precision), sine)


# The modes whose kernels take the hardware sine (see _sine_kind).
MUFU_SINE_MODES = SIXTEEN_BIT_MODES + SPLIT_MODES
# The kernels' range reduction (kernels/fused_mlp.py): 2 pi split in two (Cody-Waite), so
# k * hi is exact for |k| < 2^16; past SINE_REDUCTION_BOUND the fast sines give NaN.
_INV_2PI, _TWO_PI_HI, _TWO_PI_LO = 0.15915494309189535, 6.28125, 0.0019353071795864769
SINE_REDUCTION_BOUND = 4.0e5
# sin.approx.f32 on the reduced argument: the PTX ISA bounds its absolute error by about
# 2^-21; the emulation adds 2^-20.5, above that bound, at every point.
MUFU_SINE_ERROR = 2.0 ** -20.5


def mufu_sine(t: torch.Tensor) -> torch.Tensor:
    """sin(t) as the 16-bit modes' kernels compute it, emulated in float32: the kernels'
    range reduction to [-pi, pi], the sine of the reduced argument r, and the hardware
    sine's error at (above) its documented bound, MUFU_SINE_ERROR, with a sign that flips
    every 2^-12 of r: a deterministic stand-in for an error the PTX ISA bounds but does not
    specify. NaN past |t| = SINE_REDUCTION_BOUND, as the kernels."""
    t = t.float()
    k = torch.floor(t * _INV_2PI + 0.5)
    r = (t - k * _TWO_PI_HI) - k * _TWO_PI_LO
    sign = 1.0 - 2.0 * torch.remainder(torch.floor(r * 4096.0), 2.0)
    s = torch.sin(r) + MUFU_SINE_ERROR * sign
    return torch.where(t.abs() <= SINE_REDUCTION_BOUND, s, torch.full_like(s, math.nan))


def activation_derivative(u: torch.Tensor, act: LayerActivation) -> torch.Tensor:
    """d act / d u, written out (the reference's forward-mode rule); NaN where u is NaN,
    also where the derivative is a comparison or a constant, so a NaN point's Jacobian
    is NaN as its value is."""
    if act.kind == "sine":
        d = act.w0 * torch.cos(act.w0 * u)
    elif act.kind == "relu":
        d = (u > 0).to(u.dtype)
    elif act.kind == "leaky_relu":
        d = act.gain * torch.where(u >= 0, torch.ones_like(u), torch.full_like(u, act.slope))
    elif act.kind == "gelu":  # 1 and 0 at +-Inf, the limits (u * pdf(u) is Inf * 0 there)
        cdf = 0.5 * (1 + torch.erf(u * 0.5**0.5))
        d = torch.where(torch.isinf(u), cdf, cdf + u * torch.exp(-0.5 * u * u) / (2 * math.pi) ** 0.5)
    elif act.kind == "silu":
        sig = torch.sigmoid(u)
        d = sig * (1 + u * (1 - sig))
    else:
        d = torch.ones_like(u)
    return torch.where(torch.isnan(u), u, d)


def reference_forward_with_jacobian(p: MLPInputs) -> tuple:
    """(y [B, N, out], J [B, N, out, in] = dy/dx) by forward-mode tangents carried layer
    by layer beside the values: t [B, N, in, width] holds d h / d x_d in row d."""
    dtype = torch.float64 if p.x.dtype == torch.float64 else torch.float32
    h = p.x.to(dtype)
    in_features = h.shape[-1]
    t = torch.eye(in_features, dtype=dtype, device=h.device).expand(*h.shape[:-1], -1, -1)

    def tangent_factor(v):  # [width] / [B, 1, width] -> broadcastable over [B, N, in, width]
        v = _per_sample(v, dtype)
        return v.unsqueeze(-2) if v.dim() == 3 else v

    for l, (w, b) in enumerate(zip(p.weights, p.biases)):
        wt = w.to(dtype).transpose(-1, -2)
        z = torch.matmul(h, wt)
        t = torch.matmul(t, wt.unsqueeze(1) if wt.dim() == 3 else wt)
        if b is not None:
            z = z + _per_sample(b, dtype)
        if l == p.num_layers - 1:
            h = apply_activation(z, p.acts[l])
            t = t * activation_derivative(z, p.acts[l]).unsqueeze(-2)
            break
        if p.scale[l] is not None:
            z = z * _per_sample(p.scale[l], dtype)
            t = t * tangent_factor(p.scale[l])
        if p.shift[l] is not None:
            z = z + _per_sample(p.shift[l], dtype)
        h = apply_activation(z, p.acts[l])
        t = t * activation_derivative(z, p.acts[l]).unsqueeze(-2)
        if p.mult[l] is not None:
            h = h * _per_sample(p.mult[l], dtype)
            t = t * tangent_factor(p.mult[l])
    return h.to(p.x.dtype), t.transpose(-1, -2).to(p.x.dtype)


def mlp_reference_vjp(p: MLPInputs, grad_y: torch.Tensor, needs: Sequence[bool],
                      create_graph: bool) -> list:
    """Gradients of <reference_forward(p), grad_y> for p.tensors() (None where not needed)."""
    return reference_vjp(lambda *flat: reference_forward(p.with_tensors(flat)), p.tensors(),
                         needs, grad_y, create_graph)


# ------------------------------------------------------------------------------- launch
# Triton is imported lazily: nfd_fast must import (and serve the reference) without it.


@dataclasses.dataclass(frozen=True)
class _Geometry:
    """Padded widths and tile sizes of one call (the launch heuristics in one place)."""

    in_pad: int
    hid_pad: int
    out_pad: int
    block_m: int
    block_n: int
    block_out: int
    num_warps: int
    num_stages: int

    @property
    def d(self) -> int:
        """Padded size of the packed layers 1 .. L-1 (the first is packed on its own)."""
        return max(self.hid_pad, self.out_pad)

    @staticmethod
    def of(widths: list, precision: str) -> "_Geometry":
        return _Geometry._of(tuple(widths), precision)

    @staticmethod
    @functools.lru_cache(maxsize=256)
    def _of(widths: tuple, precision: str) -> "_Geometry":
        """Tile sizes chosen from sm_90 compile reports (tests/sm90_compile.py): the
        largest tiles that compile without register spills and within shared memory.
        The forward holds h and the next layer's accumulator, [BLOCK_M, HID_PAD] float32
        each, in registers; float32 dot operands also double the shared-memory tiles."""
        hid_pad = pad_pow2(max(widths[1:-1]))
        out_pad = pad_pow2(widths[-1])
        if precision in ("fp16", "bf16"):
            # 128 rows: each of the two warpgroups owns 64 rows of every wgmma (no dot
            # work replicated across them)
            block_m, block_n, stages = 128, (64 if hid_pad <= 128 else 32), 2
        elif precision in SPLIT_MODES:
            # as the 16-bit modes: Triton lays chained dots' warps along the rows only, so
            # fewer than 16 rows per warp would replicate the dot work (see _out_passes)
            block_m, block_n, stages = 128, (64 if hid_pad <= 128 else 32), 2
        else:
            block_m, block_n, stages = (32 if hid_pad >= 256 else 64), 32, 1
        return _Geometry(pad_pow2(widths[0]), hid_pad, out_pad, block_m, min(block_n, hid_pad),
                         min(out_pad, 32), 8 if hid_pad >= 128 else 4, stages)


_PACK_DTYPE = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclasses.dataclass
class _Packed:
    """The parameters copied into zero-padded buffers the kernels read mask-free; an
    absent kind of parameter is None (the kernels compile its code out)."""

    first: torch.Tensor              # [Bw, HID_PAD, IN_PAD] float32: W_0
    weights: torch.Tensor            # [Bw, L-1, D, D] in the mode's operand dtype: W_1 ..
    #                                  (split modes: [Bw, 2, L-1, D, D] bfloat16, hi and mid)
    bias: Optional[torch.Tensor]     # [Bb, L, D]
    scale: Optional[torch.Tensor]    # [Bs, L-1, HID_PAD]
    shift: Optional[torch.Tensor]
    mult: Optional[torch.Tensor]
    act: torch.Tensor                # [L, 3] float32: (w0, slope, gain)


def _pack_params(p: MLPInputs, g: _Geometry) -> _Packed:
    """The packed parameters, copied once per parameter version (see _packed): weights and
    biases together, the modulations (often new tensors every call) apart."""
    L, D, dev = p.num_layers, g.d, p.x.device
    widths = p.widths()
    folded = folded_w0(p)

    def weights_and_bias():
        bias = _pack_vectors(p.biases, p.batch, L, D, 0.0, widths[1:], dev, folded)
        return (*_pack_weights(p, g, folded), bias)

    def modulations():
        return tuple(_pack_vectors(getattr(p, name), p.batch, L - 1, g.hid_pad, fill,
                                   widths[1:], dev, folded if name == "shift" else None)
                     for name, fill in (("scale", 1.0), ("shift", 0.0), ("mult", 1.0)))

    acts = tuple((a.w0, a.slope, a.gain) for a in p.acts)
    mod_tensors = [*p.scale, *p.shift, *p.mult]
    if all(t is None for t in mod_tensors):  # one look-up serves the whole call
        return _packed(("unmodulated", p.precision, g, acts), [*p.weights, *p.biases],
                       lambda: _Packed(*weights_and_bias(), None, None, None,
                                       constant_table(acts, torch.float32, dev)))
    params = _packed(("params", p.precision, g, folded), [*p.weights, *p.biases],
                     weights_and_bias)
    mods = _packed(("mods", g.hid_pad, folded), mod_tensors, modulations)
    return _Packed(*params, *mods, constant_table(acts, torch.float32, dev))


def folded_w0(p: MLPInputs) -> tuple:
    """Per layer, the factor folded into its packed weights, bias and shift: w0 for a
    hidden sine layer (sin(w0 (scale z + shift)) = sin(scale (w0 z) + w0 shift), so the
    kernel's sine reads the accumulator as it is), 1 elsewhere (the output layer keeps its
    activation's w0). The reference keeps the unfolded math."""
    return tuple(a.w0 if a.kind == "sine" else 1.0 for a in p.acts[:-1]) + (1.0,)


def _scaled(t: torch.Tensor, factor: float) -> torch.Tensor:
    return t if factor == 1.0 else t.float() * factor


def _pack_weights(p: MLPInputs, g: _Geometry, folded: tuple) -> tuple:
    """(w0 W_0 as [Bw, HID_PAD, IN_PAD] float32, w0 W_1 .. W_{L-1} as [Bw, L-1, D, D]);
    each product taken in float32, then rounded once to the packed dtype."""
    L, D, dev = p.num_layers, g.d, p.x.device
    widths = p.widths()
    bw = p.batch if any(w.dim() == 3 for w in p.weights) else 1
    first = torch.zeros(bw, g.hid_pad, g.in_pad, device=dev, dtype=torch.float32)
    first[:, : widths[1], : widths[0]] = _scaled(p.weights[0], folded[0])
    w = torch.zeros(bw, L - 1, D, D, device=dev,
                    dtype=_PACK_DTYPE.get(p.precision, torch.float32))
    for l in range(1, L):
        w[:, l - 1, : widths[l + 1], : widths[l]] = _scaled(p.weights[l], folded[l])
    if p.precision in SPLIT_MODES:  # [Bw, 2, L-1, D, D]: the hi pieces, then the mid ones
        w = torch.stack(split_bf16(w), dim=1)
    return first, w


# Packed copies by parameter version: key -> (weak references to the source tensors, value).
# A key holds each source's id, data_ptr and version counter (bumped by every in-place
# update, e.g. an optimizer step); the weak references make sure a hit is the very same
# tensors, not new ones that reuse a freed address and id. Least recently used go first.
_PACK_CACHE: "collections.OrderedDict" = collections.OrderedDict()
_PACK_CACHE_SIZE = 32


def _packed(kind: tuple, sources: Sequence[Optional[torch.Tensor]], build: Callable):
    """build()'s result for these sources, computed once per version of them."""
    if any(t is not None and t.is_cuda for t in sources) and torch.cuda.is_current_stream_capturing():
        return build()  # a captured graph must repack on replay: the parameters may change
    key = (kind, tuple(None if t is None else (id(t), t.data_ptr(), t._version) for t in sources))
    hit = _PACK_CACHE.get(key)
    if hit is not None and all(r is None if t is None else r() is t
                               for r, t in zip(hit[0], sources)):
        _PACK_CACHE.move_to_end(key)
        return hit[1]
    value = build()
    _PACK_CACHE[key] = ([None if t is None else weakref.ref(t) for t in sources], value)
    stale = [k for k, (refs, _) in _PACK_CACHE.items() if any(r is not None and r() is None
                                                                for r in refs)]
    for k in stale:  # sources gone: their copies can never hit again
        del _PACK_CACHE[k]
    while len(_PACK_CACHE) > _PACK_CACHE_SIZE:
        _PACK_CACHE.popitem(last=False)
    return value


def _pack_vectors(entries, batch, count, width, fill, widths, device,
                  factors=None) -> Optional[torch.Tensor]:
    """Per-layer vectors ([w] or [B, w], or None), each times its factor (folded w0) ->
    [B or 1, count, width] float32, or None when every entry is absent."""
    if all(t is None for t in entries):
        return None
    per_sample = any(t is not None and t.dim() == 2 for t in entries)
    out = torch.full((batch if per_sample else 1, count, width), fill, dtype=torch.float32,
                     device=device)
    for l, t in enumerate(entries):
        if t is not None:
            out[:, l, : widths[l]] = t if factors is None else _scaled(t, factors[l])
    return out


def _stride0(t: Optional[torch.Tensor]) -> int:
    """Batch stride of a packed buffer: 0 when it is shared by all samples (or absent)."""
    return 0 if t is None or t.shape[0] == 1 else t.stride(0)


_KERNELS = []


def _kernels():
    """nfd_fast.kernels.fused_mlp, imported on first use (Triton may be absent)."""
    if not _KERNELS:
        from ..kernels import fused_mlp as K

        _KERNELS.append(K)
    return _KERNELS[0]


@functools.lru_cache(maxsize=None)
def _dot_config(precision: str):
    """(DOT_KIND, input_precision) of the kernels' tl.dot for a precision mode."""
    K = _kernels()
    kind = {"fp16": K.DOT_FP16, "bf16": K.DOT_BF16, "bf16x3": K.DOT_BF16X3}.get(precision,
                                                                               K.DOT_FP32)
    return kind.value, ("ieee" if precision in ("fp16", "bf16", "bf16x3") else precision)


def _hidden_act_codes(p: MLPInputs) -> int:
    """The hidden layers' activation codes packed into the kernel's ACTS bit-field."""
    return _act_field(tuple(a.kind for a in p.acts[:-1]))


@functools.lru_cache(maxsize=256)
def _act_field(kinds: tuple) -> int:
    base = _kernels().ACT_BASE.value
    return sum(ACTIVATIONS.index(kind) * base ** l for l, kind in enumerate(kinds))


def _sine_kind(p: MLPInputs) -> int:
    """The kernels' sine (a code of kernels/fused_mlp.py). The 16-bit modes and bf16x3,
    whose operand rounding (2^-9, 2^-12, 2^-16 relative) is coarser than either fast
    sine's error, take the hardware sine, sin.approx.f32, after an exact range reduction
    (see mufu_sine; in bf16x3 the SIREN of README's Precision moves 5.6e-6 -> 5.7e-6);
    fast_sine=True in the float32 modes takes the range-reduced polynomial (absolute
    error < 4e-7, about 2.5x fewer instructions than libdevice's sinf); libdevice's sinf
    otherwise. Past |w0 u| = 4e5 both fast sines give NaN (their range reduction would
    lose the argument), where 16-bit operands have long lost the phase anyway."""
    K = _kernels()
    if p.precision in MUFU_SINE_MODES:
        return K.MUFU_SINE.value
    return (K.POLYNOMIAL_SINE if p.fast_sine else K.LIBDEVICE_SINE).value


@functools.lru_cache(maxsize=256)
def _padded_widths(hidden: tuple, hid_pad: int) -> int:
    """The kernel's PADDED_WIDTHS: hidden layer l's width where it is narrower than
    hid_pad (its padded units must be zeroed), else 0, as base-WIDTH_BASE digit l. 0 for
    MLPs whose hidden layers all fill their padding: their kernels compile unchanged."""
    base = _kernels().WIDTH_BASE.value
    return sum((w if w < hid_pad else 0) * base ** l for l, w in enumerate(hidden))


def _first_layer_fma(p: MLPInputs, in_features: int, jacobian: bool) -> int:
    """The kernel's FIRST_FMA: coordinates (in <= 4) take the first layer as `in` float32
    FMAs per unit instead of a dot over 16 padded columns, in the modes on the 16-bit
    tensor cores (fp16, bf16, bf16x3; their
    kernels, free of spills, are bound by issue slots; the float32 modes' kernels are
    bound by their spills, which the FMAs' registers make worse: modelled 9.9 -> 15.3 s
    for the float32 gigapixel render)."""
    K = _kernels()
    small = in_features <= K.MAX_FIRST_FMA.value
    fma_modes = SIXTEEN_BIT_MODES + SPLIT_MODES
    return in_features if small and not jacobian and p.precision in fma_modes else 0


def _launch_forward(p: MLPInputs, g: _Geometry, packed: _Packed, save_z: bool, coord_grid=None,
                    jacobian: bool = False):
    """y [B, N, out], and with save_z the saved pre-activations (z [L-1, M, HID_PAD],
    zf [M, out] or None), or with jacobian J [B, N, out, in] in place of z. coord_grid:
    None, or (sizes int64 [D], affine float32 [D, 2], axes bit-field, start) to make the
    coordinates in the kernel (p.x gives the shape)."""
    import triton

    K = _kernels()

    B, N, IN = p.x.shape
    M, L, OUT = B * N, p.num_layers, p.widths()[-1]
    dev = p.x.device
    y = torch.empty(B, N, OUT, device=dev, dtype=p.x.dtype)
    final_act = ACTIVATIONS.index(p.acts[-1].kind)
    z = torch.empty(L - 1, M, g.hid_pad, device=dev, dtype=torch.float32) if save_z else None
    zf = torch.empty(M, OUT, device=dev, dtype=torch.float32) if save_z and final_act else None
    jac = torch.empty(B, N, OUT, IN, device=dev, dtype=p.x.dtype) if jacobian else None
    dot_kind, prec = _dot_config(p.precision)
    sizes, affine, axes, start = coord_grid or (None, None, 0, 0)
    row_tiles = triton.cdiv(N, g.block_m)
    K.fused_mlp_fwd_kernel[(B * row_tiles,)](
        None if coord_grid else p.x.contiguous(), packed.first, packed.weights, packed.bias,
        packed.scale, packed.shift, packed.mult, packed.act, y, z, zf, jac, sizes, affine,
        start, N, IN, OUT, M, row_tiles, _stride0(packed.first), _stride0(packed.weights),
        _stride0(packed.bias),
        _stride0(packed.scale),
        _stride0(packed.shift), _stride0(packed.mult),
        NUM_LAYERS=L, D=g.d, IN_PAD=g.in_pad, HID_PAD=g.hid_pad, OUT_PAD=g.out_pad,
        ACTS=_hidden_act_codes(p), FINAL_ACT=final_act, SINE_KIND=_sine_kind(p),
        DOT_KIND=dot_kind, PRECISION=prec, BLOCK_M=g.block_m, BLOCK_N=g.block_n,
        BLOCK_OUT=g.block_out, num_warps=g.num_warps, num_stages=g.num_stages,
        GRID_DIMS=IN if coord_grid else 0, GRID_AXES=axes,
        TANGENTS=pad_pow2(IN, minimum=1) if jacobian else 0,
        PADDED_WIDTHS=_padded_widths(tuple(p.widths()[1:-1]), g.hid_pad),
        FIRST_FMA=_first_layer_fma(p, IN, jacobian), PIECE=_piece(packed),
        OUT_PASSES=_out_passes(p, g, jacobian),
    )
    return (y, jac) if jacobian else (y, z, zf)


def _out_passes(p: MLPInputs, g: _Geometry, jacobian: bool) -> int:
    """The kernel's OUT_PASSES. A split mode holds h as two bfloat16 pieces, as many
    registers as the float32 accumulator of the pair's second layer: at 256 hidden units
    the two (128 + 128 per thread) spill. Before a lone output layer (odd layer count, out
    within one BLOCK_OUT chunk) the pair instead runs in two passes of 128 columns, each
    recomputing its first layer: for SIREN 2 -> 256 x 3 -> 3 a third more dot work, 57
    local loads per loop iteration instead of 147 (sm_90a; 4 passes still spill, at 12.6 ms
    modelled against 8.4). Other shapes run in one pass (at 256 units their middle pairs
    spill)."""
    streamable = p.num_layers % 2 == 1 and g.out_pad <= g.block_out and not jacobian
    return 2 if p.precision in SPLIT_MODES and g.hid_pad == 256 and streamable else 1


def _piece(packed: _Packed) -> int:
    """Elements from a split weight's hi piece to its mid piece (0 when not split)."""
    w = packed.weights
    return w.stride(1) if w.dim() == 5 else 0


def _launch_backward_layer(p: MLPInputs, g: _Geometry, packed: _Packed, dz, layer, z):
    """Back through linear layer `layer` + 1. layer >= 0: returns (dz_layer, h_layer,
    column sums [4, B, HID_PAD] of dz, du, du*z, g*act); layer = -1: returns dx."""
    import triton

    K = _kernels()

    B, N, IN = p.x.shape
    M = B * N
    hidden = layer >= 0
    cols = g.hid_pad if hidden else IN
    # 128 hidden columns per program: dz is read twice per layer instead of four times at
    # 256 wide, and the epilogue still fits the registers (no spills at sm_90a)
    block_n = min(128, g.hid_pad) if hidden else min(64, g.in_pad)
    block_k = min(32, pad_pow2(dz.shape[1]))
    tiles = triton.cdiv(N, 64)
    dev = p.x.device
    # dz_layer and h_layer in the dtype the next dots read (16-bit modes: half the bytes,
    # no accuracy lost): h_layer only feeds dW_{layer+1}, in the mode's dtype; dz_0 and dx
    # stay float32 as the first layer does
    operand = _PACK_DTYPE.get(p.precision, torch.float32)
    dst = torch.empty(M, cols, device=dev, dtype=operand if layer >= 1 else torch.float32)
    h = torch.empty(M, cols, device=dev, dtype=operand) if hidden else None
    part = torch.empty(4, B, tiles, cols, device=dev, dtype=torch.float32) if hidden else None
    # the first layer runs in float32 in every mode (its weights packed on their own)
    dot_kind, prec = _dot_config(p.precision if hidden else "ieee")
    weights = packed.weights[:, 0] if packed.weights.dim() == 5 else packed.weights
    w = weights[:, layer] if hidden else packed.first
    K.fused_mlp_bwd_layer_kernel[(B * tiles, triton.cdiv(cols, block_n))](
        dz, w, z if hidden else None, packed.scale, packed.shift, packed.mult,
        packed.act, dst, h, part, N, M, cols, layer, tiles, _stride0(w),
        _stride0(packed.scale), _stride0(packed.shift), _stride0(packed.mult),
        K=dz.shape[1], ROW=g.d if hidden else g.in_pad, HID_PAD=g.hid_pad,
        ACT=ACTIVATIONS.index(p.acts[layer].kind) if hidden else 0, HIDDEN=hidden,
        SINE_KIND=_sine_kind(p), DOT_KIND=dot_kind, PRECISION=prec,
        BLOCK_M=64, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=8,
        WIDTH=_padded_widths((p.widths()[layer + 1],), g.hid_pad) if hidden else 0,
        PIECE=_piece(packed) if hidden else 0,
    )
    if not hidden:
        return dst
    return dst, h, part.sum(2)


def _weight_grad(dz_t: torch.Tensor, h: torch.Tensor, precision: str) -> torch.Tensor:
    """dW = dz^T h, float32, with the operands in the mode's dot dtype: in the 16-bit modes
    one 16-bit bmm with float32 accumulation and output (cuBLAS on tensor cores), the same
    call on every device (see _bmm_out_dtype_on_cpu)."""
    dtype = _PACK_DTYPE.get(precision)
    if dtype is None:
        return torch.bmm(dz_t.float(), h.float())
    if not dz_t.is_cuda:
        _bmm_out_dtype_on_cpu()
    return torch.bmm(dz_t.to(dtype), h.to(dtype), out_dtype=torch.float32)


_CPU_BMM_LIBRARY: list = []


def _bmm_out_dtype_on_cpu() -> None:
    """Gives aten::bmm.dtype (16-bit operands, float32 output) the CPU kernel PyTorch lacks,
    once, unless PyTorch has one: the product of two 16-bit values is exact in float32, so
    a float32 bmm of the upcast operands is the tensor cores' float32-accumulated sum (up
    to the order of the additions). A CPU run, and the kernel report's capture, thus make
    the very call a GPU makes."""
    if _CPU_BMM_LIBRARY or torch._C._dispatch_has_kernel_for_dispatch_key("aten::bmm.dtype", "CPU"):
        return
    library = torch.library.Library("aten", "IMPL")
    library.impl("bmm.dtype", _bmm_out_dtype_cpu, "CPU")
    _CPU_BMM_LIBRARY.append(library)  # the registration lasts as long as the library object


def _bmm_out_dtype_cpu(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    if out_dtype not in (a.dtype, torch.float32) or a.dtype != b.dtype:
        raise RuntimeError(f"bmm out_dtype: {a.dtype} x {b.dtype} -> {out_dtype} is not supported")
    return torch.bmm(a, b) if out_dtype == a.dtype else torch.bmm(a.float(), b.float())


def _reduce_param_grad(grad_bw: torch.Tensor, like: Optional[torch.Tensor]):
    """[B, ...] per-sample gradient -> the parameter's own shape (summed when shared)."""
    if like is None:
        return None
    if like.dim() == grad_bw.dim() - 1:
        return grad_bw.sum(0).to(like.dtype)
    # a copy: the column-sum gradients are views of one buffer, and an op's outputs
    # must not alias each other
    return grad_bw.to(like.dtype, copy=True)


def kernel_forward(p: MLPInputs, save_z: bool):
    """The fused forward: (y [B, N, out], z or None, zf or None)."""
    g = _Geometry.of(p.widths(), p.precision)
    return _launch_forward(p, g, _pack_params(p, g), save_z)


def kernel_forward_with_jacobian(p: MLPInputs):
    """The fused forward carrying forward-mode tangents: (y, J [B, N, out, in]). Tiles of
    16 rows: the tangents multiply the rows a tile holds by in (padded to a power of two)."""
    g = dataclasses.replace(_Geometry.of(p.widths(), p.precision), block_m=16)
    return _launch_forward(p, g, _pack_params(p, g), save_z=False, jacobian=True)


def kernel_backward(p: MLPInputs, grad_y, z, zf, needs: Sequence[bool]) -> list:
    """Gradients for p.tensors() from the fused backward kernels (None where not needed).

    One kernel per layer computes dh = dz W with the activation derivative, the
    modulation gradients and h_{l-1} in its epilogue; dW = dz^T h_{l-1} is a matmul."""
    g = _Geometry.of(p.widths(), p.precision)
    packed = _pack_params(p, g)
    if z is None:  # recompute: re-run the fused forward for the pre-activations
        _, z, zf = _launch_forward(p, g, packed, save_z=True)
    B, N, IN = p.x.shape
    M, L, widths = B * N, p.num_layers, p.widths()
    dz = grad_y.reshape(M, widths[-1]).float().contiguous()
    if zf is not None:  # through the final activation
        _, vjp = torch.func.vjp(lambda u: apply_activation(u, p.acts[-1]), zf)
        dz = vjp(dz)[0]
    grads = {"x": None, "weights": [None] * L, "biases": [None] * L,
             "scale": [None] * (L - 1), "shift": [None] * (L - 1), "mult": [None] * (L - 1)}
    col_sums = None  # [4, B, HID_PAD] for layer l, from the kernel of layer l + 1
    # the kernels' dz_l is the gradient of the folded w0 z_l: the gradients of W_l, b_l
    # and shift_l take the factor back (scale's, sum du' z', needs none)
    folded = folded_w0(p)
    for l in range(L - 1, -1, -1):
        out_l, in_l = widths[l + 1], widths[l]
        if l > 0:
            dz_prev, h_prev, sums_prev = _launch_backward_layer(p, g, packed, dz, l - 1, z)
            h_in = h_prev[:, :in_l]
        else:
            h_in = p.x.reshape(M, IN).float()
            if needs[0]:
                grads["x"] = _launch_backward_layer(p, g, packed, dz, -1, None)
        dzb = dz[:, :out_l].reshape(B, N, out_l)
        f = folded[l]
        dw = _weight_grad(dzb.transpose(1, 2), h_in.reshape(B, N, in_l),
                          p.precision if l > 0 else "ieee")
        grads["weights"][l] = _reduce_param_grad(_scaled(dw, f), p.weights[l])
        db = dzb.sum(1) if col_sums is None else col_sums[0, :, :out_l]
        grads["biases"][l] = _reduce_param_grad(_scaled(db, f), p.biases[l])
        if col_sums is not None:
            for i, name in ((1, "shift"), (2, "scale"), (3, "mult")):
                sums = _scaled(col_sums[i, :, :out_l], f if name == "shift" else 1.0)
                grads[name][l] = _reduce_param_grad(sums, getattr(p, name)[l])
        if l > 0:
            dz, col_sums = dz_prev, sums_prev
    if grads["x"] is not None:
        grads["x"] = grads["x"].reshape(p.x.shape).to(p.x.dtype)
    # in the order of p.tensors(): the gradients of the present tensors
    flat = [gr for group in MLP_TENSOR_GROUPS
            for gr, t in zip(_as_list(grads[group]) if group != "x" else [grads["x"]],
                             _as_list(getattr(p, group)))
            if t is not None]
    return [gr if need else None for gr, need in zip(flat, needs)]


def fused_mlp_grid_evaluator(arguments: dict, sizes: Sequence[int], affine, axes: Sequence[int],
                             device) -> Optional[Callable[[int, int], torch.Tensor]]:
    """(start, count) -> values [count, out] of the MLP at grid points start ..
    start + count - 1 (C order), the coordinates made inside the fused kernel: component c
    is affine[c][0] + index[axes[c]] * affine[c][1]. `arguments`: fused_mlp's keyword
    arguments but x and the modulations. None when the Triton backend does not serve
    these parameters on `device` (the caller then evaluates coordinates it makes)."""
    probe = torch.empty(1, 1, len(axes), device=device, dtype=arguments["weights"][0].dtype)
    p0 = prepare_inputs(probe, **arguments)
    if backend.resolve("fused_mlp", *p0.tensors()) != "triton" or not _takes_kernel(p0.widths()):
        return None
    axes_field = 0
    for c, a in enumerate(axes):
        axes_field |= a << (2 * c)
    sizes_t = torch.tensor(list(sizes), dtype=torch.int64, device=device)
    affine_t = torch.tensor([list(row) for row in affine], dtype=torch.float32, device=device)
    g = _Geometry.of(p0.widths(), p0.precision)
    packed = _pack_params(p0, g)

    def evaluate(start: int, count: int) -> torch.Tensor:
        shape_only = probe.expand(1, count, len(axes))  # no memory: the kernel makes x
        p = dataclasses.replace(p0, x=shape_only)
        y, _, _ = _launch_forward(p, g, packed, save_z=False,
                                  coord_grid=(sizes_t, affine_t, axes_field, start))
        return y[0]

    return evaluate


# ------------------------------------------------------------------------- registration
# nfd_fast::fused_mlp is a torch.library custom op: torch.compile sees one opaque node
# (no graph break), its fake implementation gives shapes, and its autograd is registered.
# Optional tensor lists cannot carry gradients through a custom op's autograd, so each
# optional group is passed as the list of present tensors plus a bit mask of their layers.


def _present(entries) -> tuple:
    """(present tensors, bit mask of their positions)."""
    mask = 0
    for l, t in enumerate(entries):
        if t is not None:
            mask |= 1 << l
    return [t for t in entries if t is not None], mask


def _placed(tensors, mask: int, count: int) -> list:
    it = iter(tensors)
    return [next(it) if mask >> l & 1 else None for l in range(count)]


@functools.lru_cache(maxsize=256)
def _activations_of(codes: tuple, w0: tuple, slope: float, gain: float) -> list:
    return [LayerActivation(ACTIVATIONS[c], w, slope, gain) for c, w in zip(codes, w0)]


def _op_inputs(x, weights, biases, bias_mask, scale, scale_mask, shift, shift_mask, mult,
               mult_mask, activations, w0, leaky_slope, leaky_gain, precision, fast_sine,
               recompute) -> MLPInputs:
    """The op's flat arguments back to an MLPInputs (x arrives batched)."""
    L = len(weights)
    acts = _activations_of(tuple(activations), tuple(w0), leaky_slope, leaky_gain)
    return MLPInputs(x, list(weights), _placed(biases, bias_mask, L),
                     _placed(scale, scale_mask, L - 1), _placed(shift, shift_mask, L - 1),
                     _placed(mult, mult_mask, L - 1), acts, x.shape[0], False, precision,
                     fast_sine, recompute)


def _runs_reference(p: MLPInputs, backend_setting: str, jacobian: bool = False) -> bool:
    """The reference serves this call: the backend says so, the batch is empty, or the
    kernel does not take the widths (said once per reason)."""
    # prepare_inputs gave every tensor x's dtype and device: x alone decides the backend
    reference = backend.resolve("fused_mlp", p.x, setting=backend_setting) == "torch" \
        or p.x.numel() == 0 or not _takes_kernel(p.widths(), jacobian)
    if not isinstance(p.x, torch._subclasses.FakeTensor):
        _note_precision(p, reference)
    return reference


_UNHONOURED = ("tf32", "fp16", "bf16", "bf16x3")  # coarser than float32 math
_WARNED_PRECISIONS: set = set()


def _note_precision(p: MLPInputs, reference: bool) -> None:
    """explain() names the precision; a tensor-core mode asked of float32 data that the
    reference runs instead (in float32, more accurately) is said once, not ignored."""
    backend.annotate("fused_mlp", f"precision {p.precision}" + (" (reference: float32 math)"
                                                               if reference else ""))
    if reference and p.x.dtype == torch.float32 and p.precision in _UNHONOURED \
            and p.precision not in _WARNED_PRECISIONS:
        _WARNED_PRECISIONS.add(p.precision)
        warnings.warn(f"precision {p.precision!r} is a fused-kernel mode; the reference that "
                      "runs here computes in float32 (fused_mlp_emulated reproduces the mode's "
                      "rounding on any device)", stacklevel=3)


@torch.library.custom_op("nfd_fast::fused_mlp", mutates_args=())
def _fused_mlp_op(x: torch.Tensor, weights: List[torch.Tensor], biases: List[torch.Tensor],
                  bias_mask: int, scale: List[torch.Tensor], scale_mask: int,
                  shift: List[torch.Tensor], shift_mask: int, mult: List[torch.Tensor],
                  mult_mask: int, activations: List[int], w0: List[float],
                  leaky_slope: float, leaky_gain: float, precision: str, fast_sine: bool,
                  recompute: bool, save_activations: bool, backend_setting: str
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y [B, N, out] and the saved pre-activations (z, zf; empty when not saved)."""
    p = _op_inputs(x, weights, biases, bias_mask, scale, scale_mask, shift, shift_mask, mult,
                   mult_mask, activations, w0, leaky_slope, leaky_gain, precision, fast_sine,
                   recompute)
    if _runs_reference(p, backend_setting):
        return reference_forward(p), empty_f32(x), empty_f32(x)
    y, z, zf = kernel_forward(p, save_z=save_activations and not recompute)
    return y, empty_f32(x) if z is None else z, empty_f32(x) if zf is None else zf


@_fused_mlp_op.register_fake
def _fused_mlp_fake(x, weights, biases, bias_mask, scale, scale_mask, shift, shift_mask, mult,
                    mult_mask, activations, w0, leaky_slope, leaky_gain, precision, fast_sine,
                    recompute, save_activations, backend_setting):
    B, N, _ = x.shape
    out = weights[-1].shape[-2]
    y = x.new_empty(B, N, out)
    tensors = [x, *weights, *biases, *scale, *shift, *mult]
    widths = [x.shape[-1]] + [w.shape[-2] for w in weights]
    saved = save_activations and not recompute and x.numel() > 0 and \
        kernel_refusal(widths) is None and \
        backend.resolve("fused_mlp", *tensors, setting=backend_setting) == "triton"
    if not saved:
        return y, empty_f32(x), empty_f32(x)
    hid_pad = pad_pow2(max(w.shape[-2] for w in weights[:-1]))
    z = x.new_empty(len(weights) - 1, B * N, hid_pad, dtype=torch.float32)
    zf = x.new_empty(B * N, out, dtype=torch.float32) if activations[-1] else empty_f32(x)
    return y, z, zf


@torch.library.custom_op("nfd_fast::fused_mlp_backward", mutates_args=())
def _fused_mlp_backward_op(grad_y: torch.Tensor, z: torch.Tensor, zf: torch.Tensor,
                           x: torch.Tensor, weights: List[torch.Tensor],
                           biases: List[torch.Tensor], bias_mask: int,
                           scale: List[torch.Tensor], scale_mask: int,
                           shift: List[torch.Tensor], shift_mask: int,
                           mult: List[torch.Tensor], mult_mask: int, activations: List[int],
                           w0: List[float], leaky_slope: float, leaky_gain: float,
                           precision: str, fast_sine: bool, recompute: bool,
                           needs: List[bool], backend_setting: str) -> List[torch.Tensor]:
    """First-order gradients for every tensor input in order (empty where not needed)."""
    p = _op_inputs(x, weights, biases, bias_mask, scale, scale_mask, shift, shift_mask, mult,
                   mult_mask, activations, w0, leaky_slope, leaky_gain, precision, fast_sine,
                   recompute)
    if _runs_reference(p, backend_setting):
        grads = mlp_reference_vjp(p, grad_y, needs, create_graph=False)
    else:
        saved = z.numel() > 0 or p.x.numel() == 0
        grads = kernel_backward(p, grad_y, z if saved else None,
                                zf if zf.numel() > 0 else None, needs)
    return zeros_where_absent(grads, x)


@_fused_mlp_backward_op.register_fake
def _fused_mlp_backward_fake(grad_y, z, zf, x, weights, biases, bias_mask, scale, scale_mask,
                             shift, shift_mask, mult, mult_mask, activations, w0, leaky_slope,
                             leaky_gain, precision, fast_sine, recompute, needs,
                             backend_setting):
    tensors = [x, *weights, *biases, *scale, *shift, *mult]
    return [torch.empty_like(t) if need else empty_f32(x) for t, need in zip(tensors, needs)]


_TENSOR_ARGS = (0, 1, 2, 4, 6, 8)  # positions of x and the tensor lists among the op's inputs


def _setup_context(ctx, inputs, output):
    _, z, zf = output
    ctx.mark_non_differentiable(z, zf)
    # z and zf get no gradient: without this autograd would fill a zero gradient as large
    # as the saved pre-activations before every backward
    ctx.set_materialize_grads(False)
    ctx.inputs_meta = [inputs[i] for i in range(len(inputs)) if i not in _TENSOR_ARGS]
    tensors = [inputs[0], *[t for i in _TENSOR_ARGS[1:] for t in inputs[i]]]
    ctx.group_sizes = [len(inputs[i]) for i in _TENSOR_ARGS[1:]]
    ctx.save_for_backward(z, zf, *tensors)


def _backward(ctx, grad_y, _grad_z, _grad_zf):
    if grad_y is None:  # (grads are not materialised: y took no part in the loss)
        return (None,) * (len(ctx.inputs_meta) + len(_TENSOR_ARGS))
    z, zf, *tensors = ctx.saved_tensors
    (bias_mask, scale_mask, shift_mask, mult_mask, activations, w0, leaky_slope, leaky_gain,
     precision, fast_sine, recompute, _save, setting) = ctx.inputs_meta
    needs_tree = [ctx.needs_input_grad[i] for i in _TENSOR_ARGS]
    needs = [needs_tree[0]] + [n for group in needs_tree[1:] for n in group]
    x, weights, biases, scale, shift, mult = regroup(tensors, ctx.group_sizes)
    if torch.is_grad_enabled():  # create_graph: the differentiable reference VJP
        p = _op_inputs(x, weights, biases, bias_mask, scale, scale_mask, shift, shift_mask,
                       mult, mult_mask, activations, w0, leaky_slope, leaky_gain, precision,
                       fast_sine, recompute)
        grads = mlp_reference_vjp(p, grad_y, needs, create_graph=True)
    else:
        raw = torch.ops.nfd_fast.fused_mlp_backward(
            grad_y, z, zf, x, weights, biases, bias_mask, scale, scale_mask, shift, shift_mask,
            mult, mult_mask, activations, w0, leaky_slope, leaky_gain, precision, fast_sine,
            recompute, needs, setting)
        grads = [g if need else None for g, need in zip(raw, needs)]
    gx, gw, gb, gs, gt, gm = regroup(grads, ctx.group_sizes)
    return (gx, gw, gb, None, gs, None, gt, None, gm, None) + (None,) * 9


_fused_mlp_op.register_autograd(_backward, setup_context=_setup_context)


# The value-and-Jacobian op takes the same arguments as nfd_fast::fused_mlp but the
# training switches; its backward is the reference's VJP (of the tangent recurrence), so
# losses on the Jacobian (eikonal, normals) train the MLP's parameters on every backend.

@torch.library.custom_op("nfd_fast::fused_mlp_jacobian", mutates_args=())
def _fused_mlp_jacobian_op(x: torch.Tensor, weights: List[torch.Tensor],
                           biases: List[torch.Tensor], bias_mask: int,
                           scale: List[torch.Tensor], scale_mask: int,
                           shift: List[torch.Tensor], shift_mask: int,
                           mult: List[torch.Tensor], mult_mask: int, activations: List[int],
                           w0: List[float], leaky_slope: float, leaky_gain: float,
                           precision: str, fast_sine: bool, backend_setting: str
                           ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(y [B, N, out], J [B, N, out, in])."""
    p = _op_inputs(x, weights, biases, bias_mask, scale, scale_mask, shift, shift_mask, mult,
                   mult_mask, activations, w0, leaky_slope, leaky_gain, precision, fast_sine,
                   False)
    if _runs_reference(p, backend_setting, jacobian=True):
        y, jac = reference_forward_with_jacobian(p)
        return y, jac.contiguous()  # the fake's (and the kernel's) layout
    return kernel_forward_with_jacobian(p)


@_fused_mlp_jacobian_op.register_fake
def _fused_mlp_jacobian_fake(x, weights, *rest):
    B, N, IN = x.shape
    out = weights[-1].shape[-2]
    return x.new_empty(B, N, out), x.new_empty(B, N, out, IN)


@torch.library.custom_op("nfd_fast::fused_mlp_jacobian_backward", mutates_args=())
def _fused_mlp_jacobian_backward_op(grad_y: torch.Tensor, grad_jacobian: torch.Tensor,
                                    x: torch.Tensor, weights: List[torch.Tensor],
                                    biases: List[torch.Tensor], bias_mask: int,
                                    scale: List[torch.Tensor], scale_mask: int,
                                    shift: List[torch.Tensor], shift_mask: int,
                                    mult: List[torch.Tensor], mult_mask: int,
                                    activations: List[int], w0: List[float],
                                    leaky_slope: float, leaky_gain: float, precision: str,
                                    fast_sine: bool, needs: List[bool]) -> List[torch.Tensor]:
    p = _op_inputs(x, weights, biases, bias_mask, scale, scale_mask, shift, shift_mask, mult,
                   mult_mask, activations, w0, leaky_slope, leaky_gain, precision, fast_sine,
                   False)
    return zeros_where_absent(_jacobian_reference_vjp(p, grad_y, grad_jacobian, needs, False), x)


@_fused_mlp_jacobian_backward_op.register_fake
def _fused_mlp_jacobian_backward_fake(grad_y, grad_jacobian, x, weights, biases, bias_mask,
                                      scale, scale_mask, shift, shift_mask, mult, mult_mask,
                                      *rest):
    needs = rest[-1]
    tensors = [x, *weights, *biases, *scale, *shift, *mult]
    return [torch.empty_like(t) if need else empty_f32(x) for t, need in zip(tensors, needs)]


def _jacobian_reference_vjp(p: MLPInputs, grad_y, grad_jacobian, needs, create_graph):
    return reference_vjp(lambda *flat: reference_forward_with_jacobian(p.with_tensors(flat)),
                         p.tensors(), needs, (grad_y, grad_jacobian), create_graph)


def _jacobian_setup_context(ctx, inputs, output):
    ctx.inputs_meta = [inputs[i] for i in range(len(inputs)) if i not in _TENSOR_ARGS]
    tensors = [inputs[0], *[t for i in _TENSOR_ARGS[1:] for t in inputs[i]]]
    ctx.group_sizes = [len(inputs[i]) for i in _TENSOR_ARGS[1:]]
    ctx.save_for_backward(*tensors)


def _jacobian_backward(ctx, grad_y, grad_jacobian):
    tensors = ctx.saved_tensors
    (bias_mask, scale_mask, shift_mask, mult_mask, activations, w0, leaky_slope, leaky_gain,
     precision, fast_sine, _setting) = ctx.inputs_meta
    needs_tree = [ctx.needs_input_grad[i] for i in _TENSOR_ARGS]
    needs = [needs_tree[0]] + [n for group in needs_tree[1:] for n in group]
    x, weights, biases, scale, shift, mult = regroup(tensors, ctx.group_sizes)
    grad_y = torch.zeros_like(x[..., :1].expand(*x.shape[:2], weights[-1].shape[-2])) \
        if grad_y is None else grad_y
    grad_jacobian = torch.zeros(*grad_y.shape, x.shape[-1], dtype=grad_y.dtype,
                                device=grad_y.device) if grad_jacobian is None else grad_jacobian
    args = (x, weights, biases, bias_mask, scale, scale_mask, shift, shift_mask, mult,
            mult_mask, activations, w0, leaky_slope, leaky_gain, precision, fast_sine)
    if torch.is_grad_enabled():  # create_graph: differentiable again
        grads = _jacobian_reference_vjp(_op_inputs(*args, False), grad_y, grad_jacobian, needs,
                                        create_graph=True)
    else:
        raw = torch.ops.nfd_fast.fused_mlp_jacobian_backward(grad_y, grad_jacobian, *args, needs)
        grads = [g if need else None for g, need in zip(raw, needs)]
    gx, gw, gb, gs, gt, gm = regroup(grads, ctx.group_sizes)
    return (gx, gw, gb, None, gs, None, gt, None, gm, None) + (None,) * 7


_fused_mlp_jacobian_op.register_autograd(_jacobian_backward, setup_context=_jacobian_setup_context)


# ---------------------------------------------------------------------------- public op


def fused_mlp(x: torch.Tensor, weights: TensorList, biases: Optional[TensorList] = None, *,
              activation: Union[str, Sequence[str]] = "sine", w0: PerLayer = 30.0,
              first_w0: Optional[float] = None, final_activation: str = "identity",
              final_w0: Optional[float] = None, leaky_slope: float = 0.01,
              leaky_gain: float = 1.0, scale: Optional[TensorList] = None,
              shift: Optional[TensorList] = None, mult: Optional[TensorList] = None,
              precision: Optional[str] = None, fast_sine: bool = False,
              recompute: bool = False) -> torch.Tensor:
    """Evaluate an MLP per coordinate; see the module docstring for the math and shapes.

    Args:
        x: coordinates [N, in] or [B, N, in].
        weights: L >= 2 tensors [out, in] (shared) or [B, out, in] (per sample).
        biases: None, or L entries, each None, [out] or [B, out].
        activation: one name for all hidden layers or one per hidden layer.
        w0: sine frequency, one for all hidden layers or one per hidden layer;
            first_w0 overrides layer 0's (SIREN's first_omega_0).
        final_activation / final_w0: the output layer's activation (default linear).
        leaky_slope / leaky_gain: leaky_relu(u, slope) * gain (StyleGAN: 0.2, sqrt(2)).
        scale / shift / mult: None, or L-1 entries, each None, [width] or [B, width].
        precision: matmul operand precision, see the module docstring.
        fast_sine: polynomial sine instead of libdevice's (kernel only).
        recompute: keep nothing but x between forward and backward; backward re-runs
            the fused forward to get the pre-activations (kernel only; see "Memory").

    Returns: [N, out] or [B, N, out] in x's dtype. Differentiable to any order in every
    input (second order through the reference's math, see the module docstring).
    """
    p = prepare_inputs(x, weights, biases, activation=activation, w0=w0, first_w0=first_w0,
                       final_activation=final_activation, final_w0=final_w0,
                       leaky_slope=leaky_slope, leaky_gain=leaky_gain, scale=scale,
                       shift=shift, mult=mult, precision=precision, fast_sine=fast_sine,
                       recompute=recompute)
    if backend.get_backend() == "torch":  # the reference as plain PyTorch ops (inlined)
        if not torch.compiler.is_compiling():
            backend.record("fused_mlp", "torch", "backend setting 'torch' (inlined reference)")
            _note_precision(p, reference=True)
        y = reference_forward(p)
    else:
        # saving the pre-activations only pays when a backward can follow
        save = torch.is_grad_enabled() and any(t.requires_grad for t in p.tensors())
        if not save and _plain_eager(p.x):
            y = _forward_without_autograd(p, backend.get_backend())
        else:
            y, _, _ = torch.ops.nfd_fast.fused_mlp(*_op_arguments(p), p.recompute, save,
                                                   backend.get_backend())
    return y.squeeze(0) if p.squeeze_batch else y


def _plain_eager(x: torch.Tensor) -> bool:
    """No tracer, dispatch mode or functorch transform is watching: the op's own
    implementation can be called directly, with the same result, skipping the custom op's
    dispatch (about a third of a call's host time). Everything else (torch.compile,
    FakeTensors, make_fx, vmap, calls that need autograd) goes through the op."""
    return not torch.compiler.is_compiling() and type(x) is torch.Tensor \
        and torch._C._len_torch_dispatch_stack() == 0 \
        and torch._C._functorch.peek_interpreter_stack() is None


def _forward_without_autograd(p: MLPInputs, setting: str) -> torch.Tensor:
    """What nfd_fast::fused_mlp computes for y when nothing is saved for a backward."""
    if _runs_reference(p, setting):
        return reference_forward(p)
    return kernel_forward(p, save_z=False)[0]


def _op_arguments(p: MLPInputs) -> tuple:
    """p as the registered ops' leading arguments (x .. fast_sine)."""
    groups = [_present(getattr(p, name)) for name in ("biases", "scale", "shift", "mult")]
    return (p.x, p.weights, *groups[0], *groups[1], *groups[2], *groups[3],
            [ACTIVATIONS.index(a.kind) for a in p.acts], [a.w0 for a in p.acts],
            p.acts[0].slope, p.acts[0].gain, p.precision, p.fast_sine)


def fused_mlp_emulated(x: torch.Tensor, weights: TensorList,
                       biases: Optional[TensorList] = None, **options) -> torch.Tensor:
    """fused_mlp's math on the CPU with the dot operands rounded as `precision` (or the
    default mode) rounds them on tensor cores, float32 accumulation: what each precision
    costs in accuracy, without a GPU. Arguments as fused_mlp's; not differentiable."""
    p = prepare_inputs(x, weights, biases, **options)
    with torch.no_grad():
        y = emulated_reference_forward(p).to(x.dtype)
    return y.squeeze(0) if p.squeeze_batch else y


def fused_mlp_with_jacobian(x: torch.Tensor, weights: TensorList,
                            biases: Optional[TensorList] = None, **options) -> tuple:
    """The MLP's value and its coordinate Jacobian in one pass: (y, J) with J[..., o, d] =
    dy_o / dx_d, shapes [N, out] / [N, out, in] (or with a leading B). Arguments as
    fused_mlp's (recompute aside). The fused kernel carries the in forward-mode tangents
    through every layer beside the values, so normals and eikonal terms need no backward
    pass; y and J are differentiable again (through the reference's math) in every input."""
    if options.pop("recompute", False):
        raise ValueError("recompute: not an option of fused_mlp_with_jacobian")
    p = prepare_inputs(x, weights, biases, **options)
    if backend.get_backend() == "torch":  # the reference as plain PyTorch ops (inlined)
        y, jac = reference_forward_with_jacobian(p)
    else:
        y, jac = torch.ops.nfd_fast.fused_mlp_jacobian(*_op_arguments(p), backend.get_backend())
    return (y.squeeze(0), jac.squeeze(0)) if p.squeeze_batch else (y, jac)
