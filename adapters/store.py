"""The AdapterStore: one named, restartable Ray actor owning the adapter registry.

It persists versions through `AdapterRegistry` (so a restarted actor reloads its manifest and
loses nothing), hands weights to replicas as Ray objects, and lets Decoder replicas long-poll
for changes. A publish returns only after every live Decoder replica has acknowledged the new
version, which is what makes read-your-writes hold: a request admitted anywhere after a
load/learn call returned version v is served with >= v.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time

import ray

from adapters.registry import AdapterRegistry
from engine.config import LORA_TARGET_MODULES
from engine.lora import LoRAWeights, check_lora_fits
from engine.model import TextConfig

STORE_NAMESPACE = "vlora"
REPLICA_LIVENESS_S = 20.0  # a replica not heard from for this long no longer holds up publishes
ACK_TIMEOUT_S = 60.0


def store_actor_name(store_dir: str) -> str:
    """One store per store directory (two apps on one cluster may use two stores)."""
    return "vlora-adapter-store-" + hashlib.sha256(os.path.abspath(store_dir).encode()).hexdigest()[:10]


class AdapterStoreActor:
    """Async actor: registry mutations run in a thread, waiters wake on every change."""

    def __init__(self, store_dir: str, model_dir: str, max_lora_rank: int, retention: int = 5,
                 targets: tuple[str, ...] = LORA_TARGET_MODULES):
        shapes = TextConfig.from_pretrained(model_dir).lora_module_shapes(tuple(targets))
        self.registry = AdapterRegistry(store_dir, retention=retention,
                                        validate=lambda w: check_lora_fits(w, shapes, max_lora_rank))
        self._refs: dict[tuple[str, int], ray.ObjectRef] = {}
        self._replicas: dict[str, dict] = {}  # replica id -> {"seq": acked seq, "seen": monotonic time}
        self._cond: asyncio.Condition | None = None

    def _condition(self) -> asyncio.Condition:
        if self._cond is None:
            self._cond = asyncio.Condition()
        return self._cond

    async def _changed(self) -> None:
        async with self._condition():
            self._condition().notify_all()

    async def _await_replicas(self, seq: int, timeout: float) -> int:
        """Wait until every live replica acknowledged `seq`; returns how many did."""
        deadline = time.monotonic() + timeout
        while True:
            now = time.monotonic()
            live = {r: s for r, s in self._replicas.items() if now - s["seen"] < REPLICA_LIVENESS_S}
            if all(s["seq"] >= seq for s in live.values()) or now > deadline:
                return sum(1 for s in live.values() if s["seq"] >= seq)
            async with self._condition():
                try:
                    await asyncio.wait_for(self._condition().wait(), timeout=0.05)
                except asyncio.TimeoutError:
                    pass

    async def _mutate(self, fn, *args, **kwargs) -> dict:
        info = await asyncio.to_thread(fn, *args, **kwargs)
        seq = self.registry.seq
        await self._changed()
        synced = await self._await_replicas(seq, ACK_TIMEOUT_S)
        out = info.to_dict() if info is not None else {}
        out["replicas_synced"] = synced
        return out

    # -- mutations --------------------------------------------------------------------------
    async def publish(self, name: str, weights: LoRAWeights, lora_alpha: float, use_rslora: bool = False,
                      origin: str = "learned", parent_version: int | None = None, metrics: dict | None = None) -> dict:
        return await self._mutate(self.registry.publish, name, weights, lora_alpha, use_rslora, origin,
                                  parent_version, None, metrics)

    async def load_folder(self, name: str, folder: str, allowed_dirs: list[str] | None = None,
                          max_file_bytes: int = 2 * 2**30) -> dict:
        """Publish a PEFT folder; the allow-list check and the read both happen here, where the files are read."""
        return await self._mutate(self.registry.load_folder, name, folder, allowed_dirs, max_file_bytes)

    async def load_files(self, name: str, files: dict[str, bytes | None], source: str,
                         unless_current: bool = False) -> dict:
        """Publish a PEFT adapter read elsewhere: the start-up `adapters:` of the config, which the
        application builder reads (operator-named sources, not subject to adapter_load_dirs)."""
        return await self._mutate(self.registry.load_files, name, files, source, unless_current)

    async def rollback(self, name: str, to_version: int | None = None) -> dict:
        return await self._mutate(self.registry.rollback, name, to_version)

    async def delete(self, name: str) -> dict:
        return await self._mutate(self.registry.delete, name)

    # -- reads ------------------------------------------------------------------------------
    async def list(self) -> dict[str, dict]:
        return {n: v.to_dict() for n, v in self.registry.list().items()}

    async def versions(self, name: str) -> list[dict]:
        return [v.to_dict() for v in self.registry.versions(name)]

    async def snapshot(self) -> tuple[int, dict[str, int]]:
        return self.registry.seq, {n: v.version for n, v in self.registry.list().items()}

    async def get_weights(self, name: str, version: int) -> list[ray.ObjectRef]:
        """[ref] to the weights (a list, so Ray hands the caller the ref rather than the value)."""
        key = (name, version)
        if key not in self._refs:
            _, weights = await asyncio.to_thread(self.registry.weights, name, version)
            self._refs[key] = ray.put(weights)
        return [self._refs[key]]

    # -- replicas ---------------------------------------------------------------------------
    async def wait_for_change(self, replica_id: str, known_seq: int, timeout: float = 10.0) -> tuple[int, dict]:
        """Long-poll: return (seq, {name: version}) once seq != known_seq, or after `timeout`."""
        self._seen(replica_id)
        deadline = time.monotonic() + timeout
        while self.registry.seq == known_seq and time.monotonic() < deadline:
            async with self._condition():
                try:
                    await asyncio.wait_for(self._condition().wait(), timeout=max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    break
            self._seen(replica_id)
        self._seen(replica_id)
        return await self.snapshot()

    async def ack(self, replica_id: str, seq: int) -> None:
        self._seen(replica_id)["seq"] = seq
        await self._changed()

    async def forget_replica(self, replica_id: str) -> None:
        self._replicas.pop(replica_id, None)
        await self._changed()

    def _seen(self, replica_id: str) -> dict:
        s = self._replicas.setdefault(replica_id, {"seq": -1, "seen": 0.0})
        s["seen"] = time.monotonic()
        return s

    async def ready(self) -> bool:
        return True


AdapterStore = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1, max_concurrency=1000)(AdapterStoreActor)


def get_or_create_store(store_dir: str, model_dir: str, max_lora_rank: int, retention: int = 5):
    """The store actor for `store_dir`, started (detached, restartable) if it is not running yet."""
    return AdapterStore.options(name=store_actor_name(store_dir), namespace=STORE_NAMESPACE, lifetime="detached",
                                get_if_exists=True).remote(store_dir, model_dir, max_lora_rank, retention)


def get_store(store_dir: str):
    return ray.get_actor(store_actor_name(store_dir), namespace=STORE_NAMESPACE)
