"""Teacher-forced answer loss and perplexity: how likely the model finds the reference answers.

The conversations are tokenised exactly as for training (`medtune.train.tokenize_conversations`:
the chat format, loss on each answer and its end-of-turn token only, over-long questions shortened),
so the figure is the training objective measured on held-out data. No generation: fast.

Memory: the output layer runs only at the positions that predict an answer token (a forward pre-hook on
the model's output embeddings selects those hidden states), so a batch holds answer tokens x vocabulary
logits rather than batch x length x vocabulary (Qwen3: 151,936 per position, 2.5 GB in float32 for a
batch of 4 x 1,024 tokens; a few hundred MB for their answers).
"""
from __future__ import annotations

import dataclasses
import math
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

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
    Memory: a batch's logits are (answer tokens of the batch) x vocabulary floats (see the module docstring).
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
            labels = batch["labels"]
            # Position t predicts token t + 1: keep the positions whose next token is supervised.
            keep = torch.zeros_like(labels, dtype=torch.bool)
            keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
            targets = labels[:, 1:][keep[:, :-1]]
            with torch.inference_mode(), _output_layer_at(model, keep):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            if logits.dim() != 2:  # no output layer to hook: the logits of every position came back
                logits = logits[keep]
            total += float(F.cross_entropy(logits.float(), targets, reduction="sum"))
            count += int(targets.numel())
            if progress is not None:
                progress(len(rows))
    finally:
        model.train(was_training)
    loss = total / count if count else float("nan")
    return LossResult(loss=loss, perplexity=math.exp(loss) if count else float("nan"), answer_tokens=count,
                      examples=stats.examples, dropped=stats.dropped)


@contextmanager
def _output_layer_at(model: Any, keep: Any) -> Iterator[None]:
    """While inside, the model's output layer sees only the hidden states at ``keep`` (batch x length,
    bool), flattened in row order: the logits come back as (keep.sum(), vocabulary)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        yield
        return

    def select(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        hidden = args[0]
        if hidden.dim() == 3 and hidden.shape[:2] == keep.shape:
            hidden = hidden[keep]
        return (hidden, *args[1:]), kwargs

    handle = head.register_forward_pre_hook(select, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
