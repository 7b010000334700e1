"""Make existing PyTorch models fast without rewriting them: nfd_fast.accelerate.

    python examples/accelerate_existing_model.py [--small]

Two models written the way people write them, with no nfd_fast in them:
- a SIREN (nn.Linear layers and torch.sin, as in the SIREN notebook);
- a K-Planes-style field: feature planes read with F.grid_sample, multiplied, decoded by
  an nn.Linear / ReLU MLP.
accelerate(model) replaces what it can fuse (linear + activation runs, grid_sample
pipelines) by nfd_fast's kernels on the same parameter tensors, and says what it fused
and what it left alone in model.acceleration_report. The outputs and gradients stay
those of the original model; on a GPU the fused kernels run, on a CPU the reference.
--small uses fewer points (seconds on a CPU).
"""
import argparse
import itertools

import torch
import torch.nn.functional as F
from torch import nn

import nfd_fast


class SineLayer(nn.Module):
    def __init__(self, in_features, out_features, omega_0=30.0):
        super().__init__()
        self.omega_0, self.linear = omega_0, nn.Linear(in_features, out_features)

    def forward(self, x):
        return torch.sin(self.omega_0 * self.linear(x))


class PlainSiren(nn.Module):
    def __init__(self, hidden=128, layers=3):
        super().__init__()
        self.net = nn.Sequential(SineLayer(2, hidden), *[SineLayer(hidden, hidden) for _ in range(layers)],
                                 nn.Linear(hidden, 3))

    def forward(self, coords):
        return self.net(coords)


class PlainKPlanes(nn.Module):
    """Six planes over (x, y, z, t); features multiplied over planes; an MLP decodes them."""

    def __init__(self, resolution=48, channels=16, hidden=64):
        super().__init__()
        self.pairs = list(itertools.combinations(range(4), 2))
        self.planes = nn.ParameterList(nn.Parameter(0.1 + 0.4 * torch.rand(1, channels, resolution, resolution))
                                       for _ in self.pairs)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 4))

    def forward(self, coords):
        features = 1.0
        for (a, b), plane in zip(self.pairs, self.planes):
            grid = coords[:, [a, b]].view(1, -1, 1, 2)
            features = features * F.grid_sample(plane, grid, align_corners=True).view(plane.shape[1], -1).t()
        return self.mlp(features)


def compare(name: str, model: nn.Module, coords: torch.Tensor) -> None:
    """Outputs and parameter gradients of the model before and after accelerate()."""
    def run():
        model.zero_grad()
        y = model(coords)
        y.square().mean().backward()
        return y.detach(), [p.grad.clone() for p in model.parameters()]

    y_ref, g_ref = run()
    nfd_fast.accelerate(model)
    y_fast, g_fast = run()
    out_err = ((y_fast - y_ref).abs().max() / y_ref.abs().max()).item()
    grad_err = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item() for a, b in zip(g_fast, g_ref))
    print(f"--- {name}\n{model.acceleration_report}")
    print(f"{name}: relative difference to the original model: output {out_err:.1e}, gradients {grad_err:.1e}")
    assert out_err < 1e-4 and grad_err < 1e-3, "accelerate changed the model's numbers"
    nfd_fast.deaccelerate(model)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="fewer points: seconds on a CPU")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    points = 512 if args.small else 2**16
    compare("SIREN", PlainSiren(), torch.rand(points, 2) * 2 - 1)
    compare("K-Planes", PlainKPlanes(), torch.rand(points, 4) * 2 - 1)


if __name__ == "__main__":
    main()
