"""Run every benchmark in one process, write one results file, and render the report.

    python -m tritongpt.bench [--quick] [--only OPS] [--no-compile] [--out-dir bench/results]
    python -m tritongpt.bench --smoke [--out-dir DIR]     # CI: everything at tiny shapes, CPU allowed

Runs collect() of every bench/bench_<name>.py that follows the protocol of bench/harness.py (the
op benchmarks first, bench_model last), merges their rows and metas into one results file
(suite-<gpu>-<date>.json) in --out-dir, with the measured ceilings (copy_gbps, matmul_tflops) in
its meta, rewritten after every module so that a run cut short keeps what it measured; then renders
every results file in --out-dir into REPORT.md and plots/*.png there (bench/report.py). A module
that fails is recorded in meta["skipped"] with its error and the others still run; the exit status
is then 1. Without CUDA it
prints why it skipped and exits 0, writing nothing.

--smoke (harness.py's docstring) runs the same on CPU too, at tiny shapes, into a new temporary
folder unless --out-dir is given; it exits 1 when any provider failed, optional ones included.
"""
import copy
import shlex
import sys
import time
import traceback

import torch

from tritongpt.bench import harness


def run_modules(modules, args, meta, save=lambda rows, extra=None: None):
    """Rows of every module's collect(args); meta gains their meta_extra. save(rows) runs after
    every module, and save(rows, partial meta_extra) whenever a module reports progress, so a run
    cut short still leaves what it measured. Returns (rows, failed)."""
    rows, failed = [], []
    for module in modules:
        name = harness.module_name(module)
        print(f"== {name}", flush=True)
        start = time.perf_counter()
        # the protocol's optional progress hook: a module may hand over its rows so far
        args.progress = lambda partial, extra=None: save(rows + partial, extra)
        try:
            module_rows, extra = harness.collect(module, args)
        except Exception as e:  # noqa: BLE001  (record it, run the other benchmarks)
            traceback.print_exc()
            meta.setdefault("skipped", {})[name] = f"failed: {harness.error_summary(e)}"
            failed.append(name)
            continue
        finally:
            _release_memory()
        rows += module_rows
        harness.merge_meta(meta, extra)
        save(rows)
        print(f"{name}: {len(module_rows)} rows in {time.perf_counter() - start:.0f} s", flush=True)
    return rows, failed


def _release_memory():
    """Free what one benchmark left cached so the next one (the model's batch search above all)
    sees the whole GPU, and drop compiled graphs it no longer needs."""
    import gc

    gc.collect()
    harness.empty_cache()
    torch._dynamo.reset()


def measure_ceilings(args):
    """The measured ceilings the report draws: copy bandwidth (GB/s) and bf16 matmul (TFLOP/s)."""
    # the same arguments as the benchmarks pass, so they reuse these cached measurements
    ceilings = {"copy_gbps": round(harness.copy_ceiling_gbps(args), 1),
                "matmul_tflops": round(harness.matmul_ceiling_tflops(args), 1)}
    print(f"measured ceilings: {ceilings['copy_gbps']:.0f} GB/s copy, "
          f"{ceilings['matmul_tflops']:.0f} TFLOP/s bf16 matmul", flush=True)
    _release_memory()
    return ceilings


def main(argv=None):
    args = harness.parse_args(__doc__.splitlines()[0], argv)
    if args.smoke:
        harness.use_interpreter()
    elif not harness.require_cuda("python -m tritongpt.bench"):
        return 0
    modules, problems = harness.discover_modules(args.only)
    command = ["python", "-m", "tritongpt.bench"] + list(sys.argv[1:] if argv is None else argv)
    meta = harness.machine_meta(shlex.join(command))
    if args.smoke:
        meta.update(harness.smoke_meta())
    for name, why in problems.items():
        print(f"{name}: skipped, {why}")
        meta.setdefault("skipped", {})[name] = why
    print(f"running {', '.join(harness.module_name(m) for m in modules) or 'nothing'}", flush=True)
    meta.update(measure_ceilings(args))
    path = harness.new_results_path([], meta, args.out_dir, name="suite")

    def save(rows, extra=None):
        harness.dump_results(path, rows, harness.merge_meta(copy.deepcopy(meta), extra))

    rows, failed = run_modules(modules, args, meta, save)
    save(rows)
    print(f"wrote {path} ({len(rows)} rows)")
    harness.render_report(args.out_dir)
    if failed:
        print(f"failed: {', '.join(failed)} (see meta['skipped'] in {path})")
    # a smoke run fails on any provider that failed, not only on a module that crashed
    provider_failed = args.smoke and harness.smoke_failed(meta)
    return 1 if failed or provider_failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
