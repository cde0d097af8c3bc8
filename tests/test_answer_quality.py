"""Stock-answer metrics (babyllama/quality.answer_quality) on hand-made answers, and their table on the report card."""
import pytest

import report
from babyllama import quality


def test_duplicate_share_counts_every_copy_after_removing_whitespace():
    answers = ["多喝水，多休息。", "多喝水， 多休息。", "去医院检查。", "多喝水，多休息。", "去医院 检查一下。", "", ""]
    # three copies of the first (one with a space), two empty answers; "去医院检查。" is alone
    assert quality.duplicate_share(answers) == pytest.approx(5 / 7)
    assert quality.duplicate_share(["一", "二", "三"]) == 0.0
    assert quality.duplicate_share([]) == 0.0


def test_openings_are_the_first_12_characters():
    same_start = "你好，根据你的描述考虑是感冒"  # 14 characters: the first 12 are "你好，根据你的描述考虑是"
    answers = [same_start + "，多喝水。", same_start + "引起的。", "你好，根据 你的描述考虑是胃炎。", "多休息。", "多休息。好"]
    n, top = quality.openings(answers)
    assert n == 3  # "你好，根据你的描述考虑是" (3 answers, whitespace ignored), "多休息。", "多休息。好"
    assert top == pytest.approx(3 / 5)
    assert quality.openings(["一二三", "一二"], chars=2) == (1, 1.0)  # a short answer's opening is the whole answer


def test_distinct_2_counts_bigrams_inside_each_answer():
    # "头痛头痛": 头痛 痛头 头痛 (3 bigrams, 2 distinct); "头痛": 头痛 (1); "好": none; no bigram across answers
    assert quality.distinct_2(["头痛头痛", "头 痛", "好"]) == pytest.approx(2 / 4)
    assert quality.distinct_2(["一二三", "四五六"]) == 1.0
    assert quality.distinct_2(["好", ""]) == 0.0


def test_cjk_bigrams_pair_adjacent_chinese_characters_only():
    assert quality.cjk_bigrams("头痛怎么办？") == {"头痛", "痛怎", "怎么", "么办"}
    assert quality.cjk_bigrams("乙肝 HBV 阳性，大三阳") == {"乙肝", "阳性", "大三", "三阳"}  # Latin and "，" break pairs
    assert quality.cjk_bigrams("头 痛") == {"头痛"}  # whitespace removed first
    assert quality.cjk_bigrams("abc123") == set()


def test_question_overlap_needs_three_distinct_shared_bigrams():
    q = "高血压患者能吃鸡蛋吗"  # bigrams 高血 血压 压患 患者 者能 能吃 吃鸡 鸡蛋 蛋吗
    answers = ["高血压患者可以吃鸡蛋。",  # 高血 血压 压患 患者 鸡蛋: 5 shared
               "高血压高血压，鸡蛋。",  # 高血 血压 鸡蛋: exactly 3 (each counted once however often it comes)
               "血压高，可以吃鸡蛋。",  # 血压 鸡蛋 (and 吃鸡): 3
               "高血压要少吃盐。",  # 高血 血压: 2
               "多喝水。"]
    assert [quality.question_overlap([q], [a]) for a in answers] == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert quality.question_overlap([q] * 5, answers) == pytest.approx(3 / 5)
    assert quality.question_overlap([q], ["高血压"], min_shared=2) == 1.0
    with pytest.raises(ValueError):
        quality.question_overlap([q], answers)


def test_answer_quality_of_stock_answers_against_varied_ones():
    questions = ["感冒发烧怎么办", "孩子咳嗽怎么办", "胃痛吃什么药"]
    stock = quality.answer_quality([quality.FIXED_ANSWER] * 3, questions)
    varied = quality.answer_quality(["感冒发烧要多喝水，发烧超过三天去医院。", "孩子咳嗽可以先观察，咳嗽加重看儿科。",
                                     "胃痛吃什么药要看原因，胃痛反复要做胃镜。"], questions)
    assert stock == {"duplicate": 1.0, "openings": 1, "top_opening": 1.0,
                     "distinct2": pytest.approx(quality.distinct_2([quality.FIXED_ANSWER] * 3)),
                     "question_overlap": 0.0}
    assert varied["duplicate"] == 0.0 and varied["openings"] == 3 and varied["top_opening"] == pytest.approx(1 / 3)
    assert varied["question_overlap"] == 1.0 and varied["distinct2"] > stock["distinct2"]


def card(baselines: bool = True) -> dict:
    """The report.json fields answers_table reads: the model, the original protocol, baselines, the references."""
    stock = dict(duplicate=0.25, openings=3, top_opening=0.5, distinct2=0.3, question_overlap=0.75)
    scores = dict(stock, bleu4=3.5, sacrebleu_zh=10.25, degenerate=0.0, answer_chars=110.0, reference_chars=100.0)
    return {"eval": {"scores": scores, "decoding": "beam search, 8 beams, length_penalty 1.0",
                     "baselines": {"retrieval": dict(stock, bleu4=2.5, sacrebleu_zh=8.0, answer_chars=90.0, duplicate=0.0),
                                   "fixed": {"bleu4": 0.5, "sacrebleu_zh": 1.0, "answer_chars": 50.0}} if baselines else {},
                     "references": dict(stock, duplicate=0.0, openings=4, answer_chars=100.0)},
            "eval_original": {"scores": dict(scores, bleu4=1.25, degenerate=0.5)}}


def test_card_answers_table_has_a_row_per_answer_source_and_the_references():
    rows = report.answers_table(card())
    assert rows[0].count("|") == 10 and "identical to another" in rows[0] and "question overlap" in rows[0]
    assert rows[2] == "| **the model**, beam search | 3.50 | 10.25 | 0.0% | 1.10x | 25.0% | 3 (50.0%) | 0.300 | 75.0% |"
    assert rows[3].startswith("| the model, original protocol") and "| 1.25 | 10.25 | 50.0% |" in rows[3]
    # eval.py's default decoding is named by what it does, not as plain beam search
    default = ("beam search, the first 8 tokens sampled at temperature 0.8, top_k off, top_p 0.9, then 8 beams, "
               "length_penalty 1.0, no_repeat_ngram 3, max_new_tokens 256, 4 starts per question, one kept by "
               "mbr_question, stop at <eos>, seed 1337, batch 273, KV cache on")
    assert report.decoding_label(default) == "4 sampled starts x 8 beams, one kept"
    # the label reads the protocol string eval.py writes: Sampling.describe() of its default config, as it is now
    from eval import EvalConfig
    assert report.decoding_label(EvalConfig().describe()) == "4 sampled starts x 8 beams, one kept"
    assert report.decoding_label("greedy, no_repeat_ngram 3") == "greedy"
    assert rows[4].startswith("| baseline, retrieval")
    assert rows[4].endswith("| 2.50 | 8.00 |  | 0.90x | 0.0% | 3 (50.0%) | 0.300 | 75.0% |")
    # an eval report from before the stock metrics: those cells stay empty
    assert rows[5].startswith("| baseline, fixed") and rows[5].endswith("| 0.50 | 1.00 |  | 0.50x |  |  |  |  |")
    assert rows[6] == "| the reference answers themselves |  |  |  | 1.00x | 0.0% | 4 (50.0%) | 0.300 | 75.0% |"
    assert len(rows) == 7 and len(report.answers_table(card(baselines=False))) == 5
