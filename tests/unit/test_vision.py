"""Our vision tower (engine/vision_tower.py) against HF's own image features, batched and alone."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from vlora.engine import vision_tower
from vlora.engine.vision import VisionEncoder
from vlora.engine.vision_tower import VisionConfig, build_grid_layout, pad_groups

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


def hidden_size(hf_model) -> int:
    return hf_model.config.text_config.hidden_size


# (height, width) in pixels: square, wide, tall, odd-sized; 97x301 and 333x57 give merged grids
# that do not divide into whole 4x4 windows (partial windows on the right and bottom edges).
SHAPES = {
    "square_448": [(448, 448)],
    "wide": [(112, 560)],
    "tall": [(560, 112)],
    "odd": [(100, 150)],
    "partial_windows_97x301": [(97, 301)],
    "partial_windows_333x57": [(333, 57)],
    "one_window_56x56": [(56, 56)],
}


@pytest.mark.parametrize("sizes", list(SHAPES.values()), ids=list(SHAPES))
def test_one_image_matches_hf(encoder, hf_model, hf_image_processor, sizes):
    pixel_values, grid_thw, per_image = processed(hf_image_processor, sizes)
    grids = [tuple(g) for g in grid_thw.tolist()]
    ours = encoder.encode(per_image, grids)
    assert_close(ours, hf_features(hf_model, pixel_values, grid_thw), grids, hidden_size(hf_model))


def test_partial_window_grids_really_have_partial_windows(encoder, hf_image_processor):
    """The odd sizes above must exercise padding: some windows hold fewer than 4x4 merged patches."""
    for sizes in (SHAPES["partial_windows_97x301"], SHAPES["partial_windows_333x57"]):
        _, grid_thw, _ = processed(hf_image_processor, sizes)
        layout = encoder.tower.grid_layout(tuple(grid_thw[0].tolist()))
        full = (encoder.cfg.window_size // encoder.cfg.patch_size) ** 2  # 8x8 patches
        assert min(layout.window_lengths) < full and max(layout.window_lengths) <= full
        assert sum(layout.window_lengths) == layout.num_patches


def test_three_images_in_one_call_match_hf(encoder, hf_model, hf_image_processor):
    pixel_values, grid_thw, per_image = processed(hf_image_processor, [(300, 200), (56, 56), (224, 112)])
    grids = [tuple(g) for g in grid_thw.tolist()]
    assert len(set(grids)) == 3
    ours = encoder.encode(per_image, grids)
    assert_close(ours, hf_features(hf_model, pixel_values, grid_thw), grids, hidden_size(hf_model))


def test_mixed_batch_with_partial_windows_matches_hf(encoder, hf_model, hf_image_processor):
    """Six sizes in one forward: windows and images of different lengths, padded in the same call."""
    sizes = [(97, 301), (448, 448), (333, 57), (56, 56), (112, 560), (100, 150)]
    pixel_values, grid_thw, per_image = processed(hf_image_processor, sizes)
    grids = [tuple(g) for g in grid_thw.tolist()]
    ours = encoder.encode(per_image, grids)
    assert_close(ours, hf_features(hf_model, pixel_values, grid_thw), grids, hidden_size(hf_model))


def test_same_grid_twice_in_one_batch_matches_hf(encoder, hf_model, hf_image_processor):
    """Equal-sized images take the unpadded path for full attention (no mask)."""
    pixel_values, grid_thw, per_image = processed(hf_image_processor, [(224, 224), (224, 224)])
    grids = [tuple(g) for g in grid_thw.tolist()]
    ours = encoder.encode(per_image, grids)
    assert not torch.equal(ours[0], ours[1])
    assert_close(ours, hf_features(hf_model, pixel_values, grid_thw), grids, hidden_size(hf_model))


def test_batched_equals_one_at_a_time(encoder, hf_image_processor):
    _, grid_thw, per_image = processed(hf_image_processor, [(300, 200), (56, 56), (224, 112)])
    grids = [tuple(g) for g in grid_thw.tolist()]
    batched = encoder.encode(per_image, grids)
    for pixels, grid, emb in zip(per_image, grids, batched):
        (alone,) = encoder.encode([pixels], [grid])
        assert (alone - emb).abs().max().item() <= TOL


def test_holds_only_the_vision_tower(encoder, hf_model):
    ours = sum(p.numel() for p in encoder.tower.parameters())
    assert ours == sum(p.numel() for p in hf_model.model.visual.parameters())
    assert ours < sum(p.numel() for p in hf_model.parameters())
    # qkv stays one merged projection, as in the checkpoint
    assert encoder.tower.blocks[0].attn.qkv.weight.shape == (3 * encoder.cfg.hidden_size, encoder.cfg.hidden_size)


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


# -- no host syncs inside the forward ------------------------------------------------------------
SYNC_OPS = {"item", "_local_scalar_dense", "nonzero", "masked_select", "tolist", "is_nonzero", "__bool__",
            "__int__", "__float__", "__index__", "unique_consecutive", "repeat_interleave"}


class RecordSyncs(TorchFunctionMode):
    """Names of host-syncing tensor calls (Python level: .tolist(), .item(), bool(t), ...)."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name in SYNC_OPS:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


class RecordSyncOps(TorchDispatchMode):
    """Names of host-syncing aten ops (what .item() / boolean indexing become below Python)."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNC_OPS:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def syncs_during(fn) -> list[str]:
    with RecordSyncs() as f, RecordSyncOps() as d:
        fn()
    return f.seen + d.seen


def test_forward_has_no_host_syncs(encoder, hf_model, hf_image_processor):
    pixel_values, grid_thw, per_image = processed(hf_image_processor, [(97, 301), (448, 448), (56, 56)])
    grids = [tuple(g) for g in grid_thw.tolist()]
    batch = encoder.tower.plan(grids)  # the per-grid metadata: built on the host, before the forward
    with torch.inference_mode():
        assert syncs_during(lambda: encoder.tower(pixel_values, batch)) == []
        # the detector is not vacuous: HF's tower reads window sizes back to the host
        assert "tolist" in syncs_during(lambda: hf_model.model.visual(pixel_values, grid_thw=grid_thw))


def test_layouts_are_cached_per_grid_and_per_batch(encoder, hf_image_processor):
    _, grid_thw, per_image = processed(hf_image_processor, [(97, 301), (448, 448)])
    grids = [tuple(g) for g in grid_thw.tolist()]
    assert encoder.tower.grid_layout(grids[0]) is encoder.tower.grid_layout(grids[0])
    assert encoder.tower.plan(grids) is encoder.tower.plan(grids)
    assert encoder.tower.plan(grids[::-1]) is not encoder.tower.plan(grids)
    forward = encoder.encode(per_image, grids)
    backward = encoder.encode(per_image[::-1], grids[::-1])
    for a, b in zip(forward, backward[::-1]):
        assert (a - b).abs().max().item() <= TOL


def test_pad_groups_pad_alike_lengths_together():
    assert pad_groups([64, 64, 64, 16], math.inf) == [[0, 1, 2, 3]]  # windows: always one call
    assert pad_groups([256, 256], 1.2) == [[0, 1]]
    assert pad_groups([3996, 1024, 1024], 1.2) == [[0], [1, 2]]  # very different images: no big padding
    assert pad_groups([64, 1024, 64], 1.2) == [[1], [0, 2]]  # longest first
    assert pad_groups([100, 95], 1.2) == [[0, 1]] and pad_groups([100, 80], 1.2) == [[0], [1]]
    assert pad_groups([1024, 1024, 16], 1.5) == [[0, 1, 2]]  # 3 x 1024^2 <= 1.5 x (2 x 1024^2 + 16^2)


def test_full_layers_of_a_mixed_batch_use_groups(encoder, hf_image_processor):
    _, grid_thw, _ = processed(hf_image_processor, [(448, 448), (56, 56), (448, 448), (56, 56)])
    batch = encoder.tower.plan([tuple(g) for g in grid_thw.tolist()])
    assert [(g.num, g.max_len) for g in batch.frames.groups] == [(2, 1024), (2, 16)]
    assert all(g.mask is None for g in batch.frames.groups)  # equal lengths in each group: no mask
    assert len(batch.windows.groups) == 1  # 4x4-patch image = one partial window, padded with the rest


def test_window_layout_of_a_partial_grid(encoder):
    """10x14 patches = 5x7 merged units; 4x4-unit windows -> 2x2 windows of 16, 12, 4, 3 units."""
    layout = build_grid_layout(encoder.cfg, (1, 10, 14))
    assert layout.window_lengths == (64, 48, 16, 12)
    # the first window holds merged rows 0..3 x cols 0..3, row-major; each merged unit's 4 patches stay together
    first_units = layout.window_order[:64].view(16, 4)[:, 0] // 4
    assert first_units.tolist() == [r * 7 + c for r in range(4) for c in range(4)]
    assert sorted(layout.window_order.tolist()) == list(range(140))
    assert torch.equal(layout.window_order.view(-1, 4)[layout.unpermute, 0] // 4, torch.arange(35))


def test_packed_flash_path_matches_the_padded_path(encoder, hf_image_processor, monkeypatch):
    """The flash-attn branch (CUDA + half precision) fed by a stand-in that has flash_attn_varlen_func's
    contract, computed per segment with SDPA: cu_seqlens, max_seqlen and the packed layout are right."""
    _, grid_thw, per_image = processed(hf_image_processor, [(97, 301), (448, 448), (333, 57)])
    grids = [tuple(g) for g in grid_thw.tolist()]
    expected = encoder.encode(per_image, grids)
    calls = []

    def varlen(q, k, v, cu_q, cu_k, max_q, max_k):
        calls.append((cu_q.dtype, max_q))
        assert torch.equal(cu_q, cu_k) and max_q == max_k == int((cu_q[1:] - cu_q[:-1]).max())
        out = torch.empty_like(q)
        bounds = cu_q.tolist()
        for a, b in zip(bounds, bounds[1:]):
            out[a:b] = torch.nn.functional.scaled_dot_product_attention(
                *(t[a:b].transpose(0, 1) for t in (q, k, v))).transpose(0, 1)
        return out

    monkeypatch.setattr(vision_tower, "flash_attn_varlen_func", varlen)
    monkeypatch.setattr(vision_tower, "_use_flash", lambda x: True)
    packed = encoder.encode(per_image, grids)
    assert len(calls) == encoder.cfg.depth and all(dtype == torch.int32 for dtype, _ in calls)
    for a, b in zip(packed, expected):
        assert (a - b).abs().max().item() <= TOL


def test_rejects_grids_that_do_not_merge(encoder):
    with pytest.raises(ValueError, match=r"grid \(1, 4, 5\) height and width must be multiples of 2"):
        encoder.encode([torch.zeros(20, 1176)], [(1, 4, 5)])


def test_rejects_weights_of_another_shape(tiny_model_dir):
    from vlora.engine.vision import load_vision_state_dict
    from vlora.engine.vision_tower import VisionTower

    cfg = VisionConfig.from_pretrained(tiny_model_dir)
    state = load_vision_state_dict(tiny_model_dir)
    tower = VisionTower(cfg)
    with pytest.raises(ValueError, match=r"missing \['blocks.0.gate_up.bias'"):
        tower.load_checkpoint_state({k: v for k, v in state.items() if k != "blocks.0.mlp.up_proj.bias"})
    with pytest.raises(ValueError, match=r"unexpected \['blocks.99.norm1.weight'\]"):
        tower.load_checkpoint_state({**state, "blocks.99.norm1.weight": torch.ones(3)})
    with pytest.raises(ValueError, match=r"vision weight merger.fc2.weight: shape"):
        tower.load_checkpoint_state({**state, "merger.mlp.2.weight": torch.ones(3, 3)})


# -- the fast paths compute HF's formulas --------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_on_interleaved_heads_is_hfs_rotate_half(dtype):
    """q/k rows stored pair-interleaved + one complex multiply = HF's apply_rotary_pos_emb_vision, in
    the interleaved order; in fp32 to rounding, in bf16 to one bf16 step at most."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

    from vlora.engine.vision_tower import _rotate, interleave_pairs

    rows, H, D = 37, 3, 16
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(rows, H, D, generator=gen).to(dtype) for _ in range(2))
    angles = torch.rand(rows, D // 2, generator=gen) * 50
    emb = torch.cat([angles, angles], -1)
    hq, hk = apply_rotary_pos_emb_vision(q, k, emb.cos(), emb.sin())
    qk = torch.cat([interleave_pairs(q.reshape(rows, H * D).T, H).T, interleave_pairs(k.reshape(rows, H * D).T, H).T], 1)
    ours = _rotate(qk.contiguous(), torch.complex(angles.cos(), angles.sin()))
    assert ours.shape == (rows, 2, H, D) and ours.dtype == dtype
    for got, expected in zip(ours.unbind(1), (hq, hk)):
        expected = interleave_pairs(expected.reshape(rows, H * D).T, H).T.reshape(rows, H, D)
        diff = (got.float() - expected.float()).abs()
        if dtype == torch.float32:
            assert diff.max().item() <= 1e-6
        else:  # one bf16 step of the value at most
            assert (diff <= expected.float().abs() * 2**-7 + 1e-30).all()
    # the interleave is a permutation: dims (i, i + D/2) of each head side by side
    assert interleave_pairs(torch.arange(2 * D), 2).tolist() == [
        h * D + j for h in range(2) for i in range(D // 2) for j in (i, i + D // 2)]


def test_rms_norm_fp32_path_equals_hfs_exactly():
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRMSNorm

    from vlora.engine.vision_tower import RMSNorm

    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(50, 64, generator=gen) * 3, torch.rand(64, generator=gen)
    hf, ours = Qwen2_5_VLRMSNorm(64, eps=1e-6), RMSNorm(64, eps=1e-6)
    with torch.no_grad():
        hf.weight.copy_(w), ours.weight.copy_(w)
        assert torch.equal(ours(x), hf(x))
        assert torch.equal(ours(x.bfloat16()), hf(x.bfloat16()))
