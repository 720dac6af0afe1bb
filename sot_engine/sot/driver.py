"""The SoT driver: route the question, ask for a skeleton, expand every point in one batch on a shared
prefix, and put the answer together -- or answer with normal decoding where SoT does not fit.

Two expansion modes:
- "paper": each point gets the paper's point-expanding prompt. The prompts differ only after the skeleton, so
  their common token prefix is prefilled once (`LLM.stream_fork`) and every point prefills only its tail.
- "continuation" (beyond the paper): each point is asked for as the next turn of the skeleton's own
  conversation, so the skeleton request's KV (question + skeleton) is kept and reused by every point; a
  point prefills only its short instruction turn.
Both split prompts on token ids (never text), so a point's tokens are exactly those of its full prompt.
"""
from __future__ import annotations

import time
from contextlib import closing
from dataclasses import asdict, dataclass, field, replace
from typing import Iterator

from sot_engine.engine import LLM, SamplingParams
from sot_engine.engine.llm import RequestOutput, StreamDelta
from sot_engine.engine.guided import GuidedDecoding
from sot_engine.sot.grammar import DistinctOpenings, HoldFirstSentence, ListEnd, skeleton_grammar
from sot_engine.sot.prompts import DEFAULT_PROMPTS, SoTPrompts, fill, point_messages, point_prefill, skeleton_messages
from sot_engine.sot.router import NORMAL, SOT, Route, Router
from sot_engine.sot.skeleton import Point, format_skeleton, parse_skeleton
from sot_engine.sot.stops import point_stop, skeleton_stop

MODES = ("auto", "sot", "normal")
EXPANSIONS = ("paper", "continuation")


@dataclass(frozen=True)
class SoTConfig:
    prompts: SoTPrompts = DEFAULT_PROMPTS
    expansion: str = "paper"  # "paper" | "continuation"
    skeleton_max_tokens: int = 160  # 10 points of 3~5 words fit; a runaway skeleton is cut here
    point_max_tokens: int = 128  # a point is 1~2 sentences
    normal_max_tokens: int = 512
    max_points: int = 10
    min_points: int = 2  # fewer usable points: answer with normal decoding instead
    # the skeleton decoded under its grammar (sot.grammar): skeleton_min_points..max_points distinct one-line points;
    # False: free decoding, ended by `skeleton_stop` and read by the parser (as before the grammar, for comparison)
    constrained_skeleton: bool = True
    skeleton_min_points: int = 3
    # a point's expansion opens with a complete sentence of at least this many words on its first line before it
    # may end (EOS, newline, a stop rule; sot.grammar.HoldFirstSentence); 0: off (as before, for comparison)
    point_min_words: int = 4
    # a point ends after this many sentences: the paper's point prompt asks for 1~2 (0: no limit)
    point_max_sentences: int = 2
    labels: bool = True  # keep "2. Point:" in front of each expansion (the paper drops them for writing)
    temperature: float = 0.0  # points and normal decoding; the skeleton is always greedy
    top_p: float = 1.0
    seed: int | None = None
    ngram: int = 8  # stop a point that repeats an 8-word phrase; 0: off

    def __post_init__(self) -> None:
        if self.expansion not in EXPANSIONS:
            raise ValueError(f"expansion must be one of {EXPANSIONS}, got {self.expansion!r}")
        for name in ("skeleton_max_tokens", "point_max_tokens", "normal_max_tokens", "max_points", "min_points",
                     "skeleton_min_points"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        for name in ("ngram", "point_min_words", "point_max_sentences"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        if not isinstance(self.constrained_skeleton, bool):
            raise ValueError(f"constrained_skeleton must be a bool, got {self.constrained_skeleton!r}")
        if self.constrained_skeleton:  # the grammar must be buildable: bounds in order, a prefill it can continue
            skeleton_grammar(self.prompts.skeleton_prefill, self.skeleton_min_points, self.max_points)
        SamplingParams(temperature=self.temperature, top_p=self.top_p, seed=self.seed)  # validates them


@dataclass
class PointAnswer:
    index: int
    point: str  # the skeleton point
    text: str  # its expansion (without the "i. point:" label)
    num_tokens: int
    finish_reason: str | None
    stop_reason: int | str | None  # which stop rule ended it ("newline", "repetition", ...)
    prompt_tokens: int
    cached_tokens: int  # prompt tokens taken from the shared prefix instead of prefilled


@dataclass
class Stage:
    """Wall time of one stage, split like the paper's Fig. 6: prefill until every row has its first token,
    decode after that."""
    prefill: float = 0.0
    decode: float = 0.0

    @property
    def total(self) -> float:
        return self.prefill + self.decode


@dataclass
class Timings:
    skeleton: Stage = field(default_factory=Stage)
    expand: Stage = field(default_factory=Stage)
    normal: Stage = field(default_factory=Stage)
    route: float = 0.0  # the router's decision (the trained router's hidden features: one short prefill)
    total: float = 0.0


@dataclass
class TokenCounts:
    skeleton_prompt: int = 0
    skeleton_output: int = 0
    expand_prompt: int = 0  # all point prompts together, as if each were prefilled alone
    expand_prefilled: int = 0  # what the engine actually prefilled for them (the shared prefix once)
    expand_output: int = 0
    normal_prompt: int = 0
    normal_output: int = 0

    @property
    def output(self) -> int:
        return self.skeleton_output + self.expand_output + self.normal_output


@dataclass
class Answer:
    question: str
    mode: str  # "sot" | "normal": what produced `text`
    reason: str  # why that mode (the router's reason, or why SoT fell back)
    text: str
    router: str = "asked"  # what chose the mode: "rules", "trained (...)", or "asked" (the caller's mode)
    skeleton: str | None = None  # the skeleton as the model wrote it (None if there was no skeleton stage)
    points: list[PointAnswer] = field(default_factory=list)
    expansion: str | None = None  # "paper" | "continuation" when mode is "sot"
    timings: Timings = field(default_factory=Timings)
    tokens: TokenCounts = field(default_factory=TokenCounts)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tokens"]["output"] = self.tokens.output
        for k in ("skeleton", "expand", "normal"):
            d["timings"][k]["total"] = getattr(self.timings, k).total
        return d


@dataclass
class Event:
    """One thing to show while an answer is being written.

    kind: "route" (text: the reason), "skeleton" (text: new skeleton text), "points" (points: the parsed
    skeleton), "fallback" (text: why SoT gave up), "point" (index, text: new text of that point),
    "point_done" (index, text: the point's final text), "normal" (text: new text), "answer" (answer)."""
    kind: str
    text: str = ""
    index: int | None = None
    points: list[Point] | None = None
    answer: Answer | None = None


def common_prefix_len(token_lists: list[list[int]]) -> int:
    """Length of the longest common prefix, leaving every list at least one token of its own (a fork child
    must prefill something to get logits)."""
    n = min(len(t) for t in token_lists) - 1
    first = token_lists[0]
    for other in token_lists[1:]:
        i = 0
        while i < n and other[i] == first[i]:
            i += 1
        n = i
    return max(n, 0)


def _question(question: object) -> str:
    if not isinstance(question, str) or not question.strip():
        raise ValueError("empty question: ask something (the question is empty or only whitespace)")
    return question.strip()


class _StageClock:
    """Splits a stage's wall time at the moment the last row got its first token."""

    def __init__(self, rows: int) -> None:
        self.start, self.rows, self.seen = time.perf_counter(), rows, set()
        self.first_all: float | None = None

    def saw(self, d: StreamDelta) -> None:
        if d.token_ids and d.index not in self.seen:
            self.seen.add(d.index)
            if len(self.seen) == self.rows:
                self.first_all = time.perf_counter()

    def stage(self) -> Stage:
        end = time.perf_counter()
        mid = self.first_all or end
        return Stage(prefill=mid - self.start, decode=end - mid)


def _single(stream: Iterator[StreamDelta], kind: str):
    """Drain a one-request stream, its text as `kind` events; returns (its output, the stage's times)."""
    clock, out = _StageClock(1), None
    with closing(stream):
        for d in stream:
            clock.saw(d)
            if d.text:
                yield Event(kind, text=d.text)
            if d.finished:
                out = d.output
    return out, clock.stage()


class SoT:
    """Skeleton-of-Thought on an `engine.LLM`: `SoT(llm).answer(question, mode="auto") -> Answer`."""

    def __init__(self, llm: LLM | str = "default", config: SoTConfig | None = None, router: str | Router = "trained",
                 **llm_args) -> None:
        """`router` decides in mode "auto": "trained" (the shipped classifier, `sot.trained_router`), "rules"
        (`sot.router.route`), a router parameter file, or any callable `question -> Route`."""
        self.llm = llm if isinstance(llm, LLM) else LLM(llm, **llm_args)
        self.config = config or SoTConfig()
        if self.llm.tokenizer is None or self.llm.engine.chat_template is None:
            raise ValueError("SoT needs a model with a tokenizer and a chat template (random weights have none)")
        if isinstance(router, str):
            from sot_engine.sot.trained_router import load_router
            router = load_router(router, self.llm)
        elif not callable(router):
            raise ValueError(f'router must be "trained", "rules", a parameter file or a callable, got {router!r}')
        self.router: Router = router

    def answer(self, question: str, mode: str = "auto", skeleton: list[str] | None = None,
               **config_overrides) -> Answer:
        """The whole answer. `skeleton` (point texts) skips the skeleton stage; `config_overrides` replace
        `SoTConfig` fields for this call, e.g. `expansion="continuation"`, `labels=False`."""
        for ev in self.stream(question, mode, skeleton, **config_overrides):
            if ev.kind == "answer":
                return ev.answer
        raise RuntimeError("the SoT stream ended without an answer")  # unreachable

    def stream(self, question: str, mode: str = "auto", skeleton: list[str] | None = None,
               **config_overrides) -> Iterator[Event]:
        """Events while the answer is written; the last one carries the `Answer`. Input is checked before
        anything runs (ValueError); closing the iterator early aborts what is running and frees its blocks."""
        q = _question(question)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        cfg = replace(self.config, **config_overrides) if config_overrides else self.config
        given = self._given_points(skeleton)
        engine = self.llm.engine
        engine.check([{"role": "user", "content": q}], self._params(cfg, cfg.normal_max_tokens))
        return self._run(q, mode, cfg, given)

    # ---- stages --------------------------------------------------------------------------------
    def _run(self, q: str, mode: str, cfg: SoTConfig, given: list[Point] | None) -> Iterator[Event]:
        t0 = time.perf_counter()
        ans = Answer(question=q, mode=SOT, reason="", text="")
        if mode == "normal":
            decision = Route(NORMAL, "normal decoding was asked for", "asked", "asked")
        elif mode == "sot" or given is not None:
            decision = Route(SOT, "SoT was asked for" if given is None else "the skeleton was given", "asked", "asked")
        else:
            t = time.perf_counter()
            decision = self.router(q)
            ans.timings.route = time.perf_counter() - t
        ans.router = decision.router
        ans.reason = decision.reason if decision.router == "asked" else f"{decision.router} router: {decision.reason}"
        yield Event("route", text=ans.reason)
        if decision.mode == NORMAL:
            yield from self._normal(ans, cfg, ans.reason)
        else:
            held: RequestOutput | None = None
            try:
                if given is None:
                    points, held, why = yield from self._skeleton(ans, cfg)
                else:
                    points, why = given, None
                    ans.skeleton = format_skeleton(given)
                if why is None:
                    yield Event("points", points=points)
                    yield from self._expand(ans, cfg, points, held)
                else:
                    if held is not None:
                        self.llm.release(held)
                        held = None
                    yield Event("fallback", text=why)
                    yield from self._normal(ans, cfg, why)
            finally:
                if held is not None:
                    self.llm.release(held)
        ans.timings.total = time.perf_counter() - t0
        yield Event("answer", answer=ans)

    def _skeleton(self, ans: Answer, cfg: SoTConfig):
        """Greedy skeleton with its stop rule. Returns (points, kept request or None, why SoT gives up)."""
        p = cfg.prompts
        msgs = skeleton_messages(ans.question, p)
        if cfg.constrained_skeleton:  # the grammar ends the list; the parser still drops a repeated point
            grammar = skeleton_grammar(p.skeleton_prefill, cfg.skeleton_min_points, cfg.max_points)
            params = SamplingParams(temperature=0.0, max_tokens=cfg.skeleton_max_tokens,
                                    guided=GuidedDecoding(grammar=grammar),
                                    logits_processors=self.skeleton_processors(cfg))
        else:
            params = SamplingParams(temperature=0.0, max_tokens=cfg.skeleton_max_tokens,
                                    stop_fn=skeleton_stop(p.skeleton_prefill, cfg.max_points))
        keep = cfg.expansion == "continuation"
        try:
            stream = self.llm.stream(msgs, params, keep_kv=keep)
        except ValueError as e:  # e.g. the skeleton prompt does not fit the context
            return [], None, f"SoT does not fit: the skeleton request was refused ({e})"
        out, ans.timings.skeleton = yield from _single(stream, "skeleton")
        ans.skeleton = p.skeleton_prefill + out.text
        ans.tokens.skeleton_prompt, ans.tokens.skeleton_output = len(out.prompt_token_ids), len(out.token_ids)
        points = parse_skeleton(out.text, prefilled=p.skeleton_prefill, max_points=cfg.max_points)
        held = out if keep else None
        if len(points) < cfg.min_points:
            return points, held, (f"the skeleton has {len(points)} usable point{'s' * (len(points) != 1)} "
                                  f"(SoT needs {cfg.min_points})")
        return points, held, None

    def _expand(self, ans: Answer, cfg: SoTConfig, points: list[Point], held: RequestOutput | None):
        engine = self.llm.engine
        full = self.point_prompts(ans.question, ans.skeleton, points, cfg)
        # continuation: the points continue the kept skeleton request (prompt + output tokens)
        base = held.prompt_token_ids + held.token_ids if held is not None else None
        n = common_prefix_len(full + ([base] if base else []))
        params = [replace(self._params(cfg, cfg.point_max_tokens, i), logits_processors=self._hold(cfg),
                          stop_fn=point_stop(pt.index, num_points=len(points), ngram=cfg.ngram,
                                             min_words=cfg.point_min_words, max_sentences=cfg.point_max_sentences))
                  for i, pt in enumerate(points)]
        before = engine.counters["prefill_tokens"]
        try:
            if held is not None:
                stream = self.llm.stream_fork(held, [f[n:] for f in full], params, prefix_len=n)
            else:
                stream = self.llm.stream_fork(full[0][:n], [f[n:] for f in full], params)
        except ValueError as e:  # a point prompt that does not fit: answer normally instead
            yield Event("fallback", text=f"SoT does not fit: {e}")
            yield from self._normal(ans, cfg, f"SoT does not fit: {e}")
            return
        clock, outs = _StageClock(len(points)), [None] * len(points)
        with closing(stream):
            for d in stream:
                clock.saw(d)
                if d.text:
                    yield Event("point", index=points[d.index].index, text=d.text)
                if d.finished:
                    outs[d.index] = d.output
                    yield Event("point_done", index=points[d.index].index, text=d.output.text)
        ans.timings.expand = clock.stage()
        ans.mode, ans.expansion = SOT, cfg.expansion
        ans.points = [PointAnswer(pt.index, pt.text, o.text.strip(), len(o.token_ids), o.finish_reason,
                                  o.stop_reason, len(o.prompt_token_ids), o.num_cached_tokens)
                      for pt, o in zip(points, outs)]
        ans.tokens.expand_prompt = sum(len(f) for f in full)
        ans.tokens.expand_prefilled = engine.counters["prefill_tokens"] - before
        ans.tokens.expand_output = sum(pa.num_tokens for pa in ans.points)
        ans.text = self.assemble(ans.points, cfg)

    def _normal(self, ans: Answer, cfg: SoTConfig, reason: str):
        ans.mode, ans.reason = NORMAL, reason
        stream = self.llm.stream([{"role": "user", "content": ans.question}],
                                 self._params(cfg, cfg.normal_max_tokens))
        out, ans.timings.normal = yield from _single(stream, "normal")
        ans.tokens.normal_prompt, ans.tokens.normal_output = len(out.prompt_token_ids), len(out.token_ids)
        ans.text = out.text.strip()

    # ---- helpers -------------------------------------------------------------------------------
    def point_prompts(self, question: str, skeleton: str, points: list[Point], cfg: SoTConfig) -> list[list[int]]:
        """Every point's full prompt as token ids. Public so a benchmark can rebuild a recorded run's lengths."""
        engine, p = self.llm.engine, cfg.prompts
        if cfg.expansion == "continuation":
            # the skeleton conversation, closed, then one instruction turn per point; its KV is the kept
            # skeleton request's (or, for a given skeleton, the common prefix prefilled once)
            convo = skeleton_messages(question, p)[:-1] + [{"role": "assistant", "content": skeleton.rstrip()}]
            return [engine.encode(convo + [
                {"role": "user", "content": fill(p.continuation_template, point_index=pt.index, point=pt.text)},
                {"role": "assistant", "content": point_prefill(pt.index, pt.text, p, continuation=True)}])
                for pt in points]
        sk = format_skeleton(points)
        return [engine.encode(point_messages(question, sk, pt.index, pt.text, p)) for pt in points]

    @staticmethod
    def assemble(points: list[PointAnswer], cfg: SoTConfig) -> str:
        """The final text: the expansions in skeleton order, one a line, labelled "i. point:" or not."""
        if cfg.labels:
            return "\n".join(f"{point_prefill(pa.index, pa.point, cfg.prompts)} {pa.text}".rstrip()
                             for pa in points)
        return "\n".join(pa.text for pa in points if pa.text)

    def skeleton_processors(self, cfg: SoTConfig) -> list:
        """The constrained skeleton's logits processors (new for every request: they keep state): distinct point
        openings, and the list ending where the model would end it."""
        tok, p = self.llm.tokenizer, cfg.prompts
        eos = tok.eos_token_id if tok.eos_token_id is not None else min(self.llm.engine.eos_ids)
        return [DistinctOpenings(tok.decode, p.skeleton_prefill),
                ListEnd(tok, eos, p.skeleton_prefill, cfg.skeleton_min_points, cfg.max_points)]

    def _hold(self, cfg: SoTConfig) -> list:
        """A point's logits processors: its first sentence held (none with point_min_words=0)."""
        if not cfg.point_min_words:
            return []
        tok = self.llm.tokenizer
        return [HoldFirstSentence(tok.decode, [*self.llm.engine.eos_ids, *tok.ids_containing("\n")],
                                  cfg.point_min_words)]

    @staticmethod
    def _params(cfg: SoTConfig, max_tokens: int, row: int = 0) -> SamplingParams:
        seed = None if cfg.seed is None else cfg.seed + row  # distinct streams per point, reproducible
        return SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, seed=seed, max_tokens=max_tokens)

    def _given_points(self, skeleton: list[str] | None) -> list[Point] | None:
        if skeleton is None:
            return None
        if not isinstance(skeleton, list) or not all(isinstance(s, str) for s in skeleton):
            raise ValueError("skeleton must be a list of point texts")
        pts = [s.strip().rstrip(".:;, ") for s in skeleton]
        if not pts or not all(pts):
            raise ValueError("skeleton must be a non-empty list of non-empty points")
        if len(pts) > self.config.max_points:
            raise ValueError(f"skeleton has {len(pts)} points, at most {self.config.max_points}")
        return [Point(i + 1, t) for i, t in enumerate(pts)]

