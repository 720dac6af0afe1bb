"""`sot train-router`: fit the trained router (`trained_router.py`) to a `label;request` file.

Its hyperparameters (L2 strength, class balance, the rules veto) are chosen by the balanced accuracy of repeated
k-fold cross-validation on that same file, so the sets it is judged on (the SoT authors' Vicuna and WizardLM labels) never take part in
training, tuning or the choice of features. Everything is deterministic: fixed folds, float64 L-BFGS from zero.

    sot train-router --labels ../shared/data/sot_router_labels_lima.csv --features text+hidden \\
        --out sot_engine/sot/data/router_smollm2.safetensors
"""
from __future__ import annotations

import csv
import hashlib
import itertools
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from sot_engine.sot.router import NORMAL, route
from sot_engine.sot.trained_router import (FEATURES, HASH_DIM, RouterModel, fit, hidden_features, model_dims, model_probe,
                                           text_features)

if TYPE_CHECKING:
    from sot_engine.engine.llm import LLM

L2_GRID = (3e-5, 1e-4, 3e-4, 1e-3)  # every feature kind has rows of about unit norm
FOLDS, REPEATS = 5, 2


def read_labels(path: Path | str) -> tuple[list[int], list[str]]:
    """(labels, questions) of a `label;request` file (label 1: the question suits SoT)."""
    path = Path(path)
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter=";"))
    if not rows or [c.strip() for c in rows[0]] != ["label", "request"]:
        raise ValueError(f"{path}: expected the header 'label;request'")
    labels, questions = [], []
    for i, row in enumerate(rows[1:], start=2):
        if len(row) != 2 or row[0].strip() not in ("0", "1") or not row[1].strip():
            raise ValueError(f"{path}, row {i}: expected 'label;request' with label 0 or 1, got {row!r}")
        labels.append(int(row[0]))
        questions.append(row[1].strip())
    return labels, questions


def _folds(n: int, k: int, repeat: int) -> torch.Tensor:
    """Fold index of each row for one repeat: a seeded permutation dealt round-robin."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(repeat))
    out = torch.empty(n, dtype=torch.int64)
    out[perm] = torch.arange(n) % k
    return out


def _predict(z: torch.Tensor, vetoed: torch.Tensor, veto: bool) -> torch.Tensor:
    p = (z > 0).long()
    return torch.where(vetoed, 0, p) if veto else p


def cross_validate(x: torch.Tensor, y: torch.Tensor, vetoed: torch.Tensor, l2: float, balanced: bool,
                   vetoes: tuple[bool, ...], k: int = FOLDS, repeats: int = REPEATS,
                   sparse_cols: int = 0) -> dict[bool, tuple[float, float]]:
    """(balanced accuracy, accuracy) on held-out rows over `repeats` x `k` folds, for each veto setting (one fit
    serves both). Balanced accuracy, the mean of the recalls of both classes, does not depend on how many
    questions suit SoT: that share differs from set to set (36% of LIMA, 46% of Vicuna-80, 27% of WizardLM), and
    plain accuracy would reward a router for matching the training set's share."""
    counts = {v: torch.zeros(2, 2) for v in vetoes}  # [label, predicted]
    for r in range(repeats):
        fold = _folds(len(y), k, r)
        for f in range(k):
            tr, te = fold != f, fold == f
            w, b = fit(x[tr], y[tr], l2, balanced, sparse_cols)
            z = x[te] @ w + b
            for v in vetoes:
                p = _predict(z, vetoed[te], v)
                counts[v].index_put_((y[te].long(), p), torch.ones(len(p)), accumulate=True)
    out = {}
    for v, c in counts.items():
        recall = c.diagonal() / c.sum(1).clamp_min(1)
        out[v] = (float(recall.mean()), float(c.diagonal().sum() / c.sum()))
    return out


def features_for(kind: str, questions: list[str], llm: LLM | None,
                 cache: dict | None = None) -> tuple[torch.Tensor, dict]:
    """The feature matrix of `kind` and what `RouterModel` needs to rebuild it (the hidden standardisation).
    `cache` keeps the hidden features between calls on the same questions (a benchmark trains several routers)."""
    if kind not in FEATURES:
        raise ValueError(f"features must be one of {FEATURES}, got {kind!r}")
    parts, extra = [], {}
    if "text" in kind:
        parts.append(text_features(questions))
    if "hidden" in kind:
        if llm is None:
            raise ValueError(f"{kind!r} features need a model")
        key = ("hidden", id(llm), tuple(questions))
        h = cache.get(key) if cache is not None else None
        if h is None:
            h = hidden_features(llm, questions)
            if cache is not None:
                cache[key] = h
        mean, std = h.mean(0), h.std(0) + 1e-6
        parts.append((h - mean) / std / h.shape[1] ** 0.5)
        extra = {"hidden_mean": mean, "hidden_std": std, "model_dims": model_dims(llm),
                 "model_probe": model_probe(llm)}
    return torch.cat(parts, dim=1), extra


def train(labels_path: Path | str, features: str = "text", llm: LLM | None = None, veto: bool | None = None,
          k: int = FOLDS, repeats: int = REPEATS, model_name: str | None = None,
          log=print, cache: dict | None = None) -> RouterModel:
    """Choose (l2, balanced, veto) by cross-validated balanced accuracy on the labels, then fit on all of them. `veto`: None lets
    the cross-validation decide, True/False fixes it (the "rules + classifier" and "classifier" candidates)."""
    labels, questions = read_labels(labels_path)
    y = torch.tensor(labels, dtype=torch.float64)
    if y.min() == y.max():
        raise ValueError(f"{labels_path}: every label is {int(y[0])}; a router needs both kinds")
    t0 = time.perf_counter()
    x, extra = features_for(features, questions, llm, cache)
    t_feat = time.perf_counter() - t0
    vetoed = torch.tensor([route(q).mode == NORMAL for q in questions])
    vetoes = (False, True) if veto is None else (veto,)
    sparse = HASH_DIM if "text" in features else 0
    grid = []
    for l2, balanced in itertools.product(L2_GRID, (True, False)):
        for v, (bacc, acc) in cross_validate(x, y, vetoed, l2, balanced, vetoes, k, repeats, sparse).items():
            grid.append({"l2": l2, "balanced": balanced, "veto": v, "cv_balanced_accuracy": round(bacc, 4),
                         "cv_accuracy": round(acc, 4)})
            log(f"  l2={l2:g} balanced={balanced} veto={v}: cross-validated balanced accuracy {bacc:.4f}, "
                f"accuracy {acc:.4f}")
    best = max(grid, key=lambda g: g["cv_balanced_accuracy"])  # ties: the first in grid order
    w, b = fit(x, y, best["l2"], best["balanced"], sparse)
    data = Path(labels_path).read_bytes()
    meta = {"labels": Path(labels_path).name, "labels_sha256": hashlib.sha256(data).hexdigest(),
            "n": len(labels), "positives": int(y.sum()), "chosen": best, "grid": grid,
            "cv": f"{repeats} x {k}-fold", "model": model_name, "feature_seconds": round(t_feat, 2),
            "command": f"sot train-router --labels {Path(labels_path).name} --features {features}"
                       + ("" if veto is None else f" --veto {'on' if veto else 'off'}")}
    return RouterModel(features, w, b, best["veto"], extra.get("hidden_mean"), extra.get("hidden_std"),
                       extra.get("model_dims"), extra.get("model_probe"), meta)
