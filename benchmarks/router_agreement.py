"""How often the rule router (`sot.router.route`) agrees with the SoT authors' router labels.

    python -m benchmarks.router_agreement              # writes benchmarks/results/router_agreement.json
    python -m benchmarks.router_agreement --out x.json

The labels (label 1 = suits SoT, 0 = normal decoding) are the ones the paper's SoT-R router was trained on.
They are an evaluation set here, never a training set: the rules were written without them. The data lives in
the repo's sibling `shared/data/` (override with SOT_SHARED_DATA). The result is device independent, so it sits
in benchmarks/results/ itself rather than under a device folder. WizardLM questions are under a non-commercial
licence: only aggregate numbers of that set are written, never its texts; Vicuna disagreements are listed by
question_id.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import sys
from collections import Counter
from pathlib import Path

from benchmarks import common
from sot_engine.sot.router import SOT, route

DATASETS = ("vicuna", "wizardlm")
LABELS = "sot_router_labels_{}.csv"
VICUNA_QUESTIONS = "vicuna80.jsonl"


def shared_data() -> Path:
    env = os.environ.get("SOT_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def read_labels(path: Path) -> list[tuple[int, str]]:
    """(label, request) rows of a `label;request` file."""
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter=";"))
    if not rows or [c.strip() for c in rows[0]] != ["label", "request"]:
        raise ValueError(f"{path}: expected the header 'label;request'")
    return [(int(label), request.strip()) for label, request in rows[1:]]


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


def evaluate(rows: list[tuple[int, str]]) -> tuple[dict, list]:
    """The agreement numbers of one label set, plus the routes (for joins by the caller)."""
    routes = [route(q) for _, q in rows]
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


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/...)")
    args = ap.parse_args(argv)
    data = shared_data()
    missing = [data / LABELS.format(d) for d in DATASETS if not (data / LABELS.format(d)).is_file()]
    if missing:
        print("router_agreement: label file(s) not found: " + ", ".join(map(str, missing))
              + "\n  put the SoT router labels in ../shared/data/ or point SOT_SHARED_DATA at their folder",
              file=sys.stderr)
        return 2
    payload: dict = {"env": {"python": platform.python_version(), "date": datetime.date.today().isoformat()},
                     "datasets": {}}
    print(f"{'dataset':<10} {'n':>4} {'accuracy':>9} {'prec sot':>9} {'rec sot':>8}   confusion (label->routed)")
    for name in DATASETS:
        rows = read_labels(data / LABELS.format(name))
        result, routes = evaluate(rows)
        if name == "vicuna" and (data / VICUNA_QUESTIONS).is_file():
            result |= vicuna_categories(rows, routes, data / VICUNA_QUESTIONS)
        payload["datasets"][name] = result
        c = result["confusion"]
        print(f"{name:<10} {result['n']:>4} {_fmt(result['accuracy']):>9} {_fmt(result['precision_sot']):>9} "
              f"{_fmt(result['recall_sot']):>8}   sot->sot {c['label_sot']['routed_sot']}, "
              f"sot->normal {c['label_sot']['routed_normal']}, normal->sot {c['label_normal']['routed_sot']}, "
              f"normal->normal {c['label_normal']['routed_normal']}")
    per = payload["datasets"]["vicuna"].get("per_category", {})
    if per:
        print("\nvicuna per category: " + ", ".join(f"{c} {d['agree']}/{d['n']}"
                                                    for c, d in per.items()))
    out = args.out or common.RESULTS / "router_agreement.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
