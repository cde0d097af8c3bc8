"""How eval.py cuts its questions into decode batches: sorted by length, as many in a batch as the GPU's memory holds.

Library module, no command line:
  from babyllama.batching import FREE_SHARE, generate_all, length_order, plan_batches
  order = length_order([len(p) for p in prompts])                   # prompt indices, shortest first
  sizes = plan_batches([len(prompts[i]) for i in order], rows=32, model_args=ma, max_new_tokens=256,
                       itemsize=2, budget=int(FREE_SHARE * free))       # e.g. [248, 202, 50]
  outputs, seconds = generate_all(beam.beam_search, model, prompts, sizes, sampling, {"eos_id": 2}, device, dtype)

Why: beam search's cache spans a batch's longest prompt (once per prompt) plus the new tokens (per row), not the whole
context, so planning by prompt + new tokens per row, an upper bound of that, fits more questions in the same memory, and prompts sorted by length keep the padding small. A
batch's decoding time follows its rows (each beam step reads every row's KV cache: bound by the GPU's memory), so
the plan is about fitting, not speed: docs/speed.md, "Decode batches".
"""
from __future__ import annotations

import itertools
import sys
import time
from typing import Callable, List, Optional, Sequence, Union

import torch
import torch.distributed as dist
from tqdm import tqdm

from babyllama.runtime import autocast_context as autocast, synchronize

FREE_SHARE = 0.5  # of the GPU's free memory planned for the decode state; the rest: top-k, KV-row copies, allocator slack


def fixed_batches(count: int, size: int) -> List[int]:
    """Sizes of batches of `size` over `count` prompts, the last one shorter."""
    return [min(size, count - s) for s in range(0, count, size)]


def length_order(lengths: Sequence[int], rank: int = 0, world: int = 1) -> List[int]:
    """Prompt indices sorted by length (stable), shortest first; under torchrun every world-th one from rank, so each
    process gets a like mix of lengths."""
    return sorted(range(len(lengths)), key=lambda i: lengths[i])[rank::world]


def prompt_bytes(rows: int, model_args: dict, length: int, max_new_tokens: Optional[int], itemsize: int) -> int:
    """Decode state of one prompt of `length` tokens decoded as `rows` rows (beams x candidates): each row's K and V
    over length + max_new_tokens slots, at most the context (an upper bound for beam.py's cache, which keeps the
    prompt's slots once for its beams; max_new_tokens None: the whole context, generate.py's static cache) in the
    activations' dtype (itemsize bytes), and four fp32 (rows, vocab) log-probs."""
    a = model_args
    n_kv, head_dim = a.get("n_kv_heads") or a["n_heads"], a["dim"] // a["n_heads"]
    slots = a["max_seq_len"] if max_new_tokens is None else min(a["max_seq_len"], length + max_new_tokens)
    return rows * (2 * a["n_layers"] * n_kv * head_dim * slots * itemsize + 4 * a["vocab_size"] * 4)


def plan_batches(lengths: Sequence[int], rows: int, model_args: dict, max_new_tokens: Optional[int], itemsize: int,
                 budget: int) -> List[int]:
    """Batch sizes over prompts of ascending `lengths`: each batch takes prompts while all of them, at the length of
    the last (the longest so far), fit `budget` bytes; never an empty batch. Sizes sum to len(lengths)."""
    sizes: List[int] = []
    n = 0
    for length in lengths:
        if n and (n + 1) * prompt_bytes(rows, model_args, length, max_new_tokens, itemsize) > budget:
            sizes.append(n)
            n = 0
        n += 1
    return sizes + [n] if n else sizes


@torch.no_grad()
def generate_all(decode: Callable, model, prompts: List[List[int]], batches: Union[int, List[int]], sampling,
                 gen_kwargs: dict, device: torch.device, dtype: torch.dtype, progress: bool = True,
                 shard: tuple = (0, 1)) -> tuple:
    """New-token lists for every prompt, in input order -> (outputs, seconds).

    batches: a batch size, or the sizes of the batches cut from the prompts sorted by length (length_order; the left
    padding inside a batch stays small; eval.batch_sizes plans them). A batch the GPU has no memory for is halved and
    tried again. decode: generate.generate, beam.beam_search or rerank.generate_best, called with the knobs
    (sampling) and gen_kwargs (the rest: eos_id, generator, ...). shard = (rank, world) under torchrun: this process
    answers every world-th prompt of that order (each rank a like mix of lengths) and every rank gets all outputs."""
    rank, world = shard
    order = length_order([len(p) for p in prompts], rank, world)
    sizes = fixed_batches(len(order), batches) if isinstance(batches, int) else batches
    if sum(sizes) != len(order) or min(sizes, default=1) < 1:
        raise ValueError(f"generate_all: batch sizes {sizes} do not cut {len(order)} prompts")
    ends = list(itertools.accumulate(sizes))
    todo = [order[e - n:e] for n, e in zip(sizes, ends)]
    outputs: List[Optional[List[int]]] = [None] * len(prompts)
    # closed on the way out (Ctrl-C too), so its last state is printed before the error's line, not after it
    with tqdm(total=len(order), desc="generating", unit="q", disable=not progress, file=sys.stderr) as bar:
        synchronize(device)
        t0 = time.perf_counter()
        while todo:
            idx = todo.pop(0)
            try:
                with autocast(device, dtype):
                    outs = decode(model, [prompts[i] for i in idx], sampling, **gen_kwargs)
            except torch.cuda.OutOfMemoryError:
                if len(idx) == 1:
                    raise
                torch.cuda.empty_cache()
                half = len(idx) // 2
                print(f"out of GPU memory decoding {len(idx)} prompts at once: two batches of {half} and "
                      f"{len(idx) - half}", file=sys.stderr)
                todo[:0] = [idx[:half], idx[half:]]
                continue
            for i, out in zip(idx, outs):
                outputs[i] = list(out)
            bar.update(len(idx))
    if world > 1:  # every rank's answers, in input order, on every rank
        parts: list = [None] * world
        dist.all_gather_object(parts, [(i, outputs[i]) for i in order])
        for i, out in itertools.chain.from_iterable(parts):
            outputs[i] = out
    synchronize(device)
    return outputs, time.perf_counter() - t0
