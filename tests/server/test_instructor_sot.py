"""The API-style SoT client of the seed (instructor: a skeleton object, then every point at once with
asyncio.gather), unchanged, against the server on the embedded model: every object validates, the point
requests ran as one batch and their shared prompt prefix came from the prefix cache."""
from __future__ import annotations

import asyncio

import pytest
from pydantic import BaseModel, Field

instructor = pytest.importorskip("instructor")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # instructor 1.3 warns about itself

QUESTION = "What are the main benefits of regular exercise?"


class Point(BaseModel):
    index: int
    description: str = Field(max_length=48)


class Skeleton(BaseModel):
    points: list[Point] = Field(min_length=3, max_length=5)


class Response(BaseModel):
    response: str = Field(max_length=200)


def skeleton_prompt(question: str) -> str:
    return ("You're an organizer responsible for only giving the skeleton (not the full content) for answering "
            "the question. Provide the skeleton in a list of points (numbered 1., 2., 3., etc.) to answer the "
            "question. Instead of writing a full sentence, each skeleton point should be very short with only "
            "3~5 words. Generally, the skeleton should have 3~10 points.\n\nNow, please provide the skeleton for "
            f"the following question.\n\n<question>\n{question}\n</question>\n\nSkeleton:")


def point_prompt(question: str, skeleton: Skeleton, index: int) -> str:
    return ("You're responsible for continuing the writing of one and only one point in the overall answer to "
            f"the following question.\n\n<question>\n{question}\n</question>\n\nThe skeleton of the answer is:"
            f"\n\n<skeleton>\n{skeleton}\n</skeleton>\n\nContinue and only continue the writing of point "
            f"{index}. Write it **very shortly** in 1~2 sentence and do not continue with other points!")


async def sot_flow(srv):
    """The seed's flow, with the server's counters read between the two stages."""
    from openai import AsyncOpenAI
    client = instructor.from_openai(AsyncOpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0))
    kw = dict(model=srv.model, temperature=0, max_tokens=200, max_retries=0)
    skeleton, _ = await client.chat.completions.create_with_completion(
        response_model=Skeleton, messages=[{"role": "user", "content": skeleton_prompt(QUESTION)}], **kw)
    before = srv.wait_idle()
    tasks = [client.chat.completions.create_with_completion(
        response_model=Response, messages=[{"role": "user", "content": point_prompt(QUESTION, skeleton, p.index)}],
        **kw) for p in skeleton.points]
    return skeleton, await asyncio.gather(*tasks), before


def test_instructor_sot_flow(serve_smollm2):
    srv = serve_smollm2()
    skeleton, expansions, before = asyncio.run(sot_flow(srv))
    assert isinstance(skeleton, Skeleton) and 3 <= len(skeleton.points) <= 5
    prompts = 0
    for resp, completion in expansions:
        assert isinstance(resp, Response) and resp.response.strip()
        assert completion.choices[0].message.tool_calls  # instructor's default mode: a forced tool call
        prompts += completion.usage.prompt_tokens  # (instructor keeps the counts, drops the details)
    after = srv.wait_idle()
    assert after["max_decode_batch"] >= len(skeleton.points)  # the points decoded together
    # the question + skeleton prefix the point prompts repeat was served from the prefix cache, not prefilled
    hits = after["prefix_cache_hit_tokens"] - before["prefix_cache_hit_tokens"]
    prefilled = after["prefill_tokens"] - before["prefill_tokens"]
    assert prefilled + hits == prompts, (hits, prefilled, prompts)
    from sot_engine.sot.driver import common_prefix_len
    shared = common_prefix_len([srv.llm.engine.encode([{"role": "user", "content": point_prompt(
        QUESTION, skeleton, p.index)}]) for p in skeleton.points])
    full_blocks = shared // after["block_size"] * after["block_size"]
    assert full_blocks > 0 and hits >= (len(skeleton.points) - 1) * full_blocks, (hits, shared)
    assert after["free_blocks"] == after["total_blocks"]


def test_seed_client_unchanged_no_max_tokens_strict_objects(serve_smollm2):
    """The seed's own client (default pydantic models, no max_tokens, no temperature): with schemas read strictly
    (the default) every object has exactly its declared keys, and every call ends with the tool call, not the
    context's end (an open schema let SmolLM2 invent keys, and the skeleton once ran to 8192 tokens)."""
    from benchmarks.seed_flow import QUESTIONS, Point, Response, Skeleton, flow
    srv = serve_smollm2()
    for question in QUESTIONS:
        r = asyncio.run(flow(srv.url, srv.model, question))
        assert isinstance(r["skeleton"], Skeleton) and r["skeleton"].points
        assert len(r["responses"]) == len(r["skeleton"].points)
        assert set(r["skeleton_raw"]["arguments"]) == set(Skeleton.model_fields)
        for p in r["skeleton_raw"]["arguments"]["points"]:
            assert set(p) == set(Point.model_fields)
        for resp, raw in zip(r["responses"], r["responses_raw"]):
            assert isinstance(resp, Response) and set(raw["arguments"]) == set(Response.model_fields)
        reasons = [r["skeleton_raw"]["finish_reason"]] + [x["finish_reason"] for x in r["responses_raw"]]
        assert set(reasons) == {"tool_calls"}, reasons  # OpenAI's "stop" for a tool call
    st = srv.wait_idle()
    assert st["free_blocks"] == st["total_blocks"]
