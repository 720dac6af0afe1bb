"""Text <-> token ids, for GGUF metadata vocabularies and HF tokenizer folders.

Two backends, chosen by what the model ships:

* `tokenizers` (Rust) for byte-level BPE (GGUF `tokenizer.ggml.model == "gpt2"`: SmolLM2, LLaMA-3) and for
  any HF `tokenizer.json`.
* `sentencepiece` for sentencepiece vocabularies (GGUF `tokenizer.ggml.model == "llama"`: LLaMA-1/2, Vicuna;
  HF `tokenizer.model`). For GGUF we rebuild the sentencepiece `ModelProto` in memory from the pieces, scores
  and types the file stores. That runs sentencepiece's own BPE, so it is exact by construction, unlike a
  `tokenizers` BPE whose merges are re-derived from scores (what transformers' GGUF converter does).

Special tokens (control / unknown / user-defined) are always matched whole in the text, so a chat template's
`<|im_start|>` or `<s>` encodes to one id, as llama.cpp does with `parse_special`.

Decoding a prefix of a token stream never raises: an incomplete UTF-8 sequence comes back as U+FFFD, so a
streaming caller can decode growing id lists and hold back text that ends in "\ufffd".
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

log = logging.getLogger(__name__)

# GGUF / sentencepiece token types (the two enums agree).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# LLaMA-3's pre-tokenizer split (its tokenizer.json `Split` regex; llama.cpp's LLAMA3 pre type).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# `tokenizer.ggml.pre` names -> how the original tokenizer.json pre-tokenizes.
#   "digits": Digits(individual_digits=True) then ByteLevel with the GPT-2 regex (SmolLM/StarCoder family;
#             llama.cpp isolates every \p{N} before the GPT-2 regex for these).
#   "llama3": Split(LLAMA3_SPLIT) then ByteLevel without regex, BPE with ignore_merges.
# Anything else ("gpt-2", "default", unknown) gets plain GPT-2 ByteLevel: the byte-level BPE baseline.
_PRE_KIND = {**dict.fromkeys(["smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva"], "digits"),
             **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx"], "llama3")}


class _Backend(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int], skip_special_tokens: bool) -> str: ...
    def token_to_id(self, s: str) -> int | None: ...
    def id_to_token(self, i: int) -> str | None: ...
    def size(self) -> int: ...


class _HFBackend:
    """A `tokenizers.Tokenizer`; special/added tokens are split out by the library itself."""

    def __init__(self, tk: tokenizers.Tokenizer) -> None:
        self.tk = tk

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self.tk.decode(ids, skip_special_tokens=skip_special_tokens)  # ByteLevel/ByteFallback are lossy

    def token_to_id(self, s: str) -> int | None:
        return self.tk.token_to_id(s)

    def id_to_token(self, i: int) -> str | None:
        return self.tk.id_to_token(i)

    def size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)


class _SPBackend:
    """sentencepiece, plus splitting on control/unknown token text (sentencepiece itself only matches
    user-defined pieces). Each text segment gets sentencepiece's dummy prefix, like HF's legacy Llama
    tokenizer and llama.cpp (`<s>[INST]` -> `<s>`, `▁[`, ...), which is how LLaMA-2 chat was trained."""

    def __init__(self, sp: Any) -> None:
        self.sp = sp
        self.special = {i: sp.id_to_piece(i) for i in range(sp.get_piece_size())
                        if (sp.is_control(i) or sp.is_unknown(i)) and sp.id_to_piece(i)}
        texts = sorted(set(self.special.values()), key=len, reverse=True)
        self.split_re = re.compile("(" + "|".join(map(re.escape, texts)) + ")") if texts else None
        self.by_text = {p: i for i, p in self.special.items()}
        self._no_prefix: Any = None  # the same model without the dummy prefix, built on first use

    def encode_fragment(self, text: str) -> list[int]:
        if self._no_prefix is None:
            import sentencepiece as spm
            from sentencepiece import sentencepiece_model_pb2 as pb  # needs `protobuf`
            m = pb.ModelProto()
            m.ParseFromString(self.sp.serialized_model_proto())
            m.normalizer_spec.add_dummy_prefix = False
            self._no_prefix = spm.SentencePieceProcessor(model_proto=m.SerializeToString())
        return self._no_prefix.encode(text)

    def encode(self, text: str) -> list[int]:
        if not text:
            return []
        ids: list[int] = []
        for i, part in enumerate(self.split_re.split(text) if self.split_re else [text]):
            if i % 2:
                ids.append(self.by_text[part])
            elif part:
                ids.extend(self.sp.encode(part))
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        if skip_special_tokens:
            return self.sp.decode([i for i in ids if i not in self.special])
        out, run = [], []
        for i in ids:
            if i in self.special:
                out += [self.sp.decode(run), self.special[i]]
                run = []
            else:
                run.append(i)
        return "".join(out) + self.sp.decode(run)

    def token_to_id(self, s: str) -> int | None:
        i = self.sp.piece_to_id(s)
        return i if self.sp.id_to_piece(i) == s else None

    def id_to_token(self, i: int) -> str | None:
        return self.sp.id_to_piece(i) if 0 <= i < self.sp.get_piece_size() else None

    def size(self) -> int:
        return self.sp.get_piece_size()

    def piece_bytes(self) -> list[bytes]:
        sp, out = self.sp, []
        for i in range(sp.get_piece_size()):
            piece = sp.id_to_piece(i)
            if sp.is_byte(i):  # <0xNN>
                out.append(bytes([int(piece[3:-1], 16)]))
            elif sp.is_unused(i):
                out.append(b"")
            else:
                out.append(piece.replace("\u2581", " ").encode("utf-8"))
        return out


@dataclass(slots=True)
class DecodeState:
    """Where an incremental decode stands (vLLM's offsets): `text` decodes ids[:read_offset]; the next call
    decodes only from `prefix_offset` on."""
    text: str = ""
    prefix_offset: int = 0
    read_offset: int = 0


class Tokenizer:
    """Backend-independent tokenizer. `encode(..., add_special_tokens=True)` prepends BOS when the model
    wants it (`add_bos`), but never doubles one that the text (e.g. a chat template) already starts with."""

    def __init__(self, backend: _Backend, *, bos_token_id: int | None, eos_token_id: int | None,
                 add_bos: bool, special_ids: set[int]) -> None:
        self._b = backend
        self.bos_token_id, self.eos_token_id, self.add_bos = bos_token_id, eos_token_id, add_bos
        self.special_ids = set(special_ids)
        self.vocab_size = backend.size()

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = self._b.encode(text)
        bos = self.bos_token_id
        if add_special_tokens and self.add_bos and bos is not None and ids[:1] != [bos]:
            ids = [bos] + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._b.decode(list(ids), skip_special_tokens)

    def decode_more(self, ids: list[int], state: DecodeState, final: bool = False) -> str:
        """`decode(ids)` for a growing `ids`, in O(new tokens) a call instead of O(len(ids)); returns (and keeps
        in `state`) the text of every complete character so far. The new text is decode(window) minus
        decode(its head, the tokens decoded last time): both start at the same token, so leading-space rules
        treat them alike and the difference is what the whole decode adds. A window ending in half a multi-byte
        character waits for the rest, unless `final`."""
        head = self.decode(ids[state.prefix_offset:state.read_offset])
        window = self.decode(ids[state.prefix_offset:])
        if len(window) > len(head) and (final or not window.endswith("\ufffd")):
            state.text += window[len(head):]
            state.prefix_offset, state.read_offset = state.read_offset, len(ids)
        return state.text

    def token_texts(self) -> list[str]:
        """Each id's own text, decoded alone (computed once, in one batched call: ~25 ms for 49k BPE ids; Gemma 3's
        262k sentencepiece ids took 0.57 s one decode at a time)."""
        if "_texts" not in self.__dict__:
            ids = [[i] for i in range(self.vocab_size)]
            if isinstance(self._b, _HFBackend):
                self._texts = self._b.tk.decode_batch(ids, skip_special_tokens=False)
            elif isinstance(self._b, _SPBackend) and self.vocab_size <= self._b.sp.get_piece_size():
                self._texts = self._b.sp.decode(ids)  # what decode([i]) gives, but for the special pieces
                for i, text in self._b.special.items():
                    self._texts[i] = text
            else:
                self._texts = [self.decode([i], skip_special_tokens=False) for i in range(self.vocab_size)]
        return self._texts

    def ids_containing(self, char: str) -> list[int]:
        """The ids whose own text holds `char` (e.g. every token that writes a newline). Kept per char: a scan of
        the vocabulary costs ~4 ms, and a SoT answer asks once per point."""
        found = self.__dict__.setdefault("_containing", {})
        if char not in found:
            found[char] = [i for i, t in enumerate(self.token_texts()) if char in t]
        return list(found[char])

    def token_to_id(self, s: str) -> int | None:
        return self._b.token_to_id(s)

    def id_to_token(self, i: int) -> str | None:
        return self._b.id_to_token(i)

    @property
    def hf_tokenizer(self) -> tokenizers.Tokenizer | None:
        """The `tokenizers.Tokenizer` behind a BPE / tokenizer.json vocabulary; None for sentencepiece."""
        return self._b.tk if isinstance(self._b, _HFBackend) else None

    def piece_bytes(self) -> list[bytes]:
        """A sentencepiece vocabulary's pieces as the bytes they add to the text (`\u2581` a space, `<0xNN>` that
        byte, unused pieces nothing; control pieces their own text): what a grammar library needs. A `tokenizers`
        vocabulary is read from its JSON instead (`hf_tokenizer`)."""
        if not isinstance(self._b, _SPBackend):
            raise ValueError("piece_bytes is for sentencepiece vocabularies; use hf_tokenizer")
        return self._b.piece_bytes()

    def encode_fragment(self, text: str) -> list[int]:
        """Ids for text in the middle of a sequence: sentencepiece's dummy prefix (a space before the text) left
        out. What a grammar library tokenizes forced text with."""
        return self._b.encode_fragment(text) if isinstance(self._b, _SPBackend) else self._b.encode(text)

    @property
    def bos_token(self) -> str | None:
        return None if self.bos_token_id is None else self.id_to_token(self.bos_token_id)

    @property
    def eos_token(self) -> str | None:
        return None if self.eos_token_id is None else self.id_to_token(self.eos_token_id)

    # ---- constructors -------------------------------------------------------------------------------
    @classmethod
    def from_gguf(cls, reader: Any) -> "Tokenizer":
        """From a `gguf.GGUFReader`'s `tokenizer.ggml.*` metadata."""
        meta = lambda key, default=None: reader.fields[key].contents() if key in reader.fields else default  # noqa: E731
        kind = meta("tokenizer.ggml.model")
        tokens: list[str] = meta("tokenizer.ggml.tokens") or []
        if not tokens:
            raise ValueError("GGUF has no tokenizer.ggml.tokens")
        types = meta("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
        bos, eos = meta("tokenizer.ggml.bos_token_id"), meta("tokenizer.ggml.eos_token_id")
        if kind == "gpt2":
            backend: _Backend = _HFBackend(_bpe_from_gguf(tokens, types, meta("tokenizer.ggml.merges") or [],
                                                          meta("tokenizer.ggml.pre", "default")))
            special = {i for i, t in enumerate(types) if t == CONTROL}
            add_bos = bool(meta("tokenizer.ggml.add_bos_token", False))
        elif kind == "llama":
            backend = _SPBackend(_sp_from_gguf(tokens, types, meta("tokenizer.ggml.scores"), meta))
            special = set(backend.special)
            add_bos = bool(meta("tokenizer.ggml.add_bos_token", True))  # llama.cpp's default for SPM vocabs
        else:
            raise ValueError(f"unsupported GGUF tokenizer model {kind!r} (supported: 'gpt2', 'llama')")
        return cls(backend, bos_token_id=bos, eos_token_id=eos, add_bos=add_bos, special_ids=special)

    @classmethod
    def from_hf_folder(cls, path: str | Path) -> "Tokenizer":
        """From an HF model folder: `tokenizer.json`, else `tokenizer.model` (sentencepiece)."""
        path = Path(path)
        cfg = {n: _read_json(path / n) for n in ("tokenizer_config.json", "special_tokens_map.json", "config.json")}
        tc = cfg["tokenizer_config.json"]
        if (path / "tokenizer.json").is_file():
            tk = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
            backend: _Backend = _HFBackend(tk)
            special = {i for i, t in tk.get_added_tokens_decoder().items() if t.special}
        elif (path / "tokenizer.model").is_file():
            import sentencepiece as spm
            backend = _SPBackend(spm.SentencePieceProcessor(model_file=str(path / "tokenizer.model")))
            special = set(backend.special)
        else:
            raise FileNotFoundError(f"{path}: no tokenizer.json or tokenizer.model")
        bos = _special_id(backend, cfg, "bos")
        eos = _special_id(backend, cfg, "eos")
        if "add_bos_token" in tc:
            add_bos = bool(tc["add_bos_token"])
        elif isinstance(backend, _HFBackend):  # the post-processor decides; ask it
            add_bos = bos is not None and bos in backend.tk.encode("", add_special_tokens=True).ids
        else:
            add_bos = True  # sentencepiece LLaMA default
        return cls(backend, bos_token_id=bos, eos_token_id=eos, add_bos=add_bos, special_ids=special)


def _bpe_from_gguf(tokens: list[str], types: list[int], merges: list[str], pre: str) -> tokenizers.Tokenizer:
    kind = _PRE_KIND.get(pre)
    if kind is None and pre not in ("gpt-2", "gpt2", "default"):
        log.warning("unknown tokenizer.ggml.pre %r: using the GPT-2 byte-level pre-tokenizer", pre)
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                     merges=[tuple(m.split(" ", 1)) for m in merges], ignore_merges=kind == "llama3")
    tk = tokenizers.Tokenizer(bpe)
    if kind == "llama3":
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif kind == "digits":
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    # CONTROL -> special (skipped when decoding), USER_DEFINED -> plain added token; both matched whole.
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, ty in zip(tokens, types) if ty == CONTROL])
    tk.add_tokens([AddedToken(t, special=False, normalized=False)
                   for t, ty in zip(tokens, types) if ty == USER_DEFINED])
    return tk


def _sp_from_gguf(tokens: list[str], types: list[int], scores: list[float] | None, meta: Any) -> Any:
    """A sentencepiece BPE processor rebuilt from GGUF pieces (LLaMA's normalizer: identity, dummy prefix,
    whitespace kept)."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb  # needs `protobuf`

    m = pb.ModelProto()
    scores = scores or [0.0] * len(tokens)
    for tok, score, ty in zip(tokens, scores, types):
        m.pieces.add(piece=tok, score=score, type=ty)
    ts = m.trainer_spec
    ts.model_type = pb.TrainerSpec.BPE
    ts.byte_fallback = BYTE in types
    ids = {k: meta(f"tokenizer.ggml.{k}_token_id") for k in ("unknown", "bos", "eos", "padding")}
    ts.unk_id = ids["unknown"] if ids["unknown"] is not None else types.index(UNKNOWN) if UNKNOWN in types else 0
    for attr, key in (("bos_id", "bos"), ("eos_id", "eos"), ("pad_id", "padding")):
        setattr(ts, attr, ids[key] if ids[key] is not None else -1)
    for attr, key in (("unk_piece", "unk_id"), ("bos_piece", "bos_id"), ("eos_piece", "eos_id"), ("pad_piece", "pad_id")):
        if 0 <= getattr(ts, key) < len(tokens):
            setattr(ts, attr, tokens[getattr(ts, key)])
    ns = m.normalizer_spec
    ns.name = "identity"
    ns.add_dummy_prefix = bool(meta("tokenizer.ggml.add_space_prefix", True))
    ns.remove_extra_whitespaces = False
    ns.escape_whitespaces = True
    return spm.SentencePieceProcessor(model_proto=m.SerializeToString())


def _read_json(p: Path) -> dict[str, Any]:
    return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}


def _special_id(backend: _Backend, cfg: dict[str, dict[str, Any]], name: str) -> int | None:
    """bos/eos id: the token string from tokenizer_config / special_tokens_map, else config.json's id,
    else sentencepiece's own."""
    for f in ("tokenizer_config.json", "special_tokens_map.json"):
        tok = cfg[f].get(f"{name}_token")
        tok = tok.get("content") if isinstance(tok, dict) else tok
        if isinstance(tok, str) and (i := backend.token_to_id(tok)) is not None:
            return i
    i = cfg["config.json"].get(f"{name}_token_id")
    if isinstance(i, list):
        i = i[0] if i else None
    if i is None and isinstance(backend, _SPBackend):
        i = getattr(backend.sp, f"{name}_id")()
        i = None if i < 0 else i
    return i
