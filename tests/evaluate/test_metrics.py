"""The answer metrics against the reference libraries (nltk, rouge-chinese, jieba, sacrebleu) and values
checked by hand."""
from __future__ import annotations

import doctest

import jieba
import pytest
import sacrebleu
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from rouge_chinese import Rouge

from medtune.evaluate import metrics
from medtune.evaluate.metrics import (corpus_bleu, distinct_n, length_stats, repetition_n, similarity,
                                      similarity_scores)

# (prediction, reference): answers the tests write themselves, in the dataset's style, plus edge cases.
PAIRS = [
    ("高血压患者要低盐饮食，规律服用降压药，定期监测血压。",
     "高血压患者应低盐低脂饮食，遵医嘱规律服药，每天监测血压，如有头晕加重及时就医。"),
    ("您好，乙肝小三阳一般不需要抗病毒治疗，建议定期复查肝功能和乙肝病毒DNA。",
     "乙肝小三阳患者如果肝功能正常、病毒复制不活跃，可以暂不治疗，但要每半年复查一次肝功能、HBV-DNA和肝脏B超。"),
    ("胃痛可能是胃炎引起的，建议做胃镜检查。",
     "根据你的描述，考虑慢性胃炎的可能性大，建议到医院消化科做胃镜检查，明确诊断后对症治疗，平时饮食清淡，忌辛辣。"),
    ("头晕头痛", "偏头痛发作时应在安静、光线较暗的环境休息，可以口服布洛芬止痛；如果头痛剧烈伴呕吐，要及时就医。"),
    ("", "糖尿病患者要控制饮食，适当运动。"),              # empty answer: ROUGE 0 (LLaMA-Factory), BLEU 0
    ("   \n", "糖尿病患者要控制饮食，适当运动。"),          # whitespace only: no jieba word either
    ("糖尿病患者要控制饮食，适当运动。", "糖尿病患者要控制饮食，适当运动。"),  # identical
]


def reference_protocol(pred: str, label: str) -> dict[str, float]:
    """LLaMA-Factory's ComputeSimilarity (src/llamafactory/train/sft/metric.py) for one pair, written out."""
    hypothesis, reference = list(jieba.cut(pred)), list(jieba.cut(label))
    if len(" ".join(hypothesis).split()) == 0 or len(" ".join(reference).split()) == 0:
        result = {"rouge-1": {"f": 0.0}, "rouge-2": {"f": 0.0}, "rouge-l": {"f": 0.0}}
    else:
        result = Rouge().get_scores(" ".join(hypothesis), " ".join(reference))[0]
    scores = {k: round(v["f"] * 100, 4) for k, v in result.items()}
    bleu = sentence_bleu([list(label)], list(pred), smoothing_function=SmoothingFunction().method3)
    scores["bleu-4"] = round(bleu * 100, 4)
    return scores


@pytest.mark.parametrize("pred,ref", PAIRS)
def test_similarity_matches_the_reference_protocol(pred, ref):
    assert similarity(pred, ref) == reference_protocol(pred, ref)


def test_similarity_scores_is_the_mean_over_answers():
    preds, refs = [p for p, _ in PAIRS], [r for _, r in PAIRS]
    expected = [reference_protocol(p, r) for p, r in PAIRS]
    got = similarity_scores(preds, refs)
    assert set(got) == {"bleu-4", "rouge-1", "rouge-2", "rouge-l"}
    for key in got:
        assert got[key] == pytest.approx(sum(e[key] for e in expected) / len(expected), abs=1e-9)
    # the fixtures span the range: not every answer scores 0 or 100
    assert 0 < got["bleu-4"] < 100 and 0 < got["rouge-l"] < 100


def test_hand_checked_values():
    # characters 甲乙丙丁戊 vs 甲乙丙丁己: n-gram precisions 4/5, 3/4, 2/3, 1/2; equal lengths, BP = 1
    bleu = (4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25 * 100
    assert similarity("甲乙丙丁戊", "甲乙丙丁己")["bleu-4"] == round(bleu, 4) == 66.874
    assert corpus_bleu(["甲乙丙丁戊"], ["甲乙丙丁己"]) == pytest.approx(bleu, abs=1e-6)
    # jieba words [高血压, 糖尿病] vs [高血压, 冠心病]: one of two unigrams shared, no bigram
    assert similarity("高血压 糖尿病", "高血压 冠心病") == {
        "bleu-4": pytest.approx(43.4721), "rouge-1": 50.0, "rouge-2": 0.0, "rouge-l": 50.0}
    assert similarity("糖尿病患者要控制饮食", "糖尿病患者要控制饮食") == {
        "bleu-4": 100.0, "rouge-1": 100.0, "rouge-2": 100.0, "rouge-l": 100.0}
    assert similarity("", "糖尿病患者要控制饮食") == {"bleu-4": 0.0, "rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}


def test_corpus_bleu_is_sacrebleu_with_the_chinese_tokeniser():
    preds, refs = [p for p, _ in PAIRS], [r for _, r in PAIRS]
    expected = sacrebleu.corpus_bleu(preds, [refs], tokenize="zh").score
    assert corpus_bleu(preds, refs) == pytest.approx(expected)
    # the 13a tokeniser would see each Chinese sentence as one or two "words": a different figure
    assert expected != pytest.approx(sacrebleu.corpus_bleu(preds, [refs]).score)


def test_mismatched_lengths_are_an_error():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        similarity_scores(["a", "b"], ["a"])


def test_distinct_and_repetition():
    assert distinct_n(["高血压高血压"], 1) == pytest.approx(3 / 6)
    assert distinct_n(["高血压", "高血糖"], 2) == pytest.approx(3 / 4)  # 高血 twice, 血压, 血糖
    assert distinct_n(["高 血\n压"], 2) == 1.0  # whitespace is not a character of the answer
    assert distinct_n(["", "a"], 2) == 0.0
    assert repetition_n("哈哈哈哈哈哈", 4) == pytest.approx(1 - 1 / 3)
    assert repetition_n("多喝水，多休息", 4) == 0.0
    assert repetition_n("短", 4) == 0.0


def test_length_stats():
    stats = length_stats(["一二三四", "一二", ""], ["一二三四五六", "一二三", "一二三"], ["stop", "length", "stop"])
    assert stats["mean_chars"] == pytest.approx(2.0)
    assert stats["ref_mean_chars"] == pytest.approx(4.0)
    assert stats["length_ratio"] == pytest.approx(0.5)
    assert stats["hit_limit"] == pytest.approx(1 / 3)
    assert stats["empty"] == pytest.approx(1 / 3)
    assert stats["distinct-1"] == pytest.approx(4 / 6)
    bare = length_stats(["一二"])
    assert bare["hit_limit"] is None and bare["length_ratio"] is None


def test_module_example_is_right():
    result = doctest.testmod(metrics)
    assert result.attempted >= 1 and result.failed == 0
