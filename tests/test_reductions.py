"""Reductions against NumPy: sum, mean, max, min, argmax, argmin, var, std over axis int /
tuple / None with keepdims, on views and every plain dtype; softmax, log_softmax, logsumexp;
NaN, ties and empty inputs; with and without subgroups, with and without shader-f16.

Tolerances: f32 sums are compared with float64 NumPy within 1e-5 relative of sum(|x|) (the
order of additions differs); max/min/argmax/argmin and integer reductions are exact;
softmax family within 1e-6 absolute / 1e-5 relative; float16 results within 2e-3 relative.
The shapes cover each strategy of the generated reduction kernel: one thread per output
(short rows, or strided rows with many outputs) and one workgroup per output (64 or 256 threads).
"""
import numpy as np
import pytest

import tensorgpu as tg
from core_util import check, f16_path, no_gpu_work, subgroup_path  # noqa: F401  (fixtures)

rng = np.random.default_rng(5)

# (shape, axis): per-thread short rows, workgroup rows, strided workgroup, strided per-thread, tuples
CASES = [((5, 9), 1), ((7, 300), 1), ((7, 300), -1), ((300, 7), 0), ((600, 300), 0), ((3, 70), 1),
         ((4, 5, 6), (0, 2)), ((4, 5, 6), (1,)), ((4, 5, 6), None), ((2, 3, 4, 5), (1, 3)), ((1000,), 0),
         ((6,), None), ((), None), ((3, 1, 4), 1), ((2, 3, 4, 5, 2), (0, 2, 4))]


def _tol_sum(x, axis, keepdims):
    return 1e-5 * np.abs(x.astype(np.float64)).sum(axis=axis, keepdims=keepdims) + 1e-6


@pytest.mark.parametrize("shape,axis", CASES, ids=str)
@pytest.mark.parametrize("keepdims", [False, True])
def test_float32_reductions(shape, axis, keepdims, subgroup_path):
    x = rng.standard_normal(shape).astype(np.float32)
    t = tg.tensor(x)
    x64 = x.astype(np.float64)
    for name in ("sum", "mean"):
        got = getattr(t, name)(axis, keepdims=keepdims)
        ref = getattr(x64, name)(axis=axis, keepdims=keepdims)
        tol = _tol_sum(x, axis, keepdims) / (1 if name == "sum" else max(x.size // max(np.asarray(ref).size, 1), 1))
        assert got.shape == np.shape(ref) and got.dtype == tg.float32
        assert np.all(np.abs(got.numpy() - ref) <= tol)
    for name in ("max", "min"):
        check(getattr(t, name)(axis, keepdims=keepdims), getattr(x, name)(axis=axis, keepdims=keepdims))
    for name in ("var", "std"):
        got = getattr(t, name)(axis, keepdims=keepdims)
        ref = getattr(x64, name)(axis=axis, keepdims=keepdims)
        assert got.shape == np.shape(ref)
        np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5, atol=1e-6)
    if axis is None or isinstance(axis, int):
        for name in ("argmax", "argmin"):
            check(getattr(t, name)(axis, keepdims=keepdims), getattr(x, name)(axis=axis, keepdims=keepdims).astype(np.int32))


def test_reduction_module_functions():
    x = rng.standard_normal((4, 5)).astype(np.float32)
    for name in ("sum", "mean", "max", "min", "var", "std"):
        np.testing.assert_allclose(getattr(tg, name)(tg.tensor(x), 1).numpy(), getattr(np, name)(x, 1), rtol=1e-5, atol=1e-6)
    check(tg.argmax(tg.tensor(x), 0), np.argmax(x, 0).astype(np.int32))
    check(tg.argmin(tg.tensor(x)), np.array(np.argmin(x), np.int32))


def test_var_std_ddof():
    x = rng.standard_normal((6, 40)).astype(np.float32)
    np.testing.assert_allclose(tg.tensor(x).var(1, ddof=1).numpy(), x.astype(np.float64).var(1, ddof=1), rtol=1e-5)
    np.testing.assert_allclose(tg.tensor(x).std(0, ddof=1, keepdims=True).numpy(), x.astype(np.float64).std(0, ddof=1, keepdims=True), rtol=1e-5)
    big = (x + 1000).astype(np.float32)  # large mean: a two-pass variance stays accurate
    np.testing.assert_allclose(tg.tensor(big).var(1).numpy(), big.astype(np.float64).var(1), rtol=1e-3)


VIEWS = {
    "T": lambda a: a.T,
    "slice-neg": lambda a: a[::-1, 1::2],
    "permute": lambda a: a.transpose(2, 0, 1) if isinstance(a, np.ndarray) else a.permute(2, 0, 1),
    "expand": lambda a: a[:, :1],
    "none": lambda a: a[None, :, 2:],
}


@pytest.mark.parametrize("view", list(VIEWS))
@pytest.mark.parametrize("axis", [0, 1, -1, None, (0, 1)])
def test_reductions_on_views(view, axis):
    x = rng.standard_normal((9, 7, 3)).astype(np.float32)
    v = VIEWS[view](x)
    if view == "expand":
        tv = VIEWS[view](tg.tensor(x)).expand(9, 5, 3)
        v = np.broadcast_to(v, (9, 5, 3))
    else:
        tv = VIEWS[view](tg.tensor(x))
    assert tv.shape == v.shape
    np.testing.assert_allclose(tv.sum(axis).numpy(), v.astype(np.float64).sum(axis), rtol=1e-5, atol=1e-5)
    check(tv.max(axis, keepdims=True), v.max(axis, keepdims=True))
    check(tv.min(axis), v.min(axis))
    if not isinstance(axis, tuple):
        check(tv.argmax(axis), np.argmax(v, axis).astype(np.int32))
        check(tv.argmin(axis, keepdims=True), np.argmin(v, axis, keepdims=True).astype(np.int32))
    np.testing.assert_allclose(tv.var(axis).numpy(), v.astype(np.float64).var(axis), rtol=1e-5, atol=1e-6)


def test_reduction_of_elementwise_chain_on_views():
    x = rng.standard_normal((8, 6)).astype(np.float32)
    y = rng.standard_normal((6,)).astype(np.float32)
    t, u = tg.tensor(x), tg.tensor(y)
    e = ((t.T[::-1] * 2 + u[::-1, None]).exp()).sum(1)
    ref = np.exp(x.T[::-1] * 2 + y[::-1, None]).sum(1)
    np.testing.assert_allclose(e.numpy(), ref, rtol=1e-5)


# ----------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("shape,axis", [((7, 300), 1), ((300, 7), 0), ((5, 9), None), ((4, 5, 6), (0, 2))], ids=str)
def test_integer_and_bool_reductions(shape, axis, subgroup_path):
    i = rng.integers(-1000, 1000, shape).astype(np.int32)
    u = rng.integers(0, 2**32 - 1, shape, dtype=np.uint64).astype(np.uint32)
    b = i > 100
    for x in (i, u):
        t = tg.tensor(x)
        check(t.sum(axis), x.sum(axis, dtype=x.dtype))  # wraps like NumPy at the same width
        check(t.max(axis), x.max(axis))
        check(t.min(axis, keepdims=True), x.min(axis, keepdims=True))
        np.testing.assert_allclose(t.mean(axis).numpy(), x.astype(np.float64).mean(axis), rtol=1e-5)
        if not isinstance(axis, tuple):
            check(t.argmax(axis), np.argmax(x, axis).astype(np.int32))
            check(t.argmin(axis), np.argmin(x, axis).astype(np.int32))
    tb = tg.tensor(b)
    check(tb.sum(axis), b.sum(axis).astype(np.int32))
    check(tb.max(axis), b.max(axis))
    check(tb.min(axis), b.min(axis))
    if not isinstance(axis, tuple):
        check(tb.argmax(axis), np.argmax(b, axis).astype(np.int32))


def test_int32_sum_wraps():
    x = np.full(10, 2**30, np.int32)
    check(tg.tensor(x).sum(), x.sum(dtype=np.int32))


@pytest.mark.parametrize("shape,axis", [((7, 300), 1), ((300, 7), 0), ((5, 9), 1), ((1001,), None), ((4, 5, 6), (0, 2))], ids=str)
def test_float16_reductions(shape, axis, f16_path, subgroup_path):
    x = rng.standard_normal(shape).astype(np.float16)
    t = tg.tensor(x)
    s = t.sum(axis)
    assert s.dtype == tg.float16  # as NumPy; accumulated in f32, rounded once
    np.testing.assert_allclose(s.numpy().astype(np.float64), x.astype(np.float64).sum(axis), rtol=2e-3, atol=2e-3)
    check(t.max(axis), x.max(axis))
    check(t.min(axis), x.min(axis))
    m = t.mean(axis)
    assert m.dtype == tg.float16
    np.testing.assert_allclose(m.numpy().astype(np.float64), x.astype(np.float64).mean(axis), rtol=2e-3, atol=1e-3)
    if not isinstance(axis, tuple):
        check(t.argmax(axis), np.argmax(x, axis).astype(np.int32))
    np.testing.assert_allclose(t.astype(tg.float32).std(axis).numpy(), x.astype(np.float64).std(axis), rtol=1e-4)


def test_float16_reduction_odd_output_count(f16_path):
    """An odd number of f16 outputs: neighbours share a 32-bit word when f16 is packed."""
    x = rng.standard_normal((7, 33)).astype(np.float16)
    check(tg.tensor(x).max(1), x.max(1))
    check((tg.tensor(x).sum(0) * 2).astype(tg.float16), (x.astype(np.float32).sum(0) * 2).astype(np.float16), rtol=2e-3, atol=2e-3)


# ----------------------------------------------------------------------------- accuracy, ties, NaN, empty


def test_sum_of_a_million_floats(subgroup_path):
    x = rng.random(1 << 20, dtype=np.float32)
    got = tg.tensor(x).sum().item()
    ref = x.astype(np.float64).sum()
    assert abs(got - ref) <= 1e-5 * ref, (got, ref)
    got = tg.tensor(x).reshape(1024, 1024).sum(0).sum().item()
    assert abs(got - ref) <= 1e-5 * ref


def test_argmax_ties_return_first_index(subgroup_path):
    check(tg.tensor([1.0, 3.0, 3.0, 2.0, 3.0]).argmax(), np.array(1, np.int32))
    check(tg.tensor([2, 0, 0, 2]).argmin(), np.array(1, np.int32))
    for n in (10, 100, 1000, 5000):
        x = np.zeros((3, n), np.float32)
        x[0, [n // 3, n // 2, n - 1]] = 5
        x[1, [n - 1, n // 2]] = -5
        x[2] = 1  # all equal: index 0
        check(tg.tensor(x).argmax(1), x.argmax(1).astype(np.int32))
        check(tg.tensor(x).argmin(1), x.argmin(1).astype(np.int32))
        check(tg.tensor(x.T.copy()).argmax(0), x.argmax(1).astype(np.int32))
        check(tg.tensor(x).T.argmin(0), x.argmin(1).astype(np.int32))


@pytest.mark.parametrize("n", [10, 1000])
def test_nan_handling_like_numpy(n, subgroup_path):
    x = rng.standard_normal((4, n)).astype(np.float32)
    x[1, n // 2] = np.nan
    x[1, n // 3] = np.nan
    x[2, n - 1] = np.nan
    x[3, 0] = np.nan
    t = tg.tensor(x)
    check(t.max(1), x.max(1))          # NaN propagates
    check(t.min(1), x.min(1))
    check(t.argmax(1), x.argmax(1).astype(np.int32))  # the first NaN
    check(t.argmin(1), x.argmin(1).astype(np.int32))
    check(t.max(), np.array(np.nan, np.float32))
    check(t.T.max(0), x.max(1))
    check(t.sum(1)[1:], x.sum(1)[1:] * np.nan)


def test_inf_values():
    x = np.array([[1.0, np.inf, 2.0], [-np.inf, -np.inf, 0.0]], np.float32)
    check(tg.tensor(x).max(1), x.max(1))
    check(tg.tensor(x).min(1), x.min(1))
    check(tg.tensor(x).argmin(1), x.argmin(1).astype(np.int32))
    check(tg.tensor(x).sum(1), x.sum(1))


def test_empty_reductions():
    z = np.zeros((0, 3), np.float32)
    t = tg.tensor(z)
    check(t.sum(), np.array(0.0, np.float32))
    check(t.sum(0), np.zeros(3, np.float32))
    check(t.sum(1), np.zeros(0, np.float32))
    check(t.sum(0, keepdims=True), np.zeros((1, 3), np.float32))
    check(t.max(1), np.zeros(0, np.float32))  # reduces non-empty rows of which there are none
    check(tg.zeros((0, 4), tg.int32).sum(0), np.zeros(4, np.int32))
    check(tg.tensor(np.zeros((2, 0), np.float32)).sum(1) + 1, np.ones(2, np.float32))
    with np.errstate(all="ignore"):
        check(t.mean(0), z.mean(0))  # NaN, as NumPy
    for name in ("max", "min", "argmax", "argmin"):
        with no_gpu_work(), pytest.raises(ValueError):
            getattr(t, name)()
        with no_gpu_work(), pytest.raises(ValueError):
            getattr(t, name)(0)


def test_zero_dim_reductions():
    t = tg.tensor(3.5)
    check(t.sum(), np.array(3.5, np.float32))
    check(t.max(), np.array(3.5, np.float32))
    check(t.argmax(), np.array(0, np.int32))
    check(t.mean(), np.array(3.5, np.float32))
    check(t.sum(0), np.array(3.5, np.float32))


# ----------------------------------------------------------------------------- softmax family


def _softmax(x, axis):
    x = x.astype(np.float64)
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def _lse(x, axis, keepdims=False):
    x = x.astype(np.float64)
    m = x.max(axis, keepdims=True)
    r = np.log(np.exp(x - m).sum(axis, keepdims=True)) + m
    return r if keepdims else np.squeeze(r, axis)


@pytest.mark.parametrize("shape,axis", [((4, 10), -1), ((4, 10), 0), ((3, 5, 300), -1), ((3, 5, 7), 1), ((6,), 0), ((2, 3, 1), -1)],
                         ids=str)
def test_softmax_family(shape, axis, subgroup_path):
    x = (rng.standard_normal(shape) * 5).astype(np.float32)
    t = tg.tensor(x)
    check(t.softmax(axis), _softmax(x, axis), rtol=1e-5, atol=1e-6)
    check(tg.softmax(t, axis), _softmax(x, axis), rtol=1e-5, atol=1e-6)
    check(t.log_softmax(axis), np.log(_softmax(x, axis)), rtol=1e-5, atol=2e-6)
    check(t.logsumexp(axis), _lse(x, axis), rtol=1e-5, atol=1e-6)
    check(t.logsumexp(axis, keepdims=True), _lse(x, axis, True), rtol=1e-5, atol=1e-6)


def test_softmax_on_negative_stride_rows():
    x = (rng.standard_normal((6, 8)) * 3).astype(np.float32)
    check(tg.tensor(x)[::-2, 1:].softmax(-1), _softmax(x[::-2, 1:], -1), rtol=1e-5, atol=1e-6)


def test_softmax_on_views_and_dtypes():
    x = (rng.standard_normal((6, 8)) * 3).astype(np.float32)
    t = tg.tensor(x)
    check(t.T.softmax(-1), _softmax(x.T, -1), rtol=1e-5, atol=1e-6)
    check(t[::2, 1:].softmax(-1), _softmax(x[::2, 1:], -1), rtol=1e-5, atol=1e-6)
    check(t[:, ::-1].softmax(-1), _softmax(x[:, ::-1], -1), rtol=1e-5, atol=1e-6)
    check(t[:, None].expand(6, 3, 8).softmax(-1), _softmax(np.broadcast_to(x[:, None], (6, 3, 8)), -1), rtol=1e-5, atol=1e-6)
    check((t * 2 + 1).softmax(0), _softmax(x * 2 + 1, 0), rtol=1e-5, atol=1e-6)
    i = np.arange(12, dtype=np.int32).reshape(3, 4)
    check(tg.tensor(i).softmax(-1), _softmax(i, -1).astype(np.float32), rtol=1e-5, atol=1e-6)
    h = x.astype(np.float16)
    np.testing.assert_allclose(tg.tensor(h).softmax(-1).numpy().astype(np.float64), _softmax(h, -1), rtol=2e-3, atol=1e-4)


def test_logsumexp_extremes():
    x = np.array([[1000.0, 1000.0], [-1000.0, -1000.0], [-np.inf, -np.inf], [0.0, -np.inf]], np.float32)
    with np.errstate(all="ignore"):
        check(tg.tensor(x).logsumexp(-1), np.array([1000 + np.log(2), -1000 + np.log(2), -np.inf, 0.0], np.float32), rtol=1e-6)
        check(tg.tensor(x).logsumexp(None), np.array(1000 + np.log(2), np.float32), rtol=1e-6)
    check(tg.tensor(x[:2]).softmax(-1), np.full((2, 2), 0.5, np.float32), rtol=1e-6)


def test_logsumexp_over_tuple_axes():
    x = rng.standard_normal((3, 4, 5)).astype(np.float32)
    check(tg.tensor(x).logsumexp((0, 2)), np.log(np.exp(x.astype(np.float64)).sum((0, 2))), rtol=1e-5)


def test_long_rows_two_stage_path(subgroup_path):
    """Rows of >= schedule.SPLIT_MIN_LEN elements with few outputs run as two kernels (partials per chunk, then
    the partials): ties, NaN, dtypes and fused consumers behave as in one stage."""
    x = rng.standard_normal((3, 50000)).astype(np.float32)
    x[0, [40000, 45000]] = 9.0          # a tie across chunks: the first wins
    x[1, [123, 40001]] = np.nan         # the first NaN wins, NaN propagates
    x[2, :] = 1.0                       # all equal: index 0
    t = tg.tensor(x)
    check(t.argmax(1), x.argmax(1).astype(np.int32))
    check(t.argmin(1), x.argmin(1).astype(np.int32))
    check(t.max(1), x.max(1))
    check(t.min(1, keepdims=True), x.min(1, keepdims=True))
    check(t.argmax(1) + 1, x.argmax(1).astype(np.int32) + 1)
    xs = x.copy()
    xs[1] = 0.5
    ts = tg.tensor(xs)
    tol = _tol_sum(xs, 1, False)
    assert np.all(np.abs(ts.sum(1).numpy() - xs.astype(np.float64).sum(1)) <= tol)
    assert np.all(np.abs((ts.sum(1) * 2 + 1).numpy() - (xs.astype(np.float64).sum(1) * 2 + 1)) <= 2 * tol)
    lse = ((ts * 2).exp().sum(1, keepdims=True).log() - 1).numpy()
    np.testing.assert_allclose(lse, np.log(np.exp(xs.astype(np.float64) * 2).sum(1, keepdims=True)) - 1, rtol=1e-5)
    i = rng.integers(-100, 100, (2, 40000)).astype(np.int32)
    check(tg.tensor(i).sum(1), i.sum(1).astype(np.int32))
    check(tg.tensor(i).argmin(1), i.argmin(1).astype(np.int32))
    b = i > 90
    check(tg.tensor(b).sum(1), b.sum(1).astype(np.int32))
    check(tg.tensor(b).argmax(1), b.argmax(1).astype(np.int32))
    h = xs.astype(np.float16)
    check(tg.tensor(h).argmax(1), h.argmax(1).astype(np.int32))
    check(tg.tensor(h).max(1), h.max(1))
    np.testing.assert_allclose(tg.tensor(h).sum(1).numpy().astype(np.float64), h.astype(np.float64).sum(1), rtol=2e-3, atol=0.1)
