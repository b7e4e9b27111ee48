"""Paged KV cache: a fixed pool of blocks and the block tables that sequences hold.

`KVBlockPool` is pure bookkeeping (no tensors) so the scheduler can be tested without a model;
`KVCache` owns the preallocated tensors the attention kernels read and write.
Blocks carry reference counts so prefix blocks can later be shared between sequences.
"""

from __future__ import annotations

from collections import deque

import torch


class KVBlockPool:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1:
            raise ValueError(f"the KV pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._ref = [0] * num_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def allocate(self, num_blocks: int) -> list[int]:
        if num_blocks > len(self._free):
            raise RuntimeError(f"KV pool exhausted: need {num_blocks} blocks, {len(self._free)} free")
        out = [self._free.popleft() for _ in range(num_blocks)]
        for b in out:
            self._ref[b] = 1
        return out

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            self._ref[b] -= 1
            if self._ref[b] < 0:
                raise RuntimeError(f"KV block {b} freed twice")
            if self._ref[b] == 0:
                self._free.append(b)

    def grow(self, block_table: list[int], num_tokens: int) -> bool:
        """Extend `block_table` in place to hold `num_tokens`; False (and no change) if the pool is short."""
        need = self.blocks_needed(num_tokens) - len(block_table)
        if need <= 0:
            return True
        if not self.can_allocate(need):
            return False
        block_table.extend(self.allocate(need))
        return True


class KVCache:
    """Per-layer key/value tensors `[num_blocks + 1, block_size, kv_heads, head_dim]`, allocated once.

    The extra block (`scratch_block`, never handed out by the pool) is where the padding rows of
    a static decode batch write and read, so they never touch a sequence's blocks.
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: str | torch.device):
        self.scratch_block = num_blocks
        shape = (num_blocks + 1, block_size, kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        # the same storage as [slots, kv_heads, head_dim], indexed by block * block_size + offset
        self.k_flat = [t.view(-1, kv_heads, head_dim) for t in self.k]
        self.v_flat = [t.view(-1, kv_heads, head_dim) for t in self.v]

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
