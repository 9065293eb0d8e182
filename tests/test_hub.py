"""Resolving a model: local directories, checked downloads, and a fast, clear failure offline."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medtune import hub
from medtune.errors import MedtuneError
from medtune.hub import check_model_dir, download_model, resolve_model

ID = "Qwen/Qwen3-4B"


def _safetensors(path: Path, n_floats: int = 4) -> None:
    """A valid safetensors file with one float32 tensor (written by hand: no torch needed)."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [n_floats], "data_offsets": [0, 4 * n_floats]}}).encode()
    header += b" " * (-len(header) % 8)
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * (4 * n_floats))


def _model_dir(path: Path, shards: int = 0) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text('{"model_type": "qwen3"}', encoding="utf-8")
    (path / "tokenizer.json").write_text("{}", encoding="utf-8")
    if shards:
        names = [f"model-{i:05d}-of-{shards:05d}.safetensors" for i in range(1, shards + 1)]
        for name in names:
            _safetensors(path / name)
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {f"layer{i}": n for i, n in enumerate(names)}}), encoding="utf-8")
    else:
        _safetensors(path / "model.safetensors")
    return path


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every connection attempt fails at once, as on a machine without network (no proxy either)."""
    def unreachable(*args, **kwargs):
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(socket.socket, "connect", unreachable)
    monkeypatch.setattr(socket, "getaddrinfo", unreachable)
    monkeypatch.setattr(socket, "create_connection", unreachable)
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
                 "MEDTUNE_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "MODELSCOPE_DOMAIN", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)


def test_local_directory_is_used_as_is(tmp_path: Path, no_network):
    model = _model_dir(tmp_path / "my-model")
    assert resolve_model(str(model)) == model
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}", encoding="utf-8")
    assert resolve_model(str(adapter)) == adapter


def test_local_directory_without_config_or_missing_path(tmp_path: Path, no_network):
    with pytest.raises(MedtuneError, match="no config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(MedtuneError, match="no such directory"):
        resolve_model(str(tmp_path / "not" / "there"))


@pytest.mark.parametrize("which", ["modelscope", "hf"])
def test_offline_download_fails_fast_naming_model_path(tmp_path: Path, no_network, which: str):
    t0 = time.perf_counter()
    with pytest.raises(MedtuneError) as e:
        resolve_model(ID, hub=which, models_dir=tmp_path / "models")
    assert time.perf_counter() - t0 < 5
    message = str(e.value)
    assert "--model PATH" in message and str(tmp_path / "models" / ID) in message
    assert f"from {which}" in message and "Network is unreachable" in message


def test_offline_env_fails_without_trying(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "probe", lambda url: pytest.fail("probed the network although offline"))
    with pytest.raises(MedtuneError, match=r"HF_HUB_OFFLINE is set.*\n.*--model PATH"):
        resolve_model(ID, hub="hf", models_dir=tmp_path)


def test_offline_download_in_a_subprocess_fails_fast(tmp_path: Path):
    """The real CLI-like path, no monkeypatching of our code: the hub host is made unresolvable."""
    code = (
        "import socket, sys\n"
        "def down(*a, **k): raise OSError(101, 'Network is unreachable')\n"
        "socket.getaddrinfo = down; socket.socket.connect = down\n"
        "from medtune.hub import resolve_model\n"
        "from medtune.errors import MedtuneError\n"
        f"try: resolve_model({ID!r}, models_dir=__import__('pathlib').Path({str(tmp_path)!r}))\n"
        "except MedtuneError as e: print(e); sys.exit(3)\n"
    )
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert out.returncode == 3, out.stderr
    assert "--model PATH" in out.stdout
    assert time.perf_counter() - t0 < 10  # interpreter start included


def test_complete_download_is_not_fetched_again(tmp_path: Path, no_network):
    target = _model_dir(tmp_path / ID, shards=2)
    assert check_model_dir(target) == []
    assert resolve_model(ID, models_dir=tmp_path) == target  # no network needed


def test_incomplete_download_is_detected(tmp_path: Path, no_network):
    target = _model_dir(tmp_path / ID, shards=3)
    (target / "model-00002-of-00003.safetensors").unlink()
    problems = check_model_dir(target)
    assert problems == ["model-00002-of-00003.safetensors: missing (listed in model.safetensors.index.json)"]
    with pytest.raises(MedtuneError, match="--model PATH"):
        resolve_model(ID, models_dir=tmp_path)  # tries to resume the download, offline


def test_truncated_safetensors_and_missing_tokenizer(tmp_path: Path):
    target = _model_dir(tmp_path / "m")
    data = (target / "model.safetensors").read_bytes()
    (target / "model.safetensors").write_bytes(data[:-3])
    (target / "tokenizer.json").unlink()
    problems = check_model_dir(target)
    assert len(problems) == 2
    assert "incomplete download" in problems[0] and "no tokenizer" in problems[1]
    assert check_model_dir(tmp_path / "nothing") == [f"{tmp_path / 'nothing'} is not a directory"]


def test_download_then_reuse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    calls: list[tuple] = []

    def fake_download(which, model, target, revision):
        calls.append((which, model, target, revision))
        _model_dir(target)

    monkeypatch.setattr(hub, "probe", lambda url: None)
    monkeypatch.setattr(hub, "_snapshot_download", fake_download)
    monkeypatch.delenv("MEDTUNE_OFFLINE", raising=False)
    path = download_model(ID, "hf", tmp_path, revision="v1")
    assert path == tmp_path / ID and calls == [("hf", ID, path, "v1")]
    marker = json.loads((path / hub.MARKER).read_text(encoding="utf-8"))
    assert (marker["model"], marker["hub"], marker["revision"]) == (ID, "hf", "v1")
    assert resolve_model(ID, "hf", tmp_path, "v1") == path and len(calls) == 1
    assert resolve_model(ID, "hf", tmp_path) == path and len(calls) == 1
    download_model(ID, "hf", tmp_path, revision="v2")  # another revision is fetched
    assert len(calls) == 2


def test_download_that_stays_incomplete_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(hub, "probe", lambda url: None)
    monkeypatch.setattr(hub, "_snapshot_download", lambda *a: (a[2] / "config.json").write_text("{}"))
    monkeypatch.delenv("MEDTUNE_OFFLINE", raising=False)
    with pytest.raises(MedtuneError, match="incomplete: no weights.*Run the command again to resume"):
        download_model(ID, "modelscope", tmp_path)
    assert not (tmp_path / ID / hub.MARKER).exists()


def test_hub_imports_without_torch():
    code = "import sys, medtune.hub, medtune.profiles; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------- `medtune download`

def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


@pytest.mark.parametrize("which", ["modelscope", "hf"])
def test_download_command_without_network(tmp_path: Path, which: str):
    """The real command line with the network unreachable (every connection goes to a proxy port where
    nothing listens, refused at once): a clear message naming the hub and --model PATH, exit status 2."""
    proxy = f"http://127.0.0.1:{_closed_port()}"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "https_proxy": proxy, "HTTPS_PROXY": proxy,
           "http_proxy": proxy, "HTTP_PROXY": proxy, "NO_PROXY": "", "no_proxy": ""}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "medtune", "download", "--model", ID, "--hub", which,
                          "--models-dir", str(tmp_path / "models")], capture_output=True, text=True, timeout=60, env=env)
    assert time.perf_counter() - t0 < 20  # interpreter start included
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("medtune: error: cannot download 'Qwen/Qwen3-4B' from " + which)
    assert "Connection refused" in out.stderr and "--model PATH" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "models" / ID / hub.MARKER).exists()


def test_download_command_fetches_each_id_into_the_layout_others_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   caplog):
    from medtune.cli import main

    calls: list[tuple] = []

    def fake_download(which, model, target, revision):
        calls.append((which, model, revision))
        if model.endswith("lora"):
            target.mkdir(parents=True, exist_ok=True)
            (target / "adapter_config.json").write_text("{}", encoding="utf-8")
            _safetensors(target / "adapter_model.safetensors")
        else:
            _model_dir(target, shards=2)

    monkeypatch.setattr(hub, "probe", lambda url: None)
    monkeypatch.setattr(hub, "_snapshot_download", fake_download)
    monkeypatch.delenv("MEDTUNE_OFFLINE", raising=False)
    models = tmp_path / "models"
    argv = ["download", "--model", ID, "--model", "Sogrey/Chinese-medical-lora", "--models-dir", str(models)]
    with caplog.at_level("INFO", logger="medtune.hub"):
        assert main(argv) == 0
    assert calls == [("modelscope", ID, None), ("modelscope", "Sogrey/Chinese-medical-lora", None)]
    assert "use it with --adapter Sogrey/Chinese-medical-lora" in caplog.text and f"use it with --model {ID}" in caplog.text
    # every other command finds them by id, without the network; a second download fetches nothing
    monkeypatch.setattr(hub, "probe", lambda url: pytest.fail("went to the network for a checked download"))
    assert resolve_model(ID, models_dir=models) == models / ID
    assert resolve_model("Sogrey/Chinese-medical-lora", models_dir=models) == models / "Sogrey/Chinese-medical-lora"
    assert main(argv) == 0 and len(calls) == 2


def test_interrupted_download_says_it_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def dropped(which, model, target, revision):
        (target / "model-00001-of-00002.safetensors").write_bytes(b"partial")
        raise ConnectionError("Connection reset by peer")

    monkeypatch.setattr(hub, "probe", lambda url: None)
    monkeypatch.setattr(hub, "_snapshot_download", dropped)
    monkeypatch.delenv("MEDTUNE_OFFLINE", raising=False)
    with pytest.raises(MedtuneError, match=r"Connection reset by peer.*\n.*are kept: run the command again to resume"):
        hub.download([ID], models_dir=tmp_path)
    assert (tmp_path / ID / "model-00001-of-00002.safetensors").read_bytes() == b"partial"  # kept for the resume


def test_download_command_rejects_paths(tmp_path: Path):
    with pytest.raises(MedtuneError, match="expected a hub id of the form owner/name"):
        hub.download([str(tmp_path)], models_dir=tmp_path)
    with pytest.raises(MedtuneError, match="at least one hub id"):
        hub.download([], models_dir=tmp_path)
