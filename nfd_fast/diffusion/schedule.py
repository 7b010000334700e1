"""Noise schedules, built as the common scheduler library builds them."""
from __future__ import annotations

import math

import torch

SCHEDULES = ("linear", "scaled_linear", "cosine")


class NoiseSchedule:
    """betas, alphas = 1 - betas and alphas_cumprod, float32 tensors on one device.

    kind: "linear" (linspace(beta_start, beta_end, T)), "scaled_linear"
    (linspace(sqrt(beta_start), sqrt(beta_end), T)^2) or "cosine" (squaredcos_cap_v2:
    beta_i = min(1 - abar((i+1)/T) / abar(i/T), 0.999), computed in float64).
    """

    def __init__(self, kind: str = "linear", num_timesteps: int = 1000,
                 beta_start: float = 1e-4, beta_end: float = 0.02, device=None):
        if kind not in SCHEDULES:
            raise ValueError(f"kind must be one of {SCHEDULES}, got {kind!r}")
        if not isinstance(num_timesteps, int) or num_timesteps < 1:
            raise ValueError(f"num_timesteps must be a positive int, got {num_timesteps!r}")
        if kind != "cosine" and not 0.0 < beta_start <= beta_end < 1.0:
            raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
        self.kind, self.num_timesteps = kind, num_timesteps
        self.beta_start, self.beta_end = beta_start, beta_end
        T = num_timesteps
        if kind == "linear":
            betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float32)
        elif kind == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float32) ** 2
        else:
            def abar(s):
                return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

            betas = torch.tensor([min(1 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)],
                                 dtype=torch.float64).float()
        self.betas = betas.to(device)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)

    @property
    def device(self) -> torch.device:
        return self.betas.device

    def to(self, device) -> "NoiseSchedule":
        """A copy of this schedule with its tensors on `device`."""
        other = object.__new__(NoiseSchedule)
        other.__dict__.update(self.__dict__)
        for name in ("betas", "alphas", "alphas_cumprod"):
            setattr(other, name, getattr(self, name).to(device))
        return other

    def __repr__(self) -> str:
        return (f"NoiseSchedule(kind={self.kind!r}, num_timesteps={self.num_timesteps}, "
                f"beta_start={self.beta_start}, beta_end={self.beta_end}, device={self.device})")
