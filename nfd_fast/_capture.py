"""Capture of a module's forward by torch._dynamo, for code torch.fx cannot trace.

torch.fx runs the forward on proxies, so einops, shape checks, `if mod is not None`,
`exists()` helpers and data-dependent branches break it (or, worse, get fixed to one
case). torch._dynamo runs the real Python code on the real inputs and records the tensor
operations it meets into graphs, torch-level ones (torch.sin, F.linear on parameter
inputs, F.grid_sample), which are handed to our backend to rewrite. Everything Python
it read on the way (w0 attributes, flags, which optional arguments were None, shapes up
to the dimensions it made dynamic) becomes a guard checked on every call; a change
captures again, so no stale numbers run. A data-dependent branch splits the forward
into several graphs, each rewritten on its own.

Floats are specialised while capturing: a w0 read from an attribute is a constant of
the graph (which the fused kernels need) guarded by its value, not a graph input.
"""
from __future__ import annotations

import types
from typing import Callable

import torch
import torch.fx as fx


def _private_forward(model: torch.nn.Module):
    """The model's forward as a new function with its own code object, bound to model.

    dynamo keeps its compiled graphs (and their recompile limit) per code object; the
    copy keeps this model's captures apart from every other instance of its class."""
    bound = model.__dict__.get("forward") or types.MethodType(type(model).forward, model)
    fn = getattr(bound, "__func__", None)
    if not isinstance(fn, types.FunctionType):
        return bound
    copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__,
                              fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    copy.__qualname__ = fn.__qualname__
    copy.__dict__.update(fn.__dict__)
    return types.MethodType(copy, bound.__self__)


class DynamoForward:
    """model.forward captured by dynamo; rewrite(graph module, example inputs) returns
    the callable that runs each captured graph."""

    def __init__(self, model: torch.nn.Module, rewrite: Callable):
        self._rewrite = rewrite
        self._compiled = torch.compile(_private_forward(model), backend=self._backend, dynamic=None)

    def _backend(self, gm: fx.GraphModule, example_inputs):
        return self._rewrite(gm, example_inputs)

    def __call__(self, *args, **kwargs):
        # suppress_errors: should dynamo itself fail on some code, that code runs eagerly
        # (as written) instead of the model raising
        with torch._dynamo.config.patch(specialize_float=True, suppress_errors=True):
            return self._compiled(*args, **kwargs)


def dynamo_unavailable():
    """Why dynamo cannot capture here (this Python or platform), or None."""
    from torch._dynamo.eval_frame import is_dynamo_supported

    return None if is_dynamo_supported() else "torch._dynamo does not support this Python or platform"


def example_values(gm: fx.GraphModule, example_inputs) -> dict:
    """Every node's value on the captured example (no autograd; inputs that the graph
    might change in place are copies)."""
    inputs = []
    for x in example_inputs:
        if isinstance(x, torch.SymInt):
            x = x.node.hint if x.node.hint is not None else x.node.shape_env.size_hint(x.node.expr)
            x = int(x)
        elif isinstance(x, torch.Tensor) and not isinstance(x, torch.nn.Parameter):
            x = x.detach().clone()
        inputs.append(x)
    interpreter = fx.Interpreter(gm, garbage_collect_values=False)
    with torch.no_grad():
        interpreter.run(*inputs)
    return dict(interpreter.env)


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule on a copy of gm's graph (same submodules and parameters), so that a
    failed rewrite leaves the captured graph as it was."""
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    return fx.GraphModule(gm, graph)
