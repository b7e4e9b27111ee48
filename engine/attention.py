"""Attention over the paged KV cache for a flattened batch of variable-length sequences.

A step's tokens are packed into one `[T, ...]` tensor (prefill chunks and single decode tokens
side by side). New keys/values are written to their cache slots first. Then:

- decode rows (one new token each) attend together: each row's context is gathered through its
  block table into a `[B, K, kv_heads, D]` window (K = the step's context bucket, a multiple of
  the block size), positions at or beyond the row's length are masked by a mask computed on the
  device from `seq_lens`, and GQA is folded into the query dimension (`[B, kv_heads, group, D]`)
  so SDPA runs one plain, unpadded-head attention. Nothing here reads a device value on the
  host, so the same code runs inside a CUDA graph.
- prefill chunks (more than one new token) attend one sequence at a time: a fresh prompt uses
  its own keys with SDPA's causal flag; a later chunk gathers its context and uses a
  bottom-right causal mask `[n, ctx]`. No row is padded to another row's length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(slots=True)
class PrefillChunk:
    """One sequence's chunk of more than one new token: packed rows [start, start + n)."""

    start: int
    n: int
    num_computed: int  # tokens of this sequence already in the cache before the chunk
    kv_index: torch.Tensor | None  # [num_computed + n] flat cache index of the context; None if num_computed == 0
    mask: torch.Tensor | None  # [n, num_computed + n] bool bottom-right causal mask; None if num_computed == 0


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] flat cache index (block * block_size + offset) of each new token
    decode_rows: torch.Tensor | None  # [Bd] packed rows of the decode tokens; None: every row is a decode row
    decode_kv_index: torch.Tensor | None  # [Bd*K] flat cache index of each row's context positions (padding: any valid slot)
    decode_mask: torch.Tensor | None  # [Bd, 1, 1, K] bool: position < the row's sequence length
    prefills: list[PrefillChunk]

    @staticmethod
    def build(block_tables: list[list[int]], num_computed: list[int], num_new: list[int], block_size: int,
              device: str | torch.device) -> "AttentionMetadata":
        """Metadata for an eager step; index tensors are built on the host and copied once."""
        slot_mapping: list[int] = []
        dec_rows, dec_tables, dec_lens, prefill_specs = [], [], [], []
        start = 0
        for table, c, n in zip(block_tables, num_computed, num_new):
            slot_mapping.extend(table[p // block_size] * block_size + p % block_size for p in range(c, c + n))
            if n == 1:
                dec_rows.append(start)
                dec_tables.append(table)
                dec_lens.append(c + 1)
            else:
                prefill_specs.append((start, n, c, table))
            start += n
        meta = AttentionMetadata(torch.tensor(slot_mapping, dtype=torch.long).to(device), None, None, None, [])
        if dec_rows:
            nb = -(-max(dec_lens) // block_size)
            table = torch.tensor([t[:nb] + [t[0]] * (nb - min(nb, len(t))) for t in dec_tables], dtype=torch.long)
            lens = torch.tensor(dec_lens, dtype=torch.long)
            kv_index, mask = decode_index(table, lens, block_size)
            meta.decode_kv_index, meta.decode_mask = kv_index.to(device), mask.to(device)
            if len(dec_rows) != start:
                meta.decode_rows = torch.tensor(dec_rows, dtype=torch.long).to(device)
        for s, n, c, table in prefill_specs:
            if c == 0:
                meta.prefills.append(PrefillChunk(s, n, 0, None, None))
                continue
            pos = torch.arange(c + n)
            kv_index = torch.tensor(table, dtype=torch.long)[pos // block_size] * block_size + pos % block_size
            mask = pos.unsqueeze(0) <= (c + torch.arange(n)).unsqueeze(1)
            meta.prefills.append(PrefillChunk(s, n, c, kv_index.to(device), mask.to(device)))
        return meta


def decode_index(block_table: torch.Tensor, seq_lens: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kv_index [B*nb*bs] flat, mask [B, 1, 1, nb*bs]) from a block table [B, nb] and lengths [B], with
    device ops only (no host read), so a CUDA graph can capture it."""
    B, nb = block_table.shape
    offs = torch.arange(block_size, device=block_table.device)
    kv_index = (block_table.unsqueeze(-1) * block_size + offs).view(-1)
    pos = torch.arange(nb * block_size, device=block_table.device)
    mask = (pos.unsqueeze(0) < seq_lens.unsqueeze(1)).view(B, 1, 1, nb * block_size)
    return kv_index, mask


def decode_attention(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, kv_index: torch.Tensor,
                     mask: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, H, D] against the gathered contexts; GQA folded into the query length. Returns [B, H*D]."""
    B, H, D = q.shape
    kvh = kc.shape[1]
    K = mask.shape[-1]
    k = kc.index_select(0, kv_index).view(B, K, kvh, D).transpose(1, 2)  # [B, KVH, K, D]
    v = vc.index_select(0, kv_index).view(B, K, kvh, D).transpose(1, 2)
    out = F.scaled_dot_product_attention(q.view(B, kvh, H // kvh, D), k, v, attn_mask=mask, scale=scale)
    return out.view(B, H * D)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
                      chunk: PrefillChunk, scale: float) -> torch.Tensor:
    """One sequence's chunk: q [n, H, D]; k/v [n, KVH, D] are the chunk's own (rotated) keys/values."""
    n, H, D = q.shape
    kvh = k.shape[1]
    qt = q.transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
    if chunk.kv_index is None:  # a fresh prompt: its context is exactly its own keys
        kt, vt = k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=H != kvh)
    else:
        kt = kc.index_select(0, chunk.kv_index).transpose(0, 1).unsqueeze(0)  # [1, KVH, ctx, D]
        vt = vc.index_select(0, chunk.kv_index).transpose(0, 1).unsqueeze(0)
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=chunk.mask, scale=scale, enable_gqa=H != kvh)
    return out.squeeze(0).transpose(0, 1)  # [n, H, D]


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q [T, H, D], k/v [T, KVH, D] (already rotated); writes k/v to the cache (`[blocks, block_size, KVH, D]`
    or its flat `[slots, KVH, D]` view), returns [T, H*D]."""
    T, H, D = q.shape
    kvh = k.shape[1]
    kc = k_cache if k_cache.dim() == 3 else k_cache.view(-1, kvh, D)  # [slots, KVH, D]
    vc = v_cache if v_cache.dim() == 3 else v_cache.view(-1, kvh, D)
    kc.index_copy_(0, meta.slot_mapping, k)
    vc.index_copy_(0, meta.slot_mapping, v)
    if not meta.prefills:  # decode only: every row is a decode row
        return decode_attention(q, kc, vc, meta.decode_kv_index, meta.decode_mask, scale)
    out = q.new_empty(T, H, D)
    if meta.decode_kv_index is not None:
        rows = meta.decode_rows
        od = decode_attention(q.index_select(0, rows), kc, vc, meta.decode_kv_index, meta.decode_mask, scale)
        out.view(T, H * D).index_copy_(0, rows, od)
    for c in meta.prefills:
        sl = slice(c.start, c.start + c.n)
        out[sl] = prefill_attention(q[sl], k[sl], v[sl], kc, vc, c, scale)
    return out.view(T, H * D)
