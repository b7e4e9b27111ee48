"""Metrics, request logs and the Grafana dashboard, read from Ray's Prometheus endpoint.

Traffic goes to adapters created here (learn with steps=0), so other tests' requests never land
in the rows compared: every counter must move by exactly what this module sent. Replicas export
every second (conftest's metrics_report_interval_ms); reads poll until the values settle.
"""

from __future__ import annotations

import base64
import glob
import io
import json
import os
import time
import uuid

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from vlora.deployments.app import decoder_stats
from tests.e2e.conftest import ADMIN_KEY, API_KEY
from tests.unit.oracle import random_image
from tests.unit.test_dashboard import DASHBOARD, dashboard_metric_names

pytestmark = pytest.mark.e2e

APP = "vlora"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
AUTH = {"Authorization": f"Bearer {API_KEY}"}
SEEN: set[str] = set()  # every sample name the endpoint showed (read by the dashboard test)


# -- reading the endpoint ----------------------------------------------------------------------------
def scrape(url: str) -> list[tuple[str, dict, float]]:
    text = httpx.get(url, timeout=30).text
    out = [(s.name, s.labels, s.value) for fam in text_string_to_metric_families(text) for s in fam.samples]
    SEEN.update(name for name, _, _ in out)
    return out


def value(samples, name: str, **labels) -> float:
    """Sum of the samples called `name` whose labels include `labels` (app `vlora` unless given)."""
    labels.setdefault("application", APP)
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == w for k, w in labels.items()))


def per_replica(samples, name: str, **labels) -> dict[str, float]:
    labels.setdefault("application", APP)
    return {lab["replica"]: v for n, lab, v in samples
            if n == name and all(lab.get(k) == w for k, w in labels.items())}


def wait_for(url: str, check, timeout: float = 60.0, what: str = "metrics"):
    """Scrape until check(samples) holds (returns the samples) or fail after `timeout` s with the last value."""
    deadline = time.time() + timeout
    while True:
        samples = scrape(url)
        try:
            if check(samples):
                return samples
        except KeyError:
            pass
        if time.time() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        time.sleep(0.5)


def settled(url: str, names: list[str], timeout: float = 60.0, **labels):
    """Scrape until the given sums are unchanged over three exports (>= 3 s): the export delay has passed."""
    deadline = time.time() + timeout
    last, same_since = None, time.time()
    while True:
        samples = scrape(url)
        now = tuple(value(samples, n, **labels) for n in names)
        if now != last:
            last, same_since = now, time.time()
        elif time.time() - same_since >= 3.0:
            return samples
        assert time.time() < deadline, f"{names} kept changing for {timeout} s"
        time.sleep(0.5)


# -- traffic -------------------------------------------------------------------------------------------
def learn(base_url: str, name: str, examples=None, steps: int = 0) -> httpx.Response:
    examples = examples or [{"messages": [{"role": "user", "content": "hi"},
                                          {"role": "assistant", "content": "hello"}]}]
    return httpx.post(f"{base_url}/v1/adapters/{name}/learn", json={"examples": examples, "steps": steps},
                      headers=ADMIN, timeout=300)


def data_url(seed: int) -> str:
    buf = io.BytesIO()
    random_image(seed, 56, 84).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat(text: str, image: str | None = None) -> list[dict]:
    parts = ([{"type": "image_url", "image_url": {"url": image}}] if image else []) + [{"type": "text", "text": text}]
    return [{"role": "user", "content": parts}]


@pytest.fixture(scope="module")
def metrics_url(serve_instance):
    return serve_instance["metrics_url"]


@pytest.fixture(scope="module")
def adapter(base_url):
    name = f"metrics-{uuid.uuid4().hex[:8]}"
    r = learn(base_url, name)
    assert r.status_code == 200, r.text
    return name


def test_counters_move_by_exactly_the_requests_and_tokens_sent(client, base_url, metrics_url, adapter):
    image = data_url(int(uuid.uuid4().int % 10_000))  # fresh pixels: the first use is a cache miss
    before = settled(metrics_url, ["ray_vlora_vision_cache_misses_total", "ray_vlora_images_preprocessed_total"])
    sent: list[tuple[int, int, str]] = []  # (prompt tokens, completion tokens, finish reason) per request
    rids: list[str] = []

    def note(raw, usage, reasons):
        rids.append(raw.headers["x-request-id"].split(",")[0].strip())  # Serve repeats the id header
        assert raw.headers["x-vlora-replica"]
        sent.append((usage.prompt_tokens, usage.completion_tokens, "length" if "length" in reasons else "stop"))

    for i, (max_tokens, n) in enumerate([(5, 1), (9, 1), (7, 2)]):
        raw = client.chat.completions.with_raw_response.create(
            model=adapter, messages=chat(f"Question {i}: what is this?"), max_tokens=max_tokens, n=n, temperature=0)
        r = raw.parse()
        note(raw, r.usage, [c.finish_reason for c in r.choices])
    for i in range(2):  # the same image twice: one miss, one hit
        raw = client.chat.completions.with_raw_response.create(
            model=adapter, messages=chat("Describe it.", image), max_tokens=6, temperature=0)
        r = raw.parse()
        note(raw, r.usage, [r.choices[0].finish_reason])
    raw = client.completions.with_raw_response.create(model=adapter, prompt="The quick brown fox", max_tokens=8,
                                                      temperature=0)
    r = raw.parse()
    note(raw, r.usage, [r.choices[0].finish_reason])
    for stream_chat in (True, False):
        make = client.chat.completions if stream_chat else client.completions
        kw = dict(messages=chat("Stream, please.")) if stream_chat else dict(prompt="Stream, please.")
        with make.with_streaming_response.create(model=adapter, max_tokens=12, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}, **kw) as raw:
            chunks = list(raw.parse())
        reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        note(raw, chunks[-1].usage, reasons)
    with pytest.raises(openai.NotFoundError):  # an unknown model: counted under model_name="unknown"
        client.chat.completions.create(model=f"no-such-{adapter}", messages=chat("hi"), max_tokens=2)

    n_req = len(sent)
    prompt, completion = sum(p for p, _, _ in sent), sum(c for _, c, _ in sent)
    by_reason = {r: sum(1 for *_, x in sent if x == r) for r in ("stop", "length")}
    m = {"model_name": adapter}
    after = wait_for(metrics_url, lambda s: value(s, "ray_vlora_requests_total", status="200", **m) >= n_req
                     and value(s, "ray_vlora_request_queue_time_seconds_count", **m) >= n_req,
                     what=f"{n_req} requests on {adapter}")
    after = settled(metrics_url, ["ray_vlora_requests_total", "ray_vlora_generation_tokens_total"], **m)

    assert value(after, "ray_vlora_requests_total", status="200", **m) == n_req
    assert value(after, "ray_vlora_requests_total", **m) == n_req  # no other status for this adapter
    assert value(after, "ray_vlora_prompt_tokens_total", **m) == prompt
    assert value(after, "ray_vlora_generation_tokens_total", **m) == completion
    for reason, k in by_reason.items():
        assert value(after, "ray_vlora_request_success_total", finished_reason=reason, **m) == k, reason
    for hist in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_prompt_tokens",
                 "request_generation_tokens"):
        assert value(after, f"ray_vlora_{hist}_count", **m) == n_req, hist
    # Ray rebuilds histograms from bucket counts (their _sum is approximate): the buckets are exact
    for hist, column in (("request_prompt_tokens", 0), ("request_generation_tokens", 1)):
        buckets = {float(lab["le"]): v for n, lab, v in after if n == f"ray_vlora_{hist}_bucket"
                   and lab.get("application") == APP and lab.get("model_name") == adapter}
        assert buckets and buckets[float("inf")] == n_req
        for le, count in buckets.items():
            assert count == sum(1 for row in sent if row[column] <= le), (hist, le)
    # one inter-token gap per decode step after the first: steps = max tokens over a request's choices
    assert value(after, "ray_vlora_inter_token_latency_seconds_count", **m) > 0
    # Decoder side: every request's queue time, on whichever replica served it
    assert value(after, "ray_vlora_request_queue_time_seconds_count", **m) == n_req
    assert value(after, "ray_vlora_requests_total", model_name="unknown", status="404") >= 1
    # two images preprocessed; the VisionEncoder missed once and hit once
    delta = lambda name: value(after, name) - value(before, name)  # noqa: E731
    assert delta("ray_vlora_images_preprocessed_total") == 2
    assert delta("ray_vlora_vision_cache_misses_total") == 1
    assert delta("ray_vlora_vision_cache_hits_total") == 1
    assert value(after, "ray_vlora_vision_cache_bytes") > 0
    assert value(after, "ray_vlora_image_preprocess_seconds_count") >= 2

    logs = request_log_lines(rids)
    for rid, (p, c, _) in zip(rids, sent):
        line = logs[rid]
        assert (line["status"], line["outcome"], line["model"], line["adapter"]) == (200, "ok", adapter, adapter)
        assert (line["prompt_tokens"], line["completion_tokens"], line["adapter_version"]) == (p, c, 1)
        assert 0 < line["ttft_ms"] <= line["latency_ms"]
    assert [logs[rid]["stream"] for rid in rids[-2:]] == [True, True]


def test_adapter_versions_swaps_and_learn_jobs(base_url, metrics_url, adapter):
    m = {"model_name": adapter}
    assert learn(base_url, adapter).status_code == 200  # version 2 (the fixture's learn made version 1)
    bad = learn(base_url, adapter, examples=[{"messages": []}])  # a job that fails on its data
    assert bad.status_code == 400, bad.text
    samples = wait_for(metrics_url, lambda s: value(s, "ray_vlora_learn_jobs_total", **m) >= 3
                       and value(s, "ray_vlora_adapter_swaps_total", **m) >= 2
                       and set(per_replica(s, "ray_vlora_adapter_version", **m).values()) == {2.0},
                       what=f"learn jobs and swaps of {adapter}")
    samples = settled(metrics_url, ["ray_vlora_learn_jobs_total", "ray_vlora_adapter_swaps_total"], **m)
    assert value(samples, "ray_vlora_learn_jobs_total", status="succeeded", code="200", **m) == 2
    assert value(samples, "ray_vlora_learn_jobs_total", status="failed", code="400", **m) == 1
    assert value(samples, "ray_vlora_learn_job_duration_seconds_count", **m) == 2
    assert value(samples, "ray_vlora_adapter_publish_latency_seconds_count", **m) == 2
    assert value(samples, "ray_vlora_learn_loss", phase="before", **m) > 0
    assert value(samples, "ray_vlora_learn_loss", phase="after", **m) == value(samples, "ray_vlora_learn_loss",
                                                                                phase="before", **m)  # steps=0
    # the replicas that held the adapter (fetched v1 on first use) replaced it by v2 before the learn
    # returned: two installs each, each one timed
    versions = per_replica(samples, "ray_vlora_adapter_version", **m)
    assert 1 <= len(versions) <= 2 and set(versions.values()) == {2.0}
    assert set(per_replica(samples, "ray_vlora_adapter_swaps_total", **m).values()) == {2.0}
    assert value(samples, "ray_vlora_adapter_swap_latency_seconds_count", **m) == 2 * len(versions)
    seqs = per_replica(samples, "ray_vlora_adapter_sync_seq")
    assert len(seqs) == 2 and len(set(seqs.values())) == 1  # no sync lag once idle


def test_engine_gauges_and_an_aborted_stream(base_url, metrics_url):
    """A long stream holds KV blocks (the gauge shows them); the client leaves: 499 in the log and counter,
    and the KV-blocks-used gauge of every replica is back to zero."""
    name = f"metrics-abort-{uuid.uuid4().hex[:6]}"
    assert learn(base_url, name).status_code == 200
    total = per_replica(scrape(metrics_url), "ray_vlora_kv_cache_blocks_total")
    assert len(total) == 2 and all(v > 0 for v in total.values())
    body = {"model": name, "messages": chat("Count to one thousand"), "max_tokens": 900, "stream": True,
            "temperature": 0, "ignore_eos": True}
    busy = None
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, headers=AUTH, timeout=60) as r:
        assert r.status_code == 200
        rid = r.headers["x-request-id"].split(",")[0].strip()
        lines = r.iter_lines()
        assert any(next(lines).startswith("data: ") for _ in range(4))
        deadline = time.time() + 20
        while busy is None and time.time() < deadline and sum(
                s["num_requests"] for s in decoder_stats().values()) > 0:
            s = scrape(metrics_url)
            if value(s, "ray_vlora_kv_cache_blocks_used") > 0 and value(s, "ray_vlora_num_requests_running") >= 1:
                busy = s
    assert busy is not None, "the KV gauge never showed the long request's blocks"
    assert 0 < value(busy, "ray_vlora_kv_cache_usage_perc") <= 2  # two replicas, each in [0, 1]
    idle = wait_for(metrics_url, lambda s: len(per_replica(s, "ray_vlora_kv_cache_blocks_used")) == 2
                    and set(per_replica(s, "ray_vlora_kv_cache_blocks_used").values()) == {0.0}
                    and value(s, "ray_vlora_num_requests_running") == 0
                    and value(s, "ray_vlora_num_requests_waiting") == 0
                    and value(s, "ray_vlora_requests_total", model_name=name, status="499") == 1,
                    what="idle engines after the client left")
    assert value(idle, "ray_vlora_requests_total", model_name=name) == 1
    assert value(idle, "ray_vlora_kv_cache_usage_perc") == 0
    line = request_log_lines([rid])[rid]
    assert (line["status"], line["outcome"], line["stream"], line["adapter"]) == (499, "aborted", True, name)
    assert 0 < line["completion_tokens"] < 900


def test_health_reflects_every_deployment(base_url):
    r = httpx.get(f"{base_url}/health", timeout=30)
    assert r.status_code == 200, r.text
    assert set(r.json()["deployments"].values()) == {"ready"}


def test_dashboard_queries_only_metrics_the_endpoint_exports(metrics_url):
    """Every panel's query names a metric this module saw on Ray's endpoint (run after the traffic above)."""
    scrape(metrics_url)
    with open(DASHBOARD) as f:
        dash = json.load(f)
    names = dashboard_metric_names(dash)
    assert names, "the dashboard queries no metrics"
    missing = sorted(names - SEEN)
    assert not missing, f"dashboard queries metrics the endpoint does not export: {missing}"


# -- request log lines ------------------------------------------------------------------------------------
def request_log_lines(rids: list[str], timeout: float = 30.0) -> dict[str, dict]:
    """The Ingress replicas' request log lines (JSON after Serve's prefix) for these request ids."""
    import ray

    logs_dir = os.path.join(ray._private.worker._global_node.get_logs_dir_path(), "serve")
    deadline = time.time() + timeout
    while True:
        found: dict[str, dict] = {}
        for path in glob.glob(os.path.join(logs_dir, f"replica_{APP}_Ingress_*.log*")):
            with open(path, errors="replace") as f:
                for text in f:
                    if '"event":"vlora.request"' not in text:
                        continue
                    line = json.loads(text[text.index("{"):])
                    if line["request_id"] in rids:
                        found[line["request_id"]] = line
        if len(found) == len(set(rids)) or time.time() > deadline:
            missing = set(rids) - set(found)
            assert not missing, f"no request log line for {sorted(missing)} in {logs_dir}"
            return found
        time.sleep(0.5)
