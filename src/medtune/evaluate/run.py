"""`medtune eval`: the base model and each adapter, on the same examples, side by side.

    medtune eval --model models/tiny --adapter runs/tiny-lora --data runs/data --limit 50 --output runs/eval
    medtune eval --model Qwen/Qwen3-4B --adapter runs/qwen3-4b-qlora --data runs/data \\
        --exam cmmlu/test --exam-format cmmlu --output runs/eval-qwen3-4b

One model load; the base is evaluated with the adapters disabled, then each adapter in turn. For each
system: answers generated (greedy, seeded, batched) to the questions of ``--limit`` examples drawn
(seeded) from the test split, scored by BLEU-4 / ROUGE against the references (`metrics.PROTOCOL`),
question relevance (`relevance`), length and repetition, and department consistency (the data's
department classifier applied to the answer); the teacher-forced answer loss (`loss`); and, with
``--exam``, multiple-choice accuracy (`exam`). The references get the reference-free figures too, as a
yardstick. Writes ``report.md``, ``metrics.json``, ``metrics.png`` and ``answers.jsonl`` to ``--output``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

from medtune.chat_format import DEFAULT_PROMPT_FORMAT, Message
from medtune.config import ModelArgs, arg
from medtune.data.classifier import CLASSIFIER_FILE
from medtune.errors import DataError
from medtune.evaluate.exam import ExamArgs

log = logging.getLogger(__name__)

REFERENCE = "reference"
CLASSIFIER = CLASSIFIER_FILE


@dataclasses.dataclass
class EvalArgs:
    """Which examples, which measurements, and how answers are generated."""

    split: Literal["test", "validation"] = arg("test", "split of --data to evaluate on")
    limit: int = arg(200, "examples drawn (seeded) from the split; 0 = all of them")
    max_new_tokens: int = arg(512, "most tokens per generated answer (answers cut here count as hitting the limit)")
    batch_size: int = arg(8, "answers generated, or sequences scored, together")
    seed: int = arg(0, "seed of the example draw, the relevance distractors and generation")
    generate: bool = arg(True, "generate answers (BLEU/ROUGE, relevance, length, department); "
                               "--no-generate keeps only the answer loss and the exam")
    loss: bool = arg(True, "teacher-forced answer loss and perplexity")
    candidates: int = arg(20, "questions each answer is ranked against for relevance (its own included)")
    max_seq_len: int = arg(2048, "longest sequence for the answer loss (longer questions are shortened, as in training)")
    samples: int = arg(3, "sample answers per system shown in report.md")
    safety_labels: Path | None = arg(None, "JSONL/CSV of questions labelled emergency true/false (optional "
                                           "category): precision and recall of the red-flag detector")

    def __post_init__(self) -> None:
        problems = [f"{name} must be at least {low}" for name, low in
                    (("limit", 0), ("max_new_tokens", 1), ("batch_size", 1), ("candidates", 2), ("max_seq_len", 16),
                     ("samples", 0)) if getattr(self, name) < low]
        if problems:
            raise ValueError("; ".join(problems))


@dataclasses.dataclass
class Examples:
    """The evaluated examples of a split, in a seeded random order."""

    ids: list[str]
    questions: list[str]
    references: list[str]
    groups: list[str]  # sub-department, else department ("" when unknown)
    conversations: list[list[Message]]  # system prompt ... question, reference answer


def read_examples(data: Path, split: str, limit: int, seed: int) -> Examples:
    """``limit`` examples (all when 0) of ``data/<split>.parquet``, drawn with ``seed``."""
    import numpy as np
    import pyarrow.parquet as pq

    path = Path(data) / f"{split}.parquet"
    if not path.is_file():
        raise DataError(f"no {split} split; give a directory written by `medtune data prepare`", path)
    columns = ["id", "question", "answer", "department", "sub_department", "messages"]
    try:
        rows = pq.read_table(path, columns=columns).to_pylist()
    except (KeyError, ValueError) as e:
        raise DataError(f"not a prepared split ({e})", path) from None
    if not rows:
        raise DataError("the split is empty", path)
    pick = np.random.default_rng(seed).permutation(len(rows))[: limit or None]
    rows = [rows[i] for i in pick]
    return Examples(
        ids=[r["id"] for r in rows], questions=[r["question"] for r in rows], references=[r["answer"] for r in rows],
        groups=[r["sub_department"] or r["department"] or "" for r in rows],
        conversations=[[{"role": m["role"], "content": m["content"]} for m in r["messages"]] for r in rows])


def sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def overlap_warnings(data: Path, adapters: dict[str, Path]) -> list[str]:
    """One line per adapter whose recorded training-data manifest hash is not this data's."""
    from medtune.modeling import MANIFEST, read_manifest

    ours = sha256(Path(data) / "manifest.json")
    warnings = []
    for name, path in adapters.items():
        theirs = (read_manifest(path).get("data") or {}).get("manifest_sha256")
        if theirs is None:
            warnings.append(f"adapter {name}: its {MANIFEST} records no data manifest hash; its training data "
                            "may overlap this test split")
        elif theirs != ours:
            warnings.append(f"adapter {name} was trained on other data (manifest sha256 {theirs[:12]}, this data's "
                            f"{str(ours)[:12]}): this test split may overlap its training data")
    return warnings


# ----------------------------------------------------------------------------- the systems

@dataclasses.dataclass
class System:
    name: str
    activate: Callable[[], contextlib.AbstractContextManager]
    prompt_format: str


def systems(model: Any, adapters: dict[str, Path]) -> list[System]:
    """The base (adapters disabled) and each adapter, with the prompt format its manifest names."""
    from medtune.modeling import read_manifest

    if not adapters:
        return [System("base", contextlib.nullcontext, DEFAULT_PROMPT_FORMAT)]

    def use(name: str) -> Callable[[], contextlib.AbstractContextManager]:
        def activate() -> contextlib.AbstractContextManager:
            model.set_adapter(name)
            return contextlib.nullcontext()
        return activate

    out = [System("base", model.disable_adapter, DEFAULT_PROMPT_FORMAT)]
    for name, path in adapters.items():
        out.append(System(name, use(name), read_manifest(path).get("prompt_format", DEFAULT_PROMPT_FORMAT)))
    return out


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    transient=True)


def generate_answers(model: Any, tokenizer: Any, examples: Examples, system: System, settings: EvalArgs,
                     progress: Any) -> list[Any]:
    """`medtune.infer.respond` to each example's conversation without its answer, greedy and seeded."""
    from medtune.infer import GenerationArgs, Query, respond

    gen = GenerationArgs(greedy=True, max_new_tokens=settings.max_new_tokens, batch_size=settings.batch_size,
                         seed=settings.seed)
    queries = [Query.from_messages(c[:-1]) for c in examples.conversations]
    task = progress.add_task(f"{system.name}: answering", total=len(queries))
    answers = []
    chunk = settings.batch_size * 4  # several batches per call: shortest-first batching still helps
    for start in range(0, len(queries), chunk):
        answers += respond(model, tokenizer, queries[start:start + chunk], gen, prompt_format=system.prompt_format)
        progress.advance(task, len(queries[start:start + chunk]))
    progress.remove_task(task)
    return answers


def answer_metrics(examples: Examples, answers: list[str], finish_reasons: list[str] | None, classifier: Any,
                   settings: EvalArgs) -> dict[str, Any]:
    """Reference-free figures (relevance, length, department), plus BLEU/ROUGE unless these are the references."""
    from medtune.evaluate.metrics import corpus_bleu, length_stats, similarity_scores
    from medtune.evaluate.relevance import can_rank, relevance

    out: dict[str, Any] = {}
    if finish_reasons is not None:
        out.update(similarity_scores(answers, examples.references))
        out["corpus_bleu"] = corpus_bleu(answers, examples.references)
    if can_rank(examples.questions):
        out["relevance"] = relevance(examples.questions, answers, examples.groups, references=examples.references,
                                     n_candidates=settings.candidates, seed=settings.seed).as_dict()
    out["length"] = length_stats(answers, examples.references, finish_reasons)
    if classifier is not None:
        from medtune.data.classifier import predict_department

        predicted = [label for label, _ in predict_department(classifier, answers)]
        known = [(p, g) for p, g in zip(predicted, examples.groups) if g]
        out["department_consistency"] = sum(p == g for p, g in known) / len(known) if known else None
    return out


# ----------------------------------------------------------------------------- the command

def evaluate(model: ModelArgs, data: Path, output: Path, evaluation: EvalArgs = EvalArgs(),
             exam: ExamArgs = ExamArgs()) -> Path:
    """`medtune eval`: evaluate the base and each ``--adapter`` on ``--data``; write the report to ``--output``.

    Args:
        data: a prepared data directory (`medtune data prepare`): its test split is evaluated
        output: directory for report.md, metrics.json, metrics.png and answers.jsonl
    """
    from medtune.data.classifier import accuracy, load_classifier
    from medtune.evaluate.exam import load_exam, score_exam, summarize
    from medtune.evaluate.loss import answer_loss
    from medtune.evaluate.report import write_report
    from medtune.evaluate.safety_check import safety_scores
    from medtune.modeling import load_for_inference

    settings, data, output = evaluation, Path(data), Path(output)
    examples = read_examples(data, settings.split, settings.limit, settings.seed)
    safety = safety_scores(settings.safety_labels) if settings.safety_labels is not None else None
    questions = load_exam(exam) if exam.exam is not None else []
    classifier = load_classifier(data / CLASSIFIER) if (data / CLASSIFIER).is_file() else None
    if classifier is None:
        log.warning("%s has no %s: department consistency is skipped", data, CLASSIFIER)
    lm, tokenizer, info = load_for_inference(model)
    warnings = overlap_warnings(data, info.adapters)
    for w in warnings:
        log.warning(w)
    results: dict[str, dict[str, Any]] = {}
    answers: dict[str, list[Any]] = {}
    started = time.perf_counter()
    with _progress() as progress:
        for system in systems(lm, info.adapters):
            with system.activate():
                figures: dict[str, Any] = {"prompt_format": system.prompt_format}
                if settings.generate:
                    answers[system.name] = generate_answers(lm, tokenizer, examples, system, settings, progress)
                    texts = [a.answer for a in answers[system.name]]
                    figures.update(answer_metrics(examples, texts, [a.finish_reason for a in answers[system.name]],
                                                  classifier, settings))
                if settings.loss:
                    task = progress.add_task(f"{system.name}: answer loss", total=len(examples.ids))
                    figures["loss"] = dataclasses.asdict(answer_loss(
                        lm, tokenizer, examples.conversations, max_seq_len=settings.max_seq_len,
                        batch_size=settings.batch_size, prompt_format=system.prompt_format,
                        progress=lambda n: progress.advance(task, n)))
                    progress.remove_task(task)
                if questions:
                    task = progress.add_task(f"{system.name}: exam", total=sum(not q.multi for q in questions))
                    figures["exam"] = summarize(score_exam(
                        lm, tokenizer, questions, prompt_format=system.prompt_format, batch_size=settings.batch_size,
                        generate_single=exam.exam_generate_single, progress=lambda n: progress.advance(task, n)))
                    progress.remove_task(task)
            results[system.name] = figures
            log.info("evaluated %s", system.name)
        if settings.generate:
            results[REFERENCE] = answer_metrics(examples, examples.references, None, classifier, settings)
    metrics = {
        "model": info.summary(),
        "adapters": {name: str(path) for name, path in info.adapters.items()},
        "data": {"path": str(data), "split": settings.split, "examples": len(examples.ids),
                 "manifest_sha256": sha256(data / "manifest.json")},
        "settings": dataclasses.asdict(settings),
        "exam": ({"path": str(exam.exam), "format": exam.exam_format, "questions": len(questions),
                  "multi_answer": sum(q.multi for q in questions)} if questions else None),
        "department_classifier": ({"level": classifier.level, "accuracy_on_questions": accuracy(
            classifier, examples.questions, examples.groups)} if classifier is not None else None),
        "safety": safety,
        "warnings": warnings,
        "seconds": round(time.perf_counter() - started, 1),
        "systems": results,
    }
    output.mkdir(parents=True, exist_ok=True)
    (output / "metrics.json").write_text(json.dumps(_jsonable(metrics), ensure_ascii=False, indent=2) + "\n",
                                         encoding="utf-8")
    _write_answers(output / "answers.jsonl", examples, answers)
    write_report(output, metrics, examples, {name: [a.answer for a in got] for name, got in answers.items()},
                 settings.samples)
    log.info("wrote %s", output / "report.md")
    from medtune.modelcard import record_evaluations

    for card_dir in record_evaluations(_jsonable(metrics), info.adapters, info.base_path, output):
        log.info("added the figures to the model card %s", card_dir / "README.md")
    return output


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and value != value:  # NaN is not JSON
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value) if isinstance(value, Path) else value


def _write_answers(path: Path, examples: Examples, answers: dict[str, list[Any]]) -> None:
    def rows() -> Iterator[str]:
        for i, example_id in enumerate(examples.ids):
            row = {"id": example_id, "question": examples.questions[i], "reference": examples.references[i],
                   **{name: {"answer": got[i].answer, "finish_reason": got[i].finish_reason,
                             "completion_tokens": got[i].completion_tokens} for name, got in answers.items()}}
            yield json.dumps(row, ensure_ascii=False) + "\n"

    path.write_text("".join(rows()), encoding="utf-8")
