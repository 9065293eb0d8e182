"""`medtune serve` flags, the refusal to expose an unauthenticated server, and vLLM's command line."""
from __future__ import annotations

import json
import shutil
import sys

import pytest

from medtune.cli import parse
from medtune.config import ModelArgs
from medtune.errors import MedtuneError
from medtune.serve import ServeArgs, check_bind, serve, vllm_command_for
from medtune.serve.vllm import VLLM_LORA_RANKS, adapter_rank, lora_rank_setting


def test_serve_flags_parse():
    command, kwargs = parse(["serve", "--adapter", "runs/a", "--host", "0.0.0.0", "--port", "9000", "--api-key", "k",
                             "--cors-origin", "https://a.example", "--max-queue", "5", "--batch-size", "4",
                             "--engine", "vllm", "--tensor-parallel-size", "2", "--department", "儿科"])
    assert command == "serve"
    server = kwargs["server"]
    assert (server.host, server.port, server.api_key, server.cors_origin, server.max_queue, server.engine,
            server.tensor_parallel_size) == ("0.0.0.0", 9000, "k", ["https://a.example"], 5, "vllm", 2)
    assert kwargs["gen"].batch_size == 4 and kwargs["answer"].department == "儿科"
    assert parse(["serve"])[1]["server"] == ServeArgs()  # 127.0.0.1:8000, HF engine, no key, CORS off


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.5", "::", "example.org"])
def test_non_loopback_without_key_refuses(host, monkeypatch):
    monkeypatch.delenv("MEDTUNE_API_KEY", raising=False)
    with pytest.raises(MedtuneError, match="--api-key"):
        check_bind(host, None, insecure=False)
    check_bind(host, "k", insecure=False)
    check_bind(host, None, insecure=True)
    with pytest.raises(MedtuneError, match="--insecure"):  # before any model is loaded
        serve(ModelArgs(model="/nonexistent"), ServeArgs(host=host))


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_loopback_needs_no_key(host):
    check_bind(host, None, insecure=False)


def test_vllm_command_line(tiny_model_dir, trained_adapter_dir):
    from medtune.modeling import _adapter_names

    cmd = vllm_command_for(ModelArgs(model=str(tiny_model_dir), adapter=[str(trained_adapter_dir)]),
                           ServeArgs(host="0.0.0.0", port=9000, tensor_parallel_size=2, cors_origin=["https://a.example"]))
    name = _adapter_names([trained_adapter_dir])[0]
    assert cmd[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    flags = dict(zip(cmd[3::2], cmd[4::2]))
    rank = json.loads((trained_adapter_dir / "adapter_config.json").read_text())["r"]
    assert flags["--model"] == str(tiny_model_dir) and flags["--tensor-parallel-size"] == "2"
    assert flags["--host"] == "0.0.0.0" and flags["--port"] == "9000"
    assert "--enable-lora" in cmd and int(cmd[cmd.index("--max-lora-rank") + 1]) >= rank
    assert cmd[cmd.index("--lora-modules") + 1] == f"{name}={trained_adapter_dir.resolve()}"
    assert cmd[cmd.index("--allowed-origins") + 1] == '["https://a.example"]'
    assert "--api-key" not in cmd  # passed in VLLM_API_KEY, not visible in the process list
    base_only = vllm_command_for(ModelArgs(model=str(tiny_model_dir)), ServeArgs())
    assert "--enable-lora" not in base_only and "--lora-modules" not in base_only


def _adapter_with(tmp_path, src, **config):
    dst = tmp_path / "adapter"
    shutil.copytree(src, dst)
    data = json.loads((dst / "adapter_config.json").read_text())
    data.update(config)
    (dst / "adapter_config.json").write_text(json.dumps(data))
    return dst


@pytest.mark.parametrize("config, words", [({"use_dora": True}, "DoRA"),
                                            ({"modules_to_save": ["lm_head"]}, "lm_head")])
def test_vllm_refuses_dora_and_saved_modules_with_merge_advice(tmp_path, trained_adapter_dir, config, words):
    adapter = _adapter_with(tmp_path, trained_adapter_dir, **config)
    with pytest.raises(MedtuneError, match=f"{words}.*medtune merge"):
        adapter_rank(adapter)


def test_lora_rank_setting(tmp_path, trained_adapter_dir):
    assert adapter_rank(_adapter_with(tmp_path, trained_adapter_dir, r=8, rank_pattern={"q_proj": 200})) == 200
    assert lora_rank_setting(200) == 256 and lora_rank_setting(16) == 16 and lora_rank_setting(3) == 8
    assert lora_rank_setting(16, 64) == 64
    with pytest.raises(MedtuneError, match="below"):
        lora_rank_setting(32, 16)
    with pytest.raises(MedtuneError, match="one of"):
        lora_rank_setting(8, 12)
    with pytest.raises(MedtuneError, match="largest"):
        lora_rank_setting(VLLM_LORA_RANKS[-1] + 1)


def test_vllm_engine_without_vllm_says_how_to_install(monkeypatch, tiny_model_dir):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(MedtuneError, match="pip install vllm"):
        serve(ModelArgs(model=str(tiny_model_dir)), ServeArgs(engine="vllm"))


def test_api_key_from_the_environment_allows_a_public_bind(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDTUNE_API_KEY", "from-env")
    with pytest.raises(MedtuneError) as raised:  # past the bind check: it fails on the missing model instead
        serve(ModelArgs(model=str(tmp_path / "missing")), ServeArgs(host="0.0.0.0"))
    assert "--insecure" not in str(raised.value) and "missing" in str(raised.value)
