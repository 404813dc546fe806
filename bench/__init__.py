"""Benchmarks: one module per op (bench_<op>.py), the end-to-end training step (bench_model.py),
shared plumbing and the module protocol in harness.py, rendering in report.py.

    python -m tritongpt.bench [--quick] [--only OPS] [--no-compile] [--out-dir DIR]   # everything, one file
    python bench/bench_layer_norm.py [--quick] ...                           # one module alone
    python -m tritongpt.bench.report                                                  # results -> REPORT.md + PNGs
    python -m tritongpt.bench.readme_table                                            # results -> README's table
    pytest bench --benchmark-only                                           # op cases, pytest-benchmark
    bash bench/validate_gpu.sh [OUT_DIR]                                    # CUDA tests + quick suite

Every bench_<name>.py follows one protocol (details in harness.py's docstring): it defines
`OPS` (the op names of its rows), `collect(args) -> (rows, meta_extra)` (measure on CUDA, write
nothing), optionally `cases(args)` (for `pytest bench --benchmark-only`), and
`main(argv=None)`, which is just `harness.bench_main(sys.modules[__name__], argv)`. `python -m
bench` discovers the modules by name and runs them all in one process; each module still runs
alone as a script. Results are JSON files under bench/results/ in the format of DESIGN.md.
Without a CUDA GPU every entry point prints why it skipped and exits 0, except with --smoke:
tiny shapes, on CPU too (kernels in Triton's interpreter), results in a temporary folder (CI).
"""
