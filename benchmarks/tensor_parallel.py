"""Tensor parallelism on this machine: TP=1 against TP=N decode steps at batch 1 and 8, with the share of the step
the driver spends in all-reduces (waiting for the slowest rank included) and in the logits, with lm_head whole on
the driver and split over the vocabulary (each rank its rows, the logits all-gathered).

    python -m benchmarks.tensor_parallel                            # random TinyLlama-1.1B shape, TP 1 and 2
    python -m benchmarks.tensor_parallel --model random:llama-7b --tp 1 2 4    # on GPUs

On a CPU the ranks share the cores (each gets cores / N threads), so TP buys nothing there but memory per
process; it is how the engine reaches models larger than one device, and on GPUs it is where it pays.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.common import format_table, sync, write_result

BATCHES, PROMPT, STEPS = (1, 8), 32, 16


def measure(model: str, tp: int, batch: int, lm_head: str = "whole") -> dict:
    from sot_engine.engine import LLM, SamplingParams
    llm = LLM(model, tensor_parallel_size=tp, num_blocks=batch * 8 + 8, block_size=16, max_num_seqs=batch,
              enable_prefix_caching=False, tensor_parallel_lm_head=lm_head)
    eng, dev = llm.engine, llm.engine.device
    reduce_s, logits_s = [0.0], [0.0]
    group = eng.model.group
    if group is not None:
        inner = group.all_reduce

        def timed(t):
            t0 = time.perf_counter()
            inner(t)
            reduce_s[0] += time.perf_counter() - t0
        group.all_reduce = timed
    head = eng.model.compute_logits

    def timed_logits(h):
        t0 = time.perf_counter()
        out = head(h)
        sync(dev)
        logits_s[0] += time.perf_counter() - t0
        return out
    eng.model.compute_logits = timed_logits
    try:
        g = torch.Generator().manual_seed(0)
        params = SamplingParams(temperature=0, max_tokens=STEPS + 4, ignore_eos=True)
        for _ in range(batch):
            eng.add_request(torch.randint(3, 30000, (PROMPT,), generator=g).tolist(), params)
        eng.step()  # the prefill
        for _ in range(2):  # warm-up decodes
            eng.step()
        steps, reduces, logits = [], [], []
        for _ in range(STEPS):
            reduce_s[0] = logits_s[0] = 0.0
            t0 = time.perf_counter()
            eng.step()
            sync(dev)
            steps.append((time.perf_counter() - t0) * 1e3)
            reduces.append(reduce_s[0] * 1e3)
            logits.append(logits_s[0] * 1e3)
        while eng.has_unfinished():
            eng.step()
    finally:
        eng.close()
    med = statistics.median(steps)
    return {"tp": tp, "lm_head": lm_head if tp > 1 else "whole", "batch": batch, "ms_per_step": med, "all_reduce_ms": statistics.median(reduces),
            "all_reduce_share": statistics.median(reduces) / med, "logits_ms": statistics.median(logits),
            "logits_share": statistics.median(logits) / med}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random:tinyllama-1.1b")
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args(argv)
    rows = []
    for tp in args.tp:
        for head in (("whole", "vocab") if tp > 1 else ("whole",)):
            for b in BATCHES:
                rows.append(measure(args.model, tp, b, head))
                print({k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()}, flush=True)
    cols = [("TP", "tp", ""), ("lm_head", "lm_head", ""), ("batch", "batch", ""), ("ms / step", "ms_per_step", ".1f"),
            ("all-reduce ms", "all_reduce_ms", ".1f"), ("all-reduce share", "all_reduce_share", ".0%"),
            ("logits ms", "logits_ms", ".1f"), ("logits share", "logits_share", ".0%")]
    print(format_table(rows, cols))
    from sot_engine.engine.llm_engine import physical_cores
    torch.set_num_threads(physical_cores())  # what the environment line reports: the machine, not the last rank's share
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print("wrote", write_result("tensor_parallel", device, {"model": args.model, "prompt": PROMPT, "steps": STEPS,
                                                           "cores": physical_cores(), "rows": rows}))


if __name__ == "__main__":
    main()
