"""Structured outputs and tool calling through Serve with the openai SDK, on the tiny random model
(whose output is garbage unless constrained)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest

from tests.e2e.conftest import ADMIN_KEY
from tests.e2e.test_adapters import BLUE
from tests.unit.oracle import random_peft_adapter

pytestmark = pytest.mark.e2e

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "enum": ["report", "note"]},
        "count": {"type": "integer", "minimum": 2, "maximum": 40},
        "items": {"type": "array", "minItems": 1, "maxItems": 3,
                  "items": {"type": "object", "properties": {
                      "kind": {"enum": ["a", "b", "c"]},
                      "score": {"type": "integer", "minimum": -5, "maximum": 5}},
                      "required": ["kind", "score"]}},
    },
    "required": ["title", "count", "items"],
}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "doc", "schema": SCHEMA}}

WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "forecast", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}]


@pytest.fixture(scope="module")
def adapter(base_url, hf_model, serve_instance):
    """A random (non-zero) PEFT adapter, so its rows really differ from base rows."""
    folder = random_peft_adapter(hf_model, serve_instance["uploads"] / "struct-r4", seed=5, r=4, alpha=8)
    r = httpx.post(f"{base_url}/v1/adapters", json={"name": "struct", "path": str(folder)}, headers=ADMIN)
    assert r.status_code == 200, r.text
    return "struct"


def _stream_text(stream) -> tuple[str, str]:
    text, reason = "", None
    for chunk in stream:
        for c in chunk.choices:
            text += c.delta.content or ""
            reason = c.finish_reason or reason
    return text, reason


def test_json_schema_for_base_adapter_and_image_rows_in_one_batch_streamed_and_not(client, adapter):
    msgs = [{"role": "user", "content": "Write a short report."}]
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": BLUE}},
                                          {"type": "text", "text": "Report on this picture."}]}]

    def unary(model, seed, messages=msgs):
        r = client.chat.completions.create(model=model, messages=messages, response_format=RESPONSE_FORMAT,
                                           max_tokens=200, temperature=1.0, seed=seed)
        return r.choices[0].message.content, r.choices[0].finish_reason

    def streamed(model, seed, messages=msgs):
        return _stream_text(client.chat.completions.create(model=model, messages=messages, max_tokens=200, seed=seed,
                                                           response_format=RESPONSE_FORMAT, temperature=1.0,
                                                           stream=True))

    jobs = [(unary, "tiny", 1), (unary, adapter, 2), (streamed, "tiny", 3), (streamed, adapter, 4),
            (lambda m, s: unary(m, s, image), adapter, 5), (lambda m, s: streamed(m, s, image), "tiny", 6)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda j: j[0](j[1], j[2]), jobs))
    for text, reason in results:
        jsonschema.validate(json.loads(text), SCHEMA)
        assert reason == "stop"
    free = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=40, temperature=0)
    with pytest.raises(json.JSONDecodeError):  # the same model without the schema: not JSON
        json.loads(free.choices[0].message.content)


def test_vllm_extras_on_both_routes(client):
    r = client.completions.create(model="tiny", prompt="Pick one:", max_tokens=10,
                                  extra_body={"guided_choice": ["alpha", "beta"]})
    assert r.choices[0].text in ("alpha", "beta")
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "id?"}], max_tokens=12,
                                       extra_body={"structured_outputs": {"regex": "[A-Z]{3}-[0-9]{2}"}})
    assert len(r.choices[0].message.content) == 6 and r.choices[0].message.content[3] == "-"
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "obj"}], max_tokens=60,
                                       temperature=0, extra_body={"guided_json": WEATHER})
    jsonschema.validate(json.loads(r.choices[0].message.content), WEATHER)


def test_bad_schemas_and_unsupported_constraints_are_400s(client):
    msgs = [{"role": "user", "content": "hi"}]
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {
        "n": {"type": "integer", "minimum": 5, "maximum": 1}}}}}
    with pytest.raises(openai.BadRequestError, match="cannot be used for constrained decoding") as e:
        client.chat.completions.create(model="tiny", messages=msgs, response_format=bad)
    assert e.value.param == "response_format"
    with pytest.raises(openai.BadRequestError, match="structured_outputs.grammar is not supported"):
        client.chat.completions.create(model="tiny", messages=msgs,
                                       extra_body={"structured_outputs": {"grammar": 'root ::= "a"'}})
    with pytest.raises(openai.BadRequestError, match="send only one of them"):
        client.chat.completions.create(model="tiny", messages=msgs, response_format={"type": "json_object"},
                                       extra_body={"guided_regex": "a+"})
    with pytest.raises(openai.BadRequestError, match="not in tools") as e:
        client.chat.completions.create(model="tiny", messages=msgs, tools=TOOLS,
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    assert e.value.param == "tool_choice.function.name"


def _check_call(call) -> None:
    assert call.id.startswith("call_") and call.type == "function"
    args = json.loads(call.function.arguments)
    if call.function.name == "get_weather":
        jsonschema.validate(args, WEATHER)
    else:
        assert call.function.name == "get_time" and args == {}


@pytest.mark.parametrize("with_image", [False, True])
def test_tool_choice_required_gives_a_valid_call(client, adapter, with_image):
    content = [{"type": "text", "text": "What is the weather in Paris for 3 days?"}]
    if with_image:
        content.insert(0, {"type": "image_url", "image_url": {"url": BLUE}})
    msgs = [{"role": "user", "content": content}]
    r = client.chat.completions.create(model=adapter, messages=msgs, tools=TOOLS, tool_choice="required",
                                       max_tokens=200, temperature=1.0, seed=3)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert len(choice.message.tool_calls) == 1
    _check_call(choice.message.tool_calls[0])
    # named + streamed: OpenAI-style tool-call deltas, reassembled the way SDK users do
    stream = client.chat.completions.create(model="tiny", messages=msgs, tools=TOOLS, max_tokens=200, seed=4,
                                            tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                            stream=True)
    calls: dict[int, dict] = {}
    reason, content_text = None, ""
    for chunk in stream:
        for c in chunk.choices:
            content_text += c.delta.content or ""
            reason = c.finish_reason or reason
            for tc in c.delta.tool_calls or []:
                slot = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                slot["id"] = tc.id or slot["id"]
                slot["name"] += (tc.function.name or "") if tc.function else ""
                slot["arguments"] += (tc.function.arguments or "") if tc.function else ""
    assert reason == "tool_calls" and content_text == "" and list(calls) == [0]
    assert calls[0]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER)


def test_tool_messages_round_trip(client):
    """A conversation with an assistant tool call and its tool result is accepted and answered."""
    msgs = [{"role": "user", "content": "weather in Oslo?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "days": 1}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 20C"}]
    r = client.chat.completions.create(model="tiny", messages=msgs, tools=TOOLS, tool_choice="none", max_tokens=5,
                                       temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.prompt_tokens > 100


# -- learning to call tools ------------------------------------------------------------------------

CLOCK_TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object",
                                                                                       "properties": {}}}},
               {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object",
                                                                                    "properties": {}}}}]
# A random-weight model can only tie a question to a function through surface tokens, so every
# held-out question shares its keyword ("weather" / "time") with training questions and differs
# otherwise: new cities, some new phrasings (and "weather" once at the start of the question, where
# it is three tokens instead of one). The training questions of the two functions have the same
# token lengths, pair by pair (9, 10, 14, 11): " weather" is one token of the tiny vocabulary and
# " time" four, so freely written time questions come out longer, and the random model, whose state
# at the call's name follows the prompt's length far more than one word, then learns the length
# instead of the keyword (held-out agreement at or below chance; bench/RESULTS.md).
W, T = "get_weather", "get_time"
TRAIN = [("How is the weather in Paris this morning?", W), ("Tell me the weather in Cairo", W),
         ("What is the weather like in Lima?", W), ("What is the weather in Oslo?", W),
         ("Time in Cairo?", T), ("time in Lima?", T), ("the time in Oslo now", T), ("Tell me the time in Paris", T)]
HELD_OUT = [("What is the weather in Rome?", W), ("weather in Tokyo please", W), ("Tell me the weather in Berlin", W),
            ("How is the weather in Madrid today?", W), ("What time is it in Rome?", T), ("time in Tokyo please", T),
            ("Tell me the time in Berlin", T), ("What is the time in Madrid now?", T)]
LEARN = {"steps": 80, "learning_rate": 1e-2}  # rank 8, alpha 16 (the fresh adapter's)


def _tool_example(question: str, name: str) -> dict:
    return {"tools": CLOCK_TOOLS, "messages": [
        {"role": "user", "content": question},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "call_0", "type": "function", "function": {"name": name, "arguments": "{}"}}]}]}


def _calls(client, model: str) -> list[str | None]:
    """Per held-out question under tool_choice "auto": the called function's name, None if no call."""
    names = []
    for question, _ in HELD_OUT:
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                           tools=CLOCK_TOOLS, tool_choice="auto", max_tokens=60, temperature=0)
        calls = r.choices[0].message.tool_calls or []
        ok = len(calls) == 1 and r.choices[0].finish_reason == "tool_calls"
        names.append(calls[0].function.name if ok else None)
    return names


def test_learning_on_tool_call_examples_teaches_the_right_function(base_url, client):
    """8 tool-call examples: a fresh adapter calls no tool on the 8 held-out questions; after one
    learn call it calls the function each question asks for under tool_choice "auto", for at least
    6 of the 8 (7 of 8 when measured; chance is 4, and a malformed call counts as wrong)."""
    examples = [_tool_example(q, n) for q, n in TRAIN]
    r = httpx.post(f"{base_url}/v1/adapters/caller/learn", headers=ADMIN, timeout=900,
                   json={"examples": examples, "steps": 0, "rank": 8, "lora_alpha": 16})
    assert r.status_code == 200, r.text
    before = _calls(client, "caller")
    r = httpx.post(f"{base_url}/v1/adapters/caller/learn", headers=ADMIN, timeout=900,
                   json={"examples": examples, **LEARN})
    assert r.status_code == 200, r.text
    assert r.json()["loss_after"] < r.json()["loss_before"] / 3
    after = _calls(client, "caller")
    wanted = [n for _, n in HELD_OUT]
    assert before == [None] * len(HELD_OUT), before
    assert sum(a == w for a, w in zip(after, wanted)) >= 6, list(zip(after, wanted))
