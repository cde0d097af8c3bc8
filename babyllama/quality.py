"""Answer quality beyond BLEU: degenerate answers, answer length, and two non-generative baselines.

A BLEU score alone does not say whether a model learned anything: eval.py prints it next to two answers that
involve no model at all, scored with the same protocol.
  retrieval  the reference answer of the most similar question in the fine-tuning data: TF-IDF over character
             1- and 2-grams, cosine similarity (a strong baseline: it answers with a real doctor's words)
  fixed      one generic sentence a doctor might say to anyone (FIXED_ANSWER), the same for every question
A model worth using beats both.

Degenerate answers are the failure of small models that BLEU hides: a phrase looped until the token limit.
    python -c "from babyllama import quality; print(quality.is_loop('头痛，头痛，头痛，头痛，'))"

Stock answers are the other one: the same sentence for many questions, which BLEU rewards when it is a likely one.
answer_quality measures it over a list of answers (the model's, a baseline's, or the references as a yardstick):
    python -c "from babyllama import quality; print(quality.answer_quality(['多喝水。', '多喝水。'], ['感冒', '发烧']))"
"""
from __future__ import annotations

import multiprocessing
import re
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Dict, Iterable, List, Sequence, Tuple

import numpy as np

from babyllama.errors import DataError
from babyllama.fileio import read_jsonl

FIXED_ANSWER = "你好，根据你的情况，建议及时到正规医院就诊，在医生指导下用药治疗，平时注意饮食清淡，多休息，保持良好的心态。"
LOOP_SPAN, LOOP_REPEATS = 4, 4  # an answer loops when a span of 4+ characters comes 4+ times in a row
# (.{4,}?) a span of at least LOOP_SPAN characters, \1{3,} the same span again 3+ times right after it
LOOP_RE = re.compile(r"(.{%d,}?)\1{%d,}" % (LOOP_SPAN, LOOP_REPEATS - 1), re.S)
OPENING_CHARS = 12  # an answer's opening: its first 12 characters (whitespace removed)
OVERLAP_BIGRAMS = 3  # an answer overlaps its question when they share 3+ distinct CJK character bigrams
CJK = re.compile(r"[\u4e00-\u9fff]")  # CJK Unified Ideographs: the Chinese characters of a bigram


def is_loop(text: str) -> bool:
    """True when a span of at least 4 characters (whitespace ignored) comes 4 or more times in a row, the way a
    small model loops (`乙肝病毒携带者，乙肝病毒携带者，乙肝病毒携带者，乙肝病毒携带者，`). A term that merely
    recurs through an answer (`高血压` in a doctor's answer about hypertension) is not a loop."""
    return LOOP_RE.search("".join(text.split())) is not None


def degenerate_stats(answers: Sequence[str], hit_limit: Sequence[bool]) -> dict:
    """Share of answers that loop or were cut by max_new_tokens (no <eos>), each and together (0-1)."""
    if len(answers) != len(hit_limit) or not answers:
        raise ValueError(f"need one hit_limit flag per answer (>0 answers), got {len(hit_limit)} and {len(answers)}")
    loops = [is_loop(a) for a in answers]
    n = len(answers)
    return {"loop": sum(loops) / n, "hit_limit": sum(map(bool, hit_limit)) / n,
            "degenerate": sum(lp or bool(h) for lp, h in zip(loops, hit_limit)) / n}


def length_stats(answers: Sequence[str], references: Sequence[str]) -> dict:
    """Mean answer and reference length in characters (whitespace ignored) and their ratio."""
    count = lambda t: len("".join(t.split()))
    ans = sum(map(count, answers)) / max(len(answers), 1)
    ref = sum(map(count, references)) / max(len(references), 1)
    return {"answer_chars": ans, "reference_chars": ref, "ratio": ans / ref if ref else float("nan")}


# ----------------------------------------------------------------------------- stock answers


def squeeze(text: str) -> str:
    """The text without any whitespace: what two answers are compared on."""
    return "".join(text.split())


def duplicate_share(answers: Sequence[str]) -> float:
    """Share of answers identical (whitespace removed) to at least one other answer of the list (0-1)."""
    counts = Counter(map(squeeze, answers))
    return sum(c for c in counts.values() if c > 1) / len(answers) if answers else 0.0


def openings(answers: Sequence[str], chars: int = OPENING_CHARS) -> Tuple[int, float]:
    """(number of distinct openings, share of answers that start with the most common one); an opening is the
    first `chars` characters without whitespace (a shorter answer is its own opening)."""
    counts = Counter(squeeze(a)[:chars] for a in answers)
    return len(counts), (counts.most_common(1)[0][1] / len(answers) if answers else 0.0)


def distinct_2(answers: Sequence[str]) -> float:
    """Distinct character bigrams / all character bigrams over every answer (whitespace removed, bigrams inside
    one answer); 0 when no answer has two characters. Low = the answers reuse the same phrases."""
    grams = [s[i:i + 2] for s in map(squeeze, answers) for i in range(len(s) - 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def cjk_bigrams(text: str) -> set:
    """Distinct pairs of adjacent characters (whitespace removed) that are both CJK ideographs (U+4E00-U+9FFF):
    `头痛怎么办？` -> {头痛, 痛怎, 怎么, 么办}; punctuation, digits and Latin letters break pairs."""
    s = squeeze(text)
    return {s[i:i + 2] for i in range(len(s) - 1) if CJK.match(s[i]) and CJK.match(s[i + 1])}


def question_overlap(questions: Sequence[str], answers: Sequence[str], min_shared: int = OVERLAP_BIGRAMS) -> float:
    """Share of answers sharing at least `min_shared` distinct CJK bigrams (cjk_bigrams) with their own question:
    an answer that takes up the question's terms, not one that would fit any question."""
    if len(questions) != len(answers):
        raise ValueError(f"need one question per answer, got {len(questions)} and {len(answers)}")
    hits = [len(cjk_bigrams(q) & cjk_bigrams(a)) >= min_shared for q, a in zip(questions, answers)]
    return sum(hits) / len(hits) if hits else 0.0


def answer_quality(answers: Sequence[str], questions: Sequence[str]) -> dict:
    """The stock-answer metrics of one list of answers to `questions`:
    duplicate         share of answers identical to another answer (duplicate_share)
    openings          number of distinct 12-character openings; top_opening: share starting with the commonest one
    distinct2         distinct character bigrams / all character bigrams (distinct_2)
    question_overlap  share of answers sharing 3+ distinct CJK bigrams with their question (question_overlap)"""
    n_open, top = openings(answers)
    return {"duplicate": duplicate_share(answers), "openings": n_open, "top_opening": top,
            "distinct2": distinct_2(answers), "question_overlap": question_overlap(questions, answers)}


# ----------------------------------------------------------------------------- retrieval baseline


def char_grams(text: str) -> List[str]:
    """Character 1-grams and 2-grams of the text without whitespace."""
    s = "".join(text.split())
    return list(s) + [s[i:i + 2] for i in range(len(s) - 1)]


def qa_pairs(conversations_jsonl: str) -> List[Tuple[str, str]]:
    """Every (user turn, the assistant turn after it) of a data_process.py SFT file (JSON lines of
    {"conversations": [{"role", "content"}, ...]})."""
    pairs, want = [], 'a JSON object with "conversations": [{"role", "content"}, ...]'
    for lineno, rec in read_jsonl(conversations_jsonl, want):
        turns = rec.get("conversations")
        if not isinstance(turns, list) or not all(isinstance(t, dict) and isinstance(t.get("content"), str)
                                                  for t in turns):
            raise DataError(f"{conversations_jsonl}:{lineno}: expected {want}")
        for q, a in zip(turns, turns[1:]):
            if q.get("role") == "user" and a.get("role") == "assistant":
                pairs.append((q["content"], a["content"]))
    if not pairs:
        raise DataError(f"{conversations_jsonl}: no user/assistant pair to retrieve answers from")
    return pairs


class QuestionIndex:
    """A pool of questions indexed for similarity: TF-IDF (raw counts, smoothed idf) over character 1-2-grams,
    L2-normalised, cosine. Built once (an inverted index: each gram -> the pool questions holding it and their
    weights), so a query costs only the postings of its own grams: eval.py asks 500 questions at once, chat.py one."""

    def __init__(self, questions: Sequence[str]):
        if not questions:
            raise ValueError("QuestionIndex: the pool is empty")
        self.vocab: Dict[str, int] = {}  # gram -> column
        rows, cols, counts = [], [], []  # one entry per (pool question, gram in it)
        for r, q in enumerate(questions):
            c = Counter(char_grams(q))
            rows += [r] * len(c)
            cols += [self.vocab.setdefault(g, len(self.vocab)) for g in c]
            counts += c.values()
        self.size = n = len(questions)
        rows, cols = np.array(rows, dtype=np.int64), np.array(cols, dtype=np.int64)
        df = np.bincount(cols, minlength=len(self.vocab))  # pool questions holding each gram
        self.idf = np.log((1 + n) / (1 + df)) + 1.0
        w = np.array(counts, dtype=np.float64) * self.idf[cols]
        w /= np.sqrt(np.bincount(rows, w * w, minlength=n))[rows]  # each row's full-vocabulary length (> 0: 1+ gram)
        order = np.argsort(cols, kind="stable")  # postings: the entries of gram j at [start[j], start[j + 1])
        self.rows, self.weights = rows[order], w[order]
        self.start = np.concatenate([[0], np.cumsum(df)])

    def nearest(self, queries: Sequence[str], k: int = 1) -> List[List[int]]:
        """For each query, the indices of its k (>= 1) most similar pool questions, most similar first (ties among
        them: the earlier pool question first). A gram no pool question holds adds nothing; a query's own norm does
        not change the order."""
        out = []
        for q in queries:
            score = np.zeros(self.size)  # (pool,) cosine similarity up to the query's norm
            for g, count in Counter(char_grams(q)).items():
                j = self.vocab.get(g)
                if j is not None:
                    span = slice(self.start[j], self.start[j + 1])
                    score[self.rows[span]] += count * self.idf[j] * self.weights[span]
            top = np.argpartition(-score, k - 1)[:k] if k < self.size else np.arange(self.size)  # the k best, unordered
            out.append(top[np.lexsort((top, -score[top]))].tolist())  # by score, then pool order
        return out


def retrieve(queries: Sequence[str], pool_questions: Sequence[str]) -> List[int]:
    """Index of the most similar pool question for each query (QuestionIndex)."""
    return [best[0] for best in QuestionIndex(pool_questions).nearest(queries, 1)]


def baseline_answers(questions: Sequence[str], pool: Iterable[Tuple[str, str]]) -> Dict[str, List[str]]:
    """{"retrieval": answers of the nearest pool questions, "fixed": FIXED_ANSWER for each question}."""
    pool = list(pool)
    idx = retrieve(questions, [q for q, _ in pool])
    return {"retrieval": [pool[i][1] for i in idx], "fixed": [FIXED_ANSWER] * len(questions)}


def baseline_scores(questions: Sequence[str], references: Sequence[str], pool: List[Tuple[str, str]],
                    pool_path: str) -> Dict[str, dict]:
    """BLEU-4, sacreBLEU, length and the stock-answer metrics of the two baselines, with eval.py's protocol ->
    {name: scores}. CPU work only (eval.py runs it in a process of its own beside the generation on a GPU)."""
    from babyllama import bleu  # jieba, nltk and sacrebleu: imported where BLEU is computed
    out = {}
    for name, hyps in baseline_answers(questions, pool).items():
        out[name] = {"bleu4": bleu.mean_sentence_bleu4(references, hyps),
                     "sacrebleu_zh": bleu.corpus_sacrebleu(references, hyps)[0],
                     "answer_chars": length_stats(hyps, references)["answer_chars"], **answer_quality(hyps, questions)}
    out["retrieval"]["pool"] = pool_path
    return out


def start_baseline_scores(questions: Sequence[str], references: Sequence[str], pool: List[Tuple[str, str]],
                          pool_path: str, background: bool) -> Callable[[], tuple]:
    """Starts baseline_scores -> a function returning ({name: scores}, seconds it waited for them). In the background
    (eval on a GPU) they are scored in a process of their own while the GPU generates, so the eval need not wait;
    otherwise (a CPU, which generation keeps busy) when the function is called."""
    if not background:
        def inline() -> tuple:
            t0 = time.perf_counter()
            return baseline_scores(questions, references, pool, pool_path), time.perf_counter() - t0
        return inline
    # spawn, not fork: the caller already holds CUDA and threads; the child imports only what scoring needs
    executor = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    future = executor.submit(baseline_scores, list(questions), list(references), pool, pool_path)

    def waited() -> tuple:
        t0 = time.perf_counter()
        try:
            return future.result(), time.perf_counter() - t0
        finally:
            executor.shutdown()
    return waited
