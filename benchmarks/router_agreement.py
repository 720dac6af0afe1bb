"""Router candidates against the SoT authors' router labels: the rules, and classifiers trained on LIMA alone.

    python -m benchmarks.router_agreement                      # every candidate; writes results/router_agreement.json
    python -m benchmarks.router_agreement --candidates rules text --save /tmp/routers

The labels (label 1 = suits SoT, 0 = normal decoding) are the ones the paper's SoT-R router was trained and judged
on. The LIMA file trains every classifier and chooses its hyperparameters by cross-validation (`sot.train_router`);
Vicuna-80 and WizardLM are only ever evaluated. Each candidate is scored on both (agreement, precision and recall
of SoT) and timed per question on the CPU, one question at a time as the driver routes. The shipped routers
(`sot_engine/sot/data/router_*.safetensors`) are scored too: they must equal their candidate. The data lives in
the repo's sibling `shared/data/` (override with SOT_SHARED_DATA). WizardLM questions are under a non-commercial
licence: only aggregate numbers of that set are written, never its texts; Vicuna disagreements are listed by
question_id.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

from benchmarks import common
from sot_engine.sot.router import SOT, route

DATASETS = ("vicuna", "wizardlm")
TRAIN = "lima"
LABELS = "sot_router_labels_{}.csv"
VICUNA_QUESTIONS = "vicuna80.jsonl"
# name -> (features, veto): the rules alone, then classifiers trained on LIMA, alone and under the rules' veto
CANDIDATES = {"rules": None, "text": ("text", False), "rules+text": ("text", True), "hidden": ("hidden", False),
              "text+hidden": ("text+hidden", False), "rules+text+hidden": ("text+hidden", True)}
SHIPPED = ("shipped text", "shipped default")


def shared_data() -> Path:
    env = os.environ.get("SOT_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def read_labels(path: Path) -> list[tuple[int, str]]:
    """(label, request) rows of a `label;request` file."""
    from sot_engine.sot.train_router import read_labels as read
    labels, questions = read(path)
    return list(zip(labels, questions))


def _ratio(num: int, den: int) -> float | None:
    return round(num / den, 4) if den else None


def agreement(labels: list[int], predicted: list[int]) -> dict:
    """n, accuracy, precision/recall of label 1 (SoT) and the confusion matrix."""
    pairs = Counter(zip(labels, predicted))
    tp, fp, fn, tn = pairs[1, 1], pairs[0, 1], pairs[1, 0], pairs[0, 0]
    return {"n": len(labels), "agree": tp + tn, "accuracy": _ratio(tp + tn, len(labels)),
            "precision_sot": _ratio(tp, tp + fp), "recall_sot": _ratio(tp, tp + fn),
            "confusion": {"label_sot": {"routed_sot": tp, "routed_normal": fn},
                          "label_normal": {"routed_sot": fp, "routed_normal": tn}}}


def route_all(router, questions: list[str]) -> list:
    many = getattr(router, "route_many", None)
    return many(questions) if many else [router(q) for q in questions]


def evaluate(rows: list[tuple[int, str]], router=route) -> tuple[dict, list]:
    """The agreement numbers of one label set, plus the routes (for joins by the caller)."""
    routes = route_all(router, [q for _, q in rows])
    labels = [label for label, _ in rows]
    result = agreement(labels, [int(r.mode == SOT) for r in routes])
    by_rule: dict[str, dict] = {}
    for label, r in zip(labels, routes):  # which router category decided, and how often it agreed
        d = by_rule.setdefault(r.category, {"n": 0, "agree": 0})
        d["n"] += 1
        d["agree"] += int(label == int(r.mode == SOT))
    result["by_router_category"] = dict(sorted(by_rule.items()))
    return result, routes


def vicuna_categories(rows: list[tuple[int, str]], routes: list, questions: Path) -> dict:
    """Per Vicuna category agreement (joined on the question text) and the disagreements by question_id."""
    meta = {}
    for line in questions.read_text(encoding="utf-8").splitlines():
        if line.strip():
            q = json.loads(line)
            meta[q["text"].strip()] = q
    per: dict[str, tuple[list[int], list[int]]] = {}
    disagreements, unmatched = [], 0
    for (label, text), r in zip(rows, routes):
        q = meta.get(text)
        if q is None:
            unmatched += 1
            continue
        labels, predicted = per.setdefault(q["category"], ([], []))
        labels.append(label)
        predicted.append(int(r.mode == SOT))
        if label != predicted[-1]:
            disagreements.append({"question_id": q["question_id"], "category": q["category"],
                                  "label": "sot" if label else "normal", "router": r.mode, "rule": r.category})
    per_category = {c: {k: v for k, v in agreement(*lp).items() if k in ("n", "agree", "accuracy")}
                    | {"label_sot": sum(lp[0]), "routed_sot": sum(lp[1])} for c, lp in sorted(per.items())}
    return {"per_category": per_category, "unmatched": unmatched,
            "disagreements": sorted(disagreements, key=lambda d: d["question_id"])}


def cost_ms(router, questions: list[str]) -> dict:
    """Milliseconds to route one question, one at a time (as the driver does), on each of `questions`."""
    times = []
    for q in questions:
        t = time.perf_counter()
        router(q)
        times.append(1000 * (time.perf_counter() - t))
    return {"median": round(statistics.median(times), 3), "mean": round(statistics.fmean(times), 3)}


_FEATURE_CACHE: dict = {}  # LIMA's hidden features, computed once for every hidden candidate


def build(name: str, data: Path, llm, save: Path | None):
    """The router of a candidate (trained on LIMA now) or of a shipped file, and what training chose."""
    from sot_engine.sot.trained_router import SHIPPED as FILES, RouterModel, TrainedRouter
    if name == "rules":
        return route, None
    if name in SHIPPED:
        text = RouterModel.load(FILES["text"])
        m = text if name == "shipped text" else RouterModel.load(FILES["default"])
        return TrainedRouter(m, llm, text), m.meta.get("chosen")
    from sot_engine.sot.train_router import train
    features, veto = CANDIDATES[name]
    print(f"training {name} on {LABELS.format(TRAIN)}", flush=True)
    m = train(data / LABELS.format(TRAIN), features, llm if "hidden" in features else None, veto,
              model_name=llm.engine.model_name if "hidden" in features else None, log=lambda *_: None,
              cache=_FEATURE_CACHE)
    if save is not None:
        save.mkdir(parents=True, exist_ok=True)
        m.save(save / f"router_{name.replace('+', '_')}.safetensors")
    return TrainedRouter(m, llm), m.meta["chosen"]


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/...)")
    ap.add_argument("--candidates", nargs="+", default=[*CANDIDATES, *SHIPPED],
                    choices=[*CANDIDATES, *SHIPPED], help="which routers (default: all)")
    ap.add_argument("--model", default="default", help="the model whose hidden states the hidden candidates read")
    ap.add_argument("--save", type=Path, default=None, help="write each trained candidate's parameter file here")
    args = ap.parse_args(argv)
    data = shared_data()
    needed = list(DATASETS) + ([TRAIN] if any(c in CANDIDATES and c != "rules" for c in args.candidates) else [])
    missing = [data / LABELS.format(d) for d in needed if not (data / LABELS.format(d)).is_file()]
    if missing:
        print("router_agreement: label file(s) not found: " + ", ".join(map(str, missing))
              + "\n  put the SoT router labels in ../shared/data/ or point SOT_SHARED_DATA at their folder",
              file=sys.stderr)
        return 2
    llm = None
    if any("hidden" in c or c in SHIPPED for c in args.candidates):
        from sot_engine.engine import LLM
        llm = LLM(args.model)
    sets = {name: read_labels(data / LABELS.format(name)) for name in DATASETS}
    payload: dict = {"env": {"python": platform.python_version(), "cpu": common.cpu_name(),
                             "date": datetime.date.today().isoformat()},
                     "trained_on": LABELS.format(TRAIN), "candidates": {}}
    print(f"{'router':<18} {'dataset':<9} {'n':>4} {'accuracy':>9} {'prec sot':>9} {'rec sot':>8} {'ms/question':>12}")
    for name in args.candidates:
        router, chosen = build(name, data, llm, args.save)
        entry: dict = {"router": getattr(router, "name", "rules"), "chosen": chosen,
                       "ms_per_question": cost_ms(router, [q for _, q in sets["vicuna"]])}
        for ds, rows in sets.items():
            result, routes = evaluate(rows, router)
            if ds == "vicuna" and (data / VICUNA_QUESTIONS).is_file():
                result |= vicuna_categories(rows, routes, data / VICUNA_QUESTIONS)
            entry[ds] = result
            print(f"{name:<18} {ds:<9} {result['n']:>4} {_fmt(result['accuracy']):>9} "
                  f"{_fmt(result['precision_sot']):>9} {_fmt(result['recall_sot']):>8} "
                  f"{entry['ms_per_question']['median']:>12.2f}", flush=True)
        payload["candidates"][name] = entry
    out = args.out or common.RESULTS / "router_agreement.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
