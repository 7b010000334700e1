"""CFCDecoder: DDMI's coarse-to-fine conditioned readout over nfd_fast's ops.

A readout reads K scales of per-sample basis fields at each coordinate and feeds scale k
into the MLP at depth k (coarse-to-fine conditioning). Per point, with h the hidden state:

    f_k = grid_lookup(coords, fields[k], planes)                   [B, N, C_k]
    x   = cat[h, f_k, e]     (h absent in the first block, f_k in blocks without a scale;
                              e: per-sample constant channels, e.g. DDMI's scale value)
    block "styled" (StyleGAN2's StyledResBlock; 1x1 modulated convs):
        y_0 = x,  y_l = g * leaky_relu(W_l y_{l-1} + b_l + w_noise_l n_l, slope)
        h   = (y_L + S x) * residual_gain                           (S = I when no skip)
    block "resnet_fc" (ConvONet's ResnetBlockFC, pre-activation):
        y_0 = x,  y_l = W_l relu(y_{l-1}) + b_l
        h   = y_L + S x
    after the first block, h += P p + c        (optional point layer on the raw points p)
    out = W_o act_o(h) + b_o                   (act_o: identity or leaky_relu)

Shapes: coords [B, N, D]; fields[k][plane] [B, C_k, ...] (per sample) or [C_k, ...];
W_l [out, in] (shared) or [B, out, in] (per sample: DDMI's modulated, demodulated
weights, formed once per sample by the readout); b_l [out] or [B, out]; noise n_l [B, N]
(one value per point, shared by the channels, as StyleGAN's NoiseInjection).

How it is computed. Backend "triton" (nfd_fast.backend.resolve): one call of the fused
op nfd_fast.ops.cfc_decode: each scale's features are looked up inside the MLP kernel and
never written to memory, the concatenations run as split weights (W_h h + W_f f_k), the
constant channels e are folded into the biases (b + W_e e, once per sample), and the
per-sample weights arrive formed once per sample (DDMI's modulated, demodulated weights,
made by the readout). Its backward runs on kernels from what the forward saved (second
order through the reference's VJP; see nfd_fast.ops.cfc). Backend
"torch" (and programs whose blocks differ in layer count): each scale's features by one
grid_lookup, then per block one fused_mlp call when its widths fit fused_mlp and it
draws no noise, else layer by layer as batched matmuls.
"""
from __future__ import annotations

import dataclasses
import math
from typing import List, Optional, Sequence

import torch
from torch import nn

from .. import backend
from ..ops import cfc_decode, fused_mlp, grid_lookup
from ..ops.cfc import BLOCK_KINDS, SplitBlock
from ..ops.fused_mlp import MAX_HIDDEN as FUSED_MLP_MAX_HIDDEN
from ..ops.fused_mlp import MAX_IN as FUSED_MLP_MAX_IN
from ..ops.fused_mlp import MAX_OUT as FUSED_MLP_MAX_OUT


@dataclasses.dataclass
class CFCBlock:
    """One residual block, its (per-sample) weights already formed.

    weights / biases: one entry per linear layer; layer 0 and skip take the block's input
    cat[h, f_k, extra]. noise_weights: None, or one scalar tensor per layer (styled
    blocks)."""

    weights: List[torch.Tensor]
    biases: List[Optional[torch.Tensor]]
    skip: Optional[torch.Tensor] = None
    scale: Optional[int] = None
    extra: Optional[torch.Tensor] = None
    noise_weights: Optional[List[torch.Tensor]] = None


@dataclasses.dataclass
class CFCProgram:
    """Everything a readout evaluates besides coordinates and fields."""

    blocks: List[CFCBlock]
    out_weight: torch.Tensor
    out_bias: Optional[torch.Tensor] = None
    point_weight: Optional[torch.Tensor] = None
    point_bias: Optional[torch.Tensor] = None


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x [B, N, in] times a shared [out, in] or per-sample [B, out, in] weight."""
    y = torch.matmul(x, weight.transpose(-1, -2))
    if bias is not None:
        y = y + (bias.unsqueeze(-2) if bias.dim() == 2 else bias)
    return y


def _fold_extra(weight: torch.Tensor, bias: Optional[torch.Tensor], extra: Optional[torch.Tensor]):
    """Split the constant columns off a weight: (W_x, b + W_e e), per sample when e is."""
    if extra is None:
        return weight, bias
    width = extra.shape[-1]
    folded = torch.matmul(weight[..., -width:], extra.unsqueeze(-1)).squeeze(-1)  # [B, out]
    return weight[..., :-width], folded if bias is None else folded + bias


def _split_columns(weight: Optional[torch.Tensor], hidden: Optional[int]):
    """(W_h, W_f) of a weight over cat[h, f] (h absent when hidden is None)."""
    if weight is None:
        return None, None
    if hidden is None:
        return None, weight
    return weight[..., :hidden], (weight[..., hidden:] if weight.shape[-1] > hidden else None)


def _split_block(blk: CFCBlock, hidden: Optional[int], features: Optional[int],
                 noisy: bool) -> SplitBlock:
    """The op's form of a block: constant channels folded into the biases, the first
    layer and the skip split by input (an identity skip over cat[h, f] made explicit);
    the noise weights only when the block draws noise (else they get no gradient)."""
    w0, b0 = _fold_extra(blk.weights[0], blk.biases[0], blk.extra)
    skip, skip_bias = (None, None) if blk.skip is None else _fold_extra(blk.skip, None, blk.extra)
    if skip is None and features is not None:  # identity over an input that includes f
        width = (hidden or 0) + features
        skip = torch.eye(width, dtype=w0.dtype, device=w0.device)
    hidden_weight, feature_weight = _split_columns(w0, hidden)
    skip_hidden, skip_feature = _split_columns(skip, hidden)
    noise_weights = None if blk.noise_weights is None or not noisy else \
        torch.cat([w.reshape(1) for w in blk.noise_weights])
    return SplitBlock(hidden_weight, feature_weight, list(blk.weights[1:]), [b0, *blk.biases[1:]],
                      skip_hidden, skip_feature, skip_bias, blk.scale, noise_weights)


class CFCDecoder(nn.Module):
    """The coarse-to-fine readout (see the module docstring), parameter-free: the readouts
    of nfd_fast.models.ddmi own the parameters under the reference's names and hand
    their formed per-sample weights over as a CFCProgram.

    Args:
        planes / combine / align_corners / padding_mode: the lookup, as grid_lookup takes it.
        block: "styled" or "resnet_fc".
        leaky_slope / leaky_gain: the styled blocks' activation (StyleGAN's FusedLeakyReLU:
            0.2, sqrt(2)).
        residual_gain: multiplies (y + S x) in styled blocks (StyleGAN: 1 / sqrt(2)).
        out_activation: None, or the slope of a leaky_relu applied before the output layer.
    """

    def __init__(self, planes: Sequence[Sequence[int]], *, combine: str = "sum",
                 align_corners: bool = False, padding_mode: str = "border",
                 block: str = "styled", leaky_slope: float = 0.2,
                 leaky_gain: float = math.sqrt(2.0), residual_gain: float = 1 / math.sqrt(2.0),
                 out_activation: Optional[float] = None):
        super().__init__()
        if block not in BLOCK_KINDS:
            raise ValueError(f"block must be one of {BLOCK_KINDS}, got {block!r}")
        self.planes = [tuple(int(a) for a in p) for p in planes]
        self.combine, self.align_corners, self.padding_mode = combine, align_corners, padding_mode
        self.block, self.leaky_slope, self.leaky_gain = block, leaky_slope, leaky_gain
        self.residual_gain = residual_gain if block == "styled" else 1.0
        self.out_activation = out_activation

    # ------------------------------------------------------------------- checks
    def _check(self, coords, fields, program: CFCProgram, points, noise) -> None:
        if not isinstance(coords, torch.Tensor) or coords.dim() != 3:
            got = list(coords.shape) if isinstance(coords, torch.Tensor) else type(coords).__name__
            raise ValueError(f"coords: expected [B, N, D], got {got}")
        B, N, _ = coords.shape
        if len(program.blocks) == 0:
            raise ValueError("program.blocks: need at least one block")
        for i, blk in enumerate(program.blocks):
            if blk.scale is not None and not 0 <= blk.scale < len(fields):
                raise ValueError(f"program.blocks[{i}].scale: {blk.scale} is not one of the "
                                 f"{len(fields)} scales of fields")
            if blk.extra is not None and (blk.extra.dim() != 2 or blk.extra.shape[0] != B):
                raise ValueError(f"program.blocks[{i}].extra: expected [B={B}, E], got {list(blk.extra.shape)}")
            for l, w in enumerate(blk.weights):
                if w.dim() not in (2, 3) or (w.dim() == 3 and w.shape[0] != B):
                    raise ValueError(f"program.blocks[{i}].weights[{l}]: expected [out, in] or "
                                     f"[B={B}, out, in], got {list(w.shape)}")
        if program.point_weight is not None:
            if points is None or points.shape[:2] != (B, N):
                got = None if points is None else list(points.shape)
                raise ValueError(f"points: the program has a point layer and needs [B={B}, N={N}, P], got {got}")
        if noise is not None:
            if len(noise) != len(program.blocks):
                raise ValueError(f"noise: expected one list per block ({len(program.blocks)}), got {len(noise)}")
            for i, (blk, per_layer) in enumerate(zip(program.blocks, noise)):
                if per_layer is None:
                    continue
                if blk.noise_weights is None or len(per_layer) != len(blk.weights):
                    raise ValueError(f"noise[{i}]: expected one [B, N] tensor per layer of a block "
                                     "with noise weights")
                for l, n in enumerate(per_layer):
                    if tuple(n.shape) != (B, N):
                        raise ValueError(f"noise[{i}][{l}]: expected [B={B}, N={N}], got {list(n.shape)}")

    # ----------------------------------------------------------------- forward
    def lookup(self, coords: torch.Tensor, fields) -> List[torch.Tensor]:
        """Each scale's features [B, N, C_k] (C_k * planes for concat), one lookup per scale."""
        return [grid_lookup(coords, [scale], self.planes, combine=self.combine,
                            align_corners=self.align_corners, padding_mode=self.padding_mode)
                for scale in fields]

    def forward(self, coords: torch.Tensor, fields, program: CFCProgram, *,
                points: Optional[torch.Tensor] = None, noise=None) -> torch.Tensor:
        """coords [B, N, D]; fields[k]: a list of per-plane fields of scale k (or one tensor
        when there is one plane); points [B, N, P] for the point layer; noise: None, or per
        block None / one [B, N] tensor per layer. Returns [B, N, out]."""
        fields = [[f] if isinstance(f, torch.Tensor) else list(f) for f in fields]
        self._check(coords, fields, program, points, noise)
        if self._fused(coords, fields, program):
            return self.fused_forward(coords, fields, program, points, noise)
        features = self.lookup(coords, fields)
        return self.evaluate_blocks(features, program, points, noise)

    def _fused(self, coords, fields, program: CFCProgram) -> bool:
        """The fused op serves backend "triton" for programs whose blocks have one layer
        count and whose first block reads a scale (all of DDMI's readouts)."""
        layers = {len(blk.weights) for blk in program.blocks}
        return len(layers) == 1 and program.blocks[0].scale is not None and \
            backend.resolve("cfc_decoder", coords, *[f for s in fields for f in s]) == "triton"

    def fused_forward(self, coords, fields, program: CFCProgram, points=None, noise=None):
        """The readout through nfd_fast.ops.cfc_decode (one fused kernel)."""
        planes = len(self.planes) if self.combine == "concat" else 1
        widths = [f[0].shape[-1 - len(self.planes[0])] * planes for f in fields]
        blocks, hidden = [], None
        for k, blk in enumerate(program.blocks):
            noisy = noise is not None and noise[k] is not None
            blocks.append(_split_block(blk, hidden, None if blk.scale is None else widths[blk.scale],
                                       noisy))
            hidden = blk.weights[-1].shape[-2]
        return cfc_decode(coords, fields, self.planes, blocks, program.out_weight, program.out_bias,
                          points=points, point_weight=program.point_weight,
                          point_bias=program.point_bias, noise=noise, combine=self.combine,
                          align_corners=self.align_corners, padding_mode=self.padding_mode,
                          block=self.block, leaky_slope=self.leaky_slope,
                          leaky_gain=self.leaky_gain, residual_gain=self.residual_gain,
                          out_activation=self.out_activation)

    def evaluate_blocks(self, features, program: CFCProgram, points, noise) -> torch.Tensor:
        h = None
        for i, blk in enumerate(program.blocks):
            parts = ([] if h is None else [h]) + ([] if blk.scale is None else [features[blk.scale]])
            x = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
            h = self._block(x, blk, None if noise is None else noise[i])
            if i == 0 and program.point_weight is not None:
                h = h + _linear(points.to(h.dtype), program.point_weight, program.point_bias)
        if self.out_activation is not None:
            h = torch.nn.functional.leaky_relu(h, self.out_activation)
        return _linear(h, program.out_weight, program.out_bias)

    def _block(self, x: torch.Tensor, blk: CFCBlock, noise) -> torch.Tensor:
        weights, biases = list(blk.weights), list(blk.biases)
        weights[0], biases[0] = _fold_extra(weights[0], biases[0], blk.extra)
        skip, skip_bias = (None, None) if blk.skip is None else _fold_extra(blk.skip, None, blk.extra)
        y = self._chain(x, weights, biases, blk.noise_weights, noise)
        residual = x if skip is None else _linear(x, skip, skip_bias)
        return (y + residual) * self.residual_gain if self.residual_gain != 1.0 else y + residual

    def _chain(self, x, weights, biases, noise_weights, noise) -> torch.Tensor:
        fits = (x.shape[-1] <= FUSED_MLP_MAX_IN and len(weights) >= 2
                and max(w.shape[-2] for w in weights[:-1]) <= FUSED_MLP_MAX_HIDDEN
                and weights[-1].shape[-2] <= FUSED_MLP_MAX_OUT)
        if self.block == "styled":
            if fits and noise is None:
                return fused_mlp(x, weights, biases, activation="leaky_relu",
                                 final_activation="leaky_relu", leaky_slope=self.leaky_slope,
                                 leaky_gain=self.leaky_gain)
            for l, (w, b) in enumerate(zip(weights, biases)):
                z = _linear(x, w, b)
                if noise is not None:  # one value per point, every channel (NoiseInjection)
                    z = z + noise_weights[l] * noise[l].unsqueeze(-1).to(z.dtype)
                x = self.leaky_gain * torch.nn.functional.leaky_relu(z, self.leaky_slope)
            return x
        if fits:
            return fused_mlp(torch.relu(x), weights, biases, activation="relu")
        for w, b in zip(weights, biases):
            x = _linear(torch.relu(x), w, b)
        return x
