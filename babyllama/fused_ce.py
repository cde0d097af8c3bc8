"""The output layer and the cross-entropy loss in one pass, chunk by chunk, gradients included.

Library module, no command line; model.Transformer uses it when the trainer sets `model.ce_chunk` (default 4096).
  from fused_ce import linear_cross_entropy
  loss = linear_cross_entropy(h, weight, targets, vocab_size=64793, chunk=4096)   # h (N, dim), targets (N,), -1 ignored
Check against the plain path on CPU:  python -m pytest tests/test_model.py -k fused

Why: the (N, vocab) logits are the largest tensor of training (16384 x 64832 at the original project's batch: 2 GiB in bf16,
4 GiB once upcast for the loss), and the softmax around them is pure memory traffic. Here one (chunk, vocab) block
exists at a time; for it we compute the loss terms and dlogits = (softmax - onehot) / n_targets, which give at
once grad_h (chunk, dim) and a (vocab, dim) contribution to grad_weight. backward() only scales the stored
gradients, so the logits are never recomputed.

On CUDA with Triton, one kernel per block turns logits into dlogits in place (two reads and one write of the
block, the loss terms on the side); elsewhere the same arithmetic runs as torch ops. The matmuls are cuBLAS's.
The whole computation is one custom op, opaque to torch.compile: it needs no tracing and causes no graph break.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch fallback below does the same arithmetic
    triton = None


def _softmax_grad_torch(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int, scale: torch.Tensor):
    """logits (c, padded_vocab) -> (loss terms summed, fp32 0-d; dlogits (c, padded_vocab) in logits' dtype).

    dlogits = (softmax(logits[:, :vocab_size]) - onehot(target)) * scale for rows whose target is not -1, else 0;
    padded columns get probability 0 and gradient 0."""
    # In place on x (the logits themselves when they are fp32: a temporary of linear_ce_grads): on a CPU the block
    # is 1024 x 64832 floats at the demo's batch, and logsumexp plus exp(x - lse) would allocate and fill four more.
    x = logits.float()
    x[:, vocab_size:] = float("-inf")
    valid = targets != -1
    tgt = torch.where(valid, targets, 0)
    target_logit = x.gather(1, tgt[:, None])[:, 0]  # (c,), read before x is overwritten
    row_max = x.amax(dim=-1, keepdim=True)  # (c, 1)
    x.sub_(row_max).exp_()  # exp(x - max); padded columns become 0
    sum_exp = x.sum(dim=-1, keepdim=True)  # (c, 1)
    lse = row_max[:, 0] + torch.log(sum_exp[:, 0])
    total = ((lse - target_logit) * valid).sum()
    row_scale = (valid * scale)[:, None]  # (c, 1): 0 for ignored rows
    x.mul_(row_scale / sum_exp)  # softmax * scale
    x[torch.arange(len(tgt), device=tgt.device), tgt] -= row_scale[:, 0]
    return total, x.to(logits.dtype)


if triton is not None:
    @triton.jit
    def _softmax_grad_kernel(logits_ptr, stride, targets_ptr, scale_ptr, losses_ptr, vocab_size, n_cols,
                             BLOCK: tl.constexpr):
        """One program per row: an online logsumexp over the row, block by block (first read), then dlogits
        written over the logits (second read, one write). losses[row] = lse - logit[target], 0 for an ignored row.

        In base 2 (exp2 of x * log2 e) and one exponential per element and pass: the kernel is bound by the
        exponentials as much as by memory. The first pass asks the cache to keep the row for the second, which
        asks it to drop the row; a row is 127 KiB at 64,832 columns."""
        LOG2E: tl.constexpr = 1.4426950408889634
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride
        target = tl.load(targets_ptr + row)
        m = float("-inf")  # running max of x * log2 e over the blocks so far, and the sum of exp2(x * log2 e - m)
        s = 0.0
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(base + cols, mask=cols < vocab_size, other=float("-inf"),
                        eviction_policy="evict_last").to(tl.float32) * LOG2E
            # a block of padded columns only (max -inf) leaves m as it was; the first block holds column 0
            new_m = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp2(m - new_m) + tl.sum(tl.exp2(x - new_m), axis=0)
            m = new_m
        lse2 = m + tl.log2(s)  # the row's logsumexp in base 2
        valid = target != -1
        target_logit = tl.load(base + tl.where(valid, target, 0)).to(tl.float32)
        tl.store(losses_ptr + row, tl.where(valid, lse2 / LOG2E - target_logit, 0.0))
        row_scale = tl.where(valid, tl.load(scale_ptr), 0.0)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(base + cols, mask=cols < vocab_size, other=float("-inf"),
                        eviction_policy="evict_first").to(tl.float32)
            p = tl.exp2(x * LOG2E - lse2)  # softmax; padded columns: exp2(-inf) = 0
            p = tl.where(cols == target, p - 1.0, p) * row_scale
            tl.store(base + cols, p.to(logits_ptr.dtype.element_ty), mask=cols < n_cols)


def _softmax_grad(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int, scale: torch.Tensor):
    """_softmax_grad_torch's results; on CUDA with Triton computed in place by one kernel (logits are consumed)."""
    if triton is None or not logits.is_cuda:
        return _softmax_grad_torch(logits, targets, vocab_size, scale)
    losses = torch.empty(logits.size(0), device=logits.device, dtype=torch.float32)
    _softmax_grad_kernel[(logits.size(0),)](logits, logits.stride(0), targets, scale, losses, vocab_size,
                                            logits.size(1), BLOCK=8192, num_warps=16)
    return losses.sum(), logits


@torch.library.custom_op("babyllama::linear_ce_grads", mutates_args=())
def linear_ce_grads(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int, chunk: int,
                    dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """h (N, dim), weight (padded_vocab, dim), the matmuls in `dtype` (autocast's, or h's); targets (N,) long, -1
    ignored. -> (mean loss fp32 0-d, d loss / d h (N, dim) in `dtype`, d loss / d weight (padded_vocab, dim) fp32).
    Its autograd (below) scales the two stored gradients: backward recomputes nothing."""
    h, weight = h.to(dtype), weight.to(dtype)
    n_targets = (targets != -1).sum().clamp(min=1)
    scale = (1.0 / n_targets).float().reshape(1)  # stays on the device: no host sync
    grad_h = torch.empty_like(h)
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    for s in range(0, h.size(0), chunk):
        hc = h[s:s + chunk]
        logits = F.linear(hc, weight)  # (c, padded_vocab)
        loss_sum, dlogits = _softmax_grad(logits, targets[s:s + chunk], vocab_size, scale)
        total += loss_sum
        torch.mm(dlogits, weight, out=grad_h[s:s + chunk])  # (c, dim), written in place
        _accumulate(grad_w, dlogits.t(), hc)  # (padded_vocab, dim)
    return total / n_targets, grad_h, grad_w


@linear_ce_grads.register_fake
def _(h, weight, targets, vocab_size, chunk, dtype):
    return (h.new_empty((), dtype=torch.float32), h.new_empty(h.shape, dtype=dtype),
            weight.new_empty(weight.shape, dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1], output[2])  # d loss / d h, d loss / d weight
    ctx.dtypes = (inputs[0].dtype, inputs[1].dtype)


def _backward(ctx, grad_loss, _grad_h, _grad_w):
    """Gradients of the loss only (the op's other two outputs are never differentiated): the stored ones, scaled,
    each in its input's dtype (the fp32 weight gets an fp32 gradient, not a rounded one)."""
    grad_h, grad_w = ctx.saved_tensors
    return (grad_h * grad_loss).to(ctx.dtypes[0]), (grad_w * grad_loss).to(ctx.dtypes[1]), None, None, None, None


# autograd registered on the op itself, not a torch.autograd.Function: torch.compile's graph then holds the op and
# plain tensor ops, which its AOT-autograd cache can store (a Function's graph is never cached: a warm compile cache
# would still trace and partition the whole training step again, seconds on every run)
linear_ce_grads.register_autograd(_backward, setup_context=_setup_context)


def _accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b. On CUDA with bf16/fp16 inputs the GEMM adds into the fp32 buffer itself (out_dtype),
    saving a rounded temporary, its upcast and a separate add over the 133 MB gradient per chunk."""
    if a.is_cuda and a.dtype != torch.float32:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc += (a @ b).float()


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                         chunk: int) -> torch.Tensor:
    """Mean cross-entropy of h @ weight[:vocab_size].T against targets (-1 ignored), as F.cross_entropy of the
    full logits would give, without the (N, vocab) tensor. h (N, dim), weight (padded_vocab, dim), targets (N,).
    Under torch.no_grad (validation, eval.py's perplexity) only the loss is computed, with no gradient terms."""
    if not torch.is_grad_enabled():
        return _cross_entropy_chunked(h, weight, targets, vocab_size, chunk)
    dev = h.device.type  # under autocast the matmuls run in its dtype, as the plain path's would
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
    return linear_ce_grads(h, weight, targets, vocab_size, chunk, dtype)[0]


def _cross_entropy_chunked(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                           chunk: int) -> torch.Tensor:
    """The forward of linear_cross_entropy alone: one (chunk, vocab) block of logits at a time, fp32 loss."""
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    for s in range(0, h.size(0), chunk):
        logits = F.linear(h[s:s + chunk], weight)[:, :vocab_size].float()  # (c, vocab)
        total += F.cross_entropy(logits, targets[s:s + chunk], ignore_index=-1, reduction="sum")
    return total / (targets != -1).sum().clamp(min=1)
