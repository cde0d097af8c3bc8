"""README's CPU recipe (a tokenizer of your own, pretraining, the model continuing prompts) runs as written, twice in a
row, at a much smaller size: the embedded sample's medical paragraphs stand in for medical.jsonl, and flags appended
to the commands shrink the model and the run. It checks the mechanics (the tokenizer reaches every stage, the second
run replaces the first, no deprecation warning), not the prose. And every README block that trains can run twice."""
import json
import os
import re
import shutil
import subprocess
import sys

import torch

from conftest import ROOT

# appended to the README's commands (the last value of a flag wins): seconds instead of minutes
SMALLER = {"pretrain.py": ["--dim=32", "--n_layers=1", "--n_heads=2", "--max_seq_len=32", "--batch_size=4",
                           "--max_steps=6", "--warmup_steps=1", "--eval_interval=3",
                           "--eval_windows=4", "--log_interval=3"],
           "eval.py": ["--max_new_tokens=8"]}
TRAINS = re.compile(r"^(?:[A-Z_]+=\S* )*(?:python |torchrun .*?|bash )(pretrain\.py|sft\.py|speedrun\.sh)\b")


def readme_blocks() -> list:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return re.findall(r"```bash\n(.*?)```", f.read(), flags=re.S)


def recipe_commands() -> list:
    blocks = [b for b in readme_blocks() if "train_tokenizer.py" in b and "eval.py" in b]
    assert len(blocks) == 1, "README: one bash block holds the CPU recipe"
    return [ln for ln in blocks[0].replace("\\\n", " ").splitlines() if ln.strip() and not ln.startswith("#")]


def run(box, command: str) -> str:
    script = next(w for w in command.split() if w.endswith(".py"))
    strict = command.replace("python ", f"{sys.executable} -W error::DeprecationWarning ", 1)  # an env prefix stays in front
    r = subprocess.run(f"{strict} {' '.join(SMALLER.get(script, []))}", shell=True, cwd=box, capture_output=True,
                       text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, f"{command}\n--- stdout\n{r.stdout[-2000:]}\n--- stderr\n{r.stderr[-3000:]}"
    return r.stdout


def test_cpu_recipe_runs_twice_as_written_at_a_small_size(tmp_path):
    commands = recipe_commands()
    assert [next(w for w in c.split() if w.endswith(".py")) for c in commands] == \
        ["train_tokenizer.py", "data_process.py", "pretrain.py", "eval.py"]
    box = tmp_path / "repo"  # the repository's files, an empty data/ and out/ (the recipe writes there)
    box.mkdir()
    for name in set(os.listdir(ROOT)) - {"data", "out", ".git"}:
        os.symlink(os.path.join(ROOT, name), box / name)
    (box / "data").mkdir()
    shutil.copy(os.path.join(ROOT, "data", "sample", "pretrain", "medical_style.jsonl"), box / "medical.jsonl")
    for _ in range(2):  # as written, twice in a row: each step replaces what the first run wrote
        outputs = [run(box, c) for c in commands]
    tok_dir, data_dir, out_dir = (re.search(rf"--{flag}=(\S+)", commands[i]).group(1)
                                  for i, flag in ((0, "out_dir"), (1, "out_dir"), (2, "out_dir")))
    meta = json.load(open(box / tok_dir / "tokenizer_meta.json", encoding="utf-8"))
    shard = json.load(open(box / data_dir / "train_00000.json", encoding="utf-8"))
    ckpt = torch.load(box / out_dir / "best.pt", map_location="cpu", weights_only=True)
    assert shard["tokenizer_sha256"] == ckpt["tokenizer_sha256"] == meta["tokenizer_sha256"]
    assert shard["vocab_size"] == ckpt["model_args"]["vocab_size"] == meta["vocab_size"] < 10000
    assert "bits/byte" in outputs[2] and "done: best val loss" in outputs[2]
    prompts = re.search(r'--prompts="([^"]+)"', commands[3]).group(1).split(",")
    continued = re.findall(r"^\[prompt\] (.*)\n\[answer\] (.*)$", outputs[3], flags=re.M)
    assert [p for p, _ in continued] == prompts, outputs[3]  # each prompt, then what the model wrote after it


def test_every_readme_block_that_trains_can_run_twice():
    """A second run into a folder holding a checkpoint stops without --overwrite (or --resume): every training
    command of the README says which."""
    lines = [ln.strip() for b in readme_blocks() for ln in b.replace("\\\n", " ").splitlines()]
    training = [ln for ln in lines if TRAINS.match(ln)]
    assert len(training) >= 8
    for ln in training:
        assert "--overwrite" in ln or "--resume" in ln or "--help" in ln, ln
