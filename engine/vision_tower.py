"""Qwen2.5-VL's vision tower, our own forward: one attention call per layer for a whole batch.

HF's SDPA path runs one attention call per window (about 450 per 448x448 image on the 7B tower)
and reads the window sizes back to the host in every layer. Here everything that depends on the
image sizes (window order, rotary angles, padding of partial windows, per-image segments) is
built on the host once per image grid (t, h, w), cached, and copied to the device once per batch
(`TowerBatch`); the forward itself is a fixed sequence of device ops. Window layers attend over
all windows of all images in one SDPA call (partial windows padded to the window size, keys
masked); full layers over all images in one call when they have one size, else one call per
size (`pad_groups`: padding a small image to a large one costs more attention than the call it
saves). Both equal HF's block-diagonal
attention. With flash-attn importable (CUDA, half precision) both run packed through
`flash_attn_varlen_func` in one call each, with no padding.

Numerics follow HF's modules exactly (RMSNorm in fp32, rotary in fp32, exact GELU in the merger),
so the output matches `Qwen2_5_VisionTransformerPretrainedModel` to float tolerance. One layout
change: q and k projection rows are stored with each head's rotate-half pairs side by side
(`interleave_pairs`, at load), so the rotary embedding is one complex multiply instead of
slicing, negating and concatenating; attention is unchanged because q.k sums over all head dims.

On a CPU the tiny tower's time is mostly SDPA in the full-attention layers and GEMMs, which HF's
tower runs too; `bench/vision.py --profile` and bench/RESULTS.md give the split.
"""

from __future__ import annotations

import functools
import json
import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

try:  # optional: packed variable-length attention on GPUs
    from flash_attn import flash_attn_varlen_func
except ImportError:  # CPU, or no flash-attn installed: padded SDPA
    flash_attn_varlen_func = None

Grid = tuple[int, int, int]

_ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}


@dataclass(frozen=True, slots=True)
class VisionConfig:
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    hidden_act: str = "silu"
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Values per patch: channels * temporal_patch * patch * patch (1176 for Qwen2.5-VL)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size**2

    @staticmethod
    def from_pretrained(model_dir: str | Path) -> "VisionConfig":
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
        v = cfg["vision_config"]
        if v.get("hidden_act", "silu") not in _ACTIVATIONS:
            raise ValueError(f"vision hidden_act {v['hidden_act']!r} is not one of {sorted(_ACTIVATIONS)}")
        rope = v.get("rope_parameters") or {}
        return VisionConfig(
            depth=v["depth"],
            hidden_size=v["hidden_size"],
            intermediate_size=v["intermediate_size"],
            num_heads=v["num_heads"],
            out_hidden_size=v["out_hidden_size"],
            hidden_act=v.get("hidden_act", "silu"),
            in_channels=v.get("in_channels", v.get("in_chans", 3)),  # hub configs say in_chans
            patch_size=v.get("patch_size", v.get("spatial_patch_size", 14)),
            temporal_patch_size=v.get("temporal_patch_size", 2),
            spatial_merge_size=v.get("spatial_merge_size", 2),
            window_size=v.get("window_size", 112),
            fullatt_block_indexes=tuple(v.get("fullatt_block_indexes", (7, 15, 23, 31))),
            rope_theta=float(rope.get("rope_theta", v.get("rope_theta", 10000.0))),
        )


# -- Per-grid layout (host side, cached) -------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class GridLayout:
    """Where each patch of one image goes in window order, and its rotary angles there."""

    window_order: torch.Tensor  # [n] long: image patch index at each window-order position
    window_lengths: tuple[int, ...]  # patches per (non-empty) window, in window order
    frame_lengths: tuple[int, ...]  # patches per frame: full attention stays within a frame
    rotary: torch.Tensor  # [n, head_dim / 2] complex64, window order: cos + i sin of HF's angles
    unpermute: torch.Tensor  # [n / merge_unit] long: window-order merged row of each output token

    @property
    def num_patches(self) -> int:
        return self.window_order.numel()


def build_grid_layout(cfg: VisionConfig, grid: Grid) -> GridLayout:
    """Qwen2.5-VL's window partition: merged 2x2 patches tiled into windows of window_size pixels,
    windows row-major per frame, row-major inside each window; partial windows at the right and
    bottom edges keep only their real patches."""
    t, h, w = grid
    m, mu = cfg.spatial_merge_size, cfg.merge_unit
    if h % m or w % m:
        raise ValueError(f"grid {grid}: height and width must be multiples of spatial_merge_size {m}")
    gh, gw = h // m, w // m
    ws = cfg.window_size // m // cfg.patch_size  # window side in merged units
    nwh, nww = -(-gh // ws), -(-gw // ws)
    merged = torch.arange(t * gh * gw).view(t, gh, gw)
    padded = F.pad(merged, (0, nww * ws - gw, 0, nwh * ws - gh), value=-1)
    windows = padded.view(t, nwh, ws, nww, ws).permute(0, 1, 3, 2, 4).reshape(t * nwh * nww, ws * ws)
    real = windows >= 0
    merged_order = windows[real]  # merged unit at each window-order position
    window_lengths = tuple(n * mu for n in real.sum(1).tolist() if n)
    window_order = (merged_order.unsqueeze(1) * mu + torch.arange(mu)).flatten()

    # Patches arrive block-major (each m x m merge block row-major, blocks row-major), per frame.
    hpos = torch.arange(h).view(gh, m, 1, 1).expand(gh, m, gw, m).permute(0, 2, 1, 3).flatten()
    wpos = torch.arange(w).view(1, 1, gw, m).expand(gh, m, gw, m).permute(0, 2, 1, 3).flatten()
    pos = torch.stack([hpos, wpos], dim=-1).repeat(t, 1)  # [n, 2]
    spatial_dim = cfg.head_dim // 2
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, spatial_dim, 2, dtype=torch.float) / spatial_dim))
    freqs = (pos[..., None].float() * inv_freq).flatten(1)[window_order]  # [n, head_dim / 2]: h, then w angles
    return GridLayout(window_order=window_order, window_lengths=window_lengths, frame_lengths=(h * w,) * t,
                      rotary=torch.complex(freqs.cos(), freqs.sin()), unpermute=torch.argsort(merged_order))


# -- Segments: windows or images, padded (SDPA) or packed (flash-attn) ------------------------------
# Full-attention layers: a padded group of images may cost at most this much more attention (sum of
# L^2) than its images. 1.0 = only images of one size share a call: on CPU any padding of a
# full-image attention cost more than the calls it saved (bench/vision.py, mixed batch). Windows
# (at most window_size^2 patches each) are always padded into one call.
FULL_PAD_BUDGET = 1.0


@dataclass(frozen=True, slots=True)
class PadGroup:
    """Segments padded to one length: one SDPA call over [num, heads, max_len, head_dim]."""

    num: int
    max_len: int
    mask: torch.Tensor | None  # [num, 1, 1, max_len] bool, real keys; None when no segment is padded


def pad_groups(lengths: list[int], budget: float) -> list[list[int]]:
    """Segments (indices, longest first) grouped so padding each group to its longest segment costs at
    most `budget` x the group's own attention. Equal or near-equal lengths (windows of one image, images
    of one size) make one group, so one call; very different image sizes get a call each instead of
    padding small images to the largest."""
    groups: list[list[int]] = []
    real = 0
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        if groups:
            longest = lengths[groups[-1][0]]
            if (len(groups[-1]) + 1) * longest**2 <= budget * (real + lengths[i] ** 2):
                groups[-1].append(i)
                real += lengths[i] ** 2
                continue
        groups.append([i])
        real = lengths[i] ** 2
    return groups


@dataclass(frozen=True, slots=True)
class Segments:
    """A partition of the packed rows into attention segments (windows, or frames of images).

    Padded layout for SDPA: the groups' [num, max_len] slots one after another; `gather` lists the
    packed row of each slot (0 in padding slots), `scatter` the slot of each packed row. Both are None
    when the packed rows already are that layout (one group, every segment full). `cu_seqlens` and
    `max_len` describe the packed layout for flash-attn.
    """

    groups: tuple[PadGroup, ...]
    gather: torch.Tensor | None
    scatter: torch.Tensor | None
    cu_seqlens: torch.Tensor  # [num + 1] int32
    max_len: int
    rotary: torch.Tensor  # [rows, head_dim / 2] complex rotary table in this layout (padded slots, or packed rows)

    @staticmethod
    def build(lengths: list[int], rotary: torch.Tensor, packed: bool, device: torch.device,
              budget: float = math.inf) -> "Segments":
        lens = torch.tensor(lengths)
        cu = F.pad(lens.cumsum(0), (1, 0)).to(torch.int32)
        L = max(lengths)
        if packed or all(x == L for x in lengths):
            return Segments((PadGroup(len(lengths), L, None),), None, None, cu.to(device), L, rotary.to(device))
        starts = cu[:-1].long()
        groups, gather, slot_of_row = [], [], torch.empty(int(cu[-1]), dtype=torch.long)
        offset = 0
        for members in pad_groups(lengths, budget):
            g_len = lens[members]
            n, gl = len(members), int(g_len.max())
            slot = torch.arange(gl)
            valid = slot.unsqueeze(0) < g_len.unsqueeze(1)  # [n, gl]
            rows = starts[members].unsqueeze(1) + slot
            gather.append(torch.where(valid, rows, torch.zeros((), dtype=torch.long)).flatten())
            slot_of_row[rows[valid]] = offset + torch.arange(n * gl).view(n, gl)[valid]
            mask = None if bool(valid.all()) else valid.view(n, 1, 1, gl).to(device)
            groups.append(PadGroup(n, gl, mask))
            offset += n * gl
        g = torch.cat(gather)
        return Segments(tuple(groups), g.to(device), slot_of_row.to(device), cu.to(device), L, rotary[g].to(device))


@dataclass(frozen=True, slots=True)
class TowerBatch:
    """Everything the forward needs for one list of image grids, on the device."""

    grids: tuple[Grid, ...]
    window_order: torch.Tensor  # [N] long: packed patch row at each window-order position
    windows: Segments
    frames: Segments
    unpermute: torch.Tensor  # [N / merge_unit] long
    num_tokens: tuple[int, ...]  # output embeddings per image

    @staticmethod
    def build(layouts: list[GridLayout], grids: list[Grid], merge_unit: int, packed: bool,
              device: torch.device) -> "TowerBatch":
        orders, unperm, windows, frames = [], [], [], []
        patch_off = 0
        for lay in layouts:
            orders.append(lay.window_order + patch_off)
            unperm.append(lay.unpermute + patch_off // merge_unit)
            windows += lay.window_lengths
            frames += lay.frame_lengths
            patch_off += lay.num_patches
        rotary = torch.cat([lay.rotary for lay in layouts])
        return TowerBatch(
            grids=tuple(grids),
            window_order=torch.cat(orders).to(device),
            windows=Segments.build(windows, rotary, packed, device),
            frames=Segments.build(frames, rotary, packed, device, FULL_PAD_BUDGET),
            unpermute=torch.cat(unperm).to(device),
            num_tokens=tuple(lay.num_patches // merge_unit for lay in layouts),
        )


# -- Modules -------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # HF's formula below, with fewer intermediate tensors
            r = x.pow(2).mean(-1, keepdim=True).add_(self.eps).rsqrt_()
            return torch.mul(x, r).mul_(self.weight)
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


def _rotate(qk: torch.Tensor, rotary: torch.Tensor) -> torch.Tensor:
    """q and k [rows, 2 * heads * head_dim] rotated in fp32 (as HF does), back in their dtype: [rows, 2, heads, head_dim].

    HF rotates the halves of each head, `x * cat(cos, cos) + rotate_half(x) * cat(sin, sin)`. Our q and
    k rows are stored pair-interleaved (`interleave_pairs`: dims i and i + head_dim/2 side by side), which
    makes that rotation one complex multiply by cos + i sin. q.k is a sum over the head's dims, so their
    order does not change attention.
    """
    rows, D = qk.shape[0], rotary.shape[-1] * 2
    z = torch.view_as_complex(qk.float().view(rows, -1, D // 2, 2))
    return torch.view_as_real(z * rotary.view(rows, 1, D // 2)).view(rows, 2, -1, D).to(qk.dtype)


def interleave_pairs(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """q or k projection rows (weight or bias) of each head reordered [0, D/2, 1, D/2 + 1, ...]: HF's
    rotate-half pairs side by side, for `_rotate`. Values unchanged, only their order."""
    D = w.shape[0] // num_heads
    return w.view(num_heads, 2, D // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)  # merged q|k|v, as in the checkpoint
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, seg: Segments) -> torch.Tensor:
        n, H, D = x.shape[0], self.num_heads, self.head_dim
        qkv = self.qkv(x)
        if flash_attn_varlen_func is not None and seg.gather is None and _use_flash(x):
            q, k = _rotate(qkv[:, : 2 * H * D], seg.rotary).unbind(1)
            v = qkv[:, 2 * H * D :].view(n, H, D)
            out = flash_attn_varlen_func(q, k, v, seg.cu_seqlens, seg.cu_seqlens, seg.max_len, seg.max_len)
            return self.proj(out.reshape(n, H * D))
        if seg.gather is not None:  # partial segments: pad each group to its longest
            qkv = qkv.index_select(0, seg.gather)
        rows = qkv.shape[0]
        q, k = _rotate(qkv[:, : 2 * H * D], seg.rotary).unbind(1)
        v = qkv[:, 2 * H * D :].view(rows, H, D)
        outs, start = [], 0
        for g in seg.groups:  # one group unless segment lengths differ widely (see pad_groups)
            end = start + g.num * g.max_len
            qg, kg, vg = (t[start:end].view(g.num, g.max_len, H, D).transpose(1, 2) for t in (q, k, v))
            out = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=g.mask)  # [num, H, max_len, D]
            outs.append(out.transpose(1, 2).reshape(end - start, H * D))
            start = end
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        if seg.scatter is not None:
            out = out.index_select(0, seg.scatter)
        return self.proj(out)


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size)
        self.norm2 = RMSNorm(cfg.hidden_size)
        self.attn = VisionAttention(cfg)
        self.gate_up = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size)  # gate_proj | up_proj, merged at load
        self.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = _ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor, seg: Segments) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), seg)
        gate, up = self.gate_up(self.norm2(x)).chunk(2, dim=-1)
        return x.add_(self.down(self.act(gate).mul_(up)))


class PatchMerger(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.merged_dim = cfg.hidden_size * cfg.merge_unit
        self.ln_q = RMSNorm(cfg.hidden_size)
        self.fc1 = nn.Linear(self.merged_dim, self.merged_dim)
        self.fc2 = nn.Linear(self.merged_dim, cfg.out_hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.ln_q(x).view(-1, self.merged_dim))))


def _use_flash(x: torch.Tensor) -> bool:
    return x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)


class VisionTower(nn.Module):
    """Patches [N, patch_dim] of a batch of images -> merged embeddings [N / merge_unit, out_hidden]."""

    MAX_CACHED_GRIDS = 256  # GridLayout per distinct image grid (host memory)
    MAX_CACHED_BATCHES = 64  # TowerBatch per distinct list of grids (serving repeats a few sizes)

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        # Conv3d with kernel == stride over one patch is a matmul over the flattened patch.
        self.patch_embed = nn.Linear(cfg.patch_dim, cfg.hidden_size, bias=False)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)
        self.full_attention = frozenset(cfg.fullatt_block_indexes)
        self._layouts: OrderedDict[Grid, GridLayout] = OrderedDict()
        self._batches: OrderedDict[tuple, TowerBatch] = OrderedDict()

    def grid_layout(self, grid: Grid) -> GridLayout:
        """Window order and rotary tables of one image grid, built once and kept (LRU)."""
        return _cached(self._layouts, grid, lambda: build_grid_layout(self.cfg, grid), self.MAX_CACHED_GRIDS)

    def plan(self, grids: list[Grid]) -> TowerBatch:
        """The batch layout for these grids, from the per-grid caches; kept for repeated grid lists."""
        w = self.patch_embed.weight
        packed = flash_attn_varlen_func is not None and _use_flash(w)
        grids = [tuple(int(x) for x in g) for g in grids]

        def build() -> TowerBatch:
            layouts = [self.grid_layout(g) for g in grids]
            return TowerBatch.build(layouts, grids, self.cfg.merge_unit, packed, w.device)

        return _cached(self._batches, (tuple(grids), w.device, packed), build, self.MAX_CACHED_BATCHES)

    def forward(self, pixels: torch.Tensor, batch: TowerBatch) -> torch.Tensor:
        """No host syncs: every size-dependent index was built by `plan`."""
        x = self.patch_embed(pixels).index_select(0, batch.window_order)  # to window order
        for i, block in enumerate(self.blocks):
            x = block(x, batch.frames if i in self.full_attention else batch.windows)
        return self.merger(x).index_select(0, batch.unpermute)

    # -- weights -----------------------------------------------------------------------------------
    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load HF-named tower tensors (`blocks.0.attn.qkv.weight`, ...), merging gate/up projections."""
        state = dict(state)
        ours: dict[str, torch.Tensor] = {}
        w = state.pop("patch_embed.proj.weight", None)
        if w is not None:
            ours["patch_embed.weight"] = w.reshape(w.shape[0], -1)
        H, hidden = self.cfg.num_heads, self.cfg.hidden_size
        for i in range(self.cfg.depth):
            p = f"blocks.{i}."
            for kind in ("weight", "bias"):  # q and k rows pair-interleaved for `_rotate`
                qkv = state.get(f"{p}attn.qkv.{kind}")
                if qkv is not None and qkv.shape[0] == 3 * hidden:
                    q, k, v = qkv.split(hidden)
                    state[f"{p}attn.qkv.{kind}"] = torch.cat([interleave_pairs(q, H), interleave_pairs(k, H), v])
            for name in ("norm1.weight", "norm2.weight", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                         "attn.proj.bias", "mlp.down_proj.weight", "mlp.down_proj.bias"):
                if p + name in state:
                    ours[p + name.replace("mlp.down_proj", "down")] = state.pop(p + name)
            for kind in ("weight", "bias"):
                gate, up = state.pop(f"{p}mlp.gate_proj.{kind}", None), state.pop(f"{p}mlp.up_proj.{kind}", None)
                if gate is not None and up is not None:
                    ours[f"{p}gate_up.{kind}"] = torch.cat([gate, up])
        for src, dst in (("merger.ln_q.weight", "merger.ln_q.weight"), ("merger.mlp.0.weight", "merger.fc1.weight"),
                         ("merger.mlp.0.bias", "merger.fc1.bias"), ("merger.mlp.2.weight", "merger.fc2.weight"),
                         ("merger.mlp.2.bias", "merger.fc2.bias")):
            if src in state:
                ours[dst] = state.pop(src)
        expected = self.state_dict()
        missing = sorted(set(expected) - set(ours))
        if missing or state:
            raise ValueError(f"vision weights do not fit the vision tower: missing {missing[:5]}, "
                             f"unexpected {sorted(state)[:5]}")
        for name, t in ours.items():
            if t.shape != expected[name].shape:
                raise ValueError(f"vision weight {name}: shape {tuple(t.shape)}, the config wants "
                                 f"{tuple(expected[name].shape)}")
        self.load_state_dict(ours, strict=True)


def _cached(cache: OrderedDict, key, build, max_entries: int):
    """LRU lookup: the cached value for key, else build() kept as the newest entry."""
    value = cache.get(key)
    if value is None:
        value = cache[key] = build()
        if len(cache) > max_entries:
            cache.popitem(last=False)
    else:
        cache.move_to_end(key)
    return value
