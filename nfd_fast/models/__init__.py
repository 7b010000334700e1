"""Models of the ten approaches (and DDMI), built on nfd_fast's fused ops.

APPROACHES maps each approach number to its module in this package; every approach
module defines APPROACH = n and demo(out, *, quick=False, seed=0, device="cpu") -> str
(a short training run on synthetic data that writes a PNG to `out` and returns one line
with its held-out quality metric against a plain baseline). Modules are imported only
when used, so one model's import cost or failure never reaches the others.
"""
import importlib

from .latent_field import LatentField, LatentFieldConfig

APPROACHES = {
    1: "latent_field",
    2: "parameter_diffusion",
    3: "score_field",
    4: "multiscale_upsampler",
    5: "sparse_conditional",
    6: "temporal_field",
    7: "adaptive_sampling",
    8: "stochastic_field",
    9: "modulated_field",
    10: "sparse_feature",
}


def approach_module(approach: int):
    """The module of approach `approach` (1..10), imported on first use."""
    if approach not in APPROACHES:
        raise ValueError(f"approach must be one of {sorted(APPROACHES)}, got {approach!r}")
    return importlib.import_module(f"{__name__}.{APPROACHES[approach]}")


def demo(approach: int, out: str, **kwargs) -> str:
    """Run approach `approach`'s demo: writes a PNG to `out`, returns its metric line.
    kwargs: quick (bool), seed (int), device (str)."""
    return approach_module(approach).demo(out, **kwargs)


__all__ = ["APPROACHES", "LatentField", "LatentFieldConfig", "approach_module", "demo"]
