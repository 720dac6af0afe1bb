"""The trained SoT router: logistic regression on the question, fitted to the SoT authors' router labels (LIMA).

The rules in `router.py` were written by hand and send too much to SoT (on WizardLM six of ten questions they
route to SoT should be answered normally). This router learns the authors' judgement instead, from two kinds of
feature, alone or together:
- "text": hashed word uni- and bigrams of the question (log counts, unit norm), no vocabulary, so nothing of the
  training questions is shipped: only 2^14 weights;
- "hidden": the model's own final hidden states averaged over the question, read in the chat template (one
  prefill through the engine, `LLM.embed`). They belong to one model: the file records that model's fingerprint,
  and on any other model the router falls back to its text half (logged).
`veto` lets the rules' normal-decoding verdicts (code, math, ...) stand over the classifier's. The parameters are
a small safetensors file; `sot train-router` (`train_router.py`) rebuilds them, deterministically.
"""
from __future__ import annotations

import json
import logging
import math
import re
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from sot_engine.sot.router import NORMAL, SOT, Route, route

if TYPE_CHECKING:
    from sot_engine.engine.llm import LLM

log = logging.getLogger(__name__)

FEATURES = ("text", "hidden", "text+hidden")
HASH_DIM = 1 << 14
NGRAMS = 2
MAX_QUESTION_TOKENS = 256  # the hidden features read the question's head: the router's cost stays bounded
EMBED_BATCH = 16
DATA = Path(__file__).resolve().parent / "data"
SHIPPED = {"text": DATA / "router_text.safetensors", "default": DATA / "router_smollm2.safetensors"}
_TOKEN = re.compile(r"[^\W\d_]+|\d+|[^\w\s]")  # words (any script), numbers, single punctuation marks


class RouterFileError(ValueError):
    """A router parameter file that is missing, unreadable or not one this code wrote."""


def text_features(questions: list[str], dim: int = HASH_DIM, ngrams: int = NGRAMS) -> torch.Tensor:
    """[n, dim] float64: log(1 + count) of each hashed word n-gram (n <= ngrams, with sentence marks), rows of
    unit norm. crc32 is the hash: stable across processes and machines (Python's `hash` is salted)."""
    out = torch.zeros(len(questions), dim, dtype=torch.float64)
    for i, q in enumerate(questions):
        toks = ["<s>", *_TOKEN.findall(q.lower()), "</s>"]
        counts: dict[int, int] = {}
        for n in range(1, ngrams + 1):
            for j in range(len(toks) - n + 1):
                h = zlib.crc32(f"{n} {' '.join(toks[j:j + n])}".encode()) % dim
                counts[h] = counts.get(h, 0) + 1
        idx = torch.tensor(list(counts), dtype=torch.int64)
        out[i, idx] = torch.log1p(torch.tensor(list(counts.values()), dtype=torch.float64))
    return out / out.norm(dim=1, keepdim=True).clamp_min(1e-12)


def model_probe(llm: LLM) -> torch.Tensor:
    """What identifies the model whose hidden states a router read: its first 64 embedding rows, 64 values each.
    Any storage of the same weights (fp32, bf16, int8) gives nearly the same probe."""
    from sot_engine.kernels.weights import embedding
    n = min(64, llm.config.vocab_size)
    return embedding(torch.arange(n), llm.engine.model.embed, torch.float32)[:, :64].reshape(-1).cpu().double()


def model_dims(llm: LLM) -> list[int]:
    c = llm.config
    return [c.vocab_size, c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads]


def same_model(llm: LLM, dims: list[int] | None, probe: torch.Tensor | None) -> bool:
    """The router's model and `llm` have the same shape and embedding probe (cosine > 0.999)."""
    if dims is None or probe is None or model_dims(llm) != dims:
        return False
    mine = model_probe(llm)
    return mine.shape == probe.shape and float(torch.nn.functional.cosine_similarity(mine, probe, dim=0)) > 0.999


def hidden_features(llm: LLM, questions: list[str], max_tokens: int = MAX_QUESTION_TOKENS) -> torch.Tensor:
    """[n, hidden] float64: the model's final hidden states averaged over the question and what follows it in
    the chat template (the fixed header before it, e.g. a system prompt, is left out of the average: its states
    are the same for every question). Questions are cut to their first `max_tokens` tokens."""
    tok, template = llm.tokenizer, llm.engine.chat_template
    if tok is None or template is None:
        raise ValueError("hidden-state router features need a model with a tokenizer and a chat template")
    mark = "\x00question\x00"
    rendered = template.render([{"role": "user", "content": mark}])
    header = tok.encode(rendered[:rendered.index(mark)], add_special_tokens=False) if mark in rendered else []
    prompts, starts = [], []
    for q in questions:
        ids = tok.encode(q, add_special_tokens=False)
        if len(ids) > max_tokens:
            q = tok.decode(ids[:max_tokens])
        full = llm.engine.encode([{"role": "user", "content": q}])
        prompts.append(full)
        starts.append(len(header) if header and full[:len(header)] == header and len(full) > len(header) else 0)
    rows = [llm.embed(prompts[i:i + EMBED_BATCH], starts[i:i + EMBED_BATCH])
            for i in range(0, len(prompts), EMBED_BATCH)]
    return torch.cat(rows).to(torch.float64)


def fit(x: torch.Tensor, y: torch.Tensor, l2: float, balanced: bool, sparse_cols: int = 0) -> tuple[torch.Tensor, float]:
    """L2-regularised logistic regression, float64 L-BFGS from zero: the same data give the same weights.
    `balanced` weighs both classes equally (the labels' own prior otherwise). The first `sparse_cols` columns
    (hashed n-grams: ~1% filled) are multiplied as a sparse matrix, 3-4x faster."""
    x, y = x.to(torch.float64), y.to(torch.float64)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the product with a vector is all we use
        warnings.simplefilter("ignore", UserWarning)
        xs = x[:, :sparse_cols].to_sparse_csr() if sparse_cols else None
    xd = x[:, sparse_cols:]
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    pos = float(y.mean())
    sw = torch.where(y > 0, 0.5 / pos, 0.5 / (1 - pos)) if balanced else torch.ones_like(y)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=500, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        z = b + (xs @ w[:sparse_cols] if sparse_cols else 0) + (xd @ w[sparse_cols:] if xd.shape[1] else 0)
        loss = (sw * torch.nn.functional.binary_cross_entropy_with_logits(z, y, reduction="none")).mean() \
            + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), float(b.detach())


@dataclass
class RouterModel:
    """The trained parameters and how they were made (`meta`: labels, hyperparameters, cross-validation)."""
    features: str  # "text" | "hidden" | "text+hidden"
    weight: torch.Tensor  # [dim] float64: the text weights first, then the hidden ones
    bias: float
    veto: bool  # the rules' normal-decoding verdicts stand over the classifier's
    hidden_mean: torch.Tensor | None = None  # standardisation of the hidden features (fitted on the labels)
    hidden_std: torch.Tensor | None = None
    model_dims: list[int] | None = None  # the model whose hidden states were used: its shape (`model_dims`)
    model_probe: torch.Tensor | None = None  # ... and embedding probe (`model_probe`)
    meta: dict = field(default_factory=dict)

    @property
    def uses_hidden(self) -> bool:
        return "hidden" in self.features

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file
        tensors = {"weight": self.weight.float().contiguous(), "bias": torch.tensor([self.bias], dtype=torch.float32)}
        if self.uses_hidden:
            tensors |= {"hidden_mean": self.hidden_mean.float().contiguous(),
                        "hidden_std": self.hidden_std.float().contiguous(),
                        "model_probe": self.model_probe.float().contiguous()}
        header = {"format": "sot-router-1", "features": self.features, "veto": self.veto,
                  "model_dims": self.model_dims, "meta": self.meta}
        save_file(tensors, str(path), metadata={"router": json.dumps(header, sort_keys=True)})

    @classmethod
    def load(cls, path: Path | str) -> RouterModel:
        path = Path(path)
        if not path.is_file():
            raise RouterFileError(f"router parameter file not found: {path}")
        try:
            from safetensors import safe_open
            with safe_open(str(path), framework="pt") as f:
                header = json.loads((f.metadata() or {})["router"])
                t = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # noqa: BLE001 -- any unreadable file is the same error to the user
            raise RouterFileError(f"{path} is not a readable router parameter file ({type(e).__name__}: {e}); "
                                  "rebuild it with `sot train-router`") from None
        if header.get("format") != "sot-router-1" or header.get("features") not in FEATURES:
            raise RouterFileError(f"{path}: not a sot-router-1 file (header {header!r})")
        hidden = "hidden" in header["features"]
        need = {"weight", "bias"} | ({"hidden_mean", "hidden_std", "model_probe"} if hidden else set())
        if not need <= set(t):
            raise RouterFileError(f"{path}: missing tensors {sorted(need - set(t))}")
        d_hidden = t["hidden_mean"].numel() if hidden else 0
        d_text = HASH_DIM if "text" in header["features"] else 0
        if t["weight"].shape != (d_text + d_hidden,) or (hidden and t["hidden_std"].shape != (d_hidden,)):
            raise RouterFileError(f"{path}: weight of shape {tuple(t['weight'].shape)}, expected "
                                  f"({d_text + d_hidden},)")
        if not all(bool(torch.isfinite(v).all()) for v in t.values()):
            raise RouterFileError(f"{path}: parameters are not all finite")
        dbl = lambda k: t[k].double() if hidden else None  # noqa: E731
        return cls(header["features"], t["weight"].double(), float(t["bias"][0]), bool(header["veto"]),
                   dbl("hidden_mean"), dbl("hidden_std"), header.get("model_dims"), dbl("model_probe"),
                   header.get("meta", {}))

    def featurize(self, questions: list[str], llm: LLM | None = None) -> torch.Tensor:
        parts = []
        if "text" in self.features:
            parts.append(text_features(questions))
        if self.uses_hidden:
            if llm is None:
                raise ValueError(f"a {self.features!r} router needs the model for its hidden-state features")
            h = hidden_features(llm, questions)
            parts.append((h - self.hidden_mean) / self.hidden_std / math.sqrt(h.shape[1]))
        return torch.cat(parts, dim=1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


class TrainedRouter:
    """`router(question) -> Route` with the trained parameters. A hidden-state router on a model other than the
    one it was trained with uses the text router instead (its own file), and says so in the log."""

    def __init__(self, model: RouterModel, llm: LLM | None = None, fallback: RouterModel | None = None) -> None:
        self.llm = llm
        if model.uses_hidden and (llm is None or not same_model(llm, model.model_dims, model.model_probe)):
            if fallback is None or fallback.uses_hidden:
                raise ValueError("this router was trained on another model's hidden states, and no text router "
                                 "was given to fall back on")
            log.warning("router: the trained router reads the hidden states of the model it was trained with "
                        "(%s); this model is another (%s): using the text router instead",
                        model.meta.get("model", model.model_dims), None if llm is None else model_dims(llm))
            model = fallback
        self.model = model
        self.name = f"trained ({model.features}{', rules veto' if model.veto else ''})"

    def __call__(self, question: str) -> Route:
        return self.route_many([question])[0]

    def route_many(self, questions: list[str]) -> list[Route]:
        for q in questions:
            if not isinstance(q, str) or not q.strip():
                raise ValueError("empty question")
        rules = [route(q) for q in questions]
        p = torch.sigmoid(self.model.logits(self.model.featurize(questions, self.llm))).tolist()
        out = []
        for r, pi in zip(rules, p):
            if self.model.veto and r.mode == NORMAL:
                out.append(Route(NORMAL, f"{r.reason} (rules veto; classifier p(SoT)={pi:.2f})", r.category,
                                 self.name))
            elif pi > 0.5:
                out.append(Route(SOT, f"fits: the classifier gives SoT p={pi:.2f}", "fits", self.name))
            else:
                out.append(Route(NORMAL, f"normal: the classifier gives SoT p={pi:.2f}", "classifier", self.name))
        return out


def load_router(kind: str = "trained", llm: LLM | None = None):
    """A router by name: "rules", "trained" (the shipped default for this model: hidden-state features on the
    model they were trained with, else the text classifier) or a path to a parameter file. A missing or corrupt
    shipped file falls back to the rules with a logged error; a file the caller names raises `RouterFileError`."""
    if kind == "rules":
        return route
    if kind != "trained":
        path = Path(kind)
        if path.suffix != ".safetensors" and not path.exists():
            raise ValueError(f'router must be "rules", "trained" or a .safetensors file, got {kind!r}')
        m = RouterModel.load(path)
        return TrainedRouter(m, llm, RouterModel.load(SHIPPED["text"]) if m.uses_hidden else None)
    try:
        text = RouterModel.load(SHIPPED["text"])
        best = RouterModel.load(SHIPPED["default"])
    except RouterFileError as e:
        log.error("router: %s; routing by the rules instead", e)
        return route
    return TrainedRouter(best, llm, text)
