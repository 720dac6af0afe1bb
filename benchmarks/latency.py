"""Prefill and per-token decode latency, achieved TFLOPS and bandwidth, peak memory against batch size: the
SoT paper's Table 1 / Fig. 3 on our engine, with random weights of the published shapes.

    python -m benchmarks.latency                                  # llama-7b, llama-13b fp16 on CUDA, B=1..16
    python -m benchmarks.latency --models llama-33b --batches 1   # the paper's third Table 1 row
    python -m benchmarks.latency --quick                          # tiny shape on CPU, seconds (a smoke run)

Why: SoT rests on decoding being bound by reading the weights, so that B points cost about one token's time
per step. Per model and batch B, a fresh engine whose KV pool holds just this batch (so peak memory is weights
+ this batch's KV + activations) prefills B random `--prefill`-token prompts in one step, then `--decode`
steps are timed one by one (synchronized; a warm-up run of the same shape first, so JIT compilation is not
timed). Per step we count FLOPs (2 x matmul weights per token, lm_head per row, attention 4·H·D per key per
layer) and bytes (every weight once + each row's K/V context): achieved TFLOPS, weight GB/s, and the
roofline step time (weight bytes + K/V bytes read) / copy bandwidth, the copy bandwidth measured in the same
run (`benchmarks.common.copy_bandwidth`). SoT-shaped batches: B points forked from one `--sot-prefix`-token
prompt with `--sot-suffix`-token tails, decoded with cascade attention on and off (K/V bytes with the prefix
read once vs once per point).
"""
from __future__ import annotations

import argparse
import gc
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.common import (copy_bandwidth, environment, format_table, pyplot, result_path, sigterm_as_interrupt,
                               save_figure, sync, write_result)
from sot_engine.engine import LLM, SamplingParams
from sot_engine.engine.config import ModelConfig, shape

GIB = 1 << 30
BLOCK = 16  # the engine's default block size


@dataclass(frozen=True)
class Cost:
    """What one forward of a LLaMA shape reads and computes, from its config alone."""
    cfg: ModelConfig
    elt: int  # bytes per weight / KV element

    @property
    def layer_matmul_params(self) -> int:
        c = self.cfg
        q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        return c.hidden_size * (q + 2 * kv) + q * c.hidden_size + 3 * c.hidden_size * c.intermediate_size

    @property
    def matmul_params(self) -> int:
        return self.cfg.num_layers * self.layer_matmul_params

    @property
    def head_params(self) -> int:
        return self.cfg.vocab_size * self.cfg.hidden_size

    @property
    def norm_params(self) -> int:
        return (2 * self.cfg.num_layers + 1) * self.cfg.hidden_size

    @property
    def params(self) -> int:
        """All parameters, embeddings included (a tied head is the embedding)."""
        embed = 0 if self.cfg.tie_word_embeddings else self.head_params
        return self.matmul_params + self.head_params + self.norm_params + embed

    @property
    def weight_bytes(self) -> int:
        """Weights one step reads: every matrix once, the head once; the embedding table only as rows."""
        return (self.matmul_params + self.head_params + self.norm_params) * self.elt

    def kv_bytes(self, tokens: int) -> int:
        """K and V of `tokens` tokens over all layers."""
        c = self.cfg
        return 2 * c.num_layers * c.num_kv_heads * c.head_dim * self.elt * tokens

    def flops(self, new_tokens: int, keys: int, rows: int) -> int:
        """`new_tokens` through the matmuls, attention over `keys` (query, key) pairs in all, `rows` logits."""
        c = self.cfg
        return (2 * self.matmul_params * new_tokens + 2 * self.head_params * rows
                + 4 * c.num_layers * c.num_heads * c.head_dim * keys)


def prefill_keys(n: int) -> int:
    """Causal (query, key) pairs of an n-token prompt with no cached prefix."""
    return n * (n + 1) // 2


def roofline_ms(weight_bytes: int, kv_bytes: float, copy_gbps: float | None) -> float | None:
    """The fastest a memory-bound step can be: its bytes at the measured copy bandwidth."""
    return None if not copy_gbps else (weight_bytes + kv_bytes) / (copy_gbps * 1e9) * 1e3


# ---------------------------------------------------------------- measurement

def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _ids(n: int, vocab: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


def _drain(llm: LLM, device: torch.device, seqs: list, shared_blocks: int = 0) -> dict:
    """Step until `seqs` finish: time of the first step that produces tokens (the prefill), then each decode
    step, with the K/V tokens each step reads (per row, and with `shared_blocks` counted once)."""
    eng, bs = llm.engine, llm.engine.block_manager.block_size
    prefill_ms, steps, keys, shared_keys = None, [], [], []
    while eng.has_unfinished():
        running = [s for s in seqs if not s.is_finished and s.block_table]
        sync(device)
        t0 = time.perf_counter()
        out = eng.step()
        sync(device)
        ms = 1e3 * (time.perf_counter() - t0)
        if prefill_ms is None:
            if out:  # the step that prefills the rows (a fork parent's own prefill gives no tokens)
                prefill_ms = ms
            continue
        lens = [len(s) for s in running]  # the fed (last) token attends to every token so far, itself included
        steps.append(ms)
        keys.append(sum(lens))
        shared_keys.append(sum(lens) - (len(lens) - 1) * shared_blocks * bs if lens else 0)
    for s in seqs:
        eng.release(s)
    return {"prefill_ms": prefill_ms, "steps": steps, "keys": keys, "shared_keys": shared_keys}


@dataclass(frozen=True)
class Setup:
    """Where and how every engine of a run is built."""
    device: torch.device
    dtype: torch.dtype
    backend: str | None = None
    threads: int | None = None  # CPU threads (None: the engine's default, one per physical core)
    copy_gbps: float | None = None
    tp: int = 1  # tensor-parallel ranks (GPUs 0..tp-1, or CPU processes sharing the cores)

    @property
    def elt(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def engine(self, model: str, num_blocks: int, batch_tokens: int, cascade: str = "off") -> LLM:
        return LLM(model, device=str(self.device), dtype=self.dtype, backend=self.backend, num_blocks=num_blocks,
                   max_num_batched_tokens=max(4096, batch_tokens), cascade=cascade, num_threads=self.threads,
                   enable_prefix_caching=False,  # every step computes what it says
                   enable_chunked_prefill=False, tensor_parallel_size=self.tp)


def measure_batch(setup: Setup, model: str, batch: int, prefill: int, decode: int) -> dict:
    """B prompts prefilled in one step, then `decode` timed steps, on an engine whose pool fits just them."""
    cfg, dev = shape(model.removeprefix("random:")), setup.device
    cost = Cost(cfg, setup.elt)
    need = batch * -(-(prefill + decode + 1) // BLOCK) + 1
    llm = setup.engine(model, need, batch * prefill)
    eng = llm.engine
    prompts = [_ids(prefill, cfg.vocab_size, seed=i) for i in range(batch)]

    def run(tokens: int) -> dict:
        params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
        return _drain(llm, dev, [eng.add_request(p, params) for p in prompts])
    try:
        run(3)  # warm-up: compiles and caches whatever this shape needs
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        before = dict(eng.counters)
        r = run(decode + 1)  # the prefill's token, then `decode` steps
        peak = torch.cuda.max_memory_allocated(dev) / GIB if dev.type == "cuda" else None
        assert eng.counters["prefill_tokens"] - before["prefill_tokens"] == batch * prefill
        assert eng.counters["steps"] - before["steps"] == 1 + decode, "the prefill took more than one step"
        pool = need * eng.kv_cache.bytes_per_block(cfg, BLOCK, setup.dtype)
    finally:
        if llm is not None:
            llm.engine.close()  # tensor-parallel workers
        llm = eng = None
        _free(dev)
    med, total = statistics.median(r["steps"]), sum(r["steps"])
    kv_mean = cost.kv_bytes(statistics.fmean(r["keys"]))
    dec_flops = sum(cost.flops(batch, k, batch) for k in r["keys"])
    pre_flops = cost.flops(batch * prefill, batch * prefill_keys(prefill), batch)
    roof = roofline_ms(cost.weight_bytes, kv_mean, setup.copy_gbps)
    row = {"batch": batch, "prefill_ms": r["prefill_ms"],
           "prefill_tflops": pre_flops / (r["prefill_ms"] * 1e-3) / 1e12,
           "decode_steps": len(r["steps"]), "decode_ms_per_step": med, "decode_total_ms": total,
           "decode_tokens_per_s": batch * len(r["steps"]) / (total * 1e-3),
           "decode_tflops": dec_flops / (total * 1e-3) / 1e12,
           "weight_gbps": cost.weight_bytes / (med * 1e-3) / 1e9,
           "kv_bytes_per_step": kv_mean, "roofline_ms": roof, "vs_roofline": med / roof if roof else None,
           "kv_pool_gib": pool / GIB, "peak_mem_gib": peak}
    if setup.copy_gbps:
        row["weight_frac_copy"] = row["weight_gbps"] / setup.copy_gbps
    return row


def measure_sot(setup: Setup, model: str, members: int, prefix: int, suffix: int, decode: int,
                cascade: str) -> dict:
    """B points forked from one `prefix`-token prompt (prefilled once), each with its own `suffix` tail."""
    cfg, dev = shape(model.removeprefix("random:")), setup.device
    cost = Cost(cfg, setup.elt)
    need = 2 * -(-prefix // BLOCK) + members * (-(-(suffix + decode + 1) // BLOCK) + 2) + 2
    llm = setup.engine(model, need, prefix + members * suffix, cascade)
    eng = llm.engine
    head = _ids(prefix, cfg.vocab_size, seed=1000)
    tails = [_ids(suffix, cfg.vocab_size, seed=2000 + i) for i in range(members)]

    def run(tokens: int) -> dict:
        params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
        return _drain(llm, dev, eng.add_fork(head, tails, params), shared_blocks=prefix // BLOCK)
    try:
        run(3)
        before = eng.runner.cascade_steps
        r = run(decode + 1)
        steps = eng.runner.cascade_steps - before  # decode steps that ran cascade attention (prefix read once)
        available = eng.runner.cascade == cascade
    finally:
        if llm is not None:
            llm.engine.close()  # tensor-parallel workers
        llm = eng = None
        _free(dev)
    med = statistics.median(r["steps"])
    kv = cost.kv_bytes(statistics.fmean(r["shared_keys"] if steps else r["keys"]))
    roof = roofline_ms(cost.weight_bytes, kv, setup.copy_gbps)
    return {"members": members, "prefix": prefix, "suffix": suffix, "cascade": cascade,
            "cascade_available": available, "cascade_steps": steps, "decode_steps": len(r["steps"]),
            "decode_ms_per_step": med, "kv_bytes_per_step": kv, "roofline_ms": roof,
            "vs_roofline": med / roof if roof else None}


# ---------------------------------------------------------------- output

BATCH_COLUMNS = [("B", "batch", "d"), ("prefill ms", "prefill_ms", ".1f"), ("prefill TFLOPS", "prefill_tflops", ".1f"),
                 ("ms/token", "decode_ms_per_step", ".2f"), ("decode total ms", "decode_total_ms", ".0f"),
                 ("tok/s", "decode_tokens_per_s", ".0f"), ("decode TFLOPS", "decode_tflops", ".2f"),
                 ("weight GB/s", "weight_gbps", ".0f"), ("of copy", "weight_frac_copy", ".0%"),
                 ("roofline ms", "roofline_ms", ".2f"), ("x roofline", "vs_roofline", ".2f"),
                 ("peak GiB", "peak_mem_gib", ".1f")]
SOT_COLUMNS = [("points", "members", "d"), ("prefix", "prefix", "d"), ("suffix", "suffix", "d"),
               ("off ms/step", "off_ms", ".2f"), ("on ms/step", "on_ms", ".2f"), ("speed-up", "speedup", ".2f"),
               ("cascade steps", "on_cascade_steps", ""), ("x roofline (on)", "on_vs_roofline", ".2f"),
               ("note", "note", "")]


def sot_pairs(rows: list[dict]) -> list[dict]:
    """Cascade off and on side by side per number of points."""
    out = []
    for m in sorted({r["members"] for r in rows}):
        off = next((r for r in rows if r["members"] == m and r["cascade"] == "off"), {})
        on = next((r for r in rows if r["members"] == m and r["cascade"] == "on"), {})
        pair = {"members": m, "prefix": (off or on).get("prefix"), "suffix": (off or on).get("suffix"),
                "off_ms": off.get("decode_ms_per_step"), "on_ms": on.get("decode_ms_per_step"),
                "on_cascade_steps": on.get("cascade_steps"), "on_vs_roofline": on.get("vs_roofline"),
                "note": off.get("error") or on.get("error") or ("" if not on or on.get("cascade_available")
                                                               else "backend has no cascade kernel")}
        if pair["off_ms"] and pair["on_ms"]:
            pair["speedup"] = pair["off_ms"] / pair["on_ms"]
        out.append(pair)
    return out


def plot(payload: dict, path: Path) -> Path | None:
    """Decode ms/token (with the roofline), TFLOPS, peak memory against batch; SoT decode with cascade on/off."""
    plt = pyplot()
    rows = [r for r in payload["batches"] if r.get("decode_ms_per_step")]
    if plt is None or not rows:
        return None
    b = [r["batch"] for r in rows]
    fig, ax = plt.subplots(1, 4, figsize=(18, 4))
    ax[0].plot(b, [r["decode_ms_per_step"] for r in rows], "o-", label="measured")
    if all(r.get("roofline_ms") for r in rows):
        ax[0].plot(b, [r["roofline_ms"] for r in rows], "k--", label="roofline (bytes / copy bw)")
    ax[0].set(xlabel="batch", ylabel="ms per decode step", title="decode latency per token", ylim=(0, None))
    ax[1].plot(b, [r["decode_tflops"] for r in rows], "o-", label="decode")
    ax[1].plot(b, [r["prefill_tflops"] for r in rows], "s-", label=f"prefill ({payload['prefill']} tokens)")
    ax[1].set(xlabel="batch", ylabel="TFLOPS", yscale="log", title="achieved TFLOPS")
    if all(r.get("peak_mem_gib") for r in rows):
        ax[2].plot(b, [r["peak_mem_gib"] for r in rows], "o-")
    else:
        ax[2].text(0.5, 0.5, "measured on CUDA only", ha="center", transform=ax[2].transAxes)
    ax[2].set(xlabel="batch", ylabel="GiB", title="peak memory (torch.cuda.max_memory_allocated)")
    pairs = [p for p in payload.get("sot_pairs", []) if p.get("off_ms")]
    if pairs:
        m = [p["members"] for p in pairs]
        ax[3].plot(m, [p["off_ms"] for p in pairs], "o-", label="cascade off")
        if all(p.get("on_ms") for p in pairs):
            ax[3].plot(m, [p["on_ms"] for p in pairs], "s-", label="cascade on")
    ax[3].set(xlabel="points (B)", ylabel="ms per decode step", ylim=(0, None),
              title=f"SoT batch: {payload['sot_prefix']}-token shared prefix")
    for a, xs in zip(ax, [b, b, b, [p["members"] for p in pairs] or b]):
        a.set_xscale("log", base=2)
        a.set_xticks(xs, [str(x) for x in xs])
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7)
    env = payload["env"]
    return save_figure(plt, fig, f"{payload['model']} {payload['dtype']} on {env['device']}, prefill "
                       f"{payload['prefill']}, decode {payload['decode']} "
                       f"(copy bw {payload['copy']['gbps']:.0f} GB/s)", path)


def run_model(setup: Setup, model: str, args: argparse.Namespace, deadline: float) -> Path:
    """Every batch, then the SoT-shaped batches, for one model; one JSON + PNG per model."""
    name = f"latency_{model.removeprefix('random:')}" + (f"_tp{setup.tp}" if setup.tp > 1 else "") \
        + ("_quick" if args.quick else "")
    cost = Cost(shape(model.removeprefix("random:")), setup.elt)
    dev = setup.device
    payload = {"model": model, "tensor_parallel_size": setup.tp, "dtype": str(setup.dtype).removeprefix("torch."),
               "backend": setup.backend,
               "threads": setup.threads, "prefill": args.prefill, "decode": args.decode,
               "sot_prefix": args.sot_prefix, "sot_suffix": args.sot_suffix, "params": cost.params,
               "weight_bytes": cost.weight_bytes, "copy": args.copy, "batches": [], "sot": [], "skipped": [],
               "complete": False}
    plan = [("batch", b) for b in args.batches] + [(c, m) for m in args.sot_members for c in ("off", "on")]
    try:
        for kind, n in plan:
            if time.monotonic() > deadline:
                payload["skipped"].append({"kind": kind, "n": n})
                continue
            try:
                if kind == "batch":
                    row = measure_batch(setup, model, n, args.prefill, args.decode)
                    payload["batches"].append(row)
                else:
                    row = measure_sot(setup, model, n, args.sot_prefix, args.sot_suffix, args.decode, kind)
                    payload["sot"].append(row)
            except Exception as e:  # noqa: BLE001 - e.g. out of memory at a large batch: keep the rest
                row = {"kind": kind, "n": n, "error": f"{type(e).__name__}: {e}"[:300]}
                payload.setdefault("errors", []).append(row)
                _free(dev)
            print(model, kind, {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    except KeyboardInterrupt:  # stopped from outside (SIGTERM): save what was measured, then stop
        payload["interrupted"] = True
    payload["sot_pairs"] = sot_pairs(payload["sot"])
    payload["complete"] = not payload["skipped"] and not payload.get("errors") and not payload.get("interrupted")
    path = write_result(name, dev, payload)
    png = plot({**payload, "env": environment(dev)}, result_path(name, dev, ".png"))
    print(format_table(payload["batches"], BATCH_COLUMNS))
    print(format_table(payload["sot_pairs"], SOT_COLUMNS))
    print("wrote", path, "and", png or "no plot (matplotlib missing)", flush=True)
    if payload.get("interrupted"):
        raise SystemExit("interrupted: the models after this one were not measured")
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="llama-7b,llama-13b", help="random:<shape> names (engine.config.SHAPES)")
    ap.add_argument("--batches", default=None, help="default 1,2,4,8,16 (--quick: 1,2)")
    ap.add_argument("--prefill", type=int, default=128)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--sot-members", default=None, help="SoT-shaped batches (points), default 2,4,8,16 "
                    "(--quick: 2); '' for none")
    ap.add_argument("--sot-prefix", type=int, default=512, help="tokens the points share (whole blocks)")
    ap.add_argument("--sot-suffix", type=int, default=16, help="each point's own prompt tail")
    ap.add_argument("--dtype", default=None, help="default: float16 on CUDA, float32 on CPU")
    ap.add_argument("--device", default=None)
    ap.add_argument("--backend", default=None, help="kernel backend (default: the engine's for the device)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: physical cores; --quick: 1)")
    ap.add_argument("--budget-s", type=float, default=600.0, help="stop starting new measurements after this")
    ap.add_argument("--quick", action="store_true", help="tiny shape, short lengths, CPU: checks the script")
    ap.add_argument("--tensor-parallel-size", type=int, default=1,
                    help="split each model over N GPUs (or N CPU processes); results named latency_<model>_tpN")
    args = ap.parse_args(argv)
    if args.quick:  # numbers meaningless; one thread: a shared CPU makes two spin-waiting threads crawl
        args.models, args.prefill, args.decode, args.sot_prefix, args.sot_suffix = "tiny", 32, 8, 32, 4
        args.batches, args.sot_members = args.batches or "1,2", "2" if args.sot_members is None else args.sot_members
        args.device, args.threads = args.device or "cpu", args.threads or 1
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    args.batches = [int(b) for b in (args.batches or "1,2,4,8,16").split(",") if b]
    members = "2,4,8,16" if args.sot_members is None else args.sot_members
    args.sot_members = [int(m) for m in members.split(",") if m]
    if args.sot_prefix % BLOCK:
        raise SystemExit(f"--sot-prefix must be a multiple of the block size ({BLOCK}): the points share whole blocks")
    deadline = time.monotonic() + args.budget_s
    if args.threads and device.type == "cpu":
        torch.set_num_threads(args.threads)
    args.copy = copy_bandwidth(device, GIB if device.type == "cuda" else (16 << 20 if args.quick else 256 << 20))
    print(f"copy bandwidth: {args.copy['gbps']:.0f} GB/s", flush=True)
    setup = Setup(device, dtype, args.backend, args.threads, args.copy["gbps"], args.tensor_parallel_size)
    with sigterm_as_interrupt(device.type == "cuda"):
        for m in args.models.split(","):
            run_model(setup, m if m.startswith("random:") else f"random:{m}", args, deadline)


if __name__ == "__main__":
    main()
