"""Optimal sampling in the engine: student and teacher rows in one batch, checked against HF+PEFT logits."""

from __future__ import annotations

import pytest
import torch

from vlora.adapters.peft_io import load_peft_adapter
from vlora.engine.config import EngineConfig
from vlora.engine.engine import LLMEngine
from vlora.engine.lora_manager import UnknownAdapterError
from vlora.engine.optimal_sampling import OptimalSamplingParams
from vlora.engine.sampling import SamplingParams
from tests.unit.oracle import hf_logits, peft_model, random_peft_adapter


@pytest.fixture(scope="module")
def student_dir(hf_model, tmp_path_factory):
    return random_peft_adapter(hf_model, tmp_path_factory.mktemp("os") / "student", seed=21, r=4, alpha=8)


@pytest.fixture(scope="module")
def engine(tiny_model_dir, student_dir):
    eng = LLMEngine(EngineConfig(str(tiny_model_dir), block_size=4, num_kv_blocks=256, max_loras=2, max_lora_rank=8))
    eng.add_lora("student", load_peft_adapter(student_dir)[0])
    return eng


def run(engine, prompt, sampling, adapter=None, **kw):
    rid = engine.add_request(prompt, sampling, adapter, **kw)
    toks, diags = [], []
    while engine.has_unfinished():
        for o in engine.step():
            assert o.request_id == rid
            for c in o.choices:
                toks += c.token_ids
                diags += c.diagnostics or []
    assert engine.pool.num_free_blocks == engine.pool.num_blocks
    return toks, diags


def student_logits(hf_model, student_dir, ids):
    pm = peft_model(hf_model, student_dir)
    try:
        return hf_logits(pm, ids)
    finally:
        pm.unload()


def kl_symmetry_alpha(lps: torch.Tensor, lpt: torch.Tensor) -> float:
    """Direct float64 bisection on E_q[log p_t - log p_s] = 0 (the spec's definition)."""
    lo, hi = 0.0, 1.0
    lg = lpt - lps

    def g(a):
        q = torch.softmax((1 - a) * lps + a * lpt, dim=-1)
        return float((q * lg).sum())

    if g(0.0) >= 0:
        return 0.0
    if g(1.0) <= 0:
        return 1.0
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if g(mid) < 0 else (lo, mid)
    return (lo + hi) / 2


def expected_diagnostics(z_s: torch.Tensor, z_t: torch.Tensor, token: int, temperature: float) -> dict:
    lps = torch.log_softmax(z_s.double() / temperature, -1).clamp_min(torch.log(torch.tensor(1e-10)).item())
    lpt = torch.log_softmax(z_t.double() / temperature, -1).clamp_min(torch.log(torch.tensor(1e-10)).item())
    lps, lpt = torch.log_softmax(lps, -1), torch.log_softmax(lpt, -1)
    a = kl_symmetry_alpha(lps, lpt)
    lq = torch.log_softmax((1 - a) * lps + a * lpt, -1)
    q, ps, pt = lq.exp(), lps.exp(), lpt.exp()
    return {
        "alpha": a,
        "ess_student": float(1 / (ps ** 2 / q).sum()),
        "ess_teacher": float(1 / (pt ** 2 / q).sum()),
        "kl_student": float((q * (lq - lps)).sum()),
        "kl_teacher": float((q * (lq - lpt)).sum()),
        "logprob_student": float(lps[token]),
        "logprob_teacher": float(lpt[token]),
        "logprob_q": float(lq[token]),
    }


def test_diagnostics_equal_offline_recomputation_from_hf_peft(engine, tokenizer, hf_model, student_dir):
    prompt = tokenizer("What colour is this? It is").input_ids
    sp = SamplingParams(max_tokens=8, temperature=1.0, seed=5, ignore_eos=True)
    toks, diags = run(engine, prompt, sp, "student", optimal=OptimalSamplingParams(teacher="base"))
    assert len(toks) == len(diags) == 8 and [d["token_id"] for d in diags] == toks
    full = prompt + toks
    zs = student_logits(hf_model, student_dir, full)[len(prompt) - 1:-1]
    zt = hf_logits(hf_model, full)[len(prompt) - 1:-1]
    for k, d in enumerate(diags):
        exp = expected_diagnostics(zs[k], zt[k], toks[k], 1.0)
        for key, value in exp.items():
            assert abs(d[key] - value) < 1e-4, (k, key, d[key], value)
        assert d["ess_ratio"] == pytest.approx(d["ess_student"] / d["ess_teacher"], rel=1e-6)
        assert 0 < d["alpha"] < 1  # the student adapter and base really differ


def test_dual_prompts_use_the_teachers_own_prompt(engine, tokenizer, hf_model, student_dir):
    prompt = tokenizer("Describe the image.").input_ids
    teacher_prompt = tokenizer("You are a helpful assistant. Describe the image in detail.").input_ids
    sp = SamplingParams(max_tokens=6, temperature=0.8, seed=2, ignore_eos=True)
    toks, diags = run(engine, prompt, sp, "student", optimal=OptimalSamplingParams(teacher="base"),
                      teacher_prompt=teacher_prompt)
    zs = student_logits(hf_model, student_dir, prompt + toks)[len(prompt) - 1:-1]
    zt = hf_logits(hf_model, teacher_prompt + toks)[len(teacher_prompt) - 1:-1]
    for k, d in enumerate(diags):
        exp = expected_diagnostics(zs[k], zt[k], toks[k], 0.8)
        assert abs(d["logprob_teacher"] - exp["logprob_teacher"]) < 1e-4
        assert abs(d["alpha"] - exp["alpha"]) < 1e-4


def test_fixed_alpha_0_and_1_reproduce_student_and_teacher_sampling(engine, tokenizer):
    prompt = tokenizer("Hello! How can I help").input_ids
    sp = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.95, seed=17, ignore_eos=True)
    student_only, _ = run(engine, prompt, sp, "student")
    teacher_only, _ = run(engine, prompt, sp, None)
    as_student, d0 = run(engine, prompt, sp, "student",
                         optimal=OptimalSamplingParams(teacher="base", alpha_method="fixed", fixed_alpha=0.0))
    as_teacher, d1 = run(engine, prompt, sp, "student",
                         optimal=OptimalSamplingParams(teacher="base", alpha_method="fixed", fixed_alpha=1.0))
    assert as_student == student_only and as_teacher == teacher_only
    assert student_only != teacher_only
    assert all(d["alpha"] == 0.0 for d in d0) and all(d["alpha"] == 1.0 for d in d1)


def test_optimal_sampling_survives_preemption(tiny_model_dir, tokenizer, student_dir):
    def engine_with(blocks):
        eng = LLMEngine(EngineConfig(str(tiny_model_dir), block_size=4, num_kv_blocks=blocks, max_num_seqs=8,
                                     max_loras=2, max_lora_rank=8))
        eng.add_lora("student", load_peft_adapter(student_dir)[0])
        return eng

    prompts = [tokenizer(t).input_ids for t in ["Hello there", "A red cat", "Numbers: 1 2 3"]]
    sp = SamplingParams(max_tokens=12, temperature=1.0, seed=3, ignore_eos=True)
    opt = OptimalSamplingParams(teacher="base")

    def all_outputs(eng):
        rids = [eng.add_request(p, sp, "student", optimal=opt) for p in prompts]
        out = {r: [] for r in rids}
        while eng.has_unfinished():
            for o in eng.step():
                out[o.request_id] += o.choices[0].token_ids
        assert eng.pool.num_free_blocks == eng.pool.num_blocks
        return [out[r] for r in rids], eng.num_preemptions

    roomy, _ = all_outputs(engine_with(256))
    tight, preemptions = all_outputs(engine_with(14))
    assert preemptions > 0 and tight == roomy


def test_unknown_teacher_and_abort(engine, tokenizer):
    prompt = tokenizer("Hello").input_ids
    with pytest.raises(UnknownAdapterError, match="adapter 'nope' is not loaded"):
        engine.add_request(prompt, SamplingParams(), "student", optimal=OptimalSamplingParams(teacher="nope"))
    assert not engine.has_unfinished() and engine.pool.num_free_blocks == engine.pool.num_blocks
    rid = engine.add_request(prompt, SamplingParams(max_tokens=40, ignore_eos=True), "student",
                             optimal=OptimalSamplingParams(teacher="base"))
    engine.step()
    engine.step()
    assert engine.pool.num_used_blocks > 0
    engine.abort(rid)
    assert not engine.has_unfinished() and engine.pool.num_free_blocks == engine.pool.num_blocks
    assert all(r == -1 or engine.loras._refs[r] == 0 for r in range(len(engine.loras._refs)))


def test_n_choices_each_get_a_teacher_row(engine, tokenizer):
    prompt = tokenizer("The quick brown fox").input_ids
    sp = SamplingParams(max_tokens=5, n=3, temperature=1.0, seed=1, ignore_eos=True)
    rid = engine.add_request(prompt, sp, "student", optimal=OptimalSamplingParams(teacher="base"))
    per_choice = {i: [] for i in range(3)}
    while engine.has_unfinished():
        for o in engine.step():
            for c in o.choices:
                per_choice[c.index] += c.diagnostics or []
    assert all(len(d) == 5 for d in per_choice.values())
    assert engine.pool.num_free_blocks == engine.pool.num_blocks
    assert rid not in engine.requests
