"""Models: the tiny random Qwen3 for CPU tests and demos, and loading a base (+ adapters) for use.

    medtune tiny-model --data ../shared/data/toyhom_neike_sample.csv --output models/tiny-qwen3

The tiny model is a real ``Qwen3ForCausalLM`` with the quirks of Qwen3-4B that break code written
for simpler models: grouped-query attention (4 query heads per KV head), an attention width
(heads x head_dim = 512) different from the hidden size (256), as in Qwen3-4B's 32 x 128 = 4096 vs
2560; tied input/output embeddings; an embedding matrix padded past the tokenizer's length (Qwen3:
151,936 rows for 151,669 tokens). Its byte-level BPE tokenizer pre-tokenises exactly as Qwen2/Qwen3's
``tokenizer.json`` does, so llama.cpp's ``qwen2`` pre-tokeniser reproduces it after a GGUF export.
Nothing in the library special-cases it: it is loaded like any Hugging Face checkpoint.
"""
from __future__ import annotations

import dataclasses
import importlib.resources
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from medtune.config import ModelArgs, arg
from medtune.errors import DataError, MedtuneError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# Qwen2/Qwen3 tokenizer.json, pre_tokenizer.pretokenizers[0].pattern.Regex (identical in
# transformers' tokenization_qwen2.PRETOKENIZE_REGEX and llama.cpp's LLAMA_VOCAB_PRE_TYPE_QWEN2).
# `\p{N}` alone: every digit is its own pre-token.
QWEN_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
ENDOFTEXT, IM_START, IM_END, THINK, END_THINK = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"
# Qwen3 marks the chat delimiters special but the think tags not (they survive skip_special_tokens).
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
PLAIN_ADDED_TOKENS = (THINK, END_THINK)
QWEN3_MODEL_MAX_LENGTH = 131072
EMBEDDING_MULTIPLE = 64  # rows of the embedding padded to a multiple of this, as Qwen pads 151,669 -> 151,936


def qwen3_chat_template() -> str:
    """The Qwen3 chat template shipped by the installed ``trl`` (``trl/chat_templates/qwen3.jinja``)."""
    try:
        return (importlib.resources.files("trl") / "chat_templates" / "qwen3.jinja").read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError) as e:
        raise MedtuneError(f"cannot read the Qwen3 chat template from the installed trl package ({e}); "
                           "install it with `pip install 'medtune[train]'`") from None


# ----------------------------------------------------------------------------- texts for the tokenizer

def read_texts(data: Path) -> Iterator[str]:
    """Question and answer texts from ``data``: a prepared data directory or Parquet split, or any raw
    input `medtune data prepare` reads (CSV in the Toyhom layout, JSONL, a folder of them)."""
    data = Path(data)
    split = data / "train.parquet" if data.is_dir() else data
    if split.suffix == ".parquet" and split.is_file():
        import pyarrow.parquet as pq

        table = pq.read_table(split, columns=["question", "answer"])
        columns = ("question", "answer")
    else:
        from medtune.data.load import load

        table = load(data).table
        columns = ("title", "ask", "answer")
    for name in columns:
        yield from (t for t in table.column(name).to_pylist() if t and t.strip())


# ----------------------------------------------------------------------------- the tiny model

def train_tokenizer(texts: Iterable[str], vocab_size: int = 4000):
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on ``texts``, pre-tokenised like Qwen2/Qwen3.

    ``vocab_size`` counts the special tokens, which come last (as in Qwen): ``<|endoftext|>``,
    ``<|im_start|>``, ``<|im_end|>`` (special), ``<think>``, ``</think>`` (added, not special).
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    byte_level = dict(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok = Tokenizer(models.BPE(dropout=None, unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                               fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(**byte_level),
    ])
    tok.decoder = decoders.ByteLevel(**byte_level)
    tok.post_processor = processors.ByteLevel(**byte_level)
    n_added = len(SPECIAL_TOKENS) + len(PLAIN_ADDED_TOKENS)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + n_added:
        raise MedtuneError(f"--vocab-size {vocab_size} is too small: the 256 bytes and {n_added} special "
                           f"tokens need at least {len(alphabet) + n_added}")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - n_added, min_frequency=2, show_progress=False,
                                  initial_alphabet=alphabet, special_tokens=[])
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in PLAIN_ADDED_TOKENS])
    return tok


def _added_token_entry(content: str) -> dict[str, Any]:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": content in SPECIAL_TOKENS}


def save_tokenizer(tok, output: Path) -> None:
    """Write ``tokenizer.json`` and a Qwen3-style ``tokenizer_config.json`` (with the chat template)."""
    output.mkdir(parents=True, exist_ok=True)
    tok.save(str(output / "tokenizer.json"))
    added = {str(tok.token_to_id(t)): _added_token_entry(t) for t in SPECIAL_TOKENS + PLAIN_ADDED_TOKENS}
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": [IM_START, IM_END],
        "bos_token": None,
        "chat_template": qwen3_chat_template(),
        "clean_up_tokenization_spaces": False,
        "eos_token": IM_END,
        "errors": "replace",
        "model_max_length": QWEN3_MODEL_MAX_LENGTH,
        "pad_token": ENDOFTEXT,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (output / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n",
                                                  encoding="utf-8")


def build_tiny_model(
    output: Path,
    texts: Iterable[str] | None = None,
    *,
    data: Path | None = None,
    vocab_size: int = 4000,
    hidden_size: int = 256,
    intermediate_size: int = 768,
    num_layers: int = 4,
    num_heads: int = 8,
    num_kv_heads: int = 2,
    head_dim: int = 64,
    seed: int = 0,
) -> Path:
    """Build a random ``Qwen3ForCausalLM`` + trained BPE tokenizer in ``output`` (HF layout); return it.

    The tokenizer is trained on ``texts``, or on the question/answer texts of ``data`` (see
    `read_texts`). ``vocab_size`` is the tokenizer's size, special tokens included; the embedding has
    that many rows rounded up to a multiple of 64. Writes ``config.json``, ``model.safetensors``,
    ``generation_config.json`` (Qwen3-4B's: eos ``<|im_end|>``/``<|endoftext|>``, sampling defaults),
    ``tokenizer.json`` and ``tokenizer_config.json`` (chat template: trl's ``qwen3.jinja``).

        >>> build_tiny_model(Path("models/tiny"), data=Path("../shared/data/toyhom_neike_sample.csv"))  # doctest: +SKIP
    """
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    if (texts is None) == (data is None):
        raise MedtuneError("give the tokenizer's training texts or --data, exactly one of them")
    if num_heads % num_kv_heads:
        raise MedtuneError(f"--num-heads {num_heads} must be a multiple of --num-kv-heads {num_kv_heads}")
    output = Path(output)
    t0 = time.perf_counter()
    tok = train_tokenizer(read_texts(data) if data is not None else texts, vocab_size)
    n_tokens = tok.get_vocab_size(with_added_tokens=True)
    log.info("trained a %d-token byte-level BPE tokenizer in %.1f s", n_tokens, time.perf_counter() - t0)
    save_tokenizer(tok, output)

    eos, pad = tok.token_to_id(IM_END), tok.token_to_id(ENDOFTEXT)
    config = Qwen3Config(
        vocab_size=-(-n_tokens // EMBEDDING_MULTIPLE) * EMBEDDING_MULTIPLE,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=40960,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        tie_word_embeddings=True,
        bos_token_id=pad,
        eos_token_id=eos,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=pad, eos_token_id=[eos, pad], pad_token_id=pad,
                                               do_sample=True, temperature=0.6, top_k=20, top_p=0.95)
    model.save_pretrained(output)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("wrote a tiny Qwen3 (%.1f M parameters, hidden %d, %d layers, %d/%d heads x %d) to %s",
             n_params / 1e6, hidden_size, num_layers, num_heads, num_kv_heads, head_dim, output)
    return output


@dataclasses.dataclass
class TinyModelArgs:
    """Shape of the tiny model (defaults: Qwen3-4B's quirks at about 5 M parameters)."""

    vocab_size: int = arg(4000, "tokenizer vocabulary, special tokens included")
    hidden_size: int = arg(256, "hidden size (differs from heads x head-dim on purpose, as in Qwen3-4B)")
    intermediate_size: int = arg(768, "MLP width")
    num_layers: int = arg(4, "decoder layers")
    num_heads: int = arg(8, "query heads")
    num_kv_heads: int = arg(2, "key/value heads (grouped-query attention)")
    head_dim: int = arg(64, "width of one attention head")
    seed: int = arg(0, "seed of the random weights")


def tiny_model(data: Path, output: Path, shape: TinyModelArgs = TinyModelArgs()) -> Path:
    """`medtune tiny-model`: a tiny random Qwen3 + BPE tokenizer trained on ``--data``, into ``--output``."""
    return build_tiny_model(output, data=data, **dataclasses.asdict(shape))


# ----------------------------------------------------------------------------- loading

DTYPES = ("fp32", "bf16", "fp16", "auto")
MANIFEST = "medtune.json"  # written by training into every adapter directory


def torch_dtype(name: str) -> "torch.dtype | str":
    """``fp32``/``bf16``/``fp16`` as a torch dtype; ``auto`` (the checkpoint's own) passed through."""
    import torch

    table = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "auto": "auto"}
    if name not in table:
        raise MedtuneError(f"dtype {name!r}: expected one of {', '.join(DTYPES)}")
    return table[name]


def default_device_map(quant: str = "none") -> "dict[str, int] | str | None":
    """Where a model goes when the caller does not say: this process's GPU (``LOCAL_RANK`` under
    torchrun), else the CPU (bitsandbytes wants an explicit ``"cpu"``; plain weights need nothing)."""
    import os

    import torch

    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))}
    return "cpu" if quant != "none" else None


def quantization_config(quant: str, compute_dtype: "torch.dtype"):
    """The ``BitsAndBytesConfig`` for ``quant`` (``nf4``: QLoRA's NF4 + double quantisation), or None."""
    if quant == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quant == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    if quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise MedtuneError(f"--quant {quant!r}: expected one of none, int8, nf4")


def count_parameters(model) -> int:
    """Parameters of ``model`` as the unquantised model has them (4-bit weights are stored packed)."""
    total = 0
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        total += state.shape.numel() if state is not None else p.numel()
    return total


def load_tokenizer(path: Path):
    """``AutoTokenizer`` from ``path`` (a model or an adapter directory that holds tokenizer files)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def attention_implementation() -> str:
    """flash-attention 2 on a GPU where the `flash_attn` package is installed, else SDPA.

    Its variable-length kernels are what make packed training rows pay (`medtune.train.use_packing`).
    """
    import importlib.util

    import torch

    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_base(
    model_path: Path,
    *,
    quant: str = "none",
    dtype: str = "auto",
    device_map: "dict | str | None" = None,
    for_training: bool = False,
    gradient_checkpointing: bool = False,
):
    """Load a local Hugging Face causal LM directory → ``(model, tokenizer)``.

    ``quant``: ``none``, ``int8`` or ``nf4`` (bitsandbytes; runs on the CPU too). ``dtype``: ``fp32``,
    ``bf16``, ``fp16`` or ``auto`` (the checkpoint's; for nf4 the compute dtype is then bf16 on a GPU
    that has it, else fp32). ``device_map``: as for ``from_pretrained``; None means
    `default_device_map`. Attention: `attention_implementation`. ``for_training``: ``use_cache`` off and, with a
    quantised base, ``peft.prepare_model_for_kbit_training`` (base frozen, norms upcast to fp32);
    ``gradient_checkpointing`` then turns checkpointing on (non-reentrant). Otherwise the model is in
    eval mode. The tokenizer is the directory's own (``padding_side`` left as saved).
    """
    import torch
    from transformers import AutoModelForCausalLM

    model_path = Path(model_path)
    weights_dtype = torch_dtype(dtype)
    if quant != "none" and weights_dtype == "auto":
        use_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        compute = torch.bfloat16 if use_bf16 else torch.float32
    else:
        compute = weights_dtype if isinstance(weights_dtype, torch.dtype) else torch.float32
    kwargs: dict[str, Any] = {"dtype": weights_dtype, "attn_implementation": attention_implementation()}
    if quant != "none":
        kwargs["quantization_config"] = quantization_config(quant, compute)
    device_map = default_device_map(quant) if device_map is None else device_map
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_path), **kwargs)
    except (OSError, ValueError) as e:
        raise MedtuneError(f"cannot load the model in {model_path}: {e}") from None
    tokenizer = load_tokenizer(model_path)
    if for_training:
        model.config.use_cache = False
        gc_kwargs = {"use_reentrant": False}
        if quant != "none":
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                    gradient_checkpointing_kwargs=gc_kwargs)
        elif gradient_checkpointing:
            # transformers 5.24 renamed it (the old name warns); the GPU machine's 5.17 may have only the old one.
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=gc_kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
    else:
        model.eval()
    return model, tokenizer


# ----------------------------------------------------------------------------- loading for inference

@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What `load_for_inference` loaded and how (for the start-up line and for logs)."""

    base: str  # the base model as given (hub id or path), or as the adapter's manifest names it
    base_path: Path  # the local directory it was loaded from
    adapters: dict[str, Path]  # adapter name -> directory; the first one is active
    profile: str
    quant: str
    dtype: str
    device: str
    parameters: int  # of the base, unquantised count (adapters excluded)
    memory_bytes: int  # weights + buffers, as loaded (quantised size when quantised)
    manifest: dict[str, Any]  # the first adapter's medtune.json ({} when none)

    def summary(self) -> str:
        """One line: ``Qwen/Qwen3-4B + lora-med (cpu profile, nf4/fp32 on cpu, 4.02 B params, 2.60 GiB)``."""
        adapters = "".join(f" + {name}" for name in self.adapters)
        return (f"{self.base}{adapters} ({self.profile} profile, {self.quant}/{self.dtype} on {self.device}, "
                f"{_si(self.parameters)} params, {self.memory_bytes / 2**30:.2f} GiB)")


def _si(n: float) -> str:
    """4.02 B, 5.05 M, 960 K: a count as people write parameter counts."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f}"


def read_manifest(adapter_dir: Path) -> dict[str, Any]:
    """The adapter directory's ``medtune.json`` (keys: base_model, base_revision, hub, prompt_format, ...);
    ``{}`` when absent."""
    path = Path(adapter_dir) / MANIFEST
    if not path.is_file():
        return {}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise DataError(f"not valid JSON ({e})", path) from None
    if not isinstance(manifest, dict):
        raise DataError("expected a JSON object", path)
    return manifest


def _adapter_names(paths: list[Path]) -> list[str]:
    import re

    names: list[str] = []
    for path in paths:
        # PEFT uses the name as a module key: no dots or other punctuation.
        name = re.sub(r"\W+", "_", path.resolve().name).strip("_") or "adapter"
        names.append(name if name not in names else f"{name}_{len(names)}")
    return names


def _same_model(a: str, b: str) -> bool:
    a, b = a.rstrip("/"), b.rstrip("/")
    return a == b or a.endswith("/" + b) or b.endswith("/" + a)


def choose_base(args: ModelArgs, manifest: dict[str, Any]) -> tuple[str, str, str | None]:
    """``(model, hub, revision)`` to load: ``--model`` when given, else the adapter manifest's base.

    ``--model`` at its default (Qwen/Qwen3-4B) counts as not given when the manifest names another
    base; an explicit ``--model`` that differs from the manifest's base is used, with a warning.
    """
    default = ModelArgs().model
    base = manifest.get("base_model")
    revision = getattr(args, "revision", None)  # a --revision flag, should ModelArgs grow one
    if not base or _same_model(args.model, base):
        return args.model, args.hub, revision or (manifest.get("base_revision") if base else None)
    if args.model == default:
        log.info("using the adapter's base model %s (from its %s)", base, MANIFEST)
        return base, manifest.get("hub", args.hub), manifest.get("base_revision")
    log.warning("--model %s differs from the base the adapter was trained on (%s, per its %s); "
                "answers may be poor", args.model, base, MANIFEST)
    return args.model, args.hub, revision


def load_for_inference(args: ModelArgs, *, device_map: "dict | str | None" = None):
    """Load the base and adapters ``args`` name, as the hardware profile says → (model, tokenizer, `ModelInfo`).

    The base comes from `medtune.hub.resolve_model` (``--model``, or the first adapter's manifest —
    see `choose_base`); the profile is ``--profile`` or `detect_profile`; ``--quant`` overrides its
    ``infer_quant``. Adapters are loaded with ``peft.PeftModel.from_pretrained`` under their directory
    names, the first one active. The tokenizer is the first adapter's when it saved one (training
    does), else the base's. The model is in eval mode.
    """
    from medtune.hub import resolve_model
    from medtune.profiles import apply_quant_override, choose_precision, detect_profile, get_profile

    adapter_paths = [resolve_model(a, args.hub, args.models_dir) for a in args.adapter]
    for path in adapter_paths:
        if not (path / "adapter_config.json").is_file():
            raise MedtuneError(f"--adapter {path}: no adapter_config.json there (is it a base model? use --model)")
    manifest = read_manifest(adapter_paths[0]) if adapter_paths else {}
    base, hub, revision = choose_base(args, manifest)
    base_path = resolve_model(base, hub, args.models_dir, revision)
    profile = apply_quant_override(get_profile(args.profile or detect_profile()), args.quant)
    dtype = choose_precision(profile.infer_dtype)
    if device_map is None and profile.name == "multi-gpu":
        device_map = "auto"
    model, tokenizer = load_base(base_path, quant=profile.infer_quant, dtype=dtype, device_map=device_map)
    parameters, memory = count_parameters(model), model.get_memory_footprint()
    names = _adapter_names(adapter_paths)
    if adapter_paths:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_paths[0]), adapter_name=names[0])
        for name, path in zip(names[1:], adapter_paths[1:]):
            model.load_adapter(str(path), adapter_name=name)
        model.set_adapter(names[0])
        model.eval()
        if any((adapter_paths[0] / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")):
            tokenizer = load_tokenizer(adapter_paths[0])
    device = next(model.parameters()).device
    info = ModelInfo(base=base, base_path=base_path, adapters=dict(zip(names, adapter_paths)), profile=profile.name,
                     quant=profile.infer_quant, dtype=dtype, device=str(device), parameters=parameters,
                     memory_bytes=memory, manifest=manifest)
    log.info("loaded %s", info.summary())
    return model, tokenizer, info
