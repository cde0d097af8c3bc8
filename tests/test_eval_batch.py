"""eval.py --batch_size=0 (the default): on a GPU the questions, sorted by length, in as few batches as their decode
state fits FREE_SHARE of the free memory (babyllama/batching.py); 32 a batch on a CPU; a batch that runs out of GPU
memory is halved, not lost."""
import pytest
import torch

import eval as ev
from babyllama import batching
from babyllama.config import parse_config
from babyllama.errors import ConfigError

DEFAULT_MODEL = {"dim": 512, "n_layers": 8, "n_heads": 8, "n_kv_heads": None, "vocab_size": 64793, "max_seq_len": 512}
SPEEDRUN_MODEL = dict(DEFAULT_MODEL, vocab_size=8192)
KV_SLOT = 2 * 8 * 8 * 64 * 2  # K and V of one row, one slot, 8 layers, bf16
DEV_LENGTHS = sorted([11] * 50 + [45] * 300 + [73] * 100 + [130, 144, 162, 188] * 12 + [190, 200])  # like the dev set's


def test_the_default_batch_is_auto_and_a_negative_one_is_refused():
    assert ev.EvalConfig().batch_size == 0
    assert parse_config(ev.EvalConfig, ["--batch_size=64"]).batch_size == 64
    with pytest.raises(ConfigError, match=r"batch_size must be >= 0 \(0 = auto\), got -1"):
        parse_config(ev.EvalConfig, ["--batch_size=-1"])


def test_a_cpu_keeps_batches_of_32_and_a_given_size_is_kept():
    prompts = [[1] * n for n in DEV_LENGTHS]
    order = batching.length_order([len(p) for p in prompts])
    assert ev.batch_sizes(ev.EvalConfig(), prompts, order, DEFAULT_MODEL, torch.device("cpu"), torch.float32) == \
        [32] * 15 + [20]
    cfg = ev.EvalConfig(batch_size=200)
    assert ev.batch_sizes(cfg, prompts, order, DEFAULT_MODEL, torch.device("cuda:0"), torch.bfloat16) == [200, 200, 100]


def test_a_prompt_costs_its_rows_kv_cache_over_prompt_plus_new_tokens_and_four_log_prob_rows():
    per_row_logp = 4 * 64793 * 4
    assert batching.prompt_bytes(32, DEFAULT_MODEL, 64, 256, 2) == 32 * (KV_SLOT * 320 + per_row_logp)
    assert batching.prompt_bytes(32, DEFAULT_MODEL, 300, 256, 2) == 32 * (KV_SLOT * 512 + per_row_logp)  # the context
    assert batching.prompt_bytes(4, DEFAULT_MODEL, 64, None, 2) == 4 * (KV_SLOT * 512 + per_row_logp)  # static cache


def test_plan_batches_fits_every_batch_in_the_budget_at_its_longest_prompt():
    budget = 40 << 30
    sizes = batching.plan_batches(DEV_LENGTHS, 32, SPEEDRUN_MODEL, 256, 2, budget)
    assert sum(sizes) == len(DEV_LENGTHS) and len(sizes) == 3 and min(sizes) >= 1
    end = 0
    for n in sizes:
        end += n
        assert n * batching.prompt_bytes(32, SPEEDRUN_MODEL, DEV_LENGTHS[end - 1], 256, 2) <= budget
        if end < len(DEV_LENGTHS):  # one more would not have fit
            assert (n + 1) * batching.prompt_bytes(32, SPEEDRUN_MODEL, DEV_LENGTHS[end], 256, 2) > budget
    assert batching.plan_batches(DEV_LENGTHS[:3], 32, SPEEDRUN_MODEL, 256, 2, 0) == [1, 1, 1]  # never an empty batch


@pytest.mark.parametrize("free_gib, expected", [
    (135, [410, 90]),  # an H200 after training
    (75, [248, 202, 50]),  # an H100 80 GB (a cache over the whole context took 148 a batch: 4 batches)
    (0, [1] * 500),
])
def test_a_gpu_plans_batches_in_its_share_of_the_free_memory(monkeypatch, free_gib, expected):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free_gib << 30, 141 << 30))
    prompts = [[1] * n for n in DEV_LENGTHS]
    order = batching.length_order([len(p) for p in prompts])
    sizes = ev.batch_sizes(ev.EvalConfig(), prompts, order, SPEEDRUN_MODEL, torch.device("cuda:0"), torch.bfloat16)
    assert sizes == expected


def test_a_batch_out_of_gpu_memory_is_halved_and_every_answer_kept_in_order():
    tried = []

    def decode(model, prompts, knobs, **kw):
        tried.append(len(prompts))
        if len(prompts) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return [list(reversed(p)) for p in prompts]

    prompts = [[5] * n + [n] for n in (7, 2, 9, 1, 4)]
    outs, _ = batching.generate_all(decode, None, prompts, [5], ev.Sampling(), {}, torch.device("cpu"), torch.float32,
                                    progress=False)
    assert outs == [list(reversed(p)) for p in prompts]
    assert tried == [5, 2, 3, 1, 2]  # 5 -> 2 + 3; 3 -> 1 + 2


def test_one_prompt_out_of_memory_is_an_error_and_a_wrong_plan_is_refused():
    def decode(model, prompts, knobs, **kw):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.cuda.OutOfMemoryError):
        batching.generate_all(decode, None, [[1, 2]], [1], ev.Sampling(), {}, torch.device("cpu"), torch.float32,
                              progress=False)
    with pytest.raises(ValueError, match=r"batch sizes \[2\] do not cut 3 prompts"):
        batching.generate_all(decode, None, [[1], [2], [3]], [2], ev.Sampling(), {}, torch.device("cpu"),
                              torch.float32, progress=False)
