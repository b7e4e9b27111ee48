"""The API port's /metrics: every live replica's vLLM-named metrics, gathered in one small actor.

Each replica pushes its local snapshot (deployments/metrics.py `api_snapshot`) every
API_PUSH_INTERVAL_S; the Ingress asks the hub for all of them and renders one Prometheus text page,
each sample labelled with its `deployment` and `replica`. A replica that has not pushed for
API_STALE_S (it died, or Serve removed it) is dropped, so no series of a dead replica is served.
"""

from __future__ import annotations

import time

import ray

from vlora.deployments.metrics import API_STALE_S

HUB_NAMESPACE = "vlora"


class MetricsHub:
    def __init__(self, stale_s: float = API_STALE_S):
        self.stale_s = stale_s
        self._snaps: dict[str, tuple[float, str, list]] = {}  # replica -> (pushed at, deployment, families)

    def push(self, replica: str, deployment: str, families: list) -> None:
        self._snaps[replica] = (time.monotonic(), deployment, families)

    def forget(self, replica: str) -> None:
        self._snaps.pop(replica, None)

    def snapshots(self) -> list[tuple[str, str, list]]:
        """(deployment, replica, families) of every replica heard from within stale_s; older ones are dropped."""
        now = time.monotonic()
        for r in [r for r, (t, _, _) in self._snaps.items() if now - t > self.stale_s]:
            del self._snaps[r]
        return [(d, r, f) for r, (_, d, f) in sorted(self._snaps.items())]


def hub_name(app_name: str) -> str:
    return f"vlora-metrics-{app_name}"


_HubActor = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(MetricsHub)


def get_hub(app_name: str):
    """The app's hub (detached, restartable: a restarted one is full again after one push interval)."""
    return _HubActor.options(name=hub_name(app_name), namespace=HUB_NAMESPACE, lifetime="detached",
                             get_if_exists=True).remote()


def render(snapshots: list[tuple[str, str, list]]) -> bytes:
    """Prometheus text format of all snapshots: one HELP/TYPE per metric, samples labelled by replica."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.metrics_core import Metric

    merged: dict[str, Metric] = {}
    for deployment, replica, families in snapshots:
        for name, typ, doc, samples in families:
            fam = merged.get(name)
            if fam is None:
                fam = merged[name] = Metric(name, doc, typ)
            for sample, labels, value in samples:
                fam.add_sample(sample, {**labels, "deployment": deployment, "replica": replica}, value)

    class _Collector:
        def collect(self):
            return list(merged.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector())
    return generate_latest(registry)
