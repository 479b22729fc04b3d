"""Indexing with integer and boolean arrays, NumPy's semantics: gather (`t[idx]`,
`tg.take_along_axis`) and scatter (`t[idx] = v`, `tg.put_along_axis`).

A gather is an `Op.GATHER` node: rendered inline like an elementwise op (codegen.render_gather),
so `take_along_axis(x, i, 1) * 2` is one kernel and only the gathered elements of an inlined
source are computed. A scatter is an `Op.SCATTER` node: a lazy in-place write like `t[...] = v`
(schedule.assign), ordered with every other read and write of the buffer by creation order,
run as one kernel over the written elements only (never a copy of the target).

Index values: negative values count from the end of the axis (NumPy). Indices known on the
host (NumPy arrays, lists, tensors made with tg.tensor, whose range is remembered at upload)
are checked at the call: an IndexError as NumPy raises. Indices computed on the GPU are not
read back to be checked: an out-of-range index reads 0 (gather) and writes nothing (scatter).

Advanced indexing (`t[idx]`, `t[idx] = v`) follows NumPy's rules: integer arrays, lists and
int tensors anywhere among slices, ints, None and an Ellipsis; several index arrays broadcast
together; the broadcast dimensions replace the indexed ones in place when the advanced indices
(integers included) are adjacent, else they come first. A boolean mask (array, list or bool
tensor) stands for the integer arrays of its nonzero positions: reading with one realizes the
mask to learn the result's shape (so not inside tg.capture); `t[mask] = scalar` needs no
readback (it is a where over t). Not supported, with an error that says so: a bool scalar
index (`t[True]`), and index arrays into quantized tensors (dequantize first).

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


def gather(src: Tensor, dims: tuple, indices: list, shape: tuple) -> Tensor:
    """src read at coordinates `dims` maps (graph.ScatterArg) from the result's coordinates and
    the values of `indices` (int Tensors already of the result's `shape`)."""
    return Tensor(Node(Op.GATHER, ((src.node, src.view),) + tuple((i.node, i.view) for i in indices), src.dtype,
                       tuple(shape), arg=tuple(dims)))


def _along_dims(nd: int, ax: int) -> tuple:
    return tuple(-1 if d == ax else d for d in range(nd))


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
    return gather(a, _along_dims(a.ndim, ax), [idx.expand(shape)], shape)


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
    flat = axis is None
    if flat:
        if idx.ndim != 1:
            raise ValueError(f"put_along_axis: with axis=None, indices must be 1-d, got shape {idx.shape}")
        if not arr._must_copy_to_write() and arr.view.reshape((arr.size,)) is None:
            raise ValueError(f"put_along_axis with axis=None needs arr {arr.shape} to flatten without a copy "
                             f"(strides {arr.strides}); flatten it first or give an axis")
        axis = 0
    a_shape = (arr.size,) if flat else arr.shape
    ax = _norm_axis(axis, len(a_shape))
    shape = along_shape(a_shape, idx.shape, ax, "put_along_axis")
    v = _value(values, arr.dtype, shape, "put_along_axis")
    check_range(idx, a_shape[ax], ax, arr.shape, "put_along_axis")
    if a_shape[ax] == 0 and prod(shape):
        raise IndexError(f"put_along_axis: cannot put into an empty axis {ax} of shape {arr.shape}")
    arr._own_memory()
    view = arr.view.reshape((arr.size,)) if flat else arr.view
    _scatter(arr, view, _along_dims(len(a_shape), ax), [idx.expand(shape)], v, shape)


def _value(values, like: dt.DType, shape: tuple, what: str) -> Tensor:
    v = _as_operand(values, like)
    v._check_plain(what)
    if v.ndim > len(shape) or broadcast_shapes(shape, v.shape, what=f"{what}: values {v.shape} into "
                                                               f"indexed shape {shape}") != shape:
        raise ValueError(f"{what}: could not broadcast values of shape {v.shape} into the indexed shape {shape}")
    return v


def _scatter(t: Tensor, view: View, dims: tuple, indices: list, v: Tensor, shape: tuple) -> None:
    """Issue the lazy write of v (broadcast to `shape`) into t's memory through `view` at the
    coordinates `dims` maps; t (which owns its memory) then stands for the written tensor."""
    if prod(shape) == 0:
        return
    from .schedule import scatter
    t._forget_arange()
    node = scatter(t.node, ScatterArg(view, tuple(dims)), v.node, v.view.expand(shape),
                   [(i.node, i.view) for i in indices])
    t._adopt(Tensor(node, t.view))


# ----------------------------------------------------------------------------- t[idx], t[idx] = v


def is_advanced(idx) -> bool:
    """Whether an index needs gather/scatter: an array, list, tuple or tensor among its items."""
    items = idx if isinstance(idx, tuple) else (idx,)
    return any(isinstance(i, (Tensor, np.ndarray, list, tuple)) for i in items)


def _mask_items(mask: np.ndarray, shape: tuple, first_axis: int) -> list:
    """A boolean mask over shape[first_axis:first_axis + mask.ndim] as NumPy's nonzero index arrays."""
    covered = shape[first_axis:first_axis + mask.ndim]
    if mask.ndim == 0:
        raise TypeError("a bool scalar index (t[True], t[False]) is not supported: use t[None] or t[:0]")
    for k, (sm, st) in enumerate(zip(mask.shape, covered)):
        if sm != st:
            raise IndexError(f"boolean index did not match indexed tensor along axis {first_axis + k}; size of axis "
                             f"is {st} but size of corresponding boolean axis is {sm} (tensor shape {shape}, mask "
                             f"shape {mask.shape})")
    if len(covered) < mask.ndim:
        raise IndexError(f"too many indices for tensor of shape {shape}: a boolean mask of shape {mask.shape} "
                         f"from axis {first_axis}")
    return [("arr", tensor(nz.astype(np.int32))) for nz in np.nonzero(mask)]


def _read_mask(m: Tensor) -> np.ndarray:
    from . import runtime
    if runtime._tracing[0]:
        raise RuntimeError(f"indexing with a bool tensor mask {m.shape} reads the mask back to learn the result's "
                           "shape, which a tg.capture'd function cannot do: use tg.where(mask, x, y) instead")
    return m.numpy()


def _parse(t: Tensor, idx) -> list:
    """The items of an index as (kind, value): "none", "slice", "int", "arr" (int Tensor), with
    the Ellipsis expanded and masks turned into index arrays; trailing dims get full slices."""
    items = list(idx) if isinstance(idx, tuple) else [idx]
    if sum(1 for i in items if i is Ellipsis) > 1:
        raise IndexError("an index can only have a single ellipsis ('...')")

    def consumed(i):
        if i is None or i is Ellipsis:
            return 0
        if isinstance(i, Tensor) and i.dtype is dt.bool_:
            return i.ndim
        if isinstance(i, (np.ndarray, list, tuple)):
            a = np.asarray(i)
            return a.ndim if a.dtype == np.bool_ else 1
        return 1

    n_real = sum(consumed(i) for i in items)
    if n_real > t.ndim:
        raise IndexError(f"too many indices for tensor of shape {t.shape}: {n_real} given")
    out: list = []
    axis = 0
    for i in items:
        if i is Ellipsis:
            out.extend(("slice", slice(None)) for _ in range(t.ndim - n_real))
            axis += t.ndim - n_real
        elif i is None:
            out.append(("none", None))
        elif isinstance(i, slice):
            out.append(("slice", i))
            axis += 1
        elif isinstance(i, (bool, np.bool_)):
            raise TypeError("a bool scalar index (t[True], t[False]) is not supported: use t[None] or t[:0]")
        elif isinstance(i, (int, np.integer)):
            out.append(("int", i))
            axis += 1
        elif isinstance(i, Tensor):
            if i.dtype is dt.bool_:
                out.extend(_mask_items(_read_mask(i), t.shape, axis))
                axis += i.ndim
            else:
                out.append(("arr", as_index(i, "index")))
                axis += 1
        elif isinstance(i, (np.ndarray, list, tuple)):
            a = np.asarray(i)
            if a.dtype == np.bool_:
                out.extend(_mask_items(a, t.shape, axis))
                axis += a.ndim
            else:
                out.append(("arr", as_index(a, "index")))
                axis += 1
        else:
            raise TypeError(f"unsupported index {i!r} of type {type(i).__name__}: ints, slices, None, ..., "
                            "integer or boolean arrays / tensors")
    out.extend(("slice", slice(None)) for _ in range(t.ndim - axis))
    return out


def _plan_index(t: Tensor, idx, items=None):
    """For an advanced index: (view of t with its slices and ints applied, the dims map of
    graph.ScatterArg, the index tensors in the result's shape, the result shape), with NumPy's
    placement of the broadcast dims (in place when the advanced indices are adjacent, else first)."""
    from .tensor import _index_int, _slice_bounds
    if t.dtype.is_quant:
        raise TypeError(f"indexing a {t.dtype} tensor {t.shape} with arrays: dequantize it first with "
                        ".astype(tg.float32)")
    items = _parse(t, idx) if items is None else items
    adv = [p for p, (k, _) in enumerate(items) if k in ("int", "arr")]
    adjacent = adv == list(range(adv[0], adv[-1] + 1))
    arrays = [x for k, x in items if k == "arr"]
    bshape = broadcast_shapes(*(a.shape for a in arrays), what="shape mismatch: indexing arrays")
    v = t.view
    axis = 0                # the next dimension of v (ints remove theirs)
    sizes: list = []        # sizes of the result's dims outside the broadcast block, in order
    src: list = []          # per dimension of v: ("basic", j) -> sizes[j], or ("arr", k)
    lead = 0                # result dims before the broadcast block
    for p, (kind, x) in enumerate(items):
        if adjacent and p == adv[0]:
            lead = len(sizes)
        if kind == "none":
            sizes.append(1)
        elif kind == "slice":
            start, stop, step = _slice_bounds(x, v.shape[axis], axis, t.shape)
            if step == 0:
                raise ValueError("slice step cannot be zero")
            v = v.slice(axis, start, stop, step)
            src.append(("basic", len(sizes)))
            sizes.append(v.shape[axis])
            axis += 1
        elif kind == "int":
            v = v.index(axis, _index_int(x, v.shape[axis], axis, t.shape))
        else:
            check_range(x, v.shape[axis], axis, t.shape, "index")
            if v.shape[axis] == 0 and prod(bshape):
                raise IndexError(f"index into the empty axis {axis} of a tensor of shape {t.shape}")
            src.append(("arr", sum(1 for q in src if q[0] == "arr")))
            axis += 1
    nb = len(bshape)
    shape = tuple(sizes[:lead]) + tuple(bshape) + tuple(sizes[lead:])
    dims = tuple((j if j < lead else j + nb) if kind == "basic" else -1 - j for kind, j in src)
    indices = []
    for a in arrays:
        ev = a.view.expand(bshape)
        iv = View(shape, (0,) * lead + ev.strides + (0,) * (len(sizes) - lead), ev.offset)
        indices.append(Tensor(a.node, iv))
    return v, dims, indices, shape


def getitem(t: Tensor, idx) -> Tensor:
    """t[idx] for an advanced index (is_advanced): a lazy gather (module docstring)."""
    v, dims, indices, shape = _plan_index(t, idx)
    return gather(Tensor(t.node, v), dims, indices, shape)


def setitem(t: Tensor, idx, value) -> None:
    """t[idx] = value for an advanced index: a lazy scatter, ordered like every in-place write."""
    t._check_plain("assignment")
    mask = idx if isinstance(idx, Tensor) and idx.dtype is dt.bool_ else None
    if mask is None and isinstance(idx, (np.ndarray, list)) and np.asarray(idx).dtype == np.bool_:
        mask = np.asarray(idx)
    if mask is not None and _scalar_like(value) and np.ndim(mask) > 0:
        _set_where(t, mask, value)
        return
    items = _parse(t, idx)            # a bad index or value is refused before the copy below
    v = _value(value, t.dtype, _plan_index(t, idx, items)[3], "assignment")
    t._own_memory()
    view, dims, indices, shape = _plan_index(t, idx, items)
    _scatter(t, view, dims, indices, v, shape)


def _scalar_like(value) -> bool:
    if isinstance(value, Tensor):
        return value.ndim == 0
    return isinstance(value, (int, float, bool, np.number, np.bool_)) or (isinstance(value, np.ndarray) and value.ndim == 0)


def _set_where(t: Tensor, mask, value) -> None:
    """t[mask] = scalar as t[...] = where(mask, scalar, t): no readback of the mask."""
    m = mask if isinstance(mask, Tensor) else tensor(np.asarray(mask))
    if m.ndim > t.ndim or m.shape != t.shape[:m.ndim]:
        for k, (sm, st) in enumerate(zip(m.shape, t.shape)):
            if sm != st:
                raise IndexError(f"boolean index did not match indexed tensor along axis {k}; size of axis is {st} "
                                 f"but size of corresponding boolean axis is {sm} (tensor shape {t.shape}, mask "
                                 f"shape {m.shape})")
        raise IndexError(f"too many indices for tensor of shape {t.shape}: a boolean mask of shape {m.shape}")
    from .tensor import where
    v = _as_operand(value, t.dtype)
    v._check_plain("assignment")
    m = m.reshape(m.shape + (1,) * (t.ndim - m.ndim))
    t[...] = where(m, v.astype(t.dtype), t)
