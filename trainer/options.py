"""Command-line options of train.py, their per-mode defaults, their checks, and what a resumed
run takes from its checkpoint.

Two modes: the offline demo (`--data demo`, bytes as tokens, the "demo" model, a wall-clock
budget) and GPT-2-tokenizer runs on token shards (the build-nanogpt recipe: 524288 tokens a step,
6e-4 peak learning rate, 715 warmup steps, 19073 steps = one pass over 10B FineWeb-Edu tokens).
"""
import argparse
import os

from tritongpt.data import prepare
from tritongpt.model.gpt import PRESETS

DATASETS = ("demo",) + prepare.DATASETS
# The demo's model: the "tiny" preset made wider and deeper (0.8M parameters), the size that two
# CPU cores train to recognisable words of the corpus within the demo's few minutes.
DEMO_MODEL = ("tiny", dict(n_layer=4, n_head=4, n_embd=128))
MODEL_PRESETS = ("demo",) + tuple(PRESETS)
MAX_SEQ_LEN = 16384  # position embeddings and attention grow with it; beyond this, a typo

# Defaults left as None by argparse are filled from the mode's table. Warmup is the table's
# value or a tenth of --max-steps, whichever is smaller (a short run must leave warmup).
# The demo takes many small steps (12 x 64 bytes): at this size, two CPU cores learn more words
# per second from 1900 small steps than from 300 of 4096 bytes (measured: validation 1.9 vs 2.6).
DEMO_DEFAULTS = dict(preset="demo", batch_size=12, seq_len=64, total_batch=None, max_steps=1900,
                     lr=2e-3, warmup_steps=100, eval_every=500, eval_batches=10, ckpt_every=500,
                     log_every=250, time_budget=240.0, kernel_check=True)
GPT2_DEFAULTS = dict(preset="gpt2", batch_size=64, seq_len=1024, total_batch=524288, max_steps=19073,
                     lr=6e-4, warmup_steps=715, eval_every=250, eval_batches=20, ckpt_every=1000,
                     log_every=1, time_budget=0.0, kernel_check=False)
# Options a resumed run may change: the length, cadence and schedule (a lower --lr after a
# non-finite loss) and where it runs; every other option changes what the checkpoint means, so it
# is taken from the checkpoint, and asking for another value is refused.
RESUMABLE_CHANGES = ("resume", "out_dir", "device", "compile", "kernels", "log_every", "plot", "samples",
                     "hellaswag", "max_steps", "lr", "warmup_steps", "eval_every", "eval_batches", "ckpt_every", "time_budget",
                     "overwrite", "tokenizer_dir", "pg_timeout", "kernel_check")
# Options newer than some checkpoints, with the value every run had before they existed: a
# checkpoint without one was written by a run with this value (so --doc-mask cannot be turned on
# when resuming a run that trained without it).
OPTIONS_BEFORE = dict(doc_mask=False)


def build_parser(description):
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--data", default="demo", help="demo (default, offline, bytes), shakespeare, fineweb-edu "
        "(shards under data/<name>/, made by `python -m tritongpt.data.prepare <name>`) or a directory of shards")
    add("--preset", help=f"model preset: {', '.join(MODEL_PRESETS)} (default: demo for the demo, gpt2 otherwise)")
    add("--kernels", default="auto", help='"auto" (default), "all", "none" or a comma list of '
        "layer_norm,attention,mlp,cross_entropy")
    add("--batch-size", type=int, help="sequences per micro-step per process")
    add("--seq-len", type=int, help="tokens per sequence")
    add("--total-batch", type=int, help="tokens per optimizer step over all processes; a multiple of "
        "batch-size * seq-len * processes, reached by gradient accumulation (default: no accumulation "
        "for the demo, 524288 otherwise)")
    add("--max-steps", type=int, help="optimizer steps")
    add("--time-budget", type=float, help="seconds from the start of the process after which training "
        "stops early, evaluates and checkpoints (0: none; default 240 for the demo, none otherwise)")
    add("--lr", type=float, help="peak learning rate (cosine decay to a tenth of it)")
    add("--warmup-steps", type=int, help="linear warmup steps (default: 100 for the demo, 715 "
        "otherwise, or a tenth of --max-steps if that is fewer)")
    add("--weight-decay", type=float, default=0.1, help="AdamW weight decay on 2-D parameters (default 0.1)")
    add("--eval-every", type=int, help="validation loss (and HellaSwag) every this many steps, and at the end")
    add("--eval-batches", type=int, help="validation micro-batches per evaluation")
    add("--hellaswag", choices=("auto", "on", "off"), default="auto",
        help="HellaSwag acc_norm at each evaluation (GPT-2-tokenizer runs only): on (downloads the "
             "file if needed), off, or auto (default: on when the file is already cached)")
    add("--samples", type=int, default=2, help="samples printed at each evaluation (default 2)")
    add("--log-every", type=int, help="console line every this many steps (log.jsonl gets every step)")
    add("--ckpt-every", type=int, help="checkpoint every this many steps (and always at the end)")
    add("--out-dir", default="out", help="log.jsonl, loss.png and ckpt.pt go here (default: out)")
    add("--overwrite", action="store_true", help="start a new run in an --out-dir that holds another "
        "run's log and checkpoint, replacing them")
    add("--resume", help='a checkpoint to continue from (its options are restored), or "auto" for '
        "<out-dir>/ckpt.pt when it exists")
    add("--tokenizer-dir", help="a folder with GPT-2's encoder.json and vocab.bpe (offline tokenizer)")
    add("--kernel-check", action=argparse.BooleanOptionalAction, help="before training, check the Triton "
        "kernels against the reference at tiny shapes, in a subprocess (in Triton's interpreter on a CPU); "
        "default: on for the demo")
    add("--doc-mask", action="store_true", help="attention stays inside documents: a token sees only "
        "the earlier tokens of its own document, documents starting at <|endoftext|> (GPT-2-token runs "
        "only; the demo's bytes have no such token). Fixed for the run: it cannot change on resume")
    add("--compile", action="store_true", help="torch.compile the model")
    add("--device", help="cpu, cuda or cuda:N (default: cuda when available; torchrun uses cuda:LOCAL_RANK)")
    add("--pg-timeout", type=float, default=300.0, help="seconds a process waits for the others under "
        "torchrun before the run ends with an error (default 300)")
    add("--seed", type=int, default=1337)
    add("--plot", metavar="LOG_JSONL", help="only draw <log>.png from a log.jsonl and exit")
    return p


def given_flags(parser, argv):
    """The destinations of the options argv names explicitly (not left to their defaults)."""
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def parse_args(argv, description="", world_size=1):
    """Parse and check argv; exits with status 2 and a message on a bad value. args.given is the
    set of options argv named explicitly (what a resumed run may be asked to change)."""
    p = build_parser(description)
    args = p.parse_args(argv)
    args.given = given_flags(build_parser(description), argv)
    if args.plot:
        return args
    defaults = DEMO_DEFAULTS if args.data == "demo" else GPT2_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            value = min(value, max(1, args.max_steps // 10)) if key == "warmup_steps" else value
            setattr(args, key, value)
    if args.total_batch is None:
        args.total_batch = args.batch_size * args.seq_len * world_size
    error = check(args, world_size)
    if error:
        p.error(error)
    args.grad_accum = args.total_batch // (args.batch_size * args.seq_len * world_size)
    args.world_size = world_size
    return args


def check(args, world_size):
    """The first problem with args as a message, or None."""
    for flag in ("batch_size", "seq_len", "total_batch", "max_steps", "eval_every", "eval_batches",
                 "log_every", "ckpt_every"):
        if getattr(args, flag) < 1:
            return f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}"
    if args.samples < 0 or args.warmup_steps < 0:
        return "--samples and --warmup-steps must be non-negative"
    if not 0 < args.lr < float("inf"):
        return f"--lr must be a positive number, got {args.lr}"
    if not 0 <= args.weight_decay < float("inf"):
        return f"--weight-decay must be non-negative, got {args.weight_decay}"
    if not 0 <= args.time_budget < float("inf") or not 0 < args.pg_timeout < float("inf"):
        return "--time-budget must be non-negative and --pg-timeout positive"
    if args.seq_len > MAX_SEQ_LEN:
        return f"--seq-len {args.seq_len} is too long: at most {MAX_SEQ_LEN}"
    if args.preset not in MODEL_PRESETS:
        return f"--preset {args.preset!r} is not one of {', '.join(MODEL_PRESETS)}"
    per_micro = args.batch_size * args.seq_len * world_size
    if args.total_batch % per_micro:
        return (f"--total-batch {args.total_batch} must be a multiple of batch-size * seq-len * processes"
                f" = {args.batch_size} * {args.seq_len} * {world_size} = {per_micro}")
    if args.data not in DATASETS and not os.path.isdir(args.data):
        return f"--data {args.data!r} is not one of {', '.join(DATASETS)} nor a directory"
    if args.data == "demo" and args.hellaswag == "on":
        return "--hellaswag on needs the GPT-2 tokenizer: use it with --data shakespeare, fineweb-edu or shards"
    resuming_elsewhere = args.resume and "data" not in args.given  # --data then comes from the checkpoint
    if args.data == "demo" and args.doc_mask and not resuming_elsewhere:
        return ("--doc-mask needs GPT-2 tokens: it masks attention at <|endoftext|>, which the demo's bytes "
                "do not have; use it with --data shakespeare, fineweb-edu or shards")
    if args.resume not in (None, "auto") and not os.path.isfile(args.resume):
        return f"--resume {args.resume!r}: no such checkpoint file"
    return None


def model_preset(name):
    """(GPT preset, field overrides) of a --preset name."""
    return DEMO_MODEL if name == "demo" else (name, {})


def resumed(args, saved, path):
    """The options of a run resumed from the checkpoint at path, whose options were `saved`:
    the saved ones, with the flags given now where they may change (RESUMABLE_CHANGES).
    ValueError naming the option for any other flag asking for a different value. An option the
    checkpoint predates takes its OPTIONS_BEFORE value, what that run trained with."""
    saved = {**OPTIONS_BEFORE, **saved}
    for key in sorted(args.given - set(RESUMABLE_CHANGES)):
        if key in saved and saved[key] != getattr(args, key):
            flag = "--" + key.replace("_", "-")
            raise ValueError(f"{flag} {getattr(args, key)} differs from {saved[key]} in {path}: it cannot "
                             f"change on resume (start a new run in another --out-dir instead)")
    merged = argparse.Namespace(**{**vars(args), **{k: v for k, v in saved.items() if k not in RESUMABLE_CHANGES}})
    for key in RESUMABLE_CHANGES:  # not given now: the checkpoint's value where it has one
        if key not in args.given and key in saved and key not in ("resume", "out_dir", "overwrite"):
            setattr(merged, key, saved[key])
    return merged
