"""Approach 10: diffusion on features attached to an irregular point set, decoded by an
implicit field that reads the features near each query.

    anchors  A = {a_i}, N points per shape (irregular: sampled inside it), [B, N, D]
    features f0_i = Linear(max_j phi(p_j - a_i, o_j)) over the k dense samples p_j nearest
             a_i with their occupancy o_j = +-1 (a local PointNet; training only)   [B, N, C]
    diffusion on the standardised f0 given the anchors: eps(f_t, t, A) per anchor from its
             own features, the mean of its k nearest anchors' and the mean of all (so the
             features of a shape are drawn together)
    read     R(q) = (f(q), a(q), d(q)): the anchors' features and positions interpolated at
             the query, and how close the anchors are
    field    logit(q) = FusedMLP([f(q), q - a(q), d(q)]), occupancy = logit > 0, trained on
             features with feature_noise x their std of Gaussian noise added, so that it
             tolerates the small errors of drawn features

Two readers, by config:
    "knn"    inverse-square-distance mean of the read_k nearest anchors; d = distance to the
             nearest one. Cost O(M N) per shape for M queries.
    "splat"  the anchors' (f, a) spread onto an R^D grid by normalised Gaussian weights
             (softmax of -|g - a_i|^2 / 2 sigma^2 over anchors; d = its log-sum-exp, a
             density), then read by nfd_fast's fused lookup (bilinear / trilinear).
             Cost O(R^D N) once per shape plus O(M) per query batch.
The default is "splat": the two reach about the same quality (see the README for the
measurement), and splatting makes the per-query cost independent of the number of anchors
(the lookup reads 2^D grid corners) and reuses one grid for every query batch of a shape.

Shapes: anchors [B, N, D], dense samples [B, P, D] with occupancy [B, P] bool, queries
[M, D] or [B, M, D] in [-1, 1]^D (x, y[, z]); logits [B, M]. D = 2 or 3.
"""
from __future__ import annotations

import time
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..diffusion import NoiseSchedule, sample
from ..nn import FusedMLP
from ..ops import grid_lookup
from .blocks import (FieldModel, RunningStandardiser, check_shape, diffusion_loss, grid_coordinates,
                     iou, knn_interpolate, plot_rows, random_shapes, shape_occupancy,
                     timestep_embedding, train_loop)

APPROACH = 10
READERS = ("knn", "splat")


def nearest(centres: torch.Tensor, points: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [B, N, k] of the k points [B, P, D] nearest each centre [B, N, D]."""
    return torch.cdist(centres, points).topk(min(k, points.shape[1]), dim=-1, largest=False).indices


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, P, C] at idx [B, N, k] -> [B, N, k, C]."""
    B, N, k = idx.shape
    return x.gather(1, idx.reshape(B, N * k, 1).expand(-1, -1, x.shape[-1])).view(B, N, k, -1)


class PointFeatureDenoiser(nn.Module):
    """eps(f_t [B, N, C], t [B], anchors [B, N, D]) -> [B, N, C]: h = FusedMLP([f_t, a]) +
    P(emb(t)); eps = FusedMLP([h, mean of h over the k nearest anchors, mean over all])."""

    def __init__(self, feature_dim: int, dims: int, features: int = 20, width: int = 64, k: int = 6):
        super().__init__()
        self.k = k
        self.inp = FusedMLP(feature_dim + dims, width, features, hidden_layers=1, activation="silu")
        self.time = nn.Sequential(nn.Linear(features, features), nn.SiLU(), nn.Linear(features, features))
        self.out = FusedMLP(3 * features, width, feature_dim, hidden_layers=2, activation="silu")

    def forward(self, f_t: torch.Tensor, t: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        h = self.inp(torch.cat([f_t, anchors], dim=-1))
        h = h + self.time(timestep_embedding(t, h.shape[-1])).unsqueeze(1)
        local = gather_rows(h, nearest(anchors, anchors, self.k)).mean(2)
        pooled = h.mean(1, keepdim=True).expand_as(h)
        return self.out(torch.cat([h, local, pooled], dim=-1))


class SparseFeatureField(FieldModel):
    """Approach 10's model: sample(anchors, queries) draws the anchors' features and decodes
    occupancy logits at any queries; reconstruct(...) decodes the encoder's features."""

    def __init__(self, dims: int = 2, feature_dim: int = 8, k: int = 16, reader: str = "splat",
                 read_k: int = 4, splat_resolution: int = 32, splat_sigma: float = 0.08,
                 encoder_width: int = 32, decoder_width: int = 64, denoiser_features: int = 20,
                 denoiser_width: int = 64, timesteps: int = 100, feature_noise: float = 0.1,
                 sample_clip: Optional[float] = 4.0):
        super().__init__()
        if dims not in (2, 3):
            raise ValueError(f"dims must be 2 or 3, got {dims}")
        if reader not in READERS:
            raise ValueError(f"reader must be one of {READERS}, got {reader!r}")
        self.config = dict(dims=dims, feature_dim=feature_dim, k=k, reader=reader, read_k=read_k,
                           splat_resolution=splat_resolution, splat_sigma=splat_sigma,
                           encoder_width=encoder_width, decoder_width=decoder_width,
                           denoiser_features=denoiser_features, denoiser_width=denoiser_width,
                           timesteps=timesteps, feature_noise=feature_noise, sample_clip=sample_clip)
        self.dims, self.feature_dim = dims, feature_dim
        self.phi = FusedMLP(dims + 1, encoder_width, encoder_width, hidden_layers=1, activation="silu")
        self.to_features = nn.Linear(encoder_width, feature_dim)
        self.field = FusedMLP(feature_dim + dims + 1, decoder_width, 1, hidden_layers=2, activation="silu")
        self.denoiser = PointFeatureDenoiser(feature_dim, dims, denoiser_features, denoiser_width)
        self.standardiser = RunningStandardiser(feature_dim)
        self.schedule = NoiseSchedule("cosine", timesteps)

    # ------------------------------------------------------------------------ inputs
    def _anchors(self, anchors: torch.Tensor) -> torch.Tensor:
        check_shape(anchors, "anchors", (None, None, self.dims), f"[B, N, {self.dims}]")
        return anchors

    def _queries(self, queries: torch.Tensor, B: int) -> torch.Tensor:
        D = self.dims
        if queries.dim() == 2:
            check_shape(queries, "queries", (None, D), f"[M, {D}] or [{B}, M, {D}]")
            return queries.expand(B, *queries.shape)
        check_shape(queries, "queries", (B, None, D), f"[M, {D}] or [{B}, M, {D}]")
        return queries

    def _features(self, features: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        check_shape(features, "features", (*anchors.shape[:2], self.feature_dim),
                    f"[{anchors.shape[0]}, {anchors.shape[1]}, {self.feature_dim}]")
        return features

    # ---------------------------------------------------------------------- encoder
    def encode(self, anchors: torch.Tensor, points: torch.Tensor, occupancy: torch.Tensor) -> torch.Tensor:
        """Features [B, N, C] of the anchors from the dense samples points [B, P, D] and their
        occupancy [B, P] bool: the k nearest samples, relative to the anchor, max-pooled."""
        anchors = self._anchors(anchors)
        B, D = anchors.shape[0], self.dims
        check_shape(points, "points", (B, None, D), f"[{B}, P, {D}]")
        check_shape(occupancy, "occupancy", points.shape[:2], f"[{B}, {points.shape[1]}]")
        if occupancy.dtype != torch.bool:
            raise TypeError(f"occupancy: expected a bool tensor, got {occupancy.dtype}")
        idx = nearest(anchors, points, self.config["k"])
        rel = gather_rows(points, idx) - anchors.unsqueeze(2)
        sign = gather_rows(occupancy.unsqueeze(-1).to(points.dtype) * 2 - 1, idx)
        h = self.phi(torch.cat([rel, sign], dim=-1).flatten(1, 2)).view(*idx.shape, -1)
        return self.to_features(h.amax(2))

    # ----------------------------------------------------------------------- readers
    def splat(self, anchors: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """table [B, N, T] spread onto the R^D grid: [B, T + 1, *(R,) * D], the last channel
        the log-density of the anchors (log-sum-exp of the Gaussian exponents)."""
        R, D = self.config["splat_resolution"], self.dims
        nodes = grid_coordinates((R,) * D, anchors.device)
        logits = -torch.cdist(nodes.expand(anchors.shape[0], -1, -1), anchors).square() \
            / (2 * self.config["splat_sigma"] ** 2)
        values = torch.softmax(logits, dim=-1) @ table  # [B, R^D, T], every node a weighted mean
        density = logits.logsumexp(-1, keepdim=True).clamp_min(-20.0) / 20.0
        grid = torch.cat([values, density], dim=-1)
        return grid.view(anchors.shape[0], *(R,) * D, -1).movedim(-1, 1)

    def read(self, queries: torch.Tensor, anchors: torch.Tensor, features: torch.Tensor) -> tuple:
        """(features [B, M, C], anchor position [B, M, D], closeness [B, M, 1]) at queries."""
        table = torch.cat([features, anchors], dim=-1)
        if self.config["reader"] == "knn":
            read, dist = knn_interpolate(queries, anchors, table, k=self.config["read_k"])
            extra = dist.unsqueeze(-1)
        else:
            grid = self.splat(anchors, table)
            planes = [tuple(range(self.dims))]
            read = grid_lookup(queries, [[grid]], planes, align_corners=True)
            read, extra = read[..., :-1], read[..., -1:]
        return read[..., :self.feature_dim], read[..., self.feature_dim:], extra

    def decode(self, queries: torch.Tensor, anchors: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Occupancy logits [B, M] at queries [M, D] or [B, M, D] from the anchors' features."""
        anchors = self._anchors(anchors)
        features = self._features(features, anchors)
        q = self._queries(queries, anchors.shape[0])
        f, a, extra = self.read(q, anchors, features)
        return self.field(torch.cat([f, q - a, extra], dim=-1)).squeeze(-1)

    # ---------------------------------------------------------------------- training
    def losses(self, anchors, points, occupancy, queries, query_occupancy, generator=None) -> dict:
        """{'reconstruction' (binary cross-entropy of the decoded occupancy at queries
        [B, M, D] against query_occupancy [B, M] bool), 'diffusion'}."""
        f0 = self.encode(anchors, points, occupancy)
        q = self._queries(queries, anchors.shape[0])
        check_shape(query_occupancy, "query_occupancy", q.shape[:2], f"[{q.shape[0]}, {q.shape[1]}]")
        noisy = f0
        if self.training and self.config["feature_noise"] > 0:  # a decoder robust to drawn features' errors
            noise = torch.randn(f0.shape, device=f0.device, generator=generator)
            noisy = f0 + self.config["feature_noise"] * self.standardiser.std * noise
        recon = F.binary_cross_entropy_with_logits(self.decode(q, anchors, noisy), query_occupancy.to(f0.dtype))
        f0 = f0.detach()  # the encoder serves reconstruction; diffusion learns its features
        if self.training:
            self.standardiser.update(f0.flatten(0, 1))
        diff = diffusion_loss(self.denoiser, self.standardiser.standardise(f0), self.schedule, cond=anchors,
                              generator=generator)
        return {"reconstruction": recon, "diffusion": diff}

    def training_step(self, anchors, points, occupancy, queries, query_occupancy, generator=None):
        losses = self.losses(anchors, points, occupancy, queries, query_occupancy, generator)
        return losses["reconstruction"] + losses["diffusion"]

    # ---------------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample_features(self, anchors: torch.Tensor, *, steps: Optional[int] = None, generator=None):
        """Features [B, N, C] for the anchors, drawn by DDIM (fused steps)."""
        anchors = self._anchors(anchors)
        f = sample(self.denoiser, (*anchors.shape[:2], self.feature_dim), self.schedule, method="ddim",
                   steps=steps or self.schedule.num_timesteps, cond=anchors, generator=generator,
                   clip_sample=self.config["sample_clip"])
        return self.standardiser.unstandardise(f)

    @torch.no_grad()
    def sample(self, anchors: torch.Tensor, queries: torch.Tensor, **kwargs) -> torch.Tensor:
        """Occupancy logits [B, M] of shapes drawn for the anchors, at queries."""
        return self.decode(queries, anchors, self.sample_features(anchors, **kwargs))

    @torch.no_grad()
    def reconstruct(self, anchors, points, occupancy, queries) -> torch.Tensor:
        return self.decode(queries, anchors, self.encode(anchors, points, occupancy))


# ------------------------------------------------------------------------------- data


def points_inside(params: dict, n: int, candidates: int = 16, generator=None) -> torch.Tensor:
    """n points per shape drawn uniformly inside it (from candidates * n uniform draws; a
    shape too small to catch n of them fills up with outside points), [B, n, D]."""
    B, _, D = params["centre"].shape
    pts = torch.rand(B, candidates * n, D, generator=generator) * 2 - 1
    outside = ~shape_occupancy(params, pts)
    order = (torch.rand(pts.shape[:2], generator=generator) + 2 * outside).argsort(1)[:, :n]
    return pts.gather(1, order.unsqueeze(-1).expand(-1, -1, D))


def shape_batch(n: int, dims: int = 2, anchors: int = 24, dense: int = 256, generator=None) -> dict:
    """n shapes: their parameters, anchors inside them, dense uniform samples with occupancy
    (the encoder's input) and as many other uniform samples (the loss's queries)."""
    params = random_shapes(n, dims, generator=generator)
    pts = torch.rand(n, 2 * dense, dims, generator=generator) * 2 - 1
    occ = shape_occupancy(params, pts)
    return {"params": params, "anchors": points_inside(params, anchors, generator=generator),
            "points": pts[:, :dense], "occupancy": occ[:, :dense],
            "queries": pts[:, dense:], "query_occupancy": occ[:, dense:]}


def ball_union(anchors: torch.Tensor, queries: torch.Tensor, radius: float) -> torch.Tensor:
    """The plain baseline: inside if within `radius` of an anchor, bool [B, M]."""
    return torch.cdist(queries.expand(anchors.shape[0], -1, -1), anchors).amin(-1) < radius


def best_ball_radius(batch: dict, grid: torch.Tensor) -> float:
    """The baseline's radius with the best IoU on a batch of shapes (training data)."""
    truth = shape_occupancy(batch["params"], grid)
    radii = torch.linspace(0.05, 0.4, 36).tolist()
    return max(radii, key=lambda r: iou(ball_union(batch["anchors"], grid, r), truth))


def train_demo_model(quick: bool, seed: int, device: str, reader: str = "splat"):
    """The demo's training run: (model, history, generator of the held-out data)."""
    steps, batch = (20, 8) if quick else (1500, 32)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = SparseFeatureField(reader=reader).to(device)
    dgen = torch.Generator(device).manual_seed(seed)
    keys = ("anchors", "points", "occupancy", "queries", "query_occupancy")

    def batch_fn(step):
        b = shape_batch(batch, generator=g)
        return [b[k].to(device) for k in keys]

    history = train_loop(model.parameters(), lambda b: model.losses(*b, generator=dgen), batch_fn, steps,
                         lr=2e-3, progress=not quick, desc="train approach 10")
    return model.eval(), history, g


def demo(out: str, *, quick: bool = False, seed: int = 0, device: str = "cpu") -> str:
    """2-D shapes from 24 points inside each: IoU at 64^2 of shapes drawn by feature
    diffusion (and of the encoder's reconstruction) against a union of balls around the
    points (its radius the best on training shapes)."""
    model, history, g = train_demo_model(quick, seed, device)
    size, n_test = 64, 8 if quick else 64
    grid = grid_coordinates((size, size))
    radius = best_ball_radius(shape_batch(64, generator=g), grid)
    test = shape_batch(n_test, generator=g)
    truth = shape_occupancy(test["params"], grid)
    a = test["anchors"].to(device)
    dgen = torch.Generator(device).manual_seed(seed)
    features = model.sample_features(a, steps=50, generator=dgen)
    drawn = (model.decode(grid.to(device), a, features) > 0).cpu()
    recon = (model.reconstruct(a, test["points"].to(device), test["occupancy"].to(device),
                               grid.to(device)) > 0).cpu()
    base = ball_union(test["anchors"], grid, radius)
    scores = {name: iou(pred, truth) for name, pred in (("drawn", drawn), ("recon", recon), ("base", base))}
    fine = (model.decode(grid_coordinates((256, 256), device), a[:1], features[:1]) > 0).cpu()
    rows = []
    for i in range(3):
        pts = test["anchors"][i]

        def show_points(ax, pts=pts, img=truth[i]):
            ax.imshow(img.view(size, size).float().numpy(), cmap="gray", vmin=0, vmax=2, origin="lower",
                      extent=(-1, 1, -1, 1))
            ax.plot(pts[:, 0], pts[:, 1], "r.", ms=3)

        rows.append((f"shape {i}", [("truth + 24 points", show_points),
                                    ("union of balls", base[i].view(size, size).flip(0).float()),
                                    ("reconstruction", recon[i].view(size, size).flip(0).float()),
                                    ("drawn by diffusion", drawn[i].view(size, size).flip(0).float())]))
    rows[0][1].append(("drawn, 256^2", fine[0].view(256, 256).flip(0).float()))
    line = (f"approach 10: held-out IoU at {size}^2 from 24 points per shape: shapes drawn by feature "
            f"diffusion {scores['drawn']:.3f} (encoder reconstruction {scores['recon']:.3f}) vs union of "
            f"balls {scores['base']:.3f} ({len(history['loss'])} steps, {history['seconds']:.0f} s)")
    plot_rows(out, rows, title=line)
    return line


def time_readers(model: SparseFeatureField, anchors: torch.Tensor, features: torch.Tensor,
                 size: int = 256) -> dict:
    """Seconds to decode a size^2 grid with each reader (same weights), for choosing one."""
    grid = grid_coordinates((size, size), anchors.device)
    seconds, chosen = {}, model.config["reader"]
    try:
        for reader in READERS:
            model.config["reader"] = reader
            start = time.perf_counter()
            with torch.no_grad():
                model.decode(grid, anchors, features)
            seconds[reader] = time.perf_counter() - start
    finally:
        model.config["reader"] = chosen
    return seconds


def benchmark_calls(device, quick: bool) -> dict:
    """One training step (the occupancy cross-entropy through the splat reader, and the
    point-set feature diffusion loss) on random 2-D shapes, and one sampling pass (DDIM on
    the anchors' features, occupancy decoded on a grid): 64 shapes, 128 anchors, 2048 dense
    samples, 100 steps, decoded at 256^2 (quick: 2 shapes, 8 anchors, 32 samples, 4 steps,
    16^2)."""
    from .blocks import ROTATIONS, adam_step

    batch, anchors, dense, steps, side = (2, 8, 32, 4, 16) if quick else (64, 128, 2048, 100, 256)
    torch.manual_seed(0)
    model = SparseFeatureField().to(device)
    g = torch.Generator().manual_seed(0)
    keys = ("anchors", "points", "occupancy", "queries", "query_occupancy")
    data = [shape_batch(batch, anchors=anchors, dense=dense, generator=g) for _ in range(ROTATIONS)]
    sets = [tuple(b[k].to(device) for k in keys) for b in data]
    grid = grid_coordinates((side, side), device)
    return {"train_step": adam_step(model.parameters(), model.losses, sets),
            "sampling": lambda: model.sample(sets[0][0], grid, steps=steps),
            "points": {"train_step": batch * dense, "sampling": batch * side * side},
            "describe": f"{batch} shapes, {anchors} anchors, {dense} dense samples, "
                        f"{model.config['reader']} reader; {steps} DDIM steps, decoded at {side}^2"}
