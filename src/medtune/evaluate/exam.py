"""Multiple-choice medical exams: load CMMLU, CMB or any JSONL/CSV by a column mapping; score a model.

Single-answer questions are scored by likelihood: the question and its options are rendered as a user
turn through `medtune.chat_format` (the same generation prompt as training and inference), and the
predicted option is the letter whose token is most likely as the first token of the answer. Nothing is
generated, so a model that rambles before naming a letter is not penalised for format. Questions with
several correct options (CMB's 多项选择题, keys such as ``ABD``) cannot be scored by one letter: the model
generates a short answer (greedy) and the set of letters it names must equal the key. The two kinds
are reported separately, each overall and per subject and category.

    medtune eval ... --exam cmmlu/test --exam-format cmmlu
    medtune eval ... --exam CMB-val-merge.json --exam-format cmb
    medtune eval ... --exam cmexam.csv --exam-format generic --exam-question-field Question \\
        --exam-options-field Options --exam-answer-field Answer
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Sequence

from medtune.chat_format import DEFAULT_PROMPT_FORMAT, PromptFormat, build_messages, get_prompt_format
from medtune.config import arg
from medtune.errors import DataError, MedtuneError


LETTERS = "ABCDEFGH"
EXAM_FORMATS = ("cmmlu", "cmb", "generic")
CMMLU_COLUMNS = ("Question", "A", "B", "C", "D", "Answer")
# CMMLU's own Chinese names (its `name_en2zh`) for the subjects a medical model is tested on; other
# subjects are named by their file stem.
CMMLU_SUBJECTS = {
    "anatomy": "解剖学", "clinical_knowledge": "临床知识", "college_medical_statistics": "大学医学统计",
    "college_medicine": "大学医学", "food_science": "食品科学", "genetics": "遗传学",
    "high_school_biology": "高中生物", "nutrition": "营养学", "professional_medicine": "专业医学",
    "traditional_chinese_medicine": "中医中药", "virology": "病毒学",
}
SINGLE_PROMPT = "以下是{about}单项选择题，请直接给出正确答案的选项字母。\n\n{question}\n{options}\n答案："
MULTI_PROMPT = "以下是{about}多项选择题，正确答案不止一个，请直接给出所有正确答案的选项字母。\n\n{question}\n{options}\n答案："


@dataclasses.dataclass
class ExamQuestion:
    """One exam question: its options by letter (in order) and the key (the correct letters, sorted)."""

    question: str
    options: dict[str, str]
    answer: str
    subject: str = ""
    category: str = ""
    source: str = ""  # file:line, for messages

    @property
    def multi(self) -> bool:
        return len(self.answer) > 1


@dataclasses.dataclass
class ExamArgs:
    """Multiple-choice exam: the file and how to read it."""

    exam: Path | None = arg(None, "exam questions: a CSV / JSON / JSONL file or a directory of them")
    exam_format: Literal["cmmlu", "cmb", "generic"] = arg(
        "cmmlu", "cmmlu: CSVs with ',Question,A,B,C,D,Answer', subject = file name; cmb: CMB's JSON "
        "(question, option, answer, exam_type, exam_subject); generic: the --exam-*-field columns")
    exam_question_field: str = arg("question", "generic: the question's field")
    exam_options_fields: str = arg("", "generic: comma-separated fields, one option each, e.g. A,B,C,D or "
                                       "opa,opb,opc,opd (letters A, B, ... in this order)")
    exam_options_field: str = arg("options", "generic: one field holding all options: a dict of letters, "
                                             "a list, or 'A. ...' lines (when --exam-options-fields is empty)")
    exam_answer_field: str = arg("answer", "generic: the key's field: letters (B, ABD, A,C) or an option field name")
    exam_subject_field: str = arg("", "generic: field of the subject, for per-subject accuracy")
    exam_category_field: str = arg("", "generic: field of the category, for per-category accuracy")
    exam_limit: int | None = arg(None, "score only the first N questions")
    exam_generate_single: bool = arg(False, "also score single-answer questions by parsing a generated answer")

    def __post_init__(self) -> None:
        if self.exam_limit is not None and self.exam_limit < 1:
            raise ValueError(f"exam_limit must be at least 1, got {self.exam_limit}")


# ============================================================================= loading

def _text(path: Path) -> str:
    """The file's text, UTF-8 or GB18030 (detected as the data loader does)."""
    from medtune.data.load import TextStream

    return "".join(TextStream(path))


def _files(path: Path, suffixes: tuple[str, ...]) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
        if not files:
            raise DataError(f"no {'/'.join(suffixes)} file in this directory", path)
        return files
    if not path.is_file():
        raise DataError("file not found", path)
    return [path]


def parse_key(value: Any, letters: Sequence[str], fields: Sequence[str] = ()) -> str:
    """The correct letters of a key, sorted: ``"B"``, ``"ABD"``, ``"a,c"``, ``"A、C"``, ``["A", "C"]``, or
    the name of an option field (``"opd"`` when the options are ``opa..ope``). ``""`` if it is none of
    these or names a letter that is not an option."""
    if isinstance(value, (list, tuple)):
        value = "".join(str(v) for v in value)
    value = str(value if value is not None else "").strip()
    if value in fields:
        return LETTERS[list(fields).index(value)]
    if not re.fullmatch(r"[A-Ha-h]([\s,，、;；/和]*[A-Ha-h])*", value):
        return ""
    found = set(re.findall(r"[A-H]", value.upper()))
    return "".join(sorted(found)) if found <= set(letters) else ""


def parse_options(value: Any) -> dict[str, str]:
    """Options held in one field: ``{"A": ..}``, ``[..]`` (lettered in order) or lines ``A. ..`` / ``A、..``."""
    if isinstance(value, dict):
        return {str(k).strip().upper(): str(v).strip() for k, v in value.items() if str(v).strip()}
    if isinstance(value, (list, tuple)):
        return {LETTERS[i]: str(v).strip() for i, v in enumerate(value)}
    if isinstance(value, str):
        text = value.strip()
        if text.startswith(("{", "[")):
            try:
                return parse_options(json.loads(text))
            except ValueError:
                pass
        # "A. 甲\nB. 乙" (one per line) or "A. 甲 B. 乙" (inline): a letter, then a separator or a space
        parts = re.split(r"(?:^|(?<=\s))([A-H])(?:\s*[.．、:：)）]\s*|\s+)", text)
        return {parts[i]: parts[i + 1].strip() for i in range(1, len(parts) - 1, 2)}
    return {}


def _question(path: Path, line: int, *, question: Any, options: dict[str, str], answer: Any, subject: Any,
              category: Any, fields: Sequence[str] = (),
              names: tuple[str, str, str] = ("question", "options", "answer")) -> ExamQuestion:
    """A checked `ExamQuestion`; `DataError` naming ``path:line [field]`` when it cannot be scored.

    ``names``: the file's own names of the question, options and answer fields (for the message).
    """
    question_field, options_field, answer_field = names
    options = {k: v for k, v in options.items() if k in LETTERS and v}
    if not str(question or "").strip():
        raise DataError("empty question", path, line, question_field)
    if len(options) < 2:
        raise DataError(f"fewer than two options ({', '.join(options) or 'none'})", path, line, options_field)
    letters = list(options)
    if letters != list(LETTERS[:len(letters)]):
        raise DataError(f"options {', '.join(letters)} are not A, B, C, ... in order", path, line, options_field)
    key = parse_key(answer, letters, fields)
    if not key:
        raise DataError(f"no valid answer: {answer!r} (options {''.join(letters)})", path, line, answer_field)
    return ExamQuestion(str(question).strip(), options, key, str(subject or "").strip(), str(category or "").strip(),
                        f"{path}:{line}")


def _csv_records(path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """(line the record starts on, record by header name); a quoted field may span several lines."""
    reader = csv.reader(io.StringIO(_text(path), newline=""), delimiter="\t" if path.suffix.lower() == ".tsv" else ",",
                        strict=True)
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as e:
        raise DataError(f"cannot read the CSV header: {e}", path, 1) from None
    prev = reader.line_num
    while True:
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise DataError(f"broken CSV quoting in the record that starts here: {e}", path, prev + 1) from None
        start, prev = prev + 1, reader.line_num
        if not values:
            continue  # a blank line
        if len(values) != len(header):
            field = header[len(values)] if len(values) < len(header) else None
            raise DataError(f"{len(values)} fields, expected {len(header)} as in the header", path, start, field)
        yield start, dict(zip(header, values))


def _json_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    text = _text(path)
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"not valid JSON ({e.msg})", path, e.lineno) from None
        for i, item in enumerate(items, 1):
            if not isinstance(item, dict):
                raise DataError(f"item {i} is not an object", path)
            yield i, item
        return
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"not valid JSON ({e.msg})", path, line_no) from None
        if not isinstance(item, dict):
            raise DataError("not a JSON object", path, line_no)
        yield line_no, item


def read_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line, record) of a CSV/TSV (line where the row starts), a JSON array (item number) or a JSONL file."""
    return _csv_records(path) if path.suffix.lower() in (".csv", ".tsv") else _json_records(path)


def load_cmmlu(path: Path) -> list[ExamQuestion]:
    """CMMLU CSVs (one per subject; header ``,Question,A,B,C,D,Answer``); the subject is the file stem."""
    out = []
    for file in _files(Path(path), (".csv",)):
        header = next(csv.reader(io.StringIO(_text(file))), [])
        missing = [c for c in CMMLU_COLUMNS if c not in header]
        if missing:
            raise DataError(f"not a CMMLU file: no {', '.join(missing)} column (header {','.join(header)})", file, 1)
        for line, r in _csv_records(file):
            out.append(_question(file, line, question=r["Question"], options={k: r[k] for k in "ABCD"},
                                 answer=r["Answer"], subject=file.stem, category="",
                                 names=("Question", "A,B,C,D", "Answer")))
    return out


def load_cmb(path: Path) -> list[ExamQuestion]:
    """CMB's JSON (a list, or JSONL): ``question``, ``option`` (dict of letters), ``answer``,
    ``question_type``, ``exam_type`` (the category) and ``exam_subject`` / ``exam_class`` (the subject)."""
    out = []
    for file in _files(Path(path), (".json", ".jsonl")):
        for line, r in _json_records(file):
            if "option" not in r:
                raise DataError("not a CMB record: no 'option' field", file, line, "option")
            out.append(_question(file, line, question=r.get("question"), options=parse_options(r["option"]),
                                 answer=r.get("answer"), subject=r.get("exam_subject") or r.get("exam_class") or "",
                                 category=r.get("exam_type") or "", names=("question", "option", "answer")))
    return out


def load_generic(path: Path, args: ExamArgs) -> list[ExamQuestion]:
    """Records of JSON / JSONL / CSV files read through the ``--exam-*-field`` mapping."""
    fields = [f.strip() for f in args.exam_options_fields.split(",") if f.strip()]
    if len(fields) > len(LETTERS):
        raise MedtuneError(f"--exam-options-fields: at most {len(LETTERS)} options")
    out = []
    for file in _files(Path(path), (".json", ".jsonl", ".csv", ".tsv")):
        for line, r in read_records(file):
            wanted = [args.exam_question_field, args.exam_answer_field, *(fields or [args.exam_options_field])]
            missing = [f for f in wanted if f not in r]
            if missing:
                raise DataError(f"no {', '.join(repr(m) for m in missing)} field (has {', '.join(map(str, r))}); "
                                "set the --exam-*-field flags", file, line, missing[0])
            options = ({LETTERS[i]: str(r[f] or "").strip() for i, f in enumerate(fields)} if fields
                       else parse_options(r[args.exam_options_field]))
            out.append(_question(file, line, question=r[args.exam_question_field], options=options,
                                 answer=r[args.exam_answer_field], fields=fields,
                                 names=(args.exam_question_field, ",".join(fields) or args.exam_options_field,
                                        args.exam_answer_field),
                                 subject=r.get(args.exam_subject_field, "") if args.exam_subject_field else "",
                                 category=r.get(args.exam_category_field, "") if args.exam_category_field else ""))
    return out


def load_exam(args: ExamArgs) -> list[ExamQuestion]:
    """The questions of ``args.exam`` in ``args.exam_format`` (the first ``exam_limit``)."""
    if args.exam is None:
        raise MedtuneError("no exam file given (--exam)")
    if args.exam_format == "cmmlu":
        questions = load_cmmlu(args.exam)
    elif args.exam_format == "cmb":
        questions = load_cmb(args.exam)
    elif args.exam_format == "generic":
        questions = load_generic(args.exam, args)
    else:
        raise MedtuneError(f"--exam-format {args.exam_format!r}: expected one of {', '.join(EXAM_FORMATS)}")
    if not questions:
        raise DataError("no exam question", args.exam)
    return questions[: args.exam_limit] if args.exam_limit else questions


# ============================================================================= prompts and parsing

def exam_text(q: ExamQuestion) -> str:
    """The user turn for question ``q``: instruction, question, lettered options, ``答案：``."""
    name = CMMLU_SUBJECTS.get(q.subject, q.subject.replace("_", " "))
    template = MULTI_PROMPT if q.multi else SINGLE_PROMPT
    return template.format(about=f"关于{name}的" if name else "", question=q.question,
                           options="\n".join(f"{k}. {v}" for k, v in q.options.items()))


def exam_prompt(tokenizer: Any, q: ExamQuestion, prompt_format: str | PromptFormat = DEFAULT_PROMPT_FORMAT) -> str:
    """The rendered generation prompt (general system prompt, no department) that the answer continues."""
    return get_prompt_format(prompt_format).prompt(tokenizer, build_messages(exam_text(q)))


_RUN = r"[A-H](?:\s*[、，,和及与/;；\s]?\s*[A-H])*"
_AFTER_MARK = re.compile(rf"(?:答案|正确选项|正确答案|应选|选择|选)\s*(?:是|为|应为|应该是|应选)?\s*[:：]?\s*({_RUN})(?![A-Za-z])")
_LEADING = re.compile(rf"^\s*[(（【\[]?\s*({_RUN})(?![A-Za-z])")
_STANDALONE = re.compile(r"(?<![A-Za-z])([A-H])(?![A-Za-z])")


def parse_choices(text: str, letters: Iterable[str] = LETTERS) -> str:
    """The option letters a generated answer names, sorted (``""`` if none).

    In order of trust: the letters right after 答案/选 (``答案：A、C``), a run of letters opening the
    answer (``ABD。解析：……``), else every standalone letter of the first line (not part of a word such as
    DNA). Letters that are not options of the question are ignored.
    """
    allowed = set(letters)
    text = text.strip()
    match = _AFTER_MARK.search(text) or _LEADING.match(text)
    if match:
        found = set(re.findall(r"[A-H]", match.group(1)))
    else:
        found = set(_STANDALONE.findall(text.split("\n", 1)[0]))
    return "".join(sorted(found & allowed))


# ============================================================================= scoring

def letter_token_ids(tokenizer: Any, prompt: str, letters: Sequence[str]) -> tuple[str, dict[str, int]]:
    """How each option letter is written as the answer's first token: ``"A"`` or ``" A"``.

    The form must be one token after ``prompt`` (tokenised on its own, as at inference) for every letter,
    with distinct ids; ``"A"`` is preferred (the chat template's prompt ends with a newline). Returns
    (the prefix, ``""`` or ``" "``; letter -> token id). Raises `MedtuneError` when neither form works.
    """
    base = _ids(tokenizer, prompt)
    tried = []
    for prefix in ("", " "):
        ids: dict[str, int] = {}
        for letter in letters:
            full = _ids(tokenizer, prompt + prefix + letter)
            alone = _ids(tokenizer, prefix + letter)
            tried.append(f"{prefix + letter!r} -> {alone}")
            if full[: len(base)] == base and len(full) == len(base) + 1 and full[-1:] == alone:
                ids[letter] = full[-1]
        if len(ids) == len(letters) and len(set(ids.values())) == len(letters):
            return prefix, ids
    raise MedtuneError("the option letters are not single tokens after the exam prompt with this tokenizer "
                       f"({'; '.join(tried)}); likelihood scoring needs one token per letter")


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _forward_kwargs(model: Any) -> dict[str, Any]:
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # Only the last position's logits are needed: 1 instead of T x vocab (151,936 for Qwen3) per row.
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(base.forward).parameters else {}


def next_token_logprobs(model: Any, tokenizer: Any, prompts: Sequence[str], token_ids: Sequence[int],
                        batch_size: int = 8, progress: Any = None) -> list[list[float]]:
    """log p(token | prompt) for each prompt and each of ``token_ids`` (log-softmax over the whole vocabulary).

    Batches are left-padded with position ids counted from each row's first real token, so a prompt
    scores the same alone or in a batch.
    """
    import torch

    device = next(model.parameters()).device
    extra = _forward_kwargs(model)
    index = torch.tensor(list(token_ids), device=device)
    out: list[list[float]] = [[] for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # less padding
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            batch = tokenizer([prompts[i] for i in rows], return_tensors="pt", padding=True, padding_side="left",
                              add_special_tokens=False).to(device)
            positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
            with torch.inference_mode():
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               position_ids=positions, **extra).logits[:, -1, :].float()
            picked = torch.log_softmax(logits, dim=-1)[:, index].cpu().tolist()
            for row, values in zip(rows, picked):
                out[row] = values
            if progress is not None:
                progress(len(rows))
    finally:
        model.train(was_training)
    return out


@dataclasses.dataclass
class Graded:
    """One scored question."""

    answer: str  # the key
    predicted: str
    correct: bool
    method: Literal["likelihood", "generation"]
    multi: bool
    subject: str
    category: str
    letter_mass: float | None = None  # probability that the first answer token is one of the option letters
    logprobs: dict[str, float] | None = None
    generated: str | None = None


def score_by_likelihood(model: Any, tokenizer: Any, questions: Sequence[ExamQuestion], *,
                        prompt_format: str | PromptFormat = DEFAULT_PROMPT_FORMAT, batch_size: int = 8,
                        progress: Any = None) -> list[Graded]:
    """Predict the single-answer questions' letters: the option whose letter token is most likely next."""
    import math

    if not questions:
        return []
    if any(q.multi for q in questions):
        raise ValueError("likelihood scoring is for single-answer questions; score multi-answer ones by generation")
    prompts = [exam_prompt(tokenizer, q, prompt_format) for q in questions]
    letters = LETTERS[: max(len(q.options) for q in questions)]
    # Every prompt ends with the same generation suffix, so one check of the letters' tokens holds for all.
    _, ids = letter_token_ids(tokenizer, prompts[0], letters)
    scores = next_token_logprobs(model, tokenizer, prompts, [ids[letter] for letter in letters], batch_size, progress)
    graded = []
    for q, row in zip(questions, scores):
        logprobs = {letter: row[letters.index(letter)] for letter in q.options}
        predicted = max(logprobs, key=logprobs.__getitem__)
        graded.append(Graded(q.answer, predicted, predicted == q.answer, "likelihood", False, q.subject, q.category,
                             letter_mass=sum(math.exp(v) for v in logprobs.values()), logprobs=logprobs))
    return graded


def score_by_generation(model: Any, tokenizer: Any, questions: Sequence[ExamQuestion], *,
                        prompt_format: str | PromptFormat = DEFAULT_PROMPT_FORMAT, batch_size: int = 8,
                        max_new_tokens: int = 32) -> list[Graded]:
    """Generate a short answer (greedy) to each question and compare the letters it names with the key."""
    from medtune.infer import GenerationArgs, generate, stop_token_ids

    if not questions:
        return []
    prompts = [exam_prompt(tokenizer, q, prompt_format) for q in questions]
    gen = GenerationArgs(greedy=True, max_new_tokens=max_new_tokens, repetition_penalty=1.0, batch_size=batch_size)
    outputs = generate(model, tokenizer, prompts, gen, stop_ids=stop_token_ids(tokenizer, prompt_format))
    graded = []
    for q, (text, *_) in zip(questions, outputs):
        predicted = parse_choices(text, q.options)
        graded.append(Graded(q.answer, predicted, predicted == q.answer, "generation", q.multi, q.subject,
                             q.category, generated=text))
    return graded


def score_exam(model: Any, tokenizer: Any, questions: Sequence[ExamQuestion], *,
               prompt_format: str | PromptFormat = DEFAULT_PROMPT_FORMAT, batch_size: int = 8,
               generate_single: bool = False, max_new_tokens: int = 32, progress: Any = None) -> list[Graded]:
    """Single-answer questions by likelihood (and by generation too with ``generate_single``), multi-answer
    ones by generation; results in that order."""
    single = [q for q in questions if not q.multi]
    multi = [q for q in questions if q.multi]
    graded = score_by_likelihood(model, tokenizer, single, prompt_format=prompt_format, batch_size=batch_size,
                                 progress=progress)
    generated = multi + (single if generate_single else [])
    graded += score_by_generation(model, tokenizer, generated, prompt_format=prompt_format, batch_size=batch_size,
                                  max_new_tokens=max_new_tokens)
    return graded


def _accuracy(items: list[Graded]) -> dict[str, float | int]:
    return {"accuracy": sum(g.correct for g in items) / len(items), "n": len(items)}


def summarize(graded: Sequence[Graded]) -> dict[str, Any]:
    """Accuracy per kind — ``single`` (likelihood), ``single_generated``, ``multi`` — overall, by subject and
    by category; ``single`` also has the mean letter mass. Kinds without questions are left out."""
    kinds: dict[str, list[Graded]] = defaultdict(list)
    for g in graded:
        kinds["multi" if g.multi else "single" if g.method == "likelihood" else "single_generated"].append(g)
    out: dict[str, Any] = {}
    for kind, items in kinds.items():
        entry: dict[str, Any] = _accuracy(items)
        for key in ("subject", "category"):
            groups: dict[str, list[Graded]] = defaultdict(list)
            for g in items:
                if getattr(g, key):
                    groups[getattr(g, key)].append(g)
            if groups:
                entry[f"by_{key}"] = {name: _accuracy(groups[name]) for name in sorted(groups)}
        if kind == "single":
            entry["letter_mass"] = sum(g.letter_mass or 0.0 for g in items) / len(items)
        out[kind] = entry
    return out
