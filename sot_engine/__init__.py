"""sot-engine: Skeleton-of-Thought on LLaMA-family models, on a paged-KV engine of its own.

    from sot_engine import LLM, SamplingParams, SoT
    print(SoT("default").answer("How can I improve my time management skills?").text)

Subpackages: `engine` (the runtime), `kernels` (kernel backends beside their references), `sot` (the SoT
driver, CLI and server). The names below load on first use, so `sot --help` does not pay for torch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from sot_engine._lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {"LLM": "sot_engine.engine.llm", "RequestOutput": "sot_engine.engine.llm",
            "StreamDelta": "sot_engine.engine.llm", "SamplingParams": "sot_engine.engine.sequence",
            "GuidedDecoding": "sot_engine.engine.guided", "SoT": "sot_engine.sot.driver",
            "SoTConfig": "sot_engine.sot.driver", "Answer": "sot_engine.sot.driver"}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)

if TYPE_CHECKING:
    from sot_engine.engine.guided import GuidedDecoding
    from sot_engine.engine.llm import LLM, RequestOutput, StreamDelta
    from sot_engine.engine.sequence import SamplingParams
    from sot_engine.sot.driver import Answer, SoT, SoTConfig
