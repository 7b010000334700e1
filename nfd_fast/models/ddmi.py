"""DDMI (domain-agnostic latent diffusion of implicit neural representations) on
nfd_fast's ops: the D2C-VAE, its coarse-to-fine readouts and latent diffusion.

    image [B, 3, S, S] --encoder--> z [B, 64, S/4, S/4] (a diagonal Gaussian)
    z --decoder--> three per-sample basis fields [B, 64, S/4^2], [B, 64, S/2^2], [B, 64, S^2]
    fields, coords [B, N, 2], scale value si --ImageReadout--> RGB [B, N, 3] at any coords
    latent diffusion on z: eps = (1 - sigmoid(m)) sqrt(1 - abar_t) x_t + sigmoid(m) UNet(x_t, t)

Readouts (the reference's `mlp` checkpoint entry loads unchanged into each):
- ImageReadout: style = time_mlp(si) (sinusoidal 64 -> Linear 256 -> GELU -> Linear 256);
  x = cat[f_coarse, si, si] -> StyledResBlock(66 -> 256); cat[h, f_mid, si, si] ->
  StyledResBlock(322 -> 256); cat[h, f_fine, si, si] -> StyledResBlock(322 -> 256);
  StyledResBlock(256); ToRGB (modulated, not demodulated) + bias. Fields are read by
  bilinear grid_sample, border padding, align_corners False, at (x, y) coordinates (x
  along the width) whose pixel centres are linspace(-(n-1)/n, (n-1)/n, n).
- ShapeReadout (occupancy logits): tri-planes xy, yz, xz per scale, summed, read at
  2 u - 1 with u = clamp(p / (1.1 + 1e-5) + 0.5, 0, 1 - 1e-5), align_corners True;
  h = net_p(p) + ResnetBlockFC(64 -> 256, hidden 64)(f_c); then ResnetBlockFC(320 -> 256)
  on cat[h, f_mid], on cat[h, f_fine], ResnetBlockFC(256), Linear(256, 1).
- VideoReadout: planes xy [B, C, H, W], yt [B, C, T, H], xt [B, C, T, W] per scale, read
  with align_corners True and concatenated [xy, yt, xt]; as the reference reads them, the
  time value indexes the yt / xt planes' width (spatial) axis and the spatial value their
  T-row axis. ResnetBlockFC(192 -> 256), (448 -> 256) twice, (256), leaky_relu(0.2),
  Linear(256, 3).

Each readout's forward runs the plain PyTorch transcription on the reference backend
("torch") and nfd_fast.nn.cfc.CFCDecoder otherwise (grid_lookup per scale, per-sample
modulated and demodulated weights formed once per sample, the scale value folded into
the biases). Both compute the same function.
"""
from __future__ import annotations

import dataclasses
import math
from typing import List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import backend
from ..diffusion import NoiseSchedule, Sampler
from ..nn.cfc import CFCBlock, CFCDecoder, CFCProgram
from ..ops import q_sample
from .blocks import FieldModel, plot_rows, psnr, random_blobs, render_blobs, timestep_embedding

SQRT2 = math.sqrt(2.0)
ScaleValue = Union[float, torch.Tensor]
NoiseArg = Union[bool, Sequence[torch.Tensor]]

# ------------------------------------------------------------------------ coordinates


def pixel_centers(height: int, width: Optional[int] = None, device=None) -> torch.Tensor:
    """The reference's image coordinates: [H * W, 2] (x, y), row-major, each axis
    linspace(-(n-1)/n, (n-1)/n, n) (the pixel centres of [-1, 1])."""
    width = height if width is None else width
    axes = [torch.linspace(-(n - 1) / n, (n - 1) / n, n, device=device) for n in (height, width)]
    y, x = torch.meshgrid(*axes, indexing="ij")
    return torch.stack([x, y], dim=-1).reshape(-1, 2)


def crop_coordinates(resolution: int, size: int, top: int, left: int, device=None) -> torch.Tensor:
    """The pixel centres of a size^2 crop (rows top.., columns left..) of a resolution^2
    image, [size * size, 2] (x, y): the reference's training targets beyond si = 1."""
    if not (0 <= top <= resolution - size and 0 <= left <= resolution - size):
        raise ValueError(f"top, left: a {size}^2 crop must lie inside {resolution}^2, got ({top}, {left})")
    grid = pixel_centers(resolution, device=device).view(resolution, resolution, 2)
    return grid[top:top + size, left:left + size].reshape(-1, 2)


def scale_value(train_resolution: int, resolution: int) -> float:
    """si = training resolution / query resolution, as the reference sets it at generation."""
    return train_resolution / resolution


def normalize_points(points: torch.Tensor, padding: float = 0.1) -> torch.Tensor:
    """Object-space points -> tri-plane grid coordinates: 2 u - 1, u = clamp(p / (1 + padding
    + 1e-5) + 0.5, 0, 1 - 1e-5) (ConvONet's normalisation, as the 3-D readout reads)."""
    u = (points / (1 + padding + 1e-5) + 0.5).clamp(0.0, 1 - 1e-5)
    return 2 * u - 1


# -------------------------------------------------------------- StyleGAN2 building blocks


class SinusoidalPosEmb(nn.Module):
    """[B] -> [B, dim]: [sin(x f_k), cos(x f_k)], f_k = exp(-k ln(10000) / (dim/2 - 1))."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half, device=x.device, dtype=x.dtype) * (-math.log(10000.0) / (half - 1)))
        angles = x[:, None] * freqs[None]
        return torch.cat([angles.sin(), angles.cos()], dim=-1)


class EqualLinear(nn.Module):
    """Linear with the weight scaled by 1/sqrt(in) at run time (equalised learning rate)."""

    def __init__(self, in_features: int, out_features: int, bias_init: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features))
        self.bias = nn.Parameter(torch.full((out_features,), float(bias_init)))
        self.scale = 1 / math.sqrt(in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.scale, self.bias)


class EqualConv2d(nn.Module):
    """1x1 convolution without bias, weight [out, in, 1, 1] scaled by 1/sqrt(in)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, 1, 1))
        self.scale = 1 / math.sqrt(in_channels)

    def matrix(self) -> torch.Tensor:
        """The effective weight [out, in]."""
        return (self.weight * self.scale).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.scale)


class ModulatedConv2d(nn.Module):
    """StyleGAN2's 1x1 modulated convolution: W' = W s / sqrt(in) per sample, demodulated
    (W' rsqrt(sum_in W'^2 + 1e-8)) when asked. weight [1, out, in, 1, 1]."""

    def __init__(self, in_channels: int, out_channels: int, style_dim: int, demodulate: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, out_channels, in_channels, 1, 1))
        self.modulation = EqualLinear(style_dim, in_channels, bias_init=1.0)
        self.scale = 1 / math.sqrt(in_channels)
        self.demodulate = demodulate

    def modulated_weight(self, style: torch.Tensor) -> torch.Tensor:
        """The per-sample weight [B, out, in], formed once per sample."""
        s = self.modulation(style)  # [B, in]
        w = self.scale * self.weight[0, :, :, 0, 0] * s[:, None, :]
        if self.demodulate:
            w = w * torch.rsqrt(w.pow(2).sum(-1, keepdim=True) + 1e-8)
        return w

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        # the reference's 1x1 conv grouped over the batch, as one batched matmul (same
        # sums; a grouped conv is several times slower on CPU)
        out = torch.matmul(self.modulated_weight(style), x.reshape(B, C, H * W))
        return out.view(B, -1, H, W)


class NoiseInjection(nn.Module):
    """x + weight * n, n [B, 1, H, W]: one N(0, 1) value per pixel, drawn when not given."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        if noise is None:
            noise = x.new_empty(x.shape[0], 1, *x.shape[2:]).normal_()
        return x + self.weight * noise


class FusedLeakyReLU(nn.Module):
    """sqrt(2) * leaky_relu(x + bias, 0.2), bias per channel."""

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(x + self.bias.view(1, -1, 1, 1), 0.2) * SQRT2


class StyledConv(nn.Module):
    """Modulated, demodulated 1x1 conv -> noise injection -> fused leaky ReLU."""

    def __init__(self, in_channels: int, out_channels: int, style_dim: int):
        super().__init__()
        self.conv = ModulatedConv2d(in_channels, out_channels, style_dim)
        self.noise = NoiseInjection()
        self.activate = FusedLeakyReLU(out_channels)

    def forward(self, x, style, noise: Union[None, bool, torch.Tensor] = None):
        """noise: a [B, 1, H, W] tensor, None (drawn here) or False (no injection)."""
        x = self.conv(x, style)
        if noise is not False:
            x = self.noise(x, noise)
        return self.activate(x)


class StyledResBlock(nn.Module):
    """Three StyledConvs; (out + skip(x)) / sqrt(2), skip a 1x1 EqualConv2d when in != out."""

    def __init__(self, in_channels: int, out_channels: int, style_dim: int):
        super().__init__()
        self.conv1 = StyledConv(in_channels, out_channels, style_dim)
        self.conv2 = StyledConv(out_channels, out_channels, style_dim)
        self.conv3 = StyledConv(out_channels, out_channels, style_dim)
        self.skip = nn.Sequential(EqualConv2d(in_channels, out_channels)) if in_channels != out_channels else None

    def convs(self) -> List[StyledConv]:
        return [self.conv1, self.conv2, self.conv3]

    def forward(self, x, style, noise=(None, None, None)):
        out = x
        for conv, n in zip(self.convs(), noise):
            out = conv(out, style, n)
        skip = x if self.skip is None else self.skip(x)
        return (out + skip) / SQRT2


class ToRGB(nn.Module):
    """Modulated 1x1 conv without demodulation, plus bias [1, out, 1, 1]."""

    def __init__(self, in_channels: int, out_channels: int, style_dim: int):
        super().__init__()
        self.conv = ModulatedConv2d(in_channels, out_channels, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, out_channels, 1, 1))

    def forward(self, x, style):
        return self.conv(x, style) + self.bias


class ResnetBlockFC(nn.Module):
    """x_s + fc_1(relu(fc_0(relu(x)))); shortcut a Linear without bias when sizes differ."""

    def __init__(self, size_in: int, size_out: Optional[int] = None, size_h: Optional[int] = None):
        super().__init__()
        size_out = size_in if size_out is None else size_out
        size_h = min(size_in, size_out) if size_h is None else size_h
        self.fc_0 = nn.Linear(size_in, size_h)
        self.fc_1 = nn.Linear(size_h, size_out)
        self.shortcut = nn.Linear(size_in, size_out, bias=False) if size_in != size_out else None
        nn.init.zeros_(self.fc_1.weight)  # each block starts as its shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dx = self.fc_1(torch.relu(self.fc_0(torch.relu(x))))
        return (x if self.shortcut is None else self.shortcut(x)) + dx

    def cfc_block(self, scale: Optional[int]) -> CFCBlock:
        return CFCBlock([self.fc_0.weight, self.fc_1.weight], [self.fc_0.bias, self.fc_1.bias],
                        None if self.shortcut is None else self.shortcut.weight, scale=scale)


# -------------------------------------------------------------------------- readouts


def _check_fields(fields, count: int, planes: int, batch: int, channels: int, name="fields"):
    """fields: `count` scales; each one tensor (planes == 1) or `planes` tensors [B, C, ...]."""
    if len(fields) != count:
        raise ValueError(f"{name}: expected {count} scales, got {len(fields)}")
    out = []
    for k, scale in enumerate(fields):
        scale = [scale] if isinstance(scale, torch.Tensor) else list(scale)
        if len(scale) != planes:
            raise ValueError(f"{name}[{k}]: expected {planes} plane(s), got {len(scale)}")
        for p, f in enumerate(scale):
            if not isinstance(f, torch.Tensor) or f.dim() != 4 or f.shape[0] != batch or f.shape[1] != channels:
                got = list(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
                raise ValueError(f"{name}[{k}]" + (f"[{p}]" if planes > 1 else "")
                                 + f": expected [B={batch}, C={channels}, H, W], got {got}")
        out.append(scale)
    return out


def _check_coords(coords, dims: int, name: str = "coords"):
    if not isinstance(coords, torch.Tensor) or coords.dim() != 3 or coords.shape[-1] != dims:
        got = list(coords.shape) if isinstance(coords, torch.Tensor) else type(coords).__name__
        raise ValueError(f"{name}: expected [B, N, {dims}], got {got}")


def _sample_plane(field: torch.Tensor, grid: torch.Tensor, align_corners: bool) -> torch.Tensor:
    """grid_sample (bilinear, border) of [B, C, H, W] at grid [B, N, 2] -> [B, N, C]."""
    out = F.grid_sample(field, grid.unsqueeze(2).to(field.dtype), mode="bilinear",
                        padding_mode="border", align_corners=align_corners)
    return out.squeeze(-1).transpose(1, 2)


def _use_plain(*tensors) -> bool:
    """The reference backend runs the plain PyTorch readouts."""
    return backend.resolve("cfc_decoder", *tensors) == "torch"


class ImageReadout(nn.Module):
    """DDMI's image readout (the reference's `MLP`, see the module docstring).

    forward(fields, coords, scale, noise=True): fields three [B, C, H_k, W_k] (coarse to
    fine), coords [B, N, 2] (x, y), scale the value si (float or [B]); noise True draws
    fresh N(0, 1) per point and layer (as the reference does even at generation), False
    skips the injection, or give the 12 per-layer noises [B, N] (block-major). -> [B, N, out].
    """

    def __init__(self, field_channels: int = 64, hidden: int = 256, style_dim: int = 256,
                 embed_dim: int = 64, out_channels: int = 3, scales: int = 3):
        super().__init__()
        self.field_channels, self.hidden, self.scales = field_channels, hidden, scales
        self.time_mlp = nn.Sequential(SinusoidalPosEmb(embed_dim), nn.Linear(embed_dim, style_dim),
                                      nn.GELU(), nn.Linear(style_dim, style_dim))
        first, later = field_channels + 2, hidden + field_channels + 2
        for k in range(scales + 1):
            in_ch = first if k == 0 else (later if k < scales else hidden)
            self.add_module(f"net_res{k + 1}", StyledResBlock(in_ch, hidden, style_dim))
        self.torgb = ToRGB(hidden, out_channels, style_dim)
        self.decoder = CFCDecoder([(0, 1)], align_corners=False, block="styled")

    def blocks(self) -> List[StyledResBlock]:
        return [getattr(self, f"net_res{k + 1}") for k in range(self.scales + 1)]

    def _prepare(self, fields, coords, scale, noise):
        _check_coords(coords, 2)
        B, N, _ = coords.shape
        fields = [s[0] for s in _check_fields(fields, self.scales, 1, B, self.field_channels)]
        si = torch.as_tensor(scale, dtype=coords.dtype, device=coords.device)
        if si.dim() == 0:
            si = si.expand(B)
        if tuple(si.shape) != (B,):
            raise ValueError(f"scale: expected a number or a tensor [B={B}], got {list(si.shape)}")
        count = 3 * len(self.blocks())
        if not isinstance(noise, bool):
            noise = list(noise)
            if len(noise) != count or any(tuple(n.shape) != (B, N) for n in noise):
                raise ValueError(f"noise: expected True, False or {count} tensors [B={B}, N={N}]")
        return fields, si, noise

    def program(self, si: torch.Tensor) -> CFCProgram:
        """The per-sample weights of every layer, formed once per sample; si [B]."""
        style = self.time_mlp(si)
        extra = torch.stack([si, si], dim=-1)  # the two constant si channels of each input
        blocks = []
        for k, res in enumerate(self.blocks()):
            convs = res.convs()
            has_scale = k < self.scales
            blocks.append(CFCBlock(
                [c.conv.modulated_weight(style) for c in convs], [c.activate.bias for c in convs],
                None if res.skip is None else res.skip[0].matrix(),
                scale=k if has_scale else None, extra=extra if has_scale else None,
                noise_weights=[c.noise.weight for c in convs]))
        return CFCProgram(blocks, self.torgb.conv.modulated_weight(style), self.torgb.bias.flatten())

    def forward(self, fields, coords, scale: ScaleValue, noise: NoiseArg = True,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """generator: draws the noise (then both backends read the same draws)."""
        if noise is True and generator is not None:
            noise = self._draw_noise(coords, generator)
        if _use_plain(coords, *[f for f in fields if isinstance(f, torch.Tensor)]):
            return self.reference_forward(fields, coords, scale, noise)
        return self.cfc_forward(fields, coords, scale, noise, generator)

    def _draw_noise(self, coords, generator) -> List[torch.Tensor]:
        B, N, _ = coords.shape
        return [torch.randn(B, N, generator=generator, device=coords.device, dtype=coords.dtype)
                for _ in range(3 * len(self.blocks()))]

    def cfc_forward(self, fields, coords, scale: ScaleValue, noise: NoiseArg = True,
                    generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The readout through CFCDecoder (grid_lookup + fused_mlp / batched matmuls)."""
        fields, si, noise = self._prepare(fields, coords, scale, noise)
        if noise is True:
            noise = self._draw_noise(coords, generator)
        per_block = None if noise is False else [noise[3 * k: 3 * k + 3] for k in range(len(self.blocks()))]
        return self.decoder(coords, fields, self.program(si), noise=per_block)

    def reference_forward(self, fields, coords, scale: ScaleValue, noise: NoiseArg = True) -> torch.Tensor:
        """The plain PyTorch readout, layer by layer as the reference runs it (points as
        an [N, 1] image, modulated 1x1 convs per sample, noise [B, 1, N, 1])."""
        fields, si, noise = self._prepare(fields, coords, scale, noise)
        B, N, _ = coords.shape
        style = self.time_mlp(si)
        const = si.view(B, 1, 1, 1).expand(B, 2, N, 1)
        maps = [_sample_plane(f, coords, False).transpose(1, 2).unsqueeze(-1) for f in fields]
        h = None
        for k, res in enumerate(self.blocks()):
            parts = ([] if h is None else [h]) + ([maps[k], const] if k < self.scales else [])
            x = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
            if isinstance(noise, bool):
                layer_noise = (None,) * 3 if noise else (False,) * 3
            else:
                layer_noise = [n.view(B, 1, N, 1) for n in noise[3 * k: 3 * k + 3]]
            h = res(x, style, layer_noise)
        return self.torgb(h, style).view(B, -1, N).transpose(1, 2)


class _FCReadout(nn.Module):
    """The ResnetBlockFC readouts (3-D, video): net_res1 on the coarse features, net_res2 and
    net_res3 on cat[h, features], net_res4, then net_out."""

    planes: Sequence[Sequence[int]] = ()

    def __init__(self, feature_channels: int, hidden: int, out_features: int,
                 out_slope: Optional[float], scales: int = 3):
        super().__init__()
        self.scales, self.out_slope = scales, out_slope
        self.net_res1 = ResnetBlockFC(feature_channels, hidden)
        for k in range(1, scales):
            self.add_module(f"net_res{k + 1}", ResnetBlockFC(hidden + feature_channels, hidden))
        self.add_module(f"net_res{scales + 1}", ResnetBlockFC(hidden))
        self.net_out = nn.Linear(hidden, out_features)

    def blocks(self) -> List[ResnetBlockFC]:
        return [getattr(self, f"net_res{k + 1}") for k in range(self.scales + 1)]

    def program(self) -> CFCProgram:
        blocks = [b.cfc_block(k if k < self.scales else None) for k, b in enumerate(self.blocks())]
        return CFCProgram(blocks, self.net_out.weight, self.net_out.bias)

    def _trunk(self, features: List[torch.Tensor], first_extra=None) -> torch.Tensor:
        """Plain PyTorch: the blocks on the looked-up features [B, N, C_k]."""
        h = self.net_res1(features[0])
        if first_extra is not None:
            h = h + first_extra
        for k, res in enumerate(self.blocks()[1:], start=1):
            h = res(torch.cat([h, features[k]], dim=-1) if k < self.scales else h)
        if self.out_slope is not None:
            h = F.leaky_relu(h, self.out_slope)
        return self.net_out(h)


class ShapeReadout(_FCReadout):
    """DDMI's 3-D occupancy readout (the reference's `MLP3D`).

    forward(fields, points): fields three scales, each [xy, yz, xz] tri-plane [B, C, R, R];
    points [B, N, 3] in object space (the unit cube with padding 0.1). -> logits [B, N, 1].
    """

    planes = [(0, 1), (1, 2), (0, 2)]

    def __init__(self, field_channels: int = 64, hidden: int = 256, padding: float = 0.1, scales: int = 3):
        super().__init__(field_channels, hidden, 1, None, scales)
        self.field_channels, self.padding = field_channels, padding
        self.net_p = nn.Linear(3, hidden)
        self.decoder = CFCDecoder(self.planes, combine="sum", align_corners=True, block="resnet_fc")

    def _prepare(self, fields, points):
        _check_coords(points, 3, "points")
        return _check_fields(fields, self.scales, 3, points.shape[0], self.field_channels)

    def forward(self, fields, points: torch.Tensor) -> torch.Tensor:
        if _use_plain(points):
            return self.reference_forward(fields, points)
        return self.cfc_forward(fields, points)

    def cfc_forward(self, fields, points: torch.Tensor) -> torch.Tensor:
        fields = self._prepare(fields, points)
        program = self.program()
        program.point_weight, program.point_bias = self.net_p.weight, self.net_p.bias
        return self.decoder(normalize_points(points, self.padding), fields, program, points=points)

    def reference_forward(self, fields, points: torch.Tensor) -> torch.Tensor:
        fields = self._prepare(fields, points)
        grid = normalize_points(points, self.padding)
        features = [sum(_sample_plane(f, grid[..., list(axes)], True) for f, axes in zip(scale, self.planes))
                    for scale in fields]
        return self._trunk(features, self.net_p(points))


class VideoReadout(_FCReadout):
    """DDMI's video readout (the reference's `MLPVideo`).

    forward(fields, coords): fields three scales, each [xy [B, C, H, W], yt [B, C, T, H],
    xt [B, C, T, W]]; coords [B, N, 3] (x, y, t) in [-1, 1]. -> RGB [B, N, 3].
    """

    # a plane (a, b) reads coordinate a along its width: the time value along the yt / xt
    # planes' spatial axis, as the reference's (t, spatial) grids do
    planes = [(0, 1), (2, 1), (2, 0)]

    def __init__(self, field_channels: int = 64, hidden: int = 256, out_channels: int = 3, scales: int = 3):
        super().__init__(3 * field_channels, hidden, out_channels, 0.2, scales)
        self.field_channels = field_channels
        self.decoder = CFCDecoder(self.planes, combine="concat", align_corners=True,
                                  block="resnet_fc", out_activation=0.2)

    def _prepare(self, fields, coords):
        _check_coords(coords, 3)
        return _check_fields(fields, self.scales, 3, coords.shape[0], self.field_channels)

    def forward(self, fields, coords: torch.Tensor) -> torch.Tensor:
        if _use_plain(coords):
            return self.reference_forward(fields, coords)
        return self.cfc_forward(fields, coords)

    def cfc_forward(self, fields, coords: torch.Tensor) -> torch.Tensor:
        return self.decoder(coords, self._prepare(fields, coords), self.program())

    def reference_forward(self, fields, coords: torch.Tensor) -> torch.Tensor:
        fields = self._prepare(fields, coords)
        features = [torch.cat([_sample_plane(f, coords[..., list(axes)], True)
                               for f, axes in zip(scale, self.planes)], dim=-1) for scale in fields]
        return self._trunk(features)


# ---------------------------------------------------------------------------- D2C-VAE


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GroupNorm -> swish -> conv3x3 (+ time embedding) -> GroupNorm -> swish -> conv3x3,
    plus the input (through a 1x1 nin_shortcut when the width changes)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int = 32, temb_channels: int = 0):
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        if temb_channels:
            self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = _norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, temb: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if temb is not None:
            h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the pixels, scale c^-0.5; 1x1 q, k, v, proj_out."""

    def __init__(self, channels: int, groups: int = 32):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (m(h).flatten(2).transpose(1, 2) for m in (self.q, self.k, self.v))  # [B, HW, C]
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Pad (0, 1, 0, 1), then conv3x3 stride 2."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest x2, then conv3x3."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Mid(nn.Module):
    def __init__(self, channels: int, groups: int, temb_channels: int = 0):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups, temb_channels)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups, temb_channels)

    def forward(self, x, temb=None):
        return self.block_2(self.attn_1(self.block_1(x, temb)), temb)


@dataclasses.dataclass
class VAEConfig:
    """Reference sizes (AFHQ): 256^2 images -> 64 x 64^2 latent -> fields 64 x {64, 128, 256}^2."""

    in_channels: int = 3
    ch: int = 128
    ch_mult: Sequence[int] = (1, 2, 4)
    num_res_blocks: int = 2
    z_channels: int = 128
    embed_dim: int = 64
    field_channels: int = 64
    norm_groups: int = 32


class Encoder(nn.Module):
    """conv_in -> levels of ResnetBlocks with Downsample between -> mid -> norm, swish,
    conv_out to 2 z_channels."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        g, mult = cfg.norm_groups, (1,) + tuple(cfg.ch_mult)
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        for i, m in enumerate(cfg.ch_mult):
            level = nn.Module()
            c_in, c_out = cfg.ch * mult[i], cfg.ch * m
            level.block = nn.ModuleList(ResnetBlock(c_in if j == 0 else c_out, c_out, g)
                                        for j in range(cfg.num_res_blocks))
            if i < len(cfg.ch_mult) - 1:
                level.downsample = Downsample(c_out)
            self.down.append(level)
        top = cfg.ch * cfg.ch_mult[-1]
        self.mid = _Mid(top, g)
        self.norm_out = _norm(top, g)
        self.conv_out = nn.Conv2d(top, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    """conv_in -> mid -> up levels (coarsest first) of num_res_blocks + 1 ResnetBlocks; every
    level but the finest emits a field through its 1x1 `hdbf` head and upsamples; the finest
    ends in norm, swish, conv_out to the finest field. Returns [coarse, ..., fine]."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        g, n = cfg.norm_groups, len(cfg.ch_mult)
        c = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c, 3, padding=1)
        self.mid = _Mid(c, g)
        levels = []
        for i in reversed(range(n)):
            level = nn.Module()
            c_out = cfg.ch * cfg.ch_mult[i]
            level.block = nn.ModuleList(ResnetBlock(c if j == 0 else c_out, c_out, g)
                                        for j in range(cfg.num_res_blocks + 1))
            c = c_out
            if i > 0:
                level.hdbf = nn.Sequential(nn.Conv2d(c, cfg.field_channels, 1))
                level.upsample = Upsample(c)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(c, g)
        self.conv_out = nn.Conv2d(c, cfg.field_channels, 3, padding=1)

    def forward(self, z) -> List[torch.Tensor]:
        h = self.mid(self.conv_in(z))
        fields = []
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "hdbf"):
                fields.append(level.hdbf(h))
                h = level.upsample(h)
        fields.append(self.conv_out(F.silu(self.norm_out(h))))
        return fields


class DiagonalGaussian:
    """mean and log-variance (clamped to [-30, 20]) split off the channels."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def kl(self) -> torch.Tensor:
        """KL to N(0, I), summed over C, H, W: [B]."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class D2CVAE(nn.Module):
    """The image D2C-VAE: encoder, quant_conv (1x1 to mean and log-variance),
    post_quant_conv, and the decoder to the hierarchical basis fields. Keys and shapes
    follow the reference's `vaemodel` entry (encoder.*, decoder.*, quant_conv,
    post_quant_conv). Input images [B, 3, S, S] in [-1, 1], S divisible by
    2^(levels - 1)."""

    def __init__(self, config: Optional[VAEConfig] = None, **sizes):
        super().__init__()
        self.config = cfg = dataclasses.replace(config or VAEConfig(), **sizes)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def encode(self, images: torch.Tensor) -> DiagonalGaussian:
        cfg = self.config
        factor = 2 ** (len(cfg.ch_mult) - 1)
        if images.dim() != 4 or images.shape[1] != cfg.in_channels or images.shape[-1] % factor or images.shape[-2] % factor:
            raise ValueError(f"images: expected [B, {cfg.in_channels}, H, W] with H and W divisible "
                             f"by {factor}, got {list(images.shape)}")
        return DiagonalGaussian(self.quant_conv(self.encoder(images)))

    def decode(self, z: torch.Tensor) -> List[torch.Tensor]:
        if z.dim() != 4 or z.shape[1] != self.config.embed_dim:
            raise ValueError(f"z: expected [B, {self.config.embed_dim}, h, w], got {list(z.shape)}")
        return self.decoder(self.post_quant_conv(z))


# ------------------------------------------------------------------- latent diffusion


class LatentUNet(nn.Module):
    """A compact ADM-style UNet for the latent: ResnetBlocks with the time embedding
    (Linear -> SiLU -> Linear to 4 model_channels), self-attention on the levels listed in
    attention_levels and in the middle, conv down / up sampling, skip concatenations,
    zero-initialised output conv. Sizes are arguments (the reference's AFHQ model:
    model_channels 224, channel_mult (1, 2, 4, 6), attention at levels 1, 2, 3)."""

    def __init__(self, channels: int = 64, model_channels: int = 224,
                 channel_mult: Sequence[int] = (1, 2, 4, 6), num_res_blocks: int = 2,
                 attention_levels: Sequence[int] = (1, 2, 3), norm_groups: int = 32):
        super().__init__()
        self.channels, self.model_channels = channels, model_channels
        temb = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.conv_in = nn.Conv2d(channels, model_channels, 3, padding=1)
        self.down, skips, c = nn.ModuleList(), [model_channels], model_channels
        for i, m in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.down.append(self._level_block(c, model_channels * m, i in attention_levels, norm_groups, temb))
                c = model_channels * m
                skips.append(c)
            if i < len(channel_mult) - 1:
                self.down.append(Downsample(c))
                skips.append(c)
        self.mid = _Mid(c, norm_groups, temb)
        self.up = nn.ModuleList()
        for i, m in reversed(list(enumerate(channel_mult))):
            for j in range(num_res_blocks + 1):
                self.up.append(self._level_block(c + skips.pop(), model_channels * m, i in attention_levels,
                                                 norm_groups, temb))
                c = model_channels * m
                if i > 0 and j == num_res_blocks:
                    self.up.append(Upsample(c))
        self.norm_out = _norm(c, norm_groups)
        self.conv_out = nn.Conv2d(c, channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    @staticmethod
    def _level_block(c_in, c_out, attention, groups, temb) -> nn.ModuleList:
        return nn.ModuleList([ResnetBlock(c_in, c_out, groups, temb)] + ([AttnBlock(c_out, groups)] if attention else []))

    @staticmethod
    def _run(block, h, temb):
        if isinstance(block, (Downsample, Upsample)):
            return block(h)
        h = block[0](h, temb)
        return block[1](h) if len(block) > 1 else h

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.time_embed(timestep_embedding(t, self.model_channels).to(x.dtype))
        h = self.conv_in(x)
        skips = [h]
        for block in self.down:
            h = self._run(block, h, temb)
            skips.append(h)
        h = self.mid(h, temb)
        for block in self.up:
            if not isinstance(block, Upsample):
                h = torch.cat([h, skips.pop()], dim=1)
            h = self._run(block, h, temb)
        return self.conv_out(F.silu(self.norm_out(h)))


def reference_schedule(device=None, num_timesteps: int = 1000) -> NoiseSchedule:
    """The reference's "linear" schedule: betas linear in sqrt space, 0.0015 to 0.0195."""
    return NoiseSchedule("scaled_linear", num_timesteps, 0.0015, 0.0195, device=device)


def ddim_timesteps(num_timesteps: int, steps: int) -> torch.Tensor:
    """The reference's spacing: linspace(-1, T - 1, steps + 1) truncated to int, descending;
    consecutive pairs are (t, prev_t), the last prev_t = -1 (the final step to x0)."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in 1..{num_timesteps}, got {steps}")
    return torch.linspace(-1, num_timesteps - 1, steps + 1).int().long().flip(0)


class LatentDiffusion(nn.Module):
    """Epsilon-prediction latent diffusion with the reference's learned mixing:
        eps(x_t, t) = (1 - sigmoid(m)) sqrt(1 - abar_t) x_t + sigmoid(m) UNet(x_t, t),
    m = mixing_logit [1, C, 1, 1], initialised to -6 (the reference: the UNet's share
    starts at 0.25%). Loss: MSE on eps (mean over all)."""

    def __init__(self, unet: LatentUNet, num_timesteps: int = 1000, mixing_logit_init: float = -6.0):
        super().__init__()
        self.model = unet
        self.mixing_logit = nn.Parameter(torch.full((1, unet.channels, 1, 1), float(mixing_logit_init)))
        self.schedule = reference_schedule(num_timesteps=num_timesteps)

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        self.schedule = self.schedule.to(self.mixing_logit.device)
        return self

    def eps(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x_t.dim() != 4 or x_t.shape[1] != self.model.channels:
            raise ValueError(f"x_t: expected [B, {self.model.channels}, h, w], got {list(x_t.shape)}")
        abar = self.schedule.alphas_cumprod[t].view(-1, 1, 1, 1).to(x_t.dtype)
        mix = torch.sigmoid(self.mixing_logit)
        return (1 - mix) * torch.sqrt(1 - abar) * x_t + mix * self.model(x_t, t)

    def loss(self, z0: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        B = z0.shape[0]
        t = torch.randint(0, self.schedule.num_timesteps, (B,), generator=generator).to(z0.device)
        noise = torch.randn(z0.shape, generator=generator).to(z0)
        x_t = q_sample(z0, t, noise, self.schedule)
        return F.mse_loss(self.eps(x_t, t), noise)

    @torch.no_grad()
    def sample(self, shape: Sequence[int], steps: int = 50, generator: Optional[torch.Generator] = None,
               x_T: Optional[torch.Tensor] = None) -> torch.Tensor:
        """DDIM, eta 0, no clipping, over the reference's timestep spacing, through
        nfd_fast's Sampler (fused steps; on CUDA the loop is captured as a CUDA graph)."""
        device = self.mixing_logit.device
        x = torch.randn(tuple(shape), generator=generator).to(device) if x_T is None else x_T
        visit = ddim_timesteps(self.schedule.num_timesteps, steps)[:-1].tolist()
        sampler = Sampler(lambda x_t, t, cond: self.eps(x_t, t), tuple(x.shape), self.schedule,
                          timesteps=visit, dtype=x.dtype)
        return sampler(x)


# ------------------------------------------------------------------------ the model


@dataclasses.dataclass
class DDMIConfig:
    """Sizes of the whole model. Defaults: the reference's AFHQ configuration."""

    image_size: int = 256
    vae: VAEConfig = dataclasses.field(default_factory=VAEConfig)
    hidden: int = 256
    style_dim: int = 256
    style_embed_dim: int = 64
    model_channels: int = 224
    channel_mult: Sequence[int] = (1, 2, 4, 6)
    num_res_blocks: int = 2
    attention_levels: Sequence[int] = (1, 2, 3)
    unet_norm_groups: int = 32
    num_timesteps: int = 1000
    mixing_logit_init: float = -6.0
    kl_const_coeff: float = 1e-4
    kl_max_coeff: float = 0.5

    @staticmethod
    def tiny(image_size: int = 16) -> "DDMIConfig":
        """A CPU-sized configuration (seconds per hundred steps)."""
        return DDMIConfig(image_size=image_size,
                          vae=VAEConfig(ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=8,
                                        embed_dim=4, field_channels=8, norm_groups=4),
                          hidden=32, style_dim=32, style_embed_dim=16, model_channels=16,
                          channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
                          unet_norm_groups=4, kl_max_coeff=0.01)


def kl_coefficient(step: int, total_steps: int, const: float = 1e-4, maximum: float = 0.5) -> float:
    """The annealed KL weight: linear from `const` to `maximum` over the first 90% of steps."""
    progress = min(1.0, step / max(1.0, 0.9 * total_steps))
    return const + (maximum - const) * progress


def image_to_points(images: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H * W, C] in pixel_centers' order."""
    return images.flatten(2).transpose(1, 2)


def points_to_image(values: torch.Tensor, height: int, width: Optional[int] = None) -> torch.Tensor:
    """[B, H * W, C] -> [B, C, H, W]."""
    width = height if width is None else width
    return values.transpose(1, 2).reshape(values.shape[0], -1, height, width)


class DDMI(FieldModel):
    """D2C-VAE + coarse-to-fine image readout + latent diffusion (see the module docstring).

    vae_loss: L1 (summed over pixels and channels, mean over the batch) of the readout
    at the training image's pixel centres (si = 1) + the annealed KL weight times the KL
    (+ an optional perceptual term). diffusion_loss: the latent model's MSE on z sampled
    from the (frozen) posterior. generate: DDIM latents -> fields decoded once -> images at
    any resolutions, si = image_size / resolution."""

    def __init__(self, config: Optional[DDMIConfig] = None):
        super().__init__()
        self.config = cfg = config or DDMIConfig()
        self.vae = D2CVAE(cfg.vae)
        self.readout = ImageReadout(cfg.vae.field_channels, cfg.hidden, cfg.style_dim,
                                    cfg.style_embed_dim, cfg.vae.in_channels)
        unet = LatentUNet(cfg.vae.embed_dim, cfg.model_channels, cfg.channel_mult, cfg.num_res_blocks,
                          cfg.attention_levels, cfg.unet_norm_groups)
        self.diffusion = LatentDiffusion(unet, cfg.num_timesteps, cfg.mixing_logit_init)

    def _check_images(self, images: torch.Tensor) -> None:
        S, C = self.config.image_size, self.config.vae.in_channels
        if not isinstance(images, torch.Tensor) or tuple(images.shape[1:]) != (C, S, S):
            got = list(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images: expected [B, {C}, {S}, {S}], got {got}")

    def render(self, fields, resolution: int, noise: NoiseArg = True) -> torch.Tensor:
        """Read decoded fields on a resolution^2 pixel grid: [B, C, r, r]."""
        B = fields[0].shape[0]
        coords = pixel_centers(resolution, device=fields[0].device).to(fields[0].dtype).expand(B, -1, -1)
        si = scale_value(self.config.image_size, resolution)
        return points_to_image(self.readout(fields, coords, si, noise=noise), resolution)

    def vae_loss(self, images: torch.Tensor, step: int = 0, total_steps: int = 1,
                 perceptual=None, generator: Optional[torch.Generator] = None, noise: NoiseArg = True,
                 target=None):
        """-> (loss, {"l1", "kl", "kl_coeff"}). target: None (the images themselves at their
        pixel centres, si = 1) or (coords [B, N, 2], values [B, N, C], si): e.g. a crop of a
        higher-resolution rendering, as the reference trains (crop_coordinates).
        perceptual(pred, target) -> scalar, optional (needs target None); noise as
        ImageReadout takes it (the reference trains with fresh noise)."""
        self._check_images(images)
        posterior = self.vae.encode(images)
        fields = self.vae.decode(posterior.sample(generator))
        if target is None:
            pred = self.render(fields, self.config.image_size, noise)
            values = images
        else:
            coords, values, si = target
            if values.shape[:2] != coords.shape[:2]:
                raise ValueError(f"target: values {list(values.shape)} and coords {list(coords.shape)} "
                                 "disagree on [B, N]")
            pred = self.readout(fields, coords, si, noise=noise)
        l1 = (pred - values).abs().flatten(1).sum(1).mean()
        kl = posterior.kl().mean()
        coeff = kl_coefficient(step, total_steps, self.config.kl_const_coeff, self.config.kl_max_coeff)
        loss = l1 + coeff * kl
        if perceptual is not None:
            loss = loss + perceptual(pred, values)
        return loss, {"l1": l1.detach(), "kl": kl.detach(), "kl_coeff": coeff}

    def diffusion_loss(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        self._check_images(images)
        with torch.no_grad():
            z = self.vae.encode(images).sample(generator)
        return self.diffusion.loss(z, generator)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, resolution: Optional[int] = None) -> torch.Tensor:
        """Posterior mean -> fields -> image at `resolution` (default the training size)."""
        self._check_images(images)
        fields = self.vae.decode(self.vae.encode(images).mean)
        return self.render(fields, resolution or self.config.image_size, noise=False).clamp(-1, 1)

    @torch.no_grad()
    def generate(self, n: int, resolutions: Sequence[int], steps: int = 50,
                 generator: Optional[torch.Generator] = None) -> List[torch.Tensor]:
        """n samples, each rendered at every resolution from the same latent and fields."""
        latent = self.config.image_size // 2 ** (len(self.config.vae.ch_mult) - 1)
        z = self.diffusion.sample((n, self.config.vae.embed_dim, latent, latent), steps, generator)
        fields = self.vae.decode(z)
        return [self.render(fields, r).clamp(-1, 1) for r in resolutions]

    def load_reference(self, checkpoint: dict, strict: bool = True) -> None:
        """Load a reference checkpoint's `mlp` (readout) and `vaemodel` (VAE) entries."""
        for key, module in (("mlp", self.readout), ("vaemodel", self.vae)):
            if key not in checkpoint:
                raise KeyError(f"checkpoint: has no {key!r} entry (keys: {sorted(checkpoint)})")
            module.load_state_dict(checkpoint[key], strict=strict)

    @classmethod
    def from_config(cls, config: dict) -> "DDMI":
        config = dict(config)
        config["vae"] = VAEConfig(**config["vae"])
        return cls(DDMIConfig(**config))


# ------------------------------------------------------------------------------ demo

APPROACH = "ddmi"


def blob_images(params: dict, resolution: int) -> torch.Tensor:
    """random_blobs' images rendered at resolution^2, in [-1, 1]: [n, 3, r, r]."""
    return points_to_image(render_blobs(params, pixel_centers(resolution)), resolution) * 2 - 1


def _blob_target(params: dict, pick: torch.Tensor, size: int, generator, device):
    """The reference's three targets: the image itself (si = 1, p = 0.3), or a size^2 crop of
    the 1.5x (p = 0.3) or 2x (p = 0.4) rendering (si = 1/1.5, 1/2)."""
    u = torch.rand(1, generator=generator).item()
    factor = 1.0 if u < 0.3 else (1.5 if u < 0.6 else 2.0)
    resolution = int(round(size * factor))
    top, left = (int(v) for v in torch.randint(0, resolution - size + 1, (2,), generator=generator))
    coords = crop_coordinates(resolution, size, top, left)
    values = render_blobs({k: v[pick] for k, v in params.items()}, coords) * 2 - 1
    return (coords.expand(len(pick), -1, -1).to(device), values.to(device), size / resolution)


def demo(out: str, *, quick: bool = False, seed: int = 0, device: str = "cpu") -> str:
    """Train a tiny DDMI on synthetic 16^2 blob images (the VAE and readout, then the latent
    model), then plot held-out images, their reconstructions at 16^2 and 64^2 from the same
    fields, and samples at both resolutions. Returns the held-out PSNR at 64^2 (the blobs
    are rendered exactly at any size) against the plain baseline with as many numbers as
    the latent: bilinear upsampling of a 4^2 thumbnail."""
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)  # tiny tensors: one thread beats a (contended) pool
    try:
        return _demo(out, quick, seed, device)
    finally:
        torch.set_num_threads(threads)


def _demo(out: str, quick: bool, seed: int, device: str) -> str:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    size, big = 16, 64
    train_params, held_params = random_blobs(256, channels=3, generator=g), random_blobs(8, channels=3, generator=g)
    images = blob_images(train_params, size).to(device)
    model = DDMI(DDMIConfig.tiny(size)).to(device)
    vae_steps, diffusion_steps = (80, 60) if quick else (800, 800)
    opt = torch.optim.Adam(list(model.vae.parameters()) + list(model.readout.parameters()), lr=2e-3)
    for step in range(vae_steps):
        pick = torch.randint(0, len(images), (16,), generator=g)
        loss, _ = model.vae_loss(images[pick], step, vae_steps,
                                 target=_blob_target(train_params, pick, size, g, device))
        opt.zero_grad()
        loss.backward()
        opt.step()
    opt = torch.optim.Adam(model.diffusion.parameters(), lr=2e-3)
    for _ in range(diffusion_steps):
        loss = model.diffusion_loss(images[torch.randint(0, len(images), (32,), generator=g)])
        opt.zero_grad()
        loss.backward()
        opt.step()
    held, truth = blob_images(held_params, size).to(device), blob_images(held_params, big).to(device)
    small, large = model.reconstruct(held), model.reconstruct(held, big)
    latent = model.vae.encode(held).mean.shape[-1]
    thumbnail = F.interpolate(held, size=(latent, latent), mode="area")
    bilinear = F.interpolate(thumbnail, size=(big, big), mode="bilinear", align_corners=False)
    samples = model.generate(4, [size, big], steps=20 if quick else 50, generator=g)

    def panel(img):
        return (img.permute(1, 2, 0) + 1) / 2

    rows = [("held-out 64^2", [(f"#{i}", panel(truth[i])) for i in range(4)]),
            ("recon. 16^2", [(f"#{i}", panel(small[i])) for i in range(4)]),
            ("recon. 64^2", [(f"#{i}", panel(large[i])) for i in range(4)]),
            ("sample 16^2", [(f"#{i}", panel(samples[0][i])) for i in range(4)]),
            ("sample 64^2", [(f"#{i}", panel(samples[1][i])) for i in range(4)])]
    plot_rows(out, rows, title="DDMI: one latent, fields decoded once, read at 16^2 and 64^2")
    ours, base = psnr(large, truth, 2.0), psnr(bilinear, truth, 2.0)
    return (f"DDMI held-out PSNR at {big}^2 from {size}^2 inputs: {ours:.2f} dB "
            f"(bilinear from a {latent}^2 thumbnail: {base:.2f} dB); at {size}^2: {psnr(small, held, 2.0):.2f} dB")


def benchmark_calls(device, quick: bool) -> dict:
    """One training step (the VAE and readout's L1 + KL at the images' pixel centres, and
    the latent model's loss) on blob images, and one sampling pass (DDIM on the latents,
    fields decoded, images read at twice the training size): the reference's AFHQ sizes,
    8 images of 256^2, 50 steps (quick: the tiny configuration, 2 of 16^2, 3 steps)."""
    from .blocks import ROTATIONS, adam_step

    (batch, size, steps), config = ((2, 16, 3), DDMIConfig.tiny(16)) if quick else ((8, 256, 50), DDMIConfig())
    torch.manual_seed(0)
    model = DDMI(config).to(device)
    g = torch.Generator().manual_seed(0)
    sets = [(blob_images(random_blobs(batch, channels=3, generator=g), size).to(device),)
            for _ in range(ROTATIONS)]

    def losses(images):
        return {"vae": model.vae_loss(images)[0], "diffusion": model.diffusion_loss(images)}

    return {"train_step": adam_step(model.parameters(), losses, sets),
            "sampling": lambda: model.generate(batch, [2 * size], steps)[0],
            "points": {"train_step": batch * size * size, "sampling": batch * 4 * size * size},
            "describe": f"{batch} images of {size}^2 (latent {config.vae.embed_dim} channels), "
                        f"{steps} DDIM steps, read at {2 * size}^2"}
