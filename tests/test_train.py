"""train.py: loss falls, kernels track the reference, resume is exact, torchrun matches one
process, shard data, NaN stop, bad flags, the plot. Tiny model, few steps, short sequences."""
import errno
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tritongpt.kernels._utils import interpreting
from tritongpt.trainer import checkpoint, kernel_check, logs, options
from tritongpt.trainer.data import DEMO_EOT, demo_splits

REPO = Path(__file__).resolve().parent.parent


def _load_train():
    """train.py, the script at the repository root (conftest takes the root off sys.path)."""
    spec = importlib.util.spec_from_file_location("train", REPO / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train = _load_train()
SHARED = REPO.parent / "shared" / "data"
# Numbers a run computes; timings (ms, tokens_per_s, mfu) differ from run to run.
COMPUTED = ("step", "loss", "lr", "grad_norm", "val_loss")
SMALL = ["--preset", "tiny", "--device", "cpu", "--batch-size", "4", "--seq-len", "16", "--samples", "0", "--kernels", "none",
         "--no-kernel-check", "--time-budget", "0"]


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these tiny models gain nothing from more, and on a shared 2-core
    machine a second thread mostly waits (several times slower under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(out_dir, *flags):
    train.main(SMALL + ["--out-dir", str(out_dir)] + [str(f) for f in flags])
    return logs.read_log(os.path.join(out_dir, "log.jsonl"))


def computed(records):
    return [{k: r[k] for k in COMPUTED if k in r} for r in records]


def losses(records):
    return [r["loss"] for r in records if "loss" in r]


def test_demo_corpus_is_offline_text_in_shuffled_documents():
    train, val = demo_splits()
    assert len(train) > 9 * len(val) > 250_000 and b"Return" in train.astype("uint8").tobytes()
    for split in (train, val):  # documents start with DEMO_EOT, which the loader shuffles by
        assert split[0] == DEMO_EOT and (split == DEMO_EOT).sum() > 50


def test_demo_loss_falls_and_samples(tmp_path, capsys):
    records = run(tmp_path, "--max-steps", 40, "--batch-size", 8, "--seq-len", 32, "--warmup-steps", 5,
                  "--eval-every", 20, "--samples", 1, "--log-every", 10)
    train_losses = losses(records)
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 41))
    assert max(train_losses[-5:]) < train_losses[0] - 1.0, train_losses  # from ln(256) = 5.5, well down
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(val) == 2 and max(val) < math.log(256) - 1.0, val
    for r in records:
        if "loss" in r:
            assert r["tokens_per_s"] > 0 and r["mfu"] is None  # no peak FLOP/s for a CPU
    out = capsys.readouterr().out
    assert "sample:" in out and "step     40 | loss" in out
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "loss.png").stat().st_size > 1000


@pytest.mark.slow
@pytest.mark.skipif(not interpreting(), reason="runs the kernels on CPU in Triton's interpreter; on a GPU "
                    "machine tests/test_model.py checks them on CUDA")
def test_kernels_track_reference(tmp_path):
    # Same seed, same batches: the only difference is the op implementations. In fp32 the kernels
    # and PyTorch sum in different orders; measured over these 5 steps the losses and grad norms
    # differ by at most 2 ulps (9.5e-7 at a loss of 5.5; an ulp there is 4.8e-7). The tolerance
    # is about 10 ulps. A backward off by 1% in one term of LayerNorm's dx moves the first
    # step's grad norm by 1.1e-4, twenty times the tolerance.
    flags = ["--max-steps", 5, "--warmup-steps", 2, "--eval-every", 5, "--eval-batches", 1,
             "--batch-size", 2, "--seq-len", 8]
    ref = run(tmp_path / "none", *flags)
    on = run(tmp_path / "all", *flags, "--kernels", "all")
    assert len(ref) == len(on) == 6
    for a, b in zip(computed(ref), computed(on)):
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=0, abs=5e-6), (key, a, b)
    assert losses(ref) != losses(on)  # the kernels really ran: not bitwise the reference


def test_resume_continues_exactly(tmp_path, monkeypatch):
    flags = ["--max-steps", 8, "--warmup-steps", 2, "--eval-every", 4, "--ckpt-every", 3]
    whole = run(tmp_path / "whole", *flags)

    real_step, calls = train.forward_backward, []

    def crash_at_step_5(*a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt("simulated crash")
        return real_step(*a, **k)

    monkeypatch.setattr(train, "forward_backward", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", *flags)
    assert checkpoint.load(tmp_path / "cut" / "ckpt.pt")["step"] == 3
    assert len(losses(logs.read_log(tmp_path / "cut" / "log.jsonl"))) == 4  # step 4 logged, not saved
    monkeypatch.setattr(train, "forward_backward", real_step)
    resumed = run(tmp_path / "cut", *flags, "--resume", "auto")
    assert computed(resumed) == computed(whole)  # bitwise equal floats, steps 4..8 recomputed


def test_checkpoint_write_failure_keeps_the_previous_one(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    checkpoint.save(path, {"step": 1})

    def disk_full_mid_write(obj, f):
        f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", disk_full_mid_write)
    with pytest.raises(checkpoint.CheckpointError, match="cannot write checkpoint .*ckpt.pt: No space left on "
                       "device; the previous checkpoint .* is kept"):
        checkpoint.save(path, {"step": 2})
    assert checkpoint.load(path)["step"] == 1
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_stale_temporaries_are_cleaned(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid no live process has: a writer killed mid-write
    (tmp_path / f"ckpt.pt.tmp{dead.pid}").write_bytes(b"x" * 1000)
    checkpoint.save(path, {"step": 1})
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def flip_middle(path):
    raw = bytearray(path.read_bytes())
    mid = len(raw) // 2
    raw[mid:mid + 64] = bytes(b ^ 0xFF for b in raw[mid:mid + 64])
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage, reason", [
    (flip_middle, "checksum mismatch|unreadable"),
    (lambda p: p.write_bytes(p.read_bytes()[:len(p.read_bytes()) // 2]), "unreadable"),
    (lambda p: p.write_bytes(b""), "empty file"),
    (lambda p: torch.save({"weights": torch.ones(3)}, p), "not a tritongpt checkpoint"),
    (lambda p: p.write_text("hello"), "unreadable"),
])
def test_damaged_checkpoint_is_refused_in_one_line(tmp_path, damage, reason):
    run(tmp_path, "--max-steps", 2)
    ckpt = tmp_path / "ckpt.pt"
    damage(ckpt)
    with pytest.raises(SystemExit) as info:
        run(tmp_path, "--max-steps", 4, "--resume", ckpt)
    message = str(info.value.code)
    assert message.startswith(f"train.py: {ckpt}: ") and "\n" not in message, message
    assert re.search(reason, message), message


def test_rng_states_round_trip():
    state = checkpoint.rng_state()
    expected = (torch.rand(3), np.random.rand(3), __import__("random").random())
    checkpoint.set_rng_state(state)
    again = (torch.rand(3), np.random.rand(3), __import__("random").random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2] == again[2]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    real_step = train.forward_backward

    def nan_from_step_5(model, optimizer, loader, args, lr, device, procs):
        loss, norm = real_step(model, optimizer, loader, args, lr, device, procs)
        return (loss * math.nan if len(losses(logs.read_log(tmp_path / "log.jsonl"))) >= 4 else loss), norm

    monkeypatch.setattr(train, "forward_backward", nan_from_step_5)
    with pytest.raises(SystemExit) as info:
        run(tmp_path, "--max-steps", 8, "--ckpt-every", 2, "--eval-every", 8)
    assert info.value.code not in (0, None)
    assert "loss nan" in str(info.value.code) and str(tmp_path / "ckpt.pt") in str(info.value.code)
    ckpt = checkpoint.load(tmp_path / "ckpt.pt")
    # The weights after step 4 gave the NaN, so the checkpoint of step 4 was never written: a
    # checkpoint is saved only once the next step's loss proves its weights finite.
    assert ckpt["step"] == 2
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())


@pytest.mark.parametrize("flags, message", [
    (["--max-steps", "0"], "--max-steps must be at least 1"),
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--lr", "nan"], "--lr must be a positive number"),
    (["--preset", "nope"], "--preset 'nope' is not one of"),
    (["--batch-size", "4", "--seq-len", "16", "--total-batch", "100"], "must be a multiple of"),
    (["--data", "/no/such/dir"], "nor a directory"),
    (["--resume", "/no/such/ckpt.pt"], "no such checkpoint"),
    (["--hellaswag", "on"], "needs the GPT-2 tokenizer"),
    (["--seq-len", "1000000"], "--seq-len 1000000 is too long"),
    (["--doc-mask"], "--doc-mask needs GPT-2 tokens"),
])
def test_bad_flags_exit_with_message(flags, message, capsys):
    with pytest.raises(SystemExit) as info:
        train.main(flags + ["--device", "cpu"])
    assert info.value.code not in (0, None)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--kernels", "bogus"], "unknown kernel 'bogus'"),
    (["--device", "tpu"], "expected cpu, cuda or cuda:N"),
])
def test_bad_values_found_later_exit_with_message(flags, message, tmp_path):
    with pytest.raises(SystemExit) as info:
        train.main(flags + ["--max-steps", "1", "--out-dir", str(tmp_path)])
    assert message in str(info.value.code)


def test_total_batch_must_divide_over_processes():
    with pytest.raises(SystemExit):
        options.parse_args(["--batch-size", "4", "--seq-len", "16", "--total-batch", "64"], world_size=2)
    args = options.parse_args(["--batch-size", "4", "--seq-len", "16", "--total-batch", "256"], world_size=2)
    assert args.grad_accum == 2


def write_shards(directory, tokens, name="tiny"):
    """Train and val shards in data.prepare's naming: <name>_{val,train}_NNNNNN.npy."""
    directory.mkdir(parents=True, exist_ok=True)
    cut = len(tokens) * 9 // 10
    np.save(directory / f"{name}_val_000000.npy", tokens[cut:])
    half = cut // 2
    np.save(directory / f"{name}_train_000000.npy", tokens[:half])
    np.save(directory / f"{name}_train_000001.npy", tokens[half:cut])
    return directory


def test_shard_data_run(tmp_path):
    # A repeating sequence of 37 GPT-2 token ids: learnable, so the loss leaves ln(50304) = 10.8 fast.
    pattern = np.random.default_rng(0).integers(0, 50257, 37)
    shards = write_shards(tmp_path / "shards", np.tile(pattern, 300).astype(np.uint16))
    records = run(tmp_path / "out", "--data", shards, "--max-steps", 12, "--warmup-steps", 2,
                  "--total-batch", 128, "--eval-every", 6, "--lr", "3e-3", "--hellaswag", "off")
    train_losses = losses(records)
    assert train_losses[0] == pytest.approx(math.log(50304), abs=0.3)
    assert train_losses[-1] < train_losses[0] - 2.0, train_losses
    assert len([r for r in records if "val_loss" in r]) == 2


EOT = 50256


def document_shards(directory, n_docs=400, seed=2):
    """Shards of GPT-2 token documents in build-nanogpt's layout, each prefixed by <|endoftext|>:
    3 to 12 tokens of one of two fixed sequences, so that rows of 16 tokens pack several."""
    rng = np.random.default_rng(seed)
    patterns = rng.integers(0, EOT, (2, 12))
    docs = [np.concatenate([[EOT], patterns[rng.integers(2)][:rng.integers(3, 13)]]) for _ in range(n_docs)]
    return write_shards(directory, np.concatenate(docs).astype(np.uint16))


def test_doc_mask_trains_on_gpt2_token_shards(tmp_path, monkeypatch, capsys):
    """--doc-mask: the model masks attention at <|endoftext|> (document ids reach every attention
    call), the loss falls from ln(50304), and the checkpoint records it."""
    from tritongpt.model import gpt
    seen = []
    real = gpt._sdpa

    def attention(q, k, v, dropout_p, doc_ids=None):
        seen.append(doc_ids is not None)
        return real(q, k, v, dropout_p, doc_ids)

    monkeypatch.setattr(gpt, "_sdpa", attention)
    shards = document_shards(tmp_path / "shards")
    records = run(tmp_path / "out", "--data", shards, "--doc-mask", "--max-steps", 12, "--warmup-steps", 2,
                  "--total-batch", 128, "--eval-every", 12, "--eval-batches", 2, "--lr", "3e-3",
                  "--hellaswag", "off")
    train_losses = losses(records)
    assert train_losses[0] == pytest.approx(math.log(50304), abs=0.3)
    assert train_losses[-1] < train_losses[0] - 2.0, train_losses
    assert seen and all(seen)
    assert "attention masked at <|endoftext|> (--doc-mask)" in capsys.readouterr().out
    ckpt = checkpoint.load(tmp_path / "out" / "ckpt.pt")
    assert ckpt["args"]["doc_mask"] is True
    assert ckpt["config"]["doc_mask"] is True and ckpt["config"]["doc_sep_token"] == EOT


def test_doc_mask_cannot_change_on_resume(tmp_path):
    shards = document_shards(tmp_path / "shards", n_docs=100)
    flags = ["--data", shards, "--max-steps", 2, "--total-batch", 64, "--eval-batches", 1, "--hellaswag", "off"]
    run(tmp_path / "plain", *flags)
    with pytest.raises(SystemExit) as info:
        run(tmp_path / "plain", *flags, "--max-steps", 3, "--resume", "auto", "--doc-mask")
    assert str(info.value.code).startswith("train.py: --doc-mask True differs from False"), info.value.code
    run(tmp_path / "masked", *flags, "--doc-mask")
    resumed = run(tmp_path / "masked", *flags, "--max-steps", 3, "--resume", "auto")  # stays on
    assert [r["step"] for r in resumed if "loss" in r] == [1, 2, 3]
    assert checkpoint.load(tmp_path / "masked" / "ckpt.pt")["config"]["doc_mask"] is True
    # from the path alone, the flag restated: --data comes from the checkpoint, not the demo default
    train.main(["--resume", str(tmp_path / "masked" / "ckpt.pt"), "--doc-mask", "--max-steps", "4"])
    assert checkpoint.load(tmp_path / "masked" / "ckpt.pt")["step"] == 4


def test_a_checkpoint_older_than_doc_mask_resumes_without_it():
    """A checkpoint written before --doc-mask existed trained without it: resuming it keeps it off,
    and asking for it is refused."""
    saved = vars(options.parse_args(["--data", "shakespeare"])).copy()
    del saved["given"], saved["doc_mask"]
    assert options.resumed(options.parse_args(["--data", "shakespeare"]), saved, "old.pt").doc_mask is False
    with pytest.raises(ValueError, match="--doc-mask True differs from False in old.pt"):
        options.resumed(options.parse_args(["--data", "shakespeare", "--doc-mask"]), saved, "old.pt")


def test_missing_shards_exit_with_message(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as info:
        run(tmp_path / "out", "--data", tmp_path / "empty", "--max-steps", 1)
    assert str(info.value.code).startswith("train.py: ")


@pytest.mark.skipif(not (SHARED / "tinyshakespeare.txt").exists(), reason="needs ../shared/data")
def test_tinyshakespeare_with_the_gpt2_tokenizer(tmp_path):
    from tritongpt.data.tokenizer import gpt2_encoding
    enc = gpt2_encoding(local_dir=SHARED / "gpt2")
    text = (SHARED / "tinyshakespeare.txt").read_text()[:40_000]
    shards = write_shards(tmp_path / "shakespeare", np.array(enc.encode_ordinary(text), dtype=np.uint16),
                          name="shakespeare")
    records = run(tmp_path / "out", "--data", shards, "--max-steps", 8, "--warmup-steps", 1,
                  "--total-batch", 64, "--eval-every", 8, "--eval-batches", 2, "--lr", "1e-2",
                  "--hellaswag", "off")
    train_losses = losses(records)
    assert train_losses[-1] < train_losses[0] - 1.0, train_losses


def gloo_available():
    import torch.distributed as dist
    return dist.is_available() and dist.is_gloo_available()


@pytest.mark.slow
@pytest.mark.skipif(not gloo_available(), reason="torch.distributed with gloo is not available")
def test_torchrun_two_processes_match_one(tmp_path):
    # One process with batch 4 equals two ranks with batch 2 each (the loader's contract), both
    # with 2 accumulation micro-steps: the same tokens and, after DDP averages, the same gradients.
    # Only the order of float sums differs (a mean over 4 rows vs the mean of two 2-row means).
    # Shards, not the demo: each process would build the demo corpus (seconds under load).
    pattern = np.random.default_rng(1).integers(0, 50257, 29)
    shards = write_shards(tmp_path / "shards", np.tile(pattern, 100).astype(np.uint16))
    flags = ["--data", shards, "--max-steps", 4, "--warmup-steps", 1, "--total-batch", 128,
             "--eval-every", 4, "--eval-batches", 2, "--lr", "3e-3", "--hellaswag", "off"]
    one = run(tmp_path / "one", *flags, "--batch-size", 4)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           *SMALL, "--out-dir", str(tmp_path / "two"), *map(str, flags), "--batch-size", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    two = logs.read_log(tmp_path / "two" / "log.jsonl")
    assert "x 2; 128 tokens/step = 2 x 16 x 2 x 2" in done.stdout
    assert len(one) == len(two) == 5
    for a, b in zip(computed(one), computed(two)):
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-6), (key, a, b)


def test_plot_from_log(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    log = tmp_path / "log.jsonl"
    rows = [{"step": s, "loss": 5.0 / s, "lr": 1e-3, "tokens_per_s": 1.0} for s in range(1, 6)]
    rows.append({"step": 5, "val_loss": 1.2, "hellaswag": 0.25})
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train.main(["--plot", str(log)])
    assert (tmp_path / "loss.png").stat().st_size > 1000
    with pytest.raises(SystemExit):
        train.main(["--plot", str(tmp_path / "missing.jsonl")])


def test_mfu_inputs():
    assert logs.peak_flops(torch.device("cpu")) is None
    config = train.GPTConfig.from_name("gpt2")
    # 124M: 6 * 124e6 + 12 * 12 * 768 * 1024 ~ 0.86 GFLOP per token (nanoGPT's estimate)
    assert train.flops_per_token(124_000_000, config.n_layer, config.n_embd, 1024) == \
        6 * 124_000_000 + 12 * 12 * 768 * 1024
    line = logs.format_step({"step": 1, "loss": 1.0, "lr": 1e-3, "grad_norm": 0.5, "ms": 10.0,
                             "tokens_per_s": 100.0, "mfu": None})
    assert line.endswith("mfu -")


def test_exploding_lr_stops_before_the_update_and_its_checkpoint_resumes(tmp_path):
    run(tmp_path, "--max-steps", 2)
    with pytest.raises(SystemExit) as info:  # the update of step 3 blows the weights up
        run(tmp_path, "--max-steps", 10, "--resume", "auto", "--lr", "1e6", "--ckpt-every", 1)
    assert "stopping before the optimizer step" in str(info.value.code)
    assert str(tmp_path / "ckpt.pt") in str(info.value.code)
    ckpt = checkpoint.load(tmp_path / "ckpt.pt")
    assert max(t.abs().max().item() for t in ckpt["model"].values()) < 100
    records = run(tmp_path, "--max-steps", ckpt["step"] + 3, "--resume", "auto", "--lr", "1e-3")
    after = [r["loss"] for r in records if "loss" in r and r["step"] > ckpt["step"]]
    assert len(after) == 3 and all(math.isfinite(x) and x < 10 for x in after), after


def test_resume_from_a_path_alone_takes_the_options_from_the_checkpoint(tmp_path, capsys):
    run(tmp_path, "--max-steps", 3, "--seq-len", 8, "--batch-size", 3)
    train.main(["--resume", str(tmp_path / "ckpt.pt"), "--max-steps", "5"])
    records = logs.read_log(tmp_path / "log.jsonl")
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5]
    assert records[-2]["tokens_per_s"] > 0 and "3 x 8 x 1" in capsys.readouterr().out
    train.main(["--resume", str(tmp_path / "ckpt.pt")])  # all 5 steps done
    assert "this run is finished (5 of --max-steps 5 steps done)" in capsys.readouterr().out


@pytest.mark.parametrize("flags, option", [
    (["--seq-len", "32"], "--seq-len 32"),
    (["--preset", "demo"], "--preset demo"),
    (["--seed", "1"], "--seed 1"),
    (["--data", "shakespeare"], "--data shakespeare"),
])
def test_resume_refuses_options_that_cannot_change(tmp_path, flags, option):
    run(tmp_path, "--max-steps", 2)
    with pytest.raises(SystemExit) as info:
        train.main(["--resume", str(tmp_path / "ckpt.pt"), "--max-steps", "4"] + flags)
    assert str(info.value.code).startswith(f"train.py: {option} differs from "), info.value.code


def test_new_run_does_not_replace_an_old_log_unless_asked(tmp_path):
    run(tmp_path, "--max-steps", 2)
    before = (tmp_path / "log.jsonl").read_text()
    with pytest.raises(SystemExit) as info:
        run(tmp_path, "--max-steps", 3)
    assert "--overwrite" in str(info.value.code) and str(tmp_path / "log.jsonl") in str(info.value.code)
    assert (tmp_path / "log.jsonl").read_text() == before
    assert len(losses(run(tmp_path, "--max-steps", 3, "--overwrite"))) == 3


def test_resume_drops_a_half_written_log_line(tmp_path):
    run(tmp_path, "--max-steps", 2)
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # killed mid-write
    assert [r["step"] for r in run(tmp_path, "--max-steps", 3, "--resume", "auto") if "loss" in r] == [1, 2, 3]
    (tmp_path / "log.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="log.jsonl, line 2: not a JSON record"):
        logs.read_log(tmp_path / "log.jsonl")


def test_time_budget_stops_early_with_a_checkpoint(tmp_path, capsys):
    records = run(tmp_path, "--max-steps", 50, "--time-budget", "1e-6")
    assert [r["step"] for r in records if "loss" in r] == [1] and "val_loss" in records[-1]
    assert checkpoint.load(tmp_path / "ckpt.pt")["step"] == 1
    assert "--time-budget of 0 s is spent after step 1 of 50" in capsys.readouterr().out


def test_demo_defaults_fit_the_time_budget():
    args = options.parse_args([])
    assert args.time_budget and args.time_budget <= 240 and args.kernel_check
    assert args.preset == "demo" and args.warmup_steps < args.max_steps // 5


def test_warmup_defaults_to_a_fraction_of_short_runs():
    assert options.parse_args(["--data", "shakespeare", "--max-steps", "20"]).warmup_steps == 2
    assert options.parse_args(["--data", "shakespeare"]).warmup_steps == 715
    assert options.parse_args(["--data", "shakespeare", "--max-steps", "20", "--warmup-steps", "5"]).warmup_steps == 5


def test_tokenizer_dir_reaches_the_tokenizer(monkeypatch, tmp_path):
    from tritongpt.data import tokenizer
    from tritongpt.trainer import data
    seen = []
    monkeypatch.setattr(tokenizer, "gpt2_encoding", lambda local_dir=None: seen.append(local_dir))
    data.codec(options.parse_args(["--data", "shakespeare", "--tokenizer-dir", str(tmp_path)]))
    assert seen == [str(tmp_path)]


def test_process_group_times_out_in_minutes(monkeypatch):
    import torch.distributed as dist
    from tritongpt.trainer import distributed
    seen = {}
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: seen.update(kw))
    distributed.join(distributed.Processes(0, 0, 2), torch.device("cpu"), options.parse_args([]).pg_timeout)
    assert 60 <= seen["timeout"].total_seconds() <= 600


def test_shard_ids_outside_the_vocabulary_name_the_shard(tmp_path):
    shards = write_shards(tmp_path / "shards", np.full(2000, 60000, dtype=np.uint16))
    with pytest.raises(SystemExit) as info:
        run(tmp_path / "out", "--data", shards, "--max-steps", 1, "--hellaswag", "off")
    assert "tiny_train_00000" in str(info.value.code) and "outside the model's vocabulary" in str(info.value.code)


def test_sample_from_a_checkpoint(tmp_path, capsys):
    from tritongpt import sample
    run(tmp_path, "--max-steps", 2)
    texts = sample.main([str(tmp_path / "ckpt.pt"), "--tokens", "12", "--num-samples", "2", "--prompt", "Re",
                          "--kernels", "none"])
    assert len(texts) == 2 and all(t.startswith("Re") for t in texts)
    (tmp_path / "bad.pt").write_bytes(b"junk")
    with pytest.raises(SystemExit) as info:
        sample.main([str(tmp_path / "bad.pt")])
    assert str(tmp_path / "bad.pt") in str(info.value.code)


@pytest.mark.slow
def test_kernel_check_runs_the_kernels_against_the_reference():
    ok, lines = kernel_check.run_in_subprocess(torch.device("cpu"))
    assert ok, lines
    assert len(lines) == 4 and all(line.endswith("ok") for line in lines), lines
