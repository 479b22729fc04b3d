"""Tensor: the NumPy-like front end. Every method builds graph nodes or Views and returns at
once; nothing touches the GPU until `.numpy()`, `.item()`, `.realize()` or printing a value.
Inputs are validated here, at the call that caused a problem, before any GPU work.
"""
from __future__ import annotations

import builtins
import numbers
import os
import weakref
from math import prod
from typing import Optional, Sequence, Union

import numpy as np

from . import dtypes as dt
from . import runtime
from .graph import HOST_RANGE, IN_PLACE, Node, buffer_node, const_node
from .ops import BINARY, UNARY, Op, binary_operand_type, binary_result, unary_result
from .symbolic import guard, is_symbolic, static
from .view import View

Scalar = Union[int, float, bool]


def broadcast_shapes(*shapes: tuple, what: str = "broadcast") -> tuple:
    """NumPy's broadcast_shapes: the shape arrays of these shapes broadcast to (a ValueError
    naming them when they cannot; `what` names the operation in the message)."""
    nd = max((len(s) for s in shapes), default=0)
    out = []
    for i in range(nd):
        col = [s[len(s) - nd + i] for s in shapes if len(s) - nd + i >= 0]
        big = [d for d in col if int(d) != 1]
        if len({int(d) for d in big}) > 1:
            raise ValueError(f"{what}: shapes {' and '.join(str(tuple(s)) for s in shapes)} cannot be broadcast together")
        if not big:
            out.append(1)
            continue
        first = big[0]
        if any(d is not first and not (is_symbolic(d) == is_symbolic(first) and d == first) for d in big) or \
                any(is_symbolic(d) for d in col if int(d) == 1):
            # a step variable's size meets another size: the broadcast holds for this value only
            for d in col:
                static(d)
            out.append(int(first))
        else:
            out.append(first)
    return tuple(out)


def _norm_axis(axis: int, ndim: int) -> int:
    if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool):
        raise TypeError(f"axis must be an int, got {type(axis).__name__}")
    if not -ndim <= axis < max(ndim, 1) or (ndim == 0 and axis not in (0, -1)):
        raise np.exceptions.AxisError(f"axis {axis} is out of bounds for a tensor of dimension {ndim}") \
            if hasattr(np, "exceptions") else ValueError(f"axis {axis} out of bounds for ndim {ndim}")
    return axis % ndim if ndim else 0


def _norm_axes(axis, ndim: int) -> tuple:
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, (tuple, list)):
        axes = tuple(_norm_axis(a, ndim) for a in axis)
        if len(set(axes)) != len(axes):
            raise ValueError(f"duplicate value in axis {axis}")
        return tuple(sorted(axes)) if ndim else ()
    a = _norm_axis(axis, ndim)
    return (a,) if ndim else ()  # a 0-d tensor accepts axis 0/-1 (as PyTorch) and has nothing to reduce


class Tensor:
    """A lazy n-dimensional array: a graph node read through a View. Operations build graph
    nodes and return at once; reading a value (.numpy(), .item(), printing, float(t)) computes
    what it needs in a few fused GPU kernels. The API follows NumPy (operators, reductions,
    indexing, np.* functions through NumPy's protocols), with torch names where NumPy has none."""
    __slots__ = ("node", "view", "__weakref__")
    __array_priority__ = 1000  # NumPy defers to our reflected operators

    def __init__(self, node: Node, view: Optional[View] = None):
        if node.tensors == 0 and node.buffer is None and node.op is not Op.CONST:
            _check_fits(node.shape, node.dtype, node.op.name.lower())  # refuse a new lazy result now, not at dispatch
            if node.is_reduce:
                _check_reduce_size(node)
        with runtime.LOCK:   # a node may be shared between threads: its counts change under the lock
            if node.tensors == 0 and node.buffer is None and node.op is not Op.CONST:
                for n, _ in node.srcs:
                    # graph.Node registers readers of realized sources; a source still lazy now may be
                    # realized and then written in place (t[i] = v) before this node runs: register it too
                    if n.buffer is None and n.op is not Op.CONST:
                        if n.readers is None:
                            n.readers = weakref.WeakSet()
                        n.readers.add(node)
            node.tensors += 1
        self.node = node
        self.view = view if view is not None else View.contiguous(node.shape)

    def __del__(self):
        try:
            with runtime.LOCK:
                self.node.tensors -= 1
        except Exception:
            pass

    # ------------------------------------------------------------------ creation helpers

    @staticmethod
    def from_numpy(a: np.ndarray, dtype=None) -> "Tensor":
        """Upload host data. Without `dtype`, NumPy's types map to the stored ones: float64 ->
        float32, signed ints -> int32, unsigned -> uint32 (a one-time DtypeConversionWarning when
        that changes values: ints past int32, floats past float32's range). An explicit `dtype`
        must be one tensorgpu holds (dtypes.as_dtype), and integers must fit it."""
        a = np.asarray(a)
        explicit = dtype is not None
        d = dt.as_dtype(dtype) if explicit else dt.from_numpy(a.dtype)
        if d.is_quant:
            raise TypeError(f"tg.tensor cannot create {d} data from numbers; load a GGUF file or quantize with tg.save_gguf")
        if a.dtype.kind == "c" or a.dtype.kind in "OUSVMm":
            raise TypeError(f"unsupported dtype {a.dtype}: tensorgpu holds {dt.SUPPORTED}")
        _check_fits(a.shape, d, "tg.tensor")   # before any converted copy is made
        host = np.ascontiguousarray(dt.host_values(a, d, explicit))
        buf = runtime.upload(host.reshape(-1).view(np.uint8), max(host.nbytes, 4))
        t = Tensor(buffer_node(buf, a.shape, d))
        if d.kind in ("int", "uint") and host.size:
            HOST_RANGE[t.node] = (int(host.min()), int(host.max()))
        return t

    @staticmethod
    def from_buffer(buf: runtime.Buffer, shape: Sequence[int], dtype: dt.DType) -> "Tensor":
        """Wrap a filled buffer (for quantized dtypes: the raw GGUF block bytes)."""
        shape = tuple(int(s) for s in shape)
        need = dtype.nbytes(prod(shape))
        if buf.nbytes < need:
            raise ValueError(f"buffer of {buf.nbytes} bytes is too small for {shape} {dtype} ({need} bytes)")
        return Tensor(buffer_node(buf, shape, dtype))

    @staticmethod
    def const(value: Scalar, dtype: dt.DType, shape: tuple = ()) -> "Tensor":
        n = const_node(value, dtype)
        return Tensor(n, View((), ()).expand(shape) if shape else View((), ()))

    # ------------------------------------------------------------------ attributes

    @property
    def shape(self) -> tuple:
        return self.view.shape

    @property
    def ndim(self) -> int:
        return len(self.view.shape)

    @property
    def size(self) -> int:
        return prod(self.view.shape)

    numel = size

    @property
    def dtype(self) -> dt.DType:
        return self.node.dtype

    @property
    def strides(self) -> tuple:
        return self.view.strides

    @property
    def T(self) -> "Tensor":
        return self.permute(*reversed(range(self.ndim)))

    @property
    def is_realized(self) -> bool:
        return self.node.buffer is not None or self.node.op is Op.CONST

    def __len__(self) -> int:
        if self.ndim == 0:
            raise TypeError("len() of a 0-d tensor")
        return self.shape[0]

    def __repr__(self) -> str:
        """The values, as NumPy and PyTorch print them: `tensor([[1., 2.]], dtype=float32)`.
        Computes the tensor (only the printed edges of a large one are read back: printing.py);
        `tg.debug.describe(t)` is the cheap lazy description."""
        from .printing import format_tensor
        return format_tensor(self)

    __str__ = __repr__

    def __bool__(self) -> bool:
        """The truth of a one-element tensor (reads it back); ambiguous for other sizes, as NumPy."""
        if self.size != 1:
            raise ValueError(f"the truth value of a tensor of shape {self.shape} is ambiguous "
                             "(use .any() or .all())")
        return bool(self.item())

    def _scalar(self, what: str):
        if self.size != 1:
            raise TypeError(f"{what}() needs a tensor with exactly one element, got shape {self.shape} "
                            f"({self.size} elements)")
        return self.item()

    def __float__(self) -> float:
        """float(t) of a one-element tensor (reads it back)."""
        return float(self._scalar("float"))

    def __int__(self) -> int:
        """int(t) of a one-element tensor, truncating a float toward zero (reads it back)."""
        return int(self._scalar("int"))

    def __index__(self) -> int:
        """operator.index(t) of a 0-d integer tensor (so it can index a list or bound a slice),
        as NumPy allows for 0-d integer arrays only."""
        if self.ndim != 0 or self.dtype.kind not in ("int", "uint"):
            raise TypeError(f"only 0-d integer tensors can be used as an index, got a {self.dtype.name} tensor "
                            f"of shape {self.shape}")
        return int(self.item())

    def __format__(self, spec: str) -> str:
        """format(t, ".3f") / f"{t:.3f}" of a one-element tensor; an empty spec is str(t)."""
        if not spec:
            return str(self)
        if self.size != 1:
            raise TypeError(f"format spec {spec!r} needs a tensor with exactly one element, got shape {self.shape}")
        return format(self.item(), spec)

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def __hash__(self):
        return id(self)

    # ------------------------------------------------------------------ realization

    def realize(self) -> "Tensor":
        """Compute this tensor now (its buffer then holds its value, in-place writes included)."""
        from .schedule import realize, writes_before
        realize(self.node)
        writes_before(self.node.buffer, float("inf"))   # writes into the memory it views, through other tensors
        return self

    def read_async(self) -> "PendingRead":
        """Queue a copy of this tensor's value to the host with the next submit, without
        waiting: `.numpy()` on the result waits for it. A decode loop queues step N+1 (and
        calls tg.submit()) before it waits for step N's token, so neither side idles."""
        if self.dtype.is_quant:
            return self.astype(dt.float32).read_async()
        t = self
        if not (self.view.is_contiguous and not is_symbolic(self.view.offset)) or self.size == 0:
            t = self.contiguous()
        t.realize()
        if t.node.op is Op.CONST:
            return PendingRead(None, self.shape, self.dtype, np.full(self.shape, t.node.arg, dtype=self.dtype.np_dtype))
        start = self.dtype.nbytes(t.view.offset) if self.dtype is not dt.float16 else 2 * t.view.offset
        return PendingRead(runtime.read_later(t.node.buffer, start, max(self.dtype.nbytes(self.size), 0)),
                           self.shape, self.dtype)

    def numpy(self) -> np.ndarray:
        if self.dtype.is_quant:
            return self.astype(dt.float32).numpy()
        if self.size == 0:
            return np.zeros(self.shape, self.dtype.np_dtype)
        self.realize()
        v, node = self.view, self.node
        if node.op is Op.CONST:
            return np.full(self.shape, node.arg, dtype=self.dtype.np_dtype)
        if not v.is_contiguous:
            c = self.contiguous().realize()
            v, node = c.view, c.node
        d = self.dtype
        isz = {dt.float16: 2}.get(d, 4)
        raw = runtime.read(node.buffer, v.offset * isz, self.size * isz)
        host_t = {dt.float32: np.float32, dt.float16: np.float16, dt.int32: np.int32, dt.uint32: np.uint32, dt.bool_: np.uint32}[d]
        arr = np.frombuffer(raw, host_t).reshape(self.shape)
        return arr.astype(np.bool_) if d is dt.bool_ else arr.copy()

    def item(self):
        if self.size != 1:
            raise ValueError(f"item() needs exactly one element, tensor has shape {self.shape}")
        return self.numpy().reshape(()).item()

    def tolist(self):
        return self.numpy().tolist()

    def __array__(self, dtype=None, copy=None):
        """np.asarray(t) / np.array(t): the values read back (always a fresh host array)."""
        a = self.numpy()
        return a.astype(dtype) if dtype is not None else a

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        """np.exp(t), np.add(t, x), np.add.reduce(t, axis)...: tensorgpu's own ops, returning
        tensors (numpy_api.py lists them); other ufuncs run on the values read back."""
        from .numpy_api import array_ufunc
        return array_ufunc(ufunc, method, inputs, kwargs)

    def __array_function__(self, func, types, args, kwargs):
        """np.sum(t), np.mean(t), np.concatenate([t, u]), np.sort(t)...: tensorgpu's own ops,
        returning tensors (numpy_api.py lists them); other functions run on the values read back."""
        from .numpy_api import array_function
        return array_function(func, types, args, kwargs)

    def contiguous(self) -> "Tensor":
        """An explicit copy into a fresh row-major buffer (a visible kernel)."""
        if self.dtype.is_quant:
            raise TypeError(f"contiguous() of a {self.dtype} tensor: use .astype(tg.float32) to dequantize")
        return Tensor(Node(Op.CAST, ((self.node, self.view),), self.dtype, self.shape))

    # ------------------------------------------------------------------ elementwise

    def _check_plain(self, what: str) -> None:
        if self.dtype.is_quant:
            raise TypeError(f"{what} of a {self.dtype} tensor {self.shape}: dequantize first with .astype(tg.float32)")

    def astype(self, dtype) -> "Tensor":
        d = dt.as_dtype(dtype)
        if self.dtype.is_quant:
            if not d.is_float:
                raise TypeError(f"a {self.dtype} tensor converts only to float32/float16, not {d}")
            from .customops import dequantize
            out = dequantize(self)
            return out if d is dt.float32 else out.astype(d)
        if d.is_quant:
            raise TypeError(f"cannot quantize to {d} on the GPU; use tg.save_gguf(..., quantize='{d.name}')")
        if d is self.dtype:
            return self
        if self.node.op is Op.CONST:
            return Tensor.const(_fold(lambda v: v, d, self), d, self.shape)
        return Tensor(Node(Op.CAST, ((self.node, self.view),), d, self.shape))

    def _unary(self, op: Op) -> "Tensor":
        self._check_plain(op.name.lower())
        if self.dtype is dt.bool_ and op in (Op.NEG,):
            raise TypeError("negative of a bool tensor is not supported (use ~ / tg.logical_not)")
        if op is Op.NOT and self.dtype is not dt.bool_:
            raise TypeError(f"~ is logical not of a bool tensor; got {self.dtype} (bitwise ops on integers are not supported)")
        if self.dtype is dt.bool_ and op in (Op.ABS, Op.RELU):
            return self  # NumPy: abs(bool) is bool; max(bool, False) is itself
        rd = unary_result(op, self.dtype)
        src = self if (UNARY[op].result == "bool" or not UNARY[op].float_only or self.dtype.is_float) else self.astype(rd)
        if src.node.op is Op.CONST:  # fold on the host: WGSL would const-evaluate literals and reject inf/overflow
            return Tensor.const(_fold(UNARY[op].np_fn, rd, src), rd, self.shape)
        return Tensor(Node(op, ((src.node, src.view),), rd, self.shape))

    def _binary(self, op: Op, other, reverse: bool = False) -> "Tensor":
        self._check_plain(op.name.lower())
        o = _as_operand(other, self.dtype)
        a, b = (o, self) if reverse else (self, o)
        a._check_plain(op.name.lower()); b._check_plain(op.name.lower())
        if a.dtype is dt.bool_ and b.dtype is dt.bool_:
            op = {Op.ADD: Op.OR, Op.MUL: Op.AND, Op.MAX: Op.OR, Op.MIN: Op.AND}.get(op, op)
            if op is Op.SUB:
                raise TypeError("subtracting bool tensors is not supported (use ^ or logical ops)")
        shape = broadcast_shapes(a.shape, b.shape, what=f"{op.name.lower()}")
        od = binary_operand_type(op, a.dtype, b.dtype)
        a, b = a.astype(od), b.astype(od)
        rd = binary_result(op, a.dtype, b.dtype)
        if op is Op.POW and rd.kind == "int" and b.node.op is Op.CONST and b.node.arg < 0:
            raise ValueError(f"integers to negative integer powers are not allowed ({a.dtype} ** {b.node.arg}); "
                             "use a float base")
        if a.node.op is Op.CONST and b.node.op is Op.CONST:  # fold on the host (see _unary)
            return Tensor.const(_fold(BINARY[op].np_fn, rd, a, b), rd, shape)
        return Tensor(Node(op, ((a.node, a.view.expand(shape)), (b.node, b.view.expand(shape))), rd, shape))

    def __add__(self, o): return self._binary(Op.ADD, o)
    def __radd__(self, o): return self._binary(Op.ADD, o, True)
    def __sub__(self, o): return self._binary(Op.SUB, o)
    def __rsub__(self, o): return self._binary(Op.SUB, o, True)
    def __mul__(self, o): return self._binary(Op.MUL, o)
    def __rmul__(self, o): return self._binary(Op.MUL, o, True)
    def __truediv__(self, o): return self._binary(Op.DIV, o)
    def __rtruediv__(self, o): return self._binary(Op.DIV, o, True)
    def __pow__(self, o): return self._binary(Op.POW, o)
    def __rpow__(self, o): return self._binary(Op.POW, o, True)
    def __floordiv__(self, o): return self._binary(Op.FLOORDIV, o)
    def __rfloordiv__(self, o): return self._binary(Op.FLOORDIV, o, True)
    def __mod__(self, o): return self._binary(Op.MOD, o)
    def __rmod__(self, o): return self._binary(Op.MOD, o, True)
    def __lt__(self, o): return self._binary(Op.LT, o)
    def __le__(self, o): return self._binary(Op.LE, o)
    def __gt__(self, o): return self._binary(Op.GT, o)
    def __ge__(self, o): return self._binary(Op.GE, o)
    def __eq__(self, o): return self._binary(Op.EQ, o)  # type: ignore[override]
    def __ne__(self, o): return self._binary(Op.NE, o)  # type: ignore[override]
    def __and__(self, o): return self._logical(Op.AND, o)
    def __or__(self, o): return self._logical(Op.OR, o)
    def __invert__(self): return self._unary(Op.NOT)
    def __neg__(self): return self._unary(Op.NEG)
    def __pos__(self): return self
    def __abs__(self): return self._unary(Op.ABS)
    def __matmul__(self, o): return matmul(self, o)
    def __rmatmul__(self, o): return matmul(_as_operand(o, self.dtype), self)

    def _logical(self, op: Op, o) -> "Tensor":
        o = _as_operand(o, self.dtype)
        if self.dtype is not dt.bool_ or o.dtype is not dt.bool_:
            raise TypeError(f"& and | need bool tensors, got {self.dtype} and {o.dtype}")
        return self._binary(op, o)

    def abs(self): return self._unary(Op.ABS)
    def exp(self): return self._unary(Op.EXP)
    def log(self): return self._unary(Op.LOG)
    def sqrt(self): return self._unary(Op.SQRT)
    def rsqrt(self): return self._unary(Op.RSQRT)
    def sin(self): return self._unary(Op.SIN)
    def cos(self): return self._unary(Op.COS)
    def tanh(self): return self._unary(Op.TANH)
    def erf(self): return self._unary(Op.ERF)
    def sigmoid(self): return self._unary(Op.SIGMOID)
    def relu(self): return self._unary(Op.RELU)
    def silu(self): return self._unary(Op.SILU)
    def reciprocal(self): return self._unary(Op.RECIP)
    def floor(self): return self._unary(Op.FLOOR) if self.dtype.is_float else self
    def ceil(self): return self._unary(Op.CEIL) if self.dtype.is_float else self

    def round(self, decimals: int = 0) -> "Tensor":
        """NumPy's round: halfway values go to the even neighbour (0.5 -> 0, 1.5 -> 2, 2.5 -> 2).
        With `decimals`, as NumPy does for float32: x * 10**d rounded, divided by 10**d
        (negative d: divided first, multiplied after). Integer tensors are returned as they are
        (negative decimals on integers are not supported)."""
        if not isinstance(decimals, (int, np.integer)) or isinstance(decimals, bool):
            raise TypeError(f"round: decimals must be an int, got {decimals!r}")
        self._check_plain("round")
        if not self.dtype.is_float:
            if decimals < 0:
                raise NotImplementedError(f"round with negative decimals ({decimals}) of a {self.dtype.name} tensor")
            return self
        if decimals == 0:
            return self._unary(Op.ROUND)
        if decimals > 0:
            f = 10.0 ** decimals
            return (self * f)._unary(Op.ROUND) / f
        f = 10.0 ** -decimals
        return (self / f)._unary(Op.ROUND) * f

    def __round__(self, ndigits=None):
        """Python's round(t) / round(t, n): a tensor, as NumPy's arrays give (not an int)."""
        return self.round(0 if ndigits is None else ndigits)

    def _float_test(self, op: Op, non_float: bool) -> "Tensor":
        self._check_plain(op.name.lower())
        if not self.dtype.is_float:      # integers and bools are never NaN or infinite
            return full(self.shape, non_float, dt.bool_)
        return self._unary(op)

    def isnan(self) -> "Tensor":
        """Elementwise: is the value NaN (bool tensor; always False for integers)."""
        return self._float_test(Op.ISNAN, False)

    def isinf(self) -> "Tensor":
        """Elementwise: is the value +inf or -inf (bool tensor; always False for integers)."""
        return self._float_test(Op.ISINF, False)

    def isfinite(self) -> "Tensor":
        """Elementwise: neither NaN nor infinite (bool tensor; always True for integers)."""
        return self._float_test(Op.ISFINITE, True)

    def gelu(self, approximate: str = "none"):
        if approximate not in ("none", "tanh"):
            raise ValueError(f"gelu approximate must be 'none' or 'tanh', got {approximate!r}")
        return self._unary(Op.GELU if approximate == "none" else Op.GELU_TANH)

    def maximum(self, o): return self._binary(Op.MAX, o)
    def minimum(self, o): return self._binary(Op.MIN, o)

    def clip(self, min=None, max=None):  # noqa: A002 - NumPy's names
        out = self
        if min is not None:
            out = out.maximum(min)
        if max is not None:
            out = out.minimum(max)
        return out

    # ------------------------------------------------------------------ reductions

    def _reduce(self, op: Op, axis, keepdims: bool) -> "Tensor":
        self._check_plain(op.name.lower())
        axes = _norm_axes(axis, self.ndim)
        src = self.astype(dt.int32) if self.dtype is dt.bool_ else self   # WGSL can't add or order bools
        if any(self.shape[a] == 0 for a in axes) and op not in (Op.SUM, Op.PROD):
            raise ValueError(f"zero-size reduction ({op.name.lower()}) over axes {axes} of shape {self.shape} has no identity")
        kshape = tuple(1 if i in axes else s for i, s in enumerate(self.shape))
        rd = dt.int32 if op in (Op.ARGMAX, Op.ARGMIN) else src.dtype
        if op in (Op.SUM, Op.PROD) and src.dtype is dt.float16:
            rd = dt.float32
        if not axes:  # nothing to reduce (0-d tensor)
            out = Tensor(Node(Op.CAST, ((src.node, src.view),), rd, self.shape)) if op not in (Op.ARGMAX, Op.ARGMIN) \
                else Tensor.const(0, dt.int32, self.shape)
        else:
            node = Node(op, ((src.node, src.view),), rd, kshape, arg=axes)
            out = Tensor(node)
        if op in (Op.SUM, Op.PROD) and self.dtype is dt.float16:
            out = out.astype(dt.float16)
        if op in (Op.RMAX, Op.RMIN) and self.dtype is dt.bool_:
            out = out.astype(dt.bool_)
        if not keepdims:
            out = out.reshape(tuple(s for i, s in enumerate(self.shape) if i not in axes))
        return out

    def sum(self, axis=None, keepdims: bool = False): return self._reduce(Op.SUM, axis, keepdims)

    def prod(self, axis=None, keepdims: bool = False) -> "Tensor":
        """Product over `axis` (None: all; int or tuple), as NumPy's prod: 1 for an empty
        reduction; bool -> int32; float16 is multiplied in float32 and rounded once."""
        return self._reduce(Op.PROD, axis, keepdims)

    def _truth(self, op: Op, axis, keepdims: bool, empty: bool) -> "Tensor":
        self._check_plain(op.name.lower())
        b = self if self.dtype is dt.bool_ else self != 0      # NaN counts as true, as in NumPy
        axes = _norm_axes(axis, self.ndim)
        if any(self.shape[a] == 0 for a in axes):
            shape = tuple(1 if i in axes else n for i, n in enumerate(self.shape)) if keepdims else \
                tuple(n for i, n in enumerate(self.shape) if i not in axes)
            return full(shape, empty, dt.bool_)
        return b._reduce(op, axis, keepdims)

    def any(self, axis=None, keepdims: bool = False) -> "Tensor":
        """Whether any element along `axis` (None: all) is true / nonzero (a bool tensor; False
        when empty). A max reduction over the values' truth, fused like every reduction."""
        return self._truth(Op.RMAX, axis, keepdims, False)

    def all(self, axis=None, keepdims: bool = False) -> "Tensor":
        """Whether every element along `axis` (None: all) is true / nonzero (a bool tensor; True
        when empty). A min reduction over the values' truth, fused like every reduction."""
        return self._truth(Op.RMIN, axis, keepdims, True)
    def max(self, axis=None, keepdims: bool = False): return self._reduce(Op.RMAX, axis, keepdims)
    def min(self, axis=None, keepdims: bool = False): return self._reduce(Op.RMIN, axis, keepdims)

    def mean(self, axis=None, keepdims: bool = False):
        axes = _norm_axes(axis, self.ndim)
        n = prod(self.shape[a] for a in axes)
        s = (self if self.dtype.is_float else self.astype(dt.float32)).sum(axis, keepdims)
        # mean of nothing is NaN (NumPy); not s * nan: the driver folds 0 * NaN to 0
        return s * (1.0 / n) if n else full(s.shape, float("nan"), s.dtype)

    def var(self, axis=None, keepdims: bool = False, ddof: int = 0):
        axes = _norm_axes(axis, self.ndim)
        n = prod(self.shape[a] for a in axes)
        x = self if self.dtype.is_float else self.astype(dt.float32)
        d = x - x.mean(axis, keepdims=True)
        s = (d * d).sum(axis, keepdims)
        return s * (1.0 / (n - ddof)) if n - ddof > 0 else full(s.shape, float("nan"), s.dtype)

    def std(self, axis=None, keepdims: bool = False, ddof: int = 0):
        return self.var(axis, keepdims, ddof).sqrt()

    def _arg(self, op: Op, axis, keepdims: bool):
        if axis is None:
            flat = self.reshape(-1)
            out = flat._reduce(op, 0, False)
            return out.reshape((1,) * self.ndim) if keepdims else out
        if isinstance(axis, (tuple, list)):
            raise TypeError("argmax/argmin take a single int axis or None")
        return self._reduce(op, axis, keepdims)

    def argmax(self, axis=None, keepdims: bool = False): return self._arg(Op.ARGMAX, axis, keepdims)

    def cumsum(self, axis=None) -> "Tensor":
        """NumPy's cumsum: running sums along `axis` (None: the flattened tensor), one scan kernel
        (kernels/scan.py); bool counts as int32, float16 is summed in float32."""
        from .customops import cumsum
        return cumsum(self, axis)

    def argsort(self, axis: int = -1, kind=None, descending: bool = False) -> "Tensor":
        """Positions (int32) that sort the tensor along `axis`: NumPy's argsort with a stable
        order whatever `kind` says (equal values keep their order), NaN last; descending=True
        gives the largest first (NaN first). One workgroup sorts each row (kernels/sort.py):
        rows of up to 2048 elements (a clear error beyond; topk takes longer rows)."""
        from .customops import argsort
        if kind not in (None, "quicksort", "mergesort", "heapsort", "stable"):
            raise ValueError(f"argsort: unknown kind {kind!r}")
        return argsort(self, axis, descending)

    def sort(self, axis: int = -1, kind=None, descending: bool = False) -> None:
        """In place, as NumPy's ndarray.sort: the tensor now holds its values sorted along
        `axis` (a lazy write, like t[...] = v). tg.sort(t) returns a sorted copy instead."""
        self[...] = sort(self, axis, kind, descending)

    def topk(self, k: int, axis: int = -1, largest: bool = True, sorted: bool = True) -> tuple:  # noqa: A002
        """(values, indices) of the k largest (smallest with largest=False) elements along `axis`,
        largest first, as torch.topk: ties keep the lower index first, NaN counts as the largest.
        Rows of any length (long rows are narrowed in chunks of one workgroup's sort; k at most
        1024 then). The values are a gather of the indices, fused with what reads them."""
        from .customops import topk
        return topk(self, k, axis, largest)

    def dot(self, other) -> "Tensor":
        """NumPy's dot (see tg.dot)."""
        return dot(self, other)

    def ravel(self) -> "Tensor":
        """The elements as a 1-d tensor: a view when strides allow, else a contiguous copy."""
        return self.reshape(-1)

    def copy(self) -> "Tensor":
        """A copy in a buffer of its own (writes to either side do not show in the other)."""
        return self.contiguous()
    def argmin(self, axis=None, keepdims: bool = False): return self._arg(Op.ARGMIN, axis, keepdims)

    def logsumexp(self, axis=-1, keepdims: bool = False):
        m = self.max(axis, keepdims=True)
        m = where(m.abs() == float("inf"), 0.0, m)
        out = (self - m).exp().sum(axis, keepdims=True).log() + m
        return out if keepdims else out.reshape(tuple(s for i, s in enumerate(self.shape) if i not in _norm_axes(axis, self.ndim)))

    def softmax(self, axis: int = -1):
        from .customops import softmax
        return softmax(self, axis)

    def log_softmax(self, axis: int = -1):
        from .customops import softmax
        return softmax(self, axis, log=True)

    # ------------------------------------------------------------------ views (no copies)

    def _with_view(self, view: View) -> "Tensor":
        return Tensor(self.node, view)

    def reshape(self, *shape) -> "Tensor":
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else tuple(shape)
        shape = tuple(int(s) for s in shape)
        if shape.count(-1) > 1:
            raise ValueError(f"reshape {self.shape} -> {shape}: only one dimension can be -1")
        if -1 in shape:
            rest = prod(s for s in shape if s != -1)
            if rest == 0 or self.size % rest:
                raise ValueError(f"cannot reshape tensor of shape {self.shape} ({self.size} elements) into {shape}")
            shape = tuple(self.size // rest if s == -1 else s for s in shape)
        if any(s < 0 for s in shape) or prod(shape) != self.size:
            raise ValueError(f"cannot reshape tensor of shape {self.shape} ({self.size} elements) into {shape}")
        v = self.view.reshape(shape)
        if v is None:
            c = self.contiguous()
            return c._with_view(View.contiguous(shape))
        return self._with_view(v)

    def view_as(self, other: "Tensor") -> "Tensor":
        return self.reshape(other.shape)

    def flatten(self, start_dim: int = 0, end_dim: int = -1) -> "Tensor":
        if self.ndim == 0:
            return self.reshape(1)
        s, e = _norm_axis(start_dim, self.ndim), _norm_axis(end_dim, self.ndim)
        return self.reshape(self.shape[:s] + (prod(self.shape[s:e + 1]),) + self.shape[e + 1:])

    def permute(self, *axes) -> "Tensor":
        axes = tuple(axes[0]) if len(axes) == 1 and isinstance(axes[0], (tuple, list)) else tuple(axes)
        if len(axes) != self.ndim:
            raise ValueError(f"permute of a {self.ndim}-d tensor {self.shape} needs {self.ndim} axes, got {axes}")
        ax = tuple(_norm_axis(a, self.ndim) for a in axes)
        if sorted(ax) != list(range(self.ndim)):
            raise ValueError(f"permute axes {axes} are not a permutation of {self.ndim} dims")
        return self._with_view(self.view.permute(ax))

    def transpose(self, *axes) -> "Tensor":
        """NumPy's transpose: `t.transpose()` reverses the axes, `t.transpose(2, 0, 1)` or
        `t.transpose((2, 0, 1))` permutes them (a view, no copy); exchanging two axes of any
        tensor is `swapaxes(a, b)`."""
        if len(axes) == 1 and (axes[0] is None or isinstance(axes[0], (tuple, list))):
            axes = () if axes[0] is None else tuple(axes[0])
        if not axes:
            return self.permute(*reversed(range(self.ndim)))
        if len(axes) != self.ndim:
            raise ValueError(f"transpose: axes {axes} don't match a tensor of shape {self.shape} "
                             f"({self.ndim} axes); use swapaxes(a, b) to exchange two axes")
        return self.permute(*axes)

    def swapaxes(self, axis1: int, axis2: int) -> "Tensor":
        """The same tensor with two axes exchanged (a view, no copy), as NumPy's swapaxes."""
        a, b = _norm_axis(axis1, self.ndim), _norm_axis(axis2, self.ndim)
        axes = list(range(self.ndim))
        axes[a], axes[b] = axes[b], axes[a]
        return self.permute(*axes)

    def moveaxis(self, source, destination) -> "Tensor":
        """NumPy's moveaxis: axes `source` (int or sequence) moved to `destination` (a view)."""
        src = [source] if isinstance(source, (int, np.integer)) else list(source)
        dst = [destination] if isinstance(destination, (int, np.integer)) else list(destination)
        if len(src) != len(dst):
            raise ValueError(f"moveaxis: source {source} and destination {destination} must have the same number of axes")
        src = [_norm_axis(a, self.ndim) for a in src]
        dst = [_norm_axis(a, self.ndim) for a in dst]
        if len(set(src)) != len(src) or len(set(dst)) != len(dst):
            raise ValueError(f"moveaxis: repeated axis in source {source} or destination {destination}")
        order = [a for a in range(self.ndim) if a not in src]
        for d, a in sorted(zip(dst, src)):
            order.insert(d, a)
        return self.permute(*order)

    def expand(self, *shape) -> "Tensor":
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else tuple(shape)
        if len(shape) < self.ndim:
            raise ValueError(f"expand {self.shape} -> {shape}: target has fewer dimensions")
        pad = len(shape) - self.ndim
        shape = tuple(self.shape[i - pad] if (s == -1 and i >= pad) else s for i, s in enumerate(shape))
        for i, s in enumerate(self.shape):
            if s != 1 and s != shape[i + pad]:
                raise ValueError(f"cannot expand tensor of shape {self.shape} to {shape}")
        return self._with_view(self.view.expand(shape))

    def broadcast_to(self, shape) -> "Tensor":
        return self.expand(tuple(shape))

    def squeeze(self, axis=None) -> "Tensor":
        if axis is None:
            axes = tuple(i for i, s in enumerate(self.shape) if s == 1)
        else:
            axes = _norm_axes(axis, self.ndim)
            for a in axes:
                if self.shape[a] != 1:
                    raise ValueError(f"cannot squeeze axis {a} of size {self.shape[a]} in shape {self.shape}")
        v = self.view
        for a in sorted(axes, reverse=True):
            v = v.index(a, 0)
        return self._with_view(v)

    def unsqueeze(self, axis: int) -> "Tensor":
        nd = self.ndim + 1
        if not -nd <= axis < nd:
            raise ValueError(f"unsqueeze axis {axis} out of range for a {self.ndim}-d tensor")
        return self._with_view(self.view.unsqueeze(axis % nd))

    def _index_view(self, idx) -> View:
        if not isinstance(idx, tuple):
            idx = (idx,)
        n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
        if sum(1 for i in idx if i is Ellipsis) > 1:
            raise IndexError("an index can only have a single ellipsis ('...')")
        if n_real > self.ndim:
            raise IndexError(f"too many indices for tensor of shape {self.shape}: {n_real} given")
        expanded = []
        for i in idx:
            if i is Ellipsis:
                expanded.extend([slice(None)] * (self.ndim - n_real))
            else:
                expanded.append(i)
        expanded.extend([slice(None)] * (self.ndim - sum(1 for i in expanded if i is not None)))
        v = self.view
        axis = 0
        for i in expanded:
            if i is None:
                v = v.unsqueeze(axis)
                axis += 1
            elif isinstance(i, slice):
                start, stop, step = _slice_bounds(i, v.shape[axis], axis, self.shape)
                if step == 0:
                    raise ValueError("slice step cannot be zero")
                v = v.slice(axis, start, stop, step)
                axis += 1
            elif isinstance(i, (int, np.integer)) and not isinstance(i, (bool, np.bool_)):
                v = v.index(axis, _index_int(i, v.shape[axis], axis, self.shape))
            elif isinstance(i, (bool, np.bool_)):
                raise TypeError("a bool scalar index (t[True], t[False]) is not supported: use t[None] or t[:0]")
            else:
                raise TypeError(f"unsupported index {i!r} of type {type(i).__name__}")
        return v

    def __getitem__(self, idx) -> "Tensor":
        """NumPy indexing. Ints, slices, None and ... give a view (no copy, nothing runs);
        integer arrays / lists / int tensors and boolean masks give a lazy gather
        (tensorgpu/indexing.py: NumPy's advanced-indexing rules; a mask is read back to learn
        the result's shape)."""
        from .indexing import getitem, is_advanced
        if is_advanced(idx):
            return getitem(self, idx)
        return self._with_view(self._index_view(idx))

    def __setitem__(self, idx, value) -> None:
        """In-place write, ordered after every pending read of the old contents. With integer
        arrays or masks in the index it is a scatter (tensorgpu/indexing.py: with duplicate
        indices one of the values lands, which one is unspecified; `t[mask] = scalar` needs no
        readback)."""
        from .indexing import is_advanced, setitem
        from .schedule import assign
        if is_advanced(idx):
            setitem(self, idx, value)
            return
        self._check_plain("assignment")
        self._own_memory()
        target = self._index_view(idx)
        v = _as_operand(value, self.dtype)
        v._check_plain("assignment")
        broadcast_shapes(target.shape, v.shape, what=f"assign value of shape {v.shape} to index of shape {target.shape}")
        if v.ndim > len(target.shape) or broadcast_shapes(target.shape, v.shape) != target.shape:
            raise ValueError(f"could not broadcast value of shape {v.shape} into index result of shape {target.shape}")
        self._forget_arange()
        self._adopt(Tensor(assign(self.node, target, v.node, v.view.expand(target.shape)), self.view))

    def _must_copy_to_write(self) -> bool:
        """Whether an in-place write needs this tensor to get its own memory first: a lazy
        result, a constant, or a broadcast view (NumPy semantics: a fresh array is writable)."""
        owned = self.node.buffer is not None or self.node.op in IN_PLACE   # a pending write owns it too
        return self.node.op is Op.CONST or not owned or (0 in self.view.strides and self.size > 1
                                                         and not _owns(self.view))

    def _own_memory(self) -> None:
        """Before an in-place write: realize a contiguous copy when _must_copy_to_write."""
        from .schedule import realize
        if self._must_copy_to_write():
            c = self.contiguous()
            realize(c.node)
            self._adopt(c)

    def _forget_arange(self) -> None:
        """Its values are about to change: it is no longer an arange (rewrites.py relies on those)."""
        n = self.node
        while n is not None:
            _ARANGES.pop(n, None)
            n = n.srcs[0][0] if n.op in IN_PLACE and n.srcs else None

    def _adopt(self, other: "Tensor") -> None:
        self.node.tensors -= 1
        self.node = other.node
        self.node.tensors += 1
        self.view = other.view

    # ------------------------------------------------------------------ splitting

    def split(self, split_size_or_sections, axis: int = 0) -> list:
        ax = _norm_axis(axis, self.ndim)
        n = self.shape[ax]
        if isinstance(split_size_or_sections, int):
            if split_size_or_sections <= 0:
                raise ValueError(f"split size must be positive, got {split_size_or_sections}")
            sizes = [split_size_or_sections] * (n // split_size_or_sections)
            if n % split_size_or_sections:
                sizes.append(n % split_size_or_sections)
        else:
            sizes = list(split_size_or_sections)
            if sum(sizes) != n:
                raise ValueError(f"split sizes {sizes} do not add up to {n} (axis {ax} of {self.shape})")
        out, start = [], 0
        for s in sizes:
            out.append(self._with_view(self.view.slice(ax, start, start + s, 1)))
            start += s
        return out

    def chunk(self, chunks: int, axis: int = 0) -> list:
        ax = _norm_axis(axis, self.ndim)
        if chunks <= 0:
            raise ValueError(f"chunks must be positive, got {chunks}")
        size = -(-self.shape[ax] // chunks) if self.shape[ax] else 1
        return self.split(max(size, 1), ax)


def _sink(tensors) -> Node:
    """One node whose realization realizes every tensor, in one schedule (rules see them all)."""
    for t in tensors:
        if not isinstance(t, Tensor):
            raise TypeError(f"tg.realize takes Tensors, got {type(t).__name__}")
    return Node(Op.SINK, tuple((t.node, View.contiguous(t.node.shape)) for t in tensors), dt.bool_, ())


def realize(*tensors: "Tensor") -> tuple:
    """Compute several tensors in one schedule, so the engine's rewrites see them together
    (two projections of one input become one stacked GEMV) and shared work runs once.
    Returns the tensors."""
    from .schedule import realize as _realize
    _realize(_sink(tensors))
    return tensors


class PendingRead:
    """A tensor's value on its way to the host (Tensor.read_async)."""

    def __init__(self, ticket, shape: tuple, dtype: dt.DType, value: Optional[np.ndarray] = None):
        self._ticket, self.shape, self.dtype, self._value = ticket, shape, dtype, value

    def numpy(self) -> np.ndarray:
        """The value (waits for the GPU if it is not there yet)."""
        if self._value is None:
            raw = self._ticket.result()
            d = self.dtype
            a = np.frombuffer(raw, np.uint32 if d is dt.bool_ else d.np_dtype, count=prod(self.shape))
            self._value = (a != 0 if d is dt.bool_ else a.copy()).reshape(self.shape)
        return self._value


def _index_int(i, n: int, axis: int, shape: tuple):
    """An integer index into an axis of length n, normalised (negative counts from the end); a
    step variable must be in [0, n) and is re-checked on every replay of a capture."""
    if not -n <= i < n or (is_symbolic(i) and i < 0):
        raise IndexError(f"index {i} is out of bounds for axis {axis} with size {n} (shape {shape})")
    guard(i, 0, n - 1, f"index along axis {axis} of a tensor of shape {shape}")
    return i if is_symbolic(i) else int(i) % n


def _slice_bounds(i: slice, n: int, axis: int, shape: tuple) -> tuple:
    """slice.indices(n), except that a step variable (SymInt) start/stop stays symbolic. A
    symbolic bound must lie in [0, n] (no negative or clamped values: a replay could not follow
    them); the capture re-checks that on every replay."""
    if not any(is_symbolic(x) for x in (i.start, i.stop, i.step)):
        return i.indices(n)
    if i.step is not None and static(i.step) != 1:
        return slice(static(i.start) if i.start is not None else None,
                     static(i.stop) if i.stop is not None else None, static(i.step)).indices(n)
    start = 0 if i.start is None else i.start
    stop = n if i.stop is None else i.stop
    out = []
    for name, x in (("start", start), ("stop", stop)):
        if is_symbolic(x):
            if not 0 <= x <= n:
                raise IndexError(f"slice {name} {int(x)} (a step variable) is outside [0, {n}] on axis {axis} "
                                 f"of a tensor of shape {shape}")
            guard(x, 0, n, f"slice {name} on axis {axis} of a tensor of shape {shape}")
        else:
            x = slice(x, None).indices(n)[0] if name == "start" else slice(None, x).indices(n)[1]
        out.append(x)
    start, stop = out
    if stop < start:
        raise IndexError(f"slice [{int(start)}:{int(stop)}] with a step variable is empty-reversed on axis {axis} "
                         f"of a tensor of shape {shape}")
    guard(stop - start, 0, n, f"slice length on axis {axis} of a tensor of shape {shape}")
    return start, stop, 1


# Generated kernels index elements with 32-bit integers (i32 coordinates), so a reduction may read
# at most this many elements (a broadcast tg.ones((1 << 33,)).sum() reads 2**33 without memory).
MAX_REDUCE_ELEMENTS = 2**31 - 1


def _check_reduce_size(node: Node) -> None:
    v = node.srcs[0][1]
    n = prod(v.shape)
    if n > MAX_REDUCE_ELEMENTS:
        raise ValueError(f"{node.op.name.lower()} over a tensor of shape {tuple(v.shape)} reads {n} elements; "
                         f"generated kernels index with 32-bit integers, so a reduction reads at most "
                         f"{MAX_REDUCE_ELEMENTS} (reduce in parts, e.g. x.reshape(k, -1).sum(1).sum())")


def _check_fits(shape: tuple, d: dt.DType, what: str = "result") -> None:
    """A kernel binds a whole tensor: refuse one over the device's storage-binding limit."""
    if d.is_quant:
        return
    n = d.nbytes(prod(shape))
    dev = runtime._DEVICE or runtime.get_device()
    lim = dev.max_binding_size
    if n > lim:
        raise ValueError(f"{what}: a {d.name} tensor of shape {tuple(shape)} needs {n} bytes, over this device's "
                         f"max_storage_buffer_binding_size of {lim} bytes")


def _host_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 40


def _check_alloc(shape: tuple, d: dt.DType, what: str, host_itemsize: int = 8) -> None:
    """Before a creation function builds its host array (arange, rand, randn): the tensor must
    fit the device (`_check_fits`) and the host array (`host_itemsize` bytes per element, NumPy's
    int64/float64 intermediates) at most half of this machine's memory, so a typo like
    tg.arange(1 << 31) is an error at the call instead of an OOM kill."""
    _check_fits(shape, d, what)
    n = prod(shape) * host_itemsize
    lim = _host_memory_bytes() // 2
    if n > lim:
        raise MemoryError(f"{what}: shape {tuple(shape)} needs a {n}-byte host array, over half of this "
                          f"machine's memory ({lim} bytes)")


def _owns(view: View) -> bool:
    return 0 not in [st for s, st in zip(view.shape, view.strides) if s > 1]


def _cast_scalar(value, d: dt.DType):
    if is_symbolic(value) and d is not dt.bool_ and d is not dt.float16:
        return value     # a step variable stays one: codegen passes it as a kernel parameter
    if d is dt.bool_:
        return bool(value)
    if d.kind in ("int", "uint"):
        return int(value)
    if d is dt.float16:  # a float16 constant holds a float16 value, as NumPy's weak scalars do
        return float(np.float16(value))
    return float(value)


def _const_value(t: "Tensor") -> np.ndarray:
    """The value of a constant tensor as a 0-d NumPy array of its dtype."""
    v = static(t.node.arg)   # folded on the host: a step variable specializes the capture
    return np.asarray(v).astype(t.dtype.np_dtype) if t.dtype is not dt.bool_ else np.asarray(bool(v))


def _np_scalar(a: np.ndarray, d: dt.DType):
    a = np.asarray(a)
    return bool(a) if d is dt.bool_ else int(a) if d.kind in ("int", "uint") else float(a)


def _fold(fn, rd: dt.DType, *consts: "Tensor"):
    """Evaluate an op over constant operands with NumPy (wrapping ints, IEEE floats)."""
    import warnings
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vals = [_const_value(c) for c in consts]
        if rd.is_float:  # GPU math on floats is f32 (f16 widened on load)
            vals = [v.astype(np.float32) if v.dtype == np.float16 else v for v in vals]
        r = np.asarray(fn(*vals)).astype(rd.np_dtype)
    return _cast_scalar(_np_scalar(r, rd), rd)


def _as_operand(x, like: dt.DType) -> Tensor:
    """Tensors pass through; Python scalars become weakly-typed constants (NumPy 2 rules)."""
    if isinstance(x, Tensor):
        return x
    if isinstance(x, (bool, np.bool_)):
        return Tensor.const(bool(x), dt.bool_)
    if isinstance(x, (numbers.Integral,)):
        d = like if like.kind in ("int", "uint", "float") else dt.int32
        if like.kind == "uint" and x < 0:
            d = dt.int32
        lo, hi = (0, 2**32) if d is dt.uint32 else (-2**31, 2**31)
        if d.kind in ("int", "uint") and not lo <= x < hi:
            raise OverflowError(f"Python integer {x} out of bounds for {d.name} (operand of a {like.name} tensor)")
        return Tensor.const(_cast_scalar(x if is_symbolic(x) else int(x), d), d)
    if isinstance(x, numbers.Real):
        d = like if like.is_float else dt.float32
        return Tensor.const(_cast_scalar(float(x), d), d)
    if isinstance(x, (np.ndarray, list, tuple)):
        return tensor(x)
    raise TypeError(f"unsupported operand of type {type(x).__name__}")


# ---------------------------------------------------------------------- module functions


def tensor(data, dtype=None) -> Tensor:
    """A tensor of `data`: a Tensor (returned as is, or converted to `dtype`), a NumPy array,
    nested lists or a scalar. Without `dtype`: floats become float32, ints int32, bools bool;
    NumPy float64 / int64 arrays are stored as float32 / int32 (dtypes.from_numpy; a one-time
    warning when that changes values). Python integers must fit int32 (an OutOfRangeError, a
    ValueError, says how to store them otherwise). An explicit `dtype` must be one tensorgpu
    holds: float32, float16, int32, uint32, bool (float64, int64, int8 ... are a TypeError)."""
    if isinstance(data, Tensor):
        return data.astype(dtype) if dtype is not None else data
    d = dt.as_dtype(dtype) if dtype is not None else None      # refuse an unsupported dtype first
    if isinstance(data, (bool, np.bool_)):
        a = np.array(data)
    elif is_symbolic(data):
        # a step variable: computed on the GPU from a kernel parameter, so a capture replays it
        d = d if d is not None else dt.int32
        return Tensor.const(_cast_scalar(data, d), d).contiguous()
    elif isinstance(data, np.ndarray) or isinstance(data, np.generic):
        a = np.asarray(data)
    else:
        a = _python_data(data, d)
        if d is None and a.dtype == np.float64:
            a = a.astype(np.float32)
    return Tensor.from_numpy(a, d)


def _python_data(data, d) -> np.ndarray:
    """Python scalars / nested sequences as a NumPy array; integers that do not fit int32 (or
    the requested integer dtype) are refused with a message saying what to do instead."""
    if isinstance(data, numbers.Integral) and d is None and -2**31 <= data < 2**31:
        return np.array(data, np.int32)
    if isinstance(data, numbers.Real) and not isinstance(data, numbers.Integral) and d is None:
        return np.array(data, np.float32)
    try:
        a = np.asarray(data)
    except OverflowError:
        a = np.asarray(data, dtype=object)
    big = None
    if a.dtype == object:
        ints = [x for x in a.reshape(-1) if isinstance(x, numbers.Integral) and not isinstance(x, bool)]
        if ints and len(ints) == a.size:
            big = max(ints, key=abs)
        elif ints and all(isinstance(x, numbers.Real) for x in a.reshape(-1)):
            a = a.astype(np.float64)       # floats and huge ints: a float array
    elif a.dtype.kind in "iu" and a.size and (d is None or d.kind in ("int", "uint")):
        lo, hi = (0, 2**32 - 1) if d is dt.uint32 else (-2**31, 2**31 - 1)
        if a.min() < lo or a.max() > hi:
            big = int(a.max()) if a.max() > hi else int(a.min())
    if big is not None:
        if d is not None and d.is_float:
            return np.asarray(data, dtype=np.float64)
        name = d.name if d is not None else "int32"
        lo, hi = (0, 2**32 - 1) if d is dt.uint32 else (-2**31, 2**31 - 1)
        raise dt.OutOfRangeError(
            f"tg.tensor: the integer {big} does not fit {name} ({lo}..{hi}), "
            f"{'the type asked for' if d is not None else 'the type tensorgpu stores Python integers in'}; "
            "pass dtype=tg.float32 to store such values as floats"
            + ("" if d is not None or big < 0 or big > 2**32 - 1 else ", or dtype=tg.uint32 for 2**31..2**32-1"))
    return a


def _shape_arg(shape) -> tuple:
    if isinstance(shape, (int, np.integer)):
        shape = (int(shape),)
    bad = [s for s in shape if not isinstance(s, (int, np.integer)) or isinstance(s, bool)]
    if bad:
        raise TypeError(f"dimensions must be ints, got {bad[0]!r} in shape {tuple(shape)!r}")
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"negative dimensions are not allowed: {shape}")
    return shape


def full(shape, value, dtype=None) -> Tensor:
    """A tensor of `shape` filled with `value` (dtype from the value: bool, int32 or float32,
    unless given). Lazy and free: a constant read by whatever uses it, no buffer."""
    shape = _shape_arg(shape)
    d = dt.as_dtype(dtype) if dtype is not None else (dt.bool_ if isinstance(value, bool) else dt.int32 if isinstance(value, int) else dt.float32)
    if d.is_quant:
        raise TypeError(f"cannot create a {d} tensor with full()")
    if d.kind in ("int", "uint") and not isinstance(value, bool):
        lo, hi = (0, 2**32) if d is dt.uint32 else (-2**31, 2**31)
        if isinstance(value, numbers.Integral) and not lo <= value < hi:
            raise OverflowError(f"full(): fill value {value} out of bounds for {d.name}")
    return Tensor.const(_cast_scalar(value, d), d, shape)


def _shape_and_dtype(args: tuple, dtype, what: str) -> tuple:
    """zeros(2, 3), zeros((2, 3)), zeros((2, 3), tg.float16) and zeros(2, 3, dtype=...): dims as
    varargs or one sequence; a second positional argument that is not an int is the dtype."""
    if len(args) == 2 and not isinstance(args[1], (int, np.integer)) and not isinstance(args[1], float):
        return _shape_arg(args[0]), args[1]
    return _dims(args, what), dtype


def zeros(*shape, dtype=dt.float32) -> Tensor:
    """tg.zeros(2, 3), tg.zeros((2, 3)) or tg.zeros((2, 3), tg.float16)."""
    shape, dtype = _shape_and_dtype(shape, dtype, "zeros")
    return full(shape, 0, dtype)


def ones(*shape, dtype=dt.float32) -> Tensor:
    """tg.ones(2, 3), tg.ones((2, 3)) or tg.ones((2, 3), tg.float16): a constant of ones."""
    shape, dtype = _shape_and_dtype(shape, dtype, "ones")
    return full(shape, 1, dtype)


def empty(*shape, dtype=dt.float32) -> Tensor:
    """An uninitialised realized tensor (e.g. a KV cache to be written with t[...] = v)."""
    shape, dtype = _shape_and_dtype(shape, dtype, "empty")
    d = dt.as_dtype(dtype)
    _check_fits(shape, d, "tg.empty")
    buf = runtime.Buffer(max(d.nbytes(prod(shape)), 4))
    return Tensor(buffer_node(buf, shape, d))


def zeros_like(t: Tensor, dtype=None) -> Tensor:
    """Zeros of t's shape (and dtype, unless given)."""
    return zeros(t.shape, dtype or t.dtype)


def ones_like(t: Tensor, dtype=None) -> Tensor:
    """Ones of t's shape (and dtype, unless given)."""
    return ones(t.shape, dtype or t.dtype)


# Tensors made by arange with step 1 and an integer start: the rewrite rules check that rope
# positions are the rows a cache write goes to (tensor node -> start)
_ARANGES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def arange_start(node: Node, view: View):
    """The start of an int arange(start, start + n) read whole through `view`, or None."""
    start = _ARANGES.get(node)
    return start if start is not None and view.is_identity(node.shape) else None


def arange(start, stop=None, step=1, dtype=None) -> Tensor:
    """NumPy's arange: int32 for int arguments, float32 otherwise. Under tg.capture, a step
    variable start (arange(pos, pos + T)) stays a runtime value of the captured step."""
    t = _arange(start, stop, step, dtype)
    s = 0 if stop is None else start
    if step == 1 and isinstance(s, (int, np.integer)) and t.dtype is dt.int32 and t.view.is_identity(t.node.shape):
        _ARANGES[t.node] = s
    return t


def _arange(start, stop=None, step=1, dtype=None) -> Tensor:
    if stop is None:
        start, stop = 0, start
    if step == 0:
        raise ValueError("arange step must not be zero")
    if any(is_symbolic(x) for x in (start, stop, step)):
        # arange(pos, pos + T): T values uploaded once, plus `start` as a kernel parameter, so a
        # captured step replays it for every position (T itself must not depend on the variable)
        n = static(stop - start) if step == 1 else static(-(-(stop - start) // static(step)))
        base = Tensor.from_numpy(np.arange(0, n * static(step), static(step)), dtype or dt.int32)
        return (base + start).astype(dtype or dt.int32) if n > 0 else base
    for name, x in (("start", start), ("stop", stop), ("step", step)):
        if not isinstance(x, numbers.Real) or isinstance(x, bool) or not np.isfinite(x):
            raise TypeError(f"arange(): {name} must be a finite int or float, got {x!r}")
    n = max(int(np.ceil((stop - start) / step)), 0)
    d0 = dt.as_dtype(dtype) if dtype is not None else (
        dt.int32 if all(isinstance(x, numbers.Integral) for x in (start, stop, step)) else dt.float32)
    _check_alloc((n,), d0, f"arange({start}, {stop}, {step})")
    a = np.arange(start, stop, step)
    if dtype is None:
        dtype = dt.int32 if a.dtype.kind in "iu" else dt.float32
    return Tensor.from_numpy(a, dtype)


def _dims(args: tuple, what: str) -> tuple:
    """Dimensions given as varargs (NumPy's random.randn(2, 3), torch.zeros(2, 3)) or as one
    sequence (tg.zeros((2, 3)))."""
    if len(args) == 1 and not isinstance(args[0], (int, np.integer)):
        return _shape_arg(args[0])
    for a in args:
        if not isinstance(a, (int, np.integer)) or isinstance(a, bool):
            raise TypeError(f"{what}: dimensions must be ints, got {a!r} in {args!r} (the seed and dtype are "
                            "keyword arguments: seed=..., dtype=...)")
    return _shape_arg(args)


def rand(*shape, seed: Optional[int] = None, dtype=dt.float32) -> Tensor:
    """Uniform [0, 1) numbers from NumPy's PCG64 (reproducible for a given seed):
    tg.rand(2, 3) or tg.rand((2, 3)); seed and dtype are keyword-only."""
    shape = _dims(shape, "rand")
    _check_alloc(shape, dt.as_dtype(dtype), "rand", 4)
    return Tensor.from_numpy(np.random.default_rng(seed).random(shape, dtype=np.float32), dtype)


def randn(*shape, seed: Optional[int] = None, dtype=dt.float32) -> Tensor:
    """Standard normal numbers: tg.randn(32, 16) or tg.randn((32, 16)); seed and dtype keyword-only."""
    shape = _dims(shape, "randn")
    _check_alloc(shape, dt.as_dtype(dtype), "randn", 4)
    return Tensor.from_numpy(np.random.default_rng(seed).standard_normal(shape, dtype=np.float32), dtype)


def where(cond, a, b) -> Tensor:
    """NumPy's where(cond, a, b): elementwise choice with broadcasting; a non-bool cond means
    cond != 0. Fused like any elementwise op."""
    c = cond if isinstance(cond, Tensor) else tensor(cond)
    if c.dtype is not dt.bool_:
        c = c != 0
    if isinstance(a, Tensor):
        like = a.dtype
    elif isinstance(b, Tensor):
        like = b.dtype
    else:
        like = dt.float32 if isinstance(a, float) or isinstance(b, float) else dt.int32
    ta, tb = _as_operand(a, like), _as_operand(b, like)
    ta._check_plain("where"); tb._check_plain("where")
    shape = broadcast_shapes(c.shape, ta.shape, tb.shape, what="where")
    d = dt.result_type(ta.dtype, tb.dtype)
    ta, tb = ta.astype(d), tb.astype(d)
    if c.node.op is Op.CONST and ta.node.op is Op.CONST and tb.node.op is Op.CONST:
        return Tensor.const(_fold(np.where, d, c, ta, tb), d, shape)
    return Tensor(Node(Op.WHERE, ((c.node, c.view.expand(shape)), (ta.node, ta.view.expand(shape)),
                                  (tb.node, tb.view.expand(shape))), d, shape))


def sort(a, axis: int = -1, kind=None, descending: bool = False) -> Tensor:
    """NumPy's sort: a sorted copy along `axis` (stable; NaN last; descending=True reverses the
    order with NaN first), the gather of `argsort`'s positions. axis=None sorts the flattened
    tensor."""
    t = a if isinstance(a, Tensor) else tensor(a)
    if axis is None:
        t, axis = t.reshape(-1), 0
    from .indexing import take_along_axis
    return take_along_axis(t, t.argsort(axis, kind, descending), axis)


def argsort(a, axis: int = -1, kind=None, descending: bool = False) -> Tensor:
    """NumPy's argsort (see Tensor.argsort); axis=None sorts the flattened tensor."""
    t = a if isinstance(a, Tensor) else tensor(a)
    if axis is None:
        t, axis = t.reshape(-1), 0
    return t.argsort(axis, kind, descending)


def topk(a, k: int, axis: int = -1, largest: bool = True, sorted: bool = True) -> tuple:  # noqa: A002
    """(values, indices) of the k largest (or smallest) along `axis` (see Tensor.topk)."""
    t = a if isinstance(a, Tensor) else tensor(a)
    return t.topk(k, axis, largest, sorted)


def cumsum(a, axis=None) -> Tensor:
    """NumPy's cumsum (see Tensor.cumsum)."""
    t = a if isinstance(a, Tensor) else tensor(a)
    return t.cumsum(axis)


def dot(a, b) -> Tensor:
    """NumPy's dot: a scalar times a tensor for 0-d operands; the inner product of 1-d ones;
    matmul for 2-d (and for an N-d a with a 1-d or 2-d b); for an N-d b, a sum over a's last
    axis and b's second-to-last: shape a.shape[:-1] + b.shape[:-2] + b.shape[-1:]. Integer and
    bool operands give exact int32 sums (a fused multiply-and-reduce); float operands go through
    matmul (float32 result, f32 accumulation)."""
    a = a if isinstance(a, Tensor) else tensor(a)
    b = b if isinstance(b, Tensor) else tensor(b)
    if a.ndim == 0 or b.ndim == 0:
        return a * b
    K = a.shape[-1]
    kb = b.shape[0] if b.ndim == 1 else b.shape[-2]
    if K != kb:
        raise ValueError(f"dot: shapes {a.shape} and {b.shape} not aligned: {K} (dim {a.ndim - 1}) != {kb} "
                         f"(dim {max(b.ndim - 2, 0)})")
    if not a.dtype.is_float and not b.dtype.is_float and not a.dtype.is_quant and not b.dtype.is_quant:
        ia = a.astype(dt.int32) if a.dtype is dt.bool_ else a
        ib = b.astype(dt.int32) if b.dtype is dt.bool_ else b
        if b.ndim == 1:
            return (ia * ib).sum(-1)
        bm = ib.moveaxis(-2, 0)                                   # [K, *b_lead, N]
        a_ = ia.reshape(ia.shape + (1,) * (bm.ndim - 1))           # [*a_lead, K, 1.., 1]
        return (a_ * bm).sum(a.ndim - 1)
    if b.ndim <= 2:
        return matmul(a, b)
    bm = b.moveaxis(-2, 0)
    out = matmul(a, bm.reshape(K, -1))
    return out.reshape(a.shape[:-1] + b.shape[:-2] + b.shape[-1:])


def concatenate(tensors: Sequence, axis=0) -> Tensor:
    """NumPy's concatenate: `cat` under NumPy's name; axis=None joins the flattened tensors."""
    if axis is None:
        return cat([(t if isinstance(t, Tensor) else tensor(t)).reshape(-1) for t in tensors], 0)
    return cat(tensors, axis)


def expand_dims(a, axis) -> Tensor:
    """NumPy's expand_dims: size-1 axes inserted at `axis` (an int or a tuple, positions in the
    result), a view."""
    t = a if isinstance(a, Tensor) else tensor(a)
    axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
    nd = t.ndim + len(axes)
    norm = sorted(_norm_axis(x, nd) for x in axes)
    if len(set(norm)) != len(norm):
        raise ValueError(f"expand_dims: repeated axis in {axis}")
    for x in norm:
        t = t.unsqueeze(x)
    return t


def linspace(start, stop, num: int = 50, endpoint: bool = True, retstep: bool = False, dtype=None, axis: int = 0):
    """NumPy's linspace, computed on the host in float64 and stored as float32 (or `dtype`)."""
    d = dt.as_dtype(dtype) if dtype is not None else dt.float32
    if not isinstance(num, (int, np.integer)) or isinstance(num, bool) or num < 0:
        raise ValueError(f"linspace: num must be a non-negative int, got {num!r}")
    host, step = np.linspace(np.asarray(start, np.float64), np.asarray(stop, np.float64), int(num), endpoint=endpoint,
                             retstep=True, axis=axis)
    if d.kind in ("int", "uint"):
        host = np.floor(host)            # NumPy's linspace(..., dtype=int) floors
    t = tensor(host.astype(d.np_dtype) if d is not dt.bool_ else host.astype(bool), d)
    return (t, float(step)) if retstep else t


def eye(N: int, M: Optional[int] = None, k: int = 0, dtype=dt.float32) -> Tensor:
    """NumPy's eye: ones on diagonal k of an N x M matrix (lazy: computed where it is read,
    only the row and column numbers are uploaded)."""
    M = N if M is None else M
    for name, v in (("N", N), ("M", M), ("k", k)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
            raise TypeError(f"eye: {name} must be an int, got {v!r}")
    if N < 0 or M < 0:
        raise ValueError(f"eye: negative dimensions are not allowed: N={N}, M={M}")
    d = dt.as_dtype(dtype)
    if N == 0 or M == 0:
        return zeros((N, M), dtype=d)
    return (arange(N).reshape(N, 1) + int(k) == arange(M).reshape(1, M)).astype(d)


def maximum(a, b) -> Tensor:
    """Elementwise maximum with broadcasting (NaN propagates, as NumPy's maximum)."""
    return (a if isinstance(a, Tensor) else _as_operand(a, b.dtype))._binary(Op.MAX, b)


def minimum(a, b) -> Tensor:
    """Elementwise minimum with broadcasting (NaN propagates, as NumPy's minimum)."""
    return (a if isinstance(a, Tensor) else _as_operand(a, b.dtype))._binary(Op.MIN, b)


def cat(tensors: Sequence[Tensor], axis: int = 0) -> Tensor:
    """Join tensors along an existing axis (torch.cat; tg.concatenate is NumPy's name). Lazy:
    a reader of the result reads each piece where it lies, no copy is made first."""
    tensors = [t if isinstance(t, Tensor) else tensor(t) for t in tensors]
    if not tensors:
        raise ValueError("cat needs at least one tensor")
    nd = tensors[0].ndim
    if nd == 0:
        raise ValueError("zero-dimensional tensors cannot be concatenated")
    ax = _norm_axis(axis, nd)
    for t in tensors:
        if t.ndim != nd or any(s != s0 for i, (s, s0) in enumerate(zip(t.shape, tensors[0].shape)) if i != ax):
            raise ValueError(f"cat along axis {ax}: shapes {[t.shape for t in tensors]} differ outside that axis")
    d = tensors[0].dtype
    for t in tensors[1:]:
        d = dt.result_type(d, t.dtype)
    tensors = [t.astype(d) for t in tensors]
    shape = list(tensors[0].shape)
    shape[ax] = sum(t.shape[ax] for t in tensors)
    srcs = tuple((t.node, t.view) for t in tensors if t.shape[ax] > 0) or ((tensors[0].node, tensors[0].view),)
    return Tensor(Node(Op.CAT, srcs, d, tuple(shape), arg=ax))


def stack(tensors: Sequence[Tensor], axis: int = 0) -> Tensor:
    """Join equally shaped tensors along a new axis (NumPy's stack)."""
    tensors = [t if isinstance(t, Tensor) else tensor(t) for t in tensors]
    if not tensors:
        raise ValueError("stack needs at least one tensor")
    s0 = tensors[0].shape
    for t in tensors:
        if t.shape != s0:
            raise ValueError(f"stack needs equal shapes, got {[t.shape for t in tensors]}")
    ax = axis % (len(s0) + 1) if -(len(s0) + 1) <= axis <= len(s0) else None
    if ax is None:
        raise ValueError(f"stack axis {axis} out of range for {len(s0)}-d tensors")
    return cat([t.unsqueeze(ax) for t in tensors], ax)


def matmul(a: Tensor, b: Tensor) -> Tensor:
    """NumPy's matmul (a @ b): batched with broadcast batch dims, 1-d operands promoted;
    float32 result with f32 accumulation; quantized weights as `x @ w.T`."""
    from .customops import matmul as _mm
    return _mm(a, b)


# ---------------------------------------------------------------------- method docstrings
# The one-line methods above (operators, elementwise math, views) are documented here, in one
# table, rather than each inside its one-liner.
_UNARY_DOC = "Elementwise {} (NumPy's np.{}); int and bool tensors are computed in float32."
_METHOD_DOCS = {
    "__add__": "a + b, elementwise with broadcasting; Python scalars are weakly typed (NumPy 2 promotion).",
    "__radd__": "b + a (a Python scalar or array on the left).",
    "__sub__": "a - b, elementwise with broadcasting.",
    "__rsub__": "b - a (a Python scalar or array on the left).",
    "__mul__": "a * b, elementwise with broadcasting.",
    "__rmul__": "b * a (a Python scalar or array on the left).",
    "__truediv__": "a / b: true division (integers give float32).",
    "__rtruediv__": "b / a (a Python scalar or array on the left).",
    "__pow__": "a ** b (integer powers of integers stay integer, as NumPy).",
    "__rpow__": "b ** a (a Python scalar or array on the left).",
    "__floordiv__": "a // b: NumPy's floor division (rounds toward -inf for negatives; integer division by zero gives 0).",
    "__rfloordiv__": "b // a (a Python scalar or array on the left).",
    "__mod__": "a % b: NumPy's remainder (the sign of b).",
    "__rmod__": "b % a (a Python scalar or array on the left).",
    "__lt__": "a < b, elementwise (a bool tensor).",
    "__le__": "a <= b, elementwise (a bool tensor).",
    "__gt__": "a > b, elementwise (a bool tensor).",
    "__ge__": "a >= b, elementwise (a bool tensor).",
    "__eq__": "a == b, elementwise (a bool tensor, as NumPy; not an identity test).",
    "__ne__": "a != b, elementwise (a bool tensor; NaN != NaN).",
    "__and__": "a & b: logical and of bool tensors.",
    "__or__": "a | b: logical or of bool tensors.",
    "__invert__": "~a: logical not of a bool tensor.",
    "__neg__": "-a (wraps for uint32, as NumPy).",
    "__pos__": "+a: the tensor itself.",
    "__abs__": "abs(a), elementwise.",
    "__matmul__": "a @ b: NumPy's matmul (see tg.matmul).",
    "__rmatmul__": "b @ a (an array on the left).",
    "__len__": "The length of the first axis (a TypeError for a 0-d tensor).",
    "__iter__": "Iterate over the first axis (views, no copies).",
    "__del__": "Release this wrapper's hold on its node (its buffer goes back to the pool when unused).",
    "abs": "Elementwise absolute value (np.abs).",
    "exp": _UNARY_DOC.format("e**x", "exp"),
    "log": _UNARY_DOC.format("natural logarithm", "log"),
    "sqrt": _UNARY_DOC.format("square root", "sqrt"),
    "rsqrt": "Elementwise 1 / sqrt(x); int and bool tensors are computed in float32.",
    "sin": _UNARY_DOC.format("sine", "sin"),
    "cos": _UNARY_DOC.format("cosine", "cos"),
    "tanh": _UNARY_DOC.format("hyperbolic tangent", "tanh"),
    "erf": "Elementwise error function (scipy.special.erf); computed in float32.",
    "sigmoid": "Elementwise 1 / (1 + exp(-x)); computed in float32.",
    "relu": "Elementwise max(x, 0).",
    "silu": "Elementwise x * sigmoid(x) (SiLU / swish); computed in float32.",
    "reciprocal": "Elementwise 1 / x (np.reciprocal for floats); integers give float32.",
    "floor": "Elementwise floor (np.floor); integer tensors are returned as they are.",
    "ceil": "Elementwise ceiling (np.ceil); integer tensors are returned as they are.",
    "gelu": "GELU: x * Phi(x) with erf, or approximate='tanh' for the tanh form.",
    "maximum": "Elementwise maximum with another tensor or scalar (NaN propagates).",
    "minimum": "Elementwise minimum with another tensor or scalar (NaN propagates).",
    "clip": "NumPy's clip: values limited to [min, max] (either may be None).",
    "sum": "Sum over `axis` (None: all; int or tuple), NumPy's sum; float16 sums in float32, bool as int32.",
    "max": "Maximum over `axis` (None: all), NumPy's max; NaN propagates.",
    "min": "Minimum over `axis` (None: all), NumPy's min; NaN propagates.",
    "mean": "Mean over `axis` (None: all), NumPy's mean (integers give float32; empty gives NaN).",
    "var": "Variance over `axis` with `ddof` (NumPy's var), two-pass: sum((x - mean)**2) / (n - ddof).",
    "std": "Standard deviation over `axis` with `ddof` (NumPy's std).",
    "argmax": "Index (int32) of the maximum along `axis` (None: the flattened tensor); the first NaN wins.",
    "argmin": "Index (int32) of the minimum along `axis` (None: the flattened tensor); the first NaN wins.",
    "logsumexp": "log(sum(exp(x))) along `axis`, stable (the maximum is subtracted first).",
    "softmax": "Softmax along `axis` (a one-pass row kernel for the last axis).",
    "log_softmax": "log(softmax(x)) along `axis`, stable.",
    "reshape": "NumPy's reshape (one -1 allowed): a view when strides allow, else a visible contiguous copy.",
    "view_as": "reshape to another tensor's shape.",
    "flatten": "torch's flatten: axes start_dim..end_dim merged into one (a view when strides allow).",
    "permute": "The axes in a new order (a view); NumPy's transpose(axes).",
    "expand": "Broadcast to a larger shape (-1 keeps a dimension): a view with stride 0, no copy.",
    "broadcast_to": "NumPy's broadcast_to: a view with stride 0 along the broadcast axes.",
    "squeeze": "Remove axes of length 1 (all of them, or those in `axis`): a view.",
    "unsqueeze": "Insert an axis of length 1 at `axis`: a view (NumPy: expand_dims).",
    "split": "torch's split: pieces of a given size (or a list of sizes) along `axis`, as views.",
    "chunk": "torch's chunk: `chunks` nearly equal views along `axis`.",
    "numpy": "The values as a NumPy array (computes the tensor; quantized types are dequantized).",
    "item": "The value of a one-element tensor as a Python scalar.",
    "tolist": "The values as nested Python lists (NumPy's tolist).",
    "astype": "A converted copy (lazy): floats to ints truncate toward zero, NaN to bool is True; the same dtype is returned as is.",
    "const": "A constant tensor of `value` (no buffer: it is a literal or parameter of the kernels reading it).",
}
_PROPERTY_DOCS = {
    "shape": "The tensor's dimensions, a tuple of ints.",
    "ndim": "The number of dimensions.",
    "size": "The number of elements.",
    "numel": "The number of elements (torch's name).",
    "dtype": "The element type (tg.float32, tg.float16, tg.int32, tg.uint32, tg.bool, or a GGML block type).",
    "strides": "Strides of the view in elements (not bytes, unlike NumPy).",
    "T": "The axes reversed (a view), NumPy's .T.",
    "is_realized": "Whether the value is computed (held in a buffer) or a constant.",
}
for _name, _doc in _METHOD_DOCS.items():
    _f = Tensor.__dict__[_name]
    (_f.__func__ if isinstance(_f, staticmethod) else _f).__doc__ = _doc
for _name, _doc in _PROPERTY_DOCS.items():
    _p = Tensor.__dict__[_name]
    setattr(Tensor, _name, property(_p.fget, _p.fset, _p.fdel, _doc))
del _name, _doc, _f, _p
