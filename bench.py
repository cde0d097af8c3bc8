"""Speed benchmarks: the real training step (trainer.train_step), SFT, generation and data processing.

On one GPU, the original project's config (dim 512, 8 layers, 8 heads, seq 512, vocab 64,793, micro-batch 32):
    python bench.py                                   # train variants + generation
    python bench.py --what=parity --data_dir=data/pretrain --steps=300   # fast path vs eager fp32 losses
    python bench.py --what=sft --sft_data=data/sft/train.jsonl
    python bench.py --what=data --data_input=corpus.json --data_workers=2
    python bench.py --what=ckpt                       # what the training loop waits for when it saves a checkpoint
    python bench.py --what=train --variants=bf16_compile,bf16_compile_ce4k_cg,bf16_compile_ce16k_cg_fused_cudnn
    python bench.py --what=profile                    # GPU time per step by kernel class (parse_variant: the names)
    python bench.py --what=beam --vocab_size=8192     # eval.py's beam search: time per row and step, GPU time by kind
Several GPUs (data-parallel scaling of the step pretrain.py runs under torchrun, CUDA graphs included):
    torchrun --standalone --nproc_per_node=2 bench.py --what=train --variants=bf16_compile_ce4k_cg
Tiny CPU run:
    python bench.py --what=train,gen --dim=64 --n_layers=2 --n_heads=4 --max_seq_len=64 --batch_size=4 \
        --steps=3 --warmup=1 --variants=fp32_eager --gen_new_tokens=16
Results: a table on stdout and out/bench/bench.json (one JSON object per measurement).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Optional

from babyllama.errors import quiet_ctrl_c_until_main  # light: no torch

if __name__ == "__main__":
    quiet_ctrl_c_until_main()  # torch's import takes seconds: a Ctrl-C during it is one line, exit 130

import torch

from babyllama.config import config_or_exit
from babyllama.errors import ConfigError, check, ctrl_c
from beam import beam_search
from generate import EVAL_BEAMS, Sampling, generate
from model import ModelArgs, Transformer
from babyllama.runtime import (attention_kernels, autocast_context as autocast, configure_dynamo, resolve_dtype,
                                setup_runtime, synchronize as sync, wrap_ddp)
from babyllama.fileio import write_json
from trainer import DeviceBatches, lr_at, train_step, TrainConfig

@dataclass(frozen=True)
class Variant:
    """One way of running the training step."""
    dtype: torch.dtype  # autocast dtype
    compile: object = False  # torch.compile: False, True (default mode) or a mode name
    ce_chunk: int = 0  # fused output layer + loss in chunks of this many rows; 0 = plain cross-entropy
    fused: bool = False  # q/k/v and gate/up as one matmul each (model.fuse_projections, --fuse_projections)
    attention: str = "auto"  # SDPA kernel tried first (babyllama.runtime.attention_kernels, --attention)
    tuned: bool = False  # inductor's coordinate-descent tuning of the kernels it generates (longer compilation)


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ATTENTION_WORDS = ("flash", "cudnn", "efficient")


def parse_variant(name: str) -> Variant:
    """A variant from its name, words joined by '_': a dtype (fp32, fp16, bf16), then eager | compile | autotune
    (torch.compile's max-autotune mode, CUDA graphs included), then any of: ce4k / ce8k / ce16k (the fused loss in
    chunks of 4,096 / 8,192 / 16,384 rows), cg (CUDA graphs: mode reduce-overhead), fused (one matmul for q/k/v and one
    for gate/up), flash / cudnn / efficient (the attention kernel tried first), tuned (inductor's coordinate-descent
    tuning). E.g. bf16_compile_ce4k_cg is pretrain.py's default step on a GPU. A ValueError names a bad word."""
    words = name.split("_")
    if len(words) < 2 or words[0] not in DTYPES or words[1] not in ("eager", "compile", "autotune"):
        raise ValueError(f"{name!r}: expected DTYPE_eager|compile|autotune[_WORD...] (DTYPE: fp32, fp16, bf16)")
    kw: dict = {"compile": {"eager": False, "compile": True, "autotune": "max-autotune"}[words[1]]}
    for word in words[2:]:
        if word.startswith("ce") and word.endswith("k") and word[2:-1].isdigit() and int(word[2:-1]) > 0:
            kw["ce_chunk"] = int(word[2:-1]) * 1024
        elif word == "cg" and kw["compile"] is True:
            kw["compile"] = "reduce-overhead"
        elif word == "fused":
            kw["fused"] = True
        elif word in ATTENTION_WORDS:
            kw["attention"] = word
        elif word == "tuned" and kw["compile"]:
            kw["tuned"] = True
        else:
            raise ValueError(f"{name!r}: unknown or misplaced word {word!r} (cg and tuned need compile)")
    return Variant(DTYPES[words[0]], **kw)


@dataclass
class BenchConfig:
    what: str = "train,gen"  # comma-separated: train, parity, sft, gen, data, ckpt, profile, beam
    variants: str = "fp16_eager,bf16_compile,bf16_compile_ce4k_cg"  # train steps (parse_variant names): the original project's recipe, plain bf16 + compile, our default
    dim: int = 512  # model: the original project's config
    n_layers: int = 8
    n_heads: int = 8
    max_seq_len: int = 512
    vocab_size: int = 64793
    batch_size: int = 32  # micro-batch rows per GPU
    steps: int = 30  # timed steps (parity: steps compared)
    warmup: int = 8  # untimed steps first (compilation, allocator growth)
    data_dir: str = "data/pretrain"  # parity: real tokens from data_process.py
    parity_variant: str = "bf16_compile"  # parity: the fast path(s), comma-separated, compared with fp32_eager
    parity_steps: int = 300  # parity: optimizer steps on real data, both paths
    profile_variant: str = "bf16_compile_ce4k"  # profile: GPU time per kernel class of this step (no CUDA graphs: a graph hides its kernels)
    sft_data: str = "data/sft/train.jsonl"  # sft: normalized conversations
    sft_modes: str = "fixed,dynamic,packed"  # sft batch modes to time
    sft_variant: str = "bf16_compile_ce4k_cg"  # sft: the step as sft.py runs it by default on a GPU
    gen_batches: str = "1,32"  # generation batch sizes
    gen_prompt_len: int = 32
    gen_new_tokens: int = 256
    gen_no_cache: bool = True  # also time generation without the KV cache
    beam_questions: str = "64,256"  # beam: questions per batch to time, each as eval.py decodes it (4 starts x 8 beams, gen_prompt_len + gen_new_tokens)
    data_input: str = ""  # data: a corpus file for data_process.py
    data_workers: int = 2  # data: tokenizer processes
    tokenizer: str = ""  # tokenizer.model for sft/data (else the usual lookup)
    device: str = "auto"
    out: str = "out/bench/bench.json"

    def validate(self):
        for w in self.what.split(","):
            check(w in ("train", "parity", "sft", "gen", "data", "ckpt", "profile", "beam"), f"--what: unknown benchmark {w!r}")
        for v in [*self.variants.split(","), *self.parity_variant.split(","), self.sft_variant, self.profile_variant]:
            try:
                parse_variant(v)
            except ValueError as e:
                raise ConfigError(f"--variants/--parity_variant/--sft_variant: {e}") from None
        check(self.steps > 0, f"steps must be > 0, got {self.steps}")
        check(self.warmup >= 0, f"warmup must be >= 0, got {self.warmup}")

    def model_args(self) -> ModelArgs:
        return ModelArgs(dim=self.dim, n_layers=self.n_layers, n_heads=self.n_heads, vocab_size=self.vocab_size,
                         max_seq_len=self.max_seq_len)


class RandomTokens:
    """Synthetic batch source: a few pre-drawn (x, y) batches of random ids, cycled (no CPU cost in the loop)."""

    def __init__(self, vocab_size: int, batch_size: int, seq_len: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.batches = [torch.randint(3, vocab_size, (batch_size, seq_len + 1), generator=g) for _ in range(4)]

    def batch(self, step: int, micro_step: int):
        w = self.batches[step % len(self.batches)]
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()


def matmul_peak_tflops(device: torch.device) -> float:
    """Measured bf16 matmul rate (8192^3, median of 20): the MFU denominator."""
    if device.type != "cuda":
        return 0.0
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    times = []
    for i in range(25):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        sync(device)
        if i >= 5:
            times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return 2 * 8192 ** 3 / times[len(times) // 2] / 1e12


def build(args: ModelArgs, rt, variant: Variant, seed: int = 0):
    """-> (model, what to run: compiled and/or DDP-wrapped, AdamW, grad scaler) as the trainer builds them."""
    torch.manual_seed(seed)
    model = Transformer(args).to(rt.device)
    model.ce_chunk = variant.ce_chunk
    model.fuse_projections(variant.fused)
    opt = model.configure_optimizer(0.1, 3e-4, (0.9, 0.95), rt.device.type)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.dtype == torch.float16)
    compile_ = variant.compile
    mode = compile_ if isinstance(compile_, str) else None
    if compile_ and rt.device.type == "cuda":
        configure_dynamo()  # the trainer's settings: several variants compile in one process, as chain.py's stages do
        run = torch.compile(model, mode=mode)
    else:
        run = model
    if rt.world_size > 1:
        run = wrap_ddp(run, rt)  # pretrain.py's DDP wrapper
    return model, run, opt, scaler


def step_context(variant: Variant):
    """The variant's attention kernel order and, if tuned, inductor's coordinate-descent tuning, for the steps that
    compile and run it."""
    stack = contextlib.ExitStack()
    stack.enter_context(attention_kernels(variant.attention))
    if variant.tuned:
        import torch._inductor.config as inductor_config
        stack.enter_context(inductor_config.patch(coordinate_descent_tuning=True))
    return stack


def time_steps(run, opt, scaler, batches, rt, steps: int, warmup: int) -> dict:
    """Times `steps` real train_step calls after `warmup` ones (the caller turns the seconds into tokens/s).
    The peak memory spans the warm-up too: CUDA graphs allocate their private pool while recording, never after."""
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)
    for _ in range(warmup):
        train_step(run, opt, scaler, batches, 1, 3e-4, 1.0, rt)
    sync(rt.device)
    t0, losses = time.perf_counter(), []
    for _ in range(steps):
        losses.append(train_step(run, opt, scaler, batches, 1, 3e-4, 1.0, rt)[0])  # read after timing
    sync(rt.device)
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(rt.device) / 2 ** 30 if rt.device.type == "cuda" else 0.0
    return {"seconds": dt, "step_ms": 1000 * dt / steps, "peak_gib": peak, "last_loss": losses[-1].item()}


def bench_train(cfg: BenchConfig, base_rt, peak_tflops: float, emit) -> None:
    args = cfg.model_args()
    for name in cfg.variants.split(","):
        variant = parse_variant(name)
        rt = dataclasses.replace(base_rt, dtype=variant.dtype)
        model, run, opt, scaler = build(args, rt, variant)
        batches = DeviceBatches(RandomTokens(args.vocab_size, cfg.batch_size, args.max_seq_len, rt.rank), 0, 1, rt.device)
        t0 = time.perf_counter()
        with step_context(variant):  # compilation happens in the warm-up steps, under the variant's settings
            r = time_steps(run, opt, scaler, batches, rt, cfg.steps, cfg.warmup)
        r["setup_s"] = time.perf_counter() - t0 - r["seconds"]  # compilation and warm-up
        tok_s = cfg.batch_size * args.max_seq_len * rt.world_size * cfg.steps / r["seconds"]
        mfu = model.flops_per_token(args.max_seq_len) * tok_s / (peak_tflops * 1e12 * rt.world_size) if peak_tflops else None
        emit({"bench": "train", "variant": name, "gpus": rt.world_size, "batch_size": cfg.batch_size,
              "tokens_per_s": tok_s, "mfu": mfu, **r, "params": model.num_params()})
        del model, run, opt, scaler, batches
        if rt.device.type == "cuda":
            torch.cuda.empty_cache()


KERNEL_CLASSES = (  # (class, words of the kernel names in it), first match wins
    ("output layer softmax-gradient (Triton)", ("_softmax_grad_kernel",)),
    ("attention", ("flash", "fmha", "cudnn", "attention", "sdpa")),
    ("matmul (cuBLAS/CUTLASS)", ("gemm", "xmma", "cutlass", "nvjet", "wgmma", "sm90_", "sm80_", "cublas")),
    ("optimizer (fused AdamW)", ("adam", "multi_tensor")),
    ("fused elementwise (inductor's Triton)", ("triton_",)),
)


def by_class(kernels: list, classes: tuple) -> dict:
    """(kernel name, time) pairs summed by class: the first (class, words) of `classes` with a word in the name, else
    "other"."""
    totals: dict = {}
    for key, t in kernels:
        name = next((c for c, words in classes if any(w in key.lower() for w in words)), "other")
        totals[name] = totals.get(name, 0.0) + t
    return totals


def bench_profile(cfg: BenchConfig, base_rt, emit) -> None:
    """GPU time per step by kernel class (KERNEL_CLASSES) and the 10 costliest kernels, from torch.profiler over
    `steps` steps of --profile_variant after its warm-up: where the step's time goes."""
    from torch.profiler import ProfilerActivity, profile
    args, variant = cfg.model_args(), parse_variant(cfg.profile_variant)
    rt = dataclasses.replace(base_rt, dtype=variant.dtype)
    _, run, opt, scaler = build(args, rt, variant)
    batches = DeviceBatches(RandomTokens(args.vocab_size, cfg.batch_size, args.max_seq_len, rt.rank), 0, 1, rt.device)
    with step_context(variant):
        time_steps(run, opt, scaler, batches, rt, 1, cfg.warmup)  # compiled and warm
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            time_steps(run, opt, scaler, batches, rt, cfg.steps, 0)
    kernels = [(e.key, getattr(e, "self_device_time_total", 0) / 1e3 / cfg.steps) for e in prof.key_averages()]
    kernels = [(k, ms) for k, ms in kernels if ms > 0]
    classes = by_class(kernels, KERNEL_CLASSES)
    top = sorted(kernels, key=lambda k: -k[1])[:10]
    emit({"bench": "profile", "variant": cfg.profile_variant, "gpu_ms_per_step": sum(ms for _, ms in kernels),
          "classes_ms": {k: round(v, 3) for k, v in sorted(classes.items(), key=lambda kv: -kv[1])},
          "top_kernels_ms": [[k[:90], round(ms, 3)] for k, ms in top]})


def bench_parity(cfg: BenchConfig, base_rt, emit) -> None:
    """The fast path(s) (bf16 + compile, ...) and plain eager fp32 on the same real batches: per-step loss gaps."""
    from dataset import PretrainData
    args = cfg.model_args()
    data = PretrainData(cfg.data_dir, "train", args.max_seq_len, cfg.batch_size, seed=0)
    sched = TrainConfig(max_steps=cfg.parity_steps, warmup_steps=min(100, cfg.parity_steps // 4), learning_rate=3e-4, min_lr=3e-5)
    fast = cfg.parity_variant.split(",")
    curves = {}
    for name in ("fp32_eager", *fast):
        variant = parse_variant(name)
        rt = dataclasses.replace(base_rt, dtype=variant.dtype)
        _, run, opt, scaler = build(args, rt, variant, seed=0)
        batches = DeviceBatches(data, 0, 1, rt.device)
        with step_context(variant):
            curves[name] = torch.stack([train_step(run, opt, scaler, batches, 1, lr_at(s, sched), 1.0, rt)[0]
                                        for s in range(cfg.parity_steps)]).tolist()
    for name in fast:
        gaps = [abs(a - b) for a, b in zip(curves["fp32_eager"], curves[name])]
        tail = max(1, len(gaps) // 10)  # the last tenth of the steps: where the paths have drifted most
        emit({"bench": "parity", "steps": cfg.parity_steps, "max_gap": max(gaps), "mean_gap": sum(gaps) / len(gaps),
              "max_gap_after_10": max(gaps[10:]) if len(gaps) > 10 else max(gaps),
              "mean_last_tenth": {n: sum(curves[n][-tail:]) / tail for n in ("fp32_eager", name)},
              "fp32_first_last": [curves["fp32_eager"][0], curves["fp32_eager"][-1]],
              "fast": name, "fast_first_last": [curves[name][0], curves[name][-1]]})


def bench_sft(cfg: BenchConfig, base_rt, emit) -> None:
    """Real (non-padding) tokens per second of the SFT step, per batch mode: `sft_variant` on CUDA, fp32 elsewhere."""
    from chatglm_tokenizer import load_tokenizer
    from dataset_sft import Batching, SFTData, SFTSamples
    args = cfg.model_args()
    tok = load_tokenizer(cfg.tokenizer or None)
    base = SFTData(SFTSamples(cfg.sft_data, tok, args.max_seq_len),
                   Batching(batch_size=cfg.batch_size, seed=0, mode="fixed", pad_multiple=64))
    for mode in cfg.sft_modes.split(","):
        data = base.with_mode(mode)
        real = [int((data.batch(s, 0)[0] != 0).sum()) for s in range(cfg.warmup + cfg.steps)]
        variant = parse_variant(cfg.sft_variant if base_rt.device.type == "cuda" else "fp32_eager")
        rt = dataclasses.replace(base_rt, dtype=variant.dtype)
        _, run, opt, scaler = build(args, rt, variant)
        with step_context(variant):
            r = time_steps(run, opt, scaler, DeviceBatches(data, 0, 1, rt.device), rt, cfg.steps, cfg.warmup)
        emit({"bench": "sft", "mode": mode, "real_tokens_per_s": sum(real[cfg.warmup:]) / r["seconds"],
              "variant": cfg.sft_variant, "nonpad_fraction": data.nonpad_fraction(), **r})


@torch.no_grad()
def measure_generation(model, batch_size: int, prompt_len: int, new_tokens: int, use_cache: bool,
                       device, dtype: str = "auto", seed: int = 0, warmup: bool = True,
                       compile: Optional[bool] = None) -> dict:
    """New tokens per second of generate.generate on random prompts, sampling (temperature 1), never stopping early.

    compile: decode steps through torch.compile + CUDA graphs (generate(compile=True)); None = on CUDA
    with the KV cache. Its compilation happens in the warm-up, which therefore must stay on to time it.
    Returns {"batch_size", "prompt_len", "new_tokens", "use_cache", "compile", "seconds", "tokens", "tokens_per_s"}."""
    device = torch.device(device)
    if compile is None:
        compile = device.type == "cuda" and use_cache
    dt = resolve_dtype(dtype, device)
    vocab = model.args.vocab_size
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(3, vocab, (batch_size, prompt_len), generator=g).tolist()  # skip pad/bos/eos
    gen = torch.Generator(device=device).manual_seed(seed)
    knobs = Sampling(max_new_tokens=new_tokens, temperature=1.0, no_repeat_ngram=0)
    kw = dict(eos_id=-1, use_cache=use_cache, generator=gen, compile=compile)  # eos -1: no stop
    if warmup:  # first CUDA calls pay for kernels and allocator growth
        with autocast(device, dt):
            generate(model, prompts, dataclasses.replace(knobs, max_new_tokens=min(8, new_tokens)), **kw)
    sync(device)
    t0 = time.perf_counter()
    with autocast(device, dt):
        outs = generate(model, prompts, knobs, **kw)
    sync(device)
    seconds = time.perf_counter() - t0
    tokens = sum(len(o) for o in outs)
    return {"batch_size": batch_size, "prompt_len": prompt_len, "new_tokens": new_tokens, "use_cache": use_cache,
            "compile": compile, "seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds}


BEAM_CLASSES = (  # (class, words of the kernel names in it), first match wins
    ("attention over the KV cache", ("flash", "fmha", "attention", "sdpa", "cudnn")),
    ("matmul", ("gemm", "xmma", "cutlass", "nvjet", "wgmma", "sm90_", "sm80_", "cublas", "gemv")),
    ("log-softmax, top-k, sort", ("softmax", "topk", "sort", "radix", "scan", "bitonic")),
    ("gathers, copies, concatenation (KV rows, beams)", ("index", "gather", "scatter", "copy", "cat")),
    ("other elementwise and reductions", ("elementwise", "reduce", "triton_")),
)


def bench_beam(cfg: BenchConfig, rt, emit) -> None:
    """eval.py's default decoding (4 sampled starts x 8 beams, 3-gram ban) on random prompts of gen_prompt_len tokens
    that never end (no <eos>), gen_new_tokens each, with a random model at the config: seconds per batch of
    beam_questions questions, microseconds per row and step; on CUDA also one more batch under torch.profiler, its GPU
    time by kernel class (BEAM_CLASSES) against its wall time, which says whether the GPU or the host bounds it."""
    from torch.profiler import ProfilerActivity, profile
    model = Transformer(cfg.model_args()).to(rt.device).eval()
    dt = torch.bfloat16 if rt.device.type == "cuda" else torch.float32
    if rt.device.type == "cuda":
        model.cast_for_inference(dt)  # as eval.py loads it
    knobs = Sampling(max_new_tokens=cfg.gen_new_tokens, beams=EVAL_BEAMS, beam_prefix=8, temperature=0.8, top_p=0.9)
    gen = torch.Generator(device=rt.device).manual_seed(0)
    starts = 4  # eval.py's --candidates: each question decoded from 4 sampled starts

    def run(n: int) -> float:
        g = torch.Generator().manual_seed(n)
        prompts = torch.randint(3, cfg.vocab_size, (n, cfg.gen_prompt_len), generator=g).tolist()
        sync(rt.device)
        t0 = time.perf_counter()
        with autocast(rt.device, dt):
            beam_search(model, [p for p in prompts for _ in range(starts)], knobs, eos_id=-1, generator=gen)
        sync(rt.device)
        return time.perf_counter() - t0

    run(2)  # kernels and allocator warm
    for n in [int(q) for q in cfg.beam_questions.split(",")]:
        seconds = run(n)
        row_steps = n * starts * knobs.beams * (knobs.max_new_tokens - knobs.beam_prefix)
        r = {"bench": "beam", "questions": n, "rows": n * starts * knobs.beams, "seconds": seconds,
             "us_per_row_step": 1e6 * seconds / row_steps}
        if rt.device.type == "cuda":
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                wall = run(n)
            kernels = [(e.key, getattr(e, "self_device_time_total", 0) / 1e6) for e in prof.key_averages()]
            classes = by_class(kernels, BEAM_CLASSES)
            r.update(profiled_wall_s=wall, gpu_s=sum(sec for _, sec in kernels),
                     gpu_s_by_class={k: round(v, 3) for k, v in sorted(classes.items(), key=lambda kv: -kv[1])})
        emit(r)


def bench_gen(cfg: BenchConfig, rt, emit) -> None:
    model = Transformer(cfg.model_args()).to(rt.device).eval()
    if rt.device.type == "cuda":
        model.cast_for_inference(torch.bfloat16)  # as eval.py and chat.py load it
    for bs in [int(b) for b in cfg.gen_batches.split(",")]:
        for cache in ([True, False] if cfg.gen_no_cache else [True]):
            r = measure_generation(model, bs, cfg.gen_prompt_len, cfg.gen_new_tokens, cache, rt.device)
            emit({"bench": "gen", **r})


def bench_ckpt(cfg: BenchConfig, base_rt, emit) -> None:
    """Three saves as trainer.py makes them at an improving validation, each after a step: best.pt (the weights) and
    last.pt (+ AdamW moments) through babyllama.checkpoint.Checkpoints. loop_ms: what the training loop waits for
    (the weight check, the copies queued to pinned memory); write_s: until the background thread has both on disk."""
    from babyllama.checkpoint import Checkpoints
    from babyllama.train_log import Logger
    args, rt = cfg.model_args(), dataclasses.replace(base_rt, dtype=resolve_dtype("auto", base_rt.device))
    model, run, opt, scaler = build(args, rt, Variant(rt.dtype, ce_chunk=4096))
    batches = DeviceBatches(RandomTokens(args.vocab_size, cfg.batch_size, args.max_seq_len, rt.rank), 0, 1, rt.device)
    out = os.path.join(os.path.dirname(cfg.out) or ".", "ckpt_bench")
    os.makedirs(out, exist_ok=True)
    run_cfg = TrainConfig(out_dir=out, max_steps=100)
    ckpts = Checkpoints(run_cfg, rt, args, "pretrain", "", model, opt, scaler, cfg.batch_size, Logger(out, False, False),
                        None, run_cfg)
    for save in range(1, 4):
        train_step(run, opt, scaler, batches, 1, 3e-4, 1.0, rt)  # queued on the device, as in the loop
        t0 = time.perf_counter()
        ckpts.save(save, 3.0, 3.0, True)
        loop = time.perf_counter() - t0
        ckpts.writer.wait()
        mb = {f"{n}_mb": os.path.getsize(os.path.join(out, f"{n}.pt")) / 1e6 if rt.master else None for n in ("best", "last")}
        emit({"bench": "ckpt", "save": save, "loop_ms": 1000 * loop, "write_s": time.perf_counter() - t0, **mb})


def bench_data(cfg: BenchConfig, emit) -> None:
    """data_process.py end to end on one file, as a subprocess (its own timing line)."""
    out = os.path.join(os.path.dirname(cfg.out) or ".", "data_bench")
    cmd = [sys.executable, "data_process.py", "pretrain", f"--inputs={cfg.data_input}", f"--out_dir={out}",
           f"--num_workers={cfg.data_workers}", "--progress=false"] + ([f"--tokenizer={cfg.tokenizer}"] if cfg.tokenizer else [])
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    tokens = sum(json.load(open(os.path.join(out, f)))["tokens"] for f in os.listdir(out) if f.endswith(".json"))
    emit({"bench": "data", "input": cfg.data_input, "workers": cfg.data_workers, "seconds": seconds,
          "tokens": tokens, "tokens_per_s": tokens / seconds, "rc": r.returncode, "tail": r.stdout[-300:]})


def main() -> None:
    cfg = config_or_exit(BenchConfig)
    rt = setup_runtime(cfg.device, "float32")
    rows = []

    def emit(row: dict) -> None:
        row = {"device": torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else str(rt.device), **row}
        rows.append(row)
        if rt.master:
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)

    peak = matmul_peak_tflops(rt.device)
    if rt.master:
        print(f"bench: {cfg.model_args()} | micro-batch {cfg.batch_size} | {rt.world_size} process(es) | "
              f"measured bf16 matmul peak {f'{peak:.0f} TFLOP/s' if peak else 'n/a (no GPU: no MFU)'}", flush=True)
    whats = cfg.what.split(",")
    if "train" in whats:
        bench_train(cfg, rt, peak, emit)
    if "parity" in whats:
        bench_parity(cfg, rt, emit)
    if "sft" in whats:
        bench_sft(cfg, rt, emit)
    if "gen" in whats and rt.master:
        bench_gen(cfg, rt, emit)
    if "data" in whats and rt.master:
        bench_data(cfg, emit)
    if "ckpt" in whats:
        bench_ckpt(cfg, rt, emit)
    if "profile" in whats and rt.device.type == "cuda":
        bench_profile(cfg, rt, emit)
    if "beam" in whats and rt.master:
        bench_beam(cfg, rt, emit)
    if rt.master:
        os.makedirs(os.path.dirname(cfg.out) or ".", exist_ok=True)
        write_json(cfg.out, {"config": dataclasses.asdict(cfg), "matmul_peak_tflops": peak, "rows": rows})
        print(f"\n{'bench':<7}{'what':<40}{'tokens/s':>12}{'step ms':>9}{'peak GiB':>9}{'MFU':>7}")
        for r in [r for r in rows if r["bench"] not in ("ckpt", "profile", "beam")]:  # these: the JSON lines above
            what = r.get("mode") or r.get("variant") or (f"b{r.get('batch_size')} cache={r.get('use_cache')}" if r["bench"] == "gen" else "")
            tps = r.get("tokens_per_s") or r.get("real_tokens_per_s") or 0
            mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
            print(f"{r['bench']:<7}{what:<40}{tps:>12,.0f}{r.get('step_ms', 0):>9.1f}{r.get('peak_gib', 0):>9.2f}{mfu:>7}")
    if rt.world_size > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    with ctrl_c():  # one line, exit 130
        main()
