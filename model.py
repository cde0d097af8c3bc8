"""The baby Llama2: RMSNorm, rotary embeddings, SwiGLU, optional grouped-query attention, tied embeddings.

Library module, no command line. Typical use:
  from model import ModelArgs, Transformer, load_model
  model = Transformer(ModelArgs())                        # 58.48M unique parameters at the defaults
  logits, loss = model(x, y)                              # x, y: (B, T) int64, y == -1 is ignored
  model, ckpt = load_model("out/pretrain", device="cuda")   # best.pt, else last.pt
  model.generate([[5, 6, 7], [8, 9]], max_new_tokens=32, temperature=0.7, top_p=0.9)
  model.generate(prompts, 256, temperature=1.0, compile=True)   # GPU: each decode step replays one CUDA graph
generate() and stream() delegate to generate.py (KV cache, sampling, the two decoders, compile_decode).
Quick check on CPU:  python -c "import model; m = model.Transformer(model.ModelArgs()); print(m.num_params())"
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

import fused_ce  # the output layer + loss without the (N, vocab) logits
import generate  # KV cache, sampling and the decoders; it imports nothing from here at run time
from configurator import check


@dataclass
class ModelArgs:
    dim: int = 512  # width of the residual stream
    n_layers: int = 8  # transformer blocks
    n_heads: int = 8  # query heads; head_dim = dim // n_heads
    n_kv_heads: Optional[int] = None  # key/value heads for grouped-query attention; None = n_heads
    vocab_size: int = 64793  # real token ids 0..vocab_size-1 (ChatGLM2 tokenizer)
    multiple_of: int = 32  # SwiGLU hidden width is rounded up to a multiple of this
    norm_eps: float = 1e-5  # RMSNorm epsilon
    max_seq_len: int = 512  # longest context; sizes the rotary tables and the generation window
    dropout: float = 0.0  # on embeddings, attention probabilities and residual branches (training only)
    pad_vocab_multiple: int = 64  # embedding rows padded up to a multiple of this for fast matmuls (1 = none)

    def validate(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of", "max_seq_len", "pad_vocab_multiple"):
            check(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        check(self.dim % self.n_heads == 0, f"dim {self.dim} must be divisible by n_heads {self.n_heads}")
        head_dim = self.dim // self.n_heads
        check(head_dim % 2 == 0, f"head_dim {head_dim} (dim / n_heads) must be even: rotary embeddings rotate pairs")
        kv = self.kv_heads
        check(kv > 0 and self.n_heads % kv == 0, f"n_heads {self.n_heads} must be divisible by n_kv_heads {kv}")
        check(self.norm_eps > 0, f"norm_eps must be positive, got {self.norm_eps}")
        check(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def hidden_dim(self) -> int:
        # SwiGLU has three matrices instead of two, so 2/3 of 4*dim keeps the FFN's parameters those of a 4x MLP
        hidden = int(2 * 4 * self.dim / 3)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_multiple
        return m * ((self.vocab_size + m - 1) // m)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the mean of squares overflows/loses precision in bf16/fp16, so normalise in fp32 and cast back
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).type_as(x)


def rope_tables(head_dim: int, max_seq_len: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * frequency, each (max_seq_len, head_dim // 2), fp32."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = torch.outer(torch.arange(max_seq_len).float(), freqs)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates the pairs (x[2i], x[2i+1]) of x (B, T, H, head_dim) by cos/sin (B or 1, T, 1, head_dim // 2).

    Interleaved pairs as in Meta's Llama; an export to HF Llama must permute wq/wk rows as HF's converter does.
    Done in fp32 because bf16 angles lose the position information at long range.
    """
    xr, xi = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # each (B, T, H, head_dim // 2)
    out = torch.stack((xr * cos - xi * sin, xr * sin + xi * cos), dim=-1)
    return out.flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.n_kv_heads = args.n_heads, args.kv_heads
        self.head_dim = args.dim // args.n_heads
        self.wq = nn.Linear(args.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, args.dim, bias=False)
        self.dropout = args.dropout
        self.resid_dropout = nn.Dropout(args.dropout)

    def forward(self, x, cos, sin, mask=None, cache=None, start=0):
        """x (B, T, dim). mask None = plain causal (training); else bool (B, 1, T, S), True = may attend.

        start: int = first cache slot of x (the slots up to start + T are attended); a 0-d long tensor = the slot
        of a single decode token, and the whole cache buffer is attended (fixed shapes, see generate.decode_step).
        cache: None, or anything with update/write like generate.KVCache.
        """
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, head_dim)
        if isinstance(start, torch.Tensor):  # static-shape decode step (T = 1): all max_len slots, mask picks
            k, v = cache.write(self.layer_id, k, v, start.view(1))  # (B, n_kv, max_len, head_dim)
        elif cache is not None:
            k, v = cache.update(self.layer_id, k, v, start)  # (B, n_kv, S, head_dim), S = start + T
        if self.n_kv_heads != self.n_heads:
            # each group of n_heads // n_kv_heads query heads reads the same key/value head
            k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        p = self.dropout if self.training else 0.0
        if isinstance(start, torch.Tensor):
            # one query against the whole cache: two small matmuls and a softmax, which torch.compile fuses, beat
            # an attention kernel tiled for long queries (SDPA would pick one that is mostly idle here)
            att = (q @ k.transpose(-2, -1)).float() * self.head_dim ** -0.5  # (B, heads, 1, max_len)
            att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
            y = att.to(v.dtype) @ v  # (B, heads, 1, head_dim)
        elif mask is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.resid_dropout(self.wo(y))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)  # gate
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)  # up
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)  # down, back into the residual stream
        self.dropout = nn.Dropout(args.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args, layer_id)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args)

    def forward(self, x, cos, sin, mask=None, cache=None, start=0):
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, cache, start)
        return h + self.feed_forward(self.ffn_norm(h))


def segment_mask(seg: torch.Tensor) -> torch.Tensor:
    """seg (B, T) int segment ids -> bool attention mask (B, 1, T, T), True = may attend.

    Position t attends to s <= t in the same segment only, so packed samples never see each other. The mask
    is causal already (SDPA runs with is_causal=False). Every row keeps its diagonal, so no softmax row is
    empty (no NaN), padding (segment 0) included.
    """
    T = seg.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=seg.device).tril()
    return ((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        args.validate()
        self.args = args
        V = args.padded_vocab_size
        self.tok_embeddings = nn.Embedding(V, args.dim)
        self.dropout = nn.Dropout(args.dropout)
        self.layers = nn.ModuleList(TransformerBlock(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, V, bias=False)
        self.ce_chunk = 0  # rows per chunk of the fused output+loss (0 = plain cross-entropy); see forward
        self.output.weight = self.tok_embeddings.weight  # tied: one (padded_vocab, dim) matrix reads and writes tokens
        cos, sin = rope_tables(args.dim // args.n_heads, args.max_seq_len)
        # non-persistent: derived from args, so checkpoints stay small and never disagree with the code
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        for name, p in self.named_parameters():  # the tied matrix comes once, as tok_embeddings.weight
            std = 0.02
            if name.endswith(("wo.weight", "w2.weight")):
                # each adds into the residual stream, which sums 2*n_layers of them: keep its variance O(1) (GPT-2)
                std = 0.02 / math.sqrt(2 * args.n_layers)
            elif name == "tok_embeddings.weight":
                # logits = unit-RMS hidden @ these rows have std = std * sqrt(dim): 0.02 gives 0.45 at dim 512, an init
                # loss of ln(V) + 0.45**2 / 2 = ln(V) + 0.10; capping the logit std at 0.25 keeps the start near-uniform
                std = min(0.02, 0.25 / math.sqrt(args.dim))
            if p.dim() == 2:
                nn.init.normal_(p, mean=0.0, std=std)
        with torch.no_grad():
            # padded rows are never read (ids < vocab_size) and their logits are sliced off; zero keeps them inert
            self.tok_embeddings.weight[args.vocab_size:].zero_()

    def cast_for_inference(self, dtype: torch.dtype) -> "Transformer":
        """Stores the weights in `dtype` (bf16) for generation under autocast of the same dtype: the matmuls see the
        weights autocast would make, but no decode step re-casts all of them (about 0.1 ms a token on an H100).
        The residual stream and the rotary tables stay fp32. Not for training (no fp32 master weights)."""
        cos, sin = self.rope_cos, self.rope_sin
        self.to(dtype)
        self.rope_cos, self.rope_sin = cos, sin
        return self

    def num_params(self, unique: bool = True) -> int:
        """Parameters over the real vocabulary (padded embedding rows are not counted).

        unique=True counts the tied embedding/output matrix once; False counts it twice (the seed's "92M").
        """
        n = sum(p.numel() for p in self.parameters())  # parameters() yields the tied matrix once
        n -= (self.args.padded_vocab_size - self.args.vocab_size) * self.args.dim
        return n if unique else n + self.args.vocab_size * self.args.dim

    def _hidden(self, idx, pos=None, mask=None, cache=None, start=0) -> torch.Tensor:
        """idx (B, T) -> final-normed hidden states (B, T, dim). pos (B, T) rotary positions, default 0..T-1."""
        T = idx.size(1)
        if pos is None:
            if T > self.args.max_seq_len:
                raise ValueError(f"sequence length {T} exceeds max_seq_len {self.args.max_seq_len}")
            cos, sin = self.rope_cos[None, :T, None, :], self.rope_sin[None, :T, None, :]  # (1, T, 1, head_dim/2)
        else:
            cos, sin = self.rope_cos[pos][:, :, None, :], self.rope_sin[pos][:, :, None, :]  # (B, T, 1, head_dim/2)
        h = self.dropout(self.tok_embeddings(idx)).float()  # fp32 residual stream, also under cast_for_inference
        for layer in self.layers:
            h = layer(h, cos, sin, mask, cache, start)
        return self.norm(h)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        # (..., padded_vocab) -> (..., vocab_size): a view, so padded ids get no probability and no gradient
        return self.output(h)[..., : self.args.vocab_size]

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None, seg: Optional[torch.Tensor] = None):
        """idx (B, T) int64 -> (logits, loss).

        With targets (B, T) (-1 = ignore): logits (B, T, vocab_size), loss = mean CE over targets != -1.
        Without: logits (B, 1, vocab_size) for the last position only (sampling needs no more), loss None.
        seg (B, T) segment ids of packed SFT rows: attention stays inside each segment (segment_mask).
        With `self.ce_chunk` > 0 (set by the trainer) training never materialises the (B, T, vocab) logits:
        the loss comes from fused_ce.linear_cross_entropy and the returned logits are None.
        """
        h = self._hidden(idx, mask=None if seg is None else segment_mask(seg))
        if targets is None:
            return self._logits(h[:, -1:, :]), None
        if self.ce_chunk and self.training:
            loss = fused_ce.linear_cross_entropy(h.reshape(-1, h.size(-1)), self.output.weight, targets.reshape(-1),
                                                 self.args.vocab_size, self.ce_chunk)
            return None, loss
        logits = self._logits(h)
        # view, not reshape: (B, T) merge without a copy even though the vocab slice is strided
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def flops_per_token(self, seq_len: Optional[int] = None) -> int:
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N matmul + 12*L*H*Q*T attention."""
        a = self.args
        T = a.max_seq_len if seq_len is None else seq_len
        return 6 * self.num_params() + 12 * a.n_layers * a.n_heads * (a.dim // a.n_heads) * T

    def estimate_mfu(self, tokens_per_sec: float, peak_flops: float, seq_len: Optional[int] = None) -> float:
        """Model FLOPs utilisation: achieved training FLOP/s over the card's peak (e.g. measured bf16 matmul)."""
        return self.flops_per_token(seq_len) * tokens_per_sec / peak_flops

    def configure_optimizer(self, weight_decay: float, lr: float, betas: tuple[float, float], device_type: str):
        """AdamW decaying only matrices (embedding, projections); norms' gains are not pulled to zero."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        # fused: one kernel for all parameters, and it can skip a step on the device (trainer.train_step's found_inf)
        extra = {"fused": True} if device_type in ("cuda", "cpu") else {}
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), **extra)

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None, repetition_penalty: float = 1.0,
                 eos_id: Optional[int] = 2, use_cache: bool = True,
                 generator: Optional[torch.Generator] = None, compile: bool = False,
                 no_repeat_ngram: int = 0) -> list[list[int]]:
        """New tokens for each prompt (eos excluded; a row stops at eos). See generate.decode for the knobs.

        compile=True runs each decode step through torch.compile (CUDA graphs on a GPU, see generate.compile_decode);
        the tokens are the same as without it. The GPU is asked for tokens only every 16 steps.
        """
        out: list[list[int]] = [[] for _ in prompts]
        for step in generate.steps(self, prompts, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                                   eos_id, use_cache, generator, compile, sync_every=16,
                                   no_repeat_ngram=no_repeat_ngram):
            for row, tok in enumerate(step):
                if tok is not None:
                    out[row].append(tok)
        return out

    def stream(self, prompt: list[int], max_new_tokens: int, temperature: float = 0.0,
               top_k: Optional[int] = None, top_p: Optional[float] = None, repetition_penalty: float = 1.0,
               eos_id: Optional[int] = 2, use_cache: bool = True,
               generator: Optional[torch.Generator] = None, compile: bool = False,
               no_repeat_ngram: int = 0) -> Iterator[int]:
        """generate() for one prompt, yielding each new token id as soon as it is chosen (for chat)."""
        for step in generate.steps(self, [prompt], max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                                   eos_id, use_cache, generator, compile, sync_every=1,
                                   no_repeat_ngram=no_repeat_ngram):
            if step[0] is not None:
                yield step[0]


def load_model(path: str, device: str = "cpu") -> tuple[Transformer, dict]:
    """Rebuilds a Transformer from a checkpoint file or run dir (best.pt, else last.pt); returns (model in eval, ckpt).

    Accepts state dicts saved from torch.compile ("_orig_mod.") or DDP ("module.") wrappers. The checkpoint is read
    to CPU first so optimizer state in ckpt does not take GPU memory; only the model moves to `device`.
    """
    if os.path.isdir(path):
        found = [os.path.join(path, f) for f in ("best.pt", "last.pt") if os.path.isfile(os.path.join(path, f))]
        if not found:
            raise FileNotFoundError(f"{path}: no best.pt or last.pt in this run directory")
        path = found[0]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    # weights_only=False: our checkpoints also hold numpy/python RNG states; only load files you trust
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise ValueError(f"{path}: not a checkpoint of this project (expected keys 'model' and 'model_args')")
    try:
        model = Transformer(ModelArgs(**ckpt["model_args"]))
    except (TypeError, ValueError) as e:  # unknown field, or a ConfigError from validate()
        raise ValueError(f"{path}: bad model_args: {e}") from None
    state = {}
    for key, value in ckpt["model"].items():
        while key.startswith(("_orig_mod.", "module.")):
            key = key.split(".", 1)[1]
        state[key] = value
    model.load_state_dict(state)
    return model.to(device).eval(), ckpt
