"""BLEU for Chinese answers, with the protocol spelled out (small-model scores depend on it more than on the model).

Sentence BLEU-4 (the original project's intended protocol): nltk `sentence_bleu([reference_words], hypothesis_words)`,
uniform weights (0.25, 0.25, 0.25, 0.25), smoothing `SmoothingFunction().method1` (epsilon 0.1 added to
zero n-gram counts), words from `jieba.lcut` of the lower-cased text (default dictionary, HMM on),
whitespace-only tokens dropped; averaged over samples and reported as 0-100. The reference goes first:
the original project passed reference and hypothesis swapped, which changes the brevity penalty and every precision.

Corpus BLEU: sacrebleu `BLEU(tokenize="zh")` (every CJK character a token), one reference per sample.

    python -c "import bleu; print(bleu.sentence_bleu4('我爱北京天安门', '我爱北京'))"
"""
from __future__ import annotations

import functools
import logging
import warnings
from typing import List, Sequence, Tuple

with warnings.catch_warnings():
    # jieba 0.42 warns on import, about itself, in the middle of a run's output (eval's progress bar): its regexes'
    # escapes when its modules are first compiled (SyntaxWarning on Python 3.12+), and its use of setuptools'
    # deprecated pkg_resources (UserWarning). Neither is the user's to fix.
    warnings.simplefilter("ignore")
    import jieba
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from sacrebleu.metrics import BLEU

jieba.setLogLevel(logging.WARNING)  # jieba logs "Building prefix dict..." on first use otherwise

SENTENCE_PROTOCOL = ("nltk sentence_bleu, weights (0.25,0.25,0.25,0.25), SmoothingFunction().method1, "
                     "jieba.lcut words of lower-cased text (whitespace tokens dropped), "
                     "sentence_bleu([reference], hypothesis), mean over samples x 100")


def load_dictionary() -> None:
    """Loads jieba's dictionary now rather than on the first answer scored (about a second of CPU)."""
    jieba.initialize()


def words(text: str) -> List[str]:
    """Lower-cased jieba words without the whitespace tokens jieba keeps between words."""
    return list(_words(text))


@functools.lru_cache(maxsize=8192)  # eval scores the model and two baselines against the same references
def _words(text: str) -> Tuple[str, ...]:
    return tuple(w for w in jieba.lcut(text.lower()) if w.strip())


def sentence_bleu4_words(reference: Sequence[str], hypothesis: Sequence[str]) -> float:
    """BLEU-4 in [0, 1] of one hypothesis word list against one reference word list."""
    if not hypothesis:  # nltk returns 0 here too, but also warns; an empty answer scores 0
        return 0.0
    return float(sentence_bleu([list(reference)], list(hypothesis), weights=(0.25, 0.25, 0.25, 0.25),
                               smoothing_function=SmoothingFunction().method1))


def sentence_bleu4(reference: str, hypothesis: str) -> float:
    """BLEU-4 in [0, 1] of one answer against its reference, on jieba words."""
    return sentence_bleu4_words(words(reference), words(hypothesis))


def mean_sentence_bleu4(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Mean sentence BLEU-4 over samples, 0-100."""
    if len(references) != len(hypotheses) or not references:
        raise ValueError(f"need as many hypotheses as references (>0), got {len(hypotheses)} and {len(references)}")
    return 100.0 * sum(sentence_bleu4(r, h) for r, h in zip(references, hypotheses)) / len(references)


def corpus_sacrebleu(references: Sequence[str], hypotheses: Sequence[str]) -> Tuple[float, str]:
    """(corpus BLEU 0-100, sacrebleu signature) with the Chinese tokenizer."""
    if len(references) != len(hypotheses) or not references:
        raise ValueError(f"need as many hypotheses as references (>0), got {len(hypotheses)} and {len(references)}")
    metric = BLEU(tokenize="zh")
    score = metric.corpus_score(list(hypotheses), [list(references)])
    return float(score.score), str(metric.get_signature())
