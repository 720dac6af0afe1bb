"""The embedded SmolLM2 GGUF: same tokens and logits as transformers loading the same file."""
from __future__ import annotations

import pytest
import torch

from sot_engine.engine import SamplingParams
from tests.conftest import prompt_logits, requires_smollm2

CHATS = [
    [{"role": "user", "content": "What are the three primary colors?"}],
    [{"role": "user", "content": "How can I improve my time management skills?"}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "Explain why the sky is blue."}],
]


@pytest.fixture(scope="module")
def hf_smollm2(smollm2):
    from transformers import AutoModelForCausalLM
    path = smollm2.path
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                dtype=torch.float32).eval()


@requires_smollm2
def test_greedy_tokens_and_prefill_logits_match_transformers(smollm2, hf_smollm2):
    llm = smollm2.llm
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    outs = llm.generate(CHATS, params)
    for chat, out in zip(CHATS, outs):
        ids = out.prompt_token_ids
        assert ids == llm.engine.encode(chat) and ids[0] == 1  # <|im_start|>
        with torch.no_grad():
            # explicit mask: otherwise transformers masks every pad id (2 = <|im_end|>) in the prompt
            ref = hf_smollm2.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                      max_new_tokens=48, do_sample=False,
                                      eos_token_id=None, pad_token_id=2, output_logits=True,
                                      return_dict_in_generate=True)
        ref_ids = ref.sequences[0, len(ids):].tolist()
        prefill_logits = prompt_logits(llm, ids)
        assert (prefill_logits - ref.logits[0][0]).abs().max() < 1e-3
        if out.token_ids != ref_ids:  # allowed only where transformers itself is on a knife edge
            k = next(i for i, (a, b) in enumerate(zip(out.token_ids, ref_ids)) if a != b)
            top2 = ref.logits[k][0].topk(2).values
            assert float(top2[0] - top2[1]) < 0.01, f"token {k} differs with margin {float(top2[0] - top2[1])}"
    assert llm.stats()["free_blocks"] == llm.stats()["total_blocks"]
