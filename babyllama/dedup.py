"""Deduplication and the validation split of data_process.py: exact (64-bit hash of the whitespace-normalized text)
and near duplicates (MinHash + LSH bands).

  h = text_hash(text); is_val(h, 0.01)         # the hash picks the split, so a document keeps its split between runs
  seen = HashSet(); seen.add_if_new(h, False)   # ~8 bytes per document
  idx = NearDupIndex(bands); idx.add_if_new(minhash_signature(text, *minhash_params(64)))
"""
from __future__ import annotations

import hashlib

import numpy as np


def text_hash(text: str, seed: int = 0) -> int:
    """64-bit hash of the whitespace-normalized text (exact dedup key; its low bits pick the validation split)."""
    norm = " ".join(text.split())
    return int.from_bytes(hashlib.blake2b(norm.encode("utf-8", "surrogatepass"), digest_size=8,
                                          salt=seed.to_bytes(8, "little")).digest(), "little")


def is_val(h: int, fraction: float) -> bool:
    return (h & 0xFFFFFFFF) < fraction * 2 ** 32


class HashSet:
    """Set of 64-bit hashes at ~8 bytes each: a sorted numpy array plus a small Python set of recent additions."""

    def __init__(self, merge_every: int = 1 << 18):
        self.sorted = np.zeros(0, dtype=np.uint64)
        self.recent: set[int] = set()
        self.merge_every = merge_every

    def seen_before(self, hashes: np.ndarray) -> np.ndarray:
        """Vectorized membership in the sorted part (for a whole chunk at once)."""
        if self.sorted.size == 0:
            return np.zeros(len(hashes), dtype=bool)
        idx = np.minimum(np.searchsorted(self.sorted, hashes), self.sorted.size - 1)
        return self.sorted[idx] == hashes

    def add_if_new(self, h: int, in_sorted: bool) -> bool:
        if in_sorted or h in self.recent:
            return False
        self.recent.add(h)
        if len(self.recent) >= self.merge_every:
            self.sorted = np.union1d(self.sorted, np.fromiter(self.recent, dtype=np.uint64, count=len(self.recent)))
            self.recent = set()
        return True

    def __len__(self):
        return self.sorted.size + len(self.recent)


def minhash_params(perms: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1234 + seed)
    a = rng.integers(1, 2 ** 63, size=perms, dtype=np.uint64) | np.uint64(1)  # odd multipliers
    b = rng.integers(0, 2 ** 63, size=perms, dtype=np.uint64)
    return a, b


def minhash_signature(text: str, a: np.ndarray, b: np.ndarray, shingle: int = 5, block: int = 4096) -> np.ndarray:
    """(perms,) uint32 MinHash of the text's character `shingle`-grams: min over grams of top 32 bits of a*g+b mod 2^64."""
    cp = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(np.uint64)
    n = max(len(cp) - shingle + 1, 1)
    grams = np.zeros(n, dtype=np.uint64)
    for j in range(min(shingle, len(cp))):  # polynomial rolling hash, wrapping mod 2^64
        grams = grams * np.uint64(1000003) + cp[j:j + n]
    grams = np.unique(grams)
    sig = np.full(len(a), np.iinfo(np.uint64).max, dtype=np.uint64)
    for s in range(0, len(grams), block):  # (perms, block) at a time keeps memory small for long documents
        g = grams[s:s + block]
        sig = np.minimum(sig, (a[:, None] * g[None, :] + b[:, None]).min(axis=1))
    return (sig >> np.uint64(32)).astype(np.uint32)


class NearDupIndex:
    """LSH over MinHash bands: a document is a near-duplicate if any band equals a band of a kept document."""

    def __init__(self, bands: int):
        self.bands = bands
        self.keys: set[bytes] = set()

    def add_if_new(self, sig: np.ndarray) -> bool:
        keys = [bytes([i]) + band.tobytes() for i, band in enumerate(np.split(sig, self.bands))]
        if any(k in self.keys for k in keys):
            return False
        self.keys.update(keys)
        return True
