"""Diffusion steps: the fused kernel against the float64 formulas of the reference sheet,
in-kernel noise statistics, schedules, the sampling loop and bad input."""
import math

import pytest
import torch
import triton
import triton.language as tl

import nfd_fast
from nfd_fast.diffusion import NoiseSchedule, Sampler, leading_timesteps, sample
from nfd_fast.kernels import diffusion as KD
from nfd_fast.ops import ddim_step, ddpm_step, langevin_step, pc_step, q_sample, vp_predictor_step

from conftest import DEVICE, ON_GPU, rel_err

SHAPE = (4, 3, 37)  # odd: not a multiple of the kernel's block
T_PER_SAMPLE = torch.tensor([999, 500, 1, 0])
PREV = torch.tensor([979, 480, 0, -1])


def rand(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEVICE, dtype)


def schedule(kind="linear"):
    return NoiseSchedule(kind, 1000, device=DEVICE)


# ------------------------------------------------------ float64 formulas (the oracle)
# Written from the reference sheet independently of nfd_fast.ops.diffusion's reference.


def ac64(s):
    return s.alphas_cumprod.double().cpu()


def bcast(v, x):
    return v.view(-1, *([1] * (x.dim() - 1)))


def oracle_x0_eps(m, x, a, pred):
    sa, sb = a.sqrt(), (1 - a).sqrt()
    if pred == "epsilon":
        return (x - sb * m) / sa, m
    if pred == "sample":
        return m, (x - sa * m) / sb
    return sa * x - sb * m, sa * m + sb * x


def oracle_ddim(m, x, t, prev, s, z, eta, pred, clip=None, alpha_one=True, clipped_eps=False,
                threshold=None):
    m, x, z = m.double().cpu(), x.double().cpu(), z.double().cpu()
    ac = ac64(s)
    a_t = bcast(ac[t], x)
    final = 1.0 if alpha_one else ac[0].item()
    a_p = bcast(torch.tensor([ac[p].item() if p >= 0 else final for p in prev.tolist()],
                             dtype=torch.float64), x)
    x0, eps = oracle_x0_eps(m, x, a_t, pred)
    if threshold is not None:  # Imagen: only x0 is thresholded; eps_hat keeps the raw output
        q = torch.quantile(x0.reshape(x0.shape[0], -1).abs(), threshold[0], dim=1)
        q = bcast(q.clamp(1.0, threshold[1]), x0)
        x0 = torch.maximum(torch.minimum(x0, q), -q) / q
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
    if clipped_eps:
        eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
    sigma = eta * ((1 - a_p) / (1 - a_t) * (1 - a_t / a_p)).sqrt()
    return a_p.sqrt() * x0 + (1 - a_p - sigma**2).clamp(min=0).sqrt() * eps + sigma * z, x0


def oracle_ddpm(m, x, t, prev, s, z, pred, clip=None, large=False):
    m, x, z = m.double().cpu(), x.double().cpu(), z.double().cpu()
    ac = ac64(s)
    a_t = bcast(ac[t], x)
    a_p = bcast(torch.tensor([ac[p].item() if p >= 0 else 1.0 for p in prev.tolist()],
                             dtype=torch.float64), x)
    x0, _ = oracle_x0_eps(m, x, a_t, pred)
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
    alpha = a_t / a_p
    beta = 1 - alpha
    mean = (a_p.sqrt() * beta / (1 - a_t)) * x0 + (alpha.sqrt() * (1 - a_p) / (1 - a_t)) * x
    var = beta if large else ((1 - a_p) / (1 - a_t) * beta).clamp(min=1e-20)
    on = bcast((t > 0).double(), x)
    return mean + on * var.sqrt() * z, x0


def both_backends(fn):
    with nfd_fast.use_backend("triton"):
        fused = fn()
    with nfd_fast.use_backend("torch"):
        ref = fn()
    return fused, ref


def close(actual, expected, tol):
    assert actual.dtype in (torch.float32, torch.float16, torch.bfloat16)
    assert torch.isfinite(actual).all()
    assert rel_err(actual, expected) < tol, rel_err(actual, expected)


TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}  # float32: rounding of 1 - a_t / a_p etc.


# ------------------------------------------------------------------------ schedules


def test_schedules_match_the_reference_sheet():
    lin = NoiseSchedule("linear", 1000)
    torch.testing.assert_close(lin.betas, torch.linspace(1e-4, 0.02, 1000))
    sl = NoiseSchedule("scaled_linear", 1000, 0.0015, 0.0195)
    torch.testing.assert_close(sl.betas, torch.linspace(0.0015**0.5, 0.0195**0.5, 1000) ** 2)
    cos = NoiseSchedule("cosine", 100)

    def abar(u):
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    expected = [min(1 - abar((i + 1) / 100) / abar(i / 100), 0.999) for i in range(100)]
    assert cos.betas.dtype == torch.float32
    torch.testing.assert_close(cos.betas, torch.tensor(expected, dtype=torch.float64).float())
    assert cos.betas.max().item() == pytest.approx(0.999)
    torch.testing.assert_close(cos.alphas_cumprod, torch.cumprod(1 - cos.betas, 0))
    moved = cos.to(DEVICE)
    assert moved.alphas_cumprod.device.type == DEVICE and cos.betas.device.type == "cpu"
    with pytest.raises(ValueError, match="kind must be one of"):
        NoiseSchedule("sigmoid")


def test_leading_timesteps():
    torch.testing.assert_close(leading_timesteps(1000, 4), torch.tensor([750, 500, 250, 0]))
    assert leading_timesteps(1000, 50)[0].item() == 980
    with pytest.raises(ValueError, match="steps must be in 1..1000"):
        leading_timesteps(1000, 0)


# ----------------------------------------------------------------------- the steps


# elementwise kernels: bf16 is exact in the interpreter too (only its tl.dot is not)
STEP_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", STEP_DTYPES)
def test_q_sample_and_velocity(dtype):
    s = schedule("cosine")
    x0, eps = rand(*SHAPE, dtype=dtype), rand(*SHAPE, dtype=dtype, seed=1)
    (xt, v), _ = both_backends(lambda: q_sample(x0, T_PER_SAMPLE, eps, s, return_velocity=True))
    a = bcast(ac64(s)[T_PER_SAMPLE], x0)
    x0d, epsd = x0.double().cpu(), eps.double().cpu()
    close(xt, a.sqrt() * x0d + (1 - a).sqrt() * epsd, TOL[dtype])
    close(v, a.sqrt() * epsd - (1 - a).sqrt() * x0d, TOL[dtype])
    assert xt.dtype == dtype


@pytest.mark.parametrize("pred", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 0.6])
@pytest.mark.parametrize("dtype", STEP_DTYPES)
def test_ddim_step(pred, eta, dtype):
    s = schedule()
    m, x, z = (rand(*SHAPE, dtype=dtype, seed=i) for i in range(3))
    fused, ref = both_backends(lambda: ddim_step(m, T_PER_SAMPLE, PREV, x, s, eta=eta, noise=z,
                                                 prediction_type=pred))
    want = oracle_ddim(m, x, T_PER_SAMPLE, PREV, s, z, eta, pred)
    for got_f, got_r, w in zip(fused, ref, want):
        close(got_f, w, TOL[dtype])
        close(got_r, w, TOL[dtype])


@pytest.mark.parametrize("options", [
    dict(clip_sample=1.0), dict(clip_sample=0.5, use_clipped_model_output=True),
    dict(set_alpha_to_one=False), dict(clip_sample=(-0.3, 0.7))])
def test_ddim_options(options):
    s = schedule("cosine")
    m, x, z = (rand(*SHAPE, seed=i) for i in range(3))
    fused, ref = both_backends(lambda: ddim_step(m, T_PER_SAMPLE, PREV, x, s, eta=0.3, noise=z,
                                                 prediction_type="sample", **options))
    clip = options.get("clip_sample")
    if isinstance(clip, tuple):  # asymmetric range: compare the two backends only
        for a, b in zip(fused, ref):
            close(a, b.double(), TOL[torch.float32])
        return
    want = oracle_ddim(m, x, T_PER_SAMPLE, PREV, s, z, 0.3, "sample", clip=clip,
                       alpha_one=options.get("set_alpha_to_one", True),
                       clipped_eps=options.get("use_clipped_model_output", False))
    for a, b, w in zip(fused, ref, want):
        close(a, w, TOL[torch.float32])
        close(b, w, TOL[torch.float32])


@pytest.mark.parametrize("pred", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("clip", [None, 1.0])
def test_ddpm_step(pred, variance_type, clip):
    s = schedule("cosine")
    m, x, z = (rand(*SHAPE, seed=i) for i in range(3))
    t = torch.tensor([999, 500, 1, 0])
    fused, ref = both_backends(lambda: ddpm_step(m, t, x, s, noise=z, prediction_type=pred,
                                                 variance_type=variance_type, clip_sample=clip))
    want = oracle_ddpm(m, x, t, t - 1, s, z, pred, clip, variance_type == "fixed_large")
    for a, b, w in zip(fused, ref, want):
        close(a, w, TOL[torch.float32])
        close(b, w, TOL[torch.float32])


def test_ddpm_strided_prev_and_int_timesteps():
    s = schedule()
    m, x, z = (rand(*SHAPE, seed=i) for i in range(3))
    fused, _ = both_backends(lambda: ddpm_step(m, 600, x, s, prev_t=580, noise=z))
    want = oracle_ddpm(m, x, torch.full((4,), 600), torch.full((4,), 580), s, z, "epsilon")
    close(fused[0], want[0], TOL[torch.float32])
    # t = 0 (final step): no noise is added, whatever noise is given
    fused0, _ = both_backends(lambda: ddpm_step(m, 0, x, s, noise=z))
    fused0_other, _ = both_backends(lambda: ddpm_step(m, 0, x, s, noise=z * 3))
    torch.testing.assert_close(fused0[0], fused0_other[0])


def test_classifier_free_guidance_is_fused():
    s = schedule()
    m, u, x, z = (rand(*SHAPE, seed=i) for i in range(4))
    w = 4.5
    fused, ref = both_backends(lambda: ddim_step(m, T_PER_SAMPLE, PREV, x, s, eta=0.5, noise=z,
                                                 uncond_output=u, guidance_scale=w))
    guided = u.double() + w * (m.double() - u.double())
    want = oracle_ddim(guided, x, T_PER_SAMPLE, PREV, s, z, 0.5, "epsilon")
    tol = 1e-4  # w = 4.5 scales the float32 rounding of the guided output by ~w
    close(fused[0], want[0], tol)
    close(ref[0], want[0], tol)
    fused_p, _ = both_backends(lambda: ddpm_step(m, T_PER_SAMPLE, x, s, noise=z, uncond_output=u,
                                                 guidance_scale=w))
    close(fused_p[0], oracle_ddpm(guided, x, T_PER_SAMPLE, T_PER_SAMPLE - 1, s, z, "epsilon")[0], tol)


def test_dynamic_thresholding():
    s = schedule()
    m, x, z = (rand(*SHAPE, seed=i) for i in range(3))
    m = m * 3
    fused, ref = both_backends(lambda: ddim_step(m, T_PER_SAMPLE, PREV, x, s, noise=z,
                                                 prediction_type="sample", dynamic_threshold=(0.9, 2.0)))
    want = oracle_ddim(m, x, T_PER_SAMPLE, PREV, s, z, 0.0, "sample", threshold=(0.9, 2.0))
    for out in (fused, ref):
        close(out[0], want[0], TOL[torch.float32])
        close(out[1], want[1], TOL[torch.float32])
    assert want[1].abs().max() <= 1.0 and (want[1].abs() == 1.0).any()


def test_langevin_and_predictor_steps():
    s = schedule()
    g, x, z = (rand(*SHAPE, seed=i) for i in range(3))
    snr = 0.16
    fused, ref = both_backends(lambda: langevin_step(g, x, T_PER_SAMPLE, s, snr=snr, noise=z))
    gd, xd, zd = g.double().cpu(), x.double().cpu(), z.double().cpu()
    noise_norm = zd.reshape(4, -1).norm(dim=1).mean()
    grad_norm = gd.reshape(4, -1).norm(dim=1).mean()
    step = bcast(2 * s.alphas.double().cpu()[T_PER_SAMPLE] * (snr * noise_norm / grad_norm) ** 2, xd)
    x_mean = xd + step * gd
    for out in (fused, ref):
        close(out[0], x_mean + (2 * step).sqrt() * zd, TOL[torch.float32])
        close(out[1], x_mean, TOL[torch.float32])
    fused, ref = both_backends(lambda: vp_predictor_step(g, x, T_PER_SAMPLE, s, noise=z))
    beta = bcast(s.betas.double().cpu()[T_PER_SAMPLE], xd)
    mean = xd - ((1 - beta).sqrt() * xd - xd - beta * gd)
    for out in (fused, ref):
        close(out[0], mean + beta.sqrt() * zd, TOL[torch.float32])
        close(out[1], mean, TOL[torch.float32])


def test_ve_langevin_uses_alpha_one():
    s = schedule()
    g, x, z = (rand(*SHAPE, seed=i) for i in range(3))
    fused, _ = both_backends(lambda: langevin_step(g, x, 10, s, noise=z, variance_preserving=False))
    gd, xd, zd = g.double().cpu(), x.double().cpu(), z.double().cpu()
    step = 2 * (0.16 * zd.reshape(4, -1).norm(dim=1).mean() / gd.reshape(4, -1).norm(dim=1).mean()) ** 2
    close(fused[1], xd + step * gd, TOL[torch.float32])


def test_pc_step_runs_corrector_then_predictor():
    s = schedule()
    calls = []

    def score_fn(x, t):
        calls.append(t.clone())
        return -x

    x = rand(*SHAPE)
    with nfd_fast.use_backend("triton"):
        out, mean = pc_step(score_fn, x, 700, s, n_corrector_steps=2,
                            generator=torch.Generator(DEVICE).manual_seed(0))
    assert len(calls) == 3 and all((c == 700).all() for c in calls)
    assert out.shape == x.shape and torch.isfinite(out).all()


# ------------------------------------------------------------------ in-kernel noise


def _kernel_noise(seed: int, shape=(4, 4099)):
    """The noise a DDPM step adds, isolated: zero model output and x, t = 1 -> prev 0."""
    s = schedule()
    zero = torch.zeros(shape, device=DEVICE)
    with nfd_fast.use_backend("triton"):
        out, mean = ddpm_step(zero, 1, zero, s, variance_type="fixed_large", seed=seed)
    beta = (1 - s.alphas_cumprod[1] / s.alphas_cumprod[0]).item()
    return (out.double() - mean.double()) / math.sqrt(beta)


def test_in_kernel_noise_statistics():
    z = _kernel_noise(1234).flatten()
    n = z.numel()
    assert abs(z.mean().item()) < 4 / math.sqrt(n)
    assert abs(z.var().item() - 1) < 6 * math.sqrt(2 / n)
    # fourth moment of a normal is 3
    assert abs((z**4).mean().item() - 3) < 0.15
    # neighbouring elements and different seeds are uncorrelated
    assert abs(torch.corrcoef(torch.stack([z[:-1], z[1:]]))[0, 1].item()) < 4 / math.sqrt(n)
    z2 = _kernel_noise(1235).flatten()
    assert abs(torch.corrcoef(torch.stack([z, z2]))[0, 1].item()) < 4 / math.sqrt(n)
    # per-sample streams differ (sample b's offsets are distinct)
    zb = _kernel_noise(1234).reshape(4, -1)
    assert abs(torch.corrcoef(zb[:2])[0, 1].item()) < 4 / math.sqrt(zb.shape[1])
    # each of the four normals of a Philox call lands in one element: values repeat only
    # by float32 coincidence (a few pairs in 16k), not per call (3 in 4 would)
    assert torch.unique(z).numel() > 0.999 * n


def test_in_kernel_noise_is_standard_normal():
    """Kolmogorov-Smirnov against the normal CDF (1% level), the two-sigma tail, and the
    two normals of one Box-Muller pair (elements 4k and 4k + 2) uncorrelated in their
    squares too (they share a radius)."""
    z = _kernel_noise(99).flatten().cpu()
    n = z.numel()
    cdf = 0.5 * (1 + torch.erf(z.sort().values / math.sqrt(2)))
    i = torch.arange(1, n + 1, dtype=torch.float64)
    ks = torch.maximum(i / n - cdf, cdf - (i - 1) / n).max().item()
    assert ks < 1.63 / math.sqrt(n)
    tail = (z.abs() > 2).double().mean().item()
    assert abs(tail - 0.0455) < 4 * math.sqrt(0.0455 * 0.9545 / n)
    pairs = z[: n // 4 * 4].view(-1, 4)
    r = torch.corrcoef(torch.stack([pairs[:, 0] ** 2, pairs[:, 2] ** 2]))[0, 1].item()
    assert abs(r) < 4 / math.sqrt(pairs.shape[0])


@triton.jit
def _sincos_probe(x_ptr, out_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    s, c = KD._sincos(tl.load(x_ptr + i))
    tl.store(out_ptr + 2 * i, s)
    tl.store(out_ptr + 2 * i + 1, c)


@triton.jit
def _box_muller_probe(radius_ptr, angle_ptr, out_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    n0, n1 = KD._box_muller(tl.load(radius_ptr + i).to(tl.uint32, bitcast=True),
                            tl.load(angle_ptr + i).to(tl.uint32, bitcast=True))
    tl.store(out_ptr + 2 * i, n0)
    tl.store(out_ptr + 2 * i + 1, n1)


def test_noise_sine_and_cosine_polynomials_within_one_ulp():
    """The documented error of the kernel's sincos on [-pi/4, pi/4] against float64:
    below 2^-23 relative (measured 0.59 and 0.84 of it)."""
    n = 1 << 14
    x = torch.linspace(-math.pi / 4, math.pi / 4, n, dtype=torch.float32, device=DEVICE)
    out = torch.empty(2 * n, device=DEVICE)
    _sincos_probe[(1,)](x, out, N=n)
    got = out.cpu().double().view(n, 2)
    want = torch.stack([x.cpu().double().sin(), x.cpu().double().cos()], -1)
    rel = ((got - want).abs() / want.abs().clamp_min(1e-30)).max().item()
    assert rel < 2.0**-23


def test_box_muller_turns_each_quadrant_exactly():
    """(r cos, r sin) of angle q pi/2 + x from the bits, against float64, over random and
    edge bit patterns (every quadrant boundary, u at both ends)."""
    n = 4096
    g = torch.Generator().manual_seed(0)
    radius = torch.randint(0, 2**32, (n,), generator=g, dtype=torch.int64)
    angle = torch.randint(0, 2**32, (n,), generator=g, dtype=torch.int64)
    radius[:4] = torch.tensor([0, 1, 2**31, 2**32 - 1])
    angle[:8] = torch.tensor([0, 2**30 - 1, 2**30, 2**31 - 1, 2**31, 3 * 2**30, 3 * 2**30 + 2**29, 2**32 - 1])

    def as_int32(v):  # the same 32 bits, as the kernel's uint32 loads read them
        return (v - (v >= 2**31).long() * 2**32).to(torch.int32).to(DEVICE)

    out = torch.empty(2 * n, device=DEVICE)
    _box_muller_probe[(1,)](as_int32(radius), as_int32(angle), out, N=n)
    r = (-2 * ((radius.double() + 0.5) * 2.0**-32).log()).sqrt()
    theta = (angle // 2**30) * (math.pi / 2) + (angle % 2**30).double() * (math.pi / 2) * 2.0**-30 - math.pi / 4
    want = torch.stack([r * theta.cos(), r * theta.sin()], -1).flatten()
    err = (out.cpu().double() - want).abs()
    # float32 rounding of u near 1 quantises the smallest radii (|z| below 1e-3) at about
    # 3e-5; elsewhere the normals are float32-accurate
    assert err.max().item() < 4e-5
    assert err[want.abs() > 0.1].max().item() < 2e-6


def test_same_seed_same_noise_and_generators():
    torch.testing.assert_close(_kernel_noise(7), _kernel_noise(7))
    s = schedule()
    m, x = rand(*SHAPE), rand(*SHAPE, seed=1)
    with nfd_fast.use_backend("triton"):
        a = ddim_step(m, 500, 480, x, s, eta=1.0, generator=torch.Generator(DEVICE).manual_seed(3))
        b = ddim_step(m, 500, 480, x, s, eta=1.0, generator=torch.Generator(DEVICE).manual_seed(3))
        c = ddim_step(m, 500, 480, x, s, eta=1.0, generator=torch.Generator(DEVICE).manual_seed(4))
    torch.testing.assert_close(a[0], b[0])
    assert not torch.equal(a[0], c[0])


def test_langevin_in_kernel_noise_norm_matches_its_noise():
    """With in-kernel noise, the step size uses the norm of the very noise it adds."""
    s = schedule()
    g, x = rand(4, 2053, seed=1), rand(4, 2053, seed=2)
    with nfd_fast.use_backend("triton"):
        out, mean = langevin_step(g, x, 300, s, snr=0.2, generator=torch.Generator(DEVICE).manual_seed(5))
    step = ((mean.double() - x.double()) / g.double()).mean(dim=1)  # per-sample step
    z = (out.double() - mean.double()) / (2 * step.view(-1, 1)).sqrt()
    alpha = s.alphas.double()[300].item()
    expected = 2 * alpha * (0.2 * z.norm(dim=1).mean() / g.double().norm(dim=1).mean()) ** 2
    assert step.cpu() == pytest.approx([expected.item()] * 4, rel=1e-4)


# ------------------------------------------------------------------------- the loop


def _denoiser(x, t, cond):
    # a smooth, t-dependent stand-in for a network
    shift = 0.0 if cond is None else cond
    return 0.3 * torch.tanh(x) + 1e-4 * t.view(-1, *([1] * (x.dim() - 1))).float() + shift


def test_ddim_loop_eta0_is_deterministic_and_backends_agree():
    s = schedule()
    x_T = rand(3, 17)
    outs = {}
    for be in ("triton", "torch"):
        with nfd_fast.use_backend(be):
            a = sample(_denoiser, (3, 17), s, steps=10, x_T=x_T, generator=torch.Generator().manual_seed(0))
            b = sample(_denoiser, (3, 17), s, steps=10, x_T=x_T, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(a, b)  # eta = 0: the seed does not matter
        outs[be] = a
    assert rel_err(outs["triton"], outs["torch"]) < 1e-5


def test_loop_matches_explicit_steps():
    s = schedule("cosine")
    x_T = rand(2, 9)
    with nfd_fast.use_backend("torch"):
        got = sample(_denoiser, (2, 9), s, steps=5, x_T=x_T, guidance_scale=2.0, cond=0.1, uncond=None)
        x = x_T.clone()
        for t in [800, 600, 400, 200, 0]:
            tt = torch.full((2,), t, device=DEVICE)
            x, _ = ddim_step(_denoiser(x, tt, 0.1), t, t - 200, x, s,
                             uncond_output=_denoiser(x, tt, None), guidance_scale=2.0)
    torch.testing.assert_close(got, x)


def test_ddpm_loop_reproducible_for_a_generator():
    s = schedule()
    with nfd_fast.use_backend("triton"):
        a = sample(_denoiser, (2, 33), s, method="ddpm", steps=8, generator=torch.Generator().manual_seed(0))
        b = sample(_denoiser, (2, 33), s, method="ddpm", steps=8, generator=torch.Generator().manual_seed(0))
        c = sample(_denoiser, (2, 33), s, method="ddpm", steps=8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c) and torch.isfinite(a).all()


def test_sample_reuses_its_sampler_per_configuration():
    from nfd_fast.diffusion import sampling

    s = schedule()

    def den(x, t, cond):
        return 0.1 * x

    sample(den, (2, 5), s, steps=4, generator=torch.Generator().manual_seed(0))
    sample(den, (2, 5), s, steps=4, generator=torch.Generator().manual_seed(1))
    sample(den, (2, 5), s, steps=5)
    assert len(sampling._SAMPLERS[den]) == 2
    import gc
    import weakref

    ref = weakref.ref(den)
    del den  # neither the cache nor its Samplers keep the denoiser alive
    gc.collect()
    assert ref() is None


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU (run by benchmarks/gpu_check.sh)")
def test_cuda_graph_loop_matches_eager():
    s = schedule()
    x_T = rand(3, 1000)
    sampler = Sampler(_denoiser, (3, 1000), s, steps=20, eta=0.5, cuda_graph=True)
    eager = Sampler(_denoiser, (3, 1000), s, steps=20, eta=0.5, cuda_graph=False)
    g = lambda: torch.Generator().manual_seed(9)  # noqa: E731
    first, second = sampler(x_T, generator=g()), sampler(x_T, generator=g())
    torch.testing.assert_close(first, second)
    torch.testing.assert_close(first, eager(x_T, generator=g()))
    assert sampler._graph is not None


# ----------------------------------------------------------------------- bad input


@pytest.mark.parametrize("call, error, match", [
    (lambda s, x: ddim_step(x, 1000, 0, x, s), ValueError, r"t: timesteps must be in \[0, 999\]"),
    (lambda s, x: ddim_step(x, -1, -1, x, s), ValueError, "t: timesteps must be in"),
    (lambda s, x: ddim_step(x, 10, 10, x, s), ValueError, "prev_t: must be smaller than t"),
    (lambda s, x: ddim_step(x, torch.tensor([5, 6]), 0, x, s), ValueError, r"t: expected an integer tensor of shape \[4\]"),
    (lambda s, x: ddim_step(x, 5.0, 0, x, s), TypeError, "t: expected an int"),
    (lambda s, x: ddim_step(x[:2], 5, 0, x, s), ValueError, r"model_output: expected shape \[4, 3, 37\]"),
    (lambda s, x: ddim_step(x, 5, 0, x, s, prediction_type="x0"), ValueError, "prediction_type must be one of"),
    (lambda s, x: ddim_step(x, 5, 0, x, s, uncond_output=x), ValueError, "needs both uncond_output and guidance_scale"),
    (lambda s, x: ddim_step(x, 5, 0, x, s, clip_sample=(1, -1)), ValueError, "clip_sample"),
    (lambda s, x: ddim_step(x, 5, 0, x, s, clip_sample=1, dynamic_threshold=(0.99, 1)), ValueError, "not both"),
    (lambda s, x: ddim_step(x, 5, 0, x, s, eta=-1), ValueError, "eta must be >= 0"),
    (lambda s, x: ddpm_step(x, 5, x, s, variance_type="learned"), ValueError, "variance_type must be one of"),
    (lambda s, x: ddpm_step(x, 5, x, s, prev_t=7), ValueError, "prev_t: must be smaller"),
    (lambda s, x: q_sample(x, 5, x[:1], s), ValueError, "noise: expected shape"),
    (lambda s, x: langevin_step(x, x, 5, s, snr=0), ValueError, "snr must be > 0"),
    (lambda s, x: ddim_step(x, 5, 0, x, s.to("meta")), ValueError, "schedule: is on meta"),
])
def test_bad_input_raises_before_launch(call, error, match):
    with nfd_fast.use_backend("triton"), pytest.raises(error, match=match):
        call(schedule(), rand(*SHAPE))


def test_sampler_rejects_bad_configuration():
    s = schedule()
    with pytest.raises(ValueError, match="method must be one of"):
        Sampler(_denoiser, (2, 3), s, method="euler")
    with pytest.raises(ValueError, match="steps must be in"):
        Sampler(_denoiser, (2, 3), s, steps=2000)
    with pytest.raises(ValueError, match="x_T: expected shape"):
        Sampler(_denoiser, (2, 3), s, cuda_graph=False)(rand(2, 4))
    if not ON_GPU:
        with pytest.raises(ValueError, match="cuda_graph=True needs"):
            Sampler(_denoiser, (2, 3), s, cuda_graph=True)


def test_empty_batch():
    s = schedule()
    x = torch.empty(0, 5, device=DEVICE)
    with nfd_fast.use_backend("triton"):
        out, x0 = ddim_step(x, 5, 0, x, s)
    assert out.shape == (0, 5) and x0.shape == (0, 5)


def test_sampler_loop_reads_only_tables_built_before_capture(monkeypatch):
    """What a captured CUDA graph replays must not read host memory copied during capture:
    after one warm-up run of the loop (the Sampler runs one before capturing), a second
    run builds no table and copies nothing from the host, with a denoiser that calls
    grid_lookup (its table of field addresses) and fused_mlp (its activation table)."""
    import sys

    from nfd_fast.nn import FusedMLP, MultiScaleField
    from nfd_fast.ops._device import _constant_table

    torch.manual_seed(0)
    field = MultiScaleField([(0, 1)], [5], 3).to(DEVICE)
    mlp = FusedMLP(3 + 2, 16, 2, 1, activation="silu").to(DEVICE)

    def denoiser(x, t, cond):
        features = field(x.tanh())
        return mlp(torch.cat([x, features], dim=-1))

    sched = NoiseSchedule("linear", 20, device=DEVICE)
    sampler = Sampler(denoiser, (2, 7, 2), sched, method="ddpm", steps=4, cuda_graph=False)
    x = torch.randn(2, 7, 2, device=DEVICE)
    seeds = torch.arange(4, device=DEVICE) + 11
    host_copies = []
    real_tensor = torch.tensor

    def recording_tensor(*args, **kwargs):
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller.startswith("nfd_fast"):
            host_copies.append(caller)
        return real_tensor(*args, **kwargs)

    with nfd_fast.use_backend("triton"), torch.no_grad():
        warm = sampler._loop(x, seeds)  # builds every table
        misses = _constant_table.cache_info().misses
        monkeypatch.setattr(torch, "tensor", recording_tensor)
        again = sampler._loop(x, seeds)
        monkeypatch.setattr(torch, "tensor", real_tensor)
    assert _constant_table.cache_info().misses == misses
    assert host_copies == []
    assert torch.equal(warm, again)  # same seeds, same in-kernel noise


@pytest.mark.parametrize("setting", ["torch", "triton"])
def test_unvalidated_out_of_range_timesteps_give_nan(setting):
    """validate=False skips the host check: a timestep outside the schedule must then give
    NaN for its sample, never another timestep's coefficients (or an out-of-bounds read)."""
    sched = NoiseSchedule("linear", 50)
    x, m = torch.randn(3, 8), torch.randn(3, 8)
    t = torch.tensor([10, 50, 49])
    prev = torch.tensor([5, 40, 60])
    with nfd_fast.use_backend(setting):
        x_prev, x0 = ddim_step(m, t, prev, x, sched, validate=False)
        x_t = q_sample(x, torch.tensor([3, -1, 70]), m, sched, validate=False)
    assert torch.isfinite(x_prev[0]).all() and torch.isfinite(x0[0]).all()
    assert torch.isnan(x_prev[1:]).all()
    assert torch.isfinite(x_t[0]).all() and torch.isnan(x_t[1:]).all()


@pytest.mark.parametrize("call,error,match", [
    (lambda s, x: ddpm_step(x, 2**70, x, s), ValueError, "int64"),
    (lambda s, x: ddim_step(x, 5, 1, x, s, dynamic_threshold=0.99), ValueError, "ratio, max_value"),
    (lambda s, x: ddim_step(x, 5, 1, x, s, dynamic_threshold=(0.9,)), ValueError, "ratio, max_value"),
    (lambda s, x: ddim_step(x, 5, 1, x, s, uncond_output=x, guidance_scale=torch.ones(3)),
     TypeError, "guidance_scale"),
    (lambda s, x: ddim_step(x, 5, 1, x, s, eta=float("nan")), ValueError, "eta"),
])
def test_malformed_step_options_raise_clearly(call, error, match):
    with pytest.raises(error, match=match):
        call(NoiseSchedule("linear", 10), torch.randn(3, 4))


def test_sampler_with_a_models_own_timesteps_matches_explicit_steps():
    """timesteps= visits a given descending spacing (DDMI's 999, 979, ..., 19, then x0):
    each step goes to the next timestep, the last to the final x0."""
    sched = schedule()
    visit = [int(t) for t in range(sched.num_timesteps - 1, 0, -7)]
    denoiser = lambda x, t, cond: 0.3 * x + 0.01 * t.float().view(-1, 1)  # noqa: E731
    x_T = torch.randn(3, 5, device=DEVICE)
    sampler = Sampler(denoiser, (3, 5), sched, timesteps=visit, cuda_graph=False)
    got = sampler(x_T)
    x = x_T
    for t, prev in zip(visit, visit[1:] + [-1]):
        tt = torch.full((3,), t, device=DEVICE)
        x, _ = ddim_step(denoiser(x, tt, None), tt, torch.full((3,), prev, device=DEVICE), x, sched)
    assert sampler.steps == len(visit)
    assert torch.allclose(got, x, atol=1e-6)
    with pytest.raises(ValueError, match="timesteps"):
        Sampler(denoiser, (3, 5), sched, timesteps=[5, 9, 1])
