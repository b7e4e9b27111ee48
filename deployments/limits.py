"""Request limits the Ingress enforces before any work is queued (deployments/config.py RequestLimits).

Each refusal is an ApiError with OpenAI's JSON shape: 413 for a body that is too large (decided
from Content-Length before reading, or while reading a chunked body), 400 for the rest.
"""

from __future__ import annotations

import json
from typing import Any

from vlora.deployments.openai_api import ApiError

RESERVED_ADAPTER_NAMES = ("base",)  # plus the served model's own name


async def read_body(request, max_bytes: int) -> bytes:
    """The raw body, refused with 413 as soon as it is known to exceed `max_bytes`."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(int(declared), max_bytes)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise _too_large(len(body), max_bytes, at_least=True)
    return bytes(body)


def _too_large(size: int, max_bytes: int, at_least: bool = False) -> ApiError:
    return ApiError(413, f"the request body is {'more than ' if at_least else ''}{size} bytes, above the limit of "
                         f"{max_bytes} bytes; send fewer or smaller images (or use image URLs)",
                    code="request_too_large")


def parse_json(raw: bytes, max_depth: int) -> Any:
    """json.loads with a nesting limit: deeper documents are a 400, never a RecursionError (500)."""
    try:
        value = json.loads(raw or b"null")
    except RecursionError:
        raise _too_deep(max_depth) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"request body is not valid JSON: {e}") from None
    if json_depth(value, max_depth) > max_depth:
        raise _too_deep(max_depth)
    return value


def _too_deep(max_depth: int) -> ApiError:
    return ApiError(400, f"the JSON body is nested more than {max_depth} levels deep", code="json_too_deep")


def json_depth(value: Any, stop_at: int) -> int:
    """Nesting depth of containers (a scalar is 0); stops counting past `stop_at`. Iterative."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            children = v.values()
        elif isinstance(v, list):
            children = v
        else:
            continue
        deepest = max(deepest, d)
        if deepest > stop_at:
            return deepest
        stack.extend((c, d + 1) for c in children if isinstance(c, (dict, list)))
    return deepest


def check_json_content_type(request) -> None:
    """A JSON route takes `Content-Type: application/json` only: vLLM answers anything else with 400."""
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        raise ApiError(400, f"Content-Type {media or '(none)'} is not supported: send the body as JSON with "
                            "Content-Type: application/json", code="unsupported_media_type")


async def read_json(request, limits) -> dict:
    """The body as a JSON object (Content-Type application/json), within `limits` (RequestLimits)."""
    raw = await read_body(request, limits.max_body_bytes)  # 413 first: decided from Content-Length
    check_json_content_type(request)
    body = parse_json(raw, limits.max_json_depth)
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    return body


def count_images(messages: list[dict] | None) -> int:
    return sum(1 for m in messages or () if isinstance(m, dict) and isinstance(m.get("content"), list)
               for p in m["content"] if isinstance(p, dict) and p.get("type") == "image_url")


def check_sampling_limits(req, limits, vocab_size: int) -> None:
    """stop_token_ids (count and range) and stop strings (length) of a validated completion request."""
    ids = req.stop_token_ids or []
    if len(ids) > limits.max_stop_token_ids:
        raise ApiError(400, f"stop_token_ids may have at most {limits.max_stop_token_ids} entries, got {len(ids)}",
                       param="stop_token_ids")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise ApiError(400, f"stop_token_ids {bad[:5]} are outside the vocabulary [0, {vocab_size})",
                       param="stop_token_ids")
    long = [s for s in req.stop or () if len(s) > limits.max_stop_string_chars]
    if long:
        raise ApiError(400, f"stop strings may be at most {limits.max_stop_string_chars} characters, got one of "
                            f"{len(long[0])}", param="stop")


def check_image_count(messages_lists, max_images: int) -> None:
    n = sum(count_images(m) for m in messages_lists)
    if n > max_images:
        raise ApiError(400, f"the request has {n} images; at most {max_images} are allowed per request",
                       param="messages", code="too_many_images")


def check_adapter_name(name: Any, model_name: str) -> str:
    """Names the API resolves to the base model can never name an adapter."""
    if isinstance(name, str) and name in (model_name, *RESERVED_ADAPTER_NAMES):
        raise ApiError(400, f"adapter name {name!r} is reserved (the base model is served as {model_name!r} and "
                            "'base' names it as an optimal-sampling teacher); choose another name", param="name")
    return name


def check_adapter_count(adapters: set[str | None], max_loras: int) -> None:
    """A request whose student and teacher need more adapter slots than a replica has would wait forever."""
    needed = {a for a in adapters if a is not None and a != "base"}
    if len(needed) > max_loras:
        raise ApiError(400, f"the request needs {len(needed)} distinct adapters ({', '.join(sorted(needed))}) but a "
                            f"replica holds at most {max_loras} (max_loras)", param="model")
