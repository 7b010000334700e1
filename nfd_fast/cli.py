"""The `nfd-fast` command line: bench, fit, render, demo.

Every argument and output path is checked before work starts. User errors (bad
arguments, unreadable or mismatched files, a device this machine lacks) end with one
line on stderr and exit status 2, never a traceback. No command replaces an existing
file unless given --overwrite (a render continues its own unfinished output instead;
a fit continues its checkpoint with --resume).
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from . import __version__

USER_ERRORS = (ValueError, OSError)  # OSError: missing, unreadable, busy or unwritable files


def _check_output(path, overwrite: bool, name: str, suffixes=()) -> Path:
    """An output path that can be written, refused if it exists and overwrite is False."""
    path = Path(path)
    if suffixes and path.suffix.lower() not in suffixes:
        raise ValueError(f"{name}: expected a {' or '.join(suffixes)} path, got {str(path)!r}")
    if path.is_dir():
        raise ValueError(f"{name}: {path} is a directory; give a file path")
    if not path.parent.is_dir():
        raise ValueError(f"{name}: the directory {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise ValueError(f"{name}: cannot write into {path.parent}")
    if path.exists() and not overwrite:
        raise ValueError(f"{name}: {path} exists; pass --overwrite to replace it")
    return path


# ------------------------------------------------------------------------------ bench


def _bench(args) -> int:
    from .benchmarks import report as reports
    from .benchmarks import runner
    from .fields_io import resolve_device

    if args.device is not None:
        resolve_device(args.device)
    for name, suffix in (("--json", ".json"), ("--md", ".md"), ("--png", ".png")):
        value = getattr(args, name[2:])
        if value:
            _check_output(value, args.overwrite, name, (suffix,))
    command = "nfd-fast " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    report = runner.run(only=args.only, quick=args.quick, device=args.device,
                        impls=args.impl, command=command)
    env = report["environment"]
    print(f"# nfd_fast benchmarks on {env['device']} (torch {env['torch']}, triton {env['triton']})"
          f"{' --quick sizes' if report['quick'] else ''}")
    if report["ceilings"]:
        c = report["ceilings"]
        print(f"# measured ceilings: bf16 matmul {c['bf16_matmul_tflops']:.0f} TFLOP/s, "
              f"copy {c['copy_gbps']:.0f} GB/s")
    else:
        print("# no GPU: nfd_fast runs its CPU path (the reference), so these CPU timings show "
              "no speed-up; the Triton variants need a GPU")
    on_gpu = bool(report["ceilings"])
    print(reports.format_table(report, speedups=on_gpu))
    print()
    print(reports.format_targets(report))
    _print_modelled(reports, only=args.only)
    if args.json:
        runner.write_json(report, args.json)
        print(f"# wrote {args.json}")
    if args.md:
        with open(args.md, "w", encoding="utf-8") as f:
            f.write(reports.format_markdown(report) + "\n")
        print(f"# wrote {args.md}")
    if args.png:
        reports.plot_speedups(report, args.png)
        print(f"# wrote {args.png}")
    return 0


def _print_modelled(reports, only=None) -> None:
    """The committed modelled H100 table (`nfd-fast kernels`), labelled as modelled, and
    whether it was computed for these sources."""
    import json

    from . import kernel_report

    results = os.path.join(os.path.dirname(os.path.abspath(reports.__file__)), "results")
    path = reports.newest_result(results, modelled=True)
    if path is None:
        print("\n# no modelled H100 table committed: `nfd-fast kernels` computes one")
        return
    result = json.load(open(path, encoding="utf-8"))
    if only:
        result = {**result, "rows": [r for r in result["rows"] if r["case"] in only]}
    fresh = result.get("environment", {}).get("sources_digest") == kernel_report._sources_digest()
    print(f"\n# modelled H100 times, not measured ({os.path.basename(path)}; "
          + ("computed for these sources" if fresh else
             "computed for an earlier version of the kernels: `nfd-fast kernels` recomputes")
          + ")")
    print(reports.format_modelled(result))


# -------------------------------------------------------------------------------- fit

FIT_SIZES = {"hidden": ("hidden_features", 256), "layers": ("hidden_layers", 3)}


def _fit_sizes(args, ckpt) -> dict:
    """hidden / layers: as given, else the resumed checkpoint's, else the defaults; a given
    size that contradicts the checkpoint is refused."""
    sizes = {}
    for arg, (key, default) in FIT_SIZES.items():
        given, stored = getattr(args, arg), (ckpt["config"].get(key) if ckpt else None)
        if given is not None and stored is not None and given != stored:
            raise ValueError(f"--{arg} {given}: the checkpoint being resumed has {stored}")
        sizes[arg] = given if given is not None else (stored if stored is not None else default)
    return sizes


def _resumed_fit(fit, ckpt, image, out: Path) -> None:
    if "fit" not in ckpt:
        raise ValueError(f"--resume: {out} holds no fit state (not written by `nfd-fast fit`)")
    if list(ckpt.get("image_shape", [])) != list(image.shape[:2]):
        raise ValueError(f"--resume: {out} was fitted to an image of {ckpt.get('image_shape')}, "
                         f"this one is {list(image.shape[:2])}")
    try:
        fit.restore(ckpt["fit"], ckpt["state_dict"])
    except (KeyError, RuntimeError, TypeError) as exc:
        raise ValueError(f"--resume: {out} has a damaged fit state ({type(exc).__name__}: {exc})") from exc


def _fit(args) -> int:
    from .fields_io import ImageFit, check_fit_arguments, load_image, read_checkpoint, resolve_device, save_field

    check_fit_arguments(steps=args.steps, lr=args.lr, batch_points=args.batch_points,
                        checkpoint_every=args.checkpoint_every,
                        **{k: getattr(args, k) for k in FIT_SIZES if getattr(args, k) is not None})
    if args.resume and args.overwrite:
        raise ValueError("--resume continues --out, --overwrite replaces it: give one")
    out = _check_output(args.out, args.overwrite or args.resume, "--out")
    if args.resume and not out.exists():
        raise ValueError(f"--resume: {out} does not exist (nothing to resume)")
    device = resolve_device(args.device)
    image = load_image(args.image)
    ckpt = read_checkpoint(out) if args.resume else None
    fit = ImageFit(image, **_fit_sizes(args, ckpt), lr=args.lr, batch_points=args.batch_points,
                   seed=args.seed, device=device)
    if ckpt is not None:
        _resumed_fit(fit, ckpt, image, out)
        if fit.step >= args.steps:
            raise ValueError(f"--steps {args.steps}: {out} is already at step {fit.step}; "
                             "give more steps to continue")
    meta = {"image_shape": list(image.shape[:2]), "source": str(args.image)}

    def save(f, **extra) -> None:
        save_field(out, f.model, **meta, fit=f.state(), **extra)

    fit.train(args.steps, every=args.checkpoint_every, on_checkpoint=save)
    final_psnr = fit.psnr()
    save(fit, psnr=final_psnr)
    H, W, C = image.shape
    print(f"fitted {args.image} ({H}x{W}x{C}) in {fit.step} steps: PSNR {final_psnr:.2f} dB on the "
          f"whole image; wrote {out}")
    return 0


# ----------------------------------------------------------------------------- render


def _shape(text: str) -> list:
    try:
        sizes = [int(v) for v in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes like 32768x32768, got {text!r}")
    return sizes


def _render(args) -> int:
    from .fields_io import load_field
    from .render import render

    out = _check_output(args.out, True, "--out", (".npy",))  # an existing one: resumed or refused
    if args.preview:
        _check_output(args.preview, args.overwrite, "--preview")
    model, ckpt = load_field(args.field, device=args.device or "cpu")
    shape = args.shape or ckpt.get("image_shape")
    if shape is None:
        raise ValueError("--shape: needed (the checkpoint records no image shape)")
    out = render(model, shape, out=out, chunk_size=args.chunk_size, preview=args.preview,
                 resume=not args.overwrite, progress=True)
    print(f"wrote {out}" + (f" and {args.preview}" if args.preview else ""))
    return 0


# ------------------------------------------------------------------------------- demo


def _run_demo(approach, out: Path, quick: bool, seed: int, device: str) -> str:
    """The approach's demo (nfd_fast.models.demo): writes the PNG, returns its metric line."""
    from . import models

    return models.demo(approach, str(out), quick=quick, seed=seed, device=device)


def _approach(value: str):
    """--approach: 1..10 or "ddmi"."""
    from .models import APPROACHES

    key = value if value == "ddmi" else (int(value) if value.isdigit() else value)
    if key not in APPROACHES:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(map(str, APPROACHES))}, got {value!r}")
    return key


def _demo(args) -> int:
    from .fields_io import resolve_device

    out = _check_output(args.out or f"approach{args.approach}_demo.png", args.overwrite, "--out", (".png",))
    device = str(resolve_device(args.device or "cpu"))
    line = _run_demo(args.approach, out, args.quick, args.seed, device)
    print(f"wrote {out}")
    print(line)
    return 0


# ----------------------------------------------------------------------------- parser


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, but not the empty ones (None / False)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _subcommand(sub, name: str, help: str, func, **kwargs) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help, description=help, formatter_class=_HelpFormatter, **kwargs)
    parser.set_defaults(func=func)
    return parser


def _overwrite(parser) -> None:
    parser.add_argument("--overwrite", action="store_true", help="replace output files that exist")


def _kernels(args) -> int:
    """`nfd-fast kernels`: the kernels compiled for an H100 as they launch, and the model."""
    from . import kernel_report

    rep = kernel_report.report(cases=args.only, progress=lambda m: print(f"[kernels] {m}", file=sys.stderr))
    print(kernel_report.format_table(rep))
    if args.json:
        kernel_report.write_json(rep, args.json)
        print(f"# wrote {args.json}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nfd-fast", formatter_class=_HelpFormatter,
                                     description="nfd_fast: fused kernels for neural fields and "
                                     "diffusion models")
    parser.add_argument("--version", action="version", version=f"nfd-fast {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = _subcommand(sub, "bench", "run the benchmark suite and print the comparison table", _bench)
    bench.add_argument("--quick", action="store_true", help="small shapes (seconds)")
    bench.add_argument("--only", nargs="+", metavar="CASE", help="run only these cases")
    bench.add_argument("--impl", nargs="+", metavar="IMPL",
                       help="run only these implementations (eager, compiled, nfd_fast, ...)")
    bench.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    bench.add_argument("--json", metavar="PATH", help="also write the full report as JSON")
    bench.add_argument("--md", metavar="PATH", help="also write the markdown table")
    bench.add_argument("--png", metavar="PATH", help="also write a bar chart of speed-ups (matplotlib)")
    _overwrite(bench)

    fit = _subcommand(sub, "fit", "fit a Siren to an image and save a field checkpoint", _fit)
    fit.add_argument("image", help="an image file (PNG, JPEG, ...; 8-bit, 16-bit or float)")
    fit.add_argument("--out", required=True, help="checkpoint path (.pt)")
    fit.add_argument("--hidden", type=int, help="hidden width (default: 256, or the resumed checkpoint's)")
    fit.add_argument("--layers", type=int, help="hidden layers (default: 3, or the resumed checkpoint's)")
    fit.add_argument("--steps", type=int, default=500, help="Adam steps in all (a resumed fit counts on)")
    fit.add_argument("--lr", type=float, default=1e-4, help="learning rate")
    fit.add_argument("--batch-points", type=int, default=2**14,
                     help="random pixels per step (the whole image when it has fewer)")
    fit.add_argument("--seed", type=int, default=0, help="seeds the initialisation and the pixel batches")
    fit.add_argument("--checkpoint-every", type=int, default=100, metavar="N",
                     help="write --out every N steps (0: only at the end)")
    fit.add_argument("--resume", action="store_true", help="continue the fit saved in --out")
    fit.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    _overwrite(fit)

    rend = _subcommand(sub, "render", "render a field checkpoint on a (huge) grid to .npy", _render)
    rend.add_argument("field", help="a checkpoint written by `nfd-fast fit`")
    rend.add_argument("--shape", type=_shape, help="e.g. 32768x32768 (default: the fitted image's)")
    rend.add_argument("--out", required=True, help=".npy output path (an unfinished one is resumed)")
    rend.add_argument("--preview", help="image path (.png) for a downscaled preview")
    rend.add_argument("--chunk-size", type=int, help="points per chunk (default: 2^18 on cpu, 2^22 on cuda)")
    rend.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    rend.add_argument("--overwrite", action="store_true",
                      help="start over, replacing --out and --preview if they exist")

    dem = _subcommand(sub, "demo", "train one approach's model briefly on synthetic data and plot it", _demo)
    dem.add_argument("--approach", type=_approach, default=1, help="which approach (1..10, or ddmi)")
    dem.add_argument("--out", help="PNG path (default: approach<N>_demo.png)")
    dem.add_argument("--quick", action="store_true", help="a much shorter run (seconds to a minute)")
    dem.add_argument("--seed", type=int, default=0, help="seeds data, initialisation and sampling")
    dem.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    _overwrite(dem)
    kern = sub.add_parser("kernels", help="compile every kernel as it launches for an H100 (no GPU "
                          "needed) and print registers, spills, SASS mix and modelled times")
    kern.add_argument("--only", nargs="+", metavar="CASE", help="only these benchmark cases")
    kern.add_argument("--json", metavar="PATH", help="also write the rows (case, impl, modelled_ms, bound)")
    kern.set_defaults(func=_kernels)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as exc:  # bad input: one line, no traceback
        message = " ".join(str(exc).split())
        print(f"nfd-fast {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = {"render": "; run the same command again to resume",
                "fit": "; `--resume` continues from the last periodic checkpoint"}.get(args.command, "")
        print(f"nfd-fast {args.command}: interrupted{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
