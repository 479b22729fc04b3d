"""The batching Engine in a child process, behind the Engine's interface: what the HTTP app,
its metrics and the CLI use (`tokenizer`, `model.config.n_vocab`, `max_context`, `submit`,
`stats`, `start`, `shutdown`, `listeners`), with Requests whose outputs arrive as they do from
an Engine in the same process.

Why: in one process the engine thread and the HTTP thread share one GIL. Every wgpu call of
the engine thread releases it, and taking it back from a busy HTTP thread can take up to
Python's switch interval (5 ms). On the H200 one stream through the server decoded 390 tok/s,
575 with a 0.5 ms interval, against ~800 for the same model's Session (RESULTS.md, eighth
session). With the engine in its own process, as vLLM's engine core, neither waits for the
other; the server process keeps the tokenizer (prompts, chat templates, logprob strings) and
HTTP, the child keeps the model, the GPU and the per-token detokenizing and stop strings.

Protocol: one multiprocessing Pipe of pickled tuples.
    server -> child   ("submit", call, rid, ids, params)  ("cancel", rid)  ("stats", call)
                      ("shutdown", call, cancel, timeout)
    child -> server   ("ready", info) | ("failed", message)    once, after the model loads
                      ("reply", call, ok, value)   value: a result, or (error class name, args)
                      ("out", [(rid, Output fields...)], [StepInfo fields])
                                                     an engine step's outputs, as one message
A child that dies ends every open request with finish_reason "error"."""
from __future__ import annotations

import itertools
import multiprocessing as mp
import threading
import time
import traceback
from dataclasses import astuple
from typing import Callable, List, Optional, Sequence

from .engine import (ContextOverflowError, EngineStoppedError, Output, ParamError, QueueFullError, Request,
                     SamplingParams, StepInfo, _batched_wakeups, after_step)

# errors submit may raise, rebuilt by name on the server side (exceptions with their own
# __init__ arguments do not survive pickling as they are)
_ERRORS = {c.__name__: c for c in (ContextOverflowError, EngineStoppedError, QueueFullError)}


def _error_value(e: BaseException) -> tuple:
    if isinstance(e, ParamError):
        return ("ParamError", e.param, str(e).split(": ", 1)[-1])
    return (type(e).__name__, str(e))


def _raise(value: tuple):
    name, *args = value
    if name == "ParamError":
        raise ParamError(*args)
    raise _ERRORS.get(name, RuntimeError)(*args)


class EngineProcessError(RuntimeError):
    """The engine process failed to start, or died."""


class _Config:
    """What the server reads of the model: its vocabulary size."""

    def __init__(self, n_vocab: int):
        self.n_vocab = n_vocab


class _Model:
    def __init__(self, n_vocab: int):
        self.config = _Config(n_vocab)


class _RemoteRequest(Request):
    """A Request whose engine is in the child: cancel() also tells the child."""

    def __init__(self, rid: str, prompt_ids: list, params: SamplingParams, owner: "EngineProcess"):
        super().__init__(rid, prompt_ids, params)
        self._owner = owner

    def cancel(self) -> None:
        first = not self._cancelled
        super().cancel()
        if first and not self.finished:
            self._owner._send_quiet(("cancel", self.id))


class EngineProcess:
    """Start the engine for the GGUF at `path` in a child process (spawned: no GPU state is
    inherited) and wait until its model is loaded (EngineProcessError if it fails, with the
    child's message). Arguments as cli.engine_factory's / Engine's."""

    def __init__(self, path: str, max_batch: int = 64, ctx: Optional[int] = None, max_waiting: int = 256,
                 exact_batching: bool = False, ready_timeout: float = 900.0):
        from ..tokenizer import read_gguf_metadata, tokenizer_from_gguf_metadata
        try:
            md = read_gguf_metadata(path)   # metadata only: the server process never touches the GPU
        except Exception as e:  # noqa: BLE001 - gguf raises ValueError, OSError, struct errors ...
            raise EngineProcessError(f"{path}: cannot read the GGUF metadata: {type(e).__name__}: {e}") from e
        self.tokenizer = tokenizer_from_gguf_metadata(md) if "tokenizer.ggml.model" in md else None
        self.listeners: List[Callable[[StepInfo], None]] = []
        self._requests: dict = {}             # rid -> _RemoteRequest, until its final output
        self._calls: dict = {}                # call id -> [threading.Event, ok, value]
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._dead: Optional[str] = None
        self._closed = False
        ctx_mp = mp.get_context("spawn")
        self._conn, child = ctx_mp.Pipe()
        self._proc = ctx_mp.Process(target=_child_main, name="tensorgpu-engine",
                                    args=(child, str(path), max_batch, ctx, max_waiting, exact_batching), daemon=True)
        self._proc.start()
        child.close()
        if not self._conn.poll(ready_timeout):
            self._kill()
            raise EngineProcessError(f"the engine process did not load {path} within {ready_timeout:.0f} s")
        try:
            msg = self._conn.recv()
        except EOFError:
            self._proc.join(5)
            raise EngineProcessError(f"the engine process exited with code {self._proc.exitcode} while loading "
                                     f"{path}") from None
        if msg[0] != "ready":
            self._proc.join(30)
            raise EngineProcessError(msg[1])
        info = msg[1]
        self.max_context, self.max_batch, self.max_waiting = info["max_context"], info["max_batch"], info["max_waiting"]
        self.vocab_size = info["vocab_size"]
        self.model = _Model(info["n_vocab"])
        self.pid = self._proc.pid
        self._reader = threading.Thread(target=self._read_loop, name="tensorgpu-engine-reader", daemon=True)
        self._reader.start()

    # -- the Engine interface ----------------------------------------------------------------

    def start(self) -> None:
        """The child's engine thread runs from the moment it is ready."""

    def submit(self, prompt_ids: Sequence[int], params: Optional[SamplingParams] = None,
               request_id: Optional[str] = None) -> Request:
        """As Engine.submit: the child checks and queues the prompt, and its errors (ParamError,
        ContextOverflowError, QueueFullError, EngineStoppedError) are raised here."""
        import uuid
        params = params or SamplingParams()
        rid = request_id or f"req-{uuid.uuid4().hex[:16]}"
        ids = [int(i) for i in prompt_ids] if not hasattr(prompt_ids, "tolist") else prompt_ids.tolist()
        req = _RemoteRequest(rid, ids, params, self)
        with self._lock:
            if self._dead is not None or self._closed:
                raise EngineStoppedError(self._dead or "the engine is shut down")
            self._requests[rid] = req        # before the child can answer with outputs
        try:
            self._call("submit", rid, ids, params)
        except BaseException:
            with self._lock:
                self._requests.pop(rid, None)
            raise
        return req

    def stats(self) -> dict:
        return self._call("stats")

    def shutdown(self, cancel: bool = True, timeout: float = 30.0) -> None:
        """Stop taking requests; cancel (or finish) the in-flight ones; stop the child."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._dead is None:
            try:
                self._call("shutdown", cancel, timeout, timeout=timeout + 30)
            except (EngineProcessError, EngineStoppedError):
                pass
        self._proc.join(timeout + 30)
        if self._proc.is_alive():
            self._kill()
        self._reader.join(5)

    # -- plumbing -----------------------------------------------------------------------------

    def _send(self, msg: tuple) -> None:
        with self._send_lock:
            self._conn.send(msg)

    def _send_quiet(self, msg: tuple) -> None:
        try:
            self._send(msg)
        except (OSError, ValueError):      # the child is gone: its requests end through _fail_all
            pass

    def _call(self, kind: str, *args, timeout: float = 120.0):
        cid = next(self._ids)
        slot = [threading.Event(), None, None]
        with self._lock:
            if self._dead is not None:
                raise EngineStoppedError(self._dead)
            self._calls[cid] = slot
        try:
            self._send((kind, cid, *args))
        except (OSError, ValueError) as e:
            with self._lock:
                self._calls.pop(cid, None)
            raise EngineStoppedError(f"the engine process is gone ({e})") from None
        if not slot[0].wait(timeout):
            with self._lock:
                self._calls.pop(cid, None)
            raise EngineProcessError(f"the engine process did not answer {kind!r} within {timeout:.0f} s")
        if slot[1] is None:
            raise EngineStoppedError(slot[2])
        if not slot[1]:
            _raise(slot[2])
        return slot[2]

    def _read_loop(self) -> None:
        while True:
            try:
                msg = self._conn.recv()
            except (EOFError, OSError):
                break
            kind = msg[0]
            if kind == "out":
                self._deliver(msg[1], msg[2])
            elif kind == "reply":
                with self._lock:
                    slot = self._calls.pop(msg[1], None)
                if slot is not None:
                    slot[1], slot[2] = msg[2], msg[3]
                    slot[0].set()
        self._proc.join(1)
        code = self._proc.exitcode
        self._fail_all("the engine process exited" + (f" with code {code}" if code not in (None, 0) else ""))

    def _deliver(self, outs: list, steps: list) -> None:
        with _batched_wakeups():           # one wake-up per event loop for the whole message
            for rid, *fields in outs:
                with self._lock:
                    req = self._requests.get(rid)
                    if req is not None and fields[4] is not None:      # the final output
                        del self._requests[rid]
                if req is not None:
                    out = Output(*fields)
                    if out.token_id is not None:     # what the engine's _accept records on its side
                        if req.first_token_time is None:
                            req.first_token_time = time.monotonic()
                        req.output_ids.append(out.token_id)
                    req.text += out.text
                    req._emit(out)
        for st in steps:
            info = StepInfo(*st)
            for fn in list(self.listeners):
                fn(info)

    def _fail_all(self, why: str) -> None:
        with self._lock:
            self._dead = self._dead or why
            reqs, self._requests = list(self._requests.values()), {}
            calls, self._calls = list(self._calls.values()), {}
        for slot in calls:
            slot[1], slot[2] = None, why
            slot[0].set()
        for r in reqs:
            r._emit(Output(None, finish_reason="error", error=why))

    def _kill(self) -> None:
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(10)


class _Pump:
    """Child side: collects the engine's outputs and step records and sends each step's as one
    message (at the step's end; outputs produced outside a step go at once)."""

    def __init__(self, conn, send_lock: threading.Lock, done: Callable[[str], None]):
        self._conn, self._send_lock, self._done = conn, send_lock, done
        self._lock = threading.Lock()
        self._outs: list = []
        self._steps: list = []

    def put(self, rid: str, out: Output) -> None:
        with self._lock:
            self._outs.append((rid, out.token_id, out.text, out.logprob, out.top_logprobs, out.finish_reason,
                               out.error))
        if out.finish_reason is not None:
            self._done(rid)
        if not after_step(self.flush):
            self.flush()

    def on_step(self, info: StepInfo) -> None:
        with self._lock:
            self._steps.append(astuple(info))
        self.flush()

    def flush(self) -> None:
        with self._lock:
            outs, steps, self._outs, self._steps = self._outs, self._steps, [], []
        if outs or steps:
            with self._send_lock:
                self._conn.send(("out", outs, steps))


def _child_main(conn, path: str, max_batch: int, ctx: Optional[int], max_waiting: int, exact_batching: bool) -> None:
    """The engine process: load, report ready, then serve the server's calls until shutdown or
    until the server's end of the pipe closes (the server died: cancel everything and exit)."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # Ctrl-C reaches the whole group: the server decides
    try:
        from .cli import engine_factory
        engine = engine_factory(path, max_batch, ctx, max_waiting, exact_batching)()
    except BaseException as e:  # noqa: BLE001 - the server reports it (/health 503 with the reason)
        traceback.print_exc()
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        return
    send_lock = threading.Lock()
    live: dict = {}
    pump = _Pump(conn, send_lock, lambda rid: live.pop(rid, None))
    engine.output_sink = pump.put
    engine.listeners.append(pump.on_step)
    engine.start()

    def reply(cid, ok, value):
        with send_lock:
            conn.send(("reply", cid, ok, value))

    with send_lock:
        conn.send(("ready", {"max_context": engine.max_context, "max_batch": engine.max_batch,
                             "max_waiting": engine.max_waiting, "vocab_size": engine.vocab_size,
                             "n_vocab": engine.model.config.n_vocab}))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            engine.shutdown(cancel=True, timeout=10.0)
            return
        kind = msg[0]
        if kind == "submit":
            _, cid, rid, ids, params = msg
            try:
                r = live[rid] = engine.submit(ids, params, request_id=rid)
            except BaseException as e:  # noqa: BLE001 - raised again in the server process
                reply(cid, False, _error_value(e))
            else:
                if r.finished:           # it ended before it was recorded: the pump could not drop it
                    live.pop(rid, None)
                reply(cid, True, None)
        elif kind == "cancel":
            r = live.get(msg[1])
            if r is not None:
                r.cancel()
        elif kind == "stats":
            reply(msg[1], True, engine.stats())
        elif kind == "shutdown":
            _, cid, cancel, timeout = msg
            t = time.perf_counter()
            engine.shutdown(cancel=cancel, timeout=timeout)
            pump.flush()
            reply(cid, True, time.perf_counter() - t)
            return
