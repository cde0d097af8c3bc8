"""Teacher-forced scores of given answers: how likely the model finds an answer after its prompt, no decoding.

Library module, no command line (eval.py reports reference_bpb; rerank.py ranks sampled candidates by likelihood):
  import scoring
  nats = scoring.answer_nats(model, [[5, 6, 1]], [[7, 8, 2]], 32, "cpu", torch.float32)   # -log p(7 8 2 | 5 6 1)
  info = scoring.reference_bpb(model, tokenizer, ["头痛怎么办？"], ["注意休息。"], 32, "cpu", torch.float32)

reference_bpb is a score of the SFT model that no decoding choice changes: bits per UTF-8 byte of the reference answers
given their questions. Each (question, answer) is rendered with the SFT template (chatglm_tokenizer/template.render:
question <bos> answer <eos>), the loss is taken on the answer tokens and their <eos> only (the tokens SFT supervises),
and bits per byte = total nats / ln 2 / UTF-8 bytes of the answers (chatglm_tokenizer.bits_per_byte). A conversation
longer than the context keeps the question's end (at least half the context) and the answer's start; the bytes are
those of the answer tokens actually scored.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F

from babyllama.runtime import autocast_context
from chatglm_tokenizer import bits_per_byte
from chatglm_tokenizer.template import fit_prompt, render

LOGIT_ROWS = 4096  # answer positions whose logits exist at a time: memory independent of vocab x batch


@torch.no_grad()
def answer_nats(model, prompts: Sequence[List[int]], answers: Sequence[List[int]], batch_size: int, device,
                dtype: torch.dtype) -> List[float]:
    """-sum log p(answer tokens | prompt, earlier answer tokens) in nats for each (prompt, answer) pair.

    Every answer token is a target (put <eos> at its end to score the answer's ending). Rows are batched by length
    and right-padded (a causal model never looks right, so padding changes nothing before it); only the answer
    positions get logits, LOGIT_ROWS at a time, under autocast as eval.py's perplexity. Needs
    len(prompt) + len(answer) - 1 <= max_seq_len and at least one token in each."""
    if len(prompts) != len(answers):
        raise ValueError(f"answer_nats: {len(prompts)} prompts but {len(answers)} answers")
    longest = max((len(p) + len(a) - 1 for p, a in zip(prompts, answers)), default=0)
    if any(not p or not a for p, a in zip(prompts, answers)) or longest > model.args.max_seq_len:
        raise ValueError(f"answer_nats: need a prompt and an answer of 1+ tokens each, {longest} <= "
                         f"{model.args.max_seq_len} tokens together")
    device = torch.device(device)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(answers[i]))
    nats = [0.0] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            T = max(len(prompts[i]) + len(answers[i]) - 1 for i in idx)
            x = torch.zeros(len(idx), T, dtype=torch.long)  # (B, T) inputs, right-padded with id 0
            y = torch.full((len(idx), T), -1, dtype=torch.long)  # (B, T) targets: the answer tokens, else -1
            for row, i in enumerate(idx):
                seq = prompts[i] + answers[i]
                x[row, :len(seq) - 1] = torch.tensor(seq[:-1])
                y[row, len(prompts[i]) - 1:len(seq) - 1] = torch.tensor(answers[i])
            x, y = x.to(device), y.to(device)
            with autocast_context(device, dtype):
                h = model.hidden(x)  # (B, T, dim)
            rows, cols = (y != -1).nonzero(as_tuple=True)  # (N,) each: the answer positions
            total = torch.zeros(len(idx), dtype=torch.float32, device=device)
            for s in range(0, rows.numel(), LOGIT_ROWS):
                r, c = rows[s:s + LOGIT_ROWS], cols[s:s + LOGIT_ROWS]
                with autocast_context(device, dtype):
                    logits = model.logits(h[r, c])  # (n, vocab_size)
                total.index_add_(0, r, F.cross_entropy(logits.float(), y[r, c], reduction="none"))
            for row, i in enumerate(idx):
                nats[i] = float(total[row])
    finally:
        model.train(was_training)
    return nats


def fit_pair(prompt: List[int], answer: List[int], max_len: int) -> tuple:
    """(prompt, answer) cut to max_len tokens together: the prompt keeps its end, down to max_len // 2 tokens, to
    leave the answer room; then the answer keeps its start -> (prompt, answer, whether anything was cut)."""
    if len(prompt) + len(answer) <= max_len:
        return prompt, answer, False
    prompt = fit_prompt(prompt, max(max_len - len(answer), max_len // 2))
    return prompt, answer[:max_len - len(prompt)], True


def reference_bpb(model, tokenizer, questions: Sequence[str], references: Sequence[str], batch_size: int, device,
                  dtype: torch.dtype) -> dict:
    """Bits per byte of the reference answers given their questions (see the module docstring) -> {"bits_per_byte",
    "nats", "bytes", "tokens", "answers", "cut"} (bits_per_byte None when the answers have no bytes)."""
    prompts, answers, n_bytes, cut = [], [], 0, 0
    for q, a in zip(questions, references):
        ids, supervised = render(tokenizer, [{"role": "user", "content": q}, {"role": "assistant", "content": a}])
        first = supervised.index(True)  # the first answer token (or the <eos> of an empty answer)
        p, ans, was_cut = fit_pair(ids[:first], ids[first:], model.args.max_seq_len + 1)
        prompts.append(p), answers.append(ans)
        cut += was_cut
        n_bytes += len(tokenizer.decode([t for t in ans if t != tokenizer.eos_id]).encode("utf-8"))
    total = sum(answer_nats(model, prompts, answers, batch_size, device, dtype))
    return {"bits_per_byte": bits_per_byte(total, n_bytes) if n_bytes > 0 else None, "nats": total,
            "bytes": n_bytes, "tokens": sum(map(len, answers)), "answers": len(answers), "cut": cut}
