"""What every benchmark records beside its numbers: the machine, the software, the date."""
from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

import torch

# SOT_BENCH_RESULTS redirects output (the smoke tests write to a temporary folder)
RESULTS = Path(os.environ.get("SOT_BENCH_RESULTS", Path(__file__).resolve().parent / "results"))


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown cpu"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def environment(device: torch.device) -> dict:
    return {
        "device": device_name(device),
        "device_type": device.type,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
    }


def write_result(name: str, device: torch.device, payload: dict) -> Path:
    """benchmarks/results/<device type>/<name>.json"""
    out = RESULTS / device.type / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"env": environment(device), **payload}, indent=2) + "\n")
    return out
