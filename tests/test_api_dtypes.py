"""dtypes as a NumPy user meets them: an explicit request for a type tensorgpu does not hold
is a TypeError naming the ones it does; NumPy float64 / int64 data is stored as float32 /
int32 as documented, with a one-time warning only where values change; Python integers that
do not fit int32 are a clear error (an OutOfRangeError: a ValueError, and an OverflowError as
NumPy's own)."""
import warnings

import numpy as np
import pytest

import tensorgpu as tg
from core_util import check, no_gpu_work


@pytest.fixture(autouse=True)
def fresh_warnings():
    """Each test sees the one-time conversion warnings afresh."""
    tg.dtypes._WARNED.clear()
    yield
    tg.dtypes._WARNED.clear()


@pytest.mark.parametrize("dtype", [np.float64, "float64", np.int64, "int64", np.int8, np.uint8, np.int16,
                                   np.complex64, "float128" if hasattr(np, "float128") else "longdouble"])
def test_explicit_unsupported_dtype_is_a_type_error(dtype):
    for fn in (lambda: tg.tensor([1, 2], dtype=dtype), lambda: tg.zeros(3, dtype=dtype),
               lambda: tg.ones((2,), dtype), lambda: tg.tensor([1.0]).astype(dtype), lambda: tg.arange(3, dtype=dtype),
               lambda: tg.full((2,), 1, dtype)):
        with no_gpu_work(), pytest.raises(TypeError) as e:
            fn()
        assert "float32, float16, int32, uint32 and bool" in str(e.value)


@pytest.mark.parametrize("dtype,want", [(np.float32, tg.float32), (np.float16, tg.float16), (np.int32, tg.int32),
                                        (np.uint32, tg.uint32), (np.bool_, tg.bool), ("float32", tg.float32),
                                        (float, tg.float32), (int, tg.int32), (bool, tg.bool)])
def test_supported_dtype_requests(dtype, want):
    assert tg.tensor([1, 0], dtype=dtype).dtype is want
    assert tg.dtypes.as_dtype(dtype) is want


@pytest.mark.parametrize("np_dtype,tg_dtype", [(np.float64, tg.float32), (np.int64, tg.int32), (np.int8, tg.int32),
                                               (np.int16, tg.int32), (np.uint8, tg.uint32), (np.uint64, tg.uint32)])
def test_numpy_data_is_stored_in_the_documented_type_silently_when_values_fit(np_dtype, tg_dtype):
    a = np.array([0, 1, 100, 3], np_dtype) * (1.25 if np.dtype(np_dtype).kind == "f" else 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = tg.tensor(a)
    check(t, a.astype(tg_dtype.np_dtype), dtype=tg_dtype)


def test_float64_precision_loss_is_not_warned():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = tg.tensor(np.array([0.1, 1 / 3, np.pi, 1e-40, np.nan, np.inf]))
    assert t.dtype is tg.float32
    check(t, np.array([0.1, 1 / 3, np.pi, 1e-40, np.nan, np.inf]).astype(np.float32))


def test_int64_past_int32_warns_once_and_wraps_as_numpy():
    a = np.array([1, 2**40 + 3, -2**35], np.int64)
    with pytest.warns(tg.DtypeConversionWarning, match=r"int64 values -34359738368\.\.1099511627779 do not fit int32"):
        t = tg.tensor(a)
    check(t, a.astype(np.int32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")            # once per process: the second conversion is quiet
        tg.tensor(np.array([2**33], np.int64))


def test_float64_past_float32_range_warns_once():
    with pytest.warns(tg.DtypeConversionWarning, match="beyond float32's range"):
        t = tg.tensor(np.array([1.0, 1e300, -1e300]))
    check(t, np.array([1, np.inf, -np.inf], np.float32))


def test_warning_points_at_the_callers_line():
    with pytest.warns(tg.DtypeConversionWarning) as rec:
        tg.tensor(np.array([2**40]))
    assert rec[0].filename == __file__


@pytest.mark.parametrize("data", [[2**40], 2**40, [2**31], [-2**31 - 1], [[1, 2], [3, 2**70]], 2**70])
def test_python_ints_past_int32_are_a_clear_error(data):
    with no_gpu_work(), pytest.raises(tg.OutOfRangeError, match=r"does not fit int32 .*dtype=tg\.float32") as e:
        tg.tensor(data)
    assert isinstance(e.value, ValueError) and isinstance(e.value, OverflowError)


def test_python_ints_past_int32_with_an_explicit_dtype():
    check(tg.tensor([2**40], dtype=tg.float32), np.array([2**40], np.float32))
    check(tg.tensor([2**31], dtype=tg.uint32), np.array([2**31], np.uint32))
    with pytest.raises(tg.OutOfRangeError, match="uint32"):
        tg.tensor([2**32], dtype=tg.uint32)
    with pytest.raises(tg.OutOfRangeError, match="int32"):
        tg.tensor(np.array([2**40]), dtype=tg.int32)
    check(tg.tensor([1.0, 2**70]), np.array([1, 2**70], np.float32))       # mixed floats and ints: floats
