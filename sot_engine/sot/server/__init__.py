"""`sot serve`: the OpenAI-compatible server (FastAPI + uvicorn), above both the engine and the SoT driver.
`Server` and `create_app` resolve lazily, so the CLI reads `server.limits` without loading fastapi or torch."""
from __future__ import annotations

from typing import Any

__all__ = ["Server", "create_app"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from sot_engine.sot.server import app
        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
