"""Shared pytest set-up.

Without CUDA every kernel runs in Triton's interpreter on CPU tensors: TRITON_INTERPRET must be set
before Triton decorates the kernels, so it is set here, before any test module imports `kernels`.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from kernels._utils import interpreting  # noqa: E402  (after TRITON_INTERPRET is settled)


def _has_cuda():
    return torch.cuda.is_available() and not interpreting()


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none here; kernels run in Triton's interpreter)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    """The device the kernels run on: CUDA when present, else CPU under the interpreter."""
    return torch.device("cuda" if _has_cuda() else "cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
