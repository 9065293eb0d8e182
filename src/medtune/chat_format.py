"""The one conversation format used by data preparation, training, inference, evaluation and serving.

A conversation is a list of ``{"role": "system"|"user"|"assistant", "content": str}`` messages. The
system prompt names the department the question belongs to (the sub-department when known, else the
top-level department).

    >>> build_messages("高血压能吃党参吗？", "可以适量食用。", department="心血管科")[0]["content"][:12]
    '你是一名专业、严谨的心血管科'
"""
from __future__ import annotations

from typing import Iterable, Sequence

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
