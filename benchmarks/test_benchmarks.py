"""`pytest benchmarks/`: every case x implementation through pytest-benchmark, on the same
builders the `nfd-fast bench` runner uses (quick sizes unless NFD_FAST_BENCH_FULL=1)."""
import os

import pytest
import torch

from nfd_fast.benchmarks import cases  # noqa: F401 (registers the cases)
from nfd_fast.benchmarks.runner import CASES

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
QUICK = DEVICE != "cuda" or os.environ.get("NFD_FAST_BENCH_FULL") != "1"

PARAMS = []
for _case in CASES.values():
    _impls = _case.impls + _case.gpu_only_impls
    for _impl in _impls:
        marks = ()
        if DEVICE != "cuda" and _impl in _case.gpu_only_impls:
            marks = pytest.mark.skip(reason="Triton variant needs a GPU")
        PARAMS.append(pytest.param(_case.name, _impl, id=f"{_case.name}-{_impl}", marks=marks))


@pytest.mark.parametrize("case, impl", PARAMS)
def test_bench(benchmark, case, impl):
    work, impls = CASES[case].build(DEVICE, QUICK)
    if impl not in impls:  # render_gigapixel's eager column exists at quick sizes only
        pytest.skip(f"{case} builds no {impl} at this size")
    fn = impls[impl]
    fn()  # compile and warm up outside the timing

    def run():
        fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info.update(coords=work.coords, flops=work.flops, device=DEVICE)
    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
