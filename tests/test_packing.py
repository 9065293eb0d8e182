"""Packing: every example in a packed row has exactly the loss it has alone; rows, samplers and the collator."""
from __future__ import annotations

from pathlib import Path

import pytest

from medtune.chat_format import IGNORE_INDEX, build_messages, encode
from medtune.packing import Collator, LengthGroupedSampler, PackedDataset, pack_lengths, padding_fraction
from medtune.train import Plan, SupervisedDataset, TrainArgs, add_lora, training_arguments

PAIRS = [("头晕怎么办？", "多休息，测血压。"), ("胃胀气吃什么药？", "少食多餐，必要时就医。" * 3),
         ("孩子发烧38度", "物理降温，多喝水。"), ("失眠多梦", "规律作息。" * 5), ("咳嗽有痰", "多喝温水。")]


@pytest.fixture(scope="module")
def model_and_examples(tiny_model_dir: Path):
    from medtune.modeling import load_base

    model, tokenizer = load_base(tiny_model_dir, for_training=True)
    model.eval()  # no dropout: the same input must give the same loss
    dataset = SupervisedDataset()
    for q, a in PAIRS:
        dataset.append(encode(tokenizer, build_messages(q, a), max_seq_len=256))
    return model, tokenizer, dataset


def _token_losses(logits, labels):
    import torch

    return torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2).float(), labels[:, 1:],
                                             ignore_index=IGNORE_INDEX, reduction="none")


def _alone(model, example) -> float:
    import torch

    ids = torch.as_tensor(example["input_ids"], dtype=torch.long)[None]
    labels = torch.as_tensor(example["labels"], dtype=torch.long)[None]
    with torch.no_grad():
        return _token_losses(model(input_ids=ids).logits, labels).sum().item()


def _packed(model, rows, position_ids=None) -> tuple[dict[int, float], object]:
    """Summed loss of each example of ``rows`` computed inside its packed row (padded batch of all rows)."""
    import torch

    collator = Collator(pad_token_id=0)
    batch = collator([rows[r] for r in range(len(rows))])
    with torch.no_grad():
        losses = _token_losses(model(input_ids=batch["input_ids"],
                                     position_ids=batch["position_ids"] if position_ids is None else position_ids).logits,
                               batch["labels"])
    out, lengths = {}, rows.examples.lengths
    for r, members in enumerate(rows.rows):
        start = 0
        for i in members:
            # the prediction at position p targets token p+1: the example's predictions are [start, start+n-1)
            out[i] = losses[r, start:start + lengths[i] - 1].sum().item()
            start += lengths[i]
    return out, batch


def test_every_packed_example_has_its_loss_alone(model_and_examples):
    import torch

    model, _, dataset = model_and_examples
    rows = PackedDataset(dataset, max_seq_len=2 * max(dataset.lengths))
    assert len(rows) < len(dataset) and max(len(r) for r in rows.rows) >= 2  # really packed
    assert len(set(rows.lengths)) > 1  # rows of different lengths: the batch has a padding tail too
    packed, batch = _packed(model, rows)
    assert "attention_mask" not in batch
    for i in range(len(dataset)):
        assert abs(packed[i] - _alone(model, dataset[i])) < 1e-3, i  # summed over ~50 tokens (~60 nats)

    # Control: the same rows with positions running on across examples (no restart) leak across examples.
    running = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])
    leaked, _ = _packed(model, rows, position_ids=running)
    second = [members[1] for members in rows.rows if len(members) > 1]
    assert any(abs(leaked[i] - _alone(model, dataset[i])) > 1e-2 for i in second)


def test_loss_at_supervised_positions_only_equals_the_full_loss(model_and_examples, tmp_path: Path):
    import torch

    from medtune.sft_trainer import SFTTrainer

    _, tokenizer, dataset = model_and_examples
    from medtune.modeling import load_base

    base, _ = load_base(Path(tokenizer.name_or_path), for_training=True)
    model = add_lora(base, TrainArgs(lora_dropout=0.0))
    model.eval()
    rows = PackedDataset(dataset, max_seq_len=2 * max(dataset.lengths))
    collator = Collator(tokenizer.pad_token_id)
    batch = collator([rows[r] for r in range(len(rows))])
    plan = Plan("cpu", "cpu", "none", "fp32", 2, 1, 512, False)
    trainer = SFTTrainer(model=model, args=training_arguments(plan, TrainArgs(), tmp_path), train_dataset=rows,
                         data_collator=collator)
    with torch.no_grad():
        ours = trainer.compute_loss(model, dict(batch))
        full = model(**batch).loss  # transformers' loss: logits at every position
    assert ours.item() == pytest.approx(full.item(), rel=1e-5)
    assert collator.padding_fraction == pytest.approx(padding_fraction(rows.lengths, [list(range(len(rows)))]))


def test_rows_hold_every_example_once_within_capacity():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(20, 400) for _ in range(500)]
    rows = pack_lengths(lengths, 512)
    assert sorted(i for row in rows for i in row) == list(range(500))
    assert all(sum(lengths[i] for i in row) <= 512 for row in rows)
    assert sum(lengths) / (512 * len(rows)) > 0.95  # best-fit decreasing fills rows
    with pytest.raises(ValueError, match="exceeds"):
        pack_lengths([600], 512)


def test_packed_row_labels_positions_and_padding(model_and_examples):
    _, _, dataset = model_and_examples
    rows = PackedDataset(dataset, max_seq_len=2 * max(dataset.lengths))
    r = next(k for k, members in enumerate(rows.rows) if len(members) > 1)
    row, a = rows[r], rows.rows[r][0]
    n = dataset.lengths[a]
    assert list(row["position_ids"][: n + 2]) == [*range(n), 0, 1]
    assert row["labels"][n] == IGNORE_INDEX  # no example learns its neighbour's first token
    assert list(row["input_ids"][:n]) == list(dataset[a]["input_ids"])
    batch = Collator(pad_token_id=7)([rows[0], rows[r]])
    short = min(range(2), key=lambda k: len(rows[[0, r][k]]["input_ids"]))
    m = len(rows[[0, r][short]]["input_ids"])
    if m < batch["input_ids"].shape[1]:  # the padding tail restarts its positions and carries no label
        assert batch["position_ids"][short, m].item() == 0
        assert (batch["labels"][short, m:] == IGNORE_INDEX).all() and (batch["input_ids"][short, m:] == 7).all()


def test_length_grouped_sampler_is_a_seeded_permutation_per_epoch():
    lengths = [(i * 37) % 101 + 1 for i in range(300)]
    sampler = LengthGroupedSampler(lengths, batch_size=4, seed=3, group=8)
    first = list(sampler)
    assert sorted(first) == list(range(300)) and first == list(LengthGroupedSampler(lengths, 4, seed=3, group=8))
    sampler.set_epoch(1)
    assert list(sampler) != first
    batches = [first[k:k + 4] for k in range(0, 300, 4)]
    shuffled = list(range(300))
    random_batches = [shuffled[k:k + 4] for k in range(0, 300, 4)]
    assert padding_fraction(lengths, batches) < 0.5 * padding_fraction(lengths, random_batches)


def test_batched_tokenising_gives_exactly_what_encode_gives(model_and_examples):
    from medtune.chat_format import Overlong, encode_many

    _, tokenizer, _ = model_and_examples
    conversations = [build_messages(q * k, a * k) for k in (1, 4, 12) for q, a in PAIRS]
    conversations += [build_messages(q * 40, a) for q, a in PAIRS]  # long questions: shortened, answer kept
    conversations.append([{"role": "user", "content": "没有回答"}])  # invalid: must come back as its error
    for max_len, overlong in ((None, "shorten"), (160, "shorten"), (160, "drop")):
        batched = encode_many(tokenizer, conversations, max_seq_len=max_len, overlong=overlong)
        for messages, got in zip(conversations, batched):
            try:
                want = encode(tokenizer, messages, max_seq_len=max_len, overlong=overlong)
            except ValueError as e:
                assert type(got) is type(e) and str(got) == str(e)
                continue
            assert (got.input_ids, got.labels, got.shortened) == (want.input_ids, want.labels, want.shortened)
        if max_len:
            assert any(isinstance(g, Overlong) for g in batched) or overlong == "shorten"
            assert any(getattr(g, "shortened", False) for g in batched) or overlong == "drop"
