"""dataset_sft.py: the template, the one shift, truncation, and the three batch modes.

Most tests use FakeTokenizer (one id per character), so they need no tokenizer.model:
    python -m pytest tests/test_dataset_sft.py -q
"""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from babyllama.errors import DataError
from chatglm_tokenizer.template import render, render_prompt
from dataset_sft import Batching, SFTData, SFTSamples, make_example, truncate
from model import segment_mask


class FakeTokenizer:
    """One id per character (ord + 10), the real tokenizer's special ids: pad 0, bos 1, eos 2."""
    pad_id, bos_id, eos_id = 0, 1, 2

    def encode(self, text, bos=False, eos=False):
        return [self.bos_id] * bos + [ord(c) + 10 for c in text] + [self.eos_id] * eos

    def encode_batch(self, texts, num_threads=-1):
        return [self.encode(t) for t in texts]


TOK = FakeTokenizer()


def conv(*turns):
    return [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]


def enc(text):
    return TOK.encode(text)


def records(n, seed=0, max_len=25):
    """n single-turn conversations of 6..54 ids; each question names its index, so rows are identifiable."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        q = f"q{i:03d}" + "x" * int(rng.integers(0, max_len))
        a = "a" * int(rng.integers(1, max_len))
        out.append({"conversations": conv(q, a)})
    return out


def sample_of_row(x_row):
    """The sample index written in a row's question (q%03d at its start)."""
    text = "".join(chr(int(t) - 10) for t in x_row[1:4])
    return int(text)


# ---- template ------------------------------------------------------------------------------------

def test_two_turn_supervised_ids_are_answers_and_eos():
    ids, sup = render(TOK, conv("hi", "hello", "how?", "fine"))
    supervised = [t for t, s in zip(ids, sup) if s]
    assert supervised == enc("hello") + [2] + enc("fine") + [2]
    assert ids == enc("hi") + [1] + enc("hello") + [2] + enc("how?") + [1] + enc("fine") + [2]


def test_system_text_is_prefix_and_unsupervised():
    ids, sup = render(TOK, conv("q", "a"), system="be kind")
    n = len(enc("be kind\n"))
    assert ids[:n] == enc("be kind\n")
    assert not any(sup[:n + 2])  # system, question, <bos>
    assert sup[n + 2:] == [True, True]  # "a" and <eos>


def test_render_prompt_ends_with_bos_and_is_renders_prefix():
    c = conv("first q", "first a", "second q", "second a")
    for system in (None, "sys"):
        ids, _ = render(TOK, c, system=system)
        prompt = render_prompt(TOK, c[:2], "second q", system=system)
        assert prompt[-1] == TOK.bos_id
        assert prompt == ids[:len(prompt)]
        assert ids[len(prompt):] == enc("second a") + [2]


def test_render_prompt_max_len_drops_oldest_turn_first():
    history = conv("old q", "old a", "mid q", "mid a")
    full = render_prompt(TOK, history, "now", system="S")
    cut = render_prompt(TOK, history, "now", system="S", max_len=len(full) - 1)
    # the "old" turn (q <bos> a <eos> = 13 ids) went, the system text and the rest stay
    assert cut == enc("S\n") + enc("mid q") + [1] + enc("mid a") + [2] + enc("now") + [1]
    tiny = render_prompt(TOK, history, "question", max_len=4)
    assert tiny == enc("ion") + [1]


def test_bad_conversation_is_rejected():
    with pytest.raises(DataError):
        render(TOK, conv("only a question"))
    with pytest.raises(DataError):
        render(TOK, [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}])


# ---- the shift -----------------------------------------------------------------------------------

def test_shift_alignment():
    ids = [50, 51, 1, 60, 61, 2]
    sup = [False, False, False, True, True, True]
    x, y = make_example(ids, sup, max_seq_len=5)
    assert x.tolist() == [50, 51, 1, 60, 61]
    assert y.tolist() == [-1, -1, 60, 61, 2]
    with pytest.raises(ValueError):
        make_example(ids, sup, max_seq_len=4)  # 6 ids need T >= 5


def test_shift_multi_turn_never_targets_the_next_question():
    ids, sup = render(TOK, conv("ab", "c", "de", "f"))
    x, y = make_example(ids, sup, len(ids) - 1)
    targets = [(int(x[t]), int(y[t])) for t in range(len(y)) if y[t] != -1]
    # (input, target): <bos>->c, c-><eos>, <bos>->f, f-><eos>
    assert targets == [(1, enc("c")[0]), (enc("c")[0], 2), (1, enc("f")[0]), (enc("f")[0], 2)]


# ---- truncation ----------------------------------------------------------------------------------

def test_truncation_cuts_prompt_start_and_keeps_answer():
    ids, sup = render(TOK, conv("0123456789", "ans"))  # 10 + 1 + 3 + 1 = 15 ids
    out, osup, status = truncate(ids, sup, max_seq_len=9)  # room for 10 ids
    assert status == "truncated" and len(out) == 10
    assert out == enc("56789") + [1] + enc("ans") + [2]
    assert [t for t, s in zip(out, osup) if s] == enc("ans") + [2]


def test_truncation_drops_oldest_turn_keeps_system():
    ids, sup = render(TOK, conv("q1", "a1", "q2", "a2"), system="S")
    n_sys = len(enc("S\n"))
    out, osup, status = truncate(ids, sup, max_seq_len=len(ids) - 2, n_system=n_sys)
    assert status == "truncated"
    assert out == enc("S\n") + enc("q2") + [1] + enc("a2") + [2]
    assert [t for t, s in zip(out, osup) if s] == enc("a2") + [2]


def test_sample_with_no_room_for_its_answer_is_dropped_and_counted():
    ids, sup = render(TOK, conv("q", "a long answer"))
    assert truncate(ids, sup, max_seq_len=8)[2] == "dropped"  # <bos> + 13 + <eos> > 9
    recs = [{"conversations": conv("q", "a long answer")}, {"conversations": conv("question", "ok")},
            {"conversations": conv("q", "short")}]
    data = SFTData(SFTSamples(recs, TOK, 8), Batching(batch_size=1))
    assert data.samples.counts["dropped"] == 1 and data.samples.counts["truncated"] == 1 and len(data) == 2
    assert data.samples.counts["conversations"] == 3


# ---- loading -------------------------------------------------------------------------------------

def test_jsonl_loading_counts_and_storage(tmp_path):
    recs = records(20) + [{"conversations": conv("x", "y"), "system": "sys", "source": "f"}]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    data = SFTData(SFTSamples(str(path), TOK, 128), Batching(batch_size=4))
    assert len(data) == 21 and data.samples.tokens.dtype == np.uint16
    ids, sup = data.samples.sample(20)
    want_ids, want_sup = render(TOK, conv("x", "y"), system="sys")
    assert ids.tolist() == want_ids and sup.tolist() == want_sup
    rendered = [render(TOK, r["conversations"], r.get("system")) for r in recs]
    assert data.samples.counts["tokens"] == sum(len(i) for i, _ in rendered)
    assert data.samples.counts["supervised"] == sum(sum(s) for _, s in rendered)
    assert "21 samples" in data.describe()


def test_bad_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"conversations": conv("q", "a")}) + "\n"
                    + json.dumps({"conversations": conv("q")}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl:2: .*assistant"):
        SFTData(SFTSamples(str(path), TOK, 16), Batching(batch_size=1))


# ---- batches -------------------------------------------------------------------------------------

def test_dynamic_batches_pad_to_longest_and_group_lengths():
    data = SFTData(SFTSamples(records(64), TOK, 128), Batching(batch_size=8, group=8))  # one mega-batch = all samples
    spans = []
    for step in range(data.epoch_batches()):
        x, y = data.batch(step, 0)
        lens = [len(make_example(*data.samples.sample(sample_of_row(row)), 128)[0]) for row in x]
        assert x.shape[1] == max(lens)  # padded to the longest, no further
        for r, n in enumerate(lens):
            assert (x[r, n:] == 0).all() and (y[r, n:] == -1).all()
        spans.append((min(lens), max(lens)))
    # length-grouped: with one mega-batch, batches are disjoint runs of the sorted lengths
    spans.sort()
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    fixed = data.with_mode("fixed")
    assert fixed.batch(0, 0)[0].shape == (8, 128)
    assert data.nonpad_fraction() > 0.9 > 0.5 > fixed.nonpad_fraction()


def test_batches_are_deterministic_and_ranks_disjoint():
    recs = records(48)
    a = SFTData(SFTSamples(recs, TOK, 64), Batching(batch_size=4, seed=3, grad_accum=2))
    b = SFTData(SFTSamples(recs, TOK, 64), Batching(batch_size=4, seed=3, grad_accum=2))
    for step, micro in [(0, 0), (0, 1), (5, 1), (2, 0), (40, 1)]:  # any order, past the first epoch too
        for ta, tb in zip(a.batch(step, micro), b.batch(step, micro)):
            assert torch.equal(ta, tb)
    assert not torch.equal(a.batch(0, 0)[0][:, :4], a.batch(0, 1)[0][:, :4])
    other_seed = SFTData(SFTSamples(recs, TOK, 64), Batching(batch_size=4, seed=4, grad_accum=2))
    assert not torch.equal(a.batch(0, 0)[0][:, :4], other_seed.batch(0, 0)[0][:, :4])

    # 2 ranks x 2 accum steps for 3 steps = one epoch of 12 batches: every sample once, no overlap
    ranks = [SFTData(SFTSamples(recs, TOK, 64), Batching(batch_size=4, seed=3, rank=r, world_size=2, grad_accum=2))
             for r in range(2)]
    seen = {0: [], 1: []}
    for step in range(3):
        for micro in range(2):
            for r, src in enumerate(ranks):
                seen[r] += [sample_of_row(row) for row in src.batch(step, micro)[0]]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(48))
    # ... and the same batches a single process with 4 accum steps reads
    single = SFTData(SFTSamples(recs, TOK, 64), Batching(batch_size=4, seed=3, grad_accum=4))
    assert torch.equal(single.batch(1, 3)[0], ranks[1].batch(1, 1)[0])


def test_packed_rows_hold_whole_samples_and_mask_blocks_them():
    data = SFTData(SFTSamples(records(60), TOK, 64), Batching(batch_size=4, mode="packed"))
    x, y, seg = data.batch(0, 0)
    assert x.shape == y.shape == seg.shape == (4, 64)
    assert (seg.max(dim=1).values >= 2).all()  # rows really hold several samples
    for r in range(4):
        for j in range(1, int(seg[r].max()) + 1):
            cols = (seg[r] == j).nonzero().flatten()
            assert cols.tolist() == list(range(int(cols[0]), int(cols[-1]) + 1))  # contiguous
            ex_x, ex_y = make_example(*data.samples.sample(sample_of_row(x[r, cols])), 64)
            assert x[r, cols].tolist() == ex_x.tolist() and y[r, cols].tolist() == ex_y.tolist()
        pad = seg[r] == 0
        assert (x[r][pad] == 0).all() and (y[r][pad] == -1).all()
    st = data.padding_stats(3)
    got_nonpad = sum((data.batch(k, 0)[2] > 0).sum().item() for k in range(3)) / (3 * 4 * 64)
    got_sup = sum((data.batch(k, 0)[1] != -1).sum().item() for k in range(3)) / (3 * 4 * 64)
    assert st["nonpad"] == pytest.approx(got_nonpad) and st["supervised"] == pytest.approx(got_sup)
    assert st["nonpad"] > 0.9


def test_segment_mask_blocks_cross_sample_attention():
    seg = torch.tensor([[1, 1, 1, 2, 2, 0]])
    m = segment_mask(seg)
    assert m.shape == (1, 1, 6, 6) and m.dtype == torch.bool
    want = torch.tensor([[1, 0, 0, 0, 0, 0],
                         [1, 1, 0, 0, 0, 0],
                         [1, 1, 1, 0, 0, 0],
                         [0, 0, 0, 1, 0, 0],
                         [0, 0, 0, 1, 1, 0],
                         [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(m[0, 0], want)
    # with SDPA: changing sample 1 leaves sample 2's outputs unchanged, and sample 2 alone gives the same
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 8, generator=g) for _ in range(3))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, :3] += 5.0
    v2[:, :, :3] -= 3.0
    out2 = F.scaled_dot_product_attention(q, k2, v2, attn_mask=m)
    assert torch.allclose(out[:, :, 3:5], out2[:, :, 3:5], atol=1e-6)
    assert not torch.allclose(out[:, :, :3], out2[:, :, :3])
    alone = F.scaled_dot_product_attention(q[:, :, 3:5], k[:, :, 3:5], v[:, :, 3:5], is_causal=True)
    assert torch.allclose(out[:, :, 3:5], alone, atol=1e-6)
    assert not torch.isnan(out).any()


def test_eval_batches_cover_every_sample_once_across_ranks():
    recs = records(10)
    seen = []
    for r in range(2):
        src = SFTData(SFTSamples(recs, TOK, 64), Batching(batch_size=3, rank=r, world_size=2, mode="packed"))
        for x, y in src.eval_batches():
            seen += [sample_of_row(row) for row in x]
    assert sorted(seen) == list(range(10))


def test_real_tokenizer_two_turns_and_prompt(tokenizer_path):
    from chatglm_tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    c = conv("你好", "您好", "头疼怎么办", "多休息，多喝水。")
    ids, sup = render(tok, c, system="你是医生")
    assert [t for t, s in zip(ids, sup) if s] == tok.encode("您好") + [2] + tok.encode("多休息，多喝水。") + [2]
    prompt = render_prompt(tok, c[:2], "头疼怎么办", system="你是医生")
    assert prompt[-1] == 1 and ids[:len(prompt)] == prompt
    assert tok.decode(ids[len(prompt):-1]) == "多休息，多喝水。"


def test_too_few_samples_for_a_batch_fail_only_when_batched():
    data = SFTData(SFTSamples(records(3), TOK, 64), Batching(batch_size=4, mode="packed"))  # 3 samples fill 1 row < 4 rows
    assert "too few" in data.describe()  # a small val split in packed mode must still build (sft.py evaluates it)
    assert sum(x.shape[0] for x, _ in data.eval_batches()) == 3
    with pytest.raises(DataError, match="no full batch"):
        data.batch(0, 0)


def test_conversations_cut_at_a_short_context_are_counted_with_a_hint():
    short = SFTData(SFTSamples(records(20), TOK, 12), Batching(batch_size=2))
    c = short.samples.counts
    assert c["dropped"] + c["truncated"] >= 1, c
    n = c["conversations"]
    said = short.describe()
    assert f"{c['dropped']:,} dropped, {c['truncated']:,} truncated" in said
    assert f"{c['dropped'] / n:.0%} and {c['truncated'] / n:.0%}" in said and "12 tokens" in said
    roomy = SFTData(SFTSamples(records(20), TOK, 128), Batching(batch_size=2))
    assert roomy.samples.counts["dropped"] + roomy.samples.counts["truncated"] == 0
    assert "do not fit" not in roomy.describe()


# ---- the SFT mix ---------------------------------------------------------------------------------

def sourced(n_a, n_b):
    """n_a conversations from medical-qa.jsonl and n_b from alpaca.json, each answer naming its index."""
    return ([{"conversations": conv("q", f"a{i}"), "source": "medical-qa.jsonl"} for i in range(n_a)]
            + [{"conversations": conv("q", f"b{i}"), "source": "alpaca.json"} for i in range(n_b)])


def test_mix_parses_and_rejects_malformed_parts():
    from dataset_sft import parse_mix
    assert parse_mix("") == [] and parse_mix("medical=3, alpaca=0") == [("medical", 3), ("alpaca", 0)]
    for bad in ("medical", "medical=x", "=3", "medical=-1", "medical=1.5", "medical=101"):
        with pytest.raises(ValueError, match="NAME=TIMES"):
            parse_mix(bad)


def test_mix_repeats_sources_per_epoch_and_empty_mix_changes_nothing():
    from dataset_sft import mix_repeats
    samples = SFTSamples(sourced(6, 10), TOK, 16)
    assert samples.source_names == ["alpaca.json", "medical-qa.jsonl"]
    assert mix_repeats(samples, "") is None
    reps = mix_repeats(samples, "medical=3")
    assert reps.tolist() == [3] * 6 + [1] * 10
    # fixed mode, one batch of 28 = the whole mixed epoch: every medical sample 3 times, every other once
    data = SFTData(samples, Batching(batch_size=28, mode="fixed"), reps)
    assert data.epoch_batches() == 1
    rows = [bytes(int(t) - 10 for t in row if t > 10).decode() for row in data.batch(0, 0)[0]]
    answers = sorted(r[1:] for r in rows)  # "q" + answer
    assert answers == sorted([f"a{i}" for i in range(6)] * 3 + [f"b{i}" for i in range(10)])
    # all ones = no mix: the very same batches (so an empty mix reproduces earlier runs)
    plain = SFTData(samples, Batching(batch_size=4, seed=1))
    ones = SFTData(samples, Batching(batch_size=4, seed=1), np.ones(16, dtype=np.int64))
    for step in range(6):
        assert torch.equal(plain.batch(step, 0)[0], ones.batch(step, 0)[0])
    # 0 drops a source; the first matching part wins
    assert mix_repeats(samples, "alpaca=0").tolist() == [1] * 6 + [0] * 10
    assert mix_repeats(samples, "medical-qa=2,medical=5").tolist() == [2] * 6 + [1] * 10


def test_mix_errors_name_the_sources():
    from dataset_sft import mix_repeats
    samples = SFTSamples(sourced(2, 2), TOK, 16)
    with pytest.raises(DataError, match=r"'belle'.*alpaca\.json, medical-qa\.jsonl"):
        mix_repeats(samples, "belle=2")
    with pytest.raises(DataError, match="no conversation"):
        mix_repeats(samples, "medical=0,alpaca=0")
