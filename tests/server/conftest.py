"""A real server on a free loopback port, run by uvicorn in a thread, for the official clients to talk to."""
from __future__ import annotations

import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("openai")


class RunningServer:
    def __init__(self, llm, **app_args) -> None:
        import uvicorn
        from sot.server import create_app
        self.llm = llm
        self.app = create_app(llm, **app_args)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.uvicorn = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="warning",
                                                     lifespan="on"))
        self.thread = threading.Thread(target=self.uvicorn.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.uvicorn.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{port}"
        self.model = self.app.state.server.names[0]

    def client(self, **kw):
        from openai import OpenAI
        return OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, **kw)

    def async_client(self, **kw):
        from openai import AsyncOpenAI
        return AsyncOpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, **kw)

    def stats(self) -> dict:
        import httpx
        return httpx.get(self.url + "/stats").json()

    def wait_idle(self, timeout: float = 20.0) -> dict:
        """Engine stats once nothing runs or waits (requests finish or abort asynchronously)."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.stats()
            if (st["running"] == 0 and st["waiting"] == 0) or time.monotonic() > deadline:
                return st
            time.sleep(0.05)

    def close(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def tiny_server(tiny_chat_dir):
    """The tiny chat model (noise text, milliseconds per step): the server's mechanics."""
    from engine import LLM
    srv = RunningServer(LLM(str(tiny_chat_dir), max_model_len=256, num_blocks=128, block_size=4))
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def serve_smollm2(smollm2):
    """Start a server on its own SmolLM2 (the session's LLM stays free for reference runs)."""
    from engine import LLM
    started = []

    def start(**app_args) -> RunningServer:
        started.append(RunningServer(LLM("default", kv_cache_memory=256 << 20), **app_args))
        return started[-1]
    yield start
    for srv in started:
        srv.close()
