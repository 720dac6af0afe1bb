"""A real server on a free loopback port (uvicorn in a thread) for the official clients to talk to."""
from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("openai")

from sot_engine.sot.server.background import BackgroundServer  # noqa: E402


@pytest.fixture(scope="module")
def tiny_server(tiny_chat_dir):
    """The tiny chat model (noise text, milliseconds per step): the server's mechanics."""
    from sot_engine.engine import LLM
    srv = BackgroundServer(LLM(str(tiny_chat_dir), max_model_len=256, num_blocks=128, block_size=4))
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def serve_smollm2(smollm2):
    """Start a server on its own SmolLM2 (the session's LLM stays free for reference runs)."""
    from sot_engine.engine import LLM
    started = []

    def start(**app_args) -> BackgroundServer:
        started.append(BackgroundServer(LLM("default", kv_cache_memory=256 << 20), **app_args))
        return started[-1]
    yield start
    for srv in started:
        srv.close()
