"""Turns a scheduled batch into model inputs, runs the model, returns logits for sampling rows.

Two paths:

- decode steps (every row computes exactly one token, no image rows) go through static
  buffers: one preallocated int64 block (ids, M-RoPE positions `[3, B]`, slot mapping, sequence
  lengths, each row's block-table row and LoRA slot) filled with a single host-to-device copy,
  read through fixed views per batch-size bucket. Rows beyond the batch are padding: they write
  to a reserved scratch KV block and attend only to it. Block tables live on the device, one
  persistent row per running sequence, and only newly allocated blocks are written each step.
  On a GPU (unless `enforce_eager`) each (bucket, context bucket, LoRA on/off) forward is
  captured once in a CUDA graph and replayed; on a CPU the same buffers are driven eagerly.
- every other step (prefill chunks, mixed prefill + decode, images) runs eagerly with packed
  inputs built for that step.
"""

from __future__ import annotations

import torch

from vlora.engine.attention import AttentionMetadata, decode_index
from vlora.engine.kv_cache import KVCache
from vlora.engine.lora import AdapterSlots, LoRABatch
from vlora.engine.model import QwenTextModel
from vlora.engine.scheduler import ScheduledBatch
from vlora.engine.sequence import Sequence


def batch_buckets(max_num_seqs: int) -> list[int]:
    """Decode batch sizes with their own buffers/graphs: 1, 2, 4, 8, then multiples of 16."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs] + list(range(16, max_num_seqs, 16)) + [max_num_seqs]
    return sorted(set(sizes))


class DecodeBuffers:
    """Static decode inputs for up to `size` rows: views of one int64 device tensor (and a pinned
    host twin on GPUs) so a step's inputs are one copy and their addresses never change."""

    FIELDS = ("ids", "pos0", "pos1", "pos2", "slot_mapping", "seq_lens", "table_rows", "lora_slots")

    def __init__(self, size: int, device: str | torch.device):
        self.size = size
        self.device = torch.device(device)
        self.packed = torch.zeros(len(self.FIELDS), size, dtype=torch.long, device=device)
        self.staging = torch.zeros(len(self.FIELDS), size, dtype=torch.long,
                                   pin_memory=self.device.type == "cuda")
        self.ids, _, _, _, self.slot_mapping, self.seq_lens, self.table_rows, self.lora_slots = self.packed.unbind(0)
        self.positions = self.packed[1:4]  # [3, size]

    def fill(self, rows: list[list[int]]) -> None:
        """rows: one list of `size` values per field."""
        if self.device.type == "cpu":
            self.packed.copy_(torch.tensor(rows, dtype=torch.long))
            return
        self.staging.copy_(torch.tensor(rows, dtype=torch.long))
        self.packed.copy_(self.staging, non_blocking=True)


class ModelRunner:
    def __init__(self, model: QwenTextModel, kv: KVCache, slots: AdapterSlots | None, block_size: int,
                 device: str | torch.device, max_num_seqs: int = 64, max_model_len: int = 4096,
                 enforce_eager: bool = True):
        self.model = model
        self.kv = kv
        self.slots = slots
        self.block_size = block_size
        self.device = torch.device(device)
        self.buckets = batch_buckets(max_num_seqs)
        self.max_blocks = -(-max_model_len // block_size)
        self.scratch_block = kv.scratch_block
        # Row 0 is the padding rows' table: every entry is the scratch block.
        self.tables = torch.full((2 * max_num_seqs + 1, self.max_blocks), self.scratch_block, dtype=torch.long,
                                 device=device)
        self._free_rows = list(range(self.tables.shape[0] - 1, 0, -1))
        self._row_of: dict[int, list] = {}  # seq_id -> [table row, blocks synced, the block_table list synced]
        self.buffers = DecodeBuffers(self.buckets[-1], device)
        self.use_graphs = self.device.type == "cuda" and not enforce_eager
        self._graphs: dict[tuple[int, int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._graph_pool = None
        self.num_decode_steps = 0  # steps that went through the static buffers

    # -- persistent block tables ------------------------------------------------------------------
    def _sync_tables(self, seqs: list[Sequence]) -> None:
        """Write blocks allocated since the last step into each sequence's device table row."""
        rows, cols, blocks = [], [], []
        for seq in seqs:
            st = self._row_of.get(seq.seq_id)
            if st is None:
                if not self._free_rows:
                    raise RuntimeError("no free block-table row: more live sequences than 2 * max_num_seqs")
                st = self._row_of[seq.seq_id] = [self._free_rows.pop(), 0, None]
            table = seq.block_table
            if st[2] is not table or st[1] > len(table):  # preempted (a new list) or shrunk: rewrite it
                st[1], st[2] = 0, table
            for c in range(st[1], len(table)):
                rows.append(st[0])
                cols.append(c)
                blocks.append(table[c])
            st[1] = len(table)
        if rows:
            idx = torch.tensor([rows, cols, blocks], dtype=torch.long).to(self.device, non_blocking=True)
            self.tables.index_put_((idx[0], idx[1]), idx[2])

    def release(self, seq: Sequence) -> None:
        """The sequence ended: its table row is free again."""
        st = self._row_of.pop(seq.seq_id, None)
        if st is not None:
            self.tables[st[0]].fill_(self.scratch_block)
            self._free_rows.append(st[0])

    # -- steps ----------------------------------------------------------------------------------------
    def run(self, batch: ScheduledBatch) -> tuple[torch.Tensor, list[Sequence]]:
        """Compute the batch's new tokens; return logits [S, vocab] for the S sequences that now sample."""
        self._sync_tables(batch.seqs)
        if self.is_decode(batch):
            logits = self.run_decode(batch)
            caught_up = [i for i, s in enumerate(batch.seqs) if s.num_computed_tokens + 1 == s.num_tokens]
            if len(caught_up) < len(batch.seqs):  # a prompt chunk of one token: it does not sample yet
                logits = logits.index_select(0, torch.tensor(caught_up, dtype=torch.long).to(self.device))
            return logits, [batch.seqs[i] for i in caught_up]
        return self.run_eager(batch)

    def is_decode(self, batch: ScheduledBatch) -> bool:
        return (len(batch.seqs) <= self.buckets[-1] and all(n == 1 for n in batch.num_new_tokens)
                and not any(s.image_embeds is not None and s.num_computed_tokens < s.num_prompt_tokens
                            for s in batch.seqs))

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def context_bucket(self, max_len: int) -> int:
        """Blocks of context the decode attention reads, capped at the table width: with CUDA graphs a
        power of two (>= 4), which bounds the graphs captured; without them exactly the longest row's
        blocks, since every padded block is gathered and attended for each row."""
        nb = -(-max_len // self.block_size)
        if not self.use_graphs:
            return min(self.max_blocks, nb)
        return min(self.max_blocks, max(4, 1 << (nb - 1).bit_length()))

    def run_decode(self, batch: ScheduledBatch) -> torch.Tensor:
        n = len(batch.seqs)
        B = self.bucket(n)
        bs = self.block_size
        ids, pos, slot_mapping, lens, rows, lora = [], [[], [], []], [], [], [], []
        for seq in batch.seqs:
            p = seq.num_computed_tokens
            ids.append(seq.token_at(p))
            L = seq.num_prompt_tokens
            if seq.prompt_positions is None:
                xyz = (p, p, p)
            elif p < L:
                xyz = seq.prompt_positions[:, p].tolist()
            else:
                xyz = (p + seq.rope_delta,) * 3
            for k in range(3):
                pos[k].append(xyz[k])
            slot_mapping.append(seq.block_table[p // bs] * bs + p % bs)
            lens.append(p + 1)
            rows.append(self._row_of[seq.seq_id][0])
            lora.append(seq.adapter_slot)
        nbk = self.context_bucket(max(lens))
        self.buffers.fill(self._padded([ids, *pos, slot_mapping, lens, rows, lora], B))
        use_lora = self.slots is not None and any(s >= 0 for s in lora)
        self.num_decode_steps += 1
        if self.use_graphs:
            graph, out = self._graph(B, nbk, use_lora)
            graph.replay()
            return out[:n]
        return self.decode_forward(B, nbk, use_lora)[:n]

    def _padded(self, fields: list[list[int]], B: int) -> list[list[int]]:
        """Each field padded to the buffer size: rows beyond the batch write and read the scratch block."""
        size = self.buffers.size
        pad_values = (0, 0, 0, 0, self.scratch_block * self.block_size, 1, 0, -1)
        return [f + [v] * (size - len(f)) for f, v in zip(fields, pad_values)]

    def decode_forward(self, B: int, nbk: int, use_lora: bool) -> torch.Tensor:
        """The decode forward over the first B rows of the static buffers (device ops only)."""
        buf = self.buffers
        table = self.tables.index_select(0, buf.table_rows[:B])[:, :nbk]
        kv_index, mask = decode_index(table, buf.seq_lens[:B], self.block_size)
        meta = AttentionMetadata(buf.slot_mapping[:B], None, kv_index, mask, [])
        lora = LoRABatch.for_slots(buf.lora_slots[:B]) if use_lora else None
        return self.model(buf.ids[:B], buf.positions[:, :B], meta, self.kv.k_flat, self.kv.v_flat, slots=self.slots, lora=lora)

    def _graph(self, B: int, nbk: int, use_lora: bool):
        key = (B, nbk, use_lora)
        entry = self._graphs.get(key)
        if entry is None:
            self.decode_forward(B, nbk, use_lora)  # warm-up (allocations, kernel selection) on the real inputs
            torch.cuda.synchronize(self.device)
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._graph_pool):
                out = self.decode_forward(B, nbk, use_lora)
            entry = self._graphs[key] = (graph, out)
        return entry

    def capture(self, context_tokens: int = 1024) -> None:
        """Capture the decode graphs for every batch bucket (largest first, one memory pool) at
        `context_tokens` of context, with and without LoRA; other context buckets are captured on first use."""
        if not self.use_graphs:
            return
        nbk = self.context_bucket(context_tokens)
        self.buffers.fill(self._padded([[]] * 8, 0))
        for B in reversed(self.buckets):
            for use_lora in ((False, True) if self.slots is not None else (False,)):
                self._graph(B, nbk, use_lora)

    def run_eager(self, batch: ScheduledBatch) -> tuple[torch.Tensor, list[Sequence]]:
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
        lora = LoRABatch.build(lora_idx, dev) if self.slots is not None else None
        logits = self.model(
            torch.tensor(ids, dtype=torch.long).to(dev),
            torch.cat(pos, dim=1).to(dev),
            meta, self.kv.k_flat, self.kv.v_flat,
            image_rows=torch.cat(img_rows).to(dev) if img_rows else None,
            image_embeds=torch.cat(img_embeds).to(dev) if img_embeds else None,
            slots=self.slots, lora=lora,
            logits_rows=torch.tensor(logit_rows, dtype=torch.long).to(dev),
        )
        return logits, samplers
