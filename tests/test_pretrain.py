"""dataset.py, trainer.py and pretrain.py: data order, precision, schedule, DDP, resume, failure handling."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, TINY, main_error, run_script, run_scripts_together, write_shard
from model import ModelArgs, Transformer
from babyllama.config import parse_config
from babyllama.errors import ConfigError
from babyllama.errors import DataError
from dataset import PretrainData
from babyllama.runtime import autocast_context
from babyllama.train_log import read_metrics as metrics
from trainer import TrainConfig, grad_accum_steps, lr_at

# ---- dataset.py -------------------------------------------------------------------------------------

def test_reads_every_shard_and_order_is_a_function_of_step(tiny_corpus):
    d = PretrainData(tiny_corpus, "train", 32, 4, seed=1)
    assert len(d.maps) == 2
    first_shard_windows = int(d.window_offsets[1])
    seen = set()
    for step in range(d.n_windows // 4):  # one epoch touches every window once
        x, y = d.batch(step, 0)
        assert x.shape == (4, 32) and torch.equal(x[:, 1:], y[:, :-1])
        for row in x:
            seen.add(row.numpy().tobytes())
    assert len(seen) >= d.n_windows - 4
    # windows from the second shard were used (the seed read only the first .bin)
    second = {d.window(k)[:-1].tobytes() for k in range(first_shard_windows, d.n_windows)}
    assert second & seen
    again = PretrainData(tiny_corpus, "train", 32, 4, seed=1)
    assert torch.equal(d.batch(7, 0)[0], again.batch(7, 0)[0])
    other_seed = PretrainData(tiny_corpus, "train", 32, 4, seed=2)
    assert not torch.equal(d.batch(7, 0)[0], other_seed.batch(7, 0)[0])


def test_ranks_read_disjoint_data_equal_to_accumulation(tiny_corpus):
    one = PretrainData(tiny_corpus, "train", 32, 4, seed=3, grad_accum=2)
    r0 = PretrainData(tiny_corpus, "train", 32, 4, seed=3, rank=0, world_size=2)
    r1 = PretrainData(tiny_corpus, "train", 32, 4, seed=3, rank=1, world_size=2)
    for step in (0, 5):
        assert torch.equal(one.batch(step, 0)[0], r0.batch(step, 0)[0])
        assert torch.equal(one.batch(step, 1)[0], r1.batch(step, 0)[0])
        assert not torch.equal(r0.batch(step, 0)[0], r1.batch(step, 0)[0])


def test_sidecar_is_checked(tiny_corpus, tmp_path):
    with pytest.raises(DataError, match=r"train_0000\d\.bin: .*vocab_size 512\b.*\b256\b"):
        PretrainData(tiny_corpus, "train", 32, 4, vocab_size=256)
    assert PretrainData(tiny_corpus, "train", 32, 4, vocab_size=640).n_windows > 0  # a larger model vocab pads
    bad = tmp_path / "bad"
    bad.mkdir()
    write_shard(str(bad / "val_00000.bin"), list(range(3, 200)), "val", 512, tokenizer_sha256="abc")
    with pytest.raises(DataError, match=r"val_00000\.bin: made with a tokenizer of sha256 abc\.\.\., but this run's "
                                        r"tokenizer is def\.\.\. \(another vocabulary\)"):
        PretrainData(str(bad), "val", 32, 4, tokenizer_sha256="def")
    os.remove(bad / "val_00000.bin")
    write_shard(str(bad / "train_00000.bin"), list(range(3, 200)), "train", 512)
    with open(bad / "train_00000.bin", "r+b") as f:
        f.truncate(100)  # an interrupted copy
    with pytest.raises(DataError, match=r"train_00000\.bin: .*\b197\b.*\b50\b"):  # the sidecar's count, the file's
        PretrainData(str(bad), "train", 32, 4)
    with pytest.raises(DataError, match="no val_"):
        PretrainData(str(bad), "val", 32, 4)


# ---- trainer.py pieces ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_autocast_uses_the_dtype_it_is_given(dtype):
    a, b = torch.randn(8, 8), torch.randn(8, 8)
    with autocast_context(torch.device("cpu"), dtype):
        assert (a @ b).dtype == dtype


def test_lr_schedules():
    cfg = TrainConfig(max_steps=100, warmup_steps=10, learning_rate=1.0, min_lr=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.55)
    assert lr_at(100, cfg) == pytest.approx(0.1)
    wsd = TrainConfig(max_steps=100, warmup_steps=10, learning_rate=1.0, min_lr=0.0, lr_schedule="wsd", decay_frac=0.2)
    assert lr_at(50, wsd) == 1.0 and lr_at(79, wsd) == 1.0 and lr_at(90, wsd) == pytest.approx(0.5)


def test_global_batch_is_fixed_in_tokens():
    cfg = TrainConfig(batch_size=4, batch_tokens=4 * 32 * 8)
    assert [grad_accum_steps(cfg, 32, w) for w in (1, 2, 4, 8)] == [8, 4, 2, 1]
    with pytest.raises(ConfigError, match="not a multiple"):
        grad_accum_steps(cfg, 32, 3)


def test_run_length_from_epochs_and_the_token_cap():
    from trainer import run_length
    cfg = TrainConfig(epochs=6.0, warmup_steps=100)
    out, why = run_length(cfg, epoch_steps=852.2, params=58_479_616, tokens_per_step=16_384)
    assert out.max_steps == 5114 and out.warmup_steps == 100 and "6 epochs of 852.2 steps" in why  # ceil(6 x 852.2)
    # a large corpus: 20 tokens per parameter (1.17B tokens) ends the run long before 6 epochs
    out, why = run_length(TrainConfig(epochs=6.0, tokens_per_param=20.0), 100_000, 58_479_616, 16_384)
    assert out.max_steps == math.ceil(20 * 58_479_616 / 16_384) == 71_387 and "20 tokens per parameter" in why
    # a tiny corpus: the warmup longer than the run is cut to a tenth of it, and said
    out, why = run_length(TrainConfig(epochs=2.0, warmup_steps=100), 17.0, 1000, 1024)
    assert (out.max_steps, out.warmup_steps) == (34, 3) and "warmup cut to 3" in why
    # max_steps given: taken as it is, whatever the data
    out, why = run_length(TrainConfig(max_steps=40, epochs=9.0, warmup_steps=4), 17.0, 1000, 1024)
    assert out.max_steps == 40 and why == "40 steps (--max_steps)"
    with pytest.raises(ConfigError, match="epochs"):
        parse_config(TrainConfig, ["--epochs=0"])


def test_config_errors_are_one_line(tmp_path, monkeypatch, capsys):
    from pretrain import PretrainConfig
    with pytest.raises(ConfigError, match="unknown flag --lr"):
        parse_config(PretrainConfig, ["--lr=1"])
    with pytest.raises(ConfigError, match="--batch_size: expected int"):
        parse_config(PretrainConfig, ["--batch_size=big"])
    with pytest.raises(ConfigError, match=r"dim 500\b.*n_heads 8"):
        parse_config(PretrainConfig, ["--dim=500"])
    with pytest.raises(ConfigError, match=r"--warmup_steps=100\b.*--max_steps=20\b.*--warmup_steps=2\b"):
        parse_config(PretrainConfig, ["--max_steps=20"])
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"dim": 64, "n_heads": 4}))
    cfg = parse_config(PretrainConfig, ["--config", str(cfg_file), "--n_heads=2"])
    assert (cfg.dim, cfg.n_heads) == (64, 2)
    import pretrain
    assert "--max_stpes" in main_error(pretrain, ["--max_stpes=3"], monkeypatch, capsys)  # exit 2, one line


# ---- whole runs -------------------------------------------------------------------------------------

def test_tiny_run_learns_and_writes_a_self_describing_checkpoint(tiny_corpus, tmp_path):
    import pretrain
    out = str(tmp_path / "run")
    pretrain.main([*TINY, f"--data_dir={tiny_corpus}", f"--out_dir={out}", "--max_steps=60", "--eval_interval=30"])
    _, val = metrics(out)
    assert val[0] > math.log(512) - 0.3 and val[60] < val[0] - 1.0, val
    ckpt = torch.load(os.path.join(out, "last.pt"), weights_only=False)  # the training state: last.pt
    for key in ("model", "model_args", "config", "optimizer", "scaler", "step", "data_position", "rng",
                "best_val_loss", "kind"):
        assert key in ckpt
    assert ckpt["step"] == 60 and ckpt["model_args"]["dim"] == 32 and ckpt["config"]["max_steps"] == 60
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    assert os.path.isfile(os.path.join(out, "loss.png")) and os.path.isfile(os.path.join(out, "log.txt"))
    log = open(os.path.join(out, "log.txt")).read()
    assert "tok/s" in log and "eta" in log and "tokens/step" in log


def test_fused_projections_and_an_attention_kernel_order_train_the_same_model(tiny_corpus, tmp_path):
    """--fuse_projections and --attention change how the step runs, not what it computes: the same losses and the
    same checkpoint keys as a plain run."""
    import pretrain
    runs = {}
    for name, extra in (("plain", []), ("fast", ["--fuse_projections=true", "--attention=cudnn"])):
        out = str(tmp_path / name)
        pretrain.main([*TINY, f"--data_dir={tiny_corpus}", f"--out_dir={out}", "--max_steps=20", "--eval_interval=10",
                       *extra])
        runs[name] = (metrics(out)[1], torch.load(os.path.join(out, "best.pt"), weights_only=False)["model"])
    (val0, state0), (val1, state1) = runs["plain"], runs["fast"]
    assert val0.keys() == val1.keys() and all(abs(val0[s] - val1[s]) < 1e-3 for s in val0), (val0, val1)
    assert state0.keys() == state1.keys()
    with pytest.raises(ConfigError, match="attention must be auto"):
        parse_config(TrainConfig, ["--attention=fast"])


@pytest.mark.slow
def test_ddp_with_accumulation_equals_single_process(tiny_corpus, tmp_path):
    """Two gloo ranks, accumulation 1 == one process, accumulation 2, at the same global batch.
    Catches gradients that are not all-reduced (the seed's DDP + accumulation bug): ranks drift apart."""
    common = [*TINY, f"--data_dir={tiny_corpus}", "--max_steps=20", "--eval_interval=20", "--batch_tokens=256"]
    run_scripts_together(("pretrain.py", [*common, f"--out_dir={tmp_path / 'one'}"]),
                         ("pretrain.py", [*common, f"--out_dir={tmp_path / 'two'}"], 2))
    one, val1 = metrics(tmp_path / "one")
    two, val2 = metrics(tmp_path / "two")
    assert sorted(one) == list(range(1, 21)) == sorted(two)
    for step in one:
        assert abs(one[step] - two[step]) < 1e-4, (step, one[step], two[step])
    assert abs(val1[20] - val2[20]) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("first, then", [(2, 1), (1, 2)])
def test_a_run_resumes_on_another_number_of_processes(tiny_corpus, tmp_path, first, then):
    """The global batch in tokens is the run's (--batch_tokens): a run stopped on `first` processes continues on
    `then` with accumulation making up the difference, the same data order and the same losses as one run."""
    common = [*TINY, f"--data_dir={tiny_corpus}", "--max_steps=9", "--eval_interval=9", "--batch_tokens=256"]
    out = tmp_path / "moved"
    run_scripts_together(("pretrain.py", [*common, f"--out_dir={tmp_path / 'whole'}"]),
                         ("pretrain.py", [*common, f"--out_dir={out}", "--max_minutes=0.0001", "--log_interval=3"],
                          first))
    assert 1 <= torch.load(out / "last.pt", weights_only=False)["step"] <= 3  # stopped by the clock, saved
    r = run_script("pretrain.py", [f"--out_dir={out}", "--resume", "--max_minutes=0"], nproc=then)
    assert "resuming from" in r.stdout and f"x {then} procs x {2 // then} accum" in r.stdout
    whole, val_whole = metrics(tmp_path / "whole")
    moved, val_moved = metrics(out)
    assert sorted(moved) == list(range(1, 10)) == sorted(whole)
    for step in whole:
        assert abs(whole[step] - moved[step]) < 1e-4, (step, whole[step], moved[step])
    assert abs(val_whole[9] - val_moved[9]) < 1e-4


@pytest.mark.slow
def test_killed_run_resumes_exactly(tiny_corpus, tmp_path):
    common = [*TINY, f"--data_dir={tiny_corpus}", "--max_steps=30", "--eval_interval=10", "--dropout=0.1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # the uninterrupted run and the one to kill, side by side
    reference = subprocess.Popen([sys.executable, "pretrain.py", *common, f"--out_dir={tmp_path / 'full'}"],
                                 cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    out = tmp_path / "killed"
    p = subprocess.Popen([sys.executable, "pretrain.py", *common, f"--out_dir={out}", "--ckpt_interval=1"],
                         cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill -9 once a checkpoint past step 12 exists
        if (out / "metrics.jsonl").exists() and max(metrics(out)[0] or [0]) >= 12:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    _, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err[-3000:]
    full, _ = metrics(tmp_path / "full")
    stopped_at = torch.load(out / "last.pt", weights_only=False)["step"]
    assert 10 <= stopped_at < 30
    import pretrain
    pretrain.main([*common, f"--out_dir={out}", "--resume"])  # pretrain.py's main, in this process (one thread)
    resumed, _ = metrics(out)
    for step in range(stopped_at + 1, 31):
        assert abs(resumed[step] - full[step]) < 1e-5, (step, resumed[step], full[step])


def test_non_finite_losses_skip_then_stop_with_checkpoint_intact(tiny_corpus, tmp_path, monkeypatch):
    import model as model_mod
    import pretrain
    real_forward = model_mod.Transformer.forward
    calls = {"n": 0}

    def poisoned(self, idx, targets=None, *a):
        logits, loss = real_forward(self, idx, targets, *a)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 3 or calls["n"] > 6:  # one bad step, recovery, then bad for good
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(model_mod.Transformer, "forward", poisoned)
    out = str(tmp_path / "nan")
    with pytest.raises(SystemExit) as e:
        pretrain.main([*TINY, f"--data_dir={tiny_corpus}", f"--out_dir={out}", "--max_steps=40",
                       "--eval_interval=5", "--max_bad_steps=3"])
    assert e.value.code == 3
    log = open(os.path.join(out, "log.txt")).read()
    assert "step 3: non-finite" in log and "1/3" in log and "stopping: 3 non-finite" in log
    train, _ = metrics(out)
    assert 3 not in train and sorted(train) == [1, 2, 4, 5, 6]
    ckpt = torch.load(os.path.join(out, "last.pt"), weights_only=False)
    assert ckpt["step"] == 5 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_bare_cuda_gets_this_process_index(monkeypatch):
    """`--device=cuda` (and auto on a GPU) must name an index: torch.cuda.set_device rejects a bare 'cuda'."""
    from babyllama.runtime import resolve_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda:0")
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda:1")
    assert resolve_device("cuda:3", local_rank=1) == torch.device("cuda:3")
    assert resolve_device("cpu") == torch.device("cpu")


def test_max_minutes_stops_cleanly_with_a_checkpoint(tiny_corpus, tmp_path, capsys):
    import pretrain
    out = tmp_path / "timed"
    pretrain.main([*TINY, f"--data_dir={tiny_corpus}", f"--out_dir={out}", "--max_steps=500", "--max_minutes=0.0001"])
    stdout = capsys.readouterr().out
    assert "stopping at step 1" in stdout and "max_minutes=0.0001" in stdout
    ckpt = torch.load(out / "last.pt", weights_only=False)
    assert ckpt["step"] == 1 and ckpt["config"]["max_steps"] == 500
    train, val = metrics(out)
    assert sorted(train) == [1] and sorted(val) == [0, 1]


@pytest.mark.slow
def test_max_minutes_under_torchrun_stops_every_rank_at_the_same_step(tiny_corpus, tmp_path):
    """Ranks' clocks differ; a rank stopping alone would leave the other waiting in a collective (a hang). Rank 0's
    clock decides, at log steps: both stop at step 3 (the first log step), the run exits 0 with a checkpoint."""
    out = tmp_path / "timed2"
    r = run_script("pretrain.py", [*TINY, f"--data_dir={tiny_corpus}", f"--out_dir={out}", "--max_steps=500",
                                   "--max_minutes=0.0001", "--log_interval=3", "--peak_tflops=1"], nproc=2)
    assert "stopping at step 3" in r.stdout and "max_minutes=0.0001" in r.stdout
    assert torch.load(out / "last.pt", weights_only=False)["step"] == 3
    # MFU: the logged tokens/s are both ranks', so the peak is both cards' (2 x 1 TFLOP/s here)
    line = next(l for l in r.stdout.splitlines() if l.startswith("step 3/500"))
    tok_s = float(line.split(" tok/s")[0].split("| ")[-1].replace(",", ""))
    mfu = float(line.split("mfu ")[1].split("%")[0])
    fpt = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, max_seq_len=32, vocab_size=512)).flops_per_token()
    assert mfu == pytest.approx(100 * fpt * tok_s / 2e12, rel=0.02, abs=0.051)


def test_non_finite_step_leaves_weights_and_optimizer_alone_without_a_host_sync():
    """train_step decides the skip on the device (fused AdamW's found_inf): a NaN loss changes nothing, not even
    AdamW's step count (which sets its bias correction); the next finite step updates as usual."""
    from model import ModelArgs, Transformer
    from babyllama.runtime import Runtime
    from trainer import DeviceBatches, train_step
    model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=64, max_seq_len=16))
    opt = model.configure_optimizer(0.1, 1e-2, (0.9, 0.95), "cpu")
    assert opt.defaults.get("fused"), "the CPU path must take the same on-device skip as CUDA"
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    rt = Runtime(torch.device("cpu"), 0, 0, 1, torch.float32)

    class Src:
        def batch(self, step, micro):
            g = torch.Generator().manual_seed(step)
            w = torch.randint(0, 64, (2, 17), generator=g)
            return w[:, :-1], w[:, 1:]

    batches = DeviceBatches(Src(), 0, 1, rt.device)
    train_step(model, opt, scaler, batches, 1, 1e-2, 1.0, rt)  # one real step: moments exist
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moments = [opt.state[p]["exp_avg"].clone() for p in model.parameters()]
    real = model.forward
    model.forward = lambda x, y: (None, real(x, y)[1] * float("nan"))
    loss, gn = train_step(model, opt, scaler, batches, 1, 1e-2, 1.0, rt)
    assert not torch.isfinite(loss) and isinstance(loss, torch.Tensor)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(m, opt.state[p]["exp_avg"]) for m, p in zip(moments, model.parameters()))
    assert all(int(opt.state[p]["step"]) == 1 for p in model.parameters())
    model.forward = real
    loss, gn = train_step(model, opt, scaler, batches, 1, 1e-2, 1.0, rt)
    assert torch.isfinite(loss) and gn > 0
    assert all(int(opt.state[p]["step"]) == 2 for p in model.parameters())
    assert not torch.equal(before["layers.0.attention.wq.weight"], model.state_dict()["layers.0.attention.wq.weight"])


def test_checkpoint_writer_snapshots_state_and_links_best(tmp_path):
    """The background writer saves the state as it was at save() (training goes on changing the tensors), best.pt
    is the same file as that last.pt, and the next last.pt leaves best.pt alone."""
    from babyllama.checkpoint import CheckpointWriter
    w = torch.zeros(1000)
    writer = CheckpointWriter()
    last, best = str(tmp_path / "last.pt"), str(tmp_path / "best.pt")
    writer.save({"model": {"w": w}, "step": 1}, last, best)
    w += 1.0  # the training thread moves on at once
    writer.wait()
    a, b = torch.load(last), torch.load(best)
    assert a["step"] == b["step"] == 1 and torch.equal(a["model"]["w"], torch.zeros(1000))
    writer.save({"model": {"w": w}, "step": 2}, last)
    writer.wait()
    assert torch.load(last)["step"] == 2 and torch.load(best)["step"] == 1
    assert sorted(os.listdir(tmp_path)) == ["best.pt", "last.pt"]  # no temporary files left
    writer.save({"model": {"w": w}, "step": 3}, str(tmp_path / "missing" / "last.pt"))
    with pytest.raises(DataError, match=r"missing/last\.pt\b.*not written"):  # surfaces in the training thread
        writer.wait()


def test_checkpoint_keeps_the_tied_matrix_once(tmp_path):
    from babyllama.checkpoint import CheckpointWriter
    m = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=640, max_seq_len=16))
    writer = CheckpointWriter()
    writer.save({"model": m.state_dict()}, str(tmp_path / "last.pt"))
    writer.wait()
    sd = torch.load(tmp_path / "last.pt")["model"]
    assert sd["tok_embeddings.weight"].untyped_storage().data_ptr() == sd["output.weight"].untyped_storage().data_ptr()
    m2 = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=640, max_seq_len=16))
    m2.load_state_dict(sd)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))


def test_model_buffers_are_derived_so_ddp_need_not_broadcast_them():
    """babyllama.runtime.wrap_ddp (the trainer's) turns off DDP's per-forward buffer broadcast: safe only while
    every buffer is a function of the model args (equal on all ranks). A stateful buffer added later must turn it
    back on."""
    m = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=64, max_seq_len=16))
    assert sorted(n for n, _ in m.named_buffers()) == ["rope_cos", "rope_sin"]
    other = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=64, max_seq_len=16))
    assert all(torch.equal(a, b) for a, b in zip(m.buffers(), other.buffers()))


def test_wrap_ddp_syncs_no_buffers_per_forward_and_raises_no_deprecation(tmp_path):
    """torch 2.13 deprecates broadcast_buffers with a FutureWarning on every torchrun start; wrap_ddp uses whichever
    name this torch has, and either way DDP does not re-send the rotary tables before each forward."""
    import warnings
    import torch.distributed as dist
    from babyllama.runtime import Runtime, wrap_ddp
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            ddp = wrap_ddp(Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=64, max_seq_len=16)),
                           Runtime(torch.device("cpu"), 0, 0, 1, torch.float32))
        assert getattr(ddp, "forward_sync_buffers", getattr(ddp, "broadcast_buffers", None)) is False
    finally:
        dist.destroy_process_group()


def test_compile_mode_defaults_to_cuda_graphs_and_rejects_unknown_modes():
    """reduce-overhead (CUDA graphs) by default: same losses and memory, 2-11% faster on one GPU (H100, H200)."""
    from babyllama.runtime import compile_mode
    assert TrainConfig().compile_mode == "reduce-overhead" and compile_mode("reduce-overhead") == "reduce-overhead"
    assert compile_mode("default") is None  # torch.compile(mode=None): inductor without CUDA graphs
    with pytest.raises(ConfigError, match="compile_mode.*graphs"):
        parse_config(TrainConfig, ["--compile_mode=graphs"])
    with pytest.raises(ConfigError, match="compile_mode.*auto"):
        parse_config(TrainConfig, ["--compile_mode=auto"])
    assert parse_config(TrainConfig, ["--compile_mode=max-autotune"]).compile_mode == "max-autotune"


def test_fit_minutes_sets_the_length_from_timed_steps_and_decays_to_its_end(tiny_corpus, tmp_path):
    """--fit_minutes: the step count comes from the timed steps, the run takes about that long, the LR ends at min_lr."""
    import pretrain
    out = tmp_path / "fit"
    t0 = time.time()
    pretrain.main([*TINY, f"--data_dir={tiny_corpus}", f"--out_dir={out}", "--fit_minutes=0.1", "--eval_interval=100000",
                   "--ckpt_interval=100000"])
    took = time.time() - t0
    log = (out / "log.txt").read_text()
    line = [ln for ln in log.splitlines() if ln.startswith("fit_minutes=0.1: ")]
    assert len(line) == 1 and "ms/step" in line[0], log[-2000:]
    steps = int(line[0].split("-> ")[1].split(" steps")[0].replace(",", ""))
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if "loss" in r and "step" in r and r.get("lr") is not None]
    assert trained[-1]["step"] == steps > 20  # ran exactly the fitted count, more than the timed steps
    assert trained[-1]["lr"] == pytest.approx(3e-4, rel=1e-3)  # the cosine reached min_lr at the fitted end
    assert 3 < took < 6 + 30  # about 6 s of steps, plus start-up and validation on a busy CPU
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == steps
    # the time outside the steps: two validations (step 0 and the end), one save waited for at the end
    vals = [r for r in rows if "val_loss" in r]
    assert [("save_s" in r) for r in vals] == [False, True] and all(r["val_s"] >= 0 for r in vals)
    assert summary["validation_s"] == pytest.approx(sum(r["val_s"] for r in vals), abs=0.01)
    assert summary["checkpoint_wait_s"] == pytest.approx(vals[-1]["save_s"], abs=0.01) and summary["checkpoint_wait_s"] > 0


def test_fit_minutes_with_max_steps_is_refused():
    import pretrain
    with pytest.raises(ConfigError, match="--fit_minutes.*--max_steps"):
        parse_config(pretrain.PretrainConfig, ["--fit_minutes=1", "--max_steps=1000"])


def test_validation_runs_the_raw_model_not_the_compiled_one(tiny_corpus, tmp_path, monkeypatch):
    """The compiled model only ever trains: a no-grad pass through it would compile (and capture) a second graph."""
    import pretrain
    import trainer

    class Compiled(torch.nn.Module):  # stands in for torch.compile(model): counts the passes made through it
        def __init__(self, inner):
            super().__init__()
            self.inner, self.no_grad_calls, self.calls = inner, 0, 0

        def forward(self, *args, **kwargs):
            self.calls += 1
            self.no_grad_calls += not torch.is_grad_enabled()
            return self.inner(*args, **kwargs)

    wrappers = []
    build = trainer.build_model

    def build_wrapped(*args, **kwargs):
        raw, run, *rest = build(*args, **kwargs)
        wrappers.append(Compiled(run))
        return (raw, wrappers[-1], *rest)

    monkeypatch.setattr(trainer, "build_model", build_wrapped)
    out = str(tmp_path / "run")
    pretrain.main([*TINY, f"--data_dir={tiny_corpus}", f"--out_dir={out}", "--max_steps=6", "--eval_interval=3"])
    _, val = metrics(out)
    assert sorted(val) == [0, 3, 6] and val[6] < val[0]
    assert wrappers[0].calls == 6 and wrappers[0].no_grad_calls == 0
