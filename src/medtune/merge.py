"""`medtune merge`: fold a LoRA adapter into its base and write a standalone Hugging Face model directory.

    medtune merge --adapter runs/qwen3-4b-qlora --output runs/qwen3-4b-med
    medtune merge --adapter Sogrey/Chinese-medical-lora --prompt-format seed --output runs/sogrey-merged
    python -c "from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained('runs/qwen3-4b-med')"

The result needs neither peft nor medtune: safetensors shards (``--shard-size``), ``config.json``,
``generation_config.json`` (the base's: stops at ``<|im_end|>``), the tokenizer with the adapter's
chat template, ``medtune.json`` (what was merged) and a model card (README.md). `medtune export` turns
it into GGUF for llama.cpp and Ollama. ``medtune.json`` records the prompt format the adapter was trained
with (an adapter from elsewhere needs ``--prompt-format``), so `medtune ask --model MERGED` asks it alike.

The adapter is always merged into the full-precision base, also when it was trained with QLoRA on 4-bit
weights: W + BA rounded back to NF4 would lose most of the update (the LoRA delta is far smaller than an
NF4 quantisation step), so the base is loaded in its checkpoint dtype (bf16 for Qwen3-4B) and the
command says so. Merging runs on the CPU: it is a few matrix products per layer, and a GPU that trained
in 4-bit may not hold the full-precision model.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Literal

from medtune.config import ModelArgs
from medtune.errors import MedtuneError

log = logging.getLogger(__name__)

QUANTISED = ("nf4", "int8")


def trained_quant(manifest: dict[str, Any]) -> str:
    """The quantisation the adapter's base had while training (``none`` when unknown)."""
    return str((manifest.get("plan") or {}).get("quant") or "none")


def merge(model: ModelArgs, output: Path, dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto",
          shard_size: str = "2GB", prompt_format: str | None = None, overwrite: bool = False) -> Path:
    """`medtune merge`: fold ``--adapter`` into its base (full precision) and write ``--output``.

    Args:
        output: directory for the merged model (safetensors shards, tokenizer, generation config, card)
        dtype: weights dtype of the merged model; auto = the base checkpoint's (bf16 for Qwen3-4B)
        shard_size: largest safetensors shard, e.g. 2GB or 500MB
        prompt_format: prompt format of an adapter without medtune.json (qwen3-chat, or seed for the replaced
            scripts' adapters); recorded so that the merged model is asked as the adapter was trained
        overwrite: write into an --output that already holds a model
    """
    import torch

    from medtune.hub import check_model_dir, resolve_model
    from medtune.modelcard import copy_card_sources, write_model_card
    from medtune.modeling import MANIFEST, choose_base, load_base, load_tokenizer, read_manifest, torch_dtype
    from medtune.train import DATA_FILES

    if len(model.adapter) != 1:
        raise MedtuneError(f"--adapter: give exactly one adapter to merge (got {len(model.adapter)})")
    if model.quant not in (None, "none"):
        raise MedtuneError(f"--quant {model.quant}: merge always loads the base in full precision "
                           "(merging into quantised weights degrades the model); leave --quant out")
    output = Path(output)
    if (output / "config.json").exists() and not overwrite:
        raise MedtuneError(f"--output {output} already holds a model; choose another directory or pass --overwrite")
    adapter_dir = resolve_model(model.adapter[0], model.hub, model.models_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise MedtuneError(f"--adapter {adapter_dir}: no adapter_config.json there (a merged or base model "
                           "needs no merging)")
    manifest = read_manifest(adapter_dir)
    fmt = _prompt_format(manifest, prompt_format, adapter_dir)
    base, hub, revision = choose_base(model, manifest)
    base_path = resolve_model(base, hub, model.models_dir, revision)
    quant = trained_quant(manifest)
    t0 = time.perf_counter()
    if quant in QUANTISED:
        log.warning("the adapter was trained with QLoRA on a %s-quantised base; merging it into the "
                    "full-precision base weights (%s), not into %s weights: merging into quantised weights "
                    "degrades the model", quant, dtype if dtype != "auto" else "the checkpoint's dtype", quant)
    base_model, base_tokenizer = load_base(base_path, quant="none", dtype=dtype, device_map="cpu")
    weights_dtype = next(base_model.parameters()).dtype
    log.info("loaded the base %s in full precision (%s) from %s", base, str(weights_dtype).replace("torch.", ""),
             base_path)

    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(base_model, str(adapter_dir))
    if any(getattr(m, "quant_state", None) is not None for m in peft_model.parameters()):
        raise MedtuneError("internal: the base was loaded quantised")  # guarded above; never merge into 4-bit
    with torch.no_grad():
        merged = peft_model.merge_and_unload(safe_merge=True)  # safe_merge: fail on NaNs instead of writing them
    if dtype != "auto":
        merged = merged.to(torch_dtype(dtype))

    tokenizer = base_tokenizer
    if any((adapter_dir / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")):
        tokenizer = load_tokenizer(adapter_dir)  # the tokenizer (and chat template) the adapter was trained with
    if not getattr(tokenizer, "chat_template", None):
        raise MedtuneError(f"neither {adapter_dir} nor {base_path} has a tokenizer with a chat template")

    output.mkdir(parents=True, exist_ok=True)
    merged.config.use_cache = True
    merged.save_pretrained(output, max_shard_size=shard_size)
    tokenizer.save_pretrained(output)
    problems = check_model_dir(output)
    if problems:
        raise MedtuneError(f"the merged model in {output} is incomplete: " + "; ".join(problems))
    record = merged_manifest({**manifest, "prompt_format": fmt}, model.adapter[0], adapter_dir, base, revision,
                             base_path, quant, str(next(merged.parameters()).dtype).replace("torch.", ""))
    (output / MANIFEST).write_text(json.dumps(record, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    # The data files training copied (department classifier, boilerplate list): `medtune ask --model MERGED`
    # then picks the department and cleans answers as it does with the adapter.
    copy_card_sources(adapter_dir, output, extra=tuple(DATA_FILES.values()))
    write_model_card(output)
    log.info("wrote the merged model to %s (%.0f s); plain transformers loads it, no peft needed",
             output, time.perf_counter() - t0)
    return output


def _prompt_format(manifest: dict[str, Any], given: str | None, adapter_dir: Path) -> str:
    """The adapter's prompt format: its manifest's, else ``--prompt-format``; never a contradiction."""
    from medtune.chat_format import PROMPT_FORMATS, get_prompt_format

    recorded = manifest.get("prompt_format")
    if given is not None:
        get_prompt_format(given)
    if recorded and given and recorded != given:
        raise MedtuneError(f"{adapter_dir} was trained with prompt format {recorded!r} (its medtune.json); "
                           f"--prompt-format {given} would record another format for the merged model")
    if not recorded and not given:
        raise MedtuneError(f"--adapter {adapter_dir} has no medtune.json (it was not trained by medtune), so its "
                           "prompt format is unknown: give --prompt-format "
                           + "; ".join(f"{name} ({f.description})" for name, f in PROMPT_FORMATS.items()))
    return recorded or given


def merged_manifest(adapter_manifest: dict[str, Any], adapter: str, adapter_dir: Path, base: str,
                    revision: str | None, base_path: Path, trained_quant: str, dtype: str) -> dict[str, Any]:
    """The merged directory's ``medtune.json``: the adapter's record (data, plan, LoRA settings,
    evaluations) plus what the merge did."""
    from medtune import __version__

    keep = {k: v for k, v in adapter_manifest.items() if k not in ("kind", "created", "base_local_path")}
    return {
        **keep,
        "format": 1,
        "kind": "merged",
        "base_model": base,
        "base_revision": revision,
        "base_local_path": str(base_path),
        "merged_from": {"adapter": adapter, "adapter_path": str(adapter_dir), "trained_quant": trained_quant,
                        "merged_dtype": dtype, "medtune": __version__},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
