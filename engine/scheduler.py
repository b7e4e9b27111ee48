"""Continuous-batching scheduler: plain Python over sequences, no tensors, testable without a model.

Like vLLM v1 there are no prefill/decode phases: each running sequence has tokens to catch up
(`num_tokens - num_computed_tokens`: a prompt chunk, a recompute after preemption, or the one
token sampled last step), and each step hands out a token budget. Running sequences are served
first, oldest first; when the KV pool cannot hold a running sequence's next tokens, the youngest
running sequence is preempted (its blocks freed, recomputed later). Waiting sequences are
admitted in arrival order while there is room, never jumping the queue.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from vlora.engine.kv_cache import KVBlockPool
from vlora.engine.sequence import Sequence, SeqStatus


@dataclass(slots=True)
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)  # per seq, tokens computed this step
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.seqs


class Scheduler:
    def __init__(self, pool: KVBlockPool, max_num_seqs: int, max_num_batched_tokens: int):
        self.pool = pool
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.pool.free(seq.block_table)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SeqStatus.WAITING
        self.running.remove(seq)
        self.waiting.appendleft(seq)

    def schedule(self) -> ScheduledBatch:
        out = ScheduledBatch()
        budget = self.max_num_batched_tokens
        scheduled: set[int] = set()
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if n == 0:  # caught up and waiting for its optimal-sampling partner's logits
                i += 1
                continue
            while not self.pool.grow(seq.block_table, seq.num_computed_tokens + n):
                victim = next((s for s in reversed(self.running) if s.seq_id not in scheduled), None)
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                out.seqs.append(seq)
                out.num_new_tokens.append(n)
                scheduled.add(seq.seq_id)
                budget -= n
                i += 1
                continue
            # `seq` itself was preempted: the list shifted, so `i` already points at the next one.
        if out.preempted:
            return out
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self.pool.grow(seq.block_table, seq.num_computed_tokens + n):
                break
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            out.seqs.append(seq)
            out.num_new_tokens.append(n)
            budget -= n
        return out

    def finish(self, seq: Sequence, reason: str) -> None:
        """Remove a sequence (finished or aborted) and return its blocks to the pool."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        self.pool.free(seq.block_table)
        seq.block_table = []
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
