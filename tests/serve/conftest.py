"""Servers for the serve tests: the tiny model + the 3-step adapter behind the real app, on loopback,
in a background thread (uvicorn), loaded once per session."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from servekit import Served, make_app, running


@pytest.fixture(scope="session")
def loaded(tiny_model_dir: Path, trained_adapter_dir: Path):
    """The tiny base with the trained adapter as `medtune serve` loads it (a `medtune.infer.Assistant`)."""
    from medtune.config import ModelArgs
    from medtune.infer import load_assistant

    return load_assistant(ModelArgs(model=str(tiny_model_dir), adapter=[str(trained_adapter_dir)], profile="cpu"))


@pytest.fixture(scope="session")
def served(loaded) -> Iterator[Served]:
    """The main test server: API key set, small limits (so limit tests stay cheap)."""
    app = make_app(loaded, max_new_tokens=16, max_tokens_limit=4096, max_messages=8, max_prompt_tokens=1024,
                   max_body_kb=64, batch_size=8)
    with running(app) as url:
        yield Served(url, app, app.state.config.model_id)
