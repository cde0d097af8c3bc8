"""chain.py: stages run in one process give the same checkpoints as the same commands run one by one, log each
stage's command and time, and stop at the first stage that fails with its exit status."""
import glob
import json
import os
import re
import shlex
import subprocess
import sys
import time
import types

import pytest
import torch

from babyllama.checkpoint import load_checkpoint
from babyllama.train_log import Logger
from conftest import ROOT, base_env, one_line_error, run_script

pytestmark = pytest.mark.slow
MODEL = ["--dim=32", "--n_layers=2", "--n_heads=4", "--max_seq_len=64", "--batch_size=4", "--device=cpu",
         "--log_interval=2", "--eval_interval=3", "--warmup_steps=2"]


@pytest.fixture(scope="module")
def sample_data(tmp_path_factory, tokenizer_path):
    """The embedded sample tokenized as speedrun.sh --tiny does: pretrain shards and SFT conversations (read only,
    so tokenized once for the module)."""
    data = tmp_path_factory.mktemp("chain") / "data"
    files = {sub: ",".join(sorted(glob.glob(f"{ROOT}/data/sample/{sub}/*.json*"))) for sub in ("pretrain", "sft")}
    run_script("data_process.py", ["pretrain", f"--inputs={files['pretrain']}", f"--out_dir={data}/pretrain",
                                   "--progress=false"])
    run_script("data_process.py", ["sft", f"--inputs={files['sft']}", f"--out_dir={data}/sft", "--progress=false"])
    return data


def stages(data, out) -> list:
    pre = ["pretrain.py", f"--data_dir={data}/pretrain", f"--out_dir={out}/pretrain", *MODEL, "--max_steps=6"]
    sft = ["sft.py", f"--init_from={out}/pretrain", f"--data_dir={data}/sft", f"--out_dir={out}/sft", "--batch_size=4",
           "--device=cpu", "--log_interval=2", "--eval_interval=2", "--warmup_steps=1", "--max_steps=4"]
    return [pre, sft]


def test_a_chain_writes_what_the_commands_write_one_by_one(sample_data, tmp_path):
    apart, chained = tmp_path / "apart", tmp_path / "chained"
    for script, *flags in stages(sample_data, apart):
        run_script(script, flags)
    pre, sft = stages(sample_data, chained)
    log = chained / "speedrun.jsonl"
    (chained).mkdir()
    r = run_script("chain.py", [f"--record={log}", *pre, "--", "--name=fine-tune", *sft])
    assert "== [+0s] pretrain: python pretrain.py" in r.stdout and "fine-tune: python sft.py" in r.stdout
    assert r.stdout.rstrip().splitlines()[-1].startswith("done: best val loss")  # the end, though teardown is skipped
    for stage in ("pretrain", "sft"):  # the same weights, bit for bit, and the same record of the run
        a, b = (load_checkpoint(str(d / stage / "best.pt")) for d in (apart, chained))
        assert a["step"] == b["step"] and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    # start-up: the first stage's from the process's start (torch's import), a later one's from its own start
    startup = [json.loads((chained / stage / "summary.json").read_text())["startup_s"] for stage in ("pretrain", "sft")]
    assert 0.3 < startup[0] < lines[0]["seconds"] and 0 <= startup[1] < lines[1]["seconds"]
    assert [x["stage"] for x in lines] == ["pretrain", "fine-tune"]
    assert lines[1]["command"] == shlex.join(["python", *sft]) and all(x["seconds"] > 0 for x in lines)


@pytest.mark.parametrize("word", ["ok", "stop"])
def test_after_a_file_the_chain_starts_its_stages_only_when_it_says_ok(sample_data, tmp_path, word):
    """--after=FILE (speedrun.sh): torch is imported while FILE is missing; "ok" runs the stages, whose start-up then
    counts from the data being ready, not from the process's start; anything else exits with status 1 and runs none."""
    pre, _ = stages(sample_data, tmp_path)
    ready = tmp_path / ".data-ready"
    p = subprocess.Popen([sys.executable, "chain.py", f"--after={ready}", *pre], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=dict(base_env(), OMP_NUM_THREADS="1"))
    t0 = time.time()
    time.sleep(6)
    assert p.poll() is None and not (tmp_path / "pretrain").exists()  # waiting
    (tmp_path / "tmp").write_text(word + "\n")
    os.replace(tmp_path / "tmp", ready)
    waited = time.time() - t0
    stdout, stderr = p.communicate(timeout=300)
    if word == "stop":
        assert p.returncode == 1 and "==" not in stdout and not (tmp_path / "pretrain").exists()
        return
    assert p.returncode == 0 and "== [+0s] pretrain: python pretrain.py" in stdout, stderr
    startup = json.loads((tmp_path / "pretrain" / "summary.json").read_text())["startup_s"]
    assert 0 <= startup < waited  # from its turn: counted from the process's start it would hold the whole wait


def test_imports_that_outlast_the_data_count_in_the_first_stages_start_up(sample_data, tmp_path):
    """--after: where the data is ready before the chain's imports are done (a cold start), the first stage waited for
    them from then: its start-up and wall time count from the data being ready, not from its turn, so the card's
    stages add up to the run's end to end."""
    pre, _ = stages(sample_data, tmp_path)
    ready, log = tmp_path / ".data-ready", tmp_path / "speedrun.jsonl"
    ready.write_text("ok\n")  # before the chain starts: every second of its imports is waited for
    t0 = time.time()
    r = run_script("chain.py", [f"--record={log}", f"--after={ready}", *pre])
    took = time.time() - t0
    startup = json.loads((tmp_path / "pretrain" / "summary.json").read_text())["startup_s"]
    seconds = json.loads(log.read_text())["seconds"]
    assert 0.8 < startup < seconds <= took + 0.1, (startup, seconds, took, r.stdout[-500:])


def test_while_it_waits_the_chain_imports_what_the_first_stage_would(tmp_path):
    """--after: torch.compile's tracer (which the training stages' AdamW imports too) is imported and the eval's word
    dictionary loaded before the data is ready, so the stages do not pay for them."""
    ready = tmp_path / ".data-ready"
    ready.write_text("ok\n")
    code = ("import sys, time, chain, jieba; t = time.time(); "
            "at = chain.start_early(['pretrain.py', 'eval.py'], sys.argv[1]); "
            "print(sorted(m for m in ('torch._dynamo', 'pretrain', 'trainer') if m in sys.modules), "
            "jieba.dt.initialized, t <= at < time.time() - 0.3)")  # ready before the imports: they count from t
    out = subprocess.run([sys.executable, "-c", code, str(ready)], cwd=ROOT, capture_output=True, text=True,
                         env=base_env(), timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['pretrain', 'torch._dynamo', 'trainer'] True True"


def test_a_stage_closes_its_log_files_and_tensorboard_writer(tmp_path):
    """chain.py exits without the interpreter's teardown, so a training stage's Logger (train() holds it) closes its
    files and TensorBoard's writer, whose last events are buffered, before the stage returns."""
    closed = []
    with Logger(str(tmp_path), True, False) as log:
        log.tb = types.SimpleNamespace(add_scalar=lambda *a: None, close=lambda: closed.append("tb"))
        log.print("step 1")
        log.metric(step=1, loss=2.0)
    assert log.log_file.closed and log.metrics_file.closed and closed == ["tb"]
    assert (tmp_path / "log.txt").read_text() == "step 1\n"


def test_a_failing_stage_stops_the_chain_with_its_status(sample_data, tmp_path):
    pre, sft = stages(sample_data, tmp_path)
    log = tmp_path / "speedrun.jsonl"
    bad = [w.replace(f"--data_dir={sample_data}/pretrain", f"--data_dir={tmp_path}/none") for w in pre]
    r = run_script("chain.py", [f"--record={log}", *bad, "--", *sft], check=False)
    assert "--data_dir" in one_line_error(r, 2) or "none" in one_line_error(r, 2)
    assert "sft: python sft.py" not in r.stdout and not log.exists() and not (tmp_path / "sft").exists()


@pytest.mark.parametrize("argv, says", [(["train.py"], "'train.py' is not a stage"),
                                        (["pretrain.py", "--", "--", "sft.py"], "an empty stage"),
                                        (["pretrain.py", "--"], "an empty stage")])
def test_a_malformed_chain_is_one_line_before_any_stage(argv, says):
    r = run_script("chain.py", argv, check=False)
    assert says in one_line_error(r, 2) and "==" not in r.stdout


@pytest.mark.parametrize("stage2, says", [(["eval.py", "--beam=4"], "eval: unknown flag --beam; did you mean --beams?"),
                                          (["sft.py", "--dropout=x"], "sft: --dropout: expected float, got 'x'")])
def test_a_bad_flag_of_a_later_stage_is_one_line_before_any_stage_runs(sample_data, tmp_path, stage2, says):
    """Every stage's flags are checked before the first stage runs: not after pretraining."""
    pre, _ = stages(sample_data, tmp_path)
    r = run_script("chain.py", [f"--record={tmp_path}/log.jsonl", *pre, "--", *stage2], check=False)
    assert says in one_line_error(r, 2) and "== [+0s] pretrain" in r.stdout and r.stdout.count("==") == 1
    assert not (tmp_path / "pretrain").exists() and not (tmp_path / "log.jsonl").exists()


def test_under_torchrun_a_chain_is_refused_before_any_stage(monkeypatch, capsys):
    import chain
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as e:
        chain.main(["pretrain.py", "--max_steps=1", "--", "sft.py"])
    out = capsys.readouterr()
    assert e.value.code == 2 and "under torchrun" in out.err and "==" not in out.out


def test_the_rows_compiled_ahead_are_shaped_and_typed_as_sfts(sample_data):
    """torch.compile keys its graphs by the inputs' shapes, dtypes and strides: the side process's random rows must
    be what dataset_sft gives the SFT stage, or its compiled graphs would never be asked for."""
    import chain
    from chatglm_tokenizer import load_tokenizer
    from dataset_sft import Batching, SFTData, SFTSamples
    samples = SFTSamples(str(sample_data / "sft" / "train.jsonl"), load_tokenizer(None), 64)
    real = SFTData(samples, Batching(batch_size=4, seed=0, mode="packed")).batch(0, 0)
    fake = chain.RandomRows(4, 64, 500).batch(0, 0)
    assert len(fake) == len(real) == 3
    for f, r in zip(fake, real):
        assert (f.shape, f.dtype, f.stride(), f.is_contiguous()) == (r.shape, r.dtype, r.stride(), r.is_contiguous())
    x, y, seg = fake
    assert 0 < int(x.min()) and int(x.max()) < 500 and (y == -1).any() and set(seg.unique().tolist()) == {1, 2}


def test_sfts_step_is_compiled_ahead_only_where_its_shape_is_known(tmp_path):
    import chain
    from model import ModelArgs
    from pretrain import PretrainConfig
    pre = PretrainConfig(out_dir=str(tmp_path / "pre"))
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=500, max_seq_len=64)
    base = [f"--init_from={tmp_path}/pre", "--batch_size=4"]
    spec = chain.ahead_spec(pre, args, base + ["--dropout=0.2"])
    assert spec["model_args"] == dict(vars(args), dropout=0.2) and spec["flags"] == base + ["--dropout=0.2"]
    assert chain.ahead_spec(pre, args, [f"--init_from={tmp_path}/pre/best.pt"]) is not None  # the run's file
    assert chain.ahead_spec(pre, args, base + ["--max_seq_len=32"])["model_args"]["max_seq_len"] == 32
    for other in ([f"--init_from={tmp_path}/elsewhere"], ["--init_from=hf:x"], base + ["--batch_mode=dynamic"],
                  base + ["--compile=false"], base + ["--resume"], base + ["--no_such_flag=1"]):
        assert chain.ahead_spec(pre, args, other) is None, other


def test_the_side_process_runs_sfts_step_and_a_chain_leaves_none_behind(sample_data, tmp_path):
    """On a CPU nothing is compiled, but the side process builds SFT's model from the spec and runs its step to the
    end (exit 0); a failing one is one line that says sft compiles its step itself."""
    import chain
    from model import ModelArgs
    from pretrain import PretrainConfig
    pre = PretrainConfig(out_dir=str(tmp_path / "pre"))
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=500, max_seq_len=64)
    ahead = chain.AheadCompile([f"--init_from={tmp_path}/pre", "--batch_size=4", "--device=cpu"])
    ahead.start(pre, args)
    said = ahead.settle(limit=240)
    assert said.startswith("sft's step was compiled ahead while pretraining ran ("), said
    assert ahead.proc is None
    ahead.start(pre, args)  # once per chain at most
    assert ahead.proc is None
    bad = chain.AheadCompile([f"--init_from={tmp_path}/pre", "--batch_size=4", "--device=cpu"])
    bad.start(pre, ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=500, max_seq_len=64, multiple_of=0))
    said = bad.settle(limit=240)
    assert said.startswith("sft's step compiled ahead: exit status 1: ") and said.endswith("sft compiles it itself")


def test_a_side_process_spawned_early_compiles_on_its_spec_and_goes_without_one(tmp_path):
    """Spawned as pretraining starts, the side process imports and then waits: the spec sent once pretraining has
    compiled runs SFT's step (exit 0); where none comes (pretraining never compiled) or SFT's step is not known, it is
    stopped, nothing is said, and no process is left."""
    import chain
    from model import ModelArgs
    from pretrain import PretrainConfig
    pre = PretrainConfig(out_dir=str(tmp_path / "pre"))
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=500, max_seq_len=64)
    ahead = chain.AheadCompile([f"--init_from={tmp_path}/pre", "--batch_size=4", "--device=cpu"])
    ahead.spawn()
    proc = ahead.proc
    time.sleep(1)
    assert proc.poll() is None  # waiting for its spec
    ahead.start(pre, args)
    said = ahead.settle(limit=240)
    assert said.startswith("sft's step was compiled ahead while pretraining ran ("), said
    assert proc.returncode == 0 and ahead.proc is None
    for flags in ([f"--init_from={tmp_path}/pre", "--device=cpu"], [f"--init_from={tmp_path}/elsewhere"]):
        ahead = chain.AheadCompile(flags)
        ahead.spawn()
        proc = ahead.proc
        if "--device=cpu" not in flags:  # SFT from another model: the hook stops it at once
            ahead.start(pre, args)
            assert proc.poll() is not None and ahead.proc is None
        assert ahead.settle(limit=240) is None  # never told what to compile: stopped, nothing said
        assert proc.poll() is not None and ahead.proc is None


def test_a_side_process_dead_before_its_spec_is_said_not_raised(tmp_path):
    """The side process died (an import failed) before pretraining finished compiling: handing it its spec fails
    quietly, and the SFT stage says why it compiles its step itself."""
    import tempfile
    import chain
    from model import ModelArgs
    from pretrain import PretrainConfig
    ahead = chain.AheadCompile([f"--init_from={tmp_path}/pre", "--batch_size=4"])
    ahead.err = tempfile.TemporaryFile()
    ahead.proc = subprocess.Popen([sys.executable, "-c", "import sys; print('no module named x', file=sys.stderr); "
                                   "sys.exit(3)"], stdin=subprocess.PIPE, stderr=ahead.err)
    ahead.proc.wait()
    ahead.start(PretrainConfig(out_dir=str(tmp_path / "pre")),
                ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=500, max_seq_len=64))
    said = ahead.settle(limit=10)
    assert said == "sft's step compiled ahead: exit status 3: no module named x; sft compiles it itself", said
    assert ahead.proc is None


def test_the_side_process_with_an_empty_spec_exits_at_once():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "chain.py"), "--compile_ahead=-"], input="\n", text=True,
                       capture_output=True, timeout=240, cwd=ROOT)
    assert r.returncode == 0 and r.stdout == "", r.stderr[-2000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_sft_finds_its_step_in_the_compile_cache(sample_data, tmp_path, monkeypatch):
    """A chain of pretraining and SFT with empty compile caches: the side process compiles SFT's step while
    pretraining runs, and the SFT stage finds every graph it compiles in the cache."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache" / "triton"))
    gpu = [a.replace("--device=cpu", "--device=cuda") for a in MODEL]
    pre = ["pretrain.py", f"--data_dir={sample_data}/pretrain", f"--out_dir={tmp_path}/pretrain", *gpu,
           "--max_steps=40"]
    sft = ["sft.py", f"--init_from={tmp_path}/pretrain", f"--data_dir={sample_data}/sft", f"--out_dir={tmp_path}/sft",
           "--batch_size=4", "--log_interval=2", "--eval_interval=20", "--warmup_steps=1", "--max_steps=20"]
    r = run_script("chain.py", [*pre, "--", *sft], timeout=600)
    assert "sft's step was compiled ahead while pretraining ran" in r.stdout, r.stdout[-3000:]
    said = [ln for ln in (tmp_path / "sft" / "log.txt").read_text().splitlines() if ln.startswith("compile: ")]
    hits = re.search(r"graphs from the compile cache: (\d+) of (\d+)", said[0])
    assert hits and int(hits[1]) == int(hits[2]) > 0, said


def test_a_side_process_not_done_in_time_is_stopped_and_said(tmp_path):
    """The SFT stage waits for the step compiled ahead at most `limit` seconds: then the side process is killed (no
    process left behind) and the stage compiles its step itself."""
    import tempfile
    import chain
    ahead = chain.AheadCompile([])
    ahead.proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    ahead.t0, ahead.err, ahead.sent = time.time(), tempfile.TemporaryFile(), True
    proc, t = ahead.proc, time.time()
    said = ahead.settle(limit=0.5)
    assert time.time() - t < 10 and proc.poll() is not None and ahead.proc is None
    assert said == "sft's step compiled ahead: not done within 0.5 s; sft compiles it itself", said
