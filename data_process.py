"""Turns raw Chinese corpora into training data: uint16 token shards (pretrain) and conversation JSON lines (SFT).

  python data_process.py                                  # the embedded sample: data/sample/{pretrain,sft}/* -> data/{pretrain,sft}
  python data_process.py pretrain --inputs=wiki.json.gz,baike.jsonl --out_dir=data/pretrain
  python data_process.py pretrain --manifest=corpora.txt --num_workers=8 --minhash   # manifest: "path [format]" per line
  python data_process.py pretrain --inputs=notes.txt:txt,dump.parquet               # path:format names the format
  python data_process.py pretrain --inputs=hf://datasets/pleisto/wikipedia-cn-20230720-filtered/wikipedia-cn-20230720-filtered.json
  python data_process.py sft --inputs=alpaca.json,belle.jsonl,sharegpt.jsonl,seed.csv --out_dir=data/sft
  python data_process.py pretrain --inputs=tests/fixtures_data/pretrain/wiki_array.json --out_dir=/tmp/tiny --num_workers=1

Pretrain output (out_dir): train_00000.bin, ..., val_00000.bin, ...: raw uint16 token ids (np.memmap(path, np.uint16, "r")),
every document followed by <eos>=2, each with a sidecar <stem>.json (format baby-llama2-chinese/tokens-v1: tokenizer sha256,
vocab size, dtype, eos id, token/document counts, sources, filters). SFT output: train.jsonl / val.jsonl, one
{"conversations": [{"role": "user"|"assistant", "content"}...], "system"?, "source"} per line, sidecars train.json / val.json.

Formats are detected from the bytes (gzip magic, parquet magic, first non-space character '[' = one JSON array, '{' = JSON
lines; .txt / .csv by extension) and from the keys of the first record; `path:format` overrides the record format. Record
formats (first match wins): sharegpt {conversations}, baike {title, sections}, instruction {instruction, output [, input,
history, system]}, reward {question, response_chosen}, qa {question, answer}, prompt_answer {prompt, answer} (the seed's
CSV), wudao {title, content}, completion {completion} (Wikipedia-cn), text {text}; plain text `txt`: documents are separated
by blank lines (a file without blank lines is one document; documents are cut at a line end after txt_max_chars).
An input `hf://datasets/OWNER/NAME/FILE` is that file of a Hugging Face dataset repo: downloaded once into the Hub's cache
($HF_HOME), then read like a local file; a failed download stops with a one-line error before anything is written.

Bad input: malformed JSON lines / array elements, records without the expected string field and undecodable bytes are
skipped and counted (the first few reported as file:line); an unknown format or an input without records stops with a
one-line error (exit 2) before anything is written. Outputs are written under *.tmp names and renamed only at the end.
"""
from __future__ import annotations

import csv
import glob
import gzip
import hashlib
import io
import itertools
import json
import multiprocessing as mp
import os
import re
import sys
import time
import zlib
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np

from chatglm_tokenizer.tokenizer import hub_download
from configurator import check, config_or_exit

TOKENS_FORMAT = "baby-llama2-chinese/tokens-v1"
SFT_FORMAT = "baby-llama2-chinese/sft-v1"
EOS_ID = 2
MODES = ("pretrain", "sft", "all")
SAMPLE_DIR = os.path.join("data", "sample")
HF_SCHEME = "hf://datasets/"  # an input naming a file of a Hugging Face dataset repo, fetched by fetch_hf


@dataclass
class Config:
    mode: str = "all"  # pretrain | sft | all (both, on the embedded sample); also accepted as the first bare word
    inputs: list[str] = field(default_factory=list)  # comma-separated files (path[:format], hf://...); empty = data/sample/<mode>/*
    manifest: str = ""  # text file, one input per line: "path" or "path format" ('#' starts a comment)
    out_dir: str = ""  # empty = data/<mode>
    tokenizer: str = ""  # explicit tokenizer.model path (else BABYLLAMA_TOKENIZER, chatglm_tokenizer/, ../shared, HF download)
    num_workers: int = 0  # tokenizer processes; 0 = one per CPU core
    chunk_chars: int = 1 << 20  # characters of text per task sent to a worker (bigger = less IPC overhead, more memory)
    max_pending: int = 0  # tasks in flight at once (bounds memory); 0 = 2 * num_workers + 2
    shard_tokens: int = 100_000_000  # a shard is closed once it holds at least this many tokens (documents are never split)
    min_chars: int = 10  # pretrain: drop documents with fewer characters (after stripping)
    txt_max_chars: int = 1 << 20  # plain text: a document is cut at the next line end after this many characters
    dedup: bool = True  # drop exact duplicates (64-bit hash of whitespace-normalized text)
    minhash: bool = False  # pretrain: also drop near-duplicates (MinHash over character 5-grams, LSH)
    minhash_perms: int = 64  # MinHash permutations (signature length)
    minhash_bands: int = 8  # LSH bands; rows = perms / bands; Jaccard threshold ~ (1/bands)^(1/rows) (0.77 for 64/8)
    val_fraction: float = 0.005  # share of documents / conversations held out, chosen by their hash
    val_min_tokens: int = 4096  # pretrain: until val holds this many tokens, every second kept document goes to val
    val_min_records: int = 10  # sft: until val holds this many conversations, every second kept one goes to val
    sft_max_chars: int = 8192  # sft: drop conversations longer than this (characters of all turns and the system text)
    sft_min_answer_chars: int = 1  # sft: drop conversations with an assistant turn shorter than this
    max_reports: int = 5  # bad records reported individually (file:line) per run; all are counted
    max_record_chars: int = 64 << 20  # JSON array: an element longer than this is treated as malformed (bounds memory)
    progress: bool = True  # tqdm progress bar (docs/s, tokens/s) on stderr
    seed: int = 0  # salt of the hash that chooses the validation split

    def validate(self):
        check(self.mode in MODES, f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        check(self.mode != "all" or not (self.inputs or self.manifest or self.out_dir),
              "--inputs/--manifest/--out_dir need a mode: python data_process.py pretrain|sft ...")
        check(not (self.inputs and self.manifest), "give --inputs or --manifest, not both")
        check(self.num_workers >= 0, "--num_workers must be >= 0")
        check(self.chunk_chars >= 1, "--chunk_chars must be >= 1")
        check(self.max_pending >= 0, "--max_pending must be >= 0")
        check(self.shard_tokens >= 1, "--shard_tokens must be >= 1")
        check(self.min_chars >= 0 and self.txt_max_chars >= 1, "--min_chars must be >= 0, --txt_max_chars >= 1")
        check(0.0 <= self.val_fraction < 1.0, "--val_fraction must be in [0, 1)")
        check(self.val_min_tokens >= 0 and self.val_min_records >= 0, "--val_min_tokens/--val_min_records must be >= 0")
        check(self.minhash_perms >= 1 and self.minhash_bands >= 1 and self.minhash_perms % self.minhash_bands == 0,
              "--minhash_perms must be a positive multiple of --minhash_bands")
        check(self.sft_max_chars >= 1 and self.sft_min_answer_chars >= 0, "--sft_max_chars must be >= 1")
        check(self.max_record_chars >= 1024, "--max_record_chars must be >= 1024")


class DataError(Exception):
    """Input that cannot be processed at all (unknown format, empty input, token id out of range): one line, exit 2."""


# ----------------------------------------------------------------------------------------------------------------
# record formats: name -> keys that identify it (first match wins, most specific first)

RECORD_FORMATS = {
    "sharegpt": ("conversations",),
    "baike": ("title", "sections"),
    "instruction": ("instruction", "output"),
    "reward": ("question", "response_chosen"),
    "qa": ("question", "answer"),
    "prompt_answer": ("prompt", "answer"),
    "wudao": ("title", "content"),
    "completion": ("completion",),
    "text": ("text",),
}
OPTIONAL_KEYS = ("summary", "input", "history", "system")  # read when present
PRETRAIN_ONLY = ("baike", "wudao", "completion", "text")
FORMAT_NAMES = tuple(RECORD_FORMATS) + ("txt",)
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
                  "bing": "assistant", "bard": "assistant", "model": "assistant", "system": "system"}


class BadRecord(Exception):
    """A record that is skipped and counted; the message says what was expected."""


def _field(rec: dict, key: str, required: bool = True) -> str:
    value = rec.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise BadRecord(f"expected a string field {key!r}" + ("" if key in rec else " (missing)"))
    return value


def _join(*parts: str) -> str:
    return "\n".join(p for p in parts if p)


def record_conversation(rec: dict, fmt: str) -> tuple[list[dict], str]:
    """A chat-like record -> (turns [{"role","content"}...] starting with user, alternating, ending with assistant, system)."""
    system = ""
    if fmt == "sharegpt":
        convs = rec.get("conversations")
        if not isinstance(convs, list):
            raise BadRecord("expected a list field 'conversations'")
        turns = []
        for t in convs:
            if not isinstance(t, dict):
                raise BadRecord("expected conversation turns as objects")
            role = t.get("from", t.get("role"))
            content = t.get("value", t.get("content"))
            if role not in SHAREGPT_ROLES or not isinstance(content, str):
                raise BadRecord(f"expected turns with from/role in {sorted(SHAREGPT_ROLES)} and a string value/content")
            role = SHAREGPT_ROLES[role]
            if role == "system":
                system = _join(system, content)
            else:
                turns.append({"role": role, "content": content})
        if isinstance(rec.get("system"), str):
            system = _join(rec["system"], system)
        if turns and turns[-1]["role"] == "user":  # a trailing unanswered question carries no supervision
            turns.pop()
        if not turns or any(t["role"] != ("user" if i % 2 == 0 else "assistant") for i, t in enumerate(turns)):
            raise BadRecord("expected turns alternating user/assistant, starting with user")
        return turns, system
    if fmt == "instruction":
        turns = []
        history = rec.get("history") or []
        if not isinstance(history, list):
            raise BadRecord("expected 'history' as a list of [question, answer]")
        for pair in history:
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
                raise BadRecord("expected 'history' items as [question, answer] strings")
            turns += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
        question = _join(_field(rec, "instruction"), _field(rec, "input", required=False))
        turns += [{"role": "user", "content": question}, {"role": "assistant", "content": _field(rec, "output")}]
        system = _field(rec, "system", required=False)
        return turns, system
    if fmt == "reward":
        return [{"role": "user", "content": _field(rec, "question")},
                {"role": "assistant", "content": _field(rec, "response_chosen")}], ""
    if fmt == "qa":
        return [{"role": "user", "content": _field(rec, "question")},
                {"role": "assistant", "content": _field(rec, "answer")}], ""
    if fmt == "prompt_answer":
        return [{"role": "user", "content": _field(rec, "prompt")},
                {"role": "assistant", "content": _field(rec, "answer")}], ""
    raise DataError(f"format {fmt!r} holds no conversations (SFT needs one of: sharegpt, instruction, reward, qa, prompt_answer)")


def record_text(rec: dict, fmt: str) -> str:
    """Any record -> one pretraining document."""
    if fmt in ("completion", "text"):
        return _field(rec, fmt)
    if fmt == "wudao":
        return _join(_field(rec, "title"), _field(rec, "content"))
    if fmt == "baike":
        sections = rec.get("sections")
        if not isinstance(sections, list):
            raise BadRecord("expected a list field 'sections'")
        parts = [_field(rec, "title"), _field(rec, "summary", required=False)]
        for s in sections:
            if not isinstance(s, dict):
                raise BadRecord("expected 'sections' items as objects")
            parts += [_field(s, "title", required=False), _field(s, "content", required=False)]
        return _join(*parts)
    turns, system = record_conversation(rec, fmt)
    return _join(system, *(t["content"] for t in turns))


# ----------------------------------------------------------------------------------------------------------------
# containers: every reader yields (record or None, line number, None or the reason the record is bad)

_WS = re.compile(r"[ \t\n\r]*")
_RESYNC = re.compile(r"\}[ \t\n\r]*,[ \t\n\r]*(?=\{)")
_SURROGATE = re.compile("[\udc80-\udcff]")  # bytes that were not UTF-8, kept by the surrogateescape handler


def open_bytes(path: str):
    """Binary stream of the file's content, gunzipped when it starts with the gzip magic."""
    f = open(path, "rb")
    if f.peek(2)[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=f, mode="rb")
    return f


def _base_ext(path: str) -> str:
    name = path[:-3] if path.endswith(".gz") else path
    return os.path.splitext(name)[1].lower()


def iter_json_array(path: str, read_chars: int = 1 << 20, max_record_chars: int = 64 << 20):
    """Streams the elements of one top-level JSON array with JSONDecoder.raw_decode over a sliding text buffer.

    Memory is one read (read_chars) plus the longest element. Undecodable bytes become lone surrogates
    (surrogateescape) so decoding never stops; records holding them are reported as undecodable. A syntax error
    skips to the next `}, {` boundary and is reported once.
    """
    raw_decode = json.JSONDecoder().raw_decode
    with open_bytes(path) as fb:
        stream = io.TextIOWrapper(fb, encoding="utf-8", errors="surrogateescape")
        buf, pos, eof = "", 0, False
        line, line_pos = 1, 0  # line number of buf[line_pos]; advanced lazily so counting stays O(n)
        dirty = False  # a read held undecodable bytes: check every record from then on
        state = "start"  # start -> first -> (value -> sep)*

        def line_at(p):
            nonlocal line, line_pos
            line += buf.count("\n", line_pos, p)
            line_pos = p
            return line

        def extend(min_new: int) -> bool:
            nonlocal buf, pos, eof, line_pos, dirty
            line_at(pos)
            new = stream.read(max(read_chars, min_new))
            if not new:
                eof = True
                return False
            if not dirty and _SURROGATE.search(new):
                dirty = True
            buf, line_pos, pos = buf[pos:] + new, 0, 0
            return True

        while True:
            pos = _WS.match(buf, pos).end()
            if pos >= len(buf):
                if eof or not extend(0):
                    break
                continue
            c = buf[pos]
            if state == "start":
                if c != "[":
                    raise DataError(f"{path}:{line_at(pos)}: expected a JSON array starting with '['")
                pos, state = pos + 1, "first"
            elif state == "sep":
                if c == ",":
                    pos, state = pos + 1, "value"
                elif c == "]":
                    return
                else:
                    yield None, line_at(pos), "expected ',' or ']' after an array element"
                    state = "resync"
            elif state == "resync":
                m = _RESYNC.search(buf, pos)
                if m:
                    pos, state = m.end(), "value"
                elif eof:
                    return
                else:
                    pos = max(pos, len(buf) - 64)  # keep a tail: the boundary may straddle two reads
                    extend(0)
            else:  # an element is expected
                if c == "]" and state == "first":
                    return
                try:
                    obj, end = raw_decode(buf, pos)
                except json.JSONDecodeError as e:
                    incomplete = e.pos >= len(buf) - 1 or e.msg.startswith("Unterminated string")
                    if incomplete and not eof and len(buf) - pos < max_record_chars:
                        extend(len(buf) - pos)  # doubles the buffer, so a long element costs O(n log n)
                        continue
                    yield None, line_at(pos), f"malformed JSON array element ({e.msg})"
                    pos, state = pos + 1, "resync"
                    continue
                if end >= len(buf) and not eof:  # a number at the end of the buffer may continue
                    extend(0)
                    continue
                ln = line_at(pos)
                if dirty and _SURROGATE.search(buf, pos, end):
                    yield None, ln, "undecodable bytes (not UTF-8)"
                else:
                    yield obj, ln, None
                pos, state = end, "sep"
        if state != "start":
            yield None, line_at(pos), "truncated JSON array (no closing ']')"


def utf8_lines(path: str):
    """(line number, text, None) for each line of a (possibly gzipped) file, or (line number, None, reason) for a
    line that is not UTF-8; a leading byte-order mark is dropped."""
    with open_bytes(path) as fb:
        for ln, raw in enumerate(fb, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield ln, None, f"undecodable bytes (not UTF-8) at byte {e.start}"
                continue
            yield ln, text.lstrip("\ufeff") if ln == 1 else text, None


def iter_json_lines(path: str):
    for ln, text, err in utf8_lines(path):
        if err:
            yield None, ln, err
            continue
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            yield None, ln, f"malformed JSON line ({e.msg})"
            continue
        yield obj, ln, None


def iter_txt(path: str, max_chars: int):
    """Plain text: a blank line ends a document; a document longer than max_chars is cut at a line end."""
    lines, size, start = [], 0, 1
    for ln, text, err in utf8_lines(path):
        if err:
            yield None, ln, f"{err}; line dropped"
            continue
        if not text.strip():
            if lines:
                yield {"text": "".join(lines).strip()}, start, None
            lines, size = [], 0
            continue
        if not lines:
            start = ln
        lines.append(text)
        size += len(text)
        if size >= max_chars:
            yield {"text": "".join(lines).strip()}, start, None
            lines, size = [], 0
    if lines:
        yield {"text": "".join(lines).strip()}, start, None


def iter_csv(path: str):
    with open_bytes(path) as fb:
        stream = io.TextIOWrapper(fb, encoding="utf-8-sig", errors="surrogateescape", newline="")
        reader = csv.DictReader(stream)
        for row in reader:
            ln = reader.line_num
            if None in row or any(v is None for v in row.values()):
                yield None, ln, f"malformed CSV row (expected {len(reader.fieldnames)} columns)"
            elif any(_SURROGATE.search(v) for v in row.values()):
                yield None, ln, "undecodable bytes (not UTF-8)"
            else:
                yield row, ln, None


def iter_parquet(path: str, columns: list[str]):
    import pyarrow.parquet as pq

    ln = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024, columns=columns):
        for row in batch.to_pylist():
            ln += 1
            yield row, ln, None


@dataclass
class Source:
    path: str
    container: str  # array | lines | txt | csv | parquet
    fmt: str  # a RECORD_FORMATS name

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


def iter_container(src: Source, cfg: Config):
    """(record or None, line, None or why the record is bad) of any container; an unreadable file (truncated gzip,
    broken parquet, I/O error) stops with a one-line DataError naming the file."""
    try:
        if src.container == "array":
            yield from iter_json_array(src.path, max_record_chars=cfg.max_record_chars)
        elif src.container == "lines":
            yield from iter_json_lines(src.path)
        elif src.container == "txt":
            yield from iter_txt(src.path, cfg.txt_max_chars)
        elif src.container == "csv":
            yield from iter_csv(src.path)
        elif src.container == "parquet":
            import pyarrow.parquet as pq

            known = {k for keys in RECORD_FORMATS.values() for k in keys} | set(OPTIONAL_KEYS)
            yield from iter_parquet(src.path, [n for n in pq.ParquetFile(src.path).schema_arrow.names if n in known])
        else:
            raise AssertionError(src.container)
    except (OSError, EOFError, zlib.error, csv.Error) as e:
        raise DataError(f"{src.path}: cannot read ({type(e).__name__}: {e})") from None
    except Exception as e:  # pyarrow's errors (ArrowInvalid, ...) without importing pyarrow for every input
        if type(e).__module__.startswith("pyarrow"):
            raise DataError(f"{src.path}: cannot read ({type(e).__name__}: {e})") from None
        raise


def match_format(keys) -> Optional[str]:
    keys = set(keys)
    for name, required in RECORD_FORMATS.items():
        if set(required) <= keys:
            return name
    return None


def detect(path: str, explicit: str, cfg: Config) -> Source:
    """Container from the bytes (and .txt/.csv extension), record format from the first record's keys or `explicit`."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(4)
    ext = _base_ext(path)
    if magic == b"PAR1":
        container = "parquet"
    elif explicit == "txt" or ext == ".txt":
        container = "txt"
    elif ext == ".csv":
        container = "csv"
    else:
        with open_bytes(path) as fb:
            try:
                head = fb.read(1 << 16).decode("utf-8", errors="replace").lstrip("\ufeff \t\r\n")
            except (OSError, EOFError, gzip.BadGzipFile) as e:
                raise DataError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
        if not head:
            raise DataError(f"{path}: empty input")
        if head[0] == "[":
            container = "array"
        elif head[0] == "{":
            container = "lines"
        else:
            raise DataError(f"{path}:1: unknown format: expected a JSON array '[', JSON lines '{{', parquet, "
                            f".txt or .csv (name one with path:format, formats: {', '.join(FORMAT_NAMES)})")
    src = Source(path, container, "text" if container == "txt" else "")
    if container == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        first_keys, first_line = pf.schema_arrow.names, 1
        if pf.metadata.num_rows == 0:
            raise DataError(f"{path}: empty input (no rows)")
    else:
        first_keys, first_line, first_bad = None, 0, ""
        for rec, ln, bad in iter_container(src, cfg):
            first_bad = first_bad or (f"{ln}: {bad}" if bad else "")
            if bad is None:
                first_keys, first_line = (list(rec) if isinstance(rec, dict) else None), ln
                if first_keys is None:
                    raise DataError(f"{path}:{ln}: unknown format: expected JSON objects, got {type(rec).__name__}")
                break
            if ln > 1000:
                break
        if first_keys is None:
            raise DataError(f"{path}:{first_bad}: no readable record at the start of the file" if first_bad
                            else f"{path}: empty input (no records)")
    if explicit and explicit != "txt":
        src.fmt = explicit
    elif container != "txt":
        fmt = match_format(first_keys)
        if fmt is None:
            raise DataError(f"{path}:{first_line}: unknown format: first record has keys {sorted(first_keys)}, expected "
                            + "; ".join(f"{n} {{{', '.join(k)}}}" for n, k in RECORD_FORMATS.items()))
        src.fmt = fmt
    return src


def parse_inputs(cfg: Config, mode: str) -> list[tuple[str, str]]:
    """(path, explicit format or '') for each input: --inputs, --manifest, or the embedded sample of `mode`."""
    specs: list[tuple[str, str]] = []
    if cfg.manifest:
        try:
            with open(cfg.manifest, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError as e:
            raise DataError(f"--manifest {cfg.manifest}: {e.strerror}") from None
        base = os.path.dirname(cfg.manifest)
        for i, line in enumerate(lines, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) > 2 or (len(parts) == 2 and parts[1] not in FORMAT_NAMES):
                raise DataError(f"{cfg.manifest}:{i}: expected 'path' or 'path format' (formats: {', '.join(FORMAT_NAMES)})")
            path = parts[0] if os.path.isabs(parts[0]) or parts[0].startswith(HF_SCHEME) else os.path.join(base, parts[0])
            specs.append((path, parts[1] if len(parts) == 2 else ""))
    elif cfg.inputs:
        for item in cfg.inputs:
            path, sep, fmt = item.rpartition(":")
            if sep and fmt in FORMAT_NAMES:
                specs.append((path, fmt))
            elif sep and not item.startswith(HF_SCHEME) and not os.path.exists(item):
                raise DataError(f"{item}: unknown format {fmt!r} (formats: {', '.join(FORMAT_NAMES)})")
            else:
                specs.append((item, ""))
    else:
        pattern = os.path.join(SAMPLE_DIR, mode, "*")
        specs = [(p, "") for p in sorted(glob.glob(pattern))
                 if os.path.isfile(p) and not p.lower().endswith((".md", ".license")) and "LICENSE" not in p]
        if not specs:
            raise DataError(f"no inputs: {pattern} is empty; pass --inputs or --manifest")
    if not specs:
        raise DataError("no inputs: the manifest lists no files")
    return [(fetch_hf(path) if path.startswith(HF_SCHEME) else path, fmt) for path, fmt in specs]


def fetch_hf(url: str) -> str:
    """hf://datasets/OWNER/NAME/FILE -> local path of FILE of that Hugging Face dataset repo, downloaded on first use
    into the Hub's cache ($HF_HOME, default ~/.cache/huggingface) with its progress bar, then read from there."""
    owner, _, rest = url[len(HF_SCHEME):].partition("/")
    name, _, filename = rest.partition("/")
    if not (owner and name and filename):
        raise DataError(f"{url}: expected {HF_SCHEME}OWNER/NAME/PATH/IN/REPO")
    try:
        return hub_download(f"{owner}/{name}", filename, repo_type="dataset")
    except OSError as e:  # one line, before any output exists
        raise DataError(f"{url}: download failed ({e}); or download it yourself and pass the local path") from None


class Reporter:
    """Counts skipped records by reason and prints the first few as file:line."""

    def __init__(self, max_reports: int):
        self.counts: Counter = Counter()
        self.max_reports = max_reports
        self.shown = 0

    def bad(self, kind: str, src: Source, line: int, reason: str):
        self.counts[kind] += 1
        if self.shown < self.max_reports:
            print(f"warning: {src.path}:{line}: {reason}; skipped", file=sys.stderr)
            self.shown += 1
        elif self.shown == self.max_reports:
            print("warning: more bad records skipped (counted in the summary)", file=sys.stderr)
            self.shown += 1


def _bad_kind(reason: str) -> str:
    return "undecodable" if reason.startswith("undecodable") else "malformed"


def iter_records(src: Source, cfg: Config, rep: Reporter) -> Iterator[tuple]:
    """(line, record dict) for every readable record of `src`; unreadable ones and non-objects are reported."""
    for rec, ln, bad in iter_container(src, cfg):
        if bad is not None:
            rep.bad(_bad_kind(bad), src, ln, bad)
        elif not isinstance(rec, dict):
            rep.bad("malformed", src, ln, f"expected a JSON object, got {type(rec).__name__}")
        else:
            yield ln, rec


def iter_documents(src: Source, cfg: Config, rep: Reporter) -> Iterator[str]:
    for ln, rec in iter_records(src, cfg, rep):
        try:
            yield record_text(rec, src.fmt)
        except BadRecord as e:
            rep.bad("missing_field", src, ln, f"{src.fmt} record: {e}")


# ----------------------------------------------------------------------------------------------------------------
# hashing, dedup, validation split

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


# ----------------------------------------------------------------------------------------------------------------
# pretrain: workers tokenize chunks, the main process filters, splits and writes shards in input order

_WORKER: dict = {}  # per-process state of a pool worker (the tokenizer, loaded once); only the worker functions use it


def _worker_init(tokenizer_path: str, vocab_size: int, minhash_perms: int, seed: int):
    from chatglm_tokenizer.tokenizer import ChatGLMTokenizer

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


def encode_chunk(texts: list[str]) -> tuple:
    """Worker task: -> (hashes uint64 (n,), lengths int64 (n,) incl. <eos> (-1 = not encodable), ids uint16 (sum len,),
    MinHash signatures uint32 (n, perms) or None)."""
    tok, seed = _WORKER["tok"], _WORKER["seed"]
    hashes = np.fromiter((text_hash(t, seed) for t in texts), dtype=np.uint64, count=len(texts))
    try:
        # one sentencepiece thread per process: the pool already uses every core (measured: no gain from 2 threads)
        encoded = tok.encode_batch(texts, num_threads=1)
    except (UnicodeError, RuntimeError, TypeError):  # lone surrogates from JSON escapes: encode one by one
        encoded = []
        for t in texts:
            try:
                encoded.append(tok.encode(t))
            except (UnicodeError, RuntimeError, TypeError):
                encoded.append(None)
    lengths = np.array([len(e) + 1 if e is not None else -1 for e in encoded], dtype=np.int64)
    kept = [e for e in encoded if e is not None]
    for e in kept:
        e.append(EOS_ID)  # every document ends with <eos>
    try:  # straight to uint16 (numpy raises OverflowError for ids > 65535); to_uint16 then checks < vocab_size
        flat = np.fromiter(itertools.chain.from_iterable(kept), dtype=np.uint16, count=int(lengths[lengths > 0].sum()))
    except OverflowError as e:
        raise DataError(f"{e}: token id does not fit uint16: wrong tokenizer.model?") from None
    ids = to_uint16(flat, _WORKER["vocab_size"])
    sigs = None
    if _WORKER["minhash"] is not None:
        a, b = _WORKER["minhash"]
        sigs = np.stack([minhash_signature(t, a, b) for t in texts]) if texts else None
    return hashes, lengths, ids, sigs


class ShardWriter:
    """Writes one split as <split>_NNNNN.bin.tmp (+ .json.tmp sidecars); finish() renames them; abort() deletes them."""

    def __init__(self, out_dir: str, split: str, shard_tokens: int, meta: dict):
        self.out_dir, self.split, self.shard_tokens, self.meta = out_dir, split, shard_tokens, meta
        self.done: list[str] = []  # final paths of closed shards
        self.f = None
        self.tokens = self.documents = 0
        self.total_tokens = self.total_documents = 0
        self.sources: Counter = Counter()

    def _path(self, index: int, ext: str) -> str:
        return os.path.join(self.out_dir, f"{self.split}_{index:05d}{ext}")

    def write(self, ids: np.ndarray, documents: int, source: str):
        if documents == 0:
            return
        if self.f is None:
            self.f = open(self._path(len(self.done), ".bin.tmp"), "wb")
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
        with open(self._path(index, ".json.tmp"), "w", encoding="utf-8") as f:
            json.dump(side, f, ensure_ascii=False, indent=1)
        self.done.append(self._path(index, ".bin"))
        self.total_tokens += self.tokens
        self.total_documents += self.documents
        self.tokens = self.documents = 0
        self.sources = Counter()

    def finish(self) -> list[str]:
        """Closes the last shard, removes shards of an earlier run, renames sidecars then .bin files into place."""
        if self.f is not None:
            self._close_shard()
        stale = set(glob.glob(os.path.join(self.out_dir, f"{self.split}_*.bin")) +
                    glob.glob(os.path.join(self.out_dir, f"{self.split}_*.json"))) - set(self.done) - \
            {p[:-4] + ".json" for p in self.done}
        for p in sorted(stale):
            os.remove(p)
        for p in self.done:
            os.replace(p[:-4] + ".json.tmp", p[:-4] + ".json")
        for p in self.done:
            os.replace(p + ".tmp", p)
        for p in glob.glob(os.path.join(self.out_dir, f"{self.split}_*.tmp")):  # left by a killed earlier run
            os.remove(p)
        return self.done

    def abort(self):
        if self.f is not None:
            self.f.close()
            self.f = None
        for p in glob.glob(os.path.join(self.out_dir, f"{self.split}_*.tmp")):
            os.remove(p)


def iter_chunks(sources: list[Source], cfg: Config, rep: Reporter, counts: Counter):
    """(source index, [texts]) of about cfg.chunk_chars characters; short documents are dropped here (cheap)."""
    for si, src in enumerate(sources):
        texts, size = [], 0
        for text in iter_documents(src, cfg, rep):
            counts["read"] += 1
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
    sources = [detect(p, f, cfg) for p, f in parse_inputs(cfg, "pretrain")]
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
    print(f"pretrain: {len(sources)} inputs -> {out_dir} | {workers} workers, {cfg.chunk_chars:,} chars/task, "
          f"<= {max_pending} tasks in flight, shards of >= {cfg.shard_tokens:,} tokens")
    for s in sources:
        print(f"  {s.path}: {s.container} of {s.fmt}")
    os.makedirs(out_dir, exist_ok=True)
    writers = {split: ShardWriter(out_dir, split, cfg.shard_tokens, meta) for split in ("train", "val")}
    rep, counts = Reporter(cfg.max_reports), Counter()
    seen, near = HashSet(), NearDupIndex(cfg.minhash_bands)
    split_tokens = {"train": 0, "val": 0, "kept": 0}  # tokens per split, documents kept so far
    encoded = 0  # tokens produced by the workers, duplicates included (the pipeline's throughput)
    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(unit=" docs", desc="pretrain", dynamic_ncols=True, mininterval=0.5, file=sys.stderr)
    t0 = time.perf_counter()
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    pool = ctx.Pool(workers, initializer=_worker_init,
                    initargs=(tok.path, tok.vocab_size, cfg.minhash_perms if cfg.minhash else 0, cfg.seed))
    ok = False
    try:
        pending: deque = deque()
        chunks = iter_chunks(sources, cfg, rep, counts)
        exhausted = False
        while pending or not exhausted:
            while not exhausted and len(pending) < max_pending:  # bounded window of tasks, consumed in order
                nxt = next(chunks, None)
                if nxt is None:
                    exhausted = True
                else:
                    pending.append((nxt[0], pool.apply_async(encode_chunk, (nxt[1],))))
            if not pending:
                break
            si, res = pending.popleft()
            hashes, lengths, ids, sigs = res.get()
            encoded += _place_chunk(hashes, lengths, ids, sigs, sources[si], cfg, writers, seen, near, counts,
                                    split_tokens)
            if bar is not None:
                bar.update(len(lengths))
                bar.set_postfix_str(f"{encoded / max(time.perf_counter() - t0, 1e-9) / 1e6:.2f}M tok/s", refresh=False)
        pool.close()
        pool.join()
        paths = writers["train"].finish() + writers["val"].finish()
        ok = True
    finally:
        if bar is not None:
            bar.close()
        if not ok:
            pool.terminate()
            for w in writers.values():
                w.abort()
    elapsed = time.perf_counter() - t0
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
          f"undecodable {rep.counts['undecodable']:,}")
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
    sources = [detect(p, f, cfg) for p, f in parse_inputs(cfg, "sft")]
    for s in sources:
        if s.fmt in PRETRAIN_ONLY:
            raise DataError(f"{s.path}: format {s.fmt!r} holds no conversations "
                            "(SFT formats: sharegpt, instruction, reward, qa, prompt_answer)")
    print(f"sft: {len(sources)} inputs -> {out_dir} | max {cfg.sft_max_chars:,} chars per conversation, "
          f"val fraction {cfg.val_fraction}, at least {cfg.val_min_records} val conversations")
    for s in sources:
        print(f"  {s.path}: {s.container} of {s.fmt}")
    os.makedirs(out_dir, exist_ok=True)
    rep, counts = Reporter(cfg.max_reports), Counter()
    seen = HashSet()
    stats = {split: Counter() for split in ("train", "val")}
    srcs = {split: Counter() for split in ("train", "val")}
    tmp = {split: os.path.join(out_dir, f"{split}.jsonl.tmp") for split in ("train", "val")}
    files = {split: open(p, "w", encoding="utf-8") for split, p in tmp.items()}
    t0 = time.perf_counter()
    ok = False
    try:
        for src in sources:
            for ln, rec in iter_records(src, cfg, rep):
                try:
                    turns, system = record_conversation(rec, src.fmt)
                except BadRecord as e:
                    rep.bad("missing_field", src, ln, f"{src.fmt} record: {e}")
                    continue
                counts["read"] += 1
                for t in turns:
                    t["content"] = t["content"].strip()
                system = system.strip()
                if any(not t["content"] for t in turns if t["role"] == "user") or \
                        any(len(t["content"]) < max(cfg.sft_min_answer_chars, 1) for t in turns if t["role"] == "assistant"):
                    counts["empty_or_short"] += 1
                    continue
                n_chars = sum(len(t["content"]) for t in turns) + len(system)
                if n_chars > cfg.sft_max_chars:
                    counts["too_long"] += 1
                    continue
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
        for split, f in files.items():
            f.close()
            side = {"format": SFT_FORMAT, "split": split, "conversations": stats[split]["conversations"],
                    "turns": stats[split]["turns"], "characters": stats[split]["chars"], "sources": sorted(srcs[split]),
                    "conversations_per_source": dict(sorted(srcs[split].items())),
                    "filters": {"sft_max_chars": cfg.sft_max_chars, "sft_min_answer_chars": cfg.sft_min_answer_chars,
                                "dedup": cfg.dedup, "val_fraction": cfg.val_fraction,
                                "val_min_records": cfg.val_min_records, "seed": cfg.seed}}
            with open(os.path.join(out_dir, f"{split}.json.tmp"), "w", encoding="utf-8") as f:
                json.dump(side, f, ensure_ascii=False, indent=1)
        for split in files:
            os.replace(os.path.join(out_dir, f"{split}.json.tmp"), os.path.join(out_dir, f"{split}.json"))
        for split in files:
            os.replace(tmp[split], os.path.join(out_dir, f"{split}.jsonl"))
        ok = True
    finally:
        if not ok:
            for split, f in files.items():
                f.close()
                for p in (tmp[split], os.path.join(out_dir, f"{split}.json.tmp")):
                    if os.path.exists(p):
                        os.remove(p)
    elapsed = time.perf_counter() - t0
    paths = [os.path.join(out_dir, f"{s}.jsonl") for s in ("train", "val")]
    counts.update({f"bad_{k}": v for k, v in rep.counts.items()})
    print(f"sft: read {counts['read']:,} conversations; kept train {stats['train']['conversations']:,}, "
          f"val {stats['val']['conversations']:,}; dropped: empty_or_short {counts['empty_or_short']:,}, "
          f"too_long {counts['too_long']:,}, duplicate {counts['duplicate']:,}; skipped records: "
          f"malformed {rep.counts['malformed']:,}, missing_field {rep.counts['missing_field']:,}, "
          f"undecodable {rep.counts['undecodable']:,} ({elapsed:.1f}s) -> {', '.join(paths)}")
    return {"mode": "sft", "out_dir": out_dir, "counts": dict(counts),
            "conversations": {s: stats[s]["conversations"] for s in stats}, "seconds": round(elapsed, 3), "paths": paths}


def main(argv: Optional[list[str]] = None) -> list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-"):  # `python data_process.py pretrain --inputs ...` (-h is a flag)
        if argv[0] not in MODES:
            print(f"error: unknown mode {argv[0]!r}: expected one of {', '.join(MODES)}", file=sys.stderr)
            raise SystemExit(2)
        argv = ["--mode", argv[0]] + argv[1:]
    cfg = config_or_exit(Config, argv)
    modes = ["pretrain", "sft"] if cfg.mode == "all" else [cfg.mode]
    summaries = []
    try:
        for mode in modes:
            out_dir = cfg.out_dir or os.path.join("data", mode)
            summaries.append(run_pretrain(cfg, out_dir) if mode == "pretrain" else run_sft(cfg, out_dir))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return summaries


if __name__ == "__main__":
    main()
