"""torch.compile(fullgraph=True) of the project's GPT with every kernel on, and of a model that
kernels.patch changed: no graph break, and the same loss and gradients as eager (skipped where
this machine cannot compile)."""
import torch
from helpers import compile_fullgraph
from nanogpt import NanoGPT

from tritongpt import kernels
from tritongpt.model import GPT, GPTConfig
from tritongpt.model import gpt


def compiled_matches_eager(model, forward_args, backend="inductor"):
    """One forward (loss = output [1]) and backward, eager then compiled: same loss and gradients."""
    def step(forward):
        model.zero_grad(set_to_none=True)
        loss = forward(*forward_args)[1]
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    (want, want_grads), (got, got_grads) = step(model), step(compile_fullgraph(model, backend))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_gpt_compiles_whole_with_every_kernel_on(device):
    model = GPT(GPTConfig.from_name("tiny", kernels="all")).to(device)
    assert gpt.kernel_ops(model.config, device) == set(gpt.KERNEL_FUNCTIONS)
    idx = torch.randint(0, 512, (2, 16), device=device)
    targets = torch.randint(0, 512, (2, 16), device=device)
    targets[0, :4] = -1
    compiled_matches_eager(model, (idx, targets))


def test_patched_model_compiles_whole(device):
    """The subclasses kernels.patch swaps in trace whole too (aot_eager: the same graph as inductor
    gets, without code generation, to keep the test quick)."""
    model = NanoGPT().to(device)
    assert len(kernels.patch(model).replaced) == 9
    idx = torch.randint(0, 61, (2, 8), device=device)
    compiled_matches_eager(model, (idx, idx.roll(-1, 1)), backend="aot_eager")
