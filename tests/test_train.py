"""`medtune train`: the adapter directory, its chat template and manifest, LoRA and QLoRA on the CPU."""
from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from medtune.chat_format import build_messages
from medtune.config import ModelArgs, resolve
from medtune.errors import MedtuneError
from medtune.train import (
    Plan, TrainArgs, add_lora, fit, read_conversations, tokenize_conversations, train,
)

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
                 "train_config.yaml", "medtune.json", "train_log.jsonl", "data_manifest.json", "boilerplate.json",
                 "department_classifier.npz")
CPU_PLAN = Plan(profile="cpu", device="cpu", quant="none", precision="fp32", micro_batch=4, grad_accum=1,
                max_seq_len=512, gradient_checkpointing=False)


def _lora_tensors(adapter: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(adapter / "adapter_model.safetensors")


# ----------------------------------------------------------------------------- the adapter directory

def test_adapter_directory_layout_and_manifest(trained_adapter_dir: Path, tiny_model_dir: Path, qa32_dir: Path):
    for name in ADAPTER_FILES:
        assert (trained_adapter_dir / name).is_file(), name
    assert not (trained_adapter_dir / "checkpoints").exists()
    manifest = json.loads((trained_adapter_dir / "medtune.json").read_text(encoding="utf-8"))
    assert manifest["base_model"] == str(tiny_model_dir)  # as given on the command line
    assert manifest["prompt_format"] == "qwen3-chat"
    assert manifest["data"]["manifest_sha256"] == hashlib.sha256((qa32_dir / "manifest.json").read_bytes()).hexdigest()
    assert manifest["data"]["examples"] == 32 and manifest["data"]["dropped"] == 0
    assert manifest["result"]["steps"] == 3 and manifest["plan"]["profile"] == "cpu"
    for source, copy in (("manifest.json", "data_manifest.json"), ("boilerplate.json", "boilerplate.json"),
                         ("department_classifier.npz", "department_classifier.npz")):
        assert (trained_adapter_dir / copy).read_bytes() == (qa32_dir / source).read_bytes()
    losses = [row["loss"] for row in map(json.loads, (trained_adapter_dir / "train_log.jsonl").read_text().splitlines())
              if "loss" in row]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)


def test_saved_chat_template_is_byte_identical_to_the_base(trained_adapter_dir: Path, tiny_model_dir: Path):
    from transformers import AutoTokenizer

    base = AutoTokenizer.from_pretrained(tiny_model_dir).chat_template
    saved = AutoTokenizer.from_pretrained(trained_adapter_dir).chat_template
    assert saved.encode("utf-8") == base.encode("utf-8")
    assert "<think>" in saved  # the Qwen3 template, not a training template without think handling


def test_saved_config_is_a_recipe_for_the_same_run(trained_adapter_dir: Path, tiny_model_dir: Path):
    kwargs = resolve(train, {}, trained_adapter_dir / "train_config.yaml")
    assert kwargs["model"].model == str(tiny_model_dir) and kwargs["model"].profile == "cpu"
    assert kwargs["train"].max_steps == 3 and kwargs["train"].micro_batch == 4
    assert kwargs["train"].max_seq_len == 1024 and kwargs["train"].precision == "fp32"  # the plan, resolved


def test_adapter_loads_for_inference(trained_adapter_dir: Path, tiny_model_dir: Path):
    from medtune.infer import GenerationArgs, respond
    from medtune.modeling import load_for_inference

    model, tokenizer, info = load_for_inference(ModelArgs(model=str(tiny_model_dir), adapter=[str(trained_adapter_dir)],
                                                          profile="cpu"))
    assert info.manifest["prompt_format"] == "qwen3-chat"
    [answer] = respond(model, tokenizer, ["头晕怎么办？"], GenerationArgs(greedy=True, max_new_tokens=4))
    assert answer.prompt_tokens > 0 and answer.completion_tokens >= 1


# ----------------------------------------------------------------------------- what training changes

def test_lora_weights_change_and_base_weights_do_not(tiny_model_dir: Path, qa32_dir: Path, tmp_path: Path):
    from medtune.modeling import load_base

    base, tokenizer = load_base(tiny_model_dir, for_training=True)
    args = TrainArgs(max_steps=3, lr=1e-3, lora_dropout=0.0, seed=0, logging_steps=1)
    dataset, _ = tokenize_conversations(tokenizer, read_conversations(qa32_dir)[:8], CPU_PLAN.max_seq_len)
    model = add_lora(base, args)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fit(model, tokenizer, dataset, CPU_PLAN, args, tmp_path)
    after = dict(model.named_parameters())
    lora = [n for n in before if "lora_" in n]
    assert len(lora) == 2 * 7 * model.config.num_hidden_layers  # A and B on all seven projections per layer
    assert all(not after[n].equal(before[n]) for n in lora)
    assert all(after[n].equal(before[n]) and not after[n].requires_grad for n in before if n not in lora)


@pytest.mark.slow
def test_qlora_nf4_trains_on_the_cpu(tiny_model_dir: Path, qa32_dir: Path, tmp_path: Path):
    out = train(ModelArgs(model=str(tiny_model_dir), profile="cpu", quant="nf4"), qa32_dir, tmp_path / "qlora",
                TrainArgs(max_steps=3, micro_batch=4, lr=1e-3, logging_steps=1, seed=0, threads=2))
    manifest = json.loads((out / "medtune.json").read_text(encoding="utf-8"))
    assert manifest["plan"]["quant"] == "nf4"
    losses = [row["loss"] for row in map(json.loads, (out / "train_log.jsonl").read_text().splitlines()) if "loss" in row]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    tensors = _lora_tensors(out)
    b = [t for n, t in tensors.items() if "lora_B" in n]
    assert b and all(t.abs().sum() > 0 for t in b)  # B starts at zero: every one was trained


# ----------------------------------------------------------------------------- data handling and errors

@pytest.mark.slow
def test_raw_data_is_prepared_first(tiny_model_dir: Path, sample_csv: Path, tmp_path: Path):
    import csv
    import io

    text = sample_csv.read_bytes().decode("gb18030")
    raw = tmp_path / "raw.csv"
    raw.write_text("".join(text.splitlines(keepends=True)[:301]), encoding="utf-8")  # header + 300 rows
    assert len(list(csv.DictReader(io.StringIO(raw.read_text(encoding="utf-8"))))) == 300
    out = train(ModelArgs(model=str(tiny_model_dir), profile="cpu"), raw, tmp_path / "lora",
                TrainArgs(max_steps=1, micro_batch=2))
    prepared = tmp_path / "lora-data"
    assert (prepared / "train.parquet").is_file()
    assert (out / "data_manifest.json").read_bytes() == (prepared / "manifest.json").read_bytes()
    assert not (out / "train.parquet").exists()


def test_overlong_examples_are_dropped_and_counted(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    short, long = build_messages("头晕", "休息。"), build_messages("头晕", "休息。" * 200)
    dataset, stats = tokenize_conversations(tokenizer, [short, long, short], 256, overlong="drop")
    assert (len(dataset), stats.examples, stats.dropped) == (2, 2, 1)
    assert dataset.lengths == [len(dataset[0]["input_ids"])] * 2


def test_existing_adapter_is_not_overwritten(trained_adapter_dir: Path, tiny_model_dir: Path, qa32_dir: Path):
    with pytest.raises(MedtuneError, match="--overwrite"):
        train(ModelArgs(model=str(tiny_model_dir), profile="cpu"), qa32_dir, trained_adapter_dir)


def test_bad_options_are_named_together():
    with pytest.raises(ValueError) as e:
        TrainArgs(lora_r=0, lr=-1.0, target_modules=[])
    assert all(s in str(e.value) for s in ("--lora-r", "--lr", "--target-modules"))


def test_cli_reports_a_missing_data_directory_without_traceback(tiny_model_dir: Path, tmp_path: Path):
    out = subprocess.run([sys.executable, "-m", "medtune", "train", "--model", str(tiny_model_dir), "--profile", "cpu",
                          "--data", str(tmp_path / "nope"), "--output", str(tmp_path / "a")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and str(tmp_path / "nope") in out.stderr


CORE_WITHOUT_EXTRAS = """
import sys
for name in ("datasets", "trl", "rich", "bitsandbytes", "pyarrow", "pandas", "sklearn"):
    sys.modules[name] = None  # what the lent GPU machine lacks: importing them raises ImportError
from pathlib import Path
from medtune.chat_format import build_messages, encode
from medtune.infer import GenerationArgs, respond
from medtune.modeling import load_base
from medtune.train import Plan, SupervisedDataset, TrainArgs, add_lora, fit

base, tokenizer = load_base(Path(sys.argv[1]), for_training=True)
dataset = SupervisedDataset()
for q, a in [("头晕怎么办？", "多休息。"), ("胃胀气", "少食多餐。")]:
    dataset.append(encode(tokenizer, build_messages(q, a), max_seq_len=256))
plan = Plan("cpu", "cpu", "none", "fp32", 2, 1, 256, False)
model = add_lora(base, TrainArgs(max_steps=1))
fit(model, tokenizer, dataset, plan, TrainArgs(max_steps=1), Path(sys.argv[2]))
print(respond(model, tokenizer, ["头晕"], GenerationArgs(greedy=True, max_new_tokens=2))[0].finish_reason)
"""


@pytest.mark.slow
def test_core_runs_without_datasets_trl_rich_or_bitsandbytes(tiny_model_dir: Path, tmp_path: Path):
    out = subprocess.run([sys.executable, "-c", CORE_WITHOUT_EXTRAS, str(tiny_model_dir), str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] in ("stop", "length")


def test_packing_is_chosen_by_the_attention_kernel_unless_the_flag_says() -> None:
    from types import SimpleNamespace

    from medtune.train import TrainArgs, use_packing

    def model(implementation: str):
        return SimpleNamespace(config=SimpleNamespace(_attn_implementation=implementation))

    # sdpa/eager compute a packed row's whole attention (bench/train_throughput.py): length-grouped batches there
    assert use_packing(TrainArgs(), model("sdpa")) is False
    assert use_packing(TrainArgs(), model("eager")) is False
    assert use_packing(TrainArgs(), model("flash_attention_2")) is True
    assert use_packing(TrainArgs(packing=True), model("sdpa")) is True
    assert use_packing(TrainArgs(packing=False), model("flash_attention_2")) is False
