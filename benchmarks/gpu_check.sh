#!/usr/bin/env bash
# On a lent GPU machine (torch and triton preinstalled, no network): install nfd_fast
# without dependencies, record the device, run the test suite with the compiled kernels
# (not the interpreter), the precision table and the full benchmark suite.
#
# Usage: bash benchmarks/gpu_check.sh OUTDIR [all|tests|bench]   (at most 8 files in OUTDIR)
# A device call is capped at 10 minutes: run "tests" and "bench" as two calls if "all"
# does not fit. Compiled kernels are cached in .triton-cache/ (git-ignored, kept between
# calls on the same machine), so the second call does not compile them again.
set -uo pipefail
out=${1:-${OUT:-gpu_out}}
phase=${2:-all}
mkdir -p "$out"
unset TRITON_INTERPRET
export TRITON_DEFAULT_FP_FUSION=1
export TRITON_CACHE_DIR="$PWD/.triton-cache"

{
  echo "command: bash benchmarks/gpu_check.sh OUTDIR $phase"
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
} >> "$out/device.txt" 2>&1

pip install --no-deps --no-build-isolation -e . > "$out/install.log" 2>&1 || {
  echo "install failed"; tail -20 "$out/install.log"; exit 1; }

if [ "$phase" = all ] || [ "$phase" = tests ]; then
  # Tests on the GPU: kernels compiled for the device, bf16 and the GPU-size tests included.
  if python -c "import pytest" 2>/dev/null; then
    timeout 540 python -m pytest tests -q -x -p no:cacheprovider > "$out/tests.log" 2>&1
    echo "tests: exit $?" >> "$out/device.txt"
  else
    echo "tests: pytest is not installed on this machine" | tee -a "$out/device.txt"
  fi
  # Error of each precision option against float64, on the GPU's real tf32 / bf16 units.
  python benchmarks/precision_errors.py > "$out/precision.md" 2>&1
fi

if [ "$phase" = all ] || [ "$phase" = bench ]; then
  # The full benchmark suite at canonical sizes; the JSON is what gets committed.
  # (bench.png only where matplotlib is installed; else draw it later from bench.json)
  png=""; python -c "import matplotlib" 2>/dev/null && png="--png $out/bench.png"
  timeout 540 nfd-fast bench --json "$out/bench.json" --md "$out/bench.md" $png \
    > "$out/bench.log" 2>&1
  echo "bench: exit $?" >> "$out/device.txt"
fi

tail -5 "$out/tests.log" 2>/dev/null
cat "$out/device.txt"
cat "$out/precision.md" 2>/dev/null
grep -E "^\|" "$out/bench.log" 2>/dev/null | tail -60
