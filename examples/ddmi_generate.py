"""Train a tiny DDMI and generate images at two resolutions from the same latents.

    python examples/ddmi_generate.py [--small] [--out-dir DIR]

DDMI (nfd_fast.models.ddmi): a D2C-VAE turns an image into a latent and the latent into
three basis fields; the coarse-to-fine readout reads them at any coordinates. Here a
tiny configuration trains on synthetic blob images (16^2), then a latent diffusion model
(fused DDIM steps through nfd_fast's Sampler) draws latents, the fields are decoded once
and read at 16^2 and 64^2. The script prints the reconstruction PSNR of held-out images
and saves the samples as .npy. --small trains briefly (seconds on a CPU).
"""
import argparse
from pathlib import Path

import numpy as np
import torch

from nfd_fast.models.blocks import psnr, random_blobs
from nfd_fast.models.ddmi import DDMI, DDMIConfig, blob_images


def train(model: DDMI, images: torch.Tensor, steps: int, generator: torch.Generator) -> None:
    """The VAE and readout first (L1 + annealed KL), then the latent diffusion model."""
    stages = ((list(model.vae.parameters()) + list(model.readout.parameters()),
               lambda batch, step: model.vae_loss(batch, step, steps)[0]),
              (list(model.diffusion.parameters()), lambda batch, step: model.diffusion_loss(batch)))
    for parameters, loss_of in stages:
        opt = torch.optim.Adam(parameters, lr=2e-3)
        for step in range(steps):
            batch = images[torch.randint(0, len(images), (16,), generator=generator)]
            loss = loss_of(batch, step)
            opt.zero_grad()
            loss.backward()
            opt.step()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="brief training: seconds on a CPU")
    parser.add_argument("--out-dir", default=".", help="where the samples' .npy files go")
    args = parser.parse_args(argv)
    steps, sampling_steps = (30, 10) if args.small else (800, 50)
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    images = blob_images(random_blobs(256, channels=3, generator=g), 16)
    model = DDMI(DDMIConfig.tiny(16))
    train(model, images, steps, g)
    held = blob_images(random_blobs(8, channels=3, generator=g), 16)
    with torch.no_grad():
        print(f"held-out reconstruction PSNR at 16^2: {psnr(model.reconstruct(held), held, 2.0):.2f} dB")
        small, large = model.generate(4, [16, 64], steps=sampling_steps, generator=g)
    out = Path(args.out_dir)
    for image in (small, large):
        np.save(out / f"ddmi_samples_{image.shape[-1]}.npy", image.numpy())
    print(f"4 samples from the same latents: {list(small.shape)} and {list(large.shape)}")


if __name__ == "__main__":
    main()
