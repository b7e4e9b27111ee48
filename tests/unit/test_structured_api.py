"""Structured outputs and tools at the HTTP edge: request fields -> grammar, text -> tool_calls."""

from __future__ import annotations

import json

import pytest

from vlora.deployments import structured_api
from vlora.deployments.openai_api import ApiError, ChatCompletionRequest, CompletionRequest
from vlora.engine.grammar import GrammarSpec
from vlora.engine.outputs import ChoiceDelta
from vlora.engine.tools import ToolCallStream, parse_tool_calls

TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
    "x": {"type": "integer"}}}}}, {"type": "function", "function": {"name": "g"}}]


def chat(**extra) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "h"}], **extra})


def test_each_field_gives_its_grammar():
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    assert structured_api.request_grammar(chat()) is None
    assert structured_api.request_grammar(chat(response_format={"type": "text"})) is None
    assert structured_api.request_grammar(chat(response_format={"type": "json_object"})) == GrammarSpec.json_object()
    assert structured_api.request_grammar(chat(response_format={
        "type": "json_schema", "json_schema": {"name": "n", "schema": schema}})) == GrammarSpec.json_schema(schema)
    assert structured_api.request_grammar(chat(guided_json=json.dumps(schema))) == GrammarSpec.json_schema(schema)
    assert structured_api.request_grammar(chat(guided_regex="a+")) == GrammarSpec.regex("a+")
    assert structured_api.request_grammar(chat(guided_choice=["x", "y"])) == GrammarSpec.choice(["x", "y"])
    assert structured_api.request_grammar(chat(structured_outputs={"choice": ["x"]})) == GrammarSpec.choice(["x"])
    comp = CompletionRequest.model_validate({"model": "m", "prompt": "p", "guided_regex": "[0-9]"})
    assert structured_api.request_grammar(comp) == GrammarSpec.regex("[0-9]")
    assert structured_api.request_grammar(chat(tools=TOOLS)) is None  # auto: free text, parsed afterwards
    required = structured_api.request_grammar(chat(tools=TOOLS, tool_choice="required"))
    assert required.kind == "tool_call" and [f["name"] for f in json.loads(required.source)] == ["f", "g"]
    named = structured_api.request_grammar(chat(tools=TOOLS, tool_choice={"type": "function",
                                                                         "function": {"name": "g"}}))
    assert [f["name"] for f in json.loads(named.source)] == ["g"]


@pytest.mark.parametrize("extra, param, message", [
    ({"response_format": {"type": "xml"}}, "response_format.type", "'xml' is not supported"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "must be an object with 'name'"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": [1]}}},
     "response_format.json_schema.schema", "must be an object"),
    ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
    ({"guided_choice": []}, "guided_choice", "non-empty list"),
    ({"structured_outputs": {"grammar": "x"}}, "structured_outputs.grammar", "structured_outputs.grammar is not supported"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", "takes one of"),
    ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice", "send only one of them"),
    ({"tool_choice": "required"}, "tool_choice", "tool_choice needs tools"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", "must be 'none', 'auto', 'required'"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "h"}}}, "tool_choice.function.name",
     "'h', which is not in tools (f, g)"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}] * 2}, "tools[1].function.name", "used twice"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0]", "must be {'type': 'function'"),
])
def test_bad_requests_name_the_field(extra, param, message):
    with pytest.raises(ApiError) as e:
        structured_api.request_grammar(chat(**extra))
    assert e.value.status == 400 and e.value.param == param and message in e.value.message


def test_invalid_schema_is_a_400_saying_why():
    spec = structured_api.request_grammar(chat(guided_json={"type": "integer", "minimum": 3, "maximum": 1}))
    with pytest.raises(ApiError, match="minimum greater than maximum") as e:
        structured_api.check_grammar(spec, "guided_json")
    assert e.value.status == 400 and e.value.param == "guided_json"


def test_parse_tool_calls():
    text = 'ok <tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>\n<tool_call>\n{"name": "g", ' \
           '"arguments": {}}\n</tool_call>'
    content, calls = parse_tool_calls(text)
    assert content == "ok" and [(c.name, json.loads(c.arguments)) for c in calls] == [("f", {"x": 1}), ("g", {})]
    assert len({c.id for c in calls}) == 2
    assert parse_tool_calls("<tool_call>\nnot json\n</tool_call>") == ("<tool_call>\nnot json\n</tool_call>", [])
    assert parse_tool_calls("plain") == ("plain", [])


def test_tool_call_stream_holds_back_markup_and_emits_whole_calls():
    ts = ToolCallStream()
    pieces = ["Sure", " <tool", "_call>\n{\"name\": \"f\", ", "\"arguments\": {\"x\": 2}}\n</tool_", "call>", "\n"]
    out = [ts.push(p) for p in pieces]
    assert [t for t, _ in out] == ["Sure", " ", "", "", "", ""]
    assert [[c.name for c in calls] for _, calls in out] == [[], [], [], [], ["f"], []]
    assert ts.flush() == ""
    ts = ToolCallStream()
    assert ts.push("a <tool") == ("a ", [])
    assert ts.push("box>") == ("<toolbox>", [])  # not the marker after all: released as text
    assert ts.push("<tool_call>oops</tool_call>") == ("<tool_call>oops</tool_call>", [])


def test_streamed_tool_calls_become_openai_deltas():
    s = structured_api.StreamedToolCalls()
    ds = s.split([ChoiceDelta(0, '<tool_call>\n{"name": "g", "arguments": {}}\n</tool_call>', [1], None, "stop")])
    assert ds[0].text == "" and ds[0].finish_reason == "tool_calls" and s.visible(ds[0])
    chunk = s.decorate({"choices": [{"index": 0, "delta": {"content": ""}}]})
    (tc,) = chunk["choices"][0]["delta"]["tool_calls"]
    assert chunk["choices"][0]["delta"]["content"] is None
    assert tc["index"] == 0 and tc["type"] == "function" and tc["id"].startswith("call_")
    assert tc["function"] == {"name": "g", "arguments": "{}"}


def test_tool_and_tool_call_messages_validate():
    chat(messages=[{"role": "user", "content": "q"},
                   {"role": "assistant", "content": None, "tool_calls": [
                       {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                   {"role": "tool", "tool_call_id": "c", "content": [{"type": "text", "text": "42"}]}])
