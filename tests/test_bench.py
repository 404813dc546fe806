"""The benchmark plumbing on CPU: rows, results files, the report, byte counts, the no-GPU skip."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import bench_cross_entropy as bce
from bench import bench_layer_norm as bln
from bench import harness, report

REPO = Path(__file__).resolve().parents[1]
TIMING = {"ms": 1.0, "ms_p20": 0.9, "ms_p80": 1.1}
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
                     "triton:attention,mlp"):
        row = harness.make_row("train_step", provider, "fwd_bwd", "bfloat16", shape, TIMING,
                               tokens_per_s=1.5e5, mfu=0.45)
        assert row["provider"] == provider and row["mfu"] == 0.45
    for provider in ("triton:", "triton:softmax", "torch+compile"):
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
    assert sorted(p.name for p in paths) == ["run1-layer_norm-gbps.png", "run1-layer_norm-speedup.png"]
    for p in paths:
        data = Path(p).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 1000


def test_report_cli_writes_markdown_and_plots(tmp_path):
    path = harness.write_results(sample_rows(), META, out_dir=tmp_path)
    out = tmp_path / "REPORT.md"
    assert report.main([str(path), "--out", str(out), "--plots-dir", str(tmp_path / "plots")]) == 0
    text = out.read_text()
    assert "2.00x" in text and "](plots/" in text
    assert len(list((tmp_path / "plots").glob("*.png"))) == 2


def test_bench_run_records_rows_and_skips_a_failing_optional_provider(monkeypatch):
    """bench_layer_norm.run on CPU with the timers stubbed: rows for working providers, a skip
    reason for a failing optional one."""
    monkeypatch.setattr(bln, "ROWS", 4)
    monkeypatch.setattr(harness, "time_ms", lambda fn, warmup, rep, grad_to_none: (fn(), dict(TIMING))[1])
    monkeypatch.setattr(harness, "peak_memory_mb", lambda fn: (fn(), 1.0)[1])

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
    assert skipped["torch_compile"].endswith("RuntimeError: compiler exploded")
    fns["triton"] = broken  # not optional: its failure must stop the run
    with pytest.raises(RuntimeError):
        bln.run((8,), fns, {}, copy_gbps=1.0, warmup=1, rep=1, device="cpu")


@pytest.mark.parametrize("cmd", [["bench/bench_layer_norm.py"], ["-m", "bench.bench_layer_norm"]])
def test_bench_layer_norm_skips_cleanly_without_cuda(tmp_path, cmd):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, *cmd, "--quick", "--out-dir", str(tmp_path)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
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
    monkeypatch.setattr(harness, "time_ms", lambda fn, warmup, rep, grad_to_none: (fn(), dict(TIMING))[1])
    monkeypatch.setattr(harness, "peak_memory_mb", lambda fn: (fn(), 1.0)[1])
    fns, skipped = bce.providers(op, no_compile=True)
    fns = {k: fns[k] for k in ("triton", "torch")}
    rows = bce.run(op, (5,), fns, skipped, warmup=1, rep=1, device="cpu")
    assert [(r["provider"], r["mode"]) for r in rows] == [(p, m) for p in fns for m in bce.MODES]
    unit = "gbps" if op == "cross_entropy" else "tflops"
    assert all(r[unit] > 0 for r in rows) and rows[0]["shape"]["V"] == 64


def test_bench_cross_entropy_skips_cleanly_without_cuda(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "bench/bench_cross_entropy.py", "--quick", "--out-dir",
                           str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "bench_cross_entropy: skipped, needs a CUDA GPU (none found)" in proc.stdout
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


def test_bench_mlp_flop_counts():
    from bench import bench_mlp as bmlp

    # N=4 rows, C=8, H=32: one matmul is 2*4*8*32 = 2048 FLOPs; fwd does 2, bwd 4
    assert bmlp.mlp_flops(4, 8, "fwd") == 2 * 2048
    assert bmlp.mlp_flops(4, 8, "bwd") == 4 * 2048
    assert bmlp.mlp_flops(4, 8, "fwd_bwd") == 6 * 2048
    assert bmlp.mlp_flops(16384, 768, "fwd_bwd") == 12 * 16384 * 768 * 3072


def test_bench_mlp_run_on_cpu(monkeypatch):
    """bench_mlp.run with the timers stubbed, few rows and fp32: one row per provider and mode."""
    from bench import bench_mlp as bmlp

    monkeypatch.setattr(bmlp, "ROWS", 5)
    monkeypatch.setattr(bmlp, "DTYPE", torch.float32)
    monkeypatch.setattr(harness, "time_ms", lambda fn, warmup, rep, grad_to_none: (fn(), dict(TIMING))[1])
    monkeypatch.setattr(harness, "peak_memory_mb", lambda fn: (fn(), 1.0)[1])
    fns, skipped = bmlp.providers(no_compile=True)
    assert set(fns) == {"triton", "torch"} and "torch_compile" in skipped
    rows = bmlp.run((16,), fns, skipped, ceiling_tflops=1.0, warmup=1, rep=1, device="cpu")
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
