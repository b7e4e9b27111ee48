"""Deadlines and a lost Decoder, through the Ingress's own routes without Ray: the FastAPI app over
ASGI, a real Decoder on the tiny model behind a stand-in for Serve's handles (each call its own task,
cancel() cancels the call, as in a replica), engine steps slowed on purpose, and store/trainer
handles that answer too late. The Decoder dying for real is tests/e2e/test_security.py's drill."""

from __future__ import annotations

import asyncio
import json
import time
import types
from contextlib import contextmanager

import httpx
import pytest
from ray import serve

from vlora.deployments.config import AppConfig
from vlora.deployments.decoder import Decoder
from vlora.deployments.ingress import Ingress, app
from vlora.deployments.preprocessor import Preprocessor


class Response:
    """Like Serve's DeploymentResponse: awaiting it waits for the call; only cancel() stops the call."""

    def __init__(self, coro):
        self.task = asyncio.ensure_future(coro)

    def __await__(self):
        return asyncio.shield(self.task).__await__()

    def cancel(self):
        self.task.cancel()


class ResponseGenerator:
    """Like Serve's DeploymentResponseGenerator: the replica's generator runs on; cancel() stops it."""

    def __init__(self, method, args):
        self.items: asyncio.Queue = asyncio.Queue()
        self.task = asyncio.ensure_future(self._pump(method, args))

    async def _pump(self, method, args):
        agen = None
        try:
            agen = method(*await args)
            async for out in agen:
                self.items.put_nowait(out)
            self.items.put_nowait(StopAsyncIteration())
        except Exception as exc:  # noqa: BLE001 - re-raised in the caller, as Ray does
            self.items.put_nowait(exc)
        finally:
            if agen is not None:
                await agen.aclose()

    async def __anext__(self):
        item = await self.items.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self):
        self.task.cancel()


class Handle:
    def __init__(self, target, stream: bool = False):
        self.target, self.stream = target, stream

    def options(self, stream: bool = False, **_) -> "Handle":
        return Handle(self.target, stream)

    def __getattr__(self, name):
        method = getattr(self.target, name)
        stream = self.stream

        async def resolved(args):  # a response passed on as an argument arrives as its result
            return [await a if isinstance(a, Response) else a for a in args]

        def remote(*args):
            if stream:
                return ResponseGenerator(method, resolved(args))

            async def call():
                return await method(*await resolved(args))
            return Response(call())
        return types.SimpleNamespace(remote=remote)


class Store:
    """An adapter store that answers only once `slow` is cleared."""

    def __init__(self):
        self.slow = True
        self.calls = 0

    async def _wait(self):
        self.calls += 1
        while self.slow:
            await asyncio.sleep(0.01)

    async def list(self):
        await self._wait()
        return {}

    async def versions(self, name):
        await self._wait()
        return []


class Trainer:
    def __init__(self):
        self.started = 0

    async def learn(self, name, body, idempotency_key=None):
        self.started += 1
        await asyncio.sleep(60)  # a training run far longer than learn_timeout_s


@pytest.fixture(scope="module")
def config(tiny_model_dir):
    return AppConfig(model_dir=str(tiny_model_dir), served_model_name="tiny", device="cpu", admin_open=True,
                     engine={"max_num_seqs": 4, "kv_cache_memory_mb": 4, "max_model_len": 1024,
                             "engine_process": False})  # slow_steps patches the engine in this process


@pytest.fixture(scope="module")
def decoder(config):
    d = Decoder(config)
    yield d
    d.__del__()


def in_process_ingress(config, decoder, monkeypatch, store):
    """The Ingress in this process (no API keys), its Decoder and store behind in-process handles."""
    monkeypatch.delenv(config.api_keys_env, raising=False)
    monkeypatch.delenv(config.admin_keys_env, raising=False)
    cls = Ingress.__bases__[0]  # the class itself, under Serve's ASGI wrapper
    ing = cls.__new__(cls)
    cls.__init__(ing, config, Handle(Preprocessor(config)), Handle(None), Handle(decoder),
                                  Handle(Trainer()), Handle(store))
    # Serve's class-based routes find their instance through the replica context
    monkeypatch.setattr(serve, "get_replica_context", lambda: types.SimpleNamespace(servable_object=ing))
    return ing


@pytest.fixture
def ingress(config, decoder, monkeypatch):
    return in_process_ingress(config, decoder, monkeypatch, Store())


def set_limits(ing, **limits):
    ing.config = ing.config.model_copy(update={"limits": ing.config.limits.model_copy(update=limits)})


def client(timeout_s: float = 30):
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                             base_url="http://ingress", timeout=timeout_s)


BODY = {"model": "tiny", "messages": [{"role": "user", "content": "Tell me a long story"}], "temperature": 0,
        "ignore_eos": True}


@contextmanager
def slow_steps(decoder, delay_s: float):
    """Every engine step takes `delay_s` longer (a big model on a busy GPU); yields the KV blocks in use
    after each step, to show the requests did hold blocks."""
    engine = decoder.engine.engine
    real, held = engine.step, []

    def step():
        outs = real()
        held.append(engine.pool.num_used_blocks)
        time.sleep(delay_s)
        return outs
    engine.step = step
    try:
        yield held
    finally:
        del engine.step


async def idle(decoder, timeout_s: float = 10) -> dict:
    """The Decoder's stats once it holds no request and no KV block (fails if that never happens)."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = await decoder.stats()
        if stats["num_requests"] == 0 and stats["kv_blocks_used"] == 0:
            return stats
        assert time.monotonic() < deadline, f"the Decoder kept requests or KV blocks: {stats}"
        await asyncio.sleep(0.05)


def assert_error(r: httpx.Response, status: int, message: str, code: str | None) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"] == "application/json"
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] == message and err["code"] == code
    assert err["type"] == "server_error"
    return err


def sse_events(r: httpx.Response) -> list[str]:
    return [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]


async def assert_serves(c: httpx.AsyncClient):
    r = await c.post("/v1/chat/completions", json={**BODY, "max_tokens": 3})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] == "length"


def test_a_stream_with_no_first_token_in_time_is_a_504_and_the_request_is_aborted(ingress, decoder):
    set_limits(ingress, first_token_timeout_s=0.2)
    msg = "no output within 0.2 s (first_token_timeout_s); retry later"

    async def go():
        async with client() as c:
            with slow_steps(decoder, 1.0) as held:
                # a stream that has sent nothing yet answers with a JSON 504, before any SSE byte
                t0 = time.perf_counter()
                r = await c.post("/v1/chat/completions", json={**BODY, "max_tokens": 20, "stream": True})
                assert time.perf_counter() - t0 < 0.9  # answered at the deadline, not after the step
                assert_error(r, 504, msg, "timeout")
                await idle(decoder)
            assert max(held) > 0  # the requests had KV blocks while the client waited
            await assert_serves(c)
        await idle(decoder)

    asyncio.run(go())


def test_a_request_past_its_total_deadline_is_a_504_or_an_in_band_error(ingress, decoder):
    set_limits(ingress, first_token_timeout_s=30, request_timeout_s=0.5)
    msg = "the request ran past 0.5 s (request_timeout_s); ask for fewer tokens"

    async def go():
        async with client() as c:
            with slow_steps(decoder, 0.02) as held:
                r = await c.post("/v1/chat/completions", json={**BODY, "max_tokens": 900})
                assert_error(r, 504, msg, "timeout")
                await idle(decoder)  # the non-streamed request was aborted, not left generating
                r = await c.post("/v1/chat/completions", json={**BODY, "max_tokens": 900, "stream": True})
                assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
                events = sse_events(r)
                assert events[-1] == "[DONE]"
                chunks = [json.loads(e) for e in events[:-1]]
                assert chunks[-1] == {"error": {"message": msg, "type": "server_error", "param": None,
                                                "code": "timeout"}}
                text = "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks[:-1])
                assert text and all(ch["choices"][0]["finish_reason"] is None for ch in chunks[:-1])
                await idle(decoder)
            assert max(held) > 0
            await assert_serves(c)

    asyncio.run(go())


def test_store_and_trainer_calls_past_their_deadline_are_504s(ingress, decoder):
    set_limits(ingress, admin_timeout_s=0.2, learn_timeout_s=0.3)
    store, trainer = ingress.store.target, ingress.trainer.target
    late = ("the adapter store or trainer did not answer within {} s; the operation may still complete: "
            "check GET /v1/adapters before retrying")

    async def go():
        async with client() as c:
            t0 = time.perf_counter()
            for path in ("/v1/adapters", "/v1/adapters/a", "/v1/models"):
                assert_error(await c.get(path), 504, late.format("0.2"), "timeout")
            ex = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}]
            r = await c.post("/v1/adapters/a/learn", json={"examples": ex, "steps": 1})
            assert_error(r, 504, late.format("0.3"), "timeout")
            assert time.perf_counter() - t0 < 5
            assert (store.calls, trainer.started) == (3, 1)
            await assert_serves(c)  # completions never wait on the store
            store.slow = False
            r = await c.get("/v1/adapters")
            assert r.status_code == 200 and r.json() == {"object": "list", "data": []}
        await idle(decoder)

    asyncio.run(go())


class DyingDecoder:
    """A Decoder whose process dies after the first output, as Ray reports it to the caller."""

    def __init__(self, decoder):
        self.decoder = decoder

    async def generate(self, *args):
        from ray.exceptions import ActorDiedError

        agen = self.decoder.generate(*args)
        yield await agen.__anext__()
        await agen.aclose()
        raise ActorDiedError()

    async def complete(self, *args):
        """The unary call of a non-streamed request: the process dies while the request runs."""
        from ray.exceptions import ActorDiedError

        call = asyncio.ensure_future(self.decoder.complete(*args))
        await asyncio.sleep(0.05)
        call.cancel()  # the replica is gone: its engine (here: the real one) drops the request
        raise ActorDiedError()


def test_a_decoder_lost_mid_request_is_a_503_to_retry_or_an_in_band_error(ingress, decoder):
    ingress.decoder = Handle(DyingDecoder(decoder))
    msg = "the replica serving this request stopped; retry the request"

    async def go():
        async with client() as c:
            r = await c.post("/v1/chat/completions", json={**BODY, "max_tokens": 50})
            assert_error(r, 503, msg, None)
            assert r.headers["retry-after"] == "1"
            r = await c.post("/v1/chat/completions", json={**BODY, "max_tokens": 50, "stream": True})
            assert r.status_code == 200
            events = sse_events(r)
            assert events[-1] == "[DONE]"
            assert json.loads(events[-2]) == {"error": {"message": msg, "type": "server_error", "param": None,
                                                        "code": None}}
            assert len(events) >= 3  # the first output was streamed before the error
            await idle(decoder)
            ingress.decoder = Handle(decoder)
            await assert_serves(c)

    asyncio.run(go())
