"""Fitting a Siren to an image, and field checkpoints that rebuild their module."""
from __future__ import annotations

import math

import numpy as np
import torch

from .nn import Siren

CHECKPOINT_FORMAT = "nfd_fast.field/1"


def load_image(path) -> torch.Tensor:
    """An image file as float32 [H, W, C] in [-1, 1] (C = 1 for grey, 3 for colour)."""
    from PIL import Image

    img = Image.open(path)
    img = img.convert("L" if img.mode in ("L", "I", "I;16", "F", "1") else "RGB")
    arr = np.asarray(img, dtype=np.float32) / 255.0
    if arr.ndim == 2:
        arr = arr[..., None]
    return torch.from_numpy(arr * 2 - 1)


def save_field(path, model: Siren, **extra) -> None:
    torch.save({"format": CHECKPOINT_FORMAT, "class": "Siren", "config": model.config,
                "state_dict": model.state_dict(), **extra}, path)


def load_field(path, device=None) -> tuple:
    """(module, checkpoint dict) from a file written by save_field."""
    try:
        ckpt = torch.load(path, map_location=device or "cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # not a torch file at all (pickle / zip errors)
        raise ValueError(f"{path}: not an nfd_fast field checkpoint ({type(exc).__name__})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not an nfd_fast field checkpoint (written by `nfd-fast fit`)")
    model = Siren(**ckpt["config"])
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device or "cpu"), ckpt


def psnr(mse: float, value_range: float = 2.0) -> float:
    return 10 * math.log10(value_range**2 / max(mse, 1e-20))


def fit_image(image: torch.Tensor, *, hidden: int = 256, layers: int = 3, steps: int = 500,
              lr: float = 1e-4, batch: int = 2**18, device=None, progress: bool = True,
              seed: int = 0) -> tuple:
    """Fit Siren(2 -> hidden x layers -> C) to image [H, W, C] on SIREN's 'ij' grid in
    [-1, 1]^2 (Adam, as the SIREN image example). Returns (model, final PSNR in dB)."""
    from .render import GridSpec

    torch.manual_seed(seed)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    H, W, C = image.shape
    coords = GridSpec((H, W)).coordinates(0, H * W, device)
    target = image.reshape(-1, C).to(device)
    model = Siren(2, hidden, layers, C).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    bar = range(steps)
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(bar, desc="fit", unit="step")
    gen = torch.Generator(device).manual_seed(seed)
    for _ in bar:
        idx = None if H * W <= batch else torch.randint(0, H * W, (batch,), device=device, generator=gen)
        x, y = (coords, target) if idx is None else (coords[idx], target[idx])
        loss = ((model(x) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if progress:
            bar.set_postfix(psnr=f"{psnr(loss.item()):.2f} dB")
    with torch.no_grad():
        mse = sum(((model(coords[i:i + batch]) - target[i:i + batch]) ** 2).sum().item()
                  for i in range(0, H * W, batch)) / (H * W * C)
    return model, psnr(mse)
