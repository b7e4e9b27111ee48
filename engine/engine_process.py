"""The engine loop in a child process of its own, as vLLM v1 runs its engine core.

Why: on a thread of the serving process, every torch op of a step gives up the GIL and waits to
take it back while the process's event loop (the serving framework's per-item work) runs
Python; under streaming load a step took several times as long as alone. In a process of its own
the loop shares no GIL with the server.

`EngineProcess` lives in the serving process and has `AsyncEngine`'s interface (`call`, `run`,
`generate`, `complete`, `healthy`, `inject_fault`, `shutdown`). The child runs `LLMEngine` and
reads commands over a socketpair between steps only, so adapter swaps, aborts and reads never
race a forward pass. It coalesces each request's outputs before sending them: the first at once,
then one batch per tick of the stream-interval clock all requests share (`next_batch_due`), or
at once when the request finishes; so the serving process handles one message per interval for
all its streams instead of one per step and request.

A child that fails (an exception in a step, or the process dying) fails every request and call
with EngineDeadError and `healthy` turns False; the child exits when its parent goes away.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import math
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import torch

from vlora.engine.config import EngineConfig
from vlora.engine.engine import EngineDeadError, EngineFrontend, LLMEngine
from vlora.engine.output_stream import OutputStream, merge_outputs, next_batch_due
from vlora.engine.outputs import RequestOutput
from vlora.engine.sampling import SamplingParams
from vlora.engine.tp import TPSpec

log = logging.getLogger(__name__)


class EngineProcess(EngineFrontend):
    """Starts `LLMEngine(config)` in a child process and drives it from this one.

    `dumps` serializes the functions given to `call`: plain `pickle` takes module-level functions
    only; a host that passes closures and lambdas supplies a serializer for them (the Decoder
    passes Ray's cloudpickle). `tp`: the child is rank 0 of that tensor-parallel group. Waits for the
    model to load; raises if the child fails to start.
    """

    def __init__(self, config: EngineConfig, stream_interval_s: float = 0.0, name: str | None = None,
                 dumps: Callable[[Any], bytes] = pickle.dumps, start_timeout_s: float = 1800.0,
                 tp: TPSpec | None = None):
        self.stream_interval_s = stream_interval_s
        self._dumps = dumps
        self._lock = threading.Lock()  # guards _pending, error, and the connection's send side
        self._pending: dict[int, concurrent.futures.Future] = {}
        self._ids = itertools.count()
        self._streams: dict[str, OutputStream] = {}
        self._stopped = False
        self.error: BaseException | None = None  # what ended the child, if anything did

        ours, theirs = socket.socketpair()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "vlora.engine.engine_process", str(theirs.fileno())],
            pass_fds=(theirs.fileno(),), env={**os.environ, "VLORA_TORCH_THREADS": str(torch.get_num_threads())})
        theirs.close()
        self._conn = Connection(ours.detach())
        _send(self._conn, ("init", config, name, tp))
        deadline = time.monotonic() + start_timeout_s
        while not self._conn.poll(0.2):
            code = self._proc.poll()
            if code is not None:
                raise RuntimeError(f"the engine process exited with code {code} while loading the model; "
                                   "its log is above")
            if time.monotonic() > deadline:
                self._proc.kill()
                raise RuntimeError(f"the engine process did not load the model within {start_timeout_s:.0f} s")
        kind, info = _recv(self._conn)
        if kind != "ready":
            self._proc.wait(timeout=10)
            raise RuntimeError(f"the engine failed to start: {info}")
        self.max_model_len: int = info["max_model_len"]
        self.pid: int = self._proc.pid
        self._reader = threading.Thread(target=self._read, name="vlora-engine-reader", daemon=True)
        self._reader.start()

    # -- the AsyncEngine interface ---------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        return self.error is None and self._proc.poll() is None

    def call(self, fn: Callable[[LLMEngine], Any]) -> concurrent.futures.Future:
        """Run `fn(engine)` in the child between steps; its result (pickled back) completes the future."""
        return self._request("call", self._dumps(fn))

    def inject_fault(self, exc: BaseException) -> None:
        """Make the child raise `exc` before its next step (fault drills and tests)."""
        self._send_quiet(("fault", exc))

    def _consumer_interval(self, interval_s: float) -> float:
        return 0.0  # the child already spaces the batches

    async def _submit(self, rid: str, prompt: Any, sampling: SamplingParams, adapter: str | None,
                      image_embeds: torch.Tensor | None, optimal: dict, interval_s: float) -> None:
        # No round trip: a request the engine refuses comes back as an error on its stream.
        with self._lock:
            if self.error is not None:
                raise self._dead()
            _send(self._conn, ("add", (rid, prompt, sampling, adapter, image_embeds, optimal, interval_s)))

    def _abort(self, rid: str) -> None:
        self._send_quiet(("abort", rid))

    def shutdown(self) -> None:
        self._stopped = True
        self._send_quiet(("stop",))
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(timeout=10)
        self._conn.close()

    def kill(self) -> None:
        """End the child at once, as a crash would (fault drills and tests)."""
        self._proc.kill()

    # -- plumbing ------------------------------------------------------------------------------
    def _request(self, kind: str, payload: Any) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self.error is not None:
                fut.set_exception(self._dead())
                return fut
            cid = next(self._ids)
            self._pending[cid] = fut
            try:
                _send(self._conn, (kind, cid, payload))
            except Exception as exc:  # noqa: BLE001 - unpicklable payload, or the child is gone
                del self._pending[cid]
                if isinstance(exc, (OSError, EOFError)):
                    fut.set_exception(EngineDeadError(f"the engine process is unreachable ({exc})"))
                else:
                    fut.set_exception(exc)
        return fut

    def _send_quiet(self, msg: tuple) -> None:
        """A message nobody waits on (abort, fault, stop); a gone child is reported by the reader."""
        with self._lock:
            try:
                _send(self._conn, msg)
            except (OSError, EOFError, ValueError):
                pass

    def _read(self) -> None:
        """Reader thread: route outputs to their streams and results to their futures."""
        try:
            while True:
                msg = _recv(self._conn)
                if msg[0] == "out":
                    self._deliver([(out.request_id, out) for out in msg[1]])
                elif msg[0] == "refused":
                    self._deliver([(msg[1], msg[2])])
                elif msg[0] == "result":
                    _, cid, ok, value = msg
                    with self._lock:
                        fut = self._pending.pop(cid, None)
                    if fut is not None and fut.set_running_or_notify_cancel():
                        fut.set_result(value) if ok else fut.set_exception(value)
                elif msg[0] == "dead":
                    self._fail(RuntimeError(msg[1]))
                    return
        except (EOFError, OSError):
            if not self._stopped:
                try:
                    code = self._proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    code = None
                self._fail(RuntimeError(f"the engine process exited (code {code})"))

    def _fail(self, error: BaseException) -> None:
        log.error("the engine process failed: %s; failing its requests, the replica reports unhealthy", error)
        with self._lock:
            self.error = error
            pending, self._pending = self._pending, {}
        for fut in pending.values():
            if fut.set_running_or_notify_cancel():
                fut.set_exception(self._dead())
        self._deliver([(rid, self._dead()) for rid in list(self._streams)])


def _send(conn: Connection, msg: Any) -> None:
    # Plain pickle: Connection.send's pickler would hand torch tensors over as shared-memory file
    # descriptors, which need multiprocessing's resource sharer on both ends.
    conn.send_bytes(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))


def _recv(conn: Connection) -> Any:
    return pickle.loads(conn.recv_bytes())


def _picklable(exc: Exception) -> Exception:
    """`exc` if it survives pickling (so the caller sees its type), else a RuntimeError with its text."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(exc).__name__}: {exc}")


# -- the child ---------------------------------------------------------------------------------
class _Core:
    """The child's loop: commands between steps, steps while requests run, batched outputs out."""

    def __init__(self, conn: Connection, engine: LLMEngine):
        self.conn = conn
        self.engine = engine
        self.interval: dict[str, float] = {}  # request id -> its stream interval
        self.due: dict[str, float] = {}  # request id -> monotonic time its next batch may go
        self.buffered: dict[str, list[RequestOutput]] = {}
        self.fault: BaseException | None = None
        self.stopped = False
        # Requests whose structured-output grammar compiles on a worker thread (a slow schema stalls no
        # stream); admitted between steps once their compilation is done.
        self.compiling: list[tuple[concurrent.futures.Future, tuple]] = []
        self._compiler: concurrent.futures.ThreadPoolExecutor | None = None

    def serve(self) -> None:
        while not self.stopped:
            self._admit_compiled()
            idle = not self.engine.has_unfinished()
            self._commands(block=idle and not self.compiling, wait_s=0.005 if idle and self.compiling else 0.0)
            if self.fault is not None:
                raise self.fault
            if self.stopped or not self.engine.has_unfinished():
                continue
            outputs = self.engine.step()
            self._send_due(outputs)

    def _commands(self, block: bool, wait_s: float = 0.0) -> None:
        """Everything queued; when idle, wait for the next command (or the parent's going away)."""
        while self.conn.poll(None if block else wait_s):
            block, wait_s = False, 0.0
            msg = _recv(self.conn)
            kind = msg[0]
            if kind == "add":
                self._add_or_compile(msg[1])
            elif kind == "call":
                _, cid, blob = msg
                self._answer(cid, lambda: pickle.loads(blob)(self.engine))
            elif kind == "abort":
                self.compiling = [(f, a) for f, a in self.compiling if a[0] != msg[1]]
                self.engine.abort(msg[1])
                self._forget(msg[1])
            elif kind == "fault":
                self.fault = msg[1]
                return
            elif kind == "stop":
                self.stopped = True
                return

    def _add_or_compile(self, args: tuple) -> None:
        grammar = getattr(args[2], "grammar", None)
        if grammar is None or grammar in self.engine.grammars:
            self._add(*args)
            return
        if self._compiler is None:
            self._compiler = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="vlora-grammar")
        self.compiling.append((self._compiler.submit(self.engine.grammars.get, grammar), args))

    def _admit_compiled(self) -> None:
        """Admit the requests whose grammar compiled (in arrival order); refuse those whose did not."""
        while self.compiling and self.compiling[0][0].done():
            fut, args = self.compiling.pop(0)
            if fut.exception() is not None:
                _send(self.conn, ("refused", args[0], _picklable(fut.exception())))
            else:
                self._add(*args)

    def _add(self, rid, prompt, sampling, adapter, embeds, optimal, interval) -> None:
        try:
            self.engine.add_request(prompt, sampling, adapter, embeds, rid, **optimal)
        except Exception as exc:  # noqa: BLE001 - refused (bad request, unknown adapter): the caller's error
            _send(self.conn, ("refused", rid, _picklable(exc)))
            return
        self.interval[rid] = interval
        self.due[rid] = 0.0 if math.isfinite(interval) else math.inf

    def _answer(self, cid: int, fn: Callable[[], Any]) -> None:
        try:
            blob = pickle.dumps(("result", cid, True, fn()), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # noqa: BLE001 - handed to the caller
            blob = pickle.dumps(("result", cid, False, _picklable(exc)), protocol=pickle.HIGHEST_PROTOCOL)
        self.conn.send_bytes(blob)

    def _forget(self, rid: str) -> None:
        self.interval.pop(rid, None)
        self.due.pop(rid, None)
        self.buffered.pop(rid, None)

    def _send_due(self, outputs: list[RequestOutput]) -> None:
        """Buffer this step's outputs; send the batches that are due (first, the clock's tick, finished),
        all in one message."""
        for out in outputs:
            self.buffered.setdefault(out.request_id, []).append(out)
        if not self.buffered:
            return
        now = time.monotonic()
        ready = []
        for rid in [r for r, outs in self.buffered.items() if outs[-1].finished or now >= self.due.get(r, 0.0)]:
            outs = self.buffered.pop(rid)
            ready.append(merge_outputs(outs))
            if outs[-1].finished:
                self._forget(rid)
            elif math.isfinite(self.due[rid]) and self.interval[rid] > 0:
                self.due[rid] = next_batch_due(now, self.interval[rid], first=self.due[rid] == 0.0)
        if ready:
            _send(self.conn, ("out", ready))


def _child_main(fd: int) -> None:
    conn = Connection(fd)
    threads = os.environ.get("VLORA_TORCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    try:
        _, config, name, tp = _recv(conn)
        engine = LLMEngine(config, tp=tp)
        engine.name = name
    except BaseException as exc:  # noqa: BLE001 - told to the parent, which raises it
        log.exception("the engine failed to start")
        _send(conn, ("failed", f"{type(exc).__name__}: {exc}"))
        return
    _send(conn, ("ready", {"max_model_len": engine.max_model_len}))
    core = _Core(conn, engine)
    try:
        core.serve()
    except (EOFError, OSError):  # the parent went away: nothing left to serve
        return
    except BaseException as exc:  # noqa: BLE001 - the engine's state is unknown now: stop serving
        log.exception("the engine loop failed; the parent fails its requests and reports unhealthy")
        try:
            _send(conn, ("dead", f"{type(exc).__name__}: {exc}"))
        except (OSError, EOFError):
            pass
        sys.exit(1)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _child_main(int(sys.argv[1]))
