"""The machine and software a result was measured on, recorded beside every number we write (`sot bench`
and the repository's benchmarks)."""
from __future__ import annotations

import datetime
import importlib.metadata
import platform

import torch


def _cpuinfo(field: str, path: str = "/proc/cpuinfo") -> str | None:
    """The first `field` line's value in /proc/cpuinfo (None: no such line, or no such file)."""
    try:
        with open(path) as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith(field)), None)
    except OSError:
        return None


def cpu_name() -> str:
    return _cpuinfo("model name") or platform.processor() or "unknown cpu"


def cpu_isa(cpuinfo: str = "/proc/cpuinfo") -> str | None:
    """The widest vector instructions the CPU has, as the kernels dispatch on them (two machines both named
    "AMD EPYC" may be a Zen 3 with AVX2 only and a Zen 4 with AVX-512 VNNI)."""
    flags = set((_cpuinfo("flags", cpuinfo) or "").split())
    if "avx512f" in flags:
        isa = "AVX-512" + (" VNNI" if "avx512_vnni" in flags else "")
        return isa + (", AMX" if "amx_tile" in flags else "")
    return "AVX2" if "avx2" in flags else None


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def version(dist: str) -> str | None:
    try:  # metadata only: importing triton just to read its version costs a second
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: torch.device) -> dict:
    return {
        "device": device_name(device),
        "device_type": device.type,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": version("triton"),
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
        **({"cpu_isa": cpu_isa()} if device.type == "cpu" else {}),
    }
