"""Render the latest results in benchmarks/results/ as Markdown and put them into README.md
between the `<!-- bench:start -->` / `<!-- bench:end -->` markers.

    python -m benchmarks.report            # print and update README.md
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from benchmarks import common

README = Path(__file__).resolve().parents[1] / "README.md"


def machine(env: dict) -> str:
    """The device, with the CPU's vector instructions where the run recorded them."""
    return env["device"] + (f" ({env['cpu_isa']})" if env.get("cpu_isa") else "")


def decode_cpu_table(path: Path) -> str:
    d = json.loads(path.read_text())
    env = d["env"]
    rows = d["rows"]
    lc = {r["batch"]: r["ms_per_step"] for r in rows if r.get("backend") == "llama.cpp"}
    lines = [f"CPU decode, {d['model']}, fp32 activations, {machine(env)}, {env['threads']} threads, "
             f"torch {env['torch']}, {env['date']} (`python -m benchmarks.decode_cpu"
             f"{' --llama-cpp' if lc else ''}`); weights: storage of the matrices (bf16; int8 with a scale per 32 "
             "weights; bf16-matmul: bf16 weights and activations rounded to bf16 in the matmuls, on AMX where the CPU "
             "has it; int8-matmul: int8 weights and activations quantized per 32, integer dot products; gguf: the "
             "file's own Q4_1 / Q8_0 weights, likewise; kv bf16: a bf16 K/V pool); isa: what the integer kernels ran "
             "on; vs llama.cpp: its time on the same file at the same batch over ours (> 1: ours is faster); outside "
             "matmuls: the step's time not in weight matmuls (attention, norms, Python, sampling):", "",
             "| backend | weights | isa | batch | ms/step | vs batch 1 | vs llama.cpp | transformers ms/step "
             "| vs transformers | outside matmuls |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]

    def key_of(r: dict) -> tuple[str, str]:
        return r.get("backend", "torch"), r.get("weights", "fp32") + (f", kv {r['kv']}" if r.get("kv") else "")

    def isa_of(r: dict) -> str:
        if r.get("backend") == "llama.cpp":
            flags = [f.split("=")[0].strip() for f in r.get("isa", "").split("|") if f.strip().endswith("= 1")]
            return "llama.cpp " + r.get("llama_cpp", "") + (f" ({', '.join(f for f in flags if 'AVX' in f)})"
                                                           if flags else "")
        return r.get("isa", "-")

    one = {key_of(r): r["ms_per_step"] for r in rows if r["batch"] == 1}
    for r in rows:
        key = key_of(r)
        hf = r.get("transformers_ms_per_step")
        ratio = f"{hf / r['ms_per_step']:.2f}x" if hf else "-"
        rel = f"{r['ms_per_step'] / one[key]:.2f}x" if key in one else "-"
        vs_lc = f"{lc[r['batch']] / r['ms_per_step']:.2f}x" if r["batch"] in lc and key[0] != "llama.cpp" else "-"
        outside = f"{100 * r['outside_matmul']:.0f}%" if "outside_matmul" in r else "-"
        lines.append(f"| {key[0]} | {key[1]} | {isa_of(r)} | {r['batch']} | {r['ms_per_step']:.1f} | {rel} | {vs_lc} | "
                     f"{f'{hf:.1f}' if hf else '-'} | {ratio} | {outside} |")
    copy = d.get("copy_gbps_before_after")
    bw = (f" Copy bandwidth at the start / end of this run: {copy[0]:.1f} / {copy[1]:.1f} GB/s (it moves with the "
          "VM's neighbours, and decode with it)." if copy and copy[0] else "")
    rounds = f"fastest of {d['rounds']} interleaved rounds" if d.get("rounds") else "one run"
    anchor = (" llama.cpp: one `llama_decode` of B tokens, one per parallel sequence, plus the argmaxes."
              if lc else " The CPU anchor, llama.cpp on the same GGUF (Q4_1 weights, 2 threads, measured when the C++ "
              "issue was filed): ~9.2 ms/token at batch 1, ~45 ms per batch-8 step.")
    lines += ["", f"A shared 2-core VM, {rounds}: repeated runs of a row differ by up to ~25%.{bw}{anchor}"]
    return "\n".join(lines)


def sot_table(path: Path) -> str:
    d = json.loads(path.read_text())
    env, cfg = d["env"], d["config"]
    # the run's non-default storage switches (bf16 matmul precision implies bf16 weights)
    switches = [("--weights", d.get("weights")), ("--matmul-precision", d.get("matmul_precision")),
                ("--kv-cache-dtype", d.get("kv_cache_dtype"))]
    narrow = [(k, v.replace("bfloat16", "bf16")) for k, v in switches if v and v not in ("fp32", "float32")
              and not (k == "--weights" and d.get("matmul_precision") == "bf16")]
    head = (f"End-to-end SoT ({d['mode']} mode, {d['expansion']} expansion) vs normal decoding on {d['dataset']}, "
            f"{d['model']} {d['dtype'].replace('torch.', '')}"
            + "".join(f", {k.lstrip('-')} {v}" for k, v in narrow)
            + f", {machine(env)}, {env['threads']} threads, "
            f"{env['date']}; greedy, "
            + ("each answer timed warm, right after an SoT answer to an unrelated question (the templates' prefix "
               "cached, as in a running server), " if d.get("warm") else "")
            + f"normal capped at {cfg['normal_max_tokens']} tokens, points at "
            f"{cfg['point_max_tokens']} (`sot bench --dataset {d['dataset']} "
            f"--normal-max-tokens {cfg['normal_max_tokens']}"
            + (f" --expansion {d['expansion']}" if d["expansion"] != "paper" else "")
            + (f" --categories {' '.join(d['categories'])}" if d.get("categories") else "")
            + "".join(f" {k} {v}" for k, v in narrow) + (" --warm" if d.get("warm") else "") + "`):")
    return head + "\n\n" + d["table"]


def _sot_run(path: Path) -> dict:
    """A `sot bench` run: its record, and a summary recomputed from its per-question lines (older runs did not
    record fallbacks, points per skeleton and empty points)."""
    from sot_engine.sot.bench import summarize
    from sot_engine.sot.grammar import first_sentence_end
    d = json.loads(path.read_text())
    rows = [json.loads(line) for line in path.with_suffix(".jsonl").read_text().splitlines() if line.strip()]
    for r in rows:  # the oldest runs: an empty point is a labelled line with nothing after its "i. point:"
        r.setdefault("empty_points", sum(bool(re.fullmatch(r"\d+\. [^\n]*:", line))
                                         for line in r["sot_answer"].split("\n")) if r["mode"] == "sot" else 0)
    d["summary"] = summarize(rows)
    texts = [t for r in rows if r["mode"] == "sot" for t in point_texts(r)]
    d["points_with_sentence"] = sum(first_sentence_end(" " + t, 4) is not None for t in texts) / max(1, len(texts))
    return d


def point_texts(row: dict) -> list[str]:
    """A SoT answer's expansions, read off its "i. point: text" lines."""
    lines = row["sot_answer"].split("\n")
    out = []
    for i, p in enumerate(row["points"], start=1):
        label = f"{i}. {p['point']}:"
        line = next((x for x in lines if x.startswith(label)), label)
        out.append(line[len(label):].strip())
    return out


def sot_comparison_table(paths: list[Path]) -> str:
    """One row per `sot bench` run on the whole set: how often SoT ran where it should, and what it gave."""
    lines = ["SoT end to end on all of Vicuna-80, auto mode, paper expansion, greedy, normal decoding capped at 256 "
             "tokens, points at 128 (`sot bench --dataset vicuna80 --normal-max-tokens 256`, + the run's switches): "
             "every run, on its machine. *Fell back*: SoT was tried (the router sent the question to it) but the "
             "skeleton had too few usable points, so the question paid the skeleton and then decoded normally. "
             "*Points opening with a whole sentence*: expansions whose text starts with a complete sentence of 4+ "
             "words (the rest are empty, cut mid-clause like \"The answer to this question is\", or a fragment). "
             "*Speed-up*: mean normal latency / mean SoT latency. *Prefix cache*: none, each answer alone (as the "
             "paper measures), or warm (`--warm`: each answer right after an SoT answer to an unrelated question, "
             "the templates' prefix cached, as in a running server).", "",
             "| date | machine | model | precision | prefix cache | router | skeleton, points | SoT ran: SoT-suited | all 80 | fell back (SoT-suited) "
             "| points per skeleton | empty points | points opening with a whole sentence | speed-up SoT-suited "
             "| where SoT ran | all | tokens SoT-suited: normal / SoT |",
             "|---|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for path in paths:
        d = _sot_run(path)
        cfg, sm = d["config"], d["summary"]
        suited, allq = sm.get("SoT-suited"), sm["all"]
        ran = sm.get("where SoT ran", allq)
        prec = "bf16 matmul + bf16 KV" if d.get("matmul_precision") == "bf16" else \
            {"gguf": "the file's Q4_1 / Q8_0 (gguf)", "int8": "int8 weights", "bf16": "bf16 weights"}.get(
                d.get("weights") or "", "int8 matmul" if d.get("matmul_precision") == "int8" else "fp32")
        grammar = cfg.get("constrained_skeleton", False)
        hold, cap = cfg.get("point_min_words", 0), cfg.get("point_max_sentences", 0)
        sk = ("grammar" if grammar else "free") + (f", {hold}-word first sentence held" if hold else ", free") \
            + (f", at most {cap} sentences" if cap else "")
        router = d.get("router") or "rules"  # runs before the trained router had the rules
        model = d.get("model", "SmolLM2 135M").replace("Smollm2 135M 8k Lc100K Mix1 Ep2", "SmolLM2 135M")
        cache = "warm" if d.get("warm") else "none"
        lines.append(f"| {d['env']['date']} | {machine(d['env'])} | {model} | {prec} | {cache} | {router} | {sk} "
                     f"| {suited['sot_used']}/{suited['n']} | {allq['sot_used']}/{allq['n']} | {suited['fallbacks']} | {allq['points_per_skeleton']:.1f} | {allq['empty_points']} "
                     f"| {100 * d['points_with_sentence']:.0f}% "
                     f"| {suited['speedup']:.2f}x | {ran['speedup']:.2f}x | {allq['speedup']:.2f}x "
                     f"| {suited['normal_tokens']:.0f} / {suited['sot_tokens']:.0f} |")
    return "\n".join(lines)


def router_table(path: Path) -> str:
    d = json.loads(path.read_text())
    env = d["env"]
    rows = []
    for name, c in d["candidates"].items():
        v, w, ch = c["vicuna"], c["wizardlm"], c.get("chosen") or {}
        how = "-" if not ch else (f"l2 {ch['l2']:g}, {'balanced' if ch['balanced'] else 'LIMA prior'}, "
                                  f"veto {'on' if ch['veto'] else 'off'}; CV bal. acc. "
                                  f"{100 * ch['cv_balanced_accuracy']:.1f}%")
        rows.append(f"| {name} | {100 * v['accuracy']:.1f}% | {100 * v['precision_sot']:.1f}% | "
                    f"{100 * v['recall_sot']:.1f}% | {100 * w['accuracy']:.1f}% | {100 * w['precision_sot']:.1f}% | "
                    f"{100 * w['recall_sot']:.1f}% | {c['ms_per_question']['median']:.2f} | {how} |")
    return (f"Router candidates against the SoT authors' labels (`python -m benchmarks.router_agreement`, "
            f"{env.get('cpu', '')}, {env['date']}): every classifier trained on the LIMA labels alone, its "
            "hyperparameters chosen by cross-validated balanced accuracy on LIMA; Vicuna-80 (80, 46% suit SoT) and "
            "WizardLM (218, 27%) only evaluated. ms: routing one question on the CPU, median over Vicuna-80.\n\n"
            "| router | Vicuna agreement | precision (SoT) | recall (SoT) | WizardLM agreement | precision (SoT) "
            "| recall (SoT) | ms/question | chosen by LIMA CV |\n|---|---:|---:|---:|---:|---:|---:|---:|---|\n"
            + "\n".join(rows))


def _env_line(env: dict) -> str:
    soft = f"torch {env['torch']}" + (f", triton {env['triton']}" if env.get("triton") else "")
    n = env["threads"]
    threads = f", {n} thread{'s' * (n != 1)}" if env["device_type"] == "cpu" else ""
    return f"{machine(env)}{threads}, {soft}, {env['date']}"


def _f(x, fmt: str, suffix: str = "") -> str:
    return "-" if x is None else f"{x:{fmt}}{suffix}"


def latency_table(paths: list[Path]) -> str:
    """One device's `benchmarks.latency` results: a row per model and batch, then cascade on/off per model."""
    ds = [json.loads(p.read_text()) for p in paths]
    d0 = ds[0]
    lines = [f"Prefill and decode latency vs batch (the paper's Table 1 / Fig. 3) on {_env_line(d0['env'])}; random "
             f"weights, prefill {d0['prefill']} tokens then {d0['decode']} decode steps; measured copy bandwidth "
             f"{d0['copy']['gbps']:.0f} GB/s; roofline = (weights + K/V read) / copy bandwidth "
             "(`python -m benchmarks.latency`):", "",
             "| model | B | prefill ms | prefill TFLOPS | ms/token | decode ms (all steps) | decode TFLOPS "
             "| weight GB/s (of copy) | x roofline | peak GiB |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for d in ds:
        model = f"{d['model'].removeprefix('random:')} {d['dtype']}"
        for r in d["batches"]:
            lines.append(f"| {model} | {r['batch']} | {r['prefill_ms']:.1f} | {r['prefill_tflops']:.1f} | "
                         f"{r['decode_ms_per_step']:.2f} | {r['decode_total_ms']:.0f} | {r['decode_tflops']:.2f} | "
                         f"{r['weight_gbps']:.0f} ({_f(r.get('weight_frac_copy'), '.0%')}) | "
                         f"{_f(r.get('vs_roofline'), '.2f')} | {_f(r.get('peak_mem_gib'), '.1f')} |")
    for d in ds:
        pairs = [p for p in d.get("sot_pairs", []) if p.get("off_ms")]
        if pairs:
            lines.append("")
            lines.append(f"SoT batch on {d['model'].removeprefix('random:')} ({d['sot_prefix']}-token shared prefix, "
                         f"{d['sot_suffix']}-token tails), decode ms/step cascade off -> on: " + "; ".join(
                             f"{p['members']} points {p['off_ms']:.2f} -> {_f(p.get('on_ms'), '.2f')}"
                             + (f" ({p['speedup']:.2f}x)" if p.get("speedup") else f" ({p.get('note') or 'n/a'})")
                             for p in pairs))
    return "\n".join(lines)


def sot_e2e_table(path: Path) -> str:
    """One `benchmarks.sot_e2e` result: per category, ours and the paper's method, with the real run's numbers."""
    from benchmarks.sot_e2e import compare_table, replay_table
    d = json.loads(path.read_text())
    sel, model = d["selection"], d["model"].removeprefix("random:")
    if "validate" in sel:  # a real run and its replay, question by question
        cmd = f"python -m benchmarks.sot_e2e validate --per-category {sel['validate']} --threads {d['env']['threads']}"
        head = (f"Replay validated against a real run: {d['records_model']} on Vicuna-80 (first "
                f"{sel['validate']} per category, `{d['records']}`), each question replayed right after on "
                f"{model} {d['dtype']} random weights with the recorded lengths, {_env_line(d['env'])} (`{cmd}`):")
    else:
        what = (f"first {sel['per_category']} per category" if sel.get("per_category") else "all questions") + \
            (f", at most {sel['limit']}" if sel.get("limit") else "")
        cmd = f"python -m benchmarks.sot_e2e replay --model {model} --records {d['records']}" + \
            (f" --per-category {sel['per_category']}" if sel.get("per_category") else "") + \
            (f" --limit {sel['limit']}" if sel.get("limit") else "")
        head = (f"SoT vs normal decoding with the lengths of `{d['records']}` ({d['records_model']}; {what}) replayed "
                f"on {model} {d['dtype']} random weights, {_env_line(d['env'])} (`{cmd}`):")
    lines = [head, ""]
    if d.get("compare_cpu"):  # CPU seconds: steady on a shared machine, where wall time is not
        lines += [compare_table(d["compare_cpu"], "CPU s"), ""]
    elif d.get("compare"):
        lines += [compare_table(d["compare"]), ""]
    for name, s in d["systems"].items():
        if not d.get("compare") and s.get("cpu_summary"):  # CPU seconds: steady on a shared machine
            lines += [replay_table(s["cpu_summary"], s["recorded_cpu_summary"], "CPU s"), ""]
        elif not d.get("compare"):
            lines += [replay_table(s["summary"], s.get("recorded_summary") or {}), ""]
        v = s["validation"]
        rec = ""
        if "latency_ratio_sot" in v and "validate" in sel:  # elsewhere other shapes, devices, threads: no ratio
            rec = (f"; replay / recorded run: wall time x{v['latency_ratio_normal']:.2f} normal, "
                   f"x{v['latency_ratio_sot']:.2f} SoT (per-question median x{v['latency_ratio_normal_median']:.2f}, "
                   f"x{v['latency_ratio_sot_median']:.2f})")
            if "cpu_ratio_sot" in v:
                rec += f", CPU time x{v['cpu_ratio_normal']:.2f} normal, x{v['cpu_ratio_sot']:.2f} SoT"
        cnt = f", engine counters equal {v['counters_equal']}" if "counters_equal" in v else ""
        done = "" if s["complete"] else " (time budget ran out: partial)"
        lines.append(f"{name} ({s['label']}): {v['n']} questions{done}, forced lengths "
                     f"{'all met' if v['tokens_ok'] else 'NOT met'}{cnt}{rec}.")
    return "\n".join(lines)


def server_load_table(path: Path) -> str:
    d = json.loads(path.read_text())
    lat, ttft = d["latency_s"], d["ttft_s"]
    return (f"Server load: {d['requests']} concurrent streaming chat requests of {d['max_tokens']} tokens over loopback, "
            f"{d['model']}, {_env_line(d['env'])} (`python -m benchmarks.server_load`): "
            f"{len(d['errors'])} errors, {d['leaked_blocks']} leaked blocks, up to {d['max_decode_batch']} sequences "
            f"per decode step, {d['tokens_per_s']:.0f} tokens/s, {d['cached_prompt_tokens']} of "
            f"{d['prompt_tokens']} prompt tokens from the prefix cache.\n\n"
            "| seconds | p50 | p90 | p99 | max |\n|---|---:|---:|---:|---:|\n"
            + "\n".join(f"| {name} | {v['p50']:.2f} | {v['p90']:.2f} | {v['p99']:.2f} | {v['max']:.2f} |"
                        for name, v in (("time to first token", ttft), ("request latency", lat))))


def tensor_parallel_table(path: Path) -> str:
    d = json.loads(path.read_text())
    rows = "\n".join(f"| {r['tp']} | {r.get('lm_head', 'whole')} | {r['batch']} | {r['ms_per_step']:.1f} | {r['all_reduce_ms']:.1f} "
                     f"({r['all_reduce_share']:.0%}) | {r['logits_ms']:.1f} ({r['logits_share']:.0%}) |"
                     for r in d["rows"])
    return (f"Tensor parallelism: decode steps of {d['model']} after a {d['prompt']}-token prompt, median of "
            f"{d['steps']}, {_env_line(d['env'])} (`python -m benchmarks.tensor_parallel`; on a CPU the ranks share "
            f"its {d['cores']} cores, and TP=1 keeps the fused one-call decode loop). All-reduce: the driver's time "
            "in them, waiting for the slower rank included.\n\n"
            "| TP | lm_head | batch | ms / step | all-reduce ms (share) | logits ms (share) |\n"
            "|---:|---|---:|---:|---:|---:|\n"
            + rows)


def startup_table(path: Path) -> str:
    """`benchmarks.startup`: each labelled run of `sot ask` to its first skeleton token, then the phases."""
    d = json.loads(path.read_text())
    lines = [f"Start-up of `sot ask` on the embedded SmolLM2, warm page cache, fastest (median) of {d['rounds']} runs "
             "(`python -m benchmarks.startup`): seconds from the command's start to its route line (imports and model "
             "load done) and to the first skeleton token.", "",
             "| run | command | commit | machine | route s | first skeleton token s |", "|---|---|---|---|---:|---:|"]
    for label, r in d["runs"].items():
        e, m = r["end_to_end_s"], r.get("end_to_end_median_s", r["end_to_end_s"])
        env = r.get("env", d["env"])
        cmd = r["command"].replace(sys.executable, "python")
        lines.append(f"| {label} | `{cmd} ask` | {r.get('commit') or '-'} | {env['device']}, {env['date']} | {e['route']:.2f} ({m['route']:.2f}) "
                     f"| {e['first_skeleton_token']:.2f} ({m['first_skeleton_token']:.2f}) |")
    phases = next((r["phases_s"] for r in reversed(d["runs"].values()) if "phases_s" in r), None)
    if phases:
        parts = phases.get("model_load_parts", {})
        rest = phases["model_load"] - sum(parts.values())
        load = ", ".join(f"{k.replace('_', ' ')} {v:.2f}" for k, v in parts.items()) + f", the rest {rest:.2f}"
        lines += ["", f"Where the latest run's time goes (s, fastest per phase): interpreter {phases['spawn_to_python']:.2f}, "
                  f"`import torch` {phases['import_torch']:.2f}, other imports {phases['import_rest']:.2f}, C++ "
                  f"extension {phases['extension']:.3f}, model load {phases['model_load']:.2f} ({load}), first skeleton "
                  f"token (skeleton prompt prefill + one decode step) {phases['first_skeleton_token']:.2f}."]
    return "\n".join(lines)


def guided_cpu_table(path: Path) -> str:
    """`benchmarks.guided_cpu`: what the grammar and the logits processors cost a decode step."""
    d = json.loads(path.read_text())
    lines = [f"Constrained decoding's cost per decode step, {d['model']}, {d['backend']} backend, {_env_line(d['env'])}, "
             f"fastest of {d['rounds']} (`python -m benchmarks.guided_cpu`): the steps while a row is still "
             "constrained; mask = llguidance's token mask and applying it, a mean per step (guided rows are sampled "
             "first and masked only when the grammar rejects the token: the masked steps column), processors = "
             "SoT's logits processors (mean per step); step times are medians.", "",
             "| case | rows | constrained | steps | masked steps | step ms | unconstrained step ms | mask ms "
             "| processors ms | share of the step |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    rows = {"skeleton": 1, "points": 8, "json in 8": 8}
    for name, c in d["cases"].items():
        lines.append(f"| {name} | {rows.get(name, '-')} | {c['constrained_rows']} | {c['steps']} "
                     f"| {c.get('masked_steps', '-')} | {c['step_ms']:.2f} "
                     f"| {c['unconstrained_step_ms']:.2f} | {c['mask_ms']:.3f} | {c['processors_ms']:.3f} "
                     f"| {100 * c['share']:.1f}% |")
    return "\n".join(lines)


def attention_cpu_table(path: Path) -> str:
    """`benchmarks.attention_cpu`: decode steps against context length, the C++ attention in parts or per task."""
    d = json.loads(path.read_text())
    lines = [f"CPU decode against context length, {d['model']} ({d['weights']} weights), {_env_line(d['env'])}, fastest "
             f"of {d['rounds']} (`python -m benchmarks.attention_cpu`): B sequences sharing a prompt of `context` "
             "tokens (a fork, as SoT's points); each step alternates between the attention in parts (a shared prefix "
             "of 256+ tokens once for its group, long contexts in chunks) and one task a (sequence, KV head) "
             "(`SOT_NO_ATTN_PARTS=1`); attention = the fused loop's RoPE + store + attention phases. Medians, ms.", "",
             "| batch | context | step, parts | step, tasks | attention, parts | attention, tasks |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in d["rows"]:
        lines.append(f"| {r['batch']} | {r['context']} | {r['ms_per_step_parts']:.2f} | {r['ms_per_step_tasks']:.2f} "
                     f"| {r['attention_ms_parts']:.2f} | {r['attention_ms_tasks']:.2f} |")
    return "\n".join(lines)


def _latest(pattern: str, device: str) -> list[Path]:
    return sorted(p for p in (common.RESULTS / device).glob(pattern) if not p.stem.endswith("_quick"))


def render() -> str:
    parts = []
    runs = [p for p in (common.RESULTS / "cpu").glob("sot_vicuna80_auto_paper*.json")
            if json.loads(p.read_text()).get("limit") is None and not json.loads(p.read_text()).get("categories")]
    runs.sort(key=lambda p: (json.loads(p.read_text())["env"]["date"], p.stem))
    if runs:
        parts.append(sot_comparison_table(runs))
    # the per-category tables of the newest runs with the grammar (the default fp32, Gemma, gguf on each machine kind,
    # gguf warm; and the continuation run)
    latest = [p for p in runs if json.loads(p.read_text())["config"].get("constrained_skeleton")]
    parts += [sot_table(p) for p in latest[-5:]]
    parts += [sot_table(p) for p in sorted((common.RESULTS / "cpu").glob("sot_vicuna80_auto_continuation*.json"))]
    if (common.RESULTS / "router_agreement.json").exists():
        parts.append(router_table(common.RESULTS / "router_agreement.json"))
    # the main machine's table, then an AVX2-only machine's (what CI's other CPU kind runs)
    for p in (common.RESULTS / "cpu" / "decode_cpu.json", common.RESULTS / "cpu" / "decode_cpu_avx2_zen3.json"):
        if p.exists():
            parts.append(decode_cpu_table(p))
    p = common.RESULTS / "cpu" / "attention_cpu.json"
    if p.exists():
        parts.append(attention_cpu_table(p))
    for device in ("cuda", "cpu"):
        paths = _latest("latency_*.json", device)
        if paths:
            parts.append(latency_table(paths))
        parts += [sot_e2e_table(p) for p in _latest("sot_e2e_*.json", device)]
        parts += [server_load_table(p) for p in _latest("server_load.json", device)]
        parts += [startup_table(p) for p in _latest("startup.json", device)]
        parts += [guided_cpu_table(p) for p in _latest("guided_cpu.json", device)]
        parts += [tensor_parallel_table(p) for p in _latest("tensor_parallel.json", device)]
    return "\n\n".join(parts) or "(no results yet)"


def main() -> None:
    table = render()
    print(table)
    text = README.read_text()
    new = re.sub(r"<!-- bench:start -->.*<!-- bench:end -->",
                 lambda _: f"<!-- bench:start -->\n{table}\n<!-- bench:end -->", text, flags=re.S)
    README.write_text(new)


if __name__ == "__main__":
    main()
