"""Relative error of each fused_mlp precision option against the float64 reference, on the
README's SIREN (2 -> 256 x 3 -> 3, SIREN init, w0 = 30): `python benchmarks/precision_errors.py`.

On a CPU this runs the kernels through the Triton interpreter, which computes every dot in
float32: the tf32 / tf32x3 / bf16 rows are only meaningful on a GPU and are skipped here.
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import nfd_fast  # noqa: E402
from nfd_fast.nn import Siren  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
OPTIONS = [("float32", "ieee", False), ("float32", "ieee", True), ("float32", "tf32x3", False),
           ("float32", "tf32", False), ("float16", "fp16", False), ("bfloat16", "bf16", False)]


def rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


def main(n: int = 4096) -> int:
    torch.manual_seed(0)
    ref_model = Siren(2, 256, 3, 3).to(DEVICE)
    x = torch.rand(n, 2, device=DEVICE) * 2 - 1
    with nfd_fast.use_backend("torch"):
        y_ref = ref_model.double()(x.double())
    print(f"| dtype | precision | fast_sine | rel. error vs float64 ({'GPU' if ON_GPU else 'CPU interpreter'}) |")
    print("|---|---|---|---|")
    for dtype, precision, fast in OPTIONS:
        if not ON_GPU and precision in ("tf32", "tf32x3", "bf16"):
            continue
        model = Siren(2, 256, 3, 3, precision=precision, fast_sine=fast).to(DEVICE)
        model.load_state_dict(ref_model.state_dict())
        model = model.to(getattr(torch, dtype))
        with nfd_fast.use_backend("triton"), torch.no_grad():
            y = model(x.to(getattr(torch, dtype)))
        print(f"| {dtype} | {precision} | {fast} | {rel(y, y_ref):.2e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
