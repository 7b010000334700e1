"""What the op families share in their registration: the reference's vector-Jacobian
product, which serves as the backward on the "torch" backend and, differentiable again,
as every backend's backward under create_graph=True (second order)."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch


def reference_vjp(forward: Callable, tensors: Sequence[torch.Tensor], needs: Sequence[bool],
                  grad_outputs, create_graph: bool) -> list:
    """Gradients of <forward(*tensors), grad_outputs> for the tensors whose `needs` is
    True (None for the others).

    With create_graph the result stays connected to `tensors` and can be differentiated
    again; else it is computed on detached copies and holds no graph. torch.func.vjp,
    unlike torch.autograd.grad, also works inside a custom op's implementation, where
    autograd is switched off."""
    flat = list(tensors) if create_graph else [t.detach() for t in tensors]
    wanted = [i for i, need in enumerate(needs) if need]
    out: list[Optional[torch.Tensor]] = [None] * len(flat)
    if not wanted:
        return out

    def partial(*chosen):
        full = list(flat)
        for i, t in zip(wanted, chosen):
            full[i] = t
        return forward(*full)

    _, vjp = torch.func.vjp(partial, *[flat[i] for i in wanted])
    for i, g in zip(wanted, vjp(grad_outputs)):
        out[i] = g
    return out


def empty_f32(like: torch.Tensor) -> torch.Tensor:
    """A 0-element float32 tensor on like's device: an op's placeholder for an absent
    output (ops return tensors only)."""
    return like.new_empty(0, dtype=torch.float32)


def zeros_where_absent(grads: Sequence[Optional[torch.Tensor]], like: torch.Tensor) -> list:
    """An op's list of gradient outputs: each gradient in its own layout (a channels-last
    field's gradient stays channels-last), or a placeholder."""
    return [g if g is not None else empty_f32(like) for g in grads]


def regroup(flat: Sequence, sizes: Sequence[int]) -> list:
    """[first, *groups flattened] -> [first, [group 0], [group 1], ...] (an op's saved
    tensors or gradients travel as one flat list; sizes: each group's length)."""
    out, i = [flat[0]], 1
    for size in sizes:
        out.append(list(flat[i:i + size]))
        i += size
    return out
