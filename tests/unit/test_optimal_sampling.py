"""Optimal sampling: each alpha method against its defining equation (direct float64 computation),
exact equivalence of fixed alpha 0 / 1 with the plain Sampler, teacher support restriction,
diagnostics, force options and parameter validation."""

from __future__ import annotations

import math

import pytest
import torch

from vlora.engine.optimal_sampling import (
    ALPHA_METHODS,
    OptimalSampler,
    OptimalSamplingParams,
    TokenDiagnostics,
    diagnostics,
    mix,
    solve_alpha,
)
from vlora.engine.sampling import RowState, Sampler, SamplingParams

F64 = torch.float64


def logits_pair(b: int, v: int, seed: int, scale_s: float, scale_t: float) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, v, generator=g) * scale_s, torch.randn(b, v, generator=g) * scale_t


def clamped(z: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    return (z.float() / T).softmax(-1).clamp_min(1e-10).log()


# Direct float64 references: distributions are the renormalised clamped log-probs.
def ref_logp(lp: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(lp.to(F64), -1)


def ref_logq(lps: torch.Tensor, lpt: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    a = a.to(F64)[:, None]
    return torch.log_softmax((1 - a) * lps + a * lpt, -1)


def kl(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:  # KL(p || q)
    return (lp.exp() * (lp - lq)).sum(-1)


# Several seeds, flat (small scale) and peaked (large scale) distributions, V from 50 to 1000.
CASES = [
    (seed, v, ss, st)
    for seed, v in ((0, 50), (1, 257), (2, 1000))
    for ss, st in ((0.5, 0.5), (3.0, 3.0), (8.0, 2.0), (1.0, 12.0))
]


def cases():
    for seed, v, ss, st in CASES:
        zs, zt = logits_pair(6, v, seed, ss, st)
        yield clamped(zs), clamped(zt)


# ------------------------------------------------------------------------------------ alpha methods


def test_kl_symmetry_meets_its_equation():
    n_interior = 0
    for log_ps, log_pt in cases():
        a = solve_alpha(log_ps, log_pt, "kl_symmetry")
        assert a.dtype == F64 and a.shape == (log_ps.shape[0],)
        lps, lpt = ref_logp(log_ps), ref_logp(log_pt)
        lq = ref_logq(lps, lpt, a)
        gap = kl(lq, lps) - kl(lq, lpt)
        for i in range(len(a)):
            if 0 < a[i] < 1:
                n_interior += 1
                assert abs(gap[i]) < 1e-6, (a[i], gap[i])
            else:  # clamped: the root lies beyond the end (gap = -E_q[l] has the matching sign)
                assert (a[i] == 0 and gap[i] <= 1e-6) or (a[i] == 1 and gap[i] >= -1e-6)
    assert n_interior > 50


def test_reverse_kl_symmetry_meets_its_equation():
    for log_ps, log_pt in cases():
        a = solve_alpha(log_ps, log_pt, "reverse_kl_symmetry")
        lps, lpt = ref_logp(log_ps), ref_logp(log_pt)
        lq = ref_logq(lps, lpt, a)
        assert ((a > 0) & (a < 1)).all()
        assert (kl(lps, lq) - kl(lpt, lq)).abs().max() < 1e-6


def test_ess_balance_meets_its_equation_or_falls_back():
    for log_ps, log_pt in cases():
        a = solve_alpha(log_ps, log_pt, "ess_balance")
        lps, lpt = ref_logp(log_ps), ref_logp(log_pt)

        def sums(alpha):
            lq = ref_logq(lps, lpt, alpha)
            return (2 * lpt - lq).exp().sum(-1), (2 * lps - lq).exp().sum(-1)

        t0, s0 = sums(torch.zeros(len(a)))
        t1, s1 = sums(torch.ones(len(a)))
        change = (t0 - s0) * (t1 - s1) <= 0
        ft, fs = sums(a)
        rel = (ft - fs).abs() / torch.maximum(ft, fs)
        kl_a = solve_alpha(log_ps, log_pt, "kl_symmetry")
        for i in range(len(a)):
            if change[i]:
                assert rel[i] < 1e-6, (a[i], rel[i])
            else:
                assert a[i] == kl_a[i]
        assert change.all()  # for unequal distributions there always is one: D(0) >= 0 >= D(1)


def test_ess_balance_fallback_when_no_sign_change(monkeypatch):
    import vlora.engine.optimal_sampling as osm

    log_ps, log_pt = next(cases())
    real = osm._ess_balance
    monkeypatch.setattr(osm, "_ess_balance", lambda a, b: (real(a, b)[0], torch.zeros(a.shape[0], dtype=torch.bool)))
    assert torch.equal(solve_alpha(log_ps, log_pt, "ess_balance"), solve_alpha(log_ps, log_pt, "kl_symmetry"))


def test_entropy_formula():
    for log_ps, log_pt in cases():
        a = solve_alpha(log_ps, log_pt, "entropy")
        lps, lpt = ref_logp(log_ps), ref_logp(log_pt)
        h_s, h_t = -(lps.exp() * lps).sum(-1), -(lpt.exp() * lpt).sum(-1)
        assert torch.allclose(a, h_t / (h_s + h_t), atol=1e-12, rtol=0)


def test_fixed_is_not_clamped_and_per_row():
    log_ps, log_pt = next(cases())
    a = solve_alpha(log_ps, log_pt, "fixed", fixed_alpha=0.9, alpha_min=0.0, alpha_max=0.2)
    assert a.tolist() == [0.9] * 6
    per_row = torch.linspace(0, 1, 6, dtype=F64)
    assert torch.equal(solve_alpha(log_ps, log_pt, "fixed", fixed_alpha=per_row), per_row)


@pytest.mark.parametrize("method", [m for m in ALPHA_METHODS if m != "fixed"])
def test_clamping(method):
    for log_ps, log_pt in cases():
        free = solve_alpha(log_ps, log_pt, method)
        lo, hi = 0.45, 0.55
        a = solve_alpha(log_ps, log_pt, method, alpha_min=lo, alpha_max=hi)
        assert torch.allclose(a, free.clamp(lo, hi), atol=1e-9, rtol=0)
        assert ((a >= lo) & (a <= hi)).all()
    # per-row bounds, including a degenerate interval
    mins = torch.tensor([0.0, 0.3, 0.7, 0.5, 0.0, 1.0], dtype=F64)
    maxs = torch.tensor([1.0, 0.4, 0.9, 0.5, 0.1, 1.0], dtype=F64)
    a = solve_alpha(log_ps, log_pt, method, alpha_min=mins, alpha_max=maxs)
    assert ((a >= mins) & (a <= maxs)).all()
    assert a[3] == 0.5 and a[5] == 1.0


@pytest.mark.parametrize("method", [m for m in ALPHA_METHODS if m != "fixed"])
def test_identical_distributions_give_half_then_clamped(method):
    zs, _ = logits_pair(3, 300, 7, 3.0, 3.0)
    lp = clamped(zs)
    near = lp + 1e-9 * torch.randn(lp.shape, generator=torch.Generator().manual_seed(1))
    for other in (lp, near):
        assert solve_alpha(lp, other, method).tolist() == [0.5] * 3
        assert solve_alpha(lp, other, method, alpha_min=0.7, alpha_max=0.9).tolist() == [0.7] * 3
        assert solve_alpha(lp, other, method, alpha_min=0.0, alpha_max=0.2).tolist() == [0.2] * 3
    # fixed keeps its value even then
    assert solve_alpha(lp, lp, "fixed", fixed_alpha=0.1).tolist() == [0.1] * 3


def test_unknown_method_in_solver():
    log_ps, log_pt = next(cases())
    with pytest.raises(ValueError, match="alpha_method"):
        solve_alpha(log_ps, log_pt, "chernoff")


# ------------------------------------------------------------------------------------ exactness vs Sampler


@pytest.mark.parametrize("alpha, which", [(0.0, "student"), (1.0, "teacher")])
def test_fixed_alpha_0_and_1_reproduce_plain_sampling_exactly(alpha, which):
    V = 300
    zs, zt = logits_pair(4, V, 11, 1.5, 1.5)
    sp = [SamplingParams(temperature=0.7, top_p=0.9, seed=100 + i) for i in range(4)]
    op = [OptimalSamplingParams(teacher="base", alpha_method="fixed", fixed_alpha=alpha) for _ in range(4)]
    plain_rows = [RowState.create(p) for p in sp]
    opt_rows = [RowState.create(p) for p in sp]
    sampler, opt = Sampler(), OptimalSampler()
    ref_logits = zs if which == "student" else zt
    plain, ours = [], []
    for step in range(200):
        # vary the logits over steps so the draws cover many distributions
        shift = torch.randn(4, V, generator=torch.Generator().manual_seed(step)) * 0.5
        a = sampler.sample(ref_logits + shift, plain_rows).token_ids
        b, d = opt.sample(zs + shift, zt + shift, opt_rows, op, [step == 0] * 4, set())
        plain.append(a)
        ours.append(b)
        assert all(x.alpha == alpha for x in d)
    assert ours == plain
    assert len({t for row in plain for t in row}) > 50  # genuinely random draws


def test_penalties_and_mixed_greedy_batch_match_plain_sampler():
    V = 150
    zs, zt = logits_pair(3, V, 31, 1.5, 1.5)
    sp = [
        SamplingParams(temperature=0.8, seed=1, frequency_penalty=1.0, presence_penalty=0.5),
        SamplingParams(temperature=0),
        SamplingParams(temperature=1.2, top_k=20, min_p=0.02, seed=2),
    ]
    op = [OptimalSamplingParams(teacher="base", alpha_method="fixed", fixed_alpha=1.0)] * 3
    plain_rows, opt_rows = [RowState.create(p) for p in sp], [RowState.create(p) for p in sp]
    for step in range(50):
        a = Sampler().sample(zt, plain_rows).token_ids
        b, _ = OptimalSampler().sample(zs, zt, opt_rows, op, [False] * 3, set())
        assert a == b, step
        for r, t in zip(plain_rows + opt_rows, a + b):
            r.output_token_ids.append(t)


def test_minus_inf_logits_do_not_make_nan():
    zs, zt = logits_pair(3, 60, 2, 2.0, 2.0)
    zs[:, 50:] = float("-inf")  # e.g. padded vocabulary rows
    zt[:, 40:] = float("-inf")
    for method in ALPHA_METHODS:
        for fixed in (0.0, 0.3, 1.0):
            m = mix(zs, zt, 1.0, OptimalSamplingParams(teacher="base", alpha_method=method, fixed_alpha=fixed))
            assert not torch.isnan(m.logits_q).any() and torch.isfinite(m.alpha).all()
            assert torch.isfinite(m.logits_q[:, :40]).all() and (m.logits_q[:, 50:] == float("-inf")).all()
    rows = [RowState.create(SamplingParams(seed=i)) for i in range(3)]
    toks, d = OptimalSampler().sample(zs, zt, rows, [OptimalSamplingParams(teacher="base")] * 3, [False] * 3, set())
    assert all(t < 40 for t in toks) and all(math.isfinite(x.kl_student) for x in d)


def test_greedy_is_argmax_of_q():
    zs, zt = logits_pair(5, 200, 3, 3.0, 3.0)
    rows = [RowState.create(SamplingParams(temperature=0)) for _ in range(5)]
    op = [OptimalSamplingParams(teacher="base", alpha_method=m) for m in ALPHA_METHODS]
    toks, diags = OptimalSampler().sample(zs, zt, rows, op, [False] * 5, set())
    m = mix(zs, zt, 0.0, op)
    assert toks == m.logits_q.argmax(-1).tolist()
    # T = 1 is used for the distributions
    assert torch.equal(m.log_ps, clamped(zs)) and torch.equal(m.temperature, torch.ones(5))
    assert [d.alpha for d in diags] == m.alpha.tolist()


def test_seeded_rows_are_batch_independent():
    zs, zt = logits_pair(3, 200, 5, 2.0, 2.0)
    op = OptimalSamplingParams(teacher="base")

    def run(batch_rows):
        rows = [RowState.create(SamplingParams(temperature=0.9, seed=s)) for s in batch_rows]
        n = len(rows)
        return OptimalSampler().sample(zs[:n], zt[:n], rows, [op] * n, [False] * n, set())[0]

    alone = run([42])
    together = run([42, 1, 2])
    assert alone[0] == together[0]


# ------------------------------------------------------------------------------------ teacher support


def expected_teacher_mask(xt: torch.Tensor, k: int, p: float) -> torch.Tensor:
    probs = torch.softmax(xt.to(F64), -1)
    order = probs.argsort(descending=True)
    keep = torch.zeros_like(probs, dtype=torch.bool)
    if k > 0:
        keep_k = torch.zeros_like(keep)
        keep_k.scatter_(0, order[:k], True)
    else:
        keep_k = torch.ones_like(keep)
    if p < 1:
        cum = probs[order].cumsum(0)
        n = int((cum < p).sum()) + 1  # the crossing token is kept
        keep_p = torch.zeros_like(keep)
        keep_p.scatter_(0, order[:n], True)
    else:
        keep_p = torch.ones_like(keep)
    keep = keep_k & keep_p
    keep[order[0]] = True
    return keep


def test_teacher_support_restriction_masks_exactly():
    V = 400
    zs, zt = logits_pair(5, V, 21, 2.0, 2.0)
    settings = [(0, 1.0), (10, 1.0), (0, 0.5), (50, 0.3), (3, 0.99)]
    op = [OptimalSamplingParams(teacher="base", teacher_top_k=k, teacher_top_p=p) for k, p in settings]
    T = 0.8
    m = mix(zs, zt, T, op)
    unrestricted = mix(zs, zt, T, [OptimalSamplingParams(teacher="base")] * 5)
    assert torch.equal(m.alpha, unrestricted.alpha)  # alpha is computed on the full distributions
    for i, (k, p) in enumerate(settings):
        exp_keep = expected_teacher_mask(zt[i] / T, k, p)
        got_keep = torch.isfinite(m.logits_q[i])
        assert torch.equal(got_keep, exp_keep), (k, p, int(got_keep.sum()), int(exp_keep.sum()))
        # inside the support q* is unchanged up to renormalisation
        lq = torch.log_softmax(m.logits_q[i].to(F64), -1)
        lq_full = torch.log_softmax(unrestricted.logits_q[i].to(F64), -1)
        renorm = lq_full[exp_keep] - torch.logsumexp(lq_full[exp_keep], 0)
        assert torch.allclose(lq[exp_keep], renorm, atol=1e-5)
    # the top-1 survives even a nucleus smaller than its own mass
    m = mix(zs, zt, 1.0, [OptimalSamplingParams(teacher="base", teacher_top_p=1e-6)] * 5)
    assert (torch.isfinite(m.logits_q).sum(-1) == 1).all()
    assert torch.equal(m.logits_q.argmax(-1), zt.argmax(-1))


def test_sampled_tokens_stay_in_teacher_support_and_request_filters():
    V = 200
    zs, zt = logits_pair(1, V, 4, 3.0, 3.0)
    op = [OptimalSamplingParams(teacher="base", teacher_top_k=20)]
    row = RowState.create(SamplingParams(temperature=1.0, top_k=5, seed=0))
    m = mix(zs, zt, 1.0, op)
    allowed = set(m.logits_q[0].topk(5).indices.tolist())
    assert allowed <= set(zt[0].topk(20).indices.tolist())
    for _ in range(100):
        toks, _ = OptimalSampler().sample(zs, zt, [row], op, [False], set())
        assert toks[0] in allowed


# ------------------------------------------------------------------------------------ diagnostics


def ref_diagnostics(final: torch.Tensor, log_ps, log_pt, tok: int):
    lq = torch.log_softmax(final.to(F64), -1)
    S = torch.isfinite(lq)
    q = lq.exp()[S]
    out = {}
    for name, lp in (("student", log_ps), ("teacher", log_pt)):
        lp = torch.log_softmax(lp.to(F64), -1)
        p = lp.exp()[S]
        out[f"ess_{name}"] = float(p.sum() ** 2 / (p**2 / q).sum())
        out[f"kl_{name}"] = float((q * (lq[S] - lp[S])).sum())
        out[f"logprob_{name}"] = float(lp[tok])
    out["ess_ratio"] = out["ess_student"] / out["ess_teacher"]
    out["logprob_q"] = float(lq[tok])
    return out


@pytest.mark.parametrize("restrict", [False, True])
def test_diagnostics_match_direct_float64(restrict):
    V = 500
    zs, zt = logits_pair(5, V, 9, 3.0, 4.0)
    extra = dict(teacher_top_k=40, teacher_top_p=0.8) if restrict else {}
    op = [OptimalSamplingParams(teacher="base", alpha_method=m, **extra) for m in ALPHA_METHODS]
    sp = [
        SamplingParams(temperature=0.8, seed=1),
        SamplingParams(temperature=1.0, top_p=0.9, seed=2),
        SamplingParams(temperature=1.3, top_k=30, seed=3),
        SamplingParams(temperature=0.6, min_p=0.05, seed=4),
        SamplingParams(temperature=0, seed=5),
    ]
    rows = [RowState.create(p) for p in sp]
    toks, diags = OptimalSampler().sample(zs, zt, rows, op, [False] * 5, set())
    # rebuild the final distribution: mix + the request filters, via a replay
    m = mix(zs, zt, [p.temperature for p in sp], op)
    from vlora.engine.sampling import filter_logits

    k = torch.tensor([p.top_k if p.top_k >= 1 else V for p in sp])
    final = filter_logits(m.logits_q, k, torch.tensor([p.top_p for p in sp]), torch.tensor([p.min_p for p in sp]))
    for i, d in enumerate(diags):
        assert isinstance(d, TokenDiagnostics)
        assert math.isfinite(final[i, toks[i]])  # the token is inside the final support
        ref = ref_diagnostics(final[i], m.log_ps[i], m.log_pt[i], toks[i])
        for key, val in ref.items():
            assert getattr(d, key) == pytest.approx(val, abs=1e-5, rel=1e-5), key
        assert d.alpha == float(m.alpha[i])
        assert 0 < d.ess_student <= 1 and 0 < d.ess_teacher <= 1
        assert d.kl_student >= 0 and d.kl_teacher >= 0
        assert d.logprob_q <= 0 and d.logprob_student <= 0 and d.logprob_teacher <= 0
        assert set(d.to_dict()) == set(TokenDiagnostics.__slots__)
    if not restrict:  # full support: ess is the spec's 1 / sum(p^2 / q) exactly
        lq = torch.log_softmax(final[0].to(F64), -1)
        ps = torch.softmax(m.log_ps[0].to(F64), -1)
        assert diags[0].ess_student == pytest.approx(float(1 / (ps**2 / lq.exp()).sum()), rel=1e-9)


def test_diagnostics_kl_symmetry_equal_kls_on_unfiltered_q():
    zs, zt = logits_pair(4, 300, 13, 3.0, 3.0)
    op = OptimalSamplingParams(teacher="base", alpha_method="kl_symmetry")
    m = mix(zs, zt, 1.0, op)
    d = diagnostics(m.logits_q, m.log_ps, m.log_pt, m.alpha, torch.zeros(4, dtype=torch.long))
    for x in d:
        assert abs(x.kl_student - x.kl_teacher) < 1e-5 and x.kl_student > 0


def test_return_diagnostics_false_gives_none():
    zs, zt = logits_pair(2, 100, 1, 2.0, 2.0)
    op = [OptimalSamplingParams(teacher="a", return_diagnostics=False), OptimalSamplingParams(teacher="a")]
    rows = [RowState.create(SamplingParams(seed=i)) for i in range(2)]
    _, d = OptimalSampler().sample(zs, zt, rows, op, [False, False], set())
    assert d[0] is None and isinstance(d[1], TokenDiagnostics)


# ------------------------------------------------------------------------------------ force options


def test_force_teacher_first_token():
    V = 300
    zs, zt = logits_pair(3, V, 17, 3.0, 3.0)
    op = [OptimalSamplingParams(teacher="base", force_teacher_first_token=True)] * 3
    sp = [SamplingParams(temperature=0.7, top_p=0.9, seed=7 + i) for i in range(3)]
    forced = [RowState.create(p) for p in sp]
    plain = [RowState.create(p) for p in sp]
    first = [True, False, True]
    toks, d = OptimalSampler().sample(zs, zt, forced, op, first, set())
    ref = Sampler().sample(zt, plain).token_ids  # pure teacher sampling, same seeds
    assert toks[0] == ref[0] and toks[2] == ref[2]
    assert d[0].alpha == 1.0 and d[2].alpha == 1.0 and d[1].alpha < 1.0
    # alpha 1: q is p_t, so the sampled token's logprob_q is its teacher logprob (after top-p renorm)
    assert d[0].kl_teacher >= 0 and d[0].logprob_q >= d[0].logprob_teacher - 1e-6
    # off unless asked
    op_off = [OptimalSamplingParams(teacher="base")] * 3
    _, d = OptimalSampler().sample(zs, zt, [RowState.create(p) for p in sp], op_off, [True] * 3, set())
    assert all(x.alpha < 1 for x in d)


def test_force_teacher_special_tokens_distribution():
    V = 100
    zs, zt = logits_pair(2, V, 23, 2.0, 2.0)
    special = {3, 50, 99}
    op = [OptimalSamplingParams(teacher="base", force_teacher_special_tokens=True)] * 2
    mask = torch.zeros(V, dtype=torch.bool)
    mask[list(special)] = True
    T = 0.9
    m = mix(zs, zt, T, op, special_mask=mask)
    plain = mix(zs, zt, T, [OptimalSamplingParams(teacher="base")] * 2)
    assert torch.equal(m.alpha, plain.alpha) and m.special_rows.all()
    q = torch.softmax(m.logits_q.to(F64), -1)
    pt = torch.softmax((zt / T).to(F64), -1)
    qs = torch.softmax(plain.logits_q.to(F64), -1)
    S = mask
    # special tokens carry exactly the teacher's probabilities ...
    assert torch.allclose(q[:, S], pt[:, S], atol=1e-6)
    # ... and the other tokens share the rest in proportion to q*
    expect = qs[:, ~S] / qs[:, ~S].sum(-1, keepdim=True) * (1 - pt[:, S].sum(-1, keepdim=True))
    assert torch.allclose(q[:, ~S], expect, atol=1e-6)
    assert torch.allclose(q.sum(-1), torch.ones(2, dtype=F64))


def test_force_teacher_special_tokens_reports_alpha_1_on_special_draws():
    V = 20
    g = torch.Generator().manual_seed(0)
    zs = torch.randn(1, V, generator=g)
    zt = torch.randn(1, V, generator=g)
    zs[0, 7] = -10.0  # the student almost never says token 7 ...
    zt[0, 7] = 3.0  # ... the teacher often does
    op = [OptimalSamplingParams(teacher="base", force_teacher_special_tokens=True)]
    row = RowState.create(SamplingParams(seed=3))
    hits = 0
    for _ in range(300):
        toks, d = OptimalSampler().sample(zs, zt, [row], op, [False], {7, 1000})  # out-of-vocab ids ignored
        if toks[0] == 7:
            hits += 1
            assert d[0].alpha == 1.0
        else:
            assert d[0].alpha < 1.0
        q = mix(zs, zt, 1.0, op, special_mask=torch.arange(V) == 7).logits_q[0].double()
        assert d[0].logprob_q == pytest.approx(float(torch.log_softmax(q, -1)[toks[0]]), abs=1e-6)
    pt7 = float(torch.softmax(zt[0], -1)[7])
    assert abs(hits / 300 - pt7) < 0.1  # emitted at the teacher's rate, not suppressed
    # without the option (or without special ids) nothing changes
    m_off = mix(zs, zt, 1.0, [OptimalSamplingParams(teacher="base")], special_mask=torch.arange(V) == 7)
    assert not m_off.special_rows.any()


# ------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(alpha_method="chernoff"), "alpha_method"),
        (dict(alpha_min=0.8, alpha_max=0.2), "alpha_min"),
        (dict(fixed_alpha=1.5), "fixed_alpha"),
        (dict(fixed_alpha=-0.1), "fixed_alpha"),
        (dict(fixed_alpha=float("nan")), "fixed_alpha"),
        (dict(teacher_top_p=0.0), "teacher_top_p"),
        (dict(teacher_top_p=1.1), "teacher_top_p"),
        (dict(teacher_top_k=-1), "teacher_top_k"),
        (dict(teacher_top_k=2.5), "teacher_top_k"),
        (dict(alpha_max=2.0), "alpha_max"),
        (dict(alpha_min=-1.0), "alpha_min"),
        (dict(return_diagnostics=1), "return_diagnostics"),
        (dict(force_teacher_first_token="yes"), "force_teacher_first_token"),
        (dict(teacher=""), "teacher"),
    ],
)
def test_validation_messages(kwargs, field):
    kwargs = {"teacher": "base", **kwargs}
    with pytest.raises(ValueError, match=field):
        OptimalSamplingParams(**kwargs)


def test_defaults_valid():
    p = OptimalSamplingParams(teacher="base")
    assert p.alpha_method == "kl_symmetry" and p.alpha_min == 0.0 and p.alpha_max == 1.0
    assert p.return_diagnostics and not p.force_teacher_first_token and not p.force_teacher_special_tokens
    OptimalSamplingParams(teacher="tutor", alpha_method="fixed", fixed_alpha=0, teacher_top_k=5, teacher_top_p=0.5)


def test_shape_errors():
    zs, zt = logits_pair(2, 50, 0, 1.0, 1.0)
    rows = [RowState.create(SamplingParams()) for _ in range(2)]
    op = [OptimalSamplingParams(teacher="base")] * 2
    with pytest.raises(ValueError):
        OptimalSampler().sample(zs, zt[:, :40], rows, op, [False] * 2, set())
    with pytest.raises(ValueError):
        OptimalSampler().sample(zs, zt, rows[:1], op[:1], [False], set())
    assert OptimalSampler().sample(zs[:0], zt[:0], [], [], [], set()) == ([], [])
