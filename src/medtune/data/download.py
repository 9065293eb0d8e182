"""`medtune data download`: fetch the full Toyhom Chinese medical dialogue dataset, resumably, and check it.

The six department CSVs (GB18030, 792,099 rows) are fetched over HTTPS from the public GitHub repository
Toyhom/Chinese-medical-dialogue-data into ``OUTPUT/Data_数据/<folder>/<file>`` — the repository's own
layout, so a ``git clone`` of it works the same. An interrupted transfer is kept as ``<file>.part`` and
resumed with an HTTP Range request on the next run. Each file is then checked: present, decodable as
GB18030, with the expected header and the published number of CSV records (quoted answers may span
lines, so records are counted by a CSV parser, not by lines).

    medtune data download --output data
    medtune data prepare --input data/Data_数据 --output data/prepared

Without network it fails within seconds, saying how to place the files by hand.
"""
from __future__ import annotations

import codecs
import csv
import dataclasses
import hashlib
import logging
import os
import re
import socket
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Iterator, Mapping

from medtune.config import arg
from medtune.data import PUBLISHED_ROWS
from medtune.errors import DataError, MedtuneError

log = logging.getLogger(__name__)

REPO_URL = "https://github.com/Toyhom/Chinese-medical-dialogue-data"
# Pinned to the commit the shared sample came from (2023-08-18), so the published row counts hold.
DEFAULT_SOURCE = "https://raw.githubusercontent.com/Toyhom/Chinese-medical-dialogue-data/26724a4357fcd142f0cab81188cacf1a2dd8a827"
DATA_DIR = "Data_数据"
# The CSV in each department folder of the repository (names carry the crawl's row ranges).
FILES = {
    "Andriatria_男科": "男科5-13000.csv",
    "IM_内科": "内科5000-33000.csv",
    "OAGD_妇产科": "妇产科6-28000.csv",
    "Oncology_肿瘤科": "肿瘤科5-10000.csv",
    "Pediatric_儿科": "儿科5-14000.csv",
    "Surgical_外科": "外科5-14000.csv",
}
HEADER = ["department", "title", "ask", "answer"]
ENCODING = "gb18030"
CONNECT_TIMEOUT = 5.0  # seconds; an offline machine fails here, fast
READ_TIMEOUT = 60.0    # seconds without a byte before a transfer counts as stalled
CHUNK = 1 << 20
LFS_MAGIC = b"version https://git-lfs.github.com/spec/v1"


@dataclasses.dataclass
class DownloadArgs:
    """Where to put the dataset and where to fetch it from."""

    output: Path = arg(Path("data"), f"directory that receives {DATA_DIR}/<department folder>/<file>.csv")
    source: str = arg(DEFAULT_SOURCE, f"URL under which {DATA_DIR}/... is fetched (a mirror, or another commit)")


def download(args: DownloadArgs) -> dict[str, int]:
    """Download the six department CSVs into OUTPUT/Data_数据/ (resuming partial files), then verify them.

    Files already present are not fetched again, so placing them by hand and running this command
    checks them offline. Returns the verified row count per department folder.
    """
    return fetch(args.output, args.source)


def fetch(
    output: Path,
    source: str = DEFAULT_SOURCE,
    *,
    files: Mapping[str, str] = FILES,
    expected: Mapping[str, int] = PUBLISHED_ROWS,
    connect_timeout: float = CONNECT_TIMEOUT,
    read_timeout: float = READ_TIMEOUT,
) -> dict[str, int]:
    """`download` with the file table, the expected row counts and the timeouts open (tests set them)."""
    root = Path(output) / DATA_DIR
    missing = {folder: name for folder, name in files.items() if _find_csv(root / folder, name) is None}
    if missing:
        check_reachable(source, connect_timeout, root, files)
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                   TransferSpeedColumn)

        columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   TimeRemainingColumn())
        with Progress(*columns) as progress:
            for folder, name in missing.items():
                url = f"{source.rstrip('/')}/{urllib.parse.quote(f'{DATA_DIR}/{folder}/{name}')}"
                fetch_file(url, root / folder / name, read_timeout, progress)
    counts = verify(root, expected, files)
    total = sum(counts.values())
    log.info("verified %d files, %d rows in all, in %s", len(counts), total, root)
    log.info("next: medtune data prepare --input %s --output %s", root, Path(output) / "prepared")
    return counts


# ----------------------------------------------------------------------------- network

def manual_instructions(root: Path, files: Mapping[str, str] = FILES) -> str:
    """How to place the dataset by hand (the message an offline user gets)."""
    layout = "\n".join(f"  {root / folder / name}" for folder, name in files.items())
    return (
        f"To place the files by hand, download the folder {DATA_DIR}/ of {REPO_URL}\n"
        f"(e.g. `git clone {REPO_URL}` on a machine with internet) and lay the six GB18030 CSVs out as:\n"
        f"{layout}\n"
        f"(another *.csv name works if it is the only CSV in its folder). Then run\n"
        f"  medtune data download --output {root.parent}   # checks the files, fetches nothing\n"
        f"  medtune data prepare --input {root} --output {root.parent / 'prepared'}"
    )


def check_reachable(source: str, timeout: float, root: Path, files: Mapping[str, str] = FILES) -> None:
    """Open (and close) one TCP connection to the source's host, or its proxy; raise MedtuneError at once if not."""
    parts = urllib.parse.urlsplit(source)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise MedtuneError(f"--source must be an http(s) URL, got {source!r}")
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        p = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = p.hostname or host, p.port or 8080
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:  # gaierror (no DNS), refused, unreachable, timeout
        why = "cannot resolve the host name" if isinstance(e, socket.gaierror) else f"{type(e).__name__}: {e}"
        raise MedtuneError(f"no network: cannot reach {host}:{port} ({why}).\n"
                           + manual_instructions(root, files)) from None


def fetch_file(url: str, dest: Path, timeout: float, progress=None) -> Path:
    """Download ``url`` to ``dest`` through ``dest.part``, resuming a partial ``.part`` with HTTP Range.

    A Git LFS pointer served in place of the data is followed to GitHub's media URL and checked
    against the size and sha256 it names.
    """
    _transfer(url, dest, timeout, progress)
    pointer = _lfs_pointer(dest)
    if pointer is not None:
        media = _media_url(url)
        if media is None:
            raise DataError(f"got a Git LFS pointer instead of the data from {url}", dest)
        dest.unlink()
        _transfer(media, dest, timeout, progress)
        size, digest = dest.stat().st_size, _sha256(dest)
        if (size, digest) != (pointer["size"], pointer["oid"]):
            dest.unlink()
            raise DataError(f"downloaded {size} bytes with sha256 {digest}; the LFS pointer names "
                            f"{pointer['size']} bytes, sha256 {pointer['oid']}; run the command again", dest)
    return dest


def _transfer(url: str, dest: Path, timeout: float, progress=None) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "medtune", "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left past what we have: the .part may be whole
            total = _range_total(e.headers.get("Content-Range"))
            if total == have:
                os.replace(part, dest)
                return
            part.unlink()  # the .part is longer than the file: start over
            return _transfer(url, dest, timeout, progress)
        raise MedtuneError(f"HTTP {e.code} {e.reason} for {url}") from None
    except (urllib.error.URLError, OSError) as e:
        raise MedtuneError(f"cannot download {url}: {getattr(e, 'reason', e)}; run the command again to resume") from None
    with resp:
        if resp.status == 206:
            start = _range_start(resp.headers.get("Content-Range"))
            if start != have:
                raise MedtuneError(f"{url}: server resumed at byte {start}, expected {have}; delete {part} and retry")
            total = _range_total(resp.headers.get("Content-Range"))
            mode = "ab"
        else:  # 200: the whole file (a server that ignores Range restarts us from zero)
            length = resp.headers.get("Content-Length")
            total, have, mode = (int(length) if length else None), 0, "wb"
        task = progress.add_task(dest.name, total=total, completed=have) if progress is not None else None
        try:
            with open(part, mode) as f:
                while chunk := resp.read(CHUNK):
                    f.write(chunk)
                    have += len(chunk)
                    if task is not None:
                        progress.update(task, completed=have)
        except OSError as e:  # dropped connection, stalled read: keep the .part for the next run
            raise MedtuneError(f"download of {url} interrupted at {have} bytes ({e}); "
                               f"run the command again to resume from {part}") from None
    if total is not None and have != total:
        raise MedtuneError(f"download of {url} stopped at {have} of {total} bytes; "
                           f"run the command again to resume from {part}")
    os.replace(part, dest)


def _range_start(header: str | None) -> int | None:
    m = re.match(r"bytes (\d+)-\d+/", header or "")
    return int(m.group(1)) if m else None


def _range_total(header: str | None) -> int | None:
    m = re.search(r"/(\d+)\s*$", header or "")
    return int(m.group(1)) if m else None


def _lfs_pointer(path: Path) -> dict | None:
    if path.stat().st_size > 1024:
        return None
    data = path.read_bytes()
    if not data.startswith(LFS_MAGIC):
        return None
    fields = dict(line.split(" ", 1) for line in data.decode("ascii", "replace").splitlines() if " " in line)
    return {"oid": fields.get("oid", "").removeprefix("sha256:"), "size": int(fields.get("size", -1))}


def _media_url(url: str) -> str | None:
    prefix = "https://raw.githubusercontent.com/"
    return "https://media.githubusercontent.com/media/" + url[len(prefix):] if url.startswith(prefix) else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- verification

def _find_csv(folder: Path, name: str) -> Path | None:
    if (folder / name).is_file():
        return folder / name
    csvs = sorted(folder.glob("*.csv")) if folder.is_dir() else []
    return csvs[0] if len(csvs) == 1 else None


def _decoded_lines(path: Path, problems: list[str]) -> Iterator[str]:
    """The file's lines decoded strictly as GB18030; an undecodable line is recorded (by number) and skipped."""
    decode = codecs.getdecoder(ENCODING)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                yield decode(raw)[0]
            except UnicodeDecodeError as e:
                problems.append(f"{path}:{lineno}: not decodable as GB18030 (byte {e.start}: {raw[e.start:e.start + 4]!r})")
                if len(problems) > 20:
                    return


def count_records(path: Path, problems: list[str]) -> int:
    """CSV records after the header (blank lines excluded); header and decoding problems go to ``problems``."""
    before = len(problems)
    reader = csv.reader(_decoded_lines(path, problems))
    try:
        header = next(reader, None)
        if header is None:
            problems.append(f"{path}: empty file")
            return 0
        header = [h.strip().lstrip("\ufeff") for h in header]
        if header != HEADER:
            problems.append(f"{path}:1: header is {','.join(header)!r}, expected {','.join(HEADER)!r}")
        rows = sum(1 for record in reader if record)
    except csv.Error as e:
        problems.append(f"{path}:{reader.line_num}: broken CSV ({e})")
        return 0
    return rows if len(problems) == before else 0


def verify(root: Path, expected: Mapping[str, int] = PUBLISHED_ROWS,
           files: Mapping[str, str] = FILES) -> dict[str, int]:
    """Check every department folder under ``root`` (a ``Data_数据`` directory); all problems raised together.

    Returns the record count per folder. Raises DataError naming each missing file, undecodable line,
    wrong header and wrong row count.
    """
    from rich.progress import track

    root = Path(root)
    problems: list[str] = []
    counts: dict[str, int] = {}
    for folder in track(list(expected), description="verifying", transient=True):
        path = _find_csv(root / folder, files.get(folder, ""))
        if path is None:
            problems.append(f"{root / folder}: no CSV file (expected {files.get(folder, '*.csv')})")
            continue
        before = len(problems)
        rows = count_records(path, problems)
        if len(problems) == before and rows != expected[folder]:
            problems.append(f"{path}: {rows:,} rows, the published count is {expected[folder]:,} "
                            "(incomplete or different file; delete it and download again)")
        counts[folder] = rows
    if problems:
        raise DataError(f"{len(problems)} problem(s) in the downloaded dataset:\n  " + "\n  ".join(problems)
                        + "\n" + manual_instructions(root, files), root)
    return counts
