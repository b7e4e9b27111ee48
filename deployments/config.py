"""The application's configuration: one described pydantic model, the `args` of serve_config.yaml."""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


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
    health_check_period_s: float = Field(
        10.0, gt=0, description="how often Serve runs each replica's health check (a failed one is replaced)")
    autoscaling_config: dict[str, Any] | None = Field(
        None, description="Serve's autoscaling_config, passed through as is (min_replicas, max_replicas, "
                          "target_ongoing_requests, upscale_delay_s, downscale_delay_s, ...); replaces "
                          "num_replicas. Serve scales on the requests queued and running per replica")

    @field_validator("autoscaling_config")
    @classmethod
    def _check_autoscaling(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        """Serve's own model checks it here, so a bad key fails at build time with Serve's message."""
        if v is not None:
            from ray.serve.config import AutoscalingConfig

            unknown = sorted(set(v) - set(AutoscalingConfig.model_fields))
            if unknown:  # Serve would ignore them silently
                raise ValueError(f"unknown autoscaling_config keys {unknown}; Serve's are "
                                 f"{sorted(AutoscalingConfig.model_fields)}")
            AutoscalingConfig(**v)
        return v

    @property
    def min_replicas(self) -> int:
        """Replicas that must run for the deployment to count as healthy."""
        if self.autoscaling_config is None:
            return self.num_replicas
        return int(self.autoscaling_config.get("min_replicas", 1))

    @property
    def max_replicas(self) -> int:
        if self.autoscaling_config is None:
            return self.num_replicas
        return int(self.autoscaling_config.get("max_replicas", 1))


class VisionEncoderConfig(ReplicaConfig):
    max_batch_size: int = Field(
        8, ge=1, description="requests (Serve @serve.batch) whose images are encoded together in one tower forward")
    batch_wait_timeout_s: float = Field(
        0.0, ge=0, description="how long a request waits for others to join its batch; 0 = take only those already "
                               "queued (requests arriving during a forward join the next one)")
    max_batch_patches: int = Field(
        32768, ge=1, description="patches per tower forward (a 448x448 image has 1024); a batch over this runs as "
                                 "several forwards, an image over it alone")


class EngineLimits(_Strict):
    max_num_seqs: int = Field(64, ge=1, description="sequences decoded together in one step")
    max_num_batched_tokens: int = Field(2048, ge=1, description="tokens (prefill chunks + decodes) per step")
    kv_cache_memory_mb: int = Field(256, ge=1, description="KV pool budget per Decoder replica (per device of a tensor-parallel one), in MiB")
    block_size: int = Field(16, ge=1, description="tokens per KV block")
    max_model_len: int | None = Field(None, ge=16, description="prompt + completion limit; null = the model's")
    max_loras: int = Field(8, ge=0, description="adapters resident in engine slots per replica")
    max_lora_rank: int = Field(16, ge=1, description="largest LoRA rank served; smaller ranks are padded")
    max_waiting_requests: int = Field(
        256, ge=0, description="requests queued inside a Decoder replica before new ones get 503")
    enforce_eager: bool = Field(
        False, description="never capture CUDA graphs for decode steps (GPU only; for debugging or profiling)")
    engine_process: bool = Field(
        True, description="run the engine loop in a child process of the Decoder replica (vLLM v1's engine core), "
                          "so it shares no GIL with Serve's per-request work; false = a thread of the replica")
    max_grammars: int = Field(
        64, ge=1, description="compiled structured-output grammars kept per replica (least recently used evicted)")
    tensor_parallel_size: int = Field(
        1, ge=1, description="devices one Decoder replica spans (Megatron tensor parallelism): the replica is rank 0 "
                             "and starts N-1 worker actors, all placed on one node (STRICT_PACK); must divide the "
                             "model's attention and KV heads")


class ImageLimits(_Strict):
    allow_http: bool = Field(True, description="fetch http(s) image URLs (public addresses only, see allowed_*)")
    http_timeout_s: float = Field(10.0, gt=0, description="whole-download limit for one image URL")
    max_redirects: int = Field(3, ge=0, description="redirect hops followed per image URL, each re-checked")
    allowed_hosts: list[str] = Field(
        default_factory=list, description="host names fetched even when they resolve to internal addresses "
                                          "(exact, or '.example.com' for subdomains); for internal image hosts")
    allowed_networks: list[str] = Field(
        default_factory=list, description="internal networks image URLs may reach (CIDR, e.g. 10.1.0.0/16)")
    max_image_bytes: int = Field(20 * 2**20, gt=0, description="encoded bytes per image")
    max_image_pixels: int = Field(
        16 * 2**20, gt=0, description="pixels per image (decompression-bomb guard), read from the header before decoding")
    max_images_per_request: int = Field(
        16, ge=0, description="image parts per request, teacher messages included (like vLLM's limit_mm_per_prompt)")
    max_total_pixels: int = Field(
        64 * 2**20, gt=0, description="pixels of all images of one request together, read from the headers")
    allowed_local_dirs: list[str] = Field(default_factory=list, description="directories local image paths may read")


class RequestLimits(_Strict):
    """What one request may ask for; each limit is answered with OpenAI error JSON."""

    max_body_bytes: int = Field(32 * 2**20, gt=0, description="request body size; larger bodies get 413")
    max_json_depth: int = Field(32, ge=2, description="nesting of the JSON body; deeper bodies get 400")
    max_stop_token_ids: int = Field(64, ge=0, description="entries of stop_token_ids (each must be a vocabulary id)")
    max_stop_string_chars: int = Field(256, ge=1, description="characters per stop string")
    max_learn_examples: int = Field(1000, ge=1, description="examples per learn call")
    max_learn_steps: int = Field(1000, ge=0, description="optimizer steps per learn call")
    max_learn_tokens: int = Field(262144, ge=1, description="tokens of all examples of one learn call together")
    max_adapter_file_bytes: int = Field(2 * 2**30, gt=0, description="size of each file of a loaded adapter folder")
    first_token_timeout_s: float = Field(
        300.0, gt=0, description="a streamed request with no first output by then is aborted with 504 "
                                "(a non-streamed one is bound by request_timeout_s)")
    request_timeout_s: float = Field(1800.0, gt=0, description="a request still generating by then is aborted (504)")
    admin_timeout_s: float = Field(
        180.0, gt=0, description="adapter store calls (load, delete, rollback, list) give 504 after this long")
    learn_timeout_s: float = Field(
        3600.0, gt=0, description="a synchronous learn call answers 504 after this long (async jobs keep running)")


class StartupAdapter(_Strict):
    """An adapter registered when the application starts (vLLM's --lora-modules name=path)."""

    name: str = Field(description="the model name it is served as")
    path: str = Field(description="PEFT folder: a local path (relative to where the app is built) or an fsspec "
                                  "URI (s3://, gs://, hf://, ...; the protocol's fsspec package installed)")


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
    limits: RequestLimits = Field(default_factory=RequestLimits)
    default_max_tokens: int = Field(256, ge=1, description="completion limit when a request gives none")
    stream_interval_ms: float = Field(
        50.0, ge=0, description="a stream's first token goes at once, then one batch of tokens per this many ms, "
                                "on a clock all of a Decoder's streams share (and at once when it finishes); "
                                "0 = one item per engine step")
    vision_cache_mb: int = Field(256, ge=0, description="image-embedding cache per VisionEncoder replica")
    api_keys_env: str = Field("VLORA_API_KEYS", description="env var with comma-separated API keys; unset = open")
    admin_keys_env: str = Field(
        "VLORA_ADMIN_KEYS", description="env var with admin keys for the adapter and learn routes; API keys never "
                                        "work there. Unset = admin routes answer 403 (unless admin_open)")
    admin_open: bool = Field(
        False, description="let anyone use the admin routes when no admin keys are set; only for a server bound "
                           "to 127.0.0.1 (the tiny local serve_config.yaml)")
    adapter_store_dir: str = Field("adapter_store", description="where the AdapterStore persists adapters")
    adapter_retention: int = Field(5, ge=1, description="versions kept per adapter (the current one always)")
    adapter_cache_mb: float = Field(
        1024, gt=0, description="host copies of adapters per Decoder replica (fetched from the store on first use, "
                                "least recently used dropped first); the engine's slots are max_loras")
    adapter_ack_timeout_s: float = Field(
        60.0, gt=0, description="a publish (load, learn, rollback, delete) waits this long for the Decoder replicas "
                                "holding the adapter to confirm, then answers 504 naming the ones behind")
    learn_job_ttl_s: float = Field(3600.0, gt=0, description="finished learn jobs are kept this long (then 404)")
    adapter_load_dirs: list[str] = Field(
        default_factory=list, description="where POST /v1/adapters may load PEFT folders from: local directories "
                                          "and URI prefixes (s3://bucket/adapters, memory://x, ...)")
    adapters: list[StartupAdapter] = Field(
        default_factory=list, description="adapters registered at start-up (an unchanged one keeps its version)")
    preprocessor: ReplicaConfig = Field(default_factory=lambda: ReplicaConfig(num_replicas=2))
    vision_encoder: VisionEncoderConfig = Field(default_factory=VisionEncoderConfig)
    decoder: ReplicaConfig = Field(default_factory=ReplicaConfig)
    ingress: ReplicaConfig = Field(default_factory=ReplicaConfig)
    trainer: ReplicaConfig = Field(default_factory=ReplicaConfig, description="online learning (one replica)")
    learning: bool = Field(
        True, description="run the Trainer (online learning, one device holding the whole base model); false: no "
                          "Trainer replica, the learn routes answer 501 (e.g. a base model larger than one device; "
                          "adapters trained elsewhere still load and serve at any tensor_parallel_size)")

    @property
    def model_name(self) -> str:
        return self.served_model_name or os.path.basename(os.path.normpath(self.model_dir))

    def keys(self, which: Literal["api", "admin"]) -> frozenset[str]:
        raw = os.environ.get(self.api_keys_env if which == "api" else self.admin_keys_env, "")
        return frozenset(k.strip() for k in raw.split(",") if k.strip())
