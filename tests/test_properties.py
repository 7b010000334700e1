"""Property-based tests: on random valid problems the fused Triton kernels and the PyTorch
reference agree, outputs and gradients, for every public op; NaN, Inf and huge inputs
never crash, and a NaN reaches exactly the outputs that depend on it, alike on both
backends.

A case is a set of named float64 master tensors (values from a seeded generator), a
memory layout per tensor and the op's options, all drawn by hypothesis. Each backend
gets the masters cast to the dtype under test and laid out as drawn:

    layout = (memory order, gap axis): the values stored in `memory order` (a
    permutation: transposed, channels-last, reversed ...), and with a gap axis every
    other element along it left out of the view (strided slicing; the gaps hold NaN,
    so a kernel that reads a wrong element shows).

Agreement is norm-wise: ||triton - torch|| < tol ||torch|| per output and per gradient,
with tol 1e-4 for float32, looser for float16; float64 runs on the torch backend only
and is compared with the kernels on the same values in float32.
"""
import math
from typing import Callable, Optional

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nfd_fast
from nfd_fast.diffusion import NoiseSchedule
from nfd_fast.ops import (ddim_step, ddpm_step, fused_mlp, fused_mlp_with_jacobian, grid_lookup,
                          langevin_step, q_sample, vp_predictor_step)
from nfd_fast.ops.fused_mlp import ACTIVATIONS

from conftest import DEVICE, rel_err

# the interpreter's numpy warns on every NaN and overflow these tests feed it
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

# Reproducible in CI: the same examples on every run, no example database in the checkout.
PROPERTY = settings(max_examples=8, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])
DTYPES = [torch.float32, torch.float16, torch.float64]
TOL = {torch.float32: 1e-4, torch.float64: 1e-4, torch.float16: 2e-2}
SEEDS = st.integers(0, 2**31 - 1)


def kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    """The kernels take no float64: they run the same values in float32."""
    return torch.float32 if dtype == torch.float64 else dtype


# ------------------------------------------------------------------------------ layouts


@st.composite
def layouts(draw, dim: int):
    """(memory order, gap axis or None) for a tensor of `dim` dimensions."""
    order = tuple(draw(st.permutations(range(dim))))
    gap = draw(st.one_of(st.none(), st.integers(0, dim - 1))) if dim else None
    return order, gap


def laid_out(values: torch.Tensor, layout) -> torch.Tensor:
    """A leaf tensor equal to `values` stored in `layout` (see the module docstring)."""
    order, gap = layout
    store_shape = [values.shape[d] for d in order]
    index = [slice(None)] * values.dim()
    if gap is not None:
        store_shape[order.index(gap)] *= 2
        index[order.index(gap)] = slice(0, None, 2)
    store = torch.full(store_shape, math.nan, dtype=values.dtype, device=values.device)
    view = store[tuple(index)].permute([order.index(d) for d in range(values.dim())])
    view.copy_(values)
    return view.requires_grad_()


# -------------------------------------------------------------------------------- cases


class Case:
    """One op call: call(tensors by name) -> tuple of outputs, on master values."""

    def __init__(self, call: Callable[[dict], tuple], values: dict, layouts: dict, options: dict):
        self.call = call
        self.values = values  # name -> float64 contiguous master tensor
        self.layouts = layouts  # name -> layout
        self.options = options  # what the case is, for the failure report

    def __repr__(self) -> str:
        shapes = {k: (list(v.shape), self.layouts[k]) for k, v in self.values.items()}
        return f"Case(options={self.options}, tensors (shape, (memory order, gap))={shapes})"

    def tensors(self, dtype, values: Optional[dict] = None) -> dict:
        values = self.values if values is None else values
        return {k: laid_out(v.to(DEVICE, dtype), self.layouts[k]) for k, v in values.items()}


def uniform(g: torch.Generator, shape, scale=1.0, offset=0.0) -> torch.Tensor:
    return (torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1) * scale + offset


def evaluate(case: Case, backend: str, dtype, grads=True, values=None):
    """(outputs, gradients by input name) of the case on one backend."""
    tensors = case.tensors(dtype, values)
    with nfd_fast.use_backend(backend):
        outs = case.call(tensors)
        if not grads:
            return outs, {}
        g = torch.Generator().manual_seed(11)
        grad_outs = [uniform(g, o.shape).to(o) for o in outs]
        names = list(tensors)
        got = torch.autograd.grad(outs, [tensors[k] for k in names], grad_outs, allow_unused=True)
    return [o.detach() for o in outs], {
        k: torch.zeros_like(tensors[k]) if v is None else v for k, v in zip(names, got)}


def assert_agree(got: torch.Tensor, want: torch.Tensor, tol: float, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {list(got.shape)} vs {list(want.shape)}"
    assert torch.isfinite(got).all() and torch.isfinite(want).all(), f"{what}: not finite"
    scale = want.double().norm().item()
    if scale < 1e-6:  # an all-but-zero expectation (a dead ReLU layer): absolute
        assert (got.double() - want.double()).norm().item() < tol * 1e-6, what
    else:
        assert rel_err(got, want) < tol, f"{what}: rel err {rel_err(got, want):.2e}"


def check_backends_agree(case: Case, dtype: torch.dtype) -> None:
    """Triton in the kernel dtype against torch in `dtype`, outputs and every gradient."""
    kdtype, tol = kernel_dtype(dtype), TOL[dtype]
    outs_k, grads_k = evaluate(case, "triton", kdtype)
    outs_r, grads_r = evaluate(case, "torch", dtype)
    for i, (a, b) in enumerate(zip(outs_k, outs_r)):
        assert a.dtype == kdtype and b.dtype == dtype, f"output {i}: dtype {a.dtype} / {b.dtype}"
        assert_agree(a, b, tol, f"output {i}")
    for k in case.values:
        assert_agree(grads_k[k], grads_r[k], tol, f"gradient of {k}")


# ------------------------------------------------------------------------ fused_mlp


@st.composite
def per_layer_tensors(draw, count: int, batched: bool):
    """None (absent), or one entry per layer: None, "shared" or "per_sample"."""
    kinds = ["shared", "per_sample"] if batched else ["shared"]
    if draw(st.booleans()):
        return None
    return draw(st.lists(st.sampled_from([None, *kinds]), min_size=count, max_size=count))


@st.composite
def mlp_cases(draw, dtype, jacobian=False, fast_sine=st.booleans(),
              hidden_widths=st.lists(st.integers(1, 32), min_size=1, max_size=3),
              activations=ACTIVATIONS):
    """A random valid fused_mlp (or fused_mlp_with_jacobian) call."""
    batch = draw(st.sampled_from([None, 1, 2, 3]))
    n = draw(st.integers(0, 40))
    hidden = draw(hidden_widths)  # any widths: non-powers of two are padded inside
    widths = [draw(st.integers(1, 8)), *hidden, draw(st.integers(1, 8))]
    L = len(widths) - 1
    lead = () if batch is None else (batch,)
    weight_kinds = draw(st.lists(st.sampled_from(["shared", "per_sample"] if batch else ["shared"]),
                                 min_size=L, max_size=L))
    bias_kinds = draw(per_layer_tensors(L, batch is not None))
    mod_kinds = {k: draw(per_layer_tensors(L - 1, batch is not None)) for k in ("scale", "shift", "mult")}
    options = dict(
        activation=draw(st.one_of(st.sampled_from(activations),
                                  st.lists(st.sampled_from(activations), min_size=L - 1, max_size=L - 1))),
        w0=draw(st.one_of(st.floats(0.5, 6.0), st.lists(st.floats(0.5, 6.0), min_size=L - 1, max_size=L - 1))),
        first_w0=draw(st.one_of(st.none(), st.floats(0.5, 30.0))),
        final_activation=draw(st.sampled_from(activations)),
        final_w0=draw(st.one_of(st.none(), st.floats(0.5, 6.0))),
        leaky_slope=draw(st.floats(0.0, 0.5)), leaky_gain=draw(st.floats(0.5, 2.0)),
        precision=draw(st.sampled_from([None, "ieee", "tf32x3", "tf32"])) if dtype != torch.float16 else None,
        fast_sine=draw(fast_sine))
    if not jacobian:
        options["recompute"] = draw(st.booleans())
    g = torch.Generator().manual_seed(draw(SEEDS))
    values = {"x": uniform(g, (*lead, n, widths[0]))}
    for l, (i, o) in enumerate(zip(widths[:-1], widths[1:])):
        wlead = lead if weight_kinds[l] == "per_sample" else ()
        # SIREN-like scale: activations neither saturated nor tiny at any depth
        values[f"weights[{l}]"] = uniform(g, (*wlead, o, i), math.sqrt(3.0 / i))
    for l, kind in enumerate(bias_kinds or []):
        if kind is not None:
            values[f"biases[{l}]"] = uniform(g, (*(lead if kind == "per_sample" else ()), widths[l + 1]), 0.5)
    for name, kinds in mod_kinds.items():
        base = 0.0 if name == "shift" else 1.0
        for l, kind in enumerate(kinds or []):
            if kind is not None:
                shape = (*(lead if kind == "per_sample" else ()), widths[l + 1])
                values[f"{name}[{l}]"] = uniform(g, shape, 0.5, base)
    layout = {k: draw(layouts(v.dim())) for k, v in values.items()}

    def call(t: dict) -> tuple:
        weights = [t[f"weights[{l}]"] for l in range(L)]
        biases = None if bias_kinds is None else [t.get(f"biases[{l}]") for l in range(L)]
        mods = {k: [t.get(f"{k}[{l}]") for l in range(L - 1)]
                for k, kinds in mod_kinds.items() if kinds is not None}
        if jacobian:
            return fused_mlp_with_jacobian(t["x"], weights, biases, **mods, **options)
        return (fused_mlp(t["x"], weights, biases, **mods, **options),)

    info = dict(widths=widths, batch=batch, weights=weight_kinds, biases=bias_kinds, **mod_kinds, **options)
    return Case(call, values, layout, info)


@pytest.mark.parametrize("dtype", DTYPES)
@settings(PROPERTY, max_examples=8)
@given(data=st.data())
def test_fused_mlp_backends_agree(dtype, data):
    check_backends_agree(data.draw(mlp_cases(dtype), label="case"), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@settings(PROPERTY, max_examples=5)
@given(data=st.data())
def test_fused_mlp_with_jacobian_backends_agree(dtype, data):
    check_backends_agree(data.draw(mlp_cases(dtype, jacobian=True), label="case"), dtype)


# ---------------------------------------------------------------------- grid_lookup


@st.composite
def grid_cases(draw):
    """A random valid grid_lookup call: lines, planes and volumes over D = 1..4 axes."""
    D = draw(st.integers(1, 4))
    planes = [tuple(draw(st.permutations(range(D)))[:draw(st.integers(1, min(3, D)))])
              for _ in range(draw(st.integers(1, 3)))]
    channels = draw(st.lists(st.integers(1, 6), min_size=1, max_size=2))  # per scale
    batch, n = draw(st.integers(1, 3)), draw(st.integers(0, 40))
    options = dict(combine=draw(st.sampled_from(["sum", "product", "mean", "concat"])),
                   align_corners=draw(st.booleans()),
                   padding_mode=draw(st.sampled_from(["border", "zeros"])))
    reach = draw(st.sampled_from([1.0, 1.3, 3.0]))  # beyond [-1, 1]: padding and clip gradients
    g = torch.Generator().manual_seed(draw(SEEDS))
    values = {"coords": uniform(g, (batch, n, D), reach)}
    per_sample = {}
    for s, C in enumerate(channels):
        for p, axes in enumerate(planes):
            name = f"fields[{s}][{p}]"
            per_sample[name] = draw(st.booleans())
            sizes = [draw(st.integers(1, 7)) for _ in axes]
            values[name] = uniform(g, (*((batch,) if per_sample[name] else ()), C, *sizes))
    layout = {k: draw(layouts(v.dim())) for k, v in values.items()}

    def call(t: dict) -> tuple:
        fields = [[t[f"fields[{s}][{p}]"] for p in range(len(planes))] for s in range(len(channels))]
        return (grid_lookup(t["coords"], fields, planes, **options),)

    info = dict(planes=planes, channels=channels, reach=reach, per_sample=per_sample, **options)
    return Case(call, values, layout, info)


@pytest.mark.parametrize("dtype", DTYPES)
@settings(PROPERTY, max_examples=5)
@given(data=st.data())
def test_grid_lookup_backends_agree(dtype, data):
    check_backends_agree(data.draw(grid_cases(), label="case"), dtype)


# -------------------------------------------------------------------- diffusion steps

STEPS = ("q_sample", "ddpm", "ddim", "langevin", "vp_predictor")


@st.composite
def timesteps(draw, batch: int, low: int, high: int):
    """An int, or per-sample int64 timesteps [B], in low..high."""
    if draw(st.booleans()):
        return draw(st.integers(low, high))
    return torch.tensor(draw(st.lists(st.integers(low, high), min_size=batch, max_size=batch)))


def earlier(draw, t, batch: int):
    """prev_t < t per sample (negative: the final step)."""
    t = torch.as_tensor(t).expand(batch)
    return torch.tensor([draw(st.integers(-1, int(v) - 1)) for v in t])


@st.composite
def step_cases(draw, dtype, mode):
    """A random valid call of one diffusion step with explicit noise."""
    batch = draw(st.integers(1, 3))
    shape = (batch, *draw(st.lists(st.integers(1, 7), max_size=3)))
    # float16 keeps to the linear schedules: cosine's last a_t (~1e-5) amplifies its rounding
    kinds = ["linear", "scaled_linear"] + (["cosine"] if dtype != torch.float16 else [])
    schedule = NoiseSchedule(draw(st.sampled_from(kinds)), draw(st.sampled_from([10, 100, 1000])),
                             device=DEVICE)
    T = schedule.num_timesteps
    t = draw(timesteps(batch, 0, T - 1))
    options = {}
    names = ["x", "noise"] if mode == "q_sample" else ["model", "x", "noise"]
    if mode in ("ddpm", "ddim"):
        options["prediction_type"] = draw(st.sampled_from(["epsilon", "sample", "v_prediction"]))
        limit = draw(st.sampled_from(["none", "clip", "range", "threshold"]))
        if limit == "clip":
            options["clip_sample"] = draw(st.floats(0.2, 3.0))
        elif limit == "range":
            lo = draw(st.floats(-3.0, 1.0))
            options["clip_sample"] = (lo, lo + draw(st.floats(0.2, 3.0)))
        elif limit == "threshold":
            options["dynamic_threshold"] = (draw(st.floats(0.5, 1.0)), draw(st.floats(1.0, 3.0)))
        if draw(st.booleans()):
            options["guidance_scale"] = draw(st.floats(0.0, 8.0))
            names.append("uncond")
    if mode == "ddpm":
        options["variance_type"] = draw(st.sampled_from(["fixed_small", "fixed_large"]))
        if draw(st.booleans()):
            options["prev_t"] = earlier(draw, t, batch)
    if mode == "ddim":
        options["prev_t"] = earlier(draw, t, batch)
        options["eta"] = draw(st.sampled_from([0.0, 0.5, 1.0]))
        options["set_alpha_to_one"] = draw(st.booleans())
        options["use_clipped_model_output"] = draw(st.booleans())
        if options["eta"] == 0:
            names.remove("noise")  # a deterministic step takes no noise
    if mode == "langevin":
        options["snr"] = draw(st.floats(0.05, 0.5))
        options["variance_preserving"] = draw(st.booleans())
    g = torch.Generator().manual_seed(draw(SEEDS))
    values = {k: uniform(g, shape, 1.5) for k in names}
    layout = {k: draw(layouts(len(shape))) for k in names}
    return Case(step_call(mode, t, schedule, options), values, layout,
                dict(mode=mode, shape=shape, schedule=(schedule.kind, T), t=t, **options))


def step_call(mode: str, t, schedule, options: dict) -> Callable[[dict], tuple]:
    """tensors by name (model, x, noise, uncond) -> the step's outputs."""
    def call(v: dict) -> tuple:
        model, x, noise = v.get("model"), v["x"], v.get("noise")
        if mode == "q_sample":
            return q_sample(x, t, noise, schedule, return_velocity=True)
        if mode == "langevin":
            return langevin_step(model, x, t, schedule, noise=noise, **options)
        if mode == "vp_predictor":
            return vp_predictor_step(model, x, t, schedule, noise=noise)
        kwargs = dict(options, noise=noise, uncond_output=v.get("uncond"))
        if mode == "ddpm":
            return ddpm_step(model, t, x, schedule, **kwargs)
        prev_t = kwargs.pop("prev_t")
        return ddim_step(model, t, prev_t, x, schedule, **kwargs)
    return call


@pytest.mark.parametrize("mode", STEPS)
@pytest.mark.parametrize("dtype", DTYPES)
@settings(PROPERTY, max_examples=10)
@given(data=st.data())
def test_diffusion_steps_backends_agree(dtype, mode, data):
    check_backends_agree(data.draw(step_cases(dtype, mode), label="case"), dtype)


# ------------------------------------------------------------- NaN, Inf, huge values
# One element of one input is replaced by NaN, +-Inf or a huge finite value. On both
# backends: no crash, and the same outputs are NaN / +Inf / -Inf. A NaN must reach the
# outputs that depend on the element (the masks below, per op).


@st.composite
def elements(draw, case: Case):
    """(name, index): an element of one of the case's non-empty inputs."""
    name = draw(st.sampled_from([k for k, v in case.values.items() if v.numel() > 0]))
    return name, tuple(draw(st.integers(0, s - 1)) for s in case.values[name].shape)


SPECIAL = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "huge": 1e30, "-huge": -1e30}


def where_differ(a: torch.Tensor, b: torch.Tensor) -> str:
    idx = (a != b).nonzero()[:4].tolist()
    return f"{len((a != b).nonzero())} elements differ, first at {idx}"


def check_special_values(case: Case, dtype, name: str, index: tuple, kind: str,
                         expected_nan: Optional[Callable[[], dict]] = None,
                         compare_values: bool = False, outputs: Optional[int] = None) -> None:
    """Both backends on the case with values[name][index] = SPECIAL[kind] (the first
    `outputs` outputs compared, all by default)."""
    values = dict(case.values)
    values[name] = values[name].clone()
    values[name][index] = SPECIAL[kind]
    # the backward runs too: it must not crash either (its NaN placement is not compared:
    # the backends differ on where a NaN point's field gradient goes)
    outs_k, grads_k = evaluate(case, "triton", kernel_dtype(dtype), values=values)
    outs_r, grads_r = evaluate(case, "torch", dtype, values=values)
    assert all(grads_k[k].shape == grads_r[k].shape == case.values[k].shape for k in case.values)
    for i, (a, b) in enumerate(list(zip(outs_k, outs_r))[:outputs]):
        for test in (torch.isnan, torch.isposinf, torch.isneginf):
            ma, mb = test(a), test(b)
            assert torch.equal(ma, mb), f"output {i}: {test.__name__} triton vs torch: {where_differ(ma, mb)}"
        finite = torch.isfinite(a) & torch.isfinite(b)
        if compare_values and finite.any():
            assert_agree(a[finite], b[finite], TOL[dtype], f"output {i} where finite")
    if kind == "nan" and expected_nan is not None:
        for i, mask in expected_nan().items():
            assert torch.equal(torch.isnan(outs_k[i]).cpu(), mask), \
                f"output {i}: NaN where expected (triton): {where_differ(torch.isnan(outs_k[i]).cpu(), mask)}"


def mlp_nan_mask(case: Case, name: str, index: tuple) -> torch.Tensor:
    """Where y [(B,) N, out] must be NaN for a NaN at values[name][index]: a point's
    row for x; one output column for the final layer's weight row or bias; else every
    output of the sample (or of all samples, for a shared tensor)."""
    widths, batch = case.options["widths"], case.options["batch"]
    L = len(widths) - 1
    x = case.values["x"]
    mask = torch.zeros(*x.shape[:-1], widths[-1], dtype=torch.bool)
    view = mask if batch is not None else mask.unsqueeze(0)
    shared_rank = 2 if name == "x" or name.startswith("weights") else 1
    per_sample = case.values[name].dim() > shared_rank
    sample = slice(index[0], index[0] + 1) if per_sample else slice(None)
    if name == "x":
        view[sample, index[-2]] = True
    elif name == f"weights[{L - 1}]":
        view[sample, :, index[-2]] = True
    elif name == f"biases[{L - 1}]":
        view[sample, :, index[-1]] = True
    else:  # a hidden layer's parameter: every unit after it
        view[sample] = True
    return mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@settings(PROPERTY, max_examples=8)
@given(data=st.data())
def test_fused_mlp_nan_inf_and_huge_inputs(dtype, data):
    jacobian = data.draw(st.booleans(), label="jacobian")
    # float16 has no huge value that stays finite through its hidden layers
    kinds = ["nan", "inf", "-inf"] + (["huge", "-huge"] if dtype == torch.float32 else [])
    kind = data.draw(st.sampled_from(kinds), label="kind")
    # fast_sine is NaN past |w0 u| > 4e5 by design, libdevice's sine is not
    fast_sine = st.just(False) if kind.endswith("huge") else st.booleans()
    hidden = st.lists(st.integers(1, 32), min_size=1, max_size=3)
    case = data.draw(mlp_cases(dtype, jacobian, fast_sine, hidden, ACTIVATIONS), label="case")
    name, index = data.draw(elements(case), label="element")
    # y only: the Jacobian's NaN is tested on its own below
    check_special_values(case, dtype, name, index, kind, outputs=1,
                         expected_nan=lambda: {0: mlp_nan_mask(case, name, index)})


def test_fused_mlp_inf_through_a_padded_hidden_layer_stays_inf():
    """A hidden layer of width 1 is padded to 16 units: 0 * Inf there must not become a
    NaN that the next layer's zero weight columns spread (0 * NaN) to every output."""
    x = torch.tensor([[math.inf], [1.0]], device=DEVICE)
    weights = [torch.tensor([[2.0]], device=DEVICE), torch.tensor([[3.0]], device=DEVICE)]
    with nfd_fast.use_backend("triton"):
        y = fused_mlp(x, weights, activation="identity")
    assert y[:, 0].tolist() == [math.inf, 6.0]  # 3 * 2 * x


def grid_sample_features(case: Case, values: dict) -> torch.Tensor:
    """The features by F.grid_sample (float64), each factor read as the README states:
    a plane (a, b) at x = coords[a], y = coords[b]; a volume (a, b, c) at x, y, z; a
    line as a plane of height 1 at y = 0. Combined over planes, concatenated over scales."""
    import torch.nn.functional as F

    coords = values["coords"]
    B, N, _ = coords.shape
    planes, o = case.options["planes"], case.options
    outs = []
    for s in range(len(o["channels"])):
        reads = []
        for p, axes in enumerate(planes):
            f = values[f"fields[{s}][{p}]"]
            f = f if f.dim() == len(axes) + 2 else f.expand(B, *f.shape)
            grid = coords[..., list(axes)]
            if len(axes) == 1:
                f, grid = f.unsqueeze(-2), torch.cat([grid, torch.zeros_like(grid)], -1)
            grid = grid.view(B, *([1] * (max(len(axes), 2) - 1)), N, grid.shape[-1])
            read = F.grid_sample(f, grid, mode="bilinear", padding_mode=o["padding_mode"],
                                 align_corners=o["align_corners"])
            reads.append(read.reshape(B, f.shape[1], N).transpose(1, 2))
        if o["combine"] == "concat":
            outs += reads
        elif o["combine"] == "product":
            outs.append(math.prod(reads[1:], start=reads[0]))
        else:
            outs.append(sum(reads) / (len(reads) if o["combine"] == "mean" else 1))
    return torch.cat(outs, -1)


def grid_nan_mask(case: Case, index: tuple) -> torch.Tensor:
    """Where the features [B, N, F] must be NaN for a NaN coordinate at index: the
    point's features of every plane reading that axis (the whole scale unless combine is
    concat). (grid_sample itself gives an edge value in border mode.)"""
    b, n, axis = index
    planes, concat = case.options["planes"], case.options["combine"] == "concat"
    reads = [axis in p for p in planes]
    blocks = []  # per feature block: does it read the axis?
    for C in case.options["channels"]:
        blocks += [r for r in reads for _ in range(C)] if concat else [any(reads)] * C
    mask = torch.zeros(*case.values["coords"].shape[:2], len(blocks), dtype=torch.bool)
    mask[b, n] = torch.tensor(blocks)
    return mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@settings(PROPERTY, max_examples=5)
@given(data=st.data())
def test_grid_lookup_nan_inf_and_huge_coordinates(dtype, data):
    case = data.draw(grid_cases(), label="case")
    if case.values["coords"].numel() == 0:
        return
    index = data.draw(st.tuples(*[st.integers(0, n - 1) for n in case.values["coords"].shape]),
                      label="index")
    kinds = ["nan", "inf", "-inf"] + (["huge", "-huge"] if dtype == torch.float32 else [])
    kind = data.draw(st.sampled_from(kinds), label="kind")
    check_special_values(case, dtype, "coords", index, kind, compare_values=True,
                         expected_nan=lambda: {0: grid_nan_mask(case, index)})


# Special field samples on both backends, against grid_sample reading the same fields.
@pytest.mark.parametrize("setting", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@settings(PROPERTY, max_examples=8)
@given(data=st.data())
def test_grid_lookup_special_field_samples_read_as_grid_sample(setting, dtype, data):
    case = data.draw(grid_cases(), label="case")
    name, index = data.draw(elements(case).filter(lambda e: e[0] != "coords"), label="element")
    kinds = ["nan", "inf", "-inf"] + (["huge", "-huge"] if dtype == torch.float32 else [])
    kind = data.draw(st.sampled_from(kinds), label="kind")
    values = {k: v.to(dtype).double() for k, v in case.values.items()}
    values[name][index] = SPECIAL[kind]
    (out,), _ = evaluate(case, setting, dtype, grads=False, values=values)
    want = grid_sample_features(case, values)
    for test in (torch.isnan, torch.isposinf, torch.isneginf):
        a, b = test(out).cpu(), test(want).cpu()
        assert torch.equal(a, b), f"{test.__name__} {setting} vs grid_sample: {where_differ(a, b)}"
    finite = torch.isfinite(want)
    if finite.any():
        assert_agree(out[finite], want[finite], TOL[dtype], "finite features")


@pytest.mark.parametrize("setting", ["torch", "triton"])
def test_fused_mlp_gelu_of_inf_is_inf(setting):
    """F.gelu(+Inf) is NaN in float32 on the CPU for 2 elements or more (and F.gelu(-Inf)
    NaN everywhere); both backends keep GELU's limits, +Inf and 0, and NaN stays NaN."""
    x = torch.tensor([[math.inf], [-math.inf], [math.nan], [0.25]], device=DEVICE)
    weights = [torch.ones(16, 1, device=DEVICE), torch.ones(1, 16, device=DEVICE)]
    with nfd_fast.use_backend(setting):
        y = fused_mlp(x, weights, activation="identity", final_activation="gelu")[:, 0].cpu()
    assert y[0].item() == math.inf and y[1].item() == 0.0 and math.isnan(y[2].item())
    assert y[3].item() == pytest.approx(4.0 * 0.5 * (1 + math.erf(4.0 / 2**0.5)), rel=1e-6)


@pytest.mark.parametrize("backend, activation, final", [
    (b, a, f) for b in ("triton", "torch")
    for a in ("identity", "relu", "leaky_relu", "sine") for f in ("identity", "relu")])
def test_jacobian_at_a_nan_point_is_nan(backend, activation, final):
    """NaN in, NaN out for the Jacobian too: dy/dx at a NaN coordinate is NaN (the value
    there already is), as sine's derivative gives on both backends."""
    g = torch.Generator().manual_seed(3)
    x = (torch.rand(3, 2, generator=g) * 2 - 1).to(DEVICE)
    x[1, 0] = math.nan
    weights = [(torch.rand(16, 2, generator=g) * 2 - 1).to(DEVICE),
               (torch.rand(2, 16, generator=g) * 0.5 - 0.25).to(DEVICE)]
    with nfd_fast.use_backend(backend):
        y, jac = fused_mlp_with_jacobian(x, weights, activation=activation, final_activation=final,
                                         w0=1.0)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2]]).all()
    assert torch.isnan(jac[1]).all(), f"Jacobian of the NaN point: {jac[1].tolist()}"
    assert torch.isfinite(jac[[0, 2]]).all()



def test_grid_lookup_reference_nan_edge_sample_stays_out_of_outside_points():
    """An out-of-range tap reads nothing: not even a NaN edge sample (grid_sample gives 0)."""
    field = torch.tensor([[math.nan, 1.0, 2.0]], device=DEVICE)  # a line, C = 1, L = 3
    coords = torch.tensor([[[-3.0], [0.0]]], device=DEVICE)
    with nfd_fast.use_backend("torch"):
        out = grid_lookup(coords, [[field]], [(0,)], padding_mode="zeros")
    assert out.flatten().tolist() == [0.0, 1.0]


def test_grid_lookup_reference_inf_field_sample_reads_back_inf():
    """An Inf sample read with weight 1 stays Inf (no 0 * Inf from an out-of-range tap)."""
    field = torch.tensor([[math.inf]], device=DEVICE)  # a one-sample line
    coords = torch.tensor([[[0.3]]], device=DEVICE)
    with nfd_fast.use_backend("torch"):
        out = grid_lookup(coords, [[field]], [(0,)], padding_mode="border")
    assert out.item() == math.inf


def step_nan_masks(case: Case, name: str, index: tuple) -> dict:
    """Output index -> where it must be NaN for a NaN input element: that element, or
    the whole batch where the NaN enters Langevin's step size (a batch-mean norm)."""
    mode, pred = case.options["mode"], case.options.get("prediction_type")
    element = torch.zeros(case.values[name].shape, dtype=torch.bool)
    element[index] = True
    if mode == "langevin":
        return dict.fromkeys([0, 1], element if name == "x" else torch.ones_like(element))
    if mode in ("q_sample", "vp_predictor"):
        return {0: element}
    if name in ("model", "uncond") or (name == "x" and pred != "sample"):
        if case.options.get("dynamic_threshold") is not None:
            # the threshold is a quantile over the whole sample: its x0 is NaN throughout
            element[index[0]] = True
        return {1: element}  # x0_pred; x_prev may weigh it by 0 at the final step
    return {}  # x with sample prediction and noise reach x_prev with weights that can be 0


@pytest.mark.parametrize("dtype", DTYPES)
@settings(PROPERTY, max_examples=10)
@given(data=st.data())
def test_diffusion_steps_nan_inf_and_huge_inputs(dtype, data):
    mode = data.draw(st.sampled_from(STEPS), label="mode")
    case = data.draw(step_cases(dtype, mode), label="case")
    name, index = data.draw(elements(case), label="element")
    kinds = ["nan", "inf", "-inf"] + (["huge", "-huge"] if dtype != torch.float16 else [])
    kind = data.draw(st.sampled_from(kinds), label="kind")
    check_special_values(case, dtype, name, index, kind, compare_values=kind.endswith("huge"),
                         expected_nan=lambda: step_nan_masks(case, name, index))
