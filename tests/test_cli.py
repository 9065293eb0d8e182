"""The `medtune` command: the subcommand table, lazy imports, clean errors."""
from __future__ import annotations

import subprocess
import sys

import pytest

from medtune.cli import COMMANDS, build_parser, main


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medtune", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_every_command():
    out = _run("--help")
    assert out.returncode == 0
    for name in {c.split()[0] for c in COMMANDS}:
        assert name in out.stdout


@pytest.mark.parametrize("argv", [["--help"], ["data", "prepare", "--help"], ["data", "report", "--help"]])
def test_help_does_not_import_torch(argv):
    code = ("import sys, runpy; sys.argv = ['medtune', *%r]\n"
            "try:\n    runpy.run_module('medtune', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\nprint('ok')") % (argv,)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")


def test_every_command_builds_its_flags():
    for name in COMMANDS:
        parser, chosen = build_parser(name.split() + ["--help"])
        assert chosen == name


def test_unknown_flag_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["data", "prepare", "--no-such-flag"])
    assert e.value.code == 2
    assert "--no-such-flag" in capsys.readouterr().err


def test_missing_required_flag_is_reported_without_traceback():
    out = _run("data", "report")
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "--data" in out.stderr


def test_ask_takes_the_question_as_a_positional_word_or_a_flag() -> None:
    from medtune.cli import parse

    assert parse(["ask", "高血压怎么办？", "--adapter", "runs/a"])[1]["question"] == "高血压怎么办？"
    assert parse(["ask", "--adapter", "runs/a", "头晕"])[1]["question"] == "头晕"
    assert parse(["ask", "--question", "胸闷"])[1]["question"] == "胸闷"
    assert "question" not in parse(["ask", "--input", "q.jsonl", "--output", "a.jsonl"])[1]
    with pytest.raises(SystemExit):
        parse(["ask", "头晕", "胸闷"])  # one question only


def test_validate_takes_configs_as_positional_words_and_flags_together() -> None:
    from pathlib import Path

    from medtune.cli import parse
    from medtune.config import ConfigError

    assert parse(["validate", "configs"])[1]["file"] == [Path("configs")]
    assert parse(["validate", "a.yaml", "b.yaml", "--file", "c.yaml"])[1]["file"] == [
        Path("a.yaml"), Path("b.yaml"), Path("c.yaml")]
    with pytest.raises(ConfigError, match="--file is required"):
        parse(["validate"])
