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
