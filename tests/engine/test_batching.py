"""Ragged batching is invisible: prompts decoded together == each decoded alone (greedy)."""
from __future__ import annotations

import torch

from sot_engine.engine import LLM, SamplingParams
from tests.conftest import requires_smollm2

LENGTHS = [1, 3, 17, 40, 64, 120, 200, 300]
MAX_TOKENS = [5, 24, 12, 1, 20, 8, 16, 10]


def check_together_equals_alone(llm: LLM, prompts: list, params: list[SamplingParams]) -> None:
    alone = [llm.generate([p], sp)[0] for p, sp in zip(prompts, params)]
    together = llm.generate(prompts, params)
    for i, (a, t) in enumerate(zip(alone, together)):
        assert t.token_ids == a.token_ids, f"prompt {i} (len {len(a.prompt_token_ids)}) differs in a batch"
        assert (t.text, t.finish_reason, t.stop_reason) == (a.text, a.finish_reason, a.stop_reason)
    stats = llm.stats()
    assert stats["free_blocks"] == stats["total_blocks"] and stats["running"] == stats["waiting"] == 0


def test_ragged_batch_equals_alone_tiny(tiny_dir):
    # float64 makes any difference a logic bug, not rounding
    llm = LLM(str(tiny_dir), dtype=torch.float64, block_size=16, num_blocks=256)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in LENGTHS]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in MAX_TOKENS]
    # stop conditions that really fire: a token each of two prompts produces when run unconstrained
    free = llm.generate(prompts[1:3], params[1:3])
    params[1] = SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[free[0].token_ids[6]])
    params[2] = SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[free[1].token_ids[3]])
    check_together_equals_alone(llm, prompts, params)


@requires_smollm2
def test_ragged_batch_equals_alone_smollm2(smollm2):
    text = " ".join(q["text"] for q in smollm2.questions[:40])
    ids = smollm2.llm.tokenizer.encode(text)
    prompts = [ids[:n] for n in LENGTHS]
    params = [SamplingParams(temperature=0, max_tokens=m) for m in [12, 20, 8, 16, 24, 10, 14, 18]]
    free = smollm2.llm.generate(prompts[1:3], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    # a stop string that really fires, cut from this run's own text (no fixed expectation of what the kernels of
    # this CPU generate): the text of two tokens from the middle of the unconstrained output, before any EOS
    tok, eos = smollm2.llm.tokenizer, smollm2.llm.config.eos_token_ids
    got = free[0].token_ids
    end = next((i for i, t in enumerate(got) if t in eos), len(got))
    stop = next(s for i in range(min(8, end // 2), end - 1) if (s := tok.decode(got[i:i + 2]).strip()))
    params[1] = SamplingParams(temperature=0, max_tokens=20, stop=[stop])
    params[2] = SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[free[1].token_ids[4]])
    check_together_equals_alone(smollm2.llm, prompts, params)
    out = smollm2.llm.generate([prompts[1]], params[1])[0]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop)
