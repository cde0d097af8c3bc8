"""The embedded sample's evaluation questions are held out from its SFT data: no question, no paraphrase of one and no
near-copy of a reference answer is in data/sample/sft/, so the demo's and the tiny speedrun's scores (and the
retrieval baseline's) measure answers to new questions."""
import difflib
import json
import os

from conftest import ROOT

SAMPLE = os.path.join(ROOT, "data", "sample")


def sft_pairs() -> list:
    """(question, answer) of every first turn in the sample's two SFT files."""
    with open(os.path.join(SAMPLE, "sft", "alpaca_style.json"), encoding="utf-8") as f:
        pairs = [(r["instruction"] + r["input"], r["output"]) for r in json.load(f)]
    with open(os.path.join(SAMPLE, "sft", "medical_sharegpt.jsonl"), encoding="utf-8") as f:
        for line in f:
            turns = json.loads(line)["conversations"]
            pairs += [(turns[i]["value"], turns[i + 1]["value"]) for i in range(0, len(turns) - 1, 2)]
    return pairs


def similarity(a: str, b: str) -> float:
    return difflib.SequenceMatcher(None, a, b).ratio()


def test_eval_questions_and_answers_are_not_in_the_sft_data():
    with open(os.path.join(SAMPLE, "eval", "medical_qa.jsonl"), encoding="utf-8") as f:
        evals = [json.loads(line) for line in f if line.strip()]
    pairs = sft_pairs()
    assert len(evals) == 30 and len(pairs) >= 182
    for e in evals:
        q = max(pairs, key=lambda p: similarity(e["question"], p[0]))
        a = max(pairs, key=lambda p: similarity(e["answer"], p[1]))
        # the closest SFT question shares words ("...怎么办？"), never the question; no answer is a copy
        assert similarity(e["question"], q[0]) < 0.75, (e["question"], q[0])
        assert similarity(e["answer"], a[1]) < 0.8, (e["answer"], a[1])
