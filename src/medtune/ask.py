"""`medtune ask` and `medtune chat`: answer patients from the terminal, one question, a file, or a conversation.

    medtune ask --adapter runs/qwen3-4b-qlora --question "高血压患者平时饮食要注意什么？"
    medtune ask --adapter runs/qwen3-4b-qlora --input questions.jsonl --output answers.jsonl
    medtune chat --adapter runs/qwen3-4b-qlora
    medtune ask --adapter Sogrey/Chinese-medical-lora --hub hf --prompt-format seed --question "头晕怎么办？"

Both load through `medtune.infer.load_assistant` (base + adapter, a foreign adapter with
``--prompt-format``, or a merged model directory; the hardware profile picks the quantisation) and answer
through `Assistant.answer` → `medtune.infer.respond`, the one inference function. The safety layer's
notice comes before an emergency's answer, the disclaimer after every answer. Status lines go to
stderr, answers to stdout.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import signal
import sys
import threading
import unicodedata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal, TextIO

from medtune.config import ModelArgs, arg
from medtune.errors import DataError, MedtuneError
from medtune.infer import GenerationArgs, Query

if TYPE_CHECKING:
    from medtune.infer import Assistant

log = logging.getLogger(__name__)


@dataclasses.dataclass
class AnswerArgs:
    """What goes around the model's answer: department, prompt format, disclaimer, context window."""

    department: str | None = arg(None, "department named in the system prompt (default: predicted from the "
                                       "question by the adapter's department classifier)")
    prompt_format: Literal["qwen3-chat", "seed"] | None = arg(None, "prompt format of an adapter without medtune.json: qwen3-chat, or seed "
                                          "(the replaced scripts' format, e.g. Sogrey/Chinese-medical-lora)")
    disclaimer: str | None = arg(None, "text shown after every answer (default: the built-in Chinese "
                                       "disclaimer; an empty string for none)")
    context_window: int | None = arg(None, "prompt + answer tokens the model takes (default: the model's own)")

    def __post_init__(self) -> None:
        if self.context_window is not None and self.context_window < 16:
            raise ValueError(f"context_window must be at least 16, got {self.context_window}")


# ----------------------------------------------------------------------------- input checks

def check_question(text: Any, what: str = "the question") -> str:
    """``text`` stripped, or `MedtuneError` when it is not a question a person typed (empty, binary)."""
    if not isinstance(text, str):
        raise MedtuneError(f"{what} must be text, got {type(text).__name__}")
    text = text.strip()
    if not text:
        raise MedtuneError(f"{what} is empty")
    # Undecodable bytes arrive as lone surrogates (argv, stdin) or U+FFFD; binary data also brings control
    # characters. Any of them means this is not something to put before the model.
    bad = sum(1 for c in text if unicodedata.category(c) in ("Cc", "Cs", "Co", "Cn") and c not in "\n\t\r"
              or c == "\ufffd")
    if bad:
        raise MedtuneError(f"{what} is not readable text ({bad} control or undecodable characters; binary data?)")
    return text


def _load(model: ModelArgs, answer: AnswerArgs) -> "Assistant":
    from medtune.infer import load_assistant

    assistant = load_assistant(model, prompt_format=answer.prompt_format, context_window=answer.context_window,
                               disclaimer=answer.disclaimer)
    info = assistant.info
    if answer.department or not assistant.uses_department:
        department = answer.department if assistant.uses_department else "not used (no system prompt in this format)"
    elif assistant.classifier is not None:
        department = f"predicted per question by the department classifier ({assistant.classifier.level})"
    else:
        department = "none (no department classifier in the adapter directory; --department sets one)"
    if not logging.getLogger("medtune.modeling").isEnabledFor(logging.INFO):  # else load_for_inference said it
        print(f"medtune: loaded {info.summary()}", file=sys.stderr)
    print(f"medtune: prompt format {assistant.prompt_format}; context window "
          f"{assistant.context_window} tokens; department: {department}", file=sys.stderr, flush=True)
    return assistant


def _department_line(department: str | None, source: str | None) -> str:
    how = {"given": "given with --department", "classifier": "predicted by the department classifier"}
    if department:
        return f"medtune: department {department} ({how.get(source or '', source)})"
    return "medtune: no department in the system prompt"


# ----------------------------------------------------------------------------- ask

def ask(
    question: str | None = None,
    input: Path | None = None,
    output: Path | None = None,
    model: ModelArgs = ModelArgs(),
    gen: GenerationArgs = GenerationArgs(),
    answer: AnswerArgs = AnswerArgs(),
) -> int:
    """`medtune ask`: answer one question (streamed to stdout), or every line of a JSONL file.

    Args:
        question: the question to answer (in quotes)
        input: JSONL file of questions, one object per line: question (optional id, department, history)
        output: JSONL file for the answers (with --input): each input line's fields + answer, emergency,
            emergency_category, department, department_source, finish_reason
    """
    if (question is None) == (input is None):
        raise MedtuneError("give a question (--question TEXT) or a file of questions (--input FILE), one of them")
    if input is not None:
        if output is None:
            raise MedtuneError("--input needs --output, the JSONL file the answers go to")
        if not Path(input).is_file():
            raise MedtuneError(f"--input {input}: no such file")
        if Path(output).resolve() == Path(input).resolve():
            raise MedtuneError("--output must differ from --input")
        return _ask_file(Path(input), Path(output), _load(model, answer), gen, answer)
    text = check_question(question)
    assistant = _load(model, answer)
    query, _ = assistant.fit(Query(text, department=answer.department), gen.max_new_tokens)
    print(_department_line(*assistant.department(query)), file=sys.stderr, flush=True)
    [reply] = assistant.answer([query], gen, stream=_printer(sys.stdout))
    print(flush=True)
    if reply.finish_reason == "length":
        print(f"medtune: the answer was cut at --max-new-tokens {gen.max_new_tokens}", file=sys.stderr)
    return 0


def _printer(out: TextIO):
    def write(piece: str) -> None:
        out.write(piece)
        out.flush()
    return write


def _records(path: Path) -> Iterator[tuple[int, dict | DataError]]:
    """(line number, record or the problem with that line) for each non-blank line."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError:
                yield number, DataError("not UTF-8 text", path, number)
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                yield number, DataError(f"not valid JSON ({e})", path, number)
                continue
            yield number, record if isinstance(record, dict) else DataError("expected a JSON object", path, number)


def _query(record: dict, path: Path, number: int, default_department: str | None) -> Query:
    from medtune.chat_format import validate_messages

    try:
        question = check_question(record.get("question"), "question")
    except MedtuneError as e:
        raise DataError(str(e) if "question" in record else "no question field", path, number, "question") from None
    department = record.get("department", default_department)
    if department is not None and not isinstance(department, str):
        raise DataError("department must be a string", path, number, "department")
    history = record.get("history") or []
    try:
        if not isinstance(history, list):
            raise ValueError("expected a list of {role, content} messages")
        history = validate_messages(history)
        if any(m["role"] == "system" for m in history):
            raise ValueError("only user and assistant turns")
    except ValueError as e:
        raise DataError(f"history: {e}", path, number, "history") from None
    return Query(question, history, department or None)


def _ask_file(input: Path, output: Path, assistant: "Assistant", gen: GenerationArgs, args: AnswerArgs) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    records = list(_records(input))
    problems: list[str] = []
    todo: list[tuple[int, dict, Query]] = []
    for number, record in records:
        try:
            if isinstance(record, DataError):
                raise record
            query, dropped = assistant.fit(_query(record, input, number, args.department), gen.max_new_tokens)
            if dropped:
                log.warning("%s:%d: dropped the %d oldest history turns to fit the context window", input, number, dropped)
            todo.append((number, record, query))
        except MedtuneError as e:
            text = str(e) if isinstance(e, DataError) else str(DataError(str(e), input, number))
            problems.append(text)
            print(f"medtune: {text}", file=sys.stderr)
    output.parent.mkdir(parents=True, exist_ok=True)
    columns = (TextColumn("answering"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with open(output, "w", encoding="utf-8") as out, \
            Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        task = progress.add_task("answering", total=len(todo))
        for start in range(0, len(todo), gen.batch_size):
            chunk = todo[start:start + gen.batch_size]
            for (_, record, _), a in zip(chunk, assistant.answer([q for _, _, q in chunk], gen)):
                out.write(json.dumps({**record, "answer": a.answer, "emergency": a.emergency,
                                      "emergency_category": a.emergency_category, "department": a.department,
                                      "department_source": a.department_source, "finish_reason": a.finish_reason},
                                     ensure_ascii=False) + "\n")
            out.flush()  # a long run keeps what it answered if stopped
            progress.advance(task, len(chunk))
    print(f"medtune: answered {len(todo)} of {len(todo) + len(problems)} questions into {output}"
          + (f"; {len(problems)} lines could not be answered (listed above)" if problems else ""), file=sys.stderr)
    return 1 if problems else 0


# ----------------------------------------------------------------------------- chat

HELP = "输入问题后回车。/reset 清空对话，/exit 退出；回答时按 Ctrl-C 停止当前回答。"


def chat(model: ModelArgs = ModelArgs(), gen: GenerationArgs = GenerationArgs(), answer: AnswerArgs = AnswerArgs()) -> int:
    """`medtune chat`: a multi-turn conversation in the terminal (streaming; /reset, /exit; Ctrl-C stops an answer)."""
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")  # undecodable input reaches check_question, not a traceback
    assistant = _load(model, answer)
    print(HELP, flush=True)
    history: list[dict] = []
    while True:
        try:
            line = input("\n你：")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print("\n（输入 /exit 退出）", flush=True)
            continue
        command = line.strip().lower()
        if command in ("/exit", "/quit"):
            return 0
        if command == "/reset":
            history = []
            print("（对话已清空）", flush=True)
            continue
        if command in ("/help", "/?"):
            print(HELP, flush=True)
            continue
        if not line.strip():
            continue
        try:
            query, dropped = assistant.fit(Query(check_question(line), history, answer.department), gen.max_new_tokens)
        except MedtuneError as e:
            print(f"medtune: {e}", file=sys.stderr, flush=True)
            continue
        if dropped:
            print(f"（对话较长，已省略最早的 {dropped // 2 or 1} 轮以适应上下文长度）", flush=True)
        history = query.history

        def show(piece: str) -> None:
            sys.stdout.write(piece)
            sys.stdout.flush()

        print(_department_line(*assistant.department(query)), file=sys.stderr, flush=True)
        print("医生：", end="", flush=True)
        # Ctrl-C sets a flag that generation checks after every token. (A KeyboardInterrupt raised inside
        # generate can be lost, as Python drops exceptions raised in finalisers: once in the tests an
        # interrupted answer ran on to its end.) The answer so far is kept, with its disclaimer.
        interrupted = threading.Event()
        previous = signal.signal(signal.SIGINT, lambda *_: interrupted.set())
        try:
            [reply] = assistant.answer([query], gen, stream=show, stop=interrupted.is_set)
        finally:
            signal.signal(signal.SIGINT, previous)
        text = reply.text
        if interrupted.is_set():
            print("\n（已停止回答）", end="", flush=True)
        print(flush=True)
        history = [*history, {"role": "user", "content": query.question}, {"role": "assistant", "content": text}]


# `medtune ask "问题"`: the question may also be given as the first positional word (read by
# `medtune.config.add_arguments`); `--question` works either way.
ask.positional = ("question",)  # type: ignore[attr-defined]
