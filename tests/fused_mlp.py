"""The fused GELU MLP's arithmetic written in PyTorch: a second "PyTorch's own error" for gelu_mlp.

Eager PyTorch rounds h = x W1^T + b1 to the input dtype, applies the GELU to that and rounds g
again, and in the backward rounds dg = dy W2 and dh to the dtype too. kernels.gelu_mlp applies the
GELU to its accumulator (an fp32 dot; the GELU in fp64 for fp32 inputs) and rounds g once; it
saves h in the dtype, keeps dg in fp32, forms dh = dg * gelu'(saved h) and rounds it once before
its two matmuls (dx = dh W1, dW1 = dh^T x). This function does the same roundings at the same
points, with every matmul accumulating in fp32 and rounded once. Both algorithms are the same
maths; where a result cancels (y = g W2^T over the hidden units, dW1 = dh^T x over rows that are
all alike) the roundings of g or dh decide its error, and whose happen to cancel is chance (a
bf16 draw: eager 6e-5, g correctly rounded 4.1e-4).
tests/test_properties.py holds the kernel to 2x the worse of eager and this function."""
import torch
import torch.nn.functional as F


class _KernelGelu(torch.autograd.Function):
    """g = gelu(h) rounded to `low` (kept in h's dtype); backward dh = dg * gelu'(h rounded to
    `low`) (the kernel saves h in the dtype), rounded to `low`, as the kernel stores it."""

    @staticmethod
    def forward(ctx, h, low, approximate):
        ctx.save_for_backward(h.to(low).to(h.dtype))
        ctx.low, ctx.approximate = low, approximate
        return F.gelu(h, approximate=approximate).to(low).to(h.dtype)

    @staticmethod
    def backward(ctx, dg):
        (saved,) = ctx.saved_tensors
        with torch.enable_grad():
            h = saved.detach().requires_grad_()
            (dh,) = torch.autograd.grad(F.gelu(h, approximate=ctx.approximate), h, dg.to(h.dtype))
        return dh.to(ctx.low).to(dg.dtype), None, None


def gelu_mlp(x, fc_weight, fc_bias, proj_weight, proj_bias, approximate="tanh"):
    low = x.dtype
    dot = torch.float64 if low == torch.float64 else torch.float32  # the kernel's accumulator
    epilogue = torch.float64 if low in (torch.float32, torch.float64) else torch.float32  # its GELU's

    def wide(t):
        return None if t is None else t.to(dot)

    h = F.linear(wide(x), wide(fc_weight), wide(fc_bias)).to(epilogue)
    g = _KernelGelu.apply(h, low, approximate).to(dot)
    return F.linear(g, wide(proj_weight), wide(proj_bias)).to(low)
