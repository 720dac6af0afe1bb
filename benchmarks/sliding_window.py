"""Sliding windows: what a windowed decode step reads, and what freeing the blocks behind the window would save.

The engine keeps a windowed sequence's blocks (the prefix cache and fork share them; Gemma 3's global layers read
them; one block table serves every layer). This measures both halves of that choice:
1. paged decode attention (the device's default backend) with and without a window, over growing contexts: with
   a window the kernels read only the window's keys, so the time stops growing at the window;
2. KV memory: blocks a sequence holds, and the share a free-behind-the-window policy could give back, for
   Mistral-7B v0.1 (every layer windowed at 4096) and Gemma 3 270M (local layers at 512, every 6th global).

    python -m benchmarks.sliding_window [--device cuda] [--contexts 512 2048 4096] [--window 512]
"""
from __future__ import annotations

import argparse

import torch

from benchmarks.common import bench_ms, write_result
from sot_engine.kernels import get_backend


def attention_ms(device: torch.device, contexts: list[int], window: int, batch: int = 8, heads: int = 32,
                 kv_heads: int = 8, head_dim: int = 128, block: int = 16) -> list[dict]:
    """Mistral-7B's attention shape (32 query heads over 8 KV heads of 128), bf16 pool on the CPU (float32 q)."""
    backend = get_backend(None, device)
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for ctx in contexts:
        nblk = -(-ctx // block)
        g = torch.Generator().manual_seed(ctx)
        k = torch.randn(batch * nblk, block, kv_heads, head_dim, generator=g).to(device, torch.bfloat16)
        v = torch.randn(batch * nblk, block, kv_heads, head_dim, generator=g).to(device, torch.bfloat16)
        q = torch.randn(batch, heads, head_dim, generator=g).to(device, dt)
        tables = torch.randperm(batch * nblk, generator=g).view(batch, nblk).to(device)
        lens = torch.full((batch,), ctx, device=device)
        row = {"context": ctx, "batch": batch, "backend": backend.name}
        for name, w in (("whole_ms", 0), ("window_ms", window)):
            row[name] = round(bench_ms(lambda: backend.paged_decode_attention(q, k, v, tables, lens, 0.088, ctx, w),
                                       device, reps=5), 3)
        rows.append(row)
        print(f"context {ctx:6d}: whole context {row['whole_ms']:8.3f} ms, window {window}: {row['window_ms']:8.3f} ms")
    return rows


def kv_blocks(context: int, window: int, all_local: bool, block: int = 16) -> dict:
    """Blocks one sequence holds (kept) and the blocks a free-behind-the-window policy could release: only where
    every layer is local (one block table serves all layers, so one global layer keeps every block)."""
    held = -(-context // block)
    freeable = max(0, (context - window) // block) if all_local else 0
    return {"context": context, "window": window, "blocks_held": held, "blocks_freeable": freeable,
            "freeable_share": round(freeable / held, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--contexts", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    ap.add_argument("--window", type=int, default=512)
    args = ap.parse_args()
    device = torch.device(args.device)
    rows = attention_ms(device, args.contexts, args.window)
    memory = {"mistral-7b-v0.1 (all layers, window 4096)": [kv_blocks(c, 4096, True) for c in (4096, 8192, 32768)],
              "gemma3-270m (5 of 6 layers local, window 512)": [kv_blocks(c, 512, False) for c in (512, 2048, 32768)]}
    for model, entries in memory.items():
        for e in entries:
            print(f"{model}: context {e['context']}: holds {e['blocks_held']} blocks, "
                  f"{e['blocks_freeable']} freeable ({e['freeable_share']:.0%})")
    out = write_result("sliding_window", device, {"window": args.window, "attention": rows, "kv_memory": memory})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
