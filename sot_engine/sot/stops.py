"""Per-row stop rules, as the engine's `SamplingParams.stop_fn`: called with a row's output text after every
token, they return (cut, reason) to end the row there, or None.

A point's expansion is meant to be one or two sentences. Small models rarely stop on their own: they go on to
the next point, echo the skeleton or the prompt, or loop. Each rule below ends the row at the first sign of
that and cuts the text before it, so the row leaves the batch (and frees its blocks) in that very step.
"""
from __future__ import annotations

import re
from typing import Callable

from sot_engine.sot.grammar import first_sentence_end, words_end
from sot_engine.sot.skeleton import skeleton_end

StopFn = Callable[[str], "tuple[int, str] | None"]

_ECHO = re.compile(r"(?:^|(?<=[\s*#]))(?:Skeleton|Question)\s*:|(?i:continue and only continue|"
                   r"the skeleton of the answer)")
_WORD = re.compile(r"\w+")


def skeleton_stop(prefilled: str = "1.", max_points: int = 10) -> StopFn:
    """End the skeleton at the line that ends its list (blank line, non-point line, repeat, number > max)."""
    def rule(text: str) -> tuple[int, str] | None:
        end = skeleton_end(text, prefilled=prefilled, max_points=max_points)
        return None if end is None else (end, "end of skeleton")
    return rule


def repeated_ngram(text: str, n: int) -> int | None:
    """Offset where the last `n` words began, if those `n` words (case-blind) occurred before: a loop."""
    words = list(_WORD.finditer(text))
    if n < 1 or len(words) <= n:
        return None
    key = [w.group().lower() for w in words]
    tail = key[-n:]
    for i in range(len(key) - n):  # an earlier occurrence may overlap the tail: a short cycle
        if key[i:i + n] == tail:
            return words[-n].start()
    return None


_NUMBERED = re.compile(r"(?:^|\s)\**(\d{1,2})\s*[.)]\s+\**[A-Z]")  # " 3. Stay", " **3. Stay"


_SENTENCE_END = re.compile(r"(?<![0-9])[.!?](?=\s)")  # a sentence end (not a list number), known once the next word begins


def point_stop(index: int, *, num_points: int = 10, ngram: int = 8, min_words: int = 0,
               max_sentences: int = 0) -> StopFn:
    """End point `index`'s expansion at: a newline after some text, the start of another point ("3. Foo",
    even inline, any number 1..num_points+1 but its own), an echo of the prompt ("Skeleton:", "Question:",
    the instruction), or a repeated `ngram`-word phrase (0 turns that rule off). The text is cut before what
    triggered the rule, trailing space dropped; a row cut to nothing has written no content of its own.

    `min_words`: but for a repetition (a loop is not content), no rule fires before the point's first sentence
    of at least that many words is complete (`sot.grammar.HoldFirstSentence` keeps EOS and newlines out of it
    too), and none cuts into it. `max_sentences`: the point ends after that many sentences (the paper's prompt
    asks for 1~2); 0: no limit."""
    def other_point(m: re.Match[str]) -> bool:
        return int(m.group(1)) != index and 1 <= int(m.group(1)) <= num_points + 1

    def rule(text: str) -> tuple[int, str] | None:
        start = len(text) - len(text.lstrip())
        if start == len(text):
            return None  # nothing written yet (a leading newline is allowed)
        looped = repeated_ngram(text, ngram) if ngram else None
        if min_words:
            first = first_sentence_end(text, min_words)
            if first is None:  # the first sentence is still being written: only a loop ends it, after min_words
                return None if looped is None else \
                    (len(text[:max(looped, words_end(text, min_words))].rstrip()), "repetition")
            start = max(start, first)
        found: list[tuple[int, str]] = []
        if max_sentences:
            ends = [m.end() for m in _SENTENCE_END.finditer(text, start if min_words else 0)]
            done = max_sentences - (1 if min_words else 0)  # the held first sentence ends at `start`
            if done <= 0:
                found.append((start, "sentences"))
            elif len(ends) >= done:
                found.append((ends[done - 1], "sentences"))
        nl = text.find("\n", start)
        if nl != -1:
            found.append((nl, "newline"))
        after = max(0, start - 1) if min_words else 0  # the pattern starts with the space before the number
        m = next((m for m in _NUMBERED.finditer(text, after) if other_point(m)), None)
        if m:
            found.append((m.start(), "another point"))
        m = _ECHO.search(text, start)
        if m:
            found.append((m.start(), "echo of the prompt"))
        if looped is not None:
            found.append((looped, "repetition"))
        if not found:
            return None
        cut, why = min(found)
        return len(text[:cut].rstrip()), why
    return rule
