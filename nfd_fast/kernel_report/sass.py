"""Compile one captured launch for sm_90a exactly as the JIT would, and read its SASS.

Compile as launched: the kernel's own `JITFunction` binder (the function Triton's
`JITFunction.run` calls, built by `create_function_from_signature`) is applied to the
launch's arguments, with every pointer stood in for by a CPU tensor whose address has the
alignment the real CUDA pointer would have (allocations 16-byte aligned, views offset by
their storage offset). Its specialisation (ints equal to 1 become constexprs, ints and
pointers divisible by 16 get `tt.divisibility`), the constexprs and the launch options
(num_warps, num_stages, ...) then go through `JITFunction._pack_args` and `triton.compile`
for GPUTarget("cuda", 90, 32) (sm_90a; 32 = the warp size the CUDA driver reports), as
`JITFunction._do_compile` does on a GPU. Triton caches the compile on disk; the analysis
is cached here by the specialisation key (kernel source hash, signature, constexprs,
attributes, options) and this file's own version.

SASS analysis (cuobjdump from the Triton wheel): every instruction is classed (tensor-core,
FFMA, MUFU, global loads / stores by width, local memory, atomics, fences, cache control,
barriers); loops are the backward branches. Trip counts come from the kernel's TTGIR: a
`scf.for` with constant bounds runs (ub - lb) / step times. Each level of the `scf.for`
tree is matched to the same number of largest SASS (and PTX) loops at that level, in
program order; smaller unmatched loops, such as libdevice's Payne-Hanek sine path, count
once. ptxas may unroll a loop u times: u is the ratio of the SASS loop's global memory
instructions to its PTX loop's, and the SASS loop runs floor(trips / u) times (the
remainder is peeled into straight-line code). The dynamic
count per warp is the static count with every loop body weighted by its trips; the hot
loop is the matched loop with the most dynamic instructions. A loop whose bounds are not
constants counts once and the kernel is flagged (trip_counts_known = False).
"""
from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

TARGET_ARCH = 90
WARP_SIZE = 32

_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Za-z0-9_.]*)\s*([^;]*);")
_BRANCH_TARGET = re.compile(r"0x([0-9a-f]+)")


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _kernel(module: str, qualname: str):
    """The real (compiled, not interpreted) JITFunction of a kernel."""
    from triton.runtime.jit import _triton_jit_function_registry

    importlib.import_module(module)
    return _triton_jit_function_registry[f"{module}:{qualname}"]


def gpu_like(value):
    """A launch argument as the JIT binder would see it on a GPU: pointer descriptors
    ("ptr", torch dtype name, aligned) become CPU tensors with that alignment."""
    import torch

    if isinstance(value, dict) and value.get("kind") == "tl_dtype":
        import triton.language as tl

        return getattr(tl, value["name"]) if hasattr(tl, value["name"]) else tl.dtype(value["name"])
    if isinstance(value, dict) and value.get("kind") == "ptr":
        t = torch.empty(2, dtype=getattr(torch, value["dtype"]))
        return t if value["aligned"] else t[1:]  # one element in: off the 16-byte grid
    if isinstance(value, (list, tuple)) and not isinstance(value, str):
        return type(value)(gpu_like(v) for v in value)
    return value


def specialise(launch: dict):
    """(jit function, backend, ASTSource, options) of a captured launch, via Triton's own
    binder and argument packing."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import create_function_from_signature

    fn = _kernel(launch["module"], launch["kernel"])
    backend = CUDABackend(GPUTarget("cuda", TARGET_ARCH, WARP_SIZE))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    args = [gpu_like(a) for a in launch["args"]]
    kwargs = {k: gpu_like(v) for k, v in launch["kwargs"].items()}
    # what JITFunction.run adds before binding
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    bound, specialization, opts = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, opts)
    return fn, backend, triton.compiler.ASTSource(fn, signature, constexprs, attrs), options


def compile_launch(launch: dict):
    """The CompiledKernel this launch would run on an H100."""
    import triton
    from triton.backends.compiler import GPUTarget

    _, _, src, options = specialise(launch)
    return triton.compile(src, target=GPUTarget("cuda", TARGET_ARCH, WARP_SIZE), options=options.__dict__)


def disassemble(cubin: bytes) -> tuple[str, str]:
    """(SASS listing, resource usage) of a cubin."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        sass = subprocess.run([_tool("cuobjdump"), "-sass", path], capture_output=True, text=True,
                              check=True).stdout
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", path], capture_output=True,
                             text=True, check=True).stdout
    return sass, res


def parse_sass(listing: str) -> list:
    """[(address, opcode, operands)] in address order."""
    return [(int(m.group(1), 16), m.group(2), m.group(3).strip())
            for m in _SASS_LINE.finditer(listing)]


def instruction_class(opcode: str) -> str | None:
    """The class an instruction is counted under (None: not counted apart)."""
    parts = opcode.split(".")
    base = parts[0]
    if base in ("HGMMA", "HMMA", "IMMA", "QGMMA", "IGMMA"):
        return "tensor"
    if base in ("FFMA", "MUFU", "LDL", "STL", "MEMBAR", "CCTL", "LDS", "STS", "LDSM"):
        return base
    if base in ("BAR", "SYNCS", "WARPGROUP"):
        return "barrier"
    if base in ("ATOMG", "ATOM", "RED", "REDG", "ATOMS"):
        return "atomic"
    if base in ("LDG", "STG"):
        width = 32
        for p in parts[1:]:
            if p in ("64", "128"):
                width = int(p)
            elif p in ("U8", "S8"):
                width = 8
            elif p in ("U16", "S16"):
                width = 16
        return f"{base}.{width}"
    return None


def _loops(instrs: list) -> list:
    """Loops as (start, end) address intervals from backward branches, outermost first."""
    loops = []
    for addr, op, operands in instrs:
        if op.split(".")[0] in ("BRA", "JMP") and (m := _BRANCH_TARGET.search(operands)):
            target = int(m.group(1), 16)
            if target < addr:  # (a branch to itself is the end-of-program trap)
                loops.append((target, addr))
    return sorted(set(loops), key=lambda iv: (iv[0], -iv[1]))


def _loop_tree(intervals: list) -> list:
    """Nest intervals: [{"start", "end", "children"}]."""
    roots, stack = [], []
    for start, end in intervals:
        node = {"start": start, "end": end, "children": []}
        while stack and not (stack[-1]["start"] <= start and end <= stack[-1]["end"]):
            stack.pop()
        (stack[-1]["children"] if stack else roots).append(node)
        stack.append(node)
    return roots


_SCF_FOR = re.compile(r"scf\.for %\S+ = (%\S+) to (%\S+) step (%\S+)")
_CONST = re.compile(r"(%\S+) = arith\.constant (-?\d+) : i\d+")


def scf_for_tree(ttgir: str) -> list:
    """The kernel's scf.for nest: [{"trips": int or None, "children": [...]}]."""
    consts = {m.group(1): int(m.group(2)) for m in _CONST.finditer(ttgir)}
    roots, stack = [], []  # stack of (indent, node)
    for line in ttgir.splitlines():
        m = _SCF_FOR.search(line)
        if not m:
            continue
        indent = len(line) - len(line.lstrip())
        while stack and stack[-1][0] >= indent:  # a sibling or an outer loop: leave the nest
            stack.pop()
        lb, ub, step = (consts.get(v) for v in m.groups())
        trips = None if None in (lb, ub, step) or step <= 0 else max(0, -(-(ub - lb) // step))
        node = {"trips": trips, "children": []}
        (stack[-1][1]["children"] if stack else roots).append(node)
        stack.append((indent, node))
    return roots


def _largest(nodes: list, k: int) -> list:
    """The k largest loops of one nesting level, in program order."""
    biggest = sorted(nodes, key=lambda n: n["end"] - n["start"], reverse=True)[:k]
    return sorted(biggest, key=lambda n: n["start"])


def _match(sass_nodes: list, ptx_nodes: list, scf_nodes: list, weight: int, trips_of: dict,
           unknown: list) -> None:
    """Give each SASS loop its trip count. At each nesting level the len(scf_nodes) largest
    SASS and PTX loops, in program order, are the scf.for loops; ptxas may unroll a PTX
    loop u times (u = its global memory instructions per SASS iteration over those per
    PTX iteration), leaving floor(trips / u) iterations. Other loops (such as libdevice's
    Payne-Hanek sine path) count once per entry."""
    matched = _largest(sass_nodes, len(scf_nodes))
    ptx = _largest(ptx_nodes, len(scf_nodes))
    for node in sass_nodes:
        trips, scf_children, ptx_children = 1, [], []
        if node in matched:
            i = matched.index(node)
            scf = scf_nodes[i]
            scf_children = scf["children"]
            ptx_node = ptx[i] if i < len(ptx) else None
            ptx_children = ptx_node["children"] if ptx_node else []
            unroll = 1
            if ptx_node and ptx_node["mem"] and node["mem"] > ptx_node["mem"]:
                unroll = round(node["mem"] / ptx_node["mem"])
            if scf["trips"] is None:
                unknown.append(node["start"])
            else:
                # the remainder of trips / u runs as straight-line code outside the loop
                trips = max(scf["trips"] // unroll, min(scf["trips"], 1))
        trips_of[(node["start"], node["end"])] = (trips, weight * trips, node in matched)
        _match(node["children"], ptx_children, scf_children, weight * trips, trips_of, unknown)


def _count_exclusive(nodes: list, positions: list) -> None:
    """node["mem"] = how many of `positions` lie in the loop but in none of its children."""
    for node in nodes:
        _count_exclusive(node["children"], positions)
        inside = sum(node["start"] <= p <= node["end"] for p in positions)
        node["mem"] = inside - sum(_count_all(c, positions) for c in node["children"])


def _count_all(node: dict, positions: list) -> int:
    return sum(node["start"] <= p <= node["end"] for p in positions)


_PTX_LABEL = re.compile(r"^(\$L__\w+):")
_PTX_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$L__\w+);")
_PTX_GLOBAL = re.compile(r"^\s*(?:@!?%p\d+\s+)?(?:ld|st|atom|red)\.global")


def ptx_loops(ptx: str) -> list:
    """The PTX loop nest (backward branches, by line), each with its global memory
    instruction count ("mem", excluding nested loops)."""
    lines = ptx.splitlines()
    labels, intervals, memory = {}, [], []
    for i, line in enumerate(lines):
        if m := _PTX_LABEL.match(line.strip()):
            labels[m.group(1)] = i
        if (m := _PTX_BRANCH.search(line)) and labels.get(m.group(1), i) < i:
            intervals.append((labels[m.group(1)], i))
        if _PTX_GLOBAL.match(line):
            memory.append(i)
    tree = _loop_tree(sorted(set(intervals), key=lambda iv: (iv[0], -iv[1])))
    _count_exclusive(tree, memory)
    return tree


def _innermost(loops: dict, addr: int):
    inside = [lp for (s, e), lp in loops.items() if s <= addr <= e]
    return min(inside, key=lambda lp: lp["end"] - lp["start"], default=None)


def analyse(listing: str, ttgir: str, ptx: str) -> dict:
    """Static and per-warp dynamic instruction mix, loops and the hot loop of one kernel."""
    instrs = parse_sass(listing)
    tree = _loop_tree(_loops(instrs))
    _count_exclusive(tree, [a for a, op, _ in instrs if op.split(".")[0] in _GLOBAL_MEMORY])
    trips_of, unknown = {}, []
    _match(tree, ptx_loops(ptx), scf_for_tree(ttgir), 1, trips_of, unknown)
    static, dynamic = {"total": 0}, {"total": 0}
    loops = {key: {"start": key[0], "end": key[1], "trips": t, "weight": w, "matched": m,
                   "mix": {"total": 0}} for key, (t, w, m) in trips_of.items()}
    for addr, op, operands in instrs:
        if op == "NOP":  # alignment padding, never issued
            continue
        cls = instruction_class(op)
        innermost = _innermost(loops, addr)
        weight = 1 if innermost is None else innermost["weight"]
        for mix, w in ((static, 1), (dynamic, weight)):
            mix["total"] += w
            if cls:
                mix[cls] = mix.get(cls, 0) + w
        if innermost is not None:
            innermost["mix"]["total"] += 1
            if cls:
                innermost["mix"][cls] = innermost["mix"].get(cls, 0) + 1
    dynamic.update(tensor_flops_per_warp(instrs, loops))
    hot = max((lp for lp in loops.values() if lp["matched"]),
              key=lambda lp: lp["mix"]["total"] * lp["weight"], default=None)
    return {"static": static, "dynamic_per_warp": dynamic,
            "hot_loop": None if hot is None else {
                "address": f"0x{hot['start']:x}-0x{hot['end']:x}", "trips_per_cta": hot["weight"],
                "per_iteration": hot["mix"]},
            "loops": len(loops), "trip_counts_known": not unknown}


_GLOBAL_MEMORY = ("LDG", "STG", "ATOMG", "RED", "REDG")
_MMA_SHAPE = re.compile(r"(\d+)x(\d+)x(\d+)")


def tensor_flops_per_warp(instrs: list, loops: dict) -> dict:
    """Dynamic tensor-core FLOPs one warp issues, split by operand type (bf16 / f16 /
    tf32 / int8 / other). HGMMA mMxNxK is a warpgroup instruction (each of its 4 warps
    issues it: 1/4 of the work each); HMMA.MNK is one warp's."""
    flops = {}
    for addr, op, _ in instrs:
        parts = op.split(".")
        if parts[0] not in ("HGMMA", "HMMA"):
            continue
        shape = _MMA_SHAPE.search(op)
        if parts[0] == "HGMMA" and shape:
            m, n, k = map(int, shape.groups())
            per_warp = 2 * m * n * k / 4
        else:
            digits = parts[1]  # e.g. 16816 (m16 n8 k16) or 1688 (m16 n8 k8)
            m, n, k = 16, 8, int(digits[3:]) if len(digits) > 3 else 8
            per_warp = 2 * m * n * k
        kind = next((p.lower() for p in parts if p in ("BF16", "F16", "TF32", "E4M3", "E5M2")), "other")
        innermost = _innermost(loops, addr)
        weight = 1 if innermost is None else innermost["weight"]
        flops[f"tensor_flops_{kind}"] = flops.get(f"tensor_flops_{kind}", 0) + per_warp * weight
    return flops


def resources(res_usage: str) -> dict:
    """Registers, spill stack, shared memory from cuobjdump -res-usage."""
    regs = re.search(r"REG:(\d+)", res_usage)
    stack = re.search(r"STACK:(\d+)", res_usage)
    return {"registers": int(regs.group(1)) if regs else None,
            "stack_bytes": int(stack.group(1)) if stack else 0}


def report_compiled(compiled) -> dict:
    """Everything the model needs from one compiled kernel."""
    sass, res = disassemble(compiled.asm["cubin"])
    meta = compiled.metadata
    out = {"name": meta.name, "hash": meta.hash, "num_warps": meta.num_warps,
           "num_stages": meta.num_stages, "shared_bytes": meta.shared, **resources(res)}
    out.update(analyse(sass, compiled.asm["ttgir"], compiled.asm["ptx"]))
    out["spill_instructions"] = out["static"].get("LDL", 0) + out["static"].get("STL", 0)
    return out


def cache_dir() -> Path:
    root = os.environ.get("NFD_FAST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "nfd_fast")
    path = Path(root) / "kernel_report"
    path.mkdir(parents=True, exist_ok=True)
    return path


def kernel_report(launch: dict, stats: dict | None = None) -> dict:
    """report_compiled of a captured launch, cached by the launch's specialisation key
    (kernel source hash, signature, constexprs, attributes, options)."""
    import hashlib

    import triton

    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, made explicit
    _, backend, src, options = specialise(launch)
    analysis = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()  # this reader's version
    key = hashlib.sha256("|".join([src.hash(), backend.hash(), options.hash(), triton.__version__,
                                   analysis]).encode()).hexdigest()
    path = cache_dir() / f"{key}.json"
    if path.exists():
        if stats is not None:
            stats["hits"] = stats.get("hits", 0) + 1
        return json.loads(path.read_text())
    if stats is not None:
        stats["compiles"] = stats.get("compiles", 0) + 1
    out = report_compiled(compile_launch(launch))
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(out))
    tmp.replace(path)
    return out


def main(argv=None) -> int:
    """`python -m nfd_fast.kernel_report.sass LAUNCHES.json REPORTS.json` (no interpreter)."""
    import sys

    src, dst = (argv or sys.argv[1:])[:2]
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("compiling for sm_90a needs TRITON_INTERPRET unset")
    with open(src, encoding="utf-8") as f:
        launches = json.load(f)
    stats = {}
    reports = [kernel_report(launch, stats) for launch in launches]
    with open(dst, "w", encoding="utf-8") as f:
        json.dump({"reports": reports, "stats": stats}, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
