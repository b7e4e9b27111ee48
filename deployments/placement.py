"""Where a replica runs: GPU when the cluster has one (and the replica was given one), else CPU."""

from __future__ import annotations

from vlora.deployments.config import AppConfig, ReplicaConfig


def resolve_device_dtype(config: AppConfig) -> tuple[str, str]:
    """Inside a replica: the torch device and dtype to use."""
    import torch

    if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()):
        device = "cuda"
    else:
        device = "cpu"
    dtype = config.dtype if config.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    return device, dtype


def actor_options(replica: ReplicaConfig, gpu_share: float, tensor_parallel_size: int = 1) -> dict:
    """ray_actor_options for a deployment: the configured GPUs, or `gpu_share` when left on auto (a whole
    GPU per rank for a tensor-parallel replica on a GPU cluster)."""
    gpus = replica.num_gpus if replica.num_gpus is not None else gpu_share
    if tensor_parallel_size > 1 and replica.num_gpus is None and gpu_share > 0:
        gpus = 1.0
    opts: dict = {"num_cpus": replica.num_cpus}
    if gpus:
        opts["num_gpus"] = gpus
    return opts


def gpu_shares(config: AppConfig, cluster_gpus: float) -> dict[str, float]:
    """Auto GPU split: a tenth of a GPU per vision-encoder replica, a fifth for the trainer, decoders share the rest."""
    if cluster_gpus <= 0 or config.device == "cpu":
        return {"vision_encoder": 0.0, "trainer": 0.0, "decoder": 0.0}
    vision, trainer = 0.1, 0.2
    left = cluster_gpus - vision * config.vision_encoder.max_replicas - trainer * config.trainer.num_replicas
    return {"vision_encoder": vision, "trainer": trainer,  # autoscaled: room for the most replicas
            "decoder": max(0.1, min(1.0, left / config.decoder.max_replicas))}
