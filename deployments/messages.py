"""Typed messages between deployments. Bulky tensors inside them travel as Ray objects."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.prompts import PreparedPrompt


@dataclass(slots=True)
class PreparedRequest:
    """Preprocessor -> VisionEncoder (or straight to the Decoder for text-only prompts)."""

    prompt: PreparedPrompt
    pixel_values: list[torch.Tensor] = field(default_factory=list)  # one [n_patches, 1176] per image
    image_hashes: list[str] = field(default_factory=list)


@dataclass(slots=True)
class EncodedRequest:
    """VisionEncoder -> Decoder: the prompt plus its image embeddings, in prompt order."""

    prompt: PreparedPrompt
    image_embeds: torch.Tensor | None = None  # [num_image_tokens, hidden]
