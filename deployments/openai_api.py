"""OpenAI wire format: request schemas, errors and response builders for the FastAPI Ingress.

Pure schema + conversion (no Ray, no engine state), so it is cheap to import anywhere and can be
tested against the real `openai` SDK. Requests keep OpenAI's defaults (temperature 1, n 1) and
reject, with a 400 naming the parameter, the features this server cannot honour (legacy
functions, batched prompts, echo) instead of silently ignoring them. Structured outputs and tools
are turned into a grammar in deployments/structured_api.py. Responses are plain dicts in
exactly the JSON shapes OpenAI returns, so the SDK parses them into its typed objects.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Mapping
from typing import Any, ClassVar, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from vlora.engine.optimal_sampling import OptimalSamplingParams
from vlora.engine.outputs import ChoiceDelta, TokenLogprob
from vlora.engine.sampling import MAX_N, MAX_STOP_STRINGS, MAX_TOP_LOGPROBS, SamplingParams

__all__ = [
    "ApiError",
    "validation_error_to_api_error",
    "StreamOptions",
    "ChatCompletionRequest",
    "CompletionRequest",
    "chat_completion_response",
    "chat_completion_chunk",
    "completion_response",
    "completion_chunk",
    "models_response",
    "sse",
    "SSE_DONE",
    "TokenizeRequest",
    "DetokenizeRequest",
    "tokenize_response",
]

OWNED_BY = "vlora"
MESSAGE_ROLES = ("system", "developer", "user", "assistant", "tool")
IMAGE_DETAILS = ("auto", "low", "high")
MAX_COMPLETION_LOGPROBS = 5  # legacy /v1/completions caps `logprobs` at 5

# -------------------------------------------------------------------------------------------------
# Errors
# -------------------------------------------------------------------------------------------------

_DEFAULT_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                  404: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error"}


class ApiError(Exception):
    """An error with OpenAI's JSON shape; the Ingress returns `to_json()` with `status`.

    Raised anywhere (also inside Ray replicas: `__reduce__` keeps every field across pickling).
    `retry_after` (seconds) goes out as a Retry-After header on 429 / 503.
    """

    def __init__(
        self,
        status: int,
        message: str,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        retry_after: int | None = None,
    ):
        super().__init__(message)
        self.status = int(status)
        self.message = message
        self.type = type or _DEFAULT_TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        self.param = param
        self.code = code
        self.retry_after = retry_after

    def __reduce__(self):
        return (type(self), (self.status, self.message, self.type, self.param, self.code, self.retry_after))

    def __repr__(self) -> str:
        return f"ApiError({self.status}, {self.message!r}, type={self.type!r}, param={self.param!r}, code={self.code!r})"

    def __str__(self) -> str:
        return self.message

    def to_json(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        """HTTP headers to send with the error (Retry-After when known)."""
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}

    @classmethod
    def model_not_found(cls, model: str) -> ApiError:
        """What OpenAI answers for an unknown model: 404, invalid_request_error, code model_not_found."""
        return cls(404, f"The model `{model}` does not exist or you do not have access to it.",
                   "invalid_request_error", "model", "model_not_found")

    @classmethod
    def unsupported(cls, param: str) -> ApiError:
        return cls(400, f"{param} is not supported by this server", param=param, code="unsupported_parameter")


def _path(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def validation_error_to_api_error(exc: pydantic.ValidationError) -> ApiError:
    """One readable 400 from pydantic's error list: "<field path>: <problem>" for the first error.

    Our own checks (see `_invalid`) already word the whole message and carry the param path.
    """
    errors = exc.errors(include_url=False)
    if not errors:
        return ApiError(400, "invalid request")
    err = errors[0]
    ctx = err.get("ctx") or {}
    if err["type"] == "invalid_request" and "param" in ctx:
        param, message = ctx["param"], err["msg"]
    else:
        param = _path(err.get("loc", ())) or None
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        message = f"{param or 'request body'}: {msg}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    return ApiError(400, message, "invalid_request_error", param)


def _invalid(param: str, message: str) -> PydanticCustomError:
    """A validation error whose message is shown as is and whose `param` is the exact JSON path."""
    return PydanticCustomError("invalid_request", message, {"param": param})


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# -------------------------------------------------------------------------------------------------
# Requests
# -------------------------------------------------------------------------------------------------

# Parameters we accept only at their "off" value; anything else is a 400 rather than silently ignored.
_UNSUPPORTED_UNLESS: dict[str, Callable[[Any], bool]] = {
    "functions": lambda v: v is None or v == [],
    "function_call": lambda v: v in (None, "none", "auto"),
    "logit_bias": lambda v: v is None or v == {},
    "audio": lambda v: v is None,
    "modalities": lambda v: v is None or v == ["text"],
    # vLLM extras this server does not implement: a 400 naming the field, never a silent no-op
    **{name: (lambda v: v is None) for name in (
        "guided_grammar", "guided_whitespace_pattern", "prompt_logprobs", "truncate_prompt_tokens",
        "allowed_token_ids", "chat_template", "documents", "mm_processor_kwargs", "logits_processors")},
    "guided_decoding_backend": lambda v: v in (None, "auto", "xgrammar"),
    "repetition_penalty": lambda v: v is None or v == 1,
    "length_penalty": lambda v: v is None or v == 1,
    "use_beam_search": lambda v: v in (None, False),
    "bad_words": lambda v: v is None or v == [],
    "continue_final_message": lambda v: v in (None, False),
    "add_generation_prompt": lambda v: v in (None, True),
    "chat_template_kwargs": lambda v: v is None or v == {},
}
# Chat-only ones (legacy completions validate its own echo / best_of).
_CHAT_UNSUPPORTED_UNLESS: dict[str, Callable[[Any], bool]] = {
    "echo": lambda v: v in (None, False),
    "best_of": lambda v: v in (None, 1),
}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False  # vLLM: every chunk carries the usage so far


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # seeds: torch.long's range, as vLLM checks
MAX_BATCH_PROMPTS = 64  # prompts of one /v1/completions request


class _SamplingRequest(BaseModel):
    """Fields shared by chat and legacy completions, OpenAI's plus the vLLM extras clients send.

    Every field accepts an explicit null (some clients send them) meaning "default". Strict types:
    "0.5" is not a temperature. Unknown fields are ignored, since newer SDKs add fields.
    """

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    stop: list[str] | None = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    n: int | None = Field(None, ge=1, le=MAX_N)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM-style extras
    top_k: int | None = None
    min_p: float | None = None
    min_tokens: int | None = Field(None, ge=0)
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None  # accepted, ignored: output never contains special tokens
    # passthrough for a later feature
    optimal_sampling: OptimalSamplingOptions | None = None
    # structured outputs (vLLM's extras); turned into a grammar by deployments/structured_api.py
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    structured_outputs: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _reject_unsupported(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            for name, ok in _UNSUPPORTED_UNLESS.items():
                if name in data and not ok(data[name]):
                    raise _invalid(name, f"{name} is not supported by this server")
        return data

    @field_validator("stop", mode="before")
    @classmethod
    def _check_stop(cls, v: Any) -> Any:
        if v is None:
            return None
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
            raise _invalid("stop", "stop must be a string or a list of strings")
        if len(v) > MAX_STOP_STRINGS:
            raise _invalid("stop", f"stop may have at most {MAX_STOP_STRINGS} strings, got {len(v)}")
        if any(not s for s in v):
            raise _invalid("stop", "stop strings must not be empty")
        return v

    @model_validator(mode="after")
    def _check_stream_options(self):
        if self.stream_options is not None and not self.stream:
            raise _invalid("stream_options", "stream_options is only allowed when stream is true")
        return self

    @property
    def include_usage(self) -> bool:
        """Whether a streamed response ends with a usage chunk (`stream_options.include_usage`)."""
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        """Whether every streamed chunk carries the usage so far (vLLM's `continuous_usage_stats`)."""
        return bool(self.stream and self.stream_options and self.stream_options.continuous_usage_stats)

    def _sampling_kwargs(self) -> dict[str, Any]:
        return dict(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            min_p=self.min_p or 0.0,
            seed=self.seed,
            stop=list(self.stop or []),
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=bool(self.ignore_eos),
            include_stop_str_in_output=bool(self.include_stop_str_in_output),
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            n=self.n or 1,
            min_tokens=self.min_tokens or 0,
        )


def _sampling_params(**kwargs) -> SamplingParams:
    """SamplingParams, with its ValueError turned into a 400 naming the parameter it complains about."""
    try:
        return SamplingParams(**kwargs)
    except ValueError as e:
        msg = str(e)
        first = msg.split(" ", 1)[0].split("=", 1)[0]
        raise ApiError(400, msg, "invalid_request_error", first if first in kwargs else None) from None


def _check_content_part(part: Any, role: str, where: str) -> None:
    if not isinstance(part, Mapping):
        raise _invalid(where, f"{where} must be an object with a 'type'")
    kind = part.get("type")
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise _invalid(f"{where}.text", f"{where}.text must be a string")
    elif kind == "image_url":
        if role != "user":
            raise _invalid(where, f"{where}: image parts are only allowed in user messages, not {role!r}")
        image_url = part.get("image_url")
        if not isinstance(image_url, Mapping):  # OpenAI's shape: {"url": ..., "detail"?}, never a bare string
            raise _invalid(f"{where}.image_url", f"{where}.image_url must be an object "
                                                 '{"url": "<http(s) or data: URL>"}, got ' + _short(image_url))
        url = image_url.get("url")
        if not isinstance(url, str) or not url:
            raise _invalid(f"{where}.image_url.url", f"{where}.image_url.url must be a non-empty string (an http(s) or data: URL)")
        detail = image_url.get("detail")
        if detail is not None and detail not in IMAGE_DETAILS:
            raise _invalid(f"{where}.image_url.detail", f"{where}.image_url.detail must be one of {', '.join(IMAGE_DETAILS)}, got {_short(detail)}")
    else:
        raise _invalid(f"{where}.type", f"{where}.type {_short(kind)} is not supported; supported content part types are 'text' and 'image_url'")


def check_messages(messages: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """Validate OpenAI chat messages (roles, content parts); `name` prefixes every error path."""
    if not messages:
        raise _invalid(name, f"{name} must contain at least one message")
    for i, message in enumerate(messages):
        where = f"{name}[{i}]"
        if not isinstance(message, dict):
            raise _invalid(where, f"{where} must be an object with role and content")
        role = message.get("role")
        if role not in MESSAGE_ROLES:
            raise _invalid(f"{where}.role", f"{where}.role {_short(role)} is not supported; expected one of {', '.join(MESSAGE_ROLES)}")
        if message.get("tool_calls") and role != "assistant":
            raise _invalid(f"{where}.tool_calls", f"{where}.tool_calls is only allowed on assistant messages")
        for key in ("function_call", "audio"):
            if message.get(key):
                raise _invalid(f"{where}.{key}", f"{where}.{key} is not supported by this server")
        content = message.get("content")
        if content is None and role == "assistant":
            continue
        if role == "tool" and isinstance(content, list) and any(
                isinstance(p, Mapping) and p.get("type") != "text" for p in content):
            raise _invalid(f"{where}.content", f"{where}.content: a tool message may only hold text")
        if isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise _invalid(f"{where}.content", f"{where}.content must be a string or a list of content parts")
        for j, part in enumerate(content):
            _check_content_part(part, role, f"{where}.content[{j}]")
    return messages


class OptimalSamplingOptions(BaseModel):
    """The `optimal_sampling` request object (OpenAI SDK users send it with `extra_body`)."""

    model_config = ConfigDict(extra="forbid")

    teacher: str = Field(min_length=1)
    teacher_messages: list[dict[str, Any]] | None = None
    teacher_prompt: str | None = None
    alpha_method: Literal["fixed", "kl_symmetry", "reverse_kl_symmetry", "ess_balance", "entropy"] = "kl_symmetry"
    fixed_alpha: float = Field(0.5, ge=0, le=1)
    alpha_min: float = Field(0.0, ge=0, le=1)
    alpha_max: float = Field(1.0, ge=0, le=1)
    teacher_top_k: int = Field(0, ge=0)
    teacher_top_p: float = Field(1.0, gt=0, le=1)
    return_diagnostics: bool = True
    force_teacher_first_token: bool = False
    force_teacher_special_tokens: bool = False

    @field_validator("teacher_messages")
    @classmethod
    def _check_teacher_messages(cls, v):
        return None if v is None else check_messages(v, "optimal_sampling.teacher_messages")

    @model_validator(mode="after")
    def _check_alpha_range(self):
        if self.alpha_min > self.alpha_max:
            raise _invalid("optimal_sampling.alpha_min",
                           f"optimal_sampling.alpha_min ({self.alpha_min}) must be <= alpha_max ({self.alpha_max})")
        return self

    def to_params(self) -> OptimalSamplingParams:
        return OptimalSamplingParams(
            teacher=self.teacher, alpha_method=self.alpha_method, fixed_alpha=self.fixed_alpha,
            alpha_min=self.alpha_min, alpha_max=self.alpha_max, teacher_top_k=self.teacher_top_k,
            teacher_top_p=self.teacher_top_p, return_diagnostics=self.return_diagnostics,
            force_teacher_first_token=self.force_teacher_first_token,
            force_teacher_special_tokens=self.force_teacher_special_tokens)


class ChatCompletionRequest(_SamplingRequest):
    """POST /v1/chat/completions. `messages` stay plain dicts (validated here) for the prompt builder."""

    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name; wins over max_tokens
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    @field_validator("messages")
    @classmethod
    def _check_messages(cls, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return check_messages(messages, "messages")

    @model_validator(mode="before")
    @classmethod
    def _reject_chat_unsupported(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            for name, ok in _CHAT_UNSUPPORTED_UNLESS.items():
                if name in data and not ok(data[name]):
                    raise _invalid(name, f"{name} is not supported by this server")
        return data

    @model_validator(mode="after")
    def _check_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise _invalid("top_logprobs", "top_logprobs requires logprobs to be true")
        if self.optimal_sampling is not None and self.optimal_sampling.teacher_prompt is not None:
            raise _invalid("optimal_sampling.teacher_prompt",
                           "optimal_sampling.teacher_prompt is for /v1/completions; use teacher_messages here")
        return self

    def to_sampling_params(self, default_max_tokens: int) -> SamplingParams:
        """Engine parameters; without max_tokens / max_completion_tokens, `default_max_tokens`
        (the room left in the context) applies."""
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return _sampling_params(
            max_tokens=default_max_tokens if max_tokens is None else max_tokens,
            logprobs=bool(self.logprobs),
            top_logprobs=self.top_logprobs or 0,
            **self._sampling_kwargs(),
        )


class CompletionRequest(_SamplingRequest):
    """POST /v1/completions (legacy): `prompt` is a text, a list of token ids, or a batch of either
    (kept as a list of prompts: str or list[int] each); `logprobs` is the number of top logprobs (0..5).
    Choice `i * n + j` is sample j of prompt i, as OpenAI and vLLM number them.

    max_tokens defaults to 16 as in OpenAI's (and vLLM's) legacy endpoint.
    """

    DEFAULT_MAX_TOKENS: ClassVar[int] = 16

    prompt: list[str | list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompts(cls, v: Any) -> Any:
        """The four shapes OpenAI accepts, as a list of prompts."""
        def token_ids(p: Any) -> bool:
            return isinstance(p, list) and bool(p) and all(isinstance(t, int) and not isinstance(t, bool) for t in p)

        if isinstance(v, str):
            prompts = [v]
        elif token_ids(v):
            prompts = [v]
        elif isinstance(v, list) and v and all(isinstance(p, str) or token_ids(p) for p in v):
            prompts = v
        else:
            raise _invalid("prompt", "prompt must be a string, a list of strings, a non-empty list of token ids, "
                                     "or a list of such lists")
        if len(prompts) > MAX_BATCH_PROMPTS:
            raise _invalid("prompt", f"prompt: at most {MAX_BATCH_PROMPTS} prompts per request, got {len(prompts)}")
        return prompts

    @model_validator(mode="after")
    def _check_unsupported(self):
        if self.echo:
            raise _invalid("echo", "echo is not supported by this server")
        if self.suffix:
            raise _invalid("suffix", "suffix is not supported by this server")
        if self.best_of is not None and self.best_of not in (1, self.n or 1):
            raise _invalid("best_of", "best_of is not supported by this server (use n)")
        if self.optimal_sampling is not None and self.optimal_sampling.teacher_messages is not None:
            raise _invalid("optimal_sampling.teacher_messages",
                           "optimal_sampling.teacher_messages is for /v1/chat/completions; use teacher_prompt here")
        return self

    def to_sampling_params(self, default_max_tokens: int) -> SamplingParams:
        """Engine parameters; without max_tokens, OpenAI's 16 (capped at `default_max_tokens`)."""
        max_tokens = self.max_tokens if self.max_tokens is not None else min(self.DEFAULT_MAX_TOKENS, default_max_tokens)
        return _sampling_params(
            max_tokens=max_tokens,
            logprobs=self.logprobs is not None,
            top_logprobs=self.logprobs or 0,
            **self._sampling_kwargs(),
        )


# -------------------------------------------------------------------------------------------------
# Responses
# -------------------------------------------------------------------------------------------------

Decode = Callable[[int], "str | bytes"]


class _Tokens:
    """Memoised token-id -> (text, utf-8 bytes); a decoder may return bytes to give exact bytes
    for tokens that are only part of a UTF-8 character."""

    def __init__(self, decode: Decode):
        self.decode = decode
        self.cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        hit = self.cache.get(token_id)
        if hit is None:
            out = self.decode(token_id)
            raw = out if isinstance(out, bytes) else out.encode("utf-8")
            text = out.decode("utf-8", errors="replace") if isinstance(out, bytes) else out
            hit = self.cache[token_id] = (text, list(raw))
        return hit


def _prefixed(prefix: str, request_id: str) -> str:
    return request_id if request_id.startswith(prefix) else prefix + request_id


def _usage(usage: tuple[int, int]) -> dict:
    prompt, completion = usage
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _chat_logprobs(logprobs: list[TokenLogprob] | None, tokens: _Tokens) -> dict | None:
    if logprobs is None:
        return None
    content = []
    for lp in logprobs:
        text, raw = tokens(lp.token_id)
        top = []
        for tid, value in lp.top:
            t, b = tokens(tid)
            top.append({"token": t, "logprob": value, "bytes": b})
        content.append({"token": text, "logprob": lp.logprob, "bytes": raw, "top_logprobs": top})
    return {"content": content, "refusal": None}


def _legacy_logprobs(logprobs: list[TokenLogprob] | None, tokens: _Tokens, offset: int = 0) -> dict | None:
    """Legacy completions format; each top dict also holds the sampled token, as OpenAI's does."""
    if logprobs is None:
        return None
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for lp in logprobs:
        text, _ = tokens(lp.token_id)
        top = {tokens(tid)[0]: value for tid, value in lp.top}
        top.setdefault(text, lp.logprob)
        out["tokens"].append(text)
        out["token_logprobs"].append(lp.logprob)
        out["top_logprobs"].append(top)
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def _envelope(id_prefix: str, obj: str, request_id: str, model: str, created: int, choices: list,
              system_fingerprint: str | None, usage: tuple[int, int] | None, extra: Mapping[str, Any] | None) -> dict:
    """The fields every response and chunk shares; `usage` only where given (a chunk's is the last one)."""
    body = {"id": _prefixed(id_prefix, request_id), "object": obj, "created": int(created), "model": model,
            "choices": choices, "system_fingerprint": system_fingerprint}
    if usage is not None:
        body["usage"] = _usage(usage)
    body.update(extra or {})
    return body


def _per_choice(values: list | None, n: int) -> list:
    return list(values) if values is not None else [None] * n


def chat_completion_response(
    request_id: str,
    model: str,
    created: int,
    choices_text: list[str],
    finish_reasons: list[str | None],
    logprobs: list[list[TokenLogprob] | None] | None,
    usage: tuple[int, int],
    tokenizer_decode: Decode,
    extra: Mapping[str, Any] | None = None,
    system_fingerprint: str | None = None,
) -> dict:
    """A whole `chat.completion` object; `logprobs[i]` is None where choice i has none."""
    tokens = _Tokens(tokenizer_decode)
    lps = _per_choice(logprobs, len(choices_text))
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": text, "refusal": None},
            "logprobs": _chat_logprobs(lps[i], tokens),
            "finish_reason": finish_reasons[i],
        }
        for i, text in enumerate(choices_text)
    ]
    return _envelope("chatcmpl-", "chat.completion", request_id, model, created, choices, system_fingerprint,
                     usage, extra)


def chat_completion_chunk(
    request_id: str,
    model: str,
    created: int,
    deltas: list[ChoiceDelta],
    tokenizer_decode: Decode | None = None,
    *,
    role_for: Collection[int] = (),
    usage: tuple[int, int] | None = None,
    extra: Mapping[str, Any] | None = None,
    system_fingerprint: str | None = None,
) -> dict:
    """One `chat.completion.chunk`. Choices whose index is in `role_for` carry `role: assistant`
    (send it on each choice's first chunk). With `usage` (and usually `deltas=[]`) this is the
    final usage chunk that `stream_options.include_usage` asks for."""
    tokens = _Tokens(tokenizer_decode) if tokenizer_decode is not None else None
    choices = []
    for d in deltas:
        delta: dict[str, Any] = {}
        if d.index in role_for:
            delta["role"] = "assistant"
        if d.text or delta or d.logprobs:
            delta["content"] = d.text
        lp = None
        if d.logprobs is not None:
            if tokens is None:
                raise ValueError("tokenizer_decode is needed to render logprobs")
            lp = _chat_logprobs(d.logprobs, tokens)
        choices.append({"index": d.index, "delta": delta, "logprobs": lp, "finish_reason": d.finish_reason})
    return _envelope("chatcmpl-", "chat.completion.chunk", request_id, model, created, choices, system_fingerprint,
                     usage, extra)


def completion_response(
    request_id: str,
    model: str,
    created: int,
    choices_text: list[str],
    finish_reasons: list[str | None],
    logprobs: list[list[TokenLogprob] | None] | None,
    usage: tuple[int, int],
    tokenizer_decode: Decode,
    extra: Mapping[str, Any] | None = None,
    system_fingerprint: str | None = None,
) -> dict:
    """A whole legacy `text_completion` object (logprobs in the legacy tokens/top_logprobs format)."""
    tokens = _Tokens(tokenizer_decode)
    lps = _per_choice(logprobs, len(choices_text))
    choices = [
        {"index": i, "text": text, "logprobs": _legacy_logprobs(lps[i], tokens), "finish_reason": finish_reasons[i]}
        for i, text in enumerate(choices_text)
    ]
    return _envelope("cmpl-", "text_completion", request_id, model, created, choices, system_fingerprint, usage, extra)


def completion_chunk(
    request_id: str,
    model: str,
    created: int,
    deltas: list[ChoiceDelta],
    tokenizer_decode: Decode | None = None,
    *,
    text_offsets: Mapping[int, int] | None = None,
    usage: tuple[int, int] | None = None,
    extra: Mapping[str, Any] | None = None,
    system_fingerprint: str | None = None,
) -> dict:
    """One streamed `text_completion` chunk. `text_offsets[index]` is the length of the text
    already streamed for that choice (the caller adds `len(delta.text)` after each chunk), so
    legacy `text_offset`s continue across chunks. With `usage`, the final usage chunk."""
    tokens = _Tokens(tokenizer_decode) if tokenizer_decode is not None else None
    choices = []
    for d in deltas:
        lp = None
        if d.logprobs is not None:
            if tokens is None:
                raise ValueError("tokenizer_decode is needed to render logprobs")
            lp = _legacy_logprobs(d.logprobs, tokens, (text_offsets or {}).get(d.index, 0))
        choices.append({"index": d.index, "text": d.text, "logprobs": lp, "finish_reason": d.finish_reason})
    return _envelope("cmpl-", "text_completion", request_id, model, created, choices, system_fingerprint, usage, extra)


def models_response(
    base_model: str,
    adapters: list[Mapping[str, Any]],
    created: int,
    max_model_len: int | None = None,
) -> dict:
    """GET /v1/models in vLLM's shape: the base model (parent None), then each adapter with
    `root` = adapter name and `parent` = base model. Adapter dicts need `name`; `version` and
    `created` are shown when given."""
    base = {"id": base_model, "object": "model", "created": int(created), "owned_by": OWNED_BY,
            "root": base_model, "parent": None}
    if max_model_len is not None:
        base["max_model_len"] = max_model_len
    data = [base]
    for a in adapters:
        entry = {"id": a["name"], "object": "model", "created": int(a.get("created") or created),
                 "owned_by": OWNED_BY, "root": a["name"], "parent": base_model}
        if a.get("version") is not None:
            entry["version"] = a["version"]
        if max_model_len is not None:
            entry["max_model_len"] = max_model_len
        data.append(entry)
    return {"object": "list", "data": data}


def optimal_sampling_summary(diagnostics: list[dict]) -> dict:
    """A choice's `optimal_sampling` field: per-token diagnostics plus their means."""
    n = max(1, len(diagnostics))
    return {"diagnostics": diagnostics,
            "mean_alpha": sum(d["alpha"] for d in diagnostics) / n,
            "mean_ess_ratio": sum(d["ess_ratio"] for d in diagnostics) / n}


def attach_diagnostics(body: dict, per_choice: Mapping[int, list[dict]], summary: bool) -> dict:
    """Add `optimal_sampling` to each choice of a response (summary=True) or chunk (summary=False)."""
    for choice in body["choices"]:
        diags = per_choice.get(choice["index"])
        if diags is not None:
            choice["optimal_sampling"] = optimal_sampling_summary(diags) if summary else {"diagnostics": diags}
    return body


SSE_DONE = b"data: [DONE]\n\n"


def sse(data: Mapping[str, Any] | str) -> bytes:
    """One server-sent event: `data: <json>\\n\\n` (a str is sent as is, e.g. pre-serialised JSON)."""
    if not isinstance(data, str):
        data = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return b"data: " + data.encode("utf-8") + b"\n\n"


# -------------------------------------------------------------------------------------------------
# vLLM's tokenizer routes: POST /tokenize and POST /detokenize
# -------------------------------------------------------------------------------------------------

class TokenizeRequest(BaseModel):
    """vLLM's TokenizeCompletionRequest (`prompt`) or TokenizeChatRequest (`messages`, chat template applied)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool | None = None  # vLLM's defaults: True for a prompt, False for messages
    return_token_strs: bool = False
    continue_final_message: bool = False

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise _invalid("prompt", "give exactly one of prompt (text) or messages (chat)")
        if self.messages is not None:
            check_messages(self.messages, "messages")
        if self.continue_final_message:
            raise _invalid("continue_final_message", "continue_final_message is not supported by this server")
        return self


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    tokens: list[int]


def tokenize_response(tokens: list[int], max_model_len: int, token_strs: list[str] | None) -> dict:
    return {"count": len(tokens), "max_model_len": max_model_len, "tokens": tokens, "token_strs": token_strs}
