"""The `nfd-fast` command line."""
from __future__ import annotations

import argparse
import shlex
import sys


def _bench(args) -> int:
    from .benchmarks import report as reports
    from .benchmarks import runner

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
        print("# no GPU: nfd_fast runs its CPU path (the reference); Triton variants need a GPU")
    print(reports.format_table(report))
    print()
    print(reports.format_targets(report))
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


def _fit(args) -> int:
    from .fields_io import fit_image, load_image, save_field

    image = load_image(args.image)
    model, final_psnr = fit_image(image, hidden=args.hidden, layers=args.layers, steps=args.steps,
                                  lr=args.lr, device=args.device)
    save_field(args.out, model, image_shape=list(image.shape[:2]), psnr=final_psnr,
               source=str(args.image))
    print(f"fitted {args.image} ({image.shape[0]}x{image.shape[1]}x{image.shape[2]}): "
          f"PSNR {final_psnr:.2f} dB; wrote {args.out}")
    return 0


def _shape(text: str) -> list:
    try:
        sizes = [int(v) for v in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes like 32768x32768, got {text!r}")
    return sizes


def _render(args) -> int:
    from .fields_io import load_field
    from .render import render

    model, ckpt = load_field(args.field, device=args.device)
    shape = args.shape or ckpt.get("image_shape")
    if shape is None:
        raise SystemExit("render: give --shape (the checkpoint records no image shape)")
    out = render(model, shape, out=args.out, chunk_size=args.chunk_size, preview=args.preview,
                 resume=not args.no_resume, progress=True)
    print(f"wrote {out}" + (f" and {args.preview}" if args.preview else ""))
    return 0


def _demo(args) -> int:
    from .models.latent_field import demo

    result = demo(args.out, signals=args.signals, epochs=args.epochs, device=args.device)
    print(f"approach 1 demo: held-out reconstruction MSE {result['mse']:.4f} "
          f"({result['seconds']:.0f} s of training); wrote {result['out']}")
    return 0


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
    parser = argparse.ArgumentParser(prog="nfd-fast", description="nfd_fast: fused kernels for "
                                     "neural fields and diffusion models")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="run the benchmark suite and print the comparison table")
    bench.add_argument("--quick", action="store_true", help="small shapes (seconds)")
    bench.add_argument("--only", nargs="+", metavar="CASE", help="run only these cases")
    bench.add_argument("--impl", nargs="+", metavar="IMPL",
                       help="run only these implementations (eager, compiled, nfd_fast, ...)")
    bench.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    bench.add_argument("--json", metavar="PATH", help="also write the full report as JSON")
    bench.add_argument("--md", metavar="PATH", help="also write the markdown table")
    bench.add_argument("--png", metavar="PATH", help="also write a bar chart of speed-ups (matplotlib)")
    bench.set_defaults(func=_bench)

    fit = sub.add_parser("fit", help="fit a Siren to an image and save a field checkpoint")
    fit.add_argument("image", help="an image file (PNG, JPEG, ...)")
    fit.add_argument("--out", required=True, help="checkpoint path (.pt)")
    fit.add_argument("--hidden", type=int, default=256)
    fit.add_argument("--layers", type=int, default=3, help="hidden layers")
    fit.add_argument("--steps", type=int, default=500)
    fit.add_argument("--lr", type=float, default=1e-4)
    fit.add_argument("--device", help="default: cuda when available")
    fit.set_defaults(func=_fit)

    rend = sub.add_parser("render", help="render a field checkpoint on a (huge) grid to .npy")
    rend.add_argument("field", help="a checkpoint written by `nfd-fast fit`")
    rend.add_argument("--shape", type=_shape, help="e.g. 32768x32768 (default: the fitted image's)")
    rend.add_argument("--out", required=True, help=".npy output path")
    rend.add_argument("--preview", help="PNG path for a downscaled preview")
    rend.add_argument("--chunk-size", type=int, help="points per chunk")
    rend.add_argument("--no-resume", action="store_true", help="start over even if --out exists")
    rend.add_argument("--device", help="default: cpu (cuda: pass --device cuda)")
    rend.set_defaults(func=_render)

    dem = sub.add_parser("demo", help="a short approach-1 run (latent diffusion + SIREN) with a PNG plot")
    dem.add_argument("--out", default="approach1_demo.png", help="PNG path")
    dem.add_argument("--signals", type=int, default=1000)
    dem.add_argument("--epochs", type=int, default=15)
    dem.add_argument("--device", help="default: cpu")
    dem.set_defaults(func=_demo)
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
    except (ValueError, PermissionError, FileNotFoundError) as exc:  # bad input: no traceback
        print(f"nfd-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
