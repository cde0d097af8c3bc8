"""beam.py's device-side search gives exactly the answers of the plain algorithm it replaced: a copy of that algorithm
(one index_select of the whole KV cache and a Python pass over every prompt per step) is kept here as the reference,
and both run on a small random model over beams, prompt lengths, eos ids that end answers early or never, n-gram bans,
length penalties, answer lengths up to the whole context, and sampled starts.

Run: python -m pytest -q tests/test_beam_fast.py   (CPU, a few seconds; no tokenizer or data needed)
"""
import dataclasses
import math
import random

import numpy as np
import pytest
import torch

import beam
import generate
from generate import Sampling, ngram_ban
from model import ModelArgs, Transformer

torch.set_num_threads(1)

V, CONTEXT = 300, 32  # vocabulary and max_seq_len of the test model
EOS = 164  # small_model turns it towards the mean hidden state: answers end at <eos> after 0 to 20 tokens


class RefHypotheses:
    """The reference's K best finished answers of one prompt: (score, new tokens), best first."""

    def __init__(self, beams, length_penalty):
        self.beams, self.length_penalty, self.items = beams, length_penalty, []

    def score(self, sum_logprob, length):
        return sum_logprob / (length ** self.length_penalty)

    def add(self, sum_logprob, tokens, length):
        if sum_logprob == -math.inf:
            return
        self.items.append((self.score(sum_logprob, length), tokens))
        self.items.sort(key=lambda item: -item[0])  # stable: an earlier answer wins a tie
        del self.items[self.beams:]

    def done(self, best_alive, length):
        return len(self.items) == self.beams and self.items[-1][0] >= self.score(best_alive, length)


def ref_select(top_v, top_i, base, vocab_size, eos_id, beams, hyps, new_tokens, length):
    """One prompt's step: its 2K best candidates -> the K that continue as (row, token, summed log-prob); an <eos>
    among the first K ranks becomes a finished answer."""
    chosen = []
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


def ref_start(model, prompts, K, new):
    """The prompts run once, their cache repeated to K rows each: every beam row holds its own copy of its prompt's
    keys (a plain generate.KVCache over prompt + answer slots) -> (cache, seq, pad, log-probs, S)."""
    B, S = len(prompts), max(len(p) for p in prompts)
    rows = torch.zeros(B, S, dtype=torch.long)
    for b, p in enumerate(prompts):
        rows[b, S - len(p):] = torch.tensor(p)
    pad = torch.tensor([S - len(p) for p in prompts])
    cache = generate.KVCache(model.args.n_layers, S + new - 1)
    h = model.hidden(rows, *generate.prompt_positions(pad, S), cache, 0)
    logp = torch.log_softmax(model.logits(h[:, -1, :]).float(), dim=-1).repeat_interleave(K, 0)
    for layer in range(model.args.n_layers):
        cache.k[layer], cache.v[layer] = cache.k[layer].repeat_interleave(K, 0), cache.v[layer].repeat_interleave(K, 0)
    seq = torch.zeros(B * K, S + new, dtype=torch.long)
    seq[:, :S] = rows.repeat_interleave(K, 0)
    return cache, seq, pad.repeat_interleave(K), logp, S


def ref_step(model, cache, tok, pad, n):
    """tok (R, 1) fed at slot n over each row's own cache, attention by SDPA under a pad mask -> log-probs (R, V)."""
    mask = (torch.arange(n + 1)[None, :] >= pad[:, None])[:, None, None, :]
    h = model.hidden(tok, (n - pad)[:, None], mask, cache, n)
    return torch.log_softmax(model.logits(h[:, -1, :]).float(), dim=-1)


@torch.inference_mode()
def reference_beam_search(model, prompts, sampling, eos_id):
    """The plain algorithm (beam_prefix 0): every row copies the whole cache of the row it continues (ref_start,
    ref_step); beam.py's fit_prompts and generate.ngram_ban are shared."""
    K, lp, ngram, new = sampling.beams, sampling.length_penalty, sampling.no_repeat_ngram, sampling.max_new_tokens
    V = model.args.vocab_size
    prompts = beam.fit_prompts(prompts, new, model.args.max_seq_len)
    hyps = [RefHypotheses(K, lp) for _ in prompts]
    cache, seq, pad, logp, S = ref_start(model, prompts, K, new)
    scores = torch.full((len(prompts), K), -math.inf)
    scores[:, 0] = 0.0
    scores, active, n = scores.view(-1), list(range(len(prompts))), S
    for t in range(new):
        if ngram:
            logp = logp.masked_fill(ngram_ban(seq[:, :n], S, n - 1, ngram, V), -math.inf)
        top_v, top_i = (scores[:, None] + logp).view(len(active), K * V).topk(min(2 * K, K * V), dim=1)
        top_v, top_i, history = top_v.tolist(), top_i.tolist(), seq[:, S:n].tolist()
        src, toks, vals, still = [], [], [], []
        for j, b in enumerate(active):
            chosen = ref_select(top_v[j], top_i[j], j * K, V, eos_id, K, hyps[b], history.__getitem__, t + 1)
            if t == new - 1:
                for row, tok, v in chosen:
                    hyps[b].add(v, history[row] + [tok], t + 1)
            elif not hyps[b].done(chosen[0][2], t + 1):
                still.append(b)
                src += [row for row, _, _ in chosen]
                toks += [tok for _, tok, _ in chosen]
                vals += [v for _, _, v in chosen]
        if not still:
            break
        idx, tok = torch.tensor(src), torch.tensor(toks)[:, None]
        for layer in range(model.args.n_layers):
            cache.k[layer], cache.v[layer] = cache.k[layer].index_select(0, idx), cache.v[layer].index_select(0, idx)
        seq, pad = seq.index_select(0, idx), pad.index_select(0, idx)
        seq[:, n] = tok[:, 0]
        scores, active = torch.tensor(vals), still
        logp = ref_step(model, cache, tok, pad, n)
        n += 1
    return [h.items[0][1] if h.items else [] for h in hyps]


def small_model(seed=0, vocab_size=V, n_kv_heads=None):
    """A random 2-layer model whose next token depends on the whole context (unit-gain matrices, strong residual
    branches: at plain init the embedding dominates and every answer would repeat the prompt's last token), and
    whose <eos> (EOS) is likely at many steps: its (tied) embedding row points 0.8 of the way along the mean hidden
    state, so beams end at different steps, some at once, some never."""
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, vocab_size=vocab_size,
                                  max_seq_len=CONTEXT)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("tok_embeddings"):
                p.normal_(0.0, 1.0)
            elif p.dim() == 2:
                p.normal_(0.0, (4.0 if name.endswith(("wo.weight", "w2.weight")) else 1.0) / p.size(1) ** 0.5)
        ids = torch.randint(vocab_size, (32, 16), generator=torch.Generator().manual_seed(seed))
        mean = model.hidden(ids).mean((0, 1))
        row = model.tok_embeddings.weight[EOS % vocab_size]
        row.copy_(mean / mean.norm() * 0.8 * row.norm())
    return model


def random_prompts(rng, count, longest):
    return [[rng.randrange(V) for _ in range(rng.randint(1, longest))] for _ in range(count)]


MODEL = small_model()


@pytest.mark.parametrize("beams", [1, 2, 4, 8])
@pytest.mark.parametrize("no_repeat_ngram", [0, 3])
def test_same_answers_as_the_plain_algorithm(beams, no_repeat_ngram):
    rng = random.Random(beams * 10 + no_repeat_ngram)
    ended_early = 0
    for length_penalty, max_new_tokens, eos in [(1.0, 9, EOS), (0.0, 9, EOS), (-0.5, 12, EOS),
                                                (1.0, 1, EOS), (1.0, CONTEXT, EOS),
                                                (0.0, 20, 2), (1.0, 6, None)]:
        prompts = random_prompts(rng, 9, 20)
        knobs = Sampling(max_new_tokens=max_new_tokens, beams=beams, length_penalty=length_penalty,
                         no_repeat_ngram=no_repeat_ngram)
        got = beam.beam_search(MODEL, prompts, knobs, eos_id=eos)
        assert got == reference_beam_search(MODEL, prompts, knobs, eos), (length_penalty, max_new_tokens, eos)
        ended_early += sum(len(a) < max_new_tokens for a in got)
    assert ended_early >= 3  # some answers ended at <eos>, after different numbers of tokens


def test_done_prompts_are_replaced_by_later_ones_and_the_answers_stay_the_same(monkeypatch):
    """Prompts that finish early in the batch free their rows for the last prompts still searching (no prompt
    behind them moves otherwise); the answers are the reference's."""
    holes = []
    advance = beam.Rows.advance

    def spy(self, done, *args):
        kept = np.flatnonzero(~done)
        holes.append(int(done[:kept.size].sum()))
        return advance(self, done, *args)

    monkeypatch.setattr(beam.Rows, "advance", spy)
    prompts = random_prompts(random.Random(7), 24, 20)
    knobs = Sampling(max_new_tokens=24, beams=4, length_penalty=0.0, no_repeat_ngram=3)
    assert beam.beam_search(MODEL, prompts, knobs, eos_id=EOS) == \
        reference_beam_search(MODEL, prompts, knobs, EOS)
    assert sum(h > 0 for h in holes) >= 2, holes


def test_grouped_query_heads_read_the_shared_prompt_as_the_reference_reads_its_copies():
    """Two query heads per key head: the prompt's keys, stored once, are read by K beams x 2 heads."""
    model = small_model(4, n_kv_heads=2)
    prompts = random_prompts(random.Random(4), 8, 20)
    for beams in (1, 4):
        knobs = Sampling(max_new_tokens=12, beams=beams, length_penalty=0.0, no_repeat_ngram=3)
        assert beam.beam_search(model, prompts, knobs, eos_id=EOS) == reference_beam_search(model, prompts, knobs,
                                                                                            EOS)


def test_beams_beyond_the_vocabulary_keep_the_reference_tie_breaking():
    """More beams than tokens (2K > V): at first only beam 0 is alive, so -inf candidates fill the 2K and tie, some
    of them continue, and an eos among them is no answer; n-gram bans add more -inf."""
    model = small_model(3, vocab_size=8)
    prompts = [[rng_tok % 8 for rng_tok in p] for p in random_prompts(random.Random(3), 4, 6)]
    for beams, ngram in ((6, 2), (20, 0), (20, 2)):
        knobs = Sampling(max_new_tokens=6, beams=beams, no_repeat_ngram=ngram)
        for eos in (EOS % 8, 0, None):
            assert beam.beam_search(model, prompts, knobs, eos_id=eos) == reference_beam_search(model, prompts, knobs,
                                                                                                eos)


def test_one_beam_is_greedy_and_sampled_starts_continue_as_before():
    prompts = random_prompts(random.Random(5), 6, 12)
    greedy = generate.generate(MODEL, prompts, Sampling(max_new_tokens=10, no_repeat_ngram=3), eos_id=EOS)
    assert beam.beam_search(MODEL, prompts, Sampling(max_new_tokens=10, beams=1), eos_id=EOS) == greedy
    knobs = Sampling(max_new_tokens=12, temperature=1.0, top_k=20, beams=4, beam_prefix=3)
    got = beam.beam_search(MODEL, prompts, knobs, eos_id=EOS, generator=torch.Generator().manual_seed(11))
    starts = generate.generate(MODEL, prompts, dataclasses.replace(knobs, max_new_tokens=3, beams=1, beam_prefix=0),
                               eos_id=EOS, generator=torch.Generator().manual_seed(11))
    going = [i for i, s in enumerate(starts) if len(s) == 3]
    rest = dataclasses.replace(knobs, max_new_tokens=9, beam_prefix=0)
    tails = reference_beam_search(MODEL, [prompts[i] + starts[i] for i in going], rest, EOS)
    for i, tail in zip(going, tails):
        starts[i] = starts[i] + tail
    assert got == starts and len(going) < len(prompts)  # one start ended at <eos>: the whole answer
