"""Precision and recall of the red-flag detector (`medtune.safety.assess`) on a labelled file.

The file is JSONL or CSV (UTF-8 or GB18030) with a ``question`` (or ``text``) field and an ``emergency``
field (true/false, 1/0, yes/no, 是/否); an optional ``category`` (one of `medtune.safety.CATEGORY_NAMES`)
lets the category of correctly flagged questions be checked too.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from medtune.errors import DataError

TRUE = {"true", "1", "yes", "y", "是", "急症"}
FALSE = {"false", "0", "no", "n", "否", "", "none"}


def read_labels(path: Path) -> list[tuple[str, bool, str | None]]:
    """(question, is an emergency, category or None) for each record of ``path``."""
    from medtune.evaluate.exam import read_records

    path = Path(path)
    if not path.is_file():
        raise DataError("file not found", path)
    out = []
    for line, r in read_records(path):
        question = r.get("question", r.get("text"))
        if not isinstance(question, str) or not question.strip():
            raise DataError("no question (or text) field", path, line, "question")
        label = str(r.get("emergency", "")).strip().lower()
        if label not in TRUE | FALSE or "emergency" not in r:
            raise DataError(f"emergency must be true or false, got {r.get('emergency')!r}", path, line, "emergency")
        out.append((question, label in TRUE, (r.get("category") or None)))
    if not out:
        raise DataError("no labelled question", path)
    return out


def safety_scores(path: Path) -> dict[str, Any]:
    """Precision, recall and F1 of the emergency flag; accuracy of the category where one is labelled."""
    from medtune.safety import assess

    labels = read_labels(path)
    verdicts = [assess(q) for q, _, _ in labels]
    tp = sum(v.emergency and y for v, (_, y, _) in zip(verdicts, labels))
    fp = sum(v.emergency and not y for v, (_, y, _) in zip(verdicts, labels))
    fn = sum(not v.emergency and y for v, (_, y, _) in zip(verdicts, labels))
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / (tp + fn) if tp + fn else None
    f1 = 2 * precision * recall / (precision + recall) if precision and recall else None
    categorised = [(v.category, c) for v, (_, y, c) in zip(verdicts, labels) if y and c and v.emergency]
    return {"path": str(path), "questions": len(labels), "emergencies": tp + fn, "flagged": tp + fp,
            "precision": precision, "recall": recall, "f1": f1,
            "category_accuracy": (sum(a == b for a, b in categorised) / len(categorised)) if categorised else None,
            "missed": [q for v, (q, y, _) in zip(verdicts, labels) if y and not v.emergency][:20],
            "false_alarms": [q for v, (q, y, _) in zip(verdicts, labels) if v.emergency and not y][:20]}
