"""Shared pytest set-up.

Without CUDA every kernel runs in Triton's interpreter on CPU tensors: TRITON_INTERPRET must be set
before Triton decorates the kernels, so it is set here, before any test module imports `kernels`.
"""
import os
import sys
import tempfile

import pytest
import torch

# Test the installed package, `tritongpt`: `python -m pytest` puts the repository root on sys.path,
# where its folders would pose as top-level packages named kernels, model, data... (Hugging Face's
# own `kernels` package, which transformers looks for, among the names they would shadow).
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != REPO]

# Inductor's compiled-graph cache keys a custom op by name, not by its fake implementation: a cache
# left by another checkout or version of these kernels can replay stale output layouts. The suite
# compiles into a cache of its own.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="tritongpt-inductor-"))

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from tritongpt.kernels._utils import interpreting  # noqa: E402  (after TRITON_INTERPRET is settled)


def round_bf16_to_nearest_in_the_interpreter():
    """Make Triton's interpreter cast fp32 to bf16 as GPUs do: to nearest, ties to even.

    The interpreter (Triton 3.6 and 3.9) truncates, a biased rounding: a bf16 output is off by up
    to one unit in the last place instead of half, and in attention's backward the truncated P and
    dS compound into gradient errors of 2.5 to 5x PyTorch's, which no GPU shows. The kernels are
    tested for what a GPU computes, so the suite rounds as a GPU does. Returns the original
    converter (tests/test_helpers.py checks the interpreter's own behaviour with it)."""
    import numpy as np
    from triton import language as tl
    from triton.runtime import interpreter

    original = interpreter._convert_float

    def convert(values, src, dst, rounding_mode):
        if not (src == tl.float32 and dst == tl.bfloat16):
            return original(values, src, dst, rounding_mode)
        bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        return np.where(np.isnan(values), np.uint16(0x7FC0), rounded)

    interpreter._convert_float = convert
    return original


if interpreting():
    INTERPRETER_CONVERT_FLOAT = round_bf16_to_nearest_in_the_interpreter()

try:  # the property suite's profiles (tests/test_properties.py); hypothesis is in the test extra
    from hypothesis import HealthCheck, Phase, settings
except ImportError:
    settings = None
if settings is not None:
    # "ci" (the default): a fixed, small example budget and a derandomised seed, so every run of
    # the suite tries the same cases in a few minutes under the interpreter. "long": many more
    # cases from a fresh seed, for local runs: TRITONGPT_HYPOTHESIS=long python -m pytest
    # tests/test_properties.py (or hypothesis' own --hypothesis-profile=long).
    _relaxed = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
                    print_blob=True)
    # ci skips shrinking: a failure prints the drawn case as is, without minutes of reruns
    settings.register_profile("ci", max_examples=12, derandomize=True, database=None,
                              phases=[Phase.explicit, Phase.generate], **_relaxed)
    settings.register_profile("long", max_examples=400, **_relaxed)
    settings.load_profile(os.environ.get("TRITONGPT_HYPOTHESIS", "ci"))


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
