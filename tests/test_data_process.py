"""data_process.py: every input format, the bad-input rules, dedup, validation split, shards + sidecars, the uint16 guard,
interrupted runs, and token-exact output (tests marked with `tokenizer_path` use the real ChatGLM2 tokenizer)."""
import gzip
import hashlib
import json
import os
import shutil
from collections import Counter

import numpy as np
import pytest

from babyllama import corpora, dedup
import data_process as dp
from conftest import FIX, PRE, PRE_FILES, SFT, SFT_FILES, dp_cfg, dp_records, dp_run_pretrain, no_temp_left

WIKI_A = "长江是中国第一长河，发源于青藏高原的唐古拉山脉。"
WIKI_B = "黄河是中国第二长河，被称为中华民族的母亲河。"
# the documents the fixtures must produce (min_chars=10, exact dedup), in input order
EXPECTED_DOCS = [
    WIKI_A, WIKI_B,
    "民法典\n2020年5月28日通过\n第一编\n总则\n第二编\n物权", "刑法\n第一章\n刑法的任务、基本原则和适用范围",
    "高血压是一种常见的慢性疾病，需要长期管理。", "感冒通常由病毒引起，多休息多喝水即可。",
    "三国演义\n话说天下大势，分久必合，合久必分。", "西游记\n混沌未分天地乱，茫茫渺渺无人见。",
    "第一章 传染病总论\n传染病是由病原微生物感染人体后产生的疾病。", "第二章 病毒性肝炎\n病毒性肝炎是由多种肝炎病毒引起的传染病。",
]


def parse_inputs(c):
    return corpora.parse_inputs(c.inputs, c.manifest, "pretrain")


def read_docs(out_dir):
    """All documents of a pretrain output as lists of ids (train shards then val shards), plus the sidecars."""
    docs, sides = {}, {}
    for split in ("train", "val"):
        ids = []
        for name in sorted(os.listdir(out_dir)):
            if name.startswith(split + "_") and name.endswith(".bin"):
                arr = np.memmap(os.path.join(out_dir, name), dtype=np.uint16, mode="r")
                ids.extend(arr.tolist())
                with open(os.path.join(out_dir, name[:-4] + ".json")) as f:
                    sides[name] = json.load(f)
        out, cur = [], []
        for i in ids:
            if i == 2:
                out.append(cur)
                cur = []
            else:
                cur.append(i)
        assert cur == [], "a shard must end with <eos>"
        docs[split] = out
    return docs, sides


# ---------------------------------------------------------------- parsing (no tokenizer)

def test_json_array_stream_tiny_reads(tmp_path):
    p = tmp_path / "a.json"
    p.write_text('[\n 1234567,\n {"text": "长江\\n黄河", "n": [1, 2]},\n  "x" , 89 ]', encoding="utf-8")
    got = list(corpora.iter_json_array(str(p), read_chars=3))  # every element straddles reads
    assert got == [(1234567, 2, None), ({"text": "长江\n黄河", "n": [1, 2]}, 3, None), ("x", 4, None), (89, 4, None)]
    p.write_text("[]", encoding="utf-8")
    assert list(corpora.iter_json_array(str(p), read_chars=1)) == []


def test_json_array_malformed_element_resyncs(tmp_path):
    p = tmp_path / "a.json"
    p.write_text('[\n{"text": "一"},\n{"text": oops},\n{"text": "二"},\n{"text": "三"}\n]', encoding="utf-8")
    got = list(corpora.iter_json_array(str(p), read_chars=4))
    assert [(r, ln) for r, ln, bad in got] == [({"text": "一"}, 2), (None, 3), ({"text": "二"}, 4), ({"text": "三"}, 5)]
    assert got[1][2].startswith("malformed JSON array element")


def test_json_array_truncated(tmp_path):
    p = tmp_path / "a.json"
    p.write_text('[{"text": "一"}, {"text": "二"}, {"text": "三', encoding="utf-8")
    got = list(corpora.iter_json_array(str(p), read_chars=5))
    assert [r for r, _, _ in got] == [{"text": "一"}, {"text": "二"}, None]
    assert "malformed" in got[2][2] or "truncated" in got[2][2]


@pytest.mark.parametrize("name,container,fmt", [
    ("pretrain/wiki_array.json", "array", "completion"), ("pretrain/baike.jsonl", "lines", "baike"),
    ("pretrain/text_bad.jsonl", "lines", "text"), ("pretrain/wudao.json", "array", "wudao"),
    ("pretrain/plain.txt", "txt", "text"), ("sft/alpaca.json", "array", "instruction"),
    ("sft/belle.json", "lines", "instruction"), ("sft/sharegpt.jsonl", "lines", "sharegpt"),
    ("sft/multiturn.json", "array", "instruction"), ("sft/seed.csv", "csv", "prompt_answer"),
    ("sft/reward.jsonl", "lines", "reward")])
def test_detect_each_format_and_gzip(tmp_path, name, container, fmt):
    src = corpora.detect(os.path.join(FIX, name), "", dp_cfg())
    assert (src.container, src.fmt) == (container, fmt)
    gz = tmp_path / (os.path.basename(name) + ".gz")
    with open(os.path.join(FIX, name), "rb") as f:
        gz.write_bytes(gzip.compress(f.read()))
    src_gz = corpora.detect(str(gz), "", dp_cfg())
    assert (src_gz.container, src_gz.fmt) == (container, fmt)
    assert dp_records(src_gz) == dp_records(src)


def test_pretrain_documents_of_each_format():
    rep = corpora.Reporter(0)
    docs = []
    for name in PRE_FILES:
        docs += list(corpora.iter_documents(corpora.detect(os.path.join(PRE, name), "", dp_cfg()), dp_cfg(), rep))
    assert docs == [WIKI_A, WIKI_B, "  " + WIKI_A + "\n", "短"] + EXPECTED_DOCS[2:]
    assert rep.counts == Counter({"malformed": 1, "missing_field": 2})


def test_instruction_and_sharegpt_as_pretrain_text():
    rec = {"instruction": "问", "input": "补充", "output": "答", "history": [["q1", "a1"]]}
    assert corpora.record_text(rec, "instruction") == "q1\na1\n问\n补充\n答"
    rec = {"conversations": [{"from": "human", "value": "你好"}, {"from": "gpt", "value": "您好"}]}
    assert corpora.record_text(rec, "sharegpt") == "你好\n您好"


def test_txt_rule(tmp_path):
    src = corpora.detect(os.path.join(PRE, "plain.txt"), "", dp_cfg())
    assert [(r["text"], ln) for r, ln, _ in dp_records(src)] == [(EXPECTED_DOCS[8], 1), (EXPECTED_DOCS[9], 5)]
    one = tmp_path / "one.txt"
    one.write_text("第一行\n第二行\n", encoding="utf-8")
    assert [r for r, _, _ in dp_records(corpora.detect(str(one), "", dp_cfg()))] == [{"text": "第一行\n第二行"}]
    # a document is cut at a line end once it holds txt_max_chars characters
    assert [r["text"] for r, _, _ in dp_records(corpora.detect(str(one), "", dp_cfg()), dp_cfg(txt_max_chars=3))] == ["第一行", "第二行"]


def test_parquet_text_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    p = tmp_path / "c4.parquet"
    pq.write_table(pa.table({"text": ["第一篇文章。", "第二篇文章。"], "url": ["a", "b"]}), str(p))
    src = corpora.detect(str(p), "", dp_cfg())
    assert (src.container, src.fmt) == ("parquet", "text")
    assert [(r, ln) for r, ln, _ in dp_records(src)] == [({"text": "第一篇文章。"}, 1), ({"text": "第二篇文章。"}, 2)]


def test_explicit_format_and_manifest(tmp_path):
    p = tmp_path / "notes.dat"
    p.write_text("一段文字\n\n另一段文字\n", encoding="utf-8")
    with pytest.raises(dp.DataError, match="unknown format"):
        corpora.detect(str(p), "", dp_cfg())
    assert parse_inputs(dp_cfg(mode="pretrain", inputs=[f"{p}:txt", "x.json"])) == [(str(p), "txt"), ("x.json", "")]
    src = corpora.detect(str(p), "txt", dp_cfg())
    assert [r["text"] for r, _, _ in dp_records(src)] == ["一段文字", "另一段文字"]
    m = tmp_path / "list.txt"
    m.write_text(f"# corpora\n{p} txt\nsub/b.jsonl   # relative to the manifest\n", encoding="utf-8")
    assert parse_inputs(dp_cfg(mode="pretrain", manifest=str(m))) == \
        [(str(p), "txt"), (os.path.join(str(tmp_path), "sub/b.jsonl"), "")]
    m.write_text(f"{p} nosuchformat\n", encoding="utf-8")
    with pytest.raises(dp.DataError, match=r"list\.txt:1: .*'path format'"):
        parse_inputs(dp_cfg(mode="pretrain", manifest=str(m)))


def test_explicit_format_key_override(tmp_path):
    p = tmp_path / "mixed.jsonl"
    p.write_text('{"title": "标题", "content": "正文", "text": "文本"}\n', encoding="utf-8")
    assert corpora.detect(str(p), "", dp_cfg()).fmt == "wudao"
    src = corpora.detect(str(p), "text", dp_cfg())
    assert list(corpora.iter_documents(src, dp_cfg(), corpora.Reporter(0))) == ["文本"]


# ---------------------------------------------------------------- bad input

def test_bad_lines_are_counted_and_reported(capsys):
    src = corpora.detect(os.path.join(PRE, "text_bad.jsonl"), "", dp_cfg())
    rep = corpora.Reporter(2)
    docs = list(corpora.iter_documents(src, dp_cfg(), rep))
    assert len(docs) == 2 and rep.counts == Counter({"malformed": 1, "missing_field": 2})
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"warning: {src.path}:2: ") and "malformed" in err[0]
    assert err[1].startswith(f"warning: {src.path}:3: ") and "'text'" in err[1] and "missing" in err[1]
    assert err[2].startswith("warning: ") and "more bad records" in err[2] and len(err) == 3


def test_undecodable_bytes(tmp_path):
    lines = tmp_path / "bad.jsonl"
    lines.write_bytes('{"text": "好的"}\n'.encode() + b'{"text": "\xff\xfe"}\n' + '{"text": "也好"}\n'.encode())
    got = dp_records(corpora.detect(str(lines), "", dp_cfg()))
    assert [(r, ln) for r, ln, _ in got] == [({"text": "好的"}, 1), (None, 2), ({"text": "也好"}, 3)]
    assert got[1][2].startswith("undecodable")
    arr = tmp_path / "bad.json"
    arr.write_bytes('[{"text": "好的"},\n'.encode() + b'{"text": "\xff"},\n' + '{"text": "也好"}]'.encode())
    got = dp_records(corpora.detect(str(arr), "", dp_cfg()))
    assert [(r, ln) for r, ln, _ in got] == [({"text": "好的"}, 1), (None, 2), ({"text": "也好"}, 3)]
    assert got[1][2].startswith("undecodable")
    txt = tmp_path / "bad.txt"
    txt.write_bytes("第一行\n".encode() + b"\xc3\x28\n" + "第三行\n".encode())
    got = dp_records(corpora.detect(str(txt), "", dp_cfg()))
    assert [r for r, _, _ in got] == [None, {"text": "第一行\n第三行"}] and got[0][1] == 2


@pytest.mark.parametrize("content,message", [
    (b"", "empty"), (b"  \n\n", "empty"), (b"[]", "empty"), (b"{oops\n", ":1: malformed"),
    (b"hello world\n", "unknown format"), (b'{"foo": 1}\n', "['foo']"), (b"[1, 2]", "JSON objects")])
def test_unknown_or_empty_input_exits_2_without_output(tmp_path, capsys, content, message):
    bad = tmp_path / "bad.json"
    bad.write_bytes(content)
    out = tmp_path / "out"
    for mode in ("pretrain", "sft"):
        with pytest.raises(SystemExit) as e:
            dp.main([mode, f"--inputs={os.path.join(PRE, 'baike.jsonl')},{bad}", f"--out_dir={out}", "--progress=false"])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {bad}") and message in err[0]
        assert not out.exists()


@pytest.mark.parametrize("mode,good,bad,why", [
    ("pretrain", os.path.join(PRE, PRE_FILES[0]), '{"text": "短"}\n{"text": "也短"}\n{oops\n',
     "no document kept for training from 1 input(s) (read 2 documents; too_short 2, malformed 1)"),
    ("sft", os.path.join(SFT, SFT_FILES[0]), '{"instruction": "", "output": ""}\n{oops\n',
     "no conversation kept for training from 1 input(s) (read 1 conversations; empty_or_short 1, malformed 1)")])
def test_inputs_that_leave_nothing_to_train_on_exit_2_and_keep_the_earlier_output(tmp_path, capsys, mode, good, bad,
                                                                                  why):
    """Every record too short or malformed: not a run that replaces good data (--overwrite) with an empty one, but
    one line saying why nothing was kept, and the earlier output as it was."""
    out = tmp_path / "out"
    dp.main([mode, f"--inputs={good}", f"--out_dir={out}", "--progress=false", "--val_fraction=0"])
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}
    (tmp_path / "bad.jsonl").write_text(bad, encoding="utf-8")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        dp.main([mode, f"--inputs={tmp_path / 'bad.jsonl'}", f"--out_dir={out}", "--progress=false", "--overwrite"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1] == f"error: {why}; nothing was written to {out}", err
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before and no_temp_left(tmp_path)


def test_truncated_gzip_is_a_one_line_error(tmp_path, capsys):
    data = "".join(json.dumps({"text": f"第{i}篇文章，内容足够长。"}, ensure_ascii=False) + "\n" for i in range(20000))
    gz = gzip.compress(data.encode())
    bad = tmp_path / "cut.jsonl.gz"
    bad.write_bytes(gz[: len(gz) // 2])
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        dp.main(["sft", f"--inputs={bad}:prompt_answer", f"--out_dir={out}", "--max_reports=0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].startswith(f"error: {bad}: ") and "EOFError" in err[-1]
    # detection passed (the head is readable), the stream broke mid-file: no output folder, no temp folder
    assert not out.exists() and no_temp_left(tmp_path)
    bad.write_bytes(gz[:100])
    with pytest.raises(SystemExit):
        dp.main(["sft", f"--inputs={bad}", f"--out_dir={tmp_path / 'out2'}"])
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}: ") and "EOFError" in err
    assert not (tmp_path / "out2").exists()


def test_config_errors_exit_2(capsys):
    for argv in (["pretrain", "--no_such_knob=1"], ["nomode"], ["--inputs=a.json"], ["sft", "--val_fraction=1.5"]):
        with pytest.raises(SystemExit) as e:
            dp.main(argv)
        assert e.value.code == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_sft_rejects_pretrain_only_format(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        dp.main(["sft", f"--inputs={os.path.join(PRE, 'wiki_array.json')}", f"--out_dir={tmp_path / 'o'}"])
    assert e.value.code == 2 and "no conversations" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- dedup, near-dup, validation split (fake ids)

def fake_chunk(texts):
    """What a worker returns, with fake ids: each document = [10 + its index] * 3 then <eos>."""
    hashes = np.array([dedup.text_hash(t) for t in texts], dtype=np.uint64)
    lengths = np.full(len(texts), 4, dtype=np.int64)
    ids = np.concatenate([[10 + i] * 3 + [2] for i in range(len(texts))]).astype(np.uint16)
    return hashes, lengths, ids


class FakeWriter(dp.ShardWriter):
    def __init__(self):
        super().__init__("", "x", 10 ** 9, {})
        self.written = []

    def write(self, ids, documents, source):
        self.written.append((ids.tolist(), documents, source))
        self.documents += documents


def test_exact_dedup_and_val_split_rules():
    texts = ["甲 乙", "丙丁", " 甲  乙\n", "戊己", "丙丁", "庚辛"]
    hashes, lengths, ids = fake_chunk(texts)
    writers = {"train": FakeWriter(), "val": FakeWriter()}
    counts, split_tokens = Counter(), {"train": 0, "val": 0, "kept": 0}
    src = corpora.Source("/x/f.json", "array", "text")
    # val_fraction 0: val is filled only by the min-tokens rule (every 2nd kept document until val has 4 tokens)
    c = dp_cfg(val_fraction=0.0, val_min_tokens=4)
    dp._place_chunk(hashes, lengths, ids, None, src, c, writers, dedup.HashSet(), dedup.NearDupIndex(8), counts, split_tokens)
    assert counts == Counter({"duplicate": 2})
    assert writers["train"].written == [([10, 10, 10, 2, 13, 13, 13, 2, 15, 15, 15, 2], 3, "f.json")]
    assert writers["val"].written == [([11, 11, 11, 2], 1, "f.json")]
    assert split_tokens == {"train": 12, "val": 4, "kept": 4}
    # without dedup nothing is dropped; val_fraction ~1 sends everything to val
    writers = {"train": FakeWriter(), "val": FakeWriter()}
    counts = Counter()
    dp._place_chunk(hashes, lengths, ids, None, src, dp_cfg(dedup=False, val_fraction=0.999999), writers, dedup.HashSet(),
                    dedup.NearDupIndex(8), counts, {"train": 0, "val": 0, "kept": 0})
    assert counts == Counter() and writers["val"].written[0][1] == 6 and writers["train"].written == []


def test_hashset_merges_and_still_finds():
    s = dedup.HashSet(merge_every=3)
    hs = np.array([5, 1, 9, 7, 5, 1], dtype=np.uint64)
    assert [s.add_if_new(int(h), False) for h in hs[:4]] == [True, True, True, True]
    assert s.sorted.tolist() == [1, 5, 9] and s.recent == {7} and len(s) == 4
    assert s.seen_before(hs).tolist() == [True, True, True, False, True, True]
    assert not s.add_if_new(7, False) and s.add_if_new(8, False)


def test_minhash_near_duplicates():
    a, b = dedup.minhash_params(64)
    base = "传染病是指由病原微生物感染人体后产生的有传染性、在一定条件下可造成流行的疾病。" * 3
    near_copy = base.replace("流行", "流形", 1)
    other = "混沌未分天地乱，茫茫渺渺无人见。自从盘古破鸿蒙，开辟从兹清浊辨。覆载群生仰至仁，发明万物皆成善。"
    sig = [dedup.minhash_signature(t, a, b) for t in (base, near_copy, other)]
    assert sig[0].shape == (64,) and sig[0].dtype == np.uint32
    assert (sig[0] == sig[1]).mean() > 0.7 and (sig[0] == sig[2]).mean() < 0.1
    idx = dedup.NearDupIndex(8)
    assert [idx.add_if_new(s) for s in sig] == [True, False, True]


def test_uint16_guard():
    assert dp.to_uint16(np.array([0, 2, 64792]), 64793).tolist() == [0, 2, 64792]
    with pytest.raises(dp.DataError, match="token id 64793 .*vocabulary"):
        dp.to_uint16(np.array([5, 64793]), 64793)
    with pytest.raises(dp.DataError, match="token id 70000"):
        dp.to_uint16(np.array([70000]), 64793)


# ---------------------------------------------------------------- SFT (no tokenizer)

def test_sft_each_format(tmp_path):
    out = tmp_path / "sft"
    s = dp.main(["sft", "--inputs=" + ",".join(os.path.join(SFT, f) for f in SFT_FILES), f"--out_dir={out}",
                 "--val_fraction=0", "--val_min_records=2"])[0]
    assert s["counts"] == {"read": 11, "duplicate": 1, "empty_or_short": 1, "bad_missing_field": 1,  # sharegpt.jsonl:
                           "dropped_first_assistant": 1, "dropped_last_user": 2}  # [gpt, human] skipped, 1 turn cut
    rows = {split: [json.loads(l) for l in open(out / f"{split}.jsonl", encoding="utf-8")] for split in ("train", "val")}
    assert len(rows["train"]) == 7 and len(rows["val"]) == 2
    u, a = "user", "assistant"
    want = [
        ([(u, "给出三个保持健康的提示。"), (a, "1.饮食均衡。\n2.定期运动。\n3.充足睡眠。")], None, "alpaca.json"),
        ([(u, "把下面的句子翻译成英文。\n今天天气很好。"), (a, "The weather is nice today.")], None, "alpaca.json"),
        ([(u, "为给定的句子生成一个同义句。\n她在准备期末考试。"), (a, "她正在为期末考试做准备。")], None, "belle.json"),
        ([(u, "头痛怎么办？"), (a, "先休息，如果持续请就医。"), (u, "需要吃药吗？"), (a, "可以服用布洛芬。")], "你是一名医生。",
         "sharegpt.jsonl"),
        ([(u, "发烧了"), (a, "多喝水。")], None, "sharegpt.jsonl"),
        ([(u, "推荐一道家常菜。"), (a, "西红柿炒鸡蛋。"), (u, "谢谢"), (a, "不客气！")], None, "multiturn.json"),
        ([(u, "什么是肝硬化？"), (a, "一种慢性肝病，肝脏出现纤维化。")], None, "seed.csv"),
        ([(u, "逗号,在问题里"), (a, '回答里有"引号"。')], None, "seed.csv"),
        ([(u, "白带发黄怎么回事？"), (a, "可能是阴道炎，建议就医检查。")], None, "reward.jsonl"),
    ]
    # kept conversations #1 and #3 went to val (the min-records rule alternates), the rest to train: input order is
    got = [rows["train"][0], rows["val"][0], rows["train"][1], rows["val"][1]] + rows["train"][2:]
    for row, (turns, system, source) in zip(got, want):
        assert [(t["role"], t["content"]) for t in row["conversations"]] == turns
        assert row.get("system") == system and row["source"] == source
    side = json.load(open(out / "val.json"))
    assert side["format"] == dp.SFT_FORMAT and side["conversations"] == 2 and side["turns"] == 6
    assert json.load(open(out / "train.json"))["conversations"] == 7
    assert sorted(os.listdir(out)) == ["manifest.json", "train.json", "train.jsonl", "val.json", "val.jsonl"]


def test_sft_interrupted_leaves_no_output(tmp_path, monkeypatch):
    out = tmp_path / "sft"

    def boom(rec, fmt, stats=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(dp, "record_conversation", boom)
    with pytest.raises(KeyboardInterrupt):
        dp.main(["sft", f"--inputs={os.path.join(SFT, 'reward.jsonl')}", f"--out_dir={out}"])
    assert not out.exists() and no_temp_left(tmp_path)


# ---------------------------------------------------------------- pretrain end to end (real tokenizer)

def test_pretrain_end_to_end_exact(tmp_path, tokenizer_path):
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=tokenizer_path)
    out = tmp_path / "pre"
    s = dp_run_pretrain(out, "--num_workers=2", "--chunk_chars=40")  # many tiny tasks over 2 workers, order must hold
    assert s["counts"] == {"read": 12, "too_short": 1, "duplicate": 1, "bad_malformed": 1, "bad_missing_field": 2}
    docs, sides = read_docs(out)
    # val_min_tokens=1: the 2nd kept document is the only val document
    assert docs["val"] == [sp.encode(EXPECTED_DOCS[1])]
    assert docs["train"] == [sp.encode(d) for d in EXPECTED_DOCS[:1] + EXPECTED_DOCS[2:]]
    assert [sp.decode(d) for d in docs["train"]] == EXPECTED_DOCS[:1] + EXPECTED_DOCS[2:]  # decode round trip
    side = sides["train_00000.bin"]
    with open(tokenizer_path, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    assert {k: side[k] for k in ("format", "split", "dtype", "vocab_size", "eos_id", "tokenizer_sha256", "documents")} == \
        {"format": "baby-llama2-chinese/tokens-v1", "split": "train", "dtype": "uint16", "vocab_size": 64793, "eos_id": 2,
         "tokenizer_sha256": sha, "documents": 9}
    assert side["tokens"] == os.path.getsize(out / "train_00000.bin") // 2 == sum(len(d) + 1 for d in docs["train"])
    assert side["sources"] == sorted(PRE_FILES) and side["filters"]["dedup"] is True and side["filters"]["min_chars"] == 10
    assert sides["val_00000.bin"]["sources"] == ["wiki_array.json"]
    assert sorted(os.listdir(out)) == ["manifest.json"] + [f"{s}_00000.{e}" for s in ("train", "val") for e in ("bin", "json")]


def test_pretrain_shards_no_dedup_and_deterministic(tmp_path, tokenizer_path):
    a = dp_run_pretrain(tmp_path / "a", "--shard_tokens=30", "--dedup=false", "--min_chars=0", "--chunk_chars=1")
    assert a["counts"]["read"] == 12 and "duplicate" not in a["counts"] and "too_short" not in a["counts"]
    names = sorted(os.listdir(tmp_path / "a"))
    bins = [n for n in names if n.startswith("train") and n.endswith(".bin")]
    assert len(bins) > 2 and all(n[:-4] + ".json" in names for n in bins)
    docs, sides = read_docs(tmp_path / "a")
    assert sum(sides[b]["documents"] for b in bins) == len(docs["train"]) == 11
    # default val split (fraction 0.005 + val_min_tokens 4096) is non-empty even for 12 documents
    s = dp.main(["pretrain", "--inputs=" + ",".join(os.path.join(PRE, f) for f in PRE_FILES), f"--out_dir={tmp_path / 'b'}",
                 "--progress=false", "--num_workers=2"])[0]
    assert s["documents"]["val"] >= 1 and s["documents"]["train"] >= 1
    # same output bytes with 1 and 2 workers (decisions are made in input order in the main process)
    dp_run_pretrain(tmp_path / "c", "--num_workers=1")
    dp_run_pretrain(tmp_path / "d", "--num_workers=2", "--chunk_chars=30")
    for name in ("train_00000.bin", "val_00000.bin"):
        assert (tmp_path / "c" / name).read_bytes() == (tmp_path / "d" / name).read_bytes()


def test_pretrain_minhash_option(tmp_path, tokenizer_path):
    doc = "传染病是指由病原微生物感染人体后产生的有传染性、在一定条件下可造成流行的疾病。" * 3
    p = tmp_path / "near.jsonl"
    p.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n"
                         for t in (doc, doc.replace("流行", "流形", 1), "混沌未分天地乱，茫茫渺渺无人见。")), encoding="utf-8")
    s = dp.main(["pretrain", f"--inputs={p}", f"--out_dir={tmp_path / 'o'}", "--progress=false", "--num_workers=1",
                 "--minhash"])[0]
    assert s["counts"].get("near_duplicate") == 1 and s["documents"]["train"] + s["documents"]["val"] == 2
    s = dp.main(["pretrain", f"--inputs={p}", f"--out_dir={tmp_path / 'o'}", "--progress=false", "--num_workers=1"])[0]
    assert "near_duplicate" not in s["counts"] and s["documents"]["train"] + s["documents"]["val"] == 3


def test_pretrain_interrupted_leaves_no_bin(tmp_path, tokenizer_path, monkeypatch):
    out = tmp_path / "pre"
    dp_run_pretrain(out)  # a complete earlier run
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}
    calls = []
    real = dp._place_chunk

    def fail_second(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(dp, "_place_chunk", fail_second)
    with pytest.raises(KeyboardInterrupt):
        dp_run_pretrain(out, "--chunk_chars=1", "--dedup=false", "--min_chars=0")
    assert len(calls) == 2
    # no temp files left, and the earlier complete output is untouched (no half-written .bin took its place)
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before and no_temp_left(tmp_path)
    fresh = tmp_path / "fresh"
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        dp_run_pretrain(fresh, "--chunk_chars=1")
    assert not fresh.exists() and no_temp_left(tmp_path)


class CodePointTokenizer:
    """Stands in for ChatGLMTokenizer: the ids of a text are its characters' code points minus 19900."""

    def encode(self, text):
        return [ord(c) - 19900 for c in text]

    def encode_batch(self, texts, num_threads=-1):
        return [self.encode(t) for t in texts]


def test_worker_output_layout_and_overflow_guard(monkeypatch):
    monkeypatch.setattr(dp, "_WORKER", {"tok": CodePointTokenizer(), "vocab_size": 64793, "seed": 0, "minhash": None})
    hashes, lengths, ids, sigs = dp.encode_chunk(["一丁", "七"])  # U+4E00 U+4E01, U+4E03
    assert lengths.tolist() == [3, 2] and ids.dtype == np.uint16 and sigs is None
    assert ids.tolist() == [68, 69, 2, 71, 2]
    assert hashes.tolist() == [dedup.text_hash("一丁"), dedup.text_hash("七")]
    with pytest.raises(dp.DataError, match="token id 64900 .*vocabulary"):
        dp.encode_chunk(["一\U00014b40"])  # 84800 - 19900 = 64900: fits uint16 but not the vocabulary
    with pytest.raises(dp.DataError, match="uint16"):
        dp.encode_chunk(["\U00016f00"])  # 93952 - 19900 = 74052 > 65535


def test_uint16_guard_in_worker(tokenizer_path):
    dp._worker_init(tokenizer_path, 1000, 0, 0)  # pretend the vocab were 1000: ids of Chinese text exceed it
    try:
        with pytest.raises(dp.DataError, match="vocabulary"):
            dp.encode_chunk(["长江是中国第一长河"])
    finally:
        dp._WORKER.clear()
    dp._worker_init(tokenizer_path, 64793, 0, 0)
    try:
        hashes, lengths, ids, sigs = dp.encode_chunk([WIKI_A, WIKI_B])
    finally:
        dp._WORKER.clear()
    assert lengths.tolist() == [len(ids) - lengths[1], lengths[1]] and ids.dtype == np.uint16
    assert ids[lengths[0] - 1] == 2 and ids[-1] == 2 and (ids == 2).sum() == 2 and sigs is None
    assert hashes.tolist() == [dedup.text_hash(WIKI_A), dedup.text_hash(WIKI_B)]


def test_default_run_on_sample_dir(tmp_path, tokenizer_path, monkeypatch):
    """`python data_process.py` with no flags: data/sample/{pretrain,sft}/* -> data/{pretrain,sft} (cwd-relative)."""
    for mode, names in (("pretrain", ["wiki_array.json", "plain.txt"]), ("sft", ["alpaca.json", "seed.csv"])):
        d = tmp_path / "data" / "sample" / mode
        d.mkdir(parents=True)
        for n in names:
            shutil.copy(os.path.join(FIX, mode, n), d / n)
        (d / "README.md").write_text("not data")
    monkeypatch.chdir(tmp_path)
    pre, sft = dp.main(["--num_workers=1", "--progress=false"])
    assert pre["documents"] == {"train": 2, "val": 2} and sft["conversations"] == {"train": 2, "val": 2}
    assert os.path.isfile("data/pretrain/train_00000.bin") and os.path.isfile("data/sft/val.jsonl")


def test_tokenizer_lookup_order_and_offline_error(tmp_path, monkeypatch):
    """--tokenizer, then $BABYLLAMA_TOKENIZER, then the package's copy, then the Hub; offline, the error is one line
    naming every way out."""
    import sys
    import types

    from chatglm_tokenizer import tokenizer as tk

    paths = {}
    for name in ("arg", "env", "local"):
        (tmp_path / name).mkdir()
        paths[name] = tmp_path / name / "tokenizer.model"
        paths[name].write_bytes(b"x")
    monkeypatch.setattr(tk, "LOCAL_PATH", str(paths["local"]))
    monkeypatch.setenv(tk.TOKENIZER_ENV, str(paths["env"]))
    assert tk.find_tokenizer(str(paths["arg"])) == str(paths["arg"])
    assert tk.find_tokenizer() == str(paths["env"])
    monkeypatch.delenv(tk.TOKENIZER_ENV)
    assert tk.find_tokenizer() == str(paths["local"])
    paths["local"].unlink()
    with pytest.raises(FileNotFoundError, match="no tokenizer.model"):
        tk.find_tokenizer(download=False)

    def offline(*args, **kwargs):
        raise OSError("Name or service not known\nsecond line")

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(hf_hub_download=offline))
    with pytest.raises(FileNotFoundError) as e:
        tk.find_tokenizer()
    assert "\n" not in str(e.value) and "--tokenizer PATH" in str(e.value)
    assert "THUDM/chatglm2-6b" in str(e.value) and str(e.value).endswith("Name or service not known)")

    def long_winded(*args, **kwargs):  # the Hub's own messages: several sentences on one line
        raise OSError("An error happened while trying to locate the file on the Hub. " * 4)

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(hf_hub_download=long_winded))
    with pytest.raises(FileNotFoundError) as e:
        tk.find_tokenizer()
    sentence = "An error happened while trying to locate the file on the Hub."  # 62 characters: two fit in 160
    assert str(e.value).endswith(f"failed: {sentence} {sentence})")


def test_hf_inputs_are_fetched_before_any_output(tmp_path, monkeypatch, capsys):
    """hf://datasets/OWNER/NAME/FILE[:format] goes through huggingface_hub (a stand-in here: this machine has no route
    to the Hub) and then reads as the local file would; a failed download stops before the output folder exists."""
    import sys
    import types

    calls = []

    def fake_download(repo_id, filename, repo_type=None, local_dir=None):
        calls.append((repo_id, filename, repo_type))
        return os.path.join(PRE, "wiki_array.json")

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(hf_hub_download=fake_download))
    monkeypatch.setattr("babyllama.hub.hub_reachable", lambda: True)  # the stand-in is the Hub
    url = "hf://datasets/pleisto/wikipedia-cn-20230720-filtered/sub/dir/wikipedia-cn-20230720-filtered.json"
    c = dp_cfg(mode="pretrain", inputs=[url, f"{url}:text"])
    assert parse_inputs(c) == [(os.path.join(PRE, "wiki_array.json"), ""),
                                              (os.path.join(PRE, "wiki_array.json"), "text")]
    assert calls == [("pleisto/wikipedia-cn-20230720-filtered", "sub/dir/wikipedia-cn-20230720-filtered.json", "dataset")] * 2
    manifest = tmp_path / "list.txt"
    manifest.write_text(f"{url} completion\n", encoding="utf-8")  # not joined to the manifest's folder
    assert parse_inputs(dp_cfg(mode="pretrain", manifest=str(manifest))) == \
        [(os.path.join(PRE, "wiki_array.json"), "completion")]
    with pytest.raises(dp.DataError, match=r"^hf://datasets/pleisto: .*hf://datasets/OWNER/NAME/"):
        parse_inputs(dp_cfg(mode="pretrain", inputs=["hf://datasets/pleisto"]))

    def offline(*args, **kwargs):
        raise OSError("Name or service not known\nmore detail")

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(hf_hub_download=offline))
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as e:
        dp.main(["pretrain", f"--inputs={os.path.join(PRE, 'baike.jsonl')},{url}", f"--out_dir={out}", "--progress=false"])
    assert e.value.code == 2 and not out.exists()
    err = capsys.readouterr().err
    assert err.startswith(f"error: {url}: ") and "download failed" in err and "Name or service not known" in err
    assert err.count("\n") == 1

