"""Random LLaMA weights of a named shape, for tests and benchmarks without a checkpoint.

Each tensor is drawn from its own generator seeded by (seed, name), directly in the target dtype on the
target device, so big shapes (llama-33b fp16 is 65 GB) never need a float32 copy, and a tensor does not
depend on which others were made before it. Values are reproducible per device type (CPU and CUDA
generators differ).
"""
from __future__ import annotations

import zlib

import torch

from sot_engine.engine.config import ModelConfig, shape
from sot_engine.engine.loader.common import LoadedModel, shard_shapes
from sot_engine.engine.parallel import Shard, shard_spec


def random_weights(config: ModelConfig, *, dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu", seed: int = 0, shard: Shard = Shard()) -> dict[str, torch.Tensor]:
    """Linear/embedding weights ~ N(0, 0.02) (HF's initializer_range); RMSNorm weights ~ N(1, 0.05). A
    tensor-parallel shard draws its own slices (seeded by the slice: no rank makes a whole matrix), so TP=N random
    weights are other numbers than TP=1's, from the same distribution."""
    device = torch.device(device)
    weights = {}
    for name, shp in shard_shapes(config, shard).items():
        spec = shard_spec(name, config, shard)
        key = f"{seed}:{name}" + (f":{spec}" if spec is not None else "")
        g = torch.Generator(device=device).manual_seed(zlib.crc32(key.encode()))
        mean, std = (1.0, 0.05) if name.endswith("norm.weight") else (0.0, 0.02)
        weights[name] = torch.empty(shp, dtype=dtype, device=device).normal_(mean, std, generator=g)
    return weights


def load_random(shape_name: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                seed: int = 0, shard: Shard = Shard()) -> LoadedModel:
    config = shape(shape_name)
    return LoadedModel(config=config, weights=random_weights(config, dtype=dtype, device=device, seed=seed,
                                                             shard=shard),
                       tokenizer=None, chat_template=None, name=f"random:{shape_name}")
