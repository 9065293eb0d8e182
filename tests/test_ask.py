"""`medtune ask` through a subprocess on the tiny model: streaming, the batch file mode, bad input."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from medtune.cli import parse

BENIGN = "高血压患者平时饮食要注意什么？能吃党参吗？"
STROKE = "我爸刚才吃饭的时候突然嘴歪了，右手拿不住筷子，说话也含糊不清，怎么办？"
GREEDY = ["--greedy", "--max-new-tokens", "24", "--profile", "cpu"]


def medtune(*args: str | bytes, stdin: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1", "MEDTUNE_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "medtune", *args], input=stdin, capture_output=True, timeout=timeout,
                          env=env, text=True, encoding="utf-8", errors="replace")


def assert_clean_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr[-2000:])


def test_flags_parse():
    command, kwargs = parse(["ask", "--question", "头晕", "--adapter", "a", "--quant", "nf4", "--department", "神经科",
                             "--prompt-format", "seed", "--max-new-tokens", "64", "--min-p", "0.05"])
    assert command == "ask" and kwargs["question"] == "头晕" and kwargs["model"].quant == "nf4"
    assert kwargs["answer"].department == "神经科" and kwargs["gen"].min_p == 0.05
    command, kwargs = parse(["chat", "--adapter", "a", "--context-window", "2048"])
    assert command == "chat" and kwargs["answer"].context_window == 2048


def test_bad_questions_and_missing_adapter_are_clear_errors(tmp_path):
    assert_clean_error(medtune("ask", "--question", ""), "the question is empty")
    assert_clean_error(medtune("ask", "--question", "   \n\t "), "the question is empty")
    garbage = subprocess.run([sys.executable, "-m", "medtune", "ask", "--question", b"\xff\xfe\x89PNG\x1a\x01\x02"],
                             capture_output=True, timeout=120, env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert_clean_error(subprocess.CompletedProcess(garbage.args, garbage.returncode, "",
                                                   garbage.stderr.decode("utf-8", "replace")), "not readable text")
    assert_clean_error(medtune("ask", "--question", "头晕", "--adapter", str(tmp_path / "no-such-adapter")),
                       "no such directory")
    assert_clean_error(medtune("ask", "--input", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "o.jsonl")),
                       "no such file")


@pytest.mark.slow
def test_ask_streams_and_the_file_mode_answers_the_same(tiny_model_dir: Path, trained_adapter_dir: Path, tmp_path):
    model = ["--model", str(tiny_model_dir), "--adapter", str(trained_adapter_dir)]
    one = medtune("ask", "--question", BENIGN, *model, *GREEDY, "--disclaimer", "")
    assert one.returncode == 0, one.stderr[-2000:]
    assert "cpu profile" in one.stderr and "GiB" in one.stderr and "none/fp32" in one.stderr
    assert "predicted by the department classifier" in one.stderr

    lines = [json.dumps({"id": "q1", "question": BENIGN}, ensure_ascii=False),
             "{not json",
             json.dumps({"id": "q3", "question": STROKE, "department": "神经科"}, ensure_ascii=False),
             json.dumps({"id": "q4"}),
             json.dumps({"id": "q5", "question": "   "}),
             json.dumps({"id": "q6", "question": "头晕", "history": "not a list"}, ensure_ascii=False)]
    src = tmp_path / "questions.jsonl"
    src.write_bytes(("\n".join(lines) + "\n").encode("utf-8") + b"\xff\xfe\x00garbage\n")
    out = tmp_path / "answers.jsonl"
    batch = medtune("ask", "--input", str(src), "--output", str(out), *model, *GREEDY, "--disclaimer", "")
    assert batch.returncode == 1, batch.stderr[-2000:]  # some lines could not be answered
    assert "Traceback" not in batch.stderr
    for line, why in ((2, "not valid JSON"), (4, "no question field"), (5, "question is empty"),
                      (6, "history"), (7, "not UTF-8 text")):
        assert f"questions.jsonl:{line}" in batch.stderr and why in batch.stderr, (line, batch.stderr[-2000:])
    rows = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in rows] == ["q1", "q3"]
    for r in rows:
        assert {"answer", "emergency", "emergency_category", "department", "department_source"} <= set(r)
    assert rows[0]["emergency"] is False and rows[0]["department_source"] == "classifier" and rows[0]["department"]
    assert rows[1]["emergency"] is True and rows[1]["emergency_category"] == "stroke"
    assert (rows[1]["department"], rows[1]["department_source"]) == ("神经科", "given")
    # what was streamed (benign question, no disclaimer: the answer alone) is what the file mode returned
    assert one.stdout.strip() == rows[0]["answer"]


@pytest.mark.slow
def test_emergency_notice_first_and_disclaimer_last(tiny_model_dir: Path, trained_adapter_dir: Path):
    from medtune.safety import DISCLAIMER, EMERGENCY_NOTICE

    proc = medtune("ask", "--question", STROKE, "--model", str(tiny_model_dir), "--adapter", str(trained_adapter_dir),
                   *GREEDY, "--department", "神经科")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(EMERGENCY_NOTICE) and proc.stdout.rstrip().endswith(DISCLAIMER)
    assert "department 神经科 (given with --department)" in proc.stderr


@pytest.fixture(scope="module")
def foreign_adapter(trained_adapter_dir: Path, tmp_path_factory) -> Path:
    """Our adapter without its medtune.json, classifier and boilerplate: as a published foreign adapter looks."""
    path = tmp_path_factory.mktemp("foreign") / "adapter"
    shutil.copytree(trained_adapter_dir, path)
    for name in ("medtune.json", "department_classifier.npz", "boilerplate.json"):
        (path / name).unlink(missing_ok=True)
    return path


@pytest.mark.slow
def test_foreign_adapter_needs_its_prompt_format(tiny_model_dir: Path, foreign_adapter: Path):
    model = ["--model", str(tiny_model_dir), "--adapter", str(foreign_adapter)]
    assert_clean_error(medtune("ask", "--question", "头晕怎么办？", *model, *GREEDY), "--prompt-format", "seed")
    proc = medtune("ask", "--question", "头晕怎么办？", *model, *GREEDY, "--prompt-format", "seed")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "prompt format seed" in proc.stderr and "not used" in proc.stderr


@pytest.mark.slow
def test_nf4_on_the_cpu_and_a_too_long_question(tiny_model_dir: Path, trained_adapter_dir: Path):
    model = ["--model", str(tiny_model_dir), "--adapter", str(trained_adapter_dir)]
    proc = medtune("ask", "--question", BENIGN, *model, *GREEDY, "--quant", "nf4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "nf4/fp32 on cpu" in proc.stderr
    assert_clean_error(medtune("ask", "--question", BENIGN * 20, *model, *GREEDY, "--context-window", "128"),
                       "too long", "context window of 128")


@pytest.fixture(scope="module")
def other_base(tiny_model_dir: Path, tmp_path_factory) -> Path:
    """A random Qwen3 with the tiny model's tokenizer but another hidden size: not the adapter's base."""
    from transformers import AutoConfig, Qwen3ForCausalLM

    path = tmp_path_factory.mktemp("other-base")
    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.hidden_size, config.intermediate_size = 128, 256
    Qwen3ForCausalLM(config).save_pretrained(path)
    for f in tiny_model_dir.iterdir():
        if f.name.startswith("tokenizer"):
            shutil.copyfile(f, path / f.name)
    return path


@pytest.mark.slow
def test_adapter_on_the_wrong_base_is_a_clear_error(other_base: Path, trained_adapter_dir: Path):
    proc = medtune("ask", "--question", "头晕", "--model", str(other_base), "--adapter", str(trained_adapter_dir), *GREEDY)
    assert_clean_error(proc, "does not fit the base model")
