"""Benchmarks' --quick modes run end to end (speed is never asserted)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import requires_smollm2

ROOT = Path(__file__).resolve().parents[2]


def run_quick(tmp_path: Path, module: str, *args: str, timeout: int = 600) -> tuple[dict, str]:
    """`python -m benchmarks.<module> --quick *args` writing under tmp_path: (its cpu/<module>_quick.json, stdout)."""
    env = {**os.environ, "SOT_BENCH_RESULTS": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", "--quick", *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr
    return json.loads((tmp_path / "cpu" / f"{module}_quick.json").read_text()), r.stdout


def test_decode_cpu_quick(tmp_path):
    d, stdout = run_quick(tmp_path, "decode_cpu", "--batches", "1,2", "--weights", "fp32,int8,bf16-matmul+kv-bf16",
                          "--rounds", "2", timeout=300)
    assert [(row["weights"], row.get("kv"), row["batch"]) for row in d["rows"]] == [
        ("fp32", None, 1), ("fp32", None, 2), ("int8", None, 1), ("int8", None, 2), ("bf16-matmul", "bf16", 1),
        ("bf16-matmul", "bf16", 2)]
    assert d["rounds"] == 2 and stdout.count("round 2/2") == 6
    assert all(row["ms_per_step"] > 0 and 0 < row["matmul_ms"] < row["ms_per_step"] and 0 < row["outside_matmul"] < 1
               for row in d["rows"]) and d["env"]["device_type"] == "cpu"
    from benchmarks.report import decode_cpu_table  # the README table renders from it
    table = decode_cpu_table(tmp_path / "cpu" / "decode_cpu_quick.json").splitlines()
    rows = [line for line in table if line.startswith("| cpp") or line.startswith("| torch")]
    from sot_engine.kernels import _cpp
    isas = {f"{v} (int8: {i})" for v in _cpp.COMPILED_VARIANTS for i in ("scalar", "avx2", "avx512vnni")}
    assert all(row["isa"] in isas for row in d["rows"])  # the kernel variant, what the integer kernels ran on
    cells = [[c.strip() for c in line.split("|")[2:5]] for line in rows]  # weights, isa, batch
    assert len(rows) == 6 and cells[3][0::2] == ["int8", "2"] and cells[3][1] in isas and "llama.cpp" in table[-1]
    assert cells[-1][0::2] == ["bf16-matmul, kv bf16", "2"]


def test_attention_cpu_quick(tmp_path):
    pytest.importorskip("sot_engine.kernels._cpp")
    d, stdout = run_quick(tmp_path, "attention_cpu", "--rounds", "1", "--steps", "6", timeout=300)
    assert [(r["batch"], r["context"]) for r in d["rows"]] == [(1, 64), (1, 256), (8, 64), (8, 256)]
    for r in d["rows"]:  # both settings ran, each timed by the fused loop's own attention timer
        for k in ("parts", "tasks"):
            assert 0 < r[f"attention_ms_{k}"] < r[f"ms_per_step_{k}"]
    from benchmarks.report import attention_cpu_table
    table = attention_cpu_table(tmp_path / "cpu" / "attention_cpu_quick.json").splitlines()
    assert table[-1].startswith("| 8 | 256 |") and len(table) == 8


@requires_smollm2
def test_quant_accuracy_quick(tmp_path):
    d, _ = run_quick(tmp_path, "quant_accuracy")
    (row,) = d["rows"]
    assert row["variant"] == "gguf" and len(row["logit_diff_per_prompt"]) == 2 and d["tokens"] == 8
    assert 0 < row["max_logit_diff"] < 5 and all(0 <= a <= 8 for a in row["greedy_first_difference"])
    assert 0 <= row["greedy_same_fraction"] <= 1


@requires_smollm2
def test_startup_quick(tmp_path):
    d, _ = run_quick(tmp_path, "startup")
    run = d["runs"]["after"]
    e2e, phases = run["end_to_end_s"], run["phases_s"]
    assert 0 < e2e["route"] < e2e["first_skeleton_token"]
    assert all(v > 0 for k, v in phases.items() if k != "model_load_parts")
    parts = phases["model_load_parts"]
    assert set(parts) == {"gguf_open", "dequantize", "tokenizer", "hugepage_copy"} and sum(parts.values()) < \
        phases["model_load"]
    from benchmarks.report import startup_table
    table = startup_table(tmp_path / "cpu" / "startup_quick.json")
    assert "| after | `python -m sot_engine ask` |" in table and "model load" in table


@requires_smollm2
def test_guided_cpu_quick(tmp_path):
    d, _ = run_quick(tmp_path, "guided_cpu")
    cases = d["cases"]
    assert set(cases) == {"skeleton", "points", "json in 8"}
    assert cases["skeleton"]["constrained_rows"] == 1 and cases["points"]["constrained_rows"] == 8
    for c in cases.values():
        assert c["steps"] > 0 and c["step_ms"] > 0 and 0 <= c["share"] < 1
        assert c["share"] == pytest.approx((c["mask_ms"] + c["processors_ms"]) / c["step_ms"])
    from benchmarks.report import guided_cpu_table
    assert guided_cpu_table(tmp_path / "cpu" / "guided_cpu_quick.json").count("\n| ") == 4  # header + 3 cases
