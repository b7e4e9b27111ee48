"""A sequence: one generated continuation of a request (a request with n > 1 has n of them)."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Any

import torch

_seq_ids = itertools.count()


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False, slots=True)
class Sequence:
    request_id: str
    index: int  # which of the request's n choices
    prompt_token_ids: list[int]
    sampling: Any  # engine.sampling.SamplingParams
    adapter_slot: int = -1  # -1: base model rows, no LoRA work
    prompt_positions: torch.Tensor | None = None  # [3, L] M-RoPE positions; None for text-only (arange)
    rope_delta: int = 0
    image_embeds: torch.Tensor | None = None  # [num_image_tokens, hidden], scattered at <|image_pad|>
    image_token_id: int | None = None
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    num_preemptions: int = 0
    finish_reason: str | None = None
    state: Any = None  # sampler/detokenizer state owned by the engine
    # Optimal sampling: a student row and its teacher row are partners; each parks its next-token
    # logits here until the other's are ready, then one token drawn from q* extends both.
    partner: "Sequence | None" = None
    is_teacher: bool = False
    pending_logits: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    def token_at(self, i: int) -> int:
        L = len(self.prompt_token_ids)
        return self.prompt_token_ids[i] if i < L else self.output_token_ids[i - L]

    def tokens(self, start: int, end: int) -> list[int]:
        L = len(self.prompt_token_ids)
        if end <= L:
            return self.prompt_token_ids[start:end]
        return (self.prompt_token_ids + self.output_token_ids)[start:end]

    def positions(self, start: int, end: int) -> torch.Tensor:
        """M-RoPE positions [3, end-start]: the prompt's own rows, then `i + rope_delta` for generated tokens."""
        L = len(self.prompt_token_ids)
        if self.prompt_positions is None:
            return torch.arange(start, end).expand(3, -1)
        parts = []
        if start < L:
            parts.append(self.prompt_positions[:, start:min(end, L)])
        if end > L:
            parts.append(torch.arange(max(start, L), end).add_(self.rope_delta).expand(3, -1))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def image_rows(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(offsets within [start, end) of image pad tokens, their embedding rows) for a prefill chunk."""
        if self.image_embeds is None or start >= len(self.prompt_token_ids):
            return None
        ids = torch.tensor(self.prompt_token_ids[: min(end, len(self.prompt_token_ids))])
        is_img = ids == self.image_token_id
        rank = torch.cumsum(is_img, 0) - 1  # row of image_embeds for each pad token
        chunk = is_img[start:]
        if not bool(chunk.any()):
            return None
        offsets = torch.nonzero(chunk).flatten()
        return offsets, self.image_embeds[rank[start:][offsets]]
