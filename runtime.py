"""Where a script runs and what it loads: device, precision, processes, and checkpoints on disk.

Library module, no command line. Shared by trainer.py (training) and eval.py / chat.py (inference), so inference
never imports the training loop:
  rt = setup_runtime("auto", "auto")                # cuda > mps > cpu; bf16 where supported; DDP under torchrun
  with autocast_context(rt.device, rt.dtype): ...   # mixed precision in rt.dtype (nothing for float32)
  checkpoint_file("out/sft")                        # a run folder -> out/sft/best.pt (else last.pt)
  CheckpointWriter().save(state, "out/x/last.pt")   # atomic, with a checksum, written on a background thread
  save_checkpoint(state, "x.pt"); load_checkpoint("x.pt")  # the one writer and reader (weights_only, verified)
  model, ckpt = load_model("out/sft", device="cuda")
  model, ckpt, path, tokenizer, device, dtype = load_for_inference("out/sft", "", "auto", "auto")
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import pickle
import random
import re
import shutil
import threading
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

import numpy as np

from configurator import DataError
from model import ModelArgs, Transformer


@dataclass
class Runtime:
    """Where this process runs: device, DDP rank and world, precision."""
    device: torch.device
    rank: int
    local_rank: int
    world_size: int
    dtype: torch.dtype

    @property
    def master(self) -> bool:
        return self.rank == 0


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """'auto' -> cuda > mps > cpu. A bare 'cuda' gets this process's index (cuda:LOCAL_RANK): one process per
    GPU under torchrun, and torch.cuda.set_device refuses a device without an index."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if device == "cuda":
        device = f"cuda:{local_rank}"  # CUDA_VISIBLE_DEVICES stays the user's business
    return torch.device(device)


def device_problem(name: str) -> Optional[str]:
    """Why --device=`name` cannot run here (one line), or None: checked with the config, before any work."""
    m = re.fullmatch(r"(auto|cpu|mps|cuda)(?::(\d+))?", name)
    if not m or (m.group(2) is not None and m.group(1) != "cuda"):
        return f"device must be auto, cpu, mps, cuda or cuda:N, got {name!r}"
    if m.group(1) == "cuda":
        if not torch.cuda.is_available():
            why = "this torch has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            return f"--device={name}: {why}; use --device=auto or --device=cpu"
        if m.group(2) is not None and int(m.group(2)) >= torch.cuda.device_count():
            return f"--device={name}: only {torch.cuda.device_count()} CUDA device(s) visible"
    if m.group(1) == "mps" and not torch.backends.mps.is_available():
        return f"--device={name}: Apple MPS is not available here; use --device=auto or --device=cpu"
    return None


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' -> bfloat16 where supported, else float16 on CUDA; float32 on CPU and MPS."""
    if dtype == "auto":
        if device.type == "cuda":
            dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        else:
            dtype = "float32"
    return getattr(torch, dtype)


def enable_tf32(device: torch.device) -> None:
    """TF32 matmuls on CUDA (the fp32 parts: the loss, the residual stream); nothing elsewhere."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def setup_runtime(device: str, dtype: str) -> Runtime:
    """Starts DDP when launched by torchrun (NCCL on CUDA, gloo elsewhere); picks device and precision."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    enable_tf32(dev)
    if ddp and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Runtime(dev, rank, local_rank, world, resolve_dtype(dtype, dev))


def cleanup(rt: Runtime) -> None:
    if rt.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def autocast_context(device: torch.device, dtype: torch.dtype):
    """Mixed precision that really uses `dtype` (the original project's autocast ignored its dtype argument)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def synchronize(device: torch.device) -> None:
    """Waits for the device's queued work (for timings)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


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


def open_exclusive(path: str):
    """A new file at `path` for writing, created by this call (O_CREAT|O_EXCL): a leftover or a planted symlink
    there is removed first (unlink never follows a link), and the open itself never follows one."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    return os.fdopen(fd, "wb")



def write_atomic(path: str, text: str) -> None:
    """Writes a text file (a report) whole or not at all: path.tmp created exclusively, then renamed over path."""
    tmp = path + ".tmp"
    try:
        with open_exclusive(tmp) as f:  # a file of its own, never through a planted link
            f.write(text.encode("utf-8"))
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise

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


def rng_state() -> dict:
    """This process's random generators as tensors and plain values (a checkpoint loads with weights_only=True)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss], "torch": torch.get_rng_state(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


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


def load_model(path: str, device: str = "cpu") -> tuple[Transformer, dict]:
    """Rebuilds a Transformer from a checkpoint file or run folder (checkpoint_file) -> (model in eval mode, ckpt).

    Accepts state dicts saved from torch.compile ("_orig_mod.") or DDP ("module.") wrappers; only the model moves
    to `device`."""
    path = checkpoint_file(path)
    ckpt = load_checkpoint(path)
    try:
        model = Transformer(ModelArgs(**ckpt["model_args"]))
    except (TypeError, ValueError) as e:  # unknown field, or a ConfigError from validate()
        raise ValueError(f"{path}: bad model_args: {e}") from None
    state = {}
    for key, value in ckpt["model"].items():
        while key.startswith(("_orig_mod.", "module.")):
            key = key.split(".", 1)[1]
        state[key] = value
    model.load_state_dict(state)
    return model.to(device).eval(), ckpt


class CheckpointWriter:
    """Writes checkpoints on a background thread, so training only waits for the copy of the state to host memory
    (about 0.8 GB at the default model: weights + AdamW moments), not for the disk. GPU tensors are copied into
    pinned buffers kept from one save to the next (fast, asynchronous copies). One write at a time; wait() before
    exiting. best.pt is a hard link to the same file as last.pt when both are written (no second copy)."""

    def __init__(self):
        self.thread: Optional[threading.Thread] = None
        self.error: Optional[BaseException] = None
        self.pinned: dict = {}  # position in the state -> pinned host tensor

    def save(self, state: dict, last: str, best: Optional[str] = None) -> None:
        self.wait()  # the previous write has finished with the buffers
        snapshot = self._snapshot(state, (), {})
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the non-blocking copies have landed
        self.thread = threading.Thread(target=self._write, args=(snapshot, last, best))
        self.thread.start()

    def _snapshot(self, obj, key: tuple, seen: dict):
        if isinstance(obj, torch.Tensor):
            # the tied embedding/output matrix appears twice in the state dict: copy (and save) it once
            alias = (obj.device, obj.untyped_storage().data_ptr(), obj.storage_offset(), obj.shape, obj.stride(), obj.dtype)
            if alias not in seen:
                if obj.device.type != "cuda":
                    seen[alias] = obj.detach().clone()  # even on CPU: the live tensors change while the thread writes
                else:
                    buf = self.pinned.get(key)
                    if buf is None or buf.shape != obj.shape or buf.dtype != obj.dtype:
                        buf = self.pinned[key] = torch.empty(obj.shape, dtype=obj.dtype, pin_memory=True)
                    seen[alias] = buf.copy_(obj.detach(), non_blocking=True)
            return seen[alias]
        if isinstance(obj, dict):
            return {k: self._snapshot(v, key + (k,), seen) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(self._snapshot(v, key + (i,), seen) for i, v in enumerate(obj))
        return obj

    def _write(self, state: dict, last: str, best: Optional[str]) -> None:
        try:
            save_checkpoint(state, last, best)
        except BaseException as e:  # re-raised in the training thread by wait()
            self.error = e

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error


def check_checkpoint(ckpt: dict, tokenizer, ckpt_path: str) -> None:
    """A checkpoint trained with another vocabulary or tokenizer.model cannot be used with this tokenizer. A model
    vocab larger than the tokenizer's (pretrain.py --vocab_size: padding rows) is fine when the checkpoint names
    this tokenizer.model."""
    vocab, want = ckpt.get("model_args", {}).get("vocab_size"), ckpt.get("tokenizer_sha256")
    padded = isinstance(vocab, int) and vocab > tokenizer.vocab_size and want == tokenizer.sha256
    if vocab != tokenizer.vocab_size and not padded:
        raise DataError(f"{ckpt_path}: model vocab_size {vocab}, but the tokenizer has {tokenizer.vocab_size} "
                        f"(checkpoint from another vocabulary)")
    if want and want != tokenizer.sha256:
        raise DataError(f"{ckpt_path}: trained with a tokenizer.model of sha256 {want[:12]}..., but "
                        f"{getattr(tokenizer, 'path', 'the tokenizer')} has {tokenizer.sha256[:12]}... (another vocabulary)")


def load_for_inference(ckpt: str, tokenizer_path: str, device_name: str, dtype_name: str) -> tuple:
    """What eval.py and chat.py start from -> (model, ckpt dict, ckpt path, tokenizer, device, dtype).

    Bad input (no tokenizer, no checkpoint, a checkpoint of another vocabulary or tokenizer) is a DataError."""
    from chatglm_tokenizer import load_tokenizer

    device = resolve_device(device_name)
    dtype = resolve_dtype(dtype_name, device)
    enable_tf32(device)
    try:
        tokenizer = load_tokenizer(tokenizer_path or None)
    except FileNotFoundError as e:
        raise DataError(str(e)) from None
    try:
        ckpt_path = checkpoint_file(ckpt)
    except FileNotFoundError as e:
        raise DataError(f"--ckpt {e} (train first, or pass --ckpt=FILE)") from None
    try:
        model, saved = load_model(ckpt_path, device=str(device))
    except (ValueError, OSError) as e:
        raise DataError(str(e)) from None
    check_checkpoint(saved, tokenizer, ckpt_path)
    if device.type == "cuda" and dtype == torch.bfloat16:
        model.cast_for_inference(dtype)  # bf16 weights: decoding never re-casts them (see model.cast_for_inference)
    return model, saved, ckpt_path, tokenizer, device, dtype
