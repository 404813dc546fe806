"""Benchmark one GPT-2 124M training step with every kernel combination, eager and compiled.

    python bench/bench_model.py [--quick] [--no-compile] [--out-dir bench/results]
    python -m tritongpt.bench.bench_model ...

One step = forward under bf16 autocast (T = 1024, random tokens), loss.backward(), AdamW.step()
(fused), zero_grad. Model variants, by provider (op "train_step", mode "fwd_bwd"):

- torch: kernels "none" (the PyTorch reference GPT-2), eager; torch_compile: the same compiled
- triton:<op>: only that kernel on, for each op in model.gpt.available_kernels(), eager
- triton: every available kernel on ("all"), eager; triton+compile: the same compiled
- triton:<op>+compile: one kernel on, compiled (full runs only)

Batch sizes: B = 16 and the largest batch that fits. The largest is found once, with the
reference model eager, by trying B in BATCH_CANDIDATES from the top until a step runs without
running out of memory; every variant is then measured at that B (so ratios compare equal work),
and a variant that runs out of memory there is recorded in meta["skipped"]. The search is in
meta["batch_search"], the result in meta["max_batch"]. --quick compiles only torch_compile and
triton+compile, at B = 16; a full run compiles every variant at both batch sizes. Variants run
most important first (`variants`), and under `python -m tritongpt.bench` the rows are saved after each
one, so a run cut short keeps the headline numbers.

Numbers per row: time (median of many steps, triton.testing.do_bench, after WARMUP_STEPS
untimed steps that also absorb compilation), tokens_per_s = B*T / time, tflops and mfu from the
standard count of FLOPs per token (nanoGPT's estimate_mfu, after the PaLM paper, appendix B):

    6*N + 12*L*C*T      N = parameters without the position embedding (the tied wte/lm_head
                         counted once), L layers, C width, T sequence length

6*N is the weight matmuls: per token and weight, one multiply-add (2 FLOPs) forward and two
backward (the input's and the weight's gradients). 12*L*C*T is attention's QK^T and AV (2*T*C
FLOPs each per token and layer forward, times 3 for forward plus backward), over
the full T x T matrix although a causal kernel computes about half of it: the usual convention, so
MFU compares with other reports. mfu = FLOP/s over PEAK_TFLOPS (989, an H100 SXM's dense bf16
peak), whatever GPU ran it. peak_mem_mb is the whole step's high-water mark (weights, gradients,
optimizer state and activations), torch.cuda.max_memory_allocated.
"""
import gc
import sys
from typing import NamedTuple

import torch

from tritongpt.bench import harness, report
from tritongpt.model.gpt import flops_per_token  # (6*N + 12*L*C*T, see the docstring)

OP = "train_step"
OPS = (OP,)
PRESET = "gpt2"
T = 1024
FIXED_BATCH = 16
BATCH_CANDIDATES = (64, 48, 32, 24, 16)
PEAK_TFLOPS = 989.0  # H100 SXM, dense bf16 (no sparsity)
DTYPE = torch.bfloat16
WARMUP_STEPS = 3  # untimed steps before timing: compilation, allocator and optimizer-state warm-up
COMPILE_BACKEND = "inductor"  # torch.compile's backend for the compiled variants
# A smoke run (harness.smoke_constants): the tiny preset, one batch size, no extra warm-up step
# (time_ms's first call is one), and torch.compile's aot_eager backend: it traces the model and its
# backward (what breaks when a kernel's custom op does not trace) without Inductor's code
# generation, which on CPU is C++, not the GPU's Triton, and takes about a minute per variant.
SMOKE = {"PRESET": "tiny", "T": 16, "FIXED_BATCH": 1, "BATCH_CANDIDATES": (1,), "WARMUP_STEPS": 0,
         "COMPILE_BACKEND": "aot_eager"}


class Variant(NamedTuple):
    provider: str  # the row's provider
    kernels: str   # GPTConfig.kernels
    compiled: bool
    batch: int


# --- arithmetic ------------------------------------------------------------------------------

def model_flops_per_token(config, seq_len=T):
    """flops_per_token for a GPTConfig, counting its parameters on the meta device (no memory)."""
    from tritongpt.model.gpt import GPT

    with torch.device("meta"):
        n_params = GPT(config).num_params(non_embedding=True)
    return flops_per_token(n_params, config.n_layer, config.n_embd, seq_len)


def tokens_per_s(batch, seq_len, ms):
    return batch * seq_len / (ms / 1e3)


def mfu(flops, ms, peak_tflops=PEAK_TFLOPS):
    """Fraction of peak_tflops that `flops` FLOPs in `ms` milliseconds achieve."""
    return harness.tflops(flops, ms) / peak_tflops


# --- what to run -----------------------------------------------------------------------------

def compiled_provider(provider):
    """The provider name of a variant's compiled twin: torch -> torch_compile, triton ->
    triton+compile, triton:<op> -> triton:<op>+compile."""
    return {"torch": "torch_compile", "triton": "triton+compile"}.get(provider,
                                                                      provider + harness.COMPILE_SUFFIX)


def variants(available, max_batch, quick=False, no_compile=False):
    """The Variants to measure, most important first, so that a run cut short keeps the headline
    numbers: per batch (B = 16, then the largest), the reference and all-kernels models eager,
    then compiled, then each single kernel eager, then compiled (not in quick runs). Quick runs
    compile only at B = 16."""
    batches = [FIXED_BATCH] + ([max_batch] if max_batch != FIXED_BATCH else [])
    headline = [("torch", "none")] + ([("triton", "all")] if available else [])
    # with a single kernel available, "triton:<op>" would repeat "triton"
    singles = [(f"triton:{op}", op) for op in available] if len(available) > 1 else []
    plan = []
    for batch in batches:
        compile_here = not no_compile and (not quick or batch == FIXED_BATCH)
        plan += [Variant(p, k, False, batch) for p, k in headline]
        if compile_here:
            plan += [Variant(compiled_provider(p), k, True, batch) for p, k in headline]
        plan += [Variant(p, k, False, batch) for p, k in singles]
        if compile_here and not quick:
            plan += [Variant(compiled_provider(p), k, True, batch) for p, k in singles]
    return plan


def find_max_batch(try_batch, candidates=BATCH_CANDIDATES):
    """(largest B in candidates for which try_batch(B) runs, or None; {B: "fits" or "out of
    memory"} for every B tried). try_batch raises torch.OutOfMemoryError when B does not fit;
    any other error propagates."""
    tried = {}
    for batch in sorted(candidates, reverse=True):
        try:
            try_batch(batch)
            fits = True
        except torch.OutOfMemoryError:
            fits = False
        # outside the except clause, so the traceback (and the tensors its frames hold) is gone
        tried[batch] = "fits" if fits else "out of memory"
        if fits:
            return batch, tried
        release_memory()
    return None, tried


def release_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- one training step -------------------------------------------------------------------------

def build(kernels, compiled, device="cuda", preset=PRESET):
    """(model, the callable the step runs (the model or its compiled version), AdamW)."""
    from tritongpt.model.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    config = GPTConfig.from_name(preset, kernels=kernels, dropout=0.0)
    with torch.device(device):  # initialise on the device: fast, and no CPU copy
        model = GPT(config)
    model.train()
    is_cuda = torch.device(device).type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=is_cuda)
    forward = torch.compile(model, dynamic=False, backend=COMPILE_BACKEND) if compiled else model
    return model, forward, opt


def make_batch(batch, seq_len, vocab_size, device="cuda"):
    idx = torch.randint(0, vocab_size, (batch, seq_len + 1), device=device)
    return idx[:, :-1].contiguous(), idx[:, 1:].contiguous()


def make_step(forward, opt, idx, targets):
    """One full training step: bf16-autocast forward, backward, optimizer step, zero_grad."""
    def step():
        with torch.autocast(idx.device.type, dtype=DTYPE):
            _, loss = forward(idx, targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step


def step_at(variant, device="cuda", preset=PRESET, seq_len=T):
    """A ready-to-run step function for `variant`."""
    model, forward, opt = build(variant.kernels, variant.compiled, device, preset)
    idx, targets = make_batch(variant.batch, seq_len, model.config.vocab_size, device)
    return make_step(forward, opt, idx, targets)


def measure(variant, warmup, rep, device="cuda"):
    """(time_ms dict, peak MiB of one step) of `variant`, after WARMUP_STEPS steps; on CPU (a
    smoke run) the peak is None."""
    step = step_at(variant, device, PRESET, T)
    for _ in range(WARMUP_STEPS):
        step()
    timing = harness.time_ms(step, warmup=warmup, rep=rep)
    if device != "cuda":
        return timing, None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return timing, torch.cuda.max_memory_allocated() / 2**20


def run(plan, measure_fn, flops_tok, skipped, seq_len=T, progress=None):
    """Rows for every Variant in plan; measure_fn(variant) -> (timing, peak MiB). A variant that
    runs out of memory or fails is recorded in skipped and the others still run. progress(rows),
    when given, gets the rows so far after every variant (collect binds the meta to it)."""
    rows = []
    for v in plan:
        key = f"{OP}:{v.provider}@B={v.batch}"
        try:
            timing, mem = measure_fn(v)
        except Exception as e:  # noqa: BLE001  (one variant's failure is data, not the end)
            skipped[key] = ("out of memory" if isinstance(e, torch.OutOfMemoryError)
                            else f"failed: {harness.error_summary(e)}")
            print(f"{key}: skipped, {skipped[key]}", flush=True)
            continue
        finally:
            release_memory()
            if v.compiled:
                torch._dynamo.reset()
        flops = flops_tok * v.batch * seq_len
        rows.append(harness.make_row(
            OP, v.provider, "fwd_bwd", DTYPE, {"B": v.batch, "T": seq_len}, timing,
            tflops=harness.tflops(flops, timing["ms"]), peak_mem_mb=mem,
            tokens_per_s=tokens_per_s(v.batch, seq_len, timing["ms"]), mfu=mfu(flops, timing["ms"]),
            kernels=v.kernels))
        print(f"{key}: {timing['ms']:.1f} ms, {rows[-1]['tokens_per_s']:,.0f} tokens/s, "
              f"MFU {rows[-1]['mfu']:.1%}, peak {report.cell(mem, '{:,.0f}')} MiB", flush=True)
        if progress is not None:
            progress(rows)
    return rows


def collect(args):
    """The benchmark protocol (bench/harness.py): (rows, meta_extra) of one run on CUDA."""
    from tritongpt.model.gpt import GPTConfig, available_kernels

    device = harness.device()

    def try_batch(batch):
        # two steps: the second also holds the optimizer state the first one creates
        step = step_at(Variant("torch", "none", False, batch), device, PRESET, T)
        step()
        step()
        harness.synchronize()

    max_batch, tried = find_max_batch(try_batch, BATCH_CANDIDATES)
    release_memory()
    search = ", ".join(f"B={b}: {why}" for b, why in tried.items())
    print(f"largest batch that fits (reference model, eager): {max_batch} ({search})", flush=True)
    meta = {"max_batch": max_batch, "batch_search": search, "peak_tflops": PEAK_TFLOPS, "skipped": {}}
    if max_batch is None:
        meta["skipped"][OP] = f"no batch in {BATCH_CANDIDATES} fits ({search})"
        return [], meta
    plan = variants(available_kernels(), max_batch, args.quick, args.no_compile)
    if getattr(args, "smoke", False):
        warmup, rep = harness.repetitions(args)
    else:
        warmup, rep = (100, 500) if args.quick else (300, 1500)
    flops_tok = model_flops_per_token(GPTConfig.from_name(PRESET), T)
    save = getattr(args, "progress", None)
    progress = (lambda rows: save(rows, meta)) if save else None
    rows = run(plan, lambda v: measure(v, warmup, rep, device), flops_tok, meta["skipped"], seq_len=T,
               progress=progress)
    return rows, meta


def main(argv=None):
    return harness.bench_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    raise SystemExit(main())
