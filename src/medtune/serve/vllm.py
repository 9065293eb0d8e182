"""`medtune serve --engine vllm`: vLLM's own OpenAI server with the base model and our LoRA adapter.

vLLM batches and pages the KV cache on one or more GPUs; it serves the adapter under the same id as
the HF engine (its directory name), so clients do not change between engines. vLLM loads plain LoRA
only: adapters trained with DoRA or with ``modules_to_save`` must be merged first (`medtune merge`).
"""
from __future__ import annotations

import importlib.util
import json
import logging
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from medtune.errors import MedtuneError

log = logging.getLogger(__name__)

# vLLM's LoRAConfig.max_lora_rank takes only these values (vllm/config/lora.py, MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def adapter_rank(adapter_dir: Path) -> int:
    """The largest LoRA rank in ``adapter_dir``; `MedtuneError` for adapters vLLM cannot load."""
    path = Path(adapter_dir) / "adapter_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MedtuneError(f"--adapter {adapter_dir}: no adapter_config.json there") from None
    except ValueError as e:
        raise MedtuneError(f"{path}: not valid JSON ({e})") from None
    merge = (f"merge it into the base first (`medtune merge --adapter {adapter_dir} ...`) and serve the merged "
             "model with --model, or use the default HF engine")
    if config.get("peft_type", "LORA") != "LORA":
        raise MedtuneError(f"--adapter {adapter_dir} is a {config['peft_type']} adapter; vLLM serves LoRA only: {merge}")
    if config.get("use_dora"):
        raise MedtuneError(f"--adapter {adapter_dir} was trained with DoRA, which vLLM does not load: {merge}")
    if config.get("modules_to_save"):
        raise MedtuneError(f"--adapter {adapter_dir} saves whole modules ({', '.join(config['modules_to_save'])}), "
                           f"which vLLM does not load: {merge}")
    ranks = [int(config.get("r", 8)), *(int(v) for v in (config.get("rank_pattern") or {}).values())]
    return max(ranks)


def lora_rank_setting(rank: int, requested: int | None = None) -> int:
    """The ``--max-lora-rank`` to pass: ``requested`` when given and enough, else the smallest allowed value ≥ rank."""
    if requested is not None:
        if requested not in VLLM_LORA_RANKS:
            raise MedtuneError(f"--max-lora-rank {requested}: vLLM takes one of {', '.join(map(str, VLLM_LORA_RANKS))}")
        if requested < rank:
            raise MedtuneError(f"--max-lora-rank {requested} is below the adapter's rank {rank}")
        return requested
    fitting = [r for r in VLLM_LORA_RANKS if r >= rank]
    if not fitting:
        raise MedtuneError(f"the adapter's rank {rank} is above vLLM's largest --max-lora-rank {VLLM_LORA_RANKS[-1]}")
    return fitting[0]


def vllm_command(
    base: str | Path,
    adapters: dict[str, Path],
    *,
    served_name: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    tensor_parallel_size: int = 1,
    max_lora_rank: int | None = None,
    cors_origins: Sequence[str] = (),
    max_model_len: int | None = None,
    python: str = sys.executable,
) -> list[str]:
    """The command line of vLLM's OpenAI server for ``base`` + ``adapters`` (name → directory).

    The API key is never on the command line (other users see process arguments): `run_vllm` passes it
    in vLLM's ``VLLM_API_KEY`` environment variable.
    """
    if tensor_parallel_size < 1:
        raise MedtuneError(f"--tensor-parallel-size must be at least 1, got {tensor_parallel_size}")
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(base),
           "--served-model-name", served_name, "--host", host, "--port", str(port),
           "--tensor-parallel-size", str(tensor_parallel_size)]
    if adapters:
        rank = max(adapter_rank(path) for path in adapters.values())
        cmd += ["--enable-lora", "--max-lora-rank", str(lora_rank_setting(rank, max_lora_rank)),
                "--max-loras", str(len(adapters)), "--lora-modules",
                *(f"{name}={Path(path).resolve()}" for name, path in adapters.items())]
    if max_model_len is not None:
        cmd += ["--max-model-len", str(max_model_len)]
    if cors_origins:
        cmd += ["--allowed-origins", json.dumps(list(cors_origins))]
    return cmd


def require_vllm() -> None:
    if importlib.util.find_spec("vllm") is None:
        raise MedtuneError("--engine vllm needs vLLM (Linux with an NVIDIA GPU): `pip install vllm`; "
                           "or serve with the default HF engine (--engine hf)")


def run_vllm(cmd: list[str], api_key: str | None) -> int:
    """Run vLLM's server in the foreground (until it exits or Ctrl-C); returns its exit status."""
    import os

    require_vllm()
    env = dict(os.environ)
    if api_key:
        env["VLLM_API_KEY"] = api_key
    log.info("starting vLLM: %s", shlex.join(cmd))
    try:
        return subprocess.call(cmd, env=env)
    except KeyboardInterrupt:
        return 130
