"""train_tokenizer.py and the tokenizer wrapper: a tokenizer of our own trained on the embedded sample in seconds,
exact round trips (byte fallback for rare characters), the id layout the project needs, file-or-folder lookup,
bits per byte, one-line errors, and data_process.py tokenizing with it."""
import glob
import hashlib
import json
import math
import os
import time

import numpy as np
import pytest

import train_tokenizer as tt
from chatglm_tokenizer import MODEL_FILE, TOKENIZER_ENV, ChatGLMTokenizer, bits_per_byte, find_tokenizer, load_tokenizer
from conftest import ROOT, SHARED_DATA, SKIP_NO_SHARED_DATA, check_help, main_error
from babyllama.config import parse_config
from babyllama.errors import ConfigError, DataError
from babyllama.corpora import ReadOptions, Reporter, detect, iter_documents

VOCAB = 4096
RARE = "生僻字：𠀀𪚥鿰 emoji 😀🀄 accents é ñ ü, Tab\tCR\r\nNBSP\u00a0 digits 2024 12345 and   three spaces"


def sample_documents(part: str = "*") -> list[str]:
    """Every document of the embedded sample (pretraining text, SFT conversations, eval QA), as data_process reads it."""
    docs = []
    for path in sorted(glob.glob(os.path.join(ROOT, "data", "sample", part, "*"))):
        if path.endswith(".md"):
            continue
        docs += list(iter_documents(detect(path, "", ReadOptions()), ReadOptions(), Reporter(0)))
    return docs


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tokenizer trained on the sample (data/sample/pretrain/*, the default inputs) -> (folder, sidecar, seconds)."""
    out = tmp_path_factory.mktemp("tok") / "tok4k"
    cwd = os.getcwd()
    os.chdir(ROOT)  # the default inputs are cwd-relative, as for data_process.py
    try:
        t0 = time.perf_counter()
        meta = tt.main([f"--vocab_size={VOCAB}", f"--out_dir={out}", "--progress=false", "--num_threads=1"])
        seconds = time.perf_counter() - t0
    finally:
        os.chdir(cwd)
    return out, meta, seconds


def test_trains_on_the_sample_in_seconds(trained):
    out, meta, seconds = trained
    assert seconds < 30, f"training on the sample took {seconds:.1f}s"
    assert sorted(os.listdir(out)) == ["manifest.json", MODEL_FILE, tt.META_FILE]  # no *.tmp left behind
    with open(out / MODEL_FILE, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    with open(out / tt.META_FILE, encoding="utf-8") as f:
        side = json.load(f)
    assert side == meta and side["tokenizer_sha256"] == sha and side["vocab_size"] == VOCAB
    assert side["format"] == tt.TOKENIZER_FORMAT and side["special_ids"] == {"unk": 0, "bos": 1, "eos": 2, "pad": 0}
    assert [os.path.basename(s["path"]) for s in side["sources"]] == ["medical_style.jsonl", "wiki_style.json"]
    assert all(s["documents"] > 0 for s in side["sources"])
    assert side["characters"] == sum(s["chars"] for s in side["sources"]) > 10_000
    assert side["settings"]["vocab_size"] == VOCAB and side["settings"]["character_coverage"] == 0.9995


def test_round_trip_ids_and_specials(trained):
    """decode(encode(text)) == text on every sample document and on characters the vocabulary lacks (byte
    fallback: no <unk>); every id < vocab_size; <unk>=0 (the pad) <s>=1 </s>=2; digits one per token."""
    tok = load_tokenizer(str(trained[0]))
    assert tok.vocab_size == tok.n_pieces == VOCAB and tok.special_ids == {}
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert [tok.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    docs = sample_documents()
    assert len(docs) > 500
    for text in docs + [RARE]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert 0 not in ids and max(ids) < tok.vocab_size
    rare = tok.encode(RARE)
    assert sum(tok.sp.is_byte(i) for i in rare) >= 4 * 4  # four 4-byte characters at least, as bytes
    pieces = {tok.id_to_piece(i) for i in range(tok.vocab_size) if not tok.sp.is_byte(i)}
    assert "▁" in pieces  # a space is a piece, never the bytes of U+2581 (which would decode to "▁")
    assert all(sum(c.isdigit() for c in p) <= 1 for p in pieces)  # digits split: no piece holds two
    assert len(tok.encode("12345")) == 5
    assert tok.encode("你好", bos=True, eos=True)[0] == 1 and tok.encode("你好", bos=True, eos=True)[-1] == 2
    assert tok.encode_batch(docs[:5], num_threads=1) == [tok.encode(d) for d in docs[:5]]


def shared_corpus(name: str) -> str:
    path = os.path.join(SHARED_DATA, "pretrain", name)
    if not os.path.isfile(path):
        pytest.skip(SKIP_NO_SHARED_DATA)
    return path


def c4_documents() -> list[str]:
    with open(shared_corpus("c4-style-csl-abstracts.jsonl"), encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def test_chatglm2_vocabulary_and_ids_unchanged(tokenizer_path):
    """ChatGLM2 keeps its design vocab, its specials and its ids: the ids of a real corpus hash as they always did."""
    tok = ChatGLMTokenizer(tokenizer_path)
    assert (tok.n_pieces, tok.vocab_size) == (64789, 64793)
    assert tok.special_ids == {"[MASK]": 64789, "[gMASK]": 64790, "[sMASK]": 64791, "sop": 64792, "eop": 64793}
    ids = np.concatenate([np.array(tok.encode(d, bos=True, eos=True), dtype=np.uint16) for d in c4_documents()])
    assert ids.size == 266029
    assert hashlib.sha256(ids.tobytes()).hexdigest() == "3f37477381ce2e246a11587fbceb931d94a813aa711b2cd7dc5f198abb3d1f87"


def test_trained_on_real_corpora_round_trips_held_out_text(tmp_path):
    """Every shared pretraining corpus but one (gzip, plain text, JSON arrays and lines, named by a manifest), 3M
    characters, 8K pieces; the held-out corpus decodes back exactly and its tokens hold more than 2.5 bytes each."""
    held_out = c4_documents()
    manifest = tmp_path / "corpora.txt"
    names = sorted(n for n in os.listdir(os.path.dirname(shared_corpus("fever-textbook.txt")))
                   if not n.startswith("c4-style"))
    manifest.write_text("".join(os.path.join(SHARED_DATA, "pretrain", n) + "\n" for n in names))
    meta = tt.main([f"--manifest={manifest}", "--vocab_size=8192", "--max_chars=3000000", f"--out_dir={tmp_path / 'tok'}",
                    "--progress=false"])
    assert meta["characters"] == 3_000_000 and len(meta["sources"]) == len(names) >= 5
    assert all(s["documents"] > 0 for s in meta["sources"])
    tok = load_tokenizer(str(tmp_path / "tok"))
    encoded = tok.encode_batch(held_out, num_threads=1)
    assert all(tok.decode(ids) == text for ids, text in zip(encoded, held_out))
    n_bytes, n_tokens = sum(len(t.encode("utf-8")) for t in held_out), sum(map(len, encoded))
    assert 2.5 < n_bytes / n_tokens < 4.2  # ChatGLM2's 64,793 pieces: 4.21 bytes per token on this corpus


def test_file_or_folder_lookup(trained, tmp_path, monkeypatch):
    folder = str(trained[0])
    model = os.path.join(folder, MODEL_FILE)
    assert find_tokenizer(folder, download=False) == model and find_tokenizer(model, download=False) == model
    assert load_tokenizer(folder).sha256 == load_tokenizer(model).sha256 == trained[1]["tokenizer_sha256"]
    assert ChatGLMTokenizer(folder).path == model
    monkeypatch.setenv(TOKENIZER_ENV, folder)
    assert find_tokenizer(download=False) == model
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=f"--tokenizer {empty}: .*tokenizer.model"):
        find_tokenizer(str(empty))
    monkeypatch.setenv(TOKENIZER_ENV, str(empty))
    with pytest.raises(FileNotFoundError, match=f"{TOKENIZER_ENV}={empty}: .*tokenizer.model"):
        find_tokenizer(download=False)
    with pytest.raises(FileNotFoundError, match=r"missing\.model: no such file"):
        find_tokenizer(str(tmp_path / "missing.model"))


def test_bad_tokenizer_files_are_one_line_errors(tmp_path):
    import sentencepiece as spm

    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(DataError, match=r"junk\.model: .*SentencePiece") as e:
        ChatGLMTokenizer(str(junk))
    assert "\n" not in str(e.value)
    other = tmp_path / "other"  # a SentencePiece model with its own id layout (<s>, </s> absent)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sample_documents()[:200]), model_prefix=str(other),
                                   vocab_size=2500, bos_id=-1, eos_id=-1, minloglevel=2, num_threads=1)
    with pytest.raises(DataError, match=r"other\.model: .*\(0, -1, -1\)"):
        ChatGLMTokenizer(str(other) + ".model")


def test_bits_per_byte_by_hand(trained):
    """Three tokens of 你好！ (9 UTF-8 bytes) with losses 0.5, 1.2 and 0.3 nats: 2 nats = 2 / ln 2 = 2.88539 bits,
    over 9 bytes = 0.320599 bits per byte."""
    tok = load_tokenizer(str(trained[0]))
    assert tok.count_bytes(tok.encode("你好！")) == 9
    assert tok.count_bytes(tok.encode(RARE)) == len(RARE.encode("utf-8"))
    assert bits_per_byte(0.5 + 1.2 + 0.3, 9) == pytest.approx(0.3205989, abs=1e-7)
    assert bits_per_byte(9 * math.log(2), 9) == pytest.approx(1.0)  # one bit per byte exactly
    with pytest.raises(ValueError, match="positive byte count"):
        bits_per_byte(1.0, 0)


def test_config_checks():
    with pytest.raises(ConfigError, match="--vocab_size.*65535"):
        parse_config(tt.Config, ["--vocab_size=65536"])
    with pytest.raises(ConfigError, match="not both"):
        parse_config(tt.Config, ["--inputs=a.json", "--manifest=m.txt"])
    assert list(tt.split_sentences("ab\n\n  \ncdefg", 2)) == ["ab", "cd", "ef", "g"]


def test_character_budget_takes_from_every_input(tmp_path):
    """--max_chars bounds what is read; the inputs take turns, so a small budget still sees every input."""
    out = tmp_path / "tok"
    inputs = ",".join(sorted(glob.glob(os.path.join(ROOT, "data", "sample", "pretrain", "*.json*"))))
    meta = tt.main([f"--inputs={inputs}", "--max_chars=20000", "--vocab_size=2600", "--character_coverage=0.99",
                    f"--out_dir={out}", "--progress=false", "--num_threads=1"])
    assert meta["characters"] == 20000
    chars = [s["chars"] for s in meta["sources"]]
    assert min(chars) > 5000, chars


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    def error_of(*argv) -> str:  # train_tokenizer.py's main, in this process: exit 2, one line on stderr
        return main_error(tt, argv, monkeypatch, capsys)

    bad = tmp_path / "notes.bin"
    bad.write_text("this is neither JSON nor a known format\n")
    out = tmp_path / "out"
    monkeypatch.chdir(ROOT)  # the default inputs are the sample, cwd-relative
    err = error_of(f"--inputs={bad}", f"--out_dir={out}")
    assert str(bad) in err and "unknown format" in err and not out.exists()
    err = error_of("--vocab_size=60000", f"--out_dir={out}")  # the sample is small
    assert err.startswith("error: --vocab_size=60000 ") and "too large" in err and not out.exists()
    err = error_of("--vocab_size=1000", f"--out_dir={out}")
    assert err.startswith("error: --vocab_size=1000 ") and "too small" in err and not out.exists()


def test_data_process_with_own_tokenizer(trained, tmp_path):
    """data_process.py pretrain --tokenizer=FOLDER: the shards' sidecars carry that tokenizer's sha256 and vocab size,
    and the shards decode back to the documents."""
    import data_process
    folder, meta, _ = trained
    out = tmp_path / "pretrain"
    cwd = os.getcwd()
    os.chdir(ROOT)  # the default inputs are the sample, cwd-relative
    try:
        data_process.main(["pretrain", f"--tokenizer={folder}", f"--out_dir={out}", "--num_workers=1", "--progress=false"])
    finally:
        os.chdir(cwd)
    tok = load_tokenizer(str(folder))
    texts = []
    for split in ("train", "val"):
        with open(out / f"{split}_00000.json", encoding="utf-8") as f:
            side = json.load(f)
        assert side["tokenizer_sha256"] == meta["tokenizer_sha256"] and side["vocab_size"] == VOCAB
        ids = np.fromfile(out / f"{split}_00000.bin", dtype=np.uint16)
        assert int(ids.max()) < VOCAB and ids[-1] == 2
        ends = np.flatnonzero(ids == 2)
        assert len(ends) == side["documents"]
        texts += [tok.decode(d) for d in np.split(ids, ends + 1)[:-1]]
    pretrain_docs = set(sample_documents("pretrain"))
    assert len(texts) >= 300 and all(t in pretrain_docs for t in texts)


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        tt.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith("Train a tokenizer of our own")
    check_help(tt.Config, out)


def test_a_checkpoint_finds_the_tokenizer_it_was_trained_with(trained, tmp_path, monkeypatch):
    """A model of its own tokenizer (demo.sh's, speedrun.sh's) opens in eval.py / chat.py / export.py without
    --tokenizer: the path its checkpoint recorded, if the file there still has the recorded sha256. Else the default
    lookup, and the error names the --tokenizer to pass (it used to say only "another vocabulary")."""
    from babyllama.checkpoint import save_checkpoint
    from chatglm_tokenizer import recorded_tokenizer, tokenizer_sha256
    from conftest import tiny_ckpt, tiny_eval_model
    from generate import load_for_inference

    folder = str(trained[0])
    model_file, sha = os.path.join(folder, MODEL_FILE), tokenizer_sha256(os.path.join(folder, MODEL_FILE))
    assert recorded_tokenizer(folder, sha) == recorded_tokenizer(model_file, sha) == model_file
    assert recorded_tokenizer(folder, "0" * 64) == ""  # the file changed since: never taken
    assert recorded_tokenizer(str(tmp_path / "gone"), sha) == recorded_tokenizer(str(tmp_path), sha) == ""
    assert recorded_tokenizer("", sha) == recorded_tokenizer(folder, None) == ""

    def save(name, vocab, recorded, sha256):
        ckpt = dict(tiny_ckpt(tiny_eval_model(vocab_size=vocab), sha=sha256), config={"tokenizer": recorded})
        os.makedirs(tmp_path / name)
        save_checkpoint(ckpt, str(tmp_path / name / "best.pt"))
        return str(tmp_path / name)

    os.makedirs(tmp_path / "elsewhere")
    monkeypatch.setenv(TOKENIZER_ENV, str(tmp_path / "elsewhere"))  # a default that would fail
    run = save("own", VOCAB, folder, sha)
    tok = load_for_inference(run, "", "cpu", "float32")[3]
    assert tok.path == model_file and tok.vocab_size == VOCAB

    monkeypatch.setenv(TOKENIZER_ENV, folder)  # the recorded path is gone: the default lookup, and the advice
    for name, vocab, want in (("moved", VOCAB, "made with a tokenizer of sha256"), ("other", 512, "vocab_size 512")):
        run = save(name, vocab, "data/moved/tokenizer", "f" * 64)
        with pytest.raises(DataError) as e:
            load_for_inference(run, "", "cpu", "float32")
        assert want in str(e.value) and str(e.value).endswith(
            "pass --tokenizer=data/moved/tokenizer, the tokenizer it was trained with"), str(e.value)


def test_sft_starts_from_a_model_of_its_own_tokenizer_without_the_flag(trained, tmp_path, monkeypatch):
    """`python sft.py --init_from=RUN` after `pretrain.py --tokenizer=X`: SFT takes X, the pretrained model's own,
    not $BABYLLAMA_TOKENIZER or ChatGLM2's (which would fail: another vocabulary)."""
    import sft
    from babyllama.checkpoint import load_checkpoint, save_checkpoint
    from chatglm_tokenizer import tokenizer_sha256
    from conftest import tiny_ckpt, tiny_eval_model, write_jsonl

    folder = str(trained[0])
    sha = tokenizer_sha256(os.path.join(folder, MODEL_FILE))
    os.makedirs(tmp_path / "pre")
    pre = dict(tiny_ckpt(tiny_eval_model(max_seq_len=64, vocab_size=VOCAB), kind="pretrain", sha=sha),
               config={"tokenizer": folder})
    save_checkpoint(pre, str(tmp_path / "pre" / "best.pt"))
    convs = [{"conversations": [{"role": "user", "content": f"问题{i}：头疼怎么办？"},
                                {"role": "assistant", "content": f"回答{i}：多休息，多喝水。"}]} for i in range(8)]
    os.makedirs(tmp_path / "sft")
    write_jsonl(tmp_path / "sft" / "train.jsonl", convs)
    write_jsonl(tmp_path / "sft" / "val.jsonl", convs[:2])
    os.makedirs(tmp_path / "elsewhere")
    monkeypatch.setenv(TOKENIZER_ENV, str(tmp_path / "elsewhere"))  # the default lookup would fail
    sft.main([f"--init_from={tmp_path / 'pre'}", f"--data_dir={tmp_path / 'sft'}", f"--out_dir={tmp_path / 'out'}",
              "--max_steps=2", "--warmup_steps=1", "--eval_interval=2", "--log_interval=1", "--batch_size=2",
              "--device=cpu", "--compile=false"])
    assert load_checkpoint(str(tmp_path / "out" / "last.pt"))["tokenizer_sha256"] == sha


def test_the_stages_hand_their_tokenizer_on_without_the_flag(trained, tmp_path, monkeypatch):
    """data_process.py --tokenizer=X, then pretrain.py, sft.py and eval.py's loader with no --tokenizer (the default
    lookup pointing elsewhere): each stage takes X from what the one before recorded (the shards' sidecar, then the
    checkpoints' config), so a model of its own tokenizer is trained and opened as one of ChatGLM2's is."""
    import data_process
    import pretrain
    import sft
    from babyllama.checkpoint import load_checkpoint
    from generate import load_for_inference

    folder = str(trained[0])
    model_file = os.path.join(folder, MODEL_FILE)
    monkeypatch.chdir(ROOT)  # the default inputs are the sample, cwd-relative
    data_process.main(["pretrain", f"--tokenizer={folder}", f"--out_dir={tmp_path / 'pre'}", "--num_workers=1",
                       "--progress=false"])
    data_process.main(["sft", f"--tokenizer={folder}", f"--out_dir={tmp_path / 'sft'}", "--progress=false"])
    os.makedirs(tmp_path / "elsewhere")
    monkeypatch.setenv(TOKENIZER_ENV, str(tmp_path / "elsewhere"))  # the default lookup would fail
    small = ["--dim=32", "--n_layers=1", "--n_heads=2", "--max_seq_len=64", "--batch_size=4", "--max_steps=2",
             "--warmup_steps=1", "--eval_interval=2", "--eval_windows=4", "--device=cpu", "--compile=false"]
    pretrain.main([f"--data_dir={tmp_path / 'pre'}", f"--out_dir={tmp_path / 'p'}", *small])
    sft.main([f"--init_from={tmp_path / 'p'}", f"--data_dir={tmp_path / 'sft'}", f"--out_dir={tmp_path / 's'}",
              *[a for a in small if not a.split("=")[0] in ("--dim", "--n_layers", "--n_heads", "--max_seq_len")]])
    for run in ("p", "s"):
        saved = load_checkpoint(str(tmp_path / run / "last.pt"))
        assert saved["config"]["tokenizer"] == model_file and saved["model_args"]["vocab_size"] == VOCAB
    assert load_for_inference(str(tmp_path / "s"), "", "cpu", "float32")[3].path == model_file
