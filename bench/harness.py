"""Shared plumbing for the benchmarks: timing, memory, throughput, machine metadata, results files,
and the one protocol every benchmark module follows.

The protocol. `python -m tritongpt.bench` runs every module `bench/bench_<name>.py` that has:

    OPS = ("layer_norm",)            # the DESIGN.md op names its rows carry (for --only)
    def collect(args): ...           # -> (rows, meta_extra); runs on CUDA only, writes nothing
    def main(argv=None):             # the script entry point, the same for every module:
        return harness.bench_main(sys.modules[__name__], argv)

- args is the namespace of `arg_parser()`: args.quick, args.no_compile, args.out_dir and
  args.only (a tuple of op names, or None for all); `wants(args, op)` says whether to run an op.
  Under the suite args.progress is also set: a long module may call args.progress(rows so far,
  meta_extra so far) (find it with `getattr(args, "progress", None)`), and the suite saves them,
  so a run cut short keeps them.
- rows: `make_row` dicts. meta_extra: a dict merged into the results file's meta (for example
  copy_gbps); its "skipped" entry maps "<op>:<provider>" to why that provider did not run.
- Optional, for smoke runs (`--smoke`): `SMOKE = {"CONSTANT": value, ...}`, the module constants
  (shapes, the model preset) that `smoke_constants` replaces while collect or the cases run, so a
  smoke run goes through the same code at tiny sizes. collect and cases put their tensors on
  `device()` (CUDA, else CPU, which only a smoke run uses).
- Optional, for `pytest bench --benchmark-only` (bench/test_benchmarks.py):
  `cases(args)` yields (case_id, setup) where setup() builds the inputs and returns (fn, leaves):
  fn is the callable to time, leaves the tensors whose .grad is set to None before each run.
  A module without `cases` is simply not part of the pytest-benchmark run.

`bench_main` parses the shared flags, skips with a message (exit 0) without CUDA (unless --smoke), calls collect,
writes one results file named after the module (bench_cross_entropy.py -> cross_entropy-...json)
and prints the rendered tables. The suite (bench/__main__.py) calls collect of every module in one
process, merges the rows and metas into one file, and renders the report.

Timing uses `triton.testing.do_bench` (median and 20th/80th percentiles of many runs). In the Triton
versions this project supports (3.6 on the GPU machine, 3.9 on CI) do_bench zeroes a 256 MB
buffer before every timed run (`runtime.driver.active.clear_cache`), outside the timed region,
which evicts the inputs from L2 (50 MB on an H100). Inputs that would fit in L2, such as
a 16384 x 768 bf16 activation (25 MB), are therefore still read from HBM in every timed run, and
no input rotation is needed.

Smoke runs (`--smoke`, for CI): every module, provider and mode at tiny shapes (each module's SMOKE)
with a few repetitions, through the same code as a GPU run, into a temporary folder by default.
Without CUDA our kernels run in Triton's interpreter (`use_interpreter`), `time_ms` times with the
CPU clock and peak memory is not measured (None). The results file's meta says "smoke": true and
names the "device"; `python -m tritongpt.bench.readme_table` ignores such files. In a smoke run an
optional provider that fails (a skip reason starting "failed", see `failures`) fails the run too:
CI must notice a provider that would crash on the GPU.

A results file is {"meta": {...}, "rows": [...]} with the keys DESIGN.md lists (META_KEYS, ROW_KEYS);
`make_row` builds a row and checks it, `write_results` / `load_results` write and read a file and
check every row again. Extra keys are allowed on rows (ceiling_frac, tokens_per_s, mfu, kernels)
and in meta (copy_gbps, matmul_tflops, skipped, and bench_model's max_batch, batch_search,
peak_tflops).
"""
import argparse
import functools
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "bench" / "results"

OPS = ("layer_norm", "attention", "mlp", "cross_entropy", "linear_cross_entropy", "train_step")
PROVIDERS = ("triton", "torch", "torch_compile", "torch_chunked", "triton_gemm", "sdpa_flash", "sdpa_cudnn",
             "sdpa_efficient", "flex_attention", "liger")
MODES = ("fwd", "bwd", "fwd_bwd")
# The kernels a train_step row may name as "triton:<kernel>[,<kernel>...]" (GPTConfig.kernels names).
MODEL_KERNELS = ("layer_norm", "attention", "mlp", "cross_entropy")
COMPILE_SUFFIX = "+compile"  # a train_step provider compiled with torch.compile
TRAIN_STEP_KEYS = ("tokens_per_s", "mfu")
NUMERIC_KEYS = ("gbps", "tflops", "peak_mem_mb", "ceiling_frac") + TRAIN_STEP_KEYS

META_KEYS = ("gpu", "driver", "torch", "triton", "cuda", "commit", "date", "command")
ROW_KEYS = ("op", "provider", "mode", "dtype", "shape", "ms", "ms_p20", "ms_p80",
            "gbps", "tflops", "peak_mem_mb")
DATE_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


# --- measuring --------------------------------------------------------------------------------

def time_ms(fn, warmup=25, rep=100, grad_to_none=None):
    """Median, 20th and 80th percentile run time of fn() in ms, as dict(ms, ms_p20, ms_p80).

    warmup and rep are budgets in ms (do_bench's meaning). grad_to_none: tensors whose .grad is set
    to None before every timed run, outside the timed region, so a backward never accumulates.
    Without CUDA (smoke runs) it times with the CPU clock instead: cpu_time_ms.
    """
    if not torch.cuda.is_available():
        return cpu_time_ms(fn, rep, grad_to_none)
    from triton.testing import do_bench

    ms, p20, p80 = do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none,
                            quantiles=[0.5, 0.2, 0.8])
    return {"ms": ms, "ms_p20": p20, "ms_p80": p80}


CPU_MAX_RUNS = 3  # timed runs of one measurement on CPU: a smoke run checks the code, not the speed


def cpu_time_ms(fn, rep, grad_to_none=None):
    """time_ms on CPU: one untimed warm-up call (it compiles), then as many calls as fit in rep ms,
    at least one and at most CPU_MAX_RUNS, timed with time.perf_counter."""
    def once():
        for t in grad_to_none or ():
            t.grad = None
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    first = once()
    runs = min(CPU_MAX_RUNS, max(1, int(rep / max(first, 1e-6))))
    times = torch.tensor([once() for _ in range(runs)], dtype=torch.float64)
    ms, p20, p80 = times.quantile(torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64)).tolist()
    return {"ms": ms, "ms_p20": p20, "ms_p80": p80}


def peak_memory_mb(fn):
    """Peak CUDA memory that one call of fn() allocates, in MiB, beyond what was allocated before.

    The inputs (and anything else the caller holds, such as a saved forward graph before a
    backward) are allocated before the call and are not counted; what is counted is every tensor
    the call creates, outputs and saved activations included, at its high-water mark. That makes
    the number comparable across providers that share the same inputs. Without CUDA: None, and fn
    is not called (CPU memory is not measured).
    """
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def time_and_peak(run, leaves, warmup, rep):
    """(time_ms dict, peak MiB) of run(), whose backward (if any) writes into leaves' .grad.

    Gradients are cleared before every timed run and before the memory measurement: grads left
    over from warm-up would otherwise be freed inside the measured call and hide the new ones.
    """
    timing = time_ms(run, warmup=warmup, rep=rep, grad_to_none=leaves)
    for t in leaves:
        t.grad = None
    mem = peak_memory_mb(run)
    for t in leaves:
        t.grad = None
    return timing, mem


def gbps(nbytes, ms):
    """Throughput in GB/s (1e9 bytes per second) for nbytes moved in ms milliseconds."""
    return nbytes / ms / 1e6


def tflops(flops, ms):
    """Throughput in TFLOP/s (1e12 per second) for flops done in ms milliseconds."""
    return flops / ms / 1e9


@functools.lru_cache(maxsize=None)
def copy_bandwidth_gbps(device="cuda", nbytes=2**30):
    """The measured bandwidth ceiling: GB/s of a device-to-device copy of nbytes (1 GiB),
    counting the bytes read plus the bytes written. Cached per process and arguments, so every
    benchmark of a suite run divides by the number that its meta records."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    timing = time_ms(lambda: dst.copy_(src))
    del src, dst
    empty_cache()
    return gbps(2 * nbytes, timing["ms"])


@functools.lru_cache(maxsize=None)
def matmul_tflops(device="cuda", n=8192, dtype=torch.bfloat16):
    """The measured compute ceiling: TFLOP/s of one n x n x n matmul in dtype (bf16), measured
    once per process (cached)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    timing = time_ms(lambda: a @ b)
    del a, b
    empty_cache()
    return tflops(2 * n**3, timing["ms"])


# The ceilings of a smoke run: small enough for a CPU (a 16 MiB copy, a 256^3 matmul).
SMOKE_COPY_BYTES = 2**24
SMOKE_MATMUL_N = 256


def copy_ceiling_gbps(args):
    """copy_bandwidth_gbps with the arguments of this run (small for a smoke run); every caller in
    one process passes the same ones, so they share one cached measurement."""
    if getattr(args, "smoke", False):
        return copy_bandwidth_gbps(device(), SMOKE_COPY_BYTES)
    return copy_bandwidth_gbps("cuda")


def matmul_ceiling_tflops(args):
    """matmul_tflops with the arguments of this run (small for a smoke run), cached like copy_ceiling_gbps."""
    if getattr(args, "smoke", False):
        return matmul_tflops(device(), SMOKE_MATMUL_N)
    return matmul_tflops("cuda")


def empty_cache():
    """torch.cuda.empty_cache() where there is CUDA; nothing on CPU."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def synchronize():
    """torch.cuda.synchronize() where there is CUDA; nothing on CPU (it runs synchronously)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def error_summary(e):
    """'RuntimeError: <first line of the message>' (200 characters at most), for meta["skipped"]."""
    first = (str(e).strip().splitlines() or [""])[0][:200]
    return f"{type(e).__name__}: {first}"


def measure_providers(fns, modes, measure, args, skipped, optional, where, prefix=""):
    """Yield (name, mode, measure(fn, mode, *args)) for every provider in fns and every mode.

    A provider in `optional` that raises is dropped from fns (for later shapes too) and the reason
    recorded in skipped[prefix + name] (meta["skipped"] of a results file) and printed; where
    names the shape. Any other provider's error propagates.
    """
    for name, fn in list(fns.items()):
        for mode in modes:
            try:
                result = measure(fn, mode, *args)
            except Exception as e:  # noqa: BLE001  (an optional provider's failure is data)
                if name not in optional:
                    raise
                skipped[prefix + name] = f"failed at {where} {mode}: {error_summary(e)}"
                print(f"{prefix}{name}: skipped, {skipped[prefix + name]}")
                del fns[name]
                break
            yield name, mode, result



def timer(prepare):
    """A module's `measure(fn, mode, inputs, warmup, rep)` -> (time_ms dict, peak MiB), from its
    prepare(fn, mode, inputs) -> (callable to time, leaves whose grads are reset)."""
    return functools.partial(_time_prepared, prepare)


def _time_prepared(prepare, fn, mode, inputs, warmup, rep):
    return time_and_peak(*prepare(fn, mode, inputs), warmup, rep)


def repetitions(args):
    """(warmup, rep) of do_bench for a run, in ms: fewer with --quick, the fewest with --smoke."""
    if getattr(args, "smoke", False):
        return 1, 1
    return (5, 20) if args.quick else (25, 100)


def keyed_skips(op, skipped):
    """A module's {provider: why} keyed as the protocol's meta["skipped"]: {"<op>:<provider>": why}."""
    return {f"{op}:{name}": why for name, why in skipped.items()}


def sweep(op, fns, points, measure, warmup, rep, skipped, optional, metrics, dtype):
    """Rows of one op: every provider in every mode at every point (the usual body of `run`).

    points: (label, make_inputs, shape) triples, make_inputs() building the inputs of `measure`
    and shape the row's shape dict; metrics(shape, mode, ms) -> make_row's rate keywords (gbps,
    tflops, ceiling_frac). Optional providers that fail are dropped as measure_providers says.
    """
    rows = []
    for label, make_inputs, shape in points:
        inputs = make_inputs()
        results = measure_providers(fns, MODES, measure, (inputs, warmup, rep), skipped, optional, label,
                                    prefix=f"{op}:")
        for name, mode, (timing, mem) in results:
            rows.append(make_row(op, name, mode, dtype, shape, timing, peak_mem_mb=mem,
                                 **metrics(shape, mode, timing["ms"])))
        del inputs
        empty_cache()
    return rows


def provider_cases(op, fns, points, prepare, keep=None):
    """The protocol's pytest-benchmark cases for one op: (id, setup) per point, provider and mode.

    points: (label, make_inputs) pairs; prepare(fn, mode, inputs) -> (callable to time, leaves),
    the same function the module's `measure` times; keep(name, label) may leave a provider out.
    """
    for label, make_inputs in points:
        for name, fn in fns.items():
            if keep is None or keep(name, label):
                for mode in MODES:
                    yield f"{op}-{label}-{name}-{mode}", functools.partial(_case, prepare, fn, mode, make_inputs)


def _case(prepare, fn, mode, make_inputs):
    return prepare(fn, mode, make_inputs())


# --- the machine --------------------------------------------------------------------------------

def device():
    """The device a benchmark puts its tensors on: "cuda", else "cpu" (only smoke runs get there)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def use_interpreter():
    """Make sure our kernels can run here: without CUDA, in Triton's interpreter.

    Triton reads TRITON_INTERPRET when a kernel is decorated, and importing `tritongpt` (which any
    `python -m tritongpt.bench...` does first) has already decorated them; so without CUDA, when the
    variable is not set, this process is replaced by the same command line with it set.
    """
    from tritongpt.kernels._utils import interpreting

    if torch.cuda.is_available() or interpreting():
        return
    print("no CUDA: running the kernels in Triton's interpreter (TRITON_INTERPRET=1)", flush=True)
    sys.stdout.flush()
    os.execve(sys.executable, sys.orig_argv, dict(os.environ, TRITON_INTERPRET="1"))


def require_cuda(what):
    """True when a CUDA GPU is available; else print why `what` is skipped and return False."""
    if torch.cuda.is_available():
        return True
    print(f"{what}: skipped, needs a CUDA GPU (none found)")
    return False


def _command_output(cmd):
    """First line of cmd's stdout, or None when the command is missing or fails."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.strip().splitlines()
    return lines[0].strip() if lines else None


def utc_now():
    return datetime.now(timezone.utc).strftime(DATE_FORMAT)


def _repo_relative(path):
    try:
        return Path(path).resolve().relative_to(REPO_ROOT).as_posix()
    except (ValueError, OSError):
        return path


def machine_meta(command=None):
    """The "meta" block of a results file. command defaults to this process's command line."""
    import triton

    if command is None:
        command = shlex.join(["python", _repo_relative(sys.argv[0])] + sys.argv[1:])
    has_cuda = torch.cuda.is_available()
    return {
        "gpu": torch.cuda.get_device_name() if has_cuda else None,
        "driver": _command_output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        # a copy of the tree without .git (a GPU machine's) can name its commit in TRITONGPT_COMMIT
        "commit": (os.environ.get("TRITONGPT_COMMIT")
                   or _command_output(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"])),
        "date": utc_now(),
        "command": command,
    }


def smoke_meta():
    """What marks a smoke run's results file (never a measurement to publish): merged into its meta."""
    return {"smoke": True, "device": device()}


def is_smoke(meta):
    """True for the meta of a smoke run, or of any run without a GPU."""
    return bool(meta.get("smoke")) or not meta.get("gpu")


def failures(meta):
    """{name: why} of the skips in meta that are failures (reason "failed ..."), not choices such as
    "not installed", "--no-compile" or "needs CUDA"."""
    return {k: v for k, v in (meta.get("skipped") or {}).items() if str(v).startswith("failed")}


@contextmanager
def smoke_constants(module, smoke=True):
    """While in the block, a smoke run's module has its SMOKE constants (tiny shapes) in place of
    its own; they are put back afterwards. Does nothing unless smoke."""
    values = getattr(module, "SMOKE", {}) if smoke else {}
    saved = {name: getattr(module, name) for name in values}
    try:
        for name, value in values.items():
            setattr(module, name, value)
        yield module
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


# --- rows and files --------------------------------------------------------------------------

def dtype_name(dtype):
    """"bfloat16" for torch.bfloat16 or "bfloat16"; ValueError for anything that is not a torch dtype."""
    name = str(dtype).replace("torch.", "")
    if not isinstance(getattr(torch, name, None), torch.dtype):
        raise ValueError(f"dtype must be a torch dtype or its name, got {dtype!r}")
    return name


def _check_provider(op, provider):
    if provider in PROVIDERS:
        return
    if op == "train_step":
        # the model's own providers: triton+compile (every kernel, compiled) and
        # triton:<kernel>[,<kernel>...] (those kernels on), eager or with a "+compile" suffix
        name = provider[:-len(COMPILE_SUFFIX)] if provider.endswith(COMPILE_SUFFIX) else provider
        if name == "triton" and name != provider:
            return
        kernels = name.split(":", 1)[1].split(",") if name.startswith("triton:") else []
        if kernels and all(k in MODEL_KERNELS for k in kernels):
            return
    raise ValueError(f"provider must be one of {PROVIDERS} (train_step rows also 'triton+compile' or "
                     f"'triton:<kernel>[,<kernel>][+compile]' with kernels from {MODEL_KERNELS}), "
                     f"got {provider!r}")


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_optional_number(row, key):
    v = row.get(key)
    if v is not None and not (_is_number(v) and v >= 0):
        raise ValueError(f"{key} must be a non-negative number or None, got {v!r}")


def validate_row(row):
    """Raise ValueError naming the field unless row is a valid results row; return row."""
    missing = [k for k in ROW_KEYS if k not in row]
    if missing:
        raise ValueError(f"row is missing keys {missing}: {row}")
    if row["op"] not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {row['op']!r}")
    _check_provider(row["op"], row["provider"])
    if row["mode"] not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {row['mode']!r}")
    if dtype_name(row["dtype"]) != row["dtype"]:
        raise ValueError(f"dtype must be a dtype name such as 'bfloat16', got {row['dtype']!r}")
    shape = row["shape"]
    if not (isinstance(shape, dict) and shape
            and all(isinstance(k, str) and isinstance(v, int) and v > 0 for k, v in shape.items())):
        raise ValueError(f"shape must be a non-empty dict of positive ints, got {shape!r}")
    times = [row[k] for k in ("ms_p20", "ms", "ms_p80")]
    if not (all(_is_number(t) and t > 0 for t in times) and times == sorted(times)):
        raise ValueError(f"need 0 < ms_p20 <= ms <= ms_p80, got {times}")
    for key in NUMERIC_KEYS:
        _check_optional_number(row, key)
    for key in row.keys() - set(ROW_KEYS):
        if not (row[key] is None or isinstance(row[key], (str, int, float))):
            raise ValueError(f"extra key {key} must hold a number, string or None, got {row[key]!r}")
    if row["op"] == "train_step":
        for key in TRAIN_STEP_KEYS:
            if row.get(key) is None:
                raise ValueError(f"train_step rows need {key}, got {row.get(key)!r}")
    return row


def make_row(op, provider, mode, dtype, shape, timing, gbps=None, tflops=None, peak_mem_mb=None,
             **extra):
    """One results row in the DESIGN.md format, checked. timing is time_ms's dict; extra keys
    (ceiling_frac, tokens_per_s, mfu, ...) are appended after the standard ones."""
    clash = [k for k in extra if k in ROW_KEYS]
    if clash:
        raise ValueError(f"extra keys {clash} clash with the standard row keys")
    row = {"op": op, "provider": provider, "mode": mode, "dtype": dtype_name(dtype),
           "shape": dict(shape), "ms": timing["ms"], "ms_p20": timing["ms_p20"],
           "ms_p80": timing["ms_p80"], "gbps": gbps, "tflops": tflops, "peak_mem_mb": peak_mem_mb}
    row.update(extra)
    for key, v in row.items():
        if isinstance(v, float):
            row[key] = round(v, 6)
    return validate_row(row)


def validate_results(data):
    """Raise ValueError unless data is {"meta": {...}, "rows": [...]} in the DESIGN.md format."""
    if not isinstance(data, dict) or set(data) != {"meta", "rows"}:
        raise ValueError("a results file holds exactly the keys 'meta' and 'rows'")
    meta = data["meta"]
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise ValueError(f"meta is missing keys {missing}")
    for key in META_KEYS:
        if meta[key] is not None and not isinstance(meta[key], str):
            raise ValueError(f"meta {key} must be a string or null, got {meta[key]!r}")
    if not isinstance(data["rows"], list):
        raise ValueError("rows must be a list")
    for row in data["rows"]:
        validate_row(row)
    return data


def slug(text):
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9_]+", "-", str(text).lower()).strip("-") or "unknown"


def results_name(rows, meta, name=None):
    """<op-or-suite>-<gpu-slug>-<YYYYmmddTHHMMSS>.json; name defaults to the one op of all rows,
    else 'suite'."""
    if name is None:
        ops = {row["op"] for row in rows}
        name = ops.pop() if len(ops) == 1 else "suite"
    try:
        stamp = datetime.strptime(meta["date"], DATE_FORMAT)
    except (KeyError, TypeError, ValueError):
        stamp = datetime.now(timezone.utc)
    return f"{slug(name)}-{slug(meta.get('gpu') or 'cpu')}-{stamp:%Y%m%dT%H%M%S}.json"


def new_results_path(rows, meta, out_dir=RESULTS_DIR, name=None):
    """A path in out_dir (created) named by results_name that no file has yet."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = results_name(rows, meta, name)
    path, n = out_dir / base, 1
    while path.exists():
        n += 1
        path = out_dir / f"{base[:-5]}-{n}.json"
    return path


def dump_results(path, rows, meta):
    """Check and write one results file at path (one row per line, for readable diffs), replacing it."""
    data = validate_results({"meta": meta, "rows": list(rows)})
    body = ",\n  ".join(json.dumps(row) for row in data["rows"])
    Path(path).write_text(f'{{"meta": {json.dumps(meta)},\n "rows": [\n  {body}\n ]}}\n')
    return Path(path)


def write_results(rows, meta, out_dir=RESULTS_DIR, name=None):
    """Write one new results file in out_dir and return its path."""
    validate_results({"meta": meta, "rows": list(rows)})
    return dump_results(new_results_path(rows, meta, out_dir, name), rows, meta)


def load_results(path):
    """Read and check one results file; return {"meta": ..., "rows": [...]}."""
    with open(path) as f:
        data = json.load(f)
    try:
        return validate_results(data)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


# --- command line and the module protocol ---------------------------------------------------------

def parse_ops(text):
    """--only's value: "layer_norm,mlp" -> ("layer_norm", "mlp"); ArgumentTypeError for unknown ops."""
    ops = tuple(dict.fromkeys(op.strip() for op in text.split(",") if op.strip()))
    unknown = [op for op in ops if op not in OPS]
    if not ops or unknown:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(OPS)}, got {text!r}")
    return ops


def arg_parser(description):
    """An ArgumentParser with the flags every benchmark script (and the suite) shares."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out-dir", default=None,
                        help="where the results JSON goes (default: bench/results; with --smoke, a new "
                             "temporary folder)")
    parser.add_argument("--quick", action="store_true",
                        help="fewer shapes and shorter timing, for a smoke run")
    parser.add_argument("--no-compile", action="store_true",
                        help="skip the torch.compile providers")
    parser.add_argument("--only", type=parse_ops, default=None, metavar="OPS",
                        help=f"comma-separated ops to run (default: all); ops: {','.join(OPS)}")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes, a few repetitions, CPU allowed (kernels in Triton's "
                             "interpreter): checks that every provider runs; the numbers mean nothing")
    return parser


def parse_args(description, argv=None):
    """The shared flags, parsed; --smoke implies --quick, and --out-dir defaults to bench/results,
    or to a new temporary folder for a smoke run (its results must not land among the real ones)."""
    args = arg_parser(description).parse_args(argv)
    if args.smoke:
        args.quick = True
    if args.out_dir is None:
        args.out_dir = tempfile.mkdtemp(prefix="tritongpt-smoke-") if args.smoke else str(RESULTS_DIR)
    return args


def wants(args, op):
    """Whether the run asked for `op` (no --only means every op)."""
    only = getattr(args, "only", None)
    return not only or op in only


def module_name(module):
    """'bench_layer_norm' for bench/bench_layer_norm.py, whether imported or run as a script."""
    return Path(module.__file__).stem


def merge_meta(meta, extra):
    """meta updated with a module's meta_extra: "skipped" dicts are merged, other keys added (the
    first module to set a key keeps it, so one suite file has one copy_gbps)."""
    for key, value in (extra or {}).items():
        if key == "skipped":
            meta.setdefault("skipped", {}).update(value)
        else:
            meta.setdefault(key, value)
    return meta


def save_and_show(rows, meta, out_dir, name=None):
    """Write one results file, print its rendered tables and its path; return the path."""
    from tritongpt.bench.report import render_markdown

    path = write_results(rows, meta, out_dir, name=name)
    print(render_markdown([dict(load_results(path), path=str(path))]))
    print(f"wrote {path}")
    return path


def render_report(out_dir):
    """REPORT.md and plots/ in out_dir from every results file there (bench/report.py)."""
    from tritongpt.bench import report

    out_dir = Path(out_dir)
    files = [str(p) for p in sorted(out_dir.glob("*.json"))]
    return report.main(files + ["--out", str(out_dir / "REPORT.md"), "--plots-dir", str(out_dir / "plots")])


def collect(module, args):
    """module.collect(args), with its SMOKE constants in place for a smoke run."""
    with smoke_constants(module, getattr(args, "smoke", False)):
        return module.collect(args)


def smoke_failed(meta):
    """For a smoke run: print the providers that failed (see `failures`) and return whether any did."""
    failed = failures(meta)
    for name, why in failed.items():
        print(f"smoke run: {name} {why}")
    return bool(failed)


def bench_main(module, argv=None):
    """The entry point of one benchmark module (see the protocol in the module docstring)."""
    name = module_name(module)
    args = parse_args((module.__doc__ or name).splitlines()[0], argv)
    if args.smoke:
        use_interpreter()
    elif not require_cuda(name):
        return 0
    if not any(wants(args, op) for op in module.OPS):
        print(f"{name}: nothing to run, --only names none of {', '.join(module.OPS)}")
        return 0
    rows, meta_extra = collect(module, args)
    meta = merge_meta(machine_meta(), meta_extra)
    if args.smoke:
        meta.update(smoke_meta())
    save_and_show(rows, meta, args.out_dir, name=name.removeprefix("bench_"))
    if args.smoke:
        render_report(args.out_dir)
        return 1 if smoke_failed(meta) else 0
    return 0


# The end-to-end model benchmark runs after the op benchmarks (it is the longest and most likely
# to run out of memory).
LAST_MODULES = ("bench_model",)


def discover_modules(only=None):
    """(modules, problems): the bench_<name> modules that follow the protocol, ops first and
    bench_model last, restricted to those measuring one of `only` (op names) when given; problems
    maps the module names that could not be used (an import error, no collect or OPS) to why."""
    import importlib
    import pkgutil

    names = sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)])
                   if m.name.startswith("bench_"))
    names.sort(key=lambda n: n in LAST_MODULES)
    modules, problems = [], {}
    for name in names:
        try:
            module = importlib.import_module(f"tritongpt.bench.{name}")
        except Exception as e:  # noqa: BLE001  (one broken module must not stop the others)
            problems[name] = f"import failed: {type(e).__name__}: {e}"
            continue
        missing = [a for a in ("OPS", "collect") if not hasattr(module, a)]
        if missing:
            problems[name] = f"does not follow the protocol (no {' or '.join(missing)}); run it alone"
        elif not only or set(module.OPS) & set(only):
            modules.append(module)
    return modules, problems
