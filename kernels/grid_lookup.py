"""Triton kernels of the fused multi-scale factorized grid lookup (planes, tri-planes,
K-planes, volumes, lines), forward and backward.

One launch per scale. Each program takes BLOCK_N points of sample b and reads, for every
factor (plane) of the scale, BLOCK_C channels at the 2^ndim corner taps exactly as
torch.nn.functional.grid_sample(mode="bilinear") would:
    align_corners:  i = (g + 1) / 2 * (S - 1)        else  i = ((g + 1) S - 1) / 2
    border:         i clamped to [0, S - 1] (clip gradient 0 at and beyond the ends)
    zeros:          taps outside the grid contribute 0
and combines the factors (sum / product / mean in registers, or concat into adjacent
columns) before one store. A line factor (a,) is a plane of height 1 read at y = 0.

Factors are separate tensors whose channels lie at stride 1 (channels-last storage: a
tap's channels are one contiguous vector; the op converts other layouts once per call),
any strides otherwise. Their base addresses and strides come from an int64 table, one row
per factor: [address, size_x, size_y, size_z, stride_b, stride_x, stride_y, stride_z];
the kernel casts the address to a pointer of the field dtype. Where the host has checked
that every address and stride of the tables a launch reads is a multiple of 4 elements
(VEC = 4), alignment hints let a tap's channels load 4 at a time (128-bit for float32)
and the backward add its float32 gradients as 4-wide atomics. The factors' axes and
dimensionality are a constexpr bit-field: factor p uses bits 8p.. as
ndim (2 bits) | axis_x (2) | axis_y (2) | axis_z (2).
"""
import triton
import triton.language as tl

# Combine codes: the index of the name in nfd_fast.ops.grid_lookup.COMBINES.
SUM = tl.constexpr(0)
PRODUCT = tl.constexpr(1)
MEAN = tl.constexpr(2)
CONCAT = tl.constexpr(3)
TABLE_COLS = tl.constexpr(8)


@triton.jit
def _unnormalize(g, size, ALIGN: tl.constexpr, BORDER: tl.constexpr):
    """Pixel coordinate of g and d(pixel)/d(g) (0 where the border clip is active)."""
    sf = size.to(tl.float32)
    if ALIGN:
        i = (g + 1.0) * 0.5 * (sf - 1.0)
        scale = 0.5 * (sf - 1.0)
    else:
        i = ((g + 1.0) * sf - 1.0) * 0.5
        scale = 0.5 * sf
    dscale = tl.zeros_like(i) + scale
    if BORDER:
        # grid_sample's clip_coordinates_set_grad: gradient 0 at and beyond both ends;
        # NaN stays NaN (a plain clamp would turn it into an edge value)
        inside = (i > 0.0) & (i < sf - 1.0)
        dscale = tl.where(inside, dscale, 0.0)
        i = tl.where(i != i, i, tl.minimum(tl.maximum(i, 0.0), sf - 1.0))
    return i, dscale


@triton.jit
def _factor_geometry(table_ptr, p, coords_ptr, prow, D, META: tl.constexpr,
                     ALIGN: tl.constexpr, BORDER: tl.constexpr, row_ok):
    """Per-axis (fractional weight, floor index, size, d pixel / d g) of factor p's taps;
    META = ndim | axis_x << 2 | axis_y << 4 | axis_z << 6."""
    NDIM: tl.constexpr = META & 3
    AX: tl.constexpr = (META >> 2) & 3
    AY: tl.constexpr = (META >> 4) & 3
    AZ: tl.constexpr = (META >> 6) & 3
    row = table_ptr + p * TABLE_COLS
    sx = tl.load(row + 1)
    sy = tl.load(row + 2)
    sz = tl.load(row + 3)
    gx = tl.load(coords_ptr + prow * D + AX, mask=row_ok, other=0.0).to(tl.float32)
    ix, dx = _unnormalize(gx, sx, ALIGN, BORDER)
    fx = tl.floor(ix)
    if NDIM >= 2:
        gy = tl.load(coords_ptr + prow * D + AY, mask=row_ok, other=0.0).to(tl.float32)
        iy, dy = _unnormalize(gy, sy, ALIGN, BORDER)
    else:  # a line: y = 0 on a plane of height 1
        iy = tl.zeros_like(ix)
        dy = tl.zeros_like(ix)
    fy = tl.floor(iy)
    if NDIM == 3:
        gz = tl.load(coords_ptr + prow * D + AZ, mask=row_ok, other=0.0).to(tl.float32)
        iz, dz = _unnormalize(gz, sz, ALIGN, BORDER)
    else:
        iz = tl.zeros_like(ix)
        dz = tl.zeros_like(ix)
    fz = tl.floor(iz)
    return ix - fx, iy - fy, iz - fz, fx.to(tl.int64), fy.to(tl.int64), fz.to(tl.int64), \
        sx, sy, sz, dx, dy, dz


@triton.jit
def _tap(k: tl.constexpr, tx, ty, tz, x0, y0, z0, sx, sy, sz, NDIM: tl.constexpr):
    """Corner k (bit 0: x, 1: y, 2: z): its weight, its weight's derivatives along
    (x, y, z) in pixel units, its indices and whether it lies inside the grid."""
    bx: tl.constexpr = k & 1
    by: tl.constexpr = (k >> 1) & 1
    bz: tl.constexpr = (k >> 2) & 1
    wx = tx if bx == 1 else 1.0 - tx
    wy = ty if by == 1 else 1.0 - ty
    wz = tz if bz == 1 else 1.0 - tz
    sgx = 1.0 if bx == 1 else -1.0
    sgy = 1.0 if by == 1 else -1.0
    sgz = 1.0 if bz == 1 else -1.0
    cx = x0 + bx
    cy = y0 + by
    cz = z0 + bz
    inside = (cx >= 0) & (cx < sx) & (cy >= 0) & (cy < sy)
    if NDIM == 3:
        inside = inside & (cz >= 0) & (cz < sz)
        w = wx * wy * wz
        dwx = sgx * wy * wz
        dwy = wx * sgy * wz
        dwz = wx * wy * sgz
    else:
        w = wx * wy
        dwx = sgx * wy
        dwy = wx * sgy
        dwz = w * 0.0
    return w, dwx, dwy, dwz, cx, cy, cz, inside


@triton.jit
def _tap_pointer(table_ptr, p, b, cx, cy, cz, ch, DTYPE: tl.constexpr, VEC: tl.constexpr):
    """Pointers [BLOCK_N, BLOCK_C] of the taps' channels (at stride 1). The host checked
    that the table's addresses and strides are multiples of VEC elements: with VEC = 4
    the hints below let a tap's channels load (and add) 4 at a time."""
    row = table_ptr + p * TABLE_COLS
    base = tl.multiple_of(tl.load(row).to(tl.pointer_type(DTYPE)), VEC * (DTYPE.primitive_bitwidth // 8))
    off = b * _stride(row, 4, VEC) + cx * _stride(row, 5, VEC) + cy * _stride(row, 6, VEC) + \
        cz * _stride(row, 7, VEC)
    return base + off[:, None] + ch[None, :]


@triton.jit
def _stride(row, k: tl.constexpr, VEC: tl.constexpr):
    return tl.multiple_of(tl.load(row + k), VEC)


@triton.jit
def _factor_value(table_ptr, p, b, coords_ptr, prow, D, ch, ch_ok, row_ok,
                  META: tl.constexpr, ALIGN: tl.constexpr, BORDER: tl.constexpr,
                  DTYPE: tl.constexpr, VEC: tl.constexpr, NEED_DCOORD: tl.constexpr):
    """v [BLOCK_N, BLOCK_C] of factor p, and (if NEED_DCOORD) dv/dg per axis."""
    NDIM: tl.constexpr = META & 3
    tx, ty, tz, x0, y0, z0, sx, sy, sz, dsx, dsy, dsz = _factor_geometry(
        table_ptr, p, coords_ptr, prow, D, META, ALIGN, BORDER, row_ok)
    v = tl.zeros((prow.shape[0], ch.shape[0]), tl.float32)
    vx = tl.zeros_like(v)
    vy = tl.zeros_like(v)
    vz = tl.zeros_like(v)
    for k in tl.static_range(1 << NDIM):  # a line (NDIM 1) has 2 taps
        w, dwx, dwy, dwz, cx, cy, cz, inside = _tap(k, tx, ty, tz, x0, y0, z0, sx, sy, sz, NDIM)
        ok = (inside & row_ok)[:, None] & ch_ok[None, :]
        f = tl.load(_tap_pointer(table_ptr, p, b, cx, cy, cz, ch, DTYPE, VEC), mask=ok, other=0.0)
        f = f.to(tl.float32)
        v += w[:, None] * f
        if NEED_DCOORD:
            vx += (dwx * dsx)[:, None] * f
            vy += (dwy * dsy)[:, None] * f
            vz += (dwz * dsz)[:, None] * f
    return v, vx, vy, vz


@triton.jit
def _program_tile(N, C, point_tiles, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's sample b, point rows (global row prow, in-range row_ok) and
    channels (ch, ch_ok): point tile pid % point_tiles of sample pid // point_tiles on
    axis 0 (CUDA allows 2^31 - 1 programs there), channel block program_id(1)."""
    pid = tl.program_id(0).to(tl.int64)
    b = pid // point_tiles
    n = (pid % point_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    ch = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    return b, b * N + n.to(tl.int64), n < N, ch, ch < C


@triton.jit
def grid_lookup_fwd_kernel(
    coords_ptr, table_ptr, out_ptr, N, F, C, col0, point_tiles, D: tl.constexpr,
    P: tl.constexpr, FACTORS: tl.constexpr, COMBINE: tl.constexpr,
    ALIGN: tl.constexpr, BORDER: tl.constexpr, DTYPE: tl.constexpr, VEC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """out[b, n, col0 + ...] = combine over the P factors of this scale, for the points
    and channels of this program (_program_tile)."""
    b, prow, row_ok, ch, ch_ok = _program_tile(N, C, point_tiles, BLOCK_N, BLOCK_C)
    out_mask = row_ok[:, None] & ch_ok[None, :]
    if COMBINE == PRODUCT:
        acc = tl.full((BLOCK_N, BLOCK_C), 1.0, tl.float32)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_C), tl.float32)
    for p in tl.static_range(P):
        v, _, _, _ = _factor_value(table_ptr, p, b, coords_ptr, prow, D, ch, ch_ok, row_ok,
                                   (FACTORS >> (8 * p)) & 255, ALIGN, BORDER, DTYPE, VEC, False)
        if COMBINE == CONCAT:
            tl.store(out_ptr + prow[:, None] * F + (col0 + p * C + ch)[None, :],
                     v.to(out_ptr.dtype.element_ty), mask=out_mask)
        elif COMBINE == PRODUCT:
            acc *= v
        else:
            acc += v
    if COMBINE != CONCAT:
        if COMBINE == MEAN:
            acc = acc / P
        tl.store(out_ptr + prow[:, None] * F + (col0 + ch)[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def grid_lookup_bwd_kernel(
    coords_ptr, table_ptr, grad_table_ptr, grad_out_ptr, dcoords_ptr, N, F, C, col0,
    point_tiles, D: tl.constexpr, P: tl.constexpr, FACTORS: tl.constexpr, COMBINE: tl.constexpr,
    ALIGN: tl.constexpr, BORDER: tl.constexpr, DTYPE: tl.constexpr, VEC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Gradients of one scale: fields by atomic adds into float32 buffers (grad_table
    rows hold their addresses and strides), coordinates added into dcoords [B*N, D].
    A gradient not wanted has a None pointer (grad_table or dcoords), and its code is
    compiled out. The atomics are relaxed: a gradient sum needs no ordering, and the
    default acq_rel would put a GPU-wide fence and an L1 invalidation around each one.

    For "product" the factor's upstream gradient is grad_out times the product of the
    other factors, recomputed here (P^2 gathers; P <= 6 in practice)."""
    b, prow, row_ok, ch, ch_ok = _program_tile(N, C, point_tiles, BLOCK_N, BLOCK_C)
    mask2 = row_ok[:, None] & ch_ok[None, :]
    go = tl.zeros((BLOCK_N, BLOCK_C), tl.float32)
    if COMBINE != CONCAT:
        go = tl.load(grad_out_ptr + prow[:, None] * F + (col0 + ch)[None, :], mask=mask2,
                     other=0.0).to(tl.float32)
        if COMBINE == MEAN:
            go = go / P
    gcx = tl.zeros((BLOCK_N,), tl.float32)
    gcy = tl.zeros((BLOCK_N,), tl.float32)
    gcz = tl.zeros((BLOCK_N,), tl.float32)
    gcw = tl.zeros((BLOCK_N,), tl.float32)
    for p in tl.static_range(P):
        gcx, gcy, gcz, gcw = _factor_backward(
            table_ptr, grad_table_ptr, grad_out_ptr, coords_ptr, p, b, prow, D, F, C, col0,
            ch, ch_ok, row_ok, mask2, go, gcx, gcy, gcz, gcw, P, FACTORS,
            (FACTORS >> (8 * p)) & 255, COMBINE, ALIGN, BORDER, DTYPE, VEC,
            grad_table_ptr is not None, dcoords_ptr is not None)
    if dcoords_ptr is not None:
        # one (scale, channel block) program per point adds in turn: atomics keep the
        # channel blocks of a point from racing
        base = dcoords_ptr + prow * D
        tl.atomic_add(base + 0, gcx, mask=row_ok, sem="relaxed")
        if D > 1:
            tl.atomic_add(base + 1, gcy, mask=row_ok, sem="relaxed")
        if D > 2:
            tl.atomic_add(base + 2, gcz, mask=row_ok, sem="relaxed")
        if D > 3:
            tl.atomic_add(base + 3, gcw, mask=row_ok, sem="relaxed")


@triton.jit
def _factor_backward(table_ptr, grad_table_ptr, grad_out_ptr, coords_ptr, p, b, prow, D, F, C,
                     col0, ch, ch_ok, row_ok, mask2, go, gcx, gcy, gcz, gcw,
                     P: tl.constexpr, FACTORS: tl.constexpr, META: tl.constexpr,
                     COMBINE: tl.constexpr, ALIGN: tl.constexpr, BORDER: tl.constexpr,
                     DTYPE: tl.constexpr, VEC: tl.constexpr, NEED_FIELDS: tl.constexpr,
                     NEED_COORDS: tl.constexpr):
    """Factor p's share of the backward: its field gradient, and its coordinate gradient
    added to the per-axis accumulators (returned)."""
    if COMBINE == CONCAT:
        g = tl.load(grad_out_ptr + prow[:, None] * F + (col0 + p * C + ch)[None, :],
                    mask=mask2, other=0.0).to(tl.float32)
    elif COMBINE == PRODUCT:
        g = go
        for q in tl.static_range(P):
            if q != p:
                vq, _, _, _ = _factor_value(table_ptr, q, b, coords_ptr, prow, D, ch, ch_ok,
                                            row_ok, (FACTORS >> (8 * q)) & 255, ALIGN, BORDER,
                                            DTYPE, VEC, False)
                g = g * vq
    else:
        g = go
    if NEED_FIELDS:
        _scatter_field_grad(table_ptr, grad_table_ptr, p, b, coords_ptr, prow, D, ch, ch_ok,
                            row_ok, g, META, ALIGN, BORDER, VEC)
    if NEED_COORDS:
        _, vx, vy, vz = _factor_value(table_ptr, p, b, coords_ptr, prow, D, ch, ch_ok, row_ok,
                                      META, ALIGN, BORDER, DTYPE, VEC, True)
        # dL/dg_axis = sum_c g * dv/dg_axis, routed to the factor's coordinate axes
        gcx, gcy, gcz, gcw = _route(gcx, gcy, gcz, gcw, tl.sum(g * vx, 1), (META >> 2) & 3)
        if (META & 3) >= 2:
            gcx, gcy, gcz, gcw = _route(gcx, gcy, gcz, gcw, tl.sum(g * vy, 1), (META >> 4) & 3)
        if (META & 3) == 3:
            gcx, gcy, gcz, gcw = _route(gcx, gcy, gcz, gcw, tl.sum(g * vz, 1), (META >> 6) & 3)
    return gcx, gcy, gcz, gcw


@triton.jit
def _route(gx, gy, gz, gw, s, AXIS: tl.constexpr):
    if AXIS == 0:
        gx += s
    elif AXIS == 1:
        gy += s
    elif AXIS == 2:
        gz += s
    else:
        gw += s
    return gx, gy, gz, gw


@triton.jit
def _scatter_field_grad(table_ptr, grad_table_ptr, p, b, coords_ptr, prow, D, ch, ch_ok, row_ok,
                        g, META: tl.constexpr, ALIGN: tl.constexpr, BORDER: tl.constexpr,
                        VEC: tl.constexpr):
    """d field[corner, c] += w_corner * g[n, c] for every tap (float32 atomics)."""
    NDIM: tl.constexpr = META & 3
    tx, ty, tz, x0, y0, z0, sx, sy, sz, _, _, _ = _factor_geometry(
        table_ptr, p, coords_ptr, prow, D, META, ALIGN, BORDER, row_ok)
    for k in tl.static_range(1 << NDIM):  # a line (NDIM 1) has 2 taps
        w, _, _, _, cx, cy, cz, inside = _tap(k, tx, ty, tz, x0, y0, z0, sx, sy, sz, NDIM)
        ok = (inside & row_ok)[:, None] & ch_ok[None, :]
        ptrs = _tap_pointer(grad_table_ptr, p, b, cx, cy, cz, ch, tl.float32, VEC)
        tl.atomic_add(ptrs, w[:, None] * g, mask=ok, sem="relaxed")
