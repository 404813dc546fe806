"""kernels.patch(model): put the kernels into an existing GPT-style model, in place.

    report = kernels.patch(model)    # a Hugging Face GPT2LMHeadModel / GPT2Model, or nanoGPT's GPT
    print(report)                    # what now runs a kernel, and what was left alone and why

What it recognises, and how it swaps the kernels in:
- nn.LayerNorm over one dimension: its class becomes kernels.nn.LayerNorm (a subclass).
- A LayerNorm-like module (nanoGPT's `LayerNorm`: a 1-D weight, an optional bias, eps 1e-5 unless
  it has an `eps`): kernels.layer_norm.
- A GELU MLP: transformers' GPT2MLP (Conv1D weights, stored (in, out): read transposed, in place)
  or a module with nn.Linear `c_fc` and `c_proj`, a GELU activation (tanh or erf) and dropout, as
  nanoGPT's MLP: kernels.gelu_mlp, the dropout applied after it.
- transformers' GPT2Attention: the model's attn_implementation becomes "tritongpt", the kernel's
  entry in transformers' AttentionInterface (kernels/hf.py), so transformers keeps its own
  projections, cache and masks and the kernel runs every call without a mask (training, prefill,
  cached decoding); calls with a mask, dropout or output_attentions run transformers' sdpa. One
  setting serves the whole model: every attention module must pass the probe, or none switches.
- nanoGPT-style causal self-attention (nn.Linear `c_attn`, fused q, k, v, and `c_proj`, an int
  `n_head`): kernels.flash_attention; calls with extra arguments, or in training mode with
  attention dropout p > 0, run the module's own forward.
- The loss of transformers' GPT2LMHeadModel: kernels.cross_entropy on the logits (the logits are
  still returned; they are not fused with the lm_head, so the outputs stay the same).

Every other recognised module gets a subclass of its own class whose forward calls the kernels: the module
object, its parameters, buffers, hooks and state-dict keys stay exactly as they were, and
isinstance checks still hold. Before swapping, patch runs the module's own forward and the kernel
version's maths (kernels.reference ops) on a small float64 input on the CPU, in eval mode and,
where the module has dropout, in training mode under one seed, with random parameters; if they differ (another
activation, another eps, another layout) the module is left alone and the report says so. It also
checks that the module has the attributes the kernel forward reads and a forward taking one input
and nothing else (a newer release that adds an argument is left alone, not silently dropped). The
attention probe runs a prefill and one cached decoding step under both implementations; the loss
probe compares transformers' causal-LM loss with the kernel's on ignored labels and both
reductions, after checking it takes exactly the arguments patch handles. Nothing
else in the model changes. Limits: pickle the state dict, not the patched model (the subclasses
are made at patch time); patching twice changes nothing more.
"""
import dataclasses
import inspect
import sys

import torch
import torch.nn.functional as F
from torch import nn

from . import nn as knn
from .nn import merge_heads, op, split_heads

_package = sys.modules[__package__]
PROBE_T = 5  # tokens in the float64 probe
SWITCHABLE_IMPLEMENTATIONS = ("sdpa", "eager")  # transformers attention patch may replace


@dataclasses.dataclass(frozen=True)
class Change:
    """One recognised part of the model: where, what it is, whether it now runs a kernel, and how
    (or why not)."""
    path: str
    what: str
    replaced: bool
    how: str

    def __str__(self):
        return f"{self.path or '(model)'}: {self.what} -> {'replaced' if self.replaced else 'left alone'}: {self.how}"


@dataclasses.dataclass
class PatchReport:
    """What kernels.patch did: one Change per recognised module (and the loss)."""
    changes: list

    @property
    def replaced(self):
        return [c for c in self.changes if c.replaced]

    @property
    def left_alone(self):
        return [c for c in self.changes if not c.replaced]

    def __iter__(self):
        return iter(self.changes)

    def __len__(self):
        return len(self.changes)

    def __str__(self):
        head = f"kernels.patch: {len(self.replaced)} replaced, {len(self.left_alone)} left alone"
        return "\n".join([head] + [f"  {c}" for c in self.changes])


# ---------------------------------------------------------------- kernel forwards (for the subclasses)

def _layer_norm_forward(self, x):
    return op("layer_norm", x)(x, self.weight, getattr(self, "bias", None), getattr(self, "eps", 1e-5))


def _dropouts(module):
    return [m for m in module.children() if isinstance(m, nn.Dropout)]


def _linear_mlp_forward(self, x):
    y = op("gelu_mlp", x)(x, self.c_fc.weight, self.c_fc.bias, self.c_proj.weight, self.c_proj.bias,
                          approximate=self.gelu_approximate)
    for dropout in _dropouts(self):
        y = dropout(y)
    return y


def _conv1d_mlp_forward(self, x):
    # Conv1D keeps weights as (in, out): their transposes are nn.Linear's layout, as views
    y = op("gelu_mlp", x)(x, self.c_fc.weight.t(), self.c_fc.bias, self.c_proj.weight.t(), self.c_proj.bias,
                          approximate=self.gelu_approximate)
    return self.dropout(y)


def _attention_dropout(module):
    """The attention dropout: an `attn_dropout` module's p, else a float `dropout` (nanoGPT's)."""
    p = getattr(getattr(module, "attn_dropout", None), "p", None)
    if p is None:
        p = getattr(module, "dropout", 0.0)
    return float(p) if isinstance(p, (int, float)) else 0.0


def _nanogpt_attention_forward(self, x, *args, **kwargs):
    if args or kwargs or (self.training and _attention_dropout(self) > 0):
        return self._tritongpt_base.forward(self, x, *args, **kwargs)
    q, k, v = split_heads(self.c_attn(x), self.n_head)
    y = self.c_proj(merge_heads(op("flash_attention", q)(q, k, v, causal=True)))
    dropout = getattr(self, "resid_dropout", None)
    return dropout(y) if dropout is not None else y


def _hf_causal_lm_loss(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100,
                       shift_labels=None, **kwargs):
    """transformers' ForCausalLMLoss with kernels.cross_entropy (fp32 inside, no fp32 logits copy)."""
    if shift_labels is None:  # tokens < n predict n: labels shifted left, the last one ignored
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    logits = logits.reshape(-1, vocab_size)
    shift_labels = shift_labels.reshape(-1).to(logits.device)
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = op("cross_entropy", logits)(logits, shift_labels, ignore_index=ignore_index, reduction=reduction)
    if reduction == "sum":
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


# ---------------------------------------------------------------- recognising modules

def _from_transformers(module, class_name):
    return any(c.__name__ == class_name and c.__module__.startswith("transformers.") for c in type(module).__mro__)


def _is_patched(module):
    return (isinstance(module, (knn.LayerNorm, knn.GeluMLP, knn.CausalSelfAttention))
            or "_tritongpt_base" in type(module).__dict__)


def _gelu_kind(act):
    """"tanh" or "none" when act computes F.gelu with that approximation (checked in float64 on a
    grid), else None."""
    x = torch.linspace(-6, 6, 241, dtype=torch.float64)
    try:
        with torch.no_grad():
            y = act(x)
    except Exception:
        return None
    for kind in ("tanh", "none"):
        if torch.allclose(y, F.gelu(x, approximate=kind), rtol=1e-9, atol=1e-12):
            return kind
    return None


def _activation(module, known):
    """The one child of module that is neither known nor dropout (the activation), or None."""
    rest = [m for name, m in module.named_children() if name not in known and not isinstance(m, nn.Dropout)]
    return rest[0] if len(rest) == 1 else None


def _is_linear(m):
    return type(m) is nn.Linear


def _classify(module):
    """(kind, what) for the modules patch knows, else None."""
    name = type(module).__name__
    if type(module) is nn.LayerNorm:
        return "nn_layer_norm", f"nn.LayerNorm{tuple(module.normalized_shape)}"
    if _from_transformers(module, "GPT2MLP"):
        return "hf_mlp", name
    if _from_transformers(module, "GPT2Attention"):
        return "hf_attention", name
    children = dict(module.named_children())
    if name.endswith("LayerNorm") and not children and isinstance(getattr(module, "weight", None), nn.Parameter):
        return "layer_norm", name
    if _is_linear(children.get("c_fc")) and _is_linear(children.get("c_proj")):
        return "mlp", name
    if (_is_linear(children.get("c_attn")) and _is_linear(children.get("c_proj"))
            and isinstance(getattr(module, "n_head", None), int)):
        return "attention", name
    return None


# ---------------------------------------------------------------- the float64 probe

def _f64_cpu(t):
    t = t.detach().to("cpu")
    return t.double() if t.is_floating_point() else t


def _probe_state(module):
    """Random float64 parameters (not the module's own: at init a bias of zeros or a weight of ones
    would hide a module that ignores them) and the module's buffers (a causal mask, say), on CPU."""
    g = torch.Generator().manual_seed(1)
    state = {n: _f64_cpu(t) for n, t in module.named_buffers()}  # a meta buffer fails here: left alone
    for n, p in module.named_parameters():
        state[n] = 0.5 * torch.randn(p.shape, dtype=torch.float64, generator=g) if p.is_floating_point() else _f64_cpu(p)
    return state


def _has_dropout(module):
    return any(isinstance(m, nn.Dropout) and m.p > 0 for m in module.modules()) or _attention_dropout(module) > 0


def _probe_input(module, width):
    """(2, T, width) float64: one sample of unit scale, one of scale 1e-3 (whose variance is near a
    LayerNorm's eps, so a different eps shows)."""
    g = torch.Generator().manual_seed(0)
    T = PROBE_T
    mask = getattr(module, "bias", None)
    if isinstance(mask, torch.Tensor) and mask.dim() == 4:  # nanoGPT's causal-mask buffer
        T = min(T, mask.shape[-1])
    x = torch.randn(2, T, width, dtype=torch.float64, generator=g)
    x[1] *= 1e-3
    return x


def _first_tensor(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _run_as(module, cls, state, x, training):
    """module's forward as class cls would run it, on the float64 CPU state, in the given mode."""
    own = module.__class__
    module.__class__ = cls
    module.train(training)
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad(), knn.reference_ops():
            torch.manual_seed(0)
            return _first_tensor(torch.func.functional_call(module, state, (x,)))
    finally:
        module.__class__ = own


def _probe(module, cls, width):
    """None when module's own forward and cls's forward agree on a float64 probe (eval mode, and
    training mode under one seed where module has dropout), else why not."""
    modes = [False, True] if _has_dropout(module) else [False]
    flags = [(m, m.training) for m in module.modules()]
    try:
        state = _probe_state(module)
        x = _probe_input(module, width)
        for training in modes:
            want = _run_as(module, type(module), state, x, training)
            got = _run_as(module, cls, state, x, training)
            if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-9, atol=1e-12):
                diff = (got - want).abs().max().item() if got.shape == want.shape else "shape"
                mode = "training" if training else "eval"
                return f"its forward differs from the kernel's maths on a float64 probe ({mode} mode, max diff {diff})"
    except Exception as e:  # the module could not run the probe: do not touch it
        return f"could not compare it with the kernel's maths on a float64 probe ({type(e).__name__}: {e})"
    finally:
        for m, training in flags:
            m.training = training
    return None


def _cache_argument(module):
    """The name under which module's forward takes the KV cache (transformers renamed it), or None."""
    params = inspect.signature(type(module).forward).parameters
    return next((n for n in ("cache", "past_key_values", "past_key_value", "layer_past") if n in params), None)


def _causal_mask(x, past):
    """The additive causal mask, (B, 1, Tq, past + Tq), of queries x after `past` cached keys:
    query i sees keys j <= past + i."""
    B, Tq = x.shape[:2]
    visible = torch.ones(Tq, past + Tq, dtype=torch.bool).tril(diagonal=past)
    mask = torch.zeros(Tq, past + Tq, dtype=x.dtype).masked_fill(~visible, torch.finfo(x.dtype).min)
    return mask.expand(B, 1, Tq, past + Tq)


def _run_cached(module, state, impl, steps, explicit_mask):
    """Outputs of module's forward under attn_implementation impl for each input in steps, all
    through one fresh KV cache (a prefill, then decoding steps), concatenated along time; with
    explicit_mask each call gets the causal mask spelled out, else None (what transformers' SDPA
    mask builder passes for these calls)."""
    from transformers import DynamicCache

    config, before = module.config, module.config._attn_implementation
    config._attn_implementation = impl
    cache, outs, past = DynamicCache(), [], 0
    try:
        with torch.no_grad(), knn.reference_ops():
            for x in steps:
                mask = _causal_mask(x, past) if explicit_mask else None
                kwargs = {_cache_argument(module): cache, "attention_mask": mask}
                outs.append(_first_tensor(torch.func.functional_call(module, state, (x,), kwargs)))
                past += x.shape[1]
    finally:
        config._attn_implementation = before
    return torch.cat(outs, dim=1)


def _probe_cached_attention(module, impl, name):
    """None when module gives the same float64 outputs under attn_implementation `name`, called as
    transformers calls it without padding (no mask), as under `impl` with the causal mask spelled
    out, for a prefill of PROBE_T - 1 tokens and one cached decoding step; else why not."""
    if _cache_argument(module) is None:
        return "its forward takes no KV cache argument patch knows (cache, past_key_values, past_key_value)"
    training = module.training
    module.eval()
    try:
        state = _probe_state(module)
        x = _probe_input(module, module.embed_dim)
        steps = (x[:, :-1].contiguous(), x[:, -1:].contiguous())
        want = _run_cached(module, state, impl, steps, explicit_mask=True)
        got = _run_cached(module, state, name, steps, explicit_mask=False)
        if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-9, atol=1e-12):
            diff = (got - want).abs().max().item() if got.shape == want.shape else "shape"
            return ("its forward under attn_implementation 'tritongpt' differs from " + repr(impl)
                    + f" on a float64 probe (prefill + one cached step, max diff {diff})")
    except Exception as e:  # could not run the probe: do not switch
        return f"could not compare it with the kernel's maths on a float64 probe ({type(e).__name__}: {e})"
    finally:
        module.train(training)
    return None


# ---------------------------------------------------------------- swapping

_SUBCLASSES = {}


def _subclass(base, forward, **attrs):
    """A subclass of base with the kernel forward (one per base, forward and attributes)."""
    key = (base, forward, tuple(sorted(attrs.items())))
    if key not in _SUBCLASSES:
        body = {"forward": forward, "_tritongpt_base": base, "__module__": __name__, **attrs}
        _SUBCLASSES[key] = type(f"Kernel{base.__name__}", (base,), body)
    return _SUBCLASSES[key]


def _swap(module, cls, width, how):
    """Swap module's class for cls if the probe agrees; (replaced, how or why not)."""
    why = _probe(module, cls, width)
    if why is not None:
        return False, why
    module.__class__ = cls
    return True, how


def _head_dim_problem(n_embd, n_head):
    head_dims = getattr(getattr(_package, "attention", None), "HEAD_DIMS", None)
    D = n_embd // n_head
    if head_dims is not None and D not in head_dims:
        return f"head dimension {D} is not one the flash_attention kernel takes {tuple(head_dims)}"
    return None


def _dropout_note(module):
    p = _attention_dropout(module)
    return (f"; in training mode its attention dropout (p={p}) is not in the kernel, so the original "
            "attention runs there" if p > 0 else "")


def _patch_mlp(module, act, forward, width):
    if act is None:
        return False, "no single activation module between c_fc and c_proj"
    kind = _gelu_kind(act)
    if kind is None:
        return False, f"activation {act!r} is not a GELU (the kernel fuses tanh or erf GELU only)"
    cls = _subclass(type(module), forward, gelu_approximate=kind)
    return _swap(module, cls, width, f"kernels.gelu_mlp (approximate={kind!r}), dropout after it")


def _forward_problem(module, attributes):
    """None when module has the attributes its kernel forward reads and a forward that takes one
    input and nothing else (the kernel forward replaces it: another argument would be ignored),
    else why not."""
    missing = [a for a in attributes if not hasattr(module, a)]
    if missing:
        return f"it has no {', '.join(missing)} (the kernel version reads them)"
    try:
        params = list(inspect.signature(type(module).forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return "its forward's signature cannot be read"
    if len(params) != 1 or params[0].kind not in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD):
        return (f"its forward takes ({', '.join(str(p) for p in params)}), not one input: the kernel version "
                "would drop the rest")
    return None


# What each subclass-based kernel forward reads from its module.
ATTRIBUTES = {"nn_layer_norm": ("normalized_shape", "weight", "bias", "eps"), "layer_norm": ("weight",),
              "hf_mlp": ("c_fc", "c_proj", "act", "dropout"), "mlp": ("c_fc", "c_proj")}


def _patch_module(kind, module):
    """(replaced, how) for one recognised module."""
    problem = _forward_problem(module, ATTRIBUTES[kind]) if kind in ATTRIBUTES else None
    if problem:
        return False, problem
    if kind == "nn_layer_norm":
        if len(module.normalized_shape) != 1:
            return False, "normalizes over more than the last dimension"
        module.__class__ = knn.LayerNorm  # nn.LayerNorm's maths exactly: its attributes define it
        return True, "kernels.layer_norm"
    if kind == "layer_norm":
        if module.weight.dim() != 1:
            return False, "its weight is not 1-D"
        return _swap(module, _subclass(type(module), _layer_norm_forward), module.weight.shape[0],
                     "kernels.layer_norm")
    if kind == "hf_mlp":
        return _patch_mlp(module, getattr(module, "act", None), _conv1d_mlp_forward, module.c_fc.weight.shape[0])
    if kind == "mlp":
        return _patch_mlp(module, _activation(module, ("c_fc", "c_proj")), _linear_mlp_forward,
                          module.c_fc.in_features)
    return _patch_nanogpt_attention(module)


def _hf_attention_problem(module):
    """None when a transformers GPT2Attention can run as attn_implementation "tritongpt", else why not."""
    impl = module.config._attn_implementation
    if impl not in SWITCHABLE_IMPLEMENTATIONS:
        return (f"attn_implementation={impl!r}: patch switches only from "
                f"{' or '.join(map(repr, SWITCHABLE_IMPLEMENTATIONS))} to 'tritongpt'")
    problem = _head_dim_problem(module.embed_dim, module.num_heads)
    if problem:
        return problem
    try:
        from . import hf
    except ImportError as e:
        return f"the transformers attention cannot be registered ({e})"
    return _probe_cached_attention(module, impl, hf.NAME)


def _hf_attention_changes(model, found):
    """Changes for the transformers attention modules found ((path, module, what)): all switch to
    attn_implementation "tritongpt" (one setting for the whole model), or none does."""
    if found[0][1].config._attn_implementation == "tritongpt":
        return [Change(path, what, False, "already runs the kernels") for path, _, what in found]
    if any(module.is_cross_attention for _, module, _ in found):
        return [Change(path, what, False, "the model has cross-attention; patch switches decoder-only models")
                for path, _, what in found]
    problems = {path: _hf_attention_problem(module) for path, module, _ in found}
    blocker = next((f"{p}: {why}" for p, why in problems.items() if why), None)
    if blocker is None:
        _set_attn_implementation(model, found[0][1].config, "tritongpt")
        how = ("transformers attn_implementation 'tritongpt': kernels.flash_attention for calls without a "
               "mask (training, prefill, cached decoding); masked, dropout or output_attentions calls run "
               "transformers' sdpa")
        return [Change(path, what, True, how) for path, _, what in found]
    return [Change(path, what, False, problems[path] or f"the model's attention stays as it is ({blocker})")
            for path, _, what in found]


def _set_attn_implementation(model, config, name):
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:  # attention modules inside a model that is not a transformers PreTrainedModel
        config._attn_implementation = name


def _patch_nanogpt_attention(module):
    C = module.c_attn.in_features
    if module.c_attn.out_features != 3 * C or C % module.n_head:
        return False, "c_attn is not a fused (C -> 3C) q, k, v projection for n_head heads"
    problem = _head_dim_problem(C, module.n_head)
    if problem:
        return False, problem
    how = "kernels.flash_attention (causal); calls with extra arguments run the original" + _dropout_note(module)
    return _swap(module, _subclass(type(module), _nanogpt_attention_forward), C, how)


def _loss_problem(loss):
    """None when transformers' causal-LM loss takes exactly the arguments _hf_causal_lm_loss handles
    and agrees with it on a float64 probe (ignored labels, mean and num_items_in_batch sums), else
    why not."""
    ours = inspect.signature(_hf_causal_lm_loss).parameters
    theirs = inspect.signature(loss).parameters
    if list(theirs) != list(ours):
        return f"transformers' loss takes ({', '.join(theirs)}), not the ({', '.join(ours)}) patch handles"
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, PROBE_T, 11, dtype=torch.float64, generator=g)
    labels = torch.randint(0, 11, (2, PROBE_T), generator=g)
    labels[0, :2] = -100
    for extra in ({}, {"num_items_in_batch": torch.tensor(7)}, {"shift_labels": labels.roll(1, 1)}):
        with torch.no_grad(), knn.reference_ops():
            want, got = (fn(logits, labels, vocab_size=11, **extra) for fn in (loss, _hf_causal_lm_loss))
        if not torch.allclose(got.double(), want.double(), rtol=1e-5, atol=0):  # fp32 inside theirs
            return f"transformers' loss differs from kernels.cross_entropy's on a float64 probe ({sorted(extra)})"
    return None


def _patch_loss(model):
    """A Change for transformers' GPT2LMHeadModel loss, or None for other models."""
    if not _from_transformers(model, "GPT2LMHeadModel"):
        return None
    what = f"{type(model).__name__}.loss_function"
    current = getattr(model, "_loss_function", None)
    if current is _hf_causal_lm_loss:
        return Change("", what, False, "already runs kernels.cross_entropy")
    if current is not None or getattr(model, "loss_type", None) not in (None, "ForCausalLM"):
        return Change("", what, False, "a custom loss function is set")
    problem = _loss_problem(model.loss_function)
    if problem:
        return Change("", what, False, problem)
    model.loss_function = _hf_causal_lm_loss  # transformers' setter: kept on this model only
    return Change("", what, True, "kernels.cross_entropy on the shifted logits (logits still returned)")


def patch(model):
    """Swap the Triton kernels into `model` in place; returns a PatchReport.

    See the module docstring for what is recognised. Parameters, buffers, state-dict keys and
    outputs stay the same (up to floating-point rounding); each kernel runs where Triton can run
    on the input's device, the same maths in PyTorch elsewhere.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if type(model).__module__ == "tritongpt.model.gpt":  # this project's GPT (kernels cannot import model/)
        return PatchReport([Change("", type(model).__name__, False,
                                   "this project's model already runs the kernels: choose them with GPTConfig.kernels")])
    changes, hf_attention = [], []
    for path, module in model.named_modules():
        found = _classify(module)
        if found is None:
            continue
        kind, what = found
        if kind == "hf_attention":
            hf_attention.append((path, module, what))
        elif _is_patched(module):
            changes.append(Change(path, what, False, "already runs the kernels"))
        else:
            changes.append(Change(path, what, *_patch_module(kind, module)))
    if hf_attention:
        changes += _hf_attention_changes(model, hf_attention)
    loss = _patch_loss(model)
    if loss is not None:
        changes.append(loss)
    return PatchReport(changes)
