"""`vlora bench`: an asyncio load generator for any OpenAI-compatible chat endpoint.

Every request streams, so time-to-first-token is measured where a user feels it (the first
content chunk), and asks for a final usage chunk, so token counts are the server's own,
not a client-side guess. Requests go round-robin over the base model and the given
adapters; a seeded share of them carries a freshly generated noise image (unique per
request, so the server's image cache cannot flatter the numbers). A run stops by itself:
after `requests` requests or `duration_s` seconds, whichever comes first.
"""

from __future__ import annotations

import asyncio
import io
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import openai

from vlora.client.client import data_url

# Prompt vocabulary: plain English words, so a byte-level BPE gives roughly one token each.
WORDS = (
    "the quick brown fox jumps over a lazy dog while seven small birds sing about green hills "
    "under bright morning light and old friends share stories of distant cities rivers boats "
    "markets music bread stone glass paper window garden winter summer ocean mountain forest"
).split()


@dataclass
class BenchConfig:
    """What `vlora bench` runs; written into the JSON report so a figure carries its setup."""

    concurrency: int = 8
    requests: int = 64
    adapters: list[str] = field(default_factory=list)
    image_share: float = 0.3
    image_size: int = 224
    max_tokens: int = 32
    prompt_words: int = 20
    duration_s: float = 300.0
    temperature: float | None = None
    ignore_eos: bool = False
    seed: int = 0

    def __post_init__(self):
        if self.concurrency < 1 or self.requests < 1:
            raise ValueError("concurrency and requests must be >= 1")
        if not 0.0 <= self.image_share <= 1.0:
            raise ValueError(f"image share must be within [0, 1], got {self.image_share}")
        if self.duration_s <= 0 or self.max_tokens < 1 or self.prompt_words < 1 or self.image_size < 1:
            raise ValueError("duration, max tokens, prompt words and image size must be positive")


@dataclass
class RequestResult:
    """One request's outcome; times in seconds from just before the request was sent."""

    index: int
    model: str
    image: bool
    ok: bool
    error: str | None = None  # HTTP status as a string, "timeout", "connection", or an exception name
    message: str | None = None
    ttft_s: float | None = None
    latency_s: float | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    usage_reported: bool = False


def noise_png(size: int, rng: random.Random) -> bytes:
    """A size x size RGB noise PNG: noise does not compress, so it is a fair upload to time."""
    from PIL import Image

    img = Image.frombytes("RGB", (size, size), rng.randbytes(size * size * 3))
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def percentiles(values: list[float], qs=(50, 90, 99)) -> dict:
    """Linear-interpolated percentiles (numpy's default) plus mean and max; empty -> Nones."""
    keys = [f"p{q}" for q in qs] + ["mean", "max"]
    if not values:
        return dict.fromkeys(keys)
    v = sorted(values)
    out = {}
    for q in qs:
        pos = (len(v) - 1) * q / 100
        lo = int(pos)
        hi = min(lo + 1, len(v) - 1)
        out[f"p{q}"] = v[lo] + (v[hi] - v[lo]) * (pos - lo)
    out["mean"] = sum(v) / len(v)
    out["max"] = v[-1]
    return out


def _error_key(exc: BaseException) -> tuple[str, str]:
    if isinstance(exc, openai.APIStatusError):
        body = exc.body if isinstance(exc.body, dict) else {}
        return str(exc.status_code), str(body.get("message") or exc.message)
    if isinstance(exc, openai.APITimeoutError):  # before APIConnectionError: it is a subclass
        return "timeout", str(exc)
    if isinstance(exc, openai.APIConnectionError):
        return "connection", str(exc.__cause__ or exc)
    return type(exc).__name__, str(exc)


class LoadGenerator:
    """Runs one benchmark against `client` over `models` (base first, then adapters)."""

    def __init__(self, client: openai.AsyncOpenAI, models: list[str], cfg: BenchConfig):
        self.client = client
        self.models = models
        self.cfg = cfg
        n_images = round(cfg.requests * cfg.image_share)
        # A seeded sample rather than every k-th request, so images do not line up with the
        # round-robin models (e.g. share 0.5 over two models would put all images on one).
        self.image_requests = set(random.Random(cfg.seed).sample(range(cfg.requests), n_images))

    def _messages(self, i: int, rng: random.Random, png: bytes | None) -> list[dict]:
        text = " ".join(rng.choice(WORDS) for _ in range(self.cfg.prompt_words))
        if png is None:
            return [{"role": "user", "content": text}]
        return [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(png, "image/png")}},
            {"type": "text", "text": text}]}]

    async def _one(self, i: int) -> RequestResult:
        cfg = self.cfg
        model = self.models[i % len(self.models)]
        rng = random.Random(cfg.seed * 1_000_003 + i)
        has_image = i in self.image_requests
        # PNG encoding runs off the event loop so it does not delay other requests' chunks.
        png = await asyncio.to_thread(noise_png, cfg.image_size, rng) if has_image else None
        kw: dict = dict(model=model, messages=self._messages(i, rng, png), max_tokens=cfg.max_tokens,
                        stream=True, stream_options={"include_usage": True})
        if cfg.temperature is not None:
            kw["temperature"] = cfg.temperature
        if cfg.ignore_eos:
            kw["extra_body"] = {"ignore_eos": True}
        res = RequestResult(index=i, model=model, image=has_image, ok=False)
        content_chunks = 0
        t0 = time.perf_counter()
        try:
            stream = await self.client.chat.completions.create(**kw)
            async with stream:  # closes the connection if the run's time cap cancels us
                async for chunk in stream:
                    if chunk.usage is not None:
                        res.prompt_tokens = chunk.usage.prompt_tokens
                        res.output_tokens = chunk.usage.completion_tokens
                        res.usage_reported = True
                    for choice in chunk.choices:
                        if choice.delta is not None and choice.delta.content:
                            if res.ttft_s is None:
                                res.ttft_s = time.perf_counter() - t0
                            content_chunks += 1
            res.latency_s = time.perf_counter() - t0
            res.ok = True
            if not res.usage_reported:  # a server without include_usage: one chunk ~ one token
                res.output_tokens = content_chunks
        except Exception as exc:  # noqa: BLE001 - every failure is counted, none stops the run
            res.error, res.message = _error_key(exc)
            res.ttft_s = None
        return res

    async def run(self, progress: bool | None = None) -> tuple[list[RequestResult], int, float]:
        """Returns (results in completion order, requests sent, wall seconds). `progress=None`
        shows the bar only on a terminal."""
        from tqdm import tqdm

        cfg = self.cfg
        results: list[RequestResult] = []
        next_index = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + cfg.duration_s
        bar = tqdm(total=cfg.requests, unit="req", desc="bench", disable=None if progress is None else not progress,
                   dynamic_ncols=True, leave=False)

        async def worker():
            nonlocal next_index
            while next_index < cfg.requests and loop.time() < deadline:
                i = next_index
                next_index += 1
                res = await self._one(i)
                results.append(res)
                bar.update(1)
                if not res.ok:
                    bar.set_postfix(errors=sum(not r.ok for r in results), refresh=False)

        t0 = time.perf_counter()
        tasks = [asyncio.create_task(worker()) for _ in range(cfg.concurrency)]
        try:
            _, pending = await asyncio.wait(tasks, timeout=cfg.duration_s)
            for t in pending:  # time cap: requests still in flight are cancelled, not counted
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        finally:
            bar.close()
        return results, next_index, time.perf_counter() - t0


def _group(results: list[RequestResult]) -> dict:
    ok = [r for r in results if r.ok]
    return {
        "requests": len(results),
        "successes": len(ok),
        "output_tokens": sum(r.output_tokens for r in ok),
        "ttft_s": percentiles([r.ttft_s for r in ok if r.ttft_s is not None]),
        "latency_s": percentiles([r.latency_s for r in ok]),
    }


def summarize(results: list[RequestResult], sent: int, wall_s: float, cfg: BenchConfig,
              models: list[str], url: str) -> dict:
    """Everything `vlora bench` prints, as one JSON-ready dict (per-request records included)."""
    ok = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    # Decode speed per request: time after the first token over the tokens after it.
    tpot = [(r.latency_s - r.ttft_s) / (r.output_tokens - 1)
            for r in ok if r.ttft_s is not None and r.output_tokens > 1]
    examples: dict[str, str] = {}
    for r in failed:
        examples.setdefault(r.error, r.message)
    return {
        "url": url,
        "models": models,
        "concurrency": cfg.concurrency,
        "requests_planned": cfg.requests,
        "requests_sent": sent,
        "successes": len(ok),
        "failures": len(failed),
        "cancelled": sent - len(results),
        "image_requests": sum(r.image for r in results),
        "errors": dict(Counter(r.error for r in failed)),
        "error_examples": examples,
        "duration_s": wall_s,
        "requests_per_s": len(ok) / wall_s if wall_s > 0 else 0.0,
        "prompt_tokens": sum(r.prompt_tokens for r in ok),
        "output_tokens": out_tokens,
        "output_tokens_per_s": out_tokens / wall_s if wall_s > 0 else 0.0,
        "tokens_from_usage": all(r.usage_reported for r in ok),
        "ttft_s": percentiles([r.ttft_s for r in ok if r.ttft_s is not None]),
        "latency_s": percentiles([r.latency_s for r in ok]),
        "tpot_s": percentiles(tpot),
        "per_model": {m: _group([r for r in results if r.model == m]) for m in models},
        "per_kind": {k: _group([r for r in results if r.image == (k == "image")]) for k in ("text", "image")},
        "config": asdict(cfg),
        "per_request": [asdict(r) for r in sorted(results, key=lambda r: r.index)],
    }


def _ms(p: dict) -> str:
    if p.get("p50") is None:
        return "n/a"
    return "   ".join(f"{k} {p[k] * 1e3:8.1f} ms" for k in ("p50", "p90", "p99"))


def format_report(s: dict) -> str:
    """The human summary of `summarize`'s dict."""
    lines = [
        f"vlora bench -> {s['url']}",
        f"  models       {', '.join(s['models'])} (round-robin)",
        f"  load         concurrency {s['concurrency']}, max_tokens {s['config']['max_tokens']}, "
        f"{s['config']['prompt_words']} prompt words, {s['image_requests']} requests with an image",
        f"  requests     {s['successes']} ok, {s['failures']} failed, {s['cancelled']} cancelled "
        f"of {s['requests_sent']} sent ({s['requests_planned']} planned) in {s['duration_s']:.2f} s",
        f"  throughput   {s['requests_per_s']:.2f} req/s   {s['output_tokens_per_s']:.1f} output tok/s   "
        f"({s['output_tokens']} output, {s['prompt_tokens']} prompt tokens"
        f"{'' if s['tokens_from_usage'] else '; some counted from chunks, no usage'})",
        f"  TTFT         {_ms(s['ttft_s'])}",
        f"  latency      {_ms(s['latency_s'])}",
        f"  per token    {_ms(s['tpot_s'])}",
    ]
    if len(s["per_model"]) > 1:
        width = max(len(m) for m in s["per_model"])
        for j, (m, g) in enumerate(s["per_model"].items()):
            p50 = g["ttft_s"]["p50"]
            ttft = f"TTFT p50 {p50 * 1e3:.1f} ms" if p50 is not None else "TTFT n/a"
            lines.append(f"  {'per model' if j == 0 else '':12} {m:{width}}  {g['successes']:>5} ok  "
                         f"{g['output_tokens']:>7} tok  {ttft}")
    for j, (key, n) in enumerate(sorted(s["errors"].items())):
        lines.append(f"  {'errors' if j == 0 else '':12} {key} x{n}: {s['error_examples'][key]}")
    return "\n".join(lines)
