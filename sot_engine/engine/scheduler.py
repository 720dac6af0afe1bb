"""Continuous batching: which sequences run this step.

Two queues, as in nano-vllm. With chunked prefill (the default, as vLLM and SGLang) a step takes one
token for every decoding sequence first, then spends what is left of the token budget
(`max_num_batched_tokens`) on prompts: those already being prefilled, then newly admitted ones (admitted
as soon as all their blocks fit), a prompt longer than what is left being cut into chunks over several
steps. A long prompt thus never stalls the running streams for its whole prefill. Without it a step is
either a prefill of newly admitted sequences or one decode token for every running sequence. When the
pool runs dry, the youngest running sequence is preempted (its blocks freed, recomputed later).

Each scheduled sequence's `num_scheduled` says how many tokens the step computes for it; a step is run
as a decode (the fused one-token path) when that is 1 for all of them.
"""
from __future__ import annotations

from collections import deque

from sot_engine.engine.config import SchedulerConfig
from sot_engine.engine.kv_cache import BlockManager
from sot_engine.engine.sequence import Sequence, Status


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, block_manager: BlockManager) -> None:
        self.cfg, self.bm = cfg, block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence, front: bool = False) -> None:
        seq.status = Status.WAITING
        (self.waiting.appendleft if front else self.waiting.append)(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[Sequence], bool]:
        """Returns (sequences, is_prefill). Blocks for this step's tokens are allocated here."""
        if self.cfg.chunked_prefill:
            return self._mixed()
        batch = self._admit(self.cfg.max_num_batched_tokens)
        if batch:
            return batch, True
        batch = self._decode_batch()
        if batch or not self.waiting:
            return batch, False
        # every running sequence was preempted: admit again (may reclaim blocks held by waiting forks)
        return self._admit(self.cfg.max_num_batched_tokens), True

    def _mixed(self) -> tuple[list[Sequence], bool]:
        """Chunked prefill: decodes first, then prompts being prefilled, then new prompts, within the budget."""
        batch = self._decode_batch()  # every running sequence, one token each so far (slots for decodes)
        budget = self.cfg.max_num_batched_tokens - sum(s.num_pending == 1 for s in batch)
        for seq in batch:
            if seq.num_pending > 1:  # a prompt (or a recomputation) part-way through its prefill
                seq.num_scheduled = min(seq.num_pending, max(budget, 0))
                budget -= seq.num_scheduled
        batch = [s for s in batch if s.num_scheduled]
        if self.waiting and budget > 0:
            computing = {h for s in self.running if s.num_pending > 1 for h in self.bm.pending_hashes(s)}
            batch += self._admit(budget, computing, chunked=True)
        # an embedding needs its hidden states, which only the prefill path keeps
        return batch, any(s.num_scheduled > 1 or s.pool for s in batch)

    def _admit(self, budget: int, computing: set[int] | None = None, chunked: bool = False) -> list[Sequence]:
        """Admit waiting sequences whose blocks fit, their new tokens within `budget`; `chunked`: the last one
        admitted may compute only the first chunk of its prompt."""
        batch: list[Sequence] = []
        held: list[Sequence] = []  # waiting on a block that this step computes (kept in order, in front)
        computing = set(computing or ())  # chain hashes of the full blocks being computed
        while self.waiting and len(self.running) + len(batch) < self.cfg.max_num_seqs and budget > 0:
            seq = self.waiting[0]
            hittable, todo = self.bm.blocks_to_compute(seq)
            if hittable and todo[0] in computing:
                # SGLang's in-batch prefix check: prefilled now it would compute a prefix another request
                # of this step computes too; once that is done the prefix is a cache hit.
                held.append(self.waiting.popleft())
                continue
            n_new = seq.num_pending
            whole = not chunked or seq.pool  # an embedding averages all its hidden states: never split
            if batch and n_new > budget and whole:
                break
            if not self.bm.can_allocate(seq):
                if batch or self.running or not self._reclaim_from_waiting():
                    break
                continue
            self.bm.allocate(seq)  # may take cached prefix blocks: fewer tokens to compute
            if not seq.num_preemptions:  # first admission: the prompt tokens this request does not prefill
                seq.prefix_cached_tokens = seq.num_cached_tokens
            self.waiting.popleft()
            seq.status = Status.RUNNING
            seq.num_scheduled = seq.num_pending if whole else min(seq.num_pending, budget)
            batch.append(seq)
            computing.update(todo)
            budget -= seq.num_scheduled
        self.waiting.extendleft(reversed(held))
        self.running.extend(batch)
        return batch

    def _reclaim_from_waiting(self) -> bool:
        """Nothing runs and the head of the queue does not fit: blocks held by waiting sequences
        (forked children holding their prefix) are given up, from the back; they recompute later.
        Returns whether anything was freed."""
        for seq in reversed(self.waiting):
            if seq.block_table:
                self.bm.free(seq)
                return True
        return False

    def _decode_batch(self) -> list[Sequence]:
        queue = deque(self.running)
        batch: list[Sequence] = []
        while queue:
            seq = queue.popleft()
            while not self.bm.can_append(seq):
                victim = queue.pop() if queue else seq
                self.preempt(victim)
                if victim is seq:
                    break
            else:
                self.bm.append_slot(seq)
                seq.num_scheduled = 1
                batch.append(seq)
        self.running = batch
        return list(batch)  # finishing sequences leave `running` while the caller walks this batch

    def preempt(self, seq: Sequence) -> None:
        """Free the sequence's blocks and queue it (first) to be recomputed from its tokens so far."""
        self.bm.free(seq)
        seq.num_preemptions += 1
        self.add(seq, front=True)

    def remove(self, seq: Sequence, free: bool = True) -> None:
        """Take a sequence out (finished or aborted) and free its blocks at once, unless the caller
        keeps them (a finished sequence that a fork will continue)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if free:
            self.bm.free(seq)
