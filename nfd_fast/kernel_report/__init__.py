"""`nfd-fast kernels`: nfd_fast's Triton kernels as an H100 would run them, without a GPU.

Three steps, each cached under ~/.cache/nfd_fast/kernel_report (or $NFD_FAST_CACHE):
1. capture (capture.py, its own process under the Triton interpreter): each probe
   (probes.py: one benchmark case and implementation at two small sizes) runs through
   nfd_fast's public API; every kernel launch is recorded as it happens (kernel, arguments,
   constexprs, num_warps, num_stages, grid) with the memory sectors and dot FLOPs the
   interpreter sees, and the ATen calls around the kernels with their bytes and FLOPs.
   Kernels are found from the launches, never listed by name. Cached by a digest of the
   package's and the kernels' sources.
2. compile as launched (sass.py, in a process without the interpreter): Triton's own JIT
   binder specialises each launch's arguments as on a GPU (CUDA pointers 16-byte aligned)
   and triton.compile builds it for sm_90a; cuobjdump gives registers, spills, shared
   memory and the SASS, whose instruction mix is counted per warp with loop trip counts
   from the TTGIR. Cached by the specialisation key, and memoised per launch.
3. model (model.py): counts fitted linearly in the probe size are read at the benchmark
   case's canonical size, and each launch's modelled time is the largest of its
   tensor-core, issue-slot, MUFU, DRAM and L2 times; eager PyTorch and torch.compile are
   modelled at their byte and FLOP floors from the reference's ATen calls.
Every figure this produces is modelled, not measured.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from . import model
from .sass import cache_dir

LABEL = "modelled H100 (sm_90a), not measured"


def _sources_digest() -> str:
    """Digest of the sources a capture depends on: nfd_fast and its kernels (this package's
    model and SASS reader excluded: they do not change what launches)."""
    roots = {Path(importlib.util.find_spec("nfd_fast").origin).parent,
             Path(importlib.util.find_spec("nfd_fast.kernels").origin).parent}
    here = Path(__file__).parent
    h = hashlib.sha256()
    for root in sorted(roots):
        for path in sorted(root.rglob("*.py")):
            if path.parent == here and path.name not in ("capture.py", "probes.py"):
                continue
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _child_env(interpret: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, made explicit
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return env


def _run_module(module: str, args: list, interpret: bool) -> None:
    res = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                         env=_child_env(interpret))
    if res.returncode != 0:
        raise RuntimeError(f"{module} failed:\n{res.stdout[-2000:]}{res.stderr[-4000:]}")


def capture_probes(names: list, stats: dict | None = None) -> dict:
    """{probe: {size: events} or {"error": ...}}, captured (or read from the cache)."""
    from . import probes

    digest = _sources_digest()
    folder = cache_dir() / "captures"
    folder.mkdir(exist_ok=True)
    path_of = {n: folder / (hashlib.sha256(f"{digest}|{n}|{probes.PROBES[n].sizes}".encode())
                            .hexdigest()[:24] + ".json") for n in names}
    missing = [n for n in names if not path_of[n].exists()]
    if missing:  # the capture process writes each probe's file as soon as it is done
        with tempfile.TemporaryDirectory() as tmp:
            plan = os.path.join(tmp, "plan.json")
            with open(plan, "w", encoding="utf-8") as f:
                json.dump({n: str(path_of[n]) for n in missing}, f)
            _run_module("nfd_fast.kernel_report.capture", [plan], interpret=True)
    if stats is not None:
        stats["captured"] = stats.get("captured", 0) + len(missing)
    return {n: json.loads(path_of[n].read_text()) for n in names}


def analyse_launches(launches: list, stats: dict | None = None) -> list:
    """sass.kernel_report of each launch, compiled in a process without the interpreter.
    A launch seen before with the same sources is answered from its memo without
    starting that process."""
    from . import sass

    version = hashlib.sha256((_sources_digest() + Path(sass.__file__).read_text()).encode()).hexdigest()
    folder = cache_dir() / "launches"
    folder.mkdir(exist_ok=True)
    memo = [folder / (hashlib.sha256((version + json.dumps(launch, sort_keys=True)).encode())
                      .hexdigest()[:32] + ".json") for launch in launches]
    todo = [i for i, path in enumerate(memo) if not path.exists()]
    if todo:
        reports = _compile_reports([launches[i] for i in todo], stats)
        for i, report_ in zip(todo, reports):
            memo[i].write_text(json.dumps(report_))
    if stats is not None and len(todo) < len(launches):
        stats["hits"] = stats.get("hits", 0) + len(launches) - len(todo)
    return [json.loads(path.read_text()) for path in memo]


def _compile_reports(launches: list, stats: dict | None) -> list:
    from . import sass

    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return [sass.kernel_report(launch, stats) for launch in launches]
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "launches.json"), os.path.join(tmp, "reports.json")
        with open(src, "w", encoding="utf-8") as f:
            json.dump(launches, f)
        _run_module("nfd_fast.kernel_report.sass", [src, dst], interpret=False)
        with open(dst, encoding="utf-8") as f:
            result = json.load(f)
    if stats is not None:
        for k, v in result["stats"].items():
            stats[k] = stats.get(k, 0) + v
    return result["reports"]


def _launch_rows(probe, events, reports) -> tuple:
    """(per-launch model rows at the canonical size, glue seconds) of one probe."""
    (n1, ev1), (n2, ev2) = sorted(((int(n), ev) for n, ev in events.items()))
    l1 = [e for e in ev1 if e["type"] == "launch"]
    l2 = [e for e in ev2 if e["type"] == "launch"]
    if [e["kernel"] for e in l1] != [e["kernel"] for e in l2]:
        raise RuntimeError(f"{probe.case}/{probe.impl}: the launches differ between probe sizes")
    n = probe.canonical
    rows = []
    for a, b, kernel in zip(l1, l2, reports):
        ctas = 1
        for g1, g2 in zip(a["grid"], b["grid"]):
            ctas *= max(1, round(model.fit(n1, g1, n2, g2, n)))
        dram = model.fit(n1, a["dram_bytes"], n2, b["dram_bytes"], n)
        l2b = model.fit(n1, a["l2_bytes"], n2, b["l2_bytes"], n)
        terms = model.launch_terms(kernel, ctas, dram, l2b)
        bound = max(terms, key=terms.get)
        dot = sum(model.fit(n1, a["dot_flops"].get(k, 0), n2, v, n) for k, v in b["dot_flops"].items())
        # tensor-core FLOPs the SASS issues over the source's dot FLOPs (1: no replicated work)
        issued = ctas * kernel["num_warps"] * sum(
            v for k, v in kernel["dynamic_per_warp"].items() if k.startswith("tensor_flops_"))
        rows.append({"kernel": kernel["name"], "hash": kernel["hash"], "ctas": ctas,
                     "dram_bytes": dram, "l2_bytes": l2b, "dot_flops": dot,
                     "tensor_flops_issued_per_dot_flop": issued / dot if dot and issued else None,
                     "terms_ms": {k: v * 1e3 for k, v in terms.items()},
                     "modelled_ms": terms[bound] * 1e3, "bound": bound})
    glue = [sum(model.aten_seconds(e) for e in ev if e["type"] == "aten") for ev in (ev1, ev2)]
    return rows, model.fit(n1, glue[0], n2, glue[1], n)


def _reference_rows(probe, events) -> list:
    """eager and torch.compile rows from the reference's ATen calls: eager pays every call
    at its floor; torch.compile pays the non-pointwise calls and the fused pointwise bytes."""
    (n1, ev1), (n2, ev2) = sorted(((int(n), [e for e in ev if e["type"] == "aten"])
                                   for n, ev in events.items()))

    def parts(ev, compiled):
        calls = [e for e in ev if not (compiled and e["pointwise"])]
        matmul = sum(model.aten_seconds({**e, "bytes": 0}) for e in calls)
        total = sum(model.aten_seconds(e) for e in calls)
        fused = model.fused_bytes(ev) / model.HBM_COPY if compiled else 0.0
        return matmul, total + fused

    rows = []
    for impl, compiled in (("eager", False), ("compiled", True)):
        (m1, t1), (m2, t2) = parts(ev1, compiled), parts(ev2, compiled)
        matmul = model.fit(n1, m1, n2, m2, probe.canonical)
        total = model.fit(n1, t1, n2, t2, probe.canonical)
        rows.append({"case": probe.case, "impl": impl, "modelled_ms": total * 1e3,
                     "bound": "matmul" if matmul > total / 2 else "hbm", "label": LABEL})
    return rows


def report(cases=None, progress=None) -> dict:
    """The modelled table: {"label", "constants", "rows", "kernels", "errors", "stats"}.
    Rows: one per benchmark case and implementation, with case, impl, modelled_ms, bound."""
    from . import probes

    names = [n for n, p in probes.PROBES.items() if not cases or p.case in cases]
    if cases:
        unknown = sorted(set(cases) - {probes.PROBES[n].case for n in names})
        if unknown:
            raise ValueError(f"cases: no model for {unknown}; modelled: "
                             f"{sorted({p.case for p in probes.PROBES.values()})}")
    stats = {}
    if progress:
        progress(f"capturing {len(names)} probe(s) under the interpreter (cached after)")
    captured = capture_probes(names, stats)
    rows, kernels, errors = [], {}, {}
    for name in names:
        probe, events = probes.PROBES[name], captured[name]
        if "error" in events:
            errors[name] = events["error"]
            continue
        if probe.impl == "eager":
            rows.extend(_reference_rows(probe, events))
            continue
        biggest = max(events, key=int)
        launches = [e for e in events[biggest] if e["type"] == "launch"]
        if progress:
            progress(f"{name}: compiling {len(launches)} launch(es) for sm_90a")
        try:
            reports = analyse_launches(launches, stats)
            launch_rows, glue = _launch_rows(probe, events, reports)
        except Exception as exc:  # a kernel that does not compile is a finding, not a crash
            errors[name] = f"{type(exc).__name__}: {str(exc)[-1500:]}"
            continue
        for r, k in zip(launch_rows, reports):
            kernels.setdefault(k["hash"], {**k, "occupancy": model.occupancy(k), "used_by": []})
            kernels[k["hash"]]["used_by"].append(name)
        total = sum(r["modelled_ms"] for r in launch_rows) + glue * 1e3
        top = max(launch_rows, key=lambda r: r["modelled_ms"], default=None)
        bound = "glue" if top is None or glue * 1e3 > top["modelled_ms"] else f"{top['bound']} ({top['kernel']})"
        rows.append({"case": probe.case, "impl": probe.impl, "modelled_ms": total, "bound": bound,
                     "glue_ms": glue * 1e3, "launches": launch_rows, "label": LABEL})
    return {"label": LABEL, "environment": _environment(),
            "constants": {k: {"value": v, "source": s} for k, (v, s) in model.CONSTANTS.items()},
            "rows": rows, "kernels": list(kernels.values()), "errors": errors, "stats": stats}


def _environment() -> dict:
    import datetime

    import torch
    import triton

    import nfd_fast

    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "target": "sm_90a (H100 SXM5)", "triton": triton.__version__, "torch": torch.__version__,
            "nfd_fast": nfd_fast.__version__, "sources_digest": _sources_digest()}


def format_table(rep: dict) -> str:
    """The per-case table and the per-kernel table, as text."""
    lines = [f"# {rep['label']}", f"{'case':28} {'impl':26} {'ms':>10} {'vs eager':>8}  bound"]
    eager = {r["case"]: r["modelled_ms"] for r in rep["rows"] if r["impl"] == "eager"}
    for r in rep["rows"]:
        speed = f"{eager[r['case']] / r['modelled_ms']:.2f}x" if r["case"] in eager and r["modelled_ms"] else ""
        lines.append(f"{r['case']:28} {r['impl']:26} {r['modelled_ms']:10.3f} {speed:>8}  {r['bound']}")
    lines += ["", f"{'kernel':28} {'warps':>5} {'stages':>6} {'regs':>4} {'stack':>5} {'smem':>7} "
              f"{'CTA/SM':>6}  hot loop per iteration (trips per CTA)"]
    for k in rep["kernels"]:
        hot = k["hot_loop"]
        mix = "straight-line" if hot is None else \
            " ".join(f"{c}={v}" for c, v in sorted(hot["per_iteration"].items())) + f" ({hot['trips_per_cta']})"
        lines.append(f"{k['name'][:28]:28} {k['num_warps']:5} {k['num_stages']:6} {k['registers']:4} "
                     f"{k['stack_bytes']:5} {k['shared_bytes']:7} {k['occupancy']['ctas_per_sm']:6}  {mix}")
    for name, err in rep["errors"].items():
        lines.append(f"# {name}: not modelled: {err.splitlines()[-1][:200]}")
    return "\n".join(lines)


def write_json(rep: dict, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(rep, f, indent=1)
