"""A SoT answer as one ordered text stream, while its points grow in parallel.

Points are written at once but read in order: point k's text is sent as it grows once points 1..k-1 are
done; a later point's text waits in its buffer. The text sent adds up to exactly `Answer.text` (leading and
trailing blanks of a part are held back until the part is done, so nothing sent has to be taken back).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from sot_engine.sot.driver import Event, SoTConfig
from sot_engine.sot.prompts import point_prefill
from sot_engine.sot.skeleton import Point


@dataclass
class _Part:
    label: str  # "" when labels are off
    text: str = ""
    done: bool = False

    def render(self) -> str:
        body = self.text.strip() if self.done else self.text.lstrip().rstrip()
        return f"{self.label} {body}".rstrip() if self.label else body


@dataclass
class OrderedText:
    config: SoTConfig
    parts: list[_Part] = field(default_factory=list)
    by_index: dict[int, _Part] = field(default_factory=dict)
    normal: _Part | None = None
    sent: str = ""

    def feed(self, ev: Event) -> str:
        """The new text to send after this event ("" if none)."""
        if ev.kind == "points":
            self._start(ev.points or [])
            return ""  # labels go out with the first point text: SoT may still fall back before it
        if ev.kind == "point" and ev.index in self.by_index:
            self.by_index[ev.index].text += ev.text
        elif ev.kind == "point_done" and ev.index in self.by_index:
            part = self.by_index[ev.index]
            part.text, part.done = ev.text, True
        elif ev.kind == "normal":
            if self.normal is None:
                self.normal = _Part("")
                self.parts = [self.normal]  # nothing of an abandoned SoT attempt was sent
            self.normal.text += ev.text
        elif ev.kind == "answer" and ev.answer is not None:
            return self._rest(ev.answer.text)
        return self._advance()

    def _start(self, points: list[Point]) -> None:
        for pt in points:
            label = point_prefill(pt.index, pt.text, self.config.prompts) if self.config.labels else ""
            self.by_index[pt.index] = _Part(label)
            self.parts.append(self.by_index[pt.index])

    def _current(self) -> str:
        """What can be shown now: the done parts in order and the one being written."""
        shown = []
        for part in self.parts:
            r = part.render()
            if r or self.config.labels:
                shown.append(r)
            if not part.done:
                break
        return "\n".join(shown)

    def _advance(self) -> str:
        cur = self._current()
        if not cur.startswith(self.sent) or len(cur) <= len(self.sent):
            return ""
        new, self.sent = cur[len(self.sent):], cur
        return new

    def _rest(self, final: str) -> str:
        """At the end: whatever of the final text is not sent yet (normally the held-back tail)."""
        if not final.startswith(self.sent):
            return ""  # cannot happen if the events were fed in order; never send text twice
        new, self.sent = final[len(self.sent):], final
        return new
