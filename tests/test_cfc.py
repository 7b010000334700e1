"""cfc_decode (DDMI's fused coarse-to-fine readout): the kernel (interpreter on CPU,
backend "triton") against the reference, outputs and gradients, for both block kinds,
every combine, noise on and off, per-sample and shared weights, float32 and float16; the
op's registration; bad inputs; NaN propagation. The readouts of nfd_fast.models.ddmi on
the fused op are checked in test_ddmi.py."""
import importlib
import math

import pytest
import torch

import nfd_fast
from nfd_fast.ops import cfc_decode
from nfd_fast.ops.cfc import SplitBlock

from conftest import DEVICE, rel_err

cfc_ops = importlib.import_module("nfd_fast.ops.cfc")


def rand(*shape, scale=0.4, dtype=torch.float32, grad=True):
    t = (torch.randn(*shape) * scale).to(DEVICE, dtype)
    return t.requires_grad_(grad)


def make_blocks(B, channels, hidden, inner, layers, features_per_scale, per_sample, noise,
                identity_last=True):
    """Block k reads scale k; a last block without a scale has an identity skip."""
    lead = (B,) if per_sample else ()
    blocks = []
    scales = list(range(len(channels))) + ([None] if identity_last else [])
    for k, scale in enumerate(scales):
        outs = [inner] * (layers - 1) + [hidden]
        F = None if scale is None else features_per_scale[scale]
        identity = scale is None
        blocks.append(SplitBlock(
            hidden_weight=None if k == 0 else rand(*lead, outs[0], hidden),
            feature_weight=None if scale is None else rand(*lead, outs[0], F),
            weights=[rand(*lead, outs[l], outs[l - 1], scale=0.3) for l in range(1, layers)],
            # a per-sample first bias (DDMI folds its constant channels in), the rest shared
            biases=[rand(B, outs[0]) if l == 0 else (None if l == 1 else rand(o))
                    for l, o in enumerate(outs)],
            skip_hidden=None if identity or k == 0 else rand(hidden, hidden),
            skip_feature=None if identity else rand(*lead, hidden, F),
            skip_bias=None if identity else rand(B, hidden),
            scale=scale, noise_weights=rand(layers) if noise else None))
    return blocks


# (block, layers, hidden, inner, planes, combine, dims, noise, per_sample, point layer, out act)
CASES = {
    "styled_image": ("styled", 3, 24, 24, [(0, 1)], "sum", 2, True, True, False, None),
    "styled_two_planes_concat": ("styled", 3, 19, 19, [(0, 1), (1, 0)], "concat", 2, False, False,
                                 False, None),
    "styled_one_layer_product": ("styled", 1, 16, 16, [(0, 1), (1, 2)], "product", 3, True, True,
                                 False, 0.1),
    "resnet_fc_shape": ("resnet_fc", 2, 37, 13, [(0, 1), (1, 2), (0, 2)], "sum", 3, False, True,
                        True, None),
    "resnet_fc_video_concat": ("resnet_fc", 2, 20, 20, [(0, 1), (2, 1), (2, 0)], "concat", 3, False,
                               False, False, 0.2),
    "resnet_fc_four_layers_mean_noise": ("resnet_fc", 4, 23, 17, [(0, 1), (0, 2)], "mean", 3, True,
                                         True, False, None),
}


def case_inputs(name, B=2, N=29, channels=(3, 5)):
    kind, L, H, inner, planes, combine, D, noise, per_sample, point, out_act = CASES[name]
    torch.manual_seed(sum(map(ord, name)))
    fields = [[rand(B, C, *[4 + s + a for a in range(len(axes))][::-1], scale=1.0)
               for axes in planes] for s, C in enumerate(channels)]
    if combine == "sum":  # one shared (no B) field: stride 0 over samples
        fields[0][0] = rand(channels[0], *fields[0][0].shape[2:], scale=1.0)
    coords = rand(B, N, D, scale=0.7)  # a few outside [-1, 1]: padding
    widths = [C * (len(planes) if combine == "concat" else 1) for C in channels]
    blocks = make_blocks(B, channels, H, inner, L, widths, per_sample, noise)
    kwargs = dict(combine=combine, block=kind, out_activation=out_act,
                  align_corners=kind == "resnet_fc", padding_mode="zeros" if point else "border")
    if noise:
        kwargs["noise"] = [[rand(B, N, scale=1.0, grad=False) for _ in range(L)] for _ in blocks]
        kwargs["noise"][1] = None  # a block without noise beside blocks with
    if point:
        kwargs.update(points=rand(B, N, 3), point_weight=rand(H, 3), point_bias=rand(H))
    out_weight = rand(*((B,) if per_sample else ()), 3, H)
    return (coords, fields, planes, blocks, out_weight, rand(3)), kwargs


def cast(value, dtype):
    """The same numbers in another dtype, as fresh leaves (blocks and lists included)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(dtype).requires_grad_(value.requires_grad)
    if isinstance(value, (list, tuple)):
        return type(value)(cast(v, dtype) for v in value)
    if isinstance(value, SplitBlock):
        return SplitBlock(**{k: cast(v, dtype) for k, v in vars(value).items()})
    return value


def leaves(args, kwargs):
    coords, fields, _, blocks, out_weight, out_bias = args
    named = {"coords": coords, "out_weight": out_weight, "out_bias": out_bias}
    named.update({f"fields[{s}][{p}]": f for s, scale in enumerate(fields) for p, f in enumerate(scale)})
    noise = kwargs.get("noise") or [None] * len(blocks)
    for k, blk in enumerate(blocks):
        for i, t in enumerate(blk.slots()):
            # noise weights count only where the block draws noise
            used = t is not blk.noise_weights or noise[k] is not None
            if isinstance(t, torch.Tensor) and t.requires_grad and used:
                named[f"blocks[{k}].slot{i}"] = t
    for key in ("points", "point_weight", "point_bias"):
        if key in kwargs:
            named[key] = kwargs[key]
    return named


def run(setting, args, kwargs, named):
    with nfd_fast.use_backend(setting):
        out = cfc_decode(*args, **kwargs)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(out)
    grads = torch.autograd.grad((out.float() * weight.float()).sum(), list(named.values()))
    return out, grads


@pytest.fixture
def fused_backwards(monkeypatch):
    """Counts the fused backward's calls (so a test knows the reference's VJP did not
    stand in for it)."""
    calls = []
    inner = cfc_ops.kernel_backward

    def counted(*args, **kwargs):
        calls.append(1)
        return inner(*args, **kwargs)

    monkeypatch.setattr(cfc_ops, "kernel_backward", counted)
    return calls


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_the_reference_outputs_and_gradients(name, fused_backwards):
    """Forward and backward on kernels (the saving forward, the fused backward) against
    the reference's outputs and gradients."""
    args, kwargs = case_inputs(name)
    named = leaves(args, kwargs)
    out, grads = run("triton", args, kwargs, named)
    assert fused_backwards == [1]
    ref, ref_grads = run("torch", args, kwargs, named)
    # explain(): one line per op, "op  implementation  why"; the last cfc_decode was the reference
    ran = {line.split()[0]: line.split()[1] for line in nfd_fast.backend.explain().splitlines()}
    assert ran["cfc_decode"] == "torch"
    assert out.shape == (2, 29, 3) and rel_err(out, ref) < 2e-5, rel_err(out, ref)
    for key, a, b in zip(named, grads, ref_grads):
        assert rel_err(a, b) < 2e-5, (key, rel_err(a, b))


def test_gradients_of_noise_inputs_and_tensors_in_several_slots(fused_backwards):
    """The noise inputs' gradients, and tensors that fill several slots (one noise input
    for two layers, one bias for two blocks): each gets the sum over its uses."""
    args, kwargs = case_inputs("resnet_fc_four_layers_mean_noise", N=11)
    blocks = args[3]
    noise = [[rand(2, 11, scale=1.0) for _ in range(4)], None, None]
    noise[0][2] = noise[0][0]
    kwargs["noise"] = noise
    blocks[2].biases[3] = blocks[1].biases[3]
    named = leaves(args, kwargs)
    named.update({f"noise[0][{l}]": n for l, n in enumerate(noise[0])})
    out, grads = run("triton", args, kwargs, named)
    ref, ref_grads = run("torch", args, kwargs, named)
    assert fused_backwards == [1] and rel_err(out, ref) < 2e-5
    for key, a, b in zip(named, grads, ref_grads):
        assert rel_err(a, b) < 2e-5, (key, rel_err(a, b))


def test_second_order_through_the_reference_vjp(fused_backwards):
    """create_graph=True: the first gradient comes from the reference's VJP (differentiable
    again), so a loss on coordinate gradients trains the weights on the kernel's path (its
    graph reaches the op's output once more, through the loss's gradient 2 out: a
    first-order backward, the fused one)."""
    args, kwargs = case_inputs("resnet_fc_shape", N=6, channels=(3,))
    coords, weight = args[0], args[3][1].weights[0]
    results = []
    for setting in ("triton", "torch"):
        with nfd_fast.use_backend(setting):
            out = cfc_decode(*args, **kwargs)
        (dc,) = torch.autograd.grad(out.square().sum(), coords, create_graph=True)
        first_order = len(fused_backwards)
        results.append((dc, torch.autograd.grad(dc.square().sum(), weight)[0]))
        if setting == "triton":
            assert first_order == 0 and fused_backwards == [1]
    for a, b in zip(*results):
        assert rel_err(a, b) < 2e-5, rel_err(a, b)


def test_float16_kernel_against_the_float32_reference(fused_backwards):
    """float16 inputs: the kernel (float16 dot operands, float32 accumulation) against the
    reference in float32 on the same float16 numbers."""
    args, kwargs = case_inputs("styled_image", B=3, N=21)
    half_args, half_kwargs = cast(args, torch.float16), cast(kwargs, torch.float16)
    half_args = half_args[:2] + (args[2],) + half_args[3:]
    exact_args, exact_kwargs = cast(half_args, torch.float32), cast(half_kwargs, torch.float32)
    named = leaves(half_args, half_kwargs)
    out, grads = run("triton", half_args, half_kwargs, named)
    ref, ref_grads = run("torch", exact_args, exact_kwargs, leaves(exact_args, exact_kwargs))
    assert fused_backwards == [1]
    assert out.dtype == torch.float16 and rel_err(out, ref) < 1e-2, rel_err(out, ref)
    for key, a, b in zip(named, grads, ref_grads):
        assert a.dtype == torch.float16 and rel_err(a, b) < 1e-2, (key, rel_err(a, b))


def test_precision_modes_of_float32():
    """precision="ieee" and the default (tf32x3 under "highest"): both within float32
    accuracy on the interpreter, which computes every dot in float32."""
    args, kwargs = case_inputs("resnet_fc_shape", N=9)
    with nfd_fast.use_backend("torch"):
        ref = cfc_decode(*args, **kwargs)
    with nfd_fast.use_backend("triton"):
        ieee = cfc_decode(*args, **kwargs, precision="ieee")
    assert rel_err(ieee, ref) < 2e-5
    with pytest.raises(ValueError, match="precision must be one of"):
        cfc_decode(*args, **kwargs, precision="fp8")


def test_reference_gradcheck_float64():
    args, kwargs = case_inputs("styled_image", B=2, N=3, channels=(3,))
    coords, fields, planes, blocks, ow, ob = cast(args, torch.float64)
    kwargs = cast(kwargs, torch.float64)
    kwargs["noise"][1] = kwargs["noise"][1] or None

    def readout(c, f, weight):
        blocks[0].feature_weight = weight
        return cfc_decode(c, [[f]], planes, blocks, ow, ob, **kwargs)

    inputs = (coords.detach().mul(0.9).requires_grad_(), fields[0][0], blocks[0].feature_weight)
    with nfd_fast.use_backend("triton"):  # float64 is refused by the kernel: the op says so
        with pytest.raises(TypeError, match="take float32, float16 or bfloat16"):
            readout(*inputs)
    with nfd_fast.use_backend("torch"):
        assert torch.autograd.gradcheck(readout, inputs)


def test_empty_batch_and_widths_beyond_the_kernel():
    args, kwargs = case_inputs("resnet_fc_shape", N=0)
    with nfd_fast.use_backend("triton"):
        assert cfc_decode(*args, **kwargs).shape == (2, 0, 3)
    wide = cfc_ops.MAX_OUT + 1
    args, kwargs = case_inputs("resnet_fc_shape", N=5)
    args = args[:4] + (rand(wide, 37), None)
    with nfd_fast.use_backend("torch"):
        ref = cfc_decode(*args, **kwargs)
    with nfd_fast.use_backend("triton"), pytest.warns(UserWarning, match=f"out {wide} > {cfc_ops.MAX_OUT}"):
        out = cfc_decode(*args, **kwargs)
    assert rel_err(out, ref) < 1e-6 and "beyond the fused kernel" in nfd_fast.backend.explain()


def test_nan_in_gives_nan_out():
    args, kwargs = case_inputs("styled_image", N=7)
    coords = args[0].detach().clone()
    fields = [[f.detach().clone() for f in scale] for scale in args[1]]
    coords[1, 3, 0] = float("nan")
    fields[1][0][0, 2] = float("nan")  # scale 1 of sample 0: one channel everywhere
    with torch.no_grad(), nfd_fast.use_backend("triton"):
        out = cfc_decode(coords, fields, *args[2:], **kwargs)
    nan = torch.isnan(out).any(-1)
    assert nan[0].all() and nan[1, 3] and not nan[1, :3].any() and not nan[1, 4:].any()


# ------------------------------------------------------------------------- registration


def test_op_is_registered_and_kernel_codes_match():
    from nfd_fast.kernels import cfc as K

    assert hasattr(torch.ops.nfd_fast, "cfc_decode")
    for i, name in enumerate(cfc_ops.BLOCK_KINDS):
        assert getattr(K, name.upper()).value == i


@pytest.mark.parametrize("setting,save", [("torch", True), ("triton", False), ("triton", True)])
def test_opcheck_cfc_decode(setting, save):
    args, kwargs = case_inputs("resnet_fc_shape", N=5, channels=(3,))
    coords, fields, planes, blocks, ow, ob = args
    params, noise, layout = cfc_ops._flatten(blocks, ow, ob, kwargs["point_weight"],
                                             kwargs["point_bias"], None)
    op_args = (coords, [f for s in fields for f in s], [kwargs["points"]], params, noise, layout,
               [a for p in planes for a in p], [len(p) for p in planes], "sum", True, "zeros",
               "resnet_fc", [0.2, math.sqrt(2), 1.0, math.nan], "tf32x3", save, setting)
    torch.library.opcheck(torch.ops.nfd_fast.cfc_decode.default, op_args)


# ----------------------------------------------------------------------------- errors


def test_bad_inputs_raise_clear_errors():
    args, kwargs = case_inputs("styled_image", N=5)
    coords, fields, planes, blocks, ow, ob = args

    def call(**changes):
        a = dict(coords=coords, fields=fields, planes=planes, blocks=blocks, out_weight=ow,
                 out_bias=ob)
        a.update(changes)
        kw = {**kwargs, **{k: v for k, v in changes.items() if k in kwargs}}
        a = {k: v for k, v in a.items() if k not in kwargs}
        with nfd_fast.use_backend("triton"):
            return cfc_decode(**a, **kw)

    with pytest.raises(ValueError, match=r"coords: expected a float tensor \[B, N, D\]"):
        call(coords=coords[0])
    with pytest.raises(ValueError, match="block must be one of"):
        call(block="dense")
    with pytest.raises(ValueError, match="blocks: need at least one block"):
        call(blocks=[])
    bad = SplitBlock(**{**vars(blocks[1]), "feature_weight": rand(24, 4)})
    with pytest.raises(ValueError, match=r"blocks\[1\].feature_weight: expected a float tensor \[24, 5\]"):
        call(blocks=[blocks[0], bad, blocks[2]])
    bad = SplitBlock(**{**vars(blocks[2]), "weights": blocks[2].weights[:1]})
    with pytest.raises(ValueError, match=r"blocks\[2\]: has 2 layers, blocks\[0\] has 3"):
        call(blocks=[blocks[0], blocks[1], bad])
    bad = SplitBlock(**{**vars(blocks[1]), "skip_hidden": None, "skip_feature": None, "skip_bias": None})
    with pytest.raises(ValueError, match=r"blocks\[1\]: an identity skip needs a block whose input is h"):
        call(blocks=[blocks[0], bad, blocks[2]])
    with pytest.raises(ValueError, match=r"blocks\[0\].biases\[0\]: expected \[24\] or \[B=2, 24\]"):
        call(blocks=[SplitBlock(**{**vars(blocks[0]), "biases": [rand(3, 24), None, None]}), *blocks[1:]])
    with pytest.raises(ValueError, match=r"out_weight: expected a float tensor \[out, 24\]"):
        call(out_weight=rand(3, 23))
    with pytest.raises(ValueError, match=r"noise\[0\]\[1\]: expected \[B=2, N=5\]"):
        call(noise=[[rand(2, 5), rand(2, 4), rand(2, 5)], None, None])
    with pytest.raises(ValueError, match="noise: expected one entry per block"):
        call(noise=[None])
    with pytest.raises(ValueError, match=r"points: the point layer needs \[B=2, N=5, 3\]"):
        call(point_weight=rand(24, 3))
    with pytest.raises(ValueError, match=r"blocks\[0\].scale: 4 is not one of the 2 scales"):
        call(blocks=[SplitBlock(**{**vars(blocks[0]), "scale": 4}), *blocks[1:]])


def test_compiles_fullgraph_as_one_opaque_op():
    args, kwargs = case_inputs("resnet_fc_video_concat", N=5, channels=(3,))
    coords, fields, planes, blocks, ow, ob = args

    def readout(c, f):
        return cfc_decode(c, [f], planes, blocks, ow, ob, **kwargs)

    torch._dynamo.reset()
    with nfd_fast.use_backend("triton"):
        explanation = torch._dynamo.explain(readout)(coords, fields[0])
        assert explanation.graph_break_count == 0, explanation.break_reasons
        compiled = torch.compile(readout, fullgraph=True, backend="aot_eager")
        got, want = compiled(coords, fields[0]), readout(coords, fields[0])
    assert rel_err(got, want) < 1e-6
    ga = torch.autograd.grad(got.sum(), [coords, fields[0][1]])
    gb = torch.autograd.grad(want.sum(), [coords, fields[0][1]])
    assert all(rel_err(a, b) < 1e-6 for a, b in zip(ga, gb))
