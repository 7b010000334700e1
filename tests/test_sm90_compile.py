"""The real (not interpreted) kernels compile for sm_90a as they launch, fit an H100's
shared memory, and (where fixed) do not spill."""
import pytest

from nfd_fast import kernel_report

H100_MAX_SHARED = 232448


@pytest.fixture(scope="module")
def ddim_kernels():
    rep = kernel_report.report(cases=["ddim_step_2^26"])
    assert not rep["errors"], rep["errors"]
    return rep["kernels"]


def test_diffusion_step_compiles_as_launched(ddim_kernels):
    """The in-kernel-noise DDIM step: one variant, compiled with its launch's num_warps."""
    assert [k["name"] for k in ddim_kernels] == ["diffusion_step_kernel"]
    k = ddim_kernels[0]
    assert k["registers"] and k["shared_bytes"] <= H100_MAX_SHARED
    assert k["static"].get("STG.128", 0) > 0  # aligned outputs store 16 bytes per thread


def test_diffusion_step_does_not_spill(ddim_kernels):
    for k in ddim_kernels:
        assert k["stack_bytes"] == 0 and k["spill_instructions"] == 0, k["name"]
