"""Tensor parallelism on CPU (gloo, 2 processes) against HF and HF+PEFT.

Rank 0 is an LLMEngine in the test process; rank 1 runs engine/tp_worker.run_worker in a
spawned process. Greedy output must be token-identical to HF, logits within 1e-4.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path

import pytest
import torch

from vlora.adapters.peft_io import load_peft_adapter
from vlora.engine.config import EngineConfig
from vlora.engine.engine import LLMEngine
from vlora.engine.sampling import SamplingParams
from vlora.engine.tp import TPGroupError, TPSpec, free_port
from vlora.engine.tp_worker import run_worker
from vlora.engine.vision import VisionEncoder
from tests.unit.oracle import hf_generate
from tests.unit.test_engine import (  # noqa: F401 - builder is a fixture
    assert_pool_free, builder, chat, check_adapters_and_base_in_one_batch_match_hf_peft, check_image_prompt_matches_hf,
    check_packed_forward_matches_hf, flipped_weights, swap_mid_run)

GREEDY = dict(temperature=0, ignore_eos=True)


def start_group(config: EngineConfig, lm_head: str = "vocab_parallel", timeout_s: float = 60.0):
    """(rank-0 engine, rank-1 process): a 2-rank group on this machine."""
    spec = TPSpec(rank=0, world_size=2, master_port=free_port(), timeout_s=timeout_s, lm_head=lm_head)
    worker = mp.get_context("spawn").Process(target=run_worker, args=(config, spec.for_rank(1)), daemon=True)
    worker.start()
    return LLMEngine(config, tp=spec), worker


@pytest.fixture(scope="module")
def tp_engine(tiny_model_dir):
    engine, worker = start_group(EngineConfig(str(tiny_model_dir), block_size=4, num_kv_blocks=512, max_loras=4,
                                              max_lora_rank=8))
    yield engine
    engine.tp.stop()
    worker.join(timeout=30)
    assert worker.exitcode == 0  # the worker left its loop on "stop"


def test_each_rank_holds_its_heads_and_columns(tp_engine):
    """The tiny model (4 heads, 2 KV heads, MLP 176, head_dim 16) split in two."""
    m = tp_engine.model
    d = m.cfg.head_dim
    layer = m.layers[0]
    assert (layer.num_heads, layer.num_kv_heads) == (2, 1)
    assert tuple(layer.qkv.weight.shape) == ((2 + 1 + 1) * d, 64)
    assert tuple(layer.o_proj.weight.shape) == (64, 2 * d)
    assert tuple(layer.gate_up.weight.shape) == (2 * 88, 64)
    assert tuple(layer.down_proj.weight.shape) == (64, 88)
    assert tuple(m.lm_head.weight.shape) == (m.cfg.vocab_size // 2, 64)  # vocab-parallel
    assert tuple(tp_engine.kv.k[0].shape[2:]) == (1, d)  # rank 0's KV pool holds its one KV head
    # rank 0's slice of q_proj is the checkpoint's first half of q rows
    from safetensors import safe_open

    with safe_open(f"{tp_engine.config.model_dir}/model.safetensors", framework="pt") as st:
        name = next(n for n in st.keys() if n.endswith("layers.0.self_attn.q_proj.weight"))
        assert torch.equal(layer.qkv.weight[:2 * d], st.get_tensor(name)[:2 * d])


def test_packed_forward_logits_match_hf(tp_engine, hf_model):
    e = tp_engine
    check_packed_forward_matches_hf(lambda ids, pos, meta: e.tp(ids, pos, meta, e.kv.k_flat, e.kv.v_flat,
                                                                 slots=e.slots), hf_model)


def test_text_prompts_greedy_match_hf(tp_engine, builder, hf_model):
    prompts = [chat(builder, t) for t in ["What colour is this?", "Hello", "Describe the image in detail please."]]
    outs = tp_engine.generate(prompts, SamplingParams(max_tokens=12, **GREEDY))
    for p, o in zip(prompts, outs):
        assert o[0] == hf_generate(hf_model, p.token_ids, 12)
    assert tp_engine.runner.num_decode_steps > 0  # the static decode path ran through the group too
    assert_pool_free(tp_engine)


@pytest.mark.parametrize("sizes", [[(56, 84)], [(84, 56), (112, 112)]], ids=["one-image", "two-images"])
def test_image_prompts_greedy_match_hf(tp_engine, builder, hf_model, hf_image_processor, tiny_model_dir, sizes):
    """The vision tower is not sharded: rank 0 receives the embeddings and sends them with the step."""
    check_image_prompt_matches_hf(tp_engine, builder, VisionEncoder.from_pretrained(tiny_model_dir), hf_model,
                                  hf_image_processor, sizes)


def test_three_adapters_and_base_in_one_batch_match_hf_peft(tp_engine, builder, hf_model, peft_adapters):
    check_adapters_and_base_in_one_batch_match_hf_peft(tp_engine, chat(builder, "What colour is this? It is").token_ids,
                                                       hf_model, peft_adapters)


def test_hot_swap_mid_run_changes_only_that_adapter_on_every_rank(tp_engine, tiny_model_dir, builder, peft_adapters):
    """A slot rewritten between steps on rank 0 is rewritten on rank 1 before the next step: only that
    adapter's later tokens change, exactly as in a one-process engine doing the same swap (a swap on
    rank 0 alone would mix old and new weights and give other tokens)."""
    single = LLMEngine(EngineConfig(str(tiny_model_dir), block_size=4, num_kv_blocks=512, max_loras=4, max_lora_rank=8))
    for e in (tp_engine, single):
        for name, path in peft_adapters.items():
            e.add_lora(name, load_peft_adapter(path)[0])
    prompt = chat(builder, "Hello! How can I help").token_ids
    sp = SamplingParams(max_tokens=12, **GREEDY)
    w = load_peft_adapter(peft_adapters["a1"])[0]
    flipped = flipped_weights(w)
    before = tp_engine.generate([prompt] * 3, sp, adapters=["a1", "a2", None])
    a1, a2, base = swap_mid_run(tp_engine, prompt, sp, flipped)
    assert a2 == before[1][0] and base == before[2][0]
    assert a1[:5] == before[0][0][:5] and a1 != before[0][0]
    assert [a1, a2, base] == swap_mid_run(single, prompt, sp, flipped)
    # a new version while idle is rewritten in place on both ranks; the old one back gives the old tokens
    tp_engine.add_lora("a1", flipped, version=2)
    single.add_lora("a1", flipped, version=2)
    assert tp_engine.generate([prompt], sp, adapters=["a1"]) == single.generate([prompt], sp, adapters=["a1"])
    tp_engine.add_lora("a1", w, version=3)
    assert tp_engine.generate([prompt], sp, adapters=["a1"])[0][0] == before[0][0]
    assert_pool_free(tp_engine)


def test_replicated_lm_head_matches_hf_and_a_lost_worker_fails_the_step(tiny_model_dir, tokenizer, hf_model):
    """The other lm_head choice gives the same tokens; then rank 1 is killed: the next step raises at
    once (the worker's connection closed) instead of waiting for the group's timeout."""
    engine, worker = start_group(EngineConfig(str(tiny_model_dir), block_size=4, num_kv_blocks=64, max_loras=0),
                                 lm_head="replicated", timeout_s=300)
    try:
        assert tuple(engine.model.lm_head.weight.shape) == (engine.model.cfg.vocab_size, 64)
        p = tokenizer("Numbers: 1 2 3").input_ids
        assert engine.generate([p], SamplingParams(max_tokens=8, **GREEDY))[0][0] == hf_generate(hf_model, p, 8)
        worker.kill()
        worker.join(timeout=10)
        engine.add_request(p, SamplingParams(max_tokens=8, **GREEDY))
        t0 = time.monotonic()
        with pytest.raises(TPGroupError, match="a tensor-parallel peer stopped answering during a step broadcast"):
            while engine.has_unfinished():
                engine.step()
        assert time.monotonic() - t0 < 60  # the closed connection ended it, not the group's 300 s timeout
    finally:
        if worker.is_alive():
            worker.kill()


def test_free_port_hands_out_distinct_quiet_ports_and_skips_one_in_use(monkeypatch):
    """Ports come from the range the kernel never assigns on its own, never twice in one process, and
    not one another socket holds."""
    import socket

    from vlora.engine import tp

    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == 50
    assert all(20000 <= p < 30000 for p in ports)
    ephemeral = Path("/proc/sys/net/ipv4/ip_local_port_range")  # Linux's; macOS's starts at 49152
    lo, hi = (int(x) for x in ephemeral.read_text().split()) if ephemeral.exists() else (49152, 65535)
    assert not any(lo <= p <= hi for p in ports)
    with socket.socket() as held:
        taken = next(p for p in range(29000, 29990, 2) if p not in tp._handed_out and p + 1 not in tp._handed_out
                     and _bindable(p) and _bindable(p + 1))
        held.bind(("127.0.0.1", taken))
        held.listen()
        monkeypatch.setattr(tp, "QUIET_PORTS", range(taken, taken + 2))
        assert free_port() == taken + 1  # the held one is skipped
        with pytest.raises(RuntimeError, match=f"no free TCP port on 127.0.0.1 in {taken}-{taken + 1}"):
            free_port()  # taken + 1 was handed out already


def _bindable(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False
