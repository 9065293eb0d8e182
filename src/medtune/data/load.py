"""Read a medical QA corpus into one Arrow table of raw rows (the contract in `medtune.data`).

Accepted inputs:

* the Toyhom six-folder layout: ``Data_数据/`` (or its parent) holding ``Andriatria_男科``, ``IM_内科``, …
  with CSVs; the folder gives the top-level department, the CSV's ``department`` column the sub-department;
* one CSV, or a directory of CSV / JSONL files (the top-level department comes from ``--department``);
* the user's own JSONL: alpaca ``instruction/input/output`` (optional ``system``, ``history``), chat
  ``messages`` (``role``/``content``) or ShareGPT ``conversations`` (``from``/``value``), one record per
  line, optional ``department`` / ``sub_department`` keys. A multi-turn conversation becomes one record:
  its last user/assistant pair is the question and answer, earlier turns go to ``history`` (JSON) and
  its own system message to ``system``. A ``.json`` file may also hold a JSON array of such records
  (``source_line`` is then the item's 1-based index).

CSV columns: ``ask`` and ``answer`` are required, ``title`` and ``department`` optional (header names
are matched case-insensitively). Each file's encoding is detected on its own (`TextStream`): a UTF-8
BOM, UTF-8, else GB18030 (a superset of GBK and GB2312). A CSV is read in pieces of whole records,
each decoded at once and parsed by Arrow's C++ CSV reader; the line each record starts on comes from the
piece's line feeds outside quotes. Where Arrow could read a piece differently from Python's strict `csv`
module (text after a closing quote, a wrong field count, undecodable bytes, ...), Python's reader takes
over from that piece on and rejects the rows it cannot read, each with its line. Rows come in batches of
`BATCH_ROWS`, in worker processes when there are several files; a ``transform`` may process each batch there.

Bad input: an error naming the file and line (`DataError`) where the file cannot be read as a whole —
empty or binary file, undecodable text, a missing column, an unclosed quote swallowing the rest of the
file, a file with no usable row, a directory with no CSV/JSONL — and a per-row reject with its reason
where the rest of the file is fine (wrong field count, broken quoting, a few undecodable bytes, a bad
JSON line, an unknown record format, a malformed conversation).

    >>> res = load(Path("../shared/data/toyhom_neike_sample.csv"))   # doctest: +SKIP
    >>> res.table.num_rows, res.files[0].encoding                       # doctest: +SKIP
    (7644, 'gb18030')
"""
from __future__ import annotations

import codecs
import csv
import dataclasses
import functools
import hashlib
import io
import itertools
import json
import logging
import re
from concurrent.futures import Executor, ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.compute as pc

from medtune.data import TOP_DEPARTMENTS
from medtune.errors import DataError

log = logging.getLogger(__name__)

STRING_COLUMNS = ("title", "ask", "answer", "department", "sub_department", "system", "history", "source_file")
RAW_TEXT = ("title", "ask", "answer")  # the original texts (spilled apart, see `read_file`)
# Where a record's bytes lie in its file (offset, length without the line feed) when Arrow's reader took
# it (null otherwise): a spill then leaves its original texts out, and `original_texts` reads them again.
RAW_PLACE = ("source_offset", "source_length")
RAW_SCHEMA = pa.schema([(c, pa.string()) for c in STRING_COLUMNS] + [("source_line", pa.int64())]
                       + [(c, pa.int64()) for c in RAW_PLACE])
DATA_DIR = "Data_数据"
CSV_SUFFIXES = (".csv",)
JSON_SUFFIXES = (".jsonl", ".json")
REQUIRED_CSV = ("ask", "answer")
OPTIONAL_CSV = ("title", "department")
MAX_RAW_CHARS = 2000         # raw text kept in a reject
MAX_BAD_BYTES = 10           # more undecodable bytes than this (or 0.1% of lines) fail the whole file
BATCH_ROWS = 20_000          # rows parsed (and transformed) at a time: bounds a worker's memory
PARALLEL_MIN_BYTES = 8 << 20  # below this much input a process pool costs more than it saves
USER_ROLES = {"user", "human"}
ASSISTANT_ROLES = {"assistant", "gpt", "model", "bot", "chatgpt"}
_SURROGATE = re.compile("[\udc80-\udcff]")


Transform = Callable[[pa.Table], "pa.Table | tuple[pa.Table, Any]"]


@dataclasses.dataclass(frozen=True)
class SourceFile:
    """One input file: where it is, the name rows cite (``source_file``) and its top-level department."""

    path: Path
    name: str
    department: str

    @property
    def kind(self) -> str:
        return "csv" if self.path.suffix.lower() in CSV_SUFFIXES else "json"


@dataclasses.dataclass
class FileResult:
    """What one file gave: its rows, its per-row rejects, and facts for the manifest."""

    file: SourceFile
    table: pa.Table | None  # None while it lies in ``spill`` (in a worker)
    rejects: list[dict]
    sha256: str
    encoding: str
    bytes: int
    extras: list = dataclasses.field(default_factory=list)  # what ``transform`` returned besides the tables
    spill: Path | None = None
    rows: int = 0  # rows parsed (not rejected)
    header: tuple[str, ...] | None = None  # a CSV's column names, where Arrow's reader took some rows
    mtime_ns: int = 0  # when the file was last changed, as it was read

    @property
    def rows_read(self) -> int:
        return self.rows + len(self.rejects)

    def describe(self) -> dict:
        return {"path": str(self.file.path), "name": self.file.name, "department": self.file.department,
                "sha256": self.sha256, "encoding": self.encoding, "bytes": self.bytes,
                "rows_read": self.rows_read, "rows_parsed": self.rows, "rows_rejected": len(self.rejects)}


@dataclasses.dataclass
class LoadResult:
    table: pa.Table | None    # RAW_SCHEMA (+ whatever columns ``transform`` added); None: left in the spills
    rejects: list[dict]       # reason, source_file, source_line, detail, raw
    files: list[FileResult]

    @property
    def rows_read(self) -> int:
        return sum(f.rows_read for f in self.files)


# ----------------------------------------------------------------------------- finding the files

def _six_folder_root(path: Path) -> Path | None:
    """The directory holding the department folders, if ``path`` is the layout or its parent."""
    for root in (path, path / DATA_DIR):
        if root.is_dir() and any((root / name).is_dir() for name in TOP_DEPARTMENTS):
            return root
    return None


def discover(input: Path, department: str | None = None, exclude: Path | None = None) -> list[SourceFile]:
    """The files to read under ``input`` (a file or a directory), in a stable order; files under
    ``exclude`` (e.g. prepare's own output folder inside the input folder) are left out."""
    input = Path(input)
    skip = Path(exclude).resolve() if exclude is not None else None

    def wanted(p: Path) -> bool:
        return (p.is_file() and p.suffix.lower() in CSV_SUFFIXES + JSON_SUFFIXES
                and (skip is None or not p.resolve().is_relative_to(skip)))

    if not input.exists():
        raise DataError("no such file or directory", input)
    if input.is_file():
        if input.suffix.lower() not in CSV_SUFFIXES + JSON_SUFFIXES:
            raise DataError(f"unsupported file type {input.suffix or '(none)'!r}; expected .csv, .jsonl or .json", input)
        return [SourceFile(input, input.name, department or "")]
    root = _six_folder_root(input)
    if root is not None:
        if department:
            log.warning("--department %s ignored: the department folders name the departments", department)
        files = []
        for folder, top in TOP_DEPARTMENTS.items():
            for p in sorted((root / folder).rglob("*")) if (root / folder).is_dir() else []:
                if wanted(p):
                    files.append(SourceFile(p, p.relative_to(root.parent).as_posix(), top))
        if not files:
            raise DataError(f"the department folders hold no CSV or JSONL files (expected one CSV in each of "
                            f"{', '.join(TOP_DEPARTMENTS)})", root)
        return files
    files = [SourceFile(p, p.relative_to(input).as_posix(), department or "")
             for p in sorted(input.rglob("*")) if wanted(p)]
    if not files:
        raise DataError("directory holds no CSV (.csv) or JSONL (.jsonl/.json) files", input)
    return files


# ----------------------------------------------------------------------------- decoding

class TextStream:
    """A file's lines (with their line feeds), decoded while it is read; its sha256 and size on the way.

    The encoding is settled before the first line: a UTF-8 BOM means UTF-8; otherwise UTF-8 unless more
    than a few bytes fail to decode as UTF-8 (GB18030 text fails on nearly every Chinese character, so
    a quick scan tells them apart), else GB18030. Undecodable bytes stay in the text as surrogate
    escapes: the rows holding them are rejected, and too many of them fail the whole file.
    """

    CHUNK = 1 << 20

    def __init__(self, path: Path):
        self.path = Path(path)
        self.size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(self.CHUNK)
        if not head.strip() and self.size <= self.CHUNK:
            raise DataError("empty file", self.path)
        if head[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):
            raise DataError("UTF-16 text is not supported; save the file as UTF-8 or GB18030", self.path)
        self.limit = max(MAX_BAD_BYTES, self.size // 100_000)  # undecodable bytes tolerated (as rejects)
        self.encoding = "utf-8-sig" if head.startswith(codecs.BOM_UTF8) else self._sniff()
        self.sha256 = hashlib.sha256()
        self._hashed = False
        self.bad = 0
        self.first_bad_line: int | None = None
        self.header: tuple[str, ...] | None = None  # set by `_arrow_csv_batches`
        self.mtime_ns = self.path.stat().st_mtime_ns

    def _chunks(self) -> Iterator[bytes]:
        with open(self.path, "rb") as f:
            while chunk := f.read(self.CHUNK):
                yield chunk

    def _sniff(self) -> str:
        decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
        bad = 0
        for chunk in self._chunks():
            for at in range(0, len(chunk), 1 << 16):  # GB18030 text fails within the first few KB
                bad += len(_SURROGATE.findall(decoder.decode(chunk[at:at + (1 << 16)])))
                if bad > self.limit:
                    return "gb18030"
        # A few undecodable bytes: real UTF-8 with damage, or a short GBK text whose byte pairs happen
        # to be valid UTF-8 (头 = CD B7). A clean GB18030 decoding decides for GB18030.
        return "gb18030" if bad and self._decodes("gb18030") else "utf-8"

    def _decodes(self, encoding: str) -> bool:
        decoder = codecs.getincrementaldecoder(encoding)("strict")
        try:
            for chunk in self._chunks():
                decoder.decode(chunk)
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            return False
        return True

    def __iter__(self) -> Iterator[str]:
        # Lines come from io.StringIO in C (line ends as the csv module expects: \n, \r\n or \r); only a
        # piece of text holding undecodable bytes is walked line by line in Python.
        return itertools.chain.from_iterable(self._pieces())

    def _pieces(self) -> Iterator[Iterator[str]]:
        decoder = codecs.getincrementaldecoder(self.encoding)("surrogateescape")
        first_pass = not self._hashed
        carry, offset, newlines = "", 0, 0
        for chunk in self._chunks():
            if first_pass:
                self.sha256.update(chunk)
            nul = chunk.find(b"\x00")
            if nul >= 0:  # (a line feed byte never occurs inside a UTF-8 or GB18030 character)
                raise DataError(f"binary file (NUL byte at offset {offset + nul}); expected a UTF-8 or GB18030 "
                                "text file", self.path, newlines + chunk.count(b"\n", 0, nul) + 1)
            offset += len(chunk)
            newlines += chunk.count(b"\n")
            text = carry + decoder.decode(chunk)
            cut = text.rfind("\n") + 1
            carry = text[cut:]
            yield self._lines(text[:cut], newlines - text.count("\n", 0, cut) - carry.count("\n"))
        rest = carry + decoder.decode(b"", final=True)
        if rest:
            yield self._lines(rest, newlines - rest.count("\n"))
        self._hashed = True
        if self.bad > self.limit:
            raise DataError(f"undecodable bytes: {self.bad} bytes are not valid {self.encoding} (re-save the file "
                            "as UTF-8)", self.path, self.first_bad_line)

    def _lines(self, text: str, before: int) -> Iterator[str]:
        if _SURROGATE.search(text) is None:
            return io.StringIO(text, newline="")
        return self._checked(text, before)

    def _checked(self, text: str, before: int) -> Iterator[str]:
        for number, line in enumerate(io.StringIO(text, newline=""), before + 1):
            if _SURROGATE.search(line):
                self.bad += len(_SURROGATE.findall(line))
                self.first_bad_line = self.first_bad_line or number
            yield line

    def lines(self, spans: list[tuple[int, int]]) -> dict[tuple[int, int], str]:
        """The text of lines ``first..last`` (1-based, inclusive) for each span, read again from the file."""
        want: dict[int, list[tuple[int, int]]] = {}
        for span in spans:
            for n in range(span[0], span[1] + 1):
                want.setdefault(n, []).append(span)
        found: dict[tuple[int, int], list[str]] = {span: [] for span in spans}
        last = max((b for _, b in spans), default=0)
        for n, line in enumerate(self, 1):
            for span in want.get(n, ()):
                found[span].append(line)
            if n >= last:
                break
        return {span: "".join(parts)[:MAX_RAW_CHARS] for span, parts in found.items()}


def _bad_bytes(text: str) -> str:
    return "".join(f"\\x{ord(c) - 0xDC00:02x}" for c in _SURROGATE.findall(text)[:8])


def _reject(src: SourceFile, line: int, reason: str, detail: str, raw: str | tuple[int, int] = "") -> dict:
    """A per-row reject; ``raw`` is its text, or the (first, last) lines it spans, read back later."""
    return {"reason": reason, "source_file": src.name, "source_line": line, "detail": detail, "raw": raw}


def _csv_batches(src: SourceFile, stream: TextStream, rejects: list[dict]) -> Iterator[pa.Table]:
    """Raw-row tables of `BATCH_ROWS` rows (the last may be smaller); unparseable records go to ``rejects``.

    Arrow's CSV parser reads the file piece by piece (`_arrow_csv_batches`); from the first piece it does
    not accept as exactly what Python's ``csv`` module would make of it, Python's parser takes over.
    """
    resume = yield from _rebatch(_arrow_csv_batches(src, stream))
    if resume is None:
        return
    line, names = resume
    lines: Iterator[str] = iter(stream)
    if names is not None:  # the header and the rows before ``line`` were parsed already
        lines = itertools.islice(lines, line - 1, None)
    reader = csv.reader(lines, strict=True)
    offset = 0 if names is None else line - 1  # reader.line_num counts from where it starts
    if names is None:
        try:
            header = next(reader)
        except (StopIteration, csv.Error) as e:
            raise DataError(f"cannot read the CSV header: {e}", src.path, 1) from None
        names = _header_names(src, header)
    width = len(names)
    rows: list[list[str]] = []
    starts: list[int] = []
    prev = reader.line_num + offset
    while True:
        try:
            rec = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            start, prev = prev + 1, reader.line_num + offset
            if str(e) == "unexpected end of data":
                raise DataError(f"broken quoting: the quoted field that starts on line {start} is never closed "
                                f"(it runs to the end of the file, line {prev})", src.path, start) from None
            span = f"lines {start}-{prev}" if prev > start else f"line {start}"
            rejects.append(_reject(src, start, "broken_quoting", f"CSV quoting error on {span}: {e}", (start, prev)))
            continue
        start, prev = prev + 1, reader.line_num + offset
        if len(rec) == width:
            rows.append(rec)
            starts.append(start)
            if len(rows) == BATCH_ROWS:
                yield _csv_table(src, names, rows, starts, stream.bad, rejects)
                rows, starts = [], []
        elif not rec:
            pass  # a blank line is not a row
        elif prev > start:  # a stray quote made one record of several lines
            rejects.append(_reject(src, start, "broken_quoting",
                                   f"a quoted field spans lines {start}-{prev} and leaves {len(rec)} fields "
                                   f"instead of {width}", (start, prev)))
        else:
            rejects.append(_reject(src, start, "wrong_field_count", f"{len(rec)} fields, expected {width}",
                                   (start, prev)))
    if rows:
        yield _csv_table(src, names, rows, starts, stream.bad, rejects)


def _header_names(src: SourceFile, header: list[str]) -> list[str]:
    names = [h.strip().lstrip("\ufeff").lower() for h in header]
    for col in REQUIRED_CSV:
        if col not in names:
            raise DataError(f"missing column {col!r}: the header is {','.join(header)!r}; expected "
                            "department,title,ask,answer", src.path, 1, col)
    return names


def _rebatch(tables: Iterator[pa.Table]):
    """``tables`` re-cut into `BATCH_ROWS`-row tables (the batches of the Python parser, so that per-batch
    work such as the boilerplate counts sees the same rows); returns what ``tables`` returned."""
    held: list[pa.Table] = []
    count = 0
    while True:
        try:
            t = next(tables)
        except StopIteration as stop:
            if held:
                yield pa.concat_tables(held).combine_chunks()
            return stop.value
        held.append(t)
        count += t.num_rows
        while count >= BATCH_ROWS:
            whole = pa.concat_tables(held)
            yield whole.slice(0, BATCH_ROWS).combine_chunks()
            rest = whole.slice(BATCH_ROWS)
            held, count = ([rest] if rest.num_rows else []), rest.num_rows


PIECE_BYTES = 16 << 20  # bytes of a file handed to Arrow's CSV parser at a time
_QUOTE, _COMMA, _LF, _CR = 0x22, 0x2C, 0x0A, 0x0D


def _arrow_csv_batches(src: SourceFile, stream: TextStream):
    """Raw-row tables parsed by Arrow's C++ CSV reader, one per piece of about `PIECE_BYTES`.

    Pieces are cut at the line feeds that end a record (`_record_ends`), so each holds whole records, and
    each record's first line is counted from the bytes. A piece is taken only when Python's strict
    ``csv`` reader would read it the same way (`_record_ends` finds nothing it would reject or read
    otherwise), it decodes without error, and Arrow finds as many records as there are. Otherwise this
    returns (the line to resume at, the header's names or None): Python's reader continues there, with
    its per-row rejects and messages. Returns None when the whole file was read (then the file's sha256,
    computed on the way, is the stream's).
    """
    import numpy as np

    if stream.encoding not in ("gb18030", "utf-8", "utf-8-sig"):
        return 1, None
    sha = hashlib.sha256()
    names: list[str] | None = None
    line, carry = 1, b""
    base = 0  # the file offset of the piece
    with open(stream.path, "rb") as f:
        while True:
            chunk = f.read(PIECE_BYTES)
            sha.update(chunk)
            data = carry + chunk
            if chunk:
                ends = _record_ends(np.frombuffer(data, np.uint8))
                if ends is None:  # quoting Python's strict reader would reject: let it report the rows
                    return line, names
                if len(ends) == 0:
                    carry = data
                    continue
                cut = int(ends[-1]) + 1
                piece, carry = data[:cut], data[cut:]
            else:  # the end of the file: its last record may lack a line feed, but no quote may stay open
                piece, carry = data, b""
                ends = _record_ends(np.frombuffer(piece, np.uint8), final=True)
                if ends is None:
                    return line, names
            if piece:
                at, base = base, base + len(piece)
                if names is None and line == 1 and stream.encoding == "utf-8-sig" and piece.startswith(codecs.BOM_UTF8):
                    piece, ends, at = piece[len(codecs.BOM_UTF8):], ends - len(codecs.BOM_UTF8), at + len(codecs.BOM_UTF8)
                parsed = _arrow_piece(src, piece, ends, names, line, stream.encoding, at)
                if parsed is None:
                    return line, names
                names, table, line = parsed
                stream.header = tuple(names)
                if table is not None and table.num_rows:
                    yield table
            if not chunk:
                break
    stream.sha256, stream._hashed = sha, True
    return None


def _record_ends(arr, final: bool = False):
    """Positions of the line feeds in the bytes ``arr`` (starting at a record) that end a record, or None
    where Python's strict csv reader and Arrow's reader might read the bytes differently.

    Quotes are walked run by run (a few thousand per piece) as Python's reader takes them: at a field's
    start a run opens a quoted field, inside one pairs are escaped quotes and an odd one closes it, which
    must be followed by a delimiter or a line end; elsewhere in an unquoted field quotes are literal text
    (Arrow reads all of these the same way). None also for a NUL byte, a bare carriage return, or (with
    ``final``) a quoted field still open at the end.
    """
    import numpy as np

    n = len(arr)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if (arr == 0).any():
        return None
    cr = np.flatnonzero(arr == _CR)
    if len(cr) and cr[-1] == n - 1:
        if final:
            return None
        cr = cr[:-1]  # its line feed may open the next read
    if len(cr) and (arr[cr + 1] != _LF).any():
        return None
    feeds = np.flatnonzero(arr == _LF)
    q = np.flatnonzero(arr == _QUOTE)
    if len(q) == 0:
        return feeds
    first = np.concatenate([[True], q[1:] != q[:-1] + 1])
    starts = q[first]
    lengths = np.diff(np.concatenate([np.flatnonzero(first), [len(q)]]))
    ends = starts + lengths  # the byte after each run
    before = np.where(starts > 0, arr[np.maximum(starts - 1, 0)], _LF).tolist()
    after = np.where(ends < n, arr[np.minimum(ends, n - 1)], -1).tolist()
    inside_after = []
    inside = False
    for b, a, k in zip(before, after, lengths.tolist()):
        if not inside:
            if b not in (_COMMA, _LF):
                inside_after.append(False)  # literal quotes in an unquoted field
                continue
            k -= 1  # opens a quoted field
            inside = True
        if k % 2:  # escaped pairs, then the closing quote
            inside = False
            if a not in (_COMMA, _LF, _CR, -1):
                return None  # text after a closing quote: Python rejects the row, Arrow would keep it
        inside_after.append(inside)
    if final and inside:
        return None
    state = np.array(inside_after, dtype=bool)
    run = np.searchsorted(starts, feeds) - 1  # the last quote run before each line feed
    return feeds[(run < 0) | ~state[np.maximum(run, 0)]]


def _arrow_piece(src: SourceFile, piece: bytes, ends, names: list[str] | None, line: int, encoding: str,
                 at: int = 0):
    """(names, raw-row table or None, the line after the piece) for one piece of whole records (``ends``:
    the line feeds that end them, from `_record_ends`; ``at``: the piece's offset in the file), or None to
    hand over."""
    import numpy as np

    arr = np.frombuffer(piece, np.uint8)
    python_encoding = "gb18030" if encoding == "gb18030" else "utf-8"
    if names is None:  # the header is the first record
        end = int(ends[0]) + 1 if len(ends) else len(piece)
        try:
            header = next(csv.reader(io.StringIO(piece[:end].decode(python_encoding), newline=""), strict=True))
        except (StopIteration, csv.Error, UnicodeDecodeError):
            return None
        names = _header_names(src, header)
        if len(set(names)) != len(names) or not all(names):
            return None  # Arrow needs distinct, non-empty column names
        line += piece.count(b"\n", 0, end)
        piece, arr, ends, at = piece[end:], arr[end:], ends[ends >= end] - end, at + end
    after = line + piece.count(b"\n")  # the line that follows the piece
    # Each record's first line, from where the records start; blank lines (no record) are left out.
    first = np.concatenate([[0], ends + 1])
    last = np.concatenate([ends, [len(piece)]])
    if first[-1] == len(piece):  # the piece ends with a line feed
        first, last = first[:-1], last[:-1]
    size = last - first
    blank = (size == 0) | ((size == 1) & (arr[np.minimum(first, len(arr) - 1)] == _CR)) if len(arr) else size == 0
    first, size = first[~blank], size[~blank]
    if len(first) == 0:
        return names, None, after
    starts = line + np.searchsorted(np.flatnonzero(arr == _LF), first)
    try:
        # GB18030 is decoded all of the piece at once (into valid UTF-8); Arrow checks UTF-8 input itself.
        text = gb18030_to_utf8(piece) if python_encoding == "gb18030" else piece
        table = _arrow_read(text, names, check_utf8=python_encoding != "gb18030")
    except (UnicodeDecodeError, pa.ArrowInvalid, pa.ArrowTypeError):
        return None
    n = table.num_rows
    if n != len(starts):
        return None  # Arrow split the records differently: let Python's reader account for them
    limit = csv.field_size_limit()  # Python's reader rejects longer fields: leave those records to it
    if any((pc.max(pc.utf8_length(c)).as_py() or 0) > limit for c in table.columns):
        return None
    cols = {name: table.column(i) for i, name in enumerate(names)}  # `_rebatch` makes them contiguous

    def col(name: str) -> pa.ChunkedArray:
        return cols[name] if name in cols else pa.chunked_array([pa.repeat("", n)])

    out = pa.table({
        "title": col("title"), "ask": col("ask"), "answer": col("answer"),
        "department": pa.repeat(src.department, n), "sub_department": col("department"),
        "system": pa.repeat("", n), "history": pa.repeat("[]", n), "source_file": pa.repeat(src.name, n),
        "source_line": pa.array(starts, pa.int64()),
        "source_offset": pa.array(at + first, pa.int64()), "source_length": pa.array(size, pa.int64()),
    }, schema=RAW_SCHEMA)
    return names, out, after


def gb18030_to_utf8(data: bytes) -> pa.Buffer:
    """GB18030 ``data`` as UTF-8, in one compiled pass; where that pass meets a sequence it cannot decode,
    Python's codec decodes the whole (and raises `UnicodeDecodeError` for bytes that are not GB18030)."""
    import numpy as np

    from medtune.data.kernels import gb18030_tables, gb18030_to_utf8 as kernel

    out = np.empty(len(data) * 3 // 2 + 4, dtype=np.uint8)
    n = kernel(np.frombuffer(data, dtype=np.uint8), *gb18030_tables(), out)
    return pa.py_buffer(out[:n] if n >= 0 else data.decode("gb18030").encode("utf-8"))


def _arrow_read(text: bytes | pa.Buffer, names: list[str], check_utf8: bool = True) -> pa.Table:
    """UTF-8 CSV records (no header) as string columns ``names``, by Arrow's reader. ``check_utf8=False``
    only for text this module transcoded itself (valid UTF-8 by construction; the check costs ~4% of a
    worker's load)."""
    import pyarrow.csv as pacsv

    return pacsv.read_csv(
        pa.BufferReader(text), read_options=pacsv.ReadOptions(column_names=names, use_threads=False),
        parse_options=pacsv.ParseOptions(newlines_in_values=True, ignore_empty_lines=True),
        convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names}, check_utf8=check_utf8,
                                             strings_can_be_null=False, quoted_strings_can_be_null=False))


def _csv_table(src: SourceFile, names: list[str], rows: list[list[str]], starts: list[int], bad_bytes: int,
               rejects: list[dict]) -> pa.Table:
    if bad_bytes:
        rows, starts = _drop_undecodable(src, rows, starts, rejects, lambda r: "".join(r))
    n = len(rows)
    cols = list(zip(*rows)) if rows else [()] * len(names)

    def col(name: str) -> pa.Array:
        return pa.array(cols[names.index(name)], pa.string()) if name in names else pa.repeat("", n)

    return pa.table({
        "title": col("title"), "ask": col("ask"), "answer": col("answer"),
        "department": pa.repeat(src.department, n), "sub_department": col("department"),
        "system": pa.repeat("", n), "history": pa.repeat("[]", n), "source_file": pa.repeat(src.name, n),
        "source_line": pa.array(starts, pa.int64()),
        "source_offset": pa.nulls(n, pa.int64()), "source_length": pa.nulls(n, pa.int64()),
    }, schema=RAW_SCHEMA)


def _drop_undecodable(src: SourceFile, rows: list, starts: list[int], rejects: list[dict],
                      text_of: Callable[[Any], str]) -> tuple[list, list[int]]:
    keep_rows, keep_starts = [], []
    for rec, start in zip(rows, starts):
        text = text_of(rec)
        if _SURROGATE.search(text):
            rejects.append(_reject(src, start, "undecodable", f"bytes that are not valid text: {_bad_bytes(text)}",
                                   _SURROGATE.sub("\ufffd", text)[:MAX_RAW_CHARS]))
        else:
            keep_rows.append(rec)
            keep_starts.append(start)
    return keep_rows, keep_starts


# ----------------------------------------------------------------------------- JSONL

class _BadRecord(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def _text(value: Any, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _BadRecord("bad_conversation", f"{where} is {type(value).__name__}, expected a string")
    return value


def _from_turns(turns: Any, role_key: str, content_key: str, key: str) -> tuple[str, str, str, list[dict]]:
    """(system, question, answer, history) from a list of turns; the last user/assistant pair is the record."""
    if not isinstance(turns, list) or not turns:
        raise _BadRecord("bad_conversation", f"{key!r} must be a non-empty list of turns")
    msgs = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            raise _BadRecord("bad_conversation", f"{key}[{i}] is not an object")
        role = str(t.get(role_key, "")).strip().lower()
        role = "user" if role in USER_ROLES else "assistant" if role in ASSISTANT_ROLES else role
        if role not in ("system", "user", "assistant"):
            raise _BadRecord("bad_conversation", f"{key}[{i}] has unknown role {t.get(role_key)!r}")
        msgs.append({"role": role, "content": _text(t.get(content_key), f"{key}[{i}].{content_key}")})
    system = ""
    if msgs[0]["role"] == "system":
        system = msgs.pop(0)["content"]
    if len(msgs) < 2 or msgs[-1]["role"] != "assistant" or msgs[-2]["role"] != "user":
        raise _BadRecord("bad_conversation", "the conversation must end with a user turn followed by an assistant turn")
    history = msgs[:-2]
    for i, m in enumerate(history):
        if m["role"] != ("user", "assistant")[i % 2]:
            raise _BadRecord("bad_conversation", "earlier turns must alternate user, assistant (a system message may only come first)")
    return system, msgs[-2]["content"], msgs[-1]["content"], history


def parse_record(obj: Any) -> dict[str, str]:
    """One JSON record (alpaca, messages, ShareGPT or question/answer) as raw-row fields; raises `_BadRecord`."""
    if not isinstance(obj, dict):
        raise _BadRecord("unknown_format", f"a JSON {type(obj).__name__}, expected an object")
    if "messages" in obj:
        system, question, answer, history = _from_turns(obj["messages"], "role", "content", "messages")
    elif "conversations" in obj:
        system, question, answer, history = _from_turns(obj["conversations"], "from", "value", "conversations")
    elif "instruction" in obj and "output" in obj:
        instruction, extra = _text(obj["instruction"], "instruction"), _text(obj.get("input"), "input")
        question = f"{instruction}\n{extra}" if instruction.strip() and extra.strip() else instruction + extra
        answer, system = _text(obj["output"], "output"), _text(obj.get("system"), "system")
        history = []
        for i, pair in enumerate(obj.get("history") or []):
            if not (isinstance(pair, list) and len(pair) == 2):
                raise _BadRecord("bad_conversation", f"history[{i}] must be a [question, answer] pair")
            history += [{"role": "user", "content": _text(pair[0], f"history[{i}][0]")},
                        {"role": "assistant", "content": _text(pair[1], f"history[{i}][1]")}]
    elif "question" in obj and "answer" in obj:  # plain QA, e.g. our own prepared splits as JSON
        question, answer = _text(obj["question"], "question"), _text(obj["answer"], "answer")
        system, history = _text(obj.get("system"), "system"), []
    else:
        raise _BadRecord("unknown_format", f"keys {sorted(obj)[:8]}; expected alpaca (instruction/input/output), "
                                           "chat (messages), ShareGPT (conversations) or question/answer")
    rec = {"title": "", "ask": question, "answer": answer, "system": system,
           "history": json.dumps(history, ensure_ascii=False)}
    for key in ("department", "sub_department"):
        if isinstance(obj.get(key), str):
            rec[key] = obj[key]
    return rec


def _json_items(src: SourceFile, stream: TextStream) -> Iterator[tuple[int, str, Any]]:
    """(line, raw text, parsed object or the JSON error) per record."""
    lines = iter(stream)
    first = next(lines, "")
    if src.path.suffix.lower() == ".json" and first.lstrip("\ufeff \t\r\n").startswith("["):
        text = first + "".join(lines)  # a JSON array is read whole
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"not valid JSON: {e.msg}", src.path, e.lineno) from None
        for i, obj in enumerate(items, 1):
            yield i, "", obj
        return
    for i, line in enumerate(itertools.chain([first.lstrip("\ufeff")], lines), 1):
        if not line.strip():
            continue
        try:
            yield i, line.rstrip("\r\n"), json.loads(line)
        except json.JSONDecodeError as e:
            yield i, line.rstrip("\r\n"), e


def _json_batches(src: SourceFile, stream: TextStream, rejects: list[dict]) -> Iterator[pa.Table]:
    recs: list[dict] = []
    starts: list[int] = []
    for line, raw, obj in _json_items(src, stream):
        if isinstance(obj, json.JSONDecodeError):
            rejects.append(_reject(src, line, "bad_json", f"not valid JSON: {obj.msg} (column {obj.colno})",
                                   raw[:MAX_RAW_CHARS]))
            continue
        try:
            recs.append(parse_record(obj))
            starts.append(line)
        except _BadRecord as e:
            rejects.append(_reject(src, line, e.reason, str(e), (raw or json.dumps(obj, ensure_ascii=False))[:MAX_RAW_CHARS]))
        if len(recs) == BATCH_ROWS:
            yield _json_table(src, recs, starts, stream.bad, rejects)
            recs, starts = [], []
    if recs:
        yield _json_table(src, recs, starts, stream.bad, rejects)


def _json_table(src: SourceFile, recs: list[dict], starts: list[int], bad_bytes: int, rejects: list[dict]) -> pa.Table:
    if bad_bytes:
        recs, starts = _drop_undecodable(src, recs, starts, rejects, lambda r: "".join(r.values()))
    n = len(recs)
    columns = {c: pa.array([r.get(c, "") for r in recs], pa.string())
               for c in ("title", "ask", "answer", "sub_department", "system", "history")}
    columns["department"] = pa.array([r.get("department") or src.department for r in recs], pa.string())
    columns["source_file"] = pa.repeat(src.name, n)
    columns["source_line"] = pa.array(starts, pa.int64())
    columns["source_offset"] = columns["source_length"] = pa.nulls(n, pa.int64())
    return pa.table({f.name: columns[f.name] for f in RAW_SCHEMA}, schema=RAW_SCHEMA)


# ----------------------------------------------------------------------------- one file, many files

def read_file(src: SourceFile, transform: Transform | None = None, spill: Path | None = None) -> FileResult:
    """Parse one file in batches (in a worker process when there are several files).

    ``transform`` runs on each batch where it was parsed; it returns the new table or (table, extra), and
    extras are kept in `FileResult.extras` (merged by ``transform.combine`` when it has one). With
    ``spill``, the batches are written there as an Arrow IPC file instead of being returned, so a worker
    holds one batch at a time and the parent maps the file without copying it.
    """
    stream = TextStream(src.path)
    rejects: list[dict] = []
    batches = (_csv_batches if src.kind == "csv" else _json_batches)(src, stream, rejects)
    tables: list[pa.Table] = []
    extras: list = []
    writers: list = []
    sinks: list = []
    rows = 0
    try:
        for raw in batches:
            out = raw
            if transform is not None:
                out = transform(raw)
                if isinstance(out, tuple):
                    out, extra = out
                    extras.append(extra)
            rows += out.num_rows
            if spill is None:
                tables.append(out)
                continue
            # The original texts go to a file of their own: they are read again only for rejected rows. Rows
            # Arrow's reader took leave them out (nulls): `original_texts` reads them from the file itself.
            original = out.select(list(RAW_TEXT + RAW_PLACE))
            if original["source_offset"].null_count == 0:
                for i, name in enumerate(RAW_TEXT):
                    original = original.set_column(i, name, pa.nulls(out.num_rows, pa.string()))
            parts = (out.drop_columns(list(RAW_TEXT + RAW_PLACE)), original)
            if not writers:
                sinks = [SmallWrites(path) for path in spill_paths(spill)]
                writers = [pa.ipc.new_file(sink, part.schema) for sink, part in zip(sinks, parts)]
            for writer, part in zip(writers, parts):
                writer.write_table(part)
    finally:
        for writer in writers:
            writer.close()
        for sink in sinks:
            sink.close()
    spans = [r["raw"] for r in rejects if isinstance(r["raw"], tuple)]
    if spans:
        texts = stream.lines(spans)
        for r in rejects:
            if isinstance(r["raw"], tuple):
                r["raw"] = texts[r["raw"]]
    release_memory()
    if rows == 0:
        if rejects:
            first = rejects[0]
            raise DataError(f"no usable rows: {len(rejects)} rejected, the first for {first['reason']} "
                            f"({first['detail']})", src.path, first["source_line"])
        raise DataError("no data rows" + (" (only a header)" if src.kind == "csv" else ""), src.path)
    if extras and hasattr(transform, "combine"):
        extras = [transform.combine(extras)]
    table = None if spill is not None else (pa.concat_tables(tables) if len(tables) > 1 else tables[0])
    return FileResult(src, table, rejects, stream.sha256.hexdigest(), stream.encoding, stream.size, extras, spill, rows,
                      stream.header, stream.mtime_ns)


def original_texts(source: FileResult, offsets: np.ndarray, lengths: np.ndarray) -> pa.Table:
    """The original title, ask and answer of the records at ``offsets`` (``lengths`` bytes each) of a CSV
    file Arrow's reader took them from (`RAW_PLACE`): read again and parsed the same way.

    Raises if the file changed since it was read.
    """
    import mmap

    path = source.file.path
    st = path.stat()
    if (st.st_size, st.st_mtime_ns) != (source.bytes, source.mtime_ns):
        raise DataError("the file changed while it was being prepared; run again", path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        records = b"\n".join(mm[o:o + n] for o, n in zip(offsets.tolist(), lengths.tolist()))
    if source.encoding == "gb18030":
        records = gb18030_to_utf8(records)
    names = list(source.header)
    table = _arrow_read(records, names, check_utf8=source.encoding != "gb18030")
    if table.num_rows != len(offsets):
        raise RuntimeError(f"{path}: read {table.num_rows} records again where {len(offsets)} were asked for")
    return pa.table({name: table[name] if name in names else pa.repeat("", len(offsets)) for name in RAW_TEXT})


def release_memory() -> None:
    """Hand freed memory back to the OS (a worker's resident size counts while it waits for the next file)."""
    import gc

    gc.collect(1)  # what the task made; the libraries' long-lived objects (generation 2) are not walked again
    pa.default_memory_pool().release_unused()
    _trim()


@functools.cache
def _libc():
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return None


PR_SET_THP_DISABLE, PR_GET_THP_DISABLE = 41, 42  # prctl(2)


@contextmanager
def without_huge_pages() -> Iterator[bool]:
    """Transparent huge pages off for this process, and for the processes it starts, while the block runs.

    numpy (arrays from 4 MB) and Arrow's mimalloc (its arenas) ask Linux for huge pages. A fresh huge page
    is zeroed whole, 2 MB at once; where the kernel hands free memory back to the hypervisor (free page
    reporting: many virtual machines), a huge page freed for a second or two is handed back, and the
    next one costs host faults as well: filling 1 GB of new numpy memory took 7.1 s here, against 0.8 s in
    plain pages (`bench/fresh_memory.py`). On the benchmark corpus huge pages took 5.6 of `prepare`'s 37
    CPU-seconds (`perf`: `do_huge_pmd_anonymous_page`); without them it ran 3 s faster. The flag is
    inherited by child processes (fork and exec), so the load workers started inside get it too.
    Yields whether the flag could be set (Linux only); the previous setting is restored at the end.
    """
    libc = _libc()
    before = libc.prctl(PR_GET_THP_DISABLE, 0, 0, 0, 0) if libc is not None and hasattr(libc, "prctl") else -1
    if before < 0:  # not Linux, or a kernel without the flag (before 3.15)
        yield False
        return
    libc.prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0)
    try:
        yield True
    finally:
        libc.prctl(PR_SET_THP_DISABLE, before & 1, before & ~1, 0, 0)  # bit 1: the "except advised" flag


def _trim() -> None:
    """glibc keeps freed heap pages (numpy temporaries, Python strings of a batch): return them."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def load(input: Path, department: str | None = None, *, executor: Executor | None = None,
         transform: Transform | None = None, spill_dir: Path | None = None,
         on_file: Callable[[FileResult], None] | None = None) -> LoadResult:
    """Read every file under ``input``; with an ``executor`` (a process pool) files are parsed in parallel.

    ``transform`` (a picklable function of a table) is applied to each batch of rows where they were
    read, so row-local cleaning shares the parallelism. With ``spill_dir``, each file's rows go to Arrow
    IPC files there (`spill_paths`) and the result's table is None: read the columns you need with
    `read_ipc` / `ipc_batches` (the original texts of the rows Arrow's reader took with `original_texts`).
    """
    files = discover(input, department)
    spills = [None if spill_dir is None else Path(spill_dir) / f"part-{i:04d}.arrow" for i in range(len(files))]
    if executor is None or len(files) == 1:
        results = []
        for f, spill in zip(files, spills):
            results.append(read_file(f, transform, spill))
            if on_file:
                on_file(results[-1])
    else:
        results = _read_parallel(files, spills, executor, transform, on_file)
    if spill_dir is not None:
        return LoadResult(None, [rej for r in results for rej in r.rejects], results)
    tables = [r.table for r in results]
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    rejects = [rej for r in results for rej in r.rejects]
    return LoadResult(table, rejects, results)


def read_ipc(path: Path, columns: list[str] | None = None) -> pa.Table:
    """An Arrow IPC file's ``columns`` (all by default), read into memory (only those columns' bytes)."""
    return pa.concat_tables(list(ipc_batches(path, columns)))


def ipc_batches(path: Path, columns: list[str] | None = None) -> Iterator[pa.Table]:
    """An Arrow IPC file's record batches, one table at a time, with only ``columns`` read from disk.

    Read, not mapped: a mapped page stays in the process's resident memory once touched.
    """
    with pa.OSFile(str(path)) as f:
        schema = pa.ipc.open_file(f).schema
        options = None
        if columns is not None:
            options = pa.ipc.IpcReadOptions(included_fields=[schema.get_field_index(c) for c in columns])
        reader = pa.ipc.open_file(f, options=options)
        if reader.num_record_batches == 0:
            yield (schema if columns is None else pa.schema([schema.field(c) for c in columns])).empty_table()
        for i in range(reader.num_record_batches):
            t = pa.Table.from_batches([reader.get_batch(i)])
            yield t if columns is None else t.select(columns)


def _read_parallel(files: list[SourceFile], spills: list, executor: Executor, transform, on_file) -> list[FileResult]:
    # Largest files first so the workers finish together; results come back in input order.
    order = sorted(range(len(files)), key=lambda i: -files[i].path.stat().st_size)
    out: list[FileResult | None] = [None] * len(files)
    futures = {executor.submit(read_file, files[i], transform, spills[i]): i for i in order}
    try:
        for fut in as_completed(futures):
            out[futures[fut]] = fut.result()
            if on_file:
                on_file(out[futures[fut]])
    except BaseException:
        for fut in futures:
            fut.cancel()
        raise
    return out


WRITE_PIECE = 1 << 20  # bytes per write() of `SmallWrites`


class SmallWrites(io.RawIOBase):
    """A binary file whose writes reach the OS at most `WRITE_PIECE` bytes at a time (for Arrow's writers).

    Linux's page cache sizes its folios to the write: a 2 MB write takes a 2 MB block of free memory. Where
    the kernel hands free memory back to the hypervisor (free page reporting, usual on virtual machines),
    free 2 MB blocks are exactly what it hands back, so each such write waits for the host to supply the
    memory again. Here, 1 GB of Arrow IPC batches (each column buffer one write) took 3.4 s to write, and
    0.5 s in 1 MB writes (`bench/fresh_memory.py`). Writes of 1 MB cost no more anywhere else.
    """

    def __init__(self, path: str | Path):
        super().__init__()
        self._file = open(path, "wb", buffering=0)

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            done += self._file.write(view[done:done + WRITE_PIECE])
        return len(view)

    def close(self) -> None:
        if not self.closed:
            self._file.close()
        super().close()


def spill_paths(spill: Path) -> tuple[Path, Path]:
    """The two Arrow files of a spilled file: every column but the original texts, and those texts."""
    return spill, spill.with_suffix(".raw.arrow")


# The environment the pool's workers start with (a variable the user set wins). Each worker is one of the
# cores already, so its BLAS (the classifier) runs on one thread. And mimalloc, Arrow's allocator, would
# hand a batch's freed pages back to the OS after 10 ms: the next batch then faults them in and the kernel
# zeroes them again, which costs more than the parsing where fresh pages are dear (virtual machines that
# return free memory to the host). A worker keeps them a second, for the next batches; `release_memory`
# still returns them between tasks.
WORKER_ENV = {"MIMALLOC_PURGE_DELAY": "1000", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}


def process_pool(workers: int) -> Executor:
    """A pool of fresh interpreters (spawned, not forked: the parent may hold Arrow/Rayon threads).

    The workers start now, with `WORKER_ENV`; this process's environment is left as it was.
    """
    import os

    pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_worker_started)
    saved = {k: os.environ.get(k) for k in WORKER_ENV}
    try:
        os.environ.update({k: v for k, v in WORKER_ENV.items() if saved[k] is None})
        for _ in range(workers):  # with no idle worker, each submit spawns one
            pool.submit(int)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
    return pool


def _worker_started() -> None:
    # Automatic garbage collection would walk every object of the imported libraries again and again;
    # the tasks make few reference cycles, and `release_memory` collects them after each task.
    import atexit
    import gc
    import os

    gc.disable()
    # When the pool shuts down, a worker has sent its last result and multiprocessing has already flushed
    # and closed what it uses; tearing down the interpreter (every module, every object of numba,
    # scikit-learn and Arrow) then took 0.4 s of the caller's time. The OS frees the memory either way.
    # (The exit status of a pool's worker is not read: a worker that dies early breaks the pool instead.)
    atexit.register(os._exit, 0)
