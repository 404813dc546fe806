"""The offline demo trainer: a short run learns, bad flags fail with a message."""
import re

import pytest

import train


def test_demo_corpus_is_offline_text():
    text = train.demo_corpus()
    assert len(text) > 100_000 and "Return" in text


def test_short_run_loss_falls(capsys):
    train.main(["--max-steps", "60", "--log-every", "10", "--batch-size", "8", "--seq-len", "32",
                "--warmup-steps", "5", "--device", "cpu", "--kernels", "none"])
    out = capsys.readouterr().out
    losses = [float(v) for v in re.findall(r"loss (\d+\.\d+)", out)]
    assert len(losses) == 7
    assert losses[-1] < losses[0] - 1.0, losses  # from ~ln(256)=5.5 to well under it
    assert "sample:" in out


@pytest.mark.parametrize("flags", [["--max-steps", "0"], ["--lr", "-1"], ["--preset", "nope"]])
def test_bad_flags_exit_with_message(flags, capsys):
    with pytest.raises(SystemExit) as info:
        train.main(flags + ["--device", "cpu"])
    assert info.value.code not in (0, None)
