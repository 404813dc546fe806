"""Tests of model/gpt.py: presets, kernel selection, kernels-on vs -off under the 2x rule, loss,
init, loading Hugging Face GPT-2 checkpoints and generation. Shapes are tiny: with no GPU the
kernels run in Triton's interpreter."""
import copy
import json
import sys

import pytest
import torch

from tritongpt import kernels
from tritongpt.model import GPT, GPTConfig
from tritongpt.model import gpt
from helpers import assert_close_2x, spy

TINY = GPTConfig.from_name("tiny")


def tiny(device="cpu", **overrides):
    return GPT(GPTConfig.from_name("tiny", **overrides)).to(device)


def batch(device="cpu", B=2, T=24):
    idx = torch.randint(0, TINY.vocab_size, (B, T), device=device)
    return idx, torch.randint(0, TINY.vocab_size, (B, T), device=device)


# ---------------------------------------------------------------- config and presets

@pytest.mark.parametrize("name, shape", [("gpt2", (12, 12, 768)), ("gpt2-medium", (24, 16, 1024)),
                                         ("gpt2-large", (36, 20, 1280)), ("gpt2-xl", (48, 25, 1600)),
                                         ("tiny", (2, 2, 64))])
def test_preset_shapes_and_param_counts(name, shape):
    config = GPTConfig.from_name(name)
    assert (config.n_layer, config.n_head, config.n_embd) == shape
    with torch.device("meta"):
        model = GPT(config)
    V, T, L, C = config.vocab_size, config.block_size, config.n_layer, config.n_embd
    # wte (shared with lm_head) + wpe + per block: 2 LayerNorms, c_attn, attn c_proj, c_fc, mlp
    # c_proj = 12C^2 + 13C + ln_f
    expected = V * C + T * C + L * (12 * C * C + 13 * C) + 2 * C
    assert model.num_params(non_embedding=False) == expected
    assert model.num_params() == expected - T * C


def test_gpt2_has_124m_params():
    with torch.device("meta"):
        model = GPT(GPTConfig.from_name("gpt2"))
    assert model.num_params(non_embedding=False) == 124_439_808
    assert GPTConfig.from_name("gpt2") == GPTConfig()


def test_from_name_errors():
    with pytest.raises(ValueError, match="gpt3"):
        GPTConfig.from_name("gpt3")
    with pytest.raises(ValueError, match="n_layers"):
        GPTConfig.from_name("tiny", n_layers=3)
    assert GPTConfig.from_name("tiny", n_layer=3, dropout=0.1).n_layer == 3


@pytest.mark.parametrize("overrides, field", [
    (dict(n_embd=65), "n_embd"), (dict(n_layer=0), "n_layer"), (dict(vocab_size=-1), "vocab_size"),
    (dict(block_size=2.0), "block_size"), (dict(n_head=True), "n_head"), (dict(dropout=1.0), "dropout"),
    (dict(dropout=-0.1), "dropout"), (dict(bias=1), "bias"), (dict(kernels="fast"), "fast"),
    (dict(kernels="layer_norm,softmax"), "softmax"), (dict(kernels=""), "kernel"),
    (dict(kernels="all,layer_norm"), "all"), (dict(kernels=None), "kernels"),
])
def test_config_validation(overrides, field):
    with pytest.raises(ValueError, match=field):
        GPTConfig.from_name("tiny", **overrides)


def test_layer_norm_kernel_is_available():
    # The kernel-vs-reference tests below run once per available kernel; make sure they do run.
    assert "layer_norm" in gpt.available_kernels()


def test_mlp_kernel_is_available_and_used_only_when_selected(monkeypatch, device):
    # test_kernels_match_reference_2x_rule below then compares the model with kernels="mlp" to "none".
    assert "mlp" in gpt.available_kernels()
    calls = spy(monkeypatch, "gelu_mlp", kernels.gelu_mlp)
    idx, targets = batch(device)
    tiny(device, kernels="layer_norm")(idx, targets)
    assert calls == []
    tiny(device, kernels="mlp")(idx, targets)
    assert calls == ["gelu_mlp"] * TINY.n_layer


def test_cross_entropy_kernel_fuses_the_lm_head(monkeypatch, device):
    """With the cross_entropy kernel on and targets given, the loss comes from linear_cross_entropy
    on the final hidden state with the tied lm_head weight, and no logits are returned."""
    seen = []
    real = kernels.linear_cross_entropy

    def fused(x, weight, targets, **kwargs):
        seen.append((x.shape, weight, kwargs))
        return real(x, weight, targets, **kwargs)

    monkeypatch.setattr(kernels, "linear_cross_entropy", fused)
    ce_calls = spy(monkeypatch, "cross_entropy", kernels.cross_entropy)
    model = tiny(device, kernels="cross_entropy")
    idx, targets = batch(device)
    logits, loss = model(idx, targets)
    assert logits is None and loss.shape == () and ce_calls == []
    assert len(seen) == 1 and seen[0][0] == (idx.numel(), TINY.n_embd)
    assert seen[0][1] is model.lm_head.weight and seen[0][2] == {"ignore_index": -1}
    assert model(idx)[0].shape == (*idx.shape, TINY.vocab_size) and len(seen) == 1
    off = tiny(device, kernels="layer_norm")
    off.load_state_dict(model.state_dict())
    assert off(idx, targets)[0] is not None and len(seen) == 1


def test_unavailable_kernel_is_refused(monkeypatch, device):
    monkeypatch.delattr(kernels, "layer_norm")
    with pytest.raises(ValueError, match="kernel 'layer_norm' is not implemented yet; available: "):
        GPTConfig(kernels="layer_norm")
    assert "layer_norm" not in gpt.kernel_ops(GPTConfig(kernels="all"), device)


def test_attention_kernel_is_not_used_with_dropout(monkeypatch, device):
    calls = spy(monkeypatch, "flash_attention", kernels.reference.flash_attention)
    assert "attention" in gpt.kernel_ops(GPTConfig(kernels="all"), device)
    assert "attention" not in gpt.kernel_ops(GPTConfig(kernels="all", dropout=0.1), device)
    assert "attention" not in gpt.kernel_ops(GPTConfig(kernels="auto", dropout=0.1), device)
    with pytest.raises(ValueError, match="dropout"):
        GPTConfig(kernels="attention", dropout=0.1)
    tiny(device, kernels="attention")(batch(device)[0])
    assert calls == ["flash_attention"] * TINY.n_layer


def test_kernels_are_called_only_when_selected(monkeypatch, device):
    calls = spy(monkeypatch, "layer_norm", kernels.layer_norm)
    idx, targets = batch(device)
    tiny(device, kernels="none")(idx, targets)
    assert calls == []
    tiny(device, kernels="layer_norm")(idx, targets)
    assert len(calls) == 2 * TINY.n_layer + 1


def test_without_triton_auto_is_the_reference_and_explicit_kernels_raise(monkeypatch, device):
    monkeypatch.setattr(gpt, "triton_runs_on", lambda device: False)
    calls = spy(monkeypatch, "layer_norm", kernels.layer_norm)
    idx, targets = batch(device)
    ref = tiny(device, kernels="none")
    auto = tiny(device)
    auto.load_state_dict(ref.state_dict())
    for actual, expected in zip(auto(idx, targets), ref(idx, targets)):
        assert torch.equal(actual, expected)
    assert calls == []
    for spec in ("layer_norm", "all"):
        model = tiny(device, kernels=spec)  # building is fine; the forward decides by device
        with pytest.raises(ValueError, match="cannot run"):
            model(idx)


# ---------------------------------------------------------------- forward, loss, init

def forward_backward(model, idx, targets):
    """logits (from a call without targets: with the cross_entropy kernel on, a call with targets
    returns none), loss and every parameter gradient of one forward and backward, by name."""
    with torch.no_grad():
        logits = model(idx)[0]
    loss = model(idx, targets)[1]
    loss.backward()
    out = {"logits": logits, "loss": loss.detach()}
    out.update((f"grad {name}", p.grad) for name, p in model.named_parameters())
    return out


def each_kernel():
    """Every op of KERNEL_FUNCTIONS, skipped while its kernel is not built, and "all"."""
    return [pytest.param(op, marks=pytest.mark.skipif(op not in gpt.available_kernels(),
                                                      reason=f"kernel {op!r} not built yet"))
            for op in gpt.KERNEL_FUNCTIONS] + ["all"]


@pytest.mark.parametrize("spec", each_kernel())
def test_kernels_match_reference_2x_rule(spec, device):
    ref = tiny(device, kernels="none")
    with torch.no_grad():  # random LayerNorm weights and biases, not GPT-2's ones and zeros
        for name, p in ref.named_parameters():
            if ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    oracle = copy.deepcopy(ref).double()
    model = tiny(device, kernels=spec)
    model.load_state_dict(ref.state_dict())
    idx, targets = batch(device)
    targets[0, :5] = -1
    actual, baseline, expected = (forward_backward(m, idx, targets) for m in (model, ref, oracle))
    assert actual.keys() == baseline.keys()
    for name in actual:
        assert_close_2x(actual[name], baseline[name], expected[name], f"kernels={spec!r} {name}")


def test_torch_compile_matches_eager(device):
    """torch.compile traces the model with the attention kernel on (a torch.library custom op; the
    reference model while the kernel is not built) into one graph, with eager's loss and gradients.
    On CPU aot_eager traces the same graphs without Inductor's C++ build (minutes there)."""
    torch._dynamo.reset()
    spec = "attention" if "attention" in gpt.available_kernels() else "none"
    model = tiny(device, kernels=spec)
    idx, targets = batch(device)
    eager = forward_backward(model, idx, targets)
    model.zero_grad(set_to_none=True)
    backend = "inductor" if device.type == "cuda" else "aot_eager"
    loss = torch.compile(model, backend=backend, fullgraph=True)(idx, targets)[1]
    loss.backward()
    torch.testing.assert_close(loss.detach(), eager["loss"])
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, eager[f"grad {name}"], msg=name)


def test_targets_of_minus_one_are_ignored(device):
    model = tiny(device)
    idx, targets = batch(device)
    targets[:, ::3] = -1
    loss = model(idx, targets)[1]
    logits = model(idx)[0]
    kept = targets != -1
    logp = torch.log_softmax(logits.detach().double(), dim=-1)[kept]
    expected = -logp.gather(1, targets[kept].unsqueeze(1)).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=0)
    assert model(idx)[1] is None


@pytest.mark.parametrize("bad, error", [
    (lambda idx, t: (idx.float(), None), TypeError), (lambda idx, t: (idx.int(), None), TypeError),
    (lambda idx, t: (idx[0], None), ValueError), (lambda idx, t: (idx[:, :0], None), ValueError),
    (lambda idx, t: (torch.zeros(1, TINY.block_size + 1, dtype=torch.long), None), ValueError),
    (lambda idx, t: (idx, t[:, 1:]), ValueError), (lambda idx, t: (idx, t.int()), TypeError),
])
def test_forward_rejects_bad_input(bad, error):
    model = tiny(kernels="none")
    with pytest.raises(error, match="idx|targets"):
        model(*bad(*batch()))


def test_weight_tying_and_state_dict_keys_in_every_mode():
    models = {spec: tiny(kernels=spec) for spec in ["none", "auto", "all"] + gpt.available_kernels()}
    keys = list(models["none"].state_dict())
    for model in models.values():
        assert model.lm_head.weight is model.transformer.wte.weight
        assert [(k, v.shape) for k, v in model.state_dict().items()] == \
               [(k, v.shape) for k, v in models["none"].state_dict().items()]
    for key in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.h.1.ln_1.bias",
                "transformer.h.1.attn.c_attn.weight", "transformer.h.1.mlp.c_proj.bias",
                "transformer.ln_f.weight", "lm_head.weight"):
        assert key in keys
    assert len(keys) == 2 + TINY.n_layer * 12 + 2 + 1
    no_bias = tiny(kernels="none", bias=False)
    assert not [k for k in no_bias.state_dict() if k.endswith(".bias")]
    assert no_bias(batch()[0])[0].shape == (2, 24, TINY.vocab_size)


def test_init_is_gpt2s():
    model = GPT(GPTConfig(n_layer=8, n_head=4, n_embd=256, block_size=64, vocab_size=512, kernels="none"))

    def std(suffix):
        return torch.cat([p.flatten() for n, p in model.named_parameters() if n.endswith(suffix)]).std().item()

    assert std("c_proj.weight") == pytest.approx(0.02 / 4, rel=0.01)  # 0.02 / sqrt(2 * n_layer)
    for suffix in ("c_attn.weight", "c_fc.weight", "wte.weight"):
        assert std(suffix) == pytest.approx(0.02, rel=0.01)
    for name, p in model.named_parameters():
        if name.endswith(".bias"):
            assert torch.all(p == 0), name
        elif ".ln_" in name:
            assert torch.all(p == 1), name


def test_dropout_is_random_in_training_only():
    model = tiny(kernels="none", dropout=0.2)
    idx = batch()[0]
    model.eval()
    assert torch.equal(model(idx)[0], model(idx)[0])
    model.train()
    assert not torch.equal(model(idx)[0], model(idx)[0])


# ---------------------------------------------------------------- from_pretrained

HF_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def write_hf_checkpoint(model, directory, prefix="transformer.", fmt="safetensors", with_head=False,
                        **config):
    """Save model as Hugging Face's GPT-2 would: Conv1D weights (in, out), causal-mask buffers."""
    c = model.config
    hf_config = dict(model_type="gpt2", n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd,
                     n_positions=c.block_size, vocab_size=c.vocab_size, layer_norm_epsilon=1e-5,
                     activation_function="gelu_new")
    (directory / "config.json").write_text(json.dumps({**hf_config, **config}))
    state = {}
    for key, tensor in model.state_dict().items():
        name = key if key == "lm_head.weight" else prefix + key.removeprefix("transformer.")
        state[name] = (tensor.t() if key.endswith(HF_CONV1D) else tensor).contiguous().clone()
    if not with_head:
        del state["lm_head.weight"]
    for i in range(c.n_layer):
        state[f"{prefix}h.{i}.attn.bias"] = torch.ones(1, 1, c.block_size, c.block_size).tril()
    if fmt == "safetensors":
        from safetensors.torch import save_file
        save_file(state, str(directory / "model.safetensors"))
    else:
        torch.save(state, directory / "pytorch_model.bin")
    return state


@pytest.mark.parametrize("prefix, fmt, with_head", [("transformer.", "safetensors", False),
                                                     ("", "safetensors", False),
                                                     ("transformer.", "bin", True)])
def test_from_pretrained_reproduces_the_saved_model(tmp_path, prefix, fmt, with_head):
    original = tiny(kernels="none")
    write_hf_checkpoint(original, tmp_path, prefix, fmt, with_head)
    loaded = GPT.from_pretrained(tmp_path, kernels="none", dropout=0.1).eval()
    assert loaded.config == GPTConfig.from_name("tiny", kernels="none", dropout=0.1)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    idx, targets = batch()
    for actual, expected in zip(loaded(idx, targets), original(idx, targets)):
        assert torch.equal(actual, expected)


def test_from_pretrained_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=64, vocab_size=512,
                                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    with torch.no_grad():  # HF inits LayerNorms and biases to constants; make every weight count
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    model = GPT.from_pretrained(tmp_path, kernels="none").eval()
    idx = batch()[0]
    with torch.no_grad():
        out = hf(idx, labels=idx)
    # HF shifts labels inside; the same loss here is next-token targets, the last one ignored.
    targets = torch.cat([idx[:, 1:], torch.full_like(idx[:, :1], -1)], dim=1)
    logits, loss = model(idx, targets)
    torch.testing.assert_close(logits, out.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(loss, out.loss, rtol=0, atol=1e-5)


def test_from_pretrained_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no stray directory named like a preset
    model = tiny(kernels="none")
    good = tmp_path / "good"
    good.mkdir()
    write_hf_checkpoint(model, good)
    with pytest.raises(ValueError, match="block_size"):
        GPT.from_pretrained(good, block_size=32)
    with pytest.raises(ValueError, match="not-a-model"):
        GPT.from_pretrained("not-a-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        GPT.from_pretrained(tmp_path / "empty")
    only_config = tmp_path / "only_config"
    only_config.mkdir()
    (only_config / "config.json").write_text((good / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="model.safetensors or pytorch_model.bin"):
        GPT.from_pretrained(only_config)

    cases = {"missing": ({"drop": "h.1.ln_2.weight"}, "h.1.ln_2.weight"),
             "unexpected": ({"add": "h.0.attn.c_attn.scale"}, "h.0.attn.c_attn.scale"),
             "shape": ({"config": dict(n_positions=32)}, "transformer.wpe.weight"),
             "eps": ({"config": dict(layer_norm_epsilon=1e-6)}, "layer_norm_epsilon"),
             "untied": ({"head": True}, "lm_head")}
    for name, (change, message) in cases.items():
        directory = tmp_path / name
        directory.mkdir()
        state = write_hf_checkpoint(model, directory, with_head=change.get("head", False),
                                    **change.get("config", {}))
        if "head" in change:
            state["lm_head.weight"] = state["lm_head.weight"] + 1
        if "drop" in change:
            del state["transformer." + change["drop"]]
        if "add" in change:
            state["transformer." + change["add"]] = torch.zeros(1)
        from safetensors.torch import save_file
        save_file(state, str(directory / "model.safetensors"))
        with pytest.raises(ValueError, match=message):
            GPT.from_pretrained(directory)


def test_from_pretrained_preset_without_huggingface_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # makes the import fail
    with pytest.raises(ImportError, match="pip install huggingface_hub"):
        GPT.from_pretrained("gpt2")


def test_from_pretrained_preset_downloads_openai_repo(tmp_path, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    monkeypatch.chdir(tmp_path)
    original = tiny(kernels="none")
    write_hf_checkpoint(original, tmp_path)
    asked = []

    def fake_download(repo_id, **kwargs):  # nothing is downloaded in tests
        asked.append(repo_id)
        return str(tmp_path)

    monkeypatch.setattr(hub, "snapshot_download", fake_download)
    loaded = GPT.from_pretrained("gpt2-medium", kernels="none")
    assert asked == ["openai-community/gpt2-medium"]
    idx = batch()[0]
    assert torch.equal(loaded(idx)[0], original(idx)[0])


# ---------------------------------------------------------------- generate

def greedy(model, idx, steps):
    for _ in range(steps):
        next_id = model(idx[:, -model.config.block_size:])[0][:, -1].argmax(-1, keepdim=True)
        idx = torch.cat([idx, next_id], dim=1)
    return idx


def test_generate_length_and_greedy_top_k():
    model = tiny(kernels="none").eval()
    idx = batch(T=5)[0]
    out = model.generate(idx, 6, temperature=0.7)
    assert out.shape == (2, 11) and torch.equal(out[:, :5], idx)
    assert out.min() >= 0 and out.max() < TINY.vocab_size
    with torch.no_grad():
        expected = greedy(model, idx, 6)
    assert torch.equal(model.generate(idx, 6, top_k=1), expected)
    assert model.generate(idx, 2, top_k=10 * TINY.vocab_size).shape == (2, 7)  # top_k clamps
    assert torch.equal(model.generate(idx, 0), idx)


def test_generate_crops_context_to_block_size():
    model = tiny(kernels="none").eval()
    idx = batch(T=TINY.block_size + 10)[0]
    out = model.generate(idx, 3, top_k=1)
    assert out.shape == (2, TINY.block_size + 13)
    assert torch.equal(out[:, 10:], model.generate(idx[:, 10:], 3, top_k=1))


@pytest.mark.parametrize("kwargs", [dict(temperature=0.0), dict(temperature=-1.0),
                                    dict(temperature=float("inf")), dict(temperature=float("nan")),
                                    dict(top_k=0), dict(top_k=2.5), dict(max_new_tokens=-1),
                                    dict(use_cache=1)])
def test_generate_rejects_bad_arguments(kwargs):
    model = tiny(kernels="none")
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        model.generate(batch(T=3)[0], **{"max_new_tokens": 2, **kwargs})


@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_rejects_bad_idx(use_cache):
    model = tiny(kernels="none")
    idx = batch(T=3)[0]
    for bad, error in ((idx.float(), TypeError), (idx[0], ValueError), (idx[:, :0], ValueError)):
        with pytest.raises(error, match="idx"):
            model.generate(bad, 2, use_cache=use_cache)


# ---------------------------------------------------------------- KV cache

def record_attention(monkeypatch, spec):
    """Wrap the attention op the model uses with `spec` ("none": gpt._sdpa, "attention": the kernel,
    or the reference standing in for it while it is not built); returns the list of (Tq, Tk)."""
    seen = []
    name, module = ("_sdpa", gpt) if spec == "none" else ("flash_attention", kernels)
    real = getattr(module, name, kernels.reference.flash_attention)

    def wrapper(q, k, v, *args, **kwargs):
        seen.append((q.shape[2], k.shape[2]))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(module, name, wrapper, raising=False)
    return seen


def cached_steps(prompt, new, block_size, n_layer):
    """The (Tq, Tk) of every attention call of a cached generate: a prefill of the prompt, then one
    query against the cache per token while the sequence fits block_size, then a prefill of the
    last block_size tokens per token."""
    first = min(prompt, block_size)
    steps = [(first, first)] + [(block_size, block_size) if total > block_size else (1, total)
                                for total in range(prompt + 1, prompt + new)]
    return [step for step in steps for _ in range(n_layer)]


@pytest.mark.parametrize("prompt, new", [(5, 16), (20, 3)])
def test_kv_cache_steps_and_tokens_match_no_cache(monkeypatch, prompt, new):
    """float64, kernels "none": sampled (not only greedy) tokens are the same with and without the
    cache from the same seed, across block_size, and the cache runs one query per new token."""
    model = tiny(kernels="none", block_size=16).double().eval()
    idx = batch(T=prompt)[0]
    seen = record_attention(monkeypatch, "none")
    torch.manual_seed(1)
    cached = model.generate(idx, new, temperature=0.8, top_k=40)
    assert seen == cached_steps(prompt, new, 16, TINY.n_layer)
    torch.manual_seed(1)
    assert torch.equal(cached, model.generate(idx, new, temperature=0.8, top_k=40, use_cache=False))
    assert seen[len(seen) // 2:] == [(min(t, 16), min(t, 16)) for t in range(prompt, prompt + new)
                                     for _ in range(TINY.n_layer)]


def test_kv_cache_logits_match_full_forward():
    """Teacher-forced through a sequence longer than block_size, each cached step's logits equal
    the full forward's last-position logits (absolute positions, end-aligned mask) in float64."""
    model = tiny(kernels="none", block_size=16).double().eval()
    tokens = batch(T=24)[0]
    lengths = assert_cached_steps_match_full_forward(model, tokens, block_size=16)
    assert lengths == [min(t, 16) for t in range(3, tokens.shape[1] + 1)]


def assert_cached_steps_match_full_forward(model, tokens, block_size):
    """Teacher-force tokens through generate's cache from 3 tokens on: each step's logits equal the
    full forward's last-position logits over the last block_size tokens (float64). Returns the
    first layer's cache length after each step."""
    caches, lengths = None, []
    with torch.no_grad():
        for t in range(3, tokens.shape[1] + 1):
            logits, caches = model._next_logits(tokens[:, :t], caches)
            expected = model(tokens[:, max(0, t - block_size):t])[0][:, -1]
            torch.testing.assert_close(logits, expected, rtol=1e-12, atol=1e-12, msg=f"step {t}")
            lengths.append(caches[0].length)
    return lengths


def test_kv_cache_with_the_attention_kernel(monkeypatch, device):
    """The attention kernel (or, before it is built, the reference in its place) runs every cached
    step, with one query against the cache, and greedy tokens match the uncached model's."""
    seen = record_attention(monkeypatch, "attention")
    model = tiny(device, kernels="attention", block_size=16).eval()
    idx = batch(device, T=5)[0]
    cached = model.generate(idx, 14, top_k=1)
    assert seen == cached_steps(5, 14, 16, TINY.n_layer)
    reference = tiny(device, kernels="none", block_size=16).eval()
    reference.load_state_dict(model.state_dict())
    assert torch.equal(cached, reference.generate(idx, 14, top_k=1, use_cache=False))


def test_sdpa_path_aligns_the_causal_mask_to_the_end():
    q, k, v = (torch.randn(1, 2, t, 8, dtype=torch.float64) for t in (3, 7, 7))
    expected = torch.stack([torch.softmax(q[..., i:i + 1, :] @ k[..., :i + 5, :].transpose(-1, -2)
                                          / 8 ** 0.5, dim=-1) @ v[..., :i + 5, :]
                            for i in range(3)], dim=2).squeeze(3)
    torch.testing.assert_close(gpt._sdpa(q, k, v, 0.0), expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="dropout"):
        gpt._sdpa(q, k, v, 0.1)


def test_generate_keeps_no_cache_with_dropout_in_training(monkeypatch):
    seen = record_attention(monkeypatch, "none")
    model = tiny(kernels="none", dropout=0.1, block_size=16).train()
    assert model.generate(batch(T=5)[0], 4).shape == (2, 9)
    assert seen == [(t, t) for t in range(5, 9) for _ in range(TINY.n_layer)]


# ---------------------------------------------------------------- document masking

SEP = 7  # the tiny vocabulary has no <|endoftext|> (50256): these tests name their own separator


def documents(device="cpu", B=2, T=24, starts=(0, 9, 17)):
    """idx (B, T) whose rows hold documents starting (with SEP) at `starts`, no other SEP, and
    random targets: build-nanogpt's layout, each document prefixed by the separator."""
    idx, targets = batch(device, B, T)
    idx[idx == SEP] = SEP + 1
    idx[:, list(starts)] = SEP
    return idx, targets


def doc_model(device="cpu", **overrides):
    return tiny(device, doc_mask=True, doc_sep_token=SEP, **overrides)


def test_doc_mask_is_off_by_default_and_validated():
    assert GPTConfig().doc_mask is False and GPTConfig().doc_sep_token == 50256
    assert GPTConfig.from_name("gpt2").doc_mask is False
    GPTConfig.from_name("tiny", doc_sep_token=50256)  # unchecked against the vocabulary while off
    for overrides, field in [(dict(doc_mask=1), "doc_mask"), (dict(doc_sep_token=-1), "doc_sep_token"),
                             (dict(doc_sep_token=3.0), "doc_sep_token"),
                             (dict(doc_mask=True), "doc_sep_token .50256. must be a token id below vocab_size")]:
        with pytest.raises(ValueError, match=field):
            GPTConfig.from_name("tiny", **overrides)


def test_document_ids_start_at_the_separator():
    """build-nanogpt prefixes each document with <|endoftext|>: the separator opens its document."""
    idx = torch.tensor([[5, 9, 50256, 3, 4, 50256, 50256, 8], [50256, 1, 2, 3, 50256, 4, 5, 6]])
    assert gpt.document_ids(idx, 50256).tolist() == [[0, 0, 1, 1, 1, 2, 3, 3], [1, 1, 1, 1, 2, 2, 2, 2]]


def record_doc_ids(monkeypatch, spec):
    """The doc_ids argument of every attention call of a model built with `spec`."""
    seen = []
    name = "_sdpa" if spec == "none" else "_flash_attention"
    real = getattr(gpt, name)

    def wrapper(q, k, v, dropout_p, doc_ids=None):
        seen.append(doc_ids)
        return real(q, k, v, dropout_p, doc_ids)

    monkeypatch.setattr(gpt, name, wrapper)
    # select_ops picks the function when called, from the module's globals: the wrapper is used
    return seen


@pytest.mark.parametrize("spec", ["none", "attention"])
def test_default_model_passes_no_document_ids(monkeypatch, spec, device):
    seen = record_doc_ids(monkeypatch, spec)
    tiny(device, kernels=spec)(documents(device)[0])
    assert seen == [None] * TINY.n_layer
    doc_model(device, kernels=spec)(documents(device)[0])
    assert len(seen) == 2 * TINY.n_layer and all(ids is not None for ids in seen[TINY.n_layer:])


@pytest.mark.parametrize("spec", ["none", "attention"])
def test_a_token_cannot_see_a_previous_document(spec, device):
    """Changing a token of document 1 leaves the logits of documents 0 and 2 as they were (the
    separator that opens document 2 included), with the kernel and with the reference; without
    doc_mask the same change reaches every later position."""
    masked = doc_model(device, kernels=spec).eval()
    plain = tiny(device, kernels=spec).eval()
    plain.load_state_dict(masked.state_dict())
    idx = documents(device)[0]
    changed = idx.clone()
    changed[:, 12] = (changed[:, 12] + 1) % TINY.vocab_size
    changed[changed == SEP] = SEP + 1
    changed[:, [0, 9, 17]] = SEP
    assert (changed != idx).sum() == 2  # one token of document 1 per row
    with torch.no_grad():
        before, after = masked(idx)[0], masked(changed)[0]
        plain_before, plain_after = plain(idx)[0], plain(changed)[0]
    others = [*range(9), *range(17, 24)]
    torch.testing.assert_close(after[:, others], before[:, others], rtol=0, atol=1e-6)
    assert (after[:, 12:17] - before[:, 12:17]).abs().amax() > 1e-3  # document 1 did change
    assert (plain_after[:, 17:] - plain_before[:, 17:]).abs().amax() > 1e-3  # no mask: it leaks


def test_doc_mask_kernels_match_reference_2x_rule(device):
    """Every kernel on vs off with doc_mask, under the 2x rule, rows of several documents."""
    ref = doc_model(device, kernels="none")
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    oracle = copy.deepcopy(ref).double()
    model = doc_model(device, kernels="all")
    model.load_state_dict(ref.state_dict())
    idx, targets = documents(device, starts=(3, 4, 11, 20))  # a one-token document too
    targets[0, :5] = -1
    actual, baseline, expected = (forward_backward(m, idx, targets) for m in (model, ref, oracle))
    for name in actual:
        assert_close_2x(actual[name], baseline[name], expected[name], f"doc_mask kernels='all' {name}")
    plain = tiny(device, kernels="none")
    plain.load_state_dict(ref.state_dict())
    with torch.no_grad():  # the mask changed something: documents 1.. see less than without it
        assert not torch.allclose(plain(idx)[0], baseline["logits"], atol=1e-4)


def test_doc_mask_with_dropout_trains_on_the_reference():
    model = doc_model(dropout=0.1, kernels="none").train()
    idx, targets = documents()
    loss = model(idx, targets)[1]
    loss.backward()
    assert torch.isfinite(loss) and model.transformer.wte.weight.grad is not None


def test_doc_mask_kv_cache_logits_match_full_forward():
    """doc_mask in generate's cache: teacher-forced through documents and past block_size, each
    cached step's logits equal the full forward's (float64), separators in the prompt and after."""
    model = doc_model(kernels="none", block_size=16).double().eval()
    tokens = documents(T=30, starts=(2, 5, 6, 14, 23))[0]
    assert_cached_steps_match_full_forward(model, tokens, block_size=16)


def test_doc_mask_generate_with_the_attention_kernel(monkeypatch, device):
    """Greedy tokens with the kernel and the cache equal the reference's without a cache, with a
    separator in the prompt; the prefill passes doc_ids to the kernel."""
    calls = []
    real = kernels.flash_attention

    def kernel(q, k, v, *args, **kwargs):
        calls.append(kwargs.get("doc_ids") is not None)
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(kernels, "flash_attention", kernel)
    model = doc_model(device, kernels="attention", block_size=16).eval()
    idx = documents(device, T=6, starts=(1, 4))[0]
    cached = model.generate(idx, 6, top_k=1)
    assert calls == [True] * TINY.n_layer  # the prefill; the one-query steps mask in PyTorch
    reference = doc_model(device, kernels="none", block_size=16).eval()
    reference.load_state_dict(model.state_dict())
    assert torch.equal(cached, reference.generate(idx, 6, top_k=1, use_cache=False))
