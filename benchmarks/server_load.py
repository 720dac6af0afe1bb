"""Load on `sot serve`: N concurrent streaming chat requests over loopback; latency percentiles, no errors, no
leaked KV blocks.

    python -m benchmarks.server_load                  # SmolLM2, 64 concurrent streams of 64 tokens
    python -m benchmarks.server_load --quick          # 16 streams of 8 tokens (CI smoke)

Every request is a different Vicuna-80 question with the same system prompt (its blocks come from the prefix
cache after the first request), and runs to exactly `--max-tokens` tokens (ignore_eos) so runs compare.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import torch

from benchmarks.common import write_result

SYSTEM = "You are a helpful assistant. Answer the question clearly and concisely, in plain English."


def percentiles(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    pick = lambda q: xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]  # noqa: E731 -- nearest rank
    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "max": xs[-1], "mean": statistics.fmean(xs)}


async def one(client, model: str, question: str, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    first, tokens, text = None, 0, ""
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
        max_tokens=max_tokens, temperature=0, stream=True, extra_body={"ignore_eos": True},
        stream_options={"include_usage": True})
    usage = None
    async for ch in stream:
        if ch.choices and ch.choices[0].delta.content:
            first = first or time.perf_counter()
            text += ch.choices[0].delta.content
        if ch.usage is not None:
            usage = ch.usage
    end = time.perf_counter()
    tokens = usage.completion_tokens
    return {"ttft": (first or end) - t0, "latency": end - t0, "tokens": tokens,
            "cached": usage.prompt_tokens_details.cached_tokens, "prompt": usage.prompt_tokens}


async def load(server, questions: list[str], max_tokens: int) -> list[dict | BaseException]:
    client = server.async_client(timeout=600)
    try:
        return await asyncio.gather(*(one(client, server.model, q, max_tokens) for q in questions),
                                    return_exceptions=True)
    finally:
        await client.close()


def run(llm, n: int, max_tokens: int) -> dict:
    from sot_engine.sot.bench import load_dataset
    from sot_engine.sot.server.background import BackgroundServer
    questions = [q.text for q in load_dataset("vicuna80")]
    questions = [questions[i % len(questions)] + ("" if i < len(questions) else f" ({i})") for i in range(n)]
    server = BackgroundServer(llm)
    try:
        t0 = time.perf_counter()
        results = asyncio.run(load(server, questions, max_tokens))
        wall = time.perf_counter() - t0
        stats = server.wait_idle()
    finally:
        server.close()
    errors = [repr(r) for r in results if isinstance(r, BaseException)]
    ok = [r for r in results if not isinstance(r, BaseException)]
    out = {"requests": n, "max_tokens": max_tokens, "errors": errors, "wall_s": wall,
           "completion_tokens": sum(r["tokens"] for r in ok), "cached_prompt_tokens": sum(r["cached"] for r in ok),
           "prompt_tokens": sum(r["prompt"] for r in ok),
           "leaked_blocks": stats["total_blocks"] - stats["free_blocks"], "max_decode_batch": stats["max_decode_batch"]}
    if ok:
        out["ttft_s"] = percentiles([r["ttft"] for r in ok])
        out["latency_s"] = percentiles([r["latency"] for r in ok])
        out["tokens_per_s"] = out["completion_tokens"] / wall
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="16 requests of 8 tokens")
    ap.add_argument("--no-chunked-prefill", action="store_true", help="the engine without chunked prefill")
    args = ap.parse_args(argv)
    from sot_engine.engine import LLM
    n, max_tokens = (16, 8) if args.quick else (args.requests, args.max_tokens)
    llm = LLM(args.model, max_num_seqs=max(n, 1), enable_chunked_prefill=not args.no_chunked_prefill)
    res = run(llm, n, max_tokens)
    print({k: v for k, v in res.items() if k != "errors"}, "errors:", len(res["errors"]), flush=True)
    name = ("server_load_quick" if args.quick else "server_load") + ("_unchunked" if args.no_chunked_prefill else "")
    print("wrote", write_result(name, llm.engine.device, {"model": llm.engine.model_name,
                                                         "chunked_prefill": not args.no_chunked_prefill, **res}))


if __name__ == "__main__":
    main()
