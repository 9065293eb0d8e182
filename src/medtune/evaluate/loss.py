"""Teacher-forced answer loss and perplexity: how likely the model finds the reference answers.

The conversations are tokenised exactly as for training (`medtune.train.tokenize_conversations`:
the chat format, loss on each answer and its end-of-turn token only, over-long questions shortened),
so the figure is the training objective measured on held-out data. No generation: fast.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

from medtune.chat_format import DEFAULT_PROMPT_FORMAT, IGNORE_INDEX, Message


@dataclasses.dataclass
class LossResult:
    """Mean negative log-likelihood per answer token (nats) and its exponential."""

    loss: float
    perplexity: float
    answer_tokens: int
    examples: int
    dropped: int  # conversations too long for max_seq_len even with the question shortened


def answer_loss(
    model: Any,
    tokenizer: Any,
    conversations: Sequence[Sequence[Message]],
    *,
    max_seq_len: int = 2048,
    batch_size: int = 4,
    prompt_format: str = DEFAULT_PROMPT_FORMAT,
    progress: Any = None,
) -> LossResult:
    """Token-weighted mean loss of the answers of ``conversations`` (each ending with the assistant's turn).

    Batches are right-padded, shortest first. ``progress(n)`` is called after each batch with its size.
    Memory: a batch's logits are batch x length x vocabulary floats (Qwen3: 151,936 per position).
    """
    import torch
    import torch.nn.functional as F

    from medtune.train import Collator, tokenize_conversations

    dataset, stats = tokenize_conversations(tokenizer, conversations, max_seq_len, prompt_format=prompt_format,
                                            source="evaluation")
    collate = Collator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    order = sorted(range(len(dataset)), key=dataset.lengths.__getitem__)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            batch = {k: v.to(device) for k, v in collate([dataset[i] for i in rows]).items()}
            with torch.inference_mode():
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            total += float(F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels.flatten(),
                                           ignore_index=IGNORE_INDEX, reduction="sum"))
            count += int((labels != IGNORE_INDEX).sum())
            if progress is not None:
                progress(len(rows))
    finally:
        model.train(was_training)
    loss = total / count if count else float("nan")
    return LossResult(loss=loss, perplexity=math.exp(loss) if count else float("nan"), answer_tokens=count,
                      examples=stats.examples, dropped=stats.dropped)
