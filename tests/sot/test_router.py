"""The SoT router on hand-written questions: what falls back to normal decoding, and what stays on SoT."""
from __future__ import annotations

import dataclasses

import pytest

from sot_engine.sot.router import NORMAL, RULES, SOT, Route, route


def check(question: str, mode: str, category: str) -> Route:
    r = route(question)
    assert (r.mode, r.category) == (mode, category), (question, r)
    assert r.reason.startswith(f"{category}: ") and len(r.reason) > len(category) + 5
    return r


@pytest.mark.parametrize("question", [
    "Solve for x: 3x + 7 = 22.",
    "What is 12*7?",
    "what's 144 / 12",
    "Find the roots of x^2 - 5x + 6.",
    "Calculate the compound interest on $500 at 4% for 3 years.",
    "Compute the determinant of a 2 by 2 identity matrix.",
    "Prove that the square root of 2 is irrational.",
    "What is the derivative of sin(x) times e to the x?",
    "Evaluate the definite integral of 1/x from 1 to e.",
    "A train leaves at 3pm going 80 km/h; how far has it gone by 6pm?",
    "What is 15% of 240?",
    "What is 7 multiplied by 8?",
    "Which number solves the equation 2y minus 4 equals 10?",
])
def test_math_falls_back(question):
    assert "math" in check(question, NORMAL, "math").reason


def test_equation_reason_says_equation():
    assert route("If a + b = 10 and a - b = 2, what is a?").reason == "math: the question contains an equation"


@pytest.mark.parametrize("question", [
    "Write a Python function that checks whether a string is a palindrome.",
    "Implement a stack class with push, pop and peek.",
    "Can you debug this? My loop never ends.",
    "Write a SQL query that returns the ten most recent orders.",
    "How do I read a CSV file in Python?",
    "How do I overload operators in C++?",
    "What does this code print?\n```\nprint(sum(range(4)))\n```",
    "Design an algorithm to detect cycles in a directed graph.",
    "Give me a regex that matches US zip codes.",
    "What is the time complexity of merge sort?",
])
def test_code_falls_back(question):
    check(question, NORMAL, "code")


def test_code_wins_over_math():
    # it contains an equation, but what is asked for is a program
    check("Write a program that solves x^2 = 4 by bisection.", NORMAL, "code")


@pytest.mark.parametrize("question", [
    "Is a whale a fish? Answer yes or no.",
    "Describe the ocean in one word.",
    "Summarize the plot of Hamlet in one sentence.",
    "How many legs does a spider have? Answer with a number.",
    "Briefly, what causes the tides?",
    "True or false: bats are blind.",
    "What is the capital of Mongolia?",
    "Who wrote War and Peace?",
    "Which gas do plants absorb? A) oxygen B) carbon dioxide C) helium",
])
def test_short_answers_fall_back(question):
    check(question, NORMAL, "short-answer")


@pytest.mark.parametrize("question", [
    "Think about it step by step: which weighs more, a kilo of iron or a kilo of feathers?",
    "Is it ever right to lie? Explain your reasoning.",
    "Walk me through your reasoning on whether a hot dog is a sandwich.",
    "How many piano tuners are there in Chicago?",
    "How many times does a heart beat in a lifetime?",
    "Estimate the number of golf balls that fit in a school bus.",
    "Solve the following riddle: what has keys but can't open locks?",
])
def test_step_by_step_and_fermi_fall_back(question):
    check(question, NORMAL, "step-by-step")


@pytest.mark.parametrize("question", [
    "Write a poem about the first snow of winter.",
    "Compose a heartfelt thank-you letter to a retiring teacher.",
    "Draft a short, friendly and persuasive follow-up email to a client.",
    "Translate 'where is the train station' into German.",
    "Proofread my cover letter for me.",
])
def test_coherent_text_falls_back(question):
    check(question, NORMAL, "coherent-text")


@pytest.mark.parametrize("question", [
    "How can I improve my time management skills?",
    "What are some tips for learning a new language?",
    "As a pirate captain, what would you say to motivate your crew?",  # roleplay: in-character points
    "What if the Internet had never been invented?",
    "What are the pros and cons of living in a big city?",
    "How can I prepare for a job interview?",
    # a question *about* a language that asks for an open list is SoT; "in Python" would be a coding request
    "What are the benefits of learning Python?",
    "What are the main differences between Java and Rust?",
    # a digit alone is not math, "solve" alone is not math, "program"/"class" outside code are not code
    "How do I deal with 2 jobs at once?",
    "What changed in the world after 1989?",
    "How can teams solve conflicts at work?",
    "Create a weekly workout program for a beginner.",
    "Design a lesson plan for my history class.",
    "Write a code of conduct for an open-source project.",
    "What is the value of a liberal arts education?",
    "How do I translate my teaching skills into a corporate career?",
    "What makes a good 9-to-5 job?",
])
def test_open_questions_stay_on_sot(question):
    r = check(question, SOT, "fits")
    assert r.reason == "fits: an open question with independent points"


@pytest.mark.parametrize("bad", ["", "   ", "\n\t", None, 42, b"bytes", ["a list"]])
def test_empty_or_non_str_raises(bad):
    with pytest.raises(ValueError, match="empty question"):
        route(bad)


def test_route_is_frozen_and_rules_are_well_formed():
    r = route("What is 2+2?")
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.mode = SOT
    assert {c for c, _, _ in RULES} == {"code", "math", "step-by-step", "short-answer", "coherent-text"}
    assert all(why and not why.endswith(".") for _, _, why in RULES)


def test_case_insensitive_and_multiline():
    check("SOLVE FOR X: 2X = 8", NORMAL, "math")
    check("Here is my question.\nPlease answer in ONE WORD.", NORMAL, "short-answer")
