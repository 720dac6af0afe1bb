"""`/metrics`: Prometheus text that agrees with what the requests got and with the engine's own counters."""
from __future__ import annotations

import httpx
import pytest

from tests.server.test_openai_api import CHAT

parser = pytest.importorskip("prometheus_client.parser")


def scrape(srv) -> dict[tuple[str, tuple], float]:
    r = httpx.get(srv.url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for fam in parser.text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[s.name, tuple(sorted(s.labels.items()))] = s.value
    return out


def test_metrics_count_what_the_requests_got(tiny_chat_dir):
    from sot_engine.engine import LLM
    from sot_engine.sot.server.background import BackgroundServer
    srv = BackgroundServer(LLM(str(tiny_chat_dir), max_model_len=256, num_blocks=128, block_size=4))
    try:
        c = srv.client()
        usages = []
        r = c.chat.completions.create(model=srv.model, messages=CHAT, max_tokens=7, temperature=0)
        usages.append(r.usage)
        text = ""
        for ch in c.chat.completions.create(model=srv.model, messages=CHAT, max_tokens=5, temperature=0, seed=3,
                                            stream=True, stream_options={"include_usage": True}):
            if ch.usage:
                usages.append(ch.usage)
        r = c.chat.completions.create(model=srv.model, messages=CHAT, max_tokens=4, temperature=0, n=2, seed=1)
        usages.append(r.usage)
        assert httpx.post(srv.url + "/v1/chat/completions", json={"model": srv.model, "messages": []}).status_code == 400
        assert httpx.get(srv.url + "/v1/nope").status_code == 404
        sot = httpx.post(srv.url + "/v1/chat/completions", json={"model": srv.model, "messages": CHAT, "sot": "normal",
                                                                 "max_tokens": 3}).json()
        st = srv.wait_idle()
        m = scrape(srv)
    finally:
        srv.close()
    # per sequence: the n=2 request's prompt counts twice (its usage counts it once, as OpenAI's does)
    prompt = sum(u.prompt_tokens for u in usages) + usages[2].prompt_tokens + sot["usage"]["prompt_tokens"]
    generated = sum(u.completion_tokens for u in usages) + sot["usage"]["completion_tokens"]
    assert m["vllm:prompt_tokens_total", ()] == prompt and m["vllm:generation_tokens_total", ()] == generated
    requests = 5  # one, one streamed, two choices (n=2), the SoT answer's normal decoding
    assert m["vllm:time_to_first_token_seconds_count", ()] == requests
    assert m["vllm:inter_token_latency_seconds_count", ()] == generated - requests
    assert sum(v for (name, _), v in m.items() if name == "vllm:request_success_total") == requests
    assert m["vllm:request_success_total", (("finished_reason", "length"),)] >= 1
    h = {labels: v for (name, labels), v in m.items() if name == "http_requests_total"}
    key = lambda route, status: (("handler", route), ("method", "POST"), ("status", str(status)))  # noqa: E731
    assert h[key("/v1/chat/completions", 200)] == 4 and h[key("/v1/chat/completions", 400)] == 1
    assert h[(("handler", "other"), ("method", "GET"), ("status", "404"))] == 1
    assert m["sot:answers_total", (("mode", "normal"), ("router", "asked"))] == 1
    assert m["vllm:num_requests_running", ()] == 0 and m["vllm:num_requests_waiting", ()] == 0
    assert m["vllm:kv_cache_usage_perc", ()] == 0.0
    assert m["vllm:prefix_cache_hits_total", ()] == st["prefix_cache_hit_tokens"] > 0  # n=2 shares its prompt
    assert m["vllm:prefix_cache_queries_total", ()] == st["prefix_cache_hit_tokens"] + st["prefill_tokens"]
    assert m["sot:cached_prompt_tokens_total", ()] >= st["prefix_cache_hit_tokens"]


def test_aborted_streams_are_counted_and_forgotten(tiny_chat_dir):
    from sot_engine.engine import LLM
    from sot_engine.sot.server.background import BackgroundServer
    # room for 2000 tokens: the server notices the hang-up long before it could finish (a race otherwise)
    srv = BackgroundServer(LLM(str(tiny_chat_dir), max_model_len=2048, num_blocks=1024, block_size=4))
    try:
        for _ in range(3):  # read two chunks, then hang up
            with httpx.stream("POST", srv.url + "/v1/chat/completions",
                              json={"model": srv.model, "messages": CHAT, "max_tokens": 2000, "stream": True,
                                    "ignore_eos": True}) as r:
                for i, _ in enumerate(r.iter_lines()):
                    if i > 3:
                        break
        st = srv.wait_idle()
        m = scrape(srv)
        assert st["free_blocks"] == st["total_blocks"]
        assert m["vllm:request_success_total", (("finished_reason", "abort"),)] == 3
        assert not srv.app.state.server.metrics._last  # no per-request state left behind
    finally:
        srv.close()
