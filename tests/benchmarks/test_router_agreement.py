"""benchmarks.router_agreement on tiny hand-made label files: the counts are checked by hand."""
from __future__ import annotations

import json

from benchmarks.router_agreement import main

# label;request -- what the router says is in the comment
VICUNA = """label;request
1;How can I improve my time management skills?
1;What is 12*7?
0;What is the capital of Mongolia?
0;What are the pros and cons of living in a big city?
0;Write a poem about the sea.
"""  # sot (agree), normal (miss), normal (agree), sot (false sot), normal (agree)
QUESTIONS = [  # the poem is left out: it must count as unmatched, not break the join
    {"question_id": 1, "text": "How can I improve my time management skills?", "category": "generic"},
    {"question_id": 2, "text": "What is 12*7?", "category": "math"},
    {"question_id": 3, "text": "What is the capital of Mongolia?", "category": "knowledge"},
    {"question_id": 4, "text": "What are the pros and cons of living in a big city?", "category": "generic"},
]
WIZARDLM = """label;request
0;Solve for x: 2x = 8.
0;Write a Python function to sort a list.
1;What if dogs could talk?
1;Answer yes or no: is the sun a star?
"""  # normal (agree), normal (agree), sot (agree), normal (miss)


def run(tmp_path, monkeypatch, candidates=("rules",), lima: str | None = None) -> tuple[int, dict]:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    (data / "sot_router_labels_vicuna.csv").write_text(VICUNA)
    (data / "sot_router_labels_wizardlm.csv").write_text(WIZARDLM)
    if lima is not None:
        (data / "sot_router_labels_lima.csv").write_text(lima)
    (data / "vicuna80.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    monkeypatch.setenv("SOT_SHARED_DATA", str(data))
    out = tmp_path / "agreement.json"
    rc = main(["--out", str(out), "--candidates", *candidates])
    d = json.loads(out.read_text())["candidates"]
    return rc, d["rules"] if candidates == ("rules",) else d


def test_counts_by_hand(tmp_path, monkeypatch):
    rc, d = run(tmp_path, monkeypatch)
    assert rc == 0
    v = d["vicuna"]
    assert (v["n"], v["agree"], v["accuracy"], v["precision_sot"], v["recall_sot"]) == (5, 3, 0.6, 0.5, 0.5)
    assert v["confusion"] == {"label_sot": {"routed_sot": 1, "routed_normal": 1},
                              "label_normal": {"routed_sot": 1, "routed_normal": 2}}
    assert v["per_category"] == {
        "generic": {"n": 2, "agree": 1, "accuracy": 0.5, "label_sot": 1, "routed_sot": 2},
        "knowledge": {"n": 1, "agree": 1, "accuracy": 1.0, "label_sot": 0, "routed_sot": 0},
        "math": {"n": 1, "agree": 0, "accuracy": 0.0, "label_sot": 1, "routed_sot": 0}}
    assert v["unmatched"] == 1
    assert [(x["question_id"], x["label"], x["router"]) for x in v["disagreements"]] == [
        (2, "sot", "normal"), (4, "normal", "sot")]
    assert v["by_router_category"] == {"coherent-text": {"n": 1, "agree": 1}, "fits": {"n": 2, "agree": 1},
                                       "math": {"n": 1, "agree": 0}, "short-answer": {"n": 1, "agree": 1}}
    w = d["wizardlm"]
    assert (w["n"], w["agree"], w["accuracy"], w["precision_sot"], w["recall_sot"]) == (4, 3, 0.75, 1.0, 0.5)
    assert w["confusion"] == {"label_sot": {"routed_sot": 1, "routed_normal": 1},
                              "label_normal": {"routed_sot": 0, "routed_normal": 2}}


def test_wizardlm_texts_never_written(tmp_path, monkeypatch):
    run(tmp_path, monkeypatch)
    text = (tmp_path / "agreement.json").read_text()
    assert "dogs" not in text and "sun a star" not in text and "per_category" not in json.loads(text)[
        "candidates"]["rules"]["wizardlm"]


def test_missing_labels_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SOT_SHARED_DATA", str(tmp_path / "nowhere"))
    assert main(["--out", str(tmp_path / "x.json")]) == 2
    assert "not found" in capsys.readouterr().err and not (tmp_path / "x.json").exists()
    (tmp_path / "data").mkdir()  # the evaluation sets alone do not train a candidate: LIMA is named as missing
    for name, text in (("vicuna", VICUNA), ("wizardlm", WIZARDLM)):
        (tmp_path / "data" / f"sot_router_labels_{name}.csv").write_text(text)
    monkeypatch.setenv("SOT_SHARED_DATA", str(tmp_path / "data"))
    assert main(["--out", str(tmp_path / "x.json"), "--candidates", "text"]) == 2
    assert "sot_router_labels_lima.csv" in capsys.readouterr().err


def test_a_trained_candidate_and_the_shipped_text_router(tmp_path, monkeypatch):
    from tests.sot.test_trained_router import synthetic
    lima = "label;request\n" + "".join(f'{label};"{q}"\n' for label, q in synthetic(60, seed=9))
    rc, d = run(tmp_path, monkeypatch, candidates=("text", "shipped text"), lima=lima)
    assert rc == 0 and set(d) == {"text", "shipped text"}
    for name, c in d.items():
        assert c["router"].startswith("trained (text") and c["ms_per_question"]["median"] > 0
        for ds, n in (("vicuna", 5), ("wizardlm", 4)):
            assert c[ds]["n"] == n and 0 <= c[ds]["accuracy"] <= 1
    assert d["text"]["chosen"]["l2"] > 0 and d["shipped text"]["chosen"]["veto"] is True
    # "What is 12*7?": every router here says normal decoding
    assert any(x["question_id"] == 2 and x["router"] == "normal" for x in d["text"]["vicuna"]["disagreements"])
