"""Structured output through the official client on the embedded model: the JSON always validates."""
from __future__ import annotations

import json
from typing import Literal

import pytest
from pydantic import BaseModel, Field

ASK = [{"role": "user", "content": "What is the capital of France? Answer in JSON."}]


class Capital(BaseModel):
    city: str = Field(max_length=40)
    country: str = Field(max_length=40)
    confidence: int = Field(ge=0, le=10)


class Weather(BaseModel):
    city: str = Field(max_length=30)
    unit: Literal["celsius", "fahrenheit"]


class Clock(BaseModel):
    city: str


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {**Weather.model_json_schema(), "additionalProperties": False}}}
CLOCK_TOOL = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                   "required": ["city"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def srv(serve_smollm2):
    return serve_smollm2()


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=1.0, seed=7)], ids=["greedy", "sampled"])
def test_json_schema_parses(srv, sampling):
    r = srv.client().beta.chat.completions.parse(model=srv.model, messages=ASK, response_format=Capital,
                                                 max_tokens=80, **sampling)
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(r.choices[0].message.parsed, Capital)


def test_json_object(srv):
    r = srv.client().chat.completions.create(model=srv.model, messages=ASK, max_tokens=60, temperature=0,
                                             response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_forced_tool_call(srv):
    c = srv.client()
    msgs = [{"role": "user", "content": "What's the weather like in Paris?"}]
    kw = dict(model=srv.model, messages=msgs, tools=[CLOCK_TOOL, WEATHER_TOOL], max_tokens=60, temperature=0)
    r = c.chat.completions.create(tool_choice={"type": "function", "function": {"name": "get_weather"}}, **kw)
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].message.content is None and r.choices[0].finish_reason == "tool_calls"
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    Weather.model_validate_json(call.function.arguments)
    # streamed: the same arguments, in pieces
    chunks = list(c.chat.completions.create(stream=True, tool_choice={"type": "function", "function": {
        "name": "get_weather"}}, **kw))
    args = "".join(tc.function.arguments or "" for ch in chunks if ch.choices
                   for tc in ch.choices[0].delta.tool_calls or [])
    assert args == call.function.arguments
    # "required" over two tools: the model picks one, its arguments fit that tool
    r = c.chat.completions.create(tool_choice="required", **kw)
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name in ("get_weather", "get_time")
    (Weather if call.function.name == "get_weather" else Clock).model_validate_json(call.function.arguments)


def test_bad_schema_is_a_400(srv):
    import openai
    with pytest.raises(openai.BadRequestError):
        srv.client().chat.completions.create(
            model=srv.model, messages=ASK, max_tokens=8,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}})
    st = srv.wait_idle()
    assert st["free_blocks"] == st["total_blocks"]
