"""`sot ask | compare | bench`: Skeleton-of-Thought from the command line.

ask      answer one question, streaming (a live view on a terminal, plain lines otherwise, --json: the Answer)
compare  normal decoding, then SoT, on the same question: both answers, latencies and the speed-up
bench    normal vs SoT over a question set (`sot.bench.run_bench`), results written as JSON
train-router  fit the router to labelled questions (`sot.train_router`); the shipped one came from the LIMA labels
serve    an OpenAI-compatible server (`sot.server`): /v1/chat/completions (+ {"sot": "auto"}), /v1/completions
generate plain generation on any model, no SoT (`sot generate --help`; `python -m sot_engine.engine generate`)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import closing
from pathlib import Path

from sot_engine.sot.server.limits import ServerLimits

MODES = ("auto", "sot", "normal")  # sot.driver.MODES; repeated so --help does not import torch
EXPANSIONS = ("paper", "continuation")
WEIGHT_DTYPES = ("fp32", "bf16", "int8", "gguf")  # kernels.weights.WEIGHT_DTYPES, likewise
MATMUL_PRECISIONS = ("fp32", "bf16", "int8")  # kernels.weights.MATMUL_PRECISIONS, likewise
KV_CACHE_DTYPES = ("fp32", "bf16")  # engine.llm_engine.KV_CACHE_DTYPES, likewise
FEATURES = ("text", "hidden", "text+hidden")  # sot.trained_router.FEATURES, likewise
AGAINST = ("engine", "llama.cpp")


def _common() -> argparse.ArgumentParser:
    """Options every subcommand shares: the model and the SoT config. None means SoTConfig's default."""
    p = argparse.ArgumentParser(add_help=False)
    m = p.add_argument_group("model")
    m.add_argument("--model", default="default",
                   help='GGUF file, HF folder, "default" (SmolLM2), "gemma3-270m" (extra gemma3) or "random:<shape>"')
    m.add_argument("--device", default=None)
    m.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16 (default: float32 on CPU)")
    m.add_argument("--weights", default=None, choices=WEIGHT_DTYPES,
                   help="storage of the weight matrices, products and sums staying in --dtype (default: --dtype); "
                        "bf16 / int8 make CPU decode ~2x / ~3x faster for slightly different logits; gguf keeps a "
                        "GGUF file's own quantized types (4-bit, int8) on integer dot products, as llama.cpp does")
    m.add_argument("--matmul-precision", default="fp32", choices=MATMUL_PRECISIONS,
                   help="bf16: bf16 weights and the matmuls round activations to bf16 (on a CPU with AMX, SoT's "
                        "batched point expansion then costs about what one sequence does); int8: int8 weights and "
                        "activations quantized per 32 values, integer dot products (AVX2 / AVX-512 VNNI)")
    m.add_argument("--kv-cache-dtype", default=None, choices=KV_CACHE_DTYPES,
                   help="the K/V pool's dtype (default: --dtype); bf16 on CPU halves KV memory and attention reads")
    m.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="split the model over N processes (gloo on a CPU: the cores are divided; NCCL on N GPUs); "
                        "under torchrun, give the same N as --nproc-per-node")
    s = p.add_argument_group("SoT")
    s.add_argument("--mode", choices=MODES, default="auto", help="auto: the router decides (default)")
    s.add_argument("--router", default="trained",
                   help='what decides in auto mode: "trained" (default: the classifier trained on the SoT authors\' '
                        'labels), "rules", or a router file from `sot train-router`')
    s.add_argument("--expansion", choices=EXPANSIONS, default=None,
                   help="paper: the paper's point prompt per point; continuation: reuse the skeleton's KV")
    s.add_argument("--no-labels", action="store_true", help='drop the "i. point:" label before each expansion')
    s.add_argument("--max-points", type=int, default=None)
    s.add_argument("--no-skeleton-grammar", action="store_true",
                   help="decode the skeleton freely, ended by stop rules (the grammar keeps it a list of 3-10 points)")
    s.add_argument("--point-min-words", type=int, default=None,
                   help="a point opens with a complete sentence of at least this many words (default 4; 0: off)")
    s.add_argument("--point-max-sentences", type=int, default=None,
                   help="a point ends after this many sentences (default 2, as the paper's prompt asks; 0: no limit)")
    s.add_argument("--skeleton-max-tokens", type=int, default=None)
    s.add_argument("--point-max-tokens", type=int, default=None)
    s.add_argument("--normal-max-tokens", type=int, default=None)
    s.add_argument("--temperature", type=float, default=None, help="points and normal decoding (skeleton: greedy)")
    s.add_argument("--seed", type=int, default=None)
    return p


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sot", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    common = _common()
    a = sub.add_parser("ask", parents=[common], help="answer one question, streaming")
    a.add_argument("question")
    a.add_argument("--json", action="store_true", help="print only the Answer as JSON")
    c = sub.add_parser("compare", parents=[common], help="normal decoding vs SoT on one question")
    c.add_argument("question")
    c.add_argument("--json", action="store_true", help="print both answers as one JSON object")
    c.add_argument("--against", choices=AGAINST, default="engine",
                   help="whose normal decoding SoT races: this engine's (default), or llama.cpp's on the same GGUF "
                        "file, greedy, with the same token cap (the llamacpp extra)")
    b = sub.add_parser("bench", parents=[common], help="normal vs SoT over a question set")
    b.add_argument("--dataset", default="vicuna80", help='"vicuna80" or a JSONL file (text, category)')
    b.add_argument("--limit", type=int, default=None, help="first N questions (after --categories)")
    b.add_argument("--categories", nargs="+", default=None, help="only these categories")
    b.add_argument("--out", default=None, help="output folder (default: $SOT_BENCH_RESULTS, else benchmarks/results when run from a checkout, else ./sot-bench-results; then /<device>)")
    b.add_argument("--name", default=None, help="file name stem (default: sot_<dataset>_<mode>_<expansion>)")
    b.add_argument("--against", choices=AGAINST, default="engine",
                   help="llama.cpp: also time llama.cpp's normal decoding of each question on the same GGUF file "
                        "(greedy, the same token cap; the llamacpp extra) and report SoT against it per category")
    b.add_argument("--warm", action="store_true",
                   help="time each answer as a running server gives it: right after an SoT answer to an unrelated "
                        "question (the prompt templates' prefix cached, nothing else). Default: each answer alone, "
                        "no prefix cache (as the paper measures)")
    v = sub.add_parser("serve", parents=[common], help="OpenAI-compatible HTTP server")
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--served-model-name", nargs="+", default=None,
                   help="names clients use in 'model' (default: the model's own name)")
    v.add_argument("--max-num-seqs", type=int, default=64, help="sequences decoded together at most")
    v.add_argument("--no-prefix-caching", action="store_true", help="prefill every prompt in full")
    v.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="tokens a step computes at most (default: 512 on a CPU, 4096 on a GPU)")
    v.add_argument("--no-chunked-prefill", action="store_true",
                   help="prefill a prompt whole, in a step of its own (default: in chunks beside the decodes)")
    v.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer <key>' on /v1/* (default: $SOT_API_KEY; unset: no key)")
    v.add_argument("--no-strict-json", action="store_true",
                   help="read JSON schemas as plain JSON Schema (objects open to undeclared keys) unless a request "
                        "says strict: true; default: strict, as OpenAI and vLLM")
    lim = v.add_argument_group("limits (each refuses with an OpenAI-shaped error instead of queueing or growing)")
    lim.add_argument("--max-body-bytes", type=int, default=ServerLimits.max_body_bytes, help="413 past it")
    lim.add_argument("--max-json-depth", type=int, default=ServerLimits.max_json_depth, help="400 past it")
    lim.add_argument("--max-n", type=int, default=ServerLimits.max_n, help="choices per request (n x prompts)")
    lim.add_argument("--max-messages", type=int, default=ServerLimits.max_messages, help="messages per chat request")
    lim.add_argument("--max-waiting", type=int, default=ServerLimits.max_waiting,
                     help="requests queued before admission; past it 429 at once")
    lim.add_argument("--request-timeout", type=float, default=ServerLimits.request_timeout,
                     help="seconds; a generation then ends with finish_reason 'length', a SoT answer with 504 (0: none)")
    t = sub.add_parser("train-router", help="fit the trained router to a label;request file (sot.train_router)")
    t.add_argument("--labels", required=True, help="a label;request CSV, e.g. the SoT authors' LIMA labels")
    t.add_argument("--features", choices=FEATURES, default="text",
                   help="text: hashed word n-grams; hidden: the model's mean hidden state of the question; both")
    t.add_argument("--veto", choices=("auto", "on", "off"), default="auto",
                   help="let the rules' normal-decoding verdicts stand (auto: cross-validation decides)")
    t.add_argument("--model", default="default", help="the model whose hidden states are read (hidden features)")
    t.add_argument("--out", required=True, help="the .safetensors file to write")
    g = sub.add_parser("generate", add_help=False, help="plain generation, no SoT (sot generate --help)")
    g.add_argument("rest", nargs=argparse.REMAINDER)
    return ap


def _dtype(name: str | None):
    if name is None:
        return None
    import torch
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}: use float32, float16 or bfloat16")
    return dt


def build(args: argparse.Namespace, **engine_args):
    """The SoT on the chosen model, built once per command."""
    from sot_engine.engine import LLM
    from sot_engine.sot.driver import SoT, SoTConfig
    fields = ("expansion", "max_points", "skeleton_max_tokens", "point_max_tokens", "normal_max_tokens",
              "temperature", "seed", "point_min_words", "point_max_sentences")
    kw = {f: getattr(args, f) for f in fields if getattr(args, f) is not None}
    if args.no_labels:
        kw["labels"] = False
    if args.no_skeleton_grammar:
        kw["constrained_skeleton"] = False
    cfg = SoTConfig(**kw)  # checked before the (slow) model load
    return SoT(LLM(args.model, device=args.device, dtype=_dtype(args.dtype), weight_dtype=args.weights,
                   matmul_precision=args.matmul_precision, kv_cache_dtype=args.kv_cache_dtype,
                   tensor_parallel_size=args.tensor_parallel_size, **engine_args), cfg, router=args.router)


def _check_question(q: str) -> str:
    if not q.strip():  # before loading the model; the driver says the same
        raise ValueError("empty question: ask something (the question is empty or only whitespace)")
    return q


def ask(args: argparse.Namespace) -> int:
    from sot_engine.sot.view import LiveView, PlainView
    q = _check_question(args.question)
    sot = build(args)
    if args.json:
        print(json.dumps(sot.answer(q, mode=args.mode).to_dict()))
        return 0
    prefill = sot.config.prompts.skeleton_prefill
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.live import Live
        view = LiveView(q, prefill)
        with closing(sot.stream(q, mode=args.mode)) as events, \
                Live(view.render(), console=Console(), refresh_per_second=12) as live:
            for ev in events:
                view.update(ev)
                live.update(view.render())
    else:
        plain = PlainView(sys.stdout, prefill)
        with closing(sot.stream(q, mode=args.mode)) as events:
            for ev in events:
                plain.update(ev)
    return 0


def llama_cpp_normal(args: argparse.Namespace, sot):
    """`question -> {seconds, tokens, text}`: llama.cpp's normal greedy decoding of the question on the model's GGUF
    file, the engine's prompt ids (its chat template) and normal token cap; None unless --against llama.cpp."""
    if args.against != "llama.cpp":
        return None
    import torch
    from sot_engine.engine.loader import gguf_file
    from sot_engine.sot.llamacpp import LlamaCpp, require
    require()  # before anything is timed
    lc = LlamaCpp(gguf_file(args.model), torch.get_num_threads())
    eng, cap = sot.llm.engine, sot.config.normal_max_tokens

    def run(question: str) -> dict:
        ids = eng.encode([{"role": "user", "content": question}])
        toks, seconds = lc.generate(ids, cap, set(eng.eos_ids))
        return {"seconds": seconds, "tokens": len(toks), "text": eng.tokenizer.decode(
            [t for t in toks if t not in eng.eos_ids]).strip()}
    return run


def compare(args: argparse.Namespace) -> int:
    from sot_engine.sot.view import summary_line
    q = _check_question(args.question)
    sot = build(args)
    baseline = llama_cpp_normal(args, sot)
    print("normal decoding ...", file=sys.stderr, flush=True)
    normal = sot.answer(q, mode="normal")
    lc = None
    if baseline is not None:
        print("llama.cpp normal decoding ...", file=sys.stderr, flush=True)
        lc = baseline(q)
    print(f"SoT ({args.mode}) ...", file=sys.stderr, flush=True)
    ans = sot.answer(q, mode=args.mode)
    speedup = normal.timings.total / ans.timings.total
    if args.json:
        extra = {"llama_cpp": lc, "speedup_vs_llama_cpp": lc["seconds"] / ans.timings.total} if lc else {}
        print(json.dumps({"question": q, "normal": normal.to_dict(), "sot": ans.to_dict(), "speedup": speedup,
                          **extra}))
        return 0
    if lc is not None:
        print(f"== llama.cpp normal decoding: {lc['seconds']:.2f} s, {lc['tokens']} tokens ==")
        print(lc["text"] + "\n")
    for title, a in (("normal decoding", normal), (f"SoT ({args.mode})", ans)):
        print(f"== {title}: {a.mode}, {a.timings.total:.2f} s, {a.tokens.output} tokens ==")
        print(a.text)
        print(summary_line(a) + "\n")
    print(f"normal {normal.timings.total:.2f} s, {normal.tokens.output} tokens | "
          f"SoT {ans.timings.total:.2f} s, {ans.tokens.output} tokens ({ans.mode}: {ans.reason}) | "
          f"speed-up {speedup:.2f}x" + (f" | llama.cpp normal {lc['seconds']:.2f} s: SoT "
                                         f"{lc['seconds'] / ans.timings.total:.2f}x sooner" if lc else ""))
    return 0


def bench(args: argparse.Namespace) -> int:
    from sot_engine.sot.bench import WARM_QUESTION, load_dataset, run_bench
    load_dataset(args.dataset)  # a bad name fails before the model loads
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    # without --warm each question costs what it costs alone (as the paper measures): no prefix cache
    sot = build(args, enable_prefix_caching=args.warm)
    path, _ = run_bench(sot, args.dataset, limit=args.limit, categories=args.categories, mode=args.mode,
                        name=args.name, out_dir=Path(args.out) if args.out else None,
                        baseline=llama_cpp_normal(args, sot), warm=WARM_QUESTION if args.warm else None)
    print(f"wrote {path.with_suffix('.jsonl')} (one line per question) and {path} (summary)")
    return 0


def train_router(args: argparse.Namespace) -> int:
    from sot_engine.sot.train_router import read_labels, train
    read_labels(args.labels)  # a bad file fails before the model loads
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out must name a .safetensors file, got {out}")
    llm = None
    if "hidden" in args.features:
        from sot_engine.engine import LLM
        llm = LLM(args.model)  # fp32: the features the router will read at its default precision
    veto = {"auto": None, "on": True, "off": False}[args.veto]
    print(f"training a {args.features} router on {args.labels} (hyperparameters by cross-validation on it)")
    model = train(args.labels, args.features, llm, veto,
                  model_name=None if llm is None else llm.engine.model_name)
    out.parent.mkdir(parents=True, exist_ok=True)
    model.save(out)
    c = model.meta["chosen"]
    print(f"chose l2={c['l2']:g} balanced={c['balanced']} veto={c['veto']}: cross-validated balanced accuracy "
          f"{c['cv_balanced_accuracy']:.4f} (accuracy {c['cv_accuracy']:.4f}); wrote {out}")
    return 0


def serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn
        from sot_engine.sot.server import create_app
    except ImportError as e:
        raise ValueError(f"the server needs its extra ({e.name} is missing): bash scripts/install.sh server") from None
    limits = ServerLimits(max_body_bytes=args.max_body_bytes, max_json_depth=args.max_json_depth, max_n=args.max_n,
                          max_messages=args.max_messages, max_waiting=args.max_waiting,
                          request_timeout=args.request_timeout)  # checked before the model load
    sot = build(args, max_num_seqs=args.max_num_seqs, enable_prefix_caching=not args.no_prefix_caching,
                max_num_batched_tokens=args.max_num_batched_tokens, enable_chunked_prefill=not args.no_chunked_prefill)
    key = args.api_key or os.environ.get("SOT_API_KEY") or None
    app = create_app(sot.llm, served_names=args.served_model_name, sot_config=sot.config, router=sot.router,
                     strict_json=not args.no_strict_json, api_key=key, limits=limits)
    print(f"serving {app.state.server.names} at http://{args.host}:{args.port}/v1"
          + (" (an API key is required)" if key else ""), file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["generate"]:  # the engine's own CLI, under this command
        from sot_engine.engine.__main__ import main as generate
        return generate(argv, prog="sot")
    args = parser().parse_args(argv)
    try:
        return {"ask": ask, "compare": compare, "bench": bench, "serve": serve,
                "train-router": train_router}[args.cmd](args)
    except (ValueError, FileNotFoundError, ImportError) as e:  # ImportError: an optional extra not installed
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
