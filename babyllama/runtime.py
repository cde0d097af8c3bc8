"""Where a script runs: device, precision, processes (DDP), random state.

  rt = setup_runtime("auto", "auto")                # cuda > mps > cpu; bf16 where supported; DDP under torchrun
  with autocast_context(rt.device, rt.dtype): ...   # mixed precision in rt.dtype (nothing for float32)
  state = rng_state(); set_rng_state(state)         # every generator, as tensors and plain values (checkpoints)
  configure_dynamo(); torch.compile(model, mode=compile_mode("reduce-overhead"))   # the training step's compile
  with attention_kernels("flash"): ...              # SDPA tries that kernel first
  ddp_model = wrap_ddp(model, rt)                   # DDP with gradients in its buckets, no buffer broadcasts
"""
from __future__ import annotations

import contextlib
import inspect
import os
import platform
import random
import re
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch.nn.attention import SDPBackend, sdpa_kernel

import numpy as np



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


def hardware() -> dict:
    """The machine, for report cards: Python, torch, CPU cores, platform, GPU names."""
    hw = {"python": platform.python_version(), "torch": torch.__version__, "cpu_cores": os.cpu_count(),
          "platform": platform.platform(), "gpus": []}
    if torch.cuda.is_available():
        hw["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return hw


COMPILE_MODES = ("reduce-overhead", "default", "max-autotune")
ATTENTION = {"auto": None, "flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION}  # --attention -> the SDPA backend put first


def attention_kernels(name: str):
    """A context in which SDPA tries --attention's kernel first, then torch's usual order (a kernel that cannot
    take a call falls through to the next). torch.compile picks the kernel when it traces, so the whole run is in it."""
    first = ATTENTION[name]
    if first is None:
        return contextlib.nullcontext()
    order = [first] + [b for b in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                                   SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH) if b != first]
    return sdpa_kernel(order, set_priority=True)


def compile_mode(mode: str) -> Optional[str]:
    """torch.compile's mode argument. reduce-overhead replays the forward and backward as CUDA graphs (one launch
    instead of hundreds of kernels), so the GPU never waits for the host: same losses and peak memory, and faster
    the slower the host (docs/speed.md)."""
    return None if mode == "default" else mode


def wrap_ddp(model: torch.nn.Module, rt: Runtime) -> torch.nn.Module:
    """DistributedDataParallel with the gradients living in the all-reduce buckets (gradient_as_bucket_view): no
    copy of every gradient into a bucket and back each step (about 150 small kernels and their launches). The only
    buffers are the rotary tables, computed identically on every rank: no broadcast of them before each forward.

    A compiled model stays one graph (optimize_ddp off) rather than one per gradient bucket: the all-reduces then
    wait for the whole backward instead of overlapping it, but little could overlap anyway (the tied embedding,
    57% of the gradient bytes, is complete only after the last backward op) and each extra graph costs host time
    (docs/speed.md has the measurements)."""
    torch._dynamo.config.optimize_ddp = False
    DDP = torch.nn.parallel.DistributedDataParallel
    # torch >= 2.13 renames broadcast_buffers (and warns); its forward_sync_buffers=False still syncs once at init
    no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                      else {"broadcast_buffers": False})
    return DDP(model, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None, gradient_as_bucket_view=True,
               **no_buffer_sync)


def configure_dynamo() -> None:
    """torch.compile's settings for the training step (process-wide, idempotent).

    - SFT rows come in up to max_seq_len / pad_multiple widths, each a graph (training only: validation is eager).
    - Floats stay constants: chain.py runs pretraining (dropout 0.0) and SFT (dropout 0.1) in one process, and by
      default the second model's dropout rates would become symbolic floats ("automatic dynamic"), missing the
      compile caches and tracing SFT's step twice."""
    dyn = torch._dynamo.config
    limit = "recompile_limit" if hasattr(dyn, "recompile_limit") else "cache_size_limit"
    setattr(dyn, limit, max(getattr(dyn, limit), 64))
    if hasattr(dyn, "specialize_float"):
        dyn.specialize_float = True
