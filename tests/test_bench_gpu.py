"""bench/gpu_qwen3_4b.py: skips cleanly without CUDA; its whole code path runs on the CPU (--smoke)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_qwen3_4b.py"


def test_without_cuda_it_says_so_and_exits_77():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 77  # bench/run_all.py lists it as skipped, not failed
    assert "needs a CUDA GPU" in out.stdout.strip().splitlines()[-1]


@pytest.mark.slow
def test_smoke_runs_the_training_core_bf16_and_nf4(tmp_path: Path):
    out = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--steps", "3", "--workdir", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert [(r["profile"], r["quant"], r["status"]) for r in summary["rows"]] == [("cpu", "none", "ok"), ("cpu", "nf4", "ok")]
    for row in summary["rows"]:
        assert row["step_s"] > 0 and row["tokens_per_s"] > 0 and row["estimate_gib"] > 0
    assert len(summary["figures"]) == 2
    for figure in summary["figures"]:
        assert set(figure) >= {"name", "value", "unit", "baseline", "ratio"} and figure["unit"] == "tokens/s"
    assert "profile  quant  batch" in out.stdout
