"""Triton kernel of DDMI's coarse-to-fine readout (nfd_fast.ops.cfc): lookups, blocks and
output layer of one tile of points in one program.

Per point, blocks k = 0 .. K-1 of L linear layers each (see nfd_fast.nn.cfc for the math):
    f_k  = combine over planes of bilinear reads of scale s_k      (none for some blocks)
    z_0  = W_h h + W_f f_k + b'_0 (+ w_noise n)                    (split weights: no concat)
    z_l  = W_l a_{l-1} + b_l (+ w_noise n)
    styled:    a_l = gain * leaky_relu(z_l), block input fed as it is, y = a_{L-1}
    resnet_fc: a_l = relu(z_l), block input fed as relu(x), y = z_{L-1}
    h    = (y + S_h h + S_f f_k + s_b) * residual_gain   (S = I when the block has no skip)
    after block 0: h += P p + c;  out = W_o act_o(h) + b_o

Memory layout (prepared by nfd_fast.ops.cfc):
    coords [B, N, DIM]; fields: grid_lookup's factor table (kernels/grid_lookup.py), one row
    per (scale, plane), scale-major, channels at stride 1 (VEC: loaded VEC at a time);
    channels [S] int32, each scale's channel count.
    w   [Bw, K * BLOCK_W + OUT_PAD * H] in the dot dtype: per block, zero-padded [out, in]
        matrices W_h [H, H], W_f [H, FP], W_1 .. W_{L-1} [H, H], S_h [H, H], S_f [H, FP]
        (layer l >= 1 at H^2 + H FP + (l - 1) H^2 = H FP + l H^2, the skip after them)
        (BLOCK_W = (L + 1) H^2 + 2 H FP), then W_o [OUT_PAD, H]. Stride 0 when shared.
    vec [Bv, K * (L + 1) * H + H + OUT_PAD] float32: per block the L biases (constant
        channels folded in) and s_b, then c and b_o.
    pw  [H, PIN_PAD] float32 (point layer), nw [K, L] float32 noise weights, noise_table
        [K * L] int64 addresses of the noise inputs [B, N] (0 where absent).
Training (SAVE): the kernel also writes, float32, what the backward reads: each layer's
pre-activation z_l, each block's output h and features f_k (the backward is host code over
kernels/fused_mlp.py's backward layer kernel and grid_lookup's backward; nfd_fast.ops.cfc).
Zero padding makes padded units exactly zero: zero weights and zero biases in, and zero
weight columns out, so they never reach a real unit.

What stays on chip: the features (bilinear taps read straight into registers), the
hidden states and the residual stream; only coords, fields, weights and the output
touch device memory. Triton cannot slice a register tensor, and a [H, H] float32 weight
tile (256 KB at H = 256) does not fit in shared memory, so (as in kernels/fused_mlp.py)
layers run in pairs: layer a's output units BLOCK_N at a time from the full-width input,
activated and multiplied at once into layer b's full-width accumulator. A layer whose
full-width output is needed without a partner (the last of an odd L, the skip of an even
L) produces BLOCK_N-column chunks and adds each into the full-width result as a product
with a 0/1 selection matrix (one more H x H product per block on the tensor cores: a
register select through a [BLOCK_M, H / BLOCK_N, BLOCK_N] tensor made ptxas put the
whole kernel in local memory, sm_90a compile reports). A chunk holding Inf turns its row
NaN there (Inf * 0), where the reference keeps the Inf; NaN stays NaN either way.
"""
import triton
import triton.language as tl

from .fused_mlp import DOT_FP32, _load_weight_t, _operand
from .grid_lookup import CONCAT, MEAN, PRODUCT, _factor_value

# Block kinds: the index of the name in nfd_fast.ops.cfc.BLOCK_KINDS.
STYLED = tl.constexpr(0)
RESNET_FC = tl.constexpr(1)
# Per-block digits of the constexpr SCALES (scale + 1, 0: no scale) and INNER (chunks of
# BLOCK_N in the block's inner width); bit k of SKIPS / NOISE: block k has a skip matrix /
# noise inputs. (Digit arithmetic: the interpreter's constexpr has no >>.)
SCALE_BASE = tl.constexpr(64)
INNER_BASE = tl.constexpr(64)


@triton.jit
def _dot(a, b, acc, DOT_KIND: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b with float32 accumulation, a cast to the mode's operand dtype: the
    operand kinds and precisions of kernels/fused_mlp.py (DOT_FP32 with input_precision
    ieee / tf32 / tf32x3, or 16-bit operands). The sum goes into acc itself, so a running
    accumulator takes the dot in place."""
    if DOT_KIND == DOT_FP32:
        c = tl.dot(a, b, acc, input_precision=PRECISION)
    else:
        c = tl.dot(_operand(a, DOT_KIND), b, acc)
    return c


@triton.jit
def _relu(x):
    return tl.where(x != x, x, tl.maximum(x, 0.0))  # NaN in, NaN out (maximum drops it)


@triton.jit
def _feed(z, slope, gain, BLOCK_KIND: tl.constexpr):
    """What a layer passes on: gain * leaky_relu(z) (styled), relu(z) (resnet_fc)."""
    if BLOCK_KIND == STYLED:
        a = gain * tl.where(z >= 0.0, z, slope * z)
    else:
        a = _relu(z)
    return a


@triton.jit
def _features(table_ptr, chan_ptr, s, b, coords_ptr, prow, row_ok, DIM: tl.constexpr,
              P: tl.constexpr, FACTORS: tl.constexpr, COMBINE: tl.constexpr,
              ALIGN: tl.constexpr, BORDER: tl.constexpr, DTYPE: tl.constexpr, VEC: tl.constexpr,
              CP: tl.constexpr, PP: tl.constexpr, BLOCK_M: tl.constexpr):
    """f [BLOCK_M, FP] of scale s, float32: the planes combined, or for concat placed
    plane-major in [BLOCK_M, PP, CP] and flattened (FP = PP * CP, padded planes zero)."""
    ch = tl.arange(0, CP)
    ch_ok = ch < tl.load(chan_ptr + s)
    if COMBINE == CONCAT:
        f3 = tl.zeros((BLOCK_M, PP, CP), tl.float32)
        slot = tl.arange(0, PP)
    elif COMBINE == PRODUCT:
        f = tl.full((BLOCK_M, CP), 1.0, tl.float32)
    else:
        f = tl.zeros((BLOCK_M, CP), tl.float32)
    for p in tl.static_range(P):
        v, _, _, _ = _factor_value(table_ptr, s * P + p, b, coords_ptr, prow, DIM, ch, ch_ok,
                                   row_ok, (FACTORS >> (8 * p)) & 255, ALIGN, BORDER, DTYPE,
                                   VEC, False)
        if COMBINE == CONCAT:
            f3 = tl.where((slot == p)[None, :, None], v[:, None, :], f3)
        elif COMBINE == PRODUCT:
            f = f * v
        else:
            f = f + v
    if COMBINE == CONCAT:
        f = tl.reshape(f3, (BLOCK_M, PP * CP))
    elif COMBINE == MEAN:
        f = f / P
    return f


@triton.jit
def _noise(noise_table_ptr, nw_ptr, layer, grow, row_ok, NOISE_DTYPE: tl.constexpr):
    """w_noise * n[b, point] of one (block, layer), [BLOCK_M, 1]."""
    base = tl.load(noise_table_ptr + layer).to(tl.pointer_type(NOISE_DTYPE))
    n = tl.load(base + grow, mask=row_ok, other=0.0).to(tl.float32)
    return (tl.load(nw_ptr + layer) * n)[:, None]


@triton.jit
def _split_chunk(xh, xf, wh_ptr, wf_ptr, cols, HAS_H: tl.constexpr, HAS_F: tl.constexpr,
                 H: tl.constexpr, FP: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, DOT_KIND: tl.constexpr, PRECISION: tl.constexpr):
    """Columns `cols` of W_h xh + W_f xf (either part absent): the split concatenation."""
    z = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    if HAS_H:
        z = _dot(xh, _load_weight_t(wh_ptr, tl.arange(0, H), cols, H), z, DOT_KIND, PRECISION)
    if HAS_F:
        z = _dot(xf, _load_weight_t(wf_ptr, tl.arange(0, FP), cols, FP), z, DOT_KIND, PRECISION)
    return z


@triton.jit
def _place(acc, chunk, cols, full, DOT_KIND: tl.constexpr, PRECISION: tl.constexpr):
    """acc [BLOCK_M, H] plus chunk [BLOCK_M, BLOCK_N] in the columns `cols`, as a product
    with the 0/1 selection matrix E[c, n] = (n == cols[c]): on the tensor cores, exact up
    to the mode's rounding of the chunk."""
    select = tl.where(full[None, :] == cols[:, None], 1.0, 0.0)
    return _dot(chunk, _operand(select, DOT_KIND), acc, DOT_KIND, PRECISION)


@triton.jit
def _save(ptr, x, grow, row_ok, cols, WIDTH: tl.constexpr):
    """x [BLOCK_M, len(cols)] into the rows `grow` of a saved [M, WIDTH] float32 plane."""
    tl.store(ptr + grow[:, None] * WIDTH + cols[None, :], x, mask=row_ok[:, None])


@triton.jit
def _block(h, wk, bk, table_ptr, chan_ptr, b, coords_ptr, grow, row_ok, noise_table_ptr, nw_ptr,
           first_noise, slope, gain, residual_gain, zs, fs, plane,
           HAS_H: tl.constexpr, SCALE: tl.constexpr, HAS_SKIP: tl.constexpr,
           HAS_NOISE: tl.constexpr, INNER_END: tl.constexpr, LAYERS: tl.constexpr,
           BLOCK_KIND: tl.constexpr, H: tl.constexpr, FP: tl.constexpr, CP: tl.constexpr,
           PP: tl.constexpr, DIM: tl.constexpr, P: tl.constexpr, FACTORS: tl.constexpr,
           COMBINE: tl.constexpr, ALIGN: tl.constexpr, BORDER: tl.constexpr,
           DTYPE: tl.constexpr, VEC: tl.constexpr, NOISE_DTYPE: tl.constexpr,
           DOT_KIND: tl.constexpr, PRECISION: tl.constexpr, SAVE: tl.constexpr,
           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One block: h (the residual stream, [BLOCK_M, H] float32) -> the next h. wk / bk:
    the block's packed matrices and bias vectors; SCALE: the scale read + 1 (0: none);
    INNER_END: the inner width rounded up to BLOCK_N; first_noise: the index of the
    block's first layer among the noise inputs. SAVE: z_l goes to the plane zs + l * plane
    ([M, H] float32 each) and the features to fs ([M, FP]) for the backward."""
    HAS_F: tl.constexpr = SCALE > 0
    full = tl.arange(0, H)
    f = tl.zeros((BLOCK_M, FP), tl.float32)
    if HAS_F:
        f = _features(table_ptr, chan_ptr, SCALE - 1, b, coords_ptr, grow, row_ok, DIM, P,
                      FACTORS, COMBINE, ALIGN, BORDER, DTYPE, VEC, CP, PP, BLOCK_M)
        if SAVE:
            _save(fs, f, grow, row_ok, tl.arange(0, FP), FP)
    # the block input x = [h, f] as the dots read it (operands converted once)
    if BLOCK_KIND == RESNET_FC:
        xh = _operand(_relu(h), DOT_KIND)
        xf = _operand(_relu(f), DOT_KIND)
    else:
        xh = _operand(h, DOT_KIND)
        xf = _operand(f, DOT_KIND)
    sh = _operand(h, DOT_KIND)  # the skip reads x itself
    sf = _operand(f, DOT_KIND)

    y = tl.zeros((BLOCK_M, H), tl.float32)
    for q in tl.static_range(LAYERS // 2):
        # layers 2q and 2q + 1 (indices inline: they must stay compile-time values)
        acc = tl.zeros((BLOCK_M, H), tl.float32)
        for j in range(0, INNER_END, BLOCK_N):
            cj = j + tl.arange(0, BLOCK_N)
            if q == 0:
                z = _split_chunk(xh, xf, wk, wk + H * H, cj, HAS_H, HAS_F, H, FP, BLOCK_M,
                                 BLOCK_N, DOT_KIND, PRECISION)
            else:
                z = _dot(xh, _load_weight_t(wk + H * FP + 2 * q * H * H, full, cj, H),
                         tl.zeros((BLOCK_M, BLOCK_N), tl.float32), DOT_KIND, PRECISION)
            z += tl.load(bk + 2 * q * H + cj)[None, :]
            if HAS_NOISE:
                z += _noise(noise_table_ptr, nw_ptr, first_noise + 2 * q, grow, row_ok,
                            NOISE_DTYPE)
            if SAVE:
                _save(zs + 2 * q * plane, z, grow, row_ok, cj, H)
            a = _feed(z, slope, gain, BLOCK_KIND)
            acc = _dot(a, _load_weight_t(wk + H * FP + (2 * q + 1) * H * H, cj, full, H), acc,
                       DOT_KIND, PRECISION)
        acc += tl.load(bk + (2 * q + 1) * H + full)[None, :]
        if HAS_NOISE:
            acc += _noise(noise_table_ptr, nw_ptr, first_noise + 2 * q + 1, grow, row_ok,
                          NOISE_DTYPE)
        if SAVE:
            _save(zs + (2 * q + 1) * plane, acc, grow, row_ok, full, H)
        if 2 * q + 1 == LAYERS - 1:
            if BLOCK_KIND == STYLED:
                y = _feed(acc, slope, gain, BLOCK_KIND)
            else:
                y = acc
        else:
            xh = _operand(_feed(acc, slope, gain, BLOCK_KIND), DOT_KIND)

    # the skip (even L) or the last layer with the skip (odd L), chunk by chunk
    if LAYERS % 2 == 1 or HAS_SKIP:
        for j in range(0, H, BLOCK_N):
            cj = j + tl.arange(0, BLOCK_N)
            r = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            if LAYERS % 2 == 1:
                if LAYERS == 1:
                    z = _split_chunk(xh, xf, wk, wk + H * H, cj, HAS_H, HAS_F, H, FP,
                                     BLOCK_M, BLOCK_N, DOT_KIND, PRECISION)
                else:
                    z = _dot(xh, _load_weight_t(wk + H * FP + (LAYERS - 1) * H * H, full, cj, H),
                             tl.zeros((BLOCK_M, BLOCK_N), tl.float32), DOT_KIND, PRECISION)
                z += tl.load(bk + (LAYERS - 1) * H + cj)[None, :]
                if HAS_NOISE:
                    z += _noise(noise_table_ptr, nw_ptr, first_noise + LAYERS - 1, grow,
                                row_ok, NOISE_DTYPE)
                if SAVE:
                    _save(zs + (LAYERS - 1) * plane, z, grow, row_ok, cj, H)
                if BLOCK_KIND == STYLED:
                    r = _feed(z, slope, gain, BLOCK_KIND)
                else:
                    r = z
            if HAS_SKIP:
                skip = wk + H * FP + LAYERS * H * H
                r += _split_chunk(sh, sf, skip, skip + H * H, cj, HAS_H, HAS_F, H, FP,
                                  BLOCK_M, BLOCK_N, DOT_KIND, PRECISION)
                r += tl.load(bk + LAYERS * H + cj)[None, :]
            y = _place(y, r, cj, full, DOT_KIND, PRECISION)
    if not HAS_SKIP:  # identity: the block input is h alone (the op checks it)
        y += h
    h = y * residual_gain
    return h


@triton.jit
def cfc_decode_fwd_kernel(
    coords_ptr, table_ptr, chan_ptr, points_ptr, w_ptr, vec_ptr, pw_ptr, nw_ptr,
    noise_table_ptr, y_ptr, z_ptr, f_ptr,
    N, M, PIN, OUT, point_tiles, stride_wb, stride_vb, slope, gain, residual_gain, out_slope,
    NUM_BLOCKS: tl.constexpr, LAYERS: tl.constexpr, BLOCK_KIND: tl.constexpr,
    SCALES: tl.constexpr, INNER: tl.constexpr, SKIPS: tl.constexpr, NOISE: tl.constexpr,
    H: tl.constexpr, FP: tl.constexpr, CP: tl.constexpr, PP: tl.constexpr,
    DIM: tl.constexpr, P: tl.constexpr, FACTORS: tl.constexpr, COMBINE: tl.constexpr,
    ALIGN: tl.constexpr, BORDER: tl.constexpr, DTYPE: tl.constexpr, VEC: tl.constexpr,
    NOISE_DTYPE: tl.constexpr, PIN_PAD: tl.constexpr, OUT_PAD: tl.constexpr, OUT_ACT: tl.constexpr,
    DOT_KIND: tl.constexpr, PRECISION: tl.constexpr, SAVE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """y[b, rows] = the readout of BLOCK_M points of sample b. Programs run along grid
    axis 0 only (2^31 - 1 there, 65,535 on axes 1 and 2): program pid is point tile
    pid % point_tiles of sample pid // point_tiles. Absent inputs are None pointers
    (points, noise table) and their code is compiled out.

    SAVE (training): what the backward reads, float32, M = B * N rows each: z_ptr
    [K, L + 1, M, H] holds block k's pre-activations z_0 .. z_{L-1} and its output h
    (after the point layer for block 0, so the last is act_o's input); f_ptr [K, M, FP]
    the features of each block that reads a scale. The caller zeroes z_ptr: columns
    past a layer's inner width are never written (they are zero)."""
    pid = tl.program_id(0).to(tl.int64)
    b = pid // point_tiles
    rows = (pid % point_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    grow = b * N + rows.to(tl.int64)  # int64: B * N * width passes 2^31 at scale
    w_base = w_ptr + b * stride_wb
    v_base = vec_ptr + b * stride_vb
    BLOCK_W: tl.constexpr = (LAYERS + 1) * H * H + 2 * H * FP
    full = tl.arange(0, H)
    plane = (b * 0 + M) * H  # int64: K (L + 1) M H passes 2^31 at a few million points

    h = tl.zeros((BLOCK_M, H), tl.float32)
    for k in tl.static_range(NUM_BLOCKS):
        zs, fs = z_ptr, f_ptr  # (None when not saving)
        if SAVE:
            zs = z_ptr + k * (LAYERS + 1) * plane
            fs = f_ptr + k * (plane // H) * FP
        # the block's flags are passed inline: a constexpr bound to a local name inside
        # a static loop cannot be bound again on the next iteration
        h = _block(h, w_base + k * BLOCK_W, v_base + k * (LAYERS + 1) * H, table_ptr, chan_ptr,
                   b, coords_ptr, grow, row_ok, noise_table_ptr, nw_ptr, k * LAYERS, slope, gain,
                   residual_gain, zs, fs, plane, k > 0, (SCALES // SCALE_BASE ** k) % SCALE_BASE,
                   (SKIPS // 2 ** k) % 2 == 1, (NOISE // 2 ** k) % 2 == 1,
                   ((INNER // INNER_BASE ** k) % INNER_BASE) * BLOCK_N, LAYERS, BLOCK_KIND, H, FP,
                   CP, PP, DIM, P, FACTORS, COMBINE, ALIGN, BORDER, DTYPE, VEC, NOISE_DTYPE,
                   DOT_KIND, PRECISION, SAVE, BLOCK_M, BLOCK_N)
        if k == 0:
            if points_ptr is not None:  # h += P p + c, K = PIN tiny: float32 in every mode
                pin = tl.arange(0, PIN_PAD)
                p = tl.load(points_ptr + grow[:, None] * PIN + pin[None, :],
                            mask=row_ok[:, None] & (pin < PIN)[None, :], other=0.0)
                h = _dot(p.to(tl.float32), _load_weight_t(pw_ptr, pin, full, PIN_PAD), h,
                         DOT_FP32, "ieee")
                h += tl.load(v_base + NUM_BLOCKS * (LAYERS + 1) * H + full)[None, :]
        if SAVE:
            _save(zs + LAYERS * plane, h, grow, row_ok, full, H)

    if OUT_ACT:
        h = tl.where(h >= 0.0, h, out_slope * h)
    oc = tl.arange(0, OUT_PAD)
    out = _dot(h, _load_weight_t(w_base + NUM_BLOCKS * BLOCK_W, full, oc, H),
               tl.zeros((BLOCK_M, OUT_PAD), tl.float32), DOT_KIND, PRECISION)
    out += tl.load(v_base + NUM_BLOCKS * (LAYERS + 1) * H + H + oc)[None, :]
    tl.store(y_ptr + grow[:, None] * OUT + oc[None, :], out.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (oc < OUT)[None, :])


@triton.jit
def cfc_decode_bwd_residual_kernel(dh_ptr, z_ptr, dr_ptr, dz_ptr, numel, residual_gain, slope,
                                   gain, BLOCK: tl.constexpr):
    """Into a styled block's backward, one pass over dh (its output's gradient) and z_{L-1}:
    dr = residual_gain * dh (the skip's gradient) and dz_{L-1} = dr * gain *
    leaky_relu'(z_{L-1}), the slope at and below zero as torch's backward takes it.
    Elements flat (int64: M * H passes 2^31)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    dr = tl.load(dh_ptr + offs, mask=ok) * residual_gain
    tl.store(dr_ptr + offs, dr, mask=ok)
    z = tl.load(z_ptr + offs, mask=ok)
    tl.store(dz_ptr + offs, dr * gain * tl.where(z > 0.0, 1.0, slope), mask=ok)
