"""fused_mlp's host side: parameters packed once per version, one backward compile for
every layer."""
import os
import subprocess
import sys

import torch

import nfd_fast
from nfd_fast.kernels import fused_mlp as KM
from nfd_fast.ops import fused_mlp

from conftest import DEVICE


class CopyCounter:
    """Counts the ATen calls that write into memory (packing's zeros, fills and copies),
    seen by the profiler inside the op's implementation too."""

    def __enter__(self):
        self.profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        self.profile.__enter__()
        return self

    def __exit__(self, *exc):
        self.profile.__exit__(*exc)
        names = [e.name for e in self.profile.events()]
        self.writes = sum(n in ("aten::copy_", "aten::fill_", "aten::zero_") for n in names)


def _record_forward_launches(monkeypatch):
    launches = []

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append(args)
            return launch

    monkeypatch.setattr(KM, "fused_mlp_fwd_kernel", Recorder())
    return launches


def test_parameters_are_packed_once_per_version(monkeypatch):
    launches = _record_forward_launches(monkeypatch)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(7, 3, generator=g).to(DEVICE)
    weights = [torch.rand(24, 3, generator=g).to(DEVICE), torch.rand(20, 24, generator=g).to(DEVICE),
               torch.rand(5, 20, generator=g).to(DEVICE)]
    biases = [torch.rand(24, generator=g).to(DEVICE), None, torch.rand(5, generator=g).to(DEVICE)]
    with nfd_fast.use_backend("triton"), torch.no_grad():
        first = CopyCounter()
        with first:
            fused_mlp(x, weights, biases, activation="relu")
        again = CopyCounter()
        with again:
            fused_mlp(x, weights, biases, activation="relu")
        weights[1].add_(0.5)  # an in-place update (an optimizer step) bumps the version
        stepped = CopyCounter()
        with stepped:
            fused_mlp(x, weights, biases, activation="relu")
    assert first.writes > 0 and again.writes == 0 and stepped.writes > 0
    # the launches read the packed copies: the same buffers until the update, then new ones
    packed = [args[2] for args in launches]  # W_1 .. W_{L-1}, padded
    assert packed[0] is packed[1] and packed[2] is not packed[1]
    assert torch.equal(packed[2][0, 0, :20, :24].float(), weights[1].float())
    assert not torch.equal(packed[1][0, 0, :20, :24].float(), weights[1].float())


def test_new_tensors_at_a_reused_address_are_repacked(monkeypatch):
    """A freed parameter's address and id can come back for a new tensor of version 0:
    the weak references tell them apart."""
    launches = _record_forward_launches(monkeypatch)
    x = torch.rand(4, 2, device=DEVICE)
    with nfd_fast.use_backend("triton"), torch.no_grad():
        for value in (1.0, 2.0, 3.0):
            weights = [torch.full((16, 2), value, device=DEVICE), torch.full((3, 16), value, device=DEVICE)]
            fused_mlp(x, weights, activation="relu")
            del weights
    assert [args[1][0, 0, 0].item() for args in launches] == [1.0, 2.0, 3.0]


def test_backward_layer_argument_is_not_specialised():
    """Triton specialises int arguments (== 1, % 16) unless told not to: the layer index
    would compile one backward kernel per layer class."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("from nfd_fast.kernels import fused_mlp as K; "
            "print([p.name for p in K.fused_mlp_bwd_layer_kernel.params if p.do_not_specialize])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "['layer']"


def _ops_run(fn) -> list:
    """Names of the nfd_fast custom ops dispatched while fn() runs."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return [e.name for e in prof.events() if e.name.startswith("nfd_fast::")]


def test_eager_call_without_autograd_skips_the_custom_op_dispatch():
    """No gradient wanted, no tracer watching: the op's implementation runs directly (its
    dispatch was a third of a call's host time), with the very same result; calls that
    need autograd keep the registered op."""
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(33, 2, generator=g) * 2 - 1).to(DEVICE)
    weights = [(torch.rand(32, 2, generator=g) - 0.5).to(DEVICE),
               (torch.rand(3, 32, generator=g) - 0.5).to(DEVICE).requires_grad_()]
    with nfd_fast.use_backend("triton"):
        with torch.no_grad():
            assert _ops_run(lambda: fused_mlp(x, weights)) == []
            fast = fused_mlp(x, weights)
        assert _ops_run(lambda: fused_mlp(x, weights)) == ["nfd_fast::fused_mlp"]
        through_op = fused_mlp(x, weights)
    assert through_op.requires_grad and torch.equal(fast, through_op.detach())


def test_host_time_of_a_forward_with_the_launch_stubbed(monkeypatch):
    """The host side of one no-grad fused_mlp call (validation, packed-parameter look-up,
    launch arguments) with the kernel launch stubbed: under 50 us on an H100 host; here a
    loose bound on a shared CPU, against regressions of several times."""
    import statistics
    import time

    _record_forward_launches(monkeypatch)
    siren = nfd_fast.nn.Siren(2, 256, 3, 3).to(DEVICE)
    args = siren.fused_mlp_arguments()
    x = torch.rand(4096, 2, device=DEVICE)
    times = []
    with nfd_fast.use_backend("triton"), torch.no_grad():
        for i in range(600):
            start = time.perf_counter()
            fused_mlp(x, **args)
            if i >= 100:  # past the first calls (caches filled)
                times.append(time.perf_counter() - start)
    assert statistics.median(times) < 500e-6
