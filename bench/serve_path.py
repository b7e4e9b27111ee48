"""The serving path against its floor and the engine, before and after, in one run (`python bench/serve.py path`).

    python bench/serve.py path [--before main] [--quick] [--json bench/results/serve_path.json]

One run does, one after the other, each phase in its own Ray + Serve instance on 127.0.0.1:
1. **after** (this tree): the engine alone in this process, closed loop, at 1/4/16/64 requests in
   flight with 64 and 256 tokens each (tok/s, and seconds per step at each batch size = the
   pace); the same through `AsyncEngine` (engine thread + asyncio consumers in this process,
   batched items) to isolate the thread/GIL cost; then the floor (bench/serve_floor.py: the cluster's
   HTTP ingress -> ingress deployment -> a decoder that only sleeps at that pace) and vlora's app, through HTTP, at the same
   levels, streamed and not, alternating cell by cell (at 16 streams, medians of alternating rounds);
   with them `floor_engine`, the floor's two deployments with vlora's engine process in the decoder
   (bench/serve_floor.py `floor_engine_app`): what these hops deliver with the real engine and none of
   vlora's own path code, so vlora against it is what that code costs.
   Sequential 1-token requests: engine, floor, floor_engine, HTTP alternating. The Decoder's own step
   timing under load is read from its stats.
2. **before** (`--before REF`, default `main`: that commit's tree via `git archive`, with these
   bench files copied in): the floors and vlora at 16 streams, and the sequential 1-token case,
   so the before/after ratios each have their own floor from their own instance. Both instances
   deploy the same apps (the engine-thread variant included), so they carry the same idle work.

The client is a lean httpx SSE reader (no SDK parsing), the same for floor and vlora; tokens are
the server-reported usage. Text prompts of 20 words, greedy, `ignore_eos`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != str(HERE)]
sys.path.insert(0, str(ROOT))

LEVELS = (1, 4, 16, 64)
TOKENS = (64, 256)
TTFT_LEVEL = 16
STREAM_INTERVAL_S = 0.05  # the app's default stream_interval_ms, and the floor's
ENGINE = dict(max_num_seqs=64, max_num_batched_tokens=2048, kv_cache_memory_mb=64, block_size=16,
              max_model_len=1024, max_loras=8, max_lora_rank=16, max_waiting_requests=256)
WORDS = ("the quick brown fox jumps over a lazy dog while seven small birds sing about green hills under bright "
         "morning light and old friends share stories of distant cities rivers boats markets music").split()


def prompt(i: int) -> str:
    rng = random.Random(i)
    return " ".join(rng.choice(WORDS) for _ in range(20))


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    return xs[lo] + (xs[min(lo + 1, len(xs) - 1)] - xs[lo]) * (k - lo)


def requests_for(level: int, quick: bool) -> int:
    return max(level * (1 if quick else 2), 4 if quick else 8)


# -- the client ------------------------------------------------------------------------------------------
async def _one(client, url: str, i: int, max_tokens: int, stream: bool, model: str) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": prompt(i)}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    t0 = time.perf_counter()
    ttft, tokens, chunks = None, 0, 0
    if not stream:
        r = await client.post(url, json=body)
        r.raise_for_status()
        tokens = r.json()["usage"]["completion_tokens"]
    else:
        async with client.stream("POST", url, json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                j = json.loads(line[6:])
                chunks += bool(j.get("choices"))
                if ttft is None and j.get("choices"):
                    ttft = time.perf_counter() - t0
                if j.get("usage"):
                    tokens = j["usage"]["completion_tokens"]
    return dict(ttft_s=ttft, latency_s=time.perf_counter() - t0, tokens=tokens, chunks=chunks)


async def http_load(base: str, level: int, requests: int, max_tokens: int, stream: bool, model: str) -> dict:
    import httpx

    url = f"{base}/v1/chat/completions"
    todo = list(range(requests))
    results, failures = [], []
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=level + 4)) as client:
        async def worker():
            while todo:
                i = todo.pop()
                try:
                    results.append(await _one(client, url, i, max_tokens, stream, model))
                except Exception as e:  # noqa: BLE001 - counted and shown
                    failures.append(f"{type(e).__name__}: {e}"[:200])

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(level)))
        wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    ttft = [r["ttft_s"] * 1e3 for r in results if r["ttft_s"] is not None]
    return dict(requests=len(results), output_tokens=tokens, wall_s=wall, tok_s=tokens / wall,
                ttft_p50_ms=pct(ttft, 50), ttft_p99_ms=pct(ttft, 99),
                latency_p50_ms=pct([r["latency_s"] * 1e3 for r in results], 50),
                chunks_per_request=statistics.fmean(r["chunks"] for r in results) if results else None,
                token_errors=sum(r["tokens"] != max_tokens for r in results), failures=failures[:5],
                num_failures=len(failures))


def sequential_1_token(sides: dict, reps: int, warmup: int = 5, roles: dict[int, str] | None = None) -> dict:
    """1-token non-streamed requests, one at a time, the sides alternating (in reverse order every other
    round, so no side always follows the same one); latency in ms. On this VM a side's p50 moves by
    1-2 ms between blocks of 30, so a run takes 60 or more. With `roles` (serving_processes()), each HTTP
    side also gets the CPU ms per request of its own processes (the shared proxy and client left out):
    a side's processes work only on its requests here (their idle work over the phase counts too)."""
    lat: dict[str, list[float]] = {k: [] for k in sides}
    order = list(sides.items())
    cpu0 = None
    for rep in range(warmup + reps):
        if rep == warmup and roles:
            cpu0 = cpu_seconds(roles)
        for name, fn in (order if rep % 2 == 0 else order[::-1]):
            t0 = time.perf_counter()
            fn(rep)
            if rep >= warmup:
                lat[name].append((time.perf_counter() - t0) * 1e3)
    out = {k: dict(p50_ms=statistics.median(v), mean_ms=statistics.fmean(v)) for k, v in lat.items()}
    if cpu0 is not None:
        for side in out:
            cpu = cpu_per_token(roles, cpu0, 0.0, reps, side)  # one token per request: ms per request
            own = {k: v for k, v in cpu.items() if k not in ("proxy", "client")}
            if own:
                out[side]["cpu_ms_per_request"] = own
    return out


def http_sync(base: str, model: str):
    import httpx

    client = httpx.Client(timeout=120)

    def send(i: int) -> None:
        r = client.post(f"{base}/v1/chat/completions", json={
            "model": model, "messages": [{"role": "user", "content": prompt(i)}], "max_tokens": 1,
            "temperature": 0, "ignore_eos": True})
        r.raise_for_status()
        assert r.json()["usage"]["completion_tokens"] == 1

    return send


# -- the engine in this process -----------------------------------------------------------------------------
def engine_closed_loop(eng, level: int, requests: int, max_tokens: int) -> dict:
    """LLMEngine stepped directly with `level` requests in flight; tok/s and the mean step time."""
    from vlora.engine.sampling import SamplingParams

    sp = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    e = eng.engine
    todo = list(range(requests))
    inflight = tokens = steps = rows = 0
    step_s = 0.0
    t0 = time.perf_counter()
    while todo or e.has_unfinished():
        while todo and inflight < level:
            p, _ = eng.prepare([{"role": "user", "content": prompt(todo.pop())}])
            e.add_request(p, sp)
            inflight += 1
        s0 = time.perf_counter()
        outs = e.step()
        step_s += time.perf_counter() - s0
        steps += 1
        rows += len(outs)
        for o in outs:
            tokens += sum(len(c.token_ids) for c in o.choices)
            inflight -= o.finished
    wall = time.perf_counter() - t0
    return dict(tok_s=tokens / wall, output_tokens=tokens, wall_s=wall, step_ms=step_s / steps * 1e3,
                rows_per_step=rows / steps)


def async_engine_load(eng, level: int, requests: int, max_tokens: int, interval_s: float) -> dict:
    """The same through AsyncEngine: the engine on its thread, `level` asyncio consumers in this thread."""
    from vlora.engine.engine import AsyncEngine
    from vlora.engine.sampling import SamplingParams

    ae = AsyncEngine(eng.engine, stream_interval_s=interval_s)
    try:
        async def main():
            todo = list(range(requests))
            tokens = 0

            async def worker():
                nonlocal tokens
                while todo:
                    p, _ = eng.prepare([{"role": "user", "content": prompt(todo.pop())}])
                    sp = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
                    async for o in ae.generate(p, sp):
                        tokens += sum(len(c.token_ids) for c in o.choices)

            t0 = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(level)))
            return tokens, time.perf_counter() - t0

        tokens, wall = asyncio.run(main())
        st = ae.loop_stats
        return dict(tok_s=tokens / wall, output_tokens=tokens, wall_s=wall, step_ms=st["step_s"] / st["steps"] * 1e3,
                    rows_per_step=st["outputs"] / st["steps"])
    finally:
        ae.shutdown()


def served_model(side: str) -> str:
    """The `model` a side's requests name: the floors ignore it, vlora serves the tiny model."""
    return "floor" if side.startswith("floor") else "tiny"


# -- the phases -------------------------------------------------------------------------------------------------
def deploy_floor(cluster, pace) -> str:
    """The floor app; its URL."""
    from ray import serve

    from bench.serve import REPLICA_CPUS
    from bench.serve_floor import floor_app

    serve.run(floor_app(pace, STREAM_INTERVAL_S, REPLICA_CPUS), name="floor", route_prefix="/floor")
    return f"{cluster.url}/floor"


def deploy_floor_engine(cluster, engine_config) -> str:
    """The floor's app over vlora's engine process, every request the bench's first prompt; its URL."""
    from ray import serve

    from bench.serve import REPLICA_CPUS
    from bench.serve_floor import floor_engine_app
    from vlora.engine.prompts import PromptBuilder

    ids = PromptBuilder.from_pretrained(cluster.model_dir).build_chat([{"role": "user", "content": prompt(0)}],
                                                                       []).token_ids
    serve.run(floor_engine_app(engine_config, STREAM_INTERVAL_S, ids, REPLICA_CPUS), name="floor_engine",
              route_prefix="/floor_engine")
    return f"{cluster.url}/floor_engine"



def decoder_loop_stats() -> dict | None:
    from vlora.deployments.app import decoder_stats

    s = next(iter(decoder_stats("vlora", 1).values()))
    return dict(s["engine_loop"]) if "engine_loop" in s else None


def serving_processes() -> dict[int, str]:
    """pid -> role of this Ray instance's serving processes: the HTTP proxy (Serve's proxy actor, or
    HAProxy and the actor that manages it), each Serve replica ("<app>:<deployment>") and each
    (Floor)Decoder replica's engine process ("<app>:engine")."""
    import psutil

    roles: dict[int, str] = {}
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            title = (p.info["cmdline"] or [""])[0]
        except (psutil.Error, IndexError):
            continue
        if title.startswith("ray::ProxyActor"):
            roles[p.pid] = "proxy"
        elif title.startswith("ray::HAProxyManager"):  # it and the HAProxy processes it started
            roles[p.pid] = "proxy"
            with contextlib.suppress(psutil.Error):
                for c in p.children(recursive=True):
                    roles[c.pid] = "proxy"
        elif title.startswith("ray::ServeReplica:"):
            roles[p.pid] = title.split()[0].removeprefix("ray::ServeReplica:").split(".")[0]
            if roles[p.pid].endswith("Decoder"):
                with contextlib.suppress(psutil.Error):
                    for c in p.children():
                        roles[c.pid] = roles[p.pid].split(":")[0] + ":engine"
    return roles


def cpu_seconds(pids) -> dict[int, float]:
    import psutil

    out = {}
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            t = psutil.Process(pid).cpu_times()
            out[pid] = t.user + t.system
    return out


def cpu_per_token(roles: dict[int, str], before: dict[int, float], client_before: float, tokens: int,
                  prefix: str) -> dict[str, float]:
    """CPU ms per output token of the proxy, of `prefix`'s replicas and engine process, and of the load
    generator (this process), over one cell."""
    import psutil

    after = cpu_seconds(before)
    t = psutil.Process().cpu_times()
    out = {"client": (t.user + t.system - client_before) * 1e3 / max(1, tokens)}
    for pid, role in roles.items():
        if pid in before and pid in after and (role == "proxy" or role.startswith(prefix + ":")):
            key = role.removeprefix(prefix + ":")
            out[key] = out.get(key, 0.0) + (after[pid] - before[pid]) * 1e3 / max(1, tokens)
    return {k: round(v, 4) for k, v in out.items()}


def grid(urls: dict[str, str], levels, tokens, quick: bool, stats_at: int | None = None) -> list[dict]:
    """Each (level, tokens, stream) cell on every side, the sides alternating; vlora's in-replica step time
    and every side's CPU per token by process at `stats_at` streams.

    At `stats_at` (the issue's target cells) each cell runs `rounds_at(quick)` rounds, the sides in a
    rotated order each round; a side's tok/s and TTFT are the medians of its rounds (`rounds_tok_s`
    lists them), its CPU per token the total over them. One short round on this VM moves by up to 1.6x
    between runs; the medians of alternating rounds are what the ratios use."""
    import psutil

    rows = []
    roles = serving_processes() if stats_at is not None else {}
    for level in levels:
        rounds = rounds_at(quick) if level == stats_at else 1
        for n in tokens:
            for stream in (True, False):
                row = dict(level=level, tokens=n, stream=stream, requests=requests_for(level, quick), rounds=rounds)
                runs: dict[str, list[dict]] = {side: [] for side in urls}
                cpu: dict[str, dict[str, float]] = {side: {} for side in urls}
                loop = {"steps": 0, "step_s": 0.0, "outputs": 0}
                order = list(urls.items())
                for r in range(rounds):
                    for side, url in order[r % len(order):] + order[:r % len(order)]:
                        before = decoder_loop_stats() if side == "vlora" and level == stats_at else None
                        if level == stats_at:
                            cpu0, t = cpu_seconds(roles), psutil.Process().cpu_times()
                        res = asyncio.run(http_load(url, level, row["requests"], n, stream, served_model(side)))
                        runs[side].append(res)
                        if level == stats_at:  # CPU seconds of this round, summed over the rounds
                            per_tok = cpu_per_token(roles, cpu0, t.user + t.system, res["output_tokens"], side)
                            for k, v in per_tok.items():
                                cpu[side][k] = cpu[side].get(k, 0.0) + v * res["output_tokens"]
                        if before is not None:
                            after = decoder_loop_stats()
                            for k in loop:
                                loop[k] += after[k] - before[k]
                for side in urls:
                    row[side] = merge_rounds(runs[side])
                    if level == stats_at:
                        total = max(1, sum(x["output_tokens"] for x in runs[side]))
                        row[side]["cpu_ms_per_token"] = {k: round(v / total, 4) for k, v in cpu[side].items()}
                if level == stats_at and "vlora" in urls and loop["steps"]:
                    row["vlora"]["replica_step_ms"] = loop["step_s"] / loop["steps"] * 1e3
                    row["vlora"]["replica_rows_per_step"] = loop["outputs"] / loop["steps"]
                print(json.dumps({k: v for k, v in row.items()}, default=str)[:400], flush=True)
                rows.append(row)
    return rows


def rounds_at(quick: bool) -> int:
    return 3 if quick else 5


def merge_rounds(runs: list[dict]) -> dict:
    """One side's rounds of a cell as one result: medians of tok/s, TTFT and latency, sums of the counts."""
    if len(runs) == 1:
        return runs[0]

    def med(key: str) -> float | None:
        vals = [r[key] for r in runs if r[key] is not None]
        return statistics.median(vals) if vals else None

    out = dict(requests=sum(r["requests"] for r in runs), output_tokens=sum(r["output_tokens"] for r in runs),
               wall_s=sum(r["wall_s"] for r in runs), tok_s=med("tok_s"), ttft_p50_ms=med("ttft_p50_ms"),
               ttft_p99_ms=med("ttft_p99_ms"), latency_p50_ms=med("latency_p50_ms"),
               chunks_per_request=med("chunks_per_request"),
               token_errors=sum(r["token_errors"] for r in runs), failures=[f for r in runs for f in r["failures"]][:5],
               num_failures=sum(r["num_failures"] for r in runs))
    out["rounds_tok_s"] = [round(r["tok_s"]) for r in runs]
    return out


def phase(a) -> dict:
    """One instance: (after only) the engine alone, then floor and vlora through HTTP."""
    import torch

    from bench.serve import (EngineAlone, ServeCluster, app_config, decoder_engine_config, machine_info,
                             resolve_device)

    out: dict = {"phase": a.phase}
    levels = a.levels if a.phase == "after" else (TTFT_LEVEL,)
    with ServeCluster() as cluster:
        threads = cluster.replica_torch_threads()
        torch.set_num_threads(threads)
        out["machine"] = {**machine_info(), "replica_torch_threads": threads}
        pace = a.pace
        device, dtype = resolve_device()
        engine_config = decoder_engine_config(cluster.model_dir, device, dtype, ENGINE)
        if a.phase == "after":
            eng = EngineAlone(cluster.model_dir, device, dtype, ENGINE)
            engine_closed_loop(eng, 4, 8, 16)  # warm-up
            out["engine"] = [dict(level=c, tokens=n, **engine_closed_loop(eng, c, requests_for(c, a.quick), n))
                             for c in sorted({*a.levels, TTFT_LEVEL, 64}) for n in a.tokens]
            out["async_engine"] = [dict(level=c, tokens=n, **async_engine_load(eng, c, requests_for(c, a.quick), n,
                                                                               STREAM_INTERVAL_S))
                                   for c in (TTFT_LEVEL, 64) for n in a.tokens[:1]]
            steps: dict[int, list[float]] = {}
            for r in out["engine"]:
                steps.setdefault(r["level"], []).append(r["step_ms"] / 1e3)
            pace = [(c, statistics.fmean(v)) for c, v in sorted(steps.items())]
            print("engine:", json.dumps(out["engine"])[:600], "\nasync engine:", json.dumps(out["async_engine"]),
                  flush=True)
        out["pace"] = pace
        cfg = app_config(cluster.model_dir, cluster.tmp / "store", engine=ENGINE)
        from ray import serve

        from vlora.deployments.app import build_app

        serve.run(build_app(cfg), name="vlora", route_prefix="/vlora")
        urls = {"floor": deploy_floor(cluster, pace), "floor_engine": deploy_floor_engine(cluster, engine_config),
                "vlora": f"{cluster.url}/vlora"}
        # The same app with the engine loop on a thread of the Decoder replica, deployed in both phases so
        # both instances hold the same processes (their idle work is CPU taken from the measured ones);
        # measured in "after" only.
        thread_mode = a.phase == "after"
        cfg_t = app_config(cluster.model_dir, cluster.tmp / "store_t", engine={**ENGINE, "engine_process": False})
        serve.run(build_app(cfg_t), name="vlora_thread", route_prefix="/vlora_thread")
        for side, url in urls.items():  # warm every path; a broken side stops the run here
            for stream in (True, False):
                w = asyncio.run(http_load(url, 4, 8, 4, stream, served_model(side)))
                if w["num_failures"] or w["token_errors"]:
                    raise RuntimeError(f"{side} (stream={stream}) fails: {w}")
        sides = {side: http_sync(url, served_model(side)) for side, url in urls.items()}
        if a.phase == "after":
            from vlora.engine.sampling import SamplingParams

            def engine_one(i: int) -> None:
                e = eng.engine
                p, _ = eng.prepare([{"role": "user", "content": prompt(i)}])
                e.add_request(p, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
                while e.has_unfinished():
                    e.step()

            sides = {"engine": engine_one, **sides}
            if thread_mode:
                sides["vlora_thread"] = http_sync(f"{cluster.url}/vlora_thread", "tiny")
        out["sequential_1_token"] = sequential_1_token(sides, 60 if a.quick else 120, roles=serving_processes())
        print("sequential 1 token:", json.dumps(out["sequential_1_token"]), flush=True)
        out["grid"] = grid(urls, levels, a.tokens, a.quick, stats_at=TTFT_LEVEL)
        if thread_mode:  # engine process vs engine thread at 16 streams, alternating cell by cell
            out["thread_mode"] = grid({"process": urls["vlora"], "thread": f"{cluster.url}/vlora_thread"},
                                      (TTFT_LEVEL,), a.tokens, a.quick)
    return out


# -- orchestration and the report ---------------------------------------------------------------------------
def before_tree(ref: str, dest: Path) -> str:
    """`ref`'s tree under dest, with this run's bench files (the harness, not the thing measured) copied in."""
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", ref], check=True, capture_output=True,
                            text=True).stdout.strip()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    for f in ("serve.py", "serve_floor.py", "serve_path.py"):
        (dest / "bench" / f).write_bytes((HERE / f).read_bytes())
    if not (dest / "vlora").exists():  # a tree from before the vlora namespace: the harness imports vlora.*
        (dest / "vlora").mkdir()
        (dest / "vlora" / "__init__.py").write_bytes((ROOT / "vlora" / "__init__.py").read_bytes())
    return commit


def run_phase(tree: Path, name: str, quick: bool, levels, tokens, pace=None) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    cmd = [sys.executable, str(tree / "bench" / "serve_path.py"), "--phase", name, "--phase-json", path]
    if quick:
        cmd.append("--quick")
    cmd += ["--levels", ",".join(map(str, levels)), "--tokens", ",".join(map(str, tokens))]
    if pace:
        cmd += ["--pace", json.dumps(pace)]
    # the tree first; the rest of PYTHONPATH stays (a GPU host's carried Ray Serve lives there)
    rest = [x for x in os.environ.get("PYTHONPATH", "").split(os.pathsep) if x and Path(x).resolve() != ROOT]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), *rest])}
    subprocess.run(cmd, check=True, cwd=tree, env=env)
    d = json.loads(Path(path).read_text())
    os.unlink(path)
    return d


def cell(rows, level, tokens, stream) -> dict | None:
    return next((r for r in rows if (r["level"], r["tokens"], r["stream"]) == (level, tokens, stream)), None)


def report(R: dict) -> str:
    aft, bef = R["after"], R.get("before")
    eng = {(r["level"], r["tokens"]): r for r in aft["engine"]}
    lines = [f"machine: {aft['machine']['cpu']}, {aft['machine']['cores']} cores, load average at start "
             f"{aft['machine']['loadavg']}; torch threads per replica {aft['machine']['replica_torch_threads']}",
             f"after = this tree ({R.get('after_commit', 'working tree')}); before = {R.get('before_ref')} "
             f"({R.get('before_commit')})", "",
             "tok/s (output tokens, server-reported) | levels = concurrent requests; floor = bare Serve, same hops, "
             "decoder sleeping at the engine's pace; floor_engine = the same app with vlora's engine process in its "
             "decoder (vlora/floor_engine: what vlora's own path code costs)",
             f"{'streams':>7} {'tokens':>6} {'mode':>10} {'engine':>8} {'floor':>8} {'fl_eng':>8} {'vlora':>8} "
             f"{'vlora/floor':>11} {'fl_eng/floor':>12} {'vlora/fl_eng':>12} {'vlora/engine':>12} "
             f"{'fl_eng/engine':>13} {'TTFT p50':>8} {'p99':>7} {'floor TTFT p50':>14}"]
    for r in aft["grid"]:
        e = eng[(r["level"], r["tokens"])]["tok_s"]
        f, v = r["floor"], r["vlora"]
        c = r.get("floor_engine", {}).get("tok_s", float("nan"))
        lines.append(f"{r['level']:>7} {r['tokens']:>6} {'stream' if r['stream'] else 'non-stream':>10} {e:>8.0f} "
                     f"{f['tok_s']:>8.0f} {c:>8.0f} {v['tok_s']:>8.0f} {v['tok_s'] / f['tok_s']:>10.2f}x "
                     f"{c / f['tok_s']:>11.2f}x {v['tok_s'] / c:>11.2f}x "
                     f"{v['tok_s'] / e:>11.2f}x {c / e:>12.2f}x {_ms(v['ttft_p50_ms'])} {_ms(v['ttft_p99_ms'], 7)} "
                     f"{_ms(f['ttft_p50_ms'], 14)}" + (f"  FAILURES {v['num_failures']}" if v["num_failures"] else ""))
    for r in aft["grid"]:
        if r.get("rounds", 1) > 1:
            sides = [side for side in ("floor", "floor_engine", "vlora") if side in r]
            lines.append(f"  {r['level']} x {r['tokens']} {'stream' if r['stream'] else 'non-stream'}: medians of "
                         f"{r['rounds']} alternating rounds, tok/s per round: "
                         + "; ".join(f"{side} {r[side]['rounds_tok_s']}" for side in sides))
    s = aft["sequential_1_token"]
    lines += ["", "sequential 1-token requests (non-stream), p50 / mean ms: " + ", ".join(
        f"{k} {v['p50_ms']:.1f} / {v['mean_ms']:.1f}" for k, v in s.items())
        + f"; vlora/floor {s['vlora']['p50_ms'] / s['floor']['p50_ms']:.2f}x (p50)"
        + (f", floor_engine/floor {s['floor_engine']['p50_ms'] / s['floor']['p50_ms']:.2f}x, vlora/floor_engine "
           f"{s['vlora']['p50_ms'] / s['floor_engine']['p50_ms']:.2f}x" if "floor_engine" in s else "")]
    if any("cpu_ms_per_request" in v for v in s.values()):
        lines.append("CPU ms per sequential 1-token request, by process: " + "; ".join(
            f"{k} " + ", ".join(f"{r} {ms:.2f}" for r, ms in v["cpu_ms_per_request"].items())
            for k, v in s.items() if "cpu_ms_per_request" in v))
    if "vlora_thread" in s:
        lines.append(f"the engine loop on a thread of the Decoder replica instead of its own process: 1 token p50 "
                     f"{s['vlora_thread']['p50_ms']:.1f} ms ({s['vlora_thread']['p50_ms'] / s['floor']['p50_ms']:.2f}x "
                     f"the floor)")
    for r in aft.get("thread_mode", []):
        p, t = r["process"], r["thread"]
        lines.append(f"engine process vs engine thread, {r['level']} streams x {r['tokens']} "
                     f"{'stream' if r['stream'] else 'non-stream'}: {p['tok_s']:.0f} vs {t['tok_s']:.0f} tok/s "
                     f"({p['tok_s'] / t['tok_s']:.2f}x)")
    a = {(r["level"], r["tokens"]): r for r in aft["async_engine"]}
    for (c, n), r in a.items():
        lines.append(f"in-process AsyncEngine at {c} streams x {n} tokens: {r['tok_s']:.0f} tok/s "
                     f"({r['tok_s'] / eng[(c, n)]['tok_s']:.2f}x the engine stepped directly), step "
                     f"{r['step_ms']:.2f} ms vs {eng[(c, n)]['step_ms']:.2f} ms")
    for r in aft["grid"]:
        if "cpu_ms_per_token" in r["vlora"]:
            parts = []
            for side in ("floor", "floor_engine", "vlora"):
                if side not in r:
                    continue
                v = r[side]["cpu_ms_per_token"]
                path = sum(x for k, x in v.items() if k != "engine")
                parts.append(f"{side} {sum(v.values()):.3f} = path {path:.3f} + engine {v.get('engine', 0):.3f} ("
                             + ", ".join(f"{k} {x:.3f}" for k, x in sorted(v.items(), key=lambda kv: -kv[1])) + ")")
            lines.append(f"CPU ms per output token, {r['level']} streams x {r['tokens']} "
                         f"{'stream' if r['stream'] else 'non-stream'}: " + "; ".join(parts))
    for r in aft["grid"]:
        if "replica_step_ms" in r["vlora"]:
            lines.append(f"Decoder replica under HTTP load, {r['level']} streams x {r['tokens']} "
                         f"{'stream' if r['stream'] else 'non-stream'}: step {r['vlora']['replica_step_ms']:.2f} ms at "
                         f"{r['vlora']['replica_rows_per_step']:.1f} requests/step (engine alone: "
                         f"{eng[(r['level'], r['tokens'])]['step_ms']:.2f} ms at "
                         f"{eng[(r['level'], r['tokens'])]['rows_per_step']:.1f})")
    if bef:
        lines += ["", f"before vs after at {TTFT_LEVEL} streams (each against its own floor, same run)",
                  f"{'tokens':>6} {'mode':>10} {'before':>8} {'/floor':>7} {'after':>8} {'/floor':>7} "
                  f"{'TTFT p50 before':>15} {'after':>7} {'TTFT p99 before':>15} {'after':>7}"]
        for n in TOKENS:
            for stream in (True, False):
                b, x = cell(bef["grid"], TTFT_LEVEL, n, stream), cell(aft["grid"], TTFT_LEVEL, n, stream)
                if b is None or x is None:
                    continue
                lines.append(
                    f"{n:>6} {'stream' if stream else 'non-stream':>10} {b['vlora']['tok_s']:>8.0f} "
                    f"{b['vlora']['tok_s'] / b['floor']['tok_s']:>6.2f}x {x['vlora']['tok_s']:>8.0f} "
                    f"{x['vlora']['tok_s'] / x['floor']['tok_s']:>6.2f}x {_ms(b['vlora']['ttft_p50_ms'], 15)} "
                    f"{_ms(x['vlora']['ttft_p50_ms'], 7)} {_ms(b['vlora']['ttft_p99_ms'], 15)} "
                    f"{_ms(x['vlora']['ttft_p99_ms'], 7)}")
        sb = bef["sequential_1_token"]
        lines.append(f"sequential 1 token p50: before {sb['vlora']['p50_ms']:.1f} ms "
                     f"({sb['vlora']['p50_ms'] / sb['floor']['p50_ms']:.2f}x its floor {sb['floor']['p50_ms']:.1f}), "
                     f"after {s['vlora']['p50_ms']:.1f} ms ({s['vlora']['p50_ms'] / s['floor']['p50_ms']:.2f}x "
                     f"its floor {s['floor']['p50_ms']:.1f})")
    return "\n".join(lines)


def _ms(x, w: int = 8) -> str:
    return f"{'-':>{w}}" if x is None else f"{x:>{w}.1f}"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", default="main", help="git ref measured as 'before' ('' to skip; default main)")
    p.add_argument("--quick", action="store_true", help="half the requests per cell")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--levels", default=",".join(map(str, LEVELS)), help="concurrency levels (default 1,4,16,64)")
    p.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="tokens per request (default 64,256)")
    p.add_argument("--phase", choices=("after", "before"), help=argparse.SUPPRESS)
    p.add_argument("--phase-json", help=argparse.SUPPRESS)
    p.add_argument("--pace", type=json.loads, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.levels = tuple(int(x) for x in a.levels.split(","))
    a.tokens = tuple(int(x) for x in a.tokens.split(","))
    if a.json:
        a.json = os.path.abspath(a.json)
    return a


def main(argv=None) -> None:
    a = parse_args(argv)
    if a.phase:  # a child: one instance, results to --phase-json
        Path(a.phase_json).write_text(json.dumps(phase(a), default=str))
        return
    t0 = time.perf_counter()
    R: dict = {"args": vars(a).copy(), "after_commit": subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()}
    R["after"] = run_phase(ROOT, "after", a.quick, a.levels, a.tokens)
    if a.before:
        with tempfile.TemporaryDirectory(prefix="vlora-before-") as d:
            R["before_ref"], R["before_commit"] = a.before, before_tree(a.before, Path(d))
            R["before"] = run_phase(Path(d), "before", a.quick, a.levels, a.tokens, R["after"]["pace"])
    R["total_s"] = time.perf_counter() - t0
    if a.json:  # the measurements first: a report that fails loses nothing
        Path(a.json).write_text(json.dumps(R, indent=1, default=str))
    R["report"] = report(R)
    print("\n" + R["report"] + f"\n\ntotal {R['total_s']:.0f} s")
    if a.json:
        Path(a.json).write_text(json.dumps(R, indent=1, default=str))
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
