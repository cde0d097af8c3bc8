"""One writer per folder: the lock every script takes before it writes a folder, so a second one is refused at once.

  fd = lock_file("out/x/run.lock", "out/x: another run (pid {pid}) is writing it")   # a run folder (run_dir.py)
  fd = lock_file("out/.hf.lock", "out/hf: another export.py (pid {pid}) is writing it")  # a folder swapped whole
  unlock(fd, "out/.hf.lock")                                                         # (remove=True: the file goes)
  python -m babyllama.folder_lock FD FOLDER WHAT   # shell scripts (speedrun.sh): lock a descriptor the shell opened

The lock is flock(2): the operating system releases it however the process ends (a kill -9 included), so a lock
file left on disk never blocks the next run; "busy" means a live process holds it. The file is opened without
following a link (a link planted at its name is removed, its target untouched), and the process id is written into
it for the message a second writer gets. A lock file that is removed when released is checked after locking to
still be the file at that name (else a run that opened the old file meanwhile would hold a lock nobody sees).

From a shell, the lock is taken on a descriptor the shell opened (`exec 9<"$DIR"`: the folder itself): a flock lock
belongs to the open file, shared by the shell and this helper, so the shell holds it after the helper exits, until
it exits itself.
"""
from __future__ import annotations

import contextlib
import os
import sys

from babyllama.errors import DataError

try:
    import fcntl
except ImportError:  # no flock (Windows): folders are not locked
    fcntl = None


class FolderBusy(DataError):
    """Another live process holds the folder's lock: one line, exit 2."""


def lock_fd(fd: int) -> bool:
    """flock(fd) exclusively without waiting -> True when this process now holds it (always True without flock)."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def lock_file(path: str, busy: str) -> int:
    """Locks the file at `path` (created if needed, never through a link) -> its descriptor. FolderBusy(`busy`, its
    {pid} replaced by the holder's process id) when a live process holds it; DataError when it cannot be created."""
    for _ in range(10):  # a holder that removed the file between our open and our lock: open the new one
        if os.path.islink(path):
            os.unlink(path)  # removes the link itself; its target is not touched
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0),
                         0o644)
        except OSError as e:
            raise DataError(f"{path}: cannot create the lock file ({e.strerror})") from None
        if not lock_fd(fd):
            pid = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise FolderBusy(busy.replace("{pid}", pid))
        try:
            same = os.path.samestat(os.fstat(fd), os.lstat(path))
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)
    raise FolderBusy(busy.replace("{pid}", "?") + f" (its lock file {path} keeps changing)")


def unlock(fd: int, path: str = "", remove: bool = False) -> None:
    """Releases a lock_file lock; with `remove`, deletes the lock file first (while still held, see the docstring)."""
    if remove and path:
        with contextlib.suppress(OSError):
            if os.path.samestat(os.fstat(fd), os.lstat(path)):
                os.unlink(path)
    with contextlib.suppress(OSError):
        os.close(fd)


def main(argv: list) -> int:
    """python -m babyllama.folder_lock FD FOLDER WHAT: locks descriptor FD (the shell's) or says who holds it."""
    if len(argv) != 3 or not argv[0].isdigit():
        print("usage: python -m babyllama.folder_lock FD FOLDER WHAT", file=sys.stderr)
        return 2
    fd, folder, what = int(argv[0]), argv[1], argv[2]
    if lock_fd(fd):
        return 0
    print(f"error: {folder}: another {what} is using this folder; wait for it to end or pick another folder",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
