"""softmax / log_softmax / logsumexp kernels against float64 NumPy on the same f32/f16 values."""
import numpy as np
import pytest

from nn_kernel_util import AffineGelu, Base, paths, read_f32  # noqa: F401  (paths is a fixture)
from tensorgpu import runtime
from tensorgpu.kernels.softmax import logsumexp, softmax

rng = np.random.default_rng(7)


def ref_softmax(x, log=False):
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    e = np.exp(x - m)
    s = e.sum(-1, keepdims=True)
    return (x - m - np.log(s)) if log else e / s


def ref_lse(x):
    x = x.astype(np.float64)
    m = x.max(-1)
    return m + np.log(np.exp(x - m[:, None]).sum(-1))


def run_softmax(view_base, view, log=False, epilogue=None):
    rows, cols = int(np.prod(view.shape[:-1])), view.shape[-1]
    out = runtime.Buffer(4 * rows * cols)
    softmax(out, view_base.view(view), rows, cols, log=log, epilogue=epilogue)
    return read_f32(out, rows * cols, (rows, cols))


SHAPES = [(1, 1), (1, 5), (3, 4), (7, 100), (5, 257), (33, 64), (2, 4096), (2, 16384), (1, 70000)]


@pytest.mark.parametrize("rows,cols", SHAPES, ids=lambda s: str(s))
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log"])
def test_shapes(paths, rows, cols, log):
    x = (rng.standard_normal((rows, cols)) * 4).astype(np.float32)
    b = Base(x)
    got = run_softmax(b, b.arr, log)
    np.testing.assert_allclose(got, ref_softmax(x, log), rtol=2e-6, atol=2e-6 if log else 1e-7)


@pytest.mark.parametrize("rows,cols", [(1, 1), (4, 6), (9, 130), (3, 4096), (2, 70000)], ids=lambda s: str(s))
def test_logsumexp(paths, rows, cols):
    x = (rng.standard_normal((rows, cols)) * 4 + 50).astype(np.float32)
    b = Base(x)
    out = runtime.Buffer(4 * rows)
    logsumexp(out, b.whole(), rows, cols)
    np.testing.assert_allclose(read_f32(out, rows), ref_lse(x), rtol=1e-6)


def test_strided_views(paths):
    big = (rng.standard_normal((6, 5, 80)) * 3).astype(np.float32)
    b = Base(big)
    # row stride != cols (a column slice), 4-aligned -> vec4 path
    v = big[:, 1:4, 8:72]
    np.testing.assert_allclose(run_softmax(b, v), ref_softmax(v.reshape(-1, 64)), rtol=2e-6, atol=1e-7)
    # transposed leading axes, unaligned offset -> scalar path
    v = big.transpose(1, 0, 2)[:, :, 3:50]
    np.testing.assert_allclose(run_softmax(b, v), ref_softmax(v.reshape(-1, 47)), rtol=2e-6, atol=1e-7)
    # non-unit last stride
    v = big[:, :, ::3]
    np.testing.assert_allclose(run_softmax(b, v, log=True), ref_softmax(v.reshape(-1, v.shape[-1]), True),
                               rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("cols", [8, 13, 4096])
def test_f16_input(paths, cols):
    x = (rng.standard_normal((5, cols)) * 3).astype(np.float16)
    b = Base(x)
    np.testing.assert_allclose(run_softmax(b, b.arr), ref_softmax(x), rtol=2e-6, atol=1e-7)
    v = x[1:4, 1:]   # odd offset: packed f16 read element-wise
    np.testing.assert_allclose(run_softmax(b, v), ref_softmax(v), rtol=2e-6, atol=1e-7)


def test_masked_and_extreme(paths):
    x = (rng.standard_normal((8, 33)) * 3).astype(np.float32)
    x[np.triu_indices(8, 1, 33)] = -np.inf        # causal-style mask
    x[3] += 1e4                                   # large values: stability
    b = Base(x)
    got = run_softmax(b, b.arr)
    np.testing.assert_allclose(got, ref_softmax(x), rtol=2e-6, atol=1e-7)
    assert np.all(got[np.isinf(x)] == 0)
    got = run_softmax(b, b.arr, log=True)
    finite = np.isfinite(x)
    np.testing.assert_allclose(got[finite], ref_softmax(x, True)[finite], rtol=2e-6, atol=2e-6)


def test_epilogue(paths):
    x = rng.standard_normal((6, 40)).astype(np.float32)
    ep = AffineGelu(rng.standard_normal(17), scale=3.0)
    b = Base(x)
    got = run_softmax(b, b.arr, epilogue=ep)
    np.testing.assert_allclose(got, ep.ref(ref_softmax(x)), rtol=1e-5, atol=1e-6)


def test_errors():
    x = Base(np.zeros((4, 8), np.float32))
    with pytest.raises(ValueError, match="shape"):
        softmax(runtime.Buffer(128), x.whole(), 4, 7)
    with pytest.raises(ValueError, match="holds"):
        softmax(runtime.Buffer(64), x.whole(), 4, 8)
    with pytest.raises(ValueError, match="same Buffer"):
        softmax(x.buf, x.whole(), 4, 8)
