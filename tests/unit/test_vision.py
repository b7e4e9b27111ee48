"""VisionEncoder against HF's own image features, batched and one image at a time."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from engine.vision import VisionEncoder

TOL = 1e-5


@pytest.fixture(scope="module")
def encoder(tiny_model_dir):
    return VisionEncoder.from_pretrained(tiny_model_dir)


def processed(hf_image_processor, sizes):
    """HF-preprocessed random images: (pixel_values [sum n_i, 1176], grid_thw [k, 3], per-image list)."""
    rng = np.random.RandomState(1)
    images = [Image.fromarray(rng.randint(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
    out = hf_image_processor(images=images, return_tensors="pt")
    grid_thw = out["image_grid_thw"]
    per_image = list(torch.split(out["pixel_values"], grid_thw.prod(-1).tolist()))
    return out["pixel_values"], grid_thw, per_image


def hf_features(hf_model, pixel_values, grid_thw) -> list[torch.Tensor]:
    with torch.no_grad():
        out = hf_model.model.get_image_features(pixel_values, grid_thw)
    features = out.pooler_output if hasattr(out, "pooler_output") else out
    return list(features)


def assert_close(ours: list[torch.Tensor], ref: list[torch.Tensor], grids, hidden):
    assert len(ours) == len(ref) == len(grids)
    for emb, expected, (t, h, w) in zip(ours, ref, grids):
        assert emb.shape == (t * h * w // 4, hidden)
        assert (emb - expected).abs().max().item() <= TOL


def test_one_image_matches_hf(encoder, hf_model, hf_image_processor):
    pixel_values, grid_thw, per_image = processed(hf_image_processor, [(100, 150)])
    grids = [tuple(g) for g in grid_thw.tolist()]
    ours = encoder.encode(per_image, grids)
    assert_close(ours, hf_features(hf_model, pixel_values, grid_thw), grids, hf_model.config.text_config.hidden_size)


def test_three_images_in_one_call_match_hf(encoder, hf_model, hf_image_processor):
    pixel_values, grid_thw, per_image = processed(hf_image_processor, [(300, 200), (56, 56), (224, 112)])
    grids = [tuple(g) for g in grid_thw.tolist()]
    assert len(set(grids)) == 3
    ours = encoder.encode(per_image, grids)
    assert_close(ours, hf_features(hf_model, pixel_values, grid_thw), grids, hf_model.config.text_config.hidden_size)


def test_batched_equals_one_at_a_time(encoder, hf_image_processor):
    _, grid_thw, per_image = processed(hf_image_processor, [(300, 200), (56, 56), (224, 112)])
    grids = [tuple(g) for g in grid_thw.tolist()]
    batched = encoder.encode(per_image, grids)
    for pixels, grid, emb in zip(per_image, grids, batched):
        (alone,) = encoder.encode([pixels], [grid])
        assert (alone - emb).abs().max().item() <= TOL


def test_holds_only_the_vision_tower(encoder, hf_model):
    ours = sum(p.numel() for p in encoder.visual.parameters())
    assert ours == sum(p.numel() for p in hf_model.model.visual.parameters())
    assert ours < sum(p.numel() for p in hf_model.parameters())
    assert encoder.visual.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("vision_prefix", ["model.visual.", "visual."])
def test_loads_sharded_checkpoints_with_either_prefix(tmp_path, tiny_model_dir, encoder, hf_image_processor, vision_prefix):
    """Hub checkpoints are sharded with an index, and 4.x-saved ones name the tower `visual.`."""
    state = load_file(str(tiny_model_dir / "model.safetensors"))
    renamed = {
        (vision_prefix + k[len("model.visual.") :] if k.startswith("model.visual.") else k): v for k, v in state.items()
    }
    keys = sorted(renamed)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    weight_map = {}
    for name, shard_keys in shards.items():
        save_file({k: renamed[k].contiguous() for k in shard_keys}, str(tmp_path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard_keys})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp_path / "config.json").write_text((tiny_model_dir / "config.json").read_text())

    sharded = VisionEncoder.from_pretrained(tmp_path)
    _, grid_thw, per_image = processed(hf_image_processor, [(100, 150), (56, 56)])
    grids = [tuple(g) for g in grid_thw.tolist()]
    for a, b in zip(sharded.encode(per_image, grids), encoder.encode(per_image, grids)):
        assert torch.equal(a, b)


def test_rejects_pixels_that_do_not_match_the_grid(encoder):
    with pytest.raises(ValueError, match=r"pixel patches \(10, 1176\) do not match grid \(1, 4, 4\)"):
        encoder.encode([torch.zeros(10, 1176)], [(1, 4, 4)])
    with pytest.raises(ValueError, match="1 pixel tensors but 2 grids"):
        encoder.encode([torch.zeros(16, 1176)], [(1, 4, 4), (1, 4, 4)])
    assert encoder.encode([], []) == []
