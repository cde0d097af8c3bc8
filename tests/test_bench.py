"""bench.py on CPU at a tiny config: its numbers follow from what it timed, and its parity harness compares like with like.

    python -m pytest tests/test_bench.py -q

The GPU figures of the README come from the same code paths (docs/speed.md). The SFT test needs the
real ChatGLM2 tokenizer ($BABYLLAMA_TOKENIZER) and skips without it.
"""
import json
import math

import pytest

import bench
from conftest import run_main, run_script
from model import ModelArgs, Transformer

TINY = ["--dim=32", "--n_layers=1", "--n_heads=2", "--max_seq_len=16", "--vocab_size=128", "--batch_size=4",
        "--device=cpu"]


def run_bench(tmp_path, *flags):
    """bench.py as a user runs it -> (its JSON report, its stdout)."""
    out = tmp_path / "bench.json"
    r = run_script("bench.py", [*TINY, f"--out={out}", *flags])
    return json.loads(out.read_text()), r.stdout


def bench_in_process(tmp_path, monkeypatch, capsys, *flags):
    """bench.py's main in this process (eager variants only: no torch.compile state left behind) -> as run_bench."""
    out = tmp_path / "bench.json"
    capsys.readouterr()
    run_main(bench, [*TINY, f"--out={out}", *flags], monkeypatch)
    return json.loads(out.read_text()), capsys.readouterr().out


def test_train_rows_follow_from_the_timed_steps(tmp_path, monkeypatch, capsys):
    report, stdout = bench_in_process(tmp_path, monkeypatch, capsys, "--what=train", "--variants=fp32_eager", "--steps=3",
                                      "--warmup=1")
    (row,) = report["rows"]
    assert row["variant"] == "fp32_eager" and row["gpus"] == 1
    assert row["tokens_per_s"] == pytest.approx(4 * 16 * 3 / row["seconds"], rel=1e-9)
    assert row["step_ms"] == pytest.approx(1000 * row["seconds"] / 3, rel=1e-9)
    args = ModelArgs(dim=32, n_layers=1, n_heads=2, max_seq_len=16, vocab_size=128)
    assert row["params"] == Transformer(args).num_params()
    # random tokens, 4 small AdamW steps from the initialisation: the loss is still near ln(vocab)
    assert abs(row["last_loss"] - math.log(128)) < 0.5
    assert report["config"]["variants"] == "fp32_eager"
    table = stdout.splitlines()[-1].split()
    assert table[:2] == ["train", "fp32_eager"] and table[2].replace(",", "") == str(round(row["tokens_per_s"]))
    # no GPU, no peak to measure: MFU is n/a, never a 0 TFLOP/s peak and 0%
    assert row["mfu"] is None and table[-1] == "n/a" and report["matmul_peak_tflops"] == 0.0
    assert "matmul peak n/a" in stdout and "0 TFLOP/s" not in stdout and "0.0%" not in stdout


def test_parity_harness_gives_zero_gaps_for_the_same_path(tmp_path, tiny_corpus, monkeypatch, capsys):
    """fp32 eager against itself on CPU: same init, same batches, same schedule -> identical losses. A harness that
    fed the two paths different batches or seeds would show gaps here and make the GPU parity figure meaningless."""
    report, _ = bench_in_process(tmp_path, monkeypatch, capsys, "--what=parity", f"--data_dir={tiny_corpus}",
                                 "--parity_variant=fp32_eager", "--parity_steps=6", "--vocab_size=512")
    (row,) = report["rows"]
    assert row["steps"] == 6 and row["max_gap"] == 0.0 and row["mean_gap"] == 0.0
    assert row["fp32_first_last"] == row["fast_first_last"]
    assert row["fp32_first_last"][1] < row["fp32_first_last"][0]  # it trained: the last loss is below the first


@pytest.mark.slow
def test_sft_rows_count_real_tokens_and_packing_wastes_less(tmp_path, tokenizer_path):
    convs = [{"conversations": [{"role": "user", "content": "问题" * (1 + i % 5)},
                                {"role": "assistant", "content": "回答很长" * (1 + i % 3)}]} for i in range(40)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in convs), encoding="utf-8")
    report, _ = run_bench(tmp_path, "--what=sft", f"--sft_data={data}", "--sft_modes=fixed,packed", "--steps=2",
                          "--warmup=1", "--max_seq_len=64", "--vocab_size=64793", f"--tokenizer={tokenizer_path}")
    fixed, packed = report["rows"]
    assert (fixed["mode"], packed["mode"]) == ("fixed", "packed")
    assert 0 < fixed["nonpad_fraction"] < 0.5 < packed["nonpad_fraction"] <= 1
    for row in (fixed, packed):  # real tokens per second: never more than the padded rows the step processed
        assert 0 < row["real_tokens_per_s"] <= 4 * 64 * 2 / row["seconds"] + 1e-6


def test_variant_names_spell_out_the_step():
    v = bench.parse_variant("bf16_compile_ce4k_cg")  # pretrain.py's default step on a GPU
    assert (v.dtype, v.compile, v.ce_chunk, v.fused, v.attention, v.tuned) == \
        (bench.torch.bfloat16, "reduce-overhead", 4096, False, "auto", False)
    v = bench.parse_variant("bf16_autotune_ce16k_fused_cudnn_tuned")
    assert (v.compile, v.ce_chunk, v.fused, v.attention, v.tuned) == ("max-autotune", 16384, True, "cudnn", True)
    assert bench.parse_variant("fp16_eager").compile is False
    for bad in ("bf16", "bf16_fast", "bf16_eager_cg", "bf16_compile_ce0k", "bf16_compile_warp"):
        with pytest.raises(ValueError):
            bench.parse_variant(bad)


def test_beam_rows_time_eval_decoding_per_row_and_step(tmp_path, monkeypatch, capsys):
    report, stdout = bench_in_process(tmp_path, monkeypatch, capsys, "--what=beam", "--beam_questions=1,3",
                                      "--gen_prompt_len=4", "--gen_new_tokens=10")
    rows = report["rows"]
    assert [r["questions"] for r in rows] == [1, 3] and [r["rows"] for r in rows] == [32, 96]  # 4 starts x 8 beams
    for r in rows:  # 10 new tokens, the first 8 sampled: 2 beam steps per row
        assert r["seconds"] > 0 and r["us_per_row_step"] == pytest.approx(1e6 * r["seconds"] / (r["rows"] * 2))
        assert "gpu_s" not in r  # the GPU split is measured on CUDA only
    assert '"bench": "beam"' in stdout


def test_an_unknown_benchmark_is_refused_and_beam_is_known():
    assert bench.BenchConfig(what="beam").what == "beam"
    with pytest.raises(bench.ConfigError, match="unknown benchmark 'beams'"):
        bench.BenchConfig(what="beams").validate()


def test_kernels_are_summed_by_their_first_matching_class():
    kernels = [("void flash_fwd_kernel", 1.0), ("triton_poi_fused_0", 2.0), ("at::topk_kernel", 0.5), ("memset", 0.25),
               ("sm90_gemm_copy", 0.125)]  # a GEMM whose name also says copy: matmul comes first
    assert bench.by_class(kernels, bench.BEAM_CLASSES) == {
        "attention over the KV cache": 1.0, "other elementwise and reductions": 2.0, "log-softmax, top-k, sort": 0.5,
        "other": 0.25, "matmul": 0.125}
