"""Adapter lifecycle timings through the served app: learn calls, publish-to-served, mixed-adapter load.

    python bench/adapters.py [--quick] [--json PATH] [--learn-steps 1,10,50] [--publish-repeats 5]

One run starts its own Ray + Serve instance on 127.0.0.1 (loopback only) with the tiny model
generated into a temp dir and one app with 2 Decoder replicas (max_loras 8), measures, and shuts
it all down. Admin keys are off (the admin routes are open on the private instance).

(a) learn-call latency: synchronous `POST /v1/adapters/{name}/learn` on 2 examples with a 56x56
    image each, rank 8, for each step count: the wall time of the HTTP call vs the `seconds` the
    trainer reports (tokenize, forward/backward steps, extract). The rest is the call's overhead:
    HTTP, fetching the parent version, persisting (fsync) and waiting for both replicas' acks.
    Each adapter is learned twice: the first call creates it, the second continues from it.
(b) publish-to-served: a new version of an adapter both replicas already serve, published by
    `learn` (steps=0) and by `POST /v1/adapters` (a PEFT folder); two threads keep sending 1-token
    requests on the adapter from just before the call until both `x-vlora-replica` values have
    answered with `x-adapter-version` >= v. Reported: the call's duration, when v was first
    served by any replica and by both (from just before the call), and how many requests sent
    after the call returned still got an older version (read-your-writes: must be 0).
(c) throughput: client/loadgen.py (streaming, concurrency 16, 64 requests, 32 tokens, ignore_eos)
    over the base model only, then round-robin over 8 resident random PEFT adapters (rank 8, all 7
    projections), then the same while a thread keeps publishing new versions of them (`learn`
    steps=1 in a loop; and `POST /v1/adapters` re-loads in a loop, which costs no training).
    The conditions alternate, --load-repeats rounds, and the median round is reported. Swaps are
    the Decoders' `adapter_swaps` counters (slot rewrites) summed over both replicas.
(d) many adapters, on a second app (2 Decoders, host copies for ~32 rank-2 adapters per replica):
    publish-to-served of an adapter in use with 10 registered adapters, then with 1,000 (bulk
    registration); TTFT p50 of adapters' first (cold: fetched from the store) requests vs the same
    requests again (warm); output tokens/s of 1-adapter-per-request traffic over 100 adapters chosen
    Zipf-like (s=1.2) vs the same requests on the base model, alternating rounds. `--only-many` runs
    only (d).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# bench/ must not be on sys.path (this file would shadow the `adapters` package here and, through
# Ray's driver-path propagation, in every worker): see bench/serve.py.
_HERE = str(Path(__file__).resolve().parent)
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != _HERE]
sys.path.insert(0, str(ROOT))

import asyncio  # noqa: E402

import httpx  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from vlora.adapters.peft_io import save_peft_adapter  # noqa: E402

from bench.serve import (  # noqa: E402
    MODEL_NAME,
    ServeCluster,
    decoder_stats,
    fmt,
    http_load,
    machine_info,
    print_machine,
    ratio,
    sweep_config,
)

APP = "adapters"
DECODERS = 2
RANK, ALPHA = 8, 16
QUESTION = "What colour is this?"


def solid(rgb) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (56, 56), rgb).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def example(image: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                                      {"type": "text", "text": QUESTION}]},
                         {"role": "assistant", "content": answer}]}


EXAMPLES = [example(solid((220, 20, 20)), "red"), example(solid((20, 40, 220)), "blue")]


class Admin:
    """The admin routes the benchmark calls, with their wall time."""

    def __init__(self, url: str):
        self.url = url
        self.http = httpx.Client(base_url=url, timeout=600)

    def _post(self, path: str, body: dict) -> tuple[dict, float]:
        t = time.perf_counter()
        r = self.http.post(path, json=body)
        dt = time.perf_counter() - t
        if r.status_code != 200:
            raise RuntimeError(f"POST {path} -> {r.status_code}: {r.text[:300]}")
        out = r.json()
        if int(r.headers["x-adapter-version"]) != out["version"]:
            raise RuntimeError(f"x-adapter-version {r.headers['x-adapter-version']} != body version {out['version']}")
        return out, dt

    def learn(self, name: str, steps: int, **kw) -> tuple[dict, float]:
        return self._post(f"/v1/adapters/{name}/learn", dict(examples=EXAMPLES, steps=steps, rank=RANK,
                                                               lora_alpha=ALPHA, **kw))

    def load(self, name: str, path: Path) -> tuple[dict, float]:
        return self._post("/v1/adapters", {"name": name, "path": str(path)})

    def delete(self, name: str) -> None:
        r = self.http.delete(f"/v1/adapters/{name}")
        if r.status_code != 200:
            raise RuntimeError(f"DELETE {name} -> {r.status_code}: {r.text[:300]}")


# -- (a) learn-call latency ------------------------------------------------------------------------
def learn_latency(admin: Admin, steps_list: list[int], repeats: int) -> list[dict]:
    rows = []
    res, wall = admin.learn("learn-cold", 1)  # the trainer's first job (lazy set-up): reported apart
    rows.append(dict(steps=1, call="cold", version=res["version"], wall_s=wall, trainer_s=res["seconds"],
                     overhead_s=wall - res["seconds"], replicas_synced=res["replicas_synced"],
                     loss_before=res["loss_before"], loss_after=res["loss_after"]))
    for steps in steps_list:
        name = f"learn-s{steps}"
        for k in range(repeats):
            res, wall = admin.learn(name, steps)
            rows.append(dict(steps=steps, call=k + 1, version=res["version"], wall_s=wall, trainer_s=res["seconds"],
                             overhead_s=wall - res["seconds"], replicas_synced=res["replicas_synced"],
                             loss_before=res["loss_before"], loss_after=res["loss_after"]))
    return rows


def print_learn(rows: list[dict]) -> None:
    print()
    print(f"(a) learn call latency: sync POST /v1/adapters/NAME/learn, 2 examples with a 56x56 image, rank {RANK}; "
          f"call 1 creates the adapter, later calls continue from it; 'cold' = the app's first learn call")
    print(f"{'steps':>5} {'call':>4} {'version':>7} {'HTTP call ms':>12} {'trainer ms':>10} {'overhead ms':>11} "
          f"{'trainer/call':>12} {'synced':>6} {'loss before -> after':>22}")
    for r in rows:
        print(f"{r['steps']:>5} {r['call']:>4} {r['version']:>7} {r['wall_s'] * 1e3:>12.1f} {r['trainer_s'] * 1e3:>10.1f} "
              f"{r['overhead_s'] * 1e3:>11.1f} {r['trainer_s'] / r['wall_s']:>11.0%} {r['replicas_synced']:>6} "
              f"{r['loss_before']:>10.3f} -> {r['loss_after']:<8.3f}")


# -- (b) publish-to-served ---------------------------------------------------------------------------
class Poller:
    """Threads sending 1-token requests on `model`; records (sent, received, replica, version)."""

    def __init__(self, url: str, model: str, threads: int = 2):
        self.url, self.model, self.n = url, model, threads
        self.records: list[tuple[float, float, str, int]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def _run(self) -> None:
        body = {"model": self.model, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 1,
                "temperature": 0}
        with httpx.Client(base_url=self.url, timeout=120) as c:
            while not self._stop.is_set():
                sent = time.perf_counter()
                try:
                    r = c.post("/v1/chat/completions", json=body)
                except httpx.HTTPError as e:
                    self.errors.append(f"{type(e).__name__}: {e}")
                    continue
                got = time.perf_counter()
                if r.status_code != 200:
                    self.errors.append(f"{r.status_code}: {r.text[:200]}")
                    continue
                with self._lock:
                    self.records.append((sent, got, r.headers["x-vlora-replica"], int(r.headers["x-adapter-version"])))

    def __enter__(self) -> "Poller":
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(self.n)]
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=120)

    def first_seen(self, version: int) -> dict[str, float]:
        """Per replica: the earliest response time carrying `version` or newer."""
        out: dict[str, float] = {}
        with self._lock:
            for _, got, rep, v in self.records:
                if v >= version and (rep not in out or got < out[rep]):
                    out[rep] = got
        return out

    def wait_both(self, version: int, replicas: int, timeout: float = 60.0) -> dict[str, float]:
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            seen = self.first_seen(version)
            if len(seen) >= replicas:
                return seen
            time.sleep(0.002)
        raise RuntimeError(f"version {version} not served by {replicas} replicas within {timeout} s "
                           f"(seen: {self.first_seen(version)}; errors: {self.errors[:3]})")


def publish_to_served(admin: Admin, url: str, name: str, peft_dir: Path, repeats: int) -> list[dict]:
    rows = []
    for mode in ("learn steps=0", "load PEFT folder"):
        for k in range(repeats):
            with Poller(url, name) as poll:
                time.sleep(0.05)  # pollers running before the call starts
                t0 = time.perf_counter()
                res, _ = admin.learn(name, 0) if mode.startswith("learn") else admin.load(name, peft_dir)
                t1 = time.perf_counter()
                v = res["version"]
                # lazy residency + affinity routing: the adapter may live on one replica only
                seen = poll.wait_both(v, len({rep for _, _, rep, _ in poll.records}) or 1)
            stale = sum(1 for sent, _, _, ver in poll.records if sent > t1 and ver < v)
            after = sum(1 for sent, _, _, _ in poll.records if sent > t1)
            poll_ms = statistics.median((got - sent) * 1e3 for sent, got, _, _ in poll.records)
            rows.append(dict(mode=mode, repeat=k + 1, version=v, call_s=t1 - t0, replicas_synced=res["replicas_synced"],
                             poll_request_p50_ms=poll_ms, trainer_s=res.get("seconds"),
                             first_served_s=min(seen.values()) - t0, both_served_s=max(seen.values()) - t0,
                             requests=len(poll.records), requests_after_return=after, stale_after_return=stale,
                             poll_errors=len(poll.errors)))
    return rows


def print_publish(rows: list[dict]) -> None:
    print()
    print(f"(b) publish-to-served on {DECODERS} Decoder replicas: ms from just before the call; 2 threads send "
          f"1-token requests on the adapter throughout")
    print(f"{'mode':>17} {'#':>2} {'ver':>4} {'call ms':>8} {'first replica ms':>16} {'both replicas ms':>16} "
          f"{'synced':>6} {'requests':>8} {'after return':>12} {'stale':>5} {'poll req p50 ms':>15} {'trainer ms':>10}")
    for r in rows:
        print(f"{r['mode']:>17} {r['repeat']:>2} {r['version']:>4} {r['call_s'] * 1e3:>8.1f} "
              f"{r['first_served_s'] * 1e3:>16.1f} {r['both_served_s'] * 1e3:>16.1f} {r['replicas_synced']:>6} "
              f"{r['requests']:>8} {r['requests_after_return']:>12} {r['stale_after_return']:>5} "
              f"{r['poll_request_p50_ms']:>15.1f} {fmt(r['trainer_s'] and r['trainer_s'] * 1e3, '.1f', 10)}")
    for mode in dict.fromkeys(r["mode"] for r in rows):
        rs = [r for r in rows if r["mode"] == mode]
        med = {k: statistics.median(r[k] for r in rs) * 1e3 for k in ("call_s", "first_served_s", "both_served_s")}
        print(f"  {mode}: median call {med['call_s']:.1f} ms, served by both replicas {med['both_served_s']:.1f} ms "
              f"after the call started; stale responses after the call returned: "
              f"{sum(r['stale_after_return'] for r in rs)} of {sum(r['requests_after_return'] for r in rs)}")
    print("  (resolution: one poll request, see the last column; 'first replica' can precede the call's return: "
          "replicas swap, then acknowledge, then the call returns)")


# -- (c) throughput: base vs 8 adapters vs 8 adapters with swaps ---------------------------------------
class Publisher:
    """A thread that keeps publishing new versions of the adapters, round-robin, until stopped."""

    def __init__(self, admin_url: str, names: list[str], mode: str, folders: dict[str, Path]):
        self.admin = Admin(admin_url)
        self.names, self.mode, self.folders = names, mode, folders
        self.done: list[tuple[float, float, str, int]] = []  # (start, end, name, version)
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        k = 0
        while not self._stop.is_set():
            name = self.names[k % len(self.names)]
            k += 1
            t = time.perf_counter()
            try:
                res, _ = (self.admin.learn(name, 1) if self.mode == "learn"
                          else self.admin.load(name, self.folders[name]))
            except Exception as e:  # noqa: BLE001 - counted and reported
                self.errors.append(str(e)[:200])
                continue
            self.done.append((t, time.perf_counter(), name, res["version"]))

    def start(self) -> "Publisher":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=600)


def total_swaps(stats: dict[str, dict]) -> int:
    return sum(s["adapter_swaps"] for s in stats.values())


def run_condition(url: str, admin_url: str, cfg, models: list[str], publish: str | None, names: list[str],
                  folders: dict[str, Path]) -> dict:
    before = decoder_stats(APP, DECODERS)
    pub = Publisher(admin_url, names, publish, folders).start() if publish else None
    t0 = time.perf_counter()
    s = asyncio.run(http_load(url, cfg, models))
    t1 = time.perf_counter()
    after = decoder_stats(APP, DECODERS)
    if pub is not None:
        pub.stop()
    s["swaps"] = total_swaps(after) - total_swaps(before)
    s["publishes"] = sum(1 for _, end, _, _ in pub.done if t0 <= end <= t1) if pub else 0
    s["publish_errors"] = pub.errors[:5] if pub else []
    s["resident_after"] = {r: sorted(st["resident_adapters"]) for r, st in after.items()}
    return s


def throughput(url: str, names: list[str], folders: dict[str, Path], a) -> dict:
    cfg = sweep_config(a.concurrency, a.requests, a.max_tokens, a.image_share, 224)
    conds = [("base only", [MODEL_NAME], None), ("8 adapters", names, None),
             ("8 adapters + learn swaps", names, "learn"), ("8 adapters + load swaps", names, "load")]
    runs: dict[str, list[dict]] = {c: [] for c, _, _ in conds}
    for r in range(a.load_repeats):  # each round starts one condition later: no condition always goes first
        for cond, models, publish in conds[r % len(conds):] + conds[:r % len(conds)]:
            runs[cond].append(run_condition(url, url, cfg, models, publish, names, folders))
    out = {}
    for cond, rs in runs.items():
        ordered = sorted(rs, key=lambda s: s["output_tokens_per_s"])
        med = dict(ordered[len(ordered) // 2])
        med["runs_tok_s"] = [round(s["output_tokens_per_s"], 1) for s in rs]
        med["runs_swaps"] = [s["swaps"] for s in rs]
        med["runs_publishes"] = [s["publishes"] for s in rs]
        out[cond] = med
    base = out["base only"]["output_tokens_per_s"]
    for cond in out:
        out[cond]["over_base"] = ratio(out[cond]["output_tokens_per_s"], base)
    return {"config": dict(concurrency=a.concurrency, requests=a.requests, max_tokens=a.max_tokens,
                           image_share=a.image_share, repeats=a.load_repeats), "conditions": out}


def print_throughput(t: dict) -> None:
    c = t["config"]
    print()
    print(f"(c) throughput, client/loadgen.py: concurrency {c['concurrency']}, {c['requests']} requests, "
          f"{c['max_tokens']} tokens each (ignore_eos, greedy), image share {c['image_share']}; "
          f"{DECODERS} Decoder replicas; median of {c['repeats']} rounds (conditions alternate, each round "
          f"starting one later)")
    print(f"{'':>25} {'tok/s':>8} {'/base':>6} {'req/s':>6} {'TTFT p50 ms':>11} {'lat p50 ms':>10} {'fail':>4} "
          f"{'publishes':>9} {'swaps':>5}   runs tok/s (swaps)")
    for cond, s in t["conditions"].items():
        tt, la = s["ttft_s"]["p50"], s["latency_s"]["p50"]
        runs = ", ".join(f"{x} ({w})" for x, w in zip(s["runs_tok_s"], s["runs_swaps"]))
        print(f"{cond:>25} {s['output_tokens_per_s']:>8.1f} {s['over_base']:>5.2f}x {s['requests_per_s']:>6.2f} "
              f"{fmt(tt and tt * 1e3, '.1f', 11)} {fmt(la and la * 1e3, '.1f', 10)} {s['failures']:>4} "
              f"{s['publishes']:>9} {s['swaps']:>5}   {runs}")
        if s["publish_errors"]:
            print(f"{'':>25} publish errors: {s['publish_errors'][:2]}")
        if s["errors"]:
            print(f"{'':>25} request errors: {s['errors']} e.g. {list(s['error_examples'].values())[:1]}")
    co = t["conditions"]
    print(f"  mixed/base {co['8 adapters']['over_base']:.2f}x; mixed with learn swaps/base "
          f"{co['8 adapters + learn swaps']['over_base']:.2f}x; mixed with load swaps/base "
          f"{co['8 adapters + load swaps']['over_base']:.2f}x (publishes = calls returned during the run; "
          f"swaps = slot rewrites on both replicas)")


def make_peft_adapters(model_dir: Path, load_dir: Path, names: list[str]) -> dict[str, Path]:
    from transformers import Qwen2_5_VLForConditionalGeneration

    from tests.unit.oracle import random_peft_adapter

    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    return {n: random_peft_adapter(hf, load_dir / n, seed=i, r=RANK, alpha=ALPHA) for i, n in enumerate(names)}


# -- (d) many adapters: 1,000 registered vs 10, cold vs warm TTFT, 100 adapters vs base ----------------
def register_many(cluster, app: str, start: int, n: int, rank: int = 2) -> None:
    """Register n small random adapters `many-<i>` through the store's bulk path (one manifest write)."""
    import ray

    from vlora.adapters.store import get_store
    from vlora.engine.config import LORA_TARGET_MODULES
    from vlora.engine.lora import LoRAWeights
    from vlora.engine.model import TextConfig

    shapes = TextConfig.from_pretrained(cluster.model_dir).lora_module_shapes(LORA_TARGET_MODULES)
    store = get_store(cluster.apps[app]["config"]["adapter_store_dir"])
    for s in range(start, start + n, 250):
        items = []
        for i in range(s, min(start + n, s + 250)):
            g = torch.Generator().manual_seed(i)
            w = {k: (torch.randn(rank, a, generator=g) * 0.2, torch.randn(b, rank, generator=g) * 0.2)
                 for k, (a, b) in shapes.items()}
            items.append({"name": f"many-{i:04d}", "weights": LoRAWeights(rank, 1.0, w), "lora_alpha": float(rank)})
        ray.get(store.publish_many.remote(items))


def publish_served(admin: Admin, url: str, name: str, folder: Path, repeats: int) -> dict:
    """Median call time and publish-to-served time (every replica that serves `name`) over `repeats` loads."""
    calls, served = [], []
    for _ in range(repeats):
        with Poller(url, name) as poll:
            time.sleep(0.1)
            t0 = time.perf_counter()
            res, _ = admin.load(name, folder)
            t1 = time.perf_counter()
            seen = poll.wait_both(res["version"], len({rep for _, _, rep, _ in poll.records}) or 1)
        calls.append(t1 - t0)
        served.append(max(seen.values()) - t0)
    return {"call_ms": statistics.median(calls) * 1e3, "served_ms": statistics.median(served) * 1e3}


def many_adapters(cluster, url: str, folder: Path, a) -> dict:
    import random as _random

    admin = Admin(url)
    out: dict = {}
    register_many(cluster, "many", 0, 10)
    asyncio.run(http_load(url, sweep_config(2, 8, 1, 0.0, 224, seed=1), ["many-0000"]))  # resident somewhere
    out["publish_10"] = publish_served(admin, url, "many-0000", folder, a.publish_repeats)
    register_many(cluster, "many", 10, 990)
    out["publish_1000"] = publish_served(admin, url, "many-0000", folder, a.publish_repeats)
    # cold (never used) vs warm (the same adapters again) first-token latency, one request at a time
    cold_names = [f"many-{i:04d}" for i in range(500, 500 + a.ttft_adapters)]
    cold = asyncio.run(http_load(url, sweep_config(1, len(cold_names), 4, 0.0, 224, seed=2), cold_names))
    warm = asyncio.run(http_load(url, sweep_config(1, len(cold_names), 4, 0.0, 224, seed=2), cold_names))
    out["ttft_cold"], out["ttft_warm"] = cold["ttft_s"], warm["ttft_s"]
    # throughput: 100 adapters chosen Zipf-like (s=1.2) vs the base model, same requests
    rnd = _random.Random(0)
    zipf = [f"many-{rnd.choices(range(100), [1 / k ** 1.2 for k in range(1, 101)])[0]:04d}"
            for _ in range(a.requests)]
    cfg = sweep_config(a.concurrency, a.requests, a.max_tokens, 0.0, 224, seed=3)
    rounds = []
    for _ in range(a.load_repeats):
        base = asyncio.run(http_load(url, cfg, [MODEL_NAME]))
        mixed = asyncio.run(http_load(url, cfg, zipf))
        rounds.append((base["output_tokens_per_s"], mixed["output_tokens_per_s"], mixed["failures"]))
    out["throughput_rounds"] = rounds
    out["residency"] = {r: s["residency"] for r, s in decoder_stats("many", DECODERS).items()}
    return out


def print_many(m: dict) -> None:
    print()
    print(f"(d) many adapters on {DECODERS} Decoder replicas (lazy residency, affinity routing)")
    p10, p1k = m["publish_10"], m["publish_1000"]
    print(f"  publish-to-served (load a PEFT folder over an adapter in use): 10 registered: call {p10['call_ms']:.1f} ms, "
          f"served {p10['served_ms']:.1f} ms; 1,000 registered: call {p1k['call_ms']:.1f} ms, served "
          f"{p1k['served_ms']:.1f} ms; ratio 1,000/10 served {fmt(ratio(p1k['served_ms'], p10['served_ms']), '.2f', 4)}")
    c, w = m["ttft_cold"]["p50"], m["ttft_warm"]["p50"]
    print(f"  TTFT p50 of an adapter's first request (cold: fetched from the store) {c * 1e3:.1f} ms vs warm "
          f"{w * 1e3:.1f} ms: ratio {fmt(ratio(c, w), '.2f', 4)}")
    base = statistics.median(r[0] for r in m["throughput_rounds"])
    mixed = statistics.median(r[1] for r in m["throughput_rounds"])
    print(f"  output tokens/s, Zipf over 100 adapters {mixed:.1f} vs base {base:.1f}: ratio "
          f"{fmt(ratio(mixed, base), '.2f', 4)} (median of {len(m['throughput_rounds'])} alternating rounds; "
          f"failures {sum(r[2] for r in m['throughput_rounds'])})")
    for r, s in m["residency"].items():
        print(f"  replica {r}: {len(s['host_copies'])} host copies, {s['host_bytes']} of {s['budget_bytes']} bytes, "
              f"hits {s['hits']}, misses {s['misses']} (affinity misses {s['affinity_misses']}), "
              f"evictions {s['evictions']}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--learn-steps", default=None, help="step counts for (a) (default 1,10,50)")
    p.add_argument("--learn-repeats", type=int, default=None, help="learn calls per step count (default 2)")
    p.add_argument("--publish-repeats", type=int, default=None, help="publishes per mode in (b) (default 5)")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--image-share", type=float, default=0.0, help="share of (c)'s requests with a 224px image")
    p.add_argument("--load-repeats", type=int, default=None, help="alternating rounds of (c) (default 3)")
    p.add_argument("--num-cpus", type=int, default=None, help="logical CPUs given to ray.init (default: cores)")
    p.add_argument("--quick", action="store_true", help="fewer calls and rounds")
    p.add_argument("--only-many", action="store_true", help="run only (d), the many-adapters figures")
    p.add_argument("--ttft-adapters", type=int, default=10, help="cold adapters whose first request (d) times")
    p.add_argument("--json", help="also write the results as JSON here")
    a = p.parse_args(argv)
    q = a.quick
    a.learn_steps = [int(x) for x in (a.learn_steps or ("1,10" if q else "1,10,50")).split(",") if x]
    a.learn_repeats = a.learn_repeats or (1 if q else 2)
    a.publish_repeats = a.publish_repeats or (3 if q else 5)
    a.load_repeats = a.load_repeats or (1 if q else 3)
    if q:
        a.requests = min(a.requests, 32)
    if a.json:
        a.json = os.path.abspath(a.json)
    return a


def main(argv=None) -> None:
    a = parse_args(argv)
    t_start = time.perf_counter()
    R: dict = {"args": vars(a).copy()}
    names = [f"mix{i}" for i in range(8)]
    with ServeCluster(num_cpus=a.num_cpus) as cluster:
        load_dir = cluster.tmp / "uploads"
        load_dir.mkdir()
        folders = make_peft_adapters(cluster.model_dir, load_dir, names + ["probe"])
        m = machine_info()
        m["replica_torch_threads"] = cluster.replica_torch_threads()
        url = cluster.deploy(APP, decoders=DECODERS, load_dir=load_dir)
        m["deploy_s"] = round(cluster.apps[APP]["deploy_s"], 1)
        R["machine"] = m
        print("vlora adapter benchmark (bench/adapters.py)")
        print_machine(m)
        print(f"app /{APP}: {DECODERS} Decoder replicas, max_loras 8, every deployment 0.1 logical CPU; setup: tiny "
              f"model {cluster.model_s:.1f} s, ray+serve {cluster.ray_s:.1f} s, deploy {m['deploy_s']} s", flush=True)
        admin = Admin(url)
        # (d) has its own app: 2 Decoders, host copies for ~32 rank-2 adapters per replica
        many_url = cluster.deploy("many", decoders=DECODERS, load_dir=load_dir, adapter_cache_mb=32 * 37376 / 2**20)
        many_folder = load_dir / "many-probe"
        save_peft_adapter(many_folder, make_rank2(cluster.model_dir), lora_alpha=2.0)
        R["many"] = many_adapters(cluster, many_url, many_folder, a)
        print_many(R["many"])
        if a.only_many:
            return _write(a, R)

        R["learn"] = learn_latency(admin, a.learn_steps, a.learn_repeats)
        print_learn(R["learn"])

        admin.learn("probe", 0)  # v1, then served once by both replicas (resident in a slot on each)
        with Poller(url, "probe") as poll:
            poll.wait_both(1, DECODERS)
        R["publish"] = publish_to_served(admin, url, "probe", folders["probe"], a.publish_repeats)
        print_publish(R["publish"])

        for n in ["probe", "learn-cold"] + [f"learn-s{s}" for s in a.learn_steps]:
            admin.delete(n)  # the 8 slots are for (c)'s adapters
        for n in names:
            admin.load(n, folders[n])
        for k in range(10):  # until every adapter is resident on both replicas (routing is random)
            asyncio.run(http_load(url, sweep_config(16, 32, 4, 0.0, 224, seed=99 + k), [MODEL_NAME] + names))
            if all(set(names) <= set(s["resident_adapters"]) for s in decoder_stats(APP, DECODERS).values()):
                break
        R["throughput"] = throughput(url, names, folders, a)
        print_throughput(R["throughput"])
        stats = decoder_stats(APP, DECODERS)
        R["decoder_stats"] = stats
        print(f"\nDecoder preemptions: {sum(s['num_preemptions'] for s in stats.values())}; load average at end "
              f"{[round(x, 2) for x in os.getloadavg()]}; total {time.perf_counter() - t_start:.0f} s")
    _write(a, R)


def _write(a, R: dict) -> None:
    if a.json:
        Path(a.json).write_text(json.dumps(R, indent=1, default=str))
        print(f"wrote {a.json}")


def make_rank2(model_dir: Path):
    from vlora.engine.config import LORA_TARGET_MODULES
    from vlora.engine.lora import LoRAWeights
    from vlora.engine.model import TextConfig

    shapes = TextConfig.from_pretrained(model_dir).lora_module_shapes(LORA_TARGET_MODULES)
    g = torch.Generator().manual_seed(12345)
    return LoRAWeights(2, 1.0, {k: (torch.randn(2, i, generator=g) * 0.2, torch.randn(o, 2, generator=g) * 0.2)
                                 for k, (i, o) in shapes.items()})


if __name__ == "__main__":
    main()
