"""The tiny Qwen3 model and its tokenizer; loading a base (quantised or not) and adapters."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from medtune.config import ModelArgs
from medtune.errors import DataError, MedtuneError
from medtune.modeling import (
    QWEN_PRETOKENIZE_REGEX,
    build_tiny_model,
    count_parameters,
    load_base,
    load_for_inference,
    read_texts,
)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir)


# ----------------------------------------------------------------------------- the tiny model

def test_tiny_model_files(tiny_model_dir: Path):
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json"):
        assert (tiny_model_dir / name).is_file(), name
    assert "chat_template" in json.loads((tiny_model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))


def test_tiny_model_has_qwen3_4b_quirks(model, tokenizer):
    c = model.config
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert c.num_key_value_heads < c.num_attention_heads and c.num_attention_heads % c.num_key_value_heads == 0
    assert c.num_attention_heads * c.head_dim != c.hidden_size
    assert model.model.layers[0].self_attn.q_proj.out_features == c.num_attention_heads * c.head_dim
    assert model.model.layers[0].self_attn.k_proj.out_features == c.num_key_value_heads * c.head_dim
    assert c.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    # Padded embedding, as Qwen3's 151,936 rows for 151,669 tokens.
    assert c.vocab_size % 64 == 0 and c.vocab_size >= len(tokenizer)
    assert 3e6 < count_parameters(model) < 8e6


def test_generation_config_like_qwen3(model, tokenizer):
    g = model.generation_config
    im_end, eot = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert g.eos_token_id == [im_end, eot] and g.pad_token_id == eot
    assert model.config.eos_token_id == im_end


def test_pre_tokenizer_is_qwen2s(tiny_model_dir: Path):
    spec = json.loads((tiny_model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    split, byte_level = spec["pre_tokenizer"]["pretokenizers"]
    assert split["type"] == "Split" and split["behavior"] == "Isolated"
    assert split["pattern"]["Regex"] == QWEN_PRETOKENIZE_REGEX
    assert byte_level["type"] == "ByteLevel" and byte_level["add_prefix_space"] is False
    assert byte_level["use_regex"] is False
    assert spec["normalizer"]["type"] == "NFC"
    assert spec["model"]["type"] == "BPE" and spec["model"]["byte_fallback"] is False


def test_tokenizer_round_trip_chinese_with_digits_one_by_one(tokenizer):
    text = "我今年35岁，血压150/95mmHg，头晕3天了。It's 2023.\n请问怎么办？"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    pieces = [tokenizer.decode([i]) for i in ids]
    digits = [p for p in pieces if any(ch.isdigit() for ch in p)]
    assert digits and all(len(p) == 1 for p in digits), digits
    assert "".join(digits) == "35150953" + "2023"
    # BPE learned Chinese words from the data: far fewer tokens than UTF-8 bytes.
    assert len(ids) < len(text.encode("utf-8")) / 2


def test_special_tokens_are_single_ids_with_qwen_roles(tokenizer):
    ids = [tokenizer.convert_tokens_to_ids(t) for t in SPECIALS]
    assert len(set(ids)) == 5 and ids == sorted(ids) and ids[0] >= len(tokenizer) - 5  # last, as in Qwen
    for token, i in zip(SPECIALS, ids):
        assert tokenizer.encode(f"头痛{token}发热", add_special_tokens=False).count(i) == 1
        assert tokenizer.encode(token, add_special_tokens=False) == [i]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.bos_token is None
    # Like Qwen3: the chat delimiters are special, the think tags are not.
    assert tokenizer.decode(tokenizer.encode("<|im_start|>a<think>b</think><|im_end|>"),
                            skip_special_tokens=True) == "a<think>b</think>"


def test_chat_template_renders_qwen3_with_thinking_off(tokenizer):
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                {"role": "assistant", "content": "A"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, enable_thinking=False)
    assert rendered == ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n"
                        "<|im_start|>assistant\n<think>\n\n</think>\n\nA<|im_end|>\n")
    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True,
                                           enable_thinking=False)
    assert prompt == rendered[: rendered.index("A<|im_end|>")]


def test_chat_template_is_trls_qwen3(tokenizer):
    import importlib.resources

    shipped = (importlib.resources.files("trl") / "chat_templates" / "qwen3.jinja").read_text(encoding="utf-8")
    assert tokenizer.chat_template == shipped


def test_build_from_jsonl_through_the_cli(tmp_path: Path):
    from medtune.cli import main

    data = tmp_path / "qa.jsonl"
    rows = [{"question": f"头痛{i}天怎么办？", "answer": "建议休息，多喝水，必要时就医。"} for i in range(40)]
    data.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    out = tmp_path / "tiny"
    assert main(["tiny-model", "--data", str(data), "--output", str(out), "--vocab-size", "300",
                 "--hidden-size", "64", "--intermediate-size", "128", "--num-layers", "1",
                 "--num-heads", "4", "--num-kv-heads", "2", "--head-dim", "32"]) == 0
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert (config["hidden_size"], config["num_hidden_layers"], config["head_dim"]) == (64, 1, 32)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == 300
    assert tok.decode(tok.encode("头痛3天怎么办？")) == "头痛3天怎么办？"


def test_read_texts_formats(tmp_path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    csv_path = tmp_path / "gb.csv"
    csv_path.write_bytes("department,title,ask,answer\n内科,头晕,头晕怎么办,多休息\n".encode("gb18030"))
    assert list(read_texts(csv_path)) == ["头晕", "头晕怎么办", "多休息"]
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    pq.write_table(pa.table({"id": ["1"], "question": ["胸闷"], "answer": ["做心电图"]}), prepared / "train.parquet")
    assert list(read_texts(prepared)) == ["胸闷", "做心电图"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{oops\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl"):
        list(read_texts(bad))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        list(read_texts(tmp_path / "empty"))


def test_build_needs_texts_or_data(tmp_path: Path):
    with pytest.raises(MedtuneError, match="exactly one"):
        build_tiny_model(tmp_path / "x")


# ----------------------------------------------------------------------------- loading

def test_load_base_nf4_on_cpu_gives_linear4bit_and_runs(tiny_model_dir: Path, tokenizer):
    import bitsandbytes as bnb
    import torch

    model, tok = load_base(tiny_model_dir, quant="nf4", dtype="fp32")
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit)
    assert q_proj.weight.quant_state.quant_type == "nf4"
    assert not model.training
    ids = tok("头晕怎么办？", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape == (1, ids["input_ids"].shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()


def test_load_base_nf4_for_training_backpropagates_through_lora(tiny_model_dir: Path):
    import torch
    from peft import LoraConfig, get_peft_model

    model, tok = load_base(tiny_model_dir, quant="nf4", dtype="fp32", for_training=True, gradient_checkpointing=True)
    assert _checkpointing(model) and model.config.use_cache is False
    assert not any(p.requires_grad for p in model.parameters())
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.train()
    batch = tok(["胸闷气短"], return_tensors="pt")
    model(**batch, labels=batch["input_ids"]).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]  # lora_A's are 0 while B is 0
    assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def _checkpointing(model) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def test_load_base_plain_for_training(tiny_model_dir: Path):
    import torch

    model, _ = load_base(tiny_model_dir, dtype="fp32", for_training=True, gradient_checkpointing=True)
    assert _checkpointing(model) and model.config.use_cache is False
    assert next(model.parameters()).dtype == torch.float32
    model, _ = load_base(tiny_model_dir, dtype="bf16")
    assert not _checkpointing(model) and next(model.parameters()).dtype == torch.bfloat16


def _save_adapter(base_dir: Path, out: Path, seed: int, manifest: dict | None) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # LoRA B starts at zero: make the adapter change the output
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.5)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out)
    if manifest is not None:
        (out / "medtune.json").write_text(json.dumps(manifest), encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("adapters")
    manifest = {"base_model": str(tiny_model_dir), "base_revision": None, "prompt_format": "qwen3-chat"}
    return (_save_adapter(tiny_model_dir, root / "lora.one", 1, manifest),
            _save_adapter(tiny_model_dir, root / "lora-two", 2, None))


def test_load_for_inference_takes_the_base_from_the_manifest(tiny_model_dir: Path, adapters, tmp_path: Path):
    import torch
    from peft import PeftModel

    first, second = adapters
    model, tok, info = load_for_inference(
        ModelArgs(adapter=[str(first), str(second)], profile="cpu", models_dir=tmp_path))
    assert isinstance(model, PeftModel) and not model.training
    assert info.base == str(tiny_model_dir) and info.base_path == tiny_model_dir
    assert list(info.adapters) == ["lora_one", "lora_two"] and model.active_adapter == "lora_one"
    assert (info.profile, info.quant, info.dtype, info.device) == ("cpu", "none", "fp32", "cpu")
    assert info.parameters == count_parameters(model.get_base_model()) - sum(
        p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert info.manifest["prompt_format"] == "qwen3-chat"
    assert "lora_one + lora_two" in info.summary() and "cpu profile" in info.summary()
    ids = tok("头晕", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        with_first = model(ids).logits
        model.set_adapter("lora_two")
        with_second = model(ids).logits
        with model.disable_adapter():
            base = model(ids).logits
    assert not torch.allclose(with_first, base) and not torch.allclose(with_first, with_second)


def test_load_for_inference_quant_override_and_base_mismatch_warning(tiny_model_dir: Path, adapters,
                                                                     tmp_path: Path, caplog):
    import bitsandbytes as bnb

    other = tmp_path / "same-weights-other-name"
    other.symlink_to(tiny_model_dir, target_is_directory=True)
    with caplog.at_level(logging.WARNING, logger="medtune.modeling"):
        model, _, info = load_for_inference(
            ModelArgs(model=str(other), adapter=[str(adapters[0])], profile="cpu", quant="nf4", models_dir=tmp_path))
    assert "differs from the base the adapter was trained on" in caplog.text
    assert info.base == str(other) and info.quant == "nf4"
    assert isinstance(model.get_base_model().model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)
    assert 3e6 < info.parameters < 8e6  # counted unpacked


def test_load_for_inference_rejects_a_base_as_adapter(tiny_model_dir: Path, tmp_path: Path):
    with pytest.raises(MedtuneError, match="no adapter_config.json"):
        load_for_inference(ModelArgs(model=str(tiny_model_dir), adapter=[str(tiny_model_dir)], profile="cpu",
                                     models_dir=tmp_path))


def test_choose_base(caplog):
    from medtune.modeling import choose_base

    manifest = {"base_model": "Qwen/Qwen3-1.7B", "base_revision": "abc123", "hub": "hf"}
    assert choose_base(ModelArgs(), manifest) == ("Qwen/Qwen3-1.7B", "hf", "abc123")  # default = not given
    assert choose_base(ModelArgs(model="Qwen/Qwen3-1.7B"), manifest) == ("Qwen/Qwen3-1.7B", "modelscope", "abc123")
    assert choose_base(ModelArgs(model="models/Qwen/Qwen3-1.7B"), manifest)[0] == "models/Qwen/Qwen3-1.7B"
    assert choose_base(ModelArgs(), {}) == ("Qwen/Qwen3-4B", "modelscope", None)
    with caplog.at_level(logging.WARNING, logger="medtune.modeling"):
        assert choose_base(ModelArgs(model="my/base"), manifest) == ("my/base", "modelscope", None)
    assert "differs from the base" in caplog.text
