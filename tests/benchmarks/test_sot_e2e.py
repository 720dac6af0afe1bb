"""benchmarks.sot_e2e: a run recorded by `sot bench` on the tiny chat model, replayed with forced lengths on
random weights of the same shape, must spend exactly the engine work the real run spent; the backfill must
rebuild a record's trace from its text; --quick runs end to end (shape of the output only, never speed)."""
from __future__ import annotations

import json

import pytest
import torch

from benchmarks import sot_e2e
from sot_engine.engine import LLM
from sot_engine.sot.bench import run_bench
from sot_engine.sot.driver import SoT, SoTConfig
from sot_engine.sot.prompts import SoTPrompts

QUESTIONS = [("How can I learn faster?", "generic"), ("What is 12*7?", "math"),
             ("What are good ways to save money?", "generic")]
# the skeleton prefill holds the whole list (max_points=3: only its end may follow): SoT runs on noise weights
LISTED = SoTPrompts(skeleton_prefill="1. Alpha\n2. Beta\n3. Gamma\n")


@pytest.fixture(autouse=True)
def results_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setattr("benchmarks.common.RESULTS", tmp_path / "results")


@pytest.fixture(scope="module")
def recorded(tiny_chat_dir, tmp_path_factory):
    """`sot bench` on the tiny chat model, both expansions: {expansion: records path}."""
    out = tmp_path_factory.mktemp("recorded")
    data = out / "qs.jsonl"
    data.write_text("".join(json.dumps({"question_id": i + 1, "text": t, "category": c}) + "\n"
                            for i, (t, c) in enumerate(QUESTIONS)))
    llm = LLM(str(tiny_chat_dir), device="cpu", dtype=torch.float32, num_threads=1, enable_prefix_caching=False)
    paths = {}
    for expansion in ("paper", "continuation"):
        sot = SoT(llm, SoTConfig(prompts=LISTED, expansion=expansion, skeleton_max_tokens=24, point_max_tokens=6,
                                 normal_max_tokens=12, ngram=0, max_points=3))
        path, _ = run_bench(sot, str(data), name=f"rec_{expansion}", out_dir=out, log=lambda *a: None)
        paths[expansion] = path.with_suffix(".jsonl")
    return paths


@pytest.mark.parametrize("expansion", ["paper", "continuation"])
def test_replay_spends_the_recorded_engine_work(recorded, expansion):
    rows = sot_e2e.read_records(recorded[expansion])
    assert [r["trace"]["sot"]["mode"] for r in rows] == ["sot", "normal", "sot"]  # the router sent 12*7 normal
    assert all(len(r["trace"]["sot"]["points"]["prompt"]) == 3 for r in rows if r["mode"] == "sot")
    assert rows[0]["trace"]["sot"]["points"]["from_skeleton"] == (expansion == "continuation")
    _, payload = sot_e2e.run_replay(recorded[expansion], "tiny", ["ours"], device=torch.device("cpu"),
                                    dtype=torch.float32, threads=1, log=lambda *a: None)
    ours = payload["systems"]["ours"]
    assert ours["complete"] and len(ours["rows"]) == 3
    for rep, rec in zip(ours["rows"], rows):
        assert rep["tokens_ok"], rep  # every output came out at its recorded length
        assert rep["counters"] == rec["counters"], (rep["question_id"], rep["counters"], rec["counters"])
        assert rep["counters_equal"] is True
    assert ours["validation"]["counters_equal"] == "3/3" and ours["validation"]["latency_ratio_sot"] > 0


def test_backfill_rebuilds_the_trace(recorded, tiny_chat_dir, tmp_path):
    src = recorded["paper"]  # paper point prompts do not depend on the (custom) skeleton prefill
    path = tmp_path / src.name
    rows = sot_e2e.read_records(src)
    stripped = [{k: v for k, v in r.items() if k not in ("trace", "counters")} for r in rows]
    path.write_text("".join(json.dumps(r) + "\n" for r in stripped))
    path.with_suffix(".json").write_text(src.with_suffix(".json").read_text())
    assert sot_e2e.backfill(path, str(tiny_chat_dir)) == 3
    assert [r["trace"] for r in sot_e2e.read_records(path)] == [r["trace"] for r in rows]


def test_select_round_robin_and_cap():
    rows = [{"question_id": i, "category": c} for i, c in enumerate("aaabbc")]
    assert [r["question_id"] for r in sot_e2e.select(rows)] == [0, 3, 5, 1, 4, 2]
    assert [r["question_id"] for r in sot_e2e.select(rows, per_category=1)] == [0, 3, 5]
    assert [r["question_id"] for r in sot_e2e.select(rows, per_category=2, limit=4)] == [0, 3, 5, 1]
    tr = {"normal": [40, 256], "sot": {"mode": "sot", "skeleton": [270, 40],
                                       "points": {"prompt": [140, 141], "output": [30, 5], "shared": 100}}}
    cut = sot_e2e.cap_trace(tr, 8)
    assert cut["normal"] == [40, 8] and cut["sot"]["skeleton"] == [270, 8]
    assert cut["sot"]["points"]["output"] == [8, 5] and tr["sot"]["points"]["output"] == [30, 5]
    assert sot_e2e.sot_output_tokens(tr["sot"]) == 75


def test_committed_records_have_traces():
    for name in ("sot_vicuna80_auto_paper", "sot_vicuna80_auto_continuation"):
        rows = sot_e2e.read_records(sot_e2e.DEFAULT_RECORDS.with_name(f"{name}.jsonl"))
        assert rows and all("trace" in r for r in rows)
        for r in rows:
            pts = r["trace"]["sot"].get("points")
            if pts:
                assert sum(pts["prompt"]) == r["tokens"]["expand_prompt"]
                assert [p["tokens"] for p in r["points"]] == pts["output"] and 0 < pts["shared"] < min(pts["prompt"])


def test_quick(tmp_path):
    sot_e2e.main(["--quick"])
    d = json.loads((tmp_path / "results" / "cpu" / "sot_e2e_vicuna80_auto_paper_tiny_quick.json").read_text())
    assert d["env"]["device_type"] == "cpu" and d["model"] == "random:tiny" and set(d["systems"]) == {"ours", "hf"}
    for s in d["systems"].values():
        assert s["complete"] and len(s["rows"]) == 3 and all(r["tokens_ok"] for r in s["rows"])
        assert s["summary"]["all"]["n"] == 3 and all(r["sot_latency"] > 0 for r in s["rows"])
        assert "latency_ratio_sot" not in s["validation"]  # outputs were cut: nothing to compare with
    assert {"all", "generic"} <= set(d["compare"]) and d["compare"]["all"]["ours_vs_paper"] > 0
    assert d["compare_cpu"]["all"]["ours_vs_paper"] > 0 and d["compare_cpu"]["all"]["real_speedup"] > 0
    assert (tmp_path / "results" / "cpu" / "sot_e2e_vicuna80_auto_paper_tiny_quick.png").stat().st_size > 0
    # the README renderer takes it as a real result: the ours-vs-paper table per category
    from benchmarks import report
    out = tmp_path / "results" / "cpu"
    (out / "sot_e2e_x_tiny.json").write_text((out / "sot_e2e_vicuna80_auto_paper_tiny_quick.json").read_text())
    text = report.render()
    assert "our SoT vs paper's |" in text and "| generic | 1 | 1 |" in text and "forced lengths all met" in text
    assert "ours normal CPU s" in text


def test_validate_interleaves_real_and_replay(tiny_chat_dir, tmp_path):
    data = tmp_path / "qs.jsonl"
    data.write_text("".join(json.dumps({"question_id": i + 1, "text": t, "category": c}) + "\n"
                            for i, (t, c) in enumerate(QUESTIONS)))
    path, d = sot_e2e.validate(str(tiny_chat_dir), device=torch.device("cpu"), dtype=torch.float32, backend=None,
                               threads=1, per_category=1, expansion="paper", normal_max_tokens=8,
                               dataset=str(data), out_dir=tmp_path, log=lambda *a: None)
    assert path == tmp_path / "results" / "cpu" / "sot_e2e_qs_validate_paper_tiny.json" and d["model"] == "random:tiny"
    v = d["systems"]["ours"]["validation"]
    assert v["n"] == 2 and v["counters_equal"] == "2/2" and v["tokens_ok"] and v["latency_ratio_sot_median"] > 0
    assert v["cpu_ratio_sot"] > 0 and v["cpu_ratio_normal"] > 0
    assert [r["question_id"] for r in d["systems"]["ours"]["rows"]] == [1, 2]  # one per category, round robin
