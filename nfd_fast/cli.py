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
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
