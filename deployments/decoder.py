"""Decoder deployment (GPU when present): owns one engine, streams each request's deltas back."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import torch

from vlora.deployments.adapter_sync import AdapterSync
from vlora.deployments.config import AppConfig
from vlora.deployments.errors import to_api_error
from vlora.deployments.messages import EncodedRequest, PreparedRequest, output_to_wire
from vlora.deployments.metrics import DecoderMetrics, get_logger
from vlora.deployments.openai_api import ApiError
from vlora.deployments.placement import resolve_device_dtype
from vlora.deployments.routing import push_held_adapters
from vlora.deployments.tp_workers import TPWorkers
from vlora.engine.config import EngineConfig
from vlora.engine.engine import AsyncEngine, LLMEngine
from vlora.engine.engine_process import EngineProcess
from vlora.engine.optimal_sampling import OptimalSamplingParams
from vlora.engine.outputs import RequestOutput
from vlora.engine.sampling import SamplingParams

log = get_logger("vlora.decoder")
METRICS_INTERVAL_S = 0.5  # how often the engine gauges are refreshed
STORE_SILENCE_S = 30.0  # /health: the store must have answered this replica's long-poll within this long


def _embeds(req: EncodedRequest | PreparedRequest) -> torch.Tensor | None:
    return req.image_embeds if isinstance(req, EncodedRequest) else None


def _teacher_adapter(optimal: OptimalSamplingParams | None) -> str | None:
    return optimal.teacher if optimal is not None and optimal.teacher != "base" else None


def _replica_id() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # constructed outside Serve (unit tests)
        return "local"


class Decoder:
    def __init__(self, config: AppConfig, store=None):
        device, dtype = resolve_device_dtype(config)
        lim = config.engine
        self.config = config
        self.replica_id = _replica_id()
        self._inflight = 0  # generate() calls admitted and not yet finished
        engine_config = EngineConfig(
            model_dir=config.model_dir, device=device, dtype=dtype, block_size=lim.block_size,
            kv_cache_memory_bytes=lim.kv_cache_memory_mb * 2**20, max_num_seqs=lim.max_num_seqs,
            max_num_batched_tokens=max(lim.max_num_batched_tokens, lim.max_num_seqs), max_model_len=lim.max_model_len,
            max_loras=lim.max_loras, max_lora_rank=lim.max_lora_rank, enforce_eager=lim.enforce_eager,
            max_grammars=lim.max_grammars)
        # tensor_parallel_size > 1: the engine is rank 0; ranks 1..N-1 are Ray actors this replica starts
        self.tp_workers = TPWorkers(engine_config, lim.tensor_parallel_size) if lim.tensor_parallel_size > 1 else None
        tp = self.tp_workers.spec if self.tp_workers else None
        interval_s = config.stream_interval_ms / 1000
        if lim.engine_process:
            from ray import cloudpickle  # engine calls below are closures; plain pickle takes none

            self.engine = EngineProcess(engine_config, interval_s, name=self.replica_id, dumps=cloudpickle.dumps,
                                        tp=tp)
        else:
            llm = LLMEngine(engine_config, tp=tp)
            llm.name = self.replica_id
            self.engine = AsyncEngine(llm, interval_s)
        self.metrics = DecoderMetrics(config.model_name)
        self.sync = None
        if store is not None:  # a replica that starts (or restarts) catches up before serving
            self.sync = AdapterSync(store, self.engine, self.replica_id, int(config.adapter_cache_mb * 2**20),
                                    self.metrics)
            self.sync.catch_up()
            self.sync.start()
        self._pushed_held: list[str] | None = None  # adapters last reported to the router
        self._stop = threading.Event()
        self._metrics_thread = threading.Thread(target=self._refresh_metrics, name="vlora-metrics", daemon=True)
        self._metrics_thread.start()

    def _refresh_metrics(self) -> None:
        """Every METRICS_INTERVAL_S: read the engine's counts between steps and set the gauges."""
        while not self._stop.wait(METRICS_INTERVAL_S):
            try:
                self.metrics.record_engine(self.engine.call(LLMEngine.state).result(timeout=30))
                if self.sync is not None:
                    self.metrics.record_residency(self._residency_stats())
                    self.metrics.record_versions(self.sync.residency.versions(), self.sync.seq)
                    self._push_held()
            except Exception:  # noqa: BLE001 - metrics must never take the replica down
                if self._stop.is_set():
                    return
                log.warning("refreshing the engine metrics failed", exc_info=True)

    def _check_capacity(self) -> None:
        """Counted on the event loop (not read from the engine thread), so concurrent arrivals can't race."""
        lim = self.config.engine
        queued = self._inflight - lim.max_num_seqs
        if queued >= lim.max_waiting_requests:
            raise ApiError(503, f"the server is overloaded ({queued} requests already waiting on this replica); "
                                "retry after a short wait", retry_after=1)

    def _submit_args(self, req, sampling: SamplingParams, max_tokens_explicit: bool,
                     optimal: OptimalSamplingParams | None, teacher) -> dict:
        """The engine's optimal-sampling keywords; clamps an implicit max_tokens to the room left."""
        longest = max(len(req.prompt.token_ids), len(teacher.prompt.token_ids) if teacher else 0)
        if not max_tokens_explicit:
            room = self.engine.max_model_len - longest
            sampling.max_tokens = max(1, min(sampling.max_tokens, room))
        extra = {}
        if optimal is not None:
            extra = {"optimal": optimal}
            if teacher is not None:
                extra.update(teacher_prompt=teacher.prompt, teacher_image_embeds=_embeds(teacher))
        return extra

    @asynccontextmanager
    async def _adapters(self, *names: str | None):
        """Pin the request's adapters' host copies (fetched from the store on first use) while it runs.
        Yields True when one of them was cold (fetched for this request)."""
        if self.sync is None:
            yield False
            return
        res, pinned, cold, kind = self.sync.residency, [], False, "hit"
        try:
            for name in dict.fromkeys(n for n in names if n is not None):
                if res.try_acquire(name) is None:
                    t0 = time.perf_counter()
                    _, k = await asyncio.to_thread(res.acquire_kind, name)
                    kind = k if kind == "hit" else kind
                    cold = True
                    self.metrics.cold_starts.inc(1, self.metrics.base)
                    self.metrics.fetch_wait.observe(time.perf_counter() - t0, self.metrics.base)
                pinned.append(name)
            if pinned:
                self.metrics.affinity.inc(1, {**self.metrics.base, "result": kind})
            if cold:
                self._push_held()  # at once: the next requests for it should find this replica
            yield cold
        finally:
            for name in pinned:
                res.release(name)

    def _push_held(self) -> None:
        """Report the adapters held here to Serve's routers when the set changed (affinity routing)."""
        held = sorted(self.sync.residency.versions())
        if held != self._pushed_held and push_held_adapters(held):
            self._pushed_held = held

    def _observe_cold_start(self, cold: bool, adapter: str | None, t0: float) -> None:
        if cold:
            self.metrics.cold_ttft.observe(time.perf_counter() - t0, self.metrics.base)

    def _observe_queue_time(self, out: RequestOutput, adapter: str | None) -> None:
        if out.queue_time_s is not None:
            self.metrics.queue_time.observe(out.queue_time_s, {"model_name": adapter or self.config.model_name})

    async def generate(self, req: EncodedRequest | PreparedRequest, sampling: SamplingParams, adapter: str | None,
                       request_id: str, max_tokens_explicit: bool = True, optimal: OptimalSamplingParams | None = None,
                       teacher: EncodedRequest | PreparedRequest | None = None) -> AsyncIterator[bytes]:
        """Stream RequestOutputs (as `output_to_wire` bytes) in batches (the first token at once, then one item per
        `stream_interval_ms` or at the finish); a caller that stops iterating (client gone) aborts
        the request.

        With `optimal`, tokens come from the student/teacher mixture; `teacher` is the teacher's own
        prompt (dual prompts), else the teacher reads the same prompt.
        """
        self._check_capacity()
        self._inflight += 1
        t0 = time.perf_counter()
        try:
            extra = self._submit_args(req, sampling, max_tokens_explicit, optimal, teacher)
            first = True
            async with self._adapters(adapter, _teacher_adapter(optimal)) as cold:
                async for out in self.engine.generate(req.prompt, sampling, adapter, _embeds(req), request_id,
                                                      **extra):
                    if first:
                        self._observe_queue_time(out, adapter)
                        self._observe_cold_start(cold, adapter, t0)
                    first = False
                    yield output_to_wire(out)
        except Exception as exc:
            api = to_api_error(exc)
            if api is None or api is exc:
                raise
            raise api from None
        finally:
            self._inflight -= 1

    async def complete(self, req: EncodedRequest | PreparedRequest, sampling: SamplingParams, adapter: str | None,
                       request_id: str, max_tokens_explicit: bool = True,
                       optimal: OptimalSamplingParams | None = None,
                       teacher: EncodedRequest | PreparedRequest | None = None) -> bytes:
        """A non-streaming request: one call, one merged RequestOutput (`output_to_wire` bytes) at the end.
        A cancelled call (client gone) aborts the request."""
        self._check_capacity()
        self._inflight += 1
        t0 = time.perf_counter()
        try:
            extra = self._submit_args(req, sampling, max_tokens_explicit, optimal, teacher)
            async with self._adapters(adapter, _teacher_adapter(optimal)) as cold:
                out = await self.engine.complete(req.prompt, sampling, adapter, _embeds(req), request_id, **extra)
            self._observe_queue_time(out, adapter)
            return output_to_wire(out)
        except Exception as exc:
            api = to_api_error(exc)
            if api is None or api is exc:
                raise
            raise api from None
        finally:
            self._inflight -= 1

    async def stats(self) -> dict:
        state = await self.engine.run(LLMEngine.state)
        return {"replica_id": self.replica_id, **state, "adapter_swaps": state["lora_slot_loads"],
                "store_seq": self.sync.seq if self.sync else None,
                "tensor_parallel": {"size": self.config.engine.tensor_parallel_size,
                                    "steps": state["tensor_parallel_steps"]},
                "residency": self._residency_stats()}

    def _residency_stats(self) -> dict | None:
        if self.sync is None:
            return None
        r = self.sync.residency
        st = r.stats
        return {"host_copies": r.versions(), "host_bytes": r.bytes, "budget_bytes": r.budget_bytes,
                "hits": st.hits, "misses": st.misses, "affinity_misses": st.affinity_misses, "fetches": st.fetches, "evictions": st.evictions,
                "refreshes": st.refreshes}

    async def ready(self) -> bool:
        """Model loaded (the constructor finished), engine thread alive, AdapterStore answering."""
        if not self.engine.healthy or (self.tp_workers is not None and not self.tp_workers.alive):
            return False
        return self.sync is None or (self.sync.alive() and self.sync.silent_for() < STORE_SILENCE_S)

    async def check_health(self) -> None:
        """Serve's periodic probe: a replica whose engine failed is marked unhealthy and replaced."""
        if not self.engine.healthy:
            raise RuntimeError(f"the engine failed: {self.engine.error!r}")
        if self.tp_workers is not None:
            self.tp_workers.check()

    async def inject_engine_fault(self, message: str = "injected fault") -> str:
        """Fault drill (reachable through a Serve handle only, never over HTTP): the engine thread
        raises before its next step, as a bug would. Returns this replica's id."""
        self.engine.inject_fault(RuntimeError(message))
        return self.replica_id

    async def pause_adapter_sync_drill(self, seconds: float, hold: str | None = None) -> str:
        """Fault drill (reachable through a Serve handle only, never over HTTP): this replica first takes a
        host copy of adapter `hold`, then acknowledges no store change for `seconds`, as a wedged replica
        would. Returns this replica's id."""
        if hold is not None:
            await asyncio.to_thread(self.sync.residency.acquire, hold)
            self.sync.residency.release(hold)
        self.sync.pause_acks(seconds)
        return self.replica_id

    async def crash_process_drill(self, delay_s: float = 0.2) -> str:
        """Fault drill (reachable through a Serve handle only, never over HTTP): this replica's process
        exits after `delay_s`, as an OOM kill or a segfault would end it. Returns this replica's id."""
        threading.Timer(delay_s, os._exit, args=(1,)).start()
        return self.replica_id

    async def kill_tp_worker_drill(self, rank: int = 1) -> str:
        """Fault drill (reachable through a Serve handle only, never over HTTP): tensor-parallel worker
        `rank`'s process is killed, as an OOM kill would end it. Returns this replica's id."""
        if self.tp_workers is None:
            raise ValueError("this Decoder replica is not tensor-parallel")
        self.tp_workers.kill(rank)
        return self.replica_id

    def __del__(self):
        if getattr(self, "_stop", None) is not None:
            self._stop.set()
        if getattr(self, "sync", None) is not None:
            self.sync.stop()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
        if getattr(self, "tp_workers", None) is not None:
            self.tp_workers.shutdown()
