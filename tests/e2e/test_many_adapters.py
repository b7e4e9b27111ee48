"""Thousands of adapters on two Decoder replicas: lazy residency within a byte budget, adapter-affinity
routing, read-your-writes under load, and the publish path's faults (ack timeout, store restart,
retried mutation, learn racing a rollback, stale job ids).

The `vlora` app (tests/e2e/conftest.py): 2 Decoder replicas, max_loras 8, adapter_cache_mb for ~32
of the rank-2 adapters registered here, ack timeout ACK_TIMEOUT_S.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import ray
import torch
from ray import serve

from vlora.adapters.peft_io import save_peft_adapter
from vlora.adapters.store import get_store
from vlora.deployments.app import decoder_stats
from vlora.engine.config import LORA_TARGET_MODULES
from vlora.engine.lora import LoRAWeights
from vlora.engine.model import TextConfig
from tests.e2e.conftest import ACK_TIMEOUT_S, ADMIN_KEY, API_KEY, FLEET_ADAPTER_BYTES
from tests.e2e.test_adapters import assert_served_like_hf_peft
from tests.e2e.test_metrics import per_replica, scrape

pytestmark = pytest.mark.e2e

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
AUTH = {"Authorization": f"Bearer {API_KEY}"}
N_REGISTERED = 1000
N_USED = 100
ZIPF_S = 1.2
RANK = 2


def fleet_name(i: int) -> str:
    return f"fleet-{i:04d}"


def fleet_weights(shapes: dict, seed: int) -> LoRAWeights:
    g = torch.Generator().manual_seed(seed)
    w = {k: (torch.randn(RANK, i, generator=g) * 0.2, torch.randn(o, RANK, generator=g) * 0.2)
         for k, (i, o) in shapes.items()}
    return LoRAWeights(rank=RANK, scaling=LoRAWeights.scaling_for(RANK, 4.0, False), weights=w)


@pytest.fixture(scope="module")
def fleet(serve_instance, tiny_model_dir):
    """1,000 registered adapters (one bulk registration: one manifest write per chunk)."""
    shapes = TextConfig.from_pretrained(tiny_model_dir).lora_module_shapes(LORA_TARGET_MODULES)
    store = get_store(str(serve_instance["store"]))
    for start in range(0, N_REGISTERED, 250):
        items = [{"name": fleet_name(i), "weights": fleet_weights(shapes, i), "lora_alpha": 4.0}
                 for i in range(start, start + 250)]
        out = ray.get(store.publish_many.remote(items))
        assert [o["version"] for o in out] == [1] * 250
    assert sum(t.numel() * 4 for ab in fleet_weights(shapes, 0).weights.values() for t in ab) == FLEET_ADAPTER_BYTES
    listed = httpx.get(f"{serve_instance['url']}/v1/adapters", headers=ADMIN, timeout=60).json()["data"]
    assert sum(1 for a in listed if a["name"].startswith("fleet-")) == N_REGISTERED
    return {"store": store, "shapes": shapes}


def residency() -> dict[str, dict]:
    return {r: s["residency"] for r, s in decoder_stats().items()}


class Load:
    """Closed-loop clients sending 1-token completions over the first N_USED adapters, Zipf-like."""

    def __init__(self, base_url: str, clients: int = 8, seed: int = 0):
        self.url = base_url
        self.clients = clients
        self.rnd = random.Random(seed)
        self.weights = [1 / (k ** ZIPF_S) for k in range(1, N_USED + 1)]
        self.results: list[tuple[float, str, int, int | None, str | None]] = []  # (sent, adapter, status, version, replica)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._budget = 0

    def _pick(self) -> str:
        with self._lock:
            return fleet_name(self.rnd.choices(range(N_USED), self.weights)[0])

    def _client(self) -> None:
        with httpx.Client(timeout=120, headers=AUTH) as c:
            while not self._stop.is_set():
                with self._lock:
                    if self._budget <= 0:
                        return
                    self._budget -= 1
                name = self._pick()
                sent = time.monotonic()
                r = c.post(f"{self.url}/v1/completions", json={"model": name, "prompt": "Hello", "max_tokens": 1,
                                                                 "temperature": 0})
                v = r.headers.get("x-adapter-version")
                with self._lock:
                    self.results.append((sent, name, r.status_code, int(v) if v else None,
                                         r.headers.get("x-vlora-replica")))

    def run(self, n: int) -> list:
        """Send n requests (blocking); returns their results."""
        start = len(self.results)
        self._budget = n
        with ThreadPoolExecutor(self.clients) as pool:
            list(pool.map(lambda _: self._client(), range(self.clients)))
        return self.results[start:]

    def start(self, n: int) -> threading.Thread:
        t = threading.Thread(target=self.run, args=(n,))
        t.start()
        return t


def test_thousand_adapters_lazy_residency_affinity_and_balance(fleet, base_url, client, hf_model, tokenizer,
                                                                serve_instance):
    before = residency()
    budget = {r: s["budget_bytes"] for r, s in before.items()}
    assert all(b // FLEET_ADAPTER_BYTES == 32 for b in budget.values())
    load = Load(base_url)
    peak: dict[str, float] = {}
    stop = threading.Event()

    def watch():  # each replica's exported host-copy bytes, sampled during the load
        while not stop.is_set():
            for r, v in per_replica(scrape(serve_instance["metrics_url"]), "ray_vlora_adapter_host_bytes").items():
                peak[r] = max(peak.get(r, 0), v)
            time.sleep(0.3)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        warm = load.run(150)
        mid = residency()
        measured = load.run(350)
    finally:
        stop.set()
        watcher.join()
    after = residency()
    results = warm + measured
    assert Counter(r[2] for r in results) == {200: 500}
    assert all(v == 1 for _, _, _, v, _ in results)
    assert len({r[1] for r in results}) >= 30  # the traffic really spread over many adapters
    # host copies stay within each replica's budget (sampled during the load, and at the end)
    assert len(peak) == 2 and max(peak.values()) <= min(budget.values()), (peak, budget)
    for r in after:
        assert after[r]["host_bytes"] <= budget[r], (r, after[r])
        assert len(after[r]["host_copies"]) <= 32
    # affinity: after warm-up, >= 80% of the requests whose adapter some replica held reached a holder
    # (cold starts, adapters held by no replica, are neither); the host-copy hit ratio is reported too
    delta = {k: sum(after[r][k] - mid[r][k] for r in after) for k in ("hits", "misses", "affinity_misses")}
    assert delta["hits"] + delta["misses"] == 350
    affinity = delta["hits"] / (delta["hits"] + delta["affinity_misses"])
    print(f"affinity {affinity:.3f}, held on arrival {delta['hits'] / 350:.3f}, {delta}, served {Counter(r[4] for r in results)}")
    assert affinity >= 0.8, delta
    # balance: no replica served more than 1.5x the mean
    served = Counter(r[4] for r in results)
    assert len(served) == 2 and max(served.values()) <= 1.5 * 500 / 2, served
    # evictions happened (100 adapters > 32 copies) and evicted adapters came back on demand
    assert sum(after[r]["evictions"] for r in after) > 0
    # a sample matches HF+PEFT greedy output, straight from the stored PEFT folders
    for i in (0, 7, 63):
        folder = serve_instance["store"] / fleet_name(i) / "v1"
        assert_served_like_hf_peft(client, fleet_name(i), folder, hf_model, tokenizer, "Tell me a story.")


def test_read_your_writes_under_load_across_publishes(fleet, base_url, serve_instance):
    """>= 20 publishes to adapters held by one replica and not the other, while clients keep sending:
    no request sent after a publish returned v is served with an older version."""
    load = Load(base_url, clients=6, seed=1)
    load.run(60)  # make adapters resident
    held = residency()
    (ra, a), (rb, b) = held.items()
    used = {fleet_name(i) for i in range(N_USED)}
    one_sided = sorted((set(a["host_copies"]) ^ set(b["host_copies"])) & used)  # resident on one replica only
    both = sorted(set(a["host_copies"]) & set(b["host_copies"]) & used)
    assert len(one_sided) >= 10, (a["host_copies"], b["host_copies"])
    targets = (one_sided * 3)[:20] + both[:4]
    uploads = serve_instance["uploads"]
    published: list[tuple[float, str, int]] = []
    runner = load.start(400)
    try:
        for k, name in enumerate(targets):
            folder = uploads / f"ryw-{k}"
            save_peft_adapter(folder, fleet_weights(fleet["shapes"], 10_000 + k), lora_alpha=4.0)
            r = httpx.post(f"{base_url}/v1/adapters", json={"name": name, "path": str(folder)}, headers=ADMIN,
                           timeout=60)
            assert r.status_code == 200, r.text
            published.append((time.monotonic(), name, r.json()["version"]))
            time.sleep(0.05)
    finally:
        runner.join()
    assert len(published) == 24
    results = load.results
    assert all(status == 200 for _, _, status, _, _ in results), Counter(s for _, _, s, _, _ in results)
    stale = []
    for sent, name, _, version, replica in results:
        floor = max((v for t, n, v in published if n == name and t < sent), default=1)
        if version < floor:
            stale.append((name, version, floor, replica))
    assert stale == []
    # the publishes were really served: a request after the last one gets each adapter's newest version
    newest = {}
    for _, n, v in published:
        newest[n] = max(newest.get(n, 0), v)
    for n, v in list(newest.items())[:5]:
        r = httpx.post(f"{base_url}/v1/completions", json={"model": n, "prompt": "Hi", "max_tokens": 1},
                       headers=AUTH, timeout=60)
        assert r.headers["x-adapter-version"] == str(v)


def _drill_each_replica(method: str, *args) -> list[str]:
    """Call a Decoder drill on every replica (Serve routes each call to one of them)."""
    h = serve.get_deployment_handle("Decoder", app_name="vlora")
    seen: set[str] = set()
    for _ in range(60):
        seen.add(getattr(h, method).remote(*args).result())
        if len(seen) == 2:
            return sorted(seen)
    raise AssertionError(f"reached {seen} only")


def test_ack_timeout_is_504_naming_the_lagging_replica_and_a_retry_makes_one_version(fleet, base_url,
                                                                                       serve_instance):
    name = fleet_name(900)
    h = serve.get_deployment_handle("Decoder", app_name="vlora")
    lagging = h.pause_adapter_sync_drill.remote(ACK_TIMEOUT_S + 3, name).result()
    folder = serve_instance["uploads"] / "ack-timeout"
    save_peft_adapter(folder, fleet_weights(fleet["shapes"], 42), lora_alpha=4.0)
    body = {"name": name, "path": str(folder)}
    headers = {**ADMIN, "Idempotency-Key": "ack-timeout-1"}
    t0 = time.monotonic()
    r = httpx.post(f"{base_url}/v1/adapters", json=body, headers=headers, timeout=60)
    assert r.status_code == 504, r.text
    assert time.monotonic() - t0 >= ACK_TIMEOUT_S
    msg = r.json()["error"]["message"]
    assert "version 2 of adapter 'fleet-0900' was stored" in msg and lagging in msg
    assert r.json()["error"]["code"] == "publish_timeout"
    time.sleep(4)  # the replica acknowledges again
    r = httpx.post(f"{base_url}/v1/adapters", json=body, headers=headers, timeout=60)  # the client's retry
    assert r.status_code == 200, r.text
    assert r.json()["version"] == 2
    versions = httpx.get(f"{base_url}/v1/adapters/{name}", headers=ADMIN).json()["versions"]
    assert [v["version"] for v in versions] == [1, 2]  # the retry made no second version
    r = httpx.post(f"{base_url}/v1/completions", json={"model": name, "prompt": "Hi", "max_tokens": 1},
                   headers=AUTH, timeout=60)
    assert r.headers["x-adapter-version"] == "2"


def test_retried_mutations_make_one_version(fleet, base_url, serve_instance):
    name = fleet_name(901)
    folder = serve_instance["uploads"] / "retry"
    save_peft_adapter(folder, fleet_weights(fleet["shapes"], 43), lora_alpha=4.0)
    for path, body in (("/v1/adapters", {"name": name, "path": str(folder)}),
                       (f"/v1/adapters/{name}/rollback", {"version": 1})):
        headers = {**ADMIN, "Idempotency-Key": f"retry-{path}"}
        first = httpx.post(f"{base_url}{path}", json=body, headers=headers, timeout=60)
        again = httpx.post(f"{base_url}{path}", json=body, headers=headers, timeout=60)
        assert first.status_code == again.status_code == 200, (first.text, again.text)
        assert first.json()["version"] == again.json()["version"]
    versions = httpx.get(f"{base_url}/v1/adapters/{name}", headers=ADMIN).json()["versions"]
    assert [(v["version"], v["origin"]) for v in versions] == [(1, "loaded"), (2, "loaded"), (3, "rollback")]
    r = httpx.post(f"{base_url}/v1/adapters", json={"name": fleet_name(902), "path": str(folder)},
                   headers={**ADMIN, "Idempotency-Key": "retry-/v1/adapters"}, timeout=60)
    assert r.status_code == 409 and "already used" in r.json()["error"]["message"]


def test_store_restart_then_publish_still_waits_for_every_replica(fleet, base_url, serve_instance):
    """Both replicas hold the adapter and stop acknowledging; the store restarts; a publish must wait
    for both (the restarted store knows its replicas from disk) and answer 504 naming both."""
    name = fleet_name(903)
    replicas = _drill_each_replica("pause_adapter_sync_drill", ACK_TIMEOUT_S + 6, name)
    from vlora.adapters.store import STORE_NAMESPACE, store_actor_name

    ray.kill(ray.get_actor(store_actor_name(str(serve_instance["store"])), namespace=STORE_NAMESPACE),
             no_restart=False)
    folder = serve_instance["uploads"] / "after-restart"
    save_peft_adapter(folder, fleet_weights(fleet["shapes"], 44), lora_alpha=4.0)
    deadline = time.monotonic() + 60
    while True:  # the store restarts (Ray retries the call on the new instance)
        r = httpx.post(f"{base_url}/v1/adapters", json={"name": name, "path": str(folder)},
                       headers={**ADMIN, "Idempotency-Key": "after-restart"}, timeout=90)
        if r.status_code != 503 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert r.status_code == 504, r.text
    assert all(rid in r.json()["error"]["message"] for rid in replicas)
    time.sleep(6)
    r = httpx.post(f"{base_url}/v1/adapters", json={"name": name, "path": str(folder)},
                   headers={**ADMIN, "Idempotency-Key": "after-restart"}, timeout=90)
    assert r.status_code == 200 and r.json()["version"] == 2 and r.json()["replicas_synced"] == 2, r.text


def test_learn_racing_a_rollback_is_409_and_job_ids_are_unique(base_url):
    name = "race-learn"
    examples = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    for _ in range(2):
        r = httpx.post(f"{base_url}/v1/adapters/{name}/learn", json={"examples": examples, "steps": 0},
                       headers=ADMIN, timeout=120)
        assert r.status_code == 200, r.text
    r = httpx.post(f"{base_url}/v1/adapters/{name}/learn", headers=ADMIN, timeout=60,
                   json={"examples": examples, "steps": 300, "learning_rate": 1e-4, "async": True})
    assert r.status_code == 202, r.text
    job = r.json()["id"]
    assert job.startswith("job-") and len(job) == 20
    deadline = time.time() + 120
    while httpx.get(f"{base_url}/v1/adapters/{name}/jobs/{job}", headers=ADMIN).json()["step"] < 1:
        assert time.time() < deadline
        time.sleep(0.05)
    rb = httpx.post(f"{base_url}/v1/adapters/{name}/rollback", json={"version": 1}, headers=ADMIN, timeout=60)
    assert rb.status_code == 200 and rb.json()["version"] == 3
    while (j := httpx.get(f"{base_url}/v1/adapters/{name}/jobs/{job}", headers=ADMIN).json())["status"] in (
            "queued", "running"):
        assert time.time() < deadline
        time.sleep(0.2)
    assert j["status"] == "failed" and j["error"]["status"] == 409, j
    assert "changed meanwhile" in j["error"]["message"] and "v3 is current" in j["error"]["message"]
    versions = httpx.get(f"{base_url}/v1/adapters/{name}", headers=ADMIN).json()["versions"]
    assert [v["version"] for v in versions] == [1, 2, 3]  # the learn published nothing over the rollback
    # a synchronous learn started from v3 after that succeeds; an id from before (or made up) is 404
    r = httpx.post(f"{base_url}/v1/adapters/{name}/learn", json={"examples": examples, "steps": 0},
                   headers=ADMIN, timeout=120)
    assert r.status_code == 200 and r.json()["version"] == 4 and r.json()["parent_version"] == 3
    for stale in ("job-1", "job-0123456789abcdef"):
        r = httpx.get(f"{base_url}/v1/adapters/{name}/jobs/{stale}", headers=ADMIN)
        assert r.status_code == 404 and r.json()["error"]["code"] == "job_not_found", r.text
