"""A minimal LLaMA runtime: paged KV cache, ragged batched decoding, prefix fork."""
from sot_engine.engine.guided import GuidedDecoding
from sot_engine.engine.llm import LLM, RequestOutput, StreamDelta
from sot_engine.engine.sequence import SamplingParams

__all__ = ["GuidedDecoding", "LLM", "RequestOutput", "SamplingParams", "StreamDelta"]
