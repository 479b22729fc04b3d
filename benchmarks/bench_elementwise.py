"""The elementwise fuser's payoff and the per-dispatch overhead.

A 6-op chain `relu(exp(x * y + 1) * 0.5 - y)` over N float32 elements, three ways:
  fused    one generated kernel (reads x, y once, writes the result: 12 B/element)
  unfused  realize after each op: 6 kernels and 5 intermediates in memory (56 B/element)
  numpy    the same chain on the CPU (for scale)
N is 1M by default (lavapipe) and 16M with TENSORGPU_BENCH_FULL=1 (the H100).

Per-dispatch overhead: N_TINY tiny kernels (one workgroup each) queued and submitted once,
(a) replayed from already built dispatches (runtime cost: encode + submit + GPU), and
(b) built through the Tensor API, one realize per op (framework cost: graph, schedule,
    codegen cache lookup, bind-group cache, encode).

pytest-benchmark's table is wall clock (CPU work included) of one iteration + runtime.sync();
extra_info holds elements/s, GB/s (bytes the kernels must move / time), the GPU time per
iteration from timestamp queries where available, and the fused/unfused ratio.
"""
import os
import time

import numpy as np
import pytest

import tensorgpu as tg
from tensorgpu.kernels.probe import recorded
from tensorgpu import runtime
from tensorgpu.kernels import probe

FULL = os.environ.get("TENSORGPU_BENCH_FULL", "") not in ("", "0")
N = 16 * 1024 * 1024 if FULL else 1024 * 1024
N_TINY = 1000 if FULL else 200
BYTES_FUSED = 12          # x, y read, result written, 4 B each
BYTES_UNFUSED = 56        # 12 + 8 + 8 + 8 + 12 + 8: each op reads its operands and writes a temporary


def chain(x, y):
    return ((x * y + 1).exp() * 0.5 - y).relu()


def chain_unfused(x, y):
    t = (x * y).realize()
    t = (t + 1).realize()
    t = t.exp().realize()
    t = (t * 0.5).realize()
    t = (t - y).realize()
    return t.relu().realize()


def chain_numpy(x, y):
    return np.maximum(np.exp(x * y + 1) * np.float32(0.5) - y, 0)




@pytest.fixture(scope="module")
def data():
    r = np.random.default_rng(0)
    xn = r.standard_normal(N, dtype=np.float32)
    yn = r.standard_normal(N, dtype=np.float32)
    return xn, yn, tg.tensor(xn), tg.tensor(yn)


def _gpu_seconds(dispatches):
    try:
        return probe.gpu_time_per_dispatch(dispatches, warmup_s=0.1, target_s=0.05, rounds=3)
    except Exception:  # no timestamps and no fallback: report wall clock only
        return float("nan")


def _report(benchmark, nbytes, gpu_s, kernels):
    stats = getattr(benchmark, "stats", None)
    wall = stats.stats.min if stats else float("nan")
    benchmark.extra_info.update({
        "elements": N, "kernels": kernels, "device": runtime.get_device().name,
        "wall_ms": wall * 1e3, "elements_per_s_wall": N / wall, "GB/s_wall": nbytes * N / wall / 1e9,
        "gpu_ms": gpu_s * 1e3, "elements_per_s_gpu": N / gpu_s, "GB/s_gpu": nbytes * N / gpu_s / 1e9,
    })


def test_chain_fused(benchmark, data):
    xn, yn, x, y = data
    out = chain(x, y)
    with tg.debug.kernel_log() as log:
        got = out.numpy()
    assert len(log) == 1
    np.testing.assert_allclose(got[:4096], chain_numpy(xn[:4096], yn[:4096]), rtol=1e-5, atol=1e-6)
    gpu = _gpu_seconds(recorded(lambda: chain(x, y).realize()))

    def step():
        chain(x, y).realize()
        runtime.sync()
    benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=1)
    _report(benchmark, BYTES_FUSED, gpu, 1)
    print(f"\nfused 6-op chain, {N} f32: {gpu * 1e3:.2f} ms GPU, {BYTES_FUSED * N / gpu / 1e9:.1f} GB/s")


def test_chain_unfused(benchmark, data):
    xn, yn, x, y = data
    with tg.debug.kernel_log() as log:
        got = chain_unfused(x, y).numpy()
    assert len(log) == 6
    np.testing.assert_allclose(got[:4096], chain_numpy(xn[:4096], yn[:4096]), rtol=1e-5, atol=1e-6)
    gpu = _gpu_seconds(recorded(lambda: chain_unfused(x, y)))
    gpu_fused = _gpu_seconds(recorded(lambda: chain(x, y).realize()))

    def step():
        chain_unfused(x, y)
        runtime.sync()
    benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=1)
    _report(benchmark, BYTES_UNFUSED, gpu, 6)
    benchmark.extra_info["fused_speedup_gpu"] = gpu / gpu_fused
    print(f"\nunfused (6 kernels): {gpu * 1e3:.2f} ms GPU; fused is {gpu / gpu_fused:.2f}x faster")


def test_chain_numpy(benchmark, data):
    xn, yn, _, _ = data
    benchmark.pedantic(lambda: chain_numpy(xn, yn), rounds=5, iterations=1, warmup_rounds=1)
    stats = getattr(benchmark, "stats", None)
    wall = stats.stats.min if stats else float("nan")
    benchmark.extra_info.update({"elements": N, "wall_ms": wall * 1e3, "elements_per_s_wall": N / wall,
                                 "GB/s_wall": BYTES_FUSED * N / wall / 1e9})


def test_dispatch_overhead_replay(benchmark):
    """Already-built dispatches: what one more kernel in a submit costs the runtime + GPU."""
    x = tg.tensor(np.ones(64, np.float32))
    disp = recorded(lambda: (x * 2 + 1).realize())
    assert len(disp) == 1
    runtime.sync()

    def step():
        for _ in range(N_TINY):
            runtime.replay(disp)
        runtime.sync()
    s0 = tg.debug.stats()["submits"]
    step()
    assert tg.debug.stats()["submits"] - s0 <= 2  # the N_TINY kernels + the sync's readback
    benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=1)
    stats = getattr(benchmark, "stats", None)
    wall = stats.stats.min if stats else float("nan")
    gpu = _gpu_seconds(disp)
    benchmark.extra_info.update({"dispatches": N_TINY, "us_per_dispatch_wall": wall / N_TINY * 1e6,
                                 "us_per_dispatch_gpu": gpu * 1e6, "device": runtime.get_device().name})
    print(f"\nreplay: {wall / N_TINY * 1e6:.1f} us/dispatch wall, {gpu * 1e6:.1f} us GPU")


def test_dispatch_overhead_tensor_api(benchmark):
    """One realize per op through the Tensor API (graph + fuser + caches + encode)."""
    x = tg.tensor(np.ones(64, np.float32))
    runtime.sync()

    def step():
        t = x
        for i in range(N_TINY):
            t = (t * 1.0001).realize()
        runtime.sync()
        return t
    step()
    p0 = tg.debug.stats()["pipelines_compiled"]
    benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=1)
    assert tg.debug.stats()["pipelines_compiled"] == p0  # steady state compiles nothing
    stats = getattr(benchmark, "stats", None)
    wall = stats.stats.min if stats else float("nan")
    benchmark.extra_info.update({"dispatches": N_TINY, "us_per_op_wall": wall / N_TINY * 1e6,
                                 "device": runtime.get_device().name})
    t0 = time.perf_counter()
    np.testing.assert_allclose(step().numpy(), np.float32(1.0001) ** N_TINY * np.ones(64), rtol=1e-4)
    print(f"\ntensor API: {wall / N_TINY * 1e6:.1f} us/op ({(time.perf_counter() - t0) * 1e3:.0f} ms for {N_TINY})")
