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


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("wdt", [np.float32, np.float16])
def test_linear_sum_equals_the_sum_of_linears(rows, wdt):
    """One row: one decode GEMV over both inputs (a single kernel with the residual add fused);
    more rows: two matmuls and an add. Same values either way."""
    x1 = rng.standard_normal((rows, 32)).astype(np.float32)
    x2 = rng.standard_normal((rows, 96)).astype(np.float32)
    w1 = (rng.standard_normal((24, 32)) * 0.1).astype(wdt)
    w2 = (rng.standard_normal((24, 96)) * 0.1).astype(wdt)
    b1, b2, r = (rng.standard_normal(24).astype(np.float32) for _ in range(3))
    t = [tg.tensor(v).realize() for v in (x1, x2, w1, w2, b1, b2, r)]
    with tg.debug.kernel_log() as log:
        got = (tg.nn.linear_sum((t[0], t[2], t[4]), (t[1], t[3], t[5])) + t[6]).numpy()
    want = x1 @ w1.astype(np.float64).T + x2 @ w2.astype(np.float64).T + b1 + b2 + r
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    if rows == 1:
        assert [e.name.split("[")[0] for e in log] == [f"gemv2_{'float32' if wdt is np.float32 else 'float16'}"]


def test_linear_sum_of_quantized_weights_is_one_kernel():
    import gguf

    from tensorgpu import runtime
    K1, K2, N = 64, 128, 16
    w1 = gguf.quants.quantize(rng.standard_normal((N, K1)).astype(np.float32), gguf.GGMLQuantizationType.Q4_0)
    w2 = gguf.quants.quantize(rng.standard_normal((N, K2)).astype(np.float32), gguf.GGMLQuantizationType.Q4_0)
    W1 = gguf.quants.dequantize(w1, gguf.GGMLQuantizationType.Q4_0).reshape(N, K1)
    W2 = gguf.quants.dequantize(w2, gguf.GGMLQuantizationType.Q4_0).reshape(N, K2)
    tw1 = tg.Tensor.from_buffer(runtime.upload(np.asarray(w1)), (N, K1), tg.q4_0)
    tw2 = tg.Tensor.from_buffer(runtime.upload(np.asarray(w2)), (N, K2), tg.q4_0)
    x1 = rng.standard_normal((1, K1)).astype(np.float32)
    x2 = rng.standard_normal((1, K2)).astype(np.float32)
    with tg.debug.kernel_log() as log:
        got = tg.nn.linear_sum((tg.tensor(x1), tw1), (tg.tensor(x2), tw2)).numpy()
    np.testing.assert_allclose(got, x1 @ W1.T + x2 @ W2.T, rtol=1e-4, atol=1e-4)
    assert [e.name.split("[")[0] for e in log] == ["gemv2_q4_0"]


def test_linear_sum_of_two_block_types_is_one_kernel():
    """A Q4_K_M file's attention output (q4_k) and MLP down (q6_k) projections: still one GEMV."""
    import gguf

    from tensorgpu import runtime
    from tensorgpu.testing import random_blocks
    K1, K2, N = 256, 512, 16
    ws, Ws = [], []
    for kind, K in (("q4_k", K1), ("q6_k", K2)):
        raw = random_blocks(kind, (N, K), 0.05, rng)
        Ws.append(np.asarray(gguf.quants.dequantize(raw.reshape(-1), gguf.GGMLQuantizationType[kind.upper()]),
                             np.float64).reshape(N, K))
        ws.append(tg.Tensor.from_buffer(runtime.upload(raw), (N, K), tg.dtypes.as_dtype(kind)))
    x1 = rng.standard_normal((1, K1)).astype(np.float32)
    x2 = rng.standard_normal((1, K2)).astype(np.float32)
    with tg.debug.kernel_log() as log:
        got = tg.nn.linear_sum((tg.tensor(x1), ws[0]), (tg.tensor(x2), ws[1])).numpy()
    np.testing.assert_allclose(got, x1 @ Ws[0].T + x2 @ Ws[1].T, rtol=1e-4, atol=1e-4)
    assert [e.name.split("[")[0] for e in log] == ["gemv2_q4_k+q6_k"]


def test_linear_sum_bad_inputs_name_the_term():
    x = tg.tensor(np.ones((1, 8), np.float32))
    w = tg.tensor(np.ones((4, 8), np.float32))
    with pytest.raises(ValueError, match="term 1: input"):
        tg.nn.linear_sum((x, w), (x, tg.tensor(np.ones((4, 6), np.float32))))
    with pytest.raises(ValueError, match="term 1 .* does not give"):
        tg.nn.linear_sum((x, w), (x, tg.tensor(np.ones((5, 8), np.float32))))
    with pytest.raises(ValueError, match="at least one"):
        tg.nn.linear_sum()


@pytest.mark.parametrize("wdt", [np.float32, np.float16, "q8_0"])
def test_layer_norm_linears_one_row_is_one_kernel(wdt):
    """GPT-NeoX's ln1 + QKV and ln2 + up + gelu of one token: one GEMV, both norms folded in, the
    biases and the gelu in its store; equal to the separate ops (float64 NumPy), and a prompt of
    several rows gives the same values as the ops one by one."""
    import gguf
    from math import erf

    from tensorgpu import runtime
    K, N1, N2 = 256, 96, 160
    Ws = [rng.standard_normal((n, K)) * 0.05 for n in (N1, N2)]
    if wdt == "q8_0":
        raws = [np.asarray(gguf.quants.quantize(W.astype(np.float32), gguf.GGMLQuantizationType.Q8_0)) for W in Ws]
        Ws = [np.asarray(gguf.quants.dequantize(r, gguf.GGMLQuantizationType.Q8_0), np.float64).reshape(W.shape)
              for r, W in zip(raws, Ws)]
        ws = [tg.Tensor.from_buffer(runtime.upload(r), W.shape, tg.q8_0) for r, W in zip(raws, Ws)]
    else:
        Ws = [W.astype(wdt).astype(np.float64) for W in Ws]
        ws = [tg.tensor(W.astype(wdt)) for W in Ws]
    g1, c1, g2, c2 = (rng.standard_normal(K).astype(np.float32) for _ in range(4))
    b1, b2 = rng.standard_normal(N1).astype(np.float32), rng.standard_normal(N2).astype(np.float32)
    T = [tg.tensor(v) for v in (g1, c1, g2, c2, b1, b2)]
    parts = ((T[0], T[1], ws[0], T[4]), (T[2], T[3], ws[1], T[5], "gelu"))
    x = (rng.standard_normal((3, K)) * 2 + 4).astype(np.float32)

    def ref(row):
        h = (row - row.mean()) / np.sqrt(row.var() + 1e-5)
        y1 = (h * g1 + c1) @ Ws[0].T + b1
        z = (h * g2 + c2) @ Ws[1].T + b2
        return y1, 0.5 * z * (1 + np.vectorize(erf)(z / np.sqrt(2)))
    tg.nn.layer_norm_linears(tg.tensor(x[:1]), 1e-5, *parts)[0].numpy()     # constants computed once
    with tg.debug.kernel_log() as log:
        y1, y2 = (t.numpy() for t in tg.nn.layer_norm_linears(tg.tensor(x[:1]), 1e-5, *parts))
    name = "float32" if wdt is np.float32 else "float16" if wdt is np.float16 else "q8_0"
    assert [e.name.split("[")[0] for e in log] == [f"gemv_ln2_{name}"]
    r1, r2 = ref(x[0].astype(np.float64))
    np.testing.assert_allclose(y1[0], r1, rtol=1e-4, atol=1e-4 * np.abs(r1).max())
    np.testing.assert_allclose(y2[0], r2, rtol=1e-4, atol=1e-4 * np.abs(r2).max())
    ys = tg.nn.layer_norm_linears(tg.tensor(x), 1e-5, *parts)                # 3 rows: the ops one by one
    for i in range(3):
        r1, r2 = ref(x[i].astype(np.float64))
        np.testing.assert_allclose(ys[0].numpy()[i], r1, rtol=1e-3, atol=1e-3 * np.abs(r1).max())
        np.testing.assert_allclose(ys[1].numpy()[i], r2, rtol=1e-3, atol=1e-3 * np.abs(r2).max())


def test_layer_norm_linears_bad_inputs():
    x = tg.tensor(np.ones((1, 8), np.float32))
    w = tg.tensor(np.ones((4, 8), np.float32))
    with pytest.raises(ValueError, match="at least one"):
        tg.nn.layer_norm_linears(x, 1e-5)
    with pytest.raises(ValueError, match="part 1: act must be None or 'gelu', got 'relu'"):
        tg.nn.layer_norm_linears(x, 1e-5, (None, None, w, None), (None, None, w, None, "relu"))
    with pytest.raises(ValueError, match=r"part 0: input \(1, 8\) does not match weight \(4, 6\)"):
        tg.nn.layer_norm_linears(x, 1e-5, (None, None, tg.tensor(np.ones((4, 6), np.float32)), None))


def test_layer_norm_linears_under_eight_storage_buffers():
    """An adapter with WebGPU's default 8 storage buffers cannot bind the stacked GEMV with both
    norms and biases (9): the parts run one by one, with the same values."""
    from tensorgpu import runtime
    K, N1, N2 = 128, 32, 48
    x = tg.tensor((rng.standard_normal((1, K)) + 2).astype(np.float32))
    ps = [tg.tensor(rng.standard_normal(n).astype(np.float32)) for n in (K, K, K, K, N1, N2)]
    ws = [tg.tensor((rng.standard_normal((n, K)) * 0.1).astype(np.float32)) for n in (N1, N2)]
    parts = ((ps[0], ps[1], ws[0], ps[4]), (ps[2], ps[3], ws[1], ps[5], "gelu"))
    want = [t.numpy() for t in tg.nn.layer_norm_linears(x, 1e-5, *parts)]
    old = runtime.OPTIONS.max_storage_buffers
    runtime.OPTIONS.max_storage_buffers = 8
    try:
        with tg.debug.kernel_log() as log:
            got = [t.numpy() for t in tg.nn.layer_norm_linears(x, 1e-5, *parts)]
    finally:
        runtime.OPTIONS.max_storage_buffers = old
    names = [e.name.split("[")[0] for e in log]
    assert "gemv_ln2_float32" not in names and names.count("gemv_ln_float32") == 2, names
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
