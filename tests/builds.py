"""`built_once`: build an expensive fixture once per test run, across pytest-xdist workers.

A module of its own (not conftest) so that test modules in any folder can import it by one unique name.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import pytest


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], object]) -> Path:
    """Run ``build(path)`` once per test run, whatever the number of xdist workers; return ``path``.

    Workers share the parent of their base temp directory; a file lock makes the others wait for the
    first builder, and a marker file says the build finished (a failed build is retried, not reused).
    """
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        root = root.parent
    path, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.is_file():
            build(path)
            done.write_text(json.dumps({"built": str(path)}))
    return path
