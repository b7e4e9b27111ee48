"""A thin Python client for a vlora server.

The server speaks the OpenAI API, so the official `openai` SDK does the real work (retries,
streaming, typed responses); this module only adds what the SDK cannot know: how to turn
a local image into a message part, which model is the base model, the project's own
`/health` route, and the admin routes for versioned adapters (`/v1/adapters...`: list, load,
delete, roll back, learn) with the JSONL training-data reader the `vlora learn` command uses.
"""

from __future__ import annotations

import base64
import json
import mimetypes
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

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


class VloraAPIError(Exception):
    """An admin call the server refused (`status`, its `message`), or a learn job that failed
    (then `job` is the failed job, with the losses it got to)."""

    def __init__(self, status: int, message: str, job: dict | None = None):
        super().__init__(f"{status} {message}")
        self.status = status
        self.message = message
        self.job = job

    @classmethod
    def from_response(cls, r: httpx.Response) -> VloraAPIError:
        """The message of an OpenAI error body (`{"error": {"message": ...}}`), else the text."""
        try:
            body = r.json()
        except ValueError:
            body = None
        err = body.get("error") if isinstance(body, dict) else None
        if isinstance(err, dict) and err.get("message"):
            message = str(err["message"])
        elif isinstance(err, str) and err:
            message = err
        elif isinstance(body, dict) and isinstance(body.get("detail"), str):  # FastAPI's own errors
            message = body["detail"]
        else:
            message = r.text.strip() or r.reason_phrase
        return cls(r.status_code, message)


# -- training examples -------------------------------------------------------------------------
_REMOTE_URL = ("http://", "https://", "data:")


def _inline_part(part: Any, base_dir: Path, where: str) -> Any:
    """An `image_url` part whose url is a local path becomes a data URL (relative paths are
    taken from `base_dir`); a Qwen-style `{"type": "image", "image": path}` part becomes an
    `image_url` part. Anything else is left for the server to judge."""
    if not isinstance(part, dict):
        return part
    if part.get("type") == "image_url":
        inner = part.get("image_url")
        url = inner.get("url") if isinstance(inner, dict) else inner
    elif part.get("type") == "image" and isinstance(part.get("image"), str):
        inner, url = None, part["image"]
    else:
        return part
    if not isinstance(url, str) or url.startswith(_REMOTE_URL):
        return part if part.get("type") == "image_url" else {"type": "image_url", "image_url": {"url": url}}
    local = url[len("file://"):] if url.startswith("file://") else url
    path = Path(local).expanduser()
    if not path.is_absolute():
        path = base_dir / path
    try:
        inlined = image_part(path)["image_url"]["url"]
    except OSError as e:
        raise ValueError(f"{where}: cannot read image {url!r} ({e.strerror or e})") from None
    except ValueError as e:
        raise ValueError(f"{where}: image {url!r}: {e}") from None
    return {"type": "image_url", "image_url": {**(inner if isinstance(inner, dict) else {}), "url": inlined}}


def _inline_images(messages: list, base_dir: Path) -> list:
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}] is not an object")
        content = message.get("content")
        if isinstance(content, list):
            message = {**message, "content": [_inline_part(part, base_dir, f"messages[{i}].content[{j}]")
                                               for j, part in enumerate(content)]}
        out.append(message)
    return out


def example_from_record(record: Any, base_dir: str | os.PathLike = ".") -> dict:
    """One training example, `{"messages": [...]}`, from one JSONL record. Accepted records:

    - `{"messages": [...]}` (OpenAI chat format; other keys are dropped);
    - `{"prompt": [messages] | "text", "output": "assistant text", ...}` (the sampled-data
      format): the prompt's messages (a string is one user turn, with the record's optional
      `images` list attached) followed by an assistant turn holding `output`.

    Local image paths in `image_url` parts become base64 data URLs (the server cannot read the
    client's disk), relative ones taken from `base_dir`. Raises ValueError saying what is wrong."""
    base = Path(base_dir).expanduser()
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' must be a non-empty list of chat messages")
    elif "prompt" in record:
        output = record.get("output")
        if not isinstance(output, str):
            raise ValueError("a record with 'prompt' needs an 'output' string (the assistant's answer)")
        messages = [*_prompt_list(record["prompt"], record.get("images")), {"role": "assistant", "content": output}]
    else:
        raise ValueError('missing "messages" (expected {"messages": [...]} or {"prompt": ..., "output": "..."})')
    return {"messages": _inline_images(messages, base)}


def _prompt_list(prompt: Any, images: Any = None, key: str = "prompt") -> list:
    if isinstance(prompt, str):
        images = images or []
        if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
            raise ValueError("'images' must be a list of image paths or URLs")
        parts = [{"type": "image_url", "image_url": {"url": i}} for i in images]
        return [{"role": "user", "content": [*parts, {"type": "text", "text": prompt}] if parts else prompt}]
    if isinstance(prompt, list) and prompt:
        return list(prompt)
    raise ValueError(f"'{key}' must be a string or a non-empty list of chat messages")


def prompt_messages(prompt: Any, images: Any = None, base_dir: str | os.PathLike = ".", key: str = "prompt") -> list:
    """The chat messages of a prompt, as `example_from_record` reads them: a string is one user
    turn (with `images`, paths or URLs, before the text), a non-empty list is taken as messages.
    Local image paths become data URLs (relative ones taken from `base_dir`). `key` names the
    field in error messages. Raises ValueError saying what is wrong."""
    return _inline_images(_prompt_list(prompt, images, key), Path(base_dir).expanduser())


def read_jsonl(path: str | os.PathLike, parse, what: str, image_dir: str | os.PathLike | None = None) -> list:
    """`parse(record, base_dir)` for every JSON line of `path` (blank lines skipped). Relative image
    paths are taken from `image_dir`, else from the file's folder. Raises ValueError naming the file
    and line of the first bad record, so nothing is sent for a file with a mistake in it."""
    path = Path(path).expanduser()
    base = Path(image_dir).expanduser() if image_dir is not None else path.parent
    items = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {n}: not valid JSON ({e.msg} at column {e.colno})") from None
            try:
                items.append(parse(record, base))
            except ValueError as e:
                raise ValueError(f"{path} line {n}: {e}") from None
    if not items:
        raise ValueError(f"{path}: no {what} (expected one JSON object per line)")
    return items


def load_examples(path: str | os.PathLike, image_dir: str | os.PathLike | None = None) -> list[dict]:
    """Training examples from a JSONL file (one record per line, see `example_from_record`)."""
    return read_jsonl(path, example_from_record, "examples", image_dir)


class VloraClient:
    """One connection to a vlora server: `self.openai` for the OpenAI routes, `health()` and
    the adapter admin methods (`adapters()`, `load_adapter()`, `learn()`, ...) for ours.

    >>> c = VloraClient("http://127.0.0.1:8000")
    >>> c.chat([user_message("What is in this picture?", ["cat.png"])]).choices[0].message.content
    """

    def __init__(self, base_url: str = DEFAULT_URL, api_key: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT_S, max_retries: int = 2, admin_key: str | None = None):
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.admin_key = admin_key  # for the /v1/adapters routes; falls back to api_key
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

    # -- adapters (admin routes) -------------------------------------------------------------
    def _admin_headers(self) -> dict:
        key = self.admin_key or self.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _admin(self, method: str, path: str, body: dict | None = None) -> dict:
        """One admin call; raises VloraAPIError on an HTTP error status. GETs (idempotent) are
        retried `max_retries` times on connection errors and 502/503/504."""
        attempts = 1 + (self.max_retries if method == "GET" else 0)
        for attempt in range(attempts):
            last = attempt + 1 >= attempts
            try:
                r = self.http.request(method, path, json=body, headers=self._admin_headers())
            except httpx.TransportError:
                if last:
                    raise
            else:
                if last or r.status_code not in (502, 503, 504):
                    break
            time.sleep(min(0.5 * 2 ** attempt, 8.0))
        if r.status_code >= 400:
            raise VloraAPIError.from_response(r)
        try:
            return r.json()
        except ValueError:
            raise VloraAPIError(r.status_code, f"{method} {path} did not answer JSON: {r.text[:200]!r}") from None

    @staticmethod
    def _name(name: str) -> str:
        return quote(name, safe="")

    def adapters(self) -> list[dict]:
        """`GET /v1/adapters`: the current version of every adapter (dicts with name, version,
        checksum, created, origin, parent_version, rank, lora_alpha, ..., metrics)."""
        return self._admin("GET", "/v1/adapters")["data"]

    def adapter(self, name: str) -> dict:
        """`GET /v1/adapters/{name}`: `{"name", "current", "versions": [ascending version dicts]}`."""
        return self._admin("GET", f"/v1/adapters/{self._name(name)}")

    def load_adapter(self, name: str, path: str) -> dict:
        """Publish the PEFT adapter folder `path` (on the server's disk, inside its
        adapter_load_dirs) as the next version of `name`; returns the new version dict."""
        return self._admin("POST", "/v1/adapters", {"name": name, "path": os.fspath(path)})

    def delete_adapter(self, name: str) -> dict:
        return self._admin("DELETE", f"/v1/adapters/{self._name(name)}")

    def rollback_adapter(self, name: str, version: int | None = None) -> dict:
        """Publish a copy of `version` (default: the one before the current) as a NEW version;
        returns that new version's dict (its `parent_version` is the version copied)."""
        body = {} if version is None else {"version": version}
        return self._admin("POST", f"/v1/adapters/{self._name(name)}/rollback", body)

    def job(self, name: str, job_id: str) -> dict:
        """`GET /v1/adapters/{name}/jobs/{id}`: a learn job (status, step, losses, result, error)."""
        return self._admin("GET", f"/v1/adapters/{self._name(name)}/jobs/{self._name(job_id)}")

    def learn(self, name: str, examples: Iterable[dict], *, wait: bool = True, poll_s: float = 0.5,
              on_progress: Callable[[dict], Any] | None = None, **params: Any) -> dict:
        """Train `name` on `examples` (`{"messages": [...]}` dicts) as an async job and, with
        `wait`, poll it every `poll_s` seconds to the end, calling `on_progress(job)` with the
        submitted job and after each poll. Returns the final job (its `result` holds loss_before,
        loss_after and the new `version`); without `wait`, the job as submitted.
        `params`: steps, learning_rate, rank, lora_alpha, target_modules, use_rslora (None = the
        server's default). Raises VloraAPIError when the server refuses or the job fails."""
        body = {"examples": list(examples), **{k: v for k, v in params.items() if v is not None}, "async": True}
        job = self._admin("POST", f"/v1/adapters/{self._name(name)}/learn", body)
        if "status" not in job and "version" in job:  # a server that trained synchronously
            job = {"id": None, "adapter": name, "status": "succeeded", "steps": job.get("steps", 0),
                   "step": job.get("steps", 0), "losses": [], "result": job, "error": None}
        if not wait:
            return job
        while True:
            if on_progress is not None:
                on_progress(job)
            if job.get("status") == "succeeded":
                return job
            if job.get("status") == "failed":
                err = job.get("error") or {}
                raise VloraAPIError(int(err.get("status") or 500), str(err.get("message") or "learn job failed"),
                                    job=job)
            time.sleep(poll_s)
            job = self.job(name, job["id"])

    def generate_data(self, prompts: str | os.PathLike | Iterable[dict], out: str | os.PathLike, *, student: str,
                      teacher: str, image_dir: str | os.PathLike | None = None, progress: bool | None = False,
                      **options: Any) -> dict:
        """Optimal-sampling data generation (`vlora generate-data`): sample each prompt with
        `student` steered by `teacher` ("base" or an adapter) and write one `{"prompt", "output",
        ...diagnostics}` line per sample to `out`, in prompt order. `prompts` is a JSONL path or
        records (`{"messages": [...]}` / `{"prompt": "text"}`, optionally `teacher_messages` /
        `teacher_prompt`); `options` are `client.datagen.DatagenConfig` fields (alpha_method,
        samples_per_prompt, concurrency, ...). Returns the run's summary dict. Runs its own event
        loop, so call it from synchronous code (async code: `client.datagen.run_datagen`)."""
        from vlora.client.datagen import DatagenConfig, generate_data, load_prompts, prompt_from_record

        cfg = DatagenConfig(student=student, teacher=teacher, **options)
        if isinstance(prompts, (str, os.PathLike)):
            records = load_prompts(prompts, image_dir)
        else:
            records = []
            for n, r in enumerate(prompts):
                try:
                    records.append(prompt_from_record(r, image_dir if image_dir is not None else "."))
                except ValueError as e:
                    raise ValueError(f"prompt {n}: {e}") from None
        return generate_data(self, records, out, cfg, progress=progress)

    def close(self) -> None:
        self.openai.close()
        self.http.close()

    def __enter__(self) -> VloraClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
