"""The ops a NumPy user reaches for, against NumPy: //, prod, any/all, round, isnan/isinf/
isfinite (elementwise and reductions: fused, one kernel each), cumsum, sort/argsort/topk,
dot, concatenate, linspace, eye, expand_dims, ravel, copy, transpose(*axes)/swapaxes/moveaxis.
Shapes vary under hypothesis where they vary in use.

Tolerances: // % round isnan any all prod-of-ints sort topk: exact; float prod: 1e-5 relative
(f32 products in another order); float cumsum: 1e-5 relative to the running sum of |x|
(chunked sums in another order than NumPy's sequential one)."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import tensorgpu as tg
from core_util import TG_TO_NP, check, f16_path, kernels, no_gpu_work, subgroup_path  # noqa: F401  (fixtures)

rng = np.random.default_rng(16)
SHAPES = hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=6)


# ----------------------------------------------------------------------------- floor division


def test_floordiv_integers_numpy_semantics():
    a = np.array([7, -7, 7, -7, 0, 5, -2**31, 2**31 - 1, 9], np.int32)
    b = np.array([2, 2, -2, -2, 3, 0, -1, -3, 0], np.int32)
    with np.errstate(all="ignore"):
        want = np.floor_divide(a, b)            # NumPy: division by zero gives 0, MIN // -1 wraps
    check(tg.tensor(a) // tg.tensor(b), want)
    check(tg.tensor(a) // 3, a // 3)
    check(7 // tg.tensor(b[b != 0]), 7 // b[b != 0])
    u = np.array([7, 0, 2**32 - 1], np.uint32)
    check(tg.tensor(u) // tg.tensor(np.array([2, 5, 0], np.uint32)), np.array([3, 0, 0], np.uint32))
    check(tg.tensor([True, False]) // tg.tensor([True, True]), np.array([1, 0], np.int32))


def test_floordiv_floats_special_values():
    a = np.array([np.inf, -np.inf, np.nan, 5, -5, 0, -0.0, 5, -5, 0, 7, -7, 7.5, -7.5, 3, -3], np.float32)
    b = np.array([2, 2, 2, np.inf, np.inf, np.inf, 2, 0, 0, 0, -2, -2, 2, 2, -np.inf, -np.inf], np.float32)
    with np.errstate(all="ignore"):
        want = np.floor_divide(a, b)
    got = (tg.tensor(a) // tg.tensor(b)).numpy()
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.signbit(got[~np.isnan(got)]), np.signbit(want[~np.isnan(want)]))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=SHAPES, seed=st.integers(0, 2**31))
def test_floordiv_floats_random(shape, seed):
    """Quarter-valued operands: every quotient is exact, so the result is NumPy's bit for bit.
    (For arbitrary floats the two differ, by one, only where a / b rounds to an integer in f32:
    NumPy takes an exact fmod, WGSL has none.)"""
    r = np.random.default_rng(seed)
    a = (r.integers(-400, 400, shape) / 4).astype(np.float32)
    b = (r.integers(1, 40, shape) * r.choice([-1, 1], shape) / 4).astype(np.float32)
    check(tg.tensor(a) // tg.tensor(b), np.floor_divide(a, b))
    check(tg.tensor(a) // 2.5, np.floor_divide(a, np.float32(2.5)))


def test_floordiv_arbitrary_floats_differ_at_most_by_one_near_integers():
    a = (rng.standard_normal(20000) * 100).astype(np.float32)
    b = (rng.standard_normal(20000) * 3).astype(np.float32)
    got = (tg.tensor(a) // tg.tensor(b)).numpy()
    want = np.floor_divide(a, b)
    bad = got != want
    assert bad.mean() < 1e-3
    assert np.all(np.abs(got[bad] - want[bad]) == 1)
    q = (a[bad] / b[bad]).astype(np.float32)
    assert np.all(np.abs(q - np.round(q)) <= 1e-6 * np.maximum(np.abs(q), 1))


def test_floordiv_is_fused():
    x = tg.tensor(np.arange(8, dtype=np.int32)).realize()
    y = (x * 3 - 5) // 4 + 1
    assert len(kernels(lambda: y.realize())) == 1
    check(y, (np.arange(8) * 3 - 5) // 4 + 1)


# ----------------------------------------------------------------------------- prod, any, all


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=SHAPES, data=st.data())
def test_prod_any_all_match_numpy(shape, data):
    axis = data.draw(st.one_of(st.none(), st.integers(-len(shape), len(shape) - 1)))
    keep = data.draw(st.booleans())
    x = rng.uniform(0.5, 1.5, shape).astype(np.float32)
    check(tg.tensor(x).prod(axis, keepdims=keep), np.prod(x, axis, keepdims=keep), rtol=1e-5)
    i = rng.integers(-2, 3, shape).astype(np.int32)
    check(tg.tensor(i).prod(axis, keepdims=keep), np.prod(i, axis, keepdims=keep).astype(np.int32))
    m = rng.random(shape) < 0.3
    for src in (m, i, x - 1):
        check(tg.tensor(src).any(axis, keepdims=keep), np.any(src, axis, keepdims=keep))
        check(tg.tensor(src).all(axis, keepdims=keep), np.all(src, axis, keepdims=keep))


def test_prod_dtypes_and_empty(subgroup_path):
    check(tg.tensor(np.array([True, True, False])).prod(), np.array(0, np.int32))
    check(tg.tensor(np.array([1.5, 2.0, -2.0], np.float16)).prod(), np.array(-6, np.float16))
    check(tg.zeros((0, 3)).prod(0), np.ones(3, np.float32))
    check(tg.tensor(np.array([3, 2**20, 2**20], np.int32)).prod(), np.array(3 * 2**40 % 2**32, np.int64).astype(np.int32))
    long = rng.uniform(0.999, 1.001, 100_000).astype(np.float32)          # the two-stage split reduction
    check(tg.tensor(long).prod(), np.prod(long.astype(np.float64)), rtol=1e-4)


def test_any_all_nan_and_empty():
    x = np.array([[np.nan, 0], [0, 0]], np.float32)
    check(tg.tensor(x).any(1), np.any(x, 1))
    check(tg.tensor(x).all(0), np.all(x, 0))
    check(tg.zeros((0, 2)).any(0), np.zeros(2, bool))
    check(tg.zeros((2, 0)).all(1), np.ones(2, bool))


def test_reductions_are_fused():
    x = tg.tensor(rng.standard_normal((16, 32)).astype(np.float32)).realize()
    for y in ((x.abs() + 1).prod(1) * 2, (x > 1).any(1), ((x * x) < 4).all()):
        assert len(kernels(lambda: y.realize())) == 1


# ----------------------------------------------------------------------------- round, isnan ...


def test_round_half_to_even():
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.49999997, 2.675, 1e8 + 0.5, np.nan, np.inf], np.float32)
    check(tg.tensor(x).round(), np.round(x))
    for d in (1, 2, 3, -1, -2):
        y = np.array([2.675, 1.005, -3.14159, 1234.5678, 155.0], np.float32)
        check(tg.tensor(y).round(d), np.round(y, d), rtol=1e-6)
    check(tg.tensor(np.array([1.5, 2.5], np.float16)).round(), np.array([2, 2], np.float16))
    check(tg.tensor([3, -7]).round(), np.array([3, -7], np.int32))
    with pytest.raises(NotImplementedError):
        tg.tensor([3, -7]).round(-1)


def test_isnan_isinf_isfinite():
    x = np.array([np.nan, -np.nan, np.inf, -np.inf, 0, -0.0, 1e38, 1e-45, -3], np.float32)
    for name in ("isnan", "isinf", "isfinite"):
        check(getattr(tg.tensor(x), name)(), getattr(np, name)(x))
        with np.errstate(over="ignore"):
            h = x.astype(np.float16)                  # 1e38 -> inf in float16
        check(getattr(tg, name)(h), getattr(np, name)(h))
        ints = np.array([1, 2], np.int32)
        with no_gpu_work():
            r = getattr(tg.tensor(ints), name)()
        check(r, getattr(np, name)(ints))
    y = tg.tensor(x).realize()
    z = (y * 2).isfinite() & ~(y - 1).isnan()
    assert len(kernels(lambda: z.realize())) == 1


# ----------------------------------------------------------------------------- cumsum


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=300), data=st.data())
def test_cumsum_matches_numpy(shape, data):
    axis = data.draw(st.one_of(st.none(), st.integers(-len(shape), len(shape) - 1)))
    x = rng.standard_normal(shape).astype(np.float32)
    want = np.cumsum(x, axis)
    scale = np.cumsum(np.abs(x), axis)
    got = tg.tensor(x).cumsum(axis).numpy()
    assert got.shape == want.shape and got.dtype == np.float32
    assert np.all(np.abs(got - want) <= 1e-5 * scale + 1e-6)
    i = rng.integers(-100, 100, shape).astype(np.int32)
    check(tg.tensor(i).cumsum(axis), np.cumsum(i, axis).astype(np.int32))


def test_cumsum_dtypes_and_edges():
    check(tg.tensor([True, False, True]).cumsum(), np.array([1, 1, 2], np.int32))
    check(tg.tensor(np.array([1, 2, 3], np.uint32)).cumsum(), np.array([1, 3, 6], np.uint32))
    check(tg.tensor(np.array([0.5, 0.25, 1.0], np.float16)).cumsum(), np.array([0.5, 0.75, 1.75], np.float16))
    check(tg.zeros((0, 4)).cumsum(1), np.zeros((0, 4), np.float32))
    check(tg.tensor(np.array([2**31 - 1, 1], np.int32)).cumsum(), np.array([2**31 - 1, -2**31], np.int32))
    x = tg.tensor(np.arange(12, dtype=np.float32).reshape(3, 4))
    check(x.T.cumsum(0), np.cumsum(np.arange(12, dtype=np.float32).reshape(3, 4).T, 0))


def test_cumsum_rows_past_the_kernel_limit():
    """Rows longer than one workgroup scans are scanned in blocks (block totals scanned and added)."""
    from tensorgpu import customops
    x = rng.integers(-3, 4, (2, 1000)).astype(np.int32)
    got = customops._cumsum_rows(tg.tensor(x), 64)       # a small block length forces two levels
    check(got, np.cumsum(x, 1).astype(np.int32))
    f = rng.standard_normal((1, 777)).astype(np.float32)
    got = customops._cumsum_rows(tg.tensor(f), 100).numpy()
    np.testing.assert_allclose(got, np.cumsum(f, 1), rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------- sort, argsort, topk


def _values(dtype, shape, r):
    if dtype is tg.float32:
        v = r.standard_normal(shape).astype(np.float32)
        v[r.random(shape) < 0.2] = 1.0                # ties
        v[r.random(shape) < 0.05] = np.nan
        v[r.random(shape) < 0.05] = -0.0
        return v
    if dtype is tg.float16:
        return (r.integers(-20, 20, shape) / 4).astype(np.float16)
    if dtype is tg.int32:
        return r.integers(-5, 5, shape).astype(np.int32)
    if dtype is tg.uint32:
        return r.integers(0, 2**32 - 1, shape, dtype=np.uint64).astype(np.uint32) % 7 * 0xFFFFFF
    return r.random(shape) < 0.5


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=70), data=st.data(),
       dtype=st.sampled_from([tg.float32, tg.float16, tg.int32, tg.uint32, tg.bool]))
def test_argsort_and_sort_match_numpy_stable(shape, data, dtype):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    x = _values(dtype, shape, np.random.default_rng(data.draw(st.integers(0, 2**31))))
    t = tg.tensor(x)
    check(t.argsort(axis), np.argsort(x, axis, kind="stable").astype(np.int32))
    check(tg.sort(t, axis), np.sort(x, axis, kind="stable"))


def test_sort_descending_and_in_place():
    x = np.array([[3, 1, np.nan, 2, 1], [0, -1, -0.0, 5, 5]], np.float32)
    t = tg.tensor(x)
    # descending: the largest first, NaN first (it is the largest), ties in their original order
    check(t.argsort(descending=True), np.array([[2, 0, 3, 1, 4], [3, 4, 0, 2, 1]], np.int32))
    t.sort()                                       # NumPy's ndarray.sort: in place
    check(t, np.sort(x))
    check(tg.sort(tg.tensor(x), None), np.sort(x, None))


def _topk_ref(x, k, largest):
    """torch.topk's order: the largest first (NaN counts as the largest), ties by lower index."""
    key = np.where(np.isnan(x), np.inf, x).astype(np.float64)
    nan = np.isnan(x)
    idx = np.broadcast_to(np.arange(x.shape[-1]), x.shape)
    # np.lexsort: the last key is the primary one; ties fall through to the next
    order = np.lexsort((idx, ~nan, -key), axis=-1) if largest else np.lexsort((idx, nan, key), axis=-1)
    order = order[..., :k]
    return np.take_along_axis(x, order, -1), order.astype(np.int32)


@pytest.mark.parametrize("n,k", [(10, 3), (2048, 5), (2049, 1), (5000, 17), (70000, 50), (3000, 1024)])
@pytest.mark.parametrize("largest", [True, False])
def test_topk_any_row_length(n, k, largest):
    x = rng.standard_normal((2, n)).astype(np.float32)
    x[:, ::97] = 0.5                              # ties across chunks
    x[0, n // 3] = np.nan
    v, i = tg.tensor(x).topk(k, largest=largest)
    wv, wi = _topk_ref(x, k, largest)
    check(i, wi)
    check(v, wv)


def test_topk_axis_dtypes_and_fusion():
    x = rng.integers(-50, 50, (4, 6, 5)).astype(np.int32)
    v, i = tg.topk(x, 2, axis=1)
    order = np.argsort(-x, 1, kind="stable")[:, :2]
    check(i, order.astype(np.int32))
    check(v, np.take_along_axis(x, order, 1))
    h = rng.standard_normal((3, 9)).astype(np.float16)
    v, i = tg.tensor(h).topk(4, largest=False)
    check(v, np.sort(h, -1)[:, :4])
    logits = tg.tensor(rng.standard_normal((1, 300)).astype(np.float32)).realize()
    v, i = logits.topk(8)
    total = (v * 2).exp().sum()                    # the values are a gather fused into what reads them
    log = kernels(lambda: total.realize())
    assert [e.name.split("[")[0].split("_")[0] for e in log] == ["argsort", "R"]
    top = np.sort(logits.numpy()[0])[::-1][:8]
    check(total, np.exp(top * 2).sum(), rtol=1e-5)


def test_sort_errors():
    long = tg.zeros((2, 5000))
    with no_gpu_work(), pytest.raises(ValueError, match=r"5000 elements.*up to 2048.*topk"):
        long.argsort()
    with no_gpu_work(), pytest.raises(ValueError, match="k=3000"):
        long.topk(3000)
    with no_gpu_work(), pytest.raises(ValueError, match="out of range"):
        tg.zeros((2, 5)).topk(6)
    with no_gpu_work(), pytest.raises(ValueError, match="0-d"):
        tg.tensor(1.0).argsort()
    with no_gpu_work(), pytest.raises(TypeError, match="k must be an int"):
        tg.zeros(5).topk(2.0)


# ----------------------------------------------------------------------------- dot and friends


@pytest.mark.parametrize("sa,sb", [((), (3,)), ((4,), (4,)), ((2, 4), (4,)), ((4,), (4, 3)), ((2, 4), (4, 3)),
                                   ((2, 3, 4), (4, 5)), ((2, 3, 4), (5, 4, 2)), ((4,), (2, 4, 3)), ((3, 4), ())])
def test_dot_matches_numpy(sa, sb):
    a = rng.standard_normal(sa).astype(np.float32)
    b = rng.standard_normal(sb).astype(np.float32)
    check(tg.dot(tg.tensor(a), tg.tensor(b)), np.dot(a, b), rtol=1e-5, atol=1e-5)
    ia, ib = (rng.integers(-9, 9, s).astype(np.int32) for s in (sa, sb))
    check(tg.tensor(ia).dot(tg.tensor(ib)), np.dot(ia, ib).astype(np.int32))


def test_dot_shape_error():
    with no_gpu_work(), pytest.raises(ValueError, match=r"\(2, 3\) and \(4,\) not aligned"):
        tg.dot(tg.zeros((2, 3)), tg.zeros(4))


def test_creation_and_shape_helpers():
    check(tg.linspace(0, 1, 5), np.linspace(0, 1, 5).astype(np.float32))
    check(tg.linspace(-3, 7, 4, endpoint=False), np.linspace(-3, 7, 4, endpoint=False).astype(np.float32))
    t, step = tg.linspace(2, 3, 3, retstep=True)
    assert step == 0.5
    check(tg.linspace(0, 10, 4, dtype=tg.int32), np.linspace(0, 10, 4, dtype=np.int32))
    for args in [(3,), (3, 5), (4, 2, 1), (3, 3, -1), (2, 4, 7), (0,)]:
        check(tg.eye(*args), np.eye(*args, dtype=np.float32))
    check(tg.eye(3, dtype=tg.int32), np.eye(3, dtype=np.int32))
    x = rng.standard_normal((2, 3)).astype(np.float32)
    check(tg.concatenate([tg.tensor(x), x * 2], 1), np.concatenate([x, x * 2], 1))
    check(tg.concatenate([tg.tensor(x), x[:1]], None), np.concatenate([x, x[:1]], None))
    for axis in (0, 2, -1, (0, 3), (-1, 1)):
        check(tg.expand_dims(tg.tensor(x), axis), np.expand_dims(x, axis))
    check(tg.tensor(x).T.ravel(), x.T.ravel())
    t = tg.tensor(x)
    c = t.copy()
    c[0, 0] = 100.0
    check(t, x)
    assert c.numpy()[0, 0] == 100
    with pytest.raises(ValueError, match="repeated"):
        tg.expand_dims(t, (1, 1))


def test_transpose_numpy_semantics():
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)
    t = tg.tensor(x)
    check(t.transpose(), x.transpose())
    check(t.transpose(2, 0, 1), x.transpose(2, 0, 1))
    check(t.transpose((1, 2, 0)), x.transpose((1, 2, 0)))
    check(tg.transpose(t, (1, 2, 0)), np.transpose(x, (1, 2, 0)))
    m = x[0]
    check(tg.tensor(m).transpose(0, 1), m.transpose(0, 1))      # 2-d: NumPy's identity permutation
    check(tg.tensor(m).transpose(1, 0), m.transpose(1, 0))
    check(t.swapaxes(0, 2), x.swapaxes(0, 2))
    check(t.moveaxis(0, -1), np.moveaxis(x, 0, -1))
    check(t.moveaxis((0, 1), (2, 0)), np.moveaxis(x, (0, 1), (2, 0)))
    with no_gpu_work(), pytest.raises(ValueError, match="don't match"):
        t.transpose(0, 1)                # two axes of a 3-d tensor: NumPy raises too (swapaxes exchanges two)
    with no_gpu_work(), pytest.raises(ValueError, match="don't match"):
        t.transpose(0, 1, 2, 3)
    with no_gpu_work(), pytest.raises(ValueError, match="not a permutation"):
        t.transpose(0, 0, 1)
