"""sft.py and the SFT training step: a tiny model learns fixture answers word for word; the script runs under DDP.

    python -m pytest tests/test_sft.py -q

test_tiny_model_learns_fixture_answers_word_for_word needs no tokenizer.model (a fake one, one id per character);
test_sft_script_ddp_run_and_resume needs the real ChatGLM2 tokenizer ($BABYLLAMA_TOKENIZER) and skips without it.
"""
import json
import math

import numpy as np
import pytest
import torch

import generate
from chatglm_tokenizer import load_tokenizer
from babyllama.config import parse_config
from babyllama.errors import ConfigError
from conftest import run_script, sampling, write_shard
from chatglm_tokenizer.template import render_prompt
from dataset_sft import Batching, SFTData, SFTSamples
from model import ModelArgs, Transformer
from babyllama.runtime import Runtime
from trainer import DeviceBatches, train_step

# question -> answer; every question and answer is distinct, so a model that only memorised one answer fails
PAIRS = [
    ("感冒了怎么办？", "多喝水，注意休息。"),
    ("头疼吃什么药？", "可以吃布洛芬。"),
    ("牙疼怎么办", "请去看牙医。"),
    ("失眠怎么办？", "睡前不要喝咖啡。"),
    ("发烧多少度要去医院？", "超过三十九度就去。"),
]


class CharTokenizer:
    """One id per character, the real tokenizer's special ids (pad 0, bos 1, eos 2); characters from 3 on."""
    pad_id, bos_id, eos_id = 0, 1, 2

    def __init__(self, texts):
        chars = sorted({c for t in texts for c in t})
        self.char_to_id = {c: i + 3 for i, c in enumerate(chars)}
        self.id_to_char = {i: c for c, i in self.char_to_id.items()}
        self.vocab_size = len(chars) + 3

    def encode(self, text, bos=False, eos=False):
        return [self.bos_id] * bos + [self.char_to_id[c] for c in text] + [self.eos_id] * eos

    def encode_batch(self, texts, num_threads=-1):
        return [self.encode(t) for t in texts]

    def decode(self, ids):
        return "".join(self.id_to_char.get(int(i), "") for i in ids)


def records(pairs):
    return [{"conversations": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in pairs]


def fine_tune(steps: int, seed: int = 0):
    """A tiny model trained with trainer.train_step (sft.py's step) on PAIRS -> (model, tokenizer, first batch)."""
    torch.manual_seed(seed)
    tok = CharTokenizer([t for pair in PAIRS for t in pair])
    assert tok.vocab_size <= 128
    data = SFTData(SFTSamples(records(PAIRS), tok, 64), Batching(batch_size=len(PAIRS), seed=seed, pad_multiple=1))
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=128, max_seq_len=64))
    rt = Runtime(device=torch.device("cpu"), rank=0, local_rank=0, world_size=1, dtype=torch.float32)
    optimizer = model.configure_optimizer(0.0, 3e-3, (0.9, 0.95), "cpu")
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    batches = DeviceBatches(data, 0, 1, rt.device)
    model.train()
    loss = float("nan")
    for _ in range(steps):
        loss = train_step(model, optimizer, scaler, batches, 1, 3e-3, 1.0, rt)[0].item()
    model.eval()
    return model, tok, data.batch(0, 0), loss


def answers(model, tok):
    prompts = [render_prompt(tok, [], q) for q, _ in PAIRS]
    with torch.no_grad():
        outs = generate.generate(model, prompts, sampling(24), eos_id=tok.eos_id)
    return [tok.decode(o) for o in outs]


def test_tiny_model_learns_fixture_answers_word_for_word():
    torch.set_num_threads(1)
    model, tok, (x, y), loss = fine_tune(steps=150)
    # the loss is on answers only: y is -1 on every prompt position (up to the one before <bos>) and on padding;
    # at <bos> the target is the answer's first token, and each answer ends with a target <eos>
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        bos = row_x.index(tok.bos_id)
        q = tok.decode(row_x[:bos])
        a = dict(PAIRS)[q]
        assert row_y[:bos] == [-1] * bos
        assert row_y[bos:bos + len(a) + 1] == tok.encode(a) + [tok.eos_id]
        assert all(t == -1 for t in row_y[bos + len(a) + 1:])
    assert loss < 0.05, loss
    got = answers(model, tok)
    assert got == [a for _, a in PAIRS], got


def test_untrained_model_does_not_answer():
    """The word-for-word check can fail: the same model with no training steps gets every answer wrong."""
    torch.set_num_threads(1)
    model, tok, _, _ = fine_tune(steps=0)
    got = answers(model, tok)
    assert all(g != a for g, (_, a) in zip(got, PAIRS)), got


# ---- sft.py as a script ---------------------------------------------------------------------------------

TINY = ["--dim=32", "--n_layers=1", "--n_heads=4", "--max_seq_len=64", "--vocab_size=64793", "--batch_size=4",
        "--device=cpu", "--compile=false", "--log_interval=1", "--eval_windows=8", "--warmup_steps=1",
        "--learning_rate=3e-3", "--min_lr=3e-4"]


def write_sft_split(path, pairs):
    with open(path, "w", encoding="utf-8") as f:
        for q, a in pairs:
            rec = {"conversations": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                   "source": "fixture"}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def tiny_pretrained(tmp_path):
    """A 2-step pretraining run on random tokens -> its folder (tmp_path/pre), for SFT to start from."""
    rng = np.random.default_rng(0)
    shards = tmp_path / "pretrain_data"
    shards.mkdir()
    write_shard(str(shards / "train_00000.bin"), rng.integers(3, 64793, size=4000), "train", 64793)
    write_shard(str(shards / "val_00000.bin"), rng.integers(3, 64793, size=1000), "val", 64793)
    pre = tmp_path / "pre"
    import pretrain
    pretrain.main([*TINY, f"--data_dir={shards}", f"--out_dir={pre}", "--max_steps=2", "--eval_interval=2"])
    return pre


@pytest.mark.slow
def test_sft_script_ddp_run_and_resume(tmp_path, tokenizer_path):
    pre = tiny_pretrained(tmp_path)

    sft_data = tmp_path / "sft_data"
    sft_data.mkdir()
    write_sft_split(sft_data / "train.jsonl", PAIRS * 4)  # 20 conversations: 2 ranks x batch 4 read 8 per step
    write_sft_split(sft_data / "val.jsonl", PAIRS)
    out = tmp_path / "sft"
    sft_args = ["--device=cpu", "--compile=false", "--batch_size=4", "--warmup_steps=1", "--learning_rate=1e-3",
                "--min_lr=1e-4", "--log_interval=1", "--eval_windows=8", "--eval_interval=2", "--pad_multiple=8",
                f"--init_from={pre}", f"--data_dir={sft_data}", f"--out_dir={out}", f"--tokenizer={tokenizer_path}"]
    r = run_script("sft.py", [*sft_args, "--max_steps=2"], nproc=2, timeout=120)
    assert "x2" in r.stdout, r.stdout  # both processes took part (the banner says device cpu x2)
    first = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    assert first["kind"] == "sft" and first["step"] == 2
    assert first["model_args"]["vocab_size"] == 64793 and first["tokenizer_sha256"]
    assert np.isfinite(first["val_loss"])
    # bits per byte over the supervised targets of both ranks: answers and their <eos> (0 bytes), nats / ln 2 / bytes
    val = [json.loads(line) for line in open(out / "metrics.jsonl") if "val_loss" in line]
    tok = load_tokenizer(tokenizer_path)
    targets = sum(len(tok.encode(a)) + 1 for _, a in PAIRS)
    n_bytes = sum(len(a.encode("utf-8")) for _, a in PAIRS)
    assert [r["step"] for r in val] == [0, 2] and all(r["val_bpb"] > 0 for r in val)
    for r in val:
        assert r["val_bpb"] == pytest.approx(r["val_loss"] * targets / math.log(2) / n_bytes, rel=1e-6)

    r = run_script("sft.py", [*sft_args, "--max_steps=4", "--resume"], nproc=2, timeout=120)
    assert "resuming from" in r.stdout and "at step 2" in r.stdout, r.stdout
    second = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    assert second["kind"] == "sft" and second["step"] == 4
    assert not torch.equal(first["model"]["tok_embeddings.weight"], second["model"]["tok_embeddings.weight"])


def test_sft_dropout_replaces_the_pretrained_models_and_is_checked(tmp_path, tokenizer_path):
    import sft
    pre = tiny_pretrained(tmp_path)
    tok = load_tokenizer(tokenizer_path)
    for dropout in (0.0, 0.1):
        cfg = sft.SFTConfig(init_from=str(pre), dropout=dropout)
        init_path, init = sft.read_init(cfg)
        args = sft.start_point(cfg, init_path, init, tok, master=False)
        assert init["model_args"]["dropout"] == 0.0 and args.dropout == dropout
    with pytest.raises(ConfigError, match="dropout must be in"):
        parse_config(sft.SFTConfig, ["--dropout=1.0"])
