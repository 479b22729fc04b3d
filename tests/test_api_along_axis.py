"""tg.take_along_axis / tg.put_along_axis against NumPy: shapes and axes (hypothesis), every
plain dtype, broadcasting indices and values, negative indices, writes through views of a
realized tensor, ordering with other lazy reads and writes, the batched KV-cache write the
models use (eagerly and under tg.capture with new positions per replay: one small kernel,
no copy of the cache), duplicate indices (what is guaranteed), and every bad input refused
before any GPU work. Values are moved, never computed, so comparisons are exact."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tensorgpu as tg
from core_util import TG_TO_NP, check, f16_path, kernels, no_gpu_work  # noqa: F401  (fixture)

rng = np.random.default_rng(16)


@st.composite
def along_case(draw, unique=False):
    """(array shape, axis, index shape, index values): the index has the array's ndim, its
    non-axis dims 1 or the array's, values in [-n, n) (unique along the axis for puts)."""
    nd = draw(st.integers(1, 4))
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=nd, max_size=nd)))
    axis = draw(st.integers(-nd, nd - 1))
    ax = axis % nd
    n = shape[ax]
    k = draw(st.integers(1, n)) if unique else draw(st.integers(0, 5))
    ishape = tuple(k if d == ax else draw(st.sampled_from([1, s])) for d, s in enumerate(shape))
    seed = draw(st.integers(0, 2**31))
    r = np.random.default_rng(seed)
    if unique:
        lead = ishape[:ax] + ishape[ax + 1:]
        perms = np.stack([r.permutation(n)[:k] for _ in range(int(np.prod(lead)))]) if lead else r.permutation(n)[:k]
        idx = np.moveaxis(perms.reshape(lead + (k,)), -1, ax)
        idx = np.where(r.random(idx.shape) < 0.3, idx - n, idx)      # some negative, same positions
    else:
        idx = r.integers(-n, n, ishape)
    return shape, axis, idx.astype(np.int32)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=along_case())
def test_take_along_axis_matches_numpy(case):
    shape, axis, idx = case
    a = rng.standard_normal(shape).astype(np.float32)
    check(tg.take_along_axis(tg.tensor(a), idx, axis), np.take_along_axis(a, idx, axis))
    check(tg.take_along_axis(tg.tensor(a), tg.tensor(idx), axis), np.take_along_axis(a, idx, axis))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=along_case(unique=True), vshape=st.sampled_from(["full", "scalar", "row"]))
def test_put_along_axis_matches_numpy(case, vshape):
    shape, axis, idx = case
    base = rng.standard_normal(shape).astype(np.float32)
    full = np.broadcast_shapes(idx.shape, tuple(1 if d == axis % len(shape) else s for d, s in enumerate(shape)))
    values = {"full": rng.standard_normal(full).astype(np.float32), "scalar": np.float32(7.5),
              "row": rng.standard_normal(full[-1:]).astype(np.float32)}[vshape]
    ref = base.copy()
    np.put_along_axis(ref, idx, values, axis)
    t = tg.tensor(base)
    tg.put_along_axis(t, idx, tg.tensor(values) if vshape != "scalar" else 7.5, axis)
    check(t, ref)


@pytest.mark.parametrize("dtype", [tg.float32, tg.float16, tg.int32, tg.uint32, tg.bool])
def test_take_and_put_every_dtype(dtype, f16_path):
    npd = TG_TO_NP[dtype]
    base = (np.arange(35) % 7).astype(npd).reshape(5, 7)
    idx = np.array([[6, 0, -1], [2, 2, 3], [0, 1, 2], [5, 4, 3], [1, 6, 0]], np.int32)
    check(tg.take_along_axis(tg.tensor(base), idx, 1), np.take_along_axis(base, idx, 1))
    pidx = np.array([[4, 0, 2, 1, 3, 0, 2]], np.int32)     # one row per column: no duplicates
    vals = (np.arange(7) % 2 + 5).astype(npd).reshape(1, 7)
    ref = base.copy()
    np.put_along_axis(ref, pidx, vals, 0)
    t = tg.tensor(base)
    tg.put_along_axis(t, pidx, tg.tensor(vals), 0)
    check(t, ref)


def test_axis_none_flattens():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    idx = np.array([11, 0, -2, 5], np.int32)
    check(tg.take_along_axis(tg.tensor(a), idx, None), np.take_along_axis(a, idx, None))
    ref = a.copy()
    np.put_along_axis(ref, idx, np.array([-1, -2, -3, -4], np.float32), None)
    t = tg.tensor(a)
    tg.put_along_axis(t, idx, tg.tensor([-1.0, -2.0, -3.0, -4.0]), None)
    check(t, ref)


def test_gather_fuses_with_its_source_and_reader():
    """take_along_axis(exp(x), i) * 2 is one kernel: the gather reads exp(x) only where it is needed."""
    x = tg.tensor(rng.standard_normal((4, 6)).astype(np.float32)).realize()
    i = tg.tensor(rng.integers(0, 6, (4, 3)).astype(np.int32)).realize()
    y = tg.take_along_axis(x.exp(), i, 1) * 2
    log = kernels(lambda: y.realize())
    assert len(log) == 1, [k.name for k in log]
    check(y, np.take_along_axis(np.exp(x.numpy()), i.numpy(), 1) * 2, rtol=1e-6)


def test_gather_of_a_reduction_and_a_reduction_of_a_gather():
    x = rng.standard_normal((5, 8)).astype(np.float32)
    i = rng.integers(0, 5, (3, 8)).astype(np.int32)
    t = tg.tensor(x)
    check(tg.take_along_axis(t.sum(0, keepdims=True), np.zeros((1, 2), np.int32) + [[3, 1]], 1),
          np.take_along_axis(x.sum(0, keepdims=True), np.array([[3, 1]]), 1), rtol=1e-5, atol=1e-6)
    check(tg.take_along_axis(t, i, 0).sum(0), np.take_along_axis(x, i, 0).sum(0), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- the KV-cache write

S, H, L, D = 6, 2, 8, 4


def _kv_ref(cache, pos, k):
    ref = cache.copy()
    np.put_along_axis(ref[:len(pos)], pos[:, None, None, None], k[:, :, None, :], axis=2)
    return ref


@pytest.mark.parametrize("cache_dtype", [tg.float32, tg.float16])
def test_batched_kv_cache_write(cache_dtype, f16_path):
    npd = TG_TO_NP[cache_dtype]
    base = rng.standard_normal((S, H, L, D)).astype(npd)
    cache = tg.tensor(base)
    buf = cache.node.buffer
    B = 4
    pos = np.array([7, 0, 3, 3], np.int32)
    k = rng.standard_normal((B, H, D)).astype(np.float32)
    kt = tg.tensor(k).realize()
    pt = tg.tensor(pos).realize()
    log = kernels(lambda: (tg.put_along_axis(cache[:B], pt[:, None, None, None], kt[:, :, None, :], axis=2),
                           cache.realize()))
    assert [e.name for e in log] == ["E_scatter"]
    # one thread per written element, never the whole cache
    assert log[0].workgroups[0] * 256 < S * H * L * D and log[0].workgroups[0] == -(-B * H * D // 256)
    assert cache.node.buffer is buf
    check(cache, _kv_ref(base, pos, k.astype(npd)))


def test_batched_kv_cache_write_under_capture():
    """The position tensor changes between replays; each replay writes the new rows, only them."""
    cache = tg.tensor(np.zeros((S, H, L, D), np.float32))
    ref = np.zeros((S, H, L, D), np.float32)
    B = 3

    @tg.capture
    def write(pos, k):
        tg.put_along_axis(cache[:B], pos[:, None, None, None], k[:, :, None, :] * 1.0, axis=2)

    for step, pos in enumerate([[0, 1, 2], [1, 1, 5], [7, 0, 4], [3, 6, 0]]):
        pos = np.array(pos, np.int32)
        k = rng.standard_normal((B, H, D)).astype(np.float32)
        before = tg.debug.stats()["captures_replayed"]
        write(tg.tensor(pos), tg.tensor(k))
        assert tg.debug.stats()["captures_replayed"] == before + (step > 0)
        ref = _kv_ref(ref, pos, k)
        check(cache, ref)


def test_batched_kv_cache_write_under_capture_with_the_batch_as_an_int():
    """B a step variable: cache[:B] broadcasts against pos's length, so the trace is kept per B."""
    cache = tg.tensor(np.zeros((S, H, L, D), np.float32))
    ref = np.zeros((S, H, L, D), np.float32)

    @tg.capture
    def write(pos, k, B):
        tg.put_along_axis(cache[:B], pos[:, None, None, None], k[:, :, None, :], axis=2)

    for B in (3, 3, 2, 3):
        pos = (np.arange(B) + B).astype(np.int32)
        k = rng.standard_normal((B, H, D)).astype(np.float32)
        write(tg.tensor(pos), tg.tensor(k), B)
        ref = _kv_ref(ref, pos, k)
        check(cache, ref)
    assert len(write.traces) == 2        # one signature per pos length, each specialized to its B


def test_kv_write_ordering_with_reads_and_slice_writes():
    base = rng.standard_normal((S, H, L, D)).astype(np.float32)
    cache = tg.tensor(base)
    before = cache[:2].sum((1, 3))          # lazy read built before the write: old contents
    pos = np.array([5, 2], np.int32)
    k = rng.standard_normal((2, H, D)).astype(np.float32)
    tg.put_along_axis(cache[:2], pos[:, None, None, None], tg.tensor(k)[:, :, None, :], axis=2)
    after = cache[:2].sum((1, 3))           # built after it: new contents
    cache[0, :, 5] = 9.0                    # a slice write issued after the scatter lands last
    ref = _kv_ref(base, pos, k)
    check(before, base[:2].sum((1, 3)), rtol=1e-5, atol=1e-5)
    check(after, ref[:2].sum((1, 3)), rtol=1e-5, atol=1e-5)
    ref[0, :, 5] = 9.0
    check(cache, ref)


def test_scatter_index_that_reads_the_target_is_read_first():
    t = tg.tensor(np.array([[2, 0, 1, 3]], np.int32))
    ref = t.numpy().copy()
    np.put_along_axis(ref, ref.copy(), np.array([[7, 8, 9, 10]], np.int32), 1)
    tg.put_along_axis(t, t, tg.tensor([[7, 8, 9, 10]]), 1)
    check(t, ref)


def test_duplicate_indices_write_one_of_the_values():
    """Documented guarantee: a duplicated position holds one of the values aimed at it, whole;
    every other position is written exactly. Which value wins is not specified."""
    for dtype in (tg.float32, tg.float16):
        t = tg.tensor(np.zeros((1, 9), TG_TO_NP[dtype]))
        vals = np.arange(1, 9, dtype=np.float32).reshape(1, 8)
        idx = np.array([[0, 0, 0, 1, 2, 2, 4, 5]], np.int32)
        tg.put_along_axis(t, idx, tg.tensor(vals), 1)
        got = t.numpy()[0]
        assert got[0] in (1, 2, 3) and got[2] in (5, 6)
        assert got[1] == 4 and got[4] == 7 and got[5] == 8
        assert got[3] == 0 and got[6] == 0 and got[7] == 0 and got[8] == 0


def test_out_of_range_index_computed_on_the_gpu():
    """Indices not known on the host are not checked: a gather reads 0, a scatter writes nothing."""
    idx = tg.tensor(np.array([[0, 5, -7, 2]], np.int32)) * 1   # lazy: its range is not known
    x = np.array([[1, 2, 3, 4]], np.float32)
    check(tg.take_along_axis(tg.tensor(x), idx, 1), np.array([[1, 0, 0, 3]], np.float32))
    t = tg.tensor(x)
    tg.put_along_axis(t, idx, tg.tensor([[10.0, 20.0, 30.0, 40.0]]), 1)
    check(t, np.array([[10, 2, 40, 4]], np.float32))


def test_write_into_a_lazy_tensor_owns_a_copy():
    t = tg.tensor(np.arange(6, dtype=np.float32).reshape(2, 3)) * 2
    tg.put_along_axis(t, np.array([[2], [0]]), 0.5, 1)
    check(t, np.array([[0, 2, 0.5], [0.5, 8, 10]], np.float32))


def test_bad_inputs_raise_before_gpu_work():
    t = tg.tensor(np.zeros((3, 4), np.float32))
    ok = np.zeros((3, 1), np.int32)
    cases = [
        (ValueError, "same number of dimensions", lambda: tg.take_along_axis(t, np.zeros(3, np.int32), 1)),
        (ValueError, "same number of dimensions", lambda: tg.put_along_axis(t, np.zeros(3, np.int32), 1.0, 1)),
        (IndexError, "integer", lambda: tg.take_along_axis(t, np.zeros((3, 1), np.float32), 1)),
        (IndexError, "integer", lambda: tg.take_along_axis(t, tg.zeros((3, 1)), 1)),
        (IndexError, "out of bounds for axis 1 with size 4", lambda: tg.take_along_axis(t, ok + 4, 1)),
        (IndexError, "-5 is out of bounds", lambda: tg.put_along_axis(t, ok - 5, 1.0, 1)),
        (IndexError, "out of bounds", lambda: tg.put_along_axis(t, tg.tensor(ok + 9), 1.0, 1)),
        (ValueError, "broadcast", lambda: tg.put_along_axis(t, ok, tg.zeros((3, 2)), 1)),
        (ValueError, r"\(2, 1\).*\(3, 4\)", lambda: tg.take_along_axis(t, np.zeros((2, 1), np.int32), 1)),
        (TypeError, "in place", lambda: tg.put_along_axis(np.zeros((3, 4)), ok, 1.0, 1)),
        (np.exceptions.AxisError, "axis 2", lambda: tg.take_along_axis(t, ok, 2)),
        (ValueError, "1-d", lambda: tg.take_along_axis(t, ok, None)),
    ]
    for exc, msg, fn in cases:
        with no_gpu_work(), pytest.raises(exc, match=msg):
            fn()
    check(t, np.zeros((3, 4), np.float32))
