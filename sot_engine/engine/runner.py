"""Turns a scheduled batch into flat tensors and runs the model on them.

Prefill packs every sequence's tokens of this step (`num_scheduled` of them past `num_cached_tokens`: a
whole prompt, a chunk of one, or a decoding sequence's one token) back to back; decode feeds one token per
sequence. Both compute logits only for each sequence's last token of the step.
"""
from __future__ import annotations

import torch

from sot_engine.engine.kv_cache import KVCache
from sot_engine.engine.model import AttnMetadata, LlamaModel
from sot_engine.engine.sequence import Sequence
from sot_engine.kernels.cascade import PrefixGroup, cascade_pays, find_groups


class ModelRunner:
    def __init__(self, model: LlamaModel, kv_cache: KVCache, block_size: int, device: torch.device,
                 cascade: str = "off", workers=None) -> None:
        """`cascade`: "on" (shared-prefix decode whenever groups exist), "auto" (where the cost model says it
        pays) or "off". `workers`: tensor-parallel workers (engine.parallel) that run every step with this one."""
        self.model, self.kv_cache, self.block_size, self.device = model, kv_cache, block_size, device
        self.workers = workers
        self.cascade = cascade if model.backend.cascade_decode_attention is not None else "off"
        self.cascade_steps = 0  # decode steps that ran cascade attention

    def _tensor(self, data: list, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        return torch.tensor(data, dtype=dtype, device=self.device)

    def _block_tables(self, seqs: list[Sequence]) -> torch.Tensor:
        width = max(len(s.block_table) for s in seqs)
        return self._tensor([s.block_table + [0] * (width - len(s.block_table)) for s in seqs])

    def _slot(self, seq: Sequence, pos: int) -> int:
        return seq.block_table[pos // self.block_size] * self.block_size + pos % self.block_size

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy KV blocks (a fork's partial block) in this pool and in every tensor-parallel worker's."""
        if copies and self.workers is not None:
            self.workers.send(("copy", copies))
        self.kv_cache.copy_blocks(copies)

    def prepare_prefill(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor, AttnMetadata]:
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        cu = [0]
        ends = [s.num_cached_tokens + s.num_scheduled for s in seqs]
        for s, end in zip(seqs, ends):
            start = s.num_cached_tokens
            ids.extend(s.token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(self._slot(s, p) for p in range(start, end))
            cu.append(len(ids))
        meta = AttnMetadata(
            is_prefill=True,
            slot_mapping=self._tensor(slots),
            block_tables=self._block_tables(seqs),
            context_lens=self._tensor(ends),
            cu_seqlens_q=self._tensor(cu, torch.int32),
            logits_indices=self._tensor([c - 1 for c in cu[1:]]),
            max_context_len=max(ends),
        )
        return self._tensor(ids), self._tensor(positions), meta

    def prefix_groups(self, seqs: list[Sequence]) -> list[PrefixGroup] | None:
        """Groups of decode rows sharing prefix blocks (a fork's children), those worth cascade attention."""
        if self.cascade == "off":
            return None
        lens = [len(s) for s in seqs]
        groups = find_groups([s.block_table for s in seqs], lens, self.block_size)
        if self.cascade == "auto":
            cfg = self.model.cfg
            groups = [g for g in groups if cascade_pays(
                len(g.members), g.num_blocks * self.block_size,
                max(lens[r] for r in g.members.tolist()) - g.num_blocks * self.block_size,
                cfg.num_heads // cfg.num_kv_heads)]
        return groups or None

    def prepare_decode(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor, AttnMetadata]:
        lens = [len(s) for s in seqs]
        # the per-sequence ints in one tensor (one host-to-device copy on a GPU, one torch.tensor call on a CPU)
        ids, positions, slots, context_lens = self._tensor([
            [s.token_ids[-1] for s in seqs], [n - 1 for n in lens],
            [self._slot(s, n - 1) for s, n in zip(seqs, lens)], lens]).unbind(0)
        meta = AttnMetadata(
            is_prefill=False,
            slot_mapping=slots,
            block_tables=self._block_tables(seqs),
            context_lens=context_lens,
            cu_seqlens_q=None,
            logits_indices=torch.arange(len(seqs), device=self.device),
            max_context_len=max(lens),
            prefix_groups=self.prefix_groups(seqs),
        )
        self.cascade_steps += meta.prefix_groups is not None
        return ids, positions, meta

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], is_prefill: bool) -> torch.Tensor:
        """Logits of each sequence's last token of the step: [B, vocab] float32 (a row part-way through its
        prompt gets one too, which the engine ignores). Marks the new KV as cached."""
        ids, positions, meta = (self.prepare_prefill if is_prefill else self.prepare_decode)(seqs)
        if self.workers is not None:  # one message per step; every rank then runs its shard of the forward
            self.workers.send(("step", ids, positions, meta))
        hidden = self.model.forward(ids, positions, meta, self.kv_cache.layers)
        if is_prefill:  # embedding requests: the mean of their final hidden states (all tokens: no cache hits)
            cu = meta.cu_seqlens_q.tolist()
            for i, s in enumerate(seqs):
                if s.pool:
                    s.embedding = hidden[cu[i] + s.pool_from:cu[i + 1]].float().mean(0)
        logits = self.model.logits(hidden, meta)
        for s in seqs:
            s.num_cached_tokens += s.num_scheduled
        return logits
