"""One Ray + Serve instance for the whole test session, with the app deployed on the tiny model.

Two applications share it: `vlora` (2 Decoder replicas x 2 tensor-parallel ranks, max_loras 8,
host copies of adapters bounded to ~32 small adapters per replica, API and admin keys on) for the
behaviour tests, and `overload` (1 tiny Decoder with a queue of one, no admin keys) for the 503,
closed-admin and engine-fault tests. Ray starts with the cluster environment `make serve` uses
(`cluster_env`: Serve's HAProxy ingress in front of the Ingress replicas).
"""

from __future__ import annotations

import os

import pytest

API_KEY = "test-key"
ADMIN_KEY = "admin-key"
METRICS_INTERVAL_MS = 1000  # replicas export their metrics every second (Ray's default: 10 s)
# The many-adapters test (test_many_adapters.py) registers rank-2 adapters on all 7 modules of the tiny
# model (4 layers): 37,376 bytes each in fp32. Each Decoder replica's host copies fit ~32 of them.
FLEET_ADAPTER_BYTES = 37376
ADAPTER_CACHE_MB = 32 * FLEET_ADAPTER_BYTES / 2**20
ACK_TIMEOUT_S = 8.0  # short, so the ack-timeout drill is quick; replicas ack within milliseconds


def base_config(model_dir, store_dir, load_dir=None, **over) -> dict:
    cfg = {
        "model_dir": str(model_dir),
        "served_model_name": "tiny",
        "adapter_store_dir": str(store_dir),
        "adapter_load_dirs": [str(load_dir)] if load_dir else [],
        "engine": {"max_num_seqs": 32, "kv_cache_memory_mb": 16, "block_size": 16, "max_model_len": 1024,
                   "max_loras": 8, "max_lora_rank": 16},
        "adapter_cache_mb": ADAPTER_CACHE_MB,
        "adapter_ack_timeout_s": ACK_TIMEOUT_S,
        "preprocessor": {"num_replicas": 1, "num_cpus": 0.1},
        "vision_encoder": {"num_replicas": 1, "num_cpus": 0.1},
        "decoder": {"num_replicas": 2, "num_cpus": 0.1},
        "ingress": {"num_replicas": 1, "num_cpus": 0.1},
        "trainer": {"num_replicas": 1, "num_cpus": 0.1},
    }
    for k, v in over.items():
        cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
    return cfg


def startup_adapters(hf_model, root) -> dict[str, tuple[str, object]]:
    """Two PEFT adapters the `vlora` app registers at start-up (`adapters:` in its config): one from a
    local folder, one from an fsspec memory:// URI (readable here, where the app is built).
    {name: (source, local copy of the folder for the HF+PEFT oracle)}."""
    import fsspec

    from tests.unit.oracle import random_peft_adapter

    local = random_peft_adapter(hf_model, root / "startup-local", seed=21, r=4, alpha=8)
    mem = random_peft_adapter(hf_model, root / "startup-mem", seed=22, r=2, alpha=4)
    fs = fsspec.filesystem("memory")
    for f in mem.iterdir():
        fs.pipe(f"/vlora-e2e/startup-mem/{f.name}", f.read_bytes())
    return {"startup-local": (str(local), local), "startup-mem": ("memory://vlora-e2e/startup-mem", mem)}


@pytest.fixture(scope="session")
def serve_instance(tiny_model_dir, tmp_path_factory, hf_model):
    from vlora.deployments.launch import cluster_env
    from vlora.engine.tp import free_port

    # inherited by the Ray processes ray.init starts. HAProxy's stats page and metrics exporter get free
    # ports (a `make serve` on this machine holds the fixed ones), from the range no starting Ray process
    # takes before HAProxy binds them.
    os.environ.update({**cluster_env(one_node=True), "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
                       "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port())})
    import ray
    from ray import serve

    from vlora.deployments.app import build_app

    port = free_port()
    metrics_port = free_port()  # Ray's Prometheus endpoint (the node's metrics agent), read by test_metrics.py
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             _metrics_export_port=metrics_port, _system_config={"metrics_report_interval_ms": METRICS_INTERVAL_MS},
             runtime_env={"env_vars": {"VLORA_API_KEYS": API_KEY, "VLORA_ADMIN_KEYS": ADMIN_KEY,
                                       "TOKENIZERS_PARALLELISM": "false"}})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    store = tmp_path_factory.mktemp("store")
    uploads = tmp_path_factory.mktemp("uploads")  # the only place POST /v1/adapters may load from
    startup = startup_adapters(hf_model, tmp_path_factory.mktemp("startup"))
    serve.run(build_app(base_config(tiny_model_dir, store, uploads,
                                    adapters=[{"name": n, "path": src} for n, (src, _) in startup.items()],
                                    # tensor-parallel Decoders (2 ranks each): every serving and adapter test runs through them
                                    engine={"tensor_parallel_size": 2})),
              name="vlora", route_prefix="/")
    # overload: also the app without admin keys (admin routes closed), with one adapter slot, and
    # whose Decoder test_security.py kills (Serve's 1 s health check replaces it).
    overload = base_config(tiny_model_dir, tmp_path_factory.mktemp("store2"),
                           engine={"max_num_seqs": 1, "max_waiting_requests": 1, "max_loras": 1},
                           decoder={"num_replicas": 1, "num_cpus": 0.1, "health_check_period_s": 1},
                           admin_keys_env="VLORA_OVERLOAD_ADMIN_KEYS")
    serve.run(build_app(overload), name="overload", route_prefix="/overload")
    yield {"url": f"http://127.0.0.1:{port}", "store": store, "uploads": uploads, "startup": startup,
           "metrics_url": f"http://127.0.0.1:{metrics_port}/metrics"}
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def base_url(serve_instance):
    return serve_instance["url"]


@pytest.fixture(scope="session")
def client(base_url):
    import openai

    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
