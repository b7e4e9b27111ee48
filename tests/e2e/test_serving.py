"""The OpenAI-compatible service end to end, through Ray Serve, with the official `openai` SDK."""

from __future__ import annotations

import base64
import io
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from vlora.deployments.config import AppConfig
from vlora.deployments.preprocessor import Preprocessor
from vlora.deployments.vision_encoder import VisionEncoderDeployment
from vlora.engine.config import EngineConfig
from vlora.engine.engine import LLMEngine
from vlora.engine.sampling import SamplingParams
from vlora.deployments.app import decoder_stats
from tests.e2e.conftest import API_KEY
from tests.unit.oracle import random_image

pytestmark = pytest.mark.e2e


def data_url(seed: int, h: int, w: int) -> str:
    buf = io.BytesIO()
    random_image(seed, h, w).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def user(text: str, images: list[str] = ()) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in images] + [{"type": "text", "text": text}]
    return [{"role": "user", "content": parts}]


@pytest.fixture(scope="module")
def local(tiny_model_dir):
    """The same pipeline in-process, without Serve: the expected output for each request."""
    cfg = AppConfig(model_dir=str(tiny_model_dir))
    return Preprocessor(cfg), VisionEncoderDeployment(cfg), LLMEngine(EngineConfig(str(tiny_model_dir), max_loras=0))


def engine_text(local, messages, sampling: SamplingParams) -> tuple[str, int]:
    """(text, prompt tokens) the in-process pipeline produces."""
    import asyncio

    pre, vis, eng = local
    prepared = asyncio.run(pre.prepare_chat(messages))
    encoded = asyncio.run(vis.encode(prepared))
    rid = eng.add_request(encoded.prompt, sampling, image_embeds=encoded.image_embeds)
    text = ""
    while eng.has_unfinished():
        for o in eng.step():
            assert o.request_id == rid
            text += "".join(c.text for c in o.choices)
    return text, len(encoded.prompt.token_ids)


@pytest.mark.parametrize("images", [[], [(56, 84)], [(84, 56), (112, 140)]], ids=["text", "one-image", "two-images"])
def test_greedy_chat_equals_engine_output(client, local, images):
    msgs = user("What colour is this?", [data_url(i, h, w) for i, (h, w) in enumerate(images)])
    resp = client.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=16)
    expected, prompt_len = engine_text(local, msgs, SamplingParams(max_tokens=16, temperature=0))
    assert resp.choices[0].message.content == expected
    assert resp.choices[0].message.role == "assistant"
    assert resp.usage.prompt_tokens == prompt_len
    image_tokens = sum((h // 28) * (w // 28) for h, w in images)
    assert prompt_len > image_tokens >= (6 if images else 0)
    assert resp.choices[0].finish_reason in ("stop", "length")


def test_streaming_chunks_concatenate_to_the_full_text(client):
    msgs = user("Describe the image in detail.", [data_url(7, 56, 56)])
    full = client.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=24)
    stream = client.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=24, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def _streamed(chunks) -> tuple[dict[int, str], dict[int, list], dict[int, str]]:
    """Per choice index: the concatenated text, the logprob entries and the finish reason of a stream."""
    text, lps, finish = {}, {}, {}
    for c in chunks:
        for ch in c.choices:
            text[ch.index] = text.get(ch.index, "") + (ch.delta.content or "")
            if ch.logprobs is not None:
                lps.setdefault(ch.index, []).extend(ch.logprobs.content)
            if ch.finish_reason:
                finish[ch.index] = ch.finish_reason
    return text, lps, finish


def test_batched_stream_equals_the_non_streamed_answer_with_usage_and_logprobs(client, local):
    """Greedy, 48 tokens: the stream's items group several steps, yet text, logprobs and usage match."""
    msgs = user("Tell me everything about foxes.")
    kw = dict(model="tiny", messages=msgs, temperature=0, max_tokens=48, logprobs=True, top_logprobs=2,
              extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text, lps, finish = _streamed(chunks)
    expected, prompt_len = engine_text(local, msgs, SamplingParams(max_tokens=48, temperature=0, ignore_eos=True))
    assert text == {0: full.choices[0].message.content} and text[0] == expected
    assert finish == {0: "length"} == {0: full.choices[0].finish_reason}
    want = full.choices[0].logprobs.content
    assert len(want) == 48 and len(lps[0]) == 48
    assert [e.token for e in lps[0]] == [e.token for e in want]
    assert [e.logprob for e in lps[0]] == pytest.approx([e.logprob for e in want], abs=1e-5)
    assert [[t.token for t in e.top_logprobs] for e in lps[0]] == [[t.token for t in e.top_logprobs] for e in want]
    assert "".join(e.token for e in want) == expected  # one entry per generated token, in order
    usage = chunks[-1].usage
    assert chunks[-1].choices == []
    assert (usage.prompt_tokens, usage.completion_tokens) == (full.usage.prompt_tokens, 48) == (prompt_len, 48)


def test_batched_stream_keeps_each_of_n_choices_apart(client):
    kw = dict(model="tiny", messages=user("Name three colours."), n=2, temperature=0.9, seed=11, max_tokens=20,
              logprobs=True, extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text, lps, finish = _streamed(chunks)
    assert text == {c.index: c.message.content for c in full.choices}
    assert {i: [e.token for e in v] for i, v in lps.items()} == \
        {c.index: [e.token for e in c.logprobs.content] for c in full.choices}
    assert finish == {0: "length", 1: "length"}
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens == 40
    roles = [ch.index for c in chunks for ch in c.choices if ch.delta.role == "assistant"]
    assert sorted(roles) == [0, 1]  # the role once per choice, on its first chunk


def test_batched_completion_stream_continues_text_offsets(client):
    kw = dict(model="tiny", prompt="Once upon a time", temperature=0, max_tokens=32, logprobs=1,
              extra_body={"ignore_eos": True})
    full = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, **kw))
    text = "".join(ch.text for c in chunks for ch in c.choices)
    tokens = [t for c in chunks for ch in c.choices if ch.logprobs for t in ch.logprobs.tokens]
    offsets = [o for c in chunks for ch in c.choices if ch.logprobs for o in ch.logprobs.text_offset]
    assert text == full.choices[0].text
    assert tokens == full.choices[0].logprobs.tokens and len(tokens) == 32
    assert offsets == full.choices[0].logprobs.text_offset


def test_n_and_logprobs_shapes(client):
    resp = client.chat.completions.create(model="tiny", messages=user("Hello"), n=2, temperature=0.9, seed=3,
                                          max_tokens=8, logprobs=True, top_logprobs=3)
    assert [c.index for c in resp.choices] == [0, 1]
    total = 0
    for c in resp.choices:
        entries = c.logprobs.content
        assert len(entries) >= 1
        total += len(entries)
        for e in entries:
            assert e.logprob <= 0 and len(e.top_logprobs) == 3
            assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)
            assert e.logprob <= e.top_logprobs[0].logprob + 1e-6
    assert resp.usage.completion_tokens == total


def test_completions_endpoint(client, local):
    resp = client.completions.create(model="tiny", prompt="The quick brown fox", temperature=0, max_tokens=10)
    _, _, eng = local
    ids = eng.tokenizer("The quick brown fox").input_ids
    eng.add_request(ids, SamplingParams(max_tokens=10, temperature=0))
    text = ""
    while eng.has_unfinished():
        text += "".join(c.text for o in eng.step() for c in o.choices)
    assert resp.choices[0].text == text
    assert resp.usage.prompt_tokens == len(ids)


def test_models_lists_the_base_model(client):
    models = client.models.list().data
    base = [m for m in models if m.id == "tiny"]
    assert base and getattr(base[0], "parent", None) is None


def test_health_reports_every_deployment(base_url):
    r = httpx.get(f"{base_url}/health")
    assert r.status_code == 200
    assert r.json()["deployments"] == {"preprocessor": "ready", "vision_encoder": "ready", "decoder": "ready",
                                       "trainer": "ready", "adapter_store": "ready"}


def test_the_api_port_is_haproxy_passing_requests_and_their_ids_to_the_ingress(base_url):
    """The cluster runs with `cluster_env()` as `make serve` does (HAProxy ships with ray[serve] on Linux):
    Serve's HAProxy owns the API port and hands each request to an Ingress replica's own HTTP server (no Python proxy actor in between);
    a client's x-request-id comes back on the response, as through Serve's proxy."""
    import psutil

    port = int(base_url.rsplit(":", 1)[1])
    owners = set()
    for c in psutil.net_connections("tcp"):
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port and c.pid:
            try:
                owners.add(psutil.Process(c.pid).name())
            except psutil.Error:  # an HAProxy worker that a reload just retired
                pass
    assert owners == {"haproxy"}
    r = httpx.get(f"{base_url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}", "x-request-id": "req-42"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "req-42"
    assert "tiny" in [m["id"] for m in r.json()["data"]]


# -- errors ----------------------------------------------------------------------------------

def test_invalid_parameter_is_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=user("hi"), temperature=3)
    assert e.value.status_code == 400 and "temperature" in e.value.message


def test_malformed_json_is_400(base_url):
    r = httpx.post(f"{base_url}/v1/chat/completions", content=b"{not json",
                   headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400
    assert "not valid JSON" in r.json()["error"]["message"]
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_bad_image_is_400(client):
    bad = "data:image/png;base64," + base64.b64encode(b"this is not an image").decode()
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=user("What is this?", [bad]), max_tokens=4)
    assert "invalid image" in e.value.message


def test_prompt_longer_than_context_is_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=user("word " * 1200), max_tokens=4)
    assert "maximum context length is 1024 tokens" in e.value.message


def test_missing_or_wrong_api_key_is_401(base_url):
    r = httpx.post(f"{base_url}/v1/chat/completions", json={"model": "tiny", "messages": user("hi")})
    assert r.status_code == 401 and "missing API key" in r.json()["error"]["message"]
    wrong = openai.OpenAI(base_url=f"{base_url}/v1", api_key="wrong-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.chat.completions.create(model="tiny", messages=user("hi"), max_tokens=2)
    assert "incorrect API key" in e.value.message
    assert r.json()["error"]["type"] == "authentication_error"


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-adapter", messages=user("hi"), max_tokens=2)
    assert "no-such-adapter" in e.value.message and "does not exist" in e.value.message


def test_overloaded_is_503_with_retry_after(base_url):
    body = {"model": "tiny", "messages": user("Tell me a long story"), "max_tokens": 300, "temperature": 0,
            "ignore_eos": True}

    def send(_):
        return httpx.post(f"{base_url}/overload/v1/chat/completions", json=body,
                          headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120)

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(send, range(6)))
    codes = sorted(r.status_code for r in results)
    assert codes.count(200) >= 1 and codes.count(503) >= 1, codes
    assert set(codes) <= {200, 503}
    over = next(r for r in results if r.status_code == 503)
    assert over.headers["retry-after"] == "1"
    assert "overloaded" in over.json()["error"]["message"]


# -- resources -------------------------------------------------------------------------------

def test_client_disconnect_mid_stream_frees_kv_blocks(base_url):
    body = {"model": "tiny", "messages": user("Count to one thousand"), "max_tokens": 600, "stream": True,
            "temperature": 0, "ignore_eos": True}
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in got)
        busy = decoder_stats()
        assert sum(s["num_requests"] for s in busy.values()) >= 1
    deadline = time.time() + 30
    while True:
        stats = decoder_stats()
        if all(s["kv_blocks_used"] == 0 and s["num_requests"] == 0 for s in stats.values()):
            break
        assert time.time() < deadline, f"KV blocks not freed after disconnect: {stats}"
        time.sleep(0.2)


def test_32_concurrent_requests_across_two_decoder_replicas(client):
    def one(i):
        raw = client.chat.completions.with_raw_response.create(
            model="tiny", messages=user(f"Question {i}: what is two plus two?"), max_tokens=8, temperature=0)
        return raw.headers["x-vlora-replica"], raw.parse()

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(32)))
    assert len(results) == 32
    assert all(r.choices[0].finish_reason in ("stop", "length") for _, r in results)
    assert len({replica for replica, _ in results}) == 2
    assert all(s["kv_blocks_used"] == 0 for s in decoder_stats().values())


def test_vision_cache_serves_a_repeated_image_without_reencoding(client):
    from ray import serve

    vis = serve.get_deployment_handle("VisionEncoder", app_name="vlora")
    url = data_url(123, 70, 98)
    before = vis.stats.remote().result()
    first = client.chat.completions.create(model="tiny", messages=user("What is this?", [url]), max_tokens=6,
                                           temperature=0)
    mid = vis.stats.remote().result()
    second = client.chat.completions.create(model="tiny", messages=user("What is this?", [url]), max_tokens=6,
                                            temperature=0)
    after = vis.stats.remote().result()
    assert mid["misses"] == before["misses"] + 1 and mid["hits"] == before["hits"]
    assert after["hits"] == mid["hits"] + 1 and after["misses"] == mid["misses"]
    assert second.choices[0].message.content == first.choices[0].message.content
