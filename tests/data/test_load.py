"""Loading: the six-folder layout, single CSVs, JSONL formats, encodings, and every kind of bad input."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from medtune.data import TOP_DEPARTMENTS
from medtune.data.load import RAW_SCHEMA, discover, load, process_pool
from medtune.errors import DataError

ROWS = [["心血管科", "高血压能吃党参吗", "我有高血压，能吃党参吗？", "可以适量食用党参，注意监测血压。"],
        ["消化科", "胃痛怎么办", "最近胃痛，吃饭后更明显", "建议少食多餐，必要时做胃镜检查。"],
        ["神经科", "头痛", "经常头痛失眠", "注意休息，规律作息，必要时就医。"]]


# ----------------------------------------------------------------------------- layouts

def test_six_folder_layout_from_the_folder_or_its_parent(six_folder_root: Path, sample_rows):
    for path in (six_folder_root, six_folder_root.parent):
        res = load(path, department="ignored")
        t = res.table
        assert t.schema == RAW_SCHEMA
        assert t.num_rows == res.rows_read == len(sample_rows)
        assert sorted(set(t["department"].to_pylist())) == sorted(TOP_DEPARTMENTS.values())
        assert set(t["sub_department"].to_pylist()) == {r[0] for r in sample_rows}
        assert all(f.encoding == "gb18030" for f in res.files) and len(res.files) == 6
    first = [r for r in t.to_pylist() if r["source_file"] == "Data_数据/Andriatria_男科/男科.csv"]
    assert [(r["sub_department"], r["title"], r["ask"], r["answer"]) for r in first] == [tuple(r) for r in sample_rows[0::6]]


def test_source_lines_point_at_the_record(sample_csv: Path):
    """Line numbers survive records whose quoted fields span several lines (the sample has some)."""
    t = load(sample_csv).table
    lines = sample_csv.read_bytes().decode("gb18030").split("\n")
    multi = 0
    for row in t.to_pylist():
        line = lines[row["source_line"] - 1]
        assert line.startswith(row["sub_department"] + ","), row["source_line"]
        multi += "\n" in row["answer"] or "\n" in row["ask"]
    assert multi > 0 and t.num_rows == 7644


def test_single_csv_department_flag_and_directory_of_files(tmp_path: Path, write_csv):
    path = write_csv("one.csv", ROWS)
    t = load(path, department="内科").table
    assert t["department"].to_pylist() == ["内科"] * 3 and t["source_line"].to_pylist() == [2, 3, 4]
    assert load(path).table["department"].to_pylist() == [""] * 3
    write_csv("more/two.csv", ROWS[:1], encoding="utf-8")
    (tmp_path / "more" / "three.jsonl").write_text(json.dumps({"instruction": "头晕", "output": "量血压"}, ensure_ascii=False))
    (tmp_path / "notes.txt").write_text("ignored")
    res = load(tmp_path, department="内科")
    assert [f.file.name for f in res.files] == ["more/three.jsonl", "more/two.csv", "one.csv"]
    assert res.table.num_rows == 5 and set(res.table["department"].to_pylist()) == {"内科"}


@pytest.mark.parametrize("encoding", ["gb18030", "gbk", "utf-8", "utf-8-sig"])
def test_encoding_detected_per_file(write_csv, encoding):
    res = load(write_csv("x.csv", ROWS, encoding=encoding))
    assert res.files[0].encoding == {"gbk": "gb18030"}.get(encoding, encoding)
    assert res.table["answer"].to_pylist() == [r[3] for r in ROWS]
    assert _texts_read_again(res) == len(ROWS)  # a BOM shifts no record's place


def _texts_read_again(res) -> int:
    """Check that the original texts of the rows Arrow's reader took, read again from the file at their
    place (`original_texts`), are the texts parsed; returns how many rows that was."""
    from medtune.data.load import RAW_PLACE, RAW_TEXT, original_texts

    t = res.table
    took = pa.array(np.flatnonzero(t["source_offset"].is_valid().to_numpy(zero_copy_only=False)))
    if len(took):
        again = original_texts(res.files[0], t["source_offset"].take(took).to_numpy(),
                               t["source_length"].take(took).to_numpy())
        assert again.equals(t.select(list(RAW_TEXT)).take(took).combine_chunks())
    assert t.select(list(RAW_PLACE)).take(took).drop_null().num_rows == len(took)
    return len(took)


def test_original_texts_refuse_a_file_changed_since_it_was_read(write_csv):
    from medtune.data.load import original_texts

    path = write_csv("x.csv", ROWS)
    res = load(path)
    offsets, lengths = res.table["source_offset"].to_numpy(), res.table["source_length"].to_numpy()
    assert original_texts(res.files[0], offsets, lengths)["ask"].to_pylist() == [r[2] for r in ROWS]
    path.write_bytes(path.read_bytes() + "科,题,问,答\n".encode("gb18030"))
    with pytest.raises(DataError, match="changed while it was being prepared"):
        original_texts(res.files[0], offsets, lengths)


def test_header_without_title_or_department(write_csv):
    t = load(write_csv("x.csv", [[r[2], r[3]] for r in ROWS], header=["ask", "answer"])).table
    assert t["title"].to_pylist() == [""] * 3 and t["sub_department"].to_pylist() == [""] * 3


def _environment(names: tuple[str, ...]) -> dict:
    import gc
    import os

    return {**{n: os.environ.get(n) for n in names}, "gc": gc.isenabled()}


def test_process_pool_starts_workers_with_its_environment(monkeypatch):
    import os

    from medtune.data.load import WORKER_ENV

    names = tuple(WORKER_ENV)
    for n in names:
        monkeypatch.delenv(n, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # what the user set wins
    with process_pool(2) as pool:
        seen = [pool.submit(_environment, names).result() for _ in range(4)]
    assert all(s == {**WORKER_ENV, "OMP_NUM_THREADS": "3", "gc": False} for s in seen)
    assert os.environ.get("OMP_NUM_THREADS") == "3"
    assert all(os.environ.get(n) is None for n in names if n != "OMP_NUM_THREADS")  # this process: as it was


def _huge_pages_disabled() -> int:
    import ctypes

    from medtune.data.load import PR_GET_THP_DISABLE

    return ctypes.CDLL("libc.so.6").prctl(PR_GET_THP_DISABLE, 0, 0, 0, 0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_THP_DISABLE) is Linux's")
def test_without_huge_pages_reaches_the_workers_and_is_undone():
    from medtune.data.load import without_huge_pages

    assert _huge_pages_disabled() == 0
    with without_huge_pages() as applied:
        assert applied and _huge_pages_disabled() == 1
        with process_pool(1) as pool:  # a spawned interpreter inherits the flag
            assert pool.submit(_huge_pages_disabled).result() == 1
    assert _huge_pages_disabled() == 0
    with pytest.raises(KeyError), without_huge_pages():
        raise KeyError("restored on the way out of an error too")
    assert _huge_pages_disabled() == 0


def test_small_writes_hand_the_os_at_most_a_piece_at_a_time(tmp_path: Path, monkeypatch):
    from medtune.data import load as module

    monkeypatch.setattr(module, "WRITE_PIECE", 1000)
    sizes: list[int] = []

    class Recorder:  # stands for the OS file: records each write and, like write(2) may, takes only part
        def __init__(self, f):
            self.f = f

        def write(self, data):
            sizes.append(len(data))
            return self.f.write(bytes(data)[:700])

        def close(self):
            self.f.close()

    table = pa.table({"text": ["头痛发热" * 2000, "", "咳嗽"] * 5, "n": list(range(15))})
    path = tmp_path / "t.arrow"
    sink = module.SmallWrites(path)
    sink._file = Recorder(sink._file)
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    sink.close()
    assert pa.ipc.open_file(str(path)).read_all().equals(table)
    assert max(sizes) == 1000 and path.stat().st_size > 100_000  # one buffer of ~120 KB went in pieces


def test_parallel_load_matches_sequential(six_folder_root: Path):
    with process_pool(2) as pool:
        parallel = load(six_folder_root, executor=pool)
    assert parallel.table.equals(load(six_folder_root).table)


# ----------------------------------------------------------------------------- JSONL

def test_jsonl_formats_and_multi_turn(tmp_path: Path):
    lines = [
        {"instruction": "高血压能吃党参吗", "input": "我62岁", "output": "可以适量。", "department": "心血管科"},
        {"instruction": "胃痛", "output": "少食多餐。", "system": "你是消化科医生。", "history": [["你好", "你好，请讲"]]},
        {"messages": [{"role": "system", "content": "你是儿科医生。"}, {"role": "user", "content": "宝宝发烧"},
                      {"role": "assistant", "content": "先物理降温"}, {"role": "user", "content": "39度呢"},
                      {"role": "assistant", "content": "及时就医"}]},
        {"conversations": [{"from": "human", "value": "失眠"}, {"from": "gpt", "value": "规律作息"}],
         "sub_department": "神经科"},
    ]
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\n\n", encoding="utf-8")
    res = load(path, department="内科")
    rows = res.table.to_pylist()
    assert not res.rejects and [r["source_line"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["ask"] == "高血压能吃党参吗\n我62岁" and rows[0]["department"] == "心血管科"
    assert rows[1]["system"] == "你是消化科医生。" and json.loads(rows[1]["history"]) == [
        {"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好，请讲"}]
    assert (rows[2]["ask"], rows[2]["answer"], rows[2]["system"]) == ("39度呢", "及时就医", "你是儿科医生。")
    assert json.loads(rows[2]["history"]) == [{"role": "user", "content": "宝宝发烧"},
                                              {"role": "assistant", "content": "先物理降温"}]
    assert (rows[3]["ask"], rows[3]["sub_department"], rows[3]["department"]) == ("失眠", "神经科", "内科")


def test_json_array_file(tmp_path: Path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([{"instruction": "头痛", "input": "", "output": "休息"}] * 2, ensure_ascii=False))
    t = load(path).table
    assert t["ask"].to_pylist() == ["头痛", "头痛"] and t["source_line"].to_pylist() == [1, 2]


def test_bad_jsonl_lines_are_rejected_with_reasons(tmp_path: Path):
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join([
        json.dumps({"instruction": "头痛", "output": "休息"}, ensure_ascii=False),
        '{"instruction": "broken',
        json.dumps({"prompt": "x", "completion": "y"}),
        json.dumps({"messages": [{"role": "user", "content": "只有问题"}]}, ensure_ascii=False),
        json.dumps({"conversations": [{"from": "alien", "value": "?"}, {"from": "gpt", "value": "!"}]}),
    ]), encoding="utf-8")
    res = load(path)
    assert res.table.num_rows == 1 and res.rows_read == 5
    got = {(r["source_line"], r["reason"]) for r in res.rejects}
    assert got == {(2, "bad_json"), (3, "unknown_format"), (4, "bad_conversation"), (5, "bad_conversation")}
    assert all(r["raw"] and r["source_file"] == "mixed.jsonl" for r in res.rejects)


# ----------------------------------------------------------------------------- bad input: whole-file errors

def _error(path: Path, *, line: int | None, words: str, field: str | None = None) -> DataError:
    with pytest.raises(DataError) as info:
        load(path)
    err = info.value
    assert str(path) in str(err) and words in str(err)
    assert err.line == line and err.field == field
    return err


def test_missing_column(write_csv):
    path = write_csv("x.csv", [[r[0], r[1], r[2]] for r in ROWS], header=["department", "title", "ask"])
    _error(path, line=1, words="missing column 'answer'", field="answer")


def test_empty_file_and_header_only(tmp_path: Path, write_csv):
    (tmp_path / "empty.csv").write_bytes(b"  \n")
    _error(tmp_path / "empty.csv", line=None, words="empty file")
    _error(write_csv("header.csv", []), line=None, words="no data rows")


def test_binary_file(tmp_path: Path):
    path = tmp_path / "x.csv"
    path.write_bytes("department,title,ask,answer\n内科,a,b,c\n".encode("gb18030") + b"PK\x03\x04\x00\x00\xff")
    _error(path, line=3, words="binary file")


def test_undecodable_file(tmp_path: Path):
    path = tmp_path / "x.csv"
    path.write_bytes(b"department,title,ask,answer\n" + b"a,b,c,\xff\xfe\x80\x81\n" * 50)
    _error(path, line=2, words="undecodable bytes")


def test_unclosed_quote_swallowing_the_rest(write_csv, tmp_path: Path):
    path = tmp_path / "x.csv"
    path.write_text('department,title,ask,answer\n内科,t,a,b\n内科,"t,a,b\n内科,t,a,b\n', encoding="utf-8")
    _error(path, line=3, words="never closed")


def test_directory_without_csv(tmp_path: Path):
    (tmp_path / "readme.txt").write_text("nothing here")
    with pytest.raises(DataError, match="no CSV"):
        load(tmp_path)
    with pytest.raises(DataError, match="no such file"):
        discover(tmp_path / "missing")
    with pytest.raises(DataError, match="unsupported file type"):
        load(tmp_path / "readme.txt")


def test_a_file_with_no_usable_row_is_an_error(write_csv):
    path = write_csv("x.csv", [["a", "b"], ["c", "d", "e", "f", "g"]])
    err = _error(path, line=2, words="no usable rows")
    assert "wrong_field_count" in str(err)


# ----------------------------------------------------------------------------- bad input: per-row rejects

def test_wrong_field_count_and_broken_quoting_rows_are_rejected(tmp_path: Path):
    path = tmp_path / "x.csv"
    path.write_text("department,title,ask,answer\n"
                    "内科,t1,a1,b1\n"
                    "内科,t2,a2\n"                       # too few fields
                    '内科,"t3"x,a3,b3\n'                 # text after a closing quote
                    "内科,t4,a4,b4,extra\n"              # too many
                    "内科,t5,a5,b5\n", encoding="utf-8")
    res = load(path)
    assert res.table["title"].to_pylist() == ["t1", "t5"] and res.table["source_line"].to_pylist() == [2, 6]
    got = [(r["source_line"], r["reason"]) for r in res.rejects]
    assert got == [(3, "wrong_field_count"), (4, "broken_quoting"), (5, "wrong_field_count")]
    assert res.rejects[0]["raw"] == "内科,t2,a2\n" and "3 fields, expected 4" in res.rejects[0]["detail"]
    assert res.rows_read == 5


def test_a_few_undecodable_bytes_reject_their_rows(tmp_path: Path):
    good = "department,title,ask,answer\n内科,头痛,经常头痛,注意休息\n".encode("gb18030")
    path = tmp_path / "x.csv"
    path.write_bytes(good + "内科,胃痛,胃".encode("gb18030") + b"\xff" + ",少吃\n内科,失眠,睡不着,规律作息\n".encode("gb18030"))
    res = load(path)
    assert res.files[0].encoding == "gb18030"
    assert [(r["source_line"], r["reason"]) for r in res.rejects] == [(3, "undecodable")]
    assert "\\xff" in res.rejects[0]["detail"] and res.table.num_rows == 2


def test_a_bad_byte_deep_in_a_utf8_file_rejects_its_row(tmp_path: Path):
    # Far past where the encoding is detected, in a piece Arrow's reader parses: its UTF-8 check finds it.
    rows = "".join(f"内科,头痛{i},经常头痛,注意休息\n" for i in range(20_000)).encode("utf-8")
    path = tmp_path / "x.csv"
    path.write_bytes("department,title,ask,answer\n".encode() + rows + "内科,胃痛,胃".encode() + b"\xff"
                     + ",少吃\n内科,失眠,睡不着,规律作息\n".encode())
    res = load(path)
    assert res.files[0].encoding == "utf-8"
    assert [(r["source_line"], r["reason"]) for r in res.rejects] == [(20_002, "undecodable")]
    assert res.table.num_rows == 20_001


def test_crlf_lines_and_quoted_line_breaks(tmp_path: Path):
    path = tmp_path / "x.csv"
    path.write_bytes("department,title,ask,answer\r\n内科,t1,\"问题\r\n第二行\",答1\r\n内科,t2,a2,答2\r\n".encode("utf-8"))
    t = load(path).table
    assert t["source_line"].to_pylist() == [2, 4] and t["ask"].to_pylist() == ["问题\r\n第二行", "a2"]


def test_large_file_read_in_batches(tmp_path: Path, write_csv, monkeypatch):
    monkeypatch.setattr("medtune.data.load.BATCH_ROWS", 7)
    monkeypatch.setattr("medtune.data.load.TextStream.CHUNK", 64)  # lines cross read chunks
    rows = [["内科", f"标题{i}", f"问题{i}，" * (i % 5 + 1), f"回答{i}。"] for i in range(50)]
    rows[20] = ["内科", "坏行"]
    res = load(write_csv("x.csv", rows))
    assert res.table.num_rows == 49 and res.table["source_line"].to_pylist() == [i + 2 for i in range(50) if i != 20]
    assert [(r["source_line"], r["raw"]) for r in res.rejects] == [(22, "内科,坏行\n")]


def test_plain_question_answer_jsonl(tmp_path: Path):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"question": "头晕怎么办", "answer": "多休息", "department": "内科"}, ensure_ascii=False)
                    + "\n", encoding="utf-8")
    row = load(path).table.to_pylist()[0]
    assert (row["ask"], row["answer"], row["department"], row["source_line"]) == ("头晕怎么办", "多休息", "内科", 1)


def test_short_gbk_text_that_is_almost_valid_utf8_is_read_as_gb18030(tmp_path: Path):
    path = tmp_path / "tiny.csv"
    path.write_bytes("department,title,ask,answer\n神经科,头痛,头痛怎么办,注意休息\n".encode("gbk"))
    row = load(path).table.to_pylist()[0]
    assert (row["title"], row["answer"]) == ("头痛", "注意休息")


def test_output_folder_inside_the_input_folder_is_not_read_back(tmp_path: Path):
    from medtune.data.prepare import prepare

    src = tmp_path / "mydata"
    src.mkdir()
    rows = "".join(f"内科,问题{i},头痛{i}天了怎么回事呢,建议注意休息多喝水{i}，必要时去医院检查。\n" for i in range(40))
    (src / "a.csv").write_bytes(("department,title,ask,answer\n" + rows).encode("gb18030"))
    first = prepare(src, src / "prepared")
    second = prepare(src, src / "prepared")
    assert [f["name"] for f in second["files"]] == [f["name"] for f in first["files"]] == ["a.csv"]


# ----------------------------------------------------------------------------- Arrow's parser against Python's

def _python_only(monkeypatch) -> None:
    def none(src, stream):
        return 1, None
        yield  # a generator that hands everything to Python's reader

    monkeypatch.setattr("medtune.data.load._arrow_csv_batches", none)


HEADER = "department,title,ask,answer\n"
TRICKY = {
    "literal quotes in unquoted fields": '科,小三阳"如何治疗,问"一"下,答""案"\n科,题,"问,""引号""",答\n',
    "quoted line breaks and commas": '科,题,"第一行\n第二行,还有",答\n科,"题\n\n目",问,"a"",""b"\n',
    "crlf": "科,题,问,答\r\n科,题,\"多\r\n行\",答\r\n",
    "blank line": "科,题,问,答\n\n科,题,问二,答二\n",
    "text after a closing quote": '科,题,"问"题,答\n科,题,问二,答二\n',
    "doubled quotes opening a field": '科,题,""问,答\n科,题,问二,答二\n',
    "wrong field count": "科,题,问,答\n科,题,问\n科,题,问三,答三\n",
    "no final line feed": "科,题,问,答\n科,题,\"问\n二\",答二\n",  # (the last line feed is cut off)
    "field over the csv limit": "科,题,问,答\n科,题," + "长" * 140_000 + ",答\n",
}


@pytest.mark.parametrize("case", list(TRICKY))
@pytest.mark.parametrize("piece_bytes", [1 << 20, 40])
def test_arrow_parser_reads_every_file_as_pythons_csv_does(tmp_path: Path, monkeypatch, case, piece_bytes):
    """Same rows, lines, rejects and checksum whether Arrow's reader takes a piece or hands it to Python's
    (pieces of 40 bytes cut most records apart: the cut must fall between records)."""
    path = tmp_path / "x.csv"
    text = HEADER + TRICKY[case] * 3
    path.write_bytes((text.rstrip("\n") if case == "no final line feed" else text).encode("gb18030"))
    monkeypatch.setattr("medtune.data.load.PIECE_BYTES", piece_bytes)
    fast = load(path)
    with monkeypatch.context() as m:
        _python_only(m)
        slow = load(path)
    _same_rows(fast, slow)
    assert fast.rejects == slow.rejects
    assert fast.files[0].sha256 == slow.files[0].sha256
    assert fast.table.num_rows > 0
    handed_over = _arrow_rows(path)[1]
    # Python's reader takes over exactly where it rejects a row or Arrow would read the bytes otherwise.
    assert (handed_over is None) == (case not in ("text after a closing quote", "doubled quotes opening a field",
                                                  "wrong field count", "field over the csv limit"))


def _same_rows(fast, slow) -> None:
    """The same rows from Arrow's reader (``fast``) as from Python's (``slow``); only Arrow's have a place
    in the file, where their texts are read again the same."""
    from medtune.data.load import RAW_PLACE

    assert fast.table.drop_columns(list(RAW_PLACE)).equals(slow.table.drop_columns(list(RAW_PLACE)))
    assert slow.table["source_offset"].null_count == slow.table.num_rows
    _texts_read_again(fast)


def _arrow_rows(path: Path) -> tuple[int, object]:
    """Rows Arrow's reader parsed, and where it handed over to Python's (None: nowhere)."""
    from medtune.data.load import SourceFile, TextStream, _arrow_csv_batches

    gen = _arrow_csv_batches(SourceFile(path, path.name, ""), TextStream(path))
    rows = 0
    while True:
        try:
            rows += next(gen).num_rows
        except StopIteration as stop:
            return rows, stop.value


def test_arrow_parser_takes_the_whole_sample(sample_csv: Path, monkeypatch):
    """The real sample (stray quotes, multi-line answers) needs no help from Python's reader."""
    assert _arrow_rows(sample_csv) == (7644, None)
    fast = load(sample_csv)
    _python_only(monkeypatch)
    _same_rows(fast, load(sample_csv))
    assert _texts_read_again(fast) == 7644


# ----------------------------------------------------------------------------- GB18030 → UTF-8

def _kernel(data: bytes) -> bytes | None:
    from medtune.data.kernels import gb18030_tables, gb18030_to_utf8

    out = np.empty(len(data) * 3 // 2 + 4, dtype=np.uint8)
    n = gb18030_to_utf8(np.frombuffer(data, dtype=np.uint8), *gb18030_tables(), out)
    return out[:n].tobytes() if n >= 0 else None


def test_gb18030_kernel_decodes_every_code_point_as_pythons_codec():
    import random

    from medtune.data.load import gb18030_to_utf8

    rnd = random.Random(0)
    points = [cp for cp in range(0x110000) if not 0xD800 <= cp < 0xE000 and (cp < 0x10000 or rnd.random() < 0.02)]
    text = "".join(map(chr, points)) + "高血压，能吃党参吗？\r\nok"
    data = text.encode("gb18030")
    assert _kernel(data) == text.encode("utf-8")  # the compiled pass itself, not Python's fallback
    assert gb18030_to_utf8(data).to_pybytes() == text.encode("utf-8")


def test_gb18030_kernel_takes_or_refuses_each_code_as_pythons_codec():
    two = [bytes((lead, trail)) for lead in range(0x80, 0x100) for trail in range(0x30, 0x100)]
    four = [bytes((0x81 + i // 12600, 0x30 + i // 1260 % 10, 0x81 + i // 10 % 126, 0x30 + i % 10)) for i in range(40000)]
    four += [bytes((b1, 0x39, 0xFE, 0x39)) for b1 in range(0x84, 0xFF)] + [b"\x90\x30\x81\x30", b"\xe3\x32\x9a\x35",
                                                                            b"\xe3\x32\x9a\x36", b"\xfe\x39\xfe\x39"]
    for code in two + four + [b"\x81", b"\x81\x30", b"\x81\x30\x81", b"\x80", b"\xff", b"a\x81"]:
        try:
            expected = code.decode("gb18030").encode("utf-8")
        except UnicodeDecodeError:
            expected = None
        got = _kernel(code)
        assert got == expected or (got is None and len(expected.decode("utf-8")) > 1), code.hex()


def test_gb18030_to_utf8_raises_for_bytes_that_are_not_gb18030():
    from medtune.data.load import gb18030_to_utf8

    with pytest.raises(UnicodeDecodeError):
        gb18030_to_utf8("高血压".encode("gb18030") + b"\x81\x20")
    with pytest.raises(UnicodeDecodeError):
        gb18030_to_utf8("高血压".encode("gb18030")[:-1])  # cut inside a character
