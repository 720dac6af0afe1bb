"""What a grammar costs a CPU decode step, on the embedded SmolLM2 (the default backend).

    python -m benchmarks.guided_cpu            # writes benchmarks/results/cpu/guided_cpu.json
    python -m benchmarks.guided_cpu --quick    # 12 steps, one round (a smoke run)

Cases, each a batch decoded step by step through `LLMEngine.step`, with the constraints and without them (the
same prompts; runs alternated, the fastest of --rounds kept):
- skeleton: SoT's skeleton request alone, under its Lark grammar with its logits processors (DistinctOpenings,
  ListEnd);
- points: 8 point rows under the HoldFirstSentence logits processor (the steps while any row is still held);
- json in 8: one JSON-schema row among 7 plain ones (the server's structured output in a busy batch).
Per step (while any row is still constrained): the mean time in the mask (`GuidedDecoder.apply`: llguidance's
mask and applying it, paid only on the steps where a row's sampled token was rejected) and in logits processors,
against the step's median time with and without the constraints. The goal: under 5% of the step.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from benchmarks.common import write_result
from sot_engine.engine import LLM, GuidedDecoding, SamplingParams
from sot_engine.sot.driver import SoT, SoTConfig
from sot_engine.sot.grammar import HoldFirstSentence, skeleton_grammar
from sot_engine.sot.prompts import DEFAULT_PROMPTS, point_messages, skeleton_messages

QUESTION = "What are the most effective ways to deal with stress?"
POINTS = ["Exercise regularly", "Sleep well", "Talk to friends", "Meditate daily", "Eat a balanced diet",
          "Limit caffeine", "Take short breaks", "Spend time outdoors"]
SCHEMA = {"type": "object", "properties": {"advice": {"type": "string", "maxLength": 200},
                                           "steps": {"type": "array", "items": {"type": "string"}, "maxItems": 5}},
          "required": ["advice", "steps"]}


Row = tuple[object, Callable[[bool], SamplingParams]]  # (prompt, constrained? -> fresh params)


def cases(llm: LLM, steps: int) -> dict[str, list[Row]]:
    """name -> rows of (prompt, params factory): the constraint's stateful parts are new for every run."""
    def plain(n: int) -> SamplingParams:
        return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)

    def skeleton(on: bool) -> SamplingParams:
        if not on:
            return plain(steps)
        return SamplingParams(temperature=0, max_tokens=steps,
                              guided=GuidedDecoding(grammar=skeleton_grammar("1.", 3, 10)),
                              logits_processors=SoT(llm).skeleton_processors(SoTConfig()))
    enders = [*llm.engine.eos_ids, *llm.tokenizer.ids_containing("\n")]

    def point(on: bool) -> SamplingParams:
        hold = [HoldFirstSentence(llm.tokenizer.decode, enders, 4)] if on else []
        return SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True, logits_processors=hold)

    def json_row(on: bool) -> SamplingParams:
        return SamplingParams(temperature=0, max_tokens=steps, guided=GuidedDecoding(json_schema=SCHEMA)) if on \
            else plain(steps)
    sk = "\n".join(f"{i + 1}. {p}" for i, p in enumerate(POINTS))
    others = [([{"role": "user", "content": f"Tip {i} for {p.lower()}?"}], lambda on: plain(steps))
              for i, p in enumerate(POINTS[:7])]
    return {"skeleton": [(skeleton_messages(QUESTION), skeleton)],
            "points": [(point_messages(QUESTION, sk, i + 1, p, DEFAULT_PROMPTS), point) for i, p in enumerate(POINTS)],
            "json in 8": [([{"role": "user", "content": QUESTION + " Reply in JSON."}], json_row), *others]}


def constrained_rows(eng, params: list[SamplingParams]) -> int:
    """Rows still under a constraint: a grammar's matcher, or a logits processor not yet let go."""
    held = len(eng._matchers)
    return held + sum(any(not getattr(f, "free", False) for f in p.logits_processors) and p.guided is None
                      for p in params if any(s.params is p and not s.is_finished for s in eng.requests.values()))


def run(llm: LLM, rows: list[Row], on: bool) -> list[dict]:
    """Decode the rows to the end; per decode step: ms in all, in the mask, in logits processors."""
    eng = llm.engine
    spent = {"mask": 0.0, "processors": 0.0}
    apply, process = eng.guided.apply, eng._process_logits

    def timed(key, fn):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[key] += time.perf_counter() - t0
        return wrapper
    eng.guided.apply, eng._process_logits = timed("mask", apply), timed("processors", process)
    params = [make(on) for _, make in rows]
    try:
        for (prompt, _), p in zip(rows, params):
            eng.add_request(prompt, p)
        eng.step()  # the prefill
        out = []
        while eng.has_unfinished():
            held = constrained_rows(eng, params)
            spent.update(mask=0.0, processors=0.0)
            t0 = time.perf_counter()
            eng.step()
            out.append({"ms": 1000 * (time.perf_counter() - t0), "mask_ms": 1000 * spent["mask"],
                        "processors_ms": 1000 * spent["processors"], "constrained_rows": held})
        return out
    finally:
        eng.guided.apply, eng._process_logits = apply, process
        for r in list(eng.requests.values()):
            eng.release(r)


def measure(llm: LLM, rows: list[Row], rounds: int) -> dict:
    best: dict = {}
    for _ in range(rounds):
        on, off = run(llm, rows, True), run(llm, rows, False)
        held = [s for s in on if s["constrained_rows"]]  # the steps a constraint was applied in
        if not held:
            continue
        n = len(held)
        r = {"steps": n, "constrained_rows": max(s["constrained_rows"] for s in held),
             "step_ms": statistics.median(s["ms"] for s in held),
             "unconstrained_step_ms": statistics.median(s["ms"] for s in off[:n]),
             # means: a guided row pays the mask only on the steps its sampled token is rejected
             "mask_ms": statistics.fmean(s["mask_ms"] for s in held),
             "processors_ms": statistics.fmean(s["processors_ms"] for s in held),
             "masked_steps": sum(s["mask_ms"] > 0 for s in held)}
        r["share"] = (r["mask_ms"] + r["processors_ms"]) / r["step_ms"]
        if not best or r["step_ms"] < best["step_ms"]:
            best = r
    return best


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run: 12 steps, one round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=48)
    args = ap.parse_args(argv)
    steps, rounds = (12, 1) if args.quick else (args.steps, args.rounds)
    llm = LLM("default", enable_prefix_caching=False)
    results = {}
    for name, rows in cases(llm, steps).items():
        run(llm, rows, True)  # warm: grammars compiled, the tokenizer view built
        results[name] = measure(llm, rows, rounds)
        r = results[name]
        print(f"{name:10s} rows {len(rows)}, constrained {r['constrained_rows']}, {r['steps']:3d} steps: step "
              f"{r['step_ms']:.2f} ms (unconstrained {r['unconstrained_step_ms']:.2f}), mask {r['mask_ms']:.3f} ms, "
              f"processors {r['processors_ms']:.3f} ms: {100 * r['share']:.1f}% of the step")
    path = write_result("guided_cpu_quick" if args.quick else "guided_cpu", llm.engine.device,
                        {"model": llm.engine.model_name, "backend": llm.engine.backend.name, "rounds": rounds,
                         "steps": steps, "cases": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
