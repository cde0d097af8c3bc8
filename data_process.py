"""Turns raw Chinese corpora into training data: uint16 token shards (pretrain) and conversation JSON lines (SFT).

  python data_process.py                                  # the embedded sample: data/sample/{pretrain,sft}/* -> data/{pretrain,sft}
  python data_process.py pretrain --inputs=wiki.json.gz,baike.jsonl --out_dir=data/pretrain
  python data_process.py pretrain --manifest=corpora.txt --num_workers=8 --minhash   # manifest: "path [format]" per line
  python data_process.py pretrain --inputs=notes.txt:txt,dump.parquet               # path:format names the format
  python data_process.py pretrain --inputs=hf://datasets/pleisto/wikipedia-cn-20230720-filtered/wikipedia-cn-20230720-filtered.json
  python data_process.py sft --inputs=alpaca.json,belle.jsonl,sharegpt.jsonl,seed.csv --out_dir=data/sft
  python data_process.py pretrain --inputs=tests/fixtures_data/pretrain/wiki_array.json --out_dir=data/tiny --num_workers=1

Pretrain output (out_dir): train_00000.bin, ..., val_00000.bin, ...: raw uint16 token ids (np.memmap(path, np.uint16, "r")),
every document followed by <eos>=2, each with a sidecar <stem>.json (format baby-llama2-chinese/tokens-v1: tokenizer sha256,
vocab size, dtype, eos id, token/document counts, sources, filters). SFT output: train.jsonl / val.jsonl, one
{"conversations": [{"role": "user"|"assistant", "content"}...], "system"?, "source"} per line, sidecars train.json / val.json.

Inputs are read by babyllama/corpora.py (container and record format detected; `path:format` overrides; hf:// files fetched).
Bad records are skipped and counted (the first few reported as file:line); an unknown format, an empty input or a dead
tokenizer worker is a one-line error (exit 2) before anything is written. Memory is bounded for any line length. The
output is swapped in whole with its manifest.json (babyllama/output_dir.py); files this script did not write need --overwrite.
"""
from __future__ import annotations

import contextlib
import io
import itertools
import json
import multiprocessing as mp
import os
import signal
import sys
import time
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from babyllama.children import die_with_parent
from babyllama.config import config_or_exit
from babyllama.errors import DataError, check, ctrl_c, fail, user_errors
from babyllama.corpora import PRETRAIN_ONLY, BadRecord, ReadOptions, Reporter, Source, detect, iter_documents, iter_records, parse_inputs, record_conversation
from babyllama.dedup import HashSet, NearDupIndex, is_val, minhash_params, minhash_signature, text_hash
from babyllama.fileio import open_exclusive, write_json
from babyllama.output_dir import OutputFolder

TOKENS_FORMAT = "baby-llama2-chinese/tokens-v1"
SFT_FORMAT = "baby-llama2-chinese/sft-v1"
EOS_ID = 2
MODES = ("pretrain", "sft", "all")
STOP_SLICE = 256  # texts a worker encodes between two looks at the stop request (a few ms of work)


@dataclass
class Config(ReadOptions):  # + txt_max_chars, max_record_chars (corpora.ReadOptions)
    mode: str = "all"  # pretrain | sft | all (both, on the embedded sample); also accepted as the first bare word
    inputs: list[str] = field(default_factory=list)  # comma-separated files (path[:format], hf://...); empty = data/sample/<mode>/*
    manifest: str = ""  # text file, one input per line: "path" or "path format" ('#' starts a comment)
    out_dir: str = ""  # empty = data/<mode>
    tokenizer: str = ""  # explicit tokenizer.model path (else $BABYLLAMA_TOKENIZER, chatglm_tokenizer/, the Hub)
    num_workers: int = 0  # tokenizer processes; 0 = one per CPU core
    chunk_chars: int = 1 << 20  # characters of text per task sent to a worker (bigger = less IPC overhead, more memory)
    max_pending: int = 0  # tasks in flight at once (bounds memory); 0 = 2 * num_workers + 2
    shard_tokens: int = 100_000_000  # a shard is closed once it holds at least this many tokens (documents are never split)
    min_chars: int = 10  # pretrain: drop documents with fewer characters (after stripping)
    max_doc_chars: int = 1 << 20  # pretrain: a longer document is cut into pieces of at most this many characters
    # (at a line end where one is near), each its own document: bounds the tokenizer's memory
    dedup: bool = True  # drop exact duplicates (64-bit hash of whitespace-normalized text)
    minhash: bool = False  # pretrain: also drop near-duplicates (MinHash over character 5-grams, LSH)
    minhash_perms: int = 64  # MinHash permutations (signature length)
    minhash_bands: int = 8  # LSH bands; rows = perms / bands; Jaccard threshold ~ (1/bands)^(1/rows) (0.77 for 64/8)
    val_fraction: float = 0.005  # share of documents / conversations held out, chosen by their hash
    val_min_tokens: int = 4096  # pretrain: until val holds this many tokens, every second kept document goes to val
    val_min_records: int = 10  # sft: until val holds this many conversations, every second kept one goes to val
    sft_max_chars: int = 8192  # sft: drop conversations longer than this (characters of all turns and the system text)
    sft_min_answer_chars: int = 1  # sft: drop conversations with an assistant turn shorter than this
    overwrite: bool = False  # replace an out_dir holding files this script did not write (they are deleted)
    max_reports: int = 5  # bad records reported individually (file:line) per run; all are counted
    progress: bool = True  # tqdm progress bar (docs/s, tokens/s) on stderr
    seed: int = 0  # salt of the hash that chooses the validation split

    def validate(self):
        check(self.mode in MODES, f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        check(self.mode != "all" or not (self.inputs or self.manifest or self.out_dir),
              "--inputs/--manifest/--out_dir need a mode: python data_process.py pretrain|sft ...")
        check(not (self.inputs and self.manifest), "give --inputs or --manifest, not both")
        check(self.num_workers >= 0, f"--num_workers must be >= 0, got {self.num_workers}")
        check(self.chunk_chars >= 1, f"--chunk_chars must be >= 1, got {self.chunk_chars}")
        check(self.max_pending >= 0, f"--max_pending must be >= 0, got {self.max_pending}")
        check(self.shard_tokens >= 1, f"--shard_tokens must be >= 1, got {self.shard_tokens}")
        check(self.min_chars >= 0, f"--min_chars must be >= 0, got {self.min_chars}")
        check(self.txt_max_chars >= 1, f"--txt_max_chars must be >= 1, got {self.txt_max_chars}")
        check(self.max_doc_chars >= 1024, f"--max_doc_chars must be >= 1024, got {self.max_doc_chars}")
        check(0.0 <= self.val_fraction < 1.0, f"--val_fraction must be in [0, 1), got {self.val_fraction}")
        check(self.val_min_tokens >= 0, f"--val_min_tokens must be >= 0, got {self.val_min_tokens}")
        check(self.val_min_records >= 0, f"--val_min_records must be >= 0, got {self.val_min_records}")
        check(self.minhash_perms >= 1 and self.minhash_bands >= 1 and self.minhash_perms % self.minhash_bands == 0,
              f"--minhash_perms must be a positive multiple of --minhash_bands, "
              f"got {self.minhash_perms} and {self.minhash_bands}")
        check(self.sft_max_chars >= 1, f"--sft_max_chars must be >= 1, got {self.sft_max_chars}")
        check(self.sft_min_answer_chars >= 0, f"--sft_min_answer_chars must be >= 0, got {self.sft_min_answer_chars}")
        check(self.max_record_chars >= 1024, f"--max_record_chars must be >= 1024, got {self.max_record_chars}")


# ----------------------------------------------------------------------------------------------------------------
# inputs as the console names them


def describe_source(src: Source) -> str:
    """How an input was read, for the console: 'JSON lines of baike records (gzip)', 'plain text'."""
    names = {"array": "a JSON array", "lines": "JSON lines", "csv": "CSV", "parquet": "Parquet"}
    what = "plain text" if src.container == "txt" else f"{names.get(src.container, src.container)} of {src.fmt} records"
    return what + (" (gzip)" if src.path.endswith(".gz") else "")


# ----------------------------------------------------------------------------------------------------------------
# pretrain: workers tokenize chunks, the main process filters, splits and writes shards in input order

_WORKER: dict = {}  # per-process state of a pool worker (the tokenizer, loaded once); only the worker functions use it


def _worker_init(tokenizer_path: str, vocab_size: int, minhash_perms: int, seed: int, parent: int = 0,
                 inherited_lock: Optional[int] = None, stop=None):
    """A worker ends with the main process however it ends (a SIGKILL included: orphans would keep the output lock),
    and closes its forked copy of that lock, so only the main process holds it. Ctrl-C is the main process's to
    handle (a terminal sends it to every worker too): it sets `stop` (an Event), which ends the workers' tasks."""
    from chatglm_tokenizer.tokenizer import ChatGLMTokenizer

    if parent:  # a pool worker (not a test calling this in its own process)
        die_with_parent(parent)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    _WORKER["stop"] = stop
    if inherited_lock is not None:
        with contextlib.suppress(OSError):
            os.close(inherited_lock)
    _WORKER["tok"] = ChatGLMTokenizer(tokenizer_path)
    _WORKER["vocab_size"] = vocab_size
    _WORKER["seed"] = seed
    _WORKER["minhash"] = minhash_params(minhash_perms, seed) if minhash_perms else None


def to_uint16(ids: np.ndarray, vocab_size: int) -> np.ndarray:
    """The uint16 guard: every id must be < vocab_size (<= 65535), else the shard would be silently wrong."""
    if ids.size and (int(ids.max()) >= vocab_size or int(ids.min()) < 0):
        bad = int(ids.max()) if int(ids.max()) >= vocab_size else int(ids.min())
        raise DataError(f"token id {bad} is outside the vocabulary [0, {vocab_size}): wrong tokenizer.model?")
    return ids.astype(np.uint16, copy=False)


def _encode_texts(tok, texts: list[str]) -> list:
    """-> one id list per text, None where sentencepiece cannot encode it."""
    try:
        # one sentencepiece thread per process: the pool already uses every core (measured: no gain from 2 threads)
        return tok.encode_batch(texts, num_threads=1)
    except (UnicodeError, RuntimeError, TypeError):  # lone surrogates from JSON escapes: encode one by one
        encoded = []
        for t in texts:
            try:
                encoded.append(tok.encode(t))
            except (UnicodeError, RuntimeError, TypeError):
                encoded.append(None)
        return encoded


def encode_chunk(texts: list[str]) -> Optional[tuple]:
    """Worker task: -> (hashes uint64 (n,), lengths int64 (n,) incl. <eos> (-1 = not encodable), ids uint16 (sum len,),
    MinHash signatures uint32 (n, perms) or None), or None once the main process has asked the pool to stop. The texts
    go to sentencepiece STOP_SLICE at a time, so a stop ends the task within one slice: the pool then shuts down
    without killing a worker (one killed while it sends a result leaves a half-written message that the pool's
    shutdown would wait on forever)."""
    tok, seed, stop = _WORKER["tok"], _WORKER["seed"], _WORKER.get("stop")
    hashes = np.fromiter((text_hash(t, seed) for t in texts), dtype=np.uint64, count=len(texts))
    minhash, encoded, sigs = _WORKER["minhash"], [], []
    for i in range(0, len(texts), STOP_SLICE):
        if stop is not None and stop.is_set():
            return None
        part = texts[i:i + STOP_SLICE]
        encoded += _encode_texts(tok, part)
        if minhash is not None:
            sigs += [minhash_signature(t, *minhash) for t in part]
    lengths = np.array([len(e) + 1 if e is not None else -1 for e in encoded], dtype=np.int64)
    kept = [e for e in encoded if e is not None]
    for e in kept:
        e.append(EOS_ID)  # every document ends with <eos>
    try:  # straight to uint16 (numpy raises OverflowError for ids > 65535); to_uint16 then checks < vocab_size
        flat = np.fromiter(itertools.chain.from_iterable(kept), dtype=np.uint16, count=int(lengths[lengths > 0].sum()))
    except OverflowError as e:
        raise DataError(f"{e}: token id does not fit uint16: wrong tokenizer.model?") from None
    ids = to_uint16(flat, _WORKER["vocab_size"])
    return hashes, lengths, ids, np.stack(sigs) if sigs else None


class ShardWriter:
    """Writes one split as <split>_NNNNN.bin (+ .json sidecars) into the new output folder (OutputFolder.path)."""

    def __init__(self, out: OutputFolder, split: str, shard_tokens: int, meta: dict):
        self.out, self.split, self.shard_tokens, self.meta = out, split, shard_tokens, meta
        self.done: list[str] = []  # names of closed shards (.bin)
        self.f = None
        self.tokens = self.documents = 0
        self.total_tokens = self.total_documents = 0
        self.sources: Counter = Counter()

    def _name(self, index: int, ext: str) -> str:
        return f"{self.split}_{index:05d}{ext}"

    def write(self, ids: np.ndarray, documents: int, source: str):
        if documents == 0:
            return
        if self.f is None:
            self.f = open_exclusive(self.out.path(self._name(len(self.done), ".bin")))
        self.f.write(ids.tobytes())
        self.tokens += ids.size
        self.documents += documents
        self.sources[source] += documents
        if self.tokens >= self.shard_tokens:
            self._close_shard()

    def _close_shard(self):
        self.f.close()
        self.f = None
        index = len(self.done)
        side = dict(self.meta, split=self.split, tokens=self.tokens, documents=self.documents, shard=index,
                    sources=sorted(self.sources), documents_per_source=dict(sorted(self.sources.items())))
        write_json(self.out.path(self._name(index, ".json")), side)
        self.done.append(self._name(index, ".bin"))
        self.total_tokens += self.tokens
        self.total_documents += self.documents
        self.tokens = self.documents = 0
        self.sources = Counter()

    def finish(self) -> list[str]:
        """Closes the last shard -> names of the .bin files (each with its .json sidecar)."""
        if self.f is not None:
            self._close_shard()
        return self.done

    def close(self):
        if self.f is not None:
            self.f.close()
            self.f = None


def cut_document(text: str, max_chars: int) -> list[str]:
    """Pieces of at most max_chars characters, each cut after the last line end of its second half if it has one."""
    pieces, start = [], 0
    while len(text) - start > max_chars:
        nl = text.rfind("\n", start + max_chars // 2, start + max_chars)
        end = nl + 1 if nl >= 0 else start + max_chars
        pieces.append(text[start:end])
        start = end
    return pieces + [text[start:]] if pieces else [text]


def iter_chunks(sources: list[Source], cfg: Config, rep: Reporter, counts: Counter):
    """(source index, [texts]) of about cfg.chunk_chars characters; short documents are dropped here (cheap), long
    ones cut (cut_document)."""
    for si, src in enumerate(sources):
        texts, size = [], 0
        for doc in iter_documents(src, cfg, rep):
            counts["read"] += 1
            if len(doc) > cfg.max_doc_chars:
                counts["cut_long"] += 1
            for text in cut_document(doc, cfg.max_doc_chars):
                if len(text.strip()) < cfg.min_chars:
                    counts["too_short"] += 1
                    continue
                texts.append(text)
                size += len(text)
                if size >= cfg.chunk_chars:
                    yield si, texts
                    texts, size = [], 0
        if texts:
            yield si, texts


def run_pretrain(cfg: Config, out_dir: str) -> dict:
    from chatglm_tokenizer.tokenizer import load_tokenizer

    # every input checked before any output, and before the tokenizer (which may need a download)
    sources = [detect(p, f, cfg) for p, f in parse_inputs(cfg.inputs, cfg.manifest, "pretrain")]
    try:
        tok = load_tokenizer(cfg.tokenizer or None)
    except FileNotFoundError as e:
        raise DataError(str(e)) from None
    if tok.n_pieces > tok.vocab_size or tok.vocab_size > 65536:
        raise DataError(f"{tok.path}: {tok.n_pieces} pieces do not fit vocab {tok.vocab_size} / uint16")
    workers = cfg.num_workers or os.cpu_count() or 1
    max_pending = cfg.max_pending or 2 * workers + 2
    filters = {"min_chars": cfg.min_chars, "dedup": cfg.dedup, "minhash": cfg.minhash,
               "minhash_perms": cfg.minhash_perms if cfg.minhash else None,
               "minhash_bands": cfg.minhash_bands if cfg.minhash else None,
               "val_fraction": cfg.val_fraction, "val_min_tokens": cfg.val_min_tokens, "seed": cfg.seed}
    meta = {"format": TOKENS_FORMAT, "dtype": "uint16", "vocab_size": tok.vocab_size, "eos_id": EOS_ID,
            "tokenizer_sha256": tok.sha256, "filters": filters}
    if cfg.tokenizer:  # as given: pretrain.py takes it when it is given no --tokenizer (chatglm_tokenizer.recorded_tokenizer)
        meta["tokenizer"] = cfg.tokenizer
    print(f"pretrain: {len(sources)} inputs -> {out_dir} | {workers} workers, {cfg.chunk_chars:,} chars/task, "
          f"<= {max_pending} tasks in flight, shards of >= {cfg.shard_tokens:,} tokens")
    for s in sources:
        print(f"  {s.path}: {describe_source(s)}")
    out = OutputFolder(out_dir, "pretrain", [s.path for s in sources], cfg.overwrite, not (cfg.inputs or cfg.manifest))
    writers = {split: ShardWriter(out, split, cfg.shard_tokens, meta) for split in ("train", "val")}
    rep, counts = Reporter(cfg.max_reports), Counter()
    split_tokens = {"train": 0, "val": 0, "kept": 0}  # tokens per split, documents kept so far
    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(unit=" docs", desc="pretrain", dynamic_ncols=True, mininterval=0.5, file=sys.stderr)
    t0 = time.perf_counter()
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    # concurrent.futures, not mp.Pool: a worker that dies (killed, out of memory) fails its task at once
    stop = ctx.Event()  # set by _stop_pool: the workers' tasks end early
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init,
                               initargs=(tok.path, tok.vocab_size, cfg.minhash_perms if cfg.minhash else 0, cfg.seed,
                                         os.getpid(), out.lock_fd if ctx.get_start_method() == "fork" else None, stop))
    ok = False
    try:
        try:
            encoded = _encode_all(pool, sources, cfg, writers, rep, counts, split_tokens, max_pending, bar)
        except BrokenProcessPool:
            raise DataError("a tokenizer worker died (killed, or out of memory: lower --chunk_chars, --max_pending "
                            f"or --num_workers); nothing was written to {out_dir}") from None
        except MemoryError:
            raise DataError("out of memory while tokenizing (lower --chunk_chars, --max_pending or --num_workers); "
                            f"nothing was written to {out_dir}") from None
        pool.shutdown()
        if split_tokens["train"] == 0:  # nothing to pretrain on: an error, and an earlier output stays as it was
            why = dropped_line(counts, rep, ("too_short", "duplicate", "near_duplicate", "unencodable"), "documents")
            raise DataError(f"no document kept for training from {len(sources)} input(s) ({why}); nothing was "
                            f"written to {out_dir}")
        names = writers["train"].finish() + writers["val"].finish()
        paths = out.commit(names + [n[:-4] + ".json" for n in names])[:len(names)]
        ok = True
    except OSError as e:  # a full disk: the old output stays
        raise write_error(e, out_dir) from None
    finally:
        if bar is not None:
            bar.close()
        if not ok:
            _stop_pool(pool, stop)
            for w in writers.values():
                with contextlib.suppress(OSError):
                    w.close()
            out.abort()
    return _pretrain_summary(out_dir, counts, rep, writers, split_tokens, encoded, paths, time.perf_counter() - t0)


def _stop_pool(pool: ProcessPoolExecutor, stop) -> None:
    """Ends the pool soon after an error or Ctrl-C: the queued tasks are cancelled and those in flight end within one
    slice of texts (encode_chunk), so nothing waits for whole chunks and no worker is killed mid-message.

    A Ctrl-C inside the first submit() can land while the pool's manager thread is starting; shutdown() then cannot
    join it yet ("cannot join thread before it is started") and would turn the one-line Ctrl-C into a traceback. Its
    start completes a moment later, so the join is tried again for up to a second; a thread that never started has
    nothing to wait for, and the workers die with this process (die_with_parent)."""
    stop.set()
    for _ in range(100):
        try:
            pool.shutdown(wait=True, cancel_futures=True)
            return
        except RuntimeError:
            time.sleep(0.01)


def _encode_all(pool, sources: list[Source], cfg: Config, writers: dict, rep: Reporter, counts: Counter,
                split_tokens: dict, max_pending: int, bar) -> int:
    """Sends chunks to the pool (at most max_pending in flight) and places the results in input order, so the
    output does not depend on the number of workers. Returns the tokens encoded, duplicates included."""
    seen, near = HashSet(), NearDupIndex(cfg.minhash_bands)
    encoded, t0 = 0, time.perf_counter()
    pending: deque = deque()
    chunks = iter_chunks(sources, cfg, rep, counts)
    exhausted = False
    while pending or not exhausted:
        while not exhausted and len(pending) < max_pending:  # bounded window of tasks, consumed in order
            nxt = next(chunks, None)
            if nxt is None:
                exhausted = True
            else:
                pending.append((nxt[0], pool.submit(encode_chunk, nxt[1])))
        if not pending:
            break
        si, res = pending.popleft()
        hashes, lengths, ids, sigs = res.result()
        encoded += _place_chunk(hashes, lengths, ids, sigs, sources[si], cfg, writers, seen, near, counts,
                                split_tokens)
        if bar is not None:
            bar.update(len(lengths))
            bar.set_postfix_str(f"{encoded / max(time.perf_counter() - t0, 1e-9) / 1e6:.2f}M tok/s", refresh=False)
    return encoded


def dropped_line(counts: Counter, rep: Reporter, dropped: tuple, noun: str) -> str:
    """Why nothing was kept, the reasons that occurred: "read 3 documents; too_short 2, malformed 1". dropped: the
    counts' reasons (filters), then the skipped records' (Reporter)."""
    why = [(k, counts[k]) for k in dropped] + [(k, rep.counts[k]) for k in ("malformed", "missing_field",
                                                                              "undecodable", "too_long")]
    return f"read {counts['read']:,} {noun}" + "".join(
        f"{'; ' if i == 0 else ', '}{k} {n:,}" for i, (k, n) in enumerate((k, n) for k, n in why if n))


def _pretrain_summary(out_dir: str, counts: Counter, rep: Reporter, writers: dict, split_tokens: dict, encoded: int,
                      paths: list[str], elapsed: float) -> dict:
    counts.update({f"bad_{k}": v for k, v in rep.counts.items()})
    total = split_tokens["train"] + split_tokens["val"]
    summary = {"mode": "pretrain", "out_dir": out_dir, "counts": dict(counts),
               "tokens": {s: split_tokens[s] for s in ("train", "val")},
               "documents": {s: w.total_documents for s, w in writers.items()}, "seconds": round(elapsed, 3),
               "encoded_tokens": encoded, "tokens_per_s": round(encoded / max(elapsed, 1e-9)), "paths": paths}
    print(f"pretrain: read {counts['read']:,} documents; kept train {writers['train'].total_documents:,} "
          f"({split_tokens['train']:,} tokens), val {writers['val'].total_documents:,} ({split_tokens['val']:,} tokens); "
          f"dropped: too_short {counts['too_short']:,}, duplicate {counts['duplicate']:,}, "
          f"near_duplicate {counts['near_duplicate']:,}, unencodable {counts['unencodable']:,}; skipped records: "
          f"malformed {rep.counts['malformed']:,}, missing_field {rep.counts['missing_field']:,}, "
          f"undecodable {rep.counts['undecodable']:,}, too_long {rep.counts['too_long']:,}; long documents cut "
          f"into pieces: {counts['cut_long']:,}")
    print(f"pretrain: {total:,} tokens kept; {encoded:,} tokens encoded (duplicates included) in {elapsed:.1f}s = "
          f"{encoded / max(elapsed, 1e-9) / 1e6:.2f}M tokens/s -> {len(paths)} shards: "
          f"{', '.join(os.path.basename(p) for p in paths)} in {out_dir}")
    if writers["val"].total_documents == 0:
        print("warning: the validation split is empty (too few documents); raise --val_fraction", file=sys.stderr)
    return summary


def _place_chunk(hashes, lengths, ids, sigs, src: Source, cfg: Config, writers: dict, seen: HashSet,
                 near: NearDupIndex, counts: Counter, split_tokens: dict) -> int:
    """Decides per document (in input order, so the output does not depend on worker count): drop / train / val."""
    dest = np.zeros(len(lengths), dtype=np.int8)  # 0 dropped, 1 train, 2 val
    in_sorted = seen.seen_before(hashes) if cfg.dedup else None
    kept_docs = {1: 0, 2: 0}
    for i in range(len(lengths)):
        n = int(lengths[i])
        if n < 0:
            counts["unencodable"] += 1
            continue
        h = int(hashes[i])
        if cfg.dedup and not seen.add_if_new(h, bool(in_sorted[i])):
            counts["duplicate"] += 1
            continue
        if cfg.minhash and not near.add_if_new(sigs[i]):
            counts["near_duplicate"] += 1
            continue
        to_val = is_val(h, cfg.val_fraction) or (split_tokens["val"] < cfg.val_min_tokens and split_tokens["kept"] % 2 == 1)
        d = 2 if to_val else 1
        dest[i] = d
        kept_docs[d] += 1
        split_tokens["kept"] += 1
        split_tokens["val" if to_val else "train"] += n
    tok_dest = np.repeat(dest, np.maximum(lengths, 0))
    for d, split in ((1, "train"), (2, "val")):
        if kept_docs[d]:
            part = ids if kept_docs[d] == len(lengths) else ids[tok_dest == d]
            writers[split].write(part, kept_docs[d], src.name)
    return int(ids.size)


# ----------------------------------------------------------------------------------------------------------------
# SFT: single process (conversation files are small next to pretraining corpora), streaming, same bad-input rules

def run_sft(cfg: Config, out_dir: str) -> dict:
    sources = [detect(p, f, cfg) for p, f in parse_inputs(cfg.inputs, cfg.manifest, "sft")]
    for s in sources:
        if s.fmt in PRETRAIN_ONLY:
            raise DataError(f"{s.path}: format {s.fmt!r} holds no conversations "
                            "(SFT formats: sharegpt, instruction, reward, qa, prompt_answer)")
    print(f"sft: {len(sources)} inputs -> {out_dir} | max {cfg.sft_max_chars:,} chars per conversation, "
          f"val fraction {cfg.val_fraction}, at least {cfg.val_min_records} val conversations")
    for s in sources:
        print(f"  {s.path}: {describe_source(s)}")
    folder = OutputFolder(out_dir, "sft", [s.path for s in sources], cfg.overwrite, not (cfg.inputs or cfg.manifest))
    rep, counts = Reporter(cfg.max_reports), Counter()
    seen = HashSet()
    stats = {split: Counter() for split in ("train", "val")}
    srcs = {split: Counter() for split in ("train", "val")}
    files = {}
    t0 = time.perf_counter()
    ok = False
    try:
        for split in ("train", "val"):
            files[split] = io.TextIOWrapper(open_exclusive(folder.path(f"{split}.jsonl")), encoding="utf-8")
        for src in sources:
            for ln, rec in iter_records(src, cfg, rep):
                conv = _conversation(rec, src, ln, cfg, rep, counts)
                if conv is None:
                    continue
                turns, system, n_chars = conv
                key = json.dumps([system] + [[t["role"], t["content"]] for t in turns], ensure_ascii=False)
                h = text_hash(key, cfg.seed)
                if cfg.dedup and not seen.add_if_new(h, False):
                    counts["duplicate"] += 1
                    continue
                kept = stats["train"]["conversations"] + stats["val"]["conversations"]
                to_val = is_val(h, cfg.val_fraction) or (stats["val"]["conversations"] < cfg.val_min_records and kept % 2 == 1)
                split = "val" if to_val else "train"
                out = {"conversations": turns}
                if system:
                    out["system"] = system
                out["source"] = src.name
                files[split].write(json.dumps(out, ensure_ascii=False) + "\n")
                stats[split]["conversations"] += 1
                stats[split]["turns"] += len(turns)
                stats[split]["chars"] += n_chars
                srcs[split][src.name] += 1
        if stats["train"]["conversations"] == 0:  # nothing to fine-tune on: an error, an earlier output stays
            why = dropped_line(counts, rep, ("empty_or_short", "too_long", "duplicate"), "conversations")
            raise DataError(f"no conversation kept for training from {len(sources)} input(s) ({why}); nothing was "
                            f"written to {out_dir}")
        for split, f in files.items():
            f.close()
            _write_sft_sidecar(folder.path(f"{split}.json"), split, stats[split], srcs[split], cfg)
        paths = folder.commit(["train.jsonl", "val.jsonl", "train.json", "val.json"])[:2]
        ok = True
    except OSError as e:  # a full disk: the old output stays
        raise write_error(e, out_dir) from None
    finally:
        if not ok:
            for f in files.values():
                with contextlib.suppress(OSError):
                    f.close()
            folder.abort()
    elapsed = time.perf_counter() - t0
    counts.update({f"bad_{k}": v for k, v in rep.counts.items()})
    print(f"sft: read {counts['read']:,} conversations; kept train {stats['train']['conversations']:,}, "
          f"val {stats['val']['conversations']:,}; dropped: empty_or_short {counts['empty_or_short']:,}, "
          f"too_long {counts['too_long']:,}, duplicate {counts['duplicate']:,}; skipped records: "
          f"malformed {rep.counts['malformed']:,}, missing_field {rep.counts['missing_field']:,}, "
          f"undecodable {rep.counts['undecodable']:,}, too_long {rep.counts['too_long']:,} ({elapsed:.1f}s) -> "
          f"{', '.join(paths)}")
    print(f"sft: turns normalized: merged {counts['merged_turns']:,} (consecutive turns of one role), dropped "
          f"{counts['dropped_last_user']:,} unanswered last user turns and {counts['dropped_first_assistant']:,} "
          "assistant turns before the first user turn")
    return {"mode": "sft", "out_dir": out_dir, "counts": dict(counts),
            "conversations": {s: stats[s]["conversations"] for s in stats}, "seconds": round(elapsed, 3), "paths": paths}


def _conversation(rec: dict, src: Source, ln: int, cfg: Config, rep: Reporter, counts: Counter):
    """A record -> (turns, system, characters) with stripped texts, or None when it is skipped (reported) or
    dropped (counted: empty_or_short, too_long)."""
    try:
        turns, system = record_conversation(rec, src.fmt, counts)
    except BadRecord as e:
        rep.bad("missing_field", src, ln, f"{src.fmt} record: {e}")
        return None
    counts["read"] += 1
    for t in turns:
        t["content"] = t["content"].strip()
    system = system.strip()
    if any(not t["content"] for t in turns if t["role"] == "user") or \
            any(len(t["content"]) < max(cfg.sft_min_answer_chars, 1) for t in turns if t["role"] == "assistant"):
        counts["empty_or_short"] += 1
        return None
    n_chars = sum(len(t["content"]) for t in turns) + len(system)
    if n_chars > cfg.sft_max_chars:
        counts["too_long"] += 1
        return None
    return turns, system, n_chars


def _write_sft_sidecar(path: str, split: str, stats: Counter, sources: Counter, cfg: Config) -> None:
    side = {"format": SFT_FORMAT, "split": split, "conversations": stats["conversations"],
            "turns": stats["turns"], "characters": stats["chars"], "sources": sorted(sources),
            "conversations_per_source": dict(sorted(sources.items())),
            "filters": {"sft_max_chars": cfg.sft_max_chars, "sft_min_answer_chars": cfg.sft_min_answer_chars,
                        "dedup": cfg.dedup, "val_fraction": cfg.val_fraction,
                        "val_min_records": cfg.val_min_records, "seed": cfg.seed}}
    write_json(path, side)


def write_error(e: OSError, out_dir: str) -> DataError:
    """A write that failed (no space left, a quota) -> one line naming the file; the old output is unchanged."""
    return DataError(f"{e.filename or out_dir}: {e.strerror or e}; nothing was written to {out_dir} (its earlier "
                     "content, if any, is unchanged)")


def main(argv: Optional[list[str]] = None) -> list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-"):  # `python data_process.py pretrain --inputs ...` (-h is a flag)
        if argv[0] not in MODES:
            fail(f"unknown mode {argv[0]!r}: expected one of {', '.join(MODES)}")
        argv = ["--mode", argv[0]] + argv[1:]
    cfg = config_or_exit(Config, argv)
    modes = ["pretrain", "sft"] if cfg.mode == "all" else [cfg.mode]
    summaries = []
    with user_errors():
        for mode in modes:
            out_dir = cfg.out_dir or os.path.join("data", mode)
            summaries.append(run_pretrain(cfg, out_dir) if mode == "pretrain" else run_sft(cfg, out_dir))
    return summaries


if __name__ == "__main__":
    with ctrl_c():  # one line, exit 130: the output folder's unfinished copy is already removed
        main()
