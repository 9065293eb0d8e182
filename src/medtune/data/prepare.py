"""`medtune data prepare`: load → clean → deduplicate → split → write, every input row accounted for.

    medtune data prepare --input data/Data_数据 --output data/prepared
    medtune data prepare --input my_dialogues.jsonl --output prepared --department 心血管科

Python API (what the CLI calls; returns the manifest):

    >>> from medtune.data.prepare import PrepareArgs, prepare
    >>> manifest = prepare(input=Path("Data_数据"), output=Path("prepared"),
    ...                    settings=PrepareArgs(dedup_threshold=0.85))      # doctest: +SKIP

Stages (rows in/out, seconds and this process's peak memory of each go to ``manifest.json`` → ``stages``):

1. load — parse every file (`medtune.data.load`) and, in the same worker processes, normalise the
   text, scrub contact details, merge title and ask into the question, compute MinHash sketches and
   fingerprints, and count the answers' sentences; each file's rows go to Arrow files on disk;
2. boilerplate — learn recurring sentences from those counts by their share of the answers, and
   remove them from every answer (again in the workers, file by file) (`medtune.data.clean`);
3. filter — empty question/answer, answers that were only boilerplate, length limits;
4. exact_dedup / near_dedup — identical question+answer after normalisation; MinHash/LSH near copies
   (`medtune.data.dedup`); each dropped row names the kept row it duplicates;
5. split — near-twin questions kept on one side, stratified by department (`medtune.data.split`);
6. write — ``train/validation/test.parquet`` (one pass over the rows; row groups are compressed on a
   thread of their own while the next batch is assembled), ``boilerplate.json``; ``rejects.jsonl`` is
   written by a worker from the end of deduplication on (`RejectsJob`);
7. classifier — fitted in a worker while the splits are written (`medtune.data.classifier`).

The per-row text work runs in compiled kernels (`medtune.data.kernels`). This process keeps only small
per-row columns in memory (place, department, sketches, lengths) and reads the texts back batch by
batch when it writes them, so memory stays under 3 GB for the full 800,000-row dataset. Fresh memory is
itself a cost here (every new page is a fault; on a VM often a host fault too): spills are
memory-mapped where only a few columns are wanted, large results are written into place, each
file's spills are deleted once written out, transparent huge pages are off while `prepare` runs
(`load.without_huge_pages`) and files are written 1 MB at a time (`load.SmallWrites`): on a VM that hands
free memory back to the host, 2 MB blocks are the dear kind (`bench/fresh_memory.py`). With one input file the parsing is not parallel (a file is
one task).

Every row read is either in a split or in ``rejects.jsonl`` with its reason; the count is checked.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import json
import logging
import math
import os
import queue
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from medtune.config import arg
from medtune.data import SPLITS
from medtune.data.classifier import CLASSIFIER_FILE
from medtune.errors import DataError, MedtuneError

log = logging.getLogger(__name__)

SPLIT_MARGIN = 0.15  # questions estimated this much below the split threshold are still linked (see split.py)
SPLIT_RECALL = 0.98
ROW_GROUP = 50_000  # rows per Parquet row group in the split files
CLASSIFIER_TEST_ROWS = 20_000  # the accuracy is measured on at most this many test rows (±0.3% at 95%)
OUTPUT_FILES = ("train.parquet", "validation.parquet", "test.parquet", "rejects.jsonl", "boilerplate.json",
                "manifest.json", CLASSIFIER_FILE)
REJECT_SCHEMA = pa.schema([
    ("reason", pa.string()), ("source_file", pa.string()), ("source_line", pa.int64()), ("detail", pa.string()),
    ("duplicate_of", pa.string()), ("department", pa.string()), ("sub_department", pa.string()),
    ("title", pa.string()), ("ask", pa.string()), ("answer", pa.string()), ("raw", pa.string()),
])
MESSAGES_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
FINISHED_SCHEMA = pa.schema([("answer", pa.string()), ("empty_before", pa.bool_()),
                             ("question_length", pa.int64()), ("answer_length", pa.int64())])


@dataclasses.dataclass(frozen=True)
class PrepareArgs:
    """Cleaning, deduplication, split and classifier settings."""

    min_question_length: int = arg(4, "drop questions shorter than this (characters; tokens with --tokenizer)")
    max_question_length: int = arg(1000, "drop questions longer than this")
    min_answer_length: int = arg(10, "drop answers shorter than this (after boilerplate removal)")
    max_answer_length: int = arg(2000, "drop answers longer than this")
    tokenizer: Path | None = arg(None, "Hugging Face tokenizer directory: length limits then count its tokens")
    boilerplate_share: float = arg(0.003, "a sentence found in at least this share of the distinct answers is boilerplate")
    boilerplate_min_count: int = arg(10, "... and in at least this many answers (so a tiny input does not flag every repeat)")
    scrub: bool = arg(True, "replace URLs, e-mail addresses, phone numbers, QQ and WeChat ids with placeholders")
    dedup_threshold: float = arg(0.8, "near-duplicate Jaccard threshold on question+answer character 3-grams")
    dedup_num_perm: int = arg(64, "MinHash permutations for near-duplicate detection")
    split_threshold: float = arg(0.6, "questions at least this similar (Jaccard, character 3-grams) stay in one split")
    split_num_perm: int = arg(64, "MinHash permutations for the split's question clusters")
    validation_fraction: float = arg(0.05, "share of rows for the validation split")
    test_fraction: float = arg(0.05, "share of rows for the test split")
    seed: int = arg(42, "seed of the split, the MinHash permutations and the classifier")
    classifier_max_rows: int = arg(50_000, "the department classifier trains on at most this many train rows")
    workers: int = arg(0, "worker processes (0: one per CPU core; 1: none)")
    huge_pages: bool = arg(False, "let Linux back large buffers with transparent huge pages (off by default: on "
                                  "virtual machines that hand free memory back to the host they cost more than they save)")

    def __post_init__(self):
        problems = []
        for name in ("min_question_length", "max_question_length", "min_answer_length", "max_answer_length",
                     "boilerplate_min_count", "classifier_max_rows", "workers"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0")
        if self.min_question_length > self.max_question_length or self.min_answer_length > self.max_answer_length:
            problems.append("a minimum length is above its maximum")
        for name in ("dedup_threshold", "split_threshold"):
            if not 0 < getattr(self, name) <= 1:
                problems.append(f"{name} must be in (0, 1]")
        if not 0 <= self.boilerplate_share <= 1:
            problems.append("boilerplate_share must be in [0, 1]")
        for name in ("dedup_num_perm", "split_num_perm"):
            if not 8 <= getattr(self, name) <= 1024:
                problems.append(f"{name} must be between 8 and 1024")
        if self.validation_fraction < 0 or self.test_fraction < 0 or self.validation_fraction + self.test_fraction >= 1:
            problems.append("validation_fraction and test_fraction must be >= 0 and leave rows for train")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def fractions(self) -> tuple[float, float, float]:
        return (1 - self.validation_fraction - self.test_fraction, self.validation_fraction, self.test_fraction)


# ----------------------------------------------------------------------------- worker-side row features

@dataclasses.dataclass(frozen=True)
class RowFeatures:
    """What the load workers compute for each batch of raw rows (a picklable `load` transform).

    Normalised question and answer, MinHash sketches and fingerprints (`dedup.sketch_rows`), and the
    answers' sentence counts for learning the boilerplate (per batch, sentences in at least two answers
    of it); `combine` merges a file's counts and keeps the sentences in at least ``min_sentence_answers``
    answers (a sentence reaching the overall minimum count reaches its share of it in one of the files).
    """

    scrub: bool
    qa: object  # dedup.Sketcher for question + answer
    q: object   # dedup.Sketcher for the question alone
    min_sentence_answers: int = 1
    tables: tuple | None = None  # clean.unicode_tables(), built once by the parent

    def __call__(self, raw: pa.Table) -> tuple[pa.Table, dict]:
        from medtune.data.clean import normalise_table, sentence_counts, set_unicode_tables
        from medtune.data.dedup import sketch_rows

        if self.tables is not None:
            set_unicode_tables(self.tables)
        t = normalise_table(raw, self.scrub)
        for name, col in sketch_rows(t["question"], t["clean_answer"], self.qa, self.q).items():
            t = t.append_column(name, col)
        # Copies of one question + answer count once (the first 8 bytes of its fingerprint identify it). A
        # sentence found once in a batch is left out of its counts: at most one answer per batch is missed,
        # and the counts stay small.
        counts, distinct = sentence_counts(t["clean_answer"], _pair_ids(t["qa_print"]),
                                           min_answers=min(2, self.min_sentence_answers))
        return t, {"sentence_counts": counts, "answers": distinct}

    def combine(self, extras: list[dict]) -> dict:
        counts = pa.concat_tables([e["sentence_counts"] for e in extras])
        if len(extras) > 1:
            counts = counts.group_by("key").aggregate([("answers", "sum")]).rename_columns(["key", "answers"])
        counts = counts.filter(pc.greater_equal(counts["answers"], self.min_sentence_answers))
        return {"sentence_counts": counts, "answers": sum(e["answers"] for e in extras)}


def _pair_ids(prints: pa.Array | pa.ChunkedArray) -> np.ndarray:
    from medtune.data.dedup import _matrix

    return np.ascontiguousarray(_matrix(prints, np.uint8)[:, :8]).view(np.uint64).ravel()


# ----------------------------------------------------------------------------- bookkeeping

class _Stages:
    """Rows in/out and seconds per stage, for the manifest and the benchmark."""

    def __init__(self, progress=None):
        self.records: list[dict] = []
        self.progress = progress

    @contextmanager
    def __call__(self, name: str, rows_in: int) -> Iterator[dict]:
        if self.progress is not None:
            self.progress.update(name)
        rec = {"stage": name, "rows_in": int(rows_in), "rows_out": int(rows_in)}
        start = time.perf_counter()
        yield rec
        rec["seconds"] = round(time.perf_counter() - start, 3)
        rec["peak_rss_mb"] = _peak_rss_mb()
        self.records.append(rec)
        log.debug("%s: %d -> %d rows in %.2f s", name, rec["rows_in"], rec["rows_out"], rec["seconds"])


def _peak_rss_mb() -> float | None:
    """This process's peak resident memory so far (workers not included), where the OS reports it."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


def _load_rejects(rows: list[dict]) -> pa.Table:
    cols = {f.name: [r.get(f.name) for r in rows] for f in REJECT_SCHEMA}
    return pa.table(cols, schema=REJECT_SCHEMA)


def _where(table: pa.Table) -> pa.Array:
    return pc.binary_join_element_wise(table["source_file"], pc.cast(table["source_line"], pa.string()), ":")


class _Ledger:
    """The loaded rows, which of them are still in (``alive``), and why the others were dropped.

    The rows themselves stay in the load workers' Arrow files (`spills`); this process holds only the
    small columns every stage needs (``table``: place, department, sketches, lengths) and reads the
    texts batch by batch when it writes them. A reject keeps the row's place and reason; its original
    texts are read when the rejects are written (from the spills, or where Arrow's reader took the row,
    from its file: `load.original_texts`).
    """

    SMALL = ["source_file", "source_line", "department", "sub_department"]
    MATRICES = {"qa_bands": np.uint32, "qa_sketch": np.uint8, "q_bands": np.uint32, "q_sketch": np.uint8,
                "qa_print": np.uint8}  # sketches and fingerprints, held as numpy matrices

    def __init__(self, files: list, load_rejects: list[dict]):
        """``files``: the load's `FileResult`s (one spill each)."""
        from medtune.data.dedup import _matrix

        rows = sum(f.rows for f in files)
        self.spills = spills = [f.spill for f in files]
        self.sources = [dataclasses.replace(f, table=None, rejects=[], extras=[]) for f in files]
        self.bounds = np.cumsum([0] + [f.rows for f in files])  # the first row of each file's spill
        # Memory-mapped, and each sketch column copied once into its final matrix: fresh memory is the
        # costly part here (each new page is a fault, and on a VM often one on the host as well).
        tables: list[pa.Table] = []
        self.matrices: dict[str, np.ndarray] = {}
        start = 0
        for p in spills:
            with pa.memory_map(str(p)) as source:
                reader = pa.ipc.open_file(source)
                if not self.matrices:
                    first = reader.get_batch(0)
                    self.matrices = {name: np.empty((rows, _matrix(first.column(name), dtype).shape[1]), dtype)
                                     for name, dtype in self.MATRICES.items()}
                for i in range(reader.num_record_batches):
                    batch = reader.get_batch(i)
                    tables.append(pa.Table.from_batches([batch.select(self.SMALL)]).combine_chunks())  # a copy
                    for name, dtype in self.MATRICES.items():
                        self.matrices[name][start:start + batch.num_rows] = _matrix(batch.column(name), dtype)
                    start += batch.num_rows
        if start != rows:
            raise RuntimeError(f"the spills hold {start} rows, the load reported {rows}")
        self.table = pa.concat_tables(tables)
        self.alive = np.ones(self.table.num_rows, dtype=bool)
        self.load_rejects = load_rejects
        self.pending: list[tuple[np.ndarray, np.ndarray | None, pa.Table]] = []

    @property
    def count(self) -> int:
        return int(self.alive.sum())

    def column(self, name: str) -> pa.ChunkedArray | np.ndarray:
        """``name`` for the rows still in (a numpy matrix for the sketches and fingerprints)."""
        if name in self.matrices:
            return self.matrices[name][self.alive]
        return self.table[name].filter(pa.array(self.alive))

    def batches(self, columns: list[str], answers: bool = False, consume: bool = False) -> Iterator[tuple[int, pa.Table]]:
        """(first row, table) per spilled batch: ``columns`` of the main files, plus the final answer
        (``answers``) of the same rows. ``consume``: delete each file's spills once read (their pages are
        then reused for what is written next: fresh memory is costly), all but the original texts, which
        `RejectsJob` reads."""
        from medtune.data.load import ipc_batches

        start = 0
        for spill in self.spills:
            wanted = columns + ["clean_answer"] if answers and "clean_answer" not in columns else columns
            streams = [ipc_batches(spill, wanted)]
            if answers:
                streams.append(ipc_batches(spill.with_suffix(".answers.arrow"), ["answer"]))
            for parts in zip(*streams):
                table = parts[0]
                if answers:  # the final answer: where boilerplate removal left it as it was, the file holds null
                    final = pc.coalesce(parts[1]["answer"], table["clean_answer"])
                    table = table.select(columns).append_column("answer", final)
                yield start, table
                start += table.num_rows
            if consume:
                for path in (spill, spill.with_suffix(".answers.arrow")):
                    path.unlink(missing_ok=True)
        if consume:
            self.spills = []

    def gather(self, rows: np.ndarray, columns: list[str]) -> pa.Table:
        """``columns`` of the rows ``rows`` (in that order), read from the spilled files."""
        table = _pick_rows((t for _, t in self.batches(columns)), rows)
        return pa.table({c: pa.array([], pa.string()) for c in columns}) if table is None else table

    def locate(self, rows: np.ndarray) -> pa.Array:
        """``file:line`` of the given rows (indices into the whole table)."""
        return _where(_gather(self.table.select(["source_file", "source_line"]), rows))

    def drop(self, rows: np.ndarray, reason: str, detail: pa.Array | str, duplicate_of: np.ndarray | None = None) -> None:
        """Reject ``rows`` (indices into the whole table, still in) for ``reason``; ``duplicate_of``: the
        rows they duplicate (kept now; if one is dropped later, the reject points on to the row kept in
        its place)."""
        if len(rows) == 0:
            return
        n = len(rows)
        meta = _gather(self.table.select(["source_file", "source_line", "department", "sub_department"]), rows)
        self.pending.append((rows, duplicate_of, pa.table({
            "reason": pa.repeat(reason, n), "source_file": meta["source_file"], "source_line": meta["source_line"],
            "detail": pa.repeat(detail, n) if isinstance(detail, str) else detail,
            "department": meta["department"], "sub_department": meta["sub_department"]})))
        self.alive[rows] = False

    def keep_places(self) -> None:
        """Keep only what the rejects still need (file and line of every row); frees the rest."""
        self.table = self.table.select(["source_file", "source_line"])

    def rejects_job(self) -> "RejectsJob":
        """What `RejectsJob` needs to write every reject so far (call it once the last row is dropped)."""
        from medtune.data.load import spill_paths

        metas = []
        # Follow duplicate-of links to a row that was kept (an exact copy's original may have turned out
        # to be a near-duplicate of an earlier row).
        link = np.full(len(self.alive), -1, dtype=np.int64)
        for rows, of, _ in self.pending:
            if of is not None:
                link[rows] = of
        for rows, of, part in self.pending:
            dup_of = pa.nulls(len(rows), pa.string())
            if of is not None:
                final = of.copy()
                while (link[final] >= 0).any():
                    final = np.where(link[final] >= 0, link[final], final)
                dup_of = self.locate(final)
                moved = pa.array(final != of)
                if pc.any(moved).as_py():
                    note = pc.binary_join_element_wise(part["detail"], "; that row is itself dropped, kept: ", dup_of, "")
                    part = part.set_column(part.column_names.index("detail"), "detail", pc.if_else(moved, note, part["detail"]))
            metas.append(part.append_column("duplicate_of", dup_of))
        wanted = np.concatenate([rows for rows, _, _ in self.pending]) if self.pending else np.zeros(0, np.int64)
        return RejectsJob(pa.concat_tables(metas).combine_chunks() if metas else None, wanted, self.load_rejects,
                          [spill_paths(s)[1] for s in self.spills], self.bounds, self.sources)


@dataclasses.dataclass
class RejectsJob:
    """Writes ``rejects.jsonl``: every reject with its original texts, sorted by file and line (picklable:
    a worker writes it while the parent splits and writes the splits).

    The reasons, places and duplicate-of links come from the ledger (`_Ledger.rejects_job`); the original
    texts are read here, from the load's spills (``raw_spills``: `load.spill_paths`), and where Arrow's
    reader took the row, from the file itself (`load.original_texts`).
    """

    meta: pa.Table | None   # per dropped row: reason, place, detail, departments, duplicate_of (``rows`` order)
    rows: np.ndarray        # their indices in the loaded rows
    load_rejects: list[dict]
    raw_spills: list[Path]  # per loaded file
    bounds: np.ndarray      # the first row of each file
    sources: list           # the load's `FileResult`s (without tables)

    def __call__(self, path: Path) -> dict:
        """Write the rejects to ``path``; returns ``rows`` and ``by_reason`` (counts)."""
        from medtune.data.load import RAW_TEXT, release_memory

        parts = [_load_rejects(self.load_rejects)] if self.load_rejects else []
        if len(self.rows):
            texts = self._originals(self._spilled_texts())
            meta = self.meta
            for name in RAW_TEXT:
                meta = meta.append_column(name, texts[name])
            parts.append(meta.append_column("raw", pa.nulls(len(self.rows), pa.string())).select(REJECT_SCHEMA.names))
        rejects = _sorted_rejects(parts)
        write_jsonl(rejects, path)
        done = {"rows": rejects.num_rows, "by_reason": _reason_counts(rejects)}
        del rejects, parts
        release_memory()
        return done

    def _spilled_texts(self) -> pa.Table:
        """The spilled original texts (`load.RAW_TEXT`, null where the file holds them: `load.RAW_PLACE`) of
        ``rows``, in that order."""
        from medtune.data.load import ipc_batches

        return _pick_rows((b for spill in self.raw_spills for b in ipc_batches(spill)), self.rows)

    def _originals(self, texts: pa.Table) -> pa.Table:
        """The original texts of ``rows`` (``texts``: from the spills), those the spills left out read from
        the files."""
        from medtune.data.load import RAW_TEXT, original_texts

        missing = np.flatnonzero(texts["title"].is_null().to_numpy(zero_copy_only=False))
        if len(missing) == 0:
            return texts.select(list(RAW_TEXT))
        offsets = texts["source_offset"].take(pa.array(missing)).to_numpy()
        lengths = texts["source_length"].take(pa.array(missing)).to_numpy()
        source = np.searchsorted(self.bounds, self.rows[missing], side="right") - 1
        found, parts = [], []
        for k in np.unique(source):
            mine = np.flatnonzero(source == k)
            found.append(missing[mine])
            parts.append(original_texts(self.sources[k], offsets[mine], lengths[mine]))
        read = pa.concat_tables(parts).combine_chunks().take(pa.array(np.argsort(np.concatenate(found))))
        mask = np.zeros(texts.num_rows, dtype=bool)
        mask[missing] = True
        mask = pa.array(mask)
        return pa.table({name: pc.replace_with_mask(texts[name].combine_chunks(), mask, read[name].combine_chunks())
                         for name in RAW_TEXT})


def _pick_rows(tables: Iterator[pa.Table], rows: np.ndarray) -> pa.Table | None:
    """The rows ``rows`` (indices across ``tables``, one after another) in that order; None if none."""
    rows = np.asarray(rows, dtype=np.int64)
    order = np.sort(rows)
    picked, start = [], 0
    for table in tables:
        lo, hi = np.searchsorted(order, [start, start + table.num_rows])
        if hi > lo:
            picked.append(table.take(pa.array(order[lo:hi] - start)))
        start += table.num_rows
    if not picked:
        return None
    return pa.concat_tables(picked).combine_chunks().take(pa.array(np.searchsorted(order, rows)))


def _sorted_rejects(parts: list[pa.Table]) -> pa.Table:
    rejects = pa.concat_tables(parts).cast(REJECT_SCHEMA) if parts else REJECT_SCHEMA.empty_table()
    return rejects.sort_by([("source_file", "ascending"), ("source_line", "ascending")])


def _gather(table: pa.Table, rows: np.ndarray) -> pa.Table:
    """``table``'s rows ``rows`` in that order. (A take across chunks would first concatenate whole columns;
    a filter reads chunk by chunk, and only the small result is reordered.)"""
    rows = np.asarray(rows, dtype=np.int64)
    mask = np.zeros(table.num_rows, dtype=bool)
    mask[rows] = True
    picked = table.filter(pa.array(mask)).combine_chunks()
    return picked.take(pa.array(np.searchsorted(np.flatnonzero(mask), rows)))


def _token_counter(path: Path) -> Callable[[list[str]], list[int]]:
    """A batch token counter for the tokenizer in ``path`` (tokenizer.json via `tokenizers`, else transformers)."""
    path = Path(path)
    if (path / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        return lambda batch: [len(e.ids) for e in tok.encode_batch(batch, add_special_tokens=False)]
    if not path.exists():
        raise MedtuneError(f"--tokenizer {path}: no such directory")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    return lambda batch: [len(x) for x in tok(batch, add_special_tokens=False)["input_ids"]]


# ----------------------------------------------------------------------------- outputs

def build_messages_column(question, answer, department, sub_department, system, history) -> pa.Array:
    """The chat ``messages`` of each row, as `medtune.chat_format.build_messages` builds them.

    Rows without history get [system prompt, question, answer] assembled from the texts' buffers (the
    prompt comes from `chat_format.system_prompt`, once per department); rows with earlier turns go through
    `build_messages` itself.
    """
    from medtune.chat_format import build_messages, system_prompt

    question, answer, department, sub_department, system, history = (
        c.combine_chunks() if isinstance(c, pa.ChunkedArray) else c
        for c in (question, answer, department, sub_department, system, history))
    n = len(question)
    named = pc.if_else(pc.not_equal(sub_department, ""), sub_department, department)
    names = pc.unique(named)
    prompts = pa.array([system_prompt(x) for x in names.to_pylist()], pa.string()).take(pc.index_in(named, names))
    prompts = pc.if_else(pc.not_equal(system, ""), system, prompts)
    plain = pc.equal(history, "[]").to_numpy(zero_copy_only=False)
    idx_plain = pa.array(np.flatnonzero(plain))
    k = len(idx_plain)
    lists = _plain_messages(*(c if k == n else c.take(idx_plain) for c in (prompts, question, answer)))
    if k == n:
        return lists
    idx_turns = np.flatnonzero(~plain)
    rows = {name: col.take(pa.array(idx_turns)).to_pylist()
            for name, col in (("q", question), ("a", answer), ("d", named), ("h", history), ("s", system))}
    turns = [build_messages(q, a, department=d, history=json.loads(h), system=s or None)
             for q, a, d, h, s in zip(rows["q"], rows["a"], rows["d"], rows["h"], rows["s"])]
    merged = pa.concat_arrays([lists, pa.array(turns, MESSAGES_TYPE)])
    position = np.empty(n, dtype=np.int64)
    position[idx_plain] = np.arange(k)
    position[idx_turns] = k + np.arange(len(idx_turns))
    return merged.take(pa.array(position))


def _plain_messages(system: pa.Array, question: pa.Array, answer: pa.Array) -> pa.Array:
    """[system, user, assistant] messages per row, assembled from the three texts' buffers."""
    from medtune.data.dedup import _string_array, utf8_buffers
    from medtune.data.kernels import interleave3

    k = len(question)
    data, offsets = interleave3(*utf8_buffers(_string_array(system)), *utf8_buffers(_string_array(question)),
                                *utf8_buffers(_string_array(answer)))
    contents = pa.StringArray.from_buffers(3 * k, pa.py_buffer(offsets), pa.py_buffer(data))
    role_offsets = (np.tile(np.array([0, 6, 10], np.int32), k) + np.repeat(np.arange(k, dtype=np.int32) * 19, 3))
    roles = pa.StringArray.from_buffers(3 * k, pa.py_buffer(np.append(role_offsets, np.int32(19 * k))),
                                        pa.py_buffer(b"systemuserassistant" * k))
    structs = pa.StructArray.from_arrays([roles, contents], names=["role", "content"])
    return pa.ListArray.from_arrays(pa.array(np.arange(0, 3 * k + 1, 3, dtype=np.int32)), structs).cast(MESSAGES_TYPE)


def _json_values(arr: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Each value as JSON text (strings quoted and escaped, integers as digits, null as null)."""
    from medtune.data.dedup import _string_array, utf8_buffers
    from medtune.data.kernels import JSON_ESCAPE, json_strings

    arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    if pa.types.is_integer(arr.type):
        return pc.fill_null(pc.cast(arr, pa.string()), "null")
    arr = _string_array(arr)
    valid = np.ones(len(arr), dtype=bool) if arr.null_count == 0 else arr.is_valid().to_numpy(zero_copy_only=False)
    data, offsets = json_strings(*utf8_buffers(arr), valid, JSON_ESCAPE)
    return pa.StringArray.from_buffers(len(arr), pa.py_buffer(offsets), pa.py_buffer(data))


def write_jsonl(table: pa.Table, path: Path, chunk: int = 20_000) -> None:
    """``table`` as JSON lines, assembled by Arrow kernels (no Python object per row), ``chunk`` rows at a time
    (written in pieces of at most 1 MB: see `load.SmallWrites`)."""
    from medtune.data.load import SmallWrites

    with SmallWrites(path) as f:
        for start in range(0, table.num_rows, chunk):
            part = table.slice(start, chunk)
            pieces: list = []
            for i, name in enumerate(part.column_names):
                pieces += [("{" if i == 0 else ", ") + json.dumps(name) + ": ", _json_values(part[name])]
            lines = pc.binary_join_element_wise(*pieces, "}\n", "")
            for c in (lines.chunks if isinstance(lines, pa.ChunkedArray) else [lines]):
                offsets = np.frombuffer(c.buffers()[1], dtype=np.int32, count=len(c) + 1, offset=c.offset * 4)
                f.write(memoryview(c.buffers()[2])[offsets[0]:offsets[-1]])


def _summary(manifest: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    counts = manifest["counts"]
    table = Table(title=f"medtune data prepare → {manifest['output']}", show_footer=False)
    table.add_column("")
    table.add_column("rows", justify="right")
    table.add_row("read", f"{counts['read']:,}")
    for split in SPLITS:
        table.add_row(f"kept: {split}", f"{counts['splits'][split]:,}")
    for reason, n in counts["rejected_by_reason"].items():
        table.add_row(f"dropped: {reason}", f"{n:,}")
    table.add_row("kept / rejected", f"{counts['kept']:,} / {counts['rejected']:,}")
    Console(stderr=True).print(table)


class _Progress:
    """A rich progress bar over the stages (on stderr; silent when not a terminal)."""

    def __init__(self, total: int):
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("{task.description:<12}"), BarColumn(), TimeElapsedColumn(),
                            console=Console(stderr=True), transient=True)
        self.task = self.bar.add_task("prepare", total=total)
        self.started = 0

    def update(self, name: str) -> None:
        self.bar.update(self.task, description=name, completed=self.started)
        self.started += 1

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        self.bar.__exit__(*exc)


# ----------------------------------------------------------------------------- the command

def prepare(input: Path, output: Path, department: str | None = None,
            settings: PrepareArgs = PrepareArgs()) -> dict:
    """Clean, deduplicate and split a medical QA corpus into ``output``; returns the manifest.

    Args:
        input: the Toyhom Data_数据 folder (or its parent), a CSV, a JSONL file, or a directory of CSV/JSONL files
        output: directory for the splits, rejects.jsonl, boilerplate.json, manifest.json and the classifier
        department: top-level department (e.g. 内科) of a CSV/JSONL input; the six-folder layout names its own
    """
    from medtune.data.load import without_huge_pages

    with contextlib.nullcontext() if settings.huge_pages else without_huge_pages():
        return _prepare(input, output, department, settings)


def _prepare(input: Path, output: Path, department: str | None, settings: PrepareArgs) -> dict:
    from medtune.data.clean import boilerplate_from_counts, unicode_tables
    from medtune.data.dedup import Sketcher
    from medtune.data.load import PARALLEL_MIN_BYTES, discover, load, process_pool, read_ipc, release_memory

    started = time.perf_counter()
    input, output = Path(input), Path(output)
    files = discover(input, department, exclude=output)  # fails fast on a bad input path
    output.mkdir(parents=True, exist_ok=True)
    for name in OUTPUT_FILES:  # a failed run must not leave an older run's files looking current
        (output / name).unlink(missing_ok=True)
    if settings.tokenizer:
        _token_counter(settings.tokenizer)  # fails fast on a bad tokenizer directory
    workers = settings.workers or os.cpu_count() or 1
    big = sum(f.path.stat().st_size for f in files) >= PARALLEL_MIN_BYTES
    # A pool parses several files at once; with one file it still fits the classifier beside the writing.
    executor = process_pool(min(workers, max(len(files), 2))) if workers > 1 and big else None
    qa_sketch = Sketcher(settings.dedup_threshold, settings.dedup_num_perm, seed=settings.seed)
    q_sketch = Sketcher(settings.split_threshold, settings.split_num_perm, seed=settings.seed + 1, recall=SPLIT_RECALL)
    features = RowFeatures(settings.scrub, qa_sketch, q_sketch,
                           max(1, math.ceil(settings.boilerplate_min_count / len(files))), unicode_tables())
    # The workers' rows go to Arrow files here; this process reads back only what each stage needs.
    spill = tempfile.TemporaryDirectory(prefix=".medtune-", dir=output)
    try:
        with _Progress(8) as progress:
            stage = _Stages(progress)
            with stage("load", 0) as rec:  # parse, normalise, scrub, sketch: per file, in the workers
                res = load(input, department, executor=executor, transform=features, spill_dir=Path(spill.name))
                rows = _Ledger(res.files, res.rejects)
                read, file_info = res.rows_read, [f.describe() for f in res.files]
                extras = [e for f in res.files for e in f.extras]
                del res
                rec.update(rows_in=read, rows_out=rows.count)

            with stage("boilerplate", rows.count):  # learned from the workers' counts, removed there too
                boilerplate = boilerplate_from_counts(
                    [e["sentence_counts"] for e in extras], sum(e["answers"] for e in extras),
                    settings.boilerplate_share, settings.boilerplate_min_count)
                finish = functools.partial(finish_answers, phrases=[b["sentence"] for b in boilerplate],
                                           tokenizer=settings.tokenizer)
                done = list(executor.map(finish, rows.spills) if executor is not None else map(finish, rows.spills))
                removed: dict[str, int] = {}
                scrubbed: dict[str, int] = {}
                for d in done:
                    _add(removed, d["removed"])
                    _add(scrubbed, d["scrubbed"])
                finished = pa.concat_tables([read_ipc(d["path"], ["empty_before", "question_length", "answer_length"])
                                             for d in done])
                for name in finished.column_names:
                    rows.table = rows.table.append_column(name, finished[name])
                del finished
            if executor is not None:  # a worker imports scikit-learn while this process deduplicates
                executor.submit(_warm_up_classifier)
            with stage("filter", rows.count) as rec:
                _filter(rows, settings)
                rec["rows_out"] = rows.count
            with stage("exact_dedup", rows.count) as rec:
                _exact_duplicates(rows)
                rec["rows_out"] = rows.count
            with stage("near_dedup", rows.count) as rec:
                rec["candidate_pairs"] = _near_duplicates(rows, settings.dedup_threshold)
                rec["rows_out"] = rows.count
            if rows.count == 0:
                rows.rejects_job()(output / "rejects.jsonl")
                raise DataError(f"no rows left after cleaning and deduplication ({read:,} read); "
                                f"see {output / 'rejects.jsonl'} for why each was dropped", input)
            # Every drop is known now: a worker writes rejects.jsonl while this process splits and writes.
            rejects_job = rows.rejects_job()
            rejects_future = executor.submit(rejects_job, output / "rejects.jsonl") if executor is not None else None
            with stage("split", rows.count) as rec:
                kept = np.flatnonzero(rows.alive)
                split, rec["question_clusters"] = _split(rows, settings)
                rows.matrices.clear()
                release_memory()

            # The classifier trains in a worker while the splits are written.
            job = _classifier_job(rows, kept, split, settings, output)
            classifier_job = executor.submit(job) if executor is not None and job.args[1] else None
            with stage("write", len(kept)):
                split_counts, split_departments = _write_splits(rows, kept, split, output)
                kept_cols = rows.table.select(["department", "sub_department"]).filter(pa.array(rows.alive))
                departments, sub_departments = _value_counts(kept_cols["department"]), _value_counts(kept_cols["sub_department"])
                kept_cols = None
                rows.keep_places()
                rejected = rejects_future.result() if rejects_future is not None else rejects_job(output / "rejects.jsonl")
                del rejects_job
                _write_boilerplate(output / "boilerplate.json", boilerplate, removed, settings)
            with stage("classifier", len(job.args[0])) as rec:
                if not job.args[1]:
                    classifier_info = {"file": None, "skipped": "no department labels in the train split"}
                else:
                    classifier_info = classifier_job.result() if classifier_job is not None else job()
                rec["rows_out"] = classifier_info.get("train_rows", 0)
            del rows
    finally:
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
        spill.cleanup()

    kept_rows = sum(split_counts.values())
    if kept_rows + rejected["rows"] != read:  # the pipeline's promise: every row read is kept or rejected
        raise RuntimeError(f"row accounting is off: {kept_rows} kept + {rejected['rows']} rejected != {read} read")
    manifest = {
        "medtune_data_format": 1,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "input": str(input), "output": str(output),
        "files": file_info,
        "settings": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(settings).items()},
                     "department": department, "split_margin": SPLIT_MARGIN,
                     "dedup_lsh_bands": list(qa_sketch.bands), "split_lsh_bands": list(q_sketch.bands),
                     "length_unit": "tokens" if settings.tokenizer else "characters"},
        "seed": settings.seed,
        "counts": {"read": read, "kept": kept_rows, "rejected": rejected["rows"], "splits": split_counts,
                   "rejected_by_reason": rejected["by_reason"]},
        "departments": departments,
        "sub_departments": sub_departments,
        "split_departments": split_departments,
        "boilerplate": {"file": "boilerplate.json", "sentences": len(boilerplate), "removed": int(sum(removed.values()))},
        "scrubbed": scrubbed,
        "classifier": classifier_info,
        "stages": stage.records,
        "seconds": round(time.perf_counter() - started, 2),
    }
    (output / "manifest.json").write_text(json.dumps(manifest, ensure_ascii=False, indent=2), encoding="utf-8")
    _summary(manifest)
    return manifest


# ----------------------------------------------------------------------------- the stages

def finish_answers(spill: Path, *, phrases: list[str], tokenizer: Path | None = None) -> dict:
    """Remove the boilerplate from one loaded file's answers (a worker's task, after the list is learned).

    Writes ``<spill>.answers.arrow`` with ``answer`` (final; null where it is the clean answer, as most
    are: only what changed is written), ``empty_before`` (empty before boilerplate
    removal), ``question_length`` and ``answer_length`` (characters, or tokens of ``tokenizer``). Returns
    ``path``, ``removed`` (how often each boilerplate sentence was removed) and ``scrubbed`` (placeholders
    in the questions and final answers).
    """
    from medtune.data.clean import count_placeholders, lengths, strip_boilerplate

    from medtune.data.load import SmallWrites, ipc_batches, release_memory

    count_tokens = _token_counter(tokenizer) if tokenizer else None
    out = Path(spill).with_suffix(".answers.arrow")
    removed: dict[str, int] = {}
    scrubbed: dict[str, int] = {}
    with SmallWrites(out) as sink, pa.ipc.new_file(sink, FINISHED_SCHEMA) as writer:
        for batch in ipc_batches(spill, ["question", "clean_answer", "may_hold_placeholders"]):  # batches line up
            answer, counts = strip_boilerplate(batch["clean_answer"], phrases, threads=1)
            _add(removed, counts)
            maybe = batch["may_hold_placeholders"]  # the others hold none (see clean.normalise_table)
            _add(scrubbed, count_placeholders(batch["question"].filter(maybe), answer.filter(maybe)))
            writer.write_table(pa.table({
                "answer": _changed_only(answer, batch["clean_answer"]),
                "empty_before": pc.equal(pc.utf8_length(batch["clean_answer"]), 0),
                "question_length": pa.array(lengths(batch["question"], count_tokens), pa.int64()),
                "answer_length": pa.array(lengths(answer, count_tokens), pa.int64()),
            }, schema=FINISHED_SCHEMA))
    release_memory()
    return {"path": out, "removed": removed, "scrubbed": scrubbed}


def _changed_only(answer: pa.ChunkedArray, before: pa.Array) -> pa.Array:
    """``answer`` where it differs from ``before``, null elsewhere. (A take writes only the values it keeps;
    `pc.if_else` with a null would keep the whole data buffer, and the spill would hold every answer.)"""
    same = pc.fill_null(pc.equal(answer, before), True).to_numpy(zero_copy_only=False)
    return answer.take(pa.array(np.arange(len(same)), mask=same))


def _add(total: dict[str, int], more: dict[str, int]) -> None:
    for k, v in more.items():
        total[k] = total.get(k, 0) + v


def _filter(rows: _Ledger, settings: PrepareArgs) -> None:
    """Empty and out-of-range rows, each rejected for the first reason that applies."""
    s = settings
    q_len = rows.table["question_length"].to_numpy()
    a_len = rows.table["answer_length"].to_numpy()
    unit = "tokens" if settings.tokenizer else "characters"
    checks = [
        ("empty_question", q_len == 0, "the question (title + ask) is empty after cleaning"),
        ("empty_answer", rows.table["empty_before"].to_numpy(), "the answer is empty after cleaning"),
        ("boilerplate_only", a_len == 0, "the answer held only boilerplate sentences"),
        ("question_too_short", q_len < s.min_question_length, ("question", q_len, f"< {s.min_question_length}")),
        ("question_too_long", q_len > s.max_question_length, ("question", q_len, f"> {s.max_question_length}")),
        ("answer_too_short", a_len < s.min_answer_length, ("answer", a_len, f"< {s.min_answer_length}")),
        ("answer_too_long", a_len > s.max_answer_length, ("answer", a_len, f"> {s.max_answer_length}")),
    ]
    for reason, mask, detail in checks:
        hit = np.flatnonzero(mask & rows.alive)
        if isinstance(detail, tuple):
            what, values, limit = detail
            detail = pa.array([f"{what} has {v} {unit} ({limit})" for v in values[hit]], pa.string())
        rows.drop(hit, reason, detail)


def _exact_duplicates(rows: _Ledger) -> None:
    """The same question and answer after normalisation (128-bit fingerprints); the first copy stays."""
    from medtune.data.dedup import exact_duplicate_of

    alive = np.flatnonzero(rows.alive)
    first = exact_duplicate_of(rows.column("qa_print"))
    dup = np.flatnonzero(first != np.arange(len(alive)))
    if len(dup):
        of = rows.locate(alive[first[dup]])
        rows.drop(alive[dup], "exact_duplicate", pc.binary_join_element_wise("same question and answer as ", of, ""),
                  alive[first[dup]])


def _near_duplicates(rows: _Ledger, threshold: float) -> int:
    """MinHash/LSH near copies of question + answer; the cluster's first row stays. Returns pairs checked."""
    from medtune.data.dedup import near_duplicate_groups

    alive = np.flatnonzero(rows.alive)
    groups = near_duplicate_groups(rows.matrices["qa_bands"], rows.matrices["qa_sketch"], threshold, rows=alive)
    dup = np.flatnonzero(~groups.is_first)
    if len(dup):
        of = rows.locate(alive[groups.label[dup]])
        sims = pa.array([f"{x:.2f}" for x in groups.similarity[dup]], pa.string())
        rows.drop(alive[dup], "near_duplicate",
                  pc.binary_join_element_wise("near-duplicate (Jaccard ≈ ", sims, ") of ", of, ""), alive[groups.label[dup]])
    return groups.pairs


def _split(rows: _Ledger, settings: PrepareArgs) -> tuple[np.ndarray, dict]:
    """Each row still in: 0 train, 1 validation, 2 test; near-twin questions share one."""
    from medtune.data.dedup import near_duplicate_groups
    from medtune.data.split import assign_splits

    clusters = near_duplicate_groups(rows.matrices["q_bands"], rows.matrices["q_sketch"], settings.split_threshold,
                                     margin=SPLIT_MARGIN, rows=np.flatnonzero(rows.alive))
    strata = pc.binary_join_element_wise(rows.column("department"), rows.column("sub_department"), "/")
    split = assign_splits(strata, clusters.label, settings.fractions, settings.seed)
    sizes = np.bincount(clusters.label)
    return split, {"clusters": int((sizes > 0).sum()), "rows_in_clusters": int(sizes[sizes > 1].sum()),
                   "largest": int(sizes.max()), "candidate_pairs": clusters.pairs}


def _warm_up_classifier() -> None:
    import sklearn.feature_extraction.text  # noqa: F401
    import sklearn.linear_model  # noqa: F401


def _classifier_job(rows: _Ledger, kept: np.ndarray, split: np.ndarray, settings: PrepareArgs,
                    output: Path) -> functools.partial:
    """`classifier.train_and_score` with the train and test questions (each capped, sampled with the seed)."""
    from medtune.data import classifier

    sub, dept = rows.table["sub_department"], rows.table["department"]
    level = "sub_department" if pc.any(pc.not_equal(sub, "")).as_py() else "department"
    label = pc.if_else(pc.not_equal(sub, ""), sub, dept)
    labelled = pc.not_equal(label, "").to_numpy()
    rng = np.random.default_rng(settings.seed)
    picks = []
    for code, cap in ((0, settings.classifier_max_rows), (2, min(settings.classifier_max_rows, CLASSIFIER_TEST_ROWS))):
        idx = kept[(split == code) & labelled[kept]]
        if len(idx) > cap:
            idx = np.sort(rng.choice(idx, cap, replace=False))
        picks.append(idx)
    questions = rows.gather(np.concatenate(picks), ["question"])["question"]
    args, start = [], 0
    for idx in picks:
        args += [questions.slice(start, len(idx)).to_pylist(), _gather(pa.table({"l": label}), idx)["l"].to_pylist()]
        start += len(idx)
    return functools.partial(classifier.train_and_score, *args, path=output / CLASSIFIER_FILE,
                             max_rows=settings.classifier_max_rows, seed=settings.seed, level=level)


def _write_splits(rows: _Ledger, kept: np.ndarray, split: np.ndarray, output: Path) -> tuple[dict, dict]:
    """The three split files, written in one pass over the spilled batches; (rows, rows per department) each."""
    import pyarrow.parquet as pq

    schema = pa.schema([("id", pa.string()), ("question", pa.string()), ("answer", pa.string()),
                        ("department", pa.string()), ("sub_department", pa.string()), ("source_file", pa.string()),
                        ("source_line", pa.int64()), ("messages", MESSAGES_TYPE)])
    code = np.full(len(rows.alive), -1, dtype=np.int8)
    code[kept] = split
    counts = {name: 0 for name in SPLITS}
    buffers: dict[str, list[pa.Table]] = {name: [] for name in SPLITS}
    departments: dict[str, dict[str, int]] = {name: {} for name in SPLITS}
    # Dictionary pages only where values repeat (long unique texts would just be tried and dropped).
    writers = {name: pq.ParquetWriter(output / f"{name}.parquet", schema, use_dictionary=[
        "department", "sub_department", "source_file", "messages.list.element.role"]) for name in SPLITS}
    # Row groups are encoded and compressed on a thread of their own (Arrow releases the GIL) while
    # this one reads and assembles the next batch.
    pending: queue.Queue = queue.Queue(maxsize=1)
    failed: list[BaseException] = []

    def write() -> None:
        while (item := pending.get()) is not None:
            if not failed:
                try:
                    writers[item[0]].write_table(item[1])
                except BaseException as e:  # reported by the caller; keep taking items so it never blocks
                    failed.append(e)

    writer = threading.Thread(target=write, name="medtune-parquet", daemon=True)
    writer.start()
    try:
        columns = ["question", "department", "sub_department", "system", "history", "source_file", "source_line"]
        for start, batch in rows.batches(columns, answers=True, consume=True):
            if failed:
                break
            mine = code[start:start + batch.num_rows]
            for k, name in enumerate(SPLITS):
                keep = mine == k
                if not keep.any():
                    continue
                part = batch.filter(pa.array(keep))
                messages = build_messages_column(part["question"], part["answer"], part["department"],
                                                 part["sub_department"], part["system"], part["history"])
                buffers[name].append(pa.table({
                    "id": _where(part), "question": part["question"], "answer": part["answer"],
                    "department": part["department"], "sub_department": part["sub_department"],
                    "source_file": part["source_file"], "source_line": part["source_line"], "messages": messages,
                }, schema=schema))
                counts[name] += part.num_rows
                _add(departments[name], _value_counts(part["sub_department"], part["department"]))
                if sum(t.num_rows for t in buffers[name]) >= ROW_GROUP:
                    pending.put((name, pa.concat_tables(buffers[name])))
                    buffers[name] = []
        for name in SPLITS:
            if buffers[name] or counts[name] == 0:
                pending.put((name, pa.concat_tables(buffers[name]) if buffers[name] else schema.empty_table()))
    finally:
        pending.put(None)
        writer.join()
        for w in writers.values():
            w.close()
    if failed:
        raise failed[0]
    return counts, {name: dict(sorted(d.items(), key=lambda kv: (-kv[1], kv[0]))) for name, d in departments.items()}


def _value_counts(arr, fallback=None) -> dict[str, int]:
    """Counts per value (most first); with ``fallback``, empty values count under the fallback's value."""
    if fallback is not None:
        arr = pc.if_else(pc.not_equal(arr, ""), arr, fallback)
    counts = pc.value_counts(arr).to_pylist()
    return {c["values"]: int(c["counts"]) for c in sorted(counts, key=lambda c: (-c["counts"], c["values"]))}


def _reason_counts(rejects: pa.Table) -> dict[str, int]:
    return _value_counts(rejects["reason"]) if rejects.num_rows else {}


def _write_boilerplate(path: Path, learned: list[dict], removed: dict[str, int], settings: PrepareArgs) -> None:
    entries = [{**b, "removed": removed.get(b["sentence"], 0)} for b in learned]
    doc = {"min_share": settings.boilerplate_share, "min_count": settings.boilerplate_min_count,
           "rule": "a sentence (without surrounding punctuation) in at least min_share of the distinct answers "
                   "and at least min_count of them; removed as whole sentences",
           "sentences": entries}
    path.write_text(json.dumps(doc, ensure_ascii=False, indent=2), encoding="utf-8")
