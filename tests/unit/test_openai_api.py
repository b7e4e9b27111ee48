"""OpenAI wire-format compatibility, proven with the real `openai` SDK.

The SDK talks to an in-process mock transport: the handler parses the SDK's outgoing JSON with our
request models and answers with our builders, and the SDK must parse the answer into its typed
objects (or raise its typed errors). No server, no Ray, no model.
"""

from __future__ import annotations

import json
import pickle

import openai
import pydantic
import pytest

import openai._base_client as _sdk_base
from vlora.deployments.openai_api import (
    SSE_DONE,
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    chat_completion_chunk,
    chat_completion_response,
    completion_chunk,
    completion_response,
    models_response,
    sse,
    validation_error_to_api_error,
)
from vlora.engine.outputs import ChoiceDelta, TokenLogprob
from vlora.engine.sampling import SamplingParams

# The HTTP library the installed SDK is built on (httpx, or httpx2 in newer SDKs).
hx = getattr(_sdk_base, "httpx2", None) or _sdk_base.httpx

VOCAB = {1: "Hello", 2: " world", 3: "!", 4: "é", 5: " there"}
BASE = "Qwen/Qwen2.5-VL-3B-Instruct"
CREATED = 1_700_000_000


def decode(token_id: int) -> str:
    return VOCAB[token_id]


def lp(tid: int, value: float, top: list[tuple[int, float]] = ()) -> TokenLogprob:
    return TokenLogprob(tid, value, list(top))


def client_with(handler, seen: list | None = None) -> openai.OpenAI:
    """An SDK client whose requests go to `handler(path, json_body) -> httpx Response`."""

    def transport(request):
        body = json.loads(request.content) if request.content else None
        if seen is not None:
            seen.append((request.method, request.url.path, body))
        return handler(request.url.path, body)

    return openai.OpenAI(
        api_key="sk-test",
        base_url="http://vlora.test/v1",
        max_retries=0,
        http_client=hx.Client(transport=hx.MockTransport(transport)),
    )


def error_response(err: ApiError):
    return hx.Response(err.status, json=err.to_json(), headers=err.headers())


def parse_or_error(model_cls, body):
    try:
        return model_cls.model_validate(body), None
    except pydantic.ValidationError as e:
        return None, error_response(validation_error_to_api_error(e))


def sse_response(events: list[bytes]):
    return hx.Response(200, content=b"".join(events), headers={"content-type": "text/event-stream"})


def messages(content="Hi"):
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": content}]


def chat_body(**kw):
    return {"model": BASE, "messages": messages(), **kw}


def api_error_of(cls, body) -> ApiError:
    with pytest.raises(pydantic.ValidationError) as info:
        cls.model_validate(body)
    return validation_error_to_api_error(info.value)


# -------------------------------------------------------------------------------------------------
# SDK round trips
# -------------------------------------------------------------------------------------------------


def test_sdk_chat_completion_round_trip_with_images_and_logprobs():
    seen = []

    def handler(path, body):
        assert path == "/v1/chat/completions"
        req, err = parse_or_error(ChatCompletionRequest, body)
        if err:
            return err
        params = req.to_sampling_params(default_max_tokens=1000)
        assert params == SamplingParams(
            max_tokens=7, temperature=0.2, top_p=0.9, seed=11, stop=["\n\n"], n=2,
            logprobs=True, top_logprobs=2, presence_penalty=0.5, frequency_penalty=-0.5,
        )
        # vLLM extras arrive through extra_body
        assert req.top_k is None and req.optimal_sampling.to_params().teacher == "base"
        assert req.optimal_sampling.alpha_method == "entropy" and req.optimal_sampling.teacher_top_k == 4
        logprobs = [
            [lp(1, -0.1, [(1, -0.1), (5, -2.5)]), lp(4, -0.7, [(4, -0.7), (3, -1.0)])],
            [lp(1, -0.2, [(1, -0.2), (2, -3.0)])],
        ]
        return hx.Response(200, json=chat_completion_response(
            "req-1", req.model, CREATED, ["Helloé", "Hello"], ["stop", "length"], logprobs,
            (12, 3), decode, extra={"adapter_version": 3}, system_fingerprint="vlora-0.1",
        ))

    client = client_with(handler, seen)
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"}}
    out = client.chat.completions.create(
        model=BASE,
        messages=[
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "What is this?"}, image]},
            {"role": "assistant", "content": "A picture."},
            {"role": "user", "content": "Say hello."},
        ],
        temperature=0.2, top_p=0.9, max_tokens=50, max_completion_tokens=7, seed=11, stop="\n\n", n=2,
        logprobs=True, top_logprobs=2, presence_penalty=0.5, frequency_penalty=-0.5, user="u1",
        extra_body={"optimal_sampling": {"teacher": "base", "alpha_method": "entropy", "teacher_top_k": 4},
                    "skip_special_tokens": True},
    )
    assert isinstance(out, openai.types.chat.ChatCompletion)
    assert out.id == "chatcmpl-req-1" and out.object == "chat.completion" and out.created == CREATED
    assert out.model == BASE and out.system_fingerprint == "vlora-0.1"
    assert [c.message.content for c in out.choices] == ["Helloé", "Hello"]
    assert [c.message.role for c in out.choices] == ["assistant", "assistant"]
    assert [c.finish_reason for c in out.choices] == ["stop", "length"]
    tokens = out.choices[0].logprobs.content
    assert [t.token for t in tokens] == ["Hello", "é"]
    assert tokens[1].bytes == list("é".encode()) and tokens[1].logprob == pytest.approx(-0.7)
    assert [(t.token, t.logprob) for t in tokens[0].top_logprobs] == [("Hello", -0.1), (" there", -2.5)]
    assert tokens[0].top_logprobs[1].bytes == list(b" there")
    assert out.usage.prompt_tokens == 12 and out.usage.completion_tokens == 3 and out.usage.total_tokens == 15
    assert out.model_extra == {"adapter_version": 3}
    # the image part reached the server untouched, as a plain dict
    assert seen[0][2]["messages"][1]["content"][1] == image


def test_sdk_chat_streaming_with_usage():
    def handler(path, body):
        req, err = parse_or_error(ChatCompletionRequest, body)
        if err:
            return err
        assert req.stream and req.include_usage
        n = req.to_sampling_params(100).n
        args = ("req-2", req.model, CREATED)
        events = [sse(chat_completion_chunk(*args, [ChoiceDelta(i, "", []) for i in range(n)], role_for=range(n)))]
        events.append(sse(chat_completion_chunk(*args, [ChoiceDelta(0, "Hello", [1], [lp(1, -0.1, [(1, -0.1)])])], decode)))
        events.append(sse(chat_completion_chunk(*args, [ChoiceDelta(1, "Hi", [3], [lp(3, -0.3, [(3, -0.3)])])], decode)))
        events.append(sse(chat_completion_chunk(
            *args, [ChoiceDelta(0, " world", [2], [lp(2, -0.2, [])], "stop"), ChoiceDelta(1, "", [], [], "length")], decode,
        )))
        events.append(sse(chat_completion_chunk(*args, [], usage=(5, 3))))
        events.append(SSE_DONE)
        return sse_response(events)

    client = client_with(handler)
    stream = client.chat.completions.create(
        model=BASE, messages=messages(), stream=True, stream_options={"include_usage": True}, n=2,
        logprobs=True, top_logprobs=1,
    )
    chunks = list(stream)
    assert all(isinstance(c, openai.types.chat.ChatCompletionChunk) for c in chunks)
    assert all(c.id == "chatcmpl-req-2" and c.object == "chat.completion.chunk" for c in chunks)
    assert [d.delta.role for d in chunks[0].choices] == ["assistant", "assistant"]
    assert all(d.delta.role is None for c in chunks[1:] for d in c.choices)
    text = {0: "", 1: ""}
    finish = {}
    for c in chunks:
        for d in c.choices:
            text[d.index] += d.delta.content or ""
            if d.finish_reason:
                finish[d.index] = d.finish_reason
    assert text == {0: "Hello world", 1: "Hi"} and finish == {0: "stop", 1: "length"}
    assert chunks[1].choices[0].logprobs.content[0].token == "Hello"
    assert chunks[1].choices[0].logprobs.content[0].top_logprobs[0].token == "Hello"
    last = chunks[-1]
    assert last.choices == [] and last.usage.total_tokens == 8 and last.usage.completion_tokens == 3
    assert all(c.usage is None for c in chunks[:-1])


def test_sdk_stream_error_event_raises():
    def handler(path, body):
        err = ApiError(503, "engine overloaded", retry_after=2)
        return sse_response([sse(chat_completion_chunk("r", BASE, CREATED, [ChoiceDelta(0, "", [])], role_for={0})),
                             sse(err.to_json()), SSE_DONE])

    stream = client_with(handler).chat.completions.create(model=BASE, messages=messages(), stream=True)
    with pytest.raises(openai.APIError, match="engine overloaded"):
        list(stream)


def test_sdk_completions_round_trip_and_stream():
    def handler(path, body):
        assert path == "/v1/completions"
        req, err = parse_or_error(CompletionRequest, body)
        if err:
            return err
        params = req.to_sampling_params(default_max_tokens=500)
        assert req.prompt == ["Once upon"] and params.logprobs and params.top_logprobs == 1
        assert params.max_tokens == 16  # OpenAI's legacy default
        logprobs = [[lp(1, -0.5, [(5, -0.4)]), lp(2, -0.25, [(2, -0.25)])]]
        if not req.stream:
            return hx.Response(200, json=completion_response(
                "req-3", req.model, CREATED, ["Hello world"], ["length"], logprobs, (2, 2), decode))
        args = ("req-3", req.model, CREATED)
        d0 = ChoiceDelta(0, "Hello", [1], logprobs[0][:1])
        d1 = ChoiceDelta(0, " world", [2], logprobs[0][1:], "length")
        return sse_response([
            sse(completion_chunk(*args, [d0], decode)),
            sse(completion_chunk(*args, [d1], decode, text_offsets={0: len(d0.text)})),
            sse(completion_chunk(*args, [], usage=(2, 2))),
            SSE_DONE,
        ])

    client = client_with(handler)
    out = client.completions.create(model=BASE, prompt=["Once upon"], logprobs=1)
    assert isinstance(out, openai.types.Completion)
    assert out.id == "cmpl-req-3" and out.object == "text_completion"
    choice = out.choices[0]
    assert choice.text == "Hello world" and choice.finish_reason == "length"
    assert choice.logprobs.tokens == ["Hello", " world"]
    assert choice.logprobs.token_logprobs == [-0.5, -0.25]
    assert choice.logprobs.top_logprobs == [{" there": -0.4, "Hello": -0.5}, {" world": -0.25}]
    assert choice.logprobs.text_offset == [0, 5]
    assert out.usage.total_tokens == 4

    chunks = list(client.completions.create(
        model=BASE, prompt="Once upon", logprobs=1, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "Hello world"
    assert [c.choices[0].logprobs.text_offset for c in chunks if c.choices] == [[0], [5]]
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == 2


def test_sdk_models_list():
    adapters = [{"name": "cats", "version": 2, "created": CREATED + 5}, {"name": "dogs", "version": 1}]

    def handler(path, body):
        assert path == "/v1/models"
        return hx.Response(200, json=models_response(BASE, adapters, CREATED, max_model_len=4096))

    models = list(client_with(handler).models.list())
    assert [m.id for m in models] == [BASE, "cats", "dogs"]
    assert all(m.object == "model" and m.owned_by == "vlora" for m in models)
    assert [m.created for m in models] == [CREATED, CREATED + 5, CREATED]
    assert [(m.model_extra["root"], m.model_extra["parent"]) for m in models] == [
        (BASE, None), ("cats", BASE), ("dogs", BASE)]
    assert models[1].model_extra["version"] == 2 and models[0].model_extra["max_model_len"] == 4096


@pytest.mark.parametrize(
    "err, exc_type",
    [
        (ApiError(400, "temperature: Input should be less than or equal to 2", param="temperature"), openai.BadRequestError),
        (ApiError.model_not_found("nope"), openai.NotFoundError),
        (ApiError(401, "Invalid API key"), openai.AuthenticationError),
        (ApiError(429, "Too many requests for adapter cats", retry_after=1), openai.RateLimitError),
        (ApiError(503, "The server is overloaded", retry_after=3), openai.InternalServerError),
    ],
)
def test_sdk_raises_typed_errors(err, exc_type):
    client = client_with(lambda path, body: error_response(err))
    with pytest.raises(exc_type) as info:
        client.chat.completions.create(model=BASE, messages=messages())
    e = info.value
    assert e.status_code == err.status and err.message in e.message
    assert e.type == err.type and e.param == err.param and e.code == err.code
    if err.retry_after is not None:
        assert e.response.headers["retry-after"] == str(err.retry_after)


def test_sdk_validation_error_reaches_client_as_bad_request():
    def handler(path, body):
        req, err = parse_or_error(ChatCompletionRequest, body)
        assert err is not None
        return err

    client = client_with(handler)
    with pytest.raises(openai.BadRequestError, match="temperature: Input should be less than or equal to 2") as info:
        client.chat.completions.create(model=BASE, messages=messages(), temperature=3)
    assert info.value.param == "temperature" and info.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError, match="guided_grammar is not supported by this server"):
        client.chat.completions.create(model=BASE, messages=messages(), extra_body={"guided_grammar": 'root ::= "a"'})


# -------------------------------------------------------------------------------------------------
# Validation messages
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, param, message",
    [
        ({"temperature": 3}, "temperature", "temperature: Input should be less than or equal to 2"),
        ({"temperature": "0.5"}, "temperature", "temperature: Input should be a valid number"),
        ({"top_p": 0}, "top_p", "top_p: Input should be greater than 0"),
        ({"top_logprobs": 3}, "top_logprobs", "top_logprobs requires logprobs to be true"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "top_logprobs: Input should be less than or equal to 20"),
        ({"n": 0}, "n", "n: Input should be greater than or equal to 1"),
        ({"n": 17}, "n", "n: Input should be less than or equal to 16"),
        ({"max_completion_tokens": 0}, "max_completion_tokens", "max_completion_tokens: Input should be greater than or equal to 1"),
        ({"stop": [str(i) for i in range(17)]}, "stop", "stop may have at most 16 strings, got 17"),
        ({"stop": [""]}, "stop", "stop strings must not be empty"),
        ({"stop": 5}, "stop", "stop must be a string or a list of strings"),
        ({"presence_penalty": -2.5}, "presence_penalty", "presence_penalty: Input should be greater than or equal to -2"),
        ({"stream_options": {"include_usage": True}}, "stream_options", "stream_options is only allowed when stream is true"),
        ({"functions": [{"name": "f"}]}, "functions", "functions is not supported by this server"),
        ({"guided_whitespace_pattern": " *"}, "guided_whitespace_pattern",
         "guided_whitespace_pattern is not supported by this server"),
        ({"logit_bias": {"50256": -100}}, "logit_bias", "logit_bias is not supported by this server"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role",
         "messages[0].role 'robot' is not supported; expected one of system, developer, user, assistant"),
        ({"messages": [{"role": "user", "content": "x", "tool_calls": [{"id": "c"}]}]}, "messages[0].tool_calls",
         "messages[0].tool_calls is only allowed on assistant messages"),
        ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
         "messages[0].content[0].type",
         "messages[0].content[0].type 'input_audio' is not supported; supported content part types are 'text' and 'image_url'"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": ""}}]}]},
         "messages[0].content[0].image_url.url", "messages[0].content[0].image_url.url must be a non-empty string"),
        ({"messages": [{"role": "system", "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}]},
         "messages[0].content[0]", "messages[0].content[0]: image parts are only allowed in user messages"),
        ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content[0].text",
         "messages[0].content[0].text must be a string"),
        ({"messages": [{"role": "user", "content": 7}]}, "messages[0].content",
         "messages[0].content must be a string or a list of content parts"),
        ({"messages": []}, "messages", "messages must contain at least one message"),
        ({"messages": ["hi"]}, "messages[0]", "messages[0]: Input should be a valid dictionary"),
        ({"model": None}, "model", "model: Input should be a valid string"),
    ],
)
def test_chat_validation_messages(extra, param, message):
    err = api_error_of(ChatCompletionRequest, chat_body(**extra))
    assert err.status == 400 and err.type == "invalid_request_error"
    assert err.param == param
    assert err.message.startswith(message), err.message


def test_missing_fields_and_error_count():
    err = api_error_of(ChatCompletionRequest, {"temperature": 9})
    assert err.message.startswith("model: Field required") and "(and 2 more errors)" in err.message
    err = api_error_of(ChatCompletionRequest, [1, 2])
    assert err.param is None and err.message.startswith("request body: Input should be a valid dictionary")


@pytest.mark.parametrize(
    "extra, param, message",
    [
        ({"prompt": ["a"] * 65}, "prompt", "prompt: at most 64 prompts per request, got 65"),
        ({"prompt": [[1, 2], []]}, "prompt", "prompt must be a string, a list of strings, a non-empty list of token ids"),
        ({"prompt": [1, True]}, "prompt", "prompt must be a string, a list of strings, a non-empty list of token ids"),
        ({"prompt": []}, "prompt", "prompt must be a string"),
        ({"seed": 2**63}, "seed", "seed: Input should be less than or equal to 9223372036854775807"),
        ({"min_tokens": -1}, "min_tokens", "min_tokens: Input should be greater than or equal to 0"),
        ({"echo": True}, "echo", "echo is not supported by this server"),
        ({"suffix": "end"}, "suffix", "suffix is not supported by this server"),
        ({"best_of": 3}, "best_of", "best_of is not supported by this server"),
        ({"logprobs": 6}, "logprobs", "logprobs: Input should be less than or equal to 5"),
        ({"logprobs": True}, "logprobs", "logprobs: Input should be a valid integer"),
        ({"temperature": 2.5}, "temperature", "temperature: Input should be less than or equal to 2"),
    ],
)
def test_completion_validation_messages(extra, param, message):
    err = api_error_of(CompletionRequest, {"model": BASE, "prompt": "x", **extra})
    assert err.status == 400 and err.param == param
    assert err.message.startswith(message), err.message


# -------------------------------------------------------------------------------------------------
# Sampling parameter conversion
# -------------------------------------------------------------------------------------------------


def test_chat_defaults_follow_openai():
    req = ChatCompletionRequest.model_validate(chat_body(temperature=None, n=None, extra_field_from_new_sdk=1))
    assert req.to_sampling_params(default_max_tokens=321) == SamplingParams(max_tokens=321, temperature=1.0)
    assert not req.include_usage and req.optimal_sampling is None


def test_max_completion_tokens_wins_and_vllm_extras():
    req = ChatCompletionRequest.model_validate(chat_body(
        max_tokens=100, max_completion_tokens=5, temperature=0, top_k=20, min_p=0.1, ignore_eos=True,
        stop_token_ids=[151645], include_stop_str_in_output=True, skip_special_tokens=False, stop="END",
        stream=True, stream_options={"include_usage": True},
    ))
    p = req.to_sampling_params(1000)
    assert (p.max_tokens, p.temperature, p.top_k, p.min_p, p.ignore_eos) == (5, 0.0, 20, 0.1, True)
    assert p.stop == ["END"] and p.stop_token_ids == [151645] and p.include_stop_str_in_output
    assert req.include_usage
    assert ChatCompletionRequest.model_validate(chat_body(max_tokens=100)).to_sampling_params(1000).max_tokens == 100


def test_sampling_params_errors_become_400():
    req = ChatCompletionRequest.model_validate(chat_body(top_k=-5))
    with pytest.raises(ApiError) as info:
        req.to_sampling_params(100)
    assert info.value.status == 400 and info.value.param == "top_k" and "top_k must be" in info.value.message
    req = CompletionRequest.model_validate({"model": BASE, "prompt": "x", "min_p": 1.5})
    with pytest.raises(ApiError, match="min_p must be") as info:
        req.to_sampling_params(100)
    assert info.value.param == "min_p"


def test_completion_conversion():
    req = CompletionRequest.model_validate({"model": BASE, "prompt": "x", "logprobs": 0, "best_of": 2, "n": 2})
    p = req.to_sampling_params(8)
    assert p.logprobs and p.top_logprobs == 0 and p.n == 2 and p.max_tokens == 8  # 16 capped by the context
    p = CompletionRequest.model_validate({"model": BASE, "prompt": "x", "max_tokens": 64}).to_sampling_params(8)
    assert not p.logprobs and p.max_tokens == 64


# -------------------------------------------------------------------------------------------------
# Errors and small helpers
# -------------------------------------------------------------------------------------------------


def test_api_error_shape_and_pickling():
    err = ApiError(503, "The server is overloaded", param=None, retry_after=4)
    assert err.type == "server_error" and err.headers() == {"Retry-After": "4"}
    assert err.to_json() == {"error": {"message": "The server is overloaded", "type": "server_error", "param": None, "code": None}}
    nf = ApiError.model_not_found("cats")
    assert nf.to_json()["error"] == {
        "message": "The model `cats` does not exist or you do not have access to it.",
        "type": "invalid_request_error", "param": "model", "code": "model_not_found",
    }
    assert ApiError(401, "bad key").type == "authentication_error"
    assert ApiError(429, "slow down").type == "rate_limit_error"
    for e in (err, nf, ApiError.unsupported("tools")):
        back = pickle.loads(pickle.dumps(e))
        assert type(back) is ApiError and vars(back) == vars(e) and str(back) == e.message


def test_sse_format():
    assert sse({"a": "é"}) == 'data: {"a":"é"}\n\n'.encode()
    assert sse('{"x":1}') == b'data: {"x":1}\n\n'
    assert SSE_DONE == b"data: [DONE]\n\n"


def test_decoder_may_return_bytes_for_partial_characters():
    raw = "é".encode()
    pieces = {7: raw[:1], 8: raw[1:]}
    out = chat_completion_response("r", BASE, CREATED, ["é"], ["stop"], [[lp(7, -1.0), lp(8, -0.1)]], (1, 2), pieces.get)
    content = out["choices"][0]["logprobs"]["content"]
    assert [c["bytes"] for c in content] == [[raw[0]], [raw[1]]]
    assert sum((c["bytes"] for c in content), []) == list(raw)


@pytest.mark.parametrize("options, message", [
    ({}, "optimal_sampling.teacher: Field required"),
    ({"teacher": "base", "alpha_method": "median"}, "optimal_sampling.alpha_method"),
    ({"teacher": "base", "alpha_min": 0.8, "alpha_max": 0.2}, "alpha_min (0.8) must be <= alpha_max (0.2)"),
    ({"teacher": "base", "fixed_alpha": 1.5}, "optimal_sampling.fixed_alpha"),
    ({"teacher": "base", "teacher_top_p": 0}, "optimal_sampling.teacher_top_p"),
    ({"teacher": "base", "teacher_top_k": -1}, "optimal_sampling.teacher_top_k"),
    ({"teacher": "base", "bogus": 1}, "optimal_sampling.bogus"),
    ({"teacher": "base", "teacher_messages": [{"role": "robot", "content": "x"}]},
     "optimal_sampling.teacher_messages[0].role 'robot' is not supported"),
    ({"teacher": "base", "teacher_prompt": "x"}, "teacher_prompt is for /v1/completions"),
])
def test_optimal_sampling_validation(options, message):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "optimal_sampling": options}
    with pytest.raises(pydantic.ValidationError) as e:
        ChatCompletionRequest.model_validate(body)
    assert message in validation_error_to_api_error(e.value).message


def test_optimal_sampling_summary_and_attach():
    from vlora.deployments.openai_api import attach_diagnostics

    diags = [{"alpha": 0.2, "ess_ratio": 1.0}, {"alpha": 0.4, "ess_ratio": 0.5}]
    body = attach_diagnostics({"choices": [{"index": 0}, {"index": 1}]}, {1: diags}, summary=True)
    assert "optimal_sampling" not in body["choices"][0]
    assert body["choices"][1]["optimal_sampling"]["mean_alpha"] == pytest.approx(0.3)
    assert body["choices"][1]["optimal_sampling"]["mean_ess_ratio"] == pytest.approx(0.75)
