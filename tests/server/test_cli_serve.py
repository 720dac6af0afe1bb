"""`python -m sot_engine serve` starts a server that answers the official client, and stops on SIGINT."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def test_sot_serve_cli(tiny_chat_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "sot_engine", "serve", "--model", str(tiny_chat_dir), "--port", str(port),
                             "--served-model-name", "tiny", "--no-prefix-caching", "--max-n", "1",
                             "--max-num-batched-tokens", "100"],
                            cwd=Path(__file__).parents[2], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "SOT_API_KEY": "k-123"})
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else ""
            time.sleep(0.2)
        from openai import OpenAI
        import openai
        bad = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        try:
            bad.models.list()
            raise AssertionError("a wrong key was let in")
        except openai.AuthenticationError as e:
            assert e.status_code == 401 and e.body["code"] == "invalid_api_key"
        c = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k-123", max_retries=0)  # from $SOT_API_KEY
        assert [m.id for m in c.models.list().data] == ["tiny"]
        r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert r.usage.completion_tokens >= 1
        try:
            c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4, n=2)
            raise AssertionError("--max-n 1 let n=2 in")
        except openai.BadRequestError as e:
            assert e.body["param"] == "n"
        assert httpx.get(f"http://127.0.0.1:{port}/stats").json()["cached_blocks"] == 0  # caching was turned off
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) in (0, 130)
    err = proc.stderr.read()
    assert "an API key is required" in err and "k-123" not in err  # never logged


def test_sot_serve_refuses_a_bad_limit_before_loading(tmp_path):
    r = subprocess.run([sys.executable, "-m", "sot_engine", "serve", "--model", str(tmp_path / "none"),
                        "--request-timeout", "-1"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "request_timeout must be a positive number" in r.stderr
