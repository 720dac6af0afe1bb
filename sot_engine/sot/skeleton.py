"""Reading the skeleton: the points of a finished skeleton, and when a streaming skeleton is finished.

The paper extracts points with a regex (App. A.2). Small models need more than that: SmolLM2 has run on to
35 near-identical points, written the same point twice, wrapped points in markdown, and followed the list
with a blank line and meta-text ("Please provide the skeleton ..."). One line-by-line scan serves both
`parse_skeleton` (the whole text) and `skeleton_done` (the complete lines of a stream), so that stopping the
stream early never drops a point the parser would have kept.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

MAX_POINT_WORDS = 10  # a skeleton point is meant to be 3~5 words; longer ones are cut to this many
MAX_LINE_WORDS = 30  # a line still growing past this is prose (or a whole list on one line): stop there

_NUMBERED = re.compile(r"(\d+)\s*[.)](?!\d)\s*(.*)")  # "3. Foo", "3.Foo", "3) Foo"; not "3.5 hours"
_NON_WORD = re.compile(r"[\W_]+")
_INLINE = re.compile(r":\s|\s[-\u2013\u2014]\s")  # "Title: text", "Title - text", "Title \u2014 text"


@dataclass
class Point:
    index: int  # 1-based, consecutive in a parsed skeleton
    text: str  # the point skeleton, no trailing period or colon


def _demarkdown(line: str) -> str:
    """Drop emphasis and code marks anywhere, and heading marks in front."""
    return line.replace("*", "").replace("`", "").strip().lstrip("#").strip()


def _normalized(text: str) -> str:
    """Case and punctuation blind, for spotting a repeated point."""
    return _NON_WORD.sub(" ", text.lower()).strip()


def _clean_point(body: str, index: int) -> str:
    # A model that repeats the partial answer writes "1. 1. Dumplings"; drop the echo.
    body = re.sub(rf"^{index}\s*[.)](?!\d)\s*", "", body)
    # A point expanded inline ("Dumplings: small parcels of dough ..."): the title is what comes before.
    title = _INLINE.split(body, maxsplit=1)[0]
    if title.strip():
        body = title
    return " ".join(body.split()[:MAX_POINT_WORDS]).rstrip(".:;, ")


_LINE = re.compile(r"([^\r\n]*)(\r\n|\r|\n|$)")


def _lines(text: str, complete_only: bool) -> list[tuple[int, str]]:
    """(offset, line) for each line; with `complete_only`, not the last one, which may still grow."""
    out = []
    for m in _LINE.finditer(text):
        if not m.group(2):  # the unterminated tail (or the empty match at the very end)
            if not complete_only and m.group(1):
                out.append((m.start(), m.group(1)))
            break
        out.append((m.start(), m.group(1)))
    return out


def _scan(text: str, prefilled: str, max_points: int, *, complete_lines_only: bool,
          stop_on_repeat: bool) -> tuple[list[Point], int | None]:
    """(points, end): the points in order, renumbered 1..n, and the offset in `prefilled + text` of the line
    that ended the list (a blank line after a point, a non-point line, a number past max_points or out of
    sequence, or -- with `stop_on_repeat` -- a point written before), None if nothing ended it."""
    if isinstance(max_points, bool) or not isinstance(max_points, int) or max_points < 1:
        raise ValueError(f"max_points must be an int >= 1, got {max_points!r}")
    points: list[Point] = []
    seen: set[str] = set()
    last, last_empty, started = 0, False, False
    for offset, raw in _lines(prefilled + text, complete_lines_only):
        line = _demarkdown(raw)
        if not line:
            if points:
                return points, offset
            continue
        m = _NUMBERED.match(line)
        if m is None:
            if started:  # "Question:", "Skeleton:", "Please provide ...", or prose instead of a list
                return points, offset
            continue  # a preamble before the list (only possible without a prefill)
        started = True
        index = int(m.group(1))
        if index > max_points:
            return points, offset
        if index < last or (index == last and not last_empty):
            continue  # a number used before: keep the first
        if index > last + 1:
            return points, offset  # a gap: only the leading run 1, 2, 3, ... counts
        last = index
        body = _clean_point(m.group(2), index)
        last_empty = not body
        if not body:
            continue  # "2." with nothing after it; a later "2. ..." may fill it
        key = _normalized(body)
        if key in seen:
            if stop_on_repeat:
                return points, offset
            continue
        seen.add(key)
        points.append(Point(len(points) + 1, body))
    return points, None


def parse_skeleton(text: str, *, prefilled: str = "1.", max_points: int = 10) -> list[Point]:
    """The points of a skeleton response. `text` is what the model wrote after the prefill `prefilled`.

    Markdown is ignored; the list ends at a blank line after a point, at a line that is not a numbered point
    (a "Skeleton:" or "Question:" echo, meta-text), at a number past `max_points` or out of sequence.
    Repeated numbers and repeated points (case and punctuation blind) keep the first; empty points are
    dropped; the result is renumbered 1..n.
    """
    return _scan(text, prefilled, max_points, complete_lines_only=False, stop_on_repeat=False)[0]


def skeleton_end(text: str, *, prefilled: str = "1.", max_points: int = 10) -> int | None:
    """The streaming stop rule for the skeleton stage: once a complete line ends the list (see
    `parse_skeleton`) or repeats a point, the offset in `text` where that line starts (the list is
    `text[:end]`); None while the list may go on. The line still being written counts only when it runs
    past MAX_LINE_WORDS words (the model is writing prose, or the whole list on one line). Cheap: one pass
    over the text, nothing before the first newline."""
    last_line = re.split(r"\r\n|\r|\n", prefilled + text)[-1]
    if len(last_line.split()) > MAX_LINE_WORDS:
        return len(text)  # prose, not a list of 3~5-word points: what is there is all it will be
    if "\n" not in text and "\r" not in text:
        return None
    end = _scan(text, prefilled, max_points, complete_lines_only=True, stop_on_repeat=True)[1]
    return None if end is None else max(0, end - len(prefilled))


def skeleton_done(text: str, *, prefilled: str = "1.", max_points: int = 10) -> bool:
    """Has a complete line ended the skeleton's list? (`skeleton_end` is not None.)"""
    return skeleton_end(text, prefilled=prefilled, max_points=max_points) is not None


def format_skeleton(points: list[Point]) -> str:
    """The cleaned skeleton for the point-expanding prompt's {skeleton}, one "i. point" a line."""
    return "\n".join(f"{p.index}. {p.text}" for p in points)
