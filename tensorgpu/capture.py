"""Capture: trace a function once, then replay its kernel list with new inputs.

The first call with a given input signature runs the function normally while recording every
dispatch (pipeline + cached bind group + grid). Later calls skip graph building, fusion and
codegen entirely: new inputs are written into the traced input buffers (host data with one
`write_buffer`, device tensors with one small copy kernel) and the recorded dispatches are
queued again. Python ints are step variables: fn sees them as `SymInt`s (symbolic.py), and
every offset, slice bound or scalar computed from them is a kernel parameter re-evaluated per
replay, so one capture serves every decode position. Python floats become float32 [1]
tensors. Returned tensors alias the capture's output buffers: their
values are those of the latest call (like CUDA graphs' static outputs).
"""
from __future__ import annotations

import functools
import numbers
from typing import Any, Callable, Optional

import numpy as np

from . import dtypes as dt
from . import params, runtime, symbolic
from .runtime import STATS
from .symbolic import Var

# Traces kept per input signature when an int argument was used in a way a kernel parameter
# cannot follow (a product of two step variables, a hand-written kernel's baked offset): each
# value then has its own trace.
MAX_SPECIALIZED = 8
from .tensor import Tensor


def _copy_kernel(n_words: int) -> str:
    return (
        "@group(0) @binding(0) var<storage, read> src: array<u32>;\n"
        "@group(0) @binding(1) var<storage, read_write> dst: array<u32>;\n"
        "@compute @workgroup_size(64)\n"
        "fn main(@builtin(global_invocation_id) g: vec3<u32>) {\n"
        f"  if (g.x < {n_words}u) {{ dst[g.x] = src[g.x]; }}\n}}\n")


class _Slot:
    """One traced input: where a new value is written before a replay."""

    def __init__(self, kind: str, tensor: Tensor):
        self.kind = kind              # "tensor" | "array" | "scalar"
        self.tensor = tensor

    def load(self, value) -> None:
        buf = self.tensor.node.buffer
        if self.kind == "tensor":
            value.realize()
            v = value.view
            if not (v.is_contiguous and v.offset == 0 and value.node.buffer is not None):
                value = value.contiguous().realize()
            src = value.node.buffer
            if src is buf:
                return
            n_words = (self.tensor.dtype.nbytes(self.tensor.size) + 3) // 4
            runtime.dispatch("capture_input_copy", _copy_kernel(n_words), [(src, "read"), (buf, "rw")],
                             runtime.grid_for(-(-n_words // 64)))
        else:
            host = np.asarray(value, dtype=self.tensor.dtype.np_dtype).reshape(-1)
            if self.tensor.dtype is dt.bool_:
                host = host.astype(np.uint32)
            runtime.write(buf, host.view(np.uint8))


def _signature(args) -> tuple:
    sig = []
    for a in args:
        if isinstance(a, Tensor):
            sig.append(("tensor", a.shape, a.dtype.name))
        elif isinstance(a, np.ndarray):
            sig.append(("array", a.shape, str(a.dtype)))
        elif isinstance(a, (bool, np.bool_)):
            sig.append(("const", bool(a)))
        elif isinstance(a, numbers.Integral):
            sig.append(("var", "int"))
        elif isinstance(a, numbers.Real):
            sig.append(("scalar", "float"))
        else:
            sig.append(("const", a))  # hashable Python values select a separate trace
    return tuple(sig)


class _Trace:
    def __init__(self, slots, dispatches, outputs, arena, block=None, guards=(), specialized=()):
        self.slots, self.dispatches, self.outputs, self.arena = slots, dispatches, outputs, arena
        self.ids = frozenset(id(b) for d in dispatches for b in d.buffers)
        self.writes = frozenset(i for d in dispatches for i in d.writes)
        self.block = block if block is not None and block.programs else None   # params.ParamBlock
        self.param_ids = frozenset(id(b) for b in block.bindings) if self.block is not None else frozenset()
        self.guards = guards            # (SymInt, lo, hi, what): bounds every replay re-checks
        self.specialized = specialized  # indices of int arguments this trace was specialized to

    def __del__(self):
        try:
            runtime.run_or_defer(self.arena.release)   # the pool is shared state: under LOCK, never waiting
        except Exception:  # interpreter shutdown
            pass


class _Recorded:
    """A traced dispatch that does not keep its buffers' tensors alive (weak references), so
    intermediates die during the trace and their buffers are reused by later kernels."""

    __slots__ = ("pipe", "grid", "bind_group", "refs", "writes")

    def __init__(self, d: runtime.Dispatch):
        import weakref
        self.pipe, self.grid, self.bind_group = d.pipe, d.grid, d.bind_group
        self.refs = tuple(weakref.ref(b) for b in d.buffers)
        self.writes = frozenset(d.writes)

    def replayable(self) -> runtime.Dispatch:
        """The replay form: strong references only to the buffers still alive after the trace
        (inputs, outputs, weights, caches: what host writes and readbacks are ordered against)."""
        alive = tuple(b for b in (r() for r in self.refs) if b is not None)
        return runtime.Dispatch(self.pipe, alive, self.grid, self.bind_group,
                                tuple(id(b) for b in alive if id(b) in self.writes))


class Captured:
    """The callable `tg.capture(fn)` returns."""

    def __init__(self, fn: Callable, submit_every: Optional[int] = None):
        self.fn = fn
        self.submit_every = submit_every
        self.traces: dict = {}
        functools.update_wrapper(self, fn)

    def __call__(self, *args):
        # one lock hold per call: a trace installs the runtime's global recorder and arena, so
        # no other thread's kernels or buffers may land in it; a replay is queued as one unit
        with runtime.LOCK:
            return self._call(*args)

    def _call(self, *args):
        sig = _signature(args)
        entry = self.traces.get(sig)
        key = None
        if entry is not None:
            spec, by_value = entry
            key = tuple(int(args[i]) for i in spec)
            tr = by_value.get(key)
        if entry is None or tr is None:
            tr = self._trace(args)
            if entry is None:
                entry = self.traces[sig] = (tr.specialized, {})
            key = tuple(int(args[i]) for i in entry[0])
            by_value = entry[1]
            by_value[key] = tr
            while len(by_value) > MAX_SPECIALIZED:     # values a non-affine use specialized on
                del by_value[next(iter(by_value))]
            STATS["captures_traced"] += 1
            return tr.outputs
        values = {}
        for slot, a in zip(tr.slots, args):
            if slot is not None and slot.kind == "var":
                values[slot.var] = int(a)
        for expr, lo, hi, what in tr.guards:
            x = expr.evaluate(values)
            if not lo <= x <= hi:
                raise IndexError(f"tg.capture replay: {what}: {x} is outside [{lo}, {hi}] "
                                 f"(step variables {', '.join(f'{v.name}={n}' for v, n in values.items())})")
        from .schedule import pending_writes, realize
        for w in pending_writes():      # lazy writes issued before this call: the replay reads after them
            realize(w)
        if tr.block is not None:
            if not runtime._pending_ids.isdisjoint(tr.param_ids):
                runtime.flush()     # the last replay's kernels read the old values: submit them first
            tr.block.update(values)
        for slot, a in zip(tr.slots, args):
            if slot is not None and slot.kind != "var":
                slot.load(a)
        k = self.submit_every
        if k and len(tr.dispatches) > k:
            # a long list (a prefill): submit as it goes, so the GPU starts on the first
            # kernels while the host still encodes the rest
            for i in range(0, len(tr.dispatches), k):
                runtime.replay(tr.dispatches[i:i + k], tr.ids, tr.writes)
                runtime.flush()
        else:
            runtime.replay(tr.dispatches, tr.ids, tr.writes)
        STATS["captures_replayed"] += 1
        return tr.outputs

    def _trace(self, args):
        import weakref
        arena = runtime.Arena()
        runtime._arenas.append(arena)
        saved_bound = runtime._bound_in_trace[0]
        runtime._bound_in_trace[0] = weakref.WeakSet()
        block = params.ParamBlock(runtime.get_device().device)
        params._blocks.append(block)
        guards: list = []
        saved_guards = symbolic.set_guards(guards)
        from .schedule import pending_writes, realize
        for w in pending_writes():      # writes issued before the trace are not part of it
            with runtime.untraced():
                realize(w)
        try:
            slots, call_args = self._slots(args)
            recorded: list = []
            record = lambda d: recorded.append(_Recorded(d))   # noqa: E731
            runtime._recorders.append(record)
            runtime._tracing[0] += 1
            try:
                out = self.fn(*call_args)
                for t in _tensors_in(out):
                    t.realize()
                for w in pending_writes():   # in-place writes fn made that nothing read yet
                    realize(w)
            finally:
                runtime._tracing[0] -= 1
                runtime._recorders.remove(record)
            runtime.flush()      # the trace's intermediates die with their last pending use
        except BaseException:
            runtime._arenas.remove(arena)
            runtime._bound_in_trace[0] = saved_bound
            params._blocks.remove(block)
            symbolic.set_guards(saved_guards)
            arena.release()
            raise
        runtime._arenas.remove(arena)
        runtime._bound_in_trace[0] = saved_bound
        params._blocks.remove(block)
        symbolic.set_guards(saved_guards)
        arena.close()
        specialized = tuple(i for i, s in enumerate(slots) if s is not None and s.kind == "var" and s.var.specialized)
        unique = {}
        for g in guards:      # every layer slices the same way: check each bound once per replay
            unique.setdefault((g[0].const, tuple(sorted((v.id, c) for v, c in g[0].terms)), g[1], g[2]), g)
        return _Trace(slots, [r.replayable() for r in recorded], out, arena, block, tuple(unique.values()),
                      specialized)

    @staticmethod
    def _slots(args) -> tuple:
        """One input slot per tensor / array / scalar argument (its own buffer, filled now)."""
        slots, call_args = [], []
        for a in args:
            if isinstance(a, Tensor):
                t = Tensor.from_buffer(runtime.Buffer(max(a.dtype.nbytes(a.size), 4)), a.shape, a.dtype)
                slot = _Slot("tensor", t)
            elif isinstance(a, np.ndarray):
                t = Tensor.from_buffer(runtime.Buffer(max(a.nbytes, 4)), a.shape, dt.from_numpy(a.dtype))
                slot = _Slot("array", t)
            elif isinstance(a, numbers.Integral) and not isinstance(a, (bool, np.bool_)):
                # a step variable: fn sees an int (a SymInt) whose uses become kernel parameters
                slot = _Slot("var", None)
                slot.var = Var(f"arg{len(slots)}", -2**31, 2**31 - 1)
                slots.append(slot)
                call_args.append(slot.var.bind(int(a)))
                continue
            elif isinstance(a, numbers.Real) and not isinstance(a, (bool, np.bool_)):
                t = Tensor.from_buffer(runtime.Buffer(4), (1,), dt.float32)
                slot = _Slot("scalar", t)
            else:
                slots.append(None)
                call_args.append(a)
                continue
            slot.load(a)
            slots.append(slot)
            call_args.append(slot.tensor)
        return slots, call_args


def _tensors_in(out) -> list:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors_in(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _tensors_in(o)]
    return []


def capture(fn: Optional[Callable] = None, *, submit_every: Optional[int] = None):
    """Decorator: trace `fn` on its first call per input signature, replay afterwards.

    Arguments may be Tensors, NumPy arrays, Python ints/floats (passed to fn as int32/float32
    tensors of shape (1,)) and other hashable values (each distinct value traces separately).
    fn must not read values back (.numpy()/.item()) — that would end the captured step.
    A replay is queued as one batch (one submit at the next flush: what a decode step wants);
    `submit_every=N` submits a long replay every N kernels instead (a prefill: the GPU starts
    while the host encodes the rest). Use as `@tg.capture` or `@tg.capture(submit_every=64)`."""
    if fn is None:
        return lambda f: Captured(f, submit_every)
    return Captured(fn, submit_every)
