"""The engine against HF (and HF+PEFT): token-identical greedy output, logits within 1e-4."""

from __future__ import annotations

import pytest
import torch

from vlora.adapters.peft_io import load_peft_adapter
from vlora.engine.config import EngineConfig
from vlora.engine.engine import LLMEngine, RequestError
from vlora.engine.lora import LoRAWeights
from vlora.engine.model import QwenTextModel
from vlora.engine.attention import AttentionMetadata
from vlora.engine.kv_cache import KVCache
from vlora.engine.prompts import PromptBuilder
from vlora.engine.sampling import SamplingParams
from vlora.engine.vision import VisionEncoder
from tests.unit.oracle import hf_generate, hf_logits, peft_generate, random_image

GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return LLMEngine(EngineConfig(str(tiny_model_dir), block_size=4, num_kv_blocks=512, max_loras=4, max_lora_rank=8))


@pytest.fixture(scope="module")
def builder(tiny_model_dir):
    return PromptBuilder.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def vision(tiny_model_dir):
    return VisionEncoder.from_pretrained(tiny_model_dir)


def chat(builder, text, grids=()):
    parts = [{"type": "image_url", "image_url": {"url": "x"}} for _ in grids] + [{"type": "text", "text": text}]
    return builder.build_chat([{"role": "user", "content": parts}], list(grids))


def assert_pool_free(engine):
    assert not engine.has_unfinished()
    assert engine.pool.num_free_blocks == engine.pool.num_blocks


def check_packed_forward_matches_hf(forward, hf_model) -> None:
    """Two prefills then a mixed decode step through the paged cache: logits within 1e-4 of HF.
    `forward(ids, positions, meta)` is the model's packed forward over its own KV cache."""
    a, b = [5, 6, 7, 8, 9, 10, 11], [20, 21, 22]
    meta = AttentionMetadata.build([[3, 1], [7]], [0, 0], [7, 3], 4, "cpu")
    pos = torch.cat([torch.arange(7), torch.arange(3)]).expand(3, -1)
    lg = forward(torch.tensor(a + b), pos, meta)
    assert (lg[:7] - hf_logits(hf_model, a)).abs().max() < 1e-4
    assert (lg[7:] - hf_logits(hf_model, b)).abs().max() < 1e-4
    meta = AttentionMetadata.build([[3, 1], [7]], [7, 3], [1, 1], 4, "cpu")
    lg = forward(torch.tensor([3, 4]), torch.tensor([7, 3]).expand(3, -1), meta)
    assert (lg[0] - hf_logits(hf_model, a + [3])[-1]).abs().max() < 1e-4
    assert (lg[1] - hf_logits(hf_model, b + [4])[-1]).abs().max() < 1e-4


def test_packed_forward_logits_match_hf(tiny_model_dir, hf_model):
    m = QwenTextModel.from_pretrained(tiny_model_dir)
    c = m.cfg
    kv = KVCache(c.num_layers, 16, 4, c.num_kv_heads, c.head_dim, torch.float32, "cpu")
    check_packed_forward_matches_hf(lambda ids, pos, meta: m(ids, pos, meta, kv.k, kv.v), hf_model)


def test_text_prompts_greedy_match_hf(engine, builder, hf_model):
    prompts = [chat(builder, t) for t in ["What colour is this?", "Hello", "Describe the image in detail please."]]
    outs = engine.generate(prompts, SamplingParams(max_tokens=12, **GREEDY))
    for p, o in zip(prompts, outs):
        assert o[0] == hf_generate(hf_model, p.token_ids, 12)
    assert_pool_free(engine)


def _images(hf_image_processor, sizes, seed=0):
    imgs = [random_image(seed + i, h, w) for i, (h, w) in enumerate(sizes)]
    feats = hf_image_processor(images=imgs, return_tensors="pt")
    grids = [tuple(g) for g in feats["image_grid_thw"].tolist()]
    return feats, grids


def check_image_prompt_matches_hf(engine, builder, vision, hf_model, hf_image_processor, sizes) -> None:
    """One image prompt, greedy with logprobs: HF's tokens, and log_softmax of HF's logits for them."""
    feats, grids = _images(hf_image_processor, sizes)
    prompt = chat(builder, "What colour is this?", grids)
    counts = [t * h * w for t, h, w in grids]
    embeds = torch.cat(vision.encode(list(feats["pixel_values"].split(counts)), grids))
    rid = engine.add_request(prompt, SamplingParams(max_tokens=10, logprobs=True, top_logprobs=5, **GREEDY),
                             image_embeds=embeds)
    toks, lps = [], []
    while engine.has_unfinished():
        for o in engine.step():
            assert o.request_id == rid
            toks += o.choices[0].token_ids
            lps += o.choices[0].logprobs
    ref = hf_generate(hf_model, prompt.token_ids, 10, feats["pixel_values"], feats["image_grid_thw"])
    assert toks == ref
    # logprobs are log_softmax of the oracle's logits for the same tokens
    full = hf_logits(hf_model, prompt.token_ids + toks, feats["pixel_values"], feats["image_grid_thw"])
    ref_lp = torch.log_softmax(full[len(prompt.token_ids) - 1:-1], dim=-1)
    for k, lp in enumerate(lps):
        assert abs(lp.logprob - ref_lp[k, toks[k]].item()) < 1e-4
        top_ids = ref_lp[k].topk(5).indices.tolist()
        assert [t for t, _ in lp.top] == top_ids
        assert all(abs(v - ref_lp[k, t].item()) < 1e-4 for t, v in lp.top)
    assert_pool_free(engine)


@pytest.mark.parametrize("sizes", [[(56, 84)], [(84, 56), (112, 112)]], ids=["one-image", "two-images"])
def test_image_prompts_greedy_match_hf(engine, builder, vision, hf_model, hf_image_processor, sizes):
    check_image_prompt_matches_hf(engine, builder, vision, hf_model, hf_image_processor, sizes)


def test_continuous_batching_16_requests_joining_at_different_steps(engine, tokenizer, hf_model):
    words = "the quick brown fox jumps over the lazy dog while a red cat sleeps on the green chair".split()
    prompts = [tokenizer(" ".join(words[: 2 + i % 14])).input_ids for i in range(16)]
    lengths = [6 + (i * 5) % 11 for i in range(16)]
    got: dict[str, list[int]] = {}
    ids = []
    step = 0
    while len(ids) < 16 or engine.has_unfinished():
        if len(ids) < 16 and step % 2 == 0:  # a new request every other step
            i = len(ids)
            ids.append(engine.add_request(prompts[i], SamplingParams(max_tokens=lengths[i], **GREEDY)))
            got[ids[-1]] = []
        for o in engine.step():
            got[o.request_id] += o.choices[0].token_ids
        step += 1
    for i, rid in enumerate(ids):
        assert got[rid] == hf_generate(hf_model, prompts[i], lengths[i]), f"request {i}"
    assert_pool_free(engine)


def test_small_kv_pool_forces_waiting_and_preemption(tiny_model_dir, tokenizer, hf_model):
    # 12 blocks of 4 tokens: each request needs up to 6 blocks, so 4 of them cannot run at once.
    eng = LLMEngine(EngineConfig(str(tiny_model_dir), block_size=4, num_kv_blocks=12, max_num_seqs=4,
                                 max_num_batched_tokens=64, max_loras=0))
    prompts = [tokenizer(t).input_ids for t in ["Hello there", "What is this?", "A red cat", "Numbers: 1 2 3"]]
    outs = eng.generate(prompts, SamplingParams(max_tokens=14, **GREEDY))
    for p, o in zip(prompts, outs):
        assert o[0] == hf_generate(hf_model, p, 14)
    assert eng.num_preemptions > 0
    assert_pool_free(eng)


def test_chunked_prefill_matches_hf(tiny_model_dir, tokenizer, hf_model):
    eng = LLMEngine(EngineConfig(str(tiny_model_dir), block_size=4, num_kv_blocks=64, max_num_seqs=2,
                                 max_num_batched_tokens=5, max_loras=0))
    p = tokenizer("The quick brown fox jumps over the lazy dog. Pack my box with five dozen jugs.").input_ids
    assert len(p) > 10
    assert eng.generate([p], SamplingParams(max_tokens=8, **GREEDY))[0][0] == hf_generate(hf_model, p, 8)
    assert_pool_free(eng)


def check_adapters_and_base_in_one_batch_match_hf_peft(engine, prompt, hf_model, peft_adapters) -> None:
    """Three adapters and the base, interleaved in one batch: each row's greedy tokens equal HF+PEFT's."""
    for name, path in peft_adapters.items():
        engine.add_lora(name, load_peft_adapter(path)[0])
    names = ["a1", None, "a2", "a3", None, "a1"]
    outs = engine.generate([prompt] * len(names), SamplingParams(max_tokens=10, **GREEDY), adapters=names)
    base_ref = hf_generate(hf_model, prompt, 10)
    refs = {n: peft_generate(hf_model, p, prompt, 10) for n, p in peft_adapters.items()}
    assert len({tuple(r) for r in refs.values()} | {tuple(base_ref)}) == 4  # the adapters really differ
    for name, out in zip(names, outs):
        assert out[0] == (base_ref if name is None else refs[name]), name
    assert_pool_free(engine)


def test_three_adapters_and_base_in_one_batch_match_hf_peft(engine, tokenizer, hf_model, peft_adapters):
    check_adapters_and_base_in_one_batch_match_hf_peft(engine, tokenizer("What colour is this? It is").input_ids,
                                                       hf_model, peft_adapters)


def flipped_weights(w: LoRAWeights) -> LoRAWeights:
    """Another version of adapter `w`: its B matrices times -3 (different tokens, same shapes)."""
    return LoRAWeights(w.rank, w.scaling, {k: (a, -3 * b) for k, (a, b) in w.weights.items()})


def swap_mid_run(engine, prompt, sp, new_a1: LoRAWeights) -> list[list[int]]:
    """Requests on a1, a2 and the base; a1's slot rewritten in place before step 5. Their tokens."""
    rids = [engine.add_request(prompt, sp, a) for a in ["a1", "a2", None]]
    got = {r: [] for r in rids}
    steps = 0
    while engine.has_unfinished():
        if steps == 5:
            engine.slots.load(engine.loras.resident["a1"], new_a1)  # in place, between steps
        for o in engine.step():
            got[o.request_id] += o.choices[0].token_ids
        steps += 1
    return [got[r] for r in rids]


def test_swapping_one_slot_mid_run_changes_only_that_adapter(engine, tokenizer, hf_model, peft_adapters):
    """Rewriting a slot's weights in place between steps: only that slot's later tokens change."""
    for name, path in peft_adapters.items():
        engine.add_lora(name, load_peft_adapter(path)[0])
    prompt = tokenizer("Hello! How can I help").input_ids
    sp = SamplingParams(max_tokens=12, **GREEDY)
    before = engine.generate([prompt] * 3, sp, adapters=["a1", "a2", None])
    w = load_peft_adapter(peft_adapters["a1"])[0]
    a1, a2, base = swap_mid_run(engine, prompt, sp, flipped_weights(w))
    assert a2 == before[1][0] and base == before[2][0]
    assert a1[:5] == before[0][0][:5]  # tokens sampled before the swap are unchanged
    assert a1 != before[0][0]
    engine.slots.load(engine.loras.resident["a1"], w)
    assert_pool_free(engine)


def test_a_new_version_serves_new_requests_while_running_ones_finish_on_theirs(engine, tokenizer, peft_adapters):
    """add_lora while a request runs: it keeps (and reports) v1; requests admitted later get v2."""
    w = load_peft_adapter(peft_adapters["a1"])[0]
    flipped = flipped_weights(w)
    engine.add_lora("a1", w, version=1)
    prompt = tokenizer("Hello! How can I help").input_ids
    sp = SamplingParams(max_tokens=12, **GREEDY)
    v1_alone = engine.generate([prompt], sp, adapters=["a1"])[0][0]
    old = engine.add_request(prompt, sp, "a1")
    got, versions = {old: []}, {}
    for _ in range(4):
        for o in engine.step():
            got[o.request_id] += o.choices[0].token_ids
            versions[o.request_id] = o.adapter_version
    engine.add_lora("a1", flipped, version=2)
    new = engine.add_request(prompt, sp, "a1")
    got[new] = []
    while engine.has_unfinished():
        for o in engine.step():
            got[o.request_id] += o.choices[0].token_ids
            versions[o.request_id] = o.adapter_version
    assert got[old] == v1_alone and versions[old] == 1
    assert versions[new] == 2 and got[new] != v1_alone
    engine.add_lora("a1", flipped, version=3)  # idle now: rewritten in place
    assert engine.generate([prompt], sp, adapters=["a1"])[0][0] == got[new]
    assert len(engine.loras._retiring) == 0
    engine.add_lora("a1", w, version=4)
    assert_pool_free(engine)


def test_adapter_rank_above_max_is_refused_without_changing_anything(engine, peft_adapters, tokenizer):
    from vlora.engine.lora import LoRASlotError

    w = load_peft_adapter(peft_adapters["a2"])[0]
    big = LoRAWeights(16, 1.0, {k: (torch.zeros(16, a.shape[1]), torch.zeros(b.shape[0], 16))
                                for k, (a, b) in w.weights.items()})
    with pytest.raises(LoRASlotError, match="rank 16 exceeds the engine's max_lora_rank 8"):
        engine.add_lora("big", big)
    assert "big" not in engine.loras.adapters


def test_seeded_sampling_is_reproducible_and_batch_independent(engine, tokenizer):
    p = tokenizer("Describe the image.").input_ids
    sp = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    alone = engine.generate([p], sp)[0][0]
    again = engine.generate([p], sp)[0][0]
    noisy = SamplingParams(max_tokens=7, temperature=0.8, seed=9, ignore_eos=True)
    rids = [engine.add_request(p, noisy), engine.add_request(p, sp), engine.add_request(p[:3], noisy)]
    got = {r: [] for r in rids}
    while engine.has_unfinished():
        for o in engine.step():
            got[o.request_id] += o.choices[0].token_ids
    assert alone == again == got[rids[1]]
    other = engine.generate([p], SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=99, ignore_eos=True))
    assert other[0][0] != alone
    assert_pool_free(engine)


def test_n_greater_than_one(engine, tokenizer, hf_model):
    p = tokenizer("Hello").input_ids
    greedy = engine.generate([p], SamplingParams(max_tokens=6, n=2, **GREEDY))[0]
    assert greedy[0] == greedy[1] == hf_generate(hf_model, p, 6)
    sampled = engine.generate([p], SamplingParams(max_tokens=8, n=3, temperature=1.5, seed=7, ignore_eos=True))[0]
    assert len(sampled) == 3 and all(len(s) == 8 for s in sampled)
    assert len({tuple(s) for s in sampled}) > 1  # seed + index: the choices differ
    assert engine.generate([p], SamplingParams(max_tokens=8, n=3, temperature=1.5, seed=7, ignore_eos=True))[0] == sampled
    assert_pool_free(engine)


def _run_text(engine, prompt, sp):
    engine.add_request(prompt, sp)
    text, toks, reason = "", [], None
    while engine.has_unfinished():
        for o in engine.step():
            c = o.choices[0]
            text += c.text
            toks += c.token_ids
            reason = c.finish_reason or reason
    return text, toks, reason


def test_stop_strings_and_max_tokens(engine, tokenizer):
    p = tokenizer("Please write a short poem about the sea.").input_ids
    full, toks, reason = _run_text(engine, p, SamplingParams(max_tokens=16, **GREEDY))
    assert reason == "length" and len(toks) == 16
    assert full == tokenizer.decode(toks, skip_special_tokens=True)
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip(), f"pick a visible stop string from {full!r}"
    cut = full.index(stop)
    text, toks2, reason = _run_text(engine, p, SamplingParams(max_tokens=16, stop=[stop], **GREEDY))
    assert reason == "stop" and text == full[:cut]
    assert toks2 == toks[: len(toks2)] and len(toks2) < 16
    text, _, _ = _run_text(engine, p, SamplingParams(max_tokens=16, stop=[stop], include_stop_str_in_output=True,
                                                     **GREEDY))
    assert text == full[:cut + len(stop)]
    # a stop token id ends the sequence right there
    text, toks3, reason = _run_text(engine, p, SamplingParams(max_tokens=16, stop_token_ids=[toks[3]],
                                                              **GREEDY))
    assert reason == "stop" and toks3 == toks[: toks.index(toks[3]) + 1]
    assert_pool_free(engine)


def test_eos_finishes_with_stop(engine, tokenizer, hf_model):
    """Without ignore_eos the first EOS ends the sequence with finish_reason 'stop', EOS included."""
    p = tokenizer("Hello").input_ids
    toks = hf_generate(hf_model, p, 4)
    declared = engine.eos_token_ids
    assert declared  # the checkpoint's generation_config names its EOS ids
    engine.eos_token_ids = frozenset([toks[2]])  # make the third greedy token an EOS
    try:
        text, got, reason = _run_text(engine, p, SamplingParams(max_tokens=16, temperature=0))
    finally:
        engine.eos_token_ids = declared
    assert reason == "stop" and got == toks[: toks.index(toks[2]) + 1]
    assert_pool_free(engine)


def test_abort_frees_kv_blocks(engine, tokenizer):
    p = tokenizer("The quick brown fox").input_ids
    sp = SamplingParams(max_tokens=50, **GREEDY)
    rids = [engine.add_request(p, sp) for _ in range(3)]
    engine.step()
    engine.step()
    assert engine.pool.num_used_blocks > 0
    assert engine.abort(rids[0]) and engine.abort(rids[2])
    assert not engine.abort("no-such-request")
    while engine.has_unfinished():
        engine.step()
    assert_pool_free(engine)
    rid = engine.add_request(p, sp)
    engine.abort(rid)  # aborted before its first step
    assert_pool_free(engine)


def test_request_errors(engine, tokenizer):
    with pytest.raises(RequestError, match="maximum context length is .* tokens"):
        engine.add_request([1] * 10, SamplingParams(max_tokens=engine.max_model_len))
    with pytest.raises(RequestError, match="prompt is empty"):
        engine.add_request([], SamplingParams())
    with pytest.raises(RequestError, match="outside the vocabulary"):
        engine.add_request([10**6], SamplingParams())
    with pytest.raises(RequestError, match="1 image tokens but 0 image embedding rows"):
        engine.add_request([engine.model.cfg.image_token_id, 5], SamplingParams())
    from vlora.engine.lora_manager import UnknownAdapterError

    with pytest.raises(UnknownAdapterError, match="adapter 'nope' is not loaded"):
        engine.add_request([5, 6], SamplingParams(), adapter="nope")
    assert_pool_free(engine)


def test_adapters_beyond_the_slot_limit_are_paged_in_lru(tiny_model_dir, tokenizer, hf_model, peft_adapters):
    """3 adapters, 2 slots: requests for all three complete with each adapter's exact output."""
    eng = LLMEngine(EngineConfig(str(tiny_model_dir), block_size=4, num_kv_blocks=256, max_loras=2, max_lora_rank=8))
    for name, path in peft_adapters.items():
        eng.add_lora(name, load_peft_adapter(path)[0])
    prompt = tokenizer("Describe the image.").input_ids
    sp = SamplingParams(max_tokens=6, **GREEDY)
    alone = {n: peft_generate(hf_model, p, prompt, 6) for n, p in peft_adapters.items()}
    outs = eng.generate([prompt] * 3, sp, adapters=["a1", "a2", "a3"])  # a3 waits for a free slot
    assert [o[0] for o in outs] == [alone["a1"], alone["a2"], alone["a3"]]
    assert set(eng.loras.resident) == {"a2", "a3"} or set(eng.loras.resident) == {"a1", "a3"}
    outs = eng.generate([prompt], sp, adapters=["a1"])  # evicts the least recently used idle slot
    assert outs[0][0] == alone["a1"] and "a1" in eng.loras.resident and len(eng.loras.resident) == 2
    assert_pool_free(eng)
