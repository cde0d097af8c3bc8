"""Output folders of data_process.py: the new output is written beside the old one, then the two are swapped, so a
kill at any moment leaves the complete old or the complete new output; a folder is replaced only when it holds
nothing but what data_process.py wrote there for the same mode (listed in its manifest.json), or with --overwrite.

Library module for data_process.py (no command line):
  out = OutputFolder("data/pretrain", "pretrain", inputs, overwrite=False)   # checks and locks, before any work
  open(out.path("train_00000.bin"), "wb")                                   # inside <parent>/.pretrain.new
  out.commit(["train_00000.bin", ...])                                      # manifest.json, then the swap
  out.abort()                                                               # deletes the unfinished new folder

commit() writes manifest.json (mode, inputs, the files) last, renames the old folder to <parent>/.<name>.old, the
new one to <name>, then deletes the old one. A run killed between the two renames is finished by the next run into
the same folder: a .new folder with a manifest is complete and takes the place, else the .old folder is put back.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
from typing import Optional

from babyllama.errors import DataError
from babyllama.fileio import write_json

MANIFEST = "manifest.json"
OUTPUT_FORMAT = "baby-llama2-chinese/output-v1"


def _between_renames() -> None:
    """Called after the old folder was moved aside and before the new one takes its place (tests kill here)."""


def read_manifest(folder: str) -> Optional[dict]:
    """The folder's manifest.json when it is one of ours, else None."""
    try:
        with open(os.path.join(folder, MANIFEST), encoding="utf-8") as f:
            m = json.load(f)
    except (OSError, ValueError):
        return None
    ok = isinstance(m, dict) and m.get("format") == OUTPUT_FORMAT and isinstance(m.get("files"), list)
    return m if ok else None


def recover(out_dir: str, new: str, old: str) -> None:
    """Finishes or undoes a swap that a kill interrupted, then removes the leftovers of earlier runs."""
    if not os.path.exists(out_dir):
        if os.path.isdir(new) and read_manifest(new) is not None:
            os.rename(new, out_dir)  # killed between the renames: the new output was complete
        elif os.path.isdir(old):
            os.rename(old, out_dir)  # the complete old output goes back
    for leftover in (new, old):
        if os.path.isdir(leftover):
            shutil.rmtree(leftover)


def check_replaceable(out_dir: str, mode: str, inputs: list[str], overwrite: bool, sample: bool) -> None:
    """One-line DataError unless out_dir is missing, empty, or holds only this script's earlier `mode` output."""
    if not os.path.exists(out_dir):
        return
    if not os.path.isdir(out_dir):
        raise DataError(f"--out_dir {out_dir}: exists and is not a folder")
    names = sorted(os.listdir(out_dir))
    folders = [n for n in names if os.path.isdir(os.path.join(out_dir, n))]
    if folders:
        raise DataError(f"--out_dir {out_dir}: holds folders ({', '.join(folders[:3])}); the output folder is "
                        "replaced as a whole: choose a new or empty --out_dir")
    m = read_manifest(out_dir)
    ours = set(m["files"]) | {MANIFEST} if m is not None and m.get("mode") == mode else set()
    foreign = [n for n in names if n not in ours]
    if foreign and not overwrite:
        raise DataError(f"--out_dir {out_dir}: holds {len(foreign)} files that data_process.py did not write for "
                        f"{mode} output ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); pass "
                        "--overwrite to replace the whole folder, or choose a new --out_dir")
    if sample and names and not overwrite and (m is None or m.get("inputs") != inputs):
        raise DataError(f"{out_dir}: holds output of other inputs, which the embedded sample would replace; pass "
                        f"--overwrite to replace it, or name inputs and a folder: python data_process.py {mode} "
                        f"--inputs=... --out_dir=...")


class OutputFolder:
    """One output folder being replaced: files are written into the sibling `.<name>.new`, swapped in by commit()."""

    def __init__(self, out_dir: str, mode: str, inputs: list[str], overwrite: bool = False, sample: bool = False):
        self.out_dir = out_dir.rstrip(os.sep) or out_dir
        self.mode, self.inputs = mode, [os.path.abspath(p) for p in inputs]
        parent, name = os.path.split(os.path.abspath(self.out_dir))
        if not name:
            raise DataError(f"--out_dir {out_dir}: expected a folder name")
        os.makedirs(parent, exist_ok=True)
        self.new, self.old = os.path.join(parent, f".{name}.new"), os.path.join(parent, f".{name}.old")
        self._lock_path = os.path.join(parent, f".{name}.lock")
        self._lock = open(self._lock_path, "a")
        try:  # two runs into one folder would delete each other's .new folder
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            raise DataError(f"--out_dir {out_dir}: another data_process.py is writing it") from None
        try:
            recover(self.out_dir, self.new, self.old)
            check_replaceable(self.out_dir, mode, self.inputs, overwrite, sample)
            os.makedirs(self.new)
        except BaseException:
            self._unlock()
            raise

    def path(self, name: str) -> str:
        return os.path.join(self.new, name)

    def commit(self, files: list[str]) -> list[str]:
        """Writes the manifest, swaps the new folder in, deletes the old one -> final paths of `files`."""
        manifest = {"format": OUTPUT_FORMAT, "mode": self.mode, "inputs": self.inputs, "files": sorted(files)}
        write_json(self.path(MANIFEST), manifest)  # the folder is complete from here on
        if os.path.exists(self.out_dir):
            os.rename(self.out_dir, self.old)
        _between_renames()
        os.rename(self.new, self.out_dir)
        if os.path.isdir(self.old):
            shutil.rmtree(self.old)
        self._unlock()
        return [os.path.join(self.out_dir, n) for n in files]

    def abort(self) -> None:
        """Deletes the unfinished new folder (the old output stays as it was)."""
        if os.path.isdir(self.new):
            shutil.rmtree(self.new)
        if not os.path.exists(self.out_dir) and os.path.isdir(self.old):  # failed between the renames
            os.rename(self.old, self.out_dir)
        self._unlock()

    def _unlock(self) -> None:
        if not self._lock.closed:
            os.remove(self._lock_path)  # still held: a run that opened it meanwhile was refused
            self._lock.close()
