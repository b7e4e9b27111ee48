"""Structured outputs and tool calling at the HTTP edge: request fields -> GrammarSpec, model text ->
OpenAI `tool_calls` (whole responses and streamed deltas).

What a request may ask for, one at a time: `response_format` (json_object / json_schema, chat),
vLLM's `guided_json` / `guided_regex` / `guided_choice` or `structured_outputs` {json, regex,
choice, json_object} (both routes), or, on chat, `tool_choice` "required" / a named function,
which constrains the output to one valid `<tool_call>` of the given tools (engine/tools.py).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from vlora.deployments.openai_api import ApiError
from vlora.engine.grammar import GrammarError, GrammarSpec, check_spec
from vlora.engine.outputs import ChoiceDelta
from vlora.engine.tools import ToolCall, ToolCallStream, parse_tool_calls

STRUCTURED_OUTPUT_KEYS = ("json", "regex", "choice", "json_object")
_UNSUPPORTED_STRUCTURED = ("grammar", "structural_tag", "whitespace_pattern")


def _spec(param: str, build, *args) -> GrammarSpec:
    try:
        return build(*args)
    except GrammarError as e:
        raise ApiError(400, f"{param}: {e}", param=param) from None


def _schema_arg(param: str, value: Any) -> Any:
    """A schema given as an object or as its JSON text."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError as e:
            raise ApiError(400, f"{param} is not valid JSON: {e}", param=param) from None
    return value


def _response_format(rf: Any) -> GrammarSpec | None:
    if not isinstance(rf, Mapping):
        raise ApiError(400, "response_format must be an object with a 'type'", param="response_format")
    kind = rf.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return GrammarSpec.json_object()
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, Mapping) or "schema" not in js:
            raise ApiError(400, "response_format.json_schema must be an object with 'name' and 'schema'",
                           param="response_format.json_schema")
        return _spec("response_format.json_schema.schema", GrammarSpec.json_schema,
                     _schema_arg("response_format.json_schema.schema", js["schema"]))
    raise ApiError(400, f"response_format.type {kind!r} is not supported; use 'text', 'json_object' or 'json_schema'",
                   param="response_format.type")


def _structured_outputs(so: Any) -> GrammarSpec | None:
    if not isinstance(so, Mapping):
        raise ApiError(400, "structured_outputs must be an object", param="structured_outputs")
    for key in _UNSUPPORTED_STRUCTURED:
        if so.get(key) is not None:
            raise ApiError(400, f"structured_outputs.{key} is not supported by this server; use json, regex or "
                                "choice", param=f"structured_outputs.{key}")
    unknown = sorted(k for k in so if k not in STRUCTURED_OUTPUT_KEYS + _UNSUPPORTED_STRUCTURED
                     and k not in ("disable_any_whitespace", "disable_additional_properties"))
    if unknown:
        raise ApiError(400, f"structured_outputs.{unknown[0]} is not supported by this server",
                       param=f"structured_outputs.{unknown[0]}")
    given = [k for k in STRUCTURED_OUTPUT_KEYS if so.get(k) not in (None, False)]
    if len(given) > 1:
        raise ApiError(400, f"structured_outputs takes one of json, regex, choice, json_object; got {given}",
                       param="structured_outputs")
    if not given:
        return None
    key = given[0]
    param = f"structured_outputs.{key}"
    if key == "json":
        return _spec(param, GrammarSpec.json_schema, _schema_arg(param, so["json"]))
    if key == "regex":
        return _spec(param, GrammarSpec.regex, so["regex"])
    if key == "choice":
        return _spec(param, GrammarSpec.choice, so["choice"])
    return GrammarSpec.json_object()


def tool_functions(tools: list[dict] | None) -> dict[str, dict]:
    """name -> parameters schema of a request's function tools (validated shapes)."""
    out: dict[str, dict] = {}
    for k, tool in enumerate(tools or []):
        fn = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(tool, Mapping) or tool.get("type") != "function" or not isinstance(fn, Mapping):
            raise ApiError(400, f"tools[{k}] must be {{'type': 'function', 'function': {{'name', 'parameters'}}}}",
                           param=f"tools[{k}]")
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise ApiError(400, f"tools[{k}].function.name must be a non-empty string", param=f"tools[{k}].function.name")
        if name in out:
            raise ApiError(400, f"tools[{k}]: the function name {name!r} is used twice", param=f"tools[{k}].function.name")
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(params, Mapping):
            raise ApiError(400, f"tools[{k}].function.parameters must be a JSON schema object",
                           param=f"tools[{k}].function.parameters")
        out[name] = dict(params)
    return out


def tool_mode(req) -> str:
    """"none" (no tool parsing), "auto", "required" or "named" for a chat request."""
    tools, choice = getattr(req, "tools", None), getattr(req, "tool_choice", None)
    if not tools:
        if choice not in (None, "none", "auto"):
            raise ApiError(400, "tool_choice needs tools: give the functions the model may call in 'tools'",
                           param="tool_choice")
        return "none"
    if choice is None or choice == "auto":
        return "auto"
    if choice in ("none", "required"):
        return choice
    if isinstance(choice, Mapping) and choice.get("type") == "function" and isinstance(choice.get("function"), Mapping):
        return "named"
    raise ApiError(400, "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': "
                        "{'name': ...}}", param="tool_choice")


def request_grammar(req) -> GrammarSpec | None:
    """The one output constraint a request asks for (or None); 400 naming the field otherwise."""
    found: list[tuple[str, GrammarSpec]] = []
    rf = getattr(req, "response_format", None)
    if rf is not None:
        spec = _response_format(rf)
        if spec is not None:
            found.append(("response_format", spec))
    if req.guided_json is not None:
        found.append(("guided_json", _spec("guided_json", GrammarSpec.json_schema,
                                          _schema_arg("guided_json", req.guided_json))))
    if req.guided_regex is not None:
        found.append(("guided_regex", _spec("guided_regex", GrammarSpec.regex, req.guided_regex)))
    if req.guided_choice is not None:
        found.append(("guided_choice", _spec("guided_choice", GrammarSpec.choice, req.guided_choice)))
    if req.structured_outputs is not None:
        spec = _structured_outputs(req.structured_outputs)
        if spec is not None:
            found.append(("structured_outputs", spec))
    mode = tool_mode(req)
    if mode in ("required", "named"):
        functions = tool_functions(req.tools)
        if mode == "named":
            name = req.tool_choice["function"].get("name")
            if name not in functions:
                raise ApiError(400, f"tool_choice names the function {name!r}, which is not in tools "
                                    f"({', '.join(sorted(functions))})", param="tool_choice.function.name")
            functions = {name: functions[name]}
        found.append(("tool_choice", _spec("tools", GrammarSpec.tool_call, list(functions.items()))))
    elif mode == "auto":
        tool_functions(req.tools)
    if len(found) > 1:
        names = [n for n, _ in found]
        raise ApiError(400, f"{' and '.join(names)} each constrain the output; send only one of them",
                       param=names[1])
    return found[0][1] if found else None


def check_grammar(spec: GrammarSpec, param: str = "response_format") -> None:
    """Would `spec` compile? (400 saying why if not.)"""
    try:
        check_spec(spec)
    except GrammarError as e:
        raise ApiError(400, str(e), param=param) from None


def grammar_param(req) -> str:
    """The request field a grammar error is about, for the 400's `param`."""
    for name in ("response_format", "guided_json", "guided_regex", "guided_choice", "structured_outputs"):
        if getattr(req, name, None) is not None:
            return name
    return "tools"


# -- responses -----------------------------------------------------------------------------------

def attach_tool_calls(body: dict, texts: list[str]) -> dict:
    """A whole chat.completion: choices whose text holds tool calls get OpenAI's `tool_calls`
    (content = the text outside them, or null) and finish_reason "tool_calls"."""
    for choice, text in zip(body["choices"], texts):
        content, calls = parse_tool_calls(text)
        if not calls:
            continue
        choice["message"]["content"] = content
        choice["message"]["tool_calls"] = [c.to_openai() for c in calls]
        if choice["finish_reason"] == "stop":
            choice["finish_reason"] = "tool_calls"
    return body


class StreamedToolCalls:
    """Per choice, turns streamed deltas into content deltas plus tool-call deltas (OpenAI's shape:
    `delta.tool_calls[i]` with index, id, type and function name/arguments)."""

    def __init__(self):
        self.streams: dict[int, ToolCallStream] = {}
        self.pending: dict[int, list[ToolCall]] = {}

    def split(self, deltas: list[ChoiceDelta]) -> list[ChoiceDelta]:
        out = []
        for d in deltas:
            ts = self.streams.setdefault(d.index, ToolCallStream())
            text, calls = ts.push(d.text)
            if d.finish_reason:
                text += ts.flush()
            reason = d.finish_reason
            if reason == "stop" and ts.num_calls:
                reason = "tool_calls"
            self.pending[d.index] = [dataclasses.replace(c) for c in calls]
            out.append(dataclasses.replace(d, text=text, finish_reason=reason))
        return out

    def visible(self, d: ChoiceDelta) -> bool:
        return bool(self.pending.get(d.index))

    def decorate(self, chunk: dict) -> dict:
        """Add the tool-call deltas split off since the last chunk to `chunk`'s choices."""
        for choice in chunk["choices"]:
            calls = self.pending.pop(choice["index"], None)
            if not calls:
                continue
            first = self.streams[choice["index"]].num_calls - len(calls)
            delta = choice["delta"]
            if not delta.get("content"):
                delta["content"] = None
            delta["tool_calls"] = [{"index": first + k, "id": c.id, "type": "function",
                                    "function": {"name": c.name, "arguments": c.arguments}}
                                   for k, c in enumerate(calls)]
        return chunk
