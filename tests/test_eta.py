"""The ETA of a training run's log lines follows the recent steps, counts the validation passes still to come and
leaves the first step (compilation, allocation) out; ms/step and tokens/s stay the steps' own. A fake clock drives
babyllama/train_log.Throughput exactly as trainer.py's loop does."""
import re
import types

import pytest

from babyllama import train_log
from babyllama.train_log import Throughput, first_step_line


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(train_log.time, "time", c)
    return c


def run(meter, clock, batches, steps, step_s, tokens=100):
    for _ in range(steps):
        clock.now += step_s
        batches.tokens += tokens
        meter.step()


def eta_s(line: str) -> float:
    return 60 * float(re.search(r"\| eta ([0-9.]+) min", line).group(1))


def ms_per_step(line: str) -> float:
    return float(re.search(r"\| ([0-9]+) ms/step", line).group(1))


def test_first_step_and_validation_stay_out_of_the_rates_and_validation_counts_in_the_eta(clock):
    batches = types.SimpleNamespace(tokens=0)
    meter = Throughput(batches, 1, 0, None, eval_interval=10, val_s=3.0)  # step 0's validation took 3 s
    run(meter, clock, batches, 1, 60.0)  # the first step: 60 s (compilation)
    run(meter, clock, batches, 9, 1.0)
    line = meter.line(10, 40, 1e-3, 1.0, "5.0", None)
    assert ms_per_step(line) == 1000 and "100 tok/s" in line  # the 60 s first step is not in the pace
    # 30 steps at 1 s + the passes at 10, 20, 30, 40, at step 0's 3 s until one of the loop is measured
    assert eta_s(line) == pytest.approx(30 + 4 * 3, abs=3)
    with meter.outside():
        clock.now += 12.0  # validation at step 10 and the best.pt it waits for
    run(meter, clock, batches, 10, 1.0)
    line = meter.line(20, 40, 1e-3, 1.0, "5.0", None)
    assert ms_per_step(line) == 1000 and "100 tok/s" in line  # the 12 s pass is not in the rates
    assert eta_s(line) == pytest.approx(20 + 3 * 12, abs=3)  # but the passes at 20, 30 and 40 are in the ETA
    assert meter.rates == [100.0, 100.0]


def test_eta_follows_the_recent_pace(clock):
    batches = types.SimpleNamespace(tokens=0)
    meter = Throughput(batches, 1, 0, None, eval_interval=1000)
    run(meter, clock, batches, 1, 5.0)
    for _ in range(6):  # 1 s per step
        run(meter, clock, batches, 10, 1.0)
        fast = meter.line(0, 1000, 1e-3, 1.0, "5.0", None)
    assert eta_s(fast) == pytest.approx(1000, abs=3)
    for _ in range(Throughput.RECENT):  # the machine got busy: 2 s per step
        run(meter, clock, batches, 10, 2.0)
        slow = meter.line(0, 1000, 1e-3, 1.0, "5.0", None)
    assert ms_per_step(slow) == 2000 and eta_s(slow) == pytest.approx(2000, abs=3)


def test_a_log_line_at_the_first_step_uses_it(clock):
    batches = types.SimpleNamespace(tokens=0)
    meter = Throughput(batches, 1, 0, None, eval_interval=10)
    run(meter, clock, batches, 1, 4.0)
    line = meter.line(1, 11, 1e-3, 1.0, "5.0", None)
    assert ms_per_step(line) == 4000 and "25 tok/s" in line and eta_s(line) == pytest.approx(40, abs=3)


def test_eta_stops_at_max_minutes_and_the_first_step_line_is_an_upper_bound(clock):
    batches = types.SimpleNamespace(tokens=0)
    meter = Throughput(batches, 1, 0, None, eval_interval=10)
    run(meter, clock, batches, 1, 1.0)
    run(meter, clock, batches, 9, 1.0)
    assert "eta 0.5 min (max_minutes; 1.5 min for every step)" in meter.line(10, 100, 1e-3, 1.0, "5.0", 30.0)
    assert first_step_line(2.0, 60, None) == "first step: 2.00 s (the first is the slowest) | eta 2.0 min at most"
    long = first_step_line(34.6, 5458, None).splitlines()  # the GPU defaults on a laptop: hours, and what to do
    assert len(long) == 2 and "On a laptop" in long[1] and "--max_minutes" in long[1]
    assert "\n" not in first_step_line(34.6, 5458, 600.0)  # --max_minutes given: it stops in time anyway
