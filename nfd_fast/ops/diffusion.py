"""Fused diffusion steps: q_sample, DDPM, DDIM, Langevin corrector, VP predictor, with
per-sample timesteps, classifier-free guidance and in-kernel noise.

The math is ../shared/reference/diffusion.md (a_t = alphas_cumprod[t], b_t = 1 - a_t):
    q_sample      x_t = sqrt(a_t) x0 + sqrt(b_t) eps;  v = sqrt(a_t) eps - sqrt(b_t) x0
    prediction    epsilon / sample / v_prediction -> (x0, eps_hat); then optional dynamic
                  thresholding (per-sample quantile) or clip of x0
    ddpm_step     mean = (sqrt(a_p) beta' / b_t) x0 + (sqrt(alpha') b_p / b_t) x_t,
                  x_prev = mean + sqrt(var) z where t > 0 (var fixed_small / fixed_large)
    ddim_step     x_prev = sqrt(a_p) x0 + sqrt(1 - a_p - sigma^2) eps_hat + sigma z,
                  sigma = eta sqrt((b_p / b_t)(1 - a_t / a_p))
    guidance      eps = eps_u + w (eps_c - eps_u), applied to the model output in-kernel
    langevin      x = x + e g + sqrt(2 e) z, e = 2 alpha_b (snr ||z|| / ||g||)^2 with the
                  per-sample norms averaged over the batch (score_sde; alpha = 1 - beta_t
                  for VP, 1 for VE)
    vp_predictor  x = (2 - sqrt(1 - beta_t)) x + beta_t s + sqrt(beta_t) z (reverse diffusion)

Shapes: x and the model output are [B, ...]; t and prev_t are ints or integer tensors [B]
(per-sample timesteps). Math in float32, results in x's dtype. Noise: pass `noise`
(then the fused step equals the reference to float32 rounding), or let the step draw it:
the Triton kernel draws Philox normals from a seed taken from `generator` (no noise
tensor is written or read); the reference draws torch.randn from the same generator, so
the two backends' random draws differ while their statistics agree.

Validation reads t's values (a host sync for device tensors) unless validate=False, which
the sampling loop uses: its timesteps are built valid and must stay on the device.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

from .. import backend
from ._device import host_table

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
VARIANCE_TYPES = ("fixed_small", "fixed_large")
Timesteps = Union[int, torch.Tensor]


# ----------------------------------------------------------------------------- checks


def _check_x(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor")
    if x.dim() < 1:
        raise ValueError(f"{name}: expected shape [B, ...], got a scalar")


def _check_like(t: Optional[torch.Tensor], x: torch.Tensor, name: str) -> None:
    if t is None:
        return
    _check_x(t, name)
    if t.shape != x.shape:
        raise ValueError(f"{name}: expected shape {list(x.shape)} (like x), got {list(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name}: is on {t.device} but x is on {x.device}")


def _timesteps(t: Timesteps, x: torch.Tensor, schedule, name: str, validate: bool,
               allow_negative: bool = False) -> torch.Tensor:
    """t as an int64 tensor [B] on x's device, its range checked when validate."""
    B, T = x.shape[0], schedule.num_timesteps
    if isinstance(t, bool) or not isinstance(t, (int, torch.Tensor)):
        raise TypeError(f"{name}: expected an int or an integer tensor of shape [{B}], got {type(t).__name__}")
    if isinstance(t, torch.Tensor):
        if t.dtype.is_floating_point or t.dtype == torch.bool or t.shape not in ((B,), ()):
            raise ValueError(f"{name}: expected an integer tensor of shape [{B}], got {t.dtype} {list(t.shape)}")
        tt = t.to(device=x.device, dtype=torch.int64).expand(B)
    else:
        tt = torch.full((B,), t, dtype=torch.int64, device=x.device)
    if validate and B > 0:
        # prev_t may be any negative value: it marks the final step
        bad = (tt >= T) if allow_negative else ((tt < 0) | (tt >= T))
        if bool(bad.any()):
            allowed = f"< {T}" if allow_negative else f"in [0, {T - 1}]"
            raise ValueError(f"{name}: timesteps must be {allowed}, got {tt[bad][:4].tolist()}")
    return tt.contiguous()


def _check_schedule(schedule, x: torch.Tensor) -> None:
    if schedule.device != x.device:
        raise ValueError(f"schedule: is on {schedule.device} but x is on {x.device}; "
                         "use schedule.to(device)")


def _clip_range(clip_sample) -> Optional[Tuple[float, float]]:
    if clip_sample is None:
        return None
    if isinstance(clip_sample, (int, float)):
        lo, hi = -float(clip_sample), float(clip_sample)
    else:
        lo, hi = (float(v) for v in clip_sample)
    if not lo < hi:
        raise ValueError(f"clip_sample: expected r > 0 or (lo, hi) with lo < hi, got {clip_sample}")
    return lo, hi


def _check_guidance(model_output, uncond_output, guidance_scale) -> None:
    if (uncond_output is None) != (guidance_scale is None):
        raise ValueError("classifier-free guidance needs both uncond_output and guidance_scale")
    _check_like(uncond_output, model_output, "uncond_output")


# -------------------------------------------------------------------------- reference


def _per_sample(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1, ..., 1] broadcastable against x."""
    return v.view(-1, *([1] * (x.dim() - 1)))


def guided(model_output, uncond_output, guidance_scale):
    """eps_u + w (eps_c - eps_u), float32 (reference)."""
    m = model_output.float()
    if uncond_output is None:
        return m
    u = uncond_output.float()
    return u + guidance_scale * (m - u)


def predict_x0_eps(model_output, x_t, a_t, prediction_type):
    """(x0, eps_hat) from a model output (reference; a_t broadcastable)."""
    sa, sb = a_t.sqrt(), (1 - a_t).sqrt()
    if prediction_type == "epsilon":
        return (x_t - sb * model_output) / sa, model_output
    if prediction_type == "sample":
        return model_output, (x_t - sa * model_output) / sb
    return sa * x_t - sb * model_output, sa * model_output + sb * x_t


def dynamic_threshold_scale(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Imagen's per-sample s = clamp(quantile(|x0|, ratio), 1, max_value), shape [B]."""
    flat = x0.float().reshape(x0.shape[0], -1).abs()
    return torch.quantile(flat, ratio, dim=1).clamp(min=1.0, max=max_value)


def _finish_x0(x0, threshold, clip):
    if threshold is not None:
        s = _per_sample(threshold, x0)
        x0 = torch.maximum(torch.minimum(x0, s), -s) / s
    if clip is not None:
        x0 = x0.clamp(*clip)
    return x0


def _alpha_prev(schedule, prev, final):
    ac = schedule.alphas_cumprod
    return torch.where(prev >= 0, ac[prev.clamp(min=0)], torch.full_like(ac[:1], final)[0])


def reference_ddpm(m, x, t, prev, schedule, z, pred, clip, threshold, variance_type):
    ac = schedule.alphas_cumprod
    a_t = _per_sample(ac[t], x)
    a_p = _per_sample(_alpha_prev(schedule, prev, 1.0), x)
    b_t, b_p = 1 - a_t, 1 - a_p
    x0, _ = predict_x0_eps(m, x, a_t, pred)
    x0 = _finish_x0(x0, threshold, clip)
    alpha = a_t / a_p
    beta = 1 - alpha
    mean = (a_p.sqrt() * beta / b_t) * x0 + (alpha.sqrt() * b_p / b_t) * x
    var = beta if variance_type == "fixed_large" else (b_p / b_t * beta).clamp(min=1e-20)
    noisy = _per_sample(t > 0, x)
    return mean + torch.where(noisy, var.sqrt(), torch.zeros_like(var)) * z, x0


def reference_ddim(m, x, t, prev, schedule, z, pred, clip, threshold, eta, set_alpha_to_one,
                   use_clipped_model_output):
    ac = schedule.alphas_cumprod
    a_t = _per_sample(ac[t], x)
    final = 1.0 if set_alpha_to_one else float(ac[0])
    a_p = _per_sample(_alpha_prev(schedule, prev, final), x)
    b_t, b_p = 1 - a_t, 1 - a_p
    x0, eps = predict_x0_eps(m, x, a_t, pred)
    x0 = _finish_x0(x0, threshold, clip)
    if use_clipped_model_output:
        eps = (x - a_t.sqrt() * x0) / b_t.sqrt()
    sigma = eta * ((b_p / b_t) * (1 - a_t / a_p)).sqrt()
    x_prev = a_p.sqrt() * x0 + (1 - a_p - sigma**2).clamp(min=0).sqrt() * eps + sigma * z
    return x_prev, x0


# ------------------------------------------------------------------------ dispatching


def _use_kernel(op: str, *tensors) -> bool:
    return backend.resolve(op, *tensors) == "triton"


def _draw_noise(x, generator, seed=None):
    if seed is not None:  # the reference cannot replay Philox: seed a torch generator instead
        generator = torch.Generator(x.device).manual_seed(int(seed))
    if generator is None:  # randn_like also traces under torch.compile with dynamic shapes
        return torch.randn_like(x, dtype=torch.float32)
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)


def _seed(x: torch.Tensor, generator, seed=None) -> torch.Tensor:
    """The Philox seed as a device tensor [1]: `seed` if given (an int or a tensor, which
    a captured CUDA graph reads at replay), else a fresh draw from `generator`."""
    if seed is not None:
        if isinstance(seed, torch.Tensor):
            return seed.reshape(1).to(device=x.device, dtype=torch.int64)
        return host_table([int(seed)], torch.int64, x.device)
    dev = generator.device if generator is not None else x.device
    seed = torch.randint(0, 2**31 - 1, (1,), generator=generator, device=dev, dtype=torch.int64)
    return seed.to(x.device)


def _launch(mode, x, model=None, *, out2=True, uncond=None, guidance=0.0, noise=None,
            seed=None, t=None, prev=None, schedule=None, threshold=None, step=None,
            sumsq=None, pred="epsilon", clip=None, eta=0.0, fixed_large=False,
            alpha_one=True, clipped_eps=False):
    from triton import cdiv

    from ..kernels import diffusion as K

    B = x.shape[0]
    S = x.numel() // max(B, 1)
    out = torch.empty_like(x)
    second = torch.empty_like(x) if out2 else out
    if x.numel() == 0:
        return out, second
    dummy = schedule.betas if schedule is not None else x
    noise_kind = K.NOISE_GIVEN if noise is not None else (K.NOISE_PHILOX if seed is not None else K.NOISE_NONE)
    block = 1024
    grid = (cdiv(S, block), B)
    c = lambda v: v.contiguous() if v is not None else dummy  # noqa: E731
    K.diffusion_step_kernel[grid](
        out, second, x.contiguous(), c(model), c(uncond), c(noise), c(seed), c(t), c(prev),
        schedule.alphas_cumprod if schedule is not None else dummy,
        schedule.betas if schedule is not None else dummy, c(threshold), c(step), c(sumsq),
        S, float(guidance), float(eta), float(clip[0]) if clip else 0.0, float(clip[1]) if clip else 0.0,
        MODE=mode, PRED=PREDICTION_TYPES.index(pred), NOISE=noise_kind, CFG=uncond is not None,
        CLIP=clip is not None, THRESHOLD=threshold is not None, FIXED_LARGE=fixed_large,
        ALPHA_ONE=alpha_one, CLIPPED_EPS=clipped_eps, BLOCK=block, num_warps=4,
    )
    return out, second


# ----------------------------------------------------------------------------- public


def q_sample(x0: torch.Tensor, t: Timesteps, noise: torch.Tensor, schedule, *,
             return_velocity: bool = False, validate: bool = True):
    """Forward diffusion x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise, per-sample t.

    Returns x_t, or (x_t, v) with the velocity target v = sqrt(a_t) noise - sqrt(1 - a_t) x0.
    """
    _check_x(x0, "x0")
    _check_like(noise, x0, "noise")
    if noise is None:
        raise ValueError("noise: q_sample needs the noise tensor (it is the training target)")
    _check_schedule(schedule, x0)
    tt = _timesteps(t, x0, schedule, "t", validate)
    if _use_kernel("q_sample", x0, noise):
        from ..kernels import diffusion as K

        x_t, v = _launch(K.Q_SAMPLE, x0, noise, t=tt, schedule=schedule)
    else:
        a = _per_sample(schedule.alphas_cumprod[tt], x0)
        x_t = (a.sqrt() * x0.float() + (1 - a).sqrt() * noise.float()).to(x0.dtype)
        v = (a.sqrt() * noise.float() - (1 - a).sqrt() * x0.float()).to(x0.dtype)
    return (x_t, v) if return_velocity else x_t


def _step_inputs(model_output, x_t, schedule, uncond_output, guidance_scale, noise,
                 prediction_type, clip_sample, dynamic_threshold):
    _check_x(x_t, "x_t")
    _check_like(model_output, x_t, "model_output")
    _check_guidance(model_output, uncond_output, guidance_scale)
    _check_like(noise, x_t, "noise")
    _check_schedule(schedule, x_t)
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    clip = _clip_range(clip_sample)
    if clip is not None and dynamic_threshold is not None:
        raise ValueError("give clip_sample or dynamic_threshold, not both")
    if dynamic_threshold is not None:
        ratio, max_value = dynamic_threshold
        if not 0.0 < ratio <= 1.0 or max_value < 1.0:
            raise ValueError(f"dynamic_threshold: expected (ratio in (0, 1], max_value >= 1), got {dynamic_threshold}")
    return clip


def _threshold(model_output, uncond_output, guidance_scale, x_t, tt, schedule, pred, dynamic_threshold):
    """The per-sample dynamic-threshold scale [B] (one extra pass: it needs a quantile)."""
    if dynamic_threshold is None:
        return None
    a_t = _per_sample(schedule.alphas_cumprod[tt], x_t)
    x0, _ = predict_x0_eps(guided(model_output, uncond_output, guidance_scale), x_t.float(), a_t, pred)
    return dynamic_threshold_scale(x0, *dynamic_threshold)


def ddpm_step(model_output: torch.Tensor, t: Timesteps, x_t: torch.Tensor, schedule, *,
              prev_t: Optional[Timesteps] = None, noise: Optional[torch.Tensor] = None,
              generator: Optional[torch.Generator] = None, prediction_type: str = "epsilon",
              clip_sample: Union[None, float, Sequence[float]] = None,
              variance_type: str = "fixed_small", uncond_output: Optional[torch.Tensor] = None,
              guidance_scale: Optional[float] = None,
              dynamic_threshold: Optional[Tuple[float, float]] = None,
              seed: Union[None, int, torch.Tensor] = None,
              validate: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """One DDPM step from t to prev_t (default t - 1; prev_t < 0 is the final step).

    Returns (x_prev, x0_pred). clip_sample: None, r (clip x0 to [-r, r]) or (lo, hi).
    dynamic_threshold: None or (ratio, max_value), e.g. (0.995, 1.0).
    """
    clip = _step_inputs(model_output, x_t, schedule, uncond_output, guidance_scale, noise,
                        prediction_type, clip_sample, dynamic_threshold)
    if variance_type not in VARIANCE_TYPES:
        raise ValueError(f"variance_type must be one of {VARIANCE_TYPES}, got {variance_type!r}")
    tt = _timesteps(t, x_t, schedule, "t", validate)
    pp = tt - 1 if prev_t is None else _timesteps(prev_t, x_t, schedule, "prev_t", validate, allow_negative=True)
    if validate and prev_t is not None and bool((pp >= tt).any()):
        raise ValueError("prev_t: must be smaller than t for every sample")
    thr = _threshold(model_output, uncond_output, guidance_scale, x_t, tt, schedule, prediction_type,
                     dynamic_threshold)
    if _use_kernel("ddpm_step", x_t, model_output, uncond_output, noise):
        from ..kernels import diffusion as K

        seed = None if noise is not None else _seed(x_t, generator, seed)
        return _launch(K.DDPM, x_t, model_output, uncond=uncond_output, guidance=guidance_scale or 0.0,
                       noise=noise, seed=seed, t=tt, prev=pp, schedule=schedule, threshold=thr,
                       pred=prediction_type, clip=clip, fixed_large=variance_type == "fixed_large")
    z = noise.float() if noise is not None else _draw_noise(x_t, generator, seed)
    m = guided(model_output, uncond_output, guidance_scale)
    x_prev, x0 = reference_ddpm(m, x_t.float(), tt, pp, schedule, z, prediction_type, clip, thr,
                                variance_type)
    return x_prev.to(x_t.dtype), x0.to(x_t.dtype)


def ddim_step(model_output: torch.Tensor, t: Timesteps, prev_t: Timesteps, x_t: torch.Tensor,
              schedule, *, eta: float = 0.0, noise: Optional[torch.Tensor] = None,
              generator: Optional[torch.Generator] = None, prediction_type: str = "epsilon",
              clip_sample: Union[None, float, Sequence[float]] = None,
              set_alpha_to_one: bool = True, use_clipped_model_output: bool = False,
              uncond_output: Optional[torch.Tensor] = None, guidance_scale: Optional[float] = None,
              dynamic_threshold: Optional[Tuple[float, float]] = None,
              seed: Union[None, int, torch.Tensor] = None,
              validate: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step from t to prev_t (prev_t < 0: the final step, a_p = 1 when
    set_alpha_to_one else alphas_cumprod[0]). Returns (x_prev, x0_pred). Noise is drawn
    only when eta > 0.

    Noise: `noise` explicit, else drawn from `seed` (an int, or an int64 device tensor
    that a captured CUDA graph re-reads at each replay) or from `generator`."""
    clip = _step_inputs(model_output, x_t, schedule, uncond_output, guidance_scale, noise,
                        prediction_type, clip_sample, dynamic_threshold)
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    tt = _timesteps(t, x_t, schedule, "t", validate)
    pp = _timesteps(prev_t, x_t, schedule, "prev_t", validate, allow_negative=True)
    if validate and bool((pp >= tt).any()):
        raise ValueError("prev_t: must be smaller than t for every sample")
    thr = _threshold(model_output, uncond_output, guidance_scale, x_t, tt, schedule, prediction_type,
                     dynamic_threshold)
    stochastic = eta > 0
    if _use_kernel("ddim_step", x_t, model_output, uncond_output, noise):
        from ..kernels import diffusion as K

        seed = _seed(x_t, generator, seed) if stochastic and noise is None else None
        return _launch(K.DDIM, x_t, model_output, uncond=uncond_output, guidance=guidance_scale or 0.0,
                       noise=noise if stochastic else None, seed=seed, t=tt, prev=pp,
                       schedule=schedule, threshold=thr, pred=prediction_type, clip=clip, eta=eta,
                       alpha_one=set_alpha_to_one, clipped_eps=use_clipped_model_output)
    z = 0.0
    if stochastic:
        z = noise.float() if noise is not None else _draw_noise(x_t, generator, seed)
    m = guided(model_output, uncond_output, guidance_scale)
    x_prev, x0 = reference_ddim(m, x_t.float(), tt, pp, schedule, z, prediction_type, clip, thr,
                                eta, set_alpha_to_one, use_clipped_model_output)
    return x_prev.to(x_t.dtype), x0.to(x_t.dtype)


def _noise_norm_mean(x, noise, seed) -> torch.Tensor:
    """Mean over the batch of the per-sample L2 norm of the step's noise (float32 scalar):
    of `noise` when given, else of the Philox stream `seed` draws (regenerated, not stored)."""
    if noise is not None:
        return noise.float().reshape(x.shape[0], -1).norm(dim=1).mean()
    from ..kernels import diffusion as K

    sumsq = torch.zeros(x.shape[0], device=x.device, dtype=torch.float32)
    _launch(K.NOISE_SUMSQ, x, out2=False, seed=seed, sumsq=sumsq)
    return sumsq.sqrt().mean()


def langevin_step(score: torch.Tensor, x: torch.Tensor, t: Timesteps, schedule, *,
                  snr: float = 0.16, noise: Optional[torch.Tensor] = None,
                  generator: Optional[torch.Generator] = None, variance_preserving: bool = True,
                  validate: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """One Langevin corrector step (score_sde), returns (x, x_mean).

    step = 2 alpha (snr * mean_b ||z_b|| / mean_b ||score_b||)^2 with alpha = alphas[t]
    per sample (variance_preserving) or 1 (VE).
    """
    _check_x(x, "x")
    _check_like(score, x, "score")
    _check_like(noise, x, "noise")
    _check_schedule(schedule, x)
    if snr <= 0:
        raise ValueError(f"snr must be > 0, got {snr}")
    tt = _timesteps(t, x, schedule, "t", validate)
    alpha = schedule.alphas[tt] if variance_preserving else torch.ones(x.shape[0], device=x.device)
    kernel = _use_kernel("langevin_step", x, score, noise)
    seed = _seed(x, generator) if kernel and noise is None else None
    z = None
    if not kernel:
        z = noise.float() if noise is not None else _draw_noise(x, generator)
    noise_norm = _noise_norm_mean(x, z if z is not None else noise, seed)
    grad_norm = score.float().reshape(x.shape[0], -1).norm(dim=1).mean()
    step = (snr * noise_norm / grad_norm) ** 2 * 2 * alpha
    if kernel:
        from ..kernels import diffusion as K

        return _launch(K.LANGEVIN, x, score, noise=noise, seed=seed, t=tt, schedule=schedule,
                       step=step.float().contiguous())
    x_mean = x.float() + _per_sample(step, x) * score.float()
    return (x_mean + _per_sample((2 * step).sqrt(), x) * z).to(x.dtype), x_mean.to(x.dtype)


def vp_predictor_step(score: torch.Tensor, x: torch.Tensor, t: Timesteps, schedule, *,
                      noise: Optional[torch.Tensor] = None,
                      generator: Optional[torch.Generator] = None,
                      validate: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reverse-diffusion predictor for the VP SDE (score_sde), returns (x, x_mean):
    x_mean = x - (f - G^2 s) with f = sqrt(1 - beta_t) x - x, G = sqrt(beta_t); x = x_mean + G z."""
    _check_x(x, "x")
    _check_like(score, x, "score")
    _check_like(noise, x, "noise")
    _check_schedule(schedule, x)
    tt = _timesteps(t, x, schedule, "t", validate)
    if _use_kernel("vp_predictor_step", x, score, noise):
        from ..kernels import diffusion as K

        seed = None if noise is not None else _seed(x, generator)
        return _launch(K.VP_PREDICTOR, x, score, noise=noise, seed=seed, t=tt, schedule=schedule)
    beta = _per_sample(schedule.betas[tt], x)
    xf = x.float()
    f = (1 - beta).sqrt() * xf - xf
    x_mean = xf - (f - beta * score.float())
    z = noise.float() if noise is not None else _draw_noise(x, generator)
    return (x_mean + beta.sqrt() * z).to(x.dtype), x_mean.to(x.dtype)


def pc_step(score_fn, x: torch.Tensor, t: Timesteps, schedule, *, snr: float = 0.16,
            n_corrector_steps: int = 1, generator: Optional[torch.Generator] = None,
            validate: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """One predictor-corrector step (score_sde's PC sampler, VP): n Langevin corrector
    steps, then the reverse-diffusion predictor; score_fn(x, t [B]) -> score."""
    tt = _timesteps(t, x, schedule, "t", validate)
    for _ in range(n_corrector_steps):
        x, _ = langevin_step(score_fn(x, tt), x, tt, schedule, snr=snr, generator=generator,
                             validate=False)
    return vp_predictor_step(score_fn(x, tt), x, tt, schedule, generator=generator, validate=False)
