"""bench/run_all.py: collects each script's figures line, tells skipped from failed, writes the table."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_all():
    spec = importlib.util.spec_from_file_location("bench_run_all", ROOT / "bench" / "run_all.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _script(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / f"{name}.py"
    path.write_text(body, encoding="utf-8")
    return path


def test_outcomes_and_table(run_all, tmp_path: Path) -> None:
    figures = [{"name": "rows/s", "value": 41000.5, "unit": "rows/s", "baseline": 13000.0, "ratio": 3.15,
                "goal": ">= 3x"}]
    ok = _script(tmp_path, "fast", "import json\nprint('working')\n"
                                   f"print(json.dumps({{'figures': {figures!r}}}))\nprint('done')\n")
    skipped = _script(tmp_path, "gpu", "import sys\nprint('no CUDA device: skipped')\nsys.exit(77)\n")
    failed = _script(tmp_path, "broken", "raise SystemExit('bad corpus')\n")
    silent = _script(tmp_path, "silent", "print('forgot the figures')\n")
    outcomes = [run_all.run_script(p, tmp_path, timeout=60) for p in (ok, skipped, failed, silent)]
    assert [o.status for o in outcomes] == ["ok", "skipped", "failed", "failed"]
    assert outcomes[0].figures == json.loads(json.dumps(figures))
    assert outcomes[1].reason == "no CUDA device: skipped"
    assert "bad corpus" in outcomes[2].reason and "exit status 1" in outcomes[2].reason
    assert "no figures line" in outcomes[3].reason
    assert (tmp_path / "fast.log").read_text().startswith("working")

    results = tmp_path / "RESULTS.md"
    run_all.write_results(results, outcomes)
    text = results.read_text()
    assert "| fast | rows/s | 41,000 | rows/s | 13,000 | 3.15 | >= 3x |" in text
    assert "| gpu | skipped |" in text and "| broken | failed |" in text


def test_every_bench_script_is_found(run_all) -> None:
    names = [p.name for p in run_all.scripts([])]
    assert "data_prepare.py" in names and "run_all.py" not in names
    with pytest.raises(SystemExit, match="no bench script named nope"):
        run_all.scripts(["nope"])
