"""Model shapes and engine settings.

The shape table at the top is what `random:<shape>` builds; loaded models fill the same dataclass
from their own metadata (HF `config.json` or GGUF keys).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any


@dataclass(slots=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 0  # 0: hidden_size // num_heads
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # HF dict, e.g. {"rope_type": "llama3", "factor": 8.0, ...}
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_ids: list[int] = field(default_factory=lambda: [2])
    # the LLaMA block's relatives, as switches (HF model_type in parentheses)
    qkv_bias: bool = False  # q/k/v projections with a bias (qwen2)
    qk_norm: bool = False  # RMSNorm over each q and k head before RoPE (qwen3, gemma3_text)
    # Gemma 3's block (gemma3_text): each a switch of its own
    norm_offset: bool = False  # RMSNorm scales by (1 + w): folded into the weights at load
    hidden_act: str = "silu"  # the gated MLP's activation: "silu" | "gelu_tanh"
    embed_scale: bool = False  # embeddings multiplied by sqrt(hidden_size)
    sandwich_norms: bool = False  # attention and MLP outputs normed before the residual add; a norm before the MLP
    attn_scale: float | None = None  # attention scores times attn_scale ** -0.5 (None: head_dim)
    logit_softcap: float | None = None  # logits = cap * tanh(logits / cap)
    sliding_window: int | None = None  # keys a local layer's query sees, itself included (mistral, qwen2/3, gemma3)
    local_layers: tuple[bool, ...] | None = None  # per layer: a sliding-window layer (None: all, if there is a window)
    rope_local_theta: float | None = None  # the local layers' RoPE base (gemma3)

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be positive, got {self.sliding_window}")

    def window(self, layer: int) -> int:
        """The attention window of a layer in the kernels' convention: 0 for the whole causal context."""
        if not self.sliding_window or (self.local_layers is not None and not self.local_layers[layer]):
            return 0
        return self.sliding_window

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> "ModelConfig":
        """Build from a HF `config.json` dict (LlamaConfig fields, and the relatives' switches)."""
        if cfg.get("model_type") == "gemma3_text":
            return cls._from_gemma3(cfg)
        eos = cfg.get("eos_token_id", 2)
        eos_ids = list(eos) if isinstance(eos, (list, tuple)) else ([] if eos is None else [int(eos)])
        heads = cfg["num_attention_heads"]
        # transformers >= 5 writes `rope_parameters` (theta + scaling in one dict), older `rope_scaling`
        rope = dict(cfg.get("rope_scaling") or cfg.get("rope_parameters") or {})
        theta = cfg.get("rope_theta", rope.pop("rope_theta", 10000.0))
        rope.pop("rope_theta", None)
        if rope.get("rope_type", rope.get("type", "default")) == "default":
            rope = {}
        # Qwen configs carry a window they do not use unless use_sliding_window; layer_types (transformers >= 4.54)
        # names the windowed layers, else a window applies to every layer (Mistral)
        window = cfg.get("sliding_window")
        if cfg.get("model_type") in ("qwen2", "qwen3") and not cfg.get("use_sliding_window", False):
            window = None
        types = cfg.get("layer_types")
        if window and not types and cfg.get("model_type") in ("qwen2", "qwen3"):  # older Qwen files
            types = ["sliding_attention" if i >= cfg.get("max_window_layers", 0) else "full_attention"
                     for i in range(cfg["num_hidden_layers"])]
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rope_theta=float(theta),
            rope_scaling=rope or None,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            qkv_bias=cfg.get("model_type") == "qwen2" or (cfg.get("model_type") == "qwen3"
                                                          and bool(cfg.get("attention_bias"))),
            qk_norm=cfg.get("model_type") == "qwen3",
            sliding_window=int(window) if window else None,
            local_layers=tuple(t == "sliding_attention" for t in types) if window and types else None,
        )

    @classmethod
    def _from_gemma3(cls, cfg: dict[str, Any]) -> "ModelConfig":
        """Gemma 3's text config: per-layer-type RoPE (transformers >= 5 writes `rope_parameters` by layer type,
        older files `rope_theta` + `rope_local_base_freq`), local layers by `layer_types` or a pattern."""
        n = cfg["num_hidden_layers"]
        types = cfg.get("layer_types") or [
            "full_attention" if (i + 1) % cfg.get("sliding_window_pattern", 6) == 0 else "sliding_attention"
            for i in range(n)]
        rp = cfg.get("rope_parameters") or {}
        if "full_attention" in rp:
            full, local = dict(rp["full_attention"]), dict(rp.get("sliding_attention") or {})
        else:
            full = dict(cfg.get("rope_scaling") or {}, rope_theta=cfg.get("rope_theta", 1_000_000.0))
            local = {"rope_theta": cfg.get("rope_local_base_freq", 10_000.0)}
        theta = float(full.pop("rope_theta", 1_000_000.0))
        scaling = full if full.get("rope_type", full.get("type", "default")) != "default" else None
        base = cls.from_hf({**cfg, "model_type": "llama", "rope_parameters": None, "rope_scaling": scaling,
                            "rope_theta": theta, "tie_word_embeddings": cfg.get("tie_word_embeddings", True),
                            "layer_types": types})
        return replace(base, qk_norm=True, norm_offset=True, hidden_act="gelu_tanh", embed_scale=True,
                       sandwich_norms=True, attn_scale=float(cfg.get("query_pre_attn_scalar") or base.head_dim),
                       logit_softcap=cfg.get("final_logit_softcapping"),
                       rope_local_theta=float(local.get("rope_theta", 10_000.0)))

    def to_hf(self) -> dict[str, Any]:
        """The matching HF LlamaConfig dict (used by tests to build an independent reference)."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rope_theta": self.rope_theta,
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,  # transformers edits it in place
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else self.eos_token_ids,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
        }


# Named shapes for `random:<name>` (tests and benchmarks). Real models' published shapes.
SHAPES: dict[str, ModelConfig] = {
    "tiny": ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2,
                        num_heads=4, num_kv_heads=2, rope_theta=10000.0, max_position_embeddings=1024),
    "smollm2-135m": ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                                num_heads=9, num_kv_heads=3, rope_theta=100000.0, rms_norm_eps=1e-5,
                                max_position_embeddings=8192, tie_word_embeddings=True,
                                bos_token_id=1, eos_token_ids=[2]),
    "tinyllama-1.1b": ModelConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22,
                                  num_heads=32, num_kv_heads=4, rms_norm_eps=1e-5, max_position_embeddings=2048),
    "llama-7b": ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                            num_heads=32, num_kv_heads=32, rms_norm_eps=1e-6, max_position_embeddings=2048),
    "llama-13b": ModelConfig(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_layers=40,
                             num_heads=40, num_kv_heads=40, rms_norm_eps=1e-6, max_position_embeddings=2048),
    "llama-33b": ModelConfig(vocab_size=32000, hidden_size=6656, intermediate_size=17920, num_layers=60,
                             num_heads=52, num_kv_heads=52, rms_norm_eps=1e-6, max_position_embeddings=2048),
    "llama2-7b": ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                             num_heads=32, num_kv_heads=32, rms_norm_eps=1e-5, max_position_embeddings=4096),
}


def shape(name: str, **overrides: Any) -> ModelConfig:
    if name not in SHAPES:
        raise ValueError(f"unknown model shape {name!r}; known: {', '.join(SHAPES)}")
    return replace(SHAPES[name], **overrides)


@dataclass(slots=True)
class CacheConfig:
    block_size: int = 16
    num_blocks: int | None = None  # None: derive from memory_budget_bytes
    memory_budget_bytes: int | None = None  # None: a default per device (see engine.kv_cache)


@dataclass(slots=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 4096  # tokens one step computes at most (decode rows always run)
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    chunked_prefill: bool = True  # prompts prefilled in chunks within the token budget, beside the decodes
