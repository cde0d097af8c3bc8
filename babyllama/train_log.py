"""What a training run tells its user: the console and log.txt, metrics.jsonl, loss.png, tokens/s and ETA lines,
and summary.json at the end (which report.py reads). trainer.py calls these; nothing here touches the model.
"""
from __future__ import annotations

import json
import math
import os
import time
from collections import deque
from contextlib import contextmanager
from typing import Optional

from babyllama.fileio import atomic_file, open_append, read_jsonl, write_atomic


class Logger:
    """Console + out_dir/log.txt + out_dir/metrics.jsonl (+ TensorBoard), on the master process only."""

    def __init__(self, out_dir: str, enabled: bool, tensorboard: bool):
        self.enabled, self.out_dir, self.tb = enabled, out_dir, None
        if enabled:
            os.makedirs(out_dir, exist_ok=True)
            self.log_file = open_append(os.path.join(out_dir, "log.txt"))
            self.metrics_file = open_append(os.path.join(out_dir, "metrics.jsonl"))
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(os.path.join(out_dir, "tb"))

    def __enter__(self) -> "Logger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Closes the files and TensorBoard's writer (its last events on disk): a stage's logs are whole when it
        returns, even where its process then exits without the interpreter's teardown (chain.py)."""
        if self.enabled:
            self.log_file.close()
            self.metrics_file.close()
            if self.tb is not None:
                self.tb.close()

    def print(self, msg: str) -> None:
        if self.enabled:
            print(msg, flush=True)
            self.log_file.write(msg + "\n")
            self.log_file.flush()

    def metric(self, **row) -> None:
        if self.enabled:
            self.metrics_file.write(json.dumps(row) + "\n")
            self.metrics_file.flush()
            if self.tb is not None:
                for k, v in row.items():
                    if k != "step" and isinstance(v, (int, float)):
                        self.tb.add_scalar(k, v, row["step"])


def read_series(out_dir: str, *keys: str) -> list:
    """[{step: value} per key] from out_dir/metrics.jsonl; after a resume the last row of a step wins."""
    series = [{} for _ in keys]
    for _, row in read_jsonl(os.path.join(out_dir, "metrics.jsonl"), "a metrics row", torn_tail_ok=True):
        for key, values in zip(keys, series):
            if key in row:
                values[row["step"]] = row[key]
    return series


def read_metrics(out_dir: str) -> tuple:
    """({step: train loss}, {step: val loss}) from out_dir/metrics.jsonl; after a resume the last row of a step wins."""
    train, val = read_series(out_dir, "loss", "val_loss")
    return train, val


def plot_losses(out_dir: str, kind: str = "") -> Optional[str]:
    """loss.png (train and val curves) from metrics.jsonl, titled with the stage and the run folder."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    train, val = read_metrics(out_dir)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(sorted(train), [train[s] for s in sorted(train)], label="train", linewidth=1)
    ax.plot(sorted(val), [val[s] for s in sorted(val)], "o-", label="val")
    ax.set_title(f"{kind}: {out_dir}" if kind else out_dir)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss")
    ax.legend()
    ax.grid(alpha=0.3)
    path = os.path.join(out_dir, "loss.png")
    with atomic_file(path) as f:
        fig.savefig(f, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


class Throughput:
    """Steps, time and real tokens since the last log line -> ms/step, tokens/s, MFU, and the ETA.

    ms/step and tokens/s are the steps' own: the run's first step (compilation, allocation: the slowest by far on a
    GPU) and the time the loop spends outside the steps (validation passes and the checkpoint saves they wait for)
    are left out. The ETA puts that time back: the pace of the last RECENT log intervals times the steps left, plus
    the validation passes left times the length of the recent ones. trainer.py calls step() after every optimizer
    step, wraps every validation pass in outside() and calls line() at log steps."""
    RECENT = 4  # log intervals and validation passes the ETA averages: it follows a change of pace within a few lines

    def __init__(self, batches, world_size: int, flops_per_token: int, peak: Optional[float], eval_interval: int = 0,
                 val_s: Optional[float] = None):
        # batches: trainer.DeviceBatches, whose .tokens counts the real (non-padding) tokens fed so far
        self.batches, self.world_size, self.flops_per_token, self.peak = batches, world_size, flops_per_token, peak
        self.eval_interval = eval_interval  # validation every N steps and at the last (0: at the last step only)
        self.rates: list[float] = []  # tokens/s of every logged interval (summary.json takes the median)
        self.recent: deque = deque(maxlen=self.RECENT)  # (seconds, steps) of the last logged intervals
        self.passes: deque = deque(maxlen=self.RECENT)  # seconds of the last validation passes of the loop
        self.val_s = val_s  # step 0's validation (no checkpoint to wait for): the estimate until a pass is measured
        self.first: Optional[tuple] = None  # (seconds, tokens) of the run's first step
        self.restart()

    def restart(self) -> None:
        self.t, self.steps, self.tokens = time.time(), 0, self.batches.tokens

    def step(self) -> None:
        """One optimizer step done. The first is set apart: the rates use it only until another step is measured."""
        self.steps += 1
        if self.first is None:
            self.first = (time.time() - self.t, self.batches.tokens - self.tokens)
            self.restart()

    @contextmanager
    def outside(self):
        """`with meter.outside():` around time the loop spends outside the steps (a validation pass and the checkpoint
        it waits for): kept out of ms/step and tokens/s (the interval goes on after it), counted in the ETA."""
        t0 = time.time()
        yield
        seconds = time.time() - t0
        self.passes.append(seconds)
        self.t += seconds

    def line(self, done: int, max_steps: int, lr: float, grad_norm: float, loss: str, left_s: Optional[float]) -> str:
        """left_s: the seconds --max_minutes leaves (None = no limit); the ETA is the sooner of it and the steps'."""
        if self.steps:
            seconds, steps, tokens = max(1e-9, time.time() - self.t), self.steps, self.batches.tokens - self.tokens
            self.recent.append((seconds, steps))
        else:  # no step measured but the first (a log line at step 1)
            (seconds, tokens), steps = self.first, 1
        tok_s = tokens * self.world_size / max(1e-9, seconds)  # real tokens (SFT: no padding)
        self.rates.append(tok_s)
        self.restart()
        mfu = f" | mfu {100 * self.flops_per_token * tok_s / self.peak:.1f}%" if self.peak else ""
        return (f"step {done}/{max_steps} | loss {loss} | lr {lr:.2e} | grad {grad_norm:.2f} | "
                f"{1000 * seconds / steps:.0f} ms/step | {tok_s:,.0f} tok/s{mfu} | "
                f"{eta(max_steps - done, self.step_s(), left_s, self.outside_s(done, max_steps))}")

    def step_s(self) -> float:
        """Seconds per step over the recent log intervals (the first step alone while nothing else is measured)."""
        if not self.recent:
            return self.first[0] if self.first else 0.0
        return sum(s for s, _ in self.recent) / sum(n for _, n in self.recent)

    def outside_s(self, done: int, max_steps: int) -> float:
        """Seconds the validation passes still to come will take (the one at `done` included: it follows the line)."""
        pass_s = sum(self.passes) / len(self.passes) if self.passes else self.val_s
        if not pass_s or done > max_steps:
            return 0.0
        every = self.eval_interval or max_steps
        left = max_steps // every - (done - 1) // every + (1 if max_steps % every else 0)
        return left * pass_s


def eta(steps_left: int, step_s: float, left_s: Optional[float], outside_s: float = 0.0) -> str:
    """'eta 12.3 min' (the steps left, plus outside_s seconds of validation), or the --max_minutes stop when that
    comes first."""
    steps_s = steps_left * step_s + outside_s
    if left_s is not None and left_s < steps_s:
        return f"eta {max(0.0, left_s) / 60:.1f} min (max_minutes; {steps_s / 60:.1f} min for every step)"
    return f"eta {steps_s / 60:.1f} min"


LONG_CPU_RUN_S = 2 * 3600  # a CPU run whose first step says more than this gets a pointer to a smaller one


def first_step_line(step_s: float, steps_left: int, left_s: Optional[float]) -> str:
    """On a CPU, after the first step (before any log line): its time and the ETA it gives, an upper bound; where
    that is hours (the GPU-sized defaults on a laptop), where a run of minutes is."""
    line = f"first step: {step_s:.2f} s (the first is the slowest) | {eta(steps_left, step_s, left_s)} at most"
    if left_s is None and step_s * steps_left > LONG_CPU_RUN_S:
        line += ("\nhours on this CPU: a model sized for one (minutes) is in the README's \"On a laptop\" "
                 "(--dim=128 --n_layers=4 --max_seq_len=128 ...), or stop it in time with --max_minutes=N")
    return line


def start_val_loss(out_dir: str) -> float:
    """Step 0's val loss from a resumed run's metrics.jsonl (inf when it is not there)."""
    try:
        return read_metrics(out_dir)[1].get(0, math.inf)
    except OSError:
        return math.inf


def minutes_left(max_minutes: float, t_start: float) -> Optional[float]:
    return 60 * max_minutes - (time.time() - t_start) if max_minutes > 0 else None


def count(n: int) -> str:
    """1,234 / 56.8M / 1.17B: exact below a million, three digits above."""
    return f"{n:,}" if n < 1e6 else f"{n / 1e6:,.1f}M" if n < 1e9 else f"{n / 1e9:,.2f}B"


def write_summary(cfg, kind: str, params: int, tokens_per_step: int, epoch_steps: float,
                  steps: int, meter: "Throughput", result: dict) -> None:
    """out_dir/summary.json: what the run did, for report.py (steps, tokens, epochs, tokens/s, losses, bits per byte
    of the last validation and the best trained step's when the run had a tokenizer, time, and the seconds spent in
    validation and waiting for checkpoints)."""
    rates = sorted(meter.rates)
    # every pass of the run, resumed ones included; val_s / save_s: where the time outside the steps went,
    # validation passes and waiting for checkpoint saves (a best.pt is written before the loop goes on)
    bpb, val_s, save_s = read_series(cfg.out_dir, "val_bpb", "val_s", "save_s")
    trained = [v for step, v in bpb.items() if step > 0]  # step 0 is the starting point, as for best_val_loss
    result = dict(result, val_bpb=bpb[max(bpb)] if bpb else None, best_val_bpb=min(trained) if trained else None,
                  validation_s=round(sum(val_s.values()), 2), checkpoint_wait_s=round(sum(save_s.values()), 2))
    summary = dict(kind=kind, params=params, steps=steps, max_steps=cfg.max_steps, tokens_per_step=tokens_per_step,
                   tokens=steps * tokens_per_step, epochs=steps / epoch_steps if epoch_steps else None,
                   tokens_per_s=rates[len(rates) // 2] if rates else None, **result)
    write_atomic(os.path.join(cfg.out_dir, "summary.json"), json.dumps(summary, indent=1))
