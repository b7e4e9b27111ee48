"""Batched multi-LoRA: every resident adapter's weights stacked in preallocated slots.

For each target module the A matrices of all slots form one `[in, slots*rank]` matrix and the
(scaled) B matrices one `[slots*rank, out]` matrix. A batch applies LoRA in two matmuls:
`x @ A_all` computes every slot's down-projection, a per-row mask keeps only the row's own
slot block, and `@ B_all` projects back up. Shapes are static (CUDA-graph friendly), the extra
work is `slots*rank / in` of the base matmul, ranks below `max_rank` are zero-padded (exact:
the padding contributes 0), and rows with slot -1 (base model) are skipped entirely.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


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


class AdapterSlots:
    """Preallocated LoRA weights for `num_slots` adapters on every (layer, target module)."""

    def __init__(self, num_slots: int, max_rank: int, module_shapes: dict[tuple[int, str], tuple[int, int]],
                 dtype: torch.dtype, device: str | torch.device):
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.module_shapes = module_shapes  # (layer, module) -> (in_features, out_features)
        width = num_slots * max_rank
        self.a = {k: torch.zeros(i, width, dtype=dtype, device=device) for k, (i, o) in module_shapes.items()}
        self.b = {k: torch.zeros(width, o, dtype=dtype, device=device) for k, (i, o) in module_shapes.items()}

    def check(self, lora: LoRAWeights) -> None:
        """Raise LoRASlotError with what is wrong if `lora` cannot be loaded; loads nothing."""
        check_lora_fits(lora, self.module_shapes, self.max_rank)

    def load(self, slot: int, lora: LoRAWeights) -> None:
        """Write `lora` into `slot` in place (other slots untouched); modules it lacks become zero."""
        self.check(lora)
        lo, hi = slot * self.max_rank, (slot + 1) * self.max_rank
        for key in self.module_shapes:
            self.a[key][:, lo:hi].zero_()
            self.b[key][lo:hi].zero_()
            if key in lora.weights:
                a, b = lora.weights[key]
                r = a.shape[0]
                self.a[key][:, lo:lo + r].copy_(a.T)
                self.b[key][lo:lo + r].copy_(b.T * lora.scaling)

    def clear(self, slot: int) -> None:
        lo, hi = slot * self.max_rank, (slot + 1) * self.max_rank
        for key in self.module_shapes:
            self.a[key][:, lo:hi].zero_()
            self.b[key][lo:hi].zero_()


@dataclass(slots=True)
class LoRABatch:
    """Per-step routing: which token rows use LoRA, and a mask selecting each row's slot block."""

    rows: torch.Tensor  # [R] indices of token rows with an adapter
    mask: torch.Tensor  # [R, slots*rank] 1 inside the row's slot block, else 0

    @staticmethod
    def build(slot_per_token: list[int], num_slots: int, max_rank: int, dtype: torch.dtype,
              device: str | torch.device = "cpu") -> "LoRABatch | None":
        """From per-token slots (a CPU list, so building it never syncs the device); None if no row uses LoRA."""
        rows = [i for i, s in enumerate(slot_per_token) if s >= 0]
        if not rows:
            return None
        slots = torch.tensor([slot_per_token[i] for i in rows])
        block = torch.arange(num_slots * max_rank) // max_rank
        mask = (block.unsqueeze(0) == slots.unsqueeze(1)).to(dtype)
        return LoRABatch(rows=torch.tensor(rows).to(device), mask=mask.to(device))


def apply_lora(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, batch: LoRABatch | None) -> torch.Tensor:
    """y[rows] += ((x[rows] @ A_all) * mask) @ B_all; base-only batches return y untouched."""
    if batch is None:
        return y
    xr = x.index_select(0, batch.rows)
    delta = ((xr @ a) * batch.mask) @ b
    return y.index_add(0, batch.rows, delta)
