"""Tensor parallelism: one model split across `world_size` processes (Megatron-style), no Ray.

Rank 0 is the engine: it schedules, runs its shard and samples. Ranks 1..N-1 run
`engine/tp_worker.py`: each step rank 0 broadcasts the model call (token ids, positions,
attention metadata with the block tables' slots, LoRA routing, image embeddings) and the
adapter slot writes made since the last step; every rank then runs the same forward on its
shard. Two process groups, as in vLLM: a gloo group for those step messages (host objects) and
a device group for the activations (NCCL on GPUs, the same gloo group on CPU).

Sharding (`ShardPlan`): q/k/v and gate/up are column-parallel (each rank owns its heads, KV
heads and intermediate columns, so its KV pool holds its KV heads only), o and down are
row-parallel with one all-reduce each. The embedding is replicated; the lm_head is either
replicated (rank 0 alone computes logits) or vocab-parallel (each rank its vocabulary rows,
gathered to full logits) -- `lm_head` below.
"""

from __future__ import annotations

import dataclasses
import io
import pickle
import random
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

import torch
import torch.distributed as dist


@dataclass(frozen=True, slots=True)
class TPSpec:
    """Where one rank sits in a tensor-parallel group and how the group meets (a TCP store at rank 0's
    address). Every rank of a group gets the same spec but its own `rank`.

    NOTE: the store and the groups are unauthenticated (torch.distributed's): the port must only be
    reachable inside the cluster."""

    rank: int
    world_size: int
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    timeout_s: float = 120.0  # a collective that waits longer (a peer hung or gone) raises instead of hanging
    lm_head: Literal["replicated", "vocab_parallel"] = "vocab_parallel"

    def __post_init__(self):
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"tensor-parallel rank {self.rank} is outside [0, {self.world_size})")
        if self.lm_head not in ("replicated", "vocab_parallel"):
            raise ValueError(f"lm_head must be 'replicated' or 'vocab_parallel', got {self.lm_head!r}")

    def for_rank(self, rank: int) -> "TPSpec":
        return dataclasses.replace(self, rank=rank)


# Ports no other process takes on its own: below the kernel's ephemeral range (Linux 32768-60999,
# macOS 49152-65535), which bind(0) and outgoing connections draw from (Ray's processes under
# ray.init among them), and outside the ranges Ray assigns (workers 10002-19999 under `ray start`,
# Serve's replica HTTP ports 30000-31000).
QUIET_PORTS = range(20000, 30000)
_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now on `host`, taken from QUIET_PORTS, so it stays free until the process
    it is meant for binds it (Ray's own processes bind ephemeral ports by the dozen as they start). Never
    the same port twice in one process."""
    for port in random.sample(QUIET_PORTS, len(QUIET_PORTS)):
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free TCP port on {host} in {QUIET_PORTS.start}-{QUIET_PORTS.stop - 1}")


def shard_range(size: int, rank: int, world_size: int) -> tuple[int, int]:
    """[lo, hi) of rank's equal share of `size` (which must divide evenly)."""
    if size % world_size:
        raise ValueError(f"{size} does not split evenly over {world_size} tensor-parallel ranks")
    n = size // world_size
    return rank * n, (rank + 1) * n


# Megatron kinds of the LoRA-targetable projections: column-parallel ones shard their outputs,
# row-parallel ones their inputs (and all-reduce their outputs).
COLUMN_PARALLEL = frozenset({"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"})
ROW_PARALLEL = frozenset({"o_proj", "down_proj"})


@dataclass(frozen=True, slots=True)
class ShardPlan:
    """Which slice of each full projection a rank holds (rank 0 of 1: everything)."""

    rank: int = 0
    world_size: int = 1
    vocab_parallel: bool = False

    @property
    def sharded(self) -> bool:
        return self.world_size > 1

    def out_range(self, module: str, out_features: int) -> tuple[int, int]:
        """Output rows of a projection this rank computes."""
        if module in COLUMN_PARALLEL:
            return shard_range(out_features, self.rank, self.world_size)
        return 0, out_features

    def in_range(self, module: str, in_features: int) -> tuple[int, int]:
        """Input columns of a projection this rank reads."""
        if module in ROW_PARALLEL:
            return shard_range(in_features, self.rank, self.world_size)
        return 0, in_features

    def check(self, num_heads: int, num_kv_heads: int, intermediate: int, vocab: int) -> None:
        w = self.world_size
        if num_heads % w or num_kv_heads % w or intermediate % w:
            raise ValueError(
                f"tensor_parallel_size {w} must divide the attention heads ({num_heads}), the KV heads "
                f"({num_kv_heads}) and the MLP width ({intermediate}); choose a divisor of {num_kv_heads}")
        if self.vocab_parallel and vocab % w:
            raise ValueError(f"a vocab-parallel lm_head needs the vocabulary ({vocab}) divisible by {w}; "
                             "use lm_head='replicated'")


_IDLE_FOREVER = timedelta(days=365)


class TPGroupError(RuntimeError):
    """A collective failed: a peer rank died, hung past the group's timeout, or left."""


def _wait(work, what: str) -> None:
    try:
        work.wait()
    except RuntimeError as exc:  # gloo/NCCL report a lost or late peer as a RuntimeError
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise TPGroupError(f"a tensor-parallel peer stopped answering during {what} ({first})") from exc


class TPGroup:
    """This rank's membership: a gloo group for step messages, a device group for activations."""

    def __init__(self, spec: TPSpec, device: str | torch.device = "cpu"):
        self.spec = spec
        self.rank, self.world_size = spec.rank, spec.world_size
        self.device = torch.device(device)
        timeout = timedelta(seconds=spec.timeout_s)
        self._store = dist.TCPStore(spec.master_addr, spec.master_port, spec.world_size, spec.rank == 0,
                                    timeout=timeout)
        # Step messages: ranks 1..N-1 wait here while the engine is idle, so no deadline (a peer
        # that dies closes its connection, which ends the wait at once).
        self.cpu = dist.ProcessGroupGloo(dist.PrefixStore("cpu/", self._store), spec.rank, spec.world_size,
                                         _IDLE_FOREVER)
        # Activations: a peer that stops answering mid-step raises after `timeout_s`.
        if self.device.type == "cuda":
            self.dev = dist.ProcessGroupNCCL(dist.PrefixStore("dev/", self._store), spec.rank, spec.world_size)
        else:
            self.dev = dist.ProcessGroupGloo(dist.PrefixStore("dev/", self._store), spec.rank, spec.world_size,
                                             timeout)
        self.plan = ShardPlan(spec.rank, spec.world_size, spec.lm_head == "vocab_parallel")

    # -- activations ------------------------------------------------------------------------------
    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over the ranks, in place."""
        _wait(self.dev.allreduce([t]), "an all-reduce")
        return t

    def all_gather_last(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's `t` side by side along the last dimension (rank order)."""
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        _wait(self.dev.allgather([parts], [t.contiguous()]), "an all-gather")
        return torch.cat(parts, dim=-1)

    # -- step messages (rank 0 -> the others) -------------------------------------------------------
    def send(self, obj: Any) -> None:
        """Rank 0: broadcast a picklable object (tensors travel on the host)."""
        buf = io.BytesIO()
        pickle.dump(_to_host(obj), buf, protocol=pickle.HIGHEST_PROTOCOL)
        data = torch.frombuffer(bytearray(buf.getbuffer()), dtype=torch.uint8)
        _wait(self.cpu.broadcast(torch.tensor([data.numel()], dtype=torch.long), 0), "a step broadcast")
        _wait(self.cpu.broadcast(data, 0), "a step broadcast")

    def recv(self) -> Any:
        """Ranks 1..N-1: the next object rank 0 sent, its tensors on this rank's device.

        NOTE: unpickled only from rank 0 of the same group (a trusted peer of the same replica)."""
        n = torch.zeros(1, dtype=torch.long)
        _wait(self.cpu.broadcast(n, 0), "a step broadcast")
        data = torch.empty(int(n.item()), dtype=torch.uint8)
        _wait(self.cpu.broadcast(data, 0), "a step broadcast")
        return _to_device(pickle.loads(data.numpy().tobytes()), self.device)


def _map_tensors(obj: Any, fn) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _map_tensors(getattr(obj, f.name), fn)
                                           for f in dataclasses.fields(obj) if f.init})
    return obj


def _to_host(obj: Any) -> Any:
    return _map_tensors(obj, lambda t: t.detach().to("cpu"))


def _to_device(obj: Any, device: torch.device) -> Any:
    return obj if device.type == "cpu" else _map_tensors(obj, lambda t: t.to(device))
