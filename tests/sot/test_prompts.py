"""SoT prompts: the paper's templates, the prefills, and the prefix the point requests share."""
from __future__ import annotations

import dataclasses

import pytest

from conftest import smollm2_gguf
from sot_engine.engine.chat import ChatTemplate
from sot_engine.sot.prompts import (DEFAULT_PROMPTS, SoTPrompts, point_messages, point_prefill,
                         skeleton_messages)
from sot_engine.sot.skeleton import Point, format_skeleton

QUESTION = "How can I improve my time management skills?"
POINTS = [Point(1, "Set clear goals"), Point(2, "Prioritize tasks"), Point(3, "Avoid multitasking")]
CHATML = ChatTemplate.named("chatml")


def point_prompts(points=POINTS, question=QUESTION, template=CHATML, prompts=DEFAULT_PROMPTS) -> list[str]:
    sk = format_skeleton(points)
    return [template.render(point_messages(question, sk, p.index, p.text, prompts)) for p in points]


# ---- skeleton request --------------------------------------------------------------------------------
def test_skeleton_messages_paper_prompt_1():
    msgs = skeleton_messages("  " + QUESTION + "\n")
    assert [m["role"] for m in msgs] == ["user", "assistant"]
    assert msgs[1]["content"] == "1."
    user = msgs[0]["content"]
    assert user.startswith("You're an organizer responsible for only giving the skeleton (not the full content)")
    assert "each skeleton point should be very short with only 3~5 words" in user
    assert "Generally, the skeleton should have 3~10 points." in user
    # both demonstrations with their whole skeletons, in order, before the question
    chinese = user.index("What are the typical types of Chinese dishes?")
    carbon = user.index("What are some practical tips for individuals to reduce their carbon emissions?")
    assert chinese < user.index("8. Fried Rice.") < carbon < user.index("6. Sustainable travel.") < user.index(QUESTION)
    assert "1. Dumplings.\n2. Noodles.\n3. Dim Sum.\n4. Hot Pot.\n5. Wonton.\n6. Ma Po Tofu.\n7. Char Siu." in user
    assert user.endswith("Now, please provide the skeleton for the following question.\n" + QUESTION + "\nSkeleton:")
    assert "{" not in user  # every placeholder filled


def test_skeleton_request_rendered_ends_in_prefill():
    text = CHATML.render(skeleton_messages(QUESTION))
    assert text.startswith("<|im_start|>user\nYou're an organizer")
    assert text.endswith(QUESTION + "\nSkeleton:<|im_end|>\n<|im_start|>assistant\n1.")


def test_question_braces_are_not_placeholders():
    q = "What does {skeleton} mean in f'{x}' strings and {point_index}?"
    user = skeleton_messages(q)[0]["content"]
    assert q in user
    pm = point_messages(q, "1. A\n2. B", 2, "B")[0]["content"]
    assert q in pm and "writing of point 2." in pm


@pytest.mark.parametrize("bad", ["", "   \n", None])
def test_empty_question_rejected(bad):
    with pytest.raises(ValueError, match="empty question"):
        skeleton_messages(bad)


# ---- point-expanding requests ------------------------------------------------------------------------
def test_point_messages_paper_prompt_2():
    sk = format_skeleton(POINTS)
    msgs = point_messages(QUESTION, sk, 2, "Prioritize tasks")
    assert [m["role"] for m in msgs] == ["user", "assistant"]
    user = msgs[0]["content"]
    assert user == ("You're responsible for continuing the writing of one and only one point in the overall answer "
                    "to the following question.\n\n" + QUESTION + "\n\nThe skeleton of the answer is\n\n"
                    "1. Set clear goals\n2. Prioritize tasks\n3. Avoid multitasking\n\n"
                    "Continue and only continue the writing of point 2. Write it **very shortly** in 1~2 sentence "
                    "and do not continue with other points!")
    assert msgs[1]["content"] == "2. Prioritize tasks:"


@pytest.mark.parametrize("point,want", [("Noodles.", "2. Noodles:"), ("Noodles:", "2. Noodles:"),
                                        ("  Dim Sum. ", "2. Dim Sum:"), ("Ma Po Tofu", "2. Ma Po Tofu:")])
def test_point_prefill_drops_trailing_period_adds_colon(point, want):
    assert point_prefill(2, point) == want
    assert point_messages(QUESTION, "1. A", 2, point)[1]["content"] == want


def test_point_prefill_overridable_to_paper_form():
    paper = SoTPrompts(point_prefill="{point_index}. {point}")
    assert point_messages(QUESTION, "1. A", 3, "Hot Pot.", paper)[1]["content"] == "3. Hot Pot"
    assert skeleton_messages(QUESTION, paper)[1]["content"] == "1."


def test_custom_templates():
    p = SoTPrompts(skeleton_template="Q: {question}\nOutline:", skeleton_prefill="1)",
                   point_template="{question} | {skeleton} | #{point_index} ({point}) {literal}")
    assert skeleton_messages("Why?", p) == [{"role": "user", "content": "Q: Why?\nOutline:"},
                                           {"role": "assistant", "content": "1)"}]
    assert point_messages("Why?", "1) A\n2) B", 2, "B", p)[0]["content"] == "Why? | 1) A\n2) B | #2 (B) {literal}"


@pytest.mark.parametrize("field,value", [("skeleton_template", "no placeholder"),
                                         ("point_template", "{question} but no index"),
                                         ("point_prefill", "{point}:")])
def test_templates_missing_placeholders_rejected(field, value):
    with pytest.raises(ValueError, match=field):
        SoTPrompts(**{field: value})


def test_prompts_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULT_PROMPTS.point_prefill = "x"  # type: ignore[misc]


@pytest.mark.parametrize("index,point,skeleton,match", [(0, "A", "1. A", "index"), (True, "A", "1. A", "index"),
                                                        (1.0, "A", "1. A", "index"), (1, " . ", "1. A", "empty"),
                                                        (1, "A", "  ", "skeleton")])
def test_point_messages_bad_input(index, point, skeleton, match):
    with pytest.raises(ValueError, match=match):
        point_messages(QUESTION, skeleton, index, point)


# ---- the shared prefix -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smol_tokenizer():
    path = smollm2_gguf()
    if path is None:
        pytest.skip("embedded model not installed")
    from sot_engine.engine.loader.gguf import open_gguf
    from sot_engine.engine.tokenizer import Tokenizer
    return Tokenizer.from_gguf(open_gguf(path))


def test_point_prompts_share_everything_up_to_the_point_number(smol_tokenizer):
    """The driver forks on the common token prefix of the full point prompts: it must hold the question and
    the whole skeleton, i.e. end just before the point's own number."""
    from sot_engine.sot.driver import common_prefix_len
    ids = [smol_tokenizer.encode(t) for t in point_prompts()]
    n = common_prefix_len(ids)
    prefix = smol_tokenizer.decode(ids[0][:n], skip_special_tokens=False)
    assert QUESTION in prefix and format_skeleton(POINTS) in prefix
    assert prefix.rstrip().endswith("Continue and only continue the writing of point")
    assert all(smol_tokenizer.decode(i[n:], skip_special_tokens=False).lstrip().startswith(str(k + 1))
               for k, i in enumerate(ids))
