"""End-to-end SoT against normal decoding on any model shape: a real run's structure replayed with forced
lengths on our engine, next to the paper's method (transformers `generate`), per Vicuna-80 category.

    python -m benchmarks.sot_e2e replay --model llama-7b                # CUDA fp16, the committed paper-mode run
    python -m benchmarks.sot_e2e replay --model llama-13b --systems hf  # the paper's method alone
    python -m benchmarks.sot_e2e validate --per-category 1              # a real SmolLM2 run, then its replay
    python -m benchmarks.sot_e2e backfill RECORDS.jsonl                 # traces for records made before them
    python -m benchmarks.sot_e2e --quick                                # tiny shape on CPU, seconds (smoke run)

Why replay: SoT's speed-up depends on the lengths a model writes (skeleton, points, normal answer), and only
a real model writes real lengths; the latency of those lengths on a 7B-33B model needs no trained weights.
A `sot bench` record (`sot.bench.trace`) holds, per question, every stage's prompt and output tokens, each
point's prompt, the prefix the points' fork shares and whether they continue the kept skeleton request.
`replay` redoes exactly that work on `random:<shape>` weights with fixed-seed random token ids, each output
forced to its recorded length (`ignore_eos`, `max_tokens`): the skeleton request, the points forked on the
shared prefix as the driver forks them, the normal answer. On the same shape and device it must spend the same
engine counters as the real run (`validate` checks this and reports the latency ratio, the real run paying
for detokenization and stop rules on top).
The paper's method (`--systems hf`): `LlamaForCausalLM` of the same shape with random weights, `generate` on
the skeleton, then on a left-padded batch of the full point prompts (no prefix sharing; every row decodes
until the longest point ends), and normal decoding, all with the same forced lengths (min/max_new_tokens).
Results: `benchmarks/results/<device>/sot_e2e_<records>_<shape>.json` holds each system's rows and
per-category summary (normal s, SoT s, speed-up; the real run's recorded numbers beside them) and the
ours-vs-paper comparison over the questions both ran; a PNG beside it.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from benchmarks import common
from benchmarks.common import (environment, pyplot, result_path, save_figure, sigterm_as_interrupt, sync,
                               write_result)
from sot_engine.engine import LLM, SamplingParams
from sot_engine.engine.config import SHAPES, ModelConfig, shape
from sot_engine.sot.bench import summarize, table

DEFAULT_RECORDS = Path(__file__).resolve().parent / "results" / "cpu" / "sot_vicuna80_auto_paper.jsonl"
SYSTEMS = ("ours", "hf")
STRUCTURE = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim")


# ---------------------------------------------------------------- records and traces

def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def select(rows: list[dict], per_category: int | None = None, limit: int | None = None) -> list[dict]:
    """Rows round-robin over categories (first `per_category` of each), so a run cut short by its time budget
    still covers every category."""
    by_cat: dict[str, list[dict]] = {}
    for r in rows:
        by_cat.setdefault(r["category"], []).append(r)
    queues = [rs[:per_category] if per_category else rs for rs in by_cat.values()]
    out = [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)]
    return out[:limit] if limit else out


def cap_trace(tr: dict, max_output: int | None) -> dict:
    """The trace with every output cut to `max_output` tokens (quick runs)."""
    if not max_output:
        return tr
    cut = lambda pair: [pair[0], min(pair[1], max_output)]  # noqa: E731
    sot = dict(tr["sot"])
    for k in ("skeleton", "normal"):
        if k in sot:
            sot[k] = cut(sot[k])
    if "points" in sot:
        sot["points"] = {**sot["points"], "output": [min(o, max_output) for o in sot["points"]["output"]]}
    return {"normal": cut(tr["normal"]), "sot": sot}


def shape_of(cfg: ModelConfig) -> str | None:
    """The `random:<shape>` name with this model's structure (what its cost depends on), if there is one."""
    for name, s in SHAPES.items():
        if all(getattr(s, f) == getattr(cfg, f) for f in STRUCTURE):
            return name
    return None


def backfill(path: Path, model: str = "default") -> int:
    """Add `trace` to the rows of a record written before `sot bench` recorded it, rebuilding each point's prompt
    with the driver (`SoT.point_prompts`) on the run's tokenizer. Every rebuilt length is checked against the
    totals the record does hold (point prompt tokens, tokens prefilled); a row that disagrees is left without
    a trace. Returns the number of rows given a trace."""
    from sot_engine.sot.bench import trace
    from sot_engine.sot.driver import Answer, PointAnswer, SoT, SoTConfig, TokenCounts, common_prefix_len
    from sot_engine.sot.skeleton import Point
    meta = json.loads(path.with_suffix(".json").read_text())
    sot = SoT(LLM(model, device="cpu", enable_prefix_caching=False), SoTConfig(**meta["config"]))
    rows, added = read_records(path), 0
    for r in rows:
        if "trace" in r:
            continue
        t = {k: v for k, v in r["tokens"].items() if k != "output"}
        q = r["question"].strip()
        normal_prompt = len(sot.llm.engine.encode([{"role": "user", "content": q}]))
        if t["normal_prompt"] and t["normal_prompt"] != normal_prompt:
            print(f"question {r['question_id']}: normal prompt {normal_prompt} != recorded {t['normal_prompt']}")
            continue
        points = []
        if r["points"]:
            pts = [Point(i + 1, p["point"]) for i, p in enumerate(r["points"])]
            lens = [len(f) for f in sot.point_prompts(q, r["skeleton"], pts, sot.config)]
            saved, b = t["expand_prompt"] - t["expand_prefilled"], len(lens)  # prompt tokens not prefilled
            paper = r["expansion"] == "paper"
            shared = common_prefix_len(sot.point_prompts(q, r["skeleton"], pts, sot.config)) if paper else saved // b
            if sum(lens) != t["expand_prompt"] or saved != (b - 1 if paper else b) * shared or not 0 < shared < min(lens):
                print(f"question {r['question_id']}: rebuilt point prompts {sum(lens)} (shared {shared}) do not "
                      f"match the record ({t['expand_prompt']} prompt, {t['expand_prefilled']} prefilled)")
                continue
            points = [PointAnswer(pt.index, pt.text, "", p["tokens"], None, p["stop"], n, shared)
                      for pt, p, n in zip(pts, r["points"], lens)]
        ans = Answer(q, r["mode"], r["reason"], "", points=points, expansion=r["expansion"], tokens=TokenCounts(**t))
        normal = Answer(q, "normal", "", "", tokens=TokenCounts(normal_prompt=normal_prompt,
                                                                 normal_output=r["normal_tokens"]))
        r["trace"] = trace(normal, ans)
        r["trace_source"] = "backfilled: point prompts rebuilt with sot.driver.SoT.point_prompts, checked"
        added += 1
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return added


# ---------------------------------------------------------------- the two systems

@dataclass
class Result:
    """One answer replayed: wall time, per stage times, engine counters spent (ours), whether every output
    came out at its forced length."""
    latency: float = 0.0
    cpu_time: float = 0.0  # this process's CPU seconds (the steadier measure on a shared CPU)
    stages: dict = field(default_factory=dict)
    counters: dict | None = None
    tokens_ok: bool = True


@contextmanager
def timed(device: torch.device, res: Result, stage: str) -> Iterator[None]:
    """Adds the stage's synchronized wall time to `res.stages[stage]`."""
    sync(device)
    t0 = time.perf_counter()
    yield
    sync(device)
    res.stages[stage] = res.stages.get(stage, 0.0) + time.perf_counter() - t0


class _System:
    """Times one answer's work; subclasses say how a normal and a SoT answer are done."""
    name = label = ""
    device: torch.device

    def counters(self) -> dict | None:
        return None

    def run(self, work: Callable[[Result], None]) -> Result:
        res, before = Result(), self.counters()
        t0, p0 = time.perf_counter(), time.process_time()
        work(res)
        sync(self.device)
        res.latency, res.cpu_time = time.perf_counter() - t0, time.process_time() - p0
        if before is not None:
            res.counters = {k: v - before[k] for k, v in self.counters().items()}
        return res


class Ours(_System):
    """Replays traces on our engine, calling it as `sot.driver` does."""
    name = "ours"

    def __init__(self, llm: LLM, seed: int = 0) -> None:
        self.llm, self.device = llm, llm.engine.device
        self.label = f"our engine, {llm.engine.backend.name} kernels"
        self.gen = torch.Generator().manual_seed(seed)

    def counters(self) -> dict:
        return dict(self.llm.engine.counters)

    def ids(self, n: int) -> list[int]:
        return torch.randint(3, self.llm.config.vocab_size, (n,), generator=self.gen).tolist()

    @staticmethod
    def params(n: int) -> SamplingParams:
        return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)

    def _one(self, stage: list[int], res: Result, keep: bool = False):
        (out,) = self.llm.generate([self.ids(stage[0])], self.params(stage[1]), keep_kv=keep)
        res.tokens_ok &= len(out.token_ids) == stage[1]
        return out

    def normal(self, tr: dict) -> Result:
        def work(res: Result) -> None:
            with timed(self.device, res, "normal"):
                self._one(tr["normal"], res)
        return self.run(work)

    def sot(self, tr: dict) -> Result:
        s = tr["sot"]

        def work(res: Result) -> None:
            held = None
            pts = s.get("points")
            if "skeleton" in s:
                keep = bool(pts and pts["from_skeleton"])  # continuation: the points continue its KV
                with timed(self.device, res, "skeleton"):
                    held = self._one(s["skeleton"], res, keep=keep)
                if not keep:
                    held = None
            try:
                if pts:
                    with timed(self.device, res, "expand"):
                        self._points(pts, held, res)
            finally:
                if held is not None:
                    self.llm.release(held)
            if "normal" in s:
                with timed(self.device, res, "normal"):
                    self._one(s["normal"], res)
        return self.run(work)

    def _points(self, pts: dict, held, res: Result) -> None:
        n = pts["shared"]
        suffixes = [self.ids(p - n) for p in pts["prompt"]]
        params = [self.params(o) for o in pts["output"]]
        if pts["from_skeleton"]:
            outs = self.llm.fork(held, suffixes, params, prefix_len=n)
        elif n:
            outs = self.llm.fork(self.ids(n), suffixes, params)
        else:  # nothing shared: one batch of whole prompts
            outs = self.llm.generate(suffixes, params)
        res.tokens_ok &= [len(o.token_ids) for o in outs] == list(pts["output"])

    def close(self) -> None:
        self.llm = None


def hf_model(cfg: ModelConfig, device: torch.device, dtype: torch.dtype):
    """`LlamaForCausalLM` of this shape, its random weights made on the device in the dtype (no fp32 CPU copy:
    a 33B model would not fit twice); no download."""
    from transformers import LlamaConfig, LlamaForCausalLM
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(**cfg.to_hf()))
    finally:
        torch.set_default_dtype(old)
    return model.eval()


class PaperHF(_System):
    """The paper's method on transformers: no prefix sharing, the points as one left-padded batch."""
    name = "hf"
    label = "paper's method: transformers generate"
    PAD = 0

    def __init__(self, cfg: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> None:
        self.cfg, self.device = cfg, device
        self.model = hf_model(cfg, device, dtype)
        self.gen = torch.Generator().manual_seed(seed)

    def _generate(self, stage: str, lens: list[int], new: int, res: Result) -> None:
        width = max(lens)
        ids = torch.full((len(lens), width), self.PAD, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, n in enumerate(lens):
            ids[i, width - n:] = torch.randint(3, self.cfg.vocab_size, (n,), generator=self.gen)
            mask[i, width - n:] = 1
        with timed(self.device, res, stage), torch.inference_mode():
            out = self.model.generate(ids.to(self.device), attention_mask=mask.to(self.device), do_sample=False,
                                      max_new_tokens=new, min_new_tokens=new, pad_token_id=self.PAD)
        res.tokens_ok &= out.shape[1] - width == new

    def normal(self, tr: dict) -> Result:
        return self.run(lambda res: self._generate("normal", [tr["normal"][0]], tr["normal"][1], res))

    def sot(self, tr: dict) -> Result:
        s = tr["sot"]

        def work(res: Result) -> None:
            if "skeleton" in s:
                self._generate("skeleton", [s["skeleton"][0]], s["skeleton"][1], res)
            if "points" in s:  # pad rows decode until the longest point ends
                self._generate("expand", s["points"]["prompt"], max(s["points"]["output"]), res)
            if "normal" in s:
                self._generate("normal", [s["normal"][0]], s["normal"][1], res)
        return self.run(work)

    def close(self) -> None:
        self.model = None


# ---------------------------------------------------------------- a run

def sot_output_tokens(sot_trace: dict) -> int:
    return sum(sot_trace[k][1] for k in ("skeleton", "normal") if k in sot_trace) + \
        sum(sot_trace.get("points", {}).get("output", []))


def replay_rows(system, records: list[dict], max_output: int | None, deadline: float,
                log=print, warm: bool = True) -> tuple[list[dict], bool]:
    """Normal and SoT answer per record, as `sot bench` runs them; stops starting questions at `deadline`.
    Returns the rows and whether it was interrupted (SIGTERM under benchmarks/gpu_check.sh)."""
    rows: list[dict] = []
    try:
        if records and warm:  # warm-up on the first question, outputs cut to 2 tokens: JIT compiles are not timed
            tr = cap_trace(records[0]["trace"], 2)
            system.normal(tr), system.sot(tr)
        _replay(system, records, max_output, deadline, rows, log)
    except KeyboardInterrupt:
        log(f"interrupted after {len(rows)} questions")
        return rows, True
    return rows, False


def _replay(system, records: list[dict], max_output: int | None, deadline: float, rows: list[dict], log) -> None:
    for i, r in enumerate(records):
        if time.monotonic() > deadline:
            log(f"time budget spent: {len(records) - i} questions not run")
            break
        tr = cap_trace(r["trace"], max_output)
        n, s = system.normal(tr), system.sot(tr)
        row = {"question_id": r["question_id"], "category": r["category"], "mode": tr["sot"]["mode"],
               "normal_latency": n.latency, "sot_latency": s.latency, "speedup": n.latency / s.latency,
               "normal_tokens": tr["normal"][1], "sot_tokens": sot_output_tokens(tr["sot"]),
               "stages": s.stages, "tokens_ok": n.tokens_ok and s.tokens_ok,
               "cpu_time": {"normal": n.cpu_time, "sot": s.cpu_time},
               "counters": None if n.counters is None else {"normal": n.counters, "sot": s.counters},
               "recorded": {"normal_latency": r.get("normal_latency"), "sot_latency": r.get("sot_latency"),
                            "counters": r.get("counters"), "cpu_time": r.get("cpu_time")}}
        if row["counters"] is not None and r.get("counters") and not max_output:
            row["counters_equal"] = row["counters"] == r["counters"]
        rows.append(row)
        log(f"[{i + 1}/{len(records)}] {system.name:4s} {r['category']:14s} {row['mode']:6s} normal "
            f"{n.latency:6.2f}s SoT {s.latency:6.2f}s x{row['speedup']:.2f}")


def validation(rows: list[dict], capped: bool) -> dict:
    """How the replay compares with the run it replays: counters, forced lengths, latency ratio (not when the
    outputs were cut: then it is other work)."""
    rec = [r for r in rows if r["recorded"]["normal_latency"] and not capped]
    out = {"n": len(rows), "tokens_ok": all(r["tokens_ok"] for r in rows)}
    compared = [r["counters_equal"] for r in rows if "counters_equal" in r]
    if compared:
        out["counters_equal"] = f"{sum(compared)}/{len(compared)}"
    if rec:  # total replay time / total recorded time, and the median of the per-question ratios
        for k in ("normal", "sot"):
            out[f"latency_ratio_{k}"] = (sum(r[f"{k}_latency"] for r in rec)
                                         / sum(r["recorded"][f"{k}_latency"] for r in rec))
            out[f"latency_ratio_{k}_median"] = statistics.median(r[f"{k}_latency"] / r["recorded"][f"{k}_latency"]
                                                                 for r in rec)
            if all(r["recorded"]["cpu_time"] for r in rec):
                out[f"cpu_ratio_{k}"] = (sum(r["cpu_time"][k] for r in rec)
                                         / sum(r["recorded"]["cpu_time"][k] for r in rec))
    return out


def recorded_summary(rows: list[dict], records: list[dict]) -> dict:
    """The real run's own numbers on the replayed questions (what `sot bench` measured on the real model)."""
    by_id = {r["question_id"]: r for r in records}
    done = [by_id[r["question_id"]] for r in rows]
    return summarize(done) if done else {}


def _in_cpu_seconds(r: dict, times: dict) -> dict:
    return {**r, "normal_latency": times["normal"], "sot_latency": times["sot"]}


def compare(ours: list[dict], hf: list[dict], cpu: bool = False) -> dict:
    """Per category over the questions both systems ran: each one's normal and SoT latency and speed-up, and how
    much faster our SoT is than the paper's method (paper SoT s / our SoT s), beside the real run's own speed-up.
    `cpu`: ours and the paper's in CPU seconds instead of wall seconds (a CPU run on a shared machine)."""
    common = {r["question_id"] for r in ours} & {r["question_id"] for r in hf}
    if not common:
        return {}
    real = summarize([{**r, **r["recorded"]} for r in ours if r["question_id"] in common]) \
        if all(r["recorded"]["normal_latency"] for r in ours) else {}  # as the real run measured it (wall)
    if cpu:
        ours, hf = [_in_cpu_seconds(r, r["cpu_time"]) for r in ours], [_in_cpu_seconds(r, r["cpu_time"]) for r in hf]
    a = summarize([r for r in ours if r["question_id"] in common])
    b = summarize([r for r in hf if r["question_id"] in common])
    return {c: {"n": a[c]["n"], "sot_used": a[c]["sot_used"], "real_speedup": real.get(c, {}).get("speedup"),
                "ours_normal": a[c]["normal_latency"], "ours_sot": a[c]["sot_latency"], "ours_speedup": a[c]["speedup"],
                "hf_normal": b[c]["normal_latency"], "hf_sot": b[c]["sot_latency"], "hf_speedup": b[c]["speedup"],
                "ours_vs_paper": b[c]["sot_latency"] / a[c]["sot_latency"]} for c in a}


def compare_table(cmp: dict, unit: str = "s") -> str:
    """Markdown: per category, the recorded real run's speed-up, ours and the paper's method."""
    lines = [f"| category | n | SoT used | real run speed-up | ours normal {unit} | ours SoT {unit} | ours speed-up "
             f"| paper normal {unit} | paper SoT {unit} | paper speed-up | our SoT vs paper's |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c, d in cmp.items():
        real = f"{d['real_speedup']:.2f}x" if d.get("real_speedup") else "-"
        lines.append(f"| {c} | {d['n']} | {d['sot_used']} | {real} | {d['ours_normal']:.2f} | {d['ours_sot']:.2f} | "
                     f"{d['ours_speedup']:.2f}x | {d['hf_normal']:.2f} | {d['hf_sot']:.2f} | {d['hf_speedup']:.2f}x "
                     f"| {d['ours_vs_paper']:.2f}x |")
    return "\n".join(lines)


def replay_table(summary: dict, recorded: dict, unit: str = "s") -> str:
    """Markdown: per category, the recorded real run next to its replay (one system); `unit` names the measure."""
    lines = [f"| category | n | SoT used | real normal {unit} | real SoT {unit} | real speed-up | replay normal {unit} "
             f"| replay SoT {unit} | replay speed-up |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c, d in summary.items():
        r = recorded.get(c)
        real = f"{r['normal_latency']:.2f} | {r['sot_latency']:.2f} | {r['speedup']:.2f}x" if r else "- | - | -"
        lines.append(f"| {c} | {d['n']} | {d['sot_used']} | {real} | {d['normal_latency']:.2f} | "
                     f"{d['sot_latency']:.2f} | {d['speedup']:.2f}x |")
    return "\n".join(lines)


def plot(payload: dict, path: Path) -> Path | None:
    """Speed-up per category (real run as recorded, our replay, the paper's method) and SoT latency."""
    plt = pyplot()
    systems = payload["systems"]
    if plt is None:
        return None
    # on a CPU, CPU seconds are the steady measure (wall time follows the other jobs on the machine)
    cpu = payload["env"]["device_type"] == "cpu" and all(r.get("cpu_time") for s in systems.values() for r in s["rows"])
    unit = "CPU s" if cpu else "s"
    series = {f"{k} ({s['label']})": summarize([_in_cpu_seconds(r, r["cpu_time"]) for r in s["rows"]]) if cpu
              else s["summary"] for k, s in systems.items() if s["rows"]}
    rec = next((s.get("recorded_cpu_summary" if cpu else "recorded_summary") for s in systems.values()), None)
    if rec:
        series[f"recorded real run ({payload['records_model']})"] = rec
    if not series:
        return None
    cats = [c for c in next(iter(series.values())) if c != "where SoT ran"]
    fig, ax = plt.subplots(1, 2, figsize=(14, 4.5))
    w = 0.8 / len(series)
    for i, (label, summ) in enumerate(series.items()):
        xs = [j + i * w for j, c in enumerate(cats) if c in summ]
        ax[0].bar(xs, [summ[c]["speedup"] for c in cats if c in summ], w, label=label)
        if not label.startswith("recorded"):
            ax[1].bar(xs, [summ[c]["sot_latency"] for c in cats if c in summ], w, label=label)
    for a, title in zip(ax, (f"speed-up of SoT over normal decoding ({unit})", f"SoT latency ({unit})")):
        a.set_xticks([j + 0.4 - w / 2 for j in range(len(cats))], cats, rotation=45, ha="right", fontsize=8)
        a.set_title(title)
        a.legend(fontsize=7)
    ax[0].axhline(1.0, color="k", lw=0.8)
    return save_figure(plt, fig, f"SoT on {payload['model']} {payload['dtype']} ({payload['env']['device']}), "
                       f"lengths of {payload['records']}", path)


def _head(records_path: Path, spec: str, dtype: torch.dtype, selection: dict) -> dict:
    """What a result says about its input: the model replayed, the records and the run that made them."""
    meta_path = records_path.with_suffix(".json")
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    return {"model": spec, "dtype": str(dtype).removeprefix("torch."), "records": records_path.name,
            "records_model": meta.get("model"), "records_device": meta.get("env", {}).get("device"),
            "records_backend": meta.get("backend"), "selection": selection}


def _result_name(records_path: Path, spec: str, quick: bool) -> str:
    shape_name = spec.removeprefix("random:").replace("/", "_")
    return f"sot_e2e_{records_path.stem.removeprefix('sot_')}_{shape_name}" + ("_quick" if quick else "")


def _system_entry(label: str, rows: list[dict], wanted: int, interrupted: bool, all_records: list[dict],
                  capped: bool, device: torch.device, log) -> dict:
    entry = {"label": label, "env": environment(device), "rows": rows, "complete": len(rows) == wanted,
             "interrupted": interrupted, "summary": summarize(rows) if rows else {},
             "recorded_summary": recorded_summary(rows, all_records), "validation": validation(rows, capped)}
    if rows and device.type == "cpu" and all((r["recorded"].get("cpu_time") or {}).get("sot") for r in rows):
        # the same summaries in CPU seconds: on a shared CPU the steady measure of replay against the real run
        entry["cpu_summary"] = summarize([_in_cpu_seconds(r, r["cpu_time"]) for r in rows])
        entry["recorded_cpu_summary"] = summarize([_in_cpu_seconds(r, r["recorded"]["cpu_time"]) for r in rows])
    if rows:
        log(table(entry["summary"]))
        log(f"vs the recorded run: {entry['validation']}")
    return entry


def _finish(payload: dict, name: str, device: torch.device, log) -> tuple[Path, dict]:
    """The ours-vs-paper comparison (when both ran), the JSON and the plot."""
    ours, hf = payload["systems"].get("ours"), payload["systems"].get("hf")
    payload["compare"] = compare(ours["rows"], hf["rows"]) if ours and hf else {}
    if payload["compare"]:
        log(compare_table(payload["compare"]))
    if payload["compare"] and device.type == "cpu":  # wall time on a shared CPU is at the mercy of other jobs
        payload["compare_cpu"] = compare(ours["rows"], hf["rows"], cpu=True)
        log(compare_table(payload["compare_cpu"], "CPU s"))
    out = write_result(name, device, payload)
    png = plot({**payload, "env": environment(device)}, result_path(name, device, ".png"))
    log(f"wrote {out} and {png or 'no plot (matplotlib missing)'}")
    return out, payload


def run_replay(records_path: Path, model: str, systems: list[str], *, device: torch.device,
               dtype: torch.dtype, backend: str | None = None, threads: int | None = None,
               per_category: int | None = None, limit: int | None = None, max_output: int | None = None,
               budget_s: float = 1e9, log=print) -> tuple[Path, dict]:
    """Replay the records on `model` (a shape name or any engine model spec) with each system; results are
    merged into one file per (records, model), so systems may run in separate processes."""
    spec = model if (":" in model or "/" in model or model == "default") else f"random:{model}"
    all_records = read_records(records_path)
    missing = [r["question_id"] for r in all_records if "trace" not in r]
    if missing:
        raise SystemExit(f"{records_path}: {len(missing)} rows have no trace (recorded before traces were): run "
                         f"`python -m benchmarks.sot_e2e backfill {records_path}` on a machine with that model")
    records = select(all_records, per_category, limit)
    name = _result_name(records_path, spec, bool(max_output))
    head = _head(records_path, spec, dtype, {"per_category": per_category, "limit": limit, "max_output": max_output})
    path = result_path(name, device)
    payload = json.loads(path.read_text()) if path.exists() else {}
    if any(payload.get(k) != v for k, v in head.items()):
        payload = {}  # another question set, model or dtype: start over
    payload = {**payload, **head, "systems": payload.get("systems", {})}
    if threads and device.type == "cpu":
        torch.set_num_threads(threads)
    with sigterm_as_interrupt(device.type == "cuda"):
        for sysname in systems:
            t0 = time.perf_counter()
            system = _system(sysname, spec, device, dtype, backend, threads)
            log(f"{sysname}: {spec} ready in {time.perf_counter() - t0:.1f}s")
            deadline = time.monotonic() + budget_s  # each system's own budget, its load not counted
            try:
                rows, interrupted = replay_rows(system, records, max_output, deadline, log)
            finally:
                label = system.label
                system.close()
                del system
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            payload["systems"][sysname] = _system_entry(label, rows, len(records), interrupted, all_records,
                                                        bool(max_output), device, log)
            if interrupted:
                break  # save what there is
    return _finish(payload, name, device, log)


def _system(name: str, spec: str, device: torch.device, dtype: torch.dtype, backend: str | None,
            threads: int | None):
    if name == "ours":
        return Ours(LLM(spec, device=str(device), dtype=dtype, backend=backend, num_threads=threads,
                        enable_prefix_caching=False))  # as recorded: each question costs what it costs alone
    if name == "hf":
        cfg = shape(spec.removeprefix("random:")) if spec.startswith("random:") else LLM(spec).config
        return PaperHF(cfg, device, dtype)
    raise SystemExit(f"unknown system {name!r}: use {SYSTEMS}")


def validate(model: str, *, device: torch.device, dtype: torch.dtype, backend: str | None, threads: int | None,
             per_category: int, expansion: str, normal_max_tokens: int, dataset: str = "vicuna80",
             out_dir: Path | None = None, log=print) -> tuple[Path, dict]:
    """A real run on `model` (`sot bench` on a few questions per category) and its replay on random weights of
    the same shape, same device, dtype, backend and threads, interleaved question by question (so a change in
    the machine's load hits both alike): the counters must be equal, the latency close."""
    from sot_engine.sot.bench import load_dataset, run_bench
    from sot_engine.sot.driver import SoT, SoTConfig
    qs = load_dataset(dataset)
    ids = [r["question_id"] for r in select([{"question_id": q.id, "category": q.category} for q in qs],
                                             per_category)]
    llm = LLM(model, device=str(device), dtype=dtype, backend=backend, num_threads=threads,
              enable_prefix_caching=False)  # like `sot bench`: no question reuses another's blocks
    target = shape_of(llm.config)
    if target is None:
        raise SystemExit(f"{model}: no random shape in engine.config.SHAPES has its structure")
    sot = SoT(llm, SoTConfig(expansion=expansion, normal_max_tokens=normal_max_tokens))
    spec = f"random:{target}"
    system = _system("ours", spec, device, dtype, backend, threads)
    rows: list[dict] = []
    done: list[dict] = []

    def replay_now(record: dict) -> None:
        rows.extend(replay_rows(system, [record], None, float("inf"), log, warm=not done)[0])
        done.append(record)
    name = f"sot_{Path(dataset).stem}_validate_{expansion}"
    rec_path, _ = run_bench(sot, dataset, ids=ids, name=name, out_dir=out_dir or common.RESULTS / device.type,
                            log=log, on_row=replay_now)
    records_path = rec_path.with_suffix(".jsonl")
    payload = {**_head(records_path, spec, dtype, {"validate": per_category, "ids": ids}), "systems": {
        "ours": _system_entry(system.label, rows, len(ids), False, done, False, device, log)}}
    return _finish(payload, _result_name(records_path, spec, False), device, log)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few questions on the tiny shape, outputs cut to 8 tokens")
    sub = ap.add_subparsers(dest="cmd")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--device", default=None)
    common.add_argument("--dtype", default=None, help="default float16 on CUDA, float32 on CPU")
    common.add_argument("--backend", default=None)
    common.add_argument("--threads", type=int, default=None, help="CPU threads (default: the engine's)")
    common.add_argument("--per-category", type=int, default=None, help="first N questions of each category")
    r = sub.add_parser("replay", parents=[common], help="replay records on a model shape")
    r.add_argument("--records", type=Path, default=DEFAULT_RECORDS, help="a `sot bench` JSONL with traces")
    r.add_argument("--model", default="llama-7b", help="a shape of engine.config.SHAPES (random weights)")
    r.add_argument("--systems", default="ours,hf", help="ours, hf (the paper's method) or both")
    r.add_argument("--limit", type=int, default=None)
    r.add_argument("--max-output", type=int, default=None, help="cut every output to this many tokens")
    r.add_argument("--budget-s", type=float, default=1e9,
                   help="per system: stop starting questions this many seconds after its model is ready")
    v = sub.add_parser("validate", parents=[common], help="a real run, then its replay on the same shape")
    v.add_argument("--model", default="default")
    v.add_argument("--expansion", default="paper")
    v.add_argument("--normal-max-tokens", type=int, default=256)
    b = sub.add_parser("backfill", help="add traces to records made before `sot bench` wrote them")
    b.add_argument("records", type=Path)
    b.add_argument("--model", default="default", help="the model (tokenizer) the records were made with")
    a = ap.parse_args(argv)
    if a.cmd is None and not a.quick:
        ap.error("name a command (replay, validate, backfill) or pass --quick")
    if a.cmd == "backfill":
        print(f"{backfill(a.records, a.model)} rows given a trace in {a.records}")
        return
    device = torch.device(getattr(a, "device", None) or ("cpu" if a.quick or not torch.cuda.is_available()
                                                           else "cuda"))
    dtype_name = getattr(a, "dtype", None)
    dtype = getattr(torch, dtype_name) if dtype_name else (torch.float16 if device.type == "cuda" else torch.float32)
    if a.cmd is None:  # --quick: the committed records' first question of 3 categories, tiny shape, both systems
        run_replay(DEFAULT_RECORDS, "tiny", list(SYSTEMS), device=device, dtype=dtype, threads=1, per_category=1,
                   limit=3, max_output=8)
    elif a.cmd == "replay":
        run_replay(a.records, a.model, a.systems.split(","), device=device, dtype=dtype, backend=a.backend,
                   threads=a.threads, per_category=a.per_category, limit=a.limit, max_output=a.max_output,
                   budget_s=a.budget_s)
    else:
        validate(a.model, device=device, dtype=dtype, backend=a.backend, threads=a.threads,
                 per_category=a.per_category or 1, expansion=a.expansion, normal_max_tokens=a.normal_max_tokens)


if __name__ == "__main__":
    main()
