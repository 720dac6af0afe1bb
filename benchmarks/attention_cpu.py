"""CPU decode steps against context length: what the C++ attention costs, with and without its parts.

    python -m benchmarks.attention_cpu                  # SmolLM2 gguf; contexts 64-1024; batch 1 and 8 forks
    python -m benchmarks.attention_cpu --quick          # tiny random model, seconds (a smoke run)

A batch of B sequences whose prompts share a prefix of `ctx` tokens (a fork, as SoT's points are: they share their
prefix blocks through the prefix cache), then decode steps through `LLMEngine.step`. Every step alternates
between the attention's parts on and off (`SOT_NO_ATTN_PARTS=1`: one task a (sequence, KV head), as before
csrc/cpu/attention.cpp cut the batch into parts: a shared prefix once for its group, long contexts in chunks), so
the two see the same machine; per setting the median step and the median of the fused loop's own timer of its
RoPE + store + attention phases (`DecodeLayers.attention_seconds`); the fastest of `--rounds` rounds is kept.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import time

import torch

from benchmarks.common import write_result
from sot_engine.engine import LLM, SamplingParams

SETTINGS = {"parts": None, "tasks": "1"}  # the value of SOT_NO_ATTN_PARTS


def run(llm: LLM, batch: int, ctx: int, steps: int) -> dict[str, tuple[float, float]]:
    """{setting: (ms a step, ms of attention a step)}, medians over the steps that ran it."""
    eng = llm.engine
    rng = random.Random(ctx)
    vocab = eng.model.cfg.vocab_size
    prefix = [rng.randrange(vocab // 8, vocab - batch) for _ in range(ctx)]
    prompts = [prefix[:-1] + [prefix[-1] + i] for i in range(batch)]  # the last token apart: B sequences
    params = SamplingParams(temperature=0, max_tokens=steps + 4, ignore_eos=True)
    seqs = [eng.add_request(p, params) for p in prompts]
    while any(s.num_output_tokens == 0 for s in seqs):  # prefill (chunked or not)
        eng.step()
    eng.step()
    step = eng.model.decode_step
    times: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in SETTINGS}
    try:
        for i in range(steps):
            key = list(SETTINGS)[i % len(SETTINGS)]
            if SETTINGS[key] is None:
                os.environ.pop("SOT_NO_ATTN_PARTS", None)
            else:
                os.environ["SOT_NO_ATTN_PARTS"] = SETTINGS[key]
            a0 = step.attention_seconds
            t0 = time.perf_counter()
            eng.step()
            times[key][0].append(time.perf_counter() - t0)
            times[key][1].append(step.attention_seconds - a0)
    finally:
        os.environ.pop("SOT_NO_ATTN_PARTS", None)
    while eng.has_unfinished():
        eng.step()
    for s in seqs:
        eng.release(s)
    return {k: (1000 * statistics.median(t), 1000 * statistics.median(a)) for k, (t, a) in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="64,256,512,1024")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--steps", type=int, default=24, help="decode steps per (batch, context), split between settings")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--weights", default="gguf")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    model = "random:tiny" if args.quick else "default"
    contexts = [int(c) for c in args.contexts.split(",")] if not args.quick else [64, 256]
    kw = {"weight_dtype": args.weights} if not args.quick else {}
    llm = LLM(model, device="cpu", dtype=torch.float32, kv_cache_memory=512 << 20, **kw)
    if llm.engine.model.backend.name != "cpp":
        ap.error("the C++ backend is not built: nothing to time")
    best: dict[tuple[int, int], dict] = {}
    for r in range(args.rounds):
        for b in map(int, args.batches.split(",")):
            for ctx in contexts:
                got = run(llm, b, ctx, args.steps)
                row = {"batch": b, "context": ctx}
                for k, (ms, att) in got.items():
                    row |= {f"ms_per_step_{k}": ms, f"attention_ms_{k}": att}
                key = (b, ctx)
                if key not in best or row["ms_per_step_parts"] < best[key]["ms_per_step_parts"]:
                    best[key] = row
                print(f"round {r + 1}/{args.rounds}", row, flush=True)
    rows = list(best.values())
    name = "attention_cpu_quick" if args.quick else "attention_cpu"
    label = "SmolLM2-135M-Instruct" if model == "default" else model
    print("wrote", write_result(name, torch.device("cpu"), {
        "model": label, "weights": "fp32" if args.quick else args.weights, "steps": args.steps, "rounds": args.rounds,
        "threads": torch.get_num_threads(), "rows": rows}))


if __name__ == "__main__":
    main()
