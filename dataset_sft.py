"""SFT batches: one chat template, loss on the answers only, batches without wasted padding.

Input: data_process.py's `data/sft/train.jsonl` / `val.jsonl`, one conversation per line:
  {"conversations": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...],
   "system": "optional", "source": "file name"}      (turns alternate user/assistant, user first, assistant last)

The chat template (`prompt <bos> answer <eos>`, turn after turn) is chatglm_tokenizer/template.py's `render`.

The one shift (make_example): a sample of n tokens becomes n - 1 (input, target) pairs
    x = ids[:-1],  y[t] = ids[t+1] if supervised[t+1] else -1
so the model at the <bos> position learns the answer's first token and at the answer's last token
learns <eos>; the prompt and padding are never targets.

Over-long samples (more than max_seq_len + 1 tokens; max_seq_len is the row length T of x and y):
  1. whole oldest turns go first (the system text stays) while more than one turn is left;
  2. then the start of what is left is cut: the system text, then the beginning of the last question
     (the end of the question, nearest the answer, is kept; the <bos> always is);
  3. if the last answer with its <bos> and <eos> is still longer than max_seq_len + 1, no complete
     answer can be kept: the sample is dropped and counted (`dropped`), as the original project drops long answers.
  Samples changed by 1-2 are counted as `truncated`.

Batch modes (`Batching(mode=...)`), each a deterministic function of (seed, step, micro_step, rank,
world_size): the b-th batch of the run is k = (step * grad_accum + micro_step) * world_size + rank, so R
ranks with A accumulation steps read the same batches as R * A micro-steps on one process.
  "dynamic": per epoch a seeded shuffle, cut into mega-batches of `group` batches, sorted by length inside,
             cut into batches, batches shuffled; each batch padded to its longest sample.
  "packed":  per epoch shuffled mega-batches packed first-fit-decreasing into rows of exactly T tokens;
             batch() also returns seg (B, T) int64 segment ids (1, 2, ... per sample, 0 on padding) and
             the model must attend only within a segment: `segment_mask(seg)`. Positions need not restart
             per sample: RoPE scores depend only on the query-key distance, which the mask keeps in-sample.
  "fixed":   the original project's way: shuffled, every row padded to T (kept for the padding comparison).
x is padded with 0 (pad id), y with -1. A sample's last x token never predicts the next sample's first.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from babyllama.errors import DataError
from babyllama.fileio import read_jsonl
from chatglm_tokenizer.template import PAD_ID, assemble, check_conversation, template_texts

MODES = ("dynamic", "packed", "fixed")


def truncate(ids: Sequence[int], supervised: Sequence[bool], max_seq_len: int,
             n_system: int = 0) -> Tuple[Optional[List[int]], Optional[List[bool]], str]:
    """Fits a rendered sample into max_seq_len + 1 tokens by the policy in the module docstring.

    n_system: how many leading tokens are system text (kept while whole turns are dropped).
    Returns (ids, supervised, status), status "ok", "truncated" or "dropped" (then ids, supervised are None).
    """
    limit = max_seq_len + 1
    ids, sup = list(ids), list(supervised)
    if len(ids) <= limit:
        return ids, sup, "ok"
    # a turn ends at a supervised <eos> followed by an unsupervised token (the next question); the
    # last turn's end is not listed, so popping every entry leaves exactly one turn
    ends = [i + 1 for i in range(n_system, len(sup) - 1) if sup[i] and not sup[i + 1]]
    while ends and len(ids) > limit:  # 1. the oldest whole turn goes, the system text stays
        cut = ends.pop(0)
        ids, sup = ids[:n_system] + ids[cut:], sup[:n_system] + sup[cut:]
        ends = [e - (cut - n_system) for e in ends]
    if len(ids) > limit:  # 2. cut the start: system text, then the question's beginning
        last_bos = len(sup) - 1 - sup[::-1].index(False)  # the last unsupervised token is the answer's <bos>
        excess = len(ids) - limit
        if excess > last_bos:  # 3. <bos> + answer + <eos> alone is longer than the limit
            return None, None, "dropped"
        ids, sup = ids[excess:], sup[excess:]
    return ids, sup, "truncated"


def make_example(ids: Sequence[int], supervised: Sequence[bool], max_seq_len: int) -> Tuple[np.ndarray, np.ndarray]:
    """The one shift: (ids, supervised) of n <= max_seq_len + 1 tokens -> x, y, each (n - 1,) int64.

        ids        q0  q1  <bos> a0  a1  <eos>
        supervised F   F   F     T   T   T
        x          q0  q1  <bos> a0  a1
        y          -1  -1  a0    a1  <eos>        y[t] = ids[t+1] if supervised[t+1] else -1
    """
    ids = np.asarray(ids, dtype=np.int64)
    sup = np.asarray(supervised, dtype=bool)
    if len(ids) != len(sup) or not 2 <= len(ids) <= max_seq_len + 1:
        raise ValueError(f"make_example: need 2..{max_seq_len + 1} ids with one flag each, "
                         f"got {len(ids)} ids and {len(sup)} flags (truncate first)")
    x = ids[:-1].copy()
    y = np.where(sup[1:], ids[1:], -1)
    return x, y


def _read_records(path) -> Iterator[Tuple[str, list, Optional[str], str]]:
    """Yields (where, conversation, system, source) from a contract jsonl file, or from a list of record dicts."""
    if not isinstance(path, str):
        for i, rec in enumerate(path):
            rec = rec if isinstance(rec, dict) else {}
            yield f"record {i}", rec.get("conversations"), rec.get("system") or None, str(rec.get("source") or "")
        return
    for lineno, rec in read_jsonl(path, 'a JSON object with "conversations"'):
        yield f"{path}:{lineno}", rec.get("conversations"), rec.get("system") or None, str(rec.get("source") or "")


@dataclass
class Batching:
    """How an SFTData source cuts its samples into batches (see "Batch modes" above)."""
    batch_size: int  # rows per micro-batch
    seed: int = 0  # shuffle seed
    rank: int = 0  # this process's rank and the number of processes: each reads its share of every step
    world_size: int = 1
    mode: str = "dynamic"  # dynamic | packed | fixed
    grad_accum: int = 1  # micro-steps per optimizer step
    group: int = 50  # dynamic/packed: batches per mega-batch sorted (or packed) together
    pad_multiple: int = 1  # dynamic: rows are padded to a multiple of this (few distinct shapes for torch.compile)

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r}: expected one of {', '.join(MODES)}")
        if not (self.batch_size >= 1 and self.world_size >= 1 and 0 <= self.rank < self.world_size
                and self.grad_accum >= 1 and self.group >= 1 and self.pad_multiple >= 1):
            raise ValueError("Batching: need batch_size, world_size, grad_accum, group, pad_multiple >= 1 "
                             "and 0 <= rank < world_size")


class SFTSamples:
    """The tokenized conversations of one split, rendered and truncated to max_seq_len + 1 tokens, stored as one
    flat uint16 token array + int64 offsets + a bit-packed supervised mask (~2.1 bytes/token).

    path: a contract jsonl file (or a list of record dicts, for tests)."""

    def __init__(self, path, tokenizer, max_seq_len: int, *, progress: Optional[bool] = None, num_threads: int = -1):
        if max_seq_len < 1:
            raise ValueError(f"SFTSamples: need max_seq_len >= 1, got {max_seq_len}")
        self.name = os.path.basename(path) if isinstance(path, str) else "records"
        self.max_seq_len = max_seq_len
        records, sources = [], []
        for where, conv, system, source in _read_records(path):
            reason = check_conversation(conv, system)
            if reason:
                raise DataError(f"{where}: {reason}")
            records.append((conv, system))
            sources.append(source)
        if progress is None:
            progress = len(records) >= 5000 and sys.stderr.isatty()
        from tqdm import tqdm

        tok_parts, sup_parts, lengths, kept_sources = [], [], [], []
        counts = {"conversations": len(records), "samples": 0, "dropped": 0, "truncated": 0}
        chunk = 2048  # conversations per encode_batch call: all cores busy, bounded memory
        bar = tqdm(total=len(records), desc=f"tokenizing {self.name}", unit="conv", disable=not progress)
        for s in range(0, len(records), chunk):
            part = records[s:s + chunk]
            texts = [template_texts(conv, system) for conv, system in part]
            flat = tokenizer.encode_batch([t for ts in texts for t in ts], num_threads=num_threads)
            at = 0
            for (conv, system), ts, source in zip(part, texts, sources[s:s + chunk]):
                pieces, at = flat[at:at + len(ts)], at + len(ts)
                ids, sup = assemble(pieces, bool(system), tokenizer.bos_id, tokenizer.eos_id)
                n_sys = len(pieces[0]) if system else 0
                ids, sup, status = truncate(ids, sup, self.max_seq_len, n_sys)
                if status == "dropped":
                    counts["dropped"] += 1
                    continue
                counts["truncated"] += status == "truncated"
                tok_parts.append(ids)
                sup_parts.append(sup)
                lengths.append(len(ids))
                kept_sources.append(source)
            bar.update(len(part))
        bar.close()
        flat_ids = np.fromiter((i for ids in tok_parts for i in ids), dtype=np.int64, count=sum(lengths))
        if flat_ids.size and (flat_ids.min() < 0 or flat_ids.max() >= 2 ** 16):
            raise DataError(f"{self.name}: token id {int(flat_ids.max())} does not fit uint16 (wrong tokenizer?)")
        flat_sup = np.fromiter((b for sup in sup_parts for b in sup), dtype=bool, count=sum(lengths))
        self.tokens = flat_ids.astype(np.uint16)
        self.sup_bits = np.packbits(flat_sup, bitorder="little")
        self.offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=self.offsets[1:])
        self.ex_len = np.asarray(lengths, dtype=np.int64) - 1  # (x, y) length of each sample
        # the source file of each sample, as an index into source_names (for the SFT mix, see mix_repeats)
        self.source_names = sorted(set(kept_sources))
        index = {name: i for i, name in enumerate(self.source_names)}
        self.source_of = np.fromiter((index[x] for x in kept_sources), dtype=np.int32, count=len(kept_sources))
        counts["samples"] = len(lengths)
        counts["tokens"] = int(self.tokens.size)
        counts["supervised"] = int(flat_sup.sum())  # = the number of targets != -1 (a sample never starts supervised)
        self.counts = counts
        if counts["samples"] == 0:
            raise DataError(f"{self.name}: no samples left ({counts['conversations']} conversations, "
                            f"{counts['dropped']} dropped as longer than max_seq_len={self.max_seq_len})")

    def __len__(self) -> int:
        return self.counts["samples"]

    def sample(self, i: int) -> Tuple[np.ndarray, np.ndarray]:
        """Sample i as stored (after truncation): ids (n,) int64 and supervised (n,) bool."""
        s, e = int(self.offsets[i]), int(self.offsets[i + 1])
        bits = np.unpackbits(self.sup_bits[s // 8:(e + 7) // 8], bitorder="little")
        return self.tokens[s:e].astype(np.int64), bits[s % 8:s % 8 + e - s].astype(bool)

    def targets_per_sample(self) -> np.ndarray:
        """Targets (supervised tokens) of each sample, (N,) int64, computed once."""
        if "_targets" not in self.__dict__:
            flat = np.unpackbits(self.sup_bits, bitorder="little", count=int(self.offsets[-1])).astype(np.int64)
            self._targets = np.add.reduceat(flat, self.offsets[:-1])
        return self._targets


class SFTData:
    """The trainer's batch source over SFTSamples: batch(step, micro_step) -> (x, y) in "dynamic"/"fixed" mode,
    (x, y, seg) in "packed" mode, CPU int64; eval_batches(n) for validation."""

    def __init__(self, samples: SFTSamples, batching: Batching, repeats: Optional[np.ndarray] = None):
        batching.validate()
        self.samples, self.batching = samples, batching
        # repeats (N,) int: how often each sample appears per epoch (the SFT mix, see mix_repeats); None = once each
        self.repeats = repeats
        self._pool = np.arange(len(samples)) if repeats is None else np.repeat(np.arange(len(samples)), repeats)
        self.name, self.max_seq_len, self.ex_len = samples.name, samples.max_seq_len, samples.ex_len
        self.batch_size, self.mode = batching.batch_size, batching.mode
        self._cache: dict = {}  # epoch -> batches, holding the latest epoch only
        self._epoch_sizes: List[int] = []  # batches in epochs 0, 1, ... (packed epochs differ a little)

    def __len__(self) -> int:
        return len(self.samples)

    def with_mode(self, mode: str, group: Optional[int] = None) -> "SFTData":
        """The same tokenized samples batched another way (shares the arrays)."""
        return SFTData(self.samples, dataclasses.replace(self.batching, mode=mode,
                                                         group=self.batching.group if group is None else group),
                       self.repeats)

    # ---- batch layout --------------------------------------------------------------------------
    def _layout(self, epoch: int) -> list:
        """Epoch's batches: dynamic/fixed: arrays of B sample ids; packed: B rows, each a list of sample ids."""
        if epoch in self._cache:
            return self._cache[epoch]
        rng = np.random.default_rng([self.batching.seed, epoch])
        B, n = self.batch_size, len(self._pool)
        perm = self._pool[rng.permutation(n)]  # sample ids, a mixed source's samples several times
        mega = self.batching.group * B
        if self.mode == "fixed":
            batches = list(perm[:n // B * B].reshape(-1, B))
        elif self.mode == "dynamic":
            perm, batches = perm[:n // B * B], []  # the last n % B samples of this shuffle wait for the next epoch
            for s in range(0, len(perm), mega):
                chunk = perm[s:s + mega]
                chunk = chunk[np.argsort(-self.ex_len[chunk], kind="stable")]
                batches += [chunk[i:i + B] for i in range(0, len(chunk), B)]
            batches = [batches[i] for i in rng.permutation(len(batches))]
        else:
            rows = []
            for s in range(0, n, mega):
                rows += _pack_ffd(perm[s:s + mega], self.ex_len, self.max_seq_len)
            rows = [rows[i] for i in rng.permutation(len(rows))]
            batches = [rows[i:i + B] for i in range(0, len(rows) // B * B, B)]
        self._cache = {epoch: batches}
        return batches

    def _epoch_size(self, epoch: int) -> int:
        while len(self._epoch_sizes) <= epoch:
            e = len(self._epoch_sizes)
            if self.mode == "packed" or e == 0:
                self._epoch_sizes.append(len(self._layout(e)))
            else:
                self._epoch_sizes.append(self._epoch_sizes[0])
        return self._epoch_sizes[epoch]

    def _locate(self, k: int) -> Tuple[int, int]:
        """Global batch index k -> (epoch, batch within the epoch)."""
        if self.mode != "packed":
            return divmod(k, self._epoch_size(0))
        epoch = 0
        while k >= self._epoch_size(epoch):
            k -= self._epoch_size(epoch)
            epoch += 1
        return epoch, k

    def _members(self, k: int):
        if self.epoch_batches() == 0:
            raise DataError(f"{self.name}: {len(self)} samples make no full batch of {self.batch_size} in "
                               f"{self.mode} mode (lower batch_size or add data)")
        epoch, i = self._locate(k)
        return self._layout(epoch)[i]

    def batch_index(self, step: int, micro_step: int) -> int:
        b = self.batching
        return (step * b.grad_accum + micro_step) * b.world_size + b.rank

    def epoch_batches(self) -> int:
        """Batches in one epoch over all ranks (epoch 0's count in packed mode; later ones differ by a few)."""
        return self._epoch_size(0)

    def epoch_steps(self) -> float:
        """Optimizer steps in one pass over the conversations (each step takes world_size x grad_accum batches)."""
        return self.epoch_batches() / (self.batching.world_size * self.batching.grad_accum)

    def _width(self, members) -> int:
        if self.mode != "dynamic":
            return self.max_seq_len
        longest = int(self.ex_len[members].max())
        return min(self.max_seq_len, -(-longest // self.batching.pad_multiple) * self.batching.pad_multiple)

    # ---- batches -------------------------------------------------------------------------------
    def batch(self, step: int, micro_step: int):
        """(x, y) each (B, L) int64, or (x, y, seg) in packed mode; x padded with 0, y with -1."""
        members = self._members(self.batch_index(step, micro_step))
        if self.mode != "packed":
            return self._padded(members, self._width(members))
        T, B = self.max_seq_len, self.batch_size
        x = np.full((B, T), PAD_ID, dtype=np.int64)
        y = np.full((B, T), -1, dtype=np.int64)
        seg = np.zeros((B, T), dtype=np.int64)
        for r, row in enumerate(members):
            at = 0
            for j, i in enumerate(row):
                xi, yi = make_example(*self.samples.sample(int(i)), T)
                x[r, at:at + len(xi)], y[r, at:at + len(xi)], seg[r, at:at + len(xi)] = xi, yi, j + 1
                at += len(xi)
        return torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(seg)

    def _padded(self, members, width: int) -> Tuple[torch.Tensor, torch.Tensor]:
        x = np.full((len(members), width), PAD_ID, dtype=np.int64)
        y = np.full((len(members), width), -1, dtype=np.int64)
        for r, i in enumerate(members):
            xi, yi = make_example(*self.samples.sample(int(i)), self.max_seq_len)
            x[r, :len(xi)], y[r, :len(yi)] = xi, yi
        return torch.from_numpy(x), torch.from_numpy(y)

    def eval_batches(self, max_samples: int = 0):
        """Yields dynamically padded (x, y) over the first max_samples samples (0 = all), split across ranks.

        Every mode evaluates the same way (samples never share a row), so val losses compare across modes."""
        n = min(len(self), max_samples) if max_samples > 0 else len(self)
        mine = np.arange(self.batching.rank, n, self.batching.world_size)
        mine = mine[np.argsort(-self.ex_len[mine], kind="stable")]  # similar lengths together: less padding
        for s in range(0, len(mine), self.batch_size):
            members = mine[s:s + self.batch_size]
            longest = int(self.ex_len[members].max())
            yield self._padded(members, min(self.max_seq_len, -(-longest // self.batching.pad_multiple) * self.batching.pad_multiple))

    # ---- reporting -----------------------------------------------------------------------------
    def padding_stats(self, n_batches: int = 0) -> dict:
        """Over global batches 0..n_batches-1 (0 = one epoch): fractions of the (B, L) cells that hold a token
        (nonpad) and a target (supervised), and the mean cells per batch. Computed from the layout, so it
        does not depend on which ids are 0."""
        n_batches = n_batches or self.epoch_batches()
        if n_batches == 0:
            return {"batches": 0, "nonpad": float("nan"), "supervised": float("nan"), "cells_per_batch": 0.0}
        cells = tokens = targets = 0
        sup_per_sample = self.samples.targets_per_sample()
        for k in range(n_batches):
            members = self._members(k)
            ids = np.concatenate([np.asarray(r, dtype=np.int64) for r in members]) if self.mode == "packed" \
                else np.asarray(members)
            cells += len(members) * self._width(ids)
            tokens += int(self.ex_len[ids].sum())
            targets += int(sup_per_sample[ids].sum())
        return {"batches": n_batches, "nonpad": tokens / cells, "supervised": targets / cells,
                "cells_per_batch": cells / n_batches}

    def nonpad_fraction(self, n_batches: int = 0) -> float:
        """Fraction of the batches' (B, L) cells that hold a real token (see padding_stats)."""
        return self.padding_stats(n_batches)["nonpad"]

    def describe(self) -> str:
        c, per_epoch = self.samples.counts, self.epoch_batches()
        batching = (f"{self.mode} batches of {self.batch_size} x <= {self.max_seq_len}, {per_epoch:,}/epoch" if per_epoch
                    else f"too few for one {self.mode} batch; validation pads its own batches of {self.batch_size}")
        mixed = "" if self.repeats is None else f" | mixed to {len(self._pool):,} samples per epoch"
        return (f"{self.name}: {c['samples']:,} samples of {c['conversations']:,} conversations ({c['dropped']:,} "
                f"dropped, {c['truncated']:,} truncated{cut_hint(c, self.max_seq_len)}) | {c['tokens']:,} tokens, "
                f"{c['supervised']:,} supervised{mixed} | {batching}")


def parse_mix(spec: str) -> List[Tuple[str, int]]:
    """The SFT mix "medical=3,alpaca=0" -> [("medical", 3), ("alpaca", 0)]: a source whose file name contains the
    text appears that many times per epoch (0 = left out); one-line ValueError for a malformed part."""
    out = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, eq, times = part.partition("=")
        if not (eq and name.strip() and times.strip().isdigit() and int(times) <= 100):
            raise ValueError(f"mix: {part!r} is not NAME=TIMES (TIMES a whole number 0-100), e.g. medical=3")
        out.append((name.strip(), int(times)))
    return out


def mix_repeats(samples: SFTSamples, spec: str) -> Optional[np.ndarray]:
    """Per-sample repeats (N,) int64 for the mix spec (parse_mix; the first matching part wins, unmatched sources
    once), or None for an empty spec. A part that matches no source, or a mix that leaves nothing, is a DataError."""
    parts = parse_mix(spec)
    if not parts:
        return None
    per_source = np.ones(len(samples.source_names), dtype=np.int64)
    for name, times in reversed(parts):  # reversed: the first matching part is applied last, so it wins
        hits = [i for i, src in enumerate(samples.source_names) if name in src]
        if not hits:
            raise DataError(f"{samples.name}: mix part {name!r} matches no source (sources: "
                            f"{', '.join(samples.source_names) or 'none recorded'})")
        per_source[hits] = times
    repeats = per_source[samples.source_of]
    if repeats.sum() == 0:
        raise DataError(f"{samples.name}: the mix {spec!r} leaves no conversation")
    return repeats


def cut_hint(counts: dict, max_seq_len: int) -> str:
    """When 5% or more of the conversations do not fit max_seq_len whole: the shares and what keeps them."""
    n = max(1, counts["conversations"])
    if counts["dropped"] + counts["truncated"] < 0.05 * n:
        return ""
    return (f": {counts['dropped'] / n:.0%} and {counts['truncated'] / n:.0%} of the conversations do not fit "
            f"{max_seq_len} tokens; a longer context (--max_seq_len of pretrain.py, then of sft.py) keeps them")


def _pack_ffd(samples: np.ndarray, ex_len: np.ndarray, capacity: int) -> List[List[int]]:
    """First-fit-decreasing: sample ids -> rows whose (x, y) lengths sum to <= capacity."""
    order = samples[np.argsort(-ex_len[samples], kind="stable")]
    room = np.zeros(len(order), dtype=np.int64)  # free cells of each open row
    rows: List[List[int]] = []
    for i in order:
        need = int(ex_len[i])
        fits = np.flatnonzero(room[:len(rows)] >= need)
        if fits.size:
            r = int(fits[0])
        else:
            r = len(rows)
            rows.append([])
            room[r] = capacity
        rows[r].append(int(i))
        room[r] -= need
    return rows
