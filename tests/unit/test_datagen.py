"""`vlora generate-data` (client/datagen.py) against a fake optimal-sampling server on loopback.

The fake answers `/v1/chat/completions` with canned completions whose choices carry
`optimal_sampling` diagnostics derived from the prompt text, records every request, and answers
later prompts faster than earlier ones, so the tests check what goes over the wire (model,
`optimal_sampling` field, teacher prompts, image data URLs, seeds, concurrency), the output file
(prompt order, per-sample aggregates, logprobs), failure counting, and that `vlora learn` reads
the file back as training examples. No model, no Ray.
"""

from __future__ import annotations

import base64
import json
import re
import time

import openai
import pytest
from PIL import Image

from vlora.client import VloraClient
from vlora.client.cli import main
from vlora.client.client import load_examples
from vlora.client.datagen import DatagenConfig, load_prompts, record_from_response
from tests.unit.fake_server import FakeServer, server_fixture

BASE = "tiny-qwen"
MODELS = {"a1", "a2", BASE}


def user_text(messages: list[dict]) -> str:
    """The text of the last user turn (string content or its text parts)."""
    content = [m for m in messages if m["role"] == "user"][-1]["content"]
    if isinstance(content, str):
        return content
    return " ".join(p["text"] for p in content if p.get("type") == "text")


def canned(text: str) -> list[dict]:
    """The diagnostics the fake returns for a prompt: 2-4 tokens, alphas and ESS values that
    depend on the text, so every sample's means are distinct and computable here."""
    n = 2 + len(text) % 3
    h = sum(map(ord, text))
    out = []
    for t in range(n):
        alpha = round(((h + 7 * t) % 97) / 97, 6)
        ess_s, ess_t = round(0.5 + 0.4 * alpha, 6), round(0.9 - 0.3 * alpha, 6)
        out.append({"token_id": 100 + (h + t) % 50, "alpha": alpha, "ess_student": ess_s, "ess_teacher": ess_t,
                    "ess_ratio": ess_s / ess_t, "kl_student": 0.1 * t, "kl_teacher": 0.2 * t,
                    "logprob_student": -1.0 - t, "logprob_teacher": -2.0 - t, "logprob_q": -1.5 - t})
    return out


def mean(xs):
    return sum(xs) / len(xs)


class FakeOSServer(FakeServer):
    """`POST /v1/chat/completions` with optimal-sampling diagnostics. A prompt text containing
    `<bad>` gets a 400, one containing `<plain>` an answer without diagnostics; `q<i>` in the text
    makes the answer take (9 - i) * 15 ms, so later prompts finish first."""

    def route(self, method, path, body, headers):
        if path != "/v1/chat/completions":
            return 404, {"error": {"message": "no route", "type": "not_found"}}
        if body["model"] not in MODELS:
            return 404, {"error": {"message": f"The model '{body['model']}' does not exist",
                                   "type": "NotFoundError", "code": 404}}
        text = user_text(body["messages"])
        m = re.search(r"q(\d)", text)
        time.sleep((9 - int(m.group(1))) * 0.015 if m else 0.01)
        if "<bad>" in text:
            return 400, {"error": {"message": "prompt rejected", "type": "BadRequestError", "code": 400}}
        diags = canned(text)
        choice = {"index": 0, "finish_reason": "length",
                  "message": {"role": "assistant", "content": f"answer to {text} (seed {body.get('seed')})"}}
        if "<plain>" not in text:
            choice["optimal_sampling"] = {"diagnostics": diags,
                                          "mean_alpha": mean([d["alpha"] for d in diags]),
                                          "mean_ess_ratio": mean([d["ess_ratio"] for d in diags])}
        usage = {"prompt_tokens": 11, "completion_tokens": len(diags), "total_tokens": 11 + len(diags)}
        return 200, {"id": "chatcmpl-1", "object": "chat.completion", "created": 1,
                     "model": body["model"], "choices": [choice], "usage": usage}


fake = server_fixture(FakeOSServer)


@pytest.fixture
def png(tmp_path):
    path = tmp_path / "imgs" / "cat.png"
    path.parent.mkdir()
    Image.new("RGB", (8, 6), (10, 200, 40)).save(path)
    return path


def write_jsonl(path, records) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def gen(fake, *argv: str) -> int:
    return main(["--url", fake.url, "generate-data", "--no-progress", *argv])


DEFAULT_OS = {"teacher": "base", "alpha_method": "kl_symmetry", "fixed_alpha": 0.5, "alpha_min": 0.0,
              "alpha_max": 1.0, "teacher_top_k": 0, "teacher_top_p": 1.0, "return_diagnostics": True}


def test_generate_data_end_to_end(fake, tmp_path, png, capsys):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [
        {"prompt": "q0 what is red?"},
        {"messages": [{"role": "system", "content": "be brief"},
                      {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "imgs/cat.png"}},
                                                   {"type": "text", "text": "q1 describe"}]}]},
        "",  # blank lines are skipped
        {"prompt": "q2 explain", "teacher_prompt": "q2 explain, thinking step by step"},
        {"messages": [{"role": "user", "content": "q3 sum 2+2"}],
         "teacher_messages": [{"role": "system", "content": "you are an expert"},
                              {"role": "user", "content": "q3 sum 2+2"}]},
        {"prompt": "q4 short", "images": ["imgs/cat.png"]},
    ])
    out = tmp_path / "data" / "out.jsonl"
    rc = gen(fake, "--student", "a1", "--teacher", "base", "--prompts", prompts, "--out", str(out),
             "--concurrency", "3", "--samples-per-prompt", "2", "--max-tokens", "16", "--temperature", "0.7",
             "--seed", "100", "--alpha-method", "ess_balance", "--alpha-min", "0.1", "--alpha-max", "0.9",
             "--teacher-top-k", "20", "--teacher-top-p", "0.95")
    assert rc == 0

    # -- the wire -------------------------------------------------------------------------------
    chats = fake.chats()
    assert len(chats) == 10 and len(fake.requests) == 10  # only chat completions, nothing else
    assert fake.max_in_flight <= 3
    expected_os = {**DEFAULT_OS, "alpha_method": "ess_balance", "alpha_min": 0.1, "alpha_max": 0.9,
                   "teacher_top_k": 20, "teacher_top_p": 0.95}
    data_url = "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()
    by_text: dict[str, list[dict]] = {}
    for body in chats:
        assert body["model"] == "a1"
        assert (body["max_tokens"], body["temperature"]) == (16, 0.7)
        assert body.get("stream") in (None, False)
        by_text.setdefault(user_text(body["messages"]), []).append(body)
        os_field = dict(body["optimal_sampling"])
        os_field.pop("teacher_messages", None)
        assert os_field == expected_os
    assert sorted(b["seed"] for b in chats) == list(range(100, 110))  # every sample its own seed
    assert {len(v) for v in by_text.values()} == {2}
    assert "teacher_messages" not in by_text["q0 what is red?"][0]["optimal_sampling"]
    assert by_text["q0 what is red?"][0]["messages"] == [{"role": "user", "content": "q0 what is red?"}]
    (sys_turn, img_turn) = by_text["q1 describe"][0]["messages"]
    assert sys_turn == {"role": "system", "content": "be brief"}
    assert img_turn["content"][0] == {"type": "image_url", "image_url": {"url": data_url}}
    assert by_text["q4 short"][0]["messages"][0]["content"] == [
        {"type": "image_url", "image_url": {"url": data_url}}, {"type": "text", "text": "q4 short"}]
    assert by_text["q2 explain"][0]["optimal_sampling"]["teacher_messages"] == [
        {"role": "user", "content": "q2 explain, thinking step by step"}]
    assert by_text["q3 sum 2+2"][1]["optimal_sampling"]["teacher_messages"] == [
        {"role": "system", "content": "you are an expert"}, {"role": "user", "content": "q3 sum 2+2"}]

    # -- the file: prompt order although later prompts finished first ---------------------------
    lines = read_jsonl(out)
    assert [(r["prompt_index"], r["sample_index"]) for r in lines] == [(i, j) for i in range(5) for j in range(2)]
    sent = {(b["seed"]): b for b in chats}
    all_alphas, all_ratios = [], []
    for k, r in enumerate(lines):
        body = sent[100 + k]  # sample k (in output order) was sent seed 100 + k
        text = user_text(body["messages"])
        diags = canned(text)
        assert r["prompt"] == body["messages"]
        assert r["output"] == f"answer to {text} (seed {100 + k})"
        assert (r["student"], r["teacher"], r["alpha_method"]) == ("a1", "base", "ess_balance")
        assert r["mean_alpha"] == pytest.approx(mean([d["alpha"] for d in diags]))
        assert r["mean_ess_ratio"] == pytest.approx(mean([d["ess_ratio"] for d in diags]))
        assert r["ess_student"] == pytest.approx(mean([d["ess_student"] for d in diags]))
        assert r["ess_teacher"] == pytest.approx(mean([d["ess_teacher"] for d in diags]))
        assert r["num_tokens"] == len(diags) and r["finish_reason"] == "length"
        assert r["token_ids"] == [d["token_id"] for d in diags]
        assert r["logprobs"] == {"student": [d["logprob_student"] for d in diags],
                                 "teacher": [d["logprob_teacher"] for d in diags],
                                 "q": [d["logprob_q"] for d in diags]}
        if "teacher_messages" in body["optimal_sampling"]:
            assert r["teacher_messages"] == body["optimal_sampling"]["teacher_messages"]
        else:
            assert "teacher_messages" not in r
        all_alphas += [d["alpha"] for d in diags]
        all_ratios += [d["ess_ratio"] for d in diags]
    assert lines[0]["output"] != lines[1]["output"]  # two samples of one prompt, two seeds

    # -- the summary ----------------------------------------------------------------------------
    printed = capsys.readouterr().out
    assert f"10 written to {out}, 0 failed (5 prompts x 2)" in printed
    assert f"{len(all_alphas)} (" in printed and "tok/s" in printed and "samples/s" in printed
    assert f"mean alpha   {mean(all_alphas):.4f}" in printed
    assert f"mean ESS ratio {mean(all_ratios):.4f}" in printed

    # -- closing the loop: `vlora learn --data out` reads it as training examples ---------------
    examples = load_examples(out)
    assert len(examples) == 10
    for ex, r in zip(examples, lines):
        assert ex["messages"] == [*r["prompt"], {"role": "assistant", "content": r["output"]}]
    assert examples[2]["messages"][1]["content"][0]["image_url"]["url"] == data_url


def test_generate_data_defaults_and_no_seed(fake, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hello"}, {"prompt": "world"}])
    out = tmp_path / "out.jsonl"
    assert gen(fake, "--student", BASE, "--teacher", "a2", "--prompts", prompts, "--out", str(out)) == 0
    chats = fake.chats()
    assert len(chats) == 2
    for body in chats:
        assert body["model"] == BASE
        assert body["optimal_sampling"] == {**DEFAULT_OS, "teacher": "a2"}
        assert (body["max_tokens"], body["temperature"]) == (64, 1.0)
        assert "seed" not in body
    assert [r["output"] for r in read_jsonl(out)] == ["answer to hello (seed None)", "answer to world (seed None)"]
    assert "2 written" in capsys.readouterr().out


def test_generate_data_counts_failures_and_skips_them(fake, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "q1 fine"}, {"prompt": "q2 <bad> one"}, {"prompt": "q3 <plain> answer"}, {"prompt": "q4 fine too"}])
    out = tmp_path / "out.jsonl"
    rc = gen(fake, "--student", "a1", "--teacher", "base", "--prompts", prompts, "--out", str(out),
             "--samples-per-prompt", "2", "--concurrency", "4")
    assert rc == 1  # any failure fails the run, so scripts notice
    assert len(fake.chats()) == 8
    lines = read_jsonl(out)
    assert [(r["prompt_index"], r["sample_index"]) for r in lines] == [(0, 0), (0, 1), (3, 0), (3, 1)]
    assert [user_text(r["prompt"]) for r in lines] == ["q1 fine", "q1 fine", "q4 fine too", "q4 fine too"]
    printed = capsys.readouterr().out
    assert "4 written to" in printed and "4 failed" in printed
    assert "400 x2: prompt rejected" in printed
    assert "no_diagnostics x2: the response has no optimal_sampling diagnostics" in printed
    expected = mean([d["alpha"] for t in ("q1 fine", "q4 fine too") for d in canned(t)])
    assert f"mean alpha   {expected:.4f}" in printed


def test_generate_data_unknown_student_fails_every_request(fake, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": "b"}])
    out = tmp_path / "out.jsonl"
    assert gen(fake, "--student", "nope", "--teacher", "base", "--prompts", prompts, "--out", str(out)) == 1
    assert out.read_text() == ""
    printed = capsys.readouterr().out
    assert "0 written" in printed and "404 x2: The model 'nope' does not exist" in printed
    assert "mean alpha   n/a" in printed


@pytest.mark.parametrize("line, message", [
    ("{not json", "line 2: not valid JSON"),
    ('{"text": "hi"}', 'line 2: missing "messages" or "prompt"'),
    ('{"messages": []}', "line 2: 'messages' must be a non-empty list"),
    ('{"prompt": 3}', "line 2: 'prompt' must be a string or a non-empty list"),
    ('{"prompt": "hi", "teacher_prompt": "a", "teacher_messages": [{"role": "user", "content": "b"}]}',
     "line 2: give 'teacher_messages' or 'teacher_prompt', not both"),
    ('{"prompt": "hi", "teacher_messages": "b"}', "line 2: 'teacher_messages' must be a non-empty list"),
    ('{"prompt": "hi", "images": ["missing.png"]}', "line 2: messages[0].content[0]: cannot read image"),
])
def test_bad_prompt_line_is_named_and_nothing_is_sent(fake, tmp_path, capsys, line, message):
    prompts = write_jsonl(tmp_path / "p.jsonl", ['{"prompt": "fine"}', line])
    out = tmp_path / "out.jsonl"
    assert gen(fake, "--student", "a1", "--teacher", "base", "--prompts", prompts, "--out", str(out)) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and str(tmp_path / "p.jsonl") in err
    assert "Traceback" not in err
    assert fake.requests == [] and not out.exists()


@pytest.mark.parametrize("flags, message", [
    (["--alpha-min", "0.8", "--alpha-max", "0.2"], "alpha min <= alpha max"),
    (["--teacher-top-p", "0"], "teacher top-p"),
    (["--samples-per-prompt", "0"], "samples per prompt"),
    (["--concurrency", "0"], "concurrency"),
])
def test_bad_options_send_nothing(fake, tmp_path, capsys, flags, message):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}])
    out = tmp_path / "out.jsonl"
    assert gen(fake, "--student", "a1", "--teacher", "base", "--prompts", prompts, "--out", str(out), *flags) == 1
    assert message in capsys.readouterr().err
    assert fake.requests == [] and not out.exists()


def test_empty_prompts_file_is_an_error(fake, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "p.jsonl", ["", "  "])
    assert gen(fake, "--student", "a1", "--teacher", "base", "--prompts", prompts, "--out",
               str(tmp_path / "o.jsonl")) == 1
    assert "no prompts" in capsys.readouterr().err and fake.requests == []


def test_client_generate_data_method(fake, tmp_path):
    out = tmp_path / "out.jsonl"
    summary = VloraClient(fake.url).generate_data(
        [{"prompt": "q5 one"}, {"messages": [{"role": "user", "content": "q6 two"}], "teacher_prompt": "q6 two!"}],
        out, student="a1", teacher="a2", alpha_method="fixed", fixed_alpha=0.25, concurrency=2, seed=3)
    assert (summary["written"], summary["failed"], summary["prompts"]) == (2, 0, 2)
    diags = canned("q5 one") + canned("q6 two")
    assert summary["tokens"] == len(diags)
    assert summary["mean_alpha"] == pytest.approx(mean([d["alpha"] for d in diags]))
    chats = sorted(fake.chats(), key=lambda b: b["seed"])
    assert [b["optimal_sampling"]["alpha_method"] for b in chats] == ["fixed", "fixed"]
    assert chats[0]["optimal_sampling"]["fixed_alpha"] == 0.25
    assert chats[1]["optimal_sampling"]["teacher_messages"] == [{"role": "user", "content": "q6 two!"}]
    assert [r["output"] for r in read_jsonl(out)] == ["answer to q5 one (seed 3)", "answer to q6 two (seed 4)"]
    with pytest.raises(ValueError, match="prompt 1: missing"):
        VloraClient(fake.url).generate_data([{"prompt": "x"}, {"nope": 1}], out, student="a1", teacher="base")


def test_record_from_response_computes_missing_means():
    diags = canned("abc")
    resp = openai.types.chat.ChatCompletion.model_validate({
        "id": "x", "object": "chat.completion", "created": 1, "model": "a1",
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "hi"},
                     "optimal_sampling": {"diagnostics": diags}}]})
    cfg = DatagenConfig(student="a1", teacher="base")
    rec = record_from_response(resp, {"messages": [{"role": "user", "content": "abc"}], "teacher_messages": None},
                               cfg, 0, 0)
    assert rec["mean_alpha"] == pytest.approx(mean([d["alpha"] for d in diags]))
    assert rec["mean_ess_ratio"] == pytest.approx(mean([d["ess_ratio"] for d in diags]))
    assert rec["num_tokens"] == len(diags) and rec["finish_reason"] == "stop"


def test_load_prompts_accepts_learn_records(tmp_path, png):
    # A generated file can be reused as a prompts file: its "output" is ignored.
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": [{"role": "user", "content": "hi"}], "output": "old"},
                                              {"prompt": "see", "images": [str(png)]}])
    first, second = load_prompts(path)
    assert first == {"messages": [{"role": "user", "content": "hi"}], "teacher_messages": None}
    assert second["messages"][0]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
