"""Structured outputs: what a constrained row must match, compiled once per spec with xgrammar.

A `GrammarSpec` is plain, hashable, picklable data (the kind and its canonical source text), so it
travels with a request's SamplingParams across processes; whoever runs the engine compiles it
through a `GrammarCache` keyed by the spec. Compiling a schema can take milliseconds to seconds,
so the caller compiles it before admitting the request (`GrammarCache.get` in a thread pool) and
the engine thread then finds it in the cache.

The token masks themselves are applied in engine/sampling.py (`apply_grammar_masks`).
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

KINDS = ("json_schema", "json_object", "regex", "choice", "tool_call")
# JSON as Qwen's template and json.dumps write it: ", " between items, ": " after keys.
_SEPARATORS = (", ", ": ")
_SOURCE_PREFIX = re.compile(r"^\[[\d:]+\]\s+\S+:\d+:\s*")


class GrammarError(ValueError):
    """A schema, regex or choice list that cannot be compiled; the message says why (a client error)."""


@dataclass(frozen=True, slots=True)
class GrammarSpec:
    """What a constrained output must match: the grammar cache's key.

    kind           source
    json_schema    the schema as canonical JSON (sorted keys)
    json_object    "" (any JSON object)
    regex          the pattern
    choice         a JSON list of the allowed strings
    tool_call      a JSON list of {"name", "parameters"}: one `<tool_call>\\n{...}\\n</tool_call>` of them
    """

    kind: str
    source: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise GrammarError(f"unknown grammar kind {self.kind!r}; expected one of {', '.join(KINDS)}")

    @classmethod
    def json_schema(cls, schema: Any) -> "GrammarSpec":
        if isinstance(schema, bool) or not isinstance(schema, dict):
            raise GrammarError("the JSON schema must be an object")
        return cls("json_schema", json.dumps(schema, sort_keys=True, separators=(",", ":")))

    @classmethod
    def json_object(cls) -> "GrammarSpec":
        return cls("json_object")

    @classmethod
    def regex(cls, pattern: str) -> "GrammarSpec":
        if not isinstance(pattern, str) or not pattern:
            raise GrammarError("the regex must be a non-empty string")
        return cls("regex", pattern)

    @classmethod
    def choice(cls, choices: Iterable[str]) -> "GrammarSpec":
        choices = list(choices) if not isinstance(choices, str) else None
        if not choices or not all(isinstance(c, str) and c for c in choices):
            raise GrammarError("the choices must be a non-empty list of non-empty strings")
        return cls("choice", json.dumps(choices))

    @classmethod
    def tool_call(cls, functions: list[tuple[str, dict]]) -> "GrammarSpec":
        """One call, in Qwen2.5's format, of one of `functions` ((name, parameters schema) pairs)."""
        if not functions:
            raise GrammarError("a tool call needs at least one function")
        return cls("tool_call", json.dumps([{"name": n, "parameters": p} for n, p in functions], sort_keys=True))


def _xgr():
    import xgrammar

    return xgrammar


def _tool_call_schema(functions: list[dict]) -> dict:
    """{"name": <one of the names>, "arguments": <that function's parameters>}, name first."""
    options = [{"type": "object",
                "properties": {"name": {"const": f["name"]},
                               "arguments": f["parameters"] or {"type": "object"}},
                "required": ["name", "arguments"], "additionalProperties": False}
               for f in functions]
    return options[0] if len(options) == 1 else {"anyOf": options}


def build_grammar(spec: GrammarSpec):
    """The xgrammar Grammar of a spec (no tokenizer needed: cheap, and where bad input is caught)."""
    xgr = _xgr()
    try:
        if spec.kind == "json_schema":
            return xgr.Grammar.from_json_schema(spec.source, any_whitespace=False, separators=_SEPARATORS,
                                                strict_mode=True)
        if spec.kind == "json_object":
            # any object (OpenAI's JSON mode asks for an object, not any JSON value)
            return xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=False, separators=_SEPARATORS,
                                                strict_mode=False)
        if spec.kind == "regex":
            return xgr.Grammar.from_regex(spec.source)
        if spec.kind == "choice":
            # EBNF string literals take JSON's escapes; each choice is one alternative of root
            return xgr.Grammar.from_ebnf("root ::= " + " | ".join(json.dumps(c) for c in json.loads(spec.source)))
        if spec.kind == "tool_call":
            body = xgr.Grammar.from_json_schema(json.dumps(_tool_call_schema(json.loads(spec.source))),
                                                any_whitespace=False, separators=_SEPARATORS, strict_mode=True)
            return xgr.Grammar.concat(xgr.Grammar.from_ebnf('root ::= "<tool_call>\\n"'), body,
                                      xgr.Grammar.from_ebnf('root ::= "\\n</tool_call>"'))
    except Exception as exc:  # noqa: BLE001 - xgrammar raises RuntimeError/ValueError with the reason
        what = {"json_schema": "JSON schema", "regex": "regex", "choice": "choice list",
                "tool_call": "tool parameters schema"}.get(spec.kind, spec.kind)
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        reason = _SOURCE_PREFIX.sub("", reason)  # xgrammar's "[hh:mm:ss] file.cc:line: " prefix
        raise GrammarError(f"the {what} cannot be used for constrained decoding: {reason}") from None
    raise GrammarError(f"unknown grammar kind {spec.kind!r}")


def check_spec(spec: GrammarSpec) -> None:
    """Raise GrammarError if `spec` would not compile (the API's 400 check)."""
    build_grammar(spec)


class GrammarCache:
    """Compiled grammars for one tokenizer, keyed by GrammarSpec, least recently used evicted past
    `max_entries`. Thread-safe: compiled in a thread pool, read by the engine thread."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: Iterable[int], max_entries: int = 64):
        xgr = _xgr()
        self.vocab_size = vocab_size
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                       stop_token_ids=sorted(stop_token_ids))
        self.compiler = xgr.GrammarCompiler(self.info, cache_enabled=False)
        self.max_entries = max_entries
        self._compiled: OrderedDict[GrammarSpec, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._pending: dict[GrammarSpec, threading.Event] = {}  # specs being compiled now
        self.num_compiled = 0  # compilations run (misses)

    def __len__(self) -> int:
        return len(self._compiled)

    def __contains__(self, spec: GrammarSpec) -> bool:
        return spec in self._compiled

    def get(self, spec: GrammarSpec):
        """The compiled grammar of `spec`, compiling it on a miss (GrammarError if it cannot be).
        Concurrent misses on one spec compile it once: the others wait for that compilation."""
        with self._lock:
            hit = self._compiled.get(spec)
            if hit is not None:
                self._compiled.move_to_end(spec)
                return hit
            pending = self._pending.get(spec)
            if pending is None:
                pending = self._pending[spec] = threading.Event()
                owner = True
            else:
                owner = False
        if not owner:
            pending.wait()
            with self._lock:
                hit = self._compiled.get(spec)
            if hit is not None:
                return hit
            return self.get(spec)  # the other compilation failed (or was evicted at once): try ourselves
        try:
            compiled = self.compiler.compile_grammar(build_grammar(spec))
            with self._lock:
                self.num_compiled += 1
                self._compiled[spec] = compiled
                while len(self._compiled) > self.max_entries:
                    self._compiled.popitem(last=False)
            return compiled
        finally:
            with self._lock:
                self._pending.pop(spec, None)
            pending.set()

    @staticmethod
    def new_matcher(compiled):
        """A fresh matcher (one per sequence) at the start of a compiled grammar."""
        return _xgr().GrammarMatcher(compiled)


_BYTE_BITS: dict[str, torch.Tensor] = {}


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[rows, ceil(V/32)] int32 bit words (bit j of word w = token 32w+j allowed) -> [rows, V] bool.

    One gather from a 256 x 8 table of byte -> bits (little-endian words: byte k holds bits 8k..8k+7).
    """
    key = str(bitmask.device)
    table = _BYTE_BITS.get(key)
    if table is None:
        b = torch.arange(256, dtype=torch.int32)
        table = _BYTE_BITS[key] = ((b[:, None] >> torch.arange(8, dtype=torch.int32)) & 1).bool().to(bitmask.device)
    rows = bitmask.shape[0]
    return table[bitmask.contiguous().view(torch.uint8).long()].view(rows, -1)[:, :vocab_size]
