"""The engine's rewrite rules (tensorgpu/rewrites.py), each on plain tensor code: the kernels
it leaves (names from the kernel log) and the values against float64 NumPy."""
from math import erf

import gguf
import numpy as np
import pytest

import tensorgpu as tg
from tensorgpu import runtime
from tensorgpu.testing import random_blocks

rng = np.random.default_rng(5)


def names(log):
    return [e.name.split("[")[0] for e in log]


def _realize_under_limit(block, limit: int):
    """(kernel log, values) of realizing block()'s tensors together on an adapter of `limit`
    storage buffers per kernel."""
    old = runtime.OPTIONS.max_storage_buffers
    runtime.OPTIONS.max_storage_buffers = limit
    try:
        ys = block()
        with tg.debug.kernel_log() as log:
            tg.realize(*ys)
        return log, [t.numpy() for t in ys]
    finally:
        runtime.OPTIONS.max_storage_buffers = old


def _fused_only_within_the_limit(block, kernel: str) -> None:
    """block()'s tensors realize through `kernel` on this adapter and without it on one of 6
    storage buffers per kernel (the rule steps aside), to the same values."""
    outs = []
    for limit in (None, 6):
        log, vals = _realize_under_limit(block, limit or runtime.get_device().max_storage_buffers)
        outs.append(vals)
        assert (kernel in names(log)) == (limit is None), names(log)
    for a, b in zip(*outs):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def _ln(x, g, c, eps=1e-5):
    x = x.astype(np.float64)
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps) * g + c


def _gelu(z):
    return 0.5 * z * (1 + np.vectorize(erf)(z / np.sqrt(2)))


def _weights(kind, shapes):
    """(tensors, float64 values) of weights stored as `kind` (float32/float16 or a GGUF block type)."""
    ts, vals = [], []
    for shp in shapes:
        W = rng.standard_normal(shp) * 0.05
        if kind in (np.float32, np.float16):
            ts.append(tg.tensor(W.astype(kind)))
            vals.append(W.astype(kind).astype(np.float64))
        else:
            raw = random_blocks(kind, shp, 0.05, rng)
            vals.append(np.asarray(gguf.quants.dequantize(raw.reshape(-1), gguf.GGMLQuantizationType[kind.upper()]),
                                   np.float64).reshape(shp))
            ts.append(tg.Tensor.from_buffer(runtime.upload(raw), shp, tg.dtypes.as_dtype(kind)))
    return ts, vals


def _kind_name(kind):
    return {np.float32: "float32", np.float16: "float16"}.get(kind, kind)


def test_fold_norm_into_gemv():
    K, N = 128, 48
    (w,), (W,) = _weights(np.float32, [(N, K)])
    x = (rng.standard_normal((1, K)) * 2 + 3).astype(np.float32)
    g, c, b = (rng.standard_normal(n).astype(np.float32) for n in (K, K, N))
    y = tg.nn.linear(tg.nn.layer_norm(tg.tensor(x), tg.tensor(g), tg.tensor(c)), w, tg.tensor(b))
    with tg.debug.kernel_log() as log:
        got = y.numpy()
    assert names(log) == ["gemv_ln_float32"]
    want = _ln(x, g, c) @ W.T + b
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("kind", [np.float32, np.float16, "q8_0"])
def test_stack_sibling_gemvs(kind):
    """GPT-NeoX's ln1 + QKV and ln2 + up + gelu of one token, written as two plain linears:
    one GEMV, both norms folded in, the biases and the gelu in its store. Three rows give the
    same values through the ordinary kernels."""
    K, N1, N2 = 256, 96, 160
    (w1, w2), (W1, W2) = _weights(kind, [(N1, K), (N2, K)])
    g1, c1, g2, c2 = (rng.standard_normal(K).astype(np.float32) for _ in range(4))
    b1, b2 = rng.standard_normal(N1).astype(np.float32), rng.standard_normal(N2).astype(np.float32)
    T = [tg.tensor(v) for v in (g1, c1, g2, c2, b1, b2)]
    x = (rng.standard_normal((3, K)) * 2 + 4).astype(np.float32)

    def block(xt):
        y1 = tg.nn.linear(tg.nn.layer_norm(xt, T[0], T[1]), w1, T[4])
        y2 = tg.nn.linear(tg.nn.layer_norm(xt, T[2], T[3]), w2, T[5]).gelu()
        return y1, y2
    tg.realize(*block(tg.tensor(x[:1])))                       # the folded norm constants, once
    y1, y2 = block(tg.tensor(x[:1]))
    with tg.debug.kernel_log() as log:
        tg.realize(y1, y2)
    assert names(log)[-1] == f"gemv_ln2_{_kind_name(kind)}" and names(log).count(f"gemv_ln2_{_kind_name(kind)}") == 1
    assert not any(n.startswith(("layer_norm", "gemv_ln_")) for n in names(log)), names(log)
    r1 = _ln(x, g1, c1) @ W1.T + b1
    r2 = _gelu(_ln(x, g2, c2) @ W2.T + b2)
    np.testing.assert_allclose(y1.numpy()[0], r1[0], rtol=1e-4, atol=1e-4 * np.abs(r1).max())
    np.testing.assert_allclose(y2.numpy()[0], r2[0], rtol=1e-4, atol=1e-4 * np.abs(r2).max())
    y1, y2 = block(tg.tensor(x))
    np.testing.assert_allclose(y1.numpy(), r1, rtol=1e-3, atol=1e-3 * np.abs(r1).max())
    np.testing.assert_allclose(y2.numpy(), r2, rtol=1e-3, atol=1e-3 * np.abs(r2).max())


def test_stack_respects_eight_storage_buffers():
    """WebGPU's default 8 storage buffers cannot bind the stacked GEMV with both norms and biases
    (9): the two linears stay two (norm-folded) GEMVs, with the same values."""
    K, N1, N2 = 128, 32, 48
    x = tg.tensor((rng.standard_normal((1, K)) + 2).astype(np.float32))
    ps = [tg.tensor(rng.standard_normal(n).astype(np.float32)) for n in (K, K, K, K, N1, N2)]
    ws = [tg.tensor((rng.standard_normal((n, K)) * 0.1).astype(np.float32)) for n in (N1, N2)]

    def block():
        return (tg.nn.linear(tg.nn.layer_norm(x, ps[0], ps[1]), ws[0], ps[4]),
                tg.nn.linear(tg.nn.layer_norm(x, ps[2], ps[3]), ws[1], ps[5]).gelu())
    want = [t.numpy() for t in tg.realize(*block())]
    log, got = _realize_under_limit(block, 8)
    assert "gemv_ln2_float32" not in names(log) and names(log).count("gemv_ln_float32") == 2, names(log)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kinds", [(np.float32, np.float32), (np.float16, np.float16), ("q4_0", "q4_0"),
                                   ("q4_k", "q6_k")])
def test_pair_gemvs_in_sum(kinds):
    """x + linear(a, W1, b1) + linear(u, W2, b2) of one row (Pythia's parallel residual): one
    GEMV over both inputs with the biases and the residual in its store, also for two GGUF
    block types (a Q4_K_M file's q4_k attention output + q6_k MLP down)."""
    K1, K2, N = 256, 512, 64
    (w1,), (W1,) = _weights(kinds[0], [(N, K1)])
    (w2,), (W2,) = _weights(kinds[1], [(N, K2)])
    a, u, r = (rng.standard_normal((1, k)).astype(np.float32) for k in (K1, K2, N))
    b1, b2 = rng.standard_normal(N).astype(np.float32), rng.standard_normal(N).astype(np.float32)
    y = tg.tensor(r) + tg.nn.linear(tg.tensor(a), w1, tg.tensor(b1)) + tg.nn.linear(tg.tensor(u), w2, tg.tensor(b2))
    with tg.debug.kernel_log() as log:
        got = y.numpy()
    want = r + a @ W1.T + b1 + u @ W2.T + b2
    pair = "gemv2_" + (_kind_name(kinds[0]) if kinds[0] == kinds[1] else f"{kinds[0]}+{kinds[1]}")
    assert names(log) == [pair]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_pair_in_other_groupings_and_more_rows():
    K, N = 64, 32
    (w1, w2), (W1, W2) = _weights(np.float32, [(N, K), (N, K)])
    a, u, r = (rng.standard_normal((3, k)).astype(np.float32) for k in (K, K, N))
    for rows in (1, 3):
        ta, tu, tr = tg.tensor(a[:rows]), tg.tensor(u[:rows]), tg.tensor(r[:rows])
        y = tg.nn.linear(ta, w1) + (tr + tg.nn.linear(tu, w2))
        with tg.debug.kernel_log() as log:
            got = y.numpy()
        if rows == 1:
            assert names(log) == ["gemv2_float32"]
        np.testing.assert_allclose(got, r[:rows] + a[:rows] @ W1.T + u[:rows] @ W2.T, rtol=1e-4, atol=1e-4)


def _decode_layer(x, qkv_w, cache_k, cache_v, pos, positions, H, D, rot):
    """One token of GPT-NeoX attention, plain code: QKV, rope, cache writes, attention."""
    T = x.shape[0]
    qkv = tg.nn.linear(x, qkv_w).reshape(T, 3, H, D)
    q = tg.nn.rope(qkv[:, 0], positions, rot)
    k = tg.nn.rope(qkv[:, 1], positions, rot)
    cache_k[:, pos:pos + T] = k.swapaxes(0, 1)
    cache_v[:, pos:pos + T] = qkv[:, 2].swapaxes(0, 1)
    return tg.nn.scaled_dot_product_attention(q.swapaxes(0, 1), cache_k[:, :pos + T], cache_v[:, :pos + T])


def _np_rope(x, p, rot, base=10000.0):
    half = rot // 2
    inv = base ** (-np.arange(half) * 2.0 / rot)
    ang = p * inv
    out = x.astype(np.float64).copy()
    a, b = x[..., :half], x[..., half:rot]
    out[..., :half] = a * np.cos(ang) - b * np.sin(ang)
    out[..., half:rot] = b * np.cos(ang) + a * np.sin(ang)
    return out


@pytest.mark.parametrize("cache_dtype", [tg.float32, tg.float16])
def test_fuse_decode_attention(cache_dtype):
    """rope + both cache writes + attention of one token, from slice-assignment code: one kernel
    (after the QKV GEMV), caches written as the plain code says."""
    H, D, rot, max_ctx, C = 4, 32, 16, 32, 128
    (wq,), (Wq,) = _weights(np.float32, [(3 * C, C)])
    ck = tg.zeros((H, max_ctx, D), cache_dtype).contiguous().realize()
    cv = tg.zeros((H, max_ctx, D), cache_dtype).contiguous().realize()
    K = np.zeros((H, max_ctx, D))
    V = np.zeros((H, max_ctx, D))
    for pos in range(5):
        x = rng.standard_normal((1, C)).astype(np.float32)
        with tg.debug.kernel_log() as log:
            got = _decode_layer(tg.tensor(x), wq, ck, cv, pos, tg.arange(pos, pos + 1), H, D, rot).numpy()
        # the QKV GEMV, then everything else (position and key length are kernel parameters)
        assert names(log) == ["gemv_float32", "attention_decode"], names(log)
        qkv = (x @ Wq.T).reshape(3, H, D)
        K[:, pos] = _np_rope(qkv[1], pos, rot)
        V[:, pos] = qkv[2]
        q = _np_rope(qkv[0], pos, rot)
        s = np.einsum("hd,hkd->hk", q, K[:, :pos + 1]) / np.sqrt(D)
        p = np.exp(s - s.max(-1, keepdims=True))
        want = np.einsum("hk,hkd->hd", p / p.sum(-1, keepdims=True), V[:, :pos + 1])
        tol = 2e-3 if cache_dtype is tg.float16 else 1e-4
        np.testing.assert_allclose(got[:, 0], want, rtol=tol, atol=tol)
    np.testing.assert_allclose(ck.numpy()[:, :5], K[:, :5], rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(cv.numpy()[:, :5], V[:, :5], rtol=2e-3, atol=2e-3)


def test_decode_attention_reads_after_earlier_writes_and_before_later_ones():
    """Reads built before a cache write see the old rows; the rule keeps that order."""
    H, D, rot, C = 2, 16, 16, 32
    (wq,), _ = _weights(np.float32, [(3 * C, C)])
    ck = tg.zeros((H, 8, D)).contiguous().realize()
    cv = tg.zeros((H, 8, D)).contiguous().realize()
    before = ck * 1.0                         # lazy read of the zeros
    out = _decode_layer(tg.tensor(rng.standard_normal((1, C)).astype(np.float32)), wq, ck, cv, 0,
                        tg.arange(0, 1), H, D, rot)
    out.numpy()
    assert np.all(before.numpy() == 0) and np.abs(ck.numpy()[:, 0]).max() > 0


def test_fusion_does_not_depend_on_live_python_variables():
    a = tg.tensor(rng.standard_normal((4, 8)).astype(np.float32))
    w = tg.tensor(rng.standard_normal((8, 8)).astype(np.float32))
    y = a @ w
    z = y + 1
    with tg.debug.kernel_log() as log:
        got = z.numpy()
    assert len(log) == 1
    np.testing.assert_allclose(got, a.numpy() @ w.numpy() + 1, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y.numpy(), a.numpy() @ w.numpy(), rtol=1e-5, atol=1e-5)   # recomputed


def test_schedule_is_a_value_to_print():
    a = tg.tensor(np.ones((4, 8), np.float32))
    w = tg.tensor(np.ones((8, 8), np.float32))
    t = ((a @ w).sum(-1) * 2 + 1)
    s = tg.debug.schedule(t)
    assert len(s) == 2 and "grid=" in str(s) and all(k.wgsl for k in s)
    np.testing.assert_allclose(t.numpy(), np.full(4, 129.0))
    assert len(tg.debug.schedule(t)) == 0                    # realized: nothing left to plan


def test_rule_firings_are_counted():
    before = tg.debug.stats().get("rule_fold_norm_into_gemv", 0)
    K = 64
    x = tg.tensor(rng.standard_normal((1, K)).astype(np.float32))
    w = tg.tensor(rng.standard_normal((8, K)).astype(np.float32))
    tg.nn.linear(tg.nn.layer_norm(x), w).numpy()
    assert tg.debug.stats()["rule_fold_norm_into_gemv"] == before + 1


def test_core_realized_while_planning_another_source_is_planned_again():
    """y = x + a @ W.T read by a reduction and by the reduction's result (the residual stream
    under an RMSNorm): the matmul picked as the store's core gets realized by the reduction's
    own plan; the store is planned again instead of running the matmul without operands."""
    x = rng.standard_normal((3, 16)).astype(np.float32)
    W = rng.standard_normal((16, 16)).astype(np.float32)
    w = rng.standard_normal(16).astype(np.float32)
    tx, tW, tw = tg.tensor(x), tg.tensor(W), tg.tensor(w)
    y = tx + tg.nn.linear(tx, tW)
    got = (y + tg.nn.linear(tg.nn.rms_norm(y, tw), tW)).numpy()
    yy = x.astype(np.float64) + x @ W.T.astype(np.float64)
    r = yy / np.sqrt((yy * yy).mean(-1, keepdims=True) + 1e-6) * w
    np.testing.assert_allclose(got, yy + r @ W.T, rtol=1e-4, atol=1e-4)


def test_rows_before_head():
    """The last row of linear(layer_norm(x)) over a prompt: the norm and the vocabulary
    projection run for that row (a one-row GEMV), not for all T rows; also when the row is a
    step variable under tg.capture (one trace for every row)."""
    T, C, V = 12, 64, 96
    x = rng.standard_normal((T, C)).astype(np.float32)
    g, c = rng.standard_normal(C).astype(np.float32), rng.standard_normal(C).astype(np.float32)
    (w,), (W,) = _weights("q8_0", [(V, C)])
    want = _ln(x, g, c) @ W.T
    tx, tg_, tc = tg.tensor(x), tg.tensor(g), tg.tensor(c)
    head = lambda r: tg.nn.linear(tg.nn.layer_norm(tx, tg_, tc), w)[r:r + 1].contiguous()   # noqa: E731
    head(T - 1).numpy()                                        # warm-up: the folded constants
    with tg.debug.kernel_log() as log:
        got = head(T - 1).numpy()
    assert not any("matmul" in n or n.startswith("qmatmul") for n in names(log)), names(log)
    np.testing.assert_allclose(got[0], want[-1], rtol=1e-4, atol=1e-4 * np.abs(want).max())
    step = tg.capture(head)
    for r in (T - 1, 3, 7):
        np.testing.assert_allclose(step(r).numpy()[0], want[r], rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert sum(len(e[1]) for e in step.traces.values()) == 1


def _rms(x, g, eps=1e-6):
    x = x.astype(np.float64)
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g


@pytest.mark.parametrize("kind", [np.float32, "q8_0"], ids=_kind_name)
@pytest.mark.parametrize("weighted", [True, False], ids=["w", "no_w"])
def test_fold_rms_norm_into_gemv(kind, weighted):
    """LLaMA's RMSNorm in plain ops (tg.nn.rms_norm) read by one-row linears (q and k of one
    norm, a bias after one): each GEMV normalises x itself, the norm is no kernel."""
    K, N = 256, 64
    (wq, wk), (Wq, Wk) = _weights(kind, [(N, K), (N // 2, K)])
    x = (rng.standard_normal((1, K)) * 2 + 3).astype(np.float32)
    g = rng.standard_normal(K).astype(np.float32) if weighted else None
    b = rng.standard_normal(N).astype(np.float32)
    h = tg.nn.rms_norm(tg.tensor(x), tg.tensor(g) if weighted else None, 1e-5)
    q = tg.nn.linear(h, wq, tg.tensor(b))
    k = tg.nn.linear(h, wk)
    with tg.debug.kernel_log() as log:
        gq, gk = q.numpy(), k.numpy()
    assert names(log) == [f"gemv_rms_{_kind_name(kind)}"] * 2
    hh = _rms(x, 1 if g is None else g, 1e-5)
    for got, want in ((gq, hh @ Wq.T + b), (gk, hh @ Wk.T)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_fold_rms_norm_checks_the_pattern():
    """Near misses stay what they are: a mean of squares of another row, a mean over a different
    count (sum * 0.5), a float16 row (x * x rounds in f16 there)."""
    K, N = 128, 16
    (w,), (W,) = _weights(np.float32, [(N, K)])
    x, z = (rng.standard_normal((2, 1, K)) + 1).astype(np.float32)
    X, Z = tg.tensor(x), tg.tensor(z)
    cases = [(X * ((Z * Z).mean(-1, keepdims=True) + 1e-6).rsqrt(),
              x / np.sqrt((z.astype(np.float64) ** 2).mean() + 1e-6)),
             (X * ((X * X).sum(-1, keepdims=True) * 0.5 + 1e-6).rsqrt(),
              x / np.sqrt((x.astype(np.float64) ** 2).sum() * 0.5 + 1e-6))]
    for h, hh in cases:
        with tg.debug.kernel_log() as log:
            got = tg.nn.linear(h, w).numpy()
        assert "gemv_rms_float32" not in names(log)
        want = hh @ W.T
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    with tg.debug.kernel_log() as log:
        got = tg.nn.linear(tg.nn.rms_norm(X.astype(tg.float16)), w).numpy()
    assert "gemv_rms_float32" not in names(log)
    want = _rms(x.astype(np.float16), 1) @ W.T
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())


def _np_rope_mode(x, p, rot, mode, base=10000.0, ff=None):
    if mode == "neox" and ff is None:
        return _np_rope(x, p, rot, base)
    inv = base ** (-np.arange(rot // 2) * 2.0 / rot) / (1 if ff is None else ff)
    if mode == "neox":
        half = rot // 2
        out = x.astype(np.float64).copy()
        a, b = x[..., :half], x[..., half:rot]
        out[..., :half] = a * np.cos(p * inv) - b * np.sin(p * inv)
        out[..., half:rot] = b * np.cos(p * inv) + a * np.sin(p * inv)
        return out
    ang = p * inv
    out = x.astype(np.float64).copy()
    a, b = x[..., 0:rot:2], x[..., 1:rot:2]
    out[..., 0:rot:2] = a * np.cos(ang) - b * np.sin(ang)
    out[..., 1:rot:2] = b * np.cos(ang) + a * np.sin(ang)
    return out


@pytest.mark.parametrize("mode", ["normal", "neox"])
@pytest.mark.parametrize("Hkv,bias,cache_dtype", [(2, False, tg.float16), (1, True, tg.float32), (4, True, tg.float16)],
                         ids=str)
@pytest.mark.parametrize("with_ff", [False, True], ids=["", "freq_factors"])
def test_fuse_decode_attention_gqa(mode, Hkv, bias, cache_dtype, with_ff):
    """LLaMA-style plain code for one token (separate q/k/v linears with or without biases, rope
    in either mode, with Llama 3.1's frequency factors or without, fewer KV heads,
    slice-assignment cache writes, grouped-query attention), under tg.capture with the position
    a step variable: the q/k/v GEMVs and ONE attention kernel; the values and both caches as
    NumPy says."""
    H, D, rot, max_ctx, C = 4, 32, 16, 16, 128
    (wq, wk, wv), (Wq, Wk, Wv) = _weights(np.float32, [(H * D, C), (Hkv * D, C), (Hkv * D, C)])
    bq, bk, bv = (rng.standard_normal(n).astype(np.float32) for n in (H * D, Hkv * D, Hkv * D))
    ck = tg.zeros((Hkv, max_ctx, D), cache_dtype).contiguous().realize()
    cv = tg.zeros((Hkv, max_ctx, D), cache_dtype).contiguous().realize()
    ff = (1 + 7 * rng.random(rot // 2)).astype(np.float32) if with_ff else None

    def step(x, pos):
        B = (tg.tensor(bq), tg.tensor(bk), tg.tensor(bv)) if bias else (None, None, None)
        q = tg.nn.linear(x, wq, B[0]).reshape(1, H, D)
        k = tg.nn.linear(x, wk, B[1]).reshape(1, Hkv, D)
        v = tg.nn.linear(x, wv, B[2]).reshape(1, Hkv, D)
        positions = tg.arange(pos, pos + 1)
        q = tg.nn.rope(q, positions, rot, mode=mode, freq_factors=ff)
        k = tg.nn.rope(k, positions, rot, mode=mode, freq_factors=ff)
        ck[:, pos:pos + 1] = k.swapaxes(0, 1)
        cv[:, pos:pos + 1] = v.swapaxes(0, 1)
        return tg.nn.scaled_dot_product_attention(q.swapaxes(0, 1), ck[:, :pos + 1], cv[:, :pos + 1], causal=True)

    cap = tg.capture(step)
    K, V = np.zeros((Hkv, max_ctx, D)), np.zeros((Hkv, max_ctx, D))
    G = H // Hkv
    for pos in range(6):
        x = rng.standard_normal((1, C)).astype(np.float32)
        with tg.debug.kernel_log() as log:
            got = cap(tg.tensor(x), pos).numpy()
        if pos == 0:   # the trace: three GEMVs (biases in their stores) and the fused attention
            assert names(log) == ["capture_input_copy", "gemv_float32", "gemv_float32", "gemv_float32",
                                  "attention_decode_gqa"], names(log)
        q = (x @ Wq.T + (bq if bias else 0)).reshape(H, D)
        k = (x @ Wk.T + (bk if bias else 0)).reshape(Hkv, D)
        v = (x @ Wv.T + (bv if bias else 0)).reshape(Hkv, D)
        K[:, pos], V[:, pos] = _np_rope_mode(k, pos, rot, mode, ff=ff), v
        qr = _np_rope_mode(q, pos, rot, mode, ff=ff)
        Kr, Vr = np.repeat(K[:, :pos + 1], G, 0), np.repeat(V[:, :pos + 1], G, 0)
        s = np.einsum("hd,hkd->hk", qr, Kr) / np.sqrt(D)
        p = np.exp(s - s.max(-1, keepdims=True))
        want = np.einsum("hk,hkd->hd", p / p.sum(-1, keepdims=True), Vr)
        tol = 2e-3 if cache_dtype is tg.float16 else 1e-4
        np.testing.assert_allclose(got[:, 0], want, rtol=tol, atol=tol)
    np.testing.assert_allclose(ck.numpy()[:, :6], K[:, :6], rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(cv.numpy()[:, :6], V[:, :6], rtol=2e-3, atol=2e-3)
    assert np.all(ck.numpy()[:, 6:] == 0) and np.all(cv.numpy()[:, 6:] == 0)


def test_fuse_decode_attention_gqa_checks_the_pattern():
    """Near misses keep their kernels: k roped at other positions than q, a cache row other than
    the rope position, k roped with frequency factors q is not."""
    H, Hkv, D, rot, max_ctx, C = 4, 2, 16, 16, 8, 64
    (wq, wk, wv), _ = _weights(np.float32, [(H * D, C), (Hkv * D, C), (Hkv * D, C)])
    for case in ("k_positions", "row", "k_ff"):
        ck = tg.zeros((Hkv, max_ctx, D)).contiguous().realize()
        cv = tg.zeros((Hkv, max_ctx, D)).contiguous().realize()
        x = tg.tensor(rng.standard_normal((1, C)).astype(np.float32))
        pos = 2
        q = tg.nn.linear(x, wq).reshape(1, H, D)
        k = tg.nn.linear(x, wk).reshape(1, Hkv, D)
        v = tg.nn.linear(x, wv).reshape(1, Hkv, D)
        q = tg.nn.rope(q, tg.arange(pos, pos + 1), rot)
        kp = tg.arange(pos + 1, pos + 2) if case == "k_positions" else tg.arange(pos, pos + 1)
        k = tg.nn.rope(k, kp, rot, freq_factors=np.full(rot // 2, 2.0, np.float32) if case == "k_ff" else None)
        w = pos + 1 if case == "row" else pos
        ck[:, w:w + 1] = k.swapaxes(0, 1)
        cv[:, w:w + 1] = v.swapaxes(0, 1)
        y = tg.nn.scaled_dot_product_attention(q.swapaxes(0, 1), ck[:, :pos + 1], cv[:, :pos + 1], causal=True)
        with tg.debug.kernel_log() as log:
            y.numpy()
        assert "attention_decode_gqa" not in names(log), (case, names(log))


@pytest.mark.parametrize("kind", [np.float32, np.float16, "q8_0"], ids=_kind_name)
@pytest.mark.parametrize("n,bias", [(3, True), (3, False), (2, True)], ids=str)
def test_stack_sibling_rms_gemvs(kind, n, bias):
    """Two or three one-row linears after one RMSNorm (q/k/v with Qwen2's biases; gate/up): ONE
    stacked GEMV with the norm folded once and each bias in its store; consumers (a reshape, a
    silu, a sum of two) read its slices."""
    K = 256
    Ns = (128, 64, 64)[:n]
    ws, Ws = _weights(kind, [(N, K) for N in Ns])
    x = (rng.standard_normal((1, K)) * 2 + 1).astype(np.float32)
    g = rng.standard_normal(K).astype(np.float32)
    bs = [rng.standard_normal(N).astype(np.float32) if bias and j != 1 else None for j, N in enumerate(Ns)]
    h = tg.nn.rms_norm(tg.tensor(x), tg.tensor(g), 1e-6)
    ys = [tg.nn.linear(h, w, None if b is None else tg.tensor(b)) for w, b in zip(ws, bs)]
    outs = [ys[0].reshape(2, 64) * 2.0, ys[1].silu()] + ([ys[2] + ys[1]] if n == 3 else [])
    with tg.debug.kernel_log() as log:
        tg.realize(*outs)
        got = [o.numpy() for o in outs]
    assert names(log).count(f"gemv_rms{n}_{_kind_name(kind)}") == 1, names(log)
    assert not any(nm.startswith("gemv_rms_") for nm in names(log)), names(log)
    hh = _rms(x, g)
    r = [hh @ W.T + (0 if b is None else b) for W, b in zip(Ws, bs)]
    wants = [r[0].reshape(2, 64) * 2.0, r[1] / (1 + np.exp(-r[1]))] + ([r[2] + r[1]] if n == 3 else [])
    tol = 2e-3 if kind is np.float16 else 1e-4
    for a, b in zip(got, wants):
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol * np.abs(b).max())


def test_stack_sibling_rms_gemvs_needs_one_norm():
    """Linears after two different RMSNorm weights of one x are not stacked (each folds its own)."""
    K, N = 128, 32
    (w1, w2), (W1, W2) = _weights(np.float32, [(N, K), (N, K)])
    x = rng.standard_normal((1, K)).astype(np.float32)
    g1, g2 = rng.standard_normal((2, K)).astype(np.float32)
    X = tg.tensor(x)
    y = tg.nn.linear(tg.nn.rms_norm(X, tg.tensor(g1)), w1) + tg.nn.linear(tg.nn.rms_norm(X, tg.tensor(g2)), w2)
    with tg.debug.kernel_log() as log:
        got = y.numpy()
    assert names(log).count("gemv_rms_float32") == 2, names(log)
    want = _rms(x, g1) @ W1.T + _rms(x, g2) @ W2.T
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_stack_sibling_rms_gemvs_respects_the_storage_limit():
    """Three biased q/k/v after one RMSNorm need 9 storage buffers: at 8 the first two stack
    (7) and the third stays its own norm-folded GEMV; at 6 none stack. Same values."""
    K = 128
    x = tg.tensor((rng.standard_normal((1, K)) + 1).astype(np.float32))
    g = tg.tensor(rng.standard_normal(K).astype(np.float32))
    ws = [tg.tensor((rng.standard_normal((n, K)) * 0.1).astype(np.float32)) for n in (64, 32, 32)]
    bs = [tg.tensor(rng.standard_normal(n).astype(np.float32)) for n in (64, 32, 32)]

    def block():
        h = tg.nn.rms_norm(x, g)
        return [tg.nn.linear(h, w, b) for w, b in zip(ws, bs)]
    want = [t.numpy() for t in tg.realize(*block())]
    for limit, expect in ((8, ["gemv_rms2_float32", "gemv_rms_float32"]), (6, ["gemv_rms_float32"] * 3)):
        log, got = _realize_under_limit(block, limit)
        assert sorted(names(log)) == sorted(expect), names(log)
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", [np.float32, "q8_0"], ids=_kind_name)
def test_fold_glu_into_gemv(kind):
    """LLaMA's MLP in plain code, one row: gate/up after one RMSNorm stack into one GEMV, and
    silu(gate) * up is computed by the down projection as it loads its row (with the residual
    in its store): two kernels."""
    C, F = 256, 512
    (wg, wu, wd), (Wg, Wu, Wd) = _weights(kind, [(F, C), (F, C), (C, F)])
    x = (rng.standard_normal((1, C))).astype(np.float32)
    g = rng.standard_normal(C).astype(np.float32)
    X = tg.tensor(x)
    h = tg.nn.rms_norm(X, tg.tensor(g), 1e-6)
    y = X + tg.nn.linear(tg.nn.linear(h, wg).silu() * tg.nn.linear(h, wu), wd)
    with tg.debug.kernel_log() as log:
        got = y.numpy()
    k = _kind_name(kind)
    assert names(log) == [f"gemv_rms2_{k}", f"gemv_glu_{k}"], names(log)
    hh = _rms(x, g)
    a, b = hh @ Wg.T, hh @ Wu.T
    want = x + (a / (1 + np.exp(-a)) * b) @ Wd.T
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_fold_glu_checks_the_pattern():
    """silu(up) * gate (the halves the other way round), silu of one row times another tensor, and
    gelu instead of silu keep their elementwise kernel; values as NumPy says."""
    C, F = 128, 256
    (wg, wu, wd), (Wg, Wu, Wd) = _weights(np.float32, [(F, C), (F, C), (C, F)])
    x = rng.standard_normal((1, C)).astype(np.float32)
    z = rng.standard_normal((1, F)).astype(np.float32)
    hh = _rms(x, 1)
    a, b = hh @ Wg.T, hh @ Wu.T
    silu = lambda t: t / (1 + np.exp(-t))   # noqa: E731
    for case in ("swapped", "other", "gelu"):
        h = tg.nn.rms_norm(tg.tensor(x))
        ga, up = tg.nn.linear(h, wg), tg.nn.linear(h, wu)
        if case == "swapped":
            m, want = up.silu() * ga, silu(b) * a
        elif case == "other":
            m, want = ga.silu() * tg.tensor(z), silu(a) * z
        else:
            m, want = ga.gelu() * up, _gelu(a) * b
        with tg.debug.kernel_log() as log:
            got = tg.nn.linear(m, wd).numpy()
        assert not any(nm.startswith("gemv_glu") for nm in names(log)), (case, names(log))
        want = want @ Wd.T
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_fuse_decode_attention_gqa_respects_the_storage_limit():
    """The fused kernel binds 7 storage buffers (q, k, v, both caches, out, scratch): at 6 the
    rope, cache-write and attention kernels stay, with the same values."""
    H, Hkv, D, rot, max_ctx, C = 4, 2, 16, 16, 8, 64
    (wq, wk, wv), _ = _weights(np.float32, [(H * D, C), (Hkv * D, C), (Hkv * D, C)])
    x = tg.tensor(rng.standard_normal((1, C)).astype(np.float32))
    def block():
        ck = tg.zeros((Hkv, max_ctx, D)).contiguous().realize()
        cv = tg.zeros((Hkv, max_ctx, D)).contiguous().realize()
        pos = 3
        q = tg.nn.rope(tg.nn.linear(x, wq).reshape(1, H, D), tg.arange(pos, pos + 1), rot, mode="normal")
        k = tg.nn.rope(tg.nn.linear(x, wk).reshape(1, Hkv, D), tg.arange(pos, pos + 1), rot, mode="normal")
        ck[:, pos:pos + 1] = k.swapaxes(0, 1)
        cv[:, pos:pos + 1] = tg.nn.linear(x, wv).reshape(1, Hkv, D).swapaxes(0, 1)
        y = tg.nn.scaled_dot_product_attention(q.swapaxes(0, 1), ck[:, :pos + 1], cv[:, :pos + 1], causal=True)
        return y, ck, cv

    _fused_only_within_the_limit(block, "attention_decode_gqa")


def _prompt_attention(x, ws, bs, ck, cv, pos, T, H, Hkv, D, rot, mode, ff, positions=None, row=None):
    """LLaMA-style plain code for T prompt tokens: separate q/k/v linears (biases optional),
    rope, slice-assignment cache writes, grouped-query attention over cache[:, :pos + T]."""
    q = tg.nn.linear(x, ws[0], bs[0]).reshape(T, H, D)
    k = tg.nn.linear(x, ws[1], bs[1]).reshape(T, Hkv, D)
    v = tg.nn.linear(x, ws[2], bs[2]).reshape(T, Hkv, D)
    p = tg.arange(pos, pos + T)
    q = tg.nn.rope(q, p, rot, mode=mode, freq_factors=ff)
    k = tg.nn.rope(k, p if positions is None else positions, rot, mode=mode, freq_factors=ff)
    w = pos if row is None else row
    ck[:, w:w + T] = k.swapaxes(0, 1)
    cv[:, w:w + T] = v.swapaxes(0, 1)
    return tg.nn.scaled_dot_product_attention(q.swapaxes(0, 1), ck[:, :pos + T], cv[:, :pos + T], causal=True)


@pytest.mark.parametrize("mode", ["normal", "neox"])
@pytest.mark.parametrize("Hkv,bias,cache_dtype", [(2, False, tg.float16), (1, True, tg.float32), (4, True, tg.float16)],
                         ids=str)
@pytest.mark.parametrize("with_ff", [False, True], ids=["", "freq_factors"])
def test_fuse_rope_cache_write_gqa(mode, Hkv, bias, cache_dtype, with_ff):
    """A prompt of LLaMA / Qwen2 plain code (separate q/k/v linears, rope in either mode, with or
    without frequency factors, fewer KV heads, slice-assignment cache writes after earlier rows):
    rope(q), rope(k) and both cache writes are ONE rope_kv_write kernel, under tg.capture with
    the position a step variable too; the attention output and both caches as NumPy says, rows
    outside the prompt untouched."""
    H, D, rot, max_ctx, C, T = 4, 32, 16, 24, 128, 5
    ws, (Wq, Wk, Wv) = _weights(np.float32, [(H * D, C), (Hkv * D, C), (Hkv * D, C)])
    bq, bk, bv = (rng.standard_normal(n).astype(np.float32) for n in (H * D, Hkv * D, Hkv * D))
    B = (tg.tensor(bq), tg.tensor(bk), tg.tensor(bv)) if bias else (None, None, None)
    ff = (1 + 7 * rng.random(rot // 2)).astype(np.float32) if with_ff else None
    ck = tg.zeros((Hkv, max_ctx, D), cache_dtype).contiguous().realize()
    cv = tg.zeros((Hkv, max_ctx, D), cache_dtype).contiguous().realize()
    K, V = np.zeros((Hkv, max_ctx, D)), np.zeros((Hkv, max_ctx, D))
    cap = tg.capture(lambda x, pos: _prompt_attention(x, ws, B, ck, cv, pos, T, H, Hkv, D, rot, mode, ff))
    G = H // Hkv
    for step, pos in enumerate((0, T, 2 * T)):
        x = rng.standard_normal((T, C)).astype(np.float32)
        if step == 2:     # eagerly, the same kernels
            with tg.debug.kernel_log() as log:
                got = _prompt_attention(tg.tensor(x), ws, B, ck, cv, pos, T, H, Hkv, D, rot, mode, ff).numpy()
        else:
            with tg.debug.kernel_log() as log:
                got = cap(tg.tensor(x), pos).numpy()
        if step != 1:     # (step 1 replays the trace)
            assert names(log).count("rope_kv_write") == 1, names(log)
            assert not any(n in ("rope", "E_assign") for n in names(log)), names(log)
        q = (x @ Wq.T + (bq if bias else 0)).reshape(T, H, D)
        k = (x @ Wk.T + (bk if bias else 0)).reshape(T, Hkv, D)
        v = (x @ Wv.T + (bv if bias else 0)).reshape(T, Hkv, D)
        for t in range(T):
            K[:, pos + t] = _np_rope_mode(k[t], pos + t, rot, mode, ff=ff)
            V[:, pos + t] = v[t]
        L = pos + T
        Kr, Vr = np.repeat(K[:, :L], G, 0), np.repeat(V[:, :L], G, 0)
        qr = np.stack([_np_rope_mode(q[t], pos + t, rot, mode, ff=ff) for t in range(T)], 1)   # [H, T, D]
        s = np.einsum("htd,hkd->htk", qr, Kr) / np.sqrt(D)
        s = np.where(np.arange(L)[None, None, :] <= pos + np.arange(T)[None, :, None], s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        want = np.einsum("htk,hkd->htd", p / p.sum(-1, keepdims=True), Vr)
        tol = 2e-3 if cache_dtype is tg.float16 else 1e-4
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
    np.testing.assert_allclose(ck.numpy()[:, :3 * T], K[:, :3 * T], rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(cv.numpy()[:, :3 * T], V[:, :3 * T], rtol=2e-3, atol=2e-3)
    assert np.all(ck.numpy()[:, 3 * T:] == 0) and np.all(cv.numpy()[:, 3 * T:] == 0)


def test_fuse_rope_cache_write_gqa_checks_the_pattern():
    """Near misses keep their rope and cache-write kernels, with the values of the plain code:
    k roped at other positions than q, cache rows other than the rope positions, k with
    frequency factors q has not."""
    H, Hkv, D, rot, max_ctx, C, T, pos = 4, 2, 16, 16, 16, 64, 3, 2
    ws, _ = _weights(np.float32, [(H * D, C), (Hkv * D, C), (Hkv * D, C)])
    x = tg.tensor(rng.standard_normal((T, C)).astype(np.float32))
    for case in ("k_positions", "row", "k_ff"):
        outs = []
        for fused in (True, False):
            ck = tg.zeros((Hkv, max_ctx, D)).contiguous().realize()
            cv = tg.zeros((Hkv, max_ctx, D)).contiguous().realize()
            kp = tg.arange(pos + 1, pos + 1 + T) if case == "k_positions" else None
            row = pos + 1 if case == "row" else None
            if fused:
                ff = np.full(rot // 2, 2.0, np.float32) if case == "k_ff" else None
                q = tg.nn.rope(tg.nn.linear(x, ws[0]).reshape(T, H, D), tg.arange(pos, pos + T), rot, mode="normal")
                k = tg.nn.rope(tg.nn.linear(x, ws[1]).reshape(T, Hkv, D), kp if kp is not None else tg.arange(pos, pos + T),
                               rot, mode="normal", freq_factors=ff)
                w = row if row is not None else pos
                ck[:, w:w + T] = k.swapaxes(0, 1)
                cv[:, w:w + T] = tg.nn.linear(x, ws[2]).reshape(T, Hkv, D).swapaxes(0, 1)
                y = tg.nn.scaled_dot_product_attention(q.swapaxes(0, 1), ck[:, :pos + T], cv[:, :pos + T], causal=True)
                with tg.debug.kernel_log() as log:
                    outs.append((y.numpy(), ck.numpy(), cv.numpy()))
                assert "rope_kv_write" not in names(log), (case, names(log))
            else:     # the same computation, every piece realized on its own
                ff = np.full(rot // 2, 2.0, np.float32) if case == "k_ff" else None
                q = tg.nn.rope(tg.nn.linear(x, ws[0]).reshape(T, H, D), tg.arange(pos, pos + T), rot,
                               mode="normal").realize()
                k = tg.nn.rope(tg.nn.linear(x, ws[1]).reshape(T, Hkv, D), kp if kp is not None else tg.arange(pos, pos + T),
                               rot, mode="normal", freq_factors=ff).realize()
                w = row if row is not None else pos
                ck[:, w:w + T] = k.swapaxes(0, 1)
                cv[:, w:w + T] = tg.nn.linear(x, ws[2]).reshape(T, Hkv, D).swapaxes(0, 1)
                ck.realize(), cv.realize()
                y = tg.nn.scaled_dot_product_attention(q.swapaxes(0, 1), ck[:, :pos + T], cv[:, :pos + T], causal=True)
                outs.append((y.numpy(), ck.numpy(), cv.numpy()))
        for a, b in zip(*outs):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_fuse_rope_cache_write_gqa_respects_the_storage_limit():
    """The kernel binds 7 storage buffers (q, positions, q_out, both caches, k, v): at 6 the rope
    and cache-write kernels stay, with the same values."""
    H, Hkv, D, rot, max_ctx, C, T, pos = 4, 2, 16, 16, 16, 64, 4, 1
    ws, _ = _weights(np.float32, [(H * D, C), (Hkv * D, C), (Hkv * D, C)])
    x = tg.tensor(rng.standard_normal((T, C)).astype(np.float32))
    def block():
        ck = tg.zeros((Hkv, max_ctx, D)).contiguous().realize()
        cv = tg.zeros((Hkv, max_ctx, D)).contiguous().realize()
        return _prompt_attention(x, ws, (None,) * 3, ck, cv, pos, T, H, Hkv, D, rot, "neox", None), ck, cv

    _fused_only_within_the_limit(block, "rope_kv_write")


@pytest.mark.parametrize("kind", [np.float32, "q8_0"], ids=_kind_name)
def test_rows_before_linear(kind):
    """The last row (or rows) of linear(rms_norm(x)) in plain ops, a prompt's last logits: the
    norm and the projection run for those rows only (one row: one GEMV with the norm folded
    in), under tg.capture with the row a step variable too; values as NumPy says."""
    T, C, V = 12, 128, 96
    (w,), (W,) = _weights(kind, [(V, C)])
    x = (rng.standard_normal((T, C)) * 2 + 1).astype(np.float32)
    g = rng.standard_normal(C).astype(np.float32)
    X, G = tg.tensor(x), tg.tensor(g)
    want = _rms(x, g, 1e-5) @ W.T
    tol = dict(rtol=1e-4, atol=1e-4 * np.abs(want).max())

    def head(r, k=1):
        return tg.nn.linear(tg.nn.rms_norm(X, G, 1e-5), w)[r:r + k].contiguous()

    with tg.debug.kernel_log() as log:
        got = head(T - 1).numpy()
    assert names(log) == [f"gemv_rms_{_kind_name(kind)}"], names(log)
    np.testing.assert_allclose(got, want[T - 1:], **tol)
    with tg.debug.kernel_log() as log:
        got = head(3, 2).numpy()       # two rows: the norm of two rows, a two-row product
    assert not any(n.startswith("R_") or n.startswith("E_") for n in names(log)), names(log)
    np.testing.assert_allclose(got, want[3:5], **tol)
    step = tg.capture(head)
    for r in (T - 1, 0, 6):
        np.testing.assert_allclose(step(r).numpy(), want[r:r + 1], **tol)
    assert sum(len(e[1]) for e in step.traces.values()) == 1


def test_rows_before_linear_reads_what_the_plain_code_reads():
    """Rows of a linear of a row-wise expression over a transposed input, a column reduction
    (not row-wise: computed over every row) and a lazy write issued after the expression was
    built (the rows read the old contents, as the plain code does)."""
    T, C, V = 6, 40, 24
    (w,), (W,) = _weights(np.float32, [(V, C)])
    a = rng.standard_normal((C, T)).astype(np.float32)
    b = rng.standard_normal((T, C)).astype(np.float32)
    A, Bt = tg.tensor(a), tg.tensor(b).contiguous().realize()
    h = A.T * (Bt.sum(0, keepdims=True) + Bt.max(-1, keepdims=True))      # [T, C]
    y = tg.nn.linear(h, w)[2:4].contiguous()
    Bt[:, :] = 0.0                                                        # after y was built
    hh = a.T.astype(np.float64) * (b.sum(0, keepdims=True) + b.max(-1, keepdims=True))
    want = (hh @ W.T)[2:4]
    np.testing.assert_allclose(y.numpy(), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert np.all(Bt.numpy() == 0)


# ----------------------------------------------------------------------------- batched decode attention


def _batched_attention(q, k, v, pos, ck, cv):
    """models.base.cached_attention's batch form in plain code: sequence b's K/V row written at
    row pos[b] of cache slot b, its query attending over the slot's first pos[b] + 1 rows."""
    B = q.shape[0]
    rows = pos[:, None, None, None]
    tg.put_along_axis(ck[:B], rows, k[:, :, None, :], axis=2)
    tg.put_along_axis(cv[:B], rows, v[:, :, None, :], axis=2)
    a = tg.nn.scaled_dot_product_attention(q[:, :, None, :], ck[:B], cv[:B], causal=True, kv_len=pos + 1)
    return a.reshape(q.shape)


def _np_batched_attention(q, k, v, pos, K, V, rot, mode, ff):
    """NumPy of _batched_attention after rope: updates K, V [S, Hkv, L, D]; returns [B, H, D]."""
    B, H, D = q.shape
    Hkv = K.shape[1]
    out = np.zeros((B, H, D))
    for b, p in enumerate(pos):
        K[b, :, p] = _np_rope_mode(k[b], p, rot, mode, ff=ff)
        V[b, :, p] = v[b]
        qr = _np_rope_mode(q[b], p, rot, mode, ff=ff)
        Kr, Vr = np.repeat(K[b, :, :p + 1], H // Hkv, 0), np.repeat(V[b, :, :p + 1], H // Hkv, 0)
        s = np.einsum("hd,hkd->hk", qr, Kr) / np.sqrt(D)
        e = np.exp(s - s.max(-1, keepdims=True))
        out[b] = np.einsum("hk,hkd->hd", e / e.sum(-1, keepdims=True), Vr)
    return out


_ATTENTION_PIECES = ("rope", "E_scatter", "attention", "attention_combine")


def _attention_kernels(log):
    """The kernels of a decode step that are not the projections (linears) or capture copies."""
    return [nm for nm in names(log) if not nm.startswith(("gemv", "matmul", "qgemv", "capture", "E_add_matmul"))]


@pytest.mark.parametrize("layout,mode,Hkv,bias,with_ff", [
    ("block", "neox", 4, True, False),          # GPT-NeoX: one qkv projection, q/k/v slices of it
    ("separate", "normal", 2, False, False),    # LLaMA: own projections, grouped-query heads
    ("separate", "neox", 1, True, True),        # Qwen2-like biases, one KV head, Llama 3.1 frequency factors
    ("separate", "normal", 4, False, True),
], ids=str)
@pytest.mark.parametrize("cache_dtype", [tg.float16, tg.float32], ids=["f16", "f32"])
def test_fuse_batched_decode_attention(layout, mode, Hkv, bias, with_ff, cache_dtype):
    """A batch of B sequences, one token each, in plain code (rope at positions pos [B], the
    put_along_axis cache writes, attention with kv_len = pos + 1) under tg.capture with new
    positions per replay: the projections and ONE attention kernel (no rope, scatter, `pos + 1`,
    attention or combine kernels); outputs and both slotted caches as NumPy says, slots past the
    batch untouched."""
    B, S, H, D, rot, L, C = 3, 4, 4, 16, 16, 80, 64
    ff = (1 + 3 * rng.random(rot // 2)).astype(np.float32) if with_ff else None
    if layout == "block":
        (wqkv,), (Wqkv,) = _weights(np.float32, [(3 * H * D, C)])
        bqkv = rng.standard_normal(3 * H * D).astype(np.float32) if bias else None
    else:
        (wq, wk, wv), (Wq, Wk, Wv) = _weights(np.float32, [(H * D, C), (Hkv * D, C), (Hkv * D, C)])
        bs = [rng.standard_normal(n).astype(np.float32) if bias else None for n in (H * D, Hkv * D, Hkv * D)]
    ck = tg.zeros((S, Hkv, L, D), cache_dtype).contiguous().realize()
    cv = tg.zeros((S, Hkv, L, D), cache_dtype).contiguous().realize()

    def project(x):
        if layout == "block":
            qkv = tg.nn.linear(x, wqkv, None if bqkv is None else tg.tensor(bqkv)).reshape(B, 3, H, D)
            return qkv[:, 0], qkv[:, 1], qkv[:, 2]
        b = [None if t is None else tg.tensor(t) for t in bs]
        return (tg.nn.linear(x, wq, b[0]).reshape(B, H, D), tg.nn.linear(x, wk, b[1]).reshape(B, Hkv, D),
                tg.nn.linear(x, wv, b[2]).reshape(B, Hkv, D))

    def step(x, pos):
        q, k, v = project(x)
        q = tg.nn.rope(q, pos, rot, mode=mode, freq_factors=ff)
        k = tg.nn.rope(k, pos, rot, mode=mode, freq_factors=ff)
        return _batched_attention(q, k, v, pos, ck, cv)

    cap = tg.capture(step)
    K, V = np.zeros((S, Hkv, L, D)), np.zeros((S, Hkv, L, D))
    fused = "attention_decode_batch" if layout == "block" else "attention_decode_gqa_batch"
    pos = np.array([0, 62, 20], np.int32)            # the second crosses a 64-key split boundary
    for it in range(4):
        x = rng.standard_normal((B, C)).astype(np.float32)
        with tg.debug.kernel_log() as log:
            got = cap(tg.tensor(x), pos).numpy()
        if it == 0:
            assert _attention_kernels(log) == [fused], names(log)
        if layout == "block":
            qkv = (x @ Wqkv.T + (0 if bqkv is None else bqkv)).reshape(B, 3, H, D)
            q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        else:
            q, k, v = ((x @ W.T + (0 if bb is None else bb)).reshape(B, h, D)
                       for W, bb, h in ((Wq, bs[0], H), (Wk, bs[1], Hkv), (Wv, bs[2], Hkv)))
        want = _np_batched_attention(q, k, v, pos, K, V, rot, mode, ff)
        tol = 2e-3 if cache_dtype is tg.float16 else 1e-4
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
        pos = pos + 1
    np.testing.assert_allclose(ck.numpy(), K, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(cv.numpy(), V, rtol=2e-3, atol=2e-3)
    assert np.all(ck.numpy()[B:] == 0) and np.all(cv.numpy()[B:] == 0)


def test_fuse_batched_decode_attention_one_sequence_and_unfused_values(monkeypatch):
    """A batch of one (positions an int32 [1] tensor) fuses too; fused and unfused plain code give
    the same outputs and the same cache bytes."""
    from tensorgpu import rewrites
    B, H, D, rot, L = 1, 2, 32, 32, 16
    qkv = rng.standard_normal((B, 3, H, D)).astype(np.float32)
    outs = []
    for fuse in (True, False):
        if not fuse:
            monkeypatch.setattr(rewrites, "RULES", [r for r in rewrites.RULES
                                                    if r is not rewrites.fuse_batched_decode_attention])
        ck = tg.zeros((2, H, L, D), tg.float16).contiguous().realize()
        cv = tg.zeros((2, H, L, D), tg.float16).contiguous().realize()
        pos = tg.tensor(np.array([9], np.int32))
        t = tg.tensor(qkv) * 1.0
        q, k = tg.nn.rope(t[:, 0], pos, rot), tg.nn.rope(t[:, 1], pos, rot)
        with tg.debug.kernel_log() as log:
            got = _batched_attention(q, k, t[:, 2], pos, ck, cv).numpy()
        outs.append((got, ck.numpy(), cv.numpy()))
        assert ("attention_decode_batch" in names(log)) == fuse, names(log)
    np.testing.assert_allclose(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(outs[0][1:], outs[1][1:]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("case", ["index", "k_positions", "kv_len", "slots", "late_write", "extra_write",
                                  "positions_rewritten"])
def test_fuse_batched_decode_attention_checks_the_pattern(case):
    """Near misses keep their kernels (and their values): the write index another tensor than the
    rope positions (equal values), k roped at other positions, kv_len other than pos + 1, slots
    not starting at 0, the V write issued after the attention, another write into the cache
    between the K write and the attention, the positions written between their reads."""
    B, S, H, D, rot, L = 2, 3, 2, 16, 16, 8
    ck = tg.zeros((S, H, L, D)).contiguous().realize()
    cv = tg.zeros((S, H, L, D)).contiguous().realize()
    vals = np.array([3, 5], np.int32)
    pos = tg.tensor(vals)
    alias = pos[:]                        # the same memory, read after a write through `pos`
    t = tg.tensor(rng.standard_normal((B, 3, H, D)).astype(np.float32)) * 1.0
    q = tg.nn.rope(t[:, 0], pos, rot)
    if case == "positions_rewritten":
        pos[0:1] = tg.tensor(np.array([4], np.int32))
        pos = alias
    k = tg.nn.rope(t[:, 1], tg.tensor(vals + 1) if case == "k_positions" else pos, rot)
    v = t[:, 2]
    rows = (tg.tensor(vals) if case == "index" else pos)[:, None, None, None]
    lo = 1 if case == "slots" else 0
    tg.put_along_axis(ck[lo:lo + B], rows, k[:, :, None, :], axis=2)
    if case == "extra_write":
        tg.put_along_axis(ck[:B], rows, k[:, :, None, :] * 2.0, axis=2)
    if case != "late_write":
        tg.put_along_axis(cv[lo:lo + B], rows, v[:, :, None, :], axis=2)
    a = tg.nn.scaled_dot_product_attention(q[:, :, None, :], ck[lo:lo + B], cv[lo:lo + B], causal=True,
                                           kv_len=pos + (2 if case == "kv_len" else 1))
    if case == "late_write":
        tg.put_along_axis(cv[:B], rows, v[:, :, None, :], axis=2)
    with tg.debug.kernel_log() as log:
        got = a.numpy()
    assert not any(nm.startswith("attention_decode") for nm in names(log)), (case, names(log))
    assert "attention" in names(log) and np.all(np.isfinite(got))


def test_batched_decode_attention_keeps_the_order_of_reads():
    """A lazy read of a cache built before its write sees the old rows, one built after the write
    (and before the attention) sees the new ones; the fused kernel runs once."""
    B, S, H, D, rot, L = 2, 2, 2, 16, 16, 8
    K0 = rng.standard_normal((S, H, L, D)).astype(np.float32)
    ck = tg.tensor(K0).contiguous().realize()
    cv = tg.zeros((S, H, L, D)).contiguous().realize()
    pos = tg.tensor(np.array([2, 6], np.int32))
    t = tg.tensor(rng.standard_normal((B, 3, H, D)).astype(np.float32)) * 1.0
    q, k = tg.nn.rope(t[:, 0], pos, rot), tg.nn.rope(t[:, 1], pos, rot)
    before = ck * 1.0
    rows = pos[:, None, None, None]
    tg.put_along_axis(ck[:B], rows, k[:, :, None, :], axis=2)
    tg.put_along_axis(cv[:B], rows, t[:, 2][:, :, None, :], axis=2)
    after = ck * 1.0
    a = tg.nn.scaled_dot_product_attention(q[:, :, None, :], ck[:B], cv[:B], causal=True, kv_len=pos + 1)
    with tg.debug.kernel_log() as log:
        a.numpy()
    assert names(log).count("attention_decode_batch") == 1, names(log)
    np.testing.assert_array_equal(before.numpy(), K0)
    kr = k.numpy()
    new = after.numpy()
    for b, p in enumerate((2, 6)):
        np.testing.assert_allclose(new[b, :, p], kr[b], rtol=1e-6, atol=1e-6)
    mask = np.ones(K0.shape, bool)
    mask[0, :, 2] = mask[1, :, 6] = False
    np.testing.assert_array_equal(new[mask], K0[mask])


def test_fuse_batched_decode_attention_respects_the_storage_limit():
    """Separate q, k, v bind 8 storage buffers (q, positions, k, v, both caches, out, scratch): at 7
    that form keeps its kernels, the qkv-block form (6) still fuses; the values are the same."""
    B, S, H, Hkv, D, rot, L = 2, 2, 4, 2, 16, 16, 8
    xs = [rng.standard_normal(s).astype(np.float32) for s in ((B, H, D), (B, Hkv, D), (B, Hkv, D), (B, 3, H, D))]
    for layout in ("separate", "block"):
        outs = []
        for limit in (None, 7):
            def block():
                ck = tg.zeros((S, Hkv if layout == "separate" else H, L, D)).contiguous().realize()
                cv = tg.zeros(ck.shape).contiguous().realize()
                pos = tg.tensor(np.array([1, 4], np.int32))
                if layout == "separate":
                    q, k, v = (tg.tensor(x) * 1.0 for x in xs[:3])
                else:
                    t = tg.tensor(xs[3]) * 1.0
                    q, k, v = t[:, 0], t[:, 1], t[:, 2]
                a = _batched_attention(tg.nn.rope(q, pos, rot), tg.nn.rope(k, pos, rot), v, pos, ck, cv)
                return [a, ck, cv]
            log, vals = _realize_under_limit(block, limit or runtime.get_device().max_storage_buffers)
            outs.append(vals)
            fused = any(nm.startswith("attention_decode") for nm in names(log))
            assert fused == (limit is None or layout == "block"), (layout, limit, names(log))
        for a, b in zip(*outs):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", [np.float32, np.float16, "q8_0"], ids=_kind_name)
@pytest.mark.parametrize("bias", [False, True], ids=["", "bias"])
def test_stack_sibling_matmuls(kind, bias):
    """A prompt's q, k and v linears of one x (LLaMA; Qwen2 with biases) read by rope and the
    cache writes: ONE matmul over the three weights side by side (biases in its store), then
    one rope_kv_write; attention output and caches as NumPy says."""
    T, H, Hkv, D, rot, max_ctx, C, pos = 24, 4, 2, 64, 32, 64, 128, 5
    ws, (Wq, Wk, Wv) = _weights(kind, [(H * D, C), (Hkv * D, C), (Hkv * D, C)])
    bs = [rng.standard_normal(n).astype(np.float32) for n in (H * D, Hkv * D, Hkv * D)]
    B = tuple(tg.tensor(b) for b in bs) if bias else (None,) * 3
    ck = tg.zeros((Hkv, max_ctx, D), tg.float32).contiguous().realize()
    cv = tg.zeros((Hkv, max_ctx, D), tg.float32).contiguous().realize()
    x = rng.standard_normal((T, C)).astype(np.float32)
    y = _prompt_attention(tg.tensor(x), ws, B, ck, cv, pos, T, H, Hkv, D, rot, "normal", None)
    with tg.debug.kernel_log() as log:
        got = y.numpy()
    mms = [n for n in names(log) if n.startswith("matmul") and "splitk_reduce" not in n]
    assert len(mms) == 1 and mms[0].endswith("_x3"), names(log)
    assert "rope_kv_write" in names(log) and not any(n.startswith("E_") for n in names(log)), names(log)
    q, k, v = (x @ W.T + (b if bias else 0) for W, b in zip((Wq, Wk, Wv), bs))
    q, k, v = q.reshape(T, H, D), k.reshape(T, Hkv, D), v.reshape(T, Hkv, D)
    K_ = np.stack([_np_rope_mode(k[t], pos + t, rot, "normal") for t in range(T)], 1)     # [Hkv, T, D]
    V_ = v.transpose(1, 0, 2)
    qr = np.stack([_np_rope_mode(q[t], pos + t, rot, "normal") for t in range(T)], 1)     # [H, T, D]
    G = H // Hkv
    s = np.einsum("htd,hkd->htk", qr, np.repeat(K_, G, 0)) / np.sqrt(D)
    L = pos + T
    s_full = np.full((H, T, L), -np.inf)
    s_full[:, :, pos:] = np.where(np.arange(T)[None, None, :] <= np.arange(T)[None, :, None], s, -np.inf)
    s_full[:, :, :pos] = 0.0          # the zero rows already in the cache: scores 0
    p = np.exp(s_full - s_full.max(-1, keepdims=True))
    Vfull = np.concatenate([np.zeros((H, pos, D)), np.repeat(V_, G, 0)], 1)
    want = np.einsum("htk,hkd->htd", p / p.sum(-1, keepdims=True), Vfull)
    tol = 2e-3 if kind is np.float16 else 1e-4
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
    np.testing.assert_allclose(ck.numpy()[:, pos:L], K_, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(cv.numpy()[:, pos:L], V_, rtol=1e-4, atol=1e-4)


def test_stack_sibling_matmuls_leaves_epilogues_and_small_batches():
    """Not stacked: gate and up (silu(gate) * up stays in up's store), a projection another
    elementwise kernel reads element for element (it would lose its store), 16 rows or fewer
    (the GEMV path). Values as NumPy says, and a projection held in a variable reads right."""
    C = 128
    (wg, wu, wd), (Wg, Wu, Wd) = _weights(np.float32, [(256, C), (256, C), (C, 256)])
    for T in (24, 8):
        x = rng.standard_normal((T, C)).astype(np.float32)
        X = tg.tensor(x)
        y = tg.nn.linear(tg.nn.linear(X, wg).silu() * tg.nn.linear(X, wu), wd)
        with tg.debug.kernel_log() as log:
            got = y.numpy()
        assert not any(n.endswith(("_x2", "_x3")) for n in names(log)), names(log)
        g = x.astype(np.float64) @ Wg.T
        want = (g / (1 + np.exp(-g)) * (x @ Wu.T)) @ Wd.T
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    x = rng.standard_normal((24, C)).astype(np.float32)
    X = tg.tensor(x)
    a, b = tg.nn.linear(X, wg), tg.nn.linear(X, wu)
    outs = (a.reshape(24, 4, 64).swapaxes(0, 1) * 2.0, b + 1.0)     # b + 1: b's epilogue
    with tg.debug.kernel_log() as log:
        tg.realize(*outs)
    assert not any(n.endswith("_x2") for n in names(log)), names(log)
    np.testing.assert_allclose(outs[1].numpy(), x @ Wu.T + 1, rtol=1e-4, atol=1e-4)
    # both read through strided views: stacked; `a` itself, held here, reads its columns
    a, b = tg.nn.linear(X, wg), tg.nn.linear(X, wu)
    outs = (a.reshape(24, 4, 64).swapaxes(0, 1) * 2.0, b.T * 3.0)
    with tg.debug.kernel_log() as log:
        tg.realize(*outs)
    assert sum(n.endswith("_x2") for n in names(log)) == 1, names(log)
    np.testing.assert_allclose(outs[0].numpy(), (x @ Wg.T).reshape(24, 4, 64).transpose(1, 0, 2) * 2, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(outs[1].numpy(), (x @ Wu.T).T * 3, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(a.numpy(), x @ Wg.T, rtol=1e-4, atol=1e-4)


def test_rows_before_head_reads_what_the_plain_code_reads():
    """A lazy write into the prompt's x issued after the head was built: the rows the rule
    rebuilds read the old contents, as the plain code does."""
    T, C, V = 6, 64, 24
    (w,), (W,) = _weights("q8_0", [(V, C)])
    x = rng.standard_normal((T, C)).astype(np.float32)
    g, c = rng.standard_normal(C).astype(np.float32), rng.standard_normal(C).astype(np.float32)
    X = tg.tensor(x).contiguous().realize()
    y = tg.nn.linear(tg.nn.layer_norm(X, tg.tensor(g), tg.tensor(c)), w)[2:4].contiguous()
    X[:, :] = 0.0                                                         # after y was built
    want = (_ln(x, g, c) @ W.T)[2:4]
    np.testing.assert_allclose(y.numpy(), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert np.all(X.numpy() == 0)


@pytest.mark.parametrize("kind", [np.float16, "q8_0"])
def test_stack_sibling_layer_norms(kind):
    """GPT-NeoX's parallel residual over a prompt: two layer_norms of one x, each read by its
    own matmul, are one `layer_norm2` kernel (x read and each row reduced once); values as
    NumPy says, and a norm held in a variable still reads its own block."""
    T, C = 24, 128
    (w1, w2), (W1, W2) = _weights(kind, [(96, C), (160, C)])
    x = rng.standard_normal((T, C)).astype(np.float32)
    g1, c1, g2 = (rng.standard_normal(C).astype(np.float32) for _ in range(3))
    X = tg.tensor(x)
    h1 = tg.nn.layer_norm(X, tg.tensor(g1), tg.tensor(c1))
    h2 = tg.nn.layer_norm(X, tg.tensor(g2))
    y = (tg.nn.linear(h1, w1).sum(-1) + tg.nn.linear(h2, w2).sum(-1))
    with tg.debug.kernel_log() as log:
        got = y.numpy()
    assert names(log).count("layer_norm2") == 1 and "layer_norm" not in names(log), names(log)
    want = (_ln(x, g1, c1) @ W1.T).sum(-1) + (_ln(x, g2, np.zeros(C)) @ W2.T).sum(-1)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    np.testing.assert_allclose(h1.numpy(), _ln(x, g1, c1), rtol=1e-5, atol=1e-5)


def test_stack_sibling_layer_norms_leaves_epilogues_and_other_inputs():
    """Not stacked: a norm an elementwise kernel reads (its store takes it as an epilogue), and
    two norms of different x or different eps."""
    T, C = 24, 64
    (w1,), (W1,) = _weights(np.float32, [(32, C)])
    x, x2 = (rng.standard_normal((T, C)).astype(np.float32) for _ in range(2))
    X, X2 = tg.tensor(x), tg.tensor(x2)
    cases = [lambda: tg.nn.linear(tg.nn.layer_norm(X), w1).sum(-1) + (tg.nn.layer_norm(X) * 2.0).sum(-1),
             lambda: tg.nn.linear(tg.nn.layer_norm(X), w1).sum(-1) + tg.nn.linear(tg.nn.layer_norm(X2), w1).sum(-1),
             lambda: tg.nn.linear(tg.nn.layer_norm(X), w1).sum(-1) + tg.nn.linear(tg.nn.layer_norm(X, eps=1e-3), w1).sum(-1)]
    wants = [(_ln(x, 1.0, 0.0) @ W1.T).sum(-1) + (_ln(x, 1.0, 0.0) * 2).sum(-1),
             (_ln(x, 1.0, 0.0) @ W1.T).sum(-1) + (_ln(x2, 1.0, 0.0) @ W1.T).sum(-1),
             (_ln(x, 1.0, 0.0) @ W1.T).sum(-1) + (_ln(x, 1.0, 0.0, eps=1e-3) @ W1.T).sum(-1)]
    for make, want in zip(cases, wants):
        with tg.debug.kernel_log() as log:
            got = make().numpy()
        assert "layer_norm2" not in names(log), names(log)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("kind", [np.float32, np.float16, "q8_0", "q4_0"])
def test_pair_matmuls_in_sum(kind):
    """GPT-NeoX's parallel residual over a prompt, x + linear(a, Wo, bo) + linear(gelu(u), Wd, bd)
    in plain code: ONE matmul over the concatenated K (`_kc2`), the residual and both biases in
    its store; values as NumPy says."""
    T, C, F = 24, 128, 256
    (wo, wd), (Wo, Wd) = _weights(kind, [(C, C), (C, F)])
    x, a, u = (rng.standard_normal(s).astype(np.float32) for s in ((T, C), (T, C), (T, F)))
    bo, bd = rng.standard_normal(C).astype(np.float32), rng.standard_normal(C).astype(np.float32)
    y = tg.tensor(x) + tg.nn.linear(tg.tensor(a), wo, tg.tensor(bo)) + tg.nn.linear(tg.tensor(u).gelu(), wd, tg.tensor(bd))
    with tg.debug.kernel_log() as log:
        got = y.numpy()
    mms = [n for n in names(log) if "matmul" in n]
    assert len(mms) == 1 and mms[0].endswith("_kc2") and len(names(log)) == 2, names(log)   # + the gelu
    g = tg.tensor(u).gelu().numpy().astype(np.float64)
    want = x + a @ Wo.T + bo + g @ Wd.T + bd
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_pair_matmuls_in_sum_leaves_what_it_cannot_pair():
    """Not paired: a projection read elsewhere too (it must exist on its own), one row or a few
    (the GEMV paths), two K that are not whole K steps; the sum is still right."""
    T, C = 24, 96
    (w1, w2), (W1, W2) = _weights(np.float32, [(C, C), (C, 100)])
    x, a, b = rng.standard_normal((T, C)).astype(np.float32), rng.standard_normal((T, C)).astype(np.float32), \
        rng.standard_normal((T, 100)).astype(np.float32)
    A, B = tg.tensor(a), tg.tensor(b)
    # K = 96 and 100: neither a multiple of 64
    y = tg.tensor(x) + tg.nn.linear(A, w1) + tg.nn.linear(B, w2)
    with tg.debug.kernel_log() as log:
        got = y.numpy()
    assert not any(n.endswith("_kc2") for n in names(log)), names(log)
    np.testing.assert_allclose(got, x + a @ W1.T + b @ W2.T, rtol=1e-4, atol=1e-4)
    (w3, w4), (W3, W4) = _weights(np.float32, [(C, 64), (C, 128)])
    a3, b4 = rng.standard_normal((T, 64)).astype(np.float32), rng.standard_normal((T, 128)).astype(np.float32)
    p = tg.nn.linear(tg.tensor(a3), w3)
    outs = (tg.tensor(x) + p + tg.nn.linear(tg.tensor(b4), w4), p * 2.0)          # p read twice
    with tg.debug.kernel_log() as log:
        tg.realize(*outs)
    assert not any(n.endswith("_kc2") for n in names(log)), names(log)
    np.testing.assert_allclose(outs[0].numpy(), x + a3 @ W3.T + b4 @ W4.T, rtol=1e-4, atol=1e-4)
    for rows in (1, 3):
        y = tg.tensor(x[:rows]) + tg.nn.linear(tg.tensor(a3[:rows]), w3) + tg.nn.linear(tg.tensor(b4[:rows]), w4)
        with tg.debug.kernel_log() as log:
            got = y.numpy()
        assert not any(n.endswith("_kc2") for n in names(log)), (rows, names(log))
        np.testing.assert_allclose(got, x[:rows] + a3[:rows] @ W3.T + b4[:rows] @ W4.T, rtol=1e-4, atol=1e-4)


def test_pair_matmuls_waits_for_tensor_cores_to_be_run(monkeypatch):
    """On an adapter with tensor cores, f16 / quantized pairs of 16 rows or more stay two
    matmuls (tensor-core k_parts have not run on a GPU yet: matmul_coop.TUNING["k_parts"]); f32
    pairs (never on the tensor cores) and fewer rows still pair. Planned only: nothing runs."""
    from tensorgpu.kernels import matmul_coop as coop
    from tensorgpu.rewrites import Graph, pair_matmuls_in_sum
    monkeypatch.setattr(runtime.Device, "has_coopmat", property(lambda self: True))
    C = 128

    def fires(kind, T):
        (w1, w2), _ = _weights(kind, [(C, C), (C, 2 * C)])
        x, a, b = (tg.tensor(rng.standard_normal(s).astype(np.float32)) for s in ((T, C), (T, C), (T, 2 * C)))
        y = x + tg.nn.linear(a, w1) + tg.nn.linear(b, w2)
        return pair_matmuls_in_sum(Graph(y.node))

    with tg.debug.tuning(coop.TUNING, enabled=True):      # (conftest keeps them off elsewhere)
        assert fires(np.float16, 24) == 0 and fires("q8_0", 24) == 0
        assert fires(np.float32, 24) == 1 and fires(np.float16, 12) == 1
        with tg.debug.tuning(coop.TUNING, k_parts=True):
            assert fires(np.float16, 24) == 1
    assert fires(np.float16, 24) == 1                        # tensor cores switched off: the WGSL tiles pair
