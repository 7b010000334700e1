"""FusedMLP: a general coordinate MLP (any activation, per-layer w0, modulations) over fused_mlp."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

from ..ops.fused_mlp import ACTIVATIONS, fused_mlp, fused_mlp_with_jacobian
from .siren import siren_init_


class FusedMLP(nn.Module):
    """in -> hidden widths -> out, one fused kernel. Parameters live in ``layers`` (nn.Linear).

    Args:
        hidden_features: one width (repeated hidden_layers + 1 times) or a list of widths.
        activation: one name or one per hidden layer ("sine", "relu", "leaky_relu",
            "gelu", "silu", "identity"). Sine layers get SIREN's initialisation.
        w0 / first_w0: sine frequencies. final_activation: the output layer's.
        leaky_slope / leaky_gain, precision, fast_sine, recompute: as in fused_mlp.
    """

    def __init__(self, in_features: int, hidden_features: Union[int, Sequence[int]],
                 out_features: int, hidden_layers: int = 1,
                 activation: Union[str, Sequence[str]] = "relu", w0: float = 30.0,
                 first_w0: Optional[float] = None, final_activation: str = "identity",
                 bias: bool = True, leaky_slope: float = 0.01, leaky_gain: float = 1.0,
                 precision: Optional[str] = None, fast_sine: bool = False,
                 recompute: bool = False):
        super().__init__()
        widths = ([hidden_features] * (hidden_layers + 1) if isinstance(hidden_features, int)
                  else list(hidden_features))
        acts = [activation] * len(widths) if isinstance(activation, str) else list(activation)
        if len(acts) != len(widths):
            raise ValueError(f"activation: expected {len(widths)} entries, got {len(acts)}")
        for a in acts + [final_activation]:
            if a not in ACTIVATIONS:
                raise ValueError(f"activation must be one of {ACTIVATIONS}, got {a!r}")
        self.activation, self.final_activation = acts, final_activation
        self.w0 = [float(first_w0 if (i == 0 and first_w0 is not None) else w0)
                   for i in range(len(widths))]
        self.leaky_slope, self.leaky_gain = leaky_slope, leaky_gain
        self.precision, self.fast_sine, self.recompute = precision, fast_sine, recompute
        self.in_features, self.out_features = in_features, out_features
        dims = [in_features] + widths + [out_features]
        self.layers = nn.ModuleList(nn.Linear(i, o, bias=bias) for i, o in zip(dims[:-1], dims[1:]))
        for l, lin in enumerate(self.layers):
            feeds_sine = l > 0 and acts[l - 1] == "sine"
            if (l < len(acts) and acts[l] == "sine") or feeds_sine:
                siren_init_(lin, self.w0[min(l, len(acts) - 1)], is_first=l == 0)

    def fused_mlp_arguments(self) -> dict:
        """The fused_mlp arguments this module evaluates (all but x and modulations)."""
        return dict(weights=[l.weight for l in self.layers], biases=[l.bias for l in self.layers],
                    activation=self.activation, w0=self.w0,
                    final_activation=self.final_activation, leaky_slope=self.leaky_slope,
                    leaky_gain=self.leaky_gain, precision=self.precision,
                    fast_sine=self.fast_sine, recompute=self.recompute)

    def forward(self, x: torch.Tensor, *, scale=None, shift=None, mult=None) -> torch.Tensor:
        return fused_mlp(x, scale=scale, shift=shift, mult=mult, **self.fused_mlp_arguments())

    def value_and_jacobian(self, x: torch.Tensor, *, scale=None, shift=None, mult=None) -> tuple:
        """(values, J) with J[..., o, d] = d values_o / d x_d, in one fused pass."""
        return fused_mlp_with_jacobian(x, scale=scale, shift=shift, mult=mult,
                                       **self.fused_mlp_arguments())
