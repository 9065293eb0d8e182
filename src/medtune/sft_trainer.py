"""The training loop: transformers' `Trainer` with the loss computed only where there is one to learn,
checkpoints that are complete or absent, Ctrl-C that saves, and the after-run figures (loss curve, peak memory).

- Loss at supervised positions only: a forward pre-hook on the output layer keeps the hidden states
  whose next token is a label, so the vocabulary projection (151,936 columns for Qwen3) and the cross
  entropy run on answer tokens alone, not on prompt and padding positions.
- Atomic checkpoints: `Trainer` writes ``checkpoint-N`` file by file; here it writes into
  ``.incomplete/checkpoint-N`` and the directory is renamed into place once every file (and every
  process's RNG state) is there. A process killed midway leaves only ``.incomplete/``, which resume
  never looks at; the rename is atomic on one filesystem.

Imports torch and transformers at module level: only `medtune train` imports it.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import signal
import threading
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import Trainer, TrainerCallback

from medtune.chat_format import IGNORE_INDEX

log = logging.getLogger(__name__)

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
STAGING = ".incomplete"


# ----------------------------------------------------------------------------- checkpoints on disk

def checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints in ``folder`` (``checkpoint-N`` directories with a trainer state), oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir()
             if (m := CHECKPOINT.match(p.name)) and (p / "trainer_state.json").is_file()]
    return [p for _, p in sorted(found)]


def last_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint in ``folder``, or None."""
    found = checkpoints(folder)
    return found[-1] if found else None


def checkpoint_step(path: Path) -> int:
    m = CHECKPOINT.match(Path(path).name)
    if not m:
        raise ValueError(f"{path} is not a checkpoint-N directory")
    return int(m.group(1))


def _rotate(folder: Path, keep: int | None) -> None:
    if not keep:
        return
    for old in checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- loss at supervised positions

class _KeepPositions:
    """Forward pre-hook of the output layer: with ``mask`` set, only the hidden states it selects go on."""

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None

    def __call__(self, module: torch.nn.Module, args: tuple) -> tuple | None:
        if self.mask is None:
            return None
        hidden, *rest = args
        return (hidden[self.mask], *rest)


class SFTTrainer(Trainer):
    """`Trainer` for causal-LM fine-tuning on (ids, labels[, position_ids]) batches.

    ``supervised_logits_only``: logits and loss only at positions whose next token carries a label
    (False: the model's own loss over every position; same value, more compute).
    ``length_grouped``: batches of rows of similar lengths (`medtune.packing.LengthGroupedSampler`), for
    packed rows and plain examples alike: little padding to the longest row of a batch.
    """

    def __init__(self, *args: Any, supervised_logits_only: bool = True, length_grouped: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.length_grouped = length_grouped
        self._keep: _KeepPositions | None = None
        if supervised_logits_only:
            self._keep = _KeepPositions()
            self._unwrapped_causal_lm().get_output_embeddings().register_forward_pre_hook(self._keep)
        # Our loss is normalised by the token count of the whole accumulated batch (num_items_in_batch).
        self.model_accepts_loss_kwargs = True

    def _unwrapped_causal_lm(self) -> Any:
        model = self.model
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._keep is None:
            inputs = dict(inputs)
            if num_items_in_batch is not None:
                inputs["num_items_in_batch"] = num_items_in_batch
            outputs = model(**inputs)
            loss = outputs.loss
        else:
            inputs = dict(inputs)
            labels = inputs.pop("labels")
            keep = torch.zeros_like(labels, dtype=torch.bool)
            keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
            targets = labels[:, 1:][keep[:, :-1]]
            self._keep.mask = keep
            try:
                outputs = model(**inputs)
            finally:
                self._keep.mask = None
            loss = torch.nn.functional.cross_entropy(outputs.logits.float(), targets, reduction="sum")
            count = num_items_in_batch if num_items_in_batch is not None else targets.numel()
            loss = loss / (count.to(loss.device) if torch.is_tensor(count) else max(count, 1))
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # As `Trainer.compute_loss`: the count is summed over processes, and DDP averages gradients.
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    @property
    def padding_fraction(self) -> float | None:
        """Share of the training positions computed so far that were padding."""
        return getattr(self.data_collator, "padding_fraction", None)

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        # A fresh collator: its padding counts must stay those of training.
        collator = self.data_collator
        if dataclasses.is_dataclass(collator):
            self.data_collator = dataclasses.replace(collator, tokens=0, slots=0)
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            self.data_collator = collator

    def _get_train_sampler(self, *args: Any, **kwargs: Any):
        if not self.length_grouped:
            return super()._get_train_sampler(*args, **kwargs)
        from medtune.packing import LengthGroupedSampler

        return LengthGroupedSampler(self.train_dataset.lengths, self.args.per_device_train_batch_size,
                                    seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed)

    # ------------------------------------------------------------------------- atomic checkpoints

    def _get_output_dir(self, trial: Any) -> str:
        root = super()._get_output_dir(trial)
        return os.path.join(root, STAGING) if getattr(self, "_staging", False) else root

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        root = Path(self._get_output_dir(trial))
        name = f"checkpoint-{self.state.global_step}"
        staged, final = root / STAGING / name, root / name
        if self.is_world_process_zero() and staged.exists():
            shutil.rmtree(staged)  # left by a killed process
        self.accelerator.wait_for_everyone()
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = False
        self.accelerator.wait_for_everyone()  # every process's files (RNG states) are in
        if self.is_world_process_zero():
            if final.exists():  # the same step saved again after a resume
                old = root / STAGING / f"{name}.old"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
                shutil.rmtree(old)
            os.replace(staged, final)
            _fsync_dir(root)
            _rotate(root, self.args.save_total_limit)
            log.info("saved %s", final)
        self.accelerator.wait_for_everyone()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- Ctrl-C

class SaveOnInterrupt(TrainerCallback):
    """The first Ctrl-C (SIGINT) finishes the current step, saves a checkpoint and stops; a second one
    stops at once. Under several processes every one stops at the same step."""

    def __init__(self) -> None:
        self.requested = False
        self.stopped_at: int | None = None
        self._previous: Any = None

    def __enter__(self) -> "SaveOnInterrupt":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("interrupt: finishing this step, saving a checkpoint, then stopping (Ctrl-C again to quit now)")

    def on_step_end(self, args, state, control, **kwargs):
        stop = self.requested
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor([int(stop)], device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            stop = bool(flag.item())
        if stop:
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step
        return control


# ----------------------------------------------------------------------------- after the run

def peak_memory_bytes(device: str) -> int:
    """Peak memory of this process so far: CUDA allocations on a GPU, the resident set size on the CPU."""
    if device == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # bytes on macOS, KiB on Linux


def loss_points(log_history: Sequence[dict[str, Any]]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(step, training loss) and (step, validation loss) pairs from a `Trainer` log."""
    train = [(row["step"], row["loss"]) for row in log_history if "loss" in row and "step" in row]
    valid = [(row["step"], row["eval_loss"]) for row in log_history if "eval_loss" in row and "step" in row]
    return train, valid


def plot_loss_curve(log_history: Sequence[dict[str, Any]], path: Path, title: str = "") -> Path | None:
    """Training and validation loss against the step, as a PNG; None when there is nothing to draw."""
    train, valid = loss_points(log_history)
    if not train and not valid:
        return None
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, safe in any thread

    fig = Figure(figsize=(7, 4), dpi=120)
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train), label="training loss", linewidth=1.2)
    if valid:
        ax.plot(*zip(*valid), "o-", label="validation loss", linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per answer token)")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)
