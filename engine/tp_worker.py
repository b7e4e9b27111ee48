"""Both ends of a tensor-parallel step: rank 0's `TPDriver` and the `run_worker` loop of ranks 1..N-1.

Rank 0's ModelRunner calls the driver exactly as it calls the model. The driver broadcasts the
call (token ids, positions, attention metadata -- slot mapping and block-table indices -- LoRA
routing, image embeddings, which rows need logits) with the adapter slot writes journaled since
the previous step, then runs rank 0's own shard. Each worker receives the same message, replays
the slot writes on its shard of the slots (so a hot-swap lands on every rank between the same two
steps), and runs the same forward; the all-reduces inside the layers keep the ranks in step.
Nothing here knows about Ray: a worker is any process that calls `run_worker`.
"""

from __future__ import annotations

import logging

import torch

from vlora.engine.config import EngineConfig
from vlora.engine.lora import AdapterSlots
from vlora.engine.model import QwenTextModel
from vlora.engine.model_shard import load_model_shard
from vlora.engine.tp import TPGroup, TPSpec

log = logging.getLogger(__name__)


class TPDriver:
    """Rank 0's stand-in for the model: every call is sent to the workers, then run on rank 0's shard."""

    def __init__(self, model: QwenTextModel, group: TPGroup, slots: AdapterSlots | None):
        self.model = model
        self.group = group
        self.slots = slots
        if slots is not None:
            slots.journal = []
        self.cfg = model.cfg
        self.rope = model.rope
        self.num_steps = 0

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, meta, kv_k, kv_v, **kw) -> torch.Tensor:
        ops = []
        if self.slots is not None and self.slots.journal:
            ops, self.slots.journal = self.slots.journal, []
        rest = {k: v for k, v in kw.items() if k != "slots"}  # each rank uses its own slots and KV cache
        self.group.send(("forward", ops, input_ids, positions, meta, rest))
        self.num_steps += 1
        return self.model(input_ids, positions, meta, kv_k, kv_v, **kw)

    def stop(self) -> None:
        """End the workers' loops (they return from run_worker)."""
        self.group.send(("stop",))


def run_worker(config: EngineConfig, spec: TPSpec) -> int:
    """Rank `spec.rank` (>= 1): load this rank's shard, then run every step rank 0 sends until it says
    stop. Returns the number of forwards run. Raises if the group breaks (rank 0 gone, a peer timed out)."""
    if spec.rank == 0:
        raise ValueError("run_worker is for ranks 1..N-1; rank 0 is the engine")
    group = TPGroup(spec, config.device)
    shard = load_model_shard(config, group)
    log.info("tensor-parallel rank %d/%d ready (%d KV blocks)", spec.rank, spec.world_size, shard.num_blocks)
    steps = 0
    while True:
        msg = group.recv()
        if msg[0] == "stop":
            return steps
        _, ops, input_ids, positions, meta, kw = msg
        if ops:
            shard.slots.replay(ops)
        shard.model(input_ids, positions, meta, shard.kv.k_flat, shard.kv.v_flat, slots=shard.slots, **kw)
        steps += 1
