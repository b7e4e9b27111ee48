"""Keeps one Decoder replica's engine in step with the AdapterStore.

At start the replica catches up (blocking) before it serves; afterwards a thread long-polls the
store, fetches new versions as Ray objects, registers them with the engine between steps
(resident slots are rewritten in place) and acknowledges, which releases the publisher.
"""

from __future__ import annotations

import threading
import time

import ray

from deployments.metrics import DecoderMetrics, get_logger
from engine.engine import AsyncEngine

log = get_logger("vlora.adapter_sync")


class AdapterSync:
    def __init__(self, store, engine: AsyncEngine, replica_id: str, metrics: DecoderMetrics | None = None):
        self.store = store
        self.engine = engine
        self.replica_id = replica_id
        self.metrics = metrics or DecoderMetrics("")
        self.seq = -1
        self.versions: dict[str, int] = {}
        self.num_swaps = 0
        self.last_swap_s = 0.0
        self.last_contact = time.monotonic()  # the store last answered (health: "store reachable")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def catch_up(self) -> None:
        seq, snapshot = ray.get(self.store.snapshot.remote())
        self._apply(seq, snapshot)

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

    def _apply(self, seq: int, snapshot: dict[str, int]) -> None:
        t0 = time.perf_counter()
        for name, version in snapshot.items():
            if self.versions.get(name) == version:
                continue
            t_one = time.perf_counter()
            ref = ray.get(self.store.get_weights.remote(name, version))[0]
            weights = ray.get(ref)
            self.engine.call(lambda e, n=name, w=weights, v=version: e.add_lora(n, w, v)).result()
            self.versions[name] = version
            self.num_swaps += 1
            self.metrics.adapter_swaps.inc(1, {"model_name": name})
            self.metrics.swap_latency.observe(time.perf_counter() - t_one, {"model_name": name})
        for name in [n for n in self.versions if n not in snapshot]:
            self.engine.call(lambda e, n=name: e.remove_lora(n)).result()
            del self.versions[name]
        self.seq = seq
        self.last_swap_s = time.perf_counter() - t0
        self.metrics.record_versions(self.versions, seq)
        ray.get(self.store.ack.remote(self.replica_id, seq))
        self.last_contact = time.monotonic()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                seq, snapshot = ray.get(self.store.wait_for_change.remote(self.replica_id, self.seq, 5.0))
                self.last_contact = time.monotonic()
                if seq != self.seq or snapshot != self.versions:
                    self._apply(seq, snapshot)
            except Exception:  # store restarting, or a transient error: retry shortly, never die
                self.metrics.sync_errors.inc(1, self.metrics.base)
                log.warning("adapter sync with the store failed; retrying", exc_info=True)
                time.sleep(0.5)
