"""Where a model comes from: a local directory, or a ModelScope / Hugging Face id downloaded once.

Every command that loads a model calls `resolve_model`; `medtune download` wraps `download_model`:

    medtune download --model Qwen/Qwen3-4B --model Sogrey/Chinese-medical-lora      # from ModelScope
    medtune download --model Qwen/Qwen3-4B --hub hf                                  # from Hugging Face

    >>> resolve_model("Qwen/Qwen3-4B")                      # doctest: +SKIP
    PosixPath('models/Qwen/Qwen3-4B')                        # downloaded from ModelScope on first use
    >>> resolve_model("runs/tiny-model")                     # doctest: +SKIP  (a local directory, as is)

A download goes to ``<models_dir>/<id>`` (resumable: the hub clients keep partial files there) and is
checked (config, weights — every shard of a safetensors index, each file's length against its header
— and tokenizer). A checked directory is used without touching the network again. With no network the
call fails within seconds, naming ``--model PATH``. Imports no torch (the hub clients are imported
only when a download really starts).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from medtune.errors import MedtuneError

log = logging.getLogger(__name__)

Hub = Literal["modelscope", "hf"]
HUBS: tuple[str, ...] = ("modelscope", "hf")
MARKER = ".medtune-download.json"  # written after a download passed `check_model_dir`
PROBE_TIMEOUT_S = 4.0
WEIGHT_FILES = ("model.safetensors", "adapter_model.safetensors", "pytorch_model.bin", "adapter_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"), ("tokenizer.model",))


def hub_endpoint(hub: Hub) -> str:
    """The URL the hub client talks to (honours ``MODELSCOPE_DOMAIN`` and ``HF_ENDPOINT``)."""
    if hub == "modelscope":
        domain = os.environ.get("MODELSCOPE_DOMAIN") or "www.modelscope.cn"
        return domain if domain.startswith(("http://", "https://")) else "https://" + domain
    return os.environ.get("HF_ENDPOINT") or "https://huggingface.co"


def _offline_by_env(hub: Hub) -> str | None:
    names = ["MEDTUNE_OFFLINE"] + (["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"] if hub == "hf" else [])
    for name in names:
        if os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{name} is set"
    return None


def _proxy_for(url: str) -> str | None:
    scheme = urlparse(url).scheme or "https"
    for name in (f"{scheme}_proxy", f"{scheme.upper()}_PROXY", "all_proxy", "ALL_PROXY"):
        if os.environ.get(name):
            return os.environ[name]
    return None


def probe(url: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when a TCP connection to ``url``'s host (or its proxy) opens within ``timeout``; else why not.

    Runs in a thread so that a hanging name lookup cannot outlast ``timeout`` either.
    """
    target = urlparse(_proxy_for(url) or url)
    host = target.hostname or ""
    port = target.port or (80 if target.scheme == "http" else 443)
    result: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(None)
        except OSError as e:
            result.append(f"{type(e).__name__}: {e}")

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return result[0] if result else f"no answer from {host}:{port} within {timeout:.0f} s"


# ----------------------------------------------------------------------------- checking a model directory

def _safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete safetensors file (truncated downloads end early), or None."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, struct.error, ValueError) as e:
        return f"{path.name}: unreadable safetensors header ({e})"
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if size != 8 + n + end:
        return f"{path.name}: {size:,} bytes, expected {8 + n + end:,} (incomplete download?)"
    return None


def check_model_dir(path: Path) -> list[str]:
    """Problems that keep ``path`` from being a usable model or adapter directory (empty list: fine).

    Needs ``config.json`` (a model) or ``adapter_config.json`` (an adapter); a model also needs its
    weights (every shard named by a safetensors index, each safetensors file as long as its header
    says) and a tokenizer.
    """
    path = Path(path)
    if not path.is_dir():
        return [f"{path} is not a directory"]
    if (path / "adapter_config.json").is_file():
        weights = [path / n for n in ("adapter_model.safetensors", "adapter_model.bin") if (path / n).is_file()]
        problems = [] if weights else ["no adapter weights (adapter_model.safetensors)"]
        return problems + [p for w in weights if w.suffix == ".safetensors" and (p := _safetensors_problem(w))]
    if not (path / "config.json").is_file():
        return ["no config.json (nor adapter_config.json)"]
    problems: list[str] = []
    shards: list[Path] = []
    for index in INDEX_FILES:
        if (path / index).is_file():
            try:
                weight_map = json.loads((path / index).read_text(encoding="utf-8"))["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                problems.append(f"{index}: unreadable ({e})")
                continue
            names = sorted(set(weight_map.values()))
            shards += [path / n for n in names]
            problems += [f"{n}: missing (listed in {index})" for n in names if not (path / n).is_file()]
    shards += [path / n for n in WEIGHT_FILES if (path / n).is_file()]
    if not shards:
        problems.append("no weights (model.safetensors or a model.safetensors.index.json with its shards)")
    problems += [p for s in shards if s.suffix == ".safetensors" and s.is_file() and (p := _safetensors_problem(s))]
    if not any(all((path / n).is_file() for n in group) for group in TOKENIZER_FILES):
        problems.append("no tokenizer (tokenizer.json, or vocab.json + merges.txt)")
    return problems


# ----------------------------------------------------------------------------- downloading

def _looks_like_path(model: str) -> bool:
    return model.startswith((".", "/", "~")) or os.sep in model.strip("/").replace("/", "", 1) or Path(model).exists()


def _offline_message(model: str, hub: Hub, target: Path, reason: str) -> str:
    partial = target.is_dir() and any(target.iterdir())
    return (f"cannot download {model!r} from {hub} ({hub_endpoint(hub)}): {reason}.\n"
            + (f"The files already fetched into {target}/ are kept: run the command again to resume.\n"
               if partial else "")
            + f"Without network access, pass a local copy with --model PATH (a directory holding config.json, "
            f"the *.safetensors weights and the tokenizer files), or put those files in {target}/ and "
            f"give --model {model} again.")


def _snapshot_download(hub: Hub, model: str, target: Path, revision: str | None) -> None:
    if hub == "modelscope":
        from modelscope import snapshot_download

        snapshot_download(model, revision=revision, local_dir=str(target))
    else:
        from huggingface_hub import snapshot_download

        snapshot_download(model, revision=revision, local_dir=str(target))


def _read_marker(target: Path) -> dict:
    try:
        return json.loads((target / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def download_model(model: str, hub: Hub = "modelscope", models_dir: Path = Path("models"),
                   revision: str | None = None, *, force: bool = False) -> Path:
    """Download hub id ``model`` into ``models_dir/<model>`` unless a checked copy is there; return it.

    Resumes a partial download; checks the files afterwards (raising `MedtuneError` listing what is
    missing); fails fast with a message naming ``--model PATH`` when the hub cannot be reached.
    ``revision`` (branch, tag or commit) is passed to the hub; None means the hub's default.
    """
    if hub not in HUBS:
        raise MedtuneError(f"--hub {hub!r}: expected one of {', '.join(HUBS)}")
    target = Path(models_dir) / model
    marker = _read_marker(target)
    same_revision = revision is None or marker.get("revision") == revision
    if not force and same_revision and not check_model_dir(target):
        log.debug("using the checked download in %s", target)
        return target
    reason = _offline_by_env(hub) or probe(hub_endpoint(hub))
    if reason:
        raise MedtuneError(_offline_message(model, hub, target, reason))
    log.info("downloading %s from %s into %s (resumable: run again if interrupted)", model, hub, target)
    target.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        _snapshot_download(hub, model, target, revision)
    except (OSError, ConnectionError) as e:
        raise MedtuneError(_offline_message(model, hub, target, f"{type(e).__name__}: {e}")) from None
    except Exception as e:  # the hub clients raise their own types for unknown ids, auth, revisions
        raise MedtuneError(f"downloading {model!r} from {hub} failed: {type(e).__name__}: {e}\n"
                           f"Check the id (and --hub), or pass a local directory with --model PATH.") from None
    problems = check_model_dir(target)
    if problems:
        raise MedtuneError(f"the download of {model!r} in {target} is incomplete: " + "; ".join(problems)
                           + ". Run the command again to resume it.")
    (target / MARKER).write_text(json.dumps({"model": model, "hub": hub, "revision": revision,
                                             "downloaded_at": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n",
                                 encoding="utf-8")
    log.info("downloaded %s in %.0f s", model, time.perf_counter() - t0)
    return target


def resolve_model(model: str, hub: Hub = "modelscope", models_dir: Path = Path("models"),
                  revision: str | None = None) -> Path:
    """The local directory for ``model``: a local model/adapter directory as is, else a hub id downloaded
    (once) into ``models_dir/<model>``. Raises `MedtuneError` with what to do when neither works."""
    local = Path(model).expanduser()
    if local.is_dir():
        if not ((local / "config.json").is_file() or (local / "adapter_config.json").is_file()):
            raise MedtuneError(f"--model {model}: the directory holds no config.json (nor adapter_config.json); "
                               "give a Hugging Face-layout model directory or a hub id such as Qwen/Qwen3-4B")
        return local
    if _looks_like_path(model):
        raise MedtuneError(f"--model {model}: no such directory (a hub id looks like Qwen/Qwen3-4B)")
    return download_model(model, hub, models_dir, revision)


# ----------------------------------------------------------------------------- the command

def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def download(model: list[str], hub: Hub = "modelscope", models_dir: Path = Path("models"),
             revision: str | None = None, force: bool = False) -> list[Path]:
    """`medtune download`: fetch base models and adapters by hub id into ``--models-dir/<id>``, where
    every other command finds them by the same id (``--model Qwen/Qwen3-4B``, ``--adapter ...``).

    Args:
        model: hub id of a base model or adapter (e.g. Qwen/Qwen3-4B, Sogrey/Chinese-medical-lora); repeat the flag for several
        hub: where the ids live: modelscope (default, fast in mainland China) or hf (Hugging Face)
        models_dir: where downloads are kept
        revision: branch, tag or commit to fetch (default: the hub's main revision)
        force: fetch again even when a checked copy is there (files already complete are not re-downloaded)
    """
    if not model:
        raise MedtuneError("--model: give at least one hub id, e.g. --model Qwen/Qwen3-4B")
    paths = []
    for name in model:
        if _looks_like_path(name) or name.count("/") != 1:
            raise MedtuneError(f"--model {name!r}: expected a hub id of the form owner/name, e.g. Qwen/Qwen3-4B")
        path = download_model(name, hub, models_dir, revision, force=force)
        kind = "adapter" if (path / "adapter_config.json").is_file() else "model"
        flag = "--adapter" if kind == "adapter" else "--model"
        log.info("%s %s: %s (%.2f GiB, checked); use it with %s %s", kind, name, path, _size(path) / 2**30, flag, name)
        paths.append(path)
    return paths
