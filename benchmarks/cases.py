"""The benchmark cases, at canonical GPU shapes (quick: small shapes)."""
from __future__ import annotations

import torch

import nfd_fast
from nfd_fast.models.blocks import ROTATIONS
from nfd_fast.nn import Siren

from .runner import CASES, Case, Rotating, Target, Work, register

# ROTATIONS input sets per case: 3 x 2^22 x 2 float32 coordinates = 100 MB > L2


def _with_backend(name: str, fn):
    def call(*args):
        with nfd_fast.use_backend(name):
            return fn(*args)

    return call


def mlp_flops(widths, n: int) -> float:
    """Multiply-adds of the linear layers, 2 FLOPs each (activations not counted)."""
    return 2.0 * n * sum(i * o for i, o in zip(widths[:-1], widths[1:]))


def _siren_and_coords(device, quick):
    widths = (2, 256, 256, 256, 256, 3)
    n = 2**14 if quick else 2**22
    torch.manual_seed(0)
    siren = Siren(2, 256, 3, 3).to(device)
    coords = [(torch.rand(n, 2, device=device) * 2 - 1,) for _ in range(ROTATIONS)]
    return widths, n, siren, coords


def _implementations(step, siren, variants):
    """eager / compiled reference and nfd_fast variants of one step(siren_like, *inputs);
    variants: {label: Siren keyword options}."""
    compiled = torch.compile(_with_backend("torch", lambda *a: step(siren, *a)))
    impls = {
        "eager": _with_backend("torch", lambda *a: step(siren, *a)),
        "compiled": compiled,
        "nfd_fast": _with_backend("auto", lambda *a: step(siren, *a)),
    }
    for label, options in variants.items():
        variant = Siren(2, 256, 3, 3, **options).to(next(siren.parameters()).device)
        variant.load_state_dict(siren.state_dict())
        impls[f"nfd_fast[{label}]"] = _with_backend("auto", lambda *a, v=variant: step(v, *a))
    return impls


PRECISION_VARIANTS = {"tf32x3": {"precision": "tf32x3"}, "bf16x3": {"precision": "bf16x3"},
                      "bf16": {"precision": "bf16"}}
TRAIN_VARIANTS = {**PRECISION_VARIANTS, "recompute": {"recompute": True}}


def _build_siren_inference(device, quick):
    widths, n, siren, coords = _siren_and_coords(device, quick)

    def step(model, x):
        with torch.no_grad():
            return model(x)

    work = Work(mlp_flops(widths, n), n * (2 + 3) * 4, n)
    impls = _implementations(step, siren, PRECISION_VARIANTS)
    return work, {k: Rotating(f, coords) for k, f in impls.items()}


def _build_siren_train_step(device, quick):
    widths, n, siren, coords = _siren_and_coords(device, quick)
    target = torch.rand(n, 3, device=device)

    def step(model, x):
        loss = ((model(x) - target) ** 2).mean()
        loss.backward()
        return loss

    # forward + the two backward products per layer; bytes: coordinates and targets once
    work = Work(3 * mlp_flops(widths, n), n * (2 + 3) * 4, n)
    impls = _implementations(step, siren, TRAIN_VARIANTS)
    return work, {k: Rotating(f, coords) for k, f in impls.items()}


MLP_GOAL = "fused-MLP goal (H100)"
register(Case(
    "siren_inference", "Siren 2->256x3->3 forward, 2^22 coords (quick 2^14)",
    _build_siren_inference,
    gpu_only_impls=("nfd_fast[tf32x3]", "nfd_fast[bf16x3]", "nfd_fast[bf16]"),
    targets=(Target("nfd_fast*", "speedup", 10.0, "eager", MLP_GOAL),
             Target("nfd_fast*", "speedup", 2.0, "compiled", MLP_GOAL),
             Target("nfd_fast[bf16]", "roofline", 0.5, source=MLP_GOAL + ", bf16 matmul rate"))))
register(Case(
    "siren_train_step", "Siren 2->256x3->3 forward+backward (MSE), 2^22 coords (quick 2^14)",
    _build_siren_train_step,
    gpu_only_impls=("nfd_fast[tf32x3]", "nfd_fast[bf16x3]", "nfd_fast[bf16]", "nfd_fast[recompute]"),
    targets=(Target("nfd_fast*", "speedup", 3.0, "eager", MLP_GOAL),)))


def _build_modulated_siren(device, quick):
    """functa-style readout: per-sample shift modulations from a latent, B samples."""
    from nfd_fast.nn import ModulatedSiren

    torch.manual_seed(0)
    B, n = (4, 2**12) if quick else (16, 2**18)
    model = ModulatedSiren(2, 256, 3, 3, latent_dim=128).to(device)
    sets = [(torch.rand(B, n, 2, device=device) * 2 - 1, torch.randn(B, 128, device=device))
            for _ in range(ROTATIONS)]

    def step(m, coords, latent):
        with torch.no_grad():
            return m(coords, latent)

    impls = {"eager": _with_backend("torch", lambda *a: step(model, *a)),
             "compiled": torch.compile(_with_backend("torch", lambda *a: step(model, *a))),
             "nfd_fast": _with_backend("auto", lambda *a: step(model, *a))}
    bf16 = ModulatedSiren(2, 256, 3, 3, latent_dim=128, precision="bf16").to(device)
    bf16.load_state_dict(model.state_dict())
    impls["nfd_fast[bf16]"] = _with_backend("auto", lambda *a: step(bf16, *a))
    work = Work(mlp_flops((2, 256, 256, 256, 256, 3), B * n), B * n * (2 + 3) * 4, B * n)
    return work, {k: Rotating(f, sets) for k, f in impls.items()}


register(Case("modulated_siren_inference",
              "ModulatedSiren 2->256x3->3, shift modulations, B=16 x 2^18 coords (quick 4 x 2^12)",
              _build_modulated_siren, gpu_only_impls=("nfd_fast[bf16]",)))


# ------------------------------------------------------------------------ diffusion steps
STEP_GOAL = "diffusion-step goal (H100)"


def _ddim_step_impls(shape, device):
    """One stochastic DDIM step (eta = 1, per-sample t, noise drawn by the step)."""
    from nfd_fast.diffusion import NoiseSchedule
    from nfd_fast.ops import ddim_step

    schedule = NoiseSchedule("linear", 1000, device=device)
    B = shape[0]
    g = torch.Generator(device).manual_seed(0)
    sets = []
    for _ in range(ROTATIONS):
        t = torch.randint(20, 1000, (B,), device=device, generator=g)
        sets.append((torch.randn(shape, device=device, generator=g),
                     torch.randn(shape, device=device, generator=g), t, t - 20))

    def step(m, x, t, prev):
        return ddim_step(m, t, prev, x, schedule, eta=1.0, validate=False)

    compiled = torch.compile(_with_backend("torch", step))
    impls = {"eager": _with_backend("torch", step), "compiled": compiled,
             "nfd_fast": _with_backend("auto", step)}
    n = 1
    for s in shape:
        n *= s
    # fewest bytes: read model output and x, write x_prev and x0 (noise drawn on chip)
    work = Work(flops=0.0, bytes=4 * 4 * n, coords=n)
    return work, {k: Rotating(f, sets) for k, f in impls.items()}


register(Case(
    "ddim_step_2^26", "one DDIM step (eta 1, per-sample t), 2^26 float32 elements (quick 2^16)",
    lambda device, quick: _ddim_step_impls((64, 2**10 if quick else 2**20), device),
    targets=(Target("nfd_fast", "speedup", 5.0, "eager", STEP_GOAL),
             Target("nfd_fast", "roofline", 0.8, source=STEP_GOAL + ", copy bandwidth"))))
register(Case(
    "ddim_step_ddmi_latent", "one DDIM step on a DDMI latent batch 64 x 64x64x64 (quick 8 x 8^3)",
    lambda device, quick: _ddim_step_impls((8, 8, 8, 8) if quick else (64, 64, 64, 64), device),
    targets=(Target("nfd_fast", "speedup", 5.0, "eager", STEP_GOAL),)))


class _TimeMLP(torch.nn.Module):
    """A small denoiser: MLP on [x, t / T] (the approach-1 latent size)."""

    def __init__(self, dim=64, width=256):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(dim + 1, width), torch.nn.SiLU(),
                                       torch.nn.Linear(width, width), torch.nn.SiLU(),
                                       torch.nn.Linear(width, dim))

    def forward(self, x, t, cond=None):
        return self.net(torch.cat([x, t.float().unsqueeze(-1) / 1000.0], dim=-1))


def _build_ddim_loop(device, quick):
    from nfd_fast.diffusion import NoiseSchedule, Sampler

    torch.manual_seed(0)
    shape = (256, 64)
    steps = 10 if quick else 50
    schedule = NoiseSchedule("cosine", 1000, device=device)
    denoiser = _TimeMLP().to(device).eval()
    noises = [(torch.randn(shape, device=device),) for _ in range(ROTATIONS)]

    def sampler(backend_name, cuda_graph):
        s = Sampler(denoiser, shape, schedule, steps=steps, cuda_graph=cuda_graph)

        def run(x_T):
            with torch.no_grad(), nfd_fast.use_backend(backend_name):
                return s(x_T)

        return run

    impls = {"eager": sampler("torch", False), "nfd_fast": sampler("auto", False),
             "nfd_fast[graph]": sampler("auto", True if device == "cuda" else False)}
    width_flops = 2 * shape[0] * (65 * 256 + 256 * 256 + 256 * 64)
    work = Work(flops=steps * width_flops, bytes=steps * 4 * 4 * shape[0] * shape[1],
                coords=shape[0])
    return work, {k: Rotating(f, noises) for k, f in impls.items()}


register(Case("ddim_loop_50", "50-step DDIM loop, MLP denoiser, batch 256 x 64 (quick 10 steps)",
              _build_ddim_loop, gpu_only_impls=("nfd_fast[graph]",), impls=("eager", "nfd_fast")))


# ---------------------------------------------------------------------------- grid lookup
GRID_GOAL = "grid-lookup goal (H100)"

# (B, points, planes, per-scale spatial sizes, channels, combine, align_corners); quick
GRID_CONFIGS = {
    "ddmi_image": (16, 256 * 256, [(0, 1)], [(64, 64), (128, 128), (256, 256)], 64, "sum", False),
    "ddmi_triplane": (8, 2**18, [(0, 1), (1, 2), (0, 2)], [(16, 16), (32, 32), (64, 64)], 64,
                      "sum", True),
}
GRID_QUICK = {"ddmi_image": (2, 32 * 32, [(8, 8), (16, 16), (32, 32)]),
              "ddmi_triplane": (2, 2**10, [(4, 4), (8, 8), (16, 16)])}


def _build_grid(config: str, backward: bool):
    def build(device, quick):
        from nfd_fast.ops import grid_lookup

        B, n, planes, sizes, C, combine, align = GRID_CONFIGS[config]
        if quick:
            B, n, sizes = GRID_QUICK[config]
        D = 1 + max(a for p in planes for a in p)
        g = torch.Generator(device).manual_seed(0)

        def input_set(channels_last):
            coords = torch.rand(B, n, D, device=device, generator=g) * 2 - 1
            fields = []
            for size in sizes:
                row = []
                for _ in planes:
                    f = torch.randn(B, C, *size, device=device, generator=g)
                    if channels_last:  # the decoder's conv can emit channels_last directly
                        f = f.contiguous(memory_format=torch.channels_last)
                    row.append(f.requires_grad_(backward))
                fields.append(row)
            grad = torch.randn(B, n, C * len(sizes), device=device, generator=g)
            return coords, fields, grad

        def step(coords, fields, grad):
            out = grid_lookup(coords, fields, planes, combine=combine, align_corners=align)
            if backward:
                out.backward(grad)
            return out

        plain = [input_set(False) for _ in range(ROTATIONS)]
        last = [input_set(True) for _ in range(ROTATIONS)]
        impls = {"eager": Rotating(_with_backend("torch", step), plain),
                 "compiled": Rotating(torch.compile(_with_backend("torch", step)), plain),
                 "nfd_fast": Rotating(_with_backend("auto", step), plain),
                 "nfd_fast[channels_last]": Rotating(_with_backend("auto", step), last)}
        field_elems = B * C * len(planes) * sum(h * w for h, w in sizes)
        out_elems = B * n * C * len(sizes)
        # bytes: fields read once, coordinates read, features written (backward: + field
        # gradients written, upstream gradient read)
        nbytes = 4 * (field_elems + B * n * D + out_elems)
        if backward:
            nbytes += 4 * (field_elems + out_elems)
        taps = 4 * len(planes)
        work = Work(flops=2.0 * B * n * len(sizes) * taps * C * (2 if backward else 1),
                    bytes=nbytes, coords=B * n)
        return work, impls

    return build


for _config, _label in (("ddmi_image", "DDMI image fields 64^2/128^2/256^2 x 64, B=16, 256^2 coords"),
                        ("ddmi_triplane", "DDMI tri-planes 16^2/32^2/64^2 x 64, B=8, 2^18 points, sum")):
    register(Case(f"grid_{_config}_fwd", f"{_label}: forward", _build_grid(_config, False),
                  gpu_only_impls=("nfd_fast[channels_last]",),
                  targets=(Target("nfd_fast*", "speedup", 3.0, "eager", GRID_GOAL),
                           Target("nfd_fast*", "roofline", 0.5,
                                  source=GRID_GOAL + ", within 2x of the bandwidth floor"))))
    register(Case(f"grid_{_config}_fwd_bwd", f"{_label}: forward + backward (field grads)",
                  _build_grid(_config, True),
                  gpu_only_impls=("nfd_fast[channels_last]",),
                  targets=(Target("nfd_fast*", "speedup", 5.0, "eager",
                                  GRID_GOAL + " (backward >= 5x; judged on forward + backward)"),)))


# ------------------------------------------------------------------------------ rendering
RENDER_GOAL = "render goal (H100)"


def _build_gigapixel(device, quick):
    """Siren 2->256x3->3 on a 32768^2 grid into device memory (quick 256^2). No eager
    column: the eager reference needs minutes per gigapixel; the target is absolute."""
    from nfd_fast.render import render

    side = 256 if quick else 32768
    torch.manual_seed(0)
    base = Siren(2, 256, 3, 3).to(device)
    impls = {}
    for label, precision in (("nfd_fast", None), ("nfd_fast[bf16]", "bf16"), ("nfd_fast[fp16]", "fp16")):
        model = Siren(2, 256, 3, 3, precision=precision).to(device)
        model.load_state_dict(base.state_dict())
        impls[label] = (lambda m: lambda: render(m, (side, side), progress=False))(model)
    if quick:  # small enough for the reference too
        impls["eager"] = _with_backend("torch", lambda: render(base, (side, side), progress=False))
    n = side * side
    return Work(mlp_flops((2, 256, 256, 256, 256, 3), n), n * 3 * 4, n), impls


def _build_kplanes_query(device, quick):
    """A 4-D space-time query: 128^3 x 64 points through K-planes (6 planes, 32 channels,
    scales 64 and 128, product) and an MLP 64 -> 64 -> 3, chunked by render."""
    import itertools

    from nfd_fast.nn import FusedMLP, MultiScaleField
    from nfd_fast.render import render

    shape = (8, 8, 8, 4) if quick else (128, 128, 128, 64)
    torch.manual_seed(0)
    planes = list(itertools.combinations(range(4), 2))
    field = MultiScaleField(planes, [[64, 64, 64, 32], [128, 128, 128, 64]], 32, combine="product",
                            align_corners=True, init="kplanes", time_axis=3).to(device)
    mlp = FusedMLP(64, 64, 3, hidden_layers=1, activation="relu").to(device)

    def query(c):
        return mlp(field(c.unsqueeze(0))[0])

    def run():
        return render(query, shape, progress=False, device=device, chunk_size=2**21)

    impls = {"eager": _with_backend("torch", run), "nfd_fast": _with_backend("auto", run)}
    n = 1
    for s in shape:
        n *= s
    flops = 2.0 * n * (6 * 2 * 4 * 32 + 64 * 64 + 64 * 3)
    return Work(flops, n * 3 * 4, n), impls


register(Case("render_gigapixel", "Siren 2->256x3->3 rendered on 32768^2 (1.07e9 coords; quick 256^2)",
              _build_gigapixel, gpu_only_impls=("nfd_fast[bf16]", "nfd_fast[fp16]"),
              impls=("nfd_fast", "eager"),  # eager at quick sizes only
              targets=(Target("nfd_fast*", "time", 1500.0, source=RENDER_GOAL + ", fp16/bf16 compute"),)))
register(Case("render_kplanes_4d", "4-D query 128^3 x 64 through K-planes + MLP (quick 8^3 x 4)",
              _build_kplanes_query, impls=("eager", "nfd_fast")))


# ------------------------------------------------------ the approaches' models and DDMI
def _build_model_case(approach, call: str, label: str):
    """A case timing one call of a model module's benchmark_calls(device, quick):
    {"train_step": one optimizer step on a synthetic batch, "sampling": one sampling pass,
    "points": {call: field points evaluated per call}, "describe": the sizes}. The sizes
    are the model's own, known once built: the case's description is completed then."""
    def build(device, quick):
        from nfd_fast.models import APPROACHES, approach_module

        calls = approach_module(approach).benchmark_calls(device, quick)
        CASES[f"{APPROACHES[approach]}_{call}"].description = f"{label}: {calls['describe']}"
        points = calls["points"][call]
        impls = {"eager": _with_backend("torch", calls[call]),
                 "nfd_fast": _with_backend("auto", calls[call])}
        return Work(flops=0.0, bytes=4.0 * points, coords=points), impls

    return build


def _register_models():
    """Cases "<module>_train_step" and "<module>_sampling" for every model in APPROACHES."""
    from nfd_fast.models import APPROACHES

    for approach, module in APPROACHES.items():
        name = "DDMI" if approach == "ddmi" else f"approach {approach}"
        for call, what in (("train_step", "one training step"), ("sampling", "one sampling pass")):
            label = f"{name} ({module}), {what}"
            register(Case(f"{module}_{call}", f"{label}: sizes known once built",
                          _build_model_case(approach, call, label), impls=("eager", "nfd_fast")))


_register_models()


# ------------------------------------------------------------- DDMI coarse-to-fine readouts
READOUT_GOAL = "DDMI readout goal (H100)"


def _with_matmul_precision(mode: str, fn):
    """fn under torch.set_float32_matmul_precision(mode): the fused readout's float32
    operands follow it ("medium": bf16, "high": tf32), its inputs stay float32."""
    def call(*args):
        previous = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(mode)
        try:
            return fn(*args)
        finally:
            torch.set_float32_matmul_precision(previous)

    return call


def _readout_impls(step):
    return {"eager": _with_backend("torch", step),
            "compiled": torch.compile(_with_backend("torch", step)),
            "nfd_fast": _with_backend("auto", step),
            "nfd_fast[tf32]": _with_matmul_precision("high", _with_backend("auto", step)),
            "nfd_fast[bf16]": _with_matmul_precision("medium", _with_backend("auto", step))}


def readout_flops(blocks, out: int, hidden: int, n: int) -> float:
    """2 FLOPs per multiply-add of a readout's linear layers (skips included); blocks:
    (input width, inner widths..., skip?) per block."""
    macs = 0
    for width, inner, layers, skip in blocks:
        widths = [width] + [inner] * (layers - 1) + [hidden]
        macs += sum(i * o for i, o in zip(widths[:-1], widths[1:])) + (width * hidden if skip else 0)
    return 2.0 * n * (macs + hidden * out)


# DDMI's image readout: (input width, hidden, layers, skip) per block
IMAGE_READOUT_BLOCKS = [(66, 256, 3, True), (322, 256, 3, True), (322, 256, 3, True),
                        (256, 256, 3, False)]


def _ddmi_image_readout_inputs(device, B, side, train):
    """An ImageReadout with its zero-initialised noise weights and biases made non-zero,
    the pixel centres of a side^2 image for B samples, and ROTATIONS sets of (fields
    64 x (side/4 * 2^k)^2, taking gradients when training; 12 per-layer noises)."""
    from nfd_fast.models.blocks import ROTATIONS as sets
    from nfd_fast.models.ddmi import ImageReadout, pixel_centers

    torch.manual_seed(0)
    readout = ImageReadout().to(device).train(train)
    with torch.no_grad():
        for name, p in readout.named_parameters():
            if "noise" in name or "bias" in name:
                p.normal_(0.0, 0.1)
    g = torch.Generator(device).manual_seed(0)
    coords = pixel_centers(side, device=device).expand(B, -1, -1).contiguous()
    sides = [side // 4 * 2 ** k for k in range(3)]
    inputs = [([torch.randn(B, 64, s, s, device=device, generator=g).requires_grad_(train)
                for s in sides],
               [torch.randn(B, side * side, device=device, generator=g) for _ in range(12)])
              for _ in range(sets)]
    return readout, coords, sides, inputs, g


def _build_ddmi_image_readout(device, quick):
    """DDMI's image readout at generation: B fields 64^2 / 128^2 / 256^2 x 64 (their
    decoder's output), every pixel centre of a 256^2 image, given per-layer noise."""
    B, side = (2, 32) if quick else (16, 256)
    readout, coords, sides, inputs, _ = _ddmi_image_readout_inputs(device, B, side, False)

    def step(fields, noise):
        with torch.no_grad():
            return readout(fields, coords, 1.0, noise=noise)

    n = B * side * side
    flops = readout_flops(IMAGE_READOUT_BLOCKS, 3, 256, n)
    # fewest bytes: fields once, coordinates and noise read, colours written
    nbytes = 4 * (B * 64 * sum(s * s for s in sides) + n * (2 + 12 + 3))
    impls = _readout_impls(step)
    return Work(flops, nbytes, n), {k: Rotating(f, inputs) for k, f in impls.items()}


def _build_ddmi_image_readout_train(device, quick):
    """DDMI's image readout in training (the D2C-VAE's reconstruction): B fields 64^2 /
    128^2 / 256^2 x 64 from the decoder, which take gradients too, every pixel centre of a
    256^2 image, given per-layer noise, MSE to target colours, forward and backward."""
    B, side = (2, 32) if quick else (8, 256)
    readout, coords, sides, inputs, g = _ddmi_image_readout_inputs(device, B, side, True)
    target = torch.rand(B, side * side, 3, device=device, generator=g)

    def step(fields, noise):
        loss = (readout(fields, coords, 1.0, noise=noise) - target).square().mean()
        loss.backward()
        return loss

    n = B * side * side
    # forward + the two backward products per layer
    flops = 3 * readout_flops(IMAGE_READOUT_BLOCKS, 3, 256, n)
    # fewest bytes: fields read and their gradients written, coordinates, noise and
    # targets read
    nbytes = 4 * (2 * B * 64 * sum(s * s for s in sides) + n * (2 + 12 + 3))
    impls = _readout_impls(step)
    return Work(flops, nbytes, n), {k: Rotating(f, inputs) for k, f in impls.items()}


def _build_ddmi_shape_readout(device, quick):
    """DDMI's occupancy readout: B shapes, tri-planes 16^2 / 32^2 / 64^2 x 64 per scale,
    2^18 query points per shape."""
    from nfd_fast.models.blocks import ROTATIONS as sets
    from nfd_fast.models.ddmi import ShapeReadout

    torch.manual_seed(0)
    B, n_points = (2, 2**10) if quick else (8, 2**18)
    readout = ShapeReadout().to(device).eval()
    with torch.no_grad():  # fc_1 starts at zero: random weights exercise every layer
        for p in readout.parameters():
            p.normal_(0.0, 0.05)
    g = torch.Generator(device).manual_seed(0)
    inputs = [([[torch.randn(B, 64, r, r, device=device, generator=g) for _ in range(3)]
                for r in (16, 32, 64)],
               torch.rand(B, n_points, 3, device=device, generator=g) - 0.5)
              for _ in range(sets)]

    def step(fields, points):
        with torch.no_grad():
            return readout(fields, points)

    n = B * n_points
    flops = readout_flops([(64, 64, 2, True), (320, 256, 2, True), (320, 256, 2, True),
                           (256, 256, 2, False)], 1, 256, n) + 2.0 * n * 3 * 256
    nbytes = 4 * (B * 3 * 64 * (16 ** 2 + 32 ** 2 + 64 ** 2) + n * (3 + 1))
    impls = _readout_impls(step)
    return Work(flops, nbytes, n), {k: Rotating(f, inputs) for k, f in impls.items()}


register(Case("ddmi_image_readout",
              "DDMI image readout, fields 64^2/128^2/256^2 x 64, hidden 256, B=16 x 256^2 pixels "
              "with noise (quick 2 x 32^2)", _build_ddmi_image_readout,
              gpu_only_impls=("nfd_fast[tf32]", "nfd_fast[bf16]"),
              targets=(Target("nfd_fast*", "speedup", 5.0, "eager", READOUT_GOAL),
                       Target("nfd_fast*", "speedup", 2.0, "compiled", READOUT_GOAL))))
register(Case("ddmi_image_readout_train",
              "DDMI image readout training step (MSE, forward + backward to weights and "
              "fields), fields 64^2/128^2/256^2 x 64, hidden 256, B=8 x 256^2 pixels with "
              "noise (quick 2 x 32^2)", _build_ddmi_image_readout_train,
              gpu_only_impls=("nfd_fast[tf32]", "nfd_fast[bf16]")))
register(Case("ddmi_shape_readout",
              "DDMI occupancy readout, tri-planes 16^2/32^2/64^2 x 64, hidden 256, B=8 x 2^18 "
              "points (quick 2 x 2^10)", _build_ddmi_shape_readout,
              gpu_only_impls=("nfd_fast[tf32]", "nfd_fast[bf16]"),
              targets=(Target("nfd_fast*", "speedup", 5.0, "eager", READOUT_GOAL),
                       Target("nfd_fast*", "speedup", 2.0, "compiled", READOUT_GOAL))))
