"""torch.compile(fullgraph=True) of the project's GPT with every kernel on: no graph break, and the
same loss and gradients as eager (skipped where this machine cannot compile)."""
import torch
from helpers import compile_fullgraph

from model import GPT, GPTConfig
from model import gpt


def test_gpt_compiles_whole_with_every_kernel_on(device):
    model = GPT(GPTConfig.from_name("tiny", kernels="all")).to(device)
    assert gpt.kernel_ops(model.config, device) == set(gpt.KERNEL_FUNCTIONS)
    idx = torch.randint(0, 512, (2, 16), device=device)
    targets = torch.randint(0, 512, (2, 16), device=device)
    targets[0, :4] = -1

    def step(forward):
        model.zero_grad(set_to_none=True)
        loss = forward(idx, targets)[1]
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    compiled = compile_fullgraph(model)
    (want, want_grads), (got, got_grads) = step(model), step(compiled)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-5, atol=1e-6, msg=name)
