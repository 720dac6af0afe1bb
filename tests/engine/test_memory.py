"""engine.memory: weights and the KV pool on huge-page memory, the same values, shared tensors still shared."""
from __future__ import annotations

import gc
import re
import weakref
from pathlib import Path

import pytest
import torch

from sot_engine.engine import LLM
from sot_engine.engine.memory import huge_empty, huge_zeros, into_hugepages
from sot_engine.kernels.weights import Bf16MatmulWeight, quantize_int8

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_mode() -> str | None:
    """The bracketed mode ("always", "madvise", "never"), None where the kernel has no THP."""
    m = re.search(r"\[(\w+)\]", THP.read_text()) if THP.exists() else None
    return m.group(1) if m else None


def mapping(t: torch.Tensor) -> tuple[int, int, bool]:
    """(start, end, THPeligible) of the mapping holding t's memory (/proc/self/smaps): eligible means it may get
    huge pages (advised, in a THP mode that allows it, and spanning a whole aligned 2 MiB)."""
    addr, span = t.data_ptr(), None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        m = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
        if m:
            span = (int(m.group(1), 16), int(m.group(2), 16))
            span = span if span[0] <= addr < span[1] else None
        elif span and line.startswith("THPeligible:"):
            return span[0], span[1], line.split()[1] == "1"
    raise AssertionError("no mapping holds the tensor")


def thp_eligible(t: torch.Tensor) -> bool:
    return mapping(t)[2]


def test_huge_empty_and_zeros_are_zero_filled_and_sized():
    t = huge_empty(3 << 20)
    assert t.dtype == torch.uint8 and t.numel() == 3 << 20 and not t.any()
    z = huge_zeros((2, 3, 5), torch.bfloat16)
    assert z.shape == (2, 3, 5) and z.dtype == torch.bfloat16 and z.is_contiguous() and not z.any()
    z.uniform_()  # writable, and ours alone
    assert z.any() and not huge_zeros((2, 3, 5), torch.bfloat16).any()


@pytest.mark.skipif(thp_mode() not in ("always", "madvise"), reason="no transparent huge pages to ask for")
def test_the_memory_is_advised_for_huge_pages(monkeypatch):
    assert thp_eligible(huge_empty(4 << 20))
    if thp_mode() == "madvise":  # the switch for comparisons really turns it off
        monkeypatch.setenv("SOT_HUGEPAGES", "0")
        assert not thp_eligible(huge_empty(4 << 20))


def test_into_hugepages_copies_values_keeps_storage_classes_and_sharing():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(33, 7, generator=g)
    tied = torch.randn(5, 64, generator=g).to(torch.bfloat16)
    i8 = quantize_int8(torch.randn(4, 64, generator=g))
    b16 = Bf16MatmulWeight(torch.randn(16, 32, generator=g).to(torch.bfloat16))
    strided = torch.randn(6, 8, generator=g)[:, ::2]
    want = [a.clone(), tied.clone(), i8.q.clone(), i8.scale.clone(), b16.w.clone(), strided.clone()]
    ref = weakref.ref(a)
    out = into_hugepages([a, tied, i8, b16, tied, strided])
    del a
    gc.collect()
    assert ref() is None  # the original went once copied
    got_a, got_tied, got_i8, got_b16, got_tied2, got_strided = out
    assert isinstance(got_i8, type(i8)) and isinstance(got_b16, Bf16MatmulWeight)
    for t, w in zip([got_a, got_tied, got_i8.q, got_i8.scale, got_b16.w, got_strided], want):
        assert t.dtype == w.dtype and t.shape == w.shape and t.is_contiguous() and torch.equal(t, w)
        assert t.data_ptr() % 64 == 0
    assert got_tied2 is got_tied  # a tensor met twice is copied once
    ptrs = sorted(t.data_ptr() for t in (got_a, got_tied, got_i8.q, got_b16.w, got_strided))
    assert ptrs[-1] - ptrs[0] < 1 << 20  # one arena


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="no /proc/self/smaps to look the mappings up in")
def test_the_engine_keeps_weights_in_one_arena_and_the_pool_advised(tiny_dir):
    llm = LLM(str(tiny_dir), num_blocks=4096, block_size=4)  # a pool of 4096 x 4 KiB, past 2 MiB
    m, kv = llm.engine.model, llm.engine.kv_cache
    arena = mapping(m.embed)
    assert m.norm.data_ptr() == arena[0]  # the first weight at the arena's start, not somewhere in malloc's heap
    assert all(mapping(w)[:2] == arena[:2] for w in (m.norm, m.lm_head, *m.layers[0], *m.layers[-1]))
    if thp_mode() in ("always", "madvise"):  # the tiny model's arena is under 2 MiB: no page of it could be huge
        assert thp_eligible(kv.data)
    assert not kv.data.any() and kv.data.dtype == m.dtype
