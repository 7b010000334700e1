"""Functional ops: each calls its registered torch.library op (namespace nfd_fast), which
runs the fused Triton kernel or the PyTorch reference."""
from .cfc import cfc_decode
from .diffusion import ddim_step, ddpm_step, langevin_step, pc_step, q_sample, vp_predictor_step
from .fused_mlp import fused_mlp, fused_mlp_with_jacobian
from .grid_lookup import grid_lookup

__all__ = ["cfc_decode", "ddim_step", "ddpm_step", "fused_mlp", "fused_mlp_with_jacobian", "grid_lookup",
           "langevin_step", "pc_step", "q_sample", "vp_predictor_step"]
