"""attention kernel (flash prefill tiles / flash-decoding splits + combine) against float64 NumPy."""
import numpy as np
import pytest

from nn_kernel_util import Base, paths, read_f32  # noqa: F401
from tensorgpu import runtime
from tensorgpu.kernels import attention as attn_mod
from tensorgpu.kernels.attention import attention
from tensorgpu import debug as tg_debug  # noqa: E402
from tensorgpu.kernels.common import Operand  # noqa: E402

rng = np.random.default_rng(5)


def ref_attention(q, k, v, kvl, causal=True, scale=None, qp0=None):
    """q [B, sq, d], k/v [B, sk_max, d]; rows that see no key are zeros."""
    B, sq, D = q.shape
    scale = 1.0 / np.sqrt(D) if scale is None else scale
    qp0 = kvl - sq if qp0 is None else qp0
    s = np.einsum("bqd,bkd->bqk", q.astype(np.float64), k[:, :kvl].astype(np.float64)) * scale
    vis = np.ones((sq, kvl), bool)
    if causal:
        vis = np.arange(kvl)[None, :] <= qp0 + np.arange(sq)[:, None]
    s = np.where(vis[None], s, -np.inf)
    m = np.max(s, -1, keepdims=True, initial=-np.inf)
    p = np.where(vis[None], np.exp(s - np.where(np.isfinite(m), m, 0)), 0.0)
    l = p.sum(-1, keepdims=True)
    o = np.einsum("bqk,bkd->bqd", p, v[:, :kvl].astype(np.float64))
    return np.where(l > 0, o / np.where(l > 0, l, 1), 0.0)


def run(qb, qv, kb, kv, vb, vv, kv_len, out_layout="bsd", **kw):
    B, sq, D = qv.shape
    out = runtime.Buffer(4 * B * sq * D)
    attention(out, qb.view(qv), kb.view(kv), vb.view(vv), kv_len, out_layout=out_layout, **kw)
    got = read_f32(out, B * sq * D)
    return got.reshape(B, sq, D) if out_layout == "bsd" else got.reshape(sq, B, D).transpose(1, 0, 2)


def case(B, sq, sk_max, D, kv_dtype=np.float32):
    q = rng.standard_normal((B, sq, D)).astype(np.float32)
    k = rng.standard_normal((B, sk_max, D)).astype(kv_dtype)
    v = rng.standard_normal((B, sk_max, D)).astype(kv_dtype)
    return q, k, v


TOL = dict(atol=2e-6, rtol=2e-5)


@pytest.mark.parametrize("B,sq,D", [(3, 40, 64), (2, 9, 80), (1, 33, 6)], ids=str)
def test_causal_prefill(paths, B, sq, D):
    q, k, v = case(B, sq, sq, D)
    got = run(Base(q), q, Base(k), k, Base(v), v, sq)
    np.testing.assert_allclose(got, ref_attention(q, k, v, sq), **TOL)


def test_prefill_without_splits(paths, monkeypatch):
    monkeypatch.setattr(attn_mod, "TARGET_WORKGROUPS_PREFILL", 1)
    q, k, v = case(2, 48, 48, 32)
    assert attn_mod._Plan(2, 48, 48, 32).NSPLIT == 1
    np.testing.assert_allclose(run(Base(q), q, Base(k), k, Base(v), v, 48), ref_attention(q, k, v, 48), **TOL)


@pytest.mark.parametrize("kv_dtype", [np.float32, np.float16], ids=["f32", "f16"])
def test_decode_long_context_splits(paths, kv_dtype):
    B, sk_max, D, kvl = 4, 1024, 64, 1000
    q, k, v = case(B, 1, sk_max, D, kv_dtype)
    assert attn_mod._Plan(B, 1, sk_max, D).NSPLIT > 1
    got = run(Base(q), q, Base(k), k, Base(v), v, runtime.upload(np.array([kvl], np.int32)))
    np.testing.assert_allclose(got, ref_attention(q, k, v, kvl), **TOL)


@pytest.mark.parametrize("sq", [2, 5, 20])
def test_chunked_prefill(paths, sq):
    q, k, v = case(2, sq, 96, 32, np.float16)
    got = run(Base(q), q, Base(k), k, Base(v), v, 70)
    np.testing.assert_allclose(got, ref_attention(q, k, v, 70), **TOL)


@pytest.mark.parametrize("sq,kvl", [(1, 50), (12, 30), (30, 30)])
def test_non_causal_and_scale(paths, sq, kvl):
    q, k, v = case(3, sq, 64, 16)
    got = run(Base(q), q, Base(k), k, Base(v), v, kvl, causal=False, scale=0.3)
    np.testing.assert_allclose(got, ref_attention(q, k, v, kvl, causal=False, scale=0.3), **TOL)


def test_model_layouts(paths):
    """q sliced out of a fused projection [sq, 3, H, D] (no copy), caches [H, max_ctx, D] f16,
    output straight into [sq, H*D] (out_layout='sbd')."""
    sq, H, D, max_ctx = 6, 4, 32, 40
    qkv = rng.standard_normal((sq, 3, H, D)).astype(np.float32)
    kc = rng.standard_normal((H, max_ctx, D)).astype(np.float16)
    vc = rng.standard_normal((H, max_ctx, D)).astype(np.float16)
    qv = qkv[:, 0].transpose(1, 0, 2)          # [H, sq, D], strides (D, 3*H*D, 1)
    got = run(Base(qkv), qv, Base(kc), kc, Base(vc), vc, 25, out_layout="sbd")
    np.testing.assert_allclose(got, ref_attention(np.ascontiguousarray(qv), kc, vc, 25), **TOL)
    # a cache view with a padded row stride (a slice of a wider allocation)
    wide = rng.standard_normal((H, max_ctx, D + 8)).astype(np.float32)
    kvv = wide[:, :, 4:4 + D]
    got = run(Base(qkv), qv, Base(wide), kvv, Base(vc), vc, 30)
    np.testing.assert_allclose(got, ref_attention(np.ascontiguousarray(qv), kvv, vc, 30), **TOL)


def test_kv_len_buffer_reuses_pipeline(paths):
    """One pipeline + bind group serves every decode step: only the buffer's value changes."""
    B, sk_max, D = 2, 256, 32
    q, k, v = case(B, 1, sk_max, D, np.float16)
    qb, kb, vb = Base(q), Base(k), Base(v)
    kvl = runtime.upload(np.array([5], np.int32))
    out = runtime.Buffer(4 * B * D)

    def step():
        attention(out, qb.whole(), kb.whole(), vb.whole(), kvl)
        return read_f32(out, B * D, (B, 1, D))

    np.testing.assert_allclose(step(), ref_attention(q, k, v, 5), **TOL)
    before = dict(runtime.STATS)
    for n in (9, 200, 256, 1):
        runtime.write(kvl, np.array([n], np.int32))
        np.testing.assert_allclose(step(), ref_attention(q, k, v, n), **TOL)
    assert runtime.STATS["pipelines_compiled"] == before["pipelines_compiled"]
    assert runtime.STATS["bind_groups_created"] == before["bind_groups_created"]


def test_q_pos0(paths):
    q, k, v = case(2, 4, 32, 16)
    got = run(Base(q), q, Base(k), k, Base(v), v, 20, q_pos0=10)
    np.testing.assert_allclose(got, ref_attention(q, k, v, 20, qp0=10), **TOL)
    got = run(Base(q), q, Base(k), k, Base(v), v, runtime.upload(np.array([24], np.int32)),
              q_pos0=runtime.upload(np.array([3], np.int32)))
    np.testing.assert_allclose(got, ref_attention(q, k, v, 24, qp0=3), **TOL)


def test_empty_context_gives_zeros(paths):
    q, k, v = case(2, 1, 16, 8)
    got = run(Base(q), q, Base(k), k, Base(v), v, runtime.upload(np.array([0], np.int32)))
    assert np.all(got == 0)


def test_errors():
    q, k, v = case(2, 3, 8, 4)
    qb, kb, vb = Base(q), Base(k), Base(v)
    out = runtime.Buffer(4 * 2 * 3 * 4)
    with pytest.raises(ValueError, match="kv_len=9"):
        attention(out, qb.whole(), kb.whole(), vb.whole(), 9)
    with pytest.raises(ValueError, match="k_cache"):
        attention(out, qb.whole(), Base(k[:, :, :2]).whole(), vb.whole(), 3)
    with pytest.raises(ValueError, match="out_layout"):
        attention(out, qb.whole(), kb.whole(), vb.whole(), 3, out_layout="bds")
    with pytest.raises(ValueError, match="same Buffer"):
        attention(out, qb.whole(), kb.whole(), kb.whole(), 3)


@pytest.mark.parametrize("sq", [1, 12])
def test_f16_query(paths, sq):
    q, k, v = case(2, sq, 40, 24, np.float16)
    q = q.astype(np.float16)
    got = run(Base(q), q, Base(k), k, Base(v), v, 33)
    np.testing.assert_allclose(got, ref_attention(q, k, v, 33), **TOL)


# ----------------------------------------------------------------------------- fused decode step

from tensorgpu import dtypes  # noqa: E402
from tensorgpu.kernels.attention import rope_attention_decode  # noqa: E402


def _ref_rope(x, pos, rot, base=10000.0):
    from tensorgpu.kernels.rope import inv_freq
    f = inv_freq(rot, base)
    ang = (np.float32(pos) * f).astype(np.float64)
    c, s = np.cos(ang), np.sin(ang)
    y = x.astype(np.float64).copy()
    half = rot // 2
    a, b = y[..., :half].copy(), y[..., half:rot].copy()
    y[..., :half] = a * c - b * s
    y[..., half:rot] = b * c + a * s
    return y


@pytest.mark.parametrize("H,D,rot,max_ctx,kvls", [(3, 32, 16, 200, (1, 30, 64, 65, 130, 200, 64)),
                                                  (2, 80, 80, 70, (70, 5)), (2, 8, 4, 9, (9,))], ids=str)
@pytest.mark.parametrize("cache_dtype", [np.float16, np.float32], ids=["f16", "f32"])
@pytest.mark.parametrize("chunk", [None, 32, 128], ids=["chunk64", "chunk32", "chunk128"])
def test_rope_attention_decode(paths, H, D, rot, max_ctx, kvls, cache_dtype, chunk):
    """One dispatch = rope_kv_write + attention (+ the split combine) for one token, over short
    and split contexts; repeated calls reuse the per-head counters (they must come back to 0).
    chunk: keys per workgroup (attention.DECODE_TUNING, a benchmark knob), other than 64."""
    from tensorgpu import debug
    from tensorgpu.kernels import attention as att
    with debug.tuning(att.DECODE_TUNING, **({"chunk": chunk} if chunk else {})):
        _decode_case(H, D, rot, max_ctx, kvls, cache_dtype)


def test_decode_chunk_knob_is_checked():
    from tensorgpu import debug
    from tensorgpu.kernels import attention as att
    with debug.tuning(att.DECODE_TUNING, chunk=256), pytest.raises(ValueError, match="keys per decode workgroup"):
        _decode_case(2, 16, 16, 40, (10,), np.float32)


def _decode_case(H, D, rot, max_ctx, kvls, cache_dtype):
    K = rng.standard_normal((H, max_ctx, D)).astype(cache_dtype)
    V = rng.standard_normal((H, max_ctx, D)).astype(cache_dtype)
    kc, vc = runtime.upload(K), runtime.upload(V)
    out = runtime.Buffer(4 * H * D)
    for kvl in kvls:
        qkv = rng.standard_normal((1, 3, H, D)).astype(np.float32)
        pos = kvl - 1
        rope_attention_decode(out, kc, vc, Base(qkv).whole(), runtime.upload(np.array([pos], np.int32)),
                              runtime.upload(np.array([kvl], np.int32)), H, D, rot, max_ctx,
                              cache_dtype=dtypes.from_numpy(cache_dtype))
        got = read_f32(out, H * D, (H, D))
        K[:, pos] = _ref_rope(qkv[0, 1], pos, rot).astype(cache_dtype)
        V[:, pos] = qkv[0, 2].astype(cache_dtype)
        q = _ref_rope(qkv[0, 0], pos, rot)[:, None, :]
        want = ref_attention(q, K.astype(np.float64), V.astype(np.float64), kvl)[:, 0]
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-4)
        np.testing.assert_array_equal(np.frombuffer(runtime.read(vc), cache_dtype).reshape(V.shape), V)
        Kg = np.frombuffer(runtime.read(kc), cache_dtype).reshape(K.shape)
        np.testing.assert_allclose(Kg.astype(np.float64), K.astype(np.float64), atol=2e-3 if cache_dtype == np.float16 else 2e-6)
        K = Kg.copy()   # keep the GPU's rounding of the new row


def test_rope_attention_decode_position_out_of_range(paths):
    H, D, max_ctx = 2, 16, 10
    K = rng.standard_normal((H, max_ctx, D)).astype(np.float16)
    kc, vc = runtime.upload(K), runtime.upload(K)
    out = runtime.Buffer(4 * H * D)
    qkv = rng.standard_normal((1, 3, H, D)).astype(np.float32)
    rope_attention_decode(out, kc, vc, Base(qkv).whole(), runtime.upload(np.array([max_ctx], np.int32)),
                          runtime.upload(np.array([4], np.int32)), H, D, 8, max_ctx)
    np.testing.assert_array_equal(np.frombuffer(runtime.read(kc), np.float16).reshape(K.shape), K)
    q = _ref_rope(qkv[0, 0], max_ctx, 8)[:, None, :]
    want = ref_attention(q, K.astype(np.float64), K.astype(np.float64), 4)[:, 0]
    np.testing.assert_allclose(read_f32(out, H * D, (H, D)), want, atol=2e-5, rtol=2e-4)


@pytest.mark.parametrize("kernel,target", [("auto", 1024), ("auto", 1), ("generic", 256)])
@pytest.mark.parametrize("B,sq,sk_max,D,kvl", [(2, 70, 300, 128, 275), (3, 33, 300, 80, 290), (1, 12, 200, 48, 190)], ids=str)
def test_prefill_tiled_and_generic(paths, monkeypatch, kernel, target, B, sq, sk_max, D, kvl):
    """The register-blocked prefill kernel (d % 16 == 0: vec4 units for d % 64 == 0, scalar dims
    otherwise; with key splits + combine, including splits past the causal limit, or without;
    the unrolled loops and the per-key loop over the valid keys only) and the generic one agree
    with NumPy."""
    monkeypatch.setattr(attn_mod, "PREFILL_KERNEL", kernel)
    monkeypatch.setattr(attn_mod, "TILED_TARGET_WORKGROUPS", target)
    if target == 1:
        monkeypatch.setitem(attn_mod.TILED_TUNING, "unroll_s", 1)
        monkeypatch.setitem(attn_mod.TILED_TUNING, "unroll_pv", 0)
    if kernel == "auto":
        assert (attn_mod._TilePlan(B, sq, sk_max, D, ()).NSPLIT == 1) == (target == 1)
    q, k, v = case(B, sq, sk_max, D, np.float16)
    assert attn_mod._TilePlan(B, sq, sk_max, D, ()).ok == (kernel == "auto")
    got = run(Base(q), q, Base(k), k, Base(v), v, kvl, out_layout="sbd")
    np.testing.assert_allclose(got, ref_attention(q, k, v, kvl), **TOL)


@pytest.mark.parametrize("sq,sk_max,kvl", [(256, 1024, 768), (40, 512, 40)], ids=str)
def test_prefill_tiled_kv_len_buffer(paths, sq, sk_max, kvl):
    """kv_len in a buffer (as in the model): the split plan only knows the prompt length, both for
    a chunk after earlier keys (q_pos0 = kvl - sq > 0) and for a prompt in a much larger cache."""
    q, k, v = case(2, sq, sk_max, 64, np.float16)
    got = run(Base(q), q, Base(k), k, Base(v), v, runtime.upload(np.array([kvl], np.int32)), out_layout="sbd")
    np.testing.assert_allclose(got, ref_attention(q, k, v, kvl), **TOL)


# ----------------------------------------------------------------------------- grouped-query attention


@pytest.mark.parametrize("kernel", ["auto", "generic"])
@pytest.mark.parametrize("B,Bkv,sq,sk_max,kvl", [(4, 2, 40, 64, 40), (4, 1, 1, 96, 70), (6, 2, 5, 32, 20),
                                                  (8, 2, 33, 48, 45)], ids=str)
def test_grouped_query_attention(paths, monkeypatch, kernel, B, Bkv, sq, sk_max, kvl):
    """k/v with fewer heads than q: query head b reads KV head b // (B / Bkv), as torch's
    enable_gqa=True; compared with NumPy on K/V repeated to B heads (the kernel never copies)."""
    monkeypatch.setattr(attn_mod, "PREFILL_KERNEL", kernel)
    D = 32
    q = rng.standard_normal((B, sq, D)).astype(np.float32)
    k = rng.standard_normal((Bkv, sk_max, D)).astype(np.float32)
    v = rng.standard_normal((Bkv, sk_max, D)).astype(np.float32)
    got = run(Base(q), q, Base(k), k, Base(v), v, kvl, out_layout="sbd")
    G = B // Bkv
    want = ref_attention(q, np.repeat(k, G, axis=0), np.repeat(v, G, axis=0), kvl)
    np.testing.assert_allclose(got, want, **TOL)
    # a different KV head per group really is read: swapping KV heads changes the answer
    if Bkv > 1:
        assert not np.allclose(want, ref_attention(q, np.repeat(k[::-1], G, axis=0), np.repeat(v[::-1], G, axis=0), kvl))


def test_grouped_query_errors():
    q, k, v = case(4, 3, 8, 4)
    out = runtime.Buffer(4 * 4 * 3 * 4)
    with pytest.raises(ValueError, match="B_kv dividing"):
        attention(out, Base(q).whole(), Base(k[:3]).whole(), Base(v[:3]).whole(), 3)
    with pytest.raises(ValueError, match="differ in shape"):
        attention(out, Base(q).whole(), Base(k[:2]).whole(), Base(v[:1]).whole(), 3)


def test_rope_attention_decode_position_and_length_as_parameters():
    """The fused decode step with pos / kv_len as kernel parameters (what the rewrite rule
    uses: no int32 buffers to fill per step) equals the buffer form, caches included."""
    from tensorgpu.kernels.attention import rope_attention_decode
    H, D, rot, max_ctx, pos = 4, 32, 16, 64, 9
    qkv = rng.standard_normal((1, 3, H, D)).astype(np.float32)
    kc0 = rng.standard_normal((H, max_ctx, D)).astype(np.float32)
    outs = []
    for by_param in (False, True):
        kc, vc = runtime.upload(kc0), runtime.upload(kc0 * 0.5)
        out = runtime.Buffer(4 * H * D)
        if by_param:
            rope_attention_decode(out, kc, vc, Base(qkv).whole(), pos, pos + 1, H, D, rot, max_ctx,
                                  cache_dtype=dtypes.float32)
        else:
            rope_attention_decode(out, kc, vc, Base(qkv).whole(), runtime.upload(np.array([pos], np.int32)),
                                  runtime.upload(np.array([pos + 1], np.int32)), H, D, rot, max_ctx, cache_dtype=dtypes.float32)
        outs.append([np.frombuffer(runtime.read(b), np.float32) for b in (out, kc, vc)])
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a, b)


def _ref_rope_mode(x, pos, rot, mode, base=10000.0):
    if mode == "neox":
        return _ref_rope(x, pos, rot, base)
    from tensorgpu.kernels.rope import inv_freq
    ang = (np.float32(pos) * inv_freq(rot, base)).astype(np.float64)
    c, s = np.cos(ang), np.sin(ang)
    y = x.astype(np.float64).copy()
    a, b = y[..., 0:rot:2].copy(), y[..., 1:rot:2].copy()
    y[..., 0:rot:2] = a * c - b * s
    y[..., 1:rot:2] = b * c + a * s
    return y


@pytest.mark.parametrize("H,Hkv,D,rot,max_ctx,kvls", [(4, 2, 32, 32, 70, (1, 64, 65, 70)), (6, 3, 16, 8, 9, (9, 3)),
                                                      (4, 4, 32, 16, 40, (12,)), (8, 1, 64, 64, 130, (100, 130))], ids=str)
@pytest.mark.parametrize("mode", ["normal", "neox"])
@pytest.mark.parametrize("cache_dtype", [np.float16, np.float32], ids=["f16", "f32"])
@pytest.mark.parametrize("by_param", [False, True], ids=["bufs", "param"])
def test_rope_attention_decode_gqa_separate_qkv(H, Hkv, D, rot, max_ctx, kvls, mode, cache_dtype, by_param):
    """Separate q [1, H, D], k, v [1, Hkv, D] (slices of bigger rows: offsets) and grouped-query
    heads: query head h reads KV head h // (H / Hkv); each KV head's new row written once, the
    other rows untouched; both rope modes."""
    K = rng.standard_normal((Hkv, max_ctx, D)).astype(cache_dtype)
    V = rng.standard_normal((Hkv, max_ctx, D)).astype(cache_dtype)
    kc, vc = runtime.upload(K), runtime.upload(V)
    out = runtime.Buffer(4 * H * D)
    for kvl in kvls:
        q = rng.standard_normal((1, H, D)).astype(np.float32)
        kv = rng.standard_normal((2 + 2 * Hkv * D,)).astype(np.float32)    # k at 2, v after it
        k, v = kv[2:2 + Hkv * D].reshape(1, Hkv, D), kv[2 + Hkv * D:].reshape(1, Hkv, D)
        kvb = Base(kv)
        kop = Operand(kvb.buf, dtypes.float32, (1, Hkv, D), (Hkv * D, D, 1), 2)
        vop = Operand(kvb.buf, dtypes.float32, (1, Hkv, D), (Hkv * D, D, 1), 2 + Hkv * D)
        pos = kvl - 1
        p, L = (pos, kvl) if by_param else (runtime.upload(np.array([pos], np.int32)),
                                            runtime.upload(np.array([kvl], np.int32)))
        with tg_debug.kernel_log() as log:
            rope_attention_decode(out, kc, vc, Base(q).whole(), p, L, H, D, rot, max_ctx,
                                  cache_dtype=dtypes.from_numpy(cache_dtype), mode=mode, k=kop, v=vop, n_kv_heads=Hkv)
        assert [e.name.split("[")[0] for e in log] == ["attention_decode_gqa"]
        got = read_f32(out, H * D, (H, D))
        K[:, pos] = _ref_rope_mode(k[0], pos, rot, mode).astype(cache_dtype)
        V[:, pos] = v[0].astype(cache_dtype)
        G = H // Hkv
        qr = _ref_rope_mode(q[0], pos, rot, mode)[:, None, :]
        want = ref_attention(qr, np.repeat(K.astype(np.float64), G, 0), np.repeat(V.astype(np.float64), G, 0), kvl)[:, 0]
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-4)
        np.testing.assert_array_equal(np.frombuffer(runtime.read(vc), cache_dtype).reshape(V.shape), V)
        Kg = np.frombuffer(runtime.read(kc), cache_dtype).reshape(K.shape)
        np.testing.assert_allclose(Kg.astype(np.float64), K.astype(np.float64), atol=2e-3 if cache_dtype == np.float16 else 2e-6)
        K = Kg.copy()


def test_rope_attention_decode_gqa_errors():
    H, Hkv, D, max_ctx = 4, 2, 16, 8
    kc = runtime.Buffer(2 * Hkv * max_ctx * D)
    vc = runtime.Buffer(2 * Hkv * max_ctx * D)
    out = runtime.Buffer(4 * H * D)
    q = Base(np.zeros((1, H, D), np.float32)).whole()
    k = Base(np.zeros((1, Hkv, D), np.float32)).whole()
    with pytest.raises(ValueError, match="n_kv_heads"):
        rope_attention_decode(out, kc, vc, q, 0, 1, H, D, D, max_ctx, k=k, v=k, n_kv_heads=3)
    with pytest.raises(ValueError, match="k has shape"):
        rope_attention_decode(out, kc, vc, q, 0, 1, H, D, D, max_ctx, k=q, v=k, n_kv_heads=Hkv)
    with pytest.raises(ValueError, match="n_kv_heads"):
        rope_attention_decode(out, kc, vc, q, 0, 1, H, D, D, max_ctx, n_kv_heads=Hkv)


# ----------------------------------------------------------------------------- fused decode step, a batch

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def _ref_batched_decode(K, V, q, k, v, pos, rot, mode, ff=None):
    """NumPy: row b ropes q[b], k[b] to pos[b], writes k/v at row pos[b] of slot b (a negative
    position counting from the end, as np.put_along_axis; outside [-L, L) nothing), attends over
    the slot's first pos[b] + 1 rows (GQA: query head h reads KV head h // (H / Hkv)). Updates
    K, V [S, Hkv, L, D] in place; returns out [B, H, D]."""
    B, H, D = q.shape
    Hkv, L = K.shape[1], K.shape[2]
    out = np.zeros((B, H, D))
    for b in range(B):
        p = int(pos[b])
        kr = _ref_rope_mode_ff(k[b], p, rot, mode, ff)
        if -L <= p < L:
            K[b, :, p % L] = kr.astype(K.dtype)
            V[b, :, p % L] = v[b].astype(V.dtype)
        n = max(0, min(p + 1, L))
        if n == 0:
            continue
        qr = _ref_rope_mode_ff(q[b], p, rot, mode, ff)[:, None, :]
        Kb = np.repeat(K[b, :, :n].astype(np.float64), H // Hkv, 0)
        Vb = np.repeat(V[b, :, :n].astype(np.float64), H // Hkv, 0)
        out[b] = ref_attention(qr, Kb, Vb, n)[:, 0]
    return out


def _ref_rope_mode_ff(x, pos, rot, mode, ff=None):
    from tensorgpu.kernels.rope import scaled_inv_freq
    ang = (np.float32(pos) * scaled_inv_freq(rot, 10000.0, ff)).astype(np.float64)
    c, s = np.cos(ang), np.sin(ang)
    y = x.astype(np.float64).copy()
    if mode == "neox":
        i, j = np.arange(rot // 2), np.arange(rot // 2) + rot // 2
    else:
        i, j = np.arange(0, rot, 2), np.arange(1, rot, 2)
    a, b = y[..., i].copy(), y[..., j].copy()
    y[..., i] = a * c - b * s
    y[..., j] = b * c + a * s
    return y


def _run_batched_decode(B, S, H, Hkv, D, rot, L, pos, cache_dtype, mode, block, ff, f16_inputs=False):
    """One batched rope_attention_decode call on random inputs; returns (got, want, K/V on the
    GPU, K/V of NumPy)."""
    K = rng.standard_normal((S, Hkv, L, D)).astype(cache_dtype)
    V = rng.standard_normal((S, Hkv, L, D)).astype(cache_dtype)
    kc, vc = runtime.upload(K), runtime.upload(V)
    out = runtime.Buffer(4 * B * H * D)
    xdt = np.float16 if f16_inputs else np.float32
    pb = runtime.upload(np.asarray(pos, np.int32))
    cd = dtypes.from_numpy(cache_dtype)
    with tg_debug.kernel_log() as log:
        if block:   # one [B, 3, H, D] block inside a bigger row (an offset and a row stride)
            big = rng.standard_normal((B, 3 * H * D + 4)).astype(xdt)
            qkv = big[:, 4:].reshape(B, 3, H, D)
            rope_attention_decode(out, kc, vc, Base(big).view(qkv), pb, None, H, D, rot, L, cache_dtype=cd, mode=mode,
                                  freq_factors=ff)
            q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        else:       # LLaMA's own projections: q [B, H, D], k and v slices of one [B, 2 * Hkv * D + 2] row
            qa = rng.standard_normal((B, H, D)).astype(xdt)
            kv = rng.standard_normal((B, 2 + 2 * Hkv * D)).astype(xdt)
            k, v = kv[:, 2:2 + Hkv * D].reshape(B, Hkv, D), kv[:, 2 + Hkv * D:].reshape(B, Hkv, D)
            kvb = Base(kv)
            rope_attention_decode(out, kc, vc, Base(qa).whole(), pb, None, H, D, rot, L, cache_dtype=cd, mode=mode,
                                  k=kvb.view(k), v=kvb.view(v), n_kv_heads=Hkv, freq_factors=ff)
            q = qa
    assert [e.name.split("[")[0] for e in log] == ["attention_decode_batch" if block else "attention_decode_gqa_batch"]
    got = read_f32(out, B * H * D, (B, H, D))
    want = _ref_batched_decode(K, V, q.astype(np.float32), k.astype(np.float32), v.astype(np.float32), pos, rot,
                               mode, ff)
    Kg = np.frombuffer(runtime.read(kc), cache_dtype).reshape(K.shape)
    Vg = np.frombuffer(runtime.read(vc), cache_dtype).reshape(V.shape)
    return got, want, (Kg, Vg), (K, V)


def _check_batched(got, want, gpu, ref, cache_dtype):
    np.testing.assert_allclose(got, want, atol=2e-5 if cache_dtype == np.float32 else 2e-3, rtol=2e-4)
    np.testing.assert_array_equal(gpu[1], ref[1])                   # V rows: a plain copy (cast)
    np.testing.assert_allclose(gpu[0].astype(np.float64), ref[0].astype(np.float64),
                               atol=2e-3 if cache_dtype == np.float16 else 2e-6)


_BATCH_CASES = [
    (3, 4, 4, 4, 32, 16, 200, (0, 130, 63)),          # short, split and chunk-edge positions
    (5, 5, 4, 2, 16, 16, 70, (69, 1, 64, 10, 0)),     # GQA, the last row of the cache
    (2, 6, 6, 3, 8, 4, 9, (8, 3)),                     # tiny head, slots past B untouched
    (4, 4, 8, 1, 64, 64, 130, (-1, 130, -131, 129)),  # negative / past-the-end positions
    (1, 2, 4, 2, 32, 32, 40, (17,)),                   # one sequence
]


@pytest.mark.parametrize("B,S,H,Hkv,D,rot,L,pos,block",
                         [c + (blk,) for c in _BATCH_CASES for blk in (True, False) if not blk or c[2] == c[3]],
                         ids=str)
@pytest.mark.parametrize("cache_dtype", [np.float16, np.float32], ids=["f16", "f32"])
def test_rope_attention_decode_batch(paths, B, S, H, Hkv, D, rot, L, pos, block, cache_dtype):
    """B sequences in one dispatch: row b ropes to its own position, writes K/V row pos[b] of
    cache slot b only (other slots and rows untouched) and attends over that slot's first
    pos[b] + 1 rows, against NumPy; with the q/k/v block (heads equal) or separate q, k, v."""
    mode = "normal" if D % 16 else "neox"
    got, want, gpu, ref = _run_batched_decode(B, S, H, Hkv, D, rot, L, pos, cache_dtype, mode, block, None)
    _check_batched(got, want, gpu, ref, cache_dtype)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_rope_attention_decode_batch_random(data):
    """Random batch sizes, slot counts, heads (GQA), head sizes, rope modes and frequency factors,
    positions anywhere in the cache, f16/f32 caches and f16/f32 inputs."""
    B = data.draw(st.integers(1, 6), "B")
    S = B + data.draw(st.integers(0, 2), "extra slots")
    Hkv = data.draw(st.sampled_from([1, 2, 3]), "Hkv")
    H = Hkv * data.draw(st.sampled_from([1, 2, 4]), "group")
    D = data.draw(st.sampled_from([8, 16, 32, 64]), "D")
    rot = data.draw(st.sampled_from([r for r in (4, 8, D // 2, D) if r <= D and r % 2 == 0]), "rot")
    L = data.draw(st.integers(2, 150), "L")
    pos = data.draw(st.lists(st.integers(-2, L), min_size=B, max_size=B), "pos")
    block = data.draw(st.booleans(), "block") and H == Hkv
    mode = data.draw(st.sampled_from(["neox", "normal"]), "mode")
    cache_dtype = data.draw(st.sampled_from([np.float16, np.float32]), "cache")
    ff = (1 + 3 * rng.random(rot // 2)).astype(np.float32) if data.draw(st.booleans(), "ff") else None
    got, want, gpu, ref = _run_batched_decode(B, S, H, Hkv, D, rot, L, pos, cache_dtype, mode, block, ff,
                                              f16_inputs=data.draw(st.booleans(), "f16 inputs"))
    _check_batched(got, want, gpu, ref, cache_dtype)


def test_rope_attention_decode_batch_of_one_is_the_one_sequence_step():
    """B = 1 with kv_len=None computes what the one-sequence kernel does with kv_len = pos + 1:
    the same bytes in the output and both caches."""
    H, D, rot, L, pos = 4, 32, 16, 100, 70
    qkv = rng.standard_normal((1, 3, H, D)).astype(np.float32)
    K0 = rng.standard_normal((H, L, D)).astype(np.float16)
    outs = []
    for batched in (False, True):
        kc, vc = runtime.upload(K0), runtime.upload(K0[::-1].copy())
        out = runtime.Buffer(4 * H * D)
        pb = runtime.upload(np.array([pos], np.int32))
        rope_attention_decode(out, kc, vc, Base(qkv).whole(), pb, None if batched else runtime.upload(
            np.array([pos + 1], np.int32)), H, D, rot, L)
        outs.append([runtime.read(b) for b in (out, kc, vc)])
    assert outs[0] == outs[1]


def test_rope_attention_decode_batch_errors():
    B, H, D, L = 3, 4, 16, 8
    kc, vc = runtime.Buffer(2 * B * H * L * D), runtime.Buffer(2 * B * H * L * D)
    out = runtime.Buffer(4 * B * H * D)
    qkv = Base(np.zeros((B, 3, H, D), np.float32)).whole()
    pb = runtime.upload(np.zeros(B, np.int32))
    with pytest.raises(ValueError, match="positions must be a Buffer holding 3 int32"):
        rope_attention_decode(out, kc, vc, qkv, runtime.upload(np.zeros(2, np.int32)), None, H, D, D, L)
    with pytest.raises(ValueError, match="positions must be a Buffer"):
        rope_attention_decode(out, kc, vc, qkv, 0, None, H, D, D, L)
    with pytest.raises(ValueError, match="qkv has shape"):      # one length for 3 sequences: not this kernel
        rope_attention_decode(out, kc, vc, qkv, pb, runtime.upload(np.ones(1, np.int32)), H, D, D, L)
    with pytest.raises(ValueError, match="k_cache"):           # caches of 2 slots for 3 sequences
        rope_attention_decode(out, runtime.Buffer(2 * 2 * H * L * D), vc, qkv, pb, None, H, D, D, L)
    with pytest.raises(ValueError, match="out"):
        rope_attention_decode(runtime.Buffer(4 * H * D), kc, vc, qkv, pb, None, H, D, D, L)
    q = Base(np.zeros((B, H, D), np.float32)).whole()
    k = Base(np.zeros((B - 1, 2, D), np.float32)).whole()
    with pytest.raises(ValueError, match="k has shape"):
        rope_attention_decode(out, kc, vc, q, pb, None, H, D, D, L, k=k, v=k, n_kv_heads=2)
