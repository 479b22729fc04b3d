"""Indexing with integer tensors: gather (`tg.take_along_axis`) and scatter
(`tg.put_along_axis`), NumPy's semantics.

A gather is an `Op.GATHER` node: rendered inline like an elementwise op (codegen.render_gather),
so `take_along_axis(x, i, 1) * 2` is one kernel and only the gathered elements of an inlined
source are computed. A scatter is an `Op.SCATTER` node: a lazy in-place write like `t[...] = v`
(schedule.assign), ordered with every other read and write of the buffer by creation order,
run as one kernel over the written elements only (never a copy of the target).

Index values: negative values count from the end of the axis (NumPy). Indices known on the
host (NumPy arrays, lists, tensors made with tg.tensor, whose range is remembered at upload)
are checked at the call: an IndexError as NumPy raises. Indices computed on the GPU are not
read back to be checked: an out-of-range index reads 0 (gather) and writes nothing (scatter).

Duplicate indices in a scatter: every written element receives one of the values aimed at it,
whole (float16 neighbours packed in one 32-bit word are written with a compare-and-swap, so no
write tears another); *which* one is unspecified, since GPU threads race. NumPy's
last-write-wins is not guaranteed.
"""
from __future__ import annotations

from math import prod

import numpy as np

from . import dtypes as dt
from .graph import HOST_RANGE, Node, ScatterArg
from .ops import Op
from .tensor import Tensor, _as_operand, _norm_axis, broadcast_shapes, tensor
from .view import View


def as_index(idx, what: str) -> Tensor:
    """An integer index as an int32/uint32 Tensor. Host data (arrays, lists) is uploaded (and
    its range remembered, so the call checks it); a bool array is refused here (callers that
    take masks handle them first)."""
    if isinstance(idx, Tensor):
        if idx.dtype not in (dt.int32, dt.uint32):
            raise IndexError(f"{what}: index tensors must be of integer type (int32 or uint32), got "
                             f"{idx.dtype.name} of shape {idx.shape}")
        return idx
    a = np.asarray(idx)
    if a.size == 0 and a.dtype.kind == "f":   # [] is an empty index list, as in NumPy
        a = a.astype(np.int32)
    if a.dtype.kind not in "iu":
        raise IndexError(f"{what}: arrays used as indices must be of integer type, got {a.dtype} of shape {a.shape}")
    if a.size and (a.min() < -2**31 or a.max() > 2**31 - 1):
        bad = a.max() if a.max() > 2**31 - 1 else a.min()
        raise IndexError(f"{what}: index {bad} is out of bounds (indices are int32 on the GPU)")
    return tensor(a.astype(np.int32))


def _covers_all(view: View, node: Node) -> bool:
    """Whether `view` reads every element of `node` (so the node's host range is the view's)."""
    lo, hi = view.span()
    distinct = prod(s for s, st in zip(view.shape, view.strides) if st != 0 or s == 0)
    return view.numel > 0 and distinct == node.numel and lo == 0 and hi == node.numel - 1


def check_range(idx: Tensor, n: int, axis: int, shape: tuple, what: str) -> None:
    """IndexError at the call when idx's values are known on the host and some lie outside
    [-n, n) (NumPy's message). Values computed on the GPU are not checked (see the module doc)."""
    rng = HOST_RANGE.get(idx.node)
    if rng is None or idx.size == 0:
        return
    lo, hi = rng
    if lo >= -n and hi < n:
        return
    if _covers_all(idx.view, idx.node):
        bad = hi if hi >= n else lo
        raise IndexError(f"{what}: index {bad} is out of bounds for axis {axis} with size {n} (shape {shape})")


def along_shape(a_shape: tuple, idx_shape: tuple, axis: int, what: str) -> tuple:
    """The result shape of NumPy's take/put_along_axis: the index broadcast against the other
    axes of `a` (the axis itself takes the index's length)."""
    if len(idx_shape) != len(a_shape):
        raise ValueError(f"{what}: `indices` {idx_shape} and `arr` {a_shape} must have the same number of dimensions")
    other = tuple(1 if d == axis else s for d, s in enumerate(a_shape))
    return broadcast_shapes(idx_shape, other, what=f"{what}: indices {idx_shape} against the array {a_shape}")


def gather(a: Tensor, idx: Tensor, axis: int) -> Tensor:
    """a read with coordinate `axis` taken from idx (already of the result's shape and ndim)."""
    return Tensor(Node(Op.GATHER, ((a.node, a.view), (idx.node, idx.view)), a.dtype, idx.shape, arg=axis))


def take_along_axis(arr, indices, axis=-1) -> Tensor:
    """NumPy's take_along_axis: out[..., j, ...] = arr[..., indices[..., j, ...], ...] along
    `axis` (None: arr flattened, indices 1-d). `indices` (int tensor, array or list) has arr's
    number of dimensions and broadcasts against arr's other axes. Lazy: a gather that fuses
    with what reads it. Typical use: the values of an argsort or top-k."""
    a = arr if isinstance(arr, Tensor) else tensor(arr)
    a._check_plain("take_along_axis")
    idx = as_index(indices, "take_along_axis")
    if axis is None:
        if idx.ndim != 1:
            raise ValueError(f"take_along_axis: with axis=None, indices must be 1-d, got shape {idx.shape}")
        a = a.reshape(-1)
        axis = 0
    ax = _norm_axis(axis, a.ndim)
    shape = along_shape(a.shape, idx.shape, ax, "take_along_axis")
    check_range(idx, a.shape[ax], ax, a.shape, "take_along_axis")
    if a.shape[ax] == 0 and prod(shape):
        raise IndexError(f"take_along_axis: cannot take from an empty axis {ax} of shape {a.shape}")
    return gather(a, idx.expand(shape), ax)


def put_along_axis(arr: Tensor, indices, values, axis) -> None:
    """NumPy's put_along_axis, in place and lazily: arr[..., indices[..., j, ...], ...] =
    values[..., j, ...] along `axis` (None: arr flattened, indices 1-d). `indices` has arr's
    number of dimensions and broadcasts against arr's other axes; values broadcast to that
    shape. `arr` may be a view (a leading slice of a realized cache): only the elements named
    are written, in one kernel, ordered with every other read and write of that memory like
    `arr[...] = v`. A batched KV-cache write, one row per sequence at its own position:
    `tg.put_along_axis(k_cache[:B], pos[:, None, None, None], k[:, :, None, :], axis=2)`.
    Duplicate indices: one of the values lands, which one is unspecified (module docstring)."""
    if not isinstance(arr, Tensor):
        raise TypeError(f"put_along_axis writes into a tensor in place; got {type(arr).__name__} "
                        "(use np.put_along_axis for NumPy arrays)")
    arr._check_plain("put_along_axis")
    idx = as_index(indices, "put_along_axis")
    a = arr
    if axis is None:
        if idx.ndim != 1:
            raise ValueError(f"put_along_axis: with axis=None, indices must be 1-d, got shape {idx.shape}")
        if not arr._must_copy_to_write() and arr.view.reshape((arr.size,)) is None:
            raise ValueError(f"put_along_axis with axis=None needs arr {arr.shape} to flatten without a copy "
                             f"(strides {arr.strides}); flatten it first or give an axis")
        axis = 0
        flat = True
    else:
        flat = False
    ax = _norm_axis(axis, 1 if flat else a.ndim)
    shape = along_shape((arr.size,) if flat else a.shape, idx.shape, ax, "put_along_axis")
    v = _as_operand(values, arr.dtype)
    v._check_plain("put_along_axis")
    if v.ndim > len(shape) or broadcast_shapes(shape, v.shape, what=f"put_along_axis: values {v.shape} into "
                                                                    f"indexed shape {shape}") != shape:
        raise ValueError(f"put_along_axis: could not broadcast values of shape {v.shape} into the indexed shape {shape}")
    n_axis = arr.size if flat else a.shape[ax]
    check_range(idx, n_axis, ax, arr.shape, "put_along_axis")
    arr._own_memory()
    view = arr.view.reshape((arr.size,)) if flat else arr.view
    strides = tuple(st if (view.shape[d] != 1 or d == ax) else 0 for d, st in enumerate(view.strides))
    wshape = tuple(view.shape[ax] if d == ax else s for d, s in enumerate(shape))
    target = View(wshape, strides, view.offset)
    if prod(shape) == 0:
        return
    if view.shape[ax] == 0:
        raise IndexError(f"put_along_axis: cannot put into an empty axis {ax} of shape {arr.shape}")
    from .schedule import scatter
    arr._forget_arange()
    node = scatter(arr.node, ScatterArg(target, ax), v.node, v.view.expand(shape), idx.node, idx.view.expand(shape))
    arr._adopt(Tensor(node, arr.view))
