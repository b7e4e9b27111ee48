"""The AdapterStore's publish path, in process (no Ray cluster): who a publish waits for, ack timeouts,
a restarted store, changed config, learn-job records, and the affinity ranking of the Decoder router."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

import vlora.adapters.store as store_mod
from vlora.adapters.jobs import JobBook, new_job_id
from vlora.adapters.registry import AdapterConflictError
from vlora.adapters.replica_tracker import ReplicaTracker
from vlora.adapters.store import AdapterStoreActor, PublishTimeoutError, StoreConfigError
from vlora.deployments.errors import to_api_error
from vlora.deployments.routing import rank_by_affinity
from vlora.engine.lora import LoRAWeights
from vlora.engine.model import TextConfig


@pytest.fixture(autouse=True)
def no_object_store(monkeypatch):
    monkeypatch.setattr(store_mod.ray, "put", lambda x: x)


def lora(tiny_model_dir, seed: int, r: int = 2) -> LoRAWeights:
    import torch

    shapes = TextConfig.from_pretrained(tiny_model_dir).lora_module_shapes(("q_proj",))
    g = torch.Generator().manual_seed(seed)
    w = {k: (torch.randn(r, i, generator=g), torch.randn(o, r, generator=g)) for k, (i, o) in shapes.items()}
    return LoRAWeights(rank=r, scaling=1.0, weights=w)


def run(coro):
    return asyncio.run(coro)


async def replica_loop(store, rid: str, held: dict, stop: asyncio.Event, known: int = -1):
    """A well-behaved replica: long-polls and acks every change at once."""
    seq, epoch = known, None
    while not stop.is_set():
        reply = await store.wait_for_change(rid, None, seq, held, timeout=0.05, epoch=epoch)
        if reply["epoch"] != epoch:  # a store it has not registered with yet: report what it holds
            await store.register_replica(rid, None, held)
            epoch = reply["epoch"]
        seq = reply["seq"]
        await store.ack(rid, seq, [])


def test_publish_waits_only_for_replicas_holding_the_adapter(tmp_path, tiny_model_dir):
    async def main():
        s = AdapterStoreActor(str(tmp_path), tiny_model_dir, 16, ack_timeout_s=0.5)
        await s.publish("x", lora(tiny_model_dir, 1), 2.0)
        await s.publish("y", lora(tiny_model_dir, 2), 2.0)
        for rid in ("r1", "r2"):
            await s.register_replica(rid, None, {})
        got = await s.fetch("r2", None, "x")
        assert got["version"] == 1 and got["ref"][0].rank == 2
        # r1 never acks anything: a publish of y (held by nobody) does not wait for it...
        await s.ack("r2", s.registry.seq)
        out = await s.publish("y", lora(tiny_model_dir, 3), 2.0)
        assert out["version"] == 2 and out["replicas_synced"] == 2
        # ...a publish of x waits for r2, which holds x, and answers once r2 acks
        stop = asyncio.Event()
        loop2 = asyncio.create_task(replica_loop(s, "r2", {"x": got["token"]}, stop, s.registry.seq))
        out = await s.publish("x", lora(tiny_model_dir, 4), 2.0)
        assert out["version"] == 2
        stop.set()
        await loop2
        # r2 stops acking: the next publish of x times out naming r2 (never a silent success)
        with pytest.raises(PublishTimeoutError) as e:
            await s.publish("x", lora(tiny_model_dir, 5), 2.0, idempotency_key="k1")
        assert e.value.lagging == ["r2"] and "r2" in str(e.value) and "version 3" in str(e.value)
        api = to_api_error(e.value)
        assert api.status == 504 and "did not confirm it within 0.5 s" in api.message
        # released: r2 no longer holds x, so the retry (same key) returns the same version at once
        await s.ack("r2", s.registry.seq - 1, [("x", got["token"])])
        out = await s.publish("x", lora(tiny_model_dir, 6), 2.0, idempotency_key="k1")
        assert out["version"] == 3 and [v["version"] for v in await s.versions("x")] == [1, 2, 3]

    run(main())


def test_a_restarted_store_waits_for_every_replica_it_expects(tmp_path, tiny_model_dir):
    async def main():
        s = AdapterStoreActor(str(tmp_path), tiny_model_dir, 16, ack_timeout_s=0.3)
        await s.publish("x", lora(tiny_model_dir, 1), 2.0)
        for rid in ("r1", "r2"):
            await s.register_replica(rid, None, {})
        # the store restarts: its replicas' holdings are unknown until each reports them
        s2 = AdapterStoreActor(str(tmp_path), tiny_model_dir, 16, ack_timeout_s=0.3)
        with pytest.raises(PublishTimeoutError) as e:
            await s2.publish("x", lora(tiny_model_dir, 2), 2.0)
        assert e.value.lagging == ["r1", "r2"]
        stop = asyncio.Event()
        loops = [asyncio.create_task(replica_loop(s2, r, {}, stop)) for r in ("r1", "r2")]
        out = await s2.publish("x", lora(tiny_model_dir, 3), 2.0)
        assert out["version"] == 3 and out["replicas_synced"] == 2
        stop.set()
        await asyncio.gather(*loops)
        # holdings now known (nothing held): a publish no longer waits for either
        out = await s2.publish("x", lora(tiny_model_dir, 4), 2.0)
        assert out["version"] == 4

    run(main())


def test_long_poll_returns_deltas_or_a_snapshot(tmp_path, tiny_model_dir):
    async def main():
        s = AdapterStoreActor(str(tmp_path), tiny_model_dir, 16, ack_timeout_s=0.3)
        await s.register_replica("r", None, {})
        await s.ack("r", 0)
        await s.publish("a", lora(tiny_model_dir, 1), 2.0)
        await s.publish("b", lora(tiny_model_dir, 2), 2.0)
        await s.delete("a")
        reply = await s.wait_for_change("r", None, 1, {}, timeout=0.01)
        assert reply["seq"] == 3 and reply["changes"] == [(2, "b", 1), (3, "a", None)]
        s2 = AdapterStoreActor(str(tmp_path), tiny_model_dir, 16, ack_timeout_s=0.3)  # restarted
        reply = await s2.wait_for_change("r", None, 1, {}, timeout=0.01)  # changes before it are unknown
        assert reply["snapshot"] == {"b": 1} and reply["epoch"] != s.replicas.epoch
        got = await s2.fetch("r", None, "b")
        await s2.register_replica("r", None, {})  # the replica reports to the new store instance
        assert list(s2._refs) == [("b", 1)]
        await s2.ack("r", 3, [("b", got["token"])])
        await s2.delete("b")  # the store's Ray objects of deleted versions are released
        assert s2._refs == {}

    run(main())


def test_changed_config_applies_or_refuses_clearly(tmp_path, tiny_model_dir):
    async def main():
        s = AdapterStoreActor(str(tmp_path), tiny_model_dir, 16, retention=5)
        await s.publish("r8", lora(tiny_model_dir, 1, r=8), 8.0)
        with pytest.raises(StoreConfigError, match=r"max_lora_rank 4 is below the rank of stored adapters: r8 "
                                                   r"\(rank 8\); raise max_lora_rank or delete"):
            await s.configure(4, 5)
        cfg = await s.configure(8, 2, ack_timeout_s=7.0)
        assert cfg["retention"] == 2 and cfg["max_lora_rank"] == 8
        for i in range(3):
            await s.publish("r8", lora(tiny_model_dir, i, r=8), 8.0)
        assert [v["version"] for v in await s.versions("r8")] == [3, 4]
        # a restart (Ray re-runs the constructor with its first arguments) keeps the applied config
        s2 = AdapterStoreActor(str(tmp_path), tiny_model_dir, 16, retention=5)
        assert s2.config["retention"] == 2 and s2.config["ack_timeout_s"] == 7.0 and s2.registry.retention == 2

    run(main())


def test_learn_compare_and_set_is_409(tmp_path, tiny_model_dir):
    async def main():
        s = AdapterStoreActor(str(tmp_path), tiny_model_dir, 16)
        await s.publish("a", lora(tiny_model_dir, 1), 2.0)
        await s.publish("a", lora(tiny_model_dir, 2), 2.0)
        await s.rollback("a", 1)  # v3, while a learn that started from v2 trains
        with pytest.raises(AdapterConflictError) as e:
            await s.publish("a", lora(tiny_model_dir, 3), 2.0, expect_current=2)
        assert to_api_error(e.value).status == 409

    run(main())


def test_job_ids_are_unique_and_finished_jobs_expire(tmp_path):
    ids = {new_job_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(i.startswith("job-") and len(i) == 20 for i in ids)
    now = [1000.0]
    book = JobBook(tmp_path, ttl_s=60, clock=lambda: now[0])
    book.put({"id": "job-a", "adapter": "x", "status": "succeeded"})
    assert JobBook(tmp_path, ttl_s=60, clock=lambda: now[0]).get("job-a")["adapter"] == "x"  # kept across restarts
    now[0] += 61
    assert book.get("job-a") is None and JobBook(tmp_path, ttl_s=60, clock=lambda: now[0]).get("job-a") is None
    with pytest.raises(ValueError, match="only finished jobs"):
        book.put({"id": "job-b", "adapter": "x", "status": "running"})


def test_tracker_tokens_keep_a_refetch_across_a_late_release(tmp_path):
    t = ReplicaTracker(tmp_path)
    t.register("r", "serve/replica-r", {})
    t1 = t.fetched("r", None, "x")
    t.ack("r", 1, [])
    t2 = t.fetched("r", None, "x")  # evicted and fetched again before the release of t1 arrived
    t.ack("r", 2, [("x", t1)])
    assert t.holders("x") == ["r"]
    t.ack("r", 3, [("x", t2)])
    assert t.holders("x") == [] and t.waiting_for("x", 4) == []
    assert ReplicaTracker(tmp_path).replicas["r"].actor_name == "serve/replica-r"  # persisted


def _replica(name, models):
    return SimpleNamespace(name=name, multiplexed_model_ids=set(models))


def test_affinity_ranking_prefers_holders_until_they_are_loaded():
    a, b = _replica("a", {"x"}), _replica("b", set())
    load = {"a": 0, "b": 0}
    ranks = rank_by_affinity([a, b], "x", lambda r: load[r.name])
    assert ranks == [[a], [b]]
    load["a"] = 3  # a holder a little deeper than the other replica keeps its affinity
    assert rank_by_affinity([a, b], "x", lambda r: load[r.name]) == [[a], [b]]
    load["a"] = 5  # 5 requests deeper (past spill_slack 4): the adapter spreads
    assert rank_by_affinity([a, b], "x", lambda r: load[r.name]) == [[b], [a]]
    # base: every replica, ties broken at random
    firsts = {rank_by_affinity([a, b], "", lambda r: 0)[0][0].name for _ in range(50)}
    assert [sorted(r.name for r in rank) for rank in rank_by_affinity([a, b], "", lambda r: 0)] == [["a", "b"]]
    assert firsts == {"a", "b"}
    # held nowhere: a fixed home replica per adapter (the same in every router), the adapters split between them
    c = _replica("c", set())
    homes = {m: rank_by_affinity([b, c], m, lambda r: 0)[0][0].name for m in (f"cold-{i}" for i in range(40))}
    assert all(rank_by_affinity([c, b], m, lambda r: 0)[0][0].name == h for m, h in homes.items())
    assert 10 <= sum(h == "b" for h in homes.values()) <= 30
    home = homes["cold-0"]
    load.update(b=0, c=0)
    load[home] = 5  # a busy home: the cold adapter goes elsewhere
    assert rank_by_affinity([b, c], "cold-0", lambda r: load[r.name])[0][0].name != home
