"""cfc_decode: DDMI's coarse-to-fine readout (lookups + residual MLP blocks) in one kernel.

Per point, with h the residual stream (absent before block 0) and f_k the features of
block k's scale (grid_lookup of that scale's fields; absent for blocks without a scale):

    z_0 = W_h h + W_f f_k + b'_0 (+ w_0 n_0)       the concatenation [h, f_k] as split
                                                   weights; b' holds folded constants
    z_l = W_l a_{l-1} + b_l (+ w_l n_l)            l = 1 .. L-1; n_l [B, N]: one value per
                                                   point for every channel (NoiseInjection)
    "styled":    a_l = g * leaky_relu(z_l, slope),  the block input fed as it is, y = a_{L-1}
    "resnet_fc": a_l = relu(z_l),  the block input fed as relu(x),  y = z_{L-1}
    h   = (y + S_h h + S_f f_k + s_b) * residual_gain      (S = I when there is no skip)
    after block 0:  h += P p + c                   (optional point layer on raw points p)
    out = W_o act_o(h) + b_o                       (act_o: identity or leaky_relu(., slope_o))

Shapes: coords [B, N, D]; fields[s][p] as grid_lookup takes them (per-sample [B, C, ...]
or shared); every matrix [out, in] (shared) or [B, out, in] (per sample: DDMI's
modulated, demodulated weights, formed once per sample by the caller); every bias [out]
or [B, out]; noise_weights [L]; points [B, N, P]. Output [B, N, out] in the fields' dtype.
nfd_fast.nn.CFCDecoder builds the split blocks from its CFCProgram (constant channels
folded into the biases, first-layer and skip weights split by column).

Fused (backend "triton", kernels/cfc.py): one launch; each program takes BLOCK_M points
of one sample, reads every scale's bilinear taps straight into registers and runs all
blocks and the output layer with features, hidden states and the residual stream on
chip. Widths: hidden up to MAX_HIDDEN (padded to a power of two, padded units exactly
zero), features up to MAX_FEATURES per scale after padding (concat: planes x channels),
out up to MAX_OUT, points up to MAX_POINT_IN; every block has the same number of
layers. Other programs run the reference, the reason given once (kernel_refusal).
Precision: float32 accumulation always; matmul operands as fused_mlp's precision modes
("ieee", "tf32x3", "tf32", "fp16", "bf16"; precision=None follows the fields' dtype and
torch.get_float32_matmul_precision()); the point layer (K = P, tiny) in float32.

Backward (backend "triton", where the forward ran the kernel): when a gradient can follow,
the forward kernel also saves every block's pre-activations z_l, its output h and its
features f_k (kernels/cfc.py, SAVE), so the backward never re-runs the blocks or the
lookups. They are saved in float32 in every mode: the backward's activation derivatives
and a_l = feed(z_l) then match the forward's exactly, and the 16-bit modes round a_l to
their operand dtype only where dW reads it. Memory: 4 (K (L + 1) H + K F) bytes a point
(DDMI's image readout, K = 4, L = 3, H = 256, F = 64: 17 KB). Back to front, per layer:
dz_{l-1} = (dz_l W_l) * feed'(z_{l-1}), with a_{l-1} and the bias gradient, in
kernels/fused_mlp.py's backward layer kernel; dx = dz W for the split first layer, the
skip and the output layer in the same kernel; dW = dz^T x as one bmm per matrix (16-bit
operands in the 16-bit modes, float32 output; fused_mlp's _weight_grad); the features'
gradients into fields and coords by grid_lookup's backward kernel, one launch per scale;
a styled block's residual gain and last activation derivative in one elementwise kernel
(kernels/cfc.py). Relu masks, the point layer and the noise sums are elementwise or tiny
PyTorch. Gradients reach coords, fields, points, noise and every weight; a tensor filling
several slots gets the sum. Second order (create_graph=True) and the "torch" backend use
the reference's vector-Jacobian product (torch.func.vjp of reference_cfc_decode),
differentiable again.

The reference reads the fields with grid_lookup's reference (plain gathers) and runs the
blocks as batched matmuls in float32 (float64 for float64 inputs): the specification,
never calling a kernel. Registered as the torch.library op nfd_fast::cfc_decode.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import List, Optional, Sequence, Tuple

import torch

from .. import backend
from ._autograd import empty_f32, reference_vjp, regroup, zeros_where_absent
from ._device import constant_table, pad_pow2
from .fused_mlp import default_precision
from .grid_lookup import _validate as _validate_lookup
from .grid_lookup import COMBINES, reference_grid_lookup

BLOCK_KINDS = ("styled", "resnet_fc")
# fused_mlp's operand modes that this kernel runs (see kernels/cfc.py _dot)
PRECISIONS = ("ieee", "tf32x3", "tf32", "fp16", "bf16")
MAX_HIDDEN, MAX_FEATURES, MAX_OUT, MAX_POINT_IN = 256, 256, 64, 16
MAX_BLOCKS = 8


@dataclasses.dataclass
class SplitBlock:
    """One residual block with its first layer and skip split by input (W_h h + W_f f).

    hidden_weight: W_h (None in block 0, which has no h); feature_weight: W_f (None when
    the block reads no scale); weights: W_1 .. W_{L-1}; biases: L entries, each None or a
    bias (constant channels folded in); skip_hidden / skip_feature / skip_bias: the skip
    S split the same way (both matrices None: identity, for a block whose input is h);
    noise_weights: [L] or None."""

    hidden_weight: Optional[torch.Tensor]
    feature_weight: Optional[torch.Tensor]
    weights: List[torch.Tensor]
    biases: List[Optional[torch.Tensor]]
    skip_hidden: Optional[torch.Tensor] = None
    skip_feature: Optional[torch.Tensor] = None
    skip_bias: Optional[torch.Tensor] = None
    scale: Optional[int] = None
    noise_weights: Optional[torch.Tensor] = None

    @property
    def num_layers(self) -> int:
        return 1 + len(self.weights)

    def slots(self) -> list:
        """The block's tensors in the op's order (None where absent)."""
        return [self.hidden_weight, self.feature_weight, *self.weights, *self.biases,
                self.skip_hidden, self.skip_feature, self.skip_bias, self.noise_weights]

    @staticmethod
    def from_slots(slots: Sequence, scale: Optional[int]) -> "SplitBlock":
        L = (len(slots) - 5) // 2
        return SplitBlock(slots[0], slots[1], list(slots[2:L + 1]), list(slots[L + 1:2 * L + 1]),
                          slots[2 * L + 1], slots[2 * L + 2], slots[2 * L + 3], scale,
                          slots[2 * L + 4])


@dataclasses.dataclass
class _Options:
    """Everything besides tensors: the lookup's and the blocks' options."""

    planes: list
    combine: str
    align_corners: bool
    padding_mode: str
    block: str
    leaky_slope: float
    leaky_gain: float
    residual_gain: float
    out_activation: Optional[float]


# ---------------------------------------------------------------------- spec and validation


def _check_matrix(t, name: str, rows: Optional[int], cols: Optional[int], B: int) -> tuple:
    """t is [rows, cols] or [B, rows, cols] (None: any); returns (rows, cols)."""
    ok = isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() in (2, 3) and \
        (t.dim() == 2 or t.shape[0] == B) and rows in (None, t.shape[-2]) and cols in (None, t.shape[-1])
    if not ok:
        got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        want = f"[{'out' if rows is None else rows}, {'in' if cols is None else cols}]"
        raise ValueError(f"{name}: expected a float tensor {want} or [B={B}, ...], got {got}")
    return tuple(t.shape[-2:])


def _check_vector(t, name: str, width: int, B: int) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or \
            tuple(t.shape) not in ((width,), (B, width)):
        got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name}: expected [{width}] or [B={B}, {width}], got {got}")


def _scale_widths(fields, planes, combine) -> list:
    """Feature width of each scale (channels, times the planes for concat)."""
    return [f[0].shape[-1 - len(planes[0])] * (len(planes) if combine == "concat" else 1)
            for f in fields]


def _validate_block(k: int, blk: SplitBlock, B: int, widths: list, L: int) -> int:
    """Checks block k; returns its output width (the residual stream's width)."""
    name = f"blocks[{k}]"
    if blk.num_layers != L:
        raise ValueError(f"{name}: has {blk.num_layers} layers, blocks[0] has {L} (every block "
                         "needs the same count)")
    if len(blk.biases) != L:
        raise ValueError(f"{name}.biases: expected {L} entries (None allowed), "
                         f"got {len(blk.biases)}")
    if (k == 0) != (blk.hidden_weight is None):
        raise ValueError(f"{name}.hidden_weight: " + ("block 0 has no hidden state: expected None"
                                                      if k == 0 else "expected W_h [out, H]"))
    if blk.scale is not None and not 0 <= blk.scale < len(widths):
        raise ValueError(f"{name}.scale: {blk.scale} is not one of the {len(widths)} scales "
                         "of fields")
    if (blk.scale is None) != (blk.feature_weight is None):
        raise ValueError(f"{name}.feature_weight: needed exactly when the block reads a scale")
    if blk.scale is None and k == 0:
        raise ValueError(f"{name}: block 0 needs a scale (it has no hidden input)")
    outs = []  # each layer's output width
    if blk.hidden_weight is not None:
        outs.append(_check_matrix(blk.hidden_weight, f"{name}.hidden_weight", None, None, B)[0])
    if blk.feature_weight is not None:
        outs[:1] = [_check_matrix(blk.feature_weight, f"{name}.feature_weight",
                                  outs[0] if outs else None, widths[blk.scale], B)[0]]
    for l, w in enumerate(blk.weights, start=1):
        outs.append(_check_matrix(w, f"{name}.weights[{l - 1}]", None, outs[-1], B)[0])
    for l, bias in enumerate(blk.biases):
        _check_vector(bias, f"{name}.biases[{l}]", outs[l], B)
    out = outs[-1]
    return out


def _validate(coords, fields, planes, blocks, out_weight, out_bias, point_weight, point_bias,
              points, noise, combine, padding_mode, block):
    """Check every argument before any launch; returns (planes, fields as lists)."""
    planes, fields = _validate_lookup(coords, fields, planes, combine, padding_mode)
    if block not in BLOCK_KINDS:
        raise ValueError(f"block must be one of {BLOCK_KINDS}, got {block!r}")
    B, N, _ = coords.shape
    blocks = list(blocks)
    if not blocks:
        raise ValueError("blocks: need at least one block")
    widths = _scale_widths(fields, planes, combine)
    L = blocks[0].num_layers
    H = None
    for k, blk in enumerate(blocks):
        out = _validate_block(k, blk, B, widths, L)
        if k > 0:
            _check_matrix(blk.hidden_weight, f"blocks[{k}].hidden_weight", None, H, B)
        if H is not None and out != H:
            raise ValueError(f"blocks[{k}]: outputs {out} units, the residual stream has {H}")
        H = out
        _check_skip(k, blk, B, H, widths)
    _check_matrix(out_weight, "out_weight", None, H, B)
    _check_vector(out_bias, "out_bias", out_weight.shape[-2], B)
    if point_weight is not None:
        _, pin = _check_matrix(point_weight, "point_weight", H, None, B)
        if not isinstance(points, torch.Tensor) or tuple(points.shape) != (B, N, pin):
            got = list(points.shape) if isinstance(points, torch.Tensor) else None
            raise ValueError(f"points: the point layer needs [B={B}, N={N}, {pin}], got {got}")
        _check_vector(point_bias, "point_bias", H, B)
    _check_noise(noise, blocks, B, N)
    return planes, fields


def _check_skip(k: int, blk: SplitBlock, B: int, H: int, widths: list) -> None:
    name = f"blocks[{k}]"
    if blk.skip_hidden is None and blk.skip_feature is None:
        if blk.scale is not None or k == 0:
            raise ValueError(f"{name}: an identity skip needs a block whose input is h alone; "
                             "give skip_hidden / skip_feature")
        if blk.skip_bias is not None:
            raise ValueError(f"{name}.skip_bias: given without a skip matrix")
        return
    if (blk.skip_hidden is None) != (blk.hidden_weight is None) or \
            (blk.skip_feature is None) != (blk.feature_weight is None):
        raise ValueError(f"{name}: the skip must be split like the first layer (skip_hidden "
                         "with hidden_weight, skip_feature with feature_weight)")
    if blk.skip_hidden is not None:
        _check_matrix(blk.skip_hidden, f"{name}.skip_hidden", H, H, B)
    if blk.skip_feature is not None:
        _check_matrix(blk.skip_feature, f"{name}.skip_feature", H, widths[blk.scale], B)
    _check_vector(blk.skip_bias, f"{name}.skip_bias", H, B)


def _check_noise(noise, blocks, B: int, N: int) -> None:
    if noise is None:
        return
    if len(noise) != len(blocks):
        raise ValueError(f"noise: expected one entry per block ({len(blocks)}), got {len(noise)}")
    for k, (blk, per_layer) in enumerate(zip(blocks, noise)):
        if per_layer is None:
            continue
        if blk.noise_weights is None or tuple(blk.noise_weights.shape) != (blk.num_layers,):
            raise ValueError(f"blocks[{k}].noise_weights: noise given, expected [{blk.num_layers}]")
        if len(per_layer) != blk.num_layers:
            raise ValueError(f"noise[{k}]: expected one [B, N] tensor per layer ({blk.num_layers})")
        for l, n in enumerate(per_layer):
            if not isinstance(n, torch.Tensor) or tuple(n.shape) != (B, N):
                got = list(n.shape) if isinstance(n, torch.Tensor) else type(n).__name__
                raise ValueError(f"noise[{k}][{l}]: expected [B={B}, N={N}], got {got}")


# ------------------------------------------------------------------------------ reference


def _linear(x: torch.Tensor, weight: Optional[torch.Tensor], bias=None) -> torch.Tensor:
    """x [B, N, in] times a shared [out, in] or per-sample [B, out, in] weight."""
    y = torch.matmul(x, weight.transpose(-1, -2).to(x.dtype))
    if bias is not None:
        y = y + (bias.unsqueeze(-2) if bias.dim() == 2 else bias).to(x.dtype)
    return y


def _split_linear(h, f, w_h, w_f, bias) -> torch.Tensor:
    """W_h h + W_f f + bias, either part absent."""
    parts = [_linear(x, w) for x, w in ((h, w_h), (f, w_f)) if w is not None]
    y = parts[0] if len(parts) == 1 else parts[0] + parts[1]
    return y if bias is None else y + (bias.unsqueeze(-2) if bias.dim() == 2 else bias).to(y.dtype)


def _feed(z: torch.Tensor, o: _Options) -> torch.Tensor:
    if o.block == "styled":
        return o.leaky_gain * torch.nn.functional.leaky_relu(z, o.leaky_slope)
    return torch.relu(z)


def _reference_block(blk: SplitBlock, h, f, noise, o: _Options) -> torch.Tensor:
    fh, ff = (h, f) if o.block == "styled" or h is None and f is None else \
        (None if h is None else torch.relu(h), None if f is None else torch.relu(f))
    L = blk.num_layers
    y = None
    for l in range(L):
        if l == 0:
            z = _split_linear(fh, ff, blk.hidden_weight, blk.feature_weight, blk.biases[0])
        else:
            z = _linear(y, blk.weights[l - 1], blk.biases[l])
        if noise is not None:  # one value per point, every channel
            z = z + blk.noise_weights[l].to(z.dtype) * noise[l].unsqueeze(-1).to(z.dtype)
        y = z if o.block == "resnet_fc" and l == L - 1 else _feed(z, o)
    if blk.skip_hidden is None and blk.skip_feature is None:
        skip = h
    else:
        skip = _split_linear(h, f, blk.skip_hidden, blk.skip_feature, blk.skip_bias)
    return (y + skip) * o.residual_gain


def reference_cfc_decode(coords, fields, blocks, out_weight, out_bias, point_weight, point_bias,
                         points, noise, o: _Options) -> torch.Tensor:
    """The readout in plain PyTorch (see the module docstring): the specification."""
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in [coords, *fields[0]]) \
        else torch.float32
    features = {}
    for blk in blocks:
        if blk.scale is not None and blk.scale not in features:
            features[blk.scale] = reference_grid_lookup(
                coords, [fields[blk.scale]], o.planes, o.combine, o.align_corners,
                o.padding_mode).to(dtype)
    h = None
    for k, blk in enumerate(blocks):
        f = None if blk.scale is None else features[blk.scale]
        h = _reference_block(blk, h, f, None if noise is None else noise[k], o)
        if k == 0 and point_weight is not None:
            h = h + _linear(points.to(dtype), point_weight, point_bias)
    if o.out_activation is not None:
        h = torch.nn.functional.leaky_relu(h, o.out_activation)
    return _linear(h, out_weight, out_bias).to(fields[0][0].dtype)


# ------------------------------------------------------------------------------- launch
# Triton is imported lazily: nfd_fast must import (and serve the reference) without it.


def kernel_refusal(hidden: int, feature_widths: Sequence[int], out: int, point_in: int,
                   num_blocks: int) -> Optional[str]:
    """Why the fused kernel does not take a readout of these widths, in one line, or None
    when it does. Such calls run the reference instead."""
    features = max(pad_pow2(w) for w in feature_widths)
    limits = (("hidden", pad_pow2(hidden), MAX_HIDDEN), ("padded features", features, MAX_FEATURES),
              ("out", out, MAX_OUT), ("point input", point_in, MAX_POINT_IN),
              ("blocks", num_blocks, MAX_BLOCKS))
    over = [f"{name} {w} > {limit}" for name, w, limit in limits if w > limit]
    return f"cfc_decode: {', '.join(over)} is beyond the fused kernel; running the reference" \
        if over else None


@dataclasses.dataclass(frozen=True)
class _Geometry:
    """Padded widths and tiles of one call (the launch heuristics in one place)."""

    hidden: int  # H: the residual stream and every inner width, padded
    channels: int  # CP
    plane_slots: int  # PP (concat), else 1
    out: int
    point_in: int
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    max_registers: Optional[int] = None  # ptxas's cap (maxnreg); None: its own choice

    @property
    def features(self) -> int:
        return self.channels * self.plane_slots

    @staticmethod
    def of(blocks, fields, o: _Options, out: int, point_in: int, dot_dtype) -> "_Geometry":
        widths = [w.shape[-2] for blk in blocks for w in [blk.hidden_weight, blk.feature_weight,
                                                          *blk.weights] if w is not None]
        hidden = pad_pow2(max(widths))
        channels = pad_pow2(max(f[0].shape[-1 - len(o.planes[0])] for f in fields))
        slots = pad_pow2(len(o.planes), 1) if o.combine == "concat" else 1
        # From sm_90a compile reports of DDMI's readouts (H = 256, C = 64; tests/sm90_compile.py):
        # 16-bit operands: 128 rows, each warpgroup's wgmma owning 64 of them, halve the
        # instructions per row against 64 rows; 2 stages fit (90 KB shared). float32
        # operands (mma.sync) hold h, the layer accumulator and the A operand's TF32 halves
        # in registers: 32 rows, 1 stage (3 stages needed 229 KB of shared memory, more
        # than an H100 has), 4 warps (8 warps issued 4.7 tensor FLOPs per dot FLOP in
        # tf32x3, replicated work; 4 warps 3.0, and 35% fewer instructions per row)
        # float32 operands (tf32x3): ptxas on its own chose 168 registers (5 KB of spills)
        # and, with the saving stores, 32 registers (14 KB, 3636 local loads per tile
        # iteration); maxnreg=255 takes 255 and issues 8% fewer instructions per warp, and
        # 55% fewer when saving (as many as without the stores)
        if dot_dtype in (torch.float16, torch.bfloat16):
            block_m, stages, warps, regs = 128, 2, 8 if hidden >= 128 else 4, None
        else:
            block_m, stages, warps, regs = 32, 1, 4, 255
        return _Geometry(hidden, channels, slots, pad_pow2(out), pad_pow2(point_in),
                         block_m, min(32, hidden), warps, stages, regs)

    def block_width(self, L: int) -> int:
        return (L + 1) * self.hidden ** 2 + 2 * self.hidden * self.features


_DOT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _feature_columns(w: torch.Tensor, g: _Geometry, o: _Options, channels: int) -> torch.Tensor:
    """W_f [.., out, F] with its columns where the kernel's padded features are: concat
    plane p's channels at p * CP."""
    if o.combine != "concat":
        return w
    P = len(o.planes)
    parts = w.unflatten(-1, (P, channels))
    return torch.nn.functional.pad(parts, (0, g.channels - channels)).flatten(-2)


def _put(dst: torch.Tensor, src: Optional[torch.Tensor]) -> None:
    """dst[:, :out, :in] = src (broadcast over samples when shared)."""
    if src is not None:
        dst[..., :src.shape[-2], :src.shape[-1]].copy_(src.detach())


def _pack_weights(blocks, out_weight, g: _Geometry, o: _Options, fields, B, dot_dtype):
    """w [Bw, K * BLOCK_W + OUT_PAD * H] in the dot dtype (layout in kernels/cfc.py)."""
    L = blocks[0].num_layers
    per_sample = any(t is not None and t.dim() == 3 for blk in blocks
                     for t in [blk.hidden_weight, blk.feature_weight, *blk.weights,
                               blk.skip_hidden, blk.skip_feature]) or out_weight.dim() == 3
    H, FP, Bw = g.hidden, g.features, B if per_sample else 1
    blk_w = g.block_width(L)
    w = torch.zeros(Bw, len(blocks) * blk_w + g.out * H, dtype=dot_dtype, device=out_weight.device)
    for k, blk in enumerate(blocks):
        part = w[:, k * blk_w:(k + 1) * blk_w]
        channels = None if blk.scale is None else fields[blk.scale][0].shape[-1 - len(o.planes[0])]
        mats = [(blk.hidden_weight, H), (blk.feature_weight, FP)] + \
            [(x, H) for x in blk.weights] + [(blk.skip_hidden, H), (blk.skip_feature, FP)]
        offset = 0
        for i, (m, cols) in enumerate(mats):
            if m is not None and i in (1, len(mats) - 1):
                m = _feature_columns(m, g, o, channels)
            _put(part[:, offset:offset + H * cols].view(Bw, H, cols), m)
            offset += H * cols
    _put(w[:, len(blocks) * blk_w:].view(Bw, g.out, H), out_weight)
    return w


def _pack_vectors(blocks, point_bias, out_bias, g: _Geometry, B: int, device):
    """vec [Bv, K * (L + 1) * H + H + OUT_PAD] float32: biases, skip biases, c, b_o."""
    H = g.hidden
    entries = [b for blk in blocks for b in [*blk.biases, blk.skip_bias]] + [point_bias, out_bias]
    Bv = B if any(t is not None and t.dim() == 2 for t in entries) else 1
    vec = torch.zeros(Bv, (len(entries) - 1) * H + g.out, dtype=torch.float32, device=device)
    for i, t in enumerate(entries):
        if t is not None:
            vec[:, i * H:i * H + t.shape[-1]].copy_(t.detach())
    return vec


def _layer_outs(blk: SplitBlock) -> list:
    first = blk.hidden_weight if blk.hidden_weight is not None else blk.feature_weight
    return [first.shape[-2]] + [w.shape[-2] for w in blk.weights]


def _digits(values: Sequence[int], base: int) -> int:
    return sum(int(v) * base ** i for i, v in enumerate(values))


def _dot_config(precision: str) -> tuple:
    """(DOT_KIND code, tl.dot input_precision) of a precision mode."""
    from ..kernels import fused_mlp as KM

    dot_kind = {"fp16": KM.DOT_FP16, "bf16": KM.DOT_BF16}.get(precision, KM.DOT_FP32).value
    return dot_kind, "ieee" if precision in _DOT_DTYPES else precision


def kernel_forward(coords, fields, blocks, out_weight, out_bias, point_weight, point_bias, points,
                   noise, o: _Options, precision: str, save: bool = False) -> tuple:
    """One launch; returns (y [B, N, out] in the fields' dtype, z, f): with save, what the
    backward reads (layout in kernels/cfc.py cfc_decode_fwd_kernel), else None, None."""
    import triton

    from ..kernels import cfc as K
    from .grid_lookup import _kernel_dtype, _kernel_layout, _rows, _Spec, _table, _vector_width

    B, N, DIM = coords.shape
    dev, dtype = coords.device, fields[0][0].dtype
    L, OUT = blocks[0].num_layers, out_weight.shape[-2]
    dot_dtype = _DOT_DTYPES.get(precision, torch.float32)
    pin = 0 if point_weight is None else point_weight.shape[-1]
    g = _Geometry.of(blocks, fields, o, OUT, max(pin, 1), dot_dtype)
    # channels at stride 1, as grid_lookup's kernels read them (an NCHW field is copied
    # to channels-last once per call)
    flat = _kernel_layout([f for scale in fields for f in scale], o.planes)
    lookup = _Spec(o.planes, flat, o.combine, o.align_corners, o.padding_mode)
    rows = _rows(flat, o.planes * len(fields), B)  # one table row per (scale, plane)
    w = _pack_weights(blocks, out_weight, g, o, fields, B, dot_dtype)
    vec = _pack_vectors(blocks, point_bias, out_bias, g, B, dev)
    pw = None
    if point_weight is not None:
        pw = torch.zeros(g.hidden, g.point_in, dtype=torch.float32, device=dev)
        _put(pw, point_weight)
    noise_table = nw = None
    noise_dtype = dtype
    if noise is not None and any(n is not None for n in noise):
        present = [t for per in noise if per is not None for t in per]
        noise_dtype = present[0].dtype
        kept = [t.to(noise_dtype).contiguous() for t in present]  # held until the launch ends
        it = iter(kept)
        noise_table = constant_table(tuple(next(it).data_ptr() if per is not None else 0
                                           for per in noise for _ in range(L)), torch.int64, dev)
        nw = torch.stack([blk.noise_weights.detach().float() if per is not None else
                          torch.zeros(L, device=dev) for blk, per in zip(blocks, noise)])
    inner = [max([g.block_n] + _layer_outs(blk)[:L - 1]) for blk in blocks]
    y = torch.empty(B, N, OUT, device=dev, dtype=dtype)
    z = f = None
    if save:
        # the kernel writes an inner layer's z up to the inner width rounded to BLOCK_N and
        # every other plane in full: zeros (one more pass over z) only where that leaves
        # columns unwritten
        unwritten = any(triton.cdiv(i, g.block_n) * g.block_n < g.hidden for i in inner)
        z = (torch.zeros if unwritten else torch.empty)(
            len(blocks), L + 1, B * N, g.hidden, device=dev, dtype=torch.float32)
        f = torch.empty(len(blocks), B * N, g.features, device=dev, dtype=torch.float32)
        for k, blk in enumerate(blocks):
            if blk.scale is None:  # a block without features: defined zeros all the same
                f[k].zero_()
    dot_kind, prec = _dot_config(precision)
    tiles = triton.cdiv(N, g.block_m)
    channels = constant_table(tuple(lookup.channels), torch.int32, dev)
    K.cfc_decode_fwd_kernel[(B * tiles,)](
        coords.contiguous(), _table(rows, dev), channels,
        None if points is None else points.contiguous(), w, vec, pw, nw, noise_table, y, z, f,
        N, B * N, pin, OUT, tiles, 0 if w.shape[0] == 1 else w.stride(0),
        0 if vec.shape[0] == 1 else vec.stride(0), float(o.leaky_slope), float(o.leaky_gain),
        float(o.residual_gain), float(o.out_activation or 0.0),
        NUM_BLOCKS=len(blocks), LAYERS=L, BLOCK_KIND=BLOCK_KINDS.index(o.block),
        SCALES=_digits([0 if blk.scale is None else blk.scale + 1 for blk in blocks],
                       K.SCALE_BASE.value),
        INNER=_digits([triton.cdiv(i, g.block_n) for i in inner], K.INNER_BASE.value),
        SKIPS=_digits([blk.skip_hidden is not None or blk.skip_feature is not None
                       for blk in blocks], 2),
        NOISE=_digits([per is not None for per in (noise or [None] * len(blocks))], 2),
        H=g.hidden, FP=g.features, CP=g.channels, PP=g.plane_slots, DIM=DIM, P=len(o.planes),
        FACTORS=lookup.factors, COMBINE=COMBINES.index(o.combine), ALIGN=o.align_corners,
        BORDER=o.padding_mode == "border", DTYPE=_kernel_dtype(dtype),
        VEC=_vector_width(rows, flat[0].element_size()),
        NOISE_DTYPE=_kernel_dtype(noise_dtype), PIN_PAD=g.point_in, OUT_PAD=g.out,
        OUT_ACT=o.out_activation is not None, DOT_KIND=dot_kind, PRECISION=prec, SAVE=save,
        BLOCK_M=g.block_m, BLOCK_N=g.block_n, num_warps=g.num_warps,
        num_stages=g.num_stages,
        **({} if g.max_registers is None else {"maxnreg": g.max_registers}))
    return y, z, f


# ---------------------------------------------------------------------- fused backward
# The backward reads what the saving forward wrote (every z_l, each block's output h and
# features f, float32) and never re-runs the blocks. Per layer, back to front:
#   dz_{l-1} = (dz_l W_l) * feed'(z_{l-1}) and a_{l-1} = feed(z_{l-1}): kernels/fused_mlp.py's
#     fused_mlp_bwd_layer_kernel (its epilogue also sums the bias gradient per sample);
#   dx = dz W for the split first layer, the skip and the output layer: the same kernel
#     without the epilogue (HIDDEN=False);
#   dW = dz^T x: one bmm per matrix with the mode's operands (fused_mlp's _weight_grad);
#   df_k into the fields and coords: grid_lookup's backward kernel, once for all scales.
# A styled block enters through one elementwise kernel (dr and dz_{L-1}); what remains is
# elementwise (relu masks, sums of branches, noise sums) or tiny, in PyTorch.


@dataclasses.dataclass
class _Backward:
    """One call's backward state: the packed weights, shapes and launch configuration."""

    w: torch.Tensor
    g: _Geometry
    o: _Options
    B: int
    N: int
    L: int
    precision: str
    act_table: torch.Tensor
    wanted: set

    @property
    def M(self) -> int:
        return self.B * self.N

    def want(self, t) -> bool:
        return t is not None and id(t) in self.wanted

    def block_width(self) -> int:
        return self.g.block_width(self.L)

    def matrix(self, k: int, index: int) -> tuple:
        """(view at block k's packed matrix `index`, its row length): 0 W_h, 1 W_f,
        1 + l W_l, L + 1 S_h, L + 2 S_f (kernels/cfc.py's layout)."""
        H, FP = self.g.hidden, self.g.features
        cols = [H, FP] + [H] * (self.L - 1) + [H, FP]
        start = k * self.block_width() + H * sum(cols[:index])
        return self.w[:, start:], cols[index]

    def launch_layer(self, dz, w_view, row, hidden_layer=None, z=None):
        """fused_mlp_bwd_layer_kernel: dz [M, rows of W] float32 times W ([rows, row]).
        hidden_layer (an index into z's planes): returns (dz of that layer, a of it, the
        per-sample column sums of dz [B, H]); else dz W [M, row] float32."""
        import triton

        from ..kernels import fused_mlp as KM

        H, tiles = self.g.hidden, triton.cdiv(self.N, _BWD_BLOCK_M)
        hidden = hidden_layer is not None
        cols = H if hidden else row
        block_n = min(128 if hidden else 64, cols)
        dev = dz.device
        dst = torch.empty(self.M, cols, device=dev, dtype=torch.float32)
        operand = _DOT_DTYPES.get(self.precision, torch.float32)  # a_{l-1} only feeds dW
        a = torch.empty(self.M, H, device=dev, dtype=operand) if hidden else None
        part = torch.empty(4, self.B, tiles, H, device=dev, dtype=torch.float32) if hidden else None
        dot_kind, prec = _dot_config(self.precision)
        KM.fused_mlp_bwd_layer_kernel[(self.B * tiles, triton.cdiv(cols, block_n))](
            dz, w_view, z, None, None, None, self.act_table, dst, a, part, self.N, self.M, cols,
            hidden_layer if hidden else 0, tiles, 0 if w_view.shape[0] == 1 else w_view.stride(0),
            0, 0, 0, K=dz.shape[1], ROW=row, HID_PAD=H,
            ACT=(KM.LEAKY_RELU if self.o.block == "styled" else KM.RELU).value, HIDDEN=hidden,
            SINE_KIND=0, DOT_KIND=dot_kind, PRECISION=prec, BLOCK_M=_BWD_BLOCK_M,
            BLOCK_N=block_n, BLOCK_K=min(32, pad_pow2(dz.shape[1])), num_warps=8)
        if not hidden:
            return dst
        return dst, a, part[0].sum(1)

    def weight_grad(self, dz, x, like) -> Optional[torch.Tensor]:
        """dz^T x per sample ([M, out] x [M, in], true widths), reduced to like's shape."""
        from .fused_mlp import _weight_grad

        if not self.want(like):
            return None
        out, cin = like.shape[-2:]
        dw = _weight_grad(dz[:, :out].reshape(self.B, self.N, out).transpose(1, 2),
                          x[:, :cin].reshape(self.B, self.N, cin), self.precision)
        return _reduced(dw, like)

    def bias_grad(self, sums, like) -> Optional[torch.Tensor]:
        """sums [B, >= out] per-sample column sums, reduced to like's shape."""
        return _reduced(sums[:, :like.shape[-1]], like) if self.want(like) else None

    def col_sums(self, dz) -> torch.Tensor:
        return dz.view(self.B, self.N, -1).sum(1)


_BWD_BLOCK_M = 64


def _add(out: dict, t, grad) -> None:
    """out[id(t)] += grad: one tensor may fill several slots (a noise input shared by the
    layers, a bias shared by blocks), and its gradient is the sum."""
    if grad is not None:
        out[id(t)] = grad if id(t) not in out else out[id(t)] + grad


def _reduced(grad_b: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-sample gradient [B, ...] in the parameter's shape (summed when shared)."""
    grad = grad_b.sum(0) if like.dim() == grad_b.dim() - 1 else grad_b
    return grad.to(like.dtype)


def _feature_grad_columns(dw: torch.Tensor, g: _Geometry, o: _Options, channels: int):
    """The inverse of _feature_columns: padded feature columns back to W_f's own."""
    if o.combine != "concat":
        return dw[..., :channels]
    P = len(o.planes)
    return dw.unflatten(-1, (g.plane_slots, g.channels))[..., :P, :channels].flatten(-2)


def _leaky_grad(x: torch.Tensor, slope: float) -> torch.Tensor:
    """d leaky_relu / dx as torch's backward takes it (slope at and below zero)."""
    return torch.where(x > 0, 1.0, slope)


def _noise_grads(st: _Backward, blk: SplitBlock, per_layer, l: int, dz, out: dict) -> None:
    """Gradients of block noise input n_l [B, N] and of its weight w_l from dz_l."""
    width = _layer_outs(blk)[l]
    rows = dz[:, :width].sum(1).view(st.B, st.N)
    n = per_layer[l]
    if st.want(n):
        _add(out, n, (rows * blk.noise_weights[l].float()).to(n.dtype))
    if st.want(blk.noise_weights):
        onehot = torch.zeros(st.L, device=dz.device)
        onehot[l] = 1.0
        _add(out, blk.noise_weights,
             (onehot * (rows * n.float()).sum()).to(blk.noise_weights.dtype))


def _block_backward(st: _Backward, k: int, blk: SplitBlock, dh, zs, f_k, h_in, noise_k,
                    out: dict) -> tuple:
    """Back through block k from dh (its output's gradient, [M, H] float32): fills out
    with the block's parameter gradients, returns (d h_in or None, d f_k or None)."""
    o, L = st.o, st.L
    identity = blk.skip_hidden is None and blk.skip_feature is None
    dr, dz = _residual_grads(st, dh, zs[k * (L + 1) + L - 1])
    dh_in = df = None
    if identity:
        dh_in = dr
    else:
        if blk.skip_hidden is not None:
            _add(out, blk.skip_hidden, st.weight_grad(dr, h_in, blk.skip_hidden))
            dh_in = st.launch_layer(dr, *st.matrix(k, L + 1))
        if blk.skip_feature is not None:
            _add(out, blk.skip_feature, _features_weight_grad(st, dr, f_k, blk))
            df = st.launch_layer(dr, *st.matrix(k, L + 2))
        _add(out, blk.skip_bias, st.bias_grad(st.col_sums(dr), blk.skip_bias))
    sums = None
    for l in range(L - 1, 0, -1):
        if noise_k is not None:
            _noise_grads(st, blk, noise_k, l, dz, out)
        dz_prev, a_prev, sums_prev = st.launch_layer(dz, *st.matrix(k, 1 + l),
                                                     hidden_layer=k * (L + 1) + l - 1, z=zs)
        w_l = blk.weights[l - 1]
        _add(out, w_l, st.weight_grad(dz, a_prev, w_l))
        _add(out, blk.biases[l], st.bias_grad(st.col_sums(dz) if sums is None else sums,
                                              blk.biases[l]))
        dz, sums = dz_prev, sums_prev
    if noise_k is not None:
        _noise_grads(st, blk, noise_k, 0, dz, out)
    _add(out, blk.biases[0], st.bias_grad(st.col_sums(dz) if sums is None else sums, blk.biases[0]))
    relu = o.block == "resnet_fc"  # the block input fed as relu(x)
    if blk.hidden_weight is not None:
        x_h = torch.relu(h_in) if relu else h_in
        _add(out, blk.hidden_weight, st.weight_grad(dz, x_h, blk.hidden_weight))
        d = st.launch_layer(dz, *st.matrix(k, 0))
        d = d * (h_in > 0) if relu else d
        dh_in = d if dh_in is None else dh_in + d
    if blk.feature_weight is not None:
        x_f = torch.relu(f_k) if relu else f_k
        _add(out, blk.feature_weight, _features_weight_grad(st, dz, x_f, blk,
                                                            like=blk.feature_weight))
        d = st.launch_layer(dz, *st.matrix(k, 1))
        d = d * (f_k > 0) if relu else d
        df = d if df is None else df + d
    return dh_in, df


def _residual_grads(st: _Backward, dh, z_last) -> tuple:
    """(dr, dz_{L-1}) of h = (y + skip) * residual_gain: dr = residual_gain * dh (the
    skip's gradient) and dz_{L-1} = dr * feed'(z_{L-1}) (styled, in one kernel pass:
    kernels/cfc.py cfc_decode_bwd_residual_kernel; resnet_fc's y = z_{L-1}: dz = dr)."""
    o = st.o
    if o.block == "resnet_fc":
        dr = dh * o.residual_gain
        return dr, dr
    import triton

    from ..kernels import cfc as K

    dr, dz = torch.empty_like(dh), torch.empty_like(dh)
    block = 1024
    K.cfc_decode_bwd_residual_kernel[(triton.cdiv(dh.numel(), block),)](
        dh, z_last, dr, dz, dh.numel(), float(o.residual_gain), float(o.leaky_slope),
        float(o.leaky_gain), BLOCK=block, num_warps=4)
    return dr, dz


def _features_weight_grad(st: _Backward, dz, f, blk: SplitBlock, like=None):
    """dz^T f for a matrix reading the padded features (W_f or S_f), in its own columns."""
    from .fused_mlp import _weight_grad

    like = blk.skip_feature if like is None else like
    if not st.want(like):
        return None
    out = like.shape[-2]
    dw = _weight_grad(dz[:, :out].reshape(st.B, st.N, out).transpose(1, 2),
                      f.reshape(st.B, st.N, -1), st.precision)
    channels = like.shape[-1] // (len(st.o.planes) if st.o.combine == "concat" else 1)
    return _reduced(_feature_grad_columns(dw, st.g, st.o, channels), like)


def kernel_backward(coords, fields, blocks, out_weight, out_bias, point_weight, point_bias, points,
                    noise, o: _Options, precision: str, grad_y, z, f, wanted: set) -> dict:
    """Gradients of the readout from the saving forward's z and f: {id(tensor): grad} for
    the tensors in `wanted` (ids), coords and fields included."""
    B, N, _ = coords.shape
    L, K, OUT = blocks[0].num_layers, len(blocks), out_weight.shape[-2]
    dev = coords.device
    dot_dtype = _DOT_DTYPES.get(precision, torch.float32)
    pin = 0 if point_weight is None else point_weight.shape[-1]
    g = _Geometry.of(blocks, fields, o, OUT, max(pin, 1), dot_dtype)
    w = _pack_weights(blocks, out_weight, g, o, fields, B, dot_dtype)
    acts = torch.tensor([[0.0, o.leaky_slope, o.leaky_gain]] * (K * (L + 1)), device=dev)
    st = _Backward(w, g, o, B, N, L, precision, acts.flatten(), wanted)
    M, H = B * N, g.hidden
    zs = z.view(K * (L + 1), M, H)
    out: dict = {}
    gy = grad_y.reshape(M, OUT).float().contiguous()
    h_last = zs[K * (L + 1) - 1]
    slope_o = o.out_activation
    x_out = h_last if slope_o is None else torch.nn.functional.leaky_relu(h_last, slope_o)
    _add(out, out_weight, st.weight_grad(gy, x_out, out_weight))
    _add(out, out_bias, st.bias_grad(st.col_sums(gy), out_bias))
    dh = st.launch_layer(gy, st.w[:, K * st.block_width():], H)
    if slope_o is not None:
        dh = dh * _leaky_grad(h_last, slope_o)
    dfeatures: dict = {}
    for k in range(K - 1, -1, -1):
        blk = blocks[k]
        if k == 0 and point_weight is not None:
            _point_backward(st, dh, points, point_weight, point_bias, out)
        h_in = zs[(k - 1) * (L + 1) + L] if k > 0 else None
        f_k = f[k] if blk.scale is not None else None
        dh, df = _block_backward(st, k, blk, dh, zs, f_k, h_in, None if noise is None else noise[k],
                                 out)
        if df is not None:
            dfeatures[blk.scale] = df if blk.scale not in dfeatures else dfeatures[blk.scale] + df
    _lookup_backward(st, coords, fields, dfeatures, out)
    return out


def _point_backward(st: _Backward, dh, points, point_weight, point_bias, out: dict) -> None:
    """h += P p + c after block 0, in float32 (as the forward)."""
    H = point_weight.shape[-2]
    dhb = dh[:, :H].reshape(st.B, st.N, H)
    if st.want(point_weight):
        _add(out, point_weight, _reduced(torch.bmm(dhb.transpose(1, 2), points.float()),
                                         point_weight))
    _add(out, point_bias, st.bias_grad(dhb.sum(1), point_bias))
    if st.want(points):
        _add(out, points, _linear_t(dhb, point_weight).to(points.dtype))


def _linear_t(dy: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """dy [B, N, out] times a shared [out, in] or per-sample [B, out, in] weight."""
    return torch.matmul(dy, weight.float())


def _lookup_backward(st: _Backward, coords, fields, dfeatures: dict, out: dict) -> None:
    """The features' gradients into coords and fields: grid_lookup's backward kernel, one
    launch per scale, on the features of every scale a block reads (zero elsewhere)."""
    from .grid_lookup import _Spec
    from .grid_lookup import kernel_backward as lookup_backward

    flat = [fld for scale in fields for fld in scale]
    needs = [st.want(coords)] + [st.want(fld) for fld in flat]
    if not any(needs) or not dfeatures:
        return
    o, g = st.o, st.g
    spec = _Spec(o.planes, flat, o.combine, o.align_corners, o.padding_mode)
    parts = []
    for s in range(spec.num_scales):
        df = dfeatures.get(s)
        if df is None:
            parts.append(torch.zeros(st.M, spec.width(s), device=coords.device))
        elif o.combine == "concat":
            parts.append(df.view(st.M, g.plane_slots, g.channels)[:, :len(o.planes),
                                                                    :spec.channels[s]].flatten(1))
        else:
            parts.append(df[:, :spec.channels[s]])
    grad = torch.cat(parts, 1).view(st.B, st.N, -1)
    grads = lookup_backward(spec, grad, coords, flat, needs)
    for t, gr in zip([coords, *flat], grads):
        if gr is not None:
            _add(out, t, gr)


# ------------------------------------------------------------------------- registration
# nfd_fast::cfc_decode is a torch.library custom op (one opaque node for torch.compile, a
# fake implementation for shapes, registered autograd). Its tensors travel as flat lists
# of the present ones, with an int layout saying which slots they fill:
#   layout = [K, L, *scales (-1: none), *slot mask (K * (2L + 5) block slots, then
#             point_weight, point_bias, out_weight, out_bias), *noise mask (per block)]
#   constants = [leaky_slope, leaky_gain, residual_gain, out slope (NaN: no activation)]

_TAIL_SLOTS = 4


def _flatten(blocks, out_weight, out_bias, point_weight, point_bias, noise) -> tuple:
    """(params, noise tensors, layout) of a program."""
    slots = [t for blk in blocks for t in blk.slots()] + \
        [point_weight, point_bias, out_weight, out_bias]
    noise_mask = [int(per is not None) for per in (noise or [None] * len(blocks))]
    layout = [len(blocks), blocks[0].num_layers] + \
        [-1 if blk.scale is None else int(blk.scale) for blk in blocks] + \
        [int(t is not None) for t in slots] + noise_mask
    noise_flat = [t for per, m in zip(noise or [], noise_mask) if m for t in per]
    return [t for t in slots if t is not None], noise_flat, layout


def _unflatten(params, noise_flat, layout) -> tuple:
    """(blocks, out_weight, out_bias, point_weight, point_bias, noise) of the op's inputs."""
    K, L = layout[0], layout[1]
    scales = layout[2:2 + K]
    per_block = 2 * L + 5
    mask = layout[2 + K:2 + K + K * per_block + _TAIL_SLOTS]
    noise_mask = layout[2 + K + len(mask):]
    it = iter(params)
    slots = [next(it) if m else None for m in mask]
    blocks = [SplitBlock.from_slots(slots[k * per_block:(k + 1) * per_block],
                                    None if scales[k] < 0 else scales[k]) for k in range(K)]
    point_weight, point_bias, out_weight, out_bias = slots[K * per_block:]
    it = iter(noise_flat)
    noise = [[next(it) for _ in range(L)] if m else None for m in noise_mask] \
        if any(noise_mask) else None
    return blocks, out_weight, out_bias, point_weight, point_bias, noise


def _options(plane_axes, plane_ranks, combine, align_corners, padding_mode, block,
             constants) -> _Options:
    from .grid_lookup import _planes_of

    out_slope = constants[3]
    return _Options(_planes_of(plane_axes, plane_ranks), combine, align_corners, padding_mode,
                    block, constants[0], constants[1], constants[2],
                    None if math.isnan(out_slope) else out_slope)


_WARNED_REFUSALS: set = set()


def _refusal_of(blocks, fields, out_weight, point_weight, o: _Options) -> Optional[str]:
    widths = [w.shape[-2] for blk in blocks for w in [blk.hidden_weight, blk.feature_weight,
                                                      *blk.weights] if w is not None]
    channels = max(f[0].shape[-1 - len(o.planes[0])] for f in fields)
    features = pad_pow2(channels) * (pad_pow2(len(o.planes), 1) if o.combine == "concat" else 1)
    return kernel_refusal(max(widths), [features], out_weight.shape[-2],
                          0 if point_weight is None else point_weight.shape[-1], len(blocks))


def _use_kernel(coords, scales, params, program, o: _Options, setting: str) -> bool:
    flat = [f for scale in scales for f in scale]
    if coords.shape[0] * coords.shape[1] == 0 or \
            backend.resolve("cfc_decode", coords, *flat, *params, setting=setting) != "triton":
        return False
    reason = _refusal_of(program[0], scales, program[1], program[3], o)
    if reason is None:
        return True
    backend.record("cfc_decode", "torch", reason)
    if reason not in _WARNED_REFUSALS:
        _WARNED_REFUSALS.add(reason)
        warnings.warn(reason, stacklevel=3)
    return False


def _kernel_runs(coords, scales, params, program, o: _Options, setting: str) -> bool:
    """_use_kernel's answer without its records and warnings (for fake tensors)."""
    flat = [f for scale in scales for f in scale]
    return coords.shape[0] * coords.shape[1] > 0 and \
        backend.resolve("cfc_decode", coords, *flat, *params, setting=setting) == "triton" and \
        _refusal_of(program[0], scales, program[1], program[3], o) is None


def _program_of(fields, points, params, noise, layout, plane_axes, plane_ranks, combine,
                align_corners, padding_mode, block, constants) -> tuple:
    """(options, scales, points or None, blocks, out_weight, out_bias, point_weight,
    point_bias, noise lists) of the op's arguments."""
    o = _options(plane_axes, plane_ranks, combine, align_corners, padding_mode, block, constants)
    P = len(o.planes)
    scales = [list(fields[s:s + P]) for s in range(0, len(fields), P)]
    return (o, scales, points[0] if points else None) + _unflatten(params, noise, layout)


@torch.library.custom_op("nfd_fast::cfc_decode", mutates_args=())
def _cfc_decode_op(coords: torch.Tensor, fields: List[torch.Tensor], points: List[torch.Tensor],
                   params: List[torch.Tensor], noise: List[torch.Tensor], layout: List[int],
                   plane_axes: List[int], plane_ranks: List[int], combine: str,
                   align_corners: bool, padding_mode: str, block: str, constants: List[float],
                   precision: str, save: bool, backend_setting: str
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y [B, N, out] and, with save where the kernel runs, the backward's z and f (layout
    in kernels/cfc.py; empty otherwise)."""
    o, scales, pts, blocks, ow, ob, pw, pb, nz = _program_of(
        fields, points, params, noise, layout, plane_axes, plane_ranks, combine, align_corners,
        padding_mode, block, constants)
    if not _use_kernel(coords, scales, params, (blocks, ow, ob, pw), o, backend_setting):
        y = reference_cfc_decode(coords, scales, blocks, ow, ob, pw, pb, pts, nz, o)
        return y, empty_f32(coords), empty_f32(coords)
    y, z, f = kernel_forward(coords, scales, blocks, ow, ob, pw, pb, pts, nz, o, precision, save)
    return y, empty_f32(coords) if z is None else z, empty_f32(coords) if f is None else f


@_cfc_decode_op.register_fake
def _cfc_decode_fake(coords, fields, points, params, noise, layout, plane_axes, plane_ranks,
                     combine, align_corners, padding_mode, block, constants, precision, save,
                     backend_setting):
    o, scales, _, blocks, ow, ob, pw, _, _ = _program_of(
        fields, points, params, noise, layout, plane_axes, plane_ranks, combine, align_corners,
        padding_mode, block, constants)
    B, N, _ = coords.shape
    y = coords.new_empty(B, N, ow.shape[-2], dtype=fields[0].dtype)
    if not save or not _kernel_runs(coords, scales, params, (blocks, ow, ob, pw), o,
                                    backend_setting):
        return y, empty_f32(coords), empty_f32(coords)
    pin = 1 if pw is None else pw.shape[-1]
    g = _Geometry.of(blocks, scales, o, ow.shape[-2], pin,
                     _DOT_DTYPES.get(precision, torch.float32))
    K, L = len(blocks), blocks[0].num_layers
    return (y, coords.new_empty(K, L + 1, B * N, g.hidden, dtype=torch.float32),
            coords.new_empty(K, B * N, g.features, dtype=torch.float32))


_TENSOR_ARGS = 5  # coords, fields, points, params, noise lead the op's arguments


@torch.library.custom_op("nfd_fast::cfc_decode_backward", mutates_args=())
def _cfc_decode_backward_op(grad_y: torch.Tensor, z: torch.Tensor, f: torch.Tensor,
                            coords: torch.Tensor, fields: List[torch.Tensor],
                            points: List[torch.Tensor], params: List[torch.Tensor],
                            noise: List[torch.Tensor], layout: List[int], plane_axes: List[int],
                            plane_ranks: List[int], combine: str, align_corners: bool,
                            padding_mode: str, block: str, constants: List[float],
                            precision: str, needs: List[bool]) -> List[torch.Tensor]:
    """First-order gradients of [coords, *fields, *points, *params, *noise] (empty where not
    needed): the fused backward from the saved z and f, or (nothing saved: the forward ran
    the reference) the reference's VJP."""
    flat = [coords, *fields, *points, *params, *noise]
    options = [plane_axes, plane_ranks, combine, align_corners, padding_mode, block, constants]
    if z.numel() == 0:
        grads = _reference_vjp((coords, fields, points, params, noise, layout, *options),
                               grad_y, needs, create_graph=False)
        return zeros_where_absent(grads, coords)
    o, scales, pts, blocks, ow, ob, pw, pb, nz = _program_of(
        fields, points, params, noise, layout, *options)
    wanted = {id(t) for t, need in zip(flat, needs) if need}
    by_id = kernel_backward(coords, scales, blocks, ow, ob, pw, pb, pts, nz, o, precision,
                            grad_y, z, f, wanted)
    grads, seen = [], set()
    for t, need in zip(flat, needs):
        if not need:
            grads.append(empty_f32(coords))
        elif id(t) in seen:  # a tensor in several slots: its whole gradient went to the first
            grads.append(torch.zeros_like(t))
        else:
            seen.add(id(t))
            gr = by_id.get(id(t))  # none: the tensor does not reach the output
            grads.append(torch.zeros_like(t) if gr is None else gr.to(t.dtype))
    return grads


@_cfc_decode_backward_op.register_fake
def _cfc_decode_backward_fake(grad_y, z, f, coords, fields, points, params, noise, layout,
                              plane_axes, plane_ranks, combine, align_corners, padding_mode,
                              block, constants, precision, needs):
    flat = [coords, *fields, *points, *params, *noise]
    return [torch.empty_like(t) if need else empty_f32(coords) for t, need in zip(flat, needs)]


def _reference_vjp(inputs, grad_out, needs, create_graph):
    """Gradients of every tensor input (flat, in the op's order) by the reference's VJP."""
    coords, fields, points, params, noise, layout, *options = inputs
    o = _options(*options[:6], options[6])
    sizes = [1, len(fields), len(points), len(params), len(noise)]
    P = len(o.planes)

    def forward(*flat):
        groups, i = [], 0
        for size in sizes:
            groups.append(list(flat[i:i + size]))
            i += size
        (c,), f, pts, prm, nz = groups
        blocks, ow, ob, pw, pb, noise_lists = _unflatten(prm, nz, layout)
        return reference_cfc_decode(c, [f[s:s + P] for s in range(0, len(f), P)], blocks, ow, ob,
                                    pw, pb, pts[0] if pts else None, noise_lists, o)

    return reference_vjp(forward, [coords, *fields, *points, *params, *noise], needs, grad_out,
                         create_graph)


def _setup_context(ctx, inputs, output):
    coords, fields, points, params, noise, *options = inputs
    _, z, f = output
    # z and f get no gradient: without this autograd would fill zeros as large as them
    ctx.mark_non_differentiable(z, f)
    ctx.set_materialize_grads(False)
    ctx.options = options
    ctx.sizes = (len(fields), len(points), len(params), len(noise))
    ctx.save_for_backward(z, f, coords, *fields, *points, *params, *noise)


def _backward(ctx, grad_out, _grad_z, _grad_f):
    """The fused backward (nfd_fast::cfc_decode_backward) on the saved z and f; under
    create_graph the reference's VJP, differentiable again."""
    if grad_out is None:  # (grads are not materialised: y took no part in the loss)
        return (None,) * (_TENSOR_ARGS + len(ctx.options))
    z, f, *saved = ctx.saved_tensors
    groups = regroup(saved, ctx.sizes)
    ng = ctx.needs_input_grad
    needs = [ng[0], *ng[1], *ng[2], *ng[3], *ng[4]]
    layout, *options = ctx.options[:9]
    if torch.is_grad_enabled():
        grads = _reference_vjp((*groups, layout, *options), grad_out, needs, True)
    else:
        raw = torch.ops.nfd_fast.cfc_decode_backward(grad_out, z, f, *groups, layout, *options,
                                                     needs)
        grads = [g if need else None for g, need in zip(raw, needs)]
    return tuple(regroup(grads, ctx.sizes)) + (None,) * len(ctx.options)


_cfc_decode_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------- public op


def cfc_decode(coords: torch.Tensor, fields: Sequence[Sequence[torch.Tensor]],
               planes: Sequence[Sequence[int]], blocks: Sequence[SplitBlock],
               out_weight: torch.Tensor, out_bias: Optional[torch.Tensor] = None, *,
               points: Optional[torch.Tensor] = None, point_weight: Optional[torch.Tensor] = None,
               point_bias: Optional[torch.Tensor] = None, noise=None, combine: str = "sum",
               align_corners: bool = False, padding_mode: str = "border", block: str = "styled",
               leaky_slope: float = 0.2, leaky_gain: float = math.sqrt(2.0),
               residual_gain: Optional[float] = None, out_activation: Optional[float] = None,
               precision: Optional[str] = None) -> torch.Tensor:
    """The coarse-to-fine readout; see the module docstring for the math and shapes.

    Args:
        coords [B, N, D]; fields[s][p]: scale s's field of plane p (grid_lookup's layout);
        planes / combine / align_corners / padding_mode: the lookup, as grid_lookup takes it.
        blocks: SplitBlocks, all with the same number of layers; block 0 reads a scale.
        out_weight / out_bias: the output layer; out_activation: None or a leaky slope.
        points / point_weight / point_bias: the point layer added after block 0.
        noise: None, or per block None / one [B, N] tensor per layer.
        block: "styled" or "resnet_fc"; leaky_slope / leaky_gain: the styled activation;
        residual_gain: multiplies (y + S x) (default 1/sqrt(2) styled, 1 resnet_fc).
        precision: the kernel's matmul operands (fused_mlp's modes); None follows the
        fields' dtype and torch.get_float32_matmul_precision().
    Returns [B, N, out] in the fields' dtype; differentiable in every tensor (the fused
    backward on the kernel's path, second order by the reference's VJP; see the module
    docstring).
    """
    planes, fields = _validate(coords, fields, planes, blocks, out_weight, out_bias, point_weight,
                               point_bias, points, noise, combine, padding_mode, block)
    if precision is None:
        precision = default_precision(fields[0][0].dtype)
        if precision not in PRECISIONS:  # a fused_mlp mode this kernel lacks: float32 accuracy
            precision = "tf32x3"
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if residual_gain is None:
        residual_gain = 1 / math.sqrt(2.0) if block == "styled" else 1.0
    o = _Options(planes, combine, bool(align_corners), padding_mode, block, float(leaky_slope),
                 float(leaky_gain), float(residual_gain),
                 None if out_activation is None else float(out_activation))
    blocks = list(blocks)
    if backend.get_backend() == "torch":  # the reference as plain PyTorch ops (inlined)
        backend.record("cfc_decode", "torch", "backend setting 'torch' (inlined reference)")
        return reference_cfc_decode(coords, fields, blocks, out_weight, out_bias, point_weight,
                                    point_bias, points, noise, o)
    params, noise_flat, layout = _flatten(blocks, out_weight, out_bias, point_weight, point_bias,
                                          noise)
    constants = [o.leaky_slope, o.leaky_gain, o.residual_gain,
                 math.nan if o.out_activation is None else o.out_activation]
    flat_fields = [f for scale in fields for f in scale]
    point_list = [] if point_weight is None else [points]
    # saving z and f only pays when a backward can follow
    save = torch.is_grad_enabled() and any(
        t.requires_grad for t in [coords, *flat_fields, *point_list, *params, *noise_flat])
    y, _, _ = torch.ops.nfd_fast.cfc_decode(
        coords, flat_fields, point_list, params, noise_flat, layout,
        [a for axes in planes for a in axes], [len(axes) for axes in planes], combine,
        o.align_corners, padding_mode, block, constants, precision, save, backend.get_backend())
    return y
