"""Shared fixtures: one tiny checkpoint per test session, and the HF oracle loaded once."""

from __future__ import annotations

import pytest
import torch

from vlora.engine.tiny import write_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="session")
def hf_model(tiny_model_dir):
    """The HF reference implementation: the oracle every fast path is compared with."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def hf_image_processor(tiny_model_dir):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def peft_adapters(hf_model, tmp_path_factory):
    """Three PEFT adapters of different ranks, alphas (one rsLoRA) and target modules."""
    from tests.unit.oracle import random_peft_adapter

    d = tmp_path_factory.mktemp("adapters")
    return {
        "a1": random_peft_adapter(hf_model, d / "a1", seed=1, r=2, alpha=4),
        "a2": random_peft_adapter(hf_model, d / "a2", seed=2, r=8, alpha=8, use_rslora=True),
        "a3": random_peft_adapter(hf_model, d / "a3", seed=3, r=4, alpha=16, targets=("q_proj", "v_proj", "down_proj")),
    }
