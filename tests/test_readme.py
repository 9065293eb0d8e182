"""Every `medtune` command shown in the README parses with the real command-line parser."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from medtune.cli import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands() -> list[str]:
    text = README.read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```(?:bash|sh|shell)?\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.strip().removeprefix("$ ")
            if line.startswith("medtune "):
                commands.append(line.split(" #")[0].strip())
    return commands


def test_readme_shows_commands():
    assert len(readme_commands()) >= 5


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_parses(command):
    argv = shlex.split(command)[1:]
    parser, chosen = build_parser(argv)
    assert chosen is not None, f"not a medtune command: {command}"
    try:
        parser.parse_args(argv)
    except SystemExit as e:  # argparse exits on an unknown command or flag
        pytest.fail(f"README command does not parse ({e.code}): {command}")
