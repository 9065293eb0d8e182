"""The OpenAI chat-completions wire format (the subset we serve) and medtune's extension fields.

Requests are validated here, so a bad request is a 400 naming the field before anything is queued.
Extension fields (``department``, ``ignore_eos`` in; ``emergency``, ``emergency_category``,
``department`` out) are ignored by OpenAI clients; the Python client passes them with ``extra_body``.
"""
from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class ChatMessage(BaseModel):
    """One turn of the conversation. Content is plain text (no images or tool calls)."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=100_000)


class StreamOptions(BaseModel):
    include_usage: bool = True  # usage is always sent on the last chunk; accepted for compatibility


class ChatCompletionRequest(BaseModel):
    """``POST /v1/chat/completions``. Unknown fields are ignored, as by OpenAI-compatible servers."""

    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [{
        "model": "medtune", "messages": [{"role": "user", "content": "头晕乏力怎么办？"}],
        "max_tokens": 256, "stream": False, "department": "神经内科"}]})

    messages: list[ChatMessage] = Field(min_length=1, description="the conversation; the last turn is the user's")
    model: str | None = Field(None, description="the served model id (GET /v1/models); omitted means that one")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 = greedy; server default when omitted")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1, description="most tokens generated (at most the server's limit)")
    max_completion_tokens: int | None = Field(None, ge=1, description="the newer name of max_tokens")
    stop: str | list[str] | None = Field(None, description="up to 4 strings that end the answer")
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="only one choice is generated")
    user: str | None = None
    # medtune extensions
    department: str | None = Field(None, max_length=50, description="medtune: department named in the default "
                                   "system prompt (e.g. 心血管科); ignored when the client sends its own system message")
    ignore_eos: bool = Field(False, description="medtune: generate max_tokens tokens whatever the model says "
                             "(benchmarks); stop strings still apply")

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    @field_validator("messages")
    @classmethod
    def _turns(cls, v: list[ChatMessage]) -> list[ChatMessage]:
        if any(m.role == "system" for m in v[1:]):
            raise ValueError("a system message may only come first")
        if v[-1].role != "user":
            raise ValueError("the last message must be the user's question")
        return v

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"] | None


class SafetyFields(BaseModel):
    """medtune's extension fields on every response (and every stream chunk)."""

    emergency: bool = Field(False, description="medtune: the question describes a possible emergency; the reply "
                            "then opens with the emergency notice")
    emergency_category: str | None = Field(None, description="medtune: the kind of emergency (e.g. stroke)")
    department: str | None = Field(None, description="medtune: department named in the system prompt")


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


class ChatCompletion(SafetyFields):
    id: str = Field(default_factory=completion_id)
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(SafetyFields):
    """One server-sent event of a streamed answer; the last carries ``finish_reason`` and ``usage``."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "medtune"
    root: str | None = Field(None, description="the base model the adapter was trained on")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error, whatever the status: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorBody


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    model: str
