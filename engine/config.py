"""Engine configuration: one dataclass, checked once at construction."""

from __future__ import annotations

from dataclasses import dataclass, field

LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(slots=True)
class EngineConfig:
    model_dir: str
    device: str = "cpu"
    dtype: str = "float32"  # "bfloat16" / "float16" on GPUs
    block_size: int = 16  # tokens per KV block
    kv_cache_memory_bytes: int = 64 * 2**20  # the KV pool is sized from this budget at start
    num_kv_blocks: int | None = None  # overrides the byte budget (tests force small pools with it)
    max_num_seqs: int = 64  # sequences in one step
    max_num_batched_tokens: int = 2048  # tokens in one step (prefill chunks + decodes)
    max_model_len: int | None = None  # prompt + output; default: the checkpoint's max positions
    max_loras: int = 8  # adapter slots resident in the engine
    max_lora_rank: int = 16
    lora_target_modules: tuple[str, ...] = field(default=LORA_TARGET_MODULES)
    enforce_eager: bool = False  # True: never capture CUDA graphs (decode still uses the static buffers)
    max_grammars: int = 64  # compiled structured-output grammars kept (least recently used evicted)

    def __post_init__(self):
        if self.max_grammars < 1:
            raise ValueError(f"max_grammars must be >= 1, got {self.max_grammars}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs ({self.max_num_seqs})"
            )
        if self.max_loras < 0 or self.max_lora_rank < 1:
            raise ValueError(f"max_loras must be >= 0 and max_lora_rank >= 1, got {self.max_loras}, {self.max_lora_rank}")
        unknown = set(self.lora_target_modules) - set(LORA_TARGET_MODULES)
        if unknown:
            raise ValueError(f"lora_target_modules {sorted(unknown)} not supported; choose from {LORA_TARGET_MODULES}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
