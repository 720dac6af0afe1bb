"""`/metrics` in Prometheus' text format (prometheus-client), under vLLM's metric names where vLLM has one.

Three sources, each read where it is cheapest:
- a step hook on the engine thread: per-token timing (time to first token, inter-token latency) and, as each
  request finishes, its prompt, generated and prefix-cached tokens and its finish reason;
- the engine's own counters and block accounting, read at scrape time (running and waiting sequences, KV blocks
  in use, prefix-cache hits): a collector, so nothing is copied on the hot path;
- the HTTP layer (requests by route and status) and the SoT job (answers by mode and router).
One registry per app, so two servers in one process (tests) keep their own counts.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

if TYPE_CHECKING:
    from sot_engine.engine.llm_engine import LLMEngine, StepOutput
    from sot_engine.engine.sequence import Sequence
    from sot_engine.sot.driver import Answer

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_TTFT_BUCKETS = (0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
                2.5, 5.0, 10.0)


class _EngineCollector:
    """Gauges and counters the engine keeps itself, read when Prometheus scrapes (on the engine thread)."""

    def __init__(self, stats: Callable[[], dict]) -> None:
        self.stats = stats

    def collect(self):
        st = self.stats()
        g = GaugeMetricFamily("vllm:num_requests_running", "Sequences in the running batch.")
        g.add_metric([], st["running"])
        yield g
        g = GaugeMetricFamily("vllm:num_requests_waiting", "Sequences waiting to be admitted.")
        g.add_metric([], st["waiting"])
        yield g
        used = st["total_blocks"] - st["free_blocks"]
        g = GaugeMetricFamily("vllm:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full).")
        g.add_metric([], used / st["total_blocks"] if st["total_blocks"] else 0.0)
        yield g
        g = GaugeMetricFamily("sot:kv_cache_blocks", "KV-cache blocks by state.", labels=["state"])
        g.add_metric(["used"], used)
        g.add_metric(["free"], st["free_blocks"])
        g.add_metric(["cached"], st["cached_blocks"])
        yield g
        hits, computed = st["prefix_cache_hit_tokens"], st["prefill_tokens"]
        c = CounterMetricFamily("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        c.add_metric([], hits + computed)
        yield c
        c = CounterMetricFamily("vllm:prefix_cache_hits", "Prompt tokens served from the prefix cache.")
        c.add_metric([], hits)
        yield c
        c = CounterMetricFamily("sot:engine_steps", "Engine steps run (prefill or decode).")
        c.add_metric([], st["steps"])
        yield c


class Metrics:
    def __init__(self, engine: LLMEngine, stats: Callable[[], dict]) -> None:
        self.registry = r = CollectorRegistry()
        self.http = Counter("http_requests", "HTTP requests by route, method and status.",
                            ["handler", "method", "status"], registry=r)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens of finished sequences (n choices: n "
                                     "sequences).", registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generated tokens of finished sequences.",
                                         registry=r)
        self.cached_tokens = Counter("sot:cached_prompt_tokens", "Prompt tokens of finished requests that were not "
                                     "prefilled (prefix cache, fork).", registry=r)
        self.finished = Counter("vllm:request_success", "Finished sequences by finish reason.", ["finished_reason"],
                                registry=r)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Arrival to first token.", buckets=_TTFT_BUCKETS,
                              registry=r)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between a request's consecutive tokens.",
                             buckets=_ITL_BUCKETS, registry=r)
        self.sot_answers = Counter("sot:answers", "SoT answers by the mode that wrote them and the router.",
                                   ["mode", "router"], registry=r)
        r.register(_EngineCollector(stats))
        self._last: dict[int, tuple[Sequence, float]] = {}  # seq_id -> (the sequence, when its latest token came)
        engine.step_hooks.append(self)

    # ---- the engine's step hook (engine thread) ---------------------------------------------------------
    def before_step(self) -> None:
        pass

    def after_step(self, outputs: list[StepOutput]) -> None:
        now = time.perf_counter()
        for out in outputs:
            seq = out.seq
            if seq.pool:  # embedding requests (the router's) generate nothing
                continue
            if out.new_token_ids:
                last = self._last.get(seq.seq_id)
                if last is None:
                    self.ttft.observe(now - seq.timings.arrival)
                else:
                    self.itl.observe(now - last[1])
                self._last[seq.seq_id] = (seq, now)
            if out.finished:
                self._last.pop(seq.seq_id, None)
                self._count(seq)
        self._sweep()

    def _sweep(self) -> None:
        """Count and forget requests aborted since (a client gone): no final output comes for them."""
        for sid, (seq, _) in list(self._last.items()):
            if seq.is_finished:
                del self._last[sid]
                self._count(seq)

    def _count(self, seq: Sequence) -> None:
        self.finished.labels(seq.finish_reason or "abort").inc()
        self.prompt_tokens.inc(seq.num_prompt_tokens)
        self.generation_tokens.inc(seq.num_output_tokens)
        self.cached_tokens.inc(seq.prefix_cached_tokens)

    # ---- HTTP and SoT -------------------------------------------------------------------------------------
    def request(self, handler: str, method: str, status: int) -> None:
        self.http.labels(handler, method, str(status)).inc()

    def sot_answer(self, ans: Answer) -> None:
        self.sot_answers.labels(ans.mode, ans.router).inc()

    def render(self) -> bytes:
        """The exposition; call it on the engine thread (it reads the engine's counters)."""
        self._sweep()
        return generate_latest(self.registry)
