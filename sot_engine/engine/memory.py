"""CPU tensors on 2 MiB pages (Linux transparent huge pages, asked for with madvise).

Why: a CPU decode step streams every weight matrix once (270 MB for SmolLM2 in bf16) and reads K/V rows scattered
over the pool. On 4 KiB pages that is a TLB miss, and a page walk, every 4 KiB of the stream; on 2 MiB pages one
in 512. Measured on this project's 2-core Xeon VM (THP mode "madvise", so torch's own allocations get 4 KiB pages),
SmolLM2 decode steps interleaved with those of a 4 KiB-page copy of the same engine: 4-6% faster at batch 1, 8 and
16 with bf16 weights at bf16 precision; 5% at batch 1 and 8 with int8 (no change at 16, a compute-bound step).
Where THP is off or unknown (another OS), the same tensors come from plain memory.

`SOT_HUGEPAGES=0` in the environment turns the advice off (4 KiB pages, for comparisons).

The memory is an anonymous mapping (zero-filled, committed page by page as it is first touched), owned by the
tensor made from it: it lives as long as that tensor or any view of it.
"""
from __future__ import annotations

import math
import mmap
import os

import torch

from sot_engine.kernels.weights import Weight, map_tensors

_ALIGN = 64  # bytes: every tensor in an arena starts on a cache line


def huge_empty(nbytes: int) -> torch.Tensor:
    """A uint8 CPU tensor of `nbytes` zero bytes on memory advised MADV_HUGEPAGE (where the OS has it)."""
    if not hasattr(mmap, "MAP_ANONYMOUS"):  # Windows: no anonymous private mappings through this module
        return torch.zeros(nbytes, dtype=torch.uint8)
    buf = mmap.mmap(-1, max(1, nbytes), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE") and os.environ.get("SOT_HUGEPAGES", "1") != "0":
        try:
            buf.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # THP compiled out: plain pages
            pass
    return torch.frombuffer(buf, dtype=torch.uint8)[:nbytes]


def huge_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """torch.zeros(shape, dtype) on huge-page memory (nothing is written: the mapping is zero-filled)."""
    return huge_empty(math.prod(shape) * dtype.itemsize).view(dtype).view(shape)


def into_hugepages(weights: list[Weight | None]) -> list[Weight]:
    """The same weights copied into one huge-page arena, in order (a tensor met twice, like a tied lm_head, is copied
    once and stays shared). CPU tensors only; others are returned as they are. The list is consumed, each entry
    dropped once copied, so where the caller holds no other reference memory peaks at the arena plus one weight."""
    offsets: dict[int, int] = {}  # id of a tensor to copy -> its place in the arena
    total = 0

    def place(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        if t.device.type == "cpu" and id(t) not in offsets:
            offsets[id(t)] = total
            total += -(-t.nbytes // _ALIGN) * _ALIGN
        return t

    for w in weights:
        map_tensors(w, place)
    arena = huge_empty(total)
    moved: dict[int, torch.Tensor] = {}  # id -> the copy (the original is kept alive by the key's owner until then)

    def move(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in offsets:
            return t
        if id(t) not in moved:
            off = offsets[id(t)]
            moved[id(t)] = arena[off:off + t.nbytes].view(t.dtype).view(t.shape).copy_(t)
        return moved[id(t)]

    out = []
    for i in range(len(weights)):
        out.append(map_tensors(weights[i], move))
        weights[i] = None  # the original can go (ids of freed tensors are never looked up again: each is unique)
    return out
