"""`medtune export --format gguf`: the GGUF file llama.cpp needs, read back by transformers (and, in the
full tier, by llama.cpp itself), and an Ollama Modelfile that renders our chat format."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from builds import built_once
from medtune.errors import MedtuneError
from test_merge import QUESTION, merged_dir, merged_memorised_dir, perturbed_adapter_dir  # noqa: F401  (session fixtures)

TEXT = "我今年35岁，血压150/95mmHg，头晕3天了。It's 2023.\n请问怎么办？"


@pytest.fixture(scope="session")
def gguf_dir(merged_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`medtune export` of the merged tiny model as f16, q8_0 and f32, through the command line."""
    from medtune.cli import main

    def build(out: Path) -> None:
        for outtype in ("f16", "q8_0", "f32"):
            assert main(["export", "--model", str(merged_dir), "--output", str(out), "--outtype", outtype,
                         "--name", "tiny-med"]) == 0

    return built_once(tmp_path_factory, "gguf-export", build)


def _metadata(path: Path) -> dict[str, Any]:
    from medtune.export import gguf_metadata

    return dict(gguf_metadata(path))


def _tensors(path: Path) -> dict[str, Any]:
    import gguf

    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


# ----------------------------------------------------------------------------- the file

def test_tensor_names_match_llama_cpps_table(tiny_model_dir: Path):
    """Our Qwen3 mapping gives every checkpoint tensor the name gguf-py's own table (llama.cpp's) gives it."""
    import gguf
    from safetensors import safe_open

    from medtune.export import gguf_name

    reference = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3, 4)
    with safe_open(str(tiny_model_dir / "model.safetensors"), framework="np") as f:
        names = list(f.keys()) + ["lm_head.weight"]
    for name in names:
        assert gguf_name(name) == reference.get_name(name, try_suffixes=(".weight",)), name
    allowed = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.QWEN3]}
    assert {re.sub(r"\.\d+\.", ".{bid}.", gguf_name(n)).removesuffix(".weight") for n in names} <= allowed
    with pytest.raises(MedtuneError, match="no GGUF name"):
        gguf_name("model.layers.0.self_attn.q_proj.bias")


def test_hyperparameters_llama_cpp_needs(gguf_dir: Path, merged_dir: Path):
    config = json.loads((merged_dir / "config.json").read_text(encoding="utf-8"))
    meta = _metadata(gguf_dir / "tiny-med-f16.gguf")
    assert meta["general.architecture"] == "qwen3" and meta["general.name"] == "tiny-med"
    head_dim = config["head_dim"]
    assert head_dim != config["hidden_size"] // config["num_attention_heads"]  # the Qwen3-4B quirk
    assert meta["qwen3.attention.key_length"] == meta["qwen3.attention.value_length"] == head_dim
    expected = {
        "qwen3.context_length": config["max_position_embeddings"],
        "qwen3.embedding_length": config["hidden_size"],
        "qwen3.block_count": config["num_hidden_layers"],
        "qwen3.feed_forward_length": config["intermediate_size"],
        "qwen3.attention.head_count": config["num_attention_heads"],
        "qwen3.attention.head_count_kv": config["num_key_value_heads"],
        "qwen3.vocab_size": config["vocab_size"],
    }
    assert {k: meta[k] for k in expected} == expected
    assert meta["qwen3.rope.freq_base"] == config["rope_parameters"]["rope_theta"]
    assert meta["qwen3.attention.layer_norm_rms_epsilon"] == pytest.approx(config["rms_norm_eps"], rel=1e-6)
    assert "qwen3.rope.scaling.type" not in meta


def test_tokenizer_metadata(gguf_dir: Path, merged_dir: Path):
    import gguf
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    spec = json.loads((merged_dir / "tokenizer.json").read_text(encoding="utf-8"))
    meta = _metadata(gguf_dir / "tiny-med-q8_0.gguf")
    n_rows = json.loads((merged_dir / "config.json").read_text(encoding="utf-8"))["vocab_size"]
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "qwen2"
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == n_rows > len(tokenizer)  # padded like Qwen3's 151,936 rows
    vocab = tokenizer.get_vocab()
    assert all(tokens[i] == t for t, i in vocab.items())
    assert tokens[len(tokenizer):] == [f"[PAD{i}]" for i in range(len(tokenizer), n_rows)]
    assert set(types[len(tokenizer):]) == {gguf.TokenType.UNUSED}
    word = tokenizer.convert_ids_to_tokens(tokenizer("头痛", add_special_tokens=False)["input_ids"][0])
    kind = {t: types[vocab[t]] for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", word)}
    assert kind == {"<|endoftext|>": gguf.TokenType.CONTROL, "<|im_start|>": gguf.TokenType.CONTROL,
                    "<|im_end|>": gguf.TokenType.CONTROL, "<think>": gguf.TokenType.USER_DEFINED,
                    "</think>": gguf.TokenType.USER_DEFINED, word: gguf.TokenType.NORMAL}
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    assert meta["tokenizer.ggml.merges"] == merges and merges
    assert meta["tokenizer.ggml.eos_token_id"] == meta["tokenizer.ggml.eot_token_id"] == vocab["<|im_end|>"]
    assert meta["tokenizer.ggml.padding_token_id"] == meta["tokenizer.ggml.bos_token_id"] == vocab["<|endoftext|>"]
    assert meta["tokenizer.ggml.add_bos_token"] is False


def test_a_tokenizer_llama_cpp_would_pre_tokenise_differently_is_refused(tiny_model_dir: Path, tmp_path: Path):
    import shutil

    from medtune.export import vocab

    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tiny_model_dir / name, tmp_path / name)
    assert len(vocab(tmp_path, 4032).tokens) == 4032
    spec = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{N}+|[^\s\p{N}]+|\s+"  # digits grouped
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    with pytest.raises(MedtuneError, match="pre-tokeniser"):
        vocab(tmp_path, 4032)


def test_chat_template_has_thinking_off_by_default(gguf_dir: Path, merged_dir: Path):
    """A llama.cpp chat that renders the GGUF's template without enable_thinking gets our prompt."""
    import jinja2
    from transformers import AutoTokenizer

    from medtune.chat_format import build_messages, render_prompt

    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    template = _metadata(gguf_dir / "tiny-med-f16.gguf")["tokenizer.chat_template"]
    messages = build_messages(QUESTION, department="心血管科",
                              history=[{"role": "user", "content": "头晕"}, {"role": "assistant", "content": "多久了？"}])
    # As transformers and llama-cpp-python render chat templates.
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    rendered = env.from_string(template).render(messages=messages, add_generation_prompt=True)
    assert rendered == render_prompt(tokenizer, messages)
    thinking = env.from_string(template).render(messages=messages, add_generation_prompt=True, enable_thinking=True)
    assert thinking.endswith("<|im_start|>assistant\n")  # still switchable on


def test_tensor_types_and_tied_embeddings(gguf_dir: Path, merged_dir: Path):
    import gguf

    config = json.loads((merged_dir / "config.json").read_text(encoding="utf-8"))
    assert config["tie_word_embeddings"]
    f16, q8 = _tensors(gguf_dir / "tiny-med-f16.gguf"), _tensors(gguf_dir / "tiny-med-q8_0.gguf")
    assert "output.weight" not in f16  # tied: llama.cpp's qwen3 loader reuses token_embd
    assert len(f16) == 2 + 11 * config["num_hidden_layers"]
    q = f16["blk.0.attn_q.weight"]
    # gguf lists dims innermost first: (hidden, heads x head_dim) for a (heads x head_dim, hidden) matrix
    assert list(q.shape) == [config["hidden_size"], config["num_attention_heads"] * config["head_dim"]]
    assert list(f16["blk.0.attn_k_norm.weight"].shape) == [config["head_dim"]]
    for name in f16:
        norm = name.endswith("norm.weight")
        assert f16[name].tensor_type == (gguf.GGMLQuantizationType.F32 if norm else gguf.GGMLQuantizationType.F16), name
        assert q8[name].tensor_type == (gguf.GGMLQuantizationType.F32 if norm else gguf.GGMLQuantizationType.Q8_0), name
    sizes = {t: (gguf_dir / f"tiny-med-{t}.gguf").stat().st_size for t in ("f32", "f16", "q8_0")}
    assert sizes["f32"] > 1.9 * sizes["f16"] and sizes["f16"] > 1.7 * sizes["q8_0"]


@pytest.mark.parametrize("outtype,tolerance", [("f32", 1e-5), ("f16", 5e-3), ("q8_0", 5e-2)])
def test_reads_back_through_transformers(gguf_dir: Path, merged_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                         outtype: str, tolerance: float):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations import ggml

    # transformers 5.24's GGUF loader reads no attention.key_length for qwen3 (its qwen3_moe entry does) and
    # falls back to Qwen3Config's head_dim of 128 — right for Qwen3-4B by luck, wrong for the tiny model.
    monkeypatch.setitem(ggml.GGUF_CONFIG_MAPPING["qwen3"], "attention.key_length", "head_dim")
    name = f"tiny-med-{outtype}.gguf"
    hf = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    back = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=name).eval()
    assert back.config.head_dim == hf.config.head_dim and back.config.tie_word_embeddings
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"]
    assert AutoTokenizer.from_pretrained(gguf_dir, gguf_file=name)(TEXT)["input_ids"] == ids[0].tolist()
    with torch.no_grad():
        want, got = hf(ids).logits, back(ids).logits
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() <= tolerance * scale
    assert (got.argmax(-1) == want.argmax(-1)).float().mean().item() >= (1.0 if outtype != "q8_0" else 0.9)


# ----------------------------------------------------------------------------- Ollama

_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.DOTALL)
_WS = " \t\r\n"  # what Go's {{- and -}} trim


def render_go_template(template: str, data: dict[str, Any]) -> str:
    """The Go text/template subset an Ollama TEMPLATE uses here — text, ``{{ .Field }}``, ``if`` / ``else
    if`` / ``else`` / ``end``, ``range .List``, ``eq a b``, trim markers — with Go's semantics."""
    items: list[Any] = []
    pos, trim_next = 0, False
    for m in _ACTION.finditer(template):
        text = template[pos:m.start()]
        text = text.lstrip(_WS) if trim_next else text
        items.append(text.rstrip(_WS) if m.group(1) else text)
        items.append(m.group(2).split(" ", 1) if " " in m.group(2) else [m.group(2)])
        pos, trim_next = m.end(), bool(m.group(3))
    tail = template[pos:]
    items.append(tail.lstrip(_WS) if trim_next else tail)

    def parse(i: int, stop: tuple[str, ...]) -> tuple[list, int]:
        body: list = []
        while i < len(items):
            item = items[i]
            if isinstance(item, str):
                body.append(item)
                i += 1
            elif item[0] in stop:
                return body, i
            elif item[0] in ("if", "range"):
                branches, i = [], i + 1
                cond = item[1]
                while True:
                    part, i = parse(i, ("else", "end"))
                    branches.append((cond, part))
                    head = items[i]
                    i += 1
                    if head[0] == "end":
                        break
                    cond = head[1][3:] if len(head) > 1 and head[1].startswith("if ") else None
                body.append((item[0], branches))
            else:
                body.append(("value", item[0] if len(item) == 1 else " ".join(item)))
                i += 1
        return body, i

    def value(expr: str, dot: Any) -> Any:
        words = re.findall(r'"[^"]*"|\S+', expr)
        args = [json.loads(w) if w.startswith('"') else _field(w, dot) for w in words[1:]]
        if words[0] == "eq":
            return args[0] == args[1]
        assert len(words) == 1, f"unsupported template expression {expr!r}"
        return _field(words[0], dot)

    def _field(word: str, dot: Any) -> Any:
        if word == ".":
            return dot
        assert word.startswith("."), f"unsupported template word {word!r}"
        return dot.get(word[1:]) if isinstance(dot, dict) else None

    def run(body: list, dot: Any) -> str:
        out = []
        for node in body:
            if isinstance(node, str):
                out.append(node)
            elif node[0] == "value":
                out.append(str(value(node[1], dot)))
            elif node[0] == "if":
                for cond, part in node[1]:
                    if cond is None or value(cond, dot):
                        out.append(run(part, dot))
                        break
            elif node[0] == "range":
                (expr, part), = node[1]
                out.extend(run(part, element) for element in value(expr, dot) or [])
        return "".join(out)

    tree, _ = parse(0, ())
    return run(tree, data)


def _modelfile(path: Path) -> tuple[str, str, list[str], str]:
    text = path.read_text(encoding="utf-8")
    template = re.search(r'^TEMPLATE """(.*?)"""$', text, re.DOTALL | re.MULTILINE).group(1)
    system = re.search(r'^SYSTEM """(.*?)"""$', text, re.DOTALL | re.MULTILINE).group(1)
    stops = re.findall(r'^PARAMETER stop "(.*)"$', text, re.MULTILINE)
    source = re.search(r"^FROM (.*)$", text, re.MULTILINE).group(1)
    return template, system, stops, source


def test_go_template_renderer_follows_go():
    """The renderer's own check, on outputs Go's text/template gives for these templates."""
    data = {"A": "x", "L": [{"R": "u", "C": "1"}, {"R": "a", "C": "2"}], "E": ""}
    assert render_go_template("a {{- .A -}} \n b", data) == "axb"
    assert render_go_template("{{ if .E }}no{{ else if eq .A \"x\" }}yes{{ else }}no{{ end }}", data) == "yes"
    assert render_go_template("{{ range .L }}[{{ if eq .R \"u\" }}U{{ .C }}{{ else }}{{ .C }}{{ end }}]{{ end }}",
                              data) == "[U1][2]"


def test_modelfile_renders_our_chat_format(gguf_dir: Path, merged_dir: Path):
    from transformers import AutoTokenizer

    from medtune.chat_format import SYSTEM_PROMPT_GENERAL, build_messages, render_prompt

    template, system, stops, source = _modelfile(gguf_dir / "Modelfile")
    assert system == SYSTEM_PROMPT_GENERAL and "<|im_end|>" in stops
    assert source.startswith("./") and (gguf_dir / source).is_file()
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    conversations = [
        build_messages("头晕三天了怎么办？", system=system),
        build_messages(QUESTION, system=system, history=[{"role": "user", "content": "我头晕。"},
                                                         {"role": "assistant", "content": "头晕多久了？有没有高血压？"}]),
    ]
    for messages in conversations:
        # Ollama passes the system prompt as .System and keeps it in .Messages too.
        data = {"System": messages[0]["content"],
                "Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]}
        assert render_go_template(template, data) == render_prompt(tokenizer, messages)


def test_export_refusals(perturbed_adapter_dir: Path, gguf_dir: Path, merged_dir: Path, tmp_path: Path):
    from medtune.export import export

    with pytest.raises(MedtuneError, match="merge it first"):
        export(str(perturbed_adapter_dir), tmp_path / "x")
    with pytest.raises(MedtuneError, match="exists; pass --overwrite"):
        export(str(merged_dir), gguf_dir, outtype="f16", name="tiny-med")
    seed_format = tmp_path / "seed-merged"
    seed_format.mkdir()
    (seed_format / "config.json").write_text("{}", encoding="utf-8")
    (seed_format / "medtune.json").write_text(json.dumps({"kind": "merged", "prompt_format": "seed"}), encoding="utf-8")
    with pytest.raises(MedtuneError, match="'seed' prompt format"):
        export(str(seed_format), tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_export_directory_has_a_model_card(gguf_dir: Path):
    manifest = json.loads((gguf_dir / "medtune.json").read_text(encoding="utf-8"))
    assert manifest["kind"] == "gguf" and manifest["gguf"]["file"] == "tiny-med-f32.gguf"  # the last export
    card = (gguf_dir / "README.md").read_text(encoding="utf-8")
    assert "ollama create" in card and "医疗免责声明" in card and "Medical disclaimer" in card


# ----------------------------------------------------------------------------- llama.cpp itself

@pytest.mark.slow
def test_llama_cpp_tokenises_and_answers_like_transformers(merged_memorised_dir: Path, qa32_dir: Path, tmp_path: Path):
    """llama.cpp itself (llama-cpp-python, the `llama` extra) loads the exported file, tokenises a Chinese
    prompt with digits into our tokenizer's ids, computes the HF model's logits and — from the f32 file —
    gives the HF model's greedy token ids. The model is the one that memorised 32 QA pairs, so the greedy
    answer is real text (a random model's greedy output is one token repeated)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install 'medtune[llama]')")
    import numpy as np
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medtune.chat_format import build_messages, render_prompt
    from medtune.export import export

    model_dir = merged_memorised_dir
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    row = pq.read_table(qa32_dir / "train.parquet").to_pylist()[0]
    stops = set(hf.generation_config.eos_token_id)
    n = 32
    for outtype, tolerance in (("f32", 1e-3), ("q8_0", 6e-2)):
        path = export(str(model_dir), tmp_path, outtype=outtype)
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=1024, n_threads=2, logits_all=True, verbose=False)
        assert llm.tokenize(TEXT.encode("utf-8"), add_bos=False, special=False) == tokenizer(TEXT)["input_ids"]
        for messages in (build_messages(TEXT, department="心血管科"), row["messages"][:-1]):
            prompt = render_prompt(tokenizer, messages)
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            assert llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True) == ids
            with torch.no_grad():
                logits = hf(torch.tensor([ids])).logits[0].numpy()
            llm.reset()
            llm.eval(ids)
            theirs = np.asarray(llm.scores[: len(ids)])
            assert np.abs(theirs - logits).max() <= tolerance * np.abs(logits).max(), outtype
            assert (theirs.argmax(-1) == logits.argmax(-1)).mean() >= (1.0 if outtype == "f32" else 0.9), outtype
        if outtype == "f32":  # greedy answer to the training question (the last prompt)
            with torch.no_grad():
                out = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, repetition_penalty=1.0,
                                  temperature=1.0, top_p=1.0, top_k=50, pad_token_id=0)
            want = out[0, len(ids):].tolist()
            llm.reset()
            got: list[int] = []
            for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
                got.append(token)
                if token in stops or len(got) == n:
                    break
            assert got == want
            assert len(set(want)) > n // 4  # real text, not one token repeated
            assert tokenizer.decode(want).startswith(row["answer"][:10])
        llm.close()
