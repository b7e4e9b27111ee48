"""Vision encoder: pixel patches -> image embeddings, with only the vision tower in memory.

The vision-encoder deployment needs the ViT (about 0.7B parameters for Qwen2.5-VL-7B), not the
7B language model, so this reads just the `visual.*` tensors out of the checkpoint's safetensors
files into our own tower (engine/vision_tower.py: one attention call per layer for the whole
batch). HF's `Qwen2_5_VLModel.get_image_features` is its test oracle.
"""

from __future__ import annotations

import os

import torch

from vlora.engine.vision_tower import VisionConfig, VisionTower
from vlora.engine.weights import iter_tensors

# Transformers 5 saves the tower under `model.visual.`; checkpoints saved by 4.x (the hub's
# Qwen2.5-VL-*-Instruct) use `visual.`.
VISION_KEY_PREFIXES = ("model.visual.", "visual.")


def load_vision_state_dict(model_dir: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Vision tower tensors only, keyed as the tower module names them (prefix stripped)."""
    state: dict[str, torch.Tensor] = {}
    for key, tensor in iter_tensors(model_dir, lambda name: name.startswith(VISION_KEY_PREFIXES)):
        prefix = next(p for p in VISION_KEY_PREFIXES if key.startswith(p))
        state[key[len(prefix):]] = tensor.to(device)
    if not state:
        raise ValueError(f"no vision tower weights ({' or '.join(VISION_KEY_PREFIXES)}*) found in {model_dir}")
    return state


class VisionEncoder:
    """Qwen2.5-VL's vision tower: a batch of images in one forward, one embedding tensor per image."""

    def __init__(self, tower: VisionTower):
        self.tower = tower.eval()
        self.cfg = tower.cfg
        self.spatial_merge_size = tower.cfg.spatial_merge_size
        self.patch_dim = tower.cfg.patch_dim  # channels * temporal_patch * patch * patch = 1176
        self.num_forwards = 0  # tower forwards run (each may hold many images)
        self.num_images = 0  # images encoded

    @classmethod
    def from_pretrained(
        cls, model_dir: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> "VisionEncoder":
        cfg = VisionConfig.from_pretrained(model_dir)
        with torch.device("meta"):
            tower = VisionTower(cfg)
        tower = tower.to_empty(device=device).to(dtype)
        tower.load_checkpoint_state(load_vision_state_dict(model_dir, device=device))
        return cls(tower)

    @property
    def device(self) -> torch.device:
        return self.tower.patch_embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.tower.patch_embed.weight.dtype

    def num_image_tokens(self, grid: tuple[int, int, int]) -> int:
        t, h, w = grid
        return (t * h * w) // self.spatial_merge_size**2

    def check_inputs(self, pixel_values_list: list[torch.Tensor], grids: list[tuple[int, int, int]]) -> None:
        """ValueError saying what is wrong unless each image's patches fit its grid."""
        if len(pixel_values_list) != len(grids):
            raise ValueError(f"{len(pixel_values_list)} pixel tensors but {len(grids)} grids")
        m = self.spatial_merge_size
        for i, (pixels, grid) in enumerate(zip(pixel_values_list, grids)):
            t, h, w = grid
            if pixels.dim() != 2 or pixels.shape[0] != t * h * w or pixels.shape[1] != self.patch_dim:
                raise ValueError(
                    f"image {i}: pixel patches {tuple(pixels.shape)} do not match grid {tuple(grid)} "
                    f"(expected [{t * h * w}, {self.patch_dim}])"
                )
            if h % m or w % m:
                raise ValueError(f"image {i}: grid {tuple(grid)} height and width must be multiples of {m}")

    def encode(self, pixel_values_list: list[torch.Tensor], grids: list[tuple[int, int, int]]) -> list[torch.Tensor]:
        """Embed all images in ONE forward: [n_i, 1176] patches -> [n_i / merge^2, out_hidden] each.

        Attention is block-diagonal per image inside the tower, so batching changes only speed,
        not results. Outputs stay on the encoder's device, in its dtype.
        """
        self.check_inputs(pixel_values_list, grids)
        if not grids:
            return []
        with torch.inference_mode():
            batch = self.tower.plan(list(grids))
            pixels = [p.to(device=self.device, dtype=self.dtype) for p in pixel_values_list]
            pixels = pixels[0] if len(pixels) == 1 else torch.cat(pixels)
            embeddings = self.tower(pixels, batch)
        self.num_forwards += 1
        self.num_images += len(grids)
        return list(torch.split(embeddings, list(batch.num_tokens)))
