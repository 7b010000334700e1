"""nn.Modules over nfd_fast's fused ops."""
from .cfc import CFCBlock, CFCDecoder, CFCProgram
from .fields import MultiScaleField
from .mlp import FusedMLP
from .siren import ModulatedSiren, SineLayer, Siren, siren_init_

__all__ = ["CFCBlock", "CFCDecoder", "CFCProgram", "FusedMLP", "ModulatedSiren",
           "MultiScaleField", "SineLayer", "Siren", "siren_init_"]
