"""Cascade (shared-prefix) decode in the engine: a SoT-shaped batch generates the same tokens with it on and off.

A fork's children share the prefix's full blocks; `ModelRunner` finds them as one group per decode step and
the model runs the backend's `cascade_decode_attention` for that step. "on" skips the cost model.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from sot_engine.engine import LLM, SamplingParams

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def run_sot_batch(llm: LLM, prefix: list[int], suffixes: list[list[int]], solo: list[int], max_tokens: list[int]):
    """A fork (the SoT points) next to an unrelated request; returns every sequence's tokens, the decode
    steps' groups as (member rows, block ids, children's rows, children's shared blocks), cascade calls."""
    eng = llm.engine
    calls = []
    real = eng.model.backend.cascade_decode_attention
    if real is not None:
        def counting(*args, **kw):
            calls.append(1)
            return real(*args, **kw)
        eng.model.backend = dataclasses.replace(eng.model.backend, cascade_decode_attention=counting)
    seen = []
    find = eng.runner.prefix_groups

    def spy(seqs):
        groups = find(seqs)
        rows = [i for i, s in enumerate(seqs) if any(s is c for c in children)]
        seen.append(([(g.members.tolist(), g.blocks.tolist()) for g in groups or []], rows,
                     children[0].block_table[:len(prefix) // eng.block_manager.block_size]))
        return groups

    eng.runner.prefix_groups = spy
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in max_tokens]
    other = eng.add_request(solo, params[0])
    children = eng.add_fork(prefix, suffixes, params[1:])
    while eng.has_unfinished():
        eng.step()
    for s in [other, *children]:
        eng.release(s)
    assert llm.stats()["free_blocks"] == llm.stats()["total_blocks"]
    return [s.token_ids for s in [other, *children]], seen, len(calls)


@pytest.mark.parametrize("backend, dtype, bs, prefix_len, max_tokens", [
    ("torch", torch.float64, 4, 23, [5, 7, 4, 7, 6]),  # 5 full prefix blocks + 3 tokens
    ("triton", torch.float32, 8, 19, [2, 3, 2, 3, 3]),  # interpreter on CPU: few tokens, 2 full blocks
], ids=["torch-fp64", "triton-fp32"])
def test_cascade_on_equals_off_token_for_token(tiny_dir, backend, dtype, bs, prefix_len, max_tokens):
    g = torch.Generator().manual_seed(17)
    prefix = torch.randint(0, 512, (prefix_len,), generator=g).tolist()
    suffixes = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (2, 5, 0, 9)]
    solo = torch.randint(0, 512, (11,), generator=g).tolist()
    results = {}
    for mode in ("off", "on"):
        llm = LLM(str(tiny_dir), backend=backend, device=DEV, dtype=dtype, block_size=bs, num_blocks=64,
                  cascade=mode)
        results[mode] = run_sot_batch(llm, prefix, suffixes, solo, max_tokens)
        steps = llm.engine.runner.cascade_steps
        assert (steps > 0) == (mode == "on")
    (want, _, off_calls), (got, seen, on_calls) = results["off"], results["on"]
    assert got == want
    assert off_calls == 0
    decode_steps = [s for s in seen if s[1]]  # steps with children in the batch
    grouped = [s for s in decode_steps if s[0]]
    assert grouped and on_calls == len(grouped) * 2  # once per layer of the tiny model
    for groups, rows, shared in decode_steps:
        # one group exactly when 2+ children decode: the children's rows sharing the prefix's full blocks
        assert groups == ([(rows, shared)] if len(rows) >= 2 else [])
    assert len(grouped[0][0][0][1]) == prefix_len // bs


def test_cascade_switch_is_validated(tiny_dir):
    with pytest.raises(ValueError, match="cascade must be 'auto', 'on' or 'off'"):
        LLM(str(tiny_dir), cascade="yes")
    llm = LLM(str(tiny_dir), device="cpu", num_blocks=8)
    assert llm.engine.runner.cascade == "off"  # auto: only on CUDA
