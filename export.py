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
  generation_config.json  eval.py's decoding defaults (greedy, 256 new tokens, stop at </s>)
  tokenizer.json, tokenizer_config.json, tokenizer.model
                          the run's SentencePiece model (ChatGLM2's or train_tokenizer.py's) as a plain `tokenizers`
                          BPE (AutoTokenizer, no remote code): the same ids as chatglm_tokenizer (no <s> added; ChatGLM2's
                          dummy-prefix "▁" on every piece of text, none for our own); tokenizer_config.json carries a
                          chat template that renders template.render's ids
  README.md               a model card: data, steps, val loss, BLEU from eval_report.json beside the checkpoint
--format=gguf also runs llama.cpp's own converter (convert_hf_to_gguf.py) on that folder, once per --gguf_types, into
out_dir/model-<type>.gguf, plus an Ollama Modelfile. It needs `pip install gguf` and the converter script, looked up in this order: --llama_cpp=PATH
(a llama.cpp checkout, or llama-cpp-python's unpacked source: `pip download llama-cpp-python --no-binary :all:
--no-deps` then `tar xzf llama_cpp_python-*.tar.gz`; the script is in vendor/llama.cpp/), $LLAMA_CPP_DIR, ./llama.cpp,
then convert_hf_to_gguf.py on $PATH.
--check (on by default) loads the export back (transformers; llama-cpp-python for the GGUF files when installed) and
prints the largest logit difference against the checkpoint and how many of five greedy continuations are the same.
The checkpoint is read through the loader eval.py and chat.py use (runtime.load_for_inference), the tokenizer as
every script finds it.
Flags are the fields of ExportConfig below (`--key=value`, or --config x.json).
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import List, Optional

import torch

import hf_llama
from chatglm_tokenizer.tokenizer import adds_dummy_prefix
from babyllama.config import config_or_exit
from babyllama.errors import DataError, check, user_errors
from chatglm_tokenizer.template import SEED_CONTINUATIONS, SEED_QUESTIONS, build_prompts
from eval import EvalConfig  # generation_config.json decodes as eval.py does by default
from generate import generate
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
    tokenizer: str = ""  # path to tokenizer.model (else $BABYLLAMA_TOKENIZER, chatglm_tokenizer/, the Hub)
    push_to_hub: str = ""  # OWNER/NAME: upload out_dir to this Hugging Face Hub model repo (needs a token)
    private: bool = False  # create the Hub repo as private
    check: bool = True  # reload the export and compare with the checkpoint: logits and greedy tokens (see check_export)
    check_tokens: int = 32  # new tokens per prompt in that comparison

    def validate(self):
        check(self.format in FORMATS, f"format must be one of {'|'.join(FORMATS)}, got {self.format!r}")
        check(self.dtype in DTYPES, f"dtype must be one of {'|'.join(DTYPES)}, got {self.dtype!r}")
        bad = [t for t in self.gguf_types if t not in GGUF_TYPES]
        check(not bad and self.gguf_types, f"gguf_types must be among {','.join(GGUF_TYPES)}, got {bad or 'none'}")
        check(self.check_tokens > 0, f"check_tokens must be > 0, got {self.check_tokens}")
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
    with open(cfg_path, "w", encoding="utf-8") as f:
        json.dump(cfg, f, ensure_ascii=False, indent=1)
    shutil.copyfile(model_path, os.path.join(out_dir, "tokenizer.model"))  # llama.cpp's converter reads this one


# ----------------------------------------------------------------------------- model card


def _data_summary(data_dir: str, kind: str) -> str:
    """One line about the training data, from data_process.py's sidecars when they are still there."""
    name = os.path.basename(os.path.normpath(data_dir)) or data_dir
    if kind == "sft":
        side = os.path.join(data_dir, "train.json")
        if os.path.isfile(side):
            with open(side, encoding="utf-8") as f:
                s = json.load(f)
            return (f"{s.get('conversations', 0):,} conversations ({s.get('turns', 0):,} turns) from "
                    f"{', '.join(s.get('sources', [])) or 'unknown sources'}")
        return f"conversations of `{name}` (its sidecar was not found at export time)"
    sides = sorted(glob.glob(os.path.join(data_dir, "train_*.json")))
    if sides:
        tokens, docs, sources = 0, 0, set()
        for p in sides:
            with open(p, encoding="utf-8") as f:
                s = json.load(f)
            tokens, docs = tokens + s.get("tokens", 0), docs + s.get("documents", 0)
            sources.update(s.get("sources", []))
        return f"{tokens:,} tokens in {docs:,} documents from {', '.join(sorted(sources)) or 'unknown sources'}"
    return f"tokens of `{name}` (its sidecars were not found at export time)"


def _eval_lines(ckpt_path: str, step: Optional[int]) -> List[str]:
    """Scores of eval_report.json beside the checkpoint, when it was made from this checkpoint's step."""
    path = os.path.join(os.path.dirname(os.path.abspath(ckpt_path)), "eval_report.json")
    if not os.path.isfile(path):
        return ["No eval_report.json beside the checkpoint: run `python eval.py` to score it."]
    with open(path, encoding="utf-8") as f:
        rep = json.load(f)
    if rep.get("step") != step:
        return [f"eval_report.json beside the checkpoint is from step {rep.get('step')}, not {step}: not quoted."]
    sc = rep.get("scores", {})
    fmt = lambda v, d: "n/a" if v is None else f"{v:.{d}f}"
    proto = rep.get("protocol", {})
    return [f"| samples | BLEU-4 | sacreBLEU (zh) | perplexity |", "|---|---|---|---|",
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
        f"{name}'s generation_config.json decodes as the project's eval.py does by default, beam search with 8 beams "
        "without repeating a 3-gram (`num_beams=8`, `no_repeat_ngram_size=3`); pass `num_beams=1` for greedy "
        "decoding, which loops in a model this small without the 3-gram rule, or `do_sample=True` to sample.", "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- formats


def write_hf(cfg: ExportConfig, model, ckpt: dict, ckpt_path: str, tokenizer_path: str) -> List[str]:
    """Writes the Hugging Face folder: every file is complete in a temporary folder before it replaces its old
    version in out_dir. Returns the written paths."""
    from safetensors.torch import save_file

    dtype = getattr(torch, cfg.dtype)
    a = model.args
    project = {"kind": ckpt.get("kind"), "step": ckpt.get("step"), "val_loss": ckpt.get("val_loss"),
               "multiple_of": a.multiple_of, "tokenizer_sha256": ckpt.get("tokenizer_sha256")}
    ev = EvalConfig()
    gen = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "max_new_tokens": ev.max_new_tokens,
           "do_sample": ev.temperature > 0, "repetition_penalty": ev.repetition_penalty,
           # transformers' rule also counts the prompt's n-grams, eval.py's only the answer's: close, not equal
           "no_repeat_ngram_size": ev.no_repeat_ngram}
    if ev.beams > 1:  # eval.py's beam search: transformers ranks finished beams by sum log-prob / length ** penalty too
        gen.update(num_beams=ev.beams, length_penalty=ev.length_penalty, early_stopping=False)
    if ev.temperature > 0:
        gen.update(temperature=ev.temperature, top_k=ev.top_k or None, top_p=ev.top_p)
    os.makedirs(cfg.out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cfg.out_dir, prefix=".export-") as tmp:
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(hf_llama.hf_config(a, dtype, project), f, indent=1)
        with open(os.path.join(tmp, "generation_config.json"), "w", encoding="utf-8") as f:
            json.dump(gen, f, indent=1)
        save_file(hf_llama.to_hf_state(model, dtype), os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        write_tokenizer(tokenizer_path, tmp, a.max_seq_len)
        with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
            f.write(model_card(model, ckpt, ckpt_path, cfg.push_to_hub))
        names = sorted(os.listdir(tmp))
        for name in names:
            os.chmod(os.path.join(tmp, name), 0o644)  # safetensors writes owner-only files; a model folder is shared
            os.replace(os.path.join(tmp, name), os.path.join(cfg.out_dir, name))
    return [os.path.join(cfg.out_dir, n) for n in names]


def find_converter(llama_cpp: str) -> str:
    """Path of llama.cpp's convert_hf_to_gguf.py, by the lookup order in the module docstring."""
    script = "convert_hf_to_gguf.py"
    roots = [llama_cpp] if llama_cpp else [os.environ.get("LLAMA_CPP_DIR", ""), "llama.cpp"]
    for root in filter(None, roots):
        for path in (os.path.join(root, script), os.path.join(root, "vendor", "llama.cpp", script)):
            if os.path.isfile(path):
                return os.path.abspath(path)
    if llama_cpp:
        raise DataError(f"--llama_cpp={llama_cpp}: no {script} there or in its vendor/llama.cpp/")
    on_path = shutil.which(script)
    if on_path:
        return on_path
    raise DataError(f"no {script}: pass --llama_cpp=PATH (a llama.cpp checkout, or llama-cpp-python's source from "
                      f"`pip download llama-cpp-python --no-binary :all: --no-deps`, unpacked)")


def write_gguf(converter: str, hf_dir: str, types: List[str], max_len: int) -> List[str]:
    """Runs llama.cpp's converter on the Hugging Face folder once per type -> model-<type>.gguf paths, and writes an
    Ollama Modelfile for the last of them (the chat template, stop at </s>, chat.py's sampling: llama.cpp has no
    n-gram ban, and greedy answers of a small model loop)."""
    out = []
    for t in types:
        path = os.path.join(hf_dir, f"model-{t}.gguf")
        tmp = path + ".tmp"
        cmd = [sys.executable, converter, hf_dir, "--outtype", t, "--outfile", tmp]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0 or not os.path.isfile(tmp):
            if os.path.exists(tmp):
                os.remove(tmp)
            lines = [ln for ln in (r.stderr or r.stdout).strip().splitlines() if ln.strip()]
            raise DataError(f"{os.path.basename(converter)} --outtype {t} failed: {lines[-1] if lines else r.returncode}")
        os.replace(tmp, path)
        out.append(path)
    modelfile = os.path.join(hf_dir, "Modelfile")  # `ollama create NAME -f Modelfile` in that folder
    with open(modelfile, "w", encoding="utf-8") as f:
        f.write(f"FROM ./{os.path.basename(out[-1])}\nTEMPLATE \"\"\"{OLLAMA_TEMPLATE}\"\"\"\n"
                f"PARAMETER stop \"</s>\"\nPARAMETER temperature 0.7\nPARAMETER top_p 0.9\n"
                f"PARAMETER repeat_penalty 1.1\nPARAMETER num_ctx {max_len}\n")
    return out + [modelfile]


@torch.no_grad()
def check_export(model, kind: str, tokenizer, hf_dir: str, gguf_paths: List[str], new_tokens: int) -> dict:
    """Reloads the export as its users will and compares it with the checkpoint on five prompts (eval.py's prompt
    format): max |logit difference| over prompt + greedy continuation, and whether greedy decoding picks the same
    tokens. transformers always; llama.cpp for each GGUF file when llama-cpp-python is installed."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one line per check, not a loading bar
    prompts, _ = build_prompts(tokenizer, CHECK_PROMPTS[kind], kind, model.args.max_seq_len - new_tokens)
    want = generate(model, prompts, new_tokens, temperature=0.0, eos_id=tokenizer.eos_id)
    rows = [torch.tensor([p + w]) for p, w in zip(prompts, want)]  # (1, T): every position the answers used
    ours = [model(x, x)[0][0] for x in rows]  # (T, vocab) fp32
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    same = 0
    for p, w in zip(prompts, want):
        out = hf.generate(torch.tensor([p]), max_new_tokens=new_tokens, do_sample=False, num_beams=1,
                          no_repeat_ngram_size=0)[0, len(p):].tolist()  # plain greedy on both sides
        same += (out[: out.index(tokenizer.eos_id)] if tokenizer.eos_id in out else out) == w
    diff = max((o - hf(x).logits[0]).abs().max().item() for o, x in zip(ours, rows))
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
        for p, w, x, o in zip(prompts, want, rows, ours):
            llm.reset()
            llm.eval(x[0].tolist())
            diff = max(diff, (o - torch.from_numpy(llm.scores[: x.shape[1]]).float()).abs().max().item())
            got = llama_greedy(llm, p, new_tokens, tokenizer.eos_id)
            same += got == w
            first = first if first is not None else tokenizer.decode(got)
        name = os.path.basename(path)
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


def hub_token() -> str:
    """The Hugging Face token huggingface_hub would use; one-line DataError when there is none or it is offline."""
    try:
        from huggingface_hub import get_token
        from huggingface_hub.constants import HF_HUB_OFFLINE
    except ImportError:
        raise DataError("--push_to_hub needs huggingface_hub: pip install huggingface_hub") from None
    if HF_HUB_OFFLINE:
        raise DataError("--push_to_hub: HF_HUB_OFFLINE is set; unset it to upload")
    token = get_token()
    if not token:
        raise DataError("--push_to_hub: no Hugging Face token; run `huggingface-cli login` or set HF_TOKEN")
    return token


def push(out_dir: str, repo_id: str, private: bool, token: str) -> str:
    """Creates (if needed) and uploads to the Hub model repo -> its URL; any failure -> one-line DataError."""
    from huggingface_hub import HfApi

    try:
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(folder_path=out_dir, repo_id=repo_id, commit_message="Upload baby-llama2-chinese export")
    except Exception as e:  # offline, a bad token, no write access: the first line says which
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"--push_to_hub={repo_id}: {reason[:200]}") from None
    return f"https://huggingface.co/{repo_id}"


def export(cfg: ExportConfig) -> dict:
    """Runs the export -> {"files": {path: bytes}, "check": check_export's dict or None, "url": Hub URL or None}.
    Raises DataError on bad input."""
    token = hub_token() if cfg.push_to_hub else None  # before any work: no token, no half-done upload
    converter = find_converter(cfg.llama_cpp) if cfg.format == "gguf" else None
    model, ckpt, ckpt_path, tokenizer, _, _ = load_for_inference(cfg.ckpt, cfg.tokenizer, "cpu", "float32")
    print(f"export: {ckpt_path} ({ckpt.get('kind')} step {ckpt.get('step')}, {model.num_params():,} parameters) "
          f"-> {cfg.out_dir}")
    paths = write_hf(cfg, model, ckpt, ckpt_path, tokenizer.path)
    if converter:
        paths += write_gguf(converter, cfg.out_dir, cfg.gguf_types, model.args.max_seq_len)
    files = {p: os.path.getsize(p) for p in paths}
    for p, n in files.items():
        print(f"  {os.path.basename(p):28s} {n / 1e6:10.2f} MB")
    checked = None
    if cfg.check:
        checked = check_export(model, ckpt.get("kind", "pretrain"), tokenizer, cfg.out_dir,
                               [p for p in paths if p.endswith(".gguf")], cfg.check_tokens)
    url = push(cfg.out_dir, cfg.push_to_hub, cfg.private, token) if cfg.push_to_hub else None
    if url:
        print(f"uploaded to {url}")
    return {"files": files, "check": checked, "url": url}


def main(argv=None) -> dict:
    cfg = config_or_exit(ExportConfig, argv)
    with user_errors(FileNotFoundError):
        return export(cfg)


if __name__ == "__main__":
    main()
