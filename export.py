"""Take a trained model out of this repo: a Hugging Face Llama folder, GGUF files for llama.cpp / Ollama, the Hub.

    python export.py --ckpt=out/sft --out_dir=out/hf                 # transformers / vLLM folder (the default format)
    python export.py --ckpt=out/sft --out_dir=out/hf --format=gguf --llama_cpp=PATH   # + model-f16.gguf, model-q8_0.gguf
    python export.py --ckpt=out/sft --out_dir=out/hf --push_to_hub=OWNER/NAME         # + upload (huggingface-cli login)
    python export.py --ckpt=out/pretrain --out_dir=out/hf_base --dtype=bfloat16       # half the size on disk

--format=hf writes into out_dir:
  config.json             LlamaForCausalLM with model.py's shape: its vocab (ChatGLM2: 64,793; padded rows dropped),
                          SwiGLU width, RMSNorm eps, rope theta 10000, tied embeddings; q/k rows permuted from model.py's
                          interleaved rotary pairs to transformers' rotate_half layout (hf_llama.py), same logits
  model.safetensors       the weights (--dtype; float32 keeps the checkpoint exact)
  generation_config.json  eval.py's plain beam search (8 beams, no repeated 3-grams, 256 new tokens, stop at </s>)
  tokenizer.json, tokenizer_config.json, tokenizer.model
                          the run's SentencePiece model (ChatGLM2's or train_tokenizer.py's) as a plain `tokenizers`
                          BPE (AutoTokenizer, no remote code): the same ids as chatglm_tokenizer (no <s> added; ChatGLM2's
                          dummy-prefix "▁" on every piece of text, none for our own); tokenizer_config.json carries a
                          chat template that renders template.render's ids
  README.md               a model card: data, steps, val loss, BLEU from eval_report.json beside the checkpoint
--format=gguf also runs llama.cpp's own converter (convert_hf_to_gguf.py) on that folder, once per --gguf_types, into
out_dir/model-<type>.gguf, plus an Ollama Modelfile. It needs `pip install gguf` and the converter script, looked up in this order: --llama_cpp=PATH
(a llama.cpp checkout, or llama-cpp-python's unpacked source: `pip download llama-cpp-python --no-binary :all:
--no-deps` then `tar xzf llama_cpp_python-*.tar.gz`; the script is in vendor/llama.cpp/), $LLAMA_CPP_DIR, then
convert_hf_to_gguf.py in a folder of $PATH given as an absolute path (never the working directory); it runs for at
most --convert_timeout seconds.
--check (on by default) loads the export back (transformers; llama-cpp-python for the GGUF files when installed) and
prints the largest logit difference against the checkpoint and how many of five greedy continuations are the same;
logits that are not finite stop the export.
The folder is out_dir's alone: it is built beside it (<parent>/.<name>.new), checked, then swapped in whole with a
manifest.json listing its files (babyllama/output_dir.py), so a kill at any moment leaves the old or the new export;
a folder holding files export.py did not write is replaced only with --overwrite. --push_to_hub uploads exactly the
files of the manifest. A checkpoint with non-finite weights is refused before anything is written.
The checkpoint is read through the loader eval.py and chat.py use (generate.load_for_inference), the tokenizer as
every script finds it.
Flags are the fields of ExportConfig below (`--key=value`, or --config x.json).
"""
from __future__ import annotations

import glob
import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from typing import List, Optional

from babyllama.errors import quiet_ctrl_c_until_main  # light: no torch

if __name__ == "__main__":
    quiet_ctrl_c_until_main()  # torch's import takes seconds: a Ctrl-C during it is one line, exit 130

import torch

import hf_llama
from chatglm_tokenizer.tokenizer import adds_dummy_prefix
from babyllama.children import kill_with_parent
from babyllama.config import config_or_exit
from babyllama.errors import DataError, check, ctrl_c, user_errors
from babyllama.fileio import write_atomic, write_json
from babyllama.hub import hub_token, upload_files
from babyllama.output_dir import MANIFEST, OutputFolder, read_manifest
from chatglm_tokenizer.template import SEED_CONTINUATIONS, SEED_QUESTIONS, build_prompts
from generate import EVAL_BEAMS, Sampling, generate  # generation_config.json decodes as eval.py does by default
from generate import load_for_inference  # the project's one way to open a checkpoint

FORMATS = ("hf", "gguf")
# --check's prompts: eval.py's original-project prompts and two more, five in all
CHECK_PROMPTS = {"sft": SEED_QUESTIONS + ["高血压患者平时应该注意什么？", "请用一句话介绍长城。"],
                 "pretrain": SEED_CONTINUATIONS + ["中华人民共和国刑法第一条规定，", "感冒的常见症状包括"]}
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
DTYPES = ("float32", "bfloat16", "float16")
# template.render as Jinja: [system + "\n"] q1 <s> a1 </s> q2 <s> ... The tokenizer puts the dummy-prefix "▁" in
# front of every stretch of text between special tokens, as render encodes every piece on its own; the " " after the
# system text's "\n" becomes the "▁" that starts the first question's own encoding.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(turns=messages) -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] -%}{{ messages[0]['content'] + '\\n ' }}{%- endif -%}"
    "{%- set ns.turns = messages[1:] -%}"
    "{%- endif -%}"
    "{%- for message in ns.turns -%}"
    "{%- if message['role'] != ('user' if loop.index0 % 2 == 0 else 'assistant') -%}"
    "{{ raise_exception('turns must alternate user/assistant, user first (one optional system message first)') }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}{{ message['content'] + bos_token }}"
    "{%- else -%}{{ message['content'] + eos_token }}{%- endif -%}"
    "{%- endfor -%}"
)


# the chat template in Ollama's Go template syntax, for the Modelfile written beside the GGUF files
OLLAMA_TEMPLATE = ('{{ if .System }}{{ .System }}\n {{ end }}{{ range .Messages }}{{ if eq .Role "user" }}{{ .Content }}<s>'
                   '{{ else if eq .Role "assistant" }}{{ .Content }}</s>{{ end }}{{ end }}')


@dataclass
class ExportConfig:
    ckpt: str = "out/sft"  # checkpoint file, or a run dir (best.pt preferred, else last.pt)
    out_dir: str = "out/hf"  # the Hugging Face folder (GGUF files go into it too)
    format: str = "hf"  # hf: the Hugging Face folder | gguf: that folder plus model-<type>.gguf for llama.cpp / Ollama
    dtype: str = "float32"  # weights in model.safetensors: float32 (exact) | bfloat16 | float16
    gguf_types: List[str] = field(default_factory=lambda: ["f16", "q8_0"])  # converter --outtype, one file each
    llama_cpp: str = ""  # folder holding convert_hf_to_gguf.py (see the docstring); "" = look it up
    tokenizer: str = ""  # path to tokenizer.model (else the one the checkpoint was trained with, where at hand; then $BABYLLAMA_TOKENIZER, chatglm_tokenizer/, the Hub)
    push_to_hub: str = ""  # OWNER/NAME: upload the export's files (its manifest) to this Hub model repo (needs a token)
    private: bool = False  # create the Hub repo as private
    check: bool = True  # reload the export and compare with the checkpoint: logits and greedy tokens (see check_export)
    check_tokens: int = 32  # new tokens per prompt in that comparison
    overwrite: bool = False  # replace an out_dir holding files export.py did not write (they are deleted)
    convert_timeout: int = 1800  # seconds llama.cpp's converter may run per GGUF file before it is stopped

    def validate(self):
        check(self.format in FORMATS, f"format must be one of {'|'.join(FORMATS)}, got {self.format!r}")
        check(self.dtype in DTYPES, f"dtype must be one of {'|'.join(DTYPES)}, got {self.dtype!r}")
        bad = [t for t in self.gguf_types if t not in GGUF_TYPES]
        check(not bad and self.gguf_types, f"gguf_types must be among {','.join(GGUF_TYPES)}, got {bad or 'none'}")
        check(len(set(self.gguf_types)) == len(self.gguf_types), f"gguf_types names a type twice: {self.gguf_types}")
        check(self.check_tokens > 0, f"check_tokens must be > 0, got {self.check_tokens}")
        check(self.convert_timeout > 0, f"convert_timeout must be > 0 seconds, got {self.convert_timeout}")
        check(not self.push_to_hub or self.push_to_hub.count("/") == 1,
              f"push_to_hub must be OWNER/NAME, got {self.push_to_hub!r}")


# ----------------------------------------------------------------------------- tokenizer


def bpe_merges(pieces: List[str], skip: set) -> List[tuple]:
    """BPE merges of a SentencePiece BPE vocabulary: every split of a piece into two pieces, in piece id order.

    SentencePiece merges the pair whose result has the highest score, and its ids are sorted by score, so the
    id order is the merge priority (transformers' own converter orders them the same way)."""
    vocab = {p: i for i, p in enumerate(pieces)}
    merges = []
    for piece in pieces:
        if piece in skip:
            continue
        merges += [(piece[:k], piece[k:]) for k in range(1, len(piece))
                   if piece[:k] in vocab and piece[k:] in vocab and piece[:k] not in skip and piece[k:] not in skip]
    return merges


def build_tokenizer(model_path: str):
    """A transformers fast tokenizer over a SentencePiece BPE model (ChatGLM2's or train_tokenizer.py's): the same ids
    as chatglm_tokenizer.

    BPE with byte fallback; the normalizer does SentencePiece's whitespace escaping, plus add_dummy_prefix for a model
    that has one (ChatGLM2's; train_tokenizer.py's keeps the text as it is). It runs on
    every stretch of text between special tokens (a pre-tokenizer's "prepend" would skip text that already starts
    with a space, which SentencePiece does not)."""
    from sentencepiece import SentencePieceProcessor
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    sp = SentencePieceProcessor(model_file=model_path)
    pieces = [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    special = [i for i in range(sp.vocab_size()) if sp.is_control(i) or sp.is_unknown(i)]
    skip = {pieces[i] for i in range(sp.vocab_size()) if sp.is_byte(i) or i in special}
    vocab = {p: i for i, p in enumerate(pieces)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=bpe_merges(pieces, skip), unk_token=pieces[sp.unk_id()],
                               fuse_unk=True, byte_fallback=True))
    if adds_dummy_prefix(sp):  # ChatGLM2's: "▁" in front of every text, dropped again when decoding
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(content=" ", left=1, right=0)])
    else:  # train_tokenizer.py's: the text as it is, spaces escaped
        tok.normalizer = normalizers.Replace(" ", "▁")
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(pieces[i], special=True, normalized=False) for i in special])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token=pieces[sp.unk_id()], bos_token=pieces[sp.bos_id()],
        eos_token=pieces[sp.eos_id()], pad_token=pieces[sp.unk_id()],  # <unk>=0 is the pad id, as in training
        chat_template=CHAT_TEMPLATE, clean_up_tokenization_spaces=False, padding_side="left")


def write_tokenizer(model_path: str, out_dir: str, max_len: int) -> None:
    """tokenizer.json + tokenizer_config.json (with the chat template) + the original tokenizer.model."""
    tok = build_tokenizer(model_path)
    tok.model_max_length = max_len
    tok.save_pretrained(out_dir)
    cfg_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    # no <s> in front of encoded text (pretraining never saw one there); llama.cpp's converter reads these two keys,
    # and its SentencePiece default would add <s>
    cfg.update(tokenizer_class="PreTrainedTokenizerFast", add_bos_token=False, add_eos_token=False)
    from sentencepiece import SentencePieceProcessor
    if not adds_dummy_prefix(SentencePieceProcessor(model_file=model_path)):
        cfg["add_prefix_space"] = False  # our own tokenizers: llama.cpp's converter would otherwise add a space in front
    chat_file = os.path.join(out_dir, "chat_template.jinja")
    if os.path.isfile(chat_file):  # transformers >= 4.5x saves the template beside; older ones read only the config
        os.remove(chat_file)
    cfg["chat_template"] = CHAT_TEMPLATE
    write_json(cfg_path, cfg)
    with open(model_path, "rb") as f:  # llama.cpp's converter reads this one
        write_atomic(os.path.join(out_dir, "tokenizer.model"), f.read())


# ----------------------------------------------------------------------------- model card


def _json_object(path: str) -> Optional[dict]:
    """A JSON object file beside the checkpoint or its data (sidecar, eval report), or None when it is missing or
    unreadable: the model card then says so instead of quoting it."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _data_summary(data_dir: str, kind: str) -> str:
    """One line about the training data, from data_process.py's sidecars when they are still there."""
    name = os.path.basename(os.path.normpath(data_dir)) or data_dir
    if kind == "sft":
        s = _json_object(os.path.join(data_dir, "train.json"))
        if s is not None:
            return (f"{s.get('conversations', 0):,} conversations ({s.get('turns', 0):,} turns) from "
                    f"{', '.join(s.get('sources', [])) or 'unknown sources'}")
        return f"conversations of `{name}` (its sidecar was not found at export time)"
    sides = [_json_object(p) for p in sorted(glob.glob(os.path.join(data_dir, "train_*.json")))]
    if sides and None not in sides:
        tokens, docs, sources = 0, 0, set()
        for s in sides:
            tokens, docs = tokens + s.get("tokens", 0), docs + s.get("documents", 0)
            sources.update(s.get("sources", []))
        return f"{tokens:,} tokens in {docs:,} documents from {', '.join(sorted(sources)) or 'unknown sources'}"
    return f"tokens of `{name}` (its sidecars were not found at export time)"


def _eval_lines(ckpt_path: str, step: Optional[int]) -> List[str]:
    """Scores of eval_report.json beside the checkpoint, when it was made from this checkpoint's step."""
    rep = _json_object(os.path.join(os.path.dirname(os.path.abspath(ckpt_path)), "eval_report.json"))
    if rep is None:
        return ["No eval_report.json beside the checkpoint: run `python eval.py` to score it."]
    if rep.get("step") != step:
        return [f"eval_report.json beside the checkpoint is from step {rep.get('step')}, not {step}: not quoted."]
    sc, proto = [rep.get(k) if isinstance(rep.get(k), dict) else {} for k in ("scores", "protocol")]
    fmt = lambda v, d: f"{v:.{d}f}" if isinstance(v, (int, float)) else "n/a"
    return ["| samples | BLEU-4 | sacreBLEU (zh) | perplexity |", "|---|---|---|---|",
            f"| {rep.get('samples')} of `{os.path.basename(rep.get('data') or '?')}` | {fmt(sc.get('bleu4'), 2)} | "
            f"{fmt(sc.get('sacrebleu_zh'), 2)} | {fmt(sc.get('ppl'), 1)} |", "",
            f"Decoding: {proto.get('decoding', '?')}. BLEU-4: {proto.get('bleu4', '?')}."]


def model_card(model, ckpt: dict, ckpt_path: str, repo_id: str) -> str:
    a, cfg = model.args, ckpt.get("config", {})
    kind, step = ckpt.get("kind", "pretrain"), ckpt.get("step")
    val = ckpt.get("val_loss")
    name = repo_id or "this folder"
    usage = ("msgs = [{\"role\": \"user\", \"content\": \"前列腺囊肿的症状是什么？\"}]\n"
             "ids = tok.apply_chat_template(msgs, return_tensors=\"pt\", return_dict=True)[\"input_ids\"]"
             if kind == "sft" else "ids = tok(\"床前明月光，\", return_tensors=\"pt\").input_ids")
    lines = [
        "---", "language: zh", "library_name: transformers", "pipeline_tag: text-generation",
        "tags: [llama, baby-llama2-chinese]", "---", "",
        f"# baby-llama2-chinese ({'chat, SFT' if kind == 'sft' else 'base, pretrained'})", "",
        f"A {model.num_params() / 1e6:.1f}M-parameter Llama 2 trained from scratch on Chinese text with "
        f"baby-llama2-chinese: {a.n_layers} layers, width {a.dim}, {a.n_heads} heads ({a.kv_heads} key/value), "
        f"SwiGLU {a.hidden_dim}, context {a.max_seq_len} tokens, the ChatGLM2 tokenizer (64,793 ids), tied embeddings.",
        "", "## Training", "",
        f"- stage: {kind}, {step} optimizer steps" + (f" from `{cfg.get('init_from')}`" if kind == "sft" else ""),
        f"- data: {_data_summary(cfg.get('data_dir', '?'), kind)}",
        f"- validation loss at this checkpoint: {'n/a' if val is None else f'{val:.4f}'}"
        + (f" (best {ckpt['best_val_loss']:.4f})" if ckpt.get("best_val_loss") is not None else ""),
        f"- batch {cfg.get('batch_size', '?')} rows x {a.max_seq_len} tokens, peak LR {cfg.get('learning_rate', '?')}",
        "", "## Evaluation", "", *_eval_lines(ckpt_path, step), "",
        "## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f"tok = AutoTokenizer.from_pretrained(\"{repo_id or 'PATH'}\")",
        f"model = AutoModelForCausalLM.from_pretrained(\"{repo_id or 'PATH'}\")", usage,
        "out = model.generate(ids, max_new_tokens=128)",
        "print(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))", "```", "",
        "Prompt format (the chat template): `[system + \"\\n\"] question <s> answer </s> question <s> ...`; the model "
        "answers after `<s>` and stops at `</s>`. The tokenizer adds no `<s>` in front of text, as in training.",
        f"{name}'s generation_config.json decodes as the project's eval.py does with `--beam_prefix=0`, beam search "
        "with 8 beams without repeating a 3-gram (`num_beams=8`, `no_repeat_ngram_size=3`); pass `num_beams=1` for greedy "
        "decoding, which loops in a model this small without the 3-gram rule, or `do_sample=True` to sample.", "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- formats


def check_finite(model, ckpt_path: str) -> None:
    """One-line DataError when a weight of the checkpoint is NaN or infinite: a diverged model is never exported."""
    for name, t in model.state_dict().items():
        bad = int((~torch.isfinite(t)).sum()) if t.is_floating_point() else 0
        if bad:
            raise DataError(f"{ckpt_path}: {bad:,} weights of {name} are not finite (NaN or inf): a diverged "
                            "checkpoint; export another one (the run's best.pt, or one of an earlier run)")


def write_hf(cfg: ExportConfig, model, ckpt: dict, ckpt_path: str, tokenizer_path: str, folder: str) -> List[str]:
    """Writes the Hugging Face files into `folder` (the new export, built aside: OutputFolder) -> their names."""
    from safetensors.torch import save

    dtype = getattr(torch, cfg.dtype)
    a = model.args
    project = {"kind": ckpt.get("kind"), "step": ckpt.get("step"), "val_loss": ckpt.get("val_loss"),
               "multiple_of": a.multiple_of, "tokenizer_sha256": ckpt.get("tokenizer_sha256")}
    ev = Sampling(beams=EVAL_BEAMS)  # eval.py's plain beam search (its default adds sampled starts, which transformers lacks)
    gen = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "max_new_tokens": ev.max_new_tokens,
           "do_sample": ev.temperature > 0, "repetition_penalty": ev.repetition_penalty,
           # transformers' rule also counts the prompt's n-grams, eval.py's only the answer's: close, not equal
           "no_repeat_ngram_size": ev.no_repeat_ngram}
    if ev.beams > 1:  # eval.py's beam search: transformers ranks finished beams by sum log-prob / length ** penalty too
        gen.update(num_beams=ev.beams, length_penalty=ev.length_penalty, early_stopping=False)
    if ev.temperature > 0:
        gen.update(temperature=ev.temperature, top_k=ev.top_k or None, top_p=ev.top_p)
    write_json(os.path.join(folder, "config.json"), hf_llama.hf_config(a, dtype, project))
    write_json(os.path.join(folder, "generation_config.json"), gen)
    weights = save(hf_llama.to_hf_state(model, dtype), metadata={"format": "pt"})
    write_atomic(os.path.join(folder, "model.safetensors"), weights)
    write_tokenizer(tokenizer_path, folder, a.max_seq_len)
    write_atomic(os.path.join(folder, "README.md"), model_card(model, ckpt, ckpt_path, cfg.push_to_hub))
    names = sorted(os.listdir(folder))  # the folder is new and private: exactly what was written above
    for name in names:
        os.chmod(os.path.join(folder, name), 0o644)  # transformers may write owner-only files; a model folder is shared
    return names


def find_converter(llama_cpp: str) -> str:
    """Path of llama.cpp's convert_hf_to_gguf.py, by the lookup order in the module docstring: only where the user
    pointed (--llama_cpp, $LLAMA_CPP_DIR, absolute $PATH folders), never the working directory."""
    script = "convert_hf_to_gguf.py"
    root = llama_cpp or os.environ.get("LLAMA_CPP_DIR", "")
    if root:
        for path in (os.path.join(root, script), os.path.join(root, "vendor", "llama.cpp", script)):
            if os.path.isfile(path):
                return os.path.abspath(path)
        flag = "--llama_cpp" if llama_cpp else "$LLAMA_CPP_DIR"
        raise DataError(f"{flag}={root}: no {script} there or in its vendor/llama.cpp/")
    folders = [d for d in os.environ.get("PATH", "").split(os.pathsep) if os.path.isabs(d)]  # not "" or "."
    on_path = shutil.which(script, path=os.pathsep.join(folders)) if folders else None
    if on_path:
        return on_path
    raise DataError(f"no {script}: pass --llama_cpp=PATH (a llama.cpp checkout, or llama-cpp-python's source from "
                    f"`pip download llama-cpp-python --no-binary :all: --no-deps`, unpacked)")


def write_gguf(converter: str, folder: str, types: List[str], max_len: int, timeout: int) -> List[str]:
    """Runs llama.cpp's converter on the Hugging Face files in `folder` once per type (at most `timeout` seconds
    each) -> names of model-<type>.gguf and of an Ollama Modelfile for the last of them (the chat template, stop at
    </s>, chat.py's sampling: llama.cpp has no n-gram ban, and greedy answers of a small model loop)."""
    out = []
    for t in types:
        name = f"model-{t}.gguf"
        cmd = [sys.executable, converter, folder, "--outtype", t, "--outfile", os.path.join(folder, name)]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                               preexec_fn=kill_with_parent)  # a killed export leaves no converter running
        except subprocess.TimeoutExpired:
            raise DataError(f"{converter} --outtype {t}: still running after {timeout} s (--convert_timeout); "
                            "stopped") from None
        if r.returncode != 0 or not os.path.isfile(os.path.join(folder, name)):
            lines = [ln for ln in (r.stderr or r.stdout).strip().splitlines() if ln.strip()]
            raise DataError(f"{os.path.basename(converter)} --outtype {t} failed: {lines[-1] if lines else r.returncode}")
        os.chmod(os.path.join(folder, name), 0o644)
        out.append(name)
    # `ollama create NAME -f Modelfile` in that folder
    write_atomic(os.path.join(folder, "Modelfile"),
                 f"FROM ./{out[-1]}\nTEMPLATE \"\"\"{OLLAMA_TEMPLATE}\"\"\"\n"
                 f"PARAMETER stop \"</s>\"\nPARAMETER temperature 0.7\nPARAMETER top_p 0.9\n"
                 f"PARAMETER repeat_penalty 1.1\nPARAMETER num_ctx {max_len}\n")
    return out + ["Modelfile"]


def max_abs_diff(pairs) -> float:
    """max |a - b| over pairs of logit tensors; NaN as soon as one value is not finite, so a broken export never
    reads as a small difference (max() over NaN depends on the order)."""
    worst = 0.0
    for a, b in pairs:
        d = (a.float() - b.float()).abs()
        if not bool(torch.isfinite(d).all()):
            return math.nan
        worst = max(worst, d.max().item())
    return worst


def finite_or_stop(diff: float, what: str) -> None:
    if not math.isfinite(diff):
        raise DataError(f"check: {what} gives logits that are not finite (NaN or inf) where they should match the "
                        "checkpoint's: the export is broken (try --dtype=float32); the old export is unchanged")


@torch.no_grad()
def check_export(model, kind: str, tokenizer, hf_dir: str, gguf_paths: List[str], new_tokens: int) -> dict:
    """Reloads the export as its users will and compares it with the checkpoint on five prompts (eval.py's prompt
    format): max |logit difference| over prompt + greedy continuation, and whether greedy decoding picks the same
    tokens. transformers always; llama.cpp for each GGUF file when llama-cpp-python is installed. Logits that are not
    finite are a DataError (finite_or_stop): never printed as a match."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one line per check, not a loading bar
    prompts, _ = build_prompts(tokenizer, CHECK_PROMPTS[kind], kind, model.args.max_seq_len - new_tokens)
    want = generate(model, prompts, Sampling(max_new_tokens=new_tokens, no_repeat_ngram=0), eos_id=tokenizer.eos_id)
    rows = [torch.tensor([p + w]) for p, w in zip(prompts, want)]  # (1, T): every position the answers used
    ours = [model(x, x)[0][0] for x in rows]  # (T, vocab) fp32
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    same = 0
    for p, w in zip(prompts, want):
        out = hf.generate(torch.tensor([p]), max_new_tokens=new_tokens, do_sample=False, num_beams=1,
                          no_repeat_ngram_size=0)[0, len(p):].tolist()  # plain greedy on both sides
        same += (out[: out.index(tokenizer.eos_id)] if tokenizer.eos_id in out else out) == w
    diff = max_abs_diff((o, hf(x).logits[0]) for o, x in zip(ours, rows))
    finite_or_stop(diff, "transformers")
    result = {"transformers": {"max_abs_logit_diff": diff, "greedy_equal": same, "prompts": len(prompts)}}
    print(f"check: transformers (fp32) max |logit diff| {diff:.2e}; greedy {new_tokens} tokens equal on "
          f"{same}/{len(prompts)} prompts")
    try:
        import llama_cpp
    except ImportError:
        if gguf_paths:
            print("check: llama.cpp skipped (pip install llama-cpp-python to run the GGUF files here)")
        return result
    for path in gguf_paths:
        llm = llama_cpp.Llama(model_path=path, n_ctx=model.args.max_seq_len, logits_all=True, verbose=False)
        same, diff, first = 0, 0.0, None
        name = os.path.basename(path)
        for p, w, x, o in zip(prompts, want, rows, ours):
            llm.reset()
            llm.eval(x[0].tolist())
            diff = max(diff, max_abs_diff([(o, torch.from_numpy(llm.scores[: x.shape[1]]))]))
            finite_or_stop(diff, f"llama.cpp {name}")
            got = llama_greedy(llm, p, new_tokens, tokenizer.eos_id)
            same += got == w
            first = first if first is not None else tokenizer.decode(got)
        result[name] = {"max_abs_logit_diff": diff, "greedy_equal": same, "prompts": len(prompts), "answer_0": first}
        print(f"check: llama.cpp {name} max |logit diff| {diff:.2e}; greedy equal on {same}/{len(prompts)} prompts; "
              f"{CHECK_PROMPTS[kind][0]!r} -> {first!r}")
    return result


def llama_greedy(llm, ids: List[int], max_new_tokens: int, eos_id: int) -> List[int]:
    """Greedy new tokens of a llama_cpp.Llama after prompt ids, eos excluded (llama.cpp's sampler with every knob off)."""
    got: List[int] = []
    for t in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        if t == eos_id or len(got) == max_new_tokens:
            break
        got.append(t)
    return got


def export(cfg: ExportConfig) -> dict:
    """Runs the export -> {"files": {path: bytes}, "check": check_export's dict or None, "url": Hub URL or None}.
    Raises DataError on bad input, before out_dir is touched where it can be told beforehand."""
    token = hub_token() if cfg.push_to_hub else None  # before any work: no token, no half-done upload
    converter = find_converter(cfg.llama_cpp) if cfg.format == "gguf" else None
    model, ckpt, ckpt_path, tokenizer, _, _ = load_for_inference(cfg.ckpt, cfg.tokenizer, "cpu", "float32")
    check_finite(model, ckpt_path)
    out = OutputFolder(cfg.out_dir, "export", [ckpt_path], cfg.overwrite, script="export.py", leftovers=(".export-",))
    print(f"export: {ckpt_path} ({ckpt.get('kind')} step {ckpt.get('step')}, {model.num_params():,} parameters) "
          f"-> {cfg.out_dir}")
    ok, checked = False, None
    try:
        names = write_hf(cfg, model, ckpt, ckpt_path, tokenizer.path, out.new)
        if converter:
            names += write_gguf(converter, out.new, cfg.gguf_types, model.args.max_seq_len, cfg.convert_timeout)
        for n in names:
            print(f"  {n:28s} {os.path.getsize(out.path(n)) / 1e6:10.2f} MB")
        if cfg.check:  # on the new folder, before it replaces the old one: a broken export replaces nothing
            checked = check_export(model, ckpt.get("kind", "pretrain"), tokenizer, out.new,
                                   [out.path(n) for n in names if n.endswith(".gguf")], cfg.check_tokens)
        paths = out.commit(names)
        ok = True
    except OSError as e:  # a full disk: the old export stays
        raise DataError(f"{e.filename or cfg.out_dir}: {e.strerror or e}; the old export in {cfg.out_dir} is "
                        "unchanged") from None
    finally:
        if not ok:
            out.abort()
    url = None
    if cfg.push_to_hub:  # exactly the files the manifest lists (not the manifest: it names local paths)
        listed = [n for n in (read_manifest(cfg.out_dir) or {}).get("files", []) if n != MANIFEST]
        url = upload_files(cfg.out_dir, listed, cfg.push_to_hub, cfg.private, token)
        print(f"uploaded {len(listed)} files to {url}")
    return {"files": {p: os.path.getsize(p) for p in paths}, "check": checked, "url": url}


def main(argv=None) -> dict:
    cfg = config_or_exit(ExportConfig, argv)
    with user_errors(FileNotFoundError):
        return export(cfg)


if __name__ == "__main__":
    with ctrl_c():  # one line, exit 130: the output folder's unfinished copy is already removed
        main()
