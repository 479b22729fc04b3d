"""Decode GEMV (kernels/gemv.py) with and without the fused layer norm, against float64 NumPy:
f16/f32 and GGUF block weights, ragged K (items not a multiple of the workgroup), N not a
multiple of the rows per workgroup, an epilogue, both f16/subgroup paths."""
import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from nn_kernel_util import AffineGelu, Base, paths, read_f32  # noqa: F401
from tensorgpu import debug, dtypes, runtime
from tensorgpu.kernels import gemv as gmod
from tensorgpu.kernels.common import Operand
from tensorgpu.kernels.gemv import gemv
from tensorgpu.testing import random_blocks

rng = np.random.default_rng(11)


def qweights(dt, N, K):
    """Random GGUF blocks of [N, K] with scales varying ~50x between blocks, and their float64 values."""
    raw = random_blocks(dt, (N, K), 0.05, rng, spread=7.0).reshape(-1)
    W = np.asarray(gguf.quants.dequantize(raw, QT(dt.ggml_type)), np.float64).reshape(N, K)
    return raw, W


def ref_ln(x, w, b, eps):
    x = x.astype(np.float64)
    y = (x - x.mean()) / np.sqrt(x.var() + eps)
    return y * (1 if w is None else w) + (0 if b is None else b)


def run(wdt, N, K, ln=False, ep=None, xdt=np.float32, lnb_none=False, lnw_none=False, mean=5.0, std=3.0, tol=2e-5):
    x = (rng.standard_normal(K) * std + mean).astype(xdt)   # |mean| > std: the norm must not cancel
    w, wd, Wf = _weight(wdt, N, K)
    xb = Base(x)
    lnops = None
    h = x.astype(np.float64)
    if ln:
        lw = None if lnw_none else rng.standard_normal(K).astype(np.float32)
        lb = None if lnb_none else rng.standard_normal(K).astype(np.float32)
        lnops = (None if lw is None else Base(lw).whole(), None if lb is None else Base(lb).whole(), 1e-5)
        h = ref_ln(x, lw, lb, 1e-5)
    out = runtime.Buffer(4 * N)
    gemv(out, Operand(xb.buf, xb.dtype, (1, K), (K, 1), 0), w, wd, N, K, ep, lnops)
    want = Wf @ h
    if ep is not None:
        want = ep.ref(want)
    got = read_f32(out, N)
    err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)
    assert err < tol, f"{wdt} N={N} K={K} ln={ln}: rel err {err:.2e}"


@pytest.mark.parametrize("wdt", ["f16", "f32", "q8_0", "q4_0", "q4_k", "q6_k"])
@pytest.mark.parametrize("ln", [False, True], ids=["plain", "ln"])
def test_formats(paths, wdt, ln):
    run(wdt, 37, 512, ln)


@pytest.mark.parametrize("K", [256, 256 + 32, 1024 + 256, 4096], ids=str)
@pytest.mark.parametrize("wdt", ["f16", "q4_0"])
def test_ragged_and_long_rows(wdt, K):
    """Items not a multiple of the workgroup (the last iteration is partial), several iterations."""
    run(wdt, 9, K, ln=True)


@pytest.mark.parametrize("threads,rows,hoist,regs", [(32, 1, True, 48), (64, 3, False, 48), (128, 8, True, 48),
                                                      (96, 2, True, 48), (32, 2, True, 4)])
def test_tuning(threads, rows, hoist, regs):
    """Launch shapes, and the weight-load hoisting (off; in chunks of one iteration)."""
    with debug.tuning(gmod.TUNING, threads=threads, rows=rows, hoist=hoist, hoist_regs=regs):
        for wdt in ("f16", "q8_0", "q4_0", "q4_k", "q6_k", "f32"):
            K = 768 if wdt in ("q4_k", "q6_k") else 640
            run(wdt, 13, K, ln=True)
            run(wdt, 5, K, ln=False)


def test_epilogue_f16_x_and_no_ln_bias(paths):
    ep = AffineGelu(rng.standard_normal(24).astype(np.float32))
    run("f16", 24, 256, ln=True, ep=ep)
    run("q4_0", 24, 256, ln=False, ep=ep, xdt=np.float16)
    run("f32", 8, 64, ln=True, lnb_none=True)


def test_unsupported():
    x = Operand(runtime.Buffer(64), dtypes.float32, (1, 12), (12, 1), 0)
    assert not gmod.supported(x, dtypes.q4_0, 12)
    with pytest.raises(ValueError, match="decode GEMV"):
        gemv(runtime.Buffer(16), x, runtime.Buffer(64), dtypes.q4_0, 2, 12)


def test_layer_norm_far_from_zero_mean(paths):
    """mean / std = 100 (a residual stream with a large offset): the shifted sums keep the
    fused norm accurate."""
    run("f16", 16, 1024, ln=True, mean=100.0, std=1.0, tol=2e-4)
    run("q8_0", 16, 1024, ln=True, mean=-30.0, std=0.3, tol=2e-4)


def test_layer_norm_without_weight_and_cached_constants():
    """ln_w None (g = 1); and the per-weight constants are cached per (W, ln_w, ln_b): a second
    call with other norm parameters over the same W must not reuse the first ones."""
    run("f32", 12, 128, ln=True, lnw_none=True)
    K, N = 256, 8
    W = (rng.standard_normal((N, K)) * 0.1).astype(np.float16)
    wb = Base(W)
    x = rng.standard_normal(K).astype(np.float32)
    xb = Base(x)
    for _ in range(2):
        lw, lb = rng.standard_normal(K).astype(np.float32), rng.standard_normal(K).astype(np.float32)
        out = runtime.Buffer(4 * N)
        gemv(out, Operand(xb.buf, xb.dtype, (1, K), (K, 1), 0), wb.whole(), wb.dtype, N, K, None,
             (Base(lw).whole(), Base(lb).whole(), 1e-5))
        want = W.astype(np.float64) @ ref_ln(x, lw, lb, 1e-5)
        np.testing.assert_allclose(read_f32(out, N), want, rtol=1e-4, atol=1e-4)


@pytest.fixture
def tuning():
    with debug.tuning(gmod.TUNING) as knobs:
        yield knobs


@pytest.mark.parametrize("threads,rows", [(32, 3), (64, 1), (32, 8)])
def test_quant_launch_shapes(tuning, threads, rows):
    """Items not a multiple of the workgroup, several iterations per thread, N not a multiple
    of the rows, with and without the fused norm."""
    tuning.update(threads=threads, rows=rows)
    for wdt, K in (("q4_0", 64 * 5), ("q8_0", 64 * 7), ("q4_k", 256 * 3), ("q4_0", 32 * 9)):
        run(wdt, 13, K, ln=True)
        run(wdt, 5, K)


def _weight(wdt, N, K):
    if wdt in ("f16", "f32"):
        W = (rng.standard_normal((N, K)) * 0.05).astype(np.float16 if wdt == "f16" else np.float32)
        wb = Base(W)
        return wb.whole(), wb.dtype, W.astype(np.float64)
    wd = dtypes.as_dtype(wdt)
    raw, Wf = qweights(wd, N, K)
    return runtime.upload(raw), wd, Wf


PAIR_TYPES = ([(t, t) for t in ("f16", "f32", "q8_0", "q4_0", "q4_k", "q6_k")] +
              [("q4_k", "q6_k"), ("q6_k", "q4_k"), ("q4_0", "q8_0"), ("q5_k", "q4_0"), ("q8_0", "q4_1"), ("q4_k", "q5_k")])


@pytest.mark.parametrize("wdt1,wdt2", PAIR_TYPES, ids=lambda t: t)
@pytest.mark.parametrize("K1,K2", [(512, 2048), (256, 768), (1024 + 256, 512)], ids=str)
def test_pair_sums_two_projections(paths, wdt1, wdt2, K1, K2):
    """out = epilogue(x1 W1 + x2 W2): Pythia's output and down projections in one dispatch,
    including ragged item counts in either part; W1 and W2 of one type, or of two GGUF block
    types (a Q4_K_M file pairs q4_k with q6_k), each part decoded by its own format."""
    N = 37
    w1, wd1, W1 = _weight(wdt1, N, K1)
    w2, wd2, W2 = _weight(wdt2, N, K2)
    x1, x2 = (rng.standard_normal(k).astype(np.float32) for k in (K1, K2))
    b1, b2 = Base(x1), Base(x2)
    out = runtime.Buffer(4 * N)
    ep = AffineGelu(rng.standard_normal(N), 0.5)
    args = (out, Operand(b1.buf, b1.dtype, (1, K1), (K1, 1), 0), w1, wd1, N, K1, ep)
    pair = (Operand(b2.buf, b2.dtype, (1, K2), (K2, 1), 0), w2, K2, wd2)
    types = wd1.name + (f"+{wd2.name}" if wdt1 != wdt2 else "")
    assert gmod.plan(*args, pair=pair)[0].startswith(f"gemv2_{types}[")
    gemv(*args, pair=pair)
    want = ep.ref(W1 @ x1 + W2 @ x2)
    got = read_f32(out, N)
    err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)
    assert err < 2e-5, f"{wdt1}+{wdt2} K1={K1} K2={K2}: rel err {err:.2e}"


def test_pair_rejects_mixed_types_and_layer_norm():
    w1, wd, _ = _weight("q4_0", 8, 256)
    w2, _, _ = _weight("f16", 8, 256)
    x = Base(np.ones(256, np.float32))
    xo = Operand(x.buf, x.dtype, (1, 256), (256, 1), 0)
    with pytest.raises(ValueError, match="second pair"):
        gemv(runtime.Buffer(32), xo, w1, wd, 8, 256, pair=(xo, w2, 256))
    w3, _, _ = _weight("q4_0", 8, 256)
    with pytest.raises(ValueError, match="second pair"):
        gemv(runtime.Buffer(32), xo, w1, wd, 8, 256, ln=(None, None, 1e-5), pair=(xo, w3, 256))


@pytest.mark.parametrize("wdt", ["q8_0", "q4_0", "q4_k", "q6_k"])
def test_probe_modes(wdt):
    """The diagnostic probes (gemv.TUNING["probe"]) keep compiling: probe 2 decodes the weights
    against x = 1, so it returns the row sums of W; probe 1 folds raw words (finite values)."""
    dt = dtypes.as_dtype(wdt)
    N, K = 21, 512
    raw, Wf = qweights(dt, N, K)
    w = runtime.upload(raw)
    x = Base(rng.standard_normal(K).astype(np.float32))
    xop = Operand(x.buf, x.dtype, (1, K), (K, 1), 0)
    got = {}
    for probe in (1, 2):
        out = runtime.Buffer(4 * N)
        with debug.tuning(gmod.TUNING, probe=probe):
            gemv(out, xop, w, dt, N, K)
        got[probe] = read_f32(out, N)
    want = Wf.sum(axis=1)
    err = np.abs(got[2] - want).max() / np.abs(want).max()
    assert err < 2e-5, f"{wdt}: probe 2 (x = 1) rel err {err:.2e} against the row sums"
    assert np.isfinite(got[1]).all()


@pytest.mark.parametrize("wdt,xdt", [(t, np.float32) for t in ("f16", "f32", "q8_0", "q4_0", "q4_k", "q5_k", "q6_k")]
                         + [("q4_0", np.float16)], ids=lambda v: v if isinstance(v, str) else np.dtype(v).name)
@pytest.mark.parametrize("N1,N2", [(48, 64), (37, 20)], ids=str)
def test_stack_two_normed_projections(paths, wdt, xdt, N1, N2):
    """out = [W1 ln1(x) | W2 ln2(x)]: GPT-NeoX's ln1 + QKV and ln2 + up of one row in one kernel,
    each block with its own norm weights (or none) and weight, x far from zero mean (also an f16
    row); the epilogue sees the stacked row index. N1 = 37 is no multiple of the rows per
    workgroup."""
    K = 512
    w1, wd, W1 = _weight(wdt, N1, K)
    w2, _, W2 = _weight(wdt, N2, K)
    x = (rng.standard_normal(K) * 3 + 5).astype(xdt)
    g1, c1, c2 = (rng.standard_normal(K).astype(np.float32) for _ in range(3))
    xb = Base(x)
    xo = Operand(xb.buf, xb.dtype, (1, K), (K, 1), 0)
    ops = [Base(v).whole() for v in (g1, c1, c2)]
    out = runtime.Buffer(4 * (N1 + N2))
    ep = AffineGelu(rng.standard_normal(N1 + N2), 0.5)
    g2 = rng.standard_normal(K).astype(np.float32)
    o2 = Base(g2).whole()
    # norm weights: both blocks, only the first, only the second
    for (a, ga), (b2, gb) in (((ops[0], g1), (o2, g2)), ((ops[0], g1), (None, None)), ((None, None), (o2, g2))):
        gemv(out, xo, w1, wd, N1, K, ep, ln=(a, ops[1], 1e-5), stack=(w2, N2, b2, ops[2]))
        want = ep.ref(np.concatenate([W1 @ ref_ln(x, ga, c1, 1e-5), W2 @ ref_ln(x, gb, c2, 1e-5)]))
        got = read_f32(out, N1 + N2)
        err = np.abs(got - want).max() / np.abs(want).max()
        assert err < 2e-5, f"{wdt} N1={N1} N2={N2} norm weights {a is not None}/{b2 is not None}: rel err {err:.2e}"


def test_stack_rejects_bad_combinations():
    w1, wd, _ = _weight("q4_0", 8, 256)
    w2, _, _ = _weight("q8_0", 8, 256)
    x = Base(np.ones(256, np.float32))
    xo = Operand(x.buf, x.dtype, (1, 256), (256, 1), 0)
    ln = (None, None, 1e-5)
    with pytest.raises(ValueError, match=r"stacked weight \[8, 256\]"):     # W2 of another type (a Buffer: q4_0 assumed)
        gemv(runtime.Buffer(64), xo, w1, wd, 8, 256, ln=ln, stack=(_weight("f16", 8, 256)[0], 8, None, None))
    with pytest.raises(ValueError, match="stacked weight"):                 # no layer norm
        gemv(runtime.Buffer(64), xo, w1, wd, 8, 256, stack=(w2, 8, None, None))
    with pytest.raises(ValueError, match="second pair|stacked weight"):     # with a pair
        gemv(runtime.Buffer(64), xo, w1, wd, 8, 256, ln=ln, stack=(w2, 8, None, None), pair=(xo, w2, 256))


@pytest.mark.parametrize("wdt", ["f16", "f32", "q8_0", "q4_0", "q4_k", "q6_k"])
@pytest.mark.parametrize("K", [256, 1280], ids=str)
def test_rms_norm_folded(paths, wdt, K):
    """rms=True: h = x / sqrt(mean(x^2) + eps) * ln_w (LLaMA's RMSNorm) folded into the GEMV, with
    and without a weight, with an epilogue; ragged K; far-from-zero mean (RMS has no shift)."""
    N = 37
    for lw_none, ep in ((False, None), (True, AffineGelu(rng.standard_normal(N), 0.5))):
        x = (rng.standard_normal(K) * 3.0 + 5.0).astype(np.float32)
        w, wd, Wf = _weight(wdt, N, K)
        lw = None if lw_none else rng.standard_normal(K).astype(np.float32)
        eps = 1e-6
        x64 = x.astype(np.float64)
        h = x64 / np.sqrt((x64 * x64).mean() + eps) * (1 if lw is None else lw)
        xb = Base(x)
        out = runtime.Buffer(4 * N)
        with debug.kernel_log() as log:
            gemv(out, Operand(xb.buf, xb.dtype, (1, K), (K, 1), 0), w, wd, N, K, ep,
                 (None if lw is None else Base(lw).whole(), None, eps), rms=True)
        want = Wf @ h
        if ep is not None:
            want = ep.ref(want)
        got = read_f32(out, N)
        assert [e.name.split("[")[0] for e in log] == [f"gemv_rms_{wd.name}"]
        err = np.abs(got - want).max() / np.abs(want).max()
        assert err < 2e-5, f"{wdt} K={K}: rel err {err:.2e}"


def test_rms_rejects_bias_pair_stack():
    K, N = 256, 8
    W = Base((rng.standard_normal((N, K)) * 0.05).astype(np.float32))
    x = Base(rng.standard_normal(K).astype(np.float32))
    b = Base(np.ones(K, np.float32)).whole()
    xo = Operand(x.buf, x.dtype, (1, K), (K, 1), 0)
    out = runtime.Buffer(4 * N)
    for kw in (dict(ln=(None, b, 1e-6)), dict(ln=None), dict(ln=(None, None, 1e-6), stack=(W.whole(), N, None, None))):
        with pytest.raises(ValueError, match="rms"):
            gemv(out, xo, W.whole(), W.dtype, N, K, rms=True, **kw)


@pytest.mark.parametrize("wdt", ["f16", "f32", "q8_0", "q4_k"])
@pytest.mark.parametrize("Ns", [(64, 32, 32), (48, 16), (256, 64, 64)], ids=str)
def test_rms_stack_of_two_or_three(paths, wdt, Ns):
    """rms with stack: two or three projections of one RMS-normed x (LLaMA's q, k, v) in one
    GEMV, rows in order, an epilogue seeing the stacked row index."""
    K = 256
    x = (rng.standard_normal(K) * 2 + 1).astype(np.float32)
    lw = rng.standard_normal(K).astype(np.float32)
    ws, Wf = [], []
    for N in Ns:
        w, wd, Wq = _weight(wdt, N, K)
        ws.append(w)
        Wf.append(Wq)
    NT = sum(Ns)
    ep = AffineGelu(rng.standard_normal(NT), 0.5, gelu=False)
    xb = Base(x)
    out = runtime.Buffer(4 * NT)
    with debug.kernel_log() as log:
        gemv(out, Operand(xb.buf, xb.dtype, (1, K), (K, 1), 0), ws[0], wd, Ns[0], K, ep, (Base(lw).whole(), None, 1e-6),
             stack=tuple((w, N) for w, N in zip(ws[1:], Ns[1:])), rms=True)
    assert [e.name.split("[")[0] for e in log] == [f"gemv_rms{len(Ns)}_{wd.name}"]
    x64 = x.astype(np.float64)
    h = x64 / np.sqrt((x64 * x64).mean() + 1e-6) * lw
    want = ep.ref(np.concatenate([W @ h for W in Wf]))
    got = read_f32(out, NT)
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < 2e-5, err


@pytest.mark.parametrize("wdt", ["f16", "f32", "q8_0", "q4_k"])
@pytest.mark.parametrize("K,d,off", [(256, 256, 0), (768, 768, 8), (512, 520, 4)], ids=str)
def test_glu_row(paths, wdt, K, d, off):
    """glu=d: the row is silu(x[k]) * x[k + d] (SwiGLU's gate and up halves of one buffer)."""
    N = 19
    xs = (rng.standard_normal(off + d + K) * 2).astype(np.float32)
    w, wd, Wf = _weight(wdt, N, K)
    xb = Base(xs)
    out = runtime.Buffer(4 * N)
    with debug.kernel_log() as log:
        gemv(out, Operand(xb.buf, xb.dtype, (1, K), (K, 1), off), w, wd, N, K, glu=d)
    assert [e.name.split("[")[0] for e in log] == [f"gemv_glu_{wd.name}"]
    a, b = xs[off:off + K].astype(np.float64), xs[off + d:off + d + K].astype(np.float64)
    want = Wf @ (a / (1 + np.exp(-a)) * b)
    err = np.abs(read_f32(out, N) - want).max() / np.abs(want).max()
    assert err < 2e-5, err
    with pytest.raises(ValueError, match="glu"):
        gemv(out, Operand(xb.buf, xb.dtype, (1, K), (K, 1), off), w, wd, N, K, glu=d + 2)
    with pytest.raises(ValueError, match="glu"):
        gemv(out, Operand(xb.buf, xb.dtype, (1, K), (K, 1), off), w, wd, N, K, glu=d + K)
