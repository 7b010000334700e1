"""Diffusion schedules and samplers built on nfd_fast's fused step ops."""
from .sampling import Sampler, leading_timesteps, sample
from .schedule import NoiseSchedule

__all__ = ["NoiseSchedule", "Sampler", "leading_timesteps", "sample"]
