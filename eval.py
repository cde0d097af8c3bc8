"""Evaluate a checkpoint: answers to held-out questions scored with BLEU, and perplexity on validation tokens.

    python eval.py                                          # out/sft on the medical QA set, default decoding, one GPU or CPU
    python eval.py --ckpt=out/sft/best.pt --limit=100 --batch_size=64
    python eval.py --data=data/eval/medical_qa.jsonl --val_bin=data/pretrain --ppl_windows=200
    python eval.py --ckpt=out/pretrain --data=none          # a pretrain checkpoint: continues the original project's prompts
    python eval.py --beam_prefix=0                          # plain beam search (8 beams), no sampled starts
    python eval.py --beams=1 --limit=100                    # greedy decoding: fast, a rough look
    python eval.py --beams=1 --candidates=8 --temperature=0.7 --top_p=0.9 --rerank=mbr   # keep one of 8 sampled answers
    python eval.py --prompts="前列腺囊肿的症状是什么？,请问，世界上最大的动物是什么？"   # just generate and print
    python eval.py --ckpt=out/tiny --device=cpu --limit=8 --max_new_tokens=32 --ppl_windows=16   # tiny CPU run
    python eval.py --ckpt=hf:out/hf                         # a Hugging Face Llama folder (export.py's): its tokenizer, its report inside it

Input: JSON lines `{"question": str, "answer": str, ...}` (extra keys such as "department" are kept in the
report). Default: data/eval/medical_qa.jsonl if present (the medical QA dev set the README tells you to get),
else the embedded sample data/sample/eval/medical_qa.jsonl. A file with no "answer" fields (or --prompts) is
only generated and printed; no scores, no report.

Protocol (also written into the report):
  prompts   SFT checkpoint: chatglm_tokenizer/template.render_prompt (question, then <bos>); pretrain checkpoint: the raw
            question as text to continue. Prompts longer than max_seq_len - max_new_tokens keep their end.
  decoding  by default 4 candidates per question (--candidates=4): each samples its first 8 tokens (--beam_prefix=8,
            --temperature=0.8 --top_p=0.9) and 8 beams continue it (beam.py: the best by log-prob / length),
            leaning towards the words that the doctors' answers to like questions share (--pool_bias=0.5); the
            one kept (rerank.py, --rerank=pool) agrees most (chrF) with the doctors' answers to the 16 questions of
            the SFT data most like it (--answer_pool, --pool_answers=16; without that file the other three answers
            take their place, --rerank=mbr_question), plus a small bonus for the question's terms and 0.02 x its
            opening's PMI with the question (--pmi_weight=0.02 --pmi_tokens=8: log p(first 8 tokens | question) -
            log p(them | no question), per token). No answer repeats one of its own 3-grams of tokens
            (--no_repeat_ngram=3: a small model loops otherwise). All chosen on held-out questions (docs/recipe.md). --beam_prefix=0: plain
            beam search; --beams=1: greedy, or sampling with --temperature/--top_k/--top_p. Batched, sorted by
            prompt length, KV cache; stops at <eos>.
  BLEU-4    see babyllama/bleu.py: nltk sentence BLEU, method1 smoothing, jieba words, mean x 100; sacrebleu tokenize=zh.
  stock     babyllama/quality.answer_quality of the model's answers, of each baseline's and of the references: answers
            identical to another, distinct 12-character openings, distinct-2, overlap with the question (docs/recipe.md).
  ref. bpb  SFT checkpoints: bits per byte of the reference answers given their questions, teacher-forced (scoring.py).
  ppl       exp(mean token cross-entropy) over the val_*.bin windows of a data_process.py output directory,
            read exactly as pretrain.py's validation reads them (dataset.PretrainData.eval_batches: windows of
            max_seq_len + 1 tokens starting at multiples of max_seq_len), so it equals exp(val loss) there.
Writes eval_report.json and eval_report.md into the checkpoint's folder and prints the scores last.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import List, Optional

from babyllama.errors import quiet_ctrl_c_until_main  # light: no torch

if __name__ == "__main__":
    quiet_ctrl_c_until_main()  # torch's import takes seconds: a Ctrl-C during it is one line, exit 130

import torch
from tqdm import tqdm

from babyllama import bleu
from babyllama import quality
from babyllama.batching import FREE_SHARE, fixed_batches, generate_all, length_order, plan_batches
from chatglm_tokenizer import ChatGLMTokenizer, TokenBytes, bits_per_byte
from chatglm_tokenizer.template import SEED_CONTINUATIONS, SEED_QUESTIONS, build_prompts
from babyllama.config import config_dict, config_or_exit
from babyllama.errors import DataError, check, ctrl_c, user_errors
from babyllama.clocks import process_start
from babyllama.checkpoint import check_same_tokenizer
from babyllama.fileio import load_qa
from beam import beam_search
from generate import EVAL_BEAMS, Sampling, generate
from rerank import AnswerPool, generate_best, pool_fallback
from scoring import reference_bpb
from babyllama.fileio import write_atomic
from babyllama.runtime import (autocast_context as autocast, cleanup, device_problem, hardware, resolve_dtype,
                               setup_runtime)
from generate import load_for_inference

CPU_BATCH = 32  # --batch_size=0 off a GPU: prompts per batch (and the perplexity's windows, at most 16)
SAMPLE_DATA = "data/sample/eval/medical_qa.jsonl"  # the embedded 30 questions, when the dev set is not there
DEFAULT_DATA = ("data/eval/medical_qa.jsonl", SAMPLE_DATA)
SAMPLE_NOTE = (f"no data/eval/medical_qa.jsonl: scoring the embedded sample {SAMPLE_DATA} (30 questions, a smoke "
               f"test, not a benchmark); get the dev set (README) or pass --data=FILE")
PPL_CHUNK = 4096  # rows of logits at a time in perplexity: memory independent of vocab x batch
DEFAULT_VAL = "data/pretrain"


@dataclass
class EvalConfig(Sampling):  # + max_new_tokens, temperature, top_k, top_p, repetition_penalty, no_repeat_ngram, beams, length_penalty (generate.Sampling)
    # the default decoding (docs/recipe.md): 4 sampled starts of 8 tokens, each continued by 8 beams, the answer kept
    # by its agreement with doctors' answers to like questions, the question's terms and its opening's PMI with the
    # question; --beam_prefix=0 = plain beam search, --beams=1 = greedy
    beams: int = EVAL_BEAMS  # beam search with this many beams (docs/recipe.md: 8 beat 4 and greedy on held-out questions); 1 = greedy or sampling
    beam_prefix: int = 8  # each answer's first this many tokens sampled, then the beams continue them; 0 = plain beam search
    temperature: float = 0.8  # sampling of the starts (or of whole answers with --beams=1 --temperature=T); 0 = greedy
    top_p: float = 0.9  # nucleus mass of that sampling; 1.0 = off
    candidates: int = 4  # answers decoded per question (sampled starts, or whole samples with --beams=1), one kept by --rerank; 1 = off
    rerank: str = "pool"  # the one kept: pool (most like the doctors' answers to the 16 most similar questions of --answer_pool, chrF, + the question's terms; mbr_question without that file) | mbr_question (chrF consensus of the candidates + the question's terms) | mbr | likelihood
    pmi_weight: float = 0.02  # + this x the PMI of the candidate's opening with its question, nats per token (docs/recipe.md: ends the stock openings); 0 = off
    pmi_tokens: int = 8  # the opening whose PMI counts: the first this many tokens (the sampled start); 0 = the whole answer
    pool_bias: float = 0.5  # the beams add up to 3x this to the log-prob of a word the answers to the 16 like questions share more than answers at large (rerank.AnswerPool.token_bias; docs/recipe.md); 0 = off
    ckpt: str = "out/sft"  # checkpoint file, or a run dir (best.pt preferred, else last.pt), or hf:FOLDER (export.py's)
    data: str = ""  # JSON lines {"question","answer"}; "" = data/eval/medical_qa.jsonl, else the embedded sample (said so); "none" = the original project's prompts
    prompts: List[str] = field(default_factory=list)  # ad-hoc prompts, comma-separated: generate and print only
    val_bin: str = DEFAULT_VAL  # data_process.py output dir whose val_*.bin shards give perplexity; "" or "none" = skip
    ppl_windows: int = 0  # perplexity over the first N windows in file order (0 = all; pretrain.py validates on eval_windows)
    ppl_seq_len: int = 0  # window length - 1; 0 = the model's max_seq_len (what pretrain.py validates on)
    limit: int = 0  # evaluate the first N questions (0 = all)
    batch_size: int = 0  # prompts generated together (and windows per perplexity batch, at most 16); 0 = auto: on a GPU as many questions at once as memory allows (batch_sizes), else 32
    seed: int = 1337  # seeds sampling (no effect when greedy)
    device: str = "auto"  # auto = cuda > mps > cpu
    dtype: str = "auto"  # auto = bfloat16 on cuda (float16 where bf16 is missing), float32 elsewhere
    tokenizer: str = ""  # path to tokenizer.model (else the model's own: an hf: folder's, the one a checkpoint was trained with; then $BABYLLAMA_TOKENIZER, chatglm_tokenizer/, the Hub)
    out_dir: str = ""  # where eval_report.{json,md} go; "" = the checkpoint's folder
    baselines: bool = False  # also score two answers made without a model (babyllama/quality.py): retrieval and a fixed sentence
    answer_pool: str = "data/sft/train.jsonl"  # SFT conversations (data_process.py sft): the answers --rerank=pool agrees with, and the retrieval baseline's
    reference_bpb: bool = True  # SFT checkpoints: bits/byte of the reference answers given their questions; false = skip

    def resolve_decoding(self) -> None:
        """--beams=1 (greedy or sampling) or --beam_prefix=0 (plain beam search): the default sampled starts step
        aside, except for what the user set (--beams=1 --temperature=0.7 samples; --beams=1 --candidates=8
        --temperature=0.7 reranks). Set means given as a flag; for a config built in code, unlike its default."""
        explicit = getattr(self, "_explicit", None)
        if explicit is None:
            explicit = {f.name for f in dataclasses.fields(self) if getattr(self, f.name) != f.default}
        if self.beams == 1 and "beam_prefix" not in explicit:
            self.beam_prefix = 0
        if self.beams == 1 or self.beam_prefix == 0:
            for name, off in (("candidates", 1), ("temperature", 0.0), ("top_p", 1.0), ("pmi_weight", 0.0),
                              ("pool_bias", 0.0)):
                if name not in explicit:
                    setattr(self, name, off)

    def validate(self):
        self.resolve_decoding()
        super().validate()
        check(self.batch_size >= 0, f"batch_size must be >= 0 (0 = auto), got {self.batch_size}")
        check(not self.baselines or os.path.isfile(self.answer_pool),
              f"--baselines: no {self.answer_pool} (run data_process.py sft, or pass --answer_pool=FILE)")
        for name in ("limit", "ppl_windows", "ppl_seq_len"):
            check(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        check(self.dtype in ("auto", "bfloat16", "float16", "float32"), f"dtype must be auto|bfloat16|float16|float32, got {self.dtype!r}")
        check(0 <= self.seed < 2**32, f"seed must be in 0..2**32-1, got {self.seed}")
        check(device_problem(self.device) is None, device_problem(self.device) or "")


# ----------------------------------------------------------------------------- inputs


def resolve_data_path(data: str) -> Optional[str]:
    """--data -> the file to read, or None for the original project's built-in prompts."""
    if data.lower() == "none":
        return None
    if data:
        if not os.path.isfile(data):
            raise DataError(f"--data {data}: no such file")
        return data
    return next((p for p in DEFAULT_DATA if os.path.isfile(p)), None)


# ----------------------------------------------------------------------------- generation


def batch_sizes(cfg: EvalConfig, prompts: List[List[int]], order: List[int], model_args: dict, device: torch.device,
                dtype: torch.dtype) -> List[int]:
    """The decode batches over prompts in `order` (length_order's): --batch_size N cuts batches of N; 0 (auto) on a GPU
    takes as many prompts as their decode state fits FREE_SHARE of the free memory (plan_batches), elsewhere 32."""
    if cfg.batch_size or device.type != "cuda":
        return fixed_batches(len(order), cfg.batch_size or CPU_BATCH)
    beams = cfg.beams > 1  # beam.py's cache spans prompt + new tokens; generate.py's static one the whole context
    budget = int(FREE_SHARE * torch.cuda.mem_get_info(device)[0])
    return plan_batches([len(prompts[i]) for i in order], cfg.beams * cfg.candidates, model_args,
                        cfg.max_new_tokens if beams else None, torch.finfo(dtype).bits // 8, budget)


# ----------------------------------------------------------------------------- perplexity


@torch.no_grad()
def perplexity(model, data_dir: str, seq_len: int, batch_size: int, max_windows: int, device, dtype: str = "auto",
               vocab_size: Optional[int] = None, tokenizer_sha256: Optional[str] = None, progress: bool = True,
               token_bytes=None) -> dict:
    """exp(mean cross-entropy) over the val_*.bin windows of `data_dir`, read as pretrain.py's validation reads them.

    Windows come from dataset.PretrainData(split="val").eval_batches(max_windows) (0 = all): (B, seq_len) inputs,
    targets shifted by one, every window full, so weighting each batch's mean loss by its rows gives the token mean.
    token_bytes (chatglm_tokenizer.TokenBytes of the shards' tokenizer) adds bits per byte of the same targets: total
    nats / ln 2 / their UTF-8 bytes (None when not given or the shards name no tokenizer: synthetic ids).
    Returns {"loss", "ppl", "bits_per_byte", "bytes", "windows", "tokens", "seq_len", "data"}."""
    from dataset import PretrainData

    device = torch.device(device)
    dt = resolve_dtype(dtype, device) if isinstance(dtype, str) else dtype
    try:
        # at most 16 windows a forward: activations grow with rows x seq_len (the logits do not: PPL_CHUNK)
        val = PretrainData(data_dir, "val", seq_len, min(batch_size, 16), vocab_size=vocab_size,
                           tokenizer_sha256=tokenizer_sha256)
    except (ValueError, FileNotFoundError) as e:
        raise DataError(str(e)) from None
    was_training, ce_chunk = model.training, model.ce_chunk
    model.eval()
    model.ce_chunk = PPL_CHUNK  # the loss chunk by chunk (fused_ce): never the (rows x seq_len, vocab) logits
    n = min(val.n_windows, max_windows) if max_windows > 0 else val.n_windows
    bar = tqdm(total=n, desc="perplexity", unit="window", disable=not progress, file=sys.stderr)
    if token_bytes is not None and val.tokenizer_sha256 != token_bytes.sha256:
        token_bytes = None  # ids of another (or no named) tokenizer: their bytes are unknown
    total, rows, n_bytes = 0.0, 0, 0  # float64 sum of row-weighted mean losses
    try:
        for x, y in val.eval_batches(max_windows):
            n_bytes += token_bytes.count(x, y) if token_bytes is not None else 0
            x, y = x.to(device), y.to(device)
            with autocast(device, dt):
                _, loss = model(x, y)
            total += loss.item() * x.shape[0]
            rows += x.shape[0]
            bar.update(x.shape[0])
    finally:
        bar.close()
        model.train(was_training)
        model.ce_chunk = ce_chunk
    mean = total / rows
    bpb = bits_per_byte(mean * rows * seq_len, n_bytes) if n_bytes > 0 else None
    return {"loss": mean, "ppl": math.exp(mean) if mean < 700 else math.inf, "bits_per_byte": bpb, "bytes": n_bytes or None, "windows": rows,
            "tokens": rows * seq_len, "seq_len": seq_len, "data": data_dir}


# ----------------------------------------------------------------------------- reports


def markdown_report(report: dict) -> str:
    s, p = report["scores"], report["protocol"]
    fmt = lambda v, d=2: "n/a" if v is None else f"{v:.{d}f}"
    lines = [f"# Evaluation of `{report['checkpoint']}` (step {report['step']}, {report['kind']})", "",
             f"{report['created']} · {report['samples']} samples from `{report['data']}` · {report['device']} {report['dtype']}", "",
             "| metric | value |", "|---|---:|",
             f"| BLEU-4 (nltk sentence, jieba words, method1) x100 | {fmt(s['bleu4'])} |",
             f"| sacreBLEU corpus (tokenize=zh) | {fmt(s['sacrebleu_zh'])} |",
             f"| perplexity on validation tokens | {fmt(s['ppl'])} |",
             f"| validation loss (mean CE, nats) | {fmt(s['val_loss'], 4)} |",
             f"| bits per UTF-8 byte of the validation text | {fmt(s.get('bits_per_byte'), 4)} |",
             f"| degenerate answers (loop or cut at max_new_tokens) | {100 * s['degenerate']:.1f}% |",
             f"| mean answer length / reference length (characters) | {s['answer_chars']:.0f} / {s['reference_chars']:.0f} |",
             f"| bits per UTF-8 byte of the reference answers given their questions | {fmt(s.get('reference_bpb'), 4)} |"]
    lines += [f"| baseline `{k}`: BLEU-4 / sacreBLEU | {b['bleu4']:.2f} / {b['sacrebleu_zh']:.2f} |"
              for k, b in report.get("baselines", {}).items()]
    lines += ["", "## Stock answers", ""] + stock_table(report)
    lines += ["",
             "## Protocol", ""]
    lines += [f"- **{k}**: {v}" for k, v in p.items()]
    t = report["timing"]
    lines += ["", "## Timing", "",
              f"- generation: {t['generation_s']:.1f} s, {t['new_tokens']:,} new tokens, {t['new_tokens_per_s']:.1f} new tokens/s",
              f"- perplexity: {t['ppl_s']:.1f} s; total {t['total_s']:.1f} s", "", "## Samples", ""]
    quote = lambda text: "\n".join("> " + ln for ln in (text.splitlines() or [""]))
    for i, r in enumerate(report["results"], 1):
        extra = f" ({r['department']})" if r.get("department") else ""
        lines += [f"### {i}{extra}", "", "**Question**", "", quote(r["question"]), "", "**Reference**", "",
                  quote(r["reference"]), "", f"**Answer** (sentence BLEU-4 {100 * r['bleu4']:.2f})", "", quote(r["answer"]), ""]
    return "\n".join(lines)


def stock_table(report: dict) -> List[str]:
    """Markdown rows of the stock-answer metrics (quality.answer_quality): the model, each baseline, the references."""
    rows = ["| answers | identical to another | distinct openings (top share) | distinct-2 | question overlap |",
            "|---|---:|---:|---:|---:|"]
    named = [("the model", report["scores"])] + [(f"baseline `{k}`", b) for k, b in report.get("baselines", {}).items()]
    for name, q in named + [("the references", report["references"])]:
        rows.append(f"| {name} | {100 * q['duplicate']:.1f}% | {q['openings']} ({100 * q['top_opening']:.1f}%) | "
                    f"{q['distinct2']:.3f} | {100 * q['question_overlap']:.1f}% |")
    return rows


def stock_line(name: str, q: dict) -> str:
    """One console line of quality.answer_quality's metrics."""
    return (f"{name:<10} identical to another {100 * q['duplicate']:.1f}% | {q['openings']} openings (top "
            f"{100 * q['top_opening']:.1f}%) | distinct-2 {q['distinct2']:.3f} | question overlap "
            f"{100 * q['question_overlap']:.1f}%")


def score_line(bleu4: Optional[float], sacre: Optional[float], ppl: Optional[float], bpb: Optional[float] = None) -> str:
    fmt = lambda v, d: "n/a" if v is None else f"{v:.{d}f}"
    return (f"BLEU-4 (nltk, jieba, method1): {fmt(bleu4, 2)} | sacreBLEU (zh): {fmt(sacre, 2)} | ppl: {fmt(ppl, 1)}"
            + (f" | bits/byte: {bpb:.4f}" if bpb is not None else ""))


# ----------------------------------------------------------------------------- the run


def load_records(cfg: EvalConfig, kind: str) -> tuple[List[dict], Optional[str]]:
    """The questions (and answers) to evaluate -> (records, data file or None): --prompts, --data, or the original
    project's prompts."""
    data_path = None if cfg.prompts else resolve_data_path(cfg.data)
    if cfg.prompts:
        records = [{"question": q} for q in cfg.prompts]
    elif data_path is None:
        records = [{"question": q} for q in (SEED_QUESTIONS if kind == "sft" else SEED_CONTINUATIONS)]
    else:
        records = load_qa(data_path)
    return (records[:cfg.limit] if cfg.limit else records), data_path


def check_val_bin(cfg: EvalConfig, tokenizer) -> str:
    """--val_bin, checked before any answer is generated -> a note when perplexity will be skipped, else "". The
    default folder is skipped (val_bin set to none) when it holds no val shards or another tokenizer's (a model of
    its own tokenizer beside a data/pretrain of ChatGLM2's); a folder the user named must hold this tokenizer's."""
    from dataset import find_shards, read_sidecar

    if not cfg.val_bin or cfg.val_bin.lower() == "none":
        return ""
    try:
        for path in find_shards(cfg.val_bin, "val"):
            check_same_tokenizer(path, read_sidecar(path).get("tokenizer_sha256"), getattr(tokenizer, "sha256", None),
                                 "the model's tokenizer")
    except DataError as e:
        if cfg.val_bin != DEFAULT_VAL:
            raise DataError(f"--val_bin: {e}") from None
        cfg.val_bin = "none"
        return f"perplexity skipped: {e} (--val_bin=DIR: shards of this model's tokenizer)"
    return ""


def val_perplexity(cfg: EvalConfig, model, ckpt: dict, tokenizer, device: torch.device, dtype: torch.dtype,
                   progress: bool = True) -> tuple:
    """perplexity() over --val_bin as configured (check_val_bin first) -> (info dict or None when skipped, seconds)."""
    if not cfg.val_bin or cfg.val_bin.lower() == "none":
        return None, 0.0
    t0 = time.perf_counter()
    ma = ckpt["model_args"]
    info = perplexity(model, cfg.val_bin, cfg.ppl_seq_len or ma["max_seq_len"], cfg.batch_size, cfg.ppl_windows,
                      device, dtype, vocab_size=ma["vocab_size"], tokenizer_sha256=tokenizer.sha256, progress=progress,
                      token_bytes=TokenBytes(tokenizer) if isinstance(tokenizer, ChatGLMTokenizer) else None)
    return info, time.perf_counter() - t0


def reference_score(cfg: EvalConfig, model, kind: str, tokenizer, records: List[dict], device: torch.device,
                    dtype: torch.dtype) -> tuple:
    """scoring.reference_bpb of the scored records -> (its dict, or None when --reference_bpb is off or the checkpoint
    is not an SFT one (no template to score in), seconds)."""
    if not cfg.reference_bpb or kind != "sft":
        return None, 0.0
    t0 = time.perf_counter()
    info = reference_bpb(model, tokenizer, [r["question"] for r in records], [r["answer"] for r in records],
                         cfg.batch_size, device, dtype)
    return info, time.perf_counter() - t0


def build_report(cfg: EvalConfig, ckpt: dict, ckpt_path: str, tokenizer, kind: str, data_path: Optional[str],
                 records: List[dict], answers: List[str], per_sample: List[float], scores: tuple,
                 ppl_info: Optional[dict], device: torch.device, dtype: torch.dtype, prompt_budget: int, cut: int,
                 timing: dict) -> dict:
    """The eval_report.json contents: scores, the protocol that produced them, timings and every answer.

    scores: (bleu4, sacreBLEU, its signature, quality.degenerate_stats, quality.length_stats, the baselines,
    quality.answer_quality, scoring.reference_bpb or None)."""
    bleu4, sacre, signature, degenerate, lengths, baselines, stock, ref = scores
    gen_s = timing["generation_s"]
    ppl = ppl_info["ppl"] if ppl_info else None
    report = {
        "checkpoint": full_path(ckpt_path), "step": ckpt.get("step"), "kind": kind,
        "model_args": ckpt["model_args"], "tokenizer_sha256": tokenizer.sha256,
        "checkpoint_val_loss": ckpt.get("val_loss"), "data": data_path, "samples": len(records),
        "device": str(device), "dtype": str(dtype).replace("torch.", ""), "hardware": hardware(),
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "scores": {"bleu4": bleu4, "sacrebleu_zh": sacre, "ppl": ppl, "val_loss": ppl_info["loss"] if ppl_info else None,
                   "bits_per_byte": ppl_info["bits_per_byte"] if ppl_info else None,
                   **degenerate, "answer_chars": lengths["answer_chars"], "reference_chars": lengths["reference_chars"],
                   "length_ratio": lengths["ratio"], **stock, "reference_bpb": ref["bits_per_byte"] if ref else None},
        "baselines": baselines,
        "references": dict(quality.answer_quality([r["answer"] for r in records], [r["question"] for r in records]),
                           answer_chars=lengths["reference_chars"]),
        "protocol": {
            "data": SAMPLE_NOTE if data_path == SAMPLE_DATA and not cfg.data else f"{data_path}",
            "prompt": "template.render_prompt (question + <bos>)" if kind == "sft" else "raw question text, continued",
            "decoding": (f"{cfg.describe()}, stop at <eos>, seed {cfg.seed}, "
                         f"{timing['batches']}{per_process(timing.get('processes', 1))}, "
                         f"KV cache on"),
            "prompts_cut": f"{cut} prompt(s) longer than {prompt_budget} tokens kept their last {prompt_budget}",
            "bleu4": bleu.SENTENCE_PROTOCOL,
            "degenerate": (f"an answer that loops (a span of {quality.LOOP_SPAN}+ characters {quality.LOOP_REPEATS}+ times in a "
                           f"row) or is cut at max_new_tokens without <eos>"),
            "sacrebleu": signature,
            "stock_answers": ("quality.answer_quality, whitespace removed: duplicate = share identical to another "
                              "answer; openings = distinct first 12 characters, top_opening = share with the "
                              "commonest; distinct2 = distinct / all character bigrams; question_overlap = share "
                              "sharing 3+ distinct CJK bigrams with the question"),
            "reference_bpb": (f"teacher-forced in the SFT template, loss on the {ref['tokens']} tokens of {ref['answers']} "
                              f"reference answers and their <eos> ({ref['cut']} cut to the context), total nats / "
                              f"ln 2 / {ref['bytes']} UTF-8 bytes of those answers" if ref else "not computed"),
            "perplexity": (f"exp(mean CE) over {ppl_info['windows']} windows of {ppl_info['seq_len']}+1 tokens "
                           f"(stride {ppl_info['seq_len']}, first in file order) of {ppl_info['data']}/val_*.bin, "
                           f"as pretrain.py validates; bits per byte = total nats / ln 2 / "
                           f"{ppl_info['bytes'] or 'unknown'} UTF-8 bytes of those targets' text" if ppl_info
                           else "not computed"),
        },
        "timing": dict(timing, new_tokens_per_s=timing["new_tokens"] / gen_s if gen_s > 0 else 0.0),
        "config": config_dict(cfg),
        "results": [dict({k: v for k, v in r.items() if k not in ("question", "answer")}, question=r["question"],
                         reference=r["answer"], answer=a, bleu4=s) for r, a, s in zip(records, answers, per_sample)],
    }
    return report


def decoding_word(cfg: Sampling) -> str:
    if cfg.beams > 1:
        kept = f", {cfg.candidates} starts, one kept by {cfg.rule()}" if cfg.candidates > 1 else ""
        return f"beam search ({cfg.beams} beams{f', the first {cfg.beam_prefix} tokens sampled' if cfg.beam_prefix else ''}{kept})"
    if cfg.candidates > 1:
        return f"{cfg.candidates} candidates at temperature {cfg.temperature}, kept by {cfg.rule()}"
    return "greedy" if cfg.temperature == 0 else f"temperature {cfg.temperature}"


def decoding(cfg: EvalConfig, tokenizer, device: torch.device, pairs: Optional[list] = None) -> tuple:
    """(keyword arguments besides the knobs, decoder) for generate_all: sampling/greedy (generate.generate), beam
    search, or K sampled candidates with one kept (rerank.generate_best). The knobs are cfg's own (an EvalConfig is
    a Sampling); pairs: --answer_pool's (question, answer) pairs, read once."""
    kwargs = dict(eos_id=tokenizer.eos_id, generator=torch.Generator(device=device).manual_seed(cfg.seed))
    if cfg.candidates > 1:  # K rows per prompt (sampled, or beams after K sampled starts), one kept (rerank.py)
        pool = AnswerPool(pairs or quality.qa_pairs(cfg.answer_pool), tokenizer.encode_batch) \
            if cfg.rerank == "pool" else None
        return dict(kwargs, decode=tokenizer.decode, use_cache=True, pool=pool), generate_best
    if cfg.beams > 1:  # the generator samples a --beam_prefix start only
        return kwargs, beam_search
    return dict(kwargs, use_cache=True), generate


def evaluate(cfg: EvalConfig, model, ckpt: dict, tokenizer, ckpt_path: str, device: torch.device,
             dtype: torch.dtype, progress: bool = True, shard: tuple = (0, 1)) -> Optional[dict]:
    """Generates, scores, writes the reports and prints; returns the report (None when nothing was scored, and on
    every rank but 0 under torchrun: shard = (rank, world) splits the questions, rank 0 scores them all)."""
    t_start, startup_s = time.perf_counter(), time.time() - process_start()
    kind = ckpt.get("kind", "pretrain")
    max_seq_len = ckpt["model_args"]["max_seq_len"]
    cfg.resolve_decoding()  # a config built in code: --beams=1 means greedy there too
    # fit_context as chat.py does (256 new tokens -> 64 on a 128 context); a bad pool or --val_bin fails here
    for note in (cfg.fit_context(max_seq_len), pool_fallback(cfg, cfg.answer_pool), check_val_bin(cfg, tokenizer)):
        if note:
            print(note)
    records, data_path = load_records(cfg, kind)
    scored = all("answer" in r for r in records)
    pairs = quality.qa_pairs(cfg.answer_pool) if (cfg.baselines and scored) or \
        (cfg.rerank == "pool" and cfg.candidates > 1) else []  # a bad pool fails before generating
    pool = pairs if cfg.baselines and scored else []
    prompt_budget = max_seq_len - cfg.max_new_tokens
    prompts, cut = build_prompts(tokenizer, [r["question"] for r in records], kind, prompt_budget)
    sizes = batch_sizes(cfg, prompts, length_order([len(p) for p in prompts], *shard), ckpt["model_args"], device, dtype)
    auto = not cfg.batch_size and device.type == "cuda"
    cfg.batch_size = cfg.batch_size or (max(sizes, default=1) if auto else CPU_BATCH)  # also the perplexity's and the references' batch
    batches = f"batches {'+'.join(map(str, sizes))} (as memory allows)" if auto and len(sizes) > 1 else \
        f"batch {cfg.batch_size}"
    gen_kwargs, decoder = decoding(cfg, tokenizer, device, pairs)
    baselines_done = quality.start_baseline_scores([r["question"] for r in records], [r["answer"] for r in records],
                                                   pool, cfg.answer_pool, device.type == "cuda") \
        if pool and shard[0] == 0 else None
    describe_prompts(cfg, records, data_path, kind, prompts, cut, prompt_budget, shard[1], batches)
    outputs, gen_s = generate_all(decoder, model, prompts, sizes, cfg, gen_kwargs, device, dtype, progress, shard)
    if shard[0] != 0:  # rank 0 scores and reports
        return None
    answers = [tokenizer.decode(o).strip() for o in outputs]
    new_tokens = sum(len(o) for o in outputs)

    try:  # a perplexity that fails (bad --val_bin shards) must not lose the answers generated above
        (ppl_info, ppl_s), ppl_error = val_perplexity(cfg, model, ckpt, tokenizer, device, dtype, progress), None
    except DataError as e:
        ppl_info, ppl_s, ppl_error = None, 0.0, e
    ppl, bpb = (ppl_info["ppl"], ppl_info["bits_per_byte"]) if ppl_info else (None, None)

    if not scored:  # just generate and print
        for r, a in zip(records, answers):
            print(f"\n[prompt] {r['question']}\n[answer] {a}")
        print()
        print(score_line(None, None, ppl, bpb))
        if ppl_error is not None:
            raise ppl_error
        return None

    t_score = time.perf_counter()
    refs = [r["answer"] for r in records]
    per_sample = [bleu.sentence_bleu4(ref, hyp) for ref, hyp in zip(refs, answers)]
    bleu4 = 100.0 * sum(per_sample) / len(per_sample)
    sacre, signature = bleu.corpus_sacrebleu(refs, answers)
    degenerate = quality.degenerate_stats(answers, [len(o) >= cfg.max_new_tokens for o in outputs])
    lengths = quality.length_stats(answers, refs)
    baselines, baselines_s = baselines_done() if baselines_done else ({}, 0.0)
    stock = quality.answer_quality(answers, [r["question"] for r in records])
    ref, ref_s = reference_score(cfg, model, kind, tokenizer, records, device, dtype)
    total_s = time.perf_counter() - t_start
    scoring_s = time.perf_counter() - t_score - baselines_s - ref_s
    report = build_report(cfg, ckpt, ckpt_path, tokenizer, kind, data_path, records, answers, per_sample,
                          (bleu4, sacre, signature, degenerate, lengths, baselines, stock, ref), ppl_info, device, dtype,
                          prompt_budget, cut, {"total_s": total_s, "generation_s": gen_s, "ppl_s": ppl_s,
                                               "new_tokens": new_tokens, "reference_bpb_s": ref_s,
                                               "baselines_s": baselines_s, "scoring_s": scoring_s, "startup_s": startup_s,
                                               "processes": shard[1], "batches": batches})
    print_summary(records, answers, report, stock, ref, baselines, degenerate, lengths)
    print(score_line(bleu4, sacre, ppl, bpb))  # the scores come first: a report that cannot be written loses nothing
    if ppl_error is not None:
        raise DataError(f"perplexity: {ppl_error}; the scores above are without it (no report written)")
    json_path, md_path = write_reports(report, cfg.out_dir, ckpt_path)
    print(f"wrote {json_path} and {md_path} | {len(records)} samples in {total_s:.1f} s "
          f"(generation {gen_s:.1f} s, {report['timing']['new_tokens_per_s']:.1f} new tokens/s)")
    return report


def print_summary(records: List[dict], answers: List[str], report: dict, stock: dict, ref: Optional[dict],
                  baselines: dict, degenerate: dict, lengths: dict) -> None:
    """The quality lines of a scored run: stock answers, one sample, the baselines, degenerate answers."""
    print(stock_line("answers", stock))
    print(stock_line("references", report["references"]) + (f" | {ref['bits_per_byte']:.4f} bits/byte given the "
                                                           f"questions" if ref and ref["bits_per_byte"] else ""))
    # the first sample whose answer is not empty: an early <eos> on sample 0 would show nothing
    shown = next((i for i, a in enumerate(answers) if a.strip()), 0)
    print(f"\n[question {shown + 1}/{len(records)}] {records[shown]['question']}\n[answer] {answers[shown]}\n")
    for name, b in baselines.items():
        print(f"baseline {name:<9} BLEU-4 {b['bleu4']:.2f} | sacreBLEU {b['sacrebleu_zh']:.2f} | identical to another "
              f"{100 * b['duplicate']:.1f}% | question overlap {100 * b['question_overlap']:.1f}%")
    print(f"degenerate answers {100 * degenerate['degenerate']:.1f}% (loops {100 * degenerate['loop']:.1f}%, cut at "
          f"max_new_tokens {100 * degenerate['hit_limit']:.1f}%) | answer length {lengths['ratio']:.2f}x the references'")


def describe_prompts(cfg: EvalConfig, records: List[dict], data_path: Optional[str], kind: str, prompts: list,
                     cut: int, prompt_budget: int, world: int, batches: str) -> None:
    """The line saying what is asked and how it is decoded (and where the sample set stands in for a dev set)."""
    if data_path == SAMPLE_DATA and not cfg.data:  # no --data and no dev set: said, not silent
        print(f"note: {SAMPLE_NOTE}")
    print(f"{len(records)} prompts from {data_path or ('--prompts' if cfg.prompts else 'the original project prompts')} | "
          f"{'SFT template' if kind == 'sft' else 'continuation'} prompts, mean {sum(map(len, prompts)) / len(prompts):.0f} "
          f"tokens ({cut} cut to {prompt_budget}) | {cfg.max_new_tokens} new tokens max, {batches}"
          f"{per_process(world)}, {decoding_word(cfg)}, KV cache on")


def per_process(world: int) -> str:
    return f" per process, {world} processes" if world > 1 else ""


def full_path(ckpt_path: str) -> str:
    """A checkpoint file's absolute path, or hf:FOLDER's with the folder's."""
    return "hf:" + os.path.abspath(ckpt_path[3:]) if ckpt_path.startswith("hf:") else os.path.abspath(ckpt_path)


def write_reports(report: dict, out_dir: str, ckpt_path: str) -> tuple:
    """eval_report.json and .md into out_dir ("" = the checkpoint's folder) -> their paths; a folder that cannot
    be written (read-only, full) is a DataError saying where to write instead."""
    folder = out_dir or (ckpt_path[3:] if ckpt_path.startswith("hf:") else os.path.dirname(full_path(ckpt_path)))
    json_path, md_path = os.path.join(folder, "eval_report.json"), os.path.join(folder, "eval_report.md")
    try:
        os.makedirs(folder, exist_ok=True)
        write_atomic(json_path, json.dumps(report, ensure_ascii=False, indent=1))
        write_atomic(md_path, markdown_report(report))
    except OSError as err:
        hint = "pass another --out_dir" if out_dir else "pass --out_dir=DIR to write the report elsewhere"
        raise DataError(f"{folder}: cannot write eval_report.json ({err.strerror}); the scores are above; {hint}") from None
    return json_path, md_path


def main(argv=None) -> None:
    cfg = config_or_exit(EvalConfig, argv)
    # under torchrun: one GPU per process, the questions split between them, rank 0 prints, scores and writes
    rt = setup_runtime(cfg.device, cfg.dtype) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    shard = (rt.rank, rt.world_size) if rt else (0, 1)
    try:
        with user_errors(), contextlib.redirect_stdout(sys.stdout if shard[0] == 0 else io.StringIO()):
            if cfg.data and cfg.data.lower() != "none" and not cfg.prompts:
                load_qa(resolve_data_path(cfg.data))  # bad input fails in a second, before the model loads
            torch.manual_seed(cfg.seed)
            model, ckpt, ckpt_path, tokenizer, device, dtype = load_for_inference(
                cfg.ckpt, cfg.tokenizer, str(rt.device) if rt else cfg.device, cfg.dtype)
            ma = ckpt["model_args"]
            print(f"{ckpt_path}: {ckpt.get('kind', '?')} checkpoint, step {ckpt.get('step')}, {model.num_params():,} "
                  f"parameters (dim {ma['dim']}, {ma['n_layers']} layers, context {ma['max_seq_len']}) | {device} "
                  f"{str(dtype)[6:]}")
            evaluate(cfg, model, ckpt, tokenizer, ckpt_path, device, dtype, progress=shard[0] == 0, shard=shard)
    finally:
        if rt:
            cleanup(rt)


if __name__ == "__main__":
    with ctrl_c():  # one line, exit 130; the report files are written whole or not at all
        main()
