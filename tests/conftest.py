"""Shared fixtures. Expensive ones (prepared data, the tiny model, a trained adapter) are built once per
test session — once across all pytest-xdist workers too, through `built_once`."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
SAMPLE_CSV = SHARED_DATA / "toyhom_neike_sample.csv"


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], object]) -> Path:
    """Run ``build(path)`` once per test run, whatever the number of xdist workers; return ``path``.

    Workers share the parent of their base temp directory; a file lock makes the others wait for the
    first builder, and a marker file says the build finished (a failed build is retried, not reused).
    """
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in __import__("os").environ:
        root = root.parent
    path, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.is_file():
            build(path)
            done.write_text(json.dumps({"built": str(path)}))
    return path


@pytest.fixture(scope="session")
def sample_csv() -> Path:
    """The real 7,644-row GB18030 sample (internal medicine) from ../shared/data."""
    if not SAMPLE_CSV.is_file():
        pytest.fail(f"shared sample missing: {SAMPLE_CSV} (CI lays ../shared beside the checkout)")
    return SAMPLE_CSV


@pytest.fixture(scope="session")
def tiny_model_dir(sample_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random Qwen3 + BPE tokenizer trained on the sample, built once per session (~15 s)."""
    from medtune.modeling import build_tiny_model

    return built_once(tmp_path_factory, "tiny-qwen3", lambda p: build_tiny_model(p, data=sample_csv))
