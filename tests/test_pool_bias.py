"""--pool_bias: the beams lean towards the words that the answers to like questions share (rerank.AnswerPool.token_bias,
beam.beam_search(bias=...)). The bias by hand, the search it changes (exhaustive over the biased scores), each
prompt its own row through sampled starts and candidates, the knob's range and where it applies.

Run: python -m pytest -q tests/test_pool_bias.py   (CPU, a few seconds; no tokenizer or data needed)
"""
import math

import numpy as np
import pytest
import torch

import beam
import eval as ev
import generate
import rerank
from babyllama.config import parse_config
from babyllama.errors import ConfigError
from chat import ChatConfig
from conftest import FakeTokenizer, lively_model, tiny_eval_model
from generate import Sampling
from test_beam import all_answers, sequence_logprob

torch.set_num_threads(1)


def test_token_bias_by_hand():
    """Pool of 5 answers; the 3 like questions' answers hold 甲 3 times, 乙 twice, 丙 once, 丁 (in every answer)
    3 times: 甲 gets log(3/3 / 3/5) = log(5/3), 乙 log(2/3 / 2/5) = log(5/3), 丙 nothing (one answer), 丁 nothing
    (no more common there than anywhere: log 1 = 0); a cap stops a word that only they use."""
    tok = FakeTokenizer()
    answers = ["甲乙丁", "甲乙丁", "甲丙丁", "戊丁", "戊乙丁"]
    pool = rerank.AnswerPool([(f"问{i}", a) for i, a in enumerate(answers)], tok.encode_batch)
    ids = {c: tok.encode(c)[0] for c in "甲乙丙丁戊"}
    bias = pool.token_bias([[0, 1, 2], [3, 4]], 96, 0.5)
    assert bias.shape == (2, 96) and bias.dtype == torch.float32
    assert bias[0, ids["甲"]].item() == pytest.approx(0.5 * math.log((3 / 3) / (3 / 5)))
    assert bias[0, ids["乙"]].item() == pytest.approx(0.5 * math.log((2 / 3) / (3 / 5)))
    assert bias[0, ids["丙"]] == 0 and bias[0, ids["丁"]] == 0 and bias[0, ids["戊"]] == 0
    assert bias[1, ids["戊"]].item() == pytest.approx(0.5 * math.log(1 / (2 / 5)))  # both hold it, 2 of 5 overall
    assert int((bias != 0).sum()) == 3  # nothing else: every other id (eos included) is 0
    rare = rerank.AnswerPool([(f"问{i}", "己庚" if i < 2 else "辛") for i in range(200)], tok.encode_batch)
    capped = rare.token_bias([[0, 1]], 96, 1.0)  # log(1 / (2 / 200)) = 4.6 > the cap
    assert capped[0, tok.encode("己")[0]].item() == pytest.approx(rerank.BIAS_CAP)
    with pytest.raises(ValueError, match="without encode"):
        rerank.AnswerPool([("问", "答")]).token_bias([[0]], 96, 0.5)


def test_biased_beams_find_the_best_biased_answer():
    """Beams covering the tree (vocab 8, 3 tokens) with a bias return the answer with the best sum of log-prob +
    bias / length, searched by hand; a zero bias changes nothing, and this bias changes the answer."""
    V, eos, depth = 8, 2, 3
    changed = False
    for seed, prompt in ((2, [3, 5, 1]), (6, [7]), (0, [4, 4, 6, 0])):
        model = lively_model(seed, vocab_size=V, pad_vocab_multiple=1)
        every = Sampling(max_new_tokens=depth, beams=400, no_repeat_ngram=0)
        plain = beam.beam_search(model, [prompt], every, eos_id=eos)[0]
        b = torch.zeros(1, V)
        b[0, [t for t in range(V) if t != eos and t not in plain][:2]] = torch.tensor([8.0, 3.0])  # eos unbiased
        best, best_score = None, -math.inf
        for ans in all_answers(V, eos, depth):
            s = (sequence_logprob(model, prompt, ans) + sum(b[0, t].item() for t in ans)) / len(ans)
            if s > best_score:
                best, best_score = ans, s
        got = beam.beam_search(model, [prompt], every, eos_id=eos, bias=b)[0]
        assert got == [t for t in best if t != eos], (seed, got, best)
        assert beam.beam_search(model, [prompt], every, eos_id=eos, bias=torch.zeros(1, V)) == [plain]
        changed |= got != plain
    assert changed


def test_each_prompt_gets_its_own_bias_row_through_sampled_starts():
    """Two prompts in one batch, each biased hard towards another token: each answer is its own token, after a
    start sampled without the bias (the same start as with no bias: the same random numbers)."""
    model = tiny_eval_model(max_seq_len=32)
    prompts = [[5, 6, 7, 1], [9, 1]]
    bias = torch.zeros(2, 96)
    bias[0, 40], bias[1, 50] = 15.0, 15.0
    knobs = Sampling(max_new_tokens=8, beams=3, beam_prefix=2, temperature=0.8, no_repeat_ngram=0)
    got = beam.beam_search(model, prompts, knobs, eos_id=2, generator=torch.Generator().manual_seed(3), bias=bias)
    free = beam.beam_search(model, prompts, knobs, eos_id=2, generator=torch.Generator().manual_seed(3))
    assert [g[:2] for g in got] == [f[:2] for f in free]  # the start is the model's own
    assert got[0][2:] == [40] * 6 and got[1][2:] == [50] * 6  # the beams follow each prompt's bias


def test_generate_best_biases_each_candidate_by_its_prompts_like_answers():
    """rerank=pool with pool_bias: the candidates of a question about 头 use the words of the answers about 头; a
    pool_bias of 0 gives what no bias gives."""
    tok = FakeTokenizer()
    pairs = [("头疼", "头疼多休息"), ("头疼晕", "头疼多休息"), ("腿疼", "腿疼少走路"), ("腿疼肿", "腿疼少走路")]
    pool = rerank.AnswerPool(pairs, tok.encode_batch)
    prompts = [tok.encode("头疼") + [1], tok.encode("腿疼") + [1]]
    model = tiny_eval_model(max_seq_len=32)
    knobs = Sampling(max_new_tokens=6, beams=2, beam_prefix=1, temperature=0.8, candidates=2, rerank="pool",
                     pool_answers=2, pool_bias=5.0, no_repeat_ngram=0)
    run = lambda k: rerank.generate_best(model, prompts, k, decode=tok.decode, eos_id=2, pool=pool,
                                         generator=torch.Generator().manual_seed(0))
    got = [tok.decode(a) for a in run(knobs)]
    assert set(got[0][1:]) <= set("头疼多休息") and set(got[1][1:]) <= set("腿疼少走路"), got
    knobs.pool_bias = 0.0
    knobs2 = Sampling(**{**knobs.__dict__})
    assert run(knobs) == run(knobs2) and [tok.decode(a) for a in run(knobs)] != got


def test_the_knob_its_range_and_where_it_applies():
    assert parse_config(ev.EvalConfig, []).pool_bias == 0.5 and ChatConfig().pool_bias == 0.5
    assert generate.Sampling().pool_bias == 0.0
    with pytest.raises(ConfigError, match="pool_bias must be in 0..5"):
        parse_config(ev.EvalConfig, ["--pool_bias=-1"])
    with pytest.raises(ConfigError, match="pool_bias must be in 0..5"):
        parse_config(ChatConfig, ["--pool_bias=6"])
    cfg = parse_config(ev.EvalConfig, [])
    assert cfg.rule().endswith("; beams biased x 0.5 to the pool's words")
    for argv in (["--beams=1"], ["--beam_prefix=0"]):  # no sampled starts, no pool: the bias steps aside
        assert parse_config(ev.EvalConfig, argv).pool_bias == 0.0
    assert "biased" not in parse_config(ev.EvalConfig, ["--rerank=mbr_question"]).rule()
    assert "biased" not in parse_config(ev.EvalConfig, ["--pool_bias=0"]).rule()
    assert np.isclose(parse_config(ev.EvalConfig, ["--pool_bias=1.5"]).pool_bias, 1.5)
