"""Question-ranking relevance: the separation of real from shuffled answers on the shared sample, the
candidate draw, ties and the copy measure."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from medtune.evaluate.relevance import can_rank, draw_candidates, question_containment, question_key, relevance


@pytest.fixture(scope="module")
def test_split(prepared_sample_dir: Path) -> dict[str, list]:
    rows = pq.read_table(prepared_sample_dir / "test.parquet").to_pylist()
    return {"questions": [r["question"] for r in rows], "answers": [r["answer"] for r in rows],
            "groups": [r["sub_department"] or r["department"] for r in rows]}


def _derange(items: list, seed: int = 1) -> list:
    """Each item moved to another place: a random cycle through all positions."""
    order = np.random.default_rng(seed).permutation(len(items))
    out = list(items)
    for j, i in enumerate(order):
        out[i] = items[order[(j + 1) % len(order)]]
    return out


def test_reference_answers_find_their_question_and_shuffled_ones_do_not(test_split):
    q, a, g = test_split["questions"], test_split["answers"], test_split["groups"]
    assert len(q) > 300
    real = relevance(q, a, g)
    shuffled_answers = _derange(a)
    assert all(x != y for x, y in zip(shuffled_answers, a))
    shuffled = relevance(q, shuffled_answers, g, references=a)
    print(f"reference: top-1 {real.top1:.3f} MRR {real.mrr:.3f} copies {real.copy_share:.3f}; "
          f"shuffled: top-1 {shuffled.top1:.3f} MRR {shuffled.mrr:.3f}")
    assert real.candidates == shuffled.candidates == 20
    assert real.top1 >= 0.45  # measured 0.55 on this split
    assert shuffled.top1 <= 0.10  # chance is 1/20
    assert real.mrr > 0.55 > 0.25 > shuffled.mrr
    assert real.copy_share < 0.02


def test_copying_the_question_games_the_rank_and_is_reported(test_split):
    q, a, g = test_split["questions"], test_split["answers"], test_split["groups"]
    copied = relevance(q, q, g, references=a)
    assert copied.top1 == 1.0 and copied.copy_share == 1.0 and copied.top1_without_copies is None
    half = [qq + "。" + aa if i % 2 else aa for i, (qq, aa) in enumerate(zip(q, a))]
    mixed = relevance(q, half, g, references=a)
    assert mixed.copy_share == pytest.approx(sum(i % 2 for i in range(len(q))) / len(q), abs=0.01)
    assert mixed.top1_without_copies is not None and mixed.top1_without_copies < mixed.top1


def test_ties_count_as_a_random_order():
    questions = [f"问题{i}：{c}疼怎么办" for i, c in enumerate("头胃腰腿脚手牙")]
    empty = relevance(questions, [""] * len(questions))  # every candidate equally (not) similar
    k = empty.candidates
    assert k == len(questions)
    assert empty.top1 == pytest.approx(1 / k)
    assert empty.mrr == pytest.approx(sum(1 / r for r in range(1, k + 1)) / k)
    assert empty.ranks == [pytest.approx((k + 1) / 2)] * k


def test_candidates_come_from_the_same_group_where_possible():
    groups = ["肝病科"] * 30 + ["消化科"] * 30 + ["血液科"] * 5
    questions = [f"第{i}个问题" for i in range(len(groups))]
    cands = draw_candidates(questions, groups, 20, seed=0)
    assert cands.shape == (65, 20)
    assert (cands[:, 0] == np.arange(65)).all()
    assert all(len(set(row)) == 20 for row in cands.tolist())
    g = np.array(groups)
    assert (g[cands[:30]] == "肝病科").all() and (g[cands[30:60]] == "消化科").all()
    small = cands[60:]  # 血液科 has 4 others: all of them, then 15 from elsewhere
    assert ((g[small] == "血液科").sum(axis=1) == 5).all()
    assert (draw_candidates(questions, groups, 20, seed=0) == cands).all()
    assert (draw_candidates(questions, groups, 20, seed=1) != cands).any()


def test_a_question_asked_twice_is_never_its_own_distractor():
    questions = ["乙肝能治好吗？", "乙肝能治好吗", "肝硬化吃什么好", "脂肪肝怎么办", "转氨酶高怎么办"]
    cands = draw_candidates(questions, None, 20, seed=0)
    assert cands.shape == (5, 4)  # four different questions (punctuation ignored)
    assert 1 not in cands[0].tolist() and 0 not in cands[1].tolist()
    with pytest.raises(ValueError, match="at least 2 different questions"):
        draw_candidates(["头痛？", "头痛"], None)


def test_question_containment():
    assert question_containment("头痛怎么办", "头痛怎么办？多休息。") == 1.0
    assert question_containment("头痛怎么办", "可以吃布洛芬") == 0.0
    assert question_containment("头痛，怎么办", "头痛多休息") == pytest.approx(1 / 4)  # 头痛 of 头痛/痛怎/怎么/么办
    assert question_containment("痛", "痛") == 0.0


@pytest.mark.parametrize("questions", [
    ["头痛？", "头痛"], ["头痛？", "头痛。", " 头痛 "], ["头痛"], [], ["头痛", "头晕"], ["头痛？", "头痛", "胃痛"],
    ["乙肝能治好吗？", "乙肝能治好吗"], ["", "？"], ["", "头痛"],
])
def test_can_rank_guards_exactly_what_the_draw_accepts(questions):
    """The guard compares questions as the draw does (punctuation and spaces ignored), not as raw strings."""
    try:
        draw_candidates(questions, None, 20, seed=0)
        drawn = True
    except ValueError:
        drawn = False
    assert can_rank(questions) == drawn
    if len(set(questions)) >= 2 and len({question_key(q) for q in questions}) < 2:
        assert not can_rank(questions)  # the raw-string guard would have let these through


def test_relevance_with_one_distinct_question_is_refused_not_crashed_into():
    questions = ["头痛？", "头痛"]
    assert len(set(questions)) == 2 and not can_rank(questions)
    with pytest.raises(ValueError, match="at least 2 different questions"):
        relevance(questions, ["多休息", "吃药"])
