"""The benchmark cases, at the canonical shapes the issues give (quick: small shapes)."""
from __future__ import annotations

import torch

import nfd_fast
from nfd_fast.nn import Siren

from .runner import Case, Rotating, Target, Work, register

ROTATIONS = 3  # input sets per case; 3 x 2^22 x 2 float32 coordinates = 100 MB > L2


def _with_backend(name: str, fn):
    def call(*args):
        with nfd_fast.use_backend(name):
            return fn(*args)

    return call


def mlp_flops(widths, n: int) -> float:
    """Multiply-adds of the linear layers, 2 FLOPs each (activations not counted)."""
    return 2.0 * n * sum(i * o for i, o in zip(widths[:-1], widths[1:]))


def _siren_and_coords(device, quick):
    widths = (2, 256, 256, 256, 256, 3)
    n = 2**14 if quick else 2**22
    torch.manual_seed(0)
    siren = Siren(2, 256, 3, 3).to(device)
    coords = [(torch.rand(n, 2, device=device) * 2 - 1,) for _ in range(ROTATIONS)]
    return widths, n, siren, coords


def _implementations(step, siren, variants):
    """eager / compiled reference and nfd_fast variants of one step(siren_like, *inputs);
    variants: {label: Siren keyword options}."""
    compiled = torch.compile(_with_backend("torch", lambda *a: step(siren, *a)))
    impls = {
        "eager": _with_backend("torch", lambda *a: step(siren, *a)),
        "compiled": compiled,
        "nfd_fast": _with_backend("auto", lambda *a: step(siren, *a)),
    }
    for label, options in variants.items():
        variant = Siren(2, 256, 3, 3, **options).to(next(siren.parameters()).device)
        variant.load_state_dict(siren.state_dict())
        impls[f"nfd_fast[{label}]"] = _with_backend("auto", lambda *a, v=variant: step(v, *a))
    return impls


PRECISION_VARIANTS = {"tf32x3": {"precision": "tf32x3"}, "bf16": {"precision": "bf16"}}
TRAIN_VARIANTS = {**PRECISION_VARIANTS, "recompute": {"recompute": True}}


def _build_siren_inference(device, quick):
    widths, n, siren, coords = _siren_and_coords(device, quick)

    def step(model, x):
        with torch.no_grad():
            return model(x)

    work = Work(mlp_flops(widths, n), n * (2 + 3) * 4, n)
    impls = _implementations(step, siren, PRECISION_VARIANTS)
    return work, {k: Rotating(f, coords) for k, f in impls.items()}


def _build_siren_train_step(device, quick):
    widths, n, siren, coords = _siren_and_coords(device, quick)
    target = torch.rand(n, 3, device=device)

    def step(model, x):
        loss = ((model(x) - target) ** 2).mean()
        loss.backward()
        return loss

    # forward + the two backward products per layer; bytes: coordinates and targets once
    work = Work(3 * mlp_flops(widths, n), n * (2 + 3) * 4, n)
    impls = _implementations(step, siren, TRAIN_VARIANTS)
    return work, {k: Rotating(f, coords) for k, f in impls.items()}


ISSUE_2 = "issue 2 (H100)"
register(Case(
    "siren_inference", "Siren 2->256x3->3 forward, 2^22 coords (quick 2^14)",
    _build_siren_inference, gpu_only_impls=("nfd_fast[tf32x3]", "nfd_fast[bf16]"),
    targets=(Target("nfd_fast*", "speedup", 10.0, "eager", ISSUE_2),
             Target("nfd_fast*", "speedup", 2.0, "compiled", ISSUE_2),
             Target("nfd_fast[bf16]", "roofline", 0.5, source=ISSUE_2 + ", bf16 matmul rate"))))
register(Case(
    "siren_train_step", "Siren 2->256x3->3 forward+backward (MSE), 2^22 coords (quick 2^14)",
    _build_siren_train_step,
    gpu_only_impls=("nfd_fast[tf32x3]", "nfd_fast[bf16]", "nfd_fast[recompute]"),
    targets=(Target("nfd_fast*", "speedup", 3.0, "eager", ISSUE_2),)))
