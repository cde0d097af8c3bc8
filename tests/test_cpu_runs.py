"""What a user on a CPU sees: a line before the slow part, the first step's time, an ETA that respects
--max_minutes, a val loss worse than the starting point said so, titled loss curves."""
import os
import types

import pytest

from babyllama import train_log as runlog
import trainer
from conftest import run_script
from babyllama.train_log import eta, plot_losses
from trainer import TrainConfig

TINY = ["--dim=32", "--n_layers=2", "--n_heads=4", "--max_seq_len=32", "--vocab_size=512", "--batch_size=4",
        "--device=cpu", "--compile=false", "--eval_windows=8", "--warmup_steps=2"]


def test_eta_is_the_sooner_of_the_steps_and_max_minutes():
    assert eta(120, 1.0, None) == "eta 2.0 min"
    assert eta(120, 1.0, 600.0) == "eta 2.0 min"
    assert eta(120, 1.0, 30.0) == "eta 0.5 min (max_minutes; 2.0 min for every step)"
    assert eta(120, 1.0, -5.0).startswith("eta 0.0 min (max_minutes")


def test_cpu_run_says_what_it_does_first_then_the_first_steps_time(tiny_corpus, tmp_path):
    out = tmp_path / "run"
    r = run_script("pretrain.py", [*TINY, f"--data_dir={tiny_corpus}", f"--out_dir={out}", "--max_steps=12",
                                   "--log_interval=6", "--eval_interval=12", "--max_minutes=30"])
    lines = r.stdout.splitlines()
    first = [i for i, l in enumerate(lines) if l.startswith("first step: ")]
    note = [i for i, l in enumerate(lines) if l.startswith("cpu: step 0 validation, then the first step")]
    step6 = [i for i, l in enumerate(lines) if l.startswith("step 6/12 ")]
    assert note and first and step6 and note[0] < first[0] < step6[0], r.stdout
    assert " s (the first is the slowest) | eta " in lines[first[0]]
    assert "| eta " in lines[step6[0]] and "ms/step" in lines[step6[0]]


def test_a_val_loss_above_step_0_is_said_so(monkeypatch, tmp_path):
    """best.pt stays the best trained step, but a run that made the model worse than where it started says so."""
    losses = iter([7.38, 8.47, 8.10])
    monkeypatch.setattr(trainer, "evaluate", lambda model, batches, rt, val_bytes: (next(losses), None))
    saved = []
    ckpts = types.SimpleNamespace(save=lambda step, val, best_val, best: saved.append((step, best)),
                                  check_loss=lambda step, val_loss: None)
    log = runlog.Logger(str(tmp_path), True, False)
    src = types.SimpleNamespace(eval_batches=lambda n: [])
    cfg = TrainConfig(out_dir=str(tmp_path))
    start, best = trainer.validate(None, src, cfg, None, log, ckpts, 0, float("inf"))
    assert start == 7.38 and best == float("inf") and saved == []
    _, best = trainer.validate(None, src, cfg, None, log, ckpts, 50, best, start)
    _, best = trainer.validate(None, src, cfg, None, log, ckpts, 100, best, start)
    text = open(tmp_path / "log.txt").read()
    assert "step 50: val loss 8.4700 (best) (above step 0's 7.3800: no better than the starting point)" in text
    assert "step 100: val loss 8.1000 (best) (above step 0's 7.3800" in text
    assert saved == [(50, True), (100, True)] and best == 8.10


def test_loss_curve_is_titled_with_the_stage_and_run_folder(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.axes
    titles = []
    real = matplotlib.axes.Axes.set_title
    monkeypatch.setattr(matplotlib.axes.Axes, "set_title", lambda self, t, *a, **k: titles.append(t) or real(self, t))
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0, "lr": 0.1}\n{"step": 1, "val_loss": 5.1}\n')
    assert plot_losses(str(tmp_path), "sft") == os.path.join(str(tmp_path), "loss.png")
    assert titles == [f"sft: {tmp_path}"]


def test_offline_tokenizer_lookup_fails_in_seconds_with_one_line(monkeypatch, tmp_path):
    """No network and no copy anywhere: one line naming every way out, without the Hub client's retries."""
    import socket
    import time

    from chatglm_tokenizer import tokenizer as tk

    def no_network(*args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", no_network)
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", tk.TOKENIZER_ENV):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty Hub cache
    monkeypatch.setattr(tk, "LOCAL_PATH", str(tmp_path / "tokenizer.model"))
    t0 = time.time()
    with pytest.raises(FileNotFoundError) as e:
        tk.find_tokenizer()
    assert time.time() - t0 < 5
    msg = str(e.value)
    assert "\n" not in msg and "cannot reach huggingface.co (offline?)" in msg and "--tokenizer PATH" in msg
