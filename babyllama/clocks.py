"""Clocks of a training run: how long compilation took (CompileClock) and how many steps fit in --fit_minutes
(FitClock). trainer.py calls them once per step; each waits for the device only on the few steps it times.
"""
from __future__ import annotations

import os
import time
from typing import Optional

import torch
import torch.distributed as dist

from babyllama.runtime import Runtime, synchronize

_IMPORTED = time.time()
_STAGE_START: Optional[float] = None  # set by start_stage() where one process runs several stages (chain.py)


def start_stage(at: Optional[float] = None) -> None:
    """Marks the start of a stage in a process that runs several one after another (chain.py): the stage's start-up
    is counted from `at` (time.time(), default now), not from the process's start."""
    global _STAGE_START
    _STAGE_START = time.time() if at is None else at


def process_start() -> float:
    """time.time() at which this process (or its current stage, start_stage) started, to count start-up (interpreter,
    imports, CUDA): from /proc on Linux, elsewhere when this module was imported (a script imports it among its
    first)."""
    if _STAGE_START is not None:
        return _STAGE_START
    try:
        with open("/proc/self/stat") as f:  # field 22 = start time in clock ticks after boot; the name may hold ")"
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return _IMPORTED


class CompileClock:
    """The first steps' extra time over a steady step: with torch.compile, tracing, code generation and the capture
    of the CUDA graphs (a warm compile cache shortens it); without, the allocator's and kernels' warm-up. Steps
    1..FIRST and STEADY more are each timed to the device's end of the step (one wait per step, on those steps
    only): seconds = the first FIRST steps' time - FIRST x the median of the next STEADY."""
    FIRST, STEADY = 5, 5  # reduce-overhead compiles on step 1 and records its CUDA graphs on steps 2-3

    def __init__(self, device: torch.device, compiled: bool, log, then=None):
        """then: called once when a compiled model's timing ends (trainer.ON_COMPILED's hooks)."""
        self.device, self.compiled, self.log, self.then = device, compiled, log, then
        self.times: list = []  # seconds of each timed step, to the device's end of it
        self.said = False
        # the process's cache counts so far (in chain.py's one process, an earlier stage's compilations)
        self.cache_at = cache_counts() if compiled else (0, 0)

    def say(self) -> None:
        """Logs the compile line once (a compiled model only), when the timing ends or at the run's end."""
        if self.compiled and self.times and not self.said:
            self.said = True
            self.log.print(self.line())

    @property
    def timing(self) -> bool:
        return len(self.times) < self.FIRST + self.STEADY

    def step_done(self, t_step: float) -> None:
        """Call after each step with the time.time() of the step's start."""
        if self.timing:
            synchronize(self.device)
            self.times.append(time.time() - t_step)
            if not self.timing:
                self.say()
                if self.compiled and self.then is not None:
                    self.then()

    def seconds(self) -> Optional[float]:
        """The extra time (None before the first step); a run shorter than FIRST + 1 steps takes its fastest step as
        the steady one."""
        if not self.times:
            return None
        first, rest = self.times[:self.FIRST], sorted(self.times[self.FIRST:])
        steady = rest[len(rest) // 2] if rest else min(first)
        return max(0.0, sum(first) - len(first) * steady)

    def line(self) -> str:
        first = self.times[:self.FIRST]
        steady = (sum(first) - self.seconds()) / len(first)
        hits, misses = (now - then for now, then in zip(cache_counts(), self.cache_at))
        cached = f"; graphs from the compile cache: {hits} of {hits + misses}" if hits + misses else ""
        return (f"compile: {self.seconds():.1f} s (the first {len(first)} steps took {sum(first):.1f} s, then "
                f"{1000 * steady:.1f} ms/step{cached})")


def cache_counts() -> tuple[int, int]:
    """(graphs torch.compile found in its FX-graph cache, graphs it compiled) in this process so far: a warm cache
    (a second run, or chain.py's compiling ahead) shows as hits."""
    from torch._dynamo.utils import counters
    inductor = counters["inductor"]
    return inductor["fxgraph_cache_hit"], inductor["fxgraph_cache_miss"]


class FitClock:
    """--fit_minutes: times the training steps after compilation (from step FIRST) until the warmup ends (at least
    step MIN_END), then sets cfg.max_steps, in place, so that all the steps take about fit_minutes of wall time from
    the loop's start. The LR of a step before the fit does not depend on max_steps (warmup), so the schedule is the
    one a run told that many steps would follow. Validation after the fit comes on top. Under torchrun rank 0's
    count is broadcast: every rank stops at the same step. A resumed run keeps the count it was given."""
    FIRST, MIN_END = 5, 20  # steps 1-5 compile and capture CUDA graphs: not timed; time at least 15 steps

    def __init__(self, cfg, rt: Runtime, log, start_step: int):
        self.cfg, self.rt, self.log = cfg, rt, log
        self.active = cfg.fit_minutes > 0 and start_step == 0
        self.end = max(cfg.warmup_steps, self.MIN_END)
        if self.active:  # until the fit: long enough to reach it, the epochs' count for the first ETAs
            cfg.max_steps = max(cfg.max_steps, self.end + 1)
        self.t_loop, self.t_first = time.time(), 0.0

    def tick(self, done: int) -> None:
        """Call after each step; `done` = steps completed."""
        if not self.active or done not in (self.FIRST, self.end):
            return
        if self.rt.device.type == "cuda":
            torch.cuda.synchronize()  # the steps are queued ahead of the host: wait for them to time them
        now = time.time()
        if done == self.FIRST:
            self.t_first = now
            return
        per_step = (now - self.t_first) / (self.end - self.FIRST)
        left = 60 * self.cfg.fit_minutes - (now - self.t_loop)
        steps = torch.tensor(float(self.end + max(1, int(left / per_step))), device=self.rt.device)
        if self.rt.world_size > 1:
            dist.broadcast(steps, src=0)
        self.cfg.max_steps, self.active = int(steps.item()), False
        self.log.print(f"fit_minutes={self.cfg.fit_minutes:g}: {1000 * per_step:.1f} ms/step after compilation -> "
                       f"{self.cfg.max_steps:,} steps in all")
