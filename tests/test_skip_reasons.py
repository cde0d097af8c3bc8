"""A test skipped for want of the real corpora or the ChatGLM2 tokenizer says which variable enables it."""
import os
import re
import subprocess
import sys

from conftest import ROOT

# one test of each kind of skip: a skipif on the corpora, a helper that skips without one corpus file, the tokenizer
SKIPPED = {"tests/test_pipeline.py": "BABYLLAMA_SHARED_DATA",
           "tests/test_tokenizer.py::test_trained_on_real_corpora_round_trips_held_out_text": "BABYLLAMA_SHARED_DATA",
           "tests/test_tokenizer.py::test_chatglm2_vocabulary_and_ids_unchanged": "BABYLLAMA_TOKENIZER"}


def test_skip_reasons_name_the_variable(tmp_path):
    env = dict(os.environ, BABYLLAMA_SHARED_DATA=str(tmp_path / "no-corpora"),
               BABYLLAMA_TOKENIZER=str(tmp_path / "no-tokenizer" / "tokenizer.model"))
    # its own --basetemp: a nested session must not number or clean the outer session's temporary folders
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                        f"--basetemp={tmp_path / 'inner'}", *SKIPPED], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=300)
    reasons = re.findall(r"^SKIPPED \[\d+\] tests/\S+?:\d+: needs .*?: set (BABYLLAMA_\w+)", r.stdout, flags=re.M)
    assert sorted(reasons) == sorted(SKIPPED.values()), r.stdout + r.stderr
