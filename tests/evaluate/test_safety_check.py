"""Precision / recall of the red-flag detector on a labelled file."""
from __future__ import annotations

import json

import pytest

from medtune.errors import DataError
from medtune.evaluate.safety_check import read_labels, safety_scores
from medtune.safety import assess

STROKE = "我爸突然嘴歪了，说话含糊不清，右手拿不住筷子"
CARDIAC = "胸口压着疼，出了一身冷汗，已经半个小时了还不缓解"
CALM = ["高血压能吃党参吗？", "胃胀气，吃完饭更明显，怎么调理？", "体检发现轻度脂肪肝，需要吃药吗？"]


def test_precision_and_recall_by_construction(tmp_path):
    assert assess(STROKE).category == "stroke" and assess(CARDIAC).emergency
    assert not any(assess(q).emergency for q in CALM)
    records = [
        {"question": STROKE, "emergency": True, "category": "stroke"},       # true positive, right category
        {"question": CARDIAC, "emergency": "是", "category": "breathing"},    # true positive, wrong category
        {"question": CALM[0], "emergency": "false"},                         # true negative
        {"question": CALM[1], "emergency": 1},                               # labelled urgent, not flagged: missed
        {"question": CALM[2], "emergency": 0},                               # true negative
        {"question": STROKE + "。", "emergency": "no"},                       # flagged, labelled not: false alarm
    ]
    path = tmp_path / "labels.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    s = safety_scores(path)
    assert (s["questions"], s["emergencies"], s["flagged"]) == (6, 3, 3)
    assert s["precision"] == pytest.approx(2 / 3) and s["recall"] == pytest.approx(2 / 3)
    assert s["f1"] == pytest.approx(2 / 3)
    assert s["category_accuracy"] == pytest.approx(1 / 2)
    assert s["missed"] == [CALM[1]] and s["false_alarms"] == [STROKE + "。"]


def test_csv_labels_and_errors(tmp_path):
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("text,emergency\n高血压能吃党参吗？,否\n", encoding="gb18030")
    assert read_labels(csv_path) == [("高血压能吃党参吗？", False, None)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "头痛", "emergency": "maybe"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl:1 \[emergency\]: emergency must be true or false"):
        read_labels(bad)
