"""Skeleton-of-Thought on the engine: ask for a skeleton, then expand its points in parallel.

This slice holds the pure parts: the prompts (`sot.prompts`) and reading the skeleton (`sot.skeleton`).
"""
from sot.prompts import (DEFAULT_PROMPTS, SoTPrompts, common_prefix_split, point_messages, point_prefill,
                         skeleton_messages)
from sot.skeleton import MIN_POINTS, Point, format_skeleton, is_usable, parse_skeleton, skeleton_done

__all__ = ["DEFAULT_PROMPTS", "MIN_POINTS", "Point", "SoTPrompts", "common_prefix_split", "format_skeleton",
           "is_usable", "parse_skeleton", "point_messages", "point_prefill", "skeleton_done",
           "skeleton_messages"]
