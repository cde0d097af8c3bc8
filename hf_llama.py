"""The project's Transformer <-> Hugging Face `LlamaForCausalLM`: config, weight names, rotary layout.

Library module, no command line. export.py writes a Hugging Face folder with `hf_config` + `to_hf_state`;
pretrain.py and sft.py start from one with `--init_from=hf:PATH`, through `load_init`:
    cfg, state = hf_config(model.args), to_hf_state(model)       # config.json dict, safetensors tensors
    args, state = read_hf("out/hf")                              # ModelArgs + a state dict Transformer loads
    init = load_init("hf:out/hf")                                # the checkpoint-like dict sft.py/pretrain.py use

Rotary layout: model.apply_rope rotates interleaved pairs (x[2i], x[2i+1]) as Meta's Llama does; transformers'
rotate_half pairs x[i] with x[i + head_dim/2]. Rotating q and k by the same map leaves q.k unchanged, so each
head's rows of wq and wk are permuted (Meta's to HF's order: the permutation of transformers' own
convert_llama_weights_to_hf.py) and the logits stay the same; the inverse permutation brings them back.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Optional

import torch

from chatglm_tokenizer import tokenizer_sha256
from babyllama.errors import DataError  # a folder this project cannot load: one line naming the file and what was expected
from model import ModelArgs

ROPE_THETA = 10000.0  # model.rope_tables' default base; a Llama folder with another base is refused
PROJECT_KEY = "baby_llama2"  # config.json block with what a checkpoint knew (kind, step, val loss, tokenizer)
# per layer: project name -> Hugging Face name (q/k also permuted)
LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}


def interleaved_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of wq/wk (n_heads * head_dim, dim) from interleaved pairs to rotate_half order, head by head.

    Per head, rows (0, 1, 2, 3, ...) = (re0, im0, re1, im1, ...) become (re0, re1, ..., im0, im1, ...)."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def half_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of interleaved_to_half."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_config(args: ModelArgs, dtype: torch.dtype = torch.float32, project: Optional[dict] = None) -> dict:
    """config.json of a LlamaForCausalLM with this model's shape (written by hand, in the long-standing keys that
    transformers 4.x/5.x, vLLM and llama.cpp's converter all read). The vocabulary is the real one (64,793): the
    rows model.py pads for fast matmuls are dropped."""
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": args.vocab_size,
        "hidden_size": args.dim,
        "intermediate_size": args.hidden_dim,  # SwiGLU width as model.py rounds it (multiple_of)
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": args.dim // args.n_heads,
        "hidden_act": "silu",
        "max_position_embeddings": args.max_seq_len,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": ROPE_THETA,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": True,  # one matrix reads and writes tokens, as in model.py
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "torch_dtype": str(dtype).replace("torch.", ""),
    }
    if project:
        cfg[PROJECT_KEY] = project
    return cfg


def to_hf_state(model, dtype: torch.dtype = torch.float32) -> dict:
    """Hugging Face tensor names -> contiguous CPU tensors of `dtype`. lm_head is left out: tie_word_embeddings."""
    a = model.args
    src = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    out = {"model.embed_tokens.weight": src["tok_embeddings.weight"][: a.vocab_size],
           "model.norm.weight": src["norm.weight"]}
    for i in range(a.n_layers):
        for ours, theirs in LAYER_NAMES.items():
            w = src[f"layers.{i}.{ours}"]
            if ours == "attention.wq.weight":
                w = interleaved_to_half(w, a.n_heads)
            elif ours == "attention.wk.weight":
                w = interleaved_to_half(w, a.kv_heads)
            out[f"model.layers.{i}.{theirs}"] = w
    return {k: v.to(dtype).contiguous() for k, v in out.items()}


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file; expected a Hugging Face Llama folder (config.json, "
                            f"model.safetensors)") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not JSON ({e.msg})") from None


def args_from_config(cfg: dict, where: str) -> ModelArgs:
    """ModelArgs for a Llama config.json, or a one-line DataError naming what model.py cannot express."""
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise DataError(f"{where}: {what}; model.py cannot load this Llama")

    need(cfg.get("model_type") == "llama", f"model_type {cfg.get('model_type')!r}, expected 'llama'")
    dim, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    need(cfg.get("hidden_act", "silu") == "silu", f"hidden_act {cfg.get('hidden_act')!r}, expected silu")
    need(not cfg.get("attention_bias") and not cfg.get("mlp_bias"), "biases in attention or MLP")
    need(cfg.get("head_dim") in (None, dim // heads), f"head_dim {cfg.get('head_dim')} != hidden_size / heads")
    theta = cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", ROPE_THETA))
    need(theta == ROPE_THETA, f"rope_theta {theta}, model.py uses {ROPE_THETA}")
    scaling = cfg.get("rope_scaling") or {}
    need(scaling.get("rope_type", scaling.get("type", "default")) == "default", f"rope_scaling {scaling}")
    need(cfg.get("tie_word_embeddings", False), "untied lm_head (tie_word_embeddings false)")
    project = cfg.get(PROJECT_KEY) or {}
    # model.py's SwiGLU width is multiple_of * ceil(int(8 * dim / 3) / multiple_of): multiple_of = the width
    # itself gives that width whenever it is at least int(8 * dim / 3)
    inter, base = cfg["intermediate_size"], int(2 * 4 * dim / 3)
    need(inter >= base, f"intermediate_size {inter} < int(8 * hidden_size / 3) = {base}")
    args = ModelArgs(dim=dim, n_layers=cfg["num_hidden_layers"], n_heads=heads,
                     n_kv_heads=None if cfg.get("num_key_value_heads", heads) == heads else cfg["num_key_value_heads"],
                     vocab_size=cfg["vocab_size"],
                     multiple_of=project.get("multiple_of", inter), norm_eps=cfg.get("rms_norm_eps", 1e-6),
                     max_seq_len=cfg.get("max_position_embeddings", 2048))
    need(args.hidden_dim == inter, f"intermediate_size {inter} != model.py's {args.hidden_dim}")
    args.validate()
    return args


def _read_tensors(path: str) -> dict:
    """All tensors of model.safetensors or of the shards a model.safetensors.index.json lists."""
    from safetensors.torch import load_file

    single, index = os.path.join(path, "model.safetensors"), os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(single):
        return load_file(single)
    if os.path.isfile(index):
        tensors = {}
        for shard in sorted(set(_read_json(index)["weight_map"].values())):
            tensors.update(load_file(os.path.join(path, shard)))
        return tensors
    raise DataError(f"{path}: no model.safetensors (or model.safetensors.index.json); "
                        f"save the model with safe_serialization")


def read_hf(path: str) -> tuple:
    """A Hugging Face Llama folder -> (ModelArgs, state dict for model.Transformer, config.json dict)."""
    cfg = _read_json(os.path.join(path, "config.json"))
    try:
        args = args_from_config(cfg, os.path.join(path, "config.json"))
    except (KeyError, ValueError) as e:
        raise DataError(f"{path}/config.json: {e}") from None
    t = {k: v.float() for k, v in _read_tensors(path).items()}

    def get(name: str, shape: tuple) -> torch.Tensor:
        if name not in t:
            raise DataError(f"{path}: tensor {name} missing")
        if tuple(t[name].shape) != shape:
            raise DataError(f"{path}: tensor {name} has shape {tuple(t[name].shape)}, config.json says {shape}")
        return t[name]

    hd, kv, hidden = args.dim // args.n_heads, args.kv_heads, args.hidden_dim
    shapes = {"attention.wq.weight": (args.dim, args.dim), "attention.wk.weight": (kv * hd, args.dim),
              "attention.wv.weight": (kv * hd, args.dim), "attention.wo.weight": (args.dim, args.dim),
              "feed_forward.w1.weight": (hidden, args.dim), "feed_forward.w3.weight": (hidden, args.dim),
              "feed_forward.w2.weight": (args.dim, hidden), "attention_norm.weight": (args.dim,),
              "ffn_norm.weight": (args.dim,)}
    emb = torch.zeros(args.padded_vocab_size, args.dim)  # padded rows stay zero, as model.py keeps them
    emb[: args.vocab_size] = get("model.embed_tokens.weight", (args.vocab_size, args.dim))
    if "lm_head.weight" in t and not torch.equal(t["lm_head.weight"], emb[: args.vocab_size]):
        raise DataError(f"{path}: lm_head.weight differs from embed_tokens; model.py ties them")
    state = {"tok_embeddings.weight": emb, "output.weight": emb, "norm.weight": get("model.norm.weight", (args.dim,))}
    for i in range(args.n_layers):
        for ours, theirs in LAYER_NAMES.items():
            w = get(f"model.layers.{i}.{theirs}", shapes[ours])
            if ours == "attention.wq.weight":
                w = half_to_interleaved(w, args.n_heads)
            elif ours == "attention.wk.weight":
                w = half_to_interleaved(w, kv)
            state[f"layers.{i}.{ours}"] = w.contiguous()
    return args, state, cfg


def load_init(spec: str) -> dict:
    """`hf:PATH` -> the fields of a checkpoint that pretrain.py / sft.py start from: model, model_args, kind, step,
    val_loss, tokenizer_sha256 (of the folder's tokenizer.model when it has one, so a mismatch is caught)."""
    if not spec.startswith("hf:"):
        raise DataError(f"--init_from={spec}: expected hf:PATH (a local Hugging Face Llama folder)")
    path = spec[3:]
    if not os.path.isdir(path):
        raise DataError(f"--init_from={spec}: {path} is not a folder")
    args, state, cfg = read_hf(path)
    project = cfg.get(PROJECT_KEY) or {}
    tok = os.path.join(path, "tokenizer.model")
    sha = tokenizer_sha256(tok) if os.path.isfile(tok) else project.get("tokenizer_sha256")
    val = project.get("val_loss")
    return {"model": state, "model_args": dataclasses.asdict(args), "kind": project.get("kind", "hf"),
            "step": project.get("step", 0), "val_loss": math.nan if val is None else val,
            "tokenizer_sha256": sha}
