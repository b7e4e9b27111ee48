"""Per-request sampling parameters and the batched sampler the engine loop calls once per step.

The sampler takes float32 logits `[B, V]` for every row that needs a next token, plus one
`RowState` per row, and returns one token per row (and logprobs where asked). Filtering is
vectorised across the batch; only the random draw is per row, with the row's own generator,
so a seeded request gets the same tokens whatever else is in the batch.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field

import torch

MAX_STOP_STRINGS = 16
MAX_N = 16
MAX_TOP_LOGPROBS = 20


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)


@dataclass(slots=True)
class SamplingParams:
    """What a request asks of the sampler, validated up front so the engine never sees bad values.

    `stop` may be given as a single string for convenience (OpenAI allows it); it is stored as a list.
    """

    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    n: int = 1
    logprobs: bool = False
    top_logprobs: int = 0

    def __post_init__(self) -> None:
        def bad(name: str, allowed: str) -> ValueError:
            return ValueError(f"{name} must be {allowed}, got {getattr(self, name)!r}")

        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise bad("max_tokens", "an integer >= 1")
        if not _is_num(self.temperature) or not self.temperature >= 0 or math.isinf(self.temperature):
            raise bad("temperature", "a finite number >= 0 (0 = greedy)")
        if not _is_num(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", "a number in (0, 1]")
        if not _is_int(self.top_k) or not (self.top_k in (0, -1) or self.top_k >= 1):
            raise bad("top_k", "an integer >= 1, or 0 / -1 to disable")
        if not _is_num(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad("min_p", "a number in [0, 1]")
        if self.seed is not None and not _is_int(self.seed):
            raise bad("seed", "an integer or None")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is None:
            self.stop = []
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "a list of non-empty strings")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop must have at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}")
        self.stop = list(self.stop)
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        if not isinstance(self.stop_token_ids, (list, tuple)) or not all(
            _is_int(t) and t >= 0 for t in self.stop_token_ids
        ):
            raise bad("stop_token_ids", "a list of integers >= 0")
        self.stop_token_ids = list(self.stop_token_ids)
        for name in ("ignore_eos", "include_stop_str_in_output", "logprobs"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "a bool")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_num(v) or not -2 <= v <= 2:
                raise bad(name, "a number in [-2, 2]")
        if not _is_int(self.n) or not 1 <= self.n <= MAX_N:
            raise bad("n", f"an integer in [1, {MAX_N}]")
        if not _is_int(self.top_logprobs) or not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise bad("top_logprobs", f"an integer in [0, {MAX_TOP_LOGPROBS}]")
        if self.top_logprobs > 0 and not self.logprobs:
            raise ValueError(f"top_logprobs={self.top_logprobs} requires logprobs=True")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0

    @property
    def has_filters(self) -> bool:
        return self.top_k >= 1 or self.top_p < 1 or self.min_p > 0


def make_generator(seed: int | None, index: int = 0, device: str | torch.device = "cpu") -> torch.Generator:
    """Generator for sample `index` of a request: `seed + index` (as vLLM seeds its n>1 children),
    so the n samples differ but replay exactly; a fresh random seed when `seed` is None."""
    g = torch.Generator(device=device)
    base = secrets.randbits(63) if seed is None else seed + index
    g.manual_seed(base & 0xFFFF_FFFF_FFFF_FFFF)
    return g


@dataclass(slots=True)
class RowState:
    """One sequence's sampling state; the engine appends each sampled token to `output_token_ids`.

    `output_token_ids` are the *generated* ids only: penalties never look at the prompt.
    """

    params: SamplingParams
    output_token_ids: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None

    @classmethod
    def create(cls, params: SamplingParams, index: int = 0, device: str | torch.device = "cpu") -> RowState:
        return cls(params, [], make_generator(params.seed, index, device))


@dataclass(slots=True)
class SampleResult:
    """Parallel per-row lists. `logprobs[i]` / `top_logprobs[i]` are None where row i did not ask.

    `top_logprobs[i]` is a list of (token_id, logprob), most likely first.
    """

    token_ids: list[int]
    logprobs: list[float | None]
    top_logprobs: list[list[tuple[int, float]] | None]

    def __len__(self) -> int:
        return len(self.token_ids)


def apply_penalties(logits: torch.Tensor, rows: list[RowState]) -> torch.Tensor:
    """OpenAI presence/frequency penalties over generated tokens; returns a new tensor (input untouched).

    logits[t] -= frequency_penalty * count[t] + presence_penalty * (count[t] > 0)
    """
    idx = [i for i, r in enumerate(rows) if r.params.has_penalties and r.output_token_ids]
    if not idx:
        return logits
    logits = logits.clone()
    B, V = len(idx), logits.shape[1]
    dev = logits.device
    flat = torch.tensor([t for i in idx for t in rows[i].output_token_ids], dtype=torch.long, device=dev)
    row_of = torch.tensor(
        [j for j, i in enumerate(idx) for _ in rows[i].output_token_ids], dtype=torch.long, device=dev
    )
    counts = torch.zeros(B * V, dtype=logits.dtype, device=dev)
    counts.index_add_(0, row_of * V + flat, torch.ones_like(flat, dtype=logits.dtype))
    counts = counts.view(B, V)
    freq = torch.tensor([rows[i].params.frequency_penalty for i in idx], dtype=logits.dtype, device=dev)
    pres = torch.tensor([rows[i].params.presence_penalty for i in idx], dtype=logits.dtype, device=dev)
    sel = torch.tensor(idx, dtype=torch.long, device=dev)
    logits[sel] -= freq[:, None] * counts + pres[:, None] * (counts > 0).to(logits.dtype)
    return logits


def _filter_sorted(sorted_logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor):
    """TopK -> TopP -> MinP on logits sorted descending (each filter sees the previous one's output, as in HF)."""
    neg_inf = torch.tensor(float("-inf"), dtype=sorted_logits.dtype, device=sorted_logits.device)
    # top-k: keep everything >= the k-th largest value (ties kept, like HF's `scores < topk[-1]`).
    kth = sorted_logits.gather(1, (top_k.clamp(1, sorted_logits.shape[1]) - 1)[:, None])
    sorted_logits = torch.where(sorted_logits < kth, neg_inf, sorted_logits)
    # top-p: HF removes tokens whose *ascending* cumulative prob is <= 1 - p; always keeps the top-1.
    probs = sorted_logits.softmax(dim=-1)
    remove = probs.flip(-1).cumsum(-1).flip(-1) <= (1 - top_p)[:, None]
    remove[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    # min-p: keep tokens with prob >= min_p * max_prob of the (renormalised) distribution so far.
    probs = sorted_logits.softmax(dim=-1)
    remove = probs < min_p[:, None] * probs[:, :1]
    remove[:, 0] = False
    return sorted_logits.masked_fill(remove, float("-inf"))


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) what HF's TopK -> TopP -> MinP warpers would remove, for per-row k / p / min_p.

    `logits` are already temperature-scaled; "off" is `top_k` = V, `top_p` = 1.0, `min_p` = 0.0.
    A full-vocab sort is only paid when some row uses top-p without top-k: if every row has a
    top-k, the filters run on the top max(k) entries; if only min-p is used, no sort at all.
    """
    V = logits.shape[1]
    has_k = top_k < V
    if not has_k.any() and bool((top_p >= 1).all()):
        probs = logits.softmax(dim=-1)
        return logits.masked_fill(probs < min_p[:, None] * probs.amax(dim=-1, keepdim=True), float("-inf"))
    if bool(has_k.all()):
        vals, idx = logits.topk(int(top_k.max()), dim=-1)
        kth = vals.gather(1, (top_k - 1)[:, None])
        # A tie with the k-th value beyond the window would be kept by HF: take the exact path then.
        if not bool(((logits >= kth).sum(-1) > top_k).any()):
            out = torch.full_like(logits, float("-inf"))
            return out.scatter_(1, idx, _filter_sorted(vals, top_k, top_p, min_p))
    vals, idx = logits.sort(dim=-1, descending=True)
    return torch.empty_like(logits).scatter_(1, idx, _filter_sorted(vals, top_k, top_p, min_p))


class Sampler:
    """Batched sampler: penalties -> greedy argmax, or temperature -> top-k -> top-p -> min-p -> draw.

    Logprobs are `log_softmax` of the RAW model logits (before penalties, temperature and
    filters), which is what vLLM returns by default and what the HF oracle's logits give.
    """

    def sample(self, logits: torch.Tensor, rows: list[RowState]) -> SampleResult:
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits must be [len(rows), vocab], got {tuple(logits.shape)} for {len(rows)} rows")
        if not rows:
            return SampleResult([], [], [])
        raw = logits
        logits = apply_penalties(logits, rows)
        sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
        if len(sampled) == len(rows):
            tokens = self._draw(logits, rows)
        else:  # greedy rows are a single argmax; sampled rows (if any) overwrite theirs
            tokens = logits.argmax(dim=-1)
            if sampled:
                tokens[sampled] = self._draw(logits[sampled], [rows[i] for i in sampled])
        token_list = tokens.tolist()
        lp, top = self._logprobs(raw, tokens, rows)
        return SampleResult(token_list, lp, top)

    @staticmethod
    def _draw(logits: torch.Tensor, rows: list[RowState]) -> torch.Tensor:
        dev, dt = logits.device, logits.dtype
        temp = torch.tensor([r.params.temperature for r in rows], dtype=dt, device=dev)
        logits = logits / temp[:, None]
        if any(r.params.has_filters for r in rows):
            V = logits.shape[1]
            k = torch.tensor([r.params.top_k if r.params.top_k >= 1 else V for r in rows], device=dev)
            p = torch.tensor([r.params.top_p for r in rows], dtype=dt, device=dev)
            mp = torch.tensor([r.params.min_p for r in rows], dtype=dt, device=dev)
            logits = filter_logits(logits, k, p, mp)
        probs = logits.softmax(dim=-1)
        # Exponential race: argmax(p / E), E ~ Exp(1), picks token t with probability p[t]. The
        # noise comes from each row's own generator, so a row's draw never depends on the batch.
        # E = -log(U) with U in [0, 1): U = 0 gives E = inf, never 0, so p / E is never NaN.
        noise = torch.empty_like(probs)
        for j, r in enumerate(rows):
            g = r.generator
            if g is None:  # a row built without one: draw fresh randomness rather than fail
                g = r.generator = make_generator(None, device=dev)
            u = torch.rand(probs.shape[1], dtype=dt, device=g.device, generator=g)
            noise[j] = u.log_().neg_().to(dev)
        return (probs / noise).argmax(dim=-1)

    @staticmethod
    def _logprobs(raw: torch.Tensor, tokens: torch.Tensor, rows: list[RowState]):
        B = len(rows)
        want = [i for i, r in enumerate(rows) if r.params.logprobs]
        lp: list[float | None] = [None] * B
        top: list[list[tuple[int, float]] | None] = [None] * B
        if not want:
            return lp, top
        sel = torch.tensor(want, dtype=torch.long, device=raw.device)
        logp = torch.log_softmax(raw[sel].float(), dim=-1)
        chosen = logp.gather(1, tokens[sel][:, None]).squeeze(1).tolist()
        kmax = max(rows[i].params.top_logprobs for i in want)
        if kmax:
            vals, ids = logp.topk(kmax, dim=-1)
            vals, ids = vals.tolist(), ids.tolist()
        for j, i in enumerate(want):
            lp[i] = chosen[j]
            k = rows[i].params.top_logprobs
            top[i] = list(zip(ids[j][:k], vals[j][:k])) if k else []
        return lp, top
