"""Render the latest results in benchmarks/results/ as Markdown and put them into README.md
between the `<!-- bench:start -->` / `<!-- bench:end -->` markers.

    python -m benchmarks.report            # print and update README.md
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from benchmarks.common import RESULTS

README = Path(__file__).resolve().parents[1] / "README.md"


def decode_cpu_table(path: Path) -> str:
    d = json.loads(path.read_text())
    env = d["env"]
    lines = [f"CPU decode, {d['model']}, fp32 activations, {env['device']}, {env['threads']} threads, "
             f"torch {env['torch']}, {env['date']} (`python -m benchmarks.decode_cpu`); weights: storage of the "
             "matrices (bf16; int8 with a scale per 32 weights); outside matmuls: the step's time not in weight "
             "matmuls (attention, norms, Python, sampling):", "",
             "| backend | weights | batch | ours ms/step | vs batch 1 | transformers ms/step | ours vs transformers "
             "| outside matmuls |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    one = {(r.get("backend", "torch"), r.get("weights", "fp32")): r["ms_per_step"] for r in d["rows"] if r["batch"] == 1}
    for r in d["rows"]:
        key = (r.get("backend", "torch"), r.get("weights", "fp32"))
        hf = r.get("transformers_ms_per_step")
        ratio = f"{hf / r['ms_per_step']:.2f}x" if hf else "-"
        rel = f"{r['ms_per_step'] / one[key]:.2f}x" if key in one else "-"
        outside = f"{100 * r['outside_matmul']:.0f}%" if "outside_matmul" in r else "-"
        lines.append(f"| {key[0]} | {key[1]} | {r['batch']} | {r['ms_per_step']:.1f} | {rel} | "
                     f"{f'{hf:.1f}' if hf else '-'} | {ratio} | {outside} |")
    return "\n".join(lines)


def sot_table(path: Path) -> str:
    d = json.loads(path.read_text())
    env, cfg = d["env"], d["config"]
    head = (f"End-to-end SoT ({d['mode']} mode, {d['expansion']} expansion) vs normal decoding on {d['dataset']}, "
            f"{d['model']} {d['dtype'].replace('torch.', '')}, {env['device']}, {env['threads']} threads, "
            f"{env['date']}; greedy, normal capped at {cfg['normal_max_tokens']} tokens, points at "
            f"{cfg['point_max_tokens']} (`python -m sot bench --dataset {d['dataset']} "
            f"--normal-max-tokens {cfg['normal_max_tokens']}"
            + (f" --expansion {d['expansion']}" if d["expansion"] != "paper" else "")
            + (f" --categories {' '.join(d['categories'])}" if d.get("categories") else "") + "`):")
    return head + "\n\n" + d["table"]


def router_table(path: Path) -> str:
    d = json.loads(path.read_text())["datasets"]
    rows = [f"| {name} | {v['n']} | {100 * v['accuracy']:.1f}% | {100 * v['precision_sot']:.1f}% | "
            f"{100 * v['recall_sot']:.1f}% |" for name, v in d.items()]
    return ("Router agreement with the SoT authors' labels (`python -m benchmarks.router_agreement`; rules not "
            "tuned to them):\n\n| set | n | agreement | precision (SoT) | recall (SoT) |\n|---|---:|---:|---:|---:|\n"
            + "\n".join(rows))


def render() -> str:
    parts = []
    for p in sorted((RESULTS / "cpu").glob("sot_vicuna80_*.json"), key=lambda p: "paper" not in p.name):
        parts.append(sot_table(p))
    if (RESULTS / "router_agreement.json").exists():
        parts.append(router_table(RESULTS / "router_agreement.json"))
    p = RESULTS / "cpu" / "decode_cpu.json"
    if p.exists():
        parts.append(decode_cpu_table(p))
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
