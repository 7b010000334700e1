"""The sampling loop: leading timestep spacing, fused steps, no host sync per step, and on
CUDA the whole loop (denoiser calls + fused steps) captured once as a CUDA graph."""
from __future__ import annotations

import collections
import warnings
import weakref
from typing import Callable, Optional, Sequence

import torch

from ..ops.diffusion import PREDICTION_TYPES, ddim_step, ddpm_step
from .schedule import NoiseSchedule

METHODS = ("ddim", "ddpm")


def leading_timesteps(num_timesteps: int, steps: int) -> torch.Tensor:
    """The "leading" spacing: (arange(steps) * (T // steps)) in descending order."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in 1..{num_timesteps}, got {steps}")
    ratio = num_timesteps // steps
    return (torch.arange(steps, dtype=torch.int64) * ratio).flip(0)


def _checked_timesteps(timesteps, num_timesteps: int) -> list:
    visit = [int(t) for t in timesteps]
    if not visit or any(not 0 <= t < num_timesteps for t in visit) \
            or any(a <= b for a, b in zip(visit, visit[1:])):
        raise ValueError(f"timesteps: expected strictly descending ints in [0, {num_timesteps - 1}], "
                         f"got {visit[:8]}{'...' if len(visit) > 8 else ''}")
    return visit


class Sampler:
    """A reusable sampling loop. On CUDA with cuda_graph "auto" / True, the first call
    captures the whole loop as one CUDA graph (after a warm-up run) and every call replays
    it with fresh initial noise and seeds; keep the Sampler to reuse the graph.

    denoiser(x [B, ...], t [B] int64, cond) -> model output like x. With guidance_scale,
    it is called again with `uncond` for the unconditional output.

    timesteps: the descending timesteps to visit, e.g. a model's own spacing (each step
    goes to the next one, the last to the final x0); default: `steps` with "leading"
    spacing.
    """

    def __init__(self, denoiser: Callable, shape: Sequence[int], schedule: NoiseSchedule, *,
                 method: str = "ddim", steps: int = 50, eta: float = 0.0,
                 guidance_scale: Optional[float] = None, cond=None, uncond=None,
                 prediction_type: str = "epsilon", clip_sample=None,
                 dtype: torch.dtype = torch.float32, cuda_graph="auto",
                 weak_denoiser: bool = False, timesteps: Optional[Sequence[int]] = None):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        if cuda_graph not in ("auto", True, False):
            raise ValueError(f"cuda_graph must be 'auto', True or False, got {cuda_graph!r}")
        if len(shape) < 1 or any(int(s) < 1 for s in shape):
            raise ValueError(f"shape: expected positive sizes [B, ...], got {list(shape)}")
        # weak_denoiser: sample()'s cache keys on the denoiser weakly, so its Samplers must
        # not keep it alive either
        self._denoiser = weakref.ref(denoiser) if weak_denoiser else (lambda: denoiser)
        self.shape, self.schedule = tuple(int(s) for s in shape), schedule
        self.method, self.steps, self.eta = method, steps, eta
        self.guidance_scale, self.cond, self.uncond = guidance_scale, cond, uncond
        self.prediction_type, self.clip_sample, self.dtype = prediction_type, clip_sample, dtype
        self.device = schedule.device
        if timesteps is None:
            self.timesteps = leading_timesteps(schedule.num_timesteps, steps).to(self.device)
            self.prev_timesteps = self.timesteps - schedule.num_timesteps // steps
        else:
            visit = _checked_timesteps(timesteps, schedule.num_timesteps)
            self.steps = len(visit)
            self.timesteps = torch.tensor(visit, dtype=torch.int64, device=self.device)
            self.prev_timesteps = torch.tensor(visit[1:] + [-1], dtype=torch.int64,
                                               device=self.device)
        self.use_graph = cuda_graph is not False and self.device.type == "cuda"
        self.graph_required = cuda_graph is True
        if cuda_graph is True and self.device.type != "cuda":
            raise ValueError("cuda_graph=True needs a schedule on a CUDA device")
        self._graph = None

    @property
    def denoiser(self) -> Callable:
        return self._denoiser()

    # --------------------------------------------------------------------- the loop
    def step(self, x: torch.Tensor, i: int, seeds: torch.Tensor) -> torch.Tensor:
        """Step i of the loop (denoiser call(s) + one fused step) on x; seeds [steps]
        int64 holds every step's noise seed. Compiles with torch.compile(fullgraph=True)."""
        B = x.shape[0]
        t = self.timesteps[i].expand(B)  # device views: no host sync
        prev = self.prev_timesteps[i].expand(B)
        out = self.denoiser(x, t, self.cond)
        uncond_out = None
        if self.guidance_scale is not None:
            uncond_out = self.denoiser(x, t, self.uncond)
        common = dict(prediction_type=self.prediction_type, clip_sample=self.clip_sample,
                      uncond_output=uncond_out, guidance_scale=self.guidance_scale,
                      seed=seeds[i], validate=False)
        # return_x0=False: the loop keeps only x_prev, so the step writes nothing else
        if self.method == "ddim":
            return ddim_step(out, t, prev, x, self.schedule, eta=self.eta, return_x0=False, **common)
        return ddpm_step(out, t, x, self.schedule, prev_t=prev, return_x0=False, **common)

    def _loop(self, x: torch.Tensor, seeds: torch.Tensor, progress: bool = False) -> torch.Tensor:
        steps = range(self.steps)
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc=f"{self.method} sampling", unit="step")
        for i in steps:
            x = self.step(x, i, seeds)
        return x

    # ------------------------------------------------------------------- the graph
    def _capture(self, x: torch.Tensor, seeds: torch.Tensor) -> None:
        self._static_x, self._static_seeds = x.clone(), seeds.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: kernels compiled, allocator primed
            self._loop(self._static_x.clone(), self._static_seeds)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._static_out = self._loop(self._static_x, self._static_seeds)
        self._graph = graph

    def __call__(self, x_T: Optional[torch.Tensor] = None,
                 generator: Optional[torch.Generator] = None, progress: bool = False) -> torch.Tensor:
        """Draw samples: from x_T if given, else from noise drawn with `generator`."""
        if x_T is None:
            x_T = torch.randn(self.shape, generator=generator, device=self.device, dtype=torch.float32)
        elif tuple(x_T.shape) != self.shape:
            raise ValueError(f"x_T: expected shape {list(self.shape)}, got {list(x_T.shape)}")
        x = x_T.to(device=self.device, dtype=self.dtype)
        # every step's seed drawn up front: one copy to the device, none per step
        seeds = torch.randint(0, 2**31 - 1, (self.steps,), generator=generator,
                              device=generator.device if generator is not None else "cpu")
        seeds = seeds.to(self.device)
        if self.use_graph:
            try:
                if self._graph is None:
                    self._capture(x, seeds)
                self._static_x.copy_(x)
                self._static_seeds.copy_(seeds)
                self._graph.replay()
                return self._static_out.clone()
            except Exception as exc:  # a denoiser that cannot be captured still samples
                if self.graph_required:
                    raise
                warnings.warn(f"CUDA-graph capture failed ({type(exc).__name__}: {exc}); "
                              "sampling eagerly", RuntimeWarning)
                self.use_graph, self._graph = False, None
        return self._loop(x, seeds, progress)


# Samplers (and their captured graphs) per denoiser, so repeated sample() calls replay one
# graph. Weak keys: a denoiser that is gone takes its graphs with it. Each denoiser keeps
# its few most recent configurations (a graph holds its own memory pool).
_SAMPLERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_PER_DENOISER = 4


def _cached_sampler(denoiser, shape, schedule, key, options) -> "Sampler":
    try:
        cache = _SAMPLERS.setdefault(denoiser, collections.OrderedDict())
    except TypeError:  # not weak-referenceable: no caching
        return Sampler(denoiser, shape, schedule, **options)
    if key not in cache:
        cache[key] = Sampler(denoiser, shape, schedule, weak_denoiser=True, **options)
        while len(cache) > _PER_DENOISER:
            cache.popitem(last=False)
    cache.move_to_end(key)
    return cache[key]


def sample(denoiser: Callable, shape: Sequence[int], schedule: NoiseSchedule, *,
           method: str = "ddim", steps: int = 50, eta: float = 0.0,
           guidance_scale: Optional[float] = None, cond=None, uncond=None,
           generator: Optional[torch.Generator] = None, cuda_graph="auto",
           progress: bool = False, prediction_type: str = "epsilon", clip_sample=None,
           x_T: Optional[torch.Tensor] = None, dtype: torch.dtype = torch.float32,
           timesteps: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Sample with a fused DDIM / DDPM loop (see Sampler). On CUDA the loop is captured
    as a CUDA graph on the first call with a configuration and replayed by later calls
    with the same denoiser, shape, schedule, options and cond / uncond objects."""
    options = dict(method=method, steps=steps, eta=eta, guidance_scale=guidance_scale,
                   cond=cond, uncond=uncond, prediction_type=prediction_type,
                   clip_sample=clip_sample, dtype=dtype, cuda_graph=cuda_graph,
                   timesteps=timesteps)
    key = (tuple(shape), id(schedule), method, steps, eta, guidance_scale, id(cond), id(uncond),
           prediction_type, clip_sample if not isinstance(clip_sample, list) else tuple(clip_sample),
           dtype, cuda_graph, None if timesteps is None else tuple(int(t) for t in timesteps))
    sampler = _cached_sampler(denoiser, shape, schedule, key, options)
    return sampler(x_T, generator=generator, progress=progress)
