"""The floor of bench/serve_path.py: a bare Ray Serve app with vlora's text-request hops and no model work.

the cluster's HTTP ingress (HAProxy or Serve's proxy, as for vlora) -> FloorIngress (FastAPI,
OpenAI-shaped SSE or JSON) -> FloorDecoder, whose "engine" only
sleeps at the pace the real engine was measured at in the same run (seconds per step for the
batch size it currently holds). Streamed requests get vlora's item policy: the first token at
once, then one item per tick of a `stream_interval_s` clock all streams share, or at the finish;
non-streamed ones one unary call.
Whatever the real app costs above this is vlora's own. (No `from __future__ import annotations`:
FastAPI must see the `Request` annotation itself.)

`floor_engine_app` is the same app with vlora's real engine in place of the sleep: the decoder
drives an `EngineProcess` (the tree under test's, with the Decoder's engine config) on one fixed
pre-tokenized prompt, streamed with its batching, not streamed with one unary call. Between it and
vlora the engine, its process and its batching are the same; what differs is vlora's own code on
the path (validation, template and tokenizer, adapters, metrics, the OpenAI body). On a host where
the engine shares the CPU with the serving path, it also shows what these hops deliver with an
engine that costs CPU: the sleeping floor gets its engine for free.
"""


import asyncio
import json
import math
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

app = FastAPI()


def next_tick(now: float, every: float, first: bool) -> float:
    """vlora's stream clock (engine/output_stream.py): the tick a whole interval after a stream's first
    item, then the first tick half an interval after its last one; ticks at multiples of `every`."""
    return math.ceil((now + (every if first else every / 2)) / every - 1e-9) * every


def step_seconds(pace: list[tuple[int, float]], batch: int) -> float:
    """Seconds per step at `batch` rows from the sorted (batch size, seconds) pairs, linear between them."""
    b = max(1, batch)
    lo = pace[0]
    for hi in pace:
        if hi[0] >= b:
            if hi[0] == lo[0]:
                return hi[1]
            return lo[1] + (hi[1] - lo[1]) * (b - lo[0]) / (hi[0] - lo[0])
        lo = hi
    return lo[1] * b / lo[0]


class FloorDecoder:
    def __init__(self, pace: list[tuple[int, float]], stream_interval_s: float):
        self.pace = sorted(pace)  # (batch size, engine seconds per step at that batch size)
        self.interval = stream_interval_s
        self.inflight = 0

    def _step_s(self) -> float:
        return step_seconds(self.pace, self.inflight)

    async def _run(self, max_tokens: int, every: float):
        """Yield the number of tokens made since the last yield: the first after one step, then on the
        ticks of the shared `every`-s clock (`next_tick`), or at the finish."""
        self.inflight += 1
        try:
            await asyncio.sleep(self._step_s())
            yield 1
            made, sent, t = 1.0, 1, time.perf_counter()
            due = next_tick(time.monotonic(), every, first=True)
            while sent < max_tokens:
                await asyncio.sleep(max(0.0, min(due - time.monotonic(), (max_tokens - made) * self._step_s())))
                now = time.perf_counter()
                made, t = made + (now - t) / self._step_s(), now
                n = min(int(made + 1e-9), max_tokens) - sent
                if n > 0 and (sent + n == max_tokens or time.monotonic() >= due - 1e-3):
                    sent += n
                    yield n
                    due = next_tick(time.monotonic(), every, first=False)
        finally:
            self.inflight -= 1

    async def generate(self, max_tokens: int):
        async for n in self._run(max_tokens, self.interval):
            yield n

    async def complete(self, max_tokens: int) -> int:
        total = 0
        async for n in self._run(max_tokens, 0.05):  # 0.05: re-read the pace
            total += n
        return total


class EngineFloorDecoder:
    """The floor's decoder with vlora's engine process: every request is the same prompt, greedy, `ignore_eos`."""

    def __init__(self, engine_config, stream_interval_s: float, prompt_ids: list[int]):
        from vlora.engine.engine_process import EngineProcess

        self.engine = EngineProcess(engine_config, stream_interval_s)
        self.prompt_ids = prompt_ids

    def _request(self, max_tokens: int):
        from vlora.engine.prompts import PreparedPrompt
        from vlora.engine.sampling import SamplingParams

        return PreparedPrompt(list(self.prompt_ids), None, 0), SamplingParams(max_tokens=max_tokens, temperature=0,
                                                                              ignore_eos=True)

    async def generate(self, max_tokens: int):
        async for out in self.engine.generate(*self._request(max_tokens)):
            yield len(out.choices[0].token_ids)

    async def complete(self, max_tokens: int) -> int:
        return (await self.engine.complete(*self._request(max_tokens))).num_generated_tokens


def _chunk(rid: str, content: str | None, finish: str | None, usage: dict | None = None) -> bytes:
    choices = [] if usage else [{"index": 0, "delta": {"content": content}, "logprobs": None, "finish_reason": finish}]
    body = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": "floor",
            "choices": choices, "system_fingerprint": None}
    if usage:
        body["usage"] = usage
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


@serve.ingress(app)
class FloorIngress:
    def __init__(self, decoder):
        self.decoder = decoder

    @app.post("/v1/chat/completions")
    async def chat(self, request: Request):
        body = json.loads(await request.body())
        n = int(body.get("max_tokens") or 16)
        rid = f"chatcmpl-{time.monotonic_ns()}"
        if not body.get("stream"):
            made = await self.decoder.complete.remote(n)
            return JSONResponse({"id": rid, "object": "chat.completion", "created": int(time.time()),
                                 "model": "floor", "choices": [{"index": 0, "message": {
                                     "role": "assistant", "content": " t" * made}, "finish_reason": "length"}],
                                 "usage": {"prompt_tokens": 1, "completion_tokens": made, "total_tokens": made + 1}})
        gen = self.decoder.options(stream=True).generate.remote(n)

        async def sse():
            made = 0
            async for k in gen:
                made += k
                yield _chunk(rid, " t" * k, "length" if made >= n else None)
            yield _chunk(rid, None, None, {"prompt_tokens": 1, "completion_tokens": made,
                                           "total_tokens": made + 1})
            yield b"data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")


def _options(num_cpus: float) -> dict:
    """Deployment options with the replica environment vlora's Ingress and Decoder get (the same Serve settings
    on both sides; a tree from before that setting has none)."""
    try:
        from vlora.deployments.app import hot_path_env
        env = hot_path_env()
    except ImportError:
        env = {}
    actor = {"num_cpus": num_cpus, **({"runtime_env": {"env_vars": env}} if env else {})}
    return dict(max_ongoing_requests=256, ray_actor_options=actor)


def floor_app(pace: list[tuple[int, float]], stream_interval_s: float, num_cpus: float):
    """The floor's two deployments: the decoder sleeps at `pace`."""
    opts = _options(num_cpus)
    dec = serve.deployment(FloorDecoder, name="FloorDecoder").options(**opts).bind(pace, stream_interval_s)
    return serve.deployment(FloorIngress, name="FloorIngress").options(**opts).bind(dec)


def floor_engine_app(engine_config, stream_interval_s: float, prompt_ids: list[int], num_cpus: float):
    """The floor's ingress over a decoder that runs vlora's engine process (`EngineFloorDecoder`)."""
    opts = _options(num_cpus)
    dec = serve.deployment(EngineFloorDecoder, name="FloorDecoder").options(**opts).bind(
        engine_config, stream_interval_s, prompt_ids)
    return serve.deployment(FloorIngress, name="FloorIngress").options(**opts).bind(dec)
