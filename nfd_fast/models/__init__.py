"""Models of the ten approaches (and DDMI), built on nfd_fast's fused ops.

APPROACHES maps each approach (its number, or "ddmi") to its module in this package; every
approach module defines APPROACH and demo(out, *, quick=False, seed=0, device="cpu") -> str
(a short training run on synthetic data that writes a PNG to `out` and returns one line
with its held-out quality metric against a plain baseline). Modules are imported only
when used, so one model's import cost or failure never reaches the others; the model
classes below are exported the same way (importing `nfd_fast.models.DDMI` imports ddmi).
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
    "ddmi": "ddmi",
}

# model class -> its module, imported on first access of the name
MODELS = {
    "ParameterDiffusion": "parameter_diffusion",
    "ScoreField": "score_field",
    "MultiscaleUpsampler": "multiscale_upsampler",
    "SparseConditionalField": "sparse_conditional",
    "TemporalField": "temporal_field",
    "AdaptiveField": "adaptive_sampling",
    "StochasticField": "stochastic_field",
    "ModulatedField": "modulated_field",
    "SparseFeatureField": "sparse_feature",
    "DDMI": "ddmi",
}


def approach_module(approach):
    """The module of approach `approach` (1..10 or "ddmi"), imported on first use."""
    if approach not in APPROACHES:
        raise ValueError(f"approach must be one of {list(APPROACHES)}, got {approach!r}")
    return importlib.import_module(f"{__name__}.{APPROACHES[approach]}")


def demo(approach, out: str, **kwargs) -> str:
    """Run approach `approach`'s demo: writes a PNG to `out`, returns its metric line.
    kwargs: quick (bool), seed (int), device (str)."""
    return approach_module(approach).demo(out, **kwargs)


def __getattr__(name: str):
    if name in MODELS:
        return getattr(importlib.import_module(f"{__name__}.{MODELS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["APPROACHES", "LatentField", "LatentFieldConfig", "approach_module", "demo", *MODELS]
