"""SIREN modules over the fused MLP op.

Siren keeps the parameter layout of the SIREN reference notebook (vsitzmann/siren):
``net.{i}.linear.weight / bias`` for the sine layers and ``net.{last}.weight / bias``
for the final nn.Linear, so checkpoints trained with that code load unchanged. Its
forward returns only the output (the notebook's Siren also returns the coordinates).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..ops.fused_mlp import fused_mlp, fused_mlp_with_jacobian


@torch.no_grad()
def siren_init_(linear: nn.Linear, omega_0: float, is_first: bool) -> nn.Linear:
    """SIREN's initialisation: first layer U(-1/in, 1/in), later layers
    U(-sqrt(6/in)/w0, sqrt(6/in)/w0); the bias keeps nn.Linear's default."""
    fan_in = linear.in_features
    bound = 1.0 / fan_in if is_first else math.sqrt(6.0 / fan_in) / omega_0
    linear.weight.uniform_(-bound, bound)
    return linear


class SineLayer(nn.Module):
    """sin(omega_0 * (W x + b)); standalone forward is plain PyTorch (Siren fuses the chain)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 is_first: bool = False, omega_0: float = 30.0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.is_first, self.omega_0 = is_first, float(omega_0)
        self.linear = siren_init_(nn.Linear(in_features, out_features, bias=bias), omega_0, is_first)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.omega_0 * self.linear(x))

    def extra_repr(self) -> str:
        return f"omega_0={self.omega_0}, is_first={self.is_first}"


class Siren(nn.Module):
    """SIREN (Sitzmann et al. 2020): in -> hidden x (hidden_layers + 1 sine layers) -> out,
    evaluated by one fused_mlp call.

    Args:
        precision / fast_sine / recompute: passed to fused_mlp (kernel matmul precision,
            fast sine, recompute pre-activations in backward instead of storing them).
    """

    def __init__(self, in_features: int, hidden_features: int, hidden_layers: int,
                 out_features: int, outermost_linear: bool = True,
                 first_omega_0: float = 30.0, hidden_omega_0: float = 30.0,
                 precision: Optional[str] = None, fast_sine: bool = False,
                 recompute: bool = False):
        super().__init__()
        if hidden_layers < 0:
            raise ValueError(f"hidden_layers must be >= 0, got {hidden_layers}")
        self.first_omega_0, self.hidden_omega_0 = float(first_omega_0), float(hidden_omega_0)
        self.outermost_linear = outermost_linear
        self.in_features, self.out_features = in_features, out_features
        self.precision, self.fast_sine, self.recompute = precision, fast_sine, recompute
        # the constructor arguments, so a checkpoint can rebuild the module
        self.config = dict(in_features=in_features, hidden_features=hidden_features,
                           hidden_layers=hidden_layers, out_features=out_features,
                           outermost_linear=outermost_linear, first_omega_0=first_omega_0,
                           hidden_omega_0=hidden_omega_0, precision=precision,
                           fast_sine=fast_sine, recompute=recompute)
        layers = [SineLayer(in_features, hidden_features, is_first=True, omega_0=first_omega_0)]
        layers += [SineLayer(hidden_features, hidden_features, omega_0=hidden_omega_0)
                   for _ in range(hidden_layers)]
        if outermost_linear:
            layers.append(siren_init_(nn.Linear(hidden_features, out_features), hidden_omega_0, False))
        else:
            layers.append(SineLayer(hidden_features, out_features, omega_0=hidden_omega_0))
        self.net = nn.Sequential(*layers)

    def linears(self) -> list:
        return [m.linear if isinstance(m, SineLayer) else m for m in self.net]

    def w0s(self) -> list:
        return [m.omega_0 for m in self.net[:-1]]

    def fused_mlp_arguments(self) -> dict:
        """The fused_mlp arguments this module evaluates (all but x and modulations)."""
        linears = self.linears()
        return dict(weights=[l.weight for l in linears], biases=[l.bias for l in linears],
                    activation="sine", w0=self.w0s(),
                    final_activation="identity" if self.outermost_linear else "sine",
                    final_w0=self.hidden_omega_0, precision=self.precision,
                    fast_sine=self.fast_sine, recompute=self.recompute)

    def forward(self, coords: torch.Tensor, *, scale=None, shift=None, mult=None) -> torch.Tensor:
        """coords [N, in] or [B, N, in]; optional per-hidden-layer modulations (fused_mlp)."""
        return fused_mlp(coords, scale=scale, shift=shift, mult=mult, **self.fused_mlp_arguments())

    def value_and_jacobian(self, coords: torch.Tensor, *, scale=None, shift=None,
                           mult=None) -> tuple:
        """(values, J) with J[..., o, d] = d values_o / d coords_d, in one fused pass
        (fused_mlp_with_jacobian): normals, eikonal and gradient losses."""
        return fused_mlp_with_jacobian(coords, scale=scale, shift=shift, mult=mult,
                                       **self.fused_mlp_arguments())


class ModulatedSiren(nn.Module):
    """A Siren whose sine layers are modulated per sample from a latent code through one
    Linear (functa / COIN++): shift by default, scale (as 1 + s) optional.

    forward(coords [B, N, in], latent [B, latent_dim]) -> [B, N, out]. The latent-to-
    modulation Linear starts with zero bias, so a zero latent gives the plain Siren.
    """

    def __init__(self, in_features: int, hidden_features: int, hidden_layers: int,
                 out_features: int, latent_dim: int, first_omega_0: float = 30.0,
                 hidden_omega_0: float = 30.0, modulate_shift: bool = True,
                 modulate_scale: bool = False, precision: Optional[str] = None,
                 fast_sine: bool = False):
        super().__init__()
        if not (modulate_shift or modulate_scale):
            raise ValueError("ModulatedSiren needs modulate_shift or modulate_scale")
        self.siren = Siren(in_features, hidden_features, hidden_layers, out_features,
                           first_omega_0=first_omega_0, hidden_omega_0=hidden_omega_0,
                           precision=precision, fast_sine=fast_sine)
        self.kinds = [k for k, on in (("shift", modulate_shift), ("scale", modulate_scale)) if on]
        self.num_modulated = hidden_layers + 1
        self.hidden_features = hidden_features
        self.modulation = nn.Linear(latent_dim, len(self.kinds) * self.num_modulated * hidden_features)
        nn.init.zeros_(self.modulation.bias)

    def modulations(self, latent: torch.Tensor) -> dict:
        """{'shift': [per-layer [B, width]], 'scale': [...]} from latent [B, latent_dim]."""
        if latent.dim() != 2:
            raise ValueError(f"latent: expected [B, latent_dim], got {list(latent.shape)}")
        mods = self.modulation(latent).view(latent.shape[0], len(self.kinds),
                                            self.num_modulated, self.hidden_features)
        out = {}
        for i, kind in enumerate(self.kinds):
            layers = mods[:, i].unbind(1)
            out[kind] = [1.0 + m for m in layers] if kind == "scale" else list(layers)
        return out

    def forward(self, coords: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        if coords.dim() != 3 or coords.shape[0] != latent.shape[0]:
            raise ValueError(f"coords: expected [B, N, in] with B = latent's {latent.shape[0]}, "
                             f"got {list(coords.shape)}")
        return self.siren(coords, **self.modulations(latent))
