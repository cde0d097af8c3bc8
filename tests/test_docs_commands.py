"""Every command in the scripts' docstrings and in README.md runs as written.

Each command's flags are parsed and validated by its script's config (an unknown or renamed flag, a bad value, a
--warmup_steps longer than --max_steps fail here). The tiny CPU commands really run, in order (those that need only
earlier outputs side by side), in a scratch copy of the repository: data_process.py on the embedded sample, the tiny
pretrain and SFT runs, eval, chat, export; they start with the session, in the background (conftest.background).
"""
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile

import pytest

from conftest import SKIP_NO_TOKENIZER, ROOT, SESSION_TOKENIZER, background_fixture, base_env
from babyllama.config import parse_config

SCRIPTS = {"data_process.py": "Config", "pretrain.py": "PretrainConfig", "sft.py": "SFTConfig",
           "eval.py": "EvalConfig", "chat.py": "ChatConfig", "export.py": "ExportConfig"}
COMMAND = re.compile(r"^(?:printf .*\| )?(?:python|torchrun .*?) (" + "|".join(map(re.escape, SCRIPTS)) + r")\b")


def commands_in(text: str) -> list:
    """Commands of SCRIPTS in `text`: whole lines (continued with a backslash) or `backticked` spans."""
    text = text.replace("\\\n", " ")
    found = [m for m in re.findall(r"`([^`\n]+)`", text) if COMMAND.match(m)]
    for line in text.splitlines():
        line = re.sub(r"\s{2,}\(.*\)\s*$", "", line.strip())  # a trailing "(note)" after the command
        if COMMAND.match(line):
            found.append(line)
    return found


def docstring_commands() -> list:
    out = []
    for script in SCRIPTS:
        with open(os.path.join(ROOT, script), encoding="utf-8") as f:
            docstring = f.read().split('"""')[1]  # as written in the file: printf's \n stays two characters
        out += [(script, c) for c in commands_in(docstring)]
    return out


def readme_commands() -> list:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", f.read(), flags=re.S)
    return [("README.md", c) for block in blocks for c in commands_in(block)]


def script_argv(command: str) -> tuple:
    """'printf .. | python x.py --a=1  # note' -> ('x.py', ['--a=1'])."""
    words = shlex.split(command.split("| ", 1)[-1] if command.startswith("printf") else command, comments=True)
    i = next(i for i, w in enumerate(words) if w in SCRIPTS)
    argv = words[i + 1:]
    if words[i] == "data_process.py" and argv and not argv[0].startswith("-"):
        argv = ["--mode", argv[0], *argv[1:]]  # the mode word, as data_process.main takes it
    return words[i], argv


def test_every_script_has_commands_and_they_are_found():
    found = {s for s, _ in docstring_commands()}
    assert found == set(SCRIPTS), set(SCRIPTS) - found
    assert len(readme_commands()) >= 10


@pytest.mark.parametrize("where,command", docstring_commands() + readme_commands())
def test_command_flags_parse_and_validate(where, command):
    script, argv = script_argv(command)
    module = importlib.import_module(script[:-3])
    parse_config(getattr(module, SCRIPTS[script]), argv)  # raises ConfigError on an unknown flag or a bad value


def find(commands, script: str, *parts: str) -> str:
    hits = [c for s, c in commands if s == script and all(p in c for p in parts)]
    assert hits, f"{script}: no docstring command with {parts}"
    return hits[0]


def make_sandbox(tmp_path_factory):
    """The repository's files in a scratch folder (symlinks), with empty data/ (but the sample) and out/."""
    box = tmp_path_factory.mktemp("repo")
    for name in os.listdir(ROOT):
        if name not in ("data", "out") and not name.startswith("."):
            os.symlink(os.path.join(ROOT, name), box / name)
    (box / "data").mkdir()
    os.symlink(os.path.join(ROOT, "data", "sample"), box / "data" / "sample")
    (box / "out").mkdir()
    return box


def command_env(threads: int) -> dict:
    env = base_env()
    return dict(env, PATH=os.path.dirname(sys.executable) + os.pathsep + env["PATH"], OMP_NUM_THREADS=str(threads))


def run(box, command: str, timeout: int = 600) -> str:
    r = subprocess.run(["bash", "-c", command], cwd=box, env=command_env(2), capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, f"{command}\n--- stdout\n{r.stdout[-2000:]}\n--- stderr\n{r.stderr[-3000:]}"
    return r.stdout


def run_together(box, *commands: str, timeout: int = 600) -> list:
    """Commands that do not depend on one another, started at once (one thread each) -> their stdouts, in order."""
    started = []  # (command, process, its stdout file, its stderr file)
    try:
        for c in commands:
            out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
            started.append((c, subprocess.Popen(["bash", "-c", c], cwd=box, env=command_env(1), stdout=out, stderr=err,
                                                text=True), out, err))
        outs = []
        for c, p, out, err in started:
            p.wait(timeout=timeout)
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read(), err.read()
            assert p.returncode == 0, f"{c}\n--- stdout\n{stdout[-2000:]}\n--- stderr\n{stderr[-3000:]}"
            outs.append(stdout)
        return outs
    finally:
        for _, p, out, err in started:
            if p.poll() is None:
                p.kill()
                p.wait()
            out.close()
            err.close()


def run_tiny_commands(tmp_path_factory) -> tuple:
    """The tiny CPU commands of the docstrings, as written, in a sandbox, in the order a reader follows them (those
    that need only what came before them side by side) -> (sandbox, {script: stdout}, whether export.py ran)."""
    if SESSION_TOKENIZER is None:
        pytest.skip(SKIP_NO_TOKENIZER)
    box, cmds, out = make_sandbox(tmp_path_factory), docstring_commands(), {}
    sample = find(cmds, "data_process.py", "python data_process.py  ")  # the bare command: the embedded sample
    _, out["data_process.py"] = run_together(box, sample, find(cmds, "data_process.py", "tests/fixtures_data"))
    out["pretrain.py"] = run(box, find(cmds, "pretrain.py", "--out_dir=out/tiny"))
    out["sft.py"], out["eval.py"] = run_together(box, find(cmds, "sft.py", "--init_from=out/tiny "),
                                                 find(cmds, "eval.py", "--ckpt=out/tiny "))  # both from out/tiny
    shutil.copytree(box / "out" / "tiny_sft", box / "out" / "sft")  # chat.py and export.py read out/sft
    exporting = importlib.util.find_spec("transformers") is not None
    out["chat.py"], *_ = run_together(box, find(cmds, "chat.py", "printf"),
                                      *([find(cmds, "export.py", "--out_dir=out/hf ")] if exporting else []))
    return box, out, exporting


BACKGROUND_JOBS = {"tiny_commands": run_tiny_commands}  # started with the session (conftest.background_jobs)


tiny_commands = background_fixture("tiny_commands", run_tiny_commands)


@pytest.mark.slow
def test_tiny_docstring_commands_run_as_written(tiny_commands):
    box, out, exporting = tiny_commands
    assert os.path.isfile(box / "data" / "pretrain" / "val_00000.bin")  # the bare command: the embedded sample
    assert "a JSON array of completion records" in out["data_process.py"]
    assert os.path.isfile(box / "data" / "tiny" / "train_00000.bin")
    assert "first step:" in out["pretrain.py"] and "done: best val loss" in out["pretrain.py"]
    assert os.path.isfile(box / "out" / "tiny_sft" / "last.pt") and "done: best val loss" in out["sft.py"]
    lines = out["eval.py"].splitlines()  # the scores come first, then where the report went
    assert any(ln.startswith("BLEU-4 (nltk") for ln in lines) and "ppl:" in out["eval.py"]
    assert lines[-1].startswith("wrote ")
    assert "\ufffd" not in out["chat.py"] and "sft model" in out["chat.py"]
    if not exporting:
        pytest.skip("export.py's command needs transformers")
    assert os.path.isfile(box / "out" / "hf" / "config.json")


@pytest.mark.slow
def test_a_background_job_works_in_the_sessions_temporary_folder(tiny_commands, tmp_path_factory):
    """The job's folder lies in the one session folder the tests use: the worker thread never makes a second one."""
    box = tiny_commands[0]
    assert box.parent == tmp_path_factory.getbasetemp()
