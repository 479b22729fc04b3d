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


# ----------------------------------------------------------------------------- LLaMA-family pieces


def test_rms_norm_plain_ops():
    x = rng.standard_normal((5, 24)).astype(np.float32) * 3
    w = rng.standard_normal(24).astype(np.float32)
    want = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-6) * w
    np.testing.assert_allclose(tg.nn.rms_norm(tg.tensor(x), tg.tensor(w), 1e-6).numpy(), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"weight has shape \(23,\)"):
        tg.nn.rms_norm(tg.tensor(x), tg.tensor(w[:23]))


@pytest.mark.parametrize("sq", [1, 6, 20])
def test_sdpa_grouped_query_heads(sq):
    """q [Hq, sq, d] over k/v [Hkv, sk, d]: query head h reads KV head h // (Hq / Hkv) (torch's
    enable_gqa=True); NumPy on K/V repeated to Hq heads."""
    Hq, Hkv, sk, d = 6, 2, 24, 16
    q = rng.standard_normal((Hq, sq, d)).astype(np.float32)
    k = rng.standard_normal((Hkv, sk, d)).astype(np.float32)
    v = rng.standard_normal((Hkv, sk, d)).astype(np.float32)
    got = tg.nn.scaled_dot_product_attention(tg.tensor(q), tg.tensor(k), tg.tensor(v), causal=True).numpy()
    kr, vr = np.repeat(k, Hq // Hkv, 0).astype(np.float64), np.repeat(v, Hq // Hkv, 0).astype(np.float64)
    s = np.einsum("hqd,hkd->hqk", q, kr) / np.sqrt(d)
    s = np.where(np.arange(sk)[None, None] <= np.arange(sq)[None, :, None] + sk - sq, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    want = np.einsum("hqk,hkd->hqd", p / p.sum(-1, keepdims=True), vr)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError, match="grouped-query"):
        tg.nn.scaled_dot_product_attention(tg.tensor(q), tg.tensor(k[:1].repeat(4, 0)), tg.tensor(v[:1].repeat(4, 0)))


def test_rope_normal_mode_and_freq_factors():
    """tg.nn.rope's normal mode (adjacent pairs) with Llama 3.1 frequency factors."""
    T, Hq, D = 5, 4, 16
    pos = np.array([0, 1, 2, 9, 30], np.int32)
    ff = np.linspace(1, 4, D // 2).astype(np.float32)
    q = rng.standard_normal((T, Hq, D)).astype(np.float32)
    inv = 1e4 ** (-np.arange(0, D, 2) / D) / ff
    ang = pos[:, None, None] * inv
    c, s = np.cos(ang), np.sin(ang)
    want = q.astype(np.float64).copy()
    want[..., 0::2], want[..., 1::2] = q[..., 0::2] * c - q[..., 1::2] * s, q[..., 1::2] * c + q[..., 0::2] * s
    got = tg.nn.rope(tg.tensor(q), tg.tensor(pos), D, 1e4, mode="normal", freq_factors=ff).numpy()
    np.testing.assert_allclose(got, want, atol=2e-5)
    with pytest.raises(ValueError, match="mode 'gptj'"):
        tg.nn.rope(tg.tensor(q), tg.tensor(pos), D, mode="gptj")
