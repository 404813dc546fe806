"""kernels.patch on a transformers GPT-2 and a nanoGPT-style model: same loss and gradients as the
unpatched model (2x rule, float64 oracle), the kernels really run, what it cannot do safely it
leaves alone and reports. Tiny configs: with no GPU the kernels run in Triton's interpreter."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import OPS, check_same_maths, spy_ops

from tritongpt import kernels
from nanogpt import NanoGPT, NanoLayerNorm, NanoMLP

def randomise_norms(model):
    with torch.no_grad():  # LayerNorms start at ones and zeros: make their gradients count
        for name, p in model.named_parameters():
            if "ln" in name:
                p.add_(0.1 * torch.randn_like(p))


# ---------------------------------------------------------------- transformers GPT-2

def hf_model(device, dropout=0.0, **overrides):
    transformers = pytest.importorskip("transformers")  # an optional (test) dependency
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=97, n_positions=16,
                                     resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                                     bos_token_id=0, eos_token_id=0, **overrides)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).to(device)
    randomise_norms(model)
    return model


def hf_run(idx, labels):
    def run(model):
        out = model(idx, labels=labels)
        out.loss.backward()
        return {"loss": out.loss.detach(), "logits": out.logits.detach()}
    return run


def test_hf_gpt2_patched_matches_unpatched(monkeypatch, device):
    baseline = hf_model(device)
    oracle = copy.deepcopy(baseline).double()
    patched = copy.deepcopy(baseline)
    params = {n: id(p) for n, p in patched.named_parameters()}
    keys = list(patched.state_dict())
    report = kernels.patch(patched)
    # the report: every LayerNorm, attention and MLP and the loss, nothing left alone
    replaced = {c.path for c in report.replaced}
    blocks = [f"transformer.h.{i}.{part}" for i in range(2) for part in ("ln_1", "attn", "ln_2", "mlp")]
    assert replaced == set(blocks) | {"transformer.ln_f", ""} and report.left_alone == []
    assert "kernels.gelu_mlp (approximate='tanh')" in str(report)
    assert patched.config._attn_implementation == "tritongpt"
    # same parameters (the very objects), same state-dict keys, same classes underneath
    assert {n: id(p) for n, p in patched.named_parameters()} == params and list(patched.state_dict()) == keys
    assert isinstance(patched.transformer.h[0].mlp, type(baseline.transformer.h[0].mlp))
    calls = spy_ops(monkeypatch)
    idx = torch.randint(0, 97, (2, 12), device=device)
    labels = idx.clone()
    labels[0, :3] = -100
    check_same_maths(patched, baseline, oracle, hf_run(idx, labels))
    assert sorted(set(calls)) == sorted(OPS)
    assert calls.count("flash_attention") == 2 and calls.count("layer_norm") == 5


def patched_pair(baseline, monkeypatch):
    """(a patched copy of baseline, baseline, the list the spied kernels record their calls in)."""
    patched = copy.deepcopy(baseline)
    kernels.patch(patched)
    return patched, baseline, spy_ops(monkeypatch)


def test_hf_padding_mask_runs_the_original_attention(monkeypatch, device):
    patched, baseline, calls = patched_pair(hf_model(device).eval(), monkeypatch)
    idx = torch.randint(0, 97, (2, 8), device=device)
    mask = torch.ones_like(idx)
    mask[0, :3] = 0  # left padding: a mask the kernel does not take
    with torch.no_grad():
        got, want = (m(idx, attention_mask=mask).logits for m in (patched, baseline))
    assert "flash_attention" not in calls and "gelu_mlp" in calls
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_hf_generate_with_kv_cache(monkeypatch, device):
    """Greedy decoding goes through the cache: one query against all cached keys per step."""
    patched, baseline, calls = patched_pair(hf_model(device).eval(), monkeypatch)
    idx = torch.randint(1, 97, (1, 5), device=device)
    steps = [m.generate(idx, max_new_tokens=3, do_sample=False, output_logits=True,
                        return_dict_in_generate=True) for m in (patched, baseline)]
    assert torch.equal(steps[0].sequences, steps[1].sequences)
    for got, want in zip(steps[0].logits, steps[1].logits):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert calls.count("flash_attention") == 2 * 3  # two layers, three steps


@pytest.mark.parametrize("activation, expected", [("gelu", "approximate='none'"), ("relu", "not a GELU")])
def test_hf_other_activations(activation, expected, device):
    model = hf_model(device, activation_function=activation)
    report = kernels.patch(model)
    mlps = [c for c in report if c.path.endswith(".mlp")]
    assert len(mlps) == 2 and all(expected in c.how for c in mlps)
    assert all(c.replaced == (activation == "gelu") for c in mlps)


def test_hf_eager_attention_is_switched_too(monkeypatch, device):
    baseline = hf_model(device, attn_implementation="eager").eval()
    patched, baseline, calls = patched_pair(baseline, monkeypatch)
    assert patched.config._attn_implementation == "tritongpt" and baseline.config._attn_implementation == "eager"
    idx = torch.randint(0, 97, (2, 8), device=device)
    with torch.no_grad():
        got, want = (m(idx).logits for m in (patched, baseline))
    assert calls.count("flash_attention") == 2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_hf_training_with_attention_dropout(monkeypatch, device):
    """Attention dropout in training mode: those calls run transformers' sdpa, with the same random
    numbers, so loss and every gradient equal the unpatched model's."""
    baseline = hf_model(device, dropout=0.1).train()
    patched = copy.deepcopy(baseline)
    report = kernels.patch(patched)
    assert all(c.replaced for c in report if c.path.endswith(".attn"))
    calls = spy_ops(monkeypatch)
    idx = torch.randint(0, 97, (2, 8), device=device)
    outs = []
    for model in (patched, baseline):
        torch.manual_seed(3)
        out = model(idx, labels=idx)
        out.loss.backward()
        outs.append([out.loss, out.logits] + [p.grad for p in model.parameters()])
    assert "flash_attention" not in calls and "gelu_mlp" in calls and "cross_entropy" in calls
    for got, want in zip(*outs):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the same model in eval mode runs the kernel
    with torch.no_grad():
        patched.eval()(idx)
    assert calls.count("flash_attention") == 2


def test_hf_attention_probe_catches_a_wrong_adapter(monkeypatch, device):
    """patch compares the "tritongpt" implementation with the model's own on a prefill and a cached
    decoding step: an attention that loses the causal mask leaves the model as it was."""
    from tritongpt.kernels import reference

    real = reference.flash_attention
    monkeypatch.setattr(reference, "flash_attention", lambda q, k, v, causal=True, sm_scale=None, **features:
                        real(q, k, v, causal=False, sm_scale=sm_scale, **features))
    model = hf_model(device)
    report = kernels.patch(model)
    attn = [c for c in report if c.path.endswith(".attn")]
    assert len(attn) == 2 and not any(c.replaced for c in attn)
    assert any("prefill + one cached step" in c.how for c in attn)
    assert model.config._attn_implementation == "sdpa"


def test_hf_parts_with_another_call_signature_are_left_alone(monkeypatch, device):
    """A newer transformers that adds an argument to a module's forward (or renames the loss's
    arguments) gets a report, not a kernel that would drop the argument."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.gpt2 import modeling_gpt2

    class NewMLP(modeling_gpt2.GPT2MLP):
        def forward(self, hidden_states, scale=1.0):
            return super().forward(hidden_states) * scale

    model = hf_model(device)
    for block in model.transformer.h:
        block.mlp.__class__ = NewMLP
    loss_utils = transformers.loss.loss_utils

    def new_loss(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100, shift_labels=None,
                 reduction="mean", **kwargs):
        return loss_utils.ForCausalLMLoss(logits, labels, vocab_size, num_items_in_batch, ignore_index, shift_labels)

    monkeypatch.setitem(loss_utils.LOSS_MAPPING, "ForCausalLM", new_loss)
    why = {c.path: c.how for c in kernels.patch(model).left_alone}
    assert set(why) == {"transformer.h.0.mlp", "transformer.h.1.mlp", ""}
    assert "scale=1.0" in why["transformer.h.0.mlp"] and "reduction" in why[""]
    assert type(model.transformer.h[0].mlp) is NewMLP


def test_hf_loss_with_other_maths_is_left_alone(monkeypatch, device):
    transformers = pytest.importorskip("transformers")
    loss_utils = transformers.loss.loss_utils

    def unshifted(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100, shift_labels=None,
                  **kwargs):
        return F.cross_entropy(logits.float().view(-1, vocab_size), labels.view(-1), ignore_index=ignore_index)

    monkeypatch.setitem(loss_utils.LOSS_MAPPING, "ForCausalLM", unshifted)
    (loss,) = [c for c in kernels.patch(hf_model(device)) if c.path == ""]
    assert not loss.replaced and "differs from kernels.cross_entropy" in loss.how


def test_patching_twice_changes_nothing_more(device):
    model = hf_model(device)
    kernels.patch(model)
    again = kernels.patch(model)
    assert again.replaced == [] and all("already" in c.how for c in again)
    built = nn.Sequential(kernels.nn.LayerNorm(32), kernels.nn.GeluMLP(32), kernels.nn.CausalSelfAttention(32, 2))
    assert [c.how for c in kernels.patch(built)] == ["already runs the kernels"] * 3
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        kernels.patch("gpt2")


def test_the_projects_own_gpt_is_left_to_its_config():
    from tritongpt.model import GPT, GPTConfig

    model = GPT(GPTConfig.from_name("tiny"))
    (change,) = kernels.patch(model).changes
    assert not change.replaced and "GPTConfig.kernels" in change.how
    assert type(model.transformer.h[0].mlp).__name__ == "MLP"


# ---------------------------------------------------------------- a nanoGPT-style model (tests/nanogpt.py)

def nano(device, **kwargs):
    torch.manual_seed(0)
    model = NanoGPT(**kwargs).to(device)
    randomise_norms(model)
    return model


def nano_run(idx, targets):
    def run(model):
        logits, loss = model(idx, targets)
        loss.backward()
        return {"loss": loss.detach(), "logits": logits.detach()}
    return run


@pytest.mark.parametrize("manual", [False, True], ids=["sdpa", "manual_mask"])
def test_nanogpt_patched_matches_unpatched(manual, monkeypatch, device):
    baseline = nano(device, manual=manual)
    oracle = copy.deepcopy(baseline).double()
    patched = copy.deepcopy(baseline)
    keys = list(patched.state_dict())
    report = kernels.patch(patched)
    parts = ("ln_1", "attn", "ln_2", "mlp")
    assert {c.path for c in report.replaced} == {f"h.{i}.{p}" for i in range(2) for p in parts} | {"ln_f"}
    assert report.left_alone == [] and list(patched.state_dict()) == keys
    calls = spy_ops(monkeypatch)
    idx = torch.randint(0, 61, (2, 12), device=device)
    check_same_maths(patched, baseline, oracle, nano_run(idx, idx.roll(-1, 1)))
    assert calls.count("layer_norm") == 5 and calls.count("gelu_mlp") == 2 and calls.count("flash_attention") == 2


def test_nanogpt_unsupported_parts_are_left_alone_and_reported(monkeypatch, device):
    model = nano(device, act=nn.ReLU(), dropout=0.1)
    model.ln_f._eps = 1e-6  # a LayerNorm whose eps patch cannot see
    report = kernels.patch(model)
    why = {c.path: c.how for c in report.left_alone}
    assert set(why) == {"h.0.mlp", "h.1.mlp", "ln_f"}
    assert "ReLU() is not a GELU" in why["h.0.mlp"] and "float64 probe" in why["ln_f"]
    assert all("attention dropout (p=0.1)" in c.how for c in report.replaced if c.path.endswith("attn"))
    # erf GELU is fused too
    report = kernels.patch(nano(device, act=nn.GELU()))
    assert all("approximate='none'" in c.how for c in report if c.path.endswith("mlp"))
    # training mode with dropout: the attention is nanoGPT's own, random numbers included
    patched, baseline, calls = patched_pair(nano(device, dropout=0.1).train(), monkeypatch)
    idx = torch.randint(0, 61, (2, 8), device=device)
    outs = []
    for m in (patched, baseline):
        torch.manual_seed(5)
        outs.append(m(idx, idx)[0])
    assert "flash_attention" not in calls and calls.count("gelu_mlp") == 2
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_probe_catches_a_different_layout(device):
    """An MLP with c_fc/c_proj whose forward is not Linear -> GELU -> Linear is left alone."""
    class Gated(NanoMLP):
        def forward(self, x):
            return self.c_proj(self.gelu(self.c_fc(x)) * torch.sigmoid(self.c_fc(x)))

    class BiasIgnoredLayerNorm(NanoLayerNorm):  # at init its bias is zeros: only random weights show it
        def forward(self, x):
            return F.layer_norm(x, self.weight.shape, self.weight, None, 1e-5)

    model = nn.Sequential(Gated(32, 0.0, nn.GELU(approximate="tanh")), BiasIgnoredLayerNorm(32)).to(device)
    changes = kernels.patch(model).changes
    assert [c.replaced for c in changes] == [False, False]
    assert all("differs from the kernel's maths" in c.how for c in changes)
    assert type(model[0]) is Gated and type(model[1]) is BiasIgnoredLayerNorm
