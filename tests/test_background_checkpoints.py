"""Checkpoints that never stall training: best.pt holds the weights only and last.pt the training state, both written
on a background thread; nothing is called best before its file is on disk; a failed write leaves the previous files.
And the compile clock: the first steps' extra time, logged as "compile: N s" and kept in summary.json."""
import dataclasses
import errno
import json
import os
import subprocess
import sys
import threading
import time
import types

import pytest
import torch

import pretrain
import trainer
from babyllama import checkpoint, clocks
from babyllama.checkpoint import CheckpointError, Checkpoints, load_checkpoint
from babyllama.clocks import CompileClock
from babyllama.run_dir import RESUME_KEYS
from conftest import ROOT
from babyllama.runtime import Runtime
from babyllama.train_log import Logger
from model import ModelArgs, Transformer

TINY = ["--dim=32", "--n_layers=2", "--n_heads=4", "--max_seq_len=32", "--vocab_size=512", "--batch_size=4",
        "--device=cpu", "--compile=false", "--eval_windows=8", "--warmup_steps=2", "--log_interval=2"]
WEIGHT_KEYS = {"model", "model_args", "config", "kind", "step", "val_loss", "tokenizer_sha256"}


def run(data, out, *extra) -> int:
    try:
        pretrain.main([*TINY, f"--data_dir={data}", f"--out_dir={out}", *extra])
        return 0
    except SystemExit as e:
        return e.code


def checkpoints(out_dir) -> tuple:
    """A Checkpoints of a tiny model on the CPU, as trainer.run_training builds it -> (it, model, log file)."""
    cfg = trainer.TrainConfig(out_dir=str(out_dir), max_steps=100)
    args = ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=64, max_seq_len=16)
    model = Transformer(args)
    opt = model.configure_optimizer(0.1, 1e-3, (0.9, 0.95), "cpu")
    model(torch.zeros(2, 8, dtype=torch.long), torch.ones(2, 8, dtype=torch.long))[1].backward()
    opt.step()  # AdamW moments exist: last.pt holds them
    rt = Runtime(torch.device("cpu"), 0, 0, 1, torch.float32)
    log = Logger(str(out_dir), True, False)
    ck = Checkpoints(cfg, rt, args, "pretrain", "a" * 64, model, opt, torch.amp.GradScaler("cpu", enabled=False), 16,
                     log, None, cfg)
    return ck, model, out_dir / "log.txt"


def test_best_pt_holds_the_weights_only_and_last_pt_the_training_state(tiny_corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(tiny_corpus, out, "--max_steps=6", "--eval_interval=3") == 0
    best, last = load_checkpoint(str(out / "best.pt")), load_checkpoint(str(out / "last.pt"))
    assert set(best) == WEIGHT_KEYS and "optimizer" not in best  # what eval, chat, export and sft --init_from read
    assert set(RESUME_KEYS) <= set(last) and {"data_position", "given_config"} <= set(last)
    assert best["step"] == last["step"] == 6 and best["val_loss"] == last["best_val_loss"]
    assert all(torch.equal(best["model"][k], last["model"][k]) for k in last["model"])
    assert os.path.getsize(out / "best.pt") < 0.6 * os.path.getsize(out / "last.pt")  # no AdamW moments
    # --resume needs the training state: a weights-only best.pt is refused in one line
    capsys.readouterr()
    assert run(tiny_corpus, tmp_path / "again", f"--resume_from={out / 'best.pt'}") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "best.pt: cannot resume from it: it holds no optimizer" in err[0]


def slow_disk(monkeypatch) -> threading.Event:
    """checkpoint.save_checkpoint held until the returned event is set: a disk slower than the training steps."""
    release, real = threading.Event(), checkpoint.save_checkpoint

    def held(state, path, best=None):
        assert release.wait(60)
        real(state, path, best)
    monkeypatch.setattr(checkpoint, "save_checkpoint", held)
    return release


def test_the_loop_does_not_wait_for_the_disk_and_says_best_once_it_is_written(tmp_path, monkeypatch):
    ck, model, log_txt = checkpoints(tmp_path)
    release = slow_disk(monkeypatch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    t0 = time.time()
    assert ck.save(10, 3.5, 3.5, True) is True  # queued: best.pt is still being written
    assert time.time() - t0 < 5 and not (tmp_path / "best.pt").exists()
    ck.log_when_written("step 10: val loss 3.5000 (best)")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # training goes on while the thread writes
    ck.poll()
    assert "(best)" not in log_txt.read_text()  # not on disk yet: not called best
    release.set()
    ck.settle()
    assert log_txt.read_text().splitlines() == ["step 10: val loss 3.5000 (best)"]
    best, last = load_checkpoint(str(tmp_path / "best.pt")), load_checkpoint(str(tmp_path / "last.pt"))
    assert set(best) == WEIGHT_KEYS and best["step"] == last["step"] == 10 and "optimizer" in last
    for name in ("best", "last"):  # the weights as they were at save(), not as training left them
        saved = best if name == "best" else last
        assert all(torch.equal(saved["model"][k], before[k]) for k in before), name
    # the run's last save is waited for: on disk when save() returns, nothing left to announce
    ck.final = True
    assert ck.save(20, 3.0, 3.0, True) is False
    assert load_checkpoint(str(tmp_path / "best.pt"))["step"] == 20 and ck.writer.thread is None


def test_a_stopping_run_logs_the_best_pt_still_being_written_before_it_says_why(tmp_path, monkeypatch):
    ck, model, log_txt = checkpoints(tmp_path)
    release = slow_disk(monkeypatch)
    assert ck.save(4, 3.5, 3.5, True) is True
    ck.log_when_written("step 4: val loss 3.5000 (best)")
    threading.Timer(0.3, release.set).start()  # the disk finishes while stop() waits for it
    with torch.no_grad():
        model.layers[0].feed_forward.w1.weight.mul_(1e8)
    with pytest.raises(SystemExit) as e:
        ck.check_weights(6)
    assert e.value.code == 3
    lines = log_txt.read_text().splitlines()
    assert lines[0] == "step 4: val loss 3.5000 (best)" and len(lines) == 2
    assert lines[1].startswith("stopping at step 6: the weights exploded") and "last.pt (step 4)" in lines[1]


@pytest.mark.parametrize("failing", ["best.pt", "last.pt"])
def test_a_failed_background_write_keeps_the_previous_files(tmp_path, monkeypatch, failing):
    ck, _, log_txt = checkpoints(tmp_path)
    ck.save(10, 3.5, 3.5, True)
    ck.log_when_written("step 10: val loss 3.5000 (best)")
    ck.settle()
    files = {name: (tmp_path / name).read_bytes() for name in ("best.pt", "last.pt")}
    real = torch.save

    def full_disk(obj, f):
        if ("optimizer" in obj) == (failing == "last.pt"):  # best.pt holds no optimizer
            f.write(b"x" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        real(obj, f)
    monkeypatch.setattr(torch, "save", full_disk)
    assert ck.save(20, 3.0, 3.0, True) is True  # the loop goes on; the failure comes back at its next log step
    with pytest.raises(CheckpointError, match=rf"{failing}: checkpoint not written \(no space left on device\); "
                                              r"the previous checkpoint is unchanged"):
        ck.log_when_written("step 20: val loss 3.0000 (best)")
        for _ in range(600):  # poll() at log steps until the thread is done
            ck.poll()
            time.sleep(0.05)
    assert not list(tmp_path.glob("*.tmp"))
    lines = log_txt.read_text().splitlines()
    if failing == "best.pt":  # never called best; both files as they were
        assert lines == ["step 10: val loss 3.5000 (best)"]
        assert all((tmp_path / n).read_bytes() == b for n, b in files.items())
    else:  # best.pt was written first and is whole: called best; last.pt as it was
        assert lines[-1] == "step 20: val loss 3.0000 (best)"
        assert load_checkpoint(str(tmp_path / "best.pt"))["step"] == 20
        assert (tmp_path / "last.pt").read_bytes() == files["last.pt"]
    ck.settle()  # the error was reported once


def test_compile_clock_is_the_first_steps_time_over_a_steady_step(monkeypatch):
    said = []
    clock = CompileClock(torch.device("cpu"), True, types.SimpleNamespace(print=said.append))
    assert clock.seconds() is None
    for took in [30.0, 4.0, 1.0, 0.1, 0.1] + [0.1, 0.1, 0.2, 0.1, 0.1] + [9.0]:  # step 11 is not timed
        clock.step_done(time.time() - took)
    assert len(clock.times) == 10 and clock.seconds() == pytest.approx(35.2 - 5 * 0.1, abs=0.01)
    assert said == ["compile: 34.7 s (the first 5 steps took 35.2 s, then 100.0 ms/step)"]
    clock.say()
    assert len(said) == 1  # once
    counts = iter([(3, 1), (9, 1)])  # graphs from the cache, compiled: before this run, after its steps
    monkeypatch.setattr(clocks, "cache_counts", lambda: next(counts))
    warm = CompileClock(torch.device("cpu"), True, types.SimpleNamespace(print=said.append))
    for took in [3.0] + [0.1] * 9:
        warm.step_done(time.time() - took)
    assert said[-1].endswith("then 100.0 ms/step; graphs from the compile cache: 6 of 6)"), said
    short = CompileClock(torch.device("cpu"), False, None)
    short.times = [3.0, 0.5]  # a two-step run: its fastest step is the steady one
    assert short.seconds() == pytest.approx(2.5)
    short.say()  # an eager model has nothing to say


@pytest.mark.parametrize("compiled", [False, True])
def test_the_run_logs_and_keeps_its_compile_time(tiny_corpus, tmp_path, monkeypatch, compiled):
    """On a CPU nothing is compiled: compile_s is 0 and no line says otherwise. A compiled model (its description
    from build_model, as on a GPU) gets the "compile: N s" line after its timed steps, and summary.json keeps N."""
    real = trainer.build_model
    if compiled:
        monkeypatch.setattr(trainer, "build_model", lambda *a: real(*a)[:4] + ("compiled (default)",))
    called = []  # trainer.ON_COMPILED (chain.py's compiling ahead): once, for a compiled model, with its shape
    monkeypatch.setattr(trainer, "ON_COMPILED", [lambda cfg, args: called.append((cfg.max_steps, args.dim))])
    out = tmp_path / "run"
    assert run(tiny_corpus, out, "--max_steps=14", "--eval_interval=7") == 0
    assert called == ([(14, 32)] if compiled else [])
    log = (out / "log.txt").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data_s"] >= 0 and summary["steps_s"] > 0
    lines = [ln for ln in log.splitlines() if ln.startswith("compile: ")]
    if not compiled:
        assert summary["compile_s"] == 0 and not lines
        return
    assert len(lines) == 1 and "(the first 5 steps took " in lines[0], log
    assert summary["compile_s"] == pytest.approx(float(lines[0].split()[1]), abs=0.051)
    # logged once the 10 timed steps are done, before the step 12 line
    order = log.splitlines()
    assert order.index(lines[0]) < next(i for i, ln in enumerate(order) if ln.startswith("step 12/14"))
    assert summary["elapsed_s"] >= summary["steps_s"] + summary["compile_s"] - 0.1


def test_checkpoints_state_is_the_weights_plus_the_training_state(tmp_path):
    ck, _, _ = checkpoints(tmp_path)
    w, st = ck.weights(5, 2.0), ck.state(5, 2.0, 1.5)
    assert set(w) == WEIGHT_KEYS and set(st) - set(w) == {"given_config", "optimizer", "scaler", "rng",
                                                          "best_val_loss", "data_position"}
    assert dataclasses.asdict(ck.cfg) == st["config"] == w["config"]


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="the process's start time comes from /proc (Linux)")
def test_process_start_counts_the_time_before_the_module_was_imported():
    # start-up in the card's time table runs from the process's start, so torch's import and the interpreter count
    code = ("import time; time.sleep(0.6); t = time.time(); from babyllama.clocks import process_start; "
            "print(t - process_start())")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert 0.6 <= float(r.stdout) < 60
