"""Shared fixtures. Expensive ones (prepared data, the tiny model) are built once per test session."""
from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
SAMPLE_CSV = SHARED_DATA / "toyhom_neike_sample.csv"


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

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model") / "tiny-qwen3", data=sample_csv)
