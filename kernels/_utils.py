"""Small helpers shared by the kernel files: where Triton can run, input checks, dtype policy."""
import functools
import numbers
import os

import numpy as np
import torch
import triton
import triton.language as tl

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def interpreting():
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1).

    Triton reads the variable when a kernel is decorated, so it must be set before `kernels` is
    imported; tests/conftest.py does that on machines without CUDA.
    """
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false")


def triton_runs_on(device):
    """Whether this process can launch the project's Triton kernels on tensors of `device`."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and not interpreting()
    return device.type == "cpu" and interpreting()


def has_tma(device):
    """Whether kernels on `device` read tiles through TMA tensor descriptors: Hopper or newer
    (compiled for an older GPU, descriptor loads become slower plain loads: sm_80's attention
    forward would take 254 registers instead of 128), or the interpreter, so that the CPU tests
    run the descriptor paths."""
    device = torch.device(device)
    return interpreting() or (device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9)


def tma_layout_ok(t):
    """Whether the copy engine can address t: fp16 or bf16 (wider tiles run on CUDA cores), unit
    innermost stride, a 16-byte aligned base and positive outer strides that are multiples of 16
    bytes (a sliced, expanded or odd-width view is not)."""
    return (t.dtype in (torch.float16, torch.bfloat16) and t.numel() > 0 and t.stride(-1) == 1
            and t.data_ptr() % 16 == 0 and all(s > 0 and s * t.element_size() % 16 == 0 for s in t.stride()[:-1]))


def check_tensor(name, t, min_ndim=0, dtypes=FLOAT_DTYPES):
    """Raise TypeError/ValueError naming `name` unless t is a tensor of an allowed dtype and rank."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({allowed}), got {str(t.dtype).replace('torch.', '')}")
    if t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got shape {tuple(t.shape)}")


def check_device(tensors):
    """Raise ValueError unless all named tensors share one device on which Triton can run.

    `tensors` maps argument names to tensors (None entries are skipped); the first one sets the
    device the others must match.
    """
    named = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; "
                             "all inputs must be on one device")
    if not triton_runs_on(first.device):
        raise ValueError(f"{first_name} is on {first.device}, where Triton cannot run here: use CUDA "
                         "tensors, or set TRITON_INTERPRET=1 before importing kernels to run on CPU")


def needs_grad(*inputs):
    """Whether autograd will want gradients of any of the inputs (non-tensors are ignored)."""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs)


def acc_torch_dtype(dtype):
    """The accumulation dtype for inputs of `dtype`: fp64 stays fp64 (for gradcheck), else fp32.
    Saved statistics, losses and parameter-gradient partials are kept in it."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def acc_dtype(dtype):
    """acc_torch_dtype as a Triton dtype, for the kernels' ACC constexpr."""
    return tl.float64 if acc_torch_dtype(dtype) == torch.float64 else tl.float32


@functools.lru_cache(maxsize=None)
def _sm_count(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_programs_for(device):
    """How many persistent programs fill the device: its SM count on CUDA, a handful in the interpreter."""
    device = torch.device(device)
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4


def or_empty(t, like, dtype):
    """t, or an empty tensor of `dtype` on like's device where t is None: a torch.library custom op
    cannot return None, so an output that was not computed travels as an empty tensor."""
    return t if t is not None else like.new_empty(0, dtype=dtype)


def real_number(name, value):
    """value as a Python float, or TypeError naming `name`. Accepts what torch.nn.functional
    accepts: Python and NumPy numbers (np.float32(1e-5) included), never bools."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    return float(value)


def integer(name, value):
    """value as a Python int, or TypeError naming `name` (Python and NumPy integers, not bools)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    return int(value)


@triton.jit
def tanh(x):
    """tanh to a few ulps in fp32 and fp64. (1 - e) / (1 + e) with e = exp(-2|x|) loses digits to
    cancellation near 0, so |x| < 1/4 uses the odd Taylor series (9 terms: < 1e-14 relative there)."""
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    far = (1.0 - e) / (1.0 + e)
    z = a * a
    near = 5.900274409455859e-4 * z - 1.4558343870513183e-3
    near = near * z + 3.5921280365724810e-3
    near = near * z - 8.8632355299021966e-3
    near = near * z + 2.1869488536155203e-2
    near = near * z - 5.3968253968253968e-2
    near = near * z + 0.13333333333333333
    near = near * z - 0.33333333333333333
    near = a + a * z * near
    t = tl.where(a < 0.25, near, far)
    return tl.where(x < 0, -t, t)
