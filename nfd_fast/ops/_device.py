"""Host-side helpers shared by the ops' launch glue."""
from __future__ import annotations

import functools

import torch


def pad_pow2(n: int, minimum: int = 16) -> int:
    """n rounded up to a power of two, at least `minimum` (tl.dot and tl.arange sizes).
    Plain Python: the ops' fake implementations use it where Triton may be absent."""
    return max(minimum, 1 << max(int(n) - 1, 0).bit_length())


def constant_table(values: tuple, dtype: torch.dtype, device) -> torch.Tensor:
    """A small read-only table on `device`, built on first use and then reused: later
    calls copy nothing from the host (no host sync, and legal inside CUDA-graph capture)."""
    return _constant_table(values, dtype, torch.device(device))


@functools.lru_cache(maxsize=256)
def _constant_table(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device)


def host_table(rows, dtype: torch.dtype, device) -> torch.Tensor:
    """A per-call table on `device`. On CUDA it goes through pinned memory with a
    non-blocking copy, so the host does not wait for the GPU's queue to drain."""
    device = torch.device(device)
    table = torch.tensor(rows, dtype=dtype)
    if device.type == "cuda":
        return table.pin_memory().to(device, non_blocking=True)
    return table.to(device)
