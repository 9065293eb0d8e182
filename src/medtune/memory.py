"""Peak GPU memory of a LoRA / QLoRA training step, estimated from the model's shape before loading it.

    >>> from medtune.memory import QWEN3_SHAPES, Setting, estimate
    >>> e = estimate(QWEN3_SHAPES["Qwen/Qwen3-4B"], Setting(quant="nf4", precision="bf16", micro_batch=1,
    ...              max_seq_len=1024, gradient_checkpointing=True))
    >>> round(e.peak / 2**30, 1) < 7.0
    True

The shape comes from the model's ``config.json`` (no weights read), or from the table of Qwen3 shapes
for a hub id not downloaded yet. The estimate counts what the caching allocator holds at the step's
peak (comparable with ``torch.cuda.max_memory_allocated``), not the CUDA context (`CUDA_CONTEXT_BYTES`):

- weights: bf16/fp16/fp32 as loaded; NF4 = 4 bits + double-quantised block constants (~4.13 bits) and
  int8 = 8 bits for the decoder's linear layers. With a quantised base,
  ``peft.prepare_model_for_kbit_training`` upcasts everything it did not quantise to fp32 — the
  embedding too (151,936 x 2,560 for Qwen3-4B: 1.56 GB), and with it the residual stream;
- LoRA: fp32 weights (peft upcasts adapters), their gradients and AdamW's two moments: 16 bytes each;
- activations: with gradient checkpointing, each layer's input plus one layer recomputed during the
  backward pass; without it, every layer's saved tensors. The per-token, per-layer byte counts were
  fitted on the tensors autograd saves in a Qwen3 decoder layer with LoRA (dropout on) on this stack;
- logits: ``B x T x vocab`` in the compute dtype, its fp32 copy and log-softmax in the loss (transformers
  upcasts), then the fp32 gradients in the backward pass — about 12 bytes per token per vocabulary
  entry: with Qwen3's 151,936-entry vocabulary this is the largest activation by far (3.5 GiB at
  1 x 2,048 tokens), which is why the small-GPU profiles limit the sequence length. Training computes
  logits at supervised (answer) positions only (`medtune.sft_trainer`), so this is the bound reached
  when a row is all answer — the case a plan must survive.

Checked against the peak resident memory of bf16 LoRA steps on the CPU (tests/test_memory.py): the
estimate is 0.93-1.03 of the measured. Not yet measured on a GPU (bench/gpu_qwen3_4b.py does that).

Imports nothing heavy: `medtune validate` and the plan use it before torch is loaded.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GIB = 2**30
# What one process's CUDA context (kernels, cuBLAS handles) takes outside the caching allocator.
CUDA_CONTEXT_BYTES = int(0.5 * GIB)
# Block rounding and fragmentation of the caching allocator, over the tensors themselves.
ALLOCATOR_SLACK = 0.05
_DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# NF4: 4 bits, plus an 8-bit absmax per 64 weights, plus an fp32 constant per 256 of those (double quant).
_QUANT_BYTES = {"nf4": 0.5 + 1 / 64 + 4 / (64 * 256), "int8": 1.0 + 4 / 4096}


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """The numbers of a decoder-only transformer that decide its memory (those of ``config.json``)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool = True

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "ModelShape":
        """From a Hugging Face ``config.json`` mapping (Qwen2/Qwen3/Llama key names)."""
        try:
            heads = int(config["num_attention_heads"])
            return cls(hidden=int(config["hidden_size"]), layers=int(config["num_hidden_layers"]), heads=heads,
                       kv_heads=int(config.get("num_key_value_heads") or heads),
                       head_dim=int(config.get("head_dim") or config["hidden_size"] // heads),
                       intermediate=int(config["intermediate_size"]), vocab=int(config["vocab_size"]),
                       tied_embeddings=bool(config.get("tie_word_embeddings", False)))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"config.json lacks a usable {e} for a decoder-only transformer") from None

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each projection of one decoder layer."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        h, i = self.hidden, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def linear_parameters(self) -> int:
        """Parameters of the decoder's linear layers (what quantisation shrinks)."""
        return self.layers * sum(a * b for a, b in self.linear_shapes().values())

    @property
    def embedding_parameters(self) -> int:
        """Input embedding, plus the output projection when it is not tied to it."""
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    @property
    def other_parameters(self) -> int:
        """Norms: two per layer, q/k norms per head, and the final one."""
        return self.layers * (2 * self.hidden + 2 * self.head_dim) + self.hidden

    @property
    def parameters(self) -> int:
        return self.linear_parameters + self.embedding_parameters + self.other_parameters


# Shapes of the Qwen3 dense models (their config.json), so a plan is known before a download.
_QWEN3 = {"0.6B": (1024, 28, 16, 8, 3072, True), "1.7B": (2048, 28, 16, 8, 6144, True),
          "4B": (2560, 36, 32, 8, 9728, True), "8B": (4096, 36, 32, 8, 12288, False),
          "14B": (5120, 40, 40, 8, 17408, False)}
QWEN3_SHAPES: dict[str, ModelShape] = {
    f"Qwen/Qwen3-{size}": ModelShape(hidden=h, layers=n, heads=q, kv_heads=kv, head_dim=128, intermediate=i,
                                     vocab=151936, tied_embeddings=tied)
    for size, (h, n, q, kv, i, tied) in _QWEN3.items()}


def read_shape(model: str | Path, models_dir: Path | None = None) -> ModelShape | None:
    """The shape of ``model``: a local directory's (or an already downloaded hub id's) ``config.json``,
    else the Qwen3 table; None when unknown (then no estimate can be made before loading)."""
    candidates = [Path(model).expanduser()]
    if models_dir is not None:
        candidates.append(Path(models_dir) / str(model))
    for directory in candidates:
        path = directory / "config.json"
        if path.is_file():
            try:
                return ModelShape.from_config(json.loads(path.read_text(encoding="utf-8")))
            except ValueError:
                return None
    name = str(model).rstrip("/")
    for key, shape in QWEN3_SHAPES.items():
        if name.lower() in (key.lower(), key.split("/")[1].lower()):
            return shape
    return None


@dataclasses.dataclass(frozen=True)
class Setting:
    """The training options that decide memory (a `medtune.train.Plan` has them all)."""

    quant: str = "none"  # none, int8, nf4
    precision: str = "bf16"  # fp32, bf16, fp16: weights (when not quantised) and compute
    micro_batch: int = 1
    max_seq_len: int = 2048
    gradient_checkpointing: bool = True
    lora_r: int = 16
    target_modules: Sequence[str] = ALL_LINEAR


@dataclasses.dataclass(frozen=True)
class Estimate:
    """Bytes at the peak of a training step, by kind (see the module docstring)."""

    weights: int
    lora: int  # adapter weights + gradients + AdamW moments
    activations: int  # saved for the backward pass, at the peak
    logits: int  # the logits and the loss's fp32 copies, at their peak
    slack: int  # allocator rounding and fragmentation
    trainable_parameters: int

    @property
    def peak(self) -> int:
        """What ``torch.cuda.max_memory_allocated`` should show, within the estimate's error (~15%)."""
        return self.weights + self.lora + self.activations + self.logits + self.slack

    def breakdown(self) -> str:
        """``weights 3.19 + LoRA 0.49 + activations 0.80 + logits 1.74 + slack 0.31 GiB``."""
        parts = [("weights", self.weights), ("LoRA", self.lora), ("activations", self.activations),
                 ("logits", self.logits), ("slack", self.slack)]
        return " + ".join(f"{name} {n / GIB:.2f}" for name, n in parts) + " GiB"


def lora_parameters(shape: ModelShape, r: int, targets: Sequence[str] = ALL_LINEAR) -> int:
    """Trainable parameters of rank-``r`` LoRA on ``targets`` (r x (in + out) per adapted projection)."""
    linears = shape.linear_shapes()
    unknown = [t for t in targets if t not in linears]
    if unknown:
        raise ValueError(f"no projection named {', '.join(unknown)}; expected some of {', '.join(linears)}")
    return shape.layers * sum(r * (linears[t][0] + linears[t][1]) for t in targets)


def estimate(shape: ModelShape, setting: Setting) -> Estimate:
    """Peak bytes of a training step of ``setting`` on a model of ``shape`` (one GPU, or one DDP rank)."""
    s = setting
    compute = _DTYPE_BYTES[s.precision]
    if s.quant == "none":
        weights = shape.parameters * compute
        residual = compute
    else:
        # prepare_model_for_kbit_training: what is not quantised (embedding, norms) becomes fp32, and the
        # residual stream with it.
        weights = int(shape.linear_parameters * _QUANT_BYTES[s.quant]) + 4 * (
            shape.embedding_parameters + shape.other_parameters)
        residual = 4
    trainable = lora_parameters(shape, s.lora_r, s.target_modules)
    lora = 16 * trainable

    tokens = s.micro_batch * s.max_seq_len
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    # Saved tensors of one decoder layer per token (fitted: RMSNorms upcast to fp32, LoRA dropout copies
    # and masks, SDPA's q/k/v/out, the SwiGLU's three intermediate tensors); an fp32 residual stream makes
    # the LoRA inputs of the five projections that read it fp32 as well.
    per_layer = (48 + 10 * (residual - compute)) * shape.hidden + (3 * compute + 8) * shape.intermediate \
        + (2 * compute + 12) * q + (2 * compute + 5) * kv
    # The backward pass of one layer: gradients of its widest activations, beside what it saved.
    backward = 2 * compute * (shape.intermediate + shape.hidden) + 4 * shape.hidden
    # A 4/8-bit weight is dequantised to the compute dtype for its matmul (twice: forward and backward).
    dequant = 0 if s.quant == "none" else 2 * compute * shape.hidden * shape.intermediate
    if s.gradient_checkpointing:
        stored = shape.layers * residual * shape.hidden * tokens
        layer_peak = (per_layer + backward) * tokens + dequant
    else:
        stored = shape.layers * per_layer * tokens
        layer_peak = backward * tokens + dequant
    # Logits: the compute-dtype logits, the loss's fp32 copy and its log-softmax (forward: 10 bytes in
    # bf16); the saved log-softmax, its gradient and the input gradient, fp32 (backward: 12 bytes).
    logits = 12 * tokens * shape.vocab
    # The peak is either at the loss (every layer's checkpoint alive) or in a layer's backward pass.
    activations = stored + residual * shape.hidden * tokens + (layer_peak if layer_peak > logits else 0)
    logits = logits if logits >= layer_peak else 0
    slack = int(ALLOCATOR_SLACK * (weights + lora + activations + logits))
    return Estimate(weights=int(weights), lora=lora, activations=int(activations), logits=int(logits),
                    slack=slack, trainable_parameters=trainable)


def fits(shape: ModelShape, setting: Setting, budget: int) -> bool:
    return estimate(shape, setting).peak <= budget


def suggestions(shape: ModelShape, setting: Setting, budget: int, profiles: dict[str, Setting]) -> list[str]:
    """Flags that would make ``setting`` fit in ``budget`` bytes, each with its estimate: the biggest
    profile that fits, then single changes (NF4, micro-batch 1, checkpointing, shorter sequences); when
    none does, those changes together."""
    found: list[str] = []

    def offer(flags: str, candidate: Setting) -> bool:
        peak = estimate(shape, candidate).peak
        if peak <= budget:
            found.append(f"{flags} (~{peak / GIB:.1f} GiB)")
            return True
        return False

    for name, candidate in profiles.items():
        if candidate != setting and offer(f"--profile {name}", candidate):
            break  # the biggest profile that fits is the useful one
    changes: list[tuple[str, dict[str, Any]]] = []
    if setting.quant != "nf4":
        changes.append(("--quant nf4", {"quant": "nf4"}))
    if setting.micro_batch > 1:
        changes.append((f"--micro-batch 1 (with --grad-accum {setting.micro_batch}x higher to keep the batch)",
                         {"micro_batch": 1}))
    if not setting.gradient_checkpointing:
        changes.append(("--gradient-checkpointing", {"gradient_checkpointing": True}))
    for flags, change in changes:
        offer(flags, dataclasses.replace(setting, **change))
    length = setting.max_seq_len // 2
    while length >= 256:
        if offer(f"--max-seq-len {length}", dataclasses.replace(setting, max_seq_len=length)):
            break
        length //= 2
    if not found:  # no single change: the changes together, sequences shortened last
        combined, flags = setting, []
        for flag, change in changes + [(f"--max-seq-len {n}", {"max_seq_len": n})
                                       for n in (1024, 512, 256) if n < setting.max_seq_len]:
            combined, flags = dataclasses.replace(combined, **change), flags + [flag.split(" (")[0]]
            if offer(" ".join(flags), combined):
                break
    return found


def first_fitting(shape: ModelShape, candidates: dict[str, Setting], budget: int) -> str | None:
    """The first of ``candidates`` (biggest first) whose estimated peak fits in ``budget`` bytes."""
    return next((name for name, setting in candidates.items() if fits(shape, setting, budget)), None)


def refusal(shape: ModelShape, name: str, setting: Setting, budget: int, where: str,
            candidates: dict[str, Setting]) -> str:
    """Why a plan is refused, and what would fit instead (the message of the error `make_plan` raises)."""
    need = estimate(shape, setting)
    fixes = suggestions(shape, setting, budget, candidates)
    text = (f"the {name} plan needs about {need.peak / GIB:.1f} GiB ({need.breakdown()}), but {where} "
            f"has {budget / GIB:.1f} GiB free")
    if fixes:
        return text + "; these would fit: " + ", ".join(fixes)
    return text + "; no profile or single flag makes it fit: use a smaller model or a bigger GPU"
