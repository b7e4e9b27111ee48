"""The Qwen2.5-VL language model (text stack) for serving: packed batches, paged KV, batched LoRA.

Mirrors HF's `Qwen2_5_VLTextModel` + `lm_head` (the test oracle): embeddings with image
embeddings scattered at `<|image_pad|>` rows, RMSNorm, GQA attention with q/k/v biases,
M-RoPE with the checkpoint's `mrope_section`, SwiGLU MLP. Loads only the language-model
tensors of a checkpoint (the vision tower lives in engine/vision.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vlora.engine.attention import AttentionMetadata, paged_attention
from vlora.engine.lora import AdapterSlots, LoRABatch, apply_lora
from vlora.engine.tp import ShardPlan, TPGroup, shard_range
from vlora.engine.weights import iter_tensors

_LM_PREFIXES = ("model.language_model.", "model.")  # transformers >= 4.52 layout, then the hub layout


@dataclass(frozen=True, slots=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, ...]
    max_position_embeddings: int
    image_token_id: int
    eos_token_ids: tuple[int, ...]
    tie_word_embeddings: bool

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def lora_module_shapes(self, targets: tuple[str, ...]) -> dict[tuple[int, str], tuple[int, int]]:
        """(layer, module) -> (in, out) of every LoRA-targetable linear layer, from the config alone."""
        h, kv, inter = self.hidden_size, self.num_kv_heads * self.head_dim, self.intermediate_size
        shape = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                 "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
        return {(i, m): shape[m] for i in range(self.num_layers) for m in targets}

    @staticmethod
    def from_pretrained(model_dir: str | Path) -> "TextConfig":
        d = Path(model_dir)
        cfg = json.loads((d / "config.json").read_text())
        text = cfg.get("text_config") or cfg
        rope = text.get("rope_parameters") or text.get("rope_scaling") or cfg.get("rope_scaling") or {}
        theta = rope.get("rope_theta", text.get("rope_theta", cfg.get("rope_theta", 1000000.0)))
        eos = []
        gen = d / "generation_config.json"
        if gen.exists():
            e = json.loads(gen.read_text()).get("eos_token_id")
            eos = e if isinstance(e, list) else ([e] if e is not None else [])
        if not eos:
            e = text.get("eos_token_id", cfg.get("eos_token_id"))
            eos = e if isinstance(e, list) else [e]
        return TextConfig(
            vocab_size=text["vocab_size"],
            hidden_size=text["hidden_size"],
            intermediate_size=text["intermediate_size"],
            num_layers=text["num_hidden_layers"],
            num_heads=text["num_attention_heads"],
            num_kv_heads=text.get("num_key_value_heads") or text["num_attention_heads"],
            rms_norm_eps=text.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            mrope_section=tuple(rope.get("mrope_section", (16, 24, 24))),
            max_position_embeddings=text.get("max_position_embeddings", 32768),
            image_token_id=cfg.get("image_token_id", 151655),
            eos_token_ids=tuple(int(x) for x in eos),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
        )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's Qwen2RMSNorm (float32 statistics, cast back, times the weight) as one aten op."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    return weight * F.rms_norm(x.float(), weight.shape, None, eps).to(x.dtype)


class MRoPE(nn.Module):
    """Multimodal rotary embedding: frequency band i of `mrope_section` follows position row i % 3.

    cos/sin of every position are tabulated once (float32, as HF computes them) so a step's
    tables are one lookup. The sine table carries rotate-half's sign (its first half negated),
    so rotating is `x * cos + flip_halves(x) * sin`.
    """

    def __init__(self, cfg: TextConfig, max_positions: int | None = None):
        super().__init__()
        d = cfg.head_dim
        self.register_buffer("inv_freq", 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float) / d)),
                             persistent=False)
        self.section = list(cfg.mrope_section)
        # which of the 3 position rows each of the D/2 frequencies follows (one-hot [3, 1, 1, D])
        row = torch.cat([torch.full((s,), i % 3) for i, s in enumerate(self.section)])
        row = torch.cat((row, row))
        self.register_buffer("row_select", (torch.arange(3).unsqueeze(1) == row).float().view(3, 1, 1, d),
                             persistent=False)
        self.register_buffer("table", torch.empty(0, 2, d), persistent=False)
        self.ensure(max_positions or cfg.max_position_embeddings)

    def ensure(self, num_positions: int) -> None:
        """Tabulate positions [0, num_positions) (grows only)."""
        if num_positions <= self.table.shape[0]:
            return
        dev = self.inv_freq.device
        freqs = torch.arange(num_positions, device=dev, dtype=torch.float).unsqueeze(1) * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)  # [P, D]
        half = emb.shape[-1] // 2
        sign = torch.cat((-torch.ones(half, device=dev), torch.ones(half, device=dev)))
        self.table = torch.stack((emb.cos(), emb.sin() * sign), dim=1)  # [P, 2, D]

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [3, T] -> cos, signed sin [T, 1, D] in `dtype`."""
        cs = (F.embedding(positions, self.table.view(self.table.shape[0], -1)).view(3, -1, 2, self.table.shape[-1])
              * self.row_select).sum(0).to(dtype)  # [T, 2, D]
        return cs[:, 0:1], cs[:, 1:2]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D]; HF's rotate-half RoPE with the sign folded into `sin` (rolling by D/2 swaps the halves)."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin)


class DecoderLayer(nn.Module):
    """One decoder layer with merged projections: q/k/v in one matmul (`qkv`), gate/up in one (`gate_up`).

    Under tensor parallelism (`tp`) the layer holds this rank's heads, KV heads and MLP columns:
    qkv and gate_up are column-parallel, o_proj and down_proj row-parallel, each followed by one
    all-reduce (after its LoRA delta, whose A is sharded the same way, so the sum is exact).
    """

    def __init__(self, cfg: TextConfig, idx: int, tp: TPGroup | None = None):
        super().__init__()
        w = tp.world_size if tp is not None else 1
        h, d = cfg.hidden_size, cfg.head_dim
        self.idx = idx
        self.cfg = cfg
        self.tp = tp
        self.num_heads, self.num_kv_heads, inter = cfg.num_heads // w, cfg.num_kv_heads // w, cfg.intermediate_size // w
        self.q_size, self.kv_size = self.num_heads * d, self.num_kv_heads * d
        self.qkv = nn.Linear(h, self.q_size + 2 * self.kv_size, bias=True)
        self.o_proj = nn.Linear(self.q_size, h, bias=False)
        self.gate_up = nn.Linear(h, 2 * inter, bias=False)
        self.down_proj = nn.Linear(inter, h, bias=False)
        self.input_layernorm = nn.Parameter(torch.ones(h))
        self.post_attention_layernorm = nn.Parameter(torch.ones(h))

    def _proj(self, group: str, x: torch.Tensor, slots: AdapterSlots | None, lora: LoRABatch | None) -> torch.Tensor:
        linear = self.o_proj if group == "o" else self.down_proj if group == "down" else getattr(self, group)
        y = linear(x)
        if lora is not None and slots is not None:
            key = (self.idx, group)
            if key in slots.a:
                y = apply_lora(y, x, slots.a[key], slots.b[key], lora)
        return y

    def forward(self, x, cos, sin, k_cache, v_cache, meta: AttentionMetadata, slots, lora):
        cfg = self.cfg
        T = x.shape[0]
        h = rms_norm(x, self.input_layernorm, cfg.rms_norm_eps)
        qk, v = self._proj("qkv", h, slots, lora).split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        qk = rotate(qk.view(T, self.num_heads + self.num_kv_heads, cfg.head_dim), cos, sin)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        v = v.view(T, self.num_kv_heads, cfg.head_dim)
        attn = paged_attention(q, k, v, k_cache, v_cache, meta, cfg.head_dim ** -0.5)
        x = x + self._reduce(self._proj("o", attn, slots, lora))
        h = rms_norm(x, self.post_attention_layernorm, cfg.rms_norm_eps)
        gate, up = self._proj("gate_up", h, slots, lora).chunk(2, dim=-1)
        return x + self._reduce(self._proj("down", F.silu(gate) * up, slots, lora))

    def _reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """A row-parallel output: the sum of every rank's partial product."""
        return partial if self.tp is None else self.tp.all_reduce(partial)


class QwenTextModel(nn.Module):
    """The text stack; with `tp`, this rank's shard (embedding replicated, lm_head per `tp.plan`)."""

    def __init__(self, cfg: TextConfig, tp: TPGroup | None = None):
        super().__init__()
        self.cfg = cfg
        self.tp = tp
        self.plan = tp.plan if tp is not None else ShardPlan()
        if self.plan.sharded:
            self.plan.check(cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size, cfg.vocab_size)
        vocab = cfg.vocab_size // self.plan.world_size if self.plan.vocab_parallel else cfg.vocab_size
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, tp) for i in range(cfg.num_layers))
        self.norm = nn.Parameter(torch.ones(cfg.hidden_size))
        self.lm_head = nn.Linear(cfg.hidden_size, vocab, bias=False)
        self.rope = MRoPE(cfg, max_positions=1)

    @staticmethod
    def from_pretrained(model_dir: str | Path, device="cpu", dtype=torch.float32,
                        max_positions: int | None = None, tp: TPGroup | None = None) -> "QwenTextModel":
        """Load the language-model tensors; a tensor-parallel rank reads only its slice of each one."""
        cfg = TextConfig.from_pretrained(model_dir)
        with torch.device("meta"):
            model = QwenTextModel(cfg, tp)
        model = model.to_empty(device=device).to(dtype)
        with torch.device(device):
            model.rope = MRoPE(cfg, max_positions)
        plan = model.plan
        params = dict(model.named_parameters())
        loaded = set()

        def want(n: str) -> bool:
            return n == "lm_head.weight" or (n.startswith("model.") and not n.startswith("model.visual."))

        def region(name: str, shape: tuple[int, ...]) -> tuple[slice, ...] | None:
            target = _map_name(name)
            return None if target is None else _checkpoint_slice(cfg, plan, target[0], target[1], shape)

        for name, t in iter_tensors(model_dir, want, region):
            target = _map_name(name)
            if target is None:
                continue
            pname, part = target
            if pname not in params:
                continue
            dst = params[pname].data
            if part is not None:
                lo, hi = _merged_rows(cfg, pname, part, plan.world_size)
                dst = dst[lo:hi]
            dst.copy_(t.to(dtype))
            loaded.add((pname, part))
        if cfg.tie_word_embeddings and ("lm_head.weight", None) not in loaded:
            if plan.vocab_parallel and plan.sharded:  # this rank's vocabulary rows of the (replicated) embedding
                lo, hi = shard_range(cfg.vocab_size, plan.rank, plan.world_size)
                model.lm_head.weight = nn.Parameter(model.embed_tokens.weight.data[lo:hi], requires_grad=False)
            else:
                model.lm_head.weight = model.embed_tokens.weight
            loaded.add(("lm_head.weight", None))
        missing = {(p, part) for p in params for part in _parts_of(p)} - loaded
        if missing:
            raise ValueError(f"checkpoint {model_dir} lacks language-model tensors: {sorted(map(str, missing))[:5]} ...")
        return model.eval()

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, kv_k, kv_v,
                image_rows: torch.Tensor | None = None, image_embeds: torch.Tensor | None = None,
                slots: AdapterSlots | None = None, lora: LoRABatch | None = None,
                logits_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Packed tokens [T] -> logits [len(logits_rows), vocab] (float32) for the rows that sample
        (None on ranks 1..N-1 of a tensor-parallel group with a replicated lm_head)."""
        x = self.embed_tokens(input_ids)
        if image_rows is not None:
            x = x.index_copy(0, image_rows, image_embeds.to(x.dtype))
        cos, sin = self.rope(positions, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, kv_k[i], kv_v[i], meta, slots, lora)
        if logits_rows is not None:
            x = x.index_select(0, logits_rows)
        if self.plan.sharded and not self.plan.vocab_parallel and self.plan.rank != 0:
            return None  # a replicated lm_head runs on rank 0 only
        x = rms_norm(x, self.norm, self.cfg.rms_norm_eps)
        logits = self.lm_head(x)
        if self.plan.sharded and self.plan.vocab_parallel:
            logits = self.tp.all_gather_last(logits)
        return logits.float()


_LAYER_RENAMES = {
    "self_attn.q_proj": ("qkv", "q"), "self_attn.k_proj": ("qkv", "k"), "self_attn.v_proj": ("qkv", "v"),
    "self_attn.o_proj": ("o_proj", None), "mlp.gate_proj": ("gate_up", "gate"), "mlp.up_proj": ("gate_up", "up"),
    "mlp.down_proj": ("down_proj", None), "input_layernorm.weight": ("input_layernorm", None),
    "post_attention_layernorm.weight": ("post_attention_layernorm", None),
}


def _parts_of(pname: str) -> tuple[str | None, ...]:
    """The checkpoint tensors a parameter is assembled from (merged projections have several)."""
    if ".qkv." in pname:
        return ("q", "k", "v")
    if ".gate_up." in pname:
        return ("gate", "up")
    return (None,)


def _merged_rows(cfg: TextConfig, pname: str, part: str, world_size: int = 1) -> tuple[int, int]:
    """Rows of a merged parameter (one rank's shard of it) that checkpoint tensor `part` fills."""
    q, kv = cfg.num_heads * cfg.head_dim // world_size, cfg.num_kv_heads * cfg.head_dim // world_size
    inter = cfg.intermediate_size // world_size
    return {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv), "gate": (0, inter), "up": (inter, 2 * inter)}[part]


_PART_MODULE = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "gate": "gate_proj", "up": "up_proj"}


def _checkpoint_slice(cfg: TextConfig, plan: ShardPlan, pname: str, part: str | None,
                      shape: tuple[int, ...]) -> tuple[slice, ...] | None:
    """The region of a checkpoint tensor this rank loads (None: all of it).

    Column-parallel weights and biases: a block of output rows; row-parallel weights: a block of
    input columns; a vocab-parallel lm_head: a block of vocabulary rows; the rest is replicated."""
    if not plan.sharded:
        return None
    if part is not None:  # q/k/v or gate/up: output rows (weight [out, in] or bias [out])
        lo, hi = plan.out_range(_PART_MODULE[part], shape[0])
        return (slice(lo, hi),)
    if pname.endswith(("o_proj.weight", "down_proj.weight")):
        lo, hi = shard_range(shape[1], plan.rank, plan.world_size)
        return (slice(None), slice(lo, hi))
    if pname == "lm_head.weight" and plan.vocab_parallel:
        lo, hi = shard_range(shape[0], plan.rank, plan.world_size)
        return (slice(lo, hi),)
    return None


def _map_name(name: str) -> tuple[str, str | None] | None:
    """Checkpoint tensor name -> (our parameter, which part of a merged projection or None)."""
    if name == "lm_head.weight":
        return name, None
    for p in _LM_PREFIXES:
        if name.startswith(p):
            rest = name[len(p):]
            break
    else:
        return None
    if rest == "embed_tokens.weight":
        return rest, None
    if rest == "norm.weight":
        return "norm", None
    if rest.startswith("layers."):
        _, idx, tail = rest.split(".", 2)
        for src, (dst, part) in _LAYER_RENAMES.items():
            if tail == src or tail.startswith(src + "."):
                return f"layers.{idx}.{dst}{tail[len(src):]}", part
    return None
