"""The trained router: features, deterministic training, the parameter file, the shipped routers, the fallbacks."""
from __future__ import annotations

import json
import logging
import os
import random
import zlib
from pathlib import Path

import pytest
import torch

from sot_engine.sot import trained_router as tr
from sot_engine.sot.router import NORMAL, SOT, route
from sot_engine.sot.train_router import L2_GRID, cross_validate, read_labels, train
from sot_engine.sot.trained_router import (HASH_DIM, RouterFileError, RouterModel, TrainedRouter, fit, load_router,
                                           text_features)
from tests.conftest import requires_smollm2

ROOT = Path(__file__).resolve().parents[2]
VICUNA_LABELS = ROOT / "tests" / "data" / "sot_router_labels_vicuna.csv"
RESULTS = ROOT / "benchmarks" / "results" / "router_agreement.json"


def shared_data() -> Path:
    return Path(os.environ.get("SOT_SHARED_DATA", ROOT.parent / "shared" / "data"))


# ---- questions these tests write themselves ----------------------------------------------------------------
TOPICS = ["gardening", "public speaking", "saving money", "learning a language", "remote work", "sleep",
          "city cycling", "team meetings", "home cooking", "job interviews", "reading habits", "travel packing"]
OPEN = ["How can I get better at {t}?", "What are some tips for {t}?", "What are the benefits of {t}?",
        "What should a beginner know about {t}?", "Why do people struggle with {t}?"]
CLOSED = ["Solve for x: {a}x + {b} = {c}.", "What is {a} * {b}?", "Write a Python function that returns the {a}th "
          "prime.", "Compute {a} + {b} - {c}.", "Fix this code: print({a} +)"]


def synthetic(n: int, seed: int) -> list[tuple[int, str]]:
    rnd = random.Random(seed)
    rows = []
    for _ in range(n):
        if rnd.random() < 0.4:
            rows.append((1, rnd.choice(OPEN).format(t=rnd.choice(TOPICS))))
        else:
            a, b, c = (rnd.randint(2, 999) for _ in range(3))
            rows.append((0, rnd.choice(CLOSED).format(a=a, b=b, c=c)))
    return rows


def write_labels(path: Path, rows: list[tuple[int, str]]) -> Path:
    path.write_text("label;request\n" + "".join(f'{label};"{q}"\n' for label, q in rows), encoding="utf-8")
    return path


# ---- features -------------------------------------------------------------------------------------------------
def test_text_features_are_hashed_log_counts_of_unit_norm():
    x = text_features(["The cat, the CAT!", "Ünïcode wörds 42"])
    assert x.shape == (2, HASH_DIM) and x.dtype == torch.float64
    assert torch.allclose(x.norm(dim=1), torch.ones(2, dtype=torch.float64))
    # independently: "the" occurs twice, "cat" twice, the bigram "the cat" twice, "," and "!" once each
    grams = {"1 <s>": 1, "1 the": 2, "1 cat": 2, "1 ,": 1, "1 !": 1, "1 </s>": 1, "2 <s> the": 1,
             "2 the cat": 2, "2 cat ,": 1, "2 , the": 1, "2 cat !": 1, "2 ! </s>": 1}
    ref = torch.zeros(HASH_DIM, dtype=torch.float64)
    for g, c in grams.items():
        ref[zlib.crc32(g.encode()) % HASH_DIM] += torch.log1p(torch.tensor(float(c), dtype=torch.float64))
    assert torch.allclose(x[0], ref / ref.norm())
    assert x[1][zlib.crc32("1 ünïcode".encode()) % HASH_DIM] > 0 and x[1][zlib.crc32(b"1 42") % HASH_DIM] > 0


def _grad_norm(x, y, w, b, l2, balanced):
    """The gradient of the regularised loss at (w, b), written out by hand (not autograd)."""
    pos = float(y.mean())
    sw = torch.where(y > 0, 0.5 / pos, 0.5 / (1 - pos)) if balanced else torch.ones_like(y)
    r = sw * (torch.sigmoid(x @ w + b) - y) / len(y)
    return float(torch.cat([x.T @ r + 2 * l2 * w, r.sum().reshape(1)]).norm())


@pytest.mark.parametrize("balanced", [True, False])
def test_fit_finds_the_optimum_and_is_deterministic(balanced):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(300, 40, generator=g, dtype=torch.float64)
    y = (x[:, :3].sum(1) + 0.5 * torch.randn(300, generator=g, dtype=torch.float64) > 0.4).double()
    w, b = fit(x, y, 1e-3, balanced)
    assert _grad_norm(x, y, w, b, 1e-3, balanced) < 1e-5  # it starts at ~0.1
    w2, b2 = fit(x, y, 1e-3, balanced)
    assert torch.equal(w, w2) and b == b2
    ws, bs = fit(x, y, 1e-3, balanced, sparse_cols=25)  # the first 25 columns as a sparse matrix: same optimum
    assert torch.allclose(ws, w, atol=1e-7) and abs(bs - b) < 1e-7


# ---- training --------------------------------------------------------------------------------------------------
def test_training_is_deterministic_and_learns(tmp_path):
    labels = write_labels(tmp_path / "train.csv", synthetic(120, seed=1))
    a = train(labels, "text", log=lambda *_: None)
    b = train(labels, "text", log=lambda *_: None)
    timeless = lambda m: {k: v for k, v in m.items() if k != "feature_seconds"}  # noqa: E731
    assert torch.equal(a.weight, b.weight) and a.bias == b.bias and timeless(a.meta) == timeless(b.meta)
    assert a.meta["n"] == 120 and len(a.meta["grid"]) == 2 * len(L2_GRID) * 2  # l2 x balanced x veto
    assert a.meta["chosen"] == max(a.meta["grid"], key=lambda g: g["cv_balanced_accuracy"])
    held_out = synthetic(200, seed=2)
    router = TrainedRouter(a)
    got = [int(r.mode == SOT) for r in router.route_many([q for _, q in held_out])]
    assert sum(g == label for g, (label, _) in zip(got, held_out)) >= 0.95 * len(held_out)


def test_cross_validation_scores_each_veto_setting_on_held_out_rows(tmp_path):
    rows = synthetic(60, seed=3)
    y = torch.tensor([label for label, _ in rows], dtype=torch.float64)
    x = text_features([q for _, q in rows])
    vetoed = torch.tensor([route(q).mode == NORMAL for _, q in rows])
    acc = cross_validate(x, y, vetoed, 1e-4, True, (False, True), k=3, repeats=1)
    assert set(acc) == {False, True} and all(0.5 < a <= 1 and 0.5 < b <= 1 for a, b in acc.values())
    flipped = cross_validate(x, 1 - y, vetoed, 1e-4, True, (False,), k=3, repeats=1)  # learns the flip too
    assert flipped[False][0] > 0.5
    # a constant predictor: accuracy is the majority share, balanced accuracy exactly 1/2
    const = cross_validate(torch.zeros(60, 4, dtype=torch.float64), y, vetoed, 1.0, False, (False,), k=3, repeats=1)
    assert const[False][0] == 0.5 and const[False][1] == pytest.approx(float(1 - y.mean()))


def test_bad_label_files(tmp_path):
    with pytest.raises(ValueError, match="expected the header 'label;request'"):
        read_labels(_text(tmp_path / "h.csv", "question;label\n1;x\n"))
    with pytest.raises(ValueError, match="row 3: expected 'label;request' with label 0 or 1"):
        read_labels(_text(tmp_path / "l.csv", "label;request\n1;ok\n2;bad label\n"))
    with pytest.raises(ValueError, match="every label is 1"):
        train(write_labels(tmp_path / "one.csv", [(1, "a b c"), (1, "d e f")]), "text")
    with pytest.raises(ValueError, match="need a model"):
        train(write_labels(tmp_path / "t.csv", synthetic(20, 4)), "hidden")


def _text(path: Path, content: str) -> Path:
    path.write_text(content, encoding="utf-8")
    return path


# ---- the parameter file ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> RouterModel:
    labels = write_labels(tmp_path_factory.mktemp("labels") / "train.csv", synthetic(80, seed=5))
    return train(labels, "text", log=lambda *_: None)


def test_save_and_load_give_the_same_routes(small_model, tmp_path):
    path = tmp_path / "r.safetensors"
    small_model.save(path)
    back = RouterModel.load(path)
    assert (back.features, back.veto, back.meta) == (small_model.features, small_model.veto, small_model.meta)
    qs = [q for _, q in synthetic(30, seed=6)]
    x = text_features(qs)
    assert torch.allclose(back.logits(x), small_model.logits(x), atol=1e-5)  # stored as float32


def test_missing_or_corrupt_files_raise_clear_errors(small_model, tmp_path):
    with pytest.raises(RouterFileError, match="not found"):
        RouterModel.load(tmp_path / "nope.safetensors")
    junk = _text(tmp_path / "junk.safetensors", "this is not a safetensors file")
    with pytest.raises(RouterFileError, match="not a readable router parameter file"):
        RouterModel.load(junk)
    good = tmp_path / "good.safetensors"
    small_model.save(good)
    data = good.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:len(data) // 2])  # truncated mid-tensor
    with pytest.raises(RouterFileError, match="not a readable router parameter file"):
        RouterModel.load(cut)
    from safetensors.torch import save_file
    save_file({"weight": torch.zeros(3)}, str(tmp_path / "plain.safetensors"))  # no router header
    with pytest.raises(RouterFileError, match="not a readable router parameter file"):
        RouterModel.load(tmp_path / "plain.safetensors")
    bad = RouterModel(small_model.features, small_model.weight[:10], 0.0, False, meta={})
    bad.save(tmp_path / "short.safetensors")
    with pytest.raises(RouterFileError, match=r"weight of shape \(10,\), expected \(16384,\)"):
        RouterModel.load(tmp_path / "short.safetensors")
    nan = RouterModel(small_model.features, small_model.weight.clone(), float("nan"), False, meta={})
    nan.save(tmp_path / "nan.safetensors")
    with pytest.raises(RouterFileError, match="not all finite"):
        RouterModel.load(tmp_path / "nan.safetensors")
    with pytest.raises(RouterFileError, match="not found"):  # a file the caller names: an error, not a fallback
        load_router(str(tmp_path / "nope.safetensors"))
    with pytest.raises(ValueError, match='router must be "rules", "trained" or a .safetensors file'):
        load_router("bogus")


def test_a_corrupt_shipped_file_falls_back_to_the_rules_and_logs_it(tmp_path, monkeypatch, caplog):
    junk = _text(tmp_path / "junk.safetensors", "garbage")
    monkeypatch.setitem(tr.SHIPPED, "default", junk)
    with caplog.at_level(logging.ERROR, logger="sot_engine.sot.trained_router"):
        router = load_router("trained")
    assert router is route
    assert "not a readable router parameter file" in caplog.text and "routing by the rules instead" in caplog.text


# ---- the shipped routers ---------------------------------------------------------------------------------------
def _measured(name: str) -> dict:
    return json.loads(RESULTS.read_text())["candidates"][name]["vicuna"]


def _vicuna() -> tuple[list[int], list[str]]:
    return read_labels(VICUNA_LABELS)


def test_shipped_text_router_reproduces_its_measured_vicuna_agreement():
    m = RouterModel.load(tr.SHIPPED["text"])
    assert m.features == "text" and m.meta["labels"] == "sot_router_labels_lima.csv" and m.meta["n"] == 1030
    labels, questions = _vicuna()
    routes = TrainedRouter(m).route_many(questions)
    agree = sum(int(r.mode == SOT) == label for r, label in zip(routes, labels))
    assert agree == _measured("shipped text")["agree"]


@requires_smollm2
def test_shipped_default_router_reproduces_its_measured_vicuna_agreement(smollm2):
    router = load_router("trained", smollm2.llm)
    assert "hidden" in router.model.features  # SmolLM2 is the model it was trained with: no fallback
    labels, questions = _vicuna()
    routes = router.route_many(questions)
    agree = sum(int(r.mode == SOT) == label for r, label in zip(routes, labels))
    # hidden states carry this CPU's kernel rounding; a question on the decision boundary may flip
    assert abs(agree - _measured("shipped default")["agree"]) <= 1


OWN_NORMAL = ["What is 37 * 41?", "Solve for x: 3x - 7 = 11.", "Compute the derivative of x^3 + 2x.",
              "Write a Python function that reverses a linked list.", "Fix the bug in this code: for i in range(10) print(i)",
              "Translate 'good morning' into French.", "Hi", "Thanks!", "Answer with one word: what color is the sky?"]
OWN_SOT = ["What are the main benefits of regular exercise?", "How can I become a better listener?",
           "What should I consider when choosing a university?", "What are some ways to reduce stress at work?",
           "What makes a good team leader?", "How can cities reduce traffic congestion?"]


@requires_smollm2
@pytest.mark.parametrize("which", ["default", "text"])
def test_shipped_routers_on_questions_written_here(smollm2, which):
    router = load_router("trained", smollm2.llm) if which == "default" else TrainedRouter(
        RouterModel.load(tr.SHIPPED["text"]))
    for q, r in zip(OWN_NORMAL, router.route_many(OWN_NORMAL)):
        assert r.mode == NORMAL, (q, r)
    for q, r in zip(OWN_SOT, router.route_many(OWN_SOT)):
        assert r.mode == SOT, (q, r)
        assert r.router == router.name and "p=" in r.reason


def test_hidden_router_on_another_model_falls_back_to_text_and_logs_it(tiny_chat_dir, caplog):
    from sot_engine.engine import LLM
    llm = LLM(str(tiny_chat_dir), dtype=torch.float32, block_size=8, num_blocks=64)
    with caplog.at_level(logging.WARNING, logger="sot_engine.sot.trained_router"):
        router = load_router("trained", llm)
    assert router.model.features == "text" and "using the text router instead" in caplog.text
    assert router("What are good habits for learning?").router == router.name
