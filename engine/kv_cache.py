"""The paged KV pool and the block manager that hands out its blocks.

`BlockManager` is pure bookkeeping (no tensors), so property tests can hammer it: a free list,
a reference count per block, block tables on the sequences. Full blocks of a forked prefix are
shared by reference; a partial last block is copied on write (the copy is returned for the
caller to perform on the pool).
"""
from __future__ import annotations

from collections import deque

import torch

from engine.config import ModelConfig
from engine.sequence import Sequence


class PoolExhausted(RuntimeError):
    """No free block is left; the scheduler answers by preempting, never by corrupting."""


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.ref_counts = [0] * num_blocks
        self.free_ids: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free_ids)

    def blocks_for(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def _take(self) -> int:
        if not self.free_ids:
            raise PoolExhausted("KV pool exhausted")
        b = self.free_ids.popleft()
        assert self.ref_counts[b] == 0, f"block {b} on the free list with refcount {self.ref_counts[b]}"
        self.ref_counts[b] = 1
        return b

    def _release(self, b: int) -> None:
        assert self.ref_counts[b] > 0, f"double free of block {b}"
        self.ref_counts[b] -= 1
        if self.ref_counts[b] == 0:
            self.free_ids.append(b)

    def can_allocate(self, seq: Sequence) -> bool:
        return self.blocks_for(len(seq)) - len(seq.block_table) <= self.num_free

    def allocate(self, seq: Sequence) -> None:
        """Give `seq` blocks for all its tokens (those it holds already, e.g. forked, are kept)."""
        need = self.blocks_for(len(seq)) - len(seq.block_table)
        if need > self.num_free:
            raise PoolExhausted(f"sequence {seq.seq_id} needs {need} blocks, {self.num_free} free")
        seq.block_table.extend(self._take() for _ in range(need))

    def can_append(self, seq: Sequence) -> bool:
        """Room for one more token (the one the next decode step writes)?"""
        return self.blocks_for(len(seq)) <= len(seq.block_table) or self.num_free > 0

    def append_slot(self, seq: Sequence) -> None:
        if self.blocks_for(len(seq)) > len(seq.block_table):
            seq.block_table.append(self._take())

    def free(self, seq: Sequence) -> None:
        for b in reversed(seq.block_table):
            self._release(b)
        seq.block_table = []
        seq.num_cached_tokens = 0

    def fork(self, parent: Sequence, child: Sequence, num_shared_tokens: int) -> list[tuple[int, int]]:
        """Let `child` reuse the parent's KV for its first `num_shared_tokens` tokens.

        Blocks wholly inside the shared span are shared by reference; the block holding its tail,
        if partial, is copied into a fresh block (copy on write). Returns (src, dst) block copies
        for the caller to perform on the pool. Raises PoolExhausted (changing nothing) if the
        copy's block is not available.
        """
        assert not child.block_table and num_shared_tokens <= parent.num_cached_tokens
        full, rem = divmod(num_shared_tokens, self.block_size)
        copies: list[tuple[int, int]] = []
        if rem:
            dst = self._take()
            copies.append((parent.block_table[full], dst))
        for b in parent.block_table[:full]:
            self.ref_counts[b] += 1
        child.block_table = parent.block_table[:full] + [dst for _, dst in copies]
        child.num_cached_tokens = num_shared_tokens
        return copies


class KVCache:
    """Per layer a K and a V pool `[num_blocks, block_size, kv_heads, head_dim]`."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        shape = (cfg.num_layers, 2, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        self.data = torch.zeros(shape, dtype=dtype, device=device)
        self.layers = [(self.data[i, 0], self.data[i, 1]) for i in range(cfg.num_layers)]

    @staticmethod
    def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return cfg.num_layers * 2 * block_size * cfg.num_kv_heads * cfg.head_dim * elem

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        for src, dst in copies:
            self.data[:, :, dst].copy_(self.data[:, :, src])
