"""Approach 9: diffusion over the modulation codes of a shared neural field (functa).

    field    f(x | z) = ModulatedSiren(x; shift_l = W_l z + b_l per sine layer)   [B, M, C]
    fitting  z_0 = 0, z_{s+1} = z_s - lr * grad_z sum_b mean_x |f(x | z_s) - v(x)|^2
             for `inner_steps` steps; lr [latent_dim] learned (meta-SGD)
    training (meta-learning, as functa): the outer loss |f(x | z_S) - v|^2 trains the
             SIREN, the modulation map and lr through the inner loop (second order)
    diffusion on the standardised fitted codes z_S (cosine schedule, epsilon loss); the
             denoiser is a FusedMLP on z_t plus a projected time embedding
    sampling DDIM (fused steps) -> z -> f(x | z) at any resolution
    renoise  a code noised to timestep t0 (q_sample) and denoised back by DDIM: how much of
             a held-out image's code the diffusion model restores

The demo trains in functa's two stages: meta-learn the field, then fit every training
image's code and train the diffusion on that fixed set. losses() returns both terms, so
the two can also be trained together.

Shapes: coords [P, 2] or [B, P, 2] in [-1, 1] (x, y), values [B, P, C]; codes [B, latent_dim]
(latent_dim up to 512 runs the denoiser as one fused kernel).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..diffusion import NoiseSchedule, sample
from ..nn import ModulatedSiren
from ..ops import ddim_step, q_sample
from .blocks import (FieldModel, LatentDenoiser, RunningStandardiser, check_shape, diffusion_loss,
                     grid_coordinates, plot_rows, psnr, random_blobs, render_blobs, train_loop)

APPROACH = 9


class ModulatedField(FieldModel):
    """Approach 9's model: fit(coords, values) -> codes, decode(queries, codes), and
    sample(n, queries) through diffusion on the codes."""

    def __init__(self, channels: int = 3, latent_dim: int = 32, width: int = 64, hidden_layers: int = 3,
                 first_omega_0: float = 30.0, hidden_omega_0: float = 30.0, inner_steps: int = 3,
                 inner_lr: float = 1.0, denoiser_width: int = 128, timesteps: int = 100,
                 sample_clip: Optional[float] = 4.0):
        super().__init__()
        self.config = dict(channels=channels, latent_dim=latent_dim, width=width, hidden_layers=hidden_layers,
                           first_omega_0=first_omega_0, hidden_omega_0=hidden_omega_0,
                           inner_steps=inner_steps, inner_lr=inner_lr, denoiser_width=denoiser_width,
                           timesteps=timesteps, sample_clip=sample_clip)
        self.channels, self.latent_dim = channels, latent_dim
        self.field = ModulatedSiren(2, width, hidden_layers, channels, latent_dim=latent_dim,
                                    first_omega_0=first_omega_0, hidden_omega_0=hidden_omega_0)
        self.inner_lr = nn.Parameter(torch.full((latent_dim,), float(inner_lr)))
        self.denoiser = LatentDenoiser(latent_dim, denoiser_width)
        self.standardiser = RunningStandardiser(latent_dim)
        self.schedule = NoiseSchedule("cosine", timesteps)

    # ------------------------------------------------------------------------ inputs
    def _coords(self, coords: torch.Tensor, B: int, name: str = "coords") -> torch.Tensor:
        if coords.dim() == 2:
            check_shape(coords, name, (None, 2), f"[P, 2] or [{B}, P, 2]")
            return coords.expand(B, *coords.shape)
        check_shape(coords, name, (B, None, 2), f"[P, 2] or [{B}, P, 2]")
        return coords

    def _values(self, values: torch.Tensor, coords: torch.Tensor) -> tuple:
        check_shape(values, "values", (None, None, self.channels), f"[B, P, {self.channels}]")
        coords = self._coords(coords, values.shape[0])
        if coords.shape[1] != values.shape[1]:
            raise ValueError(f"coords: expected {values.shape[1]} points (as values), got {coords.shape[1]}")
        return coords, values

    # ------------------------------------------------------------------------- field
    def decode(self, queries: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """The fields of codes [B, latent_dim] at queries [M, 2] or [B, M, 2] -> [B, M, C]."""
        check_shape(codes, "codes", (None, self.latent_dim), f"[B, {self.latent_dim}]")
        return self.field(self._coords(queries, codes.shape[0], "queries"), codes)

    def fit(self, coords: torch.Tensor, values: torch.Tensor, steps: Optional[int] = None) -> torch.Tensor:
        """Codes [B, latent_dim] of the images values [B, P, C] at coords: `steps` (default
        inner_steps) gradient steps from zero. Differentiable (second order) while the model
        trains with gradients enabled; detached otherwise."""
        coords, values = self._values(values, coords)
        meta = self.training and torch.is_grad_enabled()
        z = torch.zeros(values.shape[0], self.latent_dim, device=values.device, dtype=values.dtype,
                        requires_grad=True)
        for _ in range(self.config["inner_steps"] if steps is None else steps):
            with torch.enable_grad():
                # per-image mean, summed over the batch: each code's step ignores the batch size
                loss = ((self.field(coords, z) - values) ** 2).mean((1, 2)).sum()
                grad, = torch.autograd.grad(loss, z, create_graph=meta)
            z = z - self.inner_lr * grad
            if not meta:
                z = z.detach().requires_grad_(True)
        return z if meta else z.detach()

    # ---------------------------------------------------------------------- training
    def reconstruction_loss(self, coords, values) -> tuple:
        """(mean squared error of the fitted fields, the fitted codes detached)."""
        coords, values = self._values(values, coords)
        z = self.fit(coords, values)
        return ((self.field(coords, z) - values) ** 2).mean(), z.detach()

    def code_diffusion_loss(self, codes: torch.Tensor, generator=None) -> torch.Tensor:
        """The epsilon loss of the denoiser on codes [B, latent_dim] (standardised)."""
        check_shape(codes, "codes", (None, self.latent_dim), f"[B, {self.latent_dim}]")
        if self.training:
            self.standardiser.update(codes)
        return diffusion_loss(self.denoiser, self.standardiser.standardise(codes), self.schedule,
                              generator=generator)

    def losses(self, coords, values, generator=None) -> dict:
        """{'reconstruction', 'diffusion'} of a batch of images values [B, P, C] at coords."""
        recon, z = self.reconstruction_loss(coords, values)
        return {"reconstruction": recon, "diffusion": self.code_diffusion_loss(z, generator)}

    def training_step(self, coords, values, generator=None) -> torch.Tensor:
        losses = self.losses(coords, values, generator)
        return losses["reconstruction"] + losses["diffusion"]

    @torch.no_grad()
    def set_code_statistics(self, codes: torch.Tensor) -> None:
        """Standardise with the exact mean / std of a fixed set of codes (functa's stage 2)."""
        self.standardiser.mean.copy_(codes.mean(0))
        self.standardiser.std.copy_(codes.std(0).clamp_min(1e-6))

    # ---------------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample_codes(self, n: int, *, steps: Optional[int] = None, generator=None) -> torch.Tensor:
        """n codes [n, latent_dim] by DDIM (fused steps)."""
        z = sample(self.denoiser, (n, self.latent_dim), self.schedule, method="ddim",
                   steps=steps or self.schedule.num_timesteps, generator=generator,
                   clip_sample=self.config["sample_clip"])
        return self.standardiser.unstandardise(z)

    @torch.no_grad()
    def renoise(self, codes: torch.Tensor, t_start: int, *, steps: Optional[int] = None,
                generator=None) -> torch.Tensor:
        """codes [B, latent_dim] (standardised) noised to timestep t_start and denoised by
        `steps` DDIM steps (default t_start + 1) down to t = 0 -> [B, latent_dim]."""
        check_shape(codes, "codes", (None, self.latent_dim), f"[B, {self.latent_dim}]")
        if not 0 <= t_start < self.schedule.num_timesteps:
            raise ValueError(f"t_start must be in [0, {self.schedule.num_timesteps}), got {t_start}")
        z = self.standardiser.standardise(codes)
        noise = torch.randn(z.shape, device=z.device, generator=generator)
        z = q_sample(z, t_start, noise, self.schedule)
        ts = torch.linspace(t_start, 0, steps or t_start + 1).round().long().unique_consecutive().tolist()
        for t, prev in zip(ts, ts[1:] + [-1]):
            eps = self.denoiser(z, torch.full((z.shape[0],), t, device=z.device))
            z, _ = ddim_step(eps, t, prev, z, self.schedule, clip_sample=self.config["sample_clip"])
        return self.standardiser.unstandardise(z)

    @torch.no_grad()
    def sample(self, n: int, queries: torch.Tensor, **kwargs) -> torch.Tensor:
        """n new fields at queries [M, 2] -> [n, M, C]."""
        return self.decode(queries, self.sample_codes(n, **kwargs))


# ------------------------------------------------------------------------------- demo


def nearest_psnr(images: torch.Tensor, references: torch.Tensor) -> float:
    """Mean over images [n, P, C] of the PSNR to the nearest of references [m, P, C]."""
    err = torch.cdist(images.flatten(1).double(), references.flatten(1).double()).square()
    nearest = err.amin(1) / images[0].numel()
    return (10 * torch.log10(1 / nearest.clamp_min(1e-12))).mean().item()


def fit_all(model: ModulatedField, coords: torch.Tensor, images: torch.Tensor, batch: int = 256,
            steps: Optional[int] = None) -> torch.Tensor:
    """The codes of all images, fitted in batches."""
    device = next(model.parameters()).device
    return torch.cat([model.fit(coords.to(device), images[i:i + batch].to(device), steps).cpu()
                      for i in range(0, len(images), batch)])


def demo(out: str, *, quick: bool = False, seed: int = 0, device: str = "cpu") -> str:
    """Functa on blob images: meta-learn the field, fit every training image's code, train
    diffusion on the codes. Reports the held-out reconstruction PSNR from fitted codes and
    from the same codes diffused (noised halfway and denoised), and how close drawn images
    come to held-out ones (PSNR to the nearest) for diffused codes against codes drawn from
    a per-dimension Gaussian fitted to the same codes."""
    size, n_train, meta_steps, diff_steps, batch = (12, 128, 10, 100, 8) if quick else (16, 1000, 300, 1500, 16)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    coords = grid_coordinates((size, size))
    images = render_blobs(random_blobs(n_train + 200, channels=3, generator=g), coords)
    train_x, test_x = images[:n_train], images[n_train:]
    # w0 = 10 on the first layer: 16^2 images hold no 30-cycle detail (held-out fit after 120
    # meta steps: 21.5 dB at w0 = 10, 17.5 dB at 30; outer learning rate 1e-3)
    model = ModulatedField(first_omega_0=10.0).to(device)
    cd = coords.to(device)
    T = model.schedule.num_timesteps

    def image_batch(step):
        return train_x[torch.randint(0, n_train, (batch,), generator=g)].to(device)

    meta = train_loop(model.parameters(), lambda v: model.reconstruction_loss(cd, v)[0], image_batch, meta_steps,
                      lr=1e-3, progress=not quick, desc="meta-learn approach 9")
    model.eval()
    codes = fit_all(model, coords, train_x)
    model.set_code_statistics(codes)
    dgen = torch.Generator(device).manual_seed(seed)
    model.train()
    diff = train_loop(model.denoiser.parameters(),
                      lambda z: diffusion_loss(model.denoiser, model.standardiser.standardise(z), model.schedule,
                                               generator=dgen),
                      lambda s: codes[torch.randint(0, n_train, (256,), generator=g)].to(device), diff_steps,
                      lr=1e-3, progress=not quick, desc="diffusion approach 9")
    model.eval()
    with torch.no_grad():
        test_codes = fit_all(model, coords, test_x).to(device)
        fitted = model.decode(cd, test_codes).cpu()
        renoised = model.decode(cd, model.renoise(test_codes, T // 2, steps=25, generator=dgen)).cpu()
        drawn_codes = model.sample_codes(len(test_x), steps=50, generator=dgen)
        drawn = model.decode(cd, drawn_codes).cpu()
        gauss_codes = codes.mean(0) + codes.std(0) * torch.randn(len(test_x), model.latent_dim, generator=g)
        gauss = model.decode(cd, gauss_codes.to(device)).cpu()
        fine = model.decode(grid_coordinates((4 * size,) * 2, device), drawn_codes[:4]).cpu()
    fit_psnr, renoised_psnr = psnr(fitted.clamp(0, 1), test_x), psnr(renoised.clamp(0, 1), test_x)
    drawn_psnr, gauss_psnr = nearest_psnr(drawn.clamp(0, 1), test_x), nearest_psnr(gauss.clamp(0, 1), test_x)

    def img(x):
        return x.view(-1, size, size, 3)

    def scored(x):  # each panel titled with its PSNR against the held-out image
        return [(f"{psnr(x[i].clamp(0, 1), test_x[i]):.1f} dB", img(x)[i]) for i in range(4)]

    rows = [("held-out", [(f"image {i}", img(test_x)[i]) for i in range(4)]),
            ("fitted codes", scored(fitted)),
            (f"noised to t={T // 2}, denoised", scored(renoised)),
            ("diffused codes", [(f"sample {i}", img(drawn)[i]) for i in range(4)]),
            (f"same, {4 * size}^2", [(f"sample {i}", fine[i].view(4 * size, 4 * size, 3)) for i in range(4)]),
            ("Gaussian codes", [(f"baseline {i}", img(gauss)[i]) for i in range(4)])]
    line = (f"approach 9: held-out reconstruction PSNR from fitted modulations {fit_psnr:.1f} dB, from the "
            f"same modulations diffused (noised to t={T // 2} of {T}, denoised) {renoised_psnr:.1f} dB; drawn "
            f"images' PSNR to the nearest held-out image: diffused modulations {drawn_psnr:.1f} dB vs "
            f"per-dimension Gaussian modulations {gauss_psnr:.1f} dB ({meta_steps} + {diff_steps} steps, "
            f"{meta['seconds'] + diff['seconds']:.0f} s)")
    plot_rows(out, rows, title=line)
    return line


def benchmark_calls(device, quick: bool) -> dict:
    """One training step (the meta-learned fit: inner steps on the codes, second order, and
    the code diffusion loss) on blob images, and one sampling pass (DDIM on the codes, the
    fields decoded at 4x): 64 images of 64^2, 100 steps, decoded at 256^2 (quick: 2 of 6^2,
    4 steps, decoded at 12^2)."""
    from .blocks import ROTATIONS, adam_step

    batch, size, steps, factor = (2, 6, 4, 2) if quick else (64, 64, 100, 4)
    torch.manual_seed(0)
    model = ModulatedField().to(device)
    g = torch.Generator().manual_seed(0)
    coords = grid_coordinates((size, size))
    sets = [(coords.to(device), render_blobs(random_blobs(batch, channels=3, generator=g), coords).to(device))
            for _ in range(ROTATIONS)]
    fine = grid_coordinates((factor * size,) * 2, device)
    return {"train_step": adam_step(model.parameters(), model.losses, sets),
            "sampling": lambda: model.sample(batch, fine, steps=steps),
            "points": {"train_step": batch * size * size, "sampling": batch * fine.shape[0]},
            "describe": f"{batch} images of {size}^2, {model.config['inner_steps']} inner steps; "
                        f"{steps} DDIM steps, decoded at {factor * size}^2"}
