"""The AdapterStore: one named, restartable Ray actor owning the adapter registry.

It persists versions through `AdapterRegistry` (so a restarted actor reloads its manifest and
loses nothing), hands weights to replicas as Ray objects, and lets Decoder replicas long-poll
for changes (deltas since the sequence they know). Replicas hold adapters lazily: a replica
fetches an adapter's current version when a request first needs it (`fetch`, which records the
holding), so a publish of adapter X waits only for the replicas holding X (and, right after a
store restart, for those whose holdings it does not know yet) to acknowledge. That keeps
read-your-writes: a request admitted anywhere after a load/learn/rollback returned version v is
served with >= v. A replica that does not acknowledge within `ack_timeout_s` makes the publish
fail with PublishTimeoutError (HTTP 504) naming it; the version stays stored, and a retry with the
same idempotency key waits again without making another version.

Store-side state besides the registry lives in `<store_dir>/.state/`: the expected replicas, the
finished learn jobs, and the configuration last applied (`configure`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from collections import OrderedDict, deque
from pathlib import Path

import ray

from vlora.adapters.jobs import JobBook
from vlora.adapters.registry import NO_CHECK, AdapterRegistry
from vlora.adapters.durable import write_json_atomic
from vlora.adapters.replica_tracker import ReplicaTracker
from vlora.engine.config import LORA_TARGET_MODULES
from vlora.engine.lora import LoRAWeights, check_lora_fits
from vlora.engine.model import TextConfig

STORE_NAMESPACE = "vlora"
ACK_TIMEOUT_S = 60.0
STATE_DIR = ".state"  # not a valid adapter name (starts with a dot): the registry leaves it alone
MAX_CHANGES = 10000  # deltas kept for replicas' long-polls; one further behind gets a full snapshot
MAX_REFS = 64  # weights kept as Ray objects (LRU); dropped and deleted versions release theirs at once
LIVENESS_CHECK_S = 2.0  # a replica silent this long while a publish waits on it is checked for being alive


class PublishTimeoutError(RuntimeError):
    """Some replicas holding the adapter did not confirm the new version in time (HTTP 504). Not a
    TimeoutError: callers treat those as "the store did not answer", which is not what happened."""

    def __init__(self, name: str, version: int | None, lagging: list[str], timeout_s: float):
        self.name, self.version, self.lagging, self.timeout_s = name, version, lagging, timeout_s
        what = f"version {version} of adapter {name!r}" if version is not None else f"the deletion of {name!r}"
        super().__init__(
            f"{what} was stored, but Decoder replicas {', '.join(lagging)} did not confirm it within "
            f"{timeout_s:g} s, so they may still serve an older version; retry with the same Idempotency-Key "
            "to wait again (no second version is made)")

    def __reduce__(self):  # travels inside Ray's error wrapper to the Ingress
        return PublishTimeoutError, (self.name, self.version, self.lagging, self.timeout_s)


class StoreConfigError(ValueError):
    """A configuration the stored adapters do not fit (e.g. max_lora_rank below a stored rank)."""


def store_actor_name(store_dir: str) -> str:
    """One store per store directory (two apps on one cluster may use two stores)."""
    return "vlora-adapter-store-" + hashlib.sha256(os.path.abspath(store_dir).encode()).hexdigest()[:10]


def _actor_alive(actor_name: str | None) -> bool:
    if not actor_name:
        return True  # cannot tell: keep waiting for it
    namespace, _, name = actor_name.rpartition("/")
    try:
        ray.get_actor(name, namespace=namespace or None)
        return True
    except ValueError:
        return False


class AdapterStoreActor:
    """Async actor: registry mutations run in a thread, waiters wake on every change."""

    def __init__(self, store_dir: str, model_dir: str, max_lora_rank: int, retention: int = 5,
                 targets: tuple[str, ...] = LORA_TARGET_MODULES, ack_timeout_s: float = ACK_TIMEOUT_S,
                 job_ttl_s: float = 3600.0):
        self.state_dir = Path(store_dir) / STATE_DIR
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._model_dir, self._targets = model_dir, tuple(targets)
        saved = self._saved_config()  # what `configure` applied last wins over the constructor's args
        self.config = {"max_lora_rank": max_lora_rank, "retention": retention, "ack_timeout_s": ack_timeout_s,
                       "job_ttl_s": job_ttl_s, **saved}
        self.registry = AdapterRegistry(store_dir, retention=self.config["retention"], validate=self._validator())
        self.replicas = ReplicaTracker(self.state_dir)
        self.jobs = JobBook(self.state_dir, ttl_s=self.config["job_ttl_s"])
        self._refs: OrderedDict[tuple[str, int], ray.ObjectRef] = OrderedDict()
        self._changes: deque[tuple[int, str, int | None]] = deque(maxlen=MAX_CHANGES)
        self._log_start = self.registry.seq  # deltas are known after this sequence
        self._cond: asyncio.Condition | None = None

    # -- configuration ----------------------------------------------------------------------
    def _saved_config(self) -> dict:
        path = self.state_dir / "config.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def _validator(self):
        shapes = TextConfig.from_pretrained(self._model_dir).lora_module_shapes(self._targets)
        rank = self.config["max_lora_rank"]
        return lambda w: check_lora_fits(w, shapes, rank)

    async def configure(self, max_lora_rank: int, retention: int, ack_timeout_s: float = ACK_TIMEOUT_S,
                        job_ttl_s: float = 3600.0) -> dict:
        """Apply a (re)deployed app's settings, or refuse with StoreConfigError and change nothing.

        A smaller max_lora_rank is refused while stored adapters have a larger rank; a smaller
        retention applies from each adapter's next publish."""
        too_big = {n: v.rank for n, v in self.registry.list().items() if v.rank > max_lora_rank}
        if too_big:
            names = ", ".join(f"{n} (rank {r})" for n, r in sorted(too_big.items())[:10])
            raise StoreConfigError(
                f"max_lora_rank {max_lora_rank} is below the rank of stored adapters: {names}"
                f"{' ...' if len(too_big) > 10 else ''}; raise max_lora_rank or delete those adapters first")
        self.config.update(max_lora_rank=max_lora_rank, retention=retention, ack_timeout_s=ack_timeout_s,
                           job_ttl_s=job_ttl_s)
        self.registry.validate = self._validator()
        self.registry.retention = retention
        self.jobs.ttl_s = job_ttl_s
        write_json_atomic(self.state_dir / "config.json", self.config)
        return dict(self.config)

    # -- waiting ----------------------------------------------------------------------------
    def _condition(self) -> asyncio.Condition:
        if self._cond is None:
            self._cond = asyncio.Condition()
        return self._cond

    async def _changed(self) -> None:
        async with self._condition():
            self._condition().notify_all()

    async def _wait(self, timeout: float) -> None:
        async with self._condition():
            try:
                await asyncio.wait_for(self._condition().wait(), timeout=timeout)
            except asyncio.TimeoutError:
                pass

    def _drop_dead(self, waiting: list[str], min_silence: float) -> None:
        """Forget replicas that are gone (Serve replaced them): they serve nothing any more."""
        for rid in waiting:
            state = self.replicas.replicas.get(rid)
            if state is not None and self.replicas.silent_for(rid) >= min_silence and not _actor_alive(
                    state.actor_name):
                self.replicas.forget(rid)

    async def _await_replicas(self, name: str | None, version: int | None, seq: int) -> int:
        """Wait until every replica that could serve an older `name` acknowledged `seq`; returns how many
        replicas are in step. Raises PublishTimeoutError naming the ones still behind."""
        timeout = float(self.config["ack_timeout_s"])
        deadline = time.monotonic() + timeout
        next_check = time.monotonic() + LIVENESS_CHECK_S
        while True:
            waiting = self.replicas.waiting_for(name, seq)
            if not waiting:
                return len(self.replicas.replicas)
            now = time.monotonic()
            if now >= next_check or now >= deadline:
                self._drop_dead(waiting, 0.0 if now >= deadline else LIVENESS_CHECK_S)
                next_check = now + LIVENESS_CHECK_S
                waiting = self.replicas.waiting_for(name, seq)
                if not waiting:
                    continue
                if now >= deadline:
                    raise PublishTimeoutError(name or "?", version, waiting, timeout)
            await self._wait(min(0.25, max(0.01, deadline - now)))

    def _release_refs(self) -> None:
        """Drop the Ray objects of versions no longer retained (retention, delete) and beyond MAX_REFS."""
        for key in [k for k in self._refs if not self._retained(*k)]:
            del self._refs[key]
        while len(self._refs) > MAX_REFS:
            self._refs.popitem(last=False)

    def _retained(self, name: str, version: int) -> bool:
        try:
            return any(v.version == version for v in self.registry.versions(name))
        except KeyError:
            return False

    async def _mutate(self, name: str, fn, *args, **kwargs) -> dict:
        before = self.registry.seq
        info = await asyncio.to_thread(fn, *args, **kwargs)
        seq = self.registry.seq
        if seq != before:  # a replayed idempotent call changes nothing
            current = self.registry.list().get(name)
            self._changes.append((seq, name, current.version if current is not None else None))
            self._release_refs()
            await self._changed()
        out = info.to_dict() if hasattr(info, "to_dict") else dict(info or {})
        version = out.get("version")
        # A replay waits too: the first call may have timed out before every replica confirmed.
        out["replicas_synced"] = await self._await_replicas(name, version, self._seq_of(name, seq))
        return out

    def _seq_of(self, name: str, seq: int) -> int:
        """The sequence of the latest change to `name` (what the replicas must have applied)."""
        for s, n, _ in reversed(self._changes):
            if n == name:
                return s
        return min(seq, self._log_start)

    # -- mutations --------------------------------------------------------------------------
    async def publish(self, name: str, weights: LoRAWeights, lora_alpha: float, use_rslora: bool = False,
                      origin: str = "learned", parent_version: int | None = None, metrics: dict | None = None,
                      expect_current: int | None = NO_CHECK, idempotency_key: str | None = None) -> dict:
        return await self._mutate(name, self.registry.publish, name, weights, lora_alpha, use_rslora, origin,
                                  parent_version, None, metrics, expect_current, idempotency_key)

    async def publish_many(self, items: list[dict]) -> list[dict]:
        """Register many adapters in one manifest write (bulk loads, tests); each waits like a publish."""
        before = self.registry.seq
        infos = await asyncio.to_thread(self.registry.publish_many, items)
        for i, info in enumerate(infos):
            self._changes.append((before + i + 1, info.name, info.version))
        self._release_refs()
        await self._changed()
        synced = await self._await_replicas(None, None, self.registry.seq) if any(
            self.replicas.holders(i.name) for i in infos) else len(self.replicas.replicas)
        return [{**i.to_dict(), "replicas_synced": synced} for i in infos]

    async def load_folder(self, name: str, folder: str, allowed_dirs: list[str] | None = None,
                          max_file_bytes: int = 2 * 2**30, idempotency_key: str | None = None) -> dict:
        """Publish a PEFT folder; the allow-list check and the read both happen here, where the files are read."""
        return await self._mutate(name, self.registry.load_folder, name, folder, allowed_dirs, max_file_bytes,
                                  idempotency_key)

    async def load_files(self, name: str, files: dict[str, bytes | None], source: str,
                         unless_current: bool = False) -> dict:
        """Publish a PEFT adapter read elsewhere: the start-up `adapters:` of the config, which the
        application builder reads (operator-named sources, not subject to adapter_load_dirs)."""
        return await self._mutate(name, self.registry.load_files, name, files, source, unless_current)

    async def rollback(self, name: str, to_version: int | None = None, idempotency_key: str | None = None) -> dict:
        return await self._mutate(name, self.registry.rollback, name, to_version, idempotency_key)

    async def delete(self, name: str, idempotency_key: str | None = None) -> dict:
        return await self._mutate(name, self.registry.delete, name, idempotency_key)

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
            self._release_refs()
        self._refs.move_to_end(key)
        return [self._refs[key]]

    async def fetch(self, replica_id: str, actor_name: str | None, name: str) -> dict:
        """A replica's on-demand fetch of `name`'s current version; records that it holds it from now on.

        Returns {"version", "token" (to release it with), "ref": [weights ref], "held_elsewhere": whether
        another replica held it (an affinity miss)}; AdapterNotFoundError for an unknown adapter."""
        info = self.registry.current(name)
        elsewhere = any(r != replica_id for r in self.replicas.holders(name))
        token = self.replicas.fetched(replica_id, actor_name, name)
        ref = await self.get_weights(name, info.version)
        return {"version": info.version, "token": token, "ref": ref, "held_elsewhere": elsewhere}

    # -- replicas ---------------------------------------------------------------------------
    async def register_replica(self, replica_id: str, actor_name: str | None, holds: dict[str, str]) -> dict:
        """A replica starting, or re-registering with its current holdings once it sees a restarted
        store; returns {"seq", "epoch"}."""
        state = self.replicas.register(replica_id, actor_name)
        state.known = False
        self.replicas.register(replica_id, actor_name, holds)
        return {"seq": self.registry.seq, "epoch": self.replicas.epoch}

    async def wait_for_change(self, replica_id: str, actor_name: str | None, known_seq: int,
                              holds: dict[str, str], timeout: float = 10.0, epoch: str | None = None) -> dict:
        """Long-poll: once the sequence passes `known_seq` (or after `timeout`) return
        {"seq", "epoch", "changes": [(seq, name, version or None = deleted)]} with the changes after
        known_seq, or {"seq", "epoch", "snapshot": {name: version}} when they are no longer all known.

        `holds` counts only from a replica that knows this store instance (`epoch`): Ray re-sends a
        call made to a store that died with its old arguments, whose holdings may be stale, so a
        replica meeting a new epoch re-registers (`register_replica`) before it acknowledges."""
        self.replicas.register(replica_id, actor_name, holds if epoch == self.replicas.epoch else None)
        deadline = time.monotonic() + timeout
        while self.registry.seq == known_seq and time.monotonic() < deadline:
            await self._wait(max(0.0, deadline - time.monotonic()))
            self.replicas.register(replica_id, actor_name)
        seq = self.registry.seq
        if known_seq < self._log_start or (self._changes and known_seq < self._changes[0][0] - 1):
            _, snap = await self.snapshot()
            return {"seq": seq, "epoch": self.replicas.epoch, "snapshot": snap}
        return {"seq": seq, "epoch": self.replicas.epoch,
                "changes": [c for c in self._changes if c[0] > known_seq]}

    async def ack(self, replica_id: str, seq: int, released: list[tuple[str, str]] = ()) -> None:
        self.replicas.ack(replica_id, seq, released)
        await self._changed()

    async def release(self, replica_id: str, released: list[tuple[str, str]]) -> None:
        self.replicas.ack(replica_id, -1, released)

    async def forget_replica(self, replica_id: str) -> None:
        self.replicas.forget(replica_id)
        await self._changed()

    async def replica_states(self) -> dict[str, dict]:
        """What the store knows of each replica (operators, tests)."""
        return {r: {"actor": s.actor_name, "acked": s.acked, "known": s.known, "holds": sorted(s.holds)}
                for r, s in self.replicas.replicas.items()}

    # -- learn jobs -------------------------------------------------------------------------
    async def put_job(self, view: dict) -> None:
        self.jobs.put(view)

    async def get_job(self, job_id: str) -> dict | None:
        return self.jobs.get(job_id)

    async def ready(self) -> bool:
        return True


# NOTE: max_task_retries=-1 re-sends a call the dying actor did not answer; mutations are safe to
# re-run because every caller sends an idempotency key (the retry replays the recorded result).
AdapterStore = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1, max_concurrency=1000)(AdapterStoreActor)


def get_or_create_store(store_dir: str, model_dir: str, max_lora_rank: int, retention: int = 5,
                        ack_timeout_s: float = ACK_TIMEOUT_S, job_ttl_s: float = 3600.0):
    """The store actor for `store_dir`, started (detached, restartable) if it is not running yet, and
    configured with these settings (StoreConfigError if the stored adapters do not fit them)."""
    store = AdapterStore.options(name=store_actor_name(store_dir), namespace=STORE_NAMESPACE, lifetime="detached",
                                 get_if_exists=True).remote(store_dir, model_dir, max_lora_rank, retention,
                                                            LORA_TARGET_MODULES, ack_timeout_s, job_ttl_s)
    ray.get(store.configure.remote(max_lora_rank, retention, ack_timeout_s, job_ttl_s))
    return store


def get_store(store_dir: str):
    return ray.get_actor(store_actor_name(store_dir), namespace=STORE_NAMESPACE)
