"""Adapter-affinity routing for the Decoder: requests for adapter X prefer replicas holding X.

The Ingress tags each adapter request with `multiplexed_model_id=X`; each Decoder replica reports
the adapters it holds host copies of (`push_held_adapters`, the same channel Serve's
`@serve.multiplexed` uses), and the router below (a Serve `RequestRouter`, installed through the
Decoder's `request_router_config`) ranks replicas for each request:

* X held somewhere: the holders first (the least loaded of them), unless the least loaded holder
  has `spill_slack` more requests in flight than the least loaded replica without X (or more than
  `spill_ratio` x the mean): then the others first, so X spreads to another replica. Serve's own
  multiplex routing keeps sending a hot model to the replica that has it until that replica's
  queue is full (ray-project/ray#65691); here load decides before the queue fills.
* X held nowhere: its home replica first (rendezvous hashing of X over the replica ids, the same in
  every router), under the same load guard. Concurrent first requests for X then meet on one
  replica instead of fetching X twice, and X comes back to the same replica after an eviction,
  so the replicas' host copies partition the adapters rather than duplicate them.
* Base-model requests: every replica, least loaded first.

Why not `@serve.multiplexed`: it owns loading and an LRU by model count; our residency is bounded
by bytes, refreshes on publish and pins models of running requests (adapters/residency.py).
"""

from __future__ import annotations

import hashlib
import logging
import random
from typing import List, Optional

from ray.serve.request_router import FIFOMixin, MultiplexMixin, PendingRequest, RequestRouter, RunningReplica

log = logging.getLogger("ray.serve.vlora.routing")


class AdapterAffinityRouter(FIFOMixin, MultiplexMixin, RequestRouter):
    def initialize_state(self, spill_slack: int = 4, spill_ratio: float = 1.0, **kwargs) -> None:
        self.spill_slack = spill_slack
        self.spill_ratio = spill_ratio

    def _load(self, r: RunningReplica) -> int:
        return self.replica_queue_len_cache.get(r.replica_id) or 0

    async def choose_replicas(self, candidate_replicas: List[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> List[List[RunningReplica]]:
        model = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        return rank_by_affinity(candidate_replicas, model, self._load, getattr(self, "spill_slack", 4),
                                getattr(self, "spill_ratio", 1.0))


def rank_by_affinity(replicas: list, model: str, load, spill_slack: int = 4, spill_ratio: float = 1.0) -> list[list]:
    """The ranking above, on anything with `multiplexed_model_ids` (pure, for unit tests). Within a
    rank Serve takes the least loaded replica, the first one on a tie: each rank is shuffled so ties
    spread."""
    replicas = random.sample(list(replicas), len(replicas))
    if not model or len(replicas) <= 1:
        return [replicas]
    holders = [r for r in replicas if model in r.multiplexed_model_ids]
    others = [r for r in replicas if model not in r.multiplexed_model_ids]
    if not others:
        return [replicas]
    if not holders:  # cold: the home replica is the preferred "holder"
        home = max(replicas, key=lambda r: _score(model, r))
        holders, others = [home], [r for r in replicas if r is not home]
    loads = {id(r): load(r) for r in replicas}
    mean = sum(loads.values()) / len(replicas)
    best_holder = min(loads[id(r)] for r in holders)
    best_other = min(loads[id(r)] for r in others)
    if best_holder > best_other + max(spill_slack, spill_ratio * mean):
        return [others, holders]
    return [holders, others]


def _score(model: str, replica) -> int:
    rid = getattr(replica, "replica_id", None)
    key = getattr(rid, "unique_id", None) or getattr(replica, "name", None) or str(rid)
    return int.from_bytes(hashlib.blake2b(f"{model}|{key}".encode(), digest_size=8).digest(), "big")


def push_held_adapters(names: list[str]) -> bool:
    """Tell Serve's controller which adapters this replica holds (routers learn it by long-poll)."""
    try:
        from ray.serve._private.common import RequestRoutingInfo
        from ray.serve.context import _get_global_client, _get_internal_replica_context

        ctx = _get_internal_replica_context()
        if ctx is None:
            return False
        _get_global_client().record_request_routing_info(
            RequestRoutingInfo(replica_id=ctx.replica_id, multiplexed_model_ids=sorted(names)))
        return True
    except Exception:  # noqa: BLE001 - routing then just loses affinity; serving goes on
        log.warning("reporting held adapters to Serve failed", exc_info=True)
        return False
