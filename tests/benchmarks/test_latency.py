"""benchmarks.latency: its byte/FLOP arithmetic against an independent count, and the --quick run end to end
(the JSON is checked for shape, never for speed)."""
from __future__ import annotations

import json

import pytest

from benchmarks import latency
from benchmarks.latency import Cost, prefill_keys, roofline_ms, sot_pairs
from sot_engine.engine.config import shape


@pytest.mark.parametrize("tied", [False, True])
def test_params_match_transformers(tied):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = shape("tiny", tie_word_embeddings=tied)
    hf = LlamaForCausalLM(LlamaConfig(**cfg.to_hf()))
    assert Cost(cfg, 4).params == sum(p.numel() for p in hf.parameters())


def test_published_sizes_and_bytes():
    # LLaMA-7B/13B/33B: 6.7B, 13.0B, 32.5B parameters (the paper's Table 1 models)
    assert [round(Cost(shape(n), 2).params / 1e9, 1) for n in ("llama-7b", "llama-13b", "llama-33b")] == \
        [6.7, 13.0, 32.5]
    c = Cost(shape("llama-7b"), 2)
    # a step reads every weight but the embedding table (only B rows of it): 6.61B weights in fp16
    assert c.weight_bytes == 2 * (c.params - 32000 * 4096)
    assert c.kv_bytes(1) == 2 * 32 * 4096 * 2  # K and V, 32 layers, 4096 wide, fp16: 512 KiB per token
    # one decode token at context 1: 2 FLOPs per matmul weight, the head, attention over 1 key
    assert c.flops(1, 1, 1) == 2 * c.matmul_params + 2 * 32000 * 4096 + 4 * 32 * 4096
    assert prefill_keys(4) == 10 and roofline_ms(10**9, 10**9, 2000.0) == pytest.approx(1.0)
    assert roofline_ms(1, 1, None) is None


def test_sot_pairs():
    rows = [{"members": 4, "prefix": 512, "suffix": 16, "cascade": "off", "decode_ms_per_step": 10.0},
            {"members": 4, "prefix": 512, "suffix": 16, "cascade": "on", "decode_ms_per_step": 8.0,
             "cascade_steps": 64, "cascade_available": True, "vs_roofline": 1.5}]
    (p,) = sot_pairs(rows)
    assert p["speedup"] == pytest.approx(1.25) and p["on_cascade_steps"] == 64 and p["note"] == ""


def test_quick_run(tmp_path, monkeypatch):
    monkeypatch.setattr("benchmarks.common.RESULTS", tmp_path)
    latency.main(["--quick"])
    d = json.loads((tmp_path / "cpu" / "latency_tiny_quick.json").read_text())
    assert d["complete"] and not d.get("errors") and d["env"]["device_type"] == "cpu" and "triton" in d["env"]
    assert [row["batch"] for row in d["batches"]] == [1, 2] and d["copy"]["gbps"] > 0
    for row in d["batches"]:
        assert row["decode_steps"] == d["decode"] and row["prefill_ms"] > 0 and row["decode_ms_per_step"] > 0
        assert row["roofline_ms"] > 0 and row["vs_roofline"] > 0 and row["peak_mem_gib"] is None  # CUDA only
    assert [(s["members"], s["cascade"]) for s in d["sot"]] == [(2, "off"), (2, "on")]
    off, on = d["sot"]
    assert off["cascade_steps"] == 0 and on["cascade_steps"] == d["decode"]  # cascade ran on every decode step
    assert on["kv_bytes_per_step"] < off["kv_bytes_per_step"]  # the shared prefix counted once
    assert d["sot_pairs"][0]["speedup"] > 0
    assert (tmp_path / "cpu" / "latency_tiny_quick.png").stat().st_size > 0
    # the README renderer takes it as a real result
    from benchmarks import report
    (tmp_path / "cpu" / "latency_tiny.json").write_text((tmp_path / "cpu" / "latency_tiny_quick.json").read_text())
    text = report.render()
    assert "Table 1 / Fig. 3" in text and "| tiny float32 | 2 |" in text and "2 points" in text
