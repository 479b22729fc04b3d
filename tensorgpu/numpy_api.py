"""NumPy's protocols for tensors: `np.sum(t)`, `np.exp(t)`, `np.concatenate([t, u])` and
friends run tensorgpu's own (lazy, fused) ops and return tensors, through
`__array_function__` (NEP 18) and `__array_ufunc__` (NEP 13). `np.asarray(t)` still reads a
tensor back (`__array__`).

What is mapped (FUNCTIONS, UFUNCS below) takes NumPy's signature: `out=None` and `dtype` are
accepted (dtype converts first, and must be one tensorgpu holds); `out=` an array, `where=`
and `initial=` are refused with a TypeError that says so. Any other NumPy function or ufunc
gets the tensors read back as arrays and returns what NumPy returns (an ndarray), as before
the protocols existed.
"""
from __future__ import annotations

import numbers

import numpy as np

from .ops import Op
from .tensor import Tensor, tensor


def _t(x):
    return x if isinstance(x, Tensor) else tensor(x)


def _operand(x):
    """Tensors and scalars (Python's or NumPy's) pass, scalars weakly typed as in every tensor
    operator; arrays and lists become tensors."""
    if isinstance(x, (Tensor, numbers.Number, np.bool_)) or (isinstance(x, np.generic) and x.ndim == 0):
        return x
    return tensor(x)


def _no_out(name: str, out=None, where=True, initial=None, **extra):
    """Refuse what tensors cannot do: out= an array, where=, initial=, and unknown arguments."""
    if out is not None and not (isinstance(out, tuple) and all(o is None for o in out)):
        raise TypeError(f"np.{name}(..., out=...) with a tensorgpu Tensor: tensors are not written through out=; "
                        "use the returned tensor (or t[...] = result)")
    if where is not True:
        raise TypeError(f"np.{name}(..., where=...) is not supported for tensorgpu tensors: use tg.where first")
    if initial is not None:
        raise TypeError(f"np.{name}(..., initial=...) is not supported for tensorgpu tensors")
    extra.pop("order", None)
    extra.pop("casting", None)
    extra.pop("subok", None)
    if extra:
        raise TypeError(f"np.{name}: unsupported arguments for tensorgpu tensors: {', '.join(extra)}")


def _dtyped(x: Tensor, dtype) -> Tensor:
    return x if dtype is None else x.astype(dtype)


def _reduction(name: str, method: str, has_dtype: bool = True):
    def impl(a, axis=None, dtype=None, out=None, keepdims=False, **kw):
        _no_out(name, out, **kw)
        return getattr(_dtyped(_t(a), dtype), method)(axis=axis, keepdims=bool(keepdims))

    def impl_nodtype(a, axis=None, out=None, keepdims=False, **kw):
        _no_out(name, out, **kw)
        return getattr(_t(a), method)(axis=axis, keepdims=bool(keepdims))
    f = impl if has_dtype else impl_nodtype
    f.__name__ = name
    return f


def _var_like(name: str):
    def impl(a, axis=None, dtype=None, out=None, ddof=0, keepdims=False, *, where=True, mean=None, correction=None):
        _no_out(name, out, where)
        if mean is not None:
            raise TypeError(f"np.{name}(..., mean=...) is not supported for tensorgpu tensors")
        ddof = correction if correction is not None else ddof
        return getattr(_dtyped(_t(a), dtype), name)(axis=axis, keepdims=bool(keepdims), ddof=ddof)
    impl.__name__ = name
    return impl


def _cumsum(a, axis=None, dtype=None, out=None):
    _no_out("cumsum", out)
    return _dtyped(_t(a), dtype).cumsum(axis)


def _reshape(a, shape=None, order="C", *, newshape=None, copy=None):
    if order != "C":
        raise TypeError(f"np.reshape(order={order!r}) is not supported for tensors (row-major only)")
    return _t(a).reshape(shape if shape is not None else newshape)


def _transpose(a, axes=None):
    t = _t(a)
    if axes is None:
        return t.transpose()
    axes = tuple(axes)
    if len(axes) != t.ndim:           # NumPy's meaning only: no two-axis swap here
        raise ValueError(f"np.transpose: axes {axes} don't match a tensor of shape {t.shape}")
    return t.permute(axes)


def _concatenate(arrays, axis=0, out=None, dtype=None, casting="same_kind"):
    from .tensor import concatenate
    _no_out("concatenate", out)
    r = concatenate(list(arrays), axis)
    return _dtyped(r, dtype)


def _stack(arrays, axis=0, out=None, dtype=None, casting="same_kind"):
    from .tensor import stack
    _no_out("stack", out)
    return _dtyped(stack(list(arrays), axis), dtype)


def _where(cond, *xy):
    from .tensor import where
    if len(xy) != 2:
        raise TypeError("np.where(cond) (the nonzero form) is not supported for tensors: use np.nonzero(t.numpy())")
    return where(_t(cond), *xy)


def _clip(a, a_min=None, a_max=None, out=None, *, min=None, max=None, **kw):  # noqa: A002 - NumPy's names
    _no_out("clip", out, **kw)
    return _t(a).clip(a_min if a_min is not None else min, a_max if a_max is not None else max)


def _round(a, decimals=0, out=None):
    _no_out("round", out)
    return _t(a).round(decimals)


def _sort(a, axis=-1, kind=None, order=None, *, stable=None, descending=False):
    from .tensor import sort
    if order is not None:
        raise TypeError("np.sort(order=...) applies to structured arrays, not tensors")
    return sort(_t(a), axis, kind, descending)


def _argsort(a, axis=-1, kind=None, order=None, *, stable=None, descending=False):
    from .tensor import argsort
    if order is not None:
        raise TypeError("np.argsort(order=...) applies to structured arrays, not tensors")
    return argsort(_t(a), axis, kind, descending)


def _arg(name):
    def impl(a, axis=None, out=None, *, keepdims=False):
        _no_out(name, out)
        return getattr(_t(a), name)(axis=axis, keepdims=bool(keepdims))
    impl.__name__ = name
    return impl


def _dot(a, b, out=None):
    from .tensor import dot
    _no_out("dot", out)
    return dot(a, b)


def _einsum(subscripts, *operands, out=None, dtype=None, optimize=False, **kw):
    from .einsum import einsum
    _no_out("einsum", out, **{k: v for k, v in kw.items() if k not in ("order", "casting")})
    return _dtyped(einsum(subscripts, *operands), dtype)


def _squeeze(a, axis=None):
    return _t(a).squeeze(axis)


def _expand_dims(a, axis):
    from .tensor import expand_dims
    return expand_dims(a, axis)


def _ravel(a, order="C"):
    if order not in ("C", "A", "K"):
        raise TypeError(f"np.ravel(order={order!r}) is not supported for tensors (row-major only)")
    return _t(a).ravel()


def _copy(a, order="K", subok=False):
    return _t(a).copy()


def _broadcast_to(a, shape, subok=False):
    return _t(a).broadcast_to(tuple(shape) if not isinstance(shape, int) else (shape,))


def _take_along_axis(arr, indices, axis=-1):
    from .indexing import take_along_axis
    return take_along_axis(arr, indices, axis)


def _put_along_axis(arr, indices, values, axis):
    from .indexing import put_along_axis
    return put_along_axis(arr, indices, values, axis)


def _moveaxis(a, source, destination):
    return _t(a).moveaxis(source, destination)


def _swapaxes(a, axis1, axis2):
    return _t(a).swapaxes(axis1, axis2)


def _shape(a):
    return _t(a).shape


def _ndim(a):
    return _t(a).ndim


def _size(a, axis=None):
    t = _t(a)
    return t.size if axis is None else t.shape[axis]


FUNCTIONS = {
    np.sum: _reduction("sum", "sum"), np.prod: _reduction("prod", "prod"),
    np.mean: _reduction("mean", "mean"),
    np.max: _reduction("max", "max", False), np.min: _reduction("min", "min", False),
    np.amax: _reduction("amax", "max", False), np.amin: _reduction("amin", "min", False),
    np.any: _reduction("any", "any", False), np.all: _reduction("all", "all", False),
    np.std: _var_like("std"), np.var: _var_like("var"),
    np.argmax: _arg("argmax"), np.argmin: _arg("argmin"),
    np.cumsum: _cumsum, np.reshape: _reshape, np.transpose: _transpose, np.concatenate: _concatenate,
    np.stack: _stack, np.where: _where, np.clip: _clip, np.round: _round, np.sort: _sort, np.argsort: _argsort,
    np.dot: _dot, np.einsum: _einsum, np.squeeze: _squeeze, np.expand_dims: _expand_dims, np.ravel: _ravel,
    np.copy: _copy, np.broadcast_to: _broadcast_to, np.take_along_axis: _take_along_axis,
    np.put_along_axis: _put_along_axis, np.moveaxis: _moveaxis, np.swapaxes: _swapaxes, np.shape: _shape,
    np.ndim: _ndim, np.size: _size,
}
if hasattr(np, "around"):
    FUNCTIONS[np.around] = _round

# ufunc -> the op of the table (ops.py); Tensor._binary applies it with the operand order kept
# (a scalar on the left is the reflected form), so NumPy's scalar types never re-enter NumPy
_BINARY = {
    np.add: Op.ADD, np.subtract: Op.SUB, np.multiply: Op.MUL, np.true_divide: Op.DIV, np.floor_divide: Op.FLOORDIV,
    np.power: Op.POW, np.remainder: Op.MOD, np.less: Op.LT, np.less_equal: Op.LE, np.greater: Op.GT,
    np.greater_equal: Op.GE, np.equal: Op.EQ, np.not_equal: Op.NE, np.maximum: Op.MAX, np.minimum: Op.MIN,
}
_LOGICAL = {np.logical_and: Op.AND, np.logical_or: Op.OR}
_UNARY = {
    np.negative: lambda a: -a, np.positive: lambda a: +a, np.absolute: lambda a: abs(a), np.exp: lambda a: a.exp(),
    np.log: lambda a: a.log(), np.sqrt: lambda a: a.sqrt(), np.sin: lambda a: a.sin(), np.cos: lambda a: a.cos(),
    np.tanh: lambda a: a.tanh(), np.floor: lambda a: a.floor(), np.ceil: lambda a: a.ceil(),
    np.rint: lambda a: a.round(), np.isnan: lambda a: a.isnan(), np.isinf: lambda a: a.isinf(),
    np.isfinite: lambda a: a.isfinite(), np.logical_not: lambda a: ~_bool(a),
}
_REDUCE = {np.add: "sum", np.multiply: "prod", np.maximum: "max", np.minimum: "min", np.logical_and: "all",
           np.logical_or: "any"}


def _bool(x):
    t = _t(x)
    from . import dtypes as dt
    return t if t.dtype is dt.bool_ else t != 0


def _as_array(x):
    if isinstance(x, Tensor):
        return x.numpy()
    if isinstance(x, (list, tuple)):
        return type(x)(_as_array(v) for v in x)
    if isinstance(x, dict):
        return {k: _as_array(v) for k, v in x.items()}
    return x


def array_ufunc(ufunc, method: str, inputs: tuple, kwargs: dict):
    """Tensor.__array_ufunc__: a mapped ufunc runs as tensor ops; others on read-back arrays."""
    if method == "__call__" and (ufunc in _BINARY or ufunc in _LOGICAL or ufunc in _UNARY or ufunc is np.matmul):
        kw = dict(kwargs)
        dtype = kw.pop("dtype", None)
        _no_out(ufunc.__name__, kw.pop("out", None), kw.pop("where", True), **kw)
        args = [_operand(x) for x in inputs]
        if ufunc in _UNARY:
            res = _UNARY[ufunc](_t(args[0]))
        elif ufunc is np.matmul:
            from .tensor import matmul
            res = matmul(_t(args[0]), _t(args[1]))
        elif ufunc in _LOGICAL:
            res = _bool(args[0])._binary(_LOGICAL[ufunc], _bool(args[1]))
        else:
            a, b = args
            res = a._binary(_BINARY[ufunc], b) if isinstance(a, Tensor) else b._binary(_BINARY[ufunc], a, True)
        return _dtyped(res, dtype)
    if method == "reduce" and ufunc in _REDUCE:
        kw = dict(kwargs)
        axis = kw.pop("axis", 0)
        keepdims = kw.pop("keepdims", False)
        dtype = kw.pop("dtype", None)
        _no_out(f"{ufunc.__name__}.reduce", kw.pop("out", None), kw.pop("where", True), kw.pop("initial", None), **kw)
        return getattr(_dtyped(_t(inputs[0]), dtype), _REDUCE[ufunc])(axis=axis, keepdims=keepdims)
    if method == "accumulate" and ufunc is np.add:
        kw = dict(kwargs)
        axis = kw.pop("axis", 0)
        dtype = kw.pop("dtype", None)
        _no_out("add.accumulate", kw.pop("out", None), **kw)
        return _dtyped(_t(inputs[0]), dtype).cumsum(axis)
    # anything else: NumPy on the values
    conv = [_as_array(x) for x in inputs]
    kw = {k: _as_array(v) for k, v in kwargs.items()}
    return getattr(ufunc, method)(*conv, **kw)


def array_function(func, types, args: tuple, kwargs: dict):
    """Tensor.__array_function__: a mapped function runs as tensor ops; others on read-back arrays."""
    impl = FUNCTIONS.get(func)
    if impl is not None:
        return impl(*args, **kwargs)
    return func(*_as_array(args), **_as_array(kwargs))
