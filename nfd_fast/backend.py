"""Which implementation of an op runs: the fused Triton kernels or the PyTorch reference.

Backends
--------
- ``"triton"``: the fused kernels. Needs Triton and CUDA tensors, or CPU tensors when the
  Triton interpreter is on (``TRITON_INTERPRET=1``), which is how CI tests the kernels.
- ``"torch"``: the reference implementation in plain PyTorch (the specification), called
  directly: torch.compile sees (and optimizes) its operations.
- ``"auto"`` (default): per call, ``"triton"`` for CUDA tensors when Triton imports,
  ``"torch"`` otherwise; either runs inside the registered op (one opaque node for
  torch.compile).

Select with :func:`set_backend`, the context manager :func:`use_backend`, or the
environment variable ``NFD_FAST_BACKEND`` (read at import).

The setting is a plain module global, not a ContextVar: torch.compile reads it while
tracing and guards on it (changing the backend recompiles), where a ContextVar read would
break the graph. The ops pass the setting into their registered torch.library op, whose
implementation calls :func:`resolve` on the real tensors, so tracing never sees it.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Iterator, Optional

import torch

BACKENDS = ("auto", "triton", "torch")

_setting = "auto"


def _validate(name: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name.lower()


@functools.lru_cache(maxsize=None)
def triton_status() -> tuple[bool, str]:
    """(available, reason): whether Triton imports, and if not, why."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising anything
        return False, f"Triton could not be imported ({type(exc).__name__}: {exc})"
    return True, f"triton {triton.__version__}"


def interpreter_enabled() -> bool:
    """True when Triton kernels run on the CPU through the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def set_backend(name: str) -> None:
    """Set the process-wide backend ("auto", "triton" or "torch")."""
    global _setting
    name = _validate(name)
    if name == "triton":
        _require_triton()
    _setting = name


def get_backend() -> str:
    """The backend setting in force ("auto", "triton" or "torch"); see :func:`active_backend`
    for what a given call runs."""
    return _setting


def active_backend(*tensors: Optional[torch.Tensor]) -> str:
    """What an op on these tensors runs under the current setting: "triton" (the fused
    kernels) or "torch" (the reference). With "auto" that is "triton" for CUDA tensors
    of the kernels' dtypes when Triton imports, else "torch"."""
    return resolve("op", *tensors)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the enclosed block with another backend, restoring the previous one after
    (process-wide while the block runs: threads share it)."""
    global _setting
    name = _validate(name)
    if name == "triton":
        _require_triton()
    previous, _setting = _setting, name
    try:
        yield
    finally:
        _setting = previous


def _require_triton() -> None:
    ok, reason = triton_status()
    if not ok:
        raise RuntimeError(
            f"backend 'triton' is unavailable: {reason}. Install it with "
            "`pip install triton`, or use backend 'torch' (the reference)."
        )


KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def resolve(op: str, *tensors: Optional[torch.Tensor], setting: Optional[str] = None) -> str:
    """Pick the implementation ("triton" or "torch") for one call of ``op`` on these
    tensors (None skipped) under ``setting`` (default: the current one), and record the
    choice and its reason for :func:`explain`.

    When a tensor's dtype is not one the kernels take (float64), "auto" falls back to the
    reference, while an explicit "triton" raises: silently running something else would
    hide the choice.
    """
    tensors = [t for t in tensors if t is not None]
    choice, reason = _choose(op, tensors, _validate(setting) if setting is not None else _setting)
    if not any(isinstance(t, torch._subclasses.FakeTensor) for t in tensors):  # not tracing
        _LAST[op] = (choice, reason)
    return choice


def _choose(op: str, tensors: list, name: str) -> tuple:
    """(implementation, why) under setting `name`."""
    triton_dtypes_ok = all(t.dtype in KERNEL_DTYPES for t in tensors)
    on_cuda = any(t.is_cuda for t in tensors)
    if name == "torch":
        return "torch", "backend setting 'torch'"
    if name == "auto":
        if not on_cuda:
            return "torch", "auto: CPU tensors (the kernels serve CUDA tensors)"
        if not triton_status()[0]:
            return "torch", f"auto: {triton_status()[1]}"
        if not triton_dtypes_ok:
            return "torch", "auto: a float64 input (the kernels take float32 / float16 / bfloat16)"
        return "triton", "auto: CUDA tensors and Triton available"
    _require_triton()
    if not on_cuda and not interpreter_enabled():
        raise RuntimeError(
            f"{op}: backend 'triton' needs CUDA tensors, or CPU tensors with the Triton "
            "interpreter (TRITON_INTERPRET=1 set before Triton is imported)."
        )
    if not triton_dtypes_ok:
        raise TypeError(
            f"{op}: the Triton kernels take float32, float16 or bfloat16 inputs; "
            "use backend 'torch' for float64."
        )
    return "triton", "backend setting 'triton'" + ("" if on_cuda else " (Triton interpreter)")


# op -> (implementation, reason) of its last call, for explain()
_LAST: dict = {}


def record(op: str, implementation: str, reason: str) -> None:
    """Record what a call of `op` ran, where an op decides without resolve()."""
    _LAST[op] = (implementation, reason)


def annotate(op: str, detail: str) -> None:
    """Add a detail (a precision, say) to the record of `op`'s last call."""
    if op in _LAST:
        implementation, reason = _LAST[op]
        _LAST[op] = (implementation, f"{reason}; {detail}")


def explain() -> str:
    """Which implementation each op's last call used, and why (one line per op)."""
    if not _LAST:
        return "no nfd_fast op has run yet"
    width = max(len(op) for op in _LAST)
    return "\n".join(f"{op:{width}}  {impl:6}  {why}" for op, (impl, why) in sorted(_LAST.items()))


_env = os.environ.get("NFD_FAST_BACKEND")
if _env:
    _setting = _validate(_env)
