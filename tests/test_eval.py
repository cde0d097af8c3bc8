"""babyllama/bleu.py, eval.py and chat.py: BLEU by hand, perplexity = exp(pretrain val loss), bad input, reports, chat history."""
import io
import json
import math
import os
import re

import numpy as np
import pytest
import torch

import bench
from babyllama import bleu
import eval as ev
import generate
from babyllama import quality
from babyllama import checkpoint
from chat import ChatConfig, chat_loop, fit_history, stream_text
from babyllama.errors import DataError
from conftest import (FAKE_VOCAB, FakeTokenizer, main_error, run_script, sampling, tiny_ckpt, tiny_eval_model,
                      write_jsonl, write_shard)
from dataset import PretrainData
from chatglm_tokenizer.template import render_prompt

torch.set_num_threads(1)
V = FAKE_VOCAB


# ---- BLEU ------------------------------------------------------------------------------------------

def test_identical_text_scores_100_and_disjoint_near_0():
    ref = "高血压患者应该低盐饮食，坚持服药，定期复查血压。"
    assert bleu.mean_sentence_bleu4([ref], [ref]) == pytest.approx(100.0)
    assert bleu.corpus_sacrebleu([ref], [ref])[0] == pytest.approx(100.0)
    other = "今天天气晴朗我们去公园散步吧"
    assert bleu.mean_sentence_bleu4([ref], [other]) < 1.0
    assert bleu.corpus_sacrebleu([ref], [other])[0] == pytest.approx(0.0)
    assert bleu.sentence_bleu4(ref, "") == 0.0


def test_partial_match_equals_hand_computed_ngram_precisions():
    ref, hyp = "a b c d e f".split(), "a b c x e f".split()
    # unigrams 5/6, bigrams ab bc ef = 3/5, trigrams abc = 1/4, 4-grams 0/3 -> method1: 0.1/3; equal lengths, BP = 1
    expected = math.exp(0.25 * (math.log(5 / 6) + math.log(3 / 5) + math.log(1 / 4) + math.log(0.1 / 3)))
    assert bleu.sentence_bleu4_words(ref, hyp) == pytest.approx(expected, rel=1e-9)
    one = "a v w x y z".split()  # unigrams 1/6; no longer match -> epsilon 0.1 over 5, 4, 3 n-grams
    expected = math.exp(0.25 * (math.log(1 / 6) + sum(math.log(0.1 / n) for n in (5, 4, 3))))
    assert bleu.sentence_bleu4_words(ref, one) == pytest.approx(expected, rel=1e-9)
    assert bleu.sentence_bleu4_words(ref, "u v w x y z".split()) == 0.0  # nltk: no unigram match -> 0


def test_reference_and_hypothesis_are_not_swapped():
    long, short = "a b c d e f g h".split(), "a b c d".split()
    # short hypothesis of a long reference: every precision 1, brevity penalty exp(1 - 8/4)
    assert bleu.sentence_bleu4_words(long, short) == pytest.approx(math.exp(-1.0), rel=1e-9)
    # the seed's order (long as the hypothesis): precisions 4/8, 3/7, 2/6, 1/5, no brevity penalty
    assert bleu.sentence_bleu4_words(short, long) == pytest.approx((4 / 8 * 3 / 7 * 2 / 6 * 1 / 5) ** 0.25, rel=1e-9)


def test_words_are_lowercased_jieba_words_without_spaces():
    assert bleu.words("我爱北京天安门") == ["我", "爱", "北京", "天安门"]
    assert bleu.words("Hello World 你好") == ["hello", "world", "你好"]
    # whole-word matching: same characters in other words do not count as a 4-gram match
    assert bleu.sentence_bleu4("我爱北京天安门", "我爱北京天安门") == pytest.approx(1.0)


# ---- perplexity ------------------------------------------------------------------------------------

@pytest.fixture
def val_dir(tmp_path):
    rng = np.random.default_rng(1)
    d = tmp_path / "pre"
    d.mkdir()
    write_shard(str(d / "val_00000.bin"), rng.integers(3, V, 100), "val", V)  # (100-1)//16 = 6 windows
    write_shard(str(d / "val_00001.bin"), rng.integers(3, V, 37), "val", V)  # 2 windows
    write_shard(str(d / "val_00002.bin"), rng.integers(3, V, 10), "val", V)  # too short: none
    write_shard(str(d / "train_00000.bin"), rng.integers(3, V, 50), "train", V)  # never read
    return str(d)


def manual_loss(model, data_dir, seq_len, max_windows=None):
    """Mean CE by hand: windows of seq_len+1 tokens at multiples of seq_len per val shard, log_softmax and gather."""
    nll, count, windows = 0.0, 0, 0
    for name in sorted(os.listdir(data_dir)):
        if not (name.startswith("val_") and name.endswith(".bin")):
            continue
        ids = np.fromfile(os.path.join(data_dir, name), dtype=np.uint16).astype(np.int64)
        for start in range(0, len(ids) - seq_len, seq_len):
            if max_windows is not None and windows == max_windows:
                break
            w = torch.from_numpy(ids[start:start + seq_len + 1])[None]
            with torch.no_grad():
                logits, _ = model(w[:, :-1], w[:, 1:])
            logp = torch.log_softmax(logits.double(), -1)[0]
            nll -= logp[torch.arange(seq_len), w[0, 1:]].sum().item()
            count, windows = count + seq_len, windows + 1
    return nll / count, windows


def test_perplexity_is_exp_of_mean_loss_computed_by_hand(val_dir):
    model = tiny_eval_model()
    want, n = manual_loss(model, val_dir, 16)
    assert n == 8
    got = ev.perplexity(model, val_dir, 16, 3, 0, "cpu")
    assert got["windows"] == 8 and got["tokens"] == 8 * 16
    assert got["loss"] == pytest.approx(want, rel=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(want), rel=1e-5)
    capped = ev.perplexity(model, val_dir, 16, 4, 5, "cpu")
    want5, _ = manual_loss(model, val_dir, 16, max_windows=5)
    assert capped["windows"] == 5 and capped["loss"] == pytest.approx(want5, rel=1e-5)
    assert capped["loss"] != pytest.approx(want, rel=1e-5)


def test_perplexity_equals_exp_of_the_trainers_val_loss(val_dir):
    from babyllama.runtime import Runtime
    from trainer import evaluate

    model = tiny_eval_model()
    rt = Runtime(torch.device("cpu"), 0, 0, 1, torch.float32)
    val_loss, bpb = evaluate(model, PretrainData(val_dir, "val", 16, 5).eval_batches(6), rt)
    assert bpb is None  # no tokenizer's byte lengths given
    assert ev.perplexity(model, val_dir, 16, 2, 6, "cpu")["ppl"] == pytest.approx(math.exp(val_loss), rel=1e-6)


def test_perplexity_rejects_shards_of_another_vocabulary(val_dir):
    with pytest.raises(DataError, match=r"vocab_size 96\b.*\b64\b"):
        ev.perplexity(tiny_eval_model(vocab_size=64), val_dir, 16, 2, 0, "cpu", vocab_size=64)


# ---- bad input -------------------------------------------------------------------------------------

def test_bad_data_files_are_one_line_errors_with_file_and_line(tmp_path):
    ok = {"question": "头疼怎么办", "answer": "多休息"}
    with pytest.raises(DataError, match=r"empty\.jsonl: .*empty"):
        ev.load_qa(write_jsonl(tmp_path / "empty.jsonl", ["", "  "]))
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not JSON"):
        ev.load_qa(write_jsonl(tmp_path / "bad.jsonl", [ok, '{"question": "x", ']))
    with pytest.raises(DataError, match=r'noq\.jsonl:3: .*"question"'):
        ev.load_qa(write_jsonl(tmp_path / "noq.jsonl", [ok, ok, {"answer": "a"}]))
    with pytest.raises(DataError, match=r'noa\.jsonl:2: .*"answer"'):
        ev.load_qa(write_jsonl(tmp_path / "noa.jsonl", [ok, {"question": "q"}]))
    with pytest.raises(DataError, match=r'noa2\.jsonl:1: .*"answer"'):
        ev.load_qa(write_jsonl(tmp_path / "noa2.jsonl", [{"question": "q"}, ok]))
    with pytest.raises(DataError, match=r"list\.jsonl:1: .*JSON object"):
        ev.load_qa(write_jsonl(tmp_path / "list.jsonl", ["[1, 2]"]))
    rows = ev.load_qa(write_jsonl(tmp_path / "good.jsonl", [ok, "", dict(ok, department="内科")]))
    assert [r["answer"] for r in rows] == ["多休息", "多休息"] and rows[1]["department"] == "内科"
    assert ev.load_qa(write_jsonl(tmp_path / "q.jsonl", [{"question": "q"}])) == [{"question": "q"}]


def test_checkpoint_of_another_vocabulary_is_rejected():
    tok = FakeTokenizer()
    ckpt = tiny_ckpt(tiny_eval_model())
    checkpoint.check_checkpoint(ckpt, tok, "x.pt")  # matches: no error
    with pytest.raises(DataError, match=r"x\.pt: .*vocab_size 64\b.*\b96\b"):
        checkpoint.check_checkpoint(dict(ckpt, model_args=dict(ckpt["model_args"], vocab_size=64)), tok, "x.pt")
    padded = dict(ckpt, model_args=dict(ckpt["model_args"], vocab_size=128))
    checkpoint.check_checkpoint(padded, tok, "x.pt")  # more rows than the tokenizer's ids, and its sha256: padding
    with pytest.raises(DataError, match=r"x\.pt: .*vocab_size 128\b.*\b96\b"):
        checkpoint.check_checkpoint(dict(padded, tokenizer_sha256=None), tok, "x.pt")  # no sha256 to vouch for it
    with pytest.raises(DataError, match="another vocabulary"):
        checkpoint.check_checkpoint(dict(ckpt, tokenizer_sha256="0" * 64), tok, "x.pt")


def test_cli_bad_json_line_exits_2_with_one_line(tmp_path, monkeypatch, capsys):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": "a"}, "not json"])
    err = main_error(ev, [f"--data={path}", "--ckpt=/nonexistent"], monkeypatch, capsys)
    assert f"{path}:2: " in err and "not JSON" in err


def test_cli_checkpoint_from_another_vocabulary_exits_2(tmp_path, tokenizer_path, monkeypatch, capsys):
    checkpoint.save_checkpoint(tiny_ckpt(tiny_eval_model()), str(tmp_path / "best.pt"))  # vocab 96, not the tokenizer's 64793
    err = main_error(ev, [f"--ckpt={tmp_path}", "--device=cpu", f"--tokenizer={tokenizer_path}"], monkeypatch, capsys)
    assert "best.pt" in err and "another vocabulary" in err


# ---- generation and reports ------------------------------------------------------------------------

def test_generate_all_batches_by_length_and_restores_order():
    """A stand-in decoder answers each prompt with the prompt reversed and records the batches' lengths."""
    batches = []

    def reversing(model, prompts, knobs, **kw):
        batches.append([len(p) for p in prompts])
        return [list(reversed(p)) for p in prompts]

    prompts = [[5] * n + [n] for n in (7, 2, 9, 1, 4)]
    outs, seconds = ev.generate_all(reversing, None, prompts, 2, ev.Sampling(), {}, torch.device("cpu"), torch.float32,
                                    progress=False)
    assert outs == [list(reversed(p)) for p in prompts] and seconds >= 0
    assert batches == [[2, 3], [5, 8], [10]]  # sorted by length, cut into batches of 2


def test_measure_generation_counts_every_new_token():
    r = bench.measure_generation(tiny_eval_model(max_seq_len=32), 3, 4, 10, True, "cpu", warmup=False)
    assert r["tokens"] == 30 and r["tokens_per_s"] > 0
    r = bench.measure_generation(tiny_eval_model(max_seq_len=32), 2, 4, 5, False, "cpu")
    assert r["tokens"] == 10 and not r["use_cache"]


def test_evaluate_prints_scores_then_writes_reports(tmp_path, val_dir, capsys):
    tok = FakeTokenizer()
    model = tiny_eval_model(max_seq_len=32)
    ckpt_path = str(tmp_path / "run" / "best.pt")
    rows = [{"question": f"问题{i}是什么", "answer": f"答案{i}很长", "department": "内科"} for i in range(5)]
    data = write_jsonl(tmp_path / "qa.jsonl", rows)
    cfg = ev.EvalConfig(ckpt=ckpt_path, data=data, val_bin=val_dir, max_new_tokens=6, batch_size=2, limit=4, beams=1)
    os.makedirs(os.path.dirname(ckpt_path))
    report = ev.evaluate(cfg, model, tiny_ckpt(model), tok, ckpt_path, torch.device("cpu"), torch.float32, progress=False)
    with open(tmp_path / "run" / "eval_report.json", encoding="utf-8") as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(report, ensure_ascii=False))
    for key in ("checkpoint", "step", "kind", "data", "samples", "scores", "protocol", "timing", "results", "config"):
        assert key in saved, key
    assert saved["samples"] == 4 and saved["step"] == 7 and len(saved["results"]) == 4
    assert set(saved["scores"]) == {"bleu4", "sacrebleu_zh", "ppl", "val_loss", "bits_per_byte", "loop", "hit_limit", "degenerate",
                                    "answer_chars", "reference_chars", "length_ratio", "duplicate", "openings",
                                    "top_opening", "distinct2", "question_overlap", "reference_bpb"}
    answers = [r["answer"] for r in saved["results"]]
    knobs = sampling(6, no_repeat_ngram=cfg.no_repeat_ngram)
    cut = [len(generate.generate(model, [render_prompt(tok, [], r["question"], max_len=26)], knobs)[0]) == 6
           for r in rows[:4]]
    assert saved["scores"]["degenerate"] == quality.degenerate_stats(answers, cut)["degenerate"]
    assert saved["scores"]["length_ratio"] == pytest.approx(
        quality.length_stats(answers, [r["answer"] for r in rows[:4]])["ratio"])
    assert saved["baselines"] == {}  # --baselines off
    assert {"prompt", "decoding", "bleu4", "sacrebleu", "perplexity"} <= set(saved["protocol"])
    assert "greedy" in saved["protocol"]["decoding"] and "tok:zh" in saved["protocol"]["sacrebleu"]
    assert [r["question"] for r in saved["results"]] == [r["question"] for r in rows[:4]]
    assert saved["results"][2]["reference"] == "答案2很长" and saved["results"][2]["department"] == "内科"
    # the answers are what the model generates for the SFT prompt of each question, greedily
    prompt = render_prompt(tok, [], rows[1]["question"], max_len=32 - 6)
    assert saved["results"][1]["answer"] == tok.decode(generate.generate(model, [prompt], knobs)[0]).strip()
    assert saved["scores"]["ppl"] == pytest.approx(math.exp(manual_loss(model, val_dir, 32)[0]), rel=1e-5)
    assert 0 <= saved["scores"]["bleu4"] <= 100 and saved["timing"]["new_tokens"] > 0
    with open(tmp_path / "run" / "eval_report.md", encoding="utf-8") as f:
        md = f.read()
    assert all(r["question"] in md and r["answer"] in md for r in rows[:4]) and "## Protocol" in md
    assert not [p for p in os.listdir(tmp_path / "run") if p.endswith(".tmp")]
    out = capsys.readouterr().out.strip().splitlines()
    # the scores come before the report is written (a folder that cannot be written loses nothing), then its paths
    assert re.fullmatch(r"BLEU-4 \(nltk, jieba, method1\): \d+\.\d\d \| sacreBLEU \(zh\): \d+\.\d\d \| ppl: \d+\.\d", out[-2])
    assert out[-1].startswith("wrote ") and "eval_report.json" in out[-1]
    shown = next((i for i, r in enumerate(saved["results"]) if r["answer"].strip()), 0)  # first non-empty answer
    assert any(line == f"[question {shown + 1}/4] {rows[shown]['question']}" for line in out[-6:]), out[-6:]


def test_evaluate_without_references_only_generates(tmp_path, capsys):
    tok = FakeTokenizer()
    model = tiny_eval_model(max_seq_len=32)
    data = write_jsonl(tmp_path / "q.jsonl", [{"question": "床前明月光"}, {"question": "你好"}])
    cfg = ev.EvalConfig(ckpt=str(tmp_path / "best.pt"), data=data, val_bin="none", max_new_tokens=4)
    out = ev.evaluate(cfg, model, tiny_ckpt(model, kind="pretrain"), tok, str(tmp_path / "best.pt"),
                      torch.device("cpu"), torch.float32, progress=False)
    assert out is None and not os.path.exists(tmp_path / "eval_report.json")
    printed = capsys.readouterr().out
    assert "[prompt] 床前明月光" in printed and "[prompt] 你好" in printed and "ppl: n/a" in printed


# ---- chat ------------------------------------------------------------------------------------------

def conversation(n_turns):
    h = []
    for i in range(n_turns):
        h += [{"role": "user", "content": f"问{i}" * 3}, {"role": "assistant", "content": f"答{i}" * 4}]
    return h


def test_fit_history_keeps_the_latest_turns_within_max_len():
    tok = FakeTokenizer()
    history = conversation(5)  # each turn: 6 + 1 + 8 + 1 = 16 tokens; the question "新问题" + <bos> = 4
    kept, ids = fit_history(tok, history, "新问题", None, 4 + 2 * 16 + 15)
    assert kept == history[-4:]  # the two latest turns fit, the third does not
    assert ids == render_prompt(tok, kept, "新问题") and ids[-1] == tok.bos_id and len(ids) <= 51
    kept, ids = fit_history(tok, history, "新问题", None, 1000)
    assert kept == history
    kept, ids = fit_history(tok, history, "新问题" * 10, None, 12)  # the question alone is too long
    assert kept == [] and len(ids) == 12 and ids[-1] == tok.bos_id
    kept, ids = fit_history(tok, history, "新问题", "你是医生", 4 + 5 + 16)  # system text stays
    assert kept == history[-2:] and ids[:5] == tok.encode("你是医生\n")


def test_chat_loop_keeps_history_resets_and_quits(monkeypatch):
    """A stand-in stream() yields the ids of a fixed answer and records every prompt it got."""
    tok = FakeTokenizer()
    prompts, answer_ids = [], tok.encode("多喝水")

    def scripted(model, prompt, knobs, **kw):
        prompts.append(list(prompt))
        yield from answer_ids

    monkeypatch.setattr("chat.stream", scripted)
    out = io.StringIO()
    cfg = ChatConfig(max_new_tokens=8)
    lines = ["头疼", "", "还有呢", "/reset", "谢谢", "/quit", "never read"]
    history = chat_loop(None, tok, "sft", cfg, iter(lines), 64, torch.device("cpu"), torch.float32, out)
    assert len(prompts) == 3 and out.getvalue().count("多喝水") == 3 and "(history cleared)" in out.getvalue()
    first_turn = [{"role": "user", "content": "头疼"}, {"role": "assistant", "content": "多喝水"}]
    assert prompts[1] == render_prompt(tok, first_turn, "还有呢")
    assert prompts[2] == render_prompt(tok, [], "谢谢")
    assert history == [{"role": "user", "content": "谢谢"}, {"role": "assistant", "content": "多喝水"}]


def test_chat_by_default_answers_a_question_asked_twice_and_five_questions_differently():
    """chat.py's defaults sample (unlike eval.py's beams) from one generator for the whole chat: the same question
    after /reset gets another answer, and five questions five answers, not one stock reply."""
    tok = FakeTokenizer()
    tok.encode("".join(chr(0x4E00 + i) for i in range(FAKE_VOCAB - 3)))  # every id decodes to its own character
    model = tiny_eval_model(max_seq_len=64)
    out = io.StringIO()
    questions = ["头疼", "/reset", "头疼", "/reset", "发烧", "/reset", "咳嗽", "/reset", "失眠", "/reset", "胃疼"]
    chat_loop(model, tok, "sft", ChatConfig(max_new_tokens=12), iter(questions), 64, torch.device("cpu"),
              torch.float32, out)
    answers = [line[len("模型> "):] for line in out.getvalue().splitlines() if line.startswith("模型> ")]
    assert len(answers) == 6 and all(answers)
    assert answers[0] != answers[1]  # the same question, asked again
    assert len(set(answers[1:])) == 5  # five questions


def test_stream_text_writes_only_complete_text():
    class Tok:
        def decode(self, ids):  # a two-token character: half of it decodes to U+FFFD
            return "".join({5: "好", 6: "\ufffd", 7: "的"}[i] for i in ids).replace("\ufffd的", "啊")

    out = io.StringIO()
    assert stream_text(iter([5, 6, 7]), Tok(), out) == "好啊"
    assert out.getvalue() == "好啊\n" and "\ufffd" not in out.getvalue()


def test_stream_text_holds_back_unfinished_bytes_and_drops_a_cut_character():
    class Bytes:  # byte-fallback tokens: one id per UTF-8 byte
        def decode(self, ids):
            return bytes(ids).decode("utf-8", errors="replace")

    writes = []
    out = io.StringIO()
    out.write = lambda t: writes.append(t) or len(t)
    ids = list("你好".encode()) + list("吗".encode())[:2]  # the answer stops inside its third character
    assert stream_text(iter(ids), Bytes(), out) == "你好"
    assert "".join(writes) == "你好\n" and not any("\ufffd" in w for w in writes)
    assert writes[:2] == ["你", "好"]  # each character written as soon as its last byte arrives


@pytest.mark.slow
def test_chat_cli_streams_answers_from_piped_stdin(tmp_path, tokenizer_path):
    from chatglm_tokenizer import tokenizer_sha256

    model = tiny_eval_model(max_seq_len=64, vocab_size=64793)
    checkpoint.save_checkpoint(tiny_ckpt(model, sha=tokenizer_sha256(tokenizer_path)), str(tmp_path / "best.pt"))
    r = run_script("chat.py", [f"--ckpt={tmp_path}", "--device=cpu", "--max_new_tokens=5", f"--tokenizer={tokenizer_path}"],
                   stdin="你好\n感冒了怎么办？\n/quit\n", timeout=120)
    assert "你> 你好" in r.stdout and "你> 感冒了怎么办？" in r.stdout and r.stdout.count("模型> ") == 2


@pytest.mark.slow
def test_eval_cli_end_to_end_with_real_tokenizer(tmp_path, tokenizer_path):
    from chatglm_tokenizer import tokenizer_sha256

    model = tiny_eval_model(max_seq_len=64, vocab_size=64793)
    checkpoint.save_checkpoint(tiny_ckpt(model, sha=tokenizer_sha256(tokenizer_path)), str(tmp_path / "best.pt"))
    data = write_jsonl(tmp_path / "qa.jsonl", [{"question": "头疼怎么办？", "answer": "注意休息，多喝水。"}] * 3)
    r = run_script("eval.py", [f"--ckpt={tmp_path}", f"--data={data}", "--device=cpu", "--max_new_tokens=8",
                               "--val_bin=none", f"--tokenizer={tokenizer_path}"], timeout=120)
    assert r.stdout.strip().splitlines()[-2].startswith("BLEU-4 (nltk, jieba, method1): ")  # scores, then the report paths
    with open(tmp_path / "eval_report.json", encoding="utf-8") as f:
        assert json.load(f)["samples"] == 3


@pytest.mark.slow
def test_eval_under_torchrun_splits_the_questions_and_reports_what_one_process_does(tmp_path, tokenizer_path):
    from chatglm_tokenizer import tokenizer_sha256

    model = tiny_eval_model(max_seq_len=64, vocab_size=64793)
    checkpoint.save_checkpoint(tiny_ckpt(model, sha=tokenizer_sha256(tokenizer_path)), str(tmp_path / "best.pt"))
    questions = ["头疼怎么办？", "发烧了吃什么药", "失眠多梦是怎么回事", "咳嗽一直不好", "胃疼", "高血压能治好吗？", "腰疼"]
    data = write_jsonl(tmp_path / "qa.jsonl", [{"question": q, "answer": "注意休息，多喝水。"} for q in questions])
    common = [f"--ckpt={tmp_path}", f"--data={data}", "--device=cpu", "--max_new_tokens=6", "--val_bin=none",
              f"--tokenizer={tokenizer_path}", "--beams=2", "--beam_prefix=0"]  # deterministic: sampled starts follow the shard
    runs = {n: run_script("eval.py", [*common, f"--out_dir={tmp_path / str(n)}"], nproc=n, timeout=180) for n in (1, 2)}
    one, two = (json.loads((tmp_path / str(n) / "eval_report.json").read_text(encoding="utf-8")) for n in (1, 2))
    assert [r["answer"] for r in two["results"]] == [r["answer"] for r in one["results"]]  # each in its place
    assert two["scores"] == one["scores"] and "batch 32 per process, 2 processes" in two["protocol"]["decoding"]
    assert runs[2].stdout.count("BLEU-4 (nltk") == 1  # rank 0 alone prints and writes


# ---- a small machine ---------------------------------------------------------------------------------

def test_perplexity_never_builds_the_full_logits_and_shows_progress(val_dir, capsys, monkeypatch):
    """The loss comes chunk by chunk (fused_ce): the (rows x seq_len, vocab) logits never exist, same value."""
    model = tiny_eval_model()
    want, _ = manual_loss(model, val_dir, 16)
    monkeypatch.setattr(ev, "PPL_CHUNK", 5)  # several chunks per batch of 3 windows x 16 tokens
    monkeypatch.setattr(model, "logits", lambda h: pytest.fail("full logits built"))
    got = ev.perplexity(model, val_dir, 16, 3, 0, "cpu")
    assert got["loss"] == pytest.approx(want, rel=1e-5) and model.ce_chunk == 0
    err = capsys.readouterr().err
    assert "perplexity" in err and "8/8" in err


def test_default_max_new_tokens_adapts_to_a_short_context_with_a_note(tmp_path, capsys):
    tok = FakeTokenizer()
    model = tiny_eval_model(max_seq_len=16)
    data = write_jsonl(tmp_path / "q.jsonl", [{"question": "你好", "answer": "好"}])
    cfg = ev.EvalConfig(ckpt=str(tmp_path / "best.pt"), data=data, val_bin="none")  # max_new_tokens 256 > 16
    report = ev.evaluate(cfg, model, tiny_ckpt(model), tok, str(tmp_path / "best.pt"), torch.device("cpu"),
                         torch.float32, progress=False)
    out = capsys.readouterr().out
    note = [line for line in out.splitlines() if line.startswith("note: --max_new_tokens 256")]
    assert len(note) == 1 and "16-token" in note[0] and note[0].rstrip().endswith(" 8"), out
    assert report["config"]["max_new_tokens"] == 8 and "max_new_tokens 8," in report["protocol"]["decoding"]


def test_the_embedded_sample_fallback_is_said_on_the_console_and_in_the_report(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.makedirs("data/sample/eval")
    write_jsonl(ev.SAMPLE_DATA, [{"question": "你好", "answer": "好"}])
    tok, model = FakeTokenizer(), tiny_eval_model(max_seq_len=32)
    cfg = ev.EvalConfig(ckpt=str(tmp_path / "best.pt"), val_bin="none", max_new_tokens=4)
    report = ev.evaluate(cfg, model, tiny_ckpt(model), tok, str(tmp_path / "best.pt"), torch.device("cpu"),
                         torch.float32, progress=False)
    printed = capsys.readouterr().out
    assert "note: no data/eval/medical_qa.jsonl" in printed and ev.SAMPLE_DATA in printed
    assert report["protocol"]["data"] == ev.SAMPLE_NOTE
    assert ev.SAMPLE_NOTE in open(tmp_path / "eval_report.md", encoding="utf-8").read()
    cfg = ev.EvalConfig(ckpt=str(tmp_path / "best.pt"), data=ev.SAMPLE_DATA, val_bin="none", max_new_tokens=4)
    report = ev.evaluate(cfg, model, tiny_ckpt(model), tok, str(tmp_path / "best.pt"), torch.device("cpu"),
                         torch.float32, progress=False)  # asked for by name: no note
    assert "note: no data/eval" not in capsys.readouterr().out and report["protocol"]["data"] == ev.SAMPLE_DATA
