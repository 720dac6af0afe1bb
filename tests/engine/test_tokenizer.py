"""Tokenizers against independent references: transformers' GGUF tokenizer, and sentencepiece itself."""
from __future__ import annotations

import json
import random
from pathlib import Path

import gguf
import pytest

from conftest import requires_smollm2, smollm2_gguf
from sot_engine.engine.tokenizer import BYTE, CONTROL, NORMAL, UNKNOWN, UNUSED, USER_DEFINED, Tokenizer

TEXTS = [
    "", "Hello world", "12345", "x 12 y", "I'm   ok. It's 3.14159!", "héllo wörld ñandú", "日本語のテキストです",
    "emoji 🤖🎉👍🏽 family 👨‍👩‍👧", "def f(x):\n    return x**2  # square\n", "a\t\tb\n\n\nc    d  ", " leading space",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "<|im_start|><|im_end|><|endoftext|>", "\u00a0nbsp\u200bzw",
    "Ünïcödé Ελληνικά русский العربية", "{\"json\": [1, 2.5, null]}", "$1,000,000 + 2^10 = 1024",
]


# ---- SmolLM2 (byte-level BPE from GGUF metadata) vs transformers ------------------------------------------------
@pytest.fixture(scope="module")
def smol():
    path = smollm2_gguf()
    if path is None:
        pytest.skip("embedded model not installed")
    from transformers import AutoTokenizer
    ours = Tokenizer.from_gguf(gguf.GGUFReader(path))
    return ours, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@requires_smollm2
def test_smollm2_matches_transformers(smol):
    ours, ref = smol
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False), text
        assert ours.decode(ids, skip_special_tokens=False) == text
        assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False)
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), text


@requires_smollm2
def test_smollm2_digit_pretokenizer(smol):
    """SmolLM2's tokenizer.json (GGUF pre "smollm") isolates digits before the GPT-2 regex; transformers'
    GGUF loader skips that step, which shows on whitespace before a digit. We follow the original."""
    from tokenizers import Tokenizer as HFTokenizer, pre_tokenizers
    ours, ref = smol
    assert ours.encode("  1") == [ours.token_to_id("ĠĠ"), ours.token_to_id("1")]
    assert ref.encode("  1", add_special_tokens=False) != ours.encode("  1")  # transformers' divergence
    backend = HFTokenizer.from_str(ref.backend_tokenizer.to_str())  # a copy: leave the fixture alone
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    for text in TEXTS + ["  1", "a  2b", "\n\n3", "x\t 45"]:
        assert ours.encode(text) == backend.encode(text, add_special_tokens=False).ids, text


@requires_smollm2
def test_smollm2_specials_and_attrs(smol):
    ours, _ = smol
    assert ours.encode("<|im_start|>") == [1] and ours.encode("<|im_end|>") == [2]
    assert (ours.bos_token_id, ours.eos_token_id, ours.add_bos, ours.vocab_size) == (1, 2, False, 49152)
    assert ours.special_ids == set(range(17)) and ours.token_to_id("<|endoftext|>") == 0
    assert ours.token_to_id("no-such-token") is None and ours.bos_token == "<|im_start|>"
    assert ours.encode("Hi", add_special_tokens=True) == ours.encode("Hi")  # add_bos is False for SmolLM2
    assert ours.decode(ours.encode("<|im_start|>user\nHi<|im_end|>")) == "user\nHi"


@requires_smollm2
def test_streaming_decode_prefixes(smol):
    ours, _ = smol
    text = "Zürich 🤖 日本 👨‍👩‍👧!"
    ids = ours.encode(text)
    outs = [ours.decode(ids[:n]) for n in range(len(ids) + 1)]  # must never raise on split UTF-8
    assert outs[-1] == text and any("\ufffd" in o for o in outs)
    for o in outs:
        assert text.startswith(o.rstrip("\ufffd"))


def test_hf_tokenizer_json_folder(smol, tmp_path):
    ours, ref = smol
    ref.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg.pop("add_bos_token", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = Tokenizer.from_hf_folder(tmp_path)
    assert (tok.bos_token_id, tok.eos_token_id, tok.add_bos) == (1, 2, False)  # add_bos probed from post-processor
    assert tok.special_ids >= {0, 1, 2} and tok.vocab_size == 49152
    for text in TEXTS:
        assert tok.encode(text) == ref.encode(text, add_special_tokens=False), text
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == text


# ---- sentencepiece: a tiny BPE model trained here ---------------------------------------------------------------
def _corpus(n: int = 3000) -> str:
    rng = random.Random(0)
    syll = ["ka", "lo", "mi", "tre", "sun", "an", "the", "ing", "er", "qu", "zz", "é", "ö"]
    words = ["".join(rng.choice(syll) for _ in range(rng.randint(1, 4))) for _ in range(400)]
    return "\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + rng.choice([".", "!", " 42", ""])
                     for _ in range(n))


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> Path:
    import sentencepiece as spm
    d = tmp_path_factory.mktemp("sp")
    (d / "corpus.txt").write_text(_corpus(), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"), model_prefix=str(d / "sp"), model_type="bpe", vocab_size=320,
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, user_defined_symbols=["<tool>"],
        character_coverage=1.0, minloglevel=2)
    return d / "sp.model"


SP_TEXTS = ["", "kalo mitre sunan", "the qu zzing érö", "  two  spaces  ", "new\nline\ttab", "digits 4242 and 7",
            "unseen XYZ glyphs 日本 🤖", "<tool> user defined <tool>x", "ünïcödé"]


@pytest.fixture(scope="module")
def sp_proc(sp_model):
    import sentencepiece as spm
    return spm.SentencePieceProcessor(model_file=str(sp_model))


def test_sentencepiece_hf_folder(sp_model, sp_proc, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(sp_model.read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    tok = Tokenizer.from_hf_folder(tmp_path)
    _check_sp(tok, sp_proc)


def test_sentencepiece_from_gguf_llama_vocab(sp_proc, tmp_path):
    """A GGUF 'llama' vocabulary (pieces, scores, types) rebuilt into sentencepiece: same ids as the original."""
    sp = sp_proc
    n = sp.get_piece_size()

    def kind(i: int) -> int:
        for pred, t in ((sp.is_unknown, UNKNOWN), (sp.is_control, CONTROL), (sp.is_byte, BYTE),
                        (sp.is_unused, UNUSED)):
            if pred(i):
                return t
        return USER_DEFINED if sp.id_to_piece(i) == "<tool>" else NORMAL

    w = gguf.GGUFWriter(str(tmp_path / "vocab.gguf"), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list([sp.id_to_piece(i) for i in range(n)])
    w.add_token_scores([sp.get_score(i) for i in range(n)])
    w.add_token_types([kind(i) for i in range(n)])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_space_prefix(True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    tok = Tokenizer.from_gguf(gguf.GGUFReader(tmp_path / "vocab.gguf"))
    _check_sp(tok, sp)


def _check_sp(tok: Tokenizer, sp) -> None:
    assert (tok.bos_token_id, tok.eos_token_id, tok.add_bos, tok.vocab_size) == (1, 2, True, sp.get_piece_size())
    assert tok.special_ids == {0, 1, 2}
    for text in SP_TEXTS:
        ids = tok.encode(text)
        assert ids == sp.encode(text), text
        assert tok.decode(ids) == sp.decode(ids) == text
    assert any(sp.is_byte(i) for i in tok.encode("🤖"))  # byte fallback exercised
    # control-token text is matched whole, and each text segment gets the dummy prefix (LLaMA-2 chat style)
    assert tok.encode("<s>kalo</s>") == [1] + sp.encode("kalo") + [2]
    assert tok.decode(tok.encode("<s>kalo</s>"), skip_special_tokens=False) == "<s>kalo</s>"
    assert tok.encode("kalo", add_special_tokens=True) == [1] + sp.encode("kalo")
    assert tok.encode("<s>kalo", add_special_tokens=True) == [1] + sp.encode("kalo")  # no double BOS
    assert tok.token_to_id("<s>") == 1 and tok.token_to_id("definitely-not-a-piece") is None
    rng = random.Random(6)  # incremental decoding: the dummy-prefix space and byte pieces, as the whole decode
    for text in SP_TEXTS + ["🤖 kalo", "kalo\n\n  mi"]:
        _check_decode_more(tok, tok.encode(text))
    for _ in range(20):
        _check_decode_more(tok, [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 30))])
    ids = tok.encode("a 🤖 b")
    for k in range(len(ids) + 1):  # partial byte sequences decode without raising
        assert isinstance(tok.decode(ids[:k]), str)
    # the vocabulary as bytes (what a grammar library reads): a fragment's pieces spell exactly its UTF-8 bytes
    pieces = tok.piece_bytes()
    assert len(pieces) == sp.get_piece_size() and tok.hf_tokenizer is None
    # each id's own text, computed in one batched call: what decoding it alone gives, special pieces included
    assert tok.token_texts() == [tok.decode([i], skip_special_tokens=False) for i in range(tok.vocab_size)]
    assert tok.token_texts()[1] == "<s>" and tok.ids_containing("<s>") == [1]
    for text in SP_TEXTS[1:]:
        ids = tok.encode_fragment(text)
        assert b"".join(pieces[i] for i in ids) == text.encode(), text
        assert ids != tok.encode(text)  # encode() adds the dummy prefix


def test_llama3_pretokenizer_gguf(smol, tmp_path):
    """The LLaMA-3 path (pre "llama-bpe": split regex, then byte-level without regex), on the first 4000 tokens
    of SmolLM2's vocab re-labelled, against transformers' GGUF tokenizer for that file (same split regex)."""
    from transformers import AutoTokenizer
    ours_smol, ref_smol = smol
    vocab = ref_smol.backend_tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)[:4000]
    keep = set(tokens)
    merges = [f"{a} {b}" for a, b in json.loads(ref_smol.backend_tokenizer.to_str())["model"]["merges"]
              if a in keep and b in keep and a + b in keep]
    w = gguf.GGUFWriter(str(tmp_path / "l3.gguf"), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types([CONTROL if i < 17 else NORMAL for i in range(len(tokens))])
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    ours = Tokenizer.from_gguf(gguf.GGUFReader(tmp_path / "l3.gguf"))
    ref = AutoTokenizer.from_pretrained(tmp_path, gguf_file="l3.gguf")
    assert ours.add_bos and ours.encode("Hi", add_special_tokens=True)[0] == 1
    for text in TEXTS + ["  1", "12345678", "I'LL DO it's"]:
        assert ours.encode(text) == ref.encode(text, add_special_tokens=False), text
    assert ours.encode("  1") != ours_smol.encode("  1")  # the split differs from SmolLM2's


def _check_decode_more(tok, ids: list[int]) -> None:
    """decode_more over a growing list == decode of the whole list: exactly at the end, and before it for every
    prefix whose decode ends on a complete character."""
    from sot_engine.engine.tokenizer import DecodeState
    st = DecodeState()
    for n in range(1, len(ids) + 1):
        text, whole = tok.decode_more(ids[:n], st, final=n == len(ids)), tok.decode(ids[:n])
        if n == len(ids) or not whole.endswith("\ufffd"):
            assert text == whole, (ids[:n], text, whole)
        else:
            assert whole.startswith(text)


@requires_smollm2
def test_smollm2_decode_more_equals_whole_decode(smol):
    ours, _ = smol
    rng = random.Random(5)
    for text in TEXTS + ["Zürich 🤖 日本 👨‍👩‍👧!", "  leading spaces\n\n and  gaps", "<|im_start|>x<|im_end|> y"]:
        _check_decode_more(ours, ours.encode(text))
    for _ in range(20):  # arbitrary ids: split UTF-8, stray continuation bytes, special tokens
        _check_decode_more(ours, [rng.randrange(ours.vocab_size) for _ in range(rng.randint(1, 40))])
