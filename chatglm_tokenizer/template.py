"""The chat template of baby-llama2-chinese, prompts rendered and fitted to a context, and the original prompts.

Template (the original project's `prompt <bos> answer <eos>`, continued turn after turn; `render` is the only
implementation, and sft.py, eval.py and chat.py all go through it):

    [encode(system + "\\n")]  encode(q1) <bos> encode(a1) <eos>  encode(q2) <bos> encode(a2) <eos> ...
     not supervised          not supervised   supervised         not supervised   supervised

Every piece is encoded on its own (sentencepiece puts its "▁" in front of each). Worked example with the
ChatGLM2 tokenizer (<bos>=1, <eos>=2), system "你是医生", then q1 "你好", a1 "您好", q2 "头疼", a2 "多休息":

    pieces     ▁ 你是 医生 <0x0A> | ▁你 好 | <s> | ▁ 您好 | </s> | ▁ 头疼 | <s> | ▁多 休息 | </s>
    ids        30910 34607 32718 13     | 36474 54591 | 1 | 30910 48214 | 2 | 30910 46317 | 1 | 40636 33503 | 2
    supervised F     F     F     F      | F     F     | F | T     T     | T | F     F     | F | T     T     | T

`render_prompt(tok, history, question, system)` gives the same ids up to and including the <bos> after
the question (what a chat turn feeds to generate()).

A prompt longer than the context keeps its end (fit_prompt): for a chat prompt that is the question's end and the
<bos> the answer follows. eval.py, chat.py, beam.py and export.py fit prompts only through it.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

from babyllama.errors import DataError

# the original project's own prompts: questions for an SFT model, openings to continue for a pretrain model
SEED_QUESTIONS = ["最近我在办公室坐久了会感到头晕，请问这是什么原因?有什么缓解办法吗？", "前列腺囊肿的症状是什么？",
                  "请问，世界上最大的动物是什么？"]
SEED_CONTINUATIONS = ["床前明月光，疑是地上霜。举头望明月，", "请你讲一个童话故事：", "《小王子》是一本畅销童话书，它讲述了："]


def fit_prompt(ids: Sequence[int], max_len: int) -> List[int]:
    """The last max(max_len, 1) ids of a prompt (all of them when they fit)."""
    ids = list(ids)
    return ids[len(ids) - max(max_len, 1):] if len(ids) > max_len else ids


PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


def check_conversation(conversation, system=None) -> Optional[str]:
    """None if `conversation` follows the contract, else a short reason."""
    if not isinstance(conversation, list) or not conversation:
        return "expected a non-empty list of turns"
    if len(conversation) % 2:
        return f"expected user/assistant pairs, got {len(conversation)} turns (must end with assistant)"
    for i, turn in enumerate(conversation):
        want = "user" if i % 2 == 0 else "assistant"
        if not isinstance(turn, dict) or turn.get("role") != want:
            return f"turn {i}: expected role {want!r}"
        if not isinstance(turn.get("content"), str):
            return f"turn {i}: expected a string content"
    if system is not None and not isinstance(system, str):
        return "expected system to be a string"
    return None


def template_texts(conversation, system) -> List[str]:
    """The pieces encoded separately: [system + "\\n"] (if any), then every turn's content in order."""
    return ([system + "\n"] if system else []) + [t["content"] for t in conversation]


def assemble(pieces: Sequence[Sequence[int]], has_system: bool, bos_id: int = BOS_ID,
              eos_id: int = EOS_ID) -> Tuple[List[int], List[bool]]:
    """Encoded pieces (from `template_texts`) -> (ids, supervised): the template itself, in one place."""
    ids: List[int] = []
    sup: List[bool] = []
    if has_system:
        ids += pieces[0]
        sup += [False] * len(pieces[0])
        pieces = pieces[1:]
    for i in range(0, len(pieces), 2):
        q, a = pieces[i], pieces[i + 1]
        ids += list(q) + [bos_id] + list(a) + [eos_id]
        sup += [False] * (len(q) + 1) + [True] * (len(a) + 1)
    return ids, sup


def render(tokenizer, conversation, system: Optional[str] = None) -> Tuple[List[int], List[bool]]:
    """A whole conversation -> (ids, supervised); supervised is True on answer tokens and their <eos>."""
    reason = check_conversation(conversation, system)
    if reason:
        raise DataError(f"render: {reason}")
    pieces = tokenizer.encode_batch(template_texts(conversation, system))
    return assemble(pieces, bool(system), tokenizer.bos_id, tokenizer.eos_id)


def render_prompt(tokenizer, history, question: str, system: Optional[str] = None,
                  max_len: Optional[int] = None) -> List[int]:
    """ids of `history` (complete earlier turns) + question + <bos>: the input that generate() answers.

    Equals render(history + [question, answer])[0] up to and including the question's <bos>. If max_len is
    given, the oldest turns go first (the system text stays), then the start of the rest is cut, as in training.
    """
    conversation = list(history) + [{"role": "user", "content": question}, {"role": "assistant", "content": ""}]
    reason = check_conversation(conversation, system)
    if reason:
        raise DataError(f"render_prompt: {reason}")
    pieces = tokenizer.encode_batch(template_texts(conversation, system))
    n_sys = len(pieces[0]) if system else 0
    turns = pieces[1:] if system else pieces
    # turn i as ids: q <bos> a <eos>; the last one is just q <bos> (its answer is what we generate)
    blocks = [list(turns[i]) + [tokenizer.bos_id] + list(turns[i + 1]) + [tokenizer.eos_id]
              for i in range(0, len(turns) - 2, 2)] + [list(turns[-2]) + [tokenizer.bos_id]]
    sys_ids = list(pieces[0]) if system else []
    if max_len is not None:
        while len(blocks) > 1 and n_sys + sum(map(len, blocks)) > max_len:
            blocks.pop(0)
    ids = sys_ids + [i for b in blocks for i in b]
    return fit_prompt(ids, max_len) if max_len is not None else ids


def build_prompts(tokenizer, questions: Sequence[str], kind: str, max_len: int) -> tuple:
    """Token prompts for `questions` -> (prompts, number cut to max_len).

    SFT: the training template's prompt (question then <bos>); pretrain: the raw text to continue."""
    prompts, cut = [], 0
    for q in questions:
        ids = render_prompt(tokenizer, [], q, max_len=max_len) if kind == "sft" else tokenizer.encode(q)
        cut += len(ids) > max_len
        prompts.append(fit_prompt(ids, max_len))
    return prompts, cut
