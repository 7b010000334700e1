"""Functional ops: each dispatches to its fused Triton kernel or its PyTorch reference."""
from .diffusion import ddim_step, ddpm_step, langevin_step, pc_step, q_sample, vp_predictor_step
from .fused_mlp import fused_mlp
from .grid_lookup import grid_lookup

__all__ = ["ddim_step", "ddpm_step", "fused_mlp", "grid_lookup", "langevin_step", "pc_step",
           "q_sample", "vp_predictor_step"]
