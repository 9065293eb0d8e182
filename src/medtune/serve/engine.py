"""Continuous batching for a Hugging Face causal LM: requests join the running batch between decode steps.

One scheduler thread owns the model. Each step it admits waiting requests (prefilled together, their KV
caches left-padded and concatenated onto the running batch's), runs one decode step for every running
request, samples each row with its own settings, streams the new text of each row to its asyncio
consumer, and drops rows that finished or whose client went away (their cache rows are removed, so the
slot is free for the next request at once). The batch's KV cache is a `transformers.DynamicCache`;
left padding is masked by the attention mask and positions are counted per row, as `generate` does.

    engine = Engine(model, tokenizer, stop_ids=[151645], max_batch=8)
    engine.start()
    handle = engine.submit(prompt_ids, SamplingParams(max_tokens=64))
    async for event in handle: ...
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import inspect
import logging
import random
import threading
from typing import TYPE_CHECKING, Any, AsyncIterator, Sequence

from medtune.chat_format import strip_think

if TYPE_CHECKING:
    from medtune.infer import GenerationArgs
    import torch

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The waiting queue is at its bound: the caller answers 429."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request is generated. ``temperature`` 0 means greedy; ``top_k`` 0 means no top-k cut."""

    max_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.8
    top_k: int = 20
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False

    @classmethod
    def defaults(cls, gen: "GenerationArgs | None" = None, max_tokens_limit: int | None = None) -> "SamplingParams":
        """A request's defaults from the command line's generation settings (`medtune.infer.GenerationArgs`)."""
        from medtune.infer import GenerationArgs

        gen = gen or GenerationArgs()
        limit = gen.max_new_tokens if max_tokens_limit is None else min(gen.max_new_tokens, max_tokens_limit)
        return cls(max_tokens=limit, temperature=0.0 if gen.greedy else gen.temperature, top_p=gen.top_p,
                   top_k=gen.top_k, min_p=gen.min_p, repetition_penalty=gen.repetition_penalty)


@dataclasses.dataclass
class Event:
    """What a consumer receives: new text, and on the last event the finish reason and token counts."""

    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" | "error" | "cancelled" on the last event
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


class AnswerText:
    """The part of a growing raw answer that may be shown: think blocks stripped and, with a boilerplate
    list (the adapter's ``boilerplate.json``), boilerplate sentences removed as `infer.clean_answer`
    does. An unfinished last sentence is held back while it could still become a boilerplate sentence,
    so what was shown is never taken back and the final text equals ``clean_answer`` of the whole."""

    def __init__(self, boilerplate: Sequence[str] = ()):
        from medtune.sentences import KEY_TRIM

        self.trim = KEY_TRIM
        self.keys = frozenset(k for k in (s.strip(KEY_TRIM) for s in boilerplate) if k)

    def __call__(self, raw: str, final: bool) -> str:
        text = strip_think(raw)
        if not self.keys:
            return text
        from medtune.sentences import SENTENCE_ENDS, split_sentences

        sentences = split_sentences(text)
        tail = ""
        if not final and sentences and not text.endswith(tuple(SENTENCE_ENDS)):
            tail = sentences.pop()
            if any(k.startswith(tail.strip(self.trim)) for k in self.keys):
                tail = ""  # may still grow into a boilerplate sentence
        return ("".join(s for s in sentences if s.strip(self.trim) not in self.keys) + tail).strip()


class _Request:
    def __init__(self, prompt_ids: list[int], params: SamplingParams, loop: asyncio.AbstractEventLoop):
        self.prompt_ids = prompt_ids
        self.params = params
        self.loop = loop
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.cancelled = False
        self.done = False
        self.ids: list[int] = []  # generated, stop token excluded
        self.n_generated = 0  # stop token included (as `infer.generate` counts)
        self.next_token: int | None = None  # sampled, sent, not yet in the cache
        self.sent = ""  # visible text sent so far
        self.generator: "torch.Generator | None" = None

    def emit(self, event: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the consumer's loop is closed (server shutting down)
            self.cancelled = True


class Handle:
    """A submitted request: iterate it for `Event`s; `cancel` stops generation and frees its slot."""

    def __init__(self, engine: "Engine", request: _Request):
        self._engine, self._request = engine, request

    def cancel(self) -> None:
        self._engine._cancel(self._request)

    async def __aiter__(self) -> AsyncIterator[Event]:
        while True:
            event = await self._request.queue.get()
            yield event
            if event.finish_reason is not None:
                return


class Engine:
    """Generation for many concurrent requests with one model (see the module docstring).

    ``max_batch`` requests run together; up to ``max_queue`` more wait (past that `submit` raises
    `QueueFull`). ``stop_ids`` end an answer (unless a request sets ``ignore_eos``). ``seed`` makes the
    draws of requests without their own seed reproducible; ``boilerplate`` sentences are removed from
    answers (see `AnswerText`).
    """

    def __init__(self, model: Any, tokenizer: Any, stop_ids: Sequence[int], *, max_batch: int = 8,
                 max_queue: int = 64, seed: int | None = None, boilerplate: Sequence[str] = ()):
        if max_batch < 1 or max_queue < 0:
            raise ValueError("max_batch must be at least 1 and max_queue at least 0")
        self.model, self.tokenizer = model, tokenizer
        self.stop_ids = set(stop_ids)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(stop_ids))
        self.max_batch, self.max_queue = max_batch, max_queue
        self.answer_text = AnswerText(boilerplate)
        self._random = random.Random(seed)  # seeds of requests that bring none
        self._cond = threading.Condition()
        self._waiting: collections.deque[_Request] = collections.deque()
        self._rows: list[_Request] = []
        self._cache: Any = None
        self._mask: "torch.Tensor | None" = None
        self._seen: "torch.Tensor | None" = None  # [rows, vocab] tokens seen (repetition penalty)
        self._thread: threading.Thread | None = None
        self._stopping = False
        # transformers 5.24 renamed `past_key_values` to `cache` (the old name warns); older 5.x know only the old.
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self._cache_kw = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
        self.steps = 0  # decode steps run (for tests and metrics)
        self.max_rows_seen = 0  # the largest batch a step has run
        self.joined = 0  # requests admitted into a batch that was already decoding

    # ------------------------------------------------------------------ public

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._rows)

    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="medtune-engine", daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def submit(self, prompt_ids: list[int], params: SamplingParams,
               loop: asyncio.AbstractEventLoop | None = None) -> Handle:
        """Queue a prompt (token ids); raises `QueueFull` when ``max_queue`` requests already wait."""
        request = _Request(list(prompt_ids), params, loop or asyncio.get_running_loop())
        with self._cond:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (the queue's bound)")
            self._waiting.append(request)
            self._cond.notify()
        return Handle(self, request)

    # ------------------------------------------------------------------ scheduler

    def _cancel(self, request: _Request) -> None:
        with self._cond:
            request.cancelled = True
            if request in self._waiting:  # never started: its consumer still waits for a last event
                self._waiting.remove(request)
                self._finish(request, "cancelled")
            self._cond.notify()

    def _run(self) -> None:
        import torch

        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._stopping and not self._waiting and not self._rows:
                        self._cond.wait()
                    if self._stopping:
                        break
                    new = []
                    while self._waiting and len(self._rows) + len(new) < self.max_batch:
                        new.append(self._waiting.popleft())
                try:
                    self._drop([r for r in self._rows if r.cancelled])
                    if new:
                        self._admit(new)
                    if self._rows:
                        self._step()
                except Exception as e:  # noqa: BLE001 - fail these requests, keep serving others
                    log.exception("generation failed; failing the %d running requests", len(self._rows))
                    for r in self._rows + [r for r in new if r not in self._rows]:
                        self._finish(r, "error", error=f"generation failed: {type(e).__name__}")
                    self._rows, self._cache, self._mask, self._seen = [], None, None, None
        for r in self._rows + list(self._waiting):
            self._finish(r, "cancelled")

    def _forward(self, input_ids: "torch.Tensor", mask: "torch.Tensor", cache: Any) -> "torch.Tensor":
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         logits_to_keep=1, **{self._cache_kw: cache})
        return out.logits[:, -1, :].float()

    def _admit(self, new: list[_Request]) -> None:
        import torch
        from transformers import DynamicCache

        for r in new:
            if r.cancelled:  # cancelled between leaving the queue and its prefill
                self._finish(r, "cancelled")
        new = [r for r in new if not r.cancelled]
        if not new:
            return
        device = self.model.device
        width = max(len(r.prompt_ids) for r in new)
        ids = torch.full((len(new), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(new), width), dtype=torch.long)
        for i, r in enumerate(new):
            ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids):] = 1
            r.generator = torch.Generator(device=device).manual_seed(
                r.params.seed if r.params.seed is not None else self._random.getrandbits(63))
        ids, mask = ids.to(device), mask.to(device)
        cache = DynamicCache(config=self.model.config)
        logits = self._forward(ids, mask, cache)
        seen = torch.zeros((len(new), logits.shape[-1]), dtype=torch.bool, device=device)
        seen.scatter_(1, ids, mask.bool())
        self._merge(new, cache, mask, seen)
        self._sample_and_emit(logits, self._rows[-len(new):], self._seen[-len(new):])

    def _merge(self, new: list[_Request], cache: Any, mask: "torch.Tensor", seen: "torch.Tensor") -> None:
        """Append the prefilled rows to the running batch, left-padding the shorter side's cache."""
        import torch
        import torch.nn.functional as F

        if self._cache is None:
            self._rows, self._cache, self._mask, self._seen = list(new), cache, mask, seen
            return
        self.joined += len(new)
        old_w, new_w = self._mask.shape[1], mask.shape[1]
        width = max(old_w, new_w)
        for old_layer, new_layer in zip(self._cache.layers, cache.layers):
            for attr in ("keys", "values"):
                a, b = getattr(old_layer, attr), getattr(new_layer, attr)
                setattr(old_layer, attr, torch.cat([F.pad(a, (0, 0, width - old_w, 0)),
                                                    F.pad(b, (0, 0, width - new_w, 0))], dim=0))
        self._mask = torch.cat([F.pad(self._mask, (width - old_w, 0)), F.pad(mask, (width - new_w, 0))], dim=0)
        self._seen = torch.cat([self._seen, seen], dim=0)
        self._rows.extend(new)

    def _drop(self, gone: list[_Request]) -> None:
        """Remove finished or cancelled rows from the batch and the columns no remaining row uses."""
        import torch

        if not gone:
            return
        for r in gone:
            if r.cancelled and not r.done:
                self._finish(r, "cancelled")
        keep = [i for i, r in enumerate(self._rows) if r not in gone]
        if not keep:
            self._rows, self._cache, self._mask, self._seen = [], None, None, None
            return
        index = torch.tensor(keep, device=self._mask.device)
        used = self._mask[index].any(dim=0).nonzero()
        start = int(used[0]) if len(used) else 0
        for layer in self._cache.layers:
            layer.keys = layer.keys[index, :, start:]
            layer.values = layer.values[index, :, start:]
        self._mask = self._mask[index, start:]
        self._seen = self._seen[index]
        self._rows = [self._rows[i] for i in keep]

    def _step(self) -> None:
        import torch

        tokens = torch.tensor([[r.next_token] for r in self._rows], device=self._mask.device)
        self._mask = torch.cat([self._mask, self._mask.new_ones((len(self._rows), 1))], dim=1)
        logits = self._forward(tokens, self._mask, self._cache)
        self.steps += 1
        self.max_rows_seen = max(self.max_rows_seen, len(self._rows))
        self._sample_and_emit(logits, self._rows, self._seen)

    # ------------------------------------------------------------------ sampling and text

    def _sample_and_emit(self, logits: "torch.Tensor", rows: list[_Request], seen: "torch.Tensor") -> None:
        tokens = sample(logits, seen, [r.params for r in rows], [r.generator for r in rows])
        seen.scatter_(1, torch_column(tokens, seen.device), True)
        finished = []
        for r, token in zip(rows, tokens):
            r.n_generated += 1
            stop = token in self.stop_ids and not r.params.ignore_eos
            if not stop:
                r.ids.append(token)
            r.next_token = token
            reason = "stop" if stop else ("length" if r.n_generated >= r.params.max_tokens else None)
            reason = self._emit_text(r, reason)
            if reason is not None:
                self._finish(r, reason)
                finished.append(r)
        self._drop(finished)

    def _emit_text(self, r: _Request, reason: str | None) -> str | None:
        """Send the row's new visible text; a stop string ends it (returns the finish reason)."""
        raw = self.tokenizer.decode(r.ids, skip_special_tokens=True)
        if reason is None and raw.endswith("\ufffd"):
            return None  # half of a multi-byte character: wait for the rest
        hold = 0
        for s in r.params.stop:
            at = raw.find(s)
            if at >= 0:
                raw, reason = raw[:at], "stop"
            hold = max(hold, len(s) - 1)
        text = self.answer_text(raw, final=reason is not None)
        if reason is None and hold:
            text = text[:max(len(r.sent), len(text) - hold)]  # may be the start of a stop string
        if text.startswith(r.sent) and len(text) > len(r.sent):
            r.emit(Event(text[len(r.sent):]))
            r.sent = text
        return reason

    def _finish(self, r: _Request, reason: str, error: str | None = None) -> None:
        if r.done:
            return
        r.done = True
        r.emit(Event(finish_reason=reason, prompt_tokens=len(r.prompt_ids), completion_tokens=r.n_generated,
                     error=error))


def torch_column(values: list[int], device: Any) -> "torch.Tensor":
    import torch

    return torch.tensor(values, device=device).unsqueeze(1)


def sample(logits: "torch.Tensor", seen: "torch.Tensor", params: Sequence[SamplingParams],
           generators: Sequence["torch.Generator | None"]) -> list[int]:
    """One token per row: repetition penalty, temperature, top-k, top-p, min-p (`generate`'s order), then a draw
    with the row's own generator (greedy rows take the most likely token)."""
    import torch

    device = logits.device
    penalty = torch.tensor([p.repetition_penalty for p in params], device=device).unsqueeze(1)
    if bool((penalty != 1.0).any()):
        logits = torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)
    greedy = [p.temperature == 0 for p in params]
    if all(greedy):
        return logits.argmax(dim=-1).tolist()
    temperature = torch.tensor([p.temperature or 1.0 for p in params], device=device).unsqueeze(1)
    scores = logits / temperature
    top_k = torch.tensor([min(p.top_k, scores.shape[-1]) for p in params], device=device)
    if bool((top_k > 0).any()):
        kth = scores.topk(int(top_k.max()), dim=-1).values.gather(1, (top_k.clamp(min=1) - 1).unsqueeze(1))
        kth = torch.where(top_k.unsqueeze(1) > 0, kth, torch.full_like(kth, float("-inf")))
        scores = scores.masked_fill(scores < kth, float("-inf"))
    top_p = torch.tensor([p.top_p for p in params], device=device).unsqueeze(1)
    if bool((top_p < 1.0).any()):
        ordered, order = scores.sort(dim=-1, descending=True)
        probs = ordered.softmax(dim=-1)
        drop = (probs.cumsum(dim=-1) - probs) > top_p  # keep the smallest set reaching top_p (first always)
        scores = scores.scatter(1, order, ordered.masked_fill(drop, float("-inf")))
    probs = scores.softmax(dim=-1)
    min_p = torch.tensor([p.min_p for p in params], device=device).unsqueeze(1)
    if bool((min_p > 0).any()):
        probs = probs.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, 0.0)
    greedy_tokens = logits.argmax(dim=-1).tolist()
    return [greedy_tokens[i] if greedy[i] else int(torch.multinomial(probs[i], 1, generator=generators[i]))
            for i in range(len(params))]

