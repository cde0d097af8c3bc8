"""Pretrain the baby Llama2 on tokens from data_process.py.

One GPU (or CPU / Apple MPS; the device is picked for you):
    python pretrain.py
Several GPUs on one node (the global batch in tokens stays the same; accumulation shrinks):
    torchrun --standalone --nproc_per_node=4 pretrain.py
Several nodes: add torchrun's --nnodes/--node_rank/--rdzv_endpoint flags; nothing else changes.
Tiny CPU smoke run on the embedded sample (`python data_process.py` first; 2 min on 2 CPU cores at load 5):
    python pretrain.py --dim=64 --n_layers=2 --n_heads=4 --max_seq_len=128 --batch_size=8 --max_steps=30 --warmup_steps=3 \
        --eval_interval=15 --eval_windows=16 --log_interval=5 --out_dir=out/tiny --overwrite
Start from the weights of a Hugging Face Llama folder (export.py's, or any of a shape model.py can hold):
    python pretrain.py --init_from=hf:out/hf    (its config.json sets the model shape; the model flags are ignored)
Continue a stopped run exactly where it stopped:
    python pretrain.py --resume            (reads out/pretrain/last.pt and its config; --max_steps may change)
A fresh run into a folder that holds a checkpoint needs --overwrite; one run writes to a folder at a time.
Ctrl-C or SIGTERM: the step finishes, last.pt is written, exit 130 (then --resume).
Flags are the fields of PretrainConfig below (`--key=value`), or a JSON file: `--config my.json`.
"""
from __future__ import annotations

import os
import sys

from babyllama.errors import quiet_ctrl_c_until_main  # light: no torch

if __name__ == "__main__":
    quiet_ctrl_c_until_main()  # torch's import takes seconds: a Ctrl-C during it is one line, exit 130
    if os.environ.get("RANK", "0") == "0" and not {"-h", "--help"} & set(sys.argv[1:]):
        # before the imports: torch takes seconds to import on a CPU, a minute on a busy or cold one, and the model and
        # data follow before the run's first line; a user waiting in silence thinks it hangs
        print("pretrain: starting (importing torch, then the tokenizer, the data and the model)", flush=True)

from dataclasses import dataclass
from typing import Optional

from chatglm_tokenizer import ChatGLMTokenizer, TokenBytes, find_tokenizer, recorded_tokenizer
from chatglm_tokenizer.tokenizer import VOCAB_SIZE
from babyllama.config import config_or_exit
from babyllama.checkpoint import check_same_tokenizer
from babyllama.errors import DataError, check, ctrl_c, fail, user_errors
from dataset import PretrainData, data_tokenizer, recorded_data_tokenizer
from hf_llama import folder_tokenizer, load_init
from model import ModelArgs
from babyllama.runtime import cleanup, setup_runtime
from trainer import TrainConfig, train


@dataclass
class PretrainConfig(TrainConfig):
    data_dir: str = "data/pretrain"  # data_process.py output: train_*.bin and val_*.bin with .json sidecars
    # length and rate from docs/recipe.md: 6 passes over a small corpus, never past 20 tokens per parameter
    # (the compute-optimal ratio) on a large one; max_steps > 0 overrides both
    epochs: float = 6.0  # passes over the training split (max_steps = 0)
    tokens_per_param: float = 20.0  # cap on the tokens of the run, per model parameter (max_steps = 0)
    learning_rate: float = 1.5e-3  # peak LR: held-out loss 2.99 after 6 epochs, against 3.28 at 3e-4 after 4
    min_lr: float = 1.5e-4  # LR at the end of the cosine decay
    weight_decay: float = 0.3  # on matrices: with SFT's dropout, the answers' bits/byte fell 1.3% against 0.1 (recipe.md)
    init_from: str = ""  # "" = random init; hf:PATH = the weights and shape of a local Hugging Face Llama folder
    # model (the original project's defaults: about 58.5M unique parameters)
    dim: int = 512  # width of the residual stream
    n_layers: int = 8  # transformer blocks
    n_heads: int = 8  # query heads (head size = dim / n_heads)
    n_kv_heads: int = 0  # key/value heads for grouped-query attention; 0 = n_heads
    multiple_of: int = 32  # SwiGLU hidden size is rounded up to a multiple of this
    max_seq_len: int = 512  # context length in tokens
    vocab_size: int = 0  # 0 = the tokenizer's (else the shards' sidecars', else 64793); larger pads, smaller is refused
    dropout: float = 0.0  # dropout in attention and MLP (0 for pretraining at this scale)

    def validate(self):
        super().validate()
        check(self.n_kv_heads >= 0, f"n_kv_heads must be >= 0 (0 = n_heads), got {self.n_kv_heads}")
        self.model_args().validate()  # positive sizes, dim / n_heads even, n_heads / n_kv_heads, dropout in [0, 1)
        check(self.max_seq_len >= 8, f"max_seq_len must be >= 8, got {self.max_seq_len}")
        check(0 <= self.vocab_size <= 65536,
              f"vocab_size must be in 0..65536 (0 = the tokenizer's; ids are uint16), got {self.vocab_size}")
        check(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        check(not self.init_from or self.init_from.startswith("hf:"),
              f"init_from must be hf:PATH (a Hugging Face Llama folder), got {self.init_from!r}; --resume continues a run")

    def model_args(self) -> ModelArgs:
        return ModelArgs(dim=self.dim, n_layers=self.n_layers, n_heads=self.n_heads,
                         n_kv_heads=self.n_kv_heads or None, vocab_size=self.vocab_size or VOCAB_SIZE,
                         multiple_of=self.multiple_of, max_seq_len=self.max_seq_len, dropout=self.dropout)


def run_vocab(cfg: PretrainConfig, tok: Optional[ChatGLMTokenizer], data_sha: Optional[str],
              data_vocab: Optional[int]) -> int:
    """The model's vocab_size: --vocab_size when given (at least the vocabulary of the ids it trains on: more rows
    are padding), else the tokenizer's, else the shards' sidecars' (a run from shards alone), else ChatGLM2's."""
    # the ids come from the tokenizer when the shards name it (a hash mismatch is refused later), else from the shards
    need = tok.vocab_size if tok is not None and data_sha else data_vocab
    if not cfg.vocab_size:
        return tok.vocab_size if tok is not None else data_vocab or VOCAB_SIZE
    if need and cfg.vocab_size < need:
        fail(f"--vocab_size={cfg.vocab_size} is below the tokenizer's {need} (ids of {cfg.data_dir} go up to "
             f"{need - 1}); leave it 0 to take the tokenizer's")
    return cfg.vocab_size


def load_run_tokenizer(cfg: PretrainConfig) -> Optional[ChatGLMTokenizer]:
    """The tokenizer when it is at hand (no download: pretraining needs only its hash, vocab and byte lengths):
    --tokenizer, else an hf: --init_from's own, else the one the shards were made with where it is still here (then
    cfg.tokenizer names it, so the checkpoints record it for sft.py, eval.py and chat.py), else the default lookup."""
    cfg.tokenizer = cfg.tokenizer or folder_tokenizer(cfg.init_from) or \
        recorded_tokenizer(*recorded_data_tokenizer(cfg.data_dir))
    try:
        return ChatGLMTokenizer(find_tokenizer(cfg.tokenizer or None, download=False))
    except FileNotFoundError as e:
        if cfg.tokenizer:  # a path the user named must exist
            fail(str(e))
        return None  # the tokenizer only checks the data: without it, the shards' common hash is the run's
    except DataError as e:
        fail(str(e))


def main(argv=None) -> dict:
    cfg = config_or_exit(PretrainConfig, argv)
    tok = load_run_tokenizer(cfg)
    tok_hash = tok.sha256 if tok is not None else ""
    init = None
    if cfg.init_from:  # a bad folder fails before the data is read
        try:
            init = load_init(cfg.init_from)
        except DataError as e:
            fail(str(e))
    if not (cfg.resume or cfg.resume_from):  # a resumed run keeps its checkpoint's hash and model (trainer.py)
        try:  # every shard, train and val, from one tokenizer: its hash is the run's
            data_sha, data_vocab = data_tokenizer(cfg.data_dir)
        except DataError as e:
            fail(str(e))
        tok_hash = tok_hash or data_sha or ""
        cfg.vocab_size = run_vocab(cfg, tok, data_sha, data_vocab)  # what the checkpoint's config records
    margs = cfg.model_args()
    if init is not None:
        with user_errors():
            check_same_tokenizer(cfg.init_from, init["tokenizer_sha256"], tok_hash)
        margs = ModelArgs(**dict(init["model_args"], dropout=cfg.dropout))
    rt = setup_runtime(cfg.device, cfg.dtype)

    def make_data(run: PretrainConfig, args: ModelArgs, grad_accum: int):
        def split(name: str, accum: int) -> PretrainData:
            return PretrainData(run.data_dir, name, args.max_seq_len, run.batch_size, seed=run.seed, rank=rt.rank,
                                world_size=rt.world_size, grad_accum=accum, vocab_size=args.vocab_size,
                                tokenizer_sha256=tok_hash or None)
        return split("train", grad_accum), split("val", 1)

    try:  # ConfigError: a --batch_tokens that does not divide
        with user_errors(FileNotFoundError):
            return train(cfg, rt, margs, make_data, kind="pretrain", tokenizer_sha256=tok_hash,
                         init_state=init and init["model"], token_bytes=TokenBytes(tok) if tok is not None else None)
    finally:
        cleanup(rt)


if __name__ == "__main__":
    with ctrl_c():  # Ctrl-C before the training loop (or a second one in it): one line, exit 130
        main()
