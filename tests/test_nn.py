"""kernels.nn modules: PyTorch's (and nanoGPT's) parameter names, the same maths under the 2x rule
against the plain-PyTorch modules, the kernels really run, and dropout in training mode."""
import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_2x, spy

from tritongpt.kernels import nn as knn, reference


class TorchMLP(torch.nn.Module):
    """The plain-PyTorch MLP GeluMLP stands for (nanoGPT's shape)."""

    def __init__(self, n_embd, approximate):
        super().__init__()
        self.approximate = approximate
        self.c_fc = torch.nn.Linear(n_embd, 4 * n_embd)
        self.c_proj = torch.nn.Linear(4 * n_embd, n_embd)
        self.dropout = torch.nn.Dropout(0.0)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate)))


class TorchAttention(torch.nn.Module):
    """The plain-PyTorch causal self-attention CausalSelfAttention stands for."""

    def __init__(self, n_embd, n_head):
        super().__init__()
        self.n_embd, self.n_head, self.dropout = n_embd, n_head, 0.0
        self.c_attn = torch.nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = torch.nn.Linear(n_embd, n_embd)
        self.resid_dropout = torch.nn.Dropout(0.0)

    def forward(self, x):
        q, k, v = knn.split_heads(self.c_attn(x), self.n_head)
        return self.resid_dropout(self.c_proj(knn.merge_heads(reference.flash_attention(q, k, v))))


def check_module(ours, theirs, x):
    """ours loads theirs' state dict (same keys) and matches it under the 2x rule, output and
    every gradient, with a float64 copy of theirs as the oracle."""
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    oracle = copy.deepcopy(theirs).double()
    with torch.no_grad():
        dy = torch.randn_like(theirs(x))
    results = []
    for module, inp in ((ours, x), (theirs, x), (oracle, x.double())):
        inp = inp.detach().clone().requires_grad_()
        y = module(inp)
        y.backward(dy.to(y.dtype))
        results.append([y, inp.grad] + [p.grad for p in module.parameters()])
    names = ["y", "dx"] + [f"grad {n}" for n, _ in ours.named_parameters()]
    for name, a, b, o in zip(names, *results):
        assert_close_2x(a, b, o, name)


def test_layer_norm_is_an_nn_layer_norm(monkeypatch, device):
    calls = spy(monkeypatch, "layer_norm")
    ours = knn.LayerNorm(48, eps=1e-6, device=device)
    theirs = torch.nn.LayerNorm(48, eps=1e-6, device=device)
    with torch.no_grad():
        theirs.weight.normal_(1, 0.3), theirs.bias.normal_(0, 0.3)
    assert isinstance(ours, torch.nn.LayerNorm) and ours.normalized_shape == (48,) and ours.eps == 1e-6
    check_module(ours, theirs, torch.randn(3, 5, 48, device=device))
    assert calls == ["layer_norm"]
    assert knn.LayerNorm(8, bias=False).bias is None
    with pytest.raises(ValueError, match="one dimension"):
        knn.LayerNorm((4, 8))
    with pytest.raises(ValueError, match="last dimension must be 48"):
        ours(torch.randn(2, 47, device=device))


@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_gelu_mlp_module(approximate, monkeypatch, device):
    calls = spy(monkeypatch, "gelu_mlp")
    torch.manual_seed(1)
    theirs = TorchMLP(32, approximate).to(device)
    check_module(knn.GeluMLP(32, approximate=approximate, device=device), theirs, torch.randn(2, 7, 32, device=device))
    assert calls == ["gelu_mlp"]
    assert knn.GeluMLP(8, n_hidden=5, bias=False).c_fc.weight.shape == (5, 8)
    with pytest.raises(ValueError, match="approximate"):
        knn.GeluMLP(8, approximate="sigmoid")


def test_causal_self_attention_module(monkeypatch, device):
    calls = spy(monkeypatch, "flash_attention")
    torch.manual_seed(2)
    theirs = TorchAttention(32, 2).to(device)
    check_module(knn.CausalSelfAttention(32, 2, device=device), theirs, torch.randn(2, 9, 32, device=device))
    assert calls == ["flash_attention"]
    with pytest.raises(ValueError, match="multiple of n_head"):
        knn.CausalSelfAttention(30, 4)


def test_attention_dropout_in_training_runs_sdpa(monkeypatch, device):
    calls = spy(monkeypatch, "flash_attention")
    attn = knn.CausalSelfAttention(32, 2, dropout=0.5).to(device)
    x = torch.randn(2, 6, 32, device=device)
    torch.manual_seed(4)
    y = attn(x)
    torch.manual_seed(4)
    q, k, v = knn.split_heads(attn.c_attn(x), 2)
    want = F.scaled_dot_product_attention(q, k, v, dropout_p=0.5, is_causal=True)
    torch.testing.assert_close(y, attn.resid_dropout(attn.c_proj(knn.merge_heads(want))))
    assert calls == []
    attn.eval()
    attn(x)
    assert calls == ["flash_attention"]


def test_reference_where_triton_cannot_run(monkeypatch, device):
    """On a device Triton cannot use, the modules run kernels.reference (same maths), no error."""
    monkeypatch.setattr(knn, "triton_runs_on", lambda device: False)
    calls = spy(monkeypatch, "layer_norm")
    ln = knn.LayerNorm(16).to(device)
    x = torch.randn(3, 16, device=device)
    torch.testing.assert_close(ln(x), F.layer_norm(x, (16,), ln.weight, ln.bias), rtol=0, atol=0)
    assert calls == []
