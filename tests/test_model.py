"""Tests for model.py: init loss, padded vocabulary, loss masking, KV-cache generation, GQA, loading.

Run: python -m pytest -q tests/test_model.py   (CPU, about 15 s; no tokenizer or data needed)
"""
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from babyllama.errors import ConfigError
import generate
from model import ModelArgs, Transformer, apply_rope, load_model, rope_tables
from babyllama.checkpoint import save_checkpoint
from conftest import PROMPTS, ROOT, lively_model, repeats_an_ngram, sampling, tiny_args, tiny_model

torch.set_num_threads(1)


def test_default_param_count():
    model = Transformer(ModelArgs())
    n = model.num_params()
    print(f"default ModelArgs: {n:,} unique parameters, {model.num_params(unique=False):,} counting the tie twice")
    a = ModelArgs()
    assert a.hidden_dim == 1376 and a.padded_vocab_size == 64832
    per_layer = 4 * 512 * 512 + 3 * 512 * 1376 + 2 * 512
    assert n == 64793 * 512 + 8 * per_layer + 512 == 58_479_616
    assert 58.0e6 <= n <= 59.0e6
    assert model.num_params(unique=False) == n + 64793 * 512
    assert model.output.weight is model.tok_embeddings.weight
    assert model.tok_embeddings.weight.shape == (64832, 512)


def test_default_init_loss_near_uniform():
    torch.manual_seed(0)
    model = Transformer(ModelArgs()).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 64793, (4, 65), generator=g)
    with torch.no_grad():
        logits, loss = model(x[:, :-1], x[:, 1:])
    assert logits.shape == (4, 64, 64793)
    print(f"init loss {loss.item():.4f}, ln(64793) = {math.log(64793):.4f}")
    assert abs(loss.item() - math.log(64793)) < 0.1  # the bar
    # the capped embedding std predicts +0.03; std 0.02 would give +0.10 and sit on the bar
    assert abs(loss.item() - math.log(64793)) < 0.06


def test_padded_rows_never_scored_or_sampled():
    model = tiny_model()
    assert model.args.padded_vocab_size == 1024
    assert model.tok_embeddings.weight[1000:].abs().sum() == 0  # zero at init, so a checkpoint's pad rows are tidy
    x = torch.randint(0, 1000, (2, 16))
    y = torch.randint(0, 1000, (2, 16))
    logits, loss = model(x, y)
    assert logits.shape == (2, 16, 1000)
    loss.backward()
    assert model.tok_embeddings.weight.grad[1000:].abs().sum() == 0
    before = generate.generate(model, [[3, 4, 5]], sampling(8), eos_id=None)
    with torch.no_grad():  # padded rows so large that they would win every argmax and dominate the softmax
        model.tok_embeddings.weight[1000:] = 50.0 * torch.randn(24, 64)
        logits2, loss2 = model(x, y)
    assert torch.equal(logits, logits2) and loss.item() == loss2.item()
    assert generate.generate(model, [[3, 4, 5]], sampling(8), eos_id=None) == before
    g = torch.Generator().manual_seed(0)
    sampled = generate.generate(model, [[3, 4, 5]] * 4, sampling(16, temperature=5.0), eos_id=None, generator=g)
    assert max(max(row) for row in sampled) < 1000


def test_ignored_targets():
    model = tiny_model()
    x = torch.randint(0, 1000, (3, 20))
    y = torch.randint(0, 1000, (3, 20))
    y[0, :5] = -1
    y[2, 7:] = -1
    logits, loss = model(x, y)
    keep = y != -1
    manual = -F.log_softmax(logits.float(), dim=-1)[keep].gather(-1, y[keep][:, None]).mean()
    assert torch.allclose(loss, manual, atol=1e-6)
    assert not torch.allclose(loss, F.cross_entropy(logits.reshape(-1, 1000), x.reshape(-1)))
    y2 = y.clone()
    y2[~keep] = 0
    assert not torch.allclose(loss, model(x, y2)[1])  # the -1 positions really were left out


def test_no_targets_gives_last_position():
    model = tiny_model()
    x = torch.randint(0, 1000, (2, 10))
    full, _ = model(x, torch.zeros_like(x))
    last, loss = model(x)
    assert loss is None and last.shape == (2, 1, 1000)
    assert torch.allclose(last[:, 0], full[:, -1], atol=1e-5)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_causal():
    model = lively_model()
    x = torch.randint(0, 1000, (1, 12))
    x2 = x.clone()
    x2[0, 6] = (x[0, 6] + 1) % 1000
    a, b = model(x, x)[0], model(x2, x2)[0]
    assert torch.allclose(a[:, :6], b[:, :6], atol=1e-5)  # the past cannot see the future
    assert not torch.allclose(a[:, 6:], b[:, 6:], atol=1e-3)


def test_rope_is_a_relative_rotation():
    cos, sin = rope_tables(16, 32)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def at(x, pos):  # x (1, 1, 1, 16) rotated to position pos
        return apply_rope(x, cos[pos][None, None, None], sin[pos][None, None, None])

    assert torch.allclose(at(q, 9).norm(), q.norm(), atol=1e-5)
    score = (at(q, 7) * at(k, 3)).sum()
    assert torch.allclose(score, (at(q, 20) * at(k, 16)).sum(), atol=1e-4)  # same distance, same score
    assert not torch.allclose(score, (at(q, 7) * at(k, 4)).sum(), atol=1e-3)


def test_rmsnorm_without_autograd_matches_the_training_expression():
    """Decoding (no autograd) normalises with torch's rms_norm (one kernel on a GPU), training with the expression
    inductor fuses: the same numbers, in the dtype asked for."""
    from model import RMSNorm
    norm = RMSNorm(48, 1e-5)
    torch.nn.init.uniform_(norm.weight, 0.5, 1.5)
    x = torch.randn(3, 5, 48) * 4
    slow = norm(x)  # autograd on: the training path
    with torch.no_grad():
        fast = norm(x)
        norm.out_dtype = torch.bfloat16
        fast_bf16 = norm(x)
    assert fast.dtype == torch.float32 and fast_bf16.dtype == torch.bfloat16 and slow.requires_grad
    assert torch.allclose(fast, slow.detach(), atol=1e-5)
    assert (fast_bf16.float() - slow.detach()).abs().max() <= 2 ** -7 * slow.detach().abs().max()  # bf16 rounding


def test_rope_rotates_meta_llamas_interleaved_pairs_as_the_complex_product():
    """apply_rope's tables hold cos and (-sin, +sin) per column; the export to HF Llama relies on Meta's layout: pair
    (x[2i], x[2i+1]) is the complex number x[2i] + i x[2i+1], times exp(i * position * theta ** (-2i / head_dim))."""
    cos, sin = rope_tables(16, 32)
    x = torch.randn(2, 5, 3, 16)
    pos = torch.tensor([[0, 1, 2, 3, 31], [4, 9, 16, 25, 30]])
    angles = pos[..., None].float() * (1.0 / 10000.0 ** (torch.arange(0, 16, 2).float() / 16))  # (2, 5, 8)
    rot = torch.polar(torch.ones_like(angles), angles)[:, :, None, :]  # (2, 5, 1, 8)
    want = torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (-1, 2))) * rot).flatten(-2)
    assert torch.allclose(apply_rope(x, cos[pos][:, :, None], sin[pos][:, :, None]), want, atol=1e-5)


def test_kv_cache_equals_no_cache_and_single_prompts():
    model = lively_model()
    cached = generate.generate(model, PROMPTS, sampling(12), eos_id=None)
    assert cached == generate.generate(model, PROMPTS, sampling(12), eos_id=None, use_cache=False)
    alone = [generate.generate(model, [p], sampling(12), eos_id=None)[0] for p in PROMPTS]
    assert cached == alone
    assert [len(r) for r in cached] == [12, 12, 12]
    # the reference everything must match: greedy argmax over the full forward, one token at a time
    for prompt, got in zip(PROMPTS, cached):
        seq = list(prompt)
        for _ in range(12):
            seq.append(model(torch.tensor([seq]))[0][0, -1].argmax().item())
        assert seq[len(prompt):] == got


def test_kv_cache_equals_no_cache_when_sampling():
    model = lively_model(seed=1)
    knobs = sampling(12, temperature=0.9, top_k=50, top_p=0.9, repetition_penalty=1.3)
    a = generate.generate(model, PROMPTS, knobs, eos_id=None, generator=torch.Generator().manual_seed(3))
    b = generate.generate(model, PROMPTS, knobs, eos_id=None, use_cache=False,
                          generator=torch.Generator().manual_seed(3))
    assert a == b
    assert a != generate.generate(model, PROMPTS, sampling(12), eos_id=None)  # sampling really sampled


def test_context_window_crop():
    model = lively_model(max_seq_len=16)
    prompts = [list(range(10, 30)), [5, 6, 7]]  # the first prompt alone is longer than max_seq_len
    a = generate.generate(model, prompts, sampling(30), eos_id=None)
    assert a == generate.generate(model, prompts, sampling(30), eos_id=None, use_cache=False)
    assert [len(r) for r in a] == [30, 30]


def test_gqa_equals_mha_with_shared_heads():
    gqa = lively_model(n_kv_heads=2)
    assert gqa.layers[0].attention.wk.weight.shape == (2 * 16, 64)
    mha = tiny_model(n_kv_heads=None)
    state = gqa.state_dict()
    for name in list(state):
        if name.endswith("wk.weight") or name.endswith("wv.weight"):
            # kv head j serves query heads 2j and 2j+1: duplicate its 16 rows in that order
            state[name] = state[name].view(2, 16, 64).repeat_interleave(2, dim=0).reshape(64, 64)
    mha.load_state_dict(state)
    x = torch.randint(0, 1000, (2, 12))
    assert torch.allclose(gqa(x, x)[0], mha(x, x)[0], atol=1e-5)
    out = generate.generate(gqa, PROMPTS, sampling(8), eos_id=None)
    assert out == generate.generate(gqa, PROMPTS, sampling(8), eos_id=None, use_cache=False)
    assert out == generate.generate(mha, PROMPTS, sampling(8), eos_id=None)


@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_fused_projections_give_the_same_loss_and_gradients(n_kv_heads):
    results = []
    for fused in (False, True):
        m = lively_model(n_kv_heads=n_kv_heads).train().fuse_projections(fused)
        x = torch.randint(0, 1000, (2, 12))
        loss = m(x, x)[1]
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    (loss0, g0), (loss1, g1) = results
    assert abs(loss0.item() - loss1.item()) < 1e-5
    for name in g0:  # the three weights (and gate/up) keep their own gradients: checkpoints are unchanged
        assert torch.allclose(g0[name], g1[name], atol=1e-6, rtol=1e-4), name
    assert all(layer.attention.fused and layer.feed_forward.fused for layer in m.layers)


def test_stops_at_eos_per_row():
    model = lively_model()
    free = generate.generate(model, PROMPTS, sampling(12), eos_id=None)
    eos = next(t for t in free[1] if free[1].index(t) >= 2)  # a token row 1 first produces after a few steps
    stopped = generate.generate(model, PROMPTS, sampling(12), eos_id=eos)
    for row, full in zip(stopped, free):
        assert row == (full[: full.index(eos)] if eos in full else full)
    assert 2 <= len(stopped[1]) < 12 and max(len(r) for r in stopped) > len(stopped[1])  # other rows went on
    assert list(generate.stream(model, PROMPTS[1], sampling(12), eos_id=eos)) == stopped[1]


def test_top_k1_and_tiny_top_p_equal_greedy():
    model = lively_model()
    greedy = generate.generate(model, PROMPTS, sampling(10), eos_id=None)
    g = torch.Generator().manual_seed(0)
    assert generate.generate(model, PROMPTS, sampling(10, temperature=1.0, top_k=1), eos_id=None, generator=g) == greedy
    assert generate.generate(model, PROMPTS, sampling(10, temperature=1.0, top_p=1e-6), eos_id=None, generator=g) == greedy


def test_sampling_rules():
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0]])
    seen = torch.tensor([[True, True, False, False]])
    # penalty 2: 2.0 -> 1.0 stays best; penalty 5: 2.0 -> 0.4 loses to 0.5
    assert generate.sample(logits, 0.0, None, None, 2.0, seen, None).item() == 0
    assert generate.sample(logits, 0.0, None, None, 5.0, seen, None).item() == 2
    # a seen negative logit is multiplied, not divided: -2 * 4 = -8 loses to -1 (-2 / 4 = -0.5 would win)
    negative = torch.tensor([[-1.0, -2.0]])
    assert generate.sample(negative, 0.0, None, None, 4.0, torch.tensor([[False, True]]), None).item() == 0
    probs = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {generate.sample(probs, 1.0, None, 0.6, 1.0, None, g).item() for _ in range(200)}
    assert draws == {0, 1}  # 0.5 < 0.6 so the second token is needed, the third is not
    draws = {generate.sample(probs, 1.0, 3, None, 1.0, None, g).item() for _ in range(300)}
    assert draws == {0, 1, 2}


def general_steps(model, prompts, new, eos_id, generator=None, **knobs):
    """Per-step lists of the general decoder (growing cache, crops), the reference for the static one."""
    return list(generate.decode(model, prompts, sampling(new, **knobs), eos_id=eos_id, use_cache=True,
                                generator=generator))


def static_steps(model, prompts, new, eos_id, sync_every, compile=False, generator=None, **knobs):
    return list(generate.decode_static(model, prompts, sampling(new, **knobs), eos_id=eos_id, generator=generator,
                                       compile=compile, sync_every=sync_every))


def test_static_decoder_equals_general_decoder_step_for_step():
    model = lively_model()
    free = general_steps(model, PROMPTS, 14, None)
    eos = free[3][1]  # row 1's 4th token: rows stop at different steps
    stopped = general_steps(model, PROMPTS, 14, eos)
    assert any(t is None for t in stopped[-1]) and len(stopped) > 4
    for sync_every in (1, 5, 16):  # eos found inside a block, at its edge, or only at the end
        assert static_steps(model, PROMPTS, 14, None, sync_every) == free
        assert static_steps(model, PROMPTS, 14, eos, sync_every) == stopped
    # a batch whose rows all stop (at steps 0 and 3): the static decoder stops too, mid-block or at a block's end
    both = [PROMPTS[1], PROMPTS[1] + [t[1] for t in free[:3]]]  # row 1 = row 0 three tokens ahead
    everyone = general_steps(model, both, 14, free[3][1])
    assert len(everyone) == 4 and everyone[0][1] is None and everyone[3][0] is None
    assert static_steps(model, both, 14, free[3][1], 5) == static_steps(model, both, 14, free[3][1], 4) == everyone
    knobs = dict(temperature=0.9, top_k=50, top_p=0.9, repetition_penalty=1.3)
    a = general_steps(model, PROMPTS, 10, None, generator=torch.Generator().manual_seed(5), **knobs)
    assert a == static_steps(model, PROMPTS, 10, None, 4, generator=torch.Generator().manual_seed(5), **knobs)
    assert static_steps(model, PROMPTS, 0, None, 16) == []


def test_static_path_only_where_the_context_fits(monkeypatch):
    model = lively_model(max_seq_len=16)
    prompts = [list(range(10, 22)), [5, 6, 7]]  # S = 12: 5 new tokens fit exactly (12 + 5 - 1 = 16), 6 need a crop
    for new in (5, 6):
        knobs = sampling(new)
        assert generate.generate(model, prompts, knobs, eos_id=None) == \
            generate.generate(model, prompts, knobs, eos_id=None, use_cache=False)
    # 6 new tokens must not take the static path (it would fail to run)
    monkeypatch.setattr(generate, "decode_static", None)
    generate.generate(model, prompts, sampling(6), eos_id=None)


def test_compiled_decode_step_compiles_once_and_matches_eager():
    from torch._dynamo.utils import counters

    model = lively_model()
    eager = generate.generate(model, PROMPTS, sampling(12), eos_id=None)
    torch._dynamo.reset()
    counters.clear()
    generate.compile_decode(model, backend="aot_eager")  # inductor on CPU takes ~40 s; the graph is the same
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert generate.generate(model, PROMPTS, sampling(12), eos_id=None, compile=True) == eager
        # other prompt lengths, other lengths of output, an eos stop: same shapes for the step, no recompile
        shorter = [PROMPTS[1], PROMPTS[0], PROMPTS[2][:5]]
        assert generate.generate(model, shorter, sampling(20), eos_id=None, compile=True) == \
            generate.generate(model, shorter, sampling(20), eos_id=None)
        eos = eager[1][4]
        assert generate.generate(model, PROMPTS, sampling(12), eos_id=eos, compile=True) == \
            generate.generate(model, PROMPTS, sampling(12), eos_id=eos)
    assert counters["stats"]["unique_graphs"] == 1
    # another batch size is another graph (dynamic=False keeps every shape static for CUDA graphs)
    assert list(generate.stream(model, PROMPTS[1], sampling(12), eos_id=eos, compile=True)) == \
        generate.generate(model, [PROMPTS[1]], sampling(12), eos_id=eos)[0]
    assert counters["stats"]["unique_graphs"] == 2
    with torch._dynamo.config.patch(error_on_recompile=True):  # batch 3 again: its graph and cache were kept
        assert generate.generate(model, PROMPTS, sampling(12), eos_id=None, compile=True) == eager
    knobs = sampling(12, temperature=0.9, top_k=50, top_p=0.9, repetition_penalty=1.3)
    a = generate.generate(model, PROMPTS, knobs, eos_id=None, generator=torch.Generator().manual_seed(3), compile=True)
    assert a == generate.generate(model, PROMPTS, knobs, eos_id=None, use_cache=False,
                                  generator=torch.Generator().manual_seed(3))
    torch._dynamo.reset()


def test_no_repeat_ngram_bans_repeats_in_every_decoder():
    model = tiny_model()  # at init greedy decoding repeats the last prompt token: a loop to break
    looping = generate.generate(model, PROMPTS, sampling(16), eos_id=None)
    assert any(repeats_an_ngram(r, 3) for r in looping)
    for n in (2, 3, 4):
        static = generate.generate(model, PROMPTS, sampling(16, no_repeat_ngram=n), eos_id=None)
        knobs = sampling(16, no_repeat_ngram=n)
        assert static == generate.generate(model, PROMPTS, knobs, eos_id=None, use_cache=False)
        assert static == [generate.generate(model, [p], knobs, eos_id=None)[0] for p in PROMPTS]
        assert not any(repeats_an_ngram(r, n) for r in static), (n, static)
        # the reference: greedy over the full forward, skipping any id that would complete a repeated n-gram
        for prompt, got in zip(PROMPTS, static):
            new = []
            for _ in range(16):
                logits = model(torch.tensor([prompt + new]))[0][0, -1]
                for tok in logits.argsort(descending=True).tolist():
                    if not repeats_an_ngram(new + [tok], n):
                        break
                new.append(tok)
            assert new == got
    # the prompt does not count: a prompt ending in a repeated pair still lets the answer use that pair once
    quoted = generate.generate(model, [[7, 7, 7, 7]], sampling(6, no_repeat_ngram=2), eos_id=None)[0]
    assert not repeats_an_ngram(quoted, 2)
    with pytest.raises(ValueError, match="no_repeat_ngram"):
        generate.generate(model, PROMPTS, sampling(4, no_repeat_ngram=1))


def test_no_repeat_ngram_compiled_matches_eager():
    model = lively_model()
    eager = generate.generate(model, PROMPTS, sampling(14, no_repeat_ngram=3), eos_id=None)
    torch._dynamo.reset()
    generate.compile_decode(model, backend="aot_eager")
    assert generate.generate(model, PROMPTS, sampling(14, no_repeat_ngram=3), eos_id=None, compile=True) == eager
    torch._dynamo.reset()


def test_generate_keeps_mode_and_checks_input():
    model = tiny_model().train()
    generate.generate(model, [[1, 2]], sampling(2))
    assert model.training
    list(generate.stream(model, [1, 2], sampling(3)))
    assert model.training
    with pytest.raises(ValueError, match="outside"):
        generate.generate(model, [[1, 1000]], sampling(2))
    with pytest.raises(ValueError, match="prompt"):
        generate.generate(model, [[1], []], sampling(2))


def test_args_validation():
    with pytest.raises(ConfigError, match="divisible by n_heads"):
        Transformer(tiny_args(dim=66))
    with pytest.raises(ConfigError, match="n_kv_heads"):
        Transformer(tiny_args(n_kv_heads=3))
    with pytest.raises(ConfigError, match="dropout"):
        tiny_args(dropout=1.5).validate()


def test_optimizer_groups_and_flops():
    model = tiny_model()
    opt = model.configure_optimizer(0.1, 3e-4, (0.9, 0.95), "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert len(decay["params"]) == 1 + 2 * 7  # tied embedding once, 7 matrices per layer
    n = model.num_params()
    assert model.flops_per_token() == 6 * n + 12 * 2 * 4 * 16 * 64
    assert model.flops_per_token(seq_len=8) == 6 * n + 12 * 2 * 4 * 16 * 8


def test_load_model_round_trip(tmp_path):
    model = lively_model(seed=0, n_kv_heads=2)
    other = lively_model(seed=1, n_kv_heads=2)
    run = tmp_path / "run"
    run.mkdir()

    def save(m, path, prefix):
        ckpt = {"model": {prefix + k: v for k, v in m.state_dict().items()}, "model_args": vars(m.args).copy(),
                "config": {}, "kind": "pretrain", "step": 7, "optimizer": {}, "scaler": None, "data_position": 0,
                "rng": {}, "best_val_loss": 3.0, "val_loss": 3.0, "tokenizer_sha256": "x"}
        save_checkpoint(ckpt, str(path))

    save(other, run / "last.pt", "module._orig_mod.")
    x = torch.randint(0, 1000, (2, 9))
    loaded, ckpt = load_model(str(run))  # only last.pt so far
    assert torch.equal(loaded(x, x)[0], other(x, x)[0]) and ckpt["step"] == 7
    save(model, run / "best.pt", "_orig_mod.")
    loaded, _ = load_model(str(run))  # best.pt is preferred
    assert not loaded.training and loaded.args == model.args
    assert torch.equal(loaded(x, x)[0], model(x, x)[0])
    assert loaded.output.weight is loaded.tok_embeddings.weight
    assert generate.generate(loaded, PROMPTS, sampling(6)) == generate.generate(model, PROMPTS, sampling(6))
    with pytest.raises(FileNotFoundError):
        load_model(str(tmp_path / "missing"))
    torch.save({"weights": {}}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="model_args"):
        load_model(str(tmp_path / "bad.pt"))


def _plain_and_fused(chunk: int, dtype=torch.float32):
    """Loss and gradients of the same model through the plain path and through fused_ce, on targets with -1s."""
    torch.manual_seed(0)
    x = torch.randint(0, 1000, (3, 40))
    y = torch.randint(0, 1000, (3, 40))
    y[0, :7] = -1
    y[2, 30:] = -1
    results = []
    for ce_chunk in (0, chunk):
        m = tiny_model(vocab_size=1000).train()  # padded to 1024 rows
        m.ce_chunk = ce_chunk
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            _, loss = m(x, y)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    return results


@pytest.mark.parametrize("chunk", [16, 47, 4096])  # several chunks, a ragged last chunk, one chunk
def test_fused_loss_and_gradients_equal_the_plain_path(chunk):
    (loss0, g0), (loss1, g1) = _plain_and_fused(chunk)
    assert abs(loss0.item() - loss1.item()) < 1e-5
    for name in g0:
        assert torch.allclose(g0[name], g1[name], atol=1e-6, rtol=1e-4), name
    assert g1["tok_embeddings.weight"][1000:].abs().max() == 0  # padded rows get no gradient


def test_fused_loss_under_bf16_autocast_stays_close():
    (loss0, g0), (loss1, g1) = _plain_and_fused(32, torch.bfloat16)
    assert abs(loss0.item() - loss1.item()) < 2e-2
    cos = F.cosine_similarity(g0["layers.0.attention.wq.weight"].flatten(), g1["layers.0.attention.wq.weight"].flatten(), 0)
    assert cos > 0.99


def test_fused_loss_compiles_without_graph_breaks():
    m = tiny_model().train()
    m.ce_chunk = 32
    x = torch.randint(0, 1000, (2, 16))
    explained = torch._dynamo.explain(lambda a, b: m(a, b)[1])(x, x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1


def test_the_compiled_training_step_can_be_kept_in_the_compile_cache():
    """torch.compile's AOT-autograd cache stores no graph holding a higher-order op (a torch.autograd.Function
    becomes one): a warm cache would trace and partition the whole training step again on every run. The fused loss
    is a custom op with its own autograd, so the graph dynamo hands over holds none."""
    m = tiny_model().train()
    m.ce_chunk = 32
    graphs = []

    def keep(gm, example_inputs):  # a torch.compile backend that runs the traced graph as it is
        graphs.append(gm)
        return gm.forward

    x = torch.randint(0, 1000, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = torch.compile(m, backend=keep)(x, x)
    loss.backward()
    torch._dynamo.reset()
    assert len(graphs) == 1
    ops = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert not [op for op in ops if isinstance(op, torch._ops.HigherOrderOperator)], ops
    assert any("linear_ce_grads" in str(op) for op in ops), ops
    try:  # the cache's own check, where this torch has it under this name
        from torch._functorch._aot_autograd.autograd_cache import check_cacheable
    except ImportError:
        return
    check_cacheable(graphs[0])


TRITON_CHECK = r"""
import torch
import triton
import triton.language as tl
from babyllama import fused_ce


@triton.jit
def _probe(out_ptr, n):
    for i in range(0, n, 1):
        tl.store(out_ptr + i, i)


try:  # some Triton interpreters cannot loop up to a runtime argument under NumPy >= 2.4 (their bug, not the kernel's)
    _probe[(1,)](torch.empty(2, dtype=torch.int32), 2)
except Exception as e:
    print("interpreter unusable:", repr(e)[:200])
    raise SystemExit(0)
torch.manual_seed(0)
logits = (torch.randn(5, 200) * 3).to(torch.bfloat16)
targets = torch.tensor([3, -1, 189, 0, 150])
scale = torch.tensor([0.25])
ref_total, ref = fused_ce._softmax_grad_torch(logits.clone(), targets, 190, scale)
losses = torch.empty(5)
fused_ce._softmax_grad_kernel[(5,)](logits, logits.stride(0), targets, scale, losses, 190, 200, BLOCK=64)
assert abs(losses.sum().item() - ref_total.item()) < 1e-3 * max(1.0, ref_total.item()), (losses, ref_total)
assert losses[1] == 0 and torch.all(logits[:, 190:] == 0) and torch.all(logits[1] == 0)
assert (logits.float() - ref.float()).abs().max() < 2e-3, (logits.float() - ref.float()).abs().max()
print("triton kernel ok")
"""


@pytest.mark.slow
def test_triton_softmax_grad_kernel_matches_torch_in_the_interpreter():
    """The CUDA kernel's arithmetic, run by Triton's CPU interpreter (needs `pip install triton`; the GPU runs
    the same code compiled, see bench.py's parity)."""
    import subprocess
    pytest.importorskip("triton")
    r = subprocess.run([sys.executable, "-c", TRITON_CHECK], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=300)
    if "interpreter unusable" in r.stdout:
        pytest.skip(r.stdout.strip())
    assert r.returncode == 0 and "triton kernel ok" in r.stdout, r.stderr[-2000:]


def test_cast_for_inference_keeps_rope_fp32_and_matches_autocast():
    """bf16 weights (eval.py/chat.py on a GPU) give the logits the fp32 model gives under bf16 autocast, up to the
    bf16 rounding of the embedding rows; the norms' gains, the rotary tables and the residual stream stay fp32."""
    m = tiny_model()
    x = torch.randint(0, 1000, (2, 24))
    for layer in m.layers:  # gains other than 1, as a trained model has
        torch.nn.init.uniform_(layer.attention_norm.weight, 0.5, 1.5)
    fp32_gains = {name: p.detach().clone() for name, p in m.named_parameters() if p.dim() == 1}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref, _ = m(x)
        m.cast_for_inference(torch.bfloat16)
        out, _ = m(x)
    assert m.rope_cos.dtype == torch.float32 and m.layers[0].attention.wq.weight.dtype == torch.bfloat16
    for name, gain in m.named_parameters():  # the norms' gains as trained: autocast runs the norms in fp32
        if gain.dim() == 1:
            assert gain.dtype == torch.float32 and torch.equal(gain, fp32_gains[name]), name
    attn = m.layers[1].attention  # q/k/v concatenated once, not per token
    assert torch.equal(attn.w_qkv, torch.cat((attn.wq.weight, attn.wk.weight, attn.wv.weight))) and attn.fused
    assert m.output.weight is m.tok_embeddings.weight  # still tied
    assert (out.float() - ref.float()).abs().max() < 0.05 * ref.float().abs().max()
    assert torch.equal(out.argmax(-1), ref.argmax(-1))


def test_blocked_cumsum_equals_cumsum():
    x = torch.rand(3, 64793)
    assert torch.allclose(generate.cumsum_rows(x), x.cumsum(-1), rtol=1e-5, atol=1e-3)
    y = torch.rand(2, 7)
    assert torch.allclose(generate.cumsum_rows(y, block=4), y.cumsum(-1), atol=1e-6)


def test_second_model_in_one_process_compiles_with_its_dropout_as_a_constant(monkeypatch):
    """chain.py compiles pretraining's model (dropout 0.0), then SFT's (0.1) in one process. By default dynamo then
    makes the dropout rates symbolic floats: the compile caches miss and SFT's step is traced twice."""
    from babyllama.runtime import configure_dynamo

    monkeypatch.setattr(torch._dynamo.config, "specialize_float", False)  # torch's default; restored after
    configure_dynamo()  # as trainer.build_model calls it
    torch._dynamo.reset()
    graph_inputs = []

    def backend(gm, example_inputs):
        graph_inputs.append([n.name for n in gm.graph.nodes if n.op == "placeholder"])
        return gm.forward

    x = torch.randint(1, 64, (2, 16))
    for dropout in (0.0, 0.1):
        model = Transformer(tiny_args(dropout=dropout)).train()
        _, loss = torch.compile(model, backend=backend)(x, x)
        loss.backward()
    assert len(graph_inputs) == 2 and graph_inputs[0] == graph_inputs[1]  # no input for the second model's rates
    assert not [name for name in graph_inputs[1] if "dropout" in name]
    torch._dynamo.reset()


def test_residual_stream_is_bf16_only_when_training_under_bf16_autocast():
    """Training under bf16 autocast carries the residual stream in bf16 (half its memory traffic); everything else
    (fp32, fp16 autocast, and any forward without gradients: validation, scoring, decoding) keeps it fp32, so those
    numbers do not move. The bf16 stream's loss stays close to fp32's."""
    torch.manual_seed(0)
    model = Transformer(tiny_args())
    x = torch.randint(0, model.args.vocab_size, (2, 16))
    seen = []
    hook = model.layers[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    _, fp32_loss = model(x, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, bf16_loss = model(x, x)
        with torch.no_grad():
            model(x, x)
    with torch.autocast("cpu", dtype=torch.float16):
        model(x, x)
    hook.remove()
    assert seen == [torch.float32, torch.bfloat16, torch.float32, torch.float32]
    assert abs(bf16_loss.item() - fp32_loss.item()) < 2e-2
