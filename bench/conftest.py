"""pytest options of the op benchmarks (bench/test_benchmarks.py): --smoke.

Without CUDA, TRITON_INTERPRET is set here, before anything imports `tritongpt` (whose import
decorates the kernels), so a smoke run's kernels run in Triton's interpreter.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser):
    parser.addoption("--smoke", action="store_true",
                     help="op benchmarks at tiny shapes and a few rounds, CPU allowed (kernels in "
                          "Triton's interpreter): checks that every case runs")
