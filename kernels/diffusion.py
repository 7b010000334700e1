"""Triton kernels of the fused diffusion steps: one elementwise kernel family, one pass over
memory per step, per-sample timesteps read on the device (no host sync, graph-capturable).

Notation (the common scheduler conventions): a_t = alphas_cumprod[t], b_t = 1 - a_t,
a_p = alphas_cumprod[prev] (prev < 0: the final value), b_p = 1 - a_p.

Modes (constexpr MODE):
    Q_SAMPLE      out = sqrt(a_t) x0 + sqrt(b_t) eps; out2 = sqrt(a_t) eps - sqrt(b_t) x0 (v)
    DDPM          out = mean + sqrt(var) z (z only where t > 0); out2 = x0
    DDIM          out = sqrt(a_p) x0 + sqrt(1 - a_p - sigma^2) eps + sigma z; out2 = x0
    LANGEVIN      out = x + step_b g + sqrt(2 step_b) z; out2 = x + step_b g  (x_mean)
    VP_PREDICTOR  out = x_mean + sqrt(beta_t) z, x_mean = (2 - sqrt(1 - beta_t)) x + beta_t s
    NOISE_SUMSQ   sumsq[b] += sum of z^2 over the block (the Langevin noise norm)
    NOISE_DRAW    out = z (the in-kernel noise, regenerated for a backward)
The second output is written only when out2_ptr is given (None: the caller keeps one).

Layout: every tensor is [B, S] contiguous (S = elements per sample). Programs run along
grid axis 0 only (CUDA allows 2^31 - 1 there, 65,535 on axes 1 and 2): program pid owns
elements (pid % T) * BLOCK .. of sample pid // T, T = blocks per sample, so per-sample
coefficients are scalars of the program. In-kernel noise is Philox4x32-10 (tl.randint4x)
keyed by a seed read from memory (so a captured CUDA graph draws fresh noise when the seed
buffer is refilled) and the element's position, turned into four normals per Philox call
by Box-Muller on two pairs of its 32-bit outputs (_box_muller).

Box-Muller's sine and cosine are the kernel's main cost if taken from libdevice (about 120
instructions each with their range reduction, the step then issue-bound on an H100 in the
sm_90a model). Here the angle's quadrant comes straight from two bits of the random integer
and the rest is a uniform angle in [-pi/4, pi/4), where short polynomials (Cephes' sinf and
cosf) give sine and cosine within 2 float32 ulps; no range reduction is needed.
tests/test_diffusion.py measures the error against float64 and the normals' distribution.
"""
import triton
import triton.language as tl

# Mode and prediction codes: the index of the name in nfd_fast.ops.diffusion's MODES and
# PREDICTION_TYPES (a test checks they agree).
Q_SAMPLE = tl.constexpr(0)
DDPM = tl.constexpr(1)
DDIM = tl.constexpr(2)
LANGEVIN = tl.constexpr(3)
VP_PREDICTOR = tl.constexpr(4)
NOISE_SUMSQ = tl.constexpr(5)
NOISE_DRAW = tl.constexpr(6)
EPSILON = tl.constexpr(0)
SAMPLE = tl.constexpr(1)
V_PREDICTION = tl.constexpr(2)


# Cephes sinf / cosf on |x| <= pi/4 (relative error about 1 ulp in float32)
SIN_C1 = tl.constexpr(-1.6666654611e-1)
SIN_C2 = tl.constexpr(8.3321608736e-3)
SIN_C3 = tl.constexpr(-1.9515295891e-4)
COS_C2 = tl.constexpr(4.166664568298827e-2)
COS_C3 = tl.constexpr(-1.388731625493765e-3)
COS_C4 = tl.constexpr(2.443315711809948e-5)
TWO_POW_M32 = tl.constexpr(2.3283064365386963e-10)  # 2^-32
TWO_POW_M33 = tl.constexpr(1.1641532182693481e-10)  # 2^-33
ANGLE_SCALE = tl.constexpr(1.4629180792671596e-09)  # (pi / 2) / 2^30
QUARTER_PI = tl.constexpr(0.7853981633974483)


@triton.jit
def _sincos(x):
    """(sin x, cos x) for |x| <= pi/4 by Cephes' polynomials (no range reduction)."""
    x2 = x * x
    s = x + x * x2 * (SIN_C1 + x2 * (SIN_C2 + x2 * SIN_C3))
    c = 1.0 - 0.5 * x2 + x2 * x2 * (COS_C2 + x2 * (COS_C3 + x2 * COS_C4))
    return s, c


@triton.jit
def _box_muller(radius_bits, angle_bits):
    """Two independent standard normals from two uniform uint32s:
    r = sqrt(-2 ln u), u = (radius_bits + 1/2) 2^-32 in (0, 1] (largest |z| 6.76);
    angle = q pi/2 + x: q = the top two bits of angle_bits, x = the other 30 bits as a
    uniform angle in [-pi/4, pi/4). (r cos, r sin) of the angle is (r cos x, r sin x)
    turned by q quarter turns: q odd swaps the two, and the signs are flipped by XOR on
    the float bits (first: q in {1, 2}, second: q in {2, 3})."""
    u = radius_bits.to(tl.float32) * TWO_POW_M32 + TWO_POW_M33
    r = tl.sqrt(-2.0 * tl.log(u))
    x = (angle_bits & 0x3FFFFFFF).to(tl.float32) * ANGLE_SCALE - QUARTER_PI
    s, c = _sincos(x)
    swap = (angle_bits & 0x40000000) != 0
    first = tl.where(swap, s, c)
    second = tl.where(swap, c, s)
    sign_first = (angle_bits ^ (angle_bits << 1)) & 0x80000000
    sign_second = angle_bits & 0x80000000
    r_bits = r.to(tl.uint32, bitcast=True)
    return (r_bits ^ sign_first).to(tl.float32, bitcast=True) * first, \
        (r_bits ^ sign_second).to(tl.float32, bitcast=True) * second


@triton.jit
def philox_normals(seed, counter):
    """Four standard normals per uint32 counter: Philox4x32-10 then _box_muller on the
    pairs of its outputs."""
    i0, i1, i2, i3 = tl.randint4x(seed, counter)
    n0, n1 = _box_muller(i0, i1)
    n2, n3 = _box_muller(i2, i3)
    return n0, n1, n2, n3


@triton.jit
def _noise(noise_ptr, seed_ptr, offs, mask, b, tile, S, BLOCK: tl.constexpr):
    """z: the given noise, else Philox normals from the seed, else zeros.

    One Philox call gives four normals (philox_normals): element `col` of sample b takes
    lane col % 4 of counter b * ceil(S / 4) + col // 4, so a block of BLOCK elements
    (BLOCK a multiple of 4, blocks aligned within the sample) makes BLOCK / 4 calls.
    Counters are 32-bit (the arithmetic wraps modulo 2^32, in uint32): streams repeat
    after 2^34 elements (64 GiB of float32)."""
    if noise_ptr is not None:
        z = tl.load(noise_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    elif seed_ptr is not None:
        first = b.to(tl.uint32) * tl.cdiv(S, 4).to(tl.uint32) + tile.to(tl.uint32) * (BLOCK // 4)
        counter = first + tl.arange(0, BLOCK // 4).to(tl.uint32)
        n0, n1, n2, n3 = philox_normals(tl.load(seed_ptr), counter)
        # [BLOCK/4, 2, 2] flattened: element 4k + 2j + i is n(2i + j) of counter k
        z = tl.reshape(tl.join(tl.join(n0, n1), tl.join(n2, n3)), (BLOCK,))
    else:
        z = tl.zeros(offs.shape, tl.float32)
    return z


@triton.jit
def _x0_and_eps(out, x, a_t, PRED: tl.constexpr):
    """(x0, eps_hat) from the model output under the prediction type."""
    sa = tl.sqrt(a_t)
    sb = tl.sqrt(1.0 - a_t)
    if PRED == EPSILON:
        x0 = (x - sb * out) / sa
        eps = out
    elif PRED == SAMPLE:
        x0 = out
        eps = (x - sa * out) / sb
    else:
        x0 = sa * x - sb * out
        eps = sa * out + sb * x
    return x0, eps


@triton.jit
def diffusion_step_kernel(
    out_ptr, out2_ptr, x_ptr, model_ptr, uncond_ptr, noise_ptr, seed_ptr,
    t_ptr, prev_ptr, ac_ptr, betas_ptr, thresh_ptr, step_ptr, sumsq_ptr,
    S, blocks_per_sample, T, guidance, eta, clip_lo, clip_hi,
    MODE: tl.constexpr, PRED: tl.constexpr, CLIP: tl.constexpr,
    FIXED_LARGE: tl.constexpr, ALPHA_ONE: tl.constexpr, CLIPPED_EPS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Absent inputs (uncond for guidance, noise, seed, prev, thresholds, step, sumsq,
    out2) are None pointers: their code is compiled out. T is the schedule's length: a
    timestep outside it (validation skipped) gives NaN, never another entry's value."""
    pid = tl.program_id(0).to(tl.int64)
    b = pid // blocks_per_sample
    cols = (pid % blocks_per_sample) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < S
    offs = b * S + cols  # int64: a DDMI latent batch passes 2^31 elements
    z = _noise(noise_ptr, seed_ptr, offs, mask, b, pid % blocks_per_sample, S, BLOCK)

    if MODE == NOISE_SUMSQ:
        tl.atomic_add(sumsq_ptr + b, tl.sum(tl.where(mask, z * z, 0.0), 0), sem="relaxed")
    elif MODE == NOISE_DRAW:
        tl.store(out_ptr + offs, z, mask=mask)
    else:
        _step(out_ptr, out2_ptr, x_ptr, model_ptr, uncond_ptr, t_ptr, prev_ptr, ac_ptr,
              betas_ptr, thresh_ptr, step_ptr, offs, mask, z, b, T, guidance, eta, clip_lo,
              clip_hi, MODE, PRED, CLIP, FIXED_LARGE, ALPHA_ONE, CLIPPED_EPS)


@triton.jit
def _clamp(v, lo, hi):
    """min(max(v, lo), hi) that keeps NaN (tl.minimum / tl.maximum would drop it)."""
    return tl.where(v != v, v, tl.minimum(tl.maximum(v, lo), hi))


@triton.jit
def _store(ptr, offs, v, mask, poison):
    """v (+ poison: 0, or NaN for an invalid timestep) to ptr, unless ptr is None."""
    if ptr is not None:
        tl.store(ptr + offs, (v + poison).to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _step(out_ptr, out2_ptr, x_ptr, model_ptr, uncond_ptr, t_ptr, prev_ptr, ac_ptr,
          betas_ptr, thresh_ptr, step_ptr, offs, mask, z, b, T, guidance, eta, clip_lo, clip_hi,
          MODE: tl.constexpr, PRED: tl.constexpr, CLIP: tl.constexpr,
          FIXED_LARGE: tl.constexpr, ALPHA_ONE: tl.constexpr, CLIPPED_EPS: tl.constexpr):
    """The elementwise update of every mode but NOISE_SUMSQ, for one block of elements."""
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(model_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if uncond_ptr is not None:  # guided output; never written to memory
        u = tl.load(uncond_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = u + guidance * (m - u)

    t = tl.load(t_ptr + b)
    t_ok = (t >= 0) & (t < T)
    if prev_ptr is not None:
        t_ok = t_ok & (tl.load(prev_ptr + b) < T)
    poison = tl.where(t_ok, 0.0, float("nan"))
    t = tl.where(t_ok, t, 0)
    if MODE == Q_SAMPLE:  # x is x0, m is the noise
        a_t = tl.load(ac_ptr + t)
        sa = tl.sqrt(a_t)
        sb = tl.sqrt(1.0 - a_t)
        _store(out_ptr, offs, sa * x + sb * m, mask, poison)
        _store(out2_ptr, offs, sa * m - sb * x, mask, poison)
    elif MODE == LANGEVIN:  # m is the score, step from the per-sample step buffer
        step = tl.load(step_ptr + b)
        x_mean = x + step * m
        _store(out_ptr, offs, x_mean + tl.sqrt(2.0 * step) * z, mask, poison)
        _store(out2_ptr, offs, x_mean, mask, poison)
    elif MODE == VP_PREDICTOR:  # reverse diffusion: m is the score
        beta = tl.load(betas_ptr + t)
        x_mean = (2.0 - tl.sqrt(1.0 - beta)) * x + beta * m
        _store(out_ptr, offs, x_mean + tl.sqrt(beta) * z, mask, poison)
        _store(out2_ptr, offs, x_mean, mask, poison)
    else:  # DDPM / DDIM
        a_t = tl.load(ac_ptr + t)
        prev = tl.load(prev_ptr + b)  # DDPM and DDIM always get prev
        if ALPHA_ONE:
            final = 1.0
        else:
            final = tl.load(ac_ptr)
        a_p = tl.where(prev >= 0, tl.load(ac_ptr + tl.minimum(tl.maximum(prev, 0), T - 1)), final)
        b_t = 1.0 - a_t
        b_p = 1.0 - a_p
        x0, eps = _x0_and_eps(m, x, a_t, PRED)
        if thresh_ptr is not None:
            s = tl.load(thresh_ptr + b)
            x0 = _clamp(x0, -s, s) / s
        if CLIP:
            x0 = _clamp(x0, clip_lo, clip_hi)
        if MODE == DDPM:
            alpha = a_t / a_p
            beta = 1.0 - alpha
            mean = (tl.sqrt(a_p) * beta / b_t) * x0 + (tl.sqrt(alpha) * b_p / b_t) * x
            if FIXED_LARGE:
                var = beta
            else:
                var = tl.maximum(b_p / b_t * beta, 1e-20)
            x_prev = mean + tl.where(t > 0, tl.sqrt(var), 0.0) * z
        else:  # DDIM
            if CLIPPED_EPS:
                eps = (x - tl.sqrt(a_t) * x0) / tl.sqrt(b_t)
            sigma = eta * tl.sqrt((b_p / b_t) * (1.0 - a_t / a_p))
            x_prev = tl.sqrt(a_p) * x0 + tl.sqrt(tl.maximum(1.0 - a_p - sigma * sigma, 0.0)) * eps
            x_prev += sigma * z
        _store(out_ptr, offs, x_prev, mask, poison)
        _store(out2_ptr, offs, x0, mask, poison)
