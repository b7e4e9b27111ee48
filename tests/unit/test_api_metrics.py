"""/metrics on the API port in vLLM's names and labels: what a vLLM dashboard query reads, the
hub that gathers every replica's snapshot, and stale (dead) replicas dropped."""

from __future__ import annotations

import time

from prometheus_client.parser import text_string_to_metric_families

from vlora.deployments.metrics import VLLM_NAMES, DecoderMetrics, api_name, api_snapshot, define_all
from vlora.deployments.metrics_hub import MetricsHub, render
from tests.unit.test_conformance import GREEDY, config, decoder, ingress, run  # noqa: F401 - fixtures


def samples(text: str) -> list[tuple[str, dict, float]]:
    return [(s.name, s.labels, s.value) for fam in text_string_to_metric_families(text) for s in fam.samples]


def query_sum_by_model(text: str, sample: str) -> dict[str, float]:
    """PromQL `sum by (model_name) (<sample>)` over a scraped page."""
    out: dict[str, float] = {}
    for name, labels, value in samples(text):
        if name == sample:
            out[labels["model_name"]] = out.get(labels["model_name"], 0.0) + value
    return out


def test_vllm_dashboard_query_reads_the_tokens_sent(ingress):
    async def go(c):
        before = query_sum_by_model((await c.get("/metrics")).text, "vllm:generation_tokens_total").get("tiny", 0)
        r = await c.post("/v1/completions", json={**GREEDY, "prompt": ["a", "b c"], "max_tokens": 7})
        sent = r.json()["usage"]["completion_tokens"]
        page = await c.get("/metrics")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/plain")
        after = query_sum_by_model(page.text, "vllm:generation_tokens_total")["tiny"]
        assert (sent, after - before) == (14, 14)
        names = {n for n, _, _ in samples(page.text)}
        for expected in ("vllm:prompt_tokens_total", "vllm:time_to_first_token_seconds_bucket",
                         "vllm:e2e_request_latency_seconds_count", "vllm:request_success_total", "vlora:requests_total"):
            assert expected in names, expected
        ok = [(lb, v) for n, lb, v in samples(page.text) if n == "vllm:request_success_total"
              and lb["model_name"] == "tiny"]
        assert ok and all(lb["finished_reason"] in ("stop", "length") for lb, _ in ok)

    run(go)


def test_names_follow_vllm_where_vllm_has_the_metric():
    define_all()
    assert api_name("num_requests_running") == "vllm:num_requests_running"
    assert api_name("kv_cache_usage_perc") == "vllm:kv_cache_usage_perc"
    assert api_name("adapter_version") == "vlora:adapter_version"
    families = {name for name, _, _, _ in api_snapshot()}
    for name in VLLM_NAMES:
        assert api_name(name) in families, name


def test_lora_requests_info_names_running_and_waiting_adapters():
    m = DecoderMetrics("tiny")
    state = {"num_running": 2, "num_waiting": 1, "kv_blocks_used": 3, "kv_blocks_total": 10, "num_preemptions": 0,
             "lora_slots_used": 1, "lora_slots_total": 4, "lora_slot_loads": 0,
             "running_adapters": ["a", "b"], "waiting_adapters": ["c"]}
    m.record_engine(state)
    m.record_engine({**state, "running_adapters": ["b"], "waiting_adapters": []})
    page = render([("Decoder", "r1", api_snapshot())]).decode()
    info = [(lb, v) for n, lb, v in samples(page) if n == "vllm:lora_requests_info"]
    assert len(info) == 1  # only the current state, as a dashboard's `max by (...)` expects
    lb, v = info[0]
    assert (lb["running_lora_adapters"], lb["waiting_lora_adapters"], lb["max_lora"]) == ("b", "", "4")
    assert abs(v - time.time()) < 60
    usage = [(lb, v) for n, lb, v in samples(page) if n == "vllm:kv_cache_usage_perc" and lb["replica"] == "r1"]
    assert usage == [({"model_name": "tiny", "deployment": "Decoder", "replica": "r1"}, 0.3)]


def test_hub_drops_replicas_that_stopped_pushing():
    hub = MetricsHub(stale_s=0.2)
    fam = [("vllm:num_requests_running", "gauge", "running", [("vllm:num_requests_running", {"model_name": "tiny"}, 2.0)])]
    hub.push("r1", "Decoder", fam)
    hub.push("r2", "Decoder", fam)
    page = render(hub.snapshots()).decode()
    assert sorted(lb["replica"] for n, lb, _ in samples(page) if n == "vllm:num_requests_running") == ["r1", "r2"]
    assert page.count("# TYPE vllm:num_requests_running gauge") == 1  # one family, two series
    time.sleep(0.12)
    hub.push("r2", "Decoder", fam)  # r1 died: it pushes no more
    time.sleep(0.12)
    page = render(hub.snapshots()).decode()
    assert [lb["replica"] for n, lb, _ in samples(page) if n == "vllm:num_requests_running"] == ["r2"]


def test_observe_many_equals_that_many_observations():
    """A streamed item's k tokens share one gap: one weighted update gives the same buckets, sum and count as
    k observations (prometheus_client's own observe is the oracle)."""
    import prometheus_client as pc

    from vlora.deployments.metrics import _Metric

    buckets = [0.001, 0.01, 0.1, 1.0]
    ours = pc.Histogram("t_many", "d", ["model_name"], buckets=buckets, registry=pc.CollectorRegistry())
    oracle = pc.Histogram("t_each", "d", ["model_name"], buckets=buckets, registry=pc.CollectorRegistry())
    m = _Metric(None, ours)
    for value, k in [(0.0005, 3), (0.01, 5), (0.05, 1), (2.5, 4), (0.1, 0)]:
        m.observe_many(value, k, {"model_name": "tiny"})
        for _ in range(k):
            oracle.labels(model_name="tiny").observe(value)

    def page(h):
        return sorted((s.name.replace("t_many", "t").replace("t_each", "t"), s.labels.get("le"), round(s.value, 9))
                      for fam in h.collect() for s in fam.samples if not s.name.endswith("_created"))

    assert page(ours) == page(oracle)
    assert ("t_count", None, 13.0) in page(ours)


def test_an_idle_replica_pushes_only_heartbeats_and_a_change_goes_out_at_the_next_tick():
    """The pusher sends a snapshot when a metric moved, else once per API_HEARTBEAT_S (inside API_STALE_S, so
    the hub keeps an idle replica); a failed push is retried at the next tick."""
    import prometheus_client as pc

    from vlora.deployments.metrics import API_HEARTBEAT_S, API_STALE_S, ApiPusher, _Metric

    class Hub:
        def __init__(self):
            self.pushes, self.fail = [], False
            self.push = self

        def remote(self, replica, deployment, snapshot):
            if self.fail:
                raise ConnectionError("hub restarting")
            self.pushes.append((replica, deployment))

    hub = Hub()
    pusher = ApiPusher("r1", "Preprocessor", lambda: hub)
    counter = _Metric(None, pc.Counter("t_pushed", "d", registry=pc.CollectorRegistry()))
    assert pusher.tick(100.0) and len(hub.pushes) == 1  # the first tick always sends
    assert not pusher.tick(101.0) and not pusher.tick(100.0 + API_HEARTBEAT_S - 0.01)  # idle: nothing to send
    assert pusher.tick(100.0 + API_HEARTBEAT_S) and len(hub.pushes) == 2  # the heartbeat
    assert API_HEARTBEAT_S * 2 < API_STALE_S  # one lost heartbeat still keeps the replica on /metrics
    counter.inc(1)
    assert pusher.tick(102.5) and len(hub.pushes) == 3  # a change goes out at the next tick
    counter.inc(1)
    hub.fail = True
    assert not pusher.tick(103.5)
    hub.fail = False
    assert pusher.tick(104.5) and hub.pushes[-1] == ("r1", "Preprocessor")
