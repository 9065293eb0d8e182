"""`medtune data report`: a Markdown report with PNG plots for a prepared data directory.

    medtune data report --data data/prepared                  # writes data/prepared/report/report.md
    medtune data report --data data/prepared --output docs/data

Reads only the prepared directory (``manifest.json``, the split Parquet files, ``rejects.jsonl``,
``boilerplate.json``): the manifest's headline figures (inputs and their sha256, counts, settings,
classifier accuracy), rows per department and split, question/answer length histograms, drop reasons,
and the boilerplate removed. Plot labels are Chinese where a CJK font is installed (e.g. Debian's
``fonts-noto-cjk`` or ``fonts-wqy-microhei``); without one, departments get English names and
sub-departments and boilerplate sentences short codes (S1, B1, ...) that the report's tables resolve.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from medtune.config import arg
from medtune.data import SPLITS
from medtune.errors import DataError

log = logging.getLogger(__name__)

CJK_FAMILIES = ("Noto Sans CJK SC", "Noto Sans SC", "Source Han Sans SC", "Source Han Sans CN", "WenQuanYi Micro Hei",
                "WenQuanYi Zen Hei", "Microsoft YaHei", "SimHei", "PingFang SC", "Hiragino Sans GB", "Heiti SC",
                "Sarasa Gothic SC", "Noto Serif CJK SC", "AR PL UMing CN", "Droid Sans Fallback")
_CJK_FILE_HINTS = ("cjk", "wqy", "sourcehan", "simhei", "msyh", "pingfang", "droidsansfallback", "sarasa", "uming")
ENGLISH_DEPARTMENTS = {"男科": "Andrology", "内科": "Internal medicine", "妇产科": "Obstetrics & gynaecology",
                       "肿瘤科": "Oncology", "儿科": "Paediatrics", "外科": "Surgery", "": "(none)"}
COLOURS = {"train": "#4c72b0", "validation": "#dd8452", "test": "#55a868", "dropped": "#c44e52", "removed": "#8172b3"}
TOP_N = 20  # bars in the sub-department and boilerplate plots


@dataclasses.dataclass
class ReportArgs:
    """Which prepared directory to describe, and where the report goes."""

    data: Path = arg(help="a directory written by `medtune data prepare`")
    output: Path | None = arg(None, "where report.md and the PNG plots go (default: DATA/report)")


def report(args: ReportArgs) -> Path:
    """Write ``report.md`` and its PNG plots for the prepared directory ``args.data``; returns the report's path."""
    data = Path(args.data)
    out = Path(args.output) if args.output is not None else data / "report"
    prepared = read_prepared(data)
    out.mkdir(parents=True, exist_ok=True)
    font = cjk_font()
    if font is None:
        log.info("no CJK font found: plots use English names and codes (install e.g. fonts-noto-cjk for Chinese labels)")
    labels = Labels(font is not None)
    sections = [
        _headline(prepared),
        _departments(prepared, out, labels, font),
        _lengths(prepared, out, font),
        _drops(prepared, out, font),
        _boilerplate(prepared, out, labels, font),
        _settings(prepared),
    ]
    path = out / "report.md"
    path.write_text("\n\n".join(sections) + "\n", encoding="utf-8")
    log.info("wrote %s", path)
    return path


# ----------------------------------------------------------------------------- reading

@dataclasses.dataclass
class SplitStats:
    departments: dict[str, int]
    sub_departments: dict[str, int]
    lengths: dict[str, np.ndarray]  # "question"/"answer" -> characters per row


@dataclasses.dataclass
class Prepared:
    path: Path
    manifest: dict
    splits: dict[str, SplitStats]
    reject_reasons: dict[str, int]
    boilerplate: dict


def read_prepared(data: Path) -> Prepared:
    """The parts of a prepared directory the report uses; a DataError names whatever is missing or unreadable."""
    import pyarrow as pa
    import pyarrow.json as pj

    manifest_path = data / "manifest.json"
    if not manifest_path.is_file():
        raise DataError("no manifest.json: not a directory written by `medtune data prepare`", data)
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"not valid JSON ({e.msg})", manifest_path, e.lineno) from None
    splits = {}
    for split in SPLITS:
        path = data / f"{split}.parquet"
        if not path.is_file():
            raise DataError("missing split file", path)
        splits[split] = split_stats(path)
    reasons: dict[str, int] = {}
    rejects = data / "rejects.jsonl"
    if rejects.is_file() and rejects.stat().st_size:
        schema = pa.schema([("reason", pa.string())])
        table = pj.read_json(rejects, parse_options=pj.ParseOptions(explicit_schema=schema,
                                                                     unexpected_field_behavior="ignore"))
        reasons = _counts(table["reason"])
    boilerplate_path = data / "boilerplate.json"
    boilerplate = json.loads(boilerplate_path.read_text(encoding="utf-8")) if boilerplate_path.is_file() else {}
    return Prepared(data, manifest, splits, reasons, boilerplate)


def split_stats(path: Path, batch_size: int = 65_536) -> SplitStats:
    """Department counts and text lengths of one split, read in batches (the texts are never all in memory)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    # Unbuffered and one column at a time: prepare writes big row groups, which would otherwise be read whole.
    parquet = pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)
    lengths: dict[str, list] = {"question": [], "answer": []}
    labels: dict[str, list] = {"department": [], "sub_department": []}
    for col in [*lengths, *labels]:
        for batch in parquet.iter_batches(batch_size, columns=[col]):
            if col in lengths:
                lengths[col].append(pc.utf8_length(batch[col]).to_numpy(zero_copy_only=False))
            else:
                labels[col].append(batch[col])
    return SplitStats(*(_counts(pa.chunked_array(labels[c], pa.string())) for c in labels),
                      {c: np.concatenate(v) if v else np.zeros(0, dtype=np.int64) for c, v in lengths.items()})


def _counts(arr) -> dict[str, int]:
    import pyarrow.compute as pc

    rows = pc.value_counts(arr).to_pylist()
    return {r["values"]: int(r["counts"]) for r in sorted(rows, key=lambda r: (-r["counts"], str(r["values"])))}


# ----------------------------------------------------------------------------- fonts and labels

def cjk_font() -> str | None:
    """The family name of an installed font that draws Chinese, or None."""
    from matplotlib import font_manager

    manager = font_manager.fontManager
    if not any(f.name in CJK_FAMILIES for f in manager.ttflist):
        # Fonts installed after matplotlib built its cache are not in it yet.
        for path in font_manager.findSystemFonts():
            if any(hint in Path(path).name.lower() for hint in _CJK_FILE_HINTS):
                try:
                    manager.addfont(path)
                except (OSError, RuntimeError, ValueError):
                    continue
    paths = {f.name: f.fname for f in manager.ttflist}
    for name in CJK_FAMILIES:
        if name in paths and _draws_chinese(paths[name]):
            return name
    return None


def _draws_chinese(path: str) -> bool:
    from matplotlib.ft2font import FT2Font

    try:
        font = FT2Font(path)
    except (OSError, RuntimeError):
        return False
    return all(font.get_char_index(ord(c)) for c in "内科医生祝早日")


class Labels:
    """Plot labels: the Chinese text with a CJK font; otherwise English department names and codes."""

    def __init__(self, chinese: bool):
        self.chinese = chinese

    def department(self, name: str) -> str:
        return name if self.chinese and name else ENGLISH_DEPARTMENTS.get(name, name if name.isascii() else "?")

    def coded(self, name: str, code: str, width: int = 28) -> str:
        if not self.chinese:
            return code
        return name if len(name) <= width else name[:width - 1] + "…"


# ----------------------------------------------------------------------------- Markdown helpers

def table(headers: Sequence[str], rows: Sequence[Sequence], align: str | None = None) -> str:
    """A Markdown table; ``align`` is one letter per column (l/r), numbers right-aligned by default."""
    if align is None:
        align = "".join("r" if rows and isinstance(rows[0][i], (int, float)) else "l" for i in range(len(headers)))
    rule = ["---:" if a == "r" else ":---" for a in align]

    def cell(v) -> str:
        if isinstance(v, bool) or v is None:
            return str(v)
        if isinstance(v, int):
            return f"{v:,}"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _pct(part: int, whole: int) -> str:
    return f"{part / whole:.2%}" if whole else "-"


def _figure(width: float, height: float):
    """A bare matplotlib Figure (saved through Agg), not pyplot: no global backend or state is touched."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _barh(path: Path, font: str | None, names: list[str], series: dict[str, list[int]], title: str, xlabel: str,
          ylabel: str = "", width: float = 8) -> str:
    """Horizontal bars (stacked when there are several series, each bar's total written beside it) as a PNG."""
    with _rc(font):
        fig = _figure(width, 1.2 + 0.42 * len(names))
        ax = fig.add_subplot()
        y, left = np.arange(len(names)), np.zeros(len(names))
        for label, vals in series.items():
            ax.barh(y, vals, left=left, color=COLOURS.get(label), label=label)
            left += np.asarray(vals, dtype=float)
        for i, total in enumerate(left):
            ax.annotate(f"{int(total):,}", (total, i), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
        ax.set_yticks(y, names)
        ax.invert_yaxis()
        ax.margins(x=0.1)  # room for the totals beside the longest bar
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        if len(series) > 1:
            ax.legend(loc="lower right")
        fig.savefig(path)
    return path.name


def _rc(font: str | None):
    """Font and style for a figure; both its creation and its saving run inside this context."""
    import matplotlib

    return matplotlib.rc_context({"font.family": [font, "DejaVu Sans"] if font else ["DejaVu Sans"],
                                  "axes.spines.top": False, "axes.spines.right": False})


# ----------------------------------------------------------------------------- sections

def _headline(p: Prepared) -> str:
    m = p.manifest
    counts = m["counts"]
    read, kept = counts["read"], counts["kept"]
    lines = [f"# Data report: `{p.path}`", "",
             f"Prepared {m.get('created', '?')} from `{m.get('input', '?')}` "
             f"(medtune data format {m.get('medtune_data_format', '?')}, {m.get('seconds', '?')} s).", "",
             "## Headline", "",
             table(["figure", "rows", "share of read"], [
                 ["read", read, "100.00%"],
                 ["kept", kept, _pct(kept, read)],
                 ["rejected", counts["rejected"], _pct(counts["rejected"], read)],
                 *[[f"kept: {s}", counts["splits"][s], _pct(counts["splits"][s], read)] for s in SPLITS],
             ], "lrr")]
    clf = m.get("classifier") or {}
    if clf.get("test_accuracy") is not None:
        lines += ["", f"Department classifier (`{clf.get('file')}`, predicts the {clf.get('level', 'department')} "
                      f"from the question): test accuracy **{clf['test_accuracy']:.4f}** on {clf.get('test_rows', 0):,} "
                      f"test rows, trained on {clf.get('train_rows', 0):,}, {len(clf.get('labels', []))} labels."]
    elif clf:
        lines += ["", f"Department classifier: not fitted ({clf.get('skipped', 'no reason given')})."]
    files = m.get("files", [])
    if files:
        lines += ["", "### Inputs", "",
                  table(["file", "department", "encoding", "rows read", "rejected on load", "bytes", "sha256"],
                        [[f.get("name", f.get("path")), f.get("department", ""), f.get("encoding", ""),
                          f.get("rows_read", 0), f.get("rows_rejected", 0), f.get("bytes", 0), f"`{f.get('sha256', '')}`"]
                         for f in files], "lllrrrl")]
    stages = m.get("stages", [])
    if stages:
        lines += ["", "### Pipeline stages", "",
                  table(["stage", "rows in", "rows out", "seconds"],
                        [[s["stage"], s["rows_in"], s["rows_out"], float(s["seconds"])] for s in stages])]
    return "\n".join(lines)


def _departments(p: Prepared, out: Path, labels: Labels, font: str | None) -> str:
    per_split = {s: st.departments for s, st in p.splits.items()}
    names = sorted({d for c in per_split.values() for d in c}, key=lambda d: -sum(c.get(d, 0) for c in per_split.values()))
    rows = [[d or "(none)", *[per_split[s].get(d, 0) for s in SPLITS], sum(per_split[s].get(d, 0) for s in SPLITS)]
            for d in names]
    totals = ["all", *[sum(per_split[s].values()) for s in SPLITS], sum(sum(c.values()) for c in per_split.values())]
    text = ["## Rows per department and split", "",
            table(["department", *SPLITS, "all"], [*rows, totals], "l" + "r" * (len(SPLITS) + 1))]
    png = _barh(out / "departments.png", font, [labels.department(d) for d in names],
                {s: [per_split[s].get(d, 0) for d in names] for s in SPLITS}, "Rows per department and split", "rows")
    text += ["", f"![rows per department and split]({png})"]

    subs = {s: st.sub_departments for s, st in p.splits.items()}
    sub_names = sorted({d for c in subs.values() for d in c if d}, key=lambda d: -sum(c.get(d, 0) for c in subs.values()))
    if sub_names:
        codes = {d: f"S{i}" for i, d in enumerate(sub_names, 1)}
        text += ["", "### Sub-departments", "",
                 table(["code", "sub-department", *SPLITS, "all"],
                       [[codes[d], d, *[subs[s].get(d, 0) for s in SPLITS], sum(subs[s].get(d, 0) for s in SPLITS)]
                        for d in sub_names], "ll" + "r" * (len(SPLITS) + 1))]
        shown = sub_names[:TOP_N]
        more = f" (top {TOP_N} of {len(sub_names)})" if len(sub_names) > TOP_N else ""
        png = _barh(out / "sub_departments.png", font, [labels.coded(d, codes[d]) for d in shown],
                    {s: [subs[s].get(d, 0) for d in shown] for s in SPLITS}, f"Rows per sub-department and split{more}",
                    "rows", "" if labels.chinese else "sub-department code (names: report.md)")
        text += ["", f"![rows per sub-department]({png})"]
    return "\n".join(text)


def _lengths(p: Prepared, out: Path, font: str | None) -> str:
    unit = p.manifest.get("settings", {}).get("length_unit", "characters")
    lengths = {col: {s: st.lengths[col] for s, st in p.splits.items()} for col in ("question", "answer")}
    rows = []
    for col, per_split in lengths.items():
        for split, arr in per_split.items():
            if len(arr):
                q = np.percentile(arr, [10, 50, 90, 99]).round().astype(int).tolist()
                rows.append([col, split, int(len(arr)), int(arr.min()), *q, int(arr.max()), float(arr.mean())])
    text = ["## Question and answer lengths", "",
            f"Characters per kept row (the length limits were applied in {unit}).", "",
            table(["text", "split", "rows", "min", "p10", "median", "p90", "p99", "max", "mean"], rows, "llrrrrrrrr")]
    with _rc(font):
        fig = _figure(10, 3.6)
        for i, (col, per_split) in enumerate(lengths.items()):
            ax = fig.add_subplot(1, 2, i + 1)
            every = np.concatenate(list(per_split.values()))
            if len(every):
                top = max(np.percentile(every, 99.5), 1)
                bins = np.linspace(0, top, 50)
                ax.hist([np.clip(per_split[s], 0, top) for s in SPLITS], bins=bins, stacked=True,
                        color=[COLOURS[s] for s in SPLITS], label=list(SPLITS))
                ax.axvline(np.median(every), color="black", linestyle="--", linewidth=1, label=f"median {np.median(every):.0f}")
            ax.set_title(f"{col} length")
            ax.set_xlabel("characters (last bin: 99.5th percentile and above)")
            ax.set_ylabel("rows")
            ax.legend()
        fig.savefig(out / "lengths.png")
    text += ["", "![question and answer lengths](lengths.png)"]
    return "\n".join(text)


def _drops(p: Prepared, out: Path, font: str | None) -> str:
    counts = p.manifest["counts"]
    by_reason = counts.get("rejected_by_reason", {})
    read = counts["read"]
    text = ["## Dropped rows", ""]
    if not by_reason and not p.reject_reasons:
        return "\n".join(text + ["No row was dropped."])
    reasons = list(by_reason) + [r for r in p.reject_reasons if r not in by_reason]
    text.append(table(["reason", "rows", "share of read", "rows in rejects.jsonl"],
                      [[r, by_reason.get(r, 0), _pct(by_reason.get(r, 0), read), p.reject_reasons.get(r, 0)]
                       for r in reasons], "lrrr"))
    if p.reject_reasons != by_reason:
        text += ["", "**Warning:** `rejects.jsonl` does not match the manifest's counts per reason."]
    text += ["", f"Every row is accounted for: {counts['kept']:,} kept + {counts['rejected']:,} rejected = "
                 f"{counts['kept'] + counts['rejected']:,} (read: {read:,}). Each dropped row, with its reason and "
                 "source file and line, is in `rejects.jsonl`."]
    png = _barh(out / "drop_reasons.png", font, reasons, {"dropped": [by_reason.get(r, 0) for r in reasons]},
                f"Dropped rows by reason ({counts['rejected']:,} of {read:,})", "rows")
    text += ["", f"![dropped rows by reason]({png})"]
    return "\n".join(text)


def _boilerplate(p: Prepared, out: Path, labels: Labels, font: str | None) -> str:
    doc = p.boilerplate
    entries = doc.get("sentences", [])
    summary = p.manifest.get("boilerplate", {})
    text = ["## Boilerplate removed", ""]
    if doc:
        text += [f"Rule: {doc.get('rule', '')} (min_share {doc.get('min_share')}, min_count {doc.get('min_count')}).", ""]
    if not entries:
        return "\n".join(text + ["No boilerplate sentence was learned."])
    text += [f"{len(entries):,} sentences learned; {summary.get('removed', sum(e.get('removed', 0) for e in entries)):,} "
             "occurrences removed.", "",
             table(["code", "sentence", "answers containing it", "share of answers", "removed"],
                   [[f"B{i}", e["sentence"], e["count"], f"{e['share']:.2%}", e.get("removed", 0)]
                    for i, e in enumerate(entries, 1)], "llrrr")]
    top = sorted(enumerate(entries, 1), key=lambda ie: -ie[1].get("removed", 0))[:TOP_N]
    more = f" (top {TOP_N} of {len(entries)})" if len(entries) > TOP_N else ""
    png = _barh(out / "boilerplate.png", font, [labels.coded(e["sentence"], f"B{i}") for i, e in top],
                {"removed": [e.get("removed", 0) for _, e in top]}, f"Boilerplate sentences removed{more}",
                "times removed", "" if labels.chinese else "sentence code (sentences: report.md)", width=9)
    text += ["", f"![boilerplate removed]({png})"]
    return "\n".join(text)


def _settings(p: Prepared) -> str:
    m = p.manifest
    settings = m.get("settings", {})
    text = ["## Settings", "", table(["setting", "value"], [[k, json.dumps(v, ensure_ascii=False)] for k, v in settings.items()], "ll")]
    scrubbed = m.get("scrubbed")
    if scrubbed:
        text += ["", "### Contact details replaced", "",
                 table(["kind", "placeholders"], [[k, int(v)] for k, v in scrubbed.items()], "lr")]
    return "\n".join(text)
