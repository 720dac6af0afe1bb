"""Per-row stop rules: where they cut, and that the engine applies them inside its step."""
from __future__ import annotations

import pytest
import torch

from sot_engine.engine import LLM, SamplingParams
from sot_engine.sot.skeleton import skeleton_end
from sot_engine.sot.stops import point_stop, repeated_ngram, skeleton_stop


@pytest.mark.parametrize("text, want", [
    (" Plan your day.", None),
    ("", None),
    ("\n\n", None),  # nothing written yet
    ("\n Plan your day.\nNext", (len("\n Plan your day."), "newline")),
    (" Plan your day. \n2. Set goals", (len(" Plan your day."), "newline")),
    (" Plan your day. 3. Set goals", (len(" Plan your day."), "another point")),
    (" 3. Set goals:", (0, "another point")),
    (" **3. Set goals**", (0, "another point")),
    (" Plan 2. Then", None),  # its own number, or a number before lowercase text, is prose
    (" It was 2020. The year", None),  # not a point number
    (" Fine. Skeleton: 1. a", (len(" Fine."), "echo of the prompt")),
    (" Fine. Continue and only continue", (len(" Fine."), "echo of the prompt")),
])
def test_point_stop(text, want):
    assert point_stop(2, num_points=5)(text) == want


def test_repetition_cuts_at_the_loop():
    loop = "Sleep well and eat well. " * 4
    cut, why = point_stop(1, ngram=6)(" " + loop)
    assert why == "repetition" and cut < len(loop) and (" " + loop)[:cut].count("Sleep well") >= 1
    assert point_stop(1, ngram=0)(" " + loop) is None  # the rule can be turned off
    assert repeated_ngram("one two three four", 2) is None
    assert repeated_ngram("a b c a b c", 3) == len("a b c ")
    assert repeated_ngram("x y x y x", 3) == len("x y ")  # overlapping: a short cycle


@pytest.mark.parametrize("text, end", [
    (" Plan.\n2. Prioritize.\n3. Rest.", None),  # the last line may still grow
    (" Plan.\n2. Prioritize.\n3. Rest.\n", None),
    (" Plan.\n2. Prioritize.\n\n", len(" Plan.\n2. Prioritize.\n")),
    (" Plan.\n2. Prioritize.\nPlease provide the skeleton\n", len(" Plan.\n2. Prioritize.\n")),
    (" Plan.\n2. Plan.\n", len(" Plan.\n")),  # a repeated point
    (" Plan.\n2. Rest.\n11. More.\n", len(" Plan.\n2. Rest.\n")),  # past max_points=10
    (" Plan.\r\n2. Rest.\r\n\r\n", len(" Plan.\r\n2. Rest.\r\n")),
])
def test_skeleton_end_offsets(text, end):
    assert skeleton_end(text) == end
    assert skeleton_stop()(text) == (None if end is None else (end, "end of skeleton"))


def test_engine_applies_stop_fn_in_the_step(tiny_chat_dir):
    llm = LLM(str(tiny_chat_dir), dtype=torch.float64, block_size=4, num_blocks=64)
    free_seq = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    full = llm.generate("Question: skeleton", free_seq)[0]
    assert len(full.text) > 6

    def at_five(text):
        return (5, "five chars") if len(text) >= 7 else None

    def broken(text):
        raise RuntimeError("boom")

    cut, bad, plain = llm.generate(["Question: skeleton"] * 3,
                                   [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop_fn=f)
                                    for f in (at_five, broken, None)])
    assert cut.text == full.text[:5] and cut.finish_reason == "stop" and cut.stop_reason == "five chars"
    assert len(cut.token_ids) < len(full.token_ids)
    assert bad.finish_reason == "stop" and "stop_fn error" in bad.stop_reason and len(bad.token_ids) == 1
    assert plain.token_ids == full.token_ids, "a broken rule in one row must not touch the others"
    assert llm.stats()["free_blocks"] == 64
    with pytest.raises(ValueError, match="stop_fn"):
        SamplingParams(stop_fn="newline")


def test_skeleton_stops_on_a_runaway_line():
    prose = " Natural Selection: the process by which " + "individuals with useful traits survive " * 8
    assert skeleton_end(prose) == len(prose)  # ends now, keeps the text: the parser takes the title
    one_line = " Barriers: " + " ".join(f"{i}. Cultural barriers:" for i in range(1, 12))
    assert skeleton_end(one_line) == len(one_line)
    assert skeleton_end(" Plan your week ahead on Sunday") is None  # a normal point still being written
