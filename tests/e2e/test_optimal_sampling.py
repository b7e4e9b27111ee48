"""Optimal sampling through the service, and the sample -> learn -> serve loop with the CLI."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from vlora.client.cli import main as vlora
from tests.e2e.conftest import ADMIN_KEY, API_KEY
from tests.unit.oracle import hf_logits, peft_model, random_peft_adapter
from tests.unit.test_engine_optimal import expected_diagnostics

pytestmark = pytest.mark.e2e

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def chat_ids(tokenizer, messages) -> list[int]:
    return tokenizer(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)).input_ids


@pytest.fixture(scope="module")
def student(base_url, hf_model, serve_instance):
    folder = random_peft_adapter(hf_model, serve_instance["uploads"] / "os-student", seed=31, r=4, alpha=8)
    r = httpx.post(f"{base_url}/v1/adapters", json={"name": "os-student", "path": str(folder)}, headers=ADMIN)
    assert r.status_code == 200, r.text
    return folder


def _student_logits(hf_model, folder, ids):
    pm = peft_model(hf_model, folder)
    try:
        return hf_logits(pm, ids)
    finally:
        pm.unload()


def test_diagnostics_equal_offline_recomputation(client, student, hf_model, tokenizer):
    msgs = [{"role": "user", "content": "Describe the image in detail."}]
    resp = client.chat.completions.create(
        model="os-student", messages=msgs, max_tokens=8, temperature=1.0, seed=4,
        extra_body={"optimal_sampling": {"teacher": "base", "alpha_method": "kl_symmetry"}, "ignore_eos": True})
    os_ = resp.choices[0].model_extra["optimal_sampling"]
    diags = os_["diagnostics"]
    toks = [d["token_id"] for d in diags]
    assert len(toks) == resp.usage.completion_tokens == 8
    assert resp.choices[0].message.content == tokenizer.decode(toks, skip_special_tokens=True)
    ids = chat_ids(tokenizer, msgs)
    zs = _student_logits(hf_model, student, ids + toks)[len(ids) - 1:-1]
    zt = hf_logits(hf_model, ids + toks)[len(ids) - 1:-1]
    for k, d in enumerate(diags):
        for key, value in expected_diagnostics(zs[k], zt[k], toks[k], 1.0).items():
            assert abs(d[key] - value) < 1e-4, (k, key)
    assert os_["mean_alpha"] == pytest.approx(sum(d["alpha"] for d in diags) / len(diags))


def test_dual_prompts_and_streamed_diagnostics(client, student, hf_model, tokenizer):
    msgs = [{"role": "user", "content": "What is two plus two?"}]
    teacher_msgs = [{"role": "system", "content": "Answer in French."},
                    {"role": "user", "content": "What is two plus two?"}]
    body = dict(model="os-student", messages=msgs, max_tokens=6, temperature=0.7, seed=9,
                extra_body={"optimal_sampling": {"teacher": "base", "teacher_messages": teacher_msgs,
                                                 "alpha_method": "entropy"}, "ignore_eos": True})
    whole = client.chat.completions.create(**body)
    chunks = list(client.chat.completions.create(stream=True, **body))
    streamed = [d for c in chunks if c.choices for d in (c.choices[0].model_extra.get("optimal_sampling") or
                                                          {}).get("diagnostics", [])]
    diags = whole.choices[0].model_extra["optimal_sampling"]["diagnostics"]
    assert streamed == diags
    toks = [d["token_id"] for d in diags]
    t_ids = chat_ids(tokenizer, teacher_msgs)
    zt = hf_logits(hf_model, t_ids + toks)[len(t_ids) - 1:-1]
    s_ids = chat_ids(tokenizer, msgs)
    zs = _student_logits(hf_model, student, s_ids + toks)[len(s_ids) - 1:-1]
    for k, d in enumerate(diags):
        lpt = (zt[k] / 0.7).log_softmax(-1)[toks[k]].item()
        assert abs(d["logprob_teacher"] - lpt) < 1e-4
        hs, ht = [-(p * p.clamp_min(1e-10).log()).sum().item()
                  for p in ((zs[k] / 0.7).softmax(-1), (zt[k] / 0.7).softmax(-1))]
        assert abs(d["alpha"] - ht / (hs + ht)) < 1e-4  # the entropy rule, on the teacher's own prompt


def test_completions_with_teacher_prompt(client, student):
    resp = client.completions.create(model="os-student", prompt="The quick brown fox", max_tokens=5, temperature=0,
                                     extra_body={"optimal_sampling": {"teacher": "base",
                                                                      "teacher_prompt": "A lazy dog"}})
    diags = resp.choices[0].model_extra["optimal_sampling"]["diagnostics"]
    assert 1 <= len(diags) == resp.usage.completion_tokens


def test_unknown_teacher_is_404_and_bad_settings_are_400(client, student):
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="os-student", messages=msgs, max_tokens=2,
                                       extra_body={"optimal_sampling": {"teacher": "no-such-teacher"}})
    assert "no-such-teacher" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="os-student", messages=msgs, max_tokens=2,
                                       extra_body={"optimal_sampling": {"teacher": "base", "alpha_min": 0.9,
                                                                        "alpha_max": 0.1}})
    assert "alpha_min (0.9) must be <= alpha_max (0.1)" in e.value.message


TRAIN_QUESTIONS = ["What is this?", "Describe the picture.", "What do you see?", "Tell me about it.",
                   "What colour is the sky?", "Name a colour."]
HELD_OUT = ["What is in the image?", "Which colour do you like?", "What is that thing?", "Say something."]


def _greedy(client, model, question) -> str:
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                          max_tokens=6, temperature=0).choices[0].message.content


def test_generate_data_then_learn_moves_the_student_toward_the_teacher(base_url, client, tmp_path, capsys):
    def learn(name, examples, steps, lr=1e-2):
        r = httpx.post(f"{base_url}/v1/adapters/{name}/learn", headers=ADMIN, timeout=300,
                       json={"examples": examples, "steps": steps, "learning_rate": lr, "rank": 8})
        assert r.status_code == 200, r.text

    teach = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "blue"}]}
             for q in TRAIN_QUESTIONS]
    learn("os-teacher", teach, steps=40)
    learn("os-fresh", teach[:1], steps=0)  # a fresh student: zero LoRA, i.e. the base model
    teacher_answers = [_greedy(client, "os-teacher", q) for q in HELD_OUT]
    assert teacher_answers.count("blue") >= 3  # the teacher's behaviour carries to new prompts

    def agreement() -> float:
        """Mean share of the teacher's greedy answer that the student's greedy answer starts with."""
        shares = []
        for q, t in zip(HELD_OUT, teacher_answers):
            s = _greedy(client, "os-fresh", q)
            common = next((i for i, (a, b) in enumerate(zip(s, t)) if a != b), min(len(s), len(t)))
            shares.append(common / max(1, len(t)))
        return sum(shares) / len(shares)

    before = agreement()
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in TRAIN_QUESTIONS))
    data = tmp_path / "data.jsonl"
    common = ["--url", base_url, "--api-key", API_KEY, "--admin-key", ADMIN_KEY]
    rc = vlora(["generate-data", "--student", "os-fresh", "--teacher", "os-teacher", "--prompts", str(prompts),
                "--out", str(data), "--concurrency", "3", "--max-tokens", "4", "--temperature", "0.2",
                "--alpha-min", "0.8", "--samples-per-prompt", "2", "--seed", "1", "--no-progress", *common])
    assert rc == 0, capsys.readouterr().err
    lines = [json.loads(x) for x in data.read_text().splitlines()]
    assert len(lines) == 12 and all(line["mean_alpha"] >= 0.8 - 1e-9 for line in lines)
    assert all(len(line["logprobs"]["q"]) == line["num_tokens"] for line in lines)
    rc = vlora(["learn", "os-fresh", "--data", str(data), "--steps", "60", "--lr", "1e-2", "--no-progress", *common])
    assert rc == 0, capsys.readouterr().err
    after = agreement()
    detail = {"teacher": teacher_answers, "student": [_greedy(client, "os-fresh", q) for q in HELD_OUT],
              "on_train": [_greedy(client, "os-fresh", q) for q in TRAIN_QUESTIONS],
              "data": [(x["output"], round(x["mean_alpha"], 3)) for x in lines]}
    print(f"\nteacher agreement on held-out prompts: before {before:.2f}, after {after:.2f}; {detail}")
    assert after > before and after >= 0.75, (before, after, detail)
