"""PromptBuilder against HF: token ids as Qwen2_5_VLProcessor makes them, positions as get_rope_index does.

AutoProcessor cannot be built here (no torchvision), so the oracle runs the processor's own
pieces: the chat template, `Qwen2_5_VLProcessor.replace_image_token` for pad expansion,
`ProcessorMixin.create_mm_token_type_ids`, and the model's `get_rope_index`.
"""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from vlora.engine.prompts import PreparedPrompt, PromptBuilder, PromptConfig, PromptError, mrope_positions

IMAGE_TOKEN = "<|image_pad|>"


@pytest.fixture(scope="module")
def builder(tiny_model_dir):
    return PromptBuilder.from_pretrained(tiny_model_dir)


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def text_part(text: str) -> dict:
    return {"type": "text", "text": text}


def grids_for(hf_image_processor, sizes: list[tuple[int, int]]) -> torch.Tensor:
    """Real (t, h, w) grids from HF's image processor for random images of the given (h, w)."""
    rng = np.random.RandomState(0)
    images = [Image.fromarray(rng.randint(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
    return hf_image_processor(images=images, return_tensors="pt")["image_grid_thw"]


def hf_reference(messages, grid_thw, tokenizer, hf_image_processor, hf_model, add_generation_prompt=True):
    """(input_ids, positions [3, L], rope_delta) the way HF's processor + model compute them."""
    from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
    from transformers.processing_utils import ProcessorMixin

    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    pieces = text.split(IMAGE_TOKEN)
    num_images = 0 if grid_thw is None else len(grid_thw)
    assert len(pieces) == num_images + 1
    processor_view = SimpleNamespace(image_processor=hf_image_processor, image_token=IMAGE_TOKEN)
    expanded = pieces[0]
    for i in range(num_images):
        expanded += Qwen2_5_VLProcessor.replace_image_token(processor_view, {"image_grid_thw": grid_thw}, i)
        expanded += pieces[i + 1]
    input_ids = tokenizer(expanded)["input_ids"]
    if num_images == 0:
        # HF's model uses plain arange positions (delta 0) for text-only input.
        positions = torch.arange(len(input_ids)).view(1, -1).expand(3, -1)
        return input_ids, positions, 0
    token_type_view = SimpleNamespace(
        image_token_ids=[hf_model.config.image_token_id],
        video_token_ids=[hf_model.config.video_token_id],
        audio_token_ids=[],
    )
    mm_token_type_ids = ProcessorMixin.create_mm_token_type_ids(token_type_view, [input_ids])
    positions, deltas = hf_model.model.get_rope_index(
        torch.tensor([input_ids]), torch.tensor(mm_token_type_ids), image_grid_thw=grid_thw
    )
    return input_ids, positions[:, 0], int(deltas[0, 0])


def assert_matches_hf(prompt: PreparedPrompt, messages, grid_thw, tokenizer, hf_image_processor, hf_model, **kw):
    ids, positions, delta = hf_reference(messages, grid_thw, tokenizer, hf_image_processor, hf_model, **kw)
    assert prompt.token_ids == ids
    assert prompt.positions.dtype == torch.long
    assert prompt.positions.shape == (3, len(ids))
    assert torch.equal(prompt.positions, positions)
    assert prompt.rope_delta == delta


def check_image_spans(prompt: PreparedPrompt, config: PromptConfig):
    """Each span is exactly its grid's merged-patch count, framed by vision_start / vision_end."""
    assert len(prompt.image_token_spans) == len(prompt.image_grids)
    for (start, end), (t, h, w) in zip(prompt.image_token_spans, prompt.image_grids):
        assert end - start == t * h * w // config.spatial_merge_size**2
        assert set(prompt.token_ids[start:end]) == {config.image_token_id}
        assert prompt.token_ids[start - 1] == config.vision_start_token_id
        assert prompt.token_ids[end] == config.vision_end_token_id
    assert prompt.num_image_tokens == prompt.token_ids.count(config.image_token_id)


def test_text_only_chat_matches_hf(builder, tokenizer, hf_image_processor, hf_model):
    messages = [{"role": "user", "content": "Tell me about the sea."}]
    prompt = builder.build_chat(messages, [])
    assert_matches_hf(prompt, messages, None, tokenizer, hf_image_processor, hf_model)
    assert prompt.image_grids == [] and prompt.image_token_spans == [] and prompt.num_image_tokens == 0


def test_text_only_parts_and_no_generation_prompt(builder, tokenizer, hf_image_processor, hf_model):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [text_part("first "), text_part("second")]},
        {"role": "assistant", "content": "ok"},
    ]
    prompt = builder.build_chat(messages, [], add_generation_prompt=False)
    assert_matches_hf(prompt, messages, None, tokenizer, hf_image_processor, hf_model, add_generation_prompt=False)


def test_one_image_matches_hf(builder, tokenizer, hf_image_processor, hf_model):
    grid_thw = grids_for(hf_image_processor, [(100, 150)])
    messages = [{"role": "user", "content": [text_part("What is in this picture?"), image_part("http://x/a.png")]}]
    prompt = builder.build_chat(messages, [tuple(g) for g in grid_thw.tolist()])
    assert_matches_hf(prompt, messages, grid_thw, tokenizer, hf_image_processor, hf_model)
    check_image_spans(prompt, builder.config)
    assert prompt.rope_delta < 0  # 2-D image positions are fewer than its tokens


def test_two_images_of_different_sizes_matches_hf(builder, tokenizer, hf_image_processor, hf_model):
    grid_thw = grids_for(hf_image_processor, [(224, 112), (56, 56)])
    messages = [
        {
            "role": "user",
            "content": [image_part("data:a"), text_part("is taller than"), image_part("data:b"), text_part("?")],
        }
    ]
    prompt = builder.build_chat(messages, [tuple(g) for g in grid_thw.tolist()])
    assert_matches_hf(prompt, messages, grid_thw, tokenizer, hf_image_processor, hf_model)
    check_image_spans(prompt, builder.config)


def test_three_images_system_and_multi_turn_matches_hf(builder, tokenizer, hf_image_processor, hf_model):
    grid_thw = grids_for(hf_image_processor, [(300, 200), (56, 56), (100, 150)])
    messages = [
        {"role": "system", "content": "You describe images."},
        {"role": "user", "content": [text_part("Look:"), image_part("u1")]},
        {"role": "assistant", "content": "A landscape."},
        {"role": "user", "content": [image_part("u2"), image_part("u3"), text_part("And these two?")]},
    ]
    grids = [tuple(g) for g in grid_thw.tolist()]
    prompt = builder.build_chat(messages, grids)
    assert_matches_hf(prompt, messages, grid_thw, tokenizer, hf_image_processor, hf_model)
    check_image_spans(prompt, builder.config)
    assert prompt.image_grids == grids
    assert builder.image_urls(messages) == ["u1", "u2", "u3"]


def test_decode_positions_continue_after_max(builder, hf_image_processor):
    grid_thw = grids_for(hf_image_processor, [(224, 112)])
    messages = [{"role": "user", "content": [image_part("a"), text_part("hi")]}]
    prompt = builder.build_chat(messages, [tuple(g) for g in grid_thw.tolist()])
    first = int(prompt.positions.max()) + 1
    assert prompt.decode_position(0) == first
    assert prompt.decode_position(5) == first + 5
    assert prompt.decode_position(0) == prompt.num_tokens + prompt.rope_delta


@pytest.mark.parametrize("with_image", [True, False])
def test_prepared_prompt_pickles(builder, hf_image_processor, with_image):
    grid_thw = grids_for(hf_image_processor, [(100, 150)])
    content = [image_part("a"), text_part("x")] if with_image else [text_part("x")]
    grids = [tuple(g) for g in grid_thw.tolist()] if with_image else []
    prompt = builder.build_chat([{"role": "user", "content": content}], grids)
    blob = pickle.dumps(prompt)
    back = pickle.loads(blob)
    assert back.token_ids == prompt.token_ids
    assert torch.equal(back.positions, prompt.positions) and back.positions.dtype == torch.long
    assert back.positions.is_contiguous()
    assert (back.mrope is None) == (prompt.mrope is None) == (not with_image)  # text only: no tensor is built
    assert (back.rope_delta, back.image_grids, back.image_token_spans, back.num_image_tokens) == (
        prompt.rope_delta,
        prompt.image_grids,
        prompt.image_token_spans,
        prompt.num_image_tokens,
    )
    # no torch.save on the wire: positions go as numpy (images) or not at all (text only)
    assert b"torch" not in blob
    assert (b"numpy" in blob) == with_image


def test_build_text_is_plain_tokenization(builder, tokenizer):
    prompt = builder.build_text("Once upon a time")
    assert prompt.token_ids == tokenizer("Once upon a time")["input_ids"]
    assert torch.equal(prompt.positions, torch.arange(prompt.num_tokens).expand(3, -1))
    assert prompt.rope_delta == 0 and prompt.num_image_tokens == 0


def test_mrope_positions_text_only_is_arange(builder):
    positions, delta = mrope_positions([5, 6, 7, 8], [], builder.config)
    assert torch.equal(positions, torch.arange(4).expand(3, -1)) and delta == 0


@pytest.mark.parametrize(
    "messages, grids, message_part",
    [
        ([{"role": "user", "content": [image_part("a")]}], [], "1 image part(s) but 0 image grid(s)"),
        ([{"role": "user", "content": "no images"}], [(1, 4, 4)], "0 image part(s) but 1 image grid(s)"),
        (
            [{"role": "user", "content": [image_part("a"), image_part("b")]}],
            [(1, 4, 4)],
            "2 image part(s) but 1 image grid(s)",
        ),
        ([{"role": "function", "content": "x"}], [], "messages[0].role is 'function'; expected one of system, user, assistant, tool"),
        ([{"content": "x"}], [], "messages[0].role is None"),
        (
            [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}],
            [],
            "messages[0].content[0].type is 'input_audio'; supported part types are 'text' and 'image_url'",
        ),
        ([{"role": "user", "content": [{"type": "text", "text": 3}]}], [], "messages[0].content[0].text must be a string"),
        ([{"role": "user", "content": 42}], [], "messages[0].content must be a string or a list"),
        ([{"role": "user", "content": [image_part("")]}], [(1, 4, 4)], "image_url.url must be a non-empty string"),
        (
            [{"role": "system", "content": [image_part("a")]}],
            [(1, 4, 4)],
            "image parts are only allowed in user messages",
        ),
        ([{"role": "user", "content": "sneaky <|image_pad|>"}], [], "reserved token <|image_pad|>"),
        ([], [], "messages must be a non-empty list"),
        ([{"role": "user", "content": [image_part("a")]}], [(1, 3, 4)], "divisible by 2"),
    ],
)
def test_bad_chat_requests_raise_prompt_error(builder, messages, grids, message_part):
    with pytest.raises(PromptError) as err:
        builder.build_chat(messages, grids)
    assert message_part in str(err.value)
    assert isinstance(err.value, ValueError)


def test_bad_text_prompts_raise_prompt_error(builder):
    with pytest.raises(PromptError, match="prompt is empty"):
        builder.build_text("")
    with pytest.raises(PromptError, match="reserved token <\\|vision_start\\|>"):
        builder.build_text("a <|vision_start|> b")
    with pytest.raises(PromptError, match="prompt must be a string"):
        builder.build_text(["a"])


def test_mrope_positions_rejects_pad_count_mismatch(builder):
    pad = builder.config.image_token_id
    with pytest.raises(PromptError, match="3 image placeholder tokens but the 1 image\\(s\\) need 4"):
        mrope_positions([1, pad, pad, pad, 2], [(1, 4, 4)], builder.config)


def test_developer_role_renders_as_system(builder):
    """OpenAI's SDK sends `developer` for the system turn; Qwen's template only knows `system`."""
    as_developer = builder.build_chat([{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "hi"}], [])
    as_system = builder.build_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}], [])
    assert as_developer.token_ids == as_system.token_ids


def test_encoding_through_the_backend_equals_the_tokenizer_call(builder, tokenizer):
    """build_chat/build_text encode through the Rust backend; the ids are the transformers call's, and a
    backend set up differently (here: truncating) is not used."""
    texts = ["Once upon a time", "Hello 東京! 🎉 naïve", "<|im_start|> is text here", " spaced  out\n\ttabs", ""]
    for text in texts:
        for special in (False, True):
            assert builder._encode(text, special) == tokenizer(text, add_special_tokens=special)["input_ids"]
    long = "one two three four five six seven eight"
    full = tokenizer(long, add_special_tokens=False)["input_ids"]
    builder._backend.enable_truncation(3)
    try:
        assert builder._encode(long, False) == full and len(full) > 3
    finally:
        builder._backend.no_truncation()
