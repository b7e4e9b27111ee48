"""Optimal sampling: draw each token from a geometric mixture q* of a student and a teacher policy.

The math is /work/shared/optimal_sampling.md ("the spec"); this module is its batched implementation.
For a batch of student / teacher logit pairs `[B, V]` and each row's temperature `T`:

    p_s = softmax(z_s / T)      p_t = softmax(z_t / T)      (log-probs clamped at 1e-10)
    q*  = softmax(((1 - alpha) * z_s + alpha * z_t) / T)    alpha per row, from one of ALPHA_METHODS

then q* is restricted to the teacher's top-k / top-p support, the request's own top-k / top-p /
min-p filter it exactly as in ordinary sampling (`engine.sampling.filter_logits`), and the token is
drawn with the row's own seeded uniform by the same inverse-CDF draw `engine.sampling.Sampler._draw`
uses (it is called, not copied). Nothing here imports Ray.

Decisions the spec leaves open, made here:

* Temperature 0 (greedy): the token is the argmax of the final q; alpha, q and the diagnostics are
  computed with T = 1 (softmax(z / 0) is not a distribution).
* Presence / frequency penalties, when a request has them, are applied to BOTH logit rows (the same
  `apply_penalties` the plain Sampler uses) before anything else, so p_s, p_t, alpha and q all refer
  to the penalised distributions, and `fixed` alpha 0 / 1 stays identical to plain sampling.
* Numerics: distributions are float32 (`softmax`, clamp 1e-10, `log`). The alpha solvers renormalise
  those clamped log-probs in float64 (`log_softmax`) and solve there, so each alpha meets its
  defining equation to ~1e-10; `solve_alpha` returns float64. The mixture itself is formed from the
  raw logits as `((1 - a) z_s + a z_t) / T` in float32, with a == 0 / a == 1 selecting z_s / z_t
  exactly, so alpha 0 / 1 reproduce plain sampling bit for bit.
* `fixed` is never clamped and ignores the "identical distributions -> 0.5" rule (the spec puts
  both rules on the solved methods only); every other method gives 0.5 (then clamped) when
  max |p_s - p_t| <= 1e-6.
* `kl_symmetry` and the `ess_balance` fallback are solved directly on [alpha_min, alpha_max]: since
  E_q[l] is non-decreasing in alpha this equals clamp(root on [0, 1]). `ess_balance` bisects on
  [0, 1] (either direction of sign change is accepted) and then clamps; with no sign change at the
  end points it falls back to `kl_symmetry`.
* `force_teacher_first_token`: on a row's first generated token alpha is set to 1, so q = p_t; the
  teacher restriction and the request's filters still apply (to p_t itself). Alpha reported: 1.
* `force_teacher_special_tokens` (the spec's one-liner "sample special tokens from p_t alone"): the
  special tokens take exactly their teacher probabilities and the other tokens share the remaining
  mass in proportion to q*:
        q(y) = p_t(y)                                   y special
        q(y) = q*(y) * (1 - p_t(specials)) / q*(non-specials)   otherwise
  then restriction / filters / one draw as usual, and alpha is reported as 1 when the drawn token is
  special. This is one distribution, so `logprob_q` is the exact probability of the token. (The
  alternative "draw from q*, redraw from p_t if special" was rejected: it emits a special token y
  with probability q*(specials) * p_t(y), i.e. it *suppresses* EOS and friends, and the token's
  probability under that two-stage procedure is not the q the diagnostics would report.)
* Diagnostics are over the support S of the final q (q = 0 elsewhere, where p/q is infinite). The
  ESS is Kish's normalised ESS of the weights w = p/q under q:
        ess = (sum_S p)^2 / sum_S p^2 / q
  which is the spec's 1 / sum(p^2 / q) whenever q has full support (sum_S p = 1), and stays in
  (0, 1] (Cauchy-Schwarz) when the support was restricted, where the spec's bare formula can exceed 1.
  KL(q || p) = sum_S q (log q - log p) >= 0. p_s, p_t here are the renormalised clamped
  distributions (as in the solver), q is log_softmax of the final logits, all in float64.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from vlora.engine.sampling import (
    RowState,
    Sampler,
    SamplingParams,
    _is_int,
    _is_num,
    apply_penalties,
    filter_logits,
)

ALPHA_METHODS = ("fixed", "kl_symmetry", "reverse_kl_symmetry", "ess_balance", "entropy")

PROB_FLOOR = 1e-10  # probabilities are clamped here before taking logs (spec)
IDENTICAL_TOL = 1e-6  # max |p_s - p_t| under which the two policies count as identical (spec)
_KL_TOL = 1e-11  # |E_q[l]| at which the kl_symmetry Newton iteration stops
_MAX_ITERS = 100

_UNIT_PARAMS = SamplingParams()  # temperature 1, no filters: for handing final logits to Sampler._draw


@dataclass(slots=True)
class OptimalSamplingParams:
    """Per-request optimal-sampling options, validated up front.

    `teacher` is "base" or an adapter name (resolved by the engine). `teacher_top_k` 0 and
    `teacher_top_p` 1.0 mean no restriction to the teacher's support.
    """

    teacher: str
    alpha_method: str = "kl_symmetry"
    fixed_alpha: float = 0.5
    alpha_min: float = 0.0
    alpha_max: float = 1.0
    teacher_top_k: int = 0
    teacher_top_p: float = 1.0
    return_diagnostics: bool = True
    force_teacher_first_token: bool = False
    force_teacher_special_tokens: bool = False

    def __post_init__(self) -> None:
        def bad(name: str, allowed: str) -> ValueError:
            return ValueError(f"{name} must be {allowed}, got {getattr(self, name)!r}")

        if not isinstance(self.teacher, str) or not self.teacher:
            raise bad("teacher", 'a non-empty string ("base" or an adapter name)')
        if self.alpha_method not in ALPHA_METHODS:
            raise bad("alpha_method", f"one of {', '.join(ALPHA_METHODS)}")
        for name in ("fixed_alpha", "alpha_min", "alpha_max"):
            v = getattr(self, name)
            if not _is_num(v) or not 0 <= v <= 1:
                raise bad(name, "a number in [0, 1]")
        if self.alpha_min > self.alpha_max:
            raise ValueError(f"alpha_min ({self.alpha_min!r}) must be <= alpha_max ({self.alpha_max!r})")
        if not _is_int(self.teacher_top_k) or self.teacher_top_k < 0:
            raise bad("teacher_top_k", "an integer >= 0 (0 = off)")
        if not _is_num(self.teacher_top_p) or not 0 < self.teacher_top_p <= 1:
            raise bad("teacher_top_p", "a number in (0, 1] (1 = off)")
        for name in ("return_diagnostics", "force_teacher_first_token", "force_teacher_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "a bool")

    @property
    def restricts_teacher_support(self) -> bool:
        return self.teacher_top_k > 0 or self.teacher_top_p < 1


@dataclass(slots=True)
class TokenDiagnostics:
    """Per-token diagnostics on the distribution q the token was actually drawn from."""

    alpha: float
    ess_student: float  # (sum_S p_s)^2 / sum_S p_s^2 / q, in (0, 1]
    ess_teacher: float
    ess_ratio: float  # ess_student / ess_teacher
    kl_student: float  # KL(q || p_s)
    kl_teacher: float  # KL(q || p_t)
    logprob_student: float  # log p_s(token)
    logprob_teacher: float  # log p_t(token)
    logprob_q: float  # log q(token)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(slots=True)
class MixResult:
    """Output of `mix`.

    `logits_q`: float32 logits of q* after the special-token rule and the teacher support
    restriction, temperature already applied: log q* up to a per-row constant (softmax gives q*),
    -inf outside the support. `alpha`: float64 `[B]` (1 where the teacher was forced).
    `log_ps` / `log_pt`: float32 temperature-scaled log-probs clamped at 1e-10.
    `special_rows`: bool `[B]`, rows where the special-token rule was applied.
    `temperature`: float32 `[B]`, the temperature actually used (1 for greedy rows).
    """

    logits_q: torch.Tensor
    alpha: torch.Tensor
    log_ps: torch.Tensor
    log_pt: torch.Tensor
    special_rows: torch.Tensor
    temperature: torch.Tensor


# ------------------------------------------------------------------------------------ alpha


def _per_row(x, B: int, dtype: torch.dtype, device) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=dtype, device=device)
    if t.dim() == 0:
        t = t.expand(B)
    if t.shape != (B,):
        raise ValueError(f"expected a scalar or a [{B}] tensor, got shape {tuple(t.shape)}")
    return t.clone()


def _kl_symmetry(lps: torch.Tensor, lpt: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Root of g(a) = E_q[l] (l = lpt - lps, q ∝ exp(lps + a l)) on [lo, hi], clamped to the ends.

    g' = Var_q[l] >= 0, so g is non-decreasing: end points first, then safeguarded Newton
    (bisection whenever the Newton step leaves the bracket or does not at least halve the step),
    started from the regula-falsi point, in float64.
    """
    l = lpt - lps

    def g(a: torch.Tensor, lps_: torch.Tensor, l_: torch.Tensor):
        w = torch.softmax(lps_ + a[:, None] * l_, dim=-1)
        m = (w * l_).sum(-1)
        return w, m

    _, g_lo = g(lo, lps, l)
    _, g_hi = g(hi, lps, l)
    alpha = torch.where(g_lo >= 0, lo, hi)  # g(lo) >= 0: clamped at lo; g(hi) <= 0: clamped at hi
    active = (g_lo < 0) & (g_hi > 0)
    if not bool(active.any()):
        return alpha
    idx = active.nonzero().squeeze(1)
    lps_, l_ = lps[idx], l[idx]
    lo_, hi_, glo, ghi = lo[idx].clone(), hi[idx].clone(), g_lo[idx], g_hi[idx]
    a = lo_ - glo * (hi_ - lo_) / (ghi - glo)
    dx_old = hi_ - lo_
    for _ in range(_MAX_ITERS):
        w, m = g(a, lps_, l_)
        done = (m.abs() <= _KL_TOL) | (hi_ - lo_ <= 1e-15)
        if bool(done.all()):
            break
        v = (w * (l_ - m[:, None]) ** 2).sum(-1)
        lo_ = torch.where(m < 0, a, lo_)
        hi_ = torch.where(m > 0, a, hi_)
        step = m / v
        newton = a - step
        ok = torch.isfinite(newton) & (newton > lo_) & (newton < hi_) & (2 * step.abs() <= dx_old.abs())
        a_new = torch.where(ok, newton, 0.5 * (lo_ + hi_))
        dx_old = torch.where(done, dx_old, torch.where(ok, step, 0.5 * (hi_ - lo_)))
        a = torch.where(done, a, a_new)
    alpha[idx] = a
    return alpha


def _ess_log_gap(lps: torch.Tensor, lpt: torch.Tensor, l: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """log sum p_t^2 / q - log sum p_s^2 / q for q ∝ exp(lps + a l); q's normaliser cancels."""
    y = lps + a[:, None] * l
    return torch.logsumexp(2 * lpt - y, dim=-1) - torch.logsumexp(2 * lps - y, dim=-1)


def _ess_balance(lps: torch.Tensor, lpt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Root of h(a) = log sum p_t^2/q - log sum p_s^2/q on [0, 1]; returns (alpha, has_sign_change).

    A bracketing solver: Illinois (modified regula falsi) steps, with a bisection step whenever
    the interpolated point is not strictly inside the bracket, so every iterate stays bracketed
    as in plain bisection but converges superlinearly. Either direction of sign change is accepted.
    """
    B = lps.shape[0]
    l = lpt - lps
    zeros = lps.new_zeros(B)
    ones = lps.new_ones(B)
    h0 = _ess_log_gap(lps, lpt, l, zeros)
    h1 = _ess_log_gap(lps, lpt, l, ones)
    ok = ((h0 >= 0) & (h1 <= 0)) | ((h0 <= 0) & (h1 >= 0))
    alpha = torch.where(h0 == 0, zeros, torch.where(h1 == 0, ones, lps.new_full((B,), 0.5)))
    active = ok & (h0 != 0) & (h1 != 0)
    if bool(active.any()):
        idx = active.nonzero().squeeze(1)
        lps_, lpt_, l_ = lps[idx], lpt[idx], l[idx]
        a, b = zeros[idx].clone(), ones[idx].clone()  # bracket ends (unordered after a few steps)
        fa, fb = h0[idx].clone(), h1[idx].clone()
        best, fbest = a.clone(), fa.abs()
        for _ in range(_MAX_ITERS):
            c = b - fb * (b - a) / (fb - fa)
            lo, hi = torch.minimum(a, b), torch.maximum(a, b)
            inside = torch.isfinite(c) & (c > lo) & (c < hi)
            c = torch.where(inside, c, 0.5 * (a + b))
            fc = _ess_log_gap(lps_, lpt_, l_, c)
            better = fc.abs() < fbest
            best, fbest = torch.where(better, c, best), torch.where(better, fc.abs(), fbest)
            if bool(((fbest <= 1e-13) | ((b - a).abs() <= 1e-15)).all()):
                break
            flip = torch.sign(fc) != torch.sign(fb)  # root between b and c: b becomes the far end
            a, fa = torch.where(flip, b, a), torch.where(flip, fb, 0.5 * fa)  # Illinois: halve the kept end
            b, fb = c, fc
        alpha[idx] = best
    return alpha, ok


@torch.no_grad()
def solve_alpha(
    log_ps: torch.Tensor,
    log_pt: torch.Tensor,
    method: str,
    fixed_alpha: float | torch.Tensor = 0.5,
    alpha_min: float | torch.Tensor = 0.0,
    alpha_max: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """Per-row teacher weight alpha, float64 `[B]`, for student / teacher log-probs `[B, V]`.

    The inputs are (clamped) log-probs; they are renormalised in float64 before solving.
    `fixed_alpha` / `alpha_min` / `alpha_max` may be scalars or `[B]` tensors.
    """
    if method not in ALPHA_METHODS:
        raise ValueError(f"alpha_method must be one of {', '.join(ALPHA_METHODS)}, got {method!r}")
    if log_ps.shape != log_pt.shape or log_ps.dim() != 2:
        raise ValueError(f"log_ps and log_pt must both be [B, V], got {tuple(log_ps.shape)} and {tuple(log_pt.shape)}")
    B, dev = log_ps.shape[0], log_ps.device
    f64 = torch.float64
    if method == "fixed":
        return _per_row(fixed_alpha, B, f64, dev)
    lo = _per_row(alpha_min, B, f64, dev)
    hi = _per_row(alpha_max, B, f64, dev)
    if B == 0:
        return lo
    lps = torch.log_softmax(log_ps.to(f64), dim=-1)
    lpt = torch.log_softmax(log_pt.to(f64), dim=-1)
    ps, pt = lps.exp(), lpt.exp()
    half = lps.new_full((B,), 0.5)
    if method == "kl_symmetry":
        alpha = _kl_symmetry(lps, lpt, lo, hi)
    elif method == "reverse_kl_symmetry":
        k_st = (ps * (lps - lpt)).sum(-1)  # KL(p_s || p_t)
        k_ts = (pt * (lpt - lps)).sum(-1)  # KL(p_t || p_s)
        den = k_st + k_ts
        alpha = torch.where(den > 0, k_ts / den.clamp_min(1e-300), half)
        alpha = torch.minimum(torch.maximum(alpha, lo), hi)
    elif method == "entropy":
        h_s = -(ps * lps).sum(-1)
        h_t = -(pt * lpt).sum(-1)
        den = h_s + h_t
        alpha = torch.where(den > 0, h_t / den.clamp_min(1e-300), half)
        alpha = torch.minimum(torch.maximum(alpha, lo), hi)
    else:  # ess_balance
        alpha, ok = _ess_balance(lps, lpt)
        alpha = torch.minimum(torch.maximum(alpha, lo), hi)
        if not bool(ok.all()):
            fb = (~ok).nonzero().squeeze(1)
            alpha[fb] = _kl_symmetry(lps[fb], lpt[fb], lo[fb], hi[fb])
    identical = (ps - pt).abs().amax(-1) <= IDENTICAL_TOL
    return torch.where(identical, torch.minimum(torch.maximum(half, lo), hi), alpha)


# ------------------------------------------------------------------------------------ q*


def clamped_log_probs(scaled_logits: torch.Tensor) -> torch.Tensor:
    """log(max(softmax(x), 1e-10)) in float32."""
    return scaled_logits.float().softmax(dim=-1).clamp_min(PROB_FLOOR).log()


def teacher_support_mask(scaled_teacher: torch.Tensor, top_k: Sequence[int], top_p: Sequence[float]) -> torch.Tensor:
    """Bool `[B, V]`: tokens inside the teacher's top-k (ties with the k-th kept) AND inside its
    top-p nucleus (the crossing token kept, via `filter_logits`); the top-1 is always kept.
    `top_k` 0 / `top_p` 1.0 = no restriction for that row."""
    B, V = scaled_teacher.shape
    dev = scaled_teacher.device
    keep = torch.ones(B, V, dtype=torch.bool, device=dev)
    k_rows = [i for i in range(B) if 0 < top_k[i] < V]
    if k_rows:
        sel = torch.tensor(k_rows, dtype=torch.long, device=dev)
        x = scaled_teacher[sel]
        k = torch.tensor([top_k[i] for i in k_rows], dtype=torch.long, device=dev)
        kth = x.topk(int(k.max()), dim=-1).values.gather(1, (k - 1)[:, None])
        keep[sel] &= x >= kth
    p_rows = [i for i in range(B) if top_p[i] < 1]
    if p_rows:
        sel = torch.tensor(p_rows, dtype=torch.long, device=dev)
        x = scaled_teacher[sel]
        n = len(p_rows)
        p = torch.tensor([top_p[i] for i in p_rows], dtype=x.dtype, device=dev)
        kept = filter_logits(x, torch.full((n,), V, dtype=torch.long, device=dev), p, x.new_zeros(n))
        keep[sel] &= torch.isfinite(kept)
    return keep


def _special_splice(x: torch.Tensor, xt: torch.Tensor, special: torch.Tensor) -> torch.Tensor:
    """Special tokens get log p_t; the rest share 1 - p_t(specials) in proportion to q* (see module doc)."""
    neg_inf = float("-inf")
    lt = torch.log_softmax(xt, dim=-1)
    S = special[None, :]
    lse_x_n = torch.logsumexp(x.masked_fill(S, neg_inf), dim=-1, keepdim=True)
    lse_t_n = torch.logsumexp(lt.masked_fill(S, neg_inf), dim=-1, keepdim=True)
    normal = x - lse_x_n + lse_t_n
    normal = torch.nan_to_num(normal, nan=neg_inf, posinf=neg_inf)
    return torch.where(S, lt, normal)


@torch.no_grad()
def mix(
    z_s: torch.Tensor,
    z_t: torch.Tensor,
    temperature: float | Sequence[float] | torch.Tensor,
    params: OptimalSamplingParams | Sequence[OptimalSamplingParams],
    *,
    force_teacher: Sequence[bool] | torch.Tensor | None = None,
    special_mask: torch.Tensor | None = None,
) -> MixResult:
    """Alpha per row, q* = softmax(((1 - alpha) z_s + alpha z_t) / T), the special-token rule and
    the teacher support restriction. No request filters, no draw (`OptimalSampler.sample` does those).

    `temperature` 0 means greedy: T = 1 is used for the distributions. `force_teacher[i]` sets
    alpha = 1 for row i. `special_mask` (bool `[V]`) marks special tokens; the special-token rule
    applies to rows whose params set `force_teacher_special_tokens` (and alpha < 1).
    """
    if z_s.dim() != 2 or z_s.shape != z_t.shape:
        raise ValueError(f"z_s and z_t must both be [B, V], got {tuple(z_s.shape)} and {tuple(z_t.shape)}")
    B, V = z_s.shape
    dev = z_s.device
    if isinstance(params, OptimalSamplingParams):
        params = [params] * B
    if len(params) != B:
        raise ValueError(f"got {len(params)} OptimalSamplingParams for {B} rows")
    z_s, z_t = z_s.float(), z_t.float()
    temp = _per_row(temperature, B, torch.float32, dev)
    T = torch.where(temp > 0, temp, torch.ones_like(temp))
    xs = z_s / T[:, None]
    xt = z_t / T[:, None]
    log_ps, log_pt = clamped_log_probs(xs), clamped_log_probs(xt)

    alpha = torch.empty(B, dtype=torch.float64, device=dev)
    for method in {p.alpha_method for p in params}:
        rows = [i for i, p in enumerate(params) if p.alpha_method == method]
        sel = torch.tensor(rows, dtype=torch.long, device=dev)
        alpha[sel] = solve_alpha(
            log_ps[sel],
            log_pt[sel],
            method,
            torch.tensor([params[i].fixed_alpha for i in rows], dtype=torch.float64, device=dev),
            torch.tensor([params[i].alpha_min for i in rows], dtype=torch.float64, device=dev),
            torch.tensor([params[i].alpha_max for i in rows], dtype=torch.float64, device=dev),
        )
    if force_teacher is not None:
        force = torch.as_tensor(force_teacher, dtype=torch.bool, device=dev)
        alpha = torch.where(force, torch.ones_like(alpha), alpha)

    a = alpha.float()[:, None]
    # a == 0 / 1 select z_s / z_t exactly (no 0 * -inf NaN, bit-identical to plain sampling).
    mixed = torch.where(a == 0, z_s, torch.where(a == 1, z_t, (1 - a) * z_s + a * z_t))
    logits_q = mixed / T[:, None]

    special_rows = torch.zeros(B, dtype=torch.bool, device=dev)
    if special_mask is not None and bool(special_mask.any()):
        alpha_list = alpha.tolist()
        sp = [i for i, p in enumerate(params) if p.force_teacher_special_tokens and alpha_list[i] < 1]
        if sp:
            sel = torch.tensor(sp, dtype=torch.long, device=dev)
            logits_q[sel] = _special_splice(logits_q[sel], xt[sel], special_mask.to(dev))
            special_rows[sel] = True

    if any(p.restricts_teacher_support for p in params):
        keep = teacher_support_mask(xt, [p.teacher_top_k for p in params], [p.teacher_top_p for p in params])
        logits_q = logits_q.masked_fill(~keep, float("-inf"))
    return MixResult(logits_q, alpha, log_ps, log_pt, special_rows, T)


# ------------------------------------------------------------------------------------ diagnostics


@torch.no_grad()
def diagnostics(
    log_q_final: torch.Tensor,
    log_ps: torch.Tensor,
    log_pt: torch.Tensor,
    alpha: torch.Tensor | Sequence[float],
    tokens: torch.Tensor | Sequence[int],
) -> list[TokenDiagnostics]:
    """Per-row diagnostics on the final distribution q (logits or log-probs; normalised here),
    over q's support S, in float64. See the module doc for the ESS form used."""
    B = log_q_final.shape[0]
    if B == 0:
        return []
    dev = log_q_final.device
    f64 = torch.float64
    lq = torch.log_softmax(log_q_final.to(f64), dim=-1)
    S = torch.isfinite(lq)
    q = lq.exp()
    tok = torch.as_tensor(tokens, dtype=torch.long, device=dev)[:, None]
    neg_inf = torch.tensor(float("-inf"), dtype=f64, device=dev)
    out = {}
    for name, lp_in in (("student", log_ps), ("teacher", log_pt)):
        lp = torch.log_softmax(lp_in.to(f64), dim=-1)
        log_mass = torch.logsumexp(torch.where(S, lp, neg_inf), dim=-1)  # log sum_S p
        log_chi = torch.logsumexp(torch.where(S, 2 * lp - lq, neg_inf), dim=-1)  # log sum_S p^2 / q
        out[f"ess_{name}"] = torch.exp(2 * log_mass - log_chi).clamp(max=1.0)
        out[f"kl_{name}"] = torch.where(S, q * (lq - lp), 0.0).sum(-1).clamp_min(0.0)
        out[f"logprob_{name}"] = lp.gather(1, tok).squeeze(1)
    out["ess_ratio"] = out["ess_student"] / out["ess_teacher"]
    out["logprob_q"] = lq.gather(1, tok).squeeze(1)
    out["alpha"] = torch.as_tensor(alpha, dtype=f64, device=dev)
    cols = {k: v.tolist() for k, v in out.items()}
    return [TokenDiagnostics(**{k: float(cols[k][i]) for k in TokenDiagnostics.__slots__}) for i in range(B)]


# ------------------------------------------------------------------------------------ sampler


class OptimalSampler:
    """Batched optimal sampling: penalties -> mix (alpha, q*, special rule, teacher restriction)
    -> the request's top-k / top-p / min-p -> argmax (greedy rows) or the row's seeded draw.

    The draw is `Sampler._draw` on the final logits with a temperature-1, filter-free view of each
    row (same seed and position), so `fixed` alpha 0 / 1 consume the same randomness and give the same
    tokens as `Sampler` on z_s / z_t.
    """

    @torch.no_grad()
    def sample(
        self,
        z_s: torch.Tensor,
        z_t: torch.Tensor,
        rows: list[RowState],
        params: list[OptimalSamplingParams],
        is_first_token: list[bool],
        special_token_ids: set[int] | frozenset[int] | Sequence[int] = (),
    ) -> tuple[list[int], list[TokenDiagnostics | None]]:
        B = len(rows)
        if z_s.dim() != 2 or z_s.shape[0] != B or z_t.shape != z_s.shape:
            raise ValueError(
                f"z_s and z_t must both be [len(rows), vocab], got {tuple(z_s.shape)} and "
                f"{tuple(z_t.shape)} for {B} rows"
            )
        if len(params) != B or len(is_first_token) != B:
            raise ValueError(f"got {len(params)} params and {len(is_first_token)} is_first_token for {B} rows")
        if B == 0:
            return [], []
        V, dev = z_s.shape[1], z_s.device
        z_s = apply_penalties(z_s.float(), rows)
        z_t = apply_penalties(z_t.float(), rows)

        force = [p.force_teacher_first_token and bool(f) for p, f in zip(params, is_first_token)]
        special_mask = None
        special_ids = {int(t) for t in special_token_ids if 0 <= int(t) < V}
        if special_ids and any(p.force_teacher_special_tokens for p in params):
            special_mask = torch.zeros(V, dtype=torch.bool, device=dev)
            special_mask[torch.tensor(sorted(special_ids), dtype=torch.long, device=dev)] = True
        m = mix(
            z_s, z_t, [r.params.temperature for r in rows], params, force_teacher=force, special_mask=special_mask
        )

        final = m.logits_q
        if any(r.params.has_filters for r in rows):  # the request's own filters, as Sampler._draw applies them
            dt = final.dtype
            k = torch.tensor([r.params.top_k if r.params.top_k >= 1 else V for r in rows], device=dev)
            p = torch.tensor([r.params.top_p for r in rows], dtype=dt, device=dev)
            mp = torch.tensor([r.params.min_p for r in rows], dtype=dt, device=dev)
            final = filter_logits(final, k, p, mp)

        tokens = final.argmax(dim=-1)
        sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
        if sampled:
            views = [RowState(_UNIT_PARAMS, rows[i].output_token_ids, rows[i].seed, rows[i].num_draws)
                     for i in sampled]
            if len(sampled) == B:
                tokens = Sampler._draw(final, views)
            else:
                tokens[sampled] = Sampler._draw(final[sampled], views)
            for i, v in zip(sampled, views):
                rows[i].num_draws = v.num_draws
        token_list = tokens.tolist()

        diags: list[TokenDiagnostics | None] = [None] * B
        want = [i for i, p in enumerate(params) if p.return_diagnostics]
        if want:
            alpha = m.alpha.clone()
            hit = [i for i, sp in enumerate(m.special_rows.tolist()) if sp and token_list[i] in special_ids]
            if hit:  # a special token drawn under the special-token rule: reported as teacher-sampled
                alpha[torch.tensor(hit, dtype=torch.long, device=dev)] = 1.0
            sel = torch.tensor(want, dtype=torch.long, device=dev)
            for i, d in zip(want, diagnostics(final[sel], m.log_ps[sel], m.log_pt[sel], alpha[sel], tokens[sel])):
                diags[i] = d
        return token_list, diags
