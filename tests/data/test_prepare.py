"""`medtune data prepare` end to end: outputs, accounting, manifest, boilerplate, messages, layouts, CLI."""
from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from medtune.chat_format import build_messages
from medtune.cli import main, parse
from medtune.data import SPLITS, TOP_DEPARTMENTS
from medtune.data.clean import load_boilerplate, remove_boilerplate, split_sentences
from medtune.data.classifier import CLASSIFIER_FILE, load_classifier, predict_department
from medtune.data.prepare import PrepareArgs, prepare
from medtune.errors import DataError

COLUMNS = ["id", "question", "answer", "department", "sub_department", "source_file", "source_line", "messages"]
INVENTED = "本回答由青柠健康小组审核发布，仅供参考"


def read_splits(out: Path) -> dict[str, list[dict]]:
    return {s: pq.read_table(out / f"{s}.parquet").to_pylist() for s in SPLITS}


def read_rejects(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rejects.jsonl").read_text(encoding="utf-8").splitlines()]


def manifest_of(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------- the shared sample

def test_outputs_and_accounting(prepared_sample_dir: Path, sample_csv: Path):
    out = prepared_sample_dir
    m, splits, rejects = manifest_of(out), read_splits(out), read_rejects(out)
    for s in SPLITS:
        assert pq.read_schema(out / f"{s}.parquet").names == COLUMNS
    kept = sum(len(v) for v in splits.values())
    assert kept + len(rejects) == m["counts"]["read"] == 7644
    assert m["counts"]["kept"] == kept and m["counts"]["rejected"] == len(rejects)
    assert {s: len(v) for s, v in splits.items()} == m["counts"]["splits"]
    assert 0.85 < len(splits["train"]) / kept < 0.95 and len(splits["test"]) > 250
    by_reason: dict[str, int] = {}
    for r in rejects:
        by_reason[r["reason"]] = by_reason.get(r["reason"], 0) + 1
        assert r["source_file"] == "toyhom_neike_sample.csv" and r["source_line"] >= 2 and r["detail"]
    assert by_reason == m["counts"]["rejected_by_reason"]
    assert 300 < by_reason["exact_duplicate"] < 450  # the README counts 396 duplicate (ask, answer) pairs
    # Every source line is in exactly one place.
    lines = [r["source_line"] for v in splits.values() for r in v] + [r["source_line"] for r in rejects]
    assert sorted(lines) == sorted(set(lines)) and len(lines) == 7644


def test_duplicates_name_the_row_they_duplicate(prepared_sample_dir: Path):
    splits, rejects = read_splits(prepared_sample_dir), read_rejects(prepared_sample_dir)
    kept = {r["id"]: r for v in splits.values() for r in v}
    dups = [r for r in rejects if r["reason"] in ("exact_duplicate", "near_duplicate")]
    assert dups and all(r["duplicate_of"] in kept for r in dups)
    exact = next(r for r in dups if r["reason"] == "exact_duplicate")
    assert exact["ask"] and exact["answer"] and exact["duplicate_of"] in exact["detail"]


def test_manifest(prepared_sample_dir: Path, sample_csv: Path):
    m = manifest_of(prepared_sample_dir)
    (f,) = m["files"]
    assert f["sha256"] == hashlib.sha256(sample_csv.read_bytes()).hexdigest() and f["encoding"] == "gb18030"
    assert m["seed"] == 42 and m["settings"]["dedup_threshold"] == 0.8 and m["settings"]["boilerplate_share"] == 0.003
    assert len(m["sub_departments"]) == 11 and m["sub_departments"]["肝病科"] > 2500
    assert [s["stage"] for s in m["stages"]] == ["load", "boilerplate", "filter", "exact_dedup", "near_dedup",
                                                 "split", "write", "classifier"]
    assert all(s["seconds"] >= 0 and s["rows_out"] <= s["rows_in"] for s in m["stages"][1:6])
    assert m["classifier"]["test_accuracy"] > 0.9 and m["classifier"]["level"] == "sub_department"
    assert m["boilerplate"]["sentences"] > 10 and m["boilerplate"]["removed"] > 1000


def test_messages_are_build_messages(prepared_sample_dir: Path):
    for rows in read_splits(prepared_sample_dir).values():
        for r in rows:
            assert r["messages"] == build_messages(r["question"], r["answer"], department=r["sub_department"] or r["department"])


def test_no_learned_boilerplate_left_in_answers(prepared_sample_dir: Path):
    phrases = load_boilerplate(prepared_sample_dir / "boilerplate.json")
    assert "祝患者身体早日恢复健康" in phrases and "以上可以做为参考" in phrases
    for rows in read_splits(prepared_sample_dir).values():
        for r in rows:
            assert remove_boilerplate(r["answer"], phrases) == r["answer"]


def test_classifier_saved_and_usable(prepared_sample_dir: Path):
    clf = load_classifier(prepared_sample_dir / CLASSIFIER_FILE)
    (label, prob), = predict_department(clf, ["高血压患者能吃党参吗？最近血压160/100"])
    assert label == "心血管科" and 0 < prob <= 1


def test_datasets_loads_the_splits(prepared_sample_dir: Path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.load_dataset("parquet", data_dir=str(prepared_sample_dir))
    assert set(ds) == set(SPLITS) and ds["train"][0]["messages"][0]["role"] == "system"


# ----------------------------------------------------------------------------- other inputs

def test_six_folder_layout_in_parallel(six_folder_root: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setattr("medtune.data.load.PARALLEL_MIN_BYTES", 0)  # use the process pool on this small input
    m = prepare(input=six_folder_root.parent, output=tmp_path / "out", settings=PrepareArgs(workers=2))
    assert set(m["departments"]) == set(TOP_DEPARTMENTS.values()) and len(m["files"]) == 6
    assert m["counts"]["kept"] + m["counts"]["rejected"] == m["counts"]["read"] == 7644
    strata: dict[tuple, list[int]] = {}
    for k, rows in enumerate(read_splits(tmp_path / "out").values()):
        for r in rows:
            strata.setdefault((r["department"], r["sub_department"]), [0, 0, 0])[k] += 1
    assert len(strata) == 66
    for key, counts in strata.items():  # stratified: every sizeable stratum has rows in every split
        if sum(counts) >= 60:
            assert all(counts) and 0.8 < counts[0] / sum(counts) < 0.95, (key, counts)
    assert m["classifier"]["test_accuracy"] > 0.9


@pytest.fixture
def injected(sample_rows, write_csv) -> tuple[Path, set[int]]:
    """2,000 sample rows, 5% of their answers carrying an invented sentence."""
    rng = random.Random(1)
    rows = [list(r) for r in sample_rows[:2000]]
    hit = set(rng.sample(range(len(rows)), 100))
    for i in hit:
        parts = split_sentences(rows[i][3])
        where = rng.randrange(1, len(parts) + 1)
        if where == len(parts) and not parts[-1].endswith(("。", "！", "？")):
            parts[-1] += "。"  # appended to an unfinished sentence it would not be a sentence of its own
        parts.insert(where, INVENTED + "。")
        rows[i][3] = "".join(parts)
    rows[5][3] = "请拨打13812345678或加微信abc_12345咨询。" + rows[5][3]
    return write_csv("injected.csv", rows), hit


def test_an_invented_boilerplate_sentence_is_learned_and_removed(injected, tmp_path: Path):
    path, hit = injected
    m = prepare(input=path, output=tmp_path / "out", department="内科")
    doc = json.loads((tmp_path / "out" / "boilerplate.json").read_text(encoding="utf-8"))
    entry = next(e for e in doc["sentences"] if e["sentence"] == INVENTED)
    assert entry["count"] >= 90 and entry["removed"] >= 90
    answers = [r["answer"] for v in read_splits(tmp_path / "out").values() for r in v]
    assert not any(INVENTED in a for a in answers)
    assert m["departments"] == {"内科": m["counts"]["kept"]}
    assert m["scrubbed"]["phone"] == 1 and m["scrubbed"]["wechat"] == 1
    assert any(a.startswith("请拨打[电话]或加[微信号]咨询。") for a in answers)


def test_jsonl_with_history_and_own_system_prompt(tmp_path: Path):
    lines = [{"messages": [{"role": "system", "content": "你是儿科医生。"}, {"role": "user", "content": "宝宝发烧三天了怎么办"},
                           {"role": "assistant", "content": "先物理降温，多喝水，观察精神状态。"},
                           {"role": "user", "content": "体温到了三十九度呢"},
                           {"role": "assistant", "content": "高热不退请及时到儿科就诊，必要时服用退烧药。"}]},
             {"instruction": "失眠多梦怎么调理", "output": "规律作息，睡前少用手机，必要时就医。", "department": "神经科"},
             {"conversations": [{"from": "human", "value": "血压偏高吃什么好"}, {"from": "gpt", "value": "少盐饮食，多吃蔬菜水果。"}]}]
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines), encoding="utf-8")
    prepare(input=path, output=tmp_path / "out", settings=PrepareArgs(validation_fraction=0, test_fraction=0.01))
    rows = {r["source_line"]: r for v in read_splits(tmp_path / "out").values() for r in v}
    assert len(rows) == 3
    assert rows[1]["messages"] == build_messages(
        "体温到了三十九度呢", "高热不退请及时到儿科就诊，必要时服用退烧药。", system="你是儿科医生。",
        history=[{"role": "user", "content": "宝宝发烧三天了怎么办"},
                 {"role": "assistant", "content": "先物理降温，多喝水，观察精神状态。"}])
    assert rows[2]["messages"][0]["content"].startswith("你是一名专业、严谨的神经科医生")
    assert rows[3]["messages"] == build_messages("血压偏高吃什么好", "少盐饮食，多吃蔬菜水果。")


def test_reproducible_with_the_seed(sample_rows, write_csv, tmp_path: Path):
    path = write_csv("part.csv", sample_rows[:1500])
    ids = []
    for k, seed in enumerate((3, 3, 4)):
        prepare(input=path, output=tmp_path / f"o{k}", settings=PrepareArgs(seed=seed, classifier_max_rows=200))
        ids.append({s: [r["id"] for r in v] for s, v in read_splits(tmp_path / f"o{k}").items()})
    assert ids[0] == ids[1] and ids[0] != ids[2]


def test_length_filters_and_everything_dropped(write_csv, tmp_path: Path):
    rows = [["内科", "头痛", "头痛怎么办", "多休息。"], ["内科", "", "", "回答"], ["内科", "胃痛", "胃痛", ""],
            ["内科", "失眠", "经常失眠怎么办", "规律作息，必要时就医治疗。" * 3],
            ["内科", "咳嗽", "咳嗽有痰怎么办", "多喝水，可以服用止咳化痰的药物。"]]
    path = write_csv("x.csv", rows)
    m = prepare(input=path, output=tmp_path / "a", settings=PrepareArgs(max_answer_length=30))
    assert m["counts"]["rejected_by_reason"] == {"answer_too_long": 1, "answer_too_short": 1, "empty_answer": 1,
                                                 "empty_question": 1}
    assert m["counts"]["splits"]["train"] == 1 and m["classifier"]["test_accuracy"] is None
    with pytest.raises(DataError, match="no rows left"):
        prepare(input=path, output=tmp_path / "b", settings=PrepareArgs(min_answer_length=100))
    assert len(read_rejects(tmp_path / "b")) == 5 and not (tmp_path / "b" / "train.parquet").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_THP_DISABLE) is Linux's")
@pytest.mark.parametrize("huge_pages", [False, True])
def test_huge_pages_are_off_while_prepare_runs_unless_asked(write_csv, sample_rows, tmp_path: Path, monkeypatch,
                                                           huge_pages: bool):
    import ctypes

    from medtune.data import prepare as module
    from medtune.data.load import PR_GET_THP_DISABLE

    def disabled() -> int:
        return ctypes.CDLL("libc.so.6").prctl(PR_GET_THP_DISABLE, 0, 0, 0, 0)

    seen, real = [], module._filter
    monkeypatch.setattr(module, "_filter", lambda rows, s: (seen.append(disabled()), real(rows, s))[1])
    prepare(input=write_csv("x.csv", sample_rows[:300]), output=tmp_path / "o",
            settings=PrepareArgs(huge_pages=huge_pages, classifier_max_rows=100))
    assert seen == [0 if huge_pages else 1] and disabled() == 0  # during the run; as it was afterwards


def test_settings_are_checked():
    with pytest.raises(ValueError, match="fraction"):
        PrepareArgs(validation_fraction=0.5, test_fraction=0.5)
    with pytest.raises(ValueError, match="dedup_threshold"):
        PrepareArgs(dedup_threshold=1.5)


# ----------------------------------------------------------------------------- command line

def test_cli_flags_and_errors(write_csv, sample_rows, tmp_path: Path, capsys):
    command, kwargs = parse(["data", "prepare", "--input", "x.csv", "--output", "o", "--dedup-threshold", "0.9",
                             "--department", "内科", "--no-scrub", "--test-fraction", "0.1"])
    assert command == "data prepare" and kwargs["department"] == "内科"
    assert kwargs["settings"] == PrepareArgs(dedup_threshold=0.9, scrub=False, test_fraction=0.1)
    path = write_csv("x.csv", sample_rows[:300])
    assert main(["data", "prepare", "--input", str(path), "--output", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "manifest.json").is_file()
    assert main(["data", "prepare", "--input", str(tmp_path / "missing"), "--output", str(tmp_path / "o")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_data_prepare_does_not_import_torch():
    code = ("import sys; from medtune.cli import build_parser; build_parser(['data', 'prepare', '--help']); "
            "import medtune.data.prepare, medtune.data.load, medtune.data.clean, medtune.data.dedup, "
            "medtune.data.split, medtune.data.classifier; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_length_limits_in_tokens(sample_rows, write_csv, tmp_path: Path):
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.train_from_iterator([r[3] for r in sample_rows[:300]],
                            tokenizers.trainers.BpeTrainer(vocab_size=400, special_tokens=["[UNK]"]))
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    path = write_csv("x.csv", sample_rows[:300])
    m = prepare(input=path, output=tmp_path / "out", settings=PrepareArgs(tokenizer=tmp_path / "tok", max_answer_length=60))
    assert m["settings"]["length_unit"] == "tokens" and m["counts"]["rejected_by_reason"]["answer_too_long"] > 10
    long = next(r for r in read_rejects(tmp_path / "out") if r["reason"] == "answer_too_long")
    assert "tokens (> 60)" in long["detail"]
    assert all(len(tok.encode(r["answer"], add_special_tokens=False).ids) <= 60
               for v in read_splits(tmp_path / "out").values() for r in v)


def test_a_copy_of_a_dropped_row_points_to_the_row_kept(sample_rows, write_csv, tmp_path: Path):
    original = list(sample_rows[0])
    edited = original[:3] + [original[3][:-3] + "的了。"]  # a near copy of the original ...
    rows = [original, edited, list(edited)] + [list(r) for r in sample_rows[1:200]]  # ... and an exact copy of that
    prepare(input=write_csv("x.csv", rows), output=tmp_path / "out")
    rejects = {r["source_line"]: r for r in read_rejects(tmp_path / "out")}
    assert rejects[3]["reason"] == "near_duplicate" and rejects[3]["duplicate_of"] == "x.csv:2"
    assert rejects[4]["reason"] == "exact_duplicate" and rejects[4]["duplicate_of"] == "x.csv:2"
    assert "x.csv:3" in rejects[4]["detail"] and "itself dropped" in rejects[4]["detail"]


def test_jsonl_lines_are_what_json_dumps_writes(tmp_path: Path):
    import pyarrow as pa

    from medtune.data.prepare import write_jsonl

    rng = random.Random(3)
    alphabet = list('好a"\\/\n\r\t\x00\x01\x08\x0b\x0c\x1f\x7f 😀\u2028{}') + ["\u00e9"]
    texts = ["", "普通的回答", 'say "hi" \\ back'] + ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
                                                for _ in range(3000)]
    n = len(texts)
    table = pa.table({"text": texts, "maybe": [None if i % 7 == 0 else t for i, t in enumerate(texts)],
                      "line": pa.array([None if i % 5 == 0 else i for i in range(n)], pa.int64())})
    path = tmp_path / "x.jsonl"
    write_jsonl(table, path, chunk=1000)
    lines = path.read_text(encoding="utf-8").split("\n")
    assert lines[-1] == "" and len(lines) == n + 1
    assert lines[:-1] == [json.dumps(row, ensure_ascii=False) for row in table.to_pylist()]


def _records_by_line(path: Path, encoding: str = "gb18030") -> dict[int, dict]:
    """Each CSV record by the line it starts on, as Python's csv module reads it."""
    import csv
    import io

    reader = csv.DictReader(io.StringIO(path.read_bytes().decode(encoding), newline=""))
    out, start = {}, 2
    for rec in reader:
        out[start] = rec
        start = reader.line_num + 1
    return out


def test_rejects_hold_the_original_texts_of_the_sample(prepared_sample_dir: Path, sample_csv: Path):
    """Read again from the file at their byte place (the spills leave them out): exactly as written."""
    records = _records_by_line(sample_csv)
    rejects = read_rejects(prepared_sample_dir)
    assert len(rejects) > 300
    for r in rejects:
        rec = records[r["source_line"]]
        assert (r["title"], r["ask"], r["answer"]) == (rec["title"], rec["ask"], rec["answer"])


def test_rejects_hold_the_original_texts_where_pythons_reader_took_over(sample_rows, write_csv, tmp_path: Path,
                                                                        monkeypatch):
    """A bad row hands the rest of the file to Python's reader: duplicates before it are read again from
    the file, those after it come from the spill; both as written (multi-line fields too)."""
    monkeypatch.setattr("medtune.data.load.PIECE_BYTES", 8192)  # Arrow's reader takes the pieces before it
    rows = [list(r) for r in sample_rows[:300]]
    rows[5] = rows[5][:3] + ["第一行\n第二行，\"引号\"" + rows[5][3]]
    copies = [list(rows[5]), list(rows[7]), list(rows[250]), list(rows[260])]
    path = write_csv("x.csv", rows[:60] + copies[:2] + rows[60:] + copies[2:])
    text = path.read_bytes().decode("gb18030").split("\n")
    bad_at = len(text) // 2  # a line with too few fields, halfway through
    path.write_bytes("\n".join(text[:bad_at] + ["科,只有两列"] + text[bad_at:]).encode("gb18030"))
    m = prepare(input=path, output=tmp_path / "out", settings=PrepareArgs(workers=1))
    assert m["counts"]["rejected_by_reason"]["wrong_field_count"] == 1
    records = _records_by_line(path)
    dups = [r for r in read_rejects(tmp_path / "out") if r["reason"] == "exact_duplicate"]
    assert len(dups) >= 4
    assert any(r["source_line"] < bad_at - 50 for r in dups) and any(r["source_line"] > bad_at for r in dups)
    for r in dups:
        rec = records[r["source_line"]]
        assert (r["title"], r["ask"], r["answer"]) == (rec["title"], rec["ask"], rec["answer"])
    assert any("第一行\n第二行" in r["answer"] for r in dups)


def test_the_finished_answers_spill_holds_only_the_answers_that_changed(tmp_path: Path):
    import pyarrow as pa

    from medtune.data.prepare import finish_answers

    phrase = "感谢您的提问祝您健康"
    answers = ["多喝水，注意休息。" + phrase + "。", "按时服药，一周后复查。", "", phrase + "。"] * 50
    spill = tmp_path / "part-0000.arrow"
    table = pa.table({"question": ["头疼怎么办"] * len(answers), "clean_answer": answers,
                      "may_hold_placeholders": [False] * len(answers)})
    with pa.ipc.new_file(str(spill), table.schema) as writer:
        writer.write_table(table, max_chunksize=64)
    done = finish_answers(spill, phrases=[phrase])
    finished = pa.ipc.open_file(str(done["path"])).read_all()
    expected = [remove_boilerplate(a, [phrase]) if phrase in a else None for a in answers]
    assert finished["answer"].to_pylist() == expected and expected.count(None) == 100
    assert done["removed"] == {phrase: 100}
    # only the changed answers' bytes are written: the unchanged ones are null, not kept in the data buffer
    data = sum(chunk.buffers()[2].size for chunk in finished["answer"].chunks)
    assert data == sum(len(a.encode("utf-8")) for a in expected if a is not None)
