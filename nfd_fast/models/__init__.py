"""Models of the user's approaches, built on nfd_fast's fused ops."""
from .latent_field import LatentField, LatentFieldConfig

__all__ = ["LatentField", "LatentFieldConfig"]
