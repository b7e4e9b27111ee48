"""Structured outputs in the engine: mask semantics, unconstrained rows untouched, the grammar cache,
and constrained generation on the tiny random model (garbage unless constrained)."""

from __future__ import annotations

import json
import pickle
import re

import jsonschema
import pytest
import torch

from vlora.adapters.peft_io import load_peft_adapter
from vlora.engine.config import EngineConfig
from vlora.engine.engine import LLMEngine
from vlora.engine.grammar import GrammarCache, GrammarError, GrammarSpec, check_spec, unpack_bitmask
from vlora.engine.optimal_sampling import OptimalSamplingParams
from vlora.engine.prompts import PromptBuilder
from vlora.engine.sampling import RowState, Sampler, SamplingParams, apply_grammar_masks
from tests.unit.oracle import random_peft_adapter

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "enum": ["ada", "bob", "cy"]},
        "age": {"type": "integer", "minimum": 1, "maximum": 99},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["x", "yy"]}, "minItems": 1, "maxItems": 3},
        "pet": {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}, "legs": {"type": "integer",
                                                                                          "minimum": 0,
                                                                                          "maximum": 4}},
                "required": ["kind", "legs"]},
    },
    "required": ["name", "age", "tags", "pet"],
}


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return LLMEngine(EngineConfig(str(tiny_model_dir), block_size=4, num_kv_blocks=1024, max_loras=2, max_lora_rank=8,
                                  max_grammars=3))


@pytest.fixture(scope="module")
def builder(tiny_model_dir):
    return PromptBuilder.from_pretrained(tiny_model_dir)


def prompt(builder, text):
    return builder.build_chat([{"role": "user", "content": text}], [])


def _text(engine, ids):
    return engine.tokenizer.decode(ids, skip_special_tokens=True)


def test_unpack_bitmask_bit_order():
    """Bit j of word w is token 32w + j; the tail past the vocabulary is dropped."""
    bm = torch.tensor([[0b101 - 2**31, 1], [0, (1 << 7) | (1 << 9)]], dtype=torch.int32)  # word 0 with bit 31 set
    allowed = unpack_bitmask(bm, 40)
    assert allowed.shape == (2, 40)
    assert allowed[0].nonzero().flatten().tolist() == [0, 2, 31, 32]
    assert allowed[1].nonzero().flatten().tolist() == [39]  # token 41 is past the vocabulary


def test_masked_logits_equal_unmasked_on_allowed_tokens_and_minus_inf_elsewhere(engine):
    """A constrained row keeps its logits exactly where the grammar allows, -inf elsewhere; the
    unconstrained row beside it is the same tensor row, bit for bit."""
    cache = engine.grammars
    spec = GrammarSpec.choice(["yes", "no"])
    V = engine.model.cfg.vocab_size
    logits = torch.randn(2, V)
    free = RowState.create(SamplingParams())
    bound = RowState.create(SamplingParams(grammar=spec))
    bound.grammar = cache.new_matcher(cache.get(spec))
    out = apply_grammar_masks(logits, [free, bound])
    # The tokens that can start "yes" or "no", computed from the vocabulary (not by the code under test).
    vocab = {i: engine.tokenizer.decode([i]) for i in range(len(engine.tokenizer))}
    starts = {i for i, t in vocab.items() if t and ("yes".startswith(t) or "no".startswith(t))}
    allowed = torch.isfinite(out[1])
    assert set(allowed.nonzero().flatten().tolist()) == starts
    assert torch.equal(out[1][allowed], logits[1][allowed])
    assert torch.all(out[1][~allowed] == float("-inf"))
    assert torch.equal(out[0], logits[0])
    assert torch.isfinite(logits).all()  # the input is untouched


def test_no_grammar_means_no_work(engine):
    logits = torch.randn(3, engine.model.cfg.vocab_size)
    rows = [RowState.create(SamplingParams()) for _ in range(3)]
    assert apply_grammar_masks(logits, rows) is logits


def test_grammar_cache_compiles_once_per_spec_and_evicts_least_recent(engine):
    cache = GrammarCache(engine.tokenizer, engine.model.cfg.vocab_size, engine.eos_token_ids, max_entries=2)
    a, b, c = GrammarSpec.choice(["a"]), GrammarSpec.regex("[0-9]+"), GrammarSpec.json_schema(SCHEMA)
    first = cache.get(a)
    assert cache.get(GrammarSpec.choice(["a"])) is first and cache.num_compiled == 1  # equal specs share one
    assert GrammarSpec.json_schema(json.loads(json.dumps(SCHEMA))) == c  # key independent of dict order
    cache.get(b)
    cache.get(a)  # a is now the most recent
    cache.get(c)  # evicts b
    assert len(cache) == 2 and a in cache and c in cache and b not in cache
    assert cache.num_compiled == 3
    cache.get(b)
    assert cache.num_compiled == 4
    # a request carries its spec (not a compiled grammar) across processes; the key survives pickling
    sp = pickle.loads(pickle.dumps(SamplingParams(grammar=c)))
    assert sp.grammar == c and cache.get(sp.grammar) is cache.get(c)


def test_concurrent_misses_compile_a_spec_once(engine):
    from concurrent.futures import ThreadPoolExecutor

    cache = GrammarCache(engine.tokenizer, engine.model.cfg.vocab_size, engine.eos_token_ids)
    spec = GrammarSpec.json_schema(SCHEMA)
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda _: cache.get(spec), range(8)))
    assert cache.num_compiled == 1 and all(g is got[0] for g in got)


@pytest.mark.parametrize("spec, reason", [
    (lambda: GrammarSpec.json_schema({"type": "nonsense"}), "JSON schema"),
    (lambda: GrammarSpec.regex("(unclosed"), "regex"),
    (lambda: GrammarSpec.json_schema([1, 2]), "must be an object"),
    (lambda: GrammarSpec.choice([]), "non-empty list"),
])
def test_bad_specs_say_why(spec, reason):
    with pytest.raises(GrammarError, match=reason):
        check_spec(spec())


def _run(engine, reqs):
    """reqs: (prompt, SamplingParams, adapter[, add_request keywords]); returns token ids per request (choice 0), all in one batch."""
    rids = [engine.add_request(p, sp, a, **(r[0] if r else {})) for p, sp, a, *r in reqs]
    out = {r: [] for r in rids}
    reasons = {}
    while engine.has_unfinished():
        for o in engine.step():
            for c in o.choices:
                if c.index == 0:
                    out[o.request_id].extend(c.token_ids)
                    if c.finish_reason:
                        reasons[o.request_id] = c.finish_reason
    assert engine.pool.num_free_blocks == engine.pool.num_blocks
    return [out[r] for r in rids], [reasons[r] for r in rids]


def test_unconstrained_rows_unchanged_token_for_token_beside_constrained_ones(engine, builder):
    """Greedy and seeded rows give the same tokens alone as beside constrained rows."""
    p1, p2 = prompt(builder, "hello there"), prompt(builder, "tell me a story")
    free = [(p1, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True), None),
            (p2, SamplingParams(max_tokens=24, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True), None)]
    alone, _ = _run(engine, free)
    spec = GrammarSpec.json_schema(SCHEMA)
    mixed, _ = _run(engine, [free[0], (p1, SamplingParams(max_tokens=120, temperature=0, grammar=spec), None),
                             free[1], (p2, SamplingParams(max_tokens=120, temperature=1.0, seed=3, grammar=spec),
                                       None)])
    assert mixed[0] == alone[0] and mixed[2] == alone[1]


@pytest.mark.parametrize("sampling", [
    dict(temperature=0),
    dict(temperature=1.3, seed=11),
    dict(temperature=0.8, top_k=5, top_p=0.7, seed=5),
    dict(temperature=1.0, logprobs=True, top_logprobs=3, seed=2),
])
def test_constrained_output_validates_against_schema(engine, builder, sampling):
    """Garbage without a grammar, schema-valid JSON with one; it ends with EOS ("stop"), not "length"."""
    spec = GrammarSpec.json_schema(SCHEMA)
    p = prompt(builder, "who are you")
    (free, bound), reasons = _run(engine, [(p, SamplingParams(max_tokens=60, temperature=0), None),
                                           (p, SamplingParams(max_tokens=150, grammar=spec, **sampling), None)])
    with pytest.raises(json.JSONDecodeError):
        json.loads(_text(engine, free))
    doc = json.loads(_text(engine, bound))
    jsonschema.validate(doc, SCHEMA)
    assert reasons[1] == "stop" and bound[-1] in engine.eos_token_ids


def test_regex_choice_and_json_object(engine, builder):
    p = prompt(builder, "pick")
    (r, c, j), reasons = _run(engine, [
        (p, SamplingParams(max_tokens=30, temperature=1.0, seed=1, grammar=GrammarSpec.regex(r"[a-c]{2,4}-[0-9]{3}")),
         None),
        (p, SamplingParams(max_tokens=30, temperature=1.0, seed=4, grammar=GrammarSpec.choice(["red", "green",
                                                                                               "blue"])), None),
        (p, SamplingParams(max_tokens=400, temperature=0, grammar=GrammarSpec.json_object()), None)])
    assert re.fullmatch(r"[a-c]{2,4}-[0-9]{3}", _text(engine, r))
    assert _text(engine, c) in ("red", "green", "blue")
    text = _text(engine, j)
    assert text.startswith("{")  # an object, never an array or a bare value
    if reasons[2] == "stop":
        assert isinstance(json.loads(text), dict)


def test_adapter_rows_and_optimal_sampling_are_constrained(engine, builder, hf_model, tmp_path):
    """An adapter row and a q* row (student adapter, base teacher) in one batch both validate."""
    engine.add_lora("g1", load_peft_adapter(random_peft_adapter(hf_model, tmp_path / "g1", seed=3, r=4, alpha=8))[0])
    spec = GrammarSpec.json_schema(SCHEMA)
    p = prompt(builder, "describe a pet")
    (ada, opt, free), _ = _run(engine, [
        (p, SamplingParams(max_tokens=150, temperature=0, grammar=spec), "g1"),
        (p, SamplingParams(max_tokens=150, temperature=1.0, seed=9, grammar=spec), "g1",
         dict(optimal=OptimalSamplingParams(teacher="base"))),
        (p, SamplingParams(max_tokens=40, temperature=0), "g1")])
    jsonschema.validate(json.loads(_text(engine, ada)), SCHEMA)
    jsonschema.validate(json.loads(_text(engine, opt)), SCHEMA)
    with pytest.raises(json.JSONDecodeError):
        json.loads(_text(engine, free))
    engine.remove_lora("g1")


def test_tool_call_grammar(engine, builder):
    params = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}, "days": {
        "type": "integer", "minimum": 1, "maximum": 7}}, "required": ["city", "days"]}
    spec = GrammarSpec.tool_call([("get_weather", params), ("get_time", {"type": "object", "properties": {}})])
    (ids,), _ = _run(engine, [(prompt(builder, "weather?"), SamplingParams(max_tokens=80, temperature=0.7, seed=1,
                                                                          grammar=spec), None)])
    text = _text(engine, ids)
    assert text.startswith("<tool_call>\n{\"name\": \"get_") and text.endswith("}\n</tool_call>")
    call = json.loads(text[len("<tool_call>\n"):-len("\n</tool_call>")])
    assert call["name"] in ("get_weather", "get_time")
    if call["name"] == "get_weather":
        jsonschema.validate(call["arguments"], params)


def test_each_of_n_choices_has_its_own_matcher(engine, builder):
    spec = GrammarSpec.json_schema(SCHEMA)
    rid = engine.add_request(prompt(builder, "two of them"), SamplingParams(n=2, max_tokens=150, temperature=1.2,
                                                                           seed=8, grammar=spec))
    out = {0: [], 1: []}
    while engine.has_unfinished():
        for o in engine.step():
            assert o.request_id == rid
            for c in o.choices:
                out[c.index].extend(c.token_ids)
    docs = [json.loads(_text(engine, out[i])) for i in (0, 1)]
    for doc in docs:
        jsonschema.validate(doc, SCHEMA)
    assert out[0] != out[1]  # two draws, two documents
