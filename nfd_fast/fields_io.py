"""Fitting a Siren to an image, and field checkpoints that rebuild their module.

An image becomes values in [-1, 1] on SIREN's 'ij' grid over [-1, 1]^2: 8-bit channels are
divided by 255, 16-bit ones by 65535, float images are taken as [0, 1] intensities.
A fit minimises the mean squared error with Adam on `batch_points` random pixels per step
(the whole image when it is smaller), reports PSNR = 10 log10(2^2 / MSE) on the whole
image at the end, and can save its state every N steps: a checkpoint holds the module's
configuration and state_dict (what `load_field` and `nfd-fast render` need) and, under
"fit", the step, optimiser and random-generator states that let a fit resume exactly.
"""
from __future__ import annotations

import inspect
import math
import os
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .nn import Siren

CHECKPOINT_FORMAT = "nfd_fast.field/1"
GREY_MODES = {"1": "L", "L": "L", "LA": "L"}  # 8-bit grey; other 8-bit modes become RGB


def resolve_device(name=None) -> torch.device:
    """torch.device(name) (a name or a device), checked to exist on this machine; default
    cuda when available, else cpu."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device: {name!r} is not a device name (cpu, cuda, cuda:1, ...)") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {name} asked for, but torch sees no CUDA GPU on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device: {name} asked for, but torch sees {torch.cuda.device_count()} GPU(s)")
    elif device.type != "cpu":
        raise ValueError(f"device: expected cpu or cuda, got {name!r}")
    return device


def load_image(path) -> torch.Tensor:
    """An image file as float32 [H, W, C] in [-1, 1] (C = 1 for grey, 3 for colour), each
    bit depth at its real range (see the module docstring)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"image: {path} is a directory, not an image file")
    if not path.exists():
        raise FileNotFoundError(f"image: {path} does not exist")
    try:
        img = Image.open(path)
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"image: {path} is not an image Pillow can read ({type(exc).__name__})") from None
    if img.mode.startswith("I"):  # PNG opens 16-bit grey as I;16 (or I): 0 .. 65535
        arr = np.asarray(img, dtype=np.float64)
        if arr.size and (arr.max() > 65535 or arr.min() < 0):
            raise ValueError(f"image: {path} holds integers outside 0 .. 65535; save it as 8- or 16-bit")
        arr = arr / 65535.0
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
    else:
        arr = np.asarray(img.convert(GREY_MODES.get(img.mode, "RGB")), dtype=np.float64) / 255.0
    if arr.ndim == 2:
        arr = arr[..., None]
    return torch.from_numpy((arr * 2 - 1).astype(np.float32))


def save_field(path, model: Siren, **extra) -> None:
    """Write the checkpoint atomically (a kill mid-write leaves the previous one intact)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": CHECKPOINT_FORMAT, "class": "Siren", "config": model.config,
                "state_dict": model.state_dict(), **extra}, tmp)
    os.replace(tmp, path)


def read_checkpoint(path) -> dict:
    """The checkpoint dict of a file written by save_field (weights only, on the CPU)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"field: {path} is a directory, not a checkpoint")
    if not path.exists():
        raise FileNotFoundError(f"field: {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # not a torch file at all (pickle / zip errors)
        raise ValueError(f"{path}: not an nfd_fast field checkpoint ({type(exc).__name__})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not an nfd_fast field checkpoint (written by `nfd-fast fit`)")
    for key, kind in (("config", dict), ("state_dict", dict)):
        if not isinstance(ckpt.get(key), kind):
            raise ValueError(f"{path}: the checkpoint has no {key} (a damaged or hand-made file)")
    return ckpt


def build_siren(config: dict, state_dict: dict, where: str) -> Siren:
    """A Siren from a checkpoint's config and state_dict. The module is first built on the
    meta device (no memory), so a config whose sizes disagree with the stored tensors is
    refused before anything is allocated; then the stored tensors are loaded."""
    allowed = set(inspect.signature(Siren).parameters)
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise ValueError(f"{where}: config has keys a Siren does not take: {unknown}")
    try:
        with torch.device("meta"):
            model = Siren(**config)
    except Exception as exc:
        raise ValueError(f"{where}: config {config} does not describe a Siren "
                         f"({type(exc).__name__}: {exc})") from exc
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    stored = {k: tuple(v.shape) if torch.is_tensor(v) else type(v).__name__ for k, v in state_dict.items()}
    if expected != stored:
        missing, extra = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
        wrong = [f"{k} {list(stored[k])} (config wants {list(expected[k])})"
                 for k in sorted(set(expected) & set(stored)) if stored[k] != expected[k]]
        parts = ([f"missing {missing}"] if missing else []) + ([f"unexpected {extra}"] if extra else []) + wrong
        raise ValueError(f"{where}: state_dict does not match its config: " + "; ".join(parts))
    model = model.to_empty(device="cpu")
    model.load_state_dict(state_dict)
    return model


def load_field(path, device=None) -> tuple:
    """(module, checkpoint dict) from a file written by save_field."""
    device = resolve_device(device or "cpu")
    ckpt = read_checkpoint(path)
    return build_siren(ckpt["config"], ckpt["state_dict"], str(path)).to(device), ckpt


def psnr(mse: float, value_range: float = 2.0) -> float:
    return 10 * math.log10(value_range**2 / max(mse, 1e-20))


class ImageFit:
    """Fitting Siren(2 -> hidden x layers -> C) to an image [H, W, C] on SIREN's 'ij' grid
    in [-1, 1]^2 (Adam, as SIREN's image example), in steps that can stop and resume."""

    def __init__(self, image: torch.Tensor, *, hidden: int = 256, layers: int = 3, lr: float = 1e-4,
                 batch_points: int = 2**14, seed: int = 0, device=None):
        check_fit_arguments(hidden=hidden, layers=layers, lr=lr, batch_points=batch_points)
        from .render import GridSpec

        self.device = resolve_device(device)
        H, W, C = image.shape
        self.points, self.batch_points, self.seed, self.lr = H * W, batch_points, seed, lr
        self.coords = GridSpec((H, W)).coordinates(0, H * W, self.device)
        self.target = image.reshape(-1, C).to(self.device)
        torch.manual_seed(seed)
        self.model = Siren(2, hidden, layers, C).to(self.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=lr)
        self.generator = torch.Generator(self.device).manual_seed(seed)
        self.step = 0

    def train(self, steps: int, *, every: int = 0, on_checkpoint: Optional[Callable] = None,
              progress: bool = True) -> None:
        """Run until `steps` steps in all; call on_checkpoint(self) every `every` steps."""
        bar = range(self.step, steps)
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(bar, desc="fit", unit="step", total=steps, initial=self.step)
        for _ in bar:
            loss = self._one_step()
            self.step += 1
            if progress:
                bar.set_postfix(psnr=f"{psnr(loss):.2f} dB")
            if on_checkpoint is not None and every and self.step % every == 0 and self.step < steps:
                on_checkpoint(self)

    def _one_step(self) -> float:
        if self.points <= self.batch_points:  # the whole image is one batch
            x, y = self.coords, self.target
        else:
            idx = torch.randint(0, self.points, (self.batch_points,), device=self.device,
                                generator=self.generator)
            x, y = self.coords[idx], self.target[idx]
        loss = ((self.model(x) - y) ** 2).mean()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return loss.item()

    @torch.no_grad()
    def psnr(self, chunk: int = 2**16) -> float:
        """PSNR of the whole image, evaluated in chunks."""
        sq = sum(((self.model(self.coords[i:i + chunk]) - self.target[i:i + chunk]) ** 2).sum().item()
                 for i in range(0, self.points, chunk))
        return psnr(sq / self.target.numel())

    def state(self) -> dict:
        """What resuming needs, for the checkpoint's "fit" entry."""
        return {"step": self.step, "lr": self.lr, "batch_points": self.batch_points, "seed": self.seed,
                "optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state()}

    def restore(self, fit_state: dict, state_dict: dict) -> None:
        self.model.load_state_dict(state_dict)
        self.optimizer.load_state_dict(fit_state["optimizer"])
        self.generator.set_state(fit_state["generator"])
        self.step = int(fit_state["step"])
        for group in self.optimizer.param_groups:  # this run's learning rate, not the saved one
            group["lr"] = self.lr


def check_fit_arguments(**values) -> None:
    """Positive sizes, step counts and learning rate (named as the CLI and fit_image name them)."""
    minimum = {"hidden": 1, "layers": 0, "steps": 1, "batch_points": 1, "checkpoint_every": 0}
    for name, value in values.items():
        if name == "lr":
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"lr: expected a positive finite learning rate, got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, int) or value < minimum[name]:
            raise ValueError(f"{name}: expected a whole number >= {minimum[name]}, got {value!r}")


def fit_image(image: torch.Tensor, *, hidden: int = 256, layers: int = 3, steps: int = 500,
              lr: float = 1e-4, batch_points: int = 2**14, device=None, progress: bool = True,
              seed: int = 0) -> tuple:
    """Fit a Siren to image [H, W, C] (see ImageFit). Returns (model, PSNR in dB on the
    whole image)."""
    check_fit_arguments(steps=steps)
    fit = ImageFit(image, hidden=hidden, layers=layers, lr=lr, batch_points=batch_points, seed=seed,
                   device=device)
    fit.train(steps, progress=progress)
    return fit.model, fit.psnr()
