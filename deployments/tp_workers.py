"""Ranks 1..N-1 of a tensor-parallel Decoder replica: one Ray actor each, started by the replica.

The replica (rank 0) owns its workers: they sit in the replica's placement group (the
deployment's `placement_group_bundles`, STRICT_PACK, bundle i for rank i) and die with it. Each
actor runs engine/tp_worker.run_worker until rank 0 says stop. A worker whose loop fails exits
its process, which closes its connections, so rank 0's next collective fails at once (its
requests get a 503, the engine reports unhealthy) instead of waiting out a timeout; `check`
makes Serve's health probe fail as soon as any worker's loop has ended, even while idle.
"""

from __future__ import annotations

import os

import ray

from vlora.deployments.metrics import get_logger
from vlora.engine.config import EngineConfig
from vlora.engine.tp import TPSpec, free_port

log = get_logger("vlora.tp")


@ray.remote(max_concurrency=2)  # `run` holds one thread for the worker's life; `ping` answers on the other
class TPWorker:
    def run(self, config: EngineConfig, spec: TPSpec) -> int:
        from vlora.engine.tp_worker import run_worker

        try:
            return run_worker(config, spec)
        except BaseException:  # noqa: BLE001 - the group is broken: leave, closing the connections
            log.exception("tensor-parallel rank %d failed; exiting so rank 0 sees it at once", spec.rank)
            os._exit(1)

    def ping(self) -> int:
        return os.getpid()


class TPWorkers:
    """Start ranks 1..tp-1 beside this replica; `spec` is rank 0's (for LLMEngine(config, tp=spec))."""

    def __init__(self, config: EngineConfig, tp_size: int, timeout_s: float = 120.0):
        from ray.util.placement_group import get_current_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        host = ray.util.get_node_ip_address()
        self.spec = TPSpec(rank=0, world_size=tp_size, master_addr=host, master_port=free_port(host),
                           timeout_s=timeout_s)
        # Rank i takes bundle i of the replica's placement group (its CPUs and its GPU); outside one,
        # what this replica holds.
        pg = get_current_placement_group()
        held = ray.get_runtime_context().get_assigned_resources()
        self.actors, self._runs = [], []
        for rank in range(1, tp_size):
            res = pg.bundle_specs[rank] if pg is not None else held
            o = {"num_cpus": res.get("CPU", 0), "num_gpus": res.get("GPU", 0)}
            if pg is not None:
                o["scheduling_strategy"] = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank)
            actor = TPWorker.options(**o).remote()
            self.actors.append(actor)
            self._runs.append(actor.run.remote(config, self.spec.for_rank(rank)))

    def check(self) -> None:
        """Raise, naming the rank, if any worker's loop has ended (its process died or its group broke)."""
        done, _ = ray.wait(self._runs, num_returns=len(self._runs), timeout=0)
        for ref in done:
            rank = self._runs.index(ref) + 1
            try:
                ray.get(ref)
                why = "stopped"
            except Exception as exc:  # noqa: BLE001 - reported below
                why = f"died ({type(exc).__name__})"
            raise RuntimeError(f"tensor-parallel worker rank {rank} of this Decoder replica {why}")

    @property
    def alive(self) -> bool:
        try:
            self.check()
        except RuntimeError:
            return False
        return True

    def kill(self, rank: int) -> None:
        """Fault drill: end rank `rank`'s process now, as an OOM kill would."""
        ray.kill(self.actors[rank - 1], no_restart=True)

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
