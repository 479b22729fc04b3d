"""Kernel parameters: the small uniform block of runtime values a generated kernel reads
(view offsets, scalar constants, step variables) instead of baking them into its WGSL.

Why: a value baked into the source makes a new pipeline per value (every decode position,
every `x * 0.7`); in a uniform, one compiled kernel serves them all.

- A parameter list of plain numbers is immutable: its bytes live in a small uniform buffer
  shared by every dispatch with the same bytes (a bounded LRU), so a repeated eager step
  reuses the same buffers and bind groups.
- A list holding step variables (symbolic.SymInt) while a capture traces gets a 256-byte slot
  of the trace's own `ParamBlock`; a replay re-evaluates every slot's expressions with the
  new variable values and uploads the whole block with one write.
"""
from __future__ import annotations

import itertools
import struct
import threading
from collections import OrderedDict
from typing import Mapping, Optional, Sequence

import wgpu

from .symbolic import SymInt, evaluate

_uids = itertools.count()
SLOT = 256                 # bytes per slot: WebGPU's minUniformBufferOffsetAlignment upper bound
BLOCK_SLOTS = 256          # slots per ParamBlock buffer (64 KiB, the uniform binding limit)
MAX_SHARED = 4096          # distinct immutable parameter lists kept (LRU)


class ParamBinding:
    """A uniform binding: `size` bytes at `offset` of the GPU buffer `gpu` (what _bind_group binds)."""

    __slots__ = ("gpu", "offset", "size", "capacity", "nbytes", "uid", "__weakref__")

    def __init__(self, gpu, offset: int, size: int):
        self.gpu, self.offset, self.size = gpu, offset, size
        self.capacity = self.nbytes = size
        # bind groups are cached by what they bind; these GPU buffers are freed (LRU eviction,
        # a trace dropped), so a Python id could come back for a new buffer: a serial never does
        self.uid = ("param", next(_uids))


def pack(values: Sequence[tuple], bindings: Optional[Mapping] = None) -> bytes:
    """Little-endian 32-bit words of (value, compute type) pairs, padded to whole vec4s.
    SymInts are evaluated with `bindings` (Var -> int) when given, else at their bound value."""
    words = []
    for v, ct in values:
        if bindings is not None and isinstance(v, SymInt):
            v = evaluate(v, bindings)
        if ct == "f32":
            words.append(struct.pack("<f", float(v)))
        else:
            iv = int(v)
            if ct == "i32" and not -2**31 <= iv < 2**31:
                raise OverflowError(f"kernel parameter {iv} does not fit in int32")
            words.append(struct.pack("<I", iv & 0xffffffff))
    while len(words) % 4:
        words.append(b"\0\0\0\0")
    return b"".join(words)


class ParamBlock:
    """The parameter slots of one capture trace whose values depend on step variables."""

    def __init__(self, device):
        self.device = device
        self.buffers: list = []      # GPU buffers of BLOCK_SLOTS slots each
        self.programs: list = []     # per slot: the (value, ct) list to re-evaluate
        self.bindings: list = []     # the ParamBindings handed out (kept alive with the trace)

    def slot(self, values: Sequence[tuple]) -> ParamBinding:
        i = len(self.programs)
        if i % BLOCK_SLOTS == 0:
            self.buffers.append(self.device.create_buffer(
                size=SLOT * BLOCK_SLOTS, usage=wgpu.BufferUsage.UNIFORM | wgpu.BufferUsage.COPY_DST))
        self.programs.append(list(values))
        data = pack(values)
        buf = self.buffers[-1]
        off = (i % BLOCK_SLOTS) * SLOT
        self.device.queue.write_buffer(buf, off, data)
        b = ParamBinding(buf, off, len(data))
        self.bindings.append(b)
        return b

    def _compile(self) -> None:
        """Every slot's words as `const + coef @ variable values` (one matrix product per replay
        instead of Python per value)."""
        import numpy as np
        vars_: dict = {}
        rows = []
        for j, prog in enumerate(self.programs):
            for k, (v, ct) in enumerate(prog):
                terms = v.terms if isinstance(v, SymInt) else ()
                for var, _ in terms:
                    vars_.setdefault(var, len(vars_))
                rows.append((j * SLOT // 4 + k, v.const if isinstance(v, SymInt) else v, terms, ct))
        self._vars = list(vars_)
        self._index = np.array([r[0] for r in rows], np.int64)
        self._const = np.array([float(r[1]) for r in rows], np.float64)
        self._coef = np.zeros((len(rows), max(len(vars_), 1)), np.float64)
        for i, (_, _, terms, _) in enumerate(rows):
            for var, c in terms:
                self._coef[i, vars_[var]] = c
        self._f32 = np.array([r[3] == "f32" for r in rows], bool)
        self._words = np.zeros(-(-len(self.programs) * SLOT // 4), np.uint32)
        self._n = len(self.programs)

    def update(self, bindings: Mapping) -> None:
        """Re-evaluate every slot for new variable values: one write per 64 KiB buffer."""
        import numpy as np
        if getattr(self, "_n", None) != len(self.programs):
            self._compile()
        x = np.array([float(bindings[v]) for v in self._vars] or [0.0])
        vals = self._const + self._coef @ x
        words = self._words
        ints = np.rint(vals).astype(np.int64)
        if ((ints < -2**31) | (ints >= 2**32))[~self._f32].any():
            raise OverflowError("a kernel parameter computed from the step variables does not fit in 32 bits")
        words[self._index] = (ints & 0xffffffff).astype(np.uint32)
        if self._f32.any():
            words[self._index[self._f32]] = vals[self._f32].astype(np.float32).view(np.uint32)
        per = BLOCK_SLOTS * SLOT // 4
        for bi, buf in enumerate(self.buffers):
            chunk = words[bi * per:(bi + 1) * per]
            self.device.queue.write_buffer(buf, 0, chunk.tobytes())


_lock = threading.Lock()
_shared: "OrderedDict[bytes, ParamBinding]" = OrderedDict()
_blocks: list = []         # ParamBlocks of the captures tracing now (innermost last)


def binding_for(device, values: Sequence[tuple]) -> ParamBinding:
    """The uniform binding that holds `values` for one dispatch."""
    if _blocks and any(isinstance(v, SymInt) for v, _ in values):
        return _blocks[-1].slot(values)
    data = pack(values)
    with _lock:
        b = _shared.get(data)
        if b is not None:
            _shared.move_to_end(data)
            return b
    gpu = device.create_buffer_with_data(data=data, usage=wgpu.BufferUsage.UNIFORM | wgpu.BufferUsage.COPY_DST)
    b = ParamBinding(gpu, 0, len(data))
    with _lock:
        _shared[data] = b
        while len(_shared) > MAX_SHARED:
            _shared.popitem(last=False)
    return b
