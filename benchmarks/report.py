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
    lines = [f"CPU decode, {d['model']} fp32, {env['device']}, {env['threads']} threads, torch {env['torch']}, "
             f"{env['date']} (`python -m benchmarks.decode_cpu`):", "",
             "| backend | batch | ours ms/step | transformers ms/step | ours vs transformers | Python overhead "
             "| matmul share |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in d["rows"]:
        hf = r.get("transformers_ms_per_step")
        ratio = f"{hf / r['ms_per_step']:.2f}x" if hf else "-"
        lines.append(f"| {r.get('backend', 'torch')} | {r['batch']} | {r['ms_per_step']:.1f} | "
                     f"{f'{hf:.1f}' if hf else '-'} | {ratio} | {100 * r['python_overhead']:.0f}% "
                     f"| {100 * r['matmul_share']:.0f}% |")
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
