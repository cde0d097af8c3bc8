"""export.py and hf_llama.py: the Hugging Face folder gives model.py's logits and tokens, the tokenizer gives
chatglm_tokenizer's ids, the chat template gives template.render's ids, the folder imports back, GGUF runs.

    python -m pytest tests/test_export.py -q
The tests need the real ChatGLM2 tokenizer ($BABYLLAMA_TOKENIZER) and skip without it; the corpus tests need the
shared corpora ($BABYLLAMA_SHARED_DATA). The GGUF test runs only where llama-cpp-python and gguf are installed and
llama.cpp's convert_hf_to_gguf.py is found ($LLAMA_CPP_DIR, see export.py's docstring).
"""
import dataclasses
import io
import json
import os

import pytest
import torch

from conftest import (SHARED_DATA, SKIP_NO_SHARED_DATA, SKIP_NO_TOKENIZER, gguf_tools, main_error, one_line_error,
                      run_script, sampling)

import eval as ev
import export
import generate
import hf_llama
from chatglm_tokenizer import load_tokenizer
from babyllama.errors import DataError
from chatglm_tokenizer.template import render, render_prompt
from model import ModelArgs, Transformer
from babyllama.checkpoint import save_checkpoint
from model import load_model

PROMPTS = ["床前明月光，疑是地上霜。举头望明月，", "请你讲一个童话故事：", "前列腺囊肿的症状是什么？",
           "请问，世界上最大的动物是什么？", "Hypertension 高血压患者 should 注意什么 123"]
CONV = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "您好"},
        {"role": "user", "content": "头疼"}, {"role": "assistant", "content": "多休息"}]


@pytest.fixture(scope="module")
def tok():
    try:
        return load_tokenizer()  # finds it as the scripts do; the Hub download fails fast offline
    except (FileNotFoundError, OSError) as e:
        pytest.skip(f"{SKIP_NO_TOKENIZER} ({e})")


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory, tok):
    """A checkpoint in trainer.py's format: a random model (grouped-query attention) whose logits are far apart
    (embeddings x30: logit std ~5), so greedy decoding is not decided by rounding, and whose norm gains are not 1."""
    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128)
    model = Transformer(args)
    with torch.no_grad():
        model.tok_embeddings.weight.mul_(30)
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    d = tmp_path_factory.mktemp("ckpt")
    save_checkpoint({"model": model.state_dict(), "model_args": dataclasses.asdict(args), "kind": "sft", "step": 7,
                "val_loss": 1.2345, "best_val_loss": 1.2345, "tokenizer_sha256": tok.sha256,
                "config": {"data_dir": "data/sft", "batch_size": 8, "learning_rate": 1e-4, "init_from": "out/pretrain"}},
               str(d / "best.pt"))
    return str(d)


@pytest.fixture(scope="module")
def hf_dir(ckpt_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("hf"))
    export.main([f"--ckpt={ckpt_dir}", f"--out_dir={out}"])
    return out


def test_config_files_and_card(hf_dir, ckpt_dir):
    with open(os.path.join(hf_dir, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["vocab_size"] == 64793
    assert (cfg["intermediate_size"], cfg["num_key_value_heads"], cfg["rope_theta"]) == (192, 2, 10000.0)
    assert cfg["tie_word_embeddings"] and cfg["rms_norm_eps"] == 1e-5 and cfg["max_position_embeddings"] == 128
    from transformers import AutoTokenizer, GenerationConfig

    gen = GenerationConfig.from_pretrained(hf_dir)
    assert (gen.do_sample, gen.max_new_tokens, gen.eos_token_id, gen.pad_token_id) == (False, 256, 2, 0)
    assert gen.no_repeat_ngram_size == ev.EvalConfig().no_repeat_ngram == 3  # eval.py's beam search (--beam_prefix=0)
    assert (gen.num_beams, gen.length_penalty) == (ev.EvalConfig().beams, 1.0) == (8, 1.0)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (1, 2, 0, 0)
    card = open(os.path.join(hf_dir, "README.md"), encoding="utf-8").read()
    assert "7 optimizer steps" in card and "1.2345" in card and "No eval_report.json" in card
    # an eval report of this step is quoted; the card is rewritten on the next export
    with open(os.path.join(ckpt_dir, "eval_report.json"), "w") as f:
        json.dump({"step": 7, "samples": 500, "data": "data/eval/medical_qa.jsonl", "protocol": {"decoding": "greedy"},
                   "scores": {"bleu4": 12.345, "sacrebleu_zh": 6.789, "ppl": 42.0}}, f)
    try:
        export.main([f"--ckpt={ckpt_dir}", f"--out_dir={hf_dir}"])
    finally:
        os.remove(os.path.join(ckpt_dir, "eval_report.json"))
    card = open(os.path.join(hf_dir, "README.md"), encoding="utf-8").read()
    assert "12.35" in card and "6.79" in card and "medical_qa.jsonl" in card


def test_transformers_logits_and_greedy_equal_model(hf_dir, ckpt_dir, tok):
    from transformers import AutoModelForCausalLM

    model, _ = load_model(ckpt_dir)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    x = torch.tensor([sum((tok.encode(p) for p in PROMPTS), [])[:128]])  # one long row: every rotary position
    with torch.no_grad():
        ours = model.logits(model.hidden(x))
        theirs = hf(x).logits
    assert theirs.shape == ours.shape == (1, x.shape[1], 64793)
    assert (ours - theirs).abs().max().item() <= 1e-4
    for p in PROMPTS:
        ids = tok.encode(p)
        want = generate.generate(model, [ids], sampling(24))[0]
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, num_beams=1,
                              no_repeat_ngram_size=0)[0, len(ids):].tolist()
        if 2 in out:  # transformers keeps the eos; model.generate stops before it
            out = out[: out.index(2)]
        assert out == want and len(want) > 0


def test_tokenizer_ids_equal_on_shared_corpora(hf_dir, tok):
    from transformers import AutoTokenizer

    hft = AutoTokenizer.from_pretrained(hf_dir)
    paths = [os.path.join(SHARED_DATA, "pretrain", n)
             for n in ("c4-style-csl-abstracts.jsonl", "medical-encyclopedia-style.jsonl")]
    if not all(os.path.isfile(p) for p in paths):
        pytest.skip(SKIP_NO_SHARED_DATA)
    extra = ["", " lead", "  two spaces", "tab\tand\nnewline  ", "x</s> y", "数字 2024 年 3.14 ％ ①", "emoji 🙂 ok"]
    for path in paths:
        with open(path, encoding="utf-8") as f:
            docs = [json.loads(line)["text"] for line in f if line.strip()]
        docs += extra
        ours = hft(docs, split_special_tokens=True)["input_ids"]  # documents are text: "</s>" in them is text
        want = tok.encode_batch(docs)
        bad = [i for i in range(len(docs)) if ours[i] != want[i]]
        assert not bad, f"{path}: {len(bad)} of {len(docs)} documents differ, first {docs[bad[0]][:60]!r}"
        assert all(hft.decode(ours[i]) == tok.decode(want[i]) for i in range(len(docs)))
        assert len(docs) > 200


def test_chat_template_equals_render(hf_dir, tok, tmp_path):
    from transformers import AutoTokenizer

    hft = AutoTokenizer.from_pretrained(hf_dir)
    convs = [CONV, CONV[:2]]
    sft = os.path.join(SHARED_DATA, "sft", "oasst1-zh-multiturn.json")
    if os.path.isfile(sft):  # real multi-turn conversations, as data_process.py writes them for sft.py
        import data_process
        data_process.main(["sft", f"--inputs={sft}", f"--out_dir={tmp_path}", "--progress=false"])
        with open(tmp_path / "train.jsonl", encoding="utf-8") as f:
            convs += [json.loads(line)["conversations"] for line in f][:300]
        assert sum(len(c) > 2 for c in convs) > 50
    systems = [None, "你是一名医生。", "You are a helpful assistant. ", " 以下是对话 \n"]
    for i, conv in enumerate(convs):
        system = systems[i % len(systems)]
        msgs = ([{"role": "system", "content": system}] if system else []) + conv
        ids = hft.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]
        assert ids == render(tok, conv, system)[0], (i, system)
        prompt = hft.apply_chat_template(msgs[:-1], add_generation_prompt=True, return_dict=True)["input_ids"]
        assert prompt == render_prompt(tok, conv[:-2], conv[-2]["content"], system)
    text = hft.apply_chat_template([{"role": "system", "content": "你是医生"}] + CONV, tokenize=False)
    assert text == "你是医生\n 你好<s>您好</s>头疼<s>多休息</s>"
    assert render(tok, CONV, "你是医生")[0] == [30910, 34607, 32718, 13, 36474, 54591, 1, 30910, 48214, 2, 30910,
                                                46317, 1, 40636, 33503, 2]  # dataset_sft's worked example


def test_hf_round_trip_import(hf_dir, ckpt_dir, tmp_path, monkeypatch):
    model, _ = load_model(ckpt_dir)
    init = hf_llama.load_init(f"hf:{hf_dir}")
    assert init["model_args"] == dataclasses.asdict(model.args) and init["kind"] == "sft" and init["step"] == 7
    back = Transformer(ModelArgs(**init["model_args"]))
    back.load_state_dict(init["model"])
    back.eval()
    x = torch.randint(0, 64793, (2, 100))
    with torch.no_grad():
        assert torch.equal(model.logits(model.hidden(x)), back.logits(back.hidden(x)))
    # sft.py from the folder and from the checkpoint: the same validation loss before training
    data = tmp_path / "sft"
    data.mkdir()
    rows = [{"conversations": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in [("你好", "您好"), ("头疼怎么办", "多休息，多喝水。"), ("世界上最大的动物", "蓝鲸")] * 4]
    for split in ("train", "val"):
        (data / f"{split}.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), "utf-8")
    common = ["--device=cpu", "--compile=false", "--batch_size=4", "--max_steps=1", "--warmup_steps=0",
              "--eval_interval=1", "--batch_mode=dynamic", f"--data_dir={data}"]
    losses = []
    import sft
    monkeypatch.delenv("BABYLLAMA_TOKENIZER", raising=False)  # from hf:, the folder's own tokenizer.model
    for src, named in ((ckpt_dir, [f"--tokenizer={hf_dir}/tokenizer.model"]), (f"hf:{hf_dir}", [])):
        out = tmp_path / f"out{len(losses)}"
        try:
            sft.main([*common, f"--init_from={src}", f"--out_dir={out}", *named])  # sft.py's main, in this process
        except SystemExit as e:  # this random model's peaky logits (embeddings x30) lose to a uniform guess: the
            assert e.code == 3  # divergence guard stops the run after step 0's validation, which is all we compare
        with open(out / "metrics.jsonl") as f:
            losses.append(next(r["val_loss"] for r in map(json.loads, f) if r["step"] == 0 and "val_loss" in r))
    assert abs(losses[0] - losses[1]) < 1e-5, losses


def test_eval_and_chat_answer_from_the_folder_as_from_the_checkpoint(hf_dir, ckpt_dir, tmp_path, monkeypatch,
                                                                     capsys):
    """--ckpt=hf:FOLDER (an exported or downloaded Llama folder): the same greedy answers and scores as the checkpoint
    it came from, the folder's own tokenizer when none is named, the report written into the folder; a folder it
    cannot load is one line."""
    qa = tmp_path / "qa.jsonl"
    qa.write_text("\n".join(json.dumps({"question": q, "answer": "多休息，多喝水。"}, ensure_ascii=False)
                             for q in PROMPTS[2:]), encoding="utf-8")
    flags = [f"--data={qa}", "--device=cpu", "--val_bin=none", "--beams=1", "--max_new_tokens=12"]
    reports = []
    for src in (ckpt_dir, f"hf:{hf_dir}"):
        ev.main([*flags, f"--ckpt={src}"])
        with open(os.path.join(src.removeprefix("hf:"), "eval_report.json"), encoding="utf-8") as f:
            reports.append(json.load(f))
    assert [r["answer"] for r in reports[0]["results"]] == [r["answer"] for r in reports[1]["results"]]
    assert reports[0]["scores"] == reports[1]["scores"] and reports[1]["checkpoint"] == f"hf:{hf_dir}"
    monkeypatch.delenv("BABYLLAMA_TOKENIZER", raising=False)  # hf: finds the folder's tokenizer.model
    import chat
    for src, named in ((ckpt_dir, [f"--tokenizer={hf_dir}/tokenizer.model"]), (f"hf:{hf_dir}", [])):
        monkeypatch.setattr("sys.stdin", io.StringIO(PROMPTS[2] + "\n"))
        monkeypatch.setattr("sys.argv", ["chat.py", f"--ckpt={src}", "--device=cpu", "--temperature=0",
                                         "--max_new_tokens=12", *named])
        chat.main()
    said = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("模型>")]
    assert len(said) == 2 and said[0] == said[1] and len(said[0]) > 4, said
    assert "config.json" in main_error(ev, [*flags, f"--ckpt=hf:{tmp_path}"], monkeypatch, capsys)
    # the line names the flag the user gave (eval's --ckpt), not pretraining's --init_from
    said = main_error(ev, [*flags, f"--ckpt=hf:{tmp_path / 'nowhere'}"], monkeypatch, capsys)
    assert said.startswith(f"error: --ckpt=hf:{tmp_path / 'nowhere'}") and "is not a folder" in said, said


def test_import_refuses_other_llamas_in_one_line(hf_dir, tmp_path):
    with open(os.path.join(hf_dir, "config.json")) as f:
        cfg = json.load(f)
    for change, words in [({"rope_theta": 500000.0}, "rope_theta"), ({"tie_word_embeddings": False}, "untied"),
                          ({"intermediate_size": 100}, "intermediate_size"), ({"model_type": "gpt2"}, "model_type")]:
        with pytest.raises(DataError, match=words):
            hf_llama.args_from_config(dict(cfg, **change), "config.json")


def test_pretrain_init_from_a_bad_folder_is_one_line(tmp_path, monkeypatch, capsys):
    import pretrain
    out = f"--out_dir={tmp_path / 'run'}"
    assert "hf:PATH" in main_error(pretrain, ["--init_from=out/pretrain", out], monkeypatch, capsys)  # exit 2, one line
    assert "config.json" in main_error(pretrain, [f"--init_from=hf:{tmp_path}", out], monkeypatch, capsys)


@pytest.mark.slow
def test_push_to_hub_without_token_or_network_is_one_line(ckpt_dir, tmp_path, monkeypatch):
    base = ["export.py", f"--ckpt={ckpt_dir}", f"--out_dir={tmp_path / 'hf'}", "--push_to_hub=someone/baby-llama2"]
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # no stored token
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    r = run_script(base[0], base[1:], check=False)
    assert "--push_to_hub" in one_line_error(r) and "token" in r.stderr
    assert not os.path.exists(tmp_path / "hf")  # checked before any work
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    # no Hub to reach, failing at once: a closed port would be retried (with waits) for 25 s, an unknown scheme is not
    monkeypatch.setenv("HF_ENDPOINT", "hfx://127.0.0.1:9")
    r = run_script(base[0], base[1:], check=False, timeout=120)
    assert "--push_to_hub=someone/baby-llama2" in one_line_error(r)
    assert os.path.isfile(tmp_path / "hf" / "model.safetensors")


def test_gguf_without_converter_is_one_line(ckpt_dir, tmp_path, monkeypatch, capsys):
    err = main_error(export, [f"--ckpt={ckpt_dir}", f"--out_dir={tmp_path}", "--format=gguf",
                              f"--llama_cpp={tmp_path / 'nowhere'}"], monkeypatch, capsys)  # exit 2, one line
    assert "convert_hf_to_gguf.py" in err


def test_gguf_f16_greedy_equals_model(ckpt_dir, tok, tmp_path):
    llama_cpp = gguf_tools()
    export.main([f"--ckpt={ckpt_dir}", f"--out_dir={tmp_path}", "--format=gguf", "--gguf_types=f16"])
    model, _ = load_model(ckpt_dir)
    llm = llama_cpp.Llama(model_path=str(tmp_path / "model-f16.gguf"), n_ctx=128, verbose=False)
    for p in PROMPTS:
        ids = tok.encode(p)
        assert llm.tokenize(p.encode("utf-8"), add_bos=False, special=False) == ids  # llama.cpp's own tokenizer
        want = generate.generate(model, [ids], sampling(24))[0]
        assert export.llama_greedy(llm, ids, 24, eos_id=2) == want and len(want) > 0
    # a chat through llama.cpp's own use of the chat template stored in the GGUF file
    assert llm.metadata["tokenizer.chat_template"] == export.CHAT_TEMPLATE
    assert llm.metadata["tokenizer.ggml.add_bos_token"] == "false"
    prompt = render_prompt(tok, CONV[:2], CONV[2]["content"])
    want = tok.decode(generate.generate(model, [prompt], sampling(16))[0])
    r = llm.create_chat_completion(messages=CONV[:3], temperature=0.0, top_k=1, repeat_penalty=1.0, max_tokens=16)
    assert r["usage"]["prompt_tokens"] == len(prompt) and r["choices"][0]["message"]["content"] == want
    modelfile = (tmp_path / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model-f16.gguf\n") and "{{ .Content }}<s>" in modelfile
    assert "PARAMETER temperature 0.7\n" in modelfile and "PARAMETER repeat_penalty 1.1\n" in modelfile
