"""`medtune merge`: the merged model computes what base + adapter computes, standalone, in full precision."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from builds import built_once
from medtune.config import ModelArgs
from medtune.errors import MedtuneError

QUESTION = "我今年35岁，血压150/95mmHg，头晕3天了，需要吃药吗？"


def perturb_adapter(source: Path, target: Path, seed: int = 0, std: float = 0.05) -> Path:
    """A copy of ``source`` whose LoRA B matrices are seeded random: LoRA B starts at zero and 3 training
    steps barely move it, so the trained adapter alone would hardly change the logits a merge must keep."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target)
    weights = load_file(str(target / "adapter_model.safetensors"))
    generator = torch.Generator().manual_seed(seed)
    for name in weights:
        if "lora_B" in name:
            weights[name] = torch.randn(weights[name].shape, generator=generator) * std
    save_file(weights, str(target / "adapter_model.safetensors"), metadata={"format": "pt"})
    return target


@pytest.fixture(scope="session")
def perturbed_adapter_dir(trained_adapter_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 3-step adapter of `trained_adapter_dir` (its medtune.json, tokenizer, data files) with LoRA B
    perturbed so that it changes the logits a lot."""
    return built_once(tmp_path_factory, "adapter-perturbed", lambda p: perturb_adapter(trained_adapter_dir, p))


@pytest.fixture(scope="session")
def merged_dir(perturbed_adapter_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`medtune merge` of the perturbed adapter through the command line, in small shards."""
    from medtune.cli import main

    def build(out: Path) -> None:
        assert main(["merge", "--adapter", str(perturbed_adapter_dir), "--output", str(out),
                     "--shard-size", "5MB"]) == 0

    return built_once(tmp_path_factory, "merged-perturbed", build)


@pytest.fixture(scope="session")
def merged_memorised_dir(memorised_adapter_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`medtune merge` of the adapter that memorised 32 QA pairs (slow tests only): it answers real text."""
    from medtune.cli import main

    def build(out: Path) -> None:
        assert main(["merge", "--adapter", str(memorised_adapter_dir), "--output", str(out)]) == 0

    return built_once(tmp_path_factory, "merged-memorised", build)


def _prompt_ids(tokenizer):
    from medtune.chat_format import build_messages, render_prompt

    text = render_prompt(tokenizer, build_messages(QUESTION, department="心血管科"))
    return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]


def _peft_model(base_dir: Path, adapter_dir: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(adapter_dir)).eval()


# ----------------------------------------------------------------------------- the merged model

def test_merged_logits_equal_base_plus_adapter(merged_dir: Path, perturbed_adapter_dir: Path, tiny_model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    ids = _prompt_ids(tokenizer)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    with_adapter = _peft_model(tiny_model_dir, perturbed_adapter_dir)
    with torch.no_grad():
        got, want = merged(ids).logits, with_adapter(ids).logits
        with with_adapter.disable_adapter():
            base = with_adapter(ids).logits
    effect = (want - base).abs().max().item()
    assert effect > 0.3, f"the test adapter barely changes the logits ({effect:.2g})"
    assert (got - want).abs().max().item() < 1e-4 * max(1.0, want.abs().max().item())
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_merged_directory_is_standalone(merged_dir: Path, tiny_model_dir: Path):
    from medtune.hub import check_model_dir

    assert check_model_dir(merged_dir) == []
    shards = sorted(merged_dir.glob("model-*.safetensors"))
    assert len(shards) > 1 and (merged_dir / "model.safetensors.index.json").is_file()
    assert not (merged_dir / "adapter_config.json").exists()
    config = json.loads((merged_dir / "config.json").read_text(encoding="utf-8"))
    assert "quantization_config" not in config and config["architectures"] == ["Qwen3ForCausalLM"]
    manifest = json.loads((merged_dir / "medtune.json").read_text(encoding="utf-8"))
    assert manifest["kind"] == "merged" and manifest["prompt_format"] == "qwen3-chat"
    assert manifest["base_model"] == str(tiny_model_dir) and manifest["merged_from"]["trained_quant"] == "none"
    from medtune.data.classifier import CLASSIFIER_FILE

    for name in (CLASSIFIER_FILE, "boilerplate.json", "data_manifest.json", "train_config.yaml", "README.md"):
        assert (merged_dir / name).is_file(), name
    # Plain transformers, peft unimportable: the directory alone is the model.
    code = (
        "import sys; sys.modules['peft'] = None\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(merged_dir)!r})\n"
        f"t = AutoTokenizer.from_pretrained({str(merged_dir)!r})\n"
        "msgs = [{'role': 'user', 'content': 'Q'}]\n"
        "p = t.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=False)\n"
        "assert p.endswith('<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n'), p\n"
        "eos = m.generation_config.eos_token_id\n"
        "assert t.convert_tokens_to_ids('<|im_end|>') in (eos if isinstance(eos, list) else [eos]), eos\n"
        "print('ok', type(m).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok Qwen3ForCausalLM")


def test_same_greedy_answer_through_respond(merged_dir: Path, perturbed_adapter_dir: Path, tiny_model_dir: Path):
    """`medtune.infer.respond`, the function `ask`/`chat`/`eval`/`serve` answer through, gives the merged
    model and base + adapter the same greedy answer; their greedy tokens differ from the base's."""
    import torch

    from medtune.infer import GenerationArgs, Query, respond
    from medtune.modeling import load_for_inference

    merged, tok_m, _ = load_for_inference(ModelArgs(model=str(merged_dir), profile="cpu"))
    adapted, tok_a, info = load_for_inference(ModelArgs(model=str(tiny_model_dir), adapter=[str(perturbed_adapter_dir)],
                                                        profile="cpu"))
    assert info.adapters
    gen = GenerationArgs(greedy=True, max_new_tokens=24, repetition_penalty=1.0)
    query = [Query(QUESTION, department="心血管科")]
    a, b = respond(merged, tok_m, query, gen)[0], respond(adapted, tok_a, query, gen)[0]
    assert (a.answer, a.completion_tokens, a.finish_reason) == (b.answer, b.completion_tokens, b.finish_reason)
    # The tiny model's text can be mostly undecodable bytes: compare the token ids too, against the base's.
    ids = _prompt_ids(tok_m)
    settings = dict(max_new_tokens=24, do_sample=False, repetition_penalty=1.0, pad_token_id=0)
    with torch.no_grad():
        from_merged = merged.generate(ids, **settings)[0, ids.shape[1]:].tolist()
        from_adapter = adapted.generate(ids, **settings)[0, ids.shape[1]:].tolist()
        with adapted.disable_adapter():
            from_base = adapted.generate(ids, **settings)[0, ids.shape[1]:].tolist()
    assert from_merged == from_adapter and from_merged != from_base


def test_qlora_adapter_is_merged_into_full_precision(perturbed_adapter_dir: Path, tiny_model_dir: Path,
                                                     tmp_path: Path, caplog):
    import torch
    from transformers import AutoModelForCausalLM

    from medtune.merge import merge

    qlora = tmp_path / "qlora-adapter"
    shutil.copytree(perturbed_adapter_dir, qlora)
    manifest = json.loads((qlora / "medtune.json").read_text(encoding="utf-8"))
    manifest["plan"]["quant"] = "nf4"  # as `medtune train --profile cuda-8gb` records it
    (qlora / "medtune.json").write_text(json.dumps(manifest), encoding="utf-8")
    with caplog.at_level(logging.INFO, logger="medtune.merge"):
        out = merge(ModelArgs(adapter=[str(qlora)]), tmp_path / "merged")
    assert "QLoRA on a nf4-quantised base" in caplog.text
    assert "merging it into the full-precision base weights" in caplog.text
    assert "loaded the base" in caplog.text and "in full precision (float32)" in caplog.text
    record = json.loads((out / "medtune.json").read_text(encoding="utf-8"))
    assert record["merged_from"]["trained_quant"] == "nf4" and record["merged_from"]["merged_dtype"] == "float32"
    assert "not into 4-bit weights" in (out / "README.md").read_text(encoding="utf-8")
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    assert "quantization_config" not in json.loads((out / "config.json").read_text(encoding="utf-8"))


def test_merge_refusals(perturbed_adapter_dir: Path, tiny_model_dir: Path, merged_dir: Path, tmp_path: Path):
    from medtune.merge import merge

    with pytest.raises(MedtuneError, match="merge always loads the base in full precision"):
        merge(ModelArgs(adapter=[str(perturbed_adapter_dir)], quant="nf4"), tmp_path / "a")
    with pytest.raises(MedtuneError, match="exactly one adapter"):
        merge(ModelArgs(model=str(tiny_model_dir)), tmp_path / "b")
    with pytest.raises(MedtuneError, match="no adapter_config.json"):
        merge(ModelArgs(adapter=[str(tiny_model_dir)]), tmp_path / "c")
    with pytest.raises(MedtuneError, match="already holds a model"):
        merge(ModelArgs(adapter=[str(perturbed_adapter_dir)]), merged_dir)
    foreign = tmp_path / "foreign-adapter"
    shutil.copytree(perturbed_adapter_dir, foreign)
    (foreign / "medtune.json").unlink()
    with pytest.raises(MedtuneError, match="prompt format is unknown: give --prompt-format"):
        merge(ModelArgs(model=str(tiny_model_dir), adapter=[str(foreign)]), tmp_path / "d")
    with pytest.raises(MedtuneError, match="trained with prompt format 'qwen3-chat'"):
        merge(ModelArgs(adapter=[str(perturbed_adapter_dir)]), tmp_path / "e", prompt_format="seed")
    assert not any((tmp_path / d).exists() for d in "abcde")


@pytest.mark.slow
def test_ask_gives_the_same_answers_from_merged_and_adapter(memorised_adapter_dir: Path, merged_memorised_dir: Path,
                                                            tiny_model_dir: Path, qa32_dir: Path, tmp_path: Path):
    """`medtune ask` (the command line, in subprocesses) answers training questions with the memorised
    answers, the same from the merged model as from base + adapter."""
    import pyarrow.parquet as pq

    merged = merged_memorised_dir
    rows = pq.read_table(qa32_dir / "train.parquet").to_pylist()[:4]
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps({"id": r["id"], "question": r["question"],
                                             "department": r["sub_department"] or r["department"]},
                                            ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")

    def ask(name: str, *model_flags: str) -> list[str]:
        answers = tmp_path / f"{name}.jsonl"
        out = subprocess.run([sys.executable, "-m", "medtune", "ask", *model_flags, "--input", str(questions),
                              "--output", str(answers), "--greedy", "--max-new-tokens", "40", "--profile", "cpu"],
                             capture_output=True, text=True, timeout=600,
                             env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
        assert out.returncode == 0, out.stderr[-2000:]
        return [json.loads(line)["answer"] for line in answers.read_text(encoding="utf-8").splitlines()]

    from_merged = ask("merged", "--model", str(merged))
    from_adapter = ask("adapter", "--model", str(tiny_model_dir), "--adapter", str(memorised_adapter_dir))
    assert from_merged == from_adapter
    memorised = sum(a.startswith(r["answer"][:20]) for a, r in zip(from_merged, rows))
    assert memorised >= 3, from_merged  # ../shared/FACTS.md: 30 of 32 answers memorised
