"""Typed messages between deployments. Bulky tensors inside them travel as Ray objects."""

from __future__ import annotations

import pickle
import warnings
from dataclasses import dataclass, field

import torch

from vlora.engine.outputs import RequestOutput
from vlora.engine.prompts import PreparedPrompt


@dataclass(slots=True)
class PreparedRequest:
    """Preprocessor -> VisionEncoder (or straight to the Decoder for text-only prompts)."""

    prompt: PreparedPrompt
    pixel_values: list[torch.Tensor] = field(default_factory=list)  # one [n_patches, 1176] per image
    image_hashes: list[str] = field(default_factory=list)


@dataclass(slots=True)
class EncodedRequest:
    """VisionEncoder -> Decoder: the prompt plus its image embeddings, in prompt order.

    The embeddings travel as a numpy view of their bytes: Ray's object store copies a numpy array
    once on put and reads it without a copy on get, where a pickled torch tensor is serialized
    through a byte stream on both sides (bench/RESULTS.md, vision transfer). dtype and values are
    unchanged (bfloat16 included).
    """

    prompt: PreparedPrompt
    image_embeds: torch.Tensor | None = None  # [num_image_tokens, hidden], in the serving dtype

    def __reduce__(self):
        return _rebuild_encoded, (self.prompt, _tensor_to_wire(self.image_embeds))


# numpy has no bfloat16: such tensors travel as their raw 16-bit words.
_WIRE_VIEW = {torch.bfloat16: torch.int16}


def _tensor_to_wire(t: torch.Tensor | None):
    if t is None:
        return None
    t = t.detach().cpu().contiguous()
    return str(t.dtype).removeprefix("torch."), t.view(_WIRE_VIEW.get(t.dtype, t.dtype)).numpy()


def _tensor_from_wire(wire) -> torch.Tensor | None:
    if wire is None:
        return None
    dtype_name, array = wire
    dtype = getattr(torch, dtype_name)
    with warnings.catch_warnings():  # the object store's buffer is read-only; nothing writes to embeddings
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(array)
    return t.view(dtype) if t.dtype != dtype else t


def _rebuild_encoded(prompt: PreparedPrompt, wire) -> EncodedRequest:
    return EncodedRequest(prompt, _tensor_from_wire(wire))


# -- Decoder -> Ingress ------------------------------------------------------------------------------
# Outputs cross as plain pickle bytes: Ray hands bytes through as they are, where an object goes
# through cloudpickle's per-object hooks on every streamed item.
def output_to_wire(out: RequestOutput) -> bytes:
    return pickle.dumps(out, protocol=pickle.HIGHEST_PROTOCOL)


def output_from_wire(blob: bytes) -> RequestOutput:
    return pickle.loads(blob)


class DecoderStream:
    """A Decoder's streamed response as RequestOutputs (`__anext__`, `cancel`, as the Serve generator)."""

    def __init__(self, gen):
        self._gen = gen

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        return output_from_wire(await self._gen.__anext__())

    def cancel(self) -> None:
        self._gen.cancel()
