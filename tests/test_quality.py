"""babyllama/quality.py: the degenerate-answer metric, answer length and the two model-free baselines on hand-made cases."""
import json

import pytest

from babyllama import bleu
from babyllama import quality


@pytest.mark.parametrize("text, loops", [
    ("乙肝病毒携带者，乙肝病毒携带者，乙肝病毒携带者，乙肝病毒携带者，", True),  # an 8-character span 4 times in a row
    ("头痛头痛头痛头痛", False),  # a 2-character span: too short to count as a loop however often it comes
    ("多喝水多休息" * 4, True),
    ("多喝水多休息" * 3, False),  # three times in a row is not yet a loop
    ("哈" * 16, True), ("哈" * 15, False),  # the span may be one character repeated: 4 x "哈哈哈哈" needs 16
    ("高血压是常见病，高血压要按时服药，高血压患者少吃盐，高血压患者多运动。", False),  # a recurring term, not a loop
    ("建议 到医院 检查。建议 到医院 检查。建议到医院检查。建议到医院检查。", True),  # whitespace is ignored
    ("", False),
])
def test_is_loop(text, loops):
    assert quality.is_loop(text) is loops


def test_degenerate_stats_counts_loops_and_cut_answers_once():
    answers = ["好的。", "你好" * 10, "建议多休息。" * 4, "正常的回答，没有重复。"]
    hit_limit = [False, True, True, False]  # the looping answer was also cut: counted once in "degenerate"
    s = quality.degenerate_stats(answers, hit_limit)
    assert s == {"loop": 0.5, "hit_limit": 0.5, "degenerate": 0.5}
    assert quality.degenerate_stats(["a"], [False]) == {"loop": 0.0, "hit_limit": 0.0, "degenerate": 0.0}
    with pytest.raises(ValueError):
        quality.degenerate_stats(["a", "b"], [False])


def test_length_stats_ignores_whitespace():
    s = quality.length_stats(["一二 三", "四五六七八九"], ["一二三四五六", "七八九十"])
    assert s == {"answer_chars": 4.5, "reference_chars": 5.0, "ratio": 0.9}


def test_retrieval_returns_the_answer_of_the_most_similar_question(tmp_path):
    convs = [
        [{"role": "user", "content": "高血压吃什么药好"}, {"role": "assistant", "content": "降压药要遵医嘱。"}],
        [{"role": "user", "content": "感冒发烧怎么办"}, {"role": "assistant", "content": "多喝水，必要时退烧。"},
         {"role": "user", "content": "孩子咳嗽怎么办"}, {"role": "assistant", "content": "看儿科。"}],
        [{"role": "user", "content": "糖尿病能吃西瓜吗"}, {"role": "assistant", "content": "少量可以。"}],
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"conversations": c}, ensure_ascii=False) + "\n" for c in convs), encoding="utf-8")
    pool = quality.qa_pairs(str(path))
    assert len(pool) == 4 and pool[2] == ("孩子咳嗽怎么办", "看儿科。")  # every user turn with the answer after it
    questions = ["我有高血压，吃什么药", "糖尿病人可以吃西瓜吗", "孩子一直咳嗽怎么办呢", "发烧感冒了怎么办"]
    assert quality.retrieve(questions, [q for q, _ in pool]) == [0, 3, 2, 1]
    b = quality.baseline_answers(questions, pool)
    assert b["retrieval"] == ["降压药要遵医嘱。", "少量可以。", "看儿科。", "多喝水，必要时退烧。"]
    assert b["fixed"] == [quality.FIXED_ANSWER] * 4


def test_retrieval_idf_prefers_the_rare_shared_gram():
    # both pool questions share one bigram with the query; the one sharing the rare bigram wins
    pool = ["请问怎么办", "请问怎么样", "请问是什么", "肝炎怎么样"]
    assert quality.retrieve(["肝炎怎么办"], pool) == [3]


@pytest.mark.parametrize("background", [False, True])
def test_baselines_scored_with_evals_protocol(tmp_path, background):
    convs = [[{"role": "user", "content": "头痛怎么办"}, {"role": "assistant", "content": "头痛可以先休息，必要时就医。"}]]
    pool = tmp_path / "train.jsonl"
    pool.write_text(json.dumps({"conversations": convs[0]}, ensure_ascii=False) + "\n", encoding="utf-8")
    records = [{"question": "头痛得厉害怎么办", "answer": "头痛可以先休息，必要时到医院就医。"}]
    # background (eval on a GPU): scored in a process of its own while the caller goes on; the same scores
    done = quality.start_baseline_scores([r["question"] for r in records], [r["answer"] for r in records],
                                         quality.qa_pairs(str(pool)), str(pool), background)
    got, seconds = done()
    assert got["retrieval"]["bleu4"] == pytest.approx(
        bleu.mean_sentence_bleu4([records[0]["answer"]], ["头痛可以先休息，必要时就医。"]))
    assert got["fixed"]["sacrebleu_zh"] == pytest.approx(
        bleu.corpus_sacrebleu([records[0]["answer"]], [quality.FIXED_ANSWER])[0])
    assert got["retrieval"]["bleu4"] > got["fixed"]["bleu4"] and got["retrieval"]["pool"] == str(pool)
    assert got["retrieval"]["duplicate"] == 0.0 and 0 <= got["fixed"]["question_overlap"] <= 1
    assert 0 <= seconds < 120
