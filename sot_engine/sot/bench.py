"""End-to-end SoT against normal decoding on a question set: `sot bench --dataset vicuna80`.

Each question is answered twice on the same engine: normal decoding (the baseline) and the chosen mode
(auto: the router decides). Per question we record the mode used and why, token counts, the latency
breakdown and both answers, one JSON line each, written as we go; a summary with the per-category table is
written at the end. Speed-up is the ratio of mean latencies (normal / SoT) per category. Each line also holds
the engine's work counters per answer and a `trace` of every stage's token lengths, from which
`benchmarks.sot_e2e` replays the same work on other model shapes.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from sot_engine.environment import environment
from sot_engine.sot.driver import Answer, SoT

DATA = Path(__file__).resolve().parent / "data"  # shipped in the wheel (package data)
DATASETS = {"vicuna80": DATA / "vicuna80.jsonl"}
SOT_SUITED = ("generic", "knowledge", "roleplay", "common-sense", "counterfactual")


@dataclass
class Question:
    id: int
    text: str
    category: str


def load_dataset(name: str) -> list[Question]:
    """A shipped set by name, or a JSONL path with fields text (or question) and category."""
    path = DATASETS.get(name, Path(name))
    if not path.is_file():
        raise ValueError(f"unknown dataset {name!r}: use one of {sorted(DATASETS)} or a JSONL file")
    out = []
    for i, line in enumerate(path.read_text().splitlines()):
        if line.strip():
            d = json.loads(line)
            out.append(Question(d.get("question_id", i + 1), d.get("text") or d["question"], d.get("category", "-")))
    return out


def trace(normal: Answer, ans: Answer) -> dict:
    """The lengths that fix this question's work, for replaying it with forced lengths on any model shape
    (`benchmarks.sot_e2e`): [prompt, output] tokens of the normal answer and of each SoT stage that ran, each
    point's prompt and output, the prefix its fork shares, and whether the points continue the kept skeleton
    request (continuation expansion) or a prefix prefilled for them (paper)."""
    t = ans.tokens
    sot: dict = {"mode": ans.mode, "expansion": ans.expansion}
    if t.skeleton_prompt:
        sot["skeleton"] = [t.skeleton_prompt, t.skeleton_output]
    if ans.points:
        sot["points"] = {"prompt": [p.prompt_tokens for p in ans.points],
                         "output": [p.num_tokens for p in ans.points],
                         "shared": max(p.cached_tokens for p in ans.points),
                         "from_skeleton": ans.expansion == "continuation" and bool(t.skeleton_prompt)}
    if t.normal_prompt:
        sot["normal"] = [t.normal_prompt, t.normal_output]
    return {"normal": [normal.tokens.normal_prompt, normal.tokens.normal_output], "sot": sot}


def _row(q: Question, normal: Answer, ans: Answer, counters: dict | None = None) -> dict:
    """One question's record; `counters`: the engine's work counters spent on each answer."""
    return {
        "question_id": q.id, "category": q.category, "question": q.text,
        "mode": ans.mode, "router": ans.router, "route_seconds": ans.timings.route, "reason": ans.reason,
        "expansion": ans.expansion, "num_points": len(ans.points),
        "empty_points": sum(not p.text for p in ans.points),  # a stop rule cut the expansion to nothing
        "normal_latency": normal.timings.total, "sot_latency": ans.timings.total,
        "speedup": normal.timings.total / ans.timings.total,
        "normal_tokens": normal.tokens.normal_output, "sot_tokens": ans.tokens.output,
        "normal_chars": len(normal.text), "sot_chars": len(ans.text),
        "timings": ans.to_dict()["timings"], "tokens": ans.to_dict()["tokens"],
        "points": [{"point": p.point, "tokens": p.num_tokens, "stop": p.stop_reason, "prompt_tokens": p.prompt_tokens,
                    "cached_tokens": p.cached_tokens} for p in ans.points],
        "trace": trace(normal, ans), "counters": counters,
        "skeleton": ans.skeleton, "sot_answer": ans.text, "normal_answer": normal.text,
    }


def _delta(before: dict, after: dict) -> dict:
    return {k: after[k] - before[k] for k in after}


def fell_back(row: dict) -> bool:
    """SoT was tried (the router or the caller chose it) but answered with normal decoding: a skeleton without
    enough usable points, or a request that did not fit."""
    return row["mode"] == "normal" and row.get("tokens", {}).get("skeleton_output", 0) > 0


def summarize(rows: list[dict]) -> dict:
    """Per category and overall: counts, mean latencies, speed-up of the means, fallbacks, points per skeleton,
    empty points."""
    def agg(rs: list[dict]) -> dict:
        n, s = statistics.fmean(r["normal_latency"] for r in rs), statistics.fmean(r["sot_latency"] for r in rs)
        ran = [r for r in rs if r["mode"] == "sot"]
        out = {"n": len(rs), "sot_used": len(ran), "normal_latency": n,
               "sot_latency": s, "speedup": n / s,
               "normal_tokens": statistics.fmean(r["normal_tokens"] for r in rs),
               "sot_tokens": statistics.fmean(r["sot_tokens"] for r in rs)}
        if all("llama_cpp_latency" in r for r in rs):  # --against llama.cpp
            lc = statistics.fmean(r["llama_cpp_latency"] for r in rs)
            out.update(llama_cpp_latency=lc, speedup_vs_llama_cpp=lc / s,
                       llama_cpp_tokens=statistics.fmean(r["llama_cpp_tokens"] for r in rs))
        if all("empty_points" in r for r in rs):  # a real run's records (a replay has lengths only)
            out.update(fallbacks=sum(fell_back(r) for r in rs),
                       points_per_skeleton=statistics.fmean(r["num_points"] for r in ran) if ran else 0.0,
                       empty_points=sum(r["empty_points"] for r in ran))
        return out
    cats = sorted({r["category"] for r in rows})
    out = {c: agg([r for r in rows if r["category"] == c]) for c in cats}
    suited = [r for r in rows if r["category"] in SOT_SUITED]
    if suited:
        out["SoT-suited"] = agg(suited)
    ran = [r for r in rows if r["mode"] == "sot"]
    if ran and len(ran) < len(rows):
        out["where SoT ran"] = agg(ran)
    out["all"] = agg(rows)
    return out


def table(summary: dict) -> str:
    """Markdown, a row per category; "fell back" (SoT tried, normal answer), points per skeleton and empty points
    where the summary has them."""
    quality = all("fallbacks" in a for a in summary.values())
    lc = all("llama_cpp_latency" in a for a in summary.values())
    extra = " fell back | points | empty points |" if quality else ""
    lc_head = " llama.cpp normal s | SoT vs llama.cpp |" if lc else ""
    lines = [f"| category | n | SoT used |{extra} normal s | SoT/auto s | speed-up |{lc_head} normal tokens | SoT tokens |",
             "|---|---:|---:|" + "---:|" * (3 * quality + 2 * lc) + "---:|---:|---:|---:|---:|"]
    for c, a in summary.items():
        q = f" {a['fallbacks']} | {a['points_per_skeleton']:.1f} | {a['empty_points']} |" if quality else ""
        vs = f" {a['llama_cpp_latency']:.1f} | {a['speedup_vs_llama_cpp']:.2f}x |" if lc else ""
        lines.append(f"| {c} | {a['n']} | {a['sot_used']} |{q} {a['normal_latency']:.1f} | {a['sot_latency']:.1f} "
                     f"| {a['speedup']:.2f}x |{vs} {a['normal_tokens']:.0f} | {a['sot_tokens']:.0f} |")
    return "\n".join(lines)


def default_out_dir(device_type: str) -> Path:
    """Where results go without --out: $SOT_BENCH_RESULTS, else the repository's `benchmarks/results` when run
    from a checkout's root (the committed tables), else `./sot-bench-results`; then a folder per device type."""
    env = os.environ.get("SOT_BENCH_RESULTS")
    base = Path(env) if env else Path("benchmarks/results") if Path("benchmarks/results").is_dir() \
        else Path("sot-bench-results")
    return base / device_type


def _commit() -> str | None:
    """The code that produced the numbers (None outside a git checkout)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


# `sot bench --warm`'s unrelated question (not in Vicuna-80): answered before each timed answer
WARM_QUESTION = "How do bees make honey?"


def run_bench(sot: SoT, dataset: str = "vicuna80", *, limit: int | None = None,
              categories: list[str] | None = None, mode: str = "auto", name: str | None = None,
              out_dir: Path | None = None, ids: list[int] | None = None, log=print,
              on_row: Callable[[dict], None] | None = None,
              baseline: Callable[[str], dict] | None = None, warm: str | None = None) -> tuple[Path, dict]:
    """Run, write `<name>.jsonl` (a line per question) and `<name>.json` (summary), return the summary.
    `ids`: only these question ids, in this order; `on_row`: called with each question's record once written;
    `baseline`: another engine's normal decoding (`question -> {seconds, tokens, ...}`, llama.cpp's), timed too;
    `warm`: time each answer as a running server gives it, right after an SoT answer to this unrelated question
    (its prompts' shared prefixes, the templates and the system prompt, in the prefix cache, nothing else: the
    cache is emptied first, so no answer reuses another answer to the same question). Needs prefix caching on;
    None (the paper's way) needs it off: each answer costs what it costs alone."""
    if (warm is not None) != sot.llm.engine.block_manager.enable_caching:
        raise ValueError("warm needs an engine with prefix caching, and no warm needs one without")
    qs = load_dataset(dataset)
    if ids is not None:
        by_id = {q.id: q for q in qs}
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise ValueError(f"no questions with ids {missing}")
        qs = [by_id[i] for i in ids]
    if categories:
        unknown = set(categories) - {q.category for q in qs}
        if unknown:
            raise ValueError(f"no questions in categories {sorted(unknown)}")
        qs = [q for q in qs if q.category in categories]
    if limit is not None:
        qs = qs[:limit]
    device = sot.llm.engine.device
    out_dir = out_dir or default_out_dir(device.type)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = name or f"sot_{Path(dataset).stem}_{mode}_{sot.config.expansion}" + ("_warm" if warm else "")
    jsonl = out_dir / f"{name}.jsonl"
    rows = []
    t0 = time.perf_counter()

    def timed(text: str, m: str) -> tuple[Answer, dict, float]:
        """An answer, the engine's work counters it spent, and this process's CPU seconds (on a shared CPU,
        steadier than wall time for comparing runs)."""
        if warm is not None:
            if not sot.llm.reset_prefix_cache():
                raise RuntimeError("a request still holds KV blocks between benchmark answers")
            sot.answer(warm, mode="sot")
        c, p = dict(sot.llm.engine.counters), time.process_time()
        a = sot.answer(text, mode=m)
        return a, _delta(c, dict(sot.llm.engine.counters)), time.process_time() - p

    with jsonl.open("w") as f:
        for i, q in enumerate(qs):
            normal, c_normal, p_normal = timed(q.text, "normal")
            ans, c_sot, p_sot = timed(q.text, mode)
            row = _row(q, normal, ans, {"normal": c_normal, "sot": c_sot})
            row["cpu_time"] = {"normal": p_normal, "sot": p_sot}
            if baseline is not None:
                b = baseline(q.text)
                row |= {"llama_cpp_latency": b["seconds"], "llama_cpp_tokens": b["tokens"],
                        "speedup_vs_llama_cpp": b["seconds"] / row["sot_latency"]}
            rows.append(row)
            f.write(json.dumps(row) + "\n")
            f.flush()
            if on_row is not None:
                on_row(row)
            log(f"[{i + 1}/{len(qs)}] {q.category:14s} {ans.mode:6s} normal {row['normal_latency']:5.1f}s "
                f"{mode} {row['sot_latency']:5.1f}s  x{row['speedup']:.2f}  ({ans.reason})")
    summary = summarize(rows)
    cfg = sot.config
    payload = {"env": environment(device), "commit": _commit(), "model": sot.llm.engine.model_name,
               "backend": sot.llm.engine.backend.name, "dtype": str(sot.llm.engine.dtype),
               "weights": sot.llm.engine.weight_dtype, "matmul_precision": sot.llm.engine.matmul_precision,
               "kv_cache_dtype": str(sot.llm.engine.kv_dtype).replace("torch.", ""),
               "router": getattr(sot.router, "name", "rules") if mode == "auto" else None,
               "dataset": dataset, "mode": mode, "expansion": cfg.expansion, "limit": limit, "ids": ids,
               "categories": categories, "config": {k: v for k, v in vars(cfg).items() if k != "prompts"},
               "point_prefill": cfg.prompts.point_prefill, "warm": warm, "wall_seconds": time.perf_counter() - t0,
               "summary": summary, "table": table(summary)}
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    log(table(summary))
    return path, summary
