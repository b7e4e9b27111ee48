"""Learn-job records kept with the AdapterStore: ids unique across restarts, finished jobs expire.

A job id is `job-` + 16 random hex digits, so a restarted Trainer (or store) never hands out an
id that an old client may still hold. Finished jobs are written to `state_dir/jobs.json` and
kept `ttl_s` seconds after they finished; an expired or never-issued id reads as missing (404).
Pure Python: the AdapterStore actor wraps it.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path

from vlora.adapters.durable import write_json_atomic

FINISHED = ("succeeded", "failed")


def new_job_id() -> str:
    return f"job-{secrets.token_hex(8)}"


class JobBook:
    def __init__(self, state_dir: str | os.PathLike | None, ttl_s: float = 3600.0, max_jobs: int = 10000,
                 clock=time.time):
        self.path = Path(state_dir) / "jobs.json" if state_dir is not None else None
        self.ttl_s = ttl_s
        self.max_jobs = max_jobs
        self.clock = clock
        self.jobs: dict[str, dict] = {}
        if self.path is not None and self.path.exists():
            self.jobs = json.loads(self.path.read_text())
        self._expire()

    def put(self, view: dict) -> None:
        """Keep a finished job's view (its `finished` time starts its expiry)."""
        if view.get("status") not in FINISHED:
            raise ValueError(f"only finished jobs are kept, got status {view.get('status')!r}")
        view = dict(view)
        view.setdefault("finished", self.clock())
        self.jobs[view["id"]] = view
        self._expire()
        while len(self.jobs) > self.max_jobs:
            del self.jobs[min(self.jobs, key=lambda j: self.jobs[j]["finished"])]
        self._persist()

    def get(self, job_id: str) -> dict | None:
        if self._expire():
            self._persist()
        return self.jobs.get(job_id)

    def _expire(self) -> bool:
        now = self.clock()
        old = [j for j, v in self.jobs.items() if now - v["finished"] > self.ttl_s]
        for j in old:
            del self.jobs[j]
        return bool(old)

    def _persist(self) -> None:
        if self.path is not None:
            write_json_atomic(self.path, self.jobs)
