"""The server through the official `openai` client: what it returns is what the engine generates."""
from __future__ import annotations

import json

import httpx
import openai
import pytest

from sot_engine.engine import SamplingParams

CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colors."}]


def engine_text(srv, messages, **params) -> str:
    """The same request straight through the engine (on the engine thread, between two steps)."""
    import asyncio

    async def run():
        ids = srv.llm.engine.encode(messages)
        stream = await srv.app.state.server.engine.generate(ids, SamplingParams(**params))
        text = ""
        async for d in stream:
            text += d.text
        return text
    return asyncio.run(run())


def test_health_and_models(tiny_server):
    assert httpx.get(tiny_server.url + "/health").json() == {"status": "ok"}
    models = tiny_server.client().models.list()
    assert [m.id for m in models.data] == [tiny_server.model]


def test_chat_matches_engine(tiny_server):
    c = tiny_server.client()
    r = c.chat.completions.create(model=tiny_server.model, messages=CHAT, max_tokens=12, temperature=0)
    want = engine_text(tiny_server, CHAT, temperature=0, max_tokens=12)
    assert r.choices[0].message.content == want
    assert r.choices[0].message.role == "assistant"
    ids = tiny_server.llm.engine.encode(CHAT)
    assert r.usage.prompt_tokens == len(ids)
    assert 1 <= r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens_details.cached_tokens >= 0
    assert r.choices[0].finish_reason in ("stop", "length")


def test_stream_equals_non_stream(tiny_server):
    c = tiny_server.client()
    kw = dict(model=tiny_server.model, messages=CHAT, max_tokens=16, temperature=0)
    whole = c.chat.completions.create(**kw)
    chunks = list(c.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[0].choices[0].delta.role == "assistant"


def test_n_choices_are_seeded_streams(tiny_server):
    c = tiny_server.client()
    r = c.chat.completions.create(model=tiny_server.model, messages=CHAT, max_tokens=10, temperature=1.0,
                                  seed=123, n=3)
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    for i, ch in enumerate(r.choices):  # choice i is the request seeded seed+i, whatever ran beside it
        assert ch.message.content == engine_text(tiny_server, CHAT, temperature=1.0, seed=123 + i, max_tokens=10)
    assert len({ch.message.content for ch in r.choices}) > 1
    assert r.usage.completion_tokens > 10  # all three counted; the prompt once
    assert r.usage.prompt_tokens == len(tiny_server.llm.engine.encode(CHAT))


def test_stop_string_cuts_the_text(tiny_server):
    c = tiny_server.client()
    kw = dict(model=tiny_server.model, messages=CHAT, max_tokens=24, temperature=0)
    full = c.chat.completions.create(**kw).choices[0].message.content
    assert len(full) > 8, full
    stop = full[4:7]
    r = c.chat.completions.create(stop=[stop, "\u2603never"], **kw)
    assert r.choices[0].message.content == full[:full.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_completions_endpoint(tiny_server):
    c = tiny_server.client()
    r = c.completions.create(model=tiny_server.model, prompt=["Once upon a time", "The sky"], max_tokens=8,
                             temperature=0)
    assert len(r.choices) == 2
    for ch, p in zip(r.choices, ["Once upon a time", "The sky"]):
        assert ch.text == engine_text(tiny_server, p, temperature=0, max_tokens=8)
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model=tiny_server.model, prompt="Once upon a time", max_tokens=8, temperature=0, stream=True))
    assert streamed == r.choices[0].text


def _error(resp: httpx.Response) -> dict:
    body = resp.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), body
    return body["error"]


def test_errors_are_openai_shaped(tiny_server):
    url = tiny_server.url + "/v1/chat/completions"
    r = httpx.post(url, content=b'{"model": "x", "messages": [', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in _error(r)["message"]
    c = tiny_server.client()
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="no-such-model", messages=CHAT)
    assert e.value.body["code"] == "model_not_found"
    long = [{"role": "user", "content": "word " * 400}]
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=tiny_server.model, messages=long, max_tokens=4)
    assert e.value.body["code"] == "context_length_exceeded"
    for bad in ({"temperature": 5}, {"top_p": 0}, {"n": 0}, {"max_tokens": 0}, {"presence_penalty": 1.0},
                {"stop": [""]}, {"tool_choice": "required"}):
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model=tiny_server.model, messages=CHAT, **bad)
        assert e.value.status_code == 400 and e.value.body["type"] == "invalid_request_error", bad
    r = httpx.post(url, json={"model": tiny_server.model, "messages": []})
    assert r.status_code == 400 and _error(r)["param"] == "messages"
    r = httpx.post(url, json={"model": tiny_server.model, "messages": [{"role": "wizard", "content": "hi"}]})
    assert r.status_code == 400 and "role" in _error(r)["message"]
    # none of that reached the engine or disturbed it
    ok = c.chat.completions.create(model=tiny_server.model, messages=CHAT, max_tokens=4, temperature=0)
    assert ok.choices[0].message.content == engine_text(tiny_server, CHAT, temperature=0, max_tokens=4)


def test_disconnect_mid_stream_frees_blocks(tiny_server):
    body = {"model": tiny_server.model, "messages": CHAT, "max_tokens": 200, "temperature": 0,
            "stream": True, "ignore_eos": True}
    with httpx.stream("POST", tiny_server.url + "/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
    assert any(line.startswith("data: ") for line in got)
    st = tiny_server.wait_idle()
    assert (st["running"], st["waiting"]) == (0, 0)
    assert st["free_blocks"] == st["total_blocks"], st


def test_json_events_are_well_formed(tiny_server):
    body = {"model": tiny_server.model, "messages": CHAT, "max_tokens": 5, "stream": True}
    with httpx.stream("POST", tiny_server.url + "/v1/chat/completions", json=body) as r:
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    for e in events[:-1]:
        assert json.loads(e.removeprefix("data: "))["object"] == "chat.completion.chunk"


def test_no_max_tokens_on_a_pool_smaller_than_the_context(tiny_chat_dir):
    """Without max_tokens a request may run as far as the KV pool goes (here 64 tokens, the context 256): it is
    answered, ending with "length", not refused because a full context would not fit the pool."""
    from sot_engine.engine import LLM
    from sot_engine.sot.server.background import BackgroundServer
    srv = BackgroundServer(LLM(str(tiny_chat_dir), max_model_len=256, num_blocks=16, block_size=4))
    try:
        c = srv.client()
        r = c.chat.completions.create(model=srv.model, messages=CHAT, temperature=0, extra_body={"ignore_eos": True})
        assert r.choices[0].finish_reason == "length"
        assert r.usage.prompt_tokens + r.usage.completion_tokens == 64
        st = srv.wait_idle()
        assert st["free_blocks"] == st["total_blocks"]
    finally:
        srv.close()


def test_api_key_guards_v1_only(tiny_chat_dir):
    from sot_engine.engine import LLM
    from sot_engine.sot.server.app import create_app
    from sot_engine.sot.server.background import BackgroundServer
    with pytest.raises(ValueError, match="api_key must be a non-empty string"):
        create_app(LLM(str(tiny_chat_dir), num_blocks=16, block_size=4), api_key=" ")
    srv = BackgroundServer(LLM(str(tiny_chat_dir), max_model_len=128, num_blocks=64, block_size=4), api_key="s3cret")
    try:
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "s3cret"},
                        {"Authorization": "Bearer s3cret2"}, {"Authorization": "bearer s3cret"}):
            for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions")):
                r = httpx.request(method, srv.url + path, headers=headers, json={"model": srv.model, "messages": CHAT})
                assert r.status_code == 401, (headers, path)
                err = r.json()["error"]
                assert err["code"] == "invalid_api_key" and "s3cret" not in r.text
        assert httpx.get(srv.url + "/health").status_code == 200 and httpx.get(srv.url + "/stats").status_code == 200
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0)
        assert c.chat.completions.create(model=srv.model, messages=CHAT, max_tokens=3).usage.completion_tokens >= 1
    finally:
        srv.close()
