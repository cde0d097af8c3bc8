"""Input corpora: formats, their detection, and streaming readers that never load a whole file.

Library module for data_process.py (no command line). A corpus file becomes a `Source` (path, container, record
format) by `detect`; `iter_records` / `iter_documents` then stream it:
  src = detect("wiki.json.gz", "", ReadOptions())        # container from the bytes, format from the first record
  for text in iter_documents(src, ReadOptions(), Reporter(5)): ...

Containers are detected from the bytes (gzip magic, parquet magic, first non-space character '[' = one JSON array,
'{' = JSON lines; .txt / .csv by extension). Record formats (first match wins): sharegpt {conversations}, baike
{title, sections}, instruction {instruction, output [, input, history, system]}, reward {question, response_chosen},
qa {question, answer}, prompt_answer {prompt, answer}, wudao {title, content}, completion {completion}, text {text};
plain text `txt`: documents are separated by blank lines (documents are cut at a line end after txt_max_chars).
An input `hf://datasets/OWNER/NAME/FILE` is that file of a Hugging Face dataset repo, downloaded once into the Hub's
cache ($HF_HOME) by `parse_inputs`, then read like a local file.

Bad records (malformed JSON, a missing string field, bytes that are not UTF-8) are skipped and counted by a Reporter;
a file that cannot be read at all, an unknown format or an empty input is a one-line DataError.
"""
from __future__ import annotations

import codecs
import csv
import glob
import gzip
import io
import json
import os
import re
import sys
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Iterator, Optional

from babyllama.hub import hub_download
from babyllama.errors import DataError

SAMPLE_DIR = os.path.join("data", "sample")
HF_SCHEME = "hf://datasets/"  # an input naming a file of a Hugging Face dataset repo, fetched by fetch_hf


@dataclass
class ReadOptions:
    """Limits of the readers (data_process.Config extends this, so its flags set them)."""
    txt_max_chars: int = 1 << 20  # plain text: a document is cut at the next line end after this many characters
    # (a longer line is cut too); memory stays bounded whatever the line lengths
    max_record_chars: int = 16 << 20  # a JSON array element of more characters, or a JSON line of more bytes, is
    # skipped and counted as too_long (bounds memory)


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


def normalize_turns(turns: list[dict], stats: Counter) -> list[dict]:
    """Turns that can train: consecutive turns of one role merged (one text, lines joined), assistant turns before
    the first user turn and an unanswered last user turn dropped; each change counted in `stats`."""
    out: list[dict] = []
    for t in turns:
        if out and out[-1]["role"] == t["role"]:
            out[-1] = {"role": t["role"], "content": _join(out[-1]["content"], t["content"])}
            stats["merged_turns"] += 1
        elif not out and t["role"] == "assistant":
            stats["dropped_first_assistant"] += 1
        else:
            out.append(t)
    if out and out[-1]["role"] == "user":  # a trailing unanswered question carries no supervision
        out.pop()
        stats["dropped_last_user"] += 1
    return out


def record_conversation(rec: dict, fmt: str, stats: Optional[Counter] = None) -> tuple[list[dict], str]:
    """A chat-like record -> (turns [{"role","content"}...] starting with user, alternating, ending with assistant, system);
    ShareGPT turns are normalized (normalize_turns, counted in `stats`)."""
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
        turns = normalize_turns(turns, Counter() if stats is None else stats)
        if not turns:
            raise BadRecord("expected a user turn followed by an assistant turn")
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
    if fmt in ("reward", "qa", "prompt_answer"):  # one question, one answer: the format's two keys
        question, answer = RECORD_FORMATS[fmt]
        return [{"role": "user", "content": _field(rec, question)},
                {"role": "assistant", "content": _field(rec, answer)}], ""
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


class _TextWindow:
    """A sliding window over a text stream: buf[pos:] is not consumed yet. Line numbers are counted lazily, up to
    the position asked for, so counting stays O(n) over the file."""

    def __init__(self, stream, read_chars: int):
        self.stream, self.read_chars = stream, read_chars
        self.buf, self.pos, self.eof = "", 0, False
        self.line, self.line_pos = 1, 0  # line number of buf[line_pos]
        self.dirty = False  # a read held undecodable bytes: check every record from then on

    def line_at(self, p: int) -> int:
        self.line += self.buf.count("\n", self.line_pos, p)
        self.line_pos = p
        return self.line

    def extend(self, min_new: int = 0) -> bool:
        """Drops the consumed text and reads at least max(read_chars, min_new) more; False at the end of the file."""
        self.line_at(self.pos)
        new = self.stream.read(max(self.read_chars, min_new))
        if not new:
            self.eof = True
            return False
        if not self.dirty and _SURROGATE.search(new):
            self.dirty = True
        self.buf, self.line_pos, self.pos = self.buf[self.pos:] + new, 0, 0
        return True


def iter_json_array(path: str, read_chars: int = 1 << 20, max_record_chars: int = 64 << 20):
    """Streams the elements of one top-level JSON array with JSONDecoder.raw_decode over a sliding text buffer.

    Memory is one read (read_chars) plus the longest element. Undecodable bytes become lone surrogates
    (surrogateescape) so decoding never stops; records holding them are reported as undecodable. A syntax error
    skips to the next `}, {` boundary and is reported once.
    """
    raw_decode = json.JSONDecoder().raw_decode
    too_long = f"too long: an array element of more than {max_record_chars:,} characters (--max_record_chars)"
    with open_bytes(path) as fb:
        # utf-8-sig: a leading byte-order mark (as Windows tools write) is not part of the array
        w = _TextWindow(io.TextIOWrapper(fb, encoding="utf-8-sig", errors="surrogateescape"), read_chars)
        state = "start"  # start -> first -> (value -> sep)*
        while True:
            w.pos = _WS.match(w.buf, w.pos).end()
            if w.pos >= len(w.buf):
                if w.eof or not w.extend():
                    break
                continue
            c = w.buf[w.pos]
            if state == "start":
                if c != "[":
                    raise DataError(f"{path}:{w.line_at(w.pos)}: expected a JSON array starting with '['")
                w.pos, state = w.pos + 1, "first"
            elif state == "sep":
                if c == ",":
                    w.pos, state = w.pos + 1, "value"
                elif c == "]":
                    return
                else:
                    yield None, w.line_at(w.pos), "expected ',' or ']' after an array element"
                    state = "resync"
            elif state == "resync":
                m = _RESYNC.search(w.buf, w.pos)
                if m:
                    w.pos, state = m.end(), "value"
                elif w.eof:
                    return
                else:
                    w.pos = max(w.pos, len(w.buf) - 64)  # keep a tail: the boundary may straddle two reads
                    w.extend()
            else:  # an element is expected
                if c == "]" and state == "first":
                    return
                try:
                    obj, end = raw_decode(w.buf, w.pos)
                except json.JSONDecodeError as e:
                    incomplete = e.pos >= len(w.buf) - 1 or e.msg.startswith("Unterminated string")
                    if incomplete and not w.eof and len(w.buf) - w.pos < max_record_chars:
                        w.extend(min(len(w.buf) - w.pos, max_record_chars))  # doubles the buffer: O(n log n)
                        continue
                    yield None, w.line_at(w.pos), too_long if incomplete and not w.eof else \
                        f"malformed JSON array element ({e.msg})"
                    w.pos, state = w.pos + 1, "resync"
                    continue
                if end >= len(w.buf) and not w.eof:  # a number at the end of the buffer may continue
                    w.extend()
                    continue
                ln = w.line_at(w.pos)
                if end - w.pos > max_record_chars:  # read whole by the last doubling of the buffer
                    yield None, ln, too_long
                elif w.dirty and _SURROGATE.search(w.buf, w.pos, end):
                    yield None, ln, "undecodable bytes (not UTF-8)"
                else:
                    yield obj, ln, None
                w.pos, state = end, "sep"
        if state != "start":
            yield None, w.line_at(w.pos), "truncated JSON array (no closing ']')"


def bounded_lines(fb, max_bytes: int):
    """(line number, bytes, part) for each line of a binary stream, never reading more than max_bytes at once:
    part 0 = a whole line; a longer line comes as consecutive pieces, part 1 for each but the last, 2 for the last."""
    ln, raw = 0, fb.readline(max_bytes)
    while raw:
        ln, part = ln + 1, 0
        while not raw.endswith(b"\n") and len(raw) == max_bytes:  # the line may go on
            more = fb.readline(max_bytes)
            if not more:
                break
            yield ln, raw, 1
            raw, part = more, 2
        yield ln, raw, part
        raw = fb.readline(max_bytes)


def utf8_lines(path: str, max_bytes: int, pieces: bool = False):
    """(line number, text, None) for each line of a (possibly gzipped) file, or (line number, None, reason) for a
    line that is not UTF-8; a leading byte-order mark is dropped. A line longer than max_bytes is skipped as too
    long, or with `pieces` comes as several texts (decoded incrementally, so memory stays about max_bytes)."""
    with open_bytes(path) as fb:
        skip, dec, dec_ln = 0, None, 0
        for ln, raw, part in bounded_lines(fb, max_bytes):
            if ln == skip:
                continue
            if part and not pieces:
                skip = ln
                yield ln, None, f"too long: a line of more than {max_bytes:,} bytes (--max_record_chars)"
                continue
            if dec_ln != ln:
                dec, dec_ln = codecs.getincrementaldecoder("utf-8")(), ln
            try:
                text = dec.decode(raw, final=part != 1)
            except UnicodeDecodeError as e:
                skip = ln
                yield ln, None, f"undecodable bytes (not UTF-8) at byte {e.start}"
                continue
            yield ln, text.lstrip("\ufeff") if ln == 1 else text, None


def iter_json_lines(path: str, max_bytes: int):
    for ln, text, err in utf8_lines(path, max_bytes):
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
    """Plain text: a blank line ends a document; a document longer than max_chars is cut at a line end (a line
    longer than max_chars bytes is cut too)."""
    lines, size, start = [], 0, 1
    for ln, text, err in utf8_lines(path, max_chars, pieces=True):
        if err:
            yield None, ln, f"{err}; line dropped"
            continue
        if not text.strip():
            if lines:
                yield {"text": "".join(lines).strip()}, start, None
            lines, size = [], 0
            continue
        start = start if lines else ln
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

    batches = pq.ParquetFile(path).iter_batches(batch_size=1024, columns=columns)
    for ln, row in enumerate((row for batch in batches for row in batch.to_pylist()), 1):
        yield row, ln, None


@dataclass
class Source:
    path: str
    container: str  # array | lines | txt | csv | parquet
    fmt: str  # a RECORD_FORMATS name

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


def iter_container(src: Source, opts: ReadOptions):
    """(record or None, line, None or why the record is bad) of any container; an unreadable file (truncated gzip,
    broken parquet, I/O error) stops with a one-line DataError naming the file."""
    try:
        if src.container == "array":
            yield from iter_json_array(src.path, max_record_chars=opts.max_record_chars)
        elif src.container == "lines":
            yield from iter_json_lines(src.path, opts.max_record_chars)
        elif src.container == "txt":
            yield from iter_txt(src.path, opts.txt_max_chars)
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


def detect(path: str, explicit: str, opts: ReadOptions) -> Source:
    """Container from the bytes (and .txt/.csv extension), record format from the first record's keys or `explicit`."""
    if os.path.isdir(path):
        raise DataError(f"{path}: is a folder; name its files (--inputs=a.jsonl,b.jsonl or one per line in --manifest)")
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
        for rec, ln, bad in iter_container(src, opts):
            first_bad = first_bad or (f"{ln}: {bad}" if bad else "")
            if bad is None:
                first_keys, first_line = (list(rec) if isinstance(rec, dict) else None), ln
                if first_keys is None:
                    raise DataError(f"{path}:{ln}: unknown format: expected JSON objects, got {type(rec).__name__}")
                break
            if ln > 1000:
                break
        if first_keys is None and "not UTF-8" in first_bad:
            raise DataError(f"{path}:{first_bad.split(':')[0]}: not UTF-8 (GB18030 or GBK text?); convert it first, "
                            f"e.g. iconv -f GB18030 -t UTF-8 {path} > utf8{_base_ext(path)}")
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


def parse_inputs(inputs: list[str], manifest: str, mode: str) -> list[tuple[str, str]]:
    """(local path, explicit format or '') for each input: `inputs` (path[:format] or hf://...), else the `manifest`
    file ("path [format]" per line), else the embedded sample of `mode`; hf:// inputs are downloaded here."""
    specs: list[tuple[str, str]] = []
    if manifest:
        try:
            with open(manifest, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError as e:
            raise DataError(f"--manifest {manifest}: {e.strerror}") from None
        base = os.path.dirname(manifest)
        for i, line in enumerate(lines, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) > 2 or (len(parts) == 2 and parts[1] not in FORMAT_NAMES):
                raise DataError(f"{manifest}:{i}: expected 'path' or 'path format' (formats: {', '.join(FORMAT_NAMES)})")
            path = parts[0] if os.path.isabs(parts[0]) or parts[0].startswith(HF_SCHEME) else os.path.join(base, parts[0])
            specs.append((path, parts[1] if len(parts) == 2 else ""))
    elif inputs:
        for item in inputs:
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
    return "undecodable" if reason.startswith("undecodable") else "too_long" if reason.startswith("too long") \
        else "malformed"


def iter_records(src: Source, opts: ReadOptions, rep: Reporter) -> Iterator[tuple]:
    """(line, record dict) for every readable record of `src`; unreadable ones and non-objects are reported."""
    for rec, ln, bad in iter_container(src, opts):
        if bad is not None:
            rep.bad(_bad_kind(bad), src, ln, bad)
        elif not isinstance(rec, dict):
            rep.bad("malformed", src, ln, f"expected a JSON object, got {type(rec).__name__}")
        else:
            yield ln, rec


def iter_documents(src: Source, opts: ReadOptions, rep: Reporter) -> Iterator[str]:
    for ln, rec in iter_records(src, opts, rep):
        try:
            yield record_text(rec, src.fmt)
        except BadRecord as e:
            rep.bad("missing_field", src, ln, f"{src.fmt} record: {e}")

