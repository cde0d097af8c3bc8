"""Checkpoints on disk: what one holds, its checksum, the one writer and the one reader, and the guard that never
saves diverged weights.

  checkpoint_file("out/sft")                        # a run folder -> out/sft/best.pt (else last.pt)
  save_checkpoint(state, "x.pt"); load_checkpoint("x.pt")  # atomic, with a checksum; weights_only, verified
  CheckpointWriter().save(state, "out/x/last.pt")   # the same, written on a background thread
  Checkpoints(...).save(step, val_loss, best_val, best)  # last.pt (training state), best.pt (weights); never diverged
  check_checkpoint(ckpt, tokenizer, path)           # a checkpoint of this tokenizer's vocabulary
  check_same_tokenizer(what, theirs, ours)          # the one tokenizer-identity check: checkpoints, resume, shards
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import math
import os
import pickle
import re
import shutil
import threading
from typing import Optional

import torch
import torch.distributed as dist

from babyllama.errors import DataError
from babyllama.fileio import open_exclusive
from babyllama.runtime import Runtime, rng_state

# weights beyond this magnitude have diverged (a trained model's stay within a few units): never saved as "good"
EXPLODED_WEIGHT = 1e4


class CheckpointError(DataError):
    """A checkpoint that cannot be read, verified or written: one line naming the file, exit 2."""


def _digest(obj, h) -> None:
    """Feeds a checkpoint's structure and values to hash `h`: dict keys and order, types, tensor dtype/shape/bytes."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)};".encode())
        for k, v in obj.items():
            _digest(k, h)
            _digest(v, h)
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)};".encode())
        for v in obj:
            _digest(v, h)
    elif obj is None or isinstance(obj, (bool, int, float, str)):
        text = repr(obj)
        h.update(f"{type(obj).__name__}{len(text)}:{text}".encode())
    else:
        raise TypeError(f"a checkpoint holds tensors and plain values only, not {type(obj).__name__}")


def content_sha256(state: dict) -> str:
    """sha256 over everything in a checkpoint dict (written with it as "checksum", checked by load_checkpoint)."""
    h = hashlib.sha256()
    _digest(state, h)
    return h.hexdigest()


def _free_bytes(path: str) -> int:
    try:
        return shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
    except OSError:
        return 1 << 62


def save_checkpoint(state: dict, path: str, best: Optional[str] = None) -> None:
    """Writes `state` (tensors and plain values) with its checksum to path.tmp, then renames it to `path` (and
    hard-links it as `best`): a failure (a full disk) leaves the previous files as they were, and is one
    CheckpointError line."""
    state = {k: v for k, v in state.items() if k != "checksum"}
    state["checksum"] = content_sha256(state)
    tmp, made = path + ".tmp", []
    try:
        made.append(tmp)
        with open_exclusive(tmp) as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        if best is not None:
            made.append(best + ".tmp")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(best + ".tmp")
            try:
                os.link(tmp, best + ".tmp")
            except OSError:  # no hard links on this filesystem: a second copy
                with open(tmp, "rb") as src, open_exclusive(best + ".tmp") as dst:
                    shutil.copyfileobj(src, dst)
            os.replace(best + ".tmp", best)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        # torch reports a short write as "unexpected pos": a folder left with no room was a full disk
        full = (isinstance(e, OSError) and e.errno == errno.ENOSPC) or _free_bytes(path) < (1 << 20)
        for name in made:
            with contextlib.suppress(OSError):
                os.unlink(name)
        if full:
            why = "no space left on device"
        else:
            why = getattr(e, "strerror", None) or (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise CheckpointError(f"{path}: checkpoint not written ({why}); the previous checkpoint is unchanged") from None


def checkpoint_file(path: str, prefer: str = "best.pt") -> str:
    """The one rule from a run folder to a checkpoint: folder/`prefer` if it exists, else the other of best.pt and
    last.pt; a file is itself. Inference and fine-tuning prefer best.pt; resuming a run prefers last.pt."""
    if os.path.isdir(path):
        for name in (prefer, "best.pt", "last.pt"):
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise FileNotFoundError(f"{path}: no best.pt or last.pt in this run folder")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint")
    return path


def load_checkpoint(path: str) -> dict:
    """The checkpoint dict, read to CPU (optimizer state never takes GPU memory) and checked: torch.load with
    weights_only=True (tensors and plain values only: a file cannot run code while it loads), the keys of this
    project, and the content checksum written with it. Anything else is a CheckpointError naming the file."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # an object other than tensors and plain values: refused, never built
        found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)", str(e))
        what = f" ({found.group(1)})" if found else ""
        raise CheckpointError(f"{path}: refused: holds Python objects that are not tensors or plain values{what}; "
                              f"a checkpoint written by an older version of this project must be retrained") from None
    except Exception as e:  # truncated, not a torch file, unreadable
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupted? {first})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise CheckpointError(f"{path}: not a checkpoint of this project (expected a dict with keys 'model' and "
                              f"'model_args', got {type(ckpt).__name__})")
    if "checksum" not in ckpt:
        raise CheckpointError(f"{path}: no checksum (written by an older version of this project): retrain it")
    want = ckpt.pop("checksum")
    if content_sha256(ckpt) != want:
        raise CheckpointError(f"{path}: content does not match its checksum: the file is corrupted "
                              f"(copy it again, or use another checkpoint)")
    return ckpt


class CheckpointWriter:
    """Writes checkpoints on a background thread, so training never waits for the disk, nor for the copy of the
    state to host memory: GPU tensors are copied into pinned buffers (kept from one save to the next) by
    asynchronous copies queued behind the steps already launched, and the thread waits for those copies, not the
    training loop. One batch of files at a time, written in order; the next save, wait() or finished() re-raises a
    failed write in the caller's thread. save(state, last, best) hard-links `best` to the same file as `last`."""

    def __init__(self):
        self.thread: Optional[threading.Thread] = None
        self.error: Optional[BaseException] = None
        self.pinned: dict = {}  # position in the state -> pinned host tensor
        self.written: list = []  # paths of the batch in flight already on disk, in order (the thread appends)

    def save(self, state: dict, last: str, best: Optional[str] = None) -> None:
        self.save_files([(state, last, best)])

    def save_files(self, files: list) -> None:
        """files: [(state, path, hard link or None), ...], written in this order. Returns once the copies are
        queued; a tensor shared by several states (the weights of best.pt and last.pt) is copied once."""
        self.wait()  # the previous write has finished with the buffers
        seen, devices = {}, set()
        snapshots = [(self._snapshot(state, (), seen, devices), path, link) for state, path, link in files]
        ready = [torch.cuda.current_stream(d).record_event() for d in devices]  # the copies, in stream order
        self.written = []
        self.thread = threading.Thread(target=self._write, args=(snapshots, ready))
        self.thread.start()

    def _snapshot(self, obj, key: tuple, seen: dict, devices: set):
        if isinstance(obj, torch.Tensor):
            # the tied embedding/output matrix appears twice in the state dict: copy (and save) it once
            alias = (obj.device, obj.untyped_storage().data_ptr(), obj.storage_offset(), obj.shape, obj.stride(), obj.dtype)
            if alias not in seen:
                if obj.device.type != "cuda":
                    seen[alias] = obj.detach().clone()  # even on CPU: the live tensors change while the thread writes
                else:
                    buf = self.pinned.get(key)
                    # a buffer already holding another tensor of this snapshot (two states, one key) is not reused
                    if buf is None or buf.shape != obj.shape or buf.dtype != obj.dtype or \
                            any(buf is v for v in seen.values()):
                        buf = self.pinned[key] = torch.empty(obj.shape, dtype=obj.dtype, pin_memory=True)
                    seen[alias] = buf.copy_(obj.detach(), non_blocking=True)
                    devices.add(obj.device)
            return seen[alias]
        if isinstance(obj, dict):
            return {k: self._snapshot(v, key + (k,), seen, devices) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(self._snapshot(v, key + (i,), seen, devices) for i, v in enumerate(obj))
        return obj

    def _write(self, files: list, ready: list) -> None:
        try:
            for event in ready:
                event.synchronize()
            for state, path, link in files:
                save_checkpoint(state, path, link)
                self.written.append(path)
        except BaseException as e:  # re-raised in the training thread by wait()
            self.error = e

    def finished(self) -> bool:
        """True when no write is in flight; a failed one raises here, as in wait()."""
        if self.thread is not None and self.thread.is_alive():
            return False
        self.wait()
        return True

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error


def diverged_loss(val_loss: float, vocab_size: int) -> bool:
    """A validation loss that is not finite or above a uniform guess over the vocabulary (+1 nat): the run diverged,
    and its weights are never saved as good."""
    return not math.isfinite(val_loss) or val_loss > math.log(vocab_size) + 1


def check_same_tokenizer(what: str, theirs: Optional[str], ours: Optional[str], ours_name: str = "this run's tokenizer",
                         *, unnamed_ok: bool = True, advice: str = "") -> None:
    """The one tokenizer-identity check: `what` (a checkpoint, a shard) was made with the tokenizer of sha256 `theirs`,
    `ours_name` has sha256 `ours` (None: unknown, or synthetic ids that name no tokenizer). A DataError naming `what`
    when both hashes are known and differ (ids of another vocabulary mean other text); with unnamed_ok=False (shards
    of one run compared with each other) also when only one of the two names a tokenizer. advice: what to do about it,
    appended to the message."""
    theirs, ours = theirs or None, ours or None
    if theirs == ours or (unnamed_ok and not (theirs and ours)):
        return
    theirs_text = f"a tokenizer of sha256 {theirs[:12]}..." if theirs else "no named tokenizer (synthetic ids)"
    ours_text = f"{ours[:12]}..." if ours else "none (synthetic ids)"
    raise DataError(f"{what}: made with {theirs_text}, but {ours_name} is {ours_text} (another vocabulary)"
                    f"{': ' + advice if advice else ''}")


def tokenizer_record(ckpt: dict) -> tuple:
    """-> (the --tokenizer the checkpoint's run was given, "" if none: the default lookup; its tokenizer's sha256)."""
    path = (ckpt.get("config") or {}).get("tokenizer") or ""
    return (path if isinstance(path, str) else ""), ckpt.get("tokenizer_sha256")


def tokenizer_advice(ckpt: dict) -> str:
    """What to pass when a checkpoint meets another tokenizer: the --tokenizer it was trained with, or "" when its run
    was given none."""
    path = tokenizer_record(ckpt)[0]
    return f"pass --tokenizer={path}, the tokenizer it was trained with" if path else ""


def check_checkpoint(ckpt: dict, tokenizer, ckpt_path: str) -> None:
    """A checkpoint trained with another vocabulary or tokenizer.model cannot be used with this tokenizer. A model
    vocab larger than the tokenizer's (pretrain.py --vocab_size: padding rows) is fine when the checkpoint names
    this tokenizer.model."""
    vocab, want = ckpt.get("model_args", {}).get("vocab_size"), ckpt.get("tokenizer_sha256")
    padded = isinstance(vocab, int) and vocab > tokenizer.vocab_size and want == tokenizer.sha256
    advice = tokenizer_advice(ckpt)
    if vocab != tokenizer.vocab_size and not padded:
        raise DataError(f"{ckpt_path}: model vocab_size {vocab}, but the tokenizer has {tokenizer.vocab_size} "
                        f"(checkpoint from another vocabulary){': ' + advice if advice else ''}")
    check_same_tokenizer(ckpt_path, want, tokenizer.sha256, getattr(tokenizer, "path", "the tokenizer"), advice=advice)


class Checkpoints:
    """The run's checkpoints, written in the background by a CheckpointWriter: out_dir/last.pt, the whole training
    state (model, optimizer, scaler, data position, every rank's RNG: what --resume needs), and out_dir/best.pt when
    the validation loss improved, the weights only (what eval.py, chat.py, export.py and sft.py --init_from
    read; a third of last.pt's bytes). best.pt is written before last.pt: a kill between the two leaves
    a best.pt newer than last.pt, and the resumed run recomputes the same steps and writes the same best.pt.

    Nothing is called best before it is on disk: a line about a best.pt waits in log_when_written() until its write
    has completed (poll() at the loop's log steps). The run's last save (final) is waited for before it returns."""

    def __init__(self, cfg, rt: Runtime, model_args, kind: str, tokenizer_sha256: str,
                 model: torch.nn.Module, optimizer, scaler, samples_per_step: int, log,
                 good_step: Optional[int], given_cfg):
        self.cfg, self.rt, self.model_args, self.kind, self.tokenizer_sha256 = cfg, rt, model_args, kind, tokenizer_sha256
        self.model, self.optimizer, self.scaler, self.samples_per_step = model, optimizer, scaler, samples_per_step
        self.log, self.good_step = log, good_step  # the step of out_dir/last.pt, None before this run saved one
        self.given = dataclasses.asdict(given_cfg)  # the config before the run length was derived (resume checks it)
        self.writer = CheckpointWriter()
        self.final = False  # set by the loop for the run's last save: wait for it (the process ends next)
        self.lines: list = []  # (path, line): logged once that file is on disk

    def last_good(self) -> str:
        if self.good_step is None:
            return "no checkpoint of this run was saved (none is good)"
        return f"last good checkpoint: {self.cfg.out_dir}/last.pt (step {self.good_step})"

    def check_weights(self, step: int) -> None:
        """Stops the run (exit 3) instead of saving weights that are non-finite or have exploded."""
        peak = torch.stack([p.detach().abs().amax().float() for p in self.model.parameters()]).max().item()
        if math.isfinite(peak) and peak < EXPLODED_WEIGHT:
            return
        self.stop(step, "are not finite" if not math.isfinite(peak) else f"exploded (max |w| {peak:.3g})")

    def check_loss(self, step: int, val_loss: float) -> None:
        """Stops the run (exit 3) instead of saving, or calling best, weights whose validation loss diverged."""
        if diverged_loss(val_loss, self.model_args.vocab_size):
            self.stop(step, f"diverged (val loss {val_loss:.4g}, worse than guessing every token uniformly)")

    def stop(self, step: int, what: str) -> None:
        self.settle()  # the write in flight first: its "(best)" line, then why the run stops
        self.log.print(f"stopping at step {step}: the weights {what}, not saved; {self.last_good()} "
                       f"(lower learning_rate or use dtype=bfloat16)")
        raise SystemExit(3)

    def weights(self, step: int, val_loss: float) -> dict:
        """best.pt: the weights and what describes them, no training state."""
        return {"model": self.model.state_dict(), "model_args": dataclasses.asdict(self.model_args),
                "config": dataclasses.asdict(self.cfg), "kind": self.kind, "step": step, "val_loss": val_loss,
                "tokenizer_sha256": self.tokenizer_sha256}

    def state(self, step: int, val_loss: float, best_val: float) -> dict:
        """last.pt: the weights and the whole training state."""
        rngs = [rng_state()]
        if self.rt.world_size > 1:  # every rank's RNG, so dropout resumes exactly on each
            rngs = [None] * self.rt.world_size
            dist.all_gather_object(rngs, rng_state())
        return dict(self.weights(step, val_loss), given_config=self.given, optimizer=self.optimizer.state_dict(),
                    scaler=self.scaler.state_dict(), rng=rngs, best_val_loss=best_val,
                    data_position={"step": step, "seed": self.cfg.seed, "samples_per_step": self.samples_per_step})

    def save(self, step: int, val_loss: float, best_val: float, best: bool) -> bool:
        """Every rank calls this (the RNG gather is collective); rank 0 queues best.pt (when `best`) and last.pt for
        the background writer. -> True while that best.pt is still being written: log_when_written() holds the line
        that calls it best. The loop waits only when the previous write has not finished, and at the final save."""
        self.check_weights(step)
        st = self.state(step, val_loss, best_val)
        pending = False
        if self.rt.master:
            out = self.cfg.out_dir
            best_file = [(self.weights(step, val_loss), os.path.join(out, "best.pt"), None)] if best else []
            self.settle()  # the previous batch: its lines, or its error
            self.writer.save_files(best_file + [(st, os.path.join(out, "last.pt"), None)])
            if self.final:
                self.writer.wait()
            pending = best and not self.final
        self.good_step = step
        return pending

    def log_when_written(self, line: str) -> None:
        """Logs `line` once the best.pt queued by the last save() is on disk (never if its write fails)."""
        self.lines.append((os.path.join(self.cfg.out_dir, "best.pt"), line))
        self.poll()

    def poll(self) -> None:
        """Logs the lines whose file is written; a failed write raises here (one CheckpointError line, exit 2)."""
        done = set(self.writer.written)
        for _, line in [item for item in self.lines if item[0] in done]:
            self.log.print(line)
        self.lines = [item for item in self.lines if item[0] not in done]
        self.writer.finished()

    def settle(self) -> None:
        """Waits for the write in flight, then logs its lines."""
        self.writer.wait()
        self.poll()
