"""`python pretrain.py`, `python sft.py` and `python chain.py` say they started before the slow part (importing torch, building the model,
reading the data): the first line comes within seconds, not after a silent minute on a busy CPU."""
import os
import subprocess
import sys
import time

import pytest

from conftest import ROOT

STARTS = {"pretrain.py": "pretrain: starting (importing torch", "sft.py": "sft: starting (importing torch"}


def fake_torch(tmp_path) -> dict:
    """An environment whose `import torch` prints a marker and exits: what comes before it is the scripts' own."""
    pkg = tmp_path / "torch"
    pkg.mkdir()
    (pkg / "__init__.py").write_text('print("torch import", flush=True)\nraise SystemExit(0)\n')
    return dict(os.environ, PYTHONPATH=str(tmp_path))


@pytest.mark.parametrize("script", sorted(STARTS))
def test_the_first_line_comes_before_torch_is_imported(script, tmp_path):
    r = subprocess.run([sys.executable, script], cwd=ROOT, env=fake_torch(tmp_path), capture_output=True, text=True,
                       timeout=60)
    lines = r.stdout.splitlines()
    assert lines[0].startswith(STARTS[script]) and "torch import" in lines[1:], r.stdout + r.stderr


def test_a_chain_names_its_first_stage_before_torch_is_imported(tmp_path):
    r = subprocess.run([sys.executable, "chain.py", "pretrain.py", "--max_steps=1"], cwd=ROOT, env=fake_torch(tmp_path),
                       capture_output=True, text=True, timeout=60)
    lines = [line for line in r.stdout.splitlines() if line]
    assert lines[0].startswith("== [+0s] pretrain: python pretrain.py") and lines[1] == "torch import", r.stdout


@pytest.mark.parametrize("script", sorted(STARTS))
def test_no_early_line_for_help_nor_other_torchrun_ranks(script, tmp_path):
    env = fake_torch(tmp_path)
    for argv, extra in ((["--help"], {}), ([], {"RANK": "1"})):
        r = subprocess.run([sys.executable, script, *argv], cwd=ROOT, env=dict(env, **extra), capture_output=True,
                           text=True, timeout=60)
        assert r.stdout.splitlines()[0] == "torch import", (argv, extra, r.stdout)


def test_real_first_line_within_5_seconds(tmp_path):
    """The real script and torch: the first line, read as it comes, arrives long before the imports end."""
    p = subprocess.Popen([sys.executable, "pretrain.py", f"--data_dir={tmp_path / 'none'}", f"--out_dir={tmp_path}"],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t0 = time.time()
    try:
        first = p.stdout.readline()
        seconds = time.time() - t0
    finally:
        p.kill()
        p.wait()
    assert first.startswith(STARTS["pretrain.py"]) and seconds < 5, (first, seconds)
