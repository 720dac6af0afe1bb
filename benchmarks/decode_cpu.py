"""CPU decode ms/step against batch size for the embedded SmolLM2, per kernel backend and weight storage,
next to transformers.

    python -m benchmarks.decode_cpu            # cpp backend, every storage variant below; batch 1-16; 32 steps
    python -m benchmarks.decode_cpu --quick    # tiny random model, seconds (a smoke run)
    python -m benchmarks.decode_cpu --no-hf --backends torch,cpp --weights fp32   # backends side by side

Ours: B chat prompts prefilled, then decode steps through `LLMEngine.step`, timed one by one (median); each
(configuration, batch) once per round, the rounds interleaved, the fastest round kept (`--rounds`).
Every weight matmul is timed too: the `model.linear` calls from Python, and inside the cpp backend's one-call
decode layer loop its matmul phases (each up to the barrier that ends it), which that loop times itself.
"bf16-matmul": bf16 weights at bf16 matmul precision (`LLM(matmul_precision="bf16")`: AMX where the CPU has it);
"int8-matmul": int8 weights at int8 matmul precision (`LLM(matmul_precision="int8")`: integer dot products);
"gguf": the file's own Q4_1 / Q8_0 weights on integer dot products (`LLM(weight_dtype="gguf")`);
"+kv-bf16": a bf16 K/V pool (`kv_cache_dtype="bf16"`).
"Outside matmuls" is the share of the step spent in everything else (attention, norms, Python, sampling,
scheduling). Each row records the kernel variant and the instruction set the integer kernels ran on (`isa`;
`SOT_CPU_VARIANT=avx2` runs what an AVX2-only machine runs).
`--llama-cpp` adds llama.cpp on the same file and prompt ids (`sot_engine.sot.llamacpp`, the `llamacpp` extra): a step is
one `llama_decode` of B tokens, one per parallel sequence, plus the argmaxes. Transformers (fp32 only):
`generate` on the same left-padded batch, (time for prefill + N tokens - time for prefill + 1 token)
/ (N - 1).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.common import copy_bandwidth, write_result
from sot_engine.engine import LLM, SamplingParams

QUESTIONS = [
    "How can I improve my time management skills?",
    "What are the most effective ways to deal with stress?",
    "What are the main differences between Python and JavaScript programming languages?",
    "How can I increase my productivity while working from home?",
    "Can you explain the basics of quantum computing?",
    "What are the differences between plant-based and animal-based protein sources?",
    "How can I develop my critical thinking skills?",
    "What are the major challenges faced by the education sector today?",
]


def prompts(batch: int) -> list[str]:
    return [QUESTIONS[i % len(QUESTIONS)] for i in range(batch)]


def ours(llm: LLM, batch: int, steps: int) -> dict:
    eng = llm.engine
    chats = [[{"role": "user", "content": q}] for q in prompts(batch)] if eng.chat_template else \
        [list(range(1, 40 + i)) for i in range(batch)]
    params = SamplingParams(temperature=0, max_tokens=steps + 1, ignore_eos=True)
    seqs = [eng.add_request(c, params) for c in chats]
    eng.step()  # prefill
    model, inner, in_matmul = eng.model, eng.model.linear, [0.0]

    def timed_linear(x, w):  # ~0.3 us per call of its own, ~120 calls a step
        t0 = time.perf_counter()
        y = inner(x, w)
        in_matmul[0] += time.perf_counter() - t0
        return y

    def fused_matmul() -> float:  # seconds so far in the matmuls of the one-call decode loop, if it runs
        return model.decode_step.matmul_seconds if model.decode_step is not None else 0.0

    model.linear = timed_linear
    times, matmul = [], []
    try:
        for _ in range(steps):
            in_matmul[0], fused0 = 0.0, fused_matmul()
            t0 = time.perf_counter()
            eng.step()
            times.append(time.perf_counter() - t0)
            matmul.append(in_matmul[0] + fused_matmul() - fused0)
    finally:
        model.linear = inner
    while eng.has_unfinished():
        eng.step()
    for s in seqs:
        eng.release(s)
    step, mm = statistics.median(times), statistics.median(matmul)
    return {"ms_per_step": 1000 * step, "matmul_ms": 1000 * mm, "outside_matmul": max(0.0, 1 - mm / step)}


def transformers_ms(path, tok_chats, batch: int, steps: int) -> float | None:
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        return None
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    width = max(len(c) for c in tok_chats[:batch])
    ids = torch.tensor([[2] * (width - len(c)) + c for c in tok_chats[:batch]])
    mask = (torch.arange(width)[None, :] >= (width - torch.tensor([len(c) for c in tok_chats[:batch]]))[:, None]).long()

    def run(n: int) -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=2)
        return time.perf_counter() - t0

    run(2)
    return 1000 * (run(steps) - run(1)) / (steps - 1)


def _cpp_isa() -> str:
    """The kernel variant the cpp backend runs (csrc/cpu/target.h) and the integer kernels' instruction set."""
    from sot_engine.kernels import _cpp
    return f"{_cpp.VARIANT} (int8: {_cpp.int8_isa()})"


def main() -> None:
    from sot_engine.kernels.weights import WEIGHT_DTYPES
    variants = (*WEIGHT_DTYPES, "bf16-matmul", "bf16-matmul+kv-bf16", "int8-matmul")
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,2,4,8,16")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the fastest is kept (default 3)")
    ap.add_argument("--quick", action="store_true", help="tiny random model, no transformers run")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--backends", default=None,
                    help="comma-separated kernel backends to time (torch, cpp; default: the engine's CPU "
                         "default); unavailable ones are skipped")
    ap.add_argument("--weights", default=",".join(variants),
                    help=f"comma-separated weight storages ({', '.join(variants)}; default: all)")
    ap.add_argument("--out", default=None, help="results name (default: decode_cpu, or decode_cpu_quick)")
    ap.add_argument("--llama-cpp", action="store_true", help="time llama.cpp on the same file too (llamacpp extra)")
    args = ap.parse_args()
    model = "random:tiny" if args.quick else "default"
    steps = 8 if args.quick else args.steps
    storages = args.weights.split(",")
    bad = [w for w in storages if w not in variants]
    if bad:
        ap.error(f"unknown weight storage {bad[0]!r}; choose from {', '.join(variants)}")
    from sot_engine.kernels import BackendUnavailable, get_backend
    names = args.backends.split(",") if args.backends else [get_backend(None, "cpu").name]
    configs = []  # (row key, LLM): every one loaded first, then timed in rounds
    for backend in names:
        try:
            get_backend(backend, "cpu")
        except BackendUnavailable as e:
            print(f"skipping backend {backend!r}: {e}", flush=True)
            continue
        for weights in storages:
            storage, _, kv = weights.partition("+kv-")
            kw = {"matmul_precision": storage.split("-")[0]} if storage.endswith("-matmul") else {"weight_dtype": storage}
            llm = LLM(model, device="cpu", dtype=torch.float32, backend=backend, kv_cache_dtype=kv or None,
                      kv_cache_memory=256 << 20, **kw)
            isa = _cpp_isa() if backend == "cpp" else "torch"
            configs.append(({"backend": backend, "weights": storage, **({"kv": kv} if kv else {}), "isa": isa}, llm))
    # a shared VM's neighbours slow whole stretches of a run: every (config, batch) is timed once per round, the
    # rounds interleaved, and the fastest round kept (interference only ever adds time)
    # the memory bandwidth this VM gives now (its neighbours move it by up to ~30%): decode is bound by it
    cpu = torch.device("cpu")
    copy = [copy_bandwidth(cpu, 256 << 20)["gbps"] if not args.quick else 0.0]
    best: dict[tuple[int, int], dict] = {}
    lc, lc_ids, lc_best = None, [], {}
    if args.llama_cpp and not args.quick:
        from sot_engine.sot import llamacpp
        from sot_engine.engine.loader import default_model_path
        if not llamacpp.available():
            ap.error("--llama-cpp needs llama-cpp-python: pip install 'sot-engine[llamacpp]'")
        lc = llamacpp.LlamaCpp(default_model_path(), torch.get_num_threads())
        enc = configs[0][1].engine
        lc_ids = [enc.encode([{"role": "user", "content": q}]) for q in prompts(max(map(int, args.batches.split(","))))]
    for r in range(args.rounds):
        for i, (key, llm) in enumerate(configs):
            for b in map(int, args.batches.split(",")):
                got = ours(llm, b, steps)
                if (i, b) not in best or got["ms_per_step"] < best[i, b]["ms_per_step"]:
                    best[i, b] = got
                print(f"round {r + 1}/{args.rounds}", {**key, "batch": b, **got}, flush=True)
        if lc is not None:
            for b in map(int, args.batches.split(",")):
                _, times = lc.greedy(lc_ids[:b], steps + 1)
                ms = 1000 * statistics.median(times)
                if b not in lc_best or ms < lc_best[b]:
                    lc_best[b] = ms
                print(f"round {r + 1}/{args.rounds}", {"backend": "llama.cpp", "batch": b, "ms_per_step": ms}, flush=True)
    copy.append(copy_bandwidth(cpu, 256 << 20)["gbps"] if not args.quick else 0.0)
    rows = [{**key, "batch": b, **best[i, b]} for i, (key, _) in enumerate(configs)
            for b in map(int, args.batches.split(","))]
    if lc is not None:
        rows += [{"backend": "llama.cpp", "weights": "file", "isa": lc.system_info, "llama_cpp": lc.version,
                  "batch": b, "ms_per_step": ms} for b, ms in lc_best.items()]
        lc.close()
    llm = configs[-1][1] if configs else None
    if not (args.quick or args.no_hf) and rows:
        from sot_engine.engine.loader import default_model_path
        chats = [llm.engine.encode([{"role": "user", "content": q}]) for q in prompts(max(r["batch"] for r in rows))]
        for row in rows:
            if (row["backend"], row["weights"], row.get("kv")) == (rows[0]["backend"], "fp32", None):
                row["transformers_ms_per_step"] = transformers_ms(default_model_path(), chats, row["batch"], steps)
                print(row, flush=True)
    name = args.out or ("decode_cpu_quick" if args.quick else "decode_cpu")
    label = "SmolLM2-135M-Instruct (Q4_1 GGUF; dequantized but for the gguf rows)" if model == "default" else model
    print("wrote", write_result(name, cpu, {"model": label, "steps": steps, "rounds": args.rounds,
                                            "copy_gbps_before_after": copy, "rows": rows}))


if __name__ == "__main__":
    main()
