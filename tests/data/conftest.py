"""Inputs for the data-pipeline tests, built from the real sample: the six-folder layout, small CSVs.

`prepared_sample_dir` (prepare run once on the sample) lives in tests/conftest.py: training tests use it too.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Callable

import pytest

from medtune.data import TOP_DEPARTMENTS

HEADER = ["department", "title", "ask", "answer"]


def csv_bytes(rows: list[list[str]], encoding: str = "gb18030", header: list[str] | None = HEADER) -> bytes:
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, lineterminator="\n")
    if header:
        writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue().encode(encoding)


@pytest.fixture(scope="session")
def sample_rows(sample_csv: Path) -> list[list[str]]:
    """The sample's data rows (department, title, ask, answer)."""
    with open(sample_csv, encoding="gb18030", newline="") as f:
        header, *rows = csv.reader(f)
    assert header == HEADER
    return rows


@pytest.fixture(scope="session")
def six_folder_root(sample_rows: list[list[str]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``<tmp>/corpus/Data_数据/<folder>/<n>.csv``: the sample dealt round-robin into the six folders, GB18030."""
    root = tmp_path_factory.mktemp("corpus") / "Data_数据"
    for k, folder in enumerate(TOP_DEPARTMENTS):
        (root / folder).mkdir(parents=True)
        (root / folder / f"{folder.split('_')[1]}.csv").write_bytes(csv_bytes(sample_rows[k::6]))
    return root


@pytest.fixture
def write_csv(tmp_path: Path) -> Callable[..., Path]:
    """``write_csv(name, rows, encoding=..., header=...)`` → the path of a CSV written under tmp_path."""
    def write(name: str, rows: list[list[str]], encoding: str = "gb18030", header: list[str] | None = HEADER) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(csv_bytes(rows, encoding, header))
        return path
    return write
