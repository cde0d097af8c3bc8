"""Checks that need a CUDA GPU (skipped elsewhere): the Triton loss kernel and the GPU-only GEMM path of fused_ce,
the on-device step skip, CUDA-graph decoding against eager decoding, CUDA-graph training with accumulation.

Run on a GPU machine:  python -m pytest -q tests/test_gpu.py
"""
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import generate  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class RandomBatches:
    """(x, y) of 4 rows x 32 tokens from a 256-id vocabulary, a fixed function of (step, micro-step)."""

    def batch(self, step, micro):
        w = torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(100 * step + micro))
        return w[:, :-1], w[:, 1:]


def loss_and_grads(model, x, y, ce_chunk):
    model.zero_grad(set_to_none=True)
    model.ce_chunk = ce_chunk
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, loss = model(x, y)
    loss.backward()
    return loss.item(), {n: p.grad.float().clone() for n, p in model.named_parameters()}


def test_fused_loss_matches_plain_path_on_the_gpu():
    """Triton softmax-gradient kernel + in-GEMM fp32 accumulation vs F.cross_entropy of the full logits."""
    from babyllama import fused_ce
    assert fused_ce.triton is not None, "Triton is part of every CUDA build of torch"
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=256, n_layers=2, n_heads=4, max_seq_len=256)).cuda().train()  # real vocab
    x = torch.randint(0, 64793, (8, 256), device="cuda")
    y = torch.randint(0, 64793, (8, 256), device="cuda")
    y[:, :50] = -1
    plain, g0 = loss_and_grads(model, x, y, 0)
    fused, g1 = loss_and_grads(model, x, y, 512)  # 4 chunks
    assert abs(plain - fused) < 2e-3 * plain, (plain, fused)
    for name in g0:
        cos = F.cosine_similarity(g0[name].flatten(), g1[name].flatten(), dim=0).item()
        assert cos > 0.999, (name, cos)
        assert g1[name].norm().item() == pytest.approx(g0[name].norm().item(), rel=2e-2), name
    assert g1["tok_embeddings.weight"][64793:].abs().max() == 0


def test_compiled_decoding_equals_eager_on_the_gpu():
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=128, n_layers=2, n_heads=4, max_seq_len=128)).cuda().eval()
    model.cast_for_inference(torch.bfloat16)
    prompts = [[5, 6, 7, 8], [9, 10]]
    knobs = generate.Sampling(max_new_tokens=40, temperature=0.8, top_p=0.9, repetition_penalty=1.1, no_repeat_ngram=0)
    outs = []
    for compile in (False, True, True):  # the second compiled call replays the recorded graphs
        g = torch.Generator(device="cuda").manual_seed(1)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            outs.append(generate.generate(model, prompts, knobs, eos_id=-1, generator=g, compile=compile))
    assert outs[0] == outs[1] == outs[2]
    assert all(len(o) == 40 for o in outs[0])


def test_non_finite_step_is_skipped_on_the_device():
    from babyllama.runtime import Runtime
    from trainer import DeviceBatches, train_step
    model = Transformer(ModelArgs(dim=64, n_layers=1, n_heads=2, vocab_size=256, max_seq_len=32)).cuda()
    opt = model.configure_optimizer(0.1, 1e-2, (0.9, 0.95), "cuda")
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    rt = Runtime(torch.device("cuda"), 0, 0, 1, torch.bfloat16)

    batches = DeviceBatches(RandomBatches(), 0, 1, rt.device)
    train_step(model, opt, scaler, batches, 1, 1e-2, 1.0, rt)
    before = [p.detach().clone() for p in model.parameters()]
    real = model.forward
    model.forward = lambda x, y: (None, real(x, y)[1] * float("nan"))
    loss, _ = train_step(model, opt, scaler, batches, 1, 1e-2, 1.0, rt)
    assert not torch.isfinite(loss).item()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert all(int(opt.state[p]["step"]) == 1 for p in model.parameters())


def test_cuda_graph_training_with_accumulation_equals_eager():
    """torch.compile(mode="reduce-overhead") (the default under torchrun) with 2 micro-steps per optimizer step: the
    accumulated gradient norm and the loss match eager's. Freed gradients between steps let AccumulateGrad adopt a
    tensor from the CUDA graph's pool that the next micro-step overwrites (pytorch/pytorch#169545)."""
    from babyllama.runtime import Runtime
    from trainer import DeviceBatches, train_step

    rt = Runtime(torch.device("cuda"), 0, 0, 1, torch.float32)
    tf32, torch.backends.cuda.matmul.allow_tf32 = torch.backends.cuda.matmul.allow_tf32, False
    results = []
    try:
        for mode in (None, "reduce-overhead"):
            torch.manual_seed(0)
            model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=2, vocab_size=256, max_seq_len=32)).cuda()
            opt = model.configure_optimizer(0.1, 1e-2, (0.9, 0.95), "cuda")
            scaler = torch.amp.GradScaler("cuda", enabled=False)
            run = model if mode is None else torch.compile(model, mode=mode)
            batches = DeviceBatches(RandomBatches(), 0, 2, rt.device)
            steps = [train_step(run, opt, scaler, batches, 2, 1e-2, 1e9, rt) for _ in range(4)]  # no clipping: raw norm
            results.append([(loss.item(), norm.item()) for loss, norm in steps])
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    for (l0, n0), (l1, n1) in zip(*results):
        assert l1 == pytest.approx(l0, rel=1e-3) and n1 == pytest.approx(n0, rel=1e-2), results
