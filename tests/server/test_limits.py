"""The server's limits: each answers with an OpenAI-shaped error (413, 400, 429, a timeout) and leaves the engine
and the KV pool as they were."""
from __future__ import annotations

import json
import random
import time

import httpx
import openai
import pytest

from sot_engine.sot.server.limits import ServerLimits, json_depth

CHAT = [{"role": "user", "content": "Name three colors."}]


class SlowSteps:
    """A step hook that makes every engine step take `seconds`: the tiny model decodes in milliseconds, and a
    timeout or a full queue needs requests that last."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def before_step(self) -> None:
        time.sleep(self.seconds)

    def after_step(self, outputs) -> None:
        pass


def _server(tiny_chat_dir, slow: float = 0.0, max_num_seqs: int = 8, **limits):
    from sot_engine.engine import LLM
    from sot_engine.sot.server.background import BackgroundServer
    llm = LLM(str(tiny_chat_dir), max_model_len=256, num_blocks=128, block_size=4, max_num_seqs=max_num_seqs)
    if slow:
        llm.engine.step_hooks.append(SlowSteps(slow))
    return BackgroundServer(llm, limits=ServerLimits(**limits))


def _idle_and_whole(srv) -> None:
    st = srv.wait_idle()
    assert (st["running"], st["waiting"]) == (0, 0) and st["free_blocks"] == st["total_blocks"], st


@pytest.mark.parametrize("bad", [{"max_n": 0}, {"max_body_bytes": -1}, {"max_waiting": 0},
                                 {"request_timeout": -2}, {"max_messages": True}, {"max_json_depth": "8"}])
def test_limits_must_be_positive_numbers(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        ServerLimits(**bad)


def test_json_depth_counts_brackets_outside_strings():
    rng = random.Random(7)
    for _ in range(200):
        depth = rng.randint(0, 12)
        doc: object = rng.choice([1, "a]}\\\"[{", None])
        for _ in range(depth):
            doc = [doc, "x[{"] if rng.random() < 0.5 else {"k{": doc, "e": "\\\\"}
        text = json.dumps(doc)
        assert json.loads(text) == doc
        assert not json_depth(text, depth) and (depth == 0 or json_depth(text, depth - 1)), text


def test_limits_answer_with_openai_errors(tiny_chat_dir):
    srv = _server(tiny_chat_dir, max_body_bytes=4096, max_json_depth=8, max_n=2, max_messages=3)
    url = srv.url + "/v1/chat/completions"
    try:
        big = {"model": srv.model, "messages": [{"role": "user", "content": "x" * 5000}]}
        r = httpx.post(url, json=big)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

        def chunks():  # no Content-Length: the size is counted as the body comes
            for _ in range(10):
                yield b" " * 1000
        r = httpx.post(url, content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"

        deep = {"model": srv.model, "messages": CHAT, "response_format": {"type": "json_schema", "json_schema": {
            "name": "d", "schema": json.loads('{"items":' * 9 + "{}" + "}" * 9)}}}
        r = httpx.post(url, json=deep)
        assert r.status_code == 400 and r.json()["error"]["code"] == "json_too_deep"
        hostile = b'{"model": "m", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"  # would recurse deeply
        r = httpx.post(url, content=hostile[:4000], headers={"content-type": "application/json"})
        assert r.status_code == 400 and "nests deeper" in r.json()["error"]["message"]

        c = srv.client()
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model=srv.model, messages=CHAT, n=3, max_tokens=2)
        assert e.value.body["param"] == "n" and "at most 2" in e.value.body["message"]
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model=srv.model, prompt=["a", "b"], n=2, max_tokens=2)
        assert e.value.body["param"] == "n"
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model=srv.model, messages=CHAT * 4, max_tokens=2)
        assert e.value.body["param"] == "messages"
        ok = c.chat.completions.create(model=srv.model, messages=CHAT * 3, n=2, max_tokens=3)
        assert len(ok.choices) == 2
        _idle_and_whole(srv)
    finally:
        srv.close()


def test_a_full_queue_answers_429_at_once(tiny_chat_dir):
    """One sequence runs at a time; two more wait; the fourth is refused without waiting, and the three finish."""
    srv = _server(tiny_chat_dir, slow=0.02, max_num_seqs=1, max_waiting=2)
    body = {"model": srv.model, "messages": CHAT, "max_tokens": 60, "ignore_eos": True, "stream": True}
    try:
        with httpx.Client(timeout=60) as h:
            streams = [h.stream("POST", srv.url + "/v1/chat/completions", json=body) for _ in range(3)]
            responses = []
            for s in streams:
                responses.append(s.__enter__())
                deadline = time.monotonic() + 10
                while srv.stats()["running"] + srv.stats()["waiting"] < len(responses):
                    assert time.monotonic() < deadline
                    time.sleep(0.01)
            assert srv.stats()["waiting"] == 2
            t = time.monotonic()
            r = h.post(srv.url + "/v1/chat/completions", json={**body, "stream": False})
            assert r.status_code == 429 and time.monotonic() - t < 1.0
            err = r.json()["error"]
            assert err["type"] == "rate_limit_error" and err["code"] == "rate_limit_exceeded"
            for resp, s in zip(responses, streams):
                lines = [line for line in resp.iter_lines() if line]
                assert lines[-1] == "data: [DONE]"
                finishes = [json.loads(x[6:])["choices"][0]["finish_reason"] for x in lines[:-1]
                            if json.loads(x[6:])["choices"]]
                assert finishes[-1] == "length"
                s.__exit__(None, None, None)
        _idle_and_whole(srv)
    finally:
        srv.close()


def test_a_request_past_its_timeout_ends_with_what_it_has(tiny_chat_dir):
    srv = _server(tiny_chat_dir, slow=0.02, request_timeout=0.5)
    try:
        c = srv.client()
        t = time.monotonic()
        r = c.chat.completions.create(model=srv.model, messages=CHAT, max_tokens=200,
                                      extra_body={"ignore_eos": True})
        took = time.monotonic() - t
        assert r.choices[0].finish_reason == "length" and 1 <= r.usage.completion_tokens < 200
        assert took < 5, took  # 200 steps would take 4 s and more
        chunks = list(c.chat.completions.create(model=srv.model, messages=CHAT, max_tokens=200, stream=True,
                                                extra_body={"ignore_eos": True}))
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
        with pytest.raises(openai.APIStatusError) as e:  # SoT's job stops at its next event
            c.chat.completions.create(model=srv.model, messages=CHAT, extra_body={"sot": "sot"})
        assert e.value.status_code == 504 and e.value.body["code"] == "request_timeout"
        _idle_and_whole(srv)
        # with time to spare, the same server answers in full
        quick = c.chat.completions.create(model=srv.model, messages=CHAT, max_tokens=5,
                                          extra_body={"ignore_eos": True})
        assert quick.choices[0].finish_reason == "length" and quick.usage.completion_tokens == 5
    finally:
        srv.close()
