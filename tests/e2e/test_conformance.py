"""Drop-in for vLLM users, through Ray Serve: start-up adapters (a folder and a memory:// URI) answer
like HF+PEFT, URI loads and 404s for missing folders, one x-request-id, OpenAI JSON on unknown routes,
batch / token-id prompts and one choice per chunk through the SDK, and /metrics on the API port
in vLLM's names (a vLLM dashboard query reads the tokens sent; only live replicas are listed)."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from vlora.deployments.app import decoder_stats
from tests.e2e.conftest import ADMIN_KEY, API_KEY
from tests.e2e.test_adapters import assert_served_like_hf_peft
from tests.unit.oracle import random_peft_adapter
from tests.unit.test_api_metrics import query_sum_by_model, samples

pytestmark = pytest.mark.e2e

AUTH = {"Authorization": f"Bearer {API_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def test_adapters_registered_at_startup_answer_like_hf_peft(client, hf_model, tokenizer, serve_instance, base_url):
    listed = {a["name"]: a for a in httpx.get(f"{base_url}/v1/adapters", headers=ADMIN).json()["data"]}
    for name, (source, folder) in serve_instance["startup"].items():
        assert (listed[name]["origin"], listed[name]["source"], listed[name]["version"]) == ("loaded", source, 1)
        assert_served_like_hf_peft(client, name, folder, hf_model, tokenizer, "Which way to the station?")


def test_uri_loads_and_a_missing_folder_is_404(base_url, serve_instance, hf_model):
    uploads = serve_instance["uploads"]
    folder = random_peft_adapter(hf_model, uploads / "uri-a", seed=13, r=2, alpha=4)
    r = httpx.post(f"{base_url}/v1/adapters", json={"name": "uri-a", "path": f"file://{folder}"}, headers=ADMIN)
    assert r.status_code == 200, r.text
    assert (r.json()["version"], r.json()["source"]) == (1, f"file://{folder}")
    for route, body in (("/v1/adapters", {"name": "gone", "path": str(uploads / "missing")}),
                        ("/v1/load_lora_adapter", {"lora_name": "gone", "lora_path": str(uploads / "missing")})):
        r = httpx.post(f"{base_url}{route}", json=body, headers=ADMIN)
        assert r.status_code == 404, r.text
        assert r.json()["error"]["code"] == "adapter_source_not_found" and "does not exist" in r.text
    r = httpx.post(f"{base_url}/v1/adapters", json={"name": "m", "path": "memory://elsewhere/m"}, headers=ADMIN)
    assert r.status_code == 400 and "outside the locations" in r.json()["error"]["message"]


def test_one_request_id_and_openai_errors_on_every_route(base_url):
    body = {"model": "tiny", "prompt": "Hi", "max_tokens": 2}
    r = httpx.post(f"{base_url}/v1/completions", json=body, headers={**AUTH, "x-request-id": "mine-1"})
    assert r.status_code == 200 and r.headers.get_list("x-request-id") == ["mine-1"]
    r = httpx.post(f"{base_url}/v1/completions", json=body, headers=AUTH)
    assert len(r.headers.get_list("x-request-id")) == 1
    r = httpx.get(f"{base_url}/v1/no-such-route", headers=AUTH)
    assert r.status_code == 404 and len(r.headers.get_list("x-request-id")) == 1
    assert r.json() == {"error": {"message": "no route GET /v1/no-such-route; see /v1/models, /v1/chat/completions, "
                                             "/v1/completions", "type": "invalid_request_error", "param": None,
                                  "code": "not_found"}}
    r = httpx.post(f"{base_url}/v1/completions", content=json.dumps(body), headers={**AUTH, "content-type": "text/plain"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_media_type"


def test_batch_token_prompts_and_one_choice_per_chunk_through_the_sdk(client, tokenizer):
    ids = tokenizer("Once upon a time").input_ids
    greedy = dict(model="tiny", max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
    one = client.completions.create(prompt="Once upon a time", **greedy)
    batch = client.completions.create(prompt=[ids, "Once upon a time"], n=2, **greedy)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert {c.text for c in batch.choices} == {one.choices[0].text}
    stream = client.completions.create(prompt=[ids, ids], n=2, stream=True,
                                       stream_options={"include_usage": True}, **greedy)
    chunks = list(stream)
    assert all(len(ch.choices) == 1 for ch in chunks[:-1]) and chunks[-1].usage.completion_tokens == 16
    assert {ch.choices[0].index for ch in chunks[:-1]} == {0, 1, 2, 3}


def test_vllm_dashboard_query_on_the_api_port(base_url, client):
    def page() -> str:
        r = httpx.get(f"{base_url}/metrics")
        assert r.status_code == 200
        return r.text

    before = query_sum_by_model(page(), "vllm:generation_tokens_total").get("startup-mem", 0)
    sent = 0
    for prompt in ("a", "b c"):
        sent += client.completions.create(model="startup-mem", prompt=prompt, max_tokens=5, temperature=0,
                                          extra_body={"ignore_eos": True}).usage.completion_tokens
    text = page()
    assert query_sum_by_model(text, "vllm:generation_tokens_total")["startup-mem"] - before == sent == 10
    # the Decoder series come from exactly the live Decoder replicas (each pushes within a second)
    live = set(decoder_stats("vlora", replicas=2))
    deadline = time.time() + 10
    while True:
        seen = {lb["replica"] for n, lb, _ in samples(text) if n == "vllm:kv_cache_usage_perc"}
        if seen == live or time.time() > deadline:
            break
        time.sleep(0.5)
        text = page()
    assert seen == live
    for name in ("vllm:num_requests_running", "vllm:time_to_first_token_seconds_bucket", "vllm:lora_requests_info",
                 "vlora:adapter_version", "vlora:vision_cache_hits_total", "vlora:learn_jobs_in_progress"):
        assert name in {n for n, _, _ in samples(text)}, name
