"""Lazy adapter residency on one Decoder replica: a byte-bounded LRU of host copies, fetched on first use.

The engine keeps `max_loras` adapters in its slots; the host copies it can load from are
whatever this class has installed in it (`install(name, version, weights)` / `drop(name)`, the
narrow interface to the engine). A request pins its adapter from `acquire` until `release`, so a
pinned copy is never dropped: eviction takes the least recently used unpinned copy, and a new
copy that does not fit while everything is pinned waits for a release (`AdapterCacheFullError`
after `wait_s`). The bytes of installed copies never exceed `budget_bytes`.

Read-your-writes: the sync thread calls `published(name, version)` before acknowledging a change.
That raises the adapter's floor; a held copy below the floor is replaced at once (or dropped when
unpinned and `refresh_held` is off), and any copy fetched or installed later must reach the floor,
so a request acquired after the acknowledgement always gets >= version. `deleted(name)` makes new
acquires fail at once; the copy leaves the engine when its last request releases it.

No Ray here: `fetch(name) -> Fetched` is injected (the Decoder fetches from the AdapterStore).
Thread-safe: `acquire` may block (fetch, waiting for room), so async callers try `try_acquire`
first and run `acquire` in a worker thread.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

from vlora.engine.lora_manager import UnknownAdapterError


class AdapterCacheFullError(RuntimeError):
    """Every host copy is pinned by running requests and a new one does not fit the budget (HTTP 503)."""


@dataclass(slots=True)
class Fetched:
    version: int
    weights: Any
    token: str = ""  # the store's receipt for this holding, returned when the copy is dropped
    held_elsewhere: bool = False  # another replica held it when this one fetched it (an affinity miss)


@dataclass(slots=True)
class _Copy:
    version: int
    nbytes: int
    token: str
    pins: int = 0


@dataclass(slots=True)
class ResidencyStats:
    hits: int = 0  # acquires that found a current host copy
    misses: int = 0  # acquires that had to fetch: affinity misses + cold starts
    affinity_misses: int = 0  # ... while another replica held it (routing could have done better)
    fetches: int = 0
    fetch_seconds: list[float] = field(default_factory=list)  # drained by whoever exports them
    evictions: int = 0
    refreshes: int = 0  # held copies replaced by a newer published version


def weights_nbytes(weights: Any) -> int:
    """Bytes of a LoRAWeights' tensors (A and B of every module)."""
    return sum(t.numel() * t.element_size() for ab in weights.weights.values() for t in ab)


class AdapterResidency:
    def __init__(self, budget_bytes: int, fetch: Callable[[str], Fetched], install: Callable[[str, int, Any], None],
                 drop: Callable[[str], None], wait_s: float = 30.0, nbytes: Callable[[Any], int] = weights_nbytes,
                 refresh_held: bool = True, clock: Callable[[], float] = time.perf_counter):
        self.budget_bytes = budget_bytes
        self._fetch, self._install, self._drop, self._nbytes = fetch, install, drop, nbytes
        self.wait_s = wait_s
        self.refresh_held = refresh_held
        self.clock = clock
        self.copies: OrderedDict[str, _Copy] = OrderedDict()  # least recently used first
        self.bytes = 0
        self.stats = ResidencyStats()
        self._floor: dict[str, int] = {}  # published versions seen: a copy below its floor is stale
        self._gone: set[str] = set()  # deleted in the store; dropped once unpinned
        self._loading: dict[str, threading.Event] = {}
        self._released: list[tuple[str, str]] = []  # (name, token) dropped since the last take_released
        self._elsewhere: dict[str, bool] = {}  # name -> its last fetch found it held by another replica
        self._lock = threading.Condition()

    # -- requests ---------------------------------------------------------------------------
    def try_acquire(self, name: str) -> int | None:
        """Pin a current host copy without blocking; its version, or None when `acquire` must fetch."""
        with self._lock:
            if name in self._gone:
                raise UnknownAdapterError(name)
            c = self.copies.get(name)
            if c is None or c.version < self._floor.get(name, 0) or name in self._loading:
                return None
            c.pins += 1
            self.copies.move_to_end(name)
            self.stats.hits += 1
            return c.version

    def acquire(self, name: str) -> int:
        """Pin `name`'s host copy, fetching it first if it is missing or stale; returns its version.
        Raises UnknownAdapterError (deleted or unknown), AdapterCacheFullError."""
        return self.acquire_kind(name)[0]

    def acquire_kind(self, name: str) -> tuple[int, str]:
        """`acquire`, also saying how the copy was found: "hit" (held here), "miss" (fetched while
        another replica held it: an affinity miss) or "cold" (held by no replica)."""
        v = self.try_acquire(name)
        if v is not None:
            return v, "hit"
        counted = False
        while True:
            with self._lock:
                if name in self._gone:
                    raise UnknownAdapterError(name)
                c = self.copies.get(name)
                loading = self._loading.get(name)
                if loading is None:
                    if c is not None and c.version >= self._floor.get(name, 0):
                        c.pins += 1
                        self.copies.move_to_end(name)
                        if not counted:
                            self.stats.hits += 1
                            return c.version, "hit"
                        kind = "miss" if self._elsewhere.get(name) else "cold"
                        if kind == "miss":
                            self.stats.affinity_misses += 1
                        return c.version, kind
                    loading = self._loading[name] = threading.Event()
                    mine = True
                else:
                    mine = False
                if not counted:
                    self.stats.misses += 1
                    counted = True
            if not mine:
                loading.wait()
                continue
            try:
                self._load(name)
            finally:
                with self._lock:
                    del self._loading[name]
                    loading.set()
                    self._lock.notify_all()

    def release(self, name: str) -> None:
        with self._lock:
            c = self.copies.get(name)
            if c is None:
                return
            c.pins -= 1
            if c.pins == 0 and name in self._gone:
                self._remove(name)
            self._lock.notify_all()

    # -- the store's changes (sync thread) -----------------------------------------------------
    def published(self, name: str, version: int) -> None:
        """A new version is current in the store: copies older than it must not serve new requests."""
        with self._lock:
            self._gone.discard(name)
            self._floor[name] = max(self._floor.get(name, 0), version)
            c = self.copies.get(name)
            stale = c is not None and c.version < version and name not in self._loading
            if stale and not self.refresh_held and c.pins == 0:
                self._remove(name)
                return
            if not stale:
                return
            loading = self._loading[name] = threading.Event()
        try:
            self._load(name)
            self.stats.refreshes += 1
        except UnknownAdapterError:  # deleted again before the refresh: its delete follows
            with self._lock:
                self._gone.add(name)
                c = self.copies.get(name)
                if c is not None and c.pins == 0:
                    self._remove(name)
        except Exception:
            with self._lock:  # an unpinned stale copy can just go (fetched again on demand); else retry
                c = self.copies.get(name)
                if c is None or c.pins > 0:
                    raise
                self._remove(name)
        finally:
            with self._lock:
                del self._loading[name]
                loading.set()
                self._lock.notify_all()

    def deleted(self, name: str) -> None:
        with self._lock:
            self._gone.add(name)
            c = self.copies.get(name)
            if c is not None and c.pins == 0:
                self._remove(name)

    def reset(self, current: dict[str, int]) -> None:
        """The store's full state ({name: version}) after this replica lost track of its changes."""
        for name in list(self.copies) + list(self._floor):
            if name not in current:
                self.deleted(name)
        for name, version in current.items():
            if name in self.copies or name in self._floor:
                self.published(name, version)

    # -- views ------------------------------------------------------------------------------
    def held(self) -> dict[str, str]:
        """name -> the store's token, for every host copy (the store's view of this replica)."""
        with self._lock:
            return {n: c.token for n, c in self.copies.items()}

    def versions(self) -> dict[str, int]:
        with self._lock:
            return {n: c.version for n, c in self.copies.items()}

    def take_released(self) -> list[tuple[str, str]]:
        with self._lock:
            out, self._released = self._released, []
            return out

    def drain_fetch_seconds(self) -> list[float]:
        with self._lock:
            out, self.stats.fetch_seconds = self.stats.fetch_seconds, []
            return out

    # -- internals --------------------------------------------------------------------------
    def _load(self, name: str) -> None:
        """Fetch until the copy reaches the floor, make room, install (called with _loading[name] set).

        The install runs outside the lock (it waits for the engine); the bytes are reserved first."""
        while True:
            t0 = self.clock()
            got = self._fetch(name)
            with self._lock:
                self.stats.fetches += 1
                self.stats.fetch_seconds.append(self.clock() - t0)
                if got.version < self._floor.get(name, 0):
                    continue  # fetched just before a publish: fetch again
                if name in self._gone:
                    raise UnknownAdapterError(name)
                size = self._nbytes(got.weights)
                if size > self.budget_bytes:
                    raise AdapterCacheFullError(
                        f"adapter {name!r} needs {size} bytes but adapter_cache_mb allows {self.budget_bytes} "
                        "bytes of host copies per replica; raise adapter_cache_mb")
                self._make_room(size, keep=name)
                self.bytes += size  # reserved: the old copy (if any) stays counted until it is replaced
            try:
                self._install(name, got.version, got.weights)
            except BaseException:
                with self._lock:
                    self.bytes -= size
                raise
            with self._lock:
                old = self.copies.pop(name, None)
                pins = 0
                if old is not None:
                    self.bytes -= old.nbytes
                    pins = old.pins
                    if old.token != got.token:
                        self._released.append((name, old.token))
                self.copies[name] = _Copy(got.version, size, got.token, pins)
                self._elsewhere[name] = got.held_elsewhere
                self._floor[name] = max(self._floor.get(name, 0), got.version)
                return

    def _make_room(self, need: int, keep: str) -> None:
        """Evict unpinned copies (LRU first) until `need` more bytes fit; waits for releases (lock held)."""
        deadline = self.clock() + self.wait_s
        while self.bytes + need > self.budget_bytes:
            victim = next((n for n, c in self.copies.items() if c.pins == 0 and n != keep
                           and n not in self._loading), None)
            if victim is not None:
                self._remove(victim)
                self.stats.evictions += 1
                continue
            left = deadline - self.clock()
            if left <= 0:
                raise AdapterCacheFullError(
                    f"every adapter host copy on this replica is in use by running requests and adapter_cache_mb "
                    f"({self.budget_bytes} bytes) has no room for another; retry shortly")
            self._lock.wait(timeout=min(left, 0.5))

    def _remove(self, name: str) -> None:
        c = self.copies.pop(name)
        self._elsewhere.pop(name, None)
        self.bytes -= c.nbytes
        self._drop(name)
        if c.token:
            self._released.append((name, c.token))
