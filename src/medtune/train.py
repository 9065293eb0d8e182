"""`medtune train`: LoRA / QLoRA supervised fine-tuning on a prepared data directory.

    medtune train --model models/tiny --data runs/data --output runs/adapter --max-steps 50
    medtune train --model Qwen/Qwen3-4B --profile cuda-8gb --data runs/data --output runs/qwen3-4b-qlora

The pipeline: pick the plan (profile + flags) → load the base (NF4 for QLoRA) → tokenise the
conversations with the chat format (loss on each answer and its ``<|im_end|>`` only) → add LoRA
adapters (peft) → train with transformers' `Trainer` → write an adapter directory that later stages
load from alone:

    adapter_model.safetensors, adapter_config.json   the LoRA weights (peft)
    tokenizer.json, tokenizer_config.json, chat_template.jinja   the base's tokenizer, same chat template
    train_config.yaml     the exact options used (a recipe: `medtune train --config train_config.yaml`)
    medtune.json          manifest: base id + revision as given, prompt format, plan, data hash, results
    train_log.jsonl       the Trainer's log (loss, learning rate, grad norm per logging step)
    data_manifest.json, boilerplate.json, department_classifier.npz   copied from the data directory
    README.md             peft's model card
    loss_curve.png        training and validation loss against the step
    runs/                 TensorBoard logs (`tensorboard --logdir OUTPUT/runs`)
    checkpoints/          checkpoint-N every --save-steps steps (the newest --save-total-limit kept; written
                          atomically), or one written on Ctrl-C; `--resume latest` continues from the newest

Examples are packed into rows of up to ``--max-seq-len`` tokens (attention kept inside each example,
see `medtune.packing`); ``--no-packing`` batches examples of similar length instead.

Raw data given as ``--data`` is prepared first into ``OUTPUT-data`` (beside the adapter, not inside it).

The core imports only torch, transformers and peft (and pyarrow to read the Parquet splits), so it runs
on machines without `datasets` or `trl`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from array import array
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Sequence

from medtune.chat_format import DEFAULT_PROMPT_FORMAT, IGNORE_INDEX, Encoded, Message, Overlong, encode_many
from medtune.config import ModelArgs, arg
from medtune.data.classifier import CLASSIFIER_FILE
from medtune.errors import DataError, MedtuneError
from medtune.modeling import MANIFEST
from medtune.packing import Collator  # noqa: F401  (part of this module's interface since the first version)

if TYPE_CHECKING:
    import numpy as np
    import torch

    from medtune.memory import ModelShape, Setting
    from medtune.profiles import Profile

log = logging.getLogger(__name__)

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DATA_FILES = {"manifest.json": "data_manifest.json", "boilerplate.json": "boilerplate.json",
              CLASSIFIER_FILE: CLASSIFIER_FILE}
CONFIG_FILE = "train_config.yaml"


@dataclasses.dataclass
class TrainArgs:
    """LoRA / QLoRA fine-tuning options; batch sizes, sequence length and precision default to the profile's."""

    lora_r: int = arg(16, "LoRA rank (the seed: 16)")
    # alpha = 2 x r (scale 2): the ratio most LoRA recipes use, and the setting measured to learn this
    # data on this stack (../shared/FACTS.md); the seed's alpha = r halves the update at the same lr.
    lora_alpha: int = arg(32, "LoRA alpha; the update is scaled by alpha / r (alpha / sqrt(r) with --use-rslora)")
    lora_dropout: float = arg(0.05, "dropout on the LoRA input")
    target_modules: list[str] = arg(factory=lambda: list(ALL_LINEAR),
                                    help="module that gets LoRA adapters; repeat the flag")
    use_rslora: bool = arg(False, "rank-stabilised LoRA: scale by alpha / sqrt(r)")
    use_dora: bool = arg(False, "weight-decomposed LoRA (DoRA): slower, sometimes better at low rank")
    lr: float = arg(2e-4, "peak learning rate (the seed: 2e-4)")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = arg("linear", "learning-rate schedule")
    warmup: float = arg(0.03, "warm-up: a fraction of the steps (< 1) or a number of steps (>= 1)")
    weight_decay: float = arg(0.01, "AdamW weight decay")
    max_grad_norm: float = arg(1.0, "gradient clipping norm")
    max_steps: int = arg(600, "optimiser steps (the seed: 600); ignored when --epochs is given")
    epochs: float | None = arg(None, "train for this many passes over the data instead of --max-steps")
    micro_batch: int | None = arg(None, "sequences per forward pass (default: the profile's)")
    grad_accum: int | None = arg(None, "micro-batches per optimiser step (default: the profile's)")
    max_seq_len: int | None = arg(None, "tokens per sequence (default: the profile's); longer examples get "
                                        "their question shortened or are dropped, never their answer cut")
    overlong: Literal["shorten", "drop"] = arg("shorten", "what to do with an example longer than --max-seq-len")
    gradient_checkpointing: bool | None = arg(None, "recompute activations in the backward pass (default: the profile's)")
    precision: Literal["fp32", "bf16", "fp16"] | None = arg(
        None, "training precision (default: the profile's; bf16 falls back to fp16 on GPUs without it)")
    seed: int = arg(42, "seed of the LoRA initialisation, dropout and data order")
    threads: int | None = arg(None, "torch CPU threads (pin for reproducible CPU runs)")
    deterministic: bool = arg(False, "deterministic kernels only (slower; for exact reproductions)")
    logging_steps: int = arg(10, "log loss and learning rate every N steps")
    save_steps: int = arg(0, "also save a checkpoint every N steps into OUTPUT/checkpoints (0: only the final adapter)")
    save_total_limit: int = arg(3, "keep the newest N checkpoints, deleting older ones (0: keep all)")
    packing: bool | None = arg(None, "pack several examples into each row of --max-seq-len tokens (attention stays "
                                     "inside each example); --no-packing pads batches of similar-length examples "
                                     "instead (default: packing only with flash-attention, see use_packing)")
    eval_steps: int = arg(100, "validation loss every N steps and at the end (0: never)")
    eval_samples: int = arg(200, "validation examples used for that loss (0: the whole validation split)")
    tensorboard: bool = arg(True, "TensorBoard logs in OUTPUT/runs")

    def __post_init__(self) -> None:
        problems = []
        for name in ("lora_r", "lora_alpha", "max_steps", "logging_steps"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("micro_batch", "grad_accum", "max_seq_len", "threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if not 0 <= self.lora_dropout < 1:
            problems.append(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if self.lr <= 0:
            problems.append(f"--lr must be positive, got {self.lr}")
        if self.epochs is not None and self.epochs <= 0:
            problems.append(f"--epochs must be positive, got {self.epochs}")
        for name in ("save_steps", "save_total_limit", "eval_steps", "eval_samples"):
            if getattr(self, name) < 0:
                problems.append(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(self, name)}")
        if not self.target_modules:
            problems.append("--target-modules: give at least one module name")
        if problems:
            raise ValueError("; ".join(problems))


@dataclasses.dataclass
class Plan:
    """What a run will do on this machine: the profile's settings with the flags applied."""

    profile: str
    device: str
    quant: str
    precision: str
    micro_batch: int
    grad_accum: int
    max_seq_len: int
    gradient_checkpointing: bool
    trainable_parameters: int | None = None  # LoRA's, from the model's shape (None: shape unknown)
    estimated_peak_bytes: int | None = None  # medtune.memory's estimate of the step's peak (None: shape unknown)
    memory_budget_bytes: int | None = None  # free GPU memory (or available RAM on the CPU) when planned
    reason: str = ""  # why this profile: given by --profile, or what detection saw

    @property
    def effective_batch(self) -> int:
        return self.micro_batch * self.grad_accum

    def describe(self) -> str:
        """The plan as printed before training (several lines)."""
        gib = 2**30
        lines = [f"plan: profile {self.profile} on {self.device} ({self.reason or 'given'})",
                 f"  quantisation {self.quant}, precision {self.precision}, micro-batch {self.micro_batch} x "
                 f"accumulation {self.grad_accum} = {self.effective_batch} sequences per step, sequence length "
                 f"{self.max_seq_len:,}, gradient checkpointing {'on' if self.gradient_checkpointing else 'off'}"]
        if self.trainable_parameters is not None:
            lines.append(f"  trainable parameters {self.trainable_parameters:,} (LoRA)")
        if self.estimated_peak_bytes is not None:
            budget = (f" of {self.memory_budget_bytes / gib:.1f} GiB free" if self.memory_budget_bytes else "")
            lines.append(f"  estimated peak memory {self.estimated_peak_bytes / gib:.2f} GiB{budget}")
        else:
            lines.append("  estimated peak memory: unknown (no config.json to read the model's shape from yet)")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- set-up

def setup_determinism(args: TrainArgs) -> None:
    """Pin threads and seeds before anything random (the LoRA initialisation) happens."""
    import torch
    from transformers import set_seed

    if args.threads:
        torch.set_num_threads(args.threads)
    set_seed(args.seed, deterministic=args.deterministic)


def make_plan(model: ModelArgs, args: TrainArgs, *, shape: "ModelShape | None" = None) -> Plan:
    """The profile (``--profile``, else chosen from the device and its free memory) with ``--quant`` and the
    size/precision flags applied, with its estimated peak memory. A plan whose estimate exceeds the free
    memory is refused (`MedtuneError` naming the profiles or flags that would fit).

    ``shape`` defaults to the model's (its ``config.json``, or the Qwen3 table for a hub id not yet
    downloaded); without one the profile comes from the table's memory thresholds and nothing is refused.
    """
    import dataclasses as dc

    from medtune import memory
    from medtune.profiles import PROFILES, gpu_memory, profile_for_memory

    shape = shape or memory.read_shape(model.model, model.models_dir)
    gpus, free = gpu_memory()

    def plan_for(name: str, reason: str = "") -> Plan:
        return plan_for_profile(name, model, args, reason=reason)

    def setting(plan: Plan) -> memory.Setting:
        return memory_setting(plan, args)

    single = [n for n in reversed(PROFILES) if n.startswith("cuda-")]  # biggest first
    seen = f"{gpus} GPU{'s' if gpus > 1 else ''}, {free / 2**30:.1f} GiB free" if gpus else "no GPU"
    if model.profile:
        plan = plan_for(model.profile, "--profile")
        if plan.device == "cuda" and not gpus:
            raise MedtuneError(f"--profile {plan.profile} needs a CUDA GPU, and torch sees none; use --profile cpu")
    elif not gpus:
        plan = plan_for("cpu", "detected: no GPU")
    elif gpus > 1:
        plan = plan_for("multi-gpu", f"detected: {seen}")
    elif shape is None:
        plan = plan_for(profile_for_memory((free + memory.CUDA_CONTEXT_BYTES) / 2**30, gpus), f"detected: {seen}")
    else:
        # Rows meant for this card or a smaller one (never a bigger card's row, whatever the flags), the
        # biggest whose estimate fits; none: the smallest, refused below with what would fit.
        sized = [n for n in single if PROFILES[n].min_gpu_memory_gib * 2**30 <= free + memory.CUDA_CONTEXT_BYTES]
        candidates = {name: setting(plan_for(name)) for name in sized}
        plan = plan_for(memory.first_fitting(shape, candidates, free) or single[-1], f"detected: {seen}")
    if shape is None:
        log.warning("%s: no config.json to read its shape from yet: the plan's memory is not estimated", model.model)
        return plan
    budget = free if plan.device == "cuda" else _available_ram()
    try:
        estimate = memory.estimate(shape, setting(plan))
    except ValueError as e:  # a --target-modules name the shape lacks: add_lora reports it with the model's names
        log.warning("memory not estimated: %s", e)
        return plan
    plan = dc.replace(plan, trainable_parameters=estimate.trainable_parameters,
                      estimated_peak_bytes=estimate.peak, memory_budget_bytes=budget)
    if budget and estimate.peak > budget:
        others = {n: setting(plan_for(n)) for n in (single if plan.device == "cuda" else [])}
        where = "this GPU" if plan.device == "cuda" else "this machine"
        raise MedtuneError(memory.refusal(shape, plan.profile, setting(plan), budget, where, others))
    return plan


def plan_for_profile(name: str, model: ModelArgs, args: TrainArgs, *, reason: str = "",
                     for_this_machine: bool = True) -> Plan:
    """Profile ``name`` with ``--quant`` and the size/precision flags applied (no estimate yet).
    ``for_this_machine``: precision as this machine runs it (imports torch); else as written."""
    from medtune.profiles import apply_quant_override, choose_precision, get_profile

    profile: Profile = apply_quant_override(get_profile(name), model.quant)
    precision = args.precision or profile.precision
    return Plan(
        profile=profile.name, device="cpu" if profile.name == "cpu" else "cuda", quant=profile.quant,
        precision=choose_precision(precision) if for_this_machine else precision,
        micro_batch=args.micro_batch or profile.micro_batch,
        grad_accum=args.grad_accum or profile.grad_accum,
        max_seq_len=args.max_seq_len or profile.max_seq_len,
        gradient_checkpointing=(profile.gradient_checkpointing if args.gradient_checkpointing is None
                                else args.gradient_checkpointing),
        reason=reason)


def memory_setting(plan: Plan, args: TrainArgs) -> "Setting":
    """What `medtune.memory.estimate` needs of a plan and the LoRA options."""
    from medtune.memory import Setting

    return Setting(quant=plan.quant, precision=plan.precision, micro_batch=plan.micro_batch,
                   max_seq_len=plan.max_seq_len, gradient_checkpointing=plan.gradient_checkpointing,
                   lora_r=args.lora_r, target_modules=tuple(args.target_modules))


def _available_ram() -> int | None:
    """Bytes of RAM available to a new allocation (None without psutil, as on the GPU machine)."""
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def is_prepared(path: Path) -> bool:
    return path.is_dir() and (path / "train.parquet").is_file() and (path / "manifest.json").is_file()


def prepared_data(data: Path, output: Path, *, reuse: bool = False) -> Path:
    """``data`` when it is a prepared directory; else raw data prepared into ``OUTPUT-data`` first (beside
    the adapter directory, which is meant to be shipped without its training corpus). ``reuse``: take
    ``OUTPUT-data`` as it is when it is already prepared (another process of this run prepared it)."""
    if is_prepared(data):
        return data
    from medtune.data.prepare import prepare

    target = output.with_name(output.name + "-data")
    if reuse and is_prepared(target):
        return target
    log.info("%s is not a prepared data directory: preparing it into %s", data, target)
    prepare(input=data, output=target)
    return target


@contextlib.contextmanager
def main_process_first(device: str):
    """Run the block in the main process first and in the others after it (they wait at a barrier);
    yields whether this is the main process. A plain block in a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield True
        return
    from accelerate import PartialState

    state = PartialState(cpu=device == "cpu")
    with state.main_process_first():
        yield state.is_main_process


# ----------------------------------------------------------------------------- data

def read_conversations(data_dir: Path, split: str = "train") -> list[list[Message]]:
    """The ``messages`` column of ``data_dir/<split>.parquet``."""
    import pyarrow.parquet as pq

    path = data_dir / f"{split}.parquet"
    if not path.is_file():
        raise DataError(f"no {split} split", path)
    try:
        column = pq.read_table(path, columns=["messages"]).column("messages").to_pylist()
    except (KeyError, ValueError) as e:
        raise DataError(f"unreadable or without a messages column ({e})", path, field="messages") from None
    return [[{"role": m["role"], "content": m["content"]} for m in conv] for conv in column]


class SupervisedDataset:
    """Pre-tokenised examples in two flat int32 buffers (ids, labels) with offsets: a map-style torch
    dataset (``len`` and ``[i]``) a few bytes per token, so a full corpus fits in memory.

    `lengths` lets length-grouped batching or packing be added on top.
    """

    def __init__(self) -> None:
        self._ids, self._labels, self._offsets = array("i"), array("i"), array("q", [0])

    def append(self, example: Encoded) -> None:
        self._ids.extend(example.input_ids)
        self._labels.extend(example.labels)
        self._offsets.append(len(self._ids))

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> dict[str, "np.ndarray"]:
        import numpy as np

        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        start, end = self._offsets[i], self._offsets[i + 1]
        # Slicing an array copies it: no view pins the growing buffers.
        return {"input_ids": np.frombuffer(self._ids[start:end], np.int32),
                "labels": np.frombuffer(self._labels[start:end], np.int32)}

    @property
    def lengths(self) -> list[int]:
        return [b - a for a, b in zip(self._offsets[:-1], self._offsets[1:])]


@dataclasses.dataclass
class TokenStats:
    examples: int = 0
    dropped: int = 0
    shortened: int = 0
    tokens: int = 0
    answer_tokens: int = 0


def tokenize_conversations(
    tokenizer: Any,
    conversations: Sequence[Sequence[Message]],
    max_seq_len: int,
    *,
    overlong: Literal["shorten", "drop"] = "shorten",
    prompt_format: str = DEFAULT_PROMPT_FORMAT,
    source: str = "train",
) -> tuple[SupervisedDataset, TokenStats]:
    """Tokenise with labels on the answers only; too-long examples shortened or dropped, and counted."""
    # tqdm, as the Trainer's own bar: a transformers dependency, present where rich may not be (the GPU machine).
    from tqdm.auto import tqdm

    dataset, stats = SupervisedDataset(), TokenStats()
    chunk = 512  # conversations tokenised per batch call
    with tqdm(total=len(conversations), desc=f"tokenising {source}", unit="ex", leave=False) as bar:
        for start in range(0, len(conversations), chunk):
            encoded = encode_many(tokenizer, conversations[start:start + chunk], max_seq_len=max_seq_len,
                                  prompt_format=prompt_format, overlong=overlong)
            for i, enc in enumerate(encoded, start):
                if isinstance(enc, Overlong):
                    stats.dropped += 1
                    log.debug("%s example %d dropped: %s", source, i, enc)
                    continue
                if isinstance(enc, ValueError):
                    raise DataError(f"example {i}: {enc}", source, field="messages") from None
                dataset.append(enc)
                stats.shortened += enc.shortened
                stats.tokens += len(enc)
                stats.answer_tokens += sum(label != IGNORE_INDEX for label in enc.labels)
            bar.update(len(encoded))
    stats.examples = len(dataset)
    if stats.dropped or stats.shortened:
        log.info("%s: %d examples; %d longer than %d tokens had their question shortened, %d were dropped",
                 source, stats.examples, stats.shortened, max_seq_len, stats.dropped)
    if not len(dataset):
        raise DataError(f"no example fits --max-seq-len {max_seq_len} (all {stats.dropped} too long)", source)
    return dataset, stats


# ----------------------------------------------------------------------------- model

def add_lora(model: Any, args: TrainArgs) -> Any:
    """Wrap ``model`` with LoRA adapters on ``args.target_modules`` (every name must exist in the model)."""
    from peft import LoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in args.target_modules if t not in present]
    if missing:
        raise MedtuneError(f"--target-modules: {', '.join(missing)} not in this model; "
                           f"its projections are {', '.join(sorted(p for p in present if p.endswith('proj')))}")
    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules=list(args.target_modules), use_rslora=args.use_rslora,
                        use_dora=args.use_dora, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


# ----------------------------------------------------------------------------- training

def training_arguments(plan: Plan, args: TrainArgs, output: Path, *, evaluate: bool = False):
    """transformers `TrainingArguments` for the plan; checkpoints only with --save-steps (or on Ctrl-C)."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(output / "checkpoints"),
        per_device_train_batch_size=plan.micro_batch,
        per_device_eval_batch_size=plan.micro_batch,
        gradient_accumulation_steps=plan.grad_accum,
        learning_rate=args.lr,
        lr_scheduler_type=args.lr_scheduler,
        warmup_steps=args.warmup,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        max_steps=-1 if args.epochs else args.max_steps,
        num_train_epochs=args.epochs or 1.0,
        bf16=plan.precision == "bf16",
        fp16=plan.precision == "fp16",
        use_cpu=plan.device == "cpu",
        logging_steps=args.logging_steps,
        logging_first_step=True,
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,
        save_total_limit=args.save_total_limit or None,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=args.eval_steps or None,
        prediction_loss_only=True,  # the validation loss; no logits kept
        seed=args.seed,
        data_seed=args.seed,
        full_determinism=args.deterministic,
        report_to="none",  # TensorBoard is added as a callback writing to OUTPUT/runs
        ddp_find_unused_parameters=False,  # every LoRA weight gets a gradient; the search only slows DDP
        remove_unused_columns=False,
        dataloader_num_workers=0,
        optim="adamw_torch",
    )


def _tensorboard(logdir: Path) -> Any:
    """transformers' TensorBoard callback writing to ``logdir``; None (with a warning) without tensorboard."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (what the callback needs)
        from transformers.integrations import TensorBoardCallback
    except ImportError as e:
        log.warning("no TensorBoard logs (%s); pip install tensorboard", e)
        return None
    callback = TensorBoardCallback()  # its writer is made on the main process only, when training begins
    callback.logging_dir = str(logdir)
    return callback


def use_packing(args: TrainArgs, model: Any) -> bool:
    """Whether to pack examples into rows: ``--packing``/``--no-packing``, else only under flash-attention.

    Packing removes padding, but attention kernels that take a block-diagonal mask (sdpa, eager) still
    compute the whole row: a row of four examples costs about four times their attention. Measured with
    bench/train_throughput.py on the CPU: packed 0.99x the padded baseline, length-grouped batches 1.22x.
    Flash-attention's variable-length kernels skip the masked blocks, so there packing wins.
    """
    if args.packing is not None:
        return args.packing
    implementation = getattr(getattr(model, "config", None), "_attn_implementation", None) or ""
    return "flash_attention" in implementation


def fit(model: Any, tokenizer: Any, dataset: SupervisedDataset, plan: Plan, args: TrainArgs, output: Path, *,
        eval_dataset: SupervisedDataset | None = None, resume_from: Path | None = None) -> Any:
    """Train ``model`` (already wrapped with LoRA) on ``dataset``; returns the `SFTTrainer` (its state has the
    log, ``padding_fraction`` the share of computed positions that were padding).

    ``eval_dataset``: validation loss every ``args.eval_steps`` steps. ``resume_from``: a checkpoint
    directory to continue from (step, optimizer, scheduler, RNG and data order). Ctrl-C saves a
    checkpoint and raises KeyboardInterrupt.
    """
    import torch

    from medtune.packing import PackedDataset
    from medtune.sft_trainer import SaveOnInterrupt, SFTTrainer

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    packing = use_packing(args, model)
    rows = PackedDataset(dataset, plan.max_seq_len) if packing else dataset
    eval_rows = None
    if eval_dataset is not None and args.eval_steps:
        eval_rows = PackedDataset(eval_dataset, plan.max_seq_len) if packing else eval_dataset
    interrupt = SaveOnInterrupt()
    callbacks = [interrupt]
    if args.tensorboard and (board := _tensorboard(output / "runs")) is not None:
        callbacks.append(board)
    trainer = SFTTrainer(
        model=model,
        args=training_arguments(plan, args, output, evaluate=eval_rows is not None),
        train_dataset=rows,
        eval_dataset=eval_rows,
        data_collator=Collator(pad, pad_to_multiple_of=8 if plan.device == "cuda" else None),
        processing_class=tokenizer,
        callbacks=callbacks,
        length_grouped=True,
    )
    trainer.packing = packing
    if packing:
        log.info("packed %d examples into %d rows of up to %d tokens", len(dataset), len(rows), plan.max_seq_len)
    if plan.device == "cuda" and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with interrupt:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    checkpoints = Path(trainer.args.output_dir)
    if interrupt.stopped_at is not None:
        log.warning("interrupted at step %d: checkpoint saved in %s; continue with --resume latest",
                    interrupt.stopped_at, checkpoints / f"checkpoint-{interrupt.stopped_at}")
        raise KeyboardInterrupt
    final = trainer.state.global_step
    if eval_rows is not None and not any("eval_loss" in r and r.get("step") == final for r in trainer.state.log_history):
        trainer.evaluate()  # the validation loss of the final weights (when the Trainer did not already take it)
    # Every rank lists OUTPUT/checkpoints as train() ends: only once all are done may the first remove it if empty.
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero() and checkpoints.is_dir() and not any(
            p for p in checkpoints.iterdir() if not p.name.startswith(".")):
        shutil.rmtree(checkpoints)
    return trainer


# ----------------------------------------------------------------------------- the adapter directory

def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value) if isinstance(value, Path) else value


def used_config(model: ModelArgs, data: Path, output: Path, plan: Plan, args: TrainArgs) -> dict[str, Any]:
    """The options of this run as a recipe, with the profile's choices written out (same run elsewhere)."""
    return {
        "model": dataclasses.replace(model, profile=plan.profile, quant=plan.quant),
        "data": str(data),
        "output": str(output),
        "train": dataclasses.replace(args, micro_batch=plan.micro_batch, grad_accum=plan.grad_accum,
                                     max_seq_len=plan.max_seq_len, precision=plan.precision,
                                     gradient_checkpointing=plan.gradient_checkpointing),
    }


def adapter_manifest(model: ModelArgs, base_path: Path, plan: Plan, args: TrainArgs, data_dir: Path,
                     stats: TokenStats, result: dict[str, Any]) -> dict[str, Any]:
    """The `medtune.json` of an adapter: what later stages need to load and use it from its directory alone."""
    return {
        "format": 1,
        "kind": "lora",
        # As given (a hub id is portable); the local path exists only on the training machine.
        "base_model": model.model,
        "base_revision": model.revision,
        "hub": model.hub,
        "base_local_path": str(base_path),
        "prompt_format": DEFAULT_PROMPT_FORMAT,
        "data": {"path": str(data_dir), "manifest_sha256": _sha256(data_dir / "manifest.json"),
                 **dataclasses.asdict(stats)},
        "plan": plan,
        "lora": {k: getattr(args, k) for k in ("lora_r", "lora_alpha", "lora_dropout", "target_modules",
                                               "use_rslora", "use_dora")},
        "result": result,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": _versions(),
    }


def save_adapter(model: Any, tokenizer: Any, output: Path, *, data_dir: Path, manifest: dict[str, Any],
                 config: dict[str, Any], log_history: list[dict[str, Any]],
                 state_dict: dict[str, Any] | None = None) -> None:
    """Write the adapter directory (layout in the module docstring); ``state_dict``: gathered weights
    (ZeRO-3 / FSDP), else the model's own."""
    import yaml
    from transformers import AutoTokenizer

    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output, safe_serialization=True, **({"state_dict": state_dict} if state_dict else {}))
    tokenizer.save_pretrained(output)
    # The adapter must answer in exactly the base's format: a template changed on the way (e.g. a training
    # template swapped in by a library) would bring the seed's bug back.
    if AutoTokenizer.from_pretrained(output).chat_template != tokenizer.chat_template:
        raise MedtuneError(f"the chat template saved in {output} differs from the base tokenizer's")
    for name, target in DATA_FILES.items():
        if (data_dir / name).is_file():
            shutil.copyfile(data_dir / name, output / target)
        else:
            log.warning("%s has no %s: later stages will lack it", data_dir, name)
    (output / CONFIG_FILE).write_text(
        "# The options this adapter was trained with; rerun: medtune train --config " + CONFIG_FILE + "\n"
        + yaml.safe_dump(_jsonable(config), allow_unicode=True, sort_keys=False), encoding="utf-8")
    (output / "train_log.jsonl").write_text("".join(json.dumps(row) + "\n" for row in log_history), encoding="utf-8")
    (output / MANIFEST).write_text(json.dumps(_jsonable(manifest), ensure_ascii=False, indent=2) + "\n",
                                   encoding="utf-8")
    from medtune.modelcard import write_model_card  # our README.md replaces peft's empty template card
    write_model_card(output)


def _versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    from medtune import __version__

    return {"medtune": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__}


# ----------------------------------------------------------------------------- the command

def _resume_point(resume: str | None, checkpoint_dir: Path, overwrite: bool) -> Path | None:
    """The checkpoint ``--resume`` names (``latest``: the newest complete one); refuses to start a fresh run
    over an earlier run's checkpoints unless ``--overwrite``."""
    from medtune.sft_trainer import checkpoint_step, checkpoints, last_checkpoint

    if resume is None:
        if checkpoints(checkpoint_dir) and not overwrite:
            raise MedtuneError(f"{checkpoint_dir} holds checkpoints of an earlier run: continue it with --resume latest, "
                               "or pass --overwrite to start again")
        return None
    if resume == "latest":
        found = last_checkpoint(checkpoint_dir)
        if found is None:
            log.warning("--resume latest: no complete checkpoint in %s; starting at step 0", checkpoint_dir)
        return found
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise MedtuneError(f"--resume {resume}: not a complete checkpoint directory (no trainer_state.json); "
                           f"give a checkpoint-N directory or 'latest'")
    checkpoint_step(path)
    return path


def train(model: ModelArgs, data: Path, output: Path, train: TrainArgs = TrainArgs(), overwrite: bool = False,
          resume: str | None = None) -> Path:
    """`medtune train`: fine-tune LoRA adapters on ``--data`` (a prepared directory, or raw data to prepare)
    and write the adapter directory ``--output``; returns it.

    Args:
        overwrite: replace an adapter (and the checkpoints of an earlier run) in --output
        resume: continue an interrupted run from a checkpoint: a checkpoint-N directory, or 'latest' (the newest
            complete one in OUTPUT/checkpoints); give the same options as the interrupted run
    """
    from medtune.hub import resolve_model
    from medtune.modeling import load_base
    from medtune.sft_trainer import checkpoint_step, peak_memory_bytes, plot_loss_curve

    args = train
    output = Path(output)
    if (output / "adapter_config.json").exists() and not overwrite:
        raise MedtuneError(f"--output {output} already holds an adapter; choose another directory or pass --overwrite")
    if model.adapter:
        raise MedtuneError("--adapter: train starts new adapters from the base model; give no --adapter")
    if not Path(data).exists():  # before torch is imported: a typo fails in a second
        raise DataError("no such file or directory", data)
    t0 = time.perf_counter()
    setup_determinism(args)
    plan = make_plan(model, args)
    checkpoint_dir = output / "checkpoints"
    resume_from = _resume_point(resume, checkpoint_dir, overwrite)
    with main_process_first(plan.device) as main:  # one process prepares raw data; the others wait, then read it
        data_dir = prepared_data(Path(data), output, reuse=not main)
        if main and resume_from is None and checkpoint_dir.is_dir():
            shutil.rmtree(checkpoint_dir)  # --overwrite: the earlier run's checkpoints
    if resume_from is not None:
        log.info("resuming from %s (step %d)", resume_from, checkpoint_step(resume_from))
    base_path = resolve_model(model.model, model.hub, model.models_dir, model.revision)
    log.info("%s", plan.describe())

    base, tokenizer = load_base(base_path, quant=plan.quant, dtype=plan.precision, for_training=True,
                                gradient_checkpointing=plan.gradient_checkpointing,
                                device_map="cpu" if plan.device == "cpu" else None)
    dataset, stats = tokenize_conversations(tokenizer, read_conversations(data_dir, "train"), plan.max_seq_len,
                                            overlong=args.overlong, source=str(data_dir / "train.parquet"))
    eval_dataset = None
    if args.eval_steps and (data_dir / "validation.parquet").is_file():
        conversations = read_conversations(data_dir, "validation")
        eval_dataset, _ = tokenize_conversations(tokenizer, conversations[:args.eval_samples or None], plan.max_seq_len,
                                                 overlong=args.overlong, source=str(data_dir / "validation.parquet"))
    elif args.eval_steps:
        log.warning("%s has no validation split: no validation loss", data_dir)
    peft_model = add_lora(base, args)
    trainable, total = peft_model.get_nb_trainable_parameters()
    log.info("LoRA r=%d alpha=%d on %s: %s trainable of %s parameters (%.2f%%); %d examples, %d tokens",
             args.lora_r, args.lora_alpha, ",".join(args.target_modules), f"{trainable:,}", f"{total:,}",
             100 * trainable / max(total, 1), stats.examples, stats.tokens)

    trainer = fit(peft_model, tokenizer, dataset, plan, args, output, eval_dataset=eval_dataset,
                  resume_from=resume_from)
    runtime = time.perf_counter() - t0
    history = trainer.state.log_history
    losses = [row["loss"] for row in history if "loss" in row]
    eval_losses = [row["eval_loss"] for row in history if "eval_loss" in row]
    peak, estimate = peak_memory_bytes(plan.device), getattr(plan, "estimated_peak_bytes", None)
    log.info("peak memory: %.2f GiB measured (%s), %s estimated by the plan", peak / 2**30,
             "CUDA allocated" if plan.device == "cuda" else "resident set", f"{estimate / 2**30:.2f} GiB" if estimate else "none")
    padding = trainer.padding_fraction
    log.info("padding: %.1f%% of the computed positions (%s)", 100 * (padding or 0.0),
             "packed rows" if trainer.packing else "length-grouped batches")
    result = {"steps": trainer.state.global_step, "epochs": trainer.state.epoch,
              "final_loss": losses[-1] if losses else None, "final_eval_loss": eval_losses[-1] if eval_losses else None,
              "trainable_parameters": trainable, "runtime_s": round(runtime, 1),
              "resumed_from_step": checkpoint_step(resume_from) if resume_from else None,
              "padding_fraction": round(padding, 4) if padding is not None else None,
              "peak_memory_bytes": peak, "estimated_peak_bytes": estimate}
    state_dict = None
    if getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False):
        # ZeRO-3 / FSDP shard the LoRA weights: gather them (a collective call, every process takes part),
        # as transformers' Trainer does before saving, or rank 0 would write its shards only.
        state_dict = trainer.accelerator.get_state_dict(trainer.model)
    if trainer.is_world_process_zero():  # one adapter, however many processes trained it
        manifest = adapter_manifest(model, base_path, plan, args, data_dir, stats, result)
        save_adapter(peft_model, tokenizer, output, data_dir=data_dir, manifest=manifest,
                     config=used_config(model, data, output, plan, args), log_history=history,
                     state_dict=state_dict)
        try:
            plot_loss_curve(history, output / "loss_curve.png", title=f"{Path(model.model).name} LoRA r={args.lora_r}")
        except ImportError as e:
            log.warning("no loss curve (%s); pip install matplotlib", e)
        log.info("wrote the adapter to %s (%d steps, final loss %s, %.0f s)", output, trainer.state.global_step,
                 f"{losses[-1]:.4f}" if losses else "n/a", runtime)
    return output
