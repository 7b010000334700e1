"""Approach 2: diffusion directly on the weights of one small SIREN per signal
(HyperDiffusion-style), decoded through fused_mlp's per-sample weights.

    1. fit:     theta_b = argmin_theta || SIREN_theta(coords) - signal_b ||^2 for every
                signal b, all networks fitted together from ONE shared initialisation
                (so their weights share a basin and are comparable coordinate by
                coordinate); one fused_mlp call per step evaluates the whole batch of
                different networks (weights [B, out, in], biases [B, out]).
    2. diffuse: theta standardised per coordinate (mean / std over the data set) is a
                P-vector; DDPM (cosine schedule, T = 100) with a denoiser predicting
                theta_0 ("sample" prediction), sampled by the fused DDIM loop.
    3. decode:  each generated theta is a network; decode(theta [B, P], coords) runs all B
                networks as ONE fused kernel at any set of coordinates.

The flattened layout of theta is the template Siren's layers in order, each layer
W_l.flatten() (out x in, row-major) then b_l; P = sum_l out_l (in_l + 1).

The denoiser maps x_t [B, P] to a bottleneck of k dimensions (one Linear; k = 64 by
default), adds a projected sinusoidal embedding of t, runs a FusedMLP (k -> width -> k,
SiLU) and maps back to P (one Linear). Predicting theta_0 through a bottleneck suits the
data: fitted weights of a smooth signal family lie near a low-dimensional set, while noise
fills all P dimensions. fused_mlp's own limits decide what is fused (in, hidden and out up
to 512 today); a wider denoiser runs its reference, with fused_mlp's one-line warning.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import nn

from ..diffusion import NoiseSchedule, sample
from ..nn import Siren
from ..ops import fused_mlp, q_sample
from .blocks import FieldModel, LatentDenoiser, check_shape, mse, plot_rows, train_loop
from .latent_field import signal_grid, sine_waves

APPROACH = 2


class ParameterDenoiser(nn.Module):
    """theta_0 prediction on standardised weights: Up(LatentDenoiser(Down(x_t), t)), the
    LatentDenoiser being FusedMLP(h + P(emb(t))) at the bottleneck width."""

    def __init__(self, num_params: int, bottleneck: int, width: int):
        super().__init__()
        # No upper bound here: fused_mlp decides which widths it fuses (and says so once
        # when it falls back to its reference), so the model never outlives the kernel's limits.
        if bottleneck < 1:
            raise ValueError(f"bottleneck must be >= 1, got {bottleneck}")
        if width < 1:
            raise ValueError(f"denoiser_width must be >= 1, got {width}")
        self.down = nn.Linear(num_params, bottleneck)
        self.core = LatentDenoiser(bottleneck, width)
        self.up = nn.Linear(bottleneck, num_params)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        return self.up(self.core(self.down(x), t))


class ParameterDiffusion(FieldModel):
    """Approach 2: a SIREN template, per-signal fitted weights, and a DDPM on those weights.

    Args:
        hidden / hidden_layers: each signal's SIREN, 1 -> hidden x (hidden_layers + 1) -> 1.
        w0: its sine frequency (first and hidden layers; the toy signals hold at most
            ~4 half-cycles on [-1, 1], so 10 rather than SIREN's 30).
        bottleneck: the denoiser's fused width in and out (any >= 1; fused_mlp fuses up to
            its own limits, ops.fused_mlp.MAX_IN / MAX_OUT, and runs its reference beyond).
        denoiser_width: the denoiser's hidden width. timesteps: T of the cosine schedule.
        sample_clip: theta_0 clip while sampling, in standardised units (None: off).
    """

    def __init__(self, hidden: int = 16, hidden_layers: int = 1, w0: float = 10.0,
                 bottleneck: int = 64, denoiser_width: int = 256, timesteps: int = 100,
                 sample_clip: Optional[float] = 5.0):
        super().__init__()
        self.config = dict(hidden=hidden, hidden_layers=hidden_layers, w0=w0, bottleneck=bottleneck,
                           denoiser_width=denoiser_width, timesteps=timesteps, sample_clip=sample_clip)
        # the template: its layout defines theta, its initial weights are every fit's start
        self.template = Siren(1, hidden, hidden_layers, 1, first_omega_0=w0, hidden_omega_0=w0)
        self.template.requires_grad_(False)
        self.shapes: List[Tuple[int, int]] = [tuple(l.weight.shape) for l in self.template.linears()]
        self.num_params = sum(o * (i + 1) for o, i in self.shapes)
        self.denoiser = ParameterDenoiser(self.num_params, bottleneck, denoiser_width)
        self.schedule = NoiseSchedule("cosine", timesteps)
        self.register_buffer("theta_mean", torch.zeros(self.num_params))
        self.register_buffer("theta_std", torch.ones(self.num_params))

    # ------------------------------------------------------------- theta <-> networks

    def initial_theta(self) -> torch.Tensor:
        """The template's weights flattened, [P]: every fit starts here."""
        parts = [torch.cat([l.weight.flatten(), l.bias]) for l in self.template.linears()]
        return torch.cat(parts).detach().clone()

    def unflatten(self, theta: torch.Tensor) -> Tuple[list, list]:
        """theta [B, P] -> (weights [B, out, in] per layer, biases [B, out] per layer)."""
        self._check_theta(theta)
        weights, biases, at = [], [], 0
        for out, inp in self.shapes:
            weights.append(theta[:, at:at + out * inp].reshape(-1, out, inp))
            at += out * inp
            biases.append(theta[:, at:at + out])
            at += out
        return weights, biases

    def _check_theta(self, theta: torch.Tensor) -> None:
        check_shape(theta, "theta", (None, self.num_params), f"[B, {self.num_params}] (flattened weights)")

    def decode(self, theta: torch.Tensor, coords) -> torch.Tensor:
        """Evaluate B different networks, theta [B, P], at coords [N, 1], [B, N, 1] or an
        int resolution (linspace(-1, 1)), as one fused_mlp call; returns [B, N]."""
        self._check_theta(theta)
        if isinstance(coords, int):
            coords = signal_grid(coords, theta.device).to(theta.dtype)
        if coords.dim() == 2:
            coords = coords.expand(theta.shape[0], -1, -1)
        if coords.dim() != 3 or coords.shape[0] != theta.shape[0] or coords.shape[2] != 1:
            raise ValueError(f"coords: expected [N, 1] or [{theta.shape[0]}, N, 1], got {list(coords.shape)}")
        weights, biases = self.unflatten(theta)
        args = self.template.fused_mlp_arguments()
        args.update(weights=weights, biases=biases)
        return fused_mlp(coords, **args).squeeze(-1)

    def fit(self, signals: torch.Tensor, *, steps: int = 300, lr: float = 1e-3,
            progress: bool = False) -> Tuple[torch.Tensor, List[float]]:
        """Fit one network per signal (signals [B, N] on linspace(-1, 1, N)), all from the
        template's weights, by Adam on the batch of per-sample weights. Returns (theta
        [B, P], per-step mean MSE)."""
        check_shape(signals, "signals", (None, None), "[B, N]")
        theta = self.initial_theta().to(signals.device).repeat(signals.shape[0], 1).requires_grad_(True)
        opt = torch.optim.Adam([theta], lr=lr)
        coords = signal_grid(signals.shape[1], signals.device).to(signals.dtype)
        history, bar = [], range(steps)
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(bar, desc="fit networks", unit="step")
        for _ in bar:
            # per-network mean, summed: each network's gradient ignores the batch size
            per_net = ((self.decode(theta, coords) - signals) ** 2).mean(1)
            opt.zero_grad()
            per_net.sum().backward()
            opt.step()
            history.append(per_net.mean().item())
        return theta.detach(), history

    # ---------------------------------------------------------------------- diffusion

    @torch.no_grad()
    def set_statistics(self, theta: torch.Tensor) -> None:
        """Per-coordinate mean / std of the fitted weights (the diffusion's data scale)."""
        self._check_theta(theta)
        self.theta_mean.copy_(theta.mean(0))
        self.theta_std.copy_(theta.std(0).clamp_min(1e-4) if len(theta) > 1 else torch.ones_like(self.theta_std))

    def standardise(self, theta: torch.Tensor) -> torch.Tensor:
        return (theta - self.theta_mean) / self.theta_std

    def unstandardise(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.theta_std + self.theta_mean

    def loss(self, theta: torch.Tensor, generator=None) -> torch.Tensor:
        """DDPM loss of a batch of fitted weights theta [B, P]: MSE of the theta_0
        prediction in standardised units, at random t."""
        self._check_theta(theta)
        x0 = self.standardise(theta)
        B = x0.shape[0]
        t = torch.randint(0, self.config["timesteps"], (B,), device=x0.device, generator=generator)
        noise = torch.randn(x0.shape, device=x0.device, generator=generator)
        x_t = q_sample(x0, t, noise, self.schedule, validate=False)
        return ((self.denoiser(x_t, t) - x0) ** 2).mean()

    training_step = loss

    @torch.no_grad()
    def generate(self, n: int, *, steps: Optional[int] = None, generator=None) -> torch.Tensor:
        """n new networks' weights [n, P] by DDIM on the standardised weights."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        x = sample(self.denoiser, (n, self.num_params), self.schedule, method="ddim",
                   steps=steps or self.config["timesteps"], generator=generator,
                   prediction_type="sample", clip_sample=self.config["sample_clip"])
        return self.unstandardise(x)


# ------------------------------------------------------------------------------ demo


def nearest_mse(fields: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Per field [n, N], the MSE to its nearest reference [m, N], [n]."""
    return torch.cdist(fields.double(), references.double()).square().div(fields.shape[1]).min(1).values


def demo(out: str, *, quick: bool = False, seed: int = 0, device: str = "cpu") -> str:
    """Fit one SIREN per toy sine wave, train the weight diffusion, generate new networks and
    decode them at 32 and 1024 points. Metric: each generated network's MSE to its nearest
    held-out signal, against the same for fitted networks of training signals (what a
    perfect generator reaches) and for weights drawn from a per-weight Gaussian of the
    fitted ones (the plain baseline)."""
    n_train, n_held, length = (200, 64, 64) if quick else (1000, 200, 64)
    fit_steps, train_steps, batch = (80, 150, 64) if quick else (300, 3000, 128)
    g = torch.Generator().manual_seed(seed)
    signals = sine_waves(n_train + n_held, length, generator=g).to(device)
    torch.manual_seed(seed)
    model = ParameterDiffusion().to(device)
    theta, fit_history = model.fit(signals, steps=fit_steps, lr=3e-3, progress=not quick)
    train, held = theta[:n_train], signals[n_train:]
    model.set_statistics(train)
    order = torch.Generator().manual_seed(seed + 1)
    history = train_loop(model.denoiser.parameters(), model.loss,
                         lambda step: train[torch.randint(0, n_train, (batch,), generator=order)],
                         train_steps, lr=1e-3, progress=not quick, desc="train approach 2")
    n_gen = n_held
    gen = model.generate(n_gen, steps=50, generator=torch.Generator(device).manual_seed(seed))
    gaussian = model.theta_mean + model.theta_std * torch.randn(n_gen, model.num_params, generator=g).to(device)
    with torch.no_grad():
        nn_gen = nearest_mse(model.decode(gen, length), held)
        nn_fit = nearest_mse(model.decode(train[:n_gen], length), held)
        nn_gauss = nearest_mse(model.decode(gaussian, length), held)
        fine = model.decode(gen[:4], 1024).cpu()
        coarse = model.decode(gen[:4], 32).cpu()
        refit = model.decode(theta[n_train:n_train + 4], 1024).cpu()
    fit_mse = mse(model.decode(theta[n_train:], length), held)
    _plot(out, held[:4].cpu(), refit, fine, coarse, nn_gen[:4])
    return (f"approach 2: nearest held-out signal MSE of {n_gen} generated networks "
            f"{nn_gen.mean():.4f} (fitted networks {nn_fit.mean():.4f}, per-weight Gaussian "
            f"baseline {nn_gauss.mean():.4f}); fit MSE {fit_mse:.2e}; diffusion loss "
            f"{history['loss'][0]:.3f} -> {sum(history['loss'][-50:]) / len(history['loss'][-50:]):.3f}")


def _plot(out, held, refit, fine, coarse, nn_gen) -> str:
    t_sig, t_fine, t_coarse = (signal_grid(n).squeeze(-1) for n in (held.shape[1], 1024, 32))

    def fitted(i):
        def draw(ax):
            ax.plot(t_sig, held[i], "k.", ms=3, label="signal")
            ax.plot(t_fine, refit[i], color="C0", label="its fitted network")
            ax.set_ylim(-1.2, 1.2)
            if i == 0:
                ax.legend(fontsize=6)
        return draw

    def generated(i):
        def draw(ax):
            ax.plot(t_fine, fine[i], color="C1", label="1024 pts")
            ax.plot(t_coarse, coarse[i], "o", ms=2, color="C3", label="same network, 32 pts")
            ax.set_ylim(-1.2, 1.2)
            if i == 0:
                ax.legend(fontsize=6)
        return draw

    rows = [("held-out", [(f"fit {i}", fitted(i)) for i in range(len(held))]),
            ("generated", [(f"sample {i}: nearest MSE {nn_gen[i]:.3f}", generated(i))
                           for i in range(len(fine))])]
    return plot_rows(out, rows, title="approach 2: diffusion on SIREN weights", cell=2.6)


def benchmark_calls(device, quick: bool) -> dict:
    """One training step (a fitting step of a batch of per-signal networks, all decoded by
    one fused call, plus a diffusion step of the denoiser on their weights) and one sampling
    pass (DDIM on the weights, then decoding every network): 512 networks, 256 samples, 100
    steps (quick: 4 networks, 32 samples, 5 steps)."""
    from .blocks import ROTATIONS, adam_step

    n, length, steps = (4, 32, 5) if quick else (512, 256, 100)
    torch.manual_seed(0)
    model = ParameterDiffusion().to(device)
    theta = model.initial_theta().to(device).repeat(n, 1).requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    sets = [(sine_waves(n, length, generator=g).to(device),) for _ in range(ROTATIONS)]

    def losses(signals):
        fit = ((model.decode(theta, length) - signals) ** 2).mean(1).sum()
        return {"fit": fit, "diffusion": model.loss(theta.detach())}

    return {"train_step": adam_step([theta, *model.denoiser.parameters()], losses, sets),
            "sampling": lambda: model.decode(model.generate(n, steps=steps), length),
            "points": {"train_step": n * length, "sampling": n * length},
            "describe": f"{n} networks x {length} samples, {steps} DDIM steps"}
