"""Kernel tests run on CUDA when there is a GPU, else on the CPU through the Triton
interpreter, which must be switched on before Triton is first imported."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Triton 3.9 warns unless this is set; 1 keeps the behaviour of older releases (3.6 on GPUs)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    # the suite's tensors are small: one intra-op thread avoids thread hand-offs that cost
    # more than the work (and stalls when the cores are shared)
    torch.set_num_threads(1)
ON_GPU = DEVICE == "cuda"
# The interpreter computes bfloat16 tl.dot wrongly: bf16 kernels are tested on a GPU only.
KERNEL_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])


@pytest.fixture
def device():
    return DEVICE


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64 (NaN if either holds a NaN)."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    return ((a - e).norm() / e.norm().clamp_min(1e-30)).item()


def assert_backends_agree_on_a_step(model, loss_of, loss_tol=1e-5, grad_tol=1e-4):
    """loss_of(model) (a scalar loss) and every parameter's gradient agree between the
    fused kernels ("triton") and the reference ("torch"), the latter on a copy of the
    model so that state a step updates (running statistics) starts equal for both."""
    import copy

    import nfd_fast

    results = []
    for name, module in (("triton", model), ("torch", copy.deepcopy(model))):
        module.zero_grad(set_to_none=True)
        with nfd_fast.use_backend(name):
            loss = loss_of(module)
            loss.backward()
        results.append((loss.detach(), [p.grad for p in module.parameters()]))
    (l_fused, g_fused), (l_ref, g_ref) = results
    assert rel_err(l_fused, l_ref) < loss_tol
    for (name, _), a, b in zip(model.named_parameters(), g_fused, g_ref):
        assert rel_err(a, b) < grad_tol, name
