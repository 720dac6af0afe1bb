"""The `sot` command line, in-process on the tiny random chat model (its text is noise: check fields, not
content), and the live view on a made-up event sequence."""
from __future__ import annotations

import json

import pytest

from sot_engine.sot import cli

SMALL = ["--normal-max-tokens", "8", "--point-max-tokens", "8", "--skeleton-max-tokens", "16"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def model(tiny_chat_dir) -> list[str]:
    return ["--model", str(tiny_chat_dir), *SMALL]


def test_modes_match_driver():
    from sot_engine.kernels.weights import WEIGHT_DTYPES
    from sot_engine.sot import driver
    assert cli.MODES == driver.MODES and cli.EXPANSIONS == driver.EXPANSIONS and cli.WEIGHT_DTYPES == WEIGHT_DTYPES


@pytest.mark.parametrize("mode", ["sot", "normal"])
def test_ask_json(capsys, model, mode):
    rc, out, _ = run(capsys, "ask", "How do plants grow?", "--json", "--mode", mode, "--seed", "1", *model)
    assert rc == 0
    d = json.loads(out)
    assert d["mode"] in ("sot", "normal") and d["reason"] and isinstance(d["text"], str)
    assert d["timings"]["total"] > 0 and {"skeleton", "expand", "normal"} <= set(d["timings"])
    if mode == "normal":
        assert d["mode"] == "normal" and d["skeleton"] is None and 1 <= d["tokens"]["normal_output"] <= 8
    elif d["mode"] == "sot":  # noise rarely parses into points; if it does, the fields must agree
        assert len(d["points"]) >= 2 and d["tokens"]["normal_output"] == 0
    else:  # fell back, and says why
        assert d["skeleton"] is not None and d["tokens"]["skeleton_output"] >= 1 and "point" in d["reason"]


def test_weights_flag_reaches_the_engine(capsys, model, monkeypatch):
    from sot_engine import engine
    seen = []

    class Spy(engine.LLM):
        def __init__(self, *a, **kw) -> None:
            super().__init__(*a, **kw)
            seen.append(self.engine.weight_dtype)

    monkeypatch.setattr(engine, "LLM", Spy)
    rc, out, _ = run(capsys, "ask", "How do plants grow?", "--json", "--mode", "normal", "--weights", "int8", *model)
    assert rc == 0 and seen == ["int8"] and json.loads(out)["tokens"]["normal_output"] >= 1
    with pytest.raises(SystemExit):  # argparse: not one of the choices
        cli.main(["ask", "q", "--weights", "fp8"])
    assert "invalid choice: 'fp8'" in capsys.readouterr().err


def test_ask_plain(capsys, model):
    rc, out, _ = run(capsys, "ask", "How do plants grow?", "--mode", "sot", *model)
    assert rc == 0
    lines = out.splitlines()
    assert lines[0] == "route: SoT was asked for"
    assert "skeleton:" in lines
    last = lines[-1]
    assert last.startswith("[") and last.endswith("]") and " s | " in last and "tokens" in last
    assert last.startswith("[sot:") or last.startswith("[normal:")


def test_compare(capsys, model):
    rc, out, err = run(capsys, "compare", "How do plants grow?", "--mode", "sot", *model)
    assert rc == 0 and "normal decoding" in err
    last = out.splitlines()[-1]
    assert last.startswith("normal ") and "| SoT " in last and "speed-up" in last and last.endswith("x")
    assert out.count("== ") == 2


def test_compare_json(capsys, model):
    rc, out, _ = run(capsys, "compare", "How do plants grow?", "--json", *model)
    d = json.loads(out)
    assert rc == 0 and d["normal"]["mode"] == "normal" and d["sot"]["mode"] in ("sot", "normal")
    assert d["speedup"] == pytest.approx(d["normal"]["timings"]["total"] / d["sot"]["timings"]["total"])


def test_bench(capsys, model, tmp_path):
    data = tmp_path / "qs.jsonl"
    data.write_text("\n".join(json.dumps({"text": t, "category": "generic"})
                              for t in ("How do plants grow?", "Why is the sky blue?")) + "\n")
    rc, out, _ = run(capsys, "bench", "--dataset", str(data), "--out", str(tmp_path), "--name", "t",
                     "--mode", "sot", *model)
    assert rc == 0
    rows = (tmp_path / "t.jsonl").read_text().splitlines()
    assert len(rows) == 2 and all(json.loads(r)["category"] == "generic" for r in rows)
    assert json.loads((tmp_path / "t.json").read_text())["summary"]["all"]["n"] == 2
    assert f"wrote {tmp_path / 't.jsonl'}" in out and "| category |" in out


def test_bench_warm(capsys, model, tmp_path):
    """--warm: each timed answer right after an SoT answer to an unrelated question, its prefix cache emptied first;
    so the templates' blocks are hits, and a second answer to the same question reuses nothing of the first."""
    from sot_engine.sot.bench import WARM_QUESTION
    data = tmp_path / "qs.jsonl"
    long = "Why is the sky blue in the day and red at sunset, and what does the air have to do with it? " * 3
    data.write_text(json.dumps({"text": long, "category": "generic"}) + "\n")
    for mode in ("sot", "normal"):
        rc, _, _ = run(capsys, "bench", "--dataset", str(data), "--out", str(tmp_path), "--warm", "--mode", mode,
                       *model)
        assert rc == 0
        stem = tmp_path / f"sot_qs_{mode}_paper_warm"
        assert json.loads(stem.with_suffix(".json").read_text())["warm"] == WARM_QUESTION
        row = json.loads(stem.with_suffix(".jsonl").read_text())
        hits = {k: row["counters"][k]["prefix_cache_hit_tokens"] for k in ("normal", "sot")}
        if mode == "sot":  # the skeleton template's blocks, from the warm-up answer (a fallback asked for one too)
            assert hits["sot"] > 0 and row["tokens"]["skeleton_prompt"] > 0
        if mode == "normal":  # the same prompt twice: the second is no warmer than the first
            assert hits["sot"] == hits["normal"] and row["tokens"]["normal_prompt"] > hits["normal"] + 16


def test_bench_warm_needs_prefix_caching(tiny_chat_dir, tmp_path):
    from sot_engine.engine import LLM
    from sot_engine.sot.bench import run_bench
    from sot_engine.sot.driver import SoT
    sot = SoT(LLM(str(tiny_chat_dir), enable_prefix_caching=False))
    with pytest.raises(ValueError, match="warm needs an engine with prefix caching"):
        run_bench(sot, "vicuna80", limit=1, out_dir=tmp_path, warm="Hi?")


def test_empty_question(capsys, model):
    rc, out, err = run(capsys, "ask", "   ", *model)
    assert rc == 2 and out == "" and err.startswith("error: empty question")


def test_bad_dataset(capsys, model):
    rc, _, err = run(capsys, "bench", "--dataset", "nope", *model)
    assert rc == 2 and "unknown dataset 'nope'" in err


def test_bad_dtype(capsys, model):
    rc, _, err = run(capsys, "ask", "Hi there?", "--dtype", "float33", *model)
    assert rc == 2 and "unknown dtype" in err


def test_bad_mode(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["ask", "Hi?", "--mode", "fast"])
    assert e.value.code == 2 and "invalid choice: 'fast'" in capsys.readouterr().err


def _events():
    from sot_engine.sot.driver import Answer, Event, PointAnswer
    from sot_engine.sot.skeleton import Point
    ans = Answer("How to sleep?", "sot", "SoT was asked for", "1. Routine: Go to bed early.\n2. Screens: Avoid them.",
                 skeleton="1. Routine\n2. Screens",
                 points=[PointAnswer(1, "Routine", "Go to bed early.", 5, "stop", "newline", 20, 15),
                         PointAnswer(2, "Screens", "Avoid them.", 3, "stop", "newline", 20, 15)],
                 expansion="paper")
    ans.timings.total, ans.timings.skeleton.decode, ans.timings.expand.decode = 1.5, 0.5, 1.0
    return [Event("route", text="SoT was asked for"), Event("skeleton", text=" Routine\n"),
            Event("skeleton", text="2. Screens"), Event("points", points=[Point(1, "Routine"), Point(2, "Screens")]),
            Event("point", index=2, text=" Avoid"), Event("point", index=1, text=" Go to bed"),
            Event("point", index=2, text=" them."), Event("point_done", index=2, text=" Avoid them."),
            Event("point", index=1, text=" early."), Event("point_done", index=1, text=" Go to bed early."),
            Event("answer", answer=ans)]


def _text(renderable) -> str:
    from rich.console import Console
    con = Console(record=True, width=100)
    con.print(renderable)
    return con.export_text()


def test_live_view_renders_points():
    from sot_engine.sot.view import LiveView
    view = LiveView("How to sleep?")
    evs = _events()
    for ev in evs[:6]:  # mid-way: point 2 has "Avoid", point 1 "Go to bed"
        view.update(ev)
    mid = _text(view.render())
    assert "SoT was asked for" in mid and "1. Routine" in mid and "2. Screens" in mid
    assert "Avoid" in mid and "Go to bed" in mid and "early" not in mid
    for ev in evs[6:]:
        view.update(ev)
    end = _text(view.render())
    assert "Go to bed early." in end and "Avoid them." in end and "✓" in end
    assert "[sot: 2 points, SoT was asked for | 1.50 s" in end


def test_plain_view_prints_points_in_finishing_order():
    import io
    from sot_engine.sot.view import PlainView
    buf = io.StringIO()
    view = PlainView(buf)
    for ev in _events():
        view.update(ev)
    lines = buf.getvalue().splitlines()
    assert lines[:4] == ["route: SoT was asked for", "skeleton:", "1. Routine", "2. Screens"]
    assert lines[5:7] == ["2. Screens: Avoid them.", "1. Routine: Go to bed early."]
    assert lines[7:10] == ["answer:", "1. Routine: Go to bed early.", "2. Screens: Avoid them."]
    assert lines[-1].startswith("[sot: 2 points,")


def test_train_router_then_ask_with_it(capsys, model, tmp_path):
    from tests.sot.test_trained_router import synthetic, write_labels
    from sot_engine.sot.trained_router import FEATURES
    assert cli.FEATURES == FEATURES
    labels = write_labels(tmp_path / "labels.csv", synthetic(60, seed=11))
    out = tmp_path / "r.safetensors"
    rc, text, _ = run(capsys, "train-router", "--labels", str(labels), "--out", str(out))
    assert rc == 0 and out.is_file() and "chose l2=" in text
    rc, text, _ = run(capsys, "ask", "Solve for x: 5x + 2 = 17.", "--json", "--router", str(out), *model)
    d = json.loads(text)
    assert rc == 0 and d["mode"] == "normal" and d["router"] == "trained (text)" and "p=" in d["reason"]
    rc, text, _ = run(capsys, "ask", "What is 3 * 4?", "--json", "--router", "rules", *model)
    assert json.loads(text)["reason"].startswith("rules router: math: ")
    rc, _, err = run(capsys, "ask", "Hi?", "--router", str(tmp_path / "missing.safetensors"), *model)
    assert rc == 2 and "router parameter file not found" in err
    rc, _, err = run(capsys, "train-router", "--labels", str(tmp_path / "none.csv"), "--out", str(out))
    assert rc == 2 and "none.csv" in err


def test_against_llama_cpp_needs_the_extra_and_a_gguf(capsys, model, monkeypatch):
    """--against llama.cpp: a clear error, before anything is timed, without llama-cpp-python or without a GGUF."""
    from sot_engine.sot import llamacpp
    monkeypatch.setattr(llamacpp, "available", lambda: False)
    rc, out, err = run(capsys, "compare", "How do plants grow?", "--against", "llama.cpp", *model)
    assert rc == 2 and "llama.cpp is not installed: pip install 'sot-engine[llamacpp]'" in err
    assert "normal decoding ..." not in err
    monkeypatch.setattr(llamacpp, "available", lambda: True)
    monkeypatch.setattr(llamacpp, "require", lambda: None)
    rc, _, err = run(capsys, "bench", "--dataset", "vicuna80", "--against", "llama.cpp", *model)
    assert rc == 2 and "not a GGUF file" in err


def test_bench_table_against_llama_cpp():
    from sot_engine.sot.bench import summarize, table
    rows = [{"category": c, "mode": m, "normal_latency": n, "sot_latency": s, "normal_tokens": 10, "sot_tokens": 12,
             "llama_cpp_latency": lc, "llama_cpp_tokens": 9, "speedup_vs_llama_cpp": lc / s}
            for c, m, n, s, lc in (("generic", "sot", 2.0, 1.0, 3.0), ("generic", "normal", 2.0, 2.0, 1.0),
                                   ("math", "normal", 1.0, 1.0, 2.0))]
    summary = summarize(rows)
    assert summary["generic"]["llama_cpp_latency"] == 2.0 and summary["generic"]["speedup_vs_llama_cpp"] == 2.0 / 1.5
    assert summary["all"]["speedup_vs_llama_cpp"] == pytest.approx(2.0 / (4 / 3))
    lines = table(summary).splitlines()
    assert "| llama.cpp normal s | SoT vs llama.cpp |" in lines[0] and lines[1].count("|") == lines[0].count("|")
    assert "| 2.0 | 1.33x |" in lines[2]
    assert "llama.cpp" not in table(summarize([{k: v for k, v in r.items() if "llama" not in k} for r in rows]))
