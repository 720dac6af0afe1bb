"""Bad input: a clear error naming the problem, and the other requests finish untouched."""
from __future__ import annotations

import pytest
import torch

from sot_engine.engine import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_dir):
    return LLM(str(tiny_dir), dtype=torch.float64, block_size=4, num_blocks=12, max_model_len=64)


@pytest.mark.parametrize("kwargs, match", [
    ({"temperature": -1.0}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_k": -3}, "top_k"),
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 2.5}, "max_tokens"), ({"seed": "x"}, "seed"),
    ({"stop": [""]}, "stop"), ({"stop_token_ids": [-1]}, "stop_token_ids"),
])
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("prompt, params, match", [
    ([], GREEDY, "empty prompt"),
    (list(range(1, 80)), GREEDY, "does not fit the context"),
    (list(range(1, 40)), SamplingParams(temperature=0, max_tokens=50), "KV pool too small"),
    ([1, 2, 100000], GREEDY, "outside the vocabulary"),
    ("text", GREEDY, "no tokenizer"),
    (3.5, GREEDY, "must be a string"),
])
def test_bad_request_rejected_others_untouched(llm, prompt, params, match):
    eng = llm.engine
    good = [[5, 6, 7, 8, 9], list(range(100, 130))]
    alone = [llm.generate([p], GREEDY)[0].token_ids for p in good]
    seqs = [eng.add_request(p, GREEDY) for p in good]
    eng.step()
    eng.step()
    with pytest.raises(ValueError, match=match):
        eng.add_request(prompt, params)
    while eng.has_unfinished():
        eng.step()
    assert [s.output_ids for s in seqs] == alone
    for s in seqs:
        eng.release(s)
    assert llm.stats()["free_blocks"] == llm.stats()["total_blocks"]


def test_generate_rejects_whole_call_naming_the_prompt(llm):
    with pytest.raises(ValueError, match="prompt 1: empty prompt"):
        llm.generate([[1, 2, 3], []], GREEDY)
    assert llm.stats()["waiting"] == 0 and llm.stats()["running"] == 0


def test_pool_exhaustion_preempts_and_recomputes(llm):
    # 12 blocks of 4 tokens; 5 requests of up to 30 tokens (8 blocks) each cannot all stay resident
    prompts = [list(range(1 + i, 19 + i)) for i in range(5)]
    alone = [llm.generate([p], GREEDY)[0].token_ids for p in prompts]
    outs = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == alone
    assert sum(o.num_preemptions for o in outs) > 0, "the pool was meant to run out"
    assert llm.stats()["free_blocks"] == 12


def test_missing_and_corrupt_model_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.gguf"):
        LLM(str(tmp_path / "nowhere.gguf"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(ValueError, match="bad.gguf"):
        LLM(str(bad))
    (tmp_path / "folder").mkdir()
    with pytest.raises((FileNotFoundError, ValueError), match="config.json"):
        LLM(str(tmp_path / "folder"))
    with pytest.raises(ValueError, match="unknown model shape"):
        LLM("random:nope")


def test_a_lone_surrogate_is_a_clear_error(tiny_chat_dir):
    """JSON carries "\\ud800" into a str no tokenizer takes: a ValueError, not the tokenizer's TypeError."""
    chat = LLM(str(tiny_chat_dir), block_size=4, num_blocks=32, max_model_len=64)
    for prompt, what in (("Once upon a \ud800time", "the prompt"),
                         ([{"role": "user", "content": "hi \udfff"}], "a chat message")):
        with pytest.raises(ValueError, match=f"{what} is not valid Unicode"):
            chat.engine.encode(prompt)
    assert chat.engine.encode("Once upon a time")
