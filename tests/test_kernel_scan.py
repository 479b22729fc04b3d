"""kernels/scan.py (cumsum_rows) against NumPy's cumsum on the same values: both code paths
(a thread per short row, a workgroup per long row), every supported dtype, offsets, the row
limit, and bad operands. Integers are exact (wrapping); float32 sums agree within 1e-5 of the
running sum of |x| (chunked order, not NumPy's sequential one)."""
import numpy as np
import pytest

from tensorgpu import dtypes, runtime
from tensorgpu.kernels.common import Operand
from tensorgpu.kernels.scan import MAX_ROW, SHORT, cumsum_rows

rng = np.random.default_rng(3)
NP = {dtypes.float32: np.float32, dtypes.int32: np.int32, dtypes.uint32: np.uint32}


def run(x: np.ndarray, offset: int = 0) -> np.ndarray:
    rows, n = x.shape
    host = np.concatenate([np.zeros(offset, x.dtype), x.reshape(-1)])
    buf = runtime.upload(host)
    out = runtime.Buffer(max(4 * rows * n, 4))
    d = dtypes.from_numpy(x.dtype)
    cumsum_rows(out, Operand(buf, d, (rows, n), (n, 1), offset), rows, n)
    return np.frombuffer(runtime.read(out, 0, 4 * rows * n), x.dtype).reshape(rows, n)


@pytest.mark.parametrize("rows,n", [(1, 1), (3, 7), (1000, SHORT), (2, SHORT + 1), (5, 256), (3, 257), (2, 5000),
                                    (1, 100_000)], ids=str)
def test_float32(rows, n):
    x = rng.standard_normal((rows, n)).astype(np.float32)
    got = run(x)
    scale = np.cumsum(np.abs(x.astype(np.float64)), 1)
    assert np.all(np.abs(got - np.cumsum(x.astype(np.float64), 1)) <= 1e-5 * scale + 1e-6)


@pytest.mark.parametrize("dtype", [np.int32, np.uint32])
@pytest.mark.parametrize("rows,n", [(4, 9), (2, 300), (1, 70_000)], ids=str)
def test_integers_exact_and_wrapping(dtype, rows, n):
    x = rng.integers(0, 2**31 - 1, (rows, n)).astype(dtype)   # sums wrap past 32 bits, as NumPy's int32
    with np.errstate(over="ignore"):
        want = np.cumsum(x, 1, dtype=dtype)
    np.testing.assert_array_equal(run(x), want)


@pytest.mark.parametrize("n", [5, 700])
def test_offset(n):
    x = rng.integers(-9, 9, (3, n)).astype(np.int32)
    np.testing.assert_array_equal(run(x, offset=13), np.cumsum(x, 1))


def test_bad_operands():
    buf = runtime.Buffer(64)
    out = runtime.Buffer(64)
    with pytest.raises(TypeError, match="float32, int32 or uint32"):
        cumsum_rows(out, Operand(buf, dtypes.float16, (2, 4), (4, 1)), 2, 4)
    with pytest.raises(ValueError, match="contiguous"):
        cumsum_rows(out, Operand(buf, dtypes.float32, (2, 4), (1, 2)), 2, 4)
    with pytest.raises(ValueError, match=f"at most {MAX_ROW}"):
        cumsum_rows(out, Operand(buf, dtypes.float32, (1, MAX_ROW + 1), (MAX_ROW + 1, 1)), 1, MAX_ROW + 1)
    with pytest.raises(ValueError, match="needs 32"):
        cumsum_rows(runtime.Buffer(16), Operand(buf, dtypes.float32, (2, 4), (4, 1)), 2, 4)
