"""SoT prompts: the skeleton request, the point-expanding requests, and the prefix they share.

The templates are the paper's Prompt 1 (skeleton, with its two demonstrations) and Prompt 2 (point
expanding). Each request ends in an assistant prefill (a partial answer) so that a small model keeps the
format: "1." for the skeleton, "{point_index}. {point}:" for a point. Placeholders are filled in one
pass over the template (never `str.format`), so braces in a question or a custom template are kept
as they are and a question that happens to contain "{skeleton}" is not expanded.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

SKELETON_TEMPLATE = (
    "You're an organizer responsible for only giving the skeleton (not the full content) for answering the "
    "question. Provide the skeleton in a list of points (numbered 1., 2., 3., etc.) to answer the question. "
    "Instead of writing a full sentence, each skeleton point should be very short with only 3~5 words. "
    "Generally, the skeleton should have 3~10 points.\n"
    "\n"
    "Question:\n"
    "What are the typical types of Chinese dishes?\n"
    "Skeleton:\n"
    "1. Dumplings.\n"
    "2. Noodles.\n"
    "3. Dim Sum.\n"
    "4. Hot Pot.\n"
    "5. Wonton.\n"
    "6. Ma Po Tofu.\n"
    "7. Char Siu.\n"
    "8. Fried Rice.\n"
    "\n"
    "Question:\n"
    "What are some practical tips for individuals to reduce their carbon emissions?\n"
    "Skeleton:\n"
    "1. Energy conservation.\n"
    "2. Efficient transportation.\n"
    "3. Home energy efficiency.\n"
    "4. Reduce water consumption.\n"
    "5. Sustainable diet.\n"
    "6. Sustainable travel.\n"
    "\n"
    "Now, please provide the skeleton for the following question.\n"
    "{question}\n"
    "Skeleton:"
)

POINT_TEMPLATE = (
    "You're responsible for continuing the writing of one and only one point in the overall answer to the "
    "following question.\n"
    "\n"
    "{question}\n"
    "\n"
    "The skeleton of the answer is\n"
    "\n"
    "{skeleton}\n"
    "\n"
    "Continue and only continue the writing of point {point_index}. Write it **very shortly** in 1~2 sentence "
    "and do not continue with other points!"
)

CONTINUATION_TEMPLATE = (
    'Now write point {point_index} ("{point}") in full: one or two sentences of plain prose about it only. '
    "Do not write a list."
)

_PLACEHOLDER = re.compile(r"\{(question|skeleton|point_index|point)\}")


@dataclass(frozen=True)
class SoTPrompts:
    """The four user-overridable strings of an SoT run; placeholders: {question}, {skeleton},
    {point_index}, {point}. Frozen, so one instance can be a shared default."""
    skeleton_template: str = SKELETON_TEMPLATE
    skeleton_prefill: str = "1."
    point_template: str = POINT_TEMPLATE
    # The paper's partial answer is "{point_index}. {point skeleton}". Measured with SmolLM2, dropping the
    # point's trailing period and ending in a colon makes the model write the point's content far more often
    # (with the period it tends to start the next point or repeat the skeleton).
    point_prefill: str = "{point_index}. {point}:"
    # Continuation mode (beyond the paper): the points are asked for in the skeleton's own conversation, so
    # this short user turn is all a point adds to the skeleton's KV.
    # Measured with SmolLM2 on 5 Vicuna-80 questions (24 points): the paper's instruction with the paper-mode
    # prefill gave 1 point with content (the model goes on listing after its own list); this prose instruction
    # and a bold title gave 14.
    continuation_template: str = CONTINUATION_TEMPLATE
    continuation_prefill: str = "{point_index}. **{point}**:"

    def __post_init__(self) -> None:
        need = {"skeleton_template": ("question",), "point_template": ("question", "point_index"),
                "point_prefill": ("point_index",), "continuation_template": ("point_index",),
                "continuation_prefill": ("point_index",)}
        for name, keys in need.items():
            missing = [k for k in keys if "{" + k + "}" not in getattr(self, name)]
            if missing:
                raise ValueError(f"SoTPrompts.{name} lacks the placeholder(s) "
                                 + ", ".join("{" + k + "}" for k in missing))


DEFAULT_PROMPTS = SoTPrompts()


def fill(template: str, **values: object) -> str:
    """Replace {question}, {skeleton}, {point_index}, {point} in one pass; other braces stay."""
    return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]) if m.group(1) in values else m.group(0), template)


def _clean_question(question: str) -> str:
    if not isinstance(question, str) or not question.strip():
        raise ValueError("empty question")
    return question.strip()


def skeleton_messages(question: str, prompts: SoTPrompts = DEFAULT_PROMPTS) -> list[dict]:
    """The skeleton request: the user turn (Prompt 1) and the assistant prefill "1." to continue."""
    user = fill(prompts.skeleton_template, question=_clean_question(question))
    return [{"role": "user", "content": user}, {"role": "assistant", "content": prompts.skeleton_prefill}]


def point_prefill(index: int, point: str, prompts: SoTPrompts = DEFAULT_PROMPTS, continuation: bool = False) -> str:
    """The partial answer for one point, e.g. "2. Noodles:" (the point's own trailing period/colon dropped)."""
    template = prompts.continuation_prefill if continuation else prompts.point_prefill
    return fill(template, point_index=index, point=point.strip().rstrip(".:;, "))


def point_messages(question: str, skeleton_text: str, index: int, point: str,
                   prompts: SoTPrompts = DEFAULT_PROMPTS) -> list[dict]:
    """Point `index`'s expanding request: the user turn (Prompt 2) and the assistant prefill.

    Only the point index and the prefill differ between the points of one question: everything before
    them is the common prefix the driver prefills once (`sot.driver.common_prefix_len`).
    """
    if isinstance(index, bool) or not isinstance(index, int) or index < 1:
        raise ValueError(f"point index must be an int >= 1, got {index!r}")
    if not isinstance(point, str) or not point.strip().rstrip(".:;, "):
        raise ValueError(f"point {index} is empty")
    if not isinstance(skeleton_text, str) or not skeleton_text.strip():
        raise ValueError("empty skeleton")
    user = fill(prompts.point_template, question=_clean_question(question), skeleton=skeleton_text.strip(),
                point_index=index, point=point.strip())
    return [{"role": "user", "content": user},
            {"role": "assistant", "content": point_prefill(index, point, prompts)}]
