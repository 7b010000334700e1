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

Fused (backend "triton"): one launch per scale reads every plane's taps in place (any
strides: channels-last fields read contiguous channel vectors) and writes the combined
features once. Backward: field gradients by float32 atomic adds, coordinate gradients
with grid_sample's clip rule (zero at and beyond the border). NaN coordinates give NaN
features (grid_sample itself returns a border value for them in 'border' mode on CPU).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .. import backend
from ._device import host_table, pad_pow2

COMBINES = ("sum", "product", "mean", "concat")
PADDING_MODES = ("border", "zeros")


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


# ----------------------------------------------------------------------------- reference


def _read_factor(coords: torch.Tensor, field: torch.Tensor, axes, align_corners: bool,
                 padding_mode: str) -> torch.Tensor:
    """One factor by grid_sample: [B, N, C] in float32 (float64 for float64 inputs)."""
    B, N, _ = coords.shape
    dtype = torch.float64 if torch.float64 in (coords.dtype, field.dtype) else torch.float32
    g = coords.to(dtype)
    f = field.to(dtype)
    rank = 1 + len(axes)
    if f.dim() == rank:
        f = f.unsqueeze(0).expand(B, *f.shape)
    if len(axes) == 1:  # a line: a plane of height 1, read at y = 0
        f = f.unsqueeze(-2)
        grid = torch.stack([g[..., axes[0]], torch.zeros_like(g[..., 0])], dim=-1)
    else:
        grid = g[..., list(axes)]
    # grid_sample wants [B, H_out, W_out, 2] (planes) or [B, D_out, H_out, W_out, 3] (volumes)
    grid = grid.view(B, N, 1, 1, 3) if len(axes) == 3 else grid.view(B, N, 1, 2)
    out = F.grid_sample(f, grid, mode="bilinear", padding_mode=padding_mode, align_corners=align_corners)
    return out.reshape(B, f.shape[1], N).transpose(1, 2)


def reference_grid_lookup(coords, fields, planes, combine, align_corners, padding_mode):
    """grid_sample per factor, combined in PyTorch: the specification."""
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


# ----------------------------------------------------------------------------- public op


def grid_lookup(coords: torch.Tensor, fields: Sequence[Sequence[torch.Tensor]],
                planes: Sequence[Sequence[int]], *, combine: str = "sum",
                align_corners: bool = False, padding_mode: str = "border",
                sort_backward: bool = False) -> torch.Tensor:
    """Read multi-scale factorized fields at coordinates; see the module docstring.

    sort_backward (kernel only): order each sample's points by their cell in the finest
    scale's first plane before the backward, so the field-gradient atomics of a block
    hit neighbouring cells (an alternative to the plain atomic scatter, to be chosen by
    GPU measurement; the gradients are the same up to float32 summation order)."""
    planes, fields = _validate(coords, fields, planes, combine, padding_mode)
    flat = [f for scale in fields for f in scale]
    if coords.shape[0] * coords.shape[1] == 0 or backend.resolve("grid_lookup", coords, *flat) == "torch":
        return reference_grid_lookup(coords, fields, planes, combine, bool(align_corners), padding_mode)
    spec = _Spec(planes, [len(s) for s in fields], [s[0].shape[-1 - len(planes[0])] for s in fields],
                 combine, bool(align_corners), padding_mode, bool(sort_backward))
    return _GridLookupFunction.apply(spec, coords, *flat)


# ------------------------------------------------------------------------- Triton glue


class _Spec:
    """The static description of one call (planes, channels per scale, options)."""

    def __init__(self, planes, per_scale, channels, combine, align_corners, padding_mode,
                 sort_backward=False):
        self.planes, self.channels, self.sort_backward = planes, channels, sort_backward
        self.num_scales = len(per_scale)
        self.combine, self.align_corners, self.padding_mode = combine, align_corners, padding_mode
        meta = 0
        for p, axes in enumerate(planes):
            ax = list(axes) + [0] * (3 - len(axes))
            meta |= (len(axes) | ax[0] << 2 | ax[1] << 4 | ax[2] << 6) << (8 * p)
        self.factors = meta

    def width(self, s: int) -> int:
        return self.channels[s] * (len(self.planes) if self.combine == "concat" else 1)


def _table(tensors, planes, batch: int) -> torch.Tensor:
    """Rows [address, size_x, size_y, size_z, stride_b, stride_c, stride_x, stride_y, stride_z]."""
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
        rows.append([t.data_ptr(), *sizes, sb, st[-rank], *strides])
    return host_table(rows, torch.int64, tensors[0].device)


def _kernel_dtype(dtype):
    import triton.language as tl

    return {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]


# from sm_90 compile reports (tests/sm90_compile.py): 8 elements per thread per [BLOCK_N, C]
# tile keeps every layout spill-free (a tile of 64-bit tap pointers is the big cost)
BLOCK_N, MAX_BLOCK_C, NUM_WARPS = 32, 64, 8


def _launch_args(coords, C):
    """(grid, BLOCK_N, BLOCK_C) of one scale's launch."""
    from triton import cdiv

    B, N, _ = coords.shape
    block_c = min(MAX_BLOCK_C, pad_pow2(C))
    return (cdiv(N, BLOCK_N), cdiv(C, block_c), B), BLOCK_N, block_c


def _scale_columns(spec):
    cols, col = [], 0
    for s in range(spec.num_scales):
        cols.append(col)
        col += spec.width(s)
    return cols, col


def _cell_order(coords: torch.Tensor, field: torch.Tensor, axes, align_corners: bool) -> torch.Tensor:
    """perm [B, N] (int32) ordering each sample's points by their cell in `field`."""
    sizes = list(field.shape[-len(axes):])[::-1]  # x (width) first
    key = torch.zeros(coords.shape[:2], dtype=torch.int64, device=coords.device)
    for axis, size in reversed(list(zip(axes, sizes))):
        g = coords[..., axis].float()
        i = (g + 1) / 2 * (size - 1) if align_corners else ((g + 1) * size - 1) / 2
        cell = torch.nan_to_num(i, nan=0.0).clamp(0, size - 1).floor().long()
        key = key * size + cell
    return torch.argsort(key, dim=1).to(torch.int32).contiguous()


class _GridLookupFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec: _Spec, coords: torch.Tensor, *flat):
        from ..kernels import grid_lookup as K

        B, N, D = coords.shape
        P = len(spec.planes)
        cols, F_total = _scale_columns(spec)
        coords_c = coords.contiguous()
        out = torch.empty(B, N, F_total, device=coords.device, dtype=flat[0].dtype)
        for s in range(spec.num_scales):
            scale = flat[s * P:(s + 1) * P]
            grid, block_n, block_c = _launch_args(coords, spec.channels[s])
            K.grid_lookup_fwd_kernel[grid](
                coords_c, _table(scale, spec.planes, B), out, N, F_total, spec.channels[s], cols[s],
                D=D, P=P, FACTORS=spec.factors, COMBINE=COMBINES.index(spec.combine),
                ALIGN=spec.align_corners, BORDER=spec.padding_mode == "border",
                DTYPE=_kernel_dtype(flat[0].dtype), BLOCK_N=block_n, BLOCK_C=block_c, num_warps=NUM_WARPS)
        ctx.spec = spec
        ctx.save_for_backward(coords_c, *flat)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        from ..kernels import grid_lookup as K

        spec = ctx.spec
        coords, *flat = ctx.saved_tensors
        B, N, D = coords.shape
        P = len(spec.planes)
        need_coords = ctx.needs_input_grad[1]
        need_fields = any(ctx.needs_input_grad[2:])
        cols, F_total = _scale_columns(spec)
        grad_out = grad_out.contiguous()
        dcoords = torch.zeros(B * N, D, device=coords.device, dtype=torch.float32)
        dfields = [torch.zeros(f.shape, device=f.device, dtype=torch.float32) for f in flat]
        perm = coords  # unused unless sorted
        if spec.sort_backward:
            perm = _cell_order(coords, flat[(spec.num_scales - 1) * P], spec.planes[0], spec.align_corners)
        for s in range(spec.num_scales):
            scale = flat[s * P:(s + 1) * P]
            grid, block_n, block_c = _launch_args(coords, spec.channels[s])
            K.grid_lookup_bwd_kernel[grid](
                coords, _table(scale, spec.planes, B), _table(dfields[s * P:(s + 1) * P], spec.planes, B),
                grad_out, dcoords, perm, N, F_total, spec.channels[s], cols[s],
                D=D, P=P, FACTORS=spec.factors, COMBINE=COMBINES.index(spec.combine),
                ALIGN=spec.align_corners, BORDER=spec.padding_mode == "border",
                DTYPE=_kernel_dtype(flat[0].dtype), NEED_FIELDS=need_fields, NEED_COORDS=need_coords,
                SORTED=spec.sort_backward, BLOCK_N=block_n, BLOCK_C=block_c, num_warps=NUM_WARPS)
        dcoords = dcoords.view(B, N, D).to(coords.dtype) if need_coords else None
        grads = [g.to(f.dtype) if need else None
                 for g, f, need in zip(dfields, flat, ctx.needs_input_grad[2:])]
        return (None, dcoords, *grads)
