"""Batched multi-LoRA: every resident adapter's weights stacked in preallocated slots.

The model merges q/k/v and gate/up into one projection each; a slot's A matrices for a merged
projection sit side by side so one shrink matmul serves all of its modules. Ranks below
`max_rank` are zero-padded (exact: the padding contributes 0). Eager steps apply each slot to
its own rows only; the static decode path computes every slot for every row and selects with
`torch.where`, so shapes never change. Either way a row never multiplies another slot's
weights, so a broken slot (NaN) cannot reach other rows, and weights that are not finite in the
engine's dtype are refused at load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vlora.engine.tp import ShardPlan


@dataclass(slots=True)
class LoRAWeights:
    """One adapter's weights, independent of any file format: (layer, module) -> (A [r, in], B [out, r])."""

    rank: int
    scaling: float  # lora_alpha / r, or lora_alpha / sqrt(r) with rslora
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]

    @staticmethod
    def scaling_for(rank: int, alpha: float, use_rslora: bool) -> float:
        return alpha / math.sqrt(rank) if use_rslora else alpha / rank


class LoRASlotError(ValueError):
    """An adapter does not fit the slots (rank, module or shape mismatch)."""


def check_lora_fits(lora: LoRAWeights, module_shapes: dict[tuple[int, str], tuple[int, int]], max_rank: int) -> None:
    """Raise LoRASlotError saying what is wrong if `lora` does not fit the base model and rank limit."""
    if lora.rank > max_rank:
        raise LoRASlotError(f"adapter rank {lora.rank} exceeds the engine's max_lora_rank {max_rank}")
    for key, (a, b) in lora.weights.items():
        if key not in module_shapes:
            layer, mod = key
            raise LoRASlotError(f"adapter targets layer {layer} module {mod!r}, which this engine does not serve")
        i, o = module_shapes[key]
        if a.shape[1] != i or b.shape[0] != o or a.shape[0] != b.shape[1] or a.shape[0] > max_rank:
            raise LoRASlotError(
                f"adapter weights for layer {key[0]} {key[1]} have shapes A{tuple(a.shape)} B{tuple(b.shape)}; "
                f"the base model needs A[r, {i}] and B[{o}, r] with r <= {max_rank}"
            )


# Merged projections of a decoder layer and the LoRA target modules each is made of, in output order.
LORA_GROUPS = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate_up": ("gate_proj", "up_proj"),
               "down": ("down_proj",)}
_GROUP_OF = {m: (g, i) for g, mods in LORA_GROUPS.items() for i, m in enumerate(mods)}


def check_lora_finite(lora: LoRAWeights, dtype: torch.dtype) -> None:
    """Raise LoRASlotError if A or scaled B is not finite once cast to the engine's dtype (NaN, inf, or a
    value beyond the dtype's range, e.g. > 65504 in float16): such weights would poison the rows they touch."""
    for (layer, mod), (a, b) in lora.weights.items():
        for what, t in (("A", a), ("B * scaling", b * lora.scaling)):
            if not bool(torch.isfinite(t.to(dtype)).all()):
                raise LoRASlotError(
                    f"adapter weights for layer {layer} {mod} ({what}) are not finite in {str(dtype).removeprefix('torch.')} "
                    f"(NaN, inf, or beyond its range: max |value| {float(t.abs().max()):.3g}); "
                    "retrain or rescale the adapter")


class AdapterSlots:
    """Preallocated LoRA weights for `num_slots` adapters on every (layer, merged projection).

    For a projection merging m modules (q/k/v: 3) each slot owns R = m * max_rank columns of
    `a[(layer, group)]` `[in, slots*R]` (module i at columns [i*max_rank, ...)) and the block
    `b[(layer, group)][slot]` `[R, out]`, block-diagonal: module i's rows write only its own
    output columns. One shrink matmul serves the whole merged projection.

    Under tensor parallelism (`plan`) the slots are sharded like the base layers (S-LoRA, vLLM's
    fully sharded LoRA): column-parallel projections (q/k/v, gate/up) keep A whole and this rank's
    output rows of B; row-parallel ones (o, down) keep this rank's input columns of A and B whole,
    so their partial deltas join the base layer's all-reduce. `load` takes full adapter weights.
    `journal`, when set to a list, records every write (tensor-parallel rank 0 replays them on the
    other ranks before the next step).
    """

    def __init__(self, num_slots: int, max_rank: int, module_shapes: dict[tuple[int, str], tuple[int, int]],
                 dtype: torch.dtype, device: str | torch.device, out_sizes: dict[str, int] | None = None,
                 plan: ShardPlan | None = None):
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.dtype = dtype
        self.plan = plan or ShardPlan()
        self.journal: list | None = None
        self.module_shapes = module_shapes  # (layer, module) -> full (in_features, out_features)
        # (layer, group) -> per module of the group: output column offset and size
        self.layout: dict[tuple[int, str], list[tuple[int, int]]] = {}
        ins: dict[tuple[int, str], int] = {}
        for (layer, mod), (i, o) in module_shapes.items():
            group, _ = _GROUP_OF[mod]
            lo, hi = self.plan.in_range(mod, i)
            ins[(layer, group)] = hi - lo
        for (layer, group) in ins:
            offs, off = [], 0
            for m in LORA_GROUPS[group]:
                # a module that is not a target has no LoRA; the model needs its columns (out_sizes)
                full = (out_sizes or {}).get(m) or module_shapes.get((layer, m), (0, 0))[1]
                lo, hi = self.plan.out_range(m, full)
                size = hi - lo
                offs.append((off, size))
                off += size
            self.layout[(layer, group)] = offs
        self.a = {k: torch.zeros(i, num_slots * self._width(k), dtype=dtype, device=device) for k, i in ins.items()}
        self.b = {k: torch.zeros(num_slots, self._width(k), sum(s for _, s in self.layout[k]), dtype=dtype,
                                 device=device) for k in ins}

    def _width(self, key: tuple[int, str]) -> int:
        return len(LORA_GROUPS[key[1]]) * self.max_rank

    def check(self, lora: LoRAWeights) -> None:
        """Raise LoRASlotError with what is wrong if `lora` cannot be loaded; loads nothing."""
        check_lora_fits(lora, self.module_shapes, self.max_rank)
        check_lora_finite(lora, self.dtype)

    def load(self, slot: int, lora: LoRAWeights) -> None:
        """Write `lora` into `slot` in place (other slots untouched); modules it lacks become zero."""
        self.check(lora)
        if self.journal is not None:
            self.journal.append(("load", slot, lora))
        self._zero(slot)
        for (layer, mod), (a, b) in lora.weights.items():
            group, i = _GROUP_OF[mod]
            key = (layer, group)
            w = self._width(key)
            off, size = self.layout[key][i]
            r = a.shape[0]
            if self.plan.sharded:  # this rank's rows of B (column-parallel) or columns of A (row-parallel)
                lo, hi = self.plan.out_range(mod, b.shape[0])
                b = b[lo:hi]
                lo, hi = self.plan.in_range(mod, a.shape[1])
                a = a[:, lo:hi]
            lo = slot * w + i * self.max_rank
            self.a[key][:, lo:lo + r].copy_(a.T)
            self.b[key][slot, i * self.max_rank:i * self.max_rank + r, off:off + size].copy_(b.T * lora.scaling)

    def clear(self, slot: int) -> None:
        if self.journal is not None:
            self.journal.append(("clear", slot, None))
        self._zero(slot)

    def replay(self, ops: list) -> None:
        """Apply writes journaled by another rank's slots (same order, this rank's shard)."""
        for op, slot, lora in ops:
            if op == "load":
                self.load(slot, lora)
            else:
                self.clear(slot)

    def _zero(self, slot: int) -> None:
        for key in self.a:
            w = self._width(key)
            self.a[key][:, slot * w:(slot + 1) * w].zero_()
            self.b[key][slot].zero_()


@dataclass(slots=True)
class LoRABatch:
    """Per-step routing of token rows to adapter slots, in one of two forms.

    - `groups` (eager steps): per slot in use, its rows (a contiguous range or an index tensor);
      only that slot's weights touch those rows.
    - `slot` (static decode buffers): every row's slot on the device (-1 = base). Every slot's
      delta is computed for every row and each row takes its own with a gather + `torch.where`,
      so the shapes never change and no other slot's values (even NaN) can reach a row.
    """

    groups: list[tuple[int, slice | torch.Tensor]] | None = None
    slot: torch.Tensor | None = None  # [T] long
    gather_index: torch.Tensor | None = None  # [1, T, 1] slot clamped to >= 0
    active: torch.Tensor | None = None  # [T, 1] bool: the row has an adapter

    @staticmethod
    def build(slot_per_token: list[int], device: str | torch.device = "cpu") -> "LoRABatch | None":
        """Groups from per-token slots (a CPU list, so building it never syncs the device); None if no row uses LoRA."""
        rows: dict[int, list[int]] = {}
        for i, s in enumerate(slot_per_token):
            if s >= 0:
                rows.setdefault(s, []).append(i)
        if not rows:
            return None
        groups = []
        for s, r in rows.items():
            if r[-1] - r[0] + 1 == len(r):
                groups.append((s, slice(r[0], r[-1] + 1)))
            else:
                groups.append((s, torch.tensor(r, dtype=torch.long).to(device)))
        return LoRABatch(groups=groups)

    @staticmethod
    def for_slots(slot: torch.Tensor) -> "LoRABatch":
        """Static form over a device tensor of per-row slots (device ops only: capturable)."""
        return LoRABatch(slot=slot, gather_index=slot.clamp(min=0).view(1, -1, 1), active=(slot >= 0).view(-1, 1))


def apply_lora(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, batch: LoRABatch | None) -> torch.Tensor:
    """y + x @ A_slot @ B_slot for each row with an adapter; base rows keep y exactly."""
    if batch is None:
        return y
    S, R, out = b.shape
    if batch.groups is not None:
        y = y.clone() if y.requires_grad else y
        for s, rows in batch.groups:
            a_s, b_s = a[:, s * R:(s + 1) * R], b[s]
            if isinstance(rows, slice):
                y[rows] += (x[rows] @ a_s) @ b_s
            else:
                y.index_add_(0, rows, (x.index_select(0, rows) @ a_s) @ b_s)
        return y
    T = x.shape[0]
    xa = (x @ a).view(T, S, R).transpose(0, 1)  # [S, T, R]: every slot's shrink
    delta = torch.bmm(xa, b).gather(0, batch.gather_index.expand(1, T, out)).view(T, out)
    return torch.where(batch.active, y + delta, y)
