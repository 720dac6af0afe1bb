"""The form of SoT's outputs, as grammars the engine decodes under (`GuidedDecoding`, llguidance's Lark dialect).
The model still picks every word; the grammar only rules out what would break SoT.

- The skeleton: a numbered list `1. ...\\n2. ...\\n` of `min_points` to `max_points` points, each one short line
  (at most MAX_POINT_WORDS words, no nested numbering, no blank line). The list may end after `min_points`
  points and must end after `max_points`. Without it, a small model stops after one point ("1. Inflation.\\n")
  about a third of the time, and SoT falls back to normal decoding.
- A point's expansion opens with a complete sentence of at least `min_words` words on its first line: before
  that, neither EOS nor a newline may come (`HoldFirstSentence`), nor does a stop rule fire (`stops.point_stop`).
  Without it, points came out empty (EOS or a newline first) or cut mid-clause ("The answer to this question
  is"). A logits processor rather than a grammar: the same guarantee for ~40 us a row and step, where
  llguidance's mask for free text costs ~0.3 ms (it walks the whole vocabulary).
"""
from __future__ import annotations

import functools
import re

import torch

MAX_POINT_WORDS = 10  # as the parser keeps (skeleton.MAX_POINT_WORDS): the prompt asks for 3~5 words
# Character classes spelled out, so that llguidance (Rust regex) and Python's `re` (first_sentence_end, the tests)
# read them alike: their \s and \d differ on control and non-ASCII characters.
WS = r" \t\n\r\f\v"
_NON_WS = rf"[^{WS}]"
# a word of a point: not a list number ("2." or "3)" would start another point inside this one), but "3D", "24/7"
# or "2024" are fine
# or "2024" are fine. At most MAX_WORD_CHARS characters: a model that never writes a space still gets to the end
# of the list (the cap costs the skeleton's mask ~0.1 ms a step).
MAX_WORD_CHARS = 24
_WORD = rf"(?:[^{WS}0-9]{_NON_WS}{{0,{MAX_WORD_CHARS - 1}}}|[0-9]{{1,4}}(?:[^{WS}0-9.)]{_NON_WS}{{0,{MAX_WORD_CHARS - 5}}})?)"
_PREFILL = re.compile(r"(?:^|\n)[ \t]*([0-9]+)\.[ \t]*$")  # the prefill ends at a list number: "1."
_AFTER_LINE = re.compile(r"(?:^|\n)[ \t]*([0-9]+)\.[^\n]*\n$")  # the prefill ends after a whole point line


def _continue_from(prefilled: str) -> tuple[int, bool]:
    """(next point number, whether that number is already written) for a skeleton prefill."""
    if not prefilled.strip():
        return 1, False
    if m := _PREFILL.search(prefilled):
        return int(m.group(1)), True
    if m := _AFTER_LINE.search(prefilled):
        return int(m.group(1)) + 1, False
    raise ValueError(f"a constrained skeleton needs a prefill that is empty, ends at a list number (\"1.\") or "
                     f"after a whole point line, got {prefilled!r}")


def skeleton_grammar(prefilled: str = "1.", min_points: int = 3, max_points: int = 10) -> str:
    """The Lark grammar of what the model writes after `prefilled`: the rest of a numbered list of `min_points` to
    `max_points` one-line points, then the end (EOS)."""
    if not 1 <= min_points <= max_points:
        raise ValueError(f"need 1 <= min_points <= max_points, got {min_points} and {max_points}")
    first, written = _continue_from(prefilled)
    if first > max_points:
        if written or first - 1 > max_points:
            raise ValueError(f"the prefill {prefilled!r} goes past max_points={max_points}")
        return 'start: ""\n'  # the prefill holds the whole list: only the end may follow

    def points_from(i: int) -> str:  # point i's text (its number written), its newline, what may follow
        rest = "" if i == max_points else f'"{i + 1}." {points_from(i + 1)}'
        if rest and i >= min_points:
            rest = f"({rest})?"
        return f'POINT "\\n" {rest}'.rstrip()

    body = points_from(first) if written else f'"{first}." {points_from(first)}'
    if not written and first - 1 >= min_points:  # whole points already prefilled: the list may end at once
        body = f"({body})?"
    return (f"start: {body}\n"
            f"POINT: / {_WORD}( {_WORD}){{0,{MAX_POINT_WORDS - 1}}}/\n")


_S_WORD = rf"[^{WS}.!?]+"  # a word of a sentence
MAX_SENTENCE_WORDS = 40  # past this many words without a sentence end, the stop rules no longer wait for it


def first_sentence_pattern(min_words: int) -> str:
    """The text on one line up to the first sentence end (. ! ?) that follows at least `min_words` words: a short
    sentence before it ("Yes.", a list number "1.") does not end the hold, the sentence that reaches the count
    does. Words: anything but whitespace and sentence ends; spaces or tabs between them. Lazy: the first end."""
    if not 1 <= min_words <= MAX_SENTENCE_WORDS:
        raise ValueError(f"min_words must be in 1..{MAX_SENTENCE_WORDS}, got {min_words}")
    return rf"[ \t]*{_S_WORD}(?:[.!?]*[ \t]+{_S_WORD}){{{min_words - 1},}}?[ \t]*[.!?]"


_SENTENCE_WORD = re.compile(_S_WORD)  # a word as the first-sentence pattern counts them


def words_end(text: str, n: int) -> int:
    """Where the first `n` words of `text` end; len(text) if it has fewer."""
    ends = [m.end() for m in _SENTENCE_WORD.finditer(text)]
    return ends[n - 1] if n <= len(ends) else len(text)


def first_sentence_end(text: str, min_words: int) -> int | None:
    """Where the first sentence a point is held for ends in `text`, None while it is still being written: stop
    rules look only after it. A sentence that runs past MAX_SENTENCE_WORDS words counts as ended
    there (a model that never writes a period is not held on)."""
    m = re.match(first_sentence_pattern(min_words), text)
    if m:
        return m.end()
    ends = [w.end() for w in _SENTENCE_WORD.finditer(text)]
    return ends[MAX_SENTENCE_WORDS - 1] if len(ends) > MAX_SENTENCE_WORDS else None


def ban(logits: torch.Tensor, ids: torch.Tensor) -> None:
    """logits[ids] = -inf in place, unless that would leave nothing to sample (a grammar allowed only those)."""
    saved = logits[ids].clone()
    logits[ids] = float("-inf")
    if torch.isneginf(logits.max()):
        logits[ids] = saved


_AT_POINT_START = re.compile(r"(?:^|\n)[ \t]*[0-9]+\.$")


class DistinctOpenings:
    """A skeleton request's logits processor: at the start of each point (just after its number), the tokens that
    opened earlier points are banned. One instance per request: it remembers those tokens as they are written."""

    def __init__(self, decode, prefilled: str = "1.") -> None:
        self.decode, self.prefilled = decode, prefilled  # decode: token ids -> text
        self.openings: set[int] = set()
        self._start: int | None = None  # len(output) when the last call was at a point's start

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        n = len(output_ids)
        if self._start is not None and n > self._start:
            self.openings.add(output_ids[self._start])  # the token that opened the point
        at_start = bool(_AT_POINT_START.search(self.prefilled + self.decode(output_ids)))  # <= 160 tokens: ~30 us
        self._start = n if at_start else None
        if at_start and self.openings:
            ban(logits, torch.tensor(sorted(self.openings), device=logits.device))
        return logits


@functools.lru_cache(maxsize=8)
def number_starts(tokenizer, max_points: int) -> dict[int, torch.Tensor]:
    """For k in 1..max_points: the ids whose text begins writing "k." (a non-empty prefix of it, or all of it and
    more). Once per tokenizer: one pass over the tokens that start with a digit."""
    digits = [(i, t) for i, t in enumerate(tokenizer.token_texts()) if t[:1].isdigit()]
    return {k: torch.tensor([i for i, t in digits if f"{k}.".startswith(t) or t.startswith(f"{k}.")],
                            dtype=torch.long) for k in range(1, max_points + 1)}


_LAST_LINE_NUMBER = re.compile(r"(?:^|\n)[ \t]*([0-9]+)\.[^\n]*\n$")


class ListEnd:
    """A skeleton request's logits processor: where a line starts once `min_points` points are written, the list
    goes on with the probability the model gives the next number's first token and ends with all the rest: EOS
    takes the log-sum-exp of every other token's logit, and those tokens go. A model held to the grammar cannot
    write the blank line or the prose it would end its list with, so without this it reads on to max_points
    (SmolLM2: 9.4 points a skeleton instead of 4.6, and twice the answer)."""

    def __init__(self, tokenizer, eos_id: int, prefilled: str = "1.", min_points: int = 3,
                 max_points: int = 10) -> None:
        self.decode, self.eos = tokenizer.decode, eos_id
        self.prefilled, self.min_points, self.max_points = prefilled, min_points, max_points
        self._starts = number_starts(tokenizer, max_points)

    def number_start(self, k: int) -> torch.Tensor:
        """The ids whose text begins writing "k." (a non-empty prefix of it, or all of it and more)."""
        return self._starts[k]

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        m = _LAST_LINE_NUMBER.search(self.prefilled + self.decode(output_ids))
        if not m or not self.min_points <= int(m.group(1)) < self.max_points:
            return logits  # not at a line's start, or the grammar alone decides (it must go on, or end)
        go_on = self.number_start(int(m.group(1)) + 1).to(logits.device)
        if not len(go_on):
            return logits
        kept = logits[go_on].clone()
        logits[go_on] = float("-inf")
        end = torch.logsumexp(logits, 0)  # everything but going on, EOS included
        logits.fill_(float("-inf"))
        logits[go_on], logits[self.eos] = kept, end
        return logits


class HoldFirstSentence:
    """A point request's logits processor: until its first sentence of at least `min_words` words is complete
    (`first_sentence_end`), the tokens that would end the row -- `enders`: EOS and every token holding a newline --
    are banned. Then it lets go for good. One instance per request."""

    def __init__(self, decode, enders: list[int], min_words: int = 4) -> None:
        self.decode, self.min_words = decode, min_words  # decode: token ids -> text
        self.enders = torch.tensor(sorted(set(enders)), dtype=torch.long)
        self.free = False

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        if self.free:
            return logits
        if output_ids and first_sentence_end(self.decode(output_ids), self.min_words) is not None:
            self.free = True
            return logits
        ban(logits, self.enders.to(logits.device))
        return logits
