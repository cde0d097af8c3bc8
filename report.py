"""The report card of a run: one Markdown page with the numbers that say whether the model is any good.

    python report.py --run=out                 # what speedrun.sh calls last
    python report.py --run=out/speedrun-tiny

Reads the run folder that speedrun.sh fills: pretrain/ and sft/ (summary.json, metrics.jsonl of each training
stage), sft/eval_report.json (default decoding, with baselines), eval_original/eval_report.json (the original
project's sampling protocol) and speedrun.jsonl (each stage's command and wall time). Writes, beside them:
  report.md     held-out loss, bits per byte and perplexity, BLEU next to the model-free baselines, degenerate answers, answer
                length, stock answers (repeated answers and openings, distinct-2, overlap with the question) of
                the model, the baselines and the references, bits per byte of the references, 10 sample answers
                with their references, time and tokens/s of each stage and where each stage's time went
                (compilation, steps, validation, checkpoint waits, data, generation), hardware, commands
  report.json   every number on the page (report.md is rendered from it and nothing else)
  curves.png    train and validation loss of both stages
"""
from __future__ import annotations

import datetime
import json
import os
import re
from dataclasses import dataclass
from typing import List, Optional

from babyllama.config import config_or_exit
from babyllama.errors import check, ctrl_c, user_errors
from babyllama.fileio import read_jsonl
from babyllama.train_log import read_metrics
from babyllama.fileio import atomic_file, write_atomic

SECTIONS = ["Summary", "Answers", "Training", "Time", "Curves", "Samples", "Hardware", "Commands"]
STOCK = ("duplicate", "openings", "top_opening", "distinct2", "question_overlap")  # babyllama/quality.answer_quality
# where a stage's wall time went (report.json "time"): start-up = the stage's start (its process's, or its turn in
# chain.py's one process) to its first work (interpreter, imports, CUDA, loading the model); scoring = eval's BLEU, baselines and reference bits/byte; other_s = the rest
# (the curve's plot, writing reports, the process's exit)
TIME_PARTS = ("data_s", "startup_s", "compile_s", "steps_s", "validation_s", "checkpoint_wait_s", "generation_s",
              "scoring_s")


@dataclass
class ReportConfig:
    run: str = "out"  # the run folder speedrun.sh writes (pretrain/, sft/, eval_original/, speedrun.jsonl)
    samples: int = 10  # sample answers shown beside their references, spread evenly over the eval set

    def validate(self):
        check(os.path.isdir(self.run), f"--run {self.run}: no such folder (run speedrun.sh first)")
        check(self.samples >= 0, f"samples must be >= 0, got {self.samples}")


def read_json(path: str) -> Optional[dict]:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def curves(run_dir: str) -> dict:
    """{"train": [(step, loss), ...], "val": [(step, val_loss), ...]} of a training run (none if it has no metrics)."""
    if not os.path.isfile(os.path.join(run_dir, "metrics.jsonl")):
        return {"train": [], "val": []}
    train, val = read_metrics(run_dir)
    return {"train": sorted(train.items()), "val": sorted(val.items())}


def stage_info(run: str, name: str, times: dict) -> Optional[dict]:
    """One training stage: its summary.json, validation curve facts and the stage's wall time from speedrun.jsonl."""
    summary = read_json(os.path.join(run, name, "summary.json"))
    if summary is None:
        return None
    val = [v for _, v in curves(os.path.join(run, name))["val"]]
    info = dict(summary, wall_s=times.get(name, {}).get("seconds"))
    info["val_first"], info["val_min"], info["val_end"] = (val[0], min(val), val[-1]) if val else (None, None, None)
    return info


def pick_samples(results: List[dict], n: int) -> List[dict]:
    """n results spread evenly over the set (always the same ones for the same set)."""
    if n <= 0 or not results:
        return []
    step = max(len(results) / n, 1)
    return [results[int(i * step)] for i in range(min(n, len(results)))]


def eval_block(rep: Optional[dict]) -> Optional[dict]:
    if rep is None:
        return None
    keep = ("bleu4", "sacrebleu_zh", "ppl", "val_loss", "bits_per_byte", "degenerate", "loop", "hit_limit", "answer_chars",
            "reference_chars", "length_ratio", "reference_bpb") + STOCK
    return {"scores": {k: rep["scores"].get(k) for k in keep}, "baselines": rep.get("baselines", {}),
            "references": rep.get("references"),
            "decoding": rep["protocol"]["decoding"], "samples": rep["samples"], "data": rep["data"],
            "checkpoint": rep["checkpoint"], "step": rep["step"], "generation_s": rep["timing"]["generation_s"],
            "new_tokens_per_s": rep["timing"]["new_tokens_per_s"]}


def time_rows(run: str, stages: List[dict]) -> List[dict]:
    """Each stage's wall time (speedrun.jsonl) split into TIME_PARTS: a training stage's from its summary.json, an
    eval's from its eval_report.json (validation = perplexity), a tokenizing stage's all data; other_s is the rest."""
    rows = []
    for st in stages:
        name, wall = st["stage"], st["seconds"]
        parts = dict.fromkeys(TIME_PARTS)
        if name in ("pretrain", "sft"):
            summary = read_json(os.path.join(run, name, "summary.json")) or {}
            parts.update({k: summary.get(k) for k in TIME_PARTS})
        elif name in ("eval", "eval-original"):
            rep = read_json(os.path.join(run, "sft" if name == "eval" else "eval_original", "eval_report.json")) or {}
            timing = rep.get("timing", {})
            scoring = [timing.get(k) for k in ("scoring_s", "baselines_s", "reference_bpb_s")]
            parts.update(generation_s=timing.get("generation_s"), validation_s=timing.get("ppl_s"),
                         startup_s=timing.get("startup_s"),
                         scoring_s=sum(v for v in scoring if v is not None) if timing.get("scoring_s") is not None else None)
        elif name in ("tokenizer", "tokenize-pretrain", "tokenize-sft"):
            parts["data_s"] = wall
        known = sum(v for v in parts.values() if v is not None)
        rows.append(dict(stage=name, wall_s=wall, **parts, other_s=round(max(0.0, wall - known), 1)))
    return rows


def runtime_hardware() -> dict:
    from babyllama.runtime import hardware  # imports torch

    return hardware()


def build(cfg: ReportConfig) -> dict:
    log = os.path.join(cfg.run, "speedrun.jsonl")
    times = {r["stage"]: r for _, r in read_jsonl(log, torn_tail_ok=True)} if os.path.isfile(log) else {}
    main = read_json(os.path.join(cfg.run, "sft", "eval_report.json"))
    check(main is not None, f"{cfg.run}/sft/eval_report.json: missing (run eval.py on the SFT checkpoint first)")
    return {
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "run": cfg.run,
        "pretrain": stage_info(cfg.run, "pretrain", times),
        "sft": stage_info(cfg.run, "sft", times),
        "eval": eval_block(main),
        "eval_original": eval_block(read_json(os.path.join(cfg.run, "eval_original", "eval_report.json"))),
        "samples": [{k: r.get(k) for k in ("question", "reference", "answer", "bleu4")}
                    for r in pick_samples(main["results"], cfg.samples)],
        "stages": list(times.values()),
        "time": time_rows(cfg.run, list(times.values())),
        "total_s": round(sum(r["seconds"] for r in times.values()), 1),
        # eval.py's (torch is loaded there); importing torch here only for this took seconds of a speedrun
        "hardware": main.get("hardware") or runtime_hardware(),
    }


# ----------------------------------------------------------------------------- rendering


def num(v, d: int = 2) -> str:
    return "n/a" if v is None else f"{v:,.{d}f}"


def pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def answer_row(name: str, q: dict, ref_chars: Optional[float]) -> str:
    """One row of the answers table: BLEU, degenerate answers, length and the stock-answer metrics of one set of
    answers (empty cells for what it lacks: a baseline has no degenerate answers, the references no BLEU)."""
    cell = lambda k, f: "" if q.get(k) is None else f(q[k])
    length = q["answer_chars"] / ref_chars if ref_chars and q.get("answer_chars") is not None else None
    opening = "" if q.get("openings") is None else f"{q['openings']:,} ({pct(q['top_opening'])})"
    return (f"| {name} | {cell('bleu4', num)} | {cell('sacrebleu_zh', num)} | {cell('degenerate', pct)} | "
            f"{num(length)}x | {cell('duplicate', pct)} | {opening} | {cell('distinct2', lambda v: num(v, 3))} | "
            f"{cell('question_overlap', pct)} |")


def decoding_label(decoding: str) -> str:
    """The card's short name of eval.py's protocol "decoding" string: its first part ("beam search", "greedy", ...),
    or for sampled starts kept one of K (eval.py's default) "4 sampled starts x 8 beams, one kept"."""
    m = re.search(r"then (\d+) beams.*, (\d+) starts per question", decoding)
    return f"{m.group(2)} sampled starts x {m.group(1)} beams, one kept" if m else decoding.split(",")[0]


def answers_table(r: dict) -> List[str]:
    """Rows: the model, the model under the original protocol, each baseline, the references (the yardstick)."""
    e, o = r["eval"], r["eval_original"]
    ref = e["scores"]["reference_chars"]
    rows = ["| answers from | BLEU-4 | sacreBLEU | degenerate | length vs reference | identical to another | "
            "distinct openings (top share) | distinct-2 | question overlap |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    rows.append(answer_row(f"**the model**, {decoding_label(e['decoding'])}", e["scores"], ref))
    if o:
        rows.append(answer_row("the model, original protocol (temperature 1.0, top-k 100)", o["scores"], ref))
    for name, b in e["baselines"].items():
        what = "retrieval: the answer of the most similar SFT question" if name == "retrieval" else \
            "fixed: one generic sentence for every question"
        rows.append(answer_row(f"baseline, {what}", b, ref))
    if e.get("references"):
        rows.append(answer_row("the reference answers themselves", e["references"], ref))
    return rows


def training_table(r: dict) -> List[str]:
    rows = ["| stage | steps | tokens | tokens/s (training) | wall time | of it: validation / waiting for checkpoints "
            "| val loss first -> min -> end |",
            "|---|---:|---:|---:|---:|---:|---|"]
    for name in ("pretrain", "sft"):
        s = r[name]
        if s:
            rows.append(f"| {name} | {s['steps']:,} | {s['tokens']:,} | {s['tokens_per_s']:,.0f} | "
                        f"{num(s['wall_s'], 1)} s | {num(s.get('validation_s'), 1)} s / "
                        f"{num(s.get('checkpoint_wait_s'), 1)} s | {num(s['val_first'], 4)} -> "
                        f"{num(s['val_min'], 4)} -> {num(s['val_end'], 4)} |")
    for st in r["stages"]:
        if st["stage"] not in ("pretrain", "sft"):
            rows.append(f"| {st['stage']} | | | | {num(st['seconds'], 1)} s | | |")
    return rows


def time_table(r: dict) -> List[str]:
    """report.json's "time" as a table, with a total row."""
    cols = ("wall_s",) + TIME_PARTS + ("other_s",)
    rows = ["| stage | wall | data | start-up | compilation | steps | validation | checkpoint waits | generation | "
            "scoring | other |",
            "|---|" + "---:|" * len(cols)]
    for t in r["time"] + [dict({c: sum(t[c] or 0 for t in r["time"]) for c in cols}, stage="**total**")]:
        rows.append(f"| {t['stage']} | " + " | ".join("" if t[c] is None else f"{t[c]:,.1f} s" for c in cols) + " |")
    return rows + ["", "Data: tokenizing, or reading the data in a training stage. Start-up: from the stage's start "
                   "(its process's, or its turn in chain.py's one process; the chain's first stage: the data being "
                   "ready) to its first work (interpreter, imports, CUDA, loading the model). Compilation: the "
                   "first steps' extra time. Validation: an eval's perplexity. Scoring: BLEU, the baselines, the "
                   "references' bits per byte. Other: the rest (plots, reports, the process's exit)."]


def markdown(r: dict) -> str:
    e, p = r["eval"], r["pretrain"]
    s = e["scores"]
    gpus = r["hardware"]["gpus"]
    card = f"{len(gpus)} x {gpus[0]}" if gpus else f"CPU ({r['hardware']['cpu_cores']} cores)"
    lines = [f"# Report card: `{r['run']}`", "", f"{r['created']} · {card} · total {num(r['total_s'], 1)} s", "",
             "## Summary", "", "| what | value |", "|---|---:|",
             f"| held-out loss of pretraining, end (min) | {num(p['val_end'] if p else None, 4)} "
             f"({num(p['val_min'] if p else None, 4)}) |",
             f"| bits per byte of held-out pretraining text, end (min) | {num(p.get('val_bpb') if p else None, 4)} "
             f"({num(p.get('best_val_bpb') if p else None, 4)}) |",
             f"| perplexity on held-out pretraining text (SFT model) | {num(s['ppl'])} |",
             f"| bits per byte on held-out pretraining text (SFT model) | {num(s.get('bits_per_byte'), 4)} |",
             f"| bits per byte of the reference answers given their questions (SFT model) | "
             f"{num(s.get('reference_bpb'), 4)} |",
             f"| BLEU-4 / sacreBLEU, the model | {num(s['bleu4'])} / {num(s['sacrebleu_zh'])} |"]
    for name, b in e["baselines"].items():
        lines.append(f"| BLEU-4 / sacreBLEU, baseline {name} | {num(b['bleu4'])} / {num(b['sacrebleu_zh'])} |")
    lines += [f"| degenerate answers | {pct(s['degenerate'])} |",
              f"| mean answer / reference length (characters) | {num(s['answer_chars'], 0)} / "
              f"{num(s['reference_chars'], 0)} |", "",
              "## Answers", "", f"{e['samples']} questions from `{e['data']}`; decoding: {e['decoding']}.", ""]
    lines += answers_table(r)
    lines += ["", "A degenerate answer loops (a span of 4+ characters 4+ times in a row) or is cut at max_new_tokens. "
              "Stock answers (whitespace removed): identical to another answer; distinct first-12-character openings "
              "and the share that starts with the commonest; distinct-2 = distinct / all character bigrams; question "
              "overlap = answers sharing 3+ distinct Chinese character bigrams with their question (docs/recipe.md).",
              "", "## Training", ""] + training_table(r)
    lines += ["", "## Time", ""] + time_table(r)
    lines += ["", "## Curves", "", "![train and validation loss](curves.png)", "", "## Samples", ""]
    quote = lambda t: "\n".join("> " + ln for ln in ((t or "").splitlines() or [""]))
    for i, smp in enumerate(r["samples"], 1):
        lines += [f"### {i}", "", quote(smp["question"]), "", "**Reference**", "", quote(smp["reference"]), "",
                  f"**Answer** (BLEU-4 {100 * smp['bleu4']:.2f})", "", quote(smp["answer"]), ""]
    hw = r["hardware"]
    lines += ["## Hardware", "", f"- GPUs: {', '.join(gpus) or 'none'}", f"- CPU cores: {hw['cpu_cores']}",
              f"- torch {hw['torch']}, Python {hw['python']}, {hw['platform']}", "", "## Commands", "", "```bash"]
    lines += [st["command"] for st in r["stages"]] + ["```", ""]
    return "\n".join(lines)


def plot(r: dict, run: str, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, name in zip(axes, ("pretrain", "sft")):
        c = curves(os.path.join(run, name))
        if c["train"]:
            ax.plot(*zip(*c["train"]), lw=0.8, alpha=0.7, label="train")
        if c["val"]:
            ax.plot(*zip(*c["val"]), "o-", ms=3, label="validation")
        ax.set_title(f"{name}: loss (nats per token)")
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    with atomic_file(path) as f:  # never through a link, whole or not at all
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    cfg = config_or_exit(ReportConfig, argv)
    with user_errors(ValueError):
        r = build(cfg)
    plot(r, cfg.run, os.path.join(cfg.run, "curves.png"))
    write_atomic(os.path.join(cfg.run, "report.json"), json.dumps(r, ensure_ascii=False, indent=1))
    write_atomic(os.path.join(cfg.run, "report.md"), markdown(r))
    s = r["eval"]["scores"]
    print(f"wrote {cfg.run}/report.md, report.json, curves.png | BLEU-4 {num(s['bleu4'])} | sacreBLEU "
          f"{num(s['sacrebleu_zh'])} | degenerate {pct(s['degenerate'])} | " +
          " | ".join(f"{k} {num(b['bleu4'])}/{num(b['sacrebleu_zh'])}" for k, b in r["eval"]["baselines"].items()))
    return r


if __name__ == "__main__":
    with ctrl_c():  # one line, exit 130; the card's files are written whole or not at all
        main()
