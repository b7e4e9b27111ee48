"""Prometheus metrics of every deployment, and the Ingress's one-JSON-line-per-request log.

Metrics go through Ray Serve's metrics API (`ray.serve.metrics`): each replica records its own
series, Ray's metrics agent on every node exports them on the node's metrics export port
(`ray start --metrics-export-port`; Ray picks one if it is not set) next to Ray's and Serve's own, and Serve adds
the `deployment`, `replica` and `application` labels. Ray renders a metric named `vlora_x` as
`ray_vlora_x` (counters get `_total`): Ray 2.60's OpenTelemetry pipeline drops names with a
colon, so vLLM's `vllm:x` style becomes `vlora_x` here (`vllm:time_to_first_token_seconds` ->
`ray_vlora_time_to_first_token_seconds`). Names and meanings are listed in
the README's "Operators" section; the Grafana dashboard is deployments/grafana_dashboard.json.

Histograms: Ray rebuilds each histogram on the metrics agent from bucket counts, so `_count`
and `_bucket` are exact but `_sum` is approximate (bucket midpoints): use histogram_quantile(),
not _sum/_count, for latencies. Buckets are fixed (never derived from config) because Ray drops
data points whose buckets differ from the first registration on the node.

The same metrics are also served on the API port (`GET /metrics` of the Ingress) under vLLM's own
names and labels, so vLLM's dashboards and alerts work unchanged: `vllm:<name>` for every metric
with a vLLM counterpart (VLLM_NAMES), `vlora:<name>` for the rest, with `deployment` and `replica`
labels. Each replica keeps them in a local prometheus_client registry and pushes a snapshot every
API_PUSH_INTERVAL_S to the app's MetricsHub actor (deployments/metrics_hub.py), or only every API_HEARTBEAT_S while
nothing changed (an idle replica); a replica that stops pushing (dead, removed) drops out of
/metrics after API_STALE_S.

Label cardinality stays bounded: `model_name` is the base model's name or an adapter that
exists (names arriving in requests are only used once the model resolved; anything else is
`unknown`), statuses and finish reasons come from small fixed sets, and versions are gauge
values, never labels. Outside a Serve replica (unit tests, the benchmarks' in-process engine)
only the process-local API-port registry records, so nothing here needs Ray to be running.
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any

PREFIX = "vlora_"
EXPORT_PREFIX = "ray_"  # what Ray's exporter puts in front of every name
# Served under vLLM's name on the API port's /metrics (vllm/v1/metrics/loggers.py); the rest as vlora:<name>.
VLLM_NAMES = frozenset({
    "num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "num_preemptions", "prompt_tokens",
    "generation_tokens", "request_success", "request_prompt_tokens", "request_generation_tokens",
    "time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
    "request_queue_time_seconds", "lora_requests_info"})
API_PUSH_INTERVAL_S = 1.0  # how often a replica sends its API-port metrics to the hub, when they changed
API_HEARTBEAT_S = 2.0  # a replica whose metrics did not change still sends them this often
API_STALE_S = 5.0  # a replica silent this long (dead or removed) is left out of /metrics
UNKNOWN_MODEL = "unknown"  # model_name of requests that failed before a model was resolved

# Buckets: vLLM's (vllm/v1/metrics/loggers.py), extended below 10 ms where a small model or a
# cache hit lands, so the low percentiles are not all in the first bucket.
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
ITL_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
               5.0, 7.5, 10.0, 20.0, 40.0, 80.0]
REQUEST_LATENCY_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
                           40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]
QUEUE_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25] + REQUEST_LATENCY_BUCKETS[4:]
STAGE_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
SWAP_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
LEARN_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0]


def token_buckets(max_len: int = 200_000) -> list[float]:
    """1-2-5 buckets up to max_len, as vLLM's request_prompt_tokens / request_generation_tokens.

    Fixed, not the served model's max_model_len: Ray registers a histogram once per node and skips
    data points from a process whose buckets differ, so every app on a cluster must agree.
    """
    out, mantissa, exponent = [], [1, 2, 5], 0
    while True:
        for m in mantissa:
            b = m * 10 ** exponent
            if b > max_len:
                return [float(x) for x in out] or [1.0]
            out.append(b)
        exponent += 1


def in_replica() -> bool:
    try:
        from ray.serve import context

        return context._get_internal_replica_context() is not None
    except Exception:  # noqa: BLE001 - no Serve, no replica
        return False


def api_name(name: str) -> str:
    """The name on the API port's /metrics: vLLM's for a metric vLLM has, else vlora's."""
    return ("vllm:" if name in VLLM_NAMES else "vlora:") + name


_API_REGISTRY = None  # this process's prometheus_client registry of API-port metrics
_API_METRICS: dict[str, Any] = {}


def api_registry():
    global _API_REGISTRY
    if _API_REGISTRY is None:
        from prometheus_client import CollectorRegistry

        _API_REGISTRY = CollectorRegistry(auto_describe=False)
    return _API_REGISTRY


def _api_metric(kind: str, name: str, doc: str, tags: tuple[str, ...], buckets: list[float] | None = None):
    """The process's one prometheus_client metric for `name` (created on first use)."""
    if name not in _API_METRICS:
        import prometheus_client as pc

        cls = {"counter": pc.Counter, "gauge": pc.Gauge, "histogram": pc.Histogram}[kind]
        kw = {"buckets": buckets} if buckets is not None else {}
        _API_METRICS[name] = cls(api_name(name), doc, labelnames=tags, registry=api_registry(), **kw)
    return _API_METRICS[name]


_API_CHANGES = [0]  # bumped by every API-port update; the pusher skips a snapshot while it stands still


class _Metric:
    """A Ray Serve metric (None outside a replica) and its API-port twin, with a zero() for counters
    (Prometheus advice: create series at 0)."""

    def __init__(self, inner, api):
        self._m = inner
        self._api = api

    def _child(self, tags: dict[str, str] | None):
        _API_CHANGES[0] += 1
        return self._api.labels(**tags) if tags else self._api

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        if value > 0:
            if self._m is not None:
                self._m.inc(value, tags=tags)
            self._child(tags).inc(value)

    def set(self, value: float, tags: dict[str, str] | None = None) -> None:
        if self._m is not None:
            self._m.set(value, tags=tags)
        self._child(tags).set(value)

    def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
        if self._m is not None:
            self._m.observe(value, tags=tags)
        self._child(tags).observe(value)

    def observe_many(self, value: float, count: int, tags: dict[str, str] | None = None) -> None:
        """`count` observations of one value (a streamed item's tokens share their gap): one update on the
        API port, where prometheus_client's Histogram.observe would take `count`."""
        if count <= 0:
            return
        if self._m is not None:
            for _ in range(count):
                self._m.observe(value, tags=tags)
        child = self._child(tags)
        child._sum.inc(value * count)  # Histogram.observe's own update, `count` at once
        child._buckets[bisect.bisect_left(child._upper_bounds, value)].inc(count)

    def zero(self, tags: dict[str, str] | None = None) -> None:
        """Export a counter series at 0 before its first event, so rate() and alerts see it."""
        self._child(tags)  # prometheus_client creates the labelled series at 0
        if self._m is None:
            return
        try:
            self._m._record(0, tags=tags)  # Counter.inc refuses 0; the record underneath takes it
        except Exception:  # noqa: BLE001 - cosmetic: the series then appears at its first inc
            pass

    def replace(self, tags: dict[str, str], value: float) -> None:
        """API port only: this series alone (vLLM's info gauges, whose labels carry the state)."""
        self._api.clear()
        self._child(tags).set(value)


DEFINED: dict[str, str] = {}  # every metric name defined in this process -> counter | gauge | histogram


def exported_names(name: str, kind: str) -> list[str]:
    """The sample names Ray's Prometheus endpoint shows for a metric defined as `name`."""
    full = EXPORT_PREFIX + name
    if kind == "counter":
        return [full if full.endswith("_total") else full + "_total"]
    if kind == "histogram":
        return [full + "_bucket", full + "_sum", full + "_count"]
    return [full]


def _counter(name: str, doc: str, tags: tuple[str, ...] = ()) -> Any:
    DEFINED[PREFIX + name] = "counter"
    api = _api_metric("counter", name, doc, tags)
    if not in_replica():
        return _Metric(None, api)
    from ray.serve import metrics

    start_api_push()
    return _Metric(metrics.Counter(PREFIX + name, description=doc, tag_keys=tags), api)


def _gauge(name: str, doc: str, tags: tuple[str, ...] = ()) -> Any:
    DEFINED[PREFIX + name] = "gauge"
    api = _api_metric("gauge", name, doc, tags)
    if not in_replica():
        return _Metric(None, api)
    from ray.serve import metrics

    start_api_push()
    return _Metric(metrics.Gauge(PREFIX + name, description=doc, tag_keys=tags), api)


def _histogram(name: str, doc: str, buckets: list[float], tags: tuple[str, ...] = ()) -> Any:
    DEFINED[PREFIX + name] = "histogram"
    api = _api_metric("histogram", name, doc, tags, buckets)
    if not in_replica():
        return _Metric(None, api)
    from ray.serve import metrics

    start_api_push()
    return _Metric(metrics.Histogram(PREFIX + name, description=doc, boundaries=buckets, tag_keys=tags), api)


def api_snapshot() -> list[tuple[str, str, str, list[tuple[str, dict, float]]]]:
    """This process's API-port metrics as plain data: (name, type, help, [(sample, labels, value)])."""
    out = []
    for fam in api_registry().collect():
        samples = [(s.name, dict(s.labels), float(s.value)) for s in fam.samples if not s.name.endswith("_created")]
        out.append((fam.name, fam.type, fam.documentation, samples))
    return out


_PUSHER: threading.Thread | None = None


def start_api_push() -> None:
    """In a replica: push api_snapshot() to the app's MetricsHub every API_PUSH_INTERVAL_S (once per process)."""
    global _PUSHER
    if _PUSHER is not None:
        return
    _PUSHER = threading.Thread(target=_push_forever, name="vlora-api-metrics", daemon=True)
    _PUSHER.start()


def _push_forever() -> None:
    from ray import serve

    from vlora.deployments.metrics_hub import get_hub

    ctx = serve.get_replica_context()
    pusher = ApiPusher(ctx.replica_id.unique_id, ctx.deployment, lambda: get_hub(ctx.app_name))
    while True:
        time.sleep(API_PUSH_INTERVAL_S)
        pusher.tick(time.monotonic())


class ApiPusher:
    """Sends this process's API-port snapshot to the hub: after any change, else as a heartbeat every
    API_HEARTBEAT_S (so an idle replica builds no snapshot per interval yet stays within API_STALE_S)."""

    def __init__(self, replica: str, deployment: str, connect):
        self.replica, self.deployment, self.connect = replica, deployment, connect
        self.hub = None
        self.sent_changes: int | None = None  # _API_CHANGES at the last push
        self.sent_at = -math.inf
        self.warned = False

    def tick(self, now: float) -> bool:
        """Push if due; returns whether it pushed."""
        changes = _API_CHANGES[0]
        if changes == self.sent_changes and now - self.sent_at < API_HEARTBEAT_S:
            return False
        try:
            self.hub = self.hub or self.connect()
            self.hub.push.remote(self.replica, self.deployment, api_snapshot())
        except Exception:  # noqa: BLE001 - metrics never take a replica down; retried next interval
            self.hub = None
            if not self.warned:
                get_logger("vlora.metrics").warning("pushing API-port metrics failed", exc_info=True)
                self.warned = True
            return False
        self.sent_changes, self.sent_at = changes, now
        return True


M = ("model_name",)


# -- Ingress: the request as the client sees it ---------------------------------------------------
class IngressMetrics:
    def __init__(self):
        tb = token_buckets()
        self.requests = _counter("requests", "Completion requests by HTTP status (499 = client went away)",
                                 M + ("status",))
        self.success = _counter("request_success", "Requests that finished generating, by finish reason",
                                M + ("finished_reason",))
        self.prompt_tokens = _counter("prompt_tokens", "Prompt tokens of requests that reached the engine", M)
        self.generation_tokens = _counter("generation_tokens", "Generated tokens (all choices)", M)
        self.request_prompt_tokens = _histogram("request_prompt_tokens", "Prompt tokens per request", tb, M)
        self.request_generation_tokens = _histogram("request_generation_tokens", "Generated tokens per request",
                                                    tb, M)
        self.ttft = _histogram("time_to_first_token_seconds",
                               "Ingress arrival -> first token (preprocessing, vision, queue and prefill)",
                               TTFT_BUCKETS, M)
        self.itl = _histogram("inter_token_latency_seconds", "Time between a request's successive decode steps",
                              ITL_BUCKETS, M)
        self.e2e = _histogram("e2e_request_latency_seconds", "Ingress arrival -> last token (or error)",
                              REQUEST_LATENCY_BUCKETS, M)


# -- Decoder: engine state and adapter hot-swaps ---------------------------------------------------
class DecoderMetrics:
    def __init__(self, base_model: str):
        self.base = {"model_name": base_model}
        self.running = _gauge("num_requests_running", "Requests with a row in the running batch (this replica)", M)
        self.waiting = _gauge("num_requests_waiting",
                              "Requests in the engine not running yet: queued, preempted, or waiting for a LoRA slot",
                              M)
        self.kv_used = _gauge("kv_cache_blocks_used", "KV cache blocks in use", M)
        self.kv_total = _gauge("kv_cache_blocks_total", "KV cache blocks in the pool", M)
        self.kv_usage = _gauge("kv_cache_usage_perc", "KV cache usage, 0..1 (1 = full)", M)
        self.preemptions = _counter("num_preemptions", "Sequences preempted (KV pool full; recomputed later)", M)
        self.lora_slots_used = _gauge("lora_slots_used", "Engine LoRA slots holding an adapter", M)
        self.lora_slots_total = _gauge("lora_slots_total", "Engine LoRA slots (max_loras)", M)
        self.lora_slot_loads = _counter("lora_slot_loads", "Adapter weights written into an engine slot "
                                        "(first use, LRU reload or in-place version swap)", M)
        self.queue_time = _histogram("request_queue_time_seconds",
                                     "Engine arrival -> first scheduled (waiting queue and LoRA slot wait)",
                                     QUEUE_BUCKETS, M)
        self.adapter_version = _gauge("adapter_version", "Adapter version this replica serves (0 = removed)", M)
        self.adapter_swaps = _counter("adapter_swaps", "Adapter versions installed on this replica", M)
        self.swap_latency = _histogram("adapter_swap_latency_seconds",
                                       "Fetching one new adapter version from the store and installing it",
                                       SWAP_BUCKETS, M)
        self.sync_seq = _gauge("adapter_sync_seq", "Store change sequence this replica has applied (lag = "
                               "max over replicas - this)", M)
        self.sync_errors = _counter("adapter_sync_errors", "Failed syncs with the AdapterStore (retried)", M)
        # API port only (its labels change with the state; Ray's exporter has no way to drop old ones)
        self.lora_info = _Metric(None, _api_metric(
            "gauge", "lora_requests_info", "Running stats on LoRA requests (vLLM's): the labels name the adapters "
            "with running / waiting requests; the value is when it was set",
            ("running_lora_adapters", "waiting_lora_adapters", "max_lora")))
        # Lazy residency (per replica, labelled with the base model: 1,000 adapters must not make 1,000 series)
        self.host_copies = _gauge("adapter_host_copies", "Adapter host copies held by this replica", M)
        self.host_bytes = _gauge("adapter_host_bytes", "Bytes of adapter host copies held by this replica", M)
        self.host_capacity = _gauge("adapter_host_capacity_bytes", "Host copy budget (adapter_cache_mb)", M)
        self.host_evictions = _counter("adapter_host_evictions", "Host copies dropped for room (LRU)", M)
        self.cold_starts = _counter("adapter_cold_starts", "Requests whose adapter was fetched from the store "
                                    "first (not held by this replica)", M)
        self.affinity = _counter("adapter_affinity", "Adapter requests by where the adapter was on arrival: held "
                                 "here (hit), held only by another replica (miss: fetched here too), held by no "
                                 "replica (cold)", M + ("result",))
        self.fetch_wait = _histogram("adapter_fetch_latency_seconds", "A cold request's wait for its adapter: "
                                     "fetch from the store, make room, install", SWAP_BUCKETS, M)
        self.cold_ttft = _histogram("adapter_cold_start_ttft_seconds", "Decoder arrival -> first token of "
                                    "requests whose adapter was cold", TTFT_BUCKETS, M)
        for c in (self.preemptions, self.lora_slot_loads, self.sync_errors, self.host_evictions, self.cold_starts):
            c.zero(self.base)
        for result in ("hit", "miss", "cold"):
            self.affinity.zero({**self.base, "result": result})
        self._seen = {"num_preemptions": 0, "lora_slot_loads": 0}
        self._versions: dict[str, int] = {}

    def record_engine(self, s: dict) -> None:
        """Set the engine gauges from a `Decoder.engine_state()` snapshot; counters move by the deltas."""
        b = self.base
        self.running.set(s["num_running"], b)
        self.waiting.set(s["num_waiting"], b)
        self.kv_used.set(s["kv_blocks_used"], b)
        self.kv_total.set(s["kv_blocks_total"], b)
        self.kv_usage.set(s["kv_blocks_used"] / max(1, s["kv_blocks_total"]), b)
        self.lora_slots_used.set(s["lora_slots_used"], b)
        self.lora_slots_total.set(s["lora_slots_total"], b)
        for key, counter in (("num_preemptions", self.preemptions), ("lora_slot_loads", self.lora_slot_loads)):
            counter.inc(s[key] - self._seen[key], b)
            self._seen[key] = s[key]
        if "running_adapters" in s:
            self.lora_info.replace({"running_lora_adapters": ",".join(s["running_adapters"]),
                                    "waiting_lora_adapters": ",".join(s["waiting_adapters"]),
                                    "max_lora": str(s["lora_slots_total"])}, time.time())

    def record_residency(self, r: dict) -> None:
        """Set the host-copy gauges from `Decoder._residency_stats()`; evictions move by the delta."""
        b = self.base
        self.host_copies.set(len(r["host_copies"]), b)
        self.host_bytes.set(r["host_bytes"], b)
        self.host_capacity.set(r["budget_bytes"], b)
        self.host_evictions.inc(r["evictions"] - self._seen.get("evictions", 0), b)
        self._seen["evictions"] = r["evictions"]

    def record_versions(self, versions: dict[str, int], seq: int) -> None:
        for name, v in versions.items():
            self.adapter_version.set(v, {"model_name": name})
        for name in set(self._versions) - set(versions):
            self.adapter_version.set(0, {"model_name": name})
        self._versions = dict(versions)
        self.sync_seq.set(max(seq, 0), self.base)


# -- VisionEncoder and Preprocessor --------------------------------------------------------------
class VisionMetrics:
    def __init__(self):
        self.hits = _counter("vision_cache_hits", "Images whose embeddings came from the cache")
        self.misses = _counter("vision_cache_misses", "Images encoded by the vision tower")
        self.evictions = _counter("vision_cache_evictions", "Cache entries evicted (LRU, byte budget)")
        self.bytes = _gauge("vision_cache_bytes", "Bytes of embeddings held in the cache")
        self.capacity = _gauge("vision_cache_capacity_bytes", "The cache's byte budget (vision_cache_mb)")
        self.entries = _gauge("vision_cache_entries", "Images in the cache")
        self.encode = _histogram("vision_encode_seconds", "Vision tower time per forward (a batch of cache misses)",
                                 STAGE_BUCKETS)
        self.batch_requests = _histogram("vision_batch_requests", "Requests encoded together in one batch",
                                         [1, 2, 4, 8, 16, 32, 64])
        for c in (self.hits, self.misses, self.evictions):
            c.zero()

    def record_cache(self, before: dict, after: dict) -> None:
        self.hits.inc(after["hits"] - before["hits"])
        self.misses.inc(after["misses"] - before["misses"])
        self.evictions.inc(after["evictions"] - before["evictions"])
        self.bytes.set(after["bytes"])
        self.capacity.set(after["max_bytes"])
        self.entries.set(after["entries"])


class PreprocessMetrics:
    def __init__(self):
        self.image = _histogram("image_preprocess_seconds",
                                "Per image: load (data URL / http / file), decode, smart_resize, normalize, patchify",
                                STAGE_BUCKETS)
        self.images = _counter("images_preprocessed", "Images preprocessed")
        self.images.zero()


# -- Trainer ---------------------------------------------------------------------------------------
class TrainerMetrics:
    def __init__(self):
        self.jobs = _counter("learn_jobs", "Learn jobs by outcome (status: succeeded | failed; code: HTTP status)",
                             M + ("status", "code"))
        self.in_progress = _gauge("learn_jobs_in_progress", "Learn jobs queued or running")
        self.loss = _gauge("learn_loss", "Training loss of the adapter's last successful learn job", M + ("phase",))
        self.duration = _histogram("learn_job_duration_seconds", "Training time of a learn job", LEARN_BUCKETS, M)
        self.publish = _histogram("adapter_publish_latency_seconds",
                                  "Publish call -> every live Decoder replica serves the new version",
                                  SWAP_BUCKETS, M)
        self.in_progress.set(0)


def define_all() -> dict[str, str]:
    """Create every deployment's metrics (no-ops outside Serve) and return DEFINED: name -> kind."""
    IngressMetrics(), DecoderMetrics("base"), VisionMetrics(), PreprocessMetrics(), TrainerMetrics()
    return dict(DEFINED)


# -- logs ----------------------------------------------------------------------------------------------
def get_logger(name: str) -> logging.Logger:
    """`ray.serve.<name>`: in a replica, its lines land in the replica's Serve log file (the Serve tab's
    logs), in Serve's format with the request id. A plain `vlora.*` logger would reach only the worker's
    stderr file, and only from WARNING up."""
    return logging.getLogger("ray.serve").getChild(name)


request_log = get_logger("vlora.requests")


@dataclass
class RequestRecord:
    """What the Ingress learns about one completion request, recorded once when it ends."""

    request_id: str
    route: str
    arrival: float = field(default_factory=time.perf_counter)
    model: str | None = None  # as the client sent it
    model_name: str = UNKNOWN_MODEL  # the metrics label (base model name, a served adapter, or unknown)
    adapter: str | None = None
    adapter_version: int | None = None
    replica: str | None = None
    stream: bool = False
    first_token: float | None = None
    last_output: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reasons: dict[int, str] = field(default_factory=dict)
    status: int | None = None
    error: str | None = None
    done: bool = False
    finish_deferred: bool = False  # the response's background task records it (after the body is sent)
    _itl: list[tuple[float, int]] = field(default_factory=list)  # (gap per token, tokens) per item

    def on_output(self, out) -> None:
        """One RequestOutput arrived at the Ingress (call in arrival order)."""
        now = time.perf_counter()
        if self.first_token is None:
            self.first_token = now
            self.adapter, self.adapter_version, self.replica = out.adapter, out.adapter_version, out.served_by
        elif k := max((len(c.token_ids) for c in out.choices), default=0):
            # a batched item carries k steps' tokens: its gap spread evenly over them
            self._itl.append(((now - self.last_output) / k, k))
        self.last_output = now
        self.prompt_tokens = out.num_prompt_tokens
        self.completion_tokens = out.num_generated_tokens
        for c in out.choices:
            if c.finish_reason:
                self.finish_reasons[c.index] = c.finish_reason

    @property
    def finish_reason(self) -> str | None:
        """One reason for the request: 'length' if any choice ran out of tokens, else the shared one."""
        reasons = set(self.finish_reasons.values())
        if not reasons:
            return None
        return "length" if "length" in reasons else sorted(reasons)[0]

    def fields(self, now: float) -> dict:
        ms = lambda t: None if t is None else round(t * 1e3, 3)  # noqa: E731
        return {
            "event": "vlora.request",
            "request_id": self.request_id,
            "route": self.route,
            "model": self.model,
            "adapter": self.adapter,
            "adapter_version": self.adapter_version,
            "stream": self.stream,
            "status": self.status,
            "outcome": outcome(self.status),
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "ttft_ms": ms(None if self.first_token is None else self.first_token - self.arrival),
            "latency_ms": ms(now - self.arrival),
            "decoder_replica": self.replica,
            "error": self.error,
        }

    def finish(self, metrics: IngressMetrics) -> dict | None:
        """Record the metrics and write the log line, once; returns the logged fields."""
        if self.done:
            return None
        self.done = True
        if self.status is None:
            self.status = 499
        now = time.perf_counter()
        m = {"model_name": self.model_name}
        metrics.requests.inc(1, {**m, "status": str(self.status)})
        if self.first_token is not None:  # reached the engine: tokens and timings
            metrics.prompt_tokens.inc(self.prompt_tokens, m)
            metrics.generation_tokens.inc(self.completion_tokens, m)
            metrics.request_prompt_tokens.observe(self.prompt_tokens, m)
            metrics.request_generation_tokens.observe(self.completion_tokens, m)
            metrics.ttft.observe(self.first_token - self.arrival, m)
            for dt, k in self._itl:
                metrics.itl.observe_many(dt, k, m)
            if self.status == 200 and self.finish_reason:
                metrics.success.inc(1, {**m, "finished_reason": self.finish_reason})
        metrics.e2e.observe(now - self.arrival, m)
        f = self.fields(now)
        request_log.info(json.dumps(f, separators=(",", ":")))
        return f


def outcome(status: int | None) -> str:
    if status is None or status == 499:
        return "aborted"
    if status < 400:
        return "ok"
    return "client_error" if status < 500 else "server_error"
