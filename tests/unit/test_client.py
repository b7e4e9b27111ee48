"""The client and the `vlora` CLI against a fake OpenAI server on loopback.

The fake answers with canned OpenAI-shaped JSON and SSE and records every request, so the
tests check what goes over the wire (image data URLs, models, stream options) and what the
user sees (streamed text, tables, error lines, bench counts), with no model and no Ray.
"""

from __future__ import annotations

import base64
import io
import json
import time
from collections import Counter

import pytest
from PIL import Image

from vlora.client import VloraClient, image_part, user_message
from vlora.client.cli import build_parser, main
from tests.unit.fake_server import SSE, FakeServer, server_fixture

BASE = "tiny-qwen"
PIECES = ["Hel", "lo, ", "wörld", "!"]  # non-ASCII on purpose: the CLI must print it exactly
USAGE = {BASE: 4, "a1": 7}  # completion tokens the fake reports per model
MODELS = {"object": "list", "data": [
    {"id": BASE, "object": "model", "created": 1, "owned_by": "vlora", "root": BASE, "parent": None},
    {"id": "a1", "object": "model", "created": 1, "owned_by": "vlora", "root": "a1", "parent": BASE, "version": 2},
]}


class OpenAIServer(FakeServer):
    """Just enough of the OpenAI API: models, health, and chat completions (JSON or SSE)."""

    def route(self, method, path, body, headers):
        if method == "GET":
            if path == "/v1/models":
                return 200, MODELS
            if path == "/health":
                return 200, {"status": "ok", "model": BASE,
                             "deployments": {"decoder": "ready", "preprocessor": "ready"}}
            return 404, {"error": {"message": f"no route {path}", "type": "not_found"}}
        if path != "/v1/chat/completions":
            return 404, {"error": {"message": "no route", "type": "not_found"}}
        model = body["model"]
        if model not in USAGE and model != "slow":
            return 404, {"error": {"message": f"The model '{model}' does not exist",
                                   "type": "NotFoundError", "param": "model", "code": 404}}
        time.sleep(1.0 if model == "slow" else 0.02)  # lets concurrent requests overlap
        reply_headers = {"x-request-id": "r1", "x-vlora-replica": "d0"}
        usage = {"prompt_tokens": 11, "completion_tokens": USAGE.get(model, 1),
                 "total_tokens": 11 + USAGE.get(model, 1)}
        base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": model}
        if not body.get("stream"):
            message = {"role": "assistant", "content": "".join(PIECES)}
            return 200, {**base, "object": "chat.completion", "usage": usage, "choices": [
                {"index": 0, "finish_reason": "length", "message": message}]}, reply_headers
        extra = {"adapter": model, "adapter_version": 2} if model == "a1" else {}
        deltas = [{"role": "assistant", "content": ""}] + [{"content": p} for p in PIECES]
        events = [{**base, **extra, "choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in deltas]
        events.append({**base, **extra, "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
        if (body.get("stream_options") or {}).get("include_usage"):
            events.append({**base, **extra, "choices": [], "usage": usage})
        return SSE(events, reply_headers)


fake = server_fixture(OpenAIServer)


@pytest.fixture
def png(tmp_path):
    path = tmp_path / "img.png"
    Image.new("RGB", (8, 6), (200, 30, 40)).save(path)
    return path


def test_chat_streams_text_and_sends_image_as_data_url(fake, png, capsys):
    assert main(["--url", fake.url, "chat", "hi", "--image", str(png)]) == 0
    out = capsys.readouterr().out
    assert out == "".join(PIECES) + "\n"
    (body,) = fake.chats()
    assert body["model"] == BASE  # default: the model without a parent in /v1/models
    assert body["stream"] is True
    (msg,) = body["messages"]
    assert msg["role"] == "user"
    image, text = msg["content"]
    assert image == {"type": "image_url", "image_url": {
        "url": "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()}}
    assert text == {"type": "text", "text": "hi"}


def test_chat_options_after_subcommand_and_sampling_params(fake, capsys):
    assert main(["chat", "--url", fake.url, "--api-key", "k1", "yo", "--model", "a1", "--system", "be brief",
                 "--max-tokens", "5", "--temperature", "0.5", "--seed", "7", "-v"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "".join(PIECES) + "\n"
    assert "adapter_version 2" in captured.err and "7 completion tokens" in captured.err
    (body,) = fake.chats()
    assert body["model"] == "a1"
    assert body["messages"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "yo"}]
    assert (body["max_tokens"], body["temperature"], body["seed"]) == (5, 0.5, 7)
    assert all(r["headers"]["authorization"] == "Bearer k1" for r in fake.requests)


def test_chat_interactive_keeps_history_and_stops_on_empty_line(fake, png, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("first\nsecond\n\nnever sent\n"))
    assert main(["--url", fake.url, "chat", "--model", BASE, "--image", str(png)]) == 0
    assert capsys.readouterr().out == ("".join(PIECES) + "\n") * 2
    first, second = fake.chats()
    assert first["messages"][0]["content"][0]["type"] == "image_url"
    answer = {"role": "assistant", "content": "".join(PIECES)}
    assert second["messages"][1:] == [answer, {"role": "user", "content": "second"}]
    assert second["messages"][0] == first["messages"][0]  # the image stays in the history


def test_server_error_exits_1_with_one_line(fake, capsys):
    assert main(["--url", fake.url, "chat", "hi", "--model", "missing"]) == 1
    captured = capsys.readouterr()
    assert captured.err == "error: 404 The model 'missing' does not exist\n"
    assert captured.out == ""


def test_unreachable_server_is_an_error_line(capsys):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    assert main(["--url", url, "--retries", "0", "models"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot reach {url}") and "Traceback" not in err


def test_models_table(fake, capsys):
    assert main(["--url", fake.url, "models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ID", "PARENT", "VERSION"]
    assert lines[1].split() == [BASE, "-", "-"]
    assert lines[2].split() == ["a1", BASE, "2"]


def test_health(fake, capsys):
    assert main(["--url", fake.url, "health"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"ok  model {BASE}") and "decoder" in out
    h = VloraClient(fake.url, api_key="sekret").health()
    assert h["status"] == "ok"
    assert fake.requests[-1]["headers"]["authorization"] == "Bearer sekret"


def test_bench_counts_requests_models_and_tokens(fake, tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["--url", fake.url, "bench", "--requests", "6", "--concurrency", "3", "--adapters", "a1",
               "--json", str(out), "--no-progress", "--max-tokens", "8"])
    assert rc == 0
    chats = fake.chats()
    assert len(chats) == 6
    assert Counter(b["model"] for b in chats) == {BASE: 3, "a1": 3}
    assert all(b["stream"] and b["stream_options"] == {"include_usage": True} and b["max_tokens"] == 8
               for b in chats)
    assert fake.max_in_flight <= 3
    # round(6 * 0.3) = 2 requests carry a 224x224 noise PNG
    images = [p["image_url"]["url"] for b in chats for p in b["messages"][0]["content"]
              if isinstance(p, dict) and p.get("type") == "image_url"]
    assert len(images) == 2
    for url in images:
        assert url.startswith("data:image/png;base64,")
        assert Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size == (224, 224)

    report = json.loads(out.read_text())
    assert report["successes"] == 6 and report["failures"] == 0 and report["errors"] == {}
    assert report["output_tokens"] == 3 * USAGE[BASE] + 3 * USAGE["a1"]
    assert report["prompt_tokens"] == 6 * 11
    assert report["tokens_from_usage"] is True
    assert report["per_model"][BASE]["output_tokens"] == 3 * USAGE[BASE]
    assert report["per_model"]["a1"]["successes"] == 3
    assert report["image_requests"] == 2
    assert 0 < report["ttft_s"]["p50"] <= report["latency_s"]["p50"]
    assert report["requests_per_s"] > 0 and report["output_tokens_per_s"] > 0
    printed = capsys.readouterr().out
    assert "TTFT" in printed and "req/s" in printed and "tok/s" in printed


def test_bench_counts_errors_by_status(fake, tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["--url", fake.url, "bench", "--requests", "4", "--concurrency", "2", "--adapters", "nope",
               "--image-share", "0", "--json", str(out), "--no-progress"])
    assert rc == 1  # any failure makes the run fail, so scripts notice
    report = json.loads(out.read_text())
    assert (report["successes"], report["failures"]) == (2, 2)
    assert report["errors"] == {"404": 2}
    assert report["error_examples"]["404"] == "The model 'nope' does not exist"
    assert "404 x2" in capsys.readouterr().out


def test_bench_stops_at_its_time_cap(fake, tmp_path):
    out = tmp_path / "bench.json"
    t0 = time.perf_counter()
    main(["--url", fake.url, "bench", "--model", "slow", "--requests", "50", "--concurrency", "2",
          "--duration-s", "0.3", "--image-share", "0", "--json", str(out), "--no-progress"])
    assert time.perf_counter() - t0 < 0.9  # the fake takes 1 s per request
    report = json.loads(out.read_text())
    assert (report["requests_sent"], report["successes"], report["cancelled"]) == (2, 0, 2)


def test_image_part_and_user_message(tmp_path, png):
    url = "https://example.com/cat.jpg"
    assert image_part(url) == {"type": "image_url", "image_url": {"url": url}}
    jpeg = tmp_path / "photo.bin"  # the content decides the mime type, not the extension
    Image.new("RGB", (4, 4)).save(jpeg, format="JPEG")
    assert image_part(jpeg)["image_url"]["url"].startswith("data:image/jpeg;base64,")
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    with pytest.raises(ValueError):
        image_part(notes)
    assert user_message("hello") == {"role": "user", "content": "hello"}
    assert [p["type"] for p in user_message("what?", [png])["content"]] == ["image_url", "text"]


def test_client_chat_defaults_to_base_model(fake):
    c = VloraClient(fake.url)
    resp = c.chat("hello", max_tokens=3)
    assert resp.choices[0].message.content == "".join(PIECES)
    assert fake.chats()[-1]["model"] == BASE
    assert [m["id"] for m in c.models()] == [BASE, "a1"]


def test_tiny_model_command_still_parses():
    args = build_parser().parse_args(["tiny-model", "out_dir", "--seed", "3"])
    assert (args.dir, args.seed, args.func.__name__) == ("out_dir", 3, "_cmd_tiny_model")
