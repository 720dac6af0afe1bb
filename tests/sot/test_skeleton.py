"""Reading the skeleton: the paper's examples and the ways SmolLM2 strays from the format."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sot_engine.sot.skeleton import (MAX_POINT_WORDS, Point, format_skeleton, parse_skeleton,
                          skeleton_done)

CHINESE = " Dumplings.\n2. Noodles.\n3. Dim Sum.\n4. Hot Pot.\n5. Wonton.\n6. Ma Po Tofu.\n7. Char Siu.\n8. Fried Rice."
LIGHTNING = (" Introduction.\n2. The Earth's atmosphere.\n3. Lightning formation.\n4. Electrical discharge.\n"
             "5. Lightning strikes per second.\n6. Calculating the total.")


def texts(points: list[Point]) -> list[str]:
    assert [p.index for p in points] == list(range(1, len(points) + 1))  # always renumbered 1..n
    return [p.text for p in points]


# ---- parse_skeleton: well-formed ---------------------------------------------------------------------
def test_paper_demonstration():
    assert texts(parse_skeleton(CHINESE)) == ["Dumplings", "Noodles", "Dim Sum", "Hot Pot", "Wonton", "Ma Po Tofu",
                                              "Char Siu", "Fried Rice"]


def test_paper_openchat_skeleton():
    assert texts(parse_skeleton(LIGHTNING)) == ["Introduction", "The Earth's atmosphere", "Lightning formation",
                                                "Electrical discharge", "Lightning strikes per second",
                                                "Calculating the total"]


def test_prefill_is_prepended():
    assert texts(parse_skeleton(" A\n2. B\n3. C")) == ["A", "B", "C"]
    assert texts(parse_skeleton("1. A\n2. B\n3. C", prefilled="")) == ["A", "B", "C"]
    # without the prefill the first line is not point 1 and the list is broken at once
    assert texts(parse_skeleton(" A\n2. B\n3. C", prefilled="")) == []


# ---- parse_skeleton: what SmolLM2 does ---------------------------------------------------------------
def test_35_repeated_points_collapse():
    text = " Speed.\n" + "\n".join(f"{i}. Performance." for i in range(2, 36))
    assert texts(parse_skeleton(text)) == ["Speed", "Performance"]


def test_35_distinct_points_capped_at_max_points():
    text = " Aspect 1.\n" + "\n".join(f"{i}. Aspect {i}." for i in range(2, 36))
    assert texts(parse_skeleton(text)) == [f"Aspect {i}" for i in range(1, 11)]
    assert texts(parse_skeleton(text, max_points=4)) == [f"Aspect {i}" for i in range(1, 5)]


def test_number_past_max_points_ends_the_list():
    assert texts(parse_skeleton(" A\n2. B\n11. K\n3. C", max_points=10)) == ["A", "B"]


def test_blank_line_then_meta_text():
    text = (" Set clear goals.\n2. Prioritize tasks.\n3. Use a calendar.\n\n"
            "Please provide the skeleton for the following question.\n4. Not a point")
    assert texts(parse_skeleton(text)) == ["Set clear goals", "Prioritize tasks", "Use a calendar"]


def test_meta_text_without_blank_line():
    assert texts(parse_skeleton(" A\n2. B\n3. C\nPlease provide the skeleton...\n4. D")) == ["A", "B", "C"]


def test_nested_skeleton_block():
    text = " Introduction.\n2. The Earth's atmosphere.\nSkeleton:\n1. Introduction.\n2. Lightning.\n3. Other."
    assert texts(parse_skeleton(text)) == ["Introduction", "The Earth's atmosphere"]


def test_question_echo():
    text = " Exercise.\n2. Sleep.\n3. Diet.\nQuestion:\nWhat are some tips for sleeping?\nSkeleton:\n1. Dark room."
    assert texts(parse_skeleton(text)) == ["Exercise", "Sleep", "Diet"]


def test_markdown():
    text = " **Dumplings**\n**2. Noodles.**\n### 3. `Dim Sum`\n4. *Hot* Pot:\n5. __init__ files"
    assert texts(parse_skeleton(text)) == ["Dumplings", "Noodles", "Dim Sum", "Hot Pot", "__init__ files"]


def test_missing_number_keeps_leading_run():
    assert texts(parse_skeleton(" A\n2. B\n4. D\n5. E")) == ["A", "B"]
    assert texts(parse_skeleton(" A\n2. B\n4. D\n3. C")) == ["A", "B"]


def test_duplicate_index_keeps_first():
    assert texts(parse_skeleton(" A\n2. B\n2. B again\n3. C\n1. A again\n4. D")) == ["A", "B", "C", "D"]


def test_duplicate_text_keeps_first_and_renumbers():
    text = " Stay healthy.\n2. Exercise daily\n3. stay HEALTHY!\n4. Sleep well"
    pts = parse_skeleton(text)
    assert pts == [Point(1, "Stay healthy"), Point(2, "Exercise daily"), Point(3, "Sleep well")]


def test_single_line_answer_is_one_point():
    text = (" The best way to improve your time management skills is to plan each day the evening before, "
            "and to stick to it.")
    pts = parse_skeleton(text)
    assert texts(pts) == ["The best way to improve your time management skills is"]
    assert len(pts[0].text.split()) == MAX_POINT_WORDS


def test_prose_without_list():
    assert parse_skeleton("Sure! Time management is about planning.", prefilled="") == []
    assert parse_skeleton("") == []  # just the prefill "1."


def test_windows_newlines():
    assert texts(parse_skeleton(" A.\r\n2. B.\r\n3. C.\r\n\r\nQuestion:\r\n1. X")) == ["A", "B", "C"]
    assert texts(parse_skeleton(" A.\r2. B.\r3. C.")) == ["A", "B", "C"]


def test_paren_numbering():
    assert texts(parse_skeleton(" Plan ahead\n2) Prioritize\n3)Rest", prefilled="1)")) == ["Plan ahead", "Prioritize",
                                                                                            "Rest"]


def test_decimal_is_not_a_point_number():
    assert texts(parse_skeleton(" Sleep.\n2. 7.5 hours a night\n3.5 hours of work is enough")) == [
        "Sleep", "7.5 hours a night"]


def test_trailing_punctuation_and_long_points():
    text = (" Energy conservation:\n2. Efficient transportation;\n3. Home energy efficiency: insulation, "
            "windows, doors, heating, lighting, appliances, solar, wind and heat pumps.")
    assert texts(parse_skeleton(text)) == ["Energy conservation", "Efficient transportation",
                                           "Home energy efficiency"]  # the title before the inline detail


def test_empty_points_dropped_and_refilled():
    assert texts(parse_skeleton(" A\n2.\n3. B\n4. C")) == ["A", "B", "C"]
    assert texts(parse_skeleton(" A\n2. **\n3. B")) == ["A", "B"]
    assert texts(parse_skeleton("\n1. Dumplings\n2. Noodles")) == ["Dumplings", "Noodles"]  # "1." then a new line


def test_repeated_partial_answer():
    assert texts(parse_skeleton(" 1. Dumplings\n2. Noodles")) == ["Dumplings", "Noodles"]


def test_indented_and_trailing_whitespace():
    assert texts(parse_skeleton("  Set goals  \n  2.   Plan   the day \n\t3. Rest\n")) == ["Set goals", "Plan the day",
                                                                                          "Rest"]


@pytest.mark.parametrize("bad", [0, -1, True, 2.0])
def test_bad_max_points(bad):
    with pytest.raises(ValueError, match="max_points"):
        parse_skeleton(CHINESE, max_points=bad)
    with pytest.raises(ValueError, match="max_points"):
        skeleton_done(CHINESE + "\n", max_points=bad)


def test_format():
    assert format_skeleton(parse_skeleton(" A.\n2. **B**\n3. C:")) == "1. A\n2. B\n3. C"


# ---- skeleton_done: the streaming stop rule ----------------------------------------------------------
def first_done(text: str, **kw) -> int | None:
    """The shortest prefix length at which skeleton_done fires, checking it stays on afterwards."""
    flags = [skeleton_done(text[:k], **kw) for k in range(len(text) + 1)]
    if True not in flags:
        return None
    k = flags.index(True)
    assert all(flags[k:]), "skeleton_done must not switch off again"
    return k


def test_done_at_blank_line():
    text = (" Set clear goals.\n2. Prioritize tasks.\n3. Use a calendar.\n4. Avoid multitasking.\n\n"
            "Please provide the skeleton for the following question.")
    blank = text.index("\n\n")
    assert first_done(text) == blank + 2  # false on every strict prefix before the blank line is complete
    assert texts(parse_skeleton(text[:blank + 2])) == texts(parse_skeleton(text))


def test_done_at_repeated_point():
    text = " Stay healthy.\n2. Exercise.\n3. stay healthy\n4. Sleep.\n"
    end = text.index("3. stay healthy\n") + len("3. stay healthy\n")
    assert first_done(text) == end
    assert texts(parse_skeleton(text[:end])) == ["Stay healthy", "Exercise"]


def test_done_on_35_repeats_after_the_second():
    text = " Performance.\n" + "".join(f"{i}. Performance.\n" for i in range(2, 36))
    assert first_done(text) == len(" Performance.\n2. Performance.\n")


def test_done_past_max_points():
    text = CHINESE + "\n9. Spring rolls.\n10. Peking duck.\n11. Mooncakes.\n"
    assert first_done(text) == len(text)  # only once the 11th line is complete
    assert first_done(" A\n2. B\n3. C\n4. D\n5. E\n", max_points=3) == len(" A\n2. B\n3. C\n4. D\n")


@pytest.mark.parametrize("meta", ["Question:", "Skeleton:", "Please provide the skeleton.", "**Note**: short.",
                                  "Here are more details"])
def test_done_at_non_point_line(meta):
    text = LIGHTNING + "\n" + meta + "\n1. Something else\n"
    assert first_done(text) == len(LIGHTNING) + 1 + len(meta) + 1


def test_done_at_gap():
    assert first_done(" A\n2. B\n4. D\n5. E\n") == len(" A\n2. B\n4. D\n")


@pytest.mark.parametrize("text", ["", " Dumplings", " Dumplings.\n", " Dumplings.\n2. Noodles.\n3. Dim",
                                  CHINESE, CHINESE + "\n", " A\n2. B\n2. B again\n3. C\n", "\n\n",
                                  " A\r\n2. B\r\n", " A\n2. B\n3. C\nQuestion:"])
def test_not_done(text):
    assert not skeleton_done(text)


def test_done_windows_newlines():
    assert skeleton_done(" A\r\n2. B\r\n\r\n")
    assert not skeleton_done(" A\r\n2. B\r\n")


# ---- properties ---------------------------------------------------------------------------------------
LINES = st.sampled_from(["", "Question:", "Skeleton:", "**Bold**", "Noodles.", "Stay healthy", "stay healthy!",
                         "Please provide the skeleton", " ", "1.", "7.5 hours"])
NUMBERED = st.builds(lambda i, body, sep: f"{i}{sep} {body}", st.integers(0, 13), LINES, st.sampled_from([".", ")"]))
SKELETONS = st.lists(st.one_of(LINES, NUMBERED), max_size=14).map("\n".join)


@settings(max_examples=300, deadline=None)
@given(SKELETONS, st.sampled_from(["\n", "\r\n"]))
def test_properties(text, nl):
    text = text.replace("\n", nl)
    pts = parse_skeleton(text)
    assert [p.index for p in pts] == list(range(1, len(pts) + 1))
    assert len(pts) <= 10
    keys = [" ".join("".join(c if c.isalnum() else " " for c in p.text.lower()).split()) for p in pts]
    assert len(set(keys)) == len(keys)
    assert all(p.text and "\n" not in p.text and "*" not in p.text and not p.text.endswith((".", ":"))
               for p in pts)
    # the stop rule looks at complete lines only, and once on it stays on
    cut = text.rfind("\n") + 1
    assert skeleton_done(text) == skeleton_done(text[:cut])
    if skeleton_done(text[:cut]):
        assert skeleton_done(text + "\n2. more" + nl)


def test_points_expanded_inline_keep_their_titles():
    text = (" Dumplings: small parcels of dough filled with meat or vegetables.\n"
            "2. **Noodles** - long strips of dough, boiled.\n"
            "3. Dim Sum \u2014 bite-sized dishes served with tea.\n"
            "4. Time: 10:30 is not a title split")
    assert texts(parse_skeleton(text)) == ["Dumplings", "Noodles", "Dim Sum", "Time"]


def test_unicode_points_and_dedup():
    text = " Caf\u00e9 culture.\n2. Na\u00efve art\n3. \u65e5\u672c\u6599\u7406\n4. CAF\u00c9 CULTURE!\n5. \U0001f600 Smile"
    assert texts(parse_skeleton(text)) == ["Caf\u00e9 culture", "Na\u00efve art", "\u65e5\u672c\u6599\u7406",
                                           "\U0001f600 Smile"]


@pytest.mark.parametrize("text", ["", " ", "\n\n", "<|im_end|>"])
def test_empty_or_junk_output_gives_no_points(text):
    assert len(parse_skeleton(text)) <= 1  # a driver with min_points=2 falls back to normal decoding
