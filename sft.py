"""Supervised fine-tuning: `prompt <bos> answer <eos>`, loss on the answers only (dataset_sft.py).

Starts from the pretrained model in out/pretrain (best.pt) and writes out/sft, which eval.py reads.
One GPU (or CPU / Apple MPS):
    python sft.py
Several GPUs:
    torchrun --standalone --nproc_per_node=4 sft.py
Tiny CPU run after the tiny pretrain run in pretrain.py's docstring:
    python sft.py --init_from=out/tiny --out_dir=out/tiny_sft --batch_size=8 --max_steps=20 --warmup_steps=2 --eval_interval=10 --log_interval=5 --overwrite
From a Hugging Face Llama folder instead (export.py's, or any of a shape model.py can hold):
    python sft.py --init_from=hf:out/hf_base
Continue a stopped run: `python sft.py --resume` (the saved config; Ctrl-C / SIGTERM save last.pt first, exit 130). Flags are the fields of SFTConfig (`--key=value`, or --config x.json).
The training loop is trainer.py's, shared with pretrain.py.
"""
from __future__ import annotations

import json
import os
import sys

from babyllama.errors import quiet_ctrl_c_until_main  # light: no torch

if __name__ == "__main__":
    quiet_ctrl_c_until_main()  # torch's import takes seconds: a Ctrl-C during it is one line, exit 130
    if os.environ.get("RANK", "0") == "0" and not {"-h", "--help"} & set(sys.argv[1:]):
        # before the imports: torch takes seconds to import on a CPU, a minute on a busy or cold one, and the model and
        # data follow before the run's first line; a user waiting in silence thinks it hangs
        print("sft: starting (importing torch, then the tokenizer, the pretrained model and the conversations)",
              flush=True)

from dataclasses import dataclass

from chatglm_tokenizer import TokenBytes, load_tokenizer
from babyllama.config import config_or_exit
from babyllama.errors import ConfigError, DataError, check, ctrl_c, user_errors
from dataset_sft import Batching, SFTData, SFTSamples, mix_repeats, parse_mix
from hf_llama import load_init, model_tokenizer
from model import ModelArgs
from babyllama.checkpoint import check_same_tokenizer, checkpoint_file, load_checkpoint, tokenizer_advice
from babyllama.runtime import cleanup, setup_runtime
from trainer import TrainConfig, train


TRAIN_MODES = ("packed", "dynamic")  # dataset_sft's "fixed" (every row padded) is bench.py's baseline only


@dataclass
class SFTConfig(TrainConfig):
    out_dir: str = "out/sft"  # where this run's checkpoints go (eval.py and chat.py read it)
    init_from: str = "out/pretrain"  # pretrained checkpoint file or run dir (its best.pt); hf:PATH = a Hugging Face Llama folder
    data_dir: str = "data/sft"  # data_process.py sft output: train.jsonl and val.jsonl
    batch_mode: str = "packed"  # packed (whole conversations packed into full rows, 99.7% real tokens) | dynamic (rows of similar length)
    max_seq_len: int = 0  # row length; 0 = the pretrained model's context length
    pad_multiple: int = 64  # dynamic batches pad to a multiple of this: few distinct shapes for torch.compile
    mix: str = ""  # SFT mix: "medical=3" = conversations from sources whose file name contains "medical" 3 times per epoch (0 drops a source; the rest once); "" = each once; validation is never mixed
    epochs: float = 3.0  # passes over the conversations (docs/recipe.md: 3 at 5e-4 gave the best held-out BLEU)
    learning_rate: float = 5e-4  # peak LR (a third of pretraining's: the model already knows the language)
    min_lr: float = 5e-5
    warmup_steps: int = 30
    weight_decay: float = 0.0  # no decay: a short run from good weights
    dropout: float = 0.1  # in attention and MLP while fine-tuning (replaces the pretrained model's; off in eval and chat): 5% fewer bits/byte on held-out answers
    eval_interval: int = 50
    eval_windows: int = 500  # validation conversations per pass; 0 = all
    ckpt_interval: int = 100

    def validate(self):
        super().validate()
        check(self.batch_mode in TRAIN_MODES, f"batch_mode must be one of {'|'.join(TRAIN_MODES)}, got {self.batch_mode!r}")
        check(self.max_seq_len >= 0, f"max_seq_len must be >= 0, got {self.max_seq_len}")
        check(self.pad_multiple >= 1, f"pad_multiple must be >= 1, got {self.pad_multiple}")
        check(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        try:
            parse_mix(self.mix)
        except ValueError as e:
            raise ConfigError(str(e)) from None


def check_mix(cfg: SFTConfig) -> None:
    """--mix against the sources the data's train.json sidecar lists (data_process.py writes it), before the model
    is loaded or the run folder claimed: a part matching no source, or a mix leaving nothing, is one line now, not
    after minutes of tokenizing (mix_repeats checks the conversations themselves again)."""
    if not cfg.mix:
        return
    side = os.path.join(cfg.data_dir, "train.json")
    try:
        with open(side, encoding="utf-8") as f:
            sources = json.load(f).get("sources")
    except (OSError, ValueError, AttributeError):
        return  # no readable sidecar: the data itself is checked when it is read
    if not isinstance(sources, list) or not all(isinstance(s, str) for s in sources):
        return
    parts = parse_mix(cfg.mix)
    for name, _ in parts:
        if not any(name in src for src in sources):
            raise DataError(f"--mix={cfg.mix}: {name!r} matches no source of {side} (sources: "
                            f"{', '.join(sources) or 'none'})")
    times = [next((t for name, t in parts if name in src), 1) for src in sources]  # the first matching part wins
    if sources and not any(times):
        raise DataError(f"--mix={cfg.mix}: leaves no conversation of {side} (every source 0 times)")


def read_init(cfg: SFTConfig) -> tuple:
    """The pretrained model SFT starts from -> (its path, its checkpoint dict: an hf: folder's fields, or best.pt)."""
    if cfg.init_from.startswith("hf:"):
        return cfg.init_from, load_init(cfg.init_from)
    try:
        init_path = checkpoint_file(cfg.init_from, prefer="best.pt")
    except FileNotFoundError as e:
        raise DataError(f"--init_from {e} (run pretrain.py first, or pass --init_from=RUN_FOLDER, FILE or hf:FOLDER)") \
            from None
    return init_path, load_checkpoint(init_path)


def start_point(cfg: SFTConfig, init_path: str, init: dict, tok, master: bool) -> ModelArgs:
    """Checks the pretrained model against the tokenizer -> its model args with this run's dropout and context."""
    check_same_tokenizer(init_path, init.get("tokenizer_sha256"), tok.sha256, tok.path, advice=tokenizer_advice(init))
    if master:
        print(f"sft: starting from {init_path} ({init.get('kind', '?')} step {init.get('step')}, "
              f"val loss {init.get('val_loss', float('nan')):.4f})")
    args = ModelArgs(**dict(init["model_args"], dropout=cfg.dropout))
    if cfg.max_seq_len:
        check(cfg.max_seq_len <= args.max_seq_len, f"max_seq_len {cfg.max_seq_len} is longer than the "
              f"pretrained model's {args.max_seq_len}")
        args.max_seq_len = cfg.max_seq_len
    return args


def main(argv=None) -> dict:
    cfg = config_or_exit(SFTConfig, argv)
    rt = setup_runtime(cfg.device, cfg.dtype)
    try:
        with user_errors(FileNotFoundError):
            init, args = None, ModelArgs()  # a resumed run's model and config come from its checkpoint (trainer.py)
            if not (cfg.resume or cfg.resume_from):
                check_mix(cfg)  # before the tokenizer, the model and the data are loaded
                init_path, init = read_init(cfg)
            # the tokenizer: the flag's, else the pretrained model's own (an hf: folder's, or the one its run was given
            # where it is still here; then recorded in this run's checkpoints too), else the default lookup
            cfg.tokenizer = cfg.tokenizer or model_tokenizer(cfg.init_from, init)
            tok = load_tokenizer(cfg.tokenizer or None)
            if init is not None:
                args = start_point(cfg, init_path, init, tok, rt.master)

            def make_data(run: SFTConfig, margs: ModelArgs, grad_accum: int):
                def split(name: str, accum: int) -> SFTData:
                    path = os.path.join(run.data_dir, f"{name}.jsonl")
                    if not os.path.isfile(path):
                        raise FileNotFoundError(f"{path}: no such file; run `python data_process.py` first")
                    batching = Batching(batch_size=run.batch_size, seed=run.seed, rank=rt.rank,
                                        world_size=rt.world_size, mode=run.batch_mode, grad_accum=accum,
                                        pad_multiple=run.pad_multiple)
                    samples = SFTSamples(path, tok, margs.max_seq_len)
                    return SFTData(samples, batching, mix_repeats(samples, run.mix) if name == "train" else None)
                return split("train", grad_accum), split("val", 1)

            return train(cfg, rt, args, make_data, kind="sft", tokenizer_sha256=tok.sha256,
                         init_state=init and init["model"], token_bytes=TokenBytes(tok))
    finally:
        cleanup(rt)


if __name__ == "__main__":
    with ctrl_c():  # Ctrl-C before the training loop (or a second one in it): one line, exit 130
        main()
