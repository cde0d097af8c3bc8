"""beam.py: beam search equals greedy at one beam and an exhaustive search when the beams cover the whole tree,
batching changes nothing, no repeated n-grams, one-line knob errors, eval.py --beams end to end.

Run: python -m pytest -q tests/test_beam.py   (CPU, a few seconds; no tokenizer or data needed)
"""
import dataclasses
import itertools
import json
import math

import pytest
import torch

import beam
import eval as ev
import generate
from babyllama.config import parse_config
from babyllama.errors import ConfigError
from conftest import (PROMPTS, FakeTokenizer, lively_model, repeats_an_ngram, run_main, sampling, tiny_ckpt,
                      tiny_eval_model, write_jsonl)
from generate import Sampling

torch.set_num_threads(1)


@pytest.mark.parametrize("no_repeat_ngram", [0, 3])
def test_one_beam_is_greedy_decoding(no_repeat_ngram):
    model = lively_model()
    for eos in (None, 2, 7):
        greedy = generate.generate(model, PROMPTS, sampling(14, no_repeat_ngram=no_repeat_ngram), eos_id=eos)
        one_beam = Sampling(max_new_tokens=14, beams=1, no_repeat_ngram=no_repeat_ngram)
        assert beam.beam_search(model, PROMPTS, one_beam, eos_id=eos) == greedy


def sequence_logprob(model, prompt, tokens) -> float:
    """Sum of log p(token | prompt, earlier tokens) from one full forward without cache (the reference)."""
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logp = torch.log_softmax(model.logits(model.hidden(ids)).float(), dim=-1)[0]  # (T, V)
    return sum(logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(tokens))


def all_answers(vocab: int, eos: int, depth: int):
    """Every answer the search can give: up to depth tokens ending in eos, or depth tokens without eos."""
    body = [t for t in range(vocab) if t != eos]
    for n in range(depth):
        yield from (list(s) + [eos] for s in itertools.product(body, repeat=n))
    yield from (list(s) for s in itertools.product(body, repeat=depth))


@pytest.mark.parametrize("length_penalty", [1.0, 0.0, 2.0])
def test_beams_covering_the_tree_find_the_best_scored_answer(length_penalty):
    """Vocab 8, 3 new tokens: 343 + 57 answers, fewer than 400 beams, so the search is exhaustive and must return
    the answer with the best sum_logprob / length ** length_penalty (length with the eos)."""
    V, eos, depth = 8, 2, 3
    differs = False
    for seed, prompt in ((2, [3, 5, 1]), (6, [7]), (7, [7]), (0, [4, 4, 6, 0])):
        model = lively_model(seed, vocab_size=V, pad_vocab_multiple=1)
        best, best_score = None, -math.inf
        for ans in all_answers(V, eos, depth):
            s = sequence_logprob(model, prompt, ans) / len(ans) ** length_penalty
            if s > best_score:
                best, best_score = ans, s
        every = Sampling(max_new_tokens=depth, beams=400, length_penalty=length_penalty, no_repeat_ngram=0)
        got = beam.beam_search(model, [prompt], every, eos_id=eos)[0]
        assert got == [t for t in best if t != eos], (seed, got, best)
        differs |= got != generate.generate(model, [prompt], sampling(depth), eos_id=eos)[0]
    assert differs  # seeds 2 and 6: the best answer starts with a token greedy decoding does not follow up


def test_a_prompt_alone_equals_it_in_a_batch_of_other_lengths():
    model = lively_model()
    for k, lp in ((3, 1.0), (4, 0.5)):
        knobs = Sampling(max_new_tokens=12, beams=k, length_penalty=lp)
        batch = beam.beam_search(model, PROMPTS, knobs, eos_id=7)
        alone = [beam.beam_search(model, [p], knobs, eos_id=7)[0] for p in PROMPTS]
        assert batch == alone
    # an eos the model likes: prompts finish at different steps and leave the batch
    eos = generate.generate(model, [PROMPTS[0]], sampling(1))[0][0]
    batch = beam.beam_search(model, PROMPTS, Sampling(max_new_tokens=12, beams=3), eos_id=eos)
    assert batch == [beam.beam_search(model, [p], Sampling(max_new_tokens=12, beams=3), eos_id=eos)[0] for p in PROMPTS]
    assert all(eos not in r for r in batch) and len(batch[0]) < 12


def test_no_repeated_ngrams_and_long_prompts_keep_their_end():
    model = lively_model(max_seq_len=24)
    free = beam.beam_search(model, PROMPTS, Sampling(max_new_tokens=16, beams=3, no_repeat_ngram=0), eos_id=None)
    for n in (2, 3):
        out = beam.beam_search(model, PROMPTS, Sampling(max_new_tokens=16, beams=3, no_repeat_ngram=n), eos_id=None)
        assert all(len(r) == 16 and not repeats_an_ngram(r, n) for r in out), (n, out)
    assert any(repeats_an_ngram(r, 2) for r in free)  # the ban changed something
    # 12 + 16 - 1 > 24: the prompt keeps its last 24 - 16 + 1 = 9 tokens
    long = PROMPTS[2]
    knobs = Sampling(max_new_tokens=16, beams=3)
    assert beam.beam_search(model, [long], knobs) == beam.beam_search(model, [long[-9:]], knobs)
    with pytest.raises(ValueError, match=r"max_new_tokens 25\b.*\b24-token"):
        beam.beam_search(model, [long], Sampling(max_new_tokens=25, beams=3))


@pytest.mark.parametrize("argv,message", [
    (["--beams=0"], "beams"), (["--beams=2", "--beam_prefix=0", "--temperature=0.7"], "--beams=1"),
    (["--beams=2", "--beam_prefix=0", "--top_p=0.9"], "deterministic"), (["--length_penalty=nan"], "length_penalty"),
])
def test_bad_beam_knobs_are_one_line_errors(argv, message):
    with pytest.raises(ConfigError) as err:
        parse_config(ev.EvalConfig, argv)
    assert message in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="beams >= 1"):
        beam.beam_search(lively_model(), PROMPTS, Sampling(max_new_tokens=4, beams=0))


def test_eval_with_beams_records_them_and_answers_with_beam_search(tmp_path):
    tok, model = FakeTokenizer(), lively_model(vocab_size=96, max_seq_len=32)
    rows = [{"question": f"问题{i}是什么", "answer": f"答案{i}"} for i in range(3)]
    cfg = parse_config(ev.EvalConfig, [f"--ckpt={tmp_path / 'best.pt'}", f"--data={write_jsonl(tmp_path / 'qa.jsonl', rows)}",
                                       "--val_bin=none", "--max_new_tokens=6", "--batch_size=2", "--beams=2",
                                       "--beam_prefix=0"])
    ev.evaluate(cfg, model, tiny_ckpt(model), tok, str(tmp_path / "best.pt"), torch.device("cpu"), torch.float32,
                progress=False)
    with open(tmp_path / "eval_report.json", encoding="utf-8") as f:
        saved = json.load(f)
    assert saved["config"]["beams"] == 2 and saved["config"]["length_penalty"] == 1.0
    assert saved["protocol"]["decoding"].startswith("beam search, 2 beams, length_penalty 1.0, no_repeat_ngram 3")
    from chatglm_tokenizer.template import render_prompt
    prompts = [render_prompt(tok, [], r["question"], max_len=32 - 6) for r in rows]
    want = beam.beam_search(model, prompts, Sampling(max_new_tokens=6, beams=2), eos_id=tok.eos_id)
    assert [r["answer"] for r in saved["results"]] == [tok.decode(w).strip() for w in want]


def test_chat_with_beams_prints_the_beam_search_answer():
    import io

    from chat import ChatConfig, chat_loop
    from chatglm_tokenizer.template import render_prompt
    tok, model, out = FakeTokenizer(), lively_model(vocab_size=96, max_seq_len=32), io.StringIO()
    cfg = parse_config(ChatConfig, ["--beams=3", "--temperature=0", "--top_p=1.0", "--repetition_penalty=1.0",
                                    "--max_new_tokens=6"])
    history = chat_loop(model, tok, "sft", cfg, iter(["头疼怎么办"]), 32, torch.device("cpu"), torch.float32, out)
    want = beam.beam_search(model, [render_prompt(tok, [], "头疼怎么办")], Sampling(max_new_tokens=6, beams=3),
                            eos_id=tok.eos_id)[0]
    assert history[1]["content"] == tok.decode(want).strip() != ""
    assert out.getvalue() == f"模型> {tok.decode(want)}\n"


def test_eval_cli_with_beams_end_to_end(tmp_path, tokenizer_path, monkeypatch, capsys):
    from chatglm_tokenizer import tokenizer_sha256
    from babyllama.checkpoint import save_checkpoint

    model = tiny_eval_model(max_seq_len=64, vocab_size=64793)
    save_checkpoint(tiny_ckpt(model, sha=tokenizer_sha256(tokenizer_path)), str(tmp_path / "best.pt"))
    data = write_jsonl(tmp_path / "qa.jsonl", [{"question": "头疼怎么办？", "answer": "注意休息，多喝水。"}] * 2)
    capsys.readouterr()
    run_main(ev, [f"--ckpt={tmp_path}", f"--data={data}", "--device=cpu", "--max_new_tokens=8", "--val_bin=none",
                  "--beams=2", "--beam_prefix=0", f"--tokenizer={tokenizer_path}"], monkeypatch)  # eval.py's main, in this process
    stdout = capsys.readouterr().out
    assert "beam search (2 beams)" in stdout and stdout.strip().splitlines()[-2].startswith("BLEU-4 (nltk")
    with open(tmp_path / "eval_report.json", encoding="utf-8") as f:
        assert json.load(f)["config"]["beams"] == 2


def test_prompts_shorter_than_the_ngram_ban():
    """A 1- or 2-token prompt with no_repeat_ngram=3: the first steps have no 3-gram yet (was an unfold error in both
    beam search and the reference decoder)."""
    model = lively_model()
    for prompt in ([5], [5, 6]):
        got = beam.beam_search(model, [prompt], Sampling(max_new_tokens=8, beams=3, no_repeat_ngram=3), eos_id=None)[0]
        assert len(got) == 8 and not repeats_an_ngram(got, 3)
        knobs = sampling(8, no_repeat_ngram=3)
        steps = list(generate.decode(model, [prompt], knobs, eos_id=None, use_cache=True, generator=None))
        assert [s[0] for s in steps] == generate.generate(model, [prompt], knobs, eos_id=None)[0]


def test_a_sampled_start_is_continued_by_the_beams():
    """--beam_prefix=N: the first N tokens sampled (generate.generate with the sampling knobs), the rest beam search
    from prompt + start; the same seed gives the same answers, other seeds other openings."""
    model = lively_model()
    knobs = Sampling(max_new_tokens=12, beams=3, beam_prefix=4, temperature=0.9, top_p=0.95)
    seeded = lambda s: torch.Generator().manual_seed(s)
    got = beam.beam_search(model, PROMPTS, knobs, eos_id=None, generator=seeded(5))
    starts = generate.generate(model, PROMPTS, Sampling(max_new_tokens=4, temperature=0.9, top_p=0.95), eos_id=None,
                               generator=seeded(5))
    tails = beam.beam_search(model, [p + s for p, s in zip(PROMPTS, starts)], Sampling(max_new_tokens=8, beams=3),
                             eos_id=None)
    assert got == [s + t for s, t in zip(starts, tails)] and all(len(a) == 12 for a in got)
    assert beam.beam_search(model, PROMPTS, knobs, eos_id=None, generator=seeded(5)) == got
    openings = {tuple(beam.beam_search(model, PROMPTS[:1], knobs, eos_id=None, generator=seeded(s))[0][:4])
                for s in range(8)}
    assert len(openings) > 1
    # a start that fills the answer is the answer; a start that ends at <eos> too (generate stops the row there)
    whole = dataclasses.replace(knobs, max_new_tokens=4)
    assert beam.beam_search(model, PROMPTS, whole, eos_id=None, generator=seeded(5)) == starts


@pytest.mark.parametrize("argv,message", [
    (["--beam_prefix=4", "--beams=1", "--temperature=0.7"], "--beams > 1"),
    (["--beam_prefix=4", "--temperature=0"], "--temperature > 0"), (["--beam_prefix=-1"], "beam_prefix must be >= 0"),
])
def test_bad_beam_prefix_knobs_are_one_line_errors(argv, message):
    with pytest.raises(ConfigError) as err:
        parse_config(ev.EvalConfig, argv)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_eval_and_chat_take_a_sampled_start(tmp_path):
    tok, model = FakeTokenizer(), lively_model(vocab_size=96, max_seq_len=32)
    rows = [{"question": f"问题{i}是什么", "answer": f"答案{i}"} for i in range(3)]
    cfg = parse_config(ev.EvalConfig, [f"--ckpt={tmp_path / 'best.pt'}", f"--data={write_jsonl(tmp_path / 'qa.jsonl', rows)}",
                                       "--val_bin=none", "--max_new_tokens=6", "--batch_size=4", "--beams=2",
                                       "--beam_prefix=2", "--temperature=0.8", "--seed=3"])
    ev.evaluate(cfg, model, tiny_ckpt(model), tok, str(tmp_path / "best.pt"), torch.device("cpu"), torch.float32,
                progress=False)
    with open(tmp_path / "eval_report.json", encoding="utf-8") as f:
        saved = json.load(f)
    assert saved["protocol"]["decoding"].startswith("beam search, the first 2 tokens sampled at temperature 0.8")
    from chatglm_tokenizer.template import render_prompt
    prompts = [render_prompt(tok, [], r["question"], max_len=32 - 6) for r in rows]
    order = sorted(range(3), key=lambda i: len(prompts[i]))  # eval batches prompts by length
    want = beam.beam_search(model, [prompts[i] for i in order], Sampling(max_new_tokens=6, beams=2, beam_prefix=2,
                            temperature=0.8), eos_id=tok.eos_id, generator=torch.Generator().manual_seed(3))
    assert [saved["results"][i]["answer"] for i in order] == [tok.decode(w).strip() for w in want]
    from chat import ChatConfig
    chat = parse_config(ChatConfig, ["--beams=4", "--beam_prefix=3"])  # chat's sampling defaults stay for the start
    assert chat.temperature > 0 and chat.beams == 4
