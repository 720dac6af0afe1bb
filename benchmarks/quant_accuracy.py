"""What quantization costs in accuracy on the embedded SmolLM2, against float32 weights (the file's values widened,
float32 activations: the reference), for our narrow storages and for llama.cpp on the same file:

- the largest |logit difference| at each prompt's last token;
- greedy agreement over `--tokens` decoded tokens: how many come before the first difference, and how many
  positions hold the same token.

    python -m benchmarks.quant_accuracy              # decode_cpu's 8 questions, 64 tokens
    python -m benchmarks.quant_accuracy --no-llama-cpp
    python -m benchmarks.quant_accuracy --quick      # 2 prompts, 8 tokens, gguf only, no llama.cpp (a smoke run)

Ours decodes all prompts as one batch (the fused decode loop); llama.cpp as parallel sequences of one batch
(`sot_engine.sot.llamacpp`, the `llamacpp` extra). Results: benchmarks/results/cpu/quant_accuracy.json.
"""
from __future__ import annotations

import argparse

import torch

from benchmarks.common import write_result
from benchmarks.decode_cpu import QUESTIONS
from sot_engine.sot import llamacpp
from sot_engine.engine import LLM, SamplingParams
from sot_engine.engine.loader import default_model_path
from tests.conftest import prompt_logits

VARIANTS = {"gguf": {"weight_dtype": "gguf"}, "int8-matmul": {"matmul_precision": "int8"},
            "int8": {"weight_dtype": "int8"}, "bf16": {"weight_dtype": "bf16"}}


def agreement(got: list[int], want: list[int]) -> tuple[int, int]:
    """(tokens before the first difference, positions with the same token)"""
    first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    return first, sum(a == b for a, b in zip(got, want))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--variants", default="gguf,int8-matmul")
    ap.add_argument("--no-llama-cpp", action="store_true")
    ap.add_argument("--quick", action="store_true", help="2 prompts, 8 tokens, gguf only, no llama.cpp")
    args = ap.parse_args()
    questions = QUESTIONS[:2] if args.quick else QUESTIONS
    if args.quick:
        args.tokens, args.variants, args.no_llama_cpp = 8, "gguf", True
    chats = [[{"role": "user", "content": q}] for q in questions]
    greedy = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    ref = LLM("default", device="cpu", dtype=torch.float32)
    ids = [ref.engine.encode(c) for c in chats]
    ref_logits = [prompt_logits(ref, i) for i in ids]
    ref_tokens = [o.token_ids for o in ref.generate(ids, greedy)]
    rows = []

    def record(name: str, logits: list[torch.Tensor], tokens: list[list[int]], **extra) -> None:
        diffs = [float((lg.float() - r).abs().max()) for lg, r in zip(logits, ref_logits)]
        agree = [agreement(t, r) for t, r in zip(tokens, ref_tokens)]
        row = {"variant": name, **extra, "max_logit_diff": max(diffs), "logit_diff_per_prompt": diffs,
               "greedy_first_difference": [a for a, _ in agree], "greedy_same_positions": [b for _, b in agree],
               "greedy_same_fraction": sum(b for _, b in agree) / (args.tokens * len(ids))}
        rows.append(row)
        print({k: row[k] for k in ("variant", "max_logit_diff", "greedy_first_difference", "greedy_same_fraction")},
              flush=True)

    for name in args.variants.split(","):
        llm = LLM("default", device="cpu", dtype=torch.float32, **VARIANTS[name])
        record(name, [prompt_logits(llm, i) for i in ids], [o.token_ids for o in llm.generate(ids, greedy)])
        del llm
    if not args.no_llama_cpp:
        if not llamacpp.available():
            print("llama-cpp-python is not installed (pip install 'sot-engine[llamacpp]'): no llama.cpp row")
        else:
            lc = llamacpp.LlamaCpp(default_model_path(), torch.get_num_threads())
            logits = [torch.from_numpy(lg) for lg in lc.prefill(ids)]
            tokens, _ = lc.greedy(ids, args.tokens)
            record("llama.cpp", logits, tokens, llama_cpp=lc.version, system_info=lc.system_info)
            lc.close()
    print("wrote", write_result("quant_accuracy_quick" if args.quick else "quant_accuracy", torch.device("cpu"), {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF; reference: its values widened to float32)",
        "tokens": args.tokens, "prompts": questions, "rows": rows}))


if __name__ == "__main__":
    main()
