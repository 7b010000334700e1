"""Swap fused kernels into an existing PyTorch model without rewriting it.

accelerate(model) captures the model's forward as a graph, finds in it
- runs of linear maps with activations between them (SIREN's sin(w0 z) however written,
  ReLU, GELU, SiLU, LeakyReLU with a gain), FiLM / multiplicative modulations included
  (accelerate_mlp), each replaced by one fused_mlp call;
- F.grid_sample pipelines (planes / volumes of parameters or per-sample tensors read at
  one coordinate tensor and combined by sum / product / mean / concat, scales
  concatenated) (accelerate_grids), each replaced by one grid_lookup call per group of
  planes;
and runs the rewritten graph as the model's forward. The replacements read the model's
own parameter tensors: state_dict keys, gradients, training and optimizer state carry on.

Capture modes (capture=):
- "fx": torch.fx's symbolic trace; needs no inputs. A plain value the trace read
  (w0 attributes, flags, training) is compared on every call, and a change traces again.
- "dynamo": torch._dynamo's graph capture (see _capture), for code fx cannot trace:
  einops, optional or keyword-only arguments, conditionals, helpers. It captures on the
  first call, or at once for example_inputs / example_kwargs; its guards re-capture when
  anything Python it read changes.
- "auto" (default): fx when the forward has only required positional arguments, traces,
  and calls no grid_sample (a pipeline is matched on the shapes of a real call);
  dynamo otherwise.

model.acceleration_report (printable) lists each fused run and grid pipeline with its
modules, and each piece left as it was with the reason. deaccelerate(model) restores the
model's own forward. The model keeps its class, parameters and buffers.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import types

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from . import backend as _backend_module
from ._capture import DynamoForward, copy_graph_module, dynamo_unavailable, example_values
from .accelerate_grids import fuse_grids
from .accelerate_mlp import fuse_runs

CAPTURES = ("auto", "fx", "dynamo")
_ATTR = "_nfd_fast_acceleration"
_PENDING = "nothing captured yet: the forward is captured on its first call (pass example_inputs to capture now)"


@dataclasses.dataclass
class AccelerationReport:
    """What accelerate() replaced and what it left alone, and why."""

    mode: str = ""
    replaced: list = dataclasses.field(default_factory=list)
    grids: list = dataclasses.field(default_factory=list)
    left_alone: list = dataclasses.field(default_factory=list)
    notes: list = dataclasses.field(default_factory=list)
    captures: int = 0

    def add_run(self, entry: dict) -> None:
        if entry not in self.replaced:  # a re-capture finds the same runs again
            self.replaced.append(entry)

    def add_grid(self, entry: dict) -> None:
        if entry not in self.grids:
            self.grids.append(entry)

    def leave(self, name: str, why: str) -> None:
        if (name, why) not in self.left_alone:
            self.left_alone.append((name, why))

    def merge(self, other: "AccelerationReport") -> None:
        for entry in other.replaced:
            self.add_run(entry)
        for entry in other.grids:
            self.add_grid(entry)
        for entry in other.left_alone:
            self.leave(*entry)

    def __str__(self) -> str:
        lines = [f"nfd_fast.accelerate ({self.mode}, {self.captures} capture(s)): "
                 f"{len(self.replaced)} fused run(s), {len(self.grids)} grid pipeline(s)"]
        lines += [f"  note: {n}" for n in self.notes]
        for r in self.replaced:
            acts = ", ".join(f"sine(w0={w:g})" if a == "sine" else a for a, w in zip(r["activations"], r["w0"]))
            mods = [f"layer {i}: {'+'.join(m)}" for i, m in enumerate(r.get("modulations", [])) if m]
            lines.append(f"  fused: {' -> '.join(r['layers'])}  [{acts}; final {r['final']}"
                         f"{'; modulated ' + ', '.join(mods) if mods else ''}]")
        for g in self.grids:
            for c in g["calls"]:
                scales = "; ".join(", ".join(s) for s in c["fields"])
                lines.append(f"  grid_lookup: {len(c['fields'])} scale(s) x planes {c['planes']} "
                             f"combine={c['combine']} align_corners={g['align_corners']} "
                             f"padding={g['padding_mode']}  [{scales}]  ({g['grid_samples']} grid_sample calls)")
        for name, why in self.left_alone:
            lines.append(f"  left alone: {name}: {why}")
        return "\n".join(lines)


class _Tracer(fx.Tracer):
    """Keeps nfd_fast's own modules whole (they are fused already)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if type(m).__module__.startswith("nfd_fast."):
            return True
        return super().is_leaf_module(m, qualname)


def _plain(v) -> bool:
    if isinstance(v, (tuple, list)):
        return all(_plain(x) for x in v)
    return v is None or isinstance(v, (bool, int, float, str))


def _plain_state(model: nn.Module) -> list:
    """(module, name, value) of every plain Python value the modules hold: fx bakes what
    it reads of them into the graph."""
    return [(m, k, copy.copy(v)) for m in model.modules() for k, v in vars(m).items() if _plain(v)]


class _FxForward:
    """The fx-traced, rewritten forward; traces again when a plain value it may have
    read has changed since."""

    def __init__(self, model: nn.Module, graph: fx.Graph, report: AccelerationReport, backend: str):
        self.model, self.report, self.backend = model, report, backend
        self._rewrite(graph)

    def _rewrite(self, graph: fx.Graph) -> None:
        self.state = _plain_state(self.model)
        gm = fx.GraphModule(self.model, graph)
        params = {}
        for n in graph.nodes:
            if n.op == "get_attr":
                t = _attribute(gm, n.target)
                if isinstance(t, nn.Parameter):
                    params[n] = (n.target, t)
        self.report.replaced.clear()
        self.report.left_alone.clear()
        fuse_runs(gm, params, self.report, self.backend)
        if _calls_grid_sample(graph):
            self.report.leave("grid_sample calls", "pipelines are matched by the dynamo capture only "
                              "(capture='dynamo', with example_inputs)")
        gm.recompile()
        self.gm = gm
        self.report.captures += 1

    def __call__(self, *args, **kwargs):
        if any(_changed(m.__dict__.get(k, _MISSING), v) for m, k, v in self.state):
            self._rewrite(_Tracer().trace(self.model))
        return self.gm(*args, **kwargs)


_MISSING = object()


def _changed(now, then) -> bool:
    return now is not then and now != then  # identity first: an unchanged NaN equals itself


def _attribute(gm, target):
    try:
        return gm.get_parameter(target)
    except AttributeError:
        return None


def _graph_params(gm: fx.GraphModule, example_inputs, model: nn.Module) -> dict:
    """The captured graph's inputs that are the model's parameters or buffers."""
    names = {id(t): n for n, t in model.named_parameters()}
    names.update({id(t): n for n, t in model.named_buffers()})
    holders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return {n: (names[id(x)], x) for n, x in zip(holders, example_inputs)
            if isinstance(x, torch.Tensor) and id(x) in names}


def _dynamo_rewriter(model: nn.Module, report: AccelerationReport, backend: str):
    def rewrite(gm: fx.GraphModule, example_inputs):
        report.captures += 1
        if _PENDING in report.notes:
            report.notes.remove(_PENDING)
        work, staged = copy_graph_module(gm), AccelerationReport()
        try:
            params = _graph_params(work, example_inputs, model)
            if any(n.op == "call_function" and n.target is F.grid_sample for n in work.graph.nodes):
                fuse_grids(work, example_values(work, example_inputs), params, staged, backend)
            fuse_runs(work, params, staged, backend)
            work.recompile()
        except Exception as exc:  # a bug here must not break the model: it runs as captured
            report.leave(f"captured graph {report.captures}",
                         f"not rewritten ({type(exc).__name__}: {exc}); it runs as written")
            return gm.forward
        report.merge(staged)
        return work.forward
    return rewrite


def _fx_blocker(model: nn.Module):
    """Why torch.fx cannot be trusted with this forward, or None."""
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return "its signature cannot be read"
    for p in sig.parameters.values():
        if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) or p.default is not p.empty:
            return (f"forward has an optional, keyword-only or variadic argument ({p.name}), which "
                    "torch.fx would fix to one case")
    return None


def _as_call(example_inputs, example_kwargs):
    if example_inputs is None:
        args = ()
    elif isinstance(example_inputs, torch.Tensor):
        args = (example_inputs,)
    elif isinstance(example_inputs, (tuple, list)):
        args = tuple(example_inputs)
    else:
        raise TypeError(f"example_inputs: expected a tensor or a tuple of arguments, got "
                        f"{type(example_inputs).__name__}")
    if example_kwargs is not None and not isinstance(example_kwargs, dict):
        raise TypeError(f"example_kwargs: expected a dict, got {type(example_kwargs).__name__}")
    return args, dict(example_kwargs or {})


def _calls_grid_sample(graph: fx.Graph) -> bool:
    return any(n.op == "call_function" and n.target is F.grid_sample for n in graph.nodes)


def _choose_capture(model: nn.Module, capture: str):
    """(mode, fx graph or None, why): "fx" with its graph, "dynamo" with the reason fx was
    not used, or None with the reason nothing can capture the forward."""
    unavailable = dynamo_unavailable()
    if capture == "dynamo":
        return (None, None, unavailable) if unavailable else ("dynamo", None, "as asked (capture='dynamo')")
    why, graph = (_fx_blocker(model) if capture == "auto" else None), None
    if why is None:
        try:
            graph = _Tracer().trace(model)
        except Exception as exc:  # einops, data-dependent control flow and the like
            why = f"torch.fx could not trace the forward ({type(exc).__name__}: {exc})"
    if graph is not None and capture == "auto" and _calls_grid_sample(graph):
        why = "it calls grid_sample, whose pipelines are matched on the shapes of a real call"
    if why is None or capture == "fx" or unavailable:
        if graph is not None:
            return "fx", graph, None
        return None, None, why + (f"; {unavailable}" if unavailable and capture != "fx" else "")
    return "dynamo", None, why


def accelerate(model: nn.Module, example_inputs=None, *, example_kwargs=None, capture: str = "auto",
               backend: str = "auto", inplace: bool = True):
    """Fuse the MLP runs and grid_sample pipelines of `model` (see the module docstring).

    example_inputs (a tensor or a tuple of positional arguments) and example_kwargs: a
    call to capture with dynamo now (otherwise it captures on the first call). Returns
    the model (a deep copy when inplace=False) with `.acceleration_report`. Calling it
    again on an accelerated model captures the original forward afresh.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if capture not in CAPTURES:
        raise ValueError(f"capture must be one of {CAPTURES}, got {capture!r}")
    if not isinstance(backend, str) or backend.lower() not in _backend_module.BACKENDS:
        raise ValueError(f"backend must be one of {_backend_module.BACKENDS}, got {backend!r}")
    args, kwargs = _as_call(example_inputs, example_kwargs)
    if not inplace:
        model = copy.deepcopy(model)
    deaccelerate(model)
    mode, graph, why = _choose_capture(model, capture)
    report = AccelerationReport(mode=mode or capture)
    model.acceleration_report = report
    if mode is None:
        report.leave("model", f"could not be captured: {why}")
        return model
    if mode == "fx":
        runner = _FxForward(model, graph, report, backend.lower())
    else:
        report.notes.append(f"captured with torch._dynamo: {why}")
        runner = DynamoForward(model, _dynamo_rewriter(model, report, backend.lower()))
    original = model.__dict__.get("forward")
    object.__setattr__(model, _ATTR, (original, runner))  # not a submodule: state_dict unchanged
    model.forward = types.MethodType(lambda self, *a, **k: getattr(self, _ATTR)[1](*a, **k), model)
    if mode == "dynamo":
        if args or kwargs:
            model(*args, **kwargs)
        else:
            report.notes.append(_PENDING)
    return model


def deaccelerate(model: nn.Module) -> nn.Module:
    """Undo accelerate(): the model's own forward runs again."""
    state = model.__dict__.pop(_ATTR, None)
    if state is not None:
        original, _ = state
        if original is None:
            model.__dict__.pop("forward", None)
        else:
            model.forward = original
        model.__dict__.pop("acceleration_report", None)
    return model
