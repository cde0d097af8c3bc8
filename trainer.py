"""The one training loop shared by pretrain.py and sft.py.

Each script builds a config (a subclass of TrainConfig) and two batch sources with the interface
`src.batch(step, micro_step) -> (x, y)` (train) and `src.eval_batches(n) -> iterator of (x, y)` (val), then
calls `train(...)`. Everything else lives here: devices and DDP, precision, the LR schedule, gradient
accumulation with one gradient sync per optimizer step, validation, logs, atomic checkpoints and resume.
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

from chatglm_tokenizer import bits_per_byte
from babyllama.errors import check
from model import ModelArgs, Transformer
from babyllama.train_log import Logger, Throughput, count, first_step_line, minutes_left, plot_losses, start_val_loss, write_summary
from babyllama.checkpoint import Checkpoints
from babyllama.clocks import CompileClock, FitClock, process_start
from babyllama.run_dir import StopSignals, check_data_tokenizer, open_run, stop_requested
from babyllama.runtime import (ATTENTION, COMPILE_MODES, Runtime, attention_kernels, autocast_context, compile_mode,
                                configure_dynamo, device_problem, set_rng_state, wrap_ddp)

# Called once as hook(cfg, model_args) when a compiled run's first steps have been timed (its compilation and CUDA
# graphs done): chain.py starts compiling the next stage's step in a side process then, off this stage's critical path
ON_COMPILED: list = []

# dense bf16 tensor-core peaks (datasheet, TFLOP/s) for the MFU column; override with --peak_tflops
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "A10": 125.0, "L4": 121.0, "4090": 165.2,
               "3090": 71.0, "A6000": 154.8, "V100": 125.0, "T4": 65.0}


@dataclass
class TrainConfig:
    # run
    out_dir: str = "out/pretrain"  # checkpoints, log.txt, metrics.jsonl, loss.png go here
    resume: bool = False  # continue from out_dir/last.pt exactly where it stopped
    resume_from: str = ""  # or from this checkpoint file / run dir instead of out_dir
    overwrite: bool = False  # a fresh run may replace the checkpoints and logs of an earlier run in out_dir
    seed: int = 1337  # seeds weights, data order and dropout
    device: str = "auto"  # auto = cuda > mps > cpu; or cuda, cuda:1, cpu, mps
    dtype: str = "auto"  # auto = bfloat16 where supported, else float16 (+grad scaler) on cuda, float32 on cpu
    compile: bool = True  # torch.compile the model (CUDA only; ignored elsewhere)
    compile_mode: str = "reduce-overhead"  # torch.compile mode: reduce-overhead (+ CUDA graphs), default, or max-autotune (+ GEMMs tuned while compiling: minutes)
    tokenizer: str = ""  # path to tokenizer.model (else the one the input recorded: hf: folder's, the checkpoint's for sft.py, the shards' for pretrain.py; then $BABYLLAMA_TOKENIZER, chatglm_tokenizer/, the Hub)
    # batch: the global batch is fixed in tokens, whatever the number of processes
    batch_size: int = 32  # micro-batch rows per process per forward pass
    batch_tokens: int = 0  # tokens per optimizer step over all processes; 0 = batch_size * seq_len * world
    # optimizer and schedule (per optimizer step)
    max_steps: int = 0  # optimizer steps in the whole run; 0 = derived from the data by epochs and tokens_per_param
    epochs: float = 1.0  # with max_steps=0: passes over the training split
    tokens_per_param: float = 0.0  # with max_steps=0: also stop at this many tokens per parameter; 0 = no such cap
    max_minutes: float = 0.0  # also stop (validate, checkpoint) after this much training time; 0 = no limit
    fit_minutes: float = 0.0  # > 0: the run length is set so the training steps take about this long (the LR decays to the end of it); the steps after compilation are timed until warmup ends; replaces epochs/tokens_per_param
    learning_rate: float = 3e-4  # peak LR
    min_lr: float = 3e-5  # LR at the end of the decay
    warmup_steps: int = 100  # linear warmup from 0
    lr_schedule: str = "cosine"  # cosine | wsd (warmup, stable, then linear decay over the last decay_frac)
    decay_frac: float = 0.2  # wsd only: fraction of max_steps spent decaying
    weight_decay: float = 0.1  # applied to matrices only (no norms, no biases)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # clip the global grad norm; 0 = off
    ce_chunk: int = 4096  # > 0: fused output layer + loss in chunks of this many rows (never the full logits); 0 = plain
    fuse_projections: bool = False  # q/k/v and the SwiGLU gate/up each as one matmul (model.fuse_projections); same weights
    attention: str = "auto"  # training attention kernel first tried: auto (torch's order) | flash | cudnn | efficient
    # validation, logging, checkpoints
    eval_interval: int = 200  # steps between validation passes (also at the end)
    eval_windows: int = 200  # validation windows (rows) per pass; 0 = the whole split
    log_interval: int = 10  # steps between log lines
    ckpt_interval: int = 200  # steps between last.pt saves (also at every eval and at the end)
    max_bad_steps: int = 5  # consecutive non-finite losses before the run stops
    peak_tflops: float = 0.0  # the card's bf16 peak for MFU; 0 = look the card up
    tensorboard: bool = False  # also write TensorBoard events to out_dir/tb

    def validate(self):
        for name in ("learning_rate", "min_lr", "weight_decay", "beta1", "beta2", "grad_clip", "epochs",
                     "tokens_per_param", "max_minutes", "fit_minutes", "decay_frac", "peak_tflops"):
            check(math.isfinite(getattr(self, name)), f"{name} must be a finite number, got {getattr(self, name)}")
        check(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}")
        check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, f"beta1, beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")
        for name in ("grad_clip", "peak_tflops", "eval_windows", "batch_tokens", "ce_chunk", "max_minutes", "fit_minutes"):
            check(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("max_bad_steps", "eval_interval", "log_interval", "ckpt_interval"):
            check(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        check(0 <= self.seed < 2**32, f"seed must be in 0..2**32-1, got {self.seed}")
        check(device_problem(self.device) is None, device_problem(self.device) or "")
        check(self.batch_size > 0, f"batch_size must be > 0, got {self.batch_size}")
        check(self.max_steps >= 0, f"max_steps must be >= 0 (0 = derived from --epochs), got {self.max_steps}")
        check(math.isfinite(self.epochs) and self.epochs > 0, f"epochs must be > 0, got {self.epochs}")
        check(math.isfinite(self.tokens_per_param) and self.tokens_per_param >= 0,
              f"tokens_per_param must be >= 0, got {self.tokens_per_param}")
        check(self.dtype in ("auto", "bfloat16", "float16", "float32"), f"dtype must be auto|bfloat16|float16|float32, got {self.dtype!r}")
        check(self.lr_schedule in ("cosine", "wsd"), f"lr_schedule must be cosine|wsd, got {self.lr_schedule!r}")
        check(0 <= self.min_lr <= self.learning_rate,
              f"min_lr must be in [0, learning_rate={self.learning_rate}], got {self.min_lr}")
        check(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        # a resumed run's warmup is the saved run's (run_dir.resumed_config), not the flag's default
        check(self.max_steps == 0 or self.warmup_steps < self.max_steps or self.resume or bool(self.resume_from),
              f"--warmup_steps={self.warmup_steps} must be below --max_steps={self.max_steps} "
              f"(a short run: add --warmup_steps={self.max_steps // 10})")
        check(0 < self.decay_frac <= 1, f"decay_frac must be in (0, 1], got {self.decay_frac}")
        check(self.attention in ATTENTION, f"attention must be {'|'.join(ATTENTION)}, got {self.attention!r}")
        check(self.compile_mode in COMPILE_MODES,
              f"compile_mode must be {'|'.join(COMPILE_MODES)}, got {self.compile_mode!r}")
        check(not (self.fit_minutes and self.max_steps) or self.resume or bool(self.resume_from),
              "--fit_minutes sets the number of steps: leave --max_steps at 0")
        if self.tensorboard:
            import importlib.util
            check(importlib.util.find_spec("tensorboard") is not None, "--tensorboard needs `pip install tensorboard`")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """LR for optimizer step `step` (0-based): linear warmup, then cosine or warmup-stable-decay."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "wsd":
        decay_start = int(cfg.max_steps * (1 - cfg.decay_frac))
        if step < decay_start:
            return cfg.learning_rate
        frac = (step - decay_start) / max(1, cfg.max_steps - decay_start)
        return cfg.learning_rate + frac * (cfg.min_lr - cfg.learning_rate)
    frac = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))) * (cfg.learning_rate - cfg.min_lr)


def grad_accum_steps(cfg: TrainConfig, seq_len: int, world_size: int) -> int:
    """Micro-steps per optimizer step so that the global batch stays cfg.batch_tokens."""
    per_micro = cfg.batch_size * seq_len * world_size
    total = cfg.batch_tokens or per_micro
    check(total % per_micro == 0, f"batch_tokens {total} is not a multiple of batch_size*seq_len*world "
          f"= {cfg.batch_size}*{seq_len}*{world_size} = {per_micro}")
    return total // per_micro


def peak_flops(device: torch.device, override_tflops: float) -> Optional[float]:
    if override_tflops > 0:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v * 1e12 for k, v in PEAK_TFLOPS.items() if k in name), None)


class DeviceBatches:
    """The run's micro-batches in order, on the device. `prefetch()` reads and copies the next one (pinned,
    non-blocking on CUDA); train_step calls it once the GPU has work queued, so the CPU-side gathering
    overlaps the GPU instead of delaying the next step's first kernel."""

    def __init__(self, src, start_step: int, accum: int, device: torch.device):
        self.src, self.accum, self.device = src, accum, device
        self.pos, self.tokens = (start_step, 0), 0  # tokens: real tokens handed out so far
        self.ahead = None
        self.prefetch()

    def prefetch(self) -> None:
        if self.ahead is not None:
            return
        tensors = self.src.batch(*self.pos)
        self.ahead_tokens = int((tensors[0] != 0).sum())  # real tokens: SFT rows are padded with id 0
        if self.device.type == "cuda":
            self.ahead = [t.pin_memory().to(self.device, non_blocking=True) for t in tensors]
        else:
            self.ahead = [t.to(self.device) for t in tensors]

    def __next__(self):
        self.prefetch()
        current, self.ahead = self.ahead, None
        self.tokens += self.ahead_tokens
        step, micro = self.pos
        self.pos = (step, micro + 1) if micro + 1 < self.accum else (step + 1, 0)
        return current


def train_step(model, optimizer, scaler, batches: DeviceBatches, accum: int, lr: float, grad_clip: float,
               rt: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over `accum` micro-batches -> (global-batch loss, grad norm), 0-d tensors on the device.

    A non-finite loss or gradient norm skips the update; the caller counts such steps when it reads the losses.
    With a fused AdamW and no fp16 scaler (the bf16/fp32 default) the skip is decided on the device, through the
    optimizer's found_inf flag (as GradScaler drives it), so the step never waits for the GPU: the host reads the
    losses once per log interval. This is the step bench.py times."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    if rt.device.type == "cuda":  # a new iteration for CUDA graphs (torch.compile mode="reduce-overhead")
        torch.compiler.cudagraph_mark_step_begin()
    if accum > 1:  # accumulate into allocated gradients (see zero_grad below); allocated once per run
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
    loss_sum = torch.zeros((), device=rt.device)
    for micro in range(accum):
        if rt.world_size > 1:  # all-reduce gradients on the last micro-step only
            model.require_backward_grad_sync = micro == accum - 1
        x, y, *extra = next(batches)
        with autocast_context(rt.device, rt.dtype):
            _, loss = model(x, y, *extra)
            loss = loss / accum
        scaler.scale(loss).backward()
        loss_sum += loss.detach()
        batches.prefetch()  # the GPU is busy with this micro-step: gather the next batch meanwhile
    if rt.world_size > 1:  # the logged loss is the global batch's, as on one process
        dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
    grad_norm = torch.zeros((), device=rt.device)
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    finite = torch.isfinite(loss_sum) & torch.isfinite(grad_norm)
    if optimizer.defaults.get("fused") and not scaler.is_enabled():
        optimizer.found_inf = (~finite).float()  # 1.0: the fused kernel leaves weights, moments and step count alone
        optimizer.step()
    else:  # fp16's scaler skips inf gradients itself; a non-finite loss is checked on the host
        if finite.item():
            scaler.step(optimizer)
        scaler.update()
    # With accumulation the gradients are zeroed, not freed. A freed .grad would be replaced by the first micro-step's
    # gradient tensor itself, and under CUDA graphs that tensor lives in the graph's memory pool, overwritten by the
    # next micro-step's replay: silently wrong gradients (pytorch/pytorch#169545; tests/test_gpu.py checks this).
    optimizer.zero_grad(set_to_none=accum == 1)
    return loss_sum, grad_norm


class ValBytes:
    """UTF-8 bytes of this rank's validation targets (chatglm_tokenizer.TokenBytes), counted on the first pass and
    reused: eval_batches yields the same windows / conversations every pass."""

    def __init__(self, token_bytes):
        self.token_bytes, self.total = token_bytes, None


@torch.no_grad()
def evaluate(model, batches, rt: Runtime, val_bytes: Optional[ValBytes] = None) -> tuple[float, Optional[float]]:
    """(mean loss per target token, bits per byte of the targets' text or None) over all of `batches` and ranks."""
    model.eval()
    total = torch.zeros(3, device=rt.device, dtype=torch.float64)  # (sum of target-weighted loss, targets, bytes)
    counting = val_bytes is not None and val_bytes.total is None
    local_bytes = 0
    for x, y, *extra in batches:
        if counting:  # targets -1 (SFT prompts, padding) count no bytes
            local_bytes += val_bytes.token_bytes.count(x, y)
        x, y = x.to(rt.device), y.to(rt.device)
        with autocast_context(rt.device, rt.dtype):
            _, loss = model(x, y, *[e.to(rt.device) for e in extra])
        n = (y != -1).sum()  # SFT batches differ in targets: weight by them to get the per-token mean
        total[:2] += torch.stack([loss.double() * n, n.double()])
    if counting:
        val_bytes.total = local_bytes
    total[2] = val_bytes.total if val_bytes is not None else 0
    if rt.world_size > 1:  # nats, targets and bytes of every rank
        dist.all_reduce(total)
    model.train()
    nats, targets, n_bytes = total.tolist()
    return nats / max(targets, 1), (bits_per_byte(nats, int(n_bytes)) if n_bytes > 0 else None)


def out_of_minutes(max_minutes: float, t_start: float, step: int, log_interval: int, rt: Runtime) -> bool:
    """True once the run has used max_minutes (0 = no limit). Every process must stop at the same step (a rank
    that stops alone leaves the others waiting in a collective), and clocks differ, so under torchrun the ranks
    agree (rank 0's clock decides) at log steps only: one small all-reduce per log line, no sync per step."""
    if max_minutes <= 0:
        return False
    late = time.time() - t_start > 60 * max_minutes
    if rt.world_size == 1:
        return late
    if step % log_interval:
        return False
    flag = torch.tensor(float(late and rt.master), device=rt.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


class LossLog:
    """The losses of recent steps, still on the device until flush() reads them all in the loop's one host sync."""

    def __init__(self, log: "Logger", max_bad_steps: int, ckpts: "Checkpoints"):
        self.log, self.max_bad_steps, self.ckpts = log, max_bad_steps, ckpts
        self.pending: list = []  # (step, lr, loss, grad norm) as device tensors
        self.finite: list = []  # finite losses since the last log line
        self.bad = 0  # non-finite steps in a row

    def add(self, step: int, lr: float, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        self.pending.append((step, lr, loss, grad_norm))

    def flush(self) -> float:
        """Writes the pending steps' metrics and counts skipped steps; stops the run (exit 3) after max_bad_steps
        non-finite steps in a row. Returns the last grad norm."""
        if not self.pending:
            return float("nan")
        values = torch.stack([torch.stack([loss, gn]).float() for _, _, loss, gn in self.pending]).tolist()
        for (done, lr, _, _), (loss, gn) in zip(self.pending, values):
            if math.isfinite(loss) and math.isfinite(gn):
                self.bad = 0
                self.finite.append(loss)
                self.log.metric(step=done, loss=loss, lr=lr)
                continue
            self.bad += 1
            self.log.print(f"step {done}: non-finite loss {loss} / grad norm {gn}; step skipped "
                           f"({self.bad}/{self.max_bad_steps} in a row)")
            if self.bad >= self.max_bad_steps:
                self.ckpts.settle()
                self.log.print(f"stopping: {self.bad} non-finite steps in a row; {self.ckpts.last_good()} "
                               f"(lower learning_rate or use dtype=bfloat16)")
                raise SystemExit(3)
        self.pending.clear()
        return values[-1][1]

    def mean(self) -> str:
        """The mean finite loss since the last call, formatted ('n/a' if every step was skipped)."""
        mean = f"{sum(self.finite) / len(self.finite):.4f}" if self.finite else "n/a"
        self.finite.clear()
        return mean


def build_model(cfg: TrainConfig, rt: Runtime, model_args: ModelArgs, ckpt: Optional[dict],
                init_state: Optional[dict]) -> tuple:
    """-> (raw model, model to run (compiled, DDP), optimizer, scaler, description), restored from ckpt if given."""
    torch.manual_seed(cfg.seed + rt.rank)
    model = Transformer(model_args)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    elif init_state is not None:
        model.load_state_dict(init_state)
    model.ce_chunk = cfg.ce_chunk
    model.fuse_projections(cfg.fuse_projections)
    model.to(rt.device)
    optimizer = model.configure_optimizer(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), rt.device.type)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=(rt.dtype == torch.float16))
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        rngs = ckpt["rng"]
        set_rng_state(rngs[rt.rank] if rt.rank < len(rngs) else rngs[0])
    run, compiled = model, "eager"
    if cfg.compile and rt.device.type == "cuda":
        configure_dynamo()
        mode = compile_mode(cfg.compile_mode)
        run, compiled = torch.compile(model, mode=mode), f"compiled ({mode or 'default'})"
    if rt.world_size > 1:
        run = wrap_ddp(run, rt)
    return model, run, optimizer, scaler, compiled


def validate(model, val_src, cfg: TrainConfig, rt: Runtime, log: "Logger", ckpts: Checkpoints, step: int,
             best_val: float, start_loss: float = math.inf, val_bytes: Optional[ValBytes] = None) -> tuple[float, float]:
    """A validation pass at `step`; saves last.pt (and best.pt when it improved) -> (val loss, best val loss).
    Step 0 is the starting point (random init, or the pretrained model for SFT): a baseline, not a result. best.pt
    is the best trained step; a loss not below step 0's (start_loss) is said so on its line (an SFT run that made
    the model worse)."""
    t0 = time.time()
    val_loss, bpb = evaluate(model, val_src.eval_batches(cfg.eval_windows), rt, val_bytes)
    # val_s / save_s: the seconds of this pass and of the checkpoint save the loop waited for (summary.json sums them)
    times = {"val_s": round(time.time() - t0, 3)}
    loss = f"val loss {val_loss:.4f}" + (f" | {bpb:.4f} bits/byte" if bpb is not None else "")
    improved = val_loss < best_val and step > 0
    if step > 0:
        ckpts.check_loss(step, val_loss)  # a diverged run stops here: no last.pt or best.pt of it
        best_val = min(best_val, val_loss)
        t1 = time.time()
        pending = ckpts.save(step, val_loss, best_val, improved)  # True: best.pt is still being written
        times["save_s"] = round(time.time() - t1, 3)
    log.metric(step=step, val_loss=val_loss, **({"val_bpb": bpb} if bpb is not None else {}), **times)
    if step == 0:
        log.print(f"step 0: {loss} (before training)")
        return val_loss, best_val
    worse = f" (above step 0's {start_loss:.4f}: no better than the starting point)" if val_loss >= start_loss else ""
    line = f"step {step}: {loss}{' (best)' if improved else ''}{worse}"
    if improved and pending:  # called best once it is on disk (a few log lines later), never if its write fails
        ckpts.log_when_written(line)
    else:
        log.print(line)
    return val_loss, best_val


def bytes_of_val(val_src, token_bytes, log: Logger) -> Optional[ValBytes]:
    """Bits per byte needs the tokenizer whose ids the validation data holds: SFT data is tokenized by it, pretraining
    shards name theirs (None: synthetic ids). Without it the run logs the loss per token only, and says so once."""
    shards_sha = getattr(val_src, "tokenizer_sha256", token_bytes.sha256 if token_bytes is not None else None)
    if token_bytes is None or shards_sha != token_bytes.sha256:
        why = "no tokenizer.model at hand" if token_bytes is None else "the shards name no tokenizer (synthetic ids)"
        log.print(f"bits per byte not available: {why}; validation logs the loss per token only")
        return None
    return ValBytes(token_bytes)


def run_length(cfg: TrainConfig, epoch_steps: float, params: int, tokens_per_step: int) -> tuple[TrainConfig, str]:
    """The config with max_steps fixed -> (config, how the length was chosen, for the log).

    max_steps > 0 is taken as given. Otherwise the run is `epochs` passes over the training split (epoch_steps
    optimizer steps each), cut to `tokens_per_param` tokens per parameter when that is set: a few epochs of a small
    corpus, but never more tokens than the model can use on a large one. A warmup as long as a short run is cut to
    a tenth of it."""
    if cfg.max_steps:
        return cfg, f"{cfg.max_steps:,} steps (--max_steps)"
    if cfg.fit_minutes:  # a first count for the log; FitClock sets the real one once it has timed the steps
        return dataclasses.replace(cfg, max_steps=max(1, math.ceil(cfg.epochs * epoch_steps))), \
            f"as many steps as fit in {cfg.fit_minutes:g} minutes (--fit_minutes, set after " \
            f"{max(cfg.warmup_steps, FitClock.MIN_END)} steps)"
    steps = max(1, math.ceil(cfg.epochs * epoch_steps))
    why = f"{cfg.epochs:g} epochs of {epoch_steps:,.1f} steps"
    if cfg.tokens_per_param:
        cap = max(1, math.ceil(cfg.tokens_per_param * params / tokens_per_step))
        if cap < steps:
            steps, why = cap, f"{cfg.tokens_per_param:g} tokens per parameter ({cfg.epochs:g} epochs would be {steps:,})"
        else:
            why += f" (under the cap of {cfg.tokens_per_param:g} tokens per parameter: {cap:,} steps)"
    warmup = cfg.warmup_steps
    if warmup >= steps:
        warmup = steps // 10
        why += f"; warmup cut to {warmup} steps"
    return dataclasses.replace(cfg, max_steps=steps, warmup_steps=warmup), f"{steps:,} steps = {why}"


def train(cfg: TrainConfig, rt: Runtime, model_args: ModelArgs, make_data: Callable, *, kind: str,
          tokenizer_sha256: str, init_state: Optional[dict] = None, token_bytes=None) -> dict:
    """Runs (or resumes) a training run and returns a summary dict. token_bytes: the tokenizer's
    chatglm_tokenizer.TokenBytes for bits per byte in validation (None: no tokenizer at hand, loss only).

    make_data(cfg, model_args, grad_accum) -> (train_src, val_src) is called once the run's config and model are
    known (a resumed run takes both, context length included, from the checkpoint, not from the flags)."""
    if not (cfg.resume or cfg.resume_from):  # a bad --batch_tokens is one line before the run folder is claimed
        grad_accum_steps(cfg, model_args.max_seq_len, rt.world_size)
    cfg, model_args, ckpt, path, notes, lock, good = open_run(cfg, rt, model_args, tokenizer_sha256)
    try:
        with Logger(cfg.out_dir, rt.master, cfg.tensorboard) as log, attention_kernels(cfg.attention):
            return run_training(cfg, rt, log, model_args, make_data, kind, tokenizer_sha256, init_state,
                                (ckpt, path, notes, good), token_bytes)
    finally:
        if lock is not None:
            os.close(lock)  # the folder is free again (the OS also frees it when the process dies)


def describe_run(log: Logger, cfg: TrainConfig, rt: Runtime, what: str, compiled: str, accum: int,
                 tokens_per_step: int, length: str, sources: tuple, start_step: int) -> None:
    """The run's first lines: model and device, the batch and the run length, the data of both splits; on a slow
    device, what the first minutes are spent on."""
    seq_len = tokens_per_step // (cfg.batch_size * rt.world_size * accum)
    log.print(f"{what} | device {rt.device} x{rt.world_size} | {str(rt.dtype)[6:]} | {compiled}")
    log.print(f"batch: {cfg.batch_size} rows x {seq_len} tokens x {rt.world_size} procs x {accum} accum = "
              f"{tokens_per_step:,} tokens/step | {length}"
              + ("" if cfg.fit_minutes and start_step == 0 else f" = {count(tokens_per_step * cfg.max_steps)} tokens"))
    log.print("data: " + " | ".join(src.describe() for src in sources))
    if rt.device.type != "cuda":
        log.print(f"{rt.device.type}: {'step 0 validation, then ' if start_step == 0 else ''}the first step; "
                  "seconds per step and the time left follow it")


def run_training(cfg: TrainConfig, rt: Runtime, log: Logger, model_args: ModelArgs, make_data: Callable,
                 kind: str, tokenizer_sha256: str, init_state: Optional[dict], resume: tuple, token_bytes=None) -> dict:
    """train()'s body, once the run folder is claimed and its log opened (train() closes it); `resume` = (checkpoint
    or None, its path, notes, good step)."""
    ckpt, path, notes, good = resume
    start_step, best_val = (ckpt["step"], ckpt["best_val_loss"]) if ckpt is not None else (0, float("inf"))
    for line in notes + ([f"resuming from {path} at step {start_step} (best val {best_val:.4f})"] if ckpt else []):
        log.print(line)
    seq_len, t_data = model_args.max_seq_len, time.time()
    accum = grad_accum_steps(cfg, seq_len, rt.world_size)
    train_src, val_src = make_data(cfg, model_args, accum)
    data_s = time.time() - t_data  # reading (SFT: tokenizing) the data
    saved_sha = (ckpt or {}).get("tokenizer_sha256")  # a resumed run without the tokenizer keeps its hash
    tokenizer_sha256 = check_data_tokenizer(cfg, (train_src, val_src), tokenizer_sha256 or saved_sha)
    val_bytes = bytes_of_val(val_src, token_bytes, log)
    raw_model, model, optimizer, scaler, compiled = build_model(cfg, rt, model_args, ckpt, init_state)
    tokens_per_step = cfg.batch_size * seq_len * rt.world_size * accum
    given = cfg
    cfg, length = run_length(cfg, train_src.epoch_steps(), raw_model.num_params(), tokens_per_step)
    describe_run(log, cfg, rt, f"{kind}: {raw_model.num_params():,} unique parameters", compiled, accum,
                 tokens_per_step, length, (train_src, val_src), start_step)
    ckpts = Checkpoints(cfg, rt, model_args, kind, tokenizer_sha256, raw_model, optimizer, scaler,
                        tokens_per_step // seq_len, log, good, given)
    t_start = time.time()
    # validation runs the raw model eagerly: compiling no-grad graphs took 22 s (pretrain) and 45 s (SFT) on an H200
    val_loss, best_val = (validate(raw_model, val_src, cfg, rt, log, ckpts, 0, best_val, val_bytes=val_bytes)
                          if start_step == 0 else (ckpt["val_loss"], best_val))
    start_loss = start_val_loss(cfg.out_dir) if start_step else val_loss
    batches = DeviceBatches(train_src, start_step, accum, rt.device)
    peak = peak_flops(rt.device, cfg.peak_tflops)
    meter = Throughput(batches, rt.world_size, raw_model.flops_per_token(seq_len), peak * rt.world_size if peak else None,
                       cfg.eval_interval, None if start_step else time.time() - t_start)  # + step 0's validation time
    losses, fit = LossLog(log, cfg.max_bad_steps, ckpts), FitClock(cfg, rt, log, start_step)
    clock = CompileClock(rt.device, compiled != "eager", log,
                         then=lambda: [hook(cfg, model_args) for hook in ON_COMPILED])
    done, outside, t_loop = start_step, 0.0, time.time()  # outside: seconds of validation and saves in the loop
    try:
        with StopSignals() as signals:
            while done < cfg.max_steps:  # --fit_minutes may set max_steps during the run
                step = done
                lr, t_step = lr_at(step, cfg), time.time()
                loss, grad_norm = train_step(model, optimizer, scaler, batches, accum, lr, cfg.grad_clip, rt)
                done = step + 1
                clock.step_done(t_step)
                fit.tick(done)
                if done == start_step + 1 and rt.device.type != "cuda" and done % cfg.log_interval:
                    log.print(first_step_line(time.time() - t_step, cfg.max_steps - done,
                                              minutes_left(cfg.max_minutes, t_start)))
                losses.add(done, lr, loss, grad_norm)
                meter.step()
                out_of_time = out_of_minutes(cfg.max_minutes, t_start, done, cfg.log_interval, rt)
                stop = stop_requested(signals, done, cfg.log_interval, rt)
                last = done == cfg.max_steps or out_of_time or stop
                if done % cfg.log_interval and done % cfg.eval_interval and done % cfg.ckpt_interval and not last:
                    continue  # the losses stay on the device: no host sync on this step
                grad_norm = losses.flush()  # before any checkpoint: a run that must stop never saves after its bad steps
                ckpts.poll()  # a best.pt written since is called best now; a failed write stops the run here
                if done % cfg.log_interval == 0 or last:
                    log.print(meter.line(done, cfg.max_steps, lr, grad_norm, losses.mean(),
                                         minutes_left(cfg.max_minutes, t_start)))
                ckpts.final, t_out = last, time.time()  # the run's last save is waited for
                if (done % cfg.eval_interval == 0 or last) and not stop:
                    with meter.outside():  # validation time: out of tokens/s, into the ETA
                        val_loss, best_val = validate(raw_model, val_src, cfg, rt, log, ckpts, done, best_val,
                                                      start_loss, val_bytes)
                elif done % cfg.ckpt_interval == 0 or stop:
                    ckpts.save(done, val_loss, best_val, False)
                outside += time.time() - t_out
                if out_of_time:
                    log.print(f"stopping at step {done}: max_minutes={cfg.max_minutes} reached (resume with --resume)")
                if out_of_time or stop:
                    break
    finally:
        ckpts.settle()  # the last checkpoint is on disk before the run returns or exits
    spent, t_end = time_spent(clock, data_s, time.time() - t_loop, outside, t_start), time.time()
    finish_lines(log, cfg, rt, kind, signals.requested, done, best_val, start_loss)
    spent["finish_s"] = round(time.time() - t_end, 2)  # the loop's end to here: the curve's plot
    result = {"best_val_loss": best_val, "val_loss": val_loss, "elapsed_s": time.time() - t_start, **spent}
    if rt.master:
        write_summary(cfg, kind, raw_model.num_params(), tokens_per_step, train_src.epoch_steps(), done, meter, result)
    return result


def time_spent(clock: CompileClock, data_s: float, loop_s: float, outside_s: float, t_start: float) -> dict:
    """Where this process's time went, for summary.json: compile_s (the first steps' extra time, 0 for an eager
    model), data_s (reading the data), steps_s (the loop's time less validation, saves and compilation), startup_s
    (the process's start to step 0 less data_s: the interpreter, imports, CUDA, building the model)."""
    clock.say()  # a run shorter than the clock's window logs it here
    compile_s = (clock.seconds() or 0.0) if clock.compiled else 0.0
    return {"compile_s": round(compile_s, 2), "data_s": round(data_s, 2),
            "steps_s": round(max(0.0, loop_s - outside_s - compile_s), 2),
            "startup_s": round(max(0.0, t_start - process_start() - data_s), 2)}


def finish_lines(log: Logger, cfg: TrainConfig, rt: Runtime, kind: str, signal: Optional[str], done: int,
                 best_val: float, start_loss: float) -> None:
    """The run's last lines: how to continue after Ctrl-C / SIGTERM (then exit 130), else the result and the curve."""
    if signal:
        script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0].endswith(".py") else f"{kind}.py"
        log.print(f"{signal} at step {done}: saved {cfg.out_dir}/last.pt; continue with "
                  f"`python {script} --resume --out_dir={cfg.out_dir}`")
        raise SystemExit(130)
    if rt.master:
        png = plot_losses(cfg.out_dir, kind)
        log.print(f"done: best val loss {best_val:.4f} | checkpoints in {cfg.out_dir}/ (best.pt, last.pt)"
                  + (f" | curve {png}" if png else ""))
        if best_val >= start_loss:
            log.print(f"note: no step beat step 0's val loss {start_loss:.4f}; best.pt is the least bad trained step "
                      f"(try a lower --learning_rate or fewer steps)")
