"""`medtune export --format gguf`: a merged Qwen3 model as one GGUF file for llama.cpp, plus a Modelfile for Ollama.

    medtune merge --adapter runs/qwen3-4b-qlora --output runs/qwen3-4b-med
    medtune export --model runs/qwen3-4b-med --output runs/qwen3-4b-med-gguf --outtype q8_0
    cd runs/qwen3-4b-med-gguf && ollama create qwen3-4b-med -f Modelfile && ollama run qwen3-4b-med

The `gguf` package (llama.cpp's own) writes the file format; the mapping from a Hugging Face Qwen3
checkpoint is ours, after llama.cpp's ``convert_hf_to_gguf.py`` (``Qwen3Model`` → ``Qwen2Model`` →
``TextModel``):

- hyper-parameters under ``qwen3.*``, with ``attention.key_length`` / ``value_length`` = ``head_dim``
  (Qwen3-4B: 32 heads x 128 = 4096 ≠ hidden 2560; llama.cpp would otherwise assume hidden / heads);
- tensors renamed (`TENSOR_NAMES`), stored as row-major numpy like the checkpoint (gguf reverses the dims);
  Qwen uses NeoX-style RoPE in both, so q/k are not permuted as for Llama; 1-D tensors stay F32; tied
  embeddings write no ``output.weight`` (llama.cpp's qwen3 loader falls back to ``token_embd``);
- the tokenizer as ``gpt2`` byte-level BPE with ``tokenizer.ggml.pre = qwen2``, its merges, token types
  (special added tokens CONTROL, other added tokens USER_DEFINED) and the embedding's padding rows as
  ``[PADn]`` UNUSED tokens, as llama.cpp does for Qwen's 151,936 rows / 151,669 tokens;
- the chat template with Qwen3's thinking **off by default** (medtune models are trained that way; a
  llama.cpp chat that renders the stock template without ``enable_thinking`` would ask in another format).

Tensors are streamed to disk one at a time (a 4B model needs no more memory than its largest tensor).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal

from medtune.chat_format import DEFAULT_PROMPT_FORMAT, SYSTEM_PROMPT_GENERAL
from medtune.errors import MedtuneError
from medtune.modeling import QWEN_PRETOKENIZE_REGEX

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

ARCH = "qwen3"
OUTTYPES = ("f16", "bf16", "q8_0", "f32")
QWEN_PRE_TOKENIZER = "qwen2"  # llama.cpp's LLAMA_VOCAB_PRE_TYPE_QWEN2: Qwen2/2.5/3 share it
THINK_DEFAULT_ON = "{%- if enable_thinking is defined and enable_thinking is false %}"
THINK_DEFAULT_OFF = "{%- if not (enable_thinking is defined and enable_thinking is true) %}"

# Hugging Face Qwen3 name -> GGUF name ({bid}: layer index); llama.cpp's MODEL_TENSORS[QWEN3].
TENSOR_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{bid}.input_layernorm.weight": "blk.{bid}.attn_norm.weight",
    "model.layers.{bid}.self_attn.q_proj.weight": "blk.{bid}.attn_q.weight",
    "model.layers.{bid}.self_attn.k_proj.weight": "blk.{bid}.attn_k.weight",
    "model.layers.{bid}.self_attn.v_proj.weight": "blk.{bid}.attn_v.weight",
    "model.layers.{bid}.self_attn.o_proj.weight": "blk.{bid}.attn_output.weight",
    "model.layers.{bid}.self_attn.q_norm.weight": "blk.{bid}.attn_q_norm.weight",
    "model.layers.{bid}.self_attn.k_norm.weight": "blk.{bid}.attn_k_norm.weight",
    "model.layers.{bid}.post_attention_layernorm.weight": "blk.{bid}.ffn_norm.weight",
    "model.layers.{bid}.mlp.gate_proj.weight": "blk.{bid}.ffn_gate.weight",
    "model.layers.{bid}.mlp.up_proj.weight": "blk.{bid}.ffn_up.weight",
    "model.layers.{bid}.mlp.down_proj.weight": "blk.{bid}.ffn_down.weight",
}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def gguf_name(hf_name: str) -> str:
    """The GGUF tensor name of a Qwen3 checkpoint tensor; `MedtuneError` for one llama.cpp does not know."""
    m = _LAYER.match(hf_name)
    key = _LAYER.sub("model.layers.{bid}.", hf_name) if m else hf_name
    if key not in TENSOR_NAMES:
        raise MedtuneError(f"tensor {hf_name!r} has no GGUF name for a Qwen3 model (is this a Qwen3ForCausalLM?)")
    return TENSOR_NAMES[key].format(bid=m.group(1)) if m else TENSOR_NAMES[key]


# ----------------------------------------------------------------------------- hyper-parameters

def hyperparameters(config: Any) -> dict[str, Any]:
    """``qwen3.*`` keys (without the prefix) from a transformers ``Qwen3Config``."""
    if getattr(config, "model_type", None) != "qwen3":
        raise MedtuneError(f"GGUF export supports Qwen3 models; this one is {getattr(config, 'model_type', '?')!r}")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = dict(getattr(config, "rope_parameters", None) or {})
    rope_theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    hp: dict[str, Any] = {
        "context_length": config.max_position_embeddings,
        "embedding_length": config.hidden_size,
        "block_count": config.num_hidden_layers,
        "feed_forward_length": config.intermediate_size,
        "attention.head_count": config.num_attention_heads,
        "attention.head_count_kv": config.num_key_value_heads,
        "attention.key_length": head_dim,
        "attention.value_length": head_dim,
        "attention.layer_norm_rms_epsilon": float(config.rms_norm_eps),
        "rope.freq_base": float(rope_theta),
        "vocab_size": config.vocab_size,
    }
    rope_type = rope.get("rope_type", "default")
    if rope_type == "yarn":  # Qwen3's documented long-context setting (factor 4 over 32,768 tokens)
        hp["rope.scaling.type"] = "yarn"
        hp["rope.scaling.factor"] = float(rope["factor"])
        hp["rope.scaling.original_context_length"] = int(rope["original_max_position_embeddings"])
    elif rope_type == "linear":
        hp["rope.scaling.type"] = "linear"
        hp["rope.scaling.factor"] = float(rope["factor"])
    elif rope_type != "default":
        raise MedtuneError(f"RoPE scaling {rope_type!r} is not supported by the GGUF export")
    return hp


# ----------------------------------------------------------------------------- tokenizer

@dataclasses.dataclass
class Vocab:
    tokens: list[str]
    types: list[int]  # gguf.TokenType
    merges: list[str]
    special_ids: dict[str, int]  # bos, eos, pad (and eot) -> id
    chat_template: str | None


def vocab(model_dir: Path, n_rows: int, bos_token_id: int | None = None) -> Vocab:
    """The tokenizer of ``model_dir`` as GGUF wants it, padded to ``n_rows`` (the embedding's rows)."""
    import gguf
    from transformers import AutoTokenizer

    spec = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    model = spec.get("model", {})
    splits = [p.get("pattern", {}).get("Regex") for p in (spec.get("pre_tokenizer") or {}).get("pretokenizers", [])
              if p.get("type") == "Split"]
    if model.get("type") != "BPE" or splits != [QWEN_PRETOKENIZE_REGEX]:
        # llama.cpp would pre-tokenise with its qwen2 rules anyway and split text differently from this tokenizer.
        raise MedtuneError(f"{model_dir / 'tokenizer.json'}: not Qwen2/Qwen3's byte-level BPE with its pre-tokeniser")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    by_id = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    by_id.update({i: a["content"] for i, a in added.items()})
    if max(by_id) >= n_rows:
        raise MedtuneError(f"the tokenizer has id {max(by_id)} but the embedding only {n_rows} rows")
    tokens, types = [], []
    for i in range(n_rows):
        if i not in by_id:  # the embedding's padding rows
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    # tokenizers >= 0.20 saves merges as pairs, older versions as "a b" strings; GGUF wants the latter.
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    ids = {t: i for i, t in by_id.items()}
    special: dict[str, int] = {}
    if tokenizer.eos_token in ids:
        special["eos"] = ids[tokenizer.eos_token]
    if "<|im_end|>" in ids:
        special["eot"] = ids["<|im_end|>"]
    if tokenizer.pad_token in ids:
        special["pad"] = ids[tokenizer.pad_token]
    bos = bos_token_id if bos_token_id is not None else special.get("pad")
    if bos is not None:  # Qwen has no BOS and adds none; llama.cpp still wants an id (Qwen's GGUFs: <|endoftext|>)
        special["bos"] = bos
    return Vocab(tokens, types, merges, special, chat_template_thinking_off(tokenizer.chat_template))


def chat_template_thinking_off(template: str | None) -> str | None:
    """Qwen3's chat template with thinking off unless ``enable_thinking=True`` is passed explicitly."""
    if template and THINK_DEFAULT_ON in template:
        return template.replace(THINK_DEFAULT_ON, THINK_DEFAULT_OFF)
    if template:
        log.warning("the chat template has no Qwen3 enable_thinking switch; it is written unchanged")
    return template


# ----------------------------------------------------------------------------- tensors

def _qtype(outtype: str):
    import gguf

    return {"f16": gguf.GGMLQuantizationType.F16, "bf16": gguf.GGMLQuantizationType.BF16,
            "q8_0": gguf.GGMLQuantizationType.Q8_0, "f32": gguf.GGMLQuantizationType.F32}[outtype]


def _file_type(outtype: str) -> int:
    import gguf

    return {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "f32": gguf.LlamaFileType.ALL_F32}[outtype]


def tensor_type(gguf_tensor: str, shape: tuple[int, ...], outtype: str):
    """The GGML type a tensor is stored as: norms and other 1-D tensors F32 (as llama.cpp's converter does),
    matrices ``outtype``, falling back to F16 when a row does not divide into quantisation blocks."""
    import gguf

    if len(shape) <= 1 or gguf_tensor.endswith("_norm.weight"):
        return gguf.GGMLQuantizationType.F32
    qtype = _qtype(outtype)
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    return qtype if shape[-1] % block == 0 else gguf.GGMLQuantizationType.F16


def _checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return [model_dir / n for n in names]
    if (model_dir / "model.safetensors").is_file():
        return [model_dir / "model.safetensors"]
    raise MedtuneError(f"{model_dir}: no model.safetensors (nor an index of shards); GGUF export reads safetensors")


def checkpoint_tensors(model_dir: Path, tied: bool) -> list[tuple[str, str, Path, tuple[int, ...]]]:
    """(HF name, GGUF name, file, shape) of every tensor to write, in GGUF order (embedding, layers, head)."""
    from safetensors import safe_open

    out = []
    for path in _checkpoint_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                if tied and name == "lm_head.weight":
                    continue  # a copy of the embedding: llama.cpp reuses token_embd
                out.append((name, gguf_name(name), path, tuple(f.get_slice(name).get_shape())))

    def order(item: tuple[str, str, Path, tuple[int, ...]]) -> tuple[int, int, str]:
        m = re.match(r"blk\.(\d+)\.", item[1])
        return (1, int(m.group(1)), item[1]) if m else ({"token_embd.weight": 0}.get(item[1], 2), 0, item[1])

    return sorted(out, key=order)


def _encode(array: "np.ndarray", qtype) -> "np.ndarray":
    import gguf

    return gguf.quants.quantize(array, qtype)


# ----------------------------------------------------------------------------- the file

def write_gguf(model_dir: Path, path: Path, outtype: str = "q8_0", *, name: str | None = None,
               description: str | None = None) -> dict[str, Any]:
    """Write the Qwen3 checkpoint in ``model_dir`` to the GGUF file ``path``; returns a summary
    (tensors, parameters, bytes, the hyper-parameters written)."""
    import gguf
    import numpy as np
    import torch
    from rich.progress import Progress
    from safetensors import safe_open
    from transformers import AutoConfig

    if outtype not in OUTTYPES:
        raise MedtuneError(f"--outtype {outtype!r}: expected one of {', '.join(OUTTYPES)}")
    config = AutoConfig.from_pretrained(str(model_dir))
    hp = hyperparameters(config)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    tensors = checkpoint_tensors(model_dir, tied)
    present = {g for _, g, _, _ in tensors}
    if not tied and "output.weight" not in present:
        raise MedtuneError(f"{model_dir}: untied embeddings but no lm_head.weight in the checkpoint")
    expected = {TENSOR_NAMES[k].format(bid=b) for k in TENSOR_NAMES if "{bid}" in k for b in range(config.num_hidden_layers)}
    if missing := sorted(expected - present):
        raise MedtuneError(f"{model_dir}: the checkpoint lacks {', '.join(missing[:5])}"
                           + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    voc = vocab(model_dir, config.vocab_size, getattr(config, "bos_token_id", None))

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), ARCH)
    writer.add_name(name or model_dir.name)
    if description:
        writer.add_description(description)
    writer.add_file_type(_file_type(outtype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value in hp.items():
        full = f"{ARCH}.{key}"
        if isinstance(value, str):
            writer.add_string(full, value)
        elif isinstance(value, float):
            writer.add_float32(full, value)
        else:
            writer.add_uint32(full, int(value))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(QWEN_PRE_TOKENIZER)
    writer.add_token_list(voc.tokens)
    writer.add_token_types(voc.types)
    writer.add_token_merges(voc.merges)
    for kind, token_id in voc.special_ids.items():
        getattr(writer, f"add_{kind}_token_id")(token_id)
    writer.add_add_bos_token(False)  # Qwen adds no BOS (its tokenizer_config: add_bos_token false)
    if voc.chat_template:
        writer.add_chat_template(voc.chat_template)

    plan = []
    for hf, gg, file, shape in tensors:
        qtype = tensor_type(gg, shape, outtype)
        if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            dtype = np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16
            writer.add_tensor_info(gg, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
        else:
            byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
            writer.add_tensor_info(gg, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qtype)
        plan.append((hf, gg, file, shape, qtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    handles: dict[Path, Any] = {}
    parameters = 0
    try:
        with Progress(transient=True) as progress:
            task = progress.add_task(f"writing {path.name}", total=len(plan))
            for hf, gg, file, shape, qtype in plan:
                if file not in handles:
                    handles[file] = safe_open(str(file), framework="pt")
                array = handles[file].get_tensor(hf).to(torch.float32).numpy()
                parameters += array.size
                writer.write_tensor_data(_encode(array, qtype))
                progress.advance(task)
    finally:
        writer.close()
        handles.clear()
    return {"tensors": len(plan), "parameters": parameters, "bytes": path.stat().st_size, "outtype": outtype,
            "hyperparameters": hp, "tokens": len(voc.tokens), "special_token_ids": voc.special_ids}


# ----------------------------------------------------------------------------- Ollama

# Go text/template, rendered by Ollama with .System (the system message, else SYSTEM below) and .Messages.
# It reproduces medtune's chat format (Qwen3's template with enable_thinking=False): earlier assistant
# turns without think blocks, the generation prompt with an empty one.
OLLAMA_TEMPLATE = (
    "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}\n"
    "{{- range .Messages }}\n"
    "{{- if eq .Role \"user\" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n"
    "{{ else if eq .Role \"assistant\" }}<|im_start|>assistant\n{{ .Content }}<|im_end|>\n"
    "{{ end }}\n"
    "{{- end }}<|im_start|>assistant\n<think>\n\n</think>\n\n"
)


def modelfile(gguf_file: str, system: str = SYSTEM_PROMPT_GENERAL, context_length: int = 4096) -> str:
    """An Ollama Modelfile for ``gguf_file`` (a path relative to the Modelfile): template, system prompt,
    stop tokens and medtune's default sampling (`medtune.infer.GenerationArgs`)."""
    from medtune.infer import GenerationArgs

    gen = GenerationArgs()
    if '"""' in system:
        raise MedtuneError('the system prompt must not contain """ (it ends a Modelfile block)')
    return (
        f"# Ollama: ollama create NAME -f Modelfile   (written by medtune export)\n"
        f"FROM ./{gguf_file}\n"
        f'TEMPLATE """{OLLAMA_TEMPLATE}"""\n'
        f'SYSTEM """{system}"""\n'
        'PARAMETER stop "<|im_end|>"\n'
        'PARAMETER stop "<|endoftext|>"\n'
        f"PARAMETER temperature {gen.temperature}\n"
        f"PARAMETER top_p {gen.top_p}\n"
        f"PARAMETER top_k {gen.top_k}\n"
        f"PARAMETER repeat_penalty {gen.repetition_penalty}\n"
        f"PARAMETER num_ctx {context_length}\n"
    )


# ----------------------------------------------------------------------------- the command

def export(model: str, output: Path, format: Literal["gguf"] = "gguf",
           outtype: Literal["f16", "bf16", "q8_0", "f32"] = "q8_0", name: str | None = None,
           system: str | None = None, num_ctx: int = 4096, hub: Literal["modelscope", "hf"] = "modelscope",
           models_dir: Path = Path("models"), overwrite: bool = False) -> Path:
    """`medtune export`: a merged model (`medtune merge`) as a GGUF file + Ollama Modelfile in ``--output``.

    Args:
        model: merged model directory (or a Qwen3 hub id, downloaded into --models-dir)
        output: directory for NAME-OUTTYPE.gguf, Modelfile and README.md
        format: file format (gguf: llama.cpp, Ollama, LM Studio)
        outtype: tensor type: f16, bf16, q8_0 (8-bit, about half of f16) or f32; norms stay f32
        name: model name in the file and the file name (default: the model directory's name)
        system: system prompt in the Modelfile (default: medtune's general medical prompt)
        num_ctx: context window Ollama allocates (PARAMETER num_ctx)
        hub: hub a model id is downloaded from
        models_dir: where hub downloads are kept
        overwrite: replace an existing file of the same name
    """
    from medtune.hub import resolve_model
    from medtune.modelcard import copy_card_sources, write_model_card
    from medtune.modeling import MANIFEST, read_manifest

    if format != "gguf":
        raise MedtuneError(f"--format {format!r}: only gguf is supported")
    model_dir = resolve_model(model, hub, models_dir)
    if (model_dir / "adapter_config.json").is_file():
        raise MedtuneError(f"--model {model_dir} is a LoRA adapter; merge it first: "
                           f"medtune merge --adapter {model_dir} --output MERGED, then export MERGED")
    output = Path(output)
    stem = re.sub(r"[^\w.-]+", "-", name or model_dir.resolve().name).strip("-") or "model"
    target = output / f"{stem}-{outtype}.gguf"
    if target.exists() and not overwrite:
        raise MedtuneError(f"{target} exists; pass --overwrite to replace it")
    t0 = time.perf_counter()
    log.info("writing %s (%s) from %s", target, outtype, model_dir)
    source = read_manifest(model_dir)
    if source.get("prompt_format", DEFAULT_PROMPT_FORMAT) != DEFAULT_PROMPT_FORMAT:
        raise MedtuneError(f"{model_dir} answers in the {source['prompt_format']!r} prompt format; the Modelfile and "
                           f"chat template written here render {DEFAULT_PROMPT_FORMAT!r} only")
    tuned = source.get("kind") == "merged"
    summary = write_gguf(model_dir, target, outtype, name=stem, description=(
        f"{source.get('base_model')} fine-tuned with medtune for Chinese medical QA (thinking off)" if tuned else None))
    (output / "Modelfile").write_text(modelfile(target.name, system or SYSTEM_PROMPT_GENERAL, num_ctx),
                                      encoding="utf-8")
    manifest = {**{k: v for k, v in source.items() if k not in ("kind", "created")}, "kind": "gguf",
                "source_model": str(model), "gguf": {"file": target.name, **{k: v for k, v in summary.items()
                                                                           if k != "hyperparameters"}},
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (output / MANIFEST).write_text(json.dumps(manifest, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    copy_card_sources(model_dir, output)
    write_model_card(output)
    log.info("wrote %s (%d tensors, %.1f MiB) and %s in %.0f s", target, summary["tensors"],
             summary["bytes"] / 2**20, output / "Modelfile", time.perf_counter() - t0)
    return target


def gguf_metadata(path: Path) -> Iterator[tuple[str, Any]]:
    """(key, value) of a GGUF file's metadata, arrays of strings decoded (for tests and inspection)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    for key, field in reader.fields.items():
        yield key, field.contents()
