"""No deprecation warning comes from this project's code: every module imports under -W error, and the test run's
warning summary stays empty where torch.compile pulls in torch's own deprecated modules (filtered in conftest.py)."""
import glob
import os
import subprocess
import sys

from conftest import ROOT

MODULES = sorted({os.path.relpath(p, ROOT)[:-3].replace(os.sep, ".").removesuffix(".__init__")
                  for pattern in ("*.py", "babyllama/*.py", "chatglm_tokenizer/*.py")
                  for p in glob.glob(os.path.join(ROOT, pattern))})
STRICT = ["-W", "error::DeprecationWarning", "-W", "error::PendingDeprecationWarning"]


def test_every_module_imports_without_deprecation_warnings():
    assert {"model", "trainer", "babyllama.train_log", "chatglm_tokenizer"} <= set(MODULES)
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    r = subprocess.run([sys.executable, *STRICT, "-c", code, *MODULES], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def test_a_compiled_model_test_leaves_no_warning_summary(tmp_path):
    # its own --basetemp: a nested session must not number or clean the outer session's temporary folders
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--basetemp={tmp_path / 'inner'}",
                        "tests/test_model.py::test_compiled_decode_step_compiles_once_and_matches_eager"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "1 passed" in r.stdout and "warning" not in r.stdout.lower(), r.stdout[-3000:]


def test_jieba_says_nothing_when_the_scores_import_it(tmp_path):
    """jieba 0.42 prints SyntaxWarnings (Python 3.12+) when its modules are first compiled and setuptools'
    "pkg_resources is deprecated" UserWarning when it imports: in a speedrun both landed in the console, one in the
    middle of the eval's progress bar. Here its bytecode is compiled afresh, and a pkg_resources that warns as
    setuptools' does stands in for the installed one (which may be gone); BLEU's module imports it silently."""
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "pkg_resources.py").write_text(
        "import os, sys, warnings\n"
        "warnings.warn('pkg_resources is deprecated as an API.', UserWarning, stacklevel=2)\n"
        "def resource_stream(package, name):\n"
        "    return open(os.path.join(os.path.dirname(sys.modules[package].__file__), name), 'rb')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake), ROOT]),
           "PYTHONPYCACHEPREFIX": str(tmp_path / "pycache")}
    code = ("import babyllama.bleu as b, sys\n"
            "assert 'pkg_resources' in sys.modules\n"
            "b.load_dictionary()\n"
            "print(b.words('我爱北京天安门'))\n")
    r = subprocess.run([sys.executable, "-W", "default", "-c", code], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and r.stderr == "" and "北京" in r.stdout, r.stderr[-3000:]
