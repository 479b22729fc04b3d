"""Advanced indexing against NumPy: integer arrays, lists and int tensors among slices, ints,
None and an Ellipsis (hypothesis over shapes and index mixes: adjacent advanced indices keep
their place, separated ones go first), boolean masks, and the same for assignment (scatter),
ordered with other lazy reads and writes. Values are moved, so comparisons are exact."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tensorgpu as tg
from core_util import TG_TO_NP, check, kernels, no_gpu_work

rng = np.random.default_rng(7)


@st.composite
def index_case(draw):
    """(shape, index tuple) with at least one integer array; arrays broadcast together."""
    nd = draw(st.integers(1, 4))
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=nd, max_size=nd)))
    bshape = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2)))
    items, n_arr = [], 0
    for s in shape:
        kind = draw(st.sampled_from(["slice", "int", "arr", "arr", "full"]))
        if draw(st.booleans()) and draw(st.booleans()):
            items.append(None)
        if kind == "slice":
            a, b = draw(st.integers(-s - 1, s + 1)), draw(st.integers(-s - 1, s + 1))
            items.append(slice(a, b, draw(st.sampled_from([1, 2, -1]))))
        elif kind == "int":
            items.append(draw(st.integers(-s, s - 1)))
        elif kind == "full":
            items.append(slice(None))
        else:
            ashape = bshape[draw(st.integers(0, len(bshape))):]
            ashape = tuple(1 if draw(st.booleans()) else x for x in ashape)
            seed = draw(st.integers(0, 2**31))
            arr = np.random.default_rng(seed).integers(-s, s, ashape).astype(np.int32)
            items.append(arr if draw(st.booleans()) else arr.tolist() if arr.ndim else arr)
            n_arr += 1
    if n_arr == 0:
        items[-1] = np.array([0, -1], np.int32) if items[-1] is not None else items[-1]
        if items[-1] is None:
            items.append(np.array([0], np.int32))
    if draw(st.booleans()):       # an Ellipsis standing for the trailing full slices
        while items and isinstance(items[-1], slice) and items[-1] == slice(None):
            items.pop()
        items.append(Ellipsis)
    return shape, tuple(items)


def _np_index(idx):
    return tuple(np.asarray(i) if isinstance(i, list) else i for i in idx)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=index_case())
def test_getitem_matches_numpy(case):
    shape, idx = case
    a = rng.standard_normal(shape).astype(np.float32)
    want = a[_np_index(idx)]
    got = tg.tensor(a)[idx]
    check(got, np.asarray(want))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=index_case())
def test_setitem_matches_numpy(case):
    """t[idx] = t[idx] * 2 + 1 and t[idx] = scalar: duplicate indices write equal values, so the
    result is NumPy's whatever order the GPU threads run in."""
    shape, idx = case
    a = rng.standard_normal(shape).astype(np.float32)
    ref = a.copy()
    ref[_np_index(idx)] = ref[_np_index(idx)] * 2 + 1
    t = tg.tensor(a)
    t[idx] = t[idx] * 2 + 1
    check(t, ref)
    ref[_np_index(idx)] = -3.0
    t[idx] = -3.0
    check(t, ref)


def test_setitem_with_unique_indices_and_broadcast_values():
    a = np.zeros((4, 5, 3), np.float32)
    rows, cols = np.array([[0], [3]]), np.array([4, 1, 2])
    vals = np.arange(3, dtype=np.float32)
    ref = a.copy()
    ref[rows, cols] = vals                # values broadcast to (2, 3, 3)
    t = tg.tensor(a)
    t[rows, cols] = tg.tensor(vals)
    check(t, ref)
    ref[:, [2, 0], 1] = np.array([[5, 6]], np.float32)
    t[:, [2, 0], 1] = tg.tensor(np.array([[5, 6]], np.float32))
    check(t, ref)


@pytest.mark.parametrize("dtype", [tg.float32, tg.float16, tg.int32, tg.uint32, tg.bool])
def test_gather_and_scatter_every_dtype(dtype):
    npd = TG_TO_NP[dtype]
    a = (np.arange(20) % 3).astype(npd).reshape(4, 5)
    t = tg.tensor(a)
    check(t[[3, 0, 0]], a[[3, 0, 0]])
    check(t[:, tg.tensor([4, 1])], a[:, [4, 1]])
    ref = a.copy()
    ref[[1, 2], [0, 4]] = np.array([1, 0]).astype(npd)
    t[[1, 2], [0, 4]] = tg.tensor(np.array([1, 0]).astype(npd))
    check(t, ref)


def test_int_tensor_index_and_lazy_index():
    a = rng.standard_normal((6, 3)).astype(np.float32)
    t = tg.tensor(a)
    i = tg.tensor(np.array([5, 1, 1, 0], np.int32))
    check(t[i], a[[5, 1, 1, 0]])
    check(t[(i + 1) % 6], a[[0, 2, 2, 1]])             # a lazy index computed in the same kernel
    check(t[i.argmax()], a[np.argmax([5, 1, 1, 0])])   # a 0-d int tensor picks one row


def test_gather_fuses():
    x = tg.tensor(rng.standard_normal((8, 4)).astype(np.float32)).realize()
    i = tg.tensor(np.array([7, 0, 3], np.int32)).realize()
    y = (x * 3)[i].sum(1)
    log = kernels(lambda: y.realize())
    assert len(log) == 1, [k.name for k in log]
    check(y, (x.numpy() * 3)[[7, 0, 3]].sum(1), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- masks


def test_boolean_mask_getitem():
    a = rng.standard_normal((3, 4, 5)).astype(np.float32)
    t = tg.tensor(a)
    m = a[:, :, 0] > 0
    check(t[m], a[m])
    check(t[tg.tensor(a) > 0.5], a[a > 0.5])
    check(t[[True, False, True]], a[[True, False, True]])
    check(t[:, np.array([True, False, False, True]), 2], a[:, np.array([True, False, False, True]), 2])
    check(t[np.zeros((3, 4), bool)], a[np.zeros((3, 4), bool)])   # nothing selected: (0, 5)


def test_boolean_mask_setitem_scalar_needs_no_readback():
    a = rng.standard_normal((4, 6)).astype(np.float32)
    t = tg.tensor(a)
    ref = a.copy()
    ref[ref < 0] = 0.0
    before = tg.debug.stats()["readbacks"]
    t[t < 0] = 0.0
    assert tg.debug.stats()["readbacks"] == before
    check(t, ref)
    ref[np.array([True, False, True, False])] = 7.0
    t[np.array([True, False, True, False])] = 7.0
    check(t, ref)


def test_boolean_mask_setitem_with_values():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    m = a % 3 == 0
    ref = a.copy()
    ref[m] = -np.arange(m.sum(), dtype=np.float32)
    t = tg.tensor(a)
    t[tg.tensor(m)] = tg.tensor(-np.arange(m.sum(), dtype=np.float32))
    check(t, ref)


def test_mask_inside_capture_is_a_clear_error():
    @tg.capture
    def f(x):
        return x[x > 0]

    with pytest.raises(RuntimeError, match="where"):
        f(tg.tensor(np.ones(3, np.float32)))


# ----------------------------------------------------------------------------- ordering, errors


def test_scatter_ordered_with_reads_and_slice_writes():
    a = np.arange(10, dtype=np.float32)
    t = tg.tensor(a)
    old = t * 1                      # built before the writes: old values
    t[[1, 3]] = 100.0
    mid = t[[3, 4]]                  # after the scatter, before the slice write
    t[2:5] = -1.0
    t[[4]] = tg.tensor([9.0])
    ref = a.copy()
    check(old, ref)
    ref[[1, 3]] = 100
    check(mid, ref[[3, 4]])
    ref[2:5] = -1
    ref[[4]] = 9
    check(t, ref)


def test_scatter_value_reading_the_target():
    a = np.arange(6, dtype=np.float32)
    t = tg.tensor(a)
    t[[0, 1, 2]] = t[[5, 4, 3]]
    ref = a.copy()
    ref[[0, 1, 2]] = ref[[5, 4, 3]]
    check(t, ref)


def test_bad_indices_raise_before_gpu_work():
    t = tg.tensor(np.zeros((3, 4), np.float32))
    cases = [
        (IndexError, "out of bounds for axis 0 with size 3", lambda: t[[0, 3]]),
        (IndexError, "-5 is out of bounds for axis 1", lambda: t[:, [-5]]),
        (IndexError, "integer", lambda: t[np.array([0.5])]),
        (IndexError, "integer", lambda: t[tg.tensor([1.0])]),
        (ValueError, "shape mismatch", lambda: t[[0, 1], [0, 1, 2]]),
        (IndexError, "boolean index did not match", lambda: t[np.array([True, False])]),
        (IndexError, "too many indices", lambda: t[[0], [0], [0]]),
        (TypeError, "bool scalar", lambda: t[True]),
        (IndexError, "out of bounds", lambda: t.__setitem__([3], 1.0)),
        (ValueError, "broadcast", lambda: t.__setitem__(([0, 1], [0, 1]), tg.zeros(3))),
        (IndexError, "boolean index did not match", lambda: t.__setitem__(np.array([True, False]), 1.0)),
        (TypeError, "unsupported index", lambda: t[{0: 1}]),
    ]
    for exc, msg, fn in cases:
        with no_gpu_work(), pytest.raises(exc, match=msg):
            fn()
    check(t, np.zeros((3, 4), np.float32))


def test_quantized_tensor_index_needs_dequantize():
    from tensorgpu import runtime
    blocks = np.zeros(2 * 34, np.uint8)
    q = tg.Tensor.from_buffer(runtime.upload(blocks), (2, 32), tg.q8_0)
    with no_gpu_work(), pytest.raises(TypeError, match="dequantize"):
        q[[0, 1]]
