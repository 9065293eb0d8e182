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
    data_manifest.json, boilerplate.json, department_classifier.joblib   copied from the data directory
    README.md             peft's model card; checkpoints/ only with --save-steps

Raw data given as ``--data`` is prepared first into ``OUTPUT-data`` (beside the adapter, not inside it).

The core imports only torch, transformers and peft (and pyarrow to read the Parquet splits), so it runs
on machines without `datasets` or `trl`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from array import array
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Sequence

from medtune.chat_format import DEFAULT_PROMPT_FORMAT, IGNORE_INDEX, Encoded, Message, Overlong, encode
from medtune.config import ModelArgs, arg
from medtune.errors import DataError, MedtuneError
from medtune.modeling import MANIFEST

if TYPE_CHECKING:
    import numpy as np
    import torch

    from medtune.profiles import Profile

log = logging.getLogger(__name__)

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DATA_FILES = {"manifest.json": "data_manifest.json", "boilerplate.json": "boilerplate.json",
              "department_classifier.joblib": "department_classifier.joblib"}
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
        if self.save_steps < 0:
            problems.append(f"--save-steps must be 0 or more, got {self.save_steps}")
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

    @property
    def effective_batch(self) -> int:
        return self.micro_batch * self.grad_accum


# ----------------------------------------------------------------------------- set-up

def setup_determinism(args: TrainArgs) -> None:
    """Pin threads and seeds before anything random (the LoRA initialisation) happens."""
    import torch
    from transformers import set_seed

    if args.threads:
        torch.set_num_threads(args.threads)
    set_seed(args.seed, deterministic=args.deterministic)


def make_plan(model: ModelArgs, args: TrainArgs) -> Plan:
    """The profile (``--profile``, else detected) with ``--quant`` and the size/precision flags applied."""
    import torch

    from medtune.profiles import apply_quant_override, choose_precision, detect_profile, get_profile

    profile: Profile = apply_quant_override(get_profile(model.profile or detect_profile()), model.quant)
    device = "cpu" if profile.name == "cpu" else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise MedtuneError(f"--profile {profile.name} needs a CUDA GPU, and torch sees none; use --profile cpu")
    return Plan(
        profile=profile.name,
        device=device,
        quant=profile.quant,
        precision=choose_precision(args.precision or profile.precision),
        micro_batch=args.micro_batch or profile.micro_batch,
        grad_accum=args.grad_accum or profile.grad_accum,
        max_seq_len=args.max_seq_len or profile.max_seq_len,
        gradient_checkpointing=(profile.gradient_checkpointing if args.gradient_checkpointing is None
                                else args.gradient_checkpointing),
    )


def is_prepared(path: Path) -> bool:
    return path.is_dir() and (path / "train.parquet").is_file() and (path / "manifest.json").is_file()


def prepared_data(data: Path, output: Path) -> Path:
    """``data`` when it is a prepared directory; else raw data prepared into ``OUTPUT-data`` first (beside
    the adapter directory, which is meant to be shipped without its training corpus)."""
    if is_prepared(data):
        return data
    from medtune.data.prepare import prepare

    target = output.with_name(output.name + "-data")
    log.info("%s is not a prepared data directory: preparing it into %s", data, target)
    prepare(input=data, output=target)
    return target


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
    for i, messages in enumerate(tqdm(conversations, desc=f"tokenising {source}", unit="ex", leave=False)):
        try:
            enc = encode(tokenizer, messages, max_seq_len=max_seq_len, prompt_format=prompt_format,
                         overlong=overlong)
        except Overlong as e:
            stats.dropped += 1
            log.debug("%s example %d dropped: %s", source, i, e)
            continue
        except ValueError as e:
            raise DataError(f"example {i}: {e}", source, field="messages") from None
        dataset.append(enc)
        stats.shortened += enc.shortened
        stats.tokens += len(enc)
        stats.answer_tokens += sum(label != IGNORE_INDEX for label in enc.labels)
    stats.examples = len(dataset)
    if stats.dropped or stats.shortened:
        log.info("%s: %d examples; %d longer than %d tokens had their question shortened, %d were dropped",
                 source, stats.examples, stats.shortened, max_seq_len, stats.dropped)
    if not len(dataset):
        raise DataError(f"no example fits --max-seq-len {max_seq_len} (all {stats.dropped} too long)", source)
    return dataset, stats


@dataclasses.dataclass
class Collator:
    """Right-pads a batch: ``input_ids`` with the pad token, ``labels`` with `IGNORE_INDEX`."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, "torch.Tensor"]:
        import torch

        width = max(len(b["input_ids"]) for b in batch)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[row, :n] = torch.as_tensor(b["input_ids"])
            labels[row, :n] = torch.as_tensor(b["labels"])
            mask[row, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


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

def training_arguments(plan: Plan, args: TrainArgs, output: Path):
    """transformers `TrainingArguments` for the plan; no reporting integrations, no checkpoints unless asked."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(output / "checkpoints"),
        per_device_train_batch_size=plan.micro_batch,
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
        seed=args.seed,
        data_seed=args.seed,
        full_determinism=args.deterministic,
        report_to="none",
        ddp_find_unused_parameters=False,  # every LoRA weight gets a gradient; the search only slows DDP
        remove_unused_columns=False,
        dataloader_num_workers=0,
        optim="adamw_torch",
    )


def fit(model: Any, tokenizer: Any, dataset: SupervisedDataset, plan: Plan, args: TrainArgs, output: Path) -> Any:
    """Train ``model`` (already wrapped with LoRA) on ``dataset``; returns the Trainer (its state has the log)."""
    from transformers import Trainer

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    trainer = Trainer(
        model=model,
        args=training_arguments(plan, args, output),
        train_dataset=dataset,
        data_collator=Collator(pad, pad_to_multiple_of=8 if plan.device == "cuda" else None),
        processing_class=tokenizer,
    )
    trainer.train()
    checkpoints = Path(trainer.args.output_dir)
    if checkpoints.is_dir() and not any(checkpoints.iterdir()):
        checkpoints.rmdir()
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
                 config: dict[str, Any], log_history: list[dict[str, Any]]) -> None:
    """Write the adapter directory (layout in the module docstring)."""
    import yaml
    from transformers import AutoTokenizer

    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output, safe_serialization=True)
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


def _versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    from medtune import __version__

    return {"medtune": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__}


# ----------------------------------------------------------------------------- the command

def train(model: ModelArgs, data: Path, output: Path, train: TrainArgs = TrainArgs(), overwrite: bool = False) -> Path:
    """`medtune train`: fine-tune LoRA adapters on ``--data`` (a prepared directory, or raw data to prepare)
    and write the adapter directory ``--output``; returns it."""
    from medtune.hub import resolve_model
    from medtune.modeling import load_base

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
    data_dir = prepared_data(Path(data), output)
    base_path = resolve_model(model.model, model.hub, model.models_dir, model.revision)
    log.info("plan: profile %s on %s, quant %s, %s, batch %d x %d, %d tokens, gradient checkpointing %s",
             plan.profile, plan.device, plan.quant, plan.precision, plan.micro_batch, plan.grad_accum,
             plan.max_seq_len, "on" if plan.gradient_checkpointing else "off")

    base, tokenizer = load_base(base_path, quant=plan.quant, dtype=plan.precision, for_training=True,
                                gradient_checkpointing=plan.gradient_checkpointing,
                                device_map="cpu" if plan.device == "cpu" else None)
    dataset, stats = tokenize_conversations(tokenizer, read_conversations(data_dir, "train"), plan.max_seq_len,
                                            overlong=args.overlong, source=str(data_dir / "train.parquet"))
    peft_model = add_lora(base, args)
    trainable, total = peft_model.get_nb_trainable_parameters()
    log.info("LoRA r=%d alpha=%d on %s: %s trainable of %s parameters (%.2f%%); %d examples, %d tokens",
             args.lora_r, args.lora_alpha, ",".join(args.target_modules), f"{trainable:,}", f"{total:,}",
             100 * trainable / max(total, 1), stats.examples, stats.tokens)

    trainer = fit(peft_model, tokenizer, dataset, plan, args, output)
    runtime = time.perf_counter() - t0
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    result = {"steps": trainer.state.global_step, "epochs": trainer.state.epoch,
              "final_loss": losses[-1] if losses else None, "trainable_parameters": trainable,
              "runtime_s": round(runtime, 1)}
    if trainer.is_world_process_zero():  # one adapter, however many processes trained it
        manifest = adapter_manifest(model, base_path, plan, args, data_dir, stats, result)
        save_adapter(peft_model, tokenizer, output, data_dir=data_dir, manifest=manifest,
                     config=used_config(model, data, output, plan, args), log_history=trainer.state.log_history)
    log.info("wrote the adapter to %s (%d steps, final loss %s, %.0f s)", output, trainer.state.global_step,
             f"{losses[-1]:.4f}" if losses else "n/a", runtime)
    return output
