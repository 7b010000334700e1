"""Approach 3: a score-based neural field. A network reads the noisy signal x_t (and the
sparse observations, if any) and answers, at any coordinate, the denoised value; the score
per coordinate follows from it, training is denoising score matching, sampling is the
predictor-corrector (Langevin) loop of the fused steps, and sparse observations condition
it twice: the network reads them, and the sampler clamps them.

Shapes: the diffusion state is the signal on a grid of G points, x_t [B, G] at
linspace(-1, 1, G); queries are any coords [N, 1] or [B, N, 1] in [-1, 1]; observations
are (values [B, G], mask [B, G] bool), grid entries known exactly.

    features  F = ConvNet([x_t, y * m, m], emb(t)): dilated residual 1-D convolutions
              (receptive field the whole grid) and a pooled global term, a feature line
              [B, C, G]; y * m, m are the observed values and the mask (zeros: none)
    field     D(q; x_t, t) = FusedMLP([grid_lookup(q, F), q]) -- linear reads of the
              feature line at any coordinate, then one fused MLP per point: the x_0
              estimate at q
    score     s(x_t, coords, t | y) = (sqrt(abar_t) D(coords) - x_t) / (1 - abar_t) at the
              grid (Tweedie: the score of the noised data given the denoised estimate)
    loss      denoising score matching, E || s - (-eps / sqrt(1 - abar_t)) ||^2 weighted by
              (1 - abar_t) min(snr_t, 5) / snr_t, which equals min(snr_t, 5) ||D - x_0||^2:
              the min-SNR weighting (the unweighted form is dominated by the smallest t).
              D is trained at every point of a finer grid (grid points and the points
              between them), so the field is right between grid points too. Each training
              signal shows the network a random subset of its grid values (a fraction
              drawn from U(0, max_observed), none for some): one network is the
              unconditional score and the conditional one for any observation pattern.
    sampling  x_T ~ N(0, I); for t = T-1 .. 0: pc_step (Langevin corrector, VP reverse-
              diffusion predictor; score_sde's PC sampler); the sample is the field
              D(q; x_0, 0) at any resolution.
    inverse   observed grid values y at a mask: the network reads them at every step (so
              the unobserved entries are drawn consistent with them, which clamping alone
              does not achieve: an unconditional score never sees that an entry was
              replaced, and leaves a spike there), and the observed entries of x are
              replaced by q_sample(y, t - 1) after every predictor-corrector step
              (Song et al.'s imputation), and by y after the last.
    decode    the field D(q; x_0, 0, y) plus the linear interpolation of its residual
              x_0 - D(grid) (a projection at t = 0): the field goes through the sampled
              grid state exactly, so through the observations, at any resolution.

The schedule is score_sde's discrete VP: linear betas 0.1 / T .. 20 / T (T = 100:
1e-3 .. 0.2, abar_T ~ e^-10).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from ..diffusion import NoiseSchedule
from ..nn import FusedMLP
from ..ops import grid_lookup, pc_step, q_sample
from .blocks import FieldModel, check_shape, mse, plot_rows, timestep_embedding, train_loop
from .latent_field import interpolate_observations, signal_grid, toy_signals

APPROACH = 3


class ScoreNet(nn.Module):
    """x_t [B, G], t [B], observations (values [B, G], mask [B, G] bool, or None) -> the
    feature line [B, C, G]: the three input channels x_t, y * m, m, then residual dilated
    convolutions, each block shifted by the time embedding, plus a pooled (global) term."""

    def __init__(self, channels: int, dilations: Sequence[int], kernel: int = 5, time_dim: int = 64):
        super().__init__()
        self.time_dim = time_dim
        self.inp = nn.Conv1d(3, channels, kernel, padding=kernel // 2)
        self.time = nn.Sequential(nn.Linear(time_dim, channels), nn.SiLU(), nn.Linear(channels, channels))
        self.convs = nn.ModuleList(nn.Conv1d(channels, channels, kernel, dilation=d, padding=d * (kernel // 2),
                                             padding_mode="replicate") for d in dilations)
        self.pooled = nn.ModuleList(nn.Linear(channels, channels) for _ in dilations)
        self.time_shift = nn.ModuleList(nn.Linear(channels, channels) for _ in dilations)

    def forward(self, x: torch.Tensor, t: torch.Tensor, observations=None) -> torch.Tensor:
        temb = self.time(timestep_embedding(t, self.time_dim))
        if observations is None:
            known = torch.zeros_like(x)
            h = torch.stack([x, known, known], dim=1)
        else:
            values, mask = observations
            m = mask.to(x.dtype)
            # where() rather than values * m: an unobserved entry's value (even NaN) is unread
            h = torch.stack([x, torch.where(mask, values, 0.0).to(x.dtype), m], dim=1)
        h = self.inp(h)
        for conv, pooled, shift in zip(self.convs, self.pooled, self.time_shift):
            u = conv(torch.nn.functional.silu(h)) + pooled(h.mean(-1)).unsqueeze(-1) + shift(temb).unsqueeze(-1)
            h = h + u
        return h


class ScoreField(FieldModel):
    """Approach 3: s(x_t, coords, t | y) from a field D(q; x_t, t, y) over a feature line.

    Args:
        grid: G, the diffusion state's points. channels: C of the feature line (<= 63:
            the fused MLP's input is C + 1 wide). width: the field MLP's hidden width.
        dilations: one residual conv block each (the default covers a 64-point grid).
        timesteps / beta_start / beta_end: the VP schedule. max_snr: the loss weight cap.
        max_observed: training shows each signal's network a random fraction of its grid
            values, drawn from U(0, max_observed), as observations.
    """

    def __init__(self, grid: int = 64, channels: int = 32, width: int = 64,
                 dilations: Sequence[int] = (1, 2, 4, 8), timesteps: int = 100,
                 beta_start: float = 1e-3, beta_end: float = 0.2, max_snr: float = 5.0,
                 max_observed: float = 0.5):
        super().__init__()
        if grid < 2:
            raise ValueError(f"grid must be >= 2, got {grid}")
        if not 1 <= channels <= 63:
            raise ValueError(f"channels must be in 1..63 (the fused MLP reads channels + 1), got {channels}")
        if not 0.0 <= max_observed <= 1.0:
            raise ValueError(f"max_observed must be in [0, 1] (a fraction of the grid), got {max_observed}")
        self.config = dict(grid=grid, channels=channels, width=width, dilations=list(dilations),
                           timesteps=timesteps, beta_start=beta_start, beta_end=beta_end, max_snr=max_snr,
                           max_observed=max_observed)
        self.grid = grid
        self.net = ScoreNet(channels, dilations)
        self.mlp = FusedMLP(channels + 1, width, 1, hidden_layers=2, activation="silu")
        self.schedule = NoiseSchedule("linear", timesteps, beta_start=beta_start, beta_end=beta_end)

    # ------------------------------------------------------------------------ the field

    def _coords(self, coords, batch: int, like: torch.Tensor) -> torch.Tensor:
        if isinstance(coords, int):
            coords = signal_grid(coords, like.device).to(like.dtype)
        if coords.dim() == 2:
            coords = coords.expand(batch, -1, -1)
        check_shape(coords, "coords", (batch, None, 1), f"[N, 1] or [{batch}, N, 1] (or an int resolution)")
        return coords

    def _check_state(self, x: torch.Tensor, name: str = "x_t") -> None:
        check_shape(x, name, (None, self.grid), f"[B, {self.grid}] (the signal on the grid)")

    def check_observations(self, observations, batch: int, name: str = "observations"):
        """observations: None, or (values [batch, G], mask [batch, G] bool); returned as a tuple."""
        if observations is None:
            return None
        if not isinstance(observations, (tuple, list)) or len(observations) != 2:
            raise TypeError(f"{name}: expected (values, mask), got {type(observations).__name__}")
        values, mask = observations
        check_shape(values, f"{name}[0]", (batch, self.grid), f"[{batch}, {self.grid}] (values on the grid)")
        check_shape(mask, f"{name}[1]", (batch, self.grid), f"[{batch}, {self.grid}] (bool mask)")
        if mask.dtype != torch.bool:
            raise TypeError(f"{name}[1]: expected a bool mask, got {mask.dtype}")
        return values, mask

    def field_at(self, features: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """D at coords [B, N, 1] from a feature line [B, C, G]: [B, N]."""
        f = grid_lookup(coords, [[features]], [(0,)], align_corners=True)
        return self.mlp(torch.cat([f, coords], dim=-1)).squeeze(-1)

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, coords, observations=None) -> torch.Tensor:
        """The field D(coords; x_t, t, y): the x_0 estimate at coords ([N, 1], [B, N, 1] or an
        int resolution) given the observations (values, mask) if any, [B, N]."""
        self._check_state(x_t)
        observations = self.check_observations(observations, x_t.shape[0])
        t = self._timesteps(t, x_t.shape[0], x_t.device)
        return self.field_at(self.net(x_t, t, observations), self._coords(coords, x_t.shape[0], x_t))

    def score(self, x_t: torch.Tensor, t: torch.Tensor, observations=None) -> torch.Tensor:
        """s(x_t, grid coords, t | y) = (sqrt(abar_t) D - x_t) / (1 - abar_t), [B, G]."""
        t = self._timesteps(t, x_t.shape[0], x_t.device)
        abar = self.schedule.alphas_cumprod[t].unsqueeze(-1)
        return (abar.sqrt() * self.denoise(x_t, t, self.grid, observations) - x_t) / (1 - abar)

    def _timesteps(self, t, batch: int, device) -> torch.Tensor:
        t = torch.as_tensor(t, device=device)
        if t.dim() == 0:
            t = t.expand(batch)
        check_shape(t, "t", (batch,), f"[{batch}] (one integer timestep per sample)")
        return t.long()

    # --------------------------------------------------------------------- training

    def fine_resolution(self, factor: int) -> int:
        """The finer grid whose every factor-th point is a grid point."""
        return (self.grid - 1) * factor + 1

    def observation_mask(self, batch: int, device=None, generator=None) -> torch.Tensor:
        """Training's observation patterns, bool [batch, G]: per row a fraction f ~ U(0,
        max_observed), then each grid point observed with probability f (rows with none
        train the unconditional score)."""
        fraction = self.config["max_observed"] * torch.rand(batch, 1, device=device, generator=generator)
        return torch.rand(batch, self.grid, device=device, generator=generator) < fraction

    def loss(self, signals: torch.Tensor, generator=None) -> torch.Tensor:
        """Denoising score matching (min-SNR weighted, see the module docstring) of
        signals [B, R] on linspace(-1, 1, R), R = (G - 1) k + 1: the grid is every k-th point,
        the field is scored at all R, given a random subset of the grid values."""
        check_shape(signals, "signals", (None, None), "[B, R]")
        B, R = signals.shape
        if (R - 1) % (self.grid - 1):
            raise ValueError(f"signals: expected R = (G - 1) k + 1 points (G = {self.grid}), got {R}")
        x0 = signals[:, ::(R - 1) // (self.grid - 1)]
        t = torch.randint(0, self.schedule.num_timesteps, (B,), device=x0.device, generator=generator)
        noise = torch.randn(x0.shape, device=x0.device, generator=generator)
        mask = self.observation_mask(B, x0.device, generator)
        x_t = q_sample(x0, t, noise, self.schedule, validate=False)
        abar = self.schedule.alphas_cumprod[t]
        weight = (abar / (1 - abar)).clamp(max=self.config["max_snr"]).unsqueeze(-1)
        return (weight * (self.denoise(x_t, t, R, (x0, mask)) - signals) ** 2).mean()

    training_step = loss

    # --------------------------------------------------------------------- sampling

    @torch.no_grad()
    def sample(self, n: int, *, observations: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
               snr: float = 0.16, corrector_steps: int = 1, generator=None) -> torch.Tensor:
        """n samples' grid states x_0 [n, G] by the predictor-corrector loop; decode with
        decode(state, coords, observations) at any resolution. observations = (values
        [n, G], mask [n, G] bool): the network reads them and the observed grid entries are
        clamped (see the module docstring)."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        observations = self.check_observations(observations, n)
        device = self.schedule.device

        def score(x, t):
            return self.score(x, t, observations)

        x = torch.randn(n, self.grid, device=device, generator=generator)
        for step in range(self.schedule.num_timesteps - 1, -1, -1):
            t = torch.full((n,), step, device=device, dtype=torch.long)
            x, x_mean = pc_step(score, x, t, self.schedule, snr=snr,
                                n_corrector_steps=corrector_steps, generator=generator, validate=False)
            if step == 0:
                x = x_mean  # the last step's noise is not part of the sample
            if observations is not None:
                values, mask = observations
                x = torch.where(mask, self._noised(values, step - 1, generator), x)
        return x

    def _noised(self, values: torch.Tensor, step: int, generator) -> torch.Tensor:
        if step < 0:
            return values
        noise = torch.randn(values.shape, device=values.device, generator=generator)
        return q_sample(values, step, noise, self.schedule, validate=False)

    def decode(self, state: torch.Tensor, coords, observations=None, project: bool = True) -> torch.Tensor:
        """The sampled field at any coords, [B, N]: D(coords; x_0, t = 0, y) plus, with
        project, the linear interpolation of the residual x_0 - D(grid) (the projection
        at t = 0): the field then passes exactly through the sampled grid state, which
        holds the observations exactly; the network's own field is within its training
        error of them (project=False gives it). Pass the observations the state was
        sampled with."""
        self._check_state(state, "state")
        observations = self.check_observations(observations, state.shape[0])
        t = self._timesteps(0, state.shape[0], state.device)
        features = self.net(state, t, observations)
        coords = self._coords(coords, state.shape[0], state)
        field = self.field_at(features, coords)
        if not project:
            return field
        residual = state - self.field_at(features, self._coords(self.grid, state.shape[0], state))
        return field + grid_lookup(coords, [[residual.unsqueeze(1)]], [(0,)], align_corners=True).squeeze(-1)


# ------------------------------------------------------------------------------ demo


def demo(out: str, *, quick: bool = False, seed: int = 0, device: str = "cpu") -> str:
    """Train on toy signals (sine waves and Fourier series), then solve an inverse problem:
    held-out signals observed at 8 of the 64 grid points, 4 conditioned samples each,
    decoded at 127 and 1024 points. Metric: the sampled field's RMSE at the observed
    points (and the network's own field's, before the projection at t = 0), and its MSE
    to the true signal elsewhere (one sample, and the mean of the 4) against linear
    interpolation of the observations (the plain baseline)."""
    n_train, n_held, observed, draws = (400, 8, 8, 2) if quick else (2000, 32, 8, 4)
    steps, batch = (60, 32) if quick else (2000, 32)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = ScoreField().to(device)
    R = model.fine_resolution(2)
    signals = toy_signals(n_train + n_held, R, generator=g).to(device)
    train, held = signals[:n_train], signals[n_train:]
    history = train_loop(model.parameters(), model.loss,
                         lambda step: train[torch.randint(0, n_train, (batch,), generator=g).to(device)],
                         steps, lr=2e-3, progress=not quick, desc="train approach 3")
    grid_mask = torch.zeros(n_held, model.grid, dtype=torch.bool)
    grid_mask.scatter_(1, torch.rand(n_held, model.grid, generator=g).argsort(1)[:, :observed], True)
    grid_mask = grid_mask.to(device).repeat(draws, 1)
    truth = held.repeat(draws, 1)
    observations = (truth[:, ::2], grid_mask)
    state = model.sample(n_held * draws, observations=observations,
                         generator=torch.Generator(device).manual_seed(seed))
    with torch.no_grad():
        fine = model.decode(state, R, observations)
        raw = model.decode(state, R, observations, project=False)
        dense = model.decode(state[:4], 1024, (observations[0][:4], grid_mask[:4])).cpu()
    fine_mask = torch.zeros_like(truth, dtype=torch.bool)
    fine_mask[:, ::2] = grid_mask
    obs_rmse = ((fine - truth)[fine_mask] ** 2).mean().sqrt().item()
    raw_rmse = ((raw - truth)[fine_mask] ** 2).mean().sqrt().item()
    one = mse(fine[~fine_mask], truth[~fine_mask])
    avg = fine.view(draws, n_held, R).mean(0)
    avg_mse = mse(avg[~fine_mask[:n_held]], held[~fine_mask[:n_held]])
    linear = interpolate_observations(held, fine_mask[:n_held])
    lin_mse = mse(linear[~fine_mask[:n_held]], held[~fine_mask[:n_held]])
    _plot(out, held[:4].cpu(), fine_mask[:4].cpu(), fine.view(draws, n_held, R)[:, :4].cpu(), dense,
          linear[:4].cpu())
    return (f"approach 3: {observed} of {model.grid} grid points observed: sampled field's RMSE at the "
            f"observed points {obs_rmse:.4f} (the network's field before the projection at t = 0: "
            f"{raw_rmse:.4f}); MSE elsewhere {one:.4f} per sample, {avg_mse:.4f} for the "
            f"mean of {draws} samples, linear-interpolation baseline {lin_mse:.4f}; DSM loss "
            f"{history['loss'][0]:.3f} -> {sum(history['loss'][-20:]) / len(history['loss'][-20:]):.3f}")


def _plot(out, held, mask, samples, dense, linear) -> str:
    x, x_dense = signal_grid(held.shape[1]).squeeze(-1), signal_grid(dense.shape[1]).squeeze(-1)

    def panel(i):
        def draw(ax):
            ax.plot(x, held[i], color="0.7", label="true signal")
            ax.plot(x, linear[i], ":", color="C2", label="linear interpolation")
            for k in range(1, samples.shape[0]):
                ax.plot(x, samples[k, i], color="C1", lw=0.7, alpha=0.7)
            ax.plot(x_dense, dense[i], color="C1", label="conditioned samples (1024 pts)")
            ax.plot(x[mask[i]], held[i][mask[i]], "ko", ms=3, label="observed")
            ax.set_ylim(-1.5, 1.5)
            if i == 0:
                ax.legend(fontsize=5, loc="lower left")
        return draw

    return plot_rows(out, [("held-out", [(f"signal {i}", panel(i)) for i in range(len(held))])],
                     title="approach 3: score-based field, samples conditioned on 8 observations", cell=3.0)


def benchmark_calls(device, quick: bool) -> dict:
    """One denoising-score-matching step on a batch of toy signals and one sampling pass
    (the predictor-corrector loop over all T steps, then the field at the fine grid):
    batch 256, grid 64, T = 100 (quick: 4, grid 16 and a narrower net, T = 4)."""
    from .blocks import ROTATIONS, adam_step

    torch.manual_seed(0)
    if quick:
        batch, model = 4, ScoreField(grid=16, channels=8, width=16, dilations=(1, 2), timesteps=4)
    else:
        batch, model = 256, ScoreField()
    model = model.to(device)
    R = model.fine_resolution(2)
    g = torch.Generator().manual_seed(0)
    sets = [(toy_signals(batch, R, generator=g).to(device),) for _ in range(ROTATIONS)]

    def sampling():
        with torch.no_grad():
            return model.decode(model.sample(batch), R)

    return {"train_step": adam_step(model.parameters(), model.loss, sets),
            "sampling": sampling,
            "points": {"train_step": batch * R, "sampling": batch * R},
            "describe": f"batch {batch}, grid {model.grid}, field at {R} points, "
                        f"T = {model.schedule.num_timesteps} predictor-corrector steps"}
