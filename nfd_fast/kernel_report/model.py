"""The H100 time model: every constant, where it comes from, and the per-launch bound.

A launch of C CTAs of w warps, c = ceil(C / SMS) CTAs on the busiest SM, takes the largest of
    tensor  c * w * sum_k F_k / (R_k / SMS)      F_k: tensor FLOPs per warp of operand type k
                                                  (from the HGMMA / HMMA shapes in the SASS)
    issue   c * w * I / (ISSUE_PER_SM * CLOCK)    I: dynamic instructions per warp
    mufu    c * w * U * 32 / (MUFU_PER_SM * CLOCK)    U: MUFU instructions per warp
    hbm     DRAM bytes / HBM_COPY                 distinct 32-byte sectors the launch touches
    l2      L2 bytes / L2_TO_SM                   32-byte sectors per operation and CTA
Latency, launch overheads and fences are not modelled (the fence and atomic counts are
reported beside). ATen calls (the op's glue, and the eager reference) take
max(FLOPs / matmul rate, bytes / HBM_COPY) each; torch.compile is modelled as the eager
calls minus the pointwise ones (fused away for free): both are floors, so modelled
speed-ups over them are lower bounds.
"""
from __future__ import annotations

import math

SMS = 132  # NVIDIA H100 SXM5 datasheet
CLOCK = 1.83e9  # Hz: the clock of NVIDIA's datasheet rates (989.4 TFLOP/s = 132 x 4 x 1024 x 1.83e9)
ISSUE_PER_SM = 4  # warp instructions per clock: 4 schedulers (Hopper whitepaper)
MUFU_PER_SM = 16  # results per clock, sm_90 (CUDA C++ Programming Guide, throughput table)
BF16_DENSE = 798e12  # FLOP/s: measured on an H100 (8192^3 bf16 matmul)
TF32_DENSE = BF16_DENSE * 494.7 / 989.4  # datasheet ratio of dense tf32 to bf16
FP32_CUDA_CORES = 66.9e12  # FLOP/s: datasheet fp32 (the eager reference's "highest" matmuls)
HBM_COPY = 3.0e12  # B/s: measured on an H100 (1 GiB device-to-device copy)
L2_TO_SM = 5.5e12  # B/s: NVIDIA publishes no figure; a microbenchmark value, to calibrate
REGISTERS_PER_SM, MAX_THREADS_PER_SM, MAX_CTAS_PER_SM = 65536, 2048, 32  # sm_90 limits
SHARED_PER_SM, SHARED_RESERVED_PER_CTA = 233472, 1024  # bytes (CUDA guide, sm_90)

CONSTANTS = {
    "sms": (SMS, "NVIDIA H100 SXM5 datasheet"),
    "clock_hz": (CLOCK, "clock behind NVIDIA's datasheet rates"),
    "issue_per_sm_per_clock": (ISSUE_PER_SM, "Hopper whitepaper: 4 schedulers"),
    "mufu_per_sm_per_clock": (MUFU_PER_SM, "CUDA C++ Programming Guide, sm_90"),
    "bf16_fp16_tensor_flops": (BF16_DENSE, "measured on an H100"),
    "tf32_tensor_flops": (TF32_DENSE, "measured bf16 x datasheet tf32/bf16 ratio"),
    "fp32_matmul_flops": (FP32_CUDA_CORES, "NVIDIA datasheet"),
    "hbm_copy_bytes_per_s": (HBM_COPY, "measured on an H100"),
    "l2_to_sm_bytes_per_s": (L2_TO_SM, "assumption: no NVIDIA figure; calibrate on a GPU"),
}

_TENSOR_RATES = {"bf16": BF16_DENSE, "f16": BF16_DENSE, "tf32": TF32_DENSE,
                 "e4m3": 2 * BF16_DENSE, "e5m2": 2 * BF16_DENSE, "other": BF16_DENSE}
_MATMUL_RATES = {"float32": FP32_CUDA_CORES, "bfloat16": BF16_DENSE, "float16": BF16_DENSE}


def occupancy(kernel: dict) -> dict:
    """CTAs and warps resident per SM, and what limits them."""
    warps = kernel["num_warps"]
    regs_per_warp = math.ceil((kernel["registers"] or 1) * 32 / 256) * 256
    limits = {"ctas": MAX_CTAS_PER_SM, "threads": MAX_THREADS_PER_SM // (32 * warps),
              "registers": REGISTERS_PER_SM // (regs_per_warp * warps),
              "shared": SHARED_PER_SM // (kernel["shared_bytes"] + SHARED_RESERVED_PER_CTA)}
    ctas = min(limits.values())
    return {"ctas_per_sm": ctas, "warps_per_sm": ctas * warps,
            "limit": min(limits, key=limits.get)}


def launch_terms(kernel: dict, ctas: int, dram_bytes: float, l2_bytes: float) -> dict:
    """Seconds per limit for one launch of `ctas` CTAs of this compiled kernel."""
    per_sm = math.ceil(ctas / SMS) * kernel["num_warps"]  # warps on the busiest SM
    dyn = kernel["dynamic_per_warp"]
    tensor = sum(v / (_TENSOR_RATES.get(k.rsplit("_", 1)[-1], BF16_DENSE) / SMS)
                 for k, v in dyn.items() if k.startswith("tensor_flops_"))
    return {"tensor": per_sm * tensor,
            "issue": per_sm * dyn["total"] / (ISSUE_PER_SM * CLOCK),
            "mufu": per_sm * dyn.get("MUFU", 0) * 32 / (MUFU_PER_SM * CLOCK),
            "hbm": dram_bytes / HBM_COPY, "l2": l2_bytes / L2_TO_SM}


def aten_seconds(event: dict) -> float:
    """Floor of one ATen call: its matmul FLOPs or its operand bytes, whichever is slower."""
    compute = event["flops"] / _MATMUL_RATES.get(event["dtype"], FP32_CUDA_CORES) if event["flops"] else 0.0
    return max(compute, event["bytes"] / HBM_COPY)


def fit(n1: float, q1: float, n2: float, q2: float, n: float) -> float:
    """q(n) from the line through (n1, q1) and (n2, q2)."""
    slope = (q2 - q1) / (n2 - n1)
    return max(0.0, q1 + slope * (n - n1))


def fused_bytes(events: list) -> float:
    """Bytes torch.compile's fused pointwise code must still move: each tensor from outside
    the pointwise chains read once, and each chain result that leaves them (used by a
    non-pointwise call, or by nothing: returned) written once."""
    pointwise = [e for e in events if e["pointwise"]]
    made_by_pointwise = {p for e in pointwise for p, _ in e["outputs"]}
    used_elsewhere = {p for e in events if not e["pointwise"] for p, _ in e["inputs"]}
    used = {p for e in events for p, _ in e["inputs"]}
    read = {p: b for e in pointwise for p, b in e["inputs"] if p not in made_by_pointwise}
    written = {p: b for e in pointwise for p, b in e["outputs"] if p in used_elsewhere or p not in used}
    return float(sum(read.values()) + sum(written.values()))
