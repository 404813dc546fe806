"""A few-second live check of the Triton kernels against kernels.reference, on this machine.

    python -m tritongpt.trainer.kernel_check                # on CUDA: compiled kernels on the GPU
    TRITON_INTERPRET=1 python -m tritongpt.trainer.kernel_check   # on CPU: Triton's interpreter

Each op runs forward and backward at a tiny, awkward shape (sizes not multiples of a block) in
float32; the kernel's largest difference from the reference, over the output and every gradient,
must be below a float32 tolerance. One line per op; exit status 1 if any op disagrees. train.py
runs it in a subprocess (TRITON_INTERPRET=1 set there on a CPU) before the demo trains.
"""
import os
import subprocess
import sys

import torch

TOLERANCE = 1e-4


def cases(device):
    """op name -> (inputs, kernel function name); the reference has the same name and signature."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(device).requires_grad_()

    targets = torch.randint(0, 37, (6,), generator=g).to(device)
    return {
        "layer_norm": ("layer_norm", (rand(5, 40), rand(40), rand(40))),
        "attention": ("flash_attention", (rand(1, 2, 19, 16), rand(1, 2, 19, 16), rand(1, 2, 19, 16))),
        "mlp": ("gelu_mlp", (rand(7, 24), rand(40, 24, scale=0.2), rand(40), rand(24, 40, scale=0.2), rand(24))),
        "cross_entropy": ("cross_entropy", (rand(6, 37), targets)),
    }


def max_difference(kernel, reference, inputs):
    """Largest absolute difference of output and input gradients between two implementations."""
    results = []
    for fn in (kernel, reference):
        leaves = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
        out = fn(*leaves)
        out.backward(torch.ones_like(out) if out.dim() else None)
        results.append([out.detach()] + [x.grad for x in leaves if x.requires_grad])
    return max((a - b).abs().max().item() for a, b in zip(*results))


def check(device):
    """[(op, max difference)] for every kernel on `device`."""
    from tritongpt import kernels
    from tritongpt.kernels import reference
    return [(op, max_difference(getattr(kernels, name), getattr(reference, name), inputs))
            for op, (name, inputs) in cases(device).items()]


def run_in_subprocess(device, timeout=120):
    """Run this module for `device` in a fresh process (TRITON_INTERPRET=1 there on a CPU, which
    must be set before Triton is imported); returns (ok, output lines)."""
    env = dict(os.environ)
    if device.type == "cpu":
        env["TRITON_INTERPRET"] = "1"
    try:
        done = subprocess.run([sys.executable, "-m", "tritongpt.trainer.kernel_check", str(device)],
                              env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, [f"kernel check: no answer within {timeout} s"]
    lines = done.stdout.strip().splitlines() or done.stderr.strip().splitlines()[-1:]
    return done.returncode == 0, lines


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    device = torch.device(argv[0] if argv else ("cuda" if torch.cuda.is_available() else "cpu"))
    where = "Triton interpreter, CPU" if os.environ.get("TRITON_INTERPRET") == "1" else f"compiled, {device}"
    ok = True
    for op, diff in check(device):
        good = diff <= TOLERANCE
        ok &= good
        print(f"kernel check ({where}): {op:13s} max |kernel - reference| = {diff:.1e} "
              f"(fwd+bwd, fp32) {'ok' if good else 'MISMATCH'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
