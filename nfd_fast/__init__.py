"""nfd_fast: fused Triton kernels for neural fields and diffusion models."""
from . import diffusion, nn, ops
from .accelerate import accelerate, deaccelerate
from .backend import active_backend, explain, get_backend, set_backend, use_backend
from .render import render

__version__ = "0.1.0"
__all__ = ["accelerate", "deaccelerate", "diffusion", "nn", "ops", "render", "active_backend", "explain", "get_backend", "set_backend", "use_backend", "__version__"]
