"""OpenAI's request bodies (the parameters we serve) and error shape, as pydantic models.

Parameters we do not implement are refused with a 400 naming them, unless they are set to their no-op value
(a client that sends `presence_penalty: 0` is fine); unknown fields are ignored, as OpenAI-compatible servers do.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# parameters we do not implement, with the values that ask for nothing (accepted)
_NOOP: dict[str, tuple] = {"presence_penalty": (0,), "frequency_penalty": (0,), "logit_bias": ({},),
                           "logprobs": (False, 0), "top_logprobs": (0,), "echo": (False,), "suffix": ("",),
                           "best_of": (1,), "parallel_tool_calls": (True, False)}


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> "_Body":
        for name, value in (self.model_extra or {}).items():
            if name in _NOOP and value is not None and value not in _NOOP[name]:
                raise ValueError(f"{name}={value!r} is not supported by this server")
        return self


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(_Body):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1)  # at most ServerLimits.max_n
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM's extensions
    top_k: int = Field(default=0, ge=-1)
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return stops


class Function(BaseModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None


class Tool(BaseModel):
    type: Literal["function"] = "function"
    function: Function


class NamedToolChoice(BaseModel):
    class _Name(BaseModel):
        name: str
    type: Literal["function"] = "function"
    function: _Name


class JSONSchemaFormat(BaseModel):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs a json_schema")
        return self


class ChatCompletionRequest(_Sampling):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    # beyond OpenAI: answer with Skeleton-of-Thought ("auto": the router decides; "sot"; "normal")
    sot: Literal["auto", "sot", "normal"] | None = None
    sot_expansion: Literal["paper", "continuation"] | None = None

    @model_validator(mode="after")
    def _tools_consistent(self) -> "ChatCompletionRequest":
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise ValueError("tool names must be unique")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise ValueError(f"tool_choice names {self.tool_choice.function.name!r}, which is not in tools")
        if self.tool_choice == "required" and not names:
            raise ValueError("tool_choice 'required' needs tools")
        if self.sot is not None and (self.tools or self.response_format and self.response_format.type != "text"):
            raise ValueError("sot answers in prose: it cannot be combined with tools or a response_format")
        if self.sot is not None and self.n != 1:
            raise ValueError("sot answers one choice: n must be 1")
        return self


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's legacy default

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("prompt is empty")
        return v
