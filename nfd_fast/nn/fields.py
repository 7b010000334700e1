"""MultiScaleField: learnable (shared) or per-sample multi-scale factorized feature grids."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

from ..ops.grid_lookup import COMBINES, grid_lookup

IntOrList = Union[int, Sequence[int]]


class MultiScaleField(nn.Module):
    """Multi-scale factorized fields read by nfd_fast.ops.grid_lookup.

    Args:
        planes: axis tuples, e.g. [(0, 1)] (image), [(0, 1), (1, 2), (0, 2)] (tri-plane),
            all six pairs of 4 axes (K-planes space-time), [(0, 1, 2)] (dense volume).
        resolutions: per scale, an int (every axis) or one size per coordinate axis
            (D entries; a plane takes the sizes of its axes, e.g. a shorter time axis).
        channels: per scale, or one int for all scales.
        learnable: hold the fields as parameters (shared by all samples). Otherwise the
            fields come with each call: forward(coords, fields) (DDMI's per-sample fields).
        init: "uniform" (U(-init_scale, init_scale)) or "kplanes" (planes without the time
            axis U(0.1, 0.5), planes with it 1, as K-planes initialises them).
        channels_last: store each parameter with channels innermost, so a lookup reads a
            contiguous channel vector per corner (the [C, ...] shape is unchanged).
    """

    def __init__(self, planes: Sequence[Sequence[int]], resolutions: Sequence[IntOrList],
                 channels: IntOrList, *, combine: str = "sum", align_corners: bool = False,
                 padding_mode: str = "border", learnable: bool = True, init: str = "uniform",
                 init_scale: float = 0.1, time_axis: Optional[int] = None,
                 channels_last: bool = True):
        super().__init__()
        if combine not in COMBINES:
            raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")
        if init not in ("uniform", "kplanes"):
            raise ValueError(f"init must be 'uniform' or 'kplanes', got {init!r}")
        self.planes = [tuple(int(a) for a in p) for p in planes]
        self.dims = 1 + max(a for p in self.planes for a in p)
        self.combine, self.align_corners, self.padding_mode = combine, align_corners, padding_mode
        self.channels = [channels] * len(resolutions) if isinstance(channels, int) else list(channels)
        if len(self.channels) != len(resolutions):
            raise ValueError(f"channels: expected one per scale ({len(resolutions)}), got {len(self.channels)}")
        self.resolutions = [[r] * self.dims if isinstance(r, int) else list(r) for r in resolutions]
        for s, r in enumerate(self.resolutions):
            if len(r) != self.dims or min(r) < 1:
                raise ValueError(f"resolutions[{s}]: expected an int or {self.dims} positive sizes, got {r}")
        self.learnable = learnable
        if learnable:
            self.scales = nn.ModuleList(
                nn.ParameterList(nn.Parameter(self._init_field(s, axes, init, init_scale, time_axis,
                                                               channels_last))
                                 for axes in self.planes)
                for s in range(len(self.resolutions)))

    def field_shape(self, scale: int, axes) -> list:
        """[C, *spatial] of one plane, spatial in grid_sample order (..., H, W) = axes reversed."""
        return [self.channels[scale]] + [self.resolutions[scale][a] for a in reversed(axes)]

    def _init_field(self, s, axes, init, init_scale, time_axis, channels_last) -> torch.Tensor:
        shape = self.field_shape(s, axes)
        # channels innermost in memory, [C, ...] as the shape grid_sample expects
        t = torch.empty(*shape[1:], shape[0]).movedim(-1, 0) if channels_last else torch.empty(*shape)
        with torch.no_grad():
            if init == "kplanes" and time_axis is not None and time_axis in axes:
                t.fill_(1.0)
            elif init == "kplanes":
                t.uniform_(0.1, 0.5)
            else:
                t.uniform_(-init_scale, init_scale)
        return t

    @property
    def out_features(self) -> int:
        per_plane = len(self.planes) if self.combine == "concat" else 1
        return sum(c * per_plane for c in self.channels)

    def forward(self, coords: torch.Tensor, fields=None) -> torch.Tensor:
        """coords [B, N, D] (or [N, D]) -> features [B, N, out_features] (or [N, ...])."""
        if fields is None:
            if not self.learnable:
                raise ValueError("this MultiScaleField holds no fields: pass fields= per call")
            fields = [list(scale) for scale in self.scales]
        squeeze = coords.dim() == 2
        out = grid_lookup(coords.unsqueeze(0) if squeeze else coords, fields, self.planes,
                          combine=self.combine, align_corners=self.align_corners,
                          padding_mode=self.padding_mode)
        return out.squeeze(0) if squeeze else out

    def extra_repr(self) -> str:
        return (f"planes={self.planes}, resolutions={self.resolutions}, channels={self.channels}, "
                f"combine={self.combine!r}, align_corners={self.align_corners}, "
                f"padding_mode={self.padding_mode!r}, learnable={self.learnable}")
