"""Continuous batching: one resident model, many sequences decoding together in ONE step.

Why this shape:
* Batch-1 decode is dispatch-bound (a step costs about the same whether it reads the weights
  for one sequence or for 64), so every running sequence goes into one decode step: the model's
  own `forward(ids [B], pos [B], cache)` with positions as a tensor. Each weight is read once
  per step for all B rows (a small-M matmul), and attention reads each sequence's own cache
  rows (`scaled_dot_product_attention(..., kv_len=pos + 1)`).
* The KV cache is slotted: per layer [max_batch, Hkv, max_context, D]. A sequence owns one
  slot from the moment its prefill finishes until it ends; row b of a decode step is slot b,
  so a step over the first B slots is plain leading-slice indexing (`cache[:B]`).
* One captured step per batch bucket (1, 2, 4, ... max_batch): a bucket covers the highest slot
  in use, idle slots inside it compute a throw-away row (their cache row 0 is rewritten when the
  slot is taken), so steady-state serving replays captures and compiles nothing.
* Prompts are prefilled between decode steps on a scratch Session (the single-sequence path,
  with its captured, bucketed prefill) in chunks of `prefill_chunk` tokens, at most about
  `prefill_budget` tokens per engine iteration, so a long prompt does not stall the running
  sequences for long and a burst of short ones joins in a few iterations; the cache rows are
  then copied into the sequence's slot.
* All GPU work happens on one thread (the engine thread, or the caller of `step()`); other
  threads only submit and cancel, under `self._lock`.
"""
from __future__ import annotations

import asyncio
import contextlib
import heapq
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence

import numpy as np

import tensorgpu as tg
from tensorgpu.kernels import matmul_coop

from ..base import check_cache_fits
from ..session import ContextOverflowError, bucket_length
from .params import ParamError, SamplingParams
from .stops import StopText

__all__ = ["Engine", "Request", "Output", "StepInfo", "SamplingParams", "ParamError", "QueueFullError",
           "ContextOverflowError", "EngineStoppedError"]


class QueueFullError(RuntimeError):
    """max_waiting requests already wait for a slot (the server answers 503)."""


class EngineStoppedError(RuntimeError):
    """The engine was shut down; it takes no more requests."""


@dataclass
class Output:
    """One generated token (token_id set), or the final event (finish_reason set)."""
    token_id: Optional[int]
    text: str = ""
    logprob: Optional[float] = None
    top_logprobs: Optional[list] = None      # [(token_id, logprob), ...] best first
    finish_reason: Optional[str] = None      # "stop" | "length" | "cancelled" | "error"
    error: Optional[str] = None


@dataclass
class StepInfo:
    batch_size: int          # sequences decoded by this step (0: a prefill-only iteration)
    bucket: int              # rows the captured step ran (batch_size <= bucket)
    prefill_tokens: int      # prompt tokens prefilled in this iteration
    seconds: float


# The asyncio events an engine step has to set, by event loop: a step of 64 sequences wakes each
# consumer loop once (one call_soon_threadsafe, one self-pipe write) instead of 64 times.
_WAKEUPS = threading.local()


def _set_all(events) -> None:
    for ev in events:
        ev.set()


def _wake(loop, events) -> None:
    try:
        loop.call_soon_threadsafe(_set_all, events)
    except RuntimeError:     # the consumer's loop is closed: nobody listens any more
        pass


@contextlib.contextmanager
def _batched_wakeups():
    """Within the block (one engine step, on the engine's thread), Request._emit collects its
    consumers' events; they are set at the end, per loop in one callback. Callables passed to
    `after_step` inside the block run once at its end too (engine_process sends a step's
    outputs as one message)."""
    if getattr(_WAKEUPS, "batch", None) is not None:     # nested: the outer block sets them
        yield
        return
    _WAKEUPS.batch, _WAKEUPS.after = {}, set()
    try:
        yield
    finally:
        batch, _WAKEUPS.batch = _WAKEUPS.batch, None
        after, _WAKEUPS.after = _WAKEUPS.after, None
        for loop, events in batch.items():
            _wake(loop, events)
        for fn in after:
            fn()


def after_step(fn: Callable[[], None]) -> bool:
    """Inside an engine step on this thread: run fn once when the step ends (True). Outside one:
    False, and the caller acts now."""
    after = getattr(_WAKEUPS, "after", None)
    if after is None:
        return False
    after.add(fn)       # a bound method hashes by its object and function: once per step
    return True


class Request:
    """A submitted prompt: its outputs arrive as the engine produces them."""

    def __init__(self, rid: str, prompt_ids: list, params: SamplingParams):
        self.id = rid
        self.prompt_ids = prompt_ids
        self.params = params
        self.output_ids: list = []
        self.text = ""
        self.finish_reason: Optional[str] = None
        self.arrival = time.monotonic()
        self.first_token_time: Optional[float] = None
        self._events: list = []
        self._cond = threading.Condition()
        self._waiters: list = []             # (loop, asyncio.Event) of async consumers
        self._cancelled = False
        self._sink: Optional[Callable[[str, "Output"], None]] = None   # engine_process: forwards each output

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        """Stop generating: the sequence is freed at the next engine step and a final
        Output(finish_reason="cancelled") is delivered (unless it already finished)."""
        self._cancelled = True

    def _emit(self, out: Output) -> None:
        with self._cond:
            if self.finish_reason is not None:
                return
            self._events.append(out)
            if out.finish_reason is not None:
                self.finish_reason = out.finish_reason
            self._cond.notify_all()
            waiters = list(self._waiters)
            sink = self._sink
        if sink is not None:
            sink(self.id, out)
        batch = getattr(_WAKEUPS, "batch", None)
        if batch is not None:            # inside an engine step: one wake-up per loop when it ends
            for loop, ev in waiters:
                batch.setdefault(loop, []).append(ev)
            return
        for loop, ev in waiters:
            _wake(loop, (ev,))

    def outputs(self, timeout: Optional[float] = None) -> Iterator[Output]:
        """Blocking iterator over this request's outputs; ends after the final one. timeout:
        seconds to wait for each next output (TimeoutError when exceeded)."""
        i = 0
        while True:
            with self._cond:
                if i >= len(self._events):
                    if not self._cond.wait_for(lambda: i < len(self._events), timeout):
                        raise TimeoutError(f"request {self.id}: no output within {timeout} s")
                batch = self._events[i:]
            i += len(batch)
            for out in batch:
                yield out
                if out.finish_reason is not None:
                    return

    async def aoutput_batches(self):
        """For asyncio consumers: lists of the outputs that arrived since the last one (at least
        one each); ends after the list holding the final output. A consumer that falls behind
        gets several tokens at once and can answer them with one message."""
        loop = asyncio.get_running_loop()
        ev = asyncio.Event()
        with self._cond:
            self._waiters.append((loop, ev))
        try:
            i = 0
            while True:
                with self._cond:
                    batch = self._events[i:]
                    ev.clear()
                if not batch:
                    await ev.wait()
                    continue
                i += len(batch)
                for j, out in enumerate(batch):
                    if out.finish_reason is not None:
                        yield batch[:j + 1]
                        return
                yield batch
        finally:
            with self._cond:
                self._waiters.remove((loop, ev))

    async def aoutputs(self):
        """The same as outputs(), for asyncio consumers."""
        async for batch in self.aoutput_batches():
            for out in batch:
                yield out

    def result(self, timeout: Optional[float] = None) -> "Request":
        """Wait until finished; returns self (text, output_ids, finish_reason are final)."""
        for _ in self.outputs(timeout):
            pass
        return self

    def __repr__(self):
        return (f"Request({self.id}, prompt {len(self.prompt_ids)} tokens, {len(self.output_ids)} generated, "
                f"finish_reason={self.finish_reason})")


class _Seq:
    """Engine-side state of one request that holds (or is about to hold) a slot."""

    def __init__(self, req: Request, slot: int, tokenizer, eos_id: Optional[int]):
        self.req = req
        self.slot = slot
        p = req.params
        self.rng = np.random.default_rng(p.seed)
        self.n_cache = 0                 # tokens whose K/V rows are in the slot
        self.last: Optional[int] = None  # the latest sampled token (not in the cache yet)
        self.prefilled = 0               # prompt tokens run so far
        self.stream = tokenizer.decode_stream() if tokenizer is not None else None
        self.stop = StopText(p.stop)
        self.stop_ids = set(p.stop_token_ids)
        if eos_id is not None and not p.ignore_eos:
            self.stop_ids.add(eos_id)
        self.counts: dict = {}           # output token -> count (frequency/presence penalties)
        self.seen = set(req.prompt_ids) if p.repetition_penalty != 1.0 else set()


@dataclass
class _Inflight:
    """A decode step queued on the GPU whose outputs the host has not read yet."""
    seqs: list
    bucket: int
    mode: str
    n_lp: int
    outs: tuple
    tickets: list


def _next_bucket(n: int, cap: int) -> int:
    b = 1
    while b < n:
        b *= 2
    return min(b, cap)


class Engine:
    def __init__(self, model, max_batch: int = 64, max_context: Optional[int] = None, max_waiting: int = 256,
                 cache_dtype=tg.float16, prefill_chunk: int = 256, prefill_budget: int = 512,
                 exact_batching: bool = False):
        c = model.config
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or not 1 <= max_batch <= 1024:
            raise ValueError(f"max_batch must be an int in [1, 1024], got {max_batch!r}")
        if isinstance(max_waiting, bool) or not isinstance(max_waiting, int) or max_waiting < 0:
            raise ValueError(f"max_waiting must be an int >= 0, got {max_waiting!r}")
        for name, v in (("prefill_chunk", prefill_chunk), ("prefill_budget", prefill_budget)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        L = c.n_ctx if max_context is None else max_context
        if isinstance(L, bool) or not isinstance(L, int) or not 2 <= L <= c.n_ctx:
            raise ValueError(f"max_context must be an int in [2, {c.n_ctx}] (the model's context_length), got {L!r}")
        cache_dtype = tg.dtypes.as_dtype(cache_dtype)
        kv_heads = getattr(c, "n_head_kv", None) or c.n_head
        check_cache_fits(c.n_layer, max_batch * kv_heads, L, c.head_dim, cache_dtype.itemsize,
                         f"max_batch {max_batch} x max_context")
        self.model = model
        self.tokenizer = model.tokenizer
        self.max_batch, self.max_context, self.max_waiting = max_batch, L, max_waiting
        self.prefill_chunk = prefill_chunk      # prompt tokens per prefill forward
        self.prefill_budget = prefill_budget    # prompt tokens per iteration (several prompts when many wait)
        self.vocab_size = c.n_vocab
        # On an adapter with tensor cores a step of >= 16 rows rounds its matmul operands to f16
        # (kernels/matmul_coop.py) while a 1-row step (GEMV) keeps f32, so greedy tokens alone and in
        # a batch agree to f16 rounding. exact_batching keeps the decode steps on the f32 WGSL tiles:
        # slower batches, the same tokens at any batch size. (No effect where there are no tensor cores.)
        self.exact_batching = bool(exact_batching)
        shape = (max_batch, kv_heads, L, c.head_dim)                       # [S, Hkv, L, D] per layer
        self.cache = [(tg.zeros(shape, cache_dtype).contiguous().realize(),
                       tg.zeros(shape, cache_dtype).contiguous().realize()) for _ in range(c.n_layer)]
        self._scratch = model.session(max_context=L, cache_dtype=cache_dtype)   # prefills run here
        # every prompt bucket shape (~20 up to 2048 tokens) stays captured: steady-state serving traces nothing
        self._scratch.captured_forwards = 32
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._waiting: deque = deque()
        self._free: list = list(range(max_batch))                          # a heap: lowest slot first
        self._running: dict = {}                                           # slot -> _Seq
        self._prefill: Optional[_Seq] = None
        self._steps: dict = {}                                             # (bucket, mode, n_lp) -> captured step
        self._inflight: Optional[_Inflight] = None                         # the decode step queued, not read yet
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        self._closed = False
        # called with (request id, Output) for every output of every request submitted from now
        # on, on the thread that produces it (engine_process forwards them to the server process)
        self.output_sink: Optional[Callable[[str, Output], None]] = None
        self.listeners: List[Callable[[StepInfo], None]] = []
        self._stats = {"steps": 0, "prompt_tokens": 0, "generated_tokens": 0, "requests": 0,
                       "finished": 0, "cancelled": 0, "chained_steps": 0}

    # -- submitting -------------------------------------------------------------------

    def submit(self, prompt_ids: Sequence[int], params: Optional[SamplingParams] = None,
               request_id: Optional[str] = None) -> Request:
        """Queue a prompt (token ids). Raises ParamError, ContextOverflowError (prompt + one
        generated token must fit max_context), QueueFullError or EngineStoppedError."""
        params = (params or SamplingParams()).check(self.vocab_size)
        ids = np.asarray(list(prompt_ids) if not isinstance(prompt_ids, np.ndarray) else prompt_ids)
        if ids.ndim != 1 or ids.size == 0:
            raise ParamError("prompt", f"must be a non-empty 1-D sequence of token ids, got shape {ids.shape}")
        if ids.dtype.kind not in "iu":
            raise ParamError("prompt", f"token ids must be integers, got dtype {ids.dtype}")
        bad = (ids < 0) | (ids >= self.vocab_size)
        if bad.any():
            i = int(np.argmax(bad))
            raise ParamError("prompt", f"token id {int(ids[i])} at index {i} is outside the vocabulary [0, {self.vocab_size})")
        if ids.size + 1 > self.max_context:
            raise ContextOverflowError(
                f"the prompt has {ids.size} tokens; with one generated token that is more than the context "
                f"of {self.max_context} tokens")
        req = Request(request_id or f"req-{uuid.uuid4().hex[:16]}", [int(i) for i in ids], params)
        req._sink = self.output_sink
        with self._lock:
            if self._closed:
                raise EngineStoppedError("the engine is shut down")
            if len(self._waiting) >= self.max_waiting:
                raise QueueFullError(f"{len(self._waiting)} requests are waiting (max_waiting={self.max_waiting})")
            self._waiting.append(req)
            self._stats["requests"] += 1
            self._wake.notify_all()
        return req

    def generate(self, prompts: Sequence, params: Optional[SamplingParams] = None) -> List[Request]:
        """Submit every prompt (text or token ids) and run until all are finished. On the
        caller's thread when the engine is not started; otherwise waits for the engine thread."""
        reqs = [self.submit(self._encode(p), params) for p in prompts]
        if self._thread is None:
            while not all(r.finished for r in reqs):
                self.step()
        for r in reqs:
            r.result()
        return reqs

    def _encode(self, prompt) -> list:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ParamError("prompt", "this model has no tokenizer in its GGUF metadata: pass token ids")
            return self.tokenizer.encode(prompt)
        return list(prompt)

    # -- the loop -----------------------------------------------------------------------

    def start(self) -> None:
        """Run the scheduling loop on a background thread (all GPU work happens there)."""
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._loop, name="tensorgpu-engine", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self._waiting and not self._running and self._prefill is None:
                    self._wake.wait(0.5)
                if self._stopping and not self._busy():
                    return
            try:
                self.step()
            except BaseException as e:     # noqa: BLE001 - every request learns why, then the loop goes on
                self._fail_all(f"{type(e).__name__}: {e}")

    def _busy(self) -> bool:
        return bool(self._waiting or self._running or self._prefill is not None or self._inflight is not None)

    def shutdown(self, cancel: bool = True, timeout: float = 30.0) -> None:
        """Stop taking requests; cancel (or, with cancel=False, finish) the in-flight ones; stop
        the engine thread."""
        with self._lock:
            self._closed = True
            if cancel:
                for r in self._waiting:
                    r.cancel()
                for s in list(self._running.values()) + ([self._prefill] if self._prefill else []):
                    s.req.cancel()
            self._stopping = True
            self._wake.notify_all()
        t = self._thread
        if t is not None:
            t.join(timeout)
        elif cancel:
            self.step()

    def stats(self) -> dict:
        with self._lock:
            d = dict(self._stats)
            d.update(running=len(self._running) + (self._prefill is not None), waiting=len(self._waiting),
                     max_batch=self.max_batch, max_context=self.max_context)
        return d

    def step(self) -> bool:
        """One iteration: drop cancelled requests, run one prefill chunk (admitting a waiting
        request when a slot is free), then one decode step of every running sequence.
        Returns whether work remains."""
        t0 = time.perf_counter()
        with _batched_wakeups():
            self._reap_cancelled()
            n_pre = 0
            while n_pre < self.prefill_budget:      # a burst of arrivals joins in a few iterations, not one per step
                n = self._prefill_some()
                if n == 0:
                    break
                n_pre += n
            n_dec, bucket = self._decode()
        if n_pre or n_dec:
            info = StepInfo(n_dec, bucket, n_pre, time.perf_counter() - t0)
            for fn in list(self.listeners):
                fn(info)
        with self._lock:
            return self._busy()

    # -- cancellation -----------------------------------------------------------------------

    def _reap_cancelled(self) -> None:
        with self._lock:
            gone = [r for r in self._waiting if r._cancelled]
            for r in gone:
                self._waiting.remove(r)
            seqs = [s for s in self._running.values() if s.req._cancelled]
            if self._prefill is not None and self._prefill.req._cancelled:
                seqs.append(self._prefill)
        for r in gone:
            self._stats["cancelled"] += 1
            r._emit(Output(None, finish_reason="cancelled"))
        for s in seqs:
            self._finish(s, "cancelled")

    def _fail_all(self, msg: str) -> None:
        self._inflight = None
        with self._lock:
            seqs = list(self._running.values()) + ([self._prefill] if self._prefill else [])
            waiting = list(self._waiting) if self._closed else []
            for r in waiting:
                self._waiting.remove(r)
        for s in seqs:
            self._finish(s, "error", msg)
        for r in waiting:
            r._emit(Output(None, finish_reason="error", error=msg))

    def _finish(self, s: _Seq, reason: str, error: Optional[str] = None) -> None:
        text = ""
        if reason != "cancelled":       # release what was held back (a partial stop string, a split character)
            if s.stream is not None and not s.stop.stopped:
                text = s.stop.add(s.stream.flush())
            text += s.stop.finish()
        s.req.text = s.stop.shown
        with self._lock:
            if self._running.get(s.slot) is s:
                del self._running[s.slot]
            if self._prefill is s:
                self._prefill = None
            heapq.heappush(self._free, s.slot)
            self._stats["cancelled" if reason == "cancelled" else "finished"] += 1
        s.req._emit(Output(None, text=text, finish_reason=reason, error=error))

    # -- prefill ------------------------------------------------------------------------------

    def _prefill_some(self) -> int:
        with self._lock:
            s = self._prefill
            if s is None and self._waiting and self._free:
                req = self._waiting.popleft()
                s = self._prefill = _Seq(req, heapq.heappop(self._free), self.tokenizer,
                                         self.tokenizer.eos_id if self.tokenizer is not None else None)
        if s is None:
            return 0
        sess = self._scratch
        if s.prefilled == 0:
            sess.reset()
        ids = s.req.prompt_ids
        chunk = ids[s.prefilled:s.prefilled + self.prefill_chunk]
        logits = sess.forward(chunk, last_only=True)                       # [1, V]
        s.prefilled += len(chunk)
        self._stats["prompt_tokens"] += len(chunk)
        if s.prefilled < len(ids):
            return len(chunk)
        # the prompt's K/V rows go into the sequence's slot (a bucketed length: few copy kernels)
        n = len(ids)
        rows = min(bucket_length(n), self.max_context)
        for (kb, vb), (ks, vs) in zip(self.cache, sess.cache):
            kb[s.slot, :, :rows] = ks[:, :rows]
            vb[s.slot, :, :rows] = vs[:, :rows]
        s.n_cache = n
        with self._lock:
            self._prefill = None
            self._running[s.slot] = s
        if s.req.params.penalized:
            self._reset_penalty_rows(s)
        self._accept(s, *self._sample_first(logits, s))
        return len(chunk)

    # -- decode -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _step_planning(self):
        """Where a decode step is traced and run: with exact_batching, matmul_coop's switch is off
        for it. The switch is process-wide, so it flips under runtime.LOCK, which every planner
        holds: no other thread plans a kernel while it is off or half restored."""
        if not self.exact_batching:
            yield
            return
        with tg.runtime.LOCK, tg.debug.tuning(matmul_coop.TUNING, enabled=False):
            yield

    def _step_fn(self, bucket: int, mode: str, n_logprobs: int):
        """The captured decode step of `bucket` rows. mode "argmax": every running sequence is
        greedy without penalties or logprobs, the step returns the chosen ids int32 [bucket]
        (4 bytes per row come back); "sample": per-row sampling on the GPU (tg.nn.sample_rows,
        parameters as per-row inputs); "penalized": the same after repetition/frequency/presence
        penalties applied to the logits as plain tensor ops over per-slot count tables."""
        key = (bucket, mode, n_logprobs)
        fn = self._steps.get(key)
        if fn is None:
            model, cache = self.model, self.cache
            tables = self._penalty_tables() if mode == "penalized" else None

            def step(ids, pos, temp, top_k, top_p, min_p, u, rep, freq, pres):
                logits = model.forward(ids, pos, cache)                    # [bucket, V]
                if mode == "argmax":
                    return (logits.argmax(-1).astype(tg.int32),)
                counts = None
                if tables is not None:
                    seen, counts = tables[0][:bucket], tables[1][:bucket]
                    logits = _penalize(logits, seen, counts, rep, freq, pres)
                r = tg.nn.sample_rows(logits, temp, top_k, top_p, min_p, u, n_logprobs=n_logprobs, counts=counts)
                return tuple(t for t in r if t is not None)
            fn = self._steps[key] = tg.capture(step)
        return fn

    def _penalty_tables(self):
        """int32 [max_batch, V] per slot: prompt presence (repetition penalty) and output counts
        (frequency/presence penalties; bumped by the sampler in the step). Made on first use."""
        if getattr(self, "_tables", None) is None:
            shape = (self.max_batch, self.vocab_size)
            self._tables = (tg.zeros(shape, tg.int32).contiguous().realize(),
                            tg.zeros(shape, tg.int32).contiguous().realize())
        return self._tables

    def _reset_penalty_rows(self, s: _Seq) -> None:
        seen, counts = self._penalty_tables()
        row = np.zeros(self.vocab_size, np.int32)
        row[np.asarray(s.req.prompt_ids)] = 1
        seen[s.slot] = tg.tensor(row)
        counts[s.slot] = tg.tensor(np.zeros(self.vocab_size, np.int32))

    def _row_params(self, seqs: list, rows: int, index) -> tuple:
        """The per-row sampling inputs (idle rows: greedy, no penalty)."""
        temp, top_p, min_p, u = (np.zeros(rows, np.float32), np.ones(rows, np.float32),
                                 np.zeros(rows, np.float32), np.zeros(rows, np.float32))
        top_k = np.zeros(rows, np.int32)
        rep, freq, pres = np.ones(rows, np.float32), np.zeros(rows, np.float32), np.zeros(rows, np.float32)
        for s in seqs:
            i, p = index(s), s.req.params
            temp[i] = 0.0 if p.greedy else p.temperature
            top_k[i], top_p[i], min_p[i] = p.top_k, p.top_p, p.min_p
            u[i] = 0.0 if p.greedy else s.rng.random()
            rep[i], freq[i], pres[i] = p.repetition_penalty, p.frequency_penalty, p.presence_penalty
        return temp, top_k, top_p, min_p, u, rep, freq, pres

    def _sample_first(self, logits: tg.Tensor, s: _Seq) -> tuple:
        """The first token of a sequence, from its prompt's last logits [1, V] (not captured: a
        prefill is followed by one of these)."""
        p = s.req.params
        rp = [tg.tensor(a) for a in self._row_params([s], 1, lambda _: 0)]
        if p.penalized:
            seen, counts = self._penalty_tables()
            logits = _penalize(logits, seen[s.slot:s.slot + 1], counts[s.slot:s.slot + 1], *rp[5:])
        r = tg.nn.sample_rows(logits, *rp[:5], n_logprobs=p.logprobs or 0)
        tops = (r.top_ids.numpy(), r.top_logprobs.numpy()) if r.top_ids is not None else (None, None)
        picks = _picks(r.tokens.numpy(), r.logprobs.numpy(), *tops, [s], lambda _: 0)
        if p.penalized:
            self._penalty_tables()[1][s.slot, picks[0][0]] = tg.tensor(np.ones((), np.int32))
        return picks[0]

    def _decode(self) -> tuple:
        """Queue this iteration's decode step, then read the previous one (one step in flight:
        the GPU runs step N+1 while the host delivers step N's tokens). While no sequence joins
        or leaves, step N+1 takes its input ids straight from step N's output on the GPU; a
        join, a finish or a step that could be a sequence's last reads step N first."""
        inf = self._inflight
        with self._lock:
            running = sorted(self._running.values(), key=lambda s: s.slot)
        running = [s for s in running if s.last is not None or (inf is not None and s in inf.seqs)]
        done = (0, 0)
        if inf is not None:
            if self._can_chain(inf, running):
                nxt = self._queue_step(running, inf)
                self._stats["chained_steps"] += 1
                done = self._read(inf)
                self._inflight = nxt
                return done
            done = self._read(inf)
            self._inflight = None
            with self._lock:
                running = sorted(self._running.values(), key=lambda s: s.slot)
        running = [s for s in running if s.last is not None]
        if running:
            self._inflight = self._queue_step(running, None)
        return done

    def _mode(self, seqs: list) -> tuple:
        ps = [s.req.params for s in seqs]
        n_lp = max((p.logprobs or 0) for p in ps)
        if any(p.penalized for p in ps):
            mode = "penalized"
        elif all(p.greedy and p.logprobs is None for p in ps):
            return "argmax", 0
        else:
            mode = "sample"
        return mode, (20 if n_lp else 0)     # one variant with the top 20, sliced per request

    def _can_chain(self, inf: "_Inflight", running: list) -> bool:
        """Step N+1 may be queued before step N is read: the same sequences, none of which can
        end by length in step N (so step N+1 writes inside every context)."""
        if [s.slot for s in running] != [s.slot for s in inf.seqs] or any(a is not b for a, b in zip(running, inf.seqs)):
            return False
        if self._mode(running) != (inf.mode, inf.n_lp):
            return False
        L = self.max_context
        return all(len(s.req.output_ids) + 2 < s.req.params.max_tokens and s.n_cache + 1 < L
                   and len(s.req.prompt_ids) + len(s.req.output_ids) + 2 < L for s in running)

    def _queue_step(self, seqs: list, prev: Optional["_Inflight"]) -> "_Inflight":
        bucket = _next_bucket(seqs[-1].slot + 1, self.max_batch)
        if prev is not None:
            ids = prev.outs[0]                       # step N's chosen ids, still on the GPU
        else:
            ids = np.zeros(bucket, np.int32)
            for s in seqs:
                ids[s.slot] = s.last
        pos = np.zeros(bucket, np.int32)
        for s in seqs:
            pos[s.slot] = s.n_cache
            s.n_cache += 1
        mode, n_lp = self._mode(seqs)
        with self._step_planning():
            outs = self._step_fn(bucket, mode, n_lp)(ids, pos, *self._row_params(seqs, bucket, lambda s: s.slot))
        tickets = [o.read_async() for o in outs]     # the capture's outputs are rewritten by the next replay
        tg.flush()
        self._stats["steps"] += 1
        return _Inflight(list(seqs), bucket, mode, n_lp, outs, tickets)

    def _read(self, inf: "_Inflight") -> tuple:
        vals = [t.numpy() for t in inf.tickets]
        live = [s for s in inf.seqs if not s.req.finished]
        if inf.mode == "argmax":
            picks = [(int(vals[0][s.slot]), None, None) for s in live]
        else:
            tops = (vals[2], vals[3]) if inf.n_lp else (None, None)
            picks = _picks(vals[0], vals[1], *tops, live, lambda s: s.slot)
        for s, pick in zip(live, picks):
            self._accept(s, *pick)
        return len(inf.seqs), inf.bucket

    def _accept(self, s: _Seq, tok: int, logprob, top) -> None:
        """Deliver a sampled token and decide whether the sequence ends here."""
        req, p = s.req, s.req.params
        if tok < 0:      # the sampler's answer to a row of only NaN logits
            self._finish(s, "error", f"the model's logits are all NaN at position {s.n_cache}: no token can be chosen")
            return
        if req.first_token_time is None:
            req.first_token_time = time.monotonic()
        req.output_ids.append(tok)
        self._stats["generated_tokens"] += 1
        s.last = tok
        s.counts[tok] = s.counts.get(tok, 0) + 1
        if s.seen is not None and p.repetition_penalty != 1.0:
            s.seen.add(tok)
        reason = None
        if tok in s.stop_ids:
            text, reason = "", "stop"
        else:
            text = s.stop.add(s.stream.step(tok)) if s.stream is not None else ""
            if s.stop.stopped:
                reason = "stop"
            elif len(req.output_ids) >= p.max_tokens or len(req.prompt_ids) + len(req.output_ids) >= self.max_context:
                reason = "length"
        req.text = s.stop.shown
        req._emit(Output(tok, text, logprob, top))
        if reason is not None:
            self._finish(s, reason)


def _penalize(logits: tg.Tensor, seen: tg.Tensor, counts: tg.Tensor, rep: tg.Tensor, freq: tg.Tensor,
              pres: tg.Tensor) -> tg.Tensor:
    """Repetition (HF: over prompt and output tokens, l/r or l*r when negative), frequency and
    presence penalties (OpenAI: l - f*count - p*[count > 0], over output tokens) on logits
    [B, V], as plain tensor ops (one fused elementwise kernel). seen, counts: int32 [B, V];
    rep, freq, pres: float32 [B] (1, 0, 0 leave a row unchanged, exactly)."""
    out = counts != 0
    hit = (seen != 0) | out
    r = rep[:, None]
    l = tg.where(hit, tg.where(logits < 0, logits * r, logits / r), logits)
    return l - freq[:, None] * counts.astype(tg.float32) - pres[:, None] * out.astype(tg.float32)


def _picks(tokens: np.ndarray, logprobs: np.ndarray, top_ids: Optional[np.ndarray], top_lps: Optional[np.ndarray],
           seqs: list, index) -> list:
    """(token, logprob, top_logprobs) per sequence from a sampler's outputs read back (row index(s))."""
    res = []
    for s in seqs:
        i, k = index(s), s.req.params.logprobs
        tok = int(tokens[i])
        if k is None:
            res.append((tok, None, None))
            continue
        top = [(int(t), float(v)) for t, v in zip(top_ids[i, :k], top_lps[i, :k])] if k else None
        res.append((tok, float(logprobs[i, 0]), top))
    return res
