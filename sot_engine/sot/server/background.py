"""A server on a free loopback port, run by uvicorn in a thread: for tests, benchmarks and notebooks."""
from __future__ import annotations

import socket
import threading
import time

import httpx

from sot_engine.engine import LLM


class BackgroundServer:
    def __init__(self, llm: LLM, host: str = "127.0.0.1", **app_args) -> None:
        import uvicorn
        from sot_engine.sot.server.app import create_app
        self.llm = llm
        self.app = create_app(llm, **app_args)
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        self.uvicorn = uvicorn.Server(uvicorn.Config(self.app, host=host, port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.uvicorn.run, name="uvicorn", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.uvicorn.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        self.url = f"http://{host}:{port}"
        self.model = self.app.state.server.names[0]

    def client(self, **kw):
        from openai import OpenAI
        return OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, **kw)

    def async_client(self, **kw):
        from openai import AsyncOpenAI
        return AsyncOpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, **kw)

    def stats(self) -> dict:
        return httpx.get(self.url + "/stats").json()

    def wait_idle(self, timeout: float = 20.0) -> dict:
        """Engine stats once nothing runs or waits (finished and aborted requests leave asynchronously)."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.stats()
            if (st["running"] == 0 and st["waiting"] == 0) or time.monotonic() > deadline:
                return st
            time.sleep(0.05)

    def close(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(timeout=30)
