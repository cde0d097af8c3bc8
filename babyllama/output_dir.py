"""Output folders replaced whole (data_process.py's data, export.py's model folder, train_tokenizer.py's tokenizer):
the new output is written beside the old one, then the two are swapped, so a kill at any moment leaves the complete
old or the complete new output; a folder is replaced only when it holds nothing but what the same script wrote there
for the same mode (listed in its manifest.json), or with --overwrite.

Library module, no command line:
  out = OutputFolder("data/pretrain", "pretrain", inputs, overwrite=False)   # checks and locks, before any work
  with open_exclusive(out.path("train_00000.bin")) as f: ...              # inside <parent>/.pretrain.new
  out.commit(["train_00000.bin", ...])                                      # manifest.json, then the swap
  out.abort()                                                               # deletes the unfinished new folder

The new folder is created by this process alone (mkdir fails on anything already there) and private (mode 700) until
the swap, so files written into it by libraries (safetensors, transformers, llama.cpp's converter) cannot be
redirected through planted links either. commit() writes manifest.json (format, script, mode, inputs, the files)
last, then swaps the two folders in one step (Linux renameat2 RENAME_EXCHANGE: there is never a moment without the
folder) and deletes the old one. Where that is not available it renames the old folder to <parent>/.<name>.old, the
new one to <name>; a run killed between the two renames is finished by the next run into the same folder: a .new
folder with a manifest is complete and takes the place, else the .old folder is put back. One lock (<parent>/.<name>.lock, babyllama/folder_lock.py)
keeps a second writer out; every leftover of a killed run is gone once the next run has claimed the folder.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Optional

from babyllama.errors import DataError
from babyllama.fileio import write_json
from babyllama.folder_lock import lock_file, unlock

MANIFEST = "manifest.json"
OUTPUT_FORMAT = "baby-llama2-chinese/output-v1"


def _between_renames() -> None:
    """Called after the old folder was moved aside and before the new one takes its place (tests kill here)."""


def _exchange(a: str, b: str) -> bool:
    """Swaps two existing paths in one step (Linux renameat2 RENAME_EXCHANGE) -> False where the system or the
    filesystem cannot (then commit() renames twice, and recover() finishes a swap a kill cut in two)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def read_manifest(folder: str) -> Optional[dict]:
    """The folder's manifest.json when it is one of ours (a file, not a link), else None."""
    try:
        fd = os.open(os.path.join(folder, MANIFEST), os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with open(fd, encoding="utf-8") as f:
            m = json.load(f)
    except (OSError, ValueError):
        return None
    ok = isinstance(m, dict) and m.get("format") == OUTPUT_FORMAT and isinstance(m.get("files"), list)
    return m if ok else None


def _remove(path: str) -> None:
    """Deletes a leftover: a link or a file itself (never what a link points to), a folder with what it holds."""
    if os.path.islink(path) or (os.path.lexists(path) and not os.path.isdir(path)):
        os.unlink(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)


def _within(path: str, folder: str) -> bool:
    """`path` is `folder` or inside it (links resolved)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def recover(out_dir: str, new: str, old: str) -> None:
    """Finishes or undoes a swap that a kill interrupted, then removes the leftovers of earlier runs."""
    if not os.path.lexists(out_dir):
        real = lambda p: os.path.isdir(p) and not os.path.islink(p)  # a planted link is never moved into place
        if real(new) and read_manifest(new) is not None:
            os.rename(new, out_dir)  # killed between the renames: the new output was complete
        elif real(old):
            os.rename(old, out_dir)  # the complete old output goes back
    for leftover in (new, old):
        _remove(leftover)


def check_replaceable(out_dir: str, mode: str, inputs: list, overwrite: bool, sample: bool,
                      script: str = "data_process.py", leftovers: tuple = (), replace_own: bool = True) -> None:
    """One-line DataError unless out_dir is missing, empty, or holds only this script's earlier `mode` output
    (names starting with one of `leftovers` are temp files of an earlier version of the script: they go too); with
    `replace_own` false, that output too needs `overwrite` (a tokenizer: what was made with it needs it)."""
    if os.path.islink(out_dir):
        raise DataError(f"--out_dir {out_dir}: is a symbolic link (to {os.readlink(out_dir)}); the output folder is "
                        "replaced as a whole: give a real folder")
    if not os.path.exists(out_dir):
        return
    if not os.path.isdir(out_dir):
        raise DataError(f"--out_dir {out_dir}: exists and is not a folder")
    names = sorted(n for n in os.listdir(out_dir) if not n.startswith(tuple(leftovers)))
    paths = {n: os.path.join(out_dir, n) for n in names}
    folders = [n for n in names if os.path.isdir(paths[n]) and not os.path.islink(paths[n])]
    if folders:
        raise DataError(f"--out_dir {out_dir}: holds folders ({', '.join(folders[:3])}); the output folder is "
                        "replaced as a whole: choose a new or empty --out_dir")
    m = read_manifest(out_dir)
    ours = set(m["files"]) | {MANIFEST} if m is not None and m.get("mode") == mode else set()
    foreign = [n for n in names if n not in ours]
    if foreign and not overwrite:
        raise DataError(f"--out_dir {out_dir}: holds {len(foreign)} files that {script} did not write for "
                        f"{mode} output ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); pass "
                        "--overwrite to replace the whole folder, or choose a new --out_dir")
    if names and not replace_own and not overwrite:
        raise DataError(f"--out_dir {out_dir}: holds the {mode} {script} wrote earlier ({', '.join(names[:3])}); "
                        "what was made with it needs it: pass --overwrite to replace it, or choose a new --out_dir")
    if sample and names and not overwrite and (m is None or m.get("inputs") != inputs):
        raise DataError(f"{out_dir}: holds output of other inputs, which the embedded sample would replace; pass "
                        f"--overwrite to replace it, or name inputs and a folder: python data_process.py {mode} "
                        f"--inputs=... --out_dir=...")


class OutputFolder:
    """One output folder being replaced: files are written into the sibling `.<name>.new`, swapped in by commit().

    `script` names the writer in messages and in the manifest; `leftovers`: name prefixes of an earlier version's
    temp files inside the folder, replaced with it; `replace_own` false: even the script's own output needs
    `overwrite` (check_replaceable)."""

    def __init__(self, out_dir: str, mode: str, inputs: list, overwrite: bool = False, sample: bool = False,
                 script: str = "data_process.py", leftovers: tuple = (), replace_own: bool = True):
        self.out_dir = out_dir.rstrip(os.sep) or out_dir
        self.mode, self.script, self.inputs = mode, script, [os.path.abspath(p) for p in inputs]
        parent, name = os.path.split(os.path.abspath(self.out_dir))
        if not name:
            raise DataError(f"--out_dir {out_dir}: expected a folder name")
        inside = [p for p in inputs if _within(p, self.out_dir)]
        if inside:  # read now, deleted with the old folder at the swap
            raise DataError(f"{inside[0]}: an input inside --out_dir {out_dir}, which {script} replaces whole; move it "
                            "out of there or choose another --out_dir")
        self.new, self.old = os.path.join(parent, f".{name}.new"), os.path.join(parent, f".{name}.old")
        self._lock_path = os.path.join(parent, f".{name}.lock")
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as e:
            raise DataError(f"--out_dir {out_dir}: cannot create {parent} ({e.strerror})") from None
        # two runs into one folder would delete each other's .new folder
        self._lock = lock_file(self._lock_path, f"--out_dir {out_dir}: another {script} (pid {{pid}}) is writing it")
        try:
            recover(self.out_dir, self.new, self.old)
            check_replaceable(self.out_dir, mode, self.inputs, overwrite, sample, script, leftovers, replace_own)
            umask = os.umask(0o022)
            os.umask(umask)
            self._mode = 0o777 & ~umask  # what a plain mkdir would have given the folder
            os.mkdir(self.new, 0o700)  # ours alone: fails on anything (a link included) already there
        except OSError as e:
            self._unlock()
            raise DataError(f"--out_dir {out_dir}: cannot prepare {self.new} ({e.strerror})") from None
        except BaseException:
            self._unlock()
            raise

    def path(self, name: str) -> str:
        return os.path.join(self.new, name)

    def commit(self, files: list) -> list:
        """Writes the manifest, swaps the new folder in, deletes the old one -> final paths of `files`."""
        manifest = {"format": OUTPUT_FORMAT, "script": self.script, "mode": self.mode, "inputs": self.inputs,
                    "files": sorted(files)}
        missing = [n for n in files if not os.path.isfile(self.path(n)) or os.path.islink(self.path(n))]
        if missing:  # a writer's bug, never the user's: the folder stays unfinished
            raise RuntimeError(f"{self.new}: {', '.join(missing)} not written")
        write_json(self.path(MANIFEST), manifest)  # the folder is complete from here on
        os.chmod(self.new, self._mode)
        if os.path.lexists(self.out_dir) and _exchange(self.new, self.out_dir):
            _remove(self.new)  # the old output, now at the .new name: a kill before this leaves it for recover()
        else:
            if os.path.lexists(self.out_dir):
                os.rename(self.out_dir, self.old)
            _between_renames()
            os.rename(self.new, self.out_dir)
            _remove(self.old)
        self._unlock()
        return [os.path.join(self.out_dir, n) for n in files]

    def abort(self) -> None:
        """Deletes the unfinished new folder (the old output stays as it was)."""
        _remove(self.new)
        if not os.path.lexists(self.out_dir) and os.path.isdir(self.old):  # failed between the renames
            os.rename(self.old, self.out_dir)
        self._unlock()

    def _unlock(self) -> None:
        if self._lock is not None:
            unlock(self._lock, self._lock_path, remove=True)
            self._lock = None

    @property
    def lock_fd(self) -> Optional[int]:
        """The lock's descriptor while held (a forked worker closes its copy: only this process holds the lock)."""
        return self._lock
