"""The one inference function: conversation → chat format → generation → `Answer`.

`ask`, `chat`, `eval` and `serve` all answer through `respond`, so the prompt a model sees at
inference is, token for token, the prompt it was trained on (the seed's bug was training on one
format and asking in another).

    >>> model, tokenizer, info = load_for_inference(ModelArgs(model="models/tiny", adapter=["runs/a"]))  # doctest: +SKIP
    >>> respond(model, tokenizer, [Query("头晕怎么办？", department="神经科")])[0].answer  # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from medtune.chat_format import (
    DEFAULT_PROMPT_FORMAT, Message, PromptFormat, build_messages, clean_history, compose_reply,
    get_prompt_format, strip_think, validate_messages,
)
from medtune.config import arg

if TYPE_CHECKING:
    import torch


@dataclasses.dataclass
class GenerationArgs:
    """How answers are generated (defaults: Qwen3's recommended non-thinking sampling)."""

    max_new_tokens: int = arg(512, "most tokens generated per answer")
    greedy: bool = arg(False, "greedy decoding (deterministic) instead of sampling")
    temperature: float = arg(0.7, "sampling temperature (Qwen3 non-thinking: 0.7)")
    top_p: float = arg(0.8, "nucleus sampling mass (Qwen3 non-thinking: 0.8)")
    top_k: int = arg(20, "sample among the k most likely tokens (Qwen3 non-thinking: 20)")
    # Qwen2.5's shipped generation_config uses 1.05: enough to stop loops in long answers.
    repetition_penalty: float = arg(1.05, "penalty for repeating tokens (1.0 = none)")
    batch_size: int = arg(8, "conversations generated together (left-padded)")
    seed: int | None = arg(None, "random seed for sampling (reproducible answers)")

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if not self.greedy and self.temperature <= 0:
            raise ValueError("temperature must be > 0 when sampling; use --greedy for deterministic answers")


@dataclasses.dataclass
class Query:
    """One question to answer: the question, earlier turns, and the department for the system prompt."""

    question: str
    history: list[Message] = dataclasses.field(default_factory=list)
    department: str | None = None
    system: str | None = None  # the user's own system prompt, replacing ours

    def messages(self, added: Sequence[str] = ()) -> list[Message]:
        """The conversation to render; our additions to earlier answers (``added`` and marked ones) removed."""
        return build_messages(self.question, department=self.department, system=self.system,
                              history=clean_history(self.history, added))

    @classmethod
    def from_messages(cls, messages: Sequence[Message], department: str | None = None) -> "Query":
        """A query from an OpenAI-style message list (optional system first, last turn the user's)."""
        messages = validate_messages(messages)
        if not messages or messages[-1]["role"] != "user":
            raise ValueError("the last message must be the user's question")
        system = messages[0]["content"] if messages[0]["role"] == "system" else None
        history = messages[1 if system is not None else 0:-1]
        return cls(messages[-1]["content"], list(history), department, system)


@dataclasses.dataclass
class Answer:
    """What the assistant says. ``answer`` is the model's text alone; the rest is added by our software."""

    answer: str
    notice: str | None = None  # emergency notice shown before the answer (safety layer)
    disclaimer: str | None = None  # shown after the answer (safety layer)
    department: str | None = None  # department named in the system prompt
    department_source: str | None = None  # "given" or "classifier"
    emergency: bool = False
    emergency_category: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"  # "stop" at the end-of-turn token, "length" at max_new_tokens

    @property
    def text(self) -> str:
        """The reply as displayed: notice, answer, disclaimer."""
        return compose_reply(self.answer, self.notice, self.disclaimer)


def stop_token_ids(tokenizer: Any, prompt_format: str | PromptFormat = DEFAULT_PROMPT_FORMAT) -> list[int]:
    """Ids of the tokens that end an answer in ``prompt_format``."""
    fmt = get_prompt_format(prompt_format)
    ids = tokenizer.convert_tokens_to_ids(fmt.stop_tokens(tokenizer))
    return [i for i in ids if i is not None and i != tokenizer.unk_token_id]


def generation_config(tokenizer: Any, gen: GenerationArgs, stop_ids: list[int]):
    """A `transformers.GenerationConfig` for ``gen`` that stops at ``stop_ids``."""
    from transformers import GenerationConfig

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    sampling = dict(do_sample=True, temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k)
    if gen.greedy:
        # Explicit neutral values: a model's own generation_config (Qwen3: temperature 0.6 ...) must not
        # leak into greedy decoding or trigger "sampling flags set but do_sample=False" warnings.
        sampling = dict(do_sample=False, temperature=1.0, top_p=1.0, top_k=50)
    return GenerationConfig(max_new_tokens=gen.max_new_tokens, repetition_penalty=gen.repetition_penalty,
                            eos_token_id=stop_ids, pad_token_id=pad, **sampling)


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    gen: GenerationArgs = GenerationArgs(),
    *,
    stop_ids: list[int] | None = None,
    streamer: Any = None,
) -> list[tuple[str, int, int, str]]:
    """Continue each rendered prompt; returns (text, prompt tokens, completion tokens, finish reason).

    The text stops before the first stop token and has any think block stripped. Prompts are batched
    ``gen.batch_size`` at a time, shortest first, left-padded (decoder-only models continue from the
    right end). ``streamer`` (a transformers streamer) needs ``batch_size`` 1.
    """
    import torch

    stop_ids = stop_ids or stop_token_ids(tokenizer)
    config = generation_config(tokenizer, gen, stop_ids)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[tuple[str, int, int, str]] = [("", 0, 0, "stop")] * len(prompts)
    if gen.seed is not None:
        torch.manual_seed(gen.seed)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), gen.batch_size):
            idx = order[start:start + gen.batch_size]
            batch = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True, padding_side="left",
                              add_special_tokens=False).to(model.device)
            with torch.inference_mode():
                out = model.generate(**batch, generation_config=config, streamer=streamer)
            width = batch["input_ids"].shape[1]
            for row, i in enumerate(idx):
                results[i] = _finish(tokenizer, out[row, width:].tolist(), stop_ids,
                                     int(batch["attention_mask"][row].sum()))
    finally:
        model.train(was_training)
    return results


def _finish(tokenizer: Any, ids: list[int], stop_ids: list[int], n_prompt: int) -> tuple[str, int, int, str]:
    stops = set(stop_ids)
    end = next((k for k, t in enumerate(ids) if t in stops), None)
    reason = "stop" if end is not None else "length"
    ids = ids if end is None else ids[:end]
    text = strip_think(tokenizer.decode(ids, skip_special_tokens=True))
    return text, n_prompt, len(ids) + (reason == "stop"), reason


def respond(
    model: Any,
    tokenizer: Any,
    queries: Iterable[Query | str],
    gen: GenerationArgs = GenerationArgs(),
    *,
    prompt_format: str | PromptFormat = DEFAULT_PROMPT_FORMAT,
    added: Sequence[str] = (),
) -> list[Answer]:
    """Answer each query (a `Query` or a bare question) in ``prompt_format``; one `Answer` per query.

    ``added``: exact texts our software added to earlier answers (e.g. a configured disclaimer without
    its mark), removed from history before it is rendered again.
    """
    queries = [q if isinstance(q, Query) else Query(q) for q in queries]
    fmt = get_prompt_format(prompt_format)
    prompts = [fmt.prompt(tokenizer, q.messages(added)) for q in queries]
    outputs = generate(model, tokenizer, prompts, gen, stop_ids=stop_token_ids(tokenizer, fmt))
    return [Answer(answer=text, department=q.department, department_source="given" if q.department else None,
                   prompt_tokens=n_in, completion_tokens=n_out, finish_reason=reason)
            for q, (text, n_in, n_out, reason) in zip(queries, outputs)]
