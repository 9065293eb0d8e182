"""`medtune data report` on the prepared shared sample: files written, and its figures equal the manifest's."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from medtune.data import SPLITS
from medtune.data import report as rp
from medtune.errors import DataError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tables_under(md: str, heading: str) -> list[list[list[str]]]:
    """The Markdown tables in the section that starts with ``heading`` (rows of cells, header row dropped)."""
    start = md.index(heading + "\n")
    level = heading.split(" ")[0]
    rest = md[start + len(heading):]
    end = re.search(rf"^{level} ", rest, flags=re.M)
    section = rest[: end.start()] if end else rest
    tables, current = [], []
    for line in section.splitlines():
        if line.startswith("|"):
            current.append([c.strip() for c in line.strip().strip("|").split(" | ")])
        elif current:
            tables.append(current[2:])
            current = []
    if current:
        tables.append(current[2:])
    return tables


def num(cell: str) -> int:
    return int(cell.replace(",", ""))


@pytest.fixture(scope="module")
def written(prepared_sample_dir: Path, tmp_path_factory) -> tuple[Path, str, dict]:
    out = tmp_path_factory.mktemp("report")
    path = rp.report(rp.ReportArgs(data=prepared_sample_dir, output=out))
    manifest = json.loads((prepared_sample_dir / "manifest.json").read_text(encoding="utf-8"))
    return path, path.read_text(encoding="utf-8"), manifest


def test_report_and_every_plot_exist(written):
    path, md, _ = written
    assert path.name == "report.md" and path.stat().st_size > 0
    images = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", md)
    assert set(images) == {"departments.png", "sub_departments.png", "lengths.png", "drop_reasons.png", "boilerplate.png"}
    for name in images:
        data = (path.parent / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5_000, name


def test_headline_matches_manifest(written):
    _, md, m = written
    counts = m["counts"]
    headline = {row[0]: num(row[1]) for row in tables_under(md, "## Headline")[0]}
    assert headline == {"read": counts["read"], "kept": counts["kept"], "rejected": counts["rejected"],
                        **{f"kept: {s}": counts["splits"][s] for s in SPLITS}}
    inputs = tables_under(md, "## Headline")[1]
    assert [(r[0], num(r[3]), r[6].strip("`")) for r in inputs] == [
        (f["name"], f["rows_read"], f["sha256"]) for f in m["files"]]
    assert f"test accuracy **{m['classifier']['test_accuracy']:.4f}**" in md
    stages = tables_under(md, "## Headline")[2]
    assert [(r[0], num(r[1]), num(r[2])) for r in stages] == [(s["stage"], s["rows_in"], s["rows_out"]) for s in m["stages"]]


def test_departments_and_drops_match_manifest(written):
    _, md, m = written
    counts = m["counts"]
    dept, subs = tables_under(md, "## Rows per department and split")
    total = dept[-1]
    assert total[0] == "all" and [num(c) for c in total[1:]] == [*(counts["splits"][s] for s in SPLITS), counts["kept"]]
    assert {r[0]: num(r[-1]) for r in dept[:-1]} == {d or "(none)": n for d, n in m["departments"].items()}
    assert {r[1]: num(r[-1]) for r in subs} == {d: n for d, n in m["sub_departments"].items() if d}
    drops = tables_under(md, "## Dropped rows")[0]
    assert {r[0]: num(r[1]) for r in drops} == counts["rejected_by_reason"]
    assert all(num(r[1]) == num(r[3]) for r in drops)  # rejects.jsonl agrees with the manifest
    assert "does not match" not in md
    assert sum(num(r[1]) for r in drops) == counts["rejected"] > 0


def test_boilerplate_and_lengths_match_the_files(written, prepared_sample_dir):
    _, md, m = written
    doc = json.loads((prepared_sample_dir / "boilerplate.json").read_text(encoding="utf-8"))
    rows = tables_under(md, "## Boilerplate removed")[0]
    assert [(r[1], num(r[2]), num(r[4])) for r in rows] == [(e["sentence"], e["count"], e["removed"]) for e in doc["sentences"]]
    assert f"{m['boilerplate']['removed']:,} occurrences removed" in md
    lengths = tables_under(md, "## Question and answer lengths")[0]
    assert {(r[0], r[1]): num(r[2]) for r in lengths} == {(c, s): m["counts"]["splits"][s]
                                                          for c in ("question", "answer") for s in SPLITS}


def test_plots_fall_back_to_ascii_labels_without_a_cjk_font(prepared_sample_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(rp, "cjk_font", lambda: None)
    labels = rp.Labels(False)
    assert labels.department("内科") == "Internal medicine" and labels.coded("心血管科", "S3") == "S3"
    path = rp.report(rp.ReportArgs(data=prepared_sample_dir, output=tmp_path))
    assert (tmp_path / "departments.png").read_bytes().startswith(PNG_MAGIC)
    assert "| S1 |" in path.read_text(encoding="utf-8")  # the codes the plots use are resolved in the report


def test_cli_default_output_and_no_torch(prepared_sample_dir, tmp_path):
    data = tmp_path / "prepared"
    shutil.copytree(prepared_sample_dir, data)
    code = ("import sys; from medtune.cli import main; rc = main(['data', 'report', '--data', sys.argv[1]]); "
            "assert 'torch' not in sys.modules, 'report imported torch'; sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, str(data)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (data / "report" / "report.md").is_file()


def test_not_a_prepared_directory(tmp_path):
    with pytest.raises(DataError, match="no manifest.json"):
        rp.report(rp.ReportArgs(data=tmp_path))
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(DataError, match="missing split file"):
        rp.report(rp.ReportArgs(data=tmp_path))
