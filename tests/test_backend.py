import subprocess
import sys

import pytest
import torch

import nfd_fast
from nfd_fast import backend

from conftest import DEVICE


def test_default_is_auto_and_context_restores():
    assert nfd_fast.get_backend() == "auto"
    with nfd_fast.use_backend("torch"):
        assert nfd_fast.get_backend() == "torch"
        with nfd_fast.use_backend("triton"):
            assert nfd_fast.get_backend() == "triton"
        assert nfd_fast.get_backend() == "torch"
    assert nfd_fast.get_backend() == "auto"


def test_set_backend_and_bad_name():
    nfd_fast.set_backend("torch")
    try:
        assert nfd_fast.get_backend() == "torch"
    finally:
        nfd_fast.set_backend("auto")
    with pytest.raises(ValueError, match="backend must be one of"):
        nfd_fast.set_backend("cuda")


def test_auto_picks_torch_on_cpu_and_for_float64():
    cpu = torch.zeros(1)
    assert backend.resolve("op", cpu) == "torch"
    if DEVICE == "cuda":
        assert backend.resolve("op", cpu.cuda()) == "triton"
        assert backend.resolve("op", cpu.cuda().double()) == "torch"


def test_explicit_triton_rejects_float64():
    with nfd_fast.use_backend("triton"), pytest.raises(TypeError, match="float64"):
        backend.resolve("fused_mlp", torch.zeros(1, device=DEVICE, dtype=torch.float64))


def _run(code: str, **env) -> subprocess.CompletedProcess:
    import os

    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env)


def test_env_variable_selects_backend():
    res = _run("import nfd_fast; print(nfd_fast.get_backend())", NFD_FAST_BACKEND="torch")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "torch"


def test_import_without_triton_serves_reference_and_explains():
    # Block the import of triton: nfd_fast must still import and run on the reference.
    code = """
import sys
sys.modules['triton'] = None
import torch, nfd_fast
from nfd_fast.ops import fused_mlp
y = fused_mlp(torch.rand(5, 2), [torch.randn(16, 2), torch.randn(3, 16)])
assert y.shape == (5, 3)
try:
    nfd_fast.set_backend('triton')
except RuntimeError as e:
    print('refused:', e)
"""
    res = _run(code)
    assert res.returncode == 0, res.stderr
    assert "refused: backend 'triton' is unavailable: Triton could not be imported" in res.stdout


def test_triton_on_cpu_without_interpreter_explains():
    code = """
import torch, nfd_fast
from nfd_fast.ops import fused_mlp
with nfd_fast.use_backend('triton'):
    try:
        fused_mlp(torch.rand(5, 2), [torch.randn(16, 2), torch.randn(3, 16)])
    except RuntimeError as e:
        print(e)
"""
    res = _run(code, TRITON_INTERPRET="0", CUDA_VISIBLE_DEVICES="")
    assert res.returncode == 0, res.stderr
    assert "needs CUDA tensors" in res.stdout


def test_active_backend_says_what_runs():
    cpu = torch.ones(2)
    assert nfd_fast.active_backend(cpu) == "torch"  # auto on CPU: the reference
    with nfd_fast.use_backend("triton"):  # the interpreter serves CPU tensors in the tests
        assert nfd_fast.active_backend(cpu) == "triton"
    with nfd_fast.use_backend("torch"):
        assert nfd_fast.active_backend(cpu) == "torch"


def test_explain_says_what_each_op_ran_and_why():
    from nfd_fast.ops import grid_lookup

    coords = torch.rand(1, 5, 2)
    fields = [[torch.rand(3, 4, 4)]]
    grid_lookup(coords, fields, [(0, 1)])
    assert "grid_lookup  torch   auto: CPU tensors" in nfd_fast.explain()
    with nfd_fast.use_backend("triton"):
        grid_lookup(coords, fields, [(0, 1)])
    assert "grid_lookup  triton  backend setting 'triton' (Triton interpreter)" in nfd_fast.explain()
    grid_lookup(coords.double(), [[fields[0][0].double()]], [(0, 1)])
    assert "auto: a float64 input" not in nfd_fast.explain()  # CPU decides first
    with nfd_fast.use_backend("torch"):
        grid_lookup(coords, fields, [(0, 1)])
    assert "grid_lookup  torch   backend setting 'torch' (inlined reference)" in nfd_fast.explain()


def test_a_precision_the_reference_cannot_honour_is_said_once_and_explained():
    import importlib
    import warnings

    from nfd_fast.ops import fused_mlp

    ops = importlib.import_module("nfd_fast.ops.fused_mlp")  # the module, not the function
    ops._WARNED_PRECISIONS.discard("fp16")
    x, w = torch.rand(5, 2), [torch.rand(8, 2), torch.rand(3, 8)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused_mlp(x, w, precision="fp16")
        fused_mlp(x, w, precision="fp16")
    said = [c for c in caught if "precision 'fp16'" in str(c.message)]
    assert len(said) == 1 and "computes in float32" in str(said[0].message)
    assert "precision fp16 (reference: float32 math)" in nfd_fast.explain()
