"""Benchmarks' --quick modes run end to end (speed is never asserted)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_decode_cpu_quick(tmp_path):
    env = {**os.environ, "SOT_BENCH_RESULTS": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "benchmarks.decode_cpu", "--quick", "--batches", "1,2"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    d = json.loads((tmp_path / "cpu" / "decode_cpu_quick.json").read_text())
    assert [row["batch"] for row in d["rows"]] == [1, 2]
    assert all(row["ms_per_step"] > 0 for row in d["rows"]) and d["env"]["device_type"] == "cpu"
