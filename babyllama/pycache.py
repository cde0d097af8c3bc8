"""Whether Python can reuse the compiled bytecode (.pyc) of an installed package.

Where it cannot (a read-only install without .pyc files, or PYTHONDONTWRITEBYTECODE set, as in some container
images), every process compiles the package's modules from source again: seconds for torch in each stage of a
speedrun and in each of torch.compile's worker processes. speedrun.sh asks, and if the answer is no it keeps the
bytecode in its cache folder instead (PYTHONPYCACHEPREFIX):

    python -m babyllama.pycache torch      # exit 0: the bytecode is reused; 1: it is compiled again by every process
"""
from __future__ import annotations

import importlib.util
import os
import sys


def valid_pyc(source: str, pyc: str) -> bool:
    """True if `pyc` holds bytecode Python accepts for `source` without compiling it again: this interpreter's magic
    number and, for a timestamp-based file, the source's mtime and size (a hash-based one is taken as valid)."""
    try:
        with open(pyc, "rb") as f:
            head = f.read(16)
        st = os.stat(source)
    except OSError:
        return False
    if len(head) < 16 or head[:4] != importlib.util.MAGIC_NUMBER:
        return False
    if int.from_bytes(head[4:8], "little") & 1:  # hash-based
        return True
    mtime, size = int.from_bytes(head[8:12], "little"), int.from_bytes(head[12:16], "little")
    return mtime == int(st.st_mtime) & 0xFFFFFFFF and size == st.st_size & 0xFFFFFFFF


def bytecode_reused(package: str) -> bool:
    """True unless the package's __init__ has no valid .pyc and Python could not write one: then none of its
    modules will have one either, and each process compiles them all. A package that is not installed: True."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return True
    pyc = importlib.util.cache_from_source(spec.origin)  # honours PYTHONPYCACHEPREFIX
    if valid_pyc(spec.origin, pyc):
        return True
    if sys.dont_write_bytecode:
        return False
    folder = os.path.dirname(pyc)
    while not os.path.isdir(folder):  # __pycache__ is created on the first write, if its parent lets it
        folder = os.path.dirname(folder)
    return os.access(folder, os.W_OK)


if __name__ == "__main__":
    raise SystemExit(0 if all(bytecode_reused(p) for p in sys.argv[1:]) else 1)
