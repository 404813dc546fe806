"""Render benchmark results files into markdown tables and PNG plots.

    python -m tritongpt.bench.report [FILES...] [--out bench/results/REPORT.md] [--plots-dir bench/results/plots]

With no FILES, every *.json under bench/results/ is rendered. Each file gets a header (GPU,
versions, date, commit) and, per op, two tables: the median time of every provider with its
speed-up over PyTorch eager (provider "torch") from the same file, and the throughput, fraction of
the measured ceiling and peak memory. Plots per op: speed-up over eager, GB/s or TFLOP/s per provider
against the measured ceiling of the file's meta (copy_gbps, matmul_tflops) when it has one, and
peak memory.
"""
import argparse
import math
import os
from pathlib import Path

from tritongpt.bench.harness import PROVIDERS, RESULTS_DIR, load_results

BASELINE = "torch"
# (row key, column heading, format) for the second table, in column order; a column appears only
# when some row of the op has the key.
METRICS = (
    ("gbps", "GB/s", "{:.0f}"),
    ("tflops", "TFLOP/s", "{:.1f}"),
    ("ceiling_frac", "of ceiling", "{:.0%}"),
    ("tokens_per_s", "tokens/s", "{:,.0f}"),
    ("mfu", "MFU", "{:.1%}"),
    ("peak_mem_mb", "peak MiB", "{:.0f}"),
)
THROUGHPUT_KEYS = ("gbps", "tflops", "tokens_per_s")
MISSING = "-"


def load_all(paths):
    """Load and check each results file; each dict also gets "path" for headers and plot names."""
    return [dict(load_results(p), path=str(p)) for p in paths]


def shape_label(shape, keys=None):
    return " ".join(f"{k}={v}" for k, v in shape.items() if keys is None or k in keys)


def _ordered(values):
    return list(dict.fromkeys(values))


def ordered_providers(rows):
    """Providers in the fixed DESIGN order first, then any others (train_step) as they appear."""
    seen = _ordered(r["provider"] for r in rows)
    return [p for p in PROVIDERS if p in seen] + [p for p in seen if p not in PROVIDERS]


def group_rows(rows):
    """{(shape label, mode, dtype): {provider: row}}, in the order the rows come."""
    groups = {}
    for r in rows:
        groups.setdefault((shape_label(r["shape"]), r["mode"], r["dtype"]), {})[r["provider"]] = r
    return groups


def speedup(by_provider, provider):
    """Eager time / provider time within one group of rows, or None without both rows."""
    base, row = by_provider.get(BASELINE), by_provider.get(provider)
    if base is None or row is None:
        return None
    return base["ms"] / row["ms"]


def cell(value, fmt):
    return MISSING if value is None else fmt.format(value)


def markdown_table(header, body):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cells) + " |" for cells in body]


def _op_tables(op, rows):
    providers = ordered_providers(rows)
    groups = group_rows(rows)
    metrics = [m for m in METRICS if any(r.get(m[0]) is not None for r in rows)]
    head = ["shape", "mode", "dtype"]
    times = head + [c for p in providers
                    for c in ([f"{p} ms"] + ([f"{p} vs eager"] if p != BASELINE else []))]
    time_body, metric_body = [], []
    for key, by_p in groups.items():
        cells = list(key)
        for p in providers:
            cells.append(cell(by_p.get(p, {}).get("ms"), "{:.4f}"))
            if p != BASELINE:
                cells.append(cell(speedup(by_p, p), "{:.2f}x"))
        time_body.append(cells)
        metric_body.append(list(key) + [cell(by_p.get(p, {}).get(k), fmt)
                                        for p in providers for k, _, fmt in metrics])
    lines = [f"### {op}: median ms, speed-up vs PyTorch eager", ""] + markdown_table(times, time_body)
    if metrics:
        metric_head = head + [f"{p} {title}" for p in providers for _, title, _ in metrics]
        lines += ["", f"### {op}: throughput and peak memory", ""] + markdown_table(metric_head, metric_body)
    return lines + [""]


def _file_header(data):
    meta = data["meta"]
    title = f"## {meta.get('gpu') or 'no GPU'}, {meta.get('date')}"
    facts = [f"torch {meta.get('torch')}", f"triton {meta.get('triton')}", f"CUDA {meta.get('cuda')}",
             f"driver {meta.get('driver')}", f"commit {(meta.get('commit') or 'unknown')[:12]}"]
    if meta.get("copy_gbps"):
        facts.append(f"measured copy bandwidth {meta['copy_gbps']:.0f} GB/s")
    if meta.get("matmul_tflops"):
        facts.append(f"measured bf16 matmul {meta['matmul_tflops']:.0f} TFLOP/s")
    if meta.get("max_batch"):
        facts.append(f"largest training batch that fits {meta['max_batch']} ({meta.get('batch_search')})")
    lines = [title, ""]
    if data.get("path"):
        lines.append(f"File `{Path(data['path']).name}`.")
    lines += [", ".join(facts) + ".", f"Command: `{meta.get('command')}`"]
    for provider, reason in (meta.get("skipped") or {}).items():
        lines.append(f"Skipped {provider}: {reason}")
    return lines + [""]


def render_markdown(results):
    """Markdown for a list of results dicts ({"meta", "rows"}, optional "path")."""
    lines = ["# Benchmark results", ""]
    for data in results:
        lines += _file_header(data)
        for op in _ordered(r["op"] for r in data["rows"]):
            lines += _op_tables(op, [r for r in data["rows"] if r["op"] == op])
    return "\n".join(lines).rstrip() + "\n"


def _plot_labels(groups, rows):
    """Short x labels: only the shape keys (and dtypes) that vary among the rows, then the mode."""
    varying = {k for k in rows[0]["shape"] if len({str(r["shape"].get(k)) for r in rows}) > 1}
    many_dtypes = len({r["dtype"] for r in rows}) > 1
    labels = []
    for by_p in groups.values():
        row = next(iter(by_p.values()))
        parts = [shape_label(row["shape"], varying or None), row["mode"]]
        labels.append("\n".join(parts + ([row["dtype"]] if many_dtypes else [])))
    return labels


def _bar_chart(path, labels, series, ylabel, title, hline=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(labels) * max(1, len(series)) ** 0.5), 4.0))
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(labels))]
        ax.bar(xs, [math.nan if v is None else v for v in values], width, label=name)
    if hline is not None:
        ax.axhline(hline, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# Throughput key -> the meta key of its measured ceiling, drawn as a dashed line on its plot.
CEILINGS = {"gbps": "copy_gbps", "tflops": "matmul_tflops"}


def _op_plots(op, rows, meta, stem, out_dir):
    """Speed-up over eager, throughput against the measured ceiling, and peak memory, per provider."""
    groups = group_rows(rows)
    labels = _plot_labels(groups, rows)
    providers = ordered_providers(rows)
    paths = []
    others = [p for p in providers if p != BASELINE]
    if BASELINE in providers and others:
        series = {p: [speedup(by_p, p) for by_p in groups.values()] for p in others}
        paths.append(_bar_chart(out_dir / f"{stem}-{op}-speedup.png", labels, series,
                                "speed-up vs PyTorch eager (x)", f"{op}: speed-up over eager", hline=1.0))
    for key, title, _ in METRICS:
        if key in THROUGHPUT_KEYS and any(r.get(key) is not None for r in rows):
            series = {p: [by_p.get(p, {}).get(key) for by_p in groups.values()] for p in providers}
            ceiling = meta.get(CEILINGS.get(key))
            note = f" (dashed: measured ceiling {ceiling:.0f})" if ceiling else ""
            paths.append(_bar_chart(out_dir / f"{stem}-{op}-{key}.png", labels, series, title,
                                    f"{op}: {title} per provider{note}", hline=ceiling))
            break
    if any(r.get("peak_mem_mb") is not None for r in rows):
        series = {p: [by_p.get(p, {}).get("peak_mem_mb") for by_p in groups.values()] for p in providers}
        paths.append(_bar_chart(out_dir / f"{stem}-{op}-peak_mem.png", labels, series, "peak MiB",
                                f"{op}: peak memory per provider"))
    return paths


def render_plots(results, out_dir):
    """Write the PNG plots for a list of results dicts into out_dir; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, data in enumerate(results):
        stem = Path(data["path"]).stem if data.get("path") else f"results-{i}"
        for op in _ordered(r["op"] for r in data["rows"]):
            paths += _op_plots(op, [r for r in data["rows"] if r["op"] == op], data["meta"], stem, out_dir)
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", help="results JSON files (default: all in bench/results)")
    parser.add_argument("--out", default=str(RESULTS_DIR / "REPORT.md"), help="markdown output path")
    parser.add_argument("--plots-dir", default=str(RESULTS_DIR / "plots"), help="PNG output folder")
    args = parser.parse_args(argv)
    paths = args.files or sorted(RESULTS_DIR.glob("*.json"))
    if not paths:
        print(f"no results files given and none in {RESULTS_DIR}")
        return 0
    results = load_all(paths)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plots = render_plots(results, args.plots_dir)
    links = [f"![{p.stem}]({Path(os.path.relpath(p, out.parent)).as_posix()})" for p in plots]
    out.write_text(render_markdown(results) + ("\n## Plots\n\n" + "\n\n".join(links) + "\n" if links else ""))
    print(f"wrote {out} and {len(plots)} plot(s) in {args.plots_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
