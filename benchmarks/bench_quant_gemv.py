"""Quantized GEMV (decode) and tiled matmul (prefill) straight from GGUF blocks.

Figure of merit for GEMV: quantized-weight bytes read per second, as % of the vec4 copy kernel's
bandwidth measured in the same run (target on the H100: >= 50%, copy ~3000 GB/s). For context,
also as % of a copy of the weight's own size (cold in L2 like the GEMV, start-up and drain
included), which is what any one dispatch of that size can reach. Prefill:
GFLOP/s. Small sizes by default (lavapipe); TENSORGPU_BENCH_FULL=1 gives the H100 sizes:
GEMV 1x4096 @ 4096x4096 and 1x2048 @ 2048x8192 (x [M, K] f32, W [N, K]) for q8_0, q4_0, q4_k,
and prefill of the four pythia-1.4b linear layers at 512 rows for q8_0 / q4_0 beside f16 weights.

GEMV (one x row: kernels/gemv.py's kernel, as decode runs it) is timed two ways, both in
extra_info and the printout: "dependent" = back-to-back calls that write one output (so they
serialise, like a decode step) cycling over enough weight copies (> 120 MB) that the 50 MB L2
cannot serve repeats; "independent" = the same calls with distinct outputs (the GPU may overlap
them: throughput without the per-dispatch drain).

Sweeps: TENSORGPU_QGEMV="threads,rows;threads,rows;..." runs each GEMV case once per
(workgroup size, weight rows per workgroup) pair of gemv.TUNING, e.g. "64,4;256,4;32,8", and
TENSORGPU_QPREFILL="default;bk=32;tile_mn=128x64,split_k=4;tiled_fast_decode=0" each prefill
case once per set of quant.TUNING / matmul.TUNING overrides (matmul's planner serves both).
Timing: 300 ms warm-up, then GPU timestamps around a pass of R copies of the dispatch
(probe.gpu_time_per_dispatch).
"""
import functools
import os

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from tensorgpu import debug, dtypes, runtime
from tensorgpu.kernels import matmul as mm
from tensorgpu.kernels import gemv as gm
from tensorgpu.kernels import probe, quant
from tensorgpu.kernels.common import Operand
from tensorgpu.testing import random_blocks

FULL = os.environ.get("TENSORGPU_BENCH_FULL", "") not in ("", "0")

GEMV_SHAPES = [(1, 4096, 4096), (1, 2048, 8192)] if FULL else [(1, 512, 256)]      # (M, K, N)
# TENSORGPU_QGEMV_SHAPES="pythia" / "K,N;K,N": issue 15's table, decode GEMVs of pythia-1.4b (qkv,
# down) and redpajama-3b (up, down); TENSORGPU_QGEMV_TYPES="float16,q8_0,..." the weight formats.
_NAMED_SHAPES = {"pythia": "2048,6144;8192,2048;2560,10240;10240,2560"}
if os.environ.get("TENSORGPU_QGEMV_SHAPES"):
    _spec = _NAMED_SHAPES.get(os.environ["TENSORGPU_QGEMV_SHAPES"], os.environ["TENSORGPU_QGEMV_SHAPES"])
    GEMV_SHAPES = [(1, *(int(v) for v in kn.split(","))) for kn in _spec.split(";") if kn.strip()]
# the four pythia-1.4b linear layers (qkv, attention out, mlp up, mlp down) at a 512-token prefill
PREFILL_SHAPES = ([(512, 2048, 6144), (512, 2048, 2048), (512, 2048, 8192), (512, 8192, 2048)] if FULL
                  else [(64, 256, 128), (40, 512, 96)])
COPY_BYTES = (256 << 20) if FULL else (4 << 20)
GEMV_TYPES = os.environ.get("TENSORGPU_QGEMV_TYPES", "q8_0,q4_0,q4_k").split(",")   # float16: gemv.py on f16 rows
PREFILL_TYPES = ["q8_0", "q4_0", "float16"]   # float16: the float tiled matmul on f16 weights, for comparison


def _sweep(env: str, parse):
    v = os.environ.get(env, "")
    return [parse(p) for p in v.split(";") if p.strip()] or [None]


def _knobs(p: str) -> dict:
    """"bk=32,tile_mn=128x64,split_k=2" -> {"bk": 32, "tile_mn": (128, 64), "split_k": 2};
    "default" -> {} (so a sweep can include the unchanged planner)."""
    kv = (t.split("=") for t in p.split(",") if "=" in t)
    return {k.strip(): (tuple(int(x) for x in v.split("x")) if "x" in v else
                        int(v) if v.strip().lstrip("-").isdigit() else v.strip()) for k, v in kv}


GEMV_CFGS = _sweep("TENSORGPU_QGEMV", lambda p: tuple(int(t) for t in p.split(",")))
PREFILL_CFGS = _sweep("TENSORGPU_QPREFILL", lambda p: (p.strip(), _knobs(p)))


def _weights(dt, N, K):
    """GGUF bytes of a random [N, K] weight: quantized normals where gguf can quantize the type,
    else random blocks at the same scale (k-quants). Big weights are tiled from one slab of rows
    (quantizing 16M floats in NumPy takes long; the bytes read are what matter)."""
    rng = np.random.default_rng(0)
    rows = min(N, 256)
    if dt is dtypes.float16:
        slab = (rng.standard_normal((rows, K)) / np.sqrt(K)).astype(np.float16).view(np.uint8)
        return np.ascontiguousarray(np.tile(slab, (-(-N // rows), 1))[:N]).reshape(-1)
    try:
        slab = np.asarray(gguf.quants.quantize(rng.standard_normal((rows, K)).astype(np.float32) / np.sqrt(K),
                                               QT(dt.ggml_type)), np.uint8).reshape(rows, -1)
    except NotImplementedError:
        slab = random_blocks(dt, (rows, K), 1 / np.sqrt(K), rng)
    return np.ascontiguousarray(np.tile(slab, (-(-N // rows), 1))[:N]).reshape(-1)


def _check(out, raw, dt, x, N, K):
    """Spot-check 64 outputs against NumPy (full dequantize of those rows only)."""
    M = x.shape[0]
    got = np.frombuffer(runtime.read(out, 0, M * N * 4), np.float32).reshape(M, N)
    rows = np.unique(np.linspace(0, N - 1, 64).astype(int))
    if dt is dtypes.float16:
        W = raw.view(np.float16).reshape(N, K)[rows].astype(np.float64)
    else:
        rb = K // dt.block_size * dt.block_bytes
        W = np.stack([np.asarray(gguf.quants.dequantize(raw[r * rb:(r + 1) * rb], QT(dt.ggml_type)),
                                 np.float64).reshape(-1) for r in rows])
    ref = x.astype(np.float64) @ W.T
    err = np.abs(got[:, rows] - ref).max() / max(np.abs(ref).max(), 1e-30)
    assert err < 1e-3, f"quant {dt.name}: wrong result (rel err {err:.2e})"


def _time(benchmark, dispatches, reps=4):
    t = probe.bench_dispatches(benchmark, dispatches, reps)
    dev = runtime.get_device()
    benchmark.extra_info.update({"us_per_dispatch": t * 1e6, "timestamps": probe.has_timestamps(),
                                 "wall_us_per_dispatch": benchmark.stats.stats.min / reps * 1e6,
                                 "device": dev.name, "clocks": probe.gpu_clocks(),
                                 "f16": dev.has_f16, "subgroups": dev.has_subgroups})
    return t


@pytest.fixture
def tuning():
    with debug.tuning(quant.TUNING) as knobs:
        yield knobs


@pytest.fixture
def gemv_tuning():
    with debug.tuning(gm.TUNING) as knobs:
        yield knobs


def _gemv_dispatches(dt, raw, xop, N, K, copies, outs):
    """One GEMV per weight copy; outs = 1 (dependent calls) or `copies` (independent)."""
    ws = [runtime.upload(raw) for _ in range(copies)]
    bufs = [runtime.Buffer(N * 4) for _ in range(outs)]
    ds, launch = [], None
    for i, w in enumerate(ws):
        if dt is dtypes.float16:     # float rows: decode's own kernel (quant_matmul takes GGML blocks)
            name, src, binds, grid, info = gm.plan(bufs[i % outs], xop, Operand(w, dt, (N, K), (K, 1), 0), dt, N, K)
            launch = mm.Launch("gemv", name, src, binds, grid, info)
        else:
            launch = quant.plan_matmul(bufs[i % outs], xop, w, dt, N, K)
        ds += [runtime.dispatch(*p) for p in launch.passes]
    return ds, launch, bufs[0], ws


@pytest.mark.parametrize("cfg", GEMV_CFGS, ids=lambda c: "default" if c is None else f"t{c[0]}r{c[1]}")
@pytest.mark.parametrize("wdt", GEMV_TYPES)
@pytest.mark.parametrize("M,K,N", GEMV_SHAPES, ids=lambda x: str(x))
def test_quant_gemv(benchmark, gemv_tuning, M, K, N, wdt, cfg):
    dt = dtypes.as_dtype(wdt)
    if cfg is not None:
        gemv_tuning.update(threads=cfg[0], rows=cfg[1])
    raw = _weights(dt, N, K)
    x = np.random.default_rng(1).standard_normal((M, K)).astype(np.float32)
    xop = Operand(runtime.upload(x), dtypes.float32, (M, K), (K, 1), 0)
    copies = max(2, min(16, -(-(120 << 20) // raw.nbytes)))
    dep, launch, out, _ws = _gemv_dispatches(dt, raw, xop, N, K, copies, 1)
    _check(out, raw, dt, x, N, K)
    t_dep = _time(benchmark, dep) / copies
    ind, _, out_i, _wi = _gemv_dispatches(dt, raw, xop, N, K, copies, copies)
    _check(out_i, raw, dt, x, N, K)
    t_ind = probe.gpu_time_per_dispatch(ind) / copies
    wbytes = raw.nbytes
    copy_bw = probe.copy_bandwidth(min(COPY_BYTES, runtime.get_device().max_binding_size // 2))
    # context, not the target's denominator: a copy of the weight's own size, cold in L2 like the GEMV
    copy_same = probe.copy_bandwidth_cold(-(-wbytes // 16) * 16)
    info = {"kernel": launch.passes[0][0], **launch.info, "weight_bytes": wbytes, "copies": copies,
            "copy GB/s": copy_bw / 1e9, "same-size copy GB/s": copy_same / 1e9}
    for tag, t in (("dependent", t_dep), ("independent", t_ind)):
        gbs = wbytes / t / 1e9
        info.update({f"{tag} us": t * 1e6, f"{tag} weight GB/s": gbs, f"{tag} % of copy BW": 100 * gbs * 1e9 / copy_bw,
                     f"{tag} % of same-size copy": 100 * gbs * 1e9 / copy_same})
    info.update(us_per_dispatch=t_dep * 1e6, wall_us_per_dispatch=benchmark.extra_info["wall_us_per_dispatch"] / copies)
    benchmark.extra_info.update(info)
    print(f"\nqgemv {wdt} {M}x{K} @ {N}x{K} {launch.info}: " + ", ".join(
        f"{tag} {info[f'{tag} us']:.1f} us = {info[f'{tag} weight GB/s']:.0f} GB/s "
        f"({info[f'{tag} % of copy BW']:.0f}% of copy {copy_bw / 1e9:.0f}, {info[f'{tag} % of same-size copy']:.0f}% of "
        f"a same-size copy {copy_same / 1e9:.0f})" for tag in ("dependent", "independent")))


@pytest.fixture
def mm_tuning():
    with debug.tuning(mm.TUNING) as knobs:
        yield knobs


@functools.lru_cache(maxsize=None)
def _prefill_weights(wdt: str, N: int, K: int) -> np.ndarray:
    """Host weights of one prefill case, made once per sweep (NumPy quantizing is slow)."""
    if wdt == "float16":
        return (np.random.default_rng(0).standard_normal((N, K)) / np.sqrt(K)).astype(np.float16)
    return _weights(dtypes.as_dtype(wdt), N, K)


def _prefill_launch(wdt: str, M: int, K: int, N: int):
    """(launch passes, kernel name, info, check) of x[M, K] @ W[N, K].T with W of dtype wdt."""
    x = np.random.default_rng(1).standard_normal((M, K)).astype(np.float32)
    xop = Operand(runtime.upload(x), dtypes.float32, (M, K), (K, 1), 0)
    out = runtime.Buffer(M * N * 4)
    if wdt == "float16":
        w = _prefill_weights(wdt, N, K)
        la = mm.plan(out, xop, Operand(runtime.upload(w), dtypes.float16, (K, N), (1, K), 0))
        passes = la.passes

        def check():
            got = np.frombuffer(runtime.read(out, 0, M * N * 4), np.float32).reshape(M, N)
            ref = x[:16].astype(np.float64) @ w.astype(np.float64).T
            assert np.allclose(got[:16], ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max()), "f16: wrong result"
        return passes, la.name, la.info, check
    dt = dtypes.as_dtype(wdt)
    raw = _prefill_weights(wdt, N, K)
    la = quant.plan_matmul(out, xop, runtime.upload(raw), dt, N, K)
    return la.passes, la.passes[0][0], la.info, lambda: _check(out, raw, dt, x, N, K)


@pytest.mark.parametrize("cfg", PREFILL_CFGS, ids=lambda c: "default" if c is None else c[0])
@pytest.mark.parametrize("wdt", PREFILL_TYPES)
@pytest.mark.parametrize("M,K,N", PREFILL_SHAPES, ids=lambda x: str(x))
def test_quant_prefill(benchmark, tuning, mm_tuning, M, K, N, wdt, cfg):
    """Prefill matmul: quantized weights (in-kernel decode) beside f16 weights, same shape; cfg
    (TENSORGPU_QPREFILL="default;bk=32;split_k=2;tile_mn=128x64,split_k=4;tiled_fast_decode=0")
    overrides quant.TUNING for its keys, else matmul.TUNING (the planner both paths share)."""
    for k, v in (cfg[1] if cfg is not None else {}).items():
        (tuning if k in tuning else mm_tuning)[k] = v
    passes, name, info, check = _prefill_launch(wdt, M, K, N)
    ds = [runtime.dispatch(*p) for p in passes]
    check()
    t = _time(benchmark, ds)
    flops = 2 * M * N * K
    benchmark.extra_info.update({"kernel": name, **info, "GFLOP/s": flops / t / 1e9})
    print(f"\nPREFILL [{'default' if cfg is None else cfg[0]}] {wdt:8s} {M}x{K} @ {N}x{K}: {t * 1e6:7.1f} us "
          f"{flops / t / 1e12:5.1f} TFLOP/s  {name} split {info.get('split')}")
