"""Float GEMV and matmul throughput against this adapter's own limits, measured in the same run:
GEMV weight GB/s as % of the vec4 copy kernel's bandwidth, matmul GFLOP/s as % of the FMA-peak
probe (tensorgpu.kernels.probe). Small sizes by default (lavapipe); with TENSORGPU_BENCH_FULL=1
the H100 sizes (GEMV 1x4096 @ 4096x4096 and 1x2048 @ 2048x8192, matmul 2048^3) plus sweeps of
the GEMV / tile knobs in matmul.TUNING.

Layout is the linear-layer one, x @ w.T with w stored [N, K] row-major; activations f32, weights
f32 or f16 (GEMV); matmul "f16" means both operands f16, f32 accumulation. Timing: 300 ms warm-up,
then GPU timestamps around a pass of R copies of the dispatch (probe.gpu_time_per_dispatch).
"""
import functools
import os
import re

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from tensorgpu import debug, dtypes, runtime
from tensorgpu.kernels import matmul as mm
from tensorgpu.kernels import matmul_coop as coop
from tensorgpu.kernels import probe, quant
from tensorgpu.kernels.common import Operand
from tensorgpu.testing import random_blocks

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
def test_gemv_reach_sweep(benchmark, wdt, M, path):
    """Where GEMV stops beating the tiled kernel at 4096 x 4096 (TUNING["gemv_max_m"]; the
    pythia-shaped small-M sweep below compares every tile too)."""
    with debug.tuning(mm.TUNING, gemv_max_m=64 if path == "gemv" else 0):
        test_gemv(benchmark, M, 4096, 4096, wdt)


# ----------------------------------------------------------------------------- batched decode: small M
#
# One decode step of M = B sequences through pythia-1.4b's four linear layers (qkv 6144x2048,
# attention out 2048x2048, mlp up 8192x2048, mlp down 2048x8192): x [M, K] f32 @ W.T with W [N, K]
# f16 or q4_0, per output tile of the tiled kernel (its split-K still planned), beside the choice
# before the 16/32-row tiles ("old": 64/128 tiles only), the planner's ("auto"; "autok16": with
# the 16/32-row tiles at K step 16, bk_small's default being 32) and, at M <= 16, the GEMV
# kernels (M = 8 and 16 decide where GEMV should stop: matmul's and quant's gemv_max_m). Each
# dispatch reads its own copy of W (>= 128 MB of copies) so W comes from HBM, as in a step;
# dispatches share the output, so they serialise as a step's do. 160 cases (the first, 136-case
# version ran inside a 170 s timeout on the H200). Not part of gpu.sh's kernel run ("sweep"); on
# the GPU machine:
#   TENSORGPU_BENCH_FULL=1 python3 -m pytest benchmarks/bench_matmul.py -k small_m_sweep -s -q \
#       -p no:randomly -p no:cacheprovider --benchmark-only --benchmark-json=$OUT/small_m.json
# prints one line per case and, at the end, each variant's sum over the four layers x 24 layers
# (the matmul ms of one pythia-1.4b step). TENSORGPU_SMALLM="16x128r4x4,32x64r2x4,16x64k16" adds
# variants with another register block (rRMxRN: matmul.TUNING["tile_blocks"]) or K step
# (kBK: matmul.TUNING["bk_small"]).

SMALL_M = [8, 16, 32, 64] if FULL else [16, 32]
if os.environ.get("TENSORGPU_SMALLM_M"):          # e.g. "16,64,512": other row counts (512: a prefill chunk)
    SMALL_M = [int(m) for m in os.environ["TENSORGPU_SMALLM_M"].split(",")]
SMALL_M_NK = [(6144, 2048), (2048, 2048), (8192, 2048), (2048, 8192)] if FULL else [(200, 256)]
SMALL_M_WDT = ["float16", "q4_0"]
OLD_TILES = ((128, 128), (128, 64), (64, 128), (64, 64))
PYTHIA_LAYERS = 24


# "coopw": the 32/64-row tensor-core tiles on twice their subgroups (matmul_coop.TUNING["warp_tiles"])
SMALL_WARPS = "32x64:16x16+64x64:16x32+64x128:16x64"


def _variants(M: int) -> list:
    """What runs a case: "auto" (the planner), "autok16" (the planner with bk_small = 16),
    "old", "gemv" (M <= 16), "TMxTN[rRMxRN][kBK]" (one tile, optionally with another register
    block or K step). By default the 16-row tiles up to M = 16 and the 32-row ones above (the
    H200 sweep measured 16-row tiles at M = 32 and 64 1.05-2.7x slower than the best), and
    "old" from M = 16 (at M = 8 it is a 64-row tile: 8x the FMAs)."""
    if M > 64:   # a prefill chunk: the WGSL tiles' choice against the tensor cores'
        return ["auto"] + (["coop", "coopk64"] + [f"coop{tm}x{tn}" for tm, tn in coop.COOP_TILES if tm >= 64]
                           if runtime.get_device().has_coopmat else [])
    v = ["auto"] + (["autok16", "old"] if M > 8 else []) + (["gemv"] if M <= 16 else [])
    v += [f"{tm}x{tn}" for tm, tn in mm.TILE_BLOCKS if tm == (16 if M <= 16 else 32)]
    if runtime.get_device().has_coopmat:   # the tensor cores: the planner's tile, and each tile of M rows or fewer
        v += ["coop", "coopk64", "coopw"] + [f"coop{tm}x{tn}" for tm, tn in coop.COOP_TILES if tm <= max(M, 16)]
    extra = [e.strip() for e in os.environ.get("TENSORGPU_SMALLM", "").split(",") if e.strip()]
    return v + [e for e in extra if int(e.split("x")[0]) <= max(M, 16)]


def _variant_knobs(variant: str) -> tuple:
    """(force, matmul.TUNING overrides, matmul_coop.TUNING overrides) of a variant name: every
    variant but "coop*" keeps the tensor cores off, so "auto" is the WGSL tiles' choice."""
    if variant.startswith("coop"):
        # K: the k-major shared layout; kBK: another K step; w: the small tiles on twice the subgroups
        m = re.fullmatch(r"coop(K)?(?:(\d+)x(\d+))?(?:k(\d+))?(w)?", variant)
        return "tiled", {}, {"enabled": True, **({"layout": "k"} if m[1] else {}),
                             **({"tile": (int(m[2]), int(m[3]))} if m[2] else {}),
                             **({"bk": int(m[4]), "bk_small": int(m[4])} if m[4] else {}),
                             **({"warp_tiles": SMALL_WARPS} if m[5] else {})}
    force, knobs = _wgsl_variant_knobs(variant)
    return force, knobs, {"enabled": False}


def _wgsl_variant_knobs(variant: str) -> tuple:
    """(force, matmul.TUNING overrides) of a WGSL variant name."""
    if variant == "gemv":
        return "gemv", {}
    if variant == "auto":
        return "tiled", {}
    if variant == "autok16":
        return "tiled", {"bk_small": 16}
    if variant == "old":
        return "tiled", {"tile_candidates": OLD_TILES}
    m = re.fullmatch(r"(\d+)x(\d+)(?:r(\d+)x(\d+))?(?:k(\d+))?", variant)
    if m is None:
        raise ValueError(f"TENSORGPU_SMALLM: variant {variant!r} is not TMxTN[rRMxRN][kBK], e.g. 16x128r4x4k16")
    tile = (int(m[1]), int(m[2]))
    knobs = {"tile_candidates": (tile,)}
    if m[3]:
        knobs["tile_blocks"] = ((tile, (int(m[3]), int(m[4]))),)
    if m[5]:
        knobs["bk_small" if tile[0] < 64 else "bk"] = int(m[5])
    return "tiled", knobs


@functools.lru_cache(maxsize=None)
def _small_m_weight(wdt: str, N: int, K: int):
    """(host weight, GPU copies): f16 normals, or random q4_0 blocks of the same scale (quantizing
    16M floats in NumPy takes long; the bytes read are what matter)."""
    rng = np.random.default_rng(0)
    if wdt == "float16":
        host = (rng.standard_normal((N, K), np.float32) / np.sqrt(K)).astype(np.float16)
    else:
        host = random_blocks(dtypes.as_dtype(wdt), (N, K), 1 / np.sqrt(K), rng)
    copies = max(2, min(64, -(-(128 << 20) // host.nbytes))) if FULL else 2
    return host, [runtime.upload(host) for _ in range(copies)]


def _small_m_check(out, x, host, wdt, N, K):
    """Spot-check 64 output columns against NumPy."""
    M = x.shape[0]
    got = np.frombuffer(runtime.read(out, 0, M * N * 4), np.float32).reshape(M, N)
    cols = np.unique(np.linspace(0, N - 1, 64).astype(int))
    if wdt == "float16":
        w = host[cols].astype(np.float64)
    else:
        w = np.stack([np.asarray(gguf.quants.dequantize(host[c], QT(dtypes.as_dtype(wdt).ggml_type)), np.float64)
                      .reshape(-1) for c in cols])
    ref = x.astype(np.float64) @ w.T
    err = np.abs(got[:, cols] - ref).max() / max(np.abs(ref).max(), 1e-30)
    assert err < 1e-3, f"{wdt} M={M} {N}x{K}: wrong result (rel err {err:.2e})"


@pytest.fixture(scope="module")
def small_m_table():
    """Collects (wdt, M, variant) -> {(N, K): us}; prints each variant's step sum at the end."""
    table: dict = {}
    yield table
    if not table:
        return
    print("\n\nsmall-M matmuls, one pythia-1.4b step (sum of the 4 linears x 24 layers, ms); best per shape:")
    for (wdt, M) in sorted({k[:2] for k in table}, key=lambda k: (k[0], k[1])):
        rows = {v: r for (w, m, v), r in table.items() if (w, m) == (wdt, M)}
        full = {v: r for v, r in rows.items() if len(r) == len(SMALL_M_NK)}
        line = "  ".join(f"{v} {sum(u for u, _ in r.values()) * PYTHIA_LAYERS / 1e3:.2f}"
                         for v, r in sorted(full.items(), key=lambda vr: sum(u for u, _ in vr[1].values())))
        print(f"  {wdt:8s} M={M:3d}: {line}")
        for nk in SMALL_M_NK:
            best = min((r[nk][0], v, r[nk][1]) for v, r in rows.items() if nk in r)
            print(f"      {nk[0]}x{nk[1]}: {best[1]} {best[0]:.1f} us ({best[2]})")


@pytest.mark.parametrize("wdt", SMALL_M_WDT)
@pytest.mark.parametrize("N,K", SMALL_M_NK, ids=lambda x: str(x))
@pytest.mark.parametrize("M,variant", [(m, v) for m in SMALL_M for v in _variants(m)], ids=lambda x: str(x))
def test_small_m_sweep(benchmark, small_m_table, M, variant, N, K, wdt):
    force, knobs, coop_knobs = _variant_knobs(variant)
    x = np.random.default_rng(M).standard_normal((M, K)).astype(np.float32)
    xop = Operand(runtime.upload(x), dtypes.float32, (M, K), (K, 1), 0)
    out = runtime.Buffer(M * N * 4)
    host, copies = _small_m_weight(wdt, N, K)
    ds = []
    with debug.tuning(mm.TUNING, **knobs), debug.tuning(coop.TUNING, **coop_knobs):
        for w in copies:
            if wdt == "float16":
                la = mm.plan(out, xop, Operand(w, dtypes.float16, (K, N), (1, K), 0),
                             force="gemv_k" if force == "gemv" else "tiled")
                passes, name, info = la.passes, la.name, la.info
            else:
                la = quant.plan_matmul(out, xop, w, dtypes.as_dtype(wdt), N, K, force=force)
                passes, name, info = la.passes, la.passes[0][0], la.info
            ds += [runtime.dispatch(*p) for p in passes]
    _small_m_check(out, x, host, wdt, N, K)
    t = probe.gpu_time_per_dispatch(ds, warmup_s=0.1, target_s=0.03, rounds=3) / len(copies)

    def step():
        runtime.replay(ds)
        runtime.sync()
    benchmark.pedantic(step, rounds=2, iterations=1)
    wbytes = host.nbytes
    peak = probe.fma_flops(*FMA_SHAPE)
    gf = 2 * M * N * K / t / 1e9
    _info(benchmark, type("L", (), {"name": name})(), t, variant=variant, tile=info.get("tile"),
          split=info.get("split"), block=info.get("block"), weight_bytes=wbytes, copies=len(copies),
          **{"GFLOP/s": gf, "% of FMA peak": 100 * gf * 1e9 / peak, "weight GB/s": wbytes / t / 1e9})
    small_m_table.setdefault((wdt, M, variant), {})[(N, K)] = (t * 1e6, name)
    print(f"\nsmall-M {wdt:8s} M={M:3d} {N}x{K} {variant:10s}: {t * 1e6:8.1f} us {gf / 1e3:6.2f} TFLOP/s "
          f"({100 * gf * 1e9 / peak:4.1f}% of FMA peak) {wbytes / t / 1e9:7.0f} GB/s W  {name}")
