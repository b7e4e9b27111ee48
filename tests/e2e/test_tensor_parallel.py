"""The `vlora` app's Decoder replicas are tensor-parallel (2 replicas x 2 ranks, see conftest.py): every
serving and adapter test runs through them. Here: that they really are, and what losing a rank does.
This file runs last (it replaces one Decoder replica of the shared app)."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from vlora.deployments.app import decoder_stats
from tests.e2e.test_security import AUTH, assert_serves, health, user

pytestmark = pytest.mark.e2e


def test_both_decoder_replicas_serve_through_two_ranks(base_url):
    r = httpx.post(f"{base_url}/v1/chat/completions", headers=AUTH, timeout=60,
                   json={"model": "tiny", "messages": user("hi"), "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    stats = decoder_stats()
    assert [s["tensor_parallel"]["size"] for s in stats.values()] == [2, 2]
    # every forward of the session went through the group (the workers ran the same number)
    assert sum(s["tensor_parallel"]["steps"] for s in stats.values()) >= sum(
        s["engine_loop"]["steps"] for s in stats.values()) > 0


def _stream(base_url, body, out: dict, key: str, started: threading.Event) -> None:
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json={**body, "stream": True}, headers=AUTH,
                      timeout=120) as r:
        out[key] = {"status": r.status_code, "replica": r.headers.get("x-vlora-replica"), "events": []}
        for line in r.iter_lines():
            if line.startswith("data: "):
                out[key]["events"].append(line[6:])
                started.set()


def test_killing_a_tp_worker_fails_that_replicas_requests_and_it_is_replaced(base_url):
    """Rank 1 of one replica is killed while both replicas stream: that replica's streams end with an
    in-band 5xx error then [DONE], the other replica's streams finish, new requests are served, /health
    reports the replica, and Serve replaces it (2 replicas healthy again)."""
    from ray import serve

    body = {"model": "tiny", "messages": user("Tell me a long story"), "max_tokens": 900, "temperature": 0,
            "ignore_eos": True}
    out, threads = {}, []
    for i in range(8):  # until both replicas have a stream in flight
        started = threading.Event()
        t = threading.Thread(target=_stream, args=(base_url, body, out, i, started))
        t.start()
        threads.append(t)
        assert started.wait(60), "a stream never started"
        if len({o["replica"] for o in out.values()}) == 2:
            break
    assert len({o["replica"] for o in out.values()}) == 2, out
    killed = serve.get_deployment_handle("Decoder", app_name="vlora").kill_tp_worker_drill.remote(1).result(
        timeout_s=30)
    for t in threads:
        t.join(120)
        assert not t.is_alive(), "a stream hung"
    for o in out.values():
        assert o["status"] == 200 and o["events"][-1] == "[DONE]"
        last = json.loads(o["events"][-2])
        if o["replica"] == killed:
            err = last["error"]
            assert err["type"] == "server_error" and "tensor-parallel peer stopped answering" in err["message"], err
        else:
            assert "error" not in last and last["choices"][0]["finish_reason"] == "length", last
    # the other replica keeps serving while the broken one is noticed and replaced; a request routed to
    # the broken one before Serve removes it gets a JSON 503 to retry
    served = 0
    for _ in range(8):
        r = httpx.post(f"{base_url}/v1/chat/completions", headers=AUTH, timeout=60,
                       json={"model": "tiny", "messages": user("still there?"), "max_tokens": 4, "temperature": 0})
        if r.status_code == 200:
            assert r.headers["x-vlora-replica"] != killed
            served += 1
        else:
            assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
            assert "tensor-parallel peer stopped answering" in r.json()["error"]["message"]
    assert served >= 1
    deadline = time.time() + 240
    seen_degraded = False
    while True:
        h = health(base_url, "")
        if h is not None and h.status_code == 503:
            seen_degraded = True
        if h is not None and h.status_code == 200 and seen_degraded:
            dec = h.json()["replicas"]["decoder"]
            if dec["running"] == 2 and dec["status"] == "HEALTHY":
                try:  # until Serve's health check has retired the broken replica (it answers with an error)
                    stats = decoder_stats()
                except Exception:  # noqa: BLE001 - reached the broken replica: not replaced yet
                    stats = {killed: None}
                if killed not in stats:
                    break
        assert time.time() < deadline, f"the replica was never replaced: {h.text if h is not None else 'timeout'}"
        time.sleep(0.5)
    assert all(s["tensor_parallel"]["size"] == 2 for s in stats.values())
    assert_serves(base_url)
