"""bench/bench_attention.py on CPU: FLOP counts, rows with the timers stubbed, cases, the no-GPU skip.

(Its own file, beside tests/test_bench.py, which covers the shared benchmark plumbing.)
"""
import pytest
import torch

from tritongpt.bench import bench_attention as ba
from tritongpt.bench import harness

TIMING = {"ms": 1.0, "ms_p20": 0.9, "ms_p80": 1.1}


def test_attention_flop_counts():
    # 4 * B * H * T^2 * D, halved when causal; backward 2.5x, fwd_bwd 3.5x
    assert ba.attention_flops(1, 1, 4, 8, "fwd", causal=False) == 512
    assert ba.attention_flops(1, 1, 4, 8, "fwd") == 256
    assert ba.attention_flops(1, 1, 4, 8, "bwd") == 640
    assert ba.attention_flops(1, 1, 4, 8, "fwd_bwd") == 896
    assert ba.attention_flops(16, 12, 1024, 64, "fwd") == 2 * 16 * 12 * 1024**2 * 64


def test_run_on_cpu_records_rows_and_skips(monkeypatch):
    """run() with the timers stubbed, tiny shapes, the kernel in the interpreter: rows for the
    providers that work; SDPA backends this CPU lacks are skipped; the math reference stops after
    MATH_MAX_T without being dropped."""
    monkeypatch.setattr(ba, "B", 1)
    monkeypatch.setattr(ba, "H", 2)
    monkeypatch.setattr(ba, "DTYPE", torch.float32)
    monkeypatch.setattr(ba, "MATH_MAX_T", 16)
    monkeypatch.setattr(harness, "time_ms", lambda fn, warmup, rep, grad_to_none: (fn(), dict(TIMING))[1])
    monkeypatch.setattr(harness, "peak_memory_mb", lambda fn: (fn(), 1.0)[1])
    fns, skipped = ba.providers()
    cpu_only = {name: "needs CUDA" for name in ba.CUDA_ONLY} if harness.device() == "cpu" else {}
    assert skipped == cpu_only  # not offered on CPU
    # offered anyway, it fails at its first call: an optional provider, so it is skipped
    fns = {"triton": fns["triton"], "torch": fns["torch"], "sdpa_efficient": ba._pinned_sdpa("EFFICIENT_ATTENTION")}
    progress = []
    rows = ba.run(((16, 16), (32, 16)), fns, skipped, warmup=1, rep=1, device="cpu",
                  progress=lambda rows, extra: progress.append(len(rows)))
    got = [(r["provider"], r["shape"]["T"], r["mode"]) for r in rows]
    want = ([("triton", 16, m) for m in ba.MODES] + [("torch", 16, m) for m in ba.MODES]
            + [("triton", 32, m) for m in ba.MODES])
    assert got == want
    assert progress == [6, 9]
    # make_row keeps 6 decimals
    assert rows[0]["tflops"] == pytest.approx(harness.tflops(ba.attention_flops(1, 2, 16, 16, "fwd"), 1.0), abs=1e-6)
    assert "sdpa_efficient" not in fns and "attention:sdpa_efficient" in skipped  # no such backend on CPU
    assert "torch" in fns and skipped["attention:torch"].startswith("math backend run only up to T=16")


def test_cases_name_every_provider_and_mode():
    args = harness.arg_parser("x").parse_args(["--quick"])
    ids = [case_id for case_id, _ in ba.cases(args)]
    assert "attention-T1024-D64-triton-fwd_bwd" in ids and "attention-T4096-D64-sdpa_flash-bwd" in ids
    assert len(ids) == len(set(ids)) == len(ba.QUICK_SHAPES) * len(ba.MODES) * len(ba.providers()[0])


def test_skips_cleanly_without_cuda(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ba.main(["--quick", "--out-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out == "bench_attention: skipped, needs a CUDA GPU (none found)\n"
    assert list(tmp_path.iterdir()) == []
