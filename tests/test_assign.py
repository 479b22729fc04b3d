"""In-place writes `t[idx] = value` against NumPy: tensor or scalar values with broadcasting,
every plain dtype (float16 through the strided CAS path and the contiguous pair path, with and
without shader-f16), ordering with pending lazy reads, overlapping self-assignment, and writes
into zeros()/full()/lazy results. Values are moved, so comparisons are exact (float16 of a
float32 value: rounded as NumPy does)."""
import numpy as np
import pytest

import tensorgpu as tg
from core_util import TG_TO_NP, check, f16_path, no_gpu_work  # noqa: F401  (fixture)

rng = np.random.default_rng(3)
BASE = np.arange(24, dtype=np.float32).reshape(4, 6)

CASES = [
    ((slice(1, 3), slice(None, None, 2)), 7.0),
    ((slice(None), slice(1, 3)), np.array([[-1, -2]], np.float32)),
    (2, np.arange(6, dtype=np.float32)),
    ((slice(None, None, -1), 0), 3.0),
    ((Ellipsis, -1), np.array([9, 8, 7, 6], np.float32)),
    ((slice(None), None, slice(4, None)), np.array([[[5, 6]]], np.float32)),
    (Ellipsis, 1.5),
    ((1, 2), -4.0),
    ((slice(3, 1),), 100.0),  # empty target: nothing happens
    ((slice(None, None, 3), slice(None, None, -2)), np.array([1, 2, 3], np.float32)),
    ((slice(1, None), slice(None)), np.arange(18, dtype=np.float32).reshape(3, 6)[::-1]),
]


@pytest.mark.parametrize("idx,val", CASES, ids=[str(i) for i in range(len(CASES))])
@pytest.mark.parametrize("as_tensor", [True, False])
def test_setitem_float32(idx, val, as_tensor):
    t = tg.tensor(BASE)
    ref = BASE.copy()
    ref[idx] = val
    t[idx] = tg.tensor(val) if as_tensor and isinstance(val, np.ndarray) else val
    check(t, ref)


@pytest.mark.parametrize("dtype", [tg.int32, tg.uint32, tg.bool, tg.float16])
def test_setitem_dtypes(dtype, f16_path):
    npd = TG_TO_NP[dtype]
    base = (np.arange(35) % 5).astype(npd).reshape(5, 7)
    t, ref = tg.tensor(base), base.copy()
    for idx, val in [((slice(1, 4), slice(None, None, 3)), 1), ((4,), np.arange(7) % 2), ((0, slice(1, 6)), 3),
                     ((slice(None), 6), np.array([0, 1, 0, 1, 1])), ((slice(None, None, -2), slice(2, 5)), 2),
                     ((3, slice(0, 3)), 4), ((2, 1), 0)]:
        v = np.asarray(val).astype(npd)
        ref[idx] = v
        t[idx] = tg.tensor(v) if v.ndim else v.item()
    check(t, ref)


@pytest.mark.parametrize("start,stop,step", [(0, 3, 1), (1, 4, 1), (2, 9, 1), (0, 9, 1), (1, 8, 2), (8, 0, -3), (3, 4, 1), (5, 6, 1)])
def test_setitem_float16_odd_sizes_and_offsets(start, stop, step, f16_path):
    """A float16 neighbour of a written element keeps its value, whether f16 is packed in
    32-bit words (pair stores / CAS) or native."""
    base = np.arange(9, dtype=np.float16) + 0.5
    t = tg.tensor(base)
    ref = base.copy()
    ref[start:stop:step] = -2.25
    t[start:stop:step] = -2.25
    check(t, ref)
    v = (np.arange(len(range(start, stop, step))) * 3).astype(np.float32)
    ref[start:stop:step] = v
    t[start:stop:step] = tg.tensor(v)  # float32 values rounded to float16
    check(t, ref)


def test_setitem_float16_matrix_rows_and_columns(f16_path):
    base = rng.standard_normal((5, 7)).astype(np.float16)
    t, ref = tg.tensor(base), base.copy()
    for idx, v in [((1, slice(None)), 1.5), ((slice(None), 3), 2.5), ((slice(2, 5), slice(1, 6)), -1.0),
                   ((0, slice(None, None, -1)), np.arange(7, dtype=np.float32))]:
        ref[idx] = v
        t[idx] = tg.tensor(v) if isinstance(v, np.ndarray) else v
        check(t, ref)


def test_setitem_converts_value_dtype():
    t = tg.tensor(np.arange(5, dtype=np.int32))
    t[1:3] = tg.tensor([1.7, -2.7])  # truncation toward zero, as NumPy's assignment
    check(t, np.array([0, 1, -2, 3, 4], np.int32))
    f = tg.tensor(np.zeros(3, np.float32))
    f[...] = tg.tensor([True, False, True])
    check(f, np.array([1, 0, 1], np.float32))
    b = tg.zeros((4,), tg.bool)
    b[1:] = tg.tensor([0.0, 2.5, -1.0])
    check(b, np.array([False, False, True, True]))


# ----------------------------------------------------------------------------- ordering


def test_pending_lazy_read_sees_old_values():
    t = tg.tensor(BASE)
    y = t * 2              # lazy: nothing ran yet
    s = t.sum(1)           # lazy reduction
    v = t.T                # a view: NumPy semantics, sees the write
    t[0] = 5.0
    check(y, BASE * 2)
    check(s, BASE.sum(1))
    after = BASE.copy()
    after[0] = 5
    check(v, after.T)
    check(t, after)


def test_reader_of_a_lazy_value_realized_later():
    x = tg.tensor(np.arange(4, dtype=np.float32))
    X = x + 1
    Y = X * 2               # built while X was lazy
    M = X.sum()
    X.realize()
    X[0] = 100.0
    check(Y, (np.arange(4) + 1) * 2.0)
    check(M, np.array(10.0, np.float32))
    check(X, np.array([100, 2, 3, 4], np.float32))


def test_several_writes_and_reads_interleaved():
    t = tg.zeros((6,))
    outs, ref, refs = [], np.zeros(6, np.float32), []
    for i in range(5):
        t[i] = float(i + 1)
        ref[i] = i + 1
        outs.append(t * 10 + 1)
        refs.append(ref * 10 + 1)
    t[:] = -1.0
    for o, r in zip(outs, refs):
        check(o, r)
    check(t, np.full(6, -1, np.float32))


def test_kv_cache_pattern():
    """A preallocated cache written one row per step while earlier reads are still pending."""
    cache = tg.zeros((5, 3))
    ref = np.zeros((5, 3), np.float32)
    sums, want = [], []
    for step in range(5):
        row = rng.standard_normal(3).astype(np.float32)
        cache[step] = tg.tensor(row)
        ref[step] = row
        sums.append(cache[: step + 1].sum(0))
        want.append(ref[: step + 1].sum(0))
    for s, w in zip(sums, want):
        check(s, w, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- overlap, targets


def test_overlapping_self_assignment_matches_numpy():
    for idx_dst, idx_src, f in [((slice(1, None),), (slice(None, -1),), lambda v: v),
                                ((slice(None, -1),), (slice(1, None),), lambda v: v),
                                ((slice(None), slice(1, None)), (slice(None), slice(None, -1)), lambda v: v * 2),
                                ((slice(None, None, -1),), (slice(None),), lambda v: v + 1),
                                ((Ellipsis,), (slice(None, None, -1), slice(None, None, -1)), lambda v: v)]:
        t = tg.tensor(BASE)
        ref = BASE.copy()
        ref[idx_dst] = f(ref[idx_src].copy())
        t[idx_dst] = f(t[idx_src])
        check(t, ref)
    sq = np.arange(16, dtype=np.float32).reshape(4, 4)
    t = tg.tensor(sq)
    t[...] = t.T
    check(t, sq.T)


def test_assign_into_zeros_full_and_lazy_results():
    z = tg.zeros((3, 4))
    z[1, ::2] = 5.0
    ref = np.zeros((3, 4), np.float32)
    ref[1, ::2] = 5
    check(z, ref)
    f = tg.full((2, 3), 7, tg.int32)
    f[:, 0] = tg.tensor([1, 2])
    check(f, np.array([[1, 7, 7], [2, 7, 7]], np.int32))
    lazy = tg.tensor(BASE) * 2
    lazy[0] = 0.0
    ref = BASE * 2
    ref[0] = 0
    check(lazy, ref)
    e = tg.empty((2, 2))
    e[...] = 3.0
    check(e, np.full((2, 2), 3, np.float32))
    x = tg.tensor(np.array([[1.0, 2.0]], np.float32)).expand(3, 2)  # a broadcast view gets its own copy
    x[1, 0] = 9.0
    check(x, np.array([[1, 2], [9, 2], [1, 2]], np.float32))


def test_write_through_a_view_of_a_realized_tensor():
    t = tg.tensor(BASE)
    v = t[1:3, ::-1]
    v[0, 0] = 100.0
    ref = BASE.copy()
    ref[1, -1] = 100
    check(t, ref)
    check(v, ref[1:3, ::-1])


def test_assign_zero_d_and_scalars():
    t = tg.tensor(3.0)
    t[...] = 5.0
    check(t, np.array(5.0, np.float32))
    t[()] = tg.tensor(6.0)
    check(t, np.array(6.0, np.float32))


def test_bad_assignments_raise_before_gpu_work():
    t = tg.tensor(BASE)
    with no_gpu_work(), pytest.raises(ValueError, match=r"\(6,\).*\(5,\)|\(5,\).*\(6,\)"):
        t[0] = tg.tensor(np.zeros(5, np.float32))
    with no_gpu_work(), pytest.raises(ValueError):
        t[0:2] = tg.tensor(np.zeros((3, 6), np.float32))
    with no_gpu_work(), pytest.raises(ValueError):
        t[0] = tg.tensor(np.zeros((2, 6), np.float32))  # more dims than the target
    with no_gpu_work(), pytest.raises(IndexError):
        t[4] = 1.0
    with no_gpu_work(), pytest.raises(TypeError):
        t[0] = "x"
    check(t, BASE)
