"""Turns a scheduled batch into packed tensors, runs the model, returns logits for sampling rows."""

from __future__ import annotations

import torch

from engine.attention import AttentionMetadata
from engine.kv_cache import KVCache
from engine.lora import AdapterSlots, LoRABatch
from engine.model import QwenTextModel
from engine.scheduler import ScheduledBatch
from engine.sequence import Sequence


class ModelRunner:
    def __init__(self, model: QwenTextModel, kv: KVCache, slots: AdapterSlots | None, block_size: int,
                 device: str | torch.device):
        self.model = model
        self.kv = kv
        self.slots = slots
        self.block_size = block_size
        self.device = device

    def run(self, batch: ScheduledBatch) -> tuple[torch.Tensor, list[Sequence]]:
        """Compute the batch's new tokens; return logits [S, vocab] for the S sequences that now sample."""
        ids, pos, lora_idx, img_rows, img_embeds, logit_rows, samplers = [], [], [], [], [], [], []
        offset = 0
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            ids.extend(seq.tokens(start, end))
            pos.append(seq.positions(start, end))
            lora_idx.extend([seq.adapter_slot] * n)
            img = seq.image_rows(start, end)
            if img is not None:
                img_rows.append(img[0] + offset)
                img_embeds.append(img[1])
            offset += n
            if end == seq.num_tokens:  # caught up: this row's last position predicts the next token
                logit_rows.append(offset - 1)
                samplers.append(seq)
        dev = self.device
        meta = AttentionMetadata.build([s.block_table for s in batch.seqs],
                                       [s.num_computed_tokens for s in batch.seqs],
                                       batch.num_new_tokens, self.block_size, dev)
        lora = None
        if self.slots is not None:
            lora = LoRABatch.build(lora_idx, self.slots.num_slots, self.slots.max_rank,
                                   self.model.lm_head.weight.dtype, dev)
        logits = self.model(
            torch.tensor(ids, dtype=torch.long, device=dev),
            torch.cat(pos, dim=1).to(dev),
            meta, self.kv.k, self.kv.v,
            image_rows=torch.cat(img_rows).to(dev) if img_rows else None,
            image_embeds=torch.cat(img_embeds).to(dev) if img_embeds else None,
            slots=self.slots, lora=lora,
            logits_rows=torch.tensor(logit_rows, dtype=torch.long, device=dev),
        )
        return logits, samplers
