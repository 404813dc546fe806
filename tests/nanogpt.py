"""A nanoGPT-style model written for the tests (kernels.patch must recognise models it has never
seen): nanoGPT's LayerNorm with an optional bias, causal self-attention through SDPA or an explicit
mask buffer, an MLP with a chosen activation, and the loss computed inline."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class NanoLayerNorm(nn.Module):
    """nanoGPT's LayerNorm: optional bias, eps fixed (1e-5 unless told)."""

    def __init__(self, ndim, bias=True, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None
        self._eps = eps

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self._eps)


class NanoAttention(nn.Module):
    def __init__(self, C, n_head, dropout, manual=False):
        super().__init__()
        self.c_attn = nn.Linear(C, 3 * C)
        self.c_proj = nn.Linear(C, C)
        self.attn_dropout = nn.Dropout(dropout)
        self.resid_dropout = nn.Dropout(dropout)
        self.n_head, self.n_embd, self.dropout = n_head, C, dropout
        self.manual = manual
        if manual:  # nanoGPT's path without SDPA: an explicit causal-mask buffer
            self.register_buffer("bias", torch.tril(torch.ones(16, 16)).view(1, 1, 16, 16))

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in self.c_attn(x).split(self.n_embd, dim=2))
        if self.manual:
            att = (q @ k.transpose(-2, -1)) * k.shape[-1] ** -0.5
            att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
            y = self.attn_dropout(F.softmax(att, dim=-1)) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0,
                                               is_causal=True)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C)))


class NanoMLP(nn.Module):
    def __init__(self, C, dropout, act):
        super().__init__()
        self.c_fc = nn.Linear(C, 4 * C)
        self.gelu = act
        self.c_proj = nn.Linear(4 * C, C)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class NanoBlock(nn.Module):
    def __init__(self, C, n_head, dropout, act, manual):
        super().__init__()
        self.ln_1 = NanoLayerNorm(C)
        self.attn = NanoAttention(C, n_head, dropout, manual)
        self.ln_2 = NanoLayerNorm(C, bias=False)
        self.mlp = NanoMLP(C, dropout, act)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    def __init__(self, V=61, C=32, n_head=2, n_layer=2, dropout=0.0, act=None, manual=False):
        super().__init__()
        self.wte = nn.Embedding(V, C)
        self.wpe = nn.Embedding(16, C)
        self.h = nn.ModuleList(NanoBlock(C, n_head, dropout, act or nn.GELU(approximate="tanh"), manual)
                               for _ in range(n_layer))
        self.ln_f = NanoLayerNorm(C)
        self.lm_head = nn.Linear(C, V, bias=False)
        self.wte.weight = self.lm_head.weight

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return logits, F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1), ignore_index=-1)
