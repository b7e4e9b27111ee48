"""A thin Python client for a vlora server.

The server speaks the OpenAI API, so the official `openai` SDK does the real work (retries,
streaming, typed responses); this module only adds what the SDK cannot know: how to turn
a local image into a message part, which model is the base model, and the project's own
`/health` route.
"""

from __future__ import annotations

import base64
import mimetypes
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import httpx
import openai

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT_S = 600.0  # generous: a cold replica may compile before its first token

# Magic numbers for the formats the server's image loader accepts, used when the file name
# has no (or a misleading) extension.
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
)


def _image_mime(path: Path, data: bytes) -> str:
    for magic, mime in _MAGIC:
        if data.startswith(magic):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    guessed, _ = mimetypes.guess_type(path.name)
    if guessed and guessed.startswith("image/"):
        return guessed
    raise ValueError(f"{path}: not a recognised image (PNG, JPEG, GIF, BMP or WebP)")


def data_url(data: bytes, mime: str) -> str:
    """`data:<mime>;base64,...`: how an image travels inline in an OpenAI chat request."""
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def image_part(path_or_url: str | os.PathLike) -> dict:
    """An OpenAI `image_url` content part. A local file is inlined as a base64 data URL (the
    server cannot read the client's disk); http(s) and data URLs are passed through as they are."""
    s = os.fspath(path_or_url)
    if s.startswith(("http://", "https://", "data:")):
        url = s
    else:
        path = Path(s).expanduser()
        data = path.read_bytes()
        url = data_url(data, _image_mime(path, data))
    return {"type": "image_url", "image_url": {"url": url}}


def user_message(text: str, images: Iterable[str | os.PathLike] = ()) -> dict:
    """A user turn: images first, then the text (Qwen-VL's own chat examples put images first).
    Without images the content stays a plain string, the form every OpenAI server accepts."""
    parts = [image_part(i) for i in images]
    if not parts:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


class VloraClient:
    """One connection to a vlora server: `self.openai` for the OpenAI routes, `health()` for ours.

    >>> c = VloraClient("http://127.0.0.1:8000")
    >>> c.chat([user_message("What is in this picture?", ["cat.png"])]).choices[0].message.content
    """

    def __init__(self, base_url: str = DEFAULT_URL, api_key: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT_S, max_retries: int = 2):
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self.max_retries = max_retries
        # The SDK insists on a key; a server without keys ignores the header.
        self.openai = openai.OpenAI(base_url=self.base_url + "/v1", api_key=api_key or "EMPTY",
                                    timeout=timeout, max_retries=max_retries)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)
        self._base_model: str | None = None

    def async_openai(self, **overrides: Any) -> openai.AsyncOpenAI:
        """An `AsyncOpenAI` for the same server and key (for load generation and async apps)."""
        kw = dict(base_url=self.base_url + "/v1", api_key=self.api_key or "EMPTY",
                  timeout=self.timeout, max_retries=self.max_retries)
        kw.update(overrides)
        return openai.AsyncOpenAI(**kw)

    def models(self) -> list[dict]:
        """`GET /v1/models` as plain dicts, keeping the vLLM extras (`parent`, `root`, `version`)."""
        return [m.model_dump() for m in self.openai.models.list()]

    def base_model(self) -> str:
        """The served base model: the first model without a `parent` (adapters have one)."""
        if self._base_model is None:
            models = self.models()
            base = next((m for m in models if m.get("parent") is None), None)
            if base is None:
                raise LookupError(f"{self.base_url}/v1/models lists no base model (every model has a parent)")
            self._base_model = base["id"]
        return self._base_model

    def chat(self, messages: str | Sequence[dict], model: str | None = None, stream: bool = False, **params: Any):
        """`chat.completions.create` with the base model as default; a str is one user turn.
        Returns the SDK's `ChatCompletion`, or its `Stream` of chunks when `stream=True`.
        Adapter names go in `model`; vLLM-style extras (`ignore_eos`, `top_k`) in `extra_body`."""
        if isinstance(messages, str):
            messages = [user_message(messages)]
        return self.openai.chat.completions.create(
            model=model or self.base_model(), messages=list(messages), stream=stream, **params)

    def health(self) -> dict:
        """`GET /health`. A degraded server answers 503 with the same JSON body, which is
        returned too (its `status` says "degraded"); other failures raise `httpx.HTTPError`."""
        r = self.http.get("/health")
        if r.status_code in (200, 503) and r.headers.get("content-type", "").startswith("application/json"):
            return r.json()
        r.raise_for_status()
        return r.json()

    def close(self) -> None:
        self.openai.close()
        self.http.close()

    def __enter__(self) -> VloraClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
