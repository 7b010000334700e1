"""Compile nfd_fast's kernels for an H100 (sm_90a) exactly as they launch, without a GPU.

The Triton interpreter runs kernels as Python, so it cannot catch what only the compiler
rejects, nor show registers, spills or shared memory. This script is `nfd-fast kernels`
(nfd_fast.kernel_report): the benchmark cases' work runs under the interpreter with every
launch recorded, and each launch is compiled through Triton's own JIT binder and argument
specialisation (num_warps, num_stages and all constexprs included) for sm_90a. It prints
every kernel variant's registers, spill stack, shared memory and hot loop, and fails
when a variant does not compile or needs more shared memory than an H100 has.

Run: `python tests/sm90_compile.py [CASE ...]` (default: every modelled case).
"""
import argparse
import sys

from nfd_fast import kernel_report

H100_MAX_SHARED = 232448  # bytes of shared memory one block may use on sm_90


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", help="benchmark cases (default: all modelled ones)")
    args = parser.parse_args(argv)
    rep = kernel_report.report(cases=args.cases or None, progress=lambda m: print(m, file=sys.stderr))
    print(kernel_report.format_table(rep))
    failures = [f"{name}: {err.splitlines()[-1][:300]}" for name, err in rep["errors"].items()]
    failures += [f"{k['name']} ({', '.join(k['used_by'])}): {k['shared_bytes']} B of shared memory"
                 for k in rep["kernels"] if k["shared_bytes"] > H100_MAX_SHARED]
    for line in failures:
        print(f"FAIL: {line}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
