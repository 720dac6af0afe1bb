"""Structured output: a JSON schema or a grammar becomes a per-step token mask, so even a tiny model returns valid
JSON, or a skeleton in the form SoT needs.

The grammar work is llguidance's (Rust; no torch dependency): it reads our vocabulary (a `tokenizers` JSON, or the
byte strings of a sentencepiece vocabulary), compiles a JSON schema or a Lark grammar and, per step, says which
tokens may come next. It is imported on the first guided request only, so unguided use pays nothing.

Per engine, one `GuidedDecoder`: the library's tokenizer view (built once, lazily: ~1 s for a 49k vocabulary) and
each distinct schema compiled once (a server sends the same schema with many parallel requests). Per sequence,
one `Matcher`: a copy of the compiled grammar that the sampled tokens advance.
"""
from __future__ import annotations

import json
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from sot_engine.engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)

INSTALL_HINT = "structured output needs llguidance (a dependency of sot-engine): pip install llguidance"
# One line of JSON, ", " and ": " between items: no run of whitespace for a small model to loop in. A schema's
# own "x-guidance" options override these.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


# JSON Schema keywords whose value is a subschema, a list of them, or a map of name -> subschema (draft 2020-12)
_SUB = ("additionalProperties", "items", "contains", "not", "if", "then", "else", "propertyNames",
        "unevaluatedItems", "unevaluatedProperties", "additionalItems")
_SUB_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUB_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def closed_schema(schema: object) -> object:
    """A copy of `schema` in which every object schema that declares `properties` (or `patternProperties`) and says
    nothing of `additionalProperties` accepts no other keys: OpenAI's strict structured output and vLLM's default
    (xgrammar) read schemas so. Plain JSON Schema leaves such objects open, and a small model then fills them with
    keys of its own (pydantic's schemas never say `additionalProperties`). Walks subschemas by keyword, so a
    property that happens to be named "properties" stays a property."""
    if isinstance(schema, list):  # e.g. "items": [...] (draft 4 tuples)
        return [closed_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for k in _SUB:
        if isinstance(out.get(k), (dict, list)):
            out[k] = closed_schema(out[k])
    for k in _SUB_LISTS:
        if isinstance(out.get(k), list):
            out[k] = [closed_schema(s) for s in out[k]]
    for k in _SUB_MAPS:
        if isinstance(out.get(k), dict):
            out[k] = {name: closed_schema(s) for name, s in out[k].items()}
    if ("properties" in out or "patternProperties" in out) and "additionalProperties" not in out \
            and "unevaluatedProperties" not in out:
        out["additionalProperties"] = False
    return out


@dataclass(slots=True)
class GuidedDecoding:
    """Constrain a request's output: to a JSON schema (`json_schema`, OpenAI's `response_format` "json_schema" or a
    forced tool call's parameters), to any JSON object (`json_object=True`, OpenAI's "json_object"), or to a Lark
    grammar in llguidance's dialect (`grammar`, its `start` rule). Exactly one.

    `strict` (the default) reads a JSON schema as OpenAI's strict mode and vLLM do: objects with declared properties
    take no others unless the schema says `additionalProperties` (`closed_schema`). `strict=False` keeps plain JSON
    Schema's open objects. Whitespace is always compact (`JSON_OPTIONS`)."""
    json_schema: dict | None = None
    json_object: bool = False
    grammar: str | None = None
    strict: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.json_object, bool):
            raise ValueError(f"bad guided decoding: json_object must be a bool, got {self.json_object!r}")
        if self.json_schema is not None and not isinstance(self.json_schema, dict):
            raise ValueError(f"bad guided decoding: json_schema must be a dict (a JSON schema), "
                             f"got {type(self.json_schema).__name__}")
        if self.grammar is not None and (not isinstance(self.grammar, str) or not self.grammar.strip()):
            raise ValueError("bad guided decoding: grammar must be a non-empty string (a Lark grammar)")
        if not isinstance(self.strict, bool):
            raise ValueError(f"bad guided decoding: strict must be a bool, got {self.strict!r}")
        if (self.json_schema is not None) + self.json_object + (self.grammar is not None) != 1:
            raise ValueError("bad guided decoding: set exactly one of json_schema, json_object and grammar")
        self.key()  # not JSON (a set, an object): say so now

    def key(self) -> str:
        """The grammar's source and its cache key: the Lark text, or the schema as compact JSON (key order is kept:
        it is the order the properties are generated in)."""
        if self.grammar is not None:
            return "lark:" + self.grammar
        if self.json_object:
            return '{"type":"object"}'
        schema = closed_schema(self.json_schema) if self.strict else self.json_schema
        try:
            return json.dumps(schema, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ValueError(f"bad guided decoding: json_schema is not JSON: {e}") from None


class Matcher:
    """One sequence's place in its grammar. Advanced only by tokens appended to the sequence, so a preempted
    sequence (recomputed from its tokens) resumes exactly where it was."""
    __slots__ = ("m",)

    def __init__(self, m: Any) -> None:
        self.m = m  # llguidance.LLMatcher

    def accept(self, token: int) -> bool:
        """Advance over a sampled token; False (and `error` set) if the grammar rejects it."""
        return bool(self.m.consume_token(token))

    @property
    def done(self) -> bool:
        """The grammar is complete: nothing but EOS may follow (the request finishes with "stop")."""
        return bool(self.m.is_stopped())


    @property
    def error(self) -> str | None:
        return (self.m.get_error() or "grammar error") if self.m.is_error() else None


class GuidedDecoder:
    """Compiles schemas and masks logits for one engine. `vocab_size` is the model's logits width; ids at or past the
    tokenizer's own size (padding rows of the embedding) are never allowed."""

    def __init__(self, tokenizer: "Tokenizer | None", eos_ids: set[int], vocab_size: int,
                 cache_size: int = 256) -> None:
        self.tokenizer, self.vocab_size, self.cache_size = tokenizer, vocab_size, cache_size
        self.eos_ids = sorted(eos_ids)
        self._ll = None  # llguidance.LLTokenizer, built by the first guided request
        self._executor = None
        self._compiled: OrderedDict[str, Any] = OrderedDict()  # schema key -> a fresh LLMatcher to copy (LRU)

    def _lib(self) -> Any:
        try:
            import llguidance
        except ImportError:
            raise ValueError(INSTALL_HINT) from None
        if self._ll is None:
            if self.tokenizer is None:
                raise ValueError("guided decoding needs a model with a tokenizer")
            try:
                self._ll = ll_tokenizer(self.tokenizer, self.eos_ids)
            except Exception as e:  # noqa: BLE001 -- the library's own error types; the request is what fails
                raise ValueError(f"llguidance cannot read this model's vocabulary: {type(e).__name__}: {e}") from e
            self._executor = llguidance.LLExecutor()
        return llguidance

    def compile(self, g: GuidedDecoding) -> Any:
        """The compiled grammar for `g` (cached); ValueError naming the problem if the schema cannot compile."""
        key = g.key()
        if key in self._compiled:
            self._compiled.move_to_end(key)
            return self._compiled[key]
        llg = self._lib()
        what = "grammar" if g.grammar is not None else "JSON schema"
        try:
            grammar = llg.LLMatcher.grammar_from_lark(g.grammar) if g.grammar is not None else \
                llg.LLMatcher.grammar_from_json_schema(key, defaults=JSON_OPTIONS)
        except ValueError as e:
            raise ValueError(f"bad {what}: {e}") from None
        m = llg.LLMatcher(self._ll, grammar, log_level=0, limits=llg.LLParserLimits(verbose_errors=False))
        if m.is_error():
            raise ValueError(f"bad {what}: {m.get_error()}")
        for w in m.get_grammar_warnings():
            log.warning("%s: %s", what, w)
        self._compiled[key] = m
        if len(self._compiled) > self.cache_size:
            self._compiled.popitem(last=False)
        return m

    def matcher(self, g: GuidedDecoding) -> Matcher:
        return Matcher(self.compile(g).deep_copy())

    def allows(self, matcher: Matcher, token: int) -> bool:
        """Would the grammar take `token` next? Checked without advancing it: microseconds, not a whole mask. Ids
        past the tokenizer's own (padding rows of the embedding) never."""
        m = matcher.m
        return 0 <= token < self._ll.vocab_size and not m.is_error() and m.validate_tokens([token]) == 1

    def allowed(self, matchers: list[Matcher]) -> torch.Tensor:
        """[len(matchers), vocab_size] bool: the tokens each matcher accepts next."""
        return torch.from_numpy(self._allowed(matchers))

    def _allowed(self, matchers: list[Matcher]) -> np.ndarray:
        # numpy, not torch: single-threaded, so a 49k-wide mask costs microseconds even on a busy CPU
        n_tok = self._ll.vocab_size
        words = (n_tok + 31) // 32
        packed = np.zeros((len(matchers), words), dtype=np.int32)
        self._executor.unsafe_compute_mask_ptr([(mt.m, i) for i, mt in enumerate(matchers)],
                                               packed.ctypes.data, words * 4, len(matchers))
        bits = np.unpackbits(packed.view(np.uint8), axis=1, bitorder="little")  # bit k of word w: id 32w+k
        out = np.zeros((len(matchers), self.vocab_size), dtype=bool)
        n = min(n_tok, self.vocab_size)
        out[:, :n] = bits[:, :n]  # ids past the tokenizer's (padding rows of the embedding) stay False
        return out

    def apply(self, logits: torch.Tensor, rows: list[int], matchers: list[Matcher]) -> None:
        """Mask `logits[rows[i]]` in place to what `matchers[i]` accepts. A matcher in error (its mask would allow
        nothing, and an all -inf row breaks sampling) is left unmasked: its next token fails `accept`, which ends
        that request alone."""
        keep = [i for i, mt in enumerate(matchers) if not mt.m.is_error()]
        if not keep:
            return
        allowed = self._allowed([matchers[i] for i in keep])
        allowed[~allowed.any(axis=1)] = True  # the mask itself hit an error: same as above
        if logits.device.type == "cpu":  # in place through numpy, row by row: no gather and scatter of [B, V]
            lv = logits.numpy()
            for i, ok in zip(keep, allowed):
                np.putmask(lv[rows[i]], ~ok, -np.inf)
            return
        blocked = torch.from_numpy(~allowed).to(logits.device)
        idx = torch.tensor([rows[i] for i in keep], device=logits.device)
        logits[idx] = logits[idx].masked_fill(blocked, float("-inf"))


def ll_tokenizer(tok: "Tokenizer", eos_ids: list[int]) -> Any:
    """llguidance's view of our vocabulary. A `tokenizers` vocabulary (byte-level BPE from GGUF, any tokenizer.json)
    goes over whole as its JSON, which the library reads itself; a sentencepiece one as each id's bytes, special
    pieces marked with the library's 0xFF prefix so that plain text never produces them."""
    import llguidance
    eos = [i for i in eos_ids if 0 <= i < tok.vocab_size] or None
    if tok.hf_tokenizer is not None:
        return llguidance.LLTokenizer(tok.hf_tokenizer.to_str(), n_vocab=tok.vocab_size, eos_token=eos)
    pieces = tok.piece_bytes()
    special = sorted(tok.special_ids)
    for i in special:
        pieces[i] = b"\xff" + pieces[i]

    class _Vocab:  # what llguidance.TokenizerWrapper reads
        eos_token_id = eos[0] if eos else None
        bos_token_id = tok.bos_token_id
        tokens = pieces
        special_token_ids = special

        def __call__(self, s: bytes) -> list[int]:
            return tok.encode_fragment(s.decode("utf-8", errors="replace"))

    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Vocab()), n_vocab=tok.vocab_size, eos_token=eos)
