"""Teacher-forced answer loss: the training tokenisation's labels, token-weighted, independent of batching."""
from __future__ import annotations

import math

import pytest

from medtune.chat_format import IGNORE_INDEX, build_messages, encode
from medtune.evaluate.loss import answer_loss

CONVERSATIONS = [
    build_messages("头晕怎么办？", "头晕的原因很多，建议先测量血压，注意休息。", department="神经科"),
    build_messages("高血压患者饮食要注意什么？", "低盐低脂饮食，戒烟限酒，规律服药。", department="心血管科"),
    build_messages("胃胀气，吃完饭更明显，是什么原因？已经两周了。", "可能是功能性消化不良，建议少食多餐，必要时做胃镜。",
                   department="消化科"),
]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from medtune.modeling import load_base

    return load_base(tiny_model_dir)


def _hf_loss(model, tokenizer, messages) -> tuple[float, int]:
    """transformers' own loss (mean over labelled tokens) of one encoded conversation, and the token count."""
    import torch

    enc = encode(tokenizer, messages)
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([enc.input_ids]), labels=torch.tensor([enc.labels]))
    return float(out.loss), sum(label != IGNORE_INDEX for label in enc.labels)


def test_answer_loss_is_the_token_weighted_training_loss(tiny):
    model, tokenizer = tiny
    per = [_hf_loss(model, tokenizer, m) for m in CONVERSATIONS]
    want = sum(loss * n for loss, n in per) / sum(n for _, n in per)
    result = answer_loss(model, tokenizer, CONVERSATIONS, batch_size=2)
    assert result.answer_tokens == sum(n for _, n in per)
    assert result.examples == 3 and result.dropped == 0
    assert result.loss == pytest.approx(want, rel=1e-4)
    assert result.perplexity == pytest.approx(math.exp(want), rel=1e-4)
    # a random model over a ~4,000-token vocabulary: near log(4000) nats
    assert 6 < result.loss < 10
    one_at_a_time = answer_loss(model, tokenizer, CONVERSATIONS, batch_size=1)
    assert one_at_a_time.loss == pytest.approx(result.loss, rel=1e-4)


def test_conversations_too_long_are_dropped_and_counted(tiny):
    model, tokenizer = tiny
    long_answer = build_messages("头痛", "多休息。" * 200)
    result = answer_loss(model, tokenizer, CONVERSATIONS + [long_answer], max_seq_len=256)
    assert (result.examples, result.dropped) == (3, 1)


def test_output_layer_runs_only_at_answer_positions_and_matches_the_full_logits(tiny):
    """The head sees answer positions only; the loss equals the one over full-sequence logits."""
    import torch
    import torch.nn.functional as F

    from medtune.train import Collator, tokenize_conversations

    model, tokenizer = tiny
    dataset, _ = tokenize_conversations(tokenizer, CONVERSATIONS, 2048, source="test")
    batch = Collator(tokenizer.pad_token_id or 0)([dataset[i] for i in range(len(dataset))])
    with torch.inference_mode():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    full = float(F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels.flatten(),
                                 ignore_index=IGNORE_INDEX, reduction="sum"))
    answer_tokens = int((labels != IGNORE_INDEX).sum())
    seen = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, a, out: seen.append(tuple(out.shape)))
    try:
        result = answer_loss(model, tokenizer, CONVERSATIONS, batch_size=len(CONVERSATIONS))
    finally:
        handle.remove()
    assert seen == [(answer_tokens, model.config.vocab_size)]  # not batch x length x vocabulary
    assert logits.shape[0] * logits.shape[1] > 3 * answer_tokens
    assert result.answer_tokens == answer_tokens
    assert result.loss == pytest.approx(full / answer_tokens, rel=1e-5)
    # the hook is gone afterwards: a plain forward returns every position again
    with torch.inference_mode():
        again = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert again.shape == logits.shape


def test_answer_loss_through_a_peft_wrapper(tiny_model_dir, tiny):
    """An adapter-wrapped model (as evaluation loads it) exposes the same output layer to hook."""
    from peft import LoraConfig, get_peft_model

    from medtune.modeling import load_base

    model, tokenizer = tiny
    want = answer_loss(model, tokenizer, CONVERSATIONS)
    fresh, _ = load_base(tiny_model_dir)
    wrapped = get_peft_model(fresh, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))  # B = 0: same function
    seen = []
    handle = wrapped.get_output_embeddings().register_forward_hook(lambda m, a, out: seen.append(out.dim()))
    try:
        got = answer_loss(wrapped, tokenizer, CONVERSATIONS)
    finally:
        handle.remove()
    assert seen and set(seen) == {2}
    assert got.loss == pytest.approx(want.loss, rel=1e-5) and got.answer_tokens == want.answer_tokens
