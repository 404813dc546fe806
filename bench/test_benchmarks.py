"""The op benchmarks under pytest-benchmark, on CUDA:

    pytest bench --benchmark-only [--benchmark-json out.json]

One test per case that a benchmark module yields from its optional `cases(args)` (the protocol in
bench/harness.py), at the --quick shapes (set TRITONGPT_BENCH_FULL=1 for every shape). Each timed
round runs the case once and synchronizes the device, so the time is the GPU's, not the launch's;
gradients are reset outside the timed region. Without CUDA the one test skips with the reason.
Not collected by the default `python -m pytest` (pytest.ini's testpaths is tests/).
"""
import argparse
import os

import pytest
import torch

from tritongpt.bench import harness

HAS_CUDA = torch.cuda.is_available()
NO_CUDA = "op benchmarks need a CUDA GPU (none found)"

ARGS = argparse.Namespace(quick=os.environ.get("TRITONGPT_BENCH_FULL") != "1", no_compile=False,
                          only=None, out_dir=None)
ROUNDS = 30
WARMUP_ROUNDS = 3


def _cases():
    modules, _ = harness.discover_modules()
    return [case for module in modules if hasattr(module, "cases") for case in module.cases(ARGS)]


# Without CUDA one placeholder case, skipped below: a clean skip with the reason (exit status 0),
# where an empty collection would end `pytest bench` with status 5.
CASES = _cases() if HAS_CUDA else [("no-cuda", None)]


@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA)
@pytest.mark.parametrize("setup", [setup for _, setup in CASES], ids=[case_id for case_id, _ in CASES])
def test_op(benchmark, setup):
    fn, leaves = setup()

    def clear_grads():
        for t in leaves:
            t.grad = None

    def timed():
        fn()
        torch.cuda.synchronize()

    clear_grads()
    timed()  # compile and autotune outside the timing
    benchmark.pedantic(timed, setup=clear_grads, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS)
