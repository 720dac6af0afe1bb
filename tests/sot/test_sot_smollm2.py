"""SoT on the embedded SmolLM2: a generic question gets a real skeleton and answer; math and code go to
normal decoding in auto mode."""
from __future__ import annotations

import pytest

from sot_engine.sot.driver import SoT, SoTConfig
from tests.conftest import requires_smollm2

pytestmark = requires_smollm2


@pytest.fixture(scope="module")
def sot(smollm2):
    return SoT(smollm2.llm, SoTConfig(point_max_tokens=48, normal_max_tokens=16))


def test_generic_question_gets_points_and_an_answer(sot, smollm2):
    ans = sot.answer("How can I improve my time management skills?", mode="auto")
    assert ans.mode == "sot", ans.reason
    assert 3 <= len(ans.points) <= 10
    assert all(p.point and len(p.point.split()) <= 10 for p in ans.points)
    assert sum(len(p.text) > 20 for p in ans.points) >= 2, "the expansions are empty"
    lines = ans.text.split("\n")
    assert len(lines) == len(ans.points) and lines[0].startswith(f"1. {ans.points[0].point}:")
    assert ans.tokens.expand_prefilled < ans.tokens.expand_prompt  # the shared prefix was prefilled once
    assert ans.timings.skeleton.total > 0 and ans.timings.expand.total > 0
    st = smollm2.llm.stats()
    assert st["free_blocks"] == st["total_blocks"]


@pytest.mark.parametrize("router", ["trained", "rules"])
@pytest.mark.parametrize("question, why", [
    ("Solve for x: 3x + 10 = 5x - 10", "math"),
    ("Write a Python function that returns the n-th Fibonacci number.", "code"),
])
def test_math_and_code_are_answered_normally(sot, question, why, router):
    sot = sot if router == "trained" else SoT(sot.llm, sot.config, router="rules")
    kinds = []
    for ev in sot.stream(question, mode="auto"):
        kinds.append(ev.kind)
        if ev.kind == "answer":
            ans = ev.answer
    assert ans.mode == "normal" and ans.skeleton is None and ans.router == getattr(sot.router, "name", "rules")
    assert ans.reason.startswith(f"{ans.router} router: ")  # the answer names the route that decided
    if router == "rules":
        assert why in ans.reason
    assert "skeleton" not in kinds and ans.text and 1 <= ans.tokens.normal_output <= 16 and ans.timings.route > 0


@pytest.mark.parametrize("question", [
    "What are the main causes of inflation?",  # free decoding: "1. Inflation.\n", then the list ends or loops
    "How can I tell restaurants for locals from tourist traps when I travel?",  # free: one point, then fallback
    "How can I improve my time management skills?",  # the README's example: an empty point and a cut clause
])
def test_the_skeleton_holds_and_every_point_says_something(sot, question):
    ans = sot.answer(question, mode="sot")
    assert ans.mode == "sot", ans.reason  # the grammar wrote 3..10 points, with distinct openings
    assert 2 <= len(ans.points) <= 10 and ans.tokens.skeleton_output > 0
    for p in ans.points:  # a first sentence of 4+ words before any end (or the token cap came first)
        assert p.text and (len(p.text.split()) >= 4 or p.finish_reason == "length"), (p.point, p.text)
