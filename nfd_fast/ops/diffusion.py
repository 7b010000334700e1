"""Fused diffusion steps: q_sample, DDPM, DDIM, Langevin corrector, VP predictor, with
per-sample timesteps, classifier-free guidance and in-kernel noise.

The math follows the common scheduler library's conventions (a_t = alphas_cumprod[t],
b_t = 1 - a_t):
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
the sampling loop uses: its timesteps are built valid and must stay on the device; under
torch.compile the range check becomes an asynchronous device assertion.

Every step is the one torch.library op nfd_fast::diffusion_step (one kernel family, one
op; MODES names its modes), with a fake implementation and registered autograd:
gradients reach the model output, x, the unconditional output, given noise, the
dynamic-threshold scale and the Langevin step (so an encoder trained through q_sample
gets its gradient on every backend). The backward is the reference's vector-Jacobian
product (these steps are elementwise and memory-bound: a second fused kernel would save
little); in-kernel noise that it needs is regenerated from the seed, not stored.
Results are contiguous whatever x's layout.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

from .. import backend
from ._autograd import empty_f32, reference_vjp

# MODES, PREDICTION_TYPES: the index of a name is its code in kernels/diffusion.py
MODES = ("q_sample", "ddpm", "ddim", "langevin", "vp_predictor", "noise_sumsq", "noise_draw")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
VARIANCE_TYPES = ("fixed_small", "fixed_large")
Timesteps = Union[int, torch.Tensor]


# ---------------------------------------------------------------------- spec and validation


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
        if not -2**63 <= t < 2**63:
            raise ValueError(f"{name}: timestep {t} does not fit in int64")
        tt = torch.full((B,), t, dtype=torch.int64, device=x.device)
    if validate and B > 0:
        # prev_t may be any negative value: it marks the final step
        bad = (tt >= T) if allow_negative else ((tt < 0) | (tt >= T))
        allowed = f"< {T}" if allow_negative else f"in [0, {T - 1}]"
        if torch.compiler.is_compiling():  # no host sync inside a compiled graph
            torch._assert_async(~bad.any(), f"{name}: timesteps must be {allowed}")
        elif bool(bad.any()):
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
    if guidance_scale is not None and (isinstance(guidance_scale, bool)
                                       or not isinstance(guidance_scale, (int, float))):
        raise TypeError(f"guidance_scale: expected a number (one scale for the batch), got "
                        f"{type(guidance_scale).__name__}; for per-sample scales, combine the "
                        "outputs yourself and pass model_output alone")
    _check_like(uncond_output, model_output, "uncond_output")


# ------------------------------------------------------------------------------ reference


def lookup(table: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """table[t], NaN where t is outside the table (reachable with validate=False): an
    out-of-range timestep gives NaN, never another timestep's value."""
    inside = (t >= 0) & (t < table.shape[0])
    return torch.where(inside, table[t.clamp(0, table.shape[0] - 1)], float("nan"))


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
    return torch.where(prev >= 0, lookup(ac, prev.clamp(min=0)), torch.full_like(ac[:1], final)[0])


def reference_ddpm(m, x, t, prev, schedule, z, pred, clip, threshold, variance_type):
    ac = schedule.alphas_cumprod
    a_t = _per_sample(lookup(ac, t), x)
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
    a_t = _per_sample(lookup(ac, t), x)
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


def reference_step(mode: str, x, model, uncond, z, t, prev, alphas_cumprod, betas, threshold,
                   step, guidance, eta, clip, prediction_type, fixed_large, alpha_one,
                   clipped_eps):
    """(out, out2) of one step mode in float32: the specification of the kernel.
    z: the noise (a tensor, or 0.0 for none); schedule tensors passed in."""
    xf = x.float()
    if mode == "noise_sumsq":
        return (z * z).reshape(x.shape[0], -1).sum(1), None
    if mode == "noise_draw":
        return z + 0 * xf, None
    m = guided(model, uncond, guidance)
    if mode == "q_sample":  # x is x0, m the noise
        a = _per_sample(lookup(alphas_cumprod, t), x)
        return a.sqrt() * xf + (1 - a).sqrt() * m, a.sqrt() * m - (1 - a).sqrt() * xf
    if mode == "langevin":
        x_mean = xf + _per_sample(step, x) * m
        return x_mean + _per_sample((2 * step).sqrt(), x) * z, x_mean
    if mode == "vp_predictor":
        beta = _per_sample(lookup(betas, t), x)
        # (2 - sqrt(1 - beta)) x in one product: x - (sqrt(1 - beta) x - x) is Inf - Inf
        # (NaN) for an infinite x whose step is infinite
        x_mean = (2 - (1 - beta).sqrt()) * xf + beta * m
        return x_mean + beta.sqrt() * z, x_mean
    schedule = _Schedule(alphas_cumprod)
    if mode == "ddpm":
        return reference_ddpm(m, xf, t, prev, schedule, z, prediction_type, clip, threshold,
                              "fixed_large" if fixed_large else "fixed_small")
    return reference_ddim(m, xf, t, prev, schedule, z, prediction_type, clip, threshold, eta,
                          alpha_one, clipped_eps)


class _Schedule:
    """The part of a schedule the reference steps read."""

    def __init__(self, alphas_cumprod):
        self.alphas_cumprod = alphas_cumprod


def _draw_noise(x, generator, seed=None):
    """The reference's noise: torch.randn (from `generator`, or one seeded with `seed`)."""
    if seed is not None:  # the reference cannot replay Philox: seed a torch generator instead
        generator = torch.Generator(x.device).manual_seed(int(seed))
    if generator is None:  # randn_like also traces under torch.compile with dynamic shapes
        return torch.randn_like(x, dtype=torch.float32)
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)


# ------------------------------------------------------------------------------- launch
# Triton is imported lazily: nfd_fast must import (and serve the reference) without it.

BLOCK, NUM_WARPS = 1024, 4


def kernel_step(mode: str, x, model, uncond, noise, seed, t, prev, alphas_cumprod, betas,
                threshold, step, guidance, eta, clip, prediction_type, fixed_large,
                alpha_one, clipped_eps, want_second: bool):
    """(out, out2 or None): one pass over memory; absent inputs are None pointers."""
    from triton import cdiv

    from ..kernels import diffusion as K

    B = x.shape[0]
    S = x.numel() // max(B, 1)
    per_sample = mode == "noise_sumsq"
    out = torch.zeros(B, device=x.device, dtype=torch.float32) if per_sample else \
        torch.empty(x.shape, device=x.device, dtype=torch.float32 if mode == "noise_draw" else x.dtype)
    out2 = torch.empty(x.shape, device=x.device, dtype=x.dtype) if want_second else None
    if x.numel() == 0:
        return out, out2
    c = lambda v: v.contiguous() if v is not None else None  # noqa: E731
    tiles = cdiv(S, BLOCK)
    K.diffusion_step_kernel[(B * tiles,)](
        None if per_sample else out, out2, c(x), c(model), c(uncond), c(noise), c(seed), c(t),
        c(prev), alphas_cumprod, betas, c(threshold), c(step), out if per_sample else None,
        S, tiles, alphas_cumprod.shape[0], float(guidance), float(eta),
        float(clip[0]) if clip else 0.0,
        float(clip[1]) if clip else 0.0,
        MODE=MODES.index(mode), PRED=PREDICTION_TYPES.index(prediction_type),
        CLIP=clip is not None, FIXED_LARGE=fixed_large, ALPHA_ONE=alpha_one,
        CLIPPED_EPS=clipped_eps, BLOCK=BLOCK, num_warps=NUM_WARPS,
    )
    return out, out2


# ------------------------------------------------------------------------- registration
# nfd_fast::diffusion_step takes every mode's inputs; a mode ignores what it does not
# read. has_clip separates "no clip" from a clip range.


def _use_kernel(x, setting: str, *tensors) -> bool:
    return backend.resolve("diffusion_step", x, *tensors, setting=setting) == "triton"


@torch.library.custom_op("nfd_fast::diffusion_step", mutates_args=())
def _diffusion_step_op(mode: str, x: torch.Tensor, model: Optional[torch.Tensor],
                       uncond: Optional[torch.Tensor], noise: Optional[torch.Tensor],
                       seed: Optional[torch.Tensor], t: torch.Tensor,
                       prev: Optional[torch.Tensor], alphas_cumprod: torch.Tensor,
                       betas: torch.Tensor, threshold: Optional[torch.Tensor],
                       step: Optional[torch.Tensor], guidance: float, eta: float,
                       has_clip: bool, clip_lo: float, clip_hi: float, prediction_type: str,
                       fixed_large: bool, alpha_one: bool, clipped_eps: bool,
                       want_second: bool, backend_setting: str
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out, out2): out2 is empty unless want_second (see kernels/diffusion.py)."""
    clip = (clip_lo, clip_hi) if has_clip else None
    if _use_kernel(x, backend_setting, model, uncond, noise):
        out, out2 = kernel_step(mode, x, model, uncond, noise, seed, t, prev, alphas_cumprod,
                                betas, threshold, step, guidance, eta, clip, prediction_type,
                                fixed_large, alpha_one, clipped_eps, want_second)
        return out, out2 if out2 is not None else empty_f32(x)
    z = noise.float() if noise is not None else 0.0
    out, out2 = reference_step(mode, x, model, uncond, z, t, prev, alphas_cumprod, betas,
                               threshold, step, guidance, eta, clip, prediction_type,
                               fixed_large, alpha_one, clipped_eps)
    # copies: a reference result can be an input itself (x0 = model output under
    # "sample"), and an op's outputs must not alias its inputs
    dtype = torch.float32 if mode in ("noise_sumsq", "noise_draw") else x.dtype
    out = out.to(dtype, memory_format=torch.contiguous_format, copy=True)
    if not want_second:
        return out, empty_f32(x)
    return out, out2.to(x.dtype, memory_format=torch.contiguous_format, copy=True)


@_diffusion_step_op.register_fake
def _diffusion_step_fake(mode, x, model, uncond, noise, seed, t, prev, alphas_cumprod, betas,
                         threshold, step, guidance, eta, has_clip, clip_lo, clip_hi,
                         prediction_type, fixed_large, alpha_one, clipped_eps, want_second,
                         backend_setting):
    if mode == "noise_sumsq":
        out = x.new_empty(x.shape[0], dtype=torch.float32)
    else:
        out = x.new_empty(x.shape, dtype=torch.float32 if mode == "noise_draw" else x.dtype)
    return out, x.new_empty(x.shape) if want_second else empty_f32(x)


# inputs whose gradient the backward gives, by position among the op's arguments
_DIFFERENTIABLE = {"x": 1, "model": 2, "uncond": 3, "noise": 4, "alphas_cumprod": 8,
                   "betas": 9, "threshold": 10, "step": 11}


def _setup_context(ctx, inputs, output):
    ctx.inputs = list(inputs)
    ctx.save_for_backward(*[inputs[i] for i in _DIFFERENTIABLE.values()])


def _backward(ctx, grad_out, grad_out2):
    args = ctx.inputs
    saved = ctx.saved_tensors
    for i, t in zip(_DIFFERENTIABLE.values(), saved):
        args[i] = t
    (mode, x, model, uncond, noise, seed, t, prev, ac, betas, threshold, step, guidance, eta,
     has_clip, clip_lo, clip_hi, pred, fixed_large, alpha_one, clipped_eps, want_second,
     setting) = args
    z = noise
    if z is None and seed is not None:  # regenerate the in-kernel noise
        z, _ = torch.ops.nfd_fast.diffusion_step(
            "noise_draw", x.detach(), None, None, None, seed, t, None, ac.detach(),
            betas.detach(), None, None, 0.0, 0.0, False, 0.0, 0.0, "epsilon", False, True,
            False, False, setting)
    clip = (clip_lo, clip_hi) if has_clip else None
    names = list(_DIFFERENTIABLE)
    tensors = [args[i] for i in _DIFFERENTIABLE.values()]
    needs = [t_ is not None and ctx.needs_input_grad[i]
             for t_, i in zip(tensors, _DIFFERENTIABLE.values())]
    present = [i for i, t_ in enumerate(tensors) if t_ is not None]

    def forward(*flat):
        full = dict(zip(names, tensors))
        full.update({names[i]: v for i, v in zip(present, flat)})
        noise_ = full["noise"].float() if full["noise"] is not None else \
            (z.float() if z is not None else 0.0)
        out, out2 = reference_step(mode, full["x"], full["model"], full["uncond"], noise_, t,
                                   prev, full["alphas_cumprod"], full["betas"],
                                   full["threshold"], full["step"], guidance, eta, clip, pred,
                                   fixed_large, alpha_one, clipped_eps)
        return out, (out2 if out2 is not None else out * 0)

    grad2 = grad_out2 if want_second and grad_out2 is not None and grad_out2.numel() else None
    grad_outputs = (grad_out.float(), grad2.float() if grad2 is not None else
                    torch.zeros_like(grad_out, dtype=torch.float32))
    grads = reference_vjp(forward, [tensors[i] for i in present], [needs[i] for i in present],
                          grad_outputs, create_graph=torch.is_grad_enabled())
    result = [None] * len(args)
    for i, g in zip(present, grads):
        pos = _DIFFERENTIABLE[names[i]]
        result[pos] = None if g is None else g.to(args[pos].dtype)
    return tuple(result)


_diffusion_step_op.register_autograd(_backward, setup_context=_setup_context)


def _step_op(mode: str, x, *, model=None, uncond=None, noise=None, seed=None, t=None,
             prev=None, schedule=None, threshold=None, step=None, guidance=None, eta=0.0,
             clip=None, prediction_type="epsilon", fixed_large=False, alpha_one=True,
             clipped_eps=False, want_second=True):
    """The public steps' one call into the registered op (or, with the "torch" setting,
    the reference as plain PyTorch ops)."""
    if backend.get_backend() == "torch":
        backend.record("diffusion_step", "torch", "backend setting 'torch' (inlined reference)")
        out, out2 = reference_step(
            mode, x, model, uncond, noise.float() if noise is not None else 0.0, t, prev,
            schedule.alphas_cumprod, schedule.betas, threshold, step, guidance, eta, clip,
            prediction_type, fixed_large, alpha_one, clipped_eps)
        dtype = torch.float32 if mode in ("noise_sumsq", "noise_draw") else x.dtype
        return out.to(dtype), (out2.to(x.dtype) if want_second else None)
    out, out2 = torch.ops.nfd_fast.diffusion_step(
        mode, x, model, uncond, noise, seed, t, prev, schedule.alphas_cumprod, schedule.betas,
        threshold, step, float(guidance or 0.0), float(eta), clip is not None,
        float(clip[0]) if clip else 0.0, float(clip[1]) if clip else 0.0, prediction_type,
        fixed_large, alpha_one, clipped_eps, want_second, backend.get_backend())
    return out, (out2 if want_second else None)


def _kernel_noise(x, *tensors) -> bool:
    """Whether this call's noise is drawn in-kernel (Triton backend) or by torch.randn."""
    return backend.resolve("diffusion_step", x, *tensors) == "triton"


def _seed(x: torch.Tensor, generator, seed=None) -> torch.Tensor:
    """The Philox seed as a device tensor [1]: `seed` if given (an int or a tensor, which
    a captured CUDA graph reads at replay), else a fresh draw from `generator`."""
    if seed is not None:
        if isinstance(seed, torch.Tensor):
            return seed.reshape(1).to(device=x.device, dtype=torch.int64)
        return torch.tensor([int(seed)], dtype=torch.int64, device=x.device)
    dev = generator.device if generator is not None else x.device
    seed = torch.randint(0, 2**31 - 1, (1,), generator=generator, device=dev, dtype=torch.int64)
    return seed.to(x.device)


def _noise_inputs(x, noise, generator, seed, needed: bool, *tensors):
    """(noise, seed) for the op: the given noise; else on the Triton backend a Philox seed
    (no noise tensor exists), on the reference backend a torch.randn draw."""
    if not needed or noise is not None:
        return noise, None
    if _kernel_noise(x, *tensors):
        return None, _seed(x, generator, seed)
    return _draw_noise(x, generator, seed), None


# ---------------------------------------------------------------------------- public ops


def q_sample(x0: torch.Tensor, t: Timesteps, noise: torch.Tensor, schedule, *,
             return_velocity: bool = False, validate: bool = True):
    """Forward diffusion x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise, per-sample t.

    Returns x_t, or (x_t, v) with the velocity target v = sqrt(a_t) noise - sqrt(1 - a_t) x0.
    Differentiable in x0 and noise.
    """
    _check_x(x0, "x0")
    if noise is None:
        raise ValueError("noise: q_sample needs the noise tensor (it is the training target)")
    _check_like(noise, x0, "noise")
    _check_schedule(schedule, x0)
    tt = _timesteps(t, x0, schedule, "t", validate)
    x_t, v = _step_op("q_sample", x0, model=noise, t=tt, schedule=schedule,
                      want_second=return_velocity)
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
        if isinstance(dynamic_threshold, (str, bytes)) or not hasattr(dynamic_threshold, "__len__") \
                or len(dynamic_threshold) != 2 \
                or not all(isinstance(v, (int, float)) for v in dynamic_threshold):
            raise ValueError(f"dynamic_threshold: expected (ratio, max_value), got {dynamic_threshold!r}")
        ratio, max_value = dynamic_threshold
        if not (0.0 < ratio <= 1.0 and max_value >= 1.0):
            raise ValueError(f"dynamic_threshold: expected (ratio in (0, 1], max_value >= 1), got {dynamic_threshold}")
    return clip


def _threshold(model_output, uncond_output, guidance_scale, x_t, tt, schedule, pred, dynamic_threshold):
    """The per-sample dynamic-threshold scale [B] (one extra pass: it needs a quantile)."""
    if dynamic_threshold is None:
        return None
    a_t = _per_sample(lookup(schedule.alphas_cumprod, tt), x_t)
    x0, _ = predict_x0_eps(guided(model_output, uncond_output, guidance_scale), x_t.float(), a_t, pred)
    return dynamic_threshold_scale(x0, *dynamic_threshold)


def ddpm_step(model_output: torch.Tensor, t: Timesteps, x_t: torch.Tensor, schedule, *,
              prev_t: Optional[Timesteps] = None, noise: Optional[torch.Tensor] = None,
              generator: Optional[torch.Generator] = None, prediction_type: str = "epsilon",
              clip_sample: Union[None, float, Sequence[float]] = None,
              variance_type: str = "fixed_small", uncond_output: Optional[torch.Tensor] = None,
              guidance_scale: Optional[float] = None,
              dynamic_threshold: Optional[Tuple[float, float]] = None,
              seed: Union[None, int, torch.Tensor] = None, validate: bool = True,
              return_x0: bool = True):
    """One DDPM step from t to prev_t (default t - 1; prev_t < 0 is the final step).

    Returns (x_prev, x0_pred), or x_prev alone with return_x0=False (then x0 is not
    written). clip_sample: None, r (clip x0 to [-r, r]) or (lo, hi).
    dynamic_threshold: None or (ratio, max_value), e.g. (0.995, 1.0).
    """
    clip = _step_inputs(model_output, x_t, schedule, uncond_output, guidance_scale, noise,
                        prediction_type, clip_sample, dynamic_threshold)
    if variance_type not in VARIANCE_TYPES:
        raise ValueError(f"variance_type must be one of {VARIANCE_TYPES}, got {variance_type!r}")
    tt = _timesteps(t, x_t, schedule, "t", validate)
    pp = tt - 1 if prev_t is None else _timesteps(prev_t, x_t, schedule, "prev_t", validate, allow_negative=True)
    if validate and prev_t is not None and not torch.compiler.is_compiling() and bool((pp >= tt).any()):
        raise ValueError("prev_t: must be smaller than t for every sample")
    thr = _threshold(model_output, uncond_output, guidance_scale, x_t, tt, schedule, prediction_type,
                     dynamic_threshold)
    noise, seed_t = _noise_inputs(x_t, noise, generator, seed, True, model_output, uncond_output)
    x_prev, x0 = _step_op("ddpm", x_t, model=model_output, uncond=uncond_output, noise=noise,
                          seed=seed_t, t=tt, prev=pp, schedule=schedule, threshold=thr,
                          guidance=guidance_scale, clip=clip, prediction_type=prediction_type,
                          fixed_large=variance_type == "fixed_large", want_second=return_x0)
    return (x_prev, x0) if return_x0 else x_prev


def ddim_step(model_output: torch.Tensor, t: Timesteps, prev_t: Timesteps, x_t: torch.Tensor,
              schedule, *, eta: float = 0.0, noise: Optional[torch.Tensor] = None,
              generator: Optional[torch.Generator] = None, prediction_type: str = "epsilon",
              clip_sample: Union[None, float, Sequence[float]] = None,
              set_alpha_to_one: bool = True, use_clipped_model_output: bool = False,
              uncond_output: Optional[torch.Tensor] = None, guidance_scale: Optional[float] = None,
              dynamic_threshold: Optional[Tuple[float, float]] = None,
              seed: Union[None, int, torch.Tensor] = None, validate: bool = True,
              return_x0: bool = True):
    """One DDIM step from t to prev_t (prev_t < 0: the final step, a_p = 1 when
    set_alpha_to_one else alphas_cumprod[0]). Returns (x_prev, x0_pred), or x_prev alone
    with return_x0=False. Noise is drawn only when eta > 0.

    Noise: `noise` explicit, else drawn from `seed` (an int, or an int64 device tensor
    that a captured CUDA graph re-reads at each replay) or from `generator`."""
    clip = _step_inputs(model_output, x_t, schedule, uncond_output, guidance_scale, noise,
                        prediction_type, clip_sample, dynamic_threshold)
    if not eta >= 0:  # also refuses NaN
        raise ValueError(f"eta must be >= 0, got {eta}")
    tt = _timesteps(t, x_t, schedule, "t", validate)
    pp = _timesteps(prev_t, x_t, schedule, "prev_t", validate, allow_negative=True)
    if validate and not torch.compiler.is_compiling() and bool((pp >= tt).any()):
        raise ValueError("prev_t: must be smaller than t for every sample")
    thr = _threshold(model_output, uncond_output, guidance_scale, x_t, tt, schedule, prediction_type,
                     dynamic_threshold)
    stochastic = eta > 0
    noise, seed_t = _noise_inputs(x_t, noise if stochastic else None, generator, seed, stochastic,
                                  model_output, uncond_output)
    x_prev, x0 = _step_op("ddim", x_t, model=model_output, uncond=uncond_output, noise=noise,
                          seed=seed_t, t=tt, prev=pp, schedule=schedule, threshold=thr,
                          guidance=guidance_scale, eta=eta, clip=clip,
                          prediction_type=prediction_type, alpha_one=set_alpha_to_one,
                          clipped_eps=use_clipped_model_output, want_second=return_x0)
    return (x_prev, x0) if return_x0 else x_prev


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
    if not snr > 0:
        raise ValueError(f"snr must be > 0, got {snr}")
    tt = _timesteps(t, x, schedule, "t", validate)
    alpha = lookup(schedule.alphas, tt) if variance_preserving else torch.ones(x.shape[0], device=x.device)
    noise, seed_t = _noise_inputs(x, noise, generator, None, True, score)
    if noise is not None:
        noise_norm = noise.float().reshape(x.shape[0], -1).norm(dim=1).mean()
    else:  # the norm of the Philox stream the step will draw (regenerated, not stored)
        sumsq, _ = _step_op("noise_sumsq", x, seed=seed_t, t=tt, schedule=schedule,
                            want_second=False)
        noise_norm = sumsq.sqrt().mean()
    grad_norm = score.float().reshape(x.shape[0], -1).norm(dim=1).mean()
    step = ((snr * noise_norm / grad_norm) ** 2 * 2 * alpha).float()
    return _step_op("langevin", x, model=score, noise=noise, seed=seed_t, t=tt,
                    schedule=schedule, step=step)


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
    noise, seed_t = _noise_inputs(x, noise, generator, None, True, score)
    return _step_op("vp_predictor", x, model=score, noise=noise, seed=seed_t, t=tt,
                    schedule=schedule)


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
