"""LLaMA from an HF model folder: config.json + model.safetensors (or a sharded index).

PyTorch `pytorch_model*.bin` checkpoints (older LLaMA/Vicuna repos) are read too, with `weights_only=True`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from sot_engine.engine.chat import ChatTemplate, guess_chat_template
from sot_engine.engine.config import ModelConfig
from sot_engine.engine.loader.common import LoadedModel, check_weights
from sot_engine.engine.parallel import SKIP, Shard, check_shardable, shard_spec, take
from sot_engine.engine.tokenizer import Tokenizer

# model_type -> the architecture class it names; each is the LLaMA block with config switches (engine.config)
_FAMILIES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
             "qwen3": "Qwen3ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}


def _weight_files(path: Path) -> list[Path]:
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (path / index).is_file():
            shards = sorted(set(json.loads((path / index).read_text())["weight_map"].values()))
            missing = [s for s in shards if not (path / s).is_file()]
            if missing:
                raise FileNotFoundError(f"{path}: shards listed in {index} are missing: {', '.join(missing)}")
            return [path / s for s in shards]
        if (path / single).is_file():
            return [path / single]
    raise FileNotFoundError(f"{path}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _read(file: Path, config: ModelConfig, shard: Shard) -> dict[str, torch.Tensor]:
    """The file's tensors, each only as far as `shard` holds it: safetensors reads just the slice, a .bin is
    memory-mapped and the slice copied."""
    try:
        out = {}
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as f:
                for k in f.keys():
                    spec = shard_spec(k, config, shard)
                    if spec == SKIP:
                        continue
                    if spec is None:
                        out[k] = f.get_tensor(k)
                    else:
                        dim, a, b = spec
                        sl = f.get_slice(k)
                        out[k] = sl[a:b] if dim == 0 else sl[:, a:b]
            return out
        for k, t in torch.load(file, map_location="cpu", weights_only=True, mmap=True).items():
            spec = shard_spec(k, config, shard)
            if spec != SKIP:
                out[k] = take(t, spec).clone() if spec is not None else t
        return out
    except Exception as e:
        raise ValueError(f"{file}: cannot read weights ({type(e).__name__}: {e})") from e


def chat_template_for(path: Path, tc: dict[str, Any], tokenizer: Tokenizer | None, name: str) -> ChatTemplate | None:
    """tokenizer_config.json `chat_template` (or chat_template.jinja / .json), else a guess from the name."""
    src = tc.get("chat_template")
    if isinstance(src, list):  # [{"name": "default", "template": ...}, ...]
        src = next((t["template"] for t in src if t.get("name") == "default"), src[0]["template"] if src else None)
    if src is None and (path / "chat_template.jinja").is_file():
        src = (path / "chat_template.jinja").read_text(encoding="utf-8")
    if src is None and (path / "chat_template.json").is_file():
        src = json.loads((path / "chat_template.json").read_text(encoding="utf-8")).get("chat_template")
    bos, eos = (tokenizer.bos_token, tokenizer.eos_token) if tokenizer else (None, None)
    if src is not None:
        return ChatTemplate(src, bos_token=bos or "", eos_token=eos or "", name="hf")
    return guess_chat_template(name, bos, eos) if tokenizer else None


def load_hf_folder(path: str | Path, *, dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu", shard: Shard = Shard()) -> LoadedModel:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such model folder")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json (not an HF model folder)")
    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
        archs, kind = set(cfg.get("architectures") or []), cfg.get("model_type")
        if kind not in _FAMILIES or (archs and _FAMILIES[kind] not in archs):
            raise ValueError(f"unsupported architecture: model_type {kind!r}, architectures {sorted(archs)} "
                             f"(supported: {', '.join(f'{k} ({v})' for k, v in _FAMILIES.items())})")
        if (kind == "llama" and cfg.get("attention_bias")) or cfg.get("mlp_bias"):
            raise ValueError(f"{kind} with an o_proj or MLP bias is not supported")
        config = ModelConfig.from_hf(cfg)
    except KeyError as e:
        raise ValueError(f"{path / 'config.json'}: missing key {e}") from e
    except ValueError as e:
        raise ValueError(f"{path / 'config.json'}: {e}") from e
    weights: dict[str, torch.Tensor] = {}
    if shard.world > 1:
        check_shardable(config, shard.world, shard.vocab_head)
    for file in _weight_files(path):
        for k, t in _read(file, config, shard).items():
            if k.endswith("rotary_emb.inv_freq") or (k == "lm_head.weight" and config.tie_word_embeddings):
                continue
            weights[k] = t.to(device=device, dtype=dtype)
    check_weights(config, weights, str(path), shard)
    tc = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8")) \
        if (path / "tokenizer_config.json").is_file() else {}
    has_tok = (path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file()
    tokenizer = Tokenizer.from_hf_folder(path) if has_tok else None
    name = path.resolve().name
    chat = chat_template_for(path, tc, tokenizer, f"{name} {cfg.get('_name_or_path', '')}")
    return LoadedModel(config=config, weights=weights, tokenizer=tokenizer, chat_template=chat, name=name)
