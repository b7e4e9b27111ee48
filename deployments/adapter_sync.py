"""Keeps one Decoder replica's adapters in step with the AdapterStore, lazily.

The replica holds host copies only of adapters its requests used (adapters/residency.py, bounded
by `adapter_cache_mb`); `acquire` fetches an adapter's current version from the store on first
use. A thread long-polls the store for changes: a changed adapter this replica holds is replaced
by its new version (a deleted one dropped) before the replica acknowledges, which releases the
publisher; changes to adapters it does not hold only raise their floor.
"""

from __future__ import annotations

import threading
import time

import ray

from vlora.adapters.registry import AdapterNameError, AdapterNotFoundError
from vlora.adapters.residency import AdapterResidency, Fetched
from vlora.deployments.metrics import DecoderMetrics, get_logger
from vlora.engine.engine import AsyncEngine
from vlora.engine.lora_manager import UnknownAdapterError

log = get_logger("vlora.adapter_sync")
POLL_S = 5.0  # long-poll timeout (the store answers at once on a change)


def _actor_name() -> str | None:
    """"namespace/name" of this replica's actor, so the store can tell a dead replica from a lagging one."""
    try:
        from ray.serve._private.constants import SERVE_NAMESPACE

        # NOTE: the runtime context's namespace is the job's; Serve names its replica actors in SERVE_NAMESPACE
        name = ray.get_runtime_context().get_actor_name()
        return f"{SERVE_NAMESPACE}/{name}" if name else None
    except Exception:  # noqa: BLE001 - not in an actor
        return None


class AdapterSync:
    def __init__(self, store, engine: AsyncEngine, replica_id: str, cache_bytes: int,
                 metrics: DecoderMetrics | None = None):
        self.store = store
        self.engine = engine
        self.replica_id = replica_id
        self.actor_name = _actor_name()
        self.metrics = metrics or DecoderMetrics("")
        self.residency = AdapterResidency(cache_bytes, self._fetch, self._install, self._drop)
        self.seq = -1
        self.epoch: str | None = None
        self.num_swaps = 0
        self.last_contact = time.monotonic()  # the store last answered (health: "store reachable")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._acks_paused_until = 0.0  # fault drill: no acknowledgement before this monotonic time

    # -- the engine (the narrow interface: install / drop a host copy by name and version) --------
    def _fetch(self, name: str) -> Fetched:
        try:
            got = ray.get(self.store.fetch.remote(self.replica_id, self.actor_name, name))
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, (AdapterNotFoundError, AdapterNameError)):  # the model does not exist: 404
                raise UnknownAdapterError(name) from None
            raise
        return Fetched(got["version"], ray.get(got["ref"][0]), got["token"], got["held_elsewhere"])

    def _install(self, name: str, version: int, weights) -> None:
        t0 = time.perf_counter()
        self.engine.call(lambda e: e.add_lora(name, weights, version)).result()
        self.num_swaps += 1
        self.metrics.adapter_swaps.inc(1, {"model_name": name})
        self.metrics.swap_latency.observe(time.perf_counter() - t0, {"model_name": name})

    def _drop(self, name: str) -> None:
        # Not waited for: engine commands run in order, so a later install of `name` follows it.
        self.engine.call(lambda e: e.remove_lora(name) if name in e.loras.adapters else None)

    @property
    def versions(self) -> dict[str, int]:
        return self.residency.versions()

    # -- the store ----------------------------------------------------------------------------
    def catch_up(self) -> None:
        """Register with the store before serving (it then expects this replica's acks)."""
        reg = ray.get(self.store.register_replica.remote(self.replica_id, self.actor_name, self.residency.held()))
        self.seq, self.epoch = reg["seq"], reg["epoch"]
        ray.get(self.store.ack.remote(self.replica_id, self.seq))
        self.metrics.record_versions({}, self.seq)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="vlora-adapter-sync", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def alive(self) -> bool:
        return self._thread is None or self._thread.is_alive()

    def silent_for(self) -> float:
        """Seconds since the store last answered this replica."""
        return time.monotonic() - self.last_contact

    def pause_acks(self, seconds: float) -> None:
        self._acks_paused_until = time.monotonic() + seconds

    def apply(self, reply: dict) -> None:
        """Apply one long-poll answer to the held copies, then acknowledge its sequence."""
        if reply["epoch"] != self.epoch:  # a restarted store: tell it what this replica holds now
            ray.get(self.store.register_replica.remote(self.replica_id, self.actor_name, self.residency.held()))
        if "snapshot" in reply:
            self.residency.reset(reply["snapshot"])
        else:
            for _, name, version in reply["changes"]:
                if version is None:
                    self.residency.deleted(name)
                else:
                    self.residency.published(name, version)
        self.seq = reply["seq"]
        self.epoch = reply["epoch"]
        self.metrics.record_versions(self.residency.versions(), self.seq)
        while time.monotonic() < self._acks_paused_until and not self._stop.is_set():
            time.sleep(0.05)
        ray.get(self.store.ack.remote(self.replica_id, self.seq, self.residency.take_released()))
        self.last_contact = time.monotonic()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                reply = ray.get(self.store.wait_for_change.remote(self.replica_id, self.actor_name, self.seq,
                                                                  self.residency.held(), POLL_S, self.epoch))
                self.last_contact = time.monotonic()
                if reply["seq"] != self.seq or reply["epoch"] != self.epoch:
                    self.apply(reply)
                else:
                    released = self.residency.take_released()
                    if released:
                        ray.get(self.store.release.remote(self.replica_id, released))
            except Exception:  # store restarting, or a transient error: retry shortly, never die
                self.metrics.sync_errors.inc(1, self.metrics.base)
                log.warning("adapter sync with the store failed; retrying", exc_info=True)
                time.sleep(0.5)
