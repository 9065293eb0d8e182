"""`medtune data download`: offline failure, resumable transfer and verification, against a local server only."""
from __future__ import annotations

import csv
import io
import socket
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from medtune.cli import main
from medtune.data import download as dl
from medtune.errors import DataError, MedtuneError

ROWS_PER_FOLDER = 40


class RangeHandler(SimpleHTTPRequestHandler):
    """Static files with HTTP Range support (http.server lacks it); can drop a transfer half-way once."""

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        server = self.server
        server.requests.append((self.path, self.headers.get("Range")))
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = 0
        rng = self.headers.get("Range")
        if rng:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if path.name in server.drop_once:
            server.drop_once.discard(path.name)
            self.wfile.write(body[: len(body) // 3])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture(scope="module")
def fixture_tree(tmp_path_factory, sample_csv) -> tuple[Path, dict[str, int]]:
    """A small Data_数据/ tree in the repository's layout: ROWS_PER_FOLDER sample rows per department."""
    root = tmp_path_factory.mktemp("toyhom-remote")
    with open(sample_csv, encoding="gb18030", newline="") as f:
        header, *rows = list(csv.reader(f))
    expected = {}
    for i, (folder, name) in enumerate(dl.FILES.items()):
        part = rows[i * ROWS_PER_FOLDER:(i + 1) * ROWS_PER_FOLDER]
        if i == 0:  # an answer spanning lines: records must be counted by a CSV parser, not by lines
            part[0] = part[0][:3] + [part[0][3] + "\n第二行。"]
        buf = io.StringIO(newline="")
        csv.writer(buf, lineterminator="\r\n").writerows([header, *part])
        dest = root / dl.DATA_DIR / folder / name
        dest.parent.mkdir(parents=True)
        dest.write_bytes(buf.getvalue().encode("gb18030"))
        expected[folder] = len(part)
    return root, expected


@pytest.fixture()
def server(fixture_tree):
    root, _ = fixture_tree
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(RangeHandler, directory=str(root)))
    httpd.requests, httpd.drop_once = [], set()
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    """A proxy set in the environment would be dialled instead of the (local) source."""
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_offline_closed_port_fails_fast_with_manual_instructions(tmp_path):
    t0 = time.perf_counter()
    with pytest.raises(MedtuneError) as err:
        dl.fetch(tmp_path, f"http://127.0.0.1:{_closed_port()}/repo")
    assert time.perf_counter() - t0 < 3
    msg = str(err.value)
    assert "no network" in msg
    for folder, name in dl.FILES.items():
        assert str(tmp_path / dl.DATA_DIR / folder / name) in msg
    assert f"medtune data prepare --input {tmp_path / dl.DATA_DIR}" in msg
    assert not (tmp_path / dl.DATA_DIR).exists() or not any((tmp_path / dl.DATA_DIR).rglob("*.csv"))


def test_offline_dns_failure_default_source(tmp_path, monkeypatch):
    def no_dns(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    def no_connect(*args, **kwargs):
        raise AssertionError("the test tried to open a real connection")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(socket.socket, "connect", no_connect)
    t0 = time.perf_counter()
    assert main(["data", "download", "--output", str(tmp_path)]) == 2
    assert time.perf_counter() - t0 < 3
    with pytest.raises(MedtuneError, match="cannot resolve the host name"):
        dl.download(dl.DownloadArgs(output=tmp_path))


def test_download_resumes_and_verifies(tmp_path, server, fixture_tree):
    remote, expected = fixture_tree
    base = f"http://127.0.0.1:{server.server_port}"
    folders = list(dl.FILES)
    # A partial file left by an earlier run, and one whose .part is already whole.
    half = remote / dl.DATA_DIR / folders[1] / dl.FILES[folders[1]]
    whole = remote / dl.DATA_DIR / folders[2] / dl.FILES[folders[2]]
    for src, n in ((half, half.stat().st_size // 2), (whole, whole.stat().st_size)):
        part = tmp_path / dl.DATA_DIR / src.parent.name / (src.name + ".part")
        part.parent.mkdir(parents=True)
        part.write_bytes(src.read_bytes()[:n])
    server.drop_once.add(dl.FILES[folders[3]])  # this transfer breaks off half-way

    with pytest.raises(MedtuneError, match="run the command again to resume"):
        dl.fetch(tmp_path, base, expected=expected)
    dropped = tmp_path / dl.DATA_DIR / folders[3] / (dl.FILES[folders[3]] + ".part")
    kept = dropped.stat().st_size
    assert 0 < kept < (remote / dl.DATA_DIR / folders[3] / dl.FILES[folders[3]]).stat().st_size

    counts = dl.fetch(tmp_path, base, expected=expected)
    assert counts == expected
    ranges = {path.rsplit("/", 2)[-2]: rng for path, rng in server.requests if rng}
    from urllib.parse import quote
    assert ranges[quote(folders[1])] == f"bytes={half.stat().st_size // 2}-"
    assert ranges[quote(folders[2])] == f"bytes={whole.stat().st_size}-"
    assert ranges[quote(folders[3])] == f"bytes={kept}-"
    for folder, name in dl.FILES.items():
        got = tmp_path / dl.DATA_DIR / folder / name
        assert got.read_bytes() == (remote / dl.DATA_DIR / folder / name).read_bytes()
        assert not got.with_name(name + ".part").exists()

    # Everything present: verified again without a single request (also what a by-hand placement gets).
    n = len(server.requests)
    assert dl.fetch(tmp_path, f"http://127.0.0.1:{_closed_port()}", expected=expected) == expected
    assert len(server.requests) == n


def _copy_tree(remote: Path, dest: Path) -> Path:
    for src in (remote / dl.DATA_DIR).rglob("*.csv"):
        out = dest / dl.DATA_DIR / src.parent.name / src.name
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(src.read_bytes())
    return dest / dl.DATA_DIR


def test_verify_counts_records_not_lines(tmp_path, fixture_tree):
    remote, expected = fixture_tree
    root = _copy_tree(remote, tmp_path)
    first = next(root.rglob(dl.FILES[next(iter(dl.FILES))]))
    assert first.read_bytes().count(b"\n") == expected[next(iter(dl.FILES))] + 2  # header + one line break inside
    assert dl.verify(root, expected) == expected


def test_verify_catches_wrong_row_count(tmp_path, fixture_tree):
    remote, expected = fixture_tree
    root = _copy_tree(remote, tmp_path)
    folder = "Oncology_肿瘤科"
    wrong = {**expected, folder: expected[folder] + 1}
    with pytest.raises(DataError) as err:
        dl.verify(root, wrong)
    msg = str(err.value)
    assert f"{dl.FILES[folder]}: {expected[folder]:,} rows, the published count is {expected[folder] + 1:,}" in msg
    assert "1 problem(s)" in msg


def test_verify_catches_undecodable_and_missing_files(tmp_path, fixture_tree):
    remote, expected = fixture_tree
    root = _copy_tree(remote, tmp_path)
    bad = root / "IM_内科" / dl.FILES["IM_内科"]
    lines = bad.read_bytes().split(b"\n")
    lines[5] = lines[5][:10] + b"\xff\xfe" + lines[5][10:]  # 0xFF never starts a GB18030 character
    bad.write_bytes(b"\n".join(lines))
    (root / "Surgical_外科" / dl.FILES["Surgical_外科"]).unlink()
    with pytest.raises(DataError) as err:
        dl.verify(root, expected)
    msg = str(err.value)
    assert f"{bad}:6: not decodable as GB18030" in msg
    assert f"{root / 'Surgical_外科'}: no CSV file" in msg
    assert "2 problem(s)" in msg


def test_lfs_pointer_from_unknown_host_is_an_error(tmp_path, server, fixture_tree):
    remote, _ = fixture_tree
    pointer = remote / "pointer.csv"
    pointer.write_bytes(dl.LFS_MAGIC + b"\noid sha256:" + b"0" * 64 + b"\nsize 123\n")
    with pytest.raises(DataError, match="Git LFS pointer"):
        dl.fetch_file(f"http://127.0.0.1:{server.server_port}/pointer.csv", tmp_path / "x.csv", 5)
