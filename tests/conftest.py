"""Shared fixtures. Expensive ones (prepared data, the tiny model, a trained adapter) are built once per
test session — once across all pytest-xdist workers too, through `built_once`."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from builds import built_once

# Under pytest-xdist every worker gets one thread: two workers with torch's default of one thread per
# core oversubscribe a 2-core machine and run a tiny model's forward pass ~30x slower.
if "PYTEST_XDIST_WORKER" in os.environ:
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

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

    return built_once(tmp_path_factory, "tiny-qwen3", lambda p: build_tiny_model(p, data=sample_csv))


# ----------------------------------------------------------------------------- trained adapters (train/infer tests)

SEED_BUG_PAIRS = 32  # ../shared/FACTS.md: 32 real QA pairs, answers cut to 120 characters
SEED_BUG_ANSWER_CHARS = 120


def _write_qa32(prepared: Path, out: Path) -> None:
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from medtune.chat_format import build_messages

    rows, openings = [], set()
    for row in pq.read_table(prepared / "train.parquet").to_pylist():
        answer = row["answer"][:SEED_BUG_ANSWER_CHARS]
        if len(row["messages"]) != 3 or answer[:30] in openings:
            continue  # single-turn pairs whose answers open differently
        openings.add(answer[:30])
        department = row["sub_department"] or row["department"]
        rows.append({**row, "answer": answer, "messages": build_messages(row["question"], answer, department=department)})
        if len(rows) == SEED_BUG_PAIRS:
            break
    out.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows)
    for split in ("train", "validation", "test"):
        pq.write_table(table, out / f"{split}.parquet")
    for name in ("manifest.json", "boilerplate.json", "department_classifier.npz"):
        shutil.copyfile(prepared / name, out / name)


@pytest.fixture(scope="session")
def qa32_dir(prepared_sample_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared directory of 32 real QA pairs from the sample's training split (answers cut to 120
    characters, no two opening alike in 30; system prompts naming the sub-department), in all three splits."""
    return built_once(tmp_path_factory, "qa32", lambda p: _write_qa32(prepared_sample_dir, p))


@pytest.fixture(scope="session")
def trained_adapter_dir(tiny_model_dir: Path, qa32_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter trained for 3 steps on the tiny model through the `medtune train` command line."""
    from medtune.cli import main

    def build(out: Path) -> None:
        code = main(["train", "--model", str(tiny_model_dir), "--data", str(qa32_dir), "--output", str(out),
                     "--profile", "cpu", "--max-steps", "3", "--micro-batch", "4", "--logging-steps", "1",
                     "--seed", "0", "--overwrite"])
        assert code == 0

    return built_once(tmp_path_factory, "adapter-3-steps", build)


@pytest.fixture(scope="session")
def memorised_adapter_dir(tiny_model_dir: Path, qa32_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter with which the tiny model has memorised the 32 pairs of `qa32_dir` (the recipe of
    ../shared/FACTS.md: r=16, alpha=32, all seven projections, lr 3e-3, batch 8, 300 steps; minutes: slow tests only)."""
    from medtune.config import ModelArgs
    from medtune.train import TrainArgs, train

    args = TrainArgs(lora_r=16, lora_alpha=32, lr=3e-3, max_steps=300, micro_batch=8, grad_accum=1, seed=0,
                     threads=2, logging_steps=50)
    return built_once(tmp_path_factory, "adapter-memorised",
                      lambda p: train(ModelArgs(model=str(tiny_model_dir), profile="cpu"), qa32_dir, p, args,
                                      overwrite=True))


@pytest.fixture(scope="session")
def prepared_sample_dir(sample_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`medtune data prepare` run once on the real sample with default settings (~5 s)."""
    from medtune.data.prepare import prepare

    return built_once(tmp_path_factory, "prepared-sample", lambda p: prepare(input=sample_csv, output=p))
