"""64 concurrent streaming requests: all complete, none fails, no block leaks (speed is only reported)."""
from __future__ import annotations

import asyncio

from benchmarks.server_load import load
from sot_engine.sot.bench import load_dataset


def test_64_concurrent_streams(tiny_chat_dir):
    from sot_engine.engine import LLM
    from sot_engine.sot.server.background import BackgroundServer
    # a pool that holds ~a third of the load at once: requests queue, join as blocks free, some get preempted
    srv = BackgroundServer(LLM(str(tiny_chat_dir), max_model_len=512, num_blocks=600, block_size=8,
                               max_num_seqs=64))
    try:
        questions = [q.text for q in load_dataset("vicuna80")][:64]
        results = asyncio.run(load(srv, questions, max_tokens=12))
        st = srv.wait_idle()
    finally:
        srv.close()
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    assert all(r["tokens"] == 12 for r in results)  # ignore_eos: every stream ran to its length
    assert st["free_blocks"] == st["total_blocks"], st
    assert st["max_decode_batch"] > 8  # they ran batched
    assert sum(r["cached"] for r in results) > 0  # the shared system prompt came from the prefix cache


def test_cli_quick(tmp_path):
    """`python -m benchmarks.server_load --quick` on the embedded model writes well-formed results."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path
    env = {**os.environ, "SOT_BENCH_RESULTS": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "benchmarks.server_load", "--quick"], cwd=Path(__file__).parents[2],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "cpu" / "server_load_quick.json").read_text())
    assert res["errors"] == [] and res["leaked_blocks"] == 0 and res["requests"] == 16
    assert res["latency_s"]["p50"] <= res["latency_s"]["p99"] and res["env"]["device_type"] == "cpu"
