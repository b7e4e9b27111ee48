"""Ingress deployment: the OpenAI-compatible HTTP API (FastAPI), auth, SSE streaming.

It never touches pixels or embeddings. A text-only prompt is tokenized here and goes straight to
the Decoder; a prompt with images goes Preprocessor -> VisionEncoder -> Decoder, each response
handed on unawaited (deployments/prompt_routes.py). A streamed request relays the Decoder's
batched items as SSE chunks; a non-streamed one makes one unary Decoder call.
"""


import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.serve.exceptions import BackPressureError
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from vlora.deployments import limits
from vlora.deployments.auth import KeyCheck
from vlora.deployments.config import AppConfig
from vlora.deployments.errors import api_error_for
from vlora.deployments.health import health_report
from vlora.deployments.metrics import IngressMetrics, RequestRecord, api_snapshot, get_logger
from vlora.deployments.messages import DecoderStream, output_from_wire
from vlora.deployments.metrics_hub import get_hub as get_metrics_hub, render as render_metrics
from vlora.deployments.prompt_batch import MergedStream, PromptBatch
from vlora.deployments.prompt_routes import PromptRoutes, has_images
from vlora.deployments.openai_api import (
    SSE_DONE,
    ApiError,
    attach_diagnostics,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    chat_completion_chunk,
    chat_completion_response,
    completion_chunk,
    completion_response,
    models_response,
    sse,
    tokenize_response,
    validation_error_to_api_error,
)
from vlora.deployments import structured_api
from vlora.engine.model import TextConfig
from vlora.engine.outputs import RequestOutput

log = get_logger("vlora.ingress")

app = FastAPI(title="vlora", description="Qwen2.5-VL with online-learned LoRA adapters, OpenAI-compatible")


@app.exception_handler(ApiError)
async def _api_error_handler(_: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc)


@app.exception_handler(HTTPException)
async def _http_error_handler(request: Request, exc: HTTPException) -> JSONResponse:
    """Unknown routes (404) and wrong methods (405) answer in OpenAI's error JSON too."""
    if exc.status_code == 404:
        message = f"no route {request.method} {request.url.path}; see /v1/models, /v1/chat/completions, /v1/completions"
    elif exc.status_code == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    return error_response(ApiError(exc.status_code, message, code="not_found" if exc.status_code == 404 else None))


@app.exception_handler(RequestValidationError)
async def _validation_error_handler(_: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(ApiError(400, f"invalid request: {exc.errors()[0].get('msg', exc)}"))


def error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.to_json(), status_code=exc.status, headers=exc.headers())


class _Accumulator:
    """Collects a request's deltas into whole choices for a non-streaming response."""

    def __init__(self, n: int):
        self.text = [""] * n
        self.finish = [None] * n
        self.logprobs: list[list | None] = [None] * n
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.last: RequestOutput | None = None
        self.diagnostics: dict[int, list[dict]] = {}  # optimal sampling, per choice

    def add(self, out: RequestOutput) -> None:
        self.last = out
        self.prompt_tokens = out.num_prompt_tokens
        self.completion_tokens = out.num_generated_tokens
        for c in out.choices:
            self.text[c.index] += c.text
            if c.logprobs is not None:
                self.logprobs[c.index] = (self.logprobs[c.index] or []) + c.logprobs
            if c.finish_reason:
                self.finish[c.index] = c.finish_reason
            if c.diagnostics is not None:
                self.diagnostics.setdefault(c.index, []).extend(c.diagnostics)


def _chunk_diagnostics(deltas) -> dict[int, list[dict]]:
    return {c.index: c.diagnostics for c in deltas if c.diagnostics is not None}


class _ChoiceUsage:
    """vLLM's `stream_options.continuous_usage_stats` (with include_usage): each chunk's usage is its
    choice's prompt tokens and the tokens that choice has generated so far."""

    def __init__(self, req, gen):
        self.on = req.include_usage and req.continuous_usage
        self.batch = gen if isinstance(gen, PromptBatch) else None
        self.generated: dict[int, int] = {}

    def add(self, out: RequestOutput, delta) -> tuple[int, int] | None:
        if not self.on:
            return None
        self.generated[delta.index] = self.generated.get(delta.index, 0) + len(delta.token_ids)
        prompt = self.batch.prompt_tokens_of(delta.index) if self.batch else out.num_prompt_tokens
        return prompt, self.generated[delta.index]


@serve.ingress(app)
class Ingress:
    def __init__(self, config: AppConfig, preprocessor, vision_encoder, decoder, trainer, store):
        self.config = config
        self.preprocessor = preprocessor
        self.vision = vision_encoder
        self.decoder = decoder
        self.trainer = trainer
        self.store = store
        self.model_name = config.model_name
        self.keys = KeyCheck(config.keys("api"), config.keys("admin"), config.admin_open, config.admin_keys_env)
        self.text_config = TextConfig.from_pretrained(config.model_dir)
        self.vocab_size = self.text_config.vocab_size
        self.created = int(time.time())
        self.prompts = PromptRoutes(config.model_dir, preprocessor, vision_encoder)
        self.tokenizer = self.prompts.tokenizer  # logprobs only: token texts
        self.metrics = IngressMetrics()
        self._metrics_hub = None
        self._served: set[str] = {self.model_name}  # models seen served: safe metric labels for later errors

    # -- helpers ----------------------------------------------------------------------------
    def _auth(self, request: Request) -> None:
        self.keys.api(request.headers)

    def _auth_admin(self, request: Request) -> None:
        self.keys.admin(request.headers)

    async def _json(self, request: Request) -> dict:
        return await limits.read_json(request, self.config.limits)

    async def _body(self, request: Request, model: type) -> Any:
        req = self._validated(await self._json(request), model)
        lim = self.config.limits
        limits.check_sampling_limits(req, lim, self.vocab_size)
        opt = req.optimal_sampling
        limits.check_image_count([getattr(req, "messages", None), opt.teacher_messages if opt else None],
                                 self.config.images.max_images_per_request)
        limits.check_adapter_count({self._adapter_for(req.model), opt.teacher if opt else None},
                                   self.config.engine.max_loras)
        return req

    def _adapter_for(self, model: str) -> str | None:
        return None if model == self.model_name else model

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _record(self, request: Request, route: str) -> RequestRecord:
        """The request's record (metrics + log line); its id is Serve's (the x-request-id header, sent or made)."""
        return RequestRecord(request.headers.get("x-request-id") or uuid.uuid4().hex, route)

    def _resolve(self, rec: RequestRecord, model: str, stream: bool) -> None:
        rec.model, rec.stream = model, stream
        if model in self._served:
            rec.model_name = model

    def _served_by(self, rec: RequestRecord, first: RequestOutput) -> None:
        rec.on_output(first)
        rec.model_name = first.adapter or self.model_name
        self._served.add(rec.model_name)

    def _finish(self, rec: RequestRecord) -> None:
        try:
            rec.finish(self.metrics)
        except Exception:  # noqa: BLE001 - metrics and logs never fail a request
            log.warning("recording request %s failed", rec.request_id, exc_info=True)

    async def _finish_after_send(self, rec: RequestRecord) -> None:
        """A JSON answer's record, written once the response is handed to Serve: the yield lets the body
        go out first (to the client's connection, or to Serve's proxy), so metrics and the log line
        (about half a millisecond on a cold core) are off the request's latency."""
        await asyncio.sleep(0)
        self._finish(rec)

    async def _handle(self, rec: RequestRecord, body):
        """Run a completion route's body; the record ends here unless a stream took it over."""
        try:
            return await body
        except ApiError as e:
            rec.status, rec.error = e.status, e.message
            raise
        except asyncio.CancelledError:
            rec.status, rec.error = 499, "client disconnected"
            raise
        except Exception as e:  # e.g. the Decoder replica died mid-request: JSON (503 to retry), never plain text
            api = api_error_for(e)
            rec.status, rec.error = api.status, api.message
            if api.status >= 500:
                log.error("request %s failed: %r", rec.request_id, e)
            raise api from None
        finally:
            # a started stream ends (and records) in its body; a JSON answer after it is sent
            if (not rec.stream or rec.status is not None) and not rec.finish_deferred:
                self._finish(rec)

    async def _generate(self, rec: RequestRecord, stream: bool, source, sampling, adapter, explicit: bool,
                        optimal=None, teacher=None, record: bool = True):
        """Call the Decoder. Streamed: (generator, first output), the first awaited within
        first_token_timeout_s so errors become 4xx before any byte is sent. Not streamed: (None, the
        whole output) from one unary call, within request_timeout_s.

        The engine request id is always fresh: a client's X-Request-Id only labels the record (logs,
        echoed header), so a reused one can never reach another request."""
        rid = uuid.uuid4().hex
        args = (source, sampling, adapter, rid, explicit, optimal.to_params() if optimal else None, teacher)
        lim = self.config.limits
        gen = call = None
        try:
            if stream:
                gen = DecoderStream(self.decoder.options(stream=True).generate.remote(*args))
                async with asyncio.timeout(lim.first_token_timeout_s):
                    out = await gen.__anext__()
            else:
                call = self.decoder.complete.remote(*args)
                # a cancelled call (deadline, client gone) aborts the request on the Decoder
                async with asyncio.timeout(max(0.0, rec.arrival + lim.request_timeout_s - time.perf_counter())):
                    out = output_from_wire(await call)
        except StopAsyncIteration:
            raise ApiError(500, "the decoder returned no output", type="server_error") from None
        except BackPressureError:
            raise ApiError(503, "the server is overloaded; retry after a short wait", type="server_error",
                           retry_after=1) from None
        except asyncio.TimeoutError:
            if gen is not None:
                gen.cancel()
                raise ApiError(504, f"no output within {lim.first_token_timeout_s:g} s "
                                    "(first_token_timeout_s); retry later", code="timeout") from None
            call.cancel()
            raise ApiError(504, f"the request ran past {lim.request_timeout_s:g} s (request_timeout_s); "
                                "ask for fewer tokens", code="timeout") from None
        except Exception as exc:
            api = api_error_for(exc)
            if api.status >= 500:
                log.error("request %s failed: %r", rec.request_id, exc)
            raise api from None
        if record:
            self._served_by(rec, out)
        return gen, out

    async def _generate_batch(self, rec: RequestRecord, stream: bool, sources: list, sampling, adapter,
                              explicit: bool):
        """Every prompt of a batch at once, answered as one request (deployments/prompt_batch.py); the
        first failure cancels the rest."""
        tasks = [asyncio.ensure_future(self._generate(rec, stream, src, sampling, adapter, explicit, record=False))
                 for src in sources]
        try:
            results = await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                if not t.done():
                    t.cancel()
                elif not t.cancelled() and t.exception() is None and t.result()[0] is not None:
                    t.result()[0].cancel()  # a started stream of another prompt
            raise
        if stream:
            merged = MergedStream(sampling.n, [g for g, _ in results], [o for _, o in results])
            self._served_by(rec, merged.first)
            return merged, merged.first
        out = PromptBatch(sampling.n, len(results)).merge_all([o for _, o in results])
        self._served_by(rec, out)
        return None, out

    def _headers(self, rid: str, out: RequestOutput) -> dict:
        h = {}  # x-request-id: Serve sets it (the client's id, or its own) on every response
        if out.served_by:
            h["x-vlora-replica"] = out.served_by
        if out.adapter_version is not None:
            h["x-adapter-version"] = str(out.adapter_version)
        return h

    async def _rest(self, first: RequestOutput, gen, rec: RequestRecord) -> AsyncIterator[RequestOutput]:
        """The first output, then the rest of the stream, within the request's deadline."""
        yield first
        if first.finished:
            return
        deadline = rec.arrival + self.config.limits.request_timeout_s
        while True:
            try:  # a timeout scope per item: it spans no yield, and makes no task per item as wait_for does
                async with asyncio.timeout(max(0.0, deadline - time.perf_counter())):
                    out = await gen.__anext__()
            except StopAsyncIteration:
                return
            except asyncio.TimeoutError:
                raise ApiError(504, f"the request ran past {self.config.limits.request_timeout_s:g} s "
                                    "(request_timeout_s); ask for fewer tokens", code="timeout") from None
            rec.on_output(out)
            yield out
            if out.finished:
                return

    # -- routes -----------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        rec = self._record(request, "chat")
        return await self._handle(rec, self._chat_completions(request, rec))

    async def _chat_completions(self, request: Request, rec: RequestRecord):
        self._auth(request)
        req: ChatCompletionRequest = await self._body(request, ChatCompletionRequest)
        self._resolve(rec, req.model, bool(req.stream))
        sampling = req.to_sampling_params(self.config.default_max_tokens)
        explicit = req.max_completion_tokens is not None or req.max_tokens is not None
        sampling.grammar = await self._grammar(req)
        tools = req.tools or None
        source = self.prompts.chat(req.messages, tools)
        opt = req.optimal_sampling
        teacher = self.prompts.chat(opt.teacher_messages, tools) if opt and opt.teacher_messages else None
        gen, first = await self._generate(rec, bool(req.stream), source, sampling, self._adapter_for(req.model),
                                          explicit, opt, teacher)
        return self._respond(rec, req, sampling, gen, first, "chatcmpl", self._chat_stream, chat_completion_response)

    @staticmethod
    async def _grammar(req):
        """The request's output constraint, checked here (a 400 saying why) so a bad schema never
        reaches a Decoder; the Decoder compiles it for its tokenizer off its engine thread."""
        spec = structured_api.request_grammar(req)
        if spec is not None:
            await asyncio.to_thread(structured_api.check_grammar, spec, structured_api.grammar_param(req))
        return spec

    def _respond(self, rec: RequestRecord, req, sampling, gen, first: RequestOutput, prefix: str, stream, build,
                 num_choices: int | None = None):
        """What both completion routes share: headers, then an SSE stream or one JSON body (from the
        unary call's one output). `num_choices`: n times the prompts of a completions batch."""
        headers = self._headers(rec.request_id, first)
        cid, created, extra = f"{prefix}-{first.request_id}", int(time.time()), self._extra(first)
        if req.stream:
            return StreamingResponse(stream(first, gen, cid, created, req, req.include_usage, extra, rec),
                                     media_type="text/event-stream", headers=headers)
        acc = _Accumulator(num_choices or sampling.n)
        acc.add(first)
        fp = extra.pop("system_fingerprint")
        body = build(cid, req.model, created, acc.text, acc.finish, acc.logprobs if sampling.logprobs else None,
                     (acc.prompt_tokens, acc.completion_tokens), self._token_text, extra, fp)
        if self._parses_tools(req):
            structured_api.attach_tool_calls(body, acc.text)
        response = JSONResponse(attach_diagnostics(body, acc.diagnostics, summary=True), headers=headers,
                                background=BackgroundTask(self._finish_after_send, rec))
        rec.status, rec.finish_deferred = 200, True
        return response

    @staticmethod
    def _parses_tools(req) -> bool:
        """Chat requests with tools whose choice lets the model call them get `tool_calls` back."""
        return structured_api.tool_mode(req) != "none" if isinstance(req, ChatCompletionRequest) else False

    def _extra(self, out: RequestOutput) -> dict:
        """Fields beyond OpenAI's: the adapter version used; the replica goes in system_fingerprint."""
        extra: dict = {"system_fingerprint": f"vlora-{out.served_by}" if out.served_by else None}
        if out.adapter is not None:
            extra["adapter"] = out.adapter
            extra["adapter_version"] = out.adapter_version
        return extra

    @staticmethod
    def _visible(choices: list, started: set[int], tool_calls=None) -> list:
        """Deltas worth a chunk: new text, a finish, logprobs, a choice's first (role) chunk, or a tool call."""
        return [c for c in choices if c.text or c.finish_reason or c.logprobs or c.diagnostics or c.index not in started
                or (tool_calls is not None and tool_calls.visible(c))]

    async def _chat_stream(self, first, gen, cid, created, req, include_usage, extra,
                           rec: RequestRecord) -> AsyncIterator[bytes]:
        started: set[int] = set()
        last = first
        fp = extra.pop("system_fingerprint", None)
        usage = _ChoiceUsage(req, gen)
        tool_calls = structured_api.StreamedToolCalls() if self._parses_tools(req) else None
        try:
            async for out in self._rest(first, gen, rec):
                last = out
                choices = tool_calls.split(out.choices) if tool_calls is not None else out.choices
                for d in self._visible(choices, started, tool_calls):  # one choice per chunk, as OpenAI and vLLM
                    chunk = chat_completion_chunk(cid, req.model, created, [d], self._token_text,
                                                  role_for={d.index} - started, extra=extra,
                                                  system_fingerprint=fp, usage=usage.add(out, d))
                    if tool_calls is not None:
                        tool_calls.decorate(chunk)
                    yield sse(attach_diagnostics(chunk, _chunk_diagnostics([d]), summary=False))
                    started.add(d.index)
            rec.status = 200  # generation finished; what follows is the usage chunk and [DONE]
            if include_usage:
                yield sse(chat_completion_chunk(cid, req.model, created, [], usage=(
                    last.num_prompt_tokens, last.num_generated_tokens), extra=extra, system_fingerprint=fp))
            yield SSE_DONE
        except Exception as exc:  # mid-stream failure: tell the client in-band, as OpenAI does
            api = api_error_for(exc)
            rec.status, rec.error = api.status, api.message
            yield sse(api.to_json())
            yield SSE_DONE
        finally:
            gen.cancel()  # a client that went away aborts the request and frees its KV blocks
            self._finish(rec)  # status still unset: the client went away mid-stream (499, "aborted")

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        rec = self._record(request, "completions")
        return await self._handle(rec, self._completions(request, rec))

    async def _completions(self, request: Request, rec: RequestRecord):
        self._auth(request)
        req: CompletionRequest = await self._body(request, CompletionRequest)
        self._resolve(rec, req.model, bool(req.stream))
        sampling = req.to_sampling_params(self.config.default_max_tokens)
        explicit = req.max_tokens is not None
        sampling.grammar = await self._grammar(req)
        preps = [self.prompts.text(p) if isinstance(p, str) else self.prompts.tokens(p, self.vocab_size)
                 for p in req.prompt]
        opt = req.optimal_sampling
        if len(preps) > 1:
            if opt is not None:
                raise ApiError(400, "optimal_sampling takes one prompt per request", param="prompt")
            gen, first = await self._generate_batch(rec, bool(req.stream), preps, sampling,
                                                    self._adapter_for(req.model), explicit)
        else:
            teacher = self.prompts.text(opt.teacher_prompt) if opt and opt.teacher_prompt else None
            gen, first = await self._generate(rec, bool(req.stream), preps[0], sampling, self._adapter_for(req.model),
                                              explicit, opt, teacher)
        return self._respond(rec, req, sampling, gen, first, "cmpl", self._completion_stream, completion_response,
                             num_choices=sampling.n * len(preps))

    async def _completion_stream(self, first, gen, cid, created, req, include_usage, extra,
                                 rec: RequestRecord) -> AsyncIterator[bytes]:
        last = first
        offsets: dict[int, int] = {}
        fp = extra.pop("system_fingerprint", None)
        usage = _ChoiceUsage(req, gen)
        try:
            async for out in self._rest(first, gen, rec):
                last = out
                for c in out.choices:  # one choice per chunk, as OpenAI and vLLM send them
                    if not (c.text or c.finish_reason or c.logprobs or c.diagnostics):
                        continue
                    chunk = completion_chunk(cid, req.model, created, [c], self._token_text,
                                             text_offsets=offsets, extra=extra, system_fingerprint=fp,
                                             usage=usage.add(out, c))
                    yield sse(attach_diagnostics(chunk, _chunk_diagnostics([c]), summary=False))
                    if c.logprobs:  # legacy text_offset counts each token's own text, as the unary answer does
                        offsets[c.index] = offsets.get(c.index, 0) + sum(
                            len(self._token_text(lp.token_id)) for lp in c.logprobs)
            rec.status = 200
            if include_usage:
                yield sse(completion_chunk(cid, req.model, created, [], usage=(
                    last.num_prompt_tokens, last.num_generated_tokens), extra=extra, system_fingerprint=fp))
            yield SSE_DONE
        except Exception as exc:
            api = api_error_for(exc)
            rec.status, rec.error = api.status, api.message
            yield sse(api.to_json())
            yield SSE_DONE
        finally:
            gen.cancel()
            self._finish(rec)

    @app.get("/v1/models")
    async def models(self, request: Request):
        self._auth(request)
        listed = await self._call(self.store.list.remote())
        adapters = [{"name": n, "version": a["version"], "created": int(a["created"])} for n, a in sorted(listed.items())]
        return JSONResponse(models_response(self.model_name, adapters, self.created))

    # -- vLLM's tokenizer routes -------------------------------------------------------------
    async def _known_model(self, model: str | None) -> None:
        """vLLM answers 404 for a model it does not serve (the tokenizer is the base model's for all)."""
        if model is None or model == self.model_name:
            return
        if model not in await self._call(self.store.list.remote()):
            raise ApiError.model_not_found(model)

    def _max_model_len(self) -> int:
        return self.config.engine.max_model_len or self.text_config.max_position_embeddings

    @app.post("/tokenize")
    async def tokenize(self, request: Request):
        """vLLM's /tokenize: a prompt as /v1/completions tokenizes it, or messages as /v1/chat/completions
        renders them (image parts expanded to their image tokens)."""
        self._auth(request)
        req = self._validated(await self._json(request), TokenizeRequest)
        await self._known_model(req.model)
        tok = self.tokenizer
        if req.prompt is not None:
            add_special = True if req.add_special_tokens is None else req.add_special_tokens
            ids = tok(req.prompt, add_special_tokens=add_special)["input_ids"]
        elif has_images(req.messages):
            if not req.add_generation_prompt:
                raise ApiError(400, "add_generation_prompt=false is not supported with image parts",
                               param="add_generation_prompt")
            prepared = await self._call(self.preprocessor.prepare_chat.remote(req.messages))
            ids = prepared.prompt.token_ids
        else:
            try:
                ids = self.prompts.builder.build_chat(req.messages, [], req.add_generation_prompt).token_ids
            except Exception as exc:
                raise api_error_for(exc) from None
        strs = tok.convert_ids_to_tokens(ids) if req.return_token_strs else None
        return JSONResponse(tokenize_response(list(ids), self._max_model_len(), strs))

    @app.post("/detokenize")
    async def detokenize(self, request: Request):
        """vLLM's /detokenize: token ids back to text ({"prompt": ...})."""
        self._auth(request)
        req = self._validated(await self._json(request), DetokenizeRequest)
        await self._known_model(req.model)
        bad = [t for t in req.tokens if not 0 <= t < self.vocab_size]
        if bad:
            raise ApiError(400, f"tokens {bad[:5]} are outside the vocabulary [0, {self.vocab_size})", param="tokens")
        return JSONResponse({"prompt": self.tokenizer.decode(req.tokens)})

    @staticmethod
    def _validated(body: dict, model: type) -> Any:
        try:
            return model.model_validate(body)
        except ValidationError as e:
            raise validation_error_to_api_error(e) from None

    # -- adapters (admin) -------------------------------------------------------------------
    async def _call(self, ref, timeout_s: float | None = None) -> Any:
        """Await a store/trainer call within a deadline, turning the errors inside Ray's wrappers into ApiErrors."""
        timeout_s = timeout_s or self.config.limits.admin_timeout_s
        try:
            return await asyncio.wait_for(ref, timeout_s)
        except ApiError:
            raise
        except asyncio.TimeoutError:
            raise ApiError(504, f"the adapter store or trainer did not answer within {timeout_s:g} s; the operation "
                                "may still complete: check GET /v1/adapters before retrying", code="timeout") from None
        except Exception as exc:
            api = api_error_for(exc)
            if api.status >= 500:
                log.error("admin call failed: %r", exc)
            raise api from None

    @staticmethod
    def _idempotency_key(request: Request) -> str:
        """The client's Idempotency-Key (a retried call then makes no second version), else one per HTTP
        call, so Ray re-sending the call to a restarted store cannot apply it twice."""
        key = request.headers.get("idempotency-key")
        if key is None:
            return "auto-" + uuid.uuid4().hex
        if not 1 <= len(key) <= 128 or not key.isprintable():
            raise ApiError(400, "the Idempotency-Key header must be 1-128 printable characters", param="Idempotency-Key")
        return "client-" + key

    @staticmethod
    def _version_headers(info: dict) -> dict:
        return {"x-adapter-version": str(info["version"])} if "version" in info else {}

    @app.get("/v1/adapters")
    async def list_adapters(self, request: Request):
        self._auth_admin(request)
        adapters = await self._call(self.store.list.remote())
        return JSONResponse({"object": "list", "data": [adapters[n] for n in sorted(adapters)]})

    @app.get("/v1/adapters/{name}")
    async def get_adapter(self, name: str, request: Request):
        self._auth_admin(request)
        versions = await self._call(self.store.versions.remote(name))
        return JSONResponse({"name": name, "current": versions[-1]["version"] if versions else None,
                             "versions": versions})

    async def _load(self, name: Any, path: Any, key: str) -> dict:
        if not isinstance(name, str):
            raise ApiError(400, "name must be a string", param="name")
        if not isinstance(path, str) or not path:
            raise ApiError(400, "path must be a non-empty string naming a PEFT adapter folder", param="path")
        limits.check_adapter_name(name, self.model_name)
        # The store checks the allow-list where it reads the files (no symlinks, size-capped).
        return await self._call(self.store.load_folder.remote(name, path, list(self.config.adapter_load_dirs),
                                                              self.config.limits.max_adapter_file_bytes, key))

    @app.post("/v1/adapters")
    async def load_adapter(self, request: Request):
        self._auth_admin(request)
        body = await self._json(request)
        info = await self._load(body.get("name"), body.get("path"), self._idempotency_key(request))
        return JSONResponse(info, headers=self._version_headers(info))

    @app.delete("/v1/adapters/{name}")
    async def delete_adapter(self, name: str, request: Request):
        self._auth_admin(request)
        await self._call(self.store.delete.remote(name, self._idempotency_key(request)))
        return JSONResponse({"name": name, "deleted": True})

    @app.post("/v1/adapters/{name}/rollback")
    async def rollback_adapter(self, name: str, request: Request):
        self._auth_admin(request)
        raw = await limits.read_body(request, self.config.limits.max_body_bytes)
        if raw:
            limits.check_json_content_type(request)
        body = limits.parse_json(raw, self.config.limits.max_json_depth) if raw else {}
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object")
        version = body.get("version")
        if version is not None and (not isinstance(version, int) or isinstance(version, bool) or version < 1):
            raise ApiError(400, "version must be a positive integer", param="version")
        info = await self._call(self.store.rollback.remote(name, version, self._idempotency_key(request)))
        return JSONResponse(info, headers=self._version_headers(info))

    @app.post("/v1/adapters/{name}/learn")
    async def learn(self, name: str, request: Request):
        self._auth_admin(request)
        body = await self._json(request)
        run_async = body.pop("async", False)
        if not isinstance(run_async, bool):
            raise ApiError(400, f"async must be true or false, got {run_async!r}", param="async")
        limits.check_adapter_name(name, self.model_name)
        self._need_trainer()
        key = self._idempotency_key(request)
        if run_async:
            job = await self._call(self.trainer.submit.remote(name, body, key))
            return JSONResponse(job, status_code=202)
        job = await self._call(self.trainer.learn.remote(name, body, key), self.config.limits.learn_timeout_s)
        return JSONResponse(job["result"], headers=self._version_headers(job["result"]))

    @app.get("/v1/adapters/{name}/jobs/{job_id}")
    async def learn_job(self, name: str, job_id: str, request: Request):
        self._auth_admin(request)
        self._need_trainer()
        return JSONResponse(await self._call(self.trainer.job.remote(name, job_id)))

    def _need_trainer(self) -> None:
        if self.trainer is None:
            raise ApiError(501, "online learning is disabled on this server (learning: false in its config); "
                                "load adapters trained elsewhere with POST /v1/adapters", type="not_implemented")

    @app.post("/v1/load_lora_adapter")
    async def vllm_load_lora_adapter(self, request: Request):
        """vLLM's route, for clients that already use it (answers in plain text, as vLLM does)."""
        self._auth_admin(request)
        body = await self._json(request)
        info = await self._load(body.get("lora_name"), body.get("lora_path"), self._idempotency_key(request))
        return Response(f"Success: LoRA adapter '{info['name']}' added successfully.", media_type="text/plain",
                        headers=self._version_headers(info))

    @app.post("/v1/unload_lora_adapter")
    async def vllm_unload_lora_adapter(self, request: Request):
        self._auth_admin(request)
        body = await self._json(request)
        name = body.get("lora_name")
        if not isinstance(name, str):
            raise ApiError(400, "lora_name must be a string", param="lora_name")
        await self._call(self.store.delete.remote(name, self._idempotency_key(request)))
        return Response(f"Success: LoRA adapter '{name}' removed successfully.", media_type="text/plain")

    @app.get("/health")
    async def health(self):
        """Every deployment answers a probe, and Serve runs all their replicas (a failed one is counted)."""
        handles = {"preprocessor": self.preprocessor, "vision_encoder": self.vision, "decoder": self.decoder,
                   "trainer": self.trainer, "adapter_store": self.store}
        c = self.config
        targets = {"preprocessor": ("Preprocessor", c.preprocessor.min_replicas),  # autoscaled: its minimum
                   "vision_encoder": ("VisionEncoder", c.vision_encoder.min_replicas),
                   "decoder": ("Decoder", c.decoder.min_replicas), "trainer": ("Trainer", 1),
                   "ingress": ("Ingress", c.ingress.min_replicas)}
        if self.trainer is None:  # learning: false
            del handles["trainer"], targets["trainer"]
        report = await health_report(self._app_name(), handles, targets)
        return JSONResponse({"status": report["status"], "model": self.model_name, **report},
                            status_code=200 if report["status"] == "ok" else 503)

    @staticmethod
    def _app_name() -> str:
        try:
            return serve.get_replica_context().app_name
        except Exception:  # noqa: BLE001 - constructed outside Serve
            return "vlora"

    @app.get("/metrics")
    async def metrics(self):
        """vLLM-compatible /metrics on the API port: every live replica's metrics (deployments/metrics_hub.py),
        this replica's own read fresh."""
        own = api_snapshot()
        try:
            ctx = serve.get_replica_context()
            me = ctx.replica_id.unique_id
            if self._metrics_hub is None:
                self._metrics_hub = get_metrics_hub(ctx.app_name)
            snaps = await asyncio.wait_for(self._metrics_hub.snapshots.remote(), 10)
            snaps = [(d, r, f) for d, r, f in snaps if r != me] + [(ctx.deployment, me, own)]
        except Exception:  # noqa: BLE001 - outside Serve, or the hub is restarting: this replica's own
            self._metrics_hub = None
            log.warning("reading the metrics hub failed; serving this replica's metrics only", exc_info=True)
            snaps = [("Ingress", "local", own)]
        return Response(render_metrics(snaps), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/")
    async def root(self):
        return Response(f"vlora serving {self.model_name}: see /v1/models\n", media_type="text/plain")
