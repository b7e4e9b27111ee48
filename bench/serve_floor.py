"""The floor of bench/serve_path.py: a bare Ray Serve app with vlora's text-request hops and no model work.

the cluster's HTTP ingress (HAProxy or Serve's proxy, as for vlora) -> FloorIngress (FastAPI,
OpenAI-shaped SSE or JSON) -> FloorDecoder, whose "engine" only
sleeps at the pace the real engine was measured at in the same run (seconds per step for the
batch size it currently holds). Streamed requests get vlora's item policy: the first token at
once, then one item per tick of a `stream_interval_s` clock all streams share, or at the finish;
non-streamed ones one unary call.
Whatever the real app costs above this is vlora's own. (No `from __future__ import annotations`:
FastAPI must see the `Request` annotation itself.)

`engine_work=True` gives the same app an engine that costs what the real one costs on the CPU
(`WorkEngine`): a child process of the decoder replica, as vlora's engine process is, that steps
its requests by doing a fixed amount of torch work per step, the amount that took the measured
step time on a warm core, and sends each request's tokens the way vlora's engine process does.
On a host where the engine shares the CPU with the serving path, this shows what these hops
deliver with an engine that costs CPU; the sleeping floor gets its engine for free.
"""


import asyncio
import json
import math
import os
import socket
import subprocess
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path

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


class WorkEngine:
    """A child process that steps requests with the real engine's CPU cost and no model.

    Each step runs as many small torch matmuls as took the measured step time at that batch size
    on a warm core (the matmul's cost is calibrated in the child at start), so contention slows
    it as it slows a real step. Every step makes one token for each request in it;
    the child sends a request's tokens at once for its first, then on the stream clock's ticks
    (`next_tick`), or when it finishes: vlora's engine process's policy, one message per step at most.
    """

    def __init__(self, pace: list[tuple[int, float]], stream_interval_s: float):
        ours, theirs = socket.socketpair()
        root = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", f"from bench.serve_floor import work_engine_main; work_engine_main({theirs.fileno()})"],
            pass_fds=(theirs.fileno(),), env=env)
        theirs.close()
        self.conn = Connection(ours.detach())
        self.conn.send((sorted(pace), stream_interval_s))
        self.queues: dict[int, asyncio.Queue] = {}
        self.next_id = 0
        self.reading = False

    def _on_readable(self) -> None:
        while self.conn.poll():
            for rid, n in self.conn.recv():
                q = self.queues.get(rid)
                if q is not None:
                    q.put_nowait(n)

    async def tokens(self, max_tokens: int):
        """Yield the number of tokens of each message the child sends for one request of `max_tokens`."""
        if not self.reading:
            asyncio.get_running_loop().add_reader(self.conn.fileno(), self._on_readable)
            self.reading = True
        rid, self.next_id = self.next_id, self.next_id + 1
        q = self.queues[rid] = asyncio.Queue()
        self.conn.send(("add", rid, max_tokens))
        sent = 0
        try:
            while sent < max_tokens:
                n = await q.get()
                sent += n
                yield n
        finally:
            del self.queues[rid]
            if sent < max_tokens:
                self.conn.send(("abort", rid, 0))


def work_engine_main(fd: int) -> None:
    """The child of `WorkEngine`: read adds and aborts between steps, step, send what is due."""
    import torch

    torch.set_num_threads(1)
    conn = Connection(fd)
    pace, interval = conn.recv()
    x, w, b = torch.randn(16, 64), torch.randn(64, 176), torch.randn(176)
    for _ in range(500):
        torch.addmm(b, x, w)
    t = time.perf_counter()
    for _ in range(5000):
        torch.addmm(b, x, w)
    op_s = (time.perf_counter() - t) / 5000
    reqs: dict[int, list] = {}  # rid -> [max tokens, made, sent, next send time]
    while True:
        while not reqs or conn.poll():
            try:
                kind, rid, n = conn.recv()
            except EOFError:
                return
            if kind == "add":
                reqs[rid] = [n, 0, 0, 0.0]
            else:
                reqs.pop(rid, None)
        for _ in range(max(1, round(step_seconds(pace, len(reqs)) / op_s))):
            torch.addmm(b, x, w)
        now, out = time.monotonic(), []
        for rid, r in list(reqs.items()):
            r[1] += 1
            if r[1] == r[0] or now >= r[3]:
                out.append((rid, r[1] - r[2]))
                r[2], r[3] = r[1], next_tick(now, interval, first=r[2] == 0)
            if r[1] == r[0]:
                del reqs[rid]
        if out:
            conn.send(out)


class FloorDecoder:
    def __init__(self, pace: list[tuple[int, float]], stream_interval_s: float, engine_work: bool = False):
        self.pace = sorted(pace)  # (batch size, engine seconds per step at that batch size)
        self.interval = stream_interval_s
        self.inflight = 0
        self.engine = WorkEngine(self.pace, stream_interval_s) if engine_work else None

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
        run = self.engine.tokens(max_tokens) if self.engine else self._run(max_tokens, self.interval)
        async for n in run:
            yield n

    async def complete(self, max_tokens: int) -> int:
        total = 0
        run = self.engine.tokens(max_tokens) if self.engine else self._run(max_tokens, 0.05)  # 0.05: re-read the pace
        async for n in run:
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


def floor_app(pace: list[tuple[int, float]], stream_interval_s: float, num_cpus: float, engine_work: bool = False):
    """The floor's two deployments, with the replica environment vlora's Ingress and Decoder get (the same
    Serve settings on both sides; a tree from before that setting has none). `engine_work`: the decoder's
    engine is a `WorkEngine` instead of a sleep."""
    try:
        from vlora.deployments.app import hot_path_env
        env = hot_path_env()
    except ImportError:
        env = {}
    actor = {"num_cpus": num_cpus, **({"runtime_env": {"env_vars": env}} if env else {})}
    opts = dict(max_ongoing_requests=256, ray_actor_options=actor)
    dec = serve.deployment(FloorDecoder, name="FloorDecoder").options(**opts).bind(pace, stream_interval_s, engine_work)
    return serve.deployment(FloorIngress, name="FloorIngress").options(**opts).bind(dec)
