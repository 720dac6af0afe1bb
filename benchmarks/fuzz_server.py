"""Hostile and malformed requests against `sot serve`: every answer must be a success or an OpenAI-shaped error
(no 5xx, no traceback text), the server must stay up, and the KV pool must be whole afterwards.

    python -m benchmarks.fuzz_server                  # 5000 requests on the tiny random chat model
    (tests/server/test_fuzz.py runs 1000 of them in CI)

A seeded generator (reproducible: `--seed`) starts from a valid chat or completions body and breaks it: wrong
types, huge, negative and non-finite numbers, unknown and missing fields, deep JSON, invalid UTF-8, truncated
JSON, bad schemas and tools, odd message contents, wrong paths, methods and content types, and streams the client
drops after a few chunks.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

CHAT = [{"role": "user", "content": "Name three colors."}]
LIMITS = {"max_body_bytes": 64 << 10}  # the server's limits under fuzzing: a small body limit, so 413s are cheap
WEIRD = [None, True, -1, 0, 1, 2 ** 31, 2 ** 64, -2 ** 63, 1e308, -1e-308, 0.5, "", "x", "3", [], {}, [1, "a"],
         {"a": {"b": None}}, "\x00", "\ud800", "é" * 300, float("nan"), float("inf"), -float("inf")]
FIELDS = ["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
          "n", "seed", "stop", "stream", "stream_options", "ignore_eos", "response_format", "tools", "tool_choice",
          "sot", "sot_expansion", "presence_penalty", "logprobs", "logit_bias", "best_of", "echo", "user",
          "frequency_penalty", "parallel_tool_calls", "suffix", "top_logprobs"]
SCHEMAS = [{"type": "nonsense"}, {"$ref": "#/definitions/nowhere"}, {"type": "string", "pattern": "(unclosed"},
           {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]},
           {"type": "integer", "minimum": 5, "maximum": 1}, {"enum": []}, {"anyOf": []}, {"not": {}},
           {"type": "array", "items": {"type": "object"}, "minItems": 10 ** 9}, "not a schema", [],
           {"type": "object", "properties": {"x": {"type": "string", "format": "nonsense"}}},
           {"type": "string", "maxLength": -1}, {"allOf": [{"type": "string"}, {"type": "integer"}]},
           {"type": "object", "properties": {f"k{i}": {"type": "integer"} for i in range(200)}}]
CONTENTS = [None, 5, [], [{"type": "text", "text": "hi"}], [{"type": "image_url", "image_url": {"url": "x"}}],
            [{"type": "text"}], [{"text": 3}], {"text": "hi"}, "", " " * 50, "\x00\x01", "word " * 5000]


@dataclass
class Tally:
    statuses: Counter = field(default_factory=Counter)
    kinds: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)  # 5xx, malformed errors, traceback text, broken streams


def _valid(rng: random.Random, model: str) -> tuple[str, dict]:
    if rng.random() < 0.7:
        return "/v1/chat/completions", {"model": model, "messages": list(CHAT), "max_tokens": rng.randint(1, 6)}
    return "/v1/completions", {"model": model, "prompt": "Once upon a time", "max_tokens": rng.randint(1, 6)}


def _deep(depth: int) -> str:
    """JSON text nested `depth` levels (as text: Python's own encoder would recurse too deeply)."""
    return "".join("[" if i % 2 else '{"a":' for i in range(depth)) + "1" + \
        "".join("]" if i % 2 else "}" for i in reversed(range(depth)))


def case(rng: random.Random, model: str) -> tuple[str, str, str, bytes, dict, bool]:
    """(kind, method, path, body bytes, headers, drop_stream_early)"""
    path, body = _valid(rng, model)
    headers = {"content-type": "application/json"}
    kind = rng.choice(["field", "field", "field", "unknown", "missing", "deep", "utf8", "truncate", "schema",
                       "tools", "content", "roles", "route", "ctype", "stream_drop", "valid", "numbers", "sot",
                       "big"])
    drop = False
    if kind == "field":
        for _ in range(rng.randint(1, 3)):
            body[rng.choice(FIELDS)] = rng.choice(WEIRD)
    elif kind == "unknown":
        body[f"x_{rng.randint(0, 999)}"] = rng.choice(WEIRD)
    elif kind == "missing":
        body.pop(rng.choice(list(body)))
    elif kind == "deep":
        body[rng.choice(FIELDS + ["extra"])] = "@DEEP@"
    elif kind == "numbers":
        body[rng.choice(["max_tokens", "n", "seed", "top_k", "temperature", "top_p", "max_completion_tokens"])] = \
            rng.choice([-10 ** 30, 10 ** 30, 2 ** 63, -1, 0, 1e-320, 3.5, 10 ** 6])
    elif kind == "schema":
        path = "/v1/chat/completions"
        body = {"model": model, "messages": list(CHAT), "max_tokens": 8}
        s = rng.choice(SCHEMAS)
        body["response_format"] = rng.choice([{"type": "json_schema", "json_schema": {"name": "r", "schema": s}},
                                              {"type": "json_schema", "json_schema": s}, {"type": s},
                                              {"type": "json_schema"}, {"type": "json_object", "json_schema": s}])
    elif kind == "tools":
        path = "/v1/chat/completions"
        body = {"model": model, "messages": list(CHAT), "max_tokens": 8}
        name = rng.choice(["f", "", "bad name!", "x" * 100, None, 3])
        body["tools"] = rng.choice([[{"type": "function", "function": {"name": name,
                                                                       "parameters": rng.choice(SCHEMAS)}}],
                                    [{"type": "retrieval"}], "tools", [None], [{"function": {"name": "f"}}] * 2])
        body["tool_choice"] = rng.choice(["auto", "required", "none", {"type": "function", "function": {"name": "g"}},
                                          {"type": "function"}, 7, None])
    elif kind == "content":
        path = "/v1/chat/completions"
        body = {"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": rng.choice(CONTENTS)}]}
    elif kind == "roles":
        path = "/v1/chat/completions"
        body = {"model": model, "max_tokens": 4, "messages": rng.choice([
            [{"role": "wizard", "content": "hi"}], [{"content": "hi"}], [{"role": "user"}], ["hi"], [[]], "hi",
            [{"role": "assistant", "content": "x"}], [{"role": "system", "content": "x"}],
            [{"role": "tool", "content": "x", "tool_call_id": 3}], [{"role": "user", "content": "a"}] * 600])}
    elif kind == "sot":
        path = "/v1/chat/completions"
        body = {"model": model, "messages": rng.choice([list(CHAT), [{"role": "system", "content": "x"}]]),
                "sot": rng.choice(["auto", "sot", "normal", "bogus", 1]), "max_tokens": rng.choice([4, 8, -1]),
                "stream": rng.random() < 0.5, "n": rng.choice([1, 2])}
        drop = body["stream"] and rng.random() < 0.5
    elif kind == "route":
        return kind, rng.choice(["GET", "PUT", "DELETE", "PATCH"]), rng.choice(
            ["/v1/chat/completions", "/v1/nothing", "/v2/models", "/" + "a" * 3000, "/v1/models/x", "/%ff"]), \
            json.dumps(body).encode(), headers, False
    elif kind == "ctype":
        headers = {"content-type": rng.choice(["text/plain", "application/x-www-form-urlencoded", "", "x/y"])}
    elif kind == "big":  # past LIMITS.max_body_bytes
        body["messages" if "messages" in body else "prompt"] = "x" * rng.choice([70_000, 200_000])
    elif kind == "stream_drop":
        body["stream"], body["max_tokens"], body["ignore_eos"] = True, 40, True
        drop = True
    raw = json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")
    if kind == "deep":
        raw = raw.replace(b'"@DEEP@"', _deep(rng.choice([10, 60, 70, 300, 5000])).encode())
    if kind == "utf8":
        cut = rng.randrange(len(raw))
        raw = raw[:cut] + rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80\x80"]) + raw[cut:]
    elif kind == "truncate":
        raw = raw[:rng.randrange(len(raw))]
    return kind, "POST", path, raw, headers, drop


def check(kind: str, r: httpx.Response, text: str, tally: Tally) -> None:
    tally.statuses[r.status_code] += 1
    tally.kinds[kind] += 1
    bad = None
    if "Traceback" in text or 'File "' in text:
        bad = "traceback text"
    elif r.status_code >= 500:
        bad = f"status {r.status_code}"
    elif r.status_code >= 400:
        try:
            err = json.loads(text)["error"]
            if not (isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
                    and "param" in err and "code" in err):
                bad = "error fields"
        except (ValueError, KeyError, TypeError):
            bad = "not an OpenAI error"
    elif r.headers.get("content-type", "").startswith("text/event-stream"):
        for line in text.splitlines():
            if line.startswith("data: ") and line != "data: [DONE]":
                ev = json.loads(line[6:])
                if "error" in ev:
                    bad = f"error inside a stream: {ev['error']}"
    elif r.status_code == 200:
        try:
            body = json.loads(text)
            if r.request.url.path.endswith("completions") and not body.get("choices"):
                bad = "a success without choices"
        except ValueError:
            bad = "a success that is not JSON"
    if bad:
        tally.failures.append(f"{kind} {r.request.method} {r.request.url.path[:60]} -> {r.status_code} {bad}: "
                              f"{r.request.content[:160]!r} => {text[:300]!r}")


def fuzz(url: str, model: str, requests: int, seed: int = 0) -> Tally:
    rng, tally = random.Random(seed), Tally()
    with httpx.Client(base_url=url, timeout=120) as client:
        for _ in range(requests):
            kind, method, path, raw, headers, drop = case(rng, model)
            req = client.build_request(method, path, content=raw if method != "GET" else None, headers=headers)
            try:
                r = client.send(req, stream=True)
            except httpx.TransportError as e:
                tally.failures.append(f"{kind} {method} {path[:60]} -> {type(e).__name__} {e}: {raw[:160]!r}")
                continue
            try:
                if drop:  # read a few lines, then hang up
                    lines = r.iter_lines()
                    text = "".join(next(lines, "") + "\n" for _ in range(3))
                    tally.kinds["dropped"] += r.status_code == 200
                    if r.status_code != 200:
                        text += "".join(lines)
                else:
                    text = r.read().decode("utf-8", "replace")
            finally:
                r.close()
            check(kind, r, text, tally)
    return tally


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    import torch
    from benchmarks.common import write_result
    from sot_engine.engine import LLM
    from sot_engine.sot.server.background import BackgroundServer
    from sot_engine.sot.server.limits import ServerLimits
    from tests.conftest import make_tiny_chat  # the tests' tiny chat model, built in a temporary folder
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        srv = BackgroundServer(LLM(str(make_tiny_chat(d)), max_model_len=256, num_blocks=128, block_size=4),
                               limits=ServerLimits(**LIMITS))
        t = time.perf_counter()
        tally = fuzz(srv.url, srv.model, args.requests, args.seed)
        took = time.perf_counter() - t
        st = srv.wait_idle()
        alive = httpx.get(srv.url + "/health").status_code == 200
        srv.close()
    out = {"requests": args.requests, "seed": args.seed, "seconds": round(took, 1),
           "statuses": dict(sorted(tally.statuses.items())), "kinds": dict(sorted(tally.kinds.items())),
           "failures": tally.failures[:50], "num_failures": len(tally.failures), "alive": alive,
           "pool_whole": st["free_blocks"] == st["total_blocks"], "left_running": st["running"] + st["waiting"]}
    print(json.dumps(out, indent=1))
    write_result("fuzz_server", torch.device("cpu"), out)


if __name__ == "__main__":
    main()
