"""The SentencePiece tokenizer of baby-llama2-chinese: ChatGLM2's, or one trained by train_tokenizer.py.

ids: <unk>=0 (also the pad id), <s>=1 (<bos>, the separator between prompt and answer in SFT),
</s>=2 (<eos>, closes every document and every answer). Any tokenizer.model with these three ids works.

The vocab size follows the model file. ChatGLM2's SentencePiece model has 64,789 pieces; ChatGLM2 appends five
specials after them ([MASK], [gMASK], [sMASK], sop, eop = 64789..64793), and its design vocab is 64,793 (the
original project's number): our data never contains the specials. A tokenizer of our own (train_tokenizer.py) has no specials beyond
its pieces: its vocab size is its piece count (at most 65,535). data_process.py checks that every id is
< vocab_size, so all ids fit uint16.

Where tokenizer.model comes from, first match wins (each path may be the file or a folder holding tokenizer.model):
  1. an explicit path (`--tokenizer PATH` of every script),
  2. the environment variable BABYLLAMA_TOKENIZER,
  3. chatglm_tokenizer/tokenizer.model beside this file (git-ignored),
  4. a download of tokenizer.model from the Hugging Face Hub (repo THUDM/chatglm2-6b) into 3.
Between 1 and 2 the later stages try what the stage before recorded, where that file is still at hand with the same
sha256 (recorded_tokenizer): pretrain.py the shards' --tokenizer, sft.py, eval.py, chat.py and export.py the
checkpoint's (or an hf: folder's tokenizer.model).
"""
from __future__ import annotations

import hashlib
import math
import os
from functools import lru_cache
from typing import Iterable, List, Optional

import numpy as np

from babyllama.errors import DataError, first_line
from babyllama.hub import hub_download

TOKENIZER_ENV = "BABYLLAMA_TOKENIZER"
HF_REPO, HF_FILE = "THUDM/chatglm2-6b", "tokenizer.model"
LOCAL_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tokenizer.model")
MODEL_FILE = "tokenizer.model"  # the file's name inside a tokenizer folder (train_tokenizer.py writes one)
VOCAB_SIZE = 64793  # ChatGLM2's design vocab
CHATGLM_PIECES = 64789  # pieces of ChatGLM2's SentencePiece model: such a model gets VOCAB_SIZE and SPECIAL_TOKENS
SPECIAL_TOKENS = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"]


def _model_file(path: str, what: str) -> str:
    """`path` if it is a file, `path`/tokenizer.model if it is a folder holding one; one-line error otherwise."""
    if os.path.isdir(path):
        inner = os.path.join(path, MODEL_FILE)
        if not os.path.isfile(inner):
            raise FileNotFoundError(f"{what}: folder without a {MODEL_FILE} (train one with train_tokenizer.py)")
        return inner
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: no such file or folder")
    return path


def find_tokenizer(path: Optional[str] = None, download: bool = True) -> str:
    """Returns the path of tokenizer.model by the lookup order above; one-line error if none.
    download=False skips step 4 (for callers that only want the file's hash when it is at hand)."""
    if path:
        return _model_file(path, f"--tokenizer {path}")
    env = os.environ.get(TOKENIZER_ENV)
    if env:
        return _model_file(env, f"{TOKENIZER_ENV}={env}")
    if os.path.isfile(LOCAL_PATH):
        return LOCAL_PATH
    if not download:
        raise FileNotFoundError(f"no tokenizer.model (--tokenizer, ${TOKENIZER_ENV}, {LOCAL_PATH})")
    try:
        return hub_download(HF_REPO, HF_FILE, local_dir=os.path.dirname(LOCAL_PATH))
    except OSError as e:  # one line naming every way out
        raise FileNotFoundError(
            "no ChatGLM2 tokenizer.model: pass --tokenizer PATH, or set "
            f"{TOKENIZER_ENV}=PATH, or put it at {LOCAL_PATH} "
            f"(download from {HF_REPO} failed: {e})"
        ) from None


def recorded_tokenizer(path, sha256) -> str:
    """The tokenizer.model a run recorded (its --tokenizer: a file or a folder holding one), if it is still here with
    the sha256 the run recorded; else "". Scripts that open a checkpoint take it before the lookup above when no
    --tokenizer is given: a file that changed since is never taken."""
    if not (isinstance(path, str) and path and sha256):
        return ""
    try:
        found = _model_file(path, path)
        return found if tokenizer_sha256(found) == sha256 else ""
    except OSError:  # gone, unreadable, or a folder without a tokenizer.model
        return ""


@lru_cache(maxsize=8)
def tokenizer_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class ChatGLMTokenizer:
    """ChatGLM2's tokenizer.model or one of train_tokenizer.py's (a file, or a folder holding tokenizer.model)."""
    pad_id, bos_id, eos_id = 0, 1, 2

    def __init__(self, model_path: str):
        from sentencepiece import SentencePieceProcessor

        self.path = _model_file(model_path, model_path)
        try:
            self.sp = SentencePieceProcessor(model_file=self.path)
        except (OSError, RuntimeError) as e:  # not a SentencePiece model: one line, as for other bad input
            raise DataError(f"{self.path}: not a SentencePiece tokenizer.model ({first_line(e)})") from None
        self.n_pieces = self.sp.vocab_size()
        ids = (self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id())
        if ids != (0, 1, 2):
            raise DataError(f"{self.path}: expected <unk>=0 <s>=1 </s>=2, got ids {ids} (train_tokenizer.py sets them)")
        if self.n_pieces == CHATGLM_PIECES:  # ChatGLM2: five specials after the pieces, the design vocab 64,793
            self.vocab_size = VOCAB_SIZE
            self.special_ids = {tok: self.n_pieces + i for i, tok in enumerate(SPECIAL_TOKENS)}
        else:  # our own: every id is a piece
            self.vocab_size = self.n_pieces
            self.special_ids = {}

    @property
    def sha256(self) -> str:
        return tokenizer_sha256(self.path)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> List[int]:
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: Iterable[str], num_threads: int = -1) -> List[List[int]]:
        """Encodes many texts at once on sentencepiece's own C++ threads (-1: all cores)."""
        return self.sp.encode(list(texts), num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        # ids past the SentencePiece pieces (ChatGLM specials, padded embedding rows) have no text
        return self.sp.decode([int(i) for i in ids if 0 <= int(i) < self.n_pieces])

    def count_bytes(self, ids: Iterable[int]) -> int:
        """UTF-8 bytes of the text `ids` decode to: the denominator of bits_per_byte."""
        return len(self.decode(ids).encode("utf-8"))

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(i)


def adds_dummy_prefix(sp) -> bool:
    """Whether a SentencePieceProcessor puts "▁" in front of every text (ChatGLM2's does; train_tokenizer.py's
    does not): "a" alone then encodes as "▁a"."""
    return sp.id_to_piece(sp.encode("a")[0]).startswith("\u2581")


class TokenBytes:
    """UTF-8 bytes of the text that target ids stand for, without decoding: the denominator of bits_per_byte.

    table[id] is the bytes of piece `id` inside a text: "▁" (SentencePiece's space mark) is a space (1 byte), a
    byte-fallback piece <0xNN> is 1 byte, <unk>/<s>/</s>, ChatGLM2's specials and ids past the pieces are 0. A
    tokenizer with a dummy prefix (ChatGLM2's adds "▁" in front of every text it encodes, and decode drops it again)
    puts one space into the first piece of every document that the text does not have: a target right after <eos>
    or <s> (where documents and answers start) whose piece begins with "▁" counts one byte less. The count of a whole
    document then equals ChatGLMTokenizer.count_bytes of its ids."""

    def __init__(self, tok: "ChatGLMTokenizer"):
        sp = tok.sp
        self.sha256, self.starts = tok.sha256, (tok.eos_id, tok.bos_id)
        self.table = np.zeros(65536, dtype=np.int64)  # every id a uint16 shard can hold
        lead = np.zeros(65536, dtype=bool)  # the piece starts with "▁"
        for i in range(tok.n_pieces):
            if sp.is_byte(i):
                self.table[i] = 1
            elif not (sp.is_control(i) or sp.is_unknown(i)):
                piece = sp.id_to_piece(i)
                self.table[i], lead[i] = len(piece.replace("\u2581", " ").encode("utf-8")), piece.startswith("\u2581")
        self.first_less = lead.astype(np.int64) if adds_dummy_prefix(sp) else None

    def count(self, x, y) -> int:
        """x, y: (..., T) input and target ids (y[t] follows x[t]; -1 = no target) -> bytes of y's text."""
        x, y = np.asarray(x, dtype=np.int64), np.asarray(y, dtype=np.int64)
        keep = y >= 0
        n = int(np.take(self.table, y[keep]).sum())
        if self.first_less is not None:  # document starts: the dummy prefix's space is not text
            start = keep & np.isin(x, self.starts)
            n -= int(np.take(self.first_less, y[start]).sum())
        return n


def load_tokenizer(path: Optional[str] = None) -> ChatGLMTokenizer:
    return ChatGLMTokenizer(find_tokenizer(path))


def bits_per_byte(total_nats: float, n_bytes: int) -> float:
    """Loss that compares across tokenizers: total cross-entropy in nats (summed over the predicted tokens, not
    averaged) over the UTF-8 bytes of the text those tokens decode to, in bits: total_nats / ln 2 / n_bytes.
    A loss per token depends on how much text a token holds; per byte it does not."""
    if n_bytes <= 0:
        raise ValueError(f"bits per byte needs a positive byte count, got {n_bytes}")
    return total_nats / math.log(2) / n_bytes
