"""What the AdapterStore knows about the Decoder replicas: who is expected, what each holds, what each acked.

Read-your-writes with lazy residency: a publish of adapter X at change sequence `seq` must wait
only for replicas that could still serve an older X, i.e. those that hold a host copy of X, plus
those whose holdings the store does not know yet (after a store restart, until the replica's
first poll). Every other replica fetches X's current version when a request first needs it.

Holdings are reported with tokens: `fetch` hands out a fresh token per (replica, adapter) and a
replica releases an adapter by naming the token it got, so a release that arrives after a
re-fetch of the same adapter cannot erase the newer holding.

The expected set (replica id -> Serve actor name) is persisted in `state_dir`, so a restarted
store still waits for every replica. Pure Python: the actor in adapters/store.py wraps it.
"""

from __future__ import annotations

import itertools
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from vlora.adapters.durable import write_json_atomic


@dataclass(slots=True)
class ReplicaState:
    actor_name: str | None
    acked: int = -1  # the change sequence this replica has applied
    known: bool = False  # holdings reported since this store started
    holds: dict[str, str] = field(default_factory=dict)  # adapter -> token of its fetch
    seen: float = 0.0  # monotonic time of its last call


class ReplicaTracker:
    def __init__(self, state_dir: str | os.PathLike | None, clock=time.monotonic):
        self.path = Path(state_dir) / "replicas.json" if state_dir is not None else None
        self.clock = clock
        self.epoch = uuid.uuid4().hex[:8]  # tokens of this store instance never match an older one's
        self._tokens = itertools.count(1)
        self.replicas: dict[str, ReplicaState] = {}
        if self.path is not None and self.path.exists():
            for rid, actor in json.loads(self.path.read_text()).items():
                self.replicas[rid] = ReplicaState(actor)

    def _persist(self) -> None:
        if self.path is not None:
            write_json_atomic(self.path, {r: s.actor_name for r, s in self.replicas.items()})

    def register(self, replica_id: str, actor_name: str | None, holds: dict[str, str] | None = None) -> ReplicaState:
        """A replica's call: remembered (persisted) as expected; `holds` (its own account of what it holds)
        is merged in, never replacing holdings registered by a fetch it made meanwhile."""
        s = self.replicas.get(replica_id)
        if s is None:
            s = self.replicas[replica_id] = ReplicaState(actor_name)
            self._persist()
        elif actor_name and s.actor_name != actor_name:
            s.actor_name = actor_name
            self._persist()
        if holds is not None and not s.known:
            s.holds.update(holds)
            s.known = True
        s.seen = self.clock()
        return s

    def forget(self, replica_id: str) -> None:
        if self.replicas.pop(replica_id, None) is not None:
            self._persist()

    def fetched(self, replica_id: str, actor_name: str | None, name: str) -> str:
        """Record that the replica now holds `name`; returns the token it releases it with."""
        s = self.register(replica_id, actor_name)
        token = f"{self.epoch}:{next(self._tokens)}"
        s.holds[name] = token
        return token

    def ack(self, replica_id: str, seq: int, released: list[tuple[str, str]] = ()) -> None:
        s = self.register(replica_id, None)
        s.acked = max(s.acked, seq)
        for name, token in released:
            if s.holds.get(name) == token:
                del s.holds[name]

    def waiting_for(self, name: str | None, seq: int) -> list[str]:
        """Replicas that must still ack `seq` before a change to `name` (None: any adapter) is served
        everywhere: those holding it and those whose holdings are unknown."""
        return sorted(r for r, s in self.replicas.items()
                      if s.acked < seq and (not s.known or name is None or name in s.holds))

    def holders(self, name: str) -> list[str]:
        return sorted(r for r, s in self.replicas.items() if name in s.holds)

    def silent_for(self, replica_id: str) -> float:
        s = self.replicas.get(replica_id)
        return float("inf") if s is None or s.seen == 0.0 else self.clock() - s.seen
