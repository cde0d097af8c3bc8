"""Whether Python can reuse the compiled bytecode (.pyc) of an installed package.

Where it cannot (a read-only install without .pyc files, or PYTHONDONTWRITEBYTECODE set, as in some container
images), every process compiles the package's modules from source again: seconds for torch in each stage of a
speedrun and in each of torch.compile's worker processes. speedrun.sh asks, and if the answer is no it keeps the
bytecode in its cache folder instead (PYTHONPYCACHEPREFIX):

    python -m babyllama.pycache torch      # exit 0: the bytecode is reused; 1: it is compiled again by every process
    python -m babyllama.pycache --compile torch nltk    # compiles every module of these packages now, on every core

--compile fills the bytecode cache at once, in parallel, where otherwise each module would be compiled when a process
first imports it, one after another: speedrun.sh runs it in the background while the tokenizer trains.
"""
from __future__ import annotations

import compileall
import importlib.util
import os
import re
import sys

SKIP = re.compile(r"[/\\](tests?|testing[/\\]_internal)[/\\]")  # test suites shipped in packages: never imported


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


def compile_packages(packages) -> bool:
    """Compiles every module of the installed packages (their test suites left out) into the bytecode cache, in as
    many processes as there are cores; a package that is not installed is skipped. -> True if every file compiled."""
    ok = True
    for name in packages:
        spec = importlib.util.find_spec(name)  # finds, does not import
        for folder in (spec.submodule_search_locations or []) if spec else []:
            ok &= bool(compileall.compile_dir(folder, quiet=2, workers=0, rx=SKIP))
    return ok


if __name__ == "__main__":
    if sys.argv[1:2] == ["--compile"]:
        raise SystemExit(0 if compile_packages(sys.argv[2:]) else 1)
    raise SystemExit(0 if all(bytecode_reused(p) for p in sys.argv[1:]) else 1)
