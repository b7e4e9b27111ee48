"""Serving overhead: the full HTTP path (openai SDK -> Ray Serve DAG) vs the engine alone, same work.

    python bench/serve.py [--quick] [--json PATH] [--replicas 1,2] [--reps 20] [--max-tokens 32]
    python bench/serve.py path [--before main] [--quick] [--json PATH]   # see bench/serve_path.py

One run starts its own Ray + Serve instance on 127.0.0.1 (a free port, loopback only) with the
tiny model generated into a temp dir, deploys the app once per Decoder replica count asked
for (`/r1`, `/r2`: same config, all replicas on this machine), measures, and shuts it all down.

- sequential single requests, greedy, fixed max_tokens, `ignore_eos` (via extra_body), so both
  sides generate exactly the same tokens:
    (a) engine alone, in this process: `PromptBuilder.build_chat` (chat template, tokens, M-RoPE),
        the image through `engine.images` (data-URL decode, transform) and `engine.vision`
        (tower), then `LLMEngine.add_request` and `step()` until it finishes. No cache anywhere.
    (b) the same messages through HTTP with the `openai` SDK against the Serve app: Ingress ->
        Preprocessor -> (VisionEncoder) -> Decoder. Every image is a fresh noise PNG, so the
        VisionEncoder's hash-keyed cache never hits; (a) and (b) see the same image.
  The two sides alternate request by request. Reported: p50 / mean latency, overhead (b) - (a),
  and time to first token (first streamed chunk vs the engine step that made the first token).
  Text with max_tokens=1 gives the fixed per-request cost; max_tokens=N minus it, over N-1,
  the per-token cost of streaming tokens through the Decoder -> Ingress hop.
- concurrency sweep (1, 4, 16): throughput through HTTP with client/loadgen.py (streaming,
  server-reported usage), vs the engine alone running the same prompts closed-loop with the
  same number in flight (add a request whenever one finishes).

The in-process engine gets the same EngineConfig as a Decoder replica and the same torch thread
count a replica gets (probed with a Ray task of the same num_cpus), so on a CPU the comparison is
one core against one core. Replicas share this machine's cores with the client and the driver:
on a small CPU, read the concurrency sweep as "what the whole box does".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# `python bench/X.py` puts bench/ first on sys.path, and Ray hands the script's directory to every
# worker's sys.path: bench/adapters.py would then shadow the `adapters` package there. The project
# root goes first instead and bench/ is dropped (bench/ modules import as `bench.serve`).
_HERE = str(Path(__file__).resolve().parent)
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != _HERE]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from vlora.client.client import data_url  # noqa: E402
from vlora.client.loadgen import BenchConfig, LoadGenerator, noise_png, summarize  # noqa: E402
from vlora.deployments.app import decoder_stats  # noqa: E402
from vlora.engine.config import EngineConfig  # noqa: E402
from vlora.engine.engine import LLMEngine  # noqa: E402
from vlora.engine.images import ImageTransform, load_image  # noqa: E402
from vlora.engine.prompts import PromptBuilder  # noqa: E402
from vlora.engine.sampling import SamplingParams  # noqa: E402
from vlora.engine.tp import free_port  # noqa: E402
from vlora.engine.vision import VisionEncoder  # noqa: E402

MODEL_NAME = "tiny"
REPLICA_CPUS = 0.1  # logical CPUs per replica (as in the e2e tests): every deployment fits on 2 cores
# One Decoder replica's engine limits; the in-process engine gets the same EngineConfig.
ENGINE_LIMITS = dict(max_num_seqs=32, max_num_batched_tokens=2048, kv_cache_memory_mb=32, block_size=16,
                     max_model_len=1024, max_loras=8, max_lora_rank=16, max_waiting_requests=256)
TEXT_PROMPT = ("the quick brown fox jumps over a lazy dog while seven small birds sing about green hills "
               "under bright morning light")


# -- small helpers -------------------------------------------------------------------------------
def p50(xs: list[float]) -> float:
    return statistics.median(xs)


def mean(xs: list[float]) -> float:
    return statistics.fmean(xs)


def fmt(x: float | None, spec: str = ".1f", width: int = 8) -> str:
    return f"{'-':>{width}}" if x is None else f"{x:>{width}{spec}}"


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def resolve_device() -> tuple[str, str]:
    """What a replica picks with device/dtype "auto" (deployments/placement.py)."""
    return ("cuda", "bfloat16") if torch.cuda.is_available() else ("cpu", "float32")


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    import openai
    import ray
    import transformers

    device, dtype = resolve_device()
    return dict(cpu=cpu_name(), cores=os.cpu_count(), loadavg=[round(x, 2) for x in os.getloadavg()],
                device=device, device_name=torch.cuda.get_device_name() if device == "cuda" else "cpu", dtype=dtype,
                python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__,
                ray=ray.__version__, openai=openai.__version__, driver_torch_threads=torch.get_num_threads())


def print_machine(m: dict) -> None:
    print(f"machine: {m['cpu']}, {m['cores']} cores, load average {m['loadavg']} at start; "
          f"device {m['device_name']} ({m['dtype']})")
    print(f"versions: python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, ray {m['ray']}, "
          f"openai {m['openai']}; torch threads per replica {m.get('replica_torch_threads')}"
          + (f", in-process engine {m['engine_torch_threads']}" if m.get("engine_torch_threads") else ""), flush=True)


def image_message(png: bytes, text: str = TEXT_PROMPT) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png, "image/png")}},
                                         {"type": "text", "text": text}]}]


def text_message(text: str = TEXT_PROMPT) -> list[dict]:
    return [{"role": "user", "content": text}]


def fresh_png(size: int, seed: int) -> bytes:
    """A noise image no other request uses (the VisionEncoder's cache is keyed by content)."""
    return noise_png(size, random.Random(10_000_019 * (seed + 1)))


# -- the cluster -----------------------------------------------------------------------------------
def app_config(model_dir: Path, store_dir: Path, load_dir: Path | None = None, decoders: int = 1,
               engine: dict | None = None) -> dict:
    """The app's `args` (deployments/config.py AppConfig): every deployment 0.1 CPU, N Decoders."""
    lim = {**ENGINE_LIMITS, **(engine or {})}
    rep = {"num_replicas": 1, "num_cpus": REPLICA_CPUS}
    return {
        "model_dir": str(model_dir),
        "served_model_name": MODEL_NAME,
        "adapter_store_dir": str(store_dir),
        "adapter_load_dirs": [str(load_dir)] if load_dir else [],
        "admin_open": True,  # a private instance on 127.0.0.1: bench/adapters.py calls the admin routes keyless
        "engine": lim,
        "preprocessor": dict(rep),
        "vision_encoder": dict(rep),
        "decoder": {**rep, "num_replicas": decoders},
        "ingress": dict(rep),
        "trainer": dict(rep),
    }


class ServeCluster:
    """A private Ray + Serve instance on 127.0.0.1 with the tiny model in a temp dir, started with the
    cluster environment `make serve` uses (Serve's HAProxy ingress).

    `with ServeCluster() as c: url = c.deploy("r1", decoders=1)`; on exit Serve and Ray are shut
    down and the temp dir (model, adapter stores) is removed.
    """

    def __init__(self, num_cpus: int | None = None, env: dict | None = None):
        self.num_cpus = num_cpus or max(2, os.cpu_count() or 2)
        self.env = {"TOKENIZERS_PARALLELISM": "false", **(env or {})}
        self._tmp = None
        self.apps: dict[str, dict] = {}

    def __enter__(self) -> "ServeCluster":
        try:  # the cluster environment `make serve` starts with, from the tree under test
            from vlora.deployments.launch import cluster_env
        except ImportError:  # a tree from before it: Serve's defaults
            def cluster_env(one_node: bool) -> dict:
                return {}
        # before Ray starts (its processes inherit it); HAProxy's stats page and metrics exporter on free
        # ports, so a `make serve` on this machine does not collide with the bench
        os.environ.update({**cluster_env(one_node=True), "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
                           "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port())})
        import ray
        from ray import serve

        from vlora.engine.tiny import write_tiny_model

        self._tmp = tempfile.TemporaryDirectory(prefix="vlora-bench-")
        self.tmp = Path(self._tmp.name)
        t = time.perf_counter()
        self.model_dir = write_tiny_model(self.tmp / "tiny", seed=0)
        self.model_s = time.perf_counter() - t
        # Workers also get the driver's cwd on sys.path: make it the project root (see the top).
        os.chdir(ROOT)
        t = time.perf_counter()
        ray.init(num_cpus=self.num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False,
                 runtime_env={"env_vars": self.env})
        self.port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": self.port})
        self.ray_s = time.perf_counter() - t
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def deploy(self, name: str, decoders: int = 1, engine: dict | None = None, load_dir: Path | None = None,
               **over) -> str:
        """Deploy the app under /<name>; returns its base URL (OpenAI clients add /v1)."""
        from ray import serve

        from vlora.deployments.app import build_app

        cfg = app_config(self.model_dir, self.tmp / f"store-{name}", load_dir, decoders, engine)
        cfg.update(over)
        t = time.perf_counter()
        serve.run(build_app(cfg), name=name, route_prefix=f"/{name}")
        self.apps[name] = dict(config=cfg, deploy_s=time.perf_counter() - t)
        return f"{self.url}/{name}"

    def replica_torch_threads(self) -> int:
        """torch threads in a Ray worker with the replicas' num_cpus (Ray sets OMP_NUM_THREADS)."""
        import ray

        probe = ray.remote(num_cpus=REPLICA_CPUS)(lambda: __import__("torch").get_num_threads())
        return int(ray.get(probe.remote()))

    def __exit__(self, *exc) -> None:
        import ray
        from ray import serve

        with contextlib.suppress(Exception):
            serve.shutdown()
        with contextlib.suppress(Exception):
            ray.shutdown()
        self._tmp.cleanup()


# -- the engine alone --------------------------------------------------------------------------------
def decoder_engine_config(model_dir: Path, device: str, dtype: str, limits: dict | None = None) -> EngineConfig:
    """The engine config a Decoder replica builds (deployments/decoder.py) from these engine limits
    (default ENGINE_LIMITS)."""
    lim = {**ENGINE_LIMITS, **(limits or {})}
    return EngineConfig(
        model_dir=str(model_dir), device=device, dtype=dtype, block_size=lim["block_size"],
        kv_cache_memory_bytes=lim["kv_cache_memory_mb"] * 2**20, max_num_seqs=lim["max_num_seqs"],
        max_num_batched_tokens=max(lim["max_num_batched_tokens"], lim["max_num_seqs"]),
        max_model_len=lim["max_model_len"], max_loras=lim["max_loras"], max_lora_rank=lim["max_lora_rank"])


class EngineAlone:
    """What one request costs without serving: prompt, image, tower, engine steps, in this process."""

    def __init__(self, model_dir: Path, device: str, dtype: str, limits: dict | None = None):
        self.builder = PromptBuilder.from_pretrained(model_dir)
        self.transform = ImageTransform.from_pretrained(model_dir)
        self.vision = VisionEncoder.from_pretrained(model_dir, device=device, dtype=getattr(torch, dtype))
        self.engine = LLMEngine(decoder_engine_config(model_dir, device, dtype, limits))
        self.device = device

    def prepare(self, messages: list[dict]):
        images = [self.transform(load_image(u)) for u in PromptBuilder.image_urls(messages)]
        prompt = self.builder.build_chat(messages, [im.grid_thw for im in images])
        embeds = None
        if images:
            embeds = torch.cat(self.vision.encode([im.pixel_values for im in images], [im.grid_thw for im in images]))
        return prompt, embeds

    def run_one(self, messages: list[dict], max_tokens: int) -> dict:
        """One request start to finish: (ttft_s, latency_s, text, completion tokens)."""
        sp = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        e = self.engine
        t0 = time.perf_counter()
        prompt, embeds = self.prepare(messages)
        rid = e.add_request(prompt, sp, image_embeds=embeds)
        ttft, text, n = None, [], 0
        while e.has_unfinished():
            for o in e.step():
                for c in o.choices:
                    if c.token_ids and ttft is None:
                        ttft = time.perf_counter() - t0
                    n += len(c.token_ids)
                    text.append(c.text)
        assert rid not in e.requests
        return dict(ttft_s=ttft, latency_s=time.perf_counter() - t0, text="".join(text), tokens=n)

    def closed_loop(self, all_messages: list[list[dict]], concurrency: int, max_tokens: int) -> dict:
        """All requests with `concurrency` in flight (a new one whenever one finishes); tok/s overall."""
        sp = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        e = self.engine
        todo = list(all_messages)
        inflight, tokens, done = 0, 0, 0
        t0 = time.perf_counter()
        while todo or e.has_unfinished():
            while todo and inflight < concurrency:
                prompt, embeds = self.prepare(todo.pop(0))
                e.add_request(prompt, sp, image_embeds=embeds)
                inflight += 1
            for o in e.step():
                tokens += sum(len(c.token_ids) for c in o.choices)
                if o.finished:
                    inflight -= 1
                    done += 1
        wall = time.perf_counter() - t0
        return dict(requests=done, output_tokens=tokens, duration_s=wall, output_tokens_per_s=tokens / wall,
                    requests_per_s=done / wall)


# -- the HTTP side -----------------------------------------------------------------------------------
def http_one(client, messages: list[dict], max_tokens: int, stream: bool = False) -> dict:
    """One request through the openai SDK; TTFT = first streamed chunk with a choice (= first token)."""
    kw = dict(model=MODEL_NAME, messages=messages, max_tokens=max_tokens, temperature=0,
              extra_body={"ignore_eos": True})
    t0 = time.perf_counter()
    if not stream:
        r = client.chat.completions.create(**kw)
        return dict(ttft_s=None, latency_s=time.perf_counter() - t0, text=r.choices[0].message.content,
                    tokens=r.usage.completion_tokens)
    ttft, text, n = None, [], 0
    with client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw) as s:
        for chunk in s:
            if chunk.choices and ttft is None:
                ttft = time.perf_counter() - t0
            for c in chunk.choices:
                text.append(c.delta.content or "")
            if chunk.usage is not None:
                n = chunk.usage.completion_tokens
    return dict(ttft_s=ttft, latency_s=time.perf_counter() - t0, text="".join(text), tokens=n)


async def http_load(url: str, cfg: BenchConfig, models: list[str]) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="EMPTY", max_retries=0, timeout=600)
    try:
        results, sent, wall = await LoadGenerator(client, models, cfg).run(progress=False)
    finally:
        await client.close()
    s = summarize(results, sent, wall, cfg, models, url)
    s.pop("per_request")
    return s


def loadgen_messages(cfg: BenchConfig, models: list[str]) -> list[list[dict]]:
    """The exact messages LoadGenerator sends for cfg (same seeded rng per request index)."""
    gen = LoadGenerator(None, models, cfg)
    out = []
    for i in range(cfg.requests):
        rng = random.Random(cfg.seed * 1_000_003 + i)
        png = noise_png(cfg.image_size, rng) if i in gen.image_requests else None
        out.append(gen._messages(i, rng, png))
    return out


def sweep_config(concurrency: int, requests: int, max_tokens: int, image_share: float, image_size: int,
                 seed: int = 0) -> BenchConfig:
    return BenchConfig(concurrency=concurrency, requests=requests, image_share=image_share, image_size=image_size,
                       max_tokens=max_tokens, prompt_words=20, temperature=0.0, ignore_eos=True, seed=seed,
                       duration_s=300.0)


# -- the benchmark -------------------------------------------------------------------------------------
def sequential(eng: EngineAlone, clients: dict[str, object], reps: int, warmup: int, max_tokens: int,
               image_size: int) -> dict:
    """Single requests one after another, engine and HTTP alternating; the same messages for both."""
    N = max_tokens
    cases = [("text_1", "text, 1 token", 1, False), ("text_n", f"text, {N} tokens", N, False),
             ("image_n", f"image {image_size}px, {N} tokens", N, False),
             ("text_n_stream", f"text, {N} tokens, streamed", N, True),
             ("image_n_stream", f"image {image_size}px, {N} tokens, streamed", N, True)]
    raw: dict[str, dict[str, list[dict]]] = {k: {"engine": [], **{a: [] for a in clients}} for k, *_ in cases}
    same = {a: [0, 0] for a in clients}  # engine text == HTTP text (greedy, same image), of n compared
    bad_tokens: list[str] = []
    seed = 0
    for rep in range(warmup + reps):
        keep = rep >= warmup
        for key, _, mt, stream in cases:
            is_image = key.startswith("image")
            if is_image:
                seed += 1
                msgs = image_message(fresh_png(image_size, seed))
            else:
                msgs = text_message()
            e = eng.run_one(msgs, mt)  # the engine does the same work streamed or not: it always steps
            if e["tokens"] != mt:
                bad_tokens.append(f"engine {key}: {e['tokens']} tokens, expected {mt}")
            if keep:
                raw[key]["engine"].append(e)
            for app, client in clients.items():
                if is_image and stream:  # a fresh image per streamed request too (no cache hit)
                    seed += 1
                    msgs = image_message(fresh_png(image_size, seed))
                h = http_one(client, msgs, mt, stream)
                if h["tokens"] != mt:
                    bad_tokens.append(f"{app} {key}: {h['tokens']} tokens, expected {mt}")
                if keep:
                    raw[key][app].append(h)
                    if not stream:
                        same[app][1] += 1
                        same[app][0] += int(h["text"] == e["text"])
    out: dict = {"cases": {}, "same_text": same, "token_count_errors": bad_tokens}
    for key, label, mt, stream in cases:
        row = {"label": label, "max_tokens": mt, "stream": stream}
        for side, runs in raw[key].items():
            lat = [r["latency_s"] * 1e3 for r in runs]
            ttft = [r["ttft_s"] * 1e3 for r in runs if r["ttft_s"] is not None]
            row[side] = dict(latency_p50_ms=p50(lat), latency_mean_ms=mean(lat),
                             ttft_p50_ms=p50(ttft) if ttft else None, ttft_mean_ms=mean(ttft) if ttft else None,
                             latency_ms=[round(x, 2) for x in lat])
        out["cases"][key] = row
    return out


def print_sequential(seq: dict, apps: list[str], reps: int) -> None:
    print()
    print(f"sequential single requests (greedy, ignore_eos), {reps} each, engine and HTTP alternating; "
          f"ms, p50 / mean")
    head = f"{'':>44} {'engine alone':>15}"
    for a in apps:
        head += f" {'HTTP ' + a:>15} {'overhead ' + a:>16}"
    print(head)
    for key, row in seq["cases"].items():
        line = f"{row['label'] + ' latency':>44} "
        e = row["engine"]
        line += f"{e['latency_p50_ms']:>7.1f} /{e['latency_mean_ms']:>6.1f}"
        for a in apps:
            h = row[a]
            line += (f" {h['latency_p50_ms']:>7.1f} /{h['latency_mean_ms']:>6.1f}"
                     f" {h['latency_p50_ms'] - e['latency_p50_ms']:>+8.1f} /{h['latency_mean_ms'] - e['latency_mean_ms']:>+6.1f}")
        print(line)
        if row["stream"]:
            line = f"{'TTFT':>44} {e['ttft_p50_ms']:>7.1f} /{e['ttft_mean_ms']:>6.1f}"
            for a in apps:
                h = row[a]
                line += (f" {h['ttft_p50_ms']:>7.1f} /{h['ttft_mean_ms']:>6.1f}"
                         f" {h['ttft_p50_ms'] - e['ttft_p50_ms']:>+8.1f} /{h['ttft_mean_ms'] - e['ttft_mean_ms']:>+6.1f}")
            print(line)
    c = seq["cases"]
    n = c["text_n"]["max_tokens"]
    for a in apps:
        fixed = c["text_1"][a]["latency_mean_ms"] - c["text_1"]["engine"]["latency_mean_ms"]
        longer = c["text_n"][a]["latency_mean_ms"] - c["text_n"]["engine"]["latency_mean_ms"]
        per_tok = (longer - fixed) / (n - 1) if n > 1 else None
        seq.setdefault("derived", {})[a] = dict(fixed_overhead_ms=fixed, per_token_overhead_ms=per_tok)
        print(f"  HTTP {a}: fixed overhead per request {fixed:.1f} ms (text, 1 token, means); per extra token "
              f"{fmt(per_tok, '.2f', 0)} ms ((overhead at {n} tokens - at 1) / {n - 1}); greedy text equal to "
              f"the engine's in {seq['same_text'][a][0]}/{seq['same_text'][a][1]} non-streamed requests")
    if seq["token_count_errors"]:
        print("  TOKEN COUNT MISMATCHES: " + "; ".join(seq["token_count_errors"][:5]))


def sweep(eng: EngineAlone, urls: dict[str, str], levels: list[int], requests: int, max_tokens: int,
          image_share: float, image_size: int) -> list[dict]:
    rows = []
    for c in levels:
        cfg = sweep_config(c, requests, max_tokens, image_share, image_size)
        msgs = loadgen_messages(cfg, [MODEL_NAME])
        e = eng.closed_loop(msgs, c, max_tokens)
        row = dict(concurrency=c, requests=requests, engine=e, http={})
        for app, url in urls.items():
            row["http"][app] = asyncio.run(http_load(url, cfg, [MODEL_NAME]))
        rows.append(row)
    return rows


def print_sweep(rows: list[dict], apps: list[str], max_tokens: int, image_share: float) -> None:
    print()
    print(f"concurrency sweep: {rows[0]['requests']} requests per level, {max_tokens} tokens each (ignore_eos), "
          f"20-word prompts, image share {image_share}; output tok/s (HTTP: client/loadgen.py, streaming; "
          f"engine: same prompts closed-loop in this process)")
    head = f"{'conc':>4} {'engine tok/s':>13}"
    for a in apps:
        head += f" {'HTTP ' + a + ' tok/s':>15} {'HTTP/engine':>11} {'TTFT p50 ms':>11} {'lat p50 ms':>10} {'fail':>4}"
    print(head)
    for r in rows:
        e = r["engine"]["output_tokens_per_s"]
        line = f"{r['concurrency']:>4} {e:>13.1f}"
        for a in apps:
            h = r["http"][a]
            tt = h["ttft_s"]["p50"]
            la = h["latency_s"]["p50"]
            line += (f" {h['output_tokens_per_s']:>15.1f} {ratio(h['output_tokens_per_s'], e):>10.2f}x"
                     f" {fmt(tt and tt * 1e3, '.1f', 11)} {fmt(la and la * 1e3, '.1f', 10)} {h['failures']:>4}")
            r["http"][a]["http_over_engine"] = ratio(h["output_tokens_per_s"], e)
        print(line)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replicas", default="1,2", help="Decoder replica counts, one app each (default 1,2)")
    p.add_argument("--reps", type=int, default=None, help="sequential requests per case and side (default 20)")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured rounds before the sequential runs")
    p.add_argument("--max-tokens", type=int, default=32, help="generated tokens per request (default 32)")
    p.add_argument("--image-size", type=int, default=224, help="noise image side in pixels (default 224)")
    p.add_argument("--sweep", default="1,4,16", help="concurrency levels (default 1,4,16)")
    p.add_argument("--sweep-requests", type=int, default=None, help="requests per level (default 64)")
    p.add_argument("--sweep-image-share", type=float, default=0.0, help="share of sweep requests with an image")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of the in-process engine (default: what a replica gets)")
    p.add_argument("--num-cpus", type=int, default=None, help="logical CPUs given to ray.init (default: cores)")
    p.add_argument("--quick", action="store_true", help="fewer repetitions and requests (well under 2 minutes)")
    p.add_argument("--json", help="also write the results as JSON here")
    a = p.parse_args(argv)
    a.replicas = [int(x) for x in a.replicas.split(",") if x]
    a.sweep = [int(x) for x in a.sweep.split(",") if x]
    a.reps = a.reps or (6 if a.quick else 20)
    a.sweep_requests = a.sweep_requests or (32 if a.quick else 64)
    if a.max_tokens < 2:
        p.error("--max-tokens must be >= 2 (the 1-token case is measured besides)")
    if a.json:
        a.json = os.path.abspath(a.json)
    return a


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["path"]:  # the serving path vs its floor and the engine, before/after (bench/serve_path.py)
        from bench.serve_path import main as path_main

        return path_main(argv[1:])
    a = parse_args(argv)
    t_start = time.perf_counter()
    R: dict = {"args": vars(a).copy()}
    with ServeCluster(num_cpus=a.num_cpus) as cluster:
        m = machine_info()
        m["replica_torch_threads"] = cluster.replica_torch_threads()
        torch.set_num_threads(a.threads or m["replica_torch_threads"])
        m["engine_torch_threads"] = torch.get_num_threads()
        urls = {f"r{n}": cluster.deploy(f"r{n}", decoders=n) for n in a.replicas}
        device, dtype = resolve_device()
        eng = EngineAlone(cluster.model_dir, device, dtype)
        m.update(tiny_model_s=round(cluster.model_s, 1), ray_start_s=round(cluster.ray_s, 1),
                 deploy_s={k: round(v["deploy_s"], 1) for k, v in cluster.apps.items()})
        R["machine"] = m
        print("vlora serving-overhead benchmark (bench/serve.py)")
        print_machine(m)
        print(f"apps: {', '.join(f'/{k} = {n} Decoder replica(s)' for k, n in zip(urls, a.replicas))}; every "
              f"deployment {REPLICA_CPUS} logical CPU; engine limits {ENGINE_LIMITS}; setup: tiny model "
              f"{cluster.model_s:.1f} s, ray+serve {cluster.ray_s:.1f} s, deploy "
              f"{', '.join(f'{k} {v}s' for k, v in m['deploy_s'].items())}", flush=True)

        import openai

        clients = {k: openai.OpenAI(base_url=f"{u}/v1", api_key="EMPTY", max_retries=0, timeout=120)
                   for k, u in urls.items()}
        seq = sequential(eng, clients, a.reps, a.warmup, a.max_tokens, a.image_size)
        R["sequential"] = seq
        print_sequential(seq, list(urls), a.reps)

        # warm the loadgen path (connection pools, every replica) before the sweep
        warm = sweep_config(4, 8, 4, a.sweep_image_share, a.image_size, seed=99)
        for u in urls.values():
            asyncio.run(http_load(u, warm, [MODEL_NAME]))
        rows = sweep(eng, urls, a.sweep, a.sweep_requests, a.max_tokens, a.sweep_image_share, a.image_size)
        R["sweep"] = rows
        print_sweep(rows, list(urls), a.max_tokens, a.sweep_image_share)
        stats = {app: decoder_stats(app, n) for app, n in zip(urls, a.replicas)}
        R["decoder_stats"] = stats
        print(f"\nDecoder preemptions: {sum(s['num_preemptions'] for st in stats.values() for s in st.values())}; "
              f"load average at end {[round(x, 2) for x in os.getloadavg()]}; total {time.perf_counter() - t_start:.0f} s")
    if a.json:
        Path(a.json).write_text(json.dumps(R, indent=1, default=str))
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
