"""The SoT router: does a question suit Skeleton-of-Thought, or should it be answered by normal decoding?

SoT pays off when the answer is a handful of points that can be written independently. It hurts when the
answer is a chain (math, code, step-by-step reasoning, Fermi estimates: point 3 needs point 2), when it is a
word or a sentence (a skeleton is pure overhead), or when it must read as one piece (a poem, a letter, a
translation). These are the kinds of question the paper's router (SoT-R) keeps on normal decoding.
The rules are regexes, checked in order, first hit wins; anything no rule catches goes to SoT.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

SOT, NORMAL = "sot", "normal"

_LANGS = r"python|c\+\+|c#|java|javascript|typescript|rust|golang|ruby|php|kotlin|haskell|bash|perl|matlab|sql"
_CODE = (r"program|function|method|snippet|algorithm|regex|regular expression|code(?! of\b)|unit tests?|"
         r"api endpoint|sql query|linked list|binary (search )?tree|hash ?map")
_WRITINGS = (r"poem|haiku|limerick|sonnet|song|lyrics|rap|story|tale|fable|letter|e-?mail|speech|toast|essay|"
             r"blog post|dialogue|screenplay|(?:video|movie|film|podcast|play) script")
_TONGUES = r"english|french|spanish|german|italian|portuguese|russian|chinese|japanese|korean|arabic|hindi|latin"


@dataclass(frozen=True)
class Route:
    mode: str  # "sot" | "normal"
    reason: str  # a short sentence for logs and the API, e.g. "math: the question contains an equation"
    category: str  # "math", "code", "step-by-step", "short-answer", "coherent-text" or "fits"
    router: str = "rules"  # which router decided: "rules", "trained (...)" or "asked" (the caller chose the mode)


Router = Callable[[str], Route]  # question -> decision: `route` below, or `trained_router.TrainedRouter`


def _rx(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.I | re.S)


# (category, pattern, why). Order matters: "write a Python function that solves x^2 = 4" is code, not math.
RULES: list[tuple[str, re.Pattern[str], str]] = [
    # -- code: the answer is a program, and a program is one dependent whole
    ("code", _rx(r"```|\bdef\s+\w+\s*\(|#include\b|\bconsole\.log\b|\bprint\s*\(|\bint\s+main\s*\("),
     "the question contains code"),
    ("code", _rx(rf"\b(write|implement|debug|refactor)\b[^.?!\n]{{0,40}}\b({_CODE}|script|class)\b|"
                 rf"\b(create|build|develop|design|optimi[sz]e|fix)\b[^.?!\n]{{0,40}}\b(function|method|snippet|"
                 rf"algorithm|regex|regular expression|unit tests?|api endpoint|sql query)\b"),
     "it asks for a program to be written or fixed"),
    ("code", _rx(rf"\b(in|using)\s+({_LANGS})(?![\w+#])|\b({_LANGS})\s+(program|script|function|class|code|snippet)\b"),
     "it asks for code in a programming language"),
    ("code", _rx(r"\b(this|the following|my)\s+(code|snippet|script|function|program)\b|\bdebug(ging)?\b|"
                 r"\bregex\b|\b(time|space) complexity\b|\bbig[- ]o\b"), "it is about a piece of code"),
    # -- math: each step needs the one before
    ("math", _rx(r"[\w)\]]\s*=\s*[-\w(\[]|\b[a-z]\s*\^\s*\d|[a-z0-9][²³]"), "the question contains an equation"),
    ("math", _rx(r"\d\s*[+*×÷^]\s*-?\d|\d\s+[-/]\s+\d|\bwhat(?:'s| is)\s+-?\d[\d.,]*\s*[-+*/x×÷^]\s*-?\d"),
     "the question contains an arithmetic expression"),
    ("math", _rx(r"\d\s*(plus|minus|times|divided by|multiplied by|to the power of)\s*\d|\d\s*%\s*of\s+\d|"
                 r"\b(sum|product|quotient|average|mean) of \d"), "the question asks for arithmetic"),
    ("math", _rx(r"\b(equations?|inequalit(y|ies)|calculate|compute|solve for|prove that|(derivative|integral|"
                 r"antiderivative) of|(definite|indefinite) integral|square root|factorial|value of [xyz]|"
                 r"greatest common divisor|least common multiple|probability (of|that))\b"),
     "the question asks for a calculation or a proof"),
    ("math", _rx(r"(?=.*\d\D+\d)(?=.*\b(how (many|much|long|far|fast|old)|what (is|are|was|will be) the (total|"
                 r"area|volume|perimeter|length|distance|slope|speed|cost|price|ratio|percentage|remainder))\b)"),
     "a word problem: numbers in, a number out"),
    # -- step-by-step: the asker wants one chain of reasoning
    ("step-by-step", _rx(r"\bstep[- ]by[- ]step\b|\b(explain|show|justify)\s+your\s+(reasoning|thought process|"
                         r"logic|work|answer)\b|\bwalk me through (your|the) (reasoning|thought process|logic)\b|"
                         r"\blet'?s think\b|\b(this|the following) (riddle|puzzle|brain ?teaser|logic problem)\b"),
     "it asks for a chain of reasoning"),
    ("step-by-step", _rx(r"\bestimate\b|\b(ballpark|back[- ]of[- ]the[- ]envelope|order of magnitude)\b|"
                         r"\bhow (many|much)\b[^?]{0,100}\b(are there|exist|in (a|an|the|one|your|my) (lifetime|"
                         r"year|day|world|universe|ocean|human body)|on earth|per (second|minute|hour|day|year)|"
                         r"(the )?average|typical)\b"), "a Fermi estimate, reasoned step by step"),
    # -- short answer: a skeleton would be longer than the answer
    ("short-answer", _rx(r"\bin (one|a single|1|two|2|three|3|a few) (words?|sentences?|lines?)\b|"
                         r"\bone[- ]word\b|\bsingle (word|number|letter|sentence)\b|\byes\s*(or|/)\s*no\b|"
                         r"\btrue\s*(or|/)\s*false\b|\b(answer|reply|respond) (only )?with (only |just )?(a|an|one)"
                         r"\b|\b(only|just) (answer|reply|respond|output|return)\b|\bshort answer\b|"
                         r"\b(briefly|concisely|in brief|keep it short)\b"), "it asks for a short answer"),
    ("short-answer", _rx(r"\bwhat(?:'s| is) the capital (city )?of\b|\bcapital city of\b|"
                         r"\bwho (wrote|invented|discovered|painted|composed|founded)\b|\b(what|which|in which) year\b|"
                         r"\b[a-d]\)\s.+\b[b-e]\)\s"), "a factoid or multiple-choice question"),
    # -- coherent text: the answer must read as one piece, not as separately written points
    ("coherent-text", _rx(rf"\b(write|compose|draft|create|craft)\b[^.?!\n]{{0,60}}\b({_WRITINGS})s?\b"),
     "a poem, story or letter must read as one piece"),
    ("coherent-text", _rx(rf"\btranslate\b[^?\n]{{0,80}}\b(in)?to ({_TONGUES})\b|\b(paraphrase|rephrase|rewrite|"
                          rf"proofread)\b|\bcorrect the grammar\b"), "it transforms a given text"),
]

_FITS = Route(SOT, "fits: an open question with independent points", "fits")


def route(question: str) -> Route:
    """SoT or normal decoding for `question`, with the rule that decided. Cheap: a few regex scans."""
    if not isinstance(question, str) or not question.strip():
        raise ValueError("empty question")
    for category, pattern, why in RULES:
        if pattern.search(question):
            return Route(NORMAL, f"{category}: {why}", category)
    return _FITS
