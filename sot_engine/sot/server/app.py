"""`sot serve`: an OpenAI-compatible HTTP server over the engine, with a Skeleton-of-Thought switch.

API-style SoT clients (a skeleton request, then one request per point fired at once) run unchanged: their
point requests join one running batch (continuous batching, `engine.async_engine`) and the question and
skeleton they all repeat are served from the prefix cache. `{"sot": "auto"}` in a chat body runs the SoT
driver on the server instead and streams the points as they grow.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from sot_engine.engine import LLM, SamplingParams
from sot_engine.engine.async_engine import AsyncEngine, Delta, EngineDead, iterate
from sot_engine.engine.guided import GuidedDecoding, closed_schema
from sot_engine.sot.driver import Answer, SoT, SoTConfig
from sot_engine.sot.router import Router
from sot_engine.sot.server.limits import BodyLimit, ServerLimits
from sot_engine.sot.server.metrics import CONTENT_TYPE as METRICS_TYPE, Metrics
from sot_engine.sot.server.protocol import APIError, ChatCompletionRequest, CompletionRequest, NamedToolChoice, Tool
from sot_engine.sot.server.sot_stream import OrderedText

FINISH = {"stop": "stop", "length": "length", "abort": "stop"}


def _now() -> int:
    return int(time.time())


def _sse(obj: dict | str) -> bytes:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode()


def _text_of(content: Any) -> str:
    """A message's content: a string, OpenAI's list of parts (text parts are kept), or None."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for p in content:
            if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise APIError(400, "only text content parts are supported", param="messages")
            parts.append(p["text"])
        return "".join(parts)
    raise APIError(400, f"message content must be a string or a list of parts, got {type(content).__name__}",
                   param="messages")


def _messages(raw: list[dict[str, Any]]) -> list[dict[str, str]]:
    """OpenAI messages -> the engine's {"role", "content"} strings. Tool calls and tool results become text the
    model can read (the chat template knows only roles and strings)."""
    out = []
    for i, m in enumerate(raw):
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise APIError(400, f"messages[{i}] has an unknown role {role!r}", param=f"messages[{i}].role")
        text = _text_of(m.get("content"))
        if role == "assistant" and m.get("tool_calls"):
            calls = [{"name": c.get("function", {}).get("name"), "arguments": c.get("function", {}).get("arguments")}
                     for c in m["tool_calls"]]
            text = (text + "\n" if text else "") + json.dumps(calls)
        out.append({"role": "system" if role == "developer" else role, "content": text})
    return out


def _tool_prompt(tools: list[Tool], forced: str | None) -> str:
    lines = ["You can call these functions. To call one, answer with only a JSON object "
             '{"name": <function name>, "arguments": <arguments object>}.' if forced is None else
             f"Call the function {forced}: answer with only its JSON arguments object."]
    for t in tools:
        f = t.function
        lines.append(f"- {f.name}: {f.description or ''} Arguments schema: {json.dumps(f.parameters)}")
    return "\n".join(lines)


class Server:
    """The request handlers, over one `LLM` and its engine thread."""

    def __init__(self, llm: LLM, served_names: list[str] | None = None, sot_config: SoTConfig | None = None,
                 router: str | Router = "trained", strict_json: bool = True,
                 limits: ServerLimits | None = None) -> None:
        self.llm, self.strict_json, self.limits = llm, strict_json, limits or ServerLimits()
        self.metrics: Metrics | None = None  # create_app's
        self.names = served_names or [llm.engine.model_name]
        self.engine = AsyncEngine(llm.engine)
        self.sot = SoT(llm, sot_config, router=router) if llm.engine.chat_template is not None else None

    # ---- shared ---------------------------------------------------------------------------------
    def _strict(self, asked: bool | None) -> bool:
        """A schema is read strictly (closed objects) unless the request says `strict: false`, or the server was
        started with --no-strict-json and the request does not say `strict: true`."""
        return self.strict_json if asked is None else asked

    def check_model(self, name: str) -> None:
        if name not in self.names:
            raise APIError(404, f"The model {name!r} does not exist; this server serves {self.names}",
                           param="model", code="model_not_found")

    def admit(self, choices: int, messages: int = 0) -> None:
        """The per-request limits, before anything is tokenized or queued."""
        lim = self.limits
        if choices > lim.max_n:
            raise APIError(400, f"{choices} choices asked (n times prompts); this server gives at most {lim.max_n}",
                           param="n")
        if messages > lim.max_messages:
            raise APIError(400, f"{messages} messages; this server takes at most {lim.max_messages}",
                           param="messages")
        if self.engine.waiting() + 1 > lim.max_waiting:
            raise APIError(429, f"the server's queue is full ({lim.max_waiting} requests waiting); retry later",
                           type="rate_limit_error", code="rate_limit_exceeded")

    def deadline(self) -> float | None:
        return time.monotonic() + self.limits.request_timeout if self.limits.request_timeout else None

    def _params(self, req: ChatCompletionRequest | CompletionRequest, max_tokens: int | None, i: int,
                guided: GuidedDecoding | None = None, prompt_len: int = 0) -> SamplingParams:
        seed = None if req.seed is None else req.seed + i  # n choices: distinct, reproducible streams
        # no limit: as far as the context goes, or the KV pool where it holds less than one full context (vLLM's
        # default max_tokens), so that a request without max_tokens is never refused for the pool's size
        eng = self.llm.engine
        room = min(eng.max_model_len, eng.block_manager.num_blocks * eng.block_manager.block_size) - prompt_len
        limit = max_tokens or max(1, room)
        try:
            return SamplingParams(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, seed=seed,
                                  max_tokens=limit, stop=req.stop, ignore_eos=req.ignore_eos, guided=guided)
        except ValueError as e:
            raise APIError(400, str(e)) from None

    async def _start(self, ids: list[int], params: list[SamplingParams],
                     deadline: float | None = None) -> list[AsyncIterator[Delta]]:
        """Queue the n choices (all checked first: a bad request starts nothing)."""
        streams: list[AsyncIterator[Delta]] = []
        try:
            for p in params:
                streams.append(await self.engine.generate(ids, p, deadline=deadline))
        except ValueError as e:
            for s in streams:
                await s.aclose()
            msg = str(e)
            code = "context_length_exceeded" if "does not fit the context" in msg else None
            raise APIError(400, msg, param="messages" if code else None, code=code) from None
        return streams

    @staticmethod
    async def _merge(streams: list[AsyncIterator[Delta]]) -> AsyncIterator[tuple[int, Delta]]:
        """The choices' deltas as they come; closing this closes (aborts) them all."""
        q: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, s: AsyncIterator[Delta]) -> None:
            try:
                async for d in s:
                    await q.put((i, d))
            except BaseException as e:  # noqa: BLE001 -- handed to the reader
                await q.put((i, e))
            finally:
                await q.put((i, None))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
        try:
            open_ = len(streams)
            while open_:
                i, d = await q.get()
                if d is None:
                    open_ -= 1
                elif isinstance(d, BaseException):
                    raise d
                else:
                    yield i, d
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)  # a stream still being read cannot be closed
            for s in streams:
                await s.aclose()

    @staticmethod
    def _usage(prompt: int, completion: int, cached: int) -> dict:
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    # ---- /v1/chat/completions -------------------------------------------------------------------
    async def chat(self, req: ChatCompletionRequest):
        self.check_model(req.model)
        self.admit(req.n, len(req.messages))
        if req.sot is not None:
            return await self._sot(req)
        msgs = _messages(req.messages)
        guided, tool = None, None
        choice = req.tool_choice or ("auto" if req.tools else "none")
        if req.tools and choice != "none":
            forced = None
            if isinstance(choice, NamedToolChoice):
                forced = choice.function.name
            elif choice == "required" and len(req.tools) == 1:
                forced = req.tools[0].function.name
            # after the conversation, not before: requests with different tools still share its prefix blocks
            msgs = msgs + [{"role": "system", "content": _tool_prompt(req.tools, forced)}]
            if forced is not None:
                tool = next(t for t in req.tools if t.function.name == forced)
                guided = GuidedDecoding(json_schema=tool.function.parameters, strict=self._strict(tool.function.strict))
            elif choice == "required":  # one of several: {"name": ..., "arguments": ...}, each tool as strict as it says
                guided = GuidedDecoding(json_schema={"anyOf": [
                    {"type": "object", "properties": {"name": {"const": t.function.name}, "arguments": (
                        closed_schema(t.function.parameters) if self._strict(t.function.strict)
                        else t.function.parameters)},
                     "required": ["name", "arguments"], "additionalProperties": False} for t in req.tools]},
                    strict=False)
        elif req.response_format is not None and req.response_format.type == "json_object":
            guided = GuidedDecoding(json_object=True)
        elif req.response_format is not None and req.response_format.type == "json_schema":
            fmt = req.response_format.json_schema
            guided = GuidedDecoding(json_schema=fmt.schema_, strict=self._strict(fmt.strict))
        try:
            ids = self.llm.engine.encode(msgs)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        max_tokens = req.max_completion_tokens or req.max_tokens
        params = [self._params(req, max_tokens, i, guided, len(ids)) for i in range(req.n)]
        streams = await self._start(ids, params, self.deadline())
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", _now()
        calls = {"forced": tool.function.name if tool else None, "tools": req.tools if choice != "none" else None,
                 "any": choice == "required" and tool is None}
        if req.stream:
            return StreamingResponse(self._chat_stream(streams, cid, created, req, len(ids), calls),
                                     media_type="text/event-stream")
        outs: list[Any] = [None] * req.n
        async for i, d in self._merge(streams):
            if d.finished:
                outs[i] = d.output
        choices = []
        for i, o in enumerate(outs):
            msg, finish = self._message(o.text, calls), FINISH.get(o.finish_reason, "stop")
            if msg.get("tool_calls") and finish == "stop":
                finish = "tool_calls"
            choices.append({"index": i, "message": msg, "finish_reason": finish, "logprobs": None})
        usage = self._usage(len(ids), sum(len(o.token_ids) for o in outs), outs[0].num_cached_tokens)
        return {"id": cid, "object": "chat.completion", "created": created, "model": req.model,
                "choices": choices, "usage": usage, "system_fingerprint": None}

    @staticmethod
    def _message(text: str, calls: dict) -> dict:
        """The assistant message: text, or a tool call (forced: the text is the arguments; auto: a text that
        is exactly {"name", "arguments"} of a known tool)."""
        name, args = calls["forced"], None
        if name is not None:
            args = text
        elif calls["tools"]:
            try:
                obj = json.loads(text)
                known = {t.function.name for t in calls["tools"]}
                if isinstance(obj, dict) and obj.get("name") in known and isinstance(obj.get("arguments"), dict):
                    name, args = obj["name"], json.dumps(obj["arguments"])
            except ValueError:
                pass
        if name is None:
            return {"role": "assistant", "content": text}
        return {"role": "assistant", "content": None, "tool_calls": [
            {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": name, "arguments": args}}]}

    async def _chat_stream(self, streams, cid: str, created: int, req: ChatCompletionRequest, n_prompt: int,
                           calls: dict) -> AsyncIterator[bytes]:
        def chunk(i: int, delta: dict, finish: str | None = None, usage: dict | None = None) -> bytes:
            body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": req.model,
                    "choices": [{"index": i, "delta": delta, "finish_reason": finish, "logprobs": None}]}
            if usage is not None:
                body["usage"] = usage
            return _sse(body)

        forced = calls["forced"]
        completion, cached = 0, 0
        try:
            for i in range(req.n):
                first = {"role": "assistant", "content": None if forced else ""}
                if forced:
                    first["tool_calls"] = [{"index": 0, "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                                            "function": {"name": forced, "arguments": ""}}]
                yield chunk(i, first)
            async for i, d in self._merge(streams):
                if d.text:
                    delta = ({"tool_calls": [{"index": 0, "function": {"arguments": d.text}}]} if forced
                             else {"content": d.text})
                    yield chunk(i, delta)
                if d.finished:
                    o = d.output
                    completion += len(o.token_ids)
                    cached = o.num_cached_tokens if i == 0 else cached
                    finish = FINISH.get(o.finish_reason, "stop")
                    if forced and finish == "stop":
                        finish = "tool_calls"
                    yield chunk(i, {}, finish)  # usage comes once, in its own last chunk (OpenAI's include_usage)
            if req.stream_options is not None and req.stream_options.include_usage:
                yield _sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": req.model,
                            "choices": [], "usage": self._usage(n_prompt, completion, cached)})
        except EngineDead as e:
            yield _sse(APIError(500, str(e), type="server_error").body())
        yield _sse("[DONE]")

    # ---- SoT -------------------------------------------------------------------------------------
    async def _sot(self, req: ChatCompletionRequest):
        if self.sot is None:
            raise APIError(400, "this model has no chat template: SoT is not available", param="sot")
        users = [m for m in _messages(req.messages) if m["role"] == "user"]
        if not users:
            raise APIError(400, "SoT needs a user message with the question", param="messages")
        question = users[-1]["content"]
        overrides: dict[str, Any] = {"temperature": req.temperature, "top_p": req.top_p, "seed": req.seed}
        if req.sot_expansion is not None:
            overrides["expansion"] = req.sot_expansion
        max_tokens = req.max_completion_tokens or req.max_tokens
        if max_tokens is not None:
            overrides["normal_max_tokens"] = max_tokens
        cfg = replace(self.sot.config, **overrides)

        def job(emit) -> None:
            def counted(ev) -> None:
                if ev.kind == "answer" and self.metrics is not None:
                    self.metrics.sot_answer(ev.answer)
                emit(ev)
            iterate(self.sot.stream(question, mode=req.sot, **overrides), counted)

        events = await self.engine.run_job(job, self.deadline())
        try:
            first = await events.__anext__()  # the route: input was checked
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        except TimeoutError as e:
            raise APIError(504, str(e), type="timeout", code="request_timeout") from None
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", _now()
        if req.stream:
            return StreamingResponse(self._sot_stream(first, events, cfg, cid, created, req),
                                     media_type="text/event-stream")
        ans = None
        try:
            async for ev in events:
                if ev.kind == "answer":
                    ans = ev.answer
        except TimeoutError as e:
            raise APIError(504, str(e), type="timeout", code="request_timeout") from None
        return {"id": cid, "object": "chat.completion", "created": created, "model": req.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": ans.text},
                             "finish_reason": "stop", "logprobs": None}],
                "usage": self._sot_usage(ans), "sot": self._sot_summary(ans)}

    def _sot_usage(self, ans: Answer) -> dict:
        t = ans.tokens
        prompt = t.skeleton_prompt + t.expand_prompt + t.normal_prompt
        cached = t.expand_prompt - t.expand_prefilled if t.expand_prompt else 0
        return self._usage(prompt, t.output, max(cached, 0))

    @staticmethod
    def _sot_summary(ans: Answer) -> dict:
        d = ans.to_dict()
        return {k: d[k] for k in ("mode", "reason", "skeleton", "expansion", "points", "timings")}

    async def _sot_stream(self, first, events, cfg: SoTConfig, cid: str, created: int,
                          req: ChatCompletionRequest) -> AsyncIterator[bytes]:
        """Content in answer order, plus each raw event under "sot" so a client can draw the points in parallel."""
        text = OrderedText(cfg)

        def chunk(delta: dict, ev: Any = None, finish: str | None = None, usage: dict | None = None) -> bytes:
            body: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created,
                                    "model": req.model,
                                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
            if ev is not None:
                body["sot"] = {"event": ev.kind, "index": ev.index, "text": ev.text,
                               "points": [p.text for p in ev.points] if ev.points else None}
            if usage is not None:
                body["usage"] = usage
            return _sse(body)

        try:
            yield chunk({"role": "assistant", "content": ""}, first)
            async for ev in events:
                new = text.feed(ev)
                if ev.kind == "answer":
                    if new:
                        yield chunk({"content": new})
                    yield chunk({}, None, "stop", self._sot_usage(ev.answer))
                    summary = {"sot": {"event": "answer", **self._sot_summary(ev.answer)}}
                    yield _sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": req.model,
                                "choices": [], **summary})
                else:
                    yield chunk({"content": new} if new else {}, ev)
        except EngineDead as e:
            yield _sse(APIError(500, str(e), type="server_error").body())
        except TimeoutError as e:
            yield _sse(APIError(504, str(e), type="timeout", code="request_timeout").body())
        yield _sse("[DONE]")

    # ---- /v1/completions ------------------------------------------------------------------------
    async def completion(self, req: CompletionRequest):
        self.check_model(req.model)
        prompts = req.prompt
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if req.stream and len(prompts) > 1:
            raise APIError(400, "streaming takes one prompt", param="prompt")
        self.admit(len(prompts) * req.n)
        try:
            id_lists = [self.llm.engine.encode(p) for p in prompts]
        except ValueError as e:
            raise APIError(400, str(e), param="prompt") from None
        cid, created = f"cmpl-{uuid.uuid4().hex}", _now()
        streams, owners, deadline = [], [], self.deadline()
        try:
            for k, ids in enumerate(id_lists):
                ss = await self._start(ids, [self._params(req, req.max_tokens, i, prompt_len=len(ids))
                                             for i in range(req.n)], deadline)
                streams += ss
                owners += [k] * len(ss)
        except APIError:
            for s in streams:
                await s.aclose()
            raise
        if req.stream:
            return StreamingResponse(self._completion_stream(streams, cid, created, req, len(id_lists[0])),
                                     media_type="text/event-stream")
        outs: list[Any] = [None] * len(streams)
        async for i, d in self._merge(streams):
            if d.finished:
                outs[i] = d.output
        choices = [{"index": i, "text": o.text, "finish_reason": FINISH.get(o.finish_reason, "stop"),
                    "logprobs": None} for i, o in enumerate(outs)]
        prompt_tokens = sum(len(ids) for ids in id_lists)
        cached = sum(outs[owners.index(k)].num_cached_tokens for k in range(len(id_lists)))
        return {"id": cid, "object": "text_completion", "created": created, "model": req.model, "choices": choices,
                "usage": self._usage(prompt_tokens, sum(len(o.token_ids) for o in outs), cached)}

    async def _completion_stream(self, streams, cid: str, created: int, req: CompletionRequest,
                                 n_prompt: int) -> AsyncIterator[bytes]:
        completion, cached, left = 0, 0, len(streams)
        try:
            async for i, d in self._merge(streams):
                finish, usage = None, None
                if d.finished:
                    left -= 1
                    completion += len(d.output.token_ids)
                    cached = d.output.num_cached_tokens if i == 0 else cached
                    finish = FINISH.get(d.output.finish_reason, "stop")
                    usage = self._usage(n_prompt, completion, cached) if left == 0 else None
                if d.text or finish:
                    body = {"id": cid, "object": "text_completion", "created": created, "model": req.model,
                            "choices": [{"index": i, "text": d.text, "finish_reason": finish, "logprobs": None}]}
                    if usage:
                        body["usage"] = usage
                    yield _sse(body)
        except EngineDead as e:
            yield _sse(APIError(500, str(e), type="server_error").body())
        yield _sse("[DONE]")


def create_app(llm: LLM, served_names: list[str] | None = None, sot_config: SoTConfig | None = None,
               router: str | Router = "trained", strict_json: bool = True, api_key: str | None = None,
               limits: ServerLimits | None = None) -> FastAPI:
    """`api_key`: every /v1/* request must carry `Authorization: Bearer <api_key>` (OpenAI's and vLLM's scheme);
    /health, /stats and /metrics stay open. `limits`: what one request may ask (server/limits.py)."""
    if api_key is not None and (not isinstance(api_key, str) or not api_key.strip()):
        raise ValueError("api_key must be a non-empty string")
    server = Server(llm, served_names, sot_config, router, strict_json, limits)
    metrics = server.metrics = Metrics(llm.engine, llm.engine.stats)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        server.engine.shutdown()
        llm.engine.close()  # tensor-parallel workers, if any

    app = FastAPI(title="sot-engine", description=__doc__, lifespan=lifespan)
    app.state.server = server

    # the body is read (and bounded) before FastAPI parses it, after the key check (a client without the key
    # gets its 401 before its body is read)
    app.add_middleware(BodyLimit, limits=server.limits)

    if api_key is not None:
        want = f"Bearer {api_key}".encode()

        @app.middleware("http")
        async def check_key(request: Request, call_next):
            if request.url.path.startswith("/v1"):
                got = request.headers.get("authorization", "").encode()
                if not hmac.compare_digest(got, want):  # constant time; neither key is ever logged
                    return JSONResponse(APIError(401, "invalid or missing API key: send 'Authorization: Bearer "
                                                      "<key>'", code="invalid_api_key").body(), status_code=401)
            return await call_next(request)

    # outermost (added last): it counts what the key check and the body limit refuse too
    @app.middleware("http")
    async def count(request: Request, call_next):
        response = await call_next(request)
        # the route's template, not the raw path: a client cannot grow the label set
        route = getattr(request.scope.get("route"), "path", None)
        if route is None:  # refused before routing (the key check): still one of ours, or "other"
            route = request.url.path if request.url.path in {getattr(r, "path", None) for r in app.routes} else "other"
        metrics.request(route, request.method, response.status_code)
        return response

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException) -> JSONResponse:
        """Starlette's own refusals (unknown path 404, wrong method 405, an unreadable body 400), in OpenAI's shape."""
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return JSONResponse(APIError(e.status_code, str(e.detail), code=code).body(), e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def bad_body(_: Request, e: RequestValidationError) -> JSONResponse:
        err = e.errors()[0] if e.errors() else {}
        if err.get("type") == "json_invalid":
            return JSONResponse(APIError(400, f"the body is not valid JSON: {err.get('msg', '')}").body(), 400)
        loc = ".".join(str(x) for x in err.get("loc", ())[1:]) or None
        msg = err.get("msg", "invalid request").removeprefix("Value error, ")
        return JSONResponse(APIError(400, f"{loc}: {msg}" if loc else msg, param=loc).body(), 400)

    @app.exception_handler(EngineDead)
    async def dead(_: Request, e: EngineDead) -> JSONResponse:
        return JSONResponse(APIError(503, str(e), type="server_error").body(), 503)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest):
        return await server.chat(body)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        return await server.completion(body)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "sot-engine"}
                                           for n in server.names]}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        """Prometheus text format (vLLM's names where vLLM has the metric); rendered on the engine thread."""
        return Response(await server.engine.call(metrics.render), media_type=METRICS_TYPE)

    @app.get("/stats")
    async def stats():
        """Beyond OpenAI: the engine's counters and block accounting (tests and dashboards)."""
        return await server.engine.call(llm.engine.stats)

    return app
