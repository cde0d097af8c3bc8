"""Bits per byte and a tokenizer of our own end to end: the per-id byte table equals decoding on real text for both
tokenizers, validation's bits per byte equals a hand computation, pretrain.py takes the model's vocab from the
tokenizer, and export.py's Hugging Face tokenizer gives our own tokenizer's ids.

    python -m pytest tests/test_bpb.py -q
The corpus tests need the shared corpora ($BABYLLAMA_SHARED_DATA); the ChatGLM2 half of the table test needs its
tokenizer.model ($BABYLLAMA_TOKENIZER); both skip without them.
"""
import contextlib
import io
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_tokenizer as tt
from chatglm_tokenizer import ChatGLMTokenizer, TokenBytes, load_tokenizer
from conftest import ROOT, SHARED_DATA, SKIP_NO_SHARED_DATA, gguf_tools, main_error, sampling
from dataset import PretrainData
from model import ModelArgs, Transformer
from babyllama.runtime import Runtime
from model import load_model
from trainer import ValBytes, evaluate

EXTRA = ["", " lead", "  two spaces", "tab\tand\nnewline  ", "数字 2024 年 3.14 ％ ①", "emoji 🙂 ok 生僻 𠀀𪚥",
         "x</s> y", "   ", "a  b   c", "▁mark ▁▁"]
TINY = ["--dim=32", "--n_layers=2", "--n_heads=4", "--max_seq_len=64", "--batch_size=4", "--warmup_steps=2",
        "--eval_interval=4", "--eval_windows=0", "--log_interval=4", "--compile=false"]


def c4_documents(n: int = 200) -> list:
    path = os.path.join(SHARED_DATA, "pretrain", "c4-style-csl-abstracts.jsonl")
    if not os.path.isfile(path):
        pytest.skip(SKIP_NO_SHARED_DATA)
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()][:n]


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    """A 4,096-piece tokenizer trained on the embedded sample, the sample tokenized with it, and a tiny pretrain run
    on that (no --vocab_size) -> (tokenizer folder, data folder, run folder, pretrain.py's stdout)."""
    import data_process
    import pretrain

    base = tmp_path_factory.mktemp("own")
    cwd = os.getcwd()
    os.chdir(ROOT)  # train_tokenizer.py's and data_process.py's default inputs are the sample, cwd-relative
    try:
        tt.main(["--vocab_size=4096", f"--out_dir={base / 'tok'}", "--progress=false", "--num_threads=1"])
        data_process.main(["pretrain", f"--tokenizer={base / 'tok'}", f"--out_dir={base / 'data'}", "--num_workers=1",
                           "--progress=false"])
    finally:
        os.chdir(cwd)
    stdout = io.StringIO()  # in-process runs (the scripts' main): no interpreter and torch import per run
    with contextlib.redirect_stdout(stdout):
        pretrain.main([*TINY, f"--data_dir={base / 'data'}", f"--tokenizer={base / 'tok'}", f"--out_dir={base / 'run'}",
                       "--max_steps=8", "--device=cpu"])
    return str(base / "tok"), str(base / "data"), str(base / "run"), stdout.getvalue()


def table_matches_decoding(tok: ChatGLMTokenizer, docs: list) -> None:
    """Every document as the shards hold it (after an <eos>): the table's bytes == count_bytes of its ids."""
    tb = TokenBytes(tok)
    for doc in docs:
        ids = tok.encode(doc)
        stream = [tok.eos_id] + ids + [tok.eos_id]
        assert tb.count(stream[:-1], stream[1:]) == tok.count_bytes(ids), doc[:60]


def test_byte_table_equals_decoding_own_tokenizer(own):
    tok = load_tokenizer(own[0])
    table_matches_decoding(tok, c4_documents() + EXTRA)
    assert TokenBytes(tok).first_less is None  # no dummy prefix: every piece counts as it reads


def test_byte_table_equals_decoding_chatglm2(tokenizer_path):
    tok = ChatGLMTokenizer(tokenizer_path)
    table_matches_decoding(tok, c4_documents() + EXTRA)
    tb = TokenBytes(tok)
    assert tb.first_less is not None and tb.table[tok.n_pieces:].sum() == 0  # specials have no text
    ids = tok.encode("你好 world")  # mid-text the "▁" of "▁world" is a space; a document's first "▁" is not text
    assert tb.count([5] + ids[:-1], ids) == len("你好 world".encode()) + 1 == tok.count_bytes(ids) + 1


def test_sft_targets_count_only_supervised_bytes(own):
    """-1 targets (prompt, padding) have no bytes; an answer after <s> counts as its decoded text."""
    tok = load_tokenizer(own[0])
    prompt, answer = tok.encode("问题：头疼怎么办"), tok.encode(" 多休息，多喝水 2024")
    x = np.array(prompt + [tok.bos_id] + answer)
    y = np.array([-1] * len(prompt) + answer + [tok.eos_id])
    assert TokenBytes(tok).count(x, y) == len(" 多休息，多喝水 2024".encode("utf-8"))


def test_validation_bits_per_byte_by_hand(own):
    """evaluate()'s bits per byte == total nats over every target, by F.cross_entropy, / ln 2 / the UTF-8 bytes of
    the targets' text, here from decoding the target stream (the tokenizer has no dummy prefix)."""
    tok = load_tokenizer(own[0])
    val = PretrainData(own[1], "val", 32, 3)
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=tok.vocab_size, max_seq_len=32)).eval()
    rt = Runtime(torch.device("cpu"), 0, 0, 1, torch.float32)
    val_bytes = ValBytes(TokenBytes(tok))
    loss, bpb = evaluate(model, val.eval_batches(0), rt, val_bytes)
    targets = np.concatenate([val.window(k)[1:] for k in range(val.n_windows)])
    with torch.no_grad():
        nats = sum(F.cross_entropy(model.logits(model.hidden(x)).flatten(0, 1), y.flatten(), reduction="sum").item()
                   for x, y in val.eval_batches(0))
    n_bytes = len(tok.decode(targets).encode("utf-8"))
    assert val_bytes.total == n_bytes and n_bytes > targets.size  # several bytes a token
    assert loss == pytest.approx(nats / targets.size, rel=1e-5)
    assert bpb == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-5)
    assert evaluate(model, val.eval_batches(0), rt, val_bytes)[1] == pytest.approx(bpb, rel=1e-9)  # cached bytes


def test_pretrain_vocab_follows_the_tokenizer_and_logs_bpb(own):
    tok_dir, data_dir, run_dir, stdout = own
    model, ckpt = load_model(run_dir)
    assert ckpt["model_args"]["vocab_size"] == 4096 == model.args.vocab_size and ckpt["config"]["vocab_size"] == 4096
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    val = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in val] == [0, 4, 8] and all(0 < r["val_bpb"] < 10 for r in val)
    # the same ratio on every pass: bits per byte = val loss x targets / ln 2 / bytes, the bytes fixed by the windows
    ratios = {round(r["val_loss"] / r["val_bpb"], 9) for r in val}
    data = PretrainData(data_dir, "val", 64, 4)
    targets = np.concatenate([data.window(k)[1:] for k in range(data.n_windows)])
    n_bytes = len(load_tokenizer(tok_dir).decode(targets).encode("utf-8"))
    assert len(ratios) == 1 and ratios.pop() == pytest.approx(math.log(2) * n_bytes / targets.size, rel=1e-6)
    assert f"step 8: val loss {val[-1]['val_loss']:.4f} | {val[-1]['val_bpb']:.4f} bits/byte" in stdout
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    assert summary["val_bpb"] == val[-1]["val_bpb"] and summary["best_val_bpb"] == min(r["val_bpb"] for r in val[1:])


def test_pretrain_vocab_flag_checks(own, tmp_path, monkeypatch, capsys):
    import pretrain
    tok_dir, data_dir, _, _ = own
    args = [*TINY, f"--data_dir={data_dir}", f"--tokenizer={tok_dir}", "--max_steps=3", "--device=cpu"]
    err = main_error(pretrain, [*args, "--vocab_size=4000", f"--out_dir={tmp_path / 'a'}"], monkeypatch, capsys)
    assert err.startswith("error: --vocab_size=4000 ") and "4096" in err
    pretrain.main([*args, "--vocab_size=4200", f"--out_dir={tmp_path / 'b'}"])  # larger: padding rows
    assert load_model(str(tmp_path / "b"))[1]["model_args"]["vocab_size"] == 4200
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        pretrain.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--vocab_size" in out and "0 = the tokenizer's" in out


def test_shards_without_a_tokenizer_log_loss_only(tiny_corpus, tmp_path, capsys, monkeypatch):
    """Synthetic shards name no tokenizer: their vocab comes from the sidecars, bits per byte is said unavailable."""
    import pretrain
    out = tmp_path / "run"
    args = ["--dim=32", "--n_layers=1", "--n_heads=4", "--max_seq_len=32", "--batch_size=4", "--max_steps=2",
            "--warmup_steps=0", "--eval_interval=2", "--eval_windows=4", f"--data_dir={tiny_corpus}", f"--out_dir={out}",
            "--device=cpu"]
    with pytest.raises(SystemExit) as e:
        pretrain.main([*args, "--tokenizer=" + os.path.join(ROOT, "no_such_tokenizer")])
    assert e.value.code == 2 and "no_such_tokenizer" in capsys.readouterr().err  # a named tokenizer must exist
    if os.path.isfile(os.path.join(ROOT, "chatglm_tokenizer", "tokenizer.model")):
        pytest.skip("a tokenizer.model sits in chatglm_tokenizer/: every run has a tokenizer here")
    monkeypatch.delenv("BABYLLAMA_TOKENIZER", raising=False)
    pretrain.main(args)
    assert capsys.readouterr().out.count("bits per byte not available") == 1
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert any("val_loss" in row for row in rows) and not any("val_bpb" in row for row in rows)
    assert load_model(str(out))[1]["model_args"]["vocab_size"] == 512  # the sidecars' vocab


def test_hf_export_own_tokenizer_ids_logits_and_sha(own, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok_dir, _, run_dir, _ = own
    tok = load_tokenizer(tok_dir)
    out = str(tmp_path / "hf")
    import export
    export.main([f"--ckpt={run_dir}", f"--out_dir={out}", f"--tokenizer={tok_dir}"])
    hft = AutoTokenizer.from_pretrained(out)
    docs = c4_documents() + EXTRA
    theirs = hft(docs, split_special_tokens=True)["input_ids"]  # documents are text: "</s>" in them is text
    want = tok.encode_batch(docs, num_threads=1)
    bad = [i for i in range(len(docs)) if theirs[i] != want[i]]
    assert not bad, f"{len(bad)} of {len(docs)} documents differ, first {docs[bad[0]][:60]!r}"
    assert all(hft.decode(theirs[i]) == tok.decode(want[i]) == docs[i] for i in range(len(docs)) if "▁" not in docs[i])
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["vocab_size"] == 4096 and cfg["baby_llama2"]["tokenizer_sha256"] == tok.sha256
    model, _ = load_model(run_dir)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    x = torch.tensor([sum(want[:5], [])[:64]])
    with torch.no_grad():
        assert (model.logits(model.hidden(x)) - hf(x).logits).abs().max().item() <= 1e-4
    # llama.cpp's converter reads add_prefix_space: without it a GGUF of this model would put a space in front
    with open(os.path.join(out, "tokenizer_config.json")) as f:
        assert json.load(f)["add_prefix_space"] is False


def test_gguf_export_own_tokenizer_tokenizes_and_decodes_like_ours(own, tmp_path):
    """llama.cpp's own tokenizer and greedy decoding on the GGUF file of a model with a tokenizer of our own."""
    llama_cpp = gguf_tools()
    import export
    tok_dir, _, run_dir, _ = own
    tok = load_tokenizer(tok_dir)
    export.main([f"--ckpt={run_dir}", f"--out_dir={tmp_path}", "--format=gguf", "--gguf_types=f16", f"--tokenizer={tok_dir}"])
    llm = llama_cpp.Llama(model_path=str(tmp_path / "model-f16.gguf"), n_ctx=128, verbose=False)
    docs = c4_documents() + EXTRA
    bad = [d for d in docs if llm.tokenize(d.encode("utf-8"), add_bos=False, special=False) != tok.encode(d)]
    assert not bad, f"{len(bad)} of {len(docs)} differ, first {bad[0][:60]!r}"
    model, _ = load_model(run_dir)
    import generate
    for d in docs[:3]:
        ids = tok.encode(d)[:24]
        want = generate.generate(model, [ids], sampling(12))[0]
        assert export.llama_greedy(llm, ids, 12, eos_id=2) == want
