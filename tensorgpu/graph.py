"""Lazy graph nodes. A Node is one value of `shape` (row-major, contiguous once realized);
it reads each source through a View that maps this node's coordinates to the source's linear
elements. Nothing here touches the GPU: schedule.py decides which nodes get buffers and
codegen.py/runtime.py run them.
"""
from __future__ import annotations

import itertools
import weakref
from math import prod
from dataclasses import dataclass
from typing import Any, Optional

from . import dtypes as dt
from .ops import Op
from .runtime import LOCK
from .view import View


_seq = itertools.count()
_REDUCE_OPS = frozenset((Op.SUM, Op.PROD, Op.RMAX, Op.RMIN, Op.ARGMAX, Op.ARGMIN))
_NOT_ELEMENTWISE = frozenset((Op.BUFFER, Op.CONST, Op.SUM, Op.PROD, Op.RMAX, Op.RMIN, Op.ARGMAX, Op.ARGMIN, Op.CUSTOM,
                              Op.ASSIGN, Op.SCATTER, Op.AFTER, Op.SINK))
# lazy in-place writes (a pending write of a realized buffer), and the ops a chain of writes
# into one buffer is made of (AFTER: a write another kernel did, rewrites.py)
IN_PLACE = frozenset((Op.ASSIGN, Op.SCATTER))
WRITE_CHAIN = frozenset((Op.ASSIGN, Op.SCATTER, Op.AFTER))
# elementwise ops that read a source at coordinates other than their own (a cat's pieces, a
# gather's data-dependent rows): the planner never treats such a read as element-for-element
REINDEXING = frozenset((Op.CAT, Op.GATHER))


@dataclass(frozen=True)
class ScatterArg:
    """What an Op.SCATTER writes: the target's elements through `view`, at coordinates given
    by `dims`, one entry per dimension of `view`: `j >= 0` is coordinate j of the iteration
    shape (the value's shape), `-1 - k` is the value of index tensor k (srcs[2 + k]) there.
    Index values count from the end when negative (NumPy); a value outside [-n, n) writes
    nothing. An Op.GATHER's arg is such a `dims` tuple for its source view."""
    view: View
    dims: tuple


class Node:
    __slots__ = ("op", "srcs", "dtype", "shape", "arg", "buffer", "consumers", "tensors", "readers", "seq",
                 "__weakref__")

    def __init__(self, op: Op, srcs: tuple, dtype: dt.DType, shape: tuple, arg: Any = None, buffer=None):
        self.seq = next(_seq)       # creation order: which in-place writes a read comes after
        self.op = op
        # srcs: tuple of (Node, View); View.shape is this node's shape for elementwise (set below)
        self.dtype = dtype
        self.shape = tuple(shape)
        self.arg = arg
        self.buffer = buffer        # runtime.Buffer once realized
        self.consumers = 0          # nodes ever built on this one (fusion eligibility)
        self.tensors = 0            # live Tensor objects wrapping this node
        self.readers = None         # WeakSet of unrealized nodes reading this realized node
        self.srcs = ()
        self.set_srcs(srcs)

    def set_srcs(self, srcs) -> None:
        """Read `srcs` from now on (rewrites change sources in place), keeping the bookkeeping
        the scheduler relies on: readers of realized nodes (in-place writes run after them) and
        consumer counts. Sources may be shared between threads (a model's weights): their
        counters and reader sets change under the runtime's lock (ARCHITECTURE.md, "Threads")."""
        if not srcs and not self.srcs:
            return
        with LOCK:
            for m, _ in self.srcs:
                if m.readers is not None:
                    m.readers.discard(self)
            for m, _ in srcs:
                m.consumers += 1
                if m.buffer is not None:
                    if m.readers is None:
                        m.readers = weakref.WeakSet()
                    m.readers.add(self)
        self.srcs = tuple(srcs)

    @property
    def numel(self) -> int:
        return prod(self.shape)

    @property
    def realized(self) -> bool:
        return self.buffer is not None or self.op is Op.CONST

    @property
    def is_elementwise(self) -> bool:
        return self.op not in _NOT_ELEMENTWISE

    @property
    def is_reduce(self) -> bool:
        return self.op in _REDUCE_OPS

    def set_buffer(self, buf) -> None:
        """Realized: keep the result, drop the sources so their memory can be reused."""
        self.buffer = buf
        for n, _ in self.srcs:
            if n.readers is not None:
                n.readers.discard(self)
        self.srcs = ()

    def __repr__(self):
        return f"Node({self.op.name}, {self.shape}, {self.dtype.name}{', realized' if self.buffer is not None else ''})"


# Integer tensors made from host data (tg.tensor) remember their value range, so consumers that
# index with them (tg.nn.embedding) refuse out-of-range ids at the call, with no readback. An
# in-place write into the node's buffer forgets it (schedule.assign).
HOST_RANGE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def buffer_node(buf, shape, dtype: dt.DType) -> Node:
    return Node(Op.BUFFER, (), dtype, shape, buffer=buf)


def const_node(value, dtype: dt.DType) -> Node:
    return Node(Op.CONST, (), dtype, (), arg=value)


class CustomKernel:
    """A hand-written kernel inside the graph (matmul, softmax, attention ...).

    Subclasses implement `emit(out: Buffer, operands: list[Operand], epilogue)`; the scheduler
    realizes every source first and passes it as an Operand read through its View.
    `supports_epilogue`: elementwise consumers of the same shape may be fused into its store.
    `contiguous_srcs`: indices of sources that must be contiguous (a copy is made otherwise)."""
    name = "custom"
    supports_epilogue = False
    contiguous_srcs: tuple = ()

    def key(self) -> tuple:
        return (self.name,)

    def emit(self, out, operands, epilogue) -> None:  # pragma: no cover - interface
        raise NotImplementedError
