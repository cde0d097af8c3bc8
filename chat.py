"""Talk to a trained model in the terminal: answers stream token by token, earlier turns stay in context.

    python chat.py                                   # out/sft (best.pt, else last.pt), GPU if there is one
    python chat.py --ckpt=out/sft/last.pt --temperature=0 --max_new_tokens=128
    python chat.py --device=cpu --system="你是一名医生。"
    python chat.py --ckpt=hf:out/hf                 # a Hugging Face Llama folder (export.py's, or one from the Hub)
    python chat.py --beams=4                        # beam search: whole answers, not streamed
    python chat.py --beams=8 --beam_prefix=8        # beam search after 8 sampled tokens: a different answer each time
    python chat.py --candidates=8 --rerank=mbr      # 8 sampled answers, the one most like the others shown (rerank.py)
    python chat.py --beams=8 --beam_prefix=8 --candidates=4 --rerank=pool   # eval.py's decoding: the answer most like
                                                    # doctors' answers to like questions (--answer_pool, data/sft)
    printf '你好\n感冒了怎么办？\n' | python chat.py --device=cpu    # not a terminal: one question per line

Commands: /reset forgets the conversation, /quit (or Ctrl-D) leaves; Ctrl-C stops an answer mid-way (at the
prompt it only clears the line).
History: every prompt is the SFT template of the earlier turns plus the new question (chatglm_tokenizer/template.py);
when it would not leave max_new_tokens of room in the model's context, the oldest turns are dropped.
A pretrain checkpoint has no chat template: it continues each line as text, with no history.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Iterable, Iterator, List, Optional, TextIO, Tuple

from babyllama.errors import quiet_ctrl_c_until_main  # light: no torch

if __name__ == "__main__":
    quiet_ctrl_c_until_main()  # torch's import takes seconds: a Ctrl-C during it is one line, exit 130

import torch

from babyllama.config import config_or_exit, repair_text
from babyllama.errors import check, ctrl_c, user_errors
from chatglm_tokenizer import template
from beam import beam_search
from generate import Sampling, stream
from rerank import AnswerPool, generate_best, pool_fallback
from babyllama.runtime import autocast_context, device_problem
from generate import load_for_inference


@dataclass
class ChatConfig(Sampling):  # + top_k, no_repeat_ngram, beams, length_penalty, candidates, rerank (generate.Sampling); samples by default, unlike eval.py
    ckpt: str = "out/sft"  # checkpoint file, or a run dir (best.pt preferred, else last.pt), or hf:FOLDER (export.py's)
    system: str = ""  # optional system text put before the first question (as in SFT data with "system")
    max_new_tokens: int = 256  # longest answer (at most half the context if it would not fit); the history gets the rest
    temperature: float = 0.7  # 0 = greedy
    top_p: float = 0.9  # nucleus sampling mass; 1.0 = off
    repetition_penalty: float = 1.1  # > 1 discourages repeating tokens already in the conversation
    seed: int = 1337  # seeds sampling
    device: str = "auto"  # auto = cuda > mps > cpu
    dtype: str = "auto"  # auto = bfloat16 on cuda (float16 where bf16 is missing), float32 elsewhere
    tokenizer: str = ""  # path to tokenizer.model (else the model's own: an hf: folder's, the one a checkpoint was trained with; then $BABYLLAMA_TOKENIZER, chatglm_tokenizer/, the Hub)
    answer_pool: str = "data/sft/train.jsonl"  # --rerank=pool: the SFT conversations whose answers it agrees with
    pool_bias: float = 0.5  # --rerank=pool with --beams > 1: the beams lean towards the words those answers share (as eval.py); 0 = off

    def validate(self):
        if self.beams > 1 and not self.beam_prefix:  # --beams=K alone: deterministic, the sampling defaults step aside
            given = getattr(self, "_explicit", frozenset())
            for name, off in (("temperature", 0.0), ("top_k", 0), ("top_p", 1.0), ("repetition_penalty", 1.0)):
                if name not in given:
                    setattr(self, name, off)
        super().validate()
        check(self.dtype in ("auto", "bfloat16", "float16", "float32"), f"dtype must be auto|bfloat16|float16|float32, got {self.dtype!r}")
        check(device_problem(self.device) is None, device_problem(self.device) or "")


def fit_history(tokenizer, history: List[dict], question: str, system: Optional[str], max_len: int,
                render_prompt=None) -> Tuple[List[dict], List[int]]:
    """Drops the oldest complete turns until the prompt fits max_len tokens -> (kept history, prompt ids).

    `history` alternates {"role": "user"} / {"role": "assistant"} messages; a turn is one pair. If the question
    alone is too long, its prompt keeps its last max_len tokens (so it still ends with the <bos> the answer follows)."""
    render_prompt = render_prompt or template.render_prompt
    kept = list(history)
    while True:
        ids = render_prompt(tokenizer, kept, question, system=system or None)
        if len(ids) <= max_len or not kept:
            break
        kept = kept[2:]
    return kept, template.fit_prompt(ids, max_len)


def stream_text(tokens: Iterable[int], tokenizer, out: TextIO) -> str:
    """Writes the text of `tokens` to `out` as it grows; returns the whole text.

    Decoding the growing id list (not token by token) keeps multi-byte characters whole: a partial character
    (byte-fallback tokens of an unfinished UTF-8 sequence) decodes to U+FFFD, so the text from there on is held
    back until it completes. Bytes that never make a character (an answer cut mid-character) are left out."""
    ids: List[int] = []
    shown = ""
    try:
        for tok in tokens:
            ids.append(tok)
            text = tokenizer.decode(ids)
            if not text.startswith(shown):
                continue
            new = text[len(shown):].split("\ufffd")[0]  # up to the first unfinished character
            if new:
                out.write(new)
                out.flush()
                shown += new
    except KeyboardInterrupt:  # Ctrl-C stops this answer, not the chat
        out.write(" [stopped]")
    text = tokenizer.decode(ids).replace("\ufffd", "")
    if text.startswith(shown) and len(text) > len(shown):
        out.write(text[len(shown):])
    out.write("\n")
    out.flush()
    return text.strip()


def read_lines(interactive: bool, prompt: str = "你> ") -> Iterator[str]:
    """Questions from the terminal (with a prompt) or from piped stdin, one per line; ends at EOF/Ctrl-D."""
    if interactive:
        # line editing for input(): without readline, arrow keys land in the question as "^[[D" and
        # backspace over a wide (CJK) character erases only half of it on screen
        try:
            import readline  # noqa: F401
        except ImportError:  # Windows has no readline; input() still works
            pass
    if hasattr(sys.stdin, "reconfigure"):  # bytes that are not UTF-8 reach repair_text instead of raising
        sys.stdin.reconfigure(errors="surrogateescape")
    warned = False
    while True:
        try:
            line = input(prompt) if interactive else sys.stdin.readline()
        except EOFError:
            print()
            return
        except KeyboardInterrupt:  # at the prompt: drop the line, keep the chat (a Ctrl-C meant to stop an
            print()  # answer often lands just after it ended); /quit or Ctrl-D leaves
            if not interactive:
                return
            continue
        line, replaced = repair_text(line)
        if replaced and not warned:
            print("note: input bytes that are not UTF-8 were replaced with \ufffd", file=sys.stderr)
            warned = True
        if not interactive:
            if not line:
                return
            line = line.rstrip("\n")
            if line.strip():
                print(f"{prompt}{line}")  # echo, so a piped transcript reads like a conversation
        yield line


def chat_loop(model, tokenizer, kind: str, cfg: ChatConfig, lines: Iterable[str], max_seq_len: int,
              device: torch.device, dtype: torch.dtype, out: Optional[TextIO] = None, render_prompt=None) -> List[dict]:
    """Answers each line, keeping the conversation, into `out` (None: sys.stdout as it is when called); returns the
    history at the end."""
    out = out or sys.stdout
    history: List[dict] = []
    budget = max_seq_len - cfg.max_new_tokens  # prompt tokens that leave room for a full answer
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    pool = AnswerPool.from_file(cfg.answer_pool, tokenizer.encode_batch) \
        if cfg.candidates > 1 and cfg.rerank == "pool" else None
    for line in lines:
        question = line.strip()
        if not question:
            continue
        if question in ("/quit", "/exit", "/q"):
            break
        if question == "/reset":
            history = []
            out.write("(history cleared)\n")
            continue
        if kind == "sft":
            history, ids = fit_history(tokenizer, history, question, cfg.system, budget, render_prompt)
        else:
            ids = tokenizer.encode(question)[-budget:]
        out.write("模型> ")
        out.flush()
        with torch.no_grad(), autocast_context(device, dtype):
            if cfg.candidates > 1:  # K sampled (or beams after K sampled starts), one kept: printed whole (rerank.py)
                tokens = iter(generate_best(model, [ids], cfg, decode=tokenizer.decode, eos_id=tokenizer.eos_id,
                                            generator=gen, pool=pool)[0])
            elif cfg.beams > 1:  # beam search knows its answer only at the end: printed whole, not streamed
                tokens = iter(beam_search(model, [ids], cfg, eos_id=tokenizer.eos_id, generator=gen)[0])
            else:
                tokens = stream(model, ids, cfg, eos_id=tokenizer.eos_id, generator=gen)
            answer = stream_text(tokens, tokenizer, out)
        if not answer:  # an undertrained model often picks <eos> first; say so instead of showing a blank line
            hint = "; try sampling, e.g. --temperature=0.7" if cfg.temperature == 0 and cfg.beams == 1 else ""
            out.write(f"(empty answer: the model ended it at once{hint})\n")
        if kind == "sft":
            history = history + [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return history


def main() -> None:
    cfg = config_or_exit(ChatConfig)
    with user_errors():
        model, ckpt, ckpt_path, tokenizer, device, dtype = load_for_inference(cfg.ckpt, cfg.tokenizer, cfg.device,
                                                                              cfg.dtype)
        max_seq_len = ckpt["model_args"]["max_seq_len"]
        for note in (cfg.fit_context(max_seq_len), pool_fallback(cfg, cfg.answer_pool)):  # fit: e.g. the default 256 on a small demo
            if note:  # model: answers get half the context
                print(note)
    kind = ckpt.get("kind", "pretrain")
    interactive = sys.stdin.isatty()
    print(f"{ckpt_path}: {kind} model, step {ckpt.get('step')}, {model.num_params():,} parameters, context "
          f"{max_seq_len} tokens | {device} {str(dtype)[6:]}")
    if kind != "sft":
        print("note: a pretrain checkpoint has no chat template; each line is continued as text, without history")
    if interactive:
        print("/reset forgets the conversation, /quit or Ctrl-D leaves, Ctrl-C stops an answer")
    chat_loop(model, tokenizer, kind, cfg, read_lines(interactive), max_seq_len, device, dtype)


if __name__ == "__main__":
    with ctrl_c():  # one line, exit 130 (a Ctrl-C in the chat itself stops an answer or drops a line)
        main()
