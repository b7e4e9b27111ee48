"""The engine: `add_request` / `step` / `abort`, and an asyncio wrapper that streams deltas.

One step = schedule -> run the model on the packed batch -> sample -> detokenize -> report.
`LLMEngine` is single-threaded; `AsyncEngine` owns it on a background thread and is what the
Decoder deployment drives.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.config import EngineConfig
from engine.detokenizer import IncrementalDetokenizer, StopChecker
from engine.kv_cache import KVBlockPool, KVCache
from engine.lora import AdapterSlots, LoRAWeights
from engine.lora_manager import LoRAManager
from engine.model import QwenTextModel
from engine.model_runner import ModelRunner
from engine.outputs import ChoiceDelta, RequestOutput, TokenLogprob
from engine.sampling import RowState, Sampler, SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence, SeqStatus

log = logging.getLogger(__name__)


class RequestError(ValueError):
    """A request the engine cannot serve as given (too long, bad ids, image mismatch): a client error."""


@dataclass(slots=True)
class _SeqState:
    row: RowState
    detok: IncrementalDetokenizer
    stop: StopChecker
    sent_tokens: int = 0


@dataclass(slots=True)
class _Request:
    request_id: str
    seqs: list[Sequence]
    num_prompt_tokens: int
    adapter: str | None
    adapter_version: int | None
    pending: list[ChoiceDelta] = field(default_factory=list)


class LLMEngine:
    def __init__(self, config: EngineConfig, tokenizer: Any = None):
        from transformers import AutoTokenizer

        self.config = config
        dtype = getattr(torch, config.dtype)
        self.model = QwenTextModel.from_pretrained(config.model_dir, config.device, dtype)
        mc = self.model.cfg
        bpb = KVCache.bytes_per_block(mc.num_layers, config.block_size, mc.num_kv_heads, mc.head_dim, dtype)
        num_blocks = config.num_kv_blocks or max(1, config.kv_cache_memory_bytes // bpb)
        self.pool = KVBlockPool(num_blocks, config.block_size)
        self.kv = KVCache(mc.num_layers, num_blocks, config.block_size, mc.num_kv_heads, mc.head_dim, dtype,
                          config.device)
        self.slots = (AdapterSlots(config.max_loras, config.max_lora_rank,
                                   mc.lora_module_shapes(config.lora_target_modules), dtype, config.device)
                      if config.max_loras > 0 else None)
        self.loras = LoRAManager(self.slots)
        self.scheduler = Scheduler(self.pool, config.max_num_seqs, config.max_num_batched_tokens)
        self.runner = ModelRunner(self.model, self.kv, self.slots, config.block_size, config.device)
        self.sampler = Sampler()
        self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(config.model_dir)
        self.max_model_len = min(config.max_model_len or mc.max_position_embeddings, num_blocks * config.block_size)
        self.eos_token_ids = frozenset(mc.eos_token_ids)
        self.requests: dict[str, _Request] = {}
        self._waiting_for_slot: deque[Sequence] = deque()
        self.num_preemptions = 0
        self.name: str | None = None  # set by whoever hosts the engine (e.g. the Decoder replica id)

    # -- adapters ---------------------------------------------------------------------------
    def add_lora(self, name: str, weights: LoRAWeights, version: int = 1) -> None:
        """Register (or hot-swap) an adapter; a resident one is rewritten in place between steps."""
        self.loras.register(name, weights, version)

    def remove_lora(self, name: str) -> None:
        self.loras.unregister(name)

    # -- requests ---------------------------------------------------------------------------
    def add_request(self, prompt: Any, sampling: SamplingParams, adapter: str | None = None,
                    image_embeds: torch.Tensor | None = None, request_id: str | None = None) -> str:
        """Queue a request; `prompt` is a list of token ids or a PreparedPrompt. Returns its id."""
        ids = list(prompt) if isinstance(prompt, (list, tuple)) else list(prompt.token_ids)
        positions = None if isinstance(prompt, (list, tuple)) else getattr(prompt, "positions", None)
        rope_delta = 0 if isinstance(prompt, (list, tuple)) else int(getattr(prompt, "rope_delta", 0))
        request_id = request_id or uuid.uuid4().hex
        self._validate(ids, sampling, image_embeds, request_id)
        version = self.loras.version(adapter) if adapter is not None else None
        seqs = []
        for i in range(sampling.n):
            seq = Sequence(request_id, i, ids, sampling, prompt_positions=positions, rope_delta=rope_delta,
                           image_embeds=image_embeds, image_token_id=self.model.cfg.image_token_id)
            seq.state = _SeqState(RowState.create(sampling, index=i), IncrementalDetokenizer(self.tokenizer),
                                  StopChecker(sampling.stop, sampling.include_stop_str_in_output))
            seqs.append(seq)
        self.requests[request_id] = _Request(request_id, seqs, len(ids), adapter, version)
        for seq in seqs:
            self._admit(seq, adapter)
        return request_id

    def _validate(self, ids: list[int], sampling: SamplingParams, image_embeds, request_id: str) -> None:
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        if not ids:
            raise RequestError("the prompt is empty")
        vocab = self.model.cfg.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise RequestError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        total = len(ids) + sampling.max_tokens
        if total > self.max_model_len:
            raise RequestError(
                f"this model's maximum context length is {self.max_model_len} tokens, but you requested {total} "
                f"tokens ({len(ids)} in the prompt, {sampling.max_tokens} for the completion); "
                "shorten the prompt or lower max_tokens")
        n_img = sum(1 for t in ids if t == self.model.cfg.image_token_id)
        n_emb = 0 if image_embeds is None else image_embeds.shape[0]
        if n_img != n_emb:
            raise RequestError(f"the prompt has {n_img} image tokens but {n_emb} image embedding rows were given")

    def _admit(self, seq: Sequence, adapter: str | None) -> None:
        if adapter is None:
            self.scheduler.add(seq)
            return
        slot = self.loras.acquire(adapter)
        if slot is None:
            self._waiting_for_slot.append(seq)
        else:
            seq.adapter_slot = slot
            self.scheduler.add(seq)

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its KV blocks and adapter slot; False if it is unknown."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        for seq in req.seqs:
            if seq.status is not SeqStatus.FINISHED:
                if seq in self._waiting_for_slot:
                    self._waiting_for_slot.remove(seq)
                    seq.status = SeqStatus.FINISHED
                    seq.finish_reason = "abort"
                else:
                    self._finish(seq, "abort")
        return True

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # -- the loop ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        while self._waiting_for_slot:
            seq = self._waiting_for_slot[0]
            slot = self.loras.acquire(self.requests[seq.request_id].adapter)
            if slot is None:
                break
            self._waiting_for_slot.popleft()
            seq.adapter_slot = slot
            self.scheduler.add(seq)
        batch = self.scheduler.schedule()
        self.num_preemptions += len(batch.preempted)
        if batch.empty:
            return []
        logits, samplers = self.runner.run(batch)
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
        touched: dict[str, _Request] = {}
        if samplers:
            result = self.sampler.sample(logits, [s.state.row for s in samplers])
            for i, seq in enumerate(samplers):
                req = self.requests[seq.request_id]
                self._append(seq, req, result.token_ids[i], result.logprobs[i], result.top_logprobs[i])
                touched[req.request_id] = req
        return [self._report(req) for req in touched.values()]

    def _append(self, seq: Sequence, req: _Request, token: int, logprob, top) -> None:
        st: _SeqState = seq.state
        sp = seq.sampling
        seq.output_token_ids.append(token)
        st.row.output_token_ids.append(token)
        lp = TokenLogprob(token, logprob, top or []) if sp.logprobs else None
        reason = None
        if token in sp.stop_token_ids or (token in self.eos_token_ids and not sp.ignore_eos):
            text = st.stop.push(st.detok.flush())[0] + st.stop.flush()
            reason = "stop"
        else:
            text, hit = st.stop.push(st.detok.push([token]))
            if hit:
                reason = "stop"
            elif len(seq.output_token_ids) >= sp.max_tokens or seq.num_tokens >= self.max_model_len:
                tail, hit = st.stop.push(st.detok.flush())
                text += tail + ("" if hit else st.stop.flush())
                reason = "stop" if hit else "length"
        req.pending.append(ChoiceDelta(seq.index, text, [token], [lp] if lp else None, reason))
        if reason is not None:
            self._finish(seq, reason)

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.scheduler.finish(seq, reason)
        if seq.adapter_slot >= 0:
            self.loras.release(seq.adapter_slot)
            seq.adapter_slot = -1

    def _report(self, req: _Request) -> RequestOutput:
        choices, req.pending = req.pending, []
        finished = all(s.status is SeqStatus.FINISHED for s in req.seqs)
        if finished:
            self.requests.pop(req.request_id, None)
        return RequestOutput(req.request_id, choices, finished, req.num_prompt_tokens,
                             sum(len(s.output_token_ids) for s in req.seqs), req.adapter, req.adapter_version,
                             self.name)

    # -- offline convenience ----------------------------------------------------------------
    def generate(self, prompts: list[Any], sampling: SamplingParams, adapters: list[str | None] | None = None,
                 image_embeds: list[torch.Tensor | None] | None = None) -> list[list[list[int]]]:
        """Run prompts to completion; token ids per prompt per choice (tests and benchmarks)."""
        rids = [self.add_request(p, sampling, adapters[i] if adapters else None,
                                 image_embeds[i] if image_embeds else None) for i, p in enumerate(prompts)]
        out = {r: [[] for _ in range(sampling.n)] for r in rids}
        while self.has_unfinished():
            for o in self.step():
                for c in o.choices:
                    out[o.request_id][c.index].extend(c.token_ids)
        return [out[r] for r in rids]


class AsyncEngine:
    """Runs an LLMEngine on its own thread; coroutines submit requests and stream their deltas.

    All engine calls happen on the engine thread (between steps), so adapter swaps and aborts
    never race a forward pass. A client that stops iterating (disconnect) aborts its request.
    """

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="vlora-engine", daemon=True)
        self._thread.start()

    def call(self, fn: Callable[[LLMEngine], Any]) -> concurrent.futures.Future:
        """Run `fn(engine)` on the engine thread between steps."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put((fn, fut))
        return fut

    async def run(self, fn: Callable[[LLMEngine], Any]) -> Any:
        return await asyncio.wrap_future(self.call(fn))

    async def generate(self, prompt: Any, sampling: SamplingParams, adapter: str | None = None,
                       image_embeds: torch.Tensor | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        rid = request_id or uuid.uuid4().hex
        q: asyncio.Queue = asyncio.Queue()
        self._streams[rid] = (asyncio.get_running_loop(), q)
        finished = False
        try:
            await self.run(lambda e: e.add_request(prompt, sampling, adapter, image_embeds, rid))
            while not finished:
                out = await q.get()
                if isinstance(out, BaseException):
                    raise out
                finished = out.finished
                yield out
        finally:
            self._streams.pop(rid, None)
            if not finished:
                self.call(lambda e: e.abort(rid))

    def shutdown(self) -> None:
        self._stopped = True
        self._commands.put((None, None))
        self._thread.join(timeout=10)

    def _run_commands(self, block: bool) -> None:
        while True:
            try:
                fn, fut = self._commands.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                return
            block = False
            if fn is None:
                return
            try:
                fut.set_result(fn(self.engine))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                fut.set_exception(exc)

    def _deliver(self, rid: str, item: Any) -> None:
        stream = self._streams.get(rid)
        if stream is not None:
            loop, q = stream
            loop.call_soon_threadsafe(q.put_nowait, item)

    def _loop(self) -> None:
        while not self._stopped:
            self._run_commands(block=not self.engine.has_unfinished())
            if not self.engine.has_unfinished():
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # a bug must not wedge every client: fail the running requests
                log.exception("engine step failed; aborting running requests")
                for rid in list(self.engine.requests):
                    self.engine.abort(rid)
                    self._deliver(rid, RuntimeError(f"engine step failed: {exc}"))
                continue
            for out in outputs:
                self._deliver(out.request_id, out)
