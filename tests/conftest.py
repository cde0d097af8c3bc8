"""Shared test setup: the tokenizer's location, small on-disk datasets, and the fakes, tiny models and helpers that
several test modules use (test modules import from here, never from each other).

Tests that need the real ChatGLM2 tokenizer find it as the scripts do (chatglm_tokenizer.find_tokenizer without the
download: $BABYLLAMA_TOKENIZER, then the package's copy) and skip without it. When the variable is unset and a folder
../shared beside the repository holds a copy (chatglm_tokenizer/tokenizer.model), the tests point the variable at it;
the scripts themselves never look there. Most tests need no tokenizer: they use small synthetic token ids.

Tests that launch a process (a script as a subprocess, torchrun, speedrun.sh) are marked `slow`. Everything runs by
default (as CI does); the quick loop leaves them out:

    python -m pytest -q -m "not slow" tests
"""
import dataclasses
import inspect
import json
import os
import queue
import re
import shlex
import subprocess
import sys
import tempfile
import threading

import numpy as np
import pytest
import torch

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
# as the session starts, before any test monkeypatches them: what background jobs (below) run with
SESSION_ENV = dict(os.environ)
try:
    SESSION_TOKENIZER = find_tokenizer(download=False)
except FileNotFoundError:
    SESSION_TOKENIZER = None


def base_env() -> dict:
    """The environment for a launched process: this one's, or, in a background job, the session's (a test running
    meanwhile in the main thread may have changed os.environ)."""
    return dict(os.environ if threading.current_thread() is threading.main_thread() else SESSION_ENV)


# the scripts the tests launch run one thread each (OMP_NUM_THREADS=1); so do the in-process runs (as test_model and
# others also set at import): the same numbers whichever tests run, and the second core free for a launched process
torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: launches a process (a script, torchrun, speedrun.sh); "
                                       "-m \"not slow\" leaves these out")
    # torch's own deprecation, not this project's: torch.compile imports inductor, which imports torch/utils/mkldnn.py,
    # which still uses torch.jit.script_method (tests/test_warnings.py keeps our own code free of them)
    config.addinivalue_line("filterwarnings", "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


# ---- the slowest end-to-end runs, in the background -----------------------------------------------------------------

class BackgroundJob:
    """A slow, self-contained chain of processes (speedrun.sh, the documented commands, ...) whose outputs a test then
    checks. It runs in a background thread from the session's start: most tests run in this process on one core (one
    thread each), a job's processes take the other. result() waits for it and gives its return value, or raises what
    it raised (a failed assert, a pytest.skip) in the test that asked. A job reads no state a test may change while it
    runs: it launches processes with base_env() and finds the tokenizer as SESSION_TOKENIZER."""

    def __init__(self, name, fn, *args):
        self.name, self.fn, self.args = name, fn, args
        self.done = threading.Event()
        self.value, self.error = None, None

    def run(self):
        try:
            self.value = self.fn(*self.args)
        except BaseException as e:  # noqa: B036 (pytest.skip / pytest.fail raise BaseExceptions: handed to the test)
            self.error = e
        finally:
            self.done.set()

    def result(self):
        if not self.done.wait(timeout=1800):
            pytest.fail(f"background job {self.name} still running after 30 minutes", pytrace=False)
        if self.error is not None:
            raise self.error
        return self.value


_JOBS = {}  # fixture name -> BackgroundJob
_QUEUE = queue.Queue()  # jobs run one after another, in the order the tests will want them


def _worker():
    while True:
        job = _QUEUE.get()
        if job is None:  # the session ends: jobs still queued (their tests did not run) never start
            return
        job.run()


def background(name: str, fn, *args) -> BackgroundJob:
    """The job `name` (queued at the session's start when a selected test needs it, else queued now)."""
    if name not in _JOBS:
        _JOBS[name] = BackgroundJob(name, fn, *args)
        _QUEUE.put(_JOBS[name])
    return _JOBS[name]


def background_fixture(name: str, fn):
    """A test module's slow job as its module-scoped fixture `name`: the module sets `BACKGROUND_JOBS = {name: fn}`
    (queued with the session) and `name = background_fixture(name, fn)`; a test using it waits for the job."""
    @pytest.fixture(scope="module", name=name)
    def job(tmp_path_factory):
        return background(name, fn, tmp_path_factory).result()
    return job


@pytest.fixture(scope="session", autouse=True)
def background_jobs(request, tmp_path_factory):
    """Queues the BACKGROUND_JOBS of the test modules (fixture name -> function of tmp_path_factory) that a selected
    test uses, in test order, and starts the thread that runs them; at the end waits for them (no orphan process)."""
    # the session's temporary folder is made lazily by the first getbasetemp(): made here, on this thread, before the
    # jobs start, or the worker's first mktemp and a test's race to make it and two session folders result (a test
    # then sees getbasetemp() change under it: "... is not a normalized and relative path")
    tmp_path_factory.getbasetemp()
    worker = threading.Thread(target=_worker, name="background-jobs", daemon=True)
    worker.start()
    for item in request.session.items:
        for name, fn in getattr(getattr(item, "module", None), "BACKGROUND_JOBS", {}).items():
            if name in item.fixturenames:
                background(name, fn, tmp_path_factory)
    yield
    while not _QUEUE.empty():
        _QUEUE.get_nowait()
    _QUEUE.put(None)
    worker.join(timeout=1800)  # the job running now, if any, ends on its own (its processes have timeouts)


# ---- processes and shards ---------------------------------------------------------------------------------------

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
    env = dict(base_env(), OMP_NUM_THREADS=str(threads), PYTHONHASHSEED="0")
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    r = subprocess.run([*launcher, script, *args], cwd=ROOT, env=env, input=stdin, capture_output=True, text=True,
                       timeout=timeout)
    if check and r.returncode != 0:
        pytest.fail(f"{script} exited {r.returncode}\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-6000:]}",
                    pytrace=False)
    return r


def run_scripts_together(*runs, timeout: int = 300):
    """Several run_script calls at once, each (script, args) or (script, args, nproc), side by side on the cores
    (each process is one thread) -> their CompletedProcess, in order; a non-zero exit fails the test as run_script
    does."""
    env = dict(base_env(), OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    started = []  # (process, its stdout file, its stderr file): files, so that no process waits on a full pipe
    try:
        for script, args, *nproc in runs:
            n = nproc[0] if nproc else 1
            launcher = [sys.executable] if n == 1 else [
                sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]
            out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
            started.append((subprocess.Popen([*launcher, script, *args], cwd=ROOT, env=env, stdout=out, stderr=err,
                                             text=True), out, err))
        done = []
        for (p, out, err), (script, *_) in zip(started, runs):
            p.wait(timeout=timeout)
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read(), err.read()
            if p.returncode != 0:
                pytest.fail(f"{script} exited {p.returncode}\n--- stdout\n{stdout[-3000:]}\n"
                            f"--- stderr\n{stderr[-6000:]}", pytrace=False)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
        return done
    finally:
        for p, out, err in started:
            if p.poll() is None:
                p.kill()
                p.wait()
            out.close()
            err.close()


def one_line_error(r, code: int = 2) -> str:
    """A script that failed as it should: exit `code`, one line on stderr, no traceback -> that line."""
    err = r.stderr.strip()
    assert r.returncode == code and "\n" not in err and "Traceback" not in err, (r.returncode, r.stderr[-2000:])
    return err


def run_main(module, argv, monkeypatch):
    """A script's main() in this process, as `python script argv` would call it (sys.argv set): no new interpreter
    and torch import; its prints go to capsys."""
    monkeypatch.setattr(sys, "argv", [os.path.basename(module.__file__), *map(str, argv)])
    return module.main()


def main_error(module, argv, monkeypatch, capsys, code: int = 2) -> str:
    """run_main that must fail as the script would: exit `code`, one line on stderr, no traceback -> that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_main(module, argv, monkeypatch)
    err = capsys.readouterr().err
    assert e.value.code == code and err.count("\n") == 1 and "Traceback" not in err, (e.value.code, err[-2000:])
    return err.strip()


@pytest.fixture(scope="session")
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


# ---- a tiny pretraining run ---------------------------------------------------------------------------------------

# pretrain.py flags of a tiny CPU run on tiny_corpus (512-token vocab)
TINY = ["--dim=32", "--n_layers=2", "--n_heads=4", "--max_seq_len=32", "--vocab_size=512", "--batch_size=4",
        "--device=cpu", "--compile=false", "--log_interval=1", "--eval_windows=16", "--warmup_steps=2",
        "--learning_rate=3e-3", "--min_lr=3e-4"]


# ---- tiny models for generation (test_model, test_beam) -----------------------------------------------------------

def tiny_args(**kw):
    from model import ModelArgs
    base = dict(dim=64, n_layers=2, n_heads=4, vocab_size=1000, multiple_of=16, max_seq_len=64, pad_vocab_multiple=64)
    base.update(kw)
    return ModelArgs(**base)


def tiny_model(seed: int = 0, **kw):
    """A seeded 2-layer model over a 1000-id vocabulary (padded to 1024 rows), in eval mode."""
    from model import Transformer
    torch.manual_seed(seed)
    return Transformer(tiny_args(**kw)).eval()


def lively_model(seed: int = 0, **kw):
    """A tiny model whose next token depends on the whole context.

    At init the tied embedding dominates the residual stream and greedy decoding just repeats the last
    prompt token, which would hide masking and position bugs; unit-gain matrices with strong residual
    branches make every earlier token matter.
    """
    model = tiny_model(seed, **kw)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("tok_embeddings"):
                p.normal_(0.0, 1.0)
            elif p.dim() == 2:
                gain = 4.0 if name.endswith(("wo.weight", "w2.weight")) else 1.0
                p.normal_(0.0, gain / p.size(1) ** 0.5)
    return model


PROMPTS = [[5, 17, 230], [9, 8, 7, 6, 5, 4, 3], [1, 900, 44, 44, 12, 600, 31, 2, 77, 501, 3, 19]]


def sampling(max_new_tokens: int, **knobs):
    """generate.Sampling for max_new_tokens with no n-gram rule unless knobs set one (Sampling's own default bans
    repeated 3-grams, as eval.py and chat.py decode): plain greedy decoding, or the sampling knobs given."""
    from generate import Sampling
    return Sampling(max_new_tokens=max_new_tokens, **{"no_repeat_ngram": 0, **knobs})


def repeats_an_ngram(tokens, n) -> bool:
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(grams) != len(set(grams))


# ---- a fake tokenizer and checkpoints for eval/chat (test_eval, test_beam, test_hardening) -------------------------

FAKE_VOCAB = 96  # tiny vocabulary of FakeTokenizer and of tiny_eval_model


class FakeTokenizer:
    """Characters <-> ids 3..FAKE_VOCAB-1 (ids given out in order of first sight); pad 0, bos 1, eos 2."""
    pad_id, bos_id, eos_id = 0, 1, 2
    vocab_size = FAKE_VOCAB
    sha256 = "f" * 64
    path = "fake.model"

    def __init__(self):
        self.char_to_id, self.id_to_char = {}, {}

    def encode(self, text, bos=False, eos=False):
        ids = []
        for c in text:
            if c not in self.char_to_id:
                i = 3 + len(self.char_to_id) % (FAKE_VOCAB - 3)
                self.char_to_id[c], self.id_to_char[i] = i, c
            ids.append(self.char_to_id[c])
        return ([1] if bos else []) + ids + ([2] if eos else [])

    def encode_batch(self, texts, num_threads=-1):
        return [self.encode(t) for t in texts]

    def decode(self, ids):
        return "".join(self.id_to_char.get(int(i), "?") for i in ids if int(i) > 2)


def tiny_eval_model(max_seq_len=16, seed=0, vocab_size=FAKE_VOCAB):
    """A seeded dim-32 2-layer model over FakeTokenizer's vocabulary (or vocab_size), in eval mode."""
    from model import ModelArgs, Transformer
    torch.manual_seed(seed)
    return Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=vocab_size, max_seq_len=max_seq_len)).eval()


def tiny_ckpt(model, kind="sft", sha="f" * 64):
    return {"model": model.state_dict(), "model_args": vars(model.args).copy(), "config": {}, "kind": kind, "step": 7,
            "val_loss": 1.0, "best_val_loss": 1.0, "tokenizer_sha256": sha}


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return str(path)


# ---- data_process.py fixtures and helpers (test_data_process, test_data_hardening) --------------------------------

FIX = os.path.join(ROOT, "tests", "fixtures_data")
PRE = os.path.join(FIX, "pretrain")
SFT = os.path.join(FIX, "sft")
PRE_FILES = ["wiki_array.json", "baike.jsonl", "text_bad.jsonl", "wudao.json", "plain.txt"]
SFT_FILES = ["alpaca.json", "belle.json", "sharegpt.jsonl", "multiturn.json", "seed.csv", "reward.jsonl"]


def no_temp_left(folder) -> bool:  # nothing of an unfinished run beside the output: no .new/.old folder, no .tmp file
    return not [n for n in os.listdir(folder) if n.endswith((".new", ".old", ".tmp"))]


def dp_cfg(**kw):
    """data_process.Config without progress bars, one worker, unless given."""
    import data_process as dp
    kw.setdefault("progress", False)
    kw.setdefault("num_workers", 1)
    return dp.Config(**kw)


def dp_records(src, c=None):
    """The (record, line, bad) triples of one detected source."""
    from babyllama import corpora
    return list(corpora.iter_container(src, c or dp_cfg()))


def dp_run_pretrain(out, *extra, files=PRE_FILES):
    """data_process.py pretrain on the fixtures in-process, every kept document after the 1st to train -> summary."""
    import data_process as dp
    argv = ["pretrain", "--inputs=" + ",".join(os.path.join(PRE, f) for f in files), f"--out_dir={out}",
            "--progress=false", "--val_fraction=0", "--val_min_tokens=1"] + list(extra)
    return dp.main(argv)[0]


# ---- --help output (test_configurator, test_tokenizer) -------------------------------------------------------------

# one help line: "  --name=default  type  meaning" (default shell-quoted, meaning possibly empty)
HELP_LINE = re.compile(r"^  --(?P<name>\w+)=(?P<default>'[^']*'|\S*) +(?P<type>\S+)(?: +(?P<meaning>.*))?$")


def source_comment(cls, name: str) -> str:
    """The field's trailing `# comment`, read with a plain regex over the class sources, most derived class first
    (an override without a comment keeps its base's): an extractor independent of the one under test."""
    for klass in cls.__mro__:
        if not dataclasses.is_dataclass(klass):
            continue
        m = re.search(rf"^    {name}: [^\n]*?  # (.*)$", inspect.getsource(klass), re.M)
        if m:
            return m.group(1).strip()
    return ""


def help_rows(stdout: str) -> dict:
    rows = {}
    for line in stdout.splitlines():
        m = HELP_LINE.match(line)
        if m:
            rows[m["name"]] = m
    return rows


def check_help(cls, stdout: str) -> None:
    """stdout is the --help of the script that defines config class cls: its docstring, then every field."""
    from babyllama.config import parse_config
    module_doc = inspect.getmodule(cls).__doc__.strip()
    assert stdout.startswith(module_doc.splitlines()[0])
    assert module_doc in stdout
    rows = help_rows(stdout)
    assert list(rows) == [f.name for f in dataclasses.fields(cls)]  # every field, in declaration order, nothing else
    for f in dataclasses.fields(cls):
        row = rows[f.name]
        assert row["type"] == f.type, f.name
        assert (row["meaning"] or "") == source_comment(cls, f.name), f.name
        # the default is shown as it is typed: giving it back on the command line yields the field's default
        typed = parse_config(cls, [f"--{f.name}={shlex.split(row['default'])[0] if row['default'] else ''}"])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        assert getattr(typed, f.name) == default, f.name
