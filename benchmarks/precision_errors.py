"""Relative error of each fused_mlp precision mode against the float64 reference, on the
README's SIREN (2 -> 256 x 3 -> 3, SIREN init, w0 = 30): `python benchmarks/precision_errors.py`.

Every mode is measured on the CPU by emulation: the reference with the dot operands rounded
as that mode's tensor cores round them (tf32, bf16, fp16 mantissas; tf32x3's and bf16x3's
three-product splits) and float32 accumulation, the first layer in float32 as in the
kernels. The float32 "ieee" rows also run the kernel itself (through the Triton interpreter
on a CPU, compiled on a GPU), with and without fast_sine, and so does "bf16x3" (on a CPU
the interpreter sums its exact bfloat16 pieces in float32 dots; on a GPU, wgmma).
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import nfd_fast  # noqa: E402
from nfd_fast.nn import Siren  # noqa: E402
from nfd_fast.ops.fused_mlp import fused_mlp_emulated  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
EMULATED = [("float32", "ieee"), ("float32", "tf32x3"), ("float32", "bf16x3"),
            ("float32", "tf32"), ("float32", "fp16"), ("float32", "bf16"), ("float16", "fp16"),
            ("bfloat16", "bf16")]
KERNEL = [("float32", "ieee", False), ("float32", "ieee", True), ("float32", "bf16x3", False)]


def rel(a, b):
    return ((a.double().cpu() - b).norm() / b.norm()).item()


def siren_arguments(model: Siren, dtype: torch.dtype, precision: str) -> dict:
    """The Siren's fused_mlp arguments with its parameters in `dtype`."""
    args = model.fused_mlp_arguments()
    args["weights"] = [w.detach().to(dtype) for w in args["weights"]]
    args["biases"] = [b.detach().to(dtype) for b in args["biases"]]
    return {**args, "precision": precision}


def main(n: int = 4096) -> int:
    torch.manual_seed(0)
    ref_model = Siren(2, 256, 3, 3)
    x = torch.rand(n, 2) * 2 - 1
    with nfd_fast.use_backend("torch"), torch.no_grad():
        y_ref = ref_model.double()(x.double())
    ref_model.float()
    print("| dtype | precision | fast_sine | how | rel. error vs float64 |")
    print("|---|---|---|---|---|")
    for dtype, precision in EMULATED:
        cast = getattr(torch, dtype)
        y = fused_mlp_emulated(x.to(cast), **siren_arguments(ref_model, cast, precision))
        print(f"| {dtype} | {precision} | False | emulated (CPU) | {rel(y, y_ref):.1e} |")
    for dtype, precision, fast in KERNEL:
        model = Siren(2, 256, 3, 3, precision=precision, fast_sine=fast).to(DEVICE)
        model.load_state_dict(ref_model.state_dict())
        with nfd_fast.use_backend("triton"), torch.no_grad():
            y = model(x.to(DEVICE))
        where = "kernel (GPU)" if ON_GPU else "kernel (CPU interpreter)"
        print(f"| {dtype} | {precision} | {fast} | {where} | {rel(y, y_ref):.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
