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


# YaRN's original context (32) is shorter than the prompts (up to 60 + 20 tokens): both its ramp and its attention
# factor (~1.14 at factor 4; the mscale pair's ratio below) show in the logits
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
YARN_MSCALE = YARN | {"beta_fast": 16.0, "beta_slow": 2.0, "mscale": 1.0, "mscale_all_dim": 0.5, "truncate": False}


@pytest.mark.parametrize("rope_scaling", [None, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                                          YARN, YARN_MSCALE],
                         ids=["rope", "llama3-rope", "yarn-rope", "yarn-mscale-rope"])
def test_logits_match_transformers(tiny_hf, rope_scaling, tmp_path):
    hf, folder = tiny_hf
    if rope_scaling is not None:  # same weights, the same RoPE scaling in both configs
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


@pytest.mark.parametrize("rope_scaling", [
    YARN, YARN_MSCALE, YARN | {"attention_factor": 0.9}, YARN | {"factor": 1.0},
    YARN | {"factor": 16.0, "original_max_position_embeddings": 256},
    {"rope_type": "linear", "factor": 2.0}, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64}])
def test_rope_tables_match_transformers(rope_scaling):
    """Inverse frequencies and attention factor against transformers' own RoPE initializers, head_dim 64 and 128."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from sot_engine.engine.model import rope_attention_factor, rope_inv_freq
    for head_dim, theta in ((64, 10000.0), (128, 500000.0)):
        cfg = shape("tiny", head_dim=head_dim, rope_theta=theta, rope_scaling=rope_scaling)
        ref, factor = ROPE_INIT_FUNCTIONS[rope_scaling["rope_type"]](LlamaConfig(**cfg.to_hf()), "cpu")
        torch.testing.assert_close(rope_inv_freq(cfg), ref.float(), rtol=1e-6, atol=0)
        assert rope_attention_factor(cfg) == pytest.approx(factor, rel=1e-12)


def test_unsupported_rope_scaling_is_refused_by_name():
    from sot_engine.engine.model import rope_inv_freq
    with pytest.raises(ValueError, match="unsupported rope scaling 'dynamic'"):
        rope_inv_freq(shape("tiny", rope_scaling={"rope_type": "dynamic", "factor": 2.0}))


def test_embed_matches_transformers_mean_hidden(tiny_hf):
    """`LLM.embed`: the mean over the prompt of HF's last hidden state (after the final norm), for ragged prompts
    prefilled together, and the same with a prefix of them cached (an embedding takes no cache hit)."""
    from sot_engine.engine.llm import LLM
    hf, folder = tiny_hf
    llm = LLM(str(folder), device="cpu", dtype=torch.float32, num_blocks=64, block_size=8)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (23, 5, 40)]
    llm.generate(prompts[2][:33], SamplingParams(max_tokens=2))  # leaves 4 full blocks of prompt 2 in the cache
    got = llm.embed(prompts)
    assert got.shape == (3, hf.config.hidden_size) and got.dtype == torch.float32
    for p, row in zip(prompts, got):
        with torch.no_grad():
            ref = hf(torch.tensor([p]), output_hidden_states=True).hidden_states[-1][0].mean(0)
        assert rel_err(row, ref) < 1e-5
    s = llm.stats()
    assert s["free_blocks"] == s["total_blocks"] and s["running"] == s["waiting"] == 0  # nothing held after
    tail = llm.embed(prompts, pool_from=[3, 0, 17])  # the mean over each prompt's tokens from that one on
    for p, k, row in zip(prompts, (3, 0, 17), tail):
        with torch.no_grad():
            ref = hf(torch.tensor([p]), output_hidden_states=True).hidden_states[-1][0, k:].mean(0)
        assert rel_err(row, ref) < 1e-5
    with pytest.raises(ValueError, match="prompt 1: empty prompt"):
        llm.embed([[1, 2], []])
    with pytest.raises(ValueError, match=r"prompt 0: pool_from must be an int in \[0, 2\)"):
        llm.embed([[1, 2]], pool_from=2)
    with pytest.raises(ValueError, match="2 entries for 1 prompts"):
        llm.embed([[1, 2]], pool_from=[0, 1])
    assert llm.stats()["waiting"] == 0  # all or nothing: nothing was queued
