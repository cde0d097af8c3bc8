"""Child processes end with their parent, however the parent ends (a SIGKILL from the OOM killer included, where no
cleanup code of the parent runs): an orphan would go on writing, hold a folder's lock and its memory.

Library module, no command line:
  subprocess.run(cmd, preexec_fn=kill_with_parent, timeout=...)   # an external tool (export.py's GGUF converter)
  die_with_parent(parent_pid)                                     # first thing in a pool worker (data_process.py)

Linux: the kernel sends the child SIGKILL when its parent dies (prctl PR_SET_PDEATHSIG, kept across exec).
Elsewhere, and for a parent that died before the child asked, a worker's thread checks its parent every second.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time

_PRCTL = None
if sys.platform.startswith("linux"):
    try:
        import ctypes

        _PRCTL = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: a forked child only calls it
    except (OSError, AttributeError):
        _PRCTL = None
PR_SET_PDEATHSIG = 1


def kill_with_parent() -> None:
    """In a child (a subprocess' preexec_fn, a worker): SIGKILL when the parent process dies (Linux; else nothing)."""
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGKILL)


def die_with_parent(parent: int) -> None:
    """In a worker process of `parent`: ends with it (kill_with_parent), also when the parent is already gone, and
    where prctl is missing through a daemon thread that checks the parent every second."""
    kill_with_parent()
    if os.getppid() != parent:  # the parent died before the line above: nobody is left to wait for this worker
        os._exit(1)
    if _PRCTL is not None:
        return

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()
