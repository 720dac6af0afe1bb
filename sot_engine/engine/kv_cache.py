"""The paged KV pool and the block manager that hands out its blocks.

`BlockManager` is pure bookkeeping (no tensors), so property tests can hammer it: free blocks, a
reference count per block, block tables on the sequences. Full blocks of a forked prefix are
shared by reference; a partial last block is copied on write (the copy is returned for the
caller to perform on the pool).

Automatic prefix caching (vLLM's design): a full block whose KV is computed is registered under a
hash chained over its tokens and every token before it, so a later sequence starting with the same
full blocks takes them by reference instead of prefilling them. A registered block is full and never
written again; when its last reference goes it stays free *and* cached until an allocation needs a
fresh block (never-cached free blocks go first, the most recently freed of them first: on CPU a block whose
memory was never written costs page faults, ~20% of a 273-token SmolLM2 prefill; then the least recently freed
cached ones).
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque

import torch

from sot_engine.engine.config import ModelConfig
from sot_engine.engine.memory import huge_zeros
from sot_engine.engine.sequence import Sequence


class PoolExhausted(RuntimeError):
    """No free block is left; the scheduler answers by preempting, never by corrupting."""


def chain_hash(parent: int | None, tokens: list[int]) -> int:
    """Identity of a full block: its tokens and, through `parent` (the previous block's hash), every
    token before them -- a block's KV depends on the whole prefix. SHA-256 (128 bits kept), not Python's
    hash: a server's clients choose the tokens, and a collision would hand one request another's KV."""
    h = hashlib.sha256((parent or 0).to_bytes(16, "little"))
    h.update(array("q", tokens).tobytes())
    return int.from_bytes(h.digest()[:16], "little")


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks, self.block_size, self.enable_caching = num_blocks, block_size, enable_caching
        self.ref_counts = [0] * num_blocks
        self.free_ids: deque[int] = deque(range(num_blocks))  # free, holding no cached prefix
        self.cached_free: OrderedDict[int, None] = OrderedDict()  # free but cached, least recently freed first
        self.block_hash: list[int | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}  # chain hash -> block: the inverse of block_hash
        self.hit_tokens = 0  # cumulative tokens taken from the cache instead of computed

    @property
    def num_free(self) -> int:
        return len(self.free_ids) + len(self.cached_free)

    def blocks_for(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def _take(self) -> int:
        """A block for new KV: a never-cached free one if any, else the least recently freed cached one,
        whose cache entry goes (it is about to be overwritten)."""
        if self.free_ids:
            b = self.free_ids.popleft()
        elif self.cached_free:
            b, _ = self.cached_free.popitem(last=False)
            del self.cached[self.block_hash[b]]
            self.block_hash[b] = None
        else:
            raise PoolExhausted("KV pool exhausted")
        assert self.ref_counts[b] == 0, f"block {b} on the free list with refcount {self.ref_counts[b]}"
        self.ref_counts[b] = 1
        return b

    def _share(self, b: int) -> None:
        """One more reference to a block whose KV is computed (a fork's prefix, a cache hit)."""
        if self.ref_counts[b] == 0:
            del self.cached_free[b]  # a hit on a free cached block takes it back
        self.ref_counts[b] += 1

    def _release(self, b: int) -> None:
        assert self.ref_counts[b] > 0, f"double free of block {b}"
        self.ref_counts[b] -= 1
        if self.ref_counts[b] == 0:
            if self.block_hash[b] is None:  # holds nothing to keep: reused first (warm, its pages committed)
                self.free_ids.appendleft(b)
            else:
                self.cached_free[b] = None

    def _hashes(self, seq: Sequence, n: int) -> list[int]:
        """Chain hashes of the sequence's first `n` full blocks (those it holds, the rest from its tokens)."""
        hs, bs = seq.block_hashes[:n], self.block_size
        while len(hs) < n:
            i = len(hs)
            hs.append(chain_hash(hs[-1] if hs else None, seq.token_ids[i * bs:(i + 1) * bs]))
        return hs

    def _lookup(self, seq: Sequence) -> tuple[list[int], list[int]]:
        """(hashes, blocks) of the cached blocks that continue the sequence's block table, where that ends
        on a block boundary with all its KV computed; `hashes` covers the table too. The block holding
        the last token never counts: its logits are needed, so that token is computed, and into a fresh
        block (a registered one is never written)."""
        bs, start = self.block_size, len(seq.block_table)
        if not self.enable_caching or seq.pool or seq.num_cached_tokens != start * bs:
            return [], []
        hashes, hits = self._hashes(seq, start), []
        for i in range(start, (len(seq) - 1) // bs):
            h = chain_hash(hashes[-1] if hashes else None, seq.token_ids[i * bs:(i + 1) * bs])
            if h not in self.cached:
                break
            hashes.append(h)
            hits.append(self.cached[h])
        return hashes, hits

    def _plan(self, seq: Sequence) -> tuple[list[int], list[int], int, int]:
        """(hashes, cache hits, fresh blocks, free blocks used) to allocate `seq`: hits on free cached
        blocks come off the free list too."""
        hashes, hits = self._lookup(seq)
        fresh = self.blocks_for(len(seq)) - len(seq.block_table) - len(hits)
        return hashes, hits, fresh, fresh + sum(self.ref_counts[b] == 0 for b in hits)

    def blocks_to_compute(self, seq: Sequence) -> tuple[bool, list[int]]:
        """(whether its first block to compute could be a cache hit, chain hashes of the full blocks it
        would compute) for `seq` if allocated now. The scheduler uses it to hold back a request whose
        next block another request of the same step is computing: one step later that block is a hit."""
        if not self.enable_caching or seq.pool:
            return False, []
        hashes, hits = self._lookup(seq)
        if not hashes and seq.block_table:  # a partial block of its own (a fork's copy): never looked up
            return False, []
        first, bs = len(hashes), self.block_size
        return first < (len(seq) - 1) // bs, self._hashes(seq, len(seq) // bs)[first:]

    def pending_hashes(self, seq: Sequence) -> list[int]:
        """Chain hashes of the full blocks `seq` holds whose KV is not computed yet (a prompt part-way through
        a chunked prefill): a request that needs them waits for them rather than computing them again."""
        if not self.enable_caching or seq.pool:
            return []
        return self._hashes(seq, len(seq) // self.block_size)[len(seq.block_hashes):]

    def can_allocate(self, seq: Sequence) -> bool:
        return self._plan(seq)[3] <= self.num_free

    def allocate(self, seq: Sequence) -> None:
        """Give `seq` blocks for all its tokens (those it holds already, e.g. forked, are kept): cached
        blocks for its next full blocks where found, their tokens then count as computed; fresh ones after."""
        hashes, hits, fresh, used = self._plan(seq)
        if used > self.num_free:
            raise PoolExhausted(f"sequence {seq.seq_id} needs {used} blocks, {self.num_free} free")
        if hits:
            for b in hits:
                self._share(b)
            seq.block_table.extend(hits)
            seq.block_hashes = hashes
            seq.num_cached_tokens = len(seq.block_table) * self.block_size
            self.hit_tokens += len(hits) * self.block_size
        seq.block_table.extend(self._take() for _ in range(fresh))

    def commit(self, seq: Sequence) -> None:
        """Register the sequence's full blocks whose KV is now computed (after each step that ran it). A
        block whose hash is already registered (the same prefix computed by a sequence admitted in the
        same step) stays unregistered: the cache holds one block per hash."""
        n = seq.num_cached_tokens // self.block_size
        if not self.enable_caching or n == len(seq.block_hashes):  # most decode steps fill no block
            return
        hashes = self._hashes(seq, n)
        for i in range(len(seq.block_hashes), n):
            b, h = seq.block_table[i], hashes[i]
            assert self.block_hash[b] in (None, h), f"block {b} is registered under another hash"
            if h not in self.cached:
                self.block_hash[b], self.cached[h] = h, b
        seq.block_hashes = hashes

    def reset_cache(self) -> bool:
        """Forget every cached prefix (cold-start benchmarks, order-independent tests). Returns False, changing
        nothing, while any block is held: its sequence still relies on the block's registration."""
        if any(self.ref_counts):
            return False
        self.free_ids.extend(self.cached_free)
        for b in self.cached_free:
            self.block_hash[b] = None
        self.cached_free.clear()
        self.cached.clear()
        return True

    def can_append(self, seq: Sequence) -> bool:
        """Room for one more token (the one the next decode step writes)?"""
        return self.blocks_for(len(seq)) <= len(seq.block_table) or self.num_free > 0

    def append_slot(self, seq: Sequence) -> None:
        if self.blocks_for(len(seq)) > len(seq.block_table):
            seq.block_table.append(self._take())

    def free(self, seq: Sequence) -> None:
        for b in reversed(seq.block_table):
            self._release(b)
        seq.block_table, seq.block_hashes = [], []
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
            self._share(b)
        child.block_table = parent.block_table[:full] + [dst for _, dst in copies]
        child.block_hashes = parent.block_hashes[:full]
        child.num_cached_tokens = num_shared_tokens
        return copies


class KVCache:
    """Per layer a K and a V pool `[num_blocks, block_size, kv_heads, head_dim]`."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        shape = (cfg.num_layers, 2, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        # on CPU a decode step reads K/V rows scattered over the pool: on 2 MiB pages, committed as first written
        self.data = huge_zeros(shape, dtype) if device.type == "cpu" else torch.zeros(shape, dtype=dtype, device=device)
        self.layers = [(self.data[i, 0], self.data[i, 1]) for i in range(cfg.num_layers)]

    @staticmethod
    def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return cfg.num_layers * 2 * block_size * cfg.num_kv_heads * cfg.head_dim * elem

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        for src, dst in copies:
            self.data[:, :, dst].copy_(self.data[:, :, src])
