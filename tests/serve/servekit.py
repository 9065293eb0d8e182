"""Helpers for the serve tests: run the real app on loopback in a background thread (uvicorn).

A module of its own, not conftest: `from conftest import ...` picks whichever conftest pytest imported last.
"""
from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from typing import Any, Iterator

API_KEY = "test-key-123"


@dataclasses.dataclass
class Served:
    url: str
    app: Any
    model_id: str

    @property
    def engine(self):
        return self.app.state.engine


@contextlib.contextmanager
def running(app: Any) -> Iterator[str]:
    """Serve ``app`` on a free loopback port until the block ends; yields the base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def make_app(loaded, *, api_key: str | None = API_KEY, department: str | None = None, **overrides: Any):
    from medtune.infer import GenerationArgs
    from medtune.serve import ServeArgs, build_app

    import torch

    overrides.setdefault("threads", torch.get_num_threads())  # leave the test process's thread count alone
    gen_fields = {f.name for f in dataclasses.fields(GenerationArgs)}
    gen = GenerationArgs(**{k: v for k, v in overrides.items() if k in gen_fields})
    server = ServeArgs(**{k: v for k, v in overrides.items() if k not in gen_fields})
    return build_app(loaded, server, gen, api_key, department)
