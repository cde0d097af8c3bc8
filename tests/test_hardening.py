"""Checkpoints that cannot run code or hide corruption, run folders owned by one run, validated configs, the NaN
guard, tokenizer identity, Ctrl-C / SIGTERM, disk full, and any bytes on chat/eval input."""
import errno
import io
import os
import signal
import subprocess
import sys
import time
import types
import zipfile

import numpy as np
import pytest
import torch

import chat
import eval as ev
import pretrain
from babyllama import runtime
from babyllama.config import parse_config
from babyllama.errors import ConfigError, DataError
from conftest import (ROOT, TINY, FakeTokenizer, main_error, tiny_ckpt, tiny_eval_model, write_jsonl,
                      write_shard)
from dataset import data_tokenizer
from babyllama.run_dir import claim_run_dir
from babyllama.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from babyllama.train_log import read_metrics as metrics

torch.set_num_threads(1)


class RunsCommand:
    """Unpickling this calls os.system: what a hostile checkpoint would hold."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def tiny_run(data, out, *extra):
    """A tiny in-process pretrain run -> its exit code (0 when it returned)."""
    try:
        pretrain.main([*TINY, f"--data_dir={data}", f"--out_dir={out}", *extra])
        return 0
    except SystemExit as e:
        return e.code


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished tiny run (6 steps, checkpoints at 3 and 6) and its data folder (phrases over a 512-token vocab)."""
    base = tmp_path_factory.mktemp("trained")
    rng = np.random.default_rng(0)
    phrases = [rng.integers(3, 512, size=int(rng.integers(5, 20))) for _ in range(40)]
    (base / "data").mkdir()
    for name, docs in (("train_00000", 300), ("val_00000", 60)):
        ids = [t for _ in range(docs) for t in [*np.concatenate([phrases[int(i)] for i in rng.integers(0, 40, 4)]), 2]]
        write_shard(str(base / "data" / f"{name}.bin"), ids, name[:-6], 512)
    data, out = str(base / "data"), str(base / "run")
    assert tiny_run(data, out, "--max_steps=6", "--eval_interval=3") == 0
    return data, out


# ---- checkpoints: only tensors and plain values, checksummed ----------------------------------------------------

def test_checkpoint_round_trip_is_plain_and_verified(trained):
    _, out = trained
    ckpt = torch.load(os.path.join(out, "last.pt"), weights_only=True)  # loads with the safe unpickler
    assert ckpt["step"] == 6 and len(ckpt["checksum"]) == 64
    assert isinstance(ckpt["rng"][0]["numpy"][1], torch.Tensor) and isinstance(ckpt["rng"][0]["python"], list)
    assert load_checkpoint(os.path.join(out, "last.pt"))["step"] == 6


def test_crafted_pickle_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "best.pt"
    torch.save({"model": RunsCommand(marker), "model_args": {}}, path)
    with pytest.raises(CheckpointError, match=r"best\.pt: refused\b.*posix\.system"):
        load_checkpoint(str(path))
    assert not marker.exists()


def test_crafted_pickle_under_resume_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    marker = tmp_path / "pwned"
    (tmp_path / "run").mkdir()
    torch.save({"model": RunsCommand(marker), "model_args": {}}, tmp_path / "run" / "last.pt")
    err = main_error(pretrain, [*TINY, f"--out_dir={tmp_path / 'run'}", "--resume"], monkeypatch, capsys)
    assert "last.pt: refused" in err
    assert not marker.exists()


def test_crafted_pickle_under_eval_is_one_line_exit_2(tmp_path, tokenizer_path, monkeypatch, capsys):
    marker = tmp_path / "pwned"
    (tmp_path / "run").mkdir()
    torch.save({"model": RunsCommand(marker), "model_args": {}}, tmp_path / "run" / "last.pt")
    err = main_error(ev, [f"--ckpt={tmp_path / 'run' / 'last.pt'}", "--device=cpu", "--data=none"], monkeypatch, capsys)
    assert "last.pt: refused" in err
    assert not marker.exists()


def test_flipped_truncated_and_foreign_files_are_one_line_errors(trained, tmp_path, monkeypatch, capsys):
    _, out = trained
    good = open(os.path.join(out, "last.pt"), "rb").read()
    # 4 KB flipped inside the biggest tensor record (an AdamW moment or a weight matrix)
    with zipfile.ZipFile(os.path.join(out, "last.pt")) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + 64
    flipped = bytearray(good)
    flipped[start:start + 4096] = bytes(b ^ 0xFF for b in flipped[start:start + 4096])
    cases = {"flipped.pt": bytes(flipped), "truncated.pt": good[: len(good) // 2], "empty.pt": b""}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    with pytest.raises(CheckpointError, match=r"flipped\.pt: .*(checksum|not a readable)"):
        load_checkpoint(str(tmp_path / "flipped.pt"))
    for name in ("truncated.pt", "empty.pt"):
        with pytest.raises(CheckpointError, match=name.replace(".", r"\.") + ": not a readable"):
            load_checkpoint(str(tmp_path / name))
    # a changed value under an intact zip: only the checksum can tell
    ckpt = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    ckpt["optimizer"]["state"][0]["exp_avg"].add_(1.0)
    torch.save(ckpt, tmp_path / "edited.pt")
    with pytest.raises(CheckpointError, match=r"edited\.pt: .*checksum"):
        load_checkpoint(str(tmp_path / "edited.pt"))
    save_checkpoint({"weights": {}}, str(tmp_path / "foreign.pt"))
    with pytest.raises(CheckpointError, match=r"foreign\.pt: not a checkpoint"):
        load_checkpoint(str(tmp_path / "foreign.pt"))
    torch.save({"model": {}, "model_args": {}, "rng": np.random.get_state()}, tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match=r"old\.pt: refused\b.*older version"):
        load_checkpoint(str(tmp_path / "old.pt"))
    # a resume from the corrupted file stops with one line, before any training
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pt").write_bytes(bytes(flipped))
    assert "last.pt:" in main_error(pretrain, [*TINY, f"--out_dir={tmp_path / 'run'}", "--resume"], monkeypatch, capsys)


def test_planted_symlink_is_not_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "run").mkdir()
    os.symlink(victim, tmp_path / "run" / "last.pt.tmp")
    save_checkpoint({"model": {"w": torch.ones(2)}, "model_args": {}}, str(tmp_path / "run" / "last.pt"))
    assert victim.read_text() == "precious"
    assert not os.path.islink(tmp_path / "run" / "last.pt") and not os.path.lexists(tmp_path / "run" / "last.pt.tmp")
    assert load_checkpoint(str(tmp_path / "run" / "last.pt"))["model"]["w"].sum() == 2


# ---- a run folder belongs to one run ------------------------------------------------------------------------------

def test_second_run_fresh_run_and_resume_flags_are_refused(trained, tmp_path, capsys):
    data, out = trained
    lock = claim_run_dir(out, fresh=False, overwrite=False)  # as a run still writing there would
    try:
        assert tiny_run(data, out, "--resume", "--max_steps=8") == 2
        assert "another run (pid" in capsys.readouterr().err
    finally:
        os.close(lock)
    assert tiny_run(data, out, "--max_steps=6") == 2  # fresh run into a finished run's folder
    err = capsys.readouterr().err
    assert "last.pt" in err and "--resume" in err and "--overwrite" in err and err.count("\n") == 1
    for flag in ("--batch_size=8", "--dim=64", "--max_seq_len=16", "--learning_rate=0.001"):
        assert tiny_run(data, out, "--resume", flag) == 2
        err = capsys.readouterr().err
        assert flag in err and err.count("\n") == 1, err
    # a copy resumed without the model flags takes the saved config; max_steps may change, with a note
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("last.pt", "metrics.jsonl", "log.txt"):
        (copy / name).write_bytes(open(os.path.join(out, name), "rb").read())
    pretrain.main([f"--data_dir={data}", f"--out_dir={copy}", "--resume", "--max_steps=8", "--device=cpu",
                   "--compile=false"])  # (the default --warmup_steps=100 is the flags', not the run's: no error)
    printed = capsys.readouterr().out
    assert "note: --max_steps=8" in printed and "(the run had 6)" in printed and "batch: 4 rows x 32 tokens" in printed
    assert load_checkpoint(str(copy / "last.pt"))["step"] == 8
    # --overwrite starts afresh: the old log is gone
    assert tiny_run(data, str(copy), "--max_steps=2", "--eval_interval=2", "--warmup_steps=1", "--overwrite") == 0
    log = (copy / "log.txt").read_text()
    assert "resuming" not in log and "note:" not in log and sorted(metrics(str(copy))[0]) == [1, 2]


# ---- validation ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag, message", [
    ("--learning_rate=inf", "learning_rate"), ("--weight_decay=nan", "weight_decay"), ("--dim=0", "dim"),
    ("--n_heads=0", "n_heads"), ("--seed=-1", "seed"), ("--beta2=1.5", "beta2"), ("--n_kv_heads=-1", "n_kv_heads"),
    ("--dropout=nan", "dropout"), ("--device=gpu", "device.*'gpu'")])
def test_bad_values_fail_validation(flag, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(pretrain.PretrainConfig, [flag])


@pytest.mark.parametrize("name, bad", [
    ("grad_clip", "-1"), ("peak_tflops", "-1"), ("eval_windows", "-1"), ("batch_tokens", "-1"), ("ce_chunk", "-1"),
    ("max_minutes", "-1"), ("fit_minutes", "-1"), ("max_bad_steps", "0"), ("eval_interval", "0"), ("log_interval", "0"),
    ("ckpt_interval", "0"), ("decay_frac", "0"), ("decay_frac", "1.5"), ("min_lr", "0.5"), ("min_lr", "-1e-4")])
def test_a_bad_bound_names_its_flag_and_the_value_given(name, bad):
    """A user with several interval flags learns which one is wrong and what was read, not "intervals must be > 0"."""
    with pytest.raises(ConfigError) as e:
        parse_config(pretrain.PretrainConfig, [f"--{name}={bad}"])
    message = str(e.value)
    assert message.startswith(f"{name} must be") and float(message.rsplit("got ", 1)[1]) == float(bad), message


@pytest.mark.parametrize("script, argv", [
    ("data_process", ["--num_workers=-1"]), ("data_process", ["--min_chars=-1"]), ("data_process", ["--txt_max_chars=0"]),
    ("data_process", ["--val_fraction=1.5"]), ("data_process", ["--val_min_records=-1"]),
    ("data_process", ["--sft_min_answer_chars=-1"]), ("data_process", ["--max_record_chars=10"]),
    ("train_tokenizer", ["--max_chars=0"]), ("train_tokenizer", ["--txt_max_chars=0"]),
    ("train_tokenizer", ["--character_coverage=0.5"]), ("eval", ["--ppl_windows=-1"]), ("eval", ["--limit=-1"]),
    ("sft", ["--pad_multiple=0"]), ("pretrain", ["--max_seq_len=4"]), ("pretrain", ["--vocab_size=70000"]),
    ("bench", ["--warmup=-1"]), ("bench", ["--steps=0"])])
def test_every_script_names_the_bad_flag_and_the_value_given(script, argv):
    """The same rule for each script's own knobs: the message starts with the flag that is wrong and ends with what was
    read, one check per flag (a combined check named two flags and no value)."""
    import importlib
    mod = importlib.import_module(script)
    cls = next(c for name, c in vars(mod).items() if name.endswith("Config") and getattr(c, "__module__", "") == script)
    name, value = argv[0][2:].split("=")
    with pytest.raises(ConfigError) as e:
        parse_config(cls, argv)
    message = str(e.value)
    assert message.lstrip("-").startswith(f"{name} must be"), message
    assert float(message.rsplit("got ", 1)[1]) == float(value), message


def test_bad_sft_mix_fails_validation():
    import sft
    with pytest.raises(ConfigError, match="mix: 'medical'.*NAME=TIMES"):
        parse_config(sft.SFTConfig, ["--mix=medical"])


def test_cuda_without_cuda_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for cls in (pretrain.PretrainConfig, ev.EvalConfig, chat.ChatConfig):
        with pytest.raises(ConfigError, match="--device=cuda: .*--device=cpu"):
            parse_config(cls, ["--device=cuda"])


def test_nan_guard_never_saves_exploded_weights(tiny_corpus, tmp_path, capsys):
    out = tmp_path / "boom"
    code = tiny_run(tiny_corpus, out, "--max_steps=20", "--eval_interval=2", "--learning_rate=1e6", "--min_lr=0",
                    "--warmup_steps=0", "--grad_clip=0")
    assert code == 3
    log = (out / "log.txt").read_text().strip().splitlines()
    assert log[-1].startswith("stop") and "no checkpoint" in log[-1], log[-3:]
    assert not (out / "last.pt").exists() and not (out / "best.pt").exists()


# ---- tokenizer identity -------------------------------------------------------------------------------------------

def test_shards_of_two_tokenizers_are_refused_even_without_a_tokenizer(tiny_corpus, tmp_path, monkeypatch):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    write_shard(str(mixed / "train_00000.bin"), range(3, 200), "train", 512, tokenizer_sha256="a" * 64)
    write_shard(str(mixed / "train_00001.bin"), range(3, 200), "train", 512, tokenizer_sha256="b" * 64)
    write_shard(str(mixed / "val_00000.bin"), range(3, 200), "val", 512, tokenizer_sha256="a" * 64)
    with pytest.raises(DataError, match="train_00001.bin: .*bbbbbbbbbbbb.*train_00000.bin"):
        data_tokenizer(str(mixed))

    from dataset import PretrainData
    with pytest.raises(DataError, match="train_00001.bin: .*bbbbbbbbbbbb"):
        PretrainData(str(mixed), "train", 8, 2)
    # a shard that names no tokenizer (synthetic ids) beside one that does; two vocabulary sizes
    for sha, vocab, says in ((None, 512, r"no named tokenizer \(synthetic ids\)"), ("a" * 64, 640, "vocab_size 640")):
        odd = tmp_path / f"odd_{vocab}"
        odd.mkdir()
        write_shard(str(odd / "train_00000.bin"), range(3, 200), "train", 512, tokenizer_sha256="a" * 64)
        write_shard(str(odd / "val_00000.bin"), range(3, 200), "val", vocab, tokenizer_sha256=sha)
        with pytest.raises(DataError, match=f"val_00000.bin: .*{says}.*train_00000.bin"):
            data_tokenizer(str(odd))

    def no_tokenizer(*a, **k):
        raise FileNotFoundError("no tokenizer.model")
    monkeypatch.setattr(pretrain, "find_tokenizer", no_tokenizer)
    assert tiny_run(str(mixed), tmp_path / "r1", "--max_steps=2", "--warmup_steps=1") == 2
    # one tokenizer's shards: its hash goes into the checkpoint, and a resume with another tokenizer is refused
    os.remove(mixed / "train_00001.bin")
    assert tiny_run(str(mixed), tmp_path / "r2", "--max_steps=2", "--eval_interval=2", "--warmup_steps=1") == 0
    assert load_checkpoint(str(tmp_path / "r2" / "last.pt"))["tokenizer_sha256"] == "a" * 64
    other = types.SimpleNamespace(sha256="c" * 64, vocab_size=512)  # another tokenizer.model
    monkeypatch.setattr(pretrain, "load_run_tokenizer", lambda cfg: other)
    monkeypatch.setattr(pretrain, "TokenBytes", lambda tok: None)
    assert tiny_run(str(mixed), tmp_path / "r2", "--resume", "--max_steps=4") == 2


# ---- Ctrl-C / SIGTERM, disk full ----------------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.slow
def test_signal_finishes_the_step_saves_and_exits_130(tiny_corpus, tmp_path, sig):
    out = tmp_path / "sig"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, "pretrain.py", *TINY, f"--data_dir={tiny_corpus}", f"--out_dir={out}",
                          "--max_steps=100000", "--eval_interval=100000", "--ckpt_interval=100000"],
                         cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and len(metrics(str(out))[0]) >= 3):
        time.sleep(0.05)
    p.send_signal(sig)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    step = load_checkpoint(str(out / "last.pt"))["step"]
    assert f"at step {step}: saved {out}/last.pt" in stdout and f"--resume --out_dir={out}" in stdout
    assert max(metrics(str(out))[0]) == step


def test_disk_full_keeps_the_previous_checkpoint_and_claims_no_best(trained, tmp_path, monkeypatch, capsys):
    data, out = trained
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("last.pt", "best.pt", "metrics.jsonl", "log.txt"):
        (copy / name).write_bytes(open(os.path.join(out, name), "rb").read())
    before = (copy / "last.pt").read_bytes()

    def full_disk(obj, f):
        f.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(runtime.torch, "save", full_disk)
    assert tiny_run(data, copy, "--resume", "--max_steps=12", "--eval_interval=3") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "best.pt: " in err and "no space left" in err, err
    assert (copy / "last.pt").read_bytes() == before and not list(copy.glob("*.tmp"))
    assert load_checkpoint(str(copy / "last.pt"))["step"] == 6
    assert "step 9: val loss" not in (copy / "log.txt").read_text()  # never logged, let alone as "(best)"


# ---- eval and chat: unwritable folders, any bytes ------------------------------------------------------------------

def test_eval_prints_scores_then_says_where_to_write(tmp_path, monkeypatch, capsys):
    model, tok = tiny_eval_model(max_seq_len=32), FakeTokenizer()
    data = write_jsonl(tmp_path / "qa.jsonl", [{"question": "问题", "answer": "答案"}] * 2)
    cfg = ev.EvalConfig(ckpt=str(tmp_path / "ro" / "best.pt"), data=data, val_bin="none", max_new_tokens=4)

    def read_only(path, text):
        if str(tmp_path / "ro") in path:
            raise PermissionError(errno.EROFS, "Read-only file system")
        return real(path, text)
    real = ev.write_atomic
    monkeypatch.setattr(ev, "write_atomic", read_only)
    with pytest.raises(DataError, match=r"ro: .*eval_report.json.*Read-only file system.*--out_dir"):
        ev.evaluate(cfg, model, tiny_ckpt(model), tok, cfg.ckpt, torch.device("cpu"), torch.float32, progress=False)
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("BLEU-4")
    cfg.out_dir = str(tmp_path / "elsewhere")
    ev.evaluate(cfg, model, tiny_ckpt(model), tok, cfg.ckpt, torch.device("cpu"), torch.float32, progress=False)
    assert (tmp_path / "elsewhere" / "eval_report.json").exists()


def test_chat_and_eval_accept_any_bytes(monkeypatch, capsys):
    raw = "你好\n".encode("gbk") + "再见\n".encode() + b"\xff\xfe\n"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8"))
    lines = list(chat.read_lines(interactive=False))
    assert lines == ["\ufffd\ufffd\ufffd", "再见", "\ufffd\ufffd"]
    assert capsys.readouterr().err.count("not UTF-8") == 1
    cfg = parse_config(ev.EvalConfig, ["--prompts=" + b"\xc4\xe3\xba\xc3".decode("utf-8", "surrogateescape") + ",好"])
    assert cfg.prompts == ["\ufffd\ufffd\ufffd", "好"] and "not UTF-8" in capsys.readouterr().err


def test_sft_jsonl_that_is_not_utf8_is_one_line(tmp_path):
    from babyllama.fileio import read_jsonl
    path = tmp_path / "train.jsonl"
    path.write_bytes('{"conversations": []}\n'.encode() + '{"conversations": [{"role": "user", "content": "你好"}]}\n'.encode("gb18030"))
    with pytest.raises(DataError, match=r"train\.jsonl:2: not UTF-8"):
        list(read_jsonl(str(path), "a JSON object"))


def test_nan_guard_names_the_last_checkpoint_that_is_truly_good(tiny_corpus, tmp_path, monkeypatch):
    import model as model_mod
    real_forward = model_mod.Transformer.forward
    calls = {"n": 0}

    def exploding(self, idx, targets=None, *a):
        if self.training:
            calls["n"] += 1
            if calls["n"] == 5:  # weights blow up during step 5; the loss stays finite
                with torch.no_grad():
                    self.layers[0].feed_forward.w1.weight.mul_(1e8)
        return real_forward(self, idx, targets, *a)

    monkeypatch.setattr(model_mod.Transformer, "forward", exploding)
    out = tmp_path / "blowup"
    assert tiny_run(tiny_corpus, out, "--max_steps=10", "--eval_interval=2") == 3
    last = (out / "log.txt").read_text().strip().splitlines()[-1]
    assert last.startswith("stopping at step 6") and "exploded" in last and f"{out}/last.pt (step 4)" in last, last
    ckpt = load_checkpoint(str(out / "last.pt"))
    assert ckpt["step"] == 4 and max(v.abs().max().item() for v in ckpt["model"].values()) < 1e4
