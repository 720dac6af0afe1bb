"""Our forward pass against transformers' LlamaForCausalLM, same random weights (float32)."""
from __future__ import annotations

import pytest
import torch

from sot_engine.engine.config import shape
from sot_engine.engine.llm_engine import LLMEngine
from sot_engine.engine.sequence import SamplingParams
from tests.conftest import make_hf_model, save_hf


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def engine_logits(eng: LLMEngine, prompts: list[list[int]], steps: int) -> list[list[torch.Tensor]]:
    """Prefill all prompts as one ragged batch, then `steps` batched decode steps feeding the
    argmax back; returns each sequence's logits per step (prefill first)."""
    seqs = [eng.add_request(p, SamplingParams(temperature=0, max_tokens=steps + 1, ignore_eos=True))
            for p in prompts]
    out: list[list[torch.Tensor]] = [[] for _ in seqs]
    for step in range(steps + 1):
        batch, is_prefill = eng.scheduler.schedule()
        assert is_prefill == (step == 0) and len(batch) == len(seqs)
        logits = eng.runner.run(batch, is_prefill)
        for row, s in zip(logits, batch):
            out[seqs.index(s)].append(row)
            s.token_ids.append(int(row.argmax()))
    return out


@pytest.mark.parametrize("rope_scaling", [None, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64}],
                         ids=["rope", "llama3-rope"])
def test_logits_match_transformers(tiny_hf, rope_scaling, tmp_path):
    hf, folder = tiny_hf
    if rope_scaling is not None:  # same weights, llama3 RoPE scaling in both configs
        cfg = shape("tiny", tie_word_embeddings=hf.config.tie_word_embeddings, rope_scaling=rope_scaling)
        hf = make_hf_model(cfg, seed=99)
        folder = save_hf(hf, tmp_path / "m")
    eng = LLMEngine(str(folder), device="cpu", dtype=torch.float32, num_blocks=64, block_size=8)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (23, 5, 40)]
    steps = 20
    ours = engine_logits(eng, prompts, steps)
    for p, logits in zip(prompts, ours):
        # the engine fed back its own argmax; run HF once over that whole sequence
        full = p + [int(l.argmax()) for l in logits[:-1]]
        with torch.no_grad():
            ref = hf(torch.tensor([full])).logits[0]
        for step, l in enumerate(logits):
            pos = len(p) - 1 + step
            assert rel_err(l, ref[pos]) < 1e-4, f"step {step}: rel err {rel_err(l, ref[pos]):.2e}"
