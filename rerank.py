"""Candidate decoding: sample K answers per prompt in one batched generate() call, keep one of them.

Library module, no command line; eval.py and chat.py use it through --candidates and --rerank:
    python eval.py --beams=1 --temperature=0.7 --top_p=0.9 --candidates=8 --rerank=mbr
    python chat.py --candidates=8 --rerank=likelihood
    python eval.py --beam_prefix=8 --temperature=0.7 --top_p=0.9 --candidates=4 --rerank=mbr_question
    rerank.mbr_select(["要多喝水。", "要多喝水，多休息。", "多休息。", "去医院检查。"])   # -> 1, the closest to the others
    rerank.generate_best(model, prompts, Sampling(temperature=0.7, candidates=8, rerank="mbr"), decode=tok.decode,
                         eos_id=tok.eos_id, generator=torch.Generator().manual_seed(1337))   # one answer per prompt

Each prompt becomes K = Sampling.candidates rows of one generate() (or beam_search()) call (its knobs as given: temperature, top_k, top_p,
repetition_penalty, no_repeat_ngram; one generator, so the same --seed and batch give the same answers; rows share its
stream, so another batch size or number of processes draws other samples). One candidate is kept,
by Sampling.rerank:
  mbr         minimum Bayes risk: the candidate with the highest mean chrF to the other candidates. The samples are
              draws from the model's answer distribution; the one that agrees most with them is its consensus answer,
              without the one stock phrasing beam search converges to. chrF here: character 1-4-grams (whitespace
              removed), precision and recall each averaged over the orders, then their harmonic mean (beta 1:
              symmetric, so each pair is computed once).
  likelihood  the highest mean log-probability per token under the model (teacher-forced, scoring.answer_nats; the
              <eos> counts as a token when the answer ended).
  mbr_question  MBR plus a small bonus for the Chinese character bigrams the candidate shares with the question
              (question_bonus): of candidates the others agree with about equally, the one about this question.
  pool        the candidate with the highest mean chrF to the answers of the Sampling.pool_answers most similar
              questions in the fine-tuning data (AnswerPool: doctors' answers to like questions), plus the question
              bonus: MBR whose evidence is real answers rather than the model's own candidates, so the consensus
              is a doctor's, not the model's stock phrasing.
With Sampling.pmi_weight > 0, mbr and mbr_question also add pmi_weight x the candidate's pointwise mutual information
with its prompt per token (pmi_bonus): log p(answer | prompt) - log p(answer | the prompt's last token alone, the
template's <bos>), teacher-forced, over the answer's tokens. A stock answer is about as likely without the question
as with it and gains nothing; an answer the question made likely gains (the anti-language-model rerank of
Li et al. 2016, "A Diversity-Promoting Objective Function for Neural Conversation Models"). With
Sampling.pmi_tokens = N the PMI is that of the answer's first N tokens only: its opening, where stock phrases sit.
With --beams > 1 and --beam_prefix=N each candidate is a beam-search answer after its own sampled N-token start
(beam.sampled_start): K starts, K x beams rows. With rerank=pool and Sampling.pool_bias > 0 the beams also lean towards
the words of those doctors' answers while they search (AnswerPool.token_bias): a token that is in at least
BIAS_MIN_COUNT of the pool_answers answers to like questions, and in a larger share of them than of all the pool's
answers, adds pool_bias x min(log(that ratio), BIAS_CAP) to its log-prob at every step of the beams (not of the
sampled start). The answers name what like questions' answers name, not what any answer says.
Degenerate candidates (empty, a loop as quality.is_loop says, or cut at max_new_tokens) are never kept, and are no
evidence for MBR either, unless every candidate is degenerate. Ties go to the earlier candidate.
"""
from __future__ import annotations

import os
from collections import Counter
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch

from babyllama import quality
from babyllama.errors import DataError
from beam import beam_search
from generate import QUESTION_WEIGHT, RERANK_RULES as RULES, Sampling, generate
from scoring import answer_nats

CHRF_ORDER = 4  # chrF over character 1..4-grams
# mbr_question: a candidate's MBR score (mean chrF, 0-1) gains weight (Sampling.question_weight, by default
# generate.QUESTION_WEIGHT) x min(shared, QUESTION_CAP) / QUESTION_CAP for the distinct Chinese character bigrams it
# shares with the question: enough to choose, among candidates the others agree with about as much, the one about
# this question (docs/recipe.md)
QUESTION_CAP = 10
# pool_bias: a token's bias counts only where at least this many of the answers to like questions hold it (one answer
# is an anecdote), and its log ratio of shares is capped (a word only those answers use should not outweigh the model)
BIAS_MIN_COUNT = 2
BIAS_CAP = 3.0


def char_ngrams(text: str, max_n: int = CHRF_ORDER) -> List[Counter]:
    """[Counter of 1-grams, ..., Counter of max_n-grams] of the text's characters, whitespace removed."""
    s = quality.squeeze(text)
    return [Counter(s[i:i + n] for i in range(len(s) - n + 1)) for n in range(1, max_n + 1)]


def chrf(a: List[Counter], b: List[Counter]) -> float:
    """chrF (beta 1) of two char_ngrams lists, 0-1: precision and recall of matched n-grams averaged over the orders
    both texts are long enough for, then their harmonic mean. chrf(a, b) == chrf(b, a)."""
    precs, recs = [], []
    for ga, gb in zip(a, b):
        na, nb = sum(ga.values()), sum(gb.values())
        if na and nb:
            m = sum(min(ga[g], gb[g]) for g in ga.keys() & gb.keys())  # matched n-grams (the shared keys: C speed)
            precs.append(m / na), recs.append(m / nb)
    if not precs:
        return 0.0
    p, r = sum(precs) / len(precs), sum(recs) / len(recs)
    return 2 * p * r / (p + r) if p + r else 0.0


def kept(n: int, skip: Optional[Sequence[bool]]) -> List[int]:
    """Indices of the candidates not skipped; all of them when every one is skipped."""
    return [i for i in range(n) if not (skip and skip[i])] or list(range(n))


def question_bonus(question: str, texts: Sequence[str], weight: float = QUESTION_WEIGHT,
                   cap: int = QUESTION_CAP) -> List[float]:
    """weight x min(shared, cap) / cap per text, shared = distinct CJK bigrams (quality.cjk_bigrams) it has in common
    with the question: 0 for an answer that could answer anything, `weight` for one with `cap` of its terms."""
    q = quality.cjk_bigrams(question)
    return [weight * min(len(q & quality.cjk_bigrams(t)), cap) / cap for t in texts]


def pmi_bonus(nats_given: Sequence[float], nats_alone: Sequence[float], n_tokens: Sequence[int],
              weight: float) -> List[float]:
    """weight x (nats_alone - nats_given) / n_tokens per candidate: the nats per answer token that the prompt saves
    (its PMI with the answer per token; < 0 where the prompt makes the answer less likely)."""
    return [weight * (a - g) / max(n, 1) for g, a, n in zip(nats_given, nats_alone, n_tokens)]


def mbr_select(texts: Sequence[str], skip: Optional[Sequence[bool]] = None,
               bonus: Optional[Sequence[float]] = None, evidence: Optional[Sequence[str]] = None) -> int:
    """Index of the candidate with the highest mean chrF to the other kept candidates, plus its bonus if given
    (question_bonus; skip: True = not chosen and not counted as evidence). evidence (non-empty): the texts to agree
    with instead of the other candidates (rerank=pool: answers to like questions)."""
    if not texts:
        raise ValueError("mbr_select: no candidates")
    keep = kept(len(texts), skip)
    if len(keep) == 1:
        return keep[0]
    grams = {i: char_ngrams(texts[i]) for i in keep}
    if evidence:
        refs = [char_ngrams(e) for e in evidence]
        agree = {i: sum(chrf(grams[i], r) for r in refs) / len(refs) for i in keep}
    else:
        sim = {}
        for a, i in enumerate(keep):
            for j in keep[a + 1:]:
                sim[i, j] = sim[j, i] = chrf(grams[i], grams[j])
        agree = {i: sum(sim[i, j] for j in keep if j != i) / (len(keep) - 1) for i in keep}
    score = {i: agree[i] + (bonus[i] if bonus else 0.0) for i in keep}
    return max(keep, key=lambda i: (score[i], -i))


def likelihood_select(nats: Sequence[float], n_tokens: Sequence[int], skip: Optional[Sequence[bool]] = None) -> int:
    """Index of the candidate with the highest mean log-prob per token, -nats / n_tokens (skip as mbr_select)."""
    if not nats or len(nats) != len(n_tokens):
        raise ValueError(f"likelihood_select: need one token count per candidate (1+), got {len(nats)} and "
                         f"{len(n_tokens)}")
    return max(kept(len(nats), skip), key=lambda i: (-nats[i] / max(n_tokens[i], 1), -i))


class AnswerPool:
    """The (question, answer) pairs of the fine-tuning data, indexed by question (quality.QuestionIndex):
    answers(questions, k) -> for each question the answers of its k most similar pool questions, the evidence of
    rerank=pool; token_bias -> the words those answers share, for the beams (pool_bias). Built once per run (about
    2 s for 29k conversations on one CPU core). encode: texts -> token ids (the tokenizer's encode_batch), needed by
    token_bias only; the answers are encoded on its first call."""

    def __init__(self, pairs: Sequence[tuple], encode: Optional[Callable[[List[str]], List[List[int]]]] = None):
        self.index = quality.QuestionIndex([q for q, _ in pairs])
        self.texts = [a for _, a in pairs]  # the answers, in the index's order
        self.encode = encode
        self.token_sets: Optional[tuple] = None  # (distinct tokens of every answer, concatenated; offsets), lazily

    @classmethod
    def from_file(cls, path: str, encode: Optional[Callable] = None) -> "AnswerPool":
        """From a data_process.py SFT file (train.jsonl); DataError (file, line) for a bad one."""
        return cls(quality.qa_pairs(path), encode)

    def nearest(self, questions: Sequence[str], k: int) -> List[List[int]]:
        return self.index.nearest(questions, k)

    def answers(self, questions: Sequence[str], k: int, near: Optional[List[List[int]]] = None) -> List[List[str]]:
        """For each question the answers of its k most similar pool questions (near: nearest()'s, if known)."""
        return [[self.texts[i] for i in n] for n in (near if near is not None else self.nearest(questions, k))]

    def token_bias(self, near: List[List[int]], vocab_size: int, weight: float) -> torch.Tensor:
        """(len(near), vocab_size) fp32: for each question, given near (its like questions, nearest()), token t gets
        weight x clip(log(share of those questions' answers holding t / share of all answers holding t), 0, BIAS_CAP)
        where at least BIAS_MIN_COUNT of them hold it, else 0. A word every answer uses (the stock phrase) gets
        nothing; the disease, the drug, the test that answers to like questions name get up to weight x BIAS_CAP."""
        if self.encode is None:
            raise ValueError("AnswerPool.token_bias: the pool was built without encode (the tokenizer's encode_batch)")
        if self.token_sets is None:
            sets = [np.unique(np.asarray(ids, dtype=np.int64)) for ids in self.encode(self.texts)]
            flat = np.concatenate(sets) if sets else np.zeros(0, dtype=np.int64)
            self.token_sets = flat, np.cumsum([0] + [len(x) for x in sets])
        flat, offsets = self.token_sets
        # (V,) share of all answers holding t; ids past the model's rows (none with its own tokenizer) are dropped
        df = np.bincount(flat[flat < vocab_size], minlength=vocab_size) / max(len(self.texts), 1)
        bias = torch.zeros(len(near), vocab_size)
        for b, n in enumerate(near):
            held = np.concatenate([flat[offsets[i]:offsets[i + 1]] for i in n]) if n else flat[:0]
            tok, count = np.unique(held[held < vocab_size], return_counts=True)
            keep = count >= BIAS_MIN_COUNT
            tok, share = tok[keep], count[keep] / len(n)
            bias[b, torch.from_numpy(tok)] = torch.from_numpy(
                weight * np.clip(np.log(share / df[tok]), 0.0, BIAS_CAP)).float()
        return bias


def pool_fallback(sampling: Sampling, path: str) -> str:
    """rerank=pool without its file `path` (a checkpoint used away from its SFT data): the candidates' own consensus
    decides instead (sampling.rerank becomes mbr_question) -> a note for the user, or "" when nothing changed."""
    if sampling.rerank != "pool" or sampling.candidates == 1 or os.path.isfile(path):
        return ""
    sampling.rerank = "mbr_question"
    return (f"note: no {path} (the SFT conversations whose answers --rerank=pool agrees with): the candidates' own "
            f"consensus decides (--rerank=mbr_question); pass --answer_pool=FILE")


def generate_best(model, prompts: List[List[int]], sampling: Sampling, *, decode: Callable[[List[int]], str],
                  eos_id: int, generator: Optional[torch.Generator] = None,
                  use_cache: bool = True, pool: Optional[AnswerPool] = None) -> List[List[int]]:
    """New tokens of the kept candidate for each prompt (as generate() returns them, <eos> excluded): K =
    sampling.candidates answers sampled with its knobs (temperature > 0, top_k, top_p, ...), or with beams > 1 and
    beam_prefix > 0 K beam-search answers after K sampled starts (beam.sampled_start), one kept by sampling.rerank.

    decode: ids -> text (the tokenizer's), for MBR, the question's terms and the loop check; eos_id, generator,
    use_cache: generate()'s (beam search always keeps its cache); pool: rerank=pool's AnswerPool (with
    sampling.pool_bias > 0 and beams > 1 also the beams' token bias, AnswerPool.token_bias)."""
    if sampling.rerank not in RULES:
        raise ValueError(f"generate_best: rerank must be one of {'|'.join(RULES)}, got {sampling.rerank!r}")
    if sampling.rerank == "pool" and pool is None:
        raise DataError("rerank=pool needs the fine-tuning conversations (eval.py/chat.py --answer_pool=FILE)")
    k, rerank, max_new_tokens = sampling.candidates, sampling.rerank, sampling.max_new_tokens
    rows = [p for p in prompts for _ in range(k)]  # (B * K) rows: prompt b's candidates are rows b*K .. b*K + K-1
    questions = [decode(p) for p in prompts]
    near = pool.nearest(questions, sampling.pool_answers) if rerank == "pool" else None
    if sampling.beams > 1:
        bias = None
        if near is not None and sampling.pool_bias > 0:  # (B, V) -> (B * K, V): each candidate its prompt's
            bias = pool.token_bias(near, model.args.vocab_size, sampling.pool_bias)
            bias = bias.to(model.rope_cos.device).repeat_interleave(k, 0)
        outs = beam_search(model, rows, sampling, eos_id=eos_id, generator=generator, bias=bias)
    else:
        outs = generate(model, rows, sampling, eos_id=eos_id, generator=generator, use_cache=use_cache)
    texts = [decode(o).strip() for o in outs]
    ended = [len(o) < max_new_tokens for o in outs]  # stopped at <eos>, not at the limit
    skip = [not t or not e or quality.is_loop(t) for t, e in zip(texts, ended)]
    pmi = sampling.pmi_weight if rerank != "likelihood" else 0.0
    if rerank == "likelihood" or pmi:
        scored = [o + [eos_id] if e else o for o, e in zip(outs, ended)]  # the <eos> counts where the answer ended
        device = model.rope_cos.device
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) \
            else model.tok_embeddings.weight.dtype  # the caller's autocast (eval.py, chat.py), else the weights'
        # what is scored: the whole answers, or with pmi_tokens only their openings (the whole is then never needed)
        heads = [a[:sampling.pmi_tokens] for a in scored] if pmi and sampling.pmi_tokens else scored
        nats = answer_nats(model, rows, heads, len(prompts), device, dtype)
        if pmi:  # the same tokens after the prompt's last token only (the SFT template's <bos>): no question
            alone = answer_nats(model, [r[-1:] for r in rows], heads, len(prompts), device, dtype)
            extra = pmi_bonus(nats, alone, [len(a) for a in heads], pmi)
    evidence = pool.answers(questions, sampling.pool_answers, near) if near is not None else None
    chosen = []
    for b in range(len(prompts)):
        span = range(b * k, (b + 1) * k)
        if rerank == "likelihood":
            best = likelihood_select([nats[i] for i in span], [len(scored[i]) for i in span], [skip[i] for i in span])
        else:  # mbr, mbr_question or pool: the prompt's text (the question, the template's few words) gives the terms
            bonus = None
            if rerank in ("mbr_question", "pool"):
                bonus = question_bonus(questions[b], [texts[i] for i in span], sampling.question_weight)
            if pmi:
                bonus = [q + extra[i] for q, i in zip(bonus or [0.0] * k, span)]
            best = mbr_select([texts[i] for i in span], [skip[i] for i in span], bonus, evidence[b] if evidence else None)
        chosen.append(outs[b * k + best])
    return chosen
