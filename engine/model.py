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

from engine.attention import AttentionMetadata, paged_attention
from engine.lora import AdapterSlots, LoRABatch, apply_lora
from engine.weights import iter_tensors

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
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


class MRoPE(nn.Module):
    """Multimodal rotary embedding: frequency band i of `mrope_section` follows position row i % 3."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        d = cfg.head_dim
        self.register_buffer("inv_freq", 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float) / d)),
                             persistent=False)
        self.section = list(cfg.mrope_section)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[..., None].float() * self.inv_freq  # [3, T, D/2]
        cos, sin = freqs.cos(), freqs.sin()

        def recompose(f):
            f = torch.cat([m[i % 3] for i, m in enumerate(f.split(self.section, dim=-1))], dim=-1)
            return torch.cat((f, f), dim=-1).to(dtype)  # [T, D]

        return recompose(cos), recompose(sin)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D]; rotate-half RoPE as in HF."""
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.unsqueeze(1) + rot * sin.unsqueeze(1)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, idx: int):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.idx = idx
        self.cfg = cfg
        self.q_proj = nn.Linear(h, cfg.num_heads * d, bias=True)
        self.k_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=True)
        self.v_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=True)
        self.o_proj = nn.Linear(cfg.num_heads * d, h, bias=False)
        self.gate_proj = nn.Linear(h, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(h, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, h, bias=False)
        self.input_layernorm = nn.Parameter(torch.ones(h))
        self.post_attention_layernorm = nn.Parameter(torch.ones(h))

    def _proj(self, name: str, x: torch.Tensor, slots: AdapterSlots | None, lora: LoRABatch | None) -> torch.Tensor:
        y = getattr(self, name)(x)
        if lora is not None and slots is not None and (self.idx, name) in slots.a:
            y = apply_lora(y, x, slots.a[(self.idx, name)], slots.b[(self.idx, name)], lora)
        return y

    def forward(self, x, cos, sin, k_cache, v_cache, meta: AttentionMetadata, slots, lora):
        cfg = self.cfg
        T = x.shape[0]
        h = rms_norm(x, self.input_layernorm, cfg.rms_norm_eps)
        q = self._proj("q_proj", h, slots, lora).view(T, cfg.num_heads, cfg.head_dim)
        k = self._proj("k_proj", h, slots, lora).view(T, cfg.num_kv_heads, cfg.head_dim)
        v = self._proj("v_proj", h, slots, lora).view(T, cfg.num_kv_heads, cfg.head_dim)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        attn = paged_attention(q, k, v, k_cache, v_cache, meta, cfg.head_dim ** -0.5)
        x = x + self._proj("o_proj", attn, slots, lora)
        h = rms_norm(x, self.post_attention_layernorm, cfg.rms_norm_eps)
        act = F.silu(self._proj("gate_proj", h, slots, lora)) * self._proj("up_proj", h, slots, lora)
        return x + self._proj("down_proj", act, slots, lora)


_LAYER_RENAMES = {
    "self_attn.q_proj": "q_proj", "self_attn.k_proj": "k_proj", "self_attn.v_proj": "v_proj",
    "self_attn.o_proj": "o_proj", "mlp.gate_proj": "gate_proj", "mlp.up_proj": "up_proj",
    "mlp.down_proj": "down_proj", "input_layernorm.weight": "input_layernorm",
    "post_attention_layernorm.weight": "post_attention_layernorm",
}


class QwenTextModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = nn.Parameter(torch.ones(cfg.hidden_size))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rope = MRoPE(cfg)

    @staticmethod
    def from_pretrained(model_dir: str | Path, device="cpu", dtype=torch.float32) -> "QwenTextModel":
        cfg = TextConfig.from_pretrained(model_dir)
        with torch.device("meta"):
            model = QwenTextModel(cfg)
        model = model.to_empty(device=device).to(dtype)
        model.rope = MRoPE(cfg).to(device)
        params = dict(model.named_parameters())
        loaded = set()
        for name, t in iter_tensors(model_dir, lambda n: n == "lm_head.weight" or
                                    (n.startswith("model.") and not n.startswith(("model.visual.",)))):
            target = _map_name(name)
            if target is None or target not in params:
                continue
            params[target].data.copy_(t.to(dtype))
            loaded.add(target)
        if cfg.tie_word_embeddings and "lm_head.weight" not in loaded:
            model.lm_head.weight = model.embed_tokens.weight
            loaded.add("lm_head.weight")
        missing = set(params) - loaded
        if missing:
            raise ValueError(f"checkpoint {model_dir} lacks language-model tensors: {sorted(missing)[:5]} ...")
        return model.eval()

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, kv_k, kv_v,
                image_rows: torch.Tensor | None = None, image_embeds: torch.Tensor | None = None,
                slots: AdapterSlots | None = None, lora: LoRABatch | None = None,
                logits_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Packed tokens [T] -> logits [len(logits_rows), vocab] (float32) for the rows that sample."""
        x = self.embed_tokens(input_ids)
        if image_rows is not None:
            x = x.index_copy(0, image_rows, image_embeds.to(x.dtype))
        cos, sin = self.rope(positions, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, kv_k[i], kv_v[i], meta, slots, lora)
        if logits_rows is not None:
            x = x.index_select(0, logits_rows)
        x = rms_norm(x, self.norm, self.cfg.rms_norm_eps)
        return self.lm_head(x).float()


def _map_name(name: str) -> str | None:
    if name == "lm_head.weight":
        return name
    for p in _LM_PREFIXES:
        if name.startswith(p):
            rest = name[len(p):]
            break
    else:
        return None
    if rest == "embed_tokens.weight":
        return rest
    if rest == "norm.weight":
        return "norm"
    if rest.startswith("layers."):
        _, idx, tail = rest.split(".", 2)
        for src, dst in _LAYER_RENAMES.items():
            if tail == src or tail.startswith(src + "."):
                return f"layers.{idx}.{dst}{tail[len(src):]}"
    return None
