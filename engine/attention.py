"""Attention over the paged KV cache for a flattened batch of variable-length sequences.

A step's tokens are packed into one `[T, ...]` tensor (prefill chunks and single decode tokens
side by side). New keys/values are written to their cache slots; then each sequence attends
to its whole context, gathered through its block table. The CPU path pads sequences to the
longest query/context in the step and runs torch SDPA with an explicit mask (exact, simple);
flash-attn's paged kernel replaces it on GPUs when installed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] flat cache index (block * block_size + offset) of each new token
    q_index: torch.Tensor  # [B, Qmax] row in the packed batch of each (seq, query) pair, padded with 0
    out_index: torch.Tensor  # [T] position in the flattened [B*Qmax] padded layout of each packed token
    kv_index: torch.Tensor  # [B, Kmax] flat cache index of each context position, padded with 0
    mask: torch.Tensor  # [B, 1, Qmax, Kmax] bool: causal within the context, padding masked

    @staticmethod
    def build(block_tables: list[list[int]], num_computed: list[int], num_new: list[int], block_size: int,
              device: str | torch.device) -> "AttentionMetadata":
        B = len(num_new)
        qmax = max(num_new)
        ctx = [c + n for c, n in zip(num_computed, num_new)]
        kmax = max(ctx)
        starts = torch.tensor([0] + num_new[:-1]).cumsum(0)
        qi = torch.arange(qmax)
        q_valid = qi.unsqueeze(0) < torch.tensor(num_new).unsqueeze(1)
        q_index = torch.where(q_valid, starts.unsqueeze(1) + qi.unsqueeze(0), torch.zeros((), dtype=torch.long))
        nb = max(len(t) for t in block_tables)
        table = torch.tensor([t + [0] * (nb - len(t)) for t in block_tables], dtype=torch.long)
        kj = torch.arange(kmax)
        kv_block = table.gather(1, (kj // block_size).clamp(max=nb - 1).unsqueeze(0).expand(B, -1))
        kv_index = kv_block * block_size + kj % block_size
        comp = torch.tensor(num_computed).unsqueeze(1)
        ctxt = torch.tensor(ctx).unsqueeze(1)
        kv_valid = kj.unsqueeze(0) < ctxt  # [B, Kmax]
        kv_index = torch.where(kv_valid, kv_index, torch.zeros((), dtype=torch.long))
        q_pos = comp + qi.unsqueeze(0)  # absolute position of each query
        mask = (kj.view(1, 1, -1) <= q_pos.unsqueeze(-1)) & kv_valid.unsqueeze(1)
        # Padded query rows attend to position 0 so SDPA never sees an all-masked row (no NaN).
        mask = mask | (~q_valid.unsqueeze(-1) & (kj.view(1, 1, -1) == 0))
        q_block = table.gather(1, (q_pos // block_size).clamp(max=nb - 1))
        slot_mapping = (q_block * block_size + q_pos % block_size)[q_valid]  # packed order: seq-major
        out_index = torch.arange(B * qmax).view(B, qmax)[q_valid]
        # Index tensors are built on the CPU and copied once, so the device never syncs on them.
        return AttentionMetadata(
            slot_mapping=slot_mapping.to(device),
            q_index=q_index.to(device),
            out_index=out_index.to(device),
            kv_index=kv_index.to(device),
            mask=mask.unsqueeze(1).to(device),
        )


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q [T, H, D], k/v [T, KVH, D] (already rotated); writes k/v to the cache, returns [T, H*D]."""
    T, H, D = q.shape
    kvh = k.shape[1]
    kc = k_cache.view(-1, kvh, D)
    vc = v_cache.view(-1, kvh, D)
    kc.index_copy_(0, meta.slot_mapping, k)
    vc.index_copy_(0, meta.slot_mapping, v)
    B, qmax = meta.q_index.shape
    kmax = meta.kv_index.shape[1]
    qb = q.index_select(0, meta.q_index.flatten()).view(B, qmax, H, D).transpose(1, 2)  # [B, H, Qmax, D]
    kb = kc.index_select(0, meta.kv_index.flatten()).view(B, kmax, kvh, D).transpose(1, 2)  # [B, KVH, Kmax, D]
    vb = vc.index_select(0, meta.kv_index.flatten()).view(B, kmax, kvh, D).transpose(1, 2)
    out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=meta.mask, scale=scale, enable_gqa=H != kvh)
    out = out.transpose(1, 2).reshape(B * qmax, H, D).index_select(0, meta.out_index)  # [T, H, D] packed order
    return out.reshape(T, H * D)
