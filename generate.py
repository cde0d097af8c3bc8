"""Text generation for model.Transformer: sampling knobs, KV cache, and the two decoders.

Library module, no command line (eval.py and chat.py are the scripts):
  import generate
  knobs = generate.Sampling(max_new_tokens=32, temperature=0.7, top_p=0.9)   # the knobs eval.py and chat.py take
  generate.generate(model, [[5, 6, 7], [8, 9]], knobs)      # new tokens per prompt
  for tok in generate.stream(model, [5, 6, 7], knobs): ...  # one prompt, token by token
  generate.generate(model, prompts, knobs, compile=True)   # GPU: each decode step replays one CUDA graph
  generate.compile_decode(model, backend="aot_eager")      # choose the compiler (default: inductor + CUDA graphs)
  model, ckpt, path, tokenizer, device, dtype = generate.load_for_inference("out/sft", "", "auto", "auto")
The knobs travel as one Sampling object (eval.py's and chat.py's configs extend it; its defaults: greedy, 256 new
tokens, no repeated 3-gram); what is not a knob (eos_id, generator, use_cache, compile) is an argument of its own.
Beam search (Sampling.beams > 1) is in beam.py, candidate decoding (Sampling.candidates > 1) in rerank.py; both build
on this module, which imports neither.
Two decoders: decode_static (fixed shapes over a max_seq_len cache, one compiled step per token; used whenever
prompt + new tokens fit max_seq_len) and decode (growing cache, crops the context from the left; the reference).
Both give the same tokens. Only the model's public methods are used (hidden, logits, args); the compiled step and its
caches live here, keyed by the model, never on it.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from babyllama.checkpoint import check_checkpoint, checkpoint_file
from babyllama.errors import DataError, check
from babyllama.runtime import enable_tf32, resolve_device, resolve_dtype
from model import Transformer, load_model, model_from

MAX_BEAMS = 64  # beam search keeps beams x batch rows of KV cache: more would only exhaust memory
MAX_CANDIDATES = 64  # candidate decoding generates candidates x batch rows at once (rerank.py)
RERANK_RULES = ("mbr", "likelihood", "mbr_question", "pool")  # how rerank.py keeps one of the candidates
QUESTION_WEIGHT = 0.1  # rerank=mbr_question's default weight of the question's terms (rerank.question_bonus)
EVAL_BEAMS = 8  # eval.py decodes with beam search of 8 beams by default (docs/recipe.md: 8 beat 4 and greedy)


@dataclass
class Sampling:
    """How answers are decoded: the knobs eval.py and chat.py share (their configs extend this class), passed whole
    to generate(), stream(), beam.beam_search() and rerank.generate_best()."""
    max_new_tokens: int = 256  # tokens generated per answer at most (stops earlier at <eos>)
    temperature: float = 0.0  # 0 = greedy; > 0 samples
    top_k: int = 0  # sample from the k most likely tokens only; 0 = off
    top_p: float = 1.0  # nucleus sampling mass; 1.0 = off
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in prompt or answer; 1.0 = off
    no_repeat_ngram: int = 3  # >= 2: an answer never repeats one of its own n-grams of tokens (stops loops); 0 = off
    beams: int = 1  # > 1: beam search with this many beams (deterministic: temperature 0, top_k 0, top_p 1, repetition_penalty 1); 1 = off
    length_penalty: float = 1.0  # beam search ranks answers by sum of token log-probs / length ** this; > 0 favours longer answers
    candidates: int = 1  # > 1: sample this many answers, keep one (rerank.py; temperature > 0; beams 1, or beams > 1 with beam_prefix: K sampled starts); 1 = off
    rerank: str = "mbr"  # the one kept: mbr (most like the others, chrF) | likelihood (best mean token log-prob) | mbr_question (mbr + the question's terms) | pool (most like the answers to like questions in the fine-tuning data, + the question's terms)
    pool_answers: int = 16  # rerank=pool: the answers of this many most similar fine-tuning questions are the evidence
    pool_bias: float = 0.0  # rerank=pool with beams > 1: the beams favour the words those answers share, up to 3x this nats per token (rerank.AnswerPool.token_bias); 0 = off
    question_weight: float = QUESTION_WEIGHT  # rerank=mbr_question|pool: the most a candidate gains (on a 0-1 chrF scale) for sharing 10+ Chinese bigrams with the question
    pmi_weight: float = 0.0  # rerank=mbr|mbr_question|pool: + this x the nats per token the question saves the candidate (its PMI with the question: stock answers gain nothing); 0 = off
    pmi_tokens: int = 0  # pmi_weight > 0: the PMI of the answer's first this many tokens only (its opening: a stock opening gains nothing); 0 = the whole answer
    beam_prefix: int = 0  # > 0 with beams > 1: each answer's first this many tokens are sampled (temperature, top_k, top_p), then the beams continue them: answers that do not all open alike (beam.py); 0 = off

    def validate(self) -> None:
        check(self.max_new_tokens > 0, f"max_new_tokens must be > 0, got {self.max_new_tokens}")
        check(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        check(self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}")
        check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        check(self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        check(self.no_repeat_ngram == 0 or self.no_repeat_ngram >= 2,
              f"no_repeat_ngram must be 0 or >= 2, got {self.no_repeat_ngram}")
        check(1 <= self.beams <= MAX_BEAMS, f"beams must be in 1..{MAX_BEAMS} (1 = off), got {self.beams}")
        check(self.beam_prefix >= 0, f"beam_prefix must be >= 0, got {self.beam_prefix}")
        check(self.beam_prefix == 0 or (self.beams > 1 and self.temperature > 0),
              f"beam_prefix {self.beam_prefix}: samples the start of a beam search; needs --beams > 1 and "
              f"--temperature > 0 (got {self.beams}, {self.temperature})")
        check(self.beams == 1 or self.beam_prefix > 0 or (self.temperature == 0 and self.top_k == 0 and self.top_p == 1
                                                          and self.repetition_penalty == 1),
              f"beams {self.beams}: beam search is deterministic; to sample pass --beams=1, else --temperature=0 "
              f"--top_k=0 --top_p=1.0 --repetition_penalty=1.0 (got {self.temperature}, {self.top_k}, {self.top_p}, "
              f"{self.repetition_penalty})")
        check(math.isfinite(self.length_penalty), f"length_penalty must be a finite number, got {self.length_penalty}")
        k = self.candidates
        check(1 <= k <= MAX_CANDIDATES, f"candidates must be in 1..{MAX_CANDIDATES} (1 = off), got {k}")
        check(0 <= self.question_weight <= 1, f"question_weight must be in 0..1, got {self.question_weight}")
        check(self.rerank in RERANK_RULES, f"rerank must be {'|'.join(RERANK_RULES)}, got {self.rerank!r}")
        check(1 <= self.pool_answers <= 1000, f"pool_answers must be in 1..1000, got {self.pool_answers}")
        check(0 <= self.pmi_weight <= 10, f"pmi_weight must be in 0..10, got {self.pmi_weight}")
        check(0 <= self.pool_bias <= 5, f"pool_bias must be in 0..5 (nats per token over 3), got {self.pool_bias}")
        check(self.pmi_tokens >= 0, f"pmi_tokens must be >= 0 (0 = the whole answer), got {self.pmi_tokens}")
        check(k == 1 or self.beams == 1 or self.beam_prefix > 0, f"candidates {k} and beams {self.beams}: beam search "
              f"is deterministic, its candidates would be alike; pass --beams=1, --candidates=1 or --beam_prefix=N "
              f"(K sampled starts, each continued by the beams)")
        check(k == 1 or self.temperature > 0, f"candidates {k}: greedy decoding would give {k} identical answers; "
              f"sample with --temperature > 0 (e.g. --temperature=0.7)")

    def fit_context(self, max_seq_len: int) -> str:
        """Cuts max_new_tokens to half a context it would fill (the default 256 on a 128-token model) -> a note
        for the user, or "" when it fits."""
        if self.max_new_tokens < max_seq_len:
            return ""
        fitted = max(1, max_seq_len // 2)
        note = (f"note: --max_new_tokens {self.max_new_tokens} leaves no room for a prompt in this model's "
                f"{max_seq_len}-token context; using {fitted}")
        self.max_new_tokens = fitted
        return note

    def sampler(self) -> tuple:
        """(temperature, top_k, top_p, repetition_penalty) as sample_tokens takes them: top_k 0 and top_p 1.0 (off)
        become None."""
        return self.temperature, self.top_k or None, self.top_p if self.top_p < 1 else None, self.repetition_penalty

    def rule(self) -> str:
        """The rerank rule as the reports name it: "mbr_question", "mbr_question + PMI x 0.1 (first 8 tokens)"."""
        over = f" (first {self.pmi_tokens} tokens)" if self.pmi_tokens else ""
        pmi = f" + PMI x {self.pmi_weight:g}{over}" if self.pmi_weight and self.rerank != "likelihood" else ""
        lean = self.pool_bias and self.rerank == "pool" and self.beams > 1  # the beams lean to the pool's words
        return self.rerank + pmi + (f"; beams biased x {self.pool_bias:g} to the pool's words" if lean else "")

    def describe(self) -> str:
        if self.beams > 1:
            start = (f"the first {self.beam_prefix} tokens sampled at temperature {self.temperature}, top_k "
                     f"{self.top_k or 'off'}, top_p {self.top_p if self.top_p < 1 else 'off'}, then " if self.beam_prefix else "")
            kept = f", {self.candidates} starts per question, one kept by {self.rule()}" if self.candidates > 1 else ""
            return (f"beam search, {start}{self.beams} beams, length_penalty {self.length_penalty}, no_repeat_ngram "
                    f"{self.no_repeat_ngram or 'off'}, max_new_tokens {self.max_new_tokens}{kept}")
        pick = f"{self.candidates} sampled candidates kept by {self.rule()}, " if self.candidates > 1 else ""
        return (f"{pick}{'greedy' if self.temperature == 0 else f'sampling temperature {self.temperature}'}, top_k "
                f"{self.top_k or 'off'}, top_p {self.top_p if self.top_p < 1 else 'off'}, repetition_penalty "
                f"{self.repetition_penalty}, no_repeat_ngram {self.no_repeat_ngram or 'off'}, max_new_tokens "
                f"{self.max_new_tokens}")


def generate(model: Transformer, prompts: list[list[int]], sampling: Sampling, *, eos_id: Optional[int] = 2,
             use_cache: bool = True, generator: Optional[torch.Generator] = None,
             compile: bool = False) -> list[list[int]]:
    """New tokens for each prompt (eos excluded; a row stops at eos), at most sampling.max_new_tokens, chosen by its
    temperature, top_k, top_p, repetition_penalty and no_repeat_ngram (see decode); its beams and candidates are
    beam.py's and rerank.py's business, not read here.

    compile=True runs each decode step through torch.compile (CUDA graphs on a GPU, see compile_decode); the
    tokens are the same as without it. The GPU is asked for tokens only every 16 steps."""
    out: list[list[int]] = [[] for _ in prompts]
    for step in steps(model, prompts, sampling, eos_id=eos_id, use_cache=use_cache, generator=generator,
                      compile=compile, sync_every=16):
        for row, tok in enumerate(step):
            if tok is not None:
                out[row].append(tok)
    return out


def stream(model: Transformer, prompt: list[int], sampling: Sampling, *, eos_id: Optional[int] = 2,
           use_cache: bool = True, generator: Optional[torch.Generator] = None, compile: bool = False) -> Iterator[int]:
    """generate() for one prompt, yielding each new token id as soon as it is chosen (for chat)."""
    for step in steps(model, [prompt], sampling, eos_id=eos_id, use_cache=use_cache, generator=generator,
                      compile=compile, sync_every=1):
        if step[0] is not None:
            yield step[0]


class KVCache:
    """Preallocated keys/values per layer, each (B, n_kv_heads, max_len, head_dim).

    Buffers are made on the first write in the dtype the projections produce (bf16 under autocast), so the
    cache never mixes dtypes with the queries. Static shapes keep decoding free of reallocations.
    """

    def __init__(self, n_layers: int, max_len: int):
        self.max_len = max_len
        self.k: list[Optional[torch.Tensor]] = [None] * n_layers
        self.v: list[Optional[torch.Tensor]] = [None] * n_layers

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes k, v (B, n_kv, T, head_dim) at slots [start, start+T); returns slots [0, start+T)."""
        if self.k[layer] is None:
            shape = (k.size(0), k.size(1), self.max_len, k.size(3))
            self.k[layer] = k.new_zeros(shape)
            self.v[layer] = v.new_zeros(shape)
        end = start + k.size(2)
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def allocate(self, batch: int, n_kv: int, head_dim: int, dtype: torch.dtype, device, static: bool,
                 vocab_size: int) -> None:
        """Makes every layer's buffers now (zeros), and the decode state decode_step reads and updates in place:
        tok (B, 1) the token fed next, cur () its slot, pad (B,) each row's first real slot, out (B, max_len + 1)
        the chosen token of each slot, seen (B, vocab) ids already in each row, noise (B, vocab) Exp(1) draws,
        start () the slot of the first new token.
        static=True marks them all as fixed addresses for torch.compile, so a CUDA graph reads and writes them
        in place: nothing is copied in or out of the graph per token."""
        shape = (batch, n_kv, self.max_len, head_dim)
        for i in range(len(self.k)):
            self.k[i] = torch.zeros(shape, dtype=dtype, device=device)
            self.v[i] = torch.zeros(shape, dtype=dtype, device=device)
        self.tok = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.cur = torch.zeros((), dtype=torch.long, device=device)
        self.pad = torch.zeros(batch, dtype=torch.long, device=device)
        self.out = torch.zeros(batch, self.max_len + 1, dtype=torch.long, device=device)  # + the last, never fed
        self.seen = torch.zeros(batch, vocab_size, dtype=torch.bool, device=device)
        self.noise = torch.ones(batch, vocab_size, device=device)
        self.start = torch.zeros((), dtype=torch.long, device=device)  # slot of the first new token (no-repeat n-grams)
        if static:
            for t in (*self.k, *self.v, self.tok, self.cur, self.pad, self.out, self.seen, self.noise, self.start):
                torch._dynamo.mark_static_address(t)

    def fits(self, batch: int, n_kv: int, head_dim: int, dtype: torch.dtype, device) -> bool:
        k = self.k[0]
        return k is not None and k.shape == (batch, n_kv, self.max_len, head_dim) and k.dtype == dtype \
            and k.device == torch.device(device)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes k, v (B, n_kv, 1, head_dim) at slot (1,) long tensor; returns the whole buffers (B, n_kv, max_len,
        head_dim). The slot is a tensor and the result has a fixed shape, so a compiled step never recompiles."""
        self.k[layer].index_copy_(2, slot, k)
        self.v[layer].index_copy_(2, slot, v)
        return self.k[layer], self.v[layer]


def decode_attention_backends():
    """SDPA kernels for decoding: flash, memory-efficient or math, never cuDNN.

    Decoding passes an explicit mask; under bf16 SDPA would then pick cuDNN attention, which builds a plan per new
    shape (milliseconds of CPU each) and made eager decoding 6x slower. Scoped to the decode
    calls, so training keeps its kernels.
    """
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def check_generate_args(prompts, max_new_tokens, temperature, top_k, top_p, repetition_penalty, vocab_size,
                        no_repeat_ngram: int = 0) -> None:
    """One-line ValueError for prompts or knobs generate() cannot use."""
    if not prompts or not all(prompts):
        raise ValueError("generate: need at least one prompt and every prompt needs at least one token")
    bad = [t for p in prompts for t in p if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"generate: token id {bad[0]} outside [0, {vocab_size})")
    if no_repeat_ngram < 0 or no_repeat_ngram == 1:
        raise ValueError(f"generate: no_repeat_ngram must be 0 (off) or >= 2, got {no_repeat_ngram}")
    if max_new_tokens < 0 or temperature < 0 or repetition_penalty <= 0 or (top_k is not None and top_k < 1) \
            or (top_p is not None and not 0 < top_p <= 1):
        raise ValueError("generate: need max_new_tokens >= 0, temperature >= 0, repetition_penalty > 0, "
                         f"top_k >= 1, 0 < top_p <= 1; got {max_new_tokens}, {temperature}, "
                         f"{repetition_penalty}, {top_k}, {top_p}")


def ngram_ban(out: torch.Tensor, first, last, n: int, vocab_size: int) -> torch.Tensor:
    """Ids that would repeat an n-gram of the new tokens -> (B, vocab_size) bool.

    out (B, L) holds token ids by slot; the new tokens of every row are in slots [first, last] (ints, or () long
    tensors inside a compiled step). A token is banned for a row when its last n-1 new tokens already occurred,
    among the new tokens, followed by it. Fixed shapes and no host sync: capturable in a CUDA graph."""
    B, L = out.shape
    if L < n:  # shorter than one n-gram (a prompt of 1-2 tokens, first step): nothing can repeat yet
        return torch.zeros(B, vocab_size, dtype=torch.bool, device=out.device)
    win = out.unfold(1, n, 1)  # (B, W, n): window w covers slots w .. w+n-1
    w = torch.arange(win.size(1), device=out.device)  # (W,)
    tail_slots = (last - (n - 2) + torch.arange(n - 1, device=out.device)).clamp(min=0)  # (n-1,)
    tail = out.index_select(1, tail_slots)  # (B, n-1): the last n-1 new tokens
    # windows made of new tokens whose next token is already known; and at least n-1 new tokens to match
    usable = (w >= first) & (w + n - 1 <= last) & (last - first >= n - 2)  # (W,)
    match = (win[:, :, :n - 1] == tail[:, None, :]).all(-1) & usable  # (B, W)
    nxt = torch.where(match, win[:, :, n - 1], vocab_size)  # (B, W); vocab_size = nothing to ban
    banned = torch.zeros(B, vocab_size + 1, dtype=torch.bool, device=out.device).scatter_(1, nxt, True)
    return banned[:, :vocab_size]


def sample_tokens(logits, temperature: float, top_k: Optional[int], top_p: Optional[float], repetition_penalty: float,
                  seen: Optional[torch.Tensor], noise: Optional[torch.Tensor],
                  banned: Optional[torch.Tensor] = None) -> torch.Tensor:
    """logits (B, vocab_size) fp32 -> next ids (B,), all on the device (capturable in a CUDA graph).

    Repetition penalty (CTRL: positive logits / p, negative * p, over ids with seen (B, vocab) True), then
    temperature 0 = argmax, else softmax(logits / temperature) restricted to top_k and top_p, sampled as
    argmax(probs / noise) with noise (B, vocab) i.i.d. Exp(1): the smallest of Exp(1)/p_i is Exp(p_i)-distributed,
    so index i wins with probability p_i, as torch.multinomial would draw, without its host-side checks.
    banned (B, vocab) True: ids never chosen (no-repeat n-grams, see ngram_ban).
    """
    if banned is not None:
        logits = logits.masked_fill(banned, float("-inf"))
    if seen is not None:
        penalised = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already reach top_p; the best one always stays
        drop = cumsum_rows(probs) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    # a zero draw would make 0/0 = NaN, which argmax would pick: clamp to the smallest normal float
    return (probs / noise.clamp(min=torch.finfo(noise.dtype).tiny)).argmax(dim=-1)


def cumsum_rows(x: torch.Tensor, block: int = 256) -> torch.Tensor:
    """x.cumsum(-1) for x (B, V) as two short scans (within blocks of `block`, then over the block totals).

    Same sums up to float rounding; needed because torch.compile (inductor, torch 2.11) fails to generate code
    for the split scan it picks for 64K-long rows, which broke compiled top-p sampling on the GPU."""
    B, V = x.shape
    n = -(-V // block) * block
    within = F.pad(x, (0, n - V)).view(B, n // block, block).cumsum(-1)  # (B, blocks, block)
    totals = within[..., -1]  # (B, blocks)
    before = totals.cumsum(-1) - totals  # (B, blocks): the sum of all earlier blocks
    return (within + before[..., None]).view(B, n)[:, :V]


def steps(model: Transformer, prompts, sampling: Sampling, *, eos_id, use_cache: bool, generator, compile: bool,
          sync_every: int) -> Iterator[list[Optional[int]]]:
    """Picks the decoder: the static-shape one (decode_static) when the cache is on and prompt + new tokens
    fit max_seq_len (no context crop needed), else the general one (decode), which crops the context."""
    new = sampling.max_new_tokens
    check_generate_args(prompts, new, *sampling.sampler(), model.args.vocab_size, sampling.no_repeat_ngram)
    if use_cache and max(len(p) for p in prompts) + new - 1 <= model.args.max_seq_len:
        return decode_static(model, prompts, sampling, eos_id=eos_id, generator=generator, compile=compile,
                             sync_every=sync_every)
    return decode(model, prompts, sampling, eos_id=eos_id, use_cache=use_cache, generator=generator)


class _Compiled:
    """A model's compiled decode step and the static caches its CUDA graphs were recorded with."""

    def __init__(self, step):
        self.step = step
        self.caches: dict = {}  # (batch, n_kv, head_dim, dtype, device) -> KVCache, see static_cache


_COMPILED: "weakref.WeakKeyDictionary[Transformer, _Compiled]" = weakref.WeakKeyDictionary()


def compile_decode(model: Transformer, **compile_kwargs) -> None:
    """Makes generate/stream(compile=True) on `model` run each decode step as torch.compile(decode_step, ...).

    Default: fullgraph=True, dynamic=False, mode="reduce-overhead" (inductor + CUDA graphs: one graph replay
    per token instead of ~150 kernel launches). Pass e.g. backend="aot_eager" for a quick CPU check. One
    graph per (batch size, sampling knobs, dtype); generate(compile=True) calls this with the defaults if needed.
    """
    opts: dict = dict(fullgraph=True, dynamic=False)
    if "backend" not in compile_kwargs:
        opts["mode"] = "reduce-overhead"
    opts.update(compile_kwargs)
    _COMPILED[model] = _Compiled(torch.compile(decode_step, **opts))


def static_cache(model: Transformer, shape: tuple, compile: bool) -> KVCache:
    """The decode state for shape (batch, n_kv, head_dim, dtype, device), allocated (zeros). With compile, the
    compiled step's own cache of that shape is reused across calls: its graph is specialised to the addresses of
    static inputs (new buffers = recompile and re-record); one per shape so eval's last, smaller batch does not
    evict the others, at most 4 (the oldest goes)."""
    a = model.args
    if not compile:
        cache = KVCache(a.n_layers, a.max_seq_len)
        cache.allocate(shape[0], *shape[1:], static=False, vocab_size=a.vocab_size)
        return cache
    caches = _COMPILED[model].caches
    cache = caches.get(shape)
    if cache is None or not cache.fits(*shape):
        if len(caches) >= 4:  # bound the memory: drop the oldest shape
            caches.pop(next(iter(caches)))
        cache = KVCache(a.n_layers, a.max_seq_len)
        cache.allocate(shape[0], *shape[1:], static=True, vocab_size=a.vocab_size)
        caches[shape] = cache
    return cache


def decode_step(model: Transformer, cache: KVCache, temperature, top_k, top_p, repetition_penalty,
                no_repeat_ngram: int = 0) -> None:
    """One decode step with the same shapes every step, entirely on the device state of `cache` (see allocate).

    Feeds cache.tok (B, 1) at slot cache.cur (the same slot for every row: prompts are left-padded); row r attends
    to slots [pad[r], cur] of the whole cache buffer, its rotary position is cur - pad[r]. Marks tok as seen
    (repetition penalty), samples the next ids with cache.noise, writes them to cache.tok and to cache.out at slot
    cur + 1, and advances cur. No host sync, no branch on tensor values: capturable as one CUDA graph.
    """
    tok, cur, pad = cache.tok, cache.cur, cache.pad
    seen = cache.seen if repetition_penalty != 1.0 else None
    if seen is not None:
        seen.scatter_(1, tok, True)
    kj = torch.arange(cache.max_len, device=tok.device)[None, :]  # (1, max_len)
    mask = ((kj >= pad[:, None]) & (kj <= cur))[:, None, None, :]  # (B, 1, 1, max_len)
    pos = (cur - pad)[:, None]  # (B, 1)
    h = model.hidden(tok, pos, mask, cache, cur)
    logits = model.logits(h[:, -1, :]).float()  # (B, vocab_size)
    banned = ngram_ban(cache.out, cache.start, cur, no_repeat_ngram, logits.size(-1)) if no_repeat_ngram else None
    nxt = sample_tokens(logits, temperature, top_k, top_p, repetition_penalty, seen,
                        cache.noise if temperature != 0.0 else None, banned)  # (B,)
    cur.add_(1)
    tok.copy_(nxt[:, None])
    cache.out.index_copy_(1, cur.view(1), nxt[:, None])


def prompt_positions(pad: torch.Tensor, S: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary positions (B, S) and attention mask (B, 1, S, S) of left-padded prompts, pad (B,) slots per row: each
    row's positions start at 0 at its first real token; causal, no pad keys; a pad query sees itself only so its
    softmax stays finite (its output is unused)."""
    qi = torch.arange(S, device=pad.device)[None, :, None]  # (1, S, 1)
    kj = torch.arange(S, device=pad.device)[None, None, :]  # (1, 1, S)
    pad_w = pad[:, None, None]  # (B, 1, 1)
    mask = ((kj <= qi) & ((kj >= pad_w) | (kj == qi)))[:, None]  # (B, 1, S, S)
    pos = (qi[:, :, 0] - pad_w[:, :, 0]).clamp(min=0)  # (B, S)
    return pos, mask


@torch.no_grad()
def decode_static(model: Transformer, prompts, sampling: Sampling, *, eos_id, generator, compile: bool,
                  sync_every: int) -> Iterator[list[Optional[int]]]:
    """decode's results (same tokens, same per-step lists) with fixed shapes; needs prompt + new - 1 <= max_seq_len.

    The prompt runs as one eager forward (its own shapes) that fills the cache slots [0, S); then every token
    goes through decode_step (compiled when compile=True) over the whole max_seq_len cache. New tokens stay
    on the device (cache.out) and are copied to the host every sync_every steps (1 for stream), which is also
    when a batch whose rows all emitted eos stops; the steps run past an eos in between are discarded.
    """
    a, max_new_tokens, no_repeat_ngram = model.args, sampling.max_new_tokens, sampling.no_repeat_ngram
    temperature, top_k, top_p, repetition_penalty = sampling.sampler()
    if max_new_tokens == 0:
        return
    device, B, S = model.rope_cos.device, len(prompts), max(len(p) for p in prompts)
    rows = torch.zeros(B, S, dtype=torch.long)
    for row, p in enumerate(prompts):
        rows[row, S - len(p):] = torch.tensor(p, dtype=torch.long)
    prompt = rows.to(device)  # (B, S) left-padded
    pad = torch.tensor([S - len(p) for p in prompts], device=device)  # (B,) first real slot per row

    dt = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) \
        else model.tok_embeddings.weight.dtype  # what the k/v projections produce
    shape = (B, a.kv_heads, a.dim // a.n_heads, dt, device)
    step_fn = decode_step
    if compile:
        if model not in _COMPILED:
            compile_decode(model)
        step_fn = _COMPILED[model].step
    cache = static_cache(model, shape, compile)
    seen = None  # cache.seen (B, vocab_size): ids already in each row, for the repetition penalty
    if repetition_penalty != 1.0:
        ids = torch.zeros(B, a.vocab_size, dtype=torch.bool)
        for row, p in enumerate(prompts):
            ids[row, torch.tensor(p)] = True
        seen = cache.seen.copy_(ids)  # in place: the buffer's address is what the compiled step reads
    was_training = model.training
    model.eval()
    try:
        with decode_attention_backends():
            h = model.hidden(prompt, *prompt_positions(pad, S), cache, 0)
            logits = model.logits(h[:, -1, :]).float()  # (B, vocab_size)
            noise = None if temperature == 0.0 else cache.noise.exponential_(generator=generator)
            nxt = sample_tokens(logits, temperature, top_k, top_p, repetition_penalty, seen, noise)
        # the decode state, in place (fixed addresses): first new token at slot S, fed next at slot S
        cache.pad.copy_(pad)
        cache.cur.fill_(S)
        cache.start.fill_(S)
        cache.tok.copy_(nxt[:, None])
        cache.out[:, S] = nxt
        finished, flushed = [False] * B, 0
        for step in range(1, max_new_tokens + 1):
            if step % sync_every == 0 or step == max_new_tokens:
                block = cache.out[:, S + flushed:S + step].tolist()  # (B, k): the one host sync
                for j in range(step - flushed):
                    result: list[Optional[int]] = []
                    for row in range(B):
                        tok = block[row][j]
                        finished[row] = finished[row] or tok == eos_id
                        result.append(None if finished[row] else tok)
                    yield result
                    if all(finished):
                        return
                flushed = step
            if step == max_new_tokens:
                return
            if temperature != 0.0:  # Exp(1) noise from the caller's generator, outside any compiled graph
                cache.noise.exponential_(generator=generator)
            if compile:
                torch.compiler.cudagraph_mark_step_begin()
            step_fn(model, cache, temperature, top_k, top_p, repetition_penalty, no_repeat_ngram)
    finally:
        model.train(was_training)


@torch.inference_mode()
def decode(model: Transformer, prompts, sampling: Sampling, *, eos_id, use_cache: bool,
           generator) -> Iterator[list[Optional[int]]]:
    """Yields, per step, one token per row (None once the row has emitted eos). Runs in eval mode.

    Prompts are left-padded to a common length; pad slots are masked out of attention and each row's
    rotary positions start at 0 at its first real token, so a row's result equals generating it alone.
    Context window: a forward never sees more than max_seq_len tokens. When the sequence outgrows it,
    the context is cropped from the left (keeping enough room that at most one more crop is needed,
    and at least max_seq_len // 2 tokens), and the cache is refilled from the cropped context; the
    no-cache path crops identically, so both give the same tokens. Rows of a batch share the crop,
    so after a crop a short row may see less history than it would alone.
    The knobs of `sampling`: repetition penalty (CTRL: positive logits / p, negative * p, over ids already in
    the row), then temperature 0 = argmax, else softmax(logits / temperature) restricted to top_k and top_p;
    no_repeat_ngram >= 2 never lets a row repeat an n-gram of its new tokens (the prompt may be quoted).
    generator must live on the model's device (torch.Generator(device="cuda") on a GPU).
    """
    a, max_new_tokens, no_repeat_ngram = model.args, sampling.max_new_tokens, sampling.no_repeat_ngram
    temperature, top_k, top_p, repetition_penalty = sampling.sampler()
    check_generate_args(prompts, max_new_tokens, temperature, top_k, top_p, repetition_penalty, a.vocab_size,
                        no_repeat_ngram)
    device, L, B = model.rope_cos.device, a.max_seq_len, len(prompts)
    S = max(len(p) for p in prompts)
    seq = torch.zeros(B, S + max_new_tokens, dtype=torch.long, device=device)  # (B, total) left-padded
    for row, p in enumerate(prompts):
        seq[row, S - len(p):S] = torch.tensor(p, dtype=torch.long)
    pad = torch.tensor([S - len(p) for p in prompts], device=device)  # (B,) pad slots per row
    seen = None  # (B, vocab_size) ids already in each row, for the repetition penalty
    if repetition_penalty != 1.0:
        seen = torch.zeros(B, a.vocab_size, dtype=torch.bool, device=device)
        for row, p in enumerate(prompts):
            seen[row, torch.tensor(p, device=device)] = True
    finished = [False] * B
    n, ctx, cache = S, 0, None  # tokens so far, first slot of the context window, KV cache
    was_training = model.training
    model.eval()
    try:
        for step in range(max_new_tokens):
            if n - ctx > L:
                forwards_left = max_new_tokens - step  # this one and the rest, each adds one token
                ctx, cache = n - max(L - (forwards_left - 1), L // 2, 1), None
            q0 = n - 1 if (use_cache and cache is not None) else ctx  # first query slot of this forward
            if use_cache and cache is None:
                cache = KVCache(a.n_layers, min(L, S + max_new_tokens - 1 - ctx))
            # window coordinates: slot s of seq is s - ctx; a row's real tokens start at pad_w
            pad_w = (pad - ctx).clamp(min=0)[:, None, None]  # (B, 1, 1)
            qi = torch.arange(q0 - ctx, n - ctx, device=device)[None, :, None]  # (1, Tq, 1)
            kj = torch.arange(0, n - ctx, device=device)[None, None, :]  # (1, 1, Tk)
            # causal, no pad keys; a pad query sees itself only so its softmax stays finite (its output is unused)
            mask = ((kj <= qi) & ((kj >= pad_w) | (kj == qi)))[:, None]  # (B, 1, Tq, Tk)
            pos = (qi[:, :, 0] - pad_w[:, :, 0]).clamp(min=0)  # (B, Tq)
            with decode_attention_backends():
                h = model.hidden(seq[:, q0:n], pos, mask, cache if use_cache else None, q0 - ctx)
            logits = model.logits(h[:, -1, :]).float()  # (B, vocab_size)
            banned = ngram_ban(seq[:, :n], S, n - 1, no_repeat_ngram, a.vocab_size) if no_repeat_ngram else None
            nxt = sample(logits, temperature, top_k, top_p, repetition_penalty, seen, generator, banned)
            seq[:, n] = nxt
            n += 1
            if seen is not None:
                seen[torch.arange(B, device=device), nxt] = True
            result: list[Optional[int]] = []
            for row, tok in enumerate(nxt.tolist()):
                finished[row] = finished[row] or tok == eos_id
                result.append(None if finished[row] else tok)
            yield result
            if all(finished):
                return
    finally:
        model.train(was_training)


def sample(logits, temperature, top_k, top_p, repetition_penalty, seen, generator, banned=None) -> torch.Tensor:
    """logits (B, vocab_size) fp32 -> next ids (B,); draws the noise for sample_tokens from generator."""
    noise = None if temperature == 0.0 else torch.empty_like(logits).exponential_(generator=generator)
    return sample_tokens(logits, temperature, top_k, top_p, repetition_penalty, seen, noise, banned)


def load_weights(ckpt: str, device: torch.device) -> tuple:
    """--ckpt (a checkpoint file, a run folder: its best.pt, else last.pt, or hf:FOLDER: a Hugging Face Llama folder)
    -> (model in eval mode on `device`, checkpoint dict, its path); a DataError names what is missing or wrong."""
    if ckpt.startswith("hf:"):
        from hf_llama import load_init
        saved = load_init(ckpt, "--ckpt")
        return model_from(saved, ckpt).to(device).eval(), saved, ckpt
    try:
        path = checkpoint_file(ckpt)
    except FileNotFoundError as e:
        raise DataError(f"--ckpt {e} (train first, or pass --ckpt=FILE or hf:FOLDER)") from None
    try:
        model, saved = load_model(path, device=str(device))
    except (ValueError, OSError) as e:
        raise DataError(str(e)) from None
    return model, saved, path


def load_for_inference(ckpt: str, tokenizer_path: str, device_name: str, dtype_name: str) -> tuple:
    """What eval.py, chat.py and export.py start from -> (model, ckpt dict, ckpt path, tokenizer, device, dtype). The
    tokenizer: tokenizer_path (--tokenizer), else the model's own (an hf: folder's, or the one the checkpoint was
    trained with where it is at hand), else the default lookup. Bad input (no tokenizer, no checkpoint, a checkpoint
    of another vocabulary or tokenizer) is a DataError."""
    from chatglm_tokenizer import load_tokenizer

    device = resolve_device(device_name)
    dtype = resolve_dtype(dtype_name, device)
    enable_tf32(device)
    from hf_llama import model_tokenizer  # hf_llama imports model.py only: no cycle
    model, saved, ckpt_path = load_weights(ckpt, device)
    try:
        tokenizer = load_tokenizer(tokenizer_path or model_tokenizer(ckpt, saved) or None)
    except FileNotFoundError as e:
        raise DataError(str(e)) from None
    check_checkpoint(saved, tokenizer, ckpt_path)
    if device.type == "cuda" and dtype == torch.bfloat16:
        model.cast_for_inference(dtype)  # bf16 weights: decoding never re-casts them (see model.cast_for_inference)
    return model, saved, ckpt_path, tokenizer, device, dtype
