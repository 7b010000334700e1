"""Compile nfd_fast's kernels for an H100 (sm_90) without a GPU, and report their resources.

The Triton interpreter runs kernels as Python, so it cannot catch what only the compiler
rejects (constexpr misuse, unsupported dot shapes, layouts). This script runs fused_mlp's
forward and backward on CPU tensors with the launches intercepted, and compiles each
intercepted launch for GPUTarget("cuda", 90, 32) with Triton's own compiler (ptxas ships
with the wheel), printing registers, spills and shared memory per kernel.

Run as a script with TRITON_INTERPRET unset: `python tests/sm90_compile.py [--quick]`.
"""
import argparse
import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("sm90_compile.py must run with TRITON_INTERPRET unset (it compiles the real kernels)")

import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from nfd_fast.kernels import diffusion as KD
from nfd_fast.kernels import fused_mlp as K
from nfd_fast.kernels import grid_lookup as KG
import importlib

ops = importlib.import_module("nfd_fast.ops.fused_mlp")  # the package re-exports a function of that name

H100_MAX_SHARED = 232448  # bytes of shared memory one block may use on sm_90
_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
                torch.int64: "i64", torch.int32: "i32"}


class _Recorder:
    """Stands in for a JITFunction: `kernel[grid](*args, **kwargs)` records the launch."""

    def __init__(self, fn, calls):
        self.fn, self.calls = fn, calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((self.fn, args, kwargs))


def _arg_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _DTYPE_NAMES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    if hasattr(value, "primitive_bitwidth"):  # a triton dtype: only ever a constexpr here
        return "constexpr"
    raise TypeError(f"cannot type {value!r}")


def compile_launch(fn, args, kwargs):
    kwargs = dict(kwargs)
    num_warps = kwargs.pop("num_warps", 4)
    names = fn.arg_names
    values = dict(zip(names, args), **kwargs)
    signature, constexprs = {}, {}
    for param, name in zip(fn.params, names):
        if param.is_constexpr:
            signature[name] = "constexpr"
            constexprs[name] = values[name]
        else:
            signature[name] = _arg_type(values[name])
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


def ptxas_report(compiled) -> str:
    """Registers and spills, from ptxas -v on the kernel's PTX (no driver needed)."""
    from triton.backends.nvidia import compiler as nv

    try:  # the signature changed across Triton releases
        tool = nv.get_ptxas(90)
    except TypeError:
        tool = nv.get_ptxas()
    ptxas = tool.path if hasattr(tool, "path") else tool[0]
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(compiled.asm["ptx"])
        f.flush()
        out = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", os.devnull],
                             capture_output=True, text=True).stderr
    regs = re.search(r"Used (\d+) registers", out)
    spills = re.search(r"(\d+) bytes spill stores", out)
    return f"{regs.group(1) if regs else '?':>4} {spills.group(1) if spills else '?':>6}"


def record_fused_mlp(widths, dtype, batch=2, n=300, **options):
    """Every kernel launch of one forward + backward of fused_mlp."""
    calls = []
    saved = K.fused_mlp_fwd_kernel, K.fused_mlp_bwd_layer_kernel
    K.fused_mlp_fwd_kernel = _Recorder(saved[0], calls)
    K.fused_mlp_bwd_layer_kernel = _Recorder(saved[1], calls)
    try:
        x = torch.rand(batch, n, widths[0], dtype=dtype, requires_grad=True)
        ws = [torch.randn(o, i, dtype=dtype, requires_grad=True) for i, o in zip(widths[:-1], widths[1:])]
        p = ops.prepare_inputs(x, ws, **options)
        ops._launch(p).sum().backward()
    finally:
        K.fused_mlp_fwd_kernel, K.fused_mlp_bwd_layer_kernel = saved
    return calls


def record_diffusion():
    """Every mode of the diffusion step kernel, with given and in-kernel (Philox) noise."""
    import nfd_fast
    from nfd_fast.diffusion import NoiseSchedule
    from nfd_fast.ops import ddim_step, ddpm_step, langevin_step, q_sample, vp_predictor_step

    calls = []
    saved = KD.diffusion_step_kernel
    KD.diffusion_step_kernel = _Recorder(saved, calls)
    # the kernels are already compiled objects; this only lets the ops route CPU tensors
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        s = NoiseSchedule()
        x = torch.randn(4, 3000)
        h = x.half()
        with nfd_fast.use_backend("triton"):
            q_sample(x, 5, x, s)
            ddpm_step(x, 5, x, s, noise=x)
            ddpm_step(h, 5, h, s, prediction_type="v_prediction", clip_sample=1.0)
            ddim_step(x, 5, 0, x, s, eta=0.5, uncond_output=x, guidance_scale=2.0,
                      dynamic_threshold=(0.99, 1.0), use_clipped_model_output=True)
            langevin_step(x, x, 5, s)
            vp_predictor_step(x, x, 5, s)
    finally:
        KD.diffusion_step_kernel = saved
        del os.environ["TRITON_INTERPRET"]
    return calls


def record_render():
    """The fused forward with coordinates made in the kernel (render's fused path)."""
    import nfd_fast
    from nfd_fast.nn import Siren

    calls = []
    saved = K.fused_mlp_fwd_kernel
    K.fused_mlp_fwd_kernel = _Recorder(saved, calls)
    os.environ["TRITON_INTERPRET"] = "1"  # lets the op route CPU tensors; kernels stay compiled
    try:
        with nfd_fast.use_backend("triton"):
            nfd_fast.render(Siren(2, 256, 3, 3, precision="bf16"), (64, 64), progress=False,
                            indexing="xy", chunk_size=1024)
    finally:
        K.fused_mlp_fwd_kernel = saved
        del os.environ["TRITON_INTERPRET"]
    return calls[:1]


def record_grid_lookup():
    """Forward and backward launches of grid_lookup for the DDMI and K-planes layouts."""
    import nfd_fast
    from nfd_fast.ops import grid_lookup

    calls = []
    saved = KG.grid_lookup_fwd_kernel, KG.grid_lookup_bwd_kernel
    KG.grid_lookup_fwd_kernel = _Recorder(saved[0], calls)
    KG.grid_lookup_bwd_kernel = _Recorder(saved[1], calls)
    os.environ["TRITON_INTERPRET"] = "1"  # lets the op route CPU tensors; kernels stay compiled
    try:
        cases = [  # (D, planes, spatial, channels, combine, dtype)
            (2, [(0, 1)], [(64, 64)], 64, "sum", torch.float32),
            (3, [(0, 1), (1, 2), (0, 2)], [(16, 16)] * 3, 64, "sum", torch.float16),
            (4, [(0, 1), (0, 2), (1, 2), (0, 3), (1, 3), (2, 3)], [(8, 8)] * 6, 32, "product", torch.float32),
            (3, [(0, 1, 2), (0,)], [(8, 8, 8), (9,)], 16, "concat", torch.bfloat16),
        ]
        for D, planes, spatial, C, combine, dtype in cases:
            coords = torch.rand(2, 100, D, requires_grad=True)
            fields = [[torch.randn(2, C, *sp, dtype=dtype, requires_grad=True) for sp in spatial]]
            with nfd_fast.use_backend("triton"):
                grid_lookup(coords, fields, planes, combine=combine).float().sum().backward()
    finally:
        KG.grid_lookup_fwd_kernel, KG.grid_lookup_bwd_kernel = saved
        del os.environ["TRITON_INTERPRET"]
    return calls


CONFIGS = [
    # (widths, dtype, options): the benchmark's SIREN first
    ((2, 256, 256, 256, 256, 3), torch.float32, {}),
    ((2, 256, 256, 256, 256, 3), torch.float32, {"precision": "tf32x3"}),
    ((2, 256, 256, 256, 256, 3), torch.float16, {"fast_sine": True}),
    ((2, 256, 256, 256, 256, 3), torch.bfloat16, {}),
    ((3, 100, 100, 100, 5), torch.float32, {"activation": "gelu", "final_activation": "sine"}),
    ((64, 512, 512, 64), torch.float32, {"activation": "silu"}),
    ((2, 16, 1), torch.float16, {"activation": "leaky_relu"}),
    ((2,) + (16,) * 19 + (1,), torch.float32,
     {"activation": ["sine", "relu", "gelu", "silu", "identity", "leaky_relu"] * 3 + ["sine"]}),
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="first two configurations only")
    args = parser.parse_args(argv)
    configs = CONFIGS[:2] if args.quick else CONFIGS
    print(f"triton {triton.__version__}, target sm_90")
    print(f"{'kernel':28} {'widths':24} {'dtype':9} {'options':40} regs spills smem")
    seen, too_big = set(), []
    for widths, dtype, options in configs:
        for fn, a, kw in record_fused_mlp(widths, dtype, **options):
            key = (fn.__name__, widths, dtype, tuple(sorted(kw.items())))
            if key in seen:
                continue
            seen.add(key)
            c = compile_launch(fn, a, kw)
            meta = c.metadata
            print(f"{fn.__name__:28} {str(widths):24} {_DTYPE_NAMES[dtype]:9} {str(options):40} "
                  f"{ptxas_report(c)} {meta.shared}", flush=True)
            if meta.shared > H100_MAX_SHARED:
                too_big.append(f"{fn.__name__} {widths} {_DTYPE_NAMES[dtype]} {options}")
    for fn, a, kw in record_diffusion():
        c = compile_launch(fn, a, kw)
        label = f"MODE={kw['MODE']} NOISE={kw['NOISE']} CFG={kw['CFG']}"
        print(f"{fn.__name__:28} {label:24} {_DTYPE_NAMES[a[2].dtype]:9} {'':40} "
              f"{ptxas_report(c)} {c.metadata.shared}", flush=True)
    for fn, a, kw in record_render():
        c = compile_launch(fn, a, kw)
        label = f"GRID_DIMS={kw['GRID_DIMS']} AXES={kw['GRID_AXES']}"
        print(f"{fn.__name__:28} {label:24} {'bf16':9} {'render':40} "
              f"{ptxas_report(c)} {c.metadata.shared}", flush=True)
    for fn, a, kw in record_grid_lookup():
        c = compile_launch(fn, a, kw)
        label = f"P={kw['P']} D={kw['D']} COMBINE={kw['COMBINE']}"
        print(f"{fn.__name__:28} {label:24} {str(kw['DTYPE']):9} {'':40} "
              f"{ptxas_report(c)} {c.metadata.shared}", flush=True)
        if c.metadata.shared > H100_MAX_SHARED:
            too_big.append(f"{fn.__name__} {label}")
    for entry in too_big:
        print(f"FAIL: needs more shared memory than an H100 has: {entry}")
    return 1 if too_big else 0


if __name__ == "__main__":
    sys.exit(main())
