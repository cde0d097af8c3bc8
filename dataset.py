"""Pretraining batches from a data_process.py output directory.

A directory holds shards `train_00000.bin, train_00001.bin, ...` and `val_00000.bin, ...`: raw uint16
token ids, every document followed by <eos>, each with a `.json` sidecar (dtype, vocab, tokenizer hash,
token count). All shards of a split are read through np.memmap, so memory does not grow with the corpus.

A split is cut into windows of seq_len + 1 tokens, window k starting at token k * seq_len of its shard
(consecutive windows share one token, so every token is a target once). Training order: the g-th sample
of the run is window perm_e[g mod W] with e = g // W the epoch and perm_e a permutation seeded by
(seed, e). Optimizer step s, micro-step m and rank r of R read samples

    g = s * (B * R * A) + (m * R + r) * B + b,   b = 0..B-1   (B micro-batch, A grad-accum steps)

so the data is a function of (seed, step) alone: a resumed run reads exactly what it would have read,
and R ranks with A accumulation steps read the same samples as R*A micro-steps on one process.
"""
from __future__ import annotations

import glob
import json
import os
from typing import List, Optional, Tuple

import numpy as np
import torch

from babyllama.checkpoint import check_same_tokenizer
from babyllama.errors import DataError

FORMAT = "baby-llama2-chinese/tokens-v1"
ONE_TOKENIZER = "shards of one run come from one tokenizer (rerun data_process.py into an empty folder)"


def read_sidecar(bin_path: str) -> dict:
    side_path = os.path.splitext(bin_path)[0] + ".json"
    try:
        with open(side_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{side_path}: missing or unreadable sidecar ({e}); rerun data_process.py") from None
    return meta


def find_shards(data_dir: str, split: str) -> List[str]:
    shards = sorted(glob.glob(os.path.join(data_dir, f"{split}_*.bin")))
    if not shards:
        raise DataError(f"{data_dir}: no {split}_*.bin shards; run `python data_process.py` first")
    return shards


def recorded_data_tokenizer(data_dir: str) -> Tuple[str, Optional[str]]:
    """(the --tokenizer data_process.py was given, its sha256) as the first train shard's sidecar records them; ("",
    None) when it records none or cannot be read (data_tokenizer reports a bad folder)."""
    try:
        meta = read_sidecar(find_shards(data_dir, "train")[0])
    except DataError:
        return "", None
    path = meta.get("tokenizer")
    return (path if isinstance(path, str) else ""), meta.get("tokenizer_sha256")


def data_tokenizer(data_dir: str) -> Tuple[Optional[str], Optional[int]]:
    """(tokenizer_sha256, vocab_size) that every train_*/val_* sidecar in data_dir names (sha None: synthetic ids).
    Shards that disagree (two tokenizers, or two vocabulary sizes) are a DataError naming both files."""
    first = None  # (path, tokenizer_sha256, vocab_size) of the first shard
    for path in find_shards(data_dir, "train") + find_shards(data_dir, "val"):
        meta = read_sidecar(path)
        sha, vocab = meta.get("tokenizer_sha256"), meta.get("vocab_size")
        first = first or (path, sha, vocab)
        check_same_tokenizer(path, sha, first[1], f"{first[0]}'s tokenizer", unnamed_ok=False, advice=ONE_TOKENIZER)
        if vocab != first[2]:
            raise DataError(f"{path}: vocab_size {vocab}, but {first[0]} has vocab_size {first[2]}: {ONE_TOKENIZER}")
    return first[1], first[2]


def check_ids(path: str, ids: np.ndarray, vocab_size: int, chunk: int = 1 << 26) -> None:
    """DataError naming the shard, the position and the id when a token id is >= vocab_size: a damaged file or
    another tokenizer's ids would otherwise index past the embedding at the step that reads it (an IndexError, or
    a device-side assert on a GPU), or train silently on a padding row. One pass over the shard, in chunks."""
    for start in range(0, len(ids), chunk):
        part = ids[start:start + chunk]
        if part.size and int(part.max()) >= vocab_size:
            pos = start + int(np.argmax(part >= vocab_size))
            raise DataError(f"{path}: token {pos:,} is id {int(ids[pos])}, outside the model's vocabulary "
                            f"[0, {vocab_size}) (another tokenizer's ids, or a damaged file); rerun data_process.py")


class PretrainData:
    """Random windows over every shard of one split; `batch(step, micro_step)` is the trainer's interface."""

    def __init__(self, data_dir: str, split: str, seq_len: int, batch_size: int, *, seed: int = 0,
                 rank: int = 0, world_size: int = 1, grad_accum: int = 1, vocab_size: Optional[int] = None,
                 tokenizer_sha256: Optional[str] = None):
        self.data_dir, self.split, self.seq_len, self.batch_size = data_dir, split, seq_len, batch_size
        self.seed, self.rank, self.world_size, self.grad_accum = seed, rank, world_size, grad_accum
        self.shards, self.tokens = find_shards(data_dir, split), []
        self.maps, counts, first = [], [], None  # first: (path, tokenizer_sha256) of the split's first shard
        for path in self.shards:
            meta = read_sidecar(path)
            sha = meta.get("tokenizer_sha256")
            first = first or (path, sha)
            check_same_tokenizer(path, sha, first[1], f"{first[0]}'s tokenizer", unnamed_ok=False, advice=ONE_TOKENIZER)
            check_same_tokenizer(path, sha, tokenizer_sha256)  # the run's tokenizer (eval.py: the one it decodes with)
            problems = []
            if meta.get("dtype") != "uint16":
                problems.append(f"dtype {meta.get('dtype')!r}, expected 'uint16'")
            if vocab_size is not None and not isinstance(meta.get("vocab_size"), int):
                problems.append(f"vocab_size {meta.get('vocab_size')!r}, expected an integer")
            elif vocab_size is not None and meta["vocab_size"] > vocab_size:  # a larger model vocab is padding
                problems.append(f"vocab_size {meta['vocab_size']}, the model has only {vocab_size}")
            n = os.path.getsize(path) // 2
            if meta.get("tokens") not in (None, n):
                problems.append(f"sidecar says {meta.get('tokens')} tokens, file holds {n} (truncated copy?)")
            if problems:
                raise DataError(f"{path}: " + "; ".join(problems))
            if n < seq_len + 1:
                continue  # too short for one window; counted in the summary, not an error
            self.maps.append(np.memmap(path, dtype=np.uint16, mode="r"))
            if vocab_size is not None:
                check_ids(path, self.maps[-1], vocab_size)
            self.tokens.append(n)
            counts.append((n - 1) // seq_len)
        if not counts:
            raise DataError(f"{data_dir}: {split} split has fewer than {seq_len + 1} tokens in every shard; "
                             f"lower max_seq_len or add data")
        self.tokenizer_sha256 = first[1]  # the shards' common tokenizer hash (None: synthetic ids)
        self.window_offsets = np.cumsum([0] + counts)  # window k of the split lives in shard searchsorted(k)
        self.n_windows = int(self.window_offsets[-1])
        self._perm_epoch, self._perm = -1, None

    def describe(self) -> str:
        return (f"{self.split}: {len(self.maps)} shard(s), {sum(self.tokens):,} tokens, "
                f"{self.n_windows:,} windows of {self.seq_len + 1}")

    def epoch_steps(self) -> float:
        """Optimizer steps in one pass over the split (every window once)."""
        return self.n_windows / (self.batch_size * self.world_size * self.grad_accum)

    def window(self, k: int) -> np.ndarray:
        """Window k of the split in file order: (seq_len + 1,) int64."""
        shard = int(np.searchsorted(self.window_offsets, k, side="right") - 1)
        start = (k - int(self.window_offsets[shard])) * self.seq_len
        return self.maps[shard][start:start + self.seq_len + 1].astype(np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:  # one permutation in memory at a time: 4 bytes a window
            rng = np.random.default_rng([self.seed, epoch])
            self._perm = rng.permutation(self.n_windows).astype(np.int64)
            self._perm_epoch = epoch
        return self._perm

    def batch(self, step: int, micro_step: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(x, y), each (B, seq_len) int64: y is x shifted left by one token."""
        per_step = self.batch_size * self.world_size * self.grad_accum
        first = step * per_step + (micro_step * self.world_size + self.rank) * self.batch_size
        rows = []
        for g in range(first, first + self.batch_size):
            epoch, i = divmod(g, self.n_windows)
            rows.append(self.window(int(self._permutation(epoch)[i])))
        w = torch.from_numpy(np.stack(rows))
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()

    def eval_batches(self, max_windows: int):
        """Yields (x, y) over the first `max_windows` windows in file order, split across ranks.

        Every window is full, so the mean of per-batch mean losses weighted by rows is the token mean
        (eval.py's perplexity reads the same windows through `window`)."""
        n = min(self.n_windows, max_windows) if max_windows > 0 else self.n_windows
        mine = list(range(self.rank, n, self.world_size))
        for i in range(0, len(mine), self.batch_size):
            w = torch.from_numpy(np.stack([self.window(k) for k in mine[i:i + self.batch_size]]))
            yield w[:, :-1].contiguous(), w[:, 1:].contiguous()
