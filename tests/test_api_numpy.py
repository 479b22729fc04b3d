"""NumPy's functions and ufuncs on tensors (__array_function__ / __array_ufunc__): the mapped
ones run tensorgpu's ops and return tensors equal to NumPy's results, accept out=None and
dtype, refuse out=array / where= / initial= clearly; the others still work on the values
(an ndarray back); np.asarray keeps working."""
import numpy as np
import pytest

import tensorgpu as tg
from core_util import check, no_gpu_work

rng = np.random.default_rng(5)
X = rng.standard_normal((3, 4)).astype(np.float32)
I = rng.integers(-4, 5, (3, 4)).astype(np.int32)


@pytest.mark.parametrize("name", ["sum", "mean", "max", "min", "amax", "amin", "prod", "any", "all", "std", "var",
                                  "argmax", "argmin", "cumsum"])
@pytest.mark.parametrize("axis", [None, 0, -1])
def test_reductions_return_tensors(name, axis):
    fn = getattr(np, name)
    for x in (X, I):
        got = fn(tg.tensor(x), axis=axis)
        assert isinstance(got, tg.Tensor), type(got)
        want = np.asarray(fn(x, axis=axis))
        exact = name in ("max", "min", "amax", "amin", "argmax", "argmin", "any", "all") or (
            x.dtype.kind == "i" and name in ("sum", "prod", "cumsum"))
        tol = 0 if exact else 1e-5
        check(got, want.astype(np.float32) if name in ("mean", "std", "var") else want, rtol=tol, atol=tol)


def test_keepdims_out_none_and_dtype():
    t = tg.tensor(X)
    check(np.sum(t, axis=1, keepdims=True, out=None), np.sum(X, axis=1, keepdims=True), rtol=1e-6)
    check(np.sum(tg.tensor(I), dtype=np.float32), np.sum(I).astype(np.float32))
    check(np.mean(tg.tensor(I), axis=0, dtype="float32"), np.mean(I, axis=0).astype(np.float32), rtol=1e-6)
    check(np.var(t, ddof=1), np.var(X, ddof=1).astype(np.float32), rtol=1e-5)
    check(np.std(t, axis=0, correction=1), np.std(X, axis=0, ddof=1).astype(np.float32), rtol=1e-5)
    check(np.max(t, axis=(0, 1)), np.max(X, axis=(0, 1)))


@pytest.mark.parametrize("call,msg", [
    (lambda t: np.sum(t, out=np.zeros(())), "out="),
    (lambda t: np.max(t, initial=0.0), "initial="),
    (lambda t: np.sum(t, where=np.ones((3, 4), bool)), "where="),
    (lambda t: np.exp(t, out=np.zeros((3, 4), np.float32)), "out="),
    (lambda t: np.sum(t, dtype=np.float64), "float32, float16, int32, uint32 and bool"),
])
def test_refused_arguments(call, msg):
    with no_gpu_work(), pytest.raises(TypeError, match=msg):
        call(tg.tensor(X))


@pytest.mark.parametrize("ufunc", [np.add, np.subtract, np.multiply, np.true_divide, np.maximum, np.minimum,
                                   np.less, np.greater_equal, np.equal, np.not_equal, np.power, np.remainder,
                                   np.floor_divide, np.logical_and, np.logical_or])
def test_binary_ufuncs(ufunc):
    a, b = X, np.abs(X) + 0.5
    with np.errstate(all="ignore"):
        want = ufunc(a, b)
    for args in ((tg.tensor(a), tg.tensor(b)), (a, tg.tensor(b)), (tg.tensor(a), b)):
        got = ufunc(*args)
        assert isinstance(got, tg.Tensor)
        check(got, want, rtol=1e-5)
    check(ufunc(tg.tensor(I), 2), ufunc(I, 2).astype(ufunc(I, 2).dtype if ufunc(I, 2).dtype == bool else np.int32)
          if ufunc not in (np.true_divide,) else ufunc(I, 2).astype(np.float32), rtol=1e-6)


@pytest.mark.parametrize("ufunc", [np.negative, np.absolute, np.exp, np.sqrt, np.log, np.sin, np.cos, np.tanh,
                                   np.floor, np.ceil, np.rint, np.isnan, np.isinf, np.isfinite, np.logical_not])
def test_unary_ufuncs(ufunc):
    x = np.abs(X) + 0.1
    got = ufunc(tg.tensor(x))
    assert isinstance(got, tg.Tensor)
    check(got, ufunc(x), rtol=2e-6, atol=2e-6)


def test_ufunc_methods_and_matmul():
    t = tg.tensor(X)
    check(np.add.reduce(t, axis=1), np.add.reduce(X, axis=1), rtol=1e-6)
    check(np.maximum.reduce(t, axis=0, keepdims=True), np.maximum.reduce(X, axis=0, keepdims=True))
    check(np.logical_or.reduce(tg.tensor(X > 0), axis=1), np.logical_or.reduce(X > 0, axis=1))
    check(np.add.accumulate(t, axis=1), np.add.accumulate(X, axis=1), rtol=1e-6, atol=1e-6)
    check(np.matmul(t, t.T), X @ X.T, rtol=1e-5, atol=1e-6)
    check(X.T @ t, X.T @ X, rtol=1e-5, atol=1e-6)               # an ndarray on the left
    check(np.ones(4, np.float32) + t, 1 + X)
    check(np.exp(t, dtype=np.float16), np.exp(X).astype(np.float16), rtol=2e-3)


def test_shape_functions():
    t = tg.tensor(X)
    check(np.reshape(t, (4, 3)), X.reshape(4, 3))
    check(np.reshape(t, shape=(2, 6)), X.reshape(2, 6))
    check(np.transpose(t), X.T)
    check(np.concatenate([t, X]), np.concatenate([X, X]))
    check(np.concatenate([t, t], axis=None), np.concatenate([X, X], axis=None))
    check(np.stack([t, t], axis=1), np.stack([X, X], axis=1))
    check(np.where(t > 0, t, 0.0), np.where(X > 0, X, 0.0))
    check(np.clip(t, -0.5, 0.5), np.clip(X, -0.5, 0.5))
    check(np.round(t, 2), np.round(X, 2), rtol=1e-6)
    check(np.around(t), np.around(X))
    check(np.sort(t, axis=0), np.sort(X, axis=0))
    check(np.argsort(t), np.argsort(X, kind="stable").astype(np.int32))
    check(np.dot(t, X.T), np.dot(X, X.T), rtol=1e-5, atol=1e-6)
    check(np.squeeze(tg.tensor(X[None])), X)
    check(np.expand_dims(t, 1), np.expand_dims(X, 1))
    check(np.ravel(t), np.ravel(X))
    check(np.copy(t), X)
    check(np.broadcast_to(tg.tensor(X[:1]), (3, 4)), np.broadcast_to(X[:1], (3, 4)))
    check(np.moveaxis(t, 0, 1), np.moveaxis(X, 0, 1))
    check(np.swapaxes(t, 0, 1), np.swapaxes(X, 0, 1))
    idx = np.argsort(X, 1)
    check(np.take_along_axis(t, idx, 1), np.take_along_axis(X, idx, 1))
    assert np.shape(t) == (3, 4) and np.ndim(t) == 2 and np.size(t) == 12 and np.size(t, 1) == 4
    check(np.einsum("ij,kj->ik", t, X), np.einsum("ij,kj->ik", X, X), rtol=1e-5, atol=1e-6)


def test_put_along_axis_through_numpy_writes_the_tensor():
    base = np.zeros((2, 3), np.float32)
    t = tg.tensor(base)
    np.put_along_axis(t, np.array([[2], [0]]), 5.0, 1)
    check(t, np.array([[0, 0, 5], [5, 0, 0]], np.float32))


def test_other_numpy_functions_work_on_the_values():
    t = tg.tensor(X)
    m = np.median(t)
    assert isinstance(m, (np.floating, np.ndarray)) and np.isclose(m, np.median(X))
    assert np.allclose(t, X) and np.array_equal(tg.tensor(I), I)
    np.testing.assert_allclose(t, X)
    s = np.sinh(t)                              # a ufunc tensorgpu does not map: NumPy on the values
    assert isinstance(s, np.ndarray)
    np.testing.assert_allclose(s, np.sinh(X))
    a = np.asarray(t)
    assert isinstance(a, np.ndarray) and a.dtype == np.float32
    np.testing.assert_array_equal(a, X)
    np.testing.assert_array_equal(np.array(t, dtype=np.float64), X.astype(np.float64))


@pytest.mark.parametrize("s", [np.float64(2.0), np.float32(2.0), np.int64(3), np.bool_(True), 2.0])
def test_numpy_scalars_on_either_side(s):
    """NumPy's scalar types on the left of an operator reach __array_ufunc__: they work as on the
    right, weakly typed like Python scalars (a float16 tensor stays float16), with no recursion."""
    h = np.array([1.0, 2.0], np.float16)
    t = tg.tensor(h)
    py = s.item() if isinstance(s, np.generic) else s
    for fn in (lambda a, b: a + b, lambda a, b: a - b, lambda a, b: a * b, lambda a, b: a < b,
               lambda a, b: a // b, np.maximum):
        check(fn(s, t), fn(np.float16(py), h))
        check(fn(t, s), fn(h, np.float16(py)))
