"""One request's outputs on their way from the engine thread to an asyncio consumer, in batches.

The engine thread appends each step's RequestOutput; the consumer takes everything produced
since its last take as ONE merged RequestOutput. The first output is released at once; after
that one batch per tick of a clock shared by all requests (`next_batch_due`), or at once when
the request finishes (or fails). The engine thread wakes the consumer's event loop only when a
batch is due, so a request costs one cross-thread wake-up per interval instead of one per step.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time

from vlora.engine.outputs import ChoiceDelta, RequestOutput


def next_batch_due(now: float, interval_s: float, first: bool) -> float:
    """When a request's next batch may go, after one went at `now`: a tick of a clock that ticks
    every `interval_s` (multiples of it on the monotonic clock), the same ticks for every request.

    So the streams of an engine send together, once per interval, instead of each on its own
    phase, which would make nearly every step send something and wake the serving processes that
    often. The batch after the first waits for the first tick a whole interval after it; a later
    one for the first tick at least half an interval after the previous batch, which is the next
    tick unless that batch went late. Over time a stream gets one batch per interval.
    """
    wait = interval_s if first else interval_s / 2
    return math.ceil((now + wait) / interval_s - 1e-9) * interval_s


def merge_outputs(outs: list[RequestOutput]) -> RequestOutput:
    """Several consecutive outputs of one request as one: per choice, texts, tokens, logprobs and
    diagnostics concatenated in order, the finish reason kept; counts and status from the last."""
    if len(outs) == 1:
        return outs[0]
    by_index: dict[int, ChoiceDelta] = {}
    for out in outs:
        for c in out.choices:
            m = by_index.get(c.index)
            if m is None:
                by_index[c.index] = ChoiceDelta(c.index, c.text, list(c.token_ids),
                                                None if c.logprobs is None else list(c.logprobs), c.finish_reason,
                                                None if c.diagnostics is None else list(c.diagnostics))
                continue
            m.text += c.text
            m.token_ids.extend(c.token_ids)
            if c.logprobs is not None:
                m.logprobs = (m.logprobs or []) + c.logprobs
            if c.diagnostics is not None:
                m.diagnostics = (m.diagnostics or []) + c.diagnostics
            m.finish_reason = c.finish_reason or m.finish_reason
    first, last = outs[0], outs[-1]
    return RequestOutput(last.request_id, [by_index[i] for i in sorted(by_index)], last.finished,
                         last.num_prompt_tokens, last.num_generated_tokens, last.adapter, last.adapter_version,
                         last.served_by, first.queue_time_s if first.queue_time_s is not None else last.queue_time_s)


class OutputStream:
    """Filled by the engine thread (`put`), drained by one coroutine (`next_batch`) on `loop`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, interval_s: float = 0.0):
        self.loop = loop
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._items: list[RequestOutput | BaseException] = []
        self._closing = False  # a finished output or an error is queued: release at once
        # time.monotonic() from which the next batch may go (one clock on both threads; an event loop's
        # own clock may differ, e.g. uvloop's): the first goes at once, unless
        # the interval is infinite (one batch at the end: a non-streaming caller).
        self._due = 0.0 if math.isfinite(interval_s) else math.inf
        self._waiter: asyncio.Future | None = None

    # -- engine thread ---------------------------------------------------------------------------
    def put(self, item: RequestOutput | BaseException) -> None:
        """Queue an output (or an error); wake the consumer only if it waits and a batch is due."""
        put_all([(self, item)])

    def _queue(self, item: RequestOutput | BaseException) -> asyncio.Future | None:
        """Queue `item`; the consumer's waiter if it must be woken now."""
        with self._lock:
            self._items.append(item)
            if isinstance(item, BaseException) or item.finished:
                self._closing = True
            fut = self._waiter
            if fut is None or not (self._closing or time.monotonic() >= self._due):
                return None
            self._waiter = None
            return fut

    # -- consumer (event loop) -------------------------------------------------------------------
    def _take(self, due: bool = False) -> list | None:
        """Everything queued, if a batch is due now (else None, and the caller waits)."""
        if self._items and (due or self._closing or time.monotonic() >= self._due):
            items, self._items = self._items, []
            return items
        return None

    async def next_batch(self) -> RequestOutput:
        """The outputs since the last batch, merged; raises the engine's error if one came."""
        due = False
        while True:
            with self._lock:
                items = self._take(due)
                if items is None:
                    fut = self._waiter = self.loop.create_future()
                    pending = bool(self._items)
            if items is not None:
                break
            # Items that arrived before the batch was due: wake at the due time even if no step ends then.
            # (A timer may fire a little before the due time on the loop's clock, e.g. uvloop's whole
            # milliseconds: its firing is what makes the batch due, so the loop never spins on it.)
            timer = (self.loop.call_later(max(0.0, self._due - time.monotonic()), _wake, fut, True)
                     if pending and math.isfinite(self._due) else None)
            try:
                due = bool(await fut)
            finally:
                if timer is not None:
                    timer.cancel()
                with self._lock:
                    if self._waiter is fut:
                        self._waiter = None
        errors = [i for i in items if isinstance(i, BaseException)]
        if errors:
            raise errors[0]
        if self.interval_s > 0 and math.isfinite(self._due):
            self._due = next_batch_due(time.monotonic(), self.interval_s, first=self._due == 0.0)
        return merge_outputs(items)


def put_all(items: list[tuple[OutputStream, RequestOutput | BaseException]]) -> None:
    """Queue each stream's item; wake the consumers that are due with one call per event loop, so a
    step (or message) that completes many streams' batches costs their loop one wake-up, not one each.
    A stream whose event loop is closed has nobody listening: its item is dropped."""
    wakes: dict[asyncio.AbstractEventLoop, list[asyncio.Future]] = {}
    for stream, item in items:
        fut = stream._queue(item)
        if fut is not None:
            wakes.setdefault(stream.loop, []).append(fut)
    for loop, futs in wakes.items():
        try:
            loop.call_soon_threadsafe(_wake_all, futs)
        except RuntimeError:  # that loop is closed
            pass


def _wake_all(futs: list[asyncio.Future]) -> None:
    for fut in futs:
        _wake(fut)


def _wake(fut: asyncio.Future, due: bool = False) -> None:
    """Resolve a consumer's wait; `due` = the batch's due time has come (its timer fired)."""
    if not fut.done():
        fut.set_result(due)
