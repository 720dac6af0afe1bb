"""weight_dtype="gguf": a GGUF's quantized matrices kept in their own types (engine.loader.repack), multiplied on
integer dot products.

- The repacked layouts hold exactly the file's values: `dequantize()` equals gguf's own dequantization bit for bit,
  for every exact type (Q8_0, Q5_0, Q4_0, Q4_1 from gguf's quantizer; Q4_K, Q6_K from random blocks), and a type
  without an exact layout (Q5_1) is re-quantized as int8 per 32 within one int8 step.
- Loading the embedded SmolLM2 so gives the same weights as the float32 load (q/k rows un-permuted alike), in a
  fifth of the memory.
- The engine on them: logits and greedy tokens close to float32 weights (bounds measured below), the cpp backend
  equal to the torch reference's quantized math within rounding flips, and clear errors for a non-GGUF source or
  another matmul precision.
"""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from sot_engine.engine import LLM, SamplingParams
from sot_engine.engine.loader import load_model
from sot_engine.engine.loader.repack import EXACT_TYPES, repack
from sot_engine.kernels.weights import Int8Weight, PackedWeight, Q4Weight, check_weight_dtype, nbytes
from tests.conftest import prompt_logits, requires_smollm2
from tests.engine.test_weight_storage_smollm2 import CHATS  # the same 4 chats the other storages are measured on

Q = gguf.GGMLQuantizationType


def gguf_values(raw: np.ndarray, qtype: Q, shape: tuple[int, int]) -> torch.Tensor:
    return torch.from_numpy(np.asarray(gguf.quants.dequantize(raw, qtype), dtype=np.float32)).reshape(shape)


def random_kquant_blocks(qtype: Q, rows: int, k: int, seed: int) -> np.ndarray:
    """Random K-quant blocks (every bit pattern is a valid block) with sane float16 scales."""
    rng = np.random.default_rng(seed)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, k // block, size), dtype=np.uint8)
    scales = (rng.random((rows, k // block, 2)) * 0.01 + 1e-4).astype(np.float16).view(np.uint8)  # 2 x 2 bytes
    if qtype == Q.Q4_K:  # d, dmin first
        raw[..., 0:4] = scales
    else:  # Q6_K: d last
        raw[..., size - 2:] = scales[..., :2]
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q5_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q6_K])
@pytest.mark.parametrize("rows, k", [(3, 256), (5, 768)])
def test_repack_holds_the_files_values(qtype, rows, k):
    if qtype in (Q.Q4_K, Q.Q6_K):
        raw = random_kquant_blocks(qtype, rows, k, seed=rows + k)
    else:
        g = np.random.default_rng(rows * k)
        raw = gguf.quants.quantize((g.standard_normal((rows, k)) * g.random((rows, 1))).astype(np.float32), qtype)
    w = repack(raw, qtype, (rows, k))
    assert isinstance(w, Q4Weight if qtype in (Q.Q4_0, Q.Q4_1, Q.Q4_K) else Int8Weight)
    assert w.shape == (rows, k) and (isinstance(w, Q4Weight) or w.int8_act)
    if qtype == Q.Q6_K:
        assert w.scale.shape == (rows, k // 16)
    assert torch.equal(w.dequantize(), gguf_values(raw, qtype, (rows, k)))
    assert qtype in EXACT_TYPES


def test_other_types_are_requantized_closely():
    g = np.random.default_rng(0)
    raw = gguf.quants.quantize(g.standard_normal((4, 128)).astype(np.float32), Q.Q5_1)
    w, want = repack(raw, Q.Q5_1, (4, 128)), gguf_values(raw, Q.Q5_1, (4, 128))
    assert isinstance(w, Int8Weight) and w.int8_act
    step = want.view(4, 4, 32).abs().amax(2, keepdim=True) / 127  # one int8 step per group
    assert ((w.dequantize() - want).view(4, 4, 32).abs() <= step / 2 * (1 + 1e-6)).all()
    f = repack(np.ones((2, 32), dtype=np.float32), Q.F32, (2, 32))  # float types stay float
    assert isinstance(f, torch.Tensor) and f.dtype == torch.float32


def test_bad_requests():
    with pytest.raises(ValueError, match="int8 precision; leave matmul_precision"):
        check_weight_dtype("gguf", "int8")
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_model("random:tiny", keep_quantized=True)


@requires_smollm2
def test_smollm2_loads_the_files_own_values_in_a_fifth_of_the_memory():
    full = load_model("default").weights
    kept = load_model("default", keep_quantized=True).weights
    assert kept.keys() == full.keys()
    kinds = {}
    for name, w in kept.items():
        if isinstance(w, torch.Tensor):
            assert w.dim() == 1 and torch.equal(w, full[name])  # the norms
            continue
        kinds[type(w).__name__] = kinds.get(type(w).__name__, 0) + 1
        assert torch.equal(w.dequantize(), full[name]), name  # q/k rows un-permuted as the float load does
    assert kinds == {"Int8Weight": 1, "Q4Weight": 30 * 7}  # the tied Q8_0 embedding; Q4_1 everywhere else
    mb = sum(nbytes(w) for w in kept.values()) / 1e6
    assert 100 < mb < 115, mb  # 112 MB (the file's 96.6 MB with float32 block scales); float32: 538 MB


# measured 2026-12-07 (AMD EPYC, AVX-512 VNNI) on these chats: the file's Q4_1 weights with int8 activations move
# the last prompt token's logits by 0.66-0.79 against float32 (the same weights widened: only the activations'
# quantization differs), and greedy decoding keeps all 16 tokens of each (16, 16, 16, 10 in another summation
# order). The bounds leave room for another CPU's rounding; a wrong nibble order or scale moves logits by > 10.
MAX_LOGIT_DIFF = 5.0


@requires_smollm2
def test_smollm2_on_its_own_types_stays_close_to_float32(smollm2):
    ref = smollm2.llm
    llm = LLM("default", device="cpu", dtype=torch.float32, weight_dtype="gguf")
    qkv = llm.engine.model.layers[0][1]  # packed by the cpp backend, the file's Q4_1 values inside
    assert isinstance(qkv, PackedWeight) and isinstance(qkv.unpack(), Q4Weight)
    diffs = [float((prompt_logits(llm, c) - prompt_logits(ref, c)).abs().max()) for c in CHATS]
    print(f"gguf: max logit diff per prompt {[round(d, 3) for d in diffs]}")
    assert 0 < max(diffs) < MAX_LOGIT_DIFF
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    want = [o.token_ids for o in ref.generate(CHATS, greedy)]
    got = [o.token_ids for o in llm.generate(CHATS, greedy)]  # batched: the one-call decode loop
    agree = [next((i for i, (a, b) in enumerate(zip(g, w)) if a != b), 16) for g, w in zip(got, want)]
    print(f"gguf: greedy tokens equal to fp32 before the first difference {agree} of 16")
    assert sum(agree) >= 0.4 * 16 * len(CHATS)

    # the torch backend computes the same quantized math with float32 sums in another order; an activation that lands
    # on the other side of an int8 rounding step then moves the next layer, and 30 layers of that move the logits by
    # up to ~1 (0.95 measured; matmul_precision="int8" moves them by 0.6 the same way): the kernels themselves are
    # checked against float64 in tests/kernels/test_quant_matmul.py
    torch_llm = LLM("default", device="cpu", dtype=torch.float32, weight_dtype="gguf", backend="torch")
    for c in CHATS[:2]:
        torch.testing.assert_close(prompt_logits(torch_llm, c), prompt_logits(llm, c), rtol=0, atol=2.0)
