"""A diverged run is never saved as good: its validation loss, like its weights, stops the run before any save."""
import math
import types

import pytest

from babyllama.checkpoint import Checkpoints, diverged_loss
from generate import Sampling
from babyllama.errors import ConfigError


def test_diverged_loss_is_worse_than_a_uniform_guess():
    v = 64793
    assert not diverged_loss(2.98, v) and not diverged_loss(math.log(v), v)  # a trained model; step 0 of a fresh one
    assert diverged_loss(3_152_663.0, v) and diverged_loss(math.nan, v) and diverged_loss(math.inf, v)


def test_a_diverged_validation_stops_the_run_without_saving(tmp_path):
    printed, saved = [], []
    ck = Checkpoints.__new__(Checkpoints)  # only what check_loss touches
    ck.cfg = types.SimpleNamespace(out_dir=str(tmp_path))
    ck.model_args = types.SimpleNamespace(vocab_size=512)
    ck.log = types.SimpleNamespace(print=printed.append)
    ck.writer = types.SimpleNamespace(wait=lambda: None, save=lambda *a: saved.append(a), written=[],
                                      finished=lambda: None)
    ck.lines = []  # no best.pt line waiting for its write
    ck.good_step = 40
    ck.check_loss(50, 5.0)  # fine: log(512) + 1 = 7.24
    with pytest.raises(SystemExit) as e:
        ck.check_loss(60, 3_152_663.0)
    assert e.value.code == 3 and not saved
    assert "diverged" in printed[-1] and "last.pt (step 40)" in printed[-1]


def test_beams_have_an_upper_bound():
    with pytest.raises(ConfigError, match="beams"):
        Sampling(beams=100000).validate()
    Sampling(beams=8).validate()


def test_resume_from_a_checkpoint_without_training_state_is_one_line(tmp_path):
    import torch
    from babyllama.checkpoint import save_checkpoint
    from babyllama.errors import DataError
    from babyllama.run_dir import open_run
    from babyllama.runtime import Runtime
    from model import ModelArgs, Transformer
    from pretrain import PretrainConfig

    args = ModelArgs(dim=16, n_layers=1, n_heads=2, vocab_size=64, max_seq_len=16)
    save_checkpoint({"model": Transformer(args).state_dict(), "model_args": vars(args), "step": 3},
                    str(tmp_path / "last.pt"))
    cfg = PretrainConfig(out_dir=str(tmp_path), resume=True)
    rt = Runtime(torch.device("cpu"), 0, 0, 1, torch.float32)
    with pytest.raises(DataError, match=r"last\.pt: .*optimizer.*scaler.*rng.*config.*best_val_loss"):
        open_run(cfg, rt, args, "")


@pytest.mark.parametrize("content,why", [("", "no user/assistant pair"), ("{not json\n", "not JSON"),
                                         ('{"x": 1}\n', "conversations"),
                                         ("你好".encode("gb18030"), "not UTF-8")])
def test_a_bad_answer_pool_is_one_line_naming_the_file(tmp_path, content, why):
    from babyllama import quality
    from babyllama.errors import DataError
    pool = tmp_path / "pool.jsonl"
    pool.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError, match=why) as e:
        quality.qa_pairs(str(pool))
    assert str(pool) in str(e.value)
