"""Per-request state: sampling parameters (vLLM's names) and the sequence a request becomes."""
from __future__ import annotations

import enum
import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from sot_engine.engine.guided import GuidedDecoding


@dataclass(slots=True)
class SamplingParams:
    """vLLM-compatible sampling parameters. `temperature=0` means greedy."""
    temperature: float = 1.0
    top_k: int = 0  # 0 or -1: off
    top_p: float = 1.0
    seed: int | None = None
    max_tokens: int = 16
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    # Beyond vLLM: a stop rule on the output text, called after every token. It returns None, or
    # (cut, reason): the request stops, its text is cut at `cut` and `reason` becomes its stop_reason.
    # For rules that stop strings cannot say ("a newline after some text", "a repeated phrase").
    stop_fn: Callable[[str], tuple[int, str] | None] | None = None
    # Structured output: the output is constrained to a JSON schema (or any JSON object) and the request stops
    # ("stop") when the JSON is complete; max_tokens first gives "length" and truncated JSON.
    guided: GuidedDecoding | None = None
    # vLLM's logits processors: each called per step as fn(output_token_ids, logits_row) -> logits_row, after the
    # grammar's mask and before sampling. One that raises ends its own request ("logits processor error: ...").
    logits_processors: list[Callable[[list[int], torch.Tensor], torch.Tensor]] = field(default_factory=list)

    def __post_init__(self) -> None:
        def bad(msg: str) -> ValueError:
            return ValueError(f"bad sampling parameter: {msg}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not math.isfinite(self.temperature) or self.temperature < 0:
            raise bad(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < -1:
            raise bad(f"top_k must be an int >= -1 (0 or -1 disable it), got {self.top_k!r}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) \
                or not 0.0 < self.top_p <= 1.0:
            raise bad(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise bad(f"seed must be an int or None, got {self.seed!r}")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise bad(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        if not all(isinstance(s, str) and s for s in self.stop):
            raise bad(f"stop must be non-empty strings, got {self.stop!r}")
        self.stop_token_ids = list(self.stop_token_ids or [])
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids):
            raise bad(f"stop_token_ids must be non-negative ints, got {self.stop_token_ids!r}")
        if self.stop_fn is not None and not callable(self.stop_fn):
            raise bad(f"stop_fn must be callable, got {self.stop_fn!r}")
        if self.guided is not None and not isinstance(self.guided, GuidedDecoding):
            raise bad(f"guided must be a GuidedDecoding, got {type(self.guided).__name__}")
        self.logits_processors = list(self.logits_processors or [])
        if not all(callable(f) for f in self.logits_processors):
            raise bad(f"logits_processors must be callables, got {self.logits_processors!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def expand_params(params: "SamplingParams | list[SamplingParams | None] | None", n: int,
                  what: str = "prompts") -> list["SamplingParams"]:
    """One SamplingParams per item: a single value (or None: defaults) is repeated, a list must match."""
    plist = params if isinstance(params, list) else [params] * n
    if len(plist) != n:
        raise ValueError(f"{n} {what} but {len(plist)} sampling params")
    return [p if p is not None else SamplingParams() for p in plist]


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True)
class Timings:
    arrival: float = 0.0
    first_scheduled: float | None = None
    first_token: float | None = None
    finished: float | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def latency(self) -> float | None:
        return None if self.finished is None else self.finished - self.arrival


_ids = itertools.count()


@dataclass(slots=True, eq=False)
class Sequence:
    """One sequence in the engine: prompt + generated token ids and where their KV lives."""
    token_ids: list[int]
    params: SamplingParams
    request_id: str = ""
    seq_id: int = field(default_factory=lambda: next(_ids))
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # leading tokens whose K/V are already in the pool
    num_scheduled: int = 0  # tokens the current step computes from num_cached_tokens on (a chunk, or all)
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # chain hashes of the leading full blocks with KV
    status: Status = Status.WAITING
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    prefill_only: bool = False  # a fork parent or an embedding request: prefill its tokens, sample nothing
    pool: bool = False  # an embedding request: every token computed (no cache hit), final hidden states averaged
    pool_from: int = 0  # ... over its tokens from this one on (a fixed chat header left out of the average)
    embedding: torch.Tensor | None = None  # [hidden] float32, set by the step that prefilled a `pool` request
    text: str = ""  # detokenized output, stop string cut off
    generator: torch.Generator | None = None
    timings: Timings = field(default_factory=lambda: Timings(arrival=time.perf_counter()))
    num_preemptions: int = 0
    max_len: int = 0  # context limit for this sequence (the engine's max_model_len)
    prefix_cached_tokens: int = 0  # prompt tokens that were served from a shared prefix (a fork, the cache)
    keep_kv: bool = False  # on finishing, keep the blocks (for a later fork) until the engine's release()

    def __post_init__(self) -> None:
        if not self.num_prompt_tokens:
            self.num_prompt_tokens = len(self.token_ids)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_pending(self) -> int:
        """Tokens whose K/V is still to be computed: 1 for a decoding sequence, more while its prompt is prefilled."""
        return len(self.token_ids) - self.num_cached_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED
