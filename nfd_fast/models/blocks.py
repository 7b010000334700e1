"""Building blocks the approaches' models share.

Observations and coordinates
    grid_coordinates(sizes)         [prod(sizes), D] points of a grid in [-1, 1]; sizes in
                                    array order (..., H, W), columns x, y, ... (grid_sample
                                    order: x indexes the last array axis)
    observation_mask(n, P, ratio)   bool [n, P], round(ratio * P) observed per row; ratio a
                                    float or a (low, high) range drawn per row
    gather_observations(mask, ...)  the observed entries packed to [n, K, ...] with a mask
                                    [n, K] (K = the largest count): variable counts per sample
    knn_interpolate(q, p, f, mask)  inverse-square-distance mean of the k nearest observed
                                    features at each query, [B, M, C], and the nearest distance

Networks
    SetEncoder      (coord, value) observations [B, N, .] with mask [B, N] -> [B, out]:
                    phi = FusedMLP per observation, masked mean and max pooling (+ log count),
                    rho = MLP. Masked entries are zeroed before phi, so padding never changes
                    a result, and an empty set is the unconditional input of guidance.
    timestep_embedding(t, dim)      sinusoidal embedding of integer timesteps, [B, dim]
    LatentDenoiser  eps(z_t, t[, cond]) = FusedMLP(z_t + P(emb(t)) [+ Q(cond)])
    RunningStandardiser             per-dimension EMA mean / std of latents: diffusion runs on
                                    standardised latents (an encoder's latents are rarely unit scale)
    diffusion_loss  E ||eps - eps_theta(q_sample(z0, t, eps), t, cond)||^2 with condition dropout

Training, metrics, data, plots, checkpoints
    train_loop      Adam + cosine decay over `steps` batches, tqdm, per-step loss history
    mse, psnr, chamfer_distance, iou
    random_blobs / render_blobs     synthetic images (and moving patterns in (x, y, t)):
                                    background + Gaussian blobs + a plane wave, any resolution
    random_shapes / shape_sdf / shape_occupancy / render_shapes
                                    synthetic 2-D / 3-D shapes with sharp edges: unions of
                                    discs (balls) and boxes, as signed distance, occupancy
                                    or a piecewise-constant image, any resolution
    cell_centres(sizes)             like grid_coordinates at pixel centres (align_corners=False)
    scattered_linear_interpolation  the plain baseline for scattered 2-D observations
    plot_rows       a grid of images with titles, saved as PNG
    FieldModel      nn.Module base: save(path) / load(path) of {config, state_dict} (loaded
                    with weights_only=True), and a diffusion schedule that follows device moves
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import time
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..nn import FusedMLP
from ..diffusion import sample
from ..ops import q_sample

Ratio = Union[float, Tuple[float, float]]


# ------------------------------------------------------------------------ shape checks


def check_shape(t: torch.Tensor, name: str, shape: Sequence[Optional[int]], spec: str) -> None:
    """Raise ValueError naming `name` unless t has len(shape) dims matching shape (None: any).
    spec is the expected shape in words, e.g. "[B, N, 2]"."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor {spec}, got {type(t).__name__}")
    if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
        raise ValueError(f"{name}: expected {spec}, got {list(t.shape)}")


# ------------------------------------------------------------- observations and coordinates


def grid_coordinates(sizes: Sequence[int], device=None) -> torch.Tensor:
    """The points of a grid with `sizes` in array order (..., H, W), flattened in that order:
    [prod(sizes), D] with column 0 = x (the last axis), 1 = y, ..., each linspace(-1, 1)
    (pixel centres at the corners' convention, align_corners=True)."""
    axes = [torch.linspace(-1, 1, int(s), device=device) for s in sizes]
    mesh = torch.meshgrid(*axes, indexing="ij")
    return torch.stack([m.reshape(-1) for m in reversed(mesh)], dim=-1)


def observation_mask(n: int, length: int = 256, ratio: Ratio = 0.2, generator=None) -> torch.Tensor:
    """round(ratio * length) (at least 1) random observed positions per row, bool [n, length].
    ratio: a float in (0, 1], or a range (low, high) from which each row draws its own."""
    if isinstance(ratio, (tuple, list)):
        low, high = ratio
        if not 0 < low <= high <= 1:
            raise ValueError(f"ratio: need 0 < low <= high <= 1, got {tuple(ratio)}")
        per_row = low + (high - low) * torch.rand(n, 1, generator=generator)
        counts = (per_row * length).round().clamp(min=1)
        rank = torch.rand(n, length, generator=generator).argsort(dim=1).argsort(dim=1)
        return rank < counts
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    k = max(1, round(ratio * length))
    order = torch.rand(n, length, generator=generator).argsort(dim=1)
    mask = torch.zeros(n, length, dtype=torch.bool)
    mask.scatter_(1, order[:, :k], True)
    return mask


def gather_observations(mask: torch.Tensor, *tensors: torch.Tensor):
    """Pack the observed entries of each row: mask [n, P]; tensors [n, P, ...] or shared
    [P, ...]. Returns (*packed [n, K, ...], obs_mask [n, K]), K = the largest count, the
    observed entries first (in position order), padding entries zero and masked out."""
    check_shape(mask, "mask", (None, None), "[n, P]")
    n, P = mask.shape
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
    counts = mask.sum(1)
    K = max(int(counts.max().item()) if n else 0, 1)
    idx = order[:, :K]
    obs_mask = torch.arange(K, device=mask.device) < counts.unsqueeze(1)
    packed = []
    for i, t in enumerate(tensors):
        if t.shape[0] == P and (t.dim() < 2 or t.shape[:2] != (n, P)):
            t = t.expand(n, *t.shape)
        if t.shape[:2] != (n, P):
            raise ValueError(f"tensors[{i}]: expected [n, P, ...] = [{n}, {P}, ...] or [P, ...], "
                             f"got {list(t.shape)}")
        g = t.gather(1, idx.view(n, K, *([1] * (t.dim() - 2))).expand(n, K, *t.shape[2:]))
        packed.append(torch.where(obs_mask.view(n, K, *([1] * (t.dim() - 2))), g, torch.zeros_like(g)))
    return (*packed, obs_mask)


def knn_interpolate(query: torch.Tensor, points: torch.Tensor, features: torch.Tensor,
                    mask: Optional[torch.Tensor] = None, k: int = 4, eps: float = 1e-6):
    """Inverse-square-distance weighted mean of the features of the k nearest observed
    points: query [B, M, D], points [B, N, D], features [B, N, C], mask [B, N] (None: all).
    Returns (interpolated [B, M, C], distance to the nearest observed point [B, M]).
    Rows with fewer than k observed points use those they have."""
    check_shape(query, "query", (None, None, None), "[B, M, D]")
    B, M, D = query.shape
    check_shape(points, "points", (B, None, D), f"[{B}, N, {D}]")
    check_shape(features, "features", (B, points.shape[1], None), f"[{B}, {points.shape[1]}, C]")
    if mask is not None:
        check_shape(mask, "mask", (B, points.shape[1]), f"[{B}, {points.shape[1]}]")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(k, points.shape[1])
    d2 = torch.cdist(query, points).square()
    if mask is not None:
        d2 = d2.masked_fill(~mask.unsqueeze(1), float("inf"))
    d2, idx = d2.topk(k, dim=-1, largest=False)
    w = 1.0 / (d2 + eps)  # inf distance (unobserved) -> weight 0
    w = w / w.sum(-1, keepdim=True).clamp_min(1e-30)
    C = features.shape[-1]
    near = features.gather(1, idx.reshape(B, M * k, 1).expand(B, M * k, C)).view(B, M, k, C)
    return (w.unsqueeze(-1) * near).sum(2), d2[..., 0].sqrt()


# ---------------------------------------------------------------------------- networks


class SetEncoder(nn.Module):
    """A permutation-invariant encoder of variable-size sets of (coordinate, value) pairs.

    forward(coords [B, N, coord_dim], values [B, N, value_dim], mask [B, N] bool or None)
    -> [B, out_dim]. phi: a FusedMLP per observation (coord_dim + value_dim -> width ->
    features); pooling: masked mean and masked max of phi, and
    log(1 + count) (how sparse the set is); rho: Linear-SiLU-Linear to out_dim.
    """

    def __init__(self, coord_dim: int, value_dim: int, out_dim: int, width: int = 64,
                 features: int = 64, hidden_layers: int = 1):
        super().__init__()
        self.coord_dim, self.value_dim, self.out_dim = coord_dim, value_dim, out_dim
        self.phi = FusedMLP(coord_dim + value_dim, width, features, hidden_layers=hidden_layers,
                            activation="silu")
        self.rho = nn.Sequential(nn.Linear(2 * features + 1, width), nn.SiLU(), nn.Linear(width, out_dim))

    def _checked_mask(self, coords, values, mask) -> torch.Tensor:
        check_shape(coords, "coords", (None, None, self.coord_dim), f"[B, N, {self.coord_dim}]")
        B, N = coords.shape[:2]
        check_shape(values, "values", (B, N, self.value_dim), f"[{B}, {N}, {self.value_dim}]")
        if mask is None:
            return torch.ones(B, N, dtype=torch.bool, device=coords.device)
        check_shape(mask, "mask", (B, N), f"[{B}, {N}]")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask: expected a bool tensor, got {mask.dtype}")
        return mask

    def point_features(self, coords, values, mask=None) -> torch.Tensor:
        """phi of each observation, [B, N, features]; zero where mask is False."""
        mask = self._checked_mask(coords, values, mask)
        m = mask.unsqueeze(-1)
        x = torch.where(m, torch.cat([coords, values], dim=-1), 0.0)  # padding never reaches phi
        return torch.where(m, self.phi(x), 0.0)

    def forward(self, coords, values, mask=None) -> torch.Tensor:
        mask = self._checked_mask(coords, values, mask)
        h = self.point_features(coords, values, mask)
        m = mask.unsqueeze(-1)
        count = mask.sum(1, keepdim=True).to(h.dtype)
        mean = h.sum(1) / count.clamp_min(1)
        peak = torch.where(m, h, float("-inf")).amax(1)
        peak = torch.where(count > 0, peak, 0.0)  # the empty set pools to zeros
        return self.rho(torch.cat([mean, peak, torch.log1p(count)], dim=-1))


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """The sinusoidal embedding of integer timesteps [B] -> [B, dim] (cos half, sin half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t.float().unsqueeze(-1) * freqs
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return torch.nn.functional.pad(emb, (0, dim - 2 * half))


class LatentDenoiser(nn.Module):
    """eps(z_t, t[, cond]) = FusedMLP(z_t + P(emb(t)) [+ Q(cond)]) for latents [B, latent_dim]
    (latent_dim up to fused_mlp's widths, 512, for one fused kernel). The time and condition
    projections are added, not concatenated, so the fused MLP's input stays latent_dim
    wide. cond=None (or zeros) is the unconditional model of classifier-free guidance."""

    def __init__(self, latent_dim: int, width: int = 256, cond_dim: Optional[int] = None,
                 hidden_layers: int = 2):
        super().__init__()
        self.latent_dim = latent_dim
        self.time = nn.Sequential(nn.Linear(latent_dim, latent_dim), nn.SiLU(), nn.Linear(latent_dim, latent_dim))
        self.cond = nn.Linear(cond_dim, latent_dim) if cond_dim else None
        self.mlp = FusedMLP(latent_dim, width, latent_dim, hidden_layers=hidden_layers, activation="silu")

    def forward(self, z: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = z + self.time(timestep_embedding(t, self.latent_dim))
        if self.cond is not None and cond is not None:
            h = h + self.cond(cond)
        return self.mlp(h)


class RunningStandardiser(nn.Module):
    """Per-dimension mean and std of latents, tracked as an exponential moving average
    while training (as LDM's scale factor), so diffusion sees unit-scale latents."""

    def __init__(self, dim: int, momentum: float = 0.05):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    @torch.no_grad()
    def update(self, z: torch.Tensor) -> None:
        self.mean.lerp_(z.mean(0), self.momentum)
        if len(z) > 1:
            self.std.lerp_(z.std(0).clamp_min(1e-6), self.momentum)

    def standardise(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.mean) / self.std

    def unstandardise(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.std + self.mean


def diffusion_loss(denoiser: Callable, z0: torch.Tensor, schedule, *, cond=None,
                   cond_dropout: float = 0.0, generator=None) -> torch.Tensor:
    """The epsilon-prediction loss at uniform random timesteps; with a condition, each
    sample's condition is zeroed with probability cond_dropout (the unconditional model
    classifier-free guidance needs)."""
    B = z0.shape[0]
    t = torch.randint(0, schedule.num_timesteps, (B,), device=z0.device, generator=generator)
    noise = torch.randn(z0.shape, device=z0.device, generator=generator)
    z_t = q_sample(z0, t, noise, schedule, validate=False)
    if cond is not None and cond_dropout > 0:
        keep = torch.rand(B, *([1] * (cond.dim() - 1)), device=z0.device, generator=generator) >= cond_dropout
        cond = cond * keep
    return ((denoiser(z_t, t, cond) - noise) ** 2).mean()


# ---------------------------------------------------------------------------- training


def train_loop(parameters, loss_fn: Callable, batch_fn: Callable, steps: int, *, lr: float = 1e-3,
               weights: Optional[dict] = None, cosine: bool = True, grad_clip: Optional[float] = None,
               progress: bool = True, desc: str = "train") -> dict:
    """Adam over `steps` batches: batch_fn(step) -> batch, loss_fn(batch) -> a loss tensor or
    a dict of named losses (summed, each times weights.get(name, 1)). Cosine learning-rate
    decay to 0 unless cosine=False. Returns {name: [per-step values], 'loss': [...],
    'seconds': wall time}."""
    params = [p for p in parameters if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1)) if cosine else None
    weights = weights or {}
    history = {"loss": []}
    bar = range(steps)
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(bar, desc=desc, unit="step")
    start = time.perf_counter()
    for step in bar:
        losses = loss_fn(batch_fn(step))
        if isinstance(losses, torch.Tensor):
            losses = {"loss": losses}
        total = sum(weights.get(k, 1.0) * v for k, v in losses.items() if k != "loss") \
            if any(k != "loss" for k in losses) else losses["loss"]
        opt.zero_grad(set_to_none=True)
        total.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        if sched is not None:
            sched.step()
        history["loss"].append(total.item())
        for k, v in losses.items():
            if k != "loss":
                history.setdefault(k, []).append(v.item())
        if progress and step % 10 == 0:
            bar.set_postfix({k: f"{v[-1]:.4g}" for k, v in history.items()})
    history["seconds"] = time.perf_counter() - start
    return history


# ----------------------------------------------------------------------------- metrics


def mse(pred: torch.Tensor, target: torch.Tensor) -> float:
    return ((pred.detach().double() - target.detach().double()) ** 2).mean().item()


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> float:
    """10 log10(data_range^2 / MSE) over all entries, in dB."""
    err = mse(pred, target)
    return float("inf") if err == 0 else 10 * math.log10(data_range ** 2 / err)


def chamfer_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Symmetric Chamfer distance of point sets a [N, D] and b [M, D] (or batched [B, ., D]):
    mean nearest-neighbour distance a -> b plus b -> a, averaged over the batch."""
    d = torch.cdist(a.double(), b.double())
    return (d.min(-1).values.mean(-1) + d.min(-2).values.mean(-1)).mean().item()


def iou(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Intersection over union of two boolean occupancies of the same shape."""
    if pred.shape != target.shape:
        raise ValueError(f"pred: expected target's shape {list(target.shape)}, got {list(pred.shape)}")
    inter = (pred & target).sum().item()
    union = (pred | target).sum().item()
    return 1.0 if union == 0 else inter / union


# -------------------------------------------------------------------------------- data


def random_blobs(n: int, blobs: int = 3, channels: int = 1, moving: bool = False,
                 generator=None) -> dict:
    """Parameters of n synthetic images: a background level, `blobs` Gaussian blobs (centre,
    width, per-channel amplitude, and with moving=True a velocity) and a low plane wave."""
    def u(*shape, lo=0.0, hi=1.0):
        return lo + (hi - lo) * torch.rand(*shape, generator=generator)

    return {"background": u(n, 1, channels, lo=0.05, hi=0.25),
            "centre": u(n, blobs, 2, lo=-0.6, hi=0.6),
            "velocity": u(n, blobs, 2, lo=-0.4, hi=0.4) * float(moving),
            "width": u(n, blobs, 1, lo=0.15, hi=0.35),
            "amplitude": u(n, blobs, channels, lo=0.25, hi=0.6),
            "wave": u(n, 1, 2, lo=-3.0, hi=3.0),
            "phase": u(n, 1, 1, hi=2 * math.pi)}


def render_blobs(params: dict, coords: torch.Tensor) -> torch.Tensor:
    """The images of random_blobs at coords [N, D] or [n, N, D] (x, y[, t]; t moves the
    blobs, t = 0 without it) -> values in [0, 1], [n, N, channels]."""
    n = params["centre"].shape[0]
    if coords.dim() == 2:
        coords = coords.expand(n, *coords.shape)
    check_shape(coords, "coords", (n, None, None), f"[{n}, N, 2 or 3]")
    if coords.shape[-1] not in (2, 3):
        raise ValueError(f"coords: expected 2 (x, y) or 3 (x, y, t) columns, got {coords.shape[-1]}")
    p = {k: v.to(coords.device) for k, v in params.items()}
    xy = coords[..., :2]
    t = coords[..., 2:3] if coords.shape[-1] == 3 else torch.zeros_like(xy[..., :1])
    centre = p["centre"].unsqueeze(1) + p["velocity"].unsqueeze(1) * t.unsqueeze(2)  # [n, N, blobs, 2]
    d2 = ((xy.unsqueeze(2) - centre) ** 2).sum(-1, keepdim=True)  # [n, N, blobs, 1]
    bumps = torch.exp(-d2 / (2 * p["width"].unsqueeze(1) ** 2)) * p["amplitude"].unsqueeze(1)
    wave = 0.08 * torch.sin((xy * p["wave"]).sum(-1, keepdim=True) + p["phase"])
    return (p["background"] + bumps.sum(2) + wave).clamp(0, 1)


def cell_centres(sizes: Sequence[int], device=None) -> torch.Tensor:
    """grid_coordinates at pixel centres, (2 i + 1) / n - 1 per axis: the points that
    align_corners=False lookups and F.interpolate read at, [prod(sizes), D]."""
    scale = torch.tensor([(int(s) - 1) / int(s) for s in reversed(sizes)], device=device)
    return grid_coordinates(sizes, device) * scale


def random_shapes(n: int, dims: int = 2, primitives: int = 3, generator=None) -> dict:
    """Parameters of n synthetic shapes in [-1, 1]^dims: unions of `primitives` discs (balls
    in 3-D) or axis-aligned boxes, each with a centre, a radius (half side for boxes) and
    an intensity (for images), and a background level."""
    if dims not in (2, 3):
        raise ValueError(f"dims must be 2 or 3, got {dims}")

    def u(*shape, lo=0.0, hi=1.0):
        return lo + (hi - lo) * torch.rand(*shape, generator=generator)

    return {"centre": u(n, primitives, dims, lo=-0.5, hi=0.5),
            "radius": u(n, primitives, lo=0.2, hi=0.45),
            "box": torch.rand(n, primitives, generator=generator) < 0.5,
            "intensity": u(n, primitives, lo=0.3, hi=0.7),
            "background": u(n, 1, hi=0.2)}


def shape_sdf(params: dict, coords: torch.Tensor) -> torch.Tensor:
    """Signed distance (negative inside; the box's is the L-infinity one) of each primitive
    of random_shapes at coords [N, D] or [n, N, D] -> [n, N, primitives]."""
    n, _, D = params["centre"].shape
    if coords.dim() == 2:
        coords = coords.expand(n, *coords.shape)
    check_shape(coords, "coords", (n, None, D), f"[{n}, N, {D}]")
    p = {k: v.to(coords.device) for k, v in params.items()}
    offset = coords.unsqueeze(2) - p["centre"].unsqueeze(1)  # [n, N, K, D]
    dist = torch.where(p["box"].unsqueeze(1), offset.abs().amax(-1), offset.norm(dim=-1))
    return dist - p["radius"].unsqueeze(1)


def shape_occupancy(params: dict, coords: torch.Tensor) -> torch.Tensor:
    """Inside the union of the primitives: bool [n, N]."""
    return (shape_sdf(params, coords) < 0).any(-1)


def render_shapes(params: dict, coords: torch.Tensor) -> torch.Tensor:
    """Piecewise-constant images of random_shapes: background plus the intensity of every
    primitive covering the point (overlaps add up), clamped to [0, 1], [n, N, 1]."""
    inside = (shape_sdf(params, coords) < 0).to(coords.dtype)
    level = params["background"].to(coords.device) + (inside * params["intensity"].to(coords.device).unsqueeze(1)).sum(-1)
    return level.clamp(0, 1).unsqueeze(-1)


def scattered_linear_interpolation(coords: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                                   query: torch.Tensor) -> torch.Tensor:
    """The plain baseline: per sample, piecewise-linear interpolation of the observed 2-D
    points (Delaunay, scipy's griddata), nearest observation outside their convex hull.
    coords [B, N, 2], values [B, N, C], mask [B, N], query [M, 2] or [B, M, 2] -> [B, M, C]."""
    from scipy.interpolate import griddata

    B, C = coords.shape[0], values.shape[-1]
    q = query.expand(B, *query.shape[-2:]) if query.dim() == 2 else query
    out = torch.empty(B, q.shape[1], C)
    for b in range(B):
        pts, vals = coords[b][mask[b]].cpu().double().numpy(), values[b][mask[b]].cpu().double().numpy()
        qb = q[b].cpu().double().numpy()
        near = griddata(pts, vals, qb, method="nearest")
        lin = near
        if len(pts) >= 3:
            try:
                lin = griddata(pts, vals, qb, method="linear")
            except Exception:  # collinear points: no triangulation, nearest everywhere
                lin = near
        lin = torch.from_numpy(lin).float()
        near = torch.from_numpy(near).float()
        out[b] = torch.where(torch.isnan(lin), near, lin).view(-1, C)
    return out


# ------------------------------------------------------------------------------- plots


def plot_rows(out: str, rows: Sequence[Tuple[str, Sequence[Tuple[str, torch.Tensor]]]],
              title: str = "", cell: float = 2.0) -> str:
    """A grid of images to a PNG: rows = [(row label, [(panel title, image [H, W] or
    [H, W, 3] or a callable(ax) that draws the panel), ...]), ...]."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError("the demo plot needs matplotlib: pip install matplotlib") from exc
    ncols = max(len(panels) for _, panels in rows)
    fig, axes = plt.subplots(len(rows), ncols, figsize=(cell * ncols, cell * len(rows) + 0.8),
                             squeeze=False)
    for r, (label, panels) in enumerate(rows):
        for c in range(ncols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(panels):
                ax.axis("off")
                continue
            name, img = panels[c]
            if callable(img):
                img(ax)
            else:
                img = img.detach().cpu().float()
                ax.imshow(img.clamp(0, 1).numpy(), cmap="gray" if img.dim() == 2 else None,
                          vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(name, fontsize=7)
        axes[r, 0].set_ylabel(label, fontsize=8)
    if title:  # wrapped to the figure's width (about 14 characters per inch at this size)
        import textwrap

        fig.suptitle(textwrap.fill(title, int(14 * cell * ncols)), fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return str(out)


# ------------------------------------------------------------------------- checkpoints


def guided_latents(model, f: torch.Tensor, guidance_scale: Optional[float], steps: Optional[int],
                   generator=None) -> torch.Tensor:
    """Latents [B, latent_dim] of a conditional latent-diffusion model given its condition
    f [B, cond_dim]: DDIM through the fused loop with classifier-free guidance (the
    unconditional branch sees zeros), clipped at config["sample_clip"] and brought back
    from the model's standardised scale. The model has denoiser, schedule, standardiser
    and config["latent_dim"] / ["sample_clip"]."""
    z = sample(model.denoiser, (f.shape[0], model.config["latent_dim"]), model.schedule,
               method="ddim", steps=steps or model.schedule.num_timesteps, cond=f,
               uncond=torch.zeros_like(f) if guidance_scale is not None else None,
               guidance_scale=guidance_scale, generator=generator,
               clip_sample=model.config["sample_clip"])
    return model.standardiser.unstandardise(z)


class FieldModel(nn.Module):
    """Base of the approaches' models: `config` (a dict of constructor arguments, or a
    dataclass) rebuilds the model; save(path) writes {config, state_dict} with torch.save,
    load(path) reads it with weights_only=True. A `schedule` attribute (NoiseSchedule)
    follows every device move (.to, .cuda, .cpu all go through _apply)."""

    config: Union[dict, object]

    def _apply(self, fn, *args, **kwargs):
        module = super()._apply(fn, *args, **kwargs)
        schedule = getattr(self, "schedule", None)
        tensor = next(iter(self.parameters()), None)
        if schedule is not None and tensor is not None:
            self.schedule = schedule.to(tensor.device)
        return module

    def config_dict(self) -> dict:
        c = self.config
        return dataclasses.asdict(c) if dataclasses.is_dataclass(c) else dict(c)

    @classmethod
    def from_config(cls, config: dict) -> "FieldModel":
        return cls(**config)

    def save(self, path) -> None:
        torch.save({"config": self.config_dict(), "state_dict": self.state_dict()}, path)

    @classmethod
    def load(cls, path, map_location="cpu") -> "FieldModel":
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
        if not isinstance(ckpt, dict) or not {"config", "state_dict"} <= ckpt.keys():
            raise ValueError(f"path: {path} is not a {cls.__name__} checkpoint (no config / state_dict)")
        model = cls.from_config(ckpt["config"])
        model.load_state_dict(ckpt["state_dict"])
        return model.to(map_location) if map_location is not None else model


# --------------------------------------------------------------------- benchmark calls

ROTATIONS = 3  # input sets a benchmark call rotates over, so caches do not flatter it


def adam_step(parameters, loss_fn, input_sets: list, lr: float = 1e-4) -> Callable[[], None]:
    """A callable doing one Adam step on loss_fn(*inputs) per call (a loss tensor or a dict
    of losses, summed), the inputs rotating over input_sets: the models'
    benchmark_calls' training step. The optimizer lives across calls, as in training
    (`.optimizer`); the small rate keeps the model comparable between the implementations
    timed one after the other."""
    opt = torch.optim.Adam([p for p in parameters if p.requires_grad], lr=lr)
    inputs = itertools.cycle(input_sets)

    def step() -> None:
        loss = loss_fn(*next(inputs))
        if isinstance(loss, dict):
            loss = sum(loss.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step.optimizer = opt
    return step
