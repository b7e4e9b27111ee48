"""PEFT adapter folders <-> `LoRAWeights`: what users bring from PEFT, and what we hand back to it.

A PEFT LoRA folder is `adapter_config.json` + `adapter_model.safetensors`. Only safetensors is
read (never a pickle). Only the language model's q/k/v/o/gate/up/down projections are served;
anything else in the file (vision-tower LoRA, DoRA, trained biases, modules_to_save) is refused
with a message that says so rather than silently ignored.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, load_file, save_file

from vlora.engine.config import LORA_TARGET_MODULES
from vlora.engine.lora import LoRAWeights

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"

_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?:model\.)?(?:language_model\.)?layers\.(\d+)\."
    r"(?:self_attn|mlp)\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.lora_([AB])(?:\.default)?\.weight$"
)


class AdapterFormatError(ValueError):
    """The folder is not a PEFT LoRA adapter we can serve; the message says what to fix."""


def read_adapter_config(folder: str | Path) -> dict:
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise AdapterFormatError(f"{path} not found: a PEFT adapter folder needs {CONFIG_NAME} and {WEIGHTS_NAME}")
    return parse_adapter_config(path.read_bytes())


def parse_adapter_config(raw: bytes) -> dict:
    try:
        cfg = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise AdapterFormatError(f"{CONFIG_NAME} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise AdapterFormatError(f"{CONFIG_NAME} must hold a JSON object")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterFormatError(f"peft_type is {cfg.get('peft_type')!r}; only LORA adapters are supported")
    for key, why in (("use_dora", "DoRA"), ("rank_pattern", "per-module ranks (rank_pattern)"),
                     ("alpha_pattern", "per-module alphas (alpha_pattern)"), ("modules_to_save", "modules_to_save")):
        if cfg.get(key):
            raise AdapterFormatError(f"{why} is not supported; train the adapter without it")
    if cfg.get("bias", "none") != "none":
        raise AdapterFormatError(f"bias={cfg['bias']!r} is not supported; use bias='none'")
    if not isinstance(cfg.get("r"), int) or isinstance(cfg.get("r"), bool) or cfg["r"] < 1:
        raise AdapterFormatError(f"adapter_config.json r must be a positive integer, got {cfg.get('r')!r}")
    return cfg


def parse_lora_state_dict(tensors: dict[str, torch.Tensor], cfg: dict) -> LoRAWeights:
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise AdapterFormatError(
                f"tensor {key!r} is not a LoRA weight of a language-model projection "
                f"({', '.join(LORA_TARGET_MODULES)}); vision-tower and other modules are not served")
        layer, mod, ab = int(m.group(1)), m.group(2), m.group(3)
        pairs.setdefault((layer, mod), {})[ab] = t
    if not pairs:
        raise AdapterFormatError(f"{WEIGHTS_NAME} holds no LoRA weights")
    r = cfg["r"]
    weights = {}
    for key, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise AdapterFormatError(f"layer {key[0]} {key[1]} has lora_{''.join(ab)} but not both lora_A and lora_B")
        a, b = ab["A"].float(), ab["B"].float()
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
            raise AdapterFormatError(
                f"layer {key[0]} {key[1]}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not match r={r}")
        weights[key] = (a, b)
    scaling = LoRAWeights.scaling_for(r, float(cfg.get("lora_alpha", r)), bool(cfg.get("use_rslora", False)))
    return LoRAWeights(rank=r, scaling=scaling, weights=weights)


def load_peft_adapter(folder: str | Path) -> tuple[LoRAWeights, dict]:
    """Read a PEFT LoRA folder; returns the weights and its adapter_config.json."""
    folder = Path(folder)
    cfg = read_adapter_config(folder)
    wpath = folder / WEIGHTS_NAME
    if not wpath.is_file():
        if (folder / "adapter_model.bin").exists():
            raise AdapterFormatError("adapter_model.bin (pickle) is not accepted; save the adapter with safetensors")
        raise AdapterFormatError(f"{wpath} not found")
    try:
        tensors = load_file(str(wpath))
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterFormatError(f"{WEIGHTS_NAME} is not a readable safetensors file: {e}") from None
    return parse_lora_state_dict(tensors, cfg), cfg


def parse_peft_adapter(config_raw: bytes | None, weights_raw: bytes | None) -> tuple[LoRAWeights, dict]:
    """`load_peft_adapter` over file contents already read (by adapters/folders.py)."""
    if config_raw is None:
        raise AdapterFormatError(f"{CONFIG_NAME} not found: a PEFT adapter folder needs {CONFIG_NAME} and "
                                 f"{WEIGHTS_NAME}")
    cfg = parse_adapter_config(config_raw)
    if weights_raw is None:
        raise AdapterFormatError(f"{WEIGHTS_NAME} not found (adapter_model.bin pickles are not accepted; save the "
                                 "adapter with safetensors)")
    try:
        tensors = load(weights_raw)
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterFormatError(f"{WEIGHTS_NAME} is not a readable safetensors file: {e}") from None
    return parse_lora_state_dict(tensors, cfg), cfg


def lora_state_dict(weights: LoRAWeights) -> dict[str, torch.Tensor]:
    """PEFT key names for a Qwen2.5-VL base (transformers >= 4.52 module layout)."""
    out = {}
    for (layer, mod), (a, b) in sorted(weights.weights.items()):
        part = "self_attn" if mod in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
        stem = f"base_model.model.model.language_model.layers.{layer}.{part}.{mod}"
        out[f"{stem}.lora_A.weight"] = a.detach().to(torch.float32).contiguous().cpu()
        out[f"{stem}.lora_B.weight"] = b.detach().to(torch.float32).contiguous().cpu()
    return out


def peft_target_regex(modules: list[str] | tuple[str, ...]) -> str:
    """PEFT target_modules regex for the language model only (the vision MLP shares module names)."""
    return r".*language_model.*\.(" + "|".join(modules) + r")$"


def save_peft_adapter(folder: str | Path, weights: LoRAWeights, lora_alpha: float, use_rslora: bool = False,
                      base_model: str | None = None) -> Path:
    """Write a PEFT-loadable adapter folder atomically (temp dir, fsync, rename)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    modules = sorted({m for _, m in weights.weights})
    cfg = {
        "peft_type": "LORA", "task_type": None, "r": weights.rank, "lora_alpha": lora_alpha,
        "use_rslora": use_rslora, "lora_dropout": 0.0, "bias": "none", "use_dora": False,
        "target_modules": peft_target_regex(modules), "base_model_name_or_path": base_model,
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
    }
    save_file(lora_state_dict(weights), str(tmp / WEIGHTS_NAME))
    (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder
