"""Beam search for model.Transformer: the deterministic decoder eval.py and chat.py use with --beams=K (K > 1).

Library module, no command line:
  import beam
  from generate import Sampling
  beam.beam_search(model, [[5, 6, 7], [8, 9]], Sampling(max_new_tokens=32, beams=4))   # new tokens per prompt
  beam.beam_search(model, prompts, Sampling(max_new_tokens=64, beams=4, length_penalty=0.6, no_repeat_ngram=0))
  python eval.py --beams=4 --length_penalty=1.0                            # the same from the command line
Of the Sampling knobs, beam search reads max_new_tokens, beams, length_penalty and no_repeat_ngram; temperature, top_k,
top_p and repetition_penalty only sample a start with beam_prefix > 0 (sampled_start; Sampling.validate requires them
off otherwise when beams > 1).
Each prompt keeps the K best partial answers (beams) by summed token log-probability; an answer that ends in <eos>
is scored sum_logprob / length ** length_penalty (length counts the new tokens, <eos> included, as Hugging Face
transformers does), and the best of those is returned. Uses only the model's public methods (hidden, logits, args)
and generate.py's cache, masks and n-gram ban; generate.py never imports this module.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

from generate import KVCache, Sampling, check_generate_args, decode_attention_backends, generate, ngram_ban, prompt_positions
from chatglm_tokenizer.template import fit_prompt
from model import Transformer


def fit_prompts(prompts: list[list[int]], max_new_tokens: int, max_seq_len: int) -> list[list[int]]:
    """Prompts cropped from the left so that prompt + max_new_tokens - 1 <= max_seq_len (the last new token is never
    fed to the model): a long prompt keeps its end, which for a chat prompt is the <bos> the answer follows."""
    if max_new_tokens > max_seq_len:
        raise ValueError(f"beam_search: max_new_tokens {max_new_tokens} does not fit the model's {max_seq_len}-token "
                         f"context")
    keep = max_seq_len - max_new_tokens + 1
    return [fit_prompt(p, keep) for p in prompts]


class Hypotheses:
    """The K best finished answers of one prompt: (score, new tokens without eos), best first."""

    def __init__(self, beams: int, length_penalty: float):
        self.beams, self.length_penalty = beams, length_penalty
        self.items: list[tuple[float, list[int]]] = []

    def score(self, sum_logprob: float, length: int) -> float:
        return sum_logprob / (length ** self.length_penalty)

    def add(self, sum_logprob: float, tokens: list[int], length: int) -> None:
        if sum_logprob == -math.inf:  # a candidate that only exists to fill the top-2K (nothing to rank)
            return
        self.items.append((self.score(sum_logprob, length), tokens))
        self.items.sort(key=lambda item: -item[0])  # stable: an earlier answer wins a tie
        del self.items[self.beams:]

    def done(self, best_alive: float, length: int) -> bool:
        """K answers, and the best alive beam, scored at its current length, cannot beat the worst of them (Hugging
        Face's early_stopping=False heuristic: exact for length_penalty <= 0, an estimate above)."""
        return len(self.items) == self.beams and self.items[-1][0] >= self.score(best_alive, length)


def select(top_v: list[float], top_i: list[int], base: int, vocab_size: int, eos_id: Optional[int], beams: int,
           hyps: Hypotheses, new_tokens, length: int) -> list[tuple[int, int, float]]:
    """One prompt's step: its 2K best candidates (summed log-prob, flat index origin * V + token) -> the K that
    continue as (row of origin, token, summed log-prob). An <eos> among the first K ranks becomes a finished answer
    (new_tokens(row) gives the origin's tokens so far); rows of this prompt are base .. base + K - 1."""
    chosen: list[tuple[int, int, float]] = []
    for rank, (v, i) in enumerate(zip(top_v, top_i)):
        row, tok = base + i // vocab_size, i % vocab_size
        if tok == eos_id:
            if rank < beams:
                hyps.add(v, new_tokens(row), length)
            continue
        chosen.append((row, tok, v))
        if len(chosen) == beams:
            break
    return chosen


def step_forward(model: Transformer, cache: KVCache, tok: torch.Tensor, pad: torch.Tensor, n: int) -> torch.Tensor:
    """Feeds tok (R, 1) at slot n (rows left-padded, row r's first real slot pad[r]) -> log-probs (R, V) fp32."""
    kj = torch.arange(n + 1, device=tok.device)[None, :]  # (1, n+1)
    mask = (kj >= pad[:, None])[:, None, None, :]  # (R, 1, 1, n+1): every filled slot but the pad
    pos = (n - pad)[:, None]  # (R, 1) rotary position: tokens since the row's first real one
    with decode_attention_backends():
        h = model.hidden(tok, pos, mask, cache, n)  # cache.update writes slot n, attends slots [0, n]
    return torch.log_softmax(model.logits(h[:, -1, :]).float(), dim=-1)


def start(model: Transformer, prompts: list[list[int]], beams: int, max_new_tokens: int) -> tuple:
    """Runs the prompts once (B rows, left-padded to S) and repeats the result to B x K beam rows, row b * K + k
    being beam k of prompt b -> (cache with slots [0, S) filled, seq (B*K, S + new) ids by slot, pad (B*K,) first
    real slot per row, log-probs (B*K, V) fp32 of the first new token, S)."""
    a, device, K = model.args, model.rope_cos.device, beams
    B, S = len(prompts), max(len(p) for p in prompts)
    rows = torch.zeros(B, S, dtype=torch.long)
    for b, p in enumerate(prompts):
        rows[b, S - len(p):] = torch.tensor(p, dtype=torch.long)
    prompt = rows.to(device)  # (B, S) left-padded
    pad = torch.tensor([S - len(p) for p in prompts], device=device)  # (B,) first real slot per prompt
    cache = KVCache(a.n_layers, S + max_new_tokens - 1)  # the last new token is never fed
    with decode_attention_backends():
        h = model.hidden(prompt, *prompt_positions(pad, S), cache, 0)  # fills slots [0, S) of B rows
    logp = torch.log_softmax(model.logits(h[:, -1, :]).float(), dim=-1).repeat_interleave(K, 0)  # (B*K, V)
    for layer in range(a.n_layers):  # (B, n_kv, S + new - 1, head_dim) -> (B*K, ...): the beams share a prompt
        cache.k[layer] = cache.k[layer].repeat_interleave(K, 0)
        cache.v[layer] = cache.v[layer].repeat_interleave(K, 0)
    seq = torch.zeros(B * K, S + max_new_tokens, dtype=torch.long, device=device)
    seq[:, :S] = prompt.repeat_interleave(K, 0)
    return cache, seq, pad.repeat_interleave(K), logp, S


@torch.inference_mode()
def beam_search(model: Transformer, prompts: list[list[int]], sampling: Sampling, *, eos_id: Optional[int] = 2,
                generator: Optional[torch.Generator] = None) -> list[list[int]]:
    """New tokens of the best beam-search answer for each prompt (eos excluded). Runs in eval mode, under the
    caller's autocast.

    The B prompts run once, then as B x K beam rows (K = sampling.beams; start). Each step scores every beam's next
    token (sum of fp32 log-softmax), takes per prompt the 2K best of its K x V candidates (select), and reorders the
    cache, the token history and the scores by the chosen beams' rows (index_select); a prompt that is done leaves
    the batch. At step 0 only beam 0 is alive (the others start at -inf), so the K beams differ. A prompt is done
    when it holds K finished answers that its best alive beam cannot beat (Hypotheses.done); at max_new_tokens the
    alive beams are finished as they are. no_repeat_ngram >= 2: no beam repeats an n-gram of its own new tokens
    (generate.ngram_ban; the prompt may be quoted). Context: a prompt keeps its last max_seq_len - max_new_tokens
    + 1 tokens (fit_prompts), so no forward sees more than max_seq_len tokens; max_new_tokens > max_seq_len is a
    ValueError. beams=1 gives greedy decoding's tokens (generate.generate with temperature 0). beam_prefix > 0:
    sampled_start (generator: its random numbers).
    """
    if sampling.beam_prefix > 0:
        return sampled_start(model, prompts, sampling, eos_id, generator)
    a, max_new_tokens, beams = model.args, sampling.max_new_tokens, sampling.beams
    length_penalty, no_repeat_ngram = sampling.length_penalty, sampling.no_repeat_ngram
    check_generate_args(prompts, max_new_tokens, 0.0, None, None, 1.0, a.vocab_size, no_repeat_ngram)
    if beams < 1 or not math.isfinite(length_penalty):
        raise ValueError(f"beam_search: need beams >= 1 and a finite length_penalty; got {beams}, {length_penalty}")
    if max_new_tokens == 0:
        return [[] for _ in prompts]
    prompts = fit_prompts(prompts, max_new_tokens, a.max_seq_len)
    device, B, K, V = model.rope_cos.device, len(prompts), beams, a.vocab_size
    hyps = [Hypotheses(K, length_penalty) for _ in range(B)]
    was_training = model.training
    model.eval()
    try:
        cache, seq, pad, logp, S = start(model, prompts, K, max_new_tokens)
        scores = torch.full((B, K), -math.inf, device=device)
        scores[:, 0] = 0.0
        scores = scores.view(-1)  # (R,) summed log-probs of the beams, R = active prompts x K rows
        active, n = list(range(B)), S  # prompts still searching (their rows, in order); slots filled
        for t in range(max_new_tokens):
            if no_repeat_ngram:
                logp = logp.masked_fill(ngram_ban(seq[:, :n], S, n - 1, no_repeat_ngram, V), -math.inf)
            cand = (scores[:, None] + logp).view(len(active), K * V)  # (A, K*V) per prompt: beam k's token v
            top_v, top_i = cand.topk(min(2 * K, K * V), dim=1)  # (A, 2K)
            top_v, top_i = top_v.tolist(), top_i.tolist()  # the one host sync of a step
            history = []  # lazily: seq[:, S:n] on the host, for the answers finished this step

            def new_tokens(row: int) -> list[int]:
                if not history:
                    history.append(seq[:, S:n].tolist())
                return history[0][row]

            src, toks, vals, still = [], [], [], []
            for j, b in enumerate(active):
                chosen = select(top_v[j], top_i[j], j * K, V, eos_id, K, hyps[b], new_tokens, t + 1)
                if t == max_new_tokens - 1:  # out of room: the alive beams finish as they are
                    for row, tok, v in chosen:
                        hyps[b].add(v, new_tokens(row) + [tok], t + 1)
                elif not hyps[b].done(chosen[0][2], t + 1):
                    still.append(b)
                    src += [row for row, _, _ in chosen]
                    toks += [tok for _, tok, _ in chosen]
                    vals += [v for _, _, v in chosen]
            if not still:
                break
            # the K chosen beams of every prompt still searching, in order: (R',) rows they continue
            idx = torch.tensor(src, device=device)
            tok = torch.tensor(toks, device=device)[:, None]  # (R', 1)
            for layer in range(a.n_layers):
                cache.k[layer] = cache.k[layer].index_select(0, idx)
                cache.v[layer] = cache.v[layer].index_select(0, idx)
            seq, pad = seq.index_select(0, idx), pad.index_select(0, idx)
            seq[:, n] = tok[:, 0]
            scores = torch.tensor(vals, device=device)  # (R',)
            active = still
            logp = step_forward(model, cache, tok, pad, n)  # (R', V)
            n += 1
    finally:
        model.train(was_training)
    return [h.items[0][1] if h.items else [] for h in hyps]


def sampled_start(model: Transformer, prompts: list[list[int]], sampling: Sampling, eos_id: Optional[int],
                  generator: Optional[torch.Generator]) -> list[list[int]]:
    """Beam search after a sampled start: each answer's first beam_prefix tokens come from generate.generate with
    the sampling knobs (temperature, top_k, top_p, repetition_penalty, no_repeat_ngram), then beam search continues
    each start that did not end, from prompt + start, for the tokens left (its n-gram ban covers the continuation;
    the start may be quoted, as the prompt may). A start that ended at <eos> is the whole answer. With 8 beams the
    answers keep beam search's BLEU within 0.1-0.4 and stop opening alike (docs/recipe.md)."""
    n = min(sampling.beam_prefix, sampling.max_new_tokens)
    starts = generate(model, prompts, dataclasses.replace(sampling, max_new_tokens=n, beams=1, beam_prefix=0),
                      eos_id=eos_id, generator=generator)
    going = [i for i, start in enumerate(starts) if len(start) == n]  # shorter: the start ended at <eos>
    left = sampling.max_new_tokens - n
    if going and left > 0:
        rest = dataclasses.replace(sampling, max_new_tokens=left, beam_prefix=0)
        tails = beam_search(model, [list(prompts[i]) + starts[i] for i in going], rest, eos_id=eos_id)
        for i, tail in zip(going, tails):
            starts[i] = starts[i] + tail
    return starts
