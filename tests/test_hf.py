"""kernels/hf.py: the flash_attention kernel as transformers' attn_implementation "tritongpt".
Against transformers' own sdpa implementation: the attention function called directly (what it
runs through the kernel, what it hands to sdpa), and whole tiny random models loaded with
attn_implementation="tritongpt" (GPT-2, Llama-style GQA with rotary embeddings, Mistral-style
sliding window): same logits and gradients (2x rule, float64 oracle), and the kernel runs."""
import copy

import pytest
import torch
import torch.nn as nn
from helpers import check_same_maths, spy_ops

from tritongpt.kernels import reference

transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("tritongpt.kernels.hf")  # registers "tritongpt"
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402

V = 97


def tiny(kind, impl, device, **overrides):
    """A tiny random transformers causal LM of the given kind, with attn_implementation impl."""
    common = dict(vocab_size=V, bos_token_id=0, eos_token_id=0, attn_implementation=impl)
    if kind == "gpt2":  # dropout off: the compared models must draw no random numbers
        config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=16, resid_pdrop=0.0,
                                         embd_pdrop=0.0, attn_pdrop=0.0, **common, **overrides)
        cls = transformers.GPT2LMHeadModel
    else:  # llama / mistral: 4 query heads on 2 key/value heads (GQA), head dim 16, rotary positions
        sizes = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=32)
        config_cls = transformers.LlamaConfig if kind == "llama" else transformers.MistralConfig
        config = config_cls(**sizes, **common, **overrides)
        cls = transformers.LlamaForCausalLM if kind == "llama" else transformers.MistralForCausalLM
    torch.manual_seed(0)
    return cls(config).to(device)


def run_lm(idx):
    def run(model):
        out = model(idx, labels=idx)
        out.loss.backward()
        return {"loss": out.loss.detach(), "logits": out.logits.detach()}
    return run


@pytest.mark.parametrize("kind, overrides, kernel_calls", [
    ("gpt2", {}, 2), ("llama", {}, 2),
    ("mistral", {"sliding_window": 16}, 2),  # a window longer than the input: no mask, the kernel runs
    ("mistral", {"sliding_window": 4}, 2),   # a real window: transformers' mask is read as the kernel's window
])
def test_model_matches_sdpa(kind, overrides, kernel_calls, monkeypatch, device):
    ours = tiny(kind, "tritongpt", device, **overrides)
    sdpa = tiny(kind, "sdpa", device, **overrides)
    sdpa.load_state_dict(ours.state_dict())
    oracle = copy.deepcopy(sdpa).double()
    calls = spy_ops(monkeypatch)
    idx = torch.randint(1, V, (2, 9), device=device)
    check_same_maths(ours, sdpa, oracle, run_lm(idx))
    assert calls.count("flash_attention") == kernel_calls


@pytest.mark.parametrize("kind, overrides", [("llama", {}), ("mistral", {"sliding_window": 3})])
def test_generate_with_the_cache_matches_sdpa(kind, overrides, monkeypatch, device):
    """Greedy decoding past the window: the prefill and every cached step run the kernel."""
    ours, sdpa = (tiny(kind, impl, device, **overrides).eval() for impl in ("tritongpt", "sdpa"))
    sdpa.load_state_dict(ours.state_dict())
    calls = spy_ops(monkeypatch)
    idx = torch.randint(1, V, (1, 5), device=device)
    steps = [m.generate(idx, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
             for m in (ours, sdpa)]
    assert torch.equal(steps[0].sequences, steps[1].sequences)
    for got, want in zip(steps[0].logits, steps[1].logits):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert calls.count("flash_attention") == 2 * 3  # two layers: the prefill and two cached steps


def test_from_pretrained_with_attn_implementation_tritongpt(tmp_path, monkeypatch, device):
    """After one import, transformers loads a saved model with attn_implementation="tritongpt"."""
    tiny("gpt2", "sdpa", "cpu").save_pretrained(tmp_path)
    cls = transformers.GPT2LMHeadModel
    ours = cls.from_pretrained(tmp_path, attn_implementation="tritongpt").to(device).eval()
    sdpa = cls.from_pretrained(tmp_path, attn_implementation="sdpa").to(device).eval()
    calls = spy_ops(monkeypatch)
    idx = torch.randint(0, V, (2, 9), device=device)
    with torch.no_grad():
        torch.testing.assert_close(ours(idx).logits, sdpa(idx).logits, rtol=1e-5, atol=1e-5)
    assert calls == ["flash_attention"] * 2


def test_register_refuses_an_old_transformers():
    with pytest.raises(ImportError, match="transformers >= 4.55, found 4.54.1"):
        hf.check_version("4.54.1")
    hf.check_version("4.55.0")
    hf.check_version("5.24.0.dev0")


def causal_mask(Tq, Tk, window=None):
    """transformers' boolean mask of an unpadded causal (sliding-window) batch of 2: (2, 1, Tq, Tk)."""
    i, j = torch.arange(Tq)[:, None] + Tk - Tq, torch.arange(Tk)[None, :]
    keep = (j <= i) & ((j > i - window) if window else True)
    return keep.expand(2, 1, Tq, Tk)


def padded(mask):
    """mask with batch row 1's first key hidden from every query (left padding)."""
    mask = mask.clone()
    mask[1, :, :, 0] = False
    return mask


def test_a_sliding_window_mask_read_once_and_again_after_a_change(monkeypatch):
    """The verdict on a mask tensor is reused for the next layer, and not after the mask changes."""
    module = nn.Module()
    q, k, v = (torch.randn(2, 4, 6, 16, dtype=torch.float64) for _ in range(3))
    mask = causal_mask(6, 6, window=3).clone()
    reads = []
    monkeypatch.setattr(hf, "_kernel_mask", lambda *a, **kw: reads.append(a) or reference.attention_mask(*a, **kw))
    calls = spy_ops(monkeypatch)
    for _ in range(2):
        hf.attention(module, q, k, v, mask, scaling=0.3)
    assert calls == ["flash_attention"] * 2 and len(reads) == 1
    mask[1, :, :, 0] = False  # in place: now a padded batch
    got, _ = hf.attention(module, q, k, v, mask, scaling=0.3)
    want, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.3)
    assert calls == ["flash_attention"] * 2 and len(reads) == 2
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_attention_function_refers_what_it_cannot_compute_to_sdpa(monkeypatch):
    """The registered function, called directly: kernel for no-mask causal, decode and non-causal
    calls (GQA heads repeated), transformers' sdpa for masks, dropout and unknown keywords."""

    module = nn.Module()
    q, k, v = (torch.randn(2, 4, T, 16, dtype=torch.float64) for T in (6, 6, 6))
    cases = [  # (query, key/value length, kwargs, runs the kernel)
        (q, 6, {}, True), (q[:, :, -1:], 6, {}, True), (q, 6, {"is_causal": False}, True),
        (q[:, :, :3], 6, {}, True),  # a prefill into a longer, pre-allocated cache: keys cropped
        (q, 6, {"sliding_window": 6}, True),  # a window as long as the keys changes nothing
        (q, 6, {"dropout": 0.1}, False), (q, 6, {"sliding_window": 4}, False), (q, 6, {"s_aux": torch.zeros(4)}, False),
        (q, 6, {"attention_mask": causal_mask(6, 6)}, True),  # the kernel's own mask, spelled out
        (q, 6, {"attention_mask": causal_mask(6, 6, window=3), "sliding_window": 3}, True),
        (q[:, :, -1:], 6, {"attention_mask": causal_mask(1, 6, window=4)}, True),  # a decoding step
        (q[:, :, :3], 6, {"attention_mask": causal_mask(3, 6, window=2)}, True),   # a chunk of a prefill
        (q, 6, {"attention_mask": padded(causal_mask(6, 6, window=3))}, False),  # left padding in row 1
        (q, 6, {"attention_mask": causal_mask(6, 6).transpose(-1, -2).contiguous()}, False),
        (q, 6, {"attention_mask": causal_mask(6, 6).float()}, False),  # an additive mask is not read
        (q, 3, {}, False),  # more queries than keys: SDPA's start alignment, no kernel equivalent
    ]
    for query, tk, kwargs, kernel in cases:
        kwargs = {"attention_mask": None, "scaling": 0.3, **kwargs}
        calls = spy_ops(monkeypatch)
        torch.manual_seed(0)
        got, _ = hf.attention(module, query, k[:, :, :tk], v[:, :, :tk], **kwargs)
        torch.manual_seed(0)
        want, _ = sdpa_attention_forward(module, query, k[:, :, :tk], v[:, :, :tk], **kwargs)
        assert calls == (["flash_attention"] if kernel else []), (query.shape, tk, kwargs)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        assert got.is_contiguous()
    module.num_key_value_groups = 2  # GQA: 4 query heads on 2 key/value heads
    calls = spy_ops(monkeypatch)
    got, _ = hf.attention(module, q, k[:, :2], v[:, :2], None, scaling=0.3)
    want, _ = sdpa_attention_forward(module, q, k[:, :2], v[:, :2], None, scaling=0.3)
    assert calls == ["flash_attention"]
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)



def test_softcap_runs_the_kernel(monkeypatch):
    """Gemma 2's attention softcapping (which transformers' sdpa refuses) is the kernel's softcap,
    on GQA heads as they come."""
    module = nn.Module()
    q = torch.randn(2, 4, 6, 16, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 6, 16, dtype=torch.float64) for _ in range(2))
    calls = spy_ops(monkeypatch)
    got, _ = hf.attention(module, q, k, v, None, scaling=0.3, softcap=2.0)
    want = reference.flash_attention(q, k, v, causal=True, sm_scale=0.3, softcap=2.0).transpose(1, 2)
    assert calls == ["flash_attention"]
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    uncapped, _ = hf.attention(module, q, k, v, None, scaling=0.3)
    assert (got - uncapped).abs().max() > 1e-3  # the cap changes the answer at these scores
