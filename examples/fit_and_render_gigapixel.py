"""Fit a SIREN to an image, then render it at gigapixel size, streamed to a .npy file.

    python examples/fit_and_render_gigapixel.py [IMAGE] [--size 32768] [--out-dir .] [--small]

Without IMAGE a synthetic test pattern stands in. The render writes SIZE x SIZE x C values
in float16 chunk by chunk (resident memory stays bounded by a chunk), plus a PNG preview;
kill it and run the same command again to continue where it stopped (--overwrite starts
over). --small fits a tiny field for a few steps and renders 256 x 256 (seconds on a CPU).
The same two steps from the shell: `nfd-fast fit IMAGE --out field.pt` and
`nfd-fast render field.pt --shape 32768x32768 --out big.npy --preview big.png`.
"""
import argparse
import math
from pathlib import Path

import numpy as np
import torch

import nfd_fast
from nfd_fast.fields_io import fit_image, load_image


def test_pattern(size: int) -> torch.Tensor:
    """[size, size, 3] in [-1, 1]: rings and a colour ramp, detail at every scale."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    r = torch.sqrt(x**2 + y**2)
    return torch.stack([torch.sin(12 * math.pi * r**2), x, y * torch.cos(4 * math.pi * x)], -1)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image", nargs="?", help="an image file (default: a synthetic pattern)")
    parser.add_argument("--size", type=int, default=32768, help="rendered side in pixels")
    parser.add_argument("--out-dir", type=Path, default=Path("."))
    parser.add_argument("--small", action="store_true", help="tiny sizes: seconds on a CPU")
    parser.add_argument("--overwrite", action="store_true", help="start the render over")
    args = parser.parse_args(argv)
    image = load_image(args.image) if args.image else test_pattern(32 if args.small else 256)
    sizes = dict(hidden=32, layers=1, steps=60, lr=1e-3) if args.small else dict(steps=500)
    field, psnr = fit_image(image, device="cpu" if args.small else None, **sizes)
    print(f"fitted {list(image.shape)}: PSNR {psnr:.2f} dB")
    side = 256 if args.small else args.size
    out = args.out_dir / f"render_{side}.npy"
    print(f"rendering {side} x {side} x {image.shape[-1]} float16 "
          f"({side * side * image.shape[-1] * 2 / 2**30:.2f} GiB) to {out}")
    nfd_fast.render(field, (side, side), out=out, dtype=torch.float16, preview=out.with_suffix(".png"),
                    resume=not args.overwrite, progress=not args.small)
    corner = np.load(out, mmap_mode="r")[0, 0].astype(np.float32)
    values = lambda v: " ".join(f"{c:+.3f}" for c in v)  # noqa: E731
    print(f"wrote {out} and {out.with_suffix('.png')}; top-left pixel {values(corner)} "
          f"(image: {values(image[0, 0].tolist())})")


if __name__ == "__main__":
    main()
