"""OpenAI / vLLM conformance of the Ingress's routes, in process (the FastAPI app over ASGI with a real
Decoder on the tiny model, tests/unit/test_deadlines.py's stand-ins for Serve's handles): batch and
token-id prompts, one choice per stream chunk, range checks, Content-Type, min_tokens,
continuous usage stats, /tokenize and /detokenize, OpenAI error JSON on unknown routes."""

from __future__ import annotations

import asyncio
import json

import httpx
import torch
import pytest

from vlora.deployments.config import AppConfig
from vlora.deployments.messages import output_from_wire
from vlora.engine.sampling import SamplingParams
from tests.unit.test_deadlines import (  # noqa: F401 - decoder is a fixture (it reads this module's config)
    Store, client, decoder, idle, in_process_ingress, sse_events)


@pytest.fixture(scope="module")
def config(tiny_model_dir):
    return AppConfig(model_dir=str(tiny_model_dir), served_model_name="tiny", device="cpu", admin_open=True,
                     engine={"max_num_seqs": 8, "kv_cache_memory_mb": 4, "max_model_len": 1024})


@pytest.fixture
def ingress(config, decoder, monkeypatch):
    store = Store()
    store.slow = False
    return in_process_ingress(config, decoder, monkeypatch, store)


def run(coro_fn):
    async def go():
        async with client(timeout_s=60) as c:
            return await coro_fn(c)
    return asyncio.run(go())


GREEDY = {"model": "tiny", "temperature": 0, "ignore_eos": True}


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def test_batch_and_token_id_prompts_answer_like_single_prompts(ingress, decoder, tokenizer):
    prompts = ["The sky is", "Once upon a time", "1 2 3"]
    ids = tokenizer(prompts[1])["input_ids"]

    async def go(c):
        single = []
        for p in prompts:
            r = await c.post("/v1/completions", json={**GREEDY, "prompt": p, "max_tokens": 5})
            single.append(r.json()["choices"][0]["text"])
        r = await c.post("/v1/completions", json={**GREEDY, "prompt": prompts, "max_tokens": 5, "n": 2})
        assert r.status_code == 200, r.text
        body = r.json()
        assert [ch["index"] for ch in body["choices"]] == list(range(6))
        # choice i * n + j is sample j of prompt i; greedy samples agree
        assert [ch["text"] for ch in body["choices"]] == [t for t in single for _ in range(2)]
        lens = [len(tokenizer(p)["input_ids"]) for p in prompts]
        assert body["usage"] == {"prompt_tokens": sum(lens), "completion_tokens": 30, "total_tokens": sum(lens) + 30}
        r = await c.post("/v1/completions", json={**GREEDY, "prompt": ids, "max_tokens": 5})
        assert r.json()["choices"][0]["text"] == single[1]
        r = await c.post("/v1/completions", json={**GREEDY, "prompt": [ids, prompts[2]], "max_tokens": 5})
        assert [ch["text"] for ch in r.json()["choices"]] == [single[1], single[2]]
        # streamed: one choice per chunk, each choice's text the same as unary
        r = await c.post("/v1/completions", json={**GREEDY, "prompt": prompts, "max_tokens": 5, "n": 2,
                                                  "stream": True, "stream_options": {"include_usage": True}})
        events = sse_events(r)
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        texts = [""] * 6
        for ch in chunks[:-1]:
            assert len(ch["choices"]) == 1
            texts[ch["choices"][0]["index"]] += ch["choices"][0]["text"]
        assert texts == [ch["text"] for ch in body["choices"]]
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == body["usage"]
        for bad, msg in (([], "prompt must be a string"), ([[1, 2], 3], "prompt must be a string"),
                         ([ids[0], 10**9], "outside the vocabulary")):
            err = error_of(await c.post("/v1/completions", json={**GREEDY, "prompt": bad}), 400)
            assert msg in err["message"]
        image_pad = ingress.prompts.builder.config.image_token_id
        err = error_of(await c.post("/v1/completions", json={**GREEDY, "prompt": [ids[0], image_pad]}), 400)
        assert "vision tokens" in err["message"] and err["param"] == "prompt"
        await idle(decoder)

    run(go)


def test_streamed_n_sends_one_choice_per_chunk_with_continuous_usage(ingress, decoder):
    body = {**GREEDY, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 6, "n": 3, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}

    async def go(c):
        r = await c.post("/v1/chat/completions", json=body)
        chunks = [json.loads(e) for e in sse_events(r)[:-1]]
        final = chunks.pop()
        assert final["choices"] == [] and final["usage"]["completion_tokens"] == 18
        prompt_tokens = final["usage"]["prompt_tokens"]
        seen: dict[int, int] = {}
        for ch in chunks:
            (choice,) = ch["choices"]
            i = choice["index"]
            if i not in seen:
                assert choice["delta"]["role"] == "assistant"  # each choice's first chunk names the role
            # usage: this choice's tokens so far, never fewer than before
            assert ch["usage"]["prompt_tokens"] == prompt_tokens
            assert ch["usage"]["completion_tokens"] >= seen.get(i, 0)
            assert ch["usage"]["total_tokens"] == prompt_tokens + ch["usage"]["completion_tokens"]
            seen[i] = ch["usage"]["completion_tokens"]
        assert seen == {0: 6, 1: 6, 2: 6}
        # without continuous_usage_stats only the last chunk has usage
        r = await c.post("/v1/chat/completions", json={**body, "stream_options": {"include_usage": True}})
        chunks = [json.loads(e) for e in sse_events(r)[:-1]]
        assert all("usage" not in ch for ch in chunks[:-1]) and chunks[-1]["usage"]["completion_tokens"] == 18
        await idle(decoder)

    run(go)


def test_min_tokens_holds_back_stop_tokens_until_reached(ingress, decoder):
    msgs = [{"role": "user", "content": "Hello"}]

    async def go(c):
        plain = output_from_wire(await decoder.complete(ingress.prompts.chat(msgs), SamplingParams(
            max_tokens=6, temperature=0), None, "plain"))
        tid = plain.choices[0].token_ids[0]
        # the first token as a stop token ends the answer at once ...
        r = await c.post("/v1/chat/completions", json={**GREEDY, "messages": msgs, "max_tokens": 6,
                                                       "stop_token_ids": [tid]})
        assert r.json()["usage"]["completion_tokens"] == 1 and r.json()["choices"][0]["finish_reason"] == "stop"
        # ... unless min_tokens masks it: then 4 tokens at least, none of them the stop token
        r = await c.post("/v1/chat/completions", json={**GREEDY, "messages": msgs, "max_tokens": 6,
                                                       "stop_token_ids": [tid], "min_tokens": 4})
        assert r.json()["usage"]["completion_tokens"] >= 4
        # the engine's tokens: greedy with the stop token masked for the first 4 draws
        masked = output_from_wire(await decoder.complete(ingress.prompts.chat(msgs), SamplingParams(
            max_tokens=6, temperature=0, stop_token_ids=[tid], min_tokens=4), None, "masked"))
        got = masked.choices[0].token_ids
        assert len(got) >= 4 and tid not in got[:4] and got[0] != plain.choices[0].token_ids[0]
        err = error_of(await c.post("/v1/chat/completions", json={**GREEDY, "messages": msgs, "max_tokens": 2,
                                                                  "min_tokens": 3}), 400)
        assert err["param"] == "min_tokens" and "less than or equal to max_tokens=2" in err["message"]
        await idle(decoder)

    run(go)


def test_range_checks_image_url_shape_and_content_type_are_400s(ingress):
    msgs = [{"role": "user", "content": "Hello"}]

    async def go(c):
        for seed in (2**63, -(2**63) - 1):
            err = error_of(await c.post("/v1/chat/completions", json={**GREEDY, "messages": msgs, "seed": seed}), 400)
            assert err["param"] == "seed"
        r = await c.post("/v1/chat/completions", json={**GREEDY, "messages": msgs, "seed": -(2**63), "max_tokens": 2})
        assert r.status_code == 200
        err = error_of(await c.post("/v1/chat/completions", json={**GREEDY, "messages": msgs,
                                                                  "stop_token_ids": [ingress.vocab_size]}), 400)
        assert err["param"] == "stop_token_ids" and "outside the vocabulary" in err["message"]
        bare = [{"role": "user", "content": [{"type": "image_url", "image_url": "data:image/png;base64,AAAA"}]}]
        err = error_of(await c.post("/v1/chat/completions", json={**GREEDY, "messages": bare}), 400)
        assert err["param"] == "messages[0].content[0].image_url" and "must be an object" in err["message"]
        raw = json.dumps({**GREEDY, "messages": msgs})
        for headers in ({"content-type": "text/plain"}, {"content-type": "application/x-www-form-urlencoded"}, {}):
            err = error_of(await c.post("/v1/chat/completions", content=raw, headers=headers), 400)
            assert err["code"] == "unsupported_media_type" and "application/json" in err["message"]
        r = await c.post("/v1/chat/completions", content=raw + " ",
                         headers={"content-type": "application/json; charset=utf-8"})
        assert r.status_code == 200

    run(go)


def test_tokenize_and_detokenize_in_vllms_shape(ingress, tokenizer):
    msgs = [{"role": "user", "content": "What colour is the sky?"}]

    async def go(c):
        r = await c.post("/tokenize", json={"model": "tiny", "prompt": "Hello world", "return_token_strs": True})
        ids = tokenizer("Hello world")["input_ids"]
        assert r.json() == {"count": len(ids), "max_model_len": 1024, "tokens": ids,
                            "token_strs": tokenizer.convert_ids_to_tokens(ids)}
        r = await c.post("/tokenize", json={"messages": msgs})
        expected = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert r.json()["tokens"] == tokenizer(expected, add_special_tokens=False)["input_ids"]
        assert r.json()["token_strs"] is None
        # the same ids the chat route feeds the model: its usage counts them
        done = await c.post("/v1/chat/completions", json={**GREEDY, "messages": msgs, "max_tokens": 1})
        assert done.json()["usage"]["prompt_tokens"] == r.json()["count"]
        r = await c.post("/detokenize", json={"model": "tiny", "tokens": ids})
        assert r.json() == {"prompt": "Hello world"}
        err = error_of(await c.post("/detokenize", json={"tokens": [ingress.vocab_size]}), 400)
        assert err["param"] == "tokens"
        err = error_of(await c.post("/tokenize", json={"model": "nope", "prompt": "x"}), 404)
        assert err["code"] == "model_not_found"
        err = error_of(await c.post("/tokenize", json={"prompt": "x", "messages": msgs}), 400)
        assert "exactly one of prompt" in err["message"]

    run(go)


def test_unknown_routes_and_methods_answer_openai_error_json(ingress):
    async def go(c):
        err = error_of(await c.get("/v1/nothing-here"), 404)
        assert err["message"].startswith("no route GET /v1/nothing-here") and err["code"] == "not_found"
        err = error_of(await c.get("/v1/chat/completions"), 405)
        assert "method GET is not allowed" in err["message"]
        r = await c.post("/v1/completions", json={**GREEDY, "prompt": "x", "max_tokens": 1})
        assert "x-request-id" not in r.headers  # Serve's proxy sets it once (tests/e2e)

    run(go)


def test_min_tokens_matches_hf_min_new_tokens(decoder, ingress, hf_model):
    """HF's MinNewTokensLengthLogitsProcessor is the oracle: EOS ids (here: the stop token and the model's
    EOS) masked until min_new_tokens, then generation stops at the first of them."""
    prep = ingress.prompts.text("The weather today is")
    ids = prep.prompt.token_ids

    async def go():
        plain = output_from_wire(await decoder.complete(prep, SamplingParams(max_tokens=8, temperature=0), None, "p"))
        stop = plain.choices[0].token_ids[1]  # greedy's second token
        eos = decoder.engine.call(lambda e: sorted(e.eos_token_ids)).result(30)
        for min_tokens in (0, 3):
            out = output_from_wire(await decoder.complete(prep, SamplingParams(
                max_tokens=8, temperature=0, stop_token_ids=[stop], min_tokens=min_tokens), None, f"m{min_tokens}"))
            hf = hf_model.generate(torch.tensor([ids]), max_new_tokens=8, min_new_tokens=min_tokens,
                                   eos_token_id=[stop, *eos], pad_token_id=eos[0], do_sample=False)
            expected = hf[0, len(ids):].tolist()
            if stop in expected:
                expected = expected[:expected.index(stop) + 1]
            assert out.choices[0].token_ids == expected
        return min_tokens

    asyncio.run(go())
