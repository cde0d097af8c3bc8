"""speedrun.sh owns its folders: one lock over all stages (a second speedrun in the same folders refuses at once),
an earlier run's output is left alone without --overwrite, and bad arguments (a comma in the corpus paths, a line
break in a path, a malformed or unmatched SFT mix, a bad NPROC) are one line before any work; speedrun.jsonl is never
written through a link. Paths with spaces are fine: the concurrent runs here use one (tests/test_speedrun.py runs a
whole speedrun on such paths).

    python -m pytest tests/test_hardening_speedrun.py -q
Runs speedrun.sh --tiny --skip_setup on the embedded sample; no run goes past its first stages.
"""
import json
import os
import shutil
import signal
import subprocess
import time

import pytest

from chatglm_tokenizer import find_tokenizer
from conftest import ROOT

SAMPLE = os.path.join(ROOT, "data", "sample")


def speedrun(*args, env=None, timeout=120):
    return subprocess.run(["bash", "speedrun.sh", "--tiny", "--skip_setup", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def one_error(r) -> str:
    errors = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(errors) == 1 and errors[0].startswith("error: "), (r.returncode, r.stderr)
    assert "== [" not in r.stdout  # no stage started
    return errors[0]


def corpora(tmp_path, extra: dict = None) -> str:
    """A copy of the embedded sample's corpora, plus `extra` files {relative path: text}."""
    c = tmp_path / "corpora"
    shutil.copytree(SAMPLE, c, ignore=shutil.ignore_patterns("*.md"))
    for rel, text in (extra or {}).items():
        (c / rel).write_text(text, encoding="utf-8")
    return str(c)


@pytest.fixture
def env():
    try:
        tok = find_tokenizer(download=False)
    except FileNotFoundError as e:
        pytest.skip(f"needs the ChatGLM2 tokenizer.model: {e}")
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0", BABYLLAMA_TOKENIZER=tok)


def test_a_second_speedrun_in_the_same_folders_refuses_at_once(tmp_path, env):
    out, data = str(tmp_path / "my runs" / "out"), str(tmp_path / "my runs" / "data")  # a space: paths passed whole
    first = subprocess.Popen(["bash", "speedrun.sh", "--tiny", "--skip_setup", f"--out={out}", f"--data={data}"],
                             cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                             start_new_session=True)  # its own process group: the test ends all of it
    try:
        for line in first.stdout:  # both corpora tokenized, pretraining started
            if "] pretrain: " in line:
                break
        log = os.path.join(out, "speedrun.jsonl")
        before = open(log, encoding="utf-8").read()
        shards = {n: os.path.getmtime(os.path.join(data, "pretrain", n)) for n in os.listdir(os.path.join(data, "pretrain"))}
        assert [json.loads(ln)["stage"] for ln in before.splitlines()] == ["tokenize-pretrain", "tokenize-sft"]
        for extra in ([], ["--overwrite"]):  # --overwrite does not take a folder from a running speedrun either
            t0 = time.time()
            r = speedrun(f"--out={out}", f"--data={data}", *extra, env=env)
            err = one_error(r)
            assert f"error: {data}: another speedrun.sh is using this folder" in err and time.time() - t0 < 30
        # another --data, the same --out: the run folder is locked too
        err = one_error(speedrun(f"--out={out}", f"--data={tmp_path}/data 2", env=env))
        assert f"error: {out}: another speedrun.sh is using this folder" in err and os.listdir(tmp_path / "data 2") == []
        assert open(log, encoding="utf-8").read() == before  # not truncated, nothing tokenized again
        assert {n: os.path.getmtime(os.path.join(data, "pretrain", n)) for n in os.listdir(os.path.join(data, "pretrain"))} == shards
        assert first.poll() is None  # the first one runs on
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    gone_by = time.time() + 30  # bash is reaped; its children (the chain's Python among them) may still be exiting
    while time.time() < gone_by:
        try:
            os.killpg(first.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    # the lock ended with the first run's processes: a new speedrun gets past it (to the earlier-output rule)
    assert "output of an earlier run" in one_error(speedrun(f"--out={out}", f"--data={data}", env=env))


def test_an_earlier_runs_output_is_refused_at_once_without_overwrite(tmp_path):
    out, data = tmp_path / "out", tmp_path / "data"
    out.mkdir()
    (out / "speedrun.jsonl").write_text('{"stage": "report"}\n')
    (out / "pretrain").mkdir()
    err = one_error(speedrun(f"--out={out}", f"--data={data}"))
    assert f"{out}/speedrun.jsonl {out}/pretrain: output of an earlier run" in err and "--overwrite" in err
    assert (out / "speedrun.jsonl").read_text() == '{"stage": "report"}\n' and os.listdir(data) == []
    # only data of an earlier run (or a run folder of pretrain.py at --out/pretrain): refused too
    shutil.rmtree(out)
    (data / "sft").mkdir()
    assert f"{data}/sft: output of an earlier run" in one_error(speedrun(f"--out={out}", f"--data={data}"))


@pytest.mark.parametrize("args,extra,env_add,message", [
    (["--corpora={tmp}/my,corpora"], None, {}, "--corpora={tmp}/my,corpora: a path with a comma or a line break"),
    (["--out={tmp}/my\nout"], None, {}, "--out: a path with a line break"),
    (["--corpora={corpora}"], {"sft/my,data.json": "[]"}, {}, "{corpora}/sft/my,data.json: a file name with a comma"),
    ([], None, {"NPROC": "0"}, "NPROC=0: expected the number of GPUs, 1 or more"),
    (["--sft_mix=medical=3,alpaca"], None, {}, "'alpaca' is not NAME=TIMES"),
    (["--sft_mix=medical=300"], None, {}, "'medical=300' is not NAME=TIMES (TIMES a whole number 0-100"),
    (["--sft_mix=surgery=2"], None, {}, "'surgery' is in no file name of data/sample/sft"),
    (["--sft_mix=medical=0, alpaca = 0"], None, {}, "leaves no conversation"),
    (["--sft_mix=medical cases=2"], None, {}, "'medical cases=2' is not NAME=TIMES"),
    (["--pretrain_args=--epochs=1 --out_dir=elsewhere"], None, {}, "--pretrain_args: --out_dir is set by the speedrun"),
    (["--eval_args=--ckpt out/x"], None, {}, "--eval_args: --ckpt is set by the speedrun"),
    (["--corpora={corpora}"], {"eval/medical_qa.jsonl": '{"question": "头疼", "answer": "休息"}\n{"question": ""}\n'},
     {}, "error: {corpora}/eval/medical_qa.jsonl:2: empty or non-string field \"question\""),
])
def test_bad_arguments_are_one_line_before_any_work(tmp_path, args, extra, env_add, message):
    c = corpora(tmp_path, extra) if extra else None
    fill = lambda s: s.format(tmp=tmp_path, corpora=c)
    argv = [f"--out={tmp_path}/out", f"--data={tmp_path}/data"] + [fill(a) for a in args]
    r = speedrun(*argv, env=dict(os.environ, **env_add))
    assert fill(message) in one_error(r)
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "data")


def test_spaces_around_mix_parts_are_dropped(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.md").write_text("an earlier card")  # stops the run right after the mix is checked
    r = speedrun(f"--out={out}", f"--data={tmp_path}/data", "--sft_mix= medical = 2 , alpaca=1 ")
    assert "SFT mix: medical=2,alpaca=1" in r.stdout and "output of an earlier run" in one_error(r)


def test_speedrun_jsonl_is_never_written_through_a_link(tmp_path, env):
    c = corpora(tmp_path, {"pretrain/notes.bin": "neither JSON nor text of a known format\n"})
    os.remove(os.path.join(c, "pretrain", "wiki_style.json"))
    os.remove(os.path.join(c, "pretrain", "medical_style.jsonl"))
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    os.symlink(victim, out / "speedrun.jsonl")
    r = speedrun(f"--corpora={c}", f"--out={out}", f"--data={tmp_path}/data", "--overwrite", env=env)
    assert r.returncode == 2 and "unknown format" in r.stderr  # the first stage refuses the corpus, then it stops
    assert victim.read_text() == "precious" and not os.path.lexists(out / "speedrun.jsonl")


@pytest.mark.parametrize("flag,says,nproc", [
    ("--eval_args=--beam=4", "error: eval: unknown flag --beam; did you mean --beams?", "1"),
    ("--sft_args=--dropout=x", "error: sft: --dropout: expected float, got 'x'", "1"),
    ("--eval_args=--beam=4", "error: eval: unknown flag --beam; did you mean --beams?", "2")])
def test_a_bad_flag_of_a_later_stage_stops_the_speedrun_before_any_training(tmp_path, env, flag, says, nproc):
    """Every stage's flags are checked as the speedrun starts (while the data stages run; with NPROC > 1, where
    torchrun runs each stage on its own, too): a typo in the eval's flags is one line within seconds, not after
    pretraining and SFT."""
    t = time.time()
    r = speedrun(flag, f"--out={tmp_path}/out", f"--data={tmp_path}/data", env=dict(env, NPROC=nproc))
    assert r.returncode == 2 and says in r.stderr.splitlines(), r.stderr[-2000:]
    assert "] pretrain:" not in r.stdout and not (tmp_path / "out" / "pretrain").exists()
    assert time.time() - t < 40  # the tiny run's training alone takes longer on a CPU


def test_a_failing_data_stage_stops_the_chain_started_beside_it(tmp_path, env):
    """On one GPU (or a CPU) the chain of training stages starts with the data stages, to import torch meanwhile; a
    data stage that fails tells it to stop: it runs no stage and does not outlive the speedrun."""
    c = corpora(tmp_path, {"pretrain/notes.bin": "neither JSON nor text of a known format\n"})
    out = tmp_path / "out"
    r = speedrun(f"--corpora={c}", f"--out={out}", f"--data={tmp_path}/data", env=env)
    assert r.returncode == 2 and "unknown format" in r.stderr
    assert "started now, its stages once the data is ready" in r.stdout and "== [+0s] pretrain" not in r.stdout
    assert (out / ".data-ready").read_text().strip() == "stop" and not (out / "pretrain").exists()
    alive = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                alive += [pid] if f"--after={out}".encode() in f.read() else []
        except OSError:
            pass
    assert not alive


def test_the_report_curves_are_never_written_through_a_link(tmp_path):
    import report
    victim = tmp_path / "victim.png"
    victim.write_text("precious")
    os.symlink(victim, tmp_path / "curves.png")
    for stage in ("pretrain", "sft"):  # two tiny curves
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "val_loss": 2.5}\n')
    report.plot({}, str(tmp_path), str(tmp_path / "curves.png"))
    assert victim.read_text() == "precious" and not os.path.islink(tmp_path / "curves.png")
    assert open(tmp_path / "curves.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
