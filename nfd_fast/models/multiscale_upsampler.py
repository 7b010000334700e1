"""Approach 4: diffusion at low resolution, then a neural-field upsampler to any size.

    low      x [B, C, r, r] in [0, 1]: DDPM on 2 x - 1 with a small convolutional denoiser
             (time-embedding added in each residual block); DDIM sampling (fused steps)
    features F = Conv(x) [B, K, r, r]; coarse = avgpool_2(F) [B, K, r/2, r/2]
    read     grid_lookup(q; [[x, F], [coarse]]) (bilinear, align_corners=False, border):
             the image itself (its bilinear interpolation, the base) and the features at
             two scales, in one fused lookup per scale
    field    y(q) = base(q) + FusedMLP([x(q), F(q), coarse(q), r (q - c(q)) / 2])
             with c(q) the centre of the low-resolution pixel holding q: the offset lets
             the field place an edge inside a pixel (as LIIF's relative coordinate)

Training targets are point samples of the high-resolution image at random queries, so the
field is a continuous function: a 16^2 sample renders at 64^2, 1024^2 or any other size.
Pixel centres follow F.interpolate (align_corners=False): cell_centres(size).

Shapes: low [B, C, r, r]; queries [M, 2] or [B, M, 2] in [-1, 1] (x, y); targets and
outputs [B, M, C].
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..diffusion import NoiseSchedule, sample
from ..nn import FusedMLP, MultiScaleField
from .blocks import (FieldModel, cell_centres, check_shape, diffusion_loss, plot_rows, psnr, random_shapes,
                     render_shapes, timestep_embedding, train_loop)

APPROACH = 4


class ConvDenoiser(nn.Module):
    """eps(x_t [B, C, r, r], t [B]) -> [B, C, r, r]: a 3x3 convolution in, residual blocks
    h + conv(SiLU(conv(SiLU(GroupNorm(h))) + P_b(emb(t)))) (the time enters after the norm,
    which would remove a per-channel constant), a 3x3 convolution out (zero-initialised:
    the first prediction is 0)."""

    def __init__(self, channels: int, width: int = 32, blocks: int = 2):
        super().__init__()
        self.width = width
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.time = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width * blocks))
        self.norms = nn.ModuleList(nn.GroupNorm(min(8, width), width) for _ in range(blocks))
        self.convs = nn.ModuleList(nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in range(2))
                                   for _ in range(blocks))
        self.out = nn.Conv2d(width, channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        h = self.inp(x)
        emb = self.time(timestep_embedding(t, self.width)).chunk(len(self.norms), dim=-1)
        for norm, (first, second), e in zip(self.norms, self.convs, emb):
            h = h + second(F.silu(first(F.silu(norm(h))) + e[:, :, None, None]))
        return self.out(F.silu(h))


class MultiscaleUpsampler(FieldModel):
    """Approach 4's model: sample(n, queries) draws low-resolution images and reads them at
    queries; upsample(low, queries) is the field upsampler alone; render(low, size)."""

    def __init__(self, channels: int = 1, low_resolution: int = 16, features: int = 16,
                 encoder_width: int = 32, decoder_width: int = 64, denoiser_width: int = 32,
                 denoiser_blocks: int = 2, timesteps: int = 100):
        super().__init__()
        if low_resolution < 2 or low_resolution % 2:
            raise ValueError(f"low_resolution must be even and >= 2, got {low_resolution}")
        self.config = dict(channels=channels, low_resolution=low_resolution, features=features,
                           encoder_width=encoder_width, decoder_width=decoder_width,
                           denoiser_width=denoiser_width, denoiser_blocks=denoiser_blocks, timesteps=timesteps)
        self.channels, self.low_resolution, self.features = channels, low_resolution, features
        self.encoder = nn.Sequential(nn.Conv2d(channels, encoder_width, 3, padding=1), nn.SiLU(),
                                     nn.Conv2d(encoder_width, encoder_width, 3, padding=1), nn.SiLU(),
                                     nn.Conv2d(encoder_width, features, 3, padding=1))
        r = low_resolution
        self.lookup = MultiScaleField([(0, 1)], [r, r // 2], [channels + features, features],
                                      align_corners=False, learnable=False)
        self.field = FusedMLP(self.lookup.out_features + 2, decoder_width, channels, hidden_layers=2,
                              activation="silu")
        self.denoiser = ConvDenoiser(channels, denoiser_width, denoiser_blocks)
        self.schedule = NoiseSchedule("cosine", timesteps)

    # ------------------------------------------------------------------------ inputs
    def _low(self, low: torch.Tensor) -> torch.Tensor:
        r, C = self.low_resolution, self.channels
        check_shape(low, "low", (None, C, r, r), f"[B, {C}, {r}, {r}]")
        return low

    def _queries(self, queries: torch.Tensor, B: int) -> torch.Tensor:
        if queries.dim() == 2:
            check_shape(queries, "queries", (None, 2), f"[M, 2] or [{B}, M, 2]")
            return queries.expand(B, *queries.shape)
        check_shape(queries, "queries", (B, None, 2), f"[M, 2] or [{B}, M, 2]")
        return queries

    # ------------------------------------------------------------------------- field
    def upsample(self, low: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """The field of low-resolution images low [B, C, r, r] at queries -> [B, M, C]."""
        low = self._low(low)
        q = self._queries(queries, low.shape[0])
        feats = self.encoder(low)
        read = self.lookup(q, [[torch.cat([low, feats], dim=1)], [F.avg_pool2d(feats, 2)]])
        r = self.low_resolution
        # offset from the centre of the low-resolution pixel holding q, in pixels: [-1/2, 1/2)
        pixel = (q + 1) * (r / 2)
        offset = pixel - pixel.floor().clamp(0, r - 1) - 0.5
        return read[..., :self.channels] + self.field(torch.cat([read, offset], dim=-1))

    def render(self, low: torch.Tensor, size: int) -> torch.Tensor:
        """The field on a size x size grid of pixel centres -> [B, C, size, size]."""
        out = self.upsample(low, cell_centres((size, size), low.device))
        return out.transpose(1, 2).reshape(low.shape[0], self.channels, size, size)

    # ---------------------------------------------------------------------- training
    def losses(self, low: torch.Tensor, queries: torch.Tensor, targets: torch.Tensor, generator=None) -> dict:
        """{'reconstruction': MSE of the upsampled field at queries [B, M, 2] against targets
        [B, M, C] (point samples of the high-resolution image), 'diffusion': the epsilon
        loss of the low-resolution images}."""
        low = self._low(low)
        q = self._queries(queries, low.shape[0])
        check_shape(targets, "targets", (*q.shape[:2], self.channels), f"[{q.shape[0]}, {q.shape[1]}, {self.channels}]")
        recon = ((self.upsample(low, q) - targets) ** 2).mean()
        diff = diffusion_loss(self.denoiser, low * 2 - 1, self.schedule, generator=generator)
        return {"reconstruction": recon, "diffusion": diff}

    def training_step(self, low, queries, targets, generator=None) -> torch.Tensor:
        losses = self.losses(low, queries, targets, generator)
        return losses["reconstruction"] + losses["diffusion"]

    # ---------------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample_low(self, n: int, *, steps: Optional[int] = None, generator=None) -> torch.Tensor:
        """n low-resolution images [n, C, r, r] in [0, 1] by DDIM (fused steps)."""
        r = self.low_resolution
        x = sample(self.denoiser, (n, self.channels, r, r), self.schedule, method="ddim",
                   steps=steps or self.schedule.num_timesteps, generator=generator, clip_sample=1.0)
        return (x + 1) / 2

    @torch.no_grad()
    def sample(self, n: int, queries: torch.Tensor, **kwargs) -> torch.Tensor:
        """n new images, read at queries [M, 2] -> [n, M, C]."""
        return self.upsample(self.sample_low(n, **kwargs), queries)


# ------------------------------------------------------------------------------- data


def shape_images(n: int, low_resolution: int, factor: int = 4, queries: int = 256, generator=None) -> dict:
    """n images of random shapes: 'low' [n, 1, r, r] (each pixel the mean of factor^2 point
    samples of the image: an antialiased low resolution), random 'queries' [n, M, 2] and
    their point samples 'targets' [n, M, 1], and the shapes' 'params'."""
    params = random_shapes(n, 2, generator=generator)
    fine = low_resolution * factor
    high = render_shapes(params, cell_centres((fine, fine))).view(n, 1, fine, fine)
    q = torch.rand(n, queries, 2, generator=generator) * 2 - 1
    return {"low": F.avg_pool2d(high, factor), "queries": q, "targets": render_shapes(params, q),
            "params": params}


def bicubic(low: torch.Tensor, size: int) -> torch.Tensor:
    """The plain baseline: bicubic interpolation to size x size, clamped to [0, 1]."""
    return F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)


def demo(out: str, *, quick: bool = False, seed: int = 0, device: str = "cpu") -> str:
    """Shapes with sharp edges at 16^2: PSNR of the field upsampler against bicubic
    interpolation at 4x and 8x (point samples of the true image at the pixel centres), and
    low-resolution samples drawn by diffusion, rendered at 64^2 and 256^2."""
    r, n_train, steps, batch = (8, 256, 40, 16) if quick else (16, 4000, 1500, 32)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    data = shape_images(n_train, r, queries=512, generator=g)
    model = MultiscaleUpsampler(low_resolution=r).to(device)
    dgen = torch.Generator(device).manual_seed(seed)

    def batch_fn(step):
        idx = torch.randint(0, n_train, (batch,), generator=g)
        return [data[k][idx].to(device) for k in ("low", "queries", "targets")]

    history = train_loop(model.parameters(), lambda b: model.losses(*b, generator=dgen), batch_fn, steps,
                         lr=1e-3, progress=not quick, desc="train approach 4")
    model.eval()
    test = shape_images(64, r, generator=g)
    low = test["low"].to(device)
    scores, shown = [], {}
    for factor in (4, 8):
        size = r * factor
        truth = render_shapes(test["params"], cell_centres((size, size))).view(-1, 1, size, size)
        with torch.no_grad():
            pred = model.render(low, size).cpu()
        base = bicubic(test["low"], size)
        scores.append((factor, psnr(pred.clamp(0, 1), truth), psnr(base, truth)))
        shown[factor] = (truth, pred, base)
    drawn = model.sample_low(4, steps=50, generator=dgen)
    with torch.no_grad():
        drawn_4x, drawn_16x = model.render(drawn, 4 * r).cpu(), model.render(drawn, 16 * r).cpu()
    truth, pred, base = shown[4]
    rows = [(f"test {i}", [("low " + f"{r}^2", test["low"][i, 0]), ("bicubic 4x", base[i, 0]),
                           ("field 4x", pred[i, 0].clamp(0, 1)), ("truth", truth[i, 0])]) for i in range(2)]
    rows += [(f"drawn {i}", [(f"diffusion {r}^2", drawn[i, 0].cpu()), (f"field {4 * r}^2", drawn_4x[i, 0]),
                             (f"field {16 * r}^2", drawn_16x[i, 0])]) for i in range(2)]
    line = (f"approach 4: held-out PSNR upsampling {r}^2 to " + " / ".join(f"{f}x" for f, _, _ in scores)
            + ": field " + " / ".join(f"{m:.1f}" for _, m, _ in scores) + " dB vs bicubic "
            + " / ".join(f"{b:.1f}" for _, _, b in scores) + f" dB ({steps} steps, {history['seconds']:.0f} s)")
    plot_rows(out, rows, title=line)
    return line


def benchmark_calls(device, quick: bool) -> dict:
    """One training step (the field upsampler's MSE at random point samples and the low-
    resolution epsilon loss) on shape images, and one sampling pass (DDIM at low resolution,
    the field rendered at 8x): 64 images at 32^2, 4096 queries each, 100 steps, rendered at
    256^2 (quick: 2 at 8^2, 32 queries, 4 steps, rendered at 16^2)."""
    from .blocks import ROTATIONS, adam_step

    batch, r, queries, steps, factor = (2, 8, 32, 4, 2) if quick else (64, 32, 4096, 100, 8)
    torch.manual_seed(0)
    model = MultiscaleUpsampler(low_resolution=r).to(device)
    g = torch.Generator().manual_seed(0)
    data = [shape_images(batch, r, queries=queries, generator=g) for _ in range(ROTATIONS)]
    sets = [tuple(d[k].to(device) for k in ("low", "queries", "targets")) for d in data]
    size = factor * r
    return {"train_step": adam_step(model.parameters(), model.losses, sets),
            "sampling": lambda: model.render(model.sample_low(batch, steps=steps), size),
            "points": {"train_step": batch * queries, "sampling": batch * size * size},
            "describe": f"{batch} images at {r}^2, {queries} queries each; {steps} DDIM steps, "
                        f"rendered at {size}^2"}
