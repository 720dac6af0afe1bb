"""The LLaMA forward pass over a flat ragged batch (no padding anywhere).

Weights arrive in HF naming and `[out, in]` layout; q/k/v and gate/up are fused into one matrix
each so a step runs 4 matmuls per layer. The matrices and the embedding table may be stored narrower
than the compute dtype (`weight_dtype`, see `kernels.weights`). Attention, norms and RoPE go through a kernel backend
(`kernels.get_backend`), so swapping a kernel never touches this file.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from sot_engine.engine.config import ModelConfig
from sot_engine.engine.memory import into_hugepages
from sot_engine.kernels import Backend, reference
from sot_engine.kernels.cascade import PrefixGroup
from sot_engine.kernels.weights import cat_rows, embedding, map_tensors, store


@dataclass(slots=True)
class AttnMetadata:
    """What attention needs to know about one step's ragged batch."""
    is_prefill: bool
    slot_mapping: torch.Tensor  # [T] pool slot of each new token
    block_tables: torch.Tensor  # [B, max_blocks] int64
    context_lens: torch.Tensor  # [B] tokens in the pool per sequence, new ones included
    cu_seqlens_q: torch.Tensor | None  # [B+1] new-token offsets (prefill only)
    logits_indices: torch.Tensor  # [B] row of each sequence's last new token
    max_context_len: int = 0  # max(context_lens), known on the host
    prefix_groups: list[PrefixGroup] | None = None  # decode: rows sharing prefix blocks, for cascade attention

    def to(self, device: torch.device) -> "AttnMetadata":
        """On another device (a tensor-parallel worker's GPU); the same object where it already is."""
        if self.slot_mapping.device == device:
            return self
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return AttnMetadata(self.is_prefill, move(self.slot_mapping), move(self.block_tables),
                            move(self.context_lens), move(self.cu_seqlens_q), move(self.logits_indices),
                            self.max_context_len, None)


def rope_kind(cfg: ModelConfig) -> str:
    """The RoPE scaling's type (the HF dict's `rope_type`, or the older `type`), "default" for none."""
    sc = cfg.rope_scaling or {}
    return sc.get("rope_type", sc.get("type", "default"))


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies (float32), with linear, llama3 or YaRN scaling from the config (the HF dict's keys)."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    sc = cfg.rope_scaling or {}
    kind = rope_kind(cfg)
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / sc["factor"]
    if kind == "llama3":
        factor, lo, hi = sc["factor"], sc.get("low_freq_factor", 1.0), sc.get("high_freq_factor", 4.0)
        old = sc.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        return torch.where(medium, smoothed, scaled)
    if kind == "yarn":  # YaRN (Peng et al.): interpolate the slow dims, keep the fast ones, a ramp between
        factor, orig = sc["factor"], sc["original_max_position_embeddings"]
        fast, slow = sc.get("beta_fast") or 32, sc.get("beta_slow") or 1

        def dim_of(rotations: float) -> float:  # the dim that turns `rotations` times over the original context
            return d * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(cfg.rope_theta))
        lo, hi = dim_of(fast), dim_of(slow)
        if sc.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, d - 1)
        ramp = ((torch.arange(d // 2, dtype=torch.float32) - lo) / ((hi - lo) or 0.001)).clamp(0, 1)
        return inv / factor * ramp + inv * (1 - ramp)
    raise ValueError(f"unsupported rope scaling {kind!r} (supported: default, linear, llama3, yarn)")


def rope_attention_factor(cfg: ModelConfig) -> float:
    """What cos and sin are multiplied by: YaRN's attention temperature (so q.k by its square), else 1."""
    if rope_kind(cfg) != "yarn":
        return 1.0
    sc = cfg.rope_scaling
    if sc.get("attention_factor") is not None:
        return float(sc["attention_factor"])
    factor = sc["factor"]
    mscale = lambda m: 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0  # noqa: E731
    if sc.get("mscale") and sc.get("mscale_all_dim"):
        return mscale(sc["mscale"]) / mscale(sc["mscale_all_dim"])
    return mscale(1.0)


class LlamaModel:
    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor], backend: Backend,
                 weight_dtype: str | None = None, matmul_precision: str = "fp32", group=None,
                 vocab_part: tuple[int, int] | None = None) -> None:
        """`weight_dtype`: storage of the matrices, "fp32" | "bf16" | "int8" (None: as loaded);
        `matmul_precision` "bf16" / "int8": bf16 / int8 weights whose matmuls round (quantize) the activations too. `group`: this
        rank's tensor-parallel group (engine.parallel); `cfg` and `weights` are then its shard's. `vocab_part`: the
        rows of the vocabulary this rank's lm_head holds (logits all-gathered), None for a whole lm_head."""
        self.cfg, self.backend, self.group, self.vocab_part = cfg, backend, group, vocab_part
        w = weights  # consumed: fused matrices replace their parts, so peak memory stays ~1x
        mat = lambda t: store(t, weight_dtype, matmul_precision)  # noqa: E731
        if cfg.norm_offset:  # Gemma's RMSNorm scales by (1 + w): folded in once, the norm kernels stay as they are
            for k in [k for k in w if k.endswith("norm.weight")]:
                w[k] = w[k] + 1
        self.norm = w["model.norm.weight"]
        self.embed = mat(w.pop("model.embed_tokens.weight"))
        # a tensor-parallel worker computes no logits: it has no lm_head
        self.lm_head = self.embed if cfg.tie_word_embeddings else (
            mat(w.pop("lm_head.weight")) if "lm_head.weight" in w else None)
        if vocab_part is not None and cfg.tie_word_embeddings:  # the tied head: this rank's rows of the table
            a, b = vocab_part
            self.lm_head = map_tensors(self.embed, lambda t: t.narrow(0, a, b - a))
        self.layers = []
        # the relatives' extras per layer, None where the config has none: fused q/k/v bias, q and k head norms
        self.attn_extras: list[tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]] = []
        self.ff_norms: list[tuple[torch.Tensor, torch.Tensor]] = []
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            self.attn_extras.append((
                torch.cat([w.pop(p + f"self_attn.{n}_proj.bias") for n in "qkv"]) if cfg.qkv_bias else None,
                w.pop(p + "self_attn.q_norm.weight") if cfg.qk_norm else None,
                w.pop(p + "self_attn.k_norm.weight") if cfg.qk_norm else None,
            ))
            if cfg.sandwich_norms:  # before the MLP, and after it (post_attention_layernorm: after attention)
                self.ff_norms.append((w.pop(p + "pre_feedforward_layernorm.weight"),
                                      w.pop(p + "post_feedforward_layernorm.weight")))
            self.layers.append((
                w.pop(p + "input_layernorm.weight"),
                mat(cat_rows([w.pop(p + f"self_attn.{n}_proj.weight") for n in "qkv"])),
                mat(w.pop(p + "self_attn.o_proj.weight")),
                w.pop(p + "post_attention_layernorm.weight"),
                mat(cat_rows([w.pop(p + "mlp.gate_proj.weight"), w.pop(p + "mlp.up_proj.weight")])),
                mat(w.pop(p + "mlp.down_proj.weight")),
            ))
        if backend.pack_weight is not None:  # the backend's own layout (the cpp backend: int8 precision's packed blocks)
            packed: dict[int, object] = {}  # by id: a tied lm_head stays the embedding
            repack = lambda m: packed.setdefault(id(m), backend.pack_weight(m)) if m is not None else None  # noqa
            self.embed, self.lm_head = repack(self.embed), repack(self.lm_head)
            self.layers = [tuple(repack(m) if i in (1, 2, 4, 5) else m for i, m in enumerate(layer))
                           for layer in self.layers]
        if self.norm.device.type == "cpu":  # a decode step streams them all: on 2 MiB pages (engine.memory)
            flat = [self.norm, self.embed, self.lm_head, *(m for layer in self.layers for m in layer)]
            del self.embed, self.lm_head, self.layers  # so that each original goes once copied
            flat = into_hugepages(flat)
            self.norm, self.embed, self.lm_head = flat[:3]
            self.layers = [tuple(flat[3 + 6 * i:9 + 6 * i]) for i in range(cfg.num_layers)]
        positions = torch.arange(cfg.max_position_embeddings, dtype=torch.float32)
        freqs = torch.outer(positions, rope_inv_freq(cfg))
        dev = self.norm.device
        mscale = rope_attention_factor(cfg)
        self.cos, self.sin = (freqs.cos() * mscale).to(dev), (freqs.sin() * mscale).to(dev)
        self.local_rope = None  # Gemma 3's local layers: their own RoPE base, unscaled
        if cfg.rope_local_theta is not None:
            local = torch.outer(positions, rope_inv_freq(replace(cfg, rope_theta=cfg.rope_local_theta,
                                                                 rope_scaling=None)))
            self.local_rope = (local.cos().to(dev), local.sin().to(dev))
        self.scale = (cfg.attn_scale or cfg.head_dim) ** -0.5
        self.windows = [cfg.window(i) for i in range(cfg.num_layers)]  # per layer, 0: the whole context
        self.linear = backend.linear or reference.linear  # weight matmuls: x [T, in] @ w[out, in]^T
        # the gated MLP's activation on the fused gate|up product: SwiGLU through the backend, Gemma's GELU-tanh
        if cfg.hidden_act == "silu":
            self.act_mul = backend.silu_mul or reference.silu_mul
        elif cfg.hidden_act == "gelu_tanh":
            self.act_mul = reference.gelu_tanh_mul
        else:
            raise ValueError(f"unsupported MLP activation {cfg.hidden_act!r} (silu, gelu_tanh)")
        # in the activations' dtype, as transformers does (Gemma)
        self.embed_scale = torch.tensor(cfg.hidden_size ** 0.5, dtype=self.dtype) if cfg.embed_scale else None
        self.decode_step = None  # the backend's one-call decode layer loop, built for the first KV pool seen
        self._decode_step_pool: list | None = None

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (activations, norms, KV cache); the matrices may be stored narrower."""
        return self.norm.dtype

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttnMetadata,
                kv_cache: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Hidden states after the final norm for every input token: [T, hidden]."""
        cfg, kb = self.cfg, self.backend
        t, h, kvh, d = input_ids.shape[0], cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        cos, sin = self.cos[positions], self.sin[positions]
        x = embedding(input_ids, self.embed, self.dtype)
        if self.embed_scale is not None:
            x = x * self.embed_scale
        if cfg.sandwich_norms:
            return self._forward_sandwich(x, positions, cos, sin, meta, kv_cache)
        plain = not (cfg.qkv_bias or cfg.qk_norm)  # the fused decode paths know the plain LLaMA block only
        if plain and not meta.is_prefill and not meta.prefix_groups and \
                (step := self._decode_layers(kv_cache)) is not None:
            out = step(x, cos, sin, meta.slot_mapping, meta.block_tables, meta.context_lens)
            if out is not None:
                return out
        residual = None
        # plain decode (no shared-prefix groups): the backend's one-call RoPE + KV store + attention, if it has one
        fused_decode = None if meta.is_prefill or meta.prefix_groups or not plain else kb.rope_store_decode_attention
        for (ln1, wqkv, wo, ln2, wgu, wdown), (bias, qn, kn), (kc, vc), window in zip(
                self.layers, self.attn_extras, kv_cache, self.windows):
            if residual is None:
                residual, y = x, kb.rms_norm(x, ln1, cfg.rms_norm_eps)
            else:
                y, residual = kb.add_rms_norm(x, residual, ln1, cfg.rms_norm_eps)
            qkv = self.linear(y, wqkv)
            if bias is not None:
                qkv += bias
            if fused_decode is not None:
                o = fused_decode(qkv, cos, sin, kc, vc, meta.slot_mapping, meta.block_tables, meta.context_lens,
                                 self.scale, meta.max_context_len, window)
            else:
                o = self.attention(self._head_norms(qkv.view(t, h + 2 * kvh, d), qn, kn), cos, sin, kc, vc, meta,
                                   window)
            x = self.linear(o, wo)
            if self.group is not None:  # row-parallel o_proj: each rank holds a partial sum
                self.group.all_reduce(x)
            y, residual = kb.add_rms_norm(x, residual, ln2, cfg.rms_norm_eps)
            x = self.linear(self.act_mul(self.linear(y, wgu)), wdown)
            if self.group is not None:  # row-parallel down_proj
                self.group.all_reduce(x)
        return kb.add_rms_norm(x, residual, self.norm, cfg.rms_norm_eps)[0]

    def _head_norms(self, qkv: torch.Tensor, qn: torch.Tensor | None, kn: torch.Tensor | None) -> torch.Tensor:
        """Per-head RMSNorm of q and k (Qwen3, Gemma 3), before RoPE; qkv as it is without them."""
        if qn is None:
            return qkv
        t, h, kvh, d, eps = qkv.shape[0], self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim, \
            self.cfg.rms_norm_eps
        kb = self.backend
        return torch.cat([kb.rms_norm(qkv[:, :h].reshape(-1, d), qn, eps).view(t, h, d),
                          kb.rms_norm(qkv[:, h:h + kvh].reshape(-1, d), kn, eps).view(t, kvh, d),
                          qkv[:, h + kvh:]], dim=1)

    def _forward_sandwich(self, x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          meta: AttnMetadata, kv_cache: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Gemma 3's layer: each sublayer's output is normed before it joins the residual stream, the MLP's input
        has a norm of its own, and local layers rotate with their own RoPE base. Kernel by kernel (no fused path
        knows this block)."""
        cfg, kb = self.cfg, self.backend
        t, h, kvh, d, eps = x.shape[0], cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps
        local_cs = (self.local_rope[0][positions], self.local_rope[1][positions]) if self.local_rope else (cos, sin)
        for i, ((ln1, wqkv, wo, post_attn, wgu, wdown), (bias, qn, kn), (pre_ff, post_ff), (kc, vc)) in enumerate(
                zip(self.layers, self.attn_extras, self.ff_norms, kv_cache)):
            c, s_ = local_cs if cfg.local_layers and cfg.local_layers[i] else (cos, sin)
            window = self.windows[i]
            qkv = self.linear(kb.rms_norm(x, ln1, eps), wqkv)
            if bias is not None:
                qkv += bias
            a = self.linear(self.attention(self._head_norms(qkv.view(t, h + 2 * kvh, d), qn, kn), c, s_, kc, vc,
                                           meta, window), wo)
            if self.group is not None:
                self.group.all_reduce(a)
            x = x + kb.rms_norm(a, post_attn, eps)
            m = self.linear(self.act_mul(self.linear(kb.rms_norm(x, pre_ff, eps), wgu)), wdown)
            if self.group is not None:
                self.group.all_reduce(m)
            x = x + kb.rms_norm(m, post_ff, eps)
        return kb.rms_norm(x, self.norm, eps)

    def _decode_layers(self, kv_cache: list[tuple[torch.Tensor, torch.Tensor]]):
        """The backend's `decode_layers` step for these weights and `kv_cache` (built once per pool), or None."""
        if self.backend.decode_layers is None or self.group is not None:  # its layer loop has no all-reduce
            return None
        if self._decode_step_pool is not kv_cache:
            cfg = self.cfg
            self.decode_step = self.backend.decode_layers(self.layers, self.norm, kv_cache, cfg.num_heads,
                                                          cfg.rms_norm_eps, self.scale, self.windows)
            self._decode_step_pool = kv_cache
        return self.decode_step

    def attention(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
                  meta: AttnMetadata, window: int = 0) -> torch.Tensor:
        """RoPE, KV store and attention of one layer, kernel by kernel: qkv [T, H + 2 KVH, D] -> [T, H * D].
        Cascade attention knows no window: with one that binds (a context past it) the step decodes plainly."""
        kb, h, kvh = self.backend, self.cfg.num_heads, self.cfg.num_kv_heads
        qk = kb.apply_rope(qkv[:, :h + kvh], cos, sin)  # q and k heads rotated in one call
        q, k = qk[:, :h], qk[:, h:]
        kb.store_kv(k, qkv[:, h + kvh:], kc, vc, meta.slot_mapping)
        if meta.is_prefill:
            o = kb.paged_prefill_attention(q, kc, vc, meta.block_tables, meta.cu_seqlens_q, meta.context_lens,
                                           self.scale, window)
        elif meta.prefix_groups and (not window or 0 < meta.max_context_len <= window):
            o = kb.cascade_decode_attention(q, kc, vc, meta.block_tables, meta.context_lens, self.scale,
                                            meta.prefix_groups, meta.max_context_len)
        else:
            o = kb.paged_decode_attention(q, kc, vc, meta.block_tables, meta.context_lens, self.scale,
                                          meta.max_context_len, window)
        return o.reshape(qkv.shape[0], h * self.cfg.head_dim)

    def logits(self, hidden: torch.Tensor, meta: AttnMetadata) -> torch.Tensor:
        """Logits of each sequence's last token of the step (decode: one row per sequence already, no gather)."""
        return self.compute_logits(hidden if not meta.is_prefill else hidden[meta.logits_indices])

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.linear(hidden, self.lm_head).float()
        if self.vocab_part is not None:  # each rank computed its slice of the vocabulary
            out = self.group.all_gather(out)
        if self.cfg.logit_softcap:
            out = torch.tanh(out / self.cfg.logit_softcap) * self.cfg.logit_softcap
        return out
