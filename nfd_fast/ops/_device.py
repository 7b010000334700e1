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
    calls with the same values copy nothing from the host (no host sync, and legal inside
    CUDA-graph capture once a warm-up run has built it; the tensor lives as long as the
    cache keeps it, so a captured graph reads the same memory at every replay).

    The kernels' per-call tables go through here too (grid_lookup's table of field
    addresses and strides): a training loop or a sampling loop calls with the same
    tensors every step, so it hits the cache."""
    return _constant_table(values, dtype, torch.device(device))


@functools.lru_cache(maxsize=1024)
def _constant_table(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device)
