"""The benchmark runner behind `nfd-fast bench` and `pytest benchmarks/`.

Each case builds, on the same random inputs in one process, one callable per
implementation: "eager" (the PyTorch reference), "compiled" (torch.compile of the
reference) and "nfd_fast" (the fused kernels; variants such as "nfd_fast[bf16]" pick
another precision). It declares its work (FLOPs, the fewest bytes that must move, the
number of coordinates) so the report can give throughput, speed-ups and, on a GPU, the
fraction of the roofline measured in the same run.

On a GPU, times come from triton.testing.do_bench (median, with its quantiles); input
sets rotate between calls so caches do not flatter. On a CPU the Triton kernels cannot
run natively: the nfd_fast column is then nfd_fast's CPU path (the reference), at small
sizes, and the GPU-only variants are reported as skipped, with the reason.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import platform
import statistics
import sys
import time
from typing import Callable, Optional

import torch

import nfd_fast


@dataclasses.dataclass
class Work:
    """What one call of a case does: for throughput and roofline figures."""

    flops: float
    bytes: float
    coords: int


@dataclasses.dataclass(frozen=True)
class Target:
    """A goal set for a case, judged on a GPU at the canonical size.

    kind "speedup": time(baseline) / time(impl) >= threshold;
    kind "roofline": fraction of the measured roofline >= threshold;
    kind "time": median milliseconds <= threshold.
    impl "nfd_fast*" means the fastest of the nfd_fast variants (named in the verdict).
    """

    impl: str
    kind: str
    threshold: float
    baseline: Optional[str] = None
    source: str = ""

    def label(self) -> str:
        if self.kind == "speedup":
            return f"{self.impl} >= {self.threshold:g}x {self.baseline}"
        if self.kind == "time":
            return f"{self.impl} <= {self.threshold:g} ms"
        return f"{self.impl} >= {self.threshold:.0%} of roofline"


@dataclasses.dataclass
class Case:
    """A benchmark case: `build(device, quick)` -> (Work, {impl name: callable})."""

    name: str
    description: str
    build: Callable
    gpu_only_impls: tuple = ()
    targets: tuple = ()
    impls: tuple = ("eager", "compiled", "nfd_fast")  # those besides gpu_only_impls


@dataclasses.dataclass
class Timing:
    median_ms: float
    q20_ms: float
    q80_ms: float
    peak_mem_mb: Optional[float]
    compile_s: Optional[float] = None


CASES: dict = {}


def register(case: Case) -> Case:
    CASES[case.name] = case
    return case


class Rotating:
    """Calls fn on input set i % k for the i-th call (cache-honest timing)."""

    def __init__(self, fn: Callable, input_sets: list):
        self.fn, self.input_sets, self.i = fn, input_sets, 0

    def __call__(self):
        args = self.input_sets[self.i % len(self.input_sets)]
        self.i += 1
        return self.fn(*args)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_callable(fn: Callable, device: str, warmup: int = 2, reps: int = 10) -> Timing:
    """Median and 20/80% quantiles in ms; compile / first-call time reported apart."""
    t0 = time.perf_counter()
    fn()
    _sync(device)
    first_call_s = time.perf_counter() - t0
    if device == "cuda":
        import triton.testing

        torch.cuda.reset_peak_memory_stats()
        q20, med, q80 = triton.testing.do_bench(fn, warmup=25, rep=200, quantiles=[0.2, 0.5, 0.8])
        peak = torch.cuda.max_memory_allocated() / 2**20
        return Timing(med, q20, q80, peak, first_call_s)
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1e3)
    qs = statistics.quantiles(samples, n=5)
    return Timing(statistics.median(samples), qs[0], qs[-1], None, first_call_s)


def measure_ceilings(device: str) -> dict:
    """The device's bf16 matmul rate and copy bandwidth, measured now (GPU only)."""
    if device != "cuda":
        return {}
    import triton.testing

    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    mm_ms = triton.testing.do_bench(lambda: a @ b, warmup=25, rep=200, return_mode="median")
    a32, b32 = a.float(), b.float()
    tf32_was = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        tf32_ms = triton.testing.do_bench(lambda: a32 @ b32, warmup=25, rep=200, return_mode="median")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32_was
    src = torch.randn(2**28, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    cp_ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return {"bf16_matmul_tflops": 2 * n**3 / mm_ms / 1e9,
            "tf32_matmul_tflops": 2 * n**3 / tf32_ms / 1e9,
            "copy_gbps": 2 * src.numel() * 4 / cp_ms / 1e6}


def speedups(times: dict, target: str = "nfd_fast") -> dict:
    """{baseline: time(baseline) / time(target)} for every other measured implementation."""
    if target not in times:
        return {}
    return {name: t / times[target] for name, t in times.items() if name != target}


def roofline_fraction(work: Work, ms: float, ceilings: dict) -> Optional[float]:
    """Measured time over the larger of the compute and the memory floor, inverted."""
    if not ceilings:
        return None
    floor_ms = max(work.flops / (ceilings["bf16_matmul_tflops"] * 1e9),
                   work.bytes / (ceilings["copy_gbps"] * 1e6))
    return floor_ms / ms


def run_case(case: Case, device: str, quick: bool, ceilings: dict, impls=None) -> dict:
    work, callables = case.build(device, quick)
    row = {"case": case.name, "description": case.description, "work": dataclasses.asdict(work),
           "impls": {}, "skipped": {}}
    for name, fn in callables.items():
        if impls and name not in impls:
            continue
        if device != "cuda" and name in case.gpu_only_impls:
            row["skipped"][name] = "needs a GPU"
            continue
        try:
            t = time_callable(fn, device, reps=5 if quick else 10)
        except Exception as exc:  # one broken implementation must not sink the whole run
            row["skipped"][name] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            print(f"[bench] {case.name} / {name} failed: {type(exc).__name__}: {exc}",
                  file=sys.stderr, flush=True)
            continue
        row["impls"][name] = {
            **dataclasses.asdict(t),
            "coords_per_s": work.coords / (t.median_ms / 1e3),
            "tflops": work.flops / (t.median_ms / 1e3) / 1e12,
            "roofline_fraction": roofline_fraction(work, t.median_ms, ceilings),
        }
    times = {n: r["median_ms"] for n, r in row["impls"].items()}
    row["speedup_vs"] = speedups(times)
    row["targets"] = [judge_target(t, row, device == "cuda" and not quick) for t in case.targets]
    return row


def _candidates(impl: str, row: dict) -> list:
    if impl.endswith("*"):
        return [n for n in row["impls"] if n.startswith(impl[:-1])]
    return [impl] if impl in row["impls"] else []


def judge_target(target: Target, row: dict, canonical_gpu_run: bool) -> dict:
    """{'target', 'source', 'value', 'impl', 'met'}; met is None when not judged here."""
    verdict = {"target": target.label(), "source": target.source, "value": None,
               "impl": None, "met": None}
    if not canonical_gpu_run:
        verdict["why"] = "judged only on a GPU at the canonical size"
        return verdict
    impls = row["impls"]
    names = _candidates(target.impl, row)
    if not names or (target.kind == "speedup" and target.baseline not in impls):
        verdict["why"] = "not measured in this run"
        return verdict
    if target.kind == "speedup":
        best = min(names, key=lambda n: impls[n]["median_ms"])
        value = impls[target.baseline]["median_ms"] / impls[best]["median_ms"]
    elif target.kind == "time":
        best = min(names, key=lambda n: impls[n]["median_ms"])
        value = impls[best]["median_ms"]
        verdict.update(value=value, impl=best, met=value <= target.threshold)
        return verdict
    else:
        best = max(names, key=lambda n: impls[n]["roofline_fraction"] or 0.0)
        value = impls[best]["roofline_fraction"]
    verdict.update(value=value, impl=best, met=value is not None and value >= target.threshold)
    return verdict


def environment(device: str, command: str) -> dict:
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "nfd_fast": nfd_fast.__version__,
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def run(only=None, quick: bool = False, device: Optional[str] = None, impls=None,
        command: str = "", progress: bool = True) -> dict:
    """Run the selected cases; returns the report (environment, ceilings, rows)."""
    from . import cases  # noqa: F401 (registers the cases)

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device != "cuda":
        quick = True  # the canonical sizes are GPU sizes; a CPU gets the small ones
    names = list(CASES) if not only else only
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise ValueError(f"unknown benchmark case(s) {unknown}; known: {sorted(CASES)}")
    ceilings = measure_ceilings(device)
    rows = []
    for name in names:
        if progress:
            print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        rows.append(run_case(CASES[name], device, quick, ceilings, impls))
    return {"environment": environment(device, command), "quick": quick, "ceilings": ceilings,
            "rows": rows}


def write_json(report: dict, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
