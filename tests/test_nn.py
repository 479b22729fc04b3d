"""tg.nn at the tensor level: results equal NumPy for contiguous inputs and for views the row
kernels read in place or copy first (negative row strides, strided columns, 1-D, 3-D)."""
import numpy as np
import pytest

import tensorgpu as tg

rng = np.random.default_rng(11)


def _ln(x, w=None, b=None, eps=1e-5):
    x = x.astype(np.float64)
    y = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)
    return y * (1 if w is None else w) + (0 if b is None else b)


@pytest.mark.parametrize("view", ["plain", "rows[::-2]", "cols[:, ::2]", "T", "1d", "3d"])
def test_layer_norm_on_views(view):
    a = rng.standard_normal((6, 8, 10)).astype(np.float32) * 3 + 1
    t = tg.tensor(a)
    sel = {"plain": lambda z: z[0], "rows[::-2]": lambda z: z[0, ::-2], "cols[:, ::2]": lambda z: z[0, :, ::2],
           "T": lambda z: z[0].T, "1d": lambda z: z[0, 0], "3d": lambda z: z}[view]
    x, xt = sel(a), sel(t)
    w = rng.standard_normal(x.shape[-1]).astype(np.float32)
    b = rng.standard_normal(x.shape[-1]).astype(np.float32)
    got = tg.nn.layer_norm(xt, tg.tensor(w), tg.tensor(b), 1e-5).numpy()
    np.testing.assert_allclose(got, _ln(x, w, b), rtol=1e-5, atol=1e-5)


def test_softmax_and_layer_norm_share_the_row_view_rules():
    a = rng.standard_normal((5, 7)).astype(np.float32)
    x = tg.tensor(a)[::-1, 1:]
    e = np.exp(a[::-1, 1:] - a[::-1, 1:].max(-1, keepdims=True))
    np.testing.assert_allclose(x.softmax(-1).numpy(), e / e.sum(-1, keepdims=True), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(tg.nn.layer_norm(x).numpy(), _ln(a[::-1, 1:]), rtol=1e-5, atol=1e-5)


def test_linear_bias_and_shapes():
    x = rng.standard_normal((2, 3, 16)).astype(np.float32)
    w = rng.standard_normal((5, 16)).astype(np.float32)
    b = rng.standard_normal(5).astype(np.float32)
    got = tg.nn.linear(tg.tensor(x), tg.tensor(w), tg.tensor(b)).numpy()
    np.testing.assert_allclose(got, x @ w.T + b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="in_features"):
        tg.nn.linear(tg.tensor(x), tg.tensor(w[:, :8]))
