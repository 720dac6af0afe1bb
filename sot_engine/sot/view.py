"""Showing a SoT answer while it is written: a rich live view for terminals, plain lines for pipes.

Both consume the `Event`s of `SoT.stream` through `update(event)`, so the CLI loop is the same for both and
the live view can be tested on a made-up event sequence without a model.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, TextIO

from sot_engine.sot.driver import Answer, Event

if TYPE_CHECKING:  # rich loads with the first live view: a pipe or a file never pays for it
    from rich.console import RenderableType


def timing_line(ans: Answer) -> str:
    """The stages that ran, prefill+decode seconds each (the paper's Fig. 6 split)."""
    t = ans.timings
    parts = [f"{name} {s.prefill:.2f}+{s.decode:.2f} s" for name, s in
             (("skeleton", t.skeleton), ("expand", t.expand), ("normal", t.normal)) if s.total > 0]
    return ", ".join(parts) or "no stage ran"


def token_line(ans: Answer) -> str:
    k = ans.tokens
    s = f"{k.output} out (skeleton {k.skeleton_output}, points {k.expand_output}, normal {k.normal_output})"
    if ans.points:  # what the shared prefix saved
        s += f", point prompts {k.expand_prompt} prefilled {k.expand_prefilled}"
    return s


def summary_line(ans: Answer) -> str:
    """One line: mode, why, total latency, per-stage timings, token counts."""
    pts = f" {len(ans.points)} points," if ans.points else ""
    return (f"[{ans.mode}:{pts} {ans.reason} | {ans.timings.total:.2f} s | {timing_line(ans)} | "
            f"tokens {token_line(ans)}]")


class LiveView:
    """State of one answer being written, rendered as a rich renderable for `rich.live.Live`."""

    def __init__(self, question: str, skeleton_prefill: str = "1.") -> None:
        self.question, self.prefill = question, skeleton_prefill
        self.reason, self.skeleton, self.normal, self.fallback = "", "", "", ""
        self.rows: dict[int, list] = {}  # point index -> [point, text, done]
        self.answer: Answer | None = None

    def update(self, ev: Event) -> None:
        if ev.kind == "route":
            self.reason = ev.text
        elif ev.kind == "skeleton":
            self.skeleton += ev.text
        elif ev.kind == "points":
            self.rows = {p.index: [p.text, "", False] for p in ev.points or []}
        elif ev.kind == "fallback":
            self.fallback = ev.text
        elif ev.kind == "point" and ev.index in self.rows:
            self.rows[ev.index][1] += ev.text
        elif ev.kind == "point_done" and ev.index in self.rows:
            self.rows[ev.index][1:] = [ev.text.strip(), True]
        elif ev.kind == "normal":
            self.normal += ev.text
        elif ev.kind == "answer":
            self.answer = ev.answer

    def render(self) -> RenderableType:
        from rich.console import Group
        from rich.panel import Panel
        from rich.table import Table
        from rich.text import Text
        parts: list[RenderableType] = [Text.assemble(("Q: ", "bold"), self.question),
                                       Text.assemble(("route: ", "bold cyan"), self.reason or "...")]
        if self.skeleton:
            parts.append(Panel(Text(self.prefill + self.skeleton.rstrip()), title="skeleton", title_align="left",
                               border_style="dim"))
        if self.fallback:
            parts.append(Text.assemble(("fallback: ", "bold yellow"), self.fallback))
        if self.rows:
            tab = Table(title="points, expanded in parallel", title_justify="left", expand=True, show_lines=False)
            tab.add_column("#", justify="right", width=3)
            tab.add_column("point", ratio=1, style="bold")
            tab.add_column("expansion", ratio=3)
            tab.add_column("", width=1)
            for i, (point, text, done) in sorted(self.rows.items()):
                tab.add_row(str(i), Text(point), Text(text.strip()), Text("✓" if done else "…",
                                                                         style="green" if done else "dim"))
            parts.append(tab)
        if self.normal:
            parts.append(Panel(Text(self.normal.strip()), title="answer (normal decoding)", title_align="left"))
        if self.answer is not None:
            parts.append(Text(summary_line(self.answer), style="dim"))
        return Group(*parts)


class PlainView:
    """Plain lines for a pipe or a file: points stream interleaved, so each is printed once, when done."""

    def __init__(self, out: TextIO, skeleton_prefill: str = "1.") -> None:
        self.out, self.prefill = out, skeleton_prefill
        self.rows: dict[int, str] = {}
        self.open: str | None = None  # the event kind being streamed ("skeleton" or "normal")
        self.midline = False  # the streamed text has not ended its line

    def _end(self) -> None:
        if self.open and self.midline:
            self.out.write("\n")
        self.open, self.midline = None, False

    def _line(self, s: str) -> None:
        self._end()
        self.out.write(s + "\n")
        self.out.flush()

    def _stream(self, kind: str, s: str, head: str) -> None:
        if self.open != kind:
            self._end()
            self.out.write(head)
            self.open = kind
        self.out.write(s)
        self.out.flush()
        self.midline = not s.endswith("\n")

    def update(self, ev: Event) -> None:
        if ev.kind == "route":
            self._line(f"route: {ev.text}")
        elif ev.kind == "skeleton":
            self._stream("skeleton", ev.text, f"skeleton:\n{self.prefill}")
        elif ev.kind == "points":
            self.rows = {p.index: p.text for p in ev.points or []}
            self._line(f"expanding {len(self.rows)} points in parallel:")
        elif ev.kind == "fallback":
            self._line(f"fallback: {ev.text}")
        elif ev.kind == "point_done":
            self._line(f"{ev.index}. {self.rows.get(ev.index, '')}: {ev.text.strip()}".rstrip())
        elif ev.kind == "normal":
            self._stream("normal", ev.text, "answer:\n")
        elif ev.kind == "answer" and ev.answer is not None:
            if ev.answer.mode == "sot":  # the normal answer has just been streamed whole
                self._line("answer:\n" + ev.answer.text)
            self._line(summary_line(ev.answer))
