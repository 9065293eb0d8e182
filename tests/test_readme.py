"""Every `medtune` command shown in the README parses with the real command-line parser."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from medtune.cli import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"


def medtune_argv(line: str) -> list[str] | None:
    """The medtune arguments of a shell line: `medtune ...`, `VAR=x medtune ...` or `... -m medtune[.cli] ...`."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        return None
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
        words = words[1:]  # environment assignments
    if words[:1] == ["medtune"]:
        return words[1:]
    for i in range(len(words) - 1):
        if words[i] == "-m" and words[i + 1] in ("medtune", "medtune.cli"):
            return words[i + 2:]
    return None


def shell_blocks(text: str) -> list[str]:
    """The bodies of the fenced code blocks tagged bash/sh/shell or untagged (python blocks are skipped)."""
    blocks, body, lang = [], None, ""
    for line in text.splitlines():
        if line.startswith("```"):
            if body is None:
                body, lang = [], line[3:].strip()
            else:
                if lang in ("", "bash", "sh", "shell"):
                    blocks.append("\n".join(body))
                body = None
        elif body is not None:
            body.append(line)
    return blocks


def readme_commands() -> list[str]:
    commands = []
    for block in shell_blocks(README.read_text(encoding="utf-8")):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.strip().removeprefix("$ ")
            if medtune_argv(line) is not None:
                commands.append(line)
    return commands


def test_readme_shows_commands():
    assert len(readme_commands()) >= 5


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_parses(command):
    argv = medtune_argv(command)
    parser, chosen = build_parser(argv)
    assert chosen is not None, f"not a medtune command: {command}"
    try:
        parser.parse_args(argv)
    except SystemExit as e:  # argparse exits on an unknown command or flag
        pytest.fail(f"README command does not parse ({e.code}): {command}")
