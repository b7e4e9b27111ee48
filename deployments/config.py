"""The application's configuration: one described pydantic model, the `args` of serve_config.yaml."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ReplicaConfig(_Strict):
    num_replicas: int = Field(1, ge=1, description="replicas of this deployment")
    num_cpus: float = Field(0.25, ge=0, description="logical CPUs each replica reserves")
    num_gpus: float | None = Field(
        None, ge=0, description="GPUs per replica; null = auto (a share of a GPU when the cluster has GPUs, else 0)")
    max_ongoing_requests: int = Field(256, ge=1, description="requests a replica accepts at once")
    max_queued_requests: int = Field(
        512, ge=-1, description="requests waiting for a replica before callers get 503 (-1 = unbounded)")


class EngineLimits(_Strict):
    max_num_seqs: int = Field(64, ge=1, description="sequences decoded together in one step")
    max_num_batched_tokens: int = Field(2048, ge=1, description="tokens (prefill chunks + decodes) per step")
    kv_cache_memory_mb: int = Field(256, ge=1, description="KV pool budget per Decoder replica, in MiB")
    block_size: int = Field(16, ge=1, description="tokens per KV block")
    max_model_len: int | None = Field(None, ge=16, description="prompt + completion limit; null = the model's")
    max_loras: int = Field(8, ge=0, description="adapters resident in engine slots per replica")
    max_lora_rank: int = Field(16, ge=1, description="largest LoRA rank served; smaller ranks are padded")
    max_waiting_requests: int = Field(
        256, ge=0, description="requests queued inside a Decoder replica before new ones get 503")


class ImageLimits(_Strict):
    allow_http: bool = Field(True, description="fetch http(s) image URLs")
    http_timeout_s: float = Field(10.0, gt=0)
    max_image_bytes: int = Field(20 * 2**20, gt=0)
    max_image_pixels: int = Field(64 * 2**20, gt=0, description="decompression-bomb guard, checked before decoding")
    allowed_local_dirs: list[str] = Field(default_factory=list, description="directories local image paths may read")


class AppConfig(_Strict):
    model_dir: str = Field("models/tiny", description="checkpoint folder (HF layout)")
    generate_tiny_model_if_missing: bool = Field(
        True, description="write the embedded tiny model to model_dir on first start if it is not there")
    served_model_name: str | None = Field(None, description="`model` name of the base; default: model_dir's name")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto = bfloat16 on GPU, float32 on CPU")
    engine: EngineLimits = Field(default_factory=EngineLimits)
    images: ImageLimits = Field(default_factory=ImageLimits)
    default_max_tokens: int = Field(256, ge=1, description="completion limit when a request gives none")
    stream_interval_ms: float = Field(
        50.0, ge=0, description="a stream's first token goes at once, then at most one batch of tokens per this "
                                "many ms (and at once when it finishes); 0 = one item per engine step")
    vision_cache_mb: int = Field(256, ge=0, description="image-embedding cache per VisionEncoder replica")
    api_keys_env: str = Field("VLORA_API_KEYS", description="env var with comma-separated API keys; unset = open")
    admin_keys_env: str = Field("VLORA_ADMIN_KEYS", description="env var with admin keys for /v1/adapters routes")
    adapter_store_dir: str = Field("adapter_store", description="where the AdapterStore persists adapters")
    adapter_retention: int = Field(5, ge=1, description="versions kept per adapter (the current one always)")
    adapter_load_dirs: list[str] = Field(
        default_factory=list, description="directories POST /v1/adapters may load PEFT folders from")
    preprocessor: ReplicaConfig = Field(default_factory=lambda: ReplicaConfig(num_replicas=2))
    vision_encoder: ReplicaConfig = Field(default_factory=ReplicaConfig)
    decoder: ReplicaConfig = Field(default_factory=ReplicaConfig)
    ingress: ReplicaConfig = Field(default_factory=ReplicaConfig)
    trainer: ReplicaConfig = Field(default_factory=ReplicaConfig, description="online learning (one replica)")

    @property
    def model_name(self) -> str:
        return self.served_model_name or os.path.basename(os.path.normpath(self.model_dir))

    def keys(self, which: Literal["api", "admin"]) -> frozenset[str]:
        raw = os.environ.get(self.api_keys_env if which == "api" else self.admin_keys_env, "")
        return frozenset(k.strip() for k in raw.split(",") if k.strip())
