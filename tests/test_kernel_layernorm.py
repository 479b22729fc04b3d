"""layer_norm kernel against float64 NumPy (biased variance, like torch)."""
import numpy as np
import pytest

from nn_kernel_util import AffineGelu, Base, paths, read_f32  # noqa: F401
from tensorgpu import runtime
from tensorgpu.kernels.layernorm import layer_norm

rng = np.random.default_rng(11)


def ref_ln(x, w, b, eps):
    x = x.astype(np.float64)
    m = x.mean(-1, keepdims=True)
    v = ((x - m) ** 2).mean(-1, keepdims=True)
    y = (x - m) / np.sqrt(v + eps)
    if w is not None:
        y = y * w.astype(np.float64)
    if b is not None:
        y = y + b.astype(np.float64)
    return y


def run_ln(xb, xv, w=None, b=None, eps=1e-5, epilogue=None):
    rows, cols = int(np.prod(xv.shape[:-1])), xv.shape[-1]
    out = runtime.Buffer(4 * rows * cols)
    wb = Base(w) if w is not None else None
    bb = Base(b) if b is not None else None
    layer_norm(out, xb.view(xv), wb.whole() if wb else None, bb.whole() if bb else None, rows, cols, eps, epilogue)
    return read_f32(out, rows * cols, (rows, cols))


def check(got, want, rtol):
    """Error relative to the output's scale (the normalised values are O(1))."""
    err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)
    assert err <= rtol, f"max error {err:.3g} relative to max |ref| exceeds {rtol}"


SHAPES = [(1, 1), (1, 5), (3, 4), (1, 2048), (33, 100), (5, 257), (2, 4096), (2, 16384), (1, 70000)]


@pytest.mark.parametrize("rows,cols", SHAPES, ids=lambda s: str(s))
def test_shapes(paths, rows, cols):
    x = rng.standard_normal((rows, cols)).astype(np.float32)
    w = rng.standard_normal(cols).astype(np.float32)
    b = rng.standard_normal(cols).astype(np.float32)
    xb = Base(x)
    check(run_ln(xb, x, w, b), ref_ln(x, w, b, 1e-5), 1e-6)


def test_exact_with_large_mean(paths):
    """Two-pass variance with the mean's rounding error corrected: a mean 1000x the spread still
    gives ~1e-7 of the output scale."""
    x = (rng.standard_normal((4, 1024)) * 0.5 + 500.0).astype(np.float32)
    xb = Base(x)
    check(run_ln(xb, x), ref_ln(x, None, None, 1e-5), 1e-6)


@pytest.mark.parametrize("has_w,has_b", [(False, False), (True, False), (False, True)])
def test_optional_params(paths, has_w, has_b):
    x = rng.standard_normal((6, 48)).astype(np.float32)
    w = rng.standard_normal(48).astype(np.float32) if has_w else None
    b = rng.standard_normal(48).astype(np.float32) if has_b else None
    check(run_ln(Base(x), x, w, b, eps=1e-3), ref_ln(x, w, b, 1e-3), 2e-6)


@pytest.mark.parametrize("cols", [64, 13])
def test_f16(paths, cols):
    x = rng.standard_normal((5, cols)).astype(np.float16)
    w = rng.standard_normal(cols).astype(np.float16)
    b = rng.standard_normal(cols).astype(np.float16)
    xb = Base(x)
    check(run_ln(xb, x, w, b), ref_ln(x, w, b, 1e-5), 1e-6)
    v = x[1:, 1:]   # odd f16 offset: element-wise packed reads
    check(run_ln(xb, v, w[1:], b[1:]), ref_ln(v, w[1:], b[1:], 1e-5), 2e-6)


def test_strided(paths):
    big = rng.standard_normal((4, 3, 72)).astype(np.float32)
    xb = Base(big)
    v = big.transpose(1, 0, 2)[:, :, 4:68]      # leading axes transposed, 4-aligned columns
    w = rng.standard_normal(64).astype(np.float32)
    check(run_ln(xb, v, w, None), ref_ln(v.reshape(-1, 64), w, None, 1e-5), 2e-6)
    v = big[:, :, 1::2]                          # non-unit last stride
    check(run_ln(xb, v), ref_ln(v.reshape(-1, 36), None, None, 1e-5), 2e-6)
    wbig = rng.standard_normal(128).astype(np.float32)
    wb = Base(wbig)
    out = runtime.Buffer(4 * 12 * 64)
    layer_norm(out, xb.view(big[:, :, 4:68]), wb.view(wbig[::2]), None, 12, 64, 1e-5)   # strided weight
    check(read_f32(out, 12 * 64, (12, 64)), ref_ln(big[:, :, 4:68].reshape(-1, 64), wbig[::2], None, 1e-5), 2e-6)


def test_epilogue(paths):
    x = rng.standard_normal((3, 96)).astype(np.float32)
    w = rng.standard_normal(96).astype(np.float32)
    ep = AffineGelu(rng.standard_normal(96), scale=0.5)
    got = run_ln(Base(x), x, w, None, epilogue=ep)
    np.testing.assert_allclose(got, ep.ref(ref_ln(x, w, None, 1e-5)), rtol=1e-5, atol=1e-6)


def test_errors():
    x = Base(np.zeros((4, 8), np.float32))
    w = Base(np.zeros(7, np.float32))
    with pytest.raises(ValueError, match="weight"):
        layer_norm(runtime.Buffer(128), x.whole(), w.whole(), None, 4, 8, 1e-5)
    with pytest.raises(ValueError, match="expected a view"):
        layer_norm(runtime.Buffer(128), x.whole(), None, None, 8, 4, 1e-5)


@pytest.mark.parametrize("rows,cols,xdt", [(1, 2048, np.float32), (33, 100, np.float32), (5, 257, np.float16),
                                           (2, 16384, np.float32), (7, 13, np.float16)], ids=str)
@pytest.mark.parametrize("which", ["wb,wb", "w,b", "-,wb"])
def test_stacked_second_affine(paths, rows, cols, xdt, which):
    """stack=(weight2, bias2): the same normalised rows twice, each with its own affine, the second
    block after the first (register-cached rows, rows re-read, f16 x, vec4 and scalar paths)."""
    x = rng.standard_normal((rows, cols)).astype(xdt)
    p = [rng.standard_normal(cols).astype(np.float32) for _ in range(4)]
    first, second = which.split(",")
    w1, b1 = (p[0] if "w" in first else None), (p[1] if "b" in first else None)
    w2, b2 = (p[2] if "w" in second else None), (p[3] if "b" in second else None)
    ops = [Base(a).whole() if a is not None else None for a in (w1, b1, w2, b2)]
    out = runtime.Buffer(8 * rows * cols)
    layer_norm(out, Base(x).whole(), ops[0], ops[1], rows, cols, 1e-5, stack=(ops[2], ops[3]))
    got = read_f32(out, 2 * rows * cols, (2, rows, cols))
    check(got[0], ref_ln(x, w1, b1, 1e-5), 2e-6)
    check(got[1], ref_ln(x, w2, b2, 1e-5), 2e-6)


def test_stacked_errors():
    x, w = Base(np.zeros((4, 8), np.float32)), Base(np.zeros(8, np.float32))
    with pytest.raises(ValueError, match="weight2"):
        layer_norm(runtime.Buffer(256), x.whole(), None, None, 4, 8, 1e-5, stack=(Base(np.zeros(7, np.float32)).whole(), None))
    with pytest.raises(ValueError, match="out"):
        layer_norm(runtime.Buffer(128), x.whole(), None, None, 4, 8, 1e-5, stack=(w.whole(), None))   # needs 2 x 128 bytes
    with pytest.raises(ValueError, match="without an epilogue"):
        layer_norm(runtime.Buffer(256), x.whole(), None, None, 4, 8, 1e-5, stack=(w.whole(), None),
                   epilogue=AffineGelu(np.zeros(8), scale=1.0))
    with pytest.raises(ValueError, match="weight and weight2 are the same Buffer"):
        layer_norm(runtime.Buffer(256), x.whole(), w.whole(), None, 4, 8, 1e-5, stack=(w.whole(), None))
