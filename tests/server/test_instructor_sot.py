"""The API-style SoT client of the seed (instructor: a skeleton object, then every point at once with
asyncio.gather), unchanged, against the server on the embedded model: every object validates, the point
requests ran as one batch and their shared prompt prefix came from the prefix cache."""
from __future__ import annotations

import asyncio

import pytest
from pydantic import BaseModel, Field

instructor = pytest.importorskip("instructor")

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


async def sot_flow(base_url: str, model: str):
    from openai import AsyncOpenAI
    client = instructor.from_openai(AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0))
    kw = dict(model=model, temperature=0, max_tokens=200, max_retries=0)
    skeleton, _ = await client.chat.completions.create_with_completion(
        response_model=Skeleton, messages=[{"role": "user", "content": skeleton_prompt(QUESTION)}], **kw)
    tasks = [client.chat.completions.create_with_completion(
        response_model=Response, messages=[{"role": "user", "content": point_prompt(QUESTION, skeleton, p.index)}],
        **kw) for p in skeleton.points]
    return skeleton, await asyncio.gather(*tasks)


def test_instructor_sot_flow(serve_smollm2):
    srv = serve_smollm2()
    skeleton, expansions = asyncio.run(sot_flow(srv.url + "/v1", srv.model))
    assert isinstance(skeleton, Skeleton) and 3 <= len(skeleton.points) <= 5
    for resp, completion in expansions:
        assert isinstance(resp, Response) and resp.response.strip()
        assert completion.choices[0].message.tool_calls  # instructor's default mode: a forced tool call
        assert completion.usage.prompt_tokens_details.cached_tokens > 0  # the question + skeleton prefix
    st = srv.wait_idle()
    assert st["max_decode_batch"] >= len(skeleton.points)  # the points decoded together
    assert st["free_blocks"] == st["total_blocks"]
