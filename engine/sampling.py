"""Per-request sampling parameters and the batched sampler the engine loop calls once per step.

The sampler takes float32 logits `[B, V]` for every row that needs a next token, plus one
`RowState` per row, and returns one token per row (and logprobs where asked). Everything is
vectorised across the batch on the logits' device: one uniform per row picks a token from the
row's CDF; a seeded row's uniform is a hash of (seed, position), so a seeded request gets the
same tokens whatever else is in the batch.
"""

from __future__ import annotations

import math
import secrets
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from vlora.engine.grammar import GrammarSpec, unpack_bitmask

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
    min_tokens: int = 0  # EOS and stop_token_ids are masked (and stop strings unchecked) until this many tokens
    grammar: GrammarSpec | None = None  # structured outputs: what the text must match (engine/grammar.py)

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
        if self.grammar is not None and not isinstance(self.grammar, GrammarSpec):
            raise bad("grammar", "a GrammarSpec or None")
        if self.top_logprobs > 0 and not self.logprobs:
            raise ValueError(f"top_logprobs={self.top_logprobs} requires logprobs=True")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise bad("min_tokens", "an integer >= 0")
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be less than or equal to max_tokens={self.max_tokens}, "
                             f"got {self.min_tokens}")

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


_MASK64 = 0xFFFF_FFFF_FFFF_FFFF
# Uniforms stay below 1 - 2^-20 so `u * total` is always strictly below the last CDF value.
_U_MAX = 1.0 - 2.0 ** -20


def seeded_uniform(seed: int, position: int) -> float:
    """A uniform in [0, 1 - 2^-20) that depends only on (seed, position): a SplitMix64 hash, so a seeded
    row's draw is reproducible and independent of whatever else is in the batch (counter-based,
    no generator state)."""
    z = (seed * 0x9E3779B97F4A7C15 + (position + 1) * 0xD1B54A32D192ED03) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    return (z >> 40) / 2.0 ** 24 * _U_MAX


@dataclass(slots=True, weakref_slot=True)
class RowState:
    """One sequence's sampling state; the engine appends each sampled token to `output_token_ids`.

    `output_token_ids` are the *generated* ids only: penalties never look at the prompt. `seed` is
    the request's seed + the choice index (None: unseeded); a seeded row's k-th draw is keyed by
    (seed, k), so it replays exactly whatever else is in the batch.
    """

    params: SamplingParams
    output_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None
    num_draws: int = 0  # random draws this row has taken
    count_row: int = -1  # row of the shared penalty count buffer (-1: none yet)
    counted: int = 0  # how many of output_token_ids that row has counted
    counted_list: list[int] | None = None  # the list those were counted from (replaced list: recount)
    min_tokens_blocked: tuple[int, ...] = ()  # ids masked while fewer than params.min_tokens are generated
    grammar: Any = None  # structured outputs: an xgrammar GrammarMatcher at this row's next token (None: free)

    @classmethod
    def create(cls, params: SamplingParams, index: int = 0, device: str | torch.device = "cpu",
               eos_token_ids: tuple[int, ...] = ()) -> RowState:
        """`eos_token_ids`: the model's EOS ids, masked with stop_token_ids until min_tokens (unless ignore_eos)."""
        blocked = ()
        if params.min_tokens:
            eos = () if params.ignore_eos else tuple(eos_token_ids)
            blocked = tuple(sorted(set(params.stop_token_ids) | set(eos)))
        return cls(params, [], None if params.seed is None else params.seed + index, min_tokens_blocked=blocked)


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


class PenaltyCounts:
    """Generated-token counts per row in one persistent device buffer `[rows, vocab]`.

    Each step only the tokens appended since the last step are added (`scatter_add_`); a row is
    returned to the free list when its RowState is garbage-collected.
    """

    _shared: dict[tuple[str, int], "PenaltyCounts"] = {}

    def __init__(self, vocab: int, device: torch.device, capacity: int = 64):
        self.vocab = vocab
        self.device = device
        self.counts = torch.zeros(capacity, vocab, device=device)
        self._free = list(range(capacity - 1, -1, -1))

    @classmethod
    def shared(cls, vocab: int, device: torch.device) -> "PenaltyCounts":
        key = (str(device), vocab)
        if key not in cls._shared:
            cls._shared[key] = cls(vocab, device)
        return cls._shared[key]

    def _assign(self, row: RowState) -> None:
        if not self._free:
            n = self.counts.shape[0]
            self.counts = torch.cat([self.counts, torch.zeros_like(self.counts)])
            self._free = list(range(2 * n - 1, n - 1, -1))
        row.count_row = self._free.pop()
        weakref.finalize(row, self._release, row.count_row)

    def _release(self, index: int) -> None:
        self._free.append(index)

    def rows_for(self, rows: list[RowState]) -> torch.Tensor:
        """Bring the rows' counts up to date; return their buffer rows (a device index tensor)."""
        zero, idx, toks = [], [], []
        for r in rows:
            if r.count_row < 0:
                self._assign(r)
                zero.append(r.count_row)
                r.counted, r.counted_list = 0, r.output_token_ids
            elif r.counted_list is not r.output_token_ids or r.counted > len(r.output_token_ids):
                zero.append(r.count_row)
                r.counted, r.counted_list = 0, r.output_token_ids
            new = r.output_token_ids[r.counted:]
            idx.extend([r.count_row * self.vocab + t for t in new])
            r.counted += len(new)
        if zero:
            self.counts.index_fill_(0, torch.tensor(zero, dtype=torch.long).to(self.device), 0.0)
        if idx:
            flat = torch.tensor(idx, dtype=torch.long).to(self.device)
            self.counts.view(-1).scatter_add_(0, flat, torch.ones(len(idx), device=self.device))
        return torch.tensor([r.count_row for r in rows], dtype=torch.long).to(self.device)


def apply_penalties(logits: torch.Tensor, rows: list[RowState]) -> torch.Tensor:
    """OpenAI presence/frequency penalties over generated tokens; returns a new tensor (input untouched).

    logits[t] -= frequency_penalty * count[t] + presence_penalty * (count[t] > 0)
    """
    idx = [i for i, r in enumerate(rows) if r.params.has_penalties and r.output_token_ids]
    if not idx:
        return logits
    dev, dt = logits.device, logits.dtype
    counts = PenaltyCounts.shared(logits.shape[1], dev)
    c = counts.counts.index_select(0, counts.rows_for([rows[i] for i in idx])).to(dt)
    host = torch.tensor([[rows[i].params.frequency_penalty for i in idx], [rows[i].params.presence_penalty for i in idx],
                         idx], dtype=torch.float64).to(dev)
    freq, pres, sel = host[0].to(dt), host[1].to(dt), host[2].long()
    logits = logits.clone()
    logits.index_put_((sel,), logits.index_select(0, sel) - (freq[:, None] * c + pres[:, None] * (c > 0).to(dt)))
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


def mask_min_tokens(logits: torch.Tensor, rows: list[RowState]) -> torch.Tensor:
    """vLLM's min_tokens: a row below its minimum cannot draw EOS or a stop token id (set to -inf).
    Returns a new tensor when a row is masked, else `logits` itself."""
    cells = [(i, t) for i, r in enumerate(rows) if r.min_tokens_blocked
             and len(r.output_token_ids) < r.params.min_tokens for t in r.min_tokens_blocked]
    if not cells:
        return logits
    idx = torch.tensor(cells, dtype=torch.long).to(logits.device)
    return logits.index_put((idx[:, 0], idx[:, 1]), torch.tensor(float("-inf"), dtype=logits.dtype,
                                                                  device=logits.device))


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor,
                  max_k: int | None = None, uses_top_p: bool | None = None) -> torch.Tensor:
    """Mask (to -inf) what HF's TopK -> TopP -> MinP warpers would remove, for per-row k / p / min_p.

    `logits` are already temperature-scaled; "off" is `top_k` = V, `top_p` = 1.0, `min_p` = 0.0.
    `max_k` (the largest top-k below V, 0 if none) and `uses_top_p` come from the request
    parameters so the path is chosen without reading the device; when omitted they are read
    from the tensors. Top-p needs the full-vocabulary sort; top-k alone is a threshold at the
    k-th value (ties kept, as HF); min-p alone needs no sort.
    """
    V = logits.shape[1]
    if uses_top_p is None:
        uses_top_p = bool((top_p < 1).any())
    if max_k is None:
        ks = top_k[top_k < V]
        max_k = int(ks.max()) if ks.numel() else 0
    if uses_top_p:
        vals, idx = logits.sort(dim=-1, descending=True)
        return torch.empty_like(logits).scatter_(1, idx, _filter_sorted(vals, top_k, top_p, min_p))
    if max_k:
        kth = logits.topk(max_k, dim=-1).values.gather(1, (top_k.clamp(max=max_k) - 1)[:, None])
        kth = torch.where((top_k < V)[:, None], kth, torch.full_like(kth, float("-inf")))
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)
    return logits.masked_fill(probs < min_p[:, None] * probs.amax(dim=-1, keepdim=True), float("-inf"))


def grammar_masks(rows: list[RowState], vocab_size: int, device: torch.device) -> torch.Tensor | None:
    """[B, V] bool, True where a row may take the token next; None when no row has a grammar.

    One host bitmask for the whole batch (1 bit per token): unconstrained rows keep all bits set,
    each constrained row's matcher fills its own row; one copy to the device, unpacked there.
    """
    if all(r.grammar is None for r in rows):
        return None
    host = torch.full((len(rows), (vocab_size + 31) // 32), -1, dtype=torch.int32,
                      pin_memory=torch.device(device).type == "cuda")
    for i, r in enumerate(rows):
        if r.grammar is not None:
            r.grammar.fill_next_token_bitmask(host, i)
    return unpack_bitmask(host.to(device, non_blocking=True), vocab_size)


def apply_grammar_masks(logits: torch.Tensor, rows: list[RowState], allowed: torch.Tensor | None = None
                        ) -> torch.Tensor:
    """Structured outputs: `-inf` on every token a constrained row's grammar forbids next, in one
    masked fill over the batch. Unconstrained rows have nothing masked (their values are the same
    bits), and with no constrained row the logits come back as they are (no copy, no device work).
    `allowed` reuses `grammar_masks`' result. Returns a new tensor when it masks anything.
    """
    if allowed is None:
        allowed = grammar_masks(rows, logits.shape[1], logits.device)
    if allowed is None:
        return logits
    return logits.masked_fill(~allowed, float("-inf"))


_WORKSPACE: dict[tuple[str, torch.dtype], torch.Tensor] = {}


def _workspace(rows: int, vocab: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A [rows, vocab] scratch tensor kept between steps (grows to the largest batch seen)."""
    key = (str(device), dtype)
    buf = _WORKSPACE.get(key)
    if buf is None or buf.numel() < rows * vocab:
        buf = _WORKSPACE[key] = torch.empty(rows * vocab, dtype=dtype, device=device)
    return buf[:rows * vocab].view(rows, vocab)


class Sampler:
    """Batched sampler: penalties -> grammar masks -> greedy argmax, or temperature -> top-k -> top-p
    -> min-p -> draw.

    Everything runs on the logits' device; the host only builds small per-row parameter tensors
    and reads the result back once per call. Logprobs are `log_softmax` of the RAW model logits
    (before penalties, temperature and filters), which is what vLLM returns by default and
    what the HF oracle's logits give.
    """

    def sample(self, logits: torch.Tensor, rows: list[RowState]) -> SampleResult:
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits must be [len(rows), vocab], got {tuple(logits.shape)} for {len(rows)} rows")
        if not rows:
            return SampleResult([], [], [])
        raw = logits
        logits = apply_grammar_masks(mask_min_tokens(apply_penalties(logits, rows), rows), rows)
        sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
        if len(sampled) == len(rows):
            tokens = self._draw(logits, rows)
        elif not sampled:
            tokens = logits.argmax(dim=-1)
        else:  # greedy rows are a single argmax; sampled rows overwrite theirs
            tokens = logits.argmax(dim=-1)
            sel = torch.tensor(sampled, dtype=torch.long).to(logits.device)
            tokens = tokens.index_copy(0, sel, self._draw(logits.index_select(0, sel), [rows[i] for i in sampled]))
        want = [i for i, r in enumerate(rows) if r.params.logprobs]
        if not want:
            return SampleResult(tokens.tolist(), [None] * len(rows), [None] * len(rows))
        packed = torch.cat([tokens.double(), self._logprobs_packed(raw, tokens, rows, want)])
        values = packed.tolist()  # the one read-back of the step
        token_list = [int(t) for t in values[:len(rows)]]
        lp, top = self._unpack_logprobs(values[len(rows):], rows, want)
        return SampleResult(token_list, lp, top)

    @staticmethod
    def _draw(logits: torch.Tensor, rows: list[RowState]) -> torch.Tensor:
        """Inverse-CDF draw with one uniform per row: seeded rows hash (seed, position) on the host,
        unseeded rows share one device `rand`. No per-row, per-vocabulary host work."""
        dev, dt = logits.device, logits.dtype
        B, V = logits.shape
        temps = [r.params.temperature for r in rows]
        if any(t != 1.0 for t in temps):
            logits = logits / torch.tensor(temps, dtype=dt).to(dev)[:, None]
        if any(r.params.has_filters for r in rows):
            ks = [r.params.top_k if r.params.top_k >= 1 else V for r in rows]
            host = torch.tensor([ks, [r.params.top_p for r in rows], [r.params.min_p for r in rows]],
                                dtype=torch.float64).to(dev)
            logits = filter_logits(logits, host[0].long(), host[1].to(dt), host[2].to(dt),
                                   max_k=max((k for k in ks if k < V), default=0),
                                   uses_top_p=any(r.params.top_p < 1 for r in rows))
        seeded = [r.seed is not None for r in rows]
        for r in rows:
            r.num_draws += 1
        if not any(seeded):
            u = torch.rand(B, device=dev, dtype=dt).mul_(_U_MAX)
        else:
            host_u = torch.tensor([seeded_uniform(r.seed, r.num_draws - 1) if r.seed is not None else -1.0
                                   for r in rows], dtype=dt).to(dev)
            u = host_u if all(seeded) else torch.where(host_u >= 0, host_u,
                                                       torch.rand(B, device=dev, dtype=dt).mul_(_U_MAX))
        cdf = _workspace(B, V, dt, dev)  # reused: a fresh [B, V] allocation costs more than the math
        torch.sub(logits, logits.amax(dim=-1, keepdim=True), out=cdf).exp_().cumsum_(dim=-1)
        target = (u[:, None] * cdf[:, -1:]).contiguous()
        return torch.searchsorted(cdf, target, right=True).view(B).clamp_(max=V - 1)

    @staticmethod
    def _logprobs_packed(raw: torch.Tensor, tokens: torch.Tensor, rows: list[RowState], want: list[int]):
        """[len(want)] chosen logprobs, then (if any row wants them) [len(want), kmax] top values and ids, flat float64."""
        sel = torch.tensor(want, dtype=torch.long).to(raw.device)
        logp = torch.log_softmax(raw.index_select(0, sel).float(), dim=-1)
        parts = [logp.gather(1, tokens.index_select(0, sel)[:, None]).squeeze(1).double()]
        kmax = max(rows[i].params.top_logprobs for i in want)
        if kmax:
            vals, ids = logp.topk(kmax, dim=-1)
            parts += [vals.double().flatten(), ids.double().flatten()]
        return torch.cat(parts)

    @staticmethod
    def _unpack_logprobs(values: list[float], rows: list[RowState], want: list[int]):
        B, W = len(rows), len(want)
        lp: list[float | None] = [None] * B
        top: list[list[tuple[int, float]] | None] = [None] * B
        kmax = max(rows[i].params.top_logprobs for i in want)
        vals, ids = values[W:W + W * kmax], values[W + W * kmax:]
        for j, i in enumerate(want):
            lp[i] = values[j]
            k = rows[i].params.top_logprobs
            top[i] = [(int(ids[j * kmax + m]), vals[j * kmax + m]) for m in range(k)]
        return lp, top

    @classmethod
    def _logprobs(cls, raw: torch.Tensor, tokens: torch.Tensor, rows: list[RowState]):
        """(logprob, top logprobs) lists per row (None where the row did not ask)."""
        want = [i for i, r in enumerate(rows) if r.params.logprobs]
        if not want:
            return [None] * len(rows), [None] * len(rows)
        return cls._unpack_logprobs(cls._logprobs_packed(raw, tokens, rows, want).tolist(), rows, want)
