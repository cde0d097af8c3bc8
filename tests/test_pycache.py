"""babyllama/pycache.py: whether an installed package's bytecode is reused, which decides where speedrun.sh keeps it."""
import importlib.util
import os
import py_compile
import subprocess
import sys

from babyllama import pycache
from conftest import ROOT


def make_package(root, name="pkg_for_pycache"):
    pkg = root / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text("X = 1\n")
    return pkg / "__init__.py"


def test_a_fresh_pyc_is_valid_and_a_stale_or_foreign_one_is_not(tmp_path):
    src = make_package(tmp_path)
    pyc = importlib.util.cache_from_source(str(src))
    assert not pycache.valid_pyc(str(src), pyc)  # none yet
    py_compile.compile(str(src), cfile=pyc)
    assert pycache.valid_pyc(str(src), pyc)
    src.write_text("X = 22\n")  # another size: the pyc is stale
    assert not pycache.valid_pyc(str(src), pyc)
    py_compile.compile(str(src), cfile=pyc)
    data = bytearray(open(pyc, "rb").read())
    data[0] ^= 0xFF  # another interpreter's magic number
    open(pyc, "wb").write(bytes(data))
    assert not pycache.valid_pyc(str(src), pyc)


def test_without_a_pyc_the_answer_is_whether_python_may_write_one(tmp_path, monkeypatch):
    make_package(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    assert pycache.bytecode_reused("pkg_for_pycache")  # a writable folder: the first import writes it
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # a read-only install (root may write anywhere)
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    assert not pycache.bytecode_reused("pkg_for_pycache")
    monkeypatch.undo()
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # PYTHONDONTWRITEBYTECODE
    assert not pycache.bytecode_reused("pkg_for_pycache")
    assert pycache.bytecode_reused("no_such_package_here")


def test_the_command_line_answers_with_its_exit_status(tmp_path):
    make_package(tmp_path)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, str(tmp_path)]), PYTHONDONTWRITEBYTECODE="1")
    run = lambda: subprocess.run([sys.executable, "-m", "babyllama.pycache", "pkg_for_pycache"], cwd=ROOT, env=env)
    assert run().returncode == 1  # no pyc, and Python may not write one
    py_compile.compile(str(tmp_path / "pkg_for_pycache" / "__init__.py"))
    assert run().returncode == 0


def test_compile_fills_the_cache_with_every_module_but_the_test_suites(tmp_path):
    """--compile: each module of the package gets valid bytecode in the cache folder (PYTHONPYCACHEPREFIX), where a
    later import finds it; the package's tests/ are left out, a package that is not installed is skipped."""
    init = make_package(tmp_path)
    (init.parent / "sub").mkdir()
    (init.parent / "sub" / "deep.py").write_text("Y = 2\n")
    (init.parent / "tests").mkdir()
    (init.parent / "tests" / "test_x.py").write_text("Z = 3\n")
    cache = tmp_path / "cache"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, str(tmp_path)]), PYTHONPYCACHEPREFIX=str(cache))
    r = subprocess.run([sys.executable, "-m", "babyllama.pycache", "--compile", "pkg_for_pycache", "no_such_package"],
                       cwd=ROOT, env=env)
    assert r.returncode == 0
    compiled = {p.name.split(".")[0] for p in cache.rglob("*.pyc")}
    assert compiled == {"__init__", "deep"}, compiled
    for src in (init, init.parent / "sub" / "deep.py"):  # where the interpreter would look, given that prefix
        rel = str(src.resolve()).lstrip(os.sep)
        pyc = next(cache.rglob(f"{src.stem}.*.pyc"))
        assert str(pyc).startswith(str(cache / os.path.dirname(rel))) and pycache.valid_pyc(str(src), str(pyc))
