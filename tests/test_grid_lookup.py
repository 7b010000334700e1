"""grid_lookup: the fused kernels against grid_sample (float64), outputs and gradients of
fields and coordinates, for every plane kind, combine, padding, alignment and layout."""
import itertools

import pytest
import torch

import nfd_fast
from nfd_fast.nn import MultiScaleField
from nfd_fast.ops import grid_lookup

from conftest import DEVICE, rel_err

# plane sets, with per-scale, per-plane spatial sizes in grid_sample order (odd sizes)
PLANE_SETS = {
    "image": (2, [(0, 1)], [[(9, 7)], [(5, 11)]]),
    "triplane": (3, [(0, 1), (1, 2), (0, 2)], [[(7, 5), (6, 9), (5, 5)], [(3, 4), (4, 3), (5, 3)]]),
    "kplanes_4d": (4, list(itertools.combinations(range(4), 2)),
                   [[(5, 7), (4, 7), (6, 7), (3, 7), (3, 4), (3, 6)]]),
    "volume": (3, [(0, 1, 2)], [[(5, 6, 7)], [(3, 3, 4)]]),
    "lines_and_plane": (3, [(0,), (2,), (0, 1)], [[(9,), (5,), (6, 7)]]),
}
TOL = {torch.float32: 2e-5, torch.float16: 3e-3}


def make(planeset, batch=3, n=37, channels=(5, 3), per_sample=True, dtype=torch.float32,
         channels_last=False, seed=0):
    D, planes, sizes = PLANE_SETS[planeset]
    g = torch.Generator().manual_seed(seed)
    # outside [-1, 1] too: padding and clip gradients matter there
    coords = ((torch.rand(batch, n, D, generator=g) * 2.6 - 1.3)).to(DEVICE).requires_grad_()
    fields = []
    for s, scale in enumerate(sizes):
        C = channels[s % len(channels)]
        row = []
        for shape in scale:
            lead = (batch,) if per_sample else ()
            t = torch.randn(*lead, C, *shape, generator=g)
            if channels_last:  # channels innermost in memory, same [.., C, ...] shape
                t = t.movedim(-len(shape) - 1, -1).contiguous().movedim(-1, -len(shape) - 1)
            row.append(t.to(DEVICE, dtype).requires_grad_())
        fields.append(row)
    return coords, fields, planes


def check(coords, fields, planes, tol, **options):
    with nfd_fast.use_backend("triton"):
        y = grid_lookup(coords, fields, planes, **options)
    with nfd_fast.use_backend("torch"):
        y_ref = grid_lookup(coords.double(), [[f.double() for f in s] for s in fields], planes,
                            **options)
    assert y.dtype == fields[0][0].dtype and y.shape == y_ref.shape
    assert rel_err(y, y_ref) < tol, f"output {rel_err(y, y_ref):.2e}"
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
    inputs = [coords] + [f for s in fields for f in s]
    got = torch.autograd.grad(y, inputs, grad.to(y))
    want = torch.autograd.grad(y_ref, inputs, grad.to(y_ref))
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == inputs[i].shape and a.dtype == inputs[i].dtype
        assert rel_err(a, b) < tol, f"gradient {i} {list(inputs[i].shape)}: {rel_err(a, b):.2e}"


OPTION_GRID = list(itertools.product([False, True], ["border", "zeros"]))


@pytest.mark.parametrize("combine", ["sum", "product", "mean", "concat"])
@pytest.mark.parametrize("planeset", list(PLANE_SETS))
def test_plane_kinds_and_combines(planeset, combine):
    # rotate through (align_corners, padding) so every pair meets every plane kind
    i = list(PLANE_SETS).index(planeset) + ["sum", "product", "mean", "concat"].index(combine)
    align, padding = OPTION_GRID[i % 4]
    coords, fields, planes = make(planeset, per_sample=i % 2 == 0)
    check(coords, fields, planes, TOL[torch.float32], combine=combine, align_corners=align,
          padding_mode=padding)


@pytest.mark.parametrize("align_corners, padding_mode", OPTION_GRID)
@pytest.mark.parametrize("per_sample", [True, False])
def test_alignment_padding_and_sharing(align_corners, padding_mode, per_sample):
    coords, fields, planes = make("triplane", per_sample=per_sample, n=53)
    check(coords, fields, planes, TOL[torch.float32], align_corners=align_corners,
          padding_mode=padding_mode)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("planeset", ["image", "volume"])
def test_dtypes(dtype, planeset):
    coords, fields, planes = make(planeset, dtype=dtype, channels=(6, 64))
    check(coords, fields, planes, TOL[dtype], combine="concat")


@pytest.mark.parametrize("planeset", ["triplane", "volume", "lines_and_plane"])
def test_mean_combine_and_alignment(planeset):
    coords, fields, planes = make(planeset, n=70)
    check(coords, fields, planes, TOL[torch.float32], combine="mean",
          align_corners=planeset == "volume")


def test_channels_last_and_wide_channels():
    coords, fields, planes = make("triplane", channels=(66, 17), channels_last=True, n=21)
    assert fields[0][0].stride()[1] == 1  # channels innermost
    check(coords, fields, planes, TOL[torch.float32], align_corners=True)


@pytest.mark.parametrize("combine", ["sum", "product"])
def test_any_field_layout_reads_right_and_gets_its_gradient_in_its_own_layout(combine):
    """NCHW fields are copied to channels-last for the kernels (again in a backward that
    reads field values: "product"); every field's gradient comes back in that field's
    own strides: NCHW, channels-last, sliced (not dense) and expanded (stride 0) fields."""
    g = torch.Generator().manual_seed(5)
    B, C = 3, 6
    coords = (torch.rand(B, 29, 3, generator=g) * 2.4 - 1.2).to(DEVICE).requires_grad_()
    nchw = torch.randn(B, C, 7, 5, generator=g).to(DEVICE).requires_grad_()
    last = torch.randn(B, C, 4, 9, generator=g).to(DEVICE).contiguous(
        memory_format=torch.channels_last).requires_grad_()
    # views of leaves: the gradient is taken with respect to the views themselves
    sliced = torch.randn(B, C + 2, 5, 11, generator=g).to(DEVICE).requires_grad_()[:, 1:-1, :, ::2]
    expanded = torch.randn(1, C, 6, 3, generator=g).to(DEVICE).requires_grad_().expand(B, -1, -1, -1)
    fields = [[nchw, last], [sliced, expanded]]
    planes = [(0, 1), (1, 2)]
    check(coords, fields, planes, TOL[torch.float32], combine=combine)
    with nfd_fast.use_backend("triton"):
        y = grid_lookup(coords, fields, planes, combine=combine)
    flat = [f for s in fields for f in s]
    grads = torch.ops.nfd_fast.grid_lookup_backward(
        torch.randn_like(y), coords, flat, [0, 1, 1, 2], [2, 2], combine, False, "border",
        [True] * 5, "triton")
    for f, gf in zip(flat, grads[1:]):
        assert gf.shape == f.shape and gf.stride() == torch.empty_like(f).stride()
    assert grads[2].stride()[1] == 1  # channels-last stays channels-last


def test_vector_hint_only_where_every_address_and_stride_allows_it():
    """The kernels load 4 channels at a time only on the host's word: a wrong hint reads
    the wrong memory on a GPU (the interpreter ignores hints), so the decision is tested."""
    import sys

    ops = sys.modules["nfd_fast.ops.grid_lookup"]

    def width(field):
        return ops._vector_width(ops._rows([field], [(0, 1)], field.shape[0]), 4)

    last = torch.randn(2, 8, 5, 6).contiguous(memory_format=torch.channels_last)
    assert width(last) == 4
    assert width(last[:, :6]) == 4  # 6 of 8 channels: rows still 4-aligned (masked tail)
    assert width(last[:, 1:]) == 1  # address one float off
    assert width(torch.randn(2, 6, 5, 6).contiguous(memory_format=torch.channels_last)) == 1
    assert width(last[:, :, :, ::3]) == 4 and width(last[:, :, 1:]) == 4
    unaligned = torch.randn(2 * 8 * 5 * 6 + 2)[2:].view(2, 5, 6, 8).permute(0, 3, 1, 2)
    assert width(unaligned) == 1  # 8 bytes off a 16-byte boundary
    shared = torch.randn(8, 4, 4).movedim(0, -1).contiguous().movedim(-1, 0)
    assert ops._vector_width(ops._rows([shared], [(0, 1)], 3), 4) == 4


def test_ddmi_image_convention_pixel_centres():
    """DDMI images: pixel centres linspace(-(N-1)/N, (N-1)/N), align_corners False: a
    field at the image resolution reads back its own pixels exactly."""
    H = W = 8
    field = torch.randn(2, 4, H, W, device=DEVICE)
    lin = torch.linspace(-(H - 1) / H, (H - 1) / H, H, device=DEVICE)
    yy, xx = torch.meshgrid(lin, lin, indexing="ij")
    coords = torch.stack([xx, yy], -1).reshape(1, -1, 2).expand(2, -1, -1)  # channel 0 is x
    with nfd_fast.use_backend("triton"):
        out = grid_lookup(coords, [[field]], [(0, 1)])
    torch.testing.assert_close(out, field.flatten(2).transpose(1, 2))


def test_nan_coordinates_give_nan_and_empty_input():
    coords, fields, planes = make("image", n=5)
    coords = coords.detach().clone()
    coords[1, 2, 0] = float("nan")
    for padding in ("border", "zeros"):
        with nfd_fast.use_backend("triton"):
            out = grid_lookup(coords, fields, planes, padding_mode=padding)
        assert torch.isnan(out[1, 2]).all() and torch.isfinite(out[0]).all()
    empty = torch.empty(3, 0, 2, device=DEVICE)
    with nfd_fast.use_backend("triton"):
        assert grid_lookup(empty, fields, planes).shape == (3, 0, 8)


# ------------------------------------------------------------------------ the module


def test_multiscale_field_module_matches_functional_and_trains():
    torch.manual_seed(0)
    field = MultiScaleField([(0, 1), (0, 2), (1, 2), (0, 3), (1, 3), (2, 3)],
                            [[8, 8, 8, 5], [16, 16, 16, 5]], 4, combine="product",
                            align_corners=True, init="kplanes", time_axis=3).to(DEVICE)
    planes_with_time = [i for i, p in enumerate(field.planes) if 3 in p]
    for s in field.scales:
        for i, prm in enumerate(s):
            if i in planes_with_time:
                assert torch.all(prm == 1.0)
            else:
                assert prm.min() >= 0.1 and prm.max() <= 0.5
            assert prm.stride()[0] == 1  # channels_last storage
    assert field.scales[0][0].shape == (4, 8, 8) and field.scales[0][3].shape == (4, 5, 8)
    assert field.out_features == 8
    coords = torch.rand(2, 30, 4, device=DEVICE) * 2 - 1
    with nfd_fast.use_backend("triton"):
        y = field(coords)
    with nfd_fast.use_backend("torch"):
        y_ref = grid_lookup(coords, [list(s) for s in field.scales], field.planes,
                            combine="product", align_corners=True)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    import copy

    target = 0.5 * y.detach() + 0.05 * torch.randn(y.shape, device=DEVICE)
    curves = {}
    for be in ("triton", "torch"):
        model = copy.deepcopy(field)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        with nfd_fast.use_backend(be):
            curve = []
            for _ in range(5):
                loss = ((model(coords) - target) ** 2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                curve.append(loss.item())
        curves[be] = curve
    assert curves["triton"][-1] < 0.8 * curves["triton"][0]
    for a, b in zip(curves["triton"], curves["torch"]):
        assert abs(a - b) <= 1e-4 * b + 1e-7
    state = field.state_dict()
    assert list(state)[0] == "scales.0.0"


def test_multiscale_field_per_sample_fields():
    f = MultiScaleField([(0, 1)], [16, 32], [3, 5], learnable=False)
    assert f.out_features == 8
    fields = [[torch.randn(2, 3, 16, 16, device=DEVICE)], [torch.randn(2, 5, 32, 32, device=DEVICE)]]
    coords = torch.rand(2, 7, 2, device=DEVICE)
    assert f(coords, fields).shape == (2, 7, 8)
    with pytest.raises(ValueError, match="holds no fields"):
        f(coords)


# ------------------------------------------------------------------------ bad input


def _f(*shape):
    return torch.randn(*shape, device=DEVICE)


@pytest.mark.parametrize("call, error, match", [
    (lambda: grid_lookup(_f(2, 5), [[_f(3, 4, 4)]], [(0, 1)]), ValueError, r"coords: expected a float tensor \[B, N, D\]"),
    (lambda: grid_lookup(_f(2, 5, 5), [[_f(3, 4, 4)]], [(0, 1)]), ValueError, "D must be 1..4"),
    (lambda: grid_lookup(_f(2, 5, 2), [[_f(3, 4, 4)]], [(0, 2)]), ValueError, r"planes\[0\]: expected 1 to 3 distinct axes in 0..1"),
    (lambda: grid_lookup(_f(2, 5, 2), [[_f(3, 4, 4)]], [(1, 1)]), ValueError, "distinct axes"),
    (lambda: grid_lookup(_f(2, 5, 3), [[_f(3, 4, 4), _f(4, 4, 4)]], [(0, 1), (1, 2)]), ValueError, r"fields\[0\]\[1\]: has 4 channels"),
    (lambda: grid_lookup(_f(2, 5, 2), [[_f(3, 3, 4, 4)]], [(0, 1)]), ValueError, "per-sample field has B = 3"),
    (lambda: grid_lookup(_f(2, 5, 2), [[_f(3, 4)]], [(0, 1)]), ValueError, r"fields\[0\]\[0\]: plane \(0, 1\) needs"),
    (lambda: grid_lookup(_f(2, 5, 2), [[_f(3, 4, 4), _f(3, 4, 4)]], [(0, 1)]), ValueError, "expected one field per plane"),
    (lambda: grid_lookup(_f(2, 5, 2), [[_f(3, 4, 4)]], [(0, 1)], combine="max"), ValueError, "combine must be one of"),
    (lambda: grid_lookup(_f(2, 5, 2), [[_f(3, 4, 4)]], [(0, 1)], padding_mode="reflection"), ValueError, "padding_mode must be one of"),
    (lambda: grid_lookup(_f(2, 5, 2), [[_f(3, 4, 4)], [_f(3, 4, 4).half()]], [(0, 1)]), TypeError, "dtype"),
])
def test_bad_input_raises_before_launch(call, error, match):
    with nfd_fast.use_backend("triton"), pytest.raises(error, match=match):
        call()
