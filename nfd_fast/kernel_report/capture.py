"""Capture the Triton launches (and the ATen calls around them) of small probe runs.

Runs as its own process with TRITON_INTERPRET=1 (`python -m nfd_fast.kernel_report.capture
PLAN.json`, PLAN mapping each probe to the file its result goes to): nfd_fast's public
ops run on CPU tensors through the Triton interpreter, whose launch path
(`InterpretedFunction.run`) is wrapped to record each launch: the kernel (module, name),
every argument (tensors as pointer descriptors: dtype, and whether the address is 16-byte
aligned as the CUDA pointer would be: allocations are, views are when their byte offset
is), the keyword arguments (constexprs, num_warps, num_stages) and the grid. The kernels
really run, so what follows a launch sees real results; while they run, the
interpreter's memory and dot operations are counted:
- dot FLOPs (2 M N K per program), by operand type;
- bytes requested by loads, stores and atomics (active lanes x element size);
- 32-byte sectors per operation and program (the traffic between L2 and the SMs);
- distinct sectors over the launch (DRAM traffic if L2 keeps every reuse).
ATen calls outside the kernels (the op's glue, and the whole eager reference) are
recorded with their FLOPs (matmuls) and the bytes of their tensor operands.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

SECTOR = 32  # bytes: the unit of L2 and DRAM transactions


def _describe(value):
    """A launch argument in JSON: tensors become pointer descriptors."""
    import torch
    import triton.language as tl

    if isinstance(value, torch.Tensor):
        offset = value.storage_offset() * value.element_size()
        return {"kind": "ptr", "dtype": str(value.dtype).replace("torch.", ""), "aligned": offset % 16 == 0}
    if isinstance(value, tl.dtype):
        return {"kind": "tl_dtype", "name": value.name}
    if isinstance(value, tl.constexpr):
        return _describe(value.value)
    if isinstance(value, (tuple, list)):
        return [_describe(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot describe launch argument {value!r}")


class _Counters:
    """Traffic and dot work of the launch running now."""

    def __init__(self):
        self.launch = None

    def start(self, launch):
        self.launch = launch
        launch.update(dot_flops={}, bytes={"load": 0, "store": 0, "atomic": 0}, l2_bytes=0)
        self.sectors = set()

    def finish(self):
        self.launch["dram_bytes"] = len(self.sectors) * SECTOR
        self.launch = None

    def memory(self, kind, ptrs, mask):
        import numpy as np

        if self.launch is None:
            return
        addrs = np.asarray(ptrs.data).astype(np.uint64)
        active = addrs if mask is None else addrs[np.broadcast_to(np.asarray(mask.data, bool), addrs.shape)]
        size = ptrs.get_element_ty().primitive_bitwidth // 8
        sectors = np.unique(active // SECTOR)
        self.launch["bytes"][kind] += int(active.size) * size
        self.launch["l2_bytes"] += int(sectors.size) * SECTOR
        self.sectors.update(sectors.tolist())

    def dot(self, a, b):
        if self.launch is None:
            return
        m, k = a.data.shape[-2:]
        n = b.data.shape[-1]
        kind = a.dtype.name if hasattr(a.dtype, "name") else str(a.dtype)
        flops = self.launch["dot_flops"]
        flops[kind] = flops.get(kind, 0) + 2 * m * n * k


def _instrument(counters: _Counters) -> None:
    """Wrap the interpreter's memory and dot operations with the counters."""
    from triton.runtime import interpreter as I

    b = I.interpreter_builder
    load, store, rmw, cas, dot = (b.create_masked_load, b.create_masked_store, b.create_atomic_rmw,
                                  b.create_atomic_cas, b.create_dot)

    def masked_load(ptrs, mask, *a, **k):
        counters.memory("load", ptrs, mask)
        return load(ptrs, mask, *a, **k)

    def masked_store(ptrs, value, mask, *a, **k):
        counters.memory("store", ptrs, mask)
        return store(ptrs, value, mask, *a, **k)

    def atomic_rmw(op, ptr, val, mask, *a, **k):
        counters.memory("atomic", ptr, mask)
        return rmw(op, ptr, val, mask, *a, **k)

    def atomic_cas(ptr, *a, **k):
        counters.memory("atomic", ptr, None)
        return cas(ptr, *a, **k)

    def create_dot(a_, b_, *a, **k):
        counters.dot(a_, b_)
        return dot(a_, b_, *a, **k)

    b.create_masked_load, b.create_masked_store = masked_load, masked_store
    b.create_atomic_rmw, b.create_atomic_cas, b.create_dot = atomic_rmw, atomic_cas, create_dot


class Recorder:
    """Records launches (with counters) and the ATen calls made outside kernels."""

    def __init__(self):
        self.events = []
        self.counters = _Counters()
        self.tracing = None  # the dispatch mode while a probe runs
        # tensor identities for the fused-bytes model: an address names a value until a
        # call writes there again (a freed buffer reused by the allocator is a new value)
        self._values, self._fresh = {}, itertools.count()

    def _value(self, address: int) -> int:
        if address not in self._values:
            self._values[address] = next(self._fresh)
        return self._values[address]

    def _written(self, address: int) -> int:
        self._values[address] = next(self._fresh)
        return self._values[address]

    def install(self) -> None:
        from triton.runtime import interpreter as I

        _instrument(self.counters)
        run = I.InterpretedFunction.run
        recorder = self

        def recorded_run(fn, *args, grid, warmup, **kwargs):
            if warmup:
                return run(fn, *args, grid=grid, warmup=warmup, **kwargs)
            return recorder.launch(run, fn, args, kwargs, grid)

        I.InterpretedFunction.run = recorded_run

    def launch(self, run, fn, args, kwargs, grid):
        import torch
        from torch.utils._python_dispatch import _disable_current_modes

        bound = dict(zip(fn.arg_names, args), **kwargs)
        grid = grid(bound) if callable(grid) else grid
        grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
        event = {"type": "launch", "module": fn.fn.__module__, "kernel": fn.fn.__qualname__,
                 "args": [_describe(a) for a in args],
                 "kwargs": {k: _describe(v) for k, v in kwargs.items()}, "grid": list(grid)}
        self.events.append(event)
        self.counters.start(event)
        try:
            with _disable_current_modes():  # the interpreter's own tensor work is not glue
                return run(fn, *args, grid=grid, warmup=False, **kwargs)
        finally:
            self.counters.finish()
            for a in list(args) + list(kwargs.values()):  # what a kernel touched is new
                if isinstance(a, torch.Tensor):
                    self._written(_address(a))

    def aten(self, func, args, kwargs, out) -> None:
        work = _aten_work(func, args, kwargs, out)
        work["inputs"] = [(self._value(a), b) for a, b in work["inputs"]]
        work["outputs"] = [(self._written(a), b) for a, b in work["outputs"]]
        self.events.append({"type": "aten", "op": str(func.overloadpacket.__name__),
                            "pointwise": _is_pointwise(func), **work})


def _is_pointwise(func) -> bool:
    import torch

    return torch.Tag.pointwise in getattr(func, "tags", ())


# operand positions (a, b) of a @ b; linear's weight is [out, in] (b.T)
_MATMULS = {"mm": (0, 1), "addmm": (1, 2), "bmm": (0, 1), "baddbmm": (1, 2), "matmul": (0, 1),
            "linear": (0, 1)}


def _address(t) -> int:
    """Where a tensor's data lives; torch.func's wrappers (the reference's vjp) have no
    storage of their own, so their identity stands in."""
    try:
        return t.data_ptr()
    except (NotImplementedError, RuntimeError):
        return -id(t)


def _aten_work(func, args, kwargs, out) -> dict:
    """FLOPs (matmuls) and bytes of the tensor operands and results of one ATen call."""
    import torch
    from torch.utils._pytree import tree_flatten

    def operands(tree):
        return [(_address(t), t.numel() * t.element_size())
                for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]

    inputs, outputs = operands((args, kwargs)), operands(out)
    nbytes = sum(b for _, b in inputs + outputs)
    flops, dtype = 0, None
    name = func.overloadpacket.__name__
    if name in _MATMULS:
        a, b = (args[i] for i in _MATMULS[name])
        flops = 2 * a.numel() * (b.shape[0] if name == "linear" else b.shape[-1])
        dtype = str(a.dtype).replace("torch.", "")
    return {"bytes": nbytes, "flops": flops, "dtype": dtype, "inputs": inputs, "outputs": outputs}


def trace_mode(recorder: Recorder):
    """A dispatch mode that records every ATen call (views and metadata calls excluded)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Trace(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            body = _custom_op_body(func)
            if body is not None:  # nfd_fast's own ops: trace what they run
                # (a body running torch.func transforms, as the reference backward's vjp
                # does, cannot be traced so: the probe then reports the error)
                with self:
                    return body(*args, **kwargs)
            out = func(*args, **kwargs)
            if _moves_data(func, args, kwargs, out):
                recorder.aten(func, args, kwargs, out)
            return out

    return _Trace()


def _custom_op_body(func):
    """The Python function behind one of nfd_fast's torch.library ops (None for others)."""
    if func.namespace != "nfd_fast":
        return None
    from torch._library.custom_ops import _maybe_get_opdef

    opdef = _maybe_get_opdef(func)
    return None if opdef is None else opdef._backend_fns.get("cpu", opdef._init_fn)


_NO_WORK = ("empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach",
            "lift_fresh", "set_", "_local_scalar_dense")


def _moves_data(func, args, kwargs, out) -> bool:
    """False for calls that move no data: allocations, and views (the schema says the
    result aliases an input) that did alias. A call whose schema allows an alias but
    which copied (contiguous, reshape, to) moves data: where autograd has already run
    (inside nfd_fast's ops) the mode sees such calls whole, not the clone they make."""
    if func.overloadpacket.__name__ in _NO_WORK:
        return False
    aliases = any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)
    return not aliases or _copied(args, kwargs, out)


def _storage(t) -> int | None:
    try:
        return t.untyped_storage().data_ptr()
    except (NotImplementedError, RuntimeError):
        return None


def _copied(args, kwargs, out) -> bool:
    """Whether a result shares no input's storage."""
    import torch
    from torch.utils._pytree import tree_flatten

    results = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
    inputs = {_storage(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
    return any(_storage(t) is not None and _storage(t) not in inputs for t in results)


def run_probe(recorder: Recorder, name: str) -> dict:
    """{size: events} of one probe at its two sizes, or {"error": why}."""
    from . import probes

    probe, result = probes.PROBES[name], {}
    for n in probe.sizes:
        recorder.events = []
        try:
            step = probe.run(int(n))
            with trace_mode(recorder):
                step()
        except Exception as exc:  # one broken probe must not hide the others
            return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
        result[str(n)] = recorder.events
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="capture probe launches under the interpreter")
    parser.add_argument("plan", help="JSON {probe name: path of its result}")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        sys.exit("capture runs the kernels through the interpreter: set TRITON_INTERPRET=1")
    import torch

    with open(args.plan, encoding="utf-8") as f:
        plan = json.load(f)
    recorder = Recorder()
    recorder.install()
    for name, path in plan.items():
        torch.manual_seed(0)
        result = run_probe(recorder, name)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(result, f)
        os.replace(tmp, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
