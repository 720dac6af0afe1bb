"""The seed's API-style SoT client, unchanged, against `sot serve` on the embedded model: wall time per stage.

    python -m benchmarks.seed_flow                      # writes benchmarks/results/cpu/seed_flow.json
    python -m benchmarks.seed_flow --open               # plain JSON Schema (objects open), for comparison

The client (shared/seeds/003: instructor over AsyncOpenAI) asks for a `Skeleton` of `Point`s, then expands every
point at once with asyncio.gather. Its pydantic models are the defaults: no `additionalProperties`, no length
limits, and no `max_tokens` and no temperature are sent. Only the base URL and the model name differ.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from pydantic import BaseModel

from benchmarks import common

QUESTIONS = ["Compose an engaging travel blog post about a recent trip to Hawaii, highlighting cultural experiences "
             "and must-see attractions.",  # the seed's own question
             "What are the main causes of inflation?"]


class Point(BaseModel):
    index: int
    description: str


class Skeleton(BaseModel):
    points: list[Point]


class Response(BaseModel):
    response: str


def skeleton_prompt(question: str) -> str:  # the seed's text, indentation included
    return f"""
                You’re an organizer responsible for only giving the skeleton (not the full content) for answering the question.
                Provide the skeleton in a list of points (numbered 1., 2., 3., etc.) to answer the question.
                Instead of writing a full sentence, each skeleton point should be very short with only 3∼5 words.
                Generally, the skeleton should have 3∼10 points.

                Now, please provide the skeleton for the following question.

                <question>
                {question}
                </question>

                Skeleton:
                """  # noqa: E501


def point_prompt(question: str, skeleton: Skeleton, index: int) -> str:
    return f"""
                You’re responsible for continuing the writing of one and only one point in the overall answer to the following question.

                <question>
                {question}
                </question>

                The skeleton of the answer is:

                <skeleton>
                {skeleton}
                </skeleton>

                Continue and only continue the writing of point {index}.
                Write it **very shortly** in 1∼2 sentence and do not continue with other points!
                """  # noqa: E501


async def flow(url: str, model: str, question: str) -> dict:
    """One question through the seed's client: the objects, each completion's finish reason and raw arguments."""
    import instructor
    from openai import AsyncOpenAI
    client = instructor.from_openai(AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0))
    t0 = time.perf_counter()
    skeleton, c = await client.chat.completions.create_with_completion(
        model=model, response_model=Skeleton, max_retries=0,
        messages=[{"role": "user", "content": skeleton_prompt(question)}])
    t1 = time.perf_counter()
    done = await asyncio.gather(*[client.chat.completions.create_with_completion(
        model=model, response_model=Response, max_retries=0,
        messages=[{"role": "user", "content": point_prompt(question, skeleton, p.index)}]) for p in skeleton.points])
    t2 = time.perf_counter()
    await client.client.close()

    def raw(completion) -> dict:
        ch = completion.choices[0]
        return {"finish_reason": ch.finish_reason, "completion_tokens": completion.usage.completion_tokens,
                "arguments": json.loads(ch.message.tool_calls[0].function.arguments)}
    return {"question": question, "skeleton": skeleton, "skeleton_raw": raw(c), "skeleton_s": t1 - t0,
            "responses": [r for r, _ in done], "responses_raw": [raw(x) for _, x in done], "expand_s": t2 - t1}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--open", action="store_true", help="serve with --no-strict-json")
    args = ap.parse_args(argv)
    from sot_engine.engine import LLM
    from sot_engine.sot.server.background import BackgroundServer
    srv = BackgroundServer(LLM("default"), strict_json=not args.open)
    runs = []
    try:
        for q in QUESTIONS:
            r = asyncio.run(flow(srv.url, srv.model, q))
            runs.append({"question": q, "points": len(r["skeleton"].points), "skeleton_s": round(r["skeleton_s"], 2),
                         "expand_s": round(r["expand_s"], 2), "total_s": round(r["skeleton_s"] + r["expand_s"], 2),
                         "finish_reasons": [r["skeleton_raw"]["finish_reason"]]
                         + [x["finish_reason"] for x in r["responses_raw"]],
                         "completion_tokens": [r["skeleton_raw"]["completion_tokens"]]
                         + [x["completion_tokens"] for x in r["responses_raw"]]})
            print(json.dumps(runs[-1]), flush=True)
        device = srv.llm.engine.device
    finally:
        srv.close()
    name = "seed_flow" + ("_open" if args.open else "")
    print(f"wrote {common.write_result(name, device, {'strict_json': not args.open, 'runs': runs})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
