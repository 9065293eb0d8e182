"""Hardware profiles: one table of training and inference settings for Qwen3-4B, per kind of machine.

Training and inference both read it: ``--profile NAME`` picks a row (detected when omitted) and
``--quant`` overrides its quantisation. Sizes are for Qwen3-4B (4.0 B parameters: ~8 GB of bf16
weights, ~2.6 GB in NF4) with LoRA r=16 on all seven projections; the replaced scripts trained with
micro-batch 2 x accumulation 4 at 2,048 tokens in 4-bit, and every row keeps that effective batch of 8.
Each row's micro-batch and sequence length are those whose estimated peak (`medtune.memory`) fits the
row's GPU with room for the CUDA context.

    >>> get_profile("cuda-8gb").quant
    'nf4'

Imports no torch at module level (detection imports it when called).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Literal

from medtune.errors import MedtuneError

log = logging.getLogger(__name__)

Quant = Literal["none", "int8", "nf4"]
Precision = Literal["fp32", "bf16", "fp16"]
QUANTS: tuple[str, ...] = ("none", "int8", "nf4")
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Profile:
    """One row of the table: what a machine of this kind runs, for training and for inference."""

    name: str
    description: str
    min_gpu_memory_gib: float  # smallest total memory (per GPU, as torch reports it) this row is meant for
    # training
    quant: Quant  # base weights while training: none = LoRA on bf16/fp32 weights, nf4 = QLoRA
    precision: Precision  # compute / autocast precision of training
    micro_batch: int  # sequences per forward pass (per GPU)
    grad_accum: int  # micro-batches per optimiser step
    gradient_checkpointing: bool  # recompute activations in the backward pass: less memory, ~30% slower
    max_seq_len: int  # tokens per training sequence
    # inference
    infer_quant: Quant
    infer_dtype: Precision
    infer_batch_size: int  # questions answered together by batch answering (eval, `ask` over a file)

    @property
    def effective_batch(self) -> int:
        """Sequences per optimiser step on one device."""
        return self.micro_batch * self.grad_accum


_ROWS = (
    # name, description, min GiB, quant, precision, micro, accum, ckpt, seq, infer quant, dtype, batch
    # Estimated training peaks for Qwen3-4B, r=16 (medtune.memory; CUDA context not included) in the comments.
    ("cpu", "no GPU: fp32; sized for the tiny model (training a 4B model on a CPU is impractical)",
     0.0, "none", "fp32", 8, 1, False, 1024, "none", "fp32", 4),
    # 1,024 tokens: at 2,048 the logits alone (1 x 2,048 x 151,936, with the loss's fp32 copies) take
    # 3.5 GiB and the step ~8.3 GiB, more than an 8 GB card has. ~6.1 GiB.
    ("cuda-8gb", "8 GB GPU (RTX 3070/4060): QLoRA, one sequence of up to 1,024 tokens per pass; NF4 answers",
     7.0, "nf4", "bf16", 1, 8, True, 1024, "nf4", "bf16", 4),
    # The seed's 2 x 2,048 in NF4 needs ~12.7 GiB; one sequence per pass ~8.3 GiB.
    ("cuda-12gb", "12 GB GPU (RTX 3060/4070): QLoRA, one sequence of 2,048 tokens per pass; bf16 answers",
     11.0, "nf4", "bf16", 1, 8, True, 2048, "none", "bf16", 8),
    ("cuda-16gb", "16 GB GPU (RTX 4080, T4, V100-16GB): LoRA on bf16 weights, one sequence per pass",  # ~12.4 GiB
     14.5, "none", "bf16", 1, 8, True, 2048, "none", "bf16", 8),
    ("cuda-24gb", "24 GB GPU (the seed's RTX 4090, A10, RTX 3090): LoRA on bf16 weights, batch 2 x 4",  # ~16.5 GiB
     22.0, "none", "bf16", 2, 4, True, 2048, "none", "bf16", 16),
    ("cuda-40gb+", "40 GB or more (A100, H100, L40S): LoRA on bf16 weights, batch 4 x 2",  # ~24.5 GiB
     38.0, "none", "bf16", 4, 2, True, 2048, "none", "bf16", 32),
    ("multi-gpu", "several GPUs (data parallel; per-GPU settings of cuda-24gb, accumulation halved)",  # ~16.5 GiB
     22.0, "none", "bf16", 2, 2, True, 2048, "none", "bf16", 16),
)
PROFILES: dict[str, Profile] = {row[0]: Profile(*row) for row in _ROWS}
PROFILE_NAMES: tuple[str, ...] = tuple(PROFILES)


def get_profile(name: str) -> Profile:
    """The profile called ``name``; `MedtuneError` listing the names when there is none."""
    try:
        return PROFILES[name]
    except KeyError:
        raise MedtuneError(f"--profile {name!r}: unknown profile; choose one of {', '.join(PROFILE_NAMES)}") from None


def apply_quant_override(profile: Profile, quant: str | None) -> Profile:
    """``profile`` with ``--quant`` (training and inference alike) when given; unchanged when None."""
    if quant is None:
        return profile
    if quant not in QUANTS:
        raise MedtuneError(f"--quant {quant!r}: expected one of {', '.join(QUANTS)}")
    return dataclasses.replace(profile, quant=quant, infer_quant=quant)


def profile_for_memory(total_gib: float, gpus: int = 1) -> str:
    """The biggest single-GPU profile whose minimum memory ``total_gib`` meets (``multi-gpu`` for
    several GPUs); ``cpu`` when no GPU or one too small for any."""
    if gpus > 1:
        return "multi-gpu"
    if gpus < 1:
        return "cpu"
    fitting = [p for p in PROFILES.values() if p.name.startswith("cuda-") and total_gib >= p.min_gpu_memory_gib]
    return max(fitting, key=lambda p: p.min_gpu_memory_gib).name if fitting else "cpu"


def gpu_memory() -> tuple[int, int]:
    """(GPUs torch sees, free bytes on this process's GPU); (0, 0) without CUDA. Free, not total: memory
    other processes hold is not ours to plan with. Only this process's GPU is asked (``LOCAL_RANK`` under
    torchrun/accelerate): asking another would create a CUDA context there."""
    import os

    import torch

    if not torch.cuda.is_available():
        return 0, 0
    device = int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))
    free, _total = torch.cuda.mem_get_info(device)
    return torch.cuda.device_count(), int(free)


def detect_profile() -> str:
    """The profile name for this machine by the table's thresholds: the GPUs torch sees and the free
    memory of this process's GPU (plus what its CUDA context took, so an idle card counts whole).
    Training refines this with the memory estimate (`medtune.train.make_plan`)."""
    from medtune.memory import CUDA_CONTEXT_BYTES

    count, free = gpu_memory()
    if count == 0:
        return "cpu"
    gib = (free + CUDA_CONTEXT_BYTES) / 2**30
    name = profile_for_memory(gib, count)
    if name == "cpu":
        log.warning("the GPU has %.1f GiB free, less than the %.0f GiB of the smallest GPU profile: using the CPU "
                    "profile; pass --profile cuda-8gb to try the GPU anyway", gib, PROFILES["cuda-8gb"].min_gpu_memory_gib)
    return name


def choose_precision(precision: str) -> str:
    """``precision`` as this machine can run it: bf16 becomes fp16 on GPUs without bf16 and fp32 without
    a GPU; fp16 becomes fp32 without a GPU."""
    if precision not in PRECISIONS:
        raise MedtuneError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    import torch

    if precision == "fp32":
        return precision
    if not torch.cuda.is_available():
        return "fp32"
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        log.warning("this GPU does not support bf16: using fp16")
        return "fp16"
    return precision


def format_table() -> str:
    """The table as aligned text (for documentation and ``--help``-style listings)."""
    head = ("profile", "quant", "precision", "batch", "ckpt", "seq", "infer")
    rows = [(p.name, p.quant, p.precision, f"{p.micro_batch}x{p.grad_accum}", "yes" if p.gradient_checkpointing else "no",
             str(p.max_seq_len), f"{p.infer_quant}/{p.infer_dtype}/{p.infer_batch_size}") for p in PROFILES.values()]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head, *rows])
