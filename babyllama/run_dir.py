"""A run folder belongs to one run: its lock, a fresh start or a resume, and a clean stop on Ctrl-C / SIGTERM.

Library module for trainer.py, no command line:
  lock = claim_run_dir("out/x", fresh=True, overwrite=False)  # one writer; no silent overwrite of a finished run
  cfg, notes = resumed_config(cfg, saved_config, explicit)    # the saved run's config + the few allowed changes
  with StopSignals() as stop: ... stop.requested ...          # the step in flight finishes, then last.pt, exit 130
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
import threading
from typing import Optional

import torch
import torch.distributed as dist

from babyllama.checkpoint import check_same_tokenizer, checkpoint_file, load_checkpoint
from babyllama.errors import DataError
from babyllama.folder_lock import lock_file
from babyllama.runtime import Runtime

# may differ on --resume (each change is printed): how long and how often, not what is computed
RESUME_MAY_CHANGE = ("max_steps", "max_minutes", "eval_interval", "eval_windows", "log_interval", "ckpt_interval",
                     "max_bad_steps", "data_dir")
# where and how the run executes, not what it computes: always taken from the flags
RUNTIME_FIELDS = ("out_dir", "resume", "resume_from", "overwrite", "device", "compile", "compile_mode", "tensorboard",
                  "peak_tflops", "tokenizer", "init_from", "fuse_projections", "attention")
# what a checkpoint must hold to continue its run (a weights-only best.pt or an export does not)
RESUME_KEYS = ("step", "optimizer", "scaler", "rng", "config", "best_val_loss")
# what a fresh run (--overwrite) replaces: the files a run writes into its folder
RUN_FILES = ("last.pt", "best.pt", "log.txt", "metrics.jsonl", "summary.json", "loss.png")


class RunDirError(DataError):
    """A run folder used by another run, or holding a run that a fresh start would overwrite: one line, exit 2."""


def claim_run_dir(out_dir: str, fresh: bool, overwrite: bool) -> int:
    """Locks out_dir/run.lock for this process (flock: released by the OS however the process ends) -> its fd.

    A second run into the same folder is refused. A fresh run into a folder holding a checkpoint is refused unless
    `overwrite`; a fresh run removes the earlier run's files (RUN_FILES), so its logs start afresh."""
    os.makedirs(out_dir, exist_ok=True)
    try:
        fd = lock_file(os.path.join(out_dir, "run.lock"), f"{out_dir}: another run (pid {{pid}}) is writing to this "
                       "folder; wait for it to end or pick another --out_dir")
    except DataError as e:
        raise RunDirError(str(e)) from None
    if fresh:
        held = [n for n in ("last.pt", "best.pt") if os.path.lexists(os.path.join(out_dir, n))]
        if held and not overwrite:
            os.close(fd)
            raise RunDirError(f"{out_dir}: holds {held[0]} of an earlier run; --resume continues it, --overwrite "
                              f"starts afresh (replacing its checkpoints and logs), or pick another --out_dir")
        for name in RUN_FILES:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(out_dir, name))
    return fd


def explicit_fields(cfg) -> set:
    """The fields the user set (config.parse_config records them), else those differing from the defaults."""
    given = getattr(cfg, "_explicit", None)
    if given is not None:
        return set(given)
    defaults = type(cfg)()
    return {f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(defaults, f.name)}


def resumed_config(cfg, saved: dict, given: dict, explicit: set) -> tuple:
    """The config of a resumed run -> (config, notes): the saved run's values (`saved`: as it ran, max_steps
    derived), the flags' RUNTIME_FIELDS, and the RESUME_MAY_CHANGE fields the user set (one note each). Any other
    flag set to another value than the saved run was given (`given`: its config before the run length was derived)
    is a RunDirError naming it: a resumed run is the same run."""
    values, notes, refused = {}, [], []
    for f in dataclasses.fields(cfg):
        name, mine = f.name, getattr(cfg, f.name)
        if name in RUNTIME_FIELDS or name not in saved:
            continue
        was = given.get(name, saved[name])
        if name in explicit and mine != was and not (name in RESUME_MAY_CHANGE and mine == saved[name]):
            if name in RESUME_MAY_CHANGE:
                notes.append(f"note: --{name}={mine} on resume (the run had {saved[name]})")
                continue
            refused.append(f"--{name}={mine} (the run has {was})")
        values[name] = saved[name]
    if refused:
        raise RunDirError(f"--resume continues the saved run with its config, but {', '.join(refused)} differs; drop "
                          f"the flag, or start a new run in another --out_dir (may change: "
                          f"{', '.join(RESUME_MAY_CHANGE)})")
    return dataclasses.replace(cfg, **values), notes


class StopSignals:
    """Ctrl-C (SIGINT) and SIGTERM during training set `requested` (the signal's name): the loop finishes the step
    in flight, writes last.pt and exits 130. A second signal stops at once (KeyboardInterrupt). Handlers are only
    installed on the main thread (Python's rule), and the previous ones come back on exit."""

    def __init__(self):
        self.requested = ""
        self.previous: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        print(f"\n{self.requested}: stopping after this step and saving last.pt (again to stop at once)",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def stop_requested(signals: StopSignals, step: int, log_interval: int, rt: Runtime) -> bool:
    """A Ctrl-C / SIGTERM arrived. Under torchrun every rank gets it, maybe at different steps: the ranks agree
    (any rank's signal counts) at log steps, as out_of_minutes does."""
    if rt.world_size == 1:
        return bool(signals.requested)
    if step % log_interval:
        return False
    flag = torch.tensor(float(bool(signals.requested)), device=rt.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def check_data_tokenizer(cfg, sources: tuple, run_sha: Optional[str]) -> str:
    """The run's tokenizer hash (the tokenizer's, else the resumed checkpoint's, else the data's) -> it, once every
    source that names one (pretraining shards) agrees with it: a missing tokenizer does not switch the check off."""
    for src in sources:
        data_sha = getattr(src, "tokenizer_sha256", None)
        if data_sha is None:  # SFT data (tokenized by this run's tokenizer) or synthetic ids: nothing to compare
            continue
        check_same_tokenizer(f"{getattr(cfg, 'data_dir', 'the data')}: {src.split} shards", data_sha, run_sha)
        run_sha = run_sha or data_sha
    return run_sha or ""


def open_run(cfg, rt: Runtime, model_args, tokenizer_sha256: str) -> tuple:
    """Claims out_dir (claim_run_dir; rank 0) and, on a resume, loads the checkpoint and takes its config ->
    (config, model args, checkpoint or None, its path, notes to log, lock fd or None, step of a good last.pt or None)."""
    explicit, resume = explicit_fields(cfg), cfg.resume or cfg.resume_from
    path = checkpoint_file(cfg.resume_from or cfg.out_dir, prefer="last.pt") if resume else ""
    # a run continued from another folder's checkpoint starts this folder afresh
    own = bool(path) and os.path.dirname(os.path.abspath(path)) == os.path.abspath(cfg.out_dir)
    lock = claim_run_dir(cfg.out_dir, not own, cfg.overwrite) if rt.master else None
    ckpt, notes, good = None, [], None
    try:
        if resume:
            ckpt = load_checkpoint(path)
            missing = [k for k in RESUME_KEYS if k not in ckpt]
            if missing:
                raise DataError(f"{path}: cannot resume from it: it holds no {', '.join(missing)} (a weights-only "
                                f"checkpoint); start a new run from it with --init_from={path} instead")
            cfg, notes = resumed_config(cfg, ckpt.get("config", {}), ckpt.get("given_config", {}), explicit)
            check_same_tokenizer(path, ckpt.get("tokenizer_sha256"), tokenizer_sha256)
            model_args = type(model_args)(**ckpt["model_args"])  # the saved shape (a ModelArgs)
            if os.path.abspath(path) == os.path.abspath(os.path.join(cfg.out_dir, "last.pt")):
                good = ckpt["step"]
    except BaseException:
        if lock is not None:
            os.close(lock)
        raise
    return cfg, model_args, ckpt, path, notes, lock, good


