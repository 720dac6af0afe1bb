"""Skeleton-of-Thought on the engine: ask for a skeleton, then expand its points in parallel.

    from sot_engine import SoT
    answer = SoT("default").answer("How can I improve my time management skills?")

The names below load on first use: `sot --help` imports this package without torch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from sot_engine._lazy import lazy_exports

_EXPORTS = {**dict.fromkeys(["Answer", "Event", "PointAnswer", "SoT", "SoTConfig"], "sot_engine.sot.driver"),
            **dict.fromkeys(["DEFAULT_PROMPTS", "SoTPrompts"], "sot_engine.sot.prompts"),
            **dict.fromkeys(["Route", "route"], "sot_engine.sot.router"),
            **dict.fromkeys(["Point", "parse_skeleton"], "sot_engine.sot.skeleton")}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)

if TYPE_CHECKING:
    from sot_engine.sot.driver import Answer, Event, PointAnswer, SoT, SoTConfig
    from sot_engine.sot.prompts import DEFAULT_PROMPTS, SoTPrompts
    from sot_engine.sot.router import Route, route
    from sot_engine.sot.skeleton import Point, parse_skeleton
