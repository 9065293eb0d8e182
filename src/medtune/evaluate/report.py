"""`report.md` and `metrics.png` of `medtune eval` from its metrics (the same dict as ``metrics.json``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from medtune.data.report import table

# (label, path into a system's figures, scale): the rows of the main table, in order
ROWS: list[tuple[str, tuple[str, ...], float]] = [
    ("BLEU-4", ("bleu-4",), 1), ("ROUGE-1", ("rouge-1",), 1), ("ROUGE-2", ("rouge-2",), 1), ("ROUGE-L", ("rouge-l",), 1),
    ("corpus BLEU (sacreBLEU zh)", ("corpus_bleu",), 1),
    ("relevance top-1 %", ("relevance", "top1"), 100), ("relevance MRR", ("relevance", "mrr"), 1),
    ("answers copying the question %", ("relevance", "copy_share"), 100),
    ("relevance top-1 % without copies", ("relevance", "top1_without_copies"), 100),
    ("department consistency %", ("department_consistency",), 100),
    ("answer loss (nats/token)", ("loss", "loss"), 1), ("perplexity", ("loss", "perplexity"), 1),
    ("mean length (characters)", ("length", "mean_chars"), 1), ("length / reference", ("length", "length_ratio"), 1),
    ("hit the token limit %", ("length", "hit_limit"), 100), ("empty %", ("length", "empty"), 100),
    ("distinct-1", ("length", "distinct-1"), 1), ("distinct-2", ("length", "distinct-2"), 1),
    ("rep-4 (repeated 4-grams)", ("length", "rep-4"), 1),
    ("exam accuracy %, single answer", ("exam", "single", "accuracy"), 100),
    ("exam: letter probability mass", ("exam", "single", "letter_mass"), 1),
    ("exam accuracy %, single answer, generated", ("exam", "single_generated", "accuracy"), 100),
    ("exam accuracy %, multiple answers", ("exam", "multi", "accuracy"), 100),
]
CHART = [("BLEU-4", ("bleu-4",), 1), ("ROUGE-1", ("rouge-1",), 1), ("ROUGE-L", ("rouge-l",), 1),
         ("relevance top-1 %", ("relevance", "top1"), 100), ("department %", ("department_consistency",), 100),
         ("exam %", ("exam", "single", "accuracy"), 100)]


def lookup(figures: dict[str, Any], path: Sequence[str], scale: float = 1) -> float | None:
    value: Any = figures
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return None if value is None else round(float(value) * scale, 4)


def _main_table(systems: dict[str, dict[str, Any]]) -> str:
    names = list(systems)
    rows = []
    for label, path, scale in ROWS:
        values = [lookup(systems[n], path, scale) for n in names]
        if any(v is not None for v in values):
            rows.append([label, *("–" if v is None else v for v in values)])
    return table(["metric", *names], rows, "l" + "r" * len(names))


def _exam_tables(systems: dict[str, dict[str, Any]]) -> str:
    names = [n for n in systems if "exam" in systems[n]]
    if not names:
        return ""
    parts = []
    for kind, title in (("single", "single answer, by likelihood"), ("single_generated", "single answer, generated"),
                        ("multi", "multiple answers, generated")):
        for key in ("by_subject", "by_category"):
            groups = sorted({g for n in names for g in (systems[n]["exam"].get(kind) or {}).get(key, {})})
            if not groups:
                continue
            rows = []
            for g in groups:
                cells = [systems[n]["exam"][kind][key].get(g) for n in names]
                count = next(c["n"] for c in cells if c)
                rows.append([g, count, *("–" if c is None else round(c["accuracy"] * 100, 2) for c in cells)])
            parts.append(f"**{title}, {key.removeprefix('by_')}** (accuracy %)\n\n"
                         + table([key.removeprefix("by_"), "questions", *names], rows, "lr" + "r" * len(names)))
    return "\n\n".join(parts)


def _samples(examples: Any, answers: dict[str, list[str]], n: int) -> str:
    parts = []
    for i in range(min(n, len(examples.ids))):
        lines = [f"### {i + 1}. `{examples.ids[i]}` ({examples.groups[i] or 'department unknown'})", "",
                 f"**问题**：{examples.questions[i]}", "", f"**参考答案**：{examples.references[i]}"]
        for name, got in answers.items():
            lines += ["", f"**{name}**：{got[i] or '（空）'}"]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def _safety(s: dict[str, Any]) -> str:
    def pct(v: float | None) -> str:
        return "–" if v is None else f"{v:.1%}"

    rows = [[s["questions"], s["emergencies"], s["flagged"], pct(s["precision"]), pct(s["recall"]), pct(s["f1"]),
             pct(s["category_accuracy"])]]
    text = (f"On `{s['path']}` (the detector runs on the question alone, whatever the model):\n\n"
            + table(["questions", "emergencies", "flagged", "precision", "recall", "F1", "category right"], rows,
                    "rrrrrrr"))
    for key, title in (("missed", "Missed emergencies"), ("false_alarms", "False alarms")):
        if s[key]:
            text += f"\n\n{title} (first {len(s[key])}):\n\n" + "\n".join(f"- {q}" for q in s[key])
    return text


def write_chart(path: Path, systems: dict[str, dict[str, Any]]) -> bool:
    """Grouped bars of the headline figures, one colour per system; False when there is nothing to draw."""
    import numpy as np
    from matplotlib.figure import Figure

    metrics = [(label, [lookup(systems[n], p, s) for n in systems]) for label, p, s in CHART]
    metrics = [(label, values) for label, values in metrics if any(v is not None for v in values)]
    if not metrics:
        return False
    fig = Figure(figsize=(1.6 + 1.3 * len(metrics), 4), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / len(systems)
    x = np.arange(len(metrics))
    for k, name in enumerate(systems):
        heights = [values[k] or 0.0 for _, values in metrics]
        bars = ax.bar(x + (k - (len(systems) - 1) / 2) * width, heights, width, label=name)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(x, [label for label, _ in metrics], fontsize=8)
    ax.set(ylabel="score (0-100)", title="base vs adapters")
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(fontsize=8)
    fig.savefig(path)
    return True


PROTOCOL_NOTES = """\
- **BLEU-4 / ROUGE** — {protocol}
- **Relevance** — each answer's own question ranked among {candidates} questions (itself and distractors drawn
  with seed {seed} from the same sub-department where possible) by cosine similarity of character 1-2-gram
  TF-IDF vectors (fitted on the questions and reference answers); top-1 accuracy (chance: 1/{candidates}) and
  MRR, ties counted as a random order. An answer *copies its question* when it contains at least 80% of the
  question's character bigrams.
- **Department consistency** — the data's department classifier applied to the answer, compared with the
  question's sub-department.
- **Answer loss** — teacher-forced cross-entropy per answer token (the training tokenisation and labels).
- **Length** — characters without whitespace; *hit the token limit*: generation stopped by
  max_new_tokens = {max_new_tokens}; distinct-n: distinct character n-grams / all, over all answers;
  rep-4: share of each answer's character 4-grams that repeat an earlier one (mean).
- **Exam** — single-answer questions: the option whose letter is the most likely first answer token after the
  chat-formatted question; multiple-answer questions: the letters named in a greedy generated answer must
  equal the key.
- Answers: greedy decoding, seed {seed}, batch {batch_size}, the examples drawn with seed {seed} from the
  {split} split. The *reference* column scores the dataset's own answers where that makes sense."""


def write_report(output: Path, metrics: dict[str, Any], examples: Any, answers: dict[str, list[str]],
                 samples: int) -> Path:
    """Write ``report.md`` (and ``metrics.png``) in ``output``; returns the report's path."""
    from medtune.evaluate.metrics import PROTOCOL

    systems = metrics["systems"]
    settings = metrics["settings"]
    chart = write_chart(output / "metrics.png", {n: f for n, f in systems.items() if n != "reference"})
    data = metrics["data"]
    lines = [
        "# Evaluation", "",
        f"- Model: {metrics['model']}",
        f"- Data: `{data['path']}`, {data['split']} split, {data['examples']:,} examples "
        f"(manifest sha256 `{str(data['manifest_sha256'])[:12]}`)",
    ]
    if metrics.get("exam"):
        e = metrics["exam"]
        lines.append(f"- Exam: `{e['path']}` ({e['format']}), {e['questions']:,} questions, "
                     f"{e['multi_answer']:,} with several answers")
    if metrics.get("department_classifier"):
        c = metrics["department_classifier"]
        lines.append(f"- Department classifier ({c['level']}): {c['accuracy_on_questions']:.1%} accurate on these questions")
    lines.append(f"- Time: {metrics['seconds']:.0f} s")
    if metrics["warnings"]:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in metrics["warnings"]]
    lines += ["", "## Results", "", _main_table(systems)]
    if chart:
        lines += ["", "![headline figures](metrics.png)"]
    exams = _exam_tables(systems)
    if exams:
        lines += ["", "## Exam by subject and category", "", exams]
    if metrics.get("safety"):
        lines += ["", "## Safety: the red-flag detector", "", _safety(metrics["safety"])]
    lines += ["", "## Protocol", "", PROTOCOL_NOTES.format(protocol=PROTOCOL, **settings)]
    if answers and samples:
        lines += ["", "## Sample answers", "", _samples(examples, answers, samples)]
    path = output / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
