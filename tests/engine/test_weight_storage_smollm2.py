"""The embedded SmolLM2 with its matrices stored as bfloat16 or int8 (groups of 32) against float32 storage:
how far the logits move and whether greedy decoding picks the same tokens. Storage only changes the weights'
rounding (every product and sum stays float32), so these bounds are about the model's sensitivity to it.
"bf16-matmul" (matmul_precision="bf16") rounds the matmuls' activations to bf16 as well, "int8-matmul"
(matmul_precision="int8") quantizes them per 32 values for integer dot products (Q8_0 x Q8_0); "kv-bf16" keeps float32
weights and rounds the K/V pool to bf16 (kv_cache_dtype="bf16")."""
from __future__ import annotations

import pytest
import torch

from sot_engine.engine import LLM, SamplingParams
from tests.conftest import prompt_logits, requires_smollm2

CHATS = [
    [{"role": "user", "content": "What are the three primary colors?"}],
    [{"role": "user", "content": "How can I improve my time management skills?"}],
    [{"role": "user", "content": "Can you explain the basics of quantum computing?"}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "Explain why the sky is blue."}],
]
TOKENS = 16
# measured max |logit - fp32 logit| over these prompts' last prompt tokens: bf16 0.09-0.16, int8 0.57-1.06
# (SmolLM2's logits span ~30); the bounds leave ~2x room, far below what a wrong dequantization moves (> 5)
MAX_LOGIT_DIFF = {"bf16": 0.4, "int8": 2.0, "bf16-matmul": 1.0, "kv-bf16": 0.4, "int8-matmul": 3.0}
# int8-matmul measured 2026-12-07 (AMD EPYC, VNNI): logits move by up to 1.6 on decode_cpu's 8 questions (1.8 on
# these chats with the packed kernel's summation order), greedy
# tokens equal to fp32's for 0-39 of 64 (two prompts differ at the first token there: near-ties); here the bound
# is on logits and on the first tokens of these 4 chats


@requires_smollm2
@pytest.mark.parametrize("storage", ["bf16", "int8", "bf16-matmul", "kv-bf16", "int8-matmul"])
def test_narrow_weights_keep_logits_close_and_greedy_tokens(smollm2, storage):
    ref = smollm2.llm  # float32 storage
    kw = {"bf16-matmul": {"matmul_precision": "bf16"}, "kv-bf16": {"kv_cache_dtype": "bf16"},
          "int8-matmul": {"matmul_precision": "int8"}}.get(storage, {"weight_dtype": storage})
    llm = LLM("default", device="cpu", dtype=torch.float32, **kw)
    diffs = [float((prompt_logits(llm, c) - prompt_logits(ref, c)).abs().max()) for c in CHATS]
    print(f"{storage}: max logit diff per prompt {[round(d, 3) for d in diffs]}")
    assert max(diffs) < MAX_LOGIT_DIFF[storage]
    assert max(diffs) > 0  # the storage did change the weights

    greedy = SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True)
    want = [o.token_ids for o in ref.generate(CHATS, greedy)]
    got = [o.token_ids for o in llm.generate(CHATS, greedy)]  # batched decode: the one-call layer loop
    agree = [next((i for i, (a, b) in enumerate(zip(g, w)) if a != b), TOKENS) for g, w in zip(got, want)]
    print(f"{storage}: greedy tokens equal to fp32 before the first difference {agree} of {TOKENS}")
    assert all(g[0] == w[0] for g, w in zip(got, want))  # the first token of every answer
    assert sum(agree) >= (0.5 if storage.startswith("int8") else 0.75) * TOKENS * len(CHATS)
