"""The seed's bug, proven fixed: a model trained in the chat format answers each question with its own answer.

The replaced scripts trained on one prompt format and asked questions in another, so the model answered
a different question. Here the tiny model memorises 32 real QA pairs through `medtune train`
(`memorised_adapter_dir`), then answers each question through the inference function (greedy, the true
sub-department in the system prompt). Negative control: the same model given the raw question, as the
seed's inference scripts did, must not reproduce the answers.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from medtune.config import ModelArgs
from medtune.infer import GenerationArgs, Query, generate, respond

OPENING = 30  # characters of the answer that must come back
# Greedy with no repetition penalty: the memorised answer itself, not a variation on it.
GREEDY = GenerationArgs(greedy=True, max_new_tokens=48, repetition_penalty=1.0, batch_size=8)


@pytest.mark.slow
def test_answers_begin_with_their_own_answer_only_in_the_chat_format(
        memorised_adapter_dir: Path, tiny_model_dir: Path, qa32_dir: Path):
    import pyarrow.parquet as pq

    from medtune.modeling import load_for_inference

    rows = pq.read_table(qa32_dir / "train.parquet").to_pylist()
    model, tokenizer, info = load_for_inference(
        ModelArgs(model=str(tiny_model_dir), adapter=[str(memorised_adapter_dir)], profile="cpu"))
    queries = [Query(r["question"], department=r["sub_department"] or r["department"]) for r in rows]
    answers = respond(model, tokenizer, queries, GREEDY, prompt_format=info.manifest["prompt_format"])
    own = sum(a.answer.startswith(r["answer"][:OPENING]) for a, r in zip(answers, rows))

    raw = generate(model, tokenizer, [r["question"] for r in rows], GREEDY)  # the seed's inference
    raw_own = sum(text.startswith(r["answer"][:OPENING]) for (text, *_), r in zip(raw, rows))

    print(f"\nseed-bug check: {own}/{len(rows)} answers with the chat format, {raw_own}/{len(rows)} without")
    assert len(rows) == 32
    assert own >= 0.9 * len(rows), [(r["answer"][:OPENING], a.answer[:OPENING]) for a, r in zip(answers, rows)]
    assert raw_own <= 0.25 * len(rows)
