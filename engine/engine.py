"""The engine: `add_request` / `step` / `abort`, and an asyncio wrapper that streams deltas.

One step = schedule -> run the model on the packed batch -> sample -> detokenize -> report.
`LLMEngine` is single-threaded; `AsyncEngine` owns it on a background thread of this process;
`engine/engine_process.py`'s `EngineProcess`, with the same interface, runs it in a child process
(what the Decoder deployment drives by default).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from vlora.engine.config import EngineConfig
from vlora.engine.detokenizer import IncrementalDetokenizer, StopChecker
from vlora.engine.grammar import GrammarCache
from vlora.engine.kv_cache import KVBlockPool
from vlora.engine.lora import LoRAWeights
from vlora.engine.lora_manager import LoRAManager
from vlora.engine.model_runner import ModelRunner
from vlora.engine.model_shard import load_model_shard
from vlora.engine.optimal_sampling import OptimalSampler, OptimalSamplingParams
from vlora.engine.output_stream import OutputStream, merge_outputs, put_all
from vlora.engine.outputs import ChoiceDelta, RequestOutput, TokenLogprob
from vlora.engine.prompts import PreparedPrompt
from vlora.engine.sampling import RowState, Sampler, SamplingParams, apply_grammar_masks, grammar_masks
from vlora.engine.scheduler import Scheduler
from vlora.engine.sequence import Sequence, SeqStatus
from vlora.engine.tp import TPGroup, TPSpec
from vlora.engine.tp_worker import TPDriver

log = logging.getLogger(__name__)


class RequestError(ValueError):
    """A request the engine cannot serve as given (too long, bad ids, image mismatch): a client error."""


class ContextLengthError(RequestError):
    """Prompt + completion exceed the model's context (OpenAI's `context_length_exceeded`)."""


class EngineDeadError(RuntimeError):
    """The engine thread failed: its requests fail with this, and the replica reports itself unhealthy."""


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
    optimal: OptimalSamplingParams | None = None
    teacher_adapter: str | None = None
    arrival_time: float = 0.0  # perf_counter at add_request (read-only bookkeeping for the queue-time metric)
    first_scheduled_time: float | None = None  # perf_counter of the first step that scheduled one of its rows

    @property
    def all_seqs(self) -> list[Sequence]:
        """Students (the client's choices) and their teacher rows."""
        return self.seqs + [s.partner for s in self.seqs if s.partner is not None]


def _prompt_parts(prompt: Any) -> tuple[list[int], torch.Tensor | None, int]:
    """(token ids, M-RoPE positions or None, rope delta) of a token list or a PreparedPrompt."""
    if isinstance(prompt, (list, tuple)):
        return list(prompt), None, 0
    if isinstance(prompt, PreparedPrompt):  # None for a text-only prompt: its rows are 0..L-1
        return list(prompt.token_ids), prompt.mrope, prompt.rope_delta
    return list(prompt.token_ids), getattr(prompt, "positions", None), int(getattr(prompt, "rope_delta", 0))


class LLMEngine:
    def __init__(self, config: EngineConfig, tokenizer: Any = None, tp: TPSpec | None = None):
        """`tp`: this engine is rank 0 of a tensor-parallel group whose other ranks run
        engine/tp_worker.run_worker with the same config (construction waits until they join)."""
        from transformers import AutoTokenizer

        self.config = config
        group = TPGroup(tp, config.device) if tp is not None and tp.world_size > 1 else None
        shard = load_model_shard(config, group)
        self.model, self.kv, self.slots, num_blocks = shard.model, shard.kv, shard.slots, shard.num_blocks
        mc = self.model.cfg
        self.pool = KVBlockPool(num_blocks, config.block_size)
        self.loras = LoRAManager(self.slots)
        self.scheduler = Scheduler(self.pool, config.max_num_seqs, config.max_num_batched_tokens)
        self.max_model_len = shard.max_model_len
        # With tp, the runner drives the group; steps run eagerly (a broadcast cannot sit in a CUDA graph).
        self.tp = TPDriver(self.model, group, self.slots) if group is not None else None
        self.runner = ModelRunner(self.tp or self.model, self.kv, self.slots, config.block_size, config.device,
                                  config.max_num_seqs, self.max_model_len, config.enforce_eager or group is not None)
        self.runner.capture()  # CUDA graphs for decode steps (no-op on a CPU or with enforce_eager)
        self.sampler = Sampler()
        self.optimal_sampler = OptimalSampler()
        self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(config.model_dir)
        self.eos_token_ids = frozenset(mc.eos_token_ids)
        self.special_token_ids = frozenset(self.tokenizer.all_special_ids) | self.eos_token_ids
        self._grammars: GrammarCache | None = None
        self._grammars_lock = threading.Lock()
        self.requests: dict[str, _Request] = {}
        self._waiting_for_slot: deque[Sequence] = deque()
        self.num_preemptions = 0
        self.name: str | None = None  # set by whoever hosts the engine (e.g. the Decoder replica id)
        # The loop's own account: steps run, their wall time, request outputs reported.
        self.step_stats = {"steps": 0, "step_s": 0.0, "outputs": 0}

    @property
    def grammars(self) -> GrammarCache:
        """Compiled structured-output grammars for this tokenizer (made on first use: building the
        tokenizer's xgrammar tables takes a moment on a real vocabulary)."""
        with self._grammars_lock:
            if self._grammars is None:
                self._grammars = GrammarCache(self.tokenizer, self.model.cfg.vocab_size, self.eos_token_ids,
                                              self.config.max_grammars)
            return self._grammars

    # -- adapters ---------------------------------------------------------------------------
    def add_lora(self, name: str, weights: LoRAWeights, version: int = 1) -> None:
        """Register (or hot-swap) an adapter between steps. Running requests finish on the version
        they started with; requests admitted from now on get this one."""
        self.loras.register(name, weights, version)

    def remove_lora(self, name: str) -> None:
        self.loras.unregister(name)

    # -- requests ---------------------------------------------------------------------------
    def add_request(self, prompt: Any, sampling: SamplingParams, adapter: str | None = None,
                    image_embeds: torch.Tensor | None = None, request_id: str | None = None,
                    optimal: OptimalSamplingParams | None = None, teacher_prompt: Any = None,
                    teacher_image_embeds: torch.Tensor | None = None) -> str:
        """Queue a request; `prompt` is a list of token ids or a PreparedPrompt. Returns its id.

        With `optimal`, every choice gets a teacher row (`optimal.teacher`: "base" or an adapter, on
        `teacher_prompt` if given, else the same prompt) and tokens are drawn from the q* mixture.
        """
        ids, positions, rope_delta = _prompt_parts(prompt)
        request_id = request_id or uuid.uuid4().hex
        self._validate(ids, sampling, image_embeds, request_id)
        if adapter is not None:
            self.loras.version(adapter)  # unknown adapter: UnknownAdapterError before anything changes
        teacher_adapter = None
        if optimal is not None:
            teacher_adapter = None if optimal.teacher == "base" else optimal.teacher
            if teacher_adapter is not None:
                self.loras.version(teacher_adapter)  # unknown teacher: UnknownAdapterError before anything changes
            if teacher_prompt is None:
                teacher_prompt, teacher_image_embeds = prompt, image_embeds
            t_ids, t_positions, t_delta = _prompt_parts(teacher_prompt)
            self._validate(t_ids, sampling, teacher_image_embeds, None)
        grammar = None
        if sampling.grammar is not None:  # compiled already when the caller warmed the cache (AsyncEngine does)
            grammar = self.grammars.get(sampling.grammar)
        seqs = []
        for i in range(sampling.n):
            seq = Sequence(request_id, i, ids, sampling, prompt_positions=positions, rope_delta=rope_delta,
                           image_embeds=image_embeds, image_token_id=self.model.cfg.image_token_id)
            seq.state = _SeqState(RowState.create(sampling, index=i, eos_token_ids=tuple(self.eos_token_ids)),
                                  IncrementalDetokenizer(self.tokenizer),
                                  StopChecker(sampling.stop, sampling.include_stop_str_in_output))
            if grammar is not None:
                seq.state.row.grammar = self.grammars.new_matcher(grammar)
            if optimal is not None:
                seq.partner = Sequence(request_id, i, t_ids, sampling, prompt_positions=t_positions,
                                       rope_delta=t_delta, image_embeds=teacher_image_embeds,
                                       image_token_id=self.model.cfg.image_token_id, partner=seq, is_teacher=True)
            seqs.append(seq)
        self.requests[request_id] = _Request(request_id, seqs, len(ids), adapter, None, optimal=optimal,
                                             teacher_adapter=teacher_adapter, arrival_time=time.perf_counter())
        for seq in seqs:
            self._admit(seq, adapter)
            if seq.partner is not None:
                self._admit(seq.partner, teacher_adapter)
        return request_id

    def _validate(self, ids: list[int], sampling: SamplingParams, image_embeds, request_id: str | None) -> None:
        if request_id is not None and request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        if not ids:
            raise RequestError("the prompt is empty")
        vocab = self.model.cfg.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise RequestError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        total = len(ids) + sampling.max_tokens
        if total > self.max_model_len:
            raise ContextLengthError(
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
            self._start_with_slot(seq, slot)

    def _start_with_slot(self, seq: Sequence, slot: int) -> None:
        """The slot pins the adapter version the request is served with; it is what the request reports."""
        seq.adapter_slot = slot
        req = self.requests[seq.request_id]
        if not seq.is_teacher and req.adapter_version is None:
            req.adapter_version = self.loras.slot_version(slot)
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its KV blocks and adapter slot; False if it is unknown."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        for seq in req.seqs:
            self._finish(seq, "abort")
        return True

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def state(self) -> dict:
        """Plain counts for gauges and /stats (read between steps by whoever hosts the engine)."""
        running = {s.request_id for s in self.scheduler.running}
        adapters = {rid: r.adapter for rid, r in self.requests.items() if r.adapter}
        return {
            "running_adapters": sorted({a for rid, a in adapters.items() if rid in running}),
            "waiting_adapters": sorted({a for rid, a in adapters.items() if rid not in running}),
            "num_running": len(running),
            "num_waiting": len(self.requests) - len(running.intersection(self.requests)),
            "num_requests": len(self.requests),
            "kv_blocks_used": self.pool.num_used_blocks,
            "kv_blocks_total": self.pool.num_blocks,
            "num_preemptions": self.num_preemptions,
            "lora_slots_used": len(self.loras.resident),
            "lora_slots_total": self.slots.num_slots if self.slots is not None else 0,
            "lora_slot_loads": self.loras.num_swaps,
            "adapters": {n: a.version for n, a in self.loras.adapters.items()},
            "resident_adapters": dict(self.loras.resident),
            "engine_loop": dict(self.step_stats),
            "tensor_parallel_steps": self.tp.num_steps if self.tp is not None else None,
        }

    # -- the loop ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        t0 = time.perf_counter()
        outputs = self._step()
        st = self.step_stats
        st["steps"] += 1
        st["step_s"] += time.perf_counter() - t0
        st["outputs"] += len(outputs)
        return outputs

    def _step(self) -> list[RequestOutput]:
        while self._waiting_for_slot:
            seq = self._waiting_for_slot[0]
            req = self.requests[seq.request_id]
            slot = self.loras.acquire(req.teacher_adapter if seq.is_teacher else req.adapter)
            if slot is None:
                break
            self._waiting_for_slot.popleft()
            self._start_with_slot(seq, slot)
        batch = self.scheduler.schedule()
        self.num_preemptions += len(batch.preempted)
        if batch.empty:
            return []
        for seq in batch.seqs:  # queue time: only rows with nothing computed yet (new or preempted) can be firsts
            if seq.num_computed_tokens == 0:
                req = self.requests.get(seq.request_id)
                if req is not None and req.first_scheduled_time is None:
                    req.first_scheduled_time = time.perf_counter()
        logits, samplers = self.runner.run(batch)
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
        touched: dict[str, _Request] = {}
        plain = [i for i, s in enumerate(samplers) if s.partner is None]
        if plain:
            rows = [samplers[i] for i in plain]
            result = self.sampler.sample(logits[plain] if len(plain) < len(samplers) else logits,
                                         [s.state.row for s in rows])
            for j, seq in enumerate(rows):
                req = self.requests[seq.request_id]
                self._append(seq, req, result.token_ids[j], result.logprobs[j], result.top_logprobs[j])
                touched[req.request_id] = req
        pairs = []
        for i, seq in enumerate(samplers):
            if seq.partner is None:
                continue
            seq.pending_logits = logits[i]
            if seq.partner.pending_logits is not None:
                pairs.append(seq.partner if seq.is_teacher else seq)
        if pairs:
            self._sample_pairs(pairs, touched)
        return [self._report(req) for req in touched.values()]

    def _sample_pairs(self, students: list[Sequence], touched: dict[str, _Request]) -> None:
        """One q* draw per (student, teacher) pair whose next-token logits are both ready."""
        z_s = torch.stack([s.pending_logits for s in students])
        z_t = torch.stack([s.partner.pending_logits for s in students])
        rows = [s.state.row for s in students]
        reqs = [self.requests[s.request_id] for s in students]
        allowed = grammar_masks(rows, z_s.shape[1], z_s.device)  # q* restricted to the tokens a grammar allows
        tokens, diags = self.optimal_sampler.sample(
            apply_grammar_masks(z_s, rows, allowed), apply_grammar_masks(z_t, rows, allowed), rows,
            [r.optimal for r in reqs], [not s.output_token_ids for s in students], self.special_token_ids)
        lps, tops = self.sampler._logprobs(z_s, torch.tensor(tokens, device=z_s.device), rows)
        for j, seq in enumerate(students):
            seq.pending_logits = seq.partner.pending_logits = None
            seq.partner.output_token_ids.append(tokens[j])
            diag = [{"token_id": tokens[j], **diags[j].to_dict()}] if diags[j] is not None else None
            self._append(seq, reqs[j], tokens[j], lps[j], tops[j], diag)
            touched[reqs[j].request_id] = reqs[j]

    def _append(self, seq: Sequence, req: _Request, token: int, logprob, top, diagnostics=None) -> None:
        st: _SeqState = seq.state
        sp = seq.sampling
        seq.output_token_ids.append(token)
        st.row.output_token_ids.append(token)
        lp = TokenLogprob(token, logprob, top or []) if sp.logprobs else None
        reason = None
        grammar_done = False
        if st.row.grammar is not None:  # the matcher moves past the token; a finished grammar ends the row
            accepted = st.row.grammar.accept_token(token)
            if not accepted:  # the mask allowed it, so this is a bug: end the row rather than go on unconstrained
                log.error("request %s: the grammar rejected token %d it allowed", seq.request_id, token)
            grammar_done = not accepted or st.row.grammar.is_terminated()
        if (token in sp.stop_token_ids or (token in self.eos_token_ids and not sp.ignore_eos)) or grammar_done:
            text = st.stop.push(st.detok.flush())[0] + st.stop.flush()
            reason = "stop"
        else:
            # min_tokens: stop strings count only in text that arrives after the minimum (as vLLM)
            text, hit = st.stop.push(st.detok.push([token]), check=len(seq.output_token_ids) > sp.min_tokens)
            if hit:
                reason = "stop"
            elif len(seq.output_token_ids) >= sp.max_tokens or seq.num_tokens >= self.max_model_len:
                tail, hit = st.stop.push(st.detok.flush())
                text += tail + ("" if hit else st.stop.flush())
                reason = "stop" if hit else "length"
        req.pending.append(ChoiceDelta(seq.index, text, [token], [lp] if lp else None, reason, diagnostics))
        if reason is not None:
            self._finish(seq, reason)

    def _finish(self, seq: Sequence, reason: str) -> None:
        for s in (seq, seq.partner) if seq.partner is not None else (seq,):
            if s.status is SeqStatus.FINISHED:
                continue
            if s in self._waiting_for_slot:  # never reached the scheduler: it holds no blocks or slot
                self._waiting_for_slot.remove(s)
                s.status, s.finish_reason = SeqStatus.FINISHED, reason
                continue
            self.scheduler.finish(s, reason)
            self.runner.release(s)
            s.pending_logits = None
            if s.adapter_slot >= 0:
                self.loras.release(s.adapter_slot)
                s.adapter_slot = -1

    def _report(self, req: _Request) -> RequestOutput:
        choices, req.pending = req.pending, []
        finished = all(s.status is SeqStatus.FINISHED for s in req.seqs)
        if finished:
            self.requests.pop(req.request_id, None)
        queued = None if req.first_scheduled_time is None else req.first_scheduled_time - req.arrival_time
        return RequestOutput(req.request_id, choices, finished, req.num_prompt_tokens,
                             sum(len(s.output_token_ids) for s in req.seqs), req.adapter, req.adapter_version,
                             self.name, queued)

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


class EngineFrontend:
    """What the two hosts of an LLMEngine share: streaming, completion and calls, built on each
    host's `call`, `_submit`, `_abort` and `_consumer_interval`. The hosts are `AsyncEngine` (a thread
    of this process) and engine/engine_process.py's `EngineProcess`."""

    error: BaseException | None = None  # what ended the engine, if anything did
    stream_interval_s: float = 0.0
    _streams: dict[str, OutputStream]

    async def run(self, fn: Callable[[LLMEngine], Any]) -> Any:
        return await asyncio.wrap_future(self.call(fn))

    def _deliver(self, items: list[tuple[str, Any]]) -> None:
        """Each (request id, output or error) to its stream, if that stream is still open."""
        put_all([(s, item) for rid, item in items if (s := self._streams.get(rid)) is not None])

    async def generate(self, prompt: Any, sampling: SamplingParams, adapter: str | None = None,
                       image_embeds: torch.Tensor | None = None, request_id: str | None = None,
                       stream_interval_s: float | None = None, **optimal: Any) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs, each one merging every step since the previous one.

        `stream_interval_s` overrides the engine-wide interval (0: one output per step, inf: one at
        the end); `optimal` takes add_request's optimal-sampling keywords. A consumer that stops
        iterating (a client gone) aborts the request.
        """
        rid = request_id or uuid.uuid4().hex
        interval = self.stream_interval_s if stream_interval_s is None else stream_interval_s
        stream = OutputStream(asyncio.get_running_loop(), self._consumer_interval(interval))
        self._streams[rid] = stream
        finished = False
        try:
            if self.error is not None:
                raise self._dead()
            await self._submit(rid, prompt, sampling, adapter, image_embeds, optimal, interval)
            while not finished:
                out = await stream.next_batch()
                finished = out.finished
                yield out
        finally:
            self._streams.pop(rid, None)
            if not finished and self.error is None:
                self._abort(rid)

    async def complete(self, prompt: Any, sampling: SamplingParams, adapter: str | None = None,
                       image_embeds: torch.Tensor | None = None, request_id: str | None = None,
                       **optimal: Any) -> RequestOutput:
        """Run a request to the end; its whole output as one RequestOutput (non-streaming callers)."""
        outs = [out async for out in self.generate(prompt, sampling, adapter, image_embeds, request_id,
                                                   stream_interval_s=math.inf, **optimal)]
        return merge_outputs(outs)

    def _dead(self) -> EngineDeadError:
        return EngineDeadError(f"the engine failed ({type(self.error).__name__}: {self.error}); "
                               "this replica is being replaced, retry the request")


class AsyncEngine(EngineFrontend):
    """Runs an LLMEngine on its own thread; coroutines submit requests and stream their deltas.

    All engine calls happen on the engine thread (between steps), so adapter swaps and aborts
    never race a forward pass. A client that stops iterating (disconnect) aborts its request.
    Any exception on the engine thread ends it: every request fails with EngineDeadError and
    `healthy` turns False, so the hosting replica can be replaced rather than hang.
    Outputs reach the consumer in batches (engine/output_stream.py): the first at once, then one
    per tick of a `stream_interval_s` clock shared by all requests, or at once when the request
    finishes.
    """

    def __init__(self, engine: LLMEngine, stream_interval_s: float = 0.0):
        self.engine = engine
        self.stream_interval_s = stream_interval_s
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, OutputStream] = {}
        self._stopped = False
        self._fault: BaseException | None = None
        self.error: BaseException | None = None  # what ended the engine thread, if anything did
        self._thread = threading.Thread(target=self._loop, name="vlora-engine", daemon=True)
        self._thread.start()

    @property
    def healthy(self) -> bool:
        return self.error is None and self._thread.is_alive()

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def loop_stats(self) -> dict:
        return self.engine.step_stats

    def call(self, fn: Callable[[LLMEngine], Any]) -> concurrent.futures.Future:
        """Run `fn(engine)` on the engine thread between steps."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put((fn, fut))
        if self.error is not None:  # the thread is gone (or going): nobody else will answer it
            self._fail_commands()
        return fut

    def inject_fault(self, exc: BaseException) -> None:
        """Make the engine thread raise `exc` before its next step (fault drills and tests)."""
        def arm(_: LLMEngine) -> None:
            self._fault = exc
        self.call(arm)

    def _consumer_interval(self, interval_s: float) -> float:
        return interval_s  # the consumer's OutputStream spaces the batches

    async def _submit(self, rid: str, prompt: Any, sampling: SamplingParams, adapter: str | None,
                      image_embeds: torch.Tensor | None, optimal: dict, interval_s: float) -> None:
        grammar = getattr(sampling, "grammar", None)
        if grammar is not None:  # compiled off the engine thread, so a slow schema stalls no stream
            await asyncio.get_running_loop().run_in_executor(None, self.engine.grammars.get, grammar)
        await self.run(lambda e: e.add_request(prompt, sampling, adapter, image_embeds, rid, **optimal))

    def _abort(self, rid: str) -> None:
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
            # NOTE: asyncio cancels the wrapped future when its caller goes away; a cancelled
            # command is skipped, and a running one can no longer be cancelled, so set_* is safe.
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                result = fn(self.engine)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                fut.set_exception(exc)
            else:
                fut.set_result(result)

    def _fail_commands(self) -> None:
        while True:
            try:
                _, fut = self._commands.get_nowait()
            except queue.Empty:
                return
            if fut is not None and fut.set_running_or_notify_cancel():
                fut.set_exception(self._dead())

    def _loop(self) -> None:
        try:
            while not self._stopped:
                self._run_commands(block=not self.engine.has_unfinished())
                if self._fault is not None:
                    fault, self._fault = self._fault, None
                    raise fault
                if not self.engine.has_unfinished():
                    continue
                self._deliver([(out.request_id, out) for out in self.engine.step()])
        except BaseException as exc:  # noqa: BLE001 - the engine's state is unknown now: stop serving
            log.exception("the engine thread failed; failing its requests, the replica reports unhealthy")
            self.error = exc
            self._deliver([(rid, self._dead()) for rid in list(self._streams)])
            self._fail_commands()
