"""HF/PEFT as the oracle: reference generations and logits the engine is compared with."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def random_image(seed: int, h: int, w: int) -> Image.Image:
    rng = np.random.RandomState(seed)
    base = rng.randint(0, 255, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(base)


def hf_generate(model, input_ids: list[int], max_new_tokens: int, pixel_values=None, image_grid_thw=None) -> list[int]:
    """Greedy HF generate, EOS ignored, returning only the new token ids."""
    kw = {}
    if pixel_values is not None:
        ids = torch.tensor([input_ids])
        kw = dict(pixel_values=pixel_values, image_grid_thw=image_grid_thw,
                  mm_token_type_ids=(ids == model.config.image_token_id).long())
    out = model.generate(torch.tensor([input_ids]), max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                         do_sample=False, **kw)
    return out[0, len(input_ids):].tolist()


def hf_logits(model, input_ids: list[int], pixel_values=None, image_grid_thw=None) -> torch.Tensor:
    """Logits [L, vocab] of a teacher-forced forward over the whole sequence."""
    kw = {}
    ids = torch.tensor([input_ids])
    if pixel_values is not None:
        kw = dict(pixel_values=pixel_values, image_grid_thw=image_grid_thw,
                  mm_token_type_ids=(ids == model.config.image_token_id).long())
    with torch.no_grad():
        return model(ids, **kw).logits[0].float()


def random_peft_adapter(base_model, out_dir, seed: int, r: int, alpha: float, use_rslora: bool = False,
                        targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")):
    """Save a PEFT LoRA with random A and B (PEFT inits B to zero, which would test nothing)."""
    from peft import LoraConfig, get_peft_model

    from vlora.adapters.peft_io import peft_target_regex

    cfg = LoraConfig(r=r, lora_alpha=alpha, use_rslora=use_rslora, target_modules=peft_target_regex(targets))
    torch.manual_seed(seed)
    pm = get_peft_model(base_model, cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.2)
    pm.save_pretrained(out_dir)
    base = pm.unload()  # restore the shared HF model for the next caller
    assert base is base_model
    return out_dir


def peft_model(base_model, adapter_dir):
    """HF + PEFT with one adapter; the caller must `.unload()` it to give the base model back."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base_model, adapter_dir).eval()


def peft_generate(base_model, adapter_dir, prompt: list[int], n: int) -> list[int]:
    """HF + PEFT greedy continuation of `prompt` with one adapter: exactly `n` new token ids."""
    pm = peft_model(base_model, adapter_dir)
    try:
        out = pm.generate(input_ids=torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return out[0, len(prompt):].tolist()
    finally:
        pm.unload()
