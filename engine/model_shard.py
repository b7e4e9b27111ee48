"""What one rank holds: its model shard, its KV cache and its LoRA slots, built from the engine config.

The engine (rank 0) and every tensor-parallel worker build theirs with this one function, so
the KV pool has the same number of blocks on every rank (rank 0's scheduler hands out block
ids that every rank's cache must have) and the slots have the same layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlora.engine.config import LORA_TARGET_MODULES, EngineConfig
from vlora.engine.kv_cache import KVCache
from vlora.engine.lora import AdapterSlots
from vlora.engine.model import QwenTextModel
from vlora.engine.tp import TPGroup


@dataclass(slots=True)
class ModelShard:
    model: QwenTextModel
    kv: KVCache
    slots: AdapterSlots | None
    num_blocks: int
    max_model_len: int


def load_model_shard(config: EngineConfig, tp: TPGroup | None = None) -> ModelShard:
    """Weights (this rank's slices only), a KV pool sized from the per-device budget for this rank's
    KV heads, and sharded LoRA slots."""
    dtype = getattr(torch, config.dtype)
    model = QwenTextModel.from_pretrained(config.model_dir, config.device, dtype, tp=tp)
    mc = model.cfg
    kv_heads = model.layers[0].num_kv_heads  # this rank's share
    bpb = KVCache.bytes_per_block(mc.num_layers, config.block_size, kv_heads, mc.head_dim, dtype)
    num_blocks = config.num_kv_blocks or max(1, config.kv_cache_memory_bytes // bpb)
    kv = KVCache(mc.num_layers, num_blocks, config.block_size, kv_heads, mc.head_dim, dtype, config.device)
    out_sizes = {m: o for (_, m), (_, o) in mc.lora_module_shapes(LORA_TARGET_MODULES).items()}
    slots = (AdapterSlots(config.max_loras, config.max_lora_rank, mc.lora_module_shapes(config.lora_target_modules),
                          dtype, config.device, out_sizes=out_sizes, plan=model.plan)
             if config.max_loras > 0 else None)
    max_model_len = min(config.max_model_len or mc.max_position_embeddings, num_blocks * config.block_size)
    model.rope.ensure(max_model_len + 1)
    return ModelShard(model, kv, slots, num_blocks, max_model_len)
