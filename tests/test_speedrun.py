"""speedrun.sh end to end at a tiny size on the embedded sample (CPU), and the report card it writes."""
import json
import os
import re
import subprocess

import pytest

import report
from conftest import SKIP_NO_TOKENIZER, ROOT, SESSION_TOKENIZER, background, base_env

pytestmark = pytest.mark.slow  # every test here runs speedrun.sh


class Speedrun:
    """`bash speedrun.sh --tiny --skip_setup --out=BASE/out --data=BASE/data FLAGS` started in the background (each
    run is one thread: two of them side by side use two cores); wait() -> (out, data, stdout, stderr, exit status)."""

    def __init__(self, base, flags, env):
        self.out, self.data = str(base / "out"), str(base / "data")
        self.stdout, self.stderr = open(base / "stdout.txt", "w+"), open(base / "stderr.txt", "w+")
        self.proc = subprocess.Popen(["bash", "speedrun.sh", "--tiny", "--skip_setup", f"--out={self.out}",
                                      f"--data={self.data}", *flags], cwd=ROOT, env=env, stdout=self.stdout,
                                     stderr=self.stderr, text=True)

    def wait(self):
        try:
            code = self.proc.wait(timeout=900)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        with self.stdout, self.stderr:
            self.stdout.seek(0)
            self.stderr.seek(0)
            return self.out, self.data, self.stdout.read(), self.stderr.read(), code


def run_both_speedruns(tmp_path_factory) -> dict:
    """Both tiny speedruns at once: with the ChatGLM2 tokenizer (None without one), and with a tokenizer of its own."""
    env = dict(base_env(), OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    env.pop("BABYLLAMA_TOKENIZER", None)  # the run with its own tokenizer: nothing may fall back to ChatGLM2's
    own = Speedrun(tmp_path_factory.mktemp("speedrun_own"), ["--tokenizer_vocab=4096", "--eval_original"], env)
    chatglm = SESSION_TOKENIZER and Speedrun(tmp_path_factory.mktemp("speedrun"), ["--sft_mix=medical=2", "--eval_original"],
                                             dict(env, BABYLLAMA_TOKENIZER=SESSION_TOKENIZER))
    try:
        return {"chatglm": chatglm and chatglm.wait(), "own": own.wait()}
    finally:
        for run in (chatglm, own):
            if run is not None and run.proc.poll() is None:
                run.proc.kill()


BACKGROUND_JOBS = {"speedruns": run_both_speedruns}  # started with the session (conftest.background_jobs)


@pytest.fixture(scope="module")
def speedruns(tmp_path_factory):
    return background("speedruns", run_both_speedruns, tmp_path_factory).result()


@pytest.fixture(scope="module")
def tiny_run(speedruns):
    if speedruns["chatglm"] is None:
        pytest.skip(SKIP_NO_TOKENIZER)
    out, _, stdout, stderr, code = speedruns["chatglm"]
    assert code == 0, (stdout[-3000:], stderr[-3000:])
    return out, stdout


def test_speedrun_writes_every_stage_and_the_report(tiny_run):
    out, stdout = tiny_run
    stages = [json.loads(line)["stage"] for line in open(os.path.join(out, "speedrun.jsonl"), encoding="utf-8")]
    assert stages == ["tokenize-pretrain", "tokenize-sft", "pretrain", "sft", "eval", "eval-original", "report"]
    # the card lists the stages before its own (report.py is still running when it writes them)
    assert [st["stage"] for st in json.load(open(os.path.join(out, "report.json")))["stages"]] == stages[:-1]
    for f in ("report.md", "report.json", "curves.png", "pretrain/summary.json", "sft/summary.json",
              "sft/eval_report.json", "eval_original/eval_report.json"):
        assert os.path.isfile(os.path.join(out, f)), f
    for name in ("tokenize-pretrain", "pretrain", "sft", "eval", "report"):
        assert f"] {name}: " in stdout  # progress on the console: each stage announced with its command
    # the SFT mix reaches sft.py: the sample's medical conversations twice per epoch
    sft_cmd = [json.loads(line)["command"] for line in open(os.path.join(out, "speedrun.jsonl"))][3]
    assert "--mix=medical=2" in sft_cmd and "SFT mix: medical=2" in stdout
    assert "mixed to" in open(os.path.join(out, "sft", "log.txt"), encoding="utf-8").read()


def test_a_second_speedrun_into_the_same_folders_needs_overwrite(tiny_run):
    out, _ = tiny_run
    data = os.path.join(os.path.dirname(out), "data")
    args = ["bash", "speedrun.sh", "--tiny", "--skip_setup", f"--out={out}", f"--data={data}"]
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]  # the rest is progress bars
    assert r.returncode == 2 and len(errors) == 1 and "--overwrite" in errors[0] and "Traceback" not in r.stderr
    assert os.path.isfile(os.path.join(out, "report.md"))  # the earlier run is untouched


def test_report_has_every_section_and_the_numbers_of_its_json(tiny_run):
    out, _ = tiny_run
    md = open(os.path.join(out, "report.md"), encoding="utf-8").read()
    r = json.load(open(os.path.join(out, "report.json"), encoding="utf-8"))
    headings = re.findall(r"^## (.+)$", md, flags=re.M)
    assert headings == report.SECTIONS
    s = r["eval"]["scores"]
    row = re.search(r"^\| BLEU-4 / sacreBLEU, the model \| ([\d.]+) / ([\d.]+) \|$", md, flags=re.M)
    assert row and float(row[1]) == round(s["bleu4"], 2) and float(row[2]) == round(s["sacrebleu_zh"], 2)
    for name in ("retrieval", "fixed"):
        b = r["eval"]["baselines"][name]
        row = re.search(rf"^\| BLEU-4 / sacreBLEU, baseline {name} \| ([\d.]+) / ([\d.]+) \|$", md, flags=re.M)
        assert row and float(row[1]) == round(b["bleu4"], 2) and float(row[2]) == round(b["sacrebleu_zh"], 2)
    row = re.search(r"^\| degenerate answers \| ([\d.]+)% \|$", md, flags=re.M)
    assert row and float(row[1]) == round(100 * s["degenerate"], 1)
    p = r["pretrain"]
    row = re.search(r"^\| held-out loss of pretraining, end \(min\) \| ([\d.]+) \(([\d.]+)\) \|$", md, flags=re.M)
    assert row and float(row[1]) == round(p["val_end"], 4) and float(row[2]) == round(p["val_min"], 4)
    assert p["val_min"] <= p["val_end"] and p["steps"] > 0 and p["tokens"] == p["steps"] * p["tokens_per_step"]
    row = re.search(r"^\| pretrain \| [\d,]+ \| [\d,]+ \| [\d,]+ \| [\d.,]+ s \| ([\d.,]+) s / ([\d.,]+) s \|", md, flags=re.M)
    assert row and float(row[1]) == round(p["validation_s"], 1) and float(row[2]) == round(p["checkpoint_wait_s"], 1)
    row = re.search(r"^\| perplexity on held-out pretraining text \(SFT model\) \| ([\d.,]+) \|$", md, flags=re.M)
    assert row and float(row[1].replace(",", "")) == round(s["ppl"], 2)
    # bits per byte (the run has its tokenizer): the pretraining run's last and best, the SFT model's in eval
    row = re.search(r"^\| bits per byte of held-out pretraining text, end \(min\) \| ([\d.]+) \(([\d.]+)\) \|$", md, flags=re.M)
    assert row and float(row[1]) == round(p["val_bpb"], 4) and float(row[2]) == round(p["best_val_bpb"], 4)
    row = re.search(r"^\| bits per byte on held-out pretraining text \(SFT model\) \| ([\d.]+) \|$", md, flags=re.M)
    assert row and float(row[1]) == round(s["bits_per_byte"], 4) and 0 < s["bits_per_byte"] < 20
    # the original protocol is reported too, and every command that ran is on the page
    o = r["eval_original"]["scores"]
    assert f"| {o['bleu4']:,.2f} | {o['sacrebleu_zh']:,.2f} |" in md and "temperature 1.0" in r["eval_original"]["decoding"]
    for st in r["stages"]:
        assert st["command"] in md
    assert len(r["samples"]) == 10 and md.count("**Reference**") == 10
    assert all(smp["answer"] is not None and smp["reference"] for smp in r["samples"])


def test_speedrun_rejects_a_corpora_folder_without_its_parts(tmp_path):
    (tmp_path / "pretrain").mkdir()
    r = subprocess.run(["bash", "speedrun.sh", f"--corpora={tmp_path}", "--skip_setup", f"--out={tmp_path}/o"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith(f"error: {tmp_path}/sft: ")
    assert "no such folder" in r.stderr
    assert not os.path.exists(tmp_path / "o")
    r = subprocess.run(["bash", "speedrun.sh", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "bash speedrun.sh --corpora=DIR" in r.stdout
    r = subprocess.run(["bash", "speedrun.sh", "--tiny", "--tokenizer_vocab=12"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--tokenizer_vocab=12" in r.stderr


def test_speedrun_with_a_tokenizer_of_its_own(speedruns):
    """--tokenizer_vocab=N trains a tokenizer on the corpora first and every stage uses it (its hash is in the runs)."""
    out, data, stdout, stderr, code = speedruns["own"]
    assert code == 0, (stdout[-3000:], stderr[-3000:])
    stages = [json.loads(line)["stage"] for line in open(os.path.join(out, "speedrun.jsonl"), encoding="utf-8")]
    assert stages[0] == "tokenizer" and stages[1:3] == ["tokenize-pretrain", "tokenize-sft"]
    meta = json.load(open(os.path.join(data, "tokenizer", "tokenizer_meta.json"), encoding="utf-8"))
    ev = json.load(open(os.path.join(out, "sft", "eval_report.json"), encoding="utf-8"))
    assert ev["tokenizer_sha256"] == meta["tokenizer_sha256"] and ev["model_args"]["vocab_size"] == 4096
    assert ev["scores"]["bits_per_byte"] > 0
