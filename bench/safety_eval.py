"""Red-flag detector (`medtune.safety.assess`): recall and precision on labelled questions, flag rate on
the 7,644 real questions of the shared sample, and what it flagged there.

    python bench/safety_eval.py            # figures + the flagged sample questions
    python bench/safety_eval.py --quiet    # figures only

Labelled sets, reported separately (never pooled, because they were not equally seen):
- ``written``: the questions written in tests/test_safety.py (the detector was built against them; since
  session 3 they include six probes, A-F, each scored once when fresh and then used for development);
- ``heldout1``: bench/safety_heldout.jsonl — held out in session 1, then SEEN while the detector was
  reworked in session 2 (its misses were known), so not an unbiased estimate any more;
- ``heldout2``: bench/safety_heldout2.jsonl — written after the first rework (recall 0.40, precision
  1.00 then), then SEEN: its misses led to a second round of lexicon additions;
- ``heldout3``: bench/safety_heldout3.jsonl — written after the second round (recall 0.30, precision 0.75
  then), then SEEN in session 3's concept rework;
- ``blind held-out``: bench/safety_heldout4.jsonl, when present — written by someone who never saw the
  detector, and never used to change it: the only unbiased figure here.

Baseline, measured in the same run: a bare keyword list (the textbook names of the emergencies:
中风, 心梗, 呼吸困难, 昏迷, 抽搐, 自杀, 中毒, 大出血 ...), i.e. what a detector without symptom lexicons
catches. The last line is one JSON object with a ``figures`` list (for bench/run_all.py).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT.parent / "shared" / "data" / "toyhom_neike_sample.csv"
HELDOUT = {"heldout1": ROOT / "bench" / "safety_heldout.jsonl", "heldout2": ROOT / "bench" / "safety_heldout2.jsonl",
           "heldout3": ROOT / "bench" / "safety_heldout3.jsonl", "blind held-out": ROOT / "bench" / "safety_heldout4.jsonl"}
KEYWORDS = re.compile(r"(中风|脑梗|脑卒中|脑出血|心梗|心肌梗|心脏骤停|主动脉夹层|大出血|呼吸困难|窒息|昏迷|休克|抽搐|惊厥|"
                      r"过敏性休克|中毒|服药过量|自杀|不想活|宫外孕|大量出血|溺水|触电|车祸)")


def keyword_flag(question: str) -> bool:
    return bool(KEYWORDS.search(question))


def written() -> list[tuple[str, bool]]:
    sys.path.insert(0, str(ROOT / "tests"))
    from test_safety import BENIGN, EMERGENCIES

    return [(q, True) for q, _ in EMERGENCIES] + [(q, False) for q in BENIGN]


def read_jsonl(path: Path) -> list[tuple[str, bool]]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [(r["question"], bool(r["emergency"])) for r in rows]


def scores(labelled: list[tuple[str, bool]], flag) -> dict:
    flags = [flag(q) for q, _ in labelled]
    tp = sum(f and y for f, (_, y) in zip(flags, labelled))
    fp = sum(f and not y for f, (_, y) in zip(flags, labelled))
    positives = sum(y for _, y in labelled)
    return {"n": len(labelled), "emergencies": positives, "recall": tp / positives if positives else None,
            "precision": tp / (tp + fp) if tp + fp else None,
            "missed": [q for f, (q, y) in zip(flags, labelled) if y and not f],
            "false_alarms": [q for f, (q, y) in zip(flags, labelled) if f and not y]}


def sample_questions() -> list[str]:
    from medtune.data.clean import merge_question
    from medtune.data.load import load

    table = load(SAMPLE).table
    return merge_question(table.column("title"), table.column("ask")).to_pylist()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quiet", action="store_true", help="figures only, not the flagged questions")
    args = parser.parse_args()
    from medtune.safety import assess, flag_rate

    figures = []
    sets = {"written": written(), **{k: read_jsonl(p) for k, p in HELDOUT.items() if p.is_file()}}
    for name, labelled in sets.items():
        ours, base = scores(labelled, lambda q: assess(q).emergency), scores(labelled, keyword_flag)
        print(f"{name}: {ours['n']} questions ({ours['emergencies']} emergencies): recall {ours['recall']:.2f} "
              f"(keywords: {base['recall']:.2f}), precision {ours['precision']:.2f} "
              f"(keywords: {base['precision'] if base['precision'] is None else round(base['precision'], 2)})")
        for q in ours["missed"]:
            print(f"  missed: {q}")
        for q in ours["false_alarms"]:
            print(f"  false alarm: {q}")
        for metric in ("recall", "precision"):
            value, baseline = ours[metric], base[metric]
            figures.append({"name": f"safety {metric}, {name} ({ours['n']} questions)", "value": round(value, 3),
                            "unit": "", "baseline": None if baseline is None else round(baseline, 3),
                            "ratio": round(value / baseline, 2) if baseline else None})

    if SAMPLE.is_file():
        questions = sample_questions()
        t0 = time.perf_counter()
        rate, flagged = flag_rate(questions)
        seconds = time.perf_counter() - t0
        base_rate = sum(map(keyword_flag, questions)) / len(questions)
        print(f"\nsample: {len(flagged)} of {len(questions)} real questions flagged ({rate:.2%}; keywords: "
              f"{base_rate:.2%}); {len(questions) / seconds:,.0f} questions/s")
        if not args.quiet:
            for q, a in flagged:
                print(f"  [{a.category}] {' '.join(q.split())[:110]}  <- {' / '.join(a.evidence)}")
        figures.append({"name": f"safety flag rate on the {len(questions):,} sample questions", "value": round(rate, 4),
                        "unit": "share", "baseline": round(base_rate, 4),
                        "ratio": round(rate / base_rate, 2) if base_rate else None})
        figures.append({"name": "safety assess throughput", "value": round(len(questions) / seconds),
                        "unit": "questions/s", "baseline": None, "ratio": None})
    print(json.dumps({"figures": figures}, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
