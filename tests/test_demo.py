"""`bash demo.sh`, the README's first command, run as written on a copy of the repository: the whole pipeline on the
embedded sample with a tokenizer of its own, then the chat command it ends with.

    python -m pytest tests/test_demo.py -q

It runs in this test environment (the active virtual environment, as setup.sh takes it) and skips where demo.sh
would install into it (setup.sh's requirements stamp says what is installed). No ChatGLM2 tokenizer is needed.
"""
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, background_fixture, base_env

pytestmark = pytest.mark.slow
OUTPUTS = ("data/demo/", "out/demo/")  # all that demo.sh may write (bytecode aside)


def extra_requirements() -> str:
    """The EXTRA_REQUIREMENTS under which setup.sh finds this environment's requirements installed (the stamp it
    keeps: test.sh's with requirements-dev.txt, demo.sh's without), so the demo installs nothing; None: neither."""
    try:
        stamp = open(os.path.join(sys.prefix, ".venv-requirements.sha")).read().strip()
    except OSError:
        return None
    for extra in ("requirements-dev.txt", ""):
        names = ["requirements.txt"] + ([extra] if extra else [])
        if hashlib.sha256(b"".join(open(os.path.join(ROOT, n), "rb").read() for n in names)).hexdigest() == stamp:
            return extra
    return None


def copy_repository(dest: str) -> None:
    """The tracked files (and untracked ones git does not ignore), as a fresh clone has them."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, names):
        src = os.path.join(ROOT, name)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(dest, name)), exist_ok=True)
            shutil.copy2(src, os.path.join(dest, name))


def files_under(folder: str) -> set:
    return {os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs
            if "__pycache__" not in d}


def run_demo(tmp_path_factory) -> dict:
    if sys.prefix == sys.base_prefix:
        pytest.skip("needs a virtual environment (demo.sh would make .venv and install into it)")
    extra = extra_requirements()
    if extra is None:
        pytest.skip("this environment's requirements were not installed by setup.sh: demo.sh would install them")
    if shutil.which("git") is None or not os.path.isdir(os.path.join(ROOT, ".git")):
        pytest.skip("needs git to list the repository's files")
    repo = str(tmp_path_factory.mktemp("demo") / "repo")
    copy_repository(repo)
    before = files_under(repo)
    env = dict(base_env(), VIRTUAL_ENV=sys.prefix, EXTRA_REQUIREMENTS=extra,
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    env.pop("BABYLLAMA_TOKENIZER", None)  # the demo trains its own: nothing may fall back to ChatGLM2's
    if not extra:
        env.pop("EXTRA_REQUIREMENTS")
    r = subprocess.run(["bash", "demo.sh"], cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    chat = None
    found = re.search(r"talk to the model: (.*)$", r.stdout, flags=re.M)
    if r.returncode == 0 and found:
        words = shlex.split(found.group(1))
        chat = subprocess.run([sys.executable, *words[1:], "--max_new_tokens=8"], cwd=repo, env=env,
                              input="头疼怎么办？\n/quit\n", capture_output=True, text=True, timeout=300)
    return {"repo": repo, "run": r, "new": files_under(repo) - before, "chat": chat,
            "chat_words": shlex.split(found.group(1)) if found else None}


BACKGROUND_JOBS = {"demo": run_demo}  # started with the session (conftest.background_jobs)
demo = background_fixture("demo", run_demo)


def test_demo_runs_the_pipeline_on_the_sample_as_written(demo):
    r = demo["run"]
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    for step in ("1/5 train_tokenizer", "2/5 data_process", "3/5 pretrain", "4/5 sft", "5/5 eval"):
        assert f"== {step}" in r.stdout
    assert re.search(r"^demo done in \d+ s", r.stdout, flags=re.M)
    report = json.load(open(os.path.join(demo["repo"], "out", "demo", "sft", "eval_report.json"), encoding="utf-8"))
    assert report["scores"]["bleu4"] is not None and report["scores"]["ppl"] is not None
    assert report["model_args"]["vocab_size"] == 3000  # its own tokenizer, not ChatGLM2's
    assert demo["new"] and all(name.startswith(OUTPUTS) for name in demo["new"]), sorted(demo["new"])[:10]


def test_the_chat_command_the_demo_ends_with_works_as_printed(demo):
    """No --tokenizer in it: the checkpoint names the demo's tokenizer, and no default tokenizer is at hand."""
    assert demo["chat_words"][:2] == ["python", "chat.py"] and not any("--tokenizer" in w for w in demo["chat_words"])
    chat = demo["chat"]
    assert chat.returncode == 0 and "sft model" in chat.stdout and "模型>" in chat.stdout, (chat.stdout[-2000:],
                                                                                          chat.stderr[-2000:])
