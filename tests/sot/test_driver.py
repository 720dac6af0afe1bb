"""The SoT driver's mechanics, checked through the engine's own counters and block accounting.

The tiny random model writes noise, so the skeleton is either given or forced through the skeleton prefill
(the prefill holds the list, and the model's first line ends it); what is checked is what the engine did:
one prefill of the shared prefix, all points in one batch, caps, release the step a point finishes."""
from __future__ import annotations

import pytest
import torch

from sot_engine.engine import LLM
from sot_engine.sot.driver import SoT, SoTConfig, common_prefix_len
from sot_engine.sot.prompts import SoTPrompts

POINTS = ["Read widely", "Practice every day", "Ask good questions", "Teach someone else"]


@pytest.fixture(scope="module")
def llm(tiny_chat_dir):
    return LLM(str(tiny_chat_dir), dtype=torch.float64, block_size=8, num_blocks=400)


def _idle(llm: LLM) -> None:
    st = llm.stats()
    assert st["free_blocks"] == st["total_blocks"], "blocks leaked"
    assert st["running"] == st["waiting"] == st["kept"] == 0


def test_common_prefix_len():
    assert common_prefix_len([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert common_prefix_len([[1, 2, 3], [1, 2, 3]]) == 2  # every child keeps one token of its own
    assert common_prefix_len([[7], [7, 8]]) == 0
    assert common_prefix_len([[1, 2], [3, 4]]) == 0


@pytest.mark.parametrize("expansion", ["paper", "continuation"])
def test_points_share_one_prefix_prefill_and_decode_as_one_batch(llm, expansion):
    sot = SoT(llm, SoTConfig(point_max_tokens=6, ngram=0, expansion=expansion))
    before = dict(llm.stats())
    running_seen, done = [], 0
    for ev in sot.stream("How can I learn faster?", skeleton=POINTS):
        if ev.kind == "point":
            running_seen.append(llm.stats()["running"])
        if ev.kind == "point_done":
            done += 1
            # released in the step it finished: no longer running, at most the unfinished points remain
            assert llm.stats()["running"] <= len(POINTS) - done
        if ev.kind == "answer":
            ans = ev.answer
    after = llm.stats()
    assert ans.mode == "sot" and ans.expansion == expansion and [p.point for p in ans.points] == POINTS
    assert max(running_seen) == len(POINTS), "the points were not decoded in one batch"
    # the common prefix was prefilled once, each point prefilled only its own tail; the engine's prefix
    # cache may hold some of it already (an earlier answer on this engine with the same prompt template)
    shared = {p.cached_tokens for p in ans.points}
    assert len(shared) == 1 and shared.pop() > 40
    n = ans.points[0].cached_tokens
    hits = after["prefix_cache_hit_tokens"] - before["prefix_cache_hit_tokens"]
    assert ans.tokens.expand_prompt == sum(p.prompt_tokens for p in ans.points)
    assert ans.tokens.expand_prefilled == ans.tokens.expand_prompt - (len(POINTS) - 1) * n - hits
    assert after["prefill_tokens"] - before["prefill_tokens"] == ans.tokens.expand_prefilled
    # capped, and batched: decode steps follow the longest point, not the sum of the points
    assert all(1 <= p.num_tokens <= 6 and p.finish_reason in ("stop", "length") for p in ans.points)
    decode_steps = after["steps"] - before["steps"] - 2  # the prefix prefill and the tails' prefill
    assert decode_steps == max(p.num_tokens for p in ans.points) - 1
    assert after["decode_tokens"] - before["decode_tokens"] == sum(p.num_tokens - 1 for p in ans.points)
    _idle(llm)


def test_continuation_reuses_the_kept_skeleton_kv(llm):
    # the prefill holds the whole list (max_points of them: the grammar lets only the end follow), 3 known points
    listed = SoTPrompts(skeleton_prefill="1. Alpha\n2. Beta\n3. Gamma\n")
    sot = SoT(llm, SoTConfig(prompts=listed, expansion="continuation", skeleton_max_tokens=24,
                             point_max_tokens=4, ngram=0, max_points=3))
    kept_during = []
    for ev in sot.stream("Name three letters", mode="sot"):
        if ev.kind == "points":
            kept_during.append(llm.stats()["kept"])
        if ev.kind == "answer":
            ans = ev.answer
    assert [p.point for p in ans.points] == ["Alpha", "Beta", "Gamma"]
    assert kept_during == [1], "the skeleton request's KV was not kept for the points"
    # the points continue the skeleton request itself: nothing of its prompt is prefilled again
    assert all(p.cached_tokens >= ans.tokens.skeleton_prompt - 8 for p in ans.points)  # minus a partial block
    assert ans.tokens.expand_prefilled == sum(p.prompt_tokens - p.cached_tokens for p in ans.points)
    assert ans.tokens.expand_prefilled < ans.tokens.expand_prompt // 3
    _idle(llm)


def test_a_repeated_question_is_served_from_the_prefix_cache(llm):
    """The same question again (another API call): the fork's common prefix, computed by the first answer,
    comes from the engine's prefix cache -- all its full blocks but the one holding its last token -- and
    the answer is the same."""
    sot = SoT(llm, SoTConfig(point_max_tokens=4, ngram=0))
    first = sot.answer("Why is the sky blue?", skeleton=POINTS)
    before = llm.stats()["prefix_cache_hit_tokens"]
    again = sot.answer("Why is the sky blue?", skeleton=POINTS)
    hits = llm.stats()["prefix_cache_hit_tokens"] - before
    n = again.points[0].cached_tokens
    assert n > 40 and n % 8, "the test needs a common prefix ending inside a block (the points then hit nothing)"
    assert hits == (n - 1) // 8 * 8
    assert again.tokens.expand_prefilled == again.tokens.expand_prompt - (len(POINTS) - 1) * n - hits
    assert again.text == first.text
    _idle(llm)


def test_answer_text_labels_and_timings(llm):
    sot = SoT(llm, SoTConfig(point_max_tokens=5))
    ans = sot.answer("How can I learn faster?", skeleton=POINTS[:3])
    lines = ans.text.split("\n")
    assert len(lines) == 3 and all(line.startswith(f"{i + 1}. {POINTS[i]}:") for i, line in enumerate(lines))
    bare = sot.answer("How can I learn faster?", skeleton=POINTS[:3], labels=False)
    assert all(p not in bare.text for p in POINTS[:3] if p not in "".join(x.text for x in bare.points))
    t = ans.timings
    assert t.expand.prefill > 0 and t.expand.decode >= 0 and t.skeleton.total == 0 and t.normal.total == 0
    assert t.total >= t.expand.total
    d = ans.to_dict()
    assert d["tokens"]["output"] == ans.tokens.expand_output and d["timings"]["expand"]["total"] == t.expand.total


def test_one_usable_point_falls_back_to_normal(llm):
    # free decoding (the grammar would add points): the noise model's first line ends the list after one
    one = SoTPrompts(skeleton_prefill="1. Alpha\n")
    sot = SoT(llm, SoTConfig(prompts=one, skeleton_max_tokens=12, normal_max_tokens=5, constrained_skeleton=False))
    kinds = [ev.kind for ev in sot.stream("Name one letter", mode="sot")]
    ans = sot.answer("Name one letter", mode="sot")
    assert ans.mode == "normal" and "1 usable point" in ans.reason
    assert ans.skeleton.startswith("1. Alpha") and not ans.points
    assert 1 <= ans.tokens.normal_output <= 5 and ans.timings.skeleton.total > 0 and ans.timings.normal.total > 0
    assert kinds.index("fallback") < kinds.index("normal") < kinds.index("answer")
    _idle(llm)


@pytest.mark.parametrize("question", ["", "   \n\t", None, 42])
def test_empty_question_is_a_clear_error(llm, question):
    with pytest.raises(ValueError, match="empty question"):
        SoT(llm).answer(question)


def test_bad_arguments(llm):
    with pytest.raises(ValueError, match="mode"):
        SoT(llm).answer("hi", mode="fast")
    with pytest.raises(ValueError, match="expansion"):
        SoTConfig(expansion="tree")
    with pytest.raises(ValueError, match="temperature"):
        SoTConfig(temperature=-1)
    with pytest.raises(ValueError, match="point_max_tokens"):
        SoTConfig(point_max_tokens=0)
    with pytest.raises(ValueError, match="skeleton"):
        SoT(llm).answer("hi", skeleton=["ok", "  "])
    with pytest.raises(ValueError, match="tokenizer"):
        SoT(LLM("random:tiny"))
    _idle(llm)


def test_the_router_decides_auto_mode_and_is_named(llm):
    from sot_engine.sot.router import NORMAL, Route
    seen = []

    def mine(q: str) -> Route:
        seen.append(q)
        return Route(NORMAL, "mine: always normal", "mine", "custom")
    ans = SoT(llm, SoTConfig(normal_max_tokens=3), router=mine).answer("How do tides work?")
    assert seen == ["How do tides work?"] and ans.mode == "normal" and ans.router == "custom"
    assert ans.reason == "custom router: mine: always normal" and ans.timings.route > 0
    ans = SoT(llm, SoTConfig(normal_max_tokens=3), router="rules").answer("What is 2 + 2?")
    assert (ans.mode, ans.router) == ("normal", "rules") and ans.reason.startswith("rules router: math: ")
    ans = SoT(llm, SoTConfig(normal_max_tokens=3), router=mine).answer("What is 2 + 2?", mode="normal")
    assert ans.router == "asked" and ans.reason == "normal decoding was asked for" and len(seen) == 1
    with pytest.raises(ValueError, match='router must be "trained", "rules"'):
        SoT(llm, router=42)
    with pytest.raises(ValueError, match='router must be "rules", "trained" or a .safetensors file'):
        SoT(llm, router="smart")
    _idle(llm)


def test_question_longer_than_the_context(llm):
    with pytest.raises(ValueError, match="does not fit the context"):
        SoT(llm).answer("why " * 2000)
    _idle(llm)


def test_skeleton_prompt_over_context_falls_back(tiny_chat_dir):
    # the question fits for normal decoding, but not inside the long skeleton prompt
    from sot_engine.sot.prompts import skeleton_messages
    q = "tell me " * 30
    probe = LLM(str(tiny_chat_dir))
    n_normal = len(probe.engine.encode([{"role": "user", "content": q}]))
    assert len(probe.engine.encode(skeleton_messages(q))) > n_normal + 20
    llm = LLM(str(tiny_chat_dir), max_model_len=n_normal + 20, num_blocks=200, block_size=8)
    ans = SoT(llm, SoTConfig(normal_max_tokens=4)).answer(q, mode="sot")
    assert ans.mode == "normal" and "skeleton request was refused" in ans.reason
    _idle(llm)


def test_closing_the_stream_early_frees_everything(llm):
    sot = SoT(llm, SoTConfig(point_max_tokens=20, ngram=0))
    stream = sot.stream("How can I learn faster?", skeleton=POINTS)
    for ev in stream:
        if ev.kind == "point":
            break
    stream.close()
    _idle(llm)


@pytest.mark.parametrize("constrained", [False, True])
def test_each_stage_decodes_as_its_request_would_alone(llm, constrained):
    """The skeleton, and every point, are exactly what the engine gives the same request alone: without the
    grammar (`constrained_skeleton=False, point_min_words=0`) the requests of before it -- greedy, ended by the
    stop rules, no mask; with it, the grammar's requests. Batching and the shared prefix change no token."""
    from sot_engine.engine import GuidedDecoding, SamplingParams
    from sot_engine.sot.grammar import HoldFirstSentence, skeleton_grammar
    from sot_engine.sot.prompts import DEFAULT_PROMPTS, point_messages, skeleton_messages
    from sot_engine.sot.skeleton import format_skeleton, parse_skeleton
    from sot_engine.sot.stops import point_stop, skeleton_stop
    prefill = "1. Alpha\n2. Beta\n"  # two points given; the grammar (3..4) makes the model add one or two
    prompts = SoTPrompts(**{**vars(DEFAULT_PROMPTS), "skeleton_prefill": prefill})
    kw = dict(constrained_skeleton=False, point_min_words=0, point_max_sentences=0) if not constrained else {}
    cfg = SoTConfig(prompts=prompts, skeleton_max_tokens=40, point_max_tokens=24, max_points=4, ngram=0, **kw)
    q = "How can I learn faster?"
    sot = SoT(llm, cfg)
    ans = sot.answer(q, mode="sot")
    if constrained:
        sk = SamplingParams(temperature=0, max_tokens=40, guided=GuidedDecoding(grammar=skeleton_grammar(prefill, 3, 4)),
                            logits_processors=sot.skeleton_processors(cfg))
    else:
        sk = SamplingParams(temperature=0, max_tokens=40, stop_fn=skeleton_stop(prefill, 4))
    alone = llm.generate([skeleton_messages(q, prompts)], sk)[0]
    assert ans.skeleton == prefill + alone.text
    points = parse_skeleton(alone.text, prefilled=prefill, max_points=4)
    assert [p.point for p in ans.points] == [p.text for p in points] and ans.mode == "sot"
    assert (3 <= len(points) <= 4) if constrained else len(points) >= 2
    enders = [*llm.engine.eos_ids, *llm.tokenizer.ids_containing("\n")]
    for pa, pt in zip(ans.points, points):
        hold = [HoldFirstSentence(llm.tokenizer.decode, enders, 4)] if constrained else []
        params = SamplingParams(temperature=0, max_tokens=24, logits_processors=hold,
                                stop_fn=point_stop(pt.index, num_points=len(points), ngram=0,
                                                   min_words=4 if constrained else 0,
                                                   max_sentences=2 if constrained else 0))
        ref = llm.generate([point_messages(q, format_skeleton(points), pt.index, pt.text, prompts)], params)[0]
        assert pa.text == ref.text.strip() and pa.num_tokens == len(ref.token_ids)
    _idle(llm)
