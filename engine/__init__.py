"""A minimal LLaMA runtime: paged KV cache, ragged batched decoding, prefix fork."""
from engine.guided import GuidedDecoding
from engine.llm import LLM, RequestOutput, StreamDelta
from engine.sequence import SamplingParams

__all__ = ["GuidedDecoding", "LLM", "RequestOutput", "SamplingParams", "StreamDelta"]
