"""Shared test setup: the tokenizer's location and small on-disk datasets.

Tests that need the real ChatGLM2 tokenizer find it as the scripts do (chatglm_tokenizer.find_tokenizer without the
download: $BABYLLAMA_TOKENIZER, then the package's copy) and skip without it. When the variable is unset and a folder
../shared beside the repository holds a copy (chatglm_tokenizer/tokenizer.model), the tests point the variable at it;
the scripts themselves never look there. Most tests need no tokenizer: they use small synthetic token ids.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from chatglm_tokenizer import find_tokenizer  # noqa: E402 (needs ROOT on sys.path)

SHARED = os.path.abspath(os.path.join(ROOT, "..", "shared"))
# real corpora for end-to-end tests: $BABYLLAMA_SHARED_DATA (set by .ci/run), else ../shared/data
SHARED_DATA = os.environ.get("BABYLLAMA_SHARED_DATA") or os.path.join(SHARED, "data")
# skip reasons name the variable that enables the tests
SKIP_NO_SHARED_DATA = f"needs the real corpora: set BABYLLAMA_SHARED_DATA to their folder (pretrain/, sft/, eval/; not in {SHARED_DATA})"
SKIP_NO_TOKENIZER = "needs the ChatGLM2 tokenizer: set BABYLLAMA_TOKENIZER=/path/to/tokenizer.model"
_shared_tokenizer = os.path.join(SHARED, "chatglm_tokenizer", "tokenizer.model")
if not os.environ.get("BABYLLAMA_TOKENIZER") and os.path.isfile(_shared_tokenizer):
    os.environ["BABYLLAMA_TOKENIZER"] = _shared_tokenizer  # also seen by the scripts the tests run


def write_shard(path: str, ids, split: str, vocab_size: int, tokenizer_sha256=None) -> None:
    """A data_process-style shard: raw uint16 ids plus its .json sidecar (no tokenizer hash: synthetic ids)."""
    arr = np.asarray(ids, dtype=np.uint16)
    arr.tofile(path)
    meta = {"format": "baby-llama2-chinese/tokens-v1", "split": split, "dtype": "uint16", "vocab_size": vocab_size,
            "eos_id": 2, "tokenizer_sha256": tokenizer_sha256, "tokens": int(arr.size), "documents": 1}
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
        json.dump(meta, f)


def run_script(script: str, args, nproc: int = 1, stdin=None, timeout: int = 300, threads: int = 1, check: bool = True):
    """Run a repository script as a user would: `python script args` or, with nproc > 1, torchrun -> CompletedProcess.
    check: a non-zero exit fails the test with both output tails (a crash in one torchrun worker shows only in its
    stderr); pass check=False to assert on an expected failure."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONHASHSEED="0")
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    r = subprocess.run([*launcher, script, *args], cwd=ROOT, env=env, input=stdin, capture_output=True, text=True,
                       timeout=timeout)
    if check and r.returncode != 0:
        pytest.fail(f"{script} exited {r.returncode}\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-6000:]}",
                    pytrace=False)
    return r


@pytest.fixture
def tokenizer_path():
    try:
        return find_tokenizer(download=False)
    except FileNotFoundError as e:
        pytest.skip(f"{SKIP_NO_TOKENIZER} ({e})")


@pytest.fixture
def tiny_corpus(tmp_path):
    """A learnable synthetic corpus: repeated 'sentences' over a 512-token vocab, two train shards."""
    rng = np.random.default_rng(0)
    phrases = [rng.integers(3, 512, size=int(rng.integers(5, 20))) for _ in range(40)]

    def text(n_docs):
        out = []
        for _ in range(n_docs):
            for _ in range(int(rng.integers(2, 6))):
                out.extend(phrases[int(rng.integers(0, len(phrases)))])
            out.append(2)
        return out

    d = tmp_path / "data"
    d.mkdir()
    write_shard(str(d / "train_00000.bin"), text(300), "train", 512)
    write_shard(str(d / "train_00001.bin"), text(300), "train", 512)
    write_shard(str(d / "val_00000.bin"), text(60), "val", 512)
    return str(d)


def gguf_tools():
    """llama_cpp, where it, gguf and llama.cpp's converter are installed (the GGUF tests), else the test is skipped."""
    llama_cpp = pytest.importorskip("llama_cpp")
    pytest.importorskip("gguf")
    import export
    from babyllama.errors import DataError
    try:
        export.find_converter("")
    except DataError as e:
        pytest.skip(str(e))
    return llama_cpp


def pytest_configure(config):
    # torch's own deprecation, not this project's: torch.compile imports inductor, which imports torch/utils/mkldnn.py,
    # which still uses torch.jit.script_method (tests/test_warnings.py keeps our own code free of them)
    config.addinivalue_line("filterwarnings", "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
