"""Benchmark causal attention: the Triton FlashAttention against SDPA's backends, FlexAttention and the math reference.

    python bench/bench_attention.py [--quick] [--no-compile] [--out-dir bench/results]
    python -m tritongpt.bench.bench_attention ...

Three workloads ("features"), all causal, bf16, B = 16, H = 12 query heads (GPT-2 124M):

- causal: plain causal attention, T in {256, ..., 8192} at D = 64 (GPT-2's head dim at every
  size) and at D = 128; --quick runs T in {1024, 4096} at D = 64. Shape {B, H, T, D}.
- gqa: grouped-query attention, k and v with H_KV = 3 heads (each read by a group of 4 query
  heads, the ratio of Llama 3 and Mistral), T in {1024, 4096} at D = 64 and 128; --quick
  T = 1024, D = 64. Shape {B, H, H_kv, T, D}.
- docs: document masking, each row packing T // DOC_LEN documents (DOC_LEN = 256 tokens on
  average; cut points drawn at random per row from a fixed seed, the same for every provider): a
  query sees only the earlier keys of its own document. T in {1024, ..., 8192} at D = 64 and
  T = 4096 at D = 128; --quick T = 4096, D = 64. Shape {B, H, T, D, docs}.

Modes fwd, bwd and fwd_bwd; q, k, v contiguous and requiring grad in every mode, so the forward is
the training forward (it keeps what its backward needs).

Providers:
- triton = kernels.flash_attention (k, v with H_kv heads for gqa; doc_ids (B, T) for docs).
- sdpa_flash, sdpa_cudnn, sdpa_efficient = F.scaled_dot_product_attention pinned to one backend
  with torch.nn.attention.sdpa_kernel: is_causal=True, enable_gqa=True for gqa, and for docs an
  explicit (B, 1, T, T) boolean mask (causal and same document) in place of is_causal. torch =
  the same pinned to the math backend (the plain-PyTorch reference: T x T scores materialised),
  run up to T = MATH_MAX_T only (beyond, its scores alone take tens of GB). For gqa and docs each
  backend is first tried at a tiny shape; one that SDPA cannot run with that feature on this
  device (SDPA says "No available kernel": the flash backend takes no mask on CUDA, say) is
  skipped with SDPA's reason, not counted as a failure.
- flex_attention (gqa and docs) = torch.nn.attention.flex_attention under torch.compile (its fused
  kernel; eager FlexAttention materialises the scores) with a block mask from create_block_mask
  (causal; and same document for docs; enable_gqa for gqa). Skipped, with the reason, where the
  installed torch has no FlexAttention, without CUDA (it has no backward on CPU, so a CPU smoke run
  leaves it out) and with --no-compile.
The masks (SDPA's dense mask, FlexAttention's block mask) are built once per shape, outside the
timing and the memory measurement, as a training step builds one per batch and shares it across
layers; the Triton kernel reads doc_ids itself and skips the key tiles that share no document with
a query tile.

- bwd runs the forward once outside the timing and times out.backward(do, retain_graph=True);
  do_bench sets q.grad, k.grad and v.grad to None before each timed run. fwd_bwd times both.

TFLOP/s counts the matmul FLOPs of exact attention, whatever a provider really does: forward
4 * H * D * (query, key) pairs (q @ k^T and p @ v), with B * T * T / 2 pairs when causal (the
same for gqa, whose H query heads each attend) and the sum of L * L / 2 over the documents of
every row for docs; backward 2.5x the forward (five matmuls of that size: dv, dp, dq, dk and the
recomputed scores); fwd_bwd 3.5x. So a provider that computes masked-out blocks gains nothing
from them. Peak memory: harness.peak_memory_mb, what one call allocates beyond its inputs. A
backend that cannot run on this GPU or shape (cuDNN missing, say) is reported in meta["skipped"]
(as "attention:<provider>" for causal rows, "attention:<feature>:<provider>" for the others) and
left out; the run goes on. The module follows the benchmark protocol of bench/harness.py (OPS,
collect, cases, main).
"""
import functools
import sys
import warnings
from typing import NamedTuple, Optional

import torch

from tritongpt.bench import harness

OP = "attention"
OPS = (OP,)
B, H = 16, 12
SEQ_LENS = (256, 512, 1024, 2048, 4096, 8192)
HEAD_DIMS = (64, 128)
QUICK_SHAPES = ((1024, 64), (4096, 64))
H_KV = 3  # key/value heads of the gqa rows: groups of H // H_KV = 4 query heads
GQA_SHAPES = ((1024, 64), (4096, 64), (1024, 128), (4096, 128))
QUICK_GQA_SHAPES = ((1024, 64),)
DOC_LEN = 256  # mean document length of the docs rows: T // DOC_LEN documents per row
DOC_SHAPES = ((1024, 64), (2048, 64), (4096, 64), (8192, 64), (4096, 128))
QUICK_DOC_SHAPES = ((4096, 64),)
DOC_SEED = 0
FEATURES = ("causal", "gqa", "docs")
MATH_MAX_T = 4096
MODES = harness.MODES
DTYPE = torch.bfloat16
CAUSAL = True
OPTIONAL = ("torch", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "flex_attention")  # failures skip, not stop
SDPA_BACKENDS = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION",
                 "sdpa_efficient": "EFFICIENT_ATTENTION", "torch": "MATH"}
CUDA_ONLY = ("sdpa_cudnn", "sdpa_efficient")  # SDPA has no CPU version of these (smoke runs on CPU)
# SDPA's error when the backend pinned with sdpa_kernel cannot take the inputs (CUDA, then CPU)
SDPA_CANNOT = ("No available kernel", "No viable backend")
FLEX_RECOMPILE_LIMIT = 64  # compiled FlexAttention recompiles per shape; dynamo's default allows 8
# a smoke run's shapes (harness.smoke_constants): 4 documents of 8 tokens on average in 32
SMOKE = {"B": 1, "H": 2, "H_KV": 1, "DOC_LEN": 8, "QUICK_SHAPES": ((32, 16),),
         "QUICK_GQA_SHAPES": ((32, 16),), "QUICK_DOC_SHAPES": ((32, 16),)}


class Inputs(NamedTuple):
    """One shape's tensors: q (B, H, T, D); k, v (B, H_kv, T, D); do like q; for docs the (B, T)
    document ids and each row's document lengths."""
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    do: torch.Tensor
    doc_ids: Optional[torch.Tensor] = None
    doc_lengths: Optional[list] = None


def attention_flops(batch, heads, T, D, mode, causal=CAUSAL, doc_lengths=None):
    """Matmul FLOPs of one attention call of `mode` (see the module docstring). doc_lengths: each
    row's document lengths (docs rows; batch is then their number of rows)."""
    if doc_lengths is not None:
        fwd = 4 * heads * D * sum(L * L for row in doc_lengths for L in row) // 2
    else:
        fwd = 4 * batch * heads * T * T * D // (2 if causal else 1)
    return {"fwd": fwd, "bwd": 5 * fwd // 2, "fwd_bwd": 7 * fwd // 2}[mode]


def document_lengths(batch, T, n_docs, seed=DOC_SEED):
    """Per row, n_docs document lengths summing to T: n_docs - 1 distinct cut points drawn at random
    (a generator seeded with `seed`, so every provider and run gets the same documents)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        cuts = torch.randperm(T - 1, generator=g)[:n_docs - 1].add(1).sort().values.tolist()
        rows.append([b - a for a, b in zip([0] + cuts, cuts + [T])])
    return rows


def _n_docs(T):
    return max(1, T // DOC_LEN)


def _shape(feature, T, D):
    """The row's shape dict: {B, H, T, D}, plus H_kv for gqa and docs (documents per row) for docs."""
    if feature == "gqa":
        return {"B": B, "H": H, "H_kv": H_KV, "T": T, "D": D}
    if feature == "docs":
        return {"B": B, "H": H, "T": T, "D": D, "docs": _n_docs(T)}
    return {"B": B, "H": H, "T": T, "D": D}


def _flops(feature, inputs, T, D, mode):
    return attention_flops(B, H, T, D, mode, doc_lengths=inputs.doc_lengths if feature == "docs" else None)


# ---------------------------------------------------------------- providers
# A provider is bind(inputs) -> attend(q, k, v): bind builds what the provider needs besides q, k
# and v (a mask) once per shape, outside the timing; attend is what is timed.

def _triton(inputs):
    from tritongpt.kernels import flash_attention

    doc_ids = inputs.doc_ids
    return lambda q, k, v: flash_attention(q, k, v, causal=CAUSAL, doc_ids=doc_ids)


def _dense_mask(doc_ids, T):
    """SDPA's (B, 1, T, T) boolean mask: causal and same document (kernels.reference's)."""
    from tritongpt.kernels.reference import attention_mask

    return attention_mask(T, T, causal=CAUSAL, doc_ids=doc_ids, device=doc_ids.device)


def _pinned_sdpa(backend):
    """A provider: SDPA restricted to one backend (is_causal, enable_gqa when k has fewer heads
    than q, the dense document mask with doc_ids); raises when that backend cannot take the inputs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = getattr(SDPBackend, backend)

    def bind(inputs):
        gqa = inputs.k.shape[1] != inputs.q.shape[1]
        mask = None if inputs.doc_ids is None else _dense_mask(inputs.doc_ids, inputs.q.shape[2])
        sdpa = torch.nn.functional.scaled_dot_product_attention

        def attend(q, k, v):
            with sdpa_kernel(chosen):
                if mask is None:
                    return sdpa(q, k, v, is_causal=CAUSAL, enable_gqa=gqa)
                return sdpa(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return attend
    return bind


def _flex(compiled):
    """A provider: compiled FlexAttention with a block mask (causal, and same document with doc_ids)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def bind(inputs):
        batch, _, T, _ = inputs.q.shape
        doc_ids = inputs.doc_ids
        if doc_ids is None:
            def mask_mod(b, h, q_idx, kv_idx):
                return q_idx >= kv_idx
            block_mask = create_block_mask(mask_mod, None, None, T, T, device=inputs.q.device)
        else:
            def mask_mod(b, h, q_idx, kv_idx):
                return (q_idx >= kv_idx) & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])
            block_mask = create_block_mask(mask_mod, batch, None, T, T, device=inputs.q.device)
        gqa = inputs.k.shape[1] != inputs.q.shape[1]
        return lambda q, k, v: compiled(q, k, v, block_mask=block_mask, enable_gqa=gqa)
    return bind


def _flex_provider(no_compile):
    """(the flex_attention provider, None) or (None, why it is skipped here)."""
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError as e:
        return None, f"unavailable (torch {torch.__version__} has no FlexAttention: {e})"
    if harness.device() != "cuda":
        return None, "needs CUDA (FlexAttention has no backward on CPU)"
    if no_compile:
        return None, "--no-compile (FlexAttention is fused only under torch.compile)"
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, FLEX_RECOMPILE_LIMIT)
    return _flex(torch.compile(flex_attention, dynamic=False)), None


def _cannot_run(bind, feature, device):
    """Why SDPA cannot run `bind` with `feature` on device (tried at a tiny shape, forward and
    backward), or None when it can: "cannot run ..." with SDPA's reasons when SDPA refuses the
    inputs, "failed ..." (a failure, as in harness.failures) for any other error."""
    inputs = make_inputs(feature, 32, 16, device, batch=1, heads=2, kv_heads=1, n_docs=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            bind(inputs)(inputs.q, inputs.k, inputs.v).backward(inputs.do)
            return None
        except Exception as e:  # noqa: BLE001  (an optional provider's failure is data)
            if not any(s in str(e) for s in SDPA_CANNOT):
                return f"failed trying {feature} at a tiny shape: {harness.error_summary(e)}"
            reasons = [str(w.message).strip().splitlines()[0] for w in caught if str(w.message).strip()]
            return f"cannot run {feature}: " + ("; ".join(reasons) or harness.error_summary(e))[:200]


def providers(no_compile=False, feature="causal"):
    """({name: provider}, {name: why skipped}) for every provider this machine can offer for
    `feature` (see the module docstring). no_compile leaves FlexAttention out (it is only fused
    compiled); the other providers take no torch.compile (SDPA's kernels are what compile calls)."""
    if feature not in FEATURES:
        raise ValueError(f"feature must be one of {FEATURES}, got {feature!r}")
    fns = {"triton": _triton}
    skipped = {}
    for name, backend in SDPA_BACKENDS.items():
        if name in CUDA_ONLY and harness.device() != "cuda":
            skipped[name] = "needs CUDA"
            continue
        try:
            fns[name] = _pinned_sdpa(backend)
        except (ImportError, AttributeError) as e:  # an older torch without that backend
            skipped[name] = f"unavailable ({type(e).__name__}: {e})"
            continue
        if feature != "causal":
            why = _cannot_run(fns[name], feature, harness.device())
            if why:
                skipped[name] = why
                del fns[name]
    if feature != "causal":
        flex, why = _flex_provider(no_compile)
        if flex is None:
            skipped["flex_attention"] = why
        else:
            fns["flex_attention"] = flex
    return fns, skipped


# ---------------------------------------------------------------- inputs and timing

def make_inputs(feature, T, D, device="cuda", batch=None, heads=None, kv_heads=None, n_docs=None):
    """The Inputs of one shape (module constants unless given): gqa's k and v have H_KV heads,
    docs gets doc_ids from document_lengths."""
    batch, heads = batch or B, heads or H
    kv = (kv_heads or H_KV) if feature == "gqa" else heads

    def randn(h):
        return torch.randn(batch, h, T, D, device=device, dtype=DTYPE)

    q, k, v = randn(heads).requires_grad_(), randn(kv).requires_grad_(), randn(kv).requires_grad_()
    if feature != "docs":
        return Inputs(q, k, v, randn(heads))
    lengths = document_lengths(batch, T, n_docs or _n_docs(T))
    doc_ids = torch.stack([torch.repeat_interleave(torch.arange(len(row)), torch.tensor(row))
                           for row in lengths]).to(device)
    return Inputs(q, k, v, randn(heads), doc_ids, lengths)


def runner(attend, mode, q, k, v, do):
    """The callable to time for `mode` (for bwd, after running the forward once)."""
    if mode == "fwd":
        return lambda: attend(q, k, v)
    if mode == "bwd":
        out = attend(q, k, v)
        return lambda: out.backward(do, retain_graph=True)
    return lambda: attend(q, k, v).backward(do)


def prepare(fn, mode, inputs):
    """(callable to time, leaves whose grads are reset) of one provider in one mode; the provider
    builds its mask here, before the timing."""
    return runner(fn(inputs), mode, inputs.q, inputs.k, inputs.v, inputs.do), [inputs.q, inputs.k, inputs.v]


measure = harness.timer(prepare)  # (time_ms dict, peak MiB) of one provider in one mode


def skip_key(feature, name):
    """meta["skipped"]'s key of a provider: "attention:<name>" for causal rows,
    "attention:<feature>:<name>" for the others."""
    return f"{OP}:{name}" if feature == "causal" else f"{OP}:{feature}:{name}"


def _active(fns, skipped, feature, T):
    """The providers to run at length T: the math reference only up to MATH_MAX_T."""
    if T <= MATH_MAX_T or "torch" not in fns:
        return dict(fns)
    skipped[skip_key(feature, "torch")] = (f"math backend run only up to T={MATH_MAX_T} (its T x T scores "
                                           "do not fit beyond)")
    return {name: fn for name, fn in fns.items() if name != "torch"}


def run(shapes, fns, skipped, warmup, rep, device="cuda", progress=None):
    """Time every provider in every mode on every (feature, T, D); return the rows. fns maps each
    feature to its {name: provider}. A provider that fails (optional ones only) is dropped from its
    feature's fns for the later shapes too. progress(rows, meta_extra), when given, is called
    after every shape (the suite saves what a cut-short run measured)."""
    rows = []
    for feature, T, D in shapes:
        inputs = make_inputs(feature, T, D, device)
        feature_fns = fns[feature]
        active = _active(feature_fns, skipped, feature, T)
        started = list(active)
        where = f"T={T} D={D}" if feature == "causal" else f"{feature} T={T} D={D}"
        results = harness.measure_providers(active, MODES, measure, (inputs, warmup, rep), skipped, OPTIONAL,
                                            where, prefix=skip_key(feature, ""))
        shape = _shape(feature, T, D)
        for name, mode, (timing, mem) in results:
            rate = harness.tflops(_flops(feature, inputs, T, D, mode), timing["ms"])
            rows.append(harness.make_row(OP, name, mode, DTYPE, shape, timing, tflops=rate, peak_mem_mb=mem))
        for name in started:
            if name not in active:  # it failed at this shape: measure_providers dropped it
                del feature_fns[name]
        del inputs
        if device == "cuda":
            torch.cuda.empty_cache()
        if progress is not None:
            progress(rows, {"skipped": skipped})
    return rows


def shapes_for(args):
    """The (feature, T, D) triples of a run, causal first."""
    if args.quick:
        sets = (QUICK_SHAPES, QUICK_GQA_SHAPES, QUICK_DOC_SHAPES)
    else:
        sets = (tuple((T, D) for D in HEAD_DIMS for T in SEQ_LENS), GQA_SHAPES, DOC_SHAPES)
    return tuple((feature, T, D) for feature, shapes in zip(FEATURES, sets) for T, D in shapes)


def _features(shapes):
    return tuple(dict.fromkeys(feature for feature, _, _ in shapes))


def collect(args):
    """The benchmark protocol (bench/harness.py): (rows, meta_extra) of one run on CUDA."""
    shapes = shapes_for(args)
    fns, skipped = {}, {}
    for feature in _features(shapes):
        fns[feature], why = providers(args.no_compile, feature)
        skipped.update((skip_key(feature, name), reason) for name, reason in why.items())
    warmup, rep = harness.repetitions(args)
    rows = run(shapes, fns, skipped, warmup, rep, device=harness.device(),
               progress=getattr(args, "progress", None))
    return rows, {"skipped": skipped}


def cases(args):
    """The protocol's pytest-benchmark cases: (id, setup) per shape, provider and mode (the math
    reference only up to MATH_MAX_T); ids attention-T1024-D64-triton-fwd for causal rows and
    attention-<feature>-T1024-D64-... for the others."""
    shapes = shapes_for(args)
    found = []
    for feature in _features(shapes):
        fns, _ = providers(args.no_compile, feature)
        tag = "" if feature == "causal" else f"{feature}-"
        points = [(f"{tag}T{T}-D{D}", functools.partial(make_inputs, feature, T, D, harness.device()))
                  for f, T, D in shapes if f == feature]
        length = {label: make.args[1] for label, make in points}
        found += harness.provider_cases(OP, fns, points, prepare,
                                        keep=lambda name, label: name != "torch" or length[label] <= MATH_MAX_T)
    return found


def main(argv=None):
    return harness.bench_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    raise SystemExit(main())
