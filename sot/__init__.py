"""Skeleton-of-Thought on the engine: ask for a skeleton, then expand its points in parallel.

    from sot import SoT
    answer = SoT("default").answer("How can I improve my time management skills?")
"""
from sot.driver import Answer, Event, PointAnswer, SoT, SoTConfig
from sot.prompts import DEFAULT_PROMPTS, SoTPrompts
from sot.router import Route, route
from sot.skeleton import Point, parse_skeleton

__all__ = ["Answer", "DEFAULT_PROMPTS", "Event", "Point", "PointAnswer", "Route", "SoT", "SoTConfig",
           "SoTPrompts", "parse_skeleton", "route"]
