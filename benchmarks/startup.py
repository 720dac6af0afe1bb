"""How long `sot ask` takes to start: from the command's start to its first skeleton token, and where that goes.

    python -m benchmarks.startup                  # writes benchmarks/results/cpu/startup.json
    python -m benchmarks.startup --quick          # one round, to startup_quick.json (a smoke run)
    python -m benchmarks.startup --label before --cwd ../old-checkout --cmd "python -m sot"   # end to end only

Each number is the fastest of --rounds runs after an untimed one (a warm page cache, as a user's second command
meets it):
- end to end: `sot ask QUESTION` as a subprocess, stdout piped (the plain view). The clock starts just before the
  spawn; "route" is the first line (imports and model load done), "first skeleton token" the first token after the
  skeleton prefill `1.` reaches the pipe. Then the process is ended.
- phases, in a probe process that runs the ask path step by step: interpreter start (spawn to the probe's first
  line), `import torch`, the other imports `sot ask` makes, the C++ extension, `LLM("default")` (split into GGUF
  open, dequantization, tokenizer, copy into the huge-page arena, the rest) and the first skeleton token
  (SoT set-up, skeleton prompt prefill, one decode step).
"""
from __future__ import annotations

import argparse
import json
import os
import select
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import environment, result_path, write_result

QUESTION = "How can I improve my time management skills?"

PROBE = r'''
import json, sys, time
t = {"spawn_to_python": time.time() - float(sys.argv[1])}
def lap(name, t0):
    t[name] = time.perf_counter() - t0
    return time.perf_counter()
t0 = time.perf_counter()
import torch
t0 = lap("import_torch", t0)
import sot_engine.sot.cli, sot_engine.sot.driver, sot_engine.sot.view
t0 = lap("import_rest", t0)
from sot_engine.kernels import get_backend
get_backend(None, "cpu")
t0 = lap("extension", t0)
import gguf.quants
import sot_engine.engine.llm_engine as le, sot_engine.engine.loader.gguf as lg, sot_engine.engine.model as lm
from sot_engine.engine.tokenizer import Tokenizer
inner = {}
def timed(owner, attr, label):
    fn = getattr(owner, attr)
    def wrapper(*a, **kw):
        s = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            inner[label] = inner.get(label, 0.0) + time.perf_counter() - s
    setattr(owner, attr, wrapper)
timed(lg, "open_gguf", "gguf_open")
timed(lg, "dequantize", "dequantize")
timed(Tokenizer, "from_gguf", "tokenizer")
timed(lm, "into_hugepages", "hugepage_copy")
from sot_engine import LLM, SoT
llm = LLM("default")
t0 = lap("model_load", t0)
t["model_load_parts"] = inner
sot = SoT(llm)
for ev in sot.stream(sys.argv[2], mode="sot"):
    if ev.kind == "skeleton":
        break
t0 = lap("first_skeleton_token", t0)
print(json.dumps(t))
'''


def end_to_end(cmd: list[str], cwd: Path | None, timeout: float = 300) -> dict:
    """Seconds from the spawn of `cmd ask QUESTION` to its route line and to its first skeleton token."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([*cmd, "ask", QUESTION, "--mode", "sot"], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    out, marks = b"", {}
    try:
        while "first_skeleton_token" not in marks:
            if time.perf_counter() - t0 > timeout or proc.poll() is not None and not select.select(
                    [proc.stdout], [], [], 0)[0]:
                raise RuntimeError(f"no skeleton token from {cmd}: {out.decode(errors='replace')[-500:]}")
            if not select.select([proc.stdout], [], [], 0.5)[0]:
                continue
            out += os.read(proc.stdout.fileno(), 65536)
            now = time.perf_counter() - t0
            if b"route:" in out:
                marks.setdefault("route", now)
            head = out.find(b"skeleton:\n1.")
            if head >= 0 and len(out) > head + len(b"skeleton:\n1."):
                marks["first_skeleton_token"] = now
    finally:
        proc.kill()
        proc.wait()
    return marks


def phases(timeout: float = 300) -> dict:
    r = subprocess.run([sys.executable, "-c", PROBE, repr(time.time()), QUESTION], capture_output=True, text=True,
                       timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-2000:])
    return json.loads(r.stdout.splitlines()[-1])


def fastest(runs: list[dict], pick=min) -> dict:
    """Per key, the smallest value over the runs (nested dicts key by key); `pick=statistics.median` for the
    median."""
    out = {}
    for k, v in runs[0].items():
        out[k] = fastest([r[k] for r in runs], pick) if isinstance(v, dict) else pick([r[k] for r in runs])
    return out


def commit(cwd: Path | None) -> str | None:
    """The checkout's commit, "+" when its tracked files have changes (None outside git)."""
    git = ["git", "-C", str(cwd or Path(__file__).resolve().parent)]
    try:
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run([*git, "diff", "--quiet", "HEAD"]).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("+" if dirty else "")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="one round, written to startup_quick.json")
    ap.add_argument("--cmd", default=f"{sys.executable} -m sot_engine", help="the command whose `ask` is timed")
    ap.add_argument("--cwd", type=Path, default=None, help="run it here (another checkout)")
    ap.add_argument("--label", default="after", help="the entry in the result file this run fills")
    args = ap.parse_args(argv)
    rounds = 1 if args.quick else args.rounds
    cmd = shlex.split(args.cmd)
    end_to_end(cmd, args.cwd)  # untimed: the page cache warm
    runs = [end_to_end(cmd, args.cwd) for _ in range(rounds)]
    entry: dict = {"command": args.cmd, "commit": commit(args.cwd), "end_to_end_s": fastest(runs),
                   "end_to_end_median_s": fastest(runs, statistics.median)}
    if args.cwd is None:  # the probe runs this checkout's package
        phases()
        entry["phases_s"] = fastest([phases() for _ in range(rounds)])
    print(json.dumps(entry, indent=2))
    device = torch.device("cpu")
    entry["env"] = environment(device)
    name = "startup_quick" if args.quick else "startup"  # quick: a file of its own, never in the README
    path = result_path(name, device)
    old = json.loads(path.read_text()).get("runs", {}) if path.exists() and not args.quick else {}
    old[args.label] = entry
    out = write_result(name, device, {"question": QUESTION, "rounds": rounds, "runs": old})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
