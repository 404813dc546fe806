"""The op benchmarks under pytest-benchmark, on CUDA:

    pytest bench --benchmark-only [--benchmark-json out.json]
    pytest bench --benchmark-only --smoke      # tiny shapes, 2 rounds; on CPU too (CI)

One test per case that a benchmark module yields from its optional `cases(args)` (the protocol in
bench/harness.py), at the --quick shapes (set TRITONGPT_BENCH_FULL=1 for every shape), or at the
modules' SMOKE shapes with --smoke (bench/conftest.py). Each timed round runs the case once and
synchronizes the device, so the time is the GPU's, not the launch's; gradients are reset outside
the timed region. Without CUDA (and without --smoke) the one test skips with the reason.
Not collected by the default `python -m pytest` (pytest.ini's testpaths is tests/).
"""
import argparse
import contextlib
import os

import pytest
import torch

from tritongpt.bench import harness

HAS_CUDA = torch.cuda.is_available()
NO_CUDA = "op benchmarks need a CUDA GPU (none found)"

ROUNDS, WARMUP_ROUNDS = 30, 3
SMOKE_ROUNDS, SMOKE_WARMUP_ROUNDS = 2, 0
# A smoke session's modules keep their SMOKE constants until the process ends: the cases build
# their inputs when they run, long after collection.
_SMOKE_STACK = contextlib.ExitStack()


def _cases(smoke):
    args = argparse.Namespace(quick=smoke or os.environ.get("TRITONGPT_BENCH_FULL") != "1",
                              no_compile=False, only=None, out_dir=None, smoke=smoke)
    modules, _ = harness.discover_modules()
    cases = []
    for module in modules:
        if hasattr(module, "cases"):
            if smoke:
                _SMOKE_STACK.enter_context(harness.smoke_constants(module))
            cases += list(module.cases(args))
    return cases


def pytest_generate_tests(metafunc):
    smoke = metafunc.config.getoption("smoke", False)
    # Without CUDA one placeholder case, skipped in the test: a clean skip with the reason (exit
    # status 0), where an empty collection would end `pytest bench` with status 5.
    cases = _cases(smoke) if HAS_CUDA or smoke else [("no-cuda", None)]
    metafunc.parametrize("setup", [setup for _, setup in cases], ids=[case_id for case_id, _ in cases])


def test_op(benchmark, request, setup):
    if setup is None:
        pytest.skip(NO_CUDA)
    smoke = request.config.getoption("smoke", False)
    fn, leaves = setup()

    def clear_grads():
        for t in leaves:
            t.grad = None

    def timed():
        fn()
        harness.synchronize()

    clear_grads()
    timed()  # compile and autotune outside the timing
    rounds, warmup_rounds = (SMOKE_ROUNDS, SMOKE_WARMUP_ROUNDS) if smoke else (ROUNDS, WARMUP_ROUNDS)
    benchmark.pedantic(timed, setup=clear_grads, rounds=rounds, warmup_rounds=warmup_rounds)
