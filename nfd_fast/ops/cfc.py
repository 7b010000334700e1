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

Backward (every backend): the reference's vector-Jacobian product (torch.func.vjp of
reference_cfc_decode), not a fused kernel: gradients reach coords, fields, points, noise
and every weight, and differentiate again, but cost what the composed PyTorch path costs.

The reference reads the fields with grid_lookup's reference (plain gathers) and runs the
blocks as batched matmuls in float32 (float64 for float64 inputs): the specification,
never calling a kernel. Registered as the torch.library op nfd_fast::cfc_decode.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import List, Optional, Sequence

import torch

from .. import backend
from ._autograd import reference_vjp
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
        if dot_dtype in (torch.float16, torch.bfloat16):
            block_m, stages, warps = 128, 2, 8 if hidden >= 128 else 4
        else:
            block_m, stages, warps = 32, 1, 4
        return _Geometry(hidden, channels, slots, pad_pow2(out), pad_pow2(point_in),
                         block_m, min(32, hidden), warps, stages)

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
    L, H = blocks[0].num_layers, g.hidden
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


def kernel_forward(coords, fields, blocks, out_weight, out_bias, point_weight, point_bias, points,
                   noise, o: _Options, precision: str) -> torch.Tensor:
    """One launch; returns [B, N, out] in the fields' dtype."""
    import triton

    from ..kernels import cfc as K
    from ..kernels import fused_mlp as KM
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
    dot_kind = {"fp16": KM.DOT_FP16, "bf16": KM.DOT_BF16}.get(precision, KM.DOT_FP32).value
    prec = "ieee" if precision in _DOT_DTYPES else precision
    tiles = triton.cdiv(N, g.block_m)
    channels = constant_table(tuple(lookup.channels), torch.int32, dev)
    K.cfc_decode_fwd_kernel[(B * tiles,)](
        coords.contiguous(), _table(rows, dev), channels,
        None if points is None else points.contiguous(), w, vec, pw, nw, noise_table, y,
        N, pin, OUT, tiles, 0 if w.shape[0] == 1 else w.stride(0),
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
        OUT_ACT=o.out_activation is not None, DOT_KIND=dot_kind, PRECISION=prec,
        BLOCK_M=g.block_m, BLOCK_N=g.block_n, num_warps=g.num_warps,
        num_stages=g.num_stages)
    return y


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


@torch.library.custom_op("nfd_fast::cfc_decode", mutates_args=())
def _cfc_decode_op(coords: torch.Tensor, fields: List[torch.Tensor], points: List[torch.Tensor],
                   params: List[torch.Tensor], noise: List[torch.Tensor], layout: List[int],
                   plane_axes: List[int], plane_ranks: List[int], combine: str,
                   align_corners: bool, padding_mode: str, block: str, constants: List[float],
                   precision: str, backend_setting: str) -> torch.Tensor:
    o = _options(plane_axes, plane_ranks, combine, align_corners, padding_mode, block, constants)
    program = _unflatten(params, noise, layout)
    P = len(o.planes)
    scales = [list(fields[s:s + P]) for s in range(0, len(fields), P)]
    pts = points[0] if points else None
    if not _use_kernel(coords, scales, params, program, o, backend_setting):
        blocks, ow, ob, pw, pb, nz = program
        return reference_cfc_decode(coords, scales, blocks, ow, ob, pw, pb, pts, nz, o)
    blocks, ow, ob, pw, pb, nz = program
    return kernel_forward(coords, scales, blocks, ow, ob, pw, pb, pts, nz, o, precision)


@_cfc_decode_op.register_fake
def _cfc_decode_fake(coords, fields, points, params, noise, layout, plane_axes, plane_ranks,
                     combine, align_corners, padding_mode, block, constants, precision,
                     backend_setting):
    out_weight = _unflatten(params, noise, layout)[1]
    return coords.new_empty(*coords.shape[:2], out_weight.shape[-2], dtype=fields[0].dtype)


_GROUPS = (0, 1, 2, 3, 4)  # coords, fields, points, params, noise among the op's inputs


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
    ctx.options = options
    ctx.sizes = (len(fields), len(points), len(params), len(noise))
    ctx.save_for_backward(coords, *fields, *points, *params, *noise)


def _backward(ctx, grad_out):
    """The reference's VJP on every backend (no fused backward kernel); differentiable
    again under create_graph."""
    saved = list(ctx.saved_tensors)
    nf, npts, nprm, nnz = ctx.sizes
    groups, i = [saved[0]], 1
    for size in ctx.sizes:
        groups.append(saved[i:i + size])
        i += size
    ng = ctx.needs_input_grad
    needs = [ng[0], *ng[1], *ng[2], *ng[3], *ng[4]]
    grads = _reference_vjp((*groups, *ctx.options), grad_out, needs, torch.is_grad_enabled())
    out, i = [grads[0]], 1
    for size in ctx.sizes:
        out.append(list(grads[i:i + size]))
        i += size
    return tuple(out) + (None,) * 10


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
    Returns [B, N, out] in the fields' dtype; differentiable in every tensor (backward by
    the reference's VJP, see the module docstring).
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
    return torch.ops.nfd_fast.cfc_decode(
        coords, [f for scale in fields for f in scale], [] if point_weight is None else [points],
        params, noise_flat, layout, [a for axes in planes for a in axes],
        [len(axes) for axes in planes], combine, o.align_corners, padding_mode, block, constants,
        precision, backend.get_backend())
