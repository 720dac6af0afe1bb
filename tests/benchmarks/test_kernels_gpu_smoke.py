"""benchmarks.kernels_gpu without a GPU: its arithmetic, tables, config lists and goal check; the whole run in
`--smoke` size (Triton's interpreter on CPU; compiled kernels on CUDA). Speed is never asserted."""
from __future__ import annotations

import json

import pytest
import torch

from benchmarks import kernels_gpu as kg
from sot_engine.kernels.cascade import cascade_pays

LLAMA = kg.shape_by_name("llama7b")
GQA = kg.shape_by_name("gqa32/8")
SMOL = kg.shape_by_name("smollm2")


def test_shapes():
    assert [(s.heads, s.kv_heads, s.head_dim) for s in kg.SHAPES] == [(32, 32, 128), (32, 8, 128), (9, 3, 64)]
    assert [s.group for s in kg.SHAPES] == [1, 4, 3]


def test_bytes_moved():
    # B=8, context 2048, LLaMA-7B MHA in bf16: K and V rows 8 * 2048 * 32 * 128 * 2 bytes each, + q and out
    assert kg.decode_bytes(8, 2048, LLAMA, 2) == 2 * 8 * 2048 * 32 * 128 * 2 + 2 * 8 * 32 * 128 * 2
    # GQA reads 4x fewer K/V bytes, the same q/out
    assert kg.decode_bytes(8, 2048, GQA, 2) - kg.qo_bytes(8, GQA, 2) == kg.kv_bytes(8 * 2048, LLAMA, 2) // 4
    # cascade reads the prefix once; plain decode once per member; identical with one member
    plain = kg.cascade_bytes(8, 1024, 64, SMOL, 2, shared=False)
    casc = kg.cascade_bytes(8, 1024, 64, SMOL, 2, shared=True)
    assert plain == kg.decode_bytes(8, 1024 + 64, SMOL, 2)
    assert plain - casc == kg.kv_bytes(7 * 1024, SMOL, 2)
    assert kg.cascade_bytes(1, 512, 64, SMOL, 2, True) == kg.cascade_bytes(1, 512, 64, SMOL, 2, False)
    assert kg.prefill_flops(1, 4, LLAMA) == 4 * 32 * 128 * 10  # 4 + 3 + 2 + 1 causal pairs
    assert kg.prefill_bytes(2, 8, SMOL, 4) == kg.kv_bytes(16, SMOL, 4) + kg.qo_bytes(16, SMOL, 4)
    assert kg.gbps(2e9, 1000.0) == pytest.approx(2.0) and kg.gbps(1, None) is None
    assert kg.element_size(torch.bfloat16) == 2 and kg.element_size(torch.float32) == 4


def test_config_lists():
    full = kg.decode_configs()
    assert len(full) == 3 * 2 * 3 * 3
    assert {(c["batch"], c["context"]) for c in full[:6]} == {(8, 2048)}  # goal configs first
    assert {c["dtype"] for c in full} == {"bf16", "fp16"}
    quick = kg.decode_configs(quick=True)
    assert 0 < len(quick) < 10 and any((c["batch"], c["context"]) == (8, 2048) for c in quick)
    for cfg in kg.cascade_configs() + kg.cascade_configs(quick=True):
        assert cfg["prefix"] % kg.BLOCK_SIZE == 0 and cfg["members"] == 8 and cfg["suffix"] == 64
    assert {c["prefix"] for c in kg.cascade_configs()} == {512, 1024, 2048}
    assert all(c["shape"] in {s.name for s in kg.SHAPES} for c in kg.prefill_configs())


def test_cost_model_marking():
    for cfg in kg.cascade_configs():
        s = kg.shape_by_name(cfg["shape"])
        assert kg.cost_model_picks(8, cfg["prefix"], 64, s) == cascade_pays(8, cfg["prefix"], 64, s.group)
    assert kg.cost_model_picks(8, 64, 64, GQA) == cascade_pays(8, 64, 64, 4)


def test_prefix_once_evidence():
    ev = kg.prefix_once_evidence(100.0, 3000.0, plain_bytes=10**9)  # 100 us at 3 TB/s moves at most 0.3 GB
    assert ev["reads_prefix_once"] and ev["max_bytes_at_copy_bw"] == pytest.approx(3e8)
    assert not kg.prefix_once_evidence(1000.0, 3000.0, plain_bytes=10**9)["reads_prefix_once"]
    assert kg.prefix_once_evidence(1.0, None, 1) == {}


def test_table_and_goal():
    rows = [{"shape": "llama7b", "dtype": "bf16", "batch": 8, "context": 2048, "kernel": "triton", "us": 100.0,
             "gbps": 2700.0, "frac_copy": 0.9, "max_err": 1e-3},
            {"shape": "gqa32/8", "dtype": "bf16", "batch": 8, "context": 2048, "kernel": "triton", "us": 50.0,
             "gbps": 2000.0, "frac_copy": 0.66},
            {"shape": "gqa32/8", "dtype": "bf16", "batch": 8, "context": 2048, "kernel": "reference",
             "note": "skipped"}]
    text = kg.format_table(rows, kg.DECODE_COLUMNS)
    lines = text.splitlines()
    assert len(lines) == 2 + len(rows) and lines[0].split()[:4] == ["shape", "dtype", "B", "ctx"]
    assert "90%" in lines[2] and "2700" in lines[2] and "1.0e-03" in lines[2]
    assert lines[4].split()[-1] == "skipped" and " - " in lines[4]  # missing numbers print as '-'
    casc = [{"shape": "smollm2", "dtype": "bf16", "prefix": 512, "picked": True, "speedup": 1.5},
            {"shape": "smollm2", "dtype": "bf16", "prefix": 1024, "picked": True, "speedup": 0.99},  # noise
            {"shape": "llama7b", "dtype": "bf16", "prefix": 512, "picked": False, "speedup": 0.8}]
    s = kg.goal_summary(rows, casc, 3000.0)
    assert s["decode_ok"] is False and s["decode_fractions"] == {"llama7b/bf16": 0.9, "gqa32/8/bf16": 0.66}
    assert s["cascade_ok"] is True and s["cascade_slower_unpicked"] == ["llama7b/bf16/p512"]
    assert kg.goal_summary(rows[:1], casc[:1] + [{**casc[1], "speedup": 0.9}], 3000.0)["cascade_ok"] is False
    assert kg.goal_summary(rows[:1], [], None) == {**kg.goal_summary(rows[:1], [], None), "decode_ok": True,
                                                   "cascade_ok": None}
    out = kg.format_summary(s)
    assert "NOT MET" in out and "MET" in out and "3000 GB/s" in out
    assert s["cuda_decode_fractions"] == {} and "the CUDA kernel there: -" in out
    cuda = {**rows[0], "kernel": "cuda", "frac_copy": 0.853}  # reported beside the goal, never part of it
    s2 = kg.goal_summary(rows + [cuda], casc, 3000.0)
    assert s2["cuda_decode_fractions"] == {"llama7b/bf16": 0.853} and s2["decode_ok"] == s["decode_ok"]
    assert '"llama7b/bf16": 0.853' in kg.format_summary(s2)
    assert "n/a" in kg.format_summary(kg.goal_summary([], [], None))


def test_smoke_run(tmp_path, monkeypatch):
    """The whole main path at toy size on whatever device there is; results land in a temporary folder."""
    monkeypatch.setattr("benchmarks.common.RESULTS", tmp_path / "results")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    payload = kg.run(smoke=True, out_dir=tmp_path / "out", device=dev)
    assert payload["complete"] and not payload.get("errors")
    kernels = {r["kernel"] for r in payload["decode"]}
    assert kernels == set(kg.DECODE_KERNELS)
    for r in payload["decode"]:  # the CUDA kernel: timed on a GPU where it builds, else a row saying why not
        cuda_absent = r["kernel"] == "cuda" and (dev == "cpu" or payload["cuda_note"])
        assert (r["note"].startswith("unavailable") and "us" not in r) if cuda_absent else r.get("us"), r
    assert bool(payload["cuda_note"]) == (dev == "cpu") or payload["cuda_note"].startswith("unavailable")
    for r in payload["decode"] + payload["prefill"]:
        assert "note" not in r or not r["note"].split(":")[0].endswith("Error"), r
        assert r.get("max_err") is None or r["max_err"] < 1e-3, r
    casc = payload["cascade"][0]
    assert casc["plain_us"] and casc["picked"] is False
    assert casc.get("cascade_us") or "no Triton cascade kernel" in casc.get("note", "")
    saved = json.loads((tmp_path / "results" / dev / "kernels_gpu_smoke.json").read_text())
    assert saved["env"]["device_type"] == dev and saved["summary"]["copy_gbps"] > 0
    assert (tmp_path / "out" / "kernels_gpu_smoke.json").exists()
    assert "decode (paged Triton" in (tmp_path / "out" / "kernels_gpu_smoke.txt").read_text()
