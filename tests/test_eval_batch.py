"""eval.py --batch_size=0 (the default): every question in one batch on a GPU when the decode state fits half the free
memory, as many as fit otherwise, 32 on a CPU."""
import pytest
import torch

import eval as ev
from babyllama.config import parse_config
from babyllama.errors import ConfigError

DEFAULT_MODEL = {"dim": 512, "n_layers": 8, "n_heads": 8, "n_kv_heads": None, "vocab_size": 64793, "max_seq_len": 512}


def test_the_default_batch_is_auto_and_a_negative_one_is_refused():
    assert ev.EvalConfig().batch_size == 0
    assert parse_config(ev.EvalConfig, ["--batch_size=64"]).batch_size == 64
    with pytest.raises(ConfigError, match=r"batch_size must be >= 0 \(0 = auto\), got -1"):
        parse_config(ev.EvalConfig, ["--batch_size=-1"])


def test_a_cpu_keeps_batches_of_32():
    assert ev.auto_batch_size(8, DEFAULT_MODEL, 500, torch.device("cpu"), torch.float32) == 32


@pytest.mark.parametrize("free_gib, beams, expected", [
    (130, 8, 500),  # an H200 after loading the model: all 500 questions x 8 beams in one batch
    (8, 8, 56),  # 4 GiB for 75.4 MB of decode state per question (8 beams of a 8.4 MB bf16 KV cache + log-probs)
    (8, 1, 455),  # sampling: one row per question
    (0, 8, 1),  # never 0
])
def test_a_gpu_batches_every_question_that_fits_half_its_free_memory(monkeypatch, free_gib, beams, expected):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free_gib << 30, 141 << 30))
    assert ev.auto_batch_size(beams, DEFAULT_MODEL, 500, torch.device("cuda:0"), torch.bfloat16) == expected
    per_row = 2 * 8 * 8 * 64 * 512 * 2 + 4 * 64793 * 4  # KV cache of the whole context + four fp32 log-prob rows
    assert expected in (500, 1) or expected == (free_gib << 30) // 2 // (beams * per_row)
