"""Vision encoder: pixel patches -> image embeddings, with only the vision tower in memory.

The vision-encoder deployment needs the ViT (about 0.7B parameters for Qwen2.5-VL-7B), not the
7B language model, so this reads just the `visual.*` tensors out of the checkpoint's safetensors
files and puts them into HF's own vision tower module; results therefore match
`Qwen2_5_VLModel.get_image_features` exactly.
"""

from __future__ import annotations

import contextlib
import os

import torch

from engine.weights import iter_tensors

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


def _skip_weight_init():
    """Random init of weights about to be overwritten is wasted seconds on a 0.7B tower."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


class VisionEncoder:
    """Qwen2.5-VL's vision tower: a batch of images in one forward, one embedding tensor per image."""

    def __init__(self, visual: torch.nn.Module, spatial_merge_size: int, patch_dim: int):
        self.visual = visual.eval()
        self.spatial_merge_size = spatial_merge_size
        self.patch_dim = patch_dim  # channels * temporal_patch * patch * patch = 1176

    @classmethod
    def from_pretrained(
        cls, model_dir: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> "VisionEncoder":
        from transformers import Qwen2_5_VLConfig
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

        vision_config = Qwen2_5_VLConfig.from_pretrained(model_dir).vision_config
        vision_config._attn_implementation = "sdpa"
        with _skip_weight_init(), torch.device(device):
            visual = Qwen2_5_VisionTransformerPretrainedModel._from_config(
                vision_config, attn_implementation="sdpa", dtype=dtype
            )
        state = load_vision_state_dict(model_dir, device=device)
        missing, unexpected = visual.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"vision weights in {model_dir} do not fit the vision tower: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        visual.to(device=device, dtype=dtype)
        patch_dim = vision_config.in_channels * vision_config.temporal_patch_size * vision_config.patch_size**2
        return cls(visual, vision_config.spatial_merge_size, patch_dim)

    @property
    def device(self) -> torch.device:
        return next(self.visual.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.visual.parameters()).dtype

    def num_image_tokens(self, grid: tuple[int, int, int]) -> int:
        t, h, w = grid
        return (t * h * w) // self.spatial_merge_size**2

    def encode(self, pixel_values_list: list[torch.Tensor], grids: list[tuple[int, int, int]]) -> list[torch.Tensor]:
        """Embed all images in ONE forward: [n_i, 1176] patches -> [n_i / merge^2, out_hidden] each.

        Attention is block-diagonal per image inside the tower, so batching changes only speed,
        not results. Outputs stay on the encoder's device.
        """
        if len(pixel_values_list) != len(grids):
            raise ValueError(f"{len(pixel_values_list)} pixel tensors but {len(grids)} grids")
        if not grids:
            return []
        for i, (pixels, grid) in enumerate(zip(pixel_values_list, grids)):
            t, h, w = grid
            if pixels.dim() != 2 or pixels.shape[0] != t * h * w or pixels.shape[1] != self.patch_dim:
                raise ValueError(
                    f"image {i}: pixel patches {tuple(pixels.shape)} do not match grid {tuple(grid)} "
                    f"(expected [{t * h * w}, {self.patch_dim}])"
                )
        with torch.inference_mode():
            pixels = torch.cat([p.to(device=self.device, dtype=self.dtype) for p in pixel_values_list])
            grid_thw = torch.tensor([list(g) for g in grids], dtype=torch.long, device=self.device)
            output = self.visual(pixels, grid_thw=grid_thw)
            # transformers 5 returns a ModelOutput whose pooler_output is the merged embedding;
            # older versions return the merged tensor itself.
            embeddings = getattr(output, "pooler_output", output)
            return list(torch.split(embeddings, [self.num_image_tokens(g) for g in grids]))
