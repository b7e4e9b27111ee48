"""Batched stream items: what the engine thread hands the event loop, and AsyncEngine on top of it."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from vlora.engine.config import EngineConfig
from vlora.engine.engine import AsyncEngine, LLMEngine
from vlora.engine.output_stream import OutputStream, merge_outputs, next_batch_due
from vlora.engine.outputs import ChoiceDelta, RequestOutput, TokenLogprob
from vlora.engine.sampling import SamplingParams


def out(step: int, finished: bool = False, n: int = 2) -> RequestOutput:
    """Output of step `step` (0-based): one token per choice, token id 10*step + choice."""
    choices = [ChoiceDelta(i, f"<{step}.{i}>", [10 * step + i], [TokenLogprob(10 * step + i, -0.5 * step, [])],
                           "length" if finished else None, [{"step": step}]) for i in range(n)]
    return RequestOutput("r", choices, finished, 7, n * (step + 1), "a", 3, "rep", 0.25 if step == 0 else None)


def test_merge_concatenates_each_choice_in_order_and_keeps_the_last_counts():
    m = merge_outputs([out(0), out(1), out(2, finished=True)])
    assert [c.index for c in m.choices] == [0, 1]
    c1 = m.choices[1]
    assert c1.text == "<0.1><1.1><2.1>"
    assert c1.token_ids == [1, 11, 21]
    assert [lp.token_id for lp in c1.logprobs] == [1, 11, 21] and [lp.logprob for lp in c1.logprobs] == [0, -0.5, -1]
    assert c1.diagnostics == [{"step": 0}, {"step": 1}, {"step": 2}]
    assert c1.finish_reason == "length"
    assert (m.finished, m.num_prompt_tokens, m.num_generated_tokens) == (True, 7, 6)
    assert (m.adapter, m.adapter_version, m.served_by, m.queue_time_s) == ("a", 3, "rep", 0.25)


def test_merge_does_not_change_its_inputs():
    a, b = out(0), out(1)
    merge_outputs([a, b])
    assert a.choices[0].text == "<0.0>" and a.choices[0].token_ids == [0] and len(a.choices[0].logprobs) == 1


def test_merge_keeps_choices_that_appear_in_only_some_outputs():
    a = RequestOutput("r", [ChoiceDelta(1, "x", [5])], False, 3, 1)
    b = RequestOutput("r", [ChoiceDelta(0, "y", [6]), ChoiceDelta(1, "z", [7], finish_reason="stop")], False, 3, 3)
    m = merge_outputs([a, b])
    assert [(c.index, c.text, c.token_ids, c.finish_reason) for c in m.choices] == \
        [(0, "y", [6], None), (1, "xz", [5, 7], "stop")]


def test_batches_go_on_ticks_of_one_clock_a_whole_interval_after_the_first():
    # interval 50 ms: the ticks are the multiples of 0.05 s
    assert next_batch_due(10.012, 0.05, first=True) == pytest.approx(10.10)  # >= 10.062: the tick at 10.10
    assert next_batch_due(10.050, 0.05, first=True) == pytest.approx(10.10)  # a first sent on a tick: the next one
    assert next_batch_due(10.101, 0.05, first=False) == pytest.approx(10.15)  # sent on time: the next tick
    assert next_batch_due(10.124, 0.05, first=False) == pytest.approx(10.15)  # 24 ms late: still the next tick
    assert next_batch_due(10.126, 0.05, first=False) == pytest.approx(10.20)  # later: at least half an interval
    # two streams that started 30 ms apart share every tick after their first batch
    a, b = next_batch_due(3.001, 0.05, True), next_batch_due(3.031, 0.05, True)
    assert (a, b) == (pytest.approx(3.10), pytest.approx(3.10))
    assert next_batch_due(a + 0.002, 0.05, False) == next_batch_due(b + 0.002, 0.05, False) == pytest.approx(3.15)


def _feed(stream: OutputStream, items, gap_s: float) -> threading.Thread:
    def run():
        for it in items:
            time.sleep(gap_s)
            stream.put(it)

    t = threading.Thread(target=run)
    t.start()
    return t


def test_first_output_at_once_then_one_batch_per_interval_and_the_finish_at_once():
    async def main():
        stream = OutputStream(asyncio.get_running_loop(), interval_s=0.2)
        t = _feed(stream, [out(i, finished=i == 9, n=1) for i in range(10)], gap_s=0.01)
        batches = []
        while not batches or not batches[-1].finished:
            batches.append(await stream.next_batch())
        t.join()
        return batches

    batches = asyncio.run(main())
    assert batches[0].choices[0].token_ids == [0]  # the first step's token alone
    assert [t for b in batches for t in b.choices[0].token_ids] == [10 * i for i in range(10)]
    # ~100 ms of steps after the first: the 200 ms interval has not passed, so only the finish releases them
    assert len(batches) == 2 and batches[1].finished


def test_interval_zero_releases_every_output_as_it_comes():
    async def main():
        stream = OutputStream(asyncio.get_running_loop(), interval_s=0.0)
        t = _feed(stream, [out(i, finished=i == 3, n=1) for i in range(4)], gap_s=0.05)
        got = []
        while not got or not got[-1].finished:
            got.append(await stream.next_batch())
        t.join()
        return got

    assert [b.choices[0].token_ids for b in asyncio.run(main())] == [[0], [10], [20], [30]]


def test_outputs_held_past_the_interval_are_released_without_a_further_step():
    async def main():
        loop = asyncio.get_running_loop()
        stream = OutputStream(loop, interval_s=0.05)
        stream.put(out(0, n=1))
        await stream.next_batch()
        stream.put(out(1, n=1))  # arrives inside the interval; nothing follows it
        t0 = time.monotonic()
        b = await asyncio.wait_for(stream.next_batch(), 5)
        return b, time.monotonic() - t0

    b, waited = asyncio.run(main())
    assert b.choices[0].token_ids == [10] and not b.finished
    assert waited < 5


def test_an_engine_error_is_raised_to_the_consumer():
    async def main():
        stream = OutputStream(asyncio.get_running_loop(), interval_s=10.0)
        stream.put(out(0, n=1))
        await stream.next_batch()
        stream.put(out(1, n=1))
        stream.put(RuntimeError("engine step failed: boom"))  # released at once despite the 10 s interval
        with pytest.raises(RuntimeError, match="boom"):
            await asyncio.wait_for(stream.next_batch(), 5)

    asyncio.run(main())


# -- AsyncEngine ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def async_engine(tiny_model_dir):
    eng = AsyncEngine(LLMEngine(EngineConfig(str(tiny_model_dir), max_loras=0)), stream_interval_s=0.02)
    yield eng
    eng.shutdown()


def _expected(async_engine, ids, sp) -> dict[int, list[int]]:
    """Token ids per choice from the engine stepped directly (called between requests: the thread is idle)."""
    return async_engine.call(lambda e: e.generate([ids], sp)[0]).result(timeout=60)


def test_batched_stream_and_complete_equal_the_engine_stepped_directly(async_engine, tokenizer):
    ids = tokenizer("The quick brown fox").input_ids
    sp = lambda: SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, logprobs=True, top_logprobs=2, n=2)
    expected = _expected(async_engine, ids, sp())

    async def main():
        streamed = [o async for o in async_engine.generate(ids, sp())]
        whole = await async_engine.complete(ids, sp())
        return streamed, whole

    streamed, whole = asyncio.run(main())
    assert streamed[-1].finished and not any(o.finished for o in streamed[:-1])
    assert len(streamed) < 40  # grouped: fewer items than steps
    assert len(streamed[0].choices[0].token_ids) == 1  # the first token on its own
    merged = merge_outputs(streamed)
    for m in (merged, whole):
        assert [c.token_ids for c in m.choices] == expected
        assert [[lp.token_id for lp in c.logprobs] for c in m.choices] == expected
        assert all(len(lp.top) == 2 for c in m.choices for lp in c.logprobs)
        assert [c.text for c in m.choices] == [tokenizer.decode(t) for t in expected]
        assert [c.finish_reason for c in m.choices] == ["length", "length"]
        assert (m.num_prompt_tokens, m.num_generated_tokens, m.finished) == (len(ids), 80, True)


def test_a_consumer_that_stops_aborts_at_once_even_with_a_long_interval(async_engine, tokenizer):
    ids = tokenizer("Count to one thousand").input_ids

    async def main():
        gen = async_engine.generate(ids, SamplingParams(max_tokens=600, temperature=0, ignore_eos=True),
                                    request_id="gone", stream_interval_s=30.0)
        first = await gen.__anext__()
        assert not first.finished
        busy = await async_engine.run(lambda e: (len(e.requests), e.pool.num_used_blocks))
        t0 = time.monotonic()
        await gen.aclose()  # the client went away (Serve cancels the Decoder's generator)
        while await async_engine.run(lambda e: (len(e.requests), e.pool.num_used_blocks)) != (0, 0):
            await asyncio.sleep(0.001)
        return busy, time.monotonic() - t0

    (requests, blocks), freed_s = asyncio.run(main())
    assert requests == 1 and blocks >= 1
    assert freed_s < 30.0  # well before the next item would have been due
