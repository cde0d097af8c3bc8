"""bench.py --what=ckpt on CPU at a tiny config: three saves as the training loop makes them, what the loop waited for
and how long the files took, best.pt the weights only."""
import json

from conftest import run_script

TINY = ["--dim=32", "--n_layers=1", "--n_heads=2", "--max_seq_len=16", "--vocab_size=128", "--batch_size=4",
        "--device=cpu"]


def test_ckpt_rows_time_the_loop_and_the_background_write(tmp_path):
    out = tmp_path / "bench.json"
    run_script("bench.py", [*TINY, f"--out={out}", "--what=ckpt"])
    rows = json.loads(out.read_text())["rows"]
    assert [r["save"] for r in rows] == [1, 2, 3] and all(r["bench"] == "ckpt" for r in rows)
    for r in rows:
        assert 0 < r["loop_ms"] / 1000 <= r["write_s"]  # the write ends after the loop got its control back
        assert 0 < r["best_mb"] < 0.5 * r["last_mb"]  # last.pt adds two AdamW moments per weight
    assert {p.name for p in (tmp_path / "ckpt_bench").iterdir()} == {"best.pt", "last.pt"}
