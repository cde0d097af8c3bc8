"""Runs stages of the pipeline one after another in one Python process: what speedrun.sh does on one GPU.

    python chain.py pretrain.py --data_dir=data/pretrain -- sft.py --init_from=out/pretrain -- eval.py --ckpt=out/sft
    python chain.py --record=out/speedrun.jsonl pretrain.py ... -- sft.py ...   # a {"stage","command","seconds"} line each
    python chain.py --after=out/.data-ready pretrain.py ... &    # starts torch and CUDA now, the stages once the file says ok

Each stage is exactly `python SCRIPT FLAGS` (the script's main() with those flags: same checkpoints, logs and
reports), but the stages share the interpreter, the CUDA context and torch.compile's compiled graphs and kernels:
SFT's step has pretraining's shapes and code, so torch.compile can reuse what it built, and no stage after the
first imports torch or starts CUDA again (docs/speed.md). Stages are separated by a
`--` word; SCRIPT is one of pretrain.py, sft.py, eval.py, report.py, and a stage is named after it unless
`--name=NAME` comes first (`-- --name=eval-original eval.py ...`). A stage that fails stops the chain with its exit
status (2 for bad input, 3 for a run stopped by its guards, 130 for Ctrl-C); the later stages do not run. One
process only: under torchrun each stage runs as its own command (a stage tears down its process group).
--after=FILE (speedrun.sh, while it still tokenizes the data): import torch and the stages' scripts and start CUDA
at once, then wait for FILE; "ok" in it runs the stages, anything else exits with status 1 and runs none.
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

SCRIPTS = ("pretrain.py", "sft.py", "eval.py", "report.py")  # scripts whose main(argv) can run as a stage


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


def start_early(scripts: List[str], ready: str, poll: float = 0.05) -> float:
    """--after: torch, the stages' scripts with what they import (eval.py's scoring libraries among them: seconds
    where their bytecode must be compiled first), torch.compile's modules, the CUDA context with cuBLAS and the eval's
    word dictionary while the data is still being prepared, then waits for `ready` to exist; anything but "ok" in it
    exits with status 1 (the data stages failed, and their script says why). Started in the background by a script,
    this process inherited Ctrl-C ignored: it takes it again, so Ctrl-C stops it as it stops the script.
    -> time.time() when the data was ready (`ready` written): where the imports outlast the data stages, the first
    stage waited for them from then, and its start-up counts from then."""
    began = time.time()
    signal.signal(signal.SIGINT, signal.default_int_handler)
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
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        raise SystemExit(0)
    log, after, stages = parse(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun: each stage sets up and tears down its process group
        fail("chain.py runs the stages of one process; under torchrun run each stage's script on its own "
             "(speedrun.sh does with NPROC > 1)")
    ready_at = start_early([script for _, script, _ in stages], after) if after else None
    t0 = time.time()
    for i, (name, script, flags) in enumerate(stages):
        command = shlex.join(["python", script, *flags])
        print(f"\n== [+{time.time() - t0:.0f}s] {name}: {command}", flush=True)
        # the first stage from the data being ready (--after) or the process's start (None), a later one from now
        seconds = run_stage(script, flags, ready_at if i == 0 else time.time())
        if log:  # appended, never through a link: the speedrun's record of each stage
            with open_append(log) as f:
                f.write(json.dumps({"stage": name, "command": command, "seconds": round(seconds, 1)},
                                   ensure_ascii=False) + "\n")


if __name__ == "__main__":
    with ctrl_c():
        main()
    # every stage has written, flushed and closed its files (checkpoints are settled before a stage returns): skip
    # the interpreter's teardown of torch (its compile workers, the CUDA context), a second or more at the end
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
