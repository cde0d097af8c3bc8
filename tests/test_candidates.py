"""Candidate decoding (rerank.py), teacher-forced scores (scoring.py), and --candidates in eval.py and chat.py."""
import dataclasses
import json
import math

import pytest
import torch

import eval as ev
import generate
import rerank
import scoring
from babyllama import checkpoint
from babyllama.config import parse_config
from babyllama.errors import ConfigError, DataError
from chat import ChatConfig
from chatglm_tokenizer.template import render
from conftest import FAKE_VOCAB, FakeTokenizer, run_script, tiny_ckpt, tiny_eval_model, write_jsonl

torch.set_num_threads(1)
V = FAKE_VOCAB  # vocabulary of the fake tokenizer and the tiny models


def tiny_model(max_seq_len=32, seed=0, vocab_size=V):
    return tiny_eval_model(max_seq_len=max_seq_len, seed=seed, vocab_size=vocab_size)


def nats_by_hand(model, prompt, answer):
    """-sum log p(answer | prompt) in float64 from the full logits of one unpadded row."""
    seq = torch.tensor(prompt + answer)[None]
    with torch.no_grad():
        logits, _ = model(seq[:, :-1], seq[:, 1:])
    logp = torch.log_softmax(logits.double(), -1)[0]
    pos = torch.arange(len(prompt) - 1, seq.size(1) - 1)
    return -logp[pos, torch.tensor(answer)].sum().item()


# ---- choosing a candidate ---------------------------------------------------------------------------

def test_chrf_by_hand_symmetric_and_bounded():
    a, b = rerank.char_ngrams("ab"), rerank.char_ngrams("a b c")
    # 1-grams: 2 of 2 and 2 of 3 match; 2-grams: 1 of 1 and 1 of 2; no 3- or 4-grams in "ab": P 1, R 7/12
    assert rerank.chrf(a, b) == pytest.approx(14 / 19) and rerank.chrf(b, a) == pytest.approx(14 / 19)
    assert rerank.chrf(a, a) == 1.0 and rerank.chrf(a, rerank.char_ngrams("xyz")) == 0.0
    assert rerank.chrf(a, rerank.char_ngrams("")) == 0.0


def test_mbr_picks_the_consensus_candidate_and_never_a_skipped_one():
    cands = ["感冒了要多喝水。", "感冒了要多喝水，多休息。", "感冒了多休息。", "建议去医院做个胃镜检查。"]
    assert rerank.mbr_select(cands) == 1  # it shares most with each of the others; the outlier least
    g = [rerank.char_ngrams(c) for c in cands]
    mean = [sum(rerank.chrf(g[i], g[j]) for j in range(4) if j != i) / 3 for i in range(4)]
    assert max(range(4), key=mean.__getitem__) == 1 and min(range(4), key=mean.__getitem__) == 3
    # the consensus one skipped (e.g. cut at max_new_tokens): neither chosen nor evidence for the others
    assert rerank.mbr_select(cands, skip=[False, True, False, False]) in (0, 2)
    assert rerank.mbr_select(cands, skip=[True, True, True, False]) == 3  # the only one left
    assert rerank.mbr_select(cands, skip=[True] * 4) == 1  # all degenerate: all count again
    assert rerank.mbr_select(["同一个回答", "同一个回答"]) == 0  # ties go to the earlier candidate
    with pytest.raises(ValueError):
        rerank.mbr_select([])


def test_question_bonus_counts_shared_chinese_bigrams_up_to_the_cap():
    q = "高血压头晕怎么办？"  # bigrams 高血 血压 压头 头晕 晕怎 怎么 么办
    assert rerank.question_bonus(q, ["多休息。", "高血压要吃药。", "高血压头晕怎么办"]) == \
        pytest.approx([0.0, 0.1 * 2 / 10, 0.1 * 7 / 10])
    assert rerank.question_bonus(q, ["高血压头晕"], weight=1.0, cap=3) == [1.0]  # 4 shared, capped at 3


def test_mbr_question_prefers_the_candidate_about_the_question_among_near_equals():
    q = "孩子发烧咳嗽怎么办？"
    pair = ["建议多喝水，注意休息。", "孩子发烧咳嗽，建议多喝水。"]  # two candidates agree with each other equally
    assert rerank.mbr_select(pair) == 0  # a tie: the earlier one
    assert rerank.mbr_select(pair, bonus=rerank.question_bonus(q, pair)) == 1  # the one that takes up the question
    # the bonus is small: an answer about the question that the others do not support stays out
    odd = ["建议多喝水，注意休息。", "建议多喝水，注意休息，必要时就医。", "孩子发烧咳嗽"]
    assert rerank.mbr_select(odd, bonus=rerank.question_bonus(q, odd)) == 0


def test_pmi_bonus_rewards_what_the_question_makes_likely_not_what_is_likely_anyway():
    # a stock answer: 20 nats with the question, 21 without (1 nat over 10 tokens); a specific one: 30 with, 45 without
    bonus = rerank.pmi_bonus([20.0, 30.0], [21.0, 45.0], [10, 10], weight=0.2)
    assert bonus == pytest.approx([0.02, 0.3])
    assert rerank.pmi_bonus([5.0], [4.0], [0], 1.0) == [-1.0]  # the question made it less likely; no division by 0
    # the stock answer is the consensus of three; the bonus turns the choice to the specific one only when weighted
    texts = ["建议多喝水，注意休息。", "建议多喝水，注意休息。", "孩子发烧咳嗽，建议多喝水。"]
    pmi = rerank.pmi_bonus([20.0, 20.0, 30.0], [21.0, 21.0, 45.0], [10, 10, 10], weight=1.0)
    assert rerank.mbr_select(texts) == 0 and rerank.mbr_select(texts, bonus=pmi) == 2


IDEOGRAPHS = lambda ids: "".join(chr(0x4E00 + i) for i in ids if i > 2)  # token ids -> text, <eos> and below dropped


def pmi_picks_by_hand(model, prompts, knobs, seed):
    """The candidates generate_best samples for `prompts` with `knobs` (tokens as ideographs, eos 2) and, computed
    by hand, the one per prompt its MBR + PMI rule keeps -> (outs, texts, skip, picks). The PMI counts the first
    knobs.pmi_tokens tokens of each answer (its <eos> included where it ended), all of them when 0."""
    k, new, n = knobs.candidates, knobs.max_new_tokens, knobs.pmi_tokens
    rows = [p for p in prompts for _ in range(k)]
    outs = generate.generate(model, rows, knobs, eos_id=2, generator=torch.Generator().manual_seed(seed))
    texts = [IDEOGRAPHS(o) for o in outs]
    skip = [not t or len(o) >= new for o, t in zip(outs, texts)]
    heads = [(o + [2] if len(o) < new else o)[:n or None] for o in outs]
    given = [nats_by_hand(model, p, h) for p, h in zip(rows, heads)]
    alone = [nats_by_hand(model, [1], h) for h in heads]  # after the template's <bos> only
    pmi = rerank.pmi_bonus(given, alone, [len(h) for h in heads], knobs.pmi_weight)
    picks = [rerank.mbr_select(texts[b * k:(b + 1) * k], skip[b * k:(b + 1) * k], pmi[b * k:(b + 1) * k])
             for b in range(len(prompts))]
    return outs, texts, skip, picks


def test_generate_best_with_pmi_weight_scores_each_candidate_with_and_without_its_question():
    model, k, prompts = tiny_model(), 4, [[5, 6, 7, 1], [8, 9, 1]]
    knobs = generate.Sampling(max_new_tokens=6, temperature=1.0, top_k=4, candidates=k, rerank="mbr", pmi_weight=5.0)
    outs, texts, skip, picks = pmi_picks_by_hand(model, prompts, knobs, seed=3)
    best = rerank.generate_best(model, prompts, knobs, decode=IDEOGRAPHS, eos_id=2,
                                generator=torch.Generator().manual_seed(3))
    assert best == [outs[b * k + picks[b]] for b in range(2)]
    plain = [rerank.mbr_select(texts[b * k:(b + 1) * k], skip[b * k:(b + 1) * k]) for b in range(2)]
    assert picks != plain  # at this weight the PMI decides: the test would fail if the bonus were ignored
    assert knobs.rule() == "mbr + PMI x 5" and "kept by mbr + PMI x 5" in knobs.describe()


def test_pmi_tokens_scores_only_the_opening_of_each_candidate(monkeypatch):
    model, k, prompts = tiny_model(), 4, [[5, 6, 7, 1], [8, 9, 1], [4, 3, 1]]
    knobs = generate.Sampling(max_new_tokens=6, temperature=1.0, top_k=4, candidates=k, rerank="mbr", pmi_weight=5.0,
                              pmi_tokens=2)
    outs, _, _, picks = pmi_picks_by_hand(model, prompts, knobs, seed=1)
    scored_lengths = []  # every teacher-forced pass scores the openings only: no pass over the whole answers
    nats = rerank.answer_nats
    monkeypatch.setattr(rerank, "answer_nats", lambda m, rows, answers, *a: scored_lengths.extend(map(len, answers))
                        or nats(m, rows, answers, *a))
    best = rerank.generate_best(model, prompts, knobs, decode=IDEOGRAPHS, eos_id=2,
                                generator=torch.Generator().manual_seed(1))
    assert best == [outs[b * k + picks[b]] for b in range(3)]
    assert scored_lengths and max(scored_lengths) <= 2
    whole = dataclasses.replace(knobs, pmi_tokens=0)  # the whole answer's PMI picks otherwise here
    assert rerank.generate_best(model, prompts, whole, decode=IDEOGRAPHS, eos_id=2,
                                generator=torch.Generator().manual_seed(1)) != best
    assert knobs.rule() == "mbr + PMI x 5 (first 2 tokens)"
    with pytest.raises(ConfigError, match="pmi_tokens must be >= 0"):
        generate.Sampling(pmi_weight=1.0, pmi_tokens=-1).validate()


def test_likelihood_picks_the_best_mean_log_prob_per_token():
    nats, n = [10.0, 6.0, 3.0], [5, 2, 3]  # mean log-probs -2, -3, -1
    assert rerank.likelihood_select(nats, n) == 2
    assert rerank.likelihood_select(nats, n, skip=[False, False, True]) == 0
    assert rerank.likelihood_select([4.0, 2.0], [2, 1]) == 0  # a tie goes to the earlier one
    with pytest.raises(ValueError):
        rerank.likelihood_select([1.0], [1, 2])


# ---- teacher-forced scores --------------------------------------------------------------------------

def test_answer_nats_equals_log_probs_by_hand_in_padded_chunked_batches(monkeypatch):
    model = tiny_model()
    prompts = [[5, 6, 1], [7, 8, 9, 10, 11, 1], [12, 1]]
    answers = [[20, 21, 2], [22, 2], [23, 24, 25, 26, 27, 2]]
    want = [nats_by_hand(model, p, a) for p, a in zip(prompts, answers)]
    monkeypatch.setattr(scoring, "LOGIT_ROWS", 4)  # several logit chunks per batch
    got = scoring.answer_nats(model, prompts, answers, 2, "cpu", torch.float32)  # padded rows of mixed lengths
    assert got == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="<= 32 tokens"):
        scoring.answer_nats(model, [[5] * 30], [[6] * 4], 2, "cpu", torch.float32)


def test_fit_pair_keeps_the_questions_end_and_the_answers_start():
    p, a = list(range(100, 110)), list(range(200, 210))
    assert scoring.fit_pair(p, a, 20) == (p, a, False)
    assert scoring.fit_pair(p, a, 12) == (p[-6:], a[:6], True)  # the prompt keeps half the room at least
    assert scoring.fit_pair(p[:3], a, 12) == (p[:3], a[:9], True)  # a short prompt stays whole


def test_reference_bpb_is_answer_nats_over_answer_bytes():
    model, tok = tiny_model(max_seq_len=16), FakeTokenizer()
    questions, refs = ["头痛怎么办", "发烧"], ["多休息。", "多喝水，退烧后观察两三天，不退再去医院。"]
    info = scoring.reference_bpb(model, tok, questions, refs, 8, "cpu", torch.float32)
    # question <bos> answer <eos> in the template; the second is 2 + 1 + 20 + 1 = 24 > 17 tokens: its answer is cut
    ids0, sup0 = render(tok, [{"role": "user", "content": questions[0]}, {"role": "assistant", "content": refs[0]}])
    first = sup0.index(True)
    ids1 = render(tok, [{"role": "user", "content": questions[1]}, {"role": "assistant", "content": refs[1]}])[0]
    kept1 = ids1[3:17]  # the prompt "发烧" <bos> whole, then the first 14 answer tokens (no <eos>)
    nats = nats_by_hand(model, ids0[:first], ids0[first:]) + nats_by_hand(model, ids1[:3], kept1)
    n_bytes = len(refs[0].encode()) + len(refs[1][:14].encode())
    assert info["cut"] == 1 and info["answers"] == 2 and info["tokens"] == 5 + 14 and info["bytes"] == n_bytes
    assert info["bits_per_byte"] == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-5)


# ---- candidate decoding -----------------------------------------------------------------------------

@pytest.mark.parametrize("rule", ["mbr", "likelihood"])
def test_generate_best_keeps_the_candidate_its_rule_picks_and_is_seeded(rule):
    model = tiny_model()
    decode = lambda ids: "".join(chr(0x4E00 + i) for i in ids if i > 2)  # a distinct character per id
    prompts, k, new = [[5, 6, 7, 1], [8, 9, 1]], 5, 6
    # top-4: candidates that share tokens, so MBR has a say
    knobs = generate.Sampling(max_new_tokens=new, temperature=1.0, top_k=4, no_repeat_ngram=3, candidates=k,
                              rerank=rule)
    rows = [p for p in prompts for _ in range(k)]
    outs = generate.generate(model, rows, knobs, eos_id=2, generator=torch.Generator().manual_seed(3))
    texts = [decode(o) for o in outs]
    skip = [not t or len(o) >= new for o, t in zip(outs, texts)]
    if rule == "mbr":
        picks = [rerank.mbr_select(texts[b * k:(b + 1) * k], skip[b * k:(b + 1) * k]) for b in range(2)]
    else:
        scored = [o + [2] if len(o) < new else o for o in outs]
        nats = [nats_by_hand(model, p, s) for p, s in zip(rows, scored)]
        picks = [rerank.likelihood_select(nats[b * k:(b + 1) * k], [len(s) for s in scored[b * k:(b + 1) * k]],
                                          skip[b * k:(b + 1) * k]) for b in range(2)]
    want = [outs[b * k + picks[b]] for b in range(2)]
    best = lambda seed: rerank.generate_best(model, prompts, knobs, decode=decode, eos_id=2,
                                             generator=torch.Generator().manual_seed(seed))
    assert best(3) == want and best(3) == want  # the same seed, the same answers
    assert picks != [0, 0] and len(set(map(tuple, outs))) == 2 * k  # not merely the first of distinct candidates
    with pytest.raises(ValueError, match="rerank must be"):
        rerank.generate_best(model, prompts, dataclasses.replace(knobs, rerank="best"), decode=decode, eos_id=2)


def test_generate_best_after_sampled_starts_keeps_one_beam_answer_per_start():
    """--candidates=K with --beams and --beam_prefix: K rows per prompt through beam.beam_search (each its own
    sampled start), then the rule's pick; the same seed gives the same answers."""
    from beam import beam_search

    model = tiny_model()
    decode = lambda ids: "".join(chr(0x4E00 + i) for i in ids if i > 2)
    prompts, k = [[5, 6, 7, 1], [8, 9, 1]], 4
    knobs = generate.Sampling(max_new_tokens=8, temperature=1.0, top_k=8, beams=3, beam_prefix=2, candidates=k,
                              rerank="mbr_question")
    rows = [p for p in prompts for _ in range(k)]
    outs = beam_search(model, rows, knobs, eos_id=2, generator=torch.Generator().manual_seed(5))
    texts = [decode(o) for o in outs]
    skip = [not t or len(o) >= 8 for o, t in zip(outs, texts)]
    picks = [rerank.mbr_select(texts[b * k:(b + 1) * k], skip[b * k:(b + 1) * k],
                               rerank.question_bonus(decode(prompts[b]), texts[b * k:(b + 1) * k])) for b in range(2)]
    best = lambda seed: rerank.generate_best(model, prompts, knobs, decode=decode, eos_id=2,
                                             generator=torch.Generator().manual_seed(seed))
    assert best(5) == [outs[b * k + picks[b]] for b in range(2)] == best(5)
    assert len({tuple(o[:2]) for o in outs}) > 2  # the starts differ: K candidates, not K copies of one beam answer


def test_generate_best_never_keeps_a_degenerate_candidate(monkeypatch):
    """A stand-in generate() returns, per prompt: a loop, an empty answer, one cut at the limit, three good answers."""
    texts = ["多喝水。" * 4, "", "多喝水，多休息，必要时就医。多", "多喝水，多休息。", "多喝水，必要时就医。", "必要时就医。"]
    tok = FakeTokenizer()
    ids = [tok.encode(t) for t in texts]  # the loop and the cut one reach the limit of 15 tokens
    monkeypatch.setattr(rerank, "generate", lambda model, rows, knobs, **kw: [list(i) for _ in range(len(rows) // 6)
                                                                            for i in ids])
    knobs = lambda rule: generate.Sampling(max_new_tokens=15, temperature=1.0, candidates=6, rerank=rule)
    best = lambda rule: rerank.generate_best(tiny_model(), [[5, 1], [6, 1]], knobs(rule), decode=tok.decode, eos_id=2)
    assert rerank.mbr_select(texts) == 2  # counted, the cut one would be the consensus
    assert best("mbr") == [ids[4], ids[4]]  # the consensus of the good three
    # likelihood: the loop, the empty and the cut answers are the likeliest per token, then the last good one
    monkeypatch.setattr(rerank, "answer_nats", lambda model, rows, answers, *a: [0.1, 0.0, 0.2, 9.0, 6.0, 1.0] * 2)
    assert best("likelihood") == [ids[5], ids[5]]


def test_eval_default_decoding_is_sampled_starts_and_beams_and_steps_aside_for_greedy_or_plain_beams(tmp_path):
    pool = tmp_path / "train.jsonl"
    pool.write_text(json.dumps({"conversations": [{"role": "user", "content": "头疼"},
                                                  {"role": "assistant", "content": "多休息"}]}) + "\n")
    # eval.py's default: 4 sampled starts, 8 beams each, one kept by the answers to like questions of the SFT data
    cfg = parse_config(ev.EvalConfig, [f"--answer_pool={pool}"])
    assert (cfg.beams, cfg.beam_prefix, cfg.candidates, cfg.temperature, cfg.top_p, cfg.rerank) == \
        (8, 8, 4, 0.8, 0.9, "pool")
    assert (cfg.pmi_weight, cfg.pmi_tokens, cfg.pool_answers) == (0.02, 8, 16)  # and a little of the opening's PMI
    assert ev.decoding_word(cfg) == ("beam search (8 beams, the first 8 tokens sampled, 4 starts, one kept by "
                                     "pool + PMI x 0.02 (first 8 tokens); beams biased x 0.5 to the pool's words)")
    assert rerank.pool_fallback(cfg, cfg.answer_pool) == "" and cfg.rerank == "pool"
    # without the SFT data (a checkpoint alone) the candidates' own consensus decides, and the run says so
    for extra in ([], ["--rerank=pool"]):
        alone = parse_config(ev.EvalConfig, [f"--answer_pool={tmp_path / 'none.jsonl'}", *extra])
        note = rerank.pool_fallback(alone, alone.answer_pool)
        assert alone.rerank == "mbr_question"
        assert note.startswith(f"note: no {tmp_path / 'none.jsonl'} (the SFT conversations whose answers --rerank=pool")
    greedy = parse_config(ev.EvalConfig, [f"--answer_pool={tmp_path / 'none.jsonl'}", "--beams=1"])
    assert rerank.pool_fallback(greedy, greedy.answer_pool) == "" and greedy.rerank == "pool"  # one answer: no rule
    greedy = parse_config(ev.EvalConfig, ["--beams=1"])
    assert (greedy.beam_prefix, greedy.candidates, greedy.temperature, greedy.top_p) == (0, 1, 0.0, 1.0)
    assert ev.decoding_word(greedy) == "greedy"
    plain = parse_config(ev.EvalConfig, ["--beam_prefix=0"])
    assert (plain.beams, plain.candidates, plain.temperature, plain.top_p) == (8, 1, 0.0, 1.0)
    assert ev.decoding_word(plain) == "beam search (8 beams)"
    sampled = parse_config(ev.EvalConfig, ["--beams=1", "--temperature=0.7"])  # what the user sets stays
    assert (sampled.candidates, sampled.temperature, sampled.top_p) == (1, 0.7, 1.0)
    # a config built in code reads the same way: --beams=1 there is greedy too
    built = ev.EvalConfig(beams=1)
    built.resolve_decoding()
    assert (built.beam_prefix, built.candidates, built.temperature) == (0, 1, 0.0)


def test_candidate_flags_are_validated_in_one_line():
    cfg = parse_config(ev.EvalConfig, ["--beams=1", "--candidates=4", "--temperature=0.7", "--rerank=mbr"])
    assert cfg.beams == 1 and cfg.candidates == 4
    assert "4 sampled candidates kept by mbr, sampling temperature 0.7" in cfg.describe()
    assert parse_config(ChatConfig, ["--candidates=3"]).candidates == 3
    for argv, msg in [(["--candidates=4", "--beams=4", "--beam_prefix=0"], "candidates 4 and beams 4: beam search is "
                       "deterministic, its candidates would be alike; pass --beams=1, --candidates=1 or "
                       "--beam_prefix=N (K sampled starts, each continued by the beams)"),
                      (["--beams=1", "--candidates=4"], "candidates 4: greedy decoding would give 4 identical answers; "
                                                        "sample with --temperature > 0 (e.g. --temperature=0.7)"),
                      (["--rerank=best"], "rerank must be mbr|likelihood|mbr_question|pool, got 'best'"),
                      (["--candidates=0"], "candidates must be in 1..64 (1 = off), got 0"),
                      (["--question_weight=2"], "question_weight must be in 0..1, got 2.0"),
                      (["--pmi_weight=-1"], "pmi_weight must be in 0..10, got -1.0")]:
        with pytest.raises(ConfigError) as e:
            parse_config(ev.EvalConfig, argv)
        assert str(e.value) == msg
    with pytest.raises(ConfigError, match="candidates would be alike"):
        parse_config(ChatConfig, ["--candidates=2", "--beams=2"])
    r = run_script("eval.py", ["--candidates=4", "--beams=2", "--beam_prefix=0"], check=False, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "candidates would be alike" in r.stderr
    # starts sampled, beams after them: the description says both
    cfg = parse_config(ev.EvalConfig, ["--candidates=4", "--beam_prefix=8", "--temperature=0.7", "--top_p=0.9"])
    assert cfg.beams == 8 and cfg.describe().startswith("beam search, the first 8 tokens sampled at temperature 0.7")
    assert cfg.describe().endswith("4 starts per question, one kept by pool + PMI x 0.02 (first 8 tokens); beams "
                                   "biased x 0.5 to the pool's words")


def test_evaluate_with_candidates_reports_them_and_repeats_under_the_seed(tmp_path):
    model, tok = tiny_model(), FakeTokenizer()
    rows = [{"question": f"问题{i}怎么办", "answer": f"答案{i}。"} for i in range(5)]
    data = write_jsonl(tmp_path / "qa.jsonl", rows)
    tok.encode("".join(r["question"] + r["answer"] for r in rows))  # every id named before the first answer is decoded

    def run(seed, out):
        cfg = ev.EvalConfig(ckpt=str(tmp_path / "best.pt"), data=data, val_bin="none", max_new_tokens=6, batch_size=2,
                            beams=1, candidates=3, temperature=1.0, rerank="likelihood", seed=seed,
                            out_dir=str(tmp_path / out))
        cfg.validate()
        return ev.evaluate(cfg, model, tiny_ckpt(model), tok, cfg.ckpt, torch.device("cpu"), torch.float32,
                           progress=False)

    a, b = run(1, "a"), run(1, "b")
    assert [r["answer"] for r in a["results"]] == [r["answer"] for r in b["results"]]
    assert a["protocol"]["decoding"].startswith("3 sampled candidates kept by likelihood, sampling temperature 1.0")
    assert a["scores"]["reference_bpb"] > 0 and a["references"]["openings"] == 5  # "答案0。" ... all distinct
    assert "## Stock answers" in (tmp_path / "a" / "eval_report.md").read_text(encoding="utf-8")


def test_eval_and_chat_cli_with_candidates(tmp_path, tokenizer_path):
    from chatglm_tokenizer import tokenizer_sha256

    model = tiny_model(max_seq_len=64, vocab_size=64793)
    checkpoint.save_checkpoint(tiny_ckpt(model, sha=tokenizer_sha256(tokenizer_path)), str(tmp_path / "best.pt"))
    data = write_jsonl(tmp_path / "qa.jsonl", [{"question": "头疼怎么办？", "answer": "注意休息，多喝水。"}] * 3)
    r = run_script("eval.py", [f"--ckpt={tmp_path}", f"--data={data}", "--device=cpu", "--max_new_tokens=8",
                               "--val_bin=none", f"--tokenizer={tokenizer_path}", "--beams=1", "--candidates=3", "--temperature=0.8",
                               "--rerank=mbr"], timeout=120)
    assert "3 candidates at temperature 0.8, kept by mbr" in r.stdout
    saved = json.loads((tmp_path / "eval_report.json").read_text(encoding="utf-8"))
    assert saved["samples"] == 3 and saved["protocol"]["decoding"].startswith("3 sampled candidates kept by mbr")
    assert saved["references"]["duplicate"] == 1.0 and saved["scores"]["reference_bpb"] > 0
    r = run_script("chat.py", [f"--ckpt={tmp_path}", "--device=cpu", "--max_new_tokens=5", f"--tokenizer={tokenizer_path}",
                               "--candidates=3", "--rerank=likelihood"], stdin="你好\n感冒了怎么办？\n", timeout=120)
    assert "你> 感冒了怎么办？" in r.stdout and r.stdout.count("模型> ") == 2


def test_pool_rule_keeps_the_candidate_most_like_the_answers_to_like_questions():
    pairs = [("头疼怎么办", "头疼要多休息，注意睡眠。"), ("头疼还恶心", "头疼伴恶心要多休息，注意血压。"),
             ("咳嗽有痰", "咳嗽有痰可以喝水化痰。"), ("膝盖疼", "膝盖疼要少爬楼梯。")]
    pool = rerank.AnswerPool(pairs)
    assert pool.answers(["我头疼怎么办"], 2) == [["头疼要多休息，注意睡眠。", "头疼伴恶心要多休息，注意血压。"]]
    assert pool.answers(["咳嗽"], 1) == [["咳嗽有痰可以喝水化痰。"]]
    texts = ["多喝水化痰。", "头疼多休息，注意睡眠。", "少爬楼梯。"]
    # the candidates' own consensus and the evidence pick differently: each is what its rule says
    assert rerank.mbr_select(texts, evidence=pool.answers(["头疼怎么办"], 2)[0]) == 1
    assert rerank.mbr_select(texts, evidence=pool.answers(["膝盖疼"], 1)[0]) == 2
    sims = lambda i, ev: sum(rerank.chrf(rerank.char_ngrams(texts[i]), rerank.char_ngrams(e)) for e in ev) / len(ev)
    ev = pool.answers(["咳嗽有痰"], 3)[0]
    assert rerank.mbr_select(texts, evidence=ev) == max(range(3), key=lambda i: (sims(i, ev), -i))


def test_generate_best_with_the_pool_rule_uses_each_prompts_own_evidence(monkeypatch):
    tok = FakeTokenizer()
    answers = ["头疼多休息。", "膝盖疼少爬楼梯。"]
    ids = [tok.encode(a) for a in answers]
    monkeypatch.setattr(rerank, "generate", lambda model, rows, *a, **k: [ids[0], ids[1]] * (len(rows) // 2))
    pool = rerank.AnswerPool([("头疼", "头疼要多休息。"), ("膝盖疼", "膝盖疼要少爬楼梯。")])
    knobs = generate.Sampling(temperature=0.7, candidates=2, rerank="pool", pool_answers=1, question_weight=0.0)
    prompts = [tok.encode("头疼") + [1], tok.encode("膝盖疼") + [1]]
    best = rerank.generate_best(tiny_eval_model(), prompts, knobs, decode=tok.decode, eos_id=2, pool=pool)
    assert best == [ids[0], ids[1]]
    with pytest.raises(DataError, match="rerank=pool needs the fine-tuning conversations"):
        rerank.generate_best(tiny_eval_model(), prompts, knobs, decode=tok.decode, eos_id=2)


def test_chat_with_the_pool_rule_keeps_what_generate_best_keeps_with_that_pool(tmp_path, monkeypatch):
    import io

    from chat import chat_loop
    pairs = [("头疼怎么办", "头疼要多休息。"), ("膝盖疼", "膝盖疼要少爬楼梯。")]
    write_jsonl(tmp_path / "train.jsonl", [{"conversations": [{"role": "user", "content": q},
                                                               {"role": "assistant", "content": a}]} for q, a in pairs])
    tok = FakeTokenizer()
    answers = [tok.encode(a) for a in ("少爬楼梯。", "头疼多休息。", "多喝水。")]
    monkeypatch.setattr(rerank, "generate", lambda model, rows, *a, **k: answers * (len(rows) // 3))
    cfg = parse_config(ChatConfig, ["--candidates=3", "--rerank=pool", "--pool_answers=1", "--question_weight=0",
                                    f"--answer_pool={tmp_path / 'train.jsonl'}", "--max_new_tokens=8"])
    out = io.StringIO()
    history = chat_loop(tiny_eval_model(max_seq_len=32), tok, "sft", cfg, iter(["头疼怎么办"]), 32,
                        torch.device("cpu"), torch.float32, out)
    assert history[1]["content"] == "头疼多休息。"  # the candidate most like the answer to the nearest question
    cfg.answer_pool = str(tmp_path / "none.jsonl")  # without the file: the note, and the candidates' consensus
    assert rerank.pool_fallback(cfg, cfg.answer_pool).startswith("note: no ") and cfg.rerank == "mbr_question"
