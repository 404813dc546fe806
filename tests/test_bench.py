"""The benchmark plumbing on CPU: rows, results files, the report, byte counts, the no-GPU skip."""
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from helpers import TIMING, stub_timers

from tritongpt.bench import __main__ as suite
from tritongpt.bench import bench_cross_entropy as bce
from tritongpt.bench import bench_layer_norm as bln
from tritongpt.bench import bench_model as bm
from tritongpt.bench import harness, readme_table, report

REPO = Path(__file__).resolve().parents[1]
META = {"gpu": "NVIDIA H100 80GB HBM3", "driver": "580.1", "torch": "2.11.0", "triton": "3.6.0",
        "cuda": "13.0", "commit": "0123456789abcdef", "date": "2026-11-21T10:00:00Z",
        "command": "python bench/bench_layer_norm.py"}


def timing(ms):
    return {"ms": ms, "ms_p20": 0.9 * ms, "ms_p80": 1.1 * ms}


def ln_row(provider, ms, mode="fwd_bwd", C=768, **kw):
    return harness.make_row("layer_norm", provider, mode, torch.bfloat16, {"rows": 16384, "C": C},
                            timing(ms), **kw)


def sample_rows():
    return [ln_row("torch", 2.0, gbps=500.0, peak_mem_mb=100.0, ceiling_frac=0.2),
            ln_row("triton", 1.0, gbps=1000.0, peak_mem_mb=50.0, ceiling_frac=0.4),
            ln_row("torch_compile", 4.0, gbps=250.0, peak_mem_mb=75.0, ceiling_frac=0.1)]


def test_make_row_has_the_design_keys():
    row = ln_row("triton", 0.123, gbps=2500.0, peak_mem_mb=210.0)
    assert list(row) == list(harness.ROW_KEYS)
    assert row["dtype"] == "bfloat16"
    assert row["shape"] == {"rows": 16384, "C": 768}
    assert (row["ms"], row["gbps"], row["tflops"], row["peak_mem_mb"]) == (0.123, 2500.0, None, 210.0)
    assert ln_row("triton", 1.0, ceiling_frac=0.8)["ceiling_frac"] == 0.8


@pytest.mark.parametrize("change", [
    {"op": "layernorm"}, {"provider": "cudnn"}, {"mode": "forward"}, {"dtype": "bf16"},
    {"shape": {}}, {"shape": {"C": 0}}, {"timing": {"ms": 1.0, "ms_p20": 1.2, "ms_p80": 1.1}},
    {"timing": {"ms": -1.0, "ms_p20": -1.0, "ms_p80": -1.0}}, {"gbps": -5.0},
    {"provider": "triton+compile"}, {"ceiling_frac": "high"}, {"ms": 3.0},
])
def test_make_row_rejects_bad_fields(change):
    args = dict(op="layer_norm", provider="triton", mode="fwd", dtype="bfloat16",
                shape={"rows": 4, "C": 8}, timing=TIMING)
    args.update(change)
    with pytest.raises(ValueError):
        harness.make_row(**args)


def test_train_step_rows_need_tokens_and_mfu_and_accept_model_providers():
    shape = {"B": 16, "T": 1024}
    for provider in ("triton", "torch_compile", "triton+compile", "triton:layer_norm",
                     "triton:attention,mlp", "triton:mlp+compile"):
        row = harness.make_row("train_step", provider, "fwd_bwd", "bfloat16", shape, TIMING,
                               tokens_per_s=1.5e5, mfu=0.45)
        assert row["provider"] == provider and row["mfu"] == 0.45
    for provider in ("triton:", "triton:softmax", "torch+compile", "triton:+compile",
                     "triton+compile+compile"):
        with pytest.raises(ValueError):
            harness.make_row("train_step", provider, "fwd_bwd", "bfloat16", shape, TIMING,
                             tokens_per_s=1.0, mfu=0.1)
    with pytest.raises(ValueError, match="tokens_per_s"):
        harness.make_row("train_step", "triton", "fwd_bwd", "bfloat16", shape, TIMING, mfu=0.4)


def test_write_and_load_round_trip(tmp_path):
    rows = sample_rows()
    path = harness.write_results(rows, META, out_dir=tmp_path)
    assert path.parent == tmp_path
    assert re.fullmatch(r"layer_norm-nvidia-h100-80gb-hbm3-20261121T100000\.json", path.name)
    raw = json.loads(path.read_text())
    assert list(raw) == ["meta", "rows"]
    assert list(raw["meta"]) == list(harness.META_KEYS)
    assert set(raw["rows"][0]) == set(harness.ROW_KEYS) | {"ceiling_frac"}
    assert harness.load_results(path) == {"meta": META, "rows": rows}
    second = harness.write_results(rows, META, out_dir=tmp_path)
    assert second != path and second.exists()
    assert harness.write_results(rows + [dict(rows[0], op="mlp")], META, tmp_path).name.startswith("suite-")


@pytest.mark.parametrize("spoil", [
    lambda d: d["meta"].pop("commit"),
    lambda d: d.update(extra=1),
    lambda d: d["rows"][0].update(mode="both"),
    lambda d: d["rows"][0].pop("peak_mem_mb"),
])
def test_load_results_rejects_bad_files(tmp_path, spoil):
    data = {"meta": dict(META), "rows": sample_rows()}
    spoil(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="bad.json"):
        harness.load_results(path)


def test_machine_meta_keys_and_date():
    meta = harness.machine_meta("python x.py --quick")
    assert list(meta) == list(harness.META_KEYS)
    assert meta["command"] == "python x.py --quick"
    assert meta["torch"] == torch.__version__
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", meta["date"])
    assert meta["commit"] is None or re.fullmatch(r"[0-9a-f]{40}", meta["commit"])


def test_gbps_and_tflops_arithmetic():
    assert harness.gbps(2e9, 1.0) == pytest.approx(2000.0)  # 2 GB in 1 ms
    assert harness.gbps(3e6, 0.5) == pytest.approx(6.0)
    assert harness.tflops(1e12, 1.0) == pytest.approx(1000.0)
    assert harness.tflops(5e9, 2.0) == pytest.approx(2.5)


def test_layer_norm_byte_counts():
    # N=4 rows, C=8, bf16 (2 bytes): fwd = x + y + w + b; bwd = x + dy + dx + fp32 mean/rstd + w + dw + db
    assert bln.layer_norm_bytes(4, 8, "fwd") == 2 * 64 + 2 * 16
    assert bln.layer_norm_bytes(4, 8, "bwd") == 3 * 64 + 32 + 3 * 16
    assert bln.layer_norm_bytes(4, 8, "fwd_bwd") == 160 + 272
    assert bln.layer_norm_bytes(4, 8, "fwd", itemsize=4, param_itemsize=4) == 2 * 128 + 2 * 32
    assert bln.layer_norm_bytes(16384, 768, "fwd") == 50_334_720


def test_render_markdown_speedups_come_from_the_same_file(tmp_path):
    path = harness.write_results(sample_rows(), META, out_dir=tmp_path)
    md = report.render_markdown(report.load_all([path]))
    assert "NVIDIA H100 80GB HBM3" in md and "torch 2.11.0" in md and "triton 3.6.0" in md
    assert "CUDA 13.0" in md and "2026-11-21T10:00:00Z" in md and "0123456789ab" in md
    line = next(ln for ln in md.splitlines() if ln.startswith("| rows=16384 C=768 | fwd_bwd"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    # providers in DESIGN order: triton (ms, vs eager), torch (ms), torch_compile (ms, vs eager)
    assert cells[3:] == ["1.0000", "2.00x", "2.0000", "4.0000", "0.50x"]
    assert "| triton GB/s | triton of ceiling | triton peak MiB |" in md
    assert "| 1000 | 40% | 50 |" in md


def test_render_markdown_without_eager_row_shows_no_speedup():
    rows = [ln_row("triton", 1.0), ln_row("liger", 2.0)]
    md = report.render_markdown([{"meta": META, "rows": rows}])
    line = next(ln for ln in md.splitlines() if ln.startswith("| rows=16384"))
    assert [c.strip() for c in line.strip("|").split("|")][3:] == ["1.0000", "-", "2.0000", "-"]


def test_render_plots_writes_pngs(tmp_path):
    rows = sample_rows() + [ln_row("torch", 1.0, mode="fwd", C=1024, gbps=100.0),
                            ln_row("triton", 0.5, mode="fwd", C=1024, gbps=200.0)]
    paths = report.render_plots([{"meta": META, "rows": rows, "path": "x/run1.json"}], tmp_path / "plots")
    assert sorted(p.name for p in paths) == ["run1-layer_norm-gbps.png", "run1-layer_norm-peak_mem.png",
                                             "run1-layer_norm-speedup.png"]
    for p in paths:
        data = Path(p).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 1000


def test_report_cli_writes_markdown_and_plots(tmp_path):
    path = harness.write_results(sample_rows(), META, out_dir=tmp_path)
    out = tmp_path / "REPORT.md"
    assert report.main([str(path), "--out", str(out), "--plots-dir", str(tmp_path / "plots")]) == 0
    text = out.read_text()
    assert "2.00x" in text and "](plots/" in text
    assert len(list((tmp_path / "plots").glob("*.png"))) == 3


def test_bench_run_records_rows_and_skips_a_failing_optional_provider(monkeypatch):
    """bench_layer_norm.run on CPU with the timers stubbed: rows for working providers, a skip
    reason for a failing optional one."""
    monkeypatch.setattr(bln, "ROWS", 4)
    stub_timers(monkeypatch)

    def broken(x, w, b, eps):
        raise RuntimeError("compiler exploded\nsecond line")

    def eager(x, w, b, eps):
        return torch.nn.functional.layer_norm(x, (x.shape[-1],), w, b, eps)

    fns = {"torch": eager, "torch_compile": broken}
    skipped = {}
    rows = bln.run((8,), fns, skipped, copy_gbps=1.0, warmup=1, rep=1, device="cpu")
    assert [(r["provider"], r["mode"]) for r in rows] == [("torch", m) for m in bln.MODES]
    assert rows[0]["gbps"] == pytest.approx(harness.gbps(bln.layer_norm_bytes(4, 8, "fwd"), 1.0))
    assert rows[0]["ceiling_frac"] == pytest.approx(rows[0]["gbps"])  # copy_gbps = 1
    assert skipped["layer_norm:torch_compile"].endswith("RuntimeError: compiler exploded")
    fns["triton"] = broken  # not optional: its failure must stop the run
    with pytest.raises(RuntimeError):
        bln.run((8,), fns, {}, copy_gbps=1.0, warmup=1, rep=1, device="cpu")


def test_bench_layer_norm_skips_cleanly_without_cuda(tmp_path):
    """Run as a script (the sys.path set-up included); the other modules share harness.bench_main."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "bench/bench_layer_norm.py", "--quick",
                           "--out-dir", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "bench_layer_norm: skipped, needs a CUDA GPU (none found)" in proc.stdout
    assert list(tmp_path.iterdir()) == []


def test_bench_cross_entropy_counts():
    assert bce.cross_entropy_bytes(4, 10, "fwd") == 80  # bf16 logits read once
    assert bce.cross_entropy_bytes(4, 10, "fwd_bwd") == 3 * 80
    assert bce.linear_cross_entropy_flops(4, 8, 10, "bwd") == 4 * 320


@pytest.mark.parametrize("op", ["cross_entropy", "linear_cross_entropy"])
def test_bench_cross_entropy_run_on_cpu(monkeypatch, op):
    """bench_cross_entropy.run with the timers stubbed and a tiny vocabulary: one row per
    provider and mode, with the op's throughput unit."""
    monkeypatch.setattr(bce, "V", 64)
    monkeypatch.setattr(bce, "C", 16)
    monkeypatch.setattr(bce, "DTYPE", torch.float32)
    stub_timers(monkeypatch)
    fns, skipped = bce.providers(op, no_compile=True)
    fns = {k: fns[k] for k in ("triton", "torch")}
    rows = bce.run(op, (5,), fns, skipped, warmup=1, rep=1, device="cpu")
    assert [(r["provider"], r["mode"]) for r in rows] == [(p, m) for p in fns for m in bce.MODES]
    assert rows[0]["shape"]["V"] == 64
    if op == "cross_entropy":
        assert all(r["gbps"] > 0 for r in rows)
    else:  # TFLOP/s only where every provider does the same work (see bce.rate)
        assert all((r["tflops"] is not None) == (r["mode"] == "fwd_bwd") for r in rows)
        assert all(r["tflops"] > 0 for r in rows if r["mode"] == "fwd_bwd")


def test_bench_linear_cross_entropy_has_pytorch_chunked_baseline(monkeypatch):
    """Where torch has F.linear_cross_entropy (2.13+) it is a provider, computing the reference's
    loss and gradients through its chunked path (which never holds the full logits, and does
    take the bwd mode's repeated backward); where it lacks it, the skip says why."""
    import torch.nn.functional as F

    from tritongpt.kernels import reference

    if not hasattr(F, "linear_cross_entropy"):
        _, skipped = bce.providers("linear_cross_entropy", no_compile=True)
        assert "has no F.linear_cross_entropy" in skipped["torch_chunked"]
        return
    fns, _ = bce.providers("linear_cross_entropy", no_compile=True)
    x, w = torch.randn(40, 16, dtype=torch.float64), torch.randn(64, 16, dtype=torch.float64)
    targets = torch.randint(0, 64, (40,))
    targets[::7] = -1
    got, want = ([t.clone().requires_grad_() for t in (x, w)] for _ in range(2))
    loss = fns["torch_chunked"](*got, targets, ignore_index=-1)
    for _ in range(2):  # the bwd mode's repeated backward over one graph
        for t in got:
            t.grad = None
        loss.backward(retain_graph=True)
    ref = reference.linear_cross_entropy(*want, targets, ignore_index=-1)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.grad, b.grad)
    assert "torch_chunked" not in bce.providers("cross_entropy", no_compile=True)[0]


def test_bench_cross_entropy_skips_cleanly_without_cuda(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bce.main(["--quick", "--out-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out == "bench_cross_entropy: skipped, needs a CUDA GPU (none found)\n"
    assert list(tmp_path.iterdir()) == []


def test_require_cuda_reports_a_skip(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert harness.require_cuda("thing") is False
    assert capsys.readouterr().out == "thing: skipped, needs a CUDA GPU (none found)\n"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert harness.require_cuda("thing") is True


@pytest.mark.gpu
def test_timers_on_gpu():
    x = torch.randn(1 << 22, device="cuda")
    t = harness.time_ms(lambda: x * 2, warmup=5, rep=20)
    assert 0 < t["ms_p20"] <= t["ms"] <= t["ms_p80"]
    mib = harness.peak_memory_mb(lambda: x * 2)  # one new fp32 tensor of 16 MiB
    assert 15.9 < mib < 40
    assert harness.copy_bandwidth_gbps("cuda", nbytes=1 << 28) > 50


# --- the module protocol and the suite (python -m tritongpt.bench) ------------------------------------------

def test_parse_ops_and_wants():
    assert harness.parse_ops("mlp, layer_norm,mlp") == ("mlp", "layer_norm")
    for bad in ("", "layernorm", "mlp,softmax"):
        with pytest.raises(harness.argparse.ArgumentTypeError, match="comma-separated"):
            harness.parse_ops(bad)
    args = harness.arg_parser("x").parse_args(["--only", "mlp", "--quick"])
    assert (args.only, args.quick, args.no_compile) == (("mlp",), True, False)
    assert harness.wants(args, "mlp") and not harness.wants(args, "attention")
    assert harness.wants(harness.arg_parser("x").parse_args([]), "attention")


def test_suite_rejects_unknown_ops(capsys):
    with pytest.raises(SystemExit) as e:
        suite.main(["--only", "softmax"])
    assert e.value.code == 2 and "--only: expected a comma-separated list" in capsys.readouterr().err


def test_discover_modules_follows_the_protocol():
    modules, problems = harness.discover_modules()
    names = [harness.module_name(m) for m in modules]
    assert {"bench_layer_norm", "bench_cross_entropy", "bench_model"} <= set(names)
    assert names[-1] == "bench_model" and names[:-1] == sorted(names[:-1])
    assert all(hasattr(m, "OPS") and callable(m.collect) and callable(m.main) for m in modules)
    only, _ = harness.discover_modules(("linear_cross_entropy",))
    assert [harness.module_name(m) for m in only] == ["bench_cross_entropy"]
    assert problems == {} or all("bench_" in k for k in problems)


def test_merge_meta_merges_skips_and_keeps_the_first_value():
    meta = {"gpu": "x", "skipped": {"a:liger": "not installed"}}
    harness.merge_meta(meta, {"copy_gbps": 3000.0, "skipped": {"b:liger": "not installed"}})
    harness.merge_meta(meta, {"copy_gbps": 1.0, "max_batch": 32})
    assert meta == {"gpu": "x", "copy_gbps": 3000.0, "max_batch": 32,
                    "skipped": {"a:liger": "not installed", "b:liger": "not installed"}}


def test_module_cases_name_every_provider_and_mode():
    args = harness.arg_parser("x").parse_args(["--quick", "--no-compile"])
    ids = [case_id for case_id, _ in bln.cases(args)]
    assert "layer_norm-C768-triton-fwd_bwd" in ids and "layer_norm-C4096-torch-bwd" in ids
    n_providers = len(bln.providers(no_compile=True)[0])
    assert len(ids) == len(set(ids)) == len(bln.QUICK_WIDTHS) * len(bln.MODES) * n_providers
    args.only = ("linear_cross_entropy",)
    assert {i.split("-")[0] for i, _ in bce.cases(args)} == {"linear_cross_entropy"}


def _fake_module(name, ops, collect):
    return types.SimpleNamespace(__file__=f"/x/{name}.py", OPS=ops, collect=collect)


def test_suite_writes_one_file_records_a_failure_and_renders(tmp_path, monkeypatch):
    def ln_collect(args):
        assert args.quick and args.only is None
        return sample_rows(), {"copy_gbps": 1.0, "skipped": {"layer_norm:liger": "not installed"}}

    def broken_collect(args):
        raise RuntimeError("kernel exploded\nmore")

    fakes = [_fake_module("bench_layer_norm", ("layer_norm",), ln_collect),
             _fake_module("bench_mlp", ("mlp",), broken_collect)]
    monkeypatch.setattr(harness, "require_cuda", lambda what: True)
    monkeypatch.setattr(harness, "discover_modules", lambda only: (fakes, {"bench_old": "no collect"}))
    monkeypatch.setattr(suite, "measure_ceilings", lambda args: {"copy_gbps": 3000.0, "matmul_tflops": 700.0})
    monkeypatch.setattr(suite, "_release_memory", lambda: None)
    assert suite.main(["--quick", "--out-dir", str(tmp_path)]) == 1  # bench_mlp failed
    [path] = tmp_path.glob("suite-*.json")
    data = harness.load_results(path)
    assert data["rows"] == sample_rows()
    assert data["meta"]["command"] == "python -m tritongpt.bench --quick --out-dir " + str(tmp_path)
    assert data["meta"]["copy_gbps"] == 3000.0 and data["meta"]["matmul_tflops"] == 700.0
    assert data["meta"]["skipped"] == {"bench_old": "no collect", "layer_norm:liger": "not installed",
                                       "bench_mlp": "failed: RuntimeError: kernel exploded"}
    assert "2.00x" in (tmp_path / "REPORT.md").read_text()
    assert len(list((tmp_path / "plots").glob("*.png"))) == 3


def test_suite_saves_after_every_module_and_on_progress(monkeypatch):
    saved = []

    def slow_collect(args):
        args.progress(sample_rows()[1:2], {"max_batch": 32})  # a long module reports half-way
        return sample_rows()[1:], {"max_batch": 32}

    fakes = [_fake_module("bench_a", ("layer_norm",), lambda args: (sample_rows()[:1], {})),
             _fake_module("bench_b", ("mlp",), slow_collect)]
    monkeypatch.setattr(suite, "_release_memory", lambda: None)
    meta = {}
    rows, failed = suite.run_modules(fakes, types.SimpleNamespace(), meta,
                                     save=lambda rows, extra=None: saved.append((len(rows), extra)))
    assert saved == [(1, None), (2, {"max_batch": 32}), (3, None)]
    assert failed == [] and rows == sample_rows() and meta == {"max_batch": 32}


def test_suite_progress_save_keeps_the_partial_meta(tmp_path, monkeypatch):
    """python -m tritongpt.bench cut short during a module: its file holds that module's rows and meta so far."""
    def interrupted(args):
        args.progress(sample_rows()[:2], {"max_batch": 32})
        raise KeyboardInterrupt  # the run is cut here (a timeout's signal, say)

    monkeypatch.setattr(harness, "require_cuda", lambda what: True)
    monkeypatch.setattr(harness, "discover_modules",
                        lambda only: ([_fake_module("bench_model", ("train_step",), interrupted)], {}))
    monkeypatch.setattr(suite, "measure_ceilings", lambda args: {})
    monkeypatch.setattr(suite, "_release_memory", lambda: None)
    with pytest.raises(KeyboardInterrupt):
        suite.main(["--out-dir", str(tmp_path)])
    [path] = tmp_path.glob("suite-*.json")
    data = harness.load_results(path)
    assert data["rows"] == sample_rows()[:2] and data["meta"]["max_batch"] == 32


def test_suite_skips_cleanly_without_cuda(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert suite.main(["--out-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out == "python -m tritongpt.bench: skipped, needs a CUDA GPU (none found)\n"
    assert list(tmp_path.iterdir()) == []


def test_bench_main_skips_without_cuda_and_with_nothing_to_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bm.main(["--out-dir", str(tmp_path)]) == 0
    assert "bench_model: skipped, needs a CUDA GPU" in capsys.readouterr().out
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert bm.main(["--only", "mlp", "--out-dir", str(tmp_path)]) == 0
    assert "bench_model: nothing to run, --only names none of train_step" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


def test_pytest_benchmark_run_skips_cleanly_without_cuda():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "pytest", "bench", "--benchmark-only",
                           "-p", "no:cacheprovider"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SKIPPED" in proc.stdout and "op benchmarks need a CUDA GPU (none found)" in proc.stdout
    assert "1 skipped" in proc.stdout


def test_plots_draw_the_measured_ceiling_and_peak_memory(tmp_path, monkeypatch):
    charts = []
    monkeypatch.setattr(report, "_bar_chart", lambda path, labels, series, ylabel, title, hline=None:
                        charts.append((Path(path).name, title, hline, series)) or path)
    meta = dict(META, copy_gbps=3000.0)
    report.render_plots([{"meta": meta, "rows": sample_rows(), "path": "r.json"}], tmp_path)
    by_name = {c[0]: c for c in charts}
    assert by_name["r-layer_norm-gbps.png"][2] == 3000.0
    assert "measured ceiling 3000" in by_name["r-layer_norm-gbps.png"][1]
    assert by_name["r-layer_norm-peak_mem.png"][3] == {"triton": [50.0], "torch": [100.0],
                                                       "torch_compile": [75.0]}
    assert by_name["r-layer_norm-speedup.png"][3] == {"triton": [2.0], "torch_compile": [0.5]}


# --- bench_model: arithmetic, plan, batch search ---------------------------------------------------

def test_flops_per_token_and_mfu_arithmetic():
    # 6 FLOPs per parameter and token, plus 12 * L * C * T for attention
    assert bm.flops_per_token(100, 2, 8, 16) == 600 + 12 * 2 * 8 * 16
    assert bm.mfu(989e12 / 2, 1000.0) == pytest.approx(0.5)  # half the peak's FLOPs in one second
    assert bm.mfu(1e12, 2.0, peak_tflops=1000.0) == pytest.approx(0.5)
    assert bm.tokens_per_s(16, 1024, 100.0) == pytest.approx(163840.0)


def test_gpt2_124m_flop_count():
    from tritongpt.model.gpt import GPT, GPTConfig

    config = GPTConfig.from_name("gpt2")
    with torch.device("meta"):
        assert GPT(config).num_params(non_embedding=False) == 124_439_808  # GPT-2 small, tied lm_head
    n = 124_439_808 - 1024 * 768  # without the position embedding
    assert bm.model_flops_per_token(config) == 6 * n + 12 * 12 * 768 * 1024


def test_variants_plan():
    def names(plan):
        return [(v.provider, v.kernels, v.compiled, v.batch) for v in plan]

    def block(batch, compiled_singles=True, compiled=True):
        eager = [("torch", "none", False, batch), ("triton", "all", False, batch)]
        comp = [("torch_compile", "none", True, batch), ("triton+compile", "all", True, batch)]
        singles = [("triton:layer_norm", "layer_norm", False, batch), ("triton:mlp", "mlp", False, batch)]
        comp_singles = [("triton:layer_norm+compile", "layer_norm", True, batch),
                        ("triton:mlp+compile", "mlp", True, batch)]
        return eager + (comp if compiled else []) + singles + (comp_singles if compiled_singles else [])

    # headline first: B=16 before the largest batch; reference and all-kernels before single kernels
    assert names(bm.variants(["layer_norm", "mlp"], 32)) == block(16) + block(32)
    assert names(bm.variants(["layer_norm", "mlp"], 32, quick=True)) == \
        block(16, compiled_singles=False) + block(32, compiled_singles=False, compiled=False)
    assert names(bm.variants(["layer_norm", "mlp"], 16, no_compile=True)) == \
        block(16, compiled_singles=False, compiled=False)
    plan = bm.variants(["layer_norm", "mlp"], 32)
    assert [v.provider for v in bm.variants(["mlp"], 16, no_compile=True)] == ["torch", "triton"]
    assert [v.provider for v in bm.variants([], 16)] == ["torch", "torch_compile"]
    for v in plan:  # every provider is a valid train_step row provider
        harness.make_row("train_step", v.provider, "fwd_bwd", "bfloat16", {"B": v.batch}, TIMING,
                         tokens_per_s=1.0, mfu=0.1)


def test_find_max_batch_with_a_fake_runner(monkeypatch):
    monkeypatch.setattr(bm, "release_memory", lambda: None)
    tried = []

    def runner(batch):
        tried.append(batch)
        if batch > 24:
            raise torch.OutOfMemoryError("CUDA out of memory")

    assert bm.find_max_batch(runner) == (24, {64: "out of memory", 48: "out of memory",
                                              32: "out of memory", 24: "fits"})
    assert tried == [64, 48, 32, 24]
    assert bm.find_max_batch(lambda b: None, (16, 48)) == (48, {48: "fits"})

    def never(batch):
        raise torch.OutOfMemoryError("no")

    assert bm.find_max_batch(never, (16,)) == (None, {16: "out of memory"})

    def broken(batch):
        raise RuntimeError("not a memory problem")

    with pytest.raises(RuntimeError, match="not a memory problem"):
        bm.find_max_batch(broken)


def test_model_run_makes_rows_and_records_failures(monkeypatch):
    monkeypatch.setattr(torch._dynamo, "reset", lambda: None)
    monkeypatch.setattr(bm, "release_memory", lambda: None)
    plan = bm.variants(["layer_norm", "mlp"], 32, quick=True)

    def fake_measure(v):
        if v.provider == "triton:mlp" and v.batch == 32:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        if v.provider == "triton+compile":
            raise RuntimeError("dynamo failed\ndetails")
        return timing(100.0 if v.provider == "torch" else 80.0), 1000.0 * v.batch

    skipped, reported = {}, []
    rows = bm.run(plan, fake_measure, 8.5e8, skipped, seq_len=1024,
                  progress=lambda rows: reported.append(len(rows)))
    assert reported == list(range(1, len(plan) - 1))  # after every measured variant
    assert skipped == {"train_step:triton:mlp@B=32": "out of memory",
                       "train_step:triton+compile@B=16": "failed: RuntimeError: dynamo failed"}
    assert len(rows) == len(plan) - 2
    torch_row = next(r for r in rows if r["provider"] == "torch" and r["shape"]["B"] == 32)
    assert torch_row["provider"] == "torch" and torch_row["kernels"] == "none"
    assert torch_row["shape"] == {"B": 32, "T": 1024}
    assert torch_row["tokens_per_s"] == pytest.approx(32 * 1024 / 0.1)
    assert torch_row["tflops"] == pytest.approx(8.5e8 * 32 * 1024 / 0.1 / 1e12)  # 278.5
    assert torch_row["mfu"] == pytest.approx(278.528 / 989.0, abs=1e-6)
    assert torch_row["peak_mem_mb"] == 32000.0 and torch_row["mode"] == "fwd_bwd"


def test_one_real_training_step_on_the_tiny_preset():
    step = bm.step_at(bm.Variant("torch", "none", False, 2), device="cpu", preset="tiny", seq_len=16)
    model = step.__closure__  # the step holds the model through forward; check that weights move
    params = [c.cell_contents for c in model if hasattr(c.cell_contents, "parameters")][0]
    before = params.transformer.wte.weight.detach().clone()
    loss = step()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert not torch.equal(before, params.transformer.wte.weight)
    assert all(p.grad is None for p in params.parameters())  # zero_grad(set_to_none=True)


# --- README performance table ----------------------------------------------------------------

README = f"# x\n\nintro\n\n{readme_table.BEGIN}\nold\n{readme_table.END}\n\n## after\n"


def _train_rows():
    return [harness.make_row("train_step", p, "fwd_bwd", "bfloat16", {"B": 16, "T": 1024}, timing(ms),
                             tflops=100.0, peak_mem_mb=mem, tokens_per_s=16384 / ms * 1e3, mfu=0.25)
            for p, ms, mem in (("torch", 200.0, 9000.0), ("triton", 100.0, 6000.0))]


def test_readme_block_without_results(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(README)
    results = tmp_path / "results"
    results.mkdir()
    assert readme_table.main(["--readme", str(readme), "--results-dir", str(results), "--check"]) == 1
    assert readme_table.main(["--readme", str(readme), "--results-dir", str(results)]) == 0
    text = readme.read_text()
    assert readme_table.NO_RESULTS in text and "old" not in text
    assert text.startswith("# x\n\nintro\n\n") and text.endswith(f"{readme_table.END}\n\n## after\n")
    assert readme_table.main(["--readme", str(readme), "--results-dir", str(results), "--check"]) == 0


def test_readme_block_from_results(tmp_path):
    old_meta = dict(META, date="2026-11-20T10:00:00Z", gpu="OLD GPU")
    harness.write_results([ln_row("torch", 9.0), ln_row("triton", 1.0)], old_meta, tmp_path)
    rows = sample_rows() + [ln_row("liger", 1.5, C=1024), ln_row("triton", 0.5, C=1024)] + _train_rows()
    harness.write_results(rows, META, tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text(README)
    readme_table.main(["--readme", str(readme), "--results-dir", str(tmp_path)])
    text = readme.read_text()
    assert "OLD GPU" not in text  # the newest file with the op wins
    assert "NVIDIA H100 80GB HBM3; torch 2.11.0, Triton 3.6.0, CUDA 13.0; 2026-11-21T10:00:00Z" in text
    line = next(ln for ln in text.splitlines() if ln.startswith("| layer_norm"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    # the headline shape is C=768; speed-ups of triton over the other providers, peak MiB (eager's)
    assert cells == ["layer_norm", "rows=16384 C=768", "fwd_bwd", "bfloat16", "1.0000",
                     "torch 2.00x, torch_compile 4.00x", "50 (100)"]
    train = [ln for ln in text.splitlines() if ln.startswith("| triton |") or ln.startswith("| torch |")]
    assert train == ["| triton | B=16 T=1024 | 163,840 | 25.0% | 2.00x | 6000 |",
                     "| torch | B=16 T=1024 | 81,920 | 25.0% | 1.00x | 9000 |"]


def test_readme_rewrite_needs_the_markers():
    with pytest.raises(ValueError, match="bench-table:begin"):
        readme_table.rewrite("# no markers\n", "x")
    with pytest.raises(ValueError):
        readme_table.rewrite(f"{readme_table.END}\n{readme_table.BEGIN}\n", "x")


def test_repository_readme_table_is_up_to_date(capsys):
    """README.md's block matches bench/results/ (run `python -m tritongpt.bench.readme_table` after adding results)."""
    assert readme_table.main(["--check"]) == 0, capsys.readouterr().out


@pytest.mark.gpu
def test_model_step_on_gpu_with_every_kernel():
    """bench_model's step on CUDA (tiny preset): every available kernel under bf16 autocast, and
    the measurement it reports (time, peak memory)."""
    step = bm.step_at(bm.Variant("triton", "all", False, 2), device="cuda", preset="tiny", seq_len=64)
    losses = [step().item() for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))
    t = harness.time_ms(step, warmup=5, rep=20)
    assert 0 < t["ms_p20"] <= t["ms"] <= t["ms_p80"]


# --- bench/validate_gpu.sh, with a stand-in for python --------------------------------------------

SHIM = """#!/usr/bin/env bash
# python stand-in: logs its arguments; renders reports with the real python; fakes the rest
echo "$*" >> "$SHIM_LOG"
case "$1 $2" in
  "-m tritongpt.bench.report") exec "$REAL_PY" "$@" ;;
  "-m pytest") [ "$3" = bench ] && exit 0 || exit 1 ;;  # the test suite "fails"
  "-m tritongpt.bench")  # writes its results file, then outlives its cap
    for ((i = 1; i <= $#; i++)); do
      if [ "${!i}" = --out-dir ]; then j=$((i + 1)); cp "$FAKE_RESULTS" "${!j}/"; fi
    done
    exec sleep 30 ;;
esac
exit 0
"""


def test_validate_gpu_script_keeps_results_of_a_capped_run(tmp_path):
    shim = tmp_path / "python"
    shim.write_text(SHIM)
    shim.chmod(0o755)
    results = harness.write_results(sample_rows(), META, tmp_path / "made")
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=str(shim), REAL_PY=sys.executable, SHIM_LOG=str(tmp_path / "calls"),
               FAKE_RESULTS=str(results), BENCH_TIMEOUT="2", OUT=str(out))
    proc = subprocess.run(["bash", "bench/validate_gpu.sh"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # the tests stage failed
    log = (out / "validate.log").read_text()
    assert "== tests: exit 1" in log and "== pytest-benchmark: exit 0" in log
    assert "== benchmark: exit 124" in log and "cut at its cap" in log
    assert "== failed: tests benchmark" in log
    assert sorted(p.name for p in out.iterdir()) == sorted(["validate.log", results.name, "REPORT.md",
                                                            "plots.tar.gz"])
    assert "2.00x" in (out / "REPORT.md").read_text()
    calls = (tmp_path / "calls").read_text().splitlines()
    assert any(c.startswith("-m pytest -q") and f"--junitxml {out}/tests.xml" in c for c in calls)
    assert any(c.startswith("-m pytest bench --benchmark-only") for c in calls)
    assert any(c.startswith("-m tritongpt.bench --quick --out-dir") for c in calls)



def test_bench_mlp_flop_counts():
    from tritongpt.bench import bench_mlp as bmlp

    # N=4 rows, C=8, H=32: one matmul is 2*4*8*32 = 2048 FLOPs; fwd does 2, bwd 4
    assert bmlp.mlp_flops(4, 8, "fwd") == 2 * 2048
    assert bmlp.mlp_flops(4, 8, "bwd") == 4 * 2048
    assert bmlp.mlp_flops(4, 8, "fwd_bwd") == 6 * 2048
    assert bmlp.mlp_flops(16384, 768, "fwd_bwd") == 12 * 16384 * 768 * 3072


def test_bench_mlp_run_on_cpu(monkeypatch):
    """bench_mlp.run with the timers stubbed, few rows and fp32: one row per provider and mode."""
    from tritongpt.bench import bench_mlp as bmlp

    monkeypatch.setattr(bmlp, "ROWS", 5)
    monkeypatch.setattr(bmlp, "DTYPE", torch.float32)
    stub_timers(monkeypatch)
    from tritongpt.kernels import mlp

    backends = []  # the plain-GEMM backend in force at each plain GEMM, forward or backward
    plain = mlp._plain_matmul
    monkeypatch.setattr(mlp, "_plain_matmul", lambda *a, **kw: (backends.append(mlp.PLAIN_GEMM), plain(*a, **kw))[1])
    fns, skipped = bmlp.providers(no_compile=True)
    assert set(fns) == {"triton", "triton_gemm", "torch"} and "torch_compile" in skipped
    rows = bmlp.run((16,), {"triton_gemm": fns["triton_gemm"]}, skipped, 1.0, warmup=1, rep=1, device="cpu")
    assert backends and set(backends) == {"triton"} and mlp.PLAIN_GEMM == "cublas"
    backends.clear()
    fns = {k: fns[k] for k in ("triton", "torch")}
    rows = bmlp.run((16,), fns, skipped, ceiling_tflops=1.0, warmup=1, rep=1, device="cpu")
    assert set(backends) == {"cublas"}
    assert [(r["provider"], r["mode"]) for r in rows] == [(p, m) for p in fns for m in bmlp.MODES]
    assert rows[0]["tflops"] == round(harness.tflops(bmlp.mlp_flops(5, 16, "fwd"), 1.0), 6)  # rows round to 6 digits
    assert rows[0]["shape"] == {"rows": 5, "C": 16, "H": 64} and rows[0]["ceiling_frac"] == rows[0]["tflops"]


def test_bench_mlp_skips_cleanly_without_cuda(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "bench/bench_mlp.py", "--quick", "--out-dir", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "bench_mlp: skipped, needs a CUDA GPU (none found)" in proc.stdout
    assert list(tmp_path.iterdir()) == []


def test_bench_mlp_follows_the_protocol():
    from tritongpt.bench import bench_mlp as bmlp

    assert bmlp.OPS == ("mlp",) and "bench_mlp" in [harness.module_name(m) for m in harness.discover_modules()[0]]
    args = harness.arg_parser("x").parse_args(["--quick", "--no-compile"])
    ids = [case_id for case_id, _ in bmlp.cases(args)]
    assert ids == [f"mlp-C768-{p}-{m}" for p in ("triton", "triton_gemm", "torch") for m in bmlp.MODES]


# --- smoke runs (--smoke): CPU timing, tiny shapes, marked results, failures ---------------------

def test_cpu_timer_runs_a_warm_up_then_a_few_timed_calls():
    calls, leaf = [], torch.zeros(2, requires_grad=True)

    def fn():
        assert leaf.grad is None  # grad_to_none clears it before every call
        leaf.grad = torch.ones(2)
        calls.append(1)

    t = harness.cpu_time_ms(fn, rep=1e9, grad_to_none=[leaf])  # a huge budget: capped runs
    assert len(calls) == 1 + harness.CPU_MAX_RUNS
    assert 0 < t["ms_p20"] <= t["ms"] <= t["ms_p80"]
    calls.clear()
    harness.cpu_time_ms(lambda: (calls.append(1), __import__("time").sleep(0.002)), rep=0.0)
    assert len(calls) == 2  # at least one timed call, whatever the budget


def test_smoke_constants_are_put_back():
    module = types.SimpleNamespace(ROWS=16384, SMOKE={"ROWS": 8})
    with harness.smoke_constants(module, smoke=False):
        assert module.ROWS == 16384
    with pytest.raises(RuntimeError), harness.smoke_constants(module):
        assert module.ROWS == 8
        raise RuntimeError("collect failed")
    assert module.ROWS == 16384


def test_smoke_results_go_to_a_temporary_folder_by_default():
    args = harness.parse_args("x", ["--smoke"])
    assert args.quick and Path(args.out_dir).is_dir()
    assert Path(harness.RESULTS_DIR) not in Path(args.out_dir).resolve().parents
    os.rmdir(args.out_dir)
    assert harness.parse_args("x", []).out_dir == str(harness.RESULTS_DIR)


def test_failures_are_the_skips_that_failed():
    meta = {"skipped": {"layer_norm:liger": "not installed (x)", "attention:sdpa_cudnn": "needs CUDA",
                        "mlp:torch_compile": "failed at C=32 fwd: RuntimeError: boom",
                        "bench_model": "failed: ValueError: bad"}}
    assert harness.failures(meta) == {k: meta["skipped"][k] for k in ("mlp:torch_compile", "bench_model")}
    assert harness.failures({}) == {}
    assert harness.is_smoke({"smoke": True, "gpu": "H100"}) and harness.is_smoke({"gpu": None})
    assert not harness.is_smoke(META)


def test_smoke_run_of_one_module_writes_results_report_and_plots(tmp_path, capsys):
    """bench_layer_norm --smoke on this machine (CPU: the kernel in Triton's interpreter), as a GPU
    run would go: every provider and mode, one results file marked smoke, REPORT.md and plots."""
    assert bln.main(["--smoke", "--no-compile", "--out-dir", str(tmp_path)]) == 0
    [path] = tmp_path.glob("layer_norm-*.json")
    data = harness.load_results(path)
    assert data["meta"]["smoke"] is True and data["meta"]["device"] == harness.device()
    assert [(r["provider"], r["mode"]) for r in data["rows"]] == [(p, m) for p in ("triton", "torch")
                                                                  for m in harness.MODES]
    assert {r["shape"]["rows"] for r in data["rows"]} == {bln.SMOKE["ROWS"]}
    assert bln.ROWS == 16384  # put back after the run
    assert "## " in (tmp_path / "REPORT.md").read_text()
    assert len(list((tmp_path / "plots").glob("*.png"))) >= 2
    assert f"wrote {path}" in capsys.readouterr().out


def _with_broken_liger(monkeypatch):
    """bench_layer_norm's providers plus a 'liger' that crashes, as a broken provider would."""
    def broken(x, w, b, eps=1e-5):
        raise RuntimeError("provider exploded")

    real = bln.providers
    monkeypatch.setattr(bln, "providers", lambda no_compile=False: (
        {**real(no_compile)[0], "liger": broken}, {}))


def test_a_broken_provider_fails_the_smoke_run(tmp_path, monkeypatch, capsys):
    """An optional provider's failure is data in a GPU run but fails a smoke run (CI), through the
    suite and through the module alone."""
    _with_broken_liger(monkeypatch)
    monkeypatch.setattr(suite, "_release_memory", lambda: None)
    args = ["--smoke", "--only", "layer_norm", "--no-compile", "--out-dir", str(tmp_path)]
    assert suite.main(args) == 1
    out = capsys.readouterr().out
    assert "smoke run: layer_norm:liger failed at C=96 fwd: RuntimeError: provider exploded" in out
    [path] = tmp_path.glob("suite-*.json")
    assert {r["provider"] for r in harness.load_results(path)["rows"]} == {"triton", "torch"}
    assert bln.main(args) == 1


def test_readme_table_ignores_smoke_results(tmp_path, capsys):
    harness.write_results(sample_rows(), dict(META, smoke=True, device="cpu"), tmp_path)
    harness.write_results(sample_rows(), dict(META, gpu=None, date="2026-11-22T10:00:00Z"), tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text(README)
    assert readme_table.main(["--readme", str(readme), "--results-dir", str(tmp_path)]) == 0
    assert readme_table.NO_RESULTS in readme.read_text()
    assert capsys.readouterr().out.count("a smoke run or a run without a GPU, not a measurement") == 2
    harness.write_results(sample_rows(), META, tmp_path)  # a GPU measurement is used
    readme_table.main(["--readme", str(readme), "--results-dir", str(tmp_path)])
    assert "| layer_norm" in readme.read_text()


def test_validate_gpu_script_dry_run_on_cpu(tmp_path):
    """validate_gpu.sh --smoke with the real python, each stage narrowed to stay short: the flow a
    GPU machine runs, every stage passing on this machine."""
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(out),
               TEST_ARGS="tests/test_bench.py -k test_gbps_and_tflops_arithmetic",
               PYTEST_BENCH_ARGS="-k layer_norm-C96-triton-fwd_bwd",
               BENCH_ARGS="--smoke --only layer_norm --no-compile")
    proc = subprocess.run(["bash", "bench/validate_gpu.sh", "--smoke"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    log = (out / "validate.log").read_text()
    assert proc.returncode == 0, log
    for stage in ("tests", "pytest-benchmark", "benchmark"):
        assert f"== {stage}: exit 0" in log
    assert "1 passed" in log and "pytest bench --benchmark-only -q --smoke" in log
    names = sorted(p.name for p in out.iterdir())
    assert [n for n in names if not n.startswith("suite-")] == sorted(
        ["validate.log", "tests.xml", "pytest-benchmark.json", "REPORT.md", "plots.tar.gz"])
    [results] = out.glob("suite-*.json")
    assert harness.load_results(results)["meta"]["smoke"] is True
