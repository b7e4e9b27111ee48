"""Online LoRA training: the tiny model learns to name a colour, and what it learns is served as trained.

The proof that learning works: before training the base model does not answer "red"/"blue";
after one `LoRATrainer.train` job, our engine with the returned adapter answers exactly "red" for
a red image and "blue" for a blue one, and plain HF+PEFT with the saved adapter agrees with it.
"""

from __future__ import annotations

import base64
import io

import pytest
import torch
from PIL import Image

from vlora.adapters.peft_io import load_peft_adapter, save_peft_adapter
from vlora.adapters.trainer import IGNORE_INDEX, LoRATrainer, TrainingDataError, TrainingDivergedError
from vlora.engine.config import EngineConfig, LORA_TARGET_MODULES
from vlora.engine.engine import LLMEngine
from vlora.engine.images import ImageTransform, load_image
from vlora.engine.prompts import PromptBuilder
from vlora.engine.sampling import SamplingParams
from vlora.engine.vision import VisionEncoder

QUESTION = "What colour is this?"
RED, BLUE = (255, 0, 0), (0, 0, 255)
# Reliable on the tiny model: the greedy answers are right from ~25 steps on (loss 7.2 -> 1.9;
# the floor is the unadapted final norm + lm_head bounding how peaked the logits can get).
COLOUR_JOB = dict(steps=40, learning_rate=1e-2, rank=8, lora_alpha=16)


def png_data_url(colour, size=56) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def user_image(url: str, text: str = QUESTION) -> dict:
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]}


def colour_example(colour, answer) -> dict:
    return {"messages": [user_image(png_data_url(colour)), {"role": "assistant", "content": answer}]}


COLOUR_EXAMPLES = [colour_example(RED, "red"), colour_example(BLUE, "blue")]
PROGRESS_CALLS: list[tuple[int, float]] = []  # what the colour job reported


@pytest.fixture(scope="module")
def trainer(tiny_model_dir):
    t = LoRATrainer(tiny_model_dir)
    t.initial_state = {k: v.clone() for k, v in t.model.state_dict().items()}
    return t


@pytest.fixture(scope="module")
def colours(trainer):
    calls = []
    result = trainer.train(COLOUR_EXAMPLES, progress=lambda step, loss: calls.append((step, loss)), **COLOUR_JOB)
    PROGRESS_CALLS[:] = calls
    return result


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return LLMEngine(EngineConfig(str(tiny_model_dir), block_size=4, num_kv_blocks=256, max_loras=2, max_lora_rank=8))


@pytest.fixture(scope="module")
def serving(tiny_model_dir):
    return PromptBuilder.from_pretrained(tiny_model_dir), ImageTransform.from_pretrained(tiny_model_dir), \
        VisionEncoder.from_pretrained(tiny_model_dir)


def colour_prompt(serving, colour):
    builder, transform, vision = serving
    processed = transform(load_image(png_data_url(colour)))
    prompt = builder.build_chat([user_image("x")], [processed.grid_thw])
    embeds = vision.encode([processed.pixel_values], [processed.grid_thw])[0]
    return prompt, embeds, processed


def answer(engine, serving, colour, adapter=None, max_tokens=8, ignore_eos=False):
    prompt, embeds, _ = colour_prompt(serving, colour)
    sp = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=ignore_eos)
    toks = engine.generate([prompt], sp, adapters=[adapter], image_embeds=[embeds])[0][0]
    return engine.tokenizer.decode(toks, skip_special_tokens=True), toks


def assert_base_unchanged(trainer):
    from peft.tuners.lora import LoraLayer

    assert not any(isinstance(m, LoraLayer) for m in trainer.model.modules())
    state = trainer.model.state_dict()
    assert state.keys() == trainer.initial_state.keys()
    assert all(torch.equal(state[k], v) for k, v in trainer.initial_state.items())
    assert not any(p.requires_grad for p in trainer.model.parameters())


def base_logits(trainer, ids=(892, 82, 88, 82, 83, 544, 198)):
    with torch.no_grad():
        return trainer.model(torch.tensor([list(ids)])).logits.clone()


# ---- 1. learning works ----------------------------------------------------------------------


def test_colours_are_learned_and_served_by_the_engine(trainer, colours, engine, serving):
    for colour in (RED, BLUE):
        text, _ = answer(engine, serving, colour)
        assert text.strip() not in ("red", "blue"), f"the base model already answers {text!r}"

    assert colours.steps == COLOUR_JOB["steps"] and len(colours.losses) == COLOUR_JOB["steps"]
    assert colours.num_examples == 2 and colours.num_target_tokens == 3 + 4  # re|d|<im_end>, b|l|ue|<im_end>
    assert colours.loss_before == colours.losses[0]
    assert colours.loss_after < colours.loss_before / 3, (colours.loss_before, colours.loss_after)
    assert [s for s, _ in PROGRESS_CALLS] == list(range(1, COLOUR_JOB["steps"] + 1))
    assert [v for _, v in PROGRESS_CALLS] == colours.losses

    w = colours.weights
    assert w.rank == 8 and w.scaling == 16 / 8 and colours.lora_alpha == 16 and not colours.use_rslora
    assert set(w.weights) == {(layer, m) for layer in range(4) for m in LORA_TARGET_MODULES}
    for a, b in w.weights.values():
        assert a.dtype == b.dtype == torch.float32 and a.device.type == b.device.type == "cpu"
        assert a.shape[0] == b.shape[1] == 8

    engine.add_lora("colours", w)
    for colour, word in ((RED, "red"), (BLUE, "blue")):
        text, toks = answer(engine, serving, colour, adapter="colours")
        assert text == word, f"{word} image answered {text!r}"
        assert toks[-1] in engine.eos_token_ids  # stopped by <|im_end|>, as trained
    assert_base_unchanged(trainer)


def test_training_is_deterministic(trainer, colours):
    again = trainer.train(COLOUR_EXAMPLES, **COLOUR_JOB)
    assert again.losses == colours.losses
    assert all(torch.equal(again.weights.weights[k][0], a) and torch.equal(again.weights.weights[k][1], b)
               for k, (a, b) in colours.weights.weights.items())


# ---- 2. the adapter is a plain PEFT adapter -------------------------------------------------


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_saved_adapter_loads_in_peft_and_matches_the_engine(colours, engine, serving, hf_model, tmp_path):
    from peft import PeftModel

    folder = save_peft_adapter(tmp_path / "colours", colours.weights, colours.lora_alpha, colours.use_rslora)
    reloaded, _ = load_peft_adapter(folder)
    assert reloaded.scaling == colours.weights.scaling
    engine.add_lora("colours-reloaded", reloaded)
    pm = PeftModel.from_pretrained(hf_model, folder).eval()
    try:
        scalings = {m.scaling["default"] for m in pm.modules() if hasattr(m, "lora_A") and "default" in m.scaling}
        assert scalings == {colours.weights.scaling}
        for colour, word in ((RED, "red"), (BLUE, "blue")):
            prompt, _, processed = colour_prompt(serving, colour)
            ids = torch.tensor([prompt.token_ids])
            with torch.no_grad():  # greedy until EOS (the oracle's hf_generate forbids EOS)
                out = pm.generate(ids, max_new_tokens=6, do_sample=False, pixel_values=processed.pixel_values,
                                  image_grid_thw=torch.tensor([processed.grid_thw]),
                                  mm_token_type_ids=(ids == hf_model.config.image_token_id).long())
            ref = out[0, ids.shape[1]:].tolist()
            text, ours = answer(engine, serving, colour, adapter="colours-reloaded", max_tokens=6)
            assert ours == ref
            assert text == engine.tokenizer.decode(ref, skip_special_tokens=True) == word
    finally:
        base = pm.unload()
        assert base is hf_model


# ---- 3. loss masking --------------------------------------------------------------------------


def test_labels_cover_exactly_the_assistant_turns(trainer, tokenizer):
    example = {"messages": [
        {"role": "system", "content": "You name colours."},
        user_image(png_data_url(RED)),
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "And the sky?"},
        {"role": "assistant", "content": [{"type": "text", "text": "blue, mostly"}]},
        {"role": "user", "content": "Thanks"},
    ]}
    ex = trainer.tokenize_example(example)
    assert len(ex.labels) == len(ex.token_ids) and len(ex.spans) == 2
    for start, end in ex.spans:
        assert ex.labels[start:end] == ex.token_ids[start:end]
        head = max(k for k in range(start) if ex.token_ids[k] == tokenizer.convert_tokens_to_ids("<|im_start|>"))
        assert tokenizer.decode(ex.token_ids[head:start]) == "<|im_start|>assistant\n"
        assert tokenizer.decode(ex.token_ids[end:end + 1]) == "\n"
    targets = [t for t in ex.labels if t != IGNORE_INDEX]
    assert len(targets) == sum(e - s for s, e in ex.spans) == ex.num_target_tokens
    assert [tokenizer.decode(ex.labels[s:e]) for s, e in ex.spans] == ["red<|im_end|>", "blue, mostly<|im_end|>"]
    assert ex.image_grids == [(1, 4, 4)] and ex.token_ids.count(trainer.model.config.image_token_id) == 4


def test_loss_is_hf_causal_lm_loss_on_the_assistant_tokens(trainer, hf_model):
    """0 steps: the reported loss is HF's own loss (pixel values, mm_token_type_ids, labels)."""
    example = colour_example(BLUE, "blue")
    result = trainer.train([example], steps=0)
    assert result.losses == [] and result.loss_before == result.loss_after
    ex = trainer.tokenize_example(example)
    ids = torch.tensor([ex.token_ids])
    with torch.no_grad():
        ref = hf_model(ids, pixel_values=ex.pixel_values, image_grid_thw=torch.tensor(ex.image_grids),
                       mm_token_type_ids=(ids == hf_model.config.image_token_id).long(),
                       labels=torch.tensor([ex.labels])).loss
    assert abs(result.loss_before - ref.item()) < 1e-4


# ---- 4. divergence ----------------------------------------------------------------------------


def test_huge_learning_rate_diverges_and_leaves_the_base_unchanged(trainer, colours):
    before = base_logits(trainer)
    with pytest.raises(TrainingDivergedError, match=r"at step \d+ .*lower learning rate"):
        trainer.train(COLOUR_EXAMPLES, steps=30, learning_rate=1e6)
    assert torch.equal(base_logits(trainer), before)
    assert_base_unchanged(trainer)
    trainer.train(COLOUR_EXAMPLES, steps=1)  # the trainer still works
    assert torch.equal(base_logits(trainer), before)


# ---- 5. continuing an adapter -----------------------------------------------------------------


def test_init_continues_an_adapter(trainer, colours):
    same = trainer.train(COLOUR_EXAMPLES, steps=0, init=colours.weights, init_alpha=colours.lora_alpha)
    assert same.weights.rank == 8 and same.weights.scaling == colours.weights.scaling and same.lora_alpha == 16
    for key, (a, b) in colours.weights.weights.items():
        a2, b2 = same.weights.weights[key]
        assert (a2 - a).abs().max() <= 1e-6 and (b2 - b).abs().max() <= 1e-6
    assert abs(same.loss_before - colours.loss_after) < 1e-4  # it starts where the first job ended

    more = trainer.train(COLOUR_EXAMPLES, steps=3, learning_rate=1e-2, init=colours.weights)  # alpha from scaling
    assert more.lora_alpha == pytest.approx(16)
    assert any(not torch.equal(more.weights.weights[k][1], b) for k, (_, b) in colours.weights.weights.items())
    assert more.loss_before == pytest.approx(colours.loss_after, abs=1e-4)
    with pytest.raises(ValueError, match="init.scaling"):
        trainer.train(COLOUR_EXAMPLES, steps=0, init=colours.weights, init_alpha=3.0)
    assert_base_unchanged(trainer)


def test_rslora_and_subset_of_modules(trainer):
    r = trainer.train(COLOUR_EXAMPLES[:1], steps=2, rank=4, lora_alpha=8, use_rslora=True,
                      target_modules=["q_proj", "down_proj"])
    assert r.weights.scaling == 8 / 2 and r.use_rslora
    assert {m for _, m in r.weights.weights} == {"q_proj", "down_proj"}
    again = trainer.train(COLOUR_EXAMPLES[:1], steps=0, init=r.weights, use_rslora=True)
    assert again.lora_alpha == pytest.approx(8) and again.weights.scaling == pytest.approx(4.0)
    assert set(again.weights.weights) == set(r.weights.weights)
    assert all(torch.allclose(again.weights.weights[k][0], a, atol=1e-6) for k, (a, _) in r.weights.weights.items())


# ---- 6. bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize("examples, message", [
    ([], "non-empty list"),
    ("not a list", "non-empty list"),
    ([colour_example(RED, "red"), {"messages": [{"role": "user", "content": "hi"}]}], "example 1 has no assistant"),
    ([{"prompt": "x"}], "example 0 must be an object with a 'messages' list"),
    ([{"messages": [{"role": "assistant", "content": "hi"}]}], "example 0: messages\\[0\\] is an assistant turn"),
    ([{"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}],
     "example 0: messages\\[0\\].role"),
    ([{"messages": [{"role": "user", "content": [{"type": "audio"}]}, {"role": "assistant", "content": "x"}]}],
     "example 0: messages\\[0\\].content\\[0\\].type"),
    ([colour_example(RED, "red"), {"messages": [user_image("data:image/png;base64,AAAA"),
                                                {"role": "assistant", "content": "x"}]}],
     "example 1: messages\\[0\\].content\\[0\\] image: .*"),
], ids=["empty", "not-a-list", "no-assistant", "no-messages", "assistant-first", "bad-role", "bad-part", "bad-image"])
def test_bad_examples_are_refused(trainer, examples, message):
    with pytest.raises(TrainingDataError, match=message):
        trainer.train(examples, steps=1)
    assert_base_unchanged(trainer)


def test_a_turn_that_tokenizes_differently_in_context_is_refused(trainer, monkeypatch):
    """Real BPE vocabularies can merge a turn with its neighbours (say '\\n' + '\\n...'): then the
    assistant span cannot be located honestly, and the example is refused rather than mis-masked."""
    build = trainer.builder.build_chat

    def merging(messages, grids, add_generation_prompt=True, tools=None):
        prompt = build(messages, grids, add_generation_prompt, tools)
        if add_generation_prompt:
            prompt.token_ids = prompt.token_ids[:-1] + [prompt.token_ids[-1] + 1]
        return prompt

    monkeypatch.setattr(trainer.builder, "build_chat", merging)
    with pytest.raises(TrainingDataError, match=r"example 0: messages\[1\] \(assistant\) does not tokenize the same"):
        trainer.train([colour_example(RED, "red")], steps=1)


def test_bad_hyper_parameters_are_refused(trainer):
    for kwargs, message in [(dict(steps=-1), "steps"), (dict(learning_rate=0), "learning_rate"),
                            (dict(rank=0), "rank"), (dict(target_modules=["lm_head"]), "target_modules")]:
        with pytest.raises(ValueError, match=message):
            trainer.train(COLOUR_EXAMPLES, **kwargs)


def test_tool_call_examples_put_the_loss_on_assistant_turns_including_the_calls(trainer):
    """Tools render into the system turn, the call and the tool result as at serving time; the
    targets are exactly the two assistant turns (the call's text included), nothing else."""
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    ex = {"tools": tools, "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny."}]}
    t = trainer.tokenize_example(ex)
    tok = trainer.tokenizer
    targets = [tok.decode(t.token_ids[a:b]) for a, b in t.spans]
    assert targets == ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
                       "It is sunny.<|im_end|>"]
    assert sum(b - a for a, b in t.spans) == t.num_target_tokens
    context = tok.decode(t.token_ids)
    assert '"name": "get_weather"' in context.split("<|im_end|>")[0]  # the tool list is in the system turn
    assert "<tool_response>\nsunny\n</tool_response>" in context
