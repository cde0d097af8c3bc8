"""ChatGLM2 tokenizer over sentencepiece, with the ids the baby-llama2-chinese design uses.

ids: <unk>=0 (also the pad id), <s>=1 (<bos>, the separator between prompt and answer in SFT),
</s>=2 (<eos>, closes every document and every answer). The SentencePiece model has 64,789
pieces; ChatGLM2 appends five specials after them ([MASK], [gMASK], [sMASK], sop, eop =
64789..64793). The model's design vocab is 64,793 (the seed's number): our data never contains
the specials, and data_process.py checks that every id is < VOCAB_SIZE, so all ids fit uint16.

Where tokenizer.model comes from, first match wins:
  1. an explicit path (`--tokenizer PATH` of every script),
  2. the environment variable BABYLLAMA_TOKENIZER,
  3. chatglm_tokenizer/tokenizer.model beside this file (git-ignored),
  4. a download of tokenizer.model from the Hugging Face Hub (repo THUDM/chatglm2-6b) into 3.
"""
from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from typing import Iterable, List, Optional

TOKENIZER_ENV = "BABYLLAMA_TOKENIZER"
HF_REPO, HF_FILE = "THUDM/chatglm2-6b", "tokenizer.model"
LOCAL_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tokenizer.model")
VOCAB_SIZE = 64793
SPECIAL_TOKENS = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"]


def find_tokenizer(path: Optional[str] = None, download: bool = True) -> str:
    """Returns the path of tokenizer.model by the lookup order above; one-line error if none.
    download=False skips step 4 (for callers that only want the file's hash when it is at hand)."""
    if path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--tokenizer {path}: no such file")
        return path
    env = os.environ.get(TOKENIZER_ENV)
    if env:
        if not os.path.isfile(env):
            raise FileNotFoundError(f"{TOKENIZER_ENV}={env}: no such file")
        return env
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


def hub_download(repo_id: str, filename: str, repo_type: Optional[str] = None, local_dir: Optional[str] = None) -> str:
    """Local path of `filename` of a Hugging Face Hub repo (the tokenizer's, or a dataset's for data_process.py),
    downloaded if needed. Any failure (offline, no such file, huggingface_hub missing) -> OSError whose message is
    the first line of the cause, for one-line errors."""
    offline = False
    try:
        from huggingface_hub import hf_hub_download

        offline = not hub_reachable()  # the Hub's client retries for about 25 s before it gives up
        cache_only = {"local_files_only": True} if offline else {}
        return hf_hub_download(repo_id, filename, repo_type=repo_type, local_dir=local_dir, **cache_only)
    except Exception as e:
        if offline and "local" in str(e).lower():
            e = OSError(f"cannot reach {hub_host()} (offline?) and no copy in the Hugging Face cache")
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if len(reason) > 160:  # the Hub's messages run long: keep whole sentences
            end = reason.rfind(". ", 0, 160)
            reason = reason[:end + 1] if end > 0 else reason[:160] + "..."
        raise OSError(reason) from None


def hub_host() -> str:
    from urllib.parse import urlparse
    return urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"


def hub_reachable(timeout: float = 3.0) -> bool:
    """A TCP connection to the Hub within `timeout` s. Behind a proxy (HTTPS_PROXY, ALL_PROXY) the client's own
    requests decide: assumed reachable."""
    import socket

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    try:
        socket.create_connection((hub_host(), 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@lru_cache(maxsize=8)
def tokenizer_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class ChatGLMTokenizer:
    pad_id, bos_id, eos_id = 0, 1, 2
    vocab_size = VOCAB_SIZE

    def __init__(self, model_path: str):
        from sentencepiece import SentencePieceProcessor

        self.path = model_path
        self.sp = SentencePieceProcessor(model_file=model_path)
        self.n_pieces = self.sp.vocab_size()
        assert (self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id()) == (0, 1, 2), "not a ChatGLM2 model"
        self.special_ids = {tok: self.n_pieces + i for i, tok in enumerate(SPECIAL_TOKENS)}

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

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(i)


def load_tokenizer(path: Optional[str] = None) -> ChatGLMTokenizer:
    return ChatGLMTokenizer(find_tokenizer(path))
