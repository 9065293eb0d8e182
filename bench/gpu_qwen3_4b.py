"""Qwen3-4B training on each CUDA profile: step time, tokens/s, measured peak memory vs the plan's estimate.

    python bench/gpu_qwen3_4b.py                         # every single-GPU profile (needs CUDA; < 5 min on an H100/H200)
    python bench/gpu_qwen3_4b.py --profiles cuda-8gb cuda-24gb --steps 4
    python bench/gpu_qwen3_4b.py --smoke                 # the same code path on the CPU, on a shrunken model

No download: the model is a randomly initialised ``Qwen3ForCausalLM`` with Qwen3-4B's exact
configuration (hidden 2,560, 36 layers, 32 query / 8 key-value heads of 128, MLP 9,728, vocabulary
151,936, tied embeddings, rope theta 1e6, RMSNorm eps 1e-6), written once to ``--workdir`` so that it
is loaded (and NF4-quantised) exactly as `medtune train` loads a checkpoint. Per profile the script:

1. caps this process's GPU memory to the profile's GPU (its ``min_gpu_memory_gib`` less the CUDA
   context, through ``torch.cuda.set_per_process_memory_fraction``), so a plan that would not fit an
   8 GB card fails here too;
2. runs our training core: `medtune.modeling.load_base` (bf16, or NF4 + ``prepare_model_for_kbit_training``),
   `medtune.train.add_lora`, `medtune.train.fit` (packing, the loss at supervised positions) on random
   token rows that are fully supervised and fill every row — the worst case the estimate is for;
3. reports the median optimiser-step time after the first, tokens per second, the peak of
   ``torch.cuda.max_memory_allocated`` and `medtune.memory`'s estimate (the ratio measured / estimated).

Needs torch, transformers, peft and accelerate only (no datasets, trl). NF4 rows need bitsandbytes;
without it they are listed as skipped. On a machine without network, carry its wheel (bitsandbytes
0.50.2: 41 MiB, within the device tool's 64 MiB carry limit; it needs only torch, numpy and packaging):
``pip download bitsandbytes==0.50.2 --no-deps --only-binary=:all: --python-version 3.12
--platform manylinux_2_24_x86_64 -d .whl``, then there
``pip install --no-deps --target /tmp/site .whl/*.whl`` and ``PYTHONPATH=/tmp/site``. Without CUDA (and without ``--smoke``)
it exits with status 77, which bench/run_all.py lists as skipped. The last line is one JSON object whose
``figures`` bench/run_all.py collects.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from medtune.memory import CUDA_CONTEXT_BYTES, GIB, QWEN3_SHAPES, ModelShape  # noqa: E402

SKIPPED = 77
GPU_PROFILES = ("cuda-8gb", "cuda-12gb", "cuda-16gb", "cuda-24gb", "cuda-40gb+")
SMOKE_SHAPE = ModelShape(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=32, intermediate=128, vocab=1024)
log = logging.getLogger("gpu_qwen3_4b")


@dataclass
class Row:
    profile: str
    quant: str
    batch: str  # micro-batch x accumulation
    seq: int
    cap_gib: float | None
    step_s: float | None = None
    tokens_per_s: float | None = None
    peak_gib: float | None = None
    estimate_gib: float | None = None
    status: str = "ok"


def build_model(shape: ModelShape, directory: Path, device: str) -> Path:
    """A random Qwen3 of ``shape`` (bf16 on CUDA, fp32 on the CPU) + a small tokenizer, in HF layout."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    if (directory / "config.json").is_file():
        return directory
    config = Qwen3Config(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim, max_position_embeddings=40960,
                         rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
                         tie_word_embeddings=shape.tied_embeddings, use_cache=False)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = Qwen3ForCausalLM(config).to(dtype)
    model.save_pretrained(directory)
    del model
    # The ids are random; the tokenizer only has to load and name the pad and end tokens.
    vocab = {f"t{i}": i for i in range(254)} | {"<|endoftext|>": 254, "<|im_end|>": 255}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>").save_pretrained(directory)
    if device == "cuda":
        torch.cuda.empty_cache()
    return directory


def random_examples(vocab: int, rows: int, seq: int, seed: int = 0):
    """``2 x rows`` fully supervised random examples of ``seq / 2`` tokens: packing fills every row exactly."""
    import random

    from medtune.chat_format import Encoded
    from medtune.train import SupervisedDataset

    rng = random.Random(seed)
    dataset = SupervisedDataset()
    for _ in range(2 * rows):
        ids = [rng.randrange(256, vocab) for _ in range(seq // 2)]
        dataset.append(Encoded(input_ids=ids, labels=list(ids)))
    return dataset


class StepClock:
    """Wall-clock time of every optimiser step (a global optimizer hook: `fit` builds its own Trainer)."""

    def __init__(self, cuda: bool) -> None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.cuda, self.times = cuda, []
        self._handle = register_optimizer_step_post_hook(self._tick)

    def _tick(self, *_: object) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())

    def step_seconds(self) -> float | None:
        """Median time between steps, the first (warm-up, allocator growth) excluded."""
        gaps = [b - a for a, b in zip(self.times, self.times[1:])]
        return statistics.median(gaps) if gaps else None

    def close(self) -> None:
        self._handle.remove()


def run_profile(name: str, model_dir: Path, out: Path, steps: int, device: str, smoke: bool,
                quant: str | None = None) -> Row:
    """Train ``steps`` optimiser steps of profile ``name`` (``quant`` overriding its quantisation) under its
    memory cap; one row of the table."""
    import torch

    from medtune.config import ModelArgs
    from medtune.memory import estimate, read_shape
    from medtune.modeling import load_base
    from medtune.profiles import get_profile
    from medtune.train import TrainArgs, add_lora, fit, memory_setting, plan_for_profile

    shape = read_shape(model_dir)
    if smoke:  # the CPU profile's code path at a size a test can afford
        args = TrainArgs(max_steps=steps, micro_batch=2, grad_accum=2, max_seq_len=64, logging_steps=1,
                         eval_steps=0, tensorboard=False, save_steps=0, packing=True, warmup=0)
    else:
        args = TrainArgs(max_steps=steps, logging_steps=1, eval_steps=0, tensorboard=False, save_steps=0,
                         packing=True, warmup=0)
    plan = plan_for_profile(name, ModelArgs(model=str(model_dir), quant=quant), args)
    cap = None
    if device == "cuda":
        cap = get_profile(name).min_gpu_memory_gib * GIB - CUDA_CONTEXT_BYTES
    row = Row(profile=name, quant=plan.quant, batch=f"{plan.micro_batch}x{plan.grad_accum}", seq=plan.max_seq_len,
              cap_gib=round(cap / GIB, 2) if cap else None,
              estimate_gib=round(estimate(shape, memory_setting(plan, args)).peak / GIB, 3))
    if plan.quant != "none":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            row.status = "skipped: no bitsandbytes"
            return row
    if device == "cuda":
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / torch.cuda.get_device_properties(0).total_memory))
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    clock = StepClock(cuda=device == "cuda")
    model = trainer = None
    try:
        model, tokenizer = load_base(model_dir, quant=plan.quant, dtype=plan.precision, for_training=True,
                                     gradient_checkpointing=plan.gradient_checkpointing,
                                     device_map="cpu" if device == "cpu" else None)
        model = add_lora(model, args)
        data = random_examples(shape.vocab, plan.micro_batch * plan.grad_accum * steps, plan.max_seq_len)
        trainer = fit(model, tokenizer, data, plan, args, out / name)
        step = clock.step_seconds()
        row.step_s = round(step, 3) if step else None
        row.tokens_per_s = round(plan.micro_batch * plan.grad_accum * plan.max_seq_len / step) if step else None
        if device == "cuda":
            row.peak_gib = round(torch.cuda.max_memory_allocated() / GIB, 2)
    except torch.OutOfMemoryError:
        row.status = f"out of memory under the {row.cap_gib} GiB cap"
    finally:
        clock.close()
        del model, trainer
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.set_per_process_memory_fraction(1.0)
    return row


def table(rows: list[Row]) -> str:
    head = ("profile", "quant", "batch", "seq", "cap GiB", "step s", "tokens/s", "peak GiB", "estimate GiB",
            "peak/est", "status")

    def cell(v: object) -> str:
        return "-" if v is None else str(v)

    lines = [(r.profile, r.quant, r.batch, str(r.seq), cell(r.cap_gib), cell(r.step_s), cell(r.tokens_per_s),
              cell(r.peak_gib), cell(r.estimate_gib),
              f"{r.peak_gib / r.estimate_gib:.2f}" if r.peak_gib and r.estimate_gib else "-", r.status) for r in rows]
    widths = [max(len(x[i]) for x in [head, *lines]) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(x, widths)).rstrip() for x in [head, *lines])


def figures(rows: list[Row], label: str) -> list[dict]:
    """For bench/run_all.py: tokens/s per profile, and the measured peak with the estimate as its baseline."""
    out = []
    for r in rows:
        if r.status != "ok":
            continue
        out.append({"name": f"{label} {r.profile} training throughput ({r.quant}, {r.batch} x {r.seq})",
                    "value": r.tokens_per_s, "unit": "tokens/s", "baseline": None, "ratio": None})
        if r.peak_gib is not None:
            out.append({"name": f"{label} {r.profile} peak memory vs the plan's estimate", "value": r.peak_gib,
                        "unit": "GiB", "baseline": r.estimate_gib, "ratio": round(r.peak_gib / r.estimate_gib, 3),
                        "goal": "ratio 0.85-1.10 (the estimate is what refuses plans)"})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profiles", nargs="+", default=list(GPU_PROFILES), choices=GPU_PROFILES)
    parser.add_argument("--steps", type=int, default=3, help="optimiser steps per profile (the first is not timed)")
    parser.add_argument("--workdir", type=Path, default=None, help="where the random model is written (default: a temp dir)")
    parser.add_argument("--smoke", action="store_true", help="CPU, shrunken model, the cpu profile: proves the code path")
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    import torch

    if not ns.smoke and not torch.cuda.is_available():
        print("gpu_qwen3_4b: skipped: needs a CUDA GPU (torch sees none); --smoke runs the code path on the CPU")
        return SKIPPED
    device = "cpu" if ns.smoke else "cuda"
    shape = SMOKE_SHAPE if ns.smoke else QWEN3_SHAPES["Qwen/Qwen3-4B"]
    # The smoke run takes the NF4 path too (bitsandbytes quantises on the CPU as well).
    profiles = [("cpu", None), ("cpu", "nf4")] if ns.smoke else [(name, None) for name in ns.profiles]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_qwen3_4b-") as tmp:
        work = ns.workdir or Path(tmp)
        model_dir = build_model(shape, work / ("smoke-model" if ns.smoke else "qwen3-4b-random"), device)
        built = time.perf_counter() - t0
        rows = []
        for name, quant in profiles:
            rows.append(run_profile(name, model_dir, work / "runs", ns.steps, device, ns.smoke, quant))
            print(f"{name}{' ' + quant if quant else ''}: {rows[-1].status} ({time.perf_counter() - t0:.0f} s)", flush=True)
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    label = "qwen3-4b (smoke: shrunken, cpu)" if ns.smoke else "qwen3-4b"
    print(f"\n{label} on {gpu}: {ns.steps} steps per profile, model built in {built:.0f} s, "
          f"{time.perf_counter() - t0:.0f} s in all\n")
    print(table(rows))
    summary = {"bench": "gpu_qwen3_4b", "device": gpu, "torch": torch.__version__, "smoke": ns.smoke,
               "rows": [asdict(r) for r in rows], "figures": figures(rows, label)}
    print(json.dumps(summary, ensure_ascii=False))
    return 0 if all(r.status == "ok" or r.status.startswith("skipped") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
