"""The form SoT decodes under (sot.grammar): the skeleton always parses into min..max distinct one-line points,
whatever the model wants; a point opens with a complete sentence before it may end. Checked on a random model
sampled at temperature 1 (every path of the grammar gets walked), with models biased to stop early or run on,
and against an independent reading of the text (Python's `re`, the parser)."""
from __future__ import annotations

import re

import pytest
import torch

from sot_engine.engine import LLM, GuidedDecoding, SamplingParams
from sot_engine.sot.grammar import (MAX_POINT_WORDS, MAX_SENTENCE_WORDS, WS, DistinctOpenings, HoldFirstSentence,
                                    first_sentence_end, skeleton_grammar)
from sot_engine.sot.prompts import skeleton_messages
from sot_engine.sot.skeleton import _NUMBERED, _clean_point, _demarkdown, _normalized, parse_skeleton
from sot_engine.sot.stops import point_stop

pytest.importorskip("llguidance")
# what a point line must be, read independently of the grammar (its whitespace: ASCII, as llguidance's regexes)
LINE = re.compile(rf"([0-9]+)\. ([^{WS}]+(?: [^{WS}]+)*)")


@pytest.fixture(scope="module")
def llm(tiny_chat_dir):
    n = torch.get_num_threads()
    yield LLM(str(tiny_chat_dir), dtype=torch.float32, num_threads=1, block_size=8, num_blocks=1024)
    torch.set_num_threads(n)


def eos_bias(llm: LLM, bias: float):
    """A logits processor for a model that wants to stop (bias > 0) or never to (bias < 0)."""
    eos = sorted(llm.engine.eos_ids)

    def fn(ids: list[int], row: torch.Tensor) -> torch.Tensor:
        row[eos] += bias
        return row
    return fn


def skeleton_params(llm, seed: int, lo: int = 3, hi: int = 10, prefill: str = "1.", procs=(), **kw):
    return SamplingParams(temperature=1.0, seed=seed, max_tokens=400,
                          guided=GuidedDecoding(grammar=skeleton_grammar(prefill, lo, hi)),
                          logits_processors=[*procs, DistinctOpenings(llm.tokenizer.decode, prefill)], **kw)


def check_list(text: str, prefill: str, lo: int, hi: int) -> list[str]:
    """The points of a whole constrained skeleton, each line checked: consecutive numbers, no blank line, at most
    MAX_POINT_WORDS words, no list number inside, ends with a newline."""
    whole = prefill + text
    assert whole.endswith("\n"), repr(whole)
    lines = whole[:-1].split("\n")
    points = []
    for i, line in enumerate(lines, start=1):
        m = LINE.fullmatch(line)
        assert m and int(m.group(1)) == i, (i, line)
        words = m.group(2).split(" ")
        assert len(words) <= MAX_POINT_WORDS and not any(re.fullmatch(r"[0-9]+[.)].*", w) for w in words), line
        points.append(m.group(2))
    assert lo <= len(points) <= hi, (len(points), whole)
    return points


@pytest.mark.parametrize("seed", range(6))
def test_sampled_skeletons_always_have_the_form(llm, seed):
    out = llm.generate([skeleton_messages("How do I learn?")], skeleton_params(llm, seed))[0]
    assert out.finish_reason == "stop", out.text  # the grammar or the model ended it, never max_tokens
    points = check_list(out.text, "1.", 3, 10)
    # the parser reads every line as a point: nothing in the form ends its list early; it still drops a point
    # that repeats an earlier one (case and punctuation blind) or cleans to nothing
    expected, seen = [], set()
    for i, p in enumerate(points, start=1):
        body = _clean_point(_NUMBERED.match(_demarkdown(f"{i}. {p}")).group(2), i)
        if body and _normalized(body) not in seen:
            seen.add(_normalized(body))
            expected.append(body)
    assert [p.text for p in parse_skeleton(out.text)] == expected


def test_a_model_that_wants_to_stop_still_writes_min_points(llm):
    for seed in range(3):
        out = llm.generate([skeleton_messages("Why?")], skeleton_params(llm, seed, procs=[eos_bias(llm, 50.0)]))[0]
        assert len(check_list(out.text, "1.", 3, 10)) == 3  # EOS at the first chance, and not before


def test_a_model_that_runs_on_is_cut_at_max_points(llm):
    for seed in range(3):
        out = llm.generate([skeleton_messages("Why?")], skeleton_params(llm, seed, lo=2, hi=4,
                                                                           procs=[eos_bias(llm, -50.0)]))[0]
        assert len(check_list(out.text, "1.", 2, 4)) == 4 and out.finish_reason == "stop"


@pytest.mark.parametrize("prefill, lo, hi, written", [
    ("", 2, 4, 0), ("1.", 3, 5, 0), ("1. Alpha\n2.", 3, 5, 1), ("1. Alpha\n2. Beta\n3. Gamma\n", 3, 5, 3),
    ("1. Alpha\n2. Beta\n3. Gamma\n", 2, 3, 3)])
def test_prefills_the_grammar_continues(llm, prefill, lo, hi, written):
    out = llm.generate([skeleton_messages("Why?") + [{"role": "assistant", "content": prefill}]],
                       skeleton_params(llm, 7, lo, hi, prefill=prefill, procs=[eos_bias(llm, 50.0)]))[0]
    points = check_list(out.text, prefill, lo, hi)
    assert len(points) == max(lo, written)  # the model stops as soon as the grammar lets it


@pytest.mark.parametrize("prefill, lo, hi, match", [
    ("Skeleton:", 3, 10, "prefill"), ("1. Alpha", 3, 10, "prefill"), ("1.", 4, 3, "min_points"),
    ("1.", 0, 3, "min_points"), ("1. A\n2. B\n3. C\n", 1, 2, "past max_points"), ("4.", 1, 3, "past max_points")])
def test_bad_skeleton_grammars(prefill, lo, hi, match):
    with pytest.raises(ValueError, match=match):
        skeleton_grammar(prefill, lo, hi)


def test_openings_are_distinct(llm):
    for seed in range(4):
        out = llm.generate([skeleton_messages("How?")], skeleton_params(llm, seed, lo=5, hi=8))[0]
        ids, starts = out.token_ids, [0]
        for k in range(1, len(ids)):
            if re.search(r"\n\d+\.$", llm.tokenizer.decode(ids[:k])):
                starts.append(k)
        openings = [ids[k] for k in starts if k < len(ids)]
        assert len(openings) >= 5 and len(set(openings)) == len(openings), openings


def test_distinct_openings_bans_only_at_a_point_start():
    decode = {1: " A", 2: ".\n", 3: "2", 4: ".", 5: " B"}
    proc = DistinctOpenings(lambda ids: "".join(decode[i] for i in ids), "1.")
    row = lambda: torch.zeros(8)  # noqa: E731
    assert torch.isfinite(proc([], row())).all()  # point 1's start: nothing to ban yet
    assert torch.isfinite(proc([1], row())).all()  # mid-point
    assert torch.isfinite(proc([1, 2, 3], row())).all()  # "2" is not yet "2."
    banned = proc([1, 2, 3, 4], row())  # "1. A.\n2." : point 2 starts, point 1 opened with token 1
    assert torch.isinf(banned[1]) and torch.isfinite(banned[torch.arange(8) != 1]).all()
    only = torch.full((8,), float("-inf"))
    only[1] = 0.0  # the banned token is all the row has: left as it is, never an empty row
    assert torch.equal(proc([1, 2, 3, 4], only.clone()), only)


def test_guided_skeleton_and_plain_rows_in_one_batch(llm):
    plain = [[{"role": "user", "content": q}] for q in ("Hi", "Tell me more about it")]
    params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0.9, seed=3, max_tokens=9)]
    alone = [llm.generate([p], sp)[0].token_ids for p, sp in zip(plain, params)]
    outs = llm.generate([skeleton_messages("How?"), *plain], [skeleton_params(llm, 1), *params])
    check_list(outs[0].text, "1.", 3, 10)
    assert [o.token_ids for o in outs[1:]] == alone


# ---- a point's first sentence -----------------------------------------------------------------------------------
@pytest.mark.parametrize("text, end", [
    (" The answer to this question is", None), (" Sleep well.", None), (" Go to bed early. Then", 17),
    (" Go to bed\nearly.", None), (" Rest is key for you!", 21), ("\tWords here are four?", 21),
    (" 1. Sleep at set hours. 2. Rest", 23), (" 1. Sleep. 2. Rest well today.", 30),  # short ones do not end it
    (" Yes. It is good to rest. More", 25), (" Yes. It is", None),
    (" " + " ".join(["w"] * MAX_SENTENCE_WORDS) + ".", 2 * MAX_SENTENCE_WORDS + 1),
    (" " + " ".join(["w"] * MAX_SENTENCE_WORDS), None),  # 40 words and no end yet: still held
    (" " + " ".join(["w"] * (MAX_SENTENCE_WORDS + 1)), 2 * MAX_SENTENCE_WORDS)])  # past 40: held no more
def test_first_sentence(text, end):
    assert first_sentence_end(text, 4) == end


@pytest.mark.parametrize("seed", range(4))
def test_a_point_is_held_for_its_first_sentence_then_let_go(llm, seed):
    hold = HoldFirstSentence(llm.tokenizer.decode, [*llm.engine.eos_ids, *llm.tokenizer.ids_containing("\n")], 4)
    params = SamplingParams(temperature=1.0, seed=seed, max_tokens=600,
                            logits_processors=[eos_bias(llm, 8.0), hold])  # a model that wants to stop at once
    out = llm.generate([[{"role": "user", "content": "Say it."}]], params)[0]
    end = first_sentence_end(out.text, 4)
    assert end is not None, repr(out.text)  # EOS and newlines waited for a sentence of 4+ words (or 40 words)
    assert "\n" not in out.text[:end] and hold.free
    assert out.finish_reason == "stop" and out.stop_reason is None  # EOS (favoured) once the row was free


def test_newline_tokens_found(llm):
    ids = llm.tokenizer.ids_containing("\n")
    assert ids and all("\n" in llm.tokenizer.decode([i], skip_special_tokens=False) for i in ids)
    others = [i for i in range(llm.tokenizer.vocab_size) if i not in set(ids)]
    assert not any("\n" in llm.tokenizer.decode([i], skip_special_tokens=False) for i in others)


def test_point_stop_waits_for_the_first_sentence():
    rule = point_stop(2, num_points=5, ngram=4, min_words=4)
    assert rule(" The answer to this question is") is None
    assert rule(" The answer to this question is\n3. Next") is None  # cannot happen under the grammar; no cut
    assert rule(" The answer is to rest well. 3. Next") == (len(" The answer is to rest well."), "another point")
    assert rule(" Rest and sleep well.\nMore") == (len(" Rest and sleep well."), "newline")
    loop = " go to bed go to bed go to bed"
    assert rule(loop)[1] == "repetition"  # a loop ends even an unfinished sentence
    assert rule(" a b a b a b a b") == (len(" a b a b"), "repetition")  # but keeps min_words words
    old = point_stop(2, num_points=5, ngram=4)  # before the rule: cut there, an unfinished clause
    assert old(" The answer to this question is\n3. Next")[0] == len(" The answer to this question is")


def number_bias(llm, bias: float):
    """A model that wants (bias > 0) or does not want (bias < 0) to write the next list number at a line start."""
    texts = llm.tokenizer.token_texts()

    def fn(ids: list[int], row: torch.Tensor) -> torch.Tensor:
        text = "1." + llm.tokenizer.decode(ids)
        if text.endswith("\n"):
            k = str(int(re.findall(r"(?m)^([0-9]+)\.", text)[-1]) + 1)
            row[[i for i, t in enumerate(texts) if t and (k + ".").startswith(t)]] += bias
        return row
    return fn


@pytest.mark.parametrize("bias, points", [(-30.0, 3), (30.0, 6)])
def test_the_list_ends_where_the_model_would_end_it(llm, bias, points):
    """ListEnd: at a line start past min_points, going on gets the probability of the next number's first
    token, ending all the rest. A model that would write anything but a number (a blank line, prose) ends at
    min_points; one that wants the number goes on to max_points."""
    from sot_engine.sot.grammar import ListEnd
    eos = llm.tokenizer.eos_token_id
    for seed in range(3):
        params = SamplingParams(temperature=0.8, seed=seed, max_tokens=400,
                                guided=GuidedDecoding(grammar=skeleton_grammar("1.", 3, 6)),
                                logits_processors=[number_bias(llm, bias), DistinctOpenings(llm.tokenizer.decode, "1."),
                                                   ListEnd(llm.tokenizer, eos, "1.", 3, 6)])
        out = llm.generate([skeleton_messages("Why?")], params)[0]
        assert len(check_list(out.text, "1.", 3, 6)) == points


def test_list_end_moves_the_rest_of_the_mass_to_eos(llm):
    from sot_engine.sot.grammar import ListEnd
    eos = llm.tokenizer.eos_token_id
    end = ListEnd(llm.tokenizer, eos, "1.", 2, 5)
    ids = llm.tokenizer.encode(" A\n2. B\n")  # two points written: the list may end here
    row = torch.randn(llm.config.vocab_size, generator=torch.Generator().manual_seed(0))
    go_on = end.number_start(3)
    assert len(go_on) and all(llm.tokenizer.token_texts()[i] in ("3", "3.") or
                              llm.tokenizer.token_texts()[i].startswith("3.") for i in go_on.tolist())
    p = torch.softmax(row.double(), 0)
    out = torch.softmax(end(ids, row.clone()).double(), 0)
    assert torch.allclose(out[go_on], p[go_on]) and torch.isclose(out[eos], 1 - p[go_on].sum())
    assert torch.isclose(out.sum(), torch.tensor(1.0, dtype=torch.float64))
    before = torch.randn(llm.config.vocab_size)  # mid-line, or before min_points: untouched
    assert torch.equal(end(llm.tokenizer.encode(" A\n2. B"), before.clone()), before)
    assert torch.equal(end(llm.tokenizer.encode(" A\n"), before.clone()), before)
