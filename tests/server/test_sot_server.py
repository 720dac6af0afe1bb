"""The server's SoT switch on the embedded model: the answer is the SoT driver's, streamed in order."""
from __future__ import annotations

import json

import httpx
import pytest

from sot_engine.sot import SoT, SoTConfig

CFG = SoTConfig(skeleton_max_tokens=80, point_max_tokens=24, normal_max_tokens=32)
QUESTION = "What are the most effective ways to deal with stress?"


@pytest.fixture(scope="module")
def smol_server(serve_smollm2):
    return serve_smollm2(sot_config=CFG)


def test_sot_answer_is_the_drivers(smol_server, smollm2):
    c = smol_server.client()
    r = c.chat.completions.create(model=smol_server.model, messages=[{"role": "user", "content": QUESTION}],
                                  temperature=0, extra_body={"sot": "sot"})
    assert smollm2.llm.reset_prefix_cache()  # cold, as the new server's: earlier tests warmed the shared LLM
    want = SoT(smollm2.llm, CFG).answer(QUESTION, mode="sot")  # the library on its own LLM
    extra = r.model_dump()["sot"]
    assert extra["mode"] == want.mode == "sot"
    assert [p["point"] for p in extra["points"]] == [p.point for p in want.points]
    assert r.choices[0].message.content == want.text
    assert r.usage.completion_tokens == want.tokens.output
    assert r.usage.prompt_tokens_details.cached_tokens == want.tokens.expand_prompt - want.tokens.expand_prefilled > 0
    assert smol_server.stats()["max_decode_batch"] >= len(want.points)  # the points decoded as one batch


def test_sot_stream_is_ordered_and_complete(smol_server):
    body = {"model": smol_server.model, "messages": [{"role": "user", "content": QUESTION}], "temperature": 0,
            "stream": True, "sot": "sot"}
    whole = httpx.post(smol_server.url + "/v1/chat/completions", json={**body, "stream": False}, timeout=120).json()
    with httpx.stream("POST", smol_server.url + "/v1/chat/completions", json=body, timeout=120) as r:
        chunks = [json.loads(line.removeprefix("data: ")) for line in r.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    text = "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks if ch["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    events = [ch["sot"]["event"] for ch in chunks if ch.get("sot")]
    assert events[0] == "route" and "points" in events and "point_done" in events
    growing = [ch["sot"]["index"] for ch in chunks if ch.get("sot") and ch["sot"]["event"] == "point"]
    # the points grew together: some point got text before an earlier one was done
    first_done = next(i for i, ch in enumerate(chunks) if ch.get("sot") and ch["sot"]["event"] == "point_done")
    assert len({ch["sot"]["index"] for ch in chunks[:first_done]
                if ch.get("sot") and ch["sot"]["event"] == "point"}) > 1, growing
    assert chunks[-1]["sot"]["mode"] == "sot" and chunks[-2]["usage"]["completion_tokens"] > 0


def test_sot_errors_and_normal_requests_alongside(smol_server):
    url = smol_server.url + "/v1/chat/completions"
    r = httpx.post(url, json={"model": smol_server.model, "messages": [{"role": "user", "content": "   "}],
                              "sot": "auto"})
    assert r.status_code == 400 and "empty question" in r.json()["error"]["message"]
    r = httpx.post(url, json={"model": smol_server.model, "messages": [{"role": "user", "content": "hi"}],
                              "sot": "auto", "n": 2})
    assert r.status_code == 400
    st = smol_server.wait_idle()
    assert st["free_blocks"] == st["total_blocks"]
