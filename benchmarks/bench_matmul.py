"""Float GEMV and matmul throughput against this adapter's own limits, measured in the same run:
GEMV weight GB/s as % of the vec4 copy kernel's bandwidth, matmul GFLOP/s as % of the FMA-peak
probe (tensorgpu.kernels.probe). Small sizes by default (lavapipe); with TENSORGPU_BENCH_FULL=1
the H100 sizes (GEMV 1x4096 @ 4096x4096 and 1x2048 @ 2048x8192, matmul 2048^3) plus sweeps of
the GEMV / tile knobs in matmul.TUNING.

Layout is the linear-layer one, x @ w.T with w stored [N, K] row-major; activations f32, weights
f32 or f16 (GEMV); matmul "f16" means both operands f16, f32 accumulation. Timing: 300 ms warm-up,
then GPU timestamps around a pass of R copies of the dispatch (probe.gpu_time_per_dispatch).
"""
import os

import numpy as np
import pytest

from tensorgpu import debug, dtypes, runtime
from tensorgpu.kernels import matmul as mm
from tensorgpu.kernels import probe
from tensorgpu.kernels.common import Operand

FULL = os.environ.get("TENSORGPU_BENCH_FULL", "") not in ("", "0")

GEMV_SHAPES = [(1, 4096, 4096), (1, 2048, 8192)] if FULL else [(1, 256, 512)]   # (M, K, N)
MATMUL_SHAPES = [(2048, 2048, 2048)] if FULL else [(128, 128, 128)]
COPY_BYTES = (256 << 20) if FULL else (4 << 20)
FMA_SHAPE = (2048, 2048) if FULL else (8, 64)


def _operands(M, K, N, a_dt, b_dt, b_layout="T"):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((M, K)).astype(a_dt.np_dtype)
    abuf = runtime.upload(a)
    A = Operand(abuf, a_dt, (M, K), (K, 1), 0)
    if b_layout == "T":   # w [N, K] row-major, used as w.T
        w = (rng.standard_normal((N, K)) / np.sqrt(K)).astype(b_dt.np_dtype)
        B = Operand(runtime.upload(w), b_dt, (K, N), (1, K), 0)
        ref = a.astype(np.float64) @ w.T.astype(np.float64)
    else:                 # b [K, N] row-major
        w = (rng.standard_normal((K, N)) / np.sqrt(K)).astype(b_dt.np_dtype)
        B = Operand(runtime.upload(w), b_dt, (K, N), (N, 1), 0)
        ref = a.astype(np.float64) @ w.astype(np.float64)
    return A, B, ref


def _measure(benchmark, out, A, B, ref, M, N):
    launch = mm.plan(out, A, B)
    d = runtime.dispatch(launch.name, launch.wgsl, launch.bindings, launch.grid)
    got = np.frombuffer(runtime.read(out, 0, M * N * 4), np.float32).reshape(M, N)
    assert np.allclose(got, ref, rtol=1e-2, atol=1e-2), f"{launch.name}: wrong result"
    t = probe.gpu_time_per_dispatch([d])

    def step():
        for _ in range(4):
            runtime.replay([d])
        runtime.sync()
    benchmark.pedantic(step, rounds=3, iterations=1)
    stats = getattr(benchmark, "stats", None)
    if stats:  # None under --benchmark-disable
        benchmark.extra_info["wall_us_per_dispatch"] = stats.stats.min / 4 * 1e6
    return launch, t


def _info(benchmark, launch, t, **kw):
    benchmark.extra_info.update({"kernel": launch.name, "us_per_dispatch": t * 1e6,
                                 "timestamps": probe.has_timestamps(),
                                 "device": runtime.get_device().name, "clocks": probe.gpu_clocks(),
                                 "f16": runtime.get_device().has_f16,
                                 "subgroups": runtime.get_device().has_subgroups, **kw})


@pytest.mark.parametrize("wdt", ["float32", "float16"])
@pytest.mark.parametrize("M,K,N", GEMV_SHAPES, ids=lambda x: str(x))
def test_gemv(benchmark, M, K, N, wdt):
    w_dt = dtypes.as_dtype(wdt)
    A, B, ref = _operands(M, K, N, dtypes.float32, w_dt)
    out = runtime.Buffer(M * N * 4)
    launch, t = _measure(benchmark, out, A, B, ref, M, N)
    wbytes = K * N * w_dt.itemsize
    if FULL:  # cycle through copies of the weight totalling > 3x the H100's 50 MB L2, so each
        # timed GEMV streams its weight from HBM as in decode (one read per token)
        raw = runtime.read(B.buffer, 0, wbytes)
        copies = [B] + [Operand(runtime.upload(np.frombuffer(raw, np.uint8)), w_dt, B.shape, B.strides, 0)
                        for _ in range(max(0, -(-(160 << 20) // wbytes) - 1))]
        ds = []
        for Bi in copies:
            li = mm.plan(out, A, Bi)
            ds.append(runtime.dispatch(li.name, li.wgsl, li.bindings, li.grid))
        t = probe.gpu_time_per_dispatch(ds) / len(ds)
    copy_bw = probe.copy_bandwidth(COPY_BYTES)
    gbs = wbytes / t / 1e9
    _info(benchmark, launch, t, weight_bytes=wbytes, **{"weight GB/s": gbs, "copy GB/s": copy_bw / 1e9,
                                                         "% of copy BW": 100 * gbs * 1e9 / copy_bw})
    print(f"\n{launch.name} {M}x{K}@{K}x{N} {wdt}: {gbs:.1f} GB/s weights, "
          f"{100 * gbs * 1e9 / copy_bw:.0f}% of copy {copy_bw / 1e9:.1f} GB/s ({t * 1e6:.1f} us)")


@pytest.mark.parametrize("layout", ["T", "N"], ids=["x@w.T", "x@w"])
@pytest.mark.parametrize("dt", ["float32", "float16"])
@pytest.mark.parametrize("M,K,N", MATMUL_SHAPES, ids=lambda x: str(x))
def test_matmul(benchmark, M, K, N, dt, layout):
    d = dtypes.as_dtype(dt)
    A, B, ref = _operands(M, K, N, d, d, layout)
    out = runtime.Buffer(M * N * 4)
    launch, t = _measure(benchmark, out, A, B, ref, M, N)
    peak = probe.fma_flops(*FMA_SHAPE)
    gf = 2 * M * N * K / t / 1e9
    _info(benchmark, launch, t, **{"GFLOP/s": gf, "FMA peak GFLOP/s": peak / 1e9, "% of FMA peak": 100 * gf * 1e9 / peak})
    print(f"\n{launch.name} {M}x{K}@{K}x{N} {dt}: {gf:.1f} GFLOP/s, {100 * gf * 1e9 / peak:.0f}% of FMA peak "
          f"{peak / 1e9:.1f} GFLOP/s ({t * 1e6:.1f} us)")


# ----------------------------------------------------------------------------- knob sweeps (full runs)

SWEEP = pytest.mark.skipif(not FULL, reason="knob sweeps only with TENSORGPU_BENCH_FULL=1")


@SWEEP
@pytest.mark.parametrize("threads", [64, 128, 256])
@pytest.mark.parametrize("cols", [1, 2, 4])
@pytest.mark.parametrize("wdt", ["float32", "float16"])
def test_gemv_sweep(benchmark, wdt, cols, threads):
    with debug.tuning(mm.TUNING, gemv_cols=cols, gemv_threads=threads):
        test_gemv(benchmark, 1, 4096, 4096, wdt)


@SWEEP
@pytest.mark.parametrize("tile,bk", [(64, 16), (128, 8), (128, 16)])
@pytest.mark.parametrize("dt", ["float32", "float16"])
def test_matmul_sweep(benchmark, dt, tile, bk):
    with debug.tuning(mm.TUNING, tile=tile, bk=bk):
        test_matmul(benchmark, 2048, 2048, 2048, dt, "T")


@SWEEP
@pytest.mark.parametrize("path", ["gemv", "tiled"])
@pytest.mark.parametrize("M", [2, 4, 8, 16])
@pytest.mark.parametrize("wdt", ["float32", "float16"])
def test_small_m_sweep(benchmark, wdt, M, path):
    """Where GEMV stops beating the tiled kernel (sets TUNING["gemv_max_m"])."""
    with debug.tuning(mm.TUNING, gemv_max_m=64 if path == "gemv" else 0):
        test_gemv(benchmark, M, 4096, 4096, wdt)
