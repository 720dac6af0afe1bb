"""What every benchmark shares: the record beside its numbers (machine, software, date), where results go,
how a device is timed (median ms, the measured copy bandwidth as the roof) and how a plot is drawn."""
from __future__ import annotations

import json
import os
import signal
import statistics
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch

from sot_engine.environment import cpu_name, device_name, environment  # noqa: F401 (re-exported)

# SOT_BENCH_RESULTS redirects output (the smoke tests write to a temporary folder)
RESULTS = Path(os.environ.get("SOT_BENCH_RESULTS", Path(__file__).resolve().parent / "results"))


def result_path(name: str, device: torch.device, suffix: str = ".json") -> Path:
    """benchmarks/results/<device type>/<name><suffix>"""
    return RESULTS / device.type / f"{name}{suffix}"


def write_result(name: str, device: torch.device, payload: dict) -> Path:
    """benchmarks/results/<device type>/<name>.json"""
    out = result_path(name, device)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"env": environment(device), **payload}, indent=2) + "\n")
    return out


# ---------------------------------------------------------------- timing

def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so a host clock measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gbps(nbytes: float, ms: float | None) -> float | None:
    return None if not ms else nbytes / (ms * 1e-3) / 1e9


def bench_ms(fn: Callable[[], object], device: torch.device, reps: int = 3) -> float:
    """Median milliseconds of fn(): do_bench on CUDA (L2 flushed between runs), perf_counter elsewhere."""
    if device.type == "cuda":
        from triton.testing import do_bench
        try:
            return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
        except TypeError:  # an older do_bench without return_mode
            return float(do_bench(fn, warmup=25, rep=100, quantiles=[0.5]))
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def copy_bandwidth(device: torch.device, nbytes: int) -> dict:
    """GB/s of dst.copy_(src) over `nbytes` (counted as bytes read + bytes written): the practical roof that
    memory-bound numbers are compared with, measured in the same run rather than taken from a datasheet."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), device)
    return {"bytes": nbytes, "ms": ms, "gbps": gbps(2 * nbytes, ms)}


@contextmanager
def sigterm_as_interrupt(active: bool = True) -> Iterator[None]:
    """`timeout` ends a stage of benchmarks/gpu_check.sh with SIGTERM: raised as KeyboardInterrupt inside this
    block, so the benchmark can save what it has measured before it goes."""
    if not active:
        yield
        return

    def on_term(signum, frame):
        raise KeyboardInterrupt
    old = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


# ---------------------------------------------------------------- output

def _cell(value, fmt: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return format(value, fmt) if fmt else str(value)


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Fixed-width text table; columns are (header, key, format spec); a missing value prints as '-'."""
    cells = [[_cell(r.get(key), fmt) for _, key, fmt in columns] for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, (h, _, _) in enumerate(columns)]
    line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths)).rstrip()  # noqa: E731
    return "\n".join([line([h for h, _, _ in columns]), line(["-" * w for w in widths])] + [line(c) for c in cells])


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display), or None where matplotlib is missing:
    a benchmark still writes its JSON without it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(plt, fig, title: str, path: Path, dpi: int = 100) -> Path:
    """Title, tight layout, PNG, closed: the last lines of every benchmark's plot."""
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
