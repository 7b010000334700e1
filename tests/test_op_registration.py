"""The op layer as PyTorch sees it: registered torch.library ops (opcheck), torch.compile
with fullgraph and zero graph breaks, gradients of every op on both backends, second order
(gradgradcheck of the reference, the Triton path against it, eikonal / Laplacian fits)."""
import importlib
import itertools

import pytest
import torch
import torch.nn.functional as F

import nfd_fast
from nfd_fast.diffusion import NoiseSchedule, Sampler
from nfd_fast.nn import FusedMLP, ModulatedSiren, MultiScaleField, Siren
from nfd_fast.ops import (ddim_step, ddpm_step, fused_mlp, grid_lookup, langevin_step, q_sample,
                          vp_predictor_step)

# the modules (nfd_fast.ops re-exports functions of the same names)
mlp_ops = importlib.import_module("nfd_fast.ops.fused_mlp")
grid_ops = importlib.import_module("nfd_fast.ops.grid_lookup")
diffusion_ops = importlib.import_module("nfd_fast.ops.diffusion")

from conftest import DEVICE, rel_err

BACKENDS = ["torch", "triton"]


def rand(*shape, scale=1.0, seed=0, dtype=torch.float32, grad=True):
    g = torch.Generator().manual_seed(seed)
    t = ((torch.rand(*shape, generator=g) * 2 - 1) * scale).to(DEVICE, dtype)
    return t.requires_grad_(grad)


# ------------------------------------------------------------------------ registration


def test_every_op_is_registered_in_the_nfd_fast_namespace():
    for name in ("fused_mlp", "fused_mlp_backward", "grid_lookup", "grid_lookup_backward",
                 "diffusion_step"):
        assert hasattr(torch.ops.nfd_fast, name), name


def test_kernel_codes_match_the_ops_names():
    from nfd_fast.kernels import diffusion as KD
    from nfd_fast.kernels import fused_mlp as KM
    from nfd_fast.kernels import grid_lookup as KG

    for i, name in enumerate(mlp_ops.ACTIVATIONS):
        assert getattr(KM, name.upper()).value == i
    for i, name in enumerate(grid_ops.COMBINES):
        assert getattr(KG, name.upper()).value == i
    for i, name in enumerate(diffusion_ops.MODES):
        assert getattr(KD, name.upper()).value == i
    for i, name in enumerate(diffusion_ops.PREDICTION_TYPES):
        assert getattr(KD, name.upper()).value == i


@pytest.mark.parametrize("setting", BACKENDS)
def test_opcheck_fused_mlp(setting):
    x = rand(2, 9, 3, seed=1)
    weights = [rand(16, 3, seed=2), rand(2, 16, 16, seed=3, scale=0.3), rand(5, 16, seed=4)]
    biases = [rand(16, seed=5), rand(5, seed=6)]
    shift = [rand(2, 16, seed=7, scale=0.2)]
    mult = [rand(16, seed=8)]
    args = (x, weights, biases, 0b101, [], 0, shift, 0b10, mult, 0b01, [1, 4, 0],
            [3.0, 1.0, 1.0], 0.01, 1.0, "ieee", False, False, True, setting)
    torch.library.opcheck(torch.ops.nfd_fast.fused_mlp.default, args)


@pytest.mark.parametrize("setting", BACKENDS)
def test_opcheck_grid_lookup(setting):
    coords = rand(2, 11, 3, scale=1.2, seed=1)
    fields = [rand(4, 5, 6, seed=2), rand(2, 4, 7, 5, seed=3), rand(4, 3, 4, 5, seed=4)]
    args = (coords, fields, [0, 1, 1, 2, 0, 1, 2], [2, 2, 3], "sum", False, "border", setting)
    torch.library.opcheck(torch.ops.nfd_fast.grid_lookup.default, args)


@pytest.mark.parametrize("setting", BACKENDS)
@pytest.mark.parametrize("mode", ["q_sample", "ddim", "langevin"])
def test_opcheck_diffusion_step(setting, mode):
    sched = NoiseSchedule("linear", 50, device=DEVICE)
    x, m, noise = rand(3, 5, 7, seed=1), rand(3, 5, 7, seed=2), rand(3, 5, 7, seed=3)
    t = torch.tensor([40, 10, 1], device=DEVICE)
    step = torch.rand(3, device=DEVICE).requires_grad_() if mode == "langevin" else None
    args = (mode, x, m, None, noise, None, t, t - 5, sched.alphas_cumprod, sched.betas, None,
            step, 0.0, 0.3, mode == "ddim", -1.0, 1.0, "epsilon", False, True, False, True,
            setting)
    torch.library.opcheck(torch.ops.nfd_fast.diffusion_step.default, args)


# ------------------------------------------------------------------------ torch.compile


def compile_and_compare(fn, *args):
    """fullgraph compile with zero graph breaks; outputs and gradients equal eager."""
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(fn)(*args)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got, want = compiled(*args), fn(*args)
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    if leaves:
        ga = torch.autograd.grad(sum(o.sum() for o in got), leaves)
        gb = torch.autograd.grad(sum(o.sum() for o in want), leaves)
        for a, b in zip(ga, gb):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


MODULES = {
    "siren": lambda: (Siren(2, 32, 2, 3), (rand(17, 2, seed=1),)),
    "modulated_siren": lambda: (ModulatedSiren(2, 32, 2, 3, latent_dim=8),
                                (rand(2, 17, 2, seed=1), rand(2, 8, seed=2))),
    "fused_mlp_module": lambda: (FusedMLP(3, 32, 4, 2, activation="gelu"), (rand(2, 17, 3, seed=1),)),
    "multiscale_field": lambda: (MultiScaleField([(0, 1), (1, 2), (0, 2)], [8, 16], 4,
                                                 combine="product"), (rand(2, 17, 3, seed=1),)),
}


@pytest.mark.parametrize("setting", BACKENDS)
@pytest.mark.parametrize("name", list(MODULES))
def test_modules_compile_fullgraph(name, setting):
    torch.manual_seed(0)
    module, args = MODULES[name]()
    with nfd_fast.use_backend(setting):
        compile_and_compare(module.to(DEVICE), *args)


def test_modules_compile_with_inductor():
    torch.manual_seed(0)
    siren = Siren(2, 16, 1, 1).to(DEVICE)
    x = rand(9, 2, seed=1, grad=False)
    torch._dynamo.reset()
    compiled = torch.compile(siren, fullgraph=True)
    assert torch.allclose(compiled(x), siren(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("setting", BACKENDS)
def test_diffusion_steps_compile_fullgraph(setting):
    sched = NoiseSchedule("cosine", 100, device=DEVICE)
    x, m = rand(3, 5, 7, seed=1), rand(3, 5, 7, seed=2)
    noise = rand(3, 5, 7, seed=3, grad=False)
    t = torch.tensor([50, 20, 99], device=DEVICE)

    def ddim(m, x):
        return ddim_step(m, t, t - 10, x, sched, eta=0.5, noise=noise, clip_sample=1.0)

    def ddpm(m, x):
        return ddpm_step(m, t, x, sched, noise=noise, uncond_output=0.5 * m, guidance_scale=2.0)

    with nfd_fast.use_backend(setting):
        compile_and_compare(ddim, m, x)
        compile_and_compare(ddpm, m, x)


def test_sampler_step_compiles_fullgraph():
    sched = NoiseSchedule("linear", 100, device=DEVICE)
    denoiser = FusedMLP(7, 16, 7, 1, activation="silu").to(DEVICE)
    sampler = Sampler(lambda x, t, cond: denoiser(x), (3, 5, 7), sched, method="ddpm", steps=10,
                      cuda_graph=False)
    seeds = torch.arange(10, device=DEVICE) + 1234
    x = rand(3, 5, 7, seed=1, grad=False)
    # the fused step draws its noise in-kernel from seeds[3]: deterministic, no host sync
    with nfd_fast.use_backend("triton"):
        compile_and_compare(lambda x: sampler.step(x, 3, seeds), x)


# --------------------------------------------------------------- gradients, both backends


def grads_on(setting, fn, inputs, seed=9):
    with nfd_fast.use_backend(setting):
        out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g).to(o)).sum() for o in outs)
    return [o.detach() for o in outs], torch.autograd.grad(loss, inputs, allow_unused=True)


def assert_backends_agree(fn, inputs, tol=1e-5):
    outs_k, grads_k = grads_on("triton", fn, inputs)
    outs_r, grads_r = grads_on("torch", fn, inputs)
    for a, b in zip(outs_k, outs_r):
        assert rel_err(a, b) < tol
    for i, (a, b) in enumerate(zip(grads_k, grads_r)):
        assert a is not None and b is not None, f"input {i} got no gradient"
        assert rel_err(a, b) < tol, f"gradient {i}: {rel_err(a, b):.2e}"


def test_q_sample_gradients_reach_x0_and_noise_on_both_backends():
    sched = NoiseSchedule("cosine", 100, device=DEVICE)
    t = torch.tensor([3, 60, 99], device=DEVICE)
    x0, noise = rand(3, 4, 5, seed=1), rand(3, 4, 5, seed=2)
    assert_backends_agree(lambda a, n: q_sample(a, t, n, sched, return_velocity=True), [x0, noise])


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_step_gradients_reach_model_output_and_x_on_both_backends(pred):
    sched = NoiseSchedule("linear", 100, device=DEVICE)
    t = torch.tensor([30, 99, 1], device=DEVICE)
    m, x, u, noise = (rand(3, 4, 5, seed=s) for s in (1, 2, 3, 4))

    def ddim(m, x, u, noise):
        return ddim_step(m, t, t - 20, x, sched, eta=0.7, noise=noise, prediction_type=pred,
                         uncond_output=u, guidance_scale=1.5, clip_sample=1.5)

    def ddpm(m, x, noise):
        return ddpm_step(m, t, x, sched, noise=noise, prediction_type=pred,
                         dynamic_threshold=(0.9, 2.0))

    assert_backends_agree(ddim, [m, x, u, noise])
    assert_backends_agree(ddpm, [m, x, noise])


def test_langevin_and_predictor_gradients_on_both_backends():
    sched = NoiseSchedule("linear", 100, device=DEVICE)
    t = torch.tensor([30, 99, 1], device=DEVICE)
    s, x, noise = rand(3, 4, 5, seed=1), rand(3, 4, 5, seed=2), rand(3, 4, 5, seed=3)
    assert_backends_agree(lambda s, x, n: langevin_step(s, x, t, sched, noise=n), [s, x, noise])
    assert_backends_agree(lambda s, x, n: vp_predictor_step(s, x, t, sched, noise=n), [s, x, noise])


def test_in_kernel_noise_step_gradients_match_the_formula():
    """With Philox noise the backward regenerates the noise; the gradient wrt the score
    through the Langevin step size needs it."""
    sched = NoiseSchedule("linear", 100, device=DEVICE)
    t = torch.tensor([30, 99], device=DEVICE)
    s, x = rand(2, 33, seed=1), rand(2, 33, seed=2)
    with nfd_fast.use_backend("triton"):
        g = torch.Generator(DEVICE).manual_seed(5)
        out, x_mean = langevin_step(s, x, t, sched, generator=g)
    z_times_sigma = (out - x_mean).detach()  # sqrt(2 step) z, per sample
    gs, gx = torch.autograd.grad(out.sum(), [s, x])
    assert torch.allclose(gx, torch.ones_like(x))
    # reference: the same step with the drawn noise given explicitly
    step = ((x_mean - x) / s).detach()[:, :1]
    z = z_times_sigma / (2 * step).sqrt()
    with nfd_fast.use_backend("torch"):
        out_r, _ = langevin_step(s, x, t, sched, noise=z)
    gs_r, = torch.autograd.grad(out_r.sum(), [s])
    assert rel_err(gs, gs_r) < 1e-4


def test_diffusion_results_are_contiguous_for_any_layout():
    sched = NoiseSchedule("linear", 100, device=DEVICE)
    x = rand(2, 3, 4, 5, seed=1, grad=False).to(memory_format=torch.channels_last)
    m = rand(2, 5, 4, 3, seed=2, grad=False).permute(0, 3, 2, 1)  # transposed layout
    t = torch.tensor([10, 80], device=DEVICE)
    with nfd_fast.use_backend("triton"):
        got = ddim_step(m, t, t - 5, x, sched)
    with nfd_fast.use_backend("torch"):
        want = ddim_step(m.contiguous(), t, t - 5, x.contiguous(), sched)
    for a, b in zip(got, want):
        assert a.is_contiguous() and rel_err(a, b) < 1e-6


# ------------------------------------------------------------------- second order


ACTIVATION_CASES = [("sine", "identity"), ("relu", "sine"), ("leaky_relu", "gelu"),
                    ("gelu", "silu"), ("silu", "identity")]


def mlp_inputs(dtype, per_sample, mods, seed=0):
    B, widths = 2, [3, 8, 8, 2]
    x = rand(B, 5, 3, seed=seed, dtype=dtype)
    lead = (B,) if per_sample else ()
    weights = [rand(*lead, o, i, seed=seed + 1 + l, scale=0.6, dtype=dtype)
               for l, (i, o) in enumerate(zip(widths[:-1], widths[1:]))]
    biases = [rand(*lead, o, seed=seed + 10 + l, scale=0.3, dtype=dtype) for l, o in enumerate(widths[1:])]
    extra = {name: [rand(B, 8, seed=seed + 20 + 3 * l + k, scale=0.5, dtype=dtype) + (1.0 if name != "shift" else 0.0)
                    for l in range(2)] for k, name in enumerate(mods)}
    return x, weights, biases, extra


@pytest.mark.parametrize("activation,final", ACTIVATION_CASES)
def test_fused_mlp_reference_gradgradcheck_float64(activation, final):
    x, weights, biases, mods = mlp_inputs(torch.float64, per_sample=activation == "sine",
                                          mods=("scale", "shift", "mult"))
    names = list(mods)

    def f(x, *flat):
        ws, bs = list(flat[:3]), list(flat[3:6])
        extra = {n: list(flat[6 + 2 * k: 8 + 2 * k]) for k, n in enumerate(names)}
        return fused_mlp(x, ws, bs, activation=activation, final_activation=final, w0=2.0,
                         leaky_slope=0.2, leaky_gain=1.4, **extra)

    inputs = (x, *weights, *biases, *[t for n in names for t in mods[n]])
    with nfd_fast.use_backend("torch"):
        assert torch.autograd.gradgradcheck(f, inputs, eps=1e-6, atol=1e-4)


def hessian_vector_terms(setting, x, weights, biases, mods, activation, final):
    """An eikonal-style loss (|dy/dx|^2) and its gradients in every input."""
    with nfd_fast.use_backend(setting):
        y = fused_mlp(x, weights, biases, activation=activation, final_activation=final,
                      w0=2.0, **mods)
        dx, = torch.autograd.grad(y.sum(), x, create_graph=True)
        loss = (dx ** 2).sum() + y.square().mean()
        leaves = [x, *weights, *biases, *[t for v in mods.values() for t in v]]
        return [dx.detach(), *torch.autograd.grad(loss, leaves)]


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("activation,final", ACTIVATION_CASES[:3])
def test_fused_mlp_second_order_triton_matches_float64(activation, final, per_sample):
    x, weights, biases, mods = mlp_inputs(torch.float32, per_sample, mods=("scale", "shift", "mult"))
    got = hessian_vector_terms("triton", x, weights, biases, mods, activation, final)
    c = lambda t: t.detach().double().requires_grad_()  # noqa: E731
    want = hessian_vector_terms("torch", c(x), [c(w) for w in weights], [c(b) for b in biases],
                                {k: [c(t) for t in v] for k, v in mods.items()}, activation, final)
    for i, (a, b) in enumerate(zip(got, want)):
        assert rel_err(a, b) < 1e-4, f"term {i}: {rel_err(a, b):.2e}"


def grid_inputs(dtype, per_sample, n=13, seed=0):
    coords = rand(2, n, 3, scale=1.2, seed=seed, dtype=dtype)
    lead = (2,) if per_sample else ()
    fields = [[rand(*lead, 3, 4, 5, seed=seed + 1, dtype=dtype), rand(*lead, 3, 3, 4, seed=seed + 2, dtype=dtype)],
              [rand(*lead, 2, 5, 3, seed=seed + 3, dtype=dtype), rand(*lead, 2, 3, 3, seed=seed + 4, dtype=dtype)]]
    return coords, fields, [(0, 1), (2, 0)]


@pytest.mark.parametrize("combine", ["sum", "product", "concat"])
@pytest.mark.parametrize("align_corners,padding_mode", [(False, "border"), (True, "zeros")])
def test_grid_lookup_reference_gradgradcheck_float64(combine, align_corners, padding_mode):
    coords, fields, planes = grid_inputs(torch.float64, per_sample=combine == "product", n=3)
    # keep the coordinates off cell edges, where the interpolant's derivative jumps
    with torch.no_grad():
        coords.mul_(0.9)

    def f(c, *flat):
        return grid_lookup(c, [list(flat[:2]), list(flat[2:])], planes, combine=combine,
                           align_corners=align_corners, padding_mode=padding_mode)

    with nfd_fast.use_backend("torch"):
        assert torch.autograd.gradgradcheck(f, (coords, *[t for s in fields for t in s]),
                                            eps=1e-7, atol=1e-4)


@pytest.mark.parametrize("per_sample", [False, True])
def test_grid_lookup_second_order_triton_matches_float64(per_sample):
    def terms(setting, coords, fields, planes):
        with nfd_fast.use_backend(setting):
            y = grid_lookup(coords, fields, planes, combine="product")
            dc, = torch.autograd.grad((y ** 2).sum(), coords, create_graph=True)
            loss = (dc ** 2).sum()
            return [dc.detach(), *torch.autograd.grad(loss, [coords, *[f for s in fields for f in s]])]

    coords, fields, planes = grid_inputs(torch.float32, per_sample)
    got = terms("triton", coords, fields, planes)
    c = lambda t: t.detach().double().requires_grad_()  # noqa: E731
    want = terms("torch", c(coords), [[c(f) for f in s] for s in fields], planes)
    for i, (a, b) in enumerate(zip(got, want)):
        assert rel_err(a, b) < 1e-4, f"term {i}: {rel_err(a, b):.2e}"


@pytest.mark.parametrize("planes,shapes", [([(0,)], [(9,)]), ([(0, 1)], [(7, 9)]),
                                           ([(2, 0, 1)], [(5, 6, 7)])])
@pytest.mark.parametrize("align_corners,padding_mode",
                         list(itertools.product([False, True], ["border", "zeros"])))
def test_grid_reference_equals_grid_sample(planes, shapes, align_corners, padding_mode):
    """The gather-based reference (differentiable twice) is grid_sample exactly, values and
    first-order gradients, also outside [-1, 1]."""
    B, N, D = 2, 41, 3
    coords = rand(B, N, D, scale=1.3, seed=1, dtype=torch.float64)
    field = rand(B, 4, *shapes[0], seed=2, dtype=torch.float64)
    with nfd_fast.use_backend("torch"):
        ours = grid_lookup(coords, [[field]], planes, align_corners=align_corners,
                           padding_mode=padding_mode)
    axes = planes[0]
    if len(axes) == 1:  # a line is a plane of height 1 read at y = 0
        f, grid = field.unsqueeze(-2), torch.stack([coords[..., 0], 0 * coords[..., 0]], -1).view(B, N, 1, 2)
    elif len(axes) == 2:
        f, grid = field, coords[..., list(axes)].view(B, N, 1, 2)
    else:
        f, grid = field, coords[..., list(axes)].view(B, N, 1, 1, 3)
    want = F.grid_sample(f, grid, mode="bilinear", padding_mode=padding_mode,
                         align_corners=align_corners).reshape(B, 4, N).transpose(1, 2)
    assert torch.allclose(ours, want, atol=1e-12)
    g = torch.randn(ours.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(ours, [coords, field], g),
                    torch.autograd.grad(want, [coords, field], g)):
        assert torch.allclose(a, b, atol=1e-10)


def test_channels_last_field_gradient_keeps_its_layout():
    field = rand(2, 6, 5, 7, seed=1, grad=False).to(memory_format=torch.channels_last).requires_grad_()
    coords = rand(2, 19, 2, seed=2)
    with nfd_fast.use_backend("triton"):
        y = grid_lookup(coords, [[field]], [(0, 1)])
    g = rand(*y.shape, seed=3, grad=False)
    got, = torch.autograd.grad(y, field, g)
    with nfd_fast.use_backend("torch"):
        want, = torch.autograd.grad(grid_lookup(coords, [[field]], [(0, 1)]), field, g)
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(got, want) < 1e-5


# ------------------------------------------------------- second-order training, both backends


def fit_with_derivative_loss(setting, loss_kind, steps=3):
    torch.manual_seed(0)
    siren = Siren(2, 16, 1, 1, first_omega_0=3.0, hidden_omega_0=3.0).to(DEVICE)
    opt = torch.optim.SGD(siren.parameters(), lr=1e-2)
    x = rand(41, 2, seed=4, grad=False)
    with nfd_fast.use_backend(setting):
        for _ in range(steps):
            xs = x.clone().requires_grad_()
            y = siren(xs)
            dx, = torch.autograd.grad(y.sum(), xs, create_graph=True)
            if loss_kind == "eikonal":  # an SDF's gradient has unit norm
                loss = ((dx.norm(dim=-1) - 1) ** 2).mean() + y.abs().mean()
            else:  # Poisson-style: fit the Laplacian to a target
                lap = sum(torch.autograd.grad(dx[:, i].sum(), xs, create_graph=True)[0][:, i]
                          for i in range(2))
                loss = ((lap - torch.sin(3 * x[:, 0])) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return [p.detach().clone() for p in siren.parameters()]


@pytest.mark.parametrize("loss_kind", ["eikonal", "laplacian"])
def test_derivative_losses_train_the_same_on_both_backends(loss_kind):
    fused = fit_with_derivative_loss("triton", loss_kind)
    reference = fit_with_derivative_loss("torch", loss_kind)
    start = fit_with_derivative_loss("torch", loss_kind, steps=0)
    # the loss moved the parameters (the Laplacian does not see the output bias)
    assert all(not torch.equal(b, s) for b, s in zip(reference[:-1], start[:-1]))
    for a, b in zip(fused, reference):
        assert rel_err(a, b) < 1e-4


# ------------------------------------------------------------- value and Jacobian in one pass


def autograd_jacobian(fn, x):
    """dy/dx per point by autograd (independent of the tangent recurrence): [B, N, out, in]."""
    y = fn(x)
    rows = [torch.autograd.grad(y[..., o].sum(), x, retain_graph=True)[0] for o in range(y.shape[-1])]
    return torch.stack(rows, dim=-2)


JACOBIAN_CASES = [  # (widths, activation, final, per-sample weights, modulations)
    ([3, 16, 16, 2], "sine", "identity", False, ()),
    ([2, 16, 16, 16, 3], "gelu", "silu", True, ("scale", "shift")),
    ([4, 32, 1], "leaky_relu", "sine", False, ("mult",)),
    ([1, 16, 16, 16, 16, 2], "silu", "identity", True, ("scale", "mult")),
]


@pytest.mark.parametrize("widths,activation,final,per_sample,mods", JACOBIAN_CASES)
@pytest.mark.parametrize("setting", BACKENDS)
def test_value_and_jacobian_equal_autograd(widths, activation, final, per_sample, mods, setting):
    B, N = 2, 19
    x = rand(B, N, widths[0], seed=1)
    lead = (B,) if per_sample else ()
    weights = [rand(*lead, o, i, scale=0.8, seed=2 + l) for l, (i, o) in enumerate(zip(widths[:-1], widths[1:]))]
    biases = [rand(o, seed=10 + l, scale=0.3) for l, o in enumerate(widths[1:])]
    extra = {name: [rand(B, w, seed=20 + 3 * l + k, scale=0.4) + (0.0 if name == "shift" else 1.0)
                    for l, w in enumerate(widths[1:-1])] for k, name in enumerate(mods)}
    options = dict(activation=activation, final_activation=final, w0=2.0, leaky_gain=1.3, **extra)
    with nfd_fast.use_backend(setting):
        y, jac = mlp_ops.fused_mlp_with_jacobian(x, weights, biases, **options)
    with nfd_fast.use_backend("torch"):
        want_y = fused_mlp(x, weights, biases, **options)
        want_j = autograd_jacobian(lambda v: fused_mlp(v, weights, biases, **options), x)
    assert jac.shape == (B, N, widths[-1], widths[0])
    assert rel_err(y, want_y) < 1e-5 and rel_err(jac, want_j) < 1e-5


@pytest.mark.parametrize("setting", BACKENDS)
def test_eikonal_loss_through_the_jacobian_matches_double_backward(setting):
    """A loss on J trains the weights: its gradient equals the one through autograd's
    double backward of the plain forward."""
    siren = Siren(3, 16, 2, 1, first_omega_0=3.0, hidden_omega_0=3.0).to(DEVICE)
    x = rand(37, 3, seed=5)
    with nfd_fast.use_backend(setting):
        y, jac = siren.value_and_jacobian(x)
        loss = ((jac[:, 0].norm(dim=-1) - 1) ** 2).mean() + y.abs().mean()
        got = torch.autograd.grad(loss, list(siren.parameters()))
    with nfd_fast.use_backend("torch"):
        y = siren(x)
        dx, = torch.autograd.grad(y.sum(), x, create_graph=True)
        loss = ((dx.norm(dim=-1) - 1) ** 2).mean() + y.abs().mean()
        want = torch.autograd.grad(loss, list(siren.parameters()))
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("setting", BACKENDS)
def test_opcheck_fused_mlp_jacobian(setting):
    x = rand(2, 9, 3, seed=1)
    weights = [rand(16, 3, seed=2), rand(2, 16, 16, seed=3, scale=0.3), rand(5, 16, seed=4)]
    biases = [rand(16, seed=5)]
    args = (x, weights, biases, 0b001, [rand(2, 16, seed=6)], 0b10, [], 0, [], 0, [1, 5, 0],
            [3.0, 1.0, 1.0], 0.01, 1.0, "ieee", False, setting)
    torch.library.opcheck(torch.ops.nfd_fast.fused_mlp_jacobian.default, args)


def test_value_and_jacobian_compiles_fullgraph():
    siren = Siren(2, 16, 1, 1).to(DEVICE)
    with nfd_fast.use_backend("triton"):
        compile_and_compare(lambda x: siren.value_and_jacobian(x), rand(11, 2, seed=1))


# ------------------------------------------------------------- launch grids within CUDA's limits


def test_huge_batches_keep_every_grid_axis_within_cuda_limits(monkeypatch):
    """CUDA allows 2^31 - 1 programs on grid axis 0 and 65,535 on axes 1 and 2: every
    kernel puts the batch on axis 0. The launches are recorded, not run (70,000 programs
    would take the interpreter minutes)."""
    from nfd_fast.kernels import diffusion as KD
    from nfd_fast.kernels import fused_mlp as KM
    from nfd_fast.kernels import grid_lookup as KG

    grids = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                grids.append((self.name, tuple(grid)))
            return launch

    for module in (KD, KM, KG):
        for name in dir(module):
            if name.endswith("_kernel"):
                monkeypatch.setattr(module, name, Recorder(name))
    B = 70_000
    sched = NoiseSchedule("linear", 10)
    x = torch.randn(B, 2, 2, requires_grad=True)
    with nfd_fast.use_backend("triton"):
        ddpm_step(x, 5, x, sched, generator=torch.Generator().manual_seed(0))
        weights = [torch.randn(B, 16, 2, requires_grad=True), torch.randn(3, 16, requires_grad=True)]
        y = fused_mlp(x, weights)
        y.sum().backward()
        field = torch.randn(B, 4, 3, 3, requires_grad=True)
        out = grid_lookup(x, [[field]], [(0, 1)])
        out.sum().backward()
    names = {name for name, _ in grids}
    assert {"diffusion_step_kernel", "fused_mlp_fwd_kernel", "fused_mlp_bwd_layer_kernel",
            "grid_lookup_fwd_kernel", "grid_lookup_bwd_kernel"} <= names
    for name, grid in grids:
        assert grid[0] >= B and grid[0] < 2**31, (name, grid)
        assert all(g <= 65_535 for g in grid[1:]), (name, grid)
