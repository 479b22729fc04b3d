"""rope and rope_kv_write against Hugging Face GPT-NeoX (when torch/transformers are installed)
and a NumPy reference that computes the angle the HF way (float32 inv_freq and pos*inv_freq)."""
import numpy as np
import pytest

from nn_kernel_util import Base, paths, read_f32  # noqa: F401
from tensorgpu import dtypes, runtime
from tensorgpu.kernels.rope import inv_freq, rope, rope_kv_write

rng = np.random.default_rng(3)


def ref_rope(x, pos, rot, base=10000.0, mode="neox", freq_factors=None):
    """x [seq, H, D] -> float64 result; angles as float32 values (HF), cos/sin in float64.
    freq_factors (Llama 3.1 rope_freqs): pair i's angle divided by factor i, as llama.cpp does."""
    f = inv_freq(rot, base)
    if freq_factors is not None:
        f = (f / np.asarray(freq_factors, np.float32)).astype(np.float32)
    ang = (pos.astype(np.float32)[:, None] * f[None, :]).astype(np.float64)   # [seq, rot/2]
    c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    x = x.astype(np.float64)
    y = x.copy()
    half = rot // 2
    if mode == "neox":
        a, b = x[..., :half], x[..., half:rot]
        y[..., :half] = a * c - b * s
        y[..., half:rot] = b * c + a * s
    else:
        a, b = x[..., 0:rot:2], x[..., 1:rot:2]
        y[..., 0:rot:2] = a * c - b * s
        y[..., 1:rot:2] = b * c + a * s
    return y


def run_rope(xb, xv, pos, rot, base=10000.0, mode="neox", freq_factors=None):
    seq, H, D = xv.shape
    out = runtime.Buffer(4 * seq * H * D)
    rope(out, xb.view(xv), runtime.upload(pos.astype(np.int32)), seq, H, D, rot, base, mode, freq_factors)
    return read_f32(out, seq * H * D, (seq, H, D))


POS = np.array([0, 1, 7, 100, 511, 2047, 4095, 8000], np.int32)


def test_inv_freq_matches_hf():
    """Bit-identical to torch for the rotary sizes of real GPT-NeoX models; within torch's own
    pow error (2 ulp) for any."""
    torch = pytest.importorskip("torch")
    for base in (10000.0, 500.0):
        for rot in range(2, 258, 2):
            want = (1.0 / (base ** (torch.arange(0, rot, 2, dtype=torch.int64).float() / rot))).numpy()
            got = inv_freq(rot, base)
            assert np.abs(got.view(np.int32) - want.view(np.int32)).max() <= 2, (base, rot)
            if base == 10000.0 and rot in (16, 20, 24, 32, 40, 64, 128):
                assert np.array_equal(got, want), rot


def test_matches_hf_gpt_neox():
    torch = pytest.importorskip("torch")
    m = pytest.importorskip("transformers.models.gpt_neox.modeling_gpt_neox")
    seq, H, D, rot = len(POS), 4, 64, 16     # Pythia: rotary_pct 0.25
    qkv = rng.standard_normal((seq, 3, H, D)).astype(np.float32)
    invf = 1.0 / (10000.0 ** (torch.arange(0, rot, 2, dtype=torch.int64).float() / rot))   # HF's own
    freqs = torch.tensor(POS)[:, None].float() * invf
    emb = torch.cat((freqs, freqs), -1)
    q = torch.tensor(qkv[:, 0]).transpose(0, 1)[None]
    k = torch.tensor(qkv[:, 1]).transpose(0, 1)[None]
    qe, ke = m.apply_rotary_pos_emb(q, k, emb.cos()[None], emb.sin()[None])
    b = Base(qkv)
    got_q = run_rope(b, qkv[:, 0], POS, rot)
    got_k = run_rope(b, qkv[:, 1], POS, rot)
    np.testing.assert_allclose(got_q, qe[0].transpose(0, 1).numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(got_k, ke[0].transpose(0, 1).numpy(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["neox", "normal"])
@pytest.mark.parametrize("D,rot", [(64, 16), (32, 32), (80, 20), (8, 2)])
def test_modes_and_dims(paths, mode, D, rot):
    x = rng.standard_normal((len(POS), 3, D)).astype(np.float32)
    np.testing.assert_allclose(run_rope(Base(x), x, POS, rot, 10000.0, mode), ref_rope(x, POS, rot, 10000.0, mode),
                               atol=2e-6, rtol=0)


def test_strided_f16_and_base(paths):
    qkv = rng.standard_normal((5, 3, 2, 32)).astype(np.float16)
    pos = np.array([3, 9, 10, 11, 1000], np.int32)
    b = Base(qkv)
    v = qkv[:, 2]                        # the v slice of a fused projection
    np.testing.assert_allclose(run_rope(b, v, pos, 32, base=500.0), ref_rope(v, pos, 32, base=500.0), atol=2e-6)
    v = qkv[:, 1, :, ::-1][:, :, ::-1]   # a positive-stride view built through reversals
    np.testing.assert_allclose(run_rope(b, v, pos, 16), ref_rope(v, pos, 16), atol=2e-6)


@pytest.mark.parametrize("cache_dtype", [np.float16, np.float32])
def test_rope_kv_write(paths, cache_dtype):
    seq, H, D, rot, max_ctx = 4, 3, 32, 16, 64
    qkv = rng.standard_normal((seq, 3, H, D)).astype(np.float32)
    pos = np.array([5, 6, 63, 64], np.int32)        # 64 is out of range: no cache write
    sentinel = np.full((H, max_ctx, D), 7, cache_dtype)
    kc, vc = runtime.upload(sentinel), runtime.upload(sentinel)
    qo = runtime.Buffer(4 * seq * H * D)
    b = Base(qkv)
    rope_kv_write(qo, kc, vc, b.whole(), runtime.upload(pos), seq, H, D, rot, max_ctx,
                  cache_dtype=dtypes.from_numpy(cache_dtype))
    q = read_f32(qo, seq * H * D, (H, seq, D))
    K = np.frombuffer(runtime.read(kc), cache_dtype).reshape(H, max_ctx, D)
    V = np.frombuffer(runtime.read(vc), cache_dtype).reshape(H, max_ctx, D)
    np.testing.assert_allclose(q, ref_rope(qkv[:, 0], pos, rot).transpose(1, 0, 2), atol=2e-6)
    kref = ref_rope(qkv[:, 1], pos, rot).transpose(1, 0, 2)
    ok = pos < max_ctx
    tol = 1e-3 if cache_dtype == np.float16 else 2e-6
    np.testing.assert_allclose(K[:, pos[ok]], kref[:, ok], atol=tol, rtol=tol)
    np.testing.assert_array_equal(V[:, pos[ok]], qkv[ok, 2].transpose(1, 0, 2).astype(cache_dtype))
    untouched = np.ones(max_ctx, bool)
    untouched[pos[ok]] = False
    assert np.all(K[:, untouched] == 7) and np.all(V[:, untouched] == 7)


def test_rope_kv_write_strided_qkv(paths):
    """qkv as a view: [seq, 3, H, D] taken out of a wider buffer with a padded row."""
    seq, H, D, rot, max_ctx = 3, 2, 16, 8, 8
    wide = rng.standard_normal((seq, 3 * H * D + 8)).astype(np.float32)
    qkv = wide[:, 4:4 + 3 * H * D].reshape(seq, 3, H, D)
    pos = np.array([2, 0, 7], np.int32)
    kc, vc = runtime.Buffer(2 * H * max_ctx * D), runtime.Buffer(2 * H * max_ctx * D)
    qo = runtime.Buffer(4 * seq * H * D)
    rope_kv_write(qo, kc, vc, Base(wide).view(qkv), runtime.upload(pos), seq, H, D, rot, max_ctx)
    K = np.frombuffer(runtime.read(kc), np.float16).reshape(H, max_ctx, D)
    np.testing.assert_allclose(K[:, pos], ref_rope(qkv[:, 1], pos, rot).transpose(1, 0, 2), atol=1e-3, rtol=1e-3)
    np.testing.assert_allclose(read_f32(qo, seq * H * D, (H, seq, D)), ref_rope(qkv[:, 0], pos, rot).transpose(1, 0, 2),
                               atol=2e-6)


def test_errors():
    x = Base(np.zeros((2, 1, 8), np.float32))
    p = runtime.upload(np.zeros(2, np.int32))
    with pytest.raises(ValueError, match="rot_dims"):
        rope(runtime.Buffer(64), x.whole(), p, 2, 1, 8, 10)
    with pytest.raises(ValueError, match="mode"):
        rope(runtime.Buffer(64), x.whole(), p, 2, 1, 8, 8, mode="gptj")
    with pytest.raises(ValueError, match="expected"):
        rope(runtime.Buffer(64), x.whole(), p, 2, 2, 4, 4)


def test_normal_mode_is_neox_on_permuted_rows(paths):
    """What a `llama` GGUF relies on: llama.cpp's converter permutes each head's rows from HF's
    rotate-half layout to adjacent pairs (LlamaModel.permute), so "normal" rope on the permuted
    vector equals "neox" rope on the original one, permuted the same way."""
    seq, H, D = len(POS), 2, 64
    x = rng.standard_normal((seq, H, D)).astype(np.float32)
    perm = np.arange(D).reshape(2, D // 2).T.reshape(-1)       # [0, 32, 1, 33, ...]
    xp = np.ascontiguousarray(x[..., perm])
    got = run_rope(Base(xp), xp, POS, D, 500000.0, "normal")
    np.testing.assert_allclose(got, ref_rope(x, POS, D, 500000.0, "neox")[..., perm], atol=3e-6, rtol=0)


@pytest.mark.parametrize("mode", ["neox", "normal"])
def test_freq_factors(paths, mode):
    """Llama 3.1's rope_freqs: theta_i / factor_i (factors 1 .. 8, as its low-frequency pairs)."""
    seq, H, D = len(POS), 2, 32
    x = rng.standard_normal((seq, H, D)).astype(np.float32)
    ff = np.linspace(1.0, 8.0, D // 2).astype(np.float32)
    got = run_rope(Base(x), x, POS, D, 500000.0, mode, ff)
    want = ref_rope(x, POS, D, 500000.0, mode, ff)
    np.testing.assert_allclose(got, want, atol=3e-6, rtol=0)
    assert np.abs(want - ref_rope(x, POS, D, 500000.0, mode)).max() > 0.1   # the factors matter
    with pytest.raises(ValueError, match="freq_factors"):
        run_rope(Base(x), x, POS, D, 500000.0, mode, ff[:-1])


@pytest.mark.parametrize("mode", ["neox", "normal"])
@pytest.mark.parametrize("H,Hkv", [(4, 2), (4, 1), (3, 3)])
def test_rope_kv_write_separate_gqa(paths, mode, H, Hkv):
    """Separate q [seq, H, D], k, v [seq, Hkv, D] (three projections, grouped-query attention):
    the caches are [Hkv, max_ctx, D]; q and k/v live in different buffers, f16 k included."""
    seq, D, rot, max_ctx = 5, 16, 16, 12
    q = rng.standard_normal((seq, H, D)).astype(np.float32)
    k = rng.standard_normal((seq, Hkv, D)).astype(np.float16)
    kvw = rng.standard_normal((seq, 2 * Hkv, D)).astype(np.float32)
    v = kvw[:, Hkv:]                                             # a strided view of a wider buffer
    pos = np.array([0, 3, 4, 11, 12], np.int32)
    ff = np.linspace(1.0, 3.0, rot // 2).astype(np.float32)
    sentinel = np.full((Hkv, max_ctx, D), 7, np.float32)
    kc, vc = runtime.upload(sentinel), runtime.upload(sentinel)
    qo = runtime.Buffer(4 * seq * H * D)
    rope_kv_write(qo, kc, vc, Base(q).whole(), runtime.upload(pos), seq, H, D, rot, max_ctx, 10000.0,
                  dtypes.float32, mode, k=Base(k).whole(), v=Base(kvw).view(v), n_kv_heads=Hkv, freq_factors=ff)
    np.testing.assert_allclose(read_f32(qo, seq * H * D, (H, seq, D)),
                               ref_rope(q, pos, rot, 10000.0, mode, ff).transpose(1, 0, 2), atol=3e-6)
    K = np.frombuffer(runtime.read(kc), np.float32).reshape(Hkv, max_ctx, D)
    V = np.frombuffer(runtime.read(vc), np.float32).reshape(Hkv, max_ctx, D)
    ok = pos < max_ctx
    np.testing.assert_allclose(K[:, pos[ok]], ref_rope(k, pos, rot, 10000.0, mode, ff).transpose(1, 0, 2)[:, ok],
                               atol=3e-6)
    np.testing.assert_array_equal(V[:, pos[ok]], v[ok].transpose(1, 0, 2))
    rest = np.ones(max_ctx, bool)
    rest[pos[ok]] = False
    assert np.all(K[:, rest] == 7) and np.all(V[:, rest] == 7)


def test_rope_kv_write_gqa_errors():
    q = Base(np.zeros((2, 4, 8), np.float32))
    k = Base(np.zeros((2, 3, 8), np.float32))
    p = runtime.upload(np.zeros(2, np.int32))
    c = runtime.Buffer(4 * 3 * 4 * 8)
    with pytest.raises(ValueError, match="must divide"):
        rope_kv_write(runtime.Buffer(256), c, runtime.Buffer(4 * 3 * 4 * 8), q.whole(), p, 2, 4, 8, 8, 4,
                      k=k.whole(), v=k.whole(), n_kv_heads=3)
    with pytest.raises(ValueError, match="both k and v"):
        rope_kv_write(runtime.Buffer(256), c, runtime.Buffer(4 * 3 * 4 * 8), q.whole(), p, 2, 4, 8, 8, 4, k=k.whole())
