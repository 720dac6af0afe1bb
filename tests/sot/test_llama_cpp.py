"""SoT against llama.cpp's normal decoding on the same GGUF (`--against llama.cpp`), where llama-cpp-python (the
optional `llamacpp` extra, a benchmark dependency: CI does not build it) is installed. The numbers it prints are
measurements (benchmarks/), not asserted here: these check that both sides ran and are reported consistently."""
from __future__ import annotations

import json

import pytest

from sot_engine.sot import cli, llamacpp
from tests.conftest import requires_smollm2

pytestmark = [requires_smollm2, pytest.mark.skipif(not llamacpp.available(), reason=llamacpp.INSTALL)]
SMALL = ["--normal-max-tokens", "16", "--point-max-tokens", "8", "--skeleton-max-tokens", "24"]


def test_generate_stops_at_the_cap_or_a_stop_token():
    from sot_engine.engine.loader import default_model_path, load_model
    prompt = load_model("default").tokenizer.encode("<|im_start|>user\nName a color.<|im_end|>\n<|im_start|>assistant\n")
    lc = llamacpp.LlamaCpp(default_model_path(), 2)
    try:
        toks, seconds = lc.generate(prompt, 12, stop_ids=set())
        assert len(toks) == 12 and seconds > 0
        again, _ = lc.generate(prompt, 12, stop_ids={toks[4]})  # greedy: the same tokens, cut at the stop
        assert again == toks[:5]
    finally:
        lc.close()


def test_compare_and_bench_against_llama_cpp(capsys, tmp_path):
    assert cli.main(["compare", "How do plants grow?", "--model", "default", "--against", "llama.cpp", "--json",
                     "--mode", "sot", *SMALL]) == 0
    d = json.loads(capsys.readouterr().out)
    lc = d["llama_cpp"]
    assert 0 < lc["tokens"] <= 16 and lc["seconds"] > 0 and lc["text"]
    assert d["speedup_vs_llama_cpp"] == pytest.approx(lc["seconds"] / d["sot"]["timings"]["total"])
    data = tmp_path / "qs.jsonl"
    data.write_text(json.dumps({"text": "Why is the sky blue?", "category": "generic"}) + "\n")
    assert cli.main(["bench", "--dataset", str(data), "--out", str(tmp_path), "--name", "t", "--model", "default",
                     "--against", "llama.cpp", *SMALL]) == 0
    row = json.loads((tmp_path / "t.jsonl").read_text())
    assert row["llama_cpp_latency"] > 0 and 0 < row["llama_cpp_tokens"] <= 16
    assert "SoT vs llama.cpp" in capsys.readouterr().out
