"""GGML block formats (tensorgpu.kernels.quant) against gguf.quants (NumPy).

dequantize: bit-identical float32 to gguf.quants.dequantize for every format, including f16
scales that are subnormal, zero, negative, inf or NaN (random bytes), signed zeros of the
products, a block offset into the source, and bf16 NaN payloads.

quant_matmul: reference = gguf.quants.dequantize(W) in float64 @ x (x's f16 values upcast when
x is f16). Tolerance: max|gpu - ref| <= RTOL * max|ref| with RTOL = 1e-4 (f32 accumulation; the
GEMV decode adds a few ulps per 16-element unit, measured ~1e-6).
Weights: q8_0/q4_0/q4_1/q5_0/q5_1/bf16 via gguf.quants.quantize of random normals (the package
cannot quantize k-quants); q4_k/q5_k/q6_k are random bytes with finite f16 scales.
"""
import math

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from tensorgpu import debug, dtypes, runtime
from tensorgpu.kernels import quant
from tensorgpu.kernels.common import Operand

RTOL = 1e-4
F32, F16 = dtypes.float32, dtypes.float16
ALL = list(quant.SUPPORTED)
IDS = [d.name for d in ALL]
_rng = np.random.default_rng(20240601)


# ----------------------------------------------------------------------------- fixtures / helpers


@pytest.fixture
def paths(all_paths):
    """Every code path (conftest.all_paths)."""
    return all_paths


@pytest.fixture
def tuning():
    with debug.tuning(quant.TUNING) as knobs:
        yield knobs


def random_blocks(dt, nblocks: int, raw: bool = False) -> np.ndarray:
    """uint8 GGUF bytes of `nblocks` blocks. raw=True: uniformly random bytes (any f16 scale)."""
    if raw:
        return _rng.integers(0, 256, size=nblocks * dt.block_bytes, dtype=np.uint8)
    data = _rng.standard_normal((nblocks, dt.block_size)).astype(np.float32)
    try:
        return np.ascontiguousarray(gguf.quants.quantize(data, QT(dt.ggml_type))).view(np.uint8).reshape(-1)
    except NotImplementedError:
        pass
    b = _rng.integers(0, 256, size=(nblocks, dt.block_bytes), dtype=np.uint8)

    def scale(off, lo, hi):
        v = _rng.uniform(lo, hi, nblocks) * _rng.choice([-1.0, 1.0], nblocks)
        b[:, off:off + 2] = v.astype(np.float16).view(np.uint8).reshape(nblocks, 2)
    if dt in (dtypes.q4_k, dtypes.q5_k):
        scale(0, 1e-3, 0.05)
        scale(2, 1e-3, 0.05)
    elif dt is dtypes.q6_k:
        scale(208, 1e-3, 0.05)
    return b.reshape(-1)


def ref_dequant(dt, raw: np.ndarray) -> np.ndarray:
    with np.errstate(all="ignore"):   # random-bytes scales include inf / NaN
        return np.asarray(gguf.quants.dequantize(raw, QT(dt.ggml_type)), np.float32).reshape(-1)


def read_f32(buf, n):
    return np.frombuffer(runtime.read(buf, 0, n * 4), np.float32).copy()


def x_operand(x: np.ndarray, dt=F32):
    """Upload x (host array, possibly a view of a larger base) as an Operand of its own base."""
    base = x.base if x.base is not None else x
    base = np.ascontiguousarray(base).astype(dt.np_dtype)
    buf = runtime.upload(base)
    isz = x.itemsize
    if x.base is None:
        return Operand(buf, dt, tuple(x.shape), tuple(s // isz for s in x.strides), 0), base
    off = (x.__array_interface__["data"][0] - x.base.__array_interface__["data"][0]) // isz
    return Operand(buf, dt, tuple(x.shape), tuple(s // isz for s in x.strides), off), base


def run_matmul(dt, x: np.ndarray, N: int, xdt=F32, epilogue=None, ep_ref=None, force=None, w_offset_blocks=0,
               raw=None):
    """Run quant_matmul on x (a NumPy view) and a random [N, K] weight; check against NumPy."""
    K = x.shape[-1]
    nb = N * K // dt.block_size
    if raw is None:
        raw = random_blocks(dt, nb + w_offset_blocks)
    W = ref_dequant(dt, raw)[w_offset_blocks * dt.block_size:][:N * K].reshape(N, K).astype(np.float64)
    xop, _ = x_operand(x, xdt)
    xv = x.astype(xdt.np_dtype).astype(np.float64)
    ref = xv @ W.T
    if ep_ref is not None:
        ref = ep_ref(ref)
    numel = math.prod(ref.shape)
    wbuf = runtime.upload(raw)
    out = runtime.Buffer(numel * 4)
    launch = quant.plan_matmul(out, xop, wbuf, dt, N, K, epilogue, w_offset_blocks, force=force)
    for p in launch.passes:
        runtime.dispatch(*p)
    got = read_f32(out, numel).reshape(ref.shape)
    scale = max(np.abs(ref).max(), 1e-30)
    err = np.abs(got - ref).max() / scale
    assert err <= RTOL, f"{dt.name} {launch.kind} x{tuple(x.shape)} N={N}: max rel err {err:.3e}"
    return launch


class BiasGelu:
    """out = quick_gelu(acc + bias[n]) — a hand-written Epilogue with one operand."""

    def __init__(self, bias: np.ndarray):
        self.N = bias.shape[0]
        self.operands = [Operand(runtime.upload(bias.astype(np.float32)), F32, (self.N,), (1,), 0)]

    def wgsl(self, first: int) -> str:
        return (f"@group(0) @binding({first}) var<storage, read> ep_bias: array<f32>;\n"
                f"fn epilogue(acc: f32, i: u32) -> f32 {{ let v = acc + ep_bias[i % {self.N}u]; "
                f"return v / (1.0 + exp(-1.702 * v)); }}\n")

    def ref(self, bias):
        def f(r):
            v = r + bias.astype(np.float64)
            with np.errstate(over="ignore"):
                return v / (1.0 + np.exp(-1.702 * v))
        return f


# ----------------------------------------------------------------------------- dequantize


@pytest.mark.parametrize("dt", ALL, ids=IDS)
@pytest.mark.parametrize("raw", [False, True], ids=["quantized", "random-bytes"])
def test_dequantize_bit_exact(dt, raw):
    nb = 5 if dt.block_size == 256 else 41
    if dt is dtypes.bfloat16:
        nb = 1003   # not a multiple of 4 elements: the guarded tail
    blocks = random_blocks(dt, nb, raw=raw)
    ref = ref_dequant(dt, blocks)
    numel = ref.size
    out = runtime.Buffer(numel * 4)
    quant.dequantize(out, runtime.upload(blocks), dt, numel)
    got = read_f32(out, numel)
    nan = np.isnan(ref)
    assert np.array_equal(np.isnan(got), nan), f"{dt.name}: NaN positions differ"
    gb, rb = got.view(np.uint32), ref.view(np.uint32)
    bad = np.nonzero((gb != rb) & ~nan)[0]
    assert bad.size == 0, (f"{dt.name}: {bad.size} of {numel} elements differ, first at {bad[0]}: "
                           f"{got[bad[0]]!r} vs {ref[bad[0]]!r}")
    if dt is dtypes.bfloat16 and raw:   # bits straight through: NaN payloads survive too
        assert np.array_equal(gb, rb)


@pytest.mark.parametrize("dt", [dtypes.q8_0, dtypes.q4_0, dtypes.q6_k, dtypes.bfloat16], ids=lambda d: d.name)
def test_dequantize_offset_and_special_scales(dt):
    """A slice starting at a block offset (odd: misaligned for q8_0/q4_0/q6_k), and f16 scales that
    are subnormal, +-0, -1, the largest f16 and the smallest subnormal."""
    nb = 18 if dt.block_size == 256 else 40
    blocks = random_blocks(dt, nb).reshape(nb, dt.block_bytes).copy()
    if dt is not dtypes.bfloat16:
        off = 208 if dt is dtypes.q6_k else 0
        specials = np.array([0x0001, 0x03ff, 0x8001, 0x0000, 0x8000, 0xbc00, 0x7bff, 0x0200], np.uint16)
        blocks[:len(specials), off:off + 2] = specials.view(np.uint8).reshape(-1, 2)
        blocks[len(specials):2 * len(specials), off:off + 2] = specials.view(np.uint8).reshape(-1, 2)
    else:
        specials = np.array([0x0001, 0x8000, 0x7f80, 0xff80, 0x0080, 0x807f], np.uint16)
        blocks[:len(specials)] = specials.view(np.uint8).reshape(-1, 2)
    blocks = blocks.reshape(-1)
    ref_all = ref_dequant(dt, blocks)
    off_blocks = 3
    count = (nb - off_blocks - 1) * dt.block_size
    ref = ref_all[off_blocks * dt.block_size:][:count]
    out = runtime.Buffer(count * 4)
    quant.dequantize(out, runtime.upload(blocks), dt, count, src_offset_blocks=off_blocks)
    got = read_f32(out, count)
    assert np.array_equal(got.view(np.uint32), ref.view(np.uint32))
    # from block 0 (the specials themselves)
    out0 = runtime.Buffer(ref_all.size * 4)
    quant.dequantize(out0, runtime.upload(blocks), dt, ref_all.size)
    assert np.array_equal(read_f32(out0, ref_all.size).view(np.uint32), ref_all.view(np.uint32))


def test_dequantize_errors():
    src = runtime.upload(np.zeros(34 * 4, np.uint8))
    out = runtime.Buffer(128 * 4)
    with pytest.raises(ValueError, match="block"):
        quant.dequantize(out, src, dtypes.q8_0, 100)
    with pytest.raises(ValueError, match="need"):
        quant.dequantize(out, src, dtypes.q8_0, 160)
    with pytest.raises(TypeError, match="float16"):
        quant.dequantize(out, src, dtypes.float16, 128)
    with pytest.raises(ValueError, match="output"):
        quant.dequantize(runtime.Buffer(16), src, dtypes.q8_0, 128)


def test_quant_nbytes():
    assert quant.quant_nbytes(dtypes.q8_0, 64) == 68
    assert quant.quant_nbytes(dtypes.q4_0, 4096 * 4096) == 4096 * 4096 // 32 * 18
    assert quant.quant_nbytes(dtypes.q4_k, 512) == 288
    assert quant.quant_nbytes(dtypes.q6_k, 256) == 210
    assert quant.quant_nbytes(dtypes.bfloat16, 7) == 14
    for dt in quant.SUPPORTED:
        assert quant.quant_nbytes(dt, dt.block_size * 3) == dtypes.as_dtype(dt).nbytes(dt.block_size * 3)
    with pytest.raises(ValueError, match="q4_k"):
        quant.quant_nbytes(dtypes.q4_k, 100)
    with pytest.raises(TypeError):
        quant.quant_nbytes(dtypes.float32, 4)


# ----------------------------------------------------------------------------- quant_matmul: formats


@pytest.mark.parametrize("dt", ALL, ids=IDS)
@pytest.mark.parametrize("M,N,kblocks", [(1, 7, 3), (3, 5, 2), (67, 9, 1)], ids=["M1", "M3", "M67"])
def test_matmul_formats(dt, M, N, kblocks):
    """Odd row counts, rows of several blocks; M=1/3 take GEMV, M=67 the tiled path (not a
    multiple of the tile)."""
    K = kblocks * max(dt.block_size, 32) * (2 if dt.block_size == 32 else 1)
    if dt is dtypes.bfloat16:
        K = 200 + kblocks   # any length, not a multiple of 16 or 4
    x = _rng.standard_normal((M, K)).astype(np.float32)
    launch = run_matmul(dt, x, N)
    assert launch.kind == ("gemv" if M <= quant.TUNING["gemv_max_m"] else "tiled")


@pytest.mark.parametrize("dt", ALL, ids=IDS)
def test_matmul_both_paths_same_shape(dt):
    K = 512 if dt.block_size == 256 else 96
    x = _rng.standard_normal((5, K)).astype(np.float32)
    raw = random_blocks(dt, 11 * K // dt.block_size)
    run_matmul(dt, x, 11, force="gemv", raw=raw)
    run_matmul(dt, x, 11, force="tiled", raw=raw)


# ----------------------------------------------------------------------------- paths and layouts

KEY = [dtypes.q8_0, dtypes.q4_0, dtypes.q4_k, dtypes.q6_k, dtypes.bfloat16]


@pytest.mark.parametrize("dt", KEY, ids=lambda d: d.name)
@pytest.mark.parametrize("xdt", [F32, F16], ids=["x32", "x16"])
def test_matmul_paths(paths, dt, xdt):
    """f16 x through array<f16>/vec4<f16> and through packed u32 words; subgroup and shared-memory
    reductions; GEMV (M=2) and tiled (M=9, forced) with a bias+gelu epilogue."""
    K = 512 if dt.block_size == 256 else 128
    N = 13
    bias = _rng.standard_normal(N).astype(np.float32)
    ep = BiasGelu(bias)
    for M, force in [(2, None), (9, "tiled")]:
        x = _rng.standard_normal((M, K)).astype(np.float32)
        run_matmul(dt, x, N, xdt=xdt, epilogue=ep, ep_ref=ep.ref(bias), force=force)


@pytest.mark.parametrize("dt", [dtypes.q8_0, dtypes.q4_1, dtypes.q5_k], ids=lambda d: d.name)
@pytest.mark.parametrize("force", ["gemv", "tiled"])
def test_matmul_batch_and_strides(dt, force):
    """x with batch dims, a transposed (non-unit K stride) view, a sliced view at an odd offset,
    and a broadcast (stride 0) batch dim."""
    K = 256 if dt.block_size == 256 else 64
    N = 6
    base = _rng.standard_normal((2, 3, K)).astype(np.float32)
    run_matmul(dt, base, N, force=force)                                   # [2, 3, K] contiguous
    t = _rng.standard_normal((K, 3)).astype(np.float32)
    run_matmul(dt, t.T, N, force=force)                                    # K stride 3
    big = _rng.standard_normal((4, K + 3)).astype(np.float32)
    run_matmul(dt, big[1:, 1:K + 1], N, force=force)                       # offset K+4, row stride K+3
    row = _rng.standard_normal((1, 2, K)).astype(np.float32)
    run_matmul(dt, np.broadcast_to(row, (3, 2, K)), N, force=force)        # batch stride 0


@pytest.mark.parametrize("dt", [dtypes.q4_0, dtypes.q8_0, dtypes.q4_k], ids=lambda d: d.name)
def test_gemv_loops_and_row_groups(tuning, dt):
    """Threads that take several units each (small workgroup), 1-row and 3-row workgroups with N
    not a multiple, and an x-row chunk that does not divide M."""
    K = 1024 if dt.block_size == 256 else 512
    tuning.update(gemv_threads=32, gemv_rows=3, gemv_m_chunk=2)
    x = _rng.standard_normal((5, K)).astype(np.float32)
    launch = run_matmul(dt, x, 10)
    assert launch.info["threads"] == 32 and launch.info["rows"] == 3
    tuning.update(gemv_threads=None, gemv_rows=1, gemv_m_chunk=4)
    run_matmul(dt, x[:1], 5)


@pytest.fixture
def mm_tuning():
    from tensorgpu.kernels import matmul as mm
    with debug.tuning(mm.TUNING) as knobs:
        yield knobs


@pytest.mark.parametrize("dt", [dtypes.q4_0, dtypes.q8_0, dtypes.q4_k, dtypes.bfloat16], ids=lambda d: d.name)
@pytest.mark.parametrize("tile,split", [((128, 128), 1), ((64, 128), 3), ((128, 64), 2)], ids=str)
def test_tiled_tiles_and_split_k(mm_tuning, dt, tile, split):
    """The tiled path is the float matmul's kernel: forced tile shapes (M, N not multiples of
    them) and split-K (partial sums + the reduce pass, which applies the epilogue)."""
    mm_tuning.update(tile_mn=tile, split_k=split)
    K, M, N = (512 if dt.block_size == 256 else 192), 131, 133
    bias = _rng.standard_normal(N).astype(np.float32)
    ep = BiasGelu(bias)
    x = _rng.standard_normal((M, K)).astype(np.float32)
    launch = run_matmul(dt, x, N, epilogue=ep, ep_ref=ep.ref(bias))
    assert launch.kind == "tiled" and launch.info["tile"] == tile and launch.info["split"] == split
    assert len(launch.passes) == (2 if split > 1 else 1) and dt.name in launch.passes[0][0]


@pytest.mark.parametrize("dt", [dtypes.q4_0, dtypes.q8_0], ids=lambda d: d.name)
def test_tiled_fast_decode_bit_identical(tuning, dt):
    """The tiled path's mantissa-trick decoders (q4_0, q8_0) give the very bits of dq4's."""
    K, M, N = 96, 19, 21
    x = _rng.standard_normal((M, K)).astype(np.float32)
    raw = random_blocks(dt, N * K // dt.block_size)
    outs = []
    for fast in (True, False):
        tuning.update(tiled_fast_decode=fast)
        run_matmul(dt, x, N, raw=raw, force="tiled")
        xop, _ = x_operand(x)
        out = runtime.Buffer(M * N * 4)
        for p in quant.plan_matmul(out, xop, runtime.upload(raw), dt, N, K, force="tiled").passes:
            runtime.dispatch(*p)
        outs.append(read_f32(out, M * N).view(np.uint32))
    np.testing.assert_array_equal(outs[0], outs[1])


def test_tiled_auto_split_for_prefill_shapes():
    """A prefill shape with few output tiles and a long K gets the float planner's split-K
    (plan only; nothing runs)."""
    K, N = 8192, 2048
    x = Operand(runtime.Buffer(512 * K * 4), F32, (512, K), (K, 1), 0)
    w = runtime.Buffer(quant.quant_nbytes(dtypes.q4_0, N * K))
    launch = quant.plan_matmul(runtime.Buffer(512 * N * 4), x, w, dtypes.q4_0, N, K)
    tiles = -(-512 // launch.info["tile"][0]) * -(-N // launch.info["tile"][1])
    assert launch.kind == "tiled" and launch.info["split"] > 1 and tiles * launch.info["split"] >= 128


@pytest.mark.parametrize("dt", [dtypes.q8_0, dtypes.q4_0, dtypes.q4_k, dtypes.q6_k], ids=lambda d: d.name)
@pytest.mark.parametrize("xdt", [F32, F16], ids=["x32", "x16"])
def test_dequant_path(paths, tuning, dt, xdt):
    """Prefill path: W decoded once into an f32 scratch, then the float tiled matmul (split-K
    forced here so its reduction, which applies the epilogue, runs too); x a sliced view."""
    K = 512 if dt.block_size == 256 else 128
    N, M = 20, 37
    bias = _rng.standard_normal(N).astype(np.float32)
    ep = BiasGelu(bias)
    base = _rng.standard_normal((M, K + 8)).astype(np.float32)
    launch = run_matmul(dt, base[:, 4:K + 4], N, xdt=xdt, epilogue=ep, ep_ref=ep.ref(bias), force="dequant")
    assert launch.kind == "dequant" and launch.passes[0][0].startswith("dequantize")
    from tensorgpu.kernels import matmul as mm
    with debug.tuning(mm.TUNING, split_k=3, tile_mn=(64, 64)):
        launch = run_matmul(dt, base[:, :K], N, xdt=xdt, epilogue=ep, ep_ref=ep.ref(bias), force="dequant",
                            w_offset_blocks=2)
        assert len(launch.passes) == 3
    tuning.update(dequant_min_rows=M)
    assert run_matmul(dt, base[:, :K], N).kind == "dequant"


@pytest.mark.parametrize("dt", [dtypes.q8_0, dtypes.q6_k, dtypes.q4_1], ids=lambda d: d.name)
@pytest.mark.parametrize("force", ["gemv", "tiled"])
def test_matmul_weight_offset(dt, force):
    """A weight that starts at a block offset of its buffer (rows of a larger tensor)."""
    K = 256 if dt.block_size == 256 else 64
    x = _rng.standard_normal((2, K)).astype(np.float32)
    run_matmul(dt, x, 4, force=force, w_offset_blocks=3)


def test_matmul_errors():
    x = Operand(runtime.upload(np.zeros((2, 48), np.float32)), F32, (2, 48), (48, 1), 0)
    w = runtime.upload(np.zeros(34 * 16, np.uint8))
    out = runtime.Buffer(2 * 8 * 4)
    with pytest.raises(ValueError, match=r"K=48 is not a multiple of the block size 32.*\(2, 48\)"):
        quant.quant_matmul(out, x, w, dtypes.q8_0, 8, 48)
    x64 = Operand(runtime.upload(np.zeros((2, 64), np.float32)), F32, (2, 64), (64, 1), 0)
    with pytest.raises(ValueError, match=r"\(2, 64\).*K=32"):
        quant.quant_matmul(out, x64, w, dtypes.q8_0, 8, 32)
    with pytest.raises(ValueError, match="needs 680 bytes"):
        quant.quant_matmul(runtime.Buffer(2 * 10 * 4), x64, w, dtypes.q8_0, 10, 64)
    with pytest.raises(ValueError, match="output buffer"):
        quant.quant_matmul(runtime.Buffer(16), x64, w, dtypes.q8_0, 8, 64)
    xi = Operand(x64.buffer, dtypes.int32, (2, 64), (64, 1), 0)
    with pytest.raises(TypeError, match="int32"):
        quant.quant_matmul(out, xi, w, dtypes.q8_0, 8, 64)
    with pytest.raises(TypeError, match="float16"):
        quant.quant_matmul(out, x64, w, dtypes.float16, 8, 64)
    with pytest.raises(ValueError, match="also an input"):
        quant.quant_matmul(x64.buffer, x64, w, dtypes.q8_0, 8, 64)


def test_matmul_f16_x_fallback_no_pipeline_error(paths):
    """f16 x at an offset that is not a multiple of 4 (scalar loads) compiles on every path."""
    dt = dtypes.q4_0
    base = _rng.standard_normal((3, 70)).astype(np.float32)
    run_matmul(dt, base[:, 3:67], 6, xdt=F16)
    run_matmul(dt, base[:, 3:67], 6, xdt=F16, force="tiled")


@pytest.mark.parametrize("dt", [dtypes.q4_0, dtypes.q4_k, dtypes.bfloat16], ids=lambda d: d.name)
def test_one_row_takes_decode_gemv(dt):
    """x @ W.T of one row runs kernels/gemv.py's kernel (the decode one) where it applies; bf16
    and a strided x keep quant.py's own GEMV, two rows too."""
    K = 512 if dt.block_size == 256 else 128
    x = _rng.standard_normal((1, K)).astype(np.float32)
    want = "gemv.py" if dt is not dtypes.bfloat16 else None
    assert run_matmul(dt, x, 9).info.get("kernel") == want
    t = _rng.standard_normal((K, 3)).astype(np.float32)
    assert run_matmul(dt, t.T[:1], 9).info.get("kernel") is None
    assert run_matmul(dt, x.repeat(2, 0), 9).info.get("kernel") is None


# ----------------------------------------------------------------------------- small-M tiles (batched decode)

SMALL_TILES = [(16, 64), (16, 128), (32, 64), (32, 128)]


@pytest.mark.parametrize("dt", ALL, ids=IDS)
@pytest.mark.parametrize("tile", SMALL_TILES, ids=lambda t: f"{t[0]}x{t[1]}")
def test_small_tiles_every_format(mm_tuning, dt, tile):
    """Every block type through each 16/32-row tile of the decoding binding: M and N not multiples
    of the tile (two row tiles), a bias + gelu epilogue in the split-K reduce pass (2 splits) and in
    the store (no split); bf16 with a K that is no multiple of 16."""
    K = 512 if dt.block_size == 256 else 160
    if dt is dtypes.bfloat16:
        K = 203
    M, N = tile[0] + 3, tile[1] + 9
    bias = _rng.standard_normal(N).astype(np.float32)
    ep = BiasGelu(bias)
    x = _rng.standard_normal((M, K)).astype(np.float32)
    raw = random_blocks(dt, N * K // dt.block_size)
    for split in (2, 1):
        mm_tuning.update(tile_mn=tile, split_k=split)
        launch = run_matmul(dt, x, N, epilogue=ep, ep_ref=ep.ref(bias), raw=raw, force="tiled")
        assert launch.kind == "tiled" and launch.info["tile"] == tile and launch.info["split"] == split
        assert len(launch.passes) == split and dt.name in launch.passes[0][0]


@pytest.mark.parametrize("dt", KEY, ids=lambda d: d.name)
@pytest.mark.parametrize("tile,block", [((16, 128), None), ((32, 64), None), ((16, 64), (1, 4))], ids=str)
def test_small_tiles_x16_paths(paths, mm_tuning, dt, tile, block):
    """f16 x (array<f16> / packed u32 words) through the small tiles, one row of x (M = 1), odd N,
    a bias + gelu epilogue; a 1-row register block (a's shared tile as f32) too."""
    mm_tuning.update(tile_mn=tile, tile_blocks=((tile, block),) if block else None)
    K = 512 if dt.block_size == 256 else 96
    N = 21
    bias = _rng.standard_normal(N).astype(np.float32)
    ep = BiasGelu(bias)
    for M in (1, 2 * tile[0] - 1):
        x = _rng.standard_normal((M, K)).astype(np.float32)
        launch = run_matmul(dt, x, N, xdt=F16, epilogue=ep, ep_ref=ep.ref(bias), force="tiled")
        assert launch.info["tile"] == tile


@pytest.mark.parametrize("dt", [dtypes.q4_0, dtypes.q8_0, dtypes.q4_k], ids=lambda d: d.name)
@pytest.mark.parametrize("M", [16, 32, 64])
@pytest.mark.parametrize("N,K", [(6144, 2048), (2048, 2048), (8192, 2048), (2048, 8192)], ids=str)
def test_small_m_plans_at_pythia_shapes(mm_tuning, dt, M, N, K):
    """Batched decode through the decoding binding (plan only): the float planner's choice, so
    16/32 rows take a tile of exactly that many rows (64 rows: the 64-row tiles) and no shape
    wastes rows."""
    x = Operand(runtime.Buffer(M * K * 4), F32, (M, K), (K, 1), 0)
    w = runtime.Buffer(quant.quant_nbytes(dt, N * K))
    launch = quant.plan_matmul(runtime.Buffer(M * N * 4), x, w, dt, N, K, force="tiled")
    tm, tn = launch.info["tile"]
    assert M % tm == 0 and (M == 64 or tm == M)
    assert 128 <= -(-N // tn) * (M // tm) * launch.info["split"] <= 512


# ----------------------------------------------------------------------------- stacked weights


@pytest.mark.parametrize("dt", ALL, ids=IDS)
def test_stacked_matmul_every_format(dt):
    """Several GGUF weights of one format side by side in one tiled matmul (LLaMA's q, k, v):
    x @ [W_0 | W_1 | W_2].T against the dequantized weights, the last part's columns not a
    multiple of the tile; each extra weight's decoders are renamed copies reading its own array."""
    K = 512 if dt.block_size == 256 else 192
    if dt is dtypes.bfloat16:
        K = 200
    M, Ns = 37, (128, 128, 41)
    x = _rng.standard_normal((M, K)).astype(np.float32)
    raws = [random_blocks(dt, n * K // dt.block_size) for n in Ns]
    W = np.concatenate([ref_dequant(dt, r)[:n * K].reshape(n, K) for r, n in zip(raws, Ns)]).astype(np.float64)
    xop, _ = x_operand(x)
    out = runtime.Buffer(M * sum(Ns) * 4)
    launch = quant.plan_stacked_matmul(out, xop, [runtime.upload(r) for r in raws], dt, Ns, K)
    for p in launch.passes:
        runtime.dispatch(*p)
    ref = x.astype(np.float64) @ W.T
    got = read_f32(out, M * sum(Ns)).reshape(M, sum(Ns))
    assert np.abs(got - ref).max() <= RTOL * np.abs(ref).max(), launch.passes[0][0]
    assert launch.kind == "tiled" and launch.passes[0][0].endswith("_x3")
    assert "W1" in launch.passes[0][1] and "W2" in launch.passes[0][1]


def test_stacked_matmul_split_k_epilogue_and_errors(mm_tuning):
    dt, K, M, Ns = dtypes.q8_0, 256, 50, (128, 64)
    mm_tuning.update(split_k=2)
    x = _rng.standard_normal((M, K)).astype(np.float32)
    raws = [random_blocks(dt, n * K // 32) for n in Ns]
    W = np.concatenate([ref_dequant(dt, r).reshape(n, K) for r, n in zip(raws, Ns)]).astype(np.float64)
    bias = _rng.standard_normal(sum(Ns)).astype(np.float32)
    ep = BiasGelu(bias)
    xop, _ = x_operand(x)
    out = runtime.Buffer(M * sum(Ns) * 4)
    wbufs = [runtime.upload(r) for r in raws]
    launch = quant.plan_stacked_matmul(out, xop, wbufs, dt, Ns, K, ep)
    assert len(launch.passes) == 2
    for p in launch.passes:
        runtime.dispatch(*p)
    ref = ep.ref(bias)(x.astype(np.float64) @ W.T)
    assert np.abs(read_f32(out, M * sum(Ns)).reshape(M, -1) - ref).max() <= RTOL * np.abs(ref).max()
    with pytest.raises(ValueError, match="weight 1"):
        quant.plan_stacked_matmul(out, xop, [wbufs[0], runtime.upload(raws[1][:64])], dt, Ns, K)
    with pytest.raises(ValueError, match="K=250"):
        quant.plan_stacked_matmul(out, xop, wbufs, dt, Ns, 250)
    with pytest.raises(ValueError, match="one each"):
        quant.plan_stacked_matmul(out, xop, wbufs[:1], dt, Ns[:1], K)


# ----------------------------------------------------------------------------- paired weights (K parts)


@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("dt", ALL, ids=IDS)
def test_paired_matmul_every_format(mm_tuning, dt, split):
    """x_0 @ W_0.T + x_1 @ W_1.T for two GGUF weights of one format in one tiled matmul over the
    concatenated K (GPT-NeoX's attention output + MLP down of a prompt), against the dequantized
    weights, with and without split-K across the parts; the second weight's decoders are renamed
    copies reading its own array."""
    mm_tuning.update(split_k=split, tile_mn=(64, 64))
    Ks = (256, 512) if dt.block_size == 256 else (128, 192)
    M, N = 37, 72
    xs = [_rng.standard_normal((M, k)).astype(np.float32) for k in Ks]
    raws = [random_blocks(dt, N * k // dt.block_size) for k in Ks]
    Ws = [ref_dequant(dt, r)[:N * k].reshape(N, k).astype(np.float64) for r, k in zip(raws, Ks)]
    xops = [x_operand(x)[0] for x in xs]
    out = runtime.Buffer(M * N * 4)
    launch = quant.plan_paired_matmul(out, xops, [runtime.upload(r) for r in raws], dt, N, Ks)
    for p in launch.passes:
        runtime.dispatch(*p)
    ref = sum(x.astype(np.float64) @ W.T for x, W in zip(xs, Ws))
    got = read_f32(out, M * N).reshape(M, N)
    assert np.abs(got - ref).max() <= RTOL * np.abs(ref).max(), launch.passes[0][0]
    assert launch.passes[0][0].endswith("_kc2") and "W1" in launch.passes[0][1]
    assert len(launch.passes) == (2 if split > 1 else 1)


def test_paired_matmul_errors():
    dt, N = dtypes.q8_0, 64
    xs = [x_operand(_rng.standard_normal((8, k)).astype(np.float32))[0] for k in (64, 96)]
    ws = [runtime.upload(random_blocks(dt, N * k // 32)) for k in (64, 96)]
    out = runtime.Buffer(8 * N * 4)
    with pytest.raises(ValueError, match="weight 1"):
        quant.plan_paired_matmul(out, xs, [ws[0], runtime.upload(random_blocks(dt, 8))], dt, N, (64, 96))
    with pytest.raises(ValueError, match="x 1"):
        quant.plan_paired_matmul(out, xs, ws, dt, N, (64, 128))
    with pytest.raises(ValueError, match="one each"):
        quant.plan_paired_matmul(out, xs[:1], ws[:1], dt, N, (64,))
    with pytest.raises(ValueError, match="multiple of 64"):
        quant.plan_paired_matmul(out, xs[::-1], ws[::-1], dt, N, (96, 64))
