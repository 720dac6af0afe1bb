"""The Triton backend as the engine sees it: registry, fallbacks, and generation equal to torch's.

Without CUDA the kernels run in Triton's interpreter (tests/conftest.py), so prompts stay short.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

pytest.importorskip("triton")

from sot_engine import kernels  # noqa: E402
from sot_engine.engine import LLM, SamplingParams  # noqa: E402
from sot_engine.kernels import BackendUnavailable, get_backend  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def test_registry_and_default_order(monkeypatch):
    assert "triton" in kernels.available_backends()
    b = get_backend("triton", DEV)
    assert b.name == "triton" and b.rms_norm.__module__ == "sot_engine.kernels.triton.elementwise"
    assert get_backend(None, "cpu").name != "triton"  # the interpreter is for tests, not serving
    assert get_backend(None, "cuda").name == "triton"  # picking a backend launches nothing
    # no triton: cuda falls back to torch; asking for it by name is a clear error
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "triton" else real(n, *a))
    assert get_backend(None, "cuda").name == "torch"
    with pytest.raises(ValueError, match="triton is not installed"):
        get_backend("triton", "cuda")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET=1"):
        get_backend("triton", "cpu")


@pytest.fixture(scope="module")
def llms(tiny_dir) -> dict[str, LLM]:
    return {name: LLM(str(tiny_dir), backend=name, device=DEV, dtype=torch.float32, block_size=16)
            for name in ("torch", "triton")}


def prompts(lengths: tuple[int, ...], seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 512, (n,), generator=g).tolist() for n in lengths]


def prefill_logits(llm: LLM, batch: list[list[int]]) -> torch.Tensor:
    """Last-token logits of one ragged prefill step, straight from the runner (then aborted)."""
    eng = llm.engine
    seqs = [eng.add_request(p, SamplingParams(temperature=0, max_tokens=1)) for p in batch]
    scheduled, is_prefill = eng.scheduler.schedule()
    assert is_prefill and scheduled == seqs
    logits = eng.runner.run(scheduled, is_prefill)
    for s in seqs:
        eng.abort(s.request_id)
    assert llm.stats()["free_blocks"] == llm.stats()["total_blocks"]
    return logits


def test_backend_is_triton(llms):
    assert llms["triton"].engine.backend.name == "triton"
    assert llms["torch"].engine.backend.name == "torch"


def test_prefill_logits_match_torch(llms):
    batch = prompts((5, 19, 40), seed=1)
    want = prefill_logits(llms["torch"], batch)
    got = prefill_logits(llms["triton"], batch)
    # the interpreter computes in true fp32 (off by ~2e-7 here); a GPU's tl.dot may round fp32 to tf32
    tol = 2e-3 if DEV == "cuda" else 2e-6
    torch.testing.assert_close(got, want, rtol=0, atol=tol)


def test_ragged_batch_generation_matches_torch_token_for_token(llms):
    batch = prompts((5, 19, 40), seed=2)  # 40 tokens: a prompt over two blocks of 16
    want = llms["torch"].generate(batch, GREEDY)
    got = llms["triton"].generate(batch, GREEDY)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert all(len(o.token_ids) == GREEDY.max_tokens for o in got)


def test_fork_matches_torch_token_for_token(llms):
    prefix, *suffixes = prompts((21, 3, 1), seed=3)  # children share one full block, copy the partial one
    want = llms["torch"].fork(prefix, suffixes, GREEDY)
    got = llms["triton"].fork(prefix, suffixes, GREEDY)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert llms["triton"].stats()["free_blocks"] == llms["triton"].stats()["total_blocks"]
