"""Bad input is one line before compute is spent; children die with their parent; nothing half-written is left.

    python -m pytest tests/test_hardening_inputs.py -q
hf: folders (types, sizes, weight files inside the folder, finite weights), shards' id range, --batch_tokens, the SFT
mix, Ctrl-C before the training loop, data_process.py's workers after a SIGKILL of the main process, a full disk
while tokenizing SFT data, train_tokenizer.py's folder (--overwrite, links, lock). Tiny models and data.
"""
import json
import os
import resource
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import ROOT, run_script, tiny_ckpt, tiny_model, write_jsonl, write_shard

import hf_llama
from babyllama.errors import DataError
from dataset import PretrainData
from model import ModelArgs, Transformer

TINY = ["--dim=32", "--n_layers=1", "--n_heads=4", "--max_seq_len=32", "--batch_size=4", "--compile=false",
        "--warmup_steps=0", "--eval_windows=4", "--vocab_size=512", "--device=cpu"]


def env_without_tokenizer() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("BABYLLAMA_TOKENIZER", None)  # synthetic ids: the runs need no tokenizer
    return env


def one_line_error(r, returncode: int = 2) -> str:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == returncode and len(lines) == 1 and "Traceback" not in r.stderr, (r.returncode, r.stderr)
    return lines[0]


# ---------------------------------------------------------------- hf: folders


@pytest.fixture
def hf_folder(tmp_path):
    """A Hugging Face folder of a tiny model (hf_llama's own config and weights), and its parts to spoil."""
    from safetensors.torch import save_file
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=512, max_seq_len=32))
    d = tmp_path / "hf"
    d.mkdir()
    json.dump(hf_llama.hf_config(model.args), open(d / "config.json", "w"))
    save_file(hf_llama.to_hf_state(model), str(d / "model.safetensors"))
    return d


def spoil_config(d, **changes):
    cfg = json.load(open(d / "config.json"))
    cfg.update(changes)
    json.dump(cfg, open(d / "config.json", "w"))


def spoil_weight(d, name, fn):
    from safetensors.torch import load_file, save_file
    t = load_file(str(d / "model.safetensors"))
    t[name] = fn(t[name])
    save_file(t, str(d / "model.safetensors"))


def shard_index(d, shard: str):
    """Moves the weights into `shard` (relative to the folder) behind a model.safetensors.index.json."""
    from safetensors import safe_open
    with safe_open(str(d / "model.safetensors"), framework="pt") as h:
        names = list(h.keys())
    os.replace(d / "model.safetensors", d / "weights.bin")
    json.dump({"weight_map": {n: shard for n in names}}, open(d / "model.safetensors.index.json", "w"))


CASES = {
    "a JSON array": (lambda d: json.dump([1, 2], open(d / "config.json", "w")), "expected a JSON object, got a JSON list"),
    "layers true": (lambda d: spoil_config(d, num_hidden_layers=True), "num_hidden_layers is true; expected a whole"),
    "size as text": (lambda d: spoil_config(d, hidden_size="32"), 'hidden_size is "32"; expected a whole number'),
    "size as float": (lambda d: spoil_config(d, vocab_size=512.0), "vocab_size is 512.0; expected a whole number"),
    "huge vocab": (lambda d: spoil_config(d, vocab_size=10 ** 9), "vocab_size is 1000000000; expected a whole number in"),
    "negative eps": (lambda d: spoil_config(d, rms_norm_eps=-1), "rms_norm_eps is -1; expected a positive number"),
    "tie as text": (lambda d: spoil_config(d, tie_word_embeddings="yes"), 'tie_word_embeddings is "yes"; expected true'),
    "project val_loss": (lambda d: spoil_config(d, baby_llama2={"val_loss": "low"}), "baby_llama2.val_loss is \"low\""),
    "int weights": (lambda d: spoil_weight(d, "model.norm.weight", lambda t: t.to(torch.int32)),
                    "tensor model.norm.weight is I32; expected weights of F32, F16, BF16"),
    "bool weights": (lambda d: spoil_weight(d, "model.norm.weight", lambda t: t > 0), "is BOOL; expected weights of F32"),
    "NaN weight": (lambda d: spoil_weight(d, "model.layers.0.mlp.up_proj.weight", lambda t: t.index_fill(0, torch.tensor(
        [3]), float("nan"))), "tensor model.layers.0.mlp.up_proj.weight holds values that are not finite"),
    "wrong shape": (lambda d: spoil_weight(d, "model.norm.weight", lambda t: t[:16]), "has shape (16,), config.json"),
    "not safetensors": (lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 40), "not a safetensors file"),
    "index ../": (lambda d: shard_index(d, "../weights.bin"), "weight file '../weights.bin' is not a file inside"),
    "index absolute": (lambda d: shard_index(d, os.path.abspath(d / "weights.bin")), "is not a file inside"),
    "index link out": (lambda d: (shard_index(d, "link.bin"), os.replace(d / "weights.bin", d.parent / "w.bin"),
                                  os.symlink(d.parent / "w.bin", d / "link.bin")), "'link.bin' is not a file inside"),
    "index not a map": (lambda d: (shard_index(d, "weights.bin"), json.dump({"weight_map": ["x"]}, open(
        d / "model.safetensors.index.json", "w"))), "weight_map must be an object"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hf_folder_problems_are_one_line_naming_the_file(hf_folder, case):
    spoil, message = CASES[case]
    hf_llama.load_init(f"hf:{hf_folder}")  # the folder as written loads
    spoil(hf_folder)
    with pytest.raises(DataError) as e:
        hf_llama.load_init(f"hf:{hf_folder}")
    assert message in str(e.value) and str(hf_folder) in str(e.value) and "\n" not in str(e.value)


def test_bad_hf_folder_stops_pretrain_before_any_data(hf_folder, tmp_path):
    spoil_config(hf_folder, num_hidden_layers=True)
    r = run_script("pretrain.py", [f"--init_from=hf:{hf_folder}", f"--data_dir={tmp_path}/none",
                                   f"--out_dir={tmp_path}/out"], check=False)
    assert "num_hidden_layers is true" in one_line_error(r) and not (tmp_path / "out").exists()


# ---------------------------------------------------------------- shards, batch size, the SFT mix


def synthetic_shards(d, bad_at=None, bad_id=600):
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 512, 3000)
    if bad_at is not None:
        ids[bad_at] = bad_id
    os.makedirs(d, exist_ok=True)
    write_shard(os.path.join(d, "train_00000.bin"), ids, "train", 512)
    write_shard(os.path.join(d, "val_00000.bin"), rng.integers(3, 512, 600), "val", 512)
    return str(d)


def test_a_token_id_outside_the_vocabulary_is_one_line_at_load(tmp_path):
    data = synthetic_shards(tmp_path / "data", bad_at=2000)
    with pytest.raises(DataError, match=r"train_00000.bin: token 2,000 is id 600, outside the model's vocabulary \[0, 512\)"):
        PretrainData(data, "train", 32, 4, vocab_size=512)
    PretrainData(data, "train", 32, 4, vocab_size=1024)  # a larger model vocabulary holds it
    r = subprocess.run([sys.executable, "pretrain.py", f"--data_dir={data}", f"--out_dir={tmp_path}/out", *TINY,
                        "--max_steps=2"], cwd=ROOT, env=env_without_tokenizer(), capture_output=True, text=True,
                       timeout=300)
    assert "token 2,000 is id 600" in one_line_error(r) and "step 1" not in r.stdout


def test_batch_tokens_not_a_multiple_is_one_line_before_the_folder_is_claimed(tmp_path):
    data, out = synthetic_shards(tmp_path / "data"), tmp_path / "out"
    out.mkdir()
    (out / "last.pt").write_bytes(b"an earlier run")  # --overwrite must not delete it for a run that cannot start
    r = subprocess.run([sys.executable, "pretrain.py", f"--data_dir={data}", f"--out_dir={out}", *TINY, "--max_steps=2",
                        "--batch_tokens=100", "--overwrite"], cwd=ROOT, env=env_without_tokenizer(),
                       capture_output=True, text=True, timeout=300)
    assert one_line_error(r) == ("error: batch_tokens 100 is not a multiple of batch_size*seq_len*world = "
                                 "4*32*1 = 128")
    assert sorted(os.listdir(out)) == ["last.pt"] and (out / "last.pt").read_bytes() == b"an earlier run"


def test_sft_mix_is_checked_against_the_data_before_the_model_is_loaded(tmp_path):
    data = tmp_path / "sft"
    data.mkdir()
    json.dump({"sources": ["alpaca.json", "medical_qa.jsonl"]}, open(data / "train.json", "w"))
    common = [f"--data_dir={data}", f"--out_dir={tmp_path}/out", "--init_from=/nonexistent/pretrain"]
    for mix, message in [("surgery=2", "'surgery' matches no source of"), ("medical=0,alpaca=0", "leaves no conversation"),
                         ("medical=x", "is not NAME=TIMES")]:
        r = run_script("sft.py", [*common, f"--mix={mix}"], check=False)
        assert message in one_line_error(r) and not (tmp_path / "out").exists()
    r = run_script("sft.py", [*common, "--mix= medical = 2 , alpaca=0"], check=False)  # spaces are fine: the mix passes
    assert one_line_error(r) == ("error: --init_from /nonexistent/pretrain: no such checkpoint (run pretrain.py "
                                 "first, or pass --init_from=RUN_FOLDER, FILE or hf:FOLDER)")


def test_ctrl_c_before_the_training_loop_is_one_line_exit_130(tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    data.mkdir()
    write_shard(str(data / "train_00000.bin"), rng.integers(3, 512, 200_000), "train", 512)
    # 7,800 windows: seconds of validation even on a fast idle CPU, so the signal lands inside it
    write_shard(str(data / "val_00000.bin"), rng.integers(3, 512, 2_000_000), "val", 512)
    args = ["--dim=256", "--n_layers=4", "--n_heads=4", "--max_seq_len=256", "--batch_size=4", "--compile=false",
            "--warmup_steps=0", "--eval_windows=0", "--vocab_size=512", "--device=cpu", "--max_steps=5"]
    p = subprocess.Popen([sys.executable, "-u", "pretrain.py", f"--data_dir={data}", f"--out_dir={tmp_path}/out",
                          *args], cwd=ROOT, env=env_without_tokenizer(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    for line in p.stdout:  # the step 0 validation is about to run: the loop has not started
        if "step 0 validation" in line:
            break
    time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130 and err.strip() == "interrupted (Ctrl-C)", err[-2000:]
    assert not os.path.exists(tmp_path / "out" / "last.pt")


@pytest.mark.parametrize("script", ["pretrain.py", "sft.py", "eval.py", "export.py", "chat.py", "bench.py"])
def test_ctrl_c_while_a_script_imports_torch_is_one_line(script, tmp_path):
    """torch's import takes seconds (a minute on a cold machine), and pretrain.py says it is starting: a Ctrl-C then
    is one line and exit 130, not the traceback of an import."""
    out = f"--out={tmp_path}/out/bench.json" if script == "bench.py" else f"--out_dir={tmp_path}/out"
    p = subprocess.Popen([sys.executable, script, out], cwd=ROOT, stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)  # python is up, torch is being imported
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and err.strip() == "interrupted (Ctrl-C)", err[-2000:]
    assert os.listdir(tmp_path) == []


def test_ctrl_c_while_a_tokenizer_trains_is_answered_at_once(tmp_path):
    """SentencePiece's training is one long native call: Ctrl-C used to wait for its end (minutes on a large budget).
    Here the training would take seconds more; the run ends within a second, in one line, leaving no folder."""
    import random
    rng = random.Random(0)
    words = ["".join(chr(0x4E00 + rng.randrange(3000)) for _ in range(rng.randint(1, 4))) for _ in range(20000)]
    corpus = tmp_path / "corpus.jsonl"
    with open(corpus, "w", encoding="utf-8") as f:
        for _ in range(3000):
            text = "，".join("".join(rng.choice(words) for _ in range(8)) for _ in range(60)) + "。"
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    p = subprocess.Popen([sys.executable, "-u", "train_tokenizer.py", f"--inputs={corpus}", "--vocab_size=32000",
                          "--num_threads=1", f"--out_dir={tmp_path}/tok"], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    for line in p.stdout:
        if line.startswith("training on"):
            break
    time.sleep(0.3)
    t0 = time.time()
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    took = time.time() - t0
    assert p.returncode == 130 and err.strip() == "interrupted (Ctrl-C)", err[-2000:]
    assert took < 1.5 and sorted(os.listdir(tmp_path)) == ["corpus.jsonl"], (took, os.listdir(tmp_path))


def test_ctrl_c_while_eval_generates_is_one_line_and_writes_no_report(tmp_path, tokenizer_path):
    from babyllama.checkpoint import save_checkpoint
    from chatglm_tokenizer import tokenizer_sha256

    model = tiny_model(max_seq_len=512, vocab_size=64793)
    save_checkpoint(tiny_ckpt(model, sha=tokenizer_sha256(tokenizer_path)), str(tmp_path / "best.pt"))
    rows = [{"question": f"头疼{i}天了怎么办？", "answer": "注意休息。"} for i in range(64)]
    data = write_jsonl(tmp_path / "qa.jsonl", rows)
    p = subprocess.Popen([sys.executable, "eval.py", f"--ckpt={tmp_path}", f"--data={data}", "--device=cpu",
                          "--val_bin=none", f"--tokenizer={tokenizer_path}", "--max_new_tokens=400"],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = ""
    while "generating" not in seen and p.poll() is None:  # the progress bar's first line: generation has begun
        seen += p.stderr.read(1)
    time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and err.strip().splitlines()[-1] == "interrupted (Ctrl-C)", err[-2000:]
    assert "Traceback" not in err and sorted(os.listdir(tmp_path)) == ["best.pt", "qa.jsonl"]


# ---------------------------------------------------------------- data_process.py: workers, a full disk


def children_of(pid: int) -> list:
    kids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = open(f"/proc/{d}/stat").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(d))
    return kids


def alive(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


LINE = "中文语料的一个句子，用来测试分词进程在主进程被杀死之后是否随之结束。" * 20


def test_ctrl_c_while_the_pool_starts_its_manager_thread_still_stops_the_pool(monkeypatch):
    """The Ctrl-C test below once caught SIGINT inside the first submit(), as the pool started its manager thread:
    shutdown() raised "cannot join thread before it is started" and the run ended in a traceback, not in one line.
    Here the thread's start finishes 50 ms after the interrupt, deterministically."""
    import multiprocessing as mp
    import threading
    import concurrent.futures.process as cfp
    import data_process

    real_start = cfp._ExecutorManagerThread.start

    def start_then_interrupt(thread):
        threading.Timer(0.05, real_start, args=(thread,)).start()
        raise KeyboardInterrupt

    monkeypatch.setattr(cfp._ExecutorManagerThread, "start", start_then_interrupt)
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    pool = cfp.ProcessPoolExecutor(1, mp_context=ctx)
    with pytest.raises(KeyboardInterrupt):
        pool.submit(abs, -1)
    t0 = time.time()
    data_process._stop_pool(pool, ctx.Event())  # no RuntimeError, and the worker is gone
    assert time.time() - t0 < 10 and not mp.active_children()


def tokenizing(tmp_path, chunk_chars: int = 20000, settle: float = 0.3, session: bool = False,
               lines: int = 20000) -> tuple:
    """data_process.py pretrain on `lines` lines of 700 characters with 2 workers, started -> (process, worker pids)
    `settle` seconds after both workers are up (tokenizing). `session`: in a process group of its own, as a terminal's
    job is."""
    corpus = tmp_path / "big.jsonl"
    if not corpus.exists():
        corpus.write_text("".join(json.dumps({"text": f"{i} {LINE}"}, ensure_ascii=False) + "\n" for i in range(lines)),
                          encoding="utf-8")
    args = [sys.executable, "data_process.py", "pretrain", f"--inputs={corpus}", f"--out_dir={tmp_path / 'pre'}",
            "--num_workers=2", f"--chunk_chars={chunk_chars}", "--progress=false"]
    p = subprocess.Popen(args, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, start_new_session=session)
    deadline = time.time() + 60
    while len(children_of(p.pid)) < 2 and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    time.sleep(settle)
    return p, children_of(p.pid)


def end(p, workers) -> None:
    """The test's own processes never outlive it, even when an assertion failed."""
    for w in workers + children_of(p.pid):
        if alive(w):
            os.kill(w, signal.SIGKILL)
    if p.poll() is None:
        p.kill()
    p.communicate()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ctrl_c_while_tokenizing_is_one_line_and_leaves_nothing(tmp_path, tokenizer_path):
    p, workers = tokenizing(tmp_path)
    try:
        assert len(workers) >= 2 and p.poll() is None, "the run ended before its workers could be seen"
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
        assert p.returncode == 130 and err.strip() == "interrupted (Ctrl-C)", err[-2000:]
    finally:
        end(p, workers)
    assert not any(alive(w) for w in workers) and sorted(os.listdir(tmp_path)) == ["big.jsonl"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ctrl_c_at_any_moment_of_tokenizing_ends_soon_in_one_line(tmp_path, tokenizer_path):
    """Tasks of a million characters (the default), Ctrl-C at six moments, to the main process alone or to the whole
    process group as a terminal sends it: each run ends within seconds, in one line, leaving nothing (stopping a
    worker while it sent a result used to leave the pool's shutdown waiting forever)."""
    for i, settle in enumerate((0.0, 0.1, 0.2, 0.3, 0.4, 0.5)):  # a run takes about 2 s on 2 cores
        p, workers = tokenizing(tmp_path, chunk_chars=1 << 20, settle=settle, session=i % 2 == 1, lines=60000)
        try:
            assert p.poll() is None, "the run ended before it could be interrupted"
            t0 = time.time()
            os.killpg(p.pid, signal.SIGINT) if i % 2 else p.send_signal(signal.SIGINT)
            _, err = p.communicate(timeout=60)
            assert p.returncode == 130 and err.strip() == "interrupted (Ctrl-C)", (settle, err[-2000:])
            assert time.time() - t0 < 10, f"Ctrl-C {settle} s in took {time.time() - t0:.1f} s"
        finally:
            end(p, workers)
        assert not any(alive(w) for w in workers) and sorted(os.listdir(tmp_path)) == ["big.jsonl"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_end_with_a_sigkilled_main_process_and_the_next_run_starts(tmp_path, tokenizer_path):
    out = tmp_path / "pre"
    p, workers = tokenizing(tmp_path)
    try:
        assert len(workers) >= 2 and p.poll() is None, "the run ended before its workers could be seen"
        p.send_signal(signal.SIGKILL)  # what the OOM killer does: no cleanup of the main process runs
        p.wait()
        deadline = time.time() + 10
        while any(alive(w) for w in workers) and time.time() < deadline:
            time.sleep(0.1)
        assert not any(alive(w) for w in workers), "orphaned tokenizer workers outlived their main process"
    finally:
        end(p, workers)
    assert os.path.isdir(tmp_path / ".pre.new")  # the unfinished folder, never the output
    small = tmp_path / "small.jsonl"  # the lock is free and the next run cleans up (a small input: quick)
    small.write_text(json.dumps({"text": LINE}, ensure_ascii=False) + "\n", encoding="utf-8")
    r = run_script("data_process.py", ["pretrain", f"--inputs={small}", f"--out_dir={out}", "--num_workers=1",
                                       "--progress=false", "--val_fraction=0"])
    assert r.returncode == 0 and sorted(n for n in os.listdir(tmp_path) if n.startswith(".")) == []


def test_a_full_disk_while_tokenizing_sft_leaves_the_old_output_and_no_lock(tmp_path):
    sample = os.path.join(ROOT, "data", "sample", "sft")
    inputs = ",".join(os.path.join(sample, n) for n in sorted(os.listdir(sample)))
    out = tmp_path / "sft"
    argv = ["sft", f"--inputs={inputs}", f"--out_dir={out}", "--progress=false"]
    run_script("data_process.py", argv)
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}

    def small_disk():  # writes past 8 KB fail (EFBIG), as writes on a full disk fail (ENOSPC)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))

    r = subprocess.run([sys.executable, "data_process.py", *argv, "--val_fraction=0.5"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, preexec_fn=small_disk)
    err = one_line_error(r)
    assert "File too large" in err and "nothing was written to" in err and str(out) in err
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith(".")) == []  # no .sft.new, no .sft.lock


# ---------------------------------------------------------------- train_tokenizer.py owns its folder


def train_tok(out, *extra):
    return run_script("train_tokenizer.py", ["--vocab_size=4096", f"--out_dir={out}",
                                             "--progress=false", "--num_threads=1", *extra], check=False)


def test_train_tokenizer_never_replaces_a_tokenizer_unasked_nor_writes_through_links(tmp_path):
    out = tmp_path / "tok"
    assert train_tok(out).returncode == 0
    first = {n: (out / n).read_bytes() for n in os.listdir(out)}
    assert sorted(first) == ["manifest.json", "tokenizer.model", "tokenizer_meta.json"]
    r = train_tok(out, "--vocab_size=3000")
    assert "holds the tokenizer train_tokenizer.py wrote earlier" in one_line_error(r) and "--overwrite" in r.stderr
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == first
    # links at every name it writes, in the folder and beside it: replaced, what they point to untouched
    victims = tmp_path / "victims"
    victims.mkdir()
    for n in ("tokenizer.model", "tokenizer_meta.json"):
        (victims / n).write_text(f"precious {n}")
        (out / n).unlink()
        os.symlink(victims / n, out / n)
    (victims / "dir").mkdir()
    os.symlink(victims / "dir", tmp_path / ".tok.new")
    (victims / "lock").write_text("precious lock")
    os.symlink(victims / "lock", tmp_path / ".tok.lock")
    assert train_tok(out, "--vocab_size=3000", "--overwrite").returncode == 0
    assert json.load(open(out / "tokenizer_meta.json"))["vocab_size"] == 3000
    assert not any(os.path.islink(out / n) for n in os.listdir(out))
    assert {n: (victims / n).read_bytes() for n in os.listdir(victims) if n != "dir"} == {
        "tokenizer.model": b"precious tokenizer.model", "tokenizer_meta.json": b"precious tokenizer_meta.json",
        "lock": b"precious lock"} and os.listdir(victims / "dir") == []
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith(".")) == []
    # a folder of other files: refused, even to a first tokenizer
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert "train_tokenizer.py did not write" in one_line_error(train_tok(other))
    assert os.listdir(other) == ["notes.txt"]


def test_train_tokenizer_refuses_a_folder_in_use(tmp_path):
    from babyllama.folder_lock import lock_file, unlock
    lock = str(tmp_path / ".tok.lock")
    fd = lock_file(lock, "held by the test")
    try:
        r = train_tok(tmp_path / "tok")
        assert f"another train_tokenizer.py (pid {os.getpid()}) is writing it" in one_line_error(r)
    finally:
        unlock(fd, lock, remove=True)
    assert not (tmp_path / "tok").exists() and os.listdir(tmp_path) == []


def test_data_process_never_writes_through_links_at_its_output_names(tmp_path, tokenizer_path):
    """Links at every name data_process.py writes (shards, sidecars, SFT files in the folder; the new, old and lock
    names beside it): the run replaces them; what they point to is untouched."""
    sample = os.path.join(ROOT, "data", "sample")
    victims = tmp_path / "victims"
    victims.mkdir()
    (victims / "dir").mkdir()
    for mode in ("pretrain", "sft"):
        inputs = ",".join(os.path.join(sample, mode, n) for n in sorted(os.listdir(os.path.join(sample, mode))))
        out = tmp_path / mode
        argv = [mode, f"--inputs={inputs}", f"--out_dir={out}", "--progress=false", "--num_workers=1"]
        run_script("data_process.py", argv)
        names = sorted(set(os.listdir(out)) - {"manifest.json"})
        for n in names:  # still this script's folder (its manifest lists the names), each file now a link
            (victims / f"{mode}-{n}").write_text("precious")
            (out / n).unlink()
            os.symlink(victims / f"{mode}-{n}", out / n)
        for side in (".new", ".old"):
            os.symlink(victims / "dir", tmp_path / f".{mode}{side}")
        (victims / f"{mode}.lock").write_text("precious")
        os.symlink(victims / f"{mode}.lock", tmp_path / f".{mode}.lock")
        run_script("data_process.py", argv)
        assert sorted(os.listdir(out)) == sorted(names + ["manifest.json"])
        assert not any(os.path.islink(out / n) for n in os.listdir(out))
    assert all((victims / n).read_text() == "precious" for n in os.listdir(victims) if n != "dir")
    assert os.listdir(victims / "dir") == [] and sorted(n for n in os.listdir(tmp_path) if n.startswith(".")) == []


def test_eval_prints_its_scores_when_perplexity_then_fails(tmp_path, tokenizer_path):
    """The answers are generated and scored first; perplexity over shards it cannot use (an id past the model's
    vocabulary) is one line after the scores, not a loss of them."""
    import dataclasses
    from babyllama.checkpoint import save_checkpoint
    from chatglm_tokenizer import ChatGLMTokenizer
    torch.manual_seed(0)
    args = ModelArgs(dim=32, n_layers=1, n_heads=4, max_seq_len=64)
    save_checkpoint({"model": Transformer(args).state_dict(), "model_args": dataclasses.asdict(args), "kind": "sft",
                     "step": 1, "val_loss": 9.0, "best_val_loss": 9.0, "config": {},
                     "tokenizer_sha256": ChatGLMTokenizer(tokenizer_path).sha256}, str(tmp_path / "best.pt"))
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"question": q, "answer": "多休息"}, ensure_ascii=False) + "\n"
                          for q in ("头疼怎么办？", "感冒了怎么办？")), encoding="utf-8")
    val = tmp_path / "val"
    val.mkdir()
    ids = np.full(300, 5)
    ids[100] = 65000
    write_shard(str(val / "val_00000.bin"), ids, "val", 64793)
    r = run_script("eval.py", [f"--ckpt={tmp_path}", f"--data={qa}", f"--val_bin={val}", "--max_new_tokens=4",
                               "--device=cpu", "--beams=1"], check=False)
    assert "BLEU-4 (nltk, jieba, method1):" in r.stdout and "ppl: n/a" in r.stdout
    errors = [ln for ln in r.stderr.splitlines() if ln.strip() and "generating" not in ln]  # the rest: progress
    assert r.returncode == 2 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    assert errors[0].startswith("error: perplexity: ") and "token 100 is id 65000" in errors[0]
    assert "scores above" in errors[0]
    assert not (tmp_path / "eval_report.json").exists()


def test_val_shards_of_another_tokenizer_are_caught_before_generating(tmp_path, tokenizer_path, monkeypatch, capsys):
    """A model of its own tokenizer beside data/pretrain of ChatGLM2's (eval.py's default --val_bin): perplexity is
    skipped with a note and the report written; it used to generate every answer, then fail with no report. A folder
    the user named fails at once, before any answer."""
    import dataclasses
    import eval as ev
    from babyllama.checkpoint import save_checkpoint
    from chatglm_tokenizer import ChatGLMTokenizer
    from conftest import main_error, run_main
    torch.manual_seed(0)
    args = ModelArgs(dim=32, n_layers=1, n_heads=4, max_seq_len=64)
    (tmp_path / "run").mkdir()
    save_checkpoint({"model": Transformer(args).state_dict(), "model_args": dataclasses.asdict(args), "kind": "sft",
                     "step": 1, "val_loss": 9.0, "best_val_loss": 9.0, "config": {},
                     "tokenizer_sha256": ChatGLMTokenizer(tokenizer_path).sha256}, str(tmp_path / "run" / "best.pt"))
    write_jsonl(tmp_path / "qa.jsonl", [{"question": "头疼怎么办？", "answer": "多休息"}])
    (tmp_path / "data" / "pretrain").mkdir(parents=True)
    write_shard(str(tmp_path / "data" / "pretrain" / "val_00000.bin"), np.full(300, 5), "val", 64793,
                tokenizer_sha256="e" * 64)
    monkeypatch.chdir(tmp_path)
    argv = [f"--ckpt={tmp_path / 'run'}", f"--data={tmp_path / 'qa.jsonl'}", "--max_new_tokens=4", "--device=cpu",
            "--beams=1", f"--tokenizer={tokenizer_path}", "--reference_bpb=false"]
    run_main(ev, argv, monkeypatch)
    out = capsys.readouterr().out
    assert "perplexity skipped: data/pretrain/val_00000.bin: made with a tokenizer of sha256 eeeeeeeeeeee" in out, out
    assert json.load(open(tmp_path / "run" / "eval_report.json"))["scores"]["ppl"] is None
    err = main_error(ev, argv + [f"--val_bin={tmp_path / 'data' / 'pretrain'}"], monkeypatch, capsys)
    assert err.startswith(f"error: --val_bin: {tmp_path}/data/pretrain/val_00000.bin: made with a tokenizer") and \
        "[question 1/1]" not in capsys.readouterr().out


def test_an_input_inside_the_folder_that_is_replaced_is_refused(tmp_path):
    """--overwrite replaces the output folder whole: an input read from inside it would be deleted with it."""
    out = tmp_path / "sft"
    out.mkdir()
    corpus = out / "mine.jsonl"
    corpus.write_text(json.dumps({"instruction": "头疼怎么办？", "output": "多休息。"}, ensure_ascii=False) + "\n",
                      encoding="utf-8")
    r = run_script("data_process.py", ["sft", f"--inputs={corpus}", f"--out_dir={out}", "--overwrite"], check=False)
    assert f"{corpus}: an input inside --out_dir {out}" in one_line_error(r) and os.listdir(out) == ["mine.jsonl"]
    r = run_script("train_tokenizer.py", [f"--inputs={corpus}", f"--out_dir={out}", "--overwrite"], check=False)
    assert "an input inside --out_dir" in one_line_error(r) and os.listdir(out) == ["mine.jsonl"]


def test_a_link_at_the_run_lock_is_not_followed(tmp_path):
    from babyllama.run_dir import claim_run_dir
    run = tmp_path / "run"
    run.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    os.symlink(victim, run / "run.lock")
    fd = claim_run_dir(str(run), fresh=True, overwrite=False)
    os.close(fd)
    assert victim.read_text() == "precious" and not os.path.islink(run / "run.lock")
