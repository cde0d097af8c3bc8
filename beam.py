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

Speed (eval.py decodes thousands of beam rows at once on a GPU): a step ranks and chooses the candidates on the
device (choose) and brings the host one small table (to_host), from which it files the finished answers and
decides which prompts are done; the KV cache is never copied whole. A prompt's keys and values are stored once for
its K beams (SharedPromptCache), so a step reads them once per prompt, not once per row. A beam that continues another
row's beam takes only the answer slots where the two rows' tokens differ (first_change), and the rows
of a finished prompt are refilled with those of the last prompts still searching (Rows.advance) rather than every
later row moving up. Each step runs the rows the one-copy-per-step algorithm ran, the prompts in another order; a
row's numbers do not depend on where in the batch it sits, so the answers are the same.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import numpy as np
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


def choose(scores: torch.Tensor, logp: torch.Tensor, beams: int, eos_id: Optional[int]) -> tuple:
    """A step's candidates ranked and chosen on the device, A prompts of K = beams rows each.

    scores (A*K,) fp32 summed log-probs of the beams, logp (A*K, V) fp32 (overwritten with scores + logp) -> top_v
    (A, 2K) the 2K best candidates of each prompt's K x V, best first, as topk ranks them (ties included); beam
    (A, 2K) the beam of its group each extends; tok (A, 2K) its token; eos (A, 2K) tok == eos_id; go (A, K) the
    ranks of the first K candidates that are not <eos>, in rank order: the beams that continue. At most K of the
    2K are <eos> (one per beam), so there are always K to continue."""
    K, V = beams, logp.size(1)
    A = logp.size(0) // K
    cand = logp.add_(scores[:, None]).view(A, K * V)  # (A, K*V): beam k's token v at k * V + v
    top_v, top_i = cand.topk(min(2 * K, K * V), dim=1)  # (A, 2K)
    beam, tok = top_i // V, top_i % V
    eos = tok == eos_id if eos_id is not None else torch.zeros_like(tok, dtype=torch.bool)
    cont = ~eos & ((~eos).cumsum(1) <= K)  # (A, 2K): the first K that are not eos
    go = (~cont).to(torch.int32).argsort(dim=1, stable=True)[:, :K]  # (A, K): their ranks, in order
    return top_v, beam, tok, eos, go


def first_change(seq: torch.Tensor, src: torch.Tensor, S: int, n: int) -> torch.Tensor:
    """(R,) the first slot of [S, n) where row r's tokens differ from row src[r]'s, n where they do not; seq (R, S +
    new) ids by slot, src (R,) rows. A cache slot holds the keys and values of the tokens up to it, so rows with the
    same tokens before slot s have the same slots before s: a row that continues row src[r] only needs the slots
    from here on (the prompt slots [0, S) are the same for every beam of a prompt)."""
    if n == S:
        return torch.full((seq.size(0),), n, device=seq.device)
    diff = seq[:, S:n] != seq[src, S:n]  # (R, n - S)
    return torch.where(diff.any(1), S + diff.int().argmax(1), n)  # argmax: the first True


def to_host(top_v: torch.Tensor, beam: torch.Tensor, eos: torch.Tensor, ch_v: torch.Tensor, ch_b: torch.Tensor,
            first: torch.Tensor) -> tuple:
    """The step's one host sync, (A, 1 + 4K) float64 (exact for fp32 scores and small ints) -> numpy (best (A,) the
    best continuing beam's summed log-prob, fin (A, K) the summed log-prob of each <eos> among the first K ranks
    (nan: not eos), fin_b (A, K) the beam each of those ends, ch_b (A, K) the beam each continuing one extends,
    first (A, K) first_change of each new row)."""
    K = ch_v.size(1)
    fin = top_v[:, :K].masked_fill(~eos[:, :K], math.nan)
    parts = (ch_v[:, :1], fin, beam[:, :K], ch_b, first.view(-1, K))
    h = torch.cat([p.double() for p in parts], 1).cpu().numpy()
    ints = h[:, 1 + K:].astype(np.int64)
    return h[:, 0], h[:, 1:1 + K], ints[:, :K], ints[:, K:2 * K], ints[:, 2 * K:]


def file_answers(hyps: list[Hypotheses], worst: np.ndarray, prompt: np.ndarray, rows: np.ndarray, vals: np.ndarray,
                 seq: torch.Tensor, S: int, n: int, length: int, last_tok: Optional[np.ndarray] = None) -> None:
    """Finished answers, added in order: answer i, of prompt prompt[i], has summed log-prob vals[i] and the tokens of
    row rows[i] (seq[rows[i], S:n], then last_tok[i] if given). worst (B,) float64, updated: the score of a prompt's
    K-th answer once it holds K, else nan. An answer that scores no better than that K-th is skipped unread (adding
    it would change nothing: a tie goes to the earlier answer), as is one of -inf."""
    score = vals / (length ** hyps[0].length_penalty) if len(vals) else vals
    useful = (vals > -math.inf) & ~(score <= worst[prompt])  # nan worst (fewer than K answers): useful
    prompt, rows, vals = prompt[useful], rows[useful], vals[useful]
    if not len(rows):
        return
    toks = seq[torch.from_numpy(rows).to(seq.device), S:n].tolist()
    if last_tok is not None:
        toks = [ts + [int(x)] for ts, x in zip(toks, last_tok[useful])]
    for b, v, ts in zip(prompt.tolist(), vals.tolist(), toks):
        hyps[b].add(v, ts, length)
    for b in set(prompt.tolist()):
        if len(hyps[b].items) == hyps[b].beams:
            worst[b] = hyps[b].items[-1][0]


def copy_slots(buf: torch.Tensor, tgt: np.ndarray, src: np.ndarray, beg: np.ndarray, n: int) -> None:
    """For each i, slots [beg[i], n) of row tgt[i] <- the same slots of row src[i] in buf (..., rows, n_kv, max_len,
    head_dim), for every index of its leading dims (all layers' keys and values in one buffer: one gather and one
    scatter a step, not one per layer). Read before written, so a row may be a source and a target. The bytes move
    as int64 where a head's vector allows (128 bytes of bf16 as 16 copies, not 64): fewer index computations."""
    lens = n - beg
    total = int(lens.sum())
    if total == 0:
        return
    shift = beg - (np.cumsum(lens) - lens)  # pair p of row i is slot p + shift[i]
    cols = torch.from_numpy(np.stack([tgt, src, shift, lens])).to(buf.device)  # (4, rows copied)
    each = [c.repeat_interleave(cols[3], output_size=total) for c in cols[:3]]  # (total,) each
    ri, rs, si = each[0], each[1], torch.arange(total, device=cols.device) + each[2]
    if buf.size(-1) * buf.element_size() % 8 == 0:
        buf = buf.view(torch.int64)  # (..., rows, n_kv, max_len, head_dim * itemsize / 8): the same bytes
    buf[..., ri, :, si, :] = buf[..., rs, :, si, :]  # (total, leading dims..., n_kv, last dim)


class SharedPromptCache:
    """The beam rows' keys and values with each prompt's stored once for its K beams (model.Attention calls attend).

    Every beam of a prompt has the same prompt slots, so they are kept once per prompt: pk / pv[layer] (A, n_kv, S,
    head_dim) with pad (A, 1, 1, S) True on its left padding, while each row keeps only its answer's slots, k /
    v[layer] (A*K, n_kv, new, head_dim), answer token i at slot i (cache slot S + i). A decode step then reads a
    prompt's keys once for its K rows instead of K times. The lists hold views of the first A prompts of buffers
    made for all B, every layer's keys and values in one (prompt_kv, kv; a step moves slots with one gather and one
    scatter, not one per layer): a prompt that is done shrinks them (keep)."""

    def __init__(self, prompt: KVCache, pad: torch.Tensor, beams: int, new: int):
        self.K, self.S, L = beams, prompt.max_len, len(prompt.k)
        # prompt slots, [layer] keys and [n_layers + layer] values: (2 n_layers, B, n_kv, S, head_dim)
        self.prompt_kv = torch.stack(list(prompt.k) + list(prompt.v))
        _, B, n_kv, S, head_dim = self.prompt_kv.shape
        # answer slots, the same order: (2 n_layers, B*K, n_kv, new, head_dim)
        self.kv = self.prompt_kv.new_zeros(2 * L, B * beams, n_kv, new, head_dim)
        self.pad_buf = (torch.arange(S, device=pad.device)[None, :] < pad[:, None])[:, None, None, :]  # (B, 1, 1, S)
        self.ninf = torch.full((1,), -math.inf, device=pad.device)  # fp32: where() with it gives fp32 scores
        self.keep(B)

    def keep(self, A: int) -> None:
        """The views of the first A prompts (A*K rows)."""
        L = self.kv.size(0) // 2
        pkv, kv = self.prompt_kv[:, :A].unbind(0), self.kv[:, :A * self.K].unbind(0)
        self.pk, self.pv, self.k, self.v = pkv[:L], pkv[L:], kv[:L], kv[L:]
        self.pad = self.pad_buf[:A]

    def move(self, tgt: np.ndarray, src: np.ndarray, beg: np.ndarray, n: int, holes: np.ndarray,
             moved: np.ndarray) -> None:
        """Row tgt[i] takes cache slots [beg[i], n) of row src[i] (beg >= S: answer slots only; < S: from its
        first answer slot), and prompt holes[j] the prompt slots and pad of prompt moved[j]."""
        copy_slots(self.kv, tgt, src, np.maximum(beg - self.S, 0), n - self.S)
        if holes.size:
            h, m = (torch.from_numpy(x).to(self.pad_buf.device) for x in (holes, moved))
            self.prompt_kv[:, h] = self.prompt_kv[:, m]
            self.pad_buf[h] = self.pad_buf[m]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n: int) -> torch.Tensor:
        """q (R, heads, 1, head_dim) of the token at cache slot n, k / v (R, n_kv, 1, head_dim) its key and value
        (written here) -> attention over the row's real prompt slots and its answer slots [S, n], (R, heads, 1,
        head_dim). One fp32 softmax over both parts' scores; a prompt's K rows (x the g heads sharing a key head)
        are the K*g queries of one matmul against its keys. Few, large kernels: a step runs thousands of rows."""
        t, K, S = n - self.S, self.K, self.S
        kt, vt, pk, pv = self.k[layer], self.v[layer], self.pk[layer], self.pv[layer]
        kt[:, :, t], vt[:, :, t] = k[:, :, 0], v[:, :, 0]
        kt, vt = kt[:, :, :t + 1], vt[:, :, :t + 1]  # (R, n_kv, T, head_dim), T = t + 1 answer slots
        R, H, _, d = q.shape
        A, n_kv, T = R // K, kt.size(1), t + 1
        g = H // n_kv  # query heads per key head
        q = (q * d ** -0.5).view(A, K, n_kv, g, d)
        qp = q.transpose(1, 2).reshape(A, n_kv, K * g, d)  # a prompt's queries together
        sp = torch.where(self.pad, self.ninf, qp @ pk.transpose(-2, -1))  # (A, n_kv, K*g, S) fp32, pad slots -inf
        st = q.view(R, n_kv, g, d) @ kt.transpose(-2, -1)  # (R, n_kv, g, T)
        p = torch.cat((sp.view(A, n_kv, K, g, S), st.view(A, K, n_kv, g, T).transpose(1, 2)), -1).softmax(-1)
        pp = p[..., :S].to(pv.dtype).view(A, n_kv, K * g, S)  # (A, n_kv, K, g, S + T) fp32 -> prompt part
        pt = p[..., S:].transpose(1, 2).to(vt.dtype).contiguous()  # (A, K, n_kv, g, T): one copy either way
        y = (pt.view(R, n_kv, g, T) @ vt).view(A, K, n_kv, g, d)
        y += (pp @ pv).view(A, n_kv, K, g, d).transpose(1, 2)
        return y.view(R, H, 1, d)


class Rows:
    """The beam rows on the device: row j * K + k is beam k of the prompt at position j, prompt[j] (numpy (A,)).

    cache (SharedPromptCache) holds the first A prompts' slots in buffers made for all B (start): a prompt that
    is done shrinks the views, nothing is reallocated. seq (A*K, S + new) ids by slot, pad (A*K,) first real slot,
    scores (A*K,) fp32 summed log-probs (at first only beam 0 is alive, the others -inf, so the K beams differ)."""

    def __init__(self, cache: SharedPromptCache, seq: torch.Tensor, pad: torch.Tensor, beams: int):
        self.cache, self.seq, self.pad, self.K = cache, seq, pad, beams
        B = seq.size(0) // beams
        scores = torch.full((B, beams), -math.inf, device=seq.device)
        scores[:, 0] = 0.0
        self.scores, self.prompt = scores.view(-1), np.arange(B)

    def advance(self, done: np.ndarray, ch: tuple, ch_b: np.ndarray, first: np.ndarray, n: int) -> torch.Tensor:
        """Keeps the prompts not done (done (A,) bool), each with its K chosen beams -> the tokens to feed (A'*K, 1).

        ch: (summed log-probs, beams, tokens) (A, K) on the device; ch_b, first: to_host's. Row j*K + k of a prompt
        that keeps its position copies slots [first, n) from row j*K + beam; the first A' positions are kept, a
        done prompt among them is replaced by a kept prompt from behind (its prompt slots, and its rows' answer
        slots)."""
        K, device = self.K, self.seq.device
        kept = np.flatnonzero(~done)
        A2 = kept.size
        order = np.arange(A2)  # new position -> old position
        holes = np.flatnonzero(done[:A2])
        order[holes] = kept[kept >= A2]
        stay = np.ones(A2, dtype=bool)
        stay[holes] = False
        k, j, moved = np.arange(K), order[stay], order[holes]
        need = first[j] < n  # (stay, K): rows whose new beam's tokens differ from theirs
        tgt = np.concatenate([(j[:, None] * K + k)[need], (holes[:, None] * K + k).ravel()])
        src = np.concatenate([(j[:, None] * K + ch_b[j])[need], (moved[:, None] * K + ch_b[moved]).ravel()])
        beg = np.concatenate([first[j][need], np.zeros(holes.size * K, dtype=np.int64)])
        o = torch.from_numpy(order).to(device)
        self.cache.move(tgt, src, beg, n, holes, moved)
        self.cache.keep(A2)
        ch_v, beam, tok = (x.index_select(0, o) for x in ch)
        src_rows = (o[:, None] * K + beam).view(-1)  # (A'*K,) the row each new row continues
        self.seq, self.pad = self.seq.index_select(0, src_rows), self.pad.index_select(0, src_rows)
        self.seq[:, n] = tok.view(-1)
        self.scores, self.prompt = ch_v.reshape(-1), self.prompt[order]
        return tok.reshape(-1, 1)


def step_forward(model: Transformer, cache: SharedPromptCache, tok: torch.Tensor, pad: torch.Tensor,
                 n: int) -> torch.Tensor:
    """Feeds tok (R, 1) at slot n (rows left-padded, row r's first real slot pad[r]) -> log-probs (R, V) fp32."""
    pos = (n - pad)[:, None]  # (R, 1) rotary position: tokens since the row's first real one
    h = model.hidden(tok, pos, None, cache, n)  # cache.attend writes slot n, attends the real slots of [0, n]
    return torch.log_softmax(model.logits(h[:, -1, :]).float(), dim=-1)


def start(model: Transformer, prompts: list[list[int]], beams: int, max_new_tokens: int) -> tuple:
    """Runs the prompts once (B rows, left-padded to S); the beam rows are B x K, row b * K + k being beam k of
    prompt b -> (SharedPromptCache with each prompt's slots [0, S), seq (B*K, S + new) ids by slot, pad (B*K,) first
    real slot per row, log-probs (B*K, V) fp32 of the first new token, S)."""
    a, device, K = model.args, model.rope_cos.device, beams
    B, S = len(prompts), max(len(p) for p in prompts)
    rows = torch.zeros(B, S, dtype=torch.long)
    for b, p in enumerate(prompts):
        rows[b, S - len(p):] = torch.tensor(p, dtype=torch.long)
    prompt = rows.to(device)  # (B, S) left-padded
    pad = torch.tensor([S - len(p) for p in prompts], device=device)  # (B,) first real slot per prompt
    cache = KVCache(a.n_layers, S)
    with decode_attention_backends():
        h = model.hidden(prompt, *prompt_positions(pad, S), cache, 0)  # fills slots [0, S) of B rows
    logp = torch.log_softmax(model.logits(h[:, -1, :]).float(), dim=-1).repeat_interleave(K, 0)  # (B*K, V)
    shared = SharedPromptCache(cache, pad, K, max(max_new_tokens - 1, 1))  # the last new token is never fed
    seq = torch.zeros(B * K, S + max_new_tokens, dtype=torch.long, device=device)
    seq[:, :S] = prompt.repeat_interleave(K, 0)
    return shared, seq, pad.repeat_interleave(K), logp, S


@torch.inference_mode()
def beam_search(model: Transformer, prompts: list[list[int]], sampling: Sampling, *, eos_id: Optional[int] = 2,
                generator: Optional[torch.Generator] = None, bias: Optional[torch.Tensor] = None) -> list[list[int]]:
    """New tokens of the best beam-search answer for each prompt (eos excluded). Runs in eval mode, under the
    caller's autocast.

    The B prompts run once, then as B x K beam rows (K = sampling.beams; start, Rows). Each step scores every
    beam's next token (sum of fp32 log-softmax) and takes per prompt the 2K best of its K x V candidates (choose):
    an <eos> among the first K ranks becomes a finished answer (file_answers), the first K that are not <eos>
    continue, and the rows follow them (Rows.advance); a prompt that is done leaves the batch. At step 0 only beam
    0 is alive (the others start at -inf), so the K beams differ. A prompt is done when it holds K finished answers
    that its best alive beam cannot beat (Hypotheses.done's rule); at max_new_tokens the alive beams are finished as
    they are. no_repeat_ngram >= 2: no beam repeats an n-gram of its own new tokens (generate.ngram_ban; the prompt
    may be quoted). Context: a prompt keeps its last max_seq_len - max_new_tokens + 1 tokens (fit_prompts), so no
    forward sees more than max_seq_len tokens; max_new_tokens > max_seq_len is a ValueError. beams=1 gives greedy
    decoding's tokens (generate.generate with temperature 0). beam_prefix > 0: sampled_start (generator: its random
    numbers). bias: (len(prompts), V) fp32 on the model's device, added to the log-probs of every beam of that
    prompt at every step, so it counts in the beams' scores (rerank.AnswerPool.token_bias); None = none.
    """
    if sampling.beam_prefix > 0:
        return sampled_start(model, prompts, sampling, eos_id, generator, bias)
    a, max_new_tokens, beams = model.args, sampling.max_new_tokens, sampling.beams
    length_penalty, no_repeat_ngram = sampling.length_penalty, sampling.no_repeat_ngram
    check_generate_args(prompts, max_new_tokens, 0.0, None, None, 1.0, a.vocab_size, no_repeat_ngram)
    if beams < 1 or not math.isfinite(length_penalty):
        raise ValueError(f"beam_search: need beams >= 1 and a finite length_penalty; got {beams}, {length_penalty}")
    if max_new_tokens == 0:
        return [[] for _ in prompts]
    prompts = fit_prompts(prompts, max_new_tokens, a.max_seq_len)
    B, K, V = len(prompts), beams, a.vocab_size
    hyps = [Hypotheses(K, length_penalty) for _ in range(B)]
    worst = np.full(B, math.nan)  # per prompt: the score of its K-th answer once it holds K (file_answers)
    was_training = model.training
    model.eval()
    try:
        cache, seq, pad, logp, S = start(model, prompts, K, max_new_tokens)
        rows = Rows(cache, seq, pad, K)
        for t in range(max_new_tokens):
            n, length, A = S + t, t + 1, len(rows.prompt)  # slots filled, answer length with this token, prompts
            if bias is not None:  # (A*K, V) += each prompt's (V,) row, in place: no (A*K, V) copy
                logp.view(A, K, -1).add_(bias[torch.from_numpy(rows.prompt).to(bias.device)][:, None, :])
            if no_repeat_ngram:
                logp.masked_fill_(ngram_ban(rows.seq[:, :n], S, n - 1, no_repeat_ngram, V), -math.inf)
            top_v, beam, tok, eos, go = choose(rows.scores, logp, K, eos_id)
            ch = tuple(x.gather(1, go) for x in (top_v, beam, tok))  # (A, K) each: the beams that continue
            base = torch.arange(A, device=go.device)[:, None] * K
            first = first_change(rows.seq, (base + ch[1]).view(-1), S, n)
            best, fin, fin_b, ch_b, first = to_host(top_v, beam, eos, ch[0], ch[1], first)
            j, r = np.nonzero(~np.isnan(fin))  # row-major: a prompt's answers in rank order
            file_answers(hyps, worst, rows.prompt[j], j * K + fin_b[j, r], fin[j, r], rows.seq, S, n, length)
            if t == max_new_tokens - 1:  # out of room: the alive beams finish as they are
                vals, toks = ch[0].double().cpu().numpy().ravel(), ch[2].cpu().numpy().ravel()
                file_answers(hyps, worst, np.repeat(rows.prompt, K), (np.arange(A)[:, None] * K + ch_b).ravel(),
                             vals, rows.seq, S, n, length, toks)
                break
            done = worst[rows.prompt] >= best / (length ** length_penalty)  # nan (fewer than K answers): False
            if done.all():
                break
            logp = step_forward(model, rows.cache, rows.advance(done, ch, ch_b, first, n), rows.pad, n)  # (A'*K, V)
    finally:
        model.train(was_training)
    return [h.items[0][1] if h.items else [] for h in hyps]


def sampled_start(model: Transformer, prompts: list[list[int]], sampling: Sampling, eos_id: Optional[int],
                  generator: Optional[torch.Generator], bias: Optional[torch.Tensor] = None) -> list[list[int]]:
    """Beam search after a sampled start: each answer's first beam_prefix tokens come from generate.generate with
    the sampling knobs (temperature, top_k, top_p, repetition_penalty, no_repeat_ngram), then beam search continues
    each start that did not end, from prompt + start, for the tokens left (its n-gram ban covers the continuation;
    the start may be quoted, as the prompt may). A start that ended at <eos> is the whole answer. With 8 beams the
    answers keep beam search's BLEU within 0.1-0.4 and stop opening alike (docs/recipe.md). bias (beam_search's):
    the beams' only, the start is sampled from the model as it is."""
    n = min(sampling.beam_prefix, sampling.max_new_tokens)
    starts = generate(model, prompts, dataclasses.replace(sampling, max_new_tokens=n, beams=1, beam_prefix=0),
                      eos_id=eos_id, generator=generator)
    going = [i for i, start in enumerate(starts) if len(start) == n]  # shorter: the start ended at <eos>
    left = sampling.max_new_tokens - n
    if going and left > 0:
        rest = dataclasses.replace(sampling, max_new_tokens=left, beam_prefix=0)
        tails = beam_search(model, [list(prompts[i]) + starts[i] for i in going], rest, eos_id=eos_id,
                            bias=None if bias is None else bias[torch.tensor(going, device=bias.device)])
        for i, tail in zip(going, tails):
            starts[i] = starts[i] + tail
    return starts
