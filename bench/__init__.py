"""Benchmarks: one script per op (bench_<op>.py), shared plumbing in harness.py, rendering in report.py.

Each script times every provider side by side in one run and writes one JSON file under
bench/results/ in the format of DESIGN.md; `python -m bench.report` turns the files into markdown
tables and PNG plots. Without a CUDA GPU every script prints why it skipped and exits 0.
"""
