"""bench/bench_attention.py on CPU: FLOP counts, rows with the timers stubbed, cases, the no-GPU
skip, and the GQA and document-masking workloads: their providers against the reference, the
SDPA backends they leave out, FlexAttention's block masks, the smoke run.

(Its own file, beside tests/test_bench.py, which covers the shared benchmark plumbing.)
"""
import sys
import warnings

import pytest
import torch
from helpers import stub_timers

from tritongpt.kernels import reference

from tritongpt.bench import bench_attention as ba
from tritongpt.bench import harness



def test_attention_flop_counts():
    # 4 * B * H * T^2 * D, halved when causal; backward 2.5x, fwd_bwd 3.5x
    assert ba.attention_flops(1, 1, 4, 8, "fwd", causal=False) == 512
    assert ba.attention_flops(1, 1, 4, 8, "fwd") == 256
    assert ba.attention_flops(1, 1, 4, 8, "bwd") == 640
    assert ba.attention_flops(1, 1, 4, 8, "fwd_bwd") == 896
    assert ba.attention_flops(16, 12, 1024, 64, "fwd") == 2 * 16 * 12 * 1024**2 * 64
    # documents: the sum of L * L / 2 over each row's documents; one document per row is causal
    assert ba.attention_flops(2, 3, 8, 16, "fwd", doc_lengths=[[8], [8]]) == ba.attention_flops(2, 3, 8, 16, "fwd")
    assert ba.attention_flops(1, 1, 8, 16, "fwd", doc_lengths=[[4, 4]]) == 4 * 16 * 16
    assert ba.attention_flops(1, 1, 8, 16, "bwd", doc_lengths=[[4, 4]]) == 5 * 4 * 16 * 16 // 2


def test_document_lengths_are_seeded_and_cover_the_row():
    rows = ba.document_lengths(3, 1024, 4)
    assert rows == ba.document_lengths(3, 1024, 4) and len(rows) == 3
    assert all(len(row) == 4 and sum(row) == 1024 and min(row) >= 1 for row in rows)
    assert rows[0] != rows[1]  # each row packs its own documents
    inputs = ba.make_inputs("docs", 64, 16, "cpu", batch=2, heads=2, n_docs=3)
    assert inputs.doc_ids.shape == (2, 64) and inputs.doc_ids.dtype == torch.long
    for ids, row in zip(inputs.doc_ids, inputs.doc_lengths):
        assert torch.equal(ids.bincount(), torch.tensor(row)) and bool((ids.diff() >= 0).all())


def test_run_on_cpu_records_rows_and_skips(monkeypatch):
    """run() with the timers stubbed, tiny shapes, the kernel in the interpreter: rows for the
    providers that work; SDPA backends this CPU lacks are skipped; the math reference stops after
    MATH_MAX_T without being dropped."""
    monkeypatch.setattr(ba, "B", 1)
    monkeypatch.setattr(ba, "H", 2)
    monkeypatch.setattr(ba, "DTYPE", torch.float32)
    monkeypatch.setattr(ba, "MATH_MAX_T", 16)
    stub_timers(monkeypatch)
    fns, skipped = ba.providers()
    cpu_only = {name: "needs CUDA" for name in ba.CUDA_ONLY} if harness.device() == "cpu" else {}
    assert skipped == cpu_only  # not offered on CPU
    # offered anyway, it fails at its first call: an optional provider, so it is skipped
    fns = {"triton": fns["triton"], "torch": fns["torch"], "sdpa_efficient": ba._pinned_sdpa("EFFICIENT_ATTENTION")}
    skipped = harness.keyed_skips(ba.OP, skipped)
    progress = []
    rows = ba.run((("causal", 16, 16), ("causal", 32, 16)), {"causal": fns}, skipped, warmup=1, rep=1,
                  device="cpu", progress=lambda rows, extra: progress.append(len(rows)))
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
    assert "attention-gqa-T1024-D64-triton-bwd" in ids and "attention-docs-T4096-D64-triton-fwd" in ids
    shapes = {"causal": ba.QUICK_SHAPES, "gqa": ba.QUICK_GQA_SHAPES, "docs": ba.QUICK_DOC_SHAPES}
    expected = sum(len(shapes[f]) * len(ba.MODES) * len(ba.providers(feature=f)[0]) for f in ba.FEATURES)
    assert len(ids) == len(set(ids)) == expected


def test_shapes_put_causal_first_and_name_the_feature():
    quick = ba.shapes_for(harness.arg_parser("x").parse_args(["--quick"]))
    assert quick == (("causal", 1024, 64), ("causal", 4096, 64), ("gqa", 1024, 64), ("docs", 4096, 64))
    full = ba.shapes_for(harness.arg_parser("x").parse_args([]))
    assert [f for f, _, _ in full] == ["causal"] * 12 + ["gqa"] * len(ba.GQA_SHAPES) + ["docs"] * len(ba.DOC_SHAPES)
    assert ba._shape("gqa", 1024, 64) == {"B": 16, "H": 12, "H_kv": 3, "T": 1024, "D": 64}
    assert ba._shape("docs", 4096, 64) == {"B": 16, "H": 12, "T": 4096, "D": 64, "docs": 16}
    with pytest.raises(ValueError, match="feature"):
        ba.providers(feature="window")


def feature_inputs(feature, dtype=torch.float32):
    """Small fp32 inputs of a workload and the reference's output for them (float64)."""
    inputs = ba.make_inputs(feature, 48, 16, "cpu", batch=2, heads=4, kv_heads=2, n_docs=3)
    inputs = ba.Inputs(*(t.detach().to(dtype).requires_grad_() for t in inputs[:3]), inputs.do.to(dtype),
                       inputs.doc_ids, inputs.doc_lengths)
    expected = reference.flash_attention(*(t.detach().double() for t in inputs[:3]), causal=True,
                                         doc_ids=inputs.doc_ids)
    return inputs, expected


@pytest.mark.parametrize("feature", ["gqa", "docs"])
def test_providers_compute_the_workload(monkeypatch, feature):
    """Every provider offered here for gqa and docs computes that attention (the reference's),
    forward and backward: the SDPA backends with enable_gqa or the dense mask, the kernel with
    H_kv heads or doc_ids."""
    monkeypatch.setattr(ba, "DTYPE", torch.float32)
    fns, skipped = ba.providers(feature=feature)
    assert {"triton", "torch"} <= set(fns) and "flex_attention" not in fns  # no CUDA: FlexAttention skipped
    assert skipped["flex_attention"].startswith("needs CUDA")
    inputs, expected = feature_inputs(feature)
    for name, bind in fns.items():
        out = bind(inputs)(inputs.q, inputs.k, inputs.v)
        torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4, msg=name)
        out.backward(inputs.do)
        assert inputs.k.grad.shape == inputs.k.shape, name
        inputs.q.grad = inputs.k.grad = inputs.v.grad = None


@pytest.mark.parametrize("feature", ["causal", "gqa", "docs"])
def test_flex_attention_block_masks(feature):
    """FlexAttention's provider (eager here, forward only: no backward on CPU) with its block mask
    gives the reference's attention: the mask_mod of every workload is right."""
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    inputs, expected = feature_inputs(feature)
    q, k, v = (t.detach() for t in inputs[:3])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "called without torch.compile": unfused, fine here
        out = ba._flex(flex.flex_attention)(inputs)(q, k, v)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)


def test_flex_attention_is_skipped_with_a_reason(monkeypatch):
    assert ba._flex_provider(False)[1] == "needs CUDA (FlexAttention has no backward on CPU)"
    monkeypatch.setattr(harness, "device", lambda: "cuda")
    assert ba._flex_provider(True) == (None, "--no-compile (FlexAttention is fused only under torch.compile)")
    monkeypatch.setitem(sys.modules, "torch.nn.attention.flex_attention", None)  # an older torch
    fn, why = ba._flex_provider(False)
    assert fn is None and why.startswith("unavailable (torch ")


def test_sdpa_backends_that_cannot_run_a_feature_are_skipped_not_failed():
    """SDPA's refusal of a pinned backend ("No available kernel", as the flash backend refuses a
    mask on CUDA) skips it with the reason; any other error is a failure, which fails a smoke run."""
    def refused(inputs):
        def attend(q, k, v):
            warnings.warn("Flash attention does not support non-null attn_mask.")
            raise RuntimeError("No available kernel. Aborting execution.")
        return attend

    def broken(inputs):
        def attend(q, k, v):
            raise RuntimeError("illegal memory access")
        return attend

    assert ba._cannot_run(refused, "docs", "cpu") == \
        "cannot run docs: Flash attention does not support non-null attn_mask."
    why = ba._cannot_run(broken, "gqa", "cpu")
    assert why.startswith("failed") and "illegal memory access" in why
    assert harness.failures({"skipped": {"attention:gqa:x": why}})
    assert ba._cannot_run(ba._pinned_sdpa("MATH"), "docs", "cpu") is None


def test_run_records_gqa_and_docs_rows(monkeypatch):
    """run() on the new workloads with the timers stubbed: their shape keys, exact-attention FLOPs
    (documents' pairs only), skips keyed by feature."""
    monkeypatch.setattr(ba, "B", 1)
    monkeypatch.setattr(ba, "H", 2)
    monkeypatch.setattr(ba, "H_KV", 1)
    monkeypatch.setattr(ba, "DOC_LEN", 8)
    monkeypatch.setattr(ba, "DTYPE", torch.float32)
    monkeypatch.setattr(ba, "MATH_MAX_T", 16)
    stub_timers(monkeypatch)
    fns = {f: {"triton": ba._triton, "torch": ba._pinned_sdpa("MATH")} for f in ("gqa", "docs")}
    skipped = {}
    rows = ba.run((("gqa", 16, 16), ("docs", 32, 16)), fns, skipped, warmup=1, rep=1, device="cpu")
    got = [(r["provider"], r["shape"], r["mode"]) for r in rows]
    gqa, docs = {"B": 1, "H": 2, "H_kv": 1, "T": 16, "D": 16}, {"B": 1, "H": 2, "T": 32, "D": 16, "docs": 4}
    assert got == ([("triton", gqa, m) for m in ba.MODES] + [("torch", gqa, m) for m in ba.MODES]
                   + [("triton", docs, m) for m in ba.MODES])
    lengths = ba.document_lengths(1, 32, 4)
    flops = ba.attention_flops(1, 2, 32, 16, "fwd", doc_lengths=lengths)
    assert rows[6]["tflops"] == pytest.approx(harness.tflops(flops, 1.0), abs=1e-6)
    assert flops < ba.attention_flops(1, 2, 32, 16, "fwd")  # fewer pairs than causal
    assert skipped == {"attention:docs:torch": "math backend run only up to T=16 (its T x T scores do not fit beyond)"}


def test_smoke_run_covers_every_workload(tmp_path, capsys):
    """The module's smoke run on this machine (the kernel in Triton's interpreter without CUDA):
    causal, gqa and docs rows, no provider failed."""
    assert ba.main(["--smoke", "--out-dir", str(tmp_path)]) == 0
    data = harness.load_results(next(tmp_path.glob("attention-*.json")))
    shapes = {tuple(r["shape"]) for r in data["rows"] if r["provider"] == "triton"}
    assert shapes == {("B", "H", "T", "D"), ("B", "H", "H_kv", "T", "D"), ("B", "H", "T", "D", "docs")}
    assert not harness.failures(data["meta"]) and data["meta"]["smoke"] is True


def test_skips_cleanly_without_cuda(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ba.main(["--quick", "--out-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out == "bench_attention: skipped, needs a CUDA GPU (none found)\n"
    assert list(tmp_path.iterdir()) == []


def test_readme_table_has_a_headline_per_workload(tmp_path):
    """README's block shows attention's causal, GQA and document rows each at the headline size."""
    from tritongpt.bench import readme_table

    meta = {"gpu": "NVIDIA H200", "driver": "1", "torch": "2.11.0", "triton": "3.6.0", "cuda": "13.0",
            "commit": "0123456789ab", "date": "2026-11-21T10:00:00Z", "command": "x"}
    shapes = [ba._shape(feature, T, 64) for feature in ba.FEATURES for T in (4096, 1024)]
    rows = [harness.make_row(ba.OP, provider, "fwd", torch.bfloat16, shape,
                             {"ms": ms, "ms_p20": ms, "ms_p80": ms})
            for shape in shapes for provider, ms in (("triton", 1.0), ("flex_attention", 3.0))]
    harness.write_results(rows, meta, tmp_path)
    block = readme_table.render_block([dict(harness.load_results(p), path=str(p)) for p in tmp_path.glob("*.json")])
    lines = [line for line in block.splitlines() if line.startswith("| attention")]
    assert [line.split("|")[2].strip() for line in lines] == [
        "B=16 H=12 T=1024 D=64", "B=16 H=12 H_kv=3 T=1024 D=64", "B=16 H=12 T=1024 D=64 docs=4"]
    assert all("flex_attention 3.00x" in line for line in lines)
