"""/health: every replica of every deployment, from Serve's controller, plus one readiness probe each.

A handle call reaches one replica only, so a dead replica could hide behind a healthy one; the
controller's view counts every replica by state (it runs each replica's `check_health`).
"""

from __future__ import annotations

import asyncio

from vlora.deployments.metrics import get_logger

log = get_logger("vlora.health")
PROBE_TIMEOUT_S = 10.0


def _replica_states(app_name: str) -> dict[str, dict]:
    """{deployment name: {"status": ..., "replicas": {state: count}}} for one application (blocking)."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is None:
        return {}
    return {name: {"status": str(getattr(d.status, "value", d.status)),
                   "replicas": {str(getattr(s, "value", s)): n for s, n in d.replica_states.items()},
                   "message": d.message}
            for name, d in app.deployments.items()}


async def probe(handle) -> str:
    """'ready', 'not ready' or 'unavailable: <error>' from one replica's ready()."""
    try:  # a replica that hangs counts as unavailable rather than hanging the probe
        return "ready" if await asyncio.wait_for(handle.ready.remote(), PROBE_TIMEOUT_S) else "not ready"
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        return f"unavailable: {type(exc).__name__}"


async def health_report(app_name: str, handles: dict[str, object], targets: dict[str, tuple[str, int]]) -> dict:
    """The /health body. `handles`: our name -> deployment handle; `targets`: our name -> (Serve
    deployment name, replicas it should run). Healthy when every probe answers ready and every
    deployment runs all its replicas."""
    probes = await asyncio.gather(*(probe(h) for h in handles.values()))
    deployments = dict(zip(handles, probes))
    try:
        states = await asyncio.wait_for(asyncio.to_thread(_replica_states, app_name), PROBE_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - the controller's view is extra; its absence is reported
        log.warning("reading Serve's replica states failed", exc_info=True)
        states, error = None, f"unavailable: {type(exc).__name__}"
    replicas = {}
    for ours, (serve_name, target) in targets.items():
        if states is None:
            replicas[ours] = {"target": target, "running": None, "status": error}
            continue
        d = states.get(serve_name, {"status": "missing", "replicas": {}, "message": ""})
        running = d["replicas"].get("RUNNING", 0)
        replicas[ours] = {"target": target, "running": running, "status": d["status"], "states": d["replicas"]}
        if d["message"] and running < target:
            replicas[ours]["message"] = d["message"]
    ok = all(v == "ready" for v in deployments.values()) and all(
        r["running"] is not None and r["running"] >= r["target"] and r["status"] == "HEALTHY"
        for r in replicas.values())
    return {"status": "ok" if ok else "degraded", "deployments": deployments, "replicas": replicas}
