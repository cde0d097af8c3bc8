"""data_process.py against hostile input: dead tokenizer workers, kills during the output swap, folders holding
other files, SFT turns that cannot train, BOM / GB18030 / folder inputs, lines and array elements of any length."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from babyllama import corpora
import data_process as dp
from babyllama import output_dir
from conftest import FIX, PRE, PRE_FILES, ROOT, SFT, dp_cfg, dp_records, dp_run_pretrain, no_temp_left

# ---------------------------------------------------------------- dead workers, output folders

_ENCODE_CHUNK = dp.encode_chunk


def _dies(texts):  # a pool task whose worker is killed (as by the OOM killer or kill -9)
    if any("第3篇" in t for t in texts):
        os.kill(os.getpid(), signal.SIGKILL)
    return _ENCODE_CHUNK(texts)


def _no_memory(texts):  # a pool task whose worker runs out of memory (std::bad_alloc -> MemoryError)
    raise MemoryError


@pytest.mark.parametrize("task,message", [(_dies, "worker died"), (_no_memory, "out of memory")])
def test_dead_worker_is_an_error_not_a_hang(tmp_path, tokenizer_path, monkeypatch, capsys, task, message):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"第{i}篇文章，内容足够长。"}, ensure_ascii=False) + "\n"
                              for i in range(50)), encoding="utf-8")
    out = tmp_path / "out"
    monkeypatch.setattr(dp, "encode_chunk", task)  # the fork start method carries the patch into the workers

    def hang(signum, frame):
        raise TimeoutError("data_process.py hangs on a dead worker")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(60)
    try:
        t0 = time.time()
        with pytest.raises(SystemExit) as e:
            dp.main(["pretrain", f"--inputs={corpus}", f"--out_dir={out}", "--num_workers=2", "--chunk_chars=20",
                     "--progress=false"])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert e.value.code == 2 and time.time() - t0 < 30
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not out.exists() and no_temp_left(tmp_path)


def test_rerun_replaces_only_its_own_output(tmp_path, tokenizer_path, capsys):
    out = tmp_path / "pre"
    dp_run_pretrain(out)
    first = {n: (out / n).read_bytes() for n in os.listdir(out)}
    manifest = json.loads(first["manifest.json"])
    assert manifest["mode"] == "pretrain" and sorted(manifest["files"]) == sorted(set(first) - {"manifest.json"})
    dp_run_pretrain(out, "--shard_tokens=30")  # our own earlier output is replaced as a whole: no stale shard stays
    names = set(os.listdir(out))
    assert len(names) > len(first) and names == set(json.loads((out / "manifest.json").read_text())["files"]) | {
        "manifest.json"} and no_temp_left(tmp_path)
    for planted in ("train_notes.json", "train_00099.bin"):  # a file it did not write: refused, nothing touched
        (out / planted).write_text("mine")
        before = {n: (out / n).read_bytes() for n in os.listdir(out)}
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            dp_run_pretrain(out)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and planted in err[0] and "--overwrite" in err[0]
        assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before
        (out / planted).unlink()
    (out / "train_00099.bin").write_text("old shard of another corpus")
    dp_run_pretrain(out, "--overwrite")
    assert sorted(os.listdir(out)) == sorted(first)
    with pytest.raises(SystemExit):  # an SFT run does not replace pretraining output
        dp.main(["sft", f"--inputs={os.path.join(SFT, 'reward.jsonl')}", f"--out_dir={out}"])
    err = capsys.readouterr().err
    assert str(out) in err and "did not write" in err


def _run_killed_between_renames(out, corpus):
    """Runs data_process.py in a child that is killed (SIGKILL) after the old folder is moved aside."""
    code = ("import os, signal, sys, data_process\nfrom babyllama import output_dir\n"
            "output_dir._exchange = lambda a, b: False\n"  # the two-rename swap (no RENAME_EXCHANGE)
            "output_dir._between_renames = lambda: os.kill(os.getpid(), signal.SIGKILL)\n"
            "data_process.main(sys.argv[1:])\n")
    return subprocess.run([sys.executable, "-c", code, "pretrain", f"--inputs={corpus}", f"--out_dir={out}",
                           "--progress=false", "--num_workers=1", "--val_fraction=0", "--val_min_tokens=1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_kill_between_renames_leaves_complete_old_or_new(tmp_path, tokenizer_path):
    out, ref = tmp_path / "pre", tmp_path / "ref"
    dp_run_pretrain(out, files=PRE_FILES[:1])  # the old output
    old = {n: (out / n).read_bytes() for n in os.listdir(out)}
    dp_run_pretrain(ref)  # what the new output must be
    new = {n: (ref / n).read_bytes() for n in os.listdir(ref)}
    corpus = ",".join(os.path.join(PRE, f) for f in PRE_FILES)
    r = _run_killed_between_renames(out, corpus)
    assert r.returncode == -signal.SIGKILL and not out.exists()  # killed with the old folder moved aside
    side = sorted(os.listdir(tmp_path))
    assert ".pre.old" in side and ".pre.new" in side
    # the next run into the folder finishes the swap (the new folder was complete), then writes its own output
    dp.main(["pretrain", f"--inputs={corpus}", f"--out_dir={out}", "--progress=false", "--val_fraction=0",
             "--val_min_tokens=1", "--shard_tokens=1000000000"])
    got = {n: (out / n).read_bytes() for n in os.listdir(out)}
    assert {k: v for k, v in got.items() if k != "manifest.json"} == {k: v for k, v in new.items() if k != "manifest.json"}
    assert no_temp_left(tmp_path) and got != old
    # the recovery itself: complete .new -> takes the place; no .new manifest -> the .old folder goes back
    r = _run_killed_between_renames(out, os.path.join(PRE, PRE_FILES[0]))
    output_dir.recover(str(out), str(tmp_path / ".pre.new"), str(tmp_path / ".pre.old"))
    assert {n: (out / n).read_bytes() for n in os.listdir(out) if n != "manifest.json"} == {
        k: v for k, v in old.items() if k != "manifest.json"}
    r = _run_killed_between_renames(out, corpus)
    (tmp_path / ".pre.new" / "manifest.json").unlink()  # as if killed before the new folder was complete
    output_dir.recover(str(out), str(tmp_path / ".pre.new"), str(tmp_path / ".pre.old"))
    assert {n: (out / n).read_bytes() for n in os.listdir(out) if n != "manifest.json"} == {
        k: v for k, v in old.items() if k != "manifest.json"} and no_temp_left(tmp_path)


def test_default_run_does_not_replace_other_output(tmp_path, tokenizer_path, monkeypatch, capsys):
    d = tmp_path / "data" / "sample" / "pretrain"
    d.mkdir(parents=True)
    shutil.copy(os.path.join(FIX, "pretrain", "plain.txt"), d / "plain.txt")
    monkeypatch.chdir(tmp_path)
    dp.main(["pretrain", "--num_workers=1", "--progress=false"])  # the sample into data/pretrain, then again: fine
    dp.main(["pretrain", "--num_workers=1", "--progress=false"])
    real = tmp_path / "data" / "pretrain"
    dp.main(["pretrain", f"--inputs={os.path.join(PRE, 'baike.jsonl')}", f"--out_dir={real}", "--progress=false"])
    before = {n: (real / n).read_bytes() for n in os.listdir(real)}
    with pytest.raises(SystemExit) as e:
        dp.main(["pretrain", "--num_workers=1", "--progress=false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "embedded sample" in err[0] and "--overwrite" in err[0]
    assert {n: (real / n).read_bytes() for n in os.listdir(real)} == before


def test_sharegpt_turns_normalized_so_every_conversation_trains(tmp_path, capsys, tokenizer_path):
    from chatglm_tokenizer.tokenizer import ChatGLMTokenizer
    from dataset_sft import SFTSamples

    u, a = {"from": "human"}, {"from": "gpt"}
    recs = [[dict(u, value="问一"), dict(a, value="答一"), dict(u, value="问二"), dict(u, value="问三")],  # two user turns at the end
            [dict(u, value="问"), dict(u, value="补充"), dict(a, value="答"), dict(a, value="再答")],  # same role twice
            [dict(a, value="开场白"), dict(u, value="你好"), dict(a, value="您好")],  # an assistant turn first
            [dict(u, value="只有问题"), dict(u, value="还是问题")]]  # nothing answered: skipped
    src = tmp_path / "chat.jsonl"
    src.write_text("".join(json.dumps({"conversations": c}, ensure_ascii=False) + "\n" for c in recs), encoding="utf-8")
    out = tmp_path / "sft"
    s = dp.main(["sft", f"--inputs={src}", f"--out_dir={out}", "--val_fraction=0", "--val_min_records=0"])[0]
    assert {k: s["counts"].get(k) for k in ("read", "merged_turns", "dropped_last_user", "dropped_first_assistant",
                                            "bad_missing_field")} == {
        "read": 3, "merged_turns": 4, "dropped_last_user": 2, "dropped_first_assistant": 1, "bad_missing_field": 1}
    printed = capsys.readouterr().out
    assert "merged 4 " in printed and "dropped 2 " in printed
    rows = [json.loads(line) for line in open(out / "train.jsonl", encoding="utf-8")]
    assert [[(t["role"], t["content"]) for t in r["conversations"]] for r in rows] == [
        [("user", "问一"), ("assistant", "答一")],
        [("user", "问\n补充"), ("assistant", "答\n再答")],
        [("user", "你好"), ("assistant", "您好")]]
    samples = SFTSamples(str(out / "train.jsonl"), ChatGLMTokenizer(tokenizer_path), 64)  # what sft.py reads: every conversation trains
    assert len(samples) == 3


def test_bom_array_folder_and_gb18030_inputs(tmp_path, capsys):
    rec = [{"text": "长江是中国第一长河，全长六千三百公里。"}, {"text": "黄河是中国第二长河，被称为母亲河。"}]
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps(rec, ensure_ascii=False).encode("utf-8"))  # as Windows tools write
    src = corpora.detect(str(bom), "", dp_cfg())
    assert (src.container, src.fmt) == ("array", "text") and [r for r, _, _ in dp_records(src)] == rec
    out = tmp_path / "out"
    gb_lines = tmp_path / "gb.jsonl"
    gb_lines.write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rec).encode("gb18030"))
    gb_txt = tmp_path / "gb.txt"
    gb_txt.write_bytes("长江是中国第一长河。\n".encode("gb18030"))
    gb_array = tmp_path / "gb.json"
    gb_array.write_bytes(json.dumps(rec, ensure_ascii=False).encode("gb18030"))
    for bad, message in ((tmp_path, "is a folder"), (gb_lines, ":1: not UTF-8"), (gb_txt, ":1: not UTF-8"),
                         (gb_array, ":1: not UTF-8")):
        with pytest.raises(SystemExit) as e:
            dp.main(["pretrain", f"--inputs={bad}", f"--out_dir={out}", "--progress=false"])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith(f"error: {bad}") and message in err[0]
        assert not out.exists()


def test_sft_reader_gb18030_is_a_one_line_error(tmp_path):
    from babyllama.fileio import read_jsonl

    conv = {"conversations": [{"role": "user", "content": "头痛怎么办？"}, {"role": "assistant", "content": "休息。"}]}
    p = tmp_path / "train.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + (json.dumps(conv, ensure_ascii=False) + "\n").encode("utf-8"))
    assert [r for _, r in read_jsonl(str(p), "a conversation")] == [conv]  # a byte-order mark is fine
    p.write_bytes((json.dumps(conv) + "\n" + json.dumps(conv, ensure_ascii=False) + "\n").encode("gb18030"))
    with pytest.raises(dp.DataError, match=r"train\.jsonl:2: not UTF-8"):
        list(read_jsonl(str(p), "a conversation"))


# ---------------------------------------------------------------- hardening: memory bounded for any line length

def test_bounded_lines_never_read_more_than_the_limit():
    import io

    data = b"short\n" + "长江".encode() * 10 + b"\n" + b"x" * 7 + b"\nend"
    got = list(corpora.bounded_lines(io.BytesIO(data), 8))
    assert all(len(raw) <= 8 for _, raw, _ in got)
    assert [(ln, part) for ln, _, part in got] == [(1, 0), (2, 1), (2, 1), (2, 1), (2, 1), (2, 1), (2, 1), (2, 1),
                                                  (2, 2), (3, 0), (4, 0)]
    assert b"".join(raw for ln, raw, _ in got if ln == 2) == "长江".encode() * 10 + b"\n"


def test_long_records_are_skipped_and_long_documents_cut(tmp_path, capsys):
    long_text = "长江是中国第一长河。\n" * 300  # 3300 characters, 9900 bytes
    lines = tmp_path / "long.jsonl"
    lines.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in ("短文档一，足够长了。", long_text,
                                                                                       "短文档二，也足够长了。")),
                     encoding="utf-8")
    c = dp_cfg(max_record_chars=4096)
    got = dp_records(corpora.detect(str(lines), "", c), c)
    assert [(r and r["text"], ln, bad and bad.split(":")[0]) for r, ln, bad in got] == [
        ("短文档一，足够长了。", 1, None), (None, 2, "too long"), ("短文档二，也足够长了。", 3, None)]
    array = tmp_path / "long.json"
    array.write_text(json.dumps([{"text": "短文档一，足够长了。"}, {"text": long_text}, {"text": "短文档二，也足够长了。"}],
                                ensure_ascii=False), encoding="utf-8")
    got = list(corpora.iter_json_array(str(array), read_chars=512, max_record_chars=2048))
    assert [r and r["text"] for r, _, _ in got] == ["短文档一，足够长了。", None, "短文档二，也足够长了。"]
    assert got[1][2].startswith("too long") and "2,048" in got[1][2]
    txt = tmp_path / "one_line.txt"
    txt.write_text("长" * 5000 + "\n", encoding="utf-8")  # one 15000-byte line: cut into documents, none lost
    docs = [r["text"] for r, _, _ in dp_records(corpora.detect(str(txt), "", dp_cfg()), dp_cfg(txt_max_chars=1024))]
    assert "".join(docs) == "长" * 5000 and max(len(d) for d in docs) <= 2048
    assert dp.cut_document("一二\n三四五\n六", 4) == ["一二\n", "三四五\n", "六"] and dp.cut_document("一" * 9, 4) == [
        "一" * 4, "一" * 4, "一"]
    with pytest.raises(SystemExit) as e:  # no record of this file is a conversation: nothing to fine-tune on
        dp.main(["sft", f"--inputs={lines}:prompt_answer", f"--out_dir={tmp_path / 'o'}", "--max_record_chars=4096"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "long.jsonl:2: too long" in err and "too_long 1); nothing was written" in err


# peak RSS of the largest process of the run: VmHWM of this one (ru_maxrss would count the pytest process it was
# started from), ru_maxrss of its pool workers
MEASURE = ("import resource, sys, data_process\n"
           "data_process.main(sys.argv[1:])\n"
           "hwm = [int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]\n"
           "print('peak_kb', max(hwm, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))\n")


@pytest.mark.slow
@pytest.mark.parametrize("container", ["lines", "array", "txt"])
def test_peak_memory_bounded_for_a_40mb_record(tmp_path, tokenizer_path, container):
    """A 40 MB line (or array element, or plain-text line) is skipped or cut with the default limits: the peak
    memory of the run (largest process) stays far below what holding and tokenizing it would take (~1.5 GB)."""
    para = "长江是中国第一长河，全长约六千三百公里，流经青海、西藏、四川、云南、重庆、湖北、湖南、江西、安徽、江苏、上海。"
    big = para * (40_000_000 // len(para.encode()))
    small = [{"text": "短文档一，内容足够长。"}, {"text": "短文档二，内容也足够长。"}]
    path = tmp_path / {"lines": "big.jsonl", "array": "big.json", "txt": "big.txt"}[container]
    with open(path, "w", encoding="utf-8") as f:
        if container == "lines":
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in (small[0], {"text": big}, small[1]))
        elif container == "array":
            json.dump([small[0], {"text": big + big}, small[1]], f, ensure_ascii=False)  # 27M characters
        else:
            f.write(f"{small[0]['text']}\n\n{big}\n\n{small[1]['text']}\n")
    r = subprocess.run([sys.executable, "-c", MEASURE, "pretrain", f"--inputs={path}", f"--out_dir={tmp_path / 'o'}",
                        "--num_workers=1", "--progress=false"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    peak_mb = int(r.stdout.split("peak_kb")[-1]) / 1024
    assert peak_mb < 400, f"peak {peak_mb:.0f} MB: {r.stdout} {r.stderr}"
    if container != "txt":
        assert f"{path.name}:2: too long" in r.stderr or f"{path.name}:1: too long" in r.stderr


def test_inputs_are_described_in_words():
    from babyllama.corpora import Source
    assert dp.describe_source(Source("notes.txt", "txt", "text")) == "plain text"
    assert dp.describe_source(Source("baike.jsonl.gz", "lines", "baike")) == "JSON lines of baike records (gzip)"
    assert dp.describe_source(Source("wiki.json", "array", "completion")) == "a JSON array of completion records"
