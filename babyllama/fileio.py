"""The one way files are written, and the one JSON-lines reader.

  with atomic_file("out/x/summary.json") as f: f.write(b"...")  # whole or not at all, never through a link
  write_atomic("report.md", text); write_json("report.json", obj)
  for lineno, rec in read_jsonl("data.jsonl", "a {\"question\", \"answer\"} object"): ...
  records = load_qa("medical_qa.jsonl")  # an eval set, checked line by line (no torch: speedrun.sh checks it first)

A write goes to a temp file created exclusively (O_EXCL: never an existing file, never a link) in the target's
folder, is flushed to disk, then renamed over the target: a kill at any moment leaves the old file or the new one,
and a link planted at the target is replaced, not followed. Temp files of a killed writer are removed by the next
write of the same file.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import tempfile
from typing import Iterator

from babyllama.errors import DataError


def open_exclusive(path: str):
    """A new file at `path` for writing, created by this call (O_CREAT|O_EXCL): a leftover or a planted symlink
    there is removed first (unlink never follows a link), and the open itself never follows one."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    return os.fdopen(fd, "wb")


def open_append(path: str):
    """A log file opened for appending (text, UTF-8), never through a link (a link there is removed), and with a
    last line that a kill cut short dropped, so the next line starts on its own."""
    if os.path.islink(path):
        os.unlink(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0), 0o644)
    size = os.fstat(fd).st_size
    if size:
        tail = os.pread(fd, min(size, 1 << 16), max(0, size - (1 << 16)))
        if not tail.endswith(b"\n"):
            cut = tail.rfind(b"\n")
            os.ftruncate(fd, size - len(tail) + cut + 1 if cut >= 0 else (0 if size <= 1 << 16 else size))
    return os.fdopen(fd, "a", encoding="utf-8")


def _temp_prefix(path: str) -> str:
    return "." + os.path.basename(path) + ".tmp-"


def sweep_temps(path: str) -> None:
    """Removes the temp files that killed writers of `path` left beside it."""
    folder = os.path.dirname(os.path.abspath(path))
    for leftover in glob.glob(os.path.join(glob.escape(folder), glob.escape(_temp_prefix(path)) + "*")):
        with contextlib.suppress(OSError):
            os.unlink(leftover)


@contextlib.contextmanager
def atomic_file(path: str):
    """A binary file object whose content replaces `path` when the block ends without an error (fsync, then
    rename); on an error the temp file is removed and `path` is unchanged."""
    sweep_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), dir=os.path.dirname(os.path.abspath(path)))
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_atomic(path: str, data) -> None:
    """Writes text (UTF-8) or bytes to `path` whole or not at all (atomic_file)."""
    with atomic_file(path) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)


def write_json(path: str, obj, indent: int = 1) -> None:
    write_atomic(path, json.dumps(obj, ensure_ascii=False, indent=indent))


def read_jsonl(path: str, expected: str = "a JSON object", torn_tail_ok: bool = False) -> Iterator[tuple]:
    """(line number, object) for each non-blank line of a JSON-lines file (a UTF-8 BOM is allowed). A line that is
    not UTF-8, not JSON or not an object is a DataError naming the file, the line and `expected`; with
    `torn_tail_ok`, a last line cut short by a kill (no newline, not JSON) is skipped instead."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 (byte {e.start}: GB18030 or GBK text?); convert the "
                                "file to UTF-8, e.g. with iconv -f GB18030 -t UTF-8") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                if torn_tail_ok and not raw.endswith(b"\n"):
                    return  # the last line, written only in part
                raise DataError(f"{path}:{lineno}: not JSON ({e.msg}); expected {expected} per line") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{lineno}: expected {expected}, got {type(rec).__name__}")
            yield lineno, rec


def load_qa(path: str) -> list:
    """JSON lines of {"question", "answer"?} -> list of dicts; one-line DataError naming file:line on bad input.

    Either every record has a string "answer" (scored) or none has (generate only)."""

    records, with_answer = [], []
    try:
        rows = list(read_jsonl(path, 'a JSON object with "question" and "answer"'))
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    for lineno, rec in rows:
        if not isinstance(rec.get("question"), str) or not rec["question"].strip():
            what = "missing field" if "question" not in rec else "empty or non-string field"
            raise DataError(f"{path}:{lineno}: {what} \"question\" (expected a non-empty string)")
        if "answer" in rec and not isinstance(rec["answer"], str):
            raise DataError(f"{path}:{lineno}: field \"answer\" must be a string, got {type(rec['answer']).__name__}")
        if with_answer and ("answer" in rec) != with_answer[0][1]:
            first_line, first_has = with_answer[0]
            missing_at = lineno if first_has else first_line
            raise DataError(f"{path}:{missing_at}: missing field \"answer\" (other lines have one: "
                            f"give every question a reference answer, or none)")
        with_answer.append((lineno, "answer" in rec))
        records.append(rec)
    if not records:
        raise DataError(f"{path}: empty; expected JSON lines of {{\"question\", \"answer\"}}")
    return records
