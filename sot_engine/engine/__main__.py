"""`sot generate "question"` (or `python -m sot_engine.engine generate`): plain generation on any model the engine
loads."""
from __future__ import annotations

import argparse
import json
import sys
import time

from sot_engine.kernels.weights import MATMUL_PRECISIONS, WEIGHT_DTYPES


def main(argv: list[str] | None = None, prog: str = "python -m sot_engine.engine") -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="answer prompts (chat template applied unless --raw)")
    g.add_argument("prompts", nargs="+", help="one or more prompts, answered as one batch")
    g.add_argument("--model", default="default",
                   help='GGUF file, HF folder, "default" (SmolLM2), "gemma3-270m" (extra gemma3) or "random:<shape>"')
    g.add_argument("--device", default=None)
    g.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16 (default: float32 on CPU)")
    g.add_argument("--weights", default=None, choices=WEIGHT_DTYPES,
                   help="storage of the weight matrices, products and sums staying in --dtype (default: --dtype); "
                        "bf16 / int8 make CPU decode ~2x / ~3x faster for slightly different logits")
    g.add_argument("--matmul-precision", default="fp32", choices=MATMUL_PRECISIONS,
                   help="bf16: bf16 weights and the matmuls round activations to bf16 (on a CPU with AMX, batched "
                        "decode steps cost about what one row does); int8: int8 weights and activations quantized "
                        "per 32 values, integer dot products")
    g.add_argument("--kv-cache-dtype", default=None, choices=("fp32", "bf16"),  # engine.llm_engine.KV_CACHE_DTYPES
                   help="the K/V pool's dtype (default: --dtype); bf16 on CPU halves KV memory and attention reads")
    g.add_argument("--backend", default=None, help="kernel backend (default: best for the device)")
    g.add_argument("--max-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--system", default=None, help="system message for the chat template")
    g.add_argument("--raw", action="store_true", help="send the prompt as plain text, no chat template")
    g.add_argument("--json", action="store_true", help="print one JSON object per answer")
    args = ap.parse_args(argv)

    from sot_engine.engine import LLM, SamplingParams
    try:
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                seed=args.seed, max_tokens=args.max_tokens, stop=args.stop)
        llm = LLM(args.model, device=args.device, dtype=args.dtype, backend=args.backend, weight_dtype=args.weights,
                  matmul_precision=args.matmul_precision, kv_cache_dtype=args.kv_cache_dtype)
        if args.raw or llm.engine.chat_template is None:
            prompts = list(args.prompts)
        else:
            sys_msg = [{"role": "system", "content": args.system}] if args.system else []
            prompts = [sys_msg + [{"role": "user", "content": p}] for p in args.prompts]
        if len(prompts) == 1 and not args.json:  # one answer: stream it as it grows
            t0 = time.perf_counter()
            for d in llm.stream(prompts, params):
                print(d.text, end="", flush=True)
                if d.finished:
                    out = d.output
            n = len(out.token_ids)
            dt = time.perf_counter() - t0
            print(f"\n[{n} tokens in {dt:.2f} s, {n / dt:.1f} tok/s, finish: {out.finish_reason}]", file=sys.stderr)
            return 0
        for o in llm.generate(prompts, params):
            if args.json:
                print(json.dumps({"text": o.text, "finish_reason": o.finish_reason,
                                  "tokens": len(o.token_ids), "latency_s": o.latency}))
            else:
                print(o.text + "\n")
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
