"""F.grid_sample pipelines of a captured graph -> one grid_lookup call each.

A pipeline is what factorized-grid models (tri-planes, K-Planes, TensoRF-like planes,
DDMI's decoders) compute with one F.grid_sample per plane and scale:

    features = concat over scales s of  combine over planes p of
               grid_sample(field[s][p], coords[..., planes[p]])

- coords: ONE coordinate tensor c. Each grid is c with the plane's axes picked out and
  reshaped (indexing, view, permute, unsqueeze, stack, einops, ...), optionally through
  elementwise maps by constants (x / 1.1 + 0.5, 2 x - 1, .float()), the same for every
  plane of the pipeline. The axis of c that holds the coordinates may be any (DDMI's
  [B, 2, H, W] grids too).
- field[s][p]: grid_sample's input [B, C, (D,) H, W]. When it is the same for every b by
  construction (a parameter or buffer, possibly sliced, unsqueezed or expanded over the
  batch), the lookup reads field[0] as one shared [C, (D,) H, W] field (a view of the
  parameter, so its gradient lands there); otherwise it is a per-sample field, read
  where sample b's points read it.
- coordinates to lookup points: shared fields take every point of c as one batch;
  per-sample fields take c's first dimension as the batch, or (when all samples read
  the same points) c's points for every sample.
- bilinear (trilinear for volumes), padding "border" or "zeros", either align_corners.
- combine: + (sum; also a running `0 + ...` or `+=`), * (product; also `1. * ...`),
  mean (a sum divided by the number of planes, or stack(...).mean(dim)), torch.cat over
  the channel axis (concat over planes or scales), and any reshaping of the result that
  keeps points x channels or channels-first ([B, C, H, W]) order.

How it is found: every value from the coordinate tensor to a grid, and from a
grid_sample's output to the features, is evaluated once more on index tensors ("tags":
each element holds its own position), so the result says exactly which coordinate each
grid element reads and which (point, channel) each feature element holds, however the
model spelled the reshaping. A pipeline becomes one grid_lookup call per (planes,
combine) group, reading the same parameter tensors (so gradients reach them and the
optimizer state stays valid). Before the graph is changed, the replacement is evaluated
on the captured example and compared with the model's own numbers; any difference
leaves the pipeline alone, with the reason in the report.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import operator
from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from .accelerate_mlp import prune
from .backend import use_backend
from .ops.grid_lookup import grid_lookup

_GRID_SAMPLE = {F.grid_sample}
# ops that only move, pick or broadcast elements
_MOVE_FUNCTIONS = {operator.getitem, torch.reshape, torch.permute, torch.transpose, torch.squeeze,
                   torch.unsqueeze, torch.flatten, torch.movedim, torch.swapaxes, torch.stack,
                   torch.cat, torch.narrow, torch.select, torch.index_select, torch.broadcast_to,
                   torch.flip}
_MOVE_METHODS = {"view", "reshape", "permute", "transpose", "squeeze", "unsqueeze", "flatten",
                 "unflatten", "expand", "repeat", "contiguous", "movedim", "swapaxes", "narrow",
                 "select", "t", "view_as", "reshape_as", "expand_as", "flip"}
# ops that map every element alike (by constants): they commute with the moves above
_MAP_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.truediv, operator.neg,
                  torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.clamp}
_MAP_METHODS = {"add", "sub", "mul", "div", "neg", "clamp", "clamp_min", "clamp_max", "float",
                "double", "half", "to", "clone", "type_as"}
_ADD = ({operator.add, operator.iadd, torch.add}, {"add", "add_"})
_MUL = ({operator.mul, operator.imul, torch.mul}, {"mul", "mul_"})
_DIV = ({operator.truediv, operator.itruediv, torch.div}, {"div", "div_"})
_REDUCE = {"sum": "sum", "mean": "mean", "prod": "product"}


class NotAPipeline(Exception):
    """The reason, in words a user can act on, that a grid_sample call stays as it is."""


def _is(node, functions, methods) -> bool:
    return (node.op == "call_function" and node.target in functions) or \
        (node.op == "call_method" and node.target in methods)


def _tensor_inputs(node, env):
    out = []
    for a in node.all_input_nodes:
        if isinstance(env.get(a), torch.Tensor) and a not in out:
            out.append(a)
    return out


def _kind(node, env) -> Optional[str]:
    """"move", "map" (elementwise by constants) or None."""
    if not isinstance(env.get(node), torch.Tensor):
        return None
    if _is(node, _MOVE_FUNCTIONS, _MOVE_METHODS):
        return "move"
    if _is(node, _MAP_FUNCTIONS, _MAP_METHODS):
        others = [a for a in list(node.args) + list(node.kwargs.values()) if not isinstance(a, fx.Node)]
        if len(_tensor_inputs(node, env)) == 1 and len(node.all_input_nodes) == 1 and all(
                isinstance(a, (int, float, bool, torch.dtype, type(None))) for a in others):
            return "map"
    return None


def _evaluate(node, env, subst, memo):
    """node's value with the values of `subst` replaced (maps pass values through)."""
    if node in subst:
        return subst[node]
    if node in memo:
        return memo[node]
    if "reach" not in memo:
        memo["reach"] = _downstream(subst)
    if node not in memo["reach"]:
        return env[node]
    kind = _kind(node, env)
    if kind == "map":
        value = _evaluate(_tensor_inputs(node, env)[0], env, subst, memo)
    elif kind == "move":
        ev = lambda a: _evaluate(a, env, subst, memo)  # noqa: E731
        args = fx.node.map_arg(node.args, ev)
        kwargs = fx.node.map_arg(node.kwargs, ev)
        value = node.target(*args, **kwargs) if node.op == "call_function" else \
            getattr(args[0], node.target)(*args[1:], **kwargs)
    else:
        raise NotAPipeline(f"the value goes through {_describe(node)}")
    memo[node] = value
    return value


def _downstream(sources) -> set:
    """Every node computed from any of sources."""
    seen, stack = set(), list(sources)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.users)
    return seen


def _describe(node) -> str:
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{target} ({node.name})"


def _tags(shape) -> torch.Tensor:
    return torch.arange(math.prod(shape), dtype=torch.int64).view(tuple(shape))


# ------------------------------------------------------------------ reads (one grid_sample)


def _coordinate_source(node, env):
    """(root, maps): the tensor the grid is made from and the elementwise maps on the
    way (graph order); the walk stops where two tensors meet or something else happens."""
    kind = _kind(node, env)
    inputs = _tensor_inputs(node, env)
    if kind is None or not inputs:
        return node, ()
    found = [_coordinate_source(i, env) for i in inputs]
    if kind == "map":
        root, maps = found[0]
        return root, maps + (node,)
    if all(f[0] is found[0][0] and _signature(f[1]) == _signature(found[0][1]) for f in found):
        return found[0]
    return node, ()


def _signature(maps) -> tuple:
    return tuple((n.op, n.target, tuple(a for a in n.args if not isinstance(a, fx.Node)),
                  tuple(sorted(n.kwargs.items()))) for n in maps)


@dataclasses.dataclass(eq=False)
class Read:
    node: fx.Node
    root: fx.Node
    maps: tuple
    axis_dim: int          # the dimension of root that holds the coordinates
    axes: tuple            # plane axes, grid x first
    points: torch.Tensor   # [Bg, *out spatial]: flat point index over root's other dims
    field: fx.Node         # the tensor grid_sample reads ([B, C, ...])
    shared: bool           # the same for every b: the lookup reads field[0]
    field_name: str
    channels: int
    align_corners: bool
    padding_mode: str
    batch: int             # grid_sample's batch

    @property
    def key(self):
        return (self.root, _signature(self.maps), self.axis_dim, self.align_corners, self.padding_mode)


def _grid_sample_args(node):
    names = ("input", "grid", "mode", "padding_mode", "align_corners")
    defaults = (None, None, "bilinear", "zeros", None)
    bound = dict(zip(names, defaults))
    bound.update(zip(names, node.args))
    bound.update(node.kwargs)
    return bound


def _read(node, env, params) -> Read:
    a = _grid_sample_args(node)
    if a["mode"] != "bilinear":
        raise NotAPipeline(f"mode {a['mode']!r} (the lookup interpolates bilinearly)")
    if a["padding_mode"] not in ("border", "zeros"):
        raise NotAPipeline(f"padding_mode {a['padding_mode']!r} (the lookup pads by border or zeros)")
    field, grid = a["input"], a["grid"]
    if not all(isinstance(n, fx.Node) for n in (field, grid)):
        raise NotAPipeline("the field or the grid is not a tensor of the graph")
    g = env[grid]
    nd = g.shape[-1]
    root, maps = _coordinate_source(grid, env)
    shape = tuple(env[root].shape)
    tags = _evaluate(grid, env, {root: _tags(shape)}, {})
    index = torch.unravel_index(tags, shape)  # per root dim, [Bg, *out, nd]
    varying = [d for d, ix in enumerate(index) if not bool((ix == ix[..., :1]).all())]
    if len(varying) != 1:
        raise NotAPipeline("each grid point does not read the axes of one point of the coordinate tensor")
    axis_dim = varying[0]
    axes = index[axis_dim].reshape(-1, nd)
    if not bool((axes == axes[:1]).all()) or len(set(axes[0].tolist())) != nd:
        raise NotAPipeline("the grid does not read the same distinct coordinate axes at every point")
    others = [ix[..., 0] for d, ix in enumerate(index) if d != axis_dim]
    other_shape = [s for d, s in enumerate(shape) if d != axis_dim]
    points = torch.zeros_like(others[0]) if others else torch.zeros(tags.shape[:-1], dtype=torch.int64)
    for ix, size in zip(others, other_shape):
        points = points * size + ix
    shared, name = _field(field, env, params, nd)
    return Read(node, root, maps, axis_dim, tuple(axes[0].tolist()), points, field, shared,
                name, env[field].shape[1], bool(a["align_corners"]), a["padding_mode"], g.shape[0])


def _field(field, env, params, nd):
    """(shared, name) of the field grid_sample reads: shared when it is one tensor
    broadcast over the batch (a parameter unsqueezed / expanded / sliced, typically),
    which the lookup reads as field[0]; else per-sample [B, C, ...]."""
    value = env[field]
    if value.dim() != 2 + nd:
        raise NotAPipeline(f"the field is not [B, C, {'D, ' if nd == 3 else ''}H, W]")
    n = field
    while n not in params and _kind(n, env) == "move" and len(_tensor_inputs(n, env)) == 1:
        n = _tensor_inputs(n, env)[0]
    tags = _evaluate(field, env, {n: _tags(env[n].shape)}, {})
    shared = bool((tags == tags[:1]).all())
    name = params[n][0] if n in params else f"{'shared' if shared else 'per-sample'} {field.name}"
    return shared, name


# ------------------------------------------------------------- values built from reads


@dataclasses.dataclass(eq=False)
class Value:
    """A tensor of the pipeline: tag = point * channels + channel of every element, and
    what its channels are: ("factor", read) | ("combine", kind, reads) | ("concat", items)."""
    tag: torch.Tensor
    struct: tuple
    channels: int


def _combine_of(struct):
    return struct[1] if struct[0] == "combine" else ("single" if struct[0] == "factor" else None)


def _reads_of(struct):
    return [struct[1]] if struct[0] == "factor" else list(struct[2])


def _combined(a: Value, b: Value, kind: str) -> Optional[Value]:
    if a.tag.shape != b.tag.shape or not torch.equal(a.tag, b.tag):
        return None
    ka, kb = _combine_of(a.struct), _combine_of(b.struct)
    if ka not in ("single", kind) or kb not in ("single", kind):
        return None
    return Value(a.tag, ("combine", kind, _reads_of(a.struct) + _reads_of(b.struct)), a.channels)


def _scalar(x):
    return x if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _step(node, values, env, internal) -> Optional[Value]:
    """The Value of node if it continues the pipeline from values of its inputs (nodes
    of the pipeline that hold no Value, the stack before a reduction, go to internal)."""
    if _is(node, {torch.sum, torch.mean, torch.prod}, {"sum", "mean", "prod"}):
        v = _reduced(node, values, env)
        if v is not None:
            internal.add(node.args[0])
        return v
    ins = [a for a in node.all_input_nodes if a in values]
    if not ins:
        return None
    args = list(node.args)
    if _is(node, *_ADD) or _is(node, *_MUL):
        kind = "sum" if _is(node, *_ADD) else "product"
        if len(args) != 2 or node.kwargs:
            return None
        a, b = args
        if a in values and b in values:
            return _combined(values[a], values[b], kind)
        v, other = (values[a], b) if a in values else (values[b], a)
        neutral = 0 if kind == "sum" else 1
        return v if _scalar(other) == neutral else None
    if _is(node, *_DIV) and len(args) == 2 and args[0] in values:
        v = values[args[0]]
        if v.struct[0] == "combine" and v.struct[1] == "sum" and _scalar(args[1]) == len(v.struct[2]):
            return Value(v.tag, ("combine", "mean", v.struct[2]), v.channels)
        return None
    if _is(node, {torch.cat}, set()):
        return _concatenated(node, values, env)
    if _kind(node, env) == "move" and len(ins) == 1 and len(_tensor_inputs(node, env)) == 1:
        v = values[ins[0]]
        return Value(_evaluate(node, env, {ins[0]: v.tag}, {}), v.struct, v.channels)
    return None


def _list_arg(node):
    items = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return items, dim


def _concatenated(node, values, env) -> Optional[Value]:
    items, dim = _list_arg(node)
    if not isinstance(items, (list, tuple)) or not all(i in values for i in items):
        return None
    vs = [values[i] for i in items]
    total = sum(v.channels for v in vs)
    retagged, offset = [], 0
    for v in vs:  # the same points, channels shifted to their place in the concatenation
        retagged.append(v.tag // v.channels * total + v.tag % v.channels + offset)
        offset += v.channels
    return Value(torch.cat(retagged, dim), ("concat", [v.struct for v in vs]), total)


def _reduced(node, values, env) -> Optional[Value]:
    """stack(planes, dim).sum / mean / prod(dim): a combine over the stacked planes."""
    src = node.args[0] if node.args else None
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if not isinstance(src, fx.Node) or not _is(src, {torch.stack}, set()) or len(src.users) != 1 \
            or node.kwargs.get("keepdim"):
        return None
    items, sdim = _list_arg(src)
    if dim is None or not isinstance(items, (list, tuple)) or not all(i in values for i in items):
        return None
    rank = env[src].dim()
    if dim % rank != sdim % rank:
        return None
    name = node.target if isinstance(node.target, str) else node.target.__name__
    kind = _REDUCE[name]
    out = values[items[0]]
    for i in items[1:]:
        out = _combined(out, values[i], "sum" if kind == "mean" else kind)
        if out is None:
            return None
    if kind == "mean":
        out = Value(out.tag, ("combine", "mean", _reads_of(out.struct)), out.channels)
    return out


# ---------------------------------------------------------------- lookups and outputs


@dataclasses.dataclass(eq=False)
class Scale:
    combine: str
    reads: list

    @property
    def planes(self):
        return tuple(r.axes for r in self.reads)


def _scales(struct) -> list:
    """The grid_lookup scales a Value's channels are, in channel order."""
    if struct[0] == "factor":
        return [Scale("sum", [struct[1]])]
    if struct[0] == "combine":
        reads = struct[2]
        if struct[1] != "concat":  # commutative: one plane order for every scale
            reads = sorted(reads, key=lambda r: r.axes)
        return [Scale(struct[1], reads)]
    items = struct[1]
    if len(items) > 1 and all(i[0] == "factor" for i in items):
        reads = [i[1] for i in items]
        if len({r.channels for r in reads}) == 1 and len({r.axes for r in reads}) > 1:
            return [Scale("concat", reads)]  # planes concatenated: one scale
    return [s for i in items for s in _scales(i)]


def _layout(value: Value, node_shape, point_shape, batch):
    """How the lookup's [points, channels] output becomes this value: (lead recipe, size-1
    dims inserted, channels_first), or None. Recipes are rebuilt from the runtime
    coordinate shape: "points" (the coordinate tensor's own point dims), "flat", "first"
    (first dim, then the rest flattened) or "batch_points" (fields' batch, then points)."""
    total = math.prod(point_shape) * (batch or 1)
    if batch:
        recipes = {"batch_points": (batch, *point_shape), "flat": (total,)}
    else:
        recipes = {"points": tuple(point_shape), "flat": (total,)}
        if point_shape:
            recipes["first"] = (point_shape[0], total // point_shape[0])
    c = value.channels
    for channels_first in (False, True):
        shape = list(node_shape)
        cdim = 1 if channels_first else len(shape) - 1
        if len(shape) < 2 or shape[cdim] != c:
            continue
        lead = shape[:cdim] + shape[cdim + 1:]
        for name, candidate in recipes.items():
            ones = _extra_ones(lead, candidate)
            if ones is None:
                continue
            flat = _tags((*lead, c))
            if torch.equal(value.tag, flat.movedim(-1, 1) if channels_first else flat):
                return name, ones, channels_first
    return None


def _extra_ones(lead, candidate):
    """Positions of the size-1 dims of lead that candidate lacks, or None if lead is not
    candidate with size-1 dims inserted."""
    ones, i = [], 0
    for j, size in enumerate(lead):
        if i < len(candidate) and size == candidate[i]:
            i += 1
        elif size == 1:
            ones.append(j)
        else:
            return None
    return tuple(ones) if i == len(candidate) else None


def _lead(recipe, ones, point_shape, batch):
    lead = {"points": lambda: list(point_shape), "flat": lambda: [-1],
            "first": lambda: [point_shape[0], -1], "batch_points": lambda: [batch, *point_shape]}[recipe]()
    for j in ones:
        lead.insert(j, 1)
    return lead


def grid_pipeline(root, *tensors, spec):
    """The replacement of one pipeline: its grid_lookup calls, cut and reshaped into the
    values the model used. tensors: the fields, in spec's order."""
    coords = root
    for op, target, args, kwargs, pos in spec["maps"]:  # the model's elementwise maps, replayed
        call_args = list(args)
        call_args.insert(pos, coords)
        coords = target(*call_args, **kwargs) if op == "call_function" else \
            getattr(call_args[0], target)(*call_args[1:], **kwargs)
    coords = coords.movedim(spec["axis_dim"], -1)
    point_shape = coords.shape[:-1]
    batch = tensors[spec["batch_field"]].shape[0] if spec["mode"] == "broadcast" else None
    if spec["mode"] == "flat":
        coords = coords.reshape(1, -1, coords.shape[-1])
    elif spec["mode"] == "batched":
        coords = coords.reshape(point_shape[0], -1, coords.shape[-1])
    else:
        coords = coords.reshape(1, -1, coords.shape[-1]).expand(batch, -1, -1)
    ys = []
    with use_backend(spec["backend"]) if spec["backend"] != "auto" else contextlib.nullcontext():
        for call in spec["calls"]:
            fields = [[tensors[i][0] if shared else tensors[i] for i, shared in scale]
                      for scale in call["fields"]]
            ys.append(grid_lookup(coords, fields, call["planes"], combine=call["combine"],
                                  align_corners=spec["align_corners"], padding_mode=spec["padding_mode"]))
    outs = []
    for pieces, recipe, ones, channels_first in spec["outputs"]:
        parts = [ys[call][..., start:stop] for call, start, stop in pieces]
        y = parts[0] if len(parts) == 1 else torch.cat(parts, -1)
        y = y.reshape(*_lead(recipe, ones, point_shape, batch), y.shape[-1])
        outs.append(y.movedim(-1, 1) if channels_first else y)
    return tuple(outs)


def _bound(spec):
    """grid_pipeline with its spec bound: the graph's code holds the spec by reference
    (it names functions, which generated code cannot spell)."""
    def lookup_pipeline(root, *tensors):
        return grid_pipeline(root, *tensors, spec=spec)
    return lookup_pipeline


def _mode(reads, root_shape, axis_dim):
    """How the lookup's [B, N, D] coordinates come from the root, and each read's
    canonical point index (b * N + n)."""
    point_shape = [s for d, s in enumerate(root_shape) if d != axis_dim]
    per_sample = [r for r in reads if not r.shared]
    if not per_sample:
        return "flat", point_shape, None, {r: r.points for r in reads}
    batch = per_sample[0].batch
    if any(r.batch != batch for r in reads):
        raise NotAPipeline("per-sample fields with different batch sizes")
    count = math.prod(point_shape)
    b = {r: torch.arange(r.batch).view(-1, *[1] * (r.points.dim() - 1)) for r in reads}
    if point_shape and point_shape[0] == batch and all(
            bool((r.points // (count // batch) == b[r]).all()) for r in per_sample):
        return "batched", point_shape, None, {r: r.points for r in reads}
    if all(bool((r.points == r.points[:1]).all()) for r in reads):
        return "broadcast", point_shape, batch, {r: b[r] * count + r.points for r in reads}
    raise NotAPipeline("per-sample fields read at points of other samples")


def _pipeline(reads, env, backend):
    """(replacement spec, field nodes, output nodes, field names) of the reads that share
    one coordinate tensor and options."""
    first = reads[0]
    mode, point_shape, batch, canon = _mode(reads, tuple(env[first.root].shape), first.axis_dim)
    values, outputs = _values(reads, canon, env)
    calls, out_specs = _place(outputs, values, env, point_shape, batch)
    call_specs, field_nodes, field_index = _call_specs(calls)
    spec = {"maps": _replayable(first.maps), "axis_dim": first.axis_dim, "mode": mode,
            "batch_field": next((field_index[r.field] for r in reads if not r.shared), None),
            "calls": call_specs, "outputs": out_specs, "align_corners": first.align_corners,
            "padding_mode": first.padding_mode, "backend": backend}
    return spec, field_nodes, outputs, {r.field: r.field_name for r in reads}


def _values(reads, canon, env):
    """The Values from the reads on, in graph order, and those the model uses elsewhere
    (the outputs the lookup must produce)."""
    values, internal = {}, set()
    for r in reads:
        v = env[r.node]
        pts = canon[r].unsqueeze(1)  # [Bg, 1, *out]
        ch = torch.arange(r.channels).view(1, -1, *[1] * (v.dim() - 2))
        values[r.node] = Value(pts * r.channels + ch, ("factor", r), r.channels)
    for node in reads[0].node.graph.nodes:  # graph order: inputs before users
        if node not in values:
            v = _step(node, values, env, internal)
            if v is not None:
                values[node] = v
    outputs = [n for n in values if any(u not in values and u not in internal for u in n.users)]
    return values, outputs


def _place(outputs, values, env, point_shape, batch):
    """Group the outputs' scales into lookups (one per combine and plane list) and say
    where each output's channels lie: calls {(combine, planes): scales}, and per output
    ([(call, start, stop)], recipe, size-1 dims, channels_first)."""
    calls, placed, out_specs = {}, {}, []
    for n in outputs:
        layout = _layout(values[n], env[n].shape, point_shape, batch)
        if layout is None:
            raise NotAPipeline(f"its features reach {_describe(n)} in a layout that is neither points x "
                               "channels nor channels-first")
        pieces = []
        for scale in _scales(values[n].struct):
            ident = tuple(r.node for r in scale.reads)
            scales = calls.setdefault((scale.combine, scale.planes), [])
            if ident not in placed:
                width = scale.reads[0].channels * (len(scale.reads) if scale.combine == "concat" else 1)
                start = sum(placed[tuple(r.node for r in s.reads)][2] for s in scales)
                placed[ident] = (list(calls).index((scale.combine, scale.planes)), start, width)
                scales.append(scale)
            call, start, width = placed[ident]
            if pieces and pieces[-1][0] == call and pieces[-1][2] == start:
                pieces[-1] = (call, pieces[-1][1], start + width)  # consecutive: one slice
            else:
                pieces.append((call, start, start + width))
        out_specs.append((pieces, *layout))
    return calls, out_specs


def _call_specs(calls):
    """Per lookup: fields as (index into the field list, shared), planes, combine."""
    specs, field_nodes, field_index = [], [], {}
    for (combine, planes), scales in calls.items():
        fields = []
        for scale in scales:
            for r in scale.reads:
                if r.field not in field_index:
                    field_index[r.field] = len(field_nodes)
                    field_nodes.append(r.field)
            fields.append([(field_index[r.field], r.shared) for r in scale.reads])
        specs.append({"fields": fields, "planes": [list(p) for p in planes],
                      "combine": "sum" if combine == "single" else combine})
    return specs, field_nodes, field_index


def _replayable(maps):
    """The coordinate maps as (op, target, constant args, kwargs, position of the tensor)."""
    out = []
    for m in maps:
        pos = next((i for i, a in enumerate(m.args) if isinstance(a, fx.Node)), None)
        if pos is None:
            raise NotAPipeline(f"the coordinates go through {_describe(m)} with the tensor as a keyword")
        out.append((m.op, m.target, tuple(a for a in m.args if not isinstance(a, fx.Node)), dict(m.kwargs), pos))
    return out


def _check(spec, root, field_nodes, outputs, env):
    """The replacement on the captured example equals the model's own values."""
    with torch.no_grad():
        got = grid_pipeline(env[root], *[env[f] for f in field_nodes], spec={**spec, "backend": "torch"})
    for g, n in zip(got, outputs):
        want = env[n].to(g.dtype)
        if g.shape != want.shape or not torch.allclose(g, want, rtol=1e-4, atol=1e-5 * (1 + want.abs().max().item())):
            raise NotAPipeline(f"the fused lookup does not reproduce {_describe(n)} on the example (an "
                               "unsupported spelling); it stays as written")


def fuse_grids(gm: fx.GraphModule, env: dict, params: dict, report, backend: str) -> None:
    """Replace the grid_sample pipelines of gm's graph (in place). env: every node's value
    on the captured example; params: parameter / buffer nodes -> (name, tensor)."""
    reads, groups = {}, {}
    for node in gm.graph.nodes:
        if _is(node, _GRID_SAMPLE, set()):
            try:
                r = _read(node, env, params)
            except NotAPipeline as why:
                report.leave(f"grid_sample {node.name}", str(why))
                continue
            reads[node] = r
            groups.setdefault(r.key, []).append(r)
    for group in groups.values():
        try:
            spec, field_nodes, outputs, names = _pipeline(group, env, backend)
            _check(spec, group[0].root, field_nodes, outputs, env)
        except NotAPipeline as why:
            report.leave(", ".join(f"grid_sample {r.node.name}" for r in group), str(why))
            continue
        # right after its last input: values the model uses early (DDMI feeds each scale at
        # another depth) then exist where they are needed
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        anchor = max([group[0].root, *field_nodes, *placeholders[-1:]], key=order.__getitem__)
        with gm.graph.inserting_after(anchor):
            call = gm.graph.call_function(_bound(spec), (group[0].root, *field_nodes))
        getters = []
        with gm.graph.inserting_after(call):
            for i in reversed(range(len(outputs))):
                getters.insert(0, gm.graph.call_function(operator.getitem, (call, i)))
        for n, got in zip(outputs, getters):
            n.replace_all_uses_with(got)
        prune(gm.graph, outputs)
        report.add_grid({"grid_samples": len(group), "calls": [
            {"planes": c["planes"], "combine": c["combine"],
             "fields": [[names[field_nodes[i]] for i, _ in scale] for scale in c["fields"]]}
            for c in spec["calls"]], "align_corners": spec["align_corners"],
            "padding_mode": spec["padding_mode"]})
