"""What every loader returns, and the weight names/shapes they all agree on (HF LLaMA naming, [out, in])."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from sot_engine.engine.chat import ChatTemplate
from sot_engine.engine.config import ModelConfig
from sot_engine.engine.parallel import Shard, shard_config, shard_spec, SKIP
from sot_engine.engine.tokenizer import Tokenizer


log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    config: ModelConfig
    weights: dict[str, torch.Tensor]  # HF LlamaForCausalLM state-dict names; no lm_head.weight when tied
    tokenizer: Tokenizer | None  # None for random weights: prompts are token ids then
    chat_template: ChatTemplate | None
    name: str


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every weight a LLaMA of this config has, in HF naming and layout."""
    h, f, v, hd = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (cfg.num_heads * hd, h),
            p + "self_attn.k_proj.weight": (cfg.num_kv_heads * hd, h),
            p + "self_attn.v_proj.weight": (cfg.num_kv_heads * hd, h),
            p + "self_attn.o_proj.weight": (h, cfg.num_heads * hd),
            **({p + f"self_attn.{n}_proj.bias": ((cfg.num_heads if n == "q" else cfg.num_kv_heads) * hd,)
                for n in "qkv"} if cfg.qkv_bias else {}),
            **({p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)} if cfg.qk_norm else {}),
            **({p + "pre_feedforward_layernorm.weight": (h,), p + "post_feedforward_layernorm.weight": (h,)}
               if cfg.sandwich_norms else {}),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (f, h),
            p + "mlp.up_proj.weight": (f, h),
            p + "mlp.down_proj.weight": (h, f),
        }
    shapes["model.norm.weight"] = (h,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    return shapes


def shard_shapes(cfg: ModelConfig, shard: Shard) -> dict[str, tuple[int, ...]]:
    """The weights one tensor-parallel rank holds, and their shapes (all of `expected_shapes` for Shard())."""
    want = expected_shapes(shard_config(cfg, shard.world) if shard.world > 1 else cfg)
    out = {}
    for k, v in want.items():
        spec = shard_spec(k, cfg, shard)
        if spec == SKIP:
            continue
        if k == "lm_head.weight" and spec is not None:  # split over the vocabulary
            v = (spec[2] - spec[1], v[1])
        out[k] = v
    return out


def check_weights(cfg: ModelConfig, weights: dict[str, torch.Tensor], where: str, shard: Shard = Shard()) -> None:
    """Raise ValueError naming `where` if any weight is missing, unexpected or mis-shaped (for `shard`: its
    slices)."""
    want = shard_shapes(cfg, shard)
    missing = [k for k in want if k not in weights]
    extra = [k for k in weights if k not in want]
    bad = [f"{k}: {tuple(weights[k].shape)} != {want[k]}" for k in want if k in weights and tuple(weights[k].shape) != want[k]]
    for what, items in (("missing weights", missing), ("unexpected weights", extra), ("wrong shapes", bad)):
        if items:
            more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
            raise ValueError(f"{where}: {what}: {', '.join(items[:5])}{more}")
