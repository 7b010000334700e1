"""Approach 6: a temporal neural field with diffusion over clip latents.

    clip [B, T, H, W, C], a few observed frames (frame_mask [B, T] bool)
    f_S  = SetEncoder({(x, y, t, value) of the observed frames' pixels})     [B, cond_dim]
    z0   = SetEncoder(pixels of the whole clip)                              [B, latent_dim]
    diffusion on the standardised z0 conditioned on f_S (epsilon loss, condition dropout;
    sampling: DDIM with the guidance fused in the step)
    planes(z, f_S) = Linear([z, f_S]) reshaped to factorized planes: xy, xt, yt (all axis
    pairs of (x, y, t); with dims=4, the six K-planes of (x, y, z, t))
    field(x, y, t) = base(x, y, t) + FusedMLP(grid_lookup(x, y, t; planes, concat))

base is the plain estimate: the observed frames interpolated linearly in time (constant
before the first and after the last) and read trilinearly through the same fused lookup,
so the field learns the motion the cross-fade misses. Time is a coordinate: frames are
queried at any rate, pixels at any resolution. dims=4 (x, y, z, t) has no base (the
lookup reads volumes of at most three axes).

Coordinates follow grid_coordinates: x, y (, z), t in [-1, 1]; a clip of T frames has its
frames at t = linspace(-1, 1, T).
"""
from __future__ import annotations

import itertools
from typing import Optional

import torch
from torch import nn

from ..diffusion import NoiseSchedule
from ..nn import FusedMLP, MultiScaleField
from ..ops import grid_lookup
from .blocks import (FieldModel, guided_latents, LatentDenoiser, RunningStandardiser, SetEncoder, check_shape,
                     diffusion_loss, gather_observations, grid_coordinates, plot_rows, psnr,
                     random_blobs, render_blobs, train_loop)
from .latent_field import interpolate_observations

APPROACH = 6


def interpolate_frames(clips: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
    """The observed frames of clips [B, T, *space, C] linearly interpolated in time onto all
    T frames (constant outside the observed span) -> [B, T, *space, C]."""
    B, T = clips.shape[:2]
    per_pixel = clips.reshape(B, T, -1).transpose(1, 2)  # [B, pixels * C, T]
    mask = frame_mask.unsqueeze(1).expand_as(per_pixel)
    dense = interpolate_observations(per_pixel.reshape(-1, T), mask.reshape(-1, T))
    return dense.view(B, -1, T).transpose(1, 2).reshape(clips.shape)


class TemporalField(FieldModel):
    """Approach 6's model: sample(clips, frame_mask, queries) fills in unobserved frames;
    queries are (x, y, t) points anywhere in [-1, 1]^3 (any frame rate and resolution)."""

    def __init__(self, channels: int = 1, dims: int = 3, latent_dim: int = 32, cond_dim: int = 32,
                 plane_channels: int = 8, space_resolution: int = 16, time_resolution: int = 8,
                 encoder_width: int = 64, decoder_width: int = 64, denoiser_width: int = 128,
                 timesteps: int = 100, cond_dropout: float = 0.1, sample_clip: Optional[float] = 4.0):
        super().__init__()
        if dims not in (3, 4):
            raise ValueError(f"dims must be 3 (x, y, t) or 4 (x, y, z, t), got {dims}")
        self.config = dict(channels=channels, dims=dims, latent_dim=latent_dim, cond_dim=cond_dim,
                           plane_channels=plane_channels, space_resolution=space_resolution,
                           time_resolution=time_resolution, encoder_width=encoder_width,
                           decoder_width=decoder_width, denoiser_width=denoiser_width,
                           timesteps=timesteps, cond_dropout=cond_dropout, sample_clip=sample_clip)
        self.channels, self.dims = channels, dims
        res = [space_resolution] * (dims - 1) + [time_resolution]
        self.lookup = MultiScaleField(list(itertools.combinations(range(dims), 2)), [res], plane_channels,
                                      combine="concat", align_corners=True, learnable=False)
        self.plane_shapes = [self.lookup.field_shape(0, axes) for axes in self.lookup.planes]
        self.to_planes = nn.Linear(latent_dim + cond_dim, sum(torch.Size(s).numel() for s in self.plane_shapes))
        self.field = FusedMLP(self.lookup.out_features, decoder_width, channels, hidden_layers=1,
                              activation="silu")
        self.observation_encoder = SetEncoder(dims, channels, cond_dim, width=encoder_width)
        self.clip_encoder = SetEncoder(dims, channels, latent_dim, width=encoder_width)
        self.denoiser = LatentDenoiser(latent_dim, denoiser_width, cond_dim=cond_dim)
        self.standardiser = RunningStandardiser(latent_dim)
        self.schedule = NoiseSchedule("cosine", timesteps)

    # ------------------------------------------------------------------------ inputs
    def _check(self, clips: torch.Tensor, frame_mask: torch.Tensor) -> None:
        D = self.dims
        check_shape(clips, "clips", (None,) * (D + 1) + (self.channels,),
                    f"[B, T, {'D, ' if D == 4 else ''}H, W, {self.channels}]")
        check_shape(frame_mask, "frame_mask", clips.shape[:2], f"[{clips.shape[0]}, {clips.shape[1]}]")
        if frame_mask.dtype != torch.bool:
            raise TypeError(f"frame_mask: expected a bool tensor, got {frame_mask.dtype}")

    def clip_points(self, clips: torch.Tensor) -> tuple:
        """(coords [P, dims], values [B, P, C]) of every pixel of clips [B, T, *space, C]."""
        coords = grid_coordinates(clips.shape[1:-1], clips.device)
        return coords, clips.reshape(clips.shape[0], -1, self.channels)

    def observe(self, clips: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """f_S [B, cond_dim] of the observed frames' pixels."""
        self._check(clips, frame_mask)
        coords, values = self.clip_points(clips)
        pixels = clips[0, 0, ..., 0].numel()
        obs = gather_observations(frame_mask.repeat_interleave(pixels, dim=1), coords, values)
        return self.observation_encoder(*obs)

    # ------------------------------------------------------------------------- field
    def planes(self, z: torch.Tensor, f: torch.Tensor) -> list:
        """The per-sample factorized planes [B, C, ...] from the latent and the condition."""
        flat = self.to_planes(torch.cat([z, f], dim=-1))
        sizes = [torch.Size(s).numel() for s in self.plane_shapes]
        return [p.view(z.shape[0], *s) for p, s in zip(flat.split(sizes, dim=-1), self.plane_shapes)]

    def base(self, clips: torch.Tensor, frame_mask: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """The plain estimate at queries [B, M, 3]: observed frames linearly interpolated in
        time, read trilinearly -> [B, M, C]."""
        volume = interpolate_frames(clips, frame_mask).movedim(-1, 1)  # [B, C, T, H, W]
        return grid_lookup(queries, [[volume]], [(0, 1, 2)], align_corners=True)

    def decode(self, queries: torch.Tensor, z: torch.Tensor, f: torch.Tensor,
               base: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The field at queries [M, dims] or [B, M, dims] -> [B, M, C] (+ base [B, M, C])."""
        B = z.shape[0]
        if queries.dim() == 2:
            queries = queries.expand(B, *queries.shape)
        check_shape(queries, "queries", (B, None, self.dims), f"[M, {self.dims}] or [{B}, M, {self.dims}]")
        out = self.field(self.lookup(queries, [self.planes(z, f)]))
        return out if base is None else out + base

    def _queried(self, clips, frame_mask, queries):
        """(coords [B, M, dims], values [B, M, C], base or None) of the pixel indices queries."""
        coords, values = self.clip_points(clips)
        coords = coords.expand(clips.shape[0], *coords.shape)
        if queries is not None:
            check_shape(queries, "queries", (clips.shape[0], None), f"[{clips.shape[0]}, M]")
            coords = coords.gather(1, queries.unsqueeze(-1).expand(-1, -1, self.dims))
            values = values.gather(1, queries.unsqueeze(-1).expand(-1, -1, self.channels))
        base = self.base(clips, frame_mask, coords) if self.dims == 3 else None
        return coords, values, base

    def losses(self, clips: torch.Tensor, frame_mask: torch.Tensor, queries: Optional[torch.Tensor] = None,
               generator=None) -> dict:
        """{'reconstruction', 'diffusion'}: clips [B, T, *space, C] with frames observed where
        frame_mask [B, T]; queries: pixel indices [B, M] the clip encoder and the loss read."""
        f = self.observe(clips, frame_mask)
        coords, values, base = self._queried(clips, frame_mask, queries)
        z0 = self.clip_encoder(coords, values)
        recon = ((self.decode(coords, z0, f, base) - values) ** 2).mean()
        z0 = z0.detach()
        if self.training:
            self.standardiser.update(z0)
        diff = diffusion_loss(self.denoiser, self.standardiser.standardise(z0), self.schedule,
                              cond=f, cond_dropout=self.config["cond_dropout"], generator=generator)
        return {"reconstruction": recon, "diffusion": diff}

    def training_step(self, clips, frame_mask, queries=None, generator=None) -> torch.Tensor:
        losses = self.losses(clips, frame_mask, queries, generator)
        return losses["reconstruction"] + losses["diffusion"]

    # ---------------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample_latents(self, clips, frame_mask, *, guidance_scale: Optional[float] = 2.0,
                       steps: Optional[int] = None, generator=None) -> tuple:
        """(z, f_S) for clips with only frame_mask's frames observed (DDIM, fused guidance)."""
        f = self.observe(clips, frame_mask)
        return guided_latents(self, f, guidance_scale, steps, generator), f

    @torch.no_grad()
    def sample(self, clips, frame_mask, queries, **kwargs) -> torch.Tensor:
        """The clips' fields at queries [M, dims] or [B, M, dims] -> [B, M, C]."""
        z, f = self.sample_latents(clips, frame_mask, **kwargs)
        if queries.dim() == 2:
            queries = queries.expand(z.shape[0], *queries.shape)
        base = self.base(clips, frame_mask, queries) if self.dims == 3 else None
        return self.decode(queries, z, f, base)


# ------------------------------------------------------------------------------- demo


def moving_blobs(n: int, frames: int, size: int, channels: int = 1, generator=None) -> torch.Tensor:
    """Clips of Gaussian blobs moving at constant velocity, [n, frames, size, size, channels]."""
    params = random_blobs(n, channels=channels, moving=True, generator=generator)
    return render_blobs(params, grid_coordinates((frames, size, size))).view(n, frames, size, size, channels)


def demo(out: str, *, quick: bool = False, seed: int = 0, device: str = "cpu") -> str:
    """Clips of 9 frames, frames 0, 4 and 8 observed: PSNR of the 6 unseen frames against
    linear interpolation in time."""
    size, n_train, steps, batch = (12, 128, 40, 8) if quick else (16, 1000, 600, 16)
    T = 9
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    clips = moving_blobs(n_train + 32, T, size, generator=g)
    train_x, test_x = clips[:n_train], clips[n_train:]
    model = TemporalField(space_resolution=size, time_resolution=T).to(device)
    dgen = torch.Generator(device).manual_seed(seed)
    P, M = T * size * size, 512

    def batch_fn(step):
        idx = torch.randint(0, n_train, (batch,), generator=g)
        frame_mask = torch.rand(batch, T, generator=g) < 0.35
        frame_mask[:, 0] = True  # at least one observed frame
        queries = torch.rand(batch, P, generator=g).argsort(1)[:, :M]
        return train_x[idx].to(device), frame_mask.to(device), queries.to(device)

    history = train_loop(model.parameters(), lambda b: model.losses(*b, generator=dgen), batch_fn, steps,
                         lr=1e-3, progress=not quick, desc="train approach 6")
    model.eval()
    frame_mask = torch.zeros(len(test_x), T, dtype=torch.bool)
    frame_mask[:, ::4] = True
    coords = grid_coordinates((T, size, size), device)
    pred = model.sample(test_x.to(device), frame_mask.to(device), coords, generator=dgen, steps=50).cpu()
    pred = pred.view(test_x.shape)
    base = interpolate_frames(test_x, frame_mask)
    unseen = ~frame_mask
    model_psnr, base_psnr = psnr(pred[unseen], test_x[unseen]), psnr(base[unseen], test_x[unseen])
    # the same latent at 4x the frame rate: 33 frames
    fine_t = grid_coordinates((4 * (T - 1) + 1, size, size), device)
    fine = model.sample(test_x[:1].to(device), frame_mask[:1].to(device), fine_t, generator=dgen,
                        steps=50).cpu().view(-1, size, size)
    rows = [("truth", [(f"t{i}" + (" obs" if frame_mask[0, i] else ""), test_x[0, i, ..., 0]) for i in range(T)]),
            ("linear", [(f"t{i}", base[0, i, ..., 0]) for i in range(T)]),
            ("model", [(f"t{i}", pred[0, i, ..., 0]) for i in range(T)]),
            ("4x rate", [(f"t{i / 4:.2f}", fine[i]) for i in range(12, 21)])]
    line = (f"approach 6: held-out PSNR on the 6 unseen of 9 frames (3 observed): model {model_psnr:.1f} dB "
            f"vs linear interpolation in time {base_psnr:.1f} dB ({steps} steps, {history['seconds']:.0f} s)")
    plot_rows(out, rows, title=line, cell=1.4)
    return line


def benchmark_calls(device, quick: bool) -> dict:
    """One training step on clips of moving blobs with a third of the frames observed (the
    clip encoder and the reconstruction reading M random pixels each), and one sampling pass
    (guided DDIM from the observed frames, the field decoded on every frame at twice the
    clips' resolution): 32 clips of 9 x 64^2, M = 4096, 100 steps (quick: 2 of 5 x 6^2,
    M = 32, 4 steps)."""
    from .blocks import ROTATIONS, adam_step

    batch, T, size, M, steps = (2, 5, 6, 32, 4) if quick else (32, 9, 64, 4096, 100)
    torch.manual_seed(0)
    model = TemporalField(space_resolution=size, time_resolution=T).to(device)
    g = torch.Generator().manual_seed(0)
    sets = []
    for _ in range(ROTATIONS):
        frame_mask = torch.rand(batch, T, generator=g) < 0.35
        frame_mask[:, 0] = True  # at least one observed frame
        queries = torch.rand(batch, T * size * size, generator=g).argsort(1)[:, :M]
        sets.append((moving_blobs(batch, T, size, generator=g).to(device), frame_mask.to(device),
                     queries.to(device)))
    fine = grid_coordinates((T, 2 * size, 2 * size), device)
    return {"train_step": adam_step(model.parameters(), model.losses, sets),
            "sampling": lambda: model.sample(sets[0][0], sets[0][1], fine, steps=steps),
            "points": {"train_step": batch * M, "sampling": batch * fine.shape[0]},
            "describe": f"{batch} clips of {T} x {size}^2, {M} pixels per clip in training; "
                        f"{steps} guided DDIM steps, decoded at {T} x {2 * size}^2"}
