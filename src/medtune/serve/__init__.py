"""`medtune serve`: the fine-tuned model behind an OpenAI-compatible API and a Chinese web page.

    medtune serve --adapter runs/lora-med                       # http://127.0.0.1:8000, HF engine
    medtune serve --adapter runs/lora-med --engine vllm --tensor-parallel-size 2   # vLLM on GPUs

The HF engine (`medtune.serve.engine`) batches concurrent requests continuously; ``--engine vllm``
starts vLLM's own server with the same model id. Binding beyond loopback needs ``--api-key`` (or
``MEDTUNE_API_KEY``) unless ``--insecure``.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
from typing import Any, Literal

from medtune.ask import AnswerArgs
from medtune.config import ModelArgs, arg
from medtune.errors import MedtuneError
from medtune.infer import GenerationArgs

log = logging.getLogger(__name__)

API_KEY_ENV = "MEDTUNE_API_KEY"


@dataclasses.dataclass
class ServeArgs:
    """How the service runs: address, engine, security and limits."""

    host: str = arg("127.0.0.1", "address to bind; beyond loopback an API key is required (or --insecure)")
    port: int = arg(8000, "port to listen on")
    engine: Literal["hf", "vllm"] = arg("hf", "hf: this process, continuous batching (CPU or GPU); vllm: vLLM's own server (GPUs)")
    api_key: str | None = arg(None, f"require 'Authorization: Bearer KEY' on the API (default: ${API_KEY_ENV})")
    insecure: bool = arg(False, "allow binding beyond loopback without an API key")
    cors_origin: list[str] = arg(factory=list, help="allow browser calls from this origin (repeatable); CORS is off by default")
    log_content: bool = arg(False, "log question and answer texts (medical, personal: off by default)")
    max_queue: int = arg(64, "requests that may wait for a batch slot; past it requests get 429")
    max_body_kb: int = arg(1024, "largest request body, in KiB (413 past it)")
    max_messages: int = arg(64, "most messages in one conversation")
    max_prompt_tokens: int = arg(4096, "most tokens in a rendered conversation")
    max_tokens_limit: int = arg(2048, "largest max_tokens a request may ask for")
    threads: int | None = arg(None, "CPU threads for generation (default on a CPU: all cores but one, which the "
                                    "HTTP side needs; ignored on a GPU)")
    tensor_parallel_size: int = arg(1, "vLLM: GPUs the model is split over")
    max_lora_rank: int | None = arg(None, "vLLM: --max-lora-rank (default: the smallest allowed value >= the adapter's rank)")

    def __post_init__(self) -> None:
        for name in ("max_queue", "max_body_kb", "max_messages", "max_prompt_tokens", "max_tokens_limit", "tensor_parallel_size"):
            if getattr(self, name) < (0 if name == "max_queue" else 1):
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {self.threads}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"--port {self.port}: expected 0-65535")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_key: str | None, insecure: bool) -> None:
    """Refuse to expose an unauthenticated medical service beyond this machine unless told to."""
    if not api_key and not insecure and not is_loopback(host):
        raise MedtuneError(f"--host {host} is reachable from other machines and no API key is set: give --api-key "
                           f"(or ${API_KEY_ENV}), or --insecure if the network is trusted")


def served_model_id(adapters: dict[str, Any], base: str) -> str:
    """The model id clients use: the first adapter's name (vLLM's --lora-modules name), else the base."""
    return next(iter(adapters), base)


def build_app(assistant: Any, server: ServeArgs, gen: GenerationArgs, api_key: str | None,
              department: str | None = None):
    """The FastAPI app for a loaded `medtune.infer.Assistant` (`load_assistant`)."""
    from medtune.infer import stop_token_ids
    from medtune.serve.app import AppConfig, create_app
    from medtune.serve.engine import Engine, SamplingParams

    info = assistant.info
    if str(info.device) == "cpu":
        import torch

        # torch's default (one thread per core) leaves none for the event loop that streams the answers:
        # on 2 cores that made every decode step ~5x slower (OpenMP workers spin while the loop waits).
        torch.set_num_threads(server.threads or max(1, (os.cpu_count() or 2) - 1))
    engine = Engine(assistant.model, assistant.tokenizer, stop_token_ids(assistant.tokenizer, assistant.prompt_format),
                    max_batch=gen.batch_size, max_queue=server.max_queue, seed=gen.seed,
                    boilerplate=assistant.boilerplate)
    defaults = SamplingParams.defaults(gen, server.max_tokens_limit)
    config = AppConfig(model_id=served_model_id(info.adapters, info.base), root=info.base, department=department,
                       api_key=api_key, cors_origins=list(server.cors_origin),
                       log_content=server.log_content, max_body_bytes=server.max_body_kb * 1024,
                       max_messages=server.max_messages, max_prompt_tokens=server.max_prompt_tokens,
                       max_tokens_limit=server.max_tokens_limit, defaults=defaults)
    return create_app(engine, assistant, config)


def vllm_command_for(model: ModelArgs, server: ServeArgs) -> list[str]:
    """vLLM's command line for ``model`` (base from --model or the adapter's manifest) and ``server``."""
    from medtune.hub import resolve_model
    from medtune.modeling import _adapter_names, choose_base, read_manifest
    from medtune.serve.vllm import vllm_command

    adapter_paths = [resolve_model(a, model.hub, model.models_dir) for a in model.adapter]
    manifest = read_manifest(adapter_paths[0]) if adapter_paths else {}
    base, hub, revision = choose_base(model, manifest)
    base_path = resolve_model(base, hub, model.models_dir, revision)
    adapters = dict(zip(_adapter_names(adapter_paths), adapter_paths))
    return vllm_command(base_path, adapters, served_name=served_model_id(adapters, base), host=server.host,
                        port=server.port, tensor_parallel_size=server.tensor_parallel_size,
                        max_lora_rank=server.max_lora_rank, cors_origins=server.cors_origin,
                        max_model_len=server.max_prompt_tokens + server.max_tokens_limit)


def serve(model: ModelArgs, server: ServeArgs = ServeArgs(), answer: AnswerArgs = AnswerArgs(),
          gen: GenerationArgs = GenerationArgs()) -> int:
    """`medtune serve`: load the model and serve the API and the page until Ctrl-C.

    ``answer.department`` is the department of requests that name none (default: the adapter's
    classifier guesses it per question).
    """
    api_key = server.api_key or os.environ.get(API_KEY_ENV) or None
    check_bind(server.host, api_key, server.insecure)
    if server.engine == "vllm":
        from medtune.serve.vllm import require_vllm, run_vllm

        require_vllm()
        log.warning("vLLM serves the model alone: medtune's system prompt, safety notice, disclaimer and "
                    "extension fields come only with the HF engine (clients send their own system prompt)")
        return run_vllm(vllm_command_for(model, server), api_key)

    import uvicorn

    from medtune.infer import load_assistant

    assistant = load_assistant(model, prompt_format=answer.prompt_format, context_window=answer.context_window,
                               disclaimer=answer.disclaimer)
    app = build_app(assistant, server, gen, api_key, answer.department)
    log.info("serving %s at http://%s:%d/ (API: /v1, %s)", app.state.config.model_id, server.host, server.port,
             "API key required" if api_key else "no API key")
    uvicorn.run(app, host=server.host, port=server.port, log_level="info")
    return 0
