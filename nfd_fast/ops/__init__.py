"""Functional ops: each dispatches to its fused Triton kernel or its PyTorch reference."""
from .fused_mlp import fused_mlp

__all__ = ["fused_mlp"]
