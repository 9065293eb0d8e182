"""The continuous-batching engine: exact greedy agreement with `generate`, sampling, answer text."""
from __future__ import annotations

import asyncio

import pytest

from medtune.serve.engine import AnswerText, Engine, QueueFull, SamplingParams, sample


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    from medtune.modeling import load_base

    return load_base(tiny_model_dir)


def prompt_ids(tokenizer, question: str) -> list[int]:
    from medtune.chat_format import build_messages, render_prompt

    return tokenizer(render_prompt(tokenizer, build_messages(question)), add_special_tokens=False)["input_ids"]


def test_requests_joining_a_running_batch_get_exactly_generates_greedy_answer(base):
    """Prompts of different lengths arrive while others decode; each row equals its own `generate`."""
    import torch

    from medtune.infer import stop_token_ids

    model, tokenizer = base
    stops = stop_token_ids(tokenizer)
    questions = ["头晕怎么办？", "我最近总是咳嗽，晚上更严重，有时候还会有痰，该怎么办", "高血压", "胃疼三天了吃什么药好呢医生"]
    prompts = [prompt_ids(tokenizer, q) for q in questions]
    n = 16

    def reference(p: list[int]) -> str:
        x = torch.tensor([p])
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                             repetition_penalty=1.05, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
        ids = [t for t in out[0, len(p):].tolist() if t not in stops]
        return tokenizer.decode(ids, skip_special_tokens=True).strip()

    expected = [reference(p) for p in prompts]
    engine = Engine(model, tokenizer, stops, max_batch=3)
    engine.start()

    async def one(p: list[int], delay: float) -> tuple[str, str]:
        await asyncio.sleep(delay)
        text, last = "", None
        async for event in engine.submit(p, SamplingParams(max_tokens=n, temperature=0, repetition_penalty=1.05)):
            text, last = text + event.text, event
        return text, last.finish_reason

    async def all_of() -> list[tuple[str, str]]:
        return await asyncio.gather(*[one(p, 0.03 * i) for i, p in enumerate(prompts)])

    try:
        results = asyncio.run(all_of())
    finally:
        engine.shutdown()
    assert [t for t, _ in results] == expected
    assert engine.max_rows_seen == 3  # batched, and never beyond max_batch (the fourth waited)
    assert engine.joined >= 1  # at least one request joined a batch mid-decode


def test_queue_bound_and_cancel_while_waiting(base):
    model, tokenizer = base
    engine = Engine(model, tokenizer, [0], max_batch=1, max_queue=1)  # not started: requests stay queued

    async def go() -> None:
        handle = engine.submit([1, 2, 3], SamplingParams())
        with pytest.raises(QueueFull):
            engine.submit([1, 2, 3], SamplingParams())
        handle.cancel()
        assert engine.waiting == 0
        events = [e async for e in handle]  # a consumer waiting on it is released
        assert [e.finish_reason for e in events] == ["cancelled"]
        engine.submit([1, 2, 3], SamplingParams())

    asyncio.run(go())


def test_sampling_settings():
    import torch

    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    seen = torch.zeros(4, 50, dtype=torch.bool)
    best = logits.argmax(-1).tolist()
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, top_k=1),
              SamplingParams(temperature=1.0, top_k=0, top_p=1e-6), SamplingParams(temperature=1.0, top_k=0, min_p=1.0)]
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    assert sample(logits, seen, params, gens) == best
    free = [SamplingParams(temperature=1.5, top_k=0, top_p=1.0)] * 4
    draws = [sample(logits, seen, free, [torch.Generator().manual_seed(s) for s in (1, 2, 3, 4)]) for _ in range(2)]
    assert draws[0] == draws[1]  # a seed repeats its draws
    penalised = seen.clone()
    penalised[0, best[0]] = True
    logits[0, best[0]] = logits[0].sort(descending=True).values[1] + 1e-3  # barely ahead: a penalty drops it
    token = sample(logits, penalised, [SamplingParams(temperature=0, repetition_penalty=1.5)] + params[1:], gens)[0]
    assert token != best[0]


def test_answer_text_never_takes_back_and_ends_as_clean_answer():
    from medtune.infer import clean_answer

    boilerplate = ["你好", "祝您早日康复"]
    raw = "你好。头晕可能是低血压引起的。你好呀，多喝水！祝您早日康复。"
    visible = AnswerText(boilerplate)
    shown = ""
    for end in range(1, len(raw) + 1):
        now = visible(raw[:end], final=False)
        assert now.startswith(shown), (shown, now)
        assert "你好。" not in now and not now.startswith("你好")
        shown = now
    final = visible(raw, final=True)
    assert final.startswith(shown) and final == clean_answer(raw, boilerplate) == "头晕可能是低血压引起的。你好呀，多喝水！"
    assert AnswerText()("<think>\n\n</think>\n\n答案", final=False) == "答案"
