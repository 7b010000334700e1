"""Linear/activation runs of a captured graph -> one fused_mlp call each.

A run is a chain, found however the model spells it:
- a linear map: nn.Linear (a module call in an fx trace), or F.linear on the model's own
  weight / bias parameters (how dynamo records every nn.Linear, and how siren-pytorch
  writes its layers);
- between two linear maps: sin(w0 * z) (w0 a constant; z * w0 and plain sin(z) too),
  ReLU, GELU (exact), SiLU, LeakyReLU (optionally times a constant gain), with any number
  of nn.Identity / nn.Dropout(p=0) / F.dropout(p=0) around it;
- per hidden layer, optionally FiLM (z * scale + shift, functa / COIN++) before the
  activation and a multiplicative modulation (sin(w0 z) * m, siren-pytorch) after it,
  where scale / shift / m are tensors the model computes (from a latent, typically);
- optionally an activation after the last linear map.

The fused call reads the same parameter tensors (the graph's own nodes for them), so
training goes on, state_dict keys are unchanged and an optimizer built before keeps
working. A run needs >= 2 linear maps whose widths the kernel takes (in <= 64, hidden <=
512, out <= 64) and whose intermediate values nothing else uses. Per-sample modulations
map to fused_mlp's [B, width] form for x [B, N, in]; other shapes run the same math in
PyTorch.
"""
from __future__ import annotations

import math
import operator
from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .backend import use_backend
from .ops.fused_mlp import MAX_HIDDEN, MAX_IN, MAX_OUT, fused_mlp

_SIN = {torch.sin}
_MUL = {operator.mul, torch.mul}
_ACT_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", F.gelu: "gelu", F.silu: "silu",
                  F.leaky_relu: "leaky_relu"}
_ACT_MODULES = {nn.ReLU: "relu", nn.GELU: "gelu", nn.SiLU: "silu", nn.LeakyReLU: "leaky_relu"}
_BINARY = {"mul": ({operator.mul, torch.mul, operator.imul}, ("mul", "mul_")),
           "add": ({operator.add, torch.add, operator.iadd}, ("add", "add_"))}


def _const(v) -> Optional[float]:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def prune(graph: fx.Graph, nodes) -> None:
    """Erase each of `nodes` that nothing uses any more, then whatever fed only it (the
    replaced runs and pipelines). Inputs, attributes and side-effecting calls stay."""
    stack, erased = list(nodes), set()
    while stack:
        n = stack.pop()
        if n in erased or n.users or n.op in ("placeholder", "get_attr", "output") or n.is_impure():
            continue
        inputs = list(n.all_input_nodes)
        graph.erase_node(n)
        erased.add(n)
        stack.extend(inputs)


class RunMatcher:
    """Recognises the pieces of a run in a captured graph.

    params maps the graph's parameter nodes (get_attr in an fx trace, placeholders in a
    dynamo capture) to (qualified name, tensor)."""

    def __init__(self, gm: fx.GraphModule, params: dict):
        self.gm = gm
        self.params = params
        self.modules = dict(gm.named_modules())

    def per_point(self, node) -> bool:
        """True if a captured value (dynamo records shapes) varies over points, which the
        kernel's [width] / [B, width] modulations cannot hold."""
        value = node.meta.get("example_value") if isinstance(node, fx.Node) else None
        if not isinstance(value, torch.Tensor):
            return False
        lead = [s if isinstance(s, int) else 2 for s in value.shape[:-1]]  # symbolic: > 1
        return math.prod(lead) > 1 and not (len(lead) >= 2 and math.prod(lead[1:]) == 1)

    def module(self, node):
        return self.modules.get(node.target) if node.op == "call_module" else None

    def linear(self, node):
        """(input, weight ref, bias ref or None, display name) if node is a linear map; a ref
        is a parameter node, or an attribute path for an nn.Linear module call."""
        m = self.module(node)
        if isinstance(m, nn.Linear):
            return (node.args[0], f"{node.target}.weight",
                    f"{node.target}.bias" if m.bias is not None else None, node.target)
        if node.op == "call_function" and node.target in (F.linear, torch._C._nn.linear):
            args = list(node.args) + [node.kwargs.get("bias")] * (3 - len(node.args))
            w, b = args[1], args[2]
            if w in self.params and (b is None or b in self.params):
                return args[0], w, b, self.params[w][0].rsplit(".", 1)[0]
        return None

    def tensor(self, ref) -> torch.Tensor:
        return self.params[ref][1] if isinstance(ref, fx.Node) else self.gm.get_parameter(ref)

    def node(self, ref) -> fx.Node:
        return ref if isinstance(ref, fx.Node) else self.gm.graph.get_attr(ref)

    def passthrough(self, node) -> bool:
        m = self.module(node)
        if isinstance(m, nn.Identity) or (isinstance(m, nn.Dropout) and m.p == 0):
            return True
        if node.op == "call_function" and node.target is F.dropout:
            p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
            return p == 0
        return False

    def activation(self, node):
        """(kind, w0 or slope, gain, last node) for an activation starting at node, else None."""
        m = self.module(node)
        scale = self.const_mul(node)
        if scale is not None and len(node.users) == 1:
            nxt = next(iter(node.users))
            if self.is_sin(nxt):
                return "sine", scale[0], 1.0, nxt
        if self.is_sin(node):
            return "sine", 1.0, 1.0, node
        kind, slope = None, 0.01
        if m is not None and type(m) in _ACT_MODULES:
            kind = _ACT_MODULES[type(m)]
            if isinstance(m, nn.GELU) and m.approximate != "none":
                return None
            slope = getattr(m, "negative_slope", slope)
        elif node.op == "call_function" and node.target in _ACT_FUNCTIONS:
            kind = _ACT_FUNCTIONS[node.target]
            if kind == "gelu" and node.kwargs.get("approximate", "none") != "none":
                return None
            if kind == "leaky_relu":
                slope = node.kwargs.get("negative_slope", node.args[1] if len(node.args) > 1 else 0.01)
        elif node.op == "call_method" and node.target == "relu":
            kind = "relu"
        if kind is None:
            return None
        gain, last = 1.0, node
        if kind == "leaky_relu" and len(node.users) == 1:
            g = self.const_mul(next(iter(node.users)))
            if g is not None:
                gain, last = g[0], next(iter(node.users))
        return kind, float(slope), gain, last

    def is_sin(self, node) -> bool:
        return (node.op == "call_function" and node.target in _SIN) or \
            (node.op == "call_method" and node.target == "sin")

    def const_mul(self, node):
        """(constant,) if node multiplies its single tensor input by a constant."""
        if not ((node.op == "call_function" and node.target in _MUL) or
                (node.op == "call_method" and node.target == "mul")) or len(node.args) != 2:
            return None
        a, b = node.args[0], node.args[1]
        if _const(a) is not None and isinstance(b, fx.Node):
            return (_const(a),)
        if _const(b) is not None and isinstance(a, fx.Node):
            return (_const(b),)
        return None


def _external_operand(node, chain_node, kind):
    """If `node` is chain_node (*|+) t with t a tensor from outside the run, return t."""
    if node is None:
        return None
    functions, methods = _BINARY[kind]
    if not ((node.op == "call_function" and node.target in functions) or
            (node.op == "call_method" and node.target in methods)) or len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    if a is chain_node and isinstance(b, fx.Node) and b is not chain_node:
        return b
    if b is chain_node and isinstance(a, fx.Node):
        return a
    return None


def _only_user(node):
    return next(iter(node.users)) if len(node.users) == 1 else None


def _find_run(start, matcher):
    """Follow the chain from linear node `start`.

    Returns (layers, acts, mods, final, last): the linear nodes; per hidden layer its
    activation (kind, w0 or slope, gain) and modulation nodes {"scale", "shift", "mult"};
    the final activation or None; the node whose value the fused call replaces."""
    layers, acts, mods = [start], [], []
    node, final = start, None
    while True:
        cur = _only_user(node)
        while cur is not None and matcher.passthrough(cur):
            node, cur = cur, _only_user(cur)
        layer_mods, prev = {}, node
        for kind, op in (("scale", "mul"), ("shift", "add")):  # FiLM: scale * z + shift
            t = _external_operand(cur, prev, op)
            if t is not None and not matcher.per_point(t):
                layer_mods[kind], prev, cur = t, cur, _only_user(cur)
        act = matcher.activation(cur) if cur is not None else None
        if act is None:
            break
        kind, param, gain, last = act
        t = _external_operand(_only_user(last), last, "mul")  # sin(...) * m (siren-pytorch)
        if t is not None and not matcher.per_point(t):
            layer_mods["mult"], last = t, _only_user(last)
        after = _only_user(last)
        while after is not None and matcher.passthrough(after):
            after = _only_user(after)
        lin = matcher.linear(after) if after is not None else None
        if lin is None or _trace_back(lin[0], matcher) is not last:
            if not layer_mods:  # fused_mlp modulates hidden layers only
                final, node = act, last
            break
        acts.append((kind, param, gain))
        mods.append(layer_mods)
        layers.append(after)
        node = after
    return layers, acts, mods, final, node


def _trace_back(node, matcher):
    """The node behind any passthroughs feeding `node`."""
    while isinstance(node, fx.Node) and matcher.passthrough(node):
        node = node.args[0]
    return node


def fused_run(x, *params, spec):
    """The replacement of one run: fused_mlp, with the run's modulations mapped to its
    [width] / [B, width] forms; shapes that do not map run the same math in PyTorch."""
    weights, biases, i = [], [], 0
    for has_bias in spec["has_bias"]:
        weights.append(params[i])
        i += 1
        biases.append(params[i] if has_bias else None)
        i += has_bias
    mods = {"scale": [None] * len(spec["mods"]), "shift": [None] * len(spec["mods"]),
            "mult": [None] * len(spec["mods"])}
    for layer, kinds in enumerate(spec["mods"]):
        for kind in kinds:
            mods[kind][layer] = params[i]
            i += 1
    kwargs = dict(activation=spec["activations"], w0=spec["w0"], final_activation=spec["final"],
                  final_w0=spec["final_w0"], leaky_slope=spec["slope"], leaky_gain=spec["gain"])
    if spec["backend"] == "auto":
        return _run_with_modulations(x, weights, biases, mods, kwargs, spec)
    with use_backend(spec["backend"]):
        return _run_with_modulations(x, weights, biases, mods, kwargs, spec)


def _kernel_modulation(m, x, width):
    """m as [width] (shared) or [B, width] for x [B, N, in]; None if it maps to neither."""
    if not isinstance(m, torch.Tensor):
        return None
    if m.numel() == width:
        return m.reshape(width)
    if x.dim() == 3 and m.dim() >= 2 and m.shape[0] == x.shape[0] and m.numel() == x.shape[0] * width \
            and all(s == 1 for s in m.shape[1:-1]):
        return m.reshape(x.shape[0], width)
    return None


def _run_with_modulations(x, weights, biases, mods, kwargs, spec):
    used = any(m is not None for ms in mods.values() for m in ms)
    if not used:
        lead = x.shape[:-1]
        y = fused_mlp(x.reshape(-1, x.shape[-1]), weights, biases, **kwargs)
        return y.reshape(*lead, y.shape[-1])
    widths = [w.shape[0] for w in weights[:-1]]
    mapped = {k: [None if m is None else _kernel_modulation(m, x, widths[l]) for l, m in enumerate(ms)]
              for k, ms in mods.items()}
    fits = all((m is None) == (k is None) for key in mods for m, k in zip(mods[key], mapped[key]))
    if fits and x.dim() in (2, 3) and (x.dim() == 3 or all(
            k is None or k.dim() == 1 for ks in mapped.values() for k in ks)):
        return fused_mlp(x, weights, biases, **mapped, **kwargs)
    return _modulated_eager(x, weights, biases, mods, spec)


def _modulated_eager(x, weights, biases, mods, spec):
    """The run as the model wrote it, for modulation shapes the kernel does not take."""
    from .ops.fused_mlp import LayerActivation, apply_activation

    h = x
    for l, (w, b) in enumerate(zip(weights, biases)):
        h = F.linear(h, w, b)
        if l == len(weights) - 1:
            return apply_activation(h, LayerActivation(spec["final"], spec["final_w0"] or 30.0,
                                                       spec["slope"], spec["gain"]))
        if mods["scale"][l] is not None:
            h = h * mods["scale"][l]
        if mods["shift"][l] is not None:
            h = h + mods["shift"][l]
        h = apply_activation(h, LayerActivation(spec["activations"][l], spec["w0"][l],
                                                spec["slope"], spec["gain"]))
        if mods["mult"][l] is not None:
            h = h * mods["mult"][l]
    return h


def _spec_of(layers, acts, final, matcher, backend):
    """The fused_mlp arguments of a run, or the reason it cannot be fused."""
    infos = [matcher.linear(n) for n in layers]
    shapes = []
    for _, w, _, _ in infos:
        t = matcher.tensor(w)
        shapes.append(t.shape if isinstance(t, nn.Parameter) else None)
    if any(s is None or len(s) != 2 for s in shapes):
        return None, "a weight is not a 2-D parameter"
    widths = [shapes[0][1]] + [s[0] for s in shapes]
    for a, b in zip(shapes[:-1], shapes[1:]):
        if a[0] != b[1]:
            return None, "widths do not chain"
    if widths[0] > MAX_IN or widths[-1] > MAX_OUT or max(widths[1:-1]) > MAX_HIDDEN:
        return None, (f"widths {widths} outside the kernel's range (in <= {MAX_IN}, hidden <= "
                      f"{MAX_HIDDEN}, out <= {MAX_OUT})")
    all_acts = acts + ([final[:3]] if final else [])
    leaky = {(p, g) for k, p, g in all_acts if k == "leaky_relu"}
    if len(leaky) > 1:
        return None, "leaky_relu layers with different slopes or gains"
    if any(g != 1.0 for k, _, g in all_acts if k != "leaky_relu"):
        return None, "a gain after a non-leaky activation"
    slope, gain = next(iter(leaky)) if leaky else (0.01, 1.0)
    spec = dict(activations=[k for k, _, _ in acts], w0=[p if k == "sine" else 30.0 for k, p, _ in acts],
                final=final[0] if final else "identity",
                final_w0=final[1] if final and final[0] == "sine" else None,
                slope=slope, gain=gain, has_bias=[b is not None for _, _, b, _ in infos],
                backend=backend)
    return spec, None


def fuse_runs(gm: fx.GraphModule, params: dict, report, backend: str) -> None:
    """Replace every fusable run of gm's graph by one fused_run call (in place); record
    each run, fused or left alone, in report."""
    matcher = RunMatcher(gm, params)
    consumed, replaced = set(), []
    for node in list(gm.graph.nodes):
        if node in consumed or matcher.linear(node) is None:
            continue
        layers, acts, mods, final, last = _find_run(node, matcher)
        consumed.update(layers)  # fused or not, a run is reported once
        names = [matcher.linear(n)[3] for n in layers]
        if len(layers) < 2:
            report.leave(names[0], "a single linear map (nothing to fuse)")
            continue
        spec, why = _spec_of(layers, acts, final, matcher, backend)
        if spec is None:
            report.leave(" -> ".join(names), why)
            continue
        spec["mods"] = [sorted(m) for m in mods]
        with gm.graph.inserting_before(last):
            args = []
            for n in layers:
                _, w, b, _ = matcher.linear(n)
                args.append(matcher.node(w))
                if b is not None:
                    args.append(matcher.node(b))
            args += [m[k] for m in mods for k in sorted(m)]
            fused = gm.graph.call_function(fused_run, (matcher.linear(layers[0])[0], *args), {"spec": spec})
        last.replace_all_uses_with(fused)  # the run's own nodes are now dead code
        replaced.append(last)
        report.add_run({"layers": names, "activations": spec["activations"], "w0": spec["w0"],
                        "final": spec["final"], "modulations": spec["mods"]})
    prune(gm.graph, replaced)
