"""The embedded default model: a tiny random-weight Qwen2.5-VL checkpoint, generated locally.

No model hub is reachable in CI, so the project writes its own checkpoint of the *real*
Qwen2.5-VL architecture (windowed + full-attention vision blocks, patch merger, M-RoPE text
stack with GQA) with a byte-level BPE tokenizer trained on a corpus shipped in
`engine/data/corpus.txt`. The folder has the same files as a hub checkpoint, so every loader
in the project (and HF's `from_pretrained`) treats it exactly like Qwen2.5-VL-7B-Instruct.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

# The special tokens of Qwen2.5-VL, in the order the real tokenizer numbers them.
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# One message of Qwen2.5-VL-Instruct's chat template: its turn, with image/video parts as vision pads
# (engine/tools.py's tool-calling template renders plain messages with it too).
QWEN2_5_VL_MESSAGE = (
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}"
)

# Qwen2.5-VL-Instruct's chat template (default system turn, image/video parts as vision pads).
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    + QWEN2_5_VL_MESSAGE +
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# OpenAI CLIP normalisation, as in Qwen2.5-VL's preprocessor_config.json.
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass(frozen=True, slots=True)
class TinySpec:
    """Sizes of the embedded model: small enough for 2 CPU cores, every architectural feature kept."""

    bpe_vocab: int = 1000
    hidden: int = 64
    intermediate: int = 176
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2  # GQA: 2 query heads share each KV head
    mrope_section: tuple[int, int, int] = (2, 3, 3)  # sums to head_dim / 2 = 8
    vision_depth: int = 4
    vision_hidden: int = 64
    vision_intermediate: int = 128
    vision_heads: int = 4
    fullatt_blocks: tuple[int, ...] = (1, 3)  # the others use window attention
    window_size: int = 112
    min_pixels: int = 56 * 56
    max_pixels: int = 448 * 448
    max_position_embeddings: int = 4096
    init_std: float = 0.08  # wider than HF's 0.02 so greedy argmax is not decided by rounding noise


def _train_tokenizer(vocab_size: int):
    """Byte-level BPE trained on the shipped corpus, Qwen specials appended after the BPE vocab."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = resources.files("vlora.engine.data").joinpath("corpus.txt").read_text(encoding="utf-8")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(corpus.splitlines(keepends=True), trainer=trainer)
    tok.add_special_tokens(QWEN_SPECIAL_TOKENS)
    return tok


def _save_tokenizer(out: Path, tok) -> dict[str, int]:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        additional_special_tokens=QWEN_SPECIAL_TOKENS[1:],
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
    )
    fast.chat_template = QWEN2_5_VL_CHAT_TEMPLATE
    fast.save_pretrained(out)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "Qwen2Tokenizer"
    cfg["errors"] = "replace"
    cfg["split_special_tokens"] = False
    cfg_path.write_text(json.dumps(cfg, indent=2))
    (out / "chat_template.json").write_text(json.dumps({"chat_template": QWEN2_5_VL_CHAT_TEMPLATE}))
    return {t: tok.token_to_id(t) for t in QWEN_SPECIAL_TOKENS}


def _model_config(spec: TinySpec, vocab_size: int, ids: dict[str, int]):
    from transformers import Qwen2_5_VLConfig

    head_dim = spec.hidden // spec.heads
    assert sum(spec.mrope_section) * 2 == head_dim, "mrope_section must cover head_dim / 2"
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=spec.hidden,
            intermediate_size=spec.intermediate,
            num_hidden_layers=spec.layers,
            num_attention_heads=spec.heads,
            num_key_value_heads=spec.kv_heads,
            max_position_embeddings=spec.max_position_embeddings,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": list(spec.mrope_section)},
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
            initializer_range=spec.init_std,
            tie_word_embeddings=False,
        ),
        vision_config=dict(
            depth=spec.vision_depth,
            hidden_size=spec.vision_hidden,
            intermediate_size=spec.vision_intermediate,
            num_heads=spec.vision_heads,
            out_hidden_size=spec.hidden,
            fullatt_block_indexes=list(spec.fullatt_blocks),
            window_size=spec.window_size,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            initializer_range=spec.init_std,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        tie_word_embeddings=False,
    )


def write_tiny_model(out_dir: str | os.PathLike, seed: int = 0, spec: TinySpec = TinySpec()) -> Path:
    """Write the tiny checkpoint to `out_dir` (atomically: a temp folder renamed into place).

    The same seed gives byte-identical weights, so tests and replicas agree on the model.
    """
    import torch
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=out.parent))
    tok = _train_tokenizer(spec.bpe_vocab)
    ids = _save_tokenizer(tmp, tok)
    vocab_size = ((tok.get_vocab_size() + 63) // 64) * 64
    config = _model_config(spec, vocab_size, ids)

    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).to(torch.float32).eval()
    with torch.no_grad():
        # HF zero-inits biases and sets norms to 1; random biases and norm gains make every
        # term of the forward pass count in parity tests.
        for name, p in model.named_parameters():
            if name.endswith(".bias") or "norm" in name:
                p.add_(torch.randn_like(p) * spec.init_std)
    model.save_pretrained(tmp, safe_serialization=True)
    GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
        do_sample=False,
    ).save_pretrained(tmp)
    (tmp / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "Qwen2VLImageProcessor",
                "processor_class": "Qwen2_5_VLProcessor",
                "do_resize": True,
                "do_rescale": True,
                "rescale_factor": 1 / 255,
                "do_normalize": True,
                "do_convert_rgb": True,
                "image_mean": CLIP_MEAN,
                "image_std": CLIP_STD,
                "min_pixels": spec.min_pixels,
                "max_pixels": spec.max_pixels,
                "patch_size": 14,
                "temporal_patch_size": 2,
                "merge_size": 2,
            },
            indent=2,
        )
    )
    (tmp / "vlora_tiny.json").write_text(json.dumps({"seed": seed, "spec": spec.__class__.__name__}))
    if out.exists():
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def ensure_tiny_model(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Return `out_dir`, generating the tiny checkpoint first if it is not there yet."""
    out = Path(out_dir)
    if not (out / "config.json").exists():
        write_tiny_model(out, seed=seed)
    return out
