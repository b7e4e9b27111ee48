"""The application: Ingress -> Preprocessor -> VisionEncoder -> Decoder, built from AppConfig.

`serve run serve_config.yaml` calls `build_app(args)`; tests call it with a dict. Each class
stays a plain class (constructible without Serve); this module alone turns them into
deployments with replica counts and resources from the config.
"""

from __future__ import annotations

import os

from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from vlora.adapters.folders import is_remote, split_uri
from vlora.deployments import limits
from vlora.deployments.config import AppConfig
from vlora.deployments.decoder import Decoder
from vlora.deployments.ingress import Ingress
from vlora.deployments.placement import actor_options, gpu_shares
from vlora.deployments.preprocessor import Preprocessor
from vlora.deployments.routing import AdapterAffinityRouter
from vlora.deployments.trainer import Trainer
from vlora.deployments.vision_encoder import VisionEncoderDeployment


# Serve's switches for running user code, and the router of its handle calls, on a thread and loop of their own
HOT_PATH_LOOP_VARS = ("RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP")


def _cluster_gpus() -> float:
    import ray

    if not ray.is_initialized():
        return 0.0
    return float(ray.cluster_resources().get("GPU", 0))


def hot_path_env() -> dict[str, str]:
    """Replica environment of the deployments every request passes through (Ingress, Decoder).

    Serve runs user code on an event loop thread of its own by default, so each request and each
    streamed item crosses between that loop and the replica's main loop (a future chained across
    threads, both sides taking the GIL), and it routes each handle call on a third loop. Their handlers
    never block (the engine runs in its own process, thread work goes through `to_thread`), so both
    run on the main loop, as Serve's throughput-optimized mode sets them. A value of either variable
    set where the app is built (the application's runtime_env env_vars, or the environment of
    `serve run`) is kept."""
    return {key: os.environ.get(key, "0") for key in HOT_PATH_LOOP_VARS}


def _deployment(cls, name: str, replica, gpu_share: float = 0.0, tensor_parallel_size: int = 1,
                env: dict[str, str] | None = None, **options):
    """A Serve deployment with the replica config's options (and Serve `options`, e.g. a request router);
    `autoscaling_config` replaces num_replicas; a tensor-parallel replica reserves one bundle per rank on
    one node; `env`: environment variables of its replicas (merged with the application's)."""
    scaling = ({"autoscaling_config": replica.autoscaling_config} if replica.autoscaling_config is not None
               else {"num_replicas": replica.num_replicas})
    opts = actor_options(replica, gpu_share, tensor_parallel_size)
    if env:
        opts["runtime_env"] = {"env_vars": dict(env)}
    extra = {}
    if tensor_parallel_size > 1:  # the replica takes bundle 0, its worker actors bundles 1..N-1, on one node
        extra = {"placement_group_bundles": [{"CPU": opts["num_cpus"], **({"GPU": opts["num_gpus"]} if opts.get(
            "num_gpus") else {})}] * tensor_parallel_size, "placement_group_strategy": "STRICT_PACK"}
    return serve.deployment(cls, name=name).options(
        **scaling,
        max_ongoing_requests=replica.max_ongoing_requests,
        max_queued_requests=replica.max_queued_requests,
        health_check_period_s=replica.health_check_period_s,
        ray_actor_options=opts,
        **extra,
        **options,
    )


def _absolute(source: str) -> str:
    """Local paths absolute (replicas may run elsewhere); URIs as they are."""
    return source if is_remote(source) else os.path.abspath(split_uri(source)[1])


def register_startup_adapters(config: AppConfig, store) -> list[dict]:
    """`adapters:` of the config: read here (where the app is built) and published through the store;
    an adapter whose current version already holds the same weights is left as it is."""
    import ray

    from vlora.adapters.folders import read_files
    from vlora.adapters.peft_io import CONFIG_NAME, WEIGHTS_NAME

    out = []
    for a in config.adapters:
        limits.check_adapter_name(a.name, config.model_name)
        files = read_files(a.path, (CONFIG_NAME, WEIGHTS_NAME), config.limits.max_adapter_file_bytes)
        out.append(ray.get(store.load_files.remote(a.name, files, a.path, unless_current=True)))
    return out


def prepare_config(args: dict | AppConfig) -> AppConfig:
    """Validate args, make paths absolute (replicas may run elsewhere), create the tiny model if asked."""
    config = args if isinstance(args, AppConfig) else AppConfig.model_validate(args or {})
    config = config.model_copy(update={
        "model_dir": os.path.abspath(config.model_dir),
        "adapter_store_dir": os.path.abspath(config.adapter_store_dir),
        "served_model_name": config.model_name,
        "adapter_load_dirs": [_absolute(d) for d in config.adapter_load_dirs],
        "adapters": [a.model_copy(update={"path": _absolute(a.path)}) for a in config.adapters],
    })
    if not os.path.exists(os.path.join(config.model_dir, "config.json")):
        if not config.generate_tiny_model_if_missing:
            raise FileNotFoundError(f"no checkpoint at {config.model_dir} (config.json missing)")
        from vlora.engine.tiny import write_tiny_model

        write_tiny_model(config.model_dir)
    tp = config.engine.tensor_parallel_size
    if tp > 1:  # fail at `serve run`, not in every replica's constructor
        from vlora.engine.model import TextConfig
        from vlora.engine.tp import ShardPlan

        tc = TextConfig.from_pretrained(config.model_dir)
        ShardPlan(0, tp, vocab_parallel=True).check(tc.num_heads, tc.num_kv_heads, tc.intermediate_size, tc.vocab_size)
    return config


def build_app(args: dict | AppConfig | None = None) -> Application:
    import ray

    from vlora.adapters.store import get_or_create_store

    config = prepare_config(args or {})
    if not ray.is_initialized():
        ray.init()
    store = get_or_create_store(config.adapter_store_dir, config.model_dir, config.engine.max_lora_rank,
                                config.adapter_retention, config.adapter_ack_timeout_s, config.learn_job_ttl_s)
    register_startup_adapters(config, store)
    shares = gpu_shares(config, _cluster_gpus())
    pre = _deployment(Preprocessor, "Preprocessor", config.preprocessor).bind(config)
    vis = _deployment(VisionEncoderDeployment, "VisionEncoder", config.vision_encoder,
                      shares["vision_encoder"]).bind(config)
    dec = _deployment(Decoder, "Decoder", config.decoder, shares["decoder"],
                      config.engine.tensor_parallel_size, env=hot_path_env(),
                      request_router_config=RequestRouterConfig(request_router_class=AdapterAffinityRouter)
                      ).bind(config, store)
    trainer = (_deployment(Trainer, "Trainer", config.trainer.model_copy(update={"num_replicas": 1,
                                                                               "autoscaling_config": None}),
                           shares["trainer"]).bind(config, store) if config.learning else None)
    return _deployment(Ingress, "Ingress", config.ingress, env=hot_path_env()).bind(
        config, pre, vis, dec, trainer, store)


def decoder_stats(app: str = "vlora", replicas: int = 2, tries: int = 100, timeout_s: float = 30.0) -> dict[str, dict]:
    """Stats of every Decoder replica of `app`, keyed by replica id (for tests, benchmarks, operators).

    Serve routes each call to the least loaded replica it knows of (queue lengths it caches for up
    to 10 s, ties broken at random), so this calls until every replica has answered, pausing
    between calls once quick ones keep reaching the same replicas.
    """
    import time

    h = serve.get_deployment_handle("Decoder", app_name=app)
    seen: dict[str, dict] = {}
    deadline = time.monotonic() + timeout_s
    for i in range(10**6):
        s = h.stats.remote().result()
        seen[s["replica_id"]] = s
        if len(seen) >= replicas or (i >= tries and time.monotonic() > deadline):
            break
        if i >= 20:
            time.sleep(0.25)
    if len(seen) < replicas:
        raise RuntimeError(f"saw {len(seen)} of {replicas} Decoder replicas of {app}")
    return seen
