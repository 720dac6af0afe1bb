"""Structured output: every guided output parses and validates (pydantic, independent of the grammar library);
unguided requests beside it are untouched; bad schemas are refused before anything runs."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import pytest
import torch
from pydantic import BaseModel, ConfigDict, Field

from conftest import make_hf_model, requires_smollm2, save_hf
from sot_engine.engine import LLM, GuidedDecoding, SamplingParams
from sot_engine.engine.config import shape

pytest.importorskip("llguidance")
TINY = {"dtype": torch.float32, "num_threads": 1}  # a 128-wide model: a second torch thread only waits


@pytest.fixture(autouse=True, scope="module")
def _restore_torch_threads():
    n = torch.get_num_threads()  # LLM(num_threads=...) sets the process-wide count
    yield
    torch.set_num_threads(n)


class Point(BaseModel):
    model_config = ConfigDict(extra="forbid")
    index: int = Field(ge=1, le=9)
    point: str = Field(max_length=40)


class Points(BaseModel):
    model_config = ConfigDict(extra="forbid")
    points: list[Point] = Field(min_length=2, max_length=3)


class Answer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    answer: str = Field(max_length=40)


class Short(BaseModel):  # for random-weight models: every field bounded, so any path through it ends
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=8)
    n: int = Field(ge=0, le=99)
    ok: bool
    tags: list[Annotated[str, Field(max_length=6)]] = Field(min_length=1, max_length=2)


def guided(model: type[BaseModel]) -> GuidedDecoding:
    return GuidedDecoding(json_schema=model.model_json_schema())


BAD_SCHEMAS = [
    ({"type": "nope"}, "Invalid type"),
    ({"type": "array", "minItems": 3, "maxItems": 1}, "minItems"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "missing"),
    ({"type": "string", "pattern": "(unclosed"}, "regex"),
]


# ---- parameters -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    ({}, "exactly one"), ({"json_schema": {"type": "object"}, "json_object": True}, "exactly one"),
    ({"json_schema": '{"type": "object"}'}, "must be a dict"), ({"json_object": 1}, "must be a bool"),
    ({"json_schema": {"enum": {1, 2}}}, "not JSON"), ({"json_schema": {"maximum": float("nan")}}, "not JSON"),
    ({"grammar": ""}, "non-empty string"), ({"grammar": 3}, "non-empty string"),
    ({"grammar": "start: A", "json_object": True}, "exactly one"),
])
def test_bad_guided_decoding(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GuidedDecoding(**kwargs)


def test_sampling_params_checks_guided():
    with pytest.raises(ValueError, match="guided must be a GuidedDecoding"):
        SamplingParams(guided={"type": "object"})
    assert SamplingParams(guided=GuidedDecoding(json_object=True)).guided.json_object


# ---- SmolLM2: real outputs --------------------------------------------------------------------------------------
def chat(q: str) -> list[dict]:
    return [{"role": "user", "content": q}]


POINTS_Q = chat('Give three short tips for better sleep. Reply with JSON: {"points": [{"index": 1, "point": "..."}, ...]}')
ANSWER_Q = chat('What is the capital of France? Reply with JSON: {"answer": "..."}')
OBJECT_Q = chat("What is the capital of France? Reply with a JSON object.")
PLAIN_Q = [chat("Name a fruit."), chat("Count to five.")]
PLAIN = [SamplingParams(temperature=0, max_tokens=12), SamplingParams(temperature=0.8, seed=5, max_tokens=12)]


@pytest.fixture(scope="module")
def smol_batch(smollm2):
    """One batch: each schema greedy and with two seeds, json_object mode, and two unguided requests."""
    llm = smollm2.llm
    reqs = []
    for q, g in ((POINTS_Q, guided(Points)), (ANSWER_Q, guided(Answer)), (OBJECT_Q, GuidedDecoding(json_object=True))):
        reqs += [(q, SamplingParams(temperature=0, max_tokens=120, guided=g))]
        reqs += [(q, SamplingParams(temperature=0.8, seed=s, max_tokens=120, guided=g)) for s in (1, 2)]
    reqs += list(zip(PLAIN_Q, PLAIN))
    outs = llm.generate([q for q, _ in reqs], [p for _, p in reqs])
    return {"points": outs[0:3], "answer": outs[3:6], "object": outs[6:9], "plain": outs[9:]}


@requires_smollm2
@pytest.mark.parametrize("name, model", [("points", Points), ("answer", Answer)])
def test_smollm2_schema_outputs_validate(smollm2, smol_batch, name, model):
    for out in smol_batch[name]:  # greedy, seed 1, seed 2
        assert out.finish_reason == "stop", f"did not complete in max_tokens: {out.text!r}"
        model.model_validate_json(out.text)  # raises on invalid JSON or a schema violation
        assert out.token_ids[-1] not in smollm2.llm.engine.eos_ids  # the grammar finished it, at its last "}"


@requires_smollm2
def test_smollm2_json_object_mode(smol_batch):
    for out in smol_batch["object"]:
        assert out.finish_reason == "stop", out.text
        assert isinstance(json.loads(out.text), dict) and out.text.startswith("{")


@requires_smollm2
def test_smollm2_unguided_rows_untouched_by_guided_ones(smollm2, smol_batch):
    alone = [smollm2.llm.generate(q, p)[0] for q, p in zip(PLAIN_Q, PLAIN)]
    assert [o.token_ids for o in smol_batch["plain"]] == [a.token_ids for a in alone]


@requires_smollm2
def test_smollm2_schema_compiled_once_tokenizer_view_built_once(smollm2, smol_batch):
    gd = smollm2.llm.engine.guided
    view = gd._ll
    assert view is not None and view.vocab_size == smollm2.llm.tokenizer.vocab_size
    same = GuidedDecoding(json_schema=json.loads(json.dumps(Points.model_json_schema())))  # equal, not identical
    assert gd.compile(same) is gd.compile(guided(Points)) and gd._ll is view


# ---- tiny random models: fast, and adversarial (random logits walk anywhere the grammar allows) -------------------
@pytest.fixture(scope="module")
def padded_chat_dir(tiny_chat_dir, tmp_path_factory) -> Path:
    """tiny_chat_dir's 512-id BPE tokenizer and ChatML template on a random model with 640 embedding rows: 128
    padding ids that random logits would pick if the mask let them."""
    d = tmp_path_factory.mktemp("padded_chat")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_chat_dir / name, d / name)
    eos = json.loads((tiny_chat_dir / "config.json").read_text())["eos_token_id"]
    return save_hf(make_hf_model(shape("tiny", vocab_size=640, eos_token_ids=[eos]), seed=22), d)


@pytest.fixture(scope="module")
def tiny_chat(padded_chat_dir):
    llm = LLM(str(padded_chat_dir), **TINY, block_size=4, num_blocks=512, max_model_len=512)
    assert (llm.tokenizer.vocab_size, llm.config.vocab_size) == (512, 640)
    return llm


def sampled(seed: int, max_tokens: int = 200, model: type[BaseModel] = Short) -> SamplingParams:
    return SamplingParams(temperature=1.0, seed=seed, max_tokens=max_tokens, guided=guided(model))


def test_padded_vocab_never_allowed(tiny_chat):
    """Every mask along a run: nothing at or past the tokenizer's size, something below it."""
    llm, n_tok = tiny_chat, tiny_chat.tokenizer.vocab_size
    eng = llm.engine
    seq = eng.add_request(chat("hi"), sampled(3))
    while not seq.is_finished:
        allowed = eng.guided.allowed([eng._matchers[seq.seq_id]])
        assert allowed.shape == (1, llm.config.vocab_size)
        assert not allowed[0, n_tok:].any() and allowed[0, :n_tok].any()
        eng.step()
    assert seq.finish_reason == "stop" and max(seq.output_ids) < n_tok
    Short.model_validate_json(seq.text)
    eng.release(seq)


def test_random_model_outputs_validate(tiny_chat):
    outs = tiny_chat.generate([chat(f"q{i}") for i in range(6)], [sampled(s) for s in range(6)])
    for o in outs:
        assert o.finish_reason == "stop", o.text
        Short.model_validate_json(o.text)
    o = tiny_chat.generate(chat("x"), SamplingParams(temperature=0, max_tokens=200, guided=guided(Short)))[0]
    assert o.finish_reason == "stop", o.text
    Short.model_validate_json(o.text)


def test_max_tokens_first_gives_length(tiny_chat):
    o = tiny_chat.generate(chat("x"), sampled(1, max_tokens=3))[0]
    assert o.finish_reason == "length" and len(o.token_ids) == 3 and o.text.startswith("{")
    with pytest.raises(ValueError):
        Short.model_validate_json(o.text)


@pytest.mark.parametrize("schema, match", BAD_SCHEMAS)
def test_bad_schema_rejected_before_running_others_untouched(tiny_chat, schema, match):
    llm = tiny_chat
    eng = llm.engine
    params = [sampled(7, 40), SamplingParams(temperature=0, max_tokens=10)]
    prompts = [chat("a"), chat("b")]
    alone = [llm.generate(q, p)[0].token_ids for q, p in zip(prompts, params)]
    seqs = [eng.add_request(q, p) for q, p in zip(prompts, params)]
    eng.step()
    eng.step()
    waiting, running = llm.stats()["waiting"], llm.stats()["running"]
    with pytest.raises(ValueError, match=match):
        eng.add_request(chat("c"), SamplingParams(max_tokens=5, guided=GuidedDecoding(json_schema=schema)))
    with pytest.raises(ValueError, match=f"prompt 1: bad JSON schema.*{match}"):  # the whole call, none queued
        llm.generate([chat("d"), chat("e")], [SamplingParams(), SamplingParams(guided=GuidedDecoding(json_schema=schema))])
    assert (llm.stats()["waiting"], llm.stats()["running"]) == (waiting, running)
    while eng.has_unfinished():
        eng.step()
    assert [s.output_ids for s in seqs] == alone
    for s in seqs:
        eng.release(s)
    assert llm.stats()["free_blocks"] == llm.stats()["total_blocks"]


def test_preempted_guided_sequences_resume_where_they_were(padded_chat_dir):
    """A pool too small for the batch: sequences are preempted and recomputed from their tokens; a matcher that
    were advanced again over them would fail or diverge from the same request run alone."""
    llm = LLM(str(padded_chat_dir), **TINY, block_size=4, num_blocks=40, max_model_len=160)
    params = [sampled(s, max_tokens=100) for s in range(5)]
    prompts = [chat(f"question {i}") for i in range(5)]
    alone = [llm.generate(q, p)[0] for q, p in zip(prompts, params)]
    outs = llm.generate(prompts, params)
    assert sum(o.num_preemptions for o in outs) > 0, "the pool was meant to run out"
    assert [o.token_ids for o in outs] == [a.token_ids for a in alone]
    for o in outs:
        assert o.finish_reason == "stop", o.text
        Short.model_validate_json(o.text)
    assert llm.stats()["free_blocks"] == llm.stats()["total_blocks"]


def test_fork_children_guided(tiny_chat):
    prefix = tiny_chat.engine.encode(chat("shared question"))
    suffixes = [[5, 6], [7], []]
    params = [sampled(11), sampled(12, model=Answer), SamplingParams(temperature=0, max_tokens=8)]
    kids = tiny_chat.fork(prefix, suffixes, params)
    full = tiny_chat.generate([prefix + s for s in suffixes], params)
    assert [k.token_ids for k in kids] == [f.token_ids for f in full]
    assert kids[0].finish_reason == kids[1].finish_reason == "stop"
    Short.model_validate_json(kids[0].text)
    Answer.model_validate_json(kids[1].text)


# ---- a sentencepiece vocabulary (bytes + 0xFF specials, not a tokenizers JSON) -------------------------------------
@pytest.fixture(scope="module")
def tiny_sp_dir(tmp_path_factory) -> Path:
    import random
    import sentencepiece as spm
    d = tmp_path_factory.mktemp("tiny_sp")
    rng = random.Random(0)
    lines = [json.dumps({"name": "".join(rng.choice("abcdé ") for _ in range(6)), "n": rng.randint(0, 99)})
             for _ in range(1500)]
    (d / "corpus.txt").write_text("\n".join(lines), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"), model_prefix=str(d / "sp"), model_type="bpe", vocab_size=300,
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, minloglevel=2)
    (d / "sp.model").rename(d / "tokenizer.model")
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    save_hf(make_hf_model(shape("tiny", eos_token_ids=[2]), seed=5), d)  # 512 ids: 212 of them padding
    return d


def test_sentencepiece_vocab(tiny_sp_dir):
    llm = LLM(str(tiny_sp_dir), **TINY, max_model_len=256)
    tok, gd = llm.tokenizer, llm.engine.guided
    # the grammar follows the pieces' bytes: a valid document, tokenized mid-text, is accepted token by token
    m = gd.matcher(GuidedDecoding(json_schema={"type": "object", "properties": {
        "name": {"type": "string"}, "n": {"type": "integer"}}, "required": ["name", "n"], "additionalProperties": False}))
    ids = tok.encode_fragment('{"name": "ab é日", "n": 42}')  # é, 日: byte-fallback pieces
    for i in ids:
        assert gd.allowed([m])[0, i], tok.id_to_token(i)
        assert m.accept(i) and not m.error
    assert m.done
    outs = llm.generate([[1, 5, 6, 7]] * 4, [sampled(s) for s in range(4)])
    for o in outs:
        assert o.finish_reason == "stop", o.text
        Short.model_validate_json(o.text)
        assert max(o.token_ids) < tok.vocab_size


# ---- without the library ----------------------------------------------------------------------------------------
def test_engine_runs_without_llguidance_and_names_the_extra():
    code = """
import sys
sys.modules["llguidance"] = None  # as if not installed
from sot_engine.engine import LLM, GuidedDecoding, SamplingParams
llm = LLM("random:tiny", block_size=4, num_blocks=16, num_threads=1)
print(len(llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2))[0].token_ids))
try:
    llm.generate([[1, 2, 3]], SamplingParams(guided=GuidedDecoding(json_object=True)))
except ValueError as e:
    print(e)
"""
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["2", "prompt 0: structured output needs llguidance (a dependency of sot-engine): pip install llguidance"]


# ---- Lark grammars -----------------------------------------------------------------------
def test_lark_grammar_whole_output(tiny_chat):
    g = GuidedDecoding(grammar='start: "Yes" | "No" | NUM\nNUM: /[0-9]{1,3}/\n')
    outs = tiny_chat.generate([[1, 2, 3]] * 6, [SamplingParams(temperature=1.0, seed=s, max_tokens=20, guided=g)
                                                for s in range(6)])
    for o in outs:
        assert o.text in ("Yes", "No") or o.text.isdigit() and len(o.text) <= 3, o.text
        assert o.finish_reason == "stop"


@pytest.mark.parametrize("grammar, match", [("start: A B", "grammar"), ("start: /(unclosed/", "grammar")])
def test_bad_grammar_rejected_before_running(tiny_chat, grammar, match):
    with pytest.raises(ValueError, match=match):
        tiny_chat.generate([[1, 2, 3]], SamplingParams(guided=GuidedDecoding(grammar=grammar)))


# ---- logits processors (vLLM's hook) ------------------------------------------------------------------------------
def test_logits_processors_steer_their_row_only_and_a_failing_one_ends_its_own(tiny_chat):
    seen = []

    def force(token: int):
        def fn(ids: list[int], row: torch.Tensor) -> torch.Tensor:
            seen.append(len(ids))
            row[:] = float("-inf")
            row[token] = 0.0
            return row
        return fn

    def broken(ids, row):
        raise RuntimeError("boom")
    plain = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    alone = tiny_chat.generate([[4, 5, 6]], plain)[0].token_ids
    outs = tiny_chat.generate([[1, 2, 3], [4, 5, 6], [7, 8]], [
        SamplingParams(temperature=0.7, seed=1, max_tokens=5, ignore_eos=True, logits_processors=[force(77)]),
        plain, SamplingParams(temperature=0, max_tokens=5, logits_processors=[broken])])
    assert outs[0].token_ids == [77] * 5 and seen == [0, 1, 2, 3, 4]
    assert outs[1].token_ids == alone
    assert outs[2].finish_reason == "stop" and "logits processor error: RuntimeError: boom" in outs[2].stop_reason
    assert len(outs[2].token_ids) == 1
    with pytest.raises(ValueError, match="logits_processors"):
        SamplingParams(logits_processors=[3])


# ---- rows checked after sampling: the same tokens greedy, the same distribution sampled --------------------------
def test_checking_the_sampled_token_equals_masking_first(tiny_chat):
    """A greedy or temperature-only guided row is sampled unmasked and masked only if the grammar rejects the
    token; top_k = the vocabulary (no filter at all) takes the mask-first path. Greedy: the same tokens. Sampled:
    both paths draw the masked distribution, checked against its exact probabilities."""
    from conftest import prompt_logits
    llm, V = tiny_chat, tiny_chat.config.vocab_size
    g = GuidedDecoding(grammar='start: /[a-e][a-z ]{0,8}/\n')
    greedy = [llm.generate([[1, 2, 3], [4, 5], [6]], SamplingParams(temperature=0, max_tokens=10, guided=g, **kw))
              for kw in ({}, {"top_k": V})]
    assert [o.token_ids for o in greedy[0]] == [o.token_ids for o in greedy[1]]
    # one token from {a, b, c}; a bias makes the unmasked draw land on a, b, c (kept) or on d, e (redrawn) often
    ids = {c: llm.tokenizer.encode(c)[0] for c in "abcde"}
    bias = torch.zeros(V)
    for c, b in zip("abcde", (5.0, 4.0, 3.0, 5.5, 4.5)):
        bias[ids[c]] = b

    def add_bias(_, row):
        return row.add_(bias)
    prompt, n, T = [9, 9, 9], 1500, 1.5
    raw = prompt_logits(llm, prompt)[:V] + bias
    exact = torch.softmax(raw[[ids[c] for c in "abc"]] / T, -1)
    one = GuidedDecoding(grammar='start: /[abc]/\n')
    for kw in ({}, {"top_k": V}):
        outs = llm.generate([prompt] * n, [SamplingParams(temperature=T, seed=s, max_tokens=1, guided=one,
                                                          logits_processors=[add_bias], **kw) for s in range(n)])
        counts = torch.tensor([sum(o.text == c for o in outs) for c in "abc"], dtype=torch.float64)
        assert counts.sum() == n
        sigma = (n * exact * (1 - exact)).sqrt()
        assert ((counts - n * exact).abs() < 4.5 * sigma).all(), (kw, counts.tolist(), (n * exact).tolist())


# ---- strict schemas: closed objects unless the schema says otherwise -------------------------------------------
def test_closed_schema_walks_subschemas_by_keyword():
    from sot_engine.engine.guided import closed_schema
    schema = {"type": "object", "properties": {
        "properties": {"type": "object", "properties": {"x": {"type": "integer"}}},  # a property named "properties"
        "open": {"type": "object", "properties": {"y": {"type": "string"}}, "additionalProperties": True},
        "items": {"type": "array", "items": {"$ref": "#/$defs/P"}},
        "either": {"anyOf": [{"type": "object", "properties": {"z": {}}}, {"type": "null"}]},
        "free": {"type": "object"}},  # no declared properties: any object, as OpenAI's json_object
        "$defs": {"P": {"type": "object", "properties": {"p": {"type": "integer"}}}}}
    out = closed_schema(schema)
    props = out["properties"]
    assert out["additionalProperties"] is False and set(props) == set(schema["properties"])
    assert props["properties"]["additionalProperties"] is False and "additionalProperties" not in props["properties"][
        "properties"]  # the map of properties itself is not a schema
    assert props["open"]["additionalProperties"] is True
    assert props["either"]["anyOf"][0]["additionalProperties"] is False and props["either"]["anyOf"][1] == {
        "type": "null"}
    assert out["$defs"]["P"]["additionalProperties"] is False and props["free"] == {"type": "object"}
    assert "additionalProperties" not in schema and "additionalProperties" not in schema["$defs"]["P"]  # a copy


class Open(BaseModel):  # pydantic's default: its schema says nothing of extra keys
    name: str = Field(max_length=8)
    n: int = Field(ge=0, le=9)


def _accepts(llm, guided_decoding: GuidedDecoding, text: str) -> bool:
    m = llm.engine.guided.matcher(guided_decoding)
    return all(m.accept(t) for t in llm.tokenizer.encode(text, add_special_tokens=False))


def test_strict_by_default_open_on_request(tiny_chat):
    schema = Open.model_json_schema()
    assert "additionalProperties" not in schema
    declared, extra = '{"name": "ab", "n": 3}', '{"name": "ab", "n": 3, "zz": 1}'
    assert _accepts(tiny_chat, GuidedDecoding(json_schema=schema), declared)
    assert not _accepts(tiny_chat, GuidedDecoding(json_schema=schema), extra)
    assert _accepts(tiny_chat, GuidedDecoding(json_schema=schema, strict=False), extra)
    assert _accepts(tiny_chat, GuidedDecoding(json_schema=schema | {"additionalProperties": True}), extra)
    assert not _accepts(tiny_chat, GuidedDecoding(json_schema=schema), '{"name": "ab",  "n": 3}')  # compact only
    with pytest.raises(ValueError, match="strict must be a bool"):
        GuidedDecoding(json_schema=schema, strict="yes")
    for o in tiny_chat.generate([chat(f"q{i}") for i in range(4)],  # sampled from a random model: declared keys only
                                [SamplingParams(temperature=1.0, seed=s, max_tokens=120,
                                                guided=GuidedDecoding(json_schema=schema)) for s in range(4)]):
        assert o.finish_reason == "stop" and set(json.loads(o.text)) <= {"name", "n"}, o.text
