"""The engine loop in its own process (engine/engine_process.py): same tokens as HF, batched
outputs, aborts that free KV blocks, errors that reach the caller, and a failed child reported."""

from __future__ import annotations

import asyncio
import math
import pickle
import time

import pytest
from ray import cloudpickle

from vlora.adapters.peft_io import load_peft_adapter
from vlora.engine.config import EngineConfig
from vlora.engine.engine import EngineDeadError, LLMEngine, RequestError
from vlora.engine import engine_process
from vlora.engine.engine_process import EngineProcess
from vlora.engine.outputs import ChoiceDelta, RequestOutput
from vlora.engine.prompts import PromptBuilder
from vlora.engine.sampling import SamplingParams
from vlora.engine.vision import VisionEncoder
from tests.unit.oracle import hf_generate, peft_generate, random_image, random_peft_adapter

GREEDY = dict(temperature=0, ignore_eos=True)


def config(model_dir, **kw) -> EngineConfig:
    return EngineConfig(str(model_dir), block_size=4, num_kv_blocks=256, max_loras=2, max_lora_rank=8, **kw)


@pytest.fixture(scope="module")
def adapter_dir(hf_model, tmp_path_factory):
    return random_peft_adapter(hf_model, tmp_path_factory.mktemp("adapters") / "a1", seed=1, r=4, alpha=8)


@pytest.fixture(scope="module")
def proc(tiny_model_dir):
    p = EngineProcess(config(tiny_model_dir), stream_interval_s=0.0, name="replica-7", dumps=cloudpickle.dumps)
    yield p
    p.shutdown()


async def collect(agen) -> list:
    return [out async for out in agen]


def tokens(outs) -> list[int]:
    return [t for o in outs for t in o.choices[0].token_ids]


def test_text_image_and_adapter_requests_match_hf_token_for_token(proc, tiny_model_dir, tokenizer, hf_model,
                                                                  hf_image_processor, adapter_dir):
    builder = PromptBuilder.from_pretrained(tiny_model_dir)
    text = tokenizer("The engine runs in a process of its own and").input_ids
    img = random_image(3, 56, 84)
    pix = hf_image_processor(images=[img], return_tensors="pt")
    grid = [tuple(g) for g in pix["image_grid_thw"].tolist()]
    image_prompt = builder.build_chat([{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}, {"type": "text", "text": "What is this?"}]}], grid)
    embeds = VisionEncoder.from_pretrained(tiny_model_dir).encode([pix["pixel_values"]], grid)[0]
    weights = load_peft_adapter(adapter_dir)[0]
    proc.call(lambda e: e.add_lora("a1", weights, 3)).result(60)
    sp = SamplingParams(max_tokens=12, **GREEDY)

    async def main():
        return await asyncio.gather(
            collect(proc.generate(text, sp)),
            collect(proc.generate(image_prompt, sp, image_embeds=embeds)),
            proc.complete(text, sp, adapter="a1"))

    plain, image, adapted = asyncio.run(main())
    assert tokens(plain) == hf_generate(hf_model, text, 12)
    assert tokens(image) == hf_generate(hf_model, image_prompt.token_ids, 12, pix["pixel_values"],
                                        pix["image_grid_thw"])
    assert adapted.choices[0].token_ids == peft_generate(hf_model, adapter_dir, text, 12)
    assert (adapted.adapter, adapted.adapter_version, adapted.served_by) == ("a1", 3, "replica-7")
    assert adapted.finished and adapted.num_generated_tokens == 12
    state = proc.call(LLMEngine.state).result(30)
    assert state["kv_blocks_used"] == 0 and state["adapters"] == {"a1": 3}
    assert proc.max_model_len == 1024


def test_outputs_come_in_batches_first_at_once_and_join_up_to_the_unary_answer(tiny_model_dir, tokenizer):
    p = EngineProcess(config(tiny_model_dir), stream_interval_s=0.1)
    try:
        prompt = tokenizer("Batches of tokens, not one item per step").input_ids
        sp = SamplingParams(max_tokens=60, **GREEDY)

        async def main():
            t0 = time.perf_counter()
            outs = await collect(p.generate(prompt, sp))
            return outs, time.perf_counter() - t0, await p.complete(prompt, sp)

        outs, wall, whole = asyncio.run(main())
        steps = p.call(LLMEngine.state).result(30)["engine_loop"]["steps"]
        assert steps >= 120  # one step per token, twice over
        assert len(outs[0].choices[0].token_ids) == 1  # the first token alone, at once
        assert tokens(outs) == whole.choices[0].token_ids and len(tokens(outs)) == 60
        assert outs[-1].finished and outs[-1].choices[0].finish_reason == "length"
        # at most one batch per 100 ms after the first, plus the finish
        assert len(outs) <= 2 + math.floor(wall / 0.1)
        assert len(outs) < 60
    finally:
        p.shutdown()


def test_streams_that_started_apart_send_together_once_per_interval(monkeypatch):
    """The child's batching on a fake clock: two streams 30 ms apart, a step every 5 ms, 50 ms interval."""
    class Conn:
        def __init__(self):
            self.sent = []

        def send_bytes(self, blob):
            self.sent.append((now[0], pickle.loads(blob)))

    now = [100.001]
    monkeypatch.setattr(engine_process.time, "monotonic", lambda: now[0])
    core = engine_process._Core(Conn(), engine=None)
    started_ms = {"a": 100_001, "b": 100_031}
    for step in range(80):
        t_ms = 100_001 + 5 * step
        now[0] = t_ms / 1000
        outs = []
        for rid, t0 in started_ms.items():
            if t_ms >= t0:
                if rid not in core.due:
                    core.interval[rid], core.due[rid] = 0.05, 0.0  # what _add sets
                outs.append(RequestOutput(rid, [ChoiceDelta(0, "t", [step])], False, 3, step + 1))
        core._send_due(outs)
    messages = [(t, sorted(o.request_id for o in msg[1])) for t, msg in core.conn.sent]
    assert messages[:2] == [(pytest.approx(100.001), ["a"]), (pytest.approx(100.031), ["b"])]  # firsts at once
    later = messages[2:]
    assert [ids for _, ids in later] == [["a", "b"]] * len(later)  # one message for both, every time
    assert [t for t, _ in later] == pytest.approx([100.101 + 0.05 * i for i in range(len(later))])
    assert len(later) == 6
    tokens = [t for _, msg in core.conn.sent for o in msg[1] if o.request_id == "a" for t in o.choices[0].token_ids]
    assert tokens == list(range(tokens[-1] + 1))  # every step's token once, in order


def test_a_consumer_that_goes_away_aborts_and_frees_the_kv_blocks(proc, tokenizer):
    prompt = tokenizer("A client that disconnects").input_ids

    async def main():
        agen = proc.generate(prompt, SamplingParams(max_tokens=500, **GREEDY))
        first = await agen.__anext__()
        used = (await proc.run(LLMEngine.state))["kv_blocks_used"]
        await agen.aclose()
        deadline = time.monotonic() + 5
        while (state := await proc.run(LLMEngine.state))["num_requests"] and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return first, used, state

    first, used, state = asyncio.run(main())
    assert len(first.choices[0].token_ids) >= 1 and used > 0
    assert state["num_requests"] == 0 and state["kv_blocks_used"] == 0


def test_request_and_call_errors_reach_the_caller_and_the_engine_keeps_serving(proc, tokenizer):
    async def bad_request():
        return await collect(proc.generate([10**6], SamplingParams(max_tokens=2)))

    with pytest.raises(RequestError, match="outside the vocabulary"):
        asyncio.run(bad_request())
    with pytest.raises(ZeroDivisionError):
        proc.call(lambda e: 1 / 0).result(30)
    assert proc.healthy
    assert asyncio.run(proc.complete([5, 6, 7], SamplingParams(max_tokens=3, **GREEDY))).num_generated_tokens == 3


@pytest.mark.parametrize("how", ["fault", "kill"])
def test_a_failed_engine_process_fails_its_requests_and_reports_unhealthy(tiny_model_dir, tokenizer, how):
    p = EngineProcess(config(tiny_model_dir), stream_interval_s=0.0)
    prompt = tokenizer("This request is in flight when the engine dies").input_ids

    async def main():
        agen = p.generate(prompt, SamplingParams(max_tokens=500, **GREEDY))
        await agen.__anext__()
        if how == "fault":
            p.inject_fault(RuntimeError("injected fault"))
        else:
            p.kill()
        with pytest.raises(EngineDeadError, match="retry the request") as info:
            async for _ in agen:
                pass
        return info.value

    try:
        err = asyncio.run(main())
        assert not p.healthy
        assert ("injected fault" in str(err)) if how == "fault" else ("exited" in str(err))
        with pytest.raises(EngineDeadError):
            p.call(LLMEngine.state).result(5)
    finally:
        p.shutdown()


def test_a_model_that_cannot_load_fails_the_start_with_the_reason(tmp_path):
    with pytest.raises(RuntimeError, match="the engine failed to start: .*"):
        EngineProcess(config(tmp_path / "missing"))


def test_grammars_compile_off_the_loop_and_constrain_the_output(proc, tokenizer):
    from vlora.engine.grammar import GrammarError, GrammarSpec

    prompt = tokenizer("Pick a colour:").input_ids
    choices = ["red", "green", "blue"]

    async def main():
        constrained = proc.complete(prompt, SamplingParams(max_tokens=20, temperature=1.0, seed=3,
                                                           grammar=GrammarSpec.choice(choices)))
        free = proc.complete(prompt, SamplingParams(max_tokens=20, **GREEDY))
        return await asyncio.gather(constrained, free)

    constrained, free = asyncio.run(main())
    assert constrained.choices[0].text in choices and constrained.choices[0].finish_reason == "stop"
    assert free.num_generated_tokens == 20  # the unconstrained row beside it runs to its length
    with pytest.raises(GrammarError, match="regex"):
        asyncio.run(proc.complete(prompt, SamplingParams(max_tokens=5, grammar=GrammarSpec.regex("(unclosed"))))
    assert proc.call(LLMEngine.state).result(30)["num_requests"] == 0
