"""Kernel backends behind one interface, so a reader can swap or compare them.

A backend is a bundle of functions with the signatures of `kernels.reference`. The engine asks
`get_backend(name, device)`; `None` picks the best one available for the device. Backends from
later work (Triton, C++, CUDA) register themselves here under their own names.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from kernels import reference


@dataclass(frozen=True, slots=True)
class Backend:
    name: str
    rms_norm: Callable
    add_rms_norm: Callable
    apply_rope: Callable
    store_kv: Callable
    paged_prefill_attention: Callable
    paged_decode_attention: Callable


def _torch_backend() -> Backend:
    return Backend(
        name="torch",
        rms_norm=reference.rms_norm,
        add_rms_norm=reference.add_rms_norm,
        apply_rope=reference.apply_rope,
        store_kv=reference.store_kv,
        paged_prefill_attention=reference.paged_prefill_attention,
        paged_decode_attention=reference.paged_decode_attention,
    )


# name -> factory; factories import lazily so a missing optional toolchain only matters when asked for
BACKENDS: dict[str, Callable[[], Backend]] = {"torch": _torch_backend}
# preference order per device type when the user names no backend
DEFAULT_ORDER: dict[str, list[str]] = {"cpu": ["torch"], "cuda": ["torch"]}


def available_backends() -> list[str]:
    return list(BACKENDS)


def get_backend(name: str | None, device: torch.device | str) -> Backend:
    dev = torch.device(device).type
    if name is not None:
        if name not in BACKENDS:
            raise ValueError(f"unknown kernel backend {name!r}; available: {', '.join(BACKENDS)}")
        return BACKENDS[name]()
    return BACKENDS[DEFAULT_ORDER.get(dev, ["torch"])[0]]()
