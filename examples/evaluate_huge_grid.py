"""Evaluate a field on a huge 4-D space-time grid, or on a crop of an even larger one.

    python examples/evaluate_huge_grid.py [--out-dir .] [--small]

The field is K-Planes-style: six learnable planes over (x, y, z, t) at two scales,
multiplied per scale, then a small MLP. nfd_fast.render streams any [N, D] -> [N, C]
callable over a grid chunk by chunk, so the grid itself never exists in memory:
- a 4-D grid to a .npy file (resumable; under torchrun the ranks share the work);
- region= picks a crop or a strided sub-grid of a virtual grid too big to render whole,
  with exactly the coordinates those points have in the big grid.
--small uses a 24^3 x 4 grid (seconds on a CPU).
"""
import argparse
import itertools
from pathlib import Path

import numpy as np
import torch

import nfd_fast
from nfd_fast.nn import FusedMLP, MultiScaleField


class KPlanesField(torch.nn.Module):
    """(x, y, z, t) in [-1, 1]^4 -> 3 values: product of six plane features per scale, MLP."""

    def __init__(self):
        super().__init__()
        planes = list(itertools.combinations(range(4), 2))
        self.features = MultiScaleField(planes, [[32, 32, 32, 8], [64, 64, 64, 8]], 8,
                                        combine="product", init="kplanes", time_axis=3)
        self.decoder = FusedMLP(16, 32, 3, hidden_layers=1, activation="relu")

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.features(coords))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path("."))
    parser.add_argument("--small", action="store_true", help="tiny sizes: seconds on a CPU")
    parser.add_argument("--overwrite", action="store_true", help="start the render over")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    field = KPlanesField()
    shape = (24, 24, 24, 4) if args.small else (512, 512, 512, 16)
    out = args.out_dir / "spacetime.npy"
    print(f"evaluating {'x'.join(map(str, shape))} points x 3 values to {out}")
    nfd_fast.render(field, shape, out=out, resume=not args.overwrite, progress=not args.small)
    volume = np.load(out, mmap_mode="r")
    # a strided crop of a 10^6-per-side virtual plane at t = 0.5: only 64 x 64 points evaluated
    big = (10**6, 10**6, 1, 1)
    region = [slice(500_000, 500_000 + 64 * 1000, 1000), slice(0, 64), slice(None), slice(None)]
    crop = nfd_fast.render(field, big, region=region, bounds=[(-1, 1)] * 3 + [(0.5, 0.5)], progress=False)
    print(f"wrote {out} {list(volume.shape)}; value range [{float(volume.min()):.3f}, "
          f"{float(volume.max()):.3f}]; crop of the 10^6 x 10^6 plane: {list(crop.shape)}")


if __name__ == "__main__":
    main()
