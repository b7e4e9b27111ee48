"""The floor of bench/serve_path.py: a bare Ray Serve app with vlora's text-request hops and no model work.

proxy -> FloorIngress (FastAPI, OpenAI-shaped SSE or JSON) -> FloorDecoder, whose "engine" only
sleeps at the pace the real engine was measured at in the same run (seconds per step for the
batch size it currently holds). Streamed requests get vlora's item policy: the first token at
once, then one item per `stream_interval_s` or at the finish; non-streamed ones one unary call.
Whatever the real app costs above this is vlora's own. (No `from __future__ import annotations`:
FastAPI must see the `Request` annotation itself.)
"""


import asyncio
import json
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

app = FastAPI()


class FloorDecoder:
    def __init__(self, pace: list[tuple[int, float]], stream_interval_s: float):
        self.pace = sorted(pace)  # (batch size, engine seconds per step at that batch size)
        self.interval = stream_interval_s
        self.inflight = 0

    def _step_s(self) -> float:
        """Seconds per step at the current batch size, linear between the measured ones."""
        b = max(1, self.inflight)
        lo = self.pace[0]
        for hi in self.pace:
            if hi[0] >= b:
                if hi[0] == lo[0]:
                    return hi[1]
                return lo[1] + (hi[1] - lo[1]) * (b - lo[0]) / (hi[0] - lo[0])
            lo = hi
        return lo[1] * b / lo[0]

    async def _run(self, max_tokens: int, every: float):
        """Yield the number of tokens made since the last yield: the first after one step, then every `every` s."""
        self.inflight += 1
        try:
            await asyncio.sleep(self._step_s())
            yield 1
            made, sent, t = 1.0, 1, time.perf_counter()
            while sent < max_tokens:
                await asyncio.sleep(min(every, (max_tokens - made) * self._step_s()))
                now = time.perf_counter()
                made, t = made + (now - t) / self._step_s(), now
                n = min(int(made + 1e-9), max_tokens) - sent
                if n > 0:
                    sent += n
                    yield n
        finally:
            self.inflight -= 1

    async def generate(self, max_tokens: int):
        async for n in self._run(max_tokens, self.interval):
            yield n

    async def complete(self, max_tokens: int) -> int:
        total = 0
        async for n in self._run(max_tokens, 0.05):  # re-read the pace as the batch changes
            total += n
        return total


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


def floor_app(pace: list[tuple[int, float]], stream_interval_s: float, num_cpus: float):
    """The floor's two deployments, with the replica environment vlora's Ingress and Decoder get (the same
    Serve settings on both sides; a tree from before that setting has none)."""
    try:
        from vlora.deployments.app import hot_path_env
        env = hot_path_env()
    except ImportError:
        env = {}
    actor = {"num_cpus": num_cpus, **({"runtime_env": {"env_vars": env}} if env else {})}
    opts = dict(max_ongoing_requests=256, ray_actor_options=actor)
    dec = serve.deployment(FloorDecoder, name="FloorDecoder").options(**opts).bind(pace, stream_interval_s)
    return serve.deployment(FloorIngress, name="FloorIngress").options(**opts).bind(dec)
