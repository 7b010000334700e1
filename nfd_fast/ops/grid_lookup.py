"""grid_lookup: multi-scale factorized feature grids read at coordinates, fused.

    out[b, n] = concat over scales s of  combine over planes p of  field[s][p] read at
                coords[b, n, planes[p]]

A plane (a, b) is read like grid_sample(field, x = coords[..., a], y = coords[..., b]),
a volume (a, b, c) with x, y, z = coords[..., a], coords[..., b], coords[..., c] (trilinear),
a line (a,) as a plane of height 1 at y = 0 (linear interpolation). align_corners and
padding_mode ("border" / "zeros") mean what they mean for grid_sample. combine over the
planes of a scale: "sum", "product", "mean", or "concat" (plane-major); scales are
concatenated scale-major.

Shapes: coords [B, N, D], D = 1..4. fields[s][p]: [C_s, H, W] / [C_s, D, H, W] / [C_s, L],
or with a leading B (per-sample fields, as DDMI's decoder produces). Resolutions may
differ per plane and scale; channels are equal within a scale. Output [B, N, F] in the
fields' dtype, F = sum_s C_s (or C_s * P for concat). Math in float32 (the reference
upcasts too, so float16 fields are not also rounded through float16 coordinates).

Fused (backend "triton"): one launch per scale reads every plane's taps in place and
writes the combined features once. The kernels read a tap's channels as one contiguous
vector, so they need channels at stride 1 (channels-last storage, as nn.MultiScaleField
keeps its parameters and as a decoder can emit its fields). A field in another layout
(NCHW) is copied to channels-last once per call, forward and again in a backward that
reads field values: the sm_90a model puts that copy (one read and one write of the
field) far below what strided channel reads cost, forward and backward. Backward:
field gradients by relaxed float32 atomic adds into channels-last buffers, returned in
each field's own layout (one more copy for an NCHW field, folded into the dtype cast);
coordinate gradients with grid_sample's clip rule (zero at and beyond the border). NaN
coordinates give NaN features (grid_sample itself returns a border value for them in
'border' mode on CPU).

The reference interpolates with gathers and weights in plain PyTorch instead of calling
grid_sample, whose backward cannot be differentiated again: so second order (gradients
of coordinate gradients, e.g. an eikonal loss on a grid-based field) works on every
backend. Registered as the torch.library ops nfd_fast::grid_lookup and
nfd_fast::grid_lookup_backward.
"""
from __future__ import annotations

import itertools
from typing import List, Sequence

import torch

from .. import backend
from ._autograd import reference_vjp, zeros_where_absent
from ._device import constant_table, pad_pow2

COMBINES = ("sum", "product", "mean", "concat")
PADDING_MODES = ("border", "zeros")


# ---------------------------------------------------------------------- spec and validation


def _validate(coords, fields, planes, combine, padding_mode):
    """Check every argument before any launch; returns (planes as tuples, per-sample flags)."""
    if not isinstance(coords, torch.Tensor) or not coords.is_floating_point() or coords.dim() != 3:
        got = list(coords.shape) if isinstance(coords, torch.Tensor) else type(coords).__name__
        raise ValueError(f"coords: expected a float tensor [B, N, D], got {got}")
    B, _, D = coords.shape
    if not 1 <= D <= 4:
        raise ValueError(f"coords: D must be 1..4, got {D}")
    if combine not in COMBINES:
        raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
    planes = [tuple(int(a) for a in p) for p in planes]
    if not planes:
        raise ValueError("planes: need at least one plane")
    for i, p in enumerate(planes):
        if not 1 <= len(p) <= 3 or len(set(p)) != len(p) or any(not 0 <= a < D for a in p):
            raise ValueError(f"planes[{i}]: expected 1 to 3 distinct axes in 0..{D - 1}, got {p}")
    fields = [list(scale) for scale in fields]
    if not fields:
        raise ValueError("fields: need at least one scale")
    dtype = None
    for s, scale in enumerate(fields):
        if len(scale) != len(planes):
            raise ValueError(f"fields[{s}]: expected one field per plane ({len(planes)}), got {len(scale)}")
        channels = None
        for p, (field, axes) in enumerate(zip(scale, planes)):
            name = f"fields[{s}][{p}]"
            if not isinstance(field, torch.Tensor) or not field.is_floating_point():
                raise TypeError(f"{name}: expected a floating-point tensor")
            rank = 1 + len(axes)
            if field.dim() not in (rank, rank + 1):
                raise ValueError(f"{name}: plane {axes} needs [C, {', '.join('DHW'[3 - len(axes):])}]"
                                 f" or [B, C, ...] (rank {rank} or {rank + 1}), got {list(field.shape)}")
            if field.dim() == rank + 1 and field.shape[0] != B:
                raise ValueError(f"{name}: per-sample field has B = {field.shape[0]}, coords have B = {B}")
            c = field.shape[-rank]
            if channels is not None and c != channels:
                raise ValueError(f"{name}: has {c} channels, the scale's first field has {channels}")
            channels = c
            if min(field.shape[-rank:]) < 1:
                raise ValueError(f"{name}: empty field {list(field.shape)}")
            if field.device != coords.device:
                raise ValueError(f"{name}: is on {field.device} but coords are on {coords.device}")
            if dtype is not None and field.dtype != dtype:
                raise TypeError(f"{name}: dtype {field.dtype} differs from fields[0][0]'s {dtype}")
            dtype = field.dtype
    return planes, fields


# ------------------------------------------------------------------------------ reference


def _unnormalize(g: torch.Tensor, size: int, align_corners: bool, padding_mode: str):
    """grid_sample's pixel coordinate of g along an axis of `size` samples; "border"
    clips it with grid_sample's gradient rule (zero at and beyond the ends)."""
    i = (g + 1) / 2 * (size - 1) if align_corners else ((g + 1) * size - 1) / 2
    if padding_mode == "border":
        inside = (i > 0) & (i < size - 1)
        i = torch.where(inside, i, i.clamp(0, size - 1).detach())
    return i


def _read_factor(coords: torch.Tensor, field: torch.Tensor, axes, align_corners: bool,
                 padding_mode: str) -> torch.Tensor:
    """One factor read by multilinear interpolation, exactly as grid_sample(bilinear):
    [B, N, C] in float32 (float64 for float64 inputs). Axis j of the factor (x, y, z) is
    the field's spatial dimension -1-j; a line is the 1-D case."""
    B, N, _ = coords.shape
    dtype = torch.float64 if torch.float64 in (coords.dtype, field.dtype) else torch.float32
    k = len(axes)
    f = field.to(dtype)
    spatial = list(f.shape[-k:])
    flat = f.reshape(*f.shape[:-k], -1)  # [(B,) C, S]
    taps = []  # per axis: (float index of the lower tap, weight of the upper tap, size, stride)
    stride = 1
    for j, axis in enumerate(axes):
        size = spatial[-1 - j]
        i = _unnormalize(coords[..., axis].to(dtype), size, align_corners, padding_mode)
        lower = torch.floor(i)
        taps.append((lower, i - lower, size, stride))
        stride *= size
    out = 0
    for corner in itertools.product((0, 1), repeat=k):
        weight, index, valid = 1, 0, True
        for (lower, frac, size, stride_j), upper in zip(taps, corner):
            pos = lower + upper
            weight = weight * (frac if upper else 1 - frac)
            # out-of-range taps read a clamped index and are masked below ("zeros"; with
            # "border" only a zero-weight upper tap past the last sample is out of range)
            valid = valid & (pos >= 0) & (pos <= size - 1)
            index = index + torch.nan_to_num(pos, nan=0.0).clamp(0, size - 1).long() * stride_j
        if flat.dim() == 3:  # per-sample field
            values = torch.gather(flat, 2, index.unsqueeze(1).expand(B, flat.shape[1], N))
        else:
            values = flat[:, index].transpose(0, 1)  # [C, B, N] -> [B, C, N]
        # an out-of-range tap contributes 0 * weight: nothing from the clamped sample it
        # read (even NaN / Inf there), NaN for a NaN coordinate, and no field gradient
        w = weight.unsqueeze(1)
        out = out + torch.where(valid.unsqueeze(1), w * values, 0 * w)
    return out.transpose(1, 2)


def reference_grid_lookup(coords, fields, planes, combine, align_corners, padding_mode):
    """Every factor read by _read_factor, combined in PyTorch: the specification."""
    outs = []
    for scale in fields:
        values = [_read_factor(coords, f, axes, align_corners, padding_mode) for f, axes in zip(scale, planes)]
        if combine == "concat":
            outs.extend(values)
        elif combine == "product":
            out = values[0]
            for v in values[1:]:
                out = out * v
            outs.append(out)
        else:
            out = torch.stack(values).sum(0)
            outs.append(out / len(values) if combine == "mean" else out)
    return torch.cat(outs, dim=-1).to(fields[0][0].dtype)


# ------------------------------------------------------------------------------- launch
# Triton is imported lazily: nfd_fast must import (and serve the reference) without it.


class _Spec:
    """The static description of one call (planes, channels per scale, options)."""

    def __init__(self, planes, fields_flat, combine, align_corners, padding_mode):
        P = len(planes)
        self.planes = planes
        self.num_scales = len(fields_flat) // P
        self.channels = [fields_flat[s * P].shape[-1 - len(planes[0])] for s in range(self.num_scales)]
        self.combine, self.align_corners, self.padding_mode = combine, align_corners, padding_mode
        meta = 0
        for p, axes in enumerate(planes):
            ax = list(axes) + [0] * (3 - len(axes))
            meta |= (len(axes) | ax[0] << 2 | ax[1] << 4 | ax[2] << 6) << (8 * p)
        self.factors = meta

    def width(self, s: int) -> int:
        return self.channels[s] * (len(self.planes) if self.combine == "concat" else 1)

    def columns(self) -> tuple:
        """(first output column of each scale, total output width)."""
        cols, col = [], 0
        for s in range(self.num_scales):
            cols.append(col)
            col += self.width(s)
        return cols, col

    def kernel_options(self, dtype, vec: int) -> dict:
        return dict(P=len(self.planes), FACTORS=self.factors,
                    COMBINE=COMBINES.index(self.combine), ALIGN=self.align_corners,
                    BORDER=self.padding_mode == "border", DTYPE=_kernel_dtype(dtype),
                    VEC=vec, num_warps=NUM_WARPS)


def _channels_at_stride_one(field: torch.Tensor, rank: int) -> torch.Tensor:
    """field itself if its channels (dimension -rank) lie at stride 1, else a channels-last
    copy of the same shape: the layout the kernels read (see the module docstring)."""
    c = field.dim() - rank
    if field.shape[c] == 1 or field.stride(c) == 1:
        return field
    return field.movedim(c, -1).contiguous().movedim(-1, c)


def _kernel_layout(flat, planes) -> list:
    P = len(planes)
    return [_channels_at_stride_one(f, 1 + len(planes[i % P])) for i, f in enumerate(flat)]


def _rows(tensors, planes, batch: int) -> tuple:
    """Rows [address, size_x, size_y, size_z, stride_b, stride_x, stride_y, stride_z] of
    fields whose channels lie at stride 1 (_channels_at_stride_one): the kernels' table."""
    rows = []
    for t, axes in zip(tensors, planes):
        rank = 1 + len(axes)
        per_sample = t.dim() == rank + 1
        st = t.stride()
        sb = st[0] if per_sample and batch > 1 else 0
        spatial, sp_strides = list(t.shape[-len(axes):]), list(st[-len(axes):])
        # grid_sample order: the last dimension is x (width), then y (height), then z (depth)
        sizes = spatial[::-1] + [1] * (3 - len(axes))
        strides = sp_strides[::-1] + [0] * (3 - len(axes))
        rows.append((t.data_ptr(), *sizes, sb, *strides))
    return tuple(rows)


def _table(rows: tuple, device) -> torch.Tensor:
    return constant_table(rows, torch.int64, device)


# channels loaded (and gradients added) VEC at a time where every table allows it: 128-bit
# accesses for float32
VECTOR = 4


def _vector_width(rows: tuple, element_size: int) -> int:
    """VECTOR if every row's address and strides are multiples of VECTOR elements (the
    kernels' alignment hint: their channels lie at stride 1), else 1."""
    aligned = all(r[0] % (VECTOR * element_size) == 0 and all(st % VECTOR == 0 for st in r[4:])
                  for r in rows)
    return VECTOR if aligned else 1


def _kernel_dtype(dtype):
    import triton.language as tl

    return {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]


# from sm_90 compile reports (tests/sm90_compile.py): 8 elements per thread per [BLOCK_N, C]
# tile keeps every layout spill-free (a tile of 64-bit tap pointers is the big cost)
BLOCK_N, MAX_BLOCK_C, NUM_WARPS = 32, 64, 8


def _launch_grid(coords, C):
    """(grid, point tiles per sample, BLOCK_N, BLOCK_C) of one scale's launch: samples
    and point tiles on axis 0, channel blocks on axis 1."""
    from triton import cdiv

    B, N, _ = coords.shape
    block_c = min(MAX_BLOCK_C, pad_pow2(C))
    tiles = cdiv(N, BLOCK_N)
    return (B * tiles, cdiv(C, block_c)), tiles, BLOCK_N, block_c


def kernel_forward(spec: _Spec, coords: torch.Tensor, flat) -> torch.Tensor:
    """One launch per scale; returns the features [B, N, F]."""
    from ..kernels import grid_lookup as K

    B, N, D = coords.shape
    P = len(spec.planes)
    cols, width = spec.columns()
    coords = coords.contiguous()
    flat = _kernel_layout(flat, spec.planes)
    out = torch.empty(B, N, width, device=coords.device, dtype=flat[0].dtype)
    for s in range(spec.num_scales):
        scale = flat[s * P:(s + 1) * P]
        grid, tiles, block_n, block_c = _launch_grid(coords, spec.channels[s])
        rows = _rows(scale, spec.planes, B)
        K.grid_lookup_fwd_kernel[grid](
            coords, _table(rows, coords.device), out, N, width, spec.channels[s], cols[s],
            tiles, D=D, BLOCK_N=block_n, BLOCK_C=block_c,
            **spec.kernel_options(out.dtype, _vector_width(rows, out.element_size())))
    return out


def kernel_backward(spec: _Spec, grad_out, coords, fields, needs) -> list:
    """Gradients [coords, *fields] (None where not needed). Field gradients are summed in
    channels-last float32 buffers (a warp's atomics touch neighbouring addresses) and
    returned in each field's own layout and dtype."""
    from ..kernels import grid_lookup as K

    B, N, D = coords.shape
    P = len(spec.planes)
    cols, width = spec.columns()
    coords = coords.contiguous()
    grad_out = grad_out.contiguous()
    dcoords = torch.zeros(B * N, D, device=coords.device, dtype=torch.float32) if needs[0] else None
    need_fields = any(needs[1:])
    # the field values are read only for coordinate gradients and "product"; otherwise
    # the table's sizes and strides are all the kernel reads, and no copy is made
    reads_values = needs[0] or spec.combine == "product"
    flat = _kernel_layout(fields, spec.planes) if reads_values else fields
    dtype = fields[0].dtype
    dfields = [_channels_last_zeros(f, 1 + len(spec.planes[i % P]))
               for i, f in enumerate(fields)] if need_fields else None
    for s in range(spec.num_scales):
        rows = _rows(flat[s * P:(s + 1) * P], spec.planes, B)
        grad_rows = _rows(dfields[s * P:(s + 1) * P], spec.planes, B) if need_fields else ()
        # the vector hint covers every table the kernel dereferences
        vec = min(_vector_width(rows, dtype.itemsize) if reads_values else VECTOR,
                  _vector_width(grad_rows, 4))
        grid, tiles, block_n, block_c = _launch_grid(coords, spec.channels[s])
        K.grid_lookup_bwd_kernel[grid](
            coords, _table(rows, coords.device),
            _table(grad_rows, coords.device) if need_fields else None, grad_out, dcoords, N,
            width, spec.channels[s], cols[s], tiles, D=D, BLOCK_N=block_n, BLOCK_C=block_c,
            **spec.kernel_options(dtype, vec))
    grads = [dcoords.view(B, N, D).to(coords.dtype) if needs[0] else None]
    grads += [_in_layout_of(f, g) if need else None for g, f, need in
              zip(dfields or [None] * len(fields), fields, needs[1:])]
    return grads


def _channels_last_zeros(field: torch.Tensor, rank: int) -> torch.Tensor:
    """float32 zeros of field's shape with channels (dimension -rank) innermost and dense,
    whatever field's own strides (an expanded or sliced field included)."""
    c = field.dim() - rank
    shape = list(field.shape)
    shape.append(shape.pop(c))
    return torch.zeros(shape, device=field.device, dtype=torch.float32).movedim(-1, c)


def _in_layout_of(field: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """grad in field's dtype and strides: no copy when they already agree, else one copy
    that casts and re-lays out together."""
    if grad.dtype == field.dtype and grad.stride() == field.stride():
        return grad
    return torch.empty_like(field).copy_(grad)


# ------------------------------------------------------------------------- registration
# nfd_fast::grid_lookup is a torch.library custom op (one opaque node for torch.compile,
# a fake implementation for shapes, registered autograd). Planes travel as flat lists:
# plane_ranks[p] axes each, concatenated in plane_axes.


def _planes_of(plane_axes: Sequence[int], plane_ranks: Sequence[int]) -> list:
    planes, i = [], 0
    for r in plane_ranks:
        planes.append(tuple(plane_axes[i:i + r]))
        i += r
    return planes


def _scales_of(flat: Sequence[torch.Tensor], P: int) -> list:
    return [list(flat[s:s + P]) for s in range(0, len(flat), P)]


def _use_kernel(coords, fields, setting: str) -> bool:
    return coords.shape[0] * coords.shape[1] > 0 and \
        backend.resolve("grid_lookup", coords, *fields, setting=setting) == "triton"


@torch.library.custom_op("nfd_fast::grid_lookup", mutates_args=())
def _grid_lookup_op(coords: torch.Tensor, fields: List[torch.Tensor], plane_axes: List[int],
                    plane_ranks: List[int], combine: str, align_corners: bool,
                    padding_mode: str, backend_setting: str) -> torch.Tensor:
    planes = _planes_of(plane_axes, plane_ranks)
    if not _use_kernel(coords, fields, backend_setting):
        return reference_grid_lookup(coords, _scales_of(fields, len(planes)), planes, combine,
                                     align_corners, padding_mode)
    spec = _Spec(planes, fields, combine, align_corners, padding_mode)
    return kernel_forward(spec, coords, fields)


@_grid_lookup_op.register_fake
def _grid_lookup_fake(coords, fields, plane_axes, plane_ranks, combine, align_corners,
                      padding_mode, backend_setting):
    planes = _planes_of(plane_axes, plane_ranks)
    spec = _Spec(planes, fields, combine, align_corners, padding_mode)
    return coords.new_empty(*coords.shape[:2], spec.columns()[1], dtype=fields[0].dtype)


@torch.library.custom_op("nfd_fast::grid_lookup_backward", mutates_args=())
def _grid_lookup_backward_op(grad_out: torch.Tensor, coords: torch.Tensor,
                             fields: List[torch.Tensor], plane_axes: List[int],
                             plane_ranks: List[int], combine: str, align_corners: bool,
                             padding_mode: str, needs: List[bool],
                             backend_setting: str) -> List[torch.Tensor]:
    """First-order gradients [coords, *fields] (empty where not needed)."""
    planes = _planes_of(plane_axes, plane_ranks)
    if _use_kernel(coords, fields, backend_setting):
        spec = _Spec(planes, fields, combine, align_corners, padding_mode)
        grads = kernel_backward(spec, grad_out, coords, fields, needs)
    else:
        grads = _grid_reference_vjp(coords, fields, planes, combine, align_corners,
                                    padding_mode, grad_out, needs, create_graph=False)
    return zeros_where_absent(grads, coords)


@_grid_lookup_backward_op.register_fake
def _grid_lookup_backward_fake(grad_out, coords, fields, plane_axes, plane_ranks, combine,
                               align_corners, padding_mode, needs,
                               backend_setting):
    return [torch.empty_like(t) if need else coords.new_empty(0, dtype=torch.float32)
            for t, need in zip([coords, *fields], needs)]


def _grid_reference_vjp(coords, fields, planes, combine, align_corners, padding_mode,
                        grad_out, needs, create_graph):
    P = len(planes)

    def forward(c, *flat):
        return reference_grid_lookup(c, _scales_of(flat, P), planes, combine, align_corners,
                                     padding_mode)

    return reference_vjp(forward, [coords, *fields], needs, grad_out, create_graph)


def _setup_context(ctx, inputs, output):
    coords, fields, *options = inputs
    ctx.options = options
    ctx.save_for_backward(coords, *fields)


def _backward(ctx, grad_out):
    coords, *fields = ctx.saved_tensors
    plane_axes, plane_ranks, combine, align_corners, padding_mode, setting = ctx.options
    needs = [ctx.needs_input_grad[0], *ctx.needs_input_grad[1]]
    if torch.is_grad_enabled():  # create_graph: the differentiable reference VJP
        grads = _grid_reference_vjp(coords, fields, _planes_of(plane_axes, plane_ranks), combine,
                                    align_corners, padding_mode, grad_out, needs, create_graph=True)
    else:
        raw = torch.ops.nfd_fast.grid_lookup_backward(
            grad_out, coords, fields, plane_axes, plane_ranks, combine, align_corners,
            padding_mode, needs, setting)
        grads = [g if need else None for g, need in zip(raw, needs)]
    return (grads[0], grads[1:]) + (None,) * 6


_grid_lookup_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------- public op


def grid_lookup(coords: torch.Tensor, fields: Sequence[Sequence[torch.Tensor]],
                planes: Sequence[Sequence[int]], *, combine: str = "sum",
                align_corners: bool = False, padding_mode: str = "border") -> torch.Tensor:
    """Read multi-scale factorized fields at coordinates; see the module docstring.
    Differentiable to any order in coords and fields (second order through the
    reference's math)."""
    planes, fields = _validate(coords, fields, planes, combine, padding_mode)
    if backend.get_backend() == "torch":  # the reference as plain PyTorch ops (inlined)
        backend.record("grid_lookup", "torch", "backend setting 'torch' (inlined reference)")
        return reference_grid_lookup(coords, fields, planes, combine, bool(align_corners),
                                     padding_mode)
    flat = [f for scale in fields for f in scale]
    return torch.ops.nfd_fast.grid_lookup(
        coords, flat, [a for axes in planes for a in axes], [len(axes) for axes in planes],
        combine, bool(align_corners), padding_mode, backend.get_backend())
