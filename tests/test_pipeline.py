"""End to end on real Chinese text: data_process -> pretrain (tiny, CPU) -> eval perplexity.

Uses two of the shared corpus files (real text, ChatGLM2 tokenizer); skipped where they are absent.
"""
import json
import math
import os
import re

import pytest
import torch

from conftest import SESSION_TOKENIZER, SHARED_DATA, SKIP_NO_SHARED_DATA, SKIP_NO_TOKENIZER, background_fixture, run_script
from babyllama.train_log import read_metrics

SHARED_FILES = [os.path.join(SHARED_DATA, "pretrain", f) for f in
                ("c4-style-csl-abstracts.jsonl", "medical-encyclopedia-style.jsonl")]


def run(args):
    return run_script(args[0], args[1:], timeout=400, threads=2).stdout


def shared_corpus_run(tmp_path_factory) -> tuple:
    """data_process.py on two shared corpora, a tiny pretrain.py run on them, eval.py's perplexity of its checkpoint
    -> (data folder, run folder, eval.py's stdout)."""
    if not all(os.path.isfile(f) for f in SHARED_FILES):
        pytest.skip(SKIP_NO_SHARED_DATA)
    if SESSION_TOKENIZER is None:
        pytest.skip(SKIP_NO_TOKENIZER)
    base = tmp_path_factory.mktemp("pipeline")
    data, out = base / "tokens", base / "run"
    run(["data_process.py", "pretrain", f"--inputs={','.join(SHARED_FILES)}", f"--out_dir={data}", "--progress=false"])
    # short windows and a small batch: the 64,793-way output layer is nearly all of a step's cost on a CPU
    run(["pretrain.py", f"--data_dir={data}", f"--out_dir={out}", "--dim=32", "--n_layers=2", "--n_heads=4",
         "--max_seq_len=32", "--batch_size=8", "--max_steps=60", "--warmup_steps=5", "--learning_rate=1e-2",
         "--min_lr=1e-3", "--eval_interval=30", "--eval_windows=16", "--device=cpu"])
    stdout = run(["eval.py", f"--ckpt={out}/last.pt", "--data=none", "--max_new_tokens=4", f"--val_bin={data}",
                  "--ppl_windows=16", "--device=cpu"])
    return data, out, stdout


BACKGROUND_JOBS = {"pipeline": shared_corpus_run}  # started with the session (conftest.background_jobs)


pipeline = background_fixture("pipeline", shared_corpus_run)


@pytest.mark.slow
@pytest.mark.skipif(not all(os.path.isfile(f) for f in SHARED_FILES), reason=SKIP_NO_SHARED_DATA)
def test_tiny_cpu_run_on_the_shared_corpus_lowers_val_loss_and_eval_agrees(tokenizer_path, pipeline):
    data, out, stdout = pipeline
    meta = json.load(open(data / "train_00000.json"))
    assert meta["vocab_size"] == 64793 and meta["tokens"] > 400_000
    _, val = read_metrics(out)
    assert abs(val[0] - math.log(64793)) < 0.1, val[0]
    assert val[60] < val[0] - 2.0, val
    # eval.py's perplexity of the same checkpoint on the same 16 validation windows is exp(val loss)
    ckpt = torch.load(out / "last.pt", weights_only=False)
    ppl = float(re.search(r"ppl: ([0-9.]+)", stdout).group(1))
    assert ppl == pytest.approx(math.exp(ckpt["val_loss"]), rel=2e-3), (ppl, ckpt["val_loss"])
