"""What a long prompt does to the streams already running: 32 streaming chat requests on `sot serve`, and a
~4000-token prompt arriving once they all stream; inter-token latency of the 32 (p50/p99/max of the gaps between
their chunks while the long prompt is prefilled, and over the whole run) and the long prompt's time to first
token, with chunked prefill (a token budget per step) and without.

    python -m benchmarks.chunked_prefill                      # SmolLM2: unchunked, then chunks of 512 and 256
    python -m benchmarks.chunked_prefill --budgets 0 512      # 0: unchunked
"""
from __future__ import annotations

import argparse
import asyncio
import time

from benchmarks.server_load import percentiles

STREAMS, STREAM_TOKENS, LONG_TOKENS = 32, 96, 4000


async def stream(client, model: str, question: str, max_tokens: int, started: asyncio.Event | None,
                 counter: list[int]) -> list[float]:
    """The arrival times of the request's content chunks."""
    times: list[float] = []
    s = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                             max_tokens=max_tokens, temperature=0, stream=True,
                                             extra_body={"ignore_eos": True})
    async for ch in s:
        if ch.choices and ch.choices[0].delta.content:
            times.append(time.perf_counter())
            if len(times) == 4 and started is not None:  # every stream is past its prefill
                counter[0] += 1
                if counter[0] == STREAMS:
                    started.set()
    return times


async def scenario(server, questions: list[str], long_prompt: str) -> dict:
    client = server.async_client(timeout=900)
    started, counter = asyncio.Event(), [0]
    try:
        tasks = [asyncio.create_task(stream(client, server.model, q, STREAM_TOKENS, started, counter))
                 for q in questions]
        await asyncio.wait_for(started.wait(), 600)
        t0 = time.perf_counter()
        long_times = await stream(client, server.model, long_prompt, 2, None, [0])
        long_ttft = long_times[0] - t0
        times = await asyncio.gather(*tasks)
    finally:
        await client.close()
    window = (t0, t0 + long_ttft)
    gaps, during = [], []
    for ts in times:
        for a, b in zip(ts, ts[1:]):
            gaps.append(b - a)
            if b > window[0] and a < window[1]:  # a gap that overlaps the long prompt's prefill
                during.append(b - a)
    return {"long_prompt_ttft_s": long_ttft, "itl_during_long_prefill_s": percentiles(during),
            "itl_all_s": percentiles(gaps), "gaps_during": len(during)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--budgets", type=int, nargs="+", default=[0, 512, 256], help="token budgets; 0: unchunked")
    args = ap.parse_args(argv)
    from benchmarks.common import write_result
    from sot_engine.engine import LLM
    from sot_engine.sot.bench import load_dataset
    from sot_engine.sot.server.background import BackgroundServer
    questions = [q.text for q in load_dataset("vicuna80")][:STREAMS]
    runs = []
    for budget in args.budgets:
        llm = LLM(args.model, max_num_seqs=STREAMS + 1, enable_chunked_prefill=budget > 0,
                  max_num_batched_tokens=budget or 8192, enable_prefix_caching=False)
        tok = llm.tokenizer
        text, ids = "", []
        for q in load_dataset("vicuna80"):
            text += q.text + "\n"
        while len(ids) < LONG_TOKENS:
            text += text
            ids = tok.encode(text)
        long_prompt = tok.decode(ids[:LONG_TOKENS - 40]) + "\nSummarize the questions above in one line."
        server = BackgroundServer(llm)
        try:
            res = asyncio.run(scenario(server, questions, long_prompt))
            st = server.wait_idle()
        finally:
            server.close()
        res = {"chunked_prefill": budget > 0, "max_num_batched_tokens": budget or None,
               "long_prompt_tokens": len(llm.engine.encode([{"role": "user", "content": long_prompt}])),
               "leaked_blocks": st["total_blocks"] - st["free_blocks"], **res}
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in res.items()}, flush=True)
        runs.append(res)
        device = llm.engine.device
        del llm, server
    out = {"model": "default" if args.model == "default" else args.model, "streams": STREAMS,
           "stream_tokens": STREAM_TOKENS, "runs": runs}
    print("wrote", write_result("chunked_prefill", device, out))


if __name__ == "__main__":
    main()
