"""Attention kernels on a GPU: time, bytes moved, GB/s as a fraction of the card's measured copy bandwidth.

    python -m benchmarks.kernels_gpu                 # full sweep (a few minutes on an H100)
    python -m benchmarks.kernels_gpu --quick         # a few shapes (about a minute)
    python -m benchmarks.kernels_gpu --out DIR       # also write JSON, table and plot into DIR

What it measures (every kernel on the same data, outputs checked against the torch reference):
- copy bandwidth: a large device-to-device `tensor.copy_` (bytes read + bytes written), timed like the kernels;
  it is the roof the decode numbers are compared with (not the datasheet number);
- decode: Triton paged decode, the hand-written CUDA paged decode (csrc/cuda, "cuda"; a row says why when
  it cannot be built), the torch reference decode, and `F.scaled_dot_product_attention` on a contiguous
  (non-paged) K/V of the same size ("sdpa", the flash baseline), for LLaMA-7B-like MHA, a GQA shape and
  SmolLM2, batch (1-32) x context (512-8192) x dtype. Bytes = K/V rows actually read + q + out;
- cascade: a SoT-shaped batch (8 points sharing a 512-2048 token prefix, 64-token suffixes) with
  `kernels.triton.cascade.cascade_decode_attention` (when that module exists) against plain Triton decode;
  rows where `kernels.cascade.cascade_pays` would pick cascade are marked;
- prefill: Triton varlen prefill vs the torch reference vs SDPA causal (compute-bound: TFLOP/s reported).
Timing: `triton.testing.do_bench` (L2 flushed between runs), median. The goal line checked at the end:
"paged decode >= 80% of copy bandwidth at B=8, context 2048; cascade is never slower than plain decode where
the cost model picks it" (within a 2% noise margin, stated in the output).
`--smoke` runs a tiny sweep on any device (CPU: Triton's interpreter, perf_counter timing): it only checks
that the script runs; its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from benchmarks.common import (bench_ms, copy_bandwidth, environment, format_table, gbps, pyplot, sigterm_as_interrupt,
                               save_figure, write_result)

BLOCK_SIZE = 16
GOAL_FRACTION = 0.80  # of measured copy bandwidth
GOAL_BATCH, GOAL_CONTEXT = 8, 2048
NOISE = 0.02  # "never slower" allows this much timing noise
SOT_MEMBERS, SOT_SUFFIX = 8, 64


@dataclass(frozen=True)
class AttnShape:
    name: str
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads


SHAPES = (AttnShape("llama7b", 32, 32, 128), AttnShape("gqa32/8", 32, 8, 128), AttnShape("smollm2", 9, 3, 64))
SMOKE_SHAPE = AttnShape("smoke", 4, 2, 64)  # head_dim 64: the CUDA kernel is compiled for it
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BATCHES = (1, 8, 32)
CONTEXTS = (512, 2048, 8192)
PREFIXES = (512, 1024, 2048)
PREFILLS = ((1, 2048), (4, 512), (1, 8192))  # (sequences, new tokens each; no cached prefix)
DECODE_KERNELS = ("triton", "cuda", "reference", "sdpa")
PREFILL_KERNELS = ("triton", "reference", "sdpa")
REFERENCE_MAX_KV_BYTES = 3 << 30  # the torch reference copies K/V to fp32: skip it beyond this


def shape_by_name(name: str) -> AttnShape:
    for s in SHAPES + (SMOKE_SHAPE,):
        if s.name == name:
            return s
    raise KeyError(name)


# ---------------------------------------------------------------- pure arithmetic (tested on CPU)

def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def kv_bytes(tokens: int, shape: AttnShape, elt: int) -> int:
    """K and V rows of `tokens` tokens (all KV heads)."""
    return 2 * tokens * shape.kv_heads * shape.head_dim * elt


def qo_bytes(queries: int, shape: AttnShape, elt: int) -> int:
    """q read + out written for `queries` query tokens (all query heads)."""
    return 2 * queries * shape.heads * shape.head_dim * elt


def decode_bytes(batch: int, context: int, shape: AttnShape, elt: int) -> int:
    """One decode step: every sequence reads its whole context's K/V once, plus q and out."""
    return kv_bytes(batch * context, shape, elt) + qo_bytes(batch, shape, elt)


def cascade_bytes(members: int, prefix: int, suffix: int, shape: AttnShape, elt: int, shared: bool) -> int:
    """A group's decode step: the prefix K/V read once (`shared`, cascade) or once per member (plain decode)."""
    tokens = prefix + members * suffix if shared else members * (prefix + suffix)
    return kv_bytes(tokens, shape, elt) + qo_bytes(members, shape, elt)


def prefill_bytes(seqs: int, new: int, shape: AttnShape, elt: int) -> int:
    """Compulsory traffic of a prefill with no cached prefix: q, out and the K/V, each once."""
    return kv_bytes(seqs * new, shape, elt) + qo_bytes(seqs * new, shape, elt)


def prefill_flops(seqs: int, new: int, shape: AttnShape) -> int:
    """Causal attention FLOPs: QK^T and PV, 2 FLOPs per multiply-add, over the n(n+1)/2 visible pairs."""
    return 4 * shape.heads * shape.head_dim * seqs * (new * (new + 1) // 2)


def prefix_once_evidence(cascade_us: float, copy_gbps: float | None, plain_bytes: int) -> dict:
    """At copy bandwidth, cascade's time allows at most `cascade_us x copy` bytes of DRAM traffic; below what
    plain decode must read (the prefix once per member) it cannot have re-read the prefix per member from DRAM.
    Evidence, not proof: it says nothing when cascade is slow, and L2 hits are not DRAM reads."""
    if not copy_gbps:
        return {}
    most = cascade_us * 1e-6 * copy_gbps * 1e9
    return {"max_bytes_at_copy_bw": most, "reads_prefix_once": most < plain_bytes}


def cost_model_picks(members: int, prefix: int, suffix: int, shape: AttnShape) -> bool:
    """Whether `kernels.cascade.cascade_pays` would run this group with cascade."""
    from sot_engine.kernels.cascade import cascade_pays
    return bool(cascade_pays(members, prefix, suffix, shape.group))


def decode_configs(quick: bool = False, smoke: bool = False) -> list[dict]:
    """The decode sweep, the goal configs (B=8, context 2048) first so a cut-short run still has them."""
    if smoke:
        return [{"shape": SMOKE_SHAPE.name, "dtype": "fp32", "batch": 2, "context": 48}]
    if quick:
        shapes, dtypes, batches, contexts = SHAPES, ("bf16",), (8,), (512, 2048)
    else:
        shapes, dtypes, batches, contexts = SHAPES, ("bf16", "fp16"), BATCHES, CONTEXTS
    cfgs = [{"shape": s.name, "dtype": dt, "batch": b, "context": c}
            for s in shapes for dt in dtypes for b in batches for c in contexts]
    return sorted(cfgs, key=lambda c: (c["batch"], c["context"]) != (GOAL_BATCH, GOAL_CONTEXT))


def cascade_configs(quick: bool = False, smoke: bool = False) -> list[dict]:
    if smoke:
        return [{"shape": SMOKE_SHAPE.name, "dtype": "fp32", "members": 3, "prefix": 32, "suffix": 8}]
    shapes, dtypes, prefixes = (SHAPES, ("bf16",), (512, 2048)) if quick else (SHAPES, ("bf16", "fp16"), PREFIXES)
    return [{"shape": s.name, "dtype": dt, "members": SOT_MEMBERS, "prefix": p, "suffix": SOT_SUFFIX}
            for s in shapes for dt in dtypes for p in prefixes]


def prefill_configs(quick: bool = False, smoke: bool = False) -> list[dict]:
    if smoke:
        return [{"shape": SMOKE_SHAPE.name, "dtype": "fp32", "seqs": 2, "new": 24}]
    shapes, dtypes, sizes = (SHAPES[:2], ("bf16",), ((1, 2048),)) if quick else (SHAPES, ("bf16", "fp16"), PREFILLS)
    return [{"shape": s.name, "dtype": dt, "seqs": n, "new": t} for s in shapes for dt in dtypes for n, t in sizes]


DECODE_COLUMNS = [("shape", "shape", ""), ("dtype", "dtype", ""), ("B", "batch", "d"), ("ctx", "context", "d"),
                  ("kernel", "kernel", ""), ("us", "us", ".1f"), ("GB/s", "gbps", ".0f"),
                  ("of copy", "frac_copy", ".0%"), ("max err", "max_err", ".1e"), ("note", "note", "")]
CASCADE_COLUMNS = [("shape", "shape", ""), ("dtype", "dtype", ""), ("B", "members", "d"), ("prefix", "prefix", "d"),
                   ("suffix", "suffix", "d"), ("picked", "picked", ""), ("plain us", "plain_us", ".1f"),
                   ("plain GB/s", "plain_gbps", ".0f"), ("cascade us", "cascade_us", ".1f"),
                   ("cascade GB/s", "cascade_gbps", ".0f"), ("of copy", "cascade_frac_copy", ".0%"),
                   ("speedup", "speedup", ".2f"), ("prefix once", "reads_prefix_once", ""),
                   ("max err", "max_err", ".1e"), ("note", "note", "")]
PREFILL_COLUMNS = [("shape", "shape", ""), ("dtype", "dtype", ""), ("seqs", "seqs", "d"), ("new", "new", "d"),
                   ("kernel", "kernel", ""), ("us", "us", ".1f"), ("TFLOP/s", "tflops", ".1f"),
                   ("GB/s", "gbps", ".0f"), ("max err", "max_err", ".1e"), ("note", "note", "")]


def goal_rows(decode_rows: list[dict], kernel: str) -> list[dict]:
    return [r for r in decode_rows if r.get("kernel") == kernel and r.get("batch") == GOAL_BATCH
            and r.get("context") == GOAL_CONTEXT and r.get("frac_copy") is not None]


def goal_summary(decode_rows: list[dict], cascade_rows: list[dict], copy_gbps: float | None) -> dict:
    """The issue's goal line (on the Triton kernel, the default backend's), evaluated on whatever rows were
    measured; the CUDA kernel's fractions at the same point are reported beside it."""
    goal = goal_rows(decode_rows, "triton")
    picked = [r for r in cascade_rows if r.get("picked") and r.get("speedup") is not None]
    decode_ok = bool(goal) and all(r["frac_copy"] >= GOAL_FRACTION for r in goal)
    cascade_ok = bool(picked) and all(r["speedup"] >= 1 - NOISE for r in picked)
    return {
        "copy_gbps": copy_gbps,
        "decode_goal": f"paged decode >= {GOAL_FRACTION:.0%} of copy bandwidth at B={GOAL_BATCH}, context {GOAL_CONTEXT}",
        "decode_ok": decode_ok,
        "decode_fractions": {f"{r['shape']}/{r['dtype']}": round(r["frac_copy"], 3) for r in goal},
        "cuda_decode_fractions": {f"{r['shape']}/{r['dtype']}": round(r["frac_copy"], 3)
                                  for r in goal_rows(decode_rows, "cuda")},
        "cascade_goal": f"cascade never slower than plain decode where cascade_pays picks it (noise margin {NOISE:.0%})",
        "cascade_ok": cascade_ok if picked else None,
        "cascade_speedups": {f"{r['shape']}/{r['dtype']}/p{r['prefix']}": round(r["speedup"], 3) for r in picked},
        "cascade_slower_unpicked": [f"{r['shape']}/{r['dtype']}/p{r['prefix']}" for r in cascade_rows
                                    if not r.get("picked") and r.get("speedup") is not None and r["speedup"] < 1],
    }


def format_summary(s: dict) -> str:
    def verdict(ok):
        return "n/a (not measured)" if ok is None else ("MET" if ok else "NOT MET")
    copy = f"{s['copy_gbps']:.0f} GB/s" if s.get("copy_gbps") else "-"
    cuda = s.get("cuda_decode_fractions")
    lines = [f"measured copy bandwidth: {copy}",
             f"goal: {s['decode_goal']}: {verdict(s['decode_ok'] if s['decode_fractions'] else None)} "
             f"{json.dumps(s['decode_fractions'])}",
             f"  the CUDA kernel there: {json.dumps(cuda) if cuda else '-'}",
             f"goal: {s['cascade_goal']}: {verdict(s['cascade_ok'])} {json.dumps(s['cascade_speedups'])}"]
    if s["cascade_slower_unpicked"]:
        lines.append(f"  (cascade slower where the cost model does not pick it, as intended: {s['cascade_slower_unpicked']})")
    return "\n".join(lines)


# ---------------------------------------------------------------- measurement (needs the device)

def paged_pool(batch: int, context: int, shape: AttnShape, dtype: torch.dtype, device: torch.device,
               gen: torch.Generator, queries: int | None = None):
    """Random q [queries or batch, H, D] and a pool whose blocks are handed out in shuffled order.
    Returns q, k_cache, v_cache, block tables [batch, pages] int32, context lens [batch] int32."""
    pages = -(-context // BLOCK_SIZE)
    num_blocks = batch * pages + 1
    kv_shape = (num_blocks, BLOCK_SIZE, shape.kv_heads, shape.head_dim)
    k = torch.randn(kv_shape, generator=gen, device=device, dtype=torch.float32).to(dtype)
    v = torch.randn(kv_shape, generator=gen, device=device, dtype=torch.float32).to(dtype)
    q = torch.randn(queries or batch, shape.heads, shape.head_dim, generator=gen, device=device,
                    dtype=torch.float32).to(dtype)
    ids = torch.randperm(num_blocks - 1, generator=gen, device=device)[:batch * pages] + 1
    tables = ids.view(batch, pages).to(torch.int32)
    lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    return q, k, v, tables, lens


def contiguous_kv(cache: torch.Tensor, tables: torch.Tensor, context: int) -> torch.Tensor:
    """The same K (or V) rows, unpaged: [B, KVH, context, D] contiguous."""
    rows = cache[tables.long()].flatten(1, 2)[:, :context]  # [B, ctx, KVH, D]
    return rows.transpose(1, 2).contiguous()


def sdpa_call(q4: torch.Tensor, k4: torch.Tensor, v4: torch.Tensor, scale: float, causal: bool):
    """A callable running SDPA, flash backend forced when it takes these inputs, and its backend's name.
    GQA uses `enable_gqa` (no K/V expansion, so the bytes stay the same)."""
    import torch.nn.functional as F
    gqa = q4.shape[1] != k4.shape[1]
    kw = {"scale": scale, "is_causal": causal, **({"enable_gqa": True} if gqa else {})}

    def plain():
        return F.scaled_dot_product_attention(q4, k4, v4, **kw)
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def flash():
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                return F.scaled_dot_product_attention(q4, k4, v4, **kw)
        with warnings.catch_warnings():  # "flash attention does not support ..." before the RuntimeError
            warnings.simplefilter("ignore")
            flash()
        return flash, "flash"
    except (ImportError, RuntimeError):
        return plain, "default"


def _max_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).abs().max())


def load_cuda_decode(device: torch.device) -> tuple[object | None, str]:
    """The CUDA kernel extension (built or JIT-built now), or None and why not."""
    if device.type != "cuda":
        return None, "unavailable: needs a CUDA GPU"
    try:
        from sot_engine.kernels.cuda import load_extension
        return load_extension(), ""
    except Exception as e:  # noqa: BLE001 - BackendUnavailable, or an import problem: reported, not raised
        return None, f"unavailable: {e}"[:300]


class Runner:
    def __init__(self, device: torch.device, budget_s: float, smoke: bool, cuda_ext: object | None = None,
                 cuda_note: str = ""):
        self.device, self.smoke = device, smoke
        self.deadline = time.monotonic() + budget_s
        self.gen = torch.Generator(device=device).manual_seed(0)
        self.copy_gbps: float | None = None
        self.cuda_ext, self.cuda_note = cuda_ext, cuda_note

    def out_of_time(self) -> bool:
        return time.monotonic() > self.deadline

    def timed(self, row: dict, fn: Callable[[], object], nbytes: int, ref: torch.Tensor | None) -> dict:
        """Run fn once (checked against ref), time it; errors are recorded in the row, never raised."""
        try:
            out = fn()
            if ref is not None:
                row["max_err"] = _max_err(out, ref)
            ms = bench_ms(fn, self.device)
            row.update(us=1000 * ms, bytes=nbytes, gbps=gbps(nbytes, ms))
            if self.copy_gbps and row["gbps"]:
                row["frac_copy"] = row["gbps"] / self.copy_gbps
        except Exception as e:  # noqa: BLE001 - one broken kernel must not sink the whole run
            row["note"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        return row

    def decode(self, cfg: dict) -> list[dict]:
        from sot_engine.kernels import reference
        from sot_engine.kernels.triton.decode import paged_decode_attention
        shape, dtype = shape_by_name(cfg["shape"]), DTYPES[cfg["dtype"]]
        b, ctx = cfg["batch"], cfg["context"]
        q, k, v, tables, lens = paged_pool(b, ctx, shape, dtype, self.device, self.gen)
        scale = shape.head_dim ** -0.5
        nbytes = decode_bytes(b, ctx, shape, element_size(dtype))
        ref = reference.paged_decode_attention(q, k, v, tables, lens, scale, ctx)
        rows = []
        rows.append(self.timed({**cfg, "kernel": "triton"},
                               lambda: paged_decode_attention(q, k, v, tables, lens, scale, ctx), nbytes, ref))
        ext = self.cuda_ext  # called directly, not through the backend, which would hand other shapes to Triton
        if ext is None:
            rows.append({**cfg, "kernel": "cuda", "note": self.cuda_note[:120]})  # in full: payload["cuda_note"]
        elif shape.head_dim not in ext.HEAD_DIMS:
            rows.append({**cfg, "kernel": "cuda", "note": f"skipped: head_dim {shape.head_dim} not compiled"})
        else:
            rows.append(self.timed({**cfg, "kernel": "cuda"},
                                   lambda: ext.paged_decode_attention(q, k, v, tables, lens, scale, ctx)[0],
                                   nbytes, ref))
        row = {**cfg, "kernel": "reference"}
        if kv_bytes(b * ctx, shape, 4) <= REFERENCE_MAX_KV_BYTES:
            rows.append(self.timed(row, lambda: reference.paged_decode_attention(q, k, v, tables, lens, scale, ctx),
                                   nbytes, None))
        else:
            rows.append({**row, "note": "skipped: fp32 copies too large"})
        k4, v4 = contiguous_kv(k, tables, ctx), contiguous_kv(v, tables, ctx)
        q4 = q.unsqueeze(2)  # [B, H, 1, D]
        try:
            fn, backend = sdpa_call(q4, k4, v4, scale, causal=False)
            rows.append(self.timed({**cfg, "kernel": "sdpa", "note": f"contiguous K/V, {backend}"},
                                   lambda: fn().squeeze(2), nbytes, ref))
        except Exception as e:  # noqa: BLE001
            rows.append({**cfg, "kernel": "sdpa", "note": f"{type(e).__name__}: {e}"[:120]})
        return rows

    def cascade(self, cfg: dict, cascade_fn: Callable | None, why_absent: str) -> dict:
        from sot_engine.kernels import reference
        from sot_engine.kernels.cascade import find_groups
        from sot_engine.kernels.triton.decode import paged_decode_attention
        shape, dtype = shape_by_name(cfg["shape"]), DTYPES[cfg["dtype"]]
        m, p, s = cfg["members"], cfg["prefix"], cfg["suffix"]
        assert p % BLOCK_SIZE == 0, "the shared prefix must be whole blocks"
        elt = element_size(dtype)
        ctx = p + s
        # the pool of one member's worth of blocks per row; then every row's first p/bs blocks made row 0's
        q, k, v, tables, lens = paged_pool(m, ctx, shape, dtype, self.device, self.gen)
        shared = p // BLOCK_SIZE
        tables[1:, :shared] = tables[0, :shared]
        scale = shape.head_dim ** -0.5
        row = {**cfg, "picked": cost_model_picks(m, p, s, shape),
               "plain_bytes": cascade_bytes(m, p, s, shape, elt, shared=False),
               "cascade_bytes": cascade_bytes(m, p, s, shape, elt, shared=True)}
        ref = reference.paged_decode_attention(q, k, v, tables, lens, scale, ctx)
        plain = self.timed({}, lambda: paged_decode_attention(q, k, v, tables, lens, scale, ctx),
                           row["plain_bytes"], ref)
        row.update(plain_us=plain.get("us"), plain_gbps=plain.get("gbps"), plain_frac_copy=plain.get("frac_copy"))
        if plain.get("note"):
            row["note"] = f"plain: {plain['note']}"
        if cascade_fn is None:
            row["note"] = why_absent
            return row
        groups = find_groups(tables.tolist(), lens.tolist(), BLOCK_SIZE)
        row["groups"] = [len(g.members) for g in groups]
        plan = groups
        try:  # the per-step host work (packing the groups) once, outside the timing, as the engine does per step
            from sot_engine.kernels.triton.cascade import make_plan
            plan = make_plan(groups, tables, lens, BLOCK_SIZE)
        except ImportError:
            pass
        casc = self.timed({}, lambda: cascade_fn(q, k, v, tables, lens, scale, plan, ctx), row["cascade_bytes"], ref)
        row.update(cascade_us=casc.get("us"), cascade_gbps=casc.get("gbps"), cascade_frac_copy=casc.get("frac_copy"),
                   max_err=casc.get("max_err"))
        if casc.get("note"):
            row["note"] = f"cascade: {casc['note']}"
        if row.get("plain_us") and row.get("cascade_us"):
            row["speedup"] = row["plain_us"] / row["cascade_us"]
            row.update(prefix_once_evidence(row["cascade_us"], self.copy_gbps, row["plain_bytes"]))
        return row

    def prefill(self, cfg: dict) -> list[dict]:
        from sot_engine.kernels import reference
        from sot_engine.kernels.triton.prefill import paged_prefill_attention
        shape, dtype = shape_by_name(cfg["shape"]), DTYPES[cfg["dtype"]]
        n_seq, n = cfg["seqs"], cfg["new"]
        q, k, v, tables, lens = paged_pool(n_seq, n, shape, dtype, self.device, self.gen, queries=n_seq * n)
        cu = torch.arange(0, n_seq + 1, device=self.device, dtype=torch.int32) * n
        scale = shape.head_dim ** -0.5
        nbytes, flops = prefill_bytes(n_seq, n, shape, element_size(dtype)), prefill_flops(n_seq, n, shape)
        k4, v4 = contiguous_kv(k, tables, n), contiguous_kv(v, tables, n)
        q4 = q.view(n_seq, n, shape.heads, shape.head_dim).transpose(1, 2)
        fn, backend = sdpa_call(q4, k4, v4, scale, causal=True)
        sdpa_out = lambda: fn().transpose(1, 2).reshape(n_seq * n, shape.heads, shape.head_dim)  # noqa: E731
        ref = sdpa_out()  # SDPA is the oracle here: the reference's [H, n, n] mask is too big at 8k
        rows = [self.timed({**cfg, "kernel": "triton"},
                           lambda: paged_prefill_attention(q, k, v, tables, cu, lens, scale), nbytes, ref)]
        if shape.heads * n * n * 4 <= REFERENCE_MAX_KV_BYTES:
            rows.append(self.timed({**cfg, "kernel": "reference"},
                                   lambda: reference.paged_prefill_attention(q, k, v, tables, cu, lens, scale),
                                   nbytes, ref))
        else:
            rows.append({**cfg, "kernel": "reference", "note": "skipped: score matrix too large"})
        rows.append(self.timed({**cfg, "kernel": "sdpa", "note": f"contiguous K/V, causal, {backend}"},
                               sdpa_out, nbytes, None))
        for r in rows:
            r.pop("frac_copy", None)  # compute-bound: a fraction of copy bandwidth means nothing here
            if r.get("us"):
                r["tflops"] = flops / (r["us"] * 1e-6) / 1e12
        return rows


def load_cascade_kernel() -> tuple[Callable | None, str]:
    """`kernels.triton.cascade.cascade_decode_attention`, or None and why not."""
    try:
        from sot_engine.kernels.triton.cascade import cascade_decode_attention
        return cascade_decode_attention, ""
    except ImportError as e:
        return None, f"no Triton cascade kernel ({e})"


def plot(decode_rows: list[dict], copy_gbps: float | None, path: Path) -> Path | None:
    """GB/s against context, one panel per shape, a line per kernel x batch (first dtype measured)."""
    plt = pyplot()
    if plt is None:
        return None
    rows = [r for r in decode_rows if r.get("gbps")]
    if not rows:
        return None
    dtype = rows[0]["dtype"]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4), squeeze=False)
    styles = {"triton": "-", "cuda": "-.", "reference": ":", "sdpa": "--"}
    for ax, sh in zip(axes[0], shapes):
        for kern in DECODE_KERNELS:
            for b in sorted({r["batch"] for r in rows}):
                pts = sorted((r["context"], r["gbps"]) for r in rows if r["shape"] == sh and r["kernel"] == kern
                             and r["batch"] == b and r["dtype"] == dtype)
                if pts:
                    ax.plot(*zip(*pts), styles[kern], marker="o", label=f"{kern} B={b}")
        if copy_gbps:
            ax.axhline(copy_gbps, color="k", lw=0.8)
            ax.axhline(GOAL_FRACTION * copy_gbps, color="r", lw=0.8, ls="--")
        ax.set(xscale="log", xlabel="context (tokens)", ylabel="GB/s", title=f"decode {sh} {dtype}")
        ax.legend(fontsize=6)
    return save_figure(plt, fig, "paged decode: achieved GB/s (black: measured copy bandwidth, red: 80% goal)",
                       path, dpi=110)


def run(quick: bool = False, smoke: bool = False, out_dir: Path | None = None, device: str | None = None,
        budget_s: float = 300.0, copy_gib: float = 1.0) -> dict:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type != "cuda" and not smoke:
        raise SystemExit("benchmarks.kernels_gpu needs CUDA (use --smoke to check the script on CPU)")
    cuda_ext, cuda_note = load_cuda_decode(dev)  # before the clock starts: a first use may compile it
    runner = Runner(dev, budget_s, smoke, cuda_ext, cuda_note)
    if cuda_note:
        print(f"cuda decode kernel {cuda_note}", flush=True)
    name = "kernels_gpu_smoke" if smoke else ("kernels_gpu_quick" if quick else "kernels_gpu")
    payload: dict = {"block_size": BLOCK_SIZE, "quick": quick, "smoke": smoke, "complete": False,
                     "timing": "triton.testing.do_bench, median ms, L2 flushed" if dev.type == "cuda"
                     else "perf_counter median (smoke: meaningless)",
                     "bytes": "decode: K/V rows read + q + out; cascade: prefix once (cascade) or per member (plain)",
                     "copy": None, "decode": [], "cascade": [], "prefill": [], "skipped": [], "cuda_note": cuda_note}
    cascade_fn, why_absent = load_cascade_kernel()
    if cascade_fn is None:
        payload["cascade_note"] = why_absent

    written: list[Path] = []

    def save() -> None:
        payload["summary"] = goal_summary(payload["decode"], payload["cascade"], runner.copy_gbps)
        path = write_result(name, dev, payload)
        written.append(path)
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / f"{name}.json").write_text(path.read_text())

    decode_cfgs = decode_configs(quick, smoke)
    n_goal = sum((c["batch"], c["context"]) == (GOAL_BATCH, GOAL_CONTEXT) for c in decode_cfgs)
    # order: goal decode configs, cascade, the rest of decode, prefill (a cut-short run keeps the goal lines)
    plan = ([("decode", c) for c in decode_cfgs[:n_goal]] + [("cascade", c) for c in cascade_configs(quick, smoke)]
            + [("decode", c) for c in decode_cfgs[n_goal:]] + [("prefill", c) for c in prefill_configs(quick, smoke)])
    with sigterm_as_interrupt(dev.type == "cuda"):
        try:  # `timeout` sends SIGTERM: keep what was measured
            nbytes = int((16 << 20) if smoke else copy_gib * (1 << 30))
            payload["copy"] = copy_bandwidth(dev, nbytes)
            runner.copy_gbps = payload["copy"]["gbps"]
            print(f"copy bandwidth ({nbytes / (1 << 30):.2f} GiB copy_, read + write): {runner.copy_gbps:.0f} GB/s",
                  flush=True)
            for kind, cfg in plan:
                if runner.out_of_time():
                    payload["skipped"].append({"kind": kind, **cfg})
                    continue
                try:
                    if kind == "decode":
                        payload["decode"] += runner.decode(cfg)
                    elif kind == "cascade":
                        payload["cascade"].append(runner.cascade(cfg, cascade_fn, why_absent))
                    else:
                        payload["prefill"] += runner.prefill(cfg)
                except Exception as e:  # noqa: BLE001 - e.g. out of memory building the inputs
                    payload.setdefault("errors", []).append(
                        {"kind": kind, **cfg, "error": f"{type(e).__name__}: {e}"[:300]})
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
            payload["complete"] = not payload["skipped"]
        except KeyboardInterrupt:
            payload["interrupted"] = True
        finally:
            save()
    text = report(payload)
    print(text, flush=True)
    if out_dir is not None:
        (out_dir / f"{name}.txt").write_text(text + "\n")
        png = plot(payload["decode"], runner.copy_gbps, out_dir / f"{name}.png")
        print("plot:", png or "skipped (matplotlib not importable or no rows)")
    print("wrote", written[-1])
    return payload


def report(payload: dict) -> str:
    env = environment(torch.device("cuda")) if torch.cuda.is_available() else {}
    parts = [f"device: {env.get('device', 'cpu')}  torch {torch.__version__}"]
    if payload["decode"]:
        parts += ["", "decode (paged Triton and CUDA kernels vs torch reference vs SDPA on contiguous K/V)",
                  format_table(payload["decode"], DECODE_COLUMNS)]
    if payload["cascade"]:
        parts += ["", "cascade vs plain Triton decode (B rows share a prefix; picked = kernels.cascade.cascade_pays; "
                  "prefix once = cascade time x copy bandwidth < the bytes plain decode reads)",
                  format_table(payload["cascade"], CASCADE_COLUMNS)]
    elif payload.get("cascade_note"):
        parts += ["", f"cascade: {payload['cascade_note']}"]
    if payload["prefill"]:
        parts += ["", "prefill (causal, no cached prefix; compute-bound: TFLOP/s)",
                  format_table(payload["prefill"], PREFILL_COLUMNS)]
    for key in ("errors", "skipped"):
        if payload.get(key):
            parts += ["", f"{key}: {json.dumps(payload[key])}"]
    parts += ["", format_summary(payload.get("summary") or goal_summary(payload["decode"], payload["cascade"], None))]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few shapes (about a minute)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on any device: checks the script, not speed")
    ap.add_argument("--out", type=Path, default=None, help="also write JSON, text table and PNG plot here")
    ap.add_argument("--device", default=None)
    ap.add_argument("--budget-s", type=float, default=float(os.environ.get("KERNELS_GPU_BUDGET_S", 300)),
                    help="stop starting new configs after this many seconds (the rest are listed as skipped)")
    ap.add_argument("--copy-gib", type=float, default=1.0, help="size of the bandwidth-probe copy")
    a = ap.parse_args(argv)
    run(quick=a.quick, smoke=a.smoke, out_dir=a.out, device=a.device, budget_s=a.budget_s, copy_gib=a.copy_gib)


if __name__ == "__main__":
    main()
