"""The LLaMA block's relatives, each a config switch, against transformers' own implementation: a tiny random model
built and saved by transformers, loaded by us, float64 logits within 1e-5 over a ragged prefill and 20 decode steps;
a fork equals its full prompts. Sliding windows (Mistral, Qwen's upper layers, Gemma 3's local layers) are 16 tokens
here, so the contexts (5 to 60 tokens) run past them."""
from __future__ import annotations

import pytest
import torch

from sot_engine.engine import LLM, SamplingParams
from sot_engine.engine.llm_engine import LLMEngine
from tests.engine.test_model_vs_hf import engine_logits, rel_err

COMMON = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-6, rope_theta=10000.0,
              tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


def build(family: str, **extra):
    import transformers
    cls_cfg, cls_model = {
        "mistral": ("MistralConfig", "MistralForCausalLM"),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
        "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
    }[family]
    common = COMMON if family != "gemma3" else {k: v for k, v in COMMON.items() if k != "rope_theta"}
    cfg = getattr(transformers, cls_cfg)(**(common | extra))
    torch.manual_seed(len(family))
    model = getattr(transformers, cls_model)(cfg).to(torch.float64).eval()
    with torch.no_grad():  # HF inits norms to 1 and biases to 0: perturb them so a missing one is visible
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


FAMILIES = {
    "mistral": dict(sliding_window=None, head_dim=32),
    "mistral-window": dict(sliding_window=16, head_dim=32),  # every layer windowed
    "qwen2": dict(use_sliding_window=False, sliding_window=64),  # q/k/v bias; a window it does not use
    "qwen2-window": dict(use_sliding_window=True, sliding_window=16, max_window_layers=1),  # layer 1 windowed
    "qwen3": dict(head_dim=48, use_sliding_window=False, attention_bias=False),  # q/k norms, head_dim != 128/4
    "qwen3-tied": dict(head_dim=48, tie_word_embeddings=True),
    # local (windowed) and global layers with their own RoPE bases, query_pre_attn_scalar != head_dim
    "gemma3": dict(num_hidden_layers=4, head_dim=32, sliding_window=16, query_pre_attn_scalar=24,
                   layer_types=["sliding_attention", "full_attention"] * 2, tie_word_embeddings=True),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_logits_match_transformers(family, tmp_path):
    hf = build(family.split("-")[0], **FAMILIES[family])
    hf.save_pretrained(tmp_path, safe_serialization=True)
    eng = LLMEngine(str(tmp_path), device="cpu", dtype=torch.float64, num_blocks=64, block_size=8)
    cfg = eng.config
    assert (cfg.qkv_bias, cfg.qk_norm) == (family.startswith("qwen2"), family.startswith(("qwen3", "gemma3")))
    assert [cfg.window(i) for i in range(cfg.num_layers)] == {
        "mistral-window": [16, 16], "qwen2-window": [0, 16], "gemma3": [16, 0, 16, 0]}.get(family, [0] * cfg.num_layers)
    assert cfg.max_position_embeddings == 1024  # the model's own context, not the window
    if family == "gemma3":
        assert cfg.sandwich_norms and cfg.local_layers == (True, False, True, False)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (23, 5, 40)]
    ours = engine_logits(eng, prompts, 20)
    for p, logits in zip(prompts, ours):
        full = p + [int(l.argmax()) for l in logits[:-1]]
        with torch.no_grad():
            ref = hf(torch.tensor([full])).logits[0]
        for step, l in enumerate(logits):
            err = rel_err(l, ref[len(p) - 1 + step])
            assert err < 1e-5, f"{family} step {step}: rel err {err:.2e}"


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "gemma3", "mistral-window", "mistral-window-32"])
def test_family_fork_and_batch_equal_alone(family, tmp_path):
    """Forked suffixes share the prefix's blocks, and their decode steps run cascade attention while the contexts
    are within the windows (window 32: the first steps), plain paged attention once past them."""
    kind = family.split("-")[0]
    extra = FAMILIES["mistral-window"] | dict(sliding_window=32) if family == "mistral-window-32" else FAMILIES[family]
    build(kind, **extra).save_pretrained(tmp_path, safe_serialization=True)
    llm = LLM(str(tmp_path), dtype=torch.float64, num_blocks=64, block_size=8)
    g = torch.Generator().manual_seed(4)
    prefix = torch.randint(0, 512, (21,), generator=g).tolist()
    suffixes = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (3, 9)]
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    full = [prefix + s for s in suffixes]
    alone = [llm.generate([f], sp)[0].token_ids for f in full]
    assert [o.token_ids for o in llm.generate(full, sp)] == alone
    assert [o.token_ids for o in llm.fork(prefix, suffixes, sp)] == alone


@pytest.mark.parametrize("family", ["mistral-window", "gemma3"])
def test_windowed_prefix_cache_hit_equals_a_cold_run(family, tmp_path):
    """A prompt whose cached blocks lie partly outside the window: the cached run's tokens equal a cold run's (with
    chunked prefill in chunks shorter than the window), and both equal transformers' greedy continuation."""
    hf = build(family.split("-")[0], **FAMILIES[family])
    hf.save_pretrained(tmp_path, safe_serialization=True)
    g = torch.Generator().manual_seed(11)
    shared = torch.randint(0, 512, (40,), generator=g).tolist()
    prompts = [shared + torch.randint(0, 512, (n,), generator=g).tolist() for n in (3, 17)]
    sp = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    cold = [LLM(str(tmp_path), dtype=torch.float64, num_blocks=64, block_size=8).generate([p], sp)[0].token_ids
            for p in prompts]
    llm = LLM(str(tmp_path), dtype=torch.float64, num_blocks=64, block_size=8, max_num_batched_tokens=12,
              max_num_seqs=4)
    warm = [llm.generate([p], sp)[0].token_ids for p in prompts]  # the second reuses the first's 40-token prefix
    assert llm.engine.scheduler.bm.hit_tokens >= 40
    assert warm == cold
    for p, got in zip(prompts, cold):
        with torch.no_grad():
            want = hf.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False)[0, len(p):].tolist()
        assert got == want


def test_other_architectures_are_named(tmp_path):
    build("mistral", **FAMILIES["mistral"]).save_pretrained(tmp_path, safe_serialization=True)
    import json
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(model_type="phi3", architectures=["Phi3ForCausalLM"])
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported architecture: model_type 'phi3'"):
        LLM(str(tmp_path))


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "gemma3"])
def test_family_tensor_parallel_equals_tp1(family, tmp_path):
    """The q/k/v biases split with their heads, the head norms whole on every rank."""
    build(family, **FAMILIES[family]).save_pretrained(tmp_path, safe_serialization=True)
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (7, 30)]
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    want = LLM(str(tmp_path), dtype=torch.float64, num_blocks=64, block_size=8).generate(prompts, sp)
    two = LLM(str(tmp_path), dtype=torch.float64, num_blocks=64, block_size=8, tensor_parallel_size=2)
    try:
        assert [o.token_ids for o in two.generate(prompts, sp)] == [o.token_ids for o in want]
    finally:
        two.engine.close()


# llama.cpp's Gemma 3: every 6th layer global, local layers at RoPE base 10000, the scale 1/sqrt(head_dim)
GGUF_GEMMA3 = dict(num_hidden_layers=6, head_dim=32, sliding_window=16, query_pre_attn_scalar=32,
                   layer_types=["sliding_attention"] * 5 + ["full_attention"], tie_word_embeddings=True)


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "gemma3"])
def test_family_gguf_matches_transformers(family, tmp_path):
    """The same model written as llama.cpp writes that architecture (its keys, its tensor names, q/k unpermuted,
    Gemma's norms as 1 + w)."""
    from sot_engine.engine.loader import load_model
    from tests.engine.test_loader import write_gguf
    hf = build(family, **(GGUF_GEMMA3 if family == "gemma3" else FAMILIES[family]))
    path = write_gguf(tmp_path / f"{family}.gguf", hf, {}, arch=family)
    loaded = load_model(str(path), dtype=torch.float64)
    ref = {k: v for k, v in hf.state_dict().items() if not k.endswith("rotary_emb.inv_freq")
           and not (k == "lm_head.weight" and hf.config.tie_word_embeddings)}
    assert set(loaded.weights) == set(ref)
    for k, w in loaded.weights.items():  # F32 in the file: equal to float32 rounding (Gemma's norms: 1 + w)
        want = ref[k] + 1 if family == "gemma3" and k.endswith("norm.weight") else ref[k]
        torch.testing.assert_close(w, want, rtol=0, atol=1e-6)
    eng = LLMEngine(str(path), device="cpu", dtype=torch.float64, num_blocks=64, block_size=8)
    assert (eng.config.qkv_bias, eng.config.qk_norm, eng.config.head_dim) == \
        (family == "qwen2", family != "qwen2", getattr(hf.config, "head_dim", None) or 128 // 4)
    if family == "gemma3":
        assert eng.config.local_layers == (True,) * 5 + (False,) and not eng.config.norm_offset
        loaded.weights = {k: w - 1 if k.endswith("norm.weight") else w for k, w in loaded.weights.items()}
    p = torch.randint(0, 512, (19,), generator=torch.Generator().manual_seed(2)).tolist()
    (logits,) = engine_logits(eng, [p], 5)
    full = p + [int(l.argmax()) for l in logits[:-1]]
    with torch.no_grad():  # the reference from the file's (float32-rounded) weights
        missing, _ = hf.load_state_dict({k: w.to(torch.float64) for k, w in loaded.weights.items()}, strict=False)
        assert all(k == "lm_head.weight" for k in missing), missing  # tied: the embedding's
        ref_logits = hf(torch.tensor([full])).logits[0]
    for step, l in enumerate(logits):
        assert rel_err(l, ref_logits[len(p) - 1 + step]) < 1e-5


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_windowed_float32_backends_match_the_reference(backend, tmp_path, monkeypatch):
    """float32, where the C++ kernels (the fused decode loop included) and Triton's run instead of the float64
    fallback: a windowed Mistral's logits past the window match the torch reference kernels."""
    if backend == "triton":
        pytest.importorskip("triton")  # on CPU its interpreter (tests/conftest.py sets TRITON_INTERPRET=1)
    build("mistral", **FAMILIES["mistral-window"]).save_pretrained(tmp_path, safe_serialization=True)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (23, 5)]
    runs = {}
    for name in ("torch", backend):
        try:
            eng = LLMEngine(str(tmp_path), device="cpu", dtype=torch.float32, num_blocks=64, block_size=8,
                            backend=name)
        except ValueError as e:  # the C++ extension not built
            pytest.skip(str(e))
        runs[name] = engine_logits(eng, prompts, 12)
    for want, got in zip(runs["torch"], runs[backend]):
        for a, b in zip(want, got):
            assert rel_err(b, a) < 1e-4
