"""Lazy adapter residency: byte budget, LRU, pins, fetch on first use, read-your-writes floors."""

from __future__ import annotations

import threading
import time

import pytest

from vlora.adapters.residency import AdapterCacheFullError, AdapterResidency, Fetched
from vlora.engine.lora_manager import UnknownAdapterError


class FakeStore:
    """The store as a replica sees it: current versions, a fetch that records what was served."""

    def __init__(self):
        self.current: dict[str, int] = {}
        self.sizes: dict[str, int] = {}
        self.fetches: list[str] = []
        self.gate: threading.Event | None = None  # set: fetches block until it is set
        self.n = 0

    def fetch(self, name: str) -> Fetched:
        if name not in self.current:
            raise UnknownAdapterError(name)
        version = self.current[name]
        self.fetches.append(name)
        if self.gate is not None:
            self.gate.wait(5)
        self.n += 1
        return Fetched(version, (name, version, self.sizes.get(name, 100)), token=f"t{self.n}")


class FakeEngine:
    def __init__(self):
        self.loaded: dict[str, int] = {}
        self.log: list[tuple] = []

    def install(self, name, version, weights):
        self.loaded[name] = version
        self.log.append(("install", name, version))

    def drop(self, name):
        self.loaded.pop(name, None)
        self.log.append(("drop", name))


def make(budget=300, **kw):
    store, engine = FakeStore(), FakeEngine()
    res = AdapterResidency(budget, store.fetch, engine.install, engine.drop, nbytes=lambda w: w[2], **kw)
    return store, engine, res


def test_fetch_on_first_use_then_hits_and_lru_within_budget():
    store, engine, res = make(budget=300)
    for n in "abcd":
        store.current[n] = 1
    assert res.acquire("a") == 1 and store.fetches == ["a"]
    res.release("a")
    assert res.try_acquire("a") == 1  # held: no fetch
    res.release("a")
    for n in "bc":
        res.acquire(n)
        res.release(n)
    assert res.bytes == 300 and set(engine.loaded) == {"a", "b", "c"}
    res.acquire("a")  # a becomes most recently used
    res.release("a")
    res.acquire("d")  # evicts b, the least recently used
    res.release("d")
    assert set(res.versions()) == {"a", "c", "d"} and engine.loaded.keys() == {"a", "c", "d"}
    assert res.bytes == 300 <= res.budget_bytes
    assert (res.stats.hits, res.stats.misses, res.stats.evictions) == (2, 4, 1)
    assert res.take_released() == [("b", "t2")]
    res.acquire("b")  # evicted adapters are fetched again on demand
    assert store.fetches == ["a", "b", "c", "d", "b"]


def test_pinned_copies_are_not_evicted_and_a_full_cache_waits_then_refuses():
    store, engine, res = make(budget=200, wait_s=0.3)
    for n in "abc":
        store.current[n] = 1
    res.acquire("a")
    res.acquire("b")
    t0 = time.perf_counter()
    with pytest.raises(AdapterCacheFullError, match="in use by running requests"):
        res.acquire("c")
    assert time.perf_counter() - t0 >= 0.3
    assert set(engine.loaded) == {"a", "b"} and res.bytes == 200
    # a release while c waits makes room for it
    threading.Timer(0.1, res.release, args=("a",)).start()
    res.wait_s = 5
    assert res.acquire("c") == 1
    assert set(engine.loaded) == {"b", "c"} and res.bytes == 200


def test_an_adapter_larger_than_the_budget_is_refused():
    store, engine, res = make(budget=50)
    store.current["big"] = 1
    with pytest.raises(AdapterCacheFullError, match="raise adapter_cache_mb"):
        res.acquire("big")
    assert engine.loaded == {} and res.bytes == 0


def test_published_replaces_a_held_copy_before_returning():
    store, engine, res = make()
    store.current["a"] = 1
    res.acquire("a")  # pinned by a running request
    store.current["a"] = 2
    res.published("a", 2)
    assert engine.loaded["a"] == 2 and res.versions() == {"a": 2}
    assert res.bytes == 100 and res.take_released() == [("a", "t1")]
    res.release("a")
    assert res.try_acquire("a") == 2


def test_published_for_an_adapter_not_held_fetches_nothing():
    store, engine, res = make()
    store.current["x"] = 3
    res.published("x", 3)
    assert store.fetches == [] and engine.loaded == {}


def test_a_fetch_racing_a_publish_never_serves_the_old_version():
    """The fetch read v1; the publish of v2 was acknowledged before the fetch finished: the request
    acquired after the acknowledgement must get v2."""
    store, engine, res = make()
    store.current["a"] = 1
    store.gate = threading.Event()
    got = []
    t = threading.Thread(target=lambda: got.append(res.acquire("a")))
    t.start()
    while not store.fetches:
        time.sleep(0.01)
    store.current["a"] = 2
    res.published("a", 2)  # the ack: from now on nothing below v2 may be acquired
    store.gate.set()
    t.join(5)
    assert got == [2] and engine.loaded["a"] == 2
    assert [e for e in engine.log if e[0] == "install"] == [("install", "a", 2)]


def test_deleted_adapter_fails_at_once_and_leaves_after_its_last_request():
    store, engine, res = make()
    store.current["a"] = 1
    res.acquire("a")
    res.deleted("a")
    with pytest.raises(UnknownAdapterError):
        res.try_acquire("a")
    assert "a" in engine.loaded  # the running request keeps it
    res.release("a")
    assert engine.loaded == {} and res.bytes == 0
    store.current["a"] = 2  # re-created: served again
    res.published("a", 2)
    assert res.acquire("a") == 2


def test_reset_drops_deleted_and_refreshes_changed():
    store, engine, res = make()
    store.current.update(a=1, b=1)
    for n in "ab":
        res.acquire(n)
        res.release(n)
    store.current = {"b": 4}
    res.reset({"b": 4})
    assert res.versions() == {"b": 4} and engine.loaded == {"b": 4}


def test_concurrent_cold_requests_fetch_once():
    store, engine, res = make()
    store.current["a"] = 1
    store.gate = threading.Event()
    out = []
    threads = [threading.Thread(target=lambda: out.append(res.acquire("a"))) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.1)
    store.gate.set()
    for t in threads:
        t.join(5)
    assert out == [1, 1, 1, 1] and store.fetches == ["a"]
    assert res.copies["a"].pins == 4 and res.stats.misses == 4


def test_acquire_says_hit_affinity_miss_or_cold():
    store, engine, res = make()
    store.current.update(a=1, b=1)
    elsewhere = {"a": True}
    fetch = store.fetch

    def fetch_with_holders(name):
        got = fetch(name)
        got.held_elsewhere = elsewhere.get(name, False)
        return got

    res._fetch = fetch_with_holders
    assert res.acquire_kind("a") == (1, "miss")  # another replica held it: the router missed
    assert res.acquire_kind("b") == (1, "cold")  # nobody held it
    assert res.acquire_kind("a") == (1, "hit")
    assert (res.stats.hits, res.stats.misses, res.stats.affinity_misses) == (1, 2, 1)


def test_a_refresh_of_an_adapter_deleted_meanwhile_drops_it():
    store, engine, res = make()
    store.current["a"] = 1
    res.acquire("a")
    res.release("a")
    del store.current["a"]  # v2 published, then deleted, before this replica applied v2
    res.published("a", 2)
    assert engine.loaded == {} and res.versions() == {}
    with pytest.raises(UnknownAdapterError):
        res.acquire("a")
