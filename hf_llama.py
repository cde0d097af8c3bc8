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

import contextlib
import dataclasses
import json
import math
import os
from typing import Optional

import torch

from chatglm_tokenizer import recorded_tokenizer, tokenizer_sha256
from babyllama.checkpoint import tokenizer_record
from babyllama.errors import DataError, first_line  # a folder this project cannot load: one line naming the file and what was expected
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
           "model.norm.weight": src["norm.weight"], **convert_layers(src, a.n_layers, a.n_heads, a.kv_heads, True)}
    return {k: v.to(dtype).contiguous() for k, v in out.items()}


def convert_layers(tensors: dict, n_layers: int, n_heads: int, kv_heads: int, to_hf: bool) -> dict:
    """The per-layer tensors renamed ours -> Hugging Face's (to_hf) or back, with the rows of wq and wk permuted
    between our interleaved rotary pairs and Hugging Face's halves."""
    permute = interleaved_to_half if to_hf else half_to_interleaved
    out = {}
    for i in range(n_layers):
        for ours, theirs in LAYER_NAMES.items():
            src, dst = f"layers.{i}.{ours}", f"model.layers.{i}.{theirs}"
            w = tensors[src if to_hf else dst]
            if ours in ("attention.wq.weight", "attention.wk.weight"):
                w = permute(w, n_heads if ours == "attention.wq.weight" else kv_heads)
            out[dst if to_hf else src] = w
    return out


# config.json keys read as sizes (whole numbers, never true/false) -> the largest accepted: a folder naming a model far
# beyond what this project trains is refused before any weight is read. The first five are required.
INT_KEYS = {"hidden_size": 1 << 16, "num_attention_heads": 1 << 10, "num_hidden_layers": 1 << 10,
            "intermediate_size": 1 << 18, "vocab_size": 1 << 16, "num_key_value_heads": 1 << 10,
            "max_position_embeddings": 1 << 20, "head_dim": 1 << 12}
REQUIRED = ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size")
FLOAT_DTYPES = ("F32", "F16", "BF16")  # safetensors dtypes a weight may have (int or bool weights are refused)


def _read_json(path: str) -> dict:
    """A JSON object file of the folder, or a one-line DataError naming it and what was expected."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file; expected a Hugging Face Llama folder (config.json, "
                        f"model.safetensors)") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not JSON ({e.msg})") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text; expected a JSON object") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a JSON object, got a JSON {type(obj).__name__}")
    return obj


def check_types(cfg: dict, where: str) -> None:
    """Sizes are whole numbers within INT_KEYS' bounds (an optional one may be null), eps and theta positive numbers,
    flags true/false, nested settings objects: else a one-line DataError naming the key and what was expected."""
    def bad(key: str, expected: str) -> DataError:
        return DataError(f"{where}: {key} is {json.dumps(cfg.get(key))}; expected {expected}")

    for key, most in INT_KEYS.items():
        v = cfg.get(key)
        if v is None and key not in REQUIRED:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= most:
            raise bad(key, f"a whole number in 1..{most:,}")
    for key in ("rms_norm_eps", "rope_theta"):
        v = cfg.get(key)
        if key in cfg and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0):
            raise bad(key, "a positive number")
    for key in ("tie_word_embeddings", "attention_bias", "mlp_bias"):
        if key in cfg and not isinstance(cfg[key], bool):
            raise bad(key, "true or false")
    for key in ("rope_scaling", "rope_parameters", PROJECT_KEY):
        if cfg.get(key) is not None and not isinstance(cfg[key], dict):
            raise bad(key, "a JSON object or null")


def args_from_config(cfg: dict, where: str) -> ModelArgs:
    """ModelArgs for a Llama config.json, or a one-line DataError naming what model.py cannot express."""
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise DataError(f"{where}: {what}; model.py cannot load this Llama")

    need(cfg.get("model_type") == "llama", f"model_type {cfg.get('model_type')!r}, expected 'llama'")
    check_types(cfg, where)
    dim, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    need(dim % heads == 0, f"hidden_size {dim} is not a multiple of num_attention_heads {heads}")
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
    multiple_of, kv = project.get("multiple_of", inter), cfg.get("num_key_value_heads") or heads
    need(isinstance(multiple_of, int) and not isinstance(multiple_of, bool) and multiple_of > 0,
         f"{PROJECT_KEY}.multiple_of is {json.dumps(multiple_of)}, expected a whole number >= 1")
    args = ModelArgs(dim=dim, n_layers=cfg["num_hidden_layers"], n_heads=heads, n_kv_heads=None if kv == heads else kv,
                     vocab_size=cfg["vocab_size"],
                     multiple_of=multiple_of, norm_eps=cfg.get("rms_norm_eps", 1e-6),
                     max_seq_len=cfg.get("max_position_embeddings", 2048))
    need(args.hidden_dim == inter, f"intermediate_size {inter} != model.py's {args.hidden_dim}")
    args.validate()
    return args


def weight_files(path: str) -> list:
    """The safetensors files holding the folder's weights: model.safetensors, or the shards its
    model.safetensors.index.json lists, each a file inside the folder (no absolute path, no "..", no link out)."""
    single, index = os.path.join(path, "model.safetensors"), os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(single):
        return [single]
    if not os.path.isfile(index):
        raise DataError(f"{path}: no model.safetensors (or model.safetensors.index.json); "
                        f"save the model with safe_serialization")
    wmap = _read_json(index).get("weight_map")
    if not isinstance(wmap, dict) or not wmap or not all(isinstance(v, str) for v in wmap.values()):
        raise DataError(f"{index}: weight_map must be an object of tensor name -> file name")
    root, files = os.path.realpath(path), []
    for shard in sorted(set(wmap.values())):
        real = os.path.realpath(os.path.join(path, shard))
        if os.path.isabs(shard) or os.path.dirname(real) != root or not os.path.isfile(real):
            raise DataError(f"{index}: weight file {shard!r} is not a file inside {path}")
        files.append(real)
    return files


def _read_tensors(path: str, wanted: dict, optional: tuple = ()) -> dict:
    """The tensors named in `wanted` (name -> shape; those in `optional` may be absent) from the folder's weight
    files, each checked before it is read (present, that shape, a float dtype) and after (finite)."""
    from safetensors import SafetensorError, safe_open

    out = {}
    with contextlib.ExitStack() as stack:
        where = {}
        for f in weight_files(path):
            try:
                h = stack.enter_context(safe_open(f, framework="pt"))
            except (SafetensorError, OSError) as e:
                raise DataError(f"{f}: not a safetensors file ({first_line(e)})") from None
            for k in h.keys():
                where.setdefault(k, (f, h))
        for name, shape in wanted.items():
            if name not in where:
                if name in optional:
                    continue
                raise DataError(f"{path}: tensor {name} missing")
            f, h = where[name]
            sl = h.get_slice(name)
            if tuple(sl.get_shape()) != shape:
                raise DataError(f"{f}: tensor {name} has shape {tuple(sl.get_shape())}, config.json says {shape}")
            if sl.get_dtype() not in FLOAT_DTYPES:
                raise DataError(f"{f}: tensor {name} is {sl.get_dtype()}; expected weights of "
                                f"{', '.join(FLOAT_DTYPES)}")
            t = h.get_tensor(name).float()
            if not bool(torch.isfinite(t).all()):
                raise DataError(f"{f}: tensor {name} holds values that are not finite (NaN or inf)")
            out[name] = t
    return out


def read_hf(path: str) -> tuple:
    """A Hugging Face Llama folder -> (ModelArgs, state dict for model.Transformer, config.json dict). Checked before
    any weight is read: the config's types and sizes, where the weight files are, each tensor's name, shape and
    dtype; then that every weight is finite."""
    cfg = _read_json(os.path.join(path, "config.json"))
    try:
        args = args_from_config(cfg, os.path.join(path, "config.json"))
    except DataError:
        raise
    except (KeyError, ValueError, TypeError) as e:  # model.py's own checks (ConfigError)
        raise DataError(f"{path}/config.json: {first_line(e)}") from None
    hd, kv, hidden, dim = args.dim // args.n_heads, args.kv_heads, args.hidden_dim, args.dim
    shapes = {"attention.wq.weight": (dim, dim), "attention.wk.weight": (kv * hd, dim),
              "attention.wv.weight": (kv * hd, dim), "attention.wo.weight": (dim, dim),
              "feed_forward.w1.weight": (hidden, dim), "feed_forward.w3.weight": (hidden, dim),
              "feed_forward.w2.weight": (dim, hidden), "attention_norm.weight": (dim,),
              "ffn_norm.weight": (dim,)}
    wanted = {"model.embed_tokens.weight": (args.vocab_size, dim), "model.norm.weight": (dim,),
              "lm_head.weight": (args.vocab_size, dim)}
    for i in range(args.n_layers):
        wanted.update({f"model.layers.{i}.{theirs}": shapes[ours] for ours, theirs in LAYER_NAMES.items()})
    t = _read_tensors(path, wanted, optional=("lm_head.weight",))
    emb = torch.zeros(args.padded_vocab_size, dim)  # padded rows stay zero, as model.py keeps them
    emb[: args.vocab_size] = t["model.embed_tokens.weight"]
    if "lm_head.weight" in t and not torch.equal(t["lm_head.weight"], emb[: args.vocab_size]):
        raise DataError(f"{path}: lm_head.weight differs from embed_tokens; model.py ties them")
    state = {"tok_embeddings.weight": emb, "output.weight": emb, "norm.weight": t["model.norm.weight"]}
    state.update({k: w.contiguous() for k, w in convert_layers(t, args.n_layers, args.n_heads, kv, False).items()})
    return args, state, cfg


def folder_tokenizer(spec: str) -> str:
    """The tokenizer.model inside hf:FOLDER, or "" (another spec, or a folder without one): the tokenizer the scripts
    use with such a folder unless --tokenizer names another, as the folder's model was trained with it."""
    path = os.path.join(spec[3:], "tokenizer.model") if spec.startswith("hf:") else ""
    return path if path and os.path.isfile(path) else ""


def model_tokenizer(spec: str, saved: Optional[dict]) -> str:
    """The tokenizer.model a model was made with, where it is at hand, else "": hf:FOLDER's own, or the --tokenizer
    the checkpoint dict `saved` recorded if that file is still there with the recorded sha256. What sft.py (its
    --init_from), eval.py, chat.py and export.py (their --ckpt) use when given no --tokenizer."""
    return folder_tokenizer(spec) or (recorded_tokenizer(*tokenizer_record(saved)) if saved else "")


def load_init(spec: str, flag: str = "--init_from") -> dict:
    """`hf:PATH` -> the fields of a checkpoint that pretrain.py / sft.py start from: model, model_args, kind, step,
    val_loss, tokenizer_sha256 (of the folder's tokenizer.model when it has one, so a mismatch is caught).
    flag: the command-line flag that named spec, for the error lines (eval.py and chat.py pass --ckpt)."""
    if not spec.startswith("hf:"):
        raise DataError(f"{flag}={spec}: expected hf:PATH (a local Hugging Face Llama folder)")
    path = spec[3:]
    if not os.path.isdir(path):
        raise DataError(f"{flag}={spec}: {path} is not a folder")
    args, state, cfg = read_hf(path)
    project = cfg.get(PROJECT_KEY) or {}
    for key, types in (("kind", str), ("step", int), ("val_loss", (int, float)), ("tokenizer_sha256", str)):
        v = project.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, types)):
            raise DataError(f"{path}/config.json: {PROJECT_KEY}.{key} is {json.dumps(v)}; expected a "
                            f"{'text' if types is str else 'number'} or null")
    tok = os.path.join(path, "tokenizer.model")
    sha = tokenizer_sha256(tok) if os.path.isfile(tok) else project.get("tokenizer_sha256")
    val = project.get("val_loss")
    return {"model": state, "model_args": dataclasses.asdict(args), "kind": project.get("kind", "hf"),
            "step": project.get("step", 0), "val_loss": math.nan if val is None else val,
            "tokenizer_sha256": sha}
