"""Runs stages of the pipeline one after another in one Python process: what speedrun.sh does on one GPU.

    python chain.py pretrain.py --data_dir=data/pretrain -- sft.py --init_from=out/pretrain -- eval.py --ckpt=out/sft
    python chain.py --record=out/speedrun.jsonl pretrain.py ... -- sft.py ...   # a {"stage","command","seconds"} line each
    python chain.py --after=out/.data-ready pretrain.py ... &    # starts torch and CUDA now, the stages once the file says ok
    python chain.py --check pretrain.py ... -- sft.py ...        # only checks every stage's flags (exit 2 on a bad one)

Each stage is exactly `python SCRIPT FLAGS` (the script's main() with those flags: same checkpoints, logs and
reports), but the stages share the interpreter, the CUDA context and torch.compile's modules and worker processes:
no stage after the first imports torch or starts CUDA again (docs/speed.md). Stages are separated by a `--` word;
SCRIPT is one of pretrain.py, sft.py, eval.py, report.py, and a stage is named after it unless `--name=NAME` comes
first (`-- --name=eval-original eval.py ...`). Every stage's flags are checked first, as its script parses them: a
bad one is one line (exit 2) before any stage runs. A stage that fails stops the chain with its exit status (2 for bad
input, 3 for a run stopped by its guards, 130 for Ctrl-C); the later stages do not run. One process only: under
torchrun each stage runs as its own command (a stage tears down its process group).
--after=FILE (speedrun.sh, while it still tokenizes the data): import torch and the stages' scripts and start CUDA
at once, then wait for FILE; "ok" in it runs the stages, anything else exits with status 1 and runs none.
Where SFT follows pretraining on a GPU, SFT's step (another graph: dropout, packed rows) is compiled in a side
process while pretraining runs (AheadCompile): spawned with the pretraining stage, it imports and starts CUDA at once
and compiles once pretraining's own compilation is done, so the SFT stage finds torch.compile's caches warm.
"""
from __future__ import annotations

import gc
import importlib
import json
import os
import shlex
import signal
import sys
import time
from typing import List, Optional

from babyllama.errors import ctrl_c, fail
from babyllama.fileio import open_append

# scripts whose main(argv) can run as a stage -> the config class their flags make
SCRIPTS = {"pretrain.py": "PretrainConfig", "sft.py": "SFTConfig", "eval.py": "EvalConfig", "report.py": "ReportConfig"}
AHEAD_WAIT_S = 120.0  # the longest the SFT stage waits for its step compiled ahead before compiling it itself


def sft_config() -> type:
    """sft.py's SFTConfig: the stage's script loaded as run_stage loads it (a script, not a library to import)."""
    return importlib.import_module("sft").SFTConfig


class RandomRows:
    """Packed SFT micro-batches of random ids, shaped and typed as dataset_sft.SFTData.batch's: (x, y, seg), each
    (B, T) int64, contiguous; two segments per row, a prompt's targets -1. torch.compile keys its graphs by these."""

    def __init__(self, batch_size: int, seq_len: int, vocab_size: int):
        self.shape, self.vocab = (batch_size, seq_len), vocab_size

    def batch(self, step: int, micro_step: int):
        import torch
        x = torch.randint(1, self.vocab, self.shape)
        y = torch.roll(x, -1, dims=1)
        seg = torch.ones(self.shape, dtype=torch.int64)
        seg[:, self.shape[1] // 2:] = 2
        y[:, :8] = -1
        return x, y, seg


def ahead_config(flags: List[str]):
    """sft.py's config for FLAGS when its step can be compiled ahead, else None: a resumed SFT run, rows of varying
    width (--batch_mode=dynamic), no compilation, or flags sft.py will refuse anyway (it says why when its turn
    comes)."""
    from babyllama.config import parse_config
    try:
        cfg = parse_config(sft_config(), flags)
    except Exception:  # noqa: BLE001  (a bad flag: the SFT stage reports it itself)
        return None
    if cfg.resume or cfg.resume_from or cfg.batch_mode != "packed" or not cfg.compile:
        return None
    return cfg


def ahead_spec(pre_cfg, model_args, flags: List[str]) -> Optional[dict]:
    """What the side process needs to compile the step `sft.py FLAGS` will run after this pretraining run, or None
    when that step's shape cannot be told now: SFT from another model, or ahead_config's cases."""
    import dataclasses
    cfg = ahead_config(flags)
    if cfg is None:
        return None
    start = os.path.realpath(cfg.init_from)  # the pretraining run's folder, or a checkpoint file it will write
    if start.endswith(".pt"):
        start = os.path.dirname(start)
    if start != os.path.realpath(pre_cfg.out_dir):
        return None
    args = dict(dataclasses.asdict(model_args), dropout=cfg.dropout)  # sft.start_point's model: SFT's dropout
    if cfg.max_seq_len:
        args["max_seq_len"] = min(cfg.max_seq_len, args["max_seq_len"])
    return {"model_args": args, "flags": flags}


def compile_ahead(stream) -> None:
    """The side process (`python chain.py --compile_ahead=-`): imports what compiling needs and starts CUDA, then
    reads its spec (ahead_spec's, one JSON line; an empty stream: nothing to do) from `stream`, builds and compiles
    SFT's model as trainer.py will, with pretraining's shape and SFT's flags, and runs one training step on random
    rows of SFT's shape, so that torch.compile's caches hold the graphs and kernels the SFT stage asks for. Its
    weights and data are thrown away."""
    import torch
    import torch._inductor.compile_fx  # noqa: F401  the compiler, imported while pretraining starts
    from babyllama.config import parse_config
    from babyllama.runtime import attention_kernels, setup_runtime
    from model import ModelArgs
    from trainer import DeviceBatches, build_model, grad_accum_steps, train_step
    if torch.cuda.is_available():
        torch.ones(1, device="cuda").item()  # the CUDA context
    line = stream.readline()
    if not line.strip():
        return
    spec = json.loads(line)
    cfg = parse_config(sft_config(), spec["flags"])
    rt = setup_runtime(cfg.device, cfg.dtype)
    args = ModelArgs(**spec["model_args"])
    accum = grad_accum_steps(cfg, args.max_seq_len, rt.world_size)
    with attention_kernels(cfg.attention):
        _, model, optimizer, scaler, _ = build_model(cfg, rt, args, None, None)
        rows = RandomRows(cfg.batch_size, args.max_seq_len, args.vocab_size)
        loss, _ = train_step(model, optimizer, scaler, DeviceBatches(rows, 0, accum, rt.device), accum,
                             cfg.learning_rate, cfg.grad_clip, rt)
        float(loss)  # the step ran to its end


def gpu_available() -> bool:
    import torch
    return torch.cuda.is_available()


class AheadCompile:
    """SFT's training step compiled in a side process while pretraining still runs: the SFT stage then finds
    torch.compile's caches warm, instead of spending its first 15-25 s compiling (docs/speed.md). The process is
    spawned as the pretraining stage starts (it imports torch and torch.compile's modules and starts CUDA beside
    pretraining's start-up) and compiles once trainer.ON_COMPILED says pretraining's own compilation is done, so the
    two compilations do not share the CPU. Nothing the stage computes depends on it: if the side process fails, or is
    not done within AHEAD_WAIT_S of the stage's start, the stage compiles as it would anyway."""

    def __init__(self, flags: List[str]):
        self.flags, self.proc, self.t0, self.err, self.sent = flags, None, 0.0, None, False

    def spawn(self) -> None:
        """Starts the side process, which waits for its spec on stdin (an empty line: nothing to compile)."""
        import subprocess
        import tempfile
        self.err = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--compile_ahead=-"],
                                     stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self.err)

    def start(self, pre_cfg, model_args) -> None:
        """trainer.ON_COMPILED's hook: hands the side process what to compile (spawning it first if it is not
        running), or stops it when SFT's step cannot be told now. Once per chain at most."""
        if self.sent:
            return
        self.sent = True
        spec = ahead_spec(pre_cfg, model_args, self.flags)
        if spec is None:
            self.stop()
            return
        if self.proc is None:
            self.spawn()
        self.t0 = time.time()  # its compilation from here
        try:
            self.proc.stdin.write((json.dumps(spec) + "\n").encode())
            self.proc.stdin.close()
        except OSError:  # it has died already: settle() says how
            pass

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            if self.proc.stdin:
                self.proc.stdin.close()
            self.proc = None

    def settle(self, limit: float = AHEAD_WAIT_S) -> Optional[str]:
        """Waits for the side process (at most `limit` s; then it is stopped) -> a line saying how it went, or None if
        it was given nothing to compile (pretraining never finished compiling, or SFT's step was not known)."""
        import subprocess
        if self.proc is None or not self.sent:
            self.stop()
            return None
        t_wait = time.time()
        try:
            code = self.proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            code = None
        self.stop()
        waited, took = time.time() - t_wait, time.time() - self.t0
        if code == 0:
            return (f"sft's step was compiled ahead while pretraining ran ({took:.1f} s in a side process"
                    + (f", {waited:.1f} s of it waited for here)" if waited >= 0.1 else ")"))
        self.err.seek(0)
        last = (self.err.read().decode("utf-8", "replace").strip().splitlines() or [""])[-1]
        why = f"not done within {limit:g} s" if code is None else f"exit status {code}: {last[:200]}"
        return f"sft's step compiled ahead: {why}; sft compiles it itself"


def parse(argv: List[str]) -> tuple:
    """-> (log file or "", --after file or "", [(stage name, script, [flags])]), or a one-line error (exit 2) for a
    malformed command line."""
    log = after = ""
    while argv and argv[0].startswith(("--record=", "--after=")):
        key, _, value = argv[0].partition("=")
        log, after = (value, after) if key == "--record" else (log, value)
        argv = argv[1:]
    stages, current, name = [], None, ""
    for word in argv + ["--"]:
        if word == "--":
            if current is None:
                fail("chain.py: an empty stage (two `--` in a row, or `--` first or last); expected SCRIPT FLAGS -- "
                     "SCRIPT FLAGS ...")
            stages.append(current)
            current, name = None, ""
        elif current is None and word.startswith("--name=") and not name:
            name = word[len("--name="):]
        elif current is None:
            if word not in SCRIPTS:
                fail(f"chain.py: {word!r} is not a stage; expected one of {', '.join(SCRIPTS)} (see python chain.py "
                     f"--help)")
            current = (name or word[:-3], word, [])
        else:
            current[2].append(word)
    return log, after, stages


def check_flags(stages: List[tuple]) -> None:
    """Every stage's flags parsed and validated as its script will parse them, before any stage runs: a typo in the
    last stage's flags is one line now (exit 2), not after the training."""
    from babyllama.config import ConfigError, parse_config
    for name, script, flags in stages:
        if "--help" not in flags and "-h" not in flags:  # the stage prints its help when its turn comes
            try:
                parse_config(getattr(importlib.import_module(script[:-3]), SCRIPTS[script]), flags)
            except ConfigError as e:
                fail(f"{name}: {e}")


def start_early(scripts: List[str], ready: str, poll: float = 0.05) -> float:
    """--after: torch, the stages' scripts with what they import (eval.py's scoring libraries among them: seconds
    where their bytecode must be compiled first), torch.compile's modules, the CUDA context with cuBLAS and the eval's
    word dictionary while the data is still being prepared, then waits for `ready` to exist; anything but "ok" in it
    exits with status 1 (the data stages failed, and their script says why).
    -> time.time() when the data was ready (`ready` written): where the imports outlast the data stages, the first
    stage waited for them from then, and its start-up counts from then."""
    began = time.time()
    import torch
    for script in dict.fromkeys(scripts):
        importlib.import_module(script[:-3])
    import torch._dynamo  # noqa: F401  torch.compile's tracer, which AdamW imports too: 1-2 s off the first stage
    if torch.cuda.is_available():
        import torch._inductor.compile_fx  # noqa: F401  the compiler the first compiled step imports
        x = torch.ones(64, 64, device="cuda", dtype=torch.bfloat16)
        (x @ x).sum().item()  # the CUDA context, and cuBLAS's handle and workspace of the first matmul
    if "eval.py" in scripts:  # jieba's dictionary, which the eval's first BLEU score would load: a second of CPU
        from babyllama.bleu import load_dictionary
        load_dictionary()
    while not os.path.exists(ready):
        time.sleep(poll)
    with open(ready, encoding="utf-8") as f:
        if f.read().strip() != "ok":
            raise SystemExit(1)
    # its modification time, within this wait (a clock that disagrees cannot move the stage's start outside it)
    return min(time.time(), max(began, os.stat(ready).st_mtime))


def run_stage(script: str, flags: List[str], start: Optional[float]) -> float:
    """Runs one stage -> its seconds from `start` (time.time()), or None: from the process's start (the first stage's
    without --after: the interpreter, torch's import and CUDA are its start-up). Its start-up (summary.json,
    eval_report.json) counts from there too. Raises SystemExit with the stage's status if it fails."""
    from babyllama.clocks import process_start, start_stage  # imports torch: after the stage's line is printed
    if start is not None:
        start_stage(start)
    t0 = process_start()  # its wall time from there too, as speedrun.sh times a stage of its own process
    module = importlib.import_module(script[:-3])
    module.main(flags)  # a failure raises SystemExit with its status, as under `python SCRIPT`
    seconds = time.time() - t0
    gc.collect()  # the finished stage's model, optimizer and data go before the next stage allocates its own
    if "torch" in sys.modules and sys.modules["torch"].cuda.is_initialized():
        sys.modules["torch"].cuda.empty_cache()
    return seconds


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv == ["--compile_ahead=-"]:  # the side process of AheadCompile
        compile_ahead(sys.stdin)
        return
    if argv[:1] == ["--check"]:  # the stages' flags only (speedrun.sh, where torchrun runs each stage on its own)
        check_flags(parse(argv[1:])[2])
        return
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        raise SystemExit(0)
    log, after, stages = parse(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun: each stage sets up and tears down its process group
        fail("chain.py runs the stages of one process; under torchrun run each stage's script on its own "
             "(speedrun.sh does with NPROC > 1)")
    if after:  # started in the background by a script, this process inherited Ctrl-C ignored: it takes it again
        signal.signal(signal.SIGINT, signal.default_int_handler)
        check_flags(stages)  # while the data is still being made
    ready_at = start_early([script for _, script, _ in stages], after) if after else None
    ahead = AheadCompile([])  # SFT's step, compiled in a side process while the pretraining stage before it runs
    t0 = time.time()
    try:
        for i, (name, script, flags) in enumerate(stages):
            # the first stage from the data being ready (--after) or the process's start (None), a later one from now
            start = ready_at if i == 0 else time.time()
            command = shlex.join(["python", script, *flags])
            print(f"\n== [+{time.time() - t0:.0f}s] {name}: {command}", flush=True)
            if i == 0 and not after:  # said first: the scripts import torch, seconds before the stage's own line
                check_flags(stages)
            said = ahead.settle()  # in this stage's time: a wait for it is this stage's
            if said:
                print(said, flush=True)
            sft_next = script == "pretrain.py" and i + 1 < len(stages) and stages[i + 1][1] == "sft.py"
            if sft_next:
                ahead = AheadCompile(stages[i + 1][2])
                sft_cfg = ahead_config(ahead.flags)
                if sft_cfg is not None and sft_cfg.device != "cpu" and gpu_available():
                    ahead.spawn()  # its imports and CUDA start beside pretraining's
            if sft_next or "trainer" in sys.modules:  # the hook belongs to a pretraining stage followed by SFT only
                import trainer
                trainer.ON_COMPILED[:] = [ahead.start] if sft_next else []
            seconds = run_stage(script, flags, start)
            if log:  # appended, never through a link: the speedrun's record of each stage
                with open_append(log) as f:
                    f.write(json.dumps({"stage": name, "command": command, "seconds": round(seconds, 1)},
                                       ensure_ascii=False) + "\n")
    finally:
        ahead.stop()  # a failed or interrupted chain leaves no side process behind


if __name__ == "__main__":
    with ctrl_c():
        main()
    # every stage has written, flushed and closed its files (checkpoints are settled before a stage returns): skip
    # the interpreter's teardown of torch (its compile workers, the CUDA context), a second or more at the end
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
