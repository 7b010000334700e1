"""fused_mlp's widths: in and out up to the hidden limit in the kernel, anything wider
through the reference with the reason given once, and no limits on the reference backend."""
import warnings

import pytest
import torch

import nfd_fast
from nfd_fast.ops import fused_mlp
from nfd_fast.ops.fused_mlp import MAX_HIDDEN, MAX_IN, MAX_OUT, fused_mlp_with_jacobian

from conftest import DEVICE, rel_err
from test_fused_mlp import check_against_reference, make_problem


def test_kernel_limits_match_the_hidden_limit():
    assert MAX_IN == MAX_OUT == MAX_HIDDEN == 512


@pytest.mark.parametrize("widths", [(70, 24, 67), (70, 40, 24, 67)])
def test_odd_wide_input_and_output_on_the_kernel(widths):
    """A denoiser's input (a 64-d latent plus a time embedding) and a wide output, odd
    sizes, even and odd layer counts: outputs and every gradient vs float64."""
    p = make_problem(widths, n=13, batch=2, activation="silu", mods=("shift",))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the kernel takes these widths: no fallback
        check_against_reference(p, 1e-4)


def _problem_over_the_limits(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(5, 3, generator=g, device="cpu").to(DEVICE) * 2 - 1
    weights = [(torch.rand(600, 3, generator=g) - 0.5).to(DEVICE).requires_grad_(),
               (torch.rand(2, 600, generator=g) * 0.1 - 0.05).to(DEVICE).requires_grad_()]
    return x, weights


def test_wider_than_the_kernel_runs_the_reference_and_says_why_once():
    x, weights = _problem_over_the_limits()
    with nfd_fast.use_backend("triton"), pytest.warns(UserWarning, match="hidden width 600 > 512") as record:
        y = fused_mlp(x, weights, w0=2.0)
        fused_mlp(x, weights, w0=2.0)
    assert len([w for w in record if "600" in str(w.message)]) == 1  # once per reason
    with nfd_fast.use_backend("torch"):
        want = fused_mlp(x.double(), [w.double() for w in weights], w0=2.0)
    assert rel_err(y, want) < 1e-5
    got = torch.autograd.grad(y.sum(), weights)
    ref = torch.autograd.grad(want.sum(), [w for w in weights])
    for a, b in zip(got, ref):
        assert rel_err(a, b) < 1e-5


def test_reference_backend_has_no_width_limits():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 700, generator=g, dtype=torch.float64)
    weights = [torch.rand(900, 700, generator=g, dtype=torch.float64) * 0.01,
               torch.rand(800, 900, generator=g, dtype=torch.float64) * 0.01]
    with nfd_fast.use_backend("torch"), warnings.catch_warnings():
        warnings.simplefilter("error")
        y = fused_mlp(x, weights, activation="relu")
    assert torch.allclose(y, torch.relu(x @ weights[0].T) @ weights[1].T)


def test_jacobian_beyond_its_kernel_input_width_runs_the_reference():
    g = torch.Generator().manual_seed(2)
    x = (torch.rand(3, 70, generator=g) * 2 - 1).to(DEVICE)
    weights = [(torch.rand(16, 70, generator=g) * 0.2 - 0.1).to(DEVICE),
               (torch.rand(2, 16, generator=g) - 0.5).to(DEVICE)]
    with nfd_fast.use_backend("triton"), pytest.warns(UserWarning, match="in width 70 > 64"):
        y, jac = fused_mlp_with_jacobian(x, weights, w0=2.0)
    want = torch.autograd.functional.jacobian(
        lambda v: fused_mlp(v.unsqueeze(0), weights, w0=2.0)[0], x[0])
    assert jac.shape == (3, 2, 70) and rel_err(jac[0], want) < 1e-5
