"""What one client may ask of the server: each limit answers (413, 400, 429) instead of letting memory or the
queue grow without bound. Every one has a `sot serve` option."""
from __future__ import annotations

import json
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class ServerLimits:
    max_body_bytes: int = 4 << 20  # a request body; more is 413 before it is parsed (JSON depth is bounded too)
    max_n: int = 16  # choices per request
    max_messages: int = 512  # messages per chat request
    max_waiting: int = 256  # requests queued before admission (sequences and SoT jobs); more is 429 at once
    request_timeout: float = 600.0  # seconds from arrival; then a request ends as if max_tokens came (0: none)
    max_json_depth: int = 64  # nesting of the request body (a schema, tool parameters)

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (v == 0 and f.name != "request_timeout"):
                raise ValueError(f"{f.name} must be a positive number, got {v!r}")


def json_depth(text: bytes | str, limit: int) -> bool:
    """Whether the JSON text nests deeper than `limit` (counted on brackets outside strings, before parsing, so a
    hostile body cannot make the parser recurse)."""
    raw = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    if raw.count(b"[") + raw.count(b"{") <= limit:  # it cannot nest deeper than it has openings: no scan
        return False
    depth, in_str, esc = 0, False, False
    for ch in text.decode("utf-8", "replace") if isinstance(text, bytes) else text:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return True
        elif ch in "]}":
            depth -= 1
    return False


def error_body(message: str, type_: str, code: str) -> bytes:
    """OpenAI's error shape (protocol.APIError.body(), without importing pydantic: the CLI reads this module)."""
    return json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}).encode()


class BodyLimit:
    """ASGI middleware: reads a request body up to `limits.max_body_bytes` (413 past it, whatever Content-Length
    says) and refuses JSON nested deeper than `limits.max_json_depth` (400); then hands the body on."""

    def __init__(self, app, limits: ServerLimits) -> None:
        self.app, self.limits = app, limits

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        cap = self.limits.max_body_bytes
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > cap:
            return await self._refuse(send, 413, f"the request body is over {cap} bytes", "request_too_large")
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            if size > cap:
                return await self._refuse(send, 413, f"the request body is over {cap} bytes", "request_too_large")
            if not msg.get("more_body", False):
                break
        body = b"".join(chunks)
        if json_depth(body, self.limits.max_json_depth):
            return await self._refuse(send, 400, f"the request body nests deeper than {self.limits.max_json_depth} "
                                                 "levels", "json_too_deep")
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes
        await self.app(scope, replay, send)

    @staticmethod
    async def _refuse(send, status: int, message: str, code: str) -> None:
        body = error_body(message, "invalid_request_error", code)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
