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
             "| batch | ours ms/step | transformers ms/step | ours vs transformers | Python overhead | matmul share |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in d["rows"]:
        hf = r.get("transformers_ms_per_step")
        ratio = f"{hf / r['ms_per_step']:.2f}x" if hf else "-"
        lines.append(f"| {r['batch']} | {r['ms_per_step']:.1f} | {hf:.1f} | {ratio} | {100 * r['python_overhead']:.0f}% "
                     f"| {100 * r['matmul_share']:.0f}% |" if hf else
                     f"| {r['batch']} | {r['ms_per_step']:.1f} | - | - | {100 * r['python_overhead']:.0f}% "
                     f"| {100 * r['matmul_share']:.0f}% |")
    return "\n".join(lines)


def render() -> str:
    parts = []
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
