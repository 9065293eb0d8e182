"""The one conversation format used by data preparation, training, inference, evaluation and serving.

A conversation is a list of ``{"role": "system"|"user"|"assistant", "content": str}`` messages. The
system prompt names the department the question belongs to (the sub-department when known, else the
top-level department).

    >>> build_messages("高血压能吃党参吗？", "可以适量食用。", department="心血管科")[0]["content"][:12]
    '你是一名专业、严谨的心血管科'
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Sequence

from medtune.errors import MedtuneError

Message = dict[str, str]

SYSTEM_PROMPT = (
    "你是一名专业、严谨的{department}医生。请根据患者的描述，用通俗易懂的中文给出准确的医学解答和建议；"
    "信息不足时说明还需要了解什么；如有危急情况，提醒患者立即就医。"
)
SYSTEM_PROMPT_GENERAL = (
    "你是一名专业、严谨的医生。请根据患者的描述，用通俗易懂的中文给出准确的医学解答和建议；"
    "信息不足时说明还需要了解什么；如有危急情况，提醒患者立即就医。"
)
ROLES = ("system", "user", "assistant")


def system_prompt(department: str | None = None) -> str:
    """The default system prompt, naming ``department`` (e.g. 心血管科) when one is known."""
    department = (department or "").strip()
    return SYSTEM_PROMPT.format(department=department) if department else SYSTEM_PROMPT_GENERAL


def build_messages(
    question: str,
    answer: str | None = None,
    *,
    department: str | None = None,
    history: Sequence[Message] = (),
    system: str | None = None,
) -> list[Message]:
    """System prompt + earlier turns + the question (+ the answer, for training data).

    ``system`` replaces the default prompt (a user's own system message); ``history`` holds earlier
    user/assistant turns, oldest first.
    """
    messages: list[Message] = [{"role": "system", "content": system if system else system_prompt(department)}]
    for turn in history:
        if turn.get("role") not in ("user", "assistant"):
            raise ValueError(f"history turn has role {turn.get('role')!r}; expected 'user' or 'assistant'")
        messages.append({"role": turn["role"], "content": turn["content"]})
    messages.append({"role": "user", "content": question})
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


def validate_messages(messages: Iterable[Message]) -> list[Message]:
    """Check roles and contents; returns the messages as a list. Raises ValueError naming the turn."""
    out = list(messages)
    for i, m in enumerate(out):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ValueError(f"message {i}: role must be one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"message {i}: content must be a string")
        if m["role"] == "system" and i != 0:
            raise ValueError(f"message {i}: a system message may only come first")
    return out


# ============================================================================= rendering and labels
#
# Everything below takes a Hugging Face tokenizer (duck-typed, so importing this module stays free of
# torch and transformers). Qwen3's thinking is off everywhere: the generation prompt ends with an empty
# think block, and only the last assistant turn of a training conversation carries one.

Tokenizer = Any  # a transformers PreTrainedTokenizerBase
CHAT_TEMPLATE_KWARGS = {"enable_thinking": False}
IGNORE_INDEX = -100  # label of a token that carries no loss (torch.nn.CrossEntropyLoss's ignore_index)

# What our software adds to an answer for the reader. The safety layer words the notice and the
# disclaimer; each begins with its mark so that `strip_added` recognises it in history sent back to us
# (chat clients and the OpenAI API return the whole displayed text) even when the disclaimer is
# configured.
NOTICE_MARK = "【紧急提示】"
DISCLAIMER_MARK = "【温馨提示】"
_THINK = re.compile(r"<think>.*?</think>\s*", re.DOTALL)


def compose_reply(answer: str, notice: str | None = None, disclaimer: str | None = None) -> str:
    """The text a reader sees: notice, the model's answer, disclaimer — separated by blank lines."""
    parts = []
    if notice:
        parts.append(notice if notice.startswith(NOTICE_MARK) else NOTICE_MARK + notice)
    parts.append(answer)
    if disclaimer:
        parts.append(disclaimer if disclaimer.startswith(DISCLAIMER_MARK) else DISCLAIMER_MARK + disclaimer)
    return "\n\n".join(parts)


def strip_think(text: str) -> str:
    """Remove think blocks (and a dangling ``…</think>`` whose opening tag was in the prompt)."""
    text = _THINK.sub("", text)
    if "</think>" in text:  # the opening tag was in the prompt: what comes before the close is thought
        text = text.split("</think>", 1)[1]
    return text.replace("<think>", "").strip()


def strip_added(text: str, added: Sequence[str] = ()) -> str:
    """The model's own answer inside a displayed reply: drops the notice and disclaimer we added.

    Paragraphs that begin with `NOTICE_MARK` / `DISCLAIMER_MARK` go, and so does any exact text in
    ``added`` (e.g. a notice worded without its mark).
    """
    for extra in added:
        if extra:
            text = text.replace(extra, "")
    paragraphs = re.split(r"\n\s*\n", text)
    kept = [p for p in paragraphs if not p.strip().startswith((NOTICE_MARK, DISCLAIMER_MARK))]
    return "\n\n".join(p.strip("\n") for p in kept).strip()


def clean_history(messages: Sequence[Message], added: Sequence[str] = ()) -> list[Message]:
    """Messages as the model wrote them: our additions and think blocks removed from assistant turns."""
    out = []
    for m in validate_messages(messages):
        if m["role"] == "assistant":
            m = {"role": "assistant", "content": strip_added(strip_think(m["content"]), added)}
        out.append(dict(m))
    return out


def _control_tokens(tokenizer: Tokenizer) -> list[str]:
    tokens = set(getattr(tokenizer, "all_special_tokens", []) or [])
    tokens |= {str(t) for t in (getattr(tokenizer, "get_added_vocab", dict)() or {})}
    return sorted((t for t in tokens if t), key=len, reverse=True)


def sanitize(messages: Sequence[Message], tokenizer: Tokenizer) -> list[Message]:
    """Remove control-token strings (``<|im_start|>``, ``</think>``, …) from message contents.

    Text typed by a user must never become a control token: it could close the turn and write the
    assistant's part itself.
    """
    tokens = _control_tokens(tokenizer)
    out = []
    for m in messages:
        content = m["content"]
        for t in tokens:
            content = content.replace(t, "")
        out.append({"role": m["role"], "content": content})
    return out


class PromptFormat:
    """How a conversation becomes model text: the prompt, the completion, and where generation stops.

    ``split`` renders a conversation that ends with an assistant turn as (prompt, completion) where the
    prompt is exactly what `prompt` gives at inference for the conversation without that turn.
    """

    name: str = ""
    description: str = ""

    def prompt(self, tokenizer: Tokenizer, messages: Sequence[Message]) -> str:
        raise NotImplementedError

    def split(self, tokenizer: Tokenizer, messages: Sequence[Message]) -> tuple[str, str]:
        raise NotImplementedError

    def stop_tokens(self, tokenizer: Tokenizer) -> list[str]:
        """Token strings that end an answer; the first is the one a training completion ends with."""
        raise NotImplementedError


def _require_turns(messages: Sequence[Message], last: str) -> list[Message]:
    messages = validate_messages(messages)
    if not messages or messages[-1]["role"] != last:
        raise ValueError(f"the conversation must end with a {last} turn")
    return messages


class ChatTemplateFormat(PromptFormat):
    """The tokenizer's own chat template with Qwen3's thinking off (medtune's adapters use this)."""

    name = "qwen3-chat"
    description = "the tokenizer's chat template (ChatML), Qwen3 thinking off"

    def _render(self, tokenizer: Tokenizer, messages: list[Message], generation: bool) -> str:
        if not getattr(tokenizer, "chat_template", None):
            raise MedtuneError(f"prompt format {self.name!r} needs a tokenizer with a chat template; "
                               f"{getattr(tokenizer, 'name_or_path', 'this tokenizer')} has none")
        return tokenizer.apply_chat_template(
            sanitize(messages, tokenizer), tokenize=False, add_generation_prompt=generation,
            **CHAT_TEMPLATE_KWARGS)

    def prompt(self, tokenizer: Tokenizer, messages: Sequence[Message]) -> str:
        return self._render(tokenizer, _require_turns(messages, "user"), True)

    def split(self, tokenizer: Tokenizer, messages: Sequence[Message]) -> tuple[str, str]:
        messages = _require_turns(messages, "assistant")
        prompt = self._render(tokenizer, messages[:-1], True)
        full = self._render(tokenizer, messages, False)
        if not full.startswith(prompt):
            raise MedtuneError(
                f"the chat template of {getattr(tokenizer, 'name_or_path', 'this tokenizer')} does not render "
                "the generation prompt as a prefix of the training text; medtune cannot mask the prompt")
        return prompt, full[len(prompt):]

    def stop_tokens(self, tokenizer: Tokenizer) -> list[str]:
        eos = getattr(tokenizer, "eos_token", None)
        # <|endoftext|> (Qwen's document end, also in its generation_config's eos list) ends an answer too.
        return list(dict.fromkeys(["<|im_end|>", *([eos] if eos else []), "<|endoftext|>"]))


class SeedFormat(PromptFormat):
    """The replaced scripts' plain-text prompt (for their published adapters): question only, then EOS."""

    name = "seed"
    description = "the seed scripts' `### 问题：… ### 回答：` prompt (single turn, no system prompt)"
    TEMPLATE = "你是一个专业的医疗助手。请根据患者的问题提供专业、准确的回答。\n\n### 问题：\n{question}\n\n### 回答：\n"

    def prompt(self, tokenizer: Tokenizer, messages: Sequence[Message]) -> str:
        messages = sanitize(_require_turns(messages, "user"), tokenizer)
        return self.TEMPLATE.format(question=messages[-1]["content"])

    def split(self, tokenizer: Tokenizer, messages: Sequence[Message]) -> tuple[str, str]:
        messages = _require_turns(messages, "assistant")
        answer = sanitize(messages[-1:], tokenizer)[0]["content"]
        return self.prompt(tokenizer, messages[:-1]), answer + self.stop_tokens(tokenizer)[0]

    def stop_tokens(self, tokenizer: Tokenizer) -> list[str]:
        if not getattr(tokenizer, "eos_token", None):
            raise MedtuneError("prompt format 'seed' needs a tokenizer with an end-of-sequence token")
        return [tokenizer.eos_token]


PROMPT_FORMATS: dict[str, PromptFormat] = {f.name: f for f in (ChatTemplateFormat(), SeedFormat())}
DEFAULT_PROMPT_FORMAT = ChatTemplateFormat.name


def get_prompt_format(name: str | PromptFormat) -> PromptFormat:
    """The registered format called ``name`` (``qwen3-chat`` or ``seed``)."""
    if isinstance(name, PromptFormat):
        return name
    try:
        return PROMPT_FORMATS[name]
    except KeyError:
        raise MedtuneError(f"unknown prompt format {name!r}; choose one of {', '.join(PROMPT_FORMATS)}") from None


def render_prompt(tokenizer: Tokenizer, messages: Sequence[Message],
                  prompt_format: str | PromptFormat = DEFAULT_PROMPT_FORMAT) -> str:
    """The generation prompt for a conversation that ends with the user's turn."""
    return get_prompt_format(prompt_format).prompt(tokenizer, messages)


def render_training(tokenizer: Tokenizer, messages: Sequence[Message],
                    prompt_format: str | PromptFormat = DEFAULT_PROMPT_FORMAT) -> str:
    """The training text of a conversation that ends with the assistant's answer."""
    return "".join(get_prompt_format(prompt_format).split(tokenizer, messages))


# ----------------------------------------------------------------------------- tokenisation with labels

@dataclass
class Encoded:
    """One training example: token ids and labels (`IGNORE_INDEX` except on the answer and its stop token)."""

    input_ids: list[int]
    labels: list[int]
    shortened: bool = False  # the question was cut to fit max_seq_len

    def __len__(self) -> int:
        return len(self.input_ids)


class Overlong(ValueError):
    """An example that cannot fit ``max_seq_len`` without cutting its answer."""


def _ids(tokenizer: Tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _encode(tokenizer: Tokenizer, fmt: PromptFormat, messages: list[Message]) -> Encoded:
    prompt, completion = fmt.split(tokenizer, messages)
    return _label(tokenizer, fmt, completion, _ids(tokenizer, prompt), _ids(tokenizer, prompt + completion))


def _label(tokenizer: Tokenizer, fmt: PromptFormat, completion: str, prompt_ids: list[int],
           full_ids: list[int]) -> Encoded:
    if full_ids[: len(prompt_ids)] != prompt_ids:
        # The tokenizer merged text across the boundary. At inference the prompt is tokenised alone and
        # the model continues from there, so train on exactly that split.
        full_ids = prompt_ids + _ids(tokenizer, completion)
    completion_ids = full_ids[len(prompt_ids):]
    stop_ids = set(tokenizer.convert_tokens_to_ids(fmt.stop_tokens(tokenizer)))
    last_stop = max((i for i, t in enumerate(completion_ids) if t in stop_ids), default=None)
    if last_stop is None:
        raise MedtuneError(f"prompt format {fmt.name!r}: the rendered answer has no stop token "
                           f"({', '.join(fmt.stop_tokens(tokenizer))}) to learn")
    labels = [IGNORE_INDEX] * len(prompt_ids) + completion_ids[: last_stop + 1]
    labels += [IGNORE_INDEX] * (len(full_ids) - len(labels))  # e.g. the newline after <|im_end|>
    return Encoded(full_ids, labels)


def encode_many(
    tokenizer: Tokenizer,
    conversations: Sequence[Sequence[Message]],
    *,
    max_seq_len: int | None = None,
    prompt_format: str | PromptFormat = DEFAULT_PROMPT_FORMAT,
    overlong: Literal["shorten", "drop"] = "shorten",
) -> list[Encoded | ValueError]:
    """`encode` for many conversations, the same results a few times faster: the texts are tokenised in
    two batch calls. A conversation that `encode` would reject gets its exception (`Overlong`, or a
    ValueError naming the problem) in its place."""
    fmt = get_prompt_format(prompt_format)
    splits: list[tuple[str, str] | ValueError] = []
    for messages in conversations:
        try:
            splits.append(fmt.split(tokenizer, messages))
        except ValueError as e:
            splits.append(e)
    texts = [s for s in splits if not isinstance(s, ValueError)]
    batch = [p for p, _ in texts] + [p + c for p, c in texts]
    ids = list(tokenizer(batch, add_special_tokens=False)["input_ids"]) if batch else []
    prompt_ids, full_ids = iter(ids[: len(texts)]), iter(ids[len(texts):])
    out: list[Encoded | ValueError] = []
    for messages, split in zip(conversations, splits):
        if isinstance(split, ValueError):
            out.append(split)
            continue
        enc = _label(tokenizer, fmt, split[1], list(next(prompt_ids)), list(next(full_ids)))
        if max_seq_len is not None and len(enc) > max_seq_len:  # rare: shortening re-renders, one at a time
            try:
                enc = encode(tokenizer, messages, max_seq_len=max_seq_len, prompt_format=fmt, overlong=overlong)
            except ValueError as e:
                enc = e
        out.append(enc)
    return out


def encode(
    tokenizer: Tokenizer,
    messages: Sequence[Message],
    *,
    max_seq_len: int | None = None,
    prompt_format: str | PromptFormat = DEFAULT_PROMPT_FORMAT,
    overlong: Literal["shorten", "drop"] = "shorten",
    min_question_chars: int = 16,
) -> Encoded:
    """Tokenise a training conversation (ending with the assistant's answer) with loss on the answer only.

    When it exceeds ``max_seq_len``: with ``overlong="shorten"`` the oldest history turns go first, then
    the question's tail (at least ``min_question_chars`` characters stay); the answer is never cut. What
    still does not fit raises `Overlong` (the caller drops and counts it).
    """
    fmt = get_prompt_format(prompt_format)
    messages = validate_messages(messages)
    enc = _encode(tokenizer, fmt, messages)
    if max_seq_len is None or len(enc) <= max_seq_len:
        return enc
    if overlong == "drop":
        raise Overlong(f"{len(enc)} tokens > max_seq_len {max_seq_len}")
    head = [m for m in messages[:1] if m["role"] == "system"]
    body = messages[len(head):-2]
    question, answer = messages[-2], messages[-1]
    while body:  # drop the oldest complete turns first
        body = body[2:] if len(body) >= 2 else []
        enc = _encode(tokenizer, fmt, head + body + [question, answer])
        if len(enc) <= max_seq_len:
            enc.shortened = True
            return enc

    def cut(k: int) -> Encoded:
        return _encode(tokenizer, fmt, head + [{"role": "user", "content": question["content"][:k]}, answer])

    lo, hi = min(min_question_chars, len(question["content"])), len(question["content"])
    if len(cut(lo)) > max_seq_len:
        raise Overlong(f"the answer with the system prompt and a {lo}-character question does not fit "
                       f"max_seq_len {max_seq_len}")
    while lo < hi:  # the longest question head that fits
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if len(cut(mid)) <= max_seq_len else (lo, mid - 1)
    enc = cut(lo)
    enc.shortened = True
    return enc
