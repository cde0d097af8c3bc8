"""speedrun.sh end to end at a tiny size on the embedded sample (CPU), and the report card it writes.

The run with the ChatGLM2 tokenizer works in a folder whose name has a space, on a copy of the sample with spaces in
its folder and file names (every stage gets each path whole), and comes after a first speedrun into the same folders
killed with SIGKILL, its whole process group, at a seeded random point (in tokenizing or pretraining; the seed is
random unless $BABYLLAMA_KILL_SEED sets it, and a failure names it): no lock outlives the kill, the earlier output is
refused without --overwrite, and the run with --overwrite replaces it, through links planted at every name it writes
that the killed run had not, leaving no temporary file.

    python -m pytest tests/test_speedrun.py -q
"""
import fcntl
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

import report
from babyllama.run_dir import RUN_FILES
from conftest import SKIP_NO_TOKENIZER, ROOT, SESSION_TOKENIZER, background_fixture, base_env

pytestmark = pytest.mark.slow  # every test here runs speedrun.sh

SAMPLE = os.path.join(ROOT, "data", "sample")
# the sample's files that the spaced copy renames: one in each part
SPACED = {"pretrain/wiki_style.json": "pretrain/wiki style.json", "sft/medical_sharegpt.jsonl": "sft/medical sharegpt.jsonl",
          "eval/medical_qa.jsonl": "eval/medical qa.jsonl"}
KILL_SEED = int(os.environ.get("BABYLLAMA_KILL_SEED") or random.SystemRandom().randrange(1_000_000))
# names the run writes, relative to its folder (out/...; data/ names: tests/test_hardening_inputs.py plants links at
# data_process.py's and train_tokenizer.py's, beside their folders too); a link is planted at each the killed run left free
LINKED = ["speedrun.jsonl", "report.md", "report.json", "curves.png",
          *(f"{stage}/{name}" for stage in ("pretrain", "sft") for name in (*RUN_FILES, "run.lock", "last.pt.tmp", "best.pt.tmp")),
          *(f"{folder}/eval_report.{ext}" for folder in ("sft", "eval_original") for ext in ("json", "md"))]
# what an unfinished write leaves beside its target: a temp file (fileio, checkpoint), an output folder built aside
TEMP = re.compile(r"\.tmp|^\..*\.(new|old)$|^\.export-")


class Speedrun:
    """`bash speedrun.sh --tiny --skip_setup --out=BASE/out --data=BASE/data FLAGS` started in the background (each
    run is one thread: two of them side by side use two cores), in a process group of its own (kill() ends all of
    it with SIGKILL); wait() -> (out, data, stdout, stderr, exit status)."""

    def __init__(self, base, flags, env, name="stdout"):
        self.out, self.data = str(base / "out"), str(base / "data")
        self.stdout, self.stderr = open(base / f"{name}.txt", "w+"), open(base / f"{name}-stderr.txt", "w+")
        self.proc = subprocess.Popen(["bash", "speedrun.sh", "--tiny", "--skip_setup", f"--out={self.out}",
                                      f"--data={self.data}", *flags], cwd=ROOT, env=env, stdout=self.stdout,
                                     stderr=self.stderr, text=True, start_new_session=True)

    def kill(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # bash and every stage it started (a data_process.py worker too)
        self.proc.wait()

    def wait(self):
        try:
            code = self.proc.wait(timeout=900)
        finally:
            self.kill()
        with self.stdout, self.stderr:
            self.stdout.seek(0)
            self.stderr.seek(0)
            return self.out, self.data, self.stdout.read(), self.stderr.read(), code


def spaced_corpora(base) -> str:
    """A copy of the embedded sample in a folder whose name has a space, with a space in a file name of each part."""
    corpora = base / "my corpora"
    shutil.copytree(SAMPLE, corpora, ignore=shutil.ignore_patterns("*.md"))
    for old, new in SPACED.items():
        os.rename(corpora / old, corpora / new)
    return str(corpora)


def lock_free(folders, within: float = 10.0):
    """Seconds until no process holds the flock of any of `folders` (the processes of a kill -9 take a moment to
    go), None if one still does after `within` seconds."""
    t0 = time.time()
    while True:
        free = True
        for folder in folders:
            fd = os.open(folder, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                free = False
            finally:
                os.close(fd)  # releases it
        if free or time.time() - t0 > within:
            return round(time.time() - t0, 2) if free else None
        time.sleep(0.1)


def kill_at_random(base, flags, env) -> dict:
    """A speedrun killed with SIGKILL (its whole process group) 0-12 s (seeded) after its second stage, tokenizing
    the SFT data, starts: in that stage or in pretraining, the first corpus tokenized and logged. Then, as a user
    would: a run without --overwrite, and links planted at the names the next run writes -> what the tests check."""
    delay = round(random.Random(KILL_SEED).uniform(0, 12), 2)
    killed = Speedrun(base, flags, env, name="killed")
    try:
        deadline = time.time() + 300
        while "] tokenize-sft: " not in open(base / "killed.txt", encoding="utf-8").read():
            assert killed.proc.poll() is None and time.time() < deadline, open(base / "killed-stderr.txt").read()[-3000:]
            time.sleep(0.05)
        time.sleep(delay)
    finally:
        killed.kill()
        killed.stdout.close()
        killed.stderr.close()
    out, data = killed.out, killed.data
    stdout = open(base / "killed.txt", encoding="utf-8").read()
    info = {"seed": KILL_SEED, "delay": delay, "stage": re.findall(r"^== \[\d+s\] ([\w-]+): ", stdout, flags=re.M)[-1],
            "lock_free_s": lock_free([out, data]), "out": out, "data": data}
    info["where"] = f"killed {delay} s into {info['stage']} (BABYLLAMA_KILL_SEED={KILL_SEED} repeats the delay)"
    info["refused"] = subprocess.run(killed.proc.args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    victims = base / "victims"
    victims.mkdir()
    info["linked"] = []
    for rel in LINKED:
        if not os.path.lexists(os.path.join(out, rel)):
            victim = victims / rel.replace("/", "-")
            victim.write_text(f"precious {rel}")
            os.makedirs(os.path.dirname(os.path.join(out, rel)), exist_ok=True)
            os.symlink(victim, os.path.join(out, rel))
            info["linked"].append(rel)
    info["victims"] = str(victims)
    return info


def run_both_speedruns(tmp_path_factory) -> dict:
    """Both tiny speedruns at once, in folders whose names have a space: with a tokenizer of its own, and with the
    ChatGLM2 tokenizer (None without one), the latter on corpora with spaces in their names too, after a first
    speedrun into its folders killed at a random point."""
    env = dict(base_env(), OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    env.pop("BABYLLAMA_TOKENIZER", None)  # the run with its own tokenizer: nothing may fall back to ChatGLM2's
    own_base = tmp_path_factory.mktemp("speedrun_own") / "own run"  # its --tokenizer=... too: a path with a space
    own_base.mkdir()
    own = Speedrun(own_base, ["--tokenizer_vocab=4096", "--eval_original", "--pretrain_args=--log_interval=5",
                              "--sft_args=--log_interval=4 --seed=7"], env)
    chatglm = killed = None
    try:
        if SESSION_TOKENIZER:
            base = tmp_path_factory.mktemp("speedrun") / "speed run"
            base.mkdir()
            flags = [f"--corpora={spaced_corpora(base)}", "--sft_mix=medical=2", "--eval_original"]
            env_chatglm = dict(env, BABYLLAMA_TOKENIZER=SESSION_TOKENIZER)
            killed = kill_at_random(base, flags, env_chatglm)
            chatglm = Speedrun(base, [*flags, "--overwrite"], env_chatglm)
        return {"chatglm": chatglm and chatglm.wait(), "own": own.wait(), "killed": killed}
    finally:
        for run in (chatglm, own):
            if run is not None:
                run.kill()


BACKGROUND_JOBS = {"speedruns": run_both_speedruns}  # started with the session (conftest.background_jobs)


speedruns = background_fixture("speedruns", run_both_speedruns)


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


def test_paths_with_spaces_reach_every_stage_whole(tiny_run):
    """Each stage got each path as one argument, and the commands shown (console, speedrun.jsonl, card) read back as
    the same words in a shell: they can be pasted."""
    out, stdout = tiny_run
    base = os.path.dirname(out)
    data, corpora = os.path.join(base, "data"), os.path.join(base, "my corpora")
    assert " " in base
    log = [json.loads(line) for line in open(os.path.join(out, "speedrun.jsonl"), encoding="utf-8")]
    words = {st["stage"]: shlex.split(st["command"]) for st in log}
    pre_in = f"{corpora}/pretrain/medical_style.jsonl,{corpora}/pretrain/wiki style.json"
    sft_in = f"{corpora}/sft/alpaca_style.json,{corpora}/sft/medical sharegpt.jsonl"
    assert words["tokenize-pretrain"] == ["python", "data_process.py", "pretrain", f"--inputs={pre_in}",
                                          f"--out_dir={data}/pretrain", "--overwrite"]
    assert words["tokenize-sft"] == ["python", "data_process.py", "sft", f"--inputs={sft_in}", f"--out_dir={data}/sft",
                                     "--overwrite"]
    expected = {"pretrain": [f"--data_dir={data}/pretrain", f"--out_dir={out}/pretrain"],
                "sft": [f"--init_from={out}/pretrain", f"--data_dir={data}/sft", f"--out_dir={out}/sft", "--mix=medical=2"],
                "eval": [f"--ckpt={out}/sft", f"--data={corpora}/eval/medical qa.jsonl", f"--val_bin={data}/pretrain",
                         f"--answer_pool={data}/sft/train.jsonl"],
                "eval-original": [f"--ckpt={out}/sft", f"--out_dir={out}/eval_original"],
                "report": [f"--run={out}"]}
    for stage, args in expected.items():
        assert set(args) <= set(words[stage]), (stage, words[stage])
    for st in log:
        assert f"] {st['stage']}: {st['command']}\n" in stdout  # the console shows the same line
    # and the stages read what they were given
    for mode, inputs in (("pretrain", pre_in), ("sft", sft_in)):
        manifest = json.load(open(os.path.join(data, mode, "manifest.json"), encoding="utf-8"))
        assert manifest["inputs"] == inputs.split(",")
    assert json.load(open(os.path.join(out, "sft", "eval_report.json"), encoding="utf-8"))["data"] == \
        f"{corpora}/eval/medical qa.jsonl"
    assert json.load(open(os.path.join(out, "report.json"), encoding="utf-8"))["run"] == out


def test_a_speedrun_killed_at_a_random_point_leaves_no_lock_and_its_output_needs_overwrite(speedruns):
    k = speedruns["killed"]
    if k is None:
        pytest.skip(SKIP_NO_TOKENIZER)
    assert k["lock_free_s"] is not None, f"a folder lock outlived the processes by 10 s: {k['where']}"
    r = k["refused"]
    errors = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(errors) == 1 and "== [" not in r.stdout, (k["where"], r.stderr[-3000:])
    assert errors[0].startswith(f"error: {k['out']}/speedrun.jsonl ") and "output of an earlier run" in errors[0]
    assert "--overwrite" in errors[0], k["where"]


def test_the_run_after_the_kill_replaces_it_whole_and_leaves_nothing_behind(speedruns, tiny_run):
    """The --overwrite run after the kill: its log and card hold its own stages only (each once, each command with
    --overwrite), its training logs start afresh, links planted at the names it writes were replaced (their
    targets untouched), and no temporary file or folder of the killed run or its own is left."""
    k = speedruns["killed"]
    out, data = k["out"], k["data"]
    log = [json.loads(line) for line in open(os.path.join(out, "speedrun.jsonl"), encoding="utf-8")]
    stages = ["tokenize-pretrain", "tokenize-sft", "pretrain", "sft", "eval", "eval-original", "report"]
    assert [st["stage"] for st in log] == stages, k["where"]
    assert all(st["command"].endswith(" --overwrite") for st in log[:4]), k["where"]
    card = json.load(open(os.path.join(out, "report.json"), encoding="utf-8"))
    assert card["stages"] == log[:-1]
    for stage in ("pretrain", "sft"):  # one run's steps, in order (a killed run's rows would come first)
        steps = [row["step"] for row in map(json.loads, open(os.path.join(out, stage, "metrics.jsonl"), encoding="utf-8"))
                 if "loss" in row]
        assert steps and steps == sorted(set(steps)), (stage, k["where"])
    assert {"sft/best.pt", "report.md"} <= set(k["linked"])  # names the killed run never reached
    left, links = [], []
    for folder in (out, data):
        for parent, dirs, files in os.walk(folder):
            left += [os.path.join(parent, n) for n in dirs + files if TEMP.search(n)]
            links += [os.path.join(parent, n) for n in dirs + files if os.path.islink(os.path.join(parent, n))]
    assert left == [] and links == [], (left, links, k["where"])
    victims = k["victims"]
    assert {n: open(os.path.join(victims, n)).read() for n in os.listdir(victims)} == {
        rel.replace("/", "-"): f"precious {rel}" for rel in k["linked"]}


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
    tokenizer = os.path.join(data, "tokenizer")
    assert " " in tokenizer and all(f"'--tokenizer={tokenizer}'" in json.loads(line)["command"]
                                    for line in open(os.path.join(out, "speedrun.jsonl"), encoding="utf-8")
                                    if json.loads(line)["stage"] not in ("tokenizer", "report"))
    assert ev["scores"]["bits_per_byte"] > 0
    # --pretrain_args / --sft_args reach their stage, after the speedrun's own flags (the last of a flag wins)
    commands = {json.loads(line)["stage"]: json.loads(line)["command"]
                for line in open(os.path.join(out, "speedrun.jsonl"), encoding="utf-8")}
    assert "--log_interval=10 --log_interval=5" in commands["pretrain"]
    assert "--log_interval=4 --seed=7" in commands["sft"] and "--log_interval=5" not in commands["sft"]
    for stage, interval in (("pretrain", 5), ("sft", 4)):
        assert f"step {interval}/" in open(os.path.join(out, stage, "log.txt"), encoding="utf-8").read()
    # the chat command the speedrun ends with works as printed: no --tokenizer, the model's own found from its
    # checkpoint (no $BABYLLAMA_TOKENIZER to fall back on)
    talk = shlex.split(re.search(r"^talk to the model: (.*); use it elsewhere: ", stdout, flags=re.M).group(1))
    assert talk[:2] == ["python", "chat.py"] and not any(w.startswith("--tokenizer") for w in talk)
    env = dict(base_env(), OMP_NUM_THREADS="1")
    env.pop("BABYLLAMA_TOKENIZER", None)
    r = subprocess.run([sys.executable, *talk[1:], "--max_new_tokens=4"], cwd=ROOT, env=env, input="头疼怎么办\n/quit\n",
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "sft model" in r.stdout and "模型>" in r.stdout, (r.stdout[-2000:], r.stderr[-2000:])
