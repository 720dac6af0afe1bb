"""The public API, vLLM-shaped: `LLM(model=...)`, `generate`, `stream`, `fork`, `stats`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from sot_engine.engine.llm_engine import LLMEngine, Prompt
from sot_engine.engine.sequence import SamplingParams, Sequence, expand_params


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" | "length" | "abort"
    stop_reason: int | str | None  # the stop token id or stop string, None for EOS or length
    num_cached_tokens: int  # prompt tokens taken from a shared prefix (a fork, the prefix cache), not prefilled
    ttft: float | None  # seconds from arrival to the first token
    latency: float | None  # seconds from arrival to the end
    num_preemptions: int

    @classmethod
    def of(cls, seq: Sequence) -> "RequestOutput":
        return cls(seq.request_id, seq.token_ids[:seq.num_prompt_tokens], seq.text, seq.output_ids,
                   seq.finish_reason, seq.stop_reason, seq.prefix_cached_tokens, seq.timings.ttft,
                   seq.timings.latency, seq.num_preemptions)


@dataclass(slots=True)
class StreamDelta:
    index: int  # position of the prompt in the call's list
    text: str  # new text since the last delta for this prompt
    token_ids: list[int]  # new tokens
    finished: bool
    output: RequestOutput | None  # the whole output, on the last delta


def _as_list(prompts: Prompt | list[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, list) and prompts and all(isinstance(p, int) for p in prompts):
        return [prompts]  # one prompt of token ids
    if isinstance(prompts, list) and prompts and all(isinstance(p, dict) for p in prompts):
        return [prompts]  # one chat
    if not isinstance(prompts, list) or not prompts:
        raise ValueError("prompts must be a non-empty list of prompts (or one prompt)")
    return prompts


class LLM:
    """Embed the engine: `LLM(model="default" | "gemma3-270m" | path | "random:<shape>", device=..., dtype=...)`."""

    def __init__(self, model: str = "default", **engine_args) -> None:
        self.engine = LLMEngine(model, **engine_args)
        self.tokenizer, self.config = self.engine.tokenizer, self.engine.config

    def _submit(self, prompts: list[Prompt], params: SamplingParams | list[SamplingParams] | None,
                keep_kv: bool = False) -> list[Sequence]:
        plist = expand_params(params, len(prompts))
        ids = []
        for i, (p, sp) in enumerate(zip(prompts, plist)):  # all or nothing: check before queueing
            try:
                ids.append(self.engine.check(p, sp))
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from None
        return [self.engine.add_request(t, sp, keep_kv=keep_kv) for t, sp in zip(ids, plist)]

    def _drain(self, seqs: list[Sequence], keep_kv: bool = False) -> Iterator[StreamDelta]:
        index = {s.seq_id: i for i, s in enumerate(seqs)}
        pending = set(index)
        try:
            while pending:
                for out in self.engine.step():
                    i = index.get(out.seq.seq_id)
                    if i is None:
                        continue
                    if out.finished:
                        pending.discard(out.seq.seq_id)
                    yield StreamDelta(i, out.new_text, out.new_token_ids, out.finished,
                                      RequestOutput.of(out.seq) if out.finished else None)
        finally:  # an error or an abandoned stream must not leak blocks
            for s in seqs:
                if not s.is_finished:
                    self.engine.abort(s.request_id)
                if not (keep_kv and s.finish_reason != "abort"):
                    self.engine.release(s)

    def generate(self, prompts: Prompt | list[Prompt],
                 params: SamplingParams | list[SamplingParams] | None = None,
                 keep_kv: bool = False) -> list[RequestOutput]:
        """With `keep_kv` the finished requests keep their KV for `fork(prefix=output)` until `release`."""
        seqs = self._submit(_as_list(prompts), params, keep_kv)
        for _ in self._drain(seqs, keep_kv):
            pass
        return [RequestOutput.of(s) for s in seqs]

    def stream(self, prompts: Prompt | list[Prompt],
               params: SamplingParams | list[SamplingParams] | None = None,
               keep_kv: bool = False) -> Iterator[StreamDelta]:
        """Deltas as the steps produce them; breaking out of the loop aborts what is left."""
        seqs = self._submit(_as_list(prompts), params, keep_kv)
        return self._drain(seqs, keep_kv)

    def embed(self, prompts: Prompt | list[Prompt], pool_from: int | list[int] = 0) -> torch.Tensor:
        """[n, hidden] float32: each prompt's final hidden states (after the last norm) averaged over its tokens
        from `pool_from` on (one for all, or one per prompt), prefilled together in ragged batches. A pooled feature
        for small classifiers (the SoT router); every token is computed, none taken from the prefix cache."""
        plist = _as_list(prompts)
        starts = pool_from if isinstance(pool_from, list) else [pool_from] * len(plist)
        if len(starts) != len(plist):
            raise ValueError(f"pool_from has {len(starts)} entries for {len(plist)} prompts")
        ids = []
        for i, p in enumerate(plist):  # all or nothing: check before queueing
            try:
                ids.append(self.engine.check(p, SamplingParams(max_tokens=1)))
                k = starts[i]
                if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < len(ids[-1]):
                    raise ValueError(f"pool_from must be an int in [0, {len(ids[-1])}), got {k!r}")
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from None
        seqs = [self.engine.add_embed(t, k) for t, k in zip(ids, starts)]
        for _ in self._drain(seqs):
            pass
        return torch.stack([s.embedding for s in seqs])

    def _fork(self, prefix: Prompt | RequestOutput, suffixes: list[Prompt],
              params: SamplingParams | list[SamplingParams] | None, prefix_len: int | None) -> list[Sequence]:
        if isinstance(prefix, RequestOutput):
            held = self.engine.requests.get(prefix.request_id)
            if held is None:
                raise ValueError(f"request {prefix.request_id!r} was released: generate it with keep_kv=True "
                                 "and fork before release()")
            return self.engine.add_fork(held, suffixes, params, prefix_len)
        return self.engine.add_fork(prefix, suffixes, params, prefix_len)

    def fork(self, prefix: Prompt | RequestOutput, suffixes: list[Prompt],
             params: SamplingParams | list[SamplingParams] | None = None,
             prefix_len: int | None = None) -> list[RequestOutput]:
        """Prefill `prefix` once and continue it with each suffix in one ragged batch. `prefix` may be the
        output of a request kept with `keep_kv=True`: its first `prefix_len` tokens (prompt + output, default
        all) are continued without prefilling them again."""
        seqs = self._fork(prefix, suffixes, params, prefix_len)
        for _ in self._drain(seqs):
            pass
        return [RequestOutput.of(s) for s in seqs]

    def stream_fork(self, prefix: Prompt | RequestOutput, suffixes: list[Prompt],
                    params: SamplingParams | list[SamplingParams] | None = None,
                    prefix_len: int | None = None) -> Iterator[StreamDelta]:
        return self._drain(self._fork(prefix, suffixes, params, prefix_len))

    def release(self, output: RequestOutput) -> None:
        """Free the KV a `keep_kv` request kept."""
        seq = self.engine.requests.get(output.request_id)
        if seq is not None:
            self.engine.release(seq)

    def reset_prefix_cache(self) -> bool:
        return self.engine.reset_prefix_cache()

    def stats(self) -> dict[str, int]:
        return self.engine.stats()
