"""The one inference function: conversation → chat format → generation → `Answer`.

`ask`, `chat`, `eval` and `serve` all answer through `respond`, so the prompt a model sees at
inference is, token for token, the prompt it was trained on (the seed's bug was training on one
format and asking in another).

    >>> model, tokenizer, info = load_for_inference(ModelArgs(model="models/tiny", adapter=["runs/a"]))  # doctest: +SKIP
    >>> respond(model, tokenizer, [Query("头晕怎么办？", department="神经科")])[0].answer  # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from medtune.chat_format import (
    DEFAULT_PROMPT_FORMAT, PROMPT_FORMATS, Message, PromptFormat, build_messages, clean_history, compose_reply,
    get_prompt_format, strip_think, validate_messages,
)
from medtune.config import ModelArgs, arg
from medtune.errors import MedtuneError

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
    min_p: float = arg(0.0, "drop tokens less likely than this share of the top token's probability (Qwen3: 0)")
    # Qwen2.5's shipped generation_config uses 1.05: enough to stop loops in long answers.
    repetition_penalty: float = arg(1.05, "penalty for repeating tokens (1.0 = none)")
    batch_size: int = arg(8, "conversations generated together (left-padded)")
    seed: int | None = arg(None, "random seed for sampling (reproducible answers)")

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
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
    sampling = dict(do_sample=True, temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k,
                    min_p=gen.min_p or None)
    if gen.greedy:
        # Explicit neutral values: a model's own generation_config (Qwen3: temperature 0.6 ...) must not
        # leak into greedy decoding or trigger "sampling flags set but do_sample=False" warnings.
        sampling = dict(do_sample=False, temperature=1.0, top_p=1.0, top_k=50, min_p=None)
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
    stop: Callable[[], bool] | None = None,
) -> list[tuple[str, int, int, str]]:
    """Continue each rendered prompt; returns (text, prompt tokens, completion tokens, finish reason).

    The text stops before the first stop token and has any think block stripped. Prompts are batched
    ``gen.batch_size`` at a time, shortest first, left-padded (decoder-only models continue from the
    right end). ``streamer`` (a transformers streamer) needs ``batch_size`` 1. ``stop``: asked after
    every token; once it is true, generation ends there (finish reason "length").
    """
    import torch

    stop_ids = stop_ids or stop_token_ids(tokenizer)
    config = generation_config(tokenizer, gen, stop_ids)
    criteria = _stop_when(stop) if stop is not None else None
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
                out = model.generate(**batch, generation_config=config, streamer=streamer, stopping_criteria=criteria)
            width = batch["input_ids"].shape[1]
            for row, i in enumerate(idx):
                results[i] = _finish(tokenizer, out[row, width:].tolist(), stop_ids,
                                     int(batch["attention_mask"][row].sum()))
    finally:
        model.train(was_training)
    return results


def _stop_when(stop: Callable[[], bool]):
    """A transformers stopping criterion that ends every sequence once ``stop()`` is true."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopWhen(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), bool(stop()), dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([StopWhen()])


def _finish(tokenizer: Any, ids: list[int], stop_ids: list[int], n_prompt: int) -> tuple[str, int, int, str]:
    stops = set(stop_ids)
    end = next((k for k, t in enumerate(ids) if t in stops), None)
    reason = "stop" if end is not None else "length"
    ids = ids if end is None else ids[:end]
    text = strip_think(tokenizer.decode(ids, skip_special_tokens=True))
    return text, n_prompt, len(ids) + (reason == "stop"), reason


def clean_answer(text: str, boilerplate: Iterable[str] | frozenset[str] = ()) -> str:
    """The answer as shown: think blocks stripped, then whole boilerplate sentences removed."""
    from medtune.sentences import remove_boilerplate

    return remove_boilerplate(strip_think(text), boilerplate)


class SentenceStream:
    """A transformers streamer that releases the answer sentence by sentence, already post-processed.

    The boilerplate remover judges whole sentences, so text is released only up to the last sentence
    end that is followed by more text; each release is `clean_answer` of everything so far, minus what
    was already released. The released pieces, joined, equal `clean_answer` of the whole answer — the
    non-streaming result. ``on_text`` gets each piece; `text` holds all released so far.
    """

    def __init__(self, tokenizer: Any, on_text: Callable[[str], None], stop_ids: Sequence[int],
                 boilerplate: Iterable[str] = ()):
        from medtune.sentences import SENTENCE_ENDS, _key

        self.tokenizer, self.on_text, self.stop_ids = tokenizer, on_text, set(stop_ids)
        self.boilerplate = frozenset(k for k in (_key(p) for p in boilerplate) if k)
        # a sentence is complete once a character that cannot extend its ending follows it
        self._complete = re.compile(f"[{re.escape(SENTENCE_ENDS)}]+(?=[^{re.escape(SENTENCE_ENDS)}])")
        self.ids: list[int] = []
        self.text = ""
        self._prompt_seen = False
        self._stopped = False

    def put(self, value: "torch.Tensor") -> None:
        if not self._prompt_seen:  # generate() sends the prompt first
            self._prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            if self._stopped or token in self.stop_ids:
                self._stopped = True
                return
            self.ids.append(token)
        self._release(final=False)

    def end(self) -> None:
        self._release(final=True)

    def _release(self, final: bool) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not final:
            text = text.rstrip("\ufffd")  # a character whose bytes are still arriving
            ends = [m.end() for m in self._complete.finditer(text)]
            if not ends:
                return
            text = text[:ends[-1]]
            if "<think>" in text.rsplit("</think>", 1)[-1]:  # an open think block: hold it back
                text = text[:text.rindex("<think>")]
        shown = clean_answer(text, self.boilerplate)
        if shown.startswith(self.text) and len(shown) > len(self.text):
            piece, self.text = shown[len(self.text):], shown
            self.on_text(piece)


def respond(
    model: Any,
    tokenizer: Any,
    queries: Iterable[Query | str],
    gen: GenerationArgs = GenerationArgs(),
    *,
    prompt_format: str | PromptFormat = DEFAULT_PROMPT_FORMAT,
    added: Sequence[str] = (),
    boilerplate: Iterable[str] = (),
    stream: Callable[[str], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> list[Answer]:
    """Answer each query (a `Query` or a bare question) in ``prompt_format``; one `Answer` per query.

    ``added``: exact texts our software added to earlier answers (e.g. a configured disclaimer without
    its mark), removed from history before it is rendered again. ``boilerplate``: sentences removed
    from answers (the adapter's ``boilerplate.json``). ``stream``: called with each piece of the answer
    as it is generated (one query only; see `SentenceStream`); the pieces joined equal the answer.
    ``stop``: ends the answers where they are once it returns true (`generate`).
    """
    queries = [q if isinstance(q, Query) else Query(q) for q in queries]
    fmt = get_prompt_format(prompt_format)
    prompts = [fmt.prompt(tokenizer, q.messages(added)) for q in queries]
    stop_ids = stop_token_ids(tokenizer, fmt)
    boilerplate = list(boilerplate)
    if stream is not None:
        if len(queries) != 1:
            raise ValueError(f"streaming answers one query at a time, got {len(queries)}")
        streamer = SentenceStream(tokenizer, stream, stop_ids, boilerplate)
        [(_, n_in, n_out, reason)] = generate(model, tokenizer, prompts, dataclasses.replace(gen, batch_size=1),
                                              stop_ids=stop_ids, streamer=streamer, stop=stop)
        outputs = [(streamer.text, n_in, n_out, reason)]
    else:
        outputs = [(clean_answer(text, boilerplate), n_in, n_out, reason)
                   for text, n_in, n_out, reason in generate(model, tokenizer, prompts, gen, stop_ids=stop_ids,
                                                             stop=stop)]
    return [Answer(answer=text, department=q.department, department_source="given" if q.department else None,
                   prompt_tokens=n_in, completion_tokens=n_out, finish_reason=reason)
            for q, (text, n_in, n_out, reason) in zip(queries, outputs)]


# ============================================================================= a model ready for patients
#
# `ask`, `chat` and the server answer through an `Assistant`: the loaded model with what its adapter
# directory carries (prompt format, department classifier, boilerplate list), the safety layer and the
# context window. Every answer still goes through `respond`.

@dataclasses.dataclass
class Assistant:
    """A loaded model with its prompt format, department classifier, boilerplate list and disclaimer."""

    model: Any
    tokenizer: Any
    prompt_format: str
    context_window: int  # prompt + answer tokens the model takes
    boilerplate: list[str] = dataclasses.field(default_factory=list)
    classifier: Any = None  # medtune.data.classifier.DepartmentClassifier, from the adapter directory
    disclaimer: str | None = None  # after every answer; None: none
    info: Any = None  # medtune.modeling.ModelInfo

    @property
    def uses_department(self) -> bool:
        """Whether the prompt format has a system prompt that names a department."""
        return self.prompt_format != "seed"

    def department(self, query: Query) -> tuple[str | None, str | None]:
        """(department, source): as given ("given"), else the classifier's guess ("classifier"), else none."""
        if not self.uses_department:
            return None, None
        if query.department:
            return query.department, "given"
        if self.classifier is None:
            return None, None
        from medtune.data.classifier import predict_department

        recent = [m["content"] for m in query.history if m.get("role") == "user"][-2:]
        [(label, _)] = predict_department(self.classifier, ["\n".join([*recent, query.question])])
        return label, "classifier"

    def prompt_tokens(self, query: Query) -> int:
        prompt = get_prompt_format(self.prompt_format).prompt(self.tokenizer, query.messages(self._added))
        return len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])

    @property
    def _added(self) -> list[str]:
        return [self.disclaimer] if self.disclaimer else []

    def fit(self, query: Query, max_new_tokens: int) -> tuple[Query, int]:
        """``query`` with its oldest turns dropped until prompt + ``max_new_tokens`` fit the context window;
        also how many turns went. A question that does not fit alone raises `MedtuneError`."""
        budget = self.context_window - max_new_tokens
        history, dropped = list(query.history), 0
        while True:
            trial = dataclasses.replace(query, history=history)
            n = self.prompt_tokens(trial)
            if n <= budget:
                return trial, dropped
            if not history:
                raise MedtuneError(
                    f"the question is too long: {n} prompt tokens + {max_new_tokens} new tokens exceed the "
                    f"context window of {self.context_window} tokens; shorten it (or lower --max-new-tokens)")
            cut = 2 if len(history) >= 2 else 1  # a user turn and its answer
            history, dropped = history[cut:], dropped + cut

    def answer(self, queries: Sequence[Query], gen: GenerationArgs = GenerationArgs(), *,
               stream: Callable[[str], None] | None = None, stop: Callable[[], bool] | None = None) -> list[Answer]:
        """Answer ``queries`` (each already `fit`): department, safety check, generation, notice and disclaimer.

        ``stream`` (one query only) gets the displayed text piece by piece — notice, answer, disclaimer —
        and the pieces joined equal the returned `Answer.text`. ``stop``: see `respond`.
        """
        from medtune.safety import assess

        queries = list(queries)
        departments = [self.department(q) for q in queries]
        verdicts = [assess(q.question, q.history) for q in queries]
        ready = [dataclasses.replace(q, department=d) for q, (d, _) in zip(queries, departments)]
        if stream is not None and verdicts[0].notice:
            stream(verdicts[0].notice + "\n\n")  # compose_reply's separator
        answers = respond(self.model, self.tokenizer, ready, gen, prompt_format=self.prompt_format,
                          added=self._added, boilerplate=self.boilerplate, stream=stream, stop=stop)
        for a, (d, source), v in zip(answers, departments, verdicts):
            a.department, a.department_source = d, source
            a.emergency, a.emergency_category, a.notice = v.emergency, v.category, v.notice
            a.disclaimer = self.disclaimer or None
        if stream is not None and self.disclaimer:
            stream(compose_reply("", None, self.disclaimer))  # "\n\n" + the disclaimer
        return answers


def load_assistant(model: ModelArgs, *, prompt_format: str | None = None, context_window: int | None = None,
                   disclaimer: str | None = None) -> Assistant:
    """Load ``model`` for answering: base + adapter (ours or foreign) or a merged model directory.

    Our adapters (and merged models written by medtune) carry ``medtune.json`` naming their prompt format,
    and the department classifier and boilerplate list of their data. A foreign adapter has no manifest:
    ``prompt_format`` must say how it was trained (e.g. ``seed`` for the replaced scripts' adapters). A
    ``prompt_format`` that contradicts the manifest is refused. ``disclaimer``: None for the default
    (`medtune.safety.DISCLAIMER`), "" for none.
    """
    from medtune.data.classifier import CLASSIFIER_FILE, load_classifier
    from medtune.sentences import load_boilerplate
    from medtune.modeling import MANIFEST, load_for_inference, read_manifest
    from medtune.safety import DISCLAIMER

    if prompt_format is not None:
        get_prompt_format(prompt_format)  # an unknown name fails before anything loads
    _check_adapters(model)
    try:
        loaded, tokenizer, info = load_for_inference(model)
    except (RuntimeError, KeyError) as e:  # peft: shapes or module names of the adapter do not fit the base
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MedtuneError(f"the adapter {', '.join(model.adapter)} does not fit the base model {model.model}: "
                           f"{first[:300]}. Load it with the base it was trained on (--model)") from None
    home = next(iter(info.adapters.values()), info.base_path)  # where the manifest and data files are
    manifest = info.manifest or read_manifest(info.base_path)
    recorded = manifest.get("prompt_format")
    if recorded and prompt_format and recorded != prompt_format:
        raise MedtuneError(f"{home}: trained with prompt format {recorded!r} (its {MANIFEST}); "
                           f"--prompt-format {prompt_format} would ask it in another format (the seed's bug)")
    if not recorded and not prompt_format and info.adapters:
        raise MedtuneError(
            f"--adapter {home} has no {MANIFEST} (it was not trained by medtune), so its prompt format is "
            "unknown: give --prompt-format "
            + "; ".join(f"{name} ({f.description})" for name, f in PROMPT_FORMATS.items()))
    fmt = recorded or prompt_format or DEFAULT_PROMPT_FORMAT
    window = context_window or _context_window(loaded)
    boilerplate = load_boilerplate(home / "boilerplate.json") if (home / "boilerplate.json").is_file() else []
    classifier = load_classifier(home / CLASSIFIER_FILE) if (home / CLASSIFIER_FILE).is_file() else None
    return Assistant(loaded, tokenizer, fmt, window, boilerplate, classifier,
                     DISCLAIMER if disclaimer is None else (disclaimer or None), info)


def _check_adapters(model: ModelArgs) -> None:
    from pathlib import Path

    for a in model.adapter:
        path = Path(a).expanduser()
        if path.is_dir() and not (path / "adapter_config.json").is_file():
            if (path / "config.json").is_file():
                raise MedtuneError(f"--adapter {a}: this is a full model (config.json, no adapter_config.json); "
                                   "load it with --model")
            raise MedtuneError(f"--adapter {a}: no adapter_config.json there")


def _context_window(model: Any) -> int:
    config = getattr(model, "config", None)
    return int(getattr(config, "max_position_embeddings", 0) or 32768)
