"""kernels/sort.py (argsort_rows) against NumPy's stable argsort on the same values: every
row length up to the workgroup limit (powers of two and not), ascending and descending, k
smaller than n, f32 specials (NaN last ascending / first descending, -0 equal to +0, +-inf),
int32 and uint32 extremes, a tie-break array, offsets, and bad operands."""
import numpy as np
import pytest

from tensorgpu import dtypes, runtime
from tensorgpu.kernels.common import Operand
from tensorgpu.kernels.sort import argsort_rows, max_row

rng = np.random.default_rng(9)


def run(x: np.ndarray, k=None, descending=False, ties=None, offset=0) -> np.ndarray:
    rows, n = x.shape
    k = n if k is None else k
    buf = runtime.upload(np.concatenate([np.zeros(offset, x.dtype), x.reshape(-1)]))
    out = runtime.Buffer(max(4 * rows * k, 4))
    t = None
    if ties is not None:
        t = Operand(runtime.upload(ties.astype(np.int32)), dtypes.int32, (rows, n), (n, 1))
    argsort_rows(out, Operand(buf, dtypes.from_numpy(x.dtype), (rows, n), (n, 1), offset), rows, n, k, descending, t)
    return np.frombuffer(runtime.read(out, 0, 4 * rows * k), np.int32).reshape(rows, k)


def ref(x, descending=False, ties=None):
    """NumPy's stable order; descending = the largest first, NaN first, ties by position (or `ties`)."""
    key = x.astype(np.float64) if x.dtype.kind == "f" else x.astype(np.int64)
    if x.dtype.kind == "f":
        key = np.where(key == 0, 0.0, key)           # -0 == +0
    second = ties if ties is not None else np.broadcast_to(np.arange(x.shape[1]), x.shape)
    nan = np.isnan(key) if x.dtype.kind == "f" else np.zeros(x.shape, bool)
    k = np.where(nan, 0, key)
    if descending:
        return np.lexsort((second, -k, ~nan), axis=-1)
    return np.lexsort((second, k, nan), axis=-1)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 8, 33, 100, 255, 256, 511, 1024, 1500, 2048])
@pytest.mark.parametrize("descending", [False, True])
def test_float32_rows(n, descending):
    x = rng.standard_normal((3, n)).astype(np.float32)
    x[rng.random(x.shape) < 0.2] = 0.5
    x[rng.random(x.shape) < 0.05] = np.nan
    x[rng.random(x.shape) < 0.05] = -0.0
    x[rng.random(x.shape) < 0.03] = np.inf
    x[rng.random(x.shape) < 0.03] = -np.inf
    np.testing.assert_array_equal(run(x, descending=descending), ref(x, descending))
    if not descending:
        np.testing.assert_array_equal(run(x), np.argsort(x, 1, kind="stable"))


@pytest.mark.parametrize("dtype,lo,hi", [(np.int32, -2**31, 2**31 - 1), (np.uint32, 0, 2**32 - 1)])
def test_integer_extremes(dtype, lo, hi):
    x = rng.integers(-3, 4, (4, 300)).astype(np.int64) + (0 if dtype is np.int32 else 3)
    x[:, ::17] = lo
    x[:, 5::19] = hi
    x = x.astype(dtype)
    for desc in (False, True):
        np.testing.assert_array_equal(run(x, descending=desc), ref(x, desc))


@pytest.mark.parametrize("k", [0, 1, 5, 64])
def test_first_k_and_offset(k):
    x = rng.integers(-20, 20, (5, 64)).astype(np.int32)
    np.testing.assert_array_equal(run(x, k=k, descending=True, offset=7), ref(x, True)[:, :k])


def test_ties_array_orders_equal_keys():
    x = np.array([[1, 1, 1, 0, 1]], np.float32)
    ties = np.array([[40, 10, 30, 0, 20]])
    np.testing.assert_array_equal(run(x, ties=ties), [[3, 1, 4, 2, 0]])
    np.testing.assert_array_equal(run(x, descending=True, ties=ties), [[1, 4, 2, 0, 3]])


def test_many_rows():
    x = rng.standard_normal((70_000, 4)).astype(np.float32)        # a 2-D launch grid
    np.testing.assert_array_equal(run(x), np.argsort(x, 1, kind="stable"))


def test_bad_operands():
    buf, out = runtime.Buffer(64), runtime.Buffer(64)
    op = lambda d, shape, strides: Operand(buf, d, shape, strides)  # noqa: E731
    with pytest.raises(TypeError, match="float32, int32 or uint32"):
        argsort_rows(out, op(dtypes.float16, (1, 4), (4, 1)), 1, 4)
    with pytest.raises(ValueError, match="0 <= k <= n"):
        argsort_rows(out, op(dtypes.float32, (1, 4), (4, 1)), 1, 4, k=5)
    with pytest.raises(ValueError, match=f"over the {max_row()}"):
        argsort_rows(out, op(dtypes.float32, (1, max_row() + 1), (1, 1)), 1, max_row() + 1)
    with pytest.raises(ValueError, match="contiguous"):
        argsort_rows(out, op(dtypes.float32, (2, 4), (1, 2)), 2, 4)
    with pytest.raises(ValueError, match="ties"):
        argsort_rows(out, op(dtypes.float32, (2, 4), (4, 1)), 2, 4, ties=op(dtypes.float32, (2, 4), (4, 1)))
