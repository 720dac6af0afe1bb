"""LLaMA from a GGUF file (llama.cpp's format), through `gguf.GGUFReader`.

Architectures `llama`, `qwen2` (q/k/v biases), `qwen3` (q/k head norms) and `gemma3`, whose keys live under their
own name.
Three llama.cpp conventions are undone so the result is a plain HF state dict:
* tensor names (`blk.0.attn_q.weight` -> `model.layers.0.self_attn.q_proj.weight`);
* shapes: GGUF lists dims fastest-first (`ne`), the reader's arrays are already row-major [out, in];
* convert_hf_to_gguf permutes llama's q/k rows per head (interleaved RoPE pairs); we permute back to HF's
  rotate_half layout (Qwen's are not permuted: llama.cpp runs them with NEOX RoPE, HF's layout).
Quantized tensors are dequantized by `loader.dequant` (torch for F32/F16/BF16/Q8_0/Q4_0/Q4_1, else
`gguf.quants.dequantize`: Q5_x, K-quants, ...), or with `keep_quantized` the matrices are repacked as they are
(`loader.repack`, `weight_dtype="gguf"`).
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from sot_engine.engine.chat import ChatTemplate, guess_chat_template
from sot_engine.engine.config import ModelConfig
from sot_engine.engine.loader.common import LoadedModel, check_weights
from sot_engine.engine.loader.dequant import dequantize
from sot_engine.engine.loader.repack import EXACT_TYPES, FLOAT_TYPES, repack
from sot_engine.engine.parallel import SKIP, Shard, check_shardable, shard_spec
from sot_engine.engine.tokenizer import Tokenizer
from sot_engine.kernels.weights import Weight, map_tensors

log = logging.getLogger(__name__)

_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
_LAYER = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
          "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
          "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}  # the last two: qwen3
# Gemma 3 names its norms after their place: ffn_norm is the norm before the MLP, as in llama, but llama's HF name
# for that one is post_attention_layernorm, which Gemma uses for the norm after attention
_GEMMA3_LAYER = _LAYER | {"ffn_norm": "pre_feedforward_layernorm", "post_attention_norm": "post_attention_layernorm",
                          "post_ffw_norm": "post_feedforward_layernorm"}
ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma3")  # general.architecture values: the LLaMA block with switches
GEMMA3_SWA_PATTERN = 6  # llama.cpp's: every 6th Gemma 3 layer is global (not in the file)
GEMMA3_LOCAL_ROPE_BASE = 10_000.0  # likewise
_IGNORED = {"rope_freqs.weight"}  # llama3 RoPE factors: turned into config.rope_scaling instead


class _Reader(gguf.GGUFReader):
    """gguf's reader, faster to open. Two changes, checked against the plain reader field by field in the tests:

    * it reads a plain ndarray view of its memmap: slicing a `np.memmap` runs Python-level hooks for every slice
      (SmolLM2: 2.5 s -> 0.8 s to open). The view keeps the memmap (its base) alive, and the tensors still map
      the file lazily; the map is copy-on-write, so torch can view it without a read-only warning.
    * arrays of scalars are one ndarray part, and arrays of strings one memoryview part per string, instead of
      one or two ndarrays per element (0.8 s -> 0.1 s: SmolLM2 has 49152 tokens, their types and 48900 merges).
      `field.contents()` returns the same lists; `contents(i)` of such an array is not supported.
    """

    def __init__(self, path: str | Path) -> None:
        super().__init__(path, mode="c")

    @property
    def data(self) -> np.ndarray:
        return self._data

    @data.setter
    def data(self, value: np.ndarray) -> None:
        self._data = value.view(np.ndarray) if isinstance(value, np.memmap) else value

    def _get_field_parts(self, orig_offs: int, raw_type: int) -> tuple[int, list, list[int], list]:
        if raw_type != gguf.GGUFValueType.ARRAY or self.byte_order != "I":
            return super()._get_field_parts(orig_offs, raw_type)
        raw_itype = self._get(orig_offs, np.uint32)
        alen = self._get(orig_offs + 4, np.uint64)
        itype, n, offs = gguf.GGUFValueType(int(raw_itype[0])), int(alen[0]), orig_offs + 12
        types = [gguf.GGUFValueType.ARRAY, itype]
        if (nptype := self.gguf_scalar_to_np.get(itype)) is not None:
            values = self._get(offs, nptype, n)
            return 12 + int(values.nbytes), [raw_itype, alen, values], [2], types
        if itype != gguf.GGUFValueType.STRING:  # nested arrays: the plain reader's way
            return super()._get_field_parts(orig_offs, raw_type)
        mem, parts = memoryview(self._data), [raw_itype, alen]
        for _ in range(n):
            length = int.from_bytes(mem[offs:offs + 8], "little")
            parts.append(mem[offs + 8:offs + 8 + length])
            offs += 8 + length
        return offs - orig_offs, parts, list(range(2, n + 2)), types


def open_gguf(path: str | Path) -> gguf.GGUFReader:
    """A GGUFReader, or a ValueError naming the file if it is not a readable, complete GGUF."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file (bad magic)")
    try:
        reader = _Reader(path)
    except Exception as e:  # the reader raises ValueError/KeyError/IndexError/... on garbage
        raise ValueError(f"{path}: corrupt or truncated GGUF ({type(e).__name__}: {e})") from e
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
            raise ValueError(f"{path}: truncated GGUF (tensor {t.name} ends past the end of the file)")
    return reader


def gguf_meta(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_token_id(reader: gguf.GGUFReader, text: str) -> int | None:
    """The id of the vocabulary entry `text` (tokenizer.ggml.tokens), or None. Compares each entry's raw bytes, so
    finding an early special token decodes nothing (Gemma: 262144 entries)."""
    f = reader.fields.get("tokenizer.ggml.tokens")
    if f is None:
        return None
    want = text.encode()
    return next((i for i, k in enumerate(f.data) if bytes(f.parts[k]) == want), None)


def hf_name(name: str, arch: str = "llama") -> str | None:
    """HF name of a GGUF tensor; None for tensors we deliberately drop; ValueError for unknown ones."""
    if name in _GLOBAL:
        return _GLOBAL[name]
    if name in _IGNORED:
        return None
    layer = _GEMMA3_LAYER if arch == "gemma3" else _LAYER
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if m and m.group(2) in layer:
        return f"model.layers.{m.group(1)}.{layer[m.group(2)]}.{m.group(3)}"
    raise ValueError(f"unexpected tensor {name!r} (not a LLaMA-family block)")


def unpermute_qk(w: np.ndarray | torch.Tensor, n_head: int) -> np.ndarray | torch.Tensor:
    """Inverse of convert_hf_to_gguf's `permute`: per head, rows (i, 2) -> (2, i)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's `permute` (HF rotate_half rows -> llama.cpp interleaved pairs); for tests/writers."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_scaling_from_freqs(factors: np.ndarray, theta: float, head_dim: int, orig_ctx: int = 8192) -> dict[str, Any]:
    """Recover HF's llama3 `rope_scaling` from llama.cpp's `rope_freqs` tensor (per-dim divisors of inv_freq).

    In the llama3 formula only low_freq_factor/orig_ctx and high_freq_factor/orig_ctx matter, so with orig_ctx
    fixed the two factors follow from a line fit through the smoothly interpolated dims. Verified exactly."""
    r = factors.astype(np.float64)
    factor = float(r.max())
    x = orig_ctx * theta ** (-np.arange(0, head_dim, 2) / head_dim) / (2 * math.pi)  # orig_ctx / wavelen
    mid = (r > 1 + 1e-6) & (r < factor * (1 - 1e-6))
    if factor <= 1 + 1e-6:
        raise ValueError("rope_freqs has no scaling")
    if mid.sum() < 2:
        raise ValueError("rope_freqs cannot be expressed as llama3 rope scaling")
    s = (1 / r[mid] - 1 / factor) / (1 - 1 / factor)  # smooth factor per interpolated dim
    a, b = np.polyfit(x[mid], s, 1)
    low, high = -b / a, -b / a + 1 / a
    cfg = {"rope_type": "llama3", "factor": factor, "low_freq_factor": float(low), "high_freq_factor": float(high),
           "original_max_position_embeddings": orig_ctx}
    smooth = np.clip((x - low) / (high - low), 0, 1)
    back = 1 / ((1 - smooth) / factor + smooth)
    if not np.allclose(back, r, rtol=1e-3):
        raise ValueError("rope_freqs cannot be expressed as llama3 rope scaling")
    return cfg


def config_from_gguf(reader: gguf.GGUFReader) -> ModelConfig:
    arch = gguf_meta(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"unsupported architecture {arch!r} (supported: {', '.join(ARCHITECTURES)})")
    # the model's keys live under its architecture's name ("qwen2.block_count")
    meta = lambda k, d=None: gguf_meta(reader, k.replace("llama.", f"{arch}.", 1), d)  # noqa: E731
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise ValueError("no token_embd.weight tensor")
    hidden = int(meta("llama.embedding_length"))
    heads = int(meta("llama.attention.head_count"))
    head_dim = int(meta("llama.attention.key_length", meta("llama.rope.dimension_count", hidden // heads)))
    theta = float(meta("llama.rope.freq_base", 10000.0))
    ctx = int(meta("llama.context_length", 2048))
    scaling = None
    kind = meta("llama.rope.scaling.type")
    if kind not in (None, "none"):
        scaling = {"rope_type": kind, "factor": float(meta("llama.rope.scaling.factor", 1.0))}
        if (o := meta("llama.rope.scaling.original_context_length")) is not None:
            scaling["original_max_position_embeddings"] = int(o)
        for key, name in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):  # YaRN's ramp, if set
            if (v := meta(f"llama.rope.scaling.{key}")) is not None:
                scaling[name] = float(v)
    elif "rope_freqs.weight" in tensors:
        freqs = gguf.quants.dequantize(tensors["rope_freqs.weight"].data, tensors["rope_freqs.weight"].tensor_type)
        orig = meta("llama.rope.scaling.original_context_length", 8192)
        scaling = llama3_scaling_from_freqs(np.asarray(freqs).reshape(-1), theta, head_dim, int(orig))
    eos = [meta(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    if arch == "gemma3" and eos[1] is None:  # no eot id in the file (Gemma 3 270M's eos is <eos> alone), but a chat
        eos.append(gguf_token_id(reader, "<end_of_turn>"))  # turn ends with <end_of_turn> (llama.cpp finds it by text)
    window = meta("llama.attention.sliding_window")
    config = ModelConfig(
        vocab_size=int(tensors["token_embd.weight"].shape[1]),  # ne = [hidden, vocab]
        hidden_size=hidden,
        intermediate_size=int(meta("llama.feed_forward_length")),
        num_layers=int(meta("llama.block_count")),
        num_heads=heads,
        num_kv_heads=int(meta("llama.attention.head_count_kv", heads)),
        head_dim=head_dim,
        rope_theta=theta,
        rope_scaling=scaling,
        rms_norm_eps=float(meta("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        max_position_embeddings=ctx,
        tie_word_embeddings="output.weight" not in tensors,
        bos_token_id=meta("tokenizer.ggml.bos_token_id"),
        eos_token_ids=list(dict.fromkeys(int(e) for e in eos if e is not None)),
        qkv_bias=arch == "qwen2",
        qk_norm=arch in ("qwen3", "gemma3"),
        sliding_window=int(window) if window else None,  # every layer's, but Gemma 3's global ones below
    )
    if arch == "gemma3":  # llama.cpp stores Gemma's norms as (1 + w) already: no offset to fold in
        n = config.num_layers
        config = replace(config, hidden_act="gelu_tanh", embed_scale=True, sandwich_norms=True,
                         attn_scale=float(config.head_dim), logit_softcap=meta("gemma3.final_logit_softcapping"),
                         local_layers=tuple((i + 1) % GEMMA3_SWA_PATTERN != 0 for i in range(n)),
                         rope_local_theta=GEMMA3_LOCAL_ROPE_BASE)
    return config


def slice_raw(raw: np.ndarray, qtype: gguf.GGMLQuantizationType, shape: tuple[int, int],
              spec: tuple[int, int, int]) -> tuple[np.ndarray, tuple[int, int]]:
    """A tensor-parallel slice of a GGUF tensor's raw data, taken before dequantizing (whole quant blocks:
    a column slice must start and end on a block boundary), and the slice's shape."""
    dim, a, b = spec
    rows = raw.reshape(shape[0], -1)
    if dim == 0:
        return np.ascontiguousarray(rows[a:b]), (b - a, shape[1])
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    if a % block or b % block:
        raise ValueError(f"columns {a}:{b} cut {qtype.name} blocks of {block}")
    if rows.dtype == np.uint8:  # quantized (or 2-byte floats stored as bytes): whole blocks of `size` bytes
        a, b = a // block * size, b // block * size
    return np.ascontiguousarray(rows[:, a:b]), (shape[0], spec[2] - spec[1])


def is_matrix(name: str) -> bool:
    """A weight the matmuls (or the embedding lookup) read, not a norm or a bias."""
    return name.endswith("_proj.weight") or name in ("model.embed_tokens.weight", "lm_head.weight")


def load_gguf(path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
              shard: Shard = Shard(), keep_quantized: bool = False) -> LoadedModel:
    path = Path(path)
    reader = open_gguf(path)
    try:
        config = config_from_gguf(reader)
    except (TypeError, KeyError, ValueError) as e:  # TypeError: int(None) for a missing key
        raise ValueError(f"{path}: {e}") from e
    if shard.world > 1:
        check_shardable(config, shard.world, shard.vocab_head)
    arch = gguf_meta(reader, "general.architecture")
    permuted = arch == "llama"
    weights: dict[str, Weight] = {}
    requantized: set[str] = set()
    for t in reader.tensors:
        try:
            name = hf_name(t.name, arch)
            if name is None:
                continue
            spec = shard_spec(name, config, shard)
            if spec == SKIP:
                continue
            raw, shape = t.data, tuple(reversed(t.shape.tolist()))
            if spec is not None:  # only this rank's rows or columns are ever dequantized
                raw, shape = slice_raw(raw, t.tensor_type, shape, spec)
            if keep_quantized and is_matrix(name) and t.tensor_type not in FLOAT_TYPES:
                w = repack(raw, t.tensor_type, shape)
                if t.tensor_type not in EXACT_TYPES:
                    requantized.add(t.tensor_type.name)
            else:
                w = dequantize(raw, t.tensor_type, shape)
        except (NotImplementedError, ValueError, RuntimeError) as e:
            raise ValueError(f"{path}: tensor {t.name} ({t.tensor_type.name}): {e}") from e
        # llama.cpp permutes llama's q/k rows (interleaved RoPE), not Qwen's (NEOX RoPE, as HF's)
        # per head: a shard unpermutes alone; a repacked matrix's tensors are all indexed by row first
        heads = config.num_heads if name.endswith(("q_proj.weight", "q_proj.bias")) else \
            config.num_kv_heads if name.endswith(("k_proj.weight", "k_proj.bias")) else 0
        if permuted and heads:
            w = map_tensors(w, lambda x, h=heads // shard.world: unpermute_qk(x, h).contiguous())
        if isinstance(w, torch.Tensor):
            weights[name] = w.to(device=device, dtype=dtype).contiguous()
        else:  # repacked: the integer layouts stay as they are, wherever they go
            weights[name] = map_tensors(w, lambda x: x.to(device=device).contiguous())
    if requantized:
        log.warning("%s: weight_dtype='gguf' has no exact layout for %s: those matrices are re-quantized as int8 "
                    "per 32 (close to, not equal to the file's values)", path.name, ", ".join(sorted(requantized)))
    check_weights(config, weights, str(path), shard)
    tokenizer = Tokenizer.from_gguf(reader) if "tokenizer.ggml.tokens" in reader.fields else None
    name = gguf_meta(reader, "general.name") or path.stem
    bos, eos = (tokenizer.bos_token, tokenizer.eos_token) if tokenizer else (None, None)
    if (src := gguf_meta(reader, "tokenizer.chat_template")) is not None:
        chat = ChatTemplate(src, bos_token=bos or "", eos_token=eos or "", name="gguf")
    else:
        chat = guess_chat_template(f"{name} {path.name}", bos, eos) if tokenizer else None
    return LoadedModel(config=config, weights=weights, tokenizer=tokenizer, chat_template=chat, name=name)
