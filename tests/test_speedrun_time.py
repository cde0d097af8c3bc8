"""The tiny speedrun with its defaults (no --eval_original): the card's time table adds up to each stage's wall time,
the weights-only best.pt of each stage is what the next stage and chat.py load, and the compile caches are set."""
import json
import os
import re
import subprocess
import sys

import pytest

from babyllama.checkpoint import load_checkpoint
from chatglm_tokenizer import find_tokenizer
from conftest import ROOT
from report import TIME_PARTS as PARTS


@pytest.fixture(scope="module")
def speedrun(tmp_path_factory):
    try:
        tokenizer_path = find_tokenizer(download=False)
    except FileNotFoundError as e:
        pytest.skip(f"needs the ChatGLM2 tokenizer.model: {e}")
    base = tmp_path_factory.mktemp("speedrun_time")
    out, data = str(base / "out"), str(base / "data")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0", BABYLLAMA_TOKENIZER=tokenizer_path,
               XDG_CACHE_HOME=str(base / "cache"))
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    r = subprocess.run(["bash", "speedrun.sh", "--tiny", "--skip_setup", f"--out={out}", f"--data={data}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    return base, out, r.stdout, env


def jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_the_original_protocol_is_left_out_unless_asked(speedrun):
    _, out, stdout, _ = speedrun
    stages = [st["stage"] for st in jsonl(os.path.join(out, "speedrun.jsonl"))]
    assert stages == ["tokenize-pretrain", "tokenize-sft", "pretrain", "sft", "eval", "report"]
    r = json.load(open(os.path.join(out, "report.json"), encoding="utf-8"))
    assert r["eval_original"] is None and not os.path.exists(os.path.join(out, "eval_original", "eval_report.json"))
    assert "--eval_original" in subprocess.run(["bash", "speedrun.sh", "--help"], cwd=ROOT, capture_output=True,
                                               text=True).stdout


def test_the_time_table_splits_each_stage_and_adds_up_to_its_wall_time(speedrun):
    _, out, _, _ = speedrun
    walls = {st["stage"]: st["seconds"] for st in jsonl(os.path.join(out, "speedrun.jsonl"))}
    r = json.load(open(os.path.join(out, "report.json"), encoding="utf-8"))
    rows = {t["stage"]: t for t in r["time"]}
    assert list(rows) == list(walls)[:-1]  # the report's own stage is still running when it writes the card
    for name, t in rows.items():
        assert t["wall_s"] == walls[name]
        known = sum(t[k] or 0 for k in PARTS)
        assert known <= t["wall_s"] + 0.5, t  # the parts are measured inside the stage
        assert t["other_s"] == pytest.approx(max(0.0, t["wall_s"] - known), abs=0.06)
    for name in ("tokenize-pretrain", "tokenize-sft"):
        assert rows[name]["data_s"] == walls[name] and rows[name]["steps_s"] is None
    for name in ("pretrain", "sft"):
        summary = json.load(open(os.path.join(out, name, "summary.json"), encoding="utf-8"))
        assert all(rows[name][k] == summary.get(k) for k in PARTS if k not in ("generation_s", "scoring_s"))
        # start-up: the stages share one process (chain.py), which imports torch and starts while the data stages
        # run, so each stage's start-up is its own from its turn (the data read, the model built)
        assert 0 < summary["startup_s"] < rows[name]["wall_s"] and rows[name]["scoring_s"] is None
        assert summary["compile_s"] == 0 and summary["steps_s"] > 0 and summary["validation_s"] > 0  # CPU: eager
        assert summary["checkpoint_wait_s"] >= 0 and summary["data_s"] >= 0 and rows[name]["generation_s"] is None
    ev = json.load(open(os.path.join(out, "sft", "eval_report.json"), encoding="utf-8"))
    assert rows["eval"]["generation_s"] == ev["timing"]["generation_s"] > 0
    assert rows["eval"]["validation_s"] == ev["timing"]["ppl_s"] > 0  # perplexity, the eval's validation
    assert 0 < rows["eval"]["startup_s"] == ev["timing"]["startup_s"] < rows["eval"]["wall_s"]
    assert rows["eval"]["scoring_s"] == pytest.approx(sum(ev["timing"][k] for k in
                                                          ("scoring_s", "baselines_s", "reference_bpb_s")))
    assert ev["timing"]["baselines_s"] > 0 and ev["timing"]["scoring_s"] > 0
    assert "batch 32," in ev["protocol"]["decoding"]  # --batch_size=0 on a CPU
    # the card shows the same numbers, and a total row
    md = open(os.path.join(out, "report.md"), encoding="utf-8").read()
    assert "\n## Time\n" in md
    cell = lambda v: "" if v is None else f"{v:,.1f} s"
    for name, t in rows.items():
        cols = ["wall_s", *PARTS, "other_s"]
        assert f"| {name} | " + " | ".join(cell(t[c]) for c in cols) + " |" in md, name
    total = re.search(r"^\| \*\*total\*\* \| ([\d.,]+) s \|", md, flags=re.M)
    assert total and float(total[1].replace(",", "")) == pytest.approx(sum(t["wall_s"] for t in rows.values()), abs=0.06)


def test_each_stage_loads_the_weights_only_best_pt_of_the_one_before(speedrun):
    _, out, stdout, env = speedrun
    for name in ("pretrain", "sft"):
        best = load_checkpoint(os.path.join(out, name, "best.pt"))
        assert "optimizer" not in best and "rng" not in best and best["kind"] == name
        assert "optimizer" in load_checkpoint(os.path.join(out, name, "last.pt"))
    assert f"sft: starting from {out}/pretrain/best.pt (pretrain step" in stdout  # sft.py --init_from
    ev = json.load(open(os.path.join(out, "sft", "eval_report.json"), encoding="utf-8"))
    assert ev["checkpoint"] == os.path.join(out, "sft", "best.pt")  # eval.py
    r = subprocess.run([sys.executable, "chat.py", f"--ckpt={out}/sft/best.pt", "--device=cpu", "--max_new_tokens=8"],
                       input="感冒了怎么办？\n", cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and f"{out}/sft/best.pt: sft model" in r.stdout, (r.stdout, r.stderr[-2000:])


def test_the_compile_caches_live_under_the_users_cache_folder_or_where_told(speedrun):
    base, out, stdout, env = speedrun
    assert f"compile cache: {base}/cache/babyllama/torch_compile\n" in stdout  # $XDG_CACHE_HOME
    # TORCHINDUCTOR_CACHE_DIR wins; a second speedrun into the same folders stops at once (no --overwrite)
    custom = dict(env, TORCHINDUCTOR_CACHE_DIR=str(base / "mine"))
    r = subprocess.run(["bash", "speedrun.sh", "--tiny", "--skip_setup", f"--out={out}", f"--data={base}/data"],
                       cwd=ROOT, env=custom, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and f"compile cache: {base}/mine\n" in r.stdout
