"""Small runs of the benchmark cases' work, through nfd_fast's public API.

Each probe runs one (case, implementation) of benchmarks/cases.py at a small size n and is
captured at two sizes; every count of the capture is then fitted as a + b n and read at
the case's canonical n. The probes keep what decides the compiled code (widths, dtypes,
options, the divisibility of sizes by 16) equal to the canonical case and scale only the
number of points, with the data that grows with it: the grid probes shrink the fields so
that points per cell match the canonical case. "eager" probes run the reference (the
benchmark's eager and torch.compile columns are modelled from its ATen calls).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

import nfd_fast


@dataclasses.dataclass(frozen=True)
class Probe:
    case: str
    impl: str
    run: Callable  # run(n) -> step: inputs made, step() is one call of the case at size n
    sizes: tuple  # the two probe sizes
    canonical: int  # n of the benchmark case


PROBES: dict = {}


def _register(case, impl, run, sizes, canonical):
    PROBES[f"{case}/{impl}"] = Probe(case, impl, run, sizes, canonical)


def _siren_step(precision, train, backend="triton", recompute=False):
    from nfd_fast.nn import Siren

    def run(n):
        torch.manual_seed(0)
        model = Siren(2, 256, 3, 3, precision=precision, recompute=recompute)
        coords, target = torch.rand(n, 2) * 2 - 1, torch.rand(n, 3)

        def step():
            with nfd_fast.use_backend(backend):
                if train:
                    ((model(coords) - target) ** 2).mean().backward()
                else:
                    with torch.no_grad():
                        model(coords)

        return step

    return run


_SIREN_IMPLS = {"nfd_fast": None, "nfd_fast[tf32x3]": "tf32x3", "nfd_fast[bf16x3]": "bf16x3",
                "nfd_fast[bf16]": "bf16"}
for _train, _case in ((False, "siren_inference"), (True, "siren_train_step")):
    for _impl, _precision in _SIREN_IMPLS.items():
        _register(_case, _impl, _siren_step(_precision, _train), (256, 512), 2**22)
    _register(_case, "eager", _siren_step(None, _train, "torch"), (256, 512), 2**22)
_register("siren_train_step", "nfd_fast[recompute]", _siren_step(None, True, recompute=True),
          (256, 512), 2**22)


def _modulated(precision, backend="triton"):
    from nfd_fast.nn import ModulatedSiren

    def run(n):
        torch.manual_seed(0)
        model = ModulatedSiren(2, 256, 3, 3, latent_dim=128, precision=precision)
        coords, latent = torch.rand(2, n // 2, 2) * 2 - 1, torch.randn(2, 128)

        def step():
            with torch.no_grad(), nfd_fast.use_backend(backend):
                model(coords, latent)

        return step

    return run


for _impl, _precision in (("nfd_fast", None), ("nfd_fast[bf16]", "bf16")):
    _register("modulated_siren_inference", _impl, _modulated(_precision), (256, 512), 16 * 2**18)
_register("modulated_siren_inference", "eager", _modulated(None, "torch"), (256, 512), 16 * 2**18)


def _ddim(n):
    """One stochastic DDIM step (eta 1, per-sample t, noise drawn by the step) on 2 x n/2."""
    from nfd_fast.diffusion import NoiseSchedule
    from nfd_fast.ops import ddim_step

    schedule = NoiseSchedule("linear", 1000)
    shape = (2, n // 2)
    t = torch.tensor([500, 900])
    model, x = torch.randn(shape), torch.randn(shape)
    return lambda: ddim_step(model, t, t - 20, x, schedule, eta=1.0, validate=False)


def _with(backend, build):
    def run(n):
        step = build(n)

        def in_backend():
            with nfd_fast.use_backend(backend):
                step()

        return in_backend

    return run


for _case, _canonical in (("ddim_step_2^26", 2**26), ("ddim_step_ddmi_latent", 64**4)):
    _register(_case, "nfd_fast", _with("triton", _ddim), (4096, 8192), _canonical)
    _register(_case, "eager", _with("torch", _ddim), (4096, 8192), _canonical)


def _grid(planes, sides_of, channels_last, backward, align):
    """grid_lookup of 2 samples x n/2 points, 64 channels, 3 scales of fields sides_of(n)."""
    from nfd_fast.ops import grid_lookup

    def run(n):
        B, points = 2, n // 2
        D = 1 + max(a for p in planes for a in p)
        coords = torch.rand(B, points, D) * 2 - 1
        fields = []
        for side in sides_of(points):
            row = []
            for _ in planes:
                f = torch.randn(B, 64, side, side)
                if channels_last:
                    f = f.contiguous(memory_format=torch.channels_last)
                row.append(f.requires_grad_(backward))
            fields.append(row)
        grad = torch.randn(B, points, 64 * len(fields))

        def step():
            out = grid_lookup(coords, fields, planes, combine="sum", align_corners=align)
            if backward:
                out.backward(grad)

        return step

    return run


def _image_sides(points):
    """DDMI image fields 64^2 / 128^2 / 256^2 under 256^2 points: one point per finest cell."""
    side = int(round(points ** 0.5))
    return (side // 4, side // 2, side)


def _triplane_sides(points):
    return (4, 8, 16)


for _config, _planes, _sides, _align, _canonical, _sizes in (
        ("ddmi_image", [(0, 1)], _image_sides, False, 16 * 256 * 256, (512, 2048)),
        ("ddmi_triplane", [(0, 1), (1, 2), (0, 2)], _triplane_sides, True, 8 * 2**18, (512, 1024))):
    for _bwd in (False, True):
        _case = f"grid_{_config}_{'fwd_bwd' if _bwd else 'fwd'}"
        for _impl, _last in (("nfd_fast", False), ("nfd_fast[channels_last]", True)):
            _register(_case, _impl, _with("triton", _grid(_planes, _sides, _last, _bwd, _align)),
                      _sizes, _canonical)
        _register(_case, "eager", _with("torch", _grid(_planes, _sides, False, _bwd, _align)),
                  _sizes, _canonical)


def _render(precision):
    from nfd_fast.nn import Siren

    def run(n):
        side = int(round(n ** 0.5))
        model = Siren(2, 256, 3, 3, precision=precision)

        def step():
            with torch.no_grad(), nfd_fast.use_backend("triton"):
                nfd_fast.render(model, (side, side), chunk_size=n, progress=False)

        return step

    return run


for _impl, _precision in (("nfd_fast", None), ("nfd_fast[bf16]", "bf16"), ("nfd_fast[fp16]", "fp16")):
    _register("render_gigapixel", _impl, _render(_precision), (256, 1024), 32768**2)


def _ddmi_image_readout(n):
    """DDMI's image readout on 2 samples x n/2 pixel centres, fields at one point per
    finest cell (64 channels, hidden 256, given noise), as the benchmark case."""
    from nfd_fast.models.ddmi import ImageReadout, pixel_centers

    torch.manual_seed(0)
    side = int(round((n // 2) ** 0.5))
    readout = ImageReadout()
    coords = pixel_centers(side).expand(2, -1, -1).contiguous()
    fields = [torch.randn(2, 64, s, s) for s in _image_sides(side * side)]
    noise = [torch.randn(2, side * side) for _ in range(12)]

    def step():
        with torch.no_grad():
            readout(fields, coords, 1.0, noise=noise)

    return step


def _ddmi_image_readout_train(n):
    """The image readout's training step (MSE, backward to the weights and the fields) on
    2 samples x n/2 pixel centres, as the benchmark case."""
    from nfd_fast.models.ddmi import ImageReadout, pixel_centers

    torch.manual_seed(0)
    side = int(round((n // 2) ** 0.5))
    readout = ImageReadout().train()
    coords = pixel_centers(side).expand(2, -1, -1).contiguous()
    fields = [torch.randn(2, 64, s, s).requires_grad_() for s in _image_sides(side * side)]
    noise = [torch.randn(2, side * side) for _ in range(12)]
    target = torch.rand(2, side * side, 3)

    def step():
        (readout(fields, coords, 1.0, noise=noise) - target).square().mean().backward()

    return step


def _ddmi_shape_readout(n):
    """DDMI's occupancy readout on 2 shapes x n/2 points, tri-planes 4^2 / 8^2 / 16^2 x 64."""
    from nfd_fast.models.ddmi import ShapeReadout

    torch.manual_seed(0)
    readout = ShapeReadout()
    fields = [[torch.randn(2, 64, r, r) for _ in range(3)] for r in _triplane_sides(n)]
    points = torch.rand(2, n // 2, 3) - 0.5

    def step():
        with torch.no_grad():
            readout(fields, points)

    return step


def _matmul_precision(mode, run):
    """run's steps under torch.set_float32_matmul_precision(mode) (the readout's tf32 and
    bf16 variants: float32 data, tf32 or bf16 dot operands)."""
    def build(n):
        step = run(n)

        def in_mode():
            previous = torch.get_float32_matmul_precision()
            torch.set_float32_matmul_precision(mode)
            try:
                step()
            finally:
                torch.set_float32_matmul_precision(previous)

        return in_mode

    return build


for _case, _build, _canonical in (("ddmi_image_readout", _ddmi_image_readout, 16 * 256 * 256),
                                  ("ddmi_image_readout_train", _ddmi_image_readout_train,
                                   8 * 256 * 256),
                                  ("ddmi_shape_readout", _ddmi_shape_readout, 8 * 2**18)):
    _register(_case, "nfd_fast", _with("triton", _build), (512, 2048), _canonical)
    for _impl, _mode in (("nfd_fast[tf32]", "high"), ("nfd_fast[bf16]", "medium")):
        _register(_case, _impl, _matmul_precision(_mode, _with("triton", _build)), (512, 2048),
                  _canonical)
    _register(_case, "eager", _with("torch", _build), (512, 2048), _canonical)
