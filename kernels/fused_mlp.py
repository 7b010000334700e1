"""Triton kernels of the fused coordinate MLP (SIREN, modulated SIREN, ReLU/GELU/... MLPs).

Math (layer l = 0 .. L-1, hidden layers l < L-1, h_{-1} = x):
    z_l = W_l h_{l-1} + b_l
    u_l = scale_l * z_l + shift_l                       (FiLM, functa / COIN++)
    h_l = act_l(u_l) * mult_l                           (multiplicative, siren-pytorch)
    y   = final_act(z_{L-1})
with act = sin(w0 u) | relu | gain * leaky_relu(u, slope) | gelu | silu | identity.

Memory layout (prepared by nfd_fast.ops.fused_mlp):
    x      [M, IN]  rows of all samples, sample b owns rows b*N .. b*N+N-1
    wf     [Bw, HID_PAD, IN_PAD] float32: W_0 zero-padded. The first layer (K = in, tiny
           for coordinates) runs in float32 in every precision mode.
    w      [Bw, L-1, D, D]  W_1 .. W_{L-1} zero-padded to D x D (D = max(HID_PAD, OUT_PAD)),
           nn.Linear layout (row = output unit), in the dot operand dtype of the mode
    b      [Bb, L, D]     biases zero-padded
    scale / shift / mult  [Bs, L-1, HID_PAD]  per-sample (Bs = B) or shared (stride 0)
    act    [L, 3] float32: (w0, slope, gain) per layer
Hidden sine layers arrive with w0 folded in: W_l, b_l and shift_l are packed times w0_l,
so z_l (and the saved z_l) hold w0 z_l and the sine reads the accumulator directly; the
host scales the backward's parameter gradients back (nfd_fast.ops.fused_mlp).
Zero padding makes the weight loads mask-free: padded hidden units see zero weights and
zero bias, and whatever they hold is multiplied by zero weight columns downstream.

The forward keeps the hidden state of BLOCK_M rows on chip. A D x D weight tile does not
fit in shared memory for D = 512 (or D = 256 in float32), and Triton cannot slice a
register tensor, so layers are processed in pairs (a, b): the output units of layer a are
produced BLOCK_N at a time from the full h_{a-1}, activated, and immediately multiplied
into the full-width accumulator of layer b. Every weight tile is then [K, BLOCK_N] or
[BLOCK_N, K] and nothing but x and y touches device memory (plus the pre-activations when
they are saved for backward).
"""
import os

import triton
import triton.language as tl

# Activation codes: the index of the name in nfd_fast.ops.fused_mlp.ACTIVATIONS (a test
# checks they agree). Hidden layer l's code is base-ACT_BASE digit l of the constexpr ACTS.
IDENTITY = tl.constexpr(0)
SINE = tl.constexpr(1)
RELU = tl.constexpr(2)
LEAKY_RELU = tl.constexpr(3)
GELU = tl.constexpr(4)
SILU = tl.constexpr(5)
ACT_BASE = tl.constexpr(16)  # (digit arithmetic: the interpreter's constexpr has no >>)
# Hidden layer l's true width where it is narrower than HID_PAD (else 0) is base-WIDTH_BASE
# digit l of the constexpr PADDED_WIDTHS (WIDTH_BASE > the widest hidden layer, 512).
WIDTH_BASE = tl.constexpr(1024)

# Sine kinds: libdevice's sinf, the range-reduced polynomial (_fast_sin), and the range
# reduction followed by the hardware's sin.approx.f32 (MUFU.SIN, _mufu_sin).
LIBDEVICE_SINE = tl.constexpr(0)
POLYNOMIAL_SINE = tl.constexpr(1)
MUFU_SINE = tl.constexpr(2)
# The interpreter runs no inline assembly: under it MUFU_SINE takes libm's sine of the same
# reduced argument. Read when the kernels are compiled, so a compiled kernel always holds
# the instruction, whatever process recorded its launch.
INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))

# Dot operand kinds. DOT_BF16X3: float32 operands, each the sum of two bfloat16 pieces
# (hi + mid, about 16 significant bits), their product the three significant cross terms
# on the 16-bit tensor cores (see _split_dot); the weights arrive split by the host.
DOT_FP32 = tl.constexpr(0)
DOT_FP16 = tl.constexpr(1)
DOT_BF16 = tl.constexpr(2)
DOT_BF16X3 = tl.constexpr(3)

_INV_2PI = tl.constexpr(0.15915494309189535)
# 2*pi split in two (Cody-Waite) so k * _TWO_PI_HI is exact for |k| < 2^16
_TWO_PI_HI = tl.constexpr(6.28125)
_TWO_PI_LO = tl.constexpr(0.0019353071795864769)
_PI = tl.constexpr(3.141592653589793)
_HALF_PI = tl.constexpr(1.5707963267948966)


# fast_sine's domain: k * _TWO_PI_HI is exact for |k| < 2^16, i.e. |x| < 2^16 * 2 pi
FAST_SINE_BOUND = tl.constexpr(4.0e5)


@triton.jit
def _fast_sin(x):
    """sin(x) by Cody-Waite reduction to [-pi, pi], a fold to [-pi/2, pi/2] and the
    degree-11 Taylor polynomial (truncation error < 6e-8 there). Cheaper than libdevice's
    sinf, which also carries a Payne-Hanek path for huge arguments. Beyond
    FAST_SINE_BOUND the reduction loses the argument: NaN there, never a wrong number."""
    k = tl.floor(x * _INV_2PI + 0.5)
    r = (x - k * _TWO_PI_HI) - k * _TWO_PI_LO
    r = tl.where(r > _HALF_PI, _PI - r, r)
    r = tl.where(r < -_HALF_PI, -_PI - r, r)
    r2 = r * r
    p = -2.5052108385441718e-08
    p = p * r2 + 2.7557319223985893e-06
    p = p * r2 - 1.984126984126984e-04
    p = p * r2 + 8.333333333333333e-03
    p = p * r2 - 1.6666666666666666e-01
    return tl.where(tl.abs(x) <= FAST_SINE_BOUND, r + r * r2 * p, float("nan"))


@triton.jit
def _mufu_sin(x):
    """sin(x) by the Cody-Waite reduction of _fast_sin to [-pi, pi], then one MUFU.SIN
    (sin.approx.f32: absolute error about 2^-21 on [-pi, pi] per the PTX ISA) instead of
    the fold and the polynomial: about 8 issue slots in place of 20, and the MUFU pipe,
    idle otherwise, takes the rest. For the 16-bit modes, whose operand rounding (2^-9,
    2^-12) is far coarser. NaN past FAST_SINE_BOUND as _fast_sin."""
    k = tl.floor(x * _INV_2PI + 0.5)
    r = (x - k * _TWO_PI_HI) - k * _TWO_PI_LO
    if INTERPRETED:
        s = tl.sin(r)
    else:
        s = tl.inline_asm_elementwise("sin.approx.f32 $0, $1;", "=r,r", [r],
                                      dtype=tl.float32, is_pure=True, pack=1)
    return tl.where(tl.abs(x) <= FAST_SINE_BOUND, s, float("nan"))


@triton.jit
def _sin(x, SINE_KIND: tl.constexpr):
    if SINE_KIND == MUFU_SINE:
        s = _mufu_sin(x)
    elif SINE_KIND == POLYNOMIAL_SINE:
        s = _fast_sin(x)
    else:
        s = tl.sin(x)
    return s


@triton.jit
def _gelu(u):
    """Exact GELU, u * Phi(u) in the erf form (torch's default); gelu(-Inf) = 0, its limit,
    where the product would be -Inf * 0."""
    a = 0.5 * u * (1.0 + tl.math.erf(u * 0.7071067811865476))
    return tl.where(u == float("-inf"), 0.0, a)


@triton.jit
def _act_params(act_ptr, layer):
    w0 = tl.load(act_ptr + layer * 3)
    slope = tl.load(act_ptr + layer * 3 + 1)
    gain = tl.load(act_ptr + layer * 3 + 2)
    return w0, slope, gain


@triton.jit
def _activation(u, act_ptr, layer, ACT: tl.constexpr, SINE_KIND: tl.constexpr,
                W0_FOLDED: tl.constexpr):
    """act(u). W0_FOLDED (hidden layers): w0 is already in u (the host folded it into the
    packed weights, bias and shift), so the sine reads the accumulator as it is."""
    w0, slope, gain = _act_params(act_ptr, layer)
    if ACT == SINE:
        if W0_FOLDED:
            a = _sin(u, SINE_KIND)
        else:
            a = _sin(w0 * u, SINE_KIND)
    elif ACT == RELU:
        a = tl.where(u != u, u, tl.maximum(u, 0.0))  # NaN in, NaN out (maximum drops it)
    elif ACT == LEAKY_RELU:
        a = gain * tl.where(u >= 0.0, u, slope * u)
    elif ACT == GELU:
        a = _gelu(u)
    elif ACT == SILU:
        a = u * tl.sigmoid(u)
    else:
        a = u
    return a


@triton.jit
def _activation_grad(u, act_ptr, layer, ACT: tl.constexpr, SINE_KIND: tl.constexpr,
                     W0_FOLDED: tl.constexpr):
    """(act(u), d act / d u). Recomputing act here saves storing it in the forward. With
    W0_FOLDED, u is w0 times the unfolded one and so is the derivative's variable."""
    w0, slope, gain = _act_params(act_ptr, layer)
    if ACT == SINE:
        # cos(t) = sin(t + pi/2): the same (fast) sine keeps forward and backward consistent
        if W0_FOLDED:
            a = _sin(u, SINE_KIND)
            da = _sin(u + 1.5707963267948966, SINE_KIND)
        else:
            a = _sin(w0 * u, SINE_KIND)
            da = w0 * _sin(w0 * u + 1.5707963267948966, SINE_KIND)
    elif ACT == RELU:
        a = tl.where(u != u, u, tl.maximum(u, 0.0))
        da = tl.where(u > 0.0, 1.0, 0.0)
    elif ACT == LEAKY_RELU:
        a = gain * tl.where(u >= 0.0, u, slope * u)
        da = gain * tl.where(u >= 0.0, 1.0, slope)
    elif ACT == GELU:
        a = _gelu(u)
        cdf = 0.5 * (1.0 + tl.math.erf(u * 0.7071067811865476))
        # the limits at +-Inf (1 and 0), where u * pdf(u) would be Inf * 0
        da = tl.where(tl.abs(u) == float("inf"), cdf,
                      cdf + u * 0.3989422804014327 * tl.exp(-0.5 * u * u))
    elif ACT == SILU:
        sig = tl.sigmoid(u)
        a = u * sig
        da = sig * (1.0 + u * (1.0 - sig))
    else:
        a = u
        da = tl.where(u != u, u, 1.0)  # NaN at NaN, and 1 at +-Inf (u * 0 + 1 would be NaN)
    return a, da


@triton.jit
def _matmul(a, b, b_mid, acc, DOT_KIND: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b with float32 accumulation; a is cast to b's kind (if it is not already).
    DOT_BF16X3: b + b_mid is the split weight tile and a (float32) is split here (b_mid is
    unused by the other kinds). The sum goes into acc itself, so a running accumulator
    takes the dot in place (no second copy of it in registers)."""
    if DOT_KIND == DOT_FP32:
        c = tl.dot(a, b, acc, input_precision=PRECISION)
    elif DOT_KIND == DOT_BF16X3:
        a_hi, a_mid = _split_bf16(a)
        c = _split_dot(a_hi, a_mid, b, b_mid, acc)
    else:
        c = tl.dot(_operand(a, DOT_KIND), b, acc)
    return c


@triton.jit
def _round_to_bf16(a):
    """a (float32) rounded to bfloat16, to nearest, ties to even. Under the interpreter,
    whose float32 -> bfloat16 conversion truncates, the same rounding by hand, kept as
    float32 (see _split_dot)."""
    if INTERPRETED:
        bits = a.to(tl.int32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & -65536
        r = tl.where(a != a, a, bits.to(tl.float32, bitcast=True))  # NaN stays NaN
    else:
        r = a.to(tl.bfloat16)
    return r


@triton.jit
def _split_bf16(a):
    """(hi, mid): a (float32) = hi + mid + r with hi, mid bfloat16 (8 significant bits
    each), |mid| <= 2^-8 |a| and |r| <= 2^-16 |a|. An infinite hi leaves mid = 0 (Inf - Inf
    would be NaN)."""
    hi = _round_to_bf16(a)
    hi32 = hi.to(tl.float32)
    mid = _round_to_bf16(tl.where(tl.abs(hi32) == float("inf"), 0.0, a - hi32))
    return hi, mid


@triton.jit
def _split_dot(a_hi, a_mid, b_hi, b_mid, acc):
    """acc + (a_hi + a_mid) @ (b_hi + b_mid) without the a_mid b_mid term (at most 2^-16
    of |a b|): three bfloat16 dots on the 16-bit tensor cores, float32 accumulation, the
    small terms first. The interpreter's bfloat16 dot is wrong, so there the pieces (held
    as float32, see _round_to_bf16) meet in float32 dots: every product of two bfloat16
    values is exact in float32, so the sum is the tensor cores' up to the addition order."""
    if INTERPRETED:
        b_hi, b_mid = b_hi.to(tl.float32), b_mid.to(tl.float32)
        acc = tl.dot(a_mid, b_hi, acc, input_precision="ieee")
        acc = tl.dot(a_hi, b_mid, acc, input_precision="ieee")
        acc = tl.dot(a_hi, b_hi, acc, input_precision="ieee")
    else:
        acc = tl.dot(a_mid, b_hi, acc)
        acc = tl.dot(a_hi, b_mid, acc)
        acc = tl.dot(a_hi, b_hi, acc)
    return acc


@triton.jit
def _operand(a, DOT_KIND: tl.constexpr):
    """a in the dtype the dots of DOT_KIND read (float32 kept for the float32 kinds)."""
    if DOT_KIND == DOT_FP16:
        a = a.to(tl.float16)
    elif DOT_KIND == DOT_BF16:
        a = a.to(tl.bfloat16)
    return a


@triton.jit
def _load_weight_t(w_layer_ptr, k, n, ROW: tl.constexpr):
    """The tile W^T[k, n] = W[n, k] of one padded layer whose rows are ROW apart."""
    return tl.load(w_layer_ptr + n[None, :] * ROW + k[:, None])


@triton.jit
def _load_weight_pieces(w_layer_ptr, k, n, ROW: tl.constexpr, PIECE: tl.constexpr,
                        DOT_KIND: tl.constexpr):
    """(W^T[k, n], its mid piece PIECE elements further on) for DOT_BF16X3; for the other
    kinds the tile twice (nothing more is loaded: the second is never read)."""
    w = _load_weight_t(w_layer_ptr, k, n, ROW)
    if DOT_KIND == DOT_BF16X3:
        w_mid = _load_weight_t(w_layer_ptr + PIECE, k, n, ROW)
    else:
        w_mid = w
    return w, w_mid


@triton.jit
def _zero_padding(h, cols, WIDTH: tl.constexpr):
    """h with the padded units (cols >= WIDTH) exactly zero; WIDTH = 0: a layer as wide as
    its padding, nothing compiled. Their zero weights make padded units zero, except where
    an Inf meets them (0 * Inf = NaN), which the next layer's zero weight columns would then
    spread to every unit (0 * NaN)."""
    if WIDTH > 0:
        h = tl.where(cols[None, :] < WIDTH, h, 0.0)
    return h


@triton.jit
def _modulate(z, cols, b, layer, scale_ptr, shift_ptr, mult_ptr, act_ptr,
              stride_sb, stride_tb, stride_mb, HID_PAD: tl.constexpr, ACT: tl.constexpr,
              SINE_KIND: tl.constexpr, WIDTH: tl.constexpr):
    """h = act(scale * z + shift) * mult for the columns `cols` of hidden layer `layer`
    (an absent modulation is a None pointer, so its code is not compiled), zero in the
    padded units past WIDTH (see _zero_padding)."""
    mod = layer * HID_PAD + cols
    u = z
    if scale_ptr is not None:
        u = u * tl.load(scale_ptr + b * stride_sb + mod)[None, :]
    if shift_ptr is not None:
        u = u + tl.load(shift_ptr + b * stride_tb + mod)[None, :]
    h = _activation(u, act_ptr, layer, ACT, SINE_KIND, True)
    if mult_ptr is not None:
        h = h * tl.load(mult_ptr + b * stride_mb + mod)[None, :]
    return _zero_padding(h, cols, WIDTH)


# Inputs up to this wide (coordinates) take the first layer as FMAs (FIRST_FMA).
MAX_FIRST_FMA = tl.constexpr(4)


@triton.jit
def _column(h, cin, k: tl.constexpr):
    """Column k of h ([BLOCK_M, IN_PAD]) as a [BLOCK_M] vector (zero past IN_PAD)."""
    return tl.sum(tl.where(cin[None, :] == k, h, 0.0), axis=1)


@triton.jit
def _first_layer_fma(x0, x1, x2, x3, wf_ptr, cols, IN_PAD: tl.constexpr, K: tl.constexpr):
    """z = x W_0^T for the columns `cols`, in = K <= 4 inputs, as K rank-one updates: K
    float32 FMAs per unit where a dot would spend IN_PAD (>= 16, zero-padded) of them
    (2-D coordinates: 2 instead of 16). Exact float32 products as the "ieee" dot."""
    w = wf_ptr + cols * IN_PAD  # row c of the packed W_0: [HID_PAD, IN_PAD]
    z = x0[:, None] * tl.load(w)[None, :]
    if K > 1:
        z += x1[:, None] * tl.load(w + 1)[None, :]
    if K > 2:
        z += x2[:, None] * tl.load(w + 2)[None, :]
    if K > 3:
        z += x3[:, None] * tl.load(w + 3)[None, :]
    return z


@triton.jit
def _grid_coordinates(lin, cin, gsize_ptr, gaffine_ptr, BLOCK_M: tl.constexpr, IN_PAD: tl.constexpr,
                      GRID_DIMS: tl.constexpr, GRID_AXES: tl.constexpr):
    """Coordinates of the grid points `lin` (C-order linear indices): component c is
    offset_c + index_{axis_c} * step_c, axis_c = (GRID_AXES >> 2c) & 3."""
    h = tl.zeros((BLOCK_M, IN_PAD), tl.float32)
    rem = lin
    for k in tl.static_range(GRID_DIMS):  # unravel, last axis fastest
        n_axis = tl.load(gsize_ptr + GRID_DIMS - 1 - k)
        idx = (rem % n_axis).to(tl.float32)
        rem = rem // n_axis
        for c in tl.static_range(GRID_DIMS):
            if ((GRID_AXES >> (2 * c)) & 3) == GRID_DIMS - 1 - k:
                coord = tl.load(gaffine_ptr + 2 * c) + idx * tl.load(gaffine_ptr + 2 * c + 1)
                h = tl.where(cin[None, :] == c, coord[:, None], h)
    return h


@triton.jit
def _tangent_modulate(z, tz, cols, b, layer, scale_ptr, shift_ptr, mult_ptr, act_ptr,
                      stride_sb, stride_tb, stride_mb, HID_PAD: tl.constexpr, ACT: tl.constexpr,
                      SINE_KIND: tl.constexpr, TANGENTS: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK: tl.constexpr, WIDTH: tl.constexpr):
    """(h, t_h): h = act(scale z + shift) mult and its forward-mode tangents
    t_h = act'(u) scale t_z mult. tz stacks TANGENTS blocks of BLOCK_M rows (tangent d of
    row r at d * BLOCK_M + r), so the per-column factors broadcast as they are and only
    act'(u) is repeated over the blocks. BLOCK: the number of columns; padded units past
    WIDTH are zero in both (see _zero_padding)."""
    mod = layer * HID_PAD + cols
    u = z
    if scale_ptr is not None:
        s = tl.load(scale_ptr + b * stride_sb + mod)[None, :]
        u = u * s
        tz = tz * s
    if shift_ptr is not None:
        u = u + tl.load(shift_ptr + b * stride_tb + mod)[None, :]
    h, da = _activation_grad(u, act_ptr, layer, ACT, SINE_KIND, True)
    da = tl.where(u != u, u, da)  # a NaN point's tangents are NaN (relu' is a comparison)
    th = tl.reshape(tl.reshape(tz, (TANGENTS, BLOCK_M, BLOCK)) * da[None, :, :],
                    (TANGENTS * BLOCK_M, BLOCK))
    if mult_ptr is not None:
        m = tl.load(mult_ptr + b * stride_mb + mod)[None, :]
        h = h * m
        th = th * m
    return _zero_padding(h, cols, WIDTH), _zero_padding(th, cols, WIDTH)


@triton.jit
def _store_jacobian(z, tz, cols, grow, row_ok, y_ptr, j_ptr, act_ptr, IN, OUT, layer,
                    FINAL_ACT: tl.constexpr, SINE_KIND: tl.constexpr,
                    TANGENTS: tl.constexpr, BLOCK_M: tl.constexpr, WIDTH: tl.constexpr):
    """y = final_act(z) and J[row, o, d] = final_act'(z) t_z (j_ptr: [M, OUT, IN])."""
    y, da = _activation_grad(z, act_ptr, layer, FINAL_ACT, SINE_KIND, False)
    da = tl.where(z != z, z, da)  # NaN in, NaN Jacobian out
    offs = grow[:, None] * OUT + cols[None, :]
    mask = row_ok[:, None] & (cols < OUT)[None, :]
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    tj = tl.reshape(tz, (TANGENTS, BLOCK_M, WIDTH)) * da[None, :, :]
    d = tl.arange(0, TANGENTS)
    tl.store(j_ptr + offs[None, :, :] * IN + d[:, None, None],
             tj.to(j_ptr.dtype.element_ty), mask=mask[None, :, :] & (d < IN)[:, None, None])


@triton.jit
def fused_mlp_fwd_kernel(
    x_ptr, wf_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, mult_ptr, act_ptr, y_ptr, z_ptr, zf_ptr, j_ptr,
    gsize_ptr, gaffine_ptr, lin0,
    N, IN, OUT, M, row_tiles,
    stride_fb, stride_wb, stride_bb, stride_sb, stride_tb, stride_mb,
    NUM_LAYERS: tl.constexpr, D: tl.constexpr,
    IN_PAD: tl.constexpr, HID_PAD: tl.constexpr, OUT_PAD: tl.constexpr,
    ACTS: tl.constexpr, FINAL_ACT: tl.constexpr, SINE_KIND: tl.constexpr,
    DOT_KIND: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_OUT: tl.constexpr,
    GRID_DIMS: tl.constexpr = 0, GRID_AXES: tl.constexpr = 0, TANGENTS: tl.constexpr = 0,
    PADDED_WIDTHS: tl.constexpr = 0, FIRST_FMA: tl.constexpr = 0, PIECE: tl.constexpr = 0,
    OUT_PASSES: tl.constexpr = 1,
):
    """y[b, rows] = MLP(x[b, rows]) for one tile of BLOCK_M rows. Programs run along grid
    axis 0 only (CUDA allows 2^31 - 1 there, 65,535 on axes 1 and 2): program pid is row
    tile pid % row_tiles of sample pid // row_tiles.

    TANGENTS > 0 (a power of two >= IN): forward-mode tangents along each input axis are
    carried through every layer beside the values, stacked as TANGENTS extra blocks of
    rows that share each weight tile's load, and the Jacobian dy/dx goes to j_ptr
    ([M, OUT, IN]); value and Jacobian in one pass.

    GRID_DIMS > 0 (rendering, B = 1): x is not read; row r's coordinates are those of grid
    point lin0 + r, made here from the grid's sizes and per-component affine maps.

    FIRST_FMA > 0 (in <= MAX_FIRST_FMA, no tangents): the first layer is FIRST_FMA rank-one
    float32 FMA updates (see _first_layer_fma) instead of a dot over IN_PAD >= 16 columns.

    PADDED_WIDTHS: the hidden layers narrower than HID_PAD (see WIDTH_BASE); their padded
    units are zeroed after the activation. 0 (every hidden layer a power of two >= 16
    wide): nothing compiled.

    DOT_BF16X3: w holds each layer's bfloat16 hi piece and, PIECE elements further on, its
    mid piece; h is held split as the dots read it (h and h_mid, bfloat16), split once per
    layer, and every chunk's activations are split before their dot.

    OUT_PASSES > 1 (DOT_BF16X3, odd NUM_LAYERS, OUT_PAD <= BLOCK_OUT, no tangents): the
    last pair's layer b is produced in OUT_PASSES passes of HID_PAD / OUT_PASSES columns,
    each recomputing layer a and going straight into the lone output layer's accumulator
    (its K split the same way). Split h takes twice the registers of a 16-bit one: beside
    a full-width float32 accumulator it spills heavily; beside a half-width one far less
    (sm_90a, SIREN 2 -> 256 x 3 -> 3: 147 -> 57 local loads per loop iteration), for one
    more pass of layer a's dots.

    Absent tensors are None (bias, modulations, z, zf): their code is compiled out. Given
    z_ptr, the pre-activations z_l of the hidden layers go there ([L-1, M, HID_PAD]
    float32) and, given zf_ptr, z_{L-1} of an activated output layer ([M, OUT]);
    backward recomputes everything else from them.
    """
    pid = tl.program_id(0).to(tl.int64)
    b = pid // row_tiles
    pid_m = pid % row_tiles
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    # int64: M * width passes 2^31 for a gigapixel image
    grow = b * N + rows.to(tl.int64)
    m64 = b * 0 + M  # M as int64, so layer * M cannot wrap either
    w_base = w_ptr + b * stride_wb - D * D  # layer l >= 1 at w_base + l * D * D
    wf_base = wf_ptr + b * stride_fb

    cin = tl.arange(0, IN_PAD)
    if GRID_DIMS > 0:
        h = _grid_coordinates(lin0 + grow, cin, gsize_ptr, gaffine_ptr, BLOCK_M, IN_PAD,
                              GRID_DIMS, GRID_AXES)
    else:
        h = tl.load(x_ptr + grow[:, None] * IN + cin[None, :],
                    mask=row_ok[:, None] & (cin < IN)[None, :], other=0.0).to(tl.float32)
    cfull = tl.arange(0, HID_PAD)
    tl.static_assert(FIRST_FMA <= MAX_FIRST_FMA and (FIRST_FMA == 0 or TANGENTS == 0))
    tl.static_assert(OUT_PASSES <= 1 or (DOT_KIND == DOT_BF16X3 and NUM_LAYERS % 2 == 1 and
                                         TANGENTS == 0 and OUT_PAD <= BLOCK_OUT))
    if FIRST_FMA > 0:  # the coordinates' columns, split once (unused ones are not kept)
        x0, x1 = _column(h, cin, 0), _column(h, cin, 1)
        x2, x3 = _column(h, cin, 2), _column(h, cin, 3)
    if TANGENTS > 0:  # t = dx/dx: tangent d of every row is the unit vector e_d
        tangent_of_row = tl.arange(0, TANGENTS * BLOCK_M) // BLOCK_M
        t = tl.where(cin[None, :] == tangent_of_row[:, None], 1.0, 0.0)

    for p in tl.static_range(NUM_LAYERS // 2):
        # Layers a = 2p and b = 2p + 1. Their indices are written out inline: Triton would
        # turn a constexpr bound to a local name into a tensor, and these must stay
        # compile-time values (they pick shapes and activations).
        if p == 0:
            kk = tl.arange(0, IN_PAD)
        else:
            kk = cfull
        if 2 * p + 3 == NUM_LAYERS and OUT_PASSES > 1:  # streamed into the output layer
            y_acc = tl.zeros((BLOCK_M, OUT_PAD), dtype=tl.float32)
        for q in tl.static_range(OUT_PASSES if 2 * p + 3 == NUM_LAYERS else 1):
            if 2 * p + 1 == NUM_LAYERS - 1:
                nb = tl.arange(0, OUT_PAD)
                acc = tl.zeros((BLOCK_M, OUT_PAD), dtype=tl.float32)
                if TANGENTS > 0:
                    tacc = tl.zeros((TANGENTS * BLOCK_M, OUT_PAD), dtype=tl.float32)
            elif 2 * p + 3 == NUM_LAYERS and OUT_PASSES > 1:
                nb = q * (HID_PAD // OUT_PASSES) + tl.arange(0, HID_PAD // OUT_PASSES)
                acc = tl.zeros((BLOCK_M, HID_PAD // OUT_PASSES), dtype=tl.float32)
            else:
                nb = cfull
                acc = tl.zeros((BLOCK_M, HID_PAD), dtype=tl.float32)
                if TANGENTS > 0:
                    tacc = tl.zeros((TANGENTS * BLOCK_M, HID_PAD), dtype=tl.float32)
            for j in range(0, HID_PAD, BLOCK_N):
                cj = j + tl.arange(0, BLOCK_N)
                w_b, w_b_mid = _load_weight_pieces(w_base + (2 * p + 1) * D * D, cj, nb, D, PIECE,
                                                   DOT_KIND)
                z0 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                if p == 0 and FIRST_FMA > 0:  # the first layer in float32 in every mode
                    zc = _first_layer_fma(x0, x1, x2, x3, wf_base, cj, IN_PAD, FIRST_FMA)
                elif p == 0:
                    w_a = _load_weight_t(wf_base, kk, cj, IN_PAD)
                    w_a_mid = w_a
                    zc = _matmul(h, w_a, w_a, z0, DOT_FP32, "ieee")
                else:
                    w_a, w_a_mid = _load_weight_pieces(w_base + 2 * p * D * D, kk, cj, D, PIECE,
                                                       DOT_KIND)
                    if DOT_KIND == DOT_BF16X3 and TANGENTS == 0:  # h held split
                        zc = _split_dot(h, h_mid, w_a, w_a_mid, z0)
                    else:
                        zc = _matmul(h, w_a, w_a_mid, z0, DOT_KIND, PRECISION)
                if b_ptr is not None:
                    zc += tl.load(b_ptr + b * stride_bb + 2 * p * D + cj)[None, :]
                if z_ptr is not None and q == 0:  # (later passes recompute the same zc)
                    tl.store(z_ptr + (2 * p * m64 + grow[:, None]) * HID_PAD + cj[None, :], zc,
                             mask=row_ok[:, None])
                if TANGENTS > 0:
                    tz0 = tl.zeros((TANGENTS * BLOCK_M, BLOCK_N), dtype=tl.float32)
                    if p == 0:
                        tz = _matmul(t, w_a, w_a, tz0, DOT_FP32, "ieee")
                    else:
                        tz = _matmul(t, w_a, w_a_mid, tz0, DOT_KIND, PRECISION)
                    hc, thc = _tangent_modulate(
                        zc, tz, cj, b, 2 * p, scale_ptr, shift_ptr, mult_ptr, act_ptr,
                        stride_sb, stride_tb, stride_mb, HID_PAD,
                        (ACTS // ACT_BASE ** (2 * p)) % ACT_BASE, SINE_KIND, TANGENTS, BLOCK_M,
                        BLOCK_N, (PADDED_WIDTHS // WIDTH_BASE ** (2 * p)) % WIDTH_BASE)
                    tacc = _matmul(thc, w_b, w_b_mid, tacc, DOT_KIND, PRECISION)
                else:
                    hc = _modulate(zc, cj, b, 2 * p, scale_ptr, shift_ptr, mult_ptr, act_ptr,
                                   stride_sb, stride_tb, stride_mb, HID_PAD,
                                   (ACTS // ACT_BASE ** (2 * p)) % ACT_BASE, SINE_KIND,
                                   (PADDED_WIDTHS // WIDTH_BASE ** (2 * p)) % WIDTH_BASE)
                acc = _matmul(hc, w_b, w_b_mid, acc, DOT_KIND, PRECISION)
            if b_ptr is not None:
                acc += tl.load(b_ptr + b * stride_bb + (2 * p + 1) * D + nb)[None, :]
            if 2 * p + 1 == NUM_LAYERS - 1:
                if TANGENTS > 0:
                    _store_jacobian(acc, tacc, nb, grow, row_ok, y_ptr, j_ptr, act_ptr, IN, OUT,
                                    2 * p + 1, FINAL_ACT, SINE_KIND, TANGENTS, BLOCK_M, OUT_PAD)
                else:
                    _store_output(acc, nb, grow, row_ok, y_ptr, zf_ptr, act_ptr, OUT, 2 * p + 1,
                                  FINAL_ACT, SINE_KIND)
            else:
                if z_ptr is not None:
                    tl.store(z_ptr + ((2 * p + 1) * m64 + grow[:, None]) * HID_PAD + nb[None, :],
                             acc, mask=row_ok[:, None])
                if TANGENTS > 0:
                    h, t = _tangent_modulate(
                        acc, tacc, cfull, b, 2 * p + 1, scale_ptr, shift_ptr, mult_ptr, act_ptr,
                        stride_sb, stride_tb, stride_mb, HID_PAD,
                        (ACTS // ACT_BASE ** (2 * p + 1)) % ACT_BASE, SINE_KIND, TANGENTS,
                        BLOCK_M, HID_PAD,
                        (PADDED_WIDTHS // WIDTH_BASE ** (2 * p + 1)) % WIDTH_BASE)
                else:
                    hb = _modulate(acc, nb, b, 2 * p + 1, scale_ptr, shift_ptr, mult_ptr, act_ptr,
                                   stride_sb, stride_tb, stride_mb, HID_PAD,
                                   (ACTS // ACT_BASE ** (2 * p + 1)) % ACT_BASE, SINE_KIND,
                                   (PADDED_WIDTHS // WIDTH_BASE ** (2 * p + 1)) % WIDTH_BASE)
                    if 2 * p + 3 == NUM_LAYERS and OUT_PASSES > 1:  # this pass's share of y
                        hb_hi, hb_mid = _split_bf16(hb)
                        w_out, w_out_mid = _load_weight_pieces(
                            w_base + (NUM_LAYERS - 1) * D * D, nb, tl.arange(0, OUT_PAD), D,
                            PIECE, DOT_KIND)
                        y_acc = _split_dot(hb_hi, hb_mid, w_out, w_out_mid, y_acc)
                    elif DOT_KIND == DOT_BF16X3:  # held as the next dots read it, split once
                        h, h_mid = _split_bf16(hb)
                    else:
                        # held as the next dots read it: half the registers in 16-bit modes,
                        # and no conversion repeated per column block
                        h = _operand(hb, DOT_KIND)
        if 2 * p + 3 == NUM_LAYERS and OUT_PASSES > 1:
            if b_ptr is not None:
                y_acc += tl.load(b_ptr + b * stride_bb + (NUM_LAYERS - 1) * D +
                                 tl.arange(0, OUT_PAD))[None, :]
            _store_output(y_acc, tl.arange(0, OUT_PAD), grow, row_ok, y_ptr, zf_ptr, act_ptr, OUT,
                          NUM_LAYERS - 1, FINAL_ACT, SINE_KIND)

    if NUM_LAYERS % 2 == 1 and OUT_PASSES <= 1:
        # An odd layer count leaves the output layer alone; its BLOCK_OUT-wide column
        # chunks go straight to memory, so no concatenation is needed.
        for j in range(0, OUT_PAD, BLOCK_OUT):
            cj = j + tl.arange(0, BLOCK_OUT)
            w_out, w_out_mid = _load_weight_pieces(w_base + (NUM_LAYERS - 1) * D * D, cfull, cj,
                                                   D, PIECE, DOT_KIND)
            y0 = tl.zeros((BLOCK_M, BLOCK_OUT), dtype=tl.float32)
            if DOT_KIND == DOT_BF16X3 and TANGENTS == 0:  # h held split
                yc = _split_dot(h, h_mid, w_out, w_out_mid, y0)
            else:
                yc = _matmul(h, w_out, w_out_mid, y0, DOT_KIND, PRECISION)
            if b_ptr is not None:
                yc += tl.load(b_ptr + b * stride_bb + (NUM_LAYERS - 1) * D + cj)[None, :]
            if TANGENTS > 0:
                ty0 = tl.zeros((TANGENTS * BLOCK_M, BLOCK_OUT), dtype=tl.float32)
                _store_jacobian(yc, _matmul(t, w_out, w_out_mid, ty0, DOT_KIND, PRECISION),
                                cj, grow, row_ok,
                                y_ptr, j_ptr, act_ptr, IN, OUT, NUM_LAYERS - 1, FINAL_ACT,
                                SINE_KIND, TANGENTS, BLOCK_M, BLOCK_OUT)
            else:
                _store_output(yc, cj, grow, row_ok, y_ptr, zf_ptr, act_ptr, OUT, NUM_LAYERS - 1,
                              FINAL_ACT, SINE_KIND)


@triton.jit
def _store_output(z, cols, grow, row_ok, y_ptr, zf_ptr, act_ptr, OUT, layer,
                  FINAL_ACT: tl.constexpr, SINE_KIND: tl.constexpr):
    offs = grow[:, None] * OUT + cols[None, :]
    mask = row_ok[:, None] & (cols < OUT)[None, :]
    if FINAL_ACT != IDENTITY:
        if zf_ptr is not None:
            tl.store(zf_ptr + offs, z, mask=mask)
        z = _activation(z, act_ptr, layer, FINAL_ACT, SINE_KIND, False)
    tl.store(y_ptr + offs, z.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["layer"])  # one compile serves every layer
def fused_mlp_bwd_layer_kernel(
    dz_ptr, w_ptr, z_ptr, scale_ptr, shift_ptr, mult_ptr, act_ptr,
    dst_ptr, h_ptr, part_ptr,
    N, M, C, layer, row_tiles, stride_wb, stride_sb, stride_tb, stride_mb,
    K: tl.constexpr, ROW: tl.constexpr, HID_PAD: tl.constexpr, ACT: tl.constexpr,
    HIDDEN: tl.constexpr, SINE_KIND: tl.constexpr,
    DOT_KIND: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    WIDTH: tl.constexpr = 0, PIECE: tl.constexpr = 0,
):
    """Back through one linear layer l = `layer` + 1: g = dz_l @ W_l  ([M, K] @ [K, C]);
    w_ptr is that layer's padded weights (rows ROW apart, per-sample stride stride_wb;
    DOT_BF16X3: its bfloat16 hi piece, the mid piece PIECE elements further on).

    HIDDEN=False: g is dx, stored to dst_ptr [M, C].
    HIDDEN=True: g = dL/dh_{layer}; the epilogue recomputes u, act(u) from the saved z
    and writes dz_{layer} (to dst_ptr, [M, HID_PAD]) and h_{layer} (to h_ptr, for dW);
    column sums per (sample, row tile) of dz, du, du*z and g*act(u) (the gradients of
    bias, shift, scale and mult) go to part_ptr [4, B, T, HID_PAD] without atomics, so the
    result is deterministic and shared parameters cause no atomic contention.
    WIDTH: the layer's true width when narrower than HID_PAD (else 0): its padded units'
    dz and h are zeroed, so an Inf that met them in the forward stays out of dx.
    """
    pid = tl.program_id(0).to(tl.int64)  # (sample, row tile) on axis 0: no 65,535 limit
    b = pid // row_tiles
    pid_m = pid % row_tiles
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    grow = b * N + rows.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    w_layer = w_ptr + b * stride_wb

    g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        dz = tl.load(dz_ptr + grow[:, None] * K + kk[None, :],
                     mask=row_ok[:, None] & (kk < K)[None, :], other=0.0)
        # W[k, c]; rows past K are zero padding (or the next block, masked by dz = 0)
        w_offs = kk[:, None] * ROW + cols[None, :]
        w = tl.load(w_layer + w_offs, mask=(kk < K)[:, None], other=0.0)
        if DOT_KIND == DOT_BF16X3:
            w_mid = tl.load(w_layer + PIECE + w_offs, mask=(kk < K)[:, None], other=0.0)
        else:
            w_mid = w
        g = _matmul(dz, w, w_mid, g, DOT_KIND, PRECISION)

    if HIDDEN:
        offs = grow[:, None] * HID_PAD + cols[None, :]
        m64 = b * 0 + M  # int64: layer * M * HID_PAD passes 2^31 at 2^23 points
        z = tl.load(z_ptr + layer * m64 * HID_PAD + offs, mask=row_ok[:, None], other=0.0)
        mod = layer * HID_PAD + cols
        u = z
        s = tl.full((BLOCK_N,), 1.0, tl.float32)
        if scale_ptr is not None:
            s = tl.load(scale_ptr + b * stride_sb + mod)
            u = u * s[None, :]
        if shift_ptr is not None:
            u = u + tl.load(shift_ptr + b * stride_tb + mod)[None, :]
        a, da = _activation_grad(u, act_ptr, layer, ACT, SINE_KIND, True)
        h = a
        dmult = g * a
        if mult_ptr is not None:
            m = tl.load(mult_ptr + b * stride_mb + mod)[None, :]
            h = a * m
            g = g * m
        du = g * da
        dz_out = du * s[None, :]
        # padded rows carry z = 0 but a nonzero gradient of act(0); zero them out
        du = tl.where(row_ok[:, None], du, 0.0)
        dz_out = tl.where(row_ok[:, None], dz_out, 0.0)
        dmult = tl.where(row_ok[:, None], dmult, 0.0)
        dz_out = _zero_padding(dz_out, cols, WIDTH)
        h = _zero_padding(h, cols, WIDTH)
        tl.store(dst_ptr + offs, dz_out.to(dst_ptr.dtype.element_ty), mask=row_ok[:, None])
        tl.store(h_ptr + offs, h.to(h_ptr.dtype.element_ty), mask=row_ok[:, None])
        plane = tl.num_programs(0) * HID_PAD  # B * row_tiles rows of HID_PAD per plane
        part = part_ptr + pid * HID_PAD + cols
        tl.store(part, tl.sum(dz_out, 0))
        tl.store(part + plane, tl.sum(du, 0))
        tl.store(part + 2 * plane, tl.sum(du * z, 0))
        tl.store(part + 3 * plane, tl.sum(dmult, 0))
    else:
        tl.store(dst_ptr + grow[:, None] * C + cols[None, :], g,
                 mask=row_ok[:, None] & (cols < C)[None, :])
